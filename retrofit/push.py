"""`push`: upload a complete export to the Hugging Face Hub with huggingface_hub (create repo, branch, upload; the
files of an earlier export that this one lacks go in the same commit, `STALE_PATTERNS`)."""

from __future__ import annotations

import json
import os
import re
import shlex
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

from .atomic import CURVE_FILE, RESULTS_FILE, TOKENIZER_FILES, card_file_ours, hold_write_lock, releases_write_locks
from .errors import RetrofitError, brief, check_arguments, log_to_stderr, shown
from .families import MERGED_SUFFIX
from .settings import PushArgs

# What an earlier upload of an export may have left in the repo that this one has no file for (a results file and
# curve since deleted, another release's or family's code, shards where the weights are now one file, a tokenizer):
# the upload deletes them (a file this export has is replaced anyway). Stale weights would load instead of the
# export's (transformers reads model.safetensors before a shard index); a tokenizer.json before a SigLIP's spiece.model.
# Only at the repo's top level, where an export puts its files: huggingface_hub's `delete_patterns` are fnmatch
# patterns, whose `*` also matches a `/`, so `stale_files` names each one exactly (a user's `model-v1/` stays).
STALE_PATTERNS = (
    "model.safetensors", "model.safetensors.index.json", "model-*-of-*.safetensors",
    f"configuration_*{MERGED_SUFFIX}.py", f"modeling_*{MERGED_SUFFIX}.py", RESULTS_FILE, CURVE_FILE,
    *TOKENIZER_FILES,
)  # fmt: skip

