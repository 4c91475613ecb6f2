"""What an export records about the checkpoint it was made from, and finding that checkpoint again.

An export's ``config.json`` names its source so that ``retrofit finetune EXPORT`` can distil from it and the model
card can link to it. It must be unambiguous (the same model wherever and whenever it is read) and private (nothing
that is pushed may hold a path of the machine that made it), so it records:

- ``merge_source``: a Hub id, ``retrofit:NAME``, or, for a local folder, only the folder's name;
- ``merge_source_revision``: for a Hub id, the commit its files came from;
- ``merge_source_sha256``: the sha256 of the source's weight files, which `find_teacher` checks the teacher against.

Where a local source lives stays on this machine: each export made from one records the folder under its weights'
hash in ``$RETROFIT_CACHE/local-sources.json`` (default ``~/.cache/retrofit``), never in the export.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PureWindowsPath

from .errors import RetrofitError


def environment_folder(variable: str, default: Path | str) -> Path:
    """The folder environment `variable` names (``~`` expanded), or `default` where it is unset or blank: an empty
    value (``RETROFIT_CACHE=$UNSET``) meant the current folder, where the cache then wrote ``code/`` and ``locks/``."""
    value = os.environ.get(variable, "").strip()
    return Path(value).expanduser() if value else Path(default)


def versions(*, data: bool = True) -> dict[str, str]:
    """The releases of the libraries a report's numbers depend on (an image processor's resizing, a kernel's rounding
    and the data's reading change between them), for a reader who reruns the command; `data`: with `datasets` (not
    for timings, which a machine without it takes)."""
    import torch
    import transformers

    from . import __version__

    releases = {"retrofit": __version__, "torch": torch.__version__, "transformers": transformers.__version__}
    if data:
        import datasets

        releases["datasets"] = datasets.__version__
    return releases


CACHE_DIR = environment_folder("RETROFIT_CACHE", Path.home() / ".cache" / "retrofit")
REGISTRY = "local-sources.json"


@dataclass(frozen=True)
class SourceRecord:
    """An export's source as its config records it (`config_fields`), plus a local source's folder (kept here)."""

    name: str | None
    revision: str | None = None
    sha256: str | None = None
    folder: Path | None = None

    def config_fields(self) -> dict:
        return {"merge_source": self.name, "merge_source_revision": self.revision, "merge_source_sha256": self.sha256}


def _resolved_file(source: str, filename: str, revision: str | None) -> Path | None:
    """`filename` of a local folder or of a Hub repo in the local cache (the network is never used), or None."""
    from transformers.utils import cached_file

    try:
        found = cached_file(source, filename, revision=revision, local_files_only=True,
                            _raise_exceptions_for_missing_entries=False,
                            _raise_exceptions_for_connection_errors=False)  # fmt: skip
    except Exception:  # noqa: BLE001 - an unreachable or unknown repo: no record, not an error
        return None
    return Path(found) if found else None


def weight_files(source: str, revision: str | None = None) -> list[Path]:
    """The weight files transformers loads for `source` (a folder, or a Hub repo already in the local cache): one
    file, or the shards an index names. Empty if there are none here."""
    from .loading import WEIGHT_FILES

    for name in (name for pair in WEIGHT_FILES for name in pair):
        found = _resolved_file(source, name, revision)
        if found is None:
            continue
        if not name.endswith(".index.json"):
            return [found]
        try:
            shards = sorted(set(json.loads(found.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return []
        files = [_resolved_file(source, shard, revision) for shard in shards]
        return files if all(files) else []
    return []


_HASHES: dict[tuple, str] = {}  # (path, size, mtime) -> sha256: a file is read once per process


def weights_sha256(files: list[Path]) -> str | None:
    """The sha256 of `files`' bytes, in order (None for no files)."""
    if not files:
        return None
    total = hashlib.sha256()
    for path in files:
        stat = path.stat()
        key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
        if key not in _HASHES:
            digest = hashlib.sha256()
            with open(path, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 24), b""):
                    digest.update(block)
            _HASHES[key] = digest.hexdigest()
        total.update(_HASHES[key].encode())
    return total.hexdigest() if len(files) > 1 else _HASHES[key]


def source_record(source: str | Path | None, revision: str | None = None) -> SourceRecord:
    """The record of `source` (a Hub id, a local folder or ``retrofit:NAME``) for an export's config. Never fails:
    what cannot be found is left out (None)."""
    from transformers.utils.hub import extract_commit_hash

    from .loading import resolve_source

    if source is None or not str(source).strip():
        return SourceRecord(None)
    source = str(source)
    try:
        resolved = resolve_source(source)
    except RetrofitError:
        return SourceRecord(source)
    folder = Path(resolved).expanduser()
    if folder.is_dir():
        name = source if source.startswith("retrofit:") else folder.resolve().name
        return SourceRecord(name, None, weights_sha256(weight_files(resolved)), folder.resolve())
    config = _resolved_file(source, "config.json", revision)
    commit = extract_commit_hash(str(config), None) if config else None
    return SourceRecord(source, commit, weights_sha256(weight_files(source, commit or revision)))


