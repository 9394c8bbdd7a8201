"""A real HTTP server on 127.0.0.1 for download tests, with Range support and a switch
that cuts the connection part-way through a response."""

from __future__ import annotations

import contextlib
import http.server
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field


@dataclass
class ServedFiles:
    files: dict[str, bytes] = field(default_factory=dict)
    # Path -> number of bytes after which the next response is cut (used once).
    cut_after: dict[str, int] = field(default_factory=dict)
    # Paths whose next ranged response (used once) restarts the body at byte 0 while
    # still returning 206, as a misbehaving server or proxy might.
    wrong_range: set[str] = field(default_factory=set)
    # (path, Range header or None) of every GET, in order.
    requests: list[tuple[str, str | None]] = field(default_factory=list)


def _handler(served: ServedFiles):
    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            range_header = self.headers.get("Range")
            served.requests.append((self.path, range_header))
            if self.path not in served.files:
                self.send_error(404, "Not Found")
                return
            body = served.files[self.path]
            start = 0
            if range_header and self.path in served.wrong_range:
                served.wrong_range.discard(self.path)
                self.send_response(206)
                self.send_header("Content-Range", f"bytes 0-{len(body) - 1}/{len(body)}")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
            if range_header:
                start = int(range_header.removeprefix("bytes=").split("-")[0])
                if start >= len(body):
                    self.send_error(416, "Range Not Satisfiable")
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            else:
                self.send_response(200)
            self.send_header("Content-Length", str(len(body) - start))
            self.end_headers()

            cut = served.cut_after.pop(self.path, None)
            if cut is not None:
                self.wfile.write(body[start : start + cut])
                self.wfile.flush()
                self.close_connection = True
                return
            self.wfile.write(body[start:])

    return Handler


@contextlib.contextmanager
def serve(served: ServedFiles) -> Iterator[str]:
    """Serve `served.files` on 127.0.0.1 at a free port; yield the base URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(served))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
