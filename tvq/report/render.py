"""Render a report notebook: run it with papermill, then write the executed .ipynb and HTML.

Nothing is written unless every cell ran: the notebook runs in memory, its figures go to
a staging folder beside the output (see tvq.report.figures.save_figure), and the
figures, the notebook and its HTML are moved into place only at the end.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import zmq
from jupyter_client.kernelspec import KernelSpec
from jupyter_client.manager import AsyncKernelManager
from traitlets import Dict, Unicode, default
from traitlets.config import Config

from tvq.files import raise_if_stopped, write_text_atomic
from tvq.report.errors import ReportError
from tvq.report.figures import STAGED_FIGURES, STAGING_ENV

# Seconds that one cell may run before the notebook fails; the notebooks only read files.
CELL_TIMEOUT_S = 600


class CurrentPythonKernelManager(AsyncKernelManager):
    """Start the notebook's kernel with this process's Python, ignoring installed kernelspecs.

    jupyter_client 8 looks "python3" up in JUPYTER_PATH and the user, environment and
    system data folders, whichever comes first, so it can start another environment's
    Python (a user-wide kernelspec, or a virtual environment that is not preferred).
    This manager always runs `sys.executable -m ipykernel_launcher`, so the kernel
    imports the same tvq, pandas and seaborn as the `tvq report` that started it.
    """

    kernel_env = Dict(
        help="Variables added to the kernel's environment ($ is written as $$)."
    ).tag(config=True)

    kernel_log = Unicode(
        "",
        help="File for the kernel process's own output; empty: this process's stdout and stderr.",
    ).tag(config=True)

    @default("transport_encryption")
    def _encrypt_when_possible(self) -> str:
        # CurveZMQ keys keep the kernel's TCP traffic private, but need a pyzmq built
        # with libsodium; "auto" applies them because the kernelspec below declares them.
        return "auto" if zmq.has("curve") else "disabled"

    @property
    def kernel_spec(self) -> KernelSpec:
        if self._kernel_spec is None:
            self._kernel_spec = KernelSpec(
                argv=[sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                name="python3",
                display_name=f"Python ({sys.executable})",
                language="python",
                env=dict(self.kernel_env),
                # ipykernel 7.4, the lowest version in pyproject.toml, accepts Curve keys.
                metadata={"supported_encryption": ["curve"]},
            )
        return self._kernel_spec

    async def _async_launch_kernel(self, kernel_cmd: list[str], **kw: Any) -> None:
        # ipykernel logs to its process's stderr, for example "KeyboardInterrupt caught in
        # kernel" when jupyter_client interrupts it at shutdown; cell output goes to the
        # notebook instead. The log keeps that noise out of `tvq report`'s one-line errors.
        if not self.kernel_log:
            return await super()._async_launch_kernel(kernel_cmd, **kw)
        with open(self.kernel_log, "ab") as log_file:
            kw.setdefault("stdout", log_file)
            kw.setdefault("stderr", log_file)
            return await super()._async_launch_kernel(kernel_cmd, **kw)


def notebook_parameters(notebook: Path) -> dict[str, dict[str, Any]]:
    """Return the parameters of the notebook's cell tagged "parameters", by name."""
    import nbformat
    import papermill

    try:
        return papermill.inspect_notebook(str(notebook))
    except FileNotFoundError:
        raise ReportError(f"{notebook}: not found") from None
    except (nbformat.reader.NotJSONError, nbformat.ValidationError, ValueError) as error:
        reason = str(error).strip().splitlines()[0][:200]
        raise ReportError(f"{notebook}: not a valid notebook ({reason})") from None


def render_notebook(
    notebook: Path, out: Path, html: Path, parameters: dict[str, Any]
) -> list[Path]:
    """Run the notebook with parameters; write out (.ipynb), html and its figures.

    Returns the figures written. Raises ReportError with the notebook's own exception
    message when a cell fails, and then leaves no output behind.
    """
    import nbformat

    for path in (out, html):
        if path.is_dir():
            raise ReportError(f"{path}: is a folder; give a file path")
        path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".staging", dir=out.parent))
    try:
        executed = _execute(notebook, parameters, staging)
        page = _to_html(executed, notebook)
        figures = _move_figures(staging)
        write_text_atomic(out, nbformat.writes(executed))
        write_text_atomic(html, page)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return figures


