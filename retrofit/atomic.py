"""Write a folder or a file completely or not at all: build it as a temporary sibling, then rename it into place."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import RetrofitError


def check_output(output: str | Path, overwrite: bool = False, *, keep: tuple[str | Path, ...] = ()) -> Path:
    """Refuse an output folder that cannot be written, or exists (unless `overwrite`), or is or holds one of the
    folders in `keep` (a source checkpoint) or the current folder; return the path. Call before any heavy work."""
    output = Path(output)
    if not str(output).strip():
        raise RetrofitError("--output is empty; give the folder to write")
    if output.exists() and not output.is_dir():
        raise RetrofitError(f"output '{output}' exists and is not a folder; choose another --output")
    if output.exists() and not overwrite:
        raise RetrofitError(f"output '{output}' already exists; choose another --output or pass --overwrite")
    for folder in keep:
        if Path(folder).exists() and Path(folder).resolve().is_relative_to(output.resolve()):
            raise RetrofitError(
                f"output '{output}' is or holds '{folder}', which this run reads; choose another --output"
            )
    if output.exists() and Path.cwd().resolve().is_relative_to(output.resolve()):
        raise RetrofitError(
            f"output '{output}' holds the current folder, so it cannot be replaced; choose another --output"
        )
    parent = next((p for p in output.absolute().parents if p.exists()), Path("/"))
    if not parent.is_dir():
        raise RetrofitError(f"output '{output}' is under '{parent}', which is a file; choose another --output")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise RetrofitError(
            f"output '{output}': cannot write in '{parent}' (read-only or no permission); choose another --output"
        )
    return output


def check_file_target(path: str | Path, option: str) -> Path:
    """Refuse a file target (``--json FILE``) that cannot be written: a folder, or under a file. Call before work."""
    path = Path(path)
    if path.is_dir():
        raise RetrofitError(f"{option} '{path}' is a folder; give a file name, e.g. {path / 'results.json'}")
    parent = next((p for p in path.parents if p.exists()), Path("."))
    if not parent.is_dir():
        raise RetrofitError(f"{option} '{path}' is under '{parent}', which is a file; choose another path")
    if not os.access(parent, os.W_OK):
        raise RetrofitError(f"{option} '{path}': cannot write in '{parent}' (permission denied); choose another path")
    return path


def write_text(path: str | Path, text: str) -> Path:
    """Write `text` to `path` through a temporary sibling renamed into place: readers see the old file or the new
    one, never half of it (a full disk leaves the old file as it was)."""
    write_files({Path(path): text})
    return Path(path)


def write_files(files: dict[Path, str]) -> None:
    """Write several files (path -> UTF-8 text) together: every text first goes to a temporary sibling, where a full
    disk fails before any file is touched, and only then is each renamed into place. Temporary files never stay."""
    staged: list[tuple[Path, Path]] = []
    try:
        for path, text in files.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
            staged.append((Path(tmp), path))
            with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
                handle.write(text)
            os.chmod(tmp, 0o644)
        for tmp, path in staged:
            os.replace(tmp, path)
    finally:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)


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