def remember(record: SourceRecord) -> None:
    """Note where a local source with these weights lives on this machine (`find_local`), forgetting folders that
    are gone. Best effort: a registry that cannot be written only means `--teacher` is needed later."""
    if record.folder is None or record.sha256 is None or record.name.startswith("retrofit:"):
        return
    from .atomic import write_text

    path = CACHE_DIR / REGISTRY
    try:
        with _registry_lock():  # runs exporting at once each read the file before the other wrote it: one was lost
            known = json.loads(path.read_text()) if path.is_file() else {}
            known = known if isinstance(known, dict) else {}
            folders = [str(record.folder), *(f for f in known.get(record.sha256, []) if f != str(record.folder))]
            known[record.sha256] = folders
            known = {sha: [f for f in found if Path(f).is_dir()] for sha, found in known.items()}
            write_text(path, json.dumps({sha: found for sha, found in known.items() if found}, indent=1) + "\n")
    except (OSError, ValueError, TypeError, AttributeError):
        pass


@contextmanager
def _registry_lock() -> Iterator[None]:
    """``flock`` on a file beside the registry for the block, so that one process reads and rewrites it at a time
    (waiting for the other); without ``fcntl`` (Windows) the block runs unlocked."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with open(CACHE_DIR / f"{REGISTRY}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file is closed
        yield


def find_local(sha256: str, name: str | None = None) -> Path | None:
    """A folder on this machine that `remember` recorded for weights with this hash and that still holds them: one
    named `name` (the folder name an export records) where several hold the same weights (copies with other configs
    or processors), else the one used most recently."""
    try:
        known = json.loads((CACHE_DIR / REGISTRY).read_text())
    except (OSError, ValueError):
        return None
    folders = known.get(sha256, []) if isinstance(known, dict) else []
    folders = sorted(folders, key=lambda folder: Path(folder).name != name)  # stable: most recent first otherwise
    for folder in folders:
        if Path(folder).is_dir() and weights_sha256(weight_files(folder)) == sha256:
            return Path(folder)
    return None


def find_teacher(export: str, config) -> tuple[str, str | None]:
    """The unmerged model an export was made from, as (source to load, revision): its Hub id at the recorded commit,
    its shipped checkpoint, or the local folder recorded on this machine, each checked against the recorded hash of
    its weights. Refused in one line when it cannot be found or is another model (`--teacher` overrides)."""
    from .loading import resolve_source

    name = getattr(config, "merge_source", None)
    revision = getattr(config, "merge_source_revision", None)
    sha256 = getattr(config, "merge_source_sha256", None)
    if not name:
        raise RetrofitError(f"'{export}' does not name its source model; pass --teacher (the unmerged model)")
    if sha256 is None:  # made before the hash was recorded: the name as it was typed
        relative = not Path(name).is_absolute() and (name.startswith((".", "~")) or Path(name).exists())
        if relative:
            raise RetrofitError(
                f"'{export}' names its source as the relative path '{name}', which depends on the current folder; "
                "pass --teacher with the unmerged model"
            )
        return name, revision
    # Shipped with retrofit, or a Hub id at its commit (whose files cannot change; checked when they are cached).
    if name.startswith("retrofit:") or "/" in name:
        found = resolve_source(name) if name.startswith("retrofit:") else name
        files = weight_files(found, revision)
        if files and weights_sha256(files) != sha256:
            at = f" at {revision[:12]}" if revision else ""
            raise RetrofitError(
                f"'{name}'{at} is not the model '{export}' was made from (its weights differ); pass --teacher with "
                "the unmerged model"
            )
        return name, revision
    folder = find_local(sha256, name)
    if folder is None:
        raise RetrofitError(
            f"'{export}' was made from a local folder named '{name}', which is not known on this machine (or has "
            "changed since); pass --teacher with the unmerged model"
        )
    return str(folder), None


def dataset_commit(data: str | os.PathLike | None, revision: str | None = None) -> str | None:
    """The commit a Hub dataset's `revision` (None: its default branch) is at now (within a command: when the command
    first asked, the commit its loads read, `data.load_split`); `revision` as it is where the Hub cannot be asked
    (offline), and None for local data or Fashion-MNIST. Never fails."""
    from .data import hub_dataset_id
    from .reads import command_memo

    repo_id = hub_dataset_id(data)
    if repo_id is None:
        return None

    def ask() -> str | None:
        from huggingface_hub import dataset_info

        try:
            return dataset_info(repo_id, revision=revision).sha or revision
        except Exception:  # noqa: BLE001 - offline, unreachable, gated: the record says what was asked
            return revision

    return command_memo(("hub commit", repo_id, revision), ask)


def public_name(text: str | os.PathLike | None) -> str | None:
    """How an export (its card, its config) names a source, teacher or data set: Hub ids, ``retrofit:NAME`` and
    other names as they are; a local path by its last part only, so that nothing pushed holds a local path."""
    if text is None:
        return None
    text = str(text)
    path = Path(text).expanduser()
    if text.startswith(("/", ".", "~")) or os.sep in text and path.exists():
        return path.resolve().name or text
    windows = PureWindowsPath(text)
    if windows.drive or "\\" in text:  # C:/Users/me/model, a path with backslashes: a path on Windows
        return windows.name or text
    return text


def made_from(config, candidate: str) -> bool:
    """True if the export whose config is `config` was made from `candidate` (a source the user named): by the
    recorded hash of its weights, or for exports made before it was recorded, by name."""
    sha256 = getattr(config, "merge_source_sha256", None)
    if sha256:
        return source_record(candidate).sha256 == sha256
    return str(getattr(config, "merge_source", "") or "") == candidate