def _execute(notebook: Path, parameters: dict[str, Any], staging: Path):
    import nbclient.exceptions
    import papermill
    from papermill.exceptions import PapermillExecutionError

    # A "$" in the folder name would otherwise start a substitution (see kernel_env).
    kernel_env = {STAGING_ENV: str(staging.absolute()).replace("$", "$$")}
    kernel_log = staging / "kernel.log"
    config = Config(
        {"CurrentPythonKernelManager": {"kernel_env": kernel_env, "kernel_log": str(kernel_log)}}
    )
    try:
        return papermill.execute_notebook(
            str(notebook),
            None,
            parameters=parameters,
            kernel_name="python3",
            progress_bar=False,
            request_save_on_cell_execute=False,
            # The kernel runs in the current folder, so relative paths in the parameters
            # mean the same to the notebook as on the command line.
            cwd=str(Path.cwd()),
            execution_timeout=CELL_TIMEOUT_S,
            kernel_manager_class=CurrentPythonKernelManager,
            config=config,
        )
    except PapermillExecutionError as error:
        message = " ".join(str(error.evalue).split())
        # In [N] counts the executed cells, including papermill's injected parameters.
        raise ReportError(
            f"{notebook}: cell In [{error.exec_count}] raised {error.ename}: {message}"
        ) from None
    except nbclient.exceptions.DeadKernelError as error:
        raise ReportError(
            f"{notebook}: the kernel died ({error}){_last_line(kernel_log)}"
        ) from None
    except nbclient.exceptions.CellTimeoutError:
        raise ReportError(
            f"{notebook}: a cell ran longer than {CELL_TIMEOUT_S} s and was stopped"
        ) from None
    except (RuntimeError, TimeoutError) as error:
        # Raised by jupyter_client and nbclient when the kernel does not start or reply.
        raise ReportError(
            f"{notebook}: could not run a kernel with {sys.executable} -m ipykernel_launcher "
            f"({error}){_last_line(kernel_log)}; check that ipykernel is installed there"
        ) from None


def _last_line(log_file: Path) -> str:
    """Return "; the kernel's last output: ..." from the kernel log, or "" if it is empty."""
    try:
        lines = log_file.read_text(errors="replace").strip().splitlines()
    except FileNotFoundError:
        return ""
    return f"; the kernel's last output: {lines[-1][:300]}" if lines else ""


def _to_html(executed, notebook: Path) -> str:
    from nbconvert import HTMLExporter

    # nbconvert 7.17's default (lab) template writes no alt attribute for images, so it
    # warns on every page. The headings above each figure describe it, so this logger
    # shows only errors.
    quiet = logging.getLogger(f"{__name__}.html")
    quiet.setLevel(logging.ERROR)
    body, _ = HTMLExporter(log=quiet).from_notebook_node(
        executed, resources={"metadata": {"name": notebook.stem}}
    )
    return body


def _move_figures(staging: Path) -> list[Path]:
    """Move the staged figures to the paths that save_figure recorded; return them as the
    notebook gave them."""
    raise_if_stopped()
    manifest = staging / STAGED_FIGURES
    if not manifest.exists():
        return []
    targets: dict[Path, Path] = {}
    given_paths: dict[Path, Path] = {}
    for line in manifest.read_text().splitlines():
        record = json.loads(line)
        # A figure saved twice under one name keeps the later image.
        targets[Path(record["target"])] = staging / record["staged"]
        given_paths[Path(record["target"])] = Path(record["given"])
    for target, staged in targets.items():
        target.parent.mkdir(parents=True, exist_ok=True)
        # Copied beside the target first, so the rename that replaces it is atomic.
        temporary = target.with_name(f".{target.name}.tmp")
        try:
            shutil.copyfile(staged, temporary)
            os.replace(temporary, target)
        finally:
            temporary.unlink(missing_ok=True)
    return [given_paths[target] for target in targets]
