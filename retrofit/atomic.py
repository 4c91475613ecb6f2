"""Where retrofit may write, and writing there completely or not at all.

One rule for every command that writes (convert, finetune, run, pretrain, sweep, export-onnx, the ``--json`` reports of
bench and evaluate; checkpoints follow it in `retrofit.checkpoints`):

- a path that does not exist is written (built as a temporary sibling, then renamed into place; if the path appears
  meanwhile, the rename is refused instead of replacing it);
- an existing path is replaced only with ``--overwrite`` (or by the run being resumed, where it is the output its
  checkpoints' ``run.json`` names), and only if retrofit itself wrote it, as the same kind of output (`Kind`:
  recognisable by what it holds), or it is an empty folder;
- never, even with ``--overwrite``: an input of the same run (source, teacher, data, recipe) or a folder that holds
  one, the current folder or one holding it, a checkpoint shipped with retrofit (``retrofit/assets``).

Anything else is refused with one line naming the path, before any work (`check_output`, `check_file_output`) and
again at the final rename (`atomic_dir`, `write_report`). A run that writes for long (finetune, pretrain, a recipe,
convert) also holds a lock on its output and checkpoint folders (`hold_write_lock`), so a second run on one of them is
refused at its start, not after hours of training; `push` holds it on the export it uploads.
"""

from __future__ import annotations

import ctypes
import errno
import fnmatch
import functools
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from .errors import RetrofitError, brief, check_interrupted, interrupts_deferred, log_to_stderr
from .families import MERGED_SUFFIX

T = TypeVar("T")

ASSETS = Path(__file__).parent / "assets"  # the checkpoints shipped with retrofit (`retrofit:NAME`)
SHIPPED_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # the NAME of `retrofit:NAME`: a name, never a path
REPORT_KEY = "retrofit_report"  # first key of every JSON report retrofit writes: what wrote it
# What `evaluate --card` / `bench --card` add to an export (`card.update_card` writes them): the reports
# behind the card's Results section, and its images/s against batch size.
RESULTS_FILE = "retrofit_results.json"
CURVE_FILE = "speed.png"


