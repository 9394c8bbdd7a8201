"""Atomic writes: symbolic links and the check of an output path."""

from __future__ import annotations

import pytest

from tvq.files import check_writable, write_text_atomic


def test_atomic_write_follows_symlink(tmp_path):
    target = tmp_path / "table.csv"
    target.write_text("old\n")
    link = tmp_path / "link.csv"
    link.symlink_to(target)

    write_text_atomic(link, "new\n")

    assert link.is_symlink()
    assert target.read_text() == "new\n"


def test_check_writable_names_blocking_file(tmp_path):
    blocker = tmp_path / "afile"
    blocker.write_text("")
    with pytest.raises(NotADirectoryError) as error:
        check_writable(blocker / "out.csv")
    assert error.value.filename == str(blocker / "out.csv")
    assert "choose another path" in error.value.strerror
