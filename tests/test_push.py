"""`retrofit push`: exactly the export's files are uploaded (HfApi intercepted, no network), and bad input refused."""

from __future__ import annotations

import shutil

import pytest
from huggingface_hub import HfApi, RepoUrl, constants
from huggingface_hub.hf_api import CommitInfo

from retrofit import convert
from retrofit.cli import main
from retrofit.push import export_files


@pytest.fixture(scope="module")
def export_dir(tiny_vit, tmp_path_factory):
    out = tmp_path_factory.mktemp("push") / "vit-pm"
    convert(tiny_vit, after_layer=2, num_tokens=4, output=out, log=lambda _: None)
    return out


@pytest.fixture
def hub(monkeypatch):
    """Intercept the HTTP-level HfApi calls; `upload_folder` itself runs for real and builds the commit."""
    calls: dict = {"commits": [], "repos": [], "branches": []}
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    monkeypatch.setattr(HfApi, "whoami", lambda self, token=None, **kw: {"name": "me"})

    def create_repo(self, repo_id, **kwargs):
        calls["repos"].append((repo_id, kwargs))
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_branch(self, repo_id, *, branch, **kwargs):
        calls["branches"].append((repo_id, branch))

    def create_commit(self, repo_id, operations, *, commit_message, revision=None, **kwargs):
        calls["commits"].append(
            {
                "repo_id": repo_id,
                "files": {op.path_in_repo: op.path_or_fileobj for op in operations},
                "message": commit_message,
                "revision": revision,
            }
        )
        url = f"https://huggingface.co/{repo_id}/commit/abc123"
        return CommitInfo(commit_url=url, commit_message=commit_message, commit_description="", oid="abc123")

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_branch", create_branch)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    # upload_folder asks the Hub to validate README.md's YAML: intercept that request too.
    calls["yaml"] = []
    # Take the single-commit path (no hf_xet pipeline), so that every file arrives in one create_commit call.
    monkeypatch.setattr("huggingface_hub.hf_api.is_xet_available", lambda: False)
    monkeypatch.setattr(HfApi, "_validate_yaml", lambda self, content, **kw: calls["yaml"].append(content))
    return calls


def test_push_uploads_exactly_the_export(export_dir, hub, capsys, tmp_path):
    folder = tmp_path / "vit-pm"
    shutil.copytree(export_dir, folder)
    (folder / "__pycache__").mkdir()
    (folder / "__pycache__" / "x.pyc").write_bytes(b"junk")
    (folder / ".DS_Store").write_text("junk")
    argv = ["push", str(folder), "--repo-id", "me/vit-pm", "--private", "--revision", "v1", "--commit-message", "hi"]
    assert main(argv) == 0
    assert hub["repos"] == [("me/vit-pm", {"private": True, "exist_ok": True, "repo_type": "model"})]
    assert hub["branches"] == [("me/vit-pm", "v1")]
    (commit,) = hub["commits"]
    expected = {p.name for p in export_dir.iterdir()}
    assert set(commit["files"]) == expected
    assert {"model.safetensors", "config.json", "README.md", "modeling_vit_patch_merger.py"} <= expected
    assert commit["message"] == "hi" and commit["revision"] == "v1"
    for name, source in commit["files"].items():
        assert (folder / name).read_bytes() == (export_dir / name).read_bytes(), name
        assert str(source).startswith(str(folder))
    assert "https://huggingface.co/me/vit-pm/tree/v1" in capsys.readouterr().out
    assert hub["yaml"] == [(export_dir / "README.md").read_text()]


def test_export_files_names_code_from_auto_map(export_dir):
    files = export_files(export_dir)
    assert "configuration_vit_patch_merger.py" in files and "modeling_vit_patch_merger.py" in files


@pytest.mark.parametrize("remove", ["model.safetensors", "modeling_vit_patch_merger.py", "README.md"])
def test_incomplete_export_is_refused(export_dir, hub, tmp_path, capsys, remove):
    folder = tmp_path / "broken"
    shutil.copytree(export_dir, folder)
    (folder / remove).unlink()
    assert main(["push", str(folder), "--repo-id", "me/x"]) == 2
    err = capsys.readouterr().err.strip()
    assert "not a complete export" in err and remove in err and len(err.splitlines()) == 1
    assert hub["commits"] == [] and hub["repos"] == []


def test_source_checkpoint_is_refused(tiny_vit, hub, capsys):
    assert main(["push", str(tiny_vit), "--repo-id", "me/x"]) == 2
    assert "not a retrofit export" in capsys.readouterr().err


def test_not_logged_in(export_dir, hub, monkeypatch, capsys):
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    assert main(["push", str(export_dir), "--repo-id", "me/x"]) == 2
    assert "not logged in" in capsys.readouterr().err
    assert hub["commits"] == []


def test_offline_mode_is_explained(export_dir, hub, monkeypatch, capsys):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert main(["push", str(export_dir), "--repo-id", "me/x"]) == 2
    assert "HF_HUB_OFFLINE" in capsys.readouterr().err


def test_bad_repo_id(export_dir, hub, capsys):
    assert main(["push", str(export_dir), "--repo-id", "no-namespace"]) == 2
    assert "namespace" in capsys.readouterr().err