def _json(path: Path) -> dict:
    """The JSON object in `path`, or {} (missing, unreadable, not an object)."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


@dataclass(frozen=True)
class Kind:
    """A kind of folder retrofit writes: recognised by a marker file's content (`marker`: file name and the keys it
    must hold) and by holding nothing but the files retrofit writes for it (`files`: names or strict glob patterns;
    `marked_files`: the names that depend on what the marker holds, e.g. an export's family)."""

    name: str
    marker: str
    marker_keys: tuple[str, ...]
    files: tuple[str, ...]
    model_type_suffix: str | None = None
    marked_files: Callable[[dict], tuple[str, ...]] | None = None
    ours: Callable[[Path], bool] | None = None  # of the files named as retrofit's, whether one is (by its content)

    def marks(self, folder: Path) -> bool:
        """True if `folder`'s marker file says it is this kind of output."""
        marker = _json(folder / self.marker)
        if not all(key in marker for key in self.marker_keys):
            return False
        return not self.model_type_suffix or str(marker.get("model_type", "")).endswith(self.model_type_suffix)

    def written_here(self, folder: Path) -> bool:
        """True if `folder` is this kind of output as retrofit wrote it: marked, and holding nothing else."""
        return self.marks(folder) and not self.foreign_files(folder)

    def foreign_files(self, folder: Path) -> list[str]:
        """The entries of `folder` that retrofit does not write for this kind (sorted names)."""
        names = (*self.files, *(self.marked_files(_json(folder / self.marker)) if self.marked_files else ()))
        return sorted(
            entry.name
            for entry in folder.iterdir()
            if entry.is_symlink()
            or not entry.is_file()
            or not any(fnmatch.fnmatchcase(entry.name, p) for p in names)
            or (self.ours is not None and not self.ours(entry))
        )


# transformers' weight shards: model-00001-of-00002.safetensors
_SHARD = f"model-{'[0-9]' * 5}-of-{'[0-9]' * 5}.safetensors"
_WEIGHTS = ("model.safetensors", _SHARD, "model.safetensors.index.json")
# A dual encoder's tokenizer as transformers saves it (BPE: tokenizer.json; SigLIP's sentencepiece: spiece.model)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "spiece.model")  # fmt: skip


def family_files(config: dict) -> tuple[str, ...]:
    """The files of an export that depend on its family and class (its config.json): the generated code
    (`hub_code.code_files`) and a dual encoder's tokenizer; none where this retrofit cannot tell its class."""
    from .hub_code import code_files
    from .loading import merged_family_and_head

    try:
        family, head = merged_family_and_head(config)
    except (RetrofitError, LookupError, AttributeError, TypeError):  # a family or class this retrofit does not know
        return ()
    return (*code_files(family, head), *(TOKENIZER_FILES if head.is_dual_encoder else ()))


def card_file_ours(path: Path) -> bool:
    """Whether a file of an export is retrofit's: the card's curve and results file (`CURVE_FILE`, `RESULTS_FILE`)
    only where they hold what retrofit writes there (a user's file of that name is the user's, and `push` leaves it
    out); every other file by its name."""
    if path.name == CURVE_FILE:
        from .benchmark import is_our_plot

        return is_our_plot(path)
    if path.name == RESULTS_FILE:
        from .card import is_results_file

        return is_results_file(path)
    return True


EXPORT = Kind(
    "a retrofit export",
    marker="config.json",
    marker_keys=("model_type", "merge_after_layer"),
    files=(
        *_WEIGHTS,
        "config.json",
        "preprocessor_config.json",
        "README.md",
        RESULTS_FILE,
        CURVE_FILE,
    ),  # fmt: skip
    model_type_suffix=MERGED_SUFFIX,
    marked_files=family_files,
    ours=card_file_ours,
)


def _pretrained_files(training: dict) -> tuple[str, ...]:
    """The files of a pretrained checkpoint that depend on its training.json: a CLIP pretrained on captions (loss
    contrastive) ships its tokenizer."""
    settings = training.get("settings")
    return TOKENIZER_FILES if isinstance(settings, dict) and settings.get("loss") == "contrastive" else ()


BASELINE = Kind(
    "a checkpoint retrofit pretrained",
    marker="training.json",
    marker_keys=("steps", "settings"),
    files=(*_WEIGHTS, "config.json", "preprocessor_config.json", "training.json"),
    marked_files=_pretrained_files,
)


def sweep_file_ours(path: Path) -> bool:
    """Whether a file of a sweep report is retrofit's: its plot only where retrofit drew it (a user's figure saved
    as sweep.png is theirs); sweep.json and sweep.md by their names."""
    if path.name != "sweep.png":
        return True
    from .benchmark import is_our_plot
    from .sweep import PLOT_MARK

    return is_our_plot(path, PLOT_MARK)


SWEEP = Kind("a sweep report", marker="sweep.json", marker_keys=("source", "settings_results"),
             files=("sweep.json", "sweep.md", "sweep.png"), ours=sweep_file_ours)  # fmt: skip


def local_paths(paths: Iterable[str | os.PathLike | None]) -> list[Path]:
    """The local files and folders among `paths` (a run's inputs: source, teacher, data, recipe), resolved;
    ``retrofit:NAME`` becomes the shipped folder; Hub ids and missing paths are dropped."""
    found = []
    for path in paths:
        if path is None or not str(path).strip():
            continue
        text = str(path)
        name = text.removeprefix("retrofit:")
        if text.startswith("retrofit:") and (not SHIPPED_NAME.fullmatch(name) or ".." in name):
            continue  # not a shipped checkpoint: `loading.resolve_source` refuses it
        candidate = ASSETS / name if text.startswith("retrofit:") else Path(text).expanduser()
        if candidate.exists():
            found.append(candidate.resolve())
    return found


def _what(option: str) -> str:
    """How messages name a target: ``output 'x'`` for --output, ``--json 'x'`` for others."""
    return "output" if option == "--output" else option


def _refuse_shipped(path: Path, option: str) -> None:
    """Refuse a target inside, or holding, the checkpoints shipped with retrofit."""
    assets, target = ASSETS.resolve(), path.resolve()
    if target.is_relative_to(assets) or assets.is_relative_to(target):
        raise RetrofitError(
            f"{_what(option)} '{path}' is or holds a checkpoint shipped with retrofit ({assets}); choose another "
            f"{option}"
        )


def _refuse_protected(path: Path, option: str, inputs: Iterable) -> None:
    """Refuse a target that is, holds or is inside an input of the run (an export written into an image folder would
    become one of its classes), holds the current folder, or touches a shipped checkpoint, whatever --overwrite
    says."""
    what, target = _what(option), path.resolve()
    for source in local_paths(inputs):
        if source.is_relative_to(target):
            raise RetrofitError(
                f"{what} '{path}' is or holds '{source}', which this run reads; choose another {option}"
            )
        if target.is_relative_to(source):
            raise RetrofitError(f"{what} '{path}' is in '{source}', which this run reads; choose another {option}")
    _refuse_shipped(path, option)
    if path.exists() and Path.cwd().resolve().is_relative_to(target):
        raise RetrofitError(
            f"{what} '{path}' holds the current folder, so it cannot be replaced; choose another {option}"
        )


def _refuse_inside_outputs(path: Path, option: str, *, itself: bool = False) -> None:
    """Refuse a target inside a folder retrofit wrote (an export, a pretrained checkpoint, a sweep report), at any
    depth, or (`itself`: a folder retrofit writes into, such as checkpoints) that is one: it would be pushed with the
    export's own files, and the folder's ``--overwrite`` would then refuse it as a file that is not retrofit's."""
    resolved = path.resolve()  # where the system writes: '..' and links followed
    for folder in ([resolved] if itself else []) + list(resolved.parents):
        if not folder.is_dir():
            continue
        kind = next((kind for kind in (EXPORT, BASELINE, SWEEP) if kind.marks(folder)), None)
        if kind is not None and folder == resolved:
            raise RetrofitError(
                f"{_what(option)} '{path}' is {kind.name}, whose files are its own (pushed with it, replaced by its "
                "--overwrite); put it elsewhere"
            )
        if kind is not None:
            raise RetrofitError(
                f"{_what(option)} '{path}' is inside {kind.name} ('{folder}'), whose files are its own (the card's, "
                "pushed with it); write it outside that folder"
            )


def refuse_inputs(path: str | Path, inputs: Iterable[str | os.PathLike | None], option: str = "--output") -> None:
    """Refuse an output that is or holds one of `inputs` (for inputs `check_output` was not told about)."""
    _refuse_protected(Path(path), option, inputs)


def refuse_same_outputs(outputs: dict[str, str | os.PathLike | None]) -> None:
    """Refuse, before any work, two outputs of one run (option -> path; None: not given) that are the same path once
    resolved: the second would replace the first."""
    seen: dict[Path, tuple[str, str | os.PathLike]] = {}
    for option, path in outputs.items():
        if path is None or not str(path).strip():
            continue
        _refuse_dangling(Path(path), option)  # (a loop of links: resolving it raised RuntimeError)
        resolved = Path(path).resolve()
        if resolved in seen:
            first, first_path = seen[resolved]
            raise RetrofitError(
                f"{option} '{path}' and {first} '{first_path}' are the same file, so one would replace the other; "
                f"give {option} another path"
            )
        seen[resolved] = option, path


def _check_writable(path: Path, option: str) -> None:
    """Refuse, before any work, a target whose nearest existing folder cannot be written (`cannot_write_in`)."""
    what = _what(option)
    parent = next((p for p in path.absolute().parents if p.exists()), Path("/"))
    if not parent.is_dir():
        raise RetrofitError(f"{what} '{path}' is under '{parent}', which is a file; choose another {option}")
    why = cannot_write_in(parent)
    if why is not None:
        raise RetrofitError(f"{what} '{path}': cannot write in '{parent}' ({why}); choose another {option}")


def cannot_write_in(folder: Path) -> str | None:
    """Why no file can be made in `folder`, or None if one can. Permissions alone do not tell (``root`` passes every
    permission check, yet cannot write in ``/proc``; a network or FUSE mount decides on its server), so the folder is
    also tried with an empty file, removed at once."""
    if not os.access(folder, os.W_OK | os.X_OK):
        return "read-only or no permission"
    try:
        fd, probe = tempfile.mkstemp(prefix=".retrofit-write-check-", dir=folder)
    except OSError as exc:
        return exc.strerror or brief(exc)
    os.close(fd)
    os.unlink(probe)
    return None


def _refuse_dangling(path: Path, option: str) -> None:
    """Refuse a target that is, or is under, a link to nothing (or a loop of links): its folder could not be made at
    the end of the run; or one that climbs (``..``) out of a folder that does not exist (``x/../y``: the checks saw no
    ``y``, which the end of the run, having made ``x``, found there)."""
    dangling = next((p for p in (path, *path.parents) if p.is_symlink() and not p.exists()), None)
    if dangling is not None:
        raise RetrofitError(f"{option} '{path}': '{dangling}' is a link to nothing; choose another {option}")
    parts = path.parts
    missing = next((Path(*parts[:i]) for i, part in enumerate(parts) if part == ".." and not Path(*parts[:i]).exists()),
                   None)  # fmt: skip
    if missing is not None:
        raise RetrofitError(
            f"{option} '{path}' climbs ('..') out of '{missing}', which does not exist; give the path without '..'"
        )


def _refuse_long_name(path: Path, option: str) -> None:
    """Refuse a name too long for the temporary sibling a target is written as first (``.NAME.tmp-XXXXXXXX``, 14 bytes
    more), which failed at the end of the run, after all its work."""
    parent = next((p for p in path.absolute().parents if p.exists()), Path("/"))
    try:
        limit = os.pathconf(parent, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):  # not known here (or no pathconf: Windows)
        limit = 255
    if len(os.fsencode(path.name)) + 14 > limit:
        raise RetrofitError(
            f"{_what(option)} '{brief(path.name, 60)}' is too long a name ({len(os.fsencode(path.name))} bytes; at "
            f"most {limit - 14} here: it is first written under a temporary name 14 bytes longer); choose a shorter "
            f"{option}"
        )


def _refuse_replacing(output: Path, kind: Kind, option: str) -> None:
    """Refuse to replace an existing folder that is not an empty one or `kind` as retrofit wrote it."""
    if not any(output.iterdir()) or kind.written_here(output):
        return
    what = _what(option)
    if kind.marks(output):
        others = kind.foreign_files(output)
        shown = ", ".join(others[:3]) + (", …" if len(others) > 3 else "")
        raise RetrofitError(
            f"{what} '{output}' is {kind.name} but also holds files retrofit did not write ({shown}), which "
            f"replacing it (--overwrite, or --resume of the run that wrote it) would delete; move them out or choose "
            f"another {option}"
        )
    raise RetrofitError(
        f"{what} '{output}' exists and is not {kind.name}, so --overwrite does not replace it (retrofit replaces "
        f"only what it wrote itself); choose another {option}"
    )


def check_output(
    output: str | Path,
    overwrite: bool = False,
    *,
    kind: Kind = EXPORT,
    inputs: Iterable[str | os.PathLike | None] = (),
    option: str = "--output",
) -> Path:
    """Refuse, before any work, an output folder that the rule in this module's docstring does not allow: one that
    exists (unless `overwrite`, and then only `kind` as retrofit wrote it, or empty), is or holds one of `inputs`,
    holds the current folder, touches a shipped checkpoint, or cannot be written. Returns the path."""
    what, output = _what(option), Path(output)
    if not str(output).strip():
        raise RetrofitError(f"{option} is empty; give the folder to write")
    if output.is_symlink():  # replaced, the link would become a folder and what it points to stay as it was
        raise RetrofitError(
            f"{what} '{output}' is a link (to '{os.readlink(output)}'); give the folder itself, or another {option}"
        )
    if output.exists() and not output.is_dir():
        raise RetrofitError(f"{what} '{output}' exists and is not a folder; choose another {option}")
    _refuse_dangling(output, option)  # (after work, making the folder under it failed as "File exists")
    _refuse_protected(output, option, inputs)
    _refuse_inside_outputs(output, option)
    if output.exists():
        if not overwrite:
            raise RetrofitError(
                f"{what} '{output}' already exists; choose another {option} or pass --overwrite (overwrite=True in "
                "Python)"
            )
        _refuse_replacing(output, kind, option)
    _refuse_long_name(output, option)
    _check_writable(output, option)
    return output


def check_checkpoint_dir(
    folder: str | Path,
    output: str | Path,
    option: str = "--checkpoint-dir",
    *,
    inputs: Iterable[str | os.PathLike | None] = (),
) -> Path:
    """Refuse a folder retrofit writes into but never replaces as a whole (checkpoints: it may hold the user's own
    files, which stay) if it is inside the run's `output` (which the export replaces) or is or is inside one of its
    `inputs` (the source, the data: checkpoints in an image folder would be read as a class), is a file, is or is
    under a link to nothing, touches a shipped checkpoint or cannot be written."""
    folder = Path(folder)
    _refuse_dangling(folder, option)  # the first checkpoint could not be written, after all the steps before it
    _refuse_dangling(Path(output), "--output")  # (nor resolved: a loop of links raised RuntimeError)
    if folder.resolve().is_relative_to(Path(output).resolve()):
        raise RetrofitError(
            f"{option} '{folder}' is inside --output '{output}', which the export replaces; put the checkpoints "
            "elsewhere (the default is <output>-checkpoints)"
        )
    from .checkpoints import CHECKPOINT_NAME, RUN_FILE, UNFINISHED_NAME

    written, checkpoints = Path(output).resolve(), folder.resolve()
    first = written.relative_to(checkpoints).parts[0] if written.is_relative_to(checkpoints) else ""
    if first and (CHECKPOINT_NAME.fullmatch(first) or UNFINISHED_NAME.fullmatch(first) or first == RUN_FILE):
        raise RetrofitError(
            f"--output '{output}' is in {option} '{folder}' under a name its checkpoints take ('{first}'), which "
            "the run writes and deletes; choose another --output"
        )
    for source in local_paths(inputs):
        if folder.resolve().is_relative_to(source):
            raise RetrofitError(f"{option} '{folder}' is in '{source}', which this run reads; choose another {option}")
    if folder.exists() and not folder.is_dir():
        raise RetrofitError(f"{option} '{folder}' exists and is not a folder; choose another {option}")
    _refuse_shipped(folder, option)
    _refuse_inside_outputs(folder, option, itself=True)  # (an export itself: its checkpoints among its files)
    _check_writable(folder / "x" if folder.is_dir() else folder, option)
    return folder


def check_file_output(
    path: str | Path,
    option: str,
    overwrite: bool = False,
    *,
    inputs: Iterable[str | os.PathLike | None] = (),
    ours: Callable[[Path], bool] | None = None,
) -> Path:
    """Refuse, before any work, a file target (``--json FILE``, an ONNX file) that cannot be written (empty, a folder,
    under a file, no folder, no permission), is an input of the run or inside one, or exists and is not a file
    retrofit wrote (`ours`; default: a JSON report); an existing one of retrofit's needs `overwrite`."""
    if not str(path).strip():
        raise RetrofitError(f"{option} is empty; give a file name, e.g. {option} results.json")
    path = Path(path)
    _refuse_dangling(path, option)  # (a loop of links: resolving it raised RuntimeError)
    _refuse_protected(path, option, inputs)  # a report goes next to the models and data it measures, never into them
    if path.is_dir():
        raise RetrofitError(f"{option} '{path}' is a folder; give a file name, e.g. {path / 'results.json'}")
    _refuse_inside_outputs(path, option)
    if path.exists() or path.is_symlink():
        if not path.is_file() or path.is_symlink():
            raise RetrofitError(f"{option} '{path}' exists and is not a regular file; give the path of a file")
        if not overwrite:
            raise RetrofitError(
                f"{option} '{path}' already exists; choose another file or pass --overwrite (overwrite=True in Python)"
            )
        if not (ours(path) if ours is not None else REPORT_KEY in _json(path)):
            what = "a file" if ours is not None else "a report"
            raise RetrofitError(
                f"{option} '{path}' exists and is not {what} retrofit wrote, so --overwrite does not replace it; "
                "choose another file"
            )
    parent = next((p for p in path.absolute().parents if p.exists()), Path("/"))
    if parent != path.absolute().parent:
        raise RetrofitError(
            f"{option} '{path}': folder '{path.parent}' does not exist; create it or choose another path"
        )
    _refuse_long_name(path, option)
    _check_writable(path, option)
    return path


def check_still_ours(path: Path, ours: Callable[[Path], bool], made: str = "write") -> None:
    """Right before ``--overwrite`` replaces the file `path` at the end of a run, refuse one that is no longer
    retrofit's (`ours`, as `check_file_output` judged it before any work): a file put there meanwhile is the user's."""
    if path.is_symlink() or (path.exists() and not ours(path)):
        raise RetrofitError(
            f"'{path}' became a file retrofit did not {made} while this run was working, so it was not replaced"
        )


def _finite(value):
    """`value` with every NaN or infinity as None: JSON has no such numbers (Python writes ``NaN``, which other
    readers refuse)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value


def _to_disk(handle) -> None:
    """Flush an open file's content to the disk, so that the rename which publishes it can never expose an empty or
    partial file after a power loss (the rename may reach the disk before the data otherwise)."""
    handle.flush()
    os.fsync(handle.fileno())


def _sync_file(path: Path) -> None:
    """`_to_disk` for a file another library wrote and closed (``save_pretrained``'s, inside `atomic_dir`)."""
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _sync_folder(folder: Path) -> None:
    """Flush a folder's entries (a rename into it, a file made in it) to the disk; where a folder cannot be opened
    for that (Windows), its renames are as durable as the file system makes them."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a folder: nothing more can be done there
        pass
    finally:
        os.close(fd)


def write_report(
    path: str | Path, report: dict, overwrite: bool = False, *, kind: str, same_kind: bool = False
) -> Path:
    """Write `report` as JSON to `path` (checked with `check_file_output`), marked as a retrofit report of `kind`,
    through a temporary sibling: the file is whole or absent. Without `overwrite` an existing file is never replaced,
    even one that appeared since the check; with `same_kind` (a file a run replaces without --overwrite), only a
    report of `kind`."""
    path = Path(path)
    text = json.dumps(_finite({REPORT_KEY: kind, **report}), indent=2, default=str) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)
            _to_disk(handle)
        os.chmod(tmp, 0o644)
        check_interrupted()
        if overwrite and path.exists():
            written = _json(path).get(REPORT_KEY)
            if written is None:
                raise RetrofitError(f"'{path}' exists and is not a report retrofit wrote, so it was not replaced")
            if same_kind and written != kind:
                raise RetrofitError(
                    f"'{path}' is a report of `retrofit {written}`, not this run's, so it was not replaced"
                )
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # fails if `path` exists: never replaces it
            except FileExistsError:
                raise RetrofitError(
                    f"'{path}' appeared while this run was working, so it was not replaced (pass --overwrite to "
                    "replace a report retrofit wrote)"
                ) from None
        _sync_folder(path.parent)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def write_text(path: str | Path, text: str) -> Path:
    """Write `text` to `path` through a temporary sibling renamed into place: readers see the old file or the new
    one, never half of it (a full disk leaves the old file as it was). For files inside retrofit's own outputs."""
    write_files({Path(path): text})
    return Path(path)


def write_files(files: dict[Path, str | bytes]) -> None:
    """Write several files (path -> UTF-8 text or bytes) together: every one first goes to a temporary sibling, where
    a full disk fails before any file is touched, and only then is each renamed into place (a Ctrl-C waits until all
    are). Temporary files never stay."""
    staged: list[tuple[Path, Path]] = []
    try:
        for path, content in files.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
            staged.append((Path(tmp), path))
            with os.fdopen(fd, "wb") as handle:
                handle.write(content.encode("utf-8") if isinstance(content, str) else content)
                _to_disk(handle)
            os.chmod(tmp, 0o644)
        check_interrupted()  # a Ctrl-C that a library swallowed: the files stay as they were
        with interrupts_deferred("the files are in place", log_to_stderr):  # not some old, some new
            for tmp, path in staged:
                os.replace(tmp, path)
        for folder in {path.parent for _, path in staged}:
            _sync_folder(folder)
    finally:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)


@contextmanager
def atomic_dir(
    output: str | Path,
    overwrite: bool = False,
    *,
    kind: Kind = EXPORT,
    inputs: Iterable[str | os.PathLike | None] = (),
) -> Iterator[Path]:
    """Yield a fresh temporary folder next to `output`; on success it takes `output`'s place, on error it is removed.

    `output` is checked with `check_output` first and again right before the rename, which is atomic on one file
    system: a reader (or a killed process) sees the old folder, the new one, or none, never a half-written one.
    Without `overwrite`, an `output` that appeared meanwhile (another run writing the same path) is not replaced:
    the folder is claimed with an exclusive ``mkdir`` before the rename. Left-over ``.<name>.tmp-*`` folders of a
    killed run are harmless.
    """
    inputs = list(inputs)
    output = check_output(output, overwrite, kind=kind, inputs=inputs)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)
        for path in tmp.rglob("*"):  # temp files are created 0600; exports are meant to be shared
            folder = path.is_dir()
            os.chmod(path, 0o755 if folder else 0o644)
            (_sync_folder if folder else _sync_file)(path)
        _sync_folder(tmp)
        _move_into_place(tmp, output, overwrite, kind, inputs)
        _sync_folder(output.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _move_into_place(tmp: Path, output: Path, overwrite: bool, kind: Kind, inputs: list) -> None:
    check_interrupted()  # a Ctrl-C that a library swallowed: the run stops here, its output unwritten
    # a Ctrl-C from here on waits until the new output is in place and the old one gone: one between the renames, or
    # in the old one's removal, left the replaced export half-deleted in a hidden folder beside it
    with interrupts_deferred("the new output is in place", log_to_stderr):
        _swap_into_place(tmp, output, overwrite, kind, inputs)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux's ``renameat2(RENAME_EXCHANGE)``): at no moment is either missing. False,
    with nothing changed, where the system or the file system cannot (macOS, older kernels, some network file
    systems)."""
    rename = getattr(_libc(), "renameat2", None)
    if rename is None:
        return False
    at_cwd, exchange = -100, 2  # AT_FDCWD, RENAME_EXCHANGE
    if rename(at_cwd, os.fsencode(a), at_cwd, os.fsencode(b), exchange) == 0:
        return True
    error = ctypes.get_errno()
    if error in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(error, os.strerror(error), str(a), None, str(b))


@functools.cache
def _libc():
    """The C library, with errno kept (None where there is none to load)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except (OSError, TypeError):  # (Windows takes no None)
        return None
    if hasattr(libc, "renameat2"):
        libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        libc.renameat2.restype = ctypes.c_int
    return libc


def _swap_into_place(tmp: Path, output: Path, overwrite: bool, kind: Kind, inputs: list) -> None:
    if output.exists() and overwrite:
        check_output(output, overwrite, kind=kind, inputs=inputs)  # still ours, as at the start?
        if output.is_dir() and _exchange(tmp, output):  # killed after this, the old output is a left-over .tmp-*
            shutil.rmtree(tmp, ignore_errors=True)
            return
        # elsewhere, two renames: a SIGKILL between them leaves the old output in a hidden .NAME.old-* folder
        old = Path(tempfile.mkdtemp(prefix=f".{output.name}.old-", dir=output.parent))
        os.replace(output, old / output.name)
        try:
            os.replace(tmp, output)
        except BaseException:  # the old output goes back in place, not left hidden in `old`
            os.replace(old / output.name, output)
            old.rmdir()
            raise
        shutil.rmtree(old, ignore_errors=True)
        return
    try:
        output.mkdir()  # the claim: exactly one writer gets it
    except FileExistsError:
        raise RetrofitError(
            f"output '{output}' appeared while this run was working (another run writing the same path?); it was "
            "not replaced: choose another path or pass --overwrite"
        ) from None
    try:
        os.replace(tmp, output)  # a folder replaces the empty folder just made
    except OSError as exc:
        if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise RetrofitError(
                f"output '{output}' was written to by someone else meanwhile; it was not replaced"
            ) from None
        output.rmdir()
        raise


# folder → (lock file, its open handle, the thread of the run holding it, its option): the folders this process holds
_HELD: dict[Path, tuple] = {}


def _lock_key(folder: str | Path) -> Path:
    return Path(folder).resolve()  # physically: ``LINK/..`` is the folder above LINK's target (abspath: beside LINK)


def lock_file(folder: str | Path) -> Path:
    """The file in retrofit's cache whose ``flock`` is the lock on `folder` (`hold_write_lock`)."""
    from .provenance import CACHE_DIR

    return CACHE_DIR / "locks" / f"{hashlib.sha256(os.fsencode(_lock_key(folder))).hexdigest()[:32]}.lock"


def is_launch_main() -> bool:
    """Whether this is the main process of ``accelerate launch`` (torchrun's ``RANK`` 0), or no launch at all."""
    return os.environ.get("RANK", "0").strip() in ("", "0")


def hold_write_lock(folder: str | Path, option: str) -> None:
    """Refuse a second run that writes `folder` (given as `option`: ``--output``, ``--checkpoint-dir``) while this one
    does: two runs on one checkpoint folder would prune and resume each other's checkpoints, and two runs on one output
    would train for hours before the second one is refused (or, with ``--overwrite``, replaces the first's export).
    Taken after `check_output` / `check_checkpoints`, before any work; the whole run (`releases_write_locks`: finetune,
    pretrain, a recipe, convert, push) releases it when it returns or fails, after its export is written. A folder is
    locked whichever option names it, so one run's checkpoint folder is not another's output. A run in another thread of
    this process (a notebook's background run) is refused too; a run that calls another (a recipe's fine-tune, an upload
    after the export) holds it once. The lock is ``flock`` on a regular file in retrofit's cache named by the folder's
    resolved path (nothing is written beside the folder, which need not exist yet; a link there is not followed), so the
    system releases it when the process ends, however it ends. Only the main process of ``accelerate launch`` takes it;
    without ``fcntl`` (Windows) or a writable cache there is no lock."""
    key = _lock_key(folder)
    if not is_launch_main():  # another process of a launch
        return
    if key in _HELD:  # held by this process: by this run (a run that calls another), or by one in another thread
        _, _, thread, theirs = _HELD[key]
        if thread == threading.get_ident():
            return
        raise RetrofitError(
            f"another retrofit run in this process (a notebook's other thread?) is writing '{folder}' (its {theirs}); "
            f"wait for it to end, or give this run another {option}"
        )
    try:
        import fcntl
    except ImportError:
        return
    path = lock_file(key)
    while True:  # the holder removes the file when it is done: lock the file that is there after our open
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            handle = os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600), "r+")
        except OSError:  # a cache that cannot be written, or something other than a file there: no lock
            return
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder, _, theirs = handle.read(64).strip().partition(" ")
            handle.close()
            raise RetrofitError(
                f"another retrofit run (process {holder or 'unknown'}) is writing '{folder}' (its "
                f"{theirs or option}); wait for it to end, or give this run another {option}"
            ) from None
        if path.exists() and os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino:
            break
        handle.close()
    handle.truncate(0)
    handle.write(f"{os.getpid()} {option}")
    handle.flush()
    if not _HELD:  # whatever happens to the run, tidy up when the process ends
        import atexit

        atexit.register(_release_all)
    _HELD[key] = (path, handle, threading.get_ident(), option)


def release_write_lock(folder: str | Path) -> None:
    """Let other runs write `folder` again (see `hold_write_lock`)."""
    held = _HELD.pop(_lock_key(folder), None)
    if held is not None:
        path, handle = held[:2]
        path.unlink(missing_ok=True)  # while still locked: a run that opened it meanwhile opens it again
        handle.close()


def _release_all() -> None:
    for folder in list(_HELD):
        release_write_lock(folder)


def releases_write_locks(run: Callable[..., T]) -> Callable[..., T]:
    """For a whole run (finetune, pretrain, a recipe, convert): the write locks it took are released when it returns
    or fails, so that a refused or interrupted call in a notebook does not keep other runs out. Locks held before
    the call (a run that calls another) stay held, and so do those of runs in other threads."""

    @functools.wraps(run)
    def whole_run(*args, **kwargs):
        def this_threads() -> set[Path]:  # not those a run in another thread holds (a notebook's background run)
            return {folder for folder, lock in list(_HELD.items()) if lock[2] == threading.get_ident()}

        held = this_threads()
        try:
            return run(*args, **kwargs)
        finally:
            for folder in this_threads() - held:
                release_write_lock(folder)

    return whole_run
