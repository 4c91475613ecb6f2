"""Write a folder completely or not at all: build it in a temporary sibling, then rename it into place."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import RetrofitError


def check_output(output: str | Path, overwrite: bool = False) -> Path:
    """Refuse an existing output folder unless `overwrite`; return the path. Call before any heavy work."""
    output = Path(output)
    if output.exists() and not overwrite:
        raise RetrofitError(f"output '{output}' already exists; choose another --output or pass --overwrite")
    if output.exists() and not output.is_dir():
        raise RetrofitError(f"output '{output}' exists and is not a folder; choose another --output")
    return output


@contextmanager
def atomic_dir(output: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary folder next to `output`; on success it replaces `output`, on error it is removed.

    The rename is atomic on one file system, so a reader (or a killed process) sees either the old folder, the new
    one, or none, never a half-written one. Left-over ``.<name>.tmp-*`` folders from a killed run are harmless.
    """
    output = check_output(output, overwrite)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)
        for path in tmp.rglob("*"):  # temp files are created 0600; exports are meant to be shared
            os.chmod(path, 0o755 if path.is_dir() else 0o644)
        if output.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{output.name}.old-", dir=output.parent))
            os.replace(output, old / output.name)
            os.replace(tmp, output)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