# An open pull request of the repo: huggingface_hub commits to it with `revision="refs/pr/N"`.
PR_REVISION = re.compile(r"refs/pr/([1-9][0-9]*)")
# What git (`git check-ref-format --branch`) refuses anywhere in a branch name.
_BAD_BRANCH_TEXT = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]|\.\.|@\{|//")


def check_revision(revision: str | None) -> str | None:
    """Refuse, before any work, a `--revision` the Hub cannot take as a branch: git's branch-name rules, or an open
    pull request ``refs/pr/N``. Returns the revision, None for the default branch."""
    if revision is None:
        return None
    why = None
    bad = _BAD_BRANCH_TEXT.search(revision)
    if not revision:
        why = "is empty"
    elif bad:
        why = f"holds {bad.group()!r} (no spaces, control characters, '..', '//', '@{{' or any of ~ ^ : ? * [ \\)"
    elif revision.startswith(("-", "/")) or revision.endswith(("/", ".")):
        why = "starts with '-' or '/', or ends with '/' or '.'"
    elif any(part.startswith(".") or part.endswith(".lock") for part in revision.split("/")):
        why = "has a part that starts with '.' or ends with '.lock'"
    elif revision in ("@", "HEAD"):
        why = "is reserved by git"
    elif revision.startswith("refs/") and not PR_REVISION.fullmatch(revision):
        why = "is a git ref other than an open pull request (refs/pr/N)"
    if why:
        raise RetrofitError(
            f"--revision {revision!r} is not a valid branch name: it {why}; use a branch name such as 'v1' "
            "(created if needed) or 'refs/pr/N' for an open pull request"
        )
    return revision


def _not_complete(export: str | Path, what: str) -> RetrofitError:
    return RetrofitError(f"'{export}' is not a complete export: {what}; re-export it with `retrofit convert`")


def _read_json(path: Path, export: str | Path) -> object:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        raise _not_complete(export, f"{path.name} is not readable JSON") from None


def _check_safetensors(path: Path, export: str | Path) -> None:
    """Refuse a weight file whose safetensors header is unreadable or does not cover the file (truncated, padded)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as weights:
            weights.keys()
    except Exception as exc:  # noqa: BLE001 - SafetensorError, OSError: one line
        raise _not_complete(export, f"{path.name} is corrupt or truncated ({brief(exc, 120)})") from None


def _check_card_metadata(text: str, export: str | Path) -> None:
    """Refuse a card whose metadata (the YAML between its first two '---' lines) does not parse as a mapping: the Hub
    refuses it at the upload, after the repo was created, which would be left empty."""
    from huggingface_hub import ModelCard

    from .card import _no_missing_metadata_warning

    with _no_missing_metadata_warning():
        try:
            ModelCard(text, ignore_metadata_errors=False)
        except Exception as exc:  # noqa: BLE001 - yaml.YAMLError, ValueError: one line
            raise RetrofitError(
                f"'{export}/README.md' has metadata (the YAML between its first two '---' lines) that cannot be read "
                f"({type(exc).__name__}: {brief(exc, 120)}); fix that block or delete it, then retry"
            ) from None


def _shard_names(index: Path, export: str | Path) -> list[str]:
    """The weight files a sharded export's ``model.safetensors.index.json`` names, checked to be file names of the
    export's own folder (retrofit writes no folder, and the upload stages the top level only)."""
    content = _read_json(index, export)
    weight_map = content.get("weight_map") if isinstance(content, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise _not_complete(export, f'{index.name} has no "weight_map" object of tensor -> file')
    for name in weight_map.values():
        if not isinstance(name, str) or not name or name != Path(name).name or name in (".", ".."):
            raise _not_complete(export, f"{index.name} names a weight file {name!r} that is not a file name")
    return sorted(set(weight_map.values()))


# The names of the modules retrofit generates (`hub_code.code_files`), as an export of another release has them.
_GENERATED_MODULE = re.compile(rf"(configuration|modeling)_[a-z0-9_]+{MERGED_SUFFIX}")


def _generated(path: Path, module: str) -> bool:
    """Whether `path` is code retrofit generated, by its module name and its first line (`hub_code`'s header)."""
    try:
        with path.open("rb") as handle:
            first = handle.readline(200)
    except OSError:  # missing: `export_files` names it with the other missing files
        first = b"# Generated by retrofit "
    return bool(_GENERATED_MODULE.fullmatch(module)) and first.startswith(b"# Generated by retrofit ")


def _code_files(auto_map: object, export: str | Path, own: tuple[str, ...] = ()) -> list[str]:
    """The modeling/configuration files the config's ``auto_map`` ({"AutoX": "module.Class", ...}) names, each one
    of the files retrofit writes for the export (`own`: `atomic.family_files`), or, for a family this release does
    not know (`own` empty), named as retrofit names them and opening with its header: an ``auto_map`` edited to name
    another file of the folder does not upload it."""
    if auto_map is not None and not isinstance(auto_map, dict):
        raise _not_complete(export, f"config.json's auto_map is a {type(auto_map).__name__}, not an object")
    if not auto_map:
        raise RetrofitError(f"'{export}/config.json' has no auto_map; it cannot load without retrofit, re-export it")
    files = []
    for auto_class, reference in auto_map.items():
        for ref in reference if isinstance(reference, list) else [reference]:
            if ref is None:  # [slow, fast] pairs may leave one out
                continue
            if isinstance(ref, str) and "--" in ref:  # repo--module.Class: transformers fetches that repo's code
                raise RetrofitError(
                    f"'{export}/config.json' auto_map[{auto_class!r}] = {ref!r} loads code from another Hub repo, "
                    "which is not code retrofit writes for this export, so it is not uploaded; restore config.json's "
                    "auto_map or re-export it"
                )
            module = ref.rsplit(".", 1)[0] if isinstance(ref, str) and "." in ref else ""
            if not module or "/" in module or "\\" in module:
                raise _not_complete(export, f"config.json's auto_map[{auto_class!r}] = {ref!r} is not 'module.Class'")
            if module + ".py" not in own and (own or not _generated(Path(export) / f"{module}.py", module)):
                raise RetrofitError(
                    f"'{export}/config.json' auto_map[{auto_class!r}] names {module}.py, which is not code retrofit "
                    "writes for this export, so it is not uploaded; restore config.json's auto_map or re-export it"
                )
            files.append(module + ".py")
    return files


def export_files(export: str | Path) -> list[str]:
    """The files of a complete export, which are all `push` uploads: `REQUIRED_FILES`, the weights (single file or
    shards, their safetensors headers read), the code files its config's ``auto_map`` names, and the results file,
    the card's speed curve and a dual encoder's tokenizer files if there are any. Each must be a regular file, not a
    link. Raises `RetrofitError` naming what is wrong."""
    from .export import REQUIRED_FILES

    folder = Path(export)
    if not folder.is_dir():
        raise RetrofitError(f"'{export}' is not a folder; pass the --output folder of `retrofit convert`")
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        raise RetrofitError(f"'{export}' has no readable config.json: not a complete export; re-export it") from None
    if not isinstance(config, dict):
        raise _not_complete(export, "config.json is not a JSON object")
    if not str(config.get("model_type", "")).endswith(MERGED_SUFFIX):
        raise RetrofitError(f"'{export}' is not a retrofit export (model_type '{config.get('model_type')}')")
    required = [name for name in REQUIRED_FILES if name != "model.safetensors"]
    index = folder / "model.safetensors.index.json"
    if (folder / "model.safetensors").is_file() or not index.is_file():
        weights = ["model.safetensors"]
    else:
        required.append(index.name)
        weights = _shard_names(index, export)
    required += weights
    from .atomic import family_files

    own = family_files(config)
    required += _code_files(config.get("auto_map"), export, own)
    required = list(dict.fromkeys(required))
    linked = [name for name in required if (folder / name).is_symlink()]
    if linked:
        raise RetrofitError(
            f"'{export}' has links where its own files belong ({', '.join(linked)}); an export is uploaded only from "
            "regular files it holds (a link could publish any file): copy the files in, or re-export it"
        )
    missing = [name for name in required if not (folder / name).is_file() or (folder / name).stat().st_size == 0]
    if missing == ["README.md"]:  # re-running convert would replace a fine-tuned export with an untrained merge
        raise RetrofitError(
            f"'{export}' is not a complete export: its model card README.md is missing or empty, and the Hub repo "
            "would have none; put the card back (or write one), then retry"
        )
    if missing:
        raise RetrofitError(
            f"'{export}' is not a complete export (missing or empty: {', '.join(missing)}); re-run `retrofit convert`"
        )
    for name in weights:
        _check_safetensors(folder / name, export)
    try:  # the card is uploaded as `hub_card` rewrites it: text, read before anything is created on the Hub
        card = (folder / "README.md").read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RetrofitError(
            f"'{export}/README.md' is not readable UTF-8 text ({type(exc).__name__}: {brief(exc, 120)}); save it as "
            "UTF-8, or re-export it"
        ) from None
    _check_card_metadata(card, export)
    # Written by `evaluate --card` / `bench --card`, and a dual encoder's tokenizer (in any other export such a file
    # is the user's): part of the export where present, as regular files like the rest. A results file or curve that
    # retrofit did not write (a user's file of that name) is the user's too.
    optional = [RESULTS_FILE, CURVE_FILE, *(name for name in TOKENIZER_FILES if name in own)]
    present = [name for name in optional if (folder / name).is_file() and not (folder / name).is_symlink()]
    files = required + [name for name in present if card_file_ours(folder / name)]
    _check_no_other_code(folder, export, [name for name in files if name.endswith(".json")])
    return files


def _check_no_other_code(folder: Path, export: str | Path, names: list[str]) -> None:
    """Refuse a processor's or tokenizer's config in the export that names code (an ``auto_map``): retrofit writes
    none there, and ``trust_remote_code`` users of the repo would run what it names (another repo's code, too)."""
    for name in names:
        path = folder / name
        if name == "config.json" or not path.is_file() or path.is_symlink():
            continue
        try:
            content = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):  # (`check_loads` says what is wrong with it)
            continue
        if isinstance(content, dict) and content.get("auto_map"):
            raise RetrofitError(
                f"'{export}/{name}' names code to load (auto_map {brief(json.dumps(content['auto_map']), 80)}), which "
                "retrofit never writes there, so it is not uploaded; remove its auto_map or re-export it"
            )


def check_loads(export: str | Path) -> None:
    """Refuse an export that retrofit cannot load and run as it stands: a config.json edited after the export so that
    it no longer matches the weights (num_labels, hidden_size, the merge settings), a model type or
    preprocessor_config.json retrofit cannot read. `export_files` checks that the files are there and whole; this
    checks that they make a model, as `retrofit evaluate` would load it, before anything is created on the Hub."""
    from .loading import check_runs_on_its_images, load_config, load_image_processor, load_model

    try:
        config = load_config(export)
        processor = load_image_processor(export, config, log=lambda _: None)
        model = load_model(export, config=config).eval()
        check_runs_on_its_images(model, processor, export)
    except RetrofitError as exc:
        raise RetrofitError(f"'{export}' does not load as it stands, so nothing was uploaded: {exc}") from None


def _hub_error(exc: Exception, repo_id: str) -> RetrofitError:
    full = str(exc)
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if status == 401 or "401" in full or "Invalid user token" in full or "not logged in" in full.lower():
        return RetrofitError("the Hub rejected your token (401); log in with `hf auth login` or set HF_TOKEN")
    if status == 403:
        return RetrofitError(f"no write access to '{repo_id}' (403); use a repo id under your user or organisation")
    return RetrofitError(
        f"upload to '{repo_id}' failed ({type(exc).__name__}: {brief(exc, 200)}); check your network and repo id"
    )


def _is_public(api, repo_id: str) -> bool:
    """Whether the Hub says model repo `repo_id` is public (False where it does not say)."""
    return api.repo_info(repo_id, repo_type="model").private is False


def branch_of(revision: str | None) -> str | None:
    """The branch other than main that `revision` names, or None (main, or a pull request ``refs/pr/N``)."""
    return revision if revision not in (None, "main") and not PR_REVISION.fullmatch(revision or "") else None


# The model a card's loading example names: `from_pretrained("…"` or `model="…"`, a Python string literal
# (`card.python_text`: a folder's quote or backslash escaped).
LOADING = re.compile(r'(from_pretrained\(|model=)"((?:[^"\\\n]|\\.)*)"')


def hub_card(text: str, repo_id: str, revision: str | None = None) -> str:
    """An export's README.md as the Hub repo shows it: the loading examples (``from_pretrained``, ``pipeline``) name
    `repo_id`, and the branch `revision` if it is not main, instead of the local folder. The folder is the one the
    card's own examples name (the first under "## How to use"); a line naming another model (one a user added: the
    source, a teacher) is left as it is. A pull request (``refs/pr/N``) is shown as the repo alone, which it becomes
    once merged."""
    usage = text.find("## How to use")
    ours = LOADING.search(text, max(usage, 0)) or LOADING.search(text)
    if ours is None:
        return text
    branch = branch_of(revision)
    from .card import python_text

    target = python_text(repo_id) + (f", revision={python_text(branch)}" if branch else "")
    return LOADING.sub(
        lambda match: match.group(1) + target if match.group(2) == ours.group(2) else match.group(0), text
    )


def hub_model_name(text: str, folder_name: str, repo_id: str, written: str | None = None) -> str:
    """The card `text` with its model-index (the evaluation results `update_card` wrote) naming the model as the repo
    does, where it names it by the export's folder, `folder_name`, or by the name `update_card` wrote, `written` (the
    folder's name then: it may have been renamed or copied since); otherwise (a user's name) unchanged."""
    if "model-index:" not in text:
        return text
    from huggingface_hub import ModelCard

    from .card import _no_missing_metadata_warning, keeping_the_users_yaml

    with _no_missing_metadata_warning():
        card = ModelCard(text)
    if card.data.model_name not in (folder_name, written):
        return text
    card.data.model_name = repo_id.split("/")[-1]
    return keeping_the_users_yaml(text, card)  # (the user's YAML comments reach the Hub too)


def written_model_name(export: Path, files: list[str]) -> str | None:
    """The model-index name `update_card` wrote into the export's card, as its results file records it (None where
    there is no such record)."""
    from .card import MODEL_NAME

    if RESULTS_FILE not in files:
        return None
    try:
        name = json.loads((export / RESULTS_FILE).read_text(encoding="utf-8")).get(MODEL_NAME)
    except (OSError, ValueError, AttributeError):
        return None
    return name if isinstance(name, str) else None


@contextmanager
def staged_for_hub(export: Path, files: list[str], repo_id: str, revision: str | None) -> Iterator[Path]:
    """A temporary folder that holds the export's `files` (`export_files`) as links to them (nothing is copied, the
    weights included), except for README.md, which is written there with `hub_card`'s and `hub_model_name`'s changes.
    Nothing else in the folder is uploaded, and the export itself is left as it is."""
    with tempfile.TemporaryDirectory(prefix="retrofit-push-") as tmp:
        staged = Path(tmp)
        for name in files:
            target = staged / name
            if name == "README.md":
                text = (export / name).read_text(encoding="utf-8")
                text = hub_model_name(hub_card(text, repo_id, revision), export.resolve().name, repo_id,
                                      written_model_name(export, files))  # fmt: skip
                target.write_text(text, encoding="utf-8")
            else:
                os.symlink((export / name).resolve(), target)
        yield staged


def check_push(repo_id: str, token: str | None = None, *, private: bool = False, create_pr: bool = False) -> str:
    """Check, before any work, that `repo_id` is a valid namespaced id and that the Hub accepts our token (and, for
    `create_pr`, that the repo exists; for `private`, that it is not an existing public repo, whose visibility an
    upload does not change); returns the token. `convert`/`finetune`/`run --push-to-hub` call it first, so a long run
    does not end in "not logged in" or in a refused upload."""
    from huggingface_hub import HfApi, constants, get_token
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except Exception as exc:  # noqa: BLE001 - HFValidationError
        raise RetrofitError(f"--repo-id '{repo_id}' is not a valid Hub repo id ({exc}); use user/name") from None
    if "/" not in repo_id:
        raise RetrofitError(f"--repo-id '{repo_id}' needs a namespace: use your-user/{repo_id}")
    if create_pr and private:
        raise RetrofitError("--private sets the visibility of a new repo, and --create-pr needs an existing one")
    if constants.HF_HUB_OFFLINE:
        raise RetrofitError("HF_HUB_OFFLINE is set, so nothing can be uploaded; unset it to push")
    token = token or get_token()
    if not token:
        raise RetrofitError("not logged in to the Hugging Face Hub; run `hf auth login` or set HF_TOKEN, then retry")
    try:
        api = HfApi(token=token)
        api.whoami()
        exists = api.repo_exists(repo_id, repo_type="model") if create_pr or private else None
        public = private and exists and _is_public(api, repo_id)
    except Exception as exc:  # noqa: BLE001 - HTTP and connection errors: one line, not a traceback
        raise _hub_error(exc, repo_id) from None
    if public:
        raise RetrofitError(
            f"--private: '{repo_id}' exists and is public, and --private only sets the visibility of a new repo, so "
            "nothing is uploaded; make the repo private on the Hub first, or push without --private"
        )
    if create_pr and not exists:
        raise RetrofitError(
            f"--create-pr opens a pull request on an existing repo, but '{repo_id}' does not exist (or is not visible "
            "to you); push without --create-pr to create it"
        )
    return token


@releases_write_locks
def push(
    export: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
    token: str | None = None,
    log: Callable[[str], None] = print,
    check: bool = True,
) -> str:
    """Create `repo_id` if needed (and branch `revision`), upload the export folder; return the repo (tree) URL.

    `revision` ``refs/pr/N`` uploads into open pull request N of an existing repo (and returns its discussion URL);
    `create_pr` opens a new pull request on an existing repo instead of committing to it (for a repo you may not
    write to, such as an organisation's), and returns its URL, or the repo's where its main branch already holds
    these files (no pull request is opened then). `private` makes a new repo private and refuses an existing public one
    (an upload does not change a repo's visibility). A branch is created before the upload; if the Hub refuses it, or
    the upload fails, on a repo this call created, that repo is deleted again (nothing left behind). The export must
    load as it stands (`check_loads`; `check=False`: retrofit has just written it). Files of an earlier export the repo
    holds and this one lacks (`STALE_PATTERNS`) are deleted in the same commit."""
    from huggingface_hub import HfApi

    check_arguments("push", log=log, flags={"private": private, "create_pr": create_pr, "check": check})
    if not isinstance(export, str | os.PathLike):
        raise RetrofitError(f"push takes an export's folder, not {shown(export)}")
    if not isinstance(repo_id, str):
        raise RetrofitError(f"push's repo_id is a Hub repo id (your-user/name), not {shown(repo_id)}")
    check_revision(revision)
    if create_pr and revision not in (None, "main"):
        raise RetrofitError(
            f"--create-pr opens a pull request against the main branch, so it takes no --revision ({revision}); "
            "drop one of them"
        )
    files = export_files(export)
    hold_write_lock(export, "EXPORT")  # a run replacing the export meanwhile would swap its files under the upload
    from .card import stale_results

    stale = stale_results(export)
    if stale:  # the Hub would show accuracy and speed of a model it does not hold
        raise RetrofitError(
            f"'{export}': {stale}; score it again with `retrofit evaluate SOURCE {export} --data DATA --card {export}` "
            f"(and `retrofit bench ... --card {export}`), then push"
        )
    if check:
        check_loads(export)
    # a new PR: the repo exists; --private: it is not public
    api = HfApi(token=check_push(repo_id, token, private=private, create_pr=create_pr))
    pull = PR_REVISION.fullmatch(revision or "")
    branch = branch_of(revision)
    try:
        if pull and not api.repo_exists(repo_id, repo_type="model"):  # an open pull request needs the repo too
            raise RetrofitError(
                f"--revision {revision} names a pull request, but '{repo_id}' does not exist (or is not visible to "
                "you); push to a branch, or open the pull request first"
            )
        created = False
        if create_pr or pull:
            url = f"{api.endpoint}/{repo_id}"
        else:
            url, created = _create_repo(api, repo_id, private)
        try:
            if branch:
                api.create_branch(repo_id, branch=branch, exist_ok=True, repo_type="model")
            others = sorted(p.name for p in Path(export).iterdir() if p.name not in files)
            if others:
                log(f"not uploaded (not part of the export): {', '.join(others)}")
            head = None if create_pr else _head_commit(api, repo_id, revision)
            with staged_for_hub(Path(export), files, repo_id, revision) as staged:
                info = api.upload_folder(
                    repo_id=repo_id,
                    folder_path=str(staged),
                    repo_type="model",
                    revision=revision,
                    commit_message=commit_message
                    or f"Upload {Path(export).resolve().name} (retrofit PatchMerger export)",
                    create_pr=create_pr,
                    delete_patterns=stale_files(api, repo_id, revision, files) or None,
                )
        except BaseException:  # a failure, or a Ctrl-C (SIGTERM, SIGHUP) during the upload
            if created:  # the empty repo created above would be all this push leaves: remove it
                try:
                    api.delete_repo(repo_id, repo_type="model", missing_ok=True)
                except Exception:  # noqa: BLE001, S110 - best effort; the first error is the one to report
                    pass
            raise
    except RetrofitError:
        raise
    except Exception as exc:  # noqa: BLE001 - HfHubHTTPError, connection errors, timeouts: one line
        raise _hub_error(exc, repo_id) from None
    base = str(url).rstrip("/")
    opened = getattr(info, "pr_url", None) if create_pr else None
    if opened:
        log(f"uploaded {export} ({len(files)} required files present) to {repo_id} as pull request {opened}")
        return str(opened)
    if create_pr:  # huggingface_hub skips a commit that changes nothing: the main branch already holds these files
        log(f"no pull request opened: {repo_id}'s main branch already holds {export} as it is (nothing to upload)")
        return base
    if pull:
        tree = f"{base}/discussions/{pull.group(1)}"
    else:
        tree = f"{base}/tree/{quote(revision, safe='')}" if revision else base
    if head is not None and getattr(info, "oid", None) == head:  # huggingface_hub skipped a commit that changed nothing
        log(f"nothing uploaded: {tree} already holds {export} as it is")
        return tree
    log(f"uploaded {export} ({len(files)} required files present) to {tree}")
    commit_url = getattr(info, "commit_url", None)
    if commit_url:
        log(f"commit: {commit_url}")
    return tree


def stale_files(api, repo_id: str, revision: str | None, files: list[str]) -> list[str]:
    """What an earlier export left at the top of `repo_id` (at `revision`) that this one, of `files`, lacks: the
    `STALE_PATTERNS` the repo holds there, each escaped to match its own name alone (a file in a folder is the
    user's)."""
    from fnmatch import fnmatchcase
    from glob import escape

    held = api.list_repo_files(repo_id, repo_type="model", revision=revision)
    return [
        escape(name)
        for name in held
        if "/" not in name and name not in files and any(fnmatchcase(name, pattern) for pattern in STALE_PATTERNS)
    ]


def _create_repo(api, repo_id: str, private: bool) -> tuple[str, bool]:
    """Create `repo_id` where it does not exist; return its URL and whether this call created it (only such a repo
    is deleted again when the upload fails: asking first, then creating, took for ours a repo made in between)."""
    from huggingface_hub.errors import HfHubHTTPError

    try:
        return api.create_repo(repo_id, private=private, exist_ok=False, repo_type="model"), True
    except HfHubHTTPError as exc:
        if getattr(exc.response, "status_code", None) != 409:  # 409 Conflict: it exists
            raise
    return api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model"), False


def _head_commit(api, repo_id: str, revision: str | None) -> str | None:
    """The commit `revision` (the main branch: None) of `repo_id` is at before an upload (None where that cannot be
    read: a new branch, a failed request), so that an upload that changed nothing is not reported as one."""
    try:
        sha = api.repo_info(repo_id, repo_type="model", revision=revision).sha
    except Exception:  # noqa: BLE001 - only what the log says depends on it; the upload reports real errors
        return None
    return sha if isinstance(sha, str) else None


def push_written(
    export: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    create_pr: bool = False,
    log: Callable[[str], None] = print,
) -> str:
    """`push` right after retrofit wrote `export`: if the upload fails, say that the export is safe and how to retry."""
    try:
        return push(export, repo_id, private=private, create_pr=create_pr, log=log, check=False)
    except RetrofitError as exc:
        retry = f"retrofit push {shlex.quote(str(export))} --repo-id {repo_id}" + (" --private" if private else "")
        retry += " --create-pr" if create_pr else ""
        raise RetrofitError(f"wrote {export}, but the upload failed: {exc}; retry with `{retry}`") from None


def run_push(args: PushArgs, *, log: Callable[[str], None] = log_to_stderr) -> str:
    """`retrofit push`: every line is a log line (the upload is the result)."""
    return push(args.export, args.repo_id, private=args.private, revision=args.revision,
                commit_message=args.commit_message, create_pr=args.create_pr, log=log)  # fmt: skip
