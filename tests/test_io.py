from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from sae_unlearn.errors import UserError
from sae_unlearn.io import atomic_dir, atomic_write_text


@pytest.mark.parametrize(("umask", "file_mode", "dir_mode"), [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)])
def test_atomic_writes_follow_the_umask(tmp_path: Path, umask: int, file_mode: int, dir_mode: int) -> None:
    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        with atomic_dir(tmp_path / "d") as tmp:
            (tmp / "f").write_text("y")
        assert os.umask(umask) == umask  # reading it left it as it was
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == file_mode
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == dir_mode


def test_atomic_dir_keeps_what_was_there(tmp_path: Path) -> None:
    final = tmp_path / "out"
    with atomic_dir(final) as tmp:
        (tmp / "v").write_text("1")
    with pytest.raises(UserError, match="already exists"), atomic_dir(final):
        pass
    with pytest.raises(RuntimeError), atomic_dir(final, overwrite=True) as tmp:
        (tmp / "v").write_text("2")
        raise RuntimeError("interrupted")
    assert (final / "v").read_text() == "1" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with atomic_dir(final, overwrite=True) as tmp:
        (tmp / "v").write_text("2")
    assert (final / "v").read_text() == "2" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
