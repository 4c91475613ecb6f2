"""`push`: upload a complete export to the Hugging Face Hub with huggingface_hub (create repo, branch, upload)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from .errors import RetrofitError, brief

# Never uploaded: caches, editor and OS leftovers, retrofit's own temporary files.
IGNORE_PATTERNS = ["__pycache__/*", "*.pyc", ".*", "*/.*", "*.tmp"]


def export_files(export: str | Path) -> list[str]:
    """The files a complete export must hold: `REQUIRED_FILES`, the weights (single file or shards) and the code
    files its config's ``auto_map`` names. Raises `RetrofitError` naming whatever is missing."""
    from .export import REQUIRED_FILES

    folder = Path(export)
    if not folder.is_dir():
        raise RetrofitError(f"'{export}' is not a folder; pass the --output folder of `retrofit convert`")
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        raise RetrofitError(f"'{export}' has no readable config.json: not a complete export; re-export it") from None
    if not str(config.get("model_type", "")).endswith("_patch_merger"):
        raise RetrofitError(f"'{export}' is not a retrofit export (model_type '{config.get('model_type')}')")
    required = [name for name in REQUIRED_FILES if name != "model.safetensors"]
    index = folder / "model.safetensors.index.json"
    if (folder / "model.safetensors").is_file():
        required.append("model.safetensors")
    elif index.is_file():
        required.append(index.name)
        try:
            required += sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError):
            raise RetrofitError(f"'{index}' is corrupt; re-export the model") from None
    else:
        required.append("model.safetensors")
    auto_map = config.get("auto_map") or {}
    if not auto_map:
        raise RetrofitError(f"'{export}/config.json' has no auto_map; it cannot load without retrofit, re-export it")
    for reference in auto_map.values():
        for ref in reference if isinstance(reference, list) else [reference]:
            if ref:
                required.append(ref.split("--")[-1].rsplit(".", 1)[0] + ".py")
    required = list(dict.fromkeys(required))
    missing = [name for name in required if not (folder / name).is_file() or (folder / name).stat().st_size == 0]
    if missing:
        raise RetrofitError(
            f"'{export}' is not a complete export (missing or empty: {', '.join(missing)}); re-run `retrofit convert`"
        )
    return required


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


def check_push(repo_id: str, token: str | None = None) -> str:
    """Check, before any work, that `repo_id` is a valid namespaced id and that the Hub accepts our token; returns the
    token. `convert`/`finetune --push-to-hub` call it first, so a long run does not end in "not logged in"."""
    from huggingface_hub import HfApi, constants, get_token
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except Exception as exc:  # noqa: BLE001 - HFValidationError
        raise RetrofitError(f"--repo-id '{repo_id}' is not a valid Hub repo id ({exc}); use user/name") from None
    if "/" not in repo_id:
        raise RetrofitError(f"--repo-id '{repo_id}' needs a namespace: use your-user/{repo_id}")
    if constants.HF_HUB_OFFLINE:
        raise RetrofitError("HF_HUB_OFFLINE is set, so nothing can be uploaded; unset it to push")
    token = token or get_token()
    if not token:
        raise RetrofitError("not logged in to the Hugging Face Hub; run `hf auth login` or set HF_TOKEN, then retry")
    try:
        HfApi(token=token).whoami()
    except Exception as exc:  # noqa: BLE001 - HTTP and connection errors: one line, not a traceback
        raise _hub_error(exc, repo_id) from None
    return token


def push(
    export: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
    log: Callable[[str], None] = print,
) -> str:
    """Create `repo_id` if needed (and branch `revision`), upload the export folder; return the repo (tree) URL."""
    from huggingface_hub import HfApi

    files = export_files(export)
    api = HfApi(token=check_push(repo_id, token))
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=str(export),
            repo_type="model",
            revision=revision,
            commit_message=commit_message or f"Upload {Path(export).resolve().name} (retrofit PatchMerger export)",
            ignore_patterns=IGNORE_PATTERNS,
        )
    except Exception as exc:  # noqa: BLE001 - HfHubHTTPError, connection errors, timeouts: one line
        raise _hub_error(exc, repo_id) from None
    base = str(url).rstrip("/")
    tree = f"{base}/tree/{revision}" if revision else base
    log(f"uploaded {export} ({len(files)} required files present) to {tree}")
    commit_url = getattr(info, "commit_url", None)
    if commit_url:
        log(f"commit: {commit_url}")
    return tree


def push_written(export: str | Path, repo_id: str, *, private: bool = False, log: Callable[[str], None] = print) -> str:
    """`push` right after retrofit wrote `export`: if the upload fails, say that the export is safe and how to retry."""
    try:
        return push(export, repo_id, private=private, log=log)
    except RetrofitError as exc:
        retry = f"retrofit push {export} --repo-id {repo_id}" + (" --private" if private else "")
        raise RetrofitError(f"wrote {export}, but the upload failed: {exc}; retry with `{retry}`") from None
