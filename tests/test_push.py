"""`retrofit push`: exactly the export's files are uploaded (HfApi intercepted, no network), and bad input refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from huggingface_hub import HfApi, RepoUrl, constants
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.hf_api import CommitInfo

from retrofit import convert
from retrofit.cli import main
from retrofit.errors import RetrofitError
from retrofit.push import export_files, push


@pytest.fixture(scope="module")
def export_dir(tiny_vit, tmp_path_factory):
    out = tmp_path_factory.mktemp("push") / "vit-pm"
    convert(tiny_vit, after_layer=2, num_tokens=4, output=out, log=lambda _: None)
    return out


@pytest.fixture
def hub(monkeypatch):
    """Intercept the HTTP-level HfApi calls; `upload_folder` itself runs for real and builds the commit."""
    calls: dict = {"commits": [], "repos": [], "branches": [], "existing": set(), "deleted": []}
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    monkeypatch.setattr(HfApi, "whoami", lambda self, token=None, **kw: {"name": "me"})

    def create_repo(self, repo_id, **kwargs):
        calls["repos"].append((repo_id, kwargs))
        if repo_id in calls["existing"] and not kwargs.get("exist_ok"):  # as the Hub answers: 409 Conflict
            response = SimpleNamespace(status_code=409, headers={}, url="", request=None)
            raise HfHubHTTPError("409 Conflict: You already created this model repo", response=response)
        calls["existing"].add(repo_id)
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_branch(self, repo_id, *, branch, **kwargs):
        calls["branches"].append((repo_id, branch))

    def create_commit(self, repo_id, operations, *, commit_message, revision=None, **kwargs):
        added = [op for op in operations if hasattr(op, "path_or_fileobj")]
        calls["commits"].append(
            {
                "repo_id": repo_id,
                # where each file is read from (links resolved) and what it holds, read while the upload runs
                "files": {op.path_in_repo: Path(op.path_or_fileobj).resolve() for op in added},
                "contents": {op.path_in_repo: Path(op.path_or_fileobj).read_bytes() for op in added},
                "deletes": sorted(op.path_in_repo for op in operations if op not in added),
                "message": commit_message,
                "revision": revision,
                "create_pr": kwargs.get("create_pr"),
            }
        )
        url = f"https://huggingface.co/{repo_id}/commit/abc123"
        pr_url = f"https://huggingface.co/{repo_id}/discussions/7" if kwargs.get("create_pr") else None
        return CommitInfo(
            commit_url=url, commit_message=commit_message, commit_description="", oid="abc123", pr_url=pr_url
        )

    def repo_exists(self, repo_id, **kwargs):
        return repo_id in calls["existing"]

    def delete_repo(self, repo_id, **kwargs):
        calls["deleted"].append(repo_id)

    calls["remote"] = {}  # repo id -> the files it holds before the upload

    def list_repo_files(self, repo_id, **kwargs):
        return [".gitattributes", *calls["remote"].get(repo_id, [])]

    calls["heads"] = {}  # repo id -> the commit its main branch is at (repo_info's sha), where a test sets one

    def repo_info(self, repo_id, **kwargs):
        return SimpleNamespace(sha=calls["heads"].get(repo_id), private=None)

    monkeypatch.setattr(HfApi, "list_repo_files", list_repo_files)
    monkeypatch.setattr(HfApi, "repo_info", repo_info)
    monkeypatch.setattr(HfApi, "repo_exists", repo_exists)
    monkeypatch.setattr(HfApi, "delete_repo", delete_repo)
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
    assert hub["repos"] == [("me/vit-pm", {"private": True, "exist_ok": False, "repo_type": "model"})]  # created
    assert hub["branches"] == [("me/vit-pm", "v1")]
    (commit,) = hub["commits"]
    expected = {p.name for p in export_dir.iterdir()}
    assert set(commit["files"]) == expected
    assert {"model.safetensors", "config.json", "README.md", "modeling_vit_patch_merger.py"} <= expected
    assert commit["message"] == "hi" and commit["revision"] == "v1"
    for name, source in commit["files"].items():  # the export's own files, not copies, except the card
        if name != "README.md":
            assert source == (folder / name).resolve() and commit["contents"][name] == (export_dir / name).read_bytes()
    assert "https://huggingface.co/me/vit-pm/tree/v1" in capsys.readouterr().err
    # The Hub's card says how to load the repo (on its branch); the local card is left as it was.
    local = (export_dir / "README.md").read_text()
    assert (folder / "README.md").read_text() == local and f'from_pretrained("{export_dir.name}"' in local
    hub_card = commit["contents"]["README.md"].decode()
    assert hub_card == local.replace(f'"{export_dir.name}"', '"me/vit-pm", revision="v1"')
    assert 'from_pretrained("me/vit-pm", revision="v1", trust_remote_code=True)' in hub_card
    assert 'pipeline("image-classification", model="me/vit-pm", revision="v1", trust_remote_code=True)' in hub_card
    assert hub["yaml"] == [hub_card]


def test_the_hub_card_names_the_evaluated_model_as_the_repo_does(export_dir, hub, tmp_path):
    """`evaluate --card` names the model in the card's model-index (the Hub's evaluation results) by its folder; the
    Hub's card named the repo "vit-pm" whatever its id (or after the folder was renamed). The local card stays as it
    was."""
    from huggingface_hub import ModelCard

    from retrofit.card import update_card

    folder = _copy(export_dir, tmp_path / "vit-pm")
    rows = [{"model": str(folder), "merged": True, "top1": 0.85, "top5": 0.98, "loss": 0.4, "gflops": 9.2}]
    update_card(folder, evaluation={"data": "fashion-mnist", "split": "test", "num_examples": 100, "models": rows,
                                    "table": "T"})  # fmt: skip
    (folder / "README.md").write_text((folder / "README.md").read_text().replace("---\n", "---\n# reviewed\n", 1))
    local = (folder / "README.md").read_text()
    assert main(["push", str(folder), "--repo-id", "me/vit-b16-pm8"]) == 0
    hub_text = hub["commits"][0]["contents"]["README.md"].decode()
    assert hub_text.startswith("---\n# reviewed\n")  # a comment of the user's in the YAML reaches the Hub
    hub_card, local_card = ModelCard(hub_text), ModelCard(local)
    assert local_card.data.model_name == "vit-pm" and hub_card.data.model_name == "vit-b16-pm8"
    assert hub_card.data.eval_results[0].metric_value == 0.85
    assert hub_card.text == local_card.text.replace('"vit-pm"', '"me/vit-b16-pm8"')
    assert (folder / "README.md").read_text() == local
    # The export renamed after its evaluation (`mv vit-pm final`): the Hub's card named the model "vit-pm". (Its
    # results file recorded no name before retrofit did: a new evaluation records it.)
    stored = json.loads((folder / "retrofit_results.json").read_text())
    del stored["model_name"]
    (folder / "retrofit_results.json").write_text(json.dumps(stored))
    update_card(folder, evaluation=stored["evaluation"] | {"models": rows})
    renamed = folder.rename(tmp_path / "final")
    assert main(["push", str(renamed), "--repo-id", "me/vit-b16-pm8"]) == 0
    assert ModelCard(hub["commits"][-1]["contents"]["README.md"].decode()).data.model_name == "vit-b16-pm8"
    # a later evaluation names it by its new folder; a name the user gave it stays, on the Hub too
    update_card(renamed, evaluation={"data": "fashion-mnist", "split": "test", "num_examples": 100,
                                     "models": [rows[0] | {"model": str(renamed)}], "table": "T"})  # fmt: skip
    assert ModelCard.load(renamed / "README.md").data.model_name == "final"
    (renamed / "README.md").write_text((renamed / "README.md").read_text().replace("- name: final", "- name: Mine"))
    assert main(["push", str(renamed), "--repo-id", "me/vit-b16-pm8"]) == 0
    assert ModelCard(hub["commits"][-1]["contents"]["README.md"].decode()).data.model_name == "Mine"
    update_card(renamed, evaluation={"data": "fashion-mnist", "split": "test", "num_examples": 100,
                                     "models": [rows[0] | {"model": str(renamed)}], "table": "T"})  # fmt: skip
    assert ModelCard.load(renamed / "README.md").data.model_name == "Mine"


def test_no_upload_while_another_run_writes_the_export(export_dir, hub, tmp_path, capsys):
    """`finetune ... -o E --overwrite` swaps E's files when it ends: a push of E meanwhile would upload the old card
    with the new weights. The run's lock refuses the push (and the push holds it, so no run replaces E meanwhile)."""
    import fcntl

    from retrofit.atomic import lock_file

    folder = _copy(export_dir, tmp_path / "pm")
    lock = lock_file(folder)
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "w") as held:  # another run's lock on the folder (flock: per open file, so this process too)
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write("4242 --output")
        held.flush()
        assert main(["push", str(folder), "--repo-id", "me/x"]) == 2
        err = capsys.readouterr().err.strip()
        assert "another retrofit run (process 4242) is writing" in err and len(err.splitlines()) == 1
    assert hub["repos"] == [] and hub["commits"] == []
    assert main(["push", str(folder), "--repo-id", "me/x"]) == 0 and len(hub["commits"]) == 1  # and freed after


def test_no_card_update_while_the_export_is_uploaded(export_dir, tmp_path, capsys):
    """`evaluate --card` or `bench --card` while `push` uploads the export: the Hub got the README of one evaluation
    beside the results file of the other. The push's lock refuses them, before they measure anything."""
    import fcntl

    from retrofit import update_card
    from retrofit.atomic import lock_file

    folder = _copy(export_dir, tmp_path / "pm")
    card = (folder / "README.md").read_bytes()
    lock = lock_file(folder)
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "w") as held:  # the push's lock (flock: per open file, so this process too)
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write("4242 EXPORT")
        held.flush()
        assert main(["bench", str(folder), "--card", str(folder), "--batch-size", "1", "--repeats", "1"]) == 2
        err = capsys.readouterr().err.strip()
        assert "another retrofit run (process 4242) is writing" in err and len(err.splitlines()) == 1
        assert "Measuring" not in err and "images/s" not in err
        with pytest.raises(RetrofitError, match="another retrofit run"):
            update_card(folder, run={"table": "| a |"})
    assert (folder / "README.md").read_bytes() == card
    update_card(folder, run={"table": "| a |"})  # and freed after
    assert (folder / "README.md").read_bytes() != card


def test_export_files_names_code_from_auto_map(export_dir, tmp_path):
    files = export_files(export_dir)
    assert "configuration_vit_patch_merger.py" in files and "modeling_vit_patch_merger.py" in files
    # a tokenizer file is a dual encoder's own; in a ViT export it is the user's, and stays on their machine
    folder = _copy(export_dir, tmp_path / "with-notes")
    (folder / "vocab.json").write_text('{"my": "notes"}')
    assert export_files(folder) == files


@pytest.mark.parametrize("remove", ["model.safetensors", "modeling_vit_patch_merger.py", "README.md"])
def test_incomplete_export_is_refused(export_dir, hub, tmp_path, capsys, remove):
    folder = tmp_path / "broken"
    shutil.copytree(export_dir, folder)
    (folder / remove).unlink()
    assert main(["push", str(folder), "--repo-id", "me/x"]) == 2
    err = capsys.readouterr().err.strip()
    assert "not a complete export" in err and remove in err and len(err.splitlines()) == 1
    assert hub["commits"] == [] and hub["repos"] == []
    # a deleted card: re-running convert (the advice for missing weights) would undo a fine-tune
    assert ("re-run `retrofit convert`" in err) is (remove != "README.md")


def test_an_empty_or_linked_file_of_the_export_is_refused(export_dir, hub, tmp_path, capsys):
    """A code file or card left empty (a copy cut short) would be published as it is: retrofit's own loading check
    does not read the code, which only users without retrofit run; a link in place of one of the export's files would
    publish whatever it points to."""
    messages = {
        "modeling_vit_patch_merger.py": "(missing or empty: modeling_vit_patch_merger.py)",
        "README.md": "its model card README.md is missing or empty",
    }
    for name, message in messages.items():
        folder = _copy(export_dir, tmp_path / f"empty-{name}")
        (folder / name).write_text("")
        assert main(["push", str(folder), "--repo-id", "me/x"]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    folder = _copy(export_dir, tmp_path / "linked")
    (tmp_path / "elsewhere.py").write_text((folder / "modeling_vit_patch_merger.py").read_text())
    (folder / "modeling_vit_patch_merger.py").unlink()
    (folder / "modeling_vit_patch_merger.py").symlink_to(tmp_path / "elsewhere.py")
    assert main(["push", str(folder), "--repo-id", "me/x"]) == 2
    err = capsys.readouterr().err.strip()
    assert "has links where its own files belong (modeling_vit_patch_merger.py)" in err and len(err.splitlines()) == 1
    assert hub["commits"] == [] and hub["repos"] == []
    # a results file that is a link stays out of the upload, though it holds retrofit's results
    folder = _copy(export_dir, tmp_path / "linked-results")
    (folder / "retrofit_results.json").write_text('{"run": {"table": "T"}}')
    assert "retrofit_results.json" in export_files(folder)
    (folder / "retrofit_results.json").rename(tmp_path / "results.json")
    (folder / "retrofit_results.json").symlink_to(tmp_path / "results.json")
    assert "retrofit_results.json" not in export_files(folder)


def _copy(export_dir, folder):
    shutil.copytree(export_dir, folder)
    return folder


def _shard(folder):
    """Turn the single weight file into a one-shard export with an index, as large models are saved."""
    import json

    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), framework="numpy") as weights:
        names = list(weights.keys())
    (folder / "model.safetensors").rename(folder / "model-00001-of-00001.safetensors")
    index = {"metadata": {}, "weight_map": dict.fromkeys(names, "model-00001-of-00001.safetensors")}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


def test_a_shard_index_naming_a_file_in_a_folder_is_refused_up_front(export_dir, hub, tmp_path, capsys):
    """Every check passed, the repo was created, and the upload failed on the staged shard ("check your network")."""
    folder = _shard(_copy(export_dir, tmp_path / "nested"))
    (folder / "weights").mkdir()
    (folder / "model-00001-of-00001.safetensors").rename(folder / "weights" / "model-00001-of-00001.safetensors")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"] = dict.fromkeys(index["weight_map"], "weights/model-00001-of-00001.safetensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    assert main(["push", str(folder), "--repo-id", "me/x"]) == 2
    err = capsys.readouterr().err.strip()
    assert "names a weight file 'weights/model-00001-of-00001.safetensors' that is not a file name" in err
    assert len(err.splitlines()) == 1 and hub["repos"] == [] and hub["commits"] == []


@pytest.mark.parametrize("sharded", [False, True])
def test_truncated_weights_are_refused(export_dir, hub, tmp_path, capsys, sharded):
    folder = _copy(export_dir, tmp_path / "trunc")
    weights = "model.safetensors"
    if sharded:
        weights = "model-00001-of-00001.safetensors"
        assert weights in export_files(_shard(folder))  # a complete sharded export passes
    data = (folder / weights).read_bytes()
    (folder / weights).write_bytes(data[: len(data) // 2])
    assert main(["push", str(folder), "--repo-id", "me/x"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"not a complete export: {weights} is corrupt or truncated" in err and len(err.splitlines()) == 1
    assert hub["commits"] == [] and hub["repos"] == []


MALFORMED = {
    "config-list": ("config.json", [1, 2], "config.json is not a JSON object"),
    "index-list": ("model.safetensors.index.json", [1], 'has no "weight_map"'),
    "index-number": ("model.safetensors.index.json", {"weight_map": {"a": 5}}, "names a weight file 5"),
    "index-outside": ("model.safetensors.index.json", {"weight_map": {"a": "../w.safetensors"}}, "not a file name"),
    "auto-map-string": ("auto_map", "x", "auto_map is a str, not an object"),
    "auto-map-number": ("auto_map", {"AutoConfig": 5}, "auto_map['AutoConfig'] = 5 is not 'module.Class'"),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_export_json_is_refused_in_one_line(export_dir, hub, tmp_path, capsys, case):
    import json

    name, value, message = MALFORMED[case]
    folder = _copy(export_dir, tmp_path / "bad")
    if name == "auto_map":
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "auto_map": value}))
    else:
        if name.endswith("index.json"):
            (folder / "model.safetensors").unlink()
        (folder / name).write_text(json.dumps(value))
    assert main(["push", str(folder), "--repo-id", "me/x"]) == 2
    err = capsys.readouterr().err.strip()
    assert "not a complete export" in err and message in err and len(err.splitlines()) == 1
    assert hub["commits"] == [] and hub["repos"] == []


def test_an_export_whose_config_no_longer_matches_its_weights_is_not_uploaded(export_dir, hub, tmp_path, capsys):
    """Every file there and whole, but config.json edited after the export (the merge, the labels, the width, the
    model type) or preprocessor_config.json broken: a model that does not load is refused before the repo is made."""
    edits = {
        "merge_num_tokens": ({"merge_num_tokens": 8}, "patch_merger.queries is [4, 32] in the weights but [8, 32]"),
        "merge_after_layer": ({"merge_after_layer": 3}, "lacks 3 of the model's weights (vit.layers.3.patch_merger"),
        "num_labels": ({"id2label": {"0": "a", "1": "b"}, "label2id": {"a": 0, "b": 1}}, "classifier.bias is [3]"),
        "model_type": ({"model_type": "foo_patch_merger"}, "model type 'foo' is not supported"),
        "preprocessor": (None, "preprocessor_config.json' is not an image processor config"),
    }
    for name, (edit, message) in edits.items():
        folder = _copy(export_dir, tmp_path / name)
        if edit is None:
            (folder / "preprocessor_config.json").write_text("{not json")
        else:
            config = json.loads((folder / "config.json").read_text())
            (folder / "config.json").write_text(json.dumps({**config, **edit}))
        assert export_files(folder)  # complete, file by file
        assert main(["push", str(folder), "--repo-id", "me/x"]) == 2
        err = capsys.readouterr().err.strip()
        assert f"'{folder}' does not load as it stands, so nothing was uploaded" in err, name
        assert message in err and len(err.splitlines()) == 1, err
    assert hub["commits"] == [] and hub["repos"] == []


@pytest.mark.parametrize("revision", ["", "a b", "../../etc", "-x", "/x", "x/", "v1.lock", "x..y", "refs/heads/x", "@"])
def test_bad_revision_is_refused_before_anything_is_created(export_dir, hub, capsys, revision):
    assert main(["push", str(export_dir), "--repo-id", "me/x", f"--revision={revision}"]) == 2
    err = capsys.readouterr().err.strip()
    problem = "is empty (got '')" if revision == "" else f"{revision!r} is not a valid branch name"
    assert f"--revision {problem}" in err and len(err.splitlines()) == 1
    assert hub["repos"] == [] and hub["branches"] == [] and hub["commits"] == []


def test_branch_url_is_quoted(export_dir, hub, capsys):
    assert main(["push", str(export_dir), "--repo-id", "me/x", "--revision", "exp/k6-m8"]) == 0
    assert hub["branches"] == [("me/x", "exp/k6-m8")] and hub["commits"][0]["revision"] == "exp/k6-m8"
    assert "to https://huggingface.co/me/x/tree/exp%2Fk6-m8\n" in capsys.readouterr().err


def test_push_to_an_open_pull_request(export_dir, hub, capsys):
    argv = ["push", str(export_dir), "--repo-id", "me/x", "--revision", "refs/pr/3"]
    assert main(argv) == 2  # no such repo: refused, and none created for it
    assert "names a pull request, but 'me/x' does not exist" in capsys.readouterr().err
    assert hub["repos"] == [] and hub["commits"] == []
    hub["existing"].add("me/x")
    assert main(argv) == 0
    assert hub["repos"] == [] and hub["branches"] == []  # the pull request's ref exists; no branch to create
    assert hub["commits"][0]["revision"] == "refs/pr/3"
    assert "to https://huggingface.co/me/x/discussions/3\n" in capsys.readouterr().err


@pytest.mark.parametrize("existed", [False, True])
@pytest.mark.parametrize("fails", ["branch", "upload", "upload to main"])
def test_a_failed_push_leaves_no_new_empty_repo(export_dir, hub, monkeypatch, capsys, existed, fails):
    """A refused branch or an upload cut off by the network: the repo this push created is deleted again; a repo
    that was there before stays."""

    def refuse(self, repo_id, *args, **kwargs):
        raise RuntimeError("Invalid reference for a branch" if fails == "branch" else "Connection reset by peer")

    monkeypatch.setattr(HfApi, "create_branch" if fails == "branch" else "create_commit", refuse)
    if existed:
        hub["existing"].add("me/x")
    branch = [] if fails == "upload to main" else ["--revision", "v1"]
    assert main(["push", str(export_dir), "--repo-id", "me/x", *branch]) == 2
    err = capsys.readouterr().err.strip()
    assert ("Invalid reference" if fails == "branch" else "Connection reset") in err and len(err.splitlines()) == 1
    assert {repo for repo, _ in hub["repos"]} == {"me/x"} and hub["commits"] == []
    assert hub["deleted"] == ([] if existed else ["me/x"])


def test_a_push_stopped_by_ctrl_c_during_the_upload_leaves_no_new_empty_repo(export_dir, hub, monkeypatch):
    """A Ctrl-C (or SIGTERM) during the upload stopped the push, but left the repo it had created for it, empty and
    perhaps public: only a failed upload deleted it again."""

    def interrupted(self, repo_id, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(HfApi, "create_commit", interrupted)
    hub["existing"].add("me/old")
    assert main(["push", str(export_dir), "--repo-id", "me/new"]) == 130
    assert main(["push", str(export_dir), "--repo-id", "me/old"]) == 130
    assert hub["deleted"] == ["me/new"] and hub["commits"] == []  # the repo that was there before stays


def test_a_failed_push_never_deletes_a_repo_made_by_someone_else_meanwhile(export_dir, hub, monkeypatch, capsys):
    """The repo did not exist when the push asked, then someone made it, then the upload failed: asking first and
    creating with exist_ok=True took that repo for the push's own and deleted it. Only a repo this push's own
    create_repo made is deleted."""
    create_repo = HfApi.create_repo

    def made_meanwhile(self, repo_id, **kwargs):  # someone else makes it just before the push's own request
        hub["existing"].add(repo_id)
        return create_repo(self, repo_id, **kwargs)

    def refuse(self, repo_id, *args, **kwargs):
        raise RuntimeError("Connection reset by peer")

    monkeypatch.setattr(HfApi, "create_repo", made_meanwhile)
    monkeypatch.setattr(HfApi, "create_commit", refuse)
    assert main(["push", str(export_dir), "--repo-id", "me/shared"]) == 2
    assert "Connection reset" in capsys.readouterr().err and hub["deleted"] == []


def test_an_export_naming_code_of_another_repo_uploads_nothing(export_dir, hub, tmp_path, capsys):
    """`evil/repo--modeling_vit_patch_merger.X` in config.json's auto_map passed (its module name is the export's),
    and transformers fetches that repo's code for `trust_remote_code` users; an auto_map in the processor's config
    was never looked at."""
    folder = _copy(export_dir, tmp_path / "other-repo")
    config = json.loads((folder / "config.json").read_text())
    edited = {key: f"evil/repo--{ref}" for key, ref in config["auto_map"].items()}
    (folder / "config.json").write_text(json.dumps({**config, "auto_map": edited}))
    assert main(["push", str(folder), "--repo-id", "me/x"]) == 2
    assert "loads code from another Hub repo" in capsys.readouterr().err
    (folder / "config.json").write_text(json.dumps(config))
    processor = json.loads((folder / "preprocessor_config.json").read_text())
    processor["auto_map"] = {"AutoImageProcessor": "evil/repo--image_processing_evil.Evil"}
    (folder / "preprocessor_config.json").write_text(json.dumps(processor))
    assert main(["push", str(folder), "--repo-id", "me/x"]) == 2
    err = capsys.readouterr().err.strip()
    assert "preprocessor_config.json' names code to load (auto_map" in err and len(err.splitlines()) == 1
    assert hub["commits"] == [] and hub["repos"] == []


@pytest.mark.parametrize("module", ["secrets", "modeling_evil_patch_merger"])
def test_an_auto_map_naming_a_file_retrofit_did_not_write_uploads_nothing(export_dir, hub, tmp_path, capsys, module):
    """A hand-edited auto_map is no way to publish another file of the folder (a user's secrets, say), even one
    named as retrofit names its code (it was uploaded, and `trust_remote_code` users of the repo would run it)."""
    folder = _copy(export_dir, tmp_path / "edited")
    (folder / f"{module}.py").write_text("HF_TOKEN = 'hf_private'\n")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"]["AutoModel"] = f"{module}.ViTPatchMergerModel"
    (folder / "config.json").write_text(json.dumps(config))
    assert main(["push", str(folder), "--repo-id", "me/x"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"names {module}.py, which is not code retrofit writes" in err and len(err.splitlines()) == 1
    assert hub["commits"] == [] and hub["repos"] == []


def test_the_code_of_a_family_this_release_does_not_know_is_retrofits_by_name_and_header(tmp_path):
    """An export of another release, of a family this one lacks (`own` empty): its generated code uploads, a file
    of the same naming without retrofit's header does not."""
    from retrofit.push import _code_files

    (tmp_path / "modeling_newfam_patch_merger.py").write_text("# Generated by retrofit 9.0.\nimport torch\n")
    (tmp_path / "configuration_newfam_patch_merger.py").write_text("import os\n")
    auto_map = {"AutoModel": "modeling_newfam_patch_merger.NewFamPatchMergerModel"}
    assert _code_files(auto_map, tmp_path) == ["modeling_newfam_patch_merger.py"]
    with pytest.raises(RetrofitError, match="names configuration_newfam_patch_merger.py, which is not code retrofit"):
        _code_files({**auto_map, "AutoConfig": "configuration_newfam_patch_merger.NewFamConfig"}, tmp_path)


def test_a_card_that_is_not_utf8_is_refused_before_the_repo_is_created(export_dir, hub, tmp_path, capsys):
    folder = _copy(export_dir, tmp_path / "latin1")
    (folder / "README.md").write_bytes((folder / "README.md").read_bytes() + "Caf\xe9 notes\n".encode("latin-1"))
    assert main(["push", str(folder), "--repo-id", "me/x"]) == 2
    err = capsys.readouterr().err.strip()
    assert "README.md' is not readable UTF-8 text" in err and len(err.splitlines()) == 1
    assert hub["repos"] == [] and hub["commits"] == []


def test_a_card_whose_metadata_does_not_parse_is_refused_before_the_repo_is_created(export_dir, hub, tmp_path, capsys):
    """The Hub refuses such a card at the upload, after `create_repo`: the new repo was left empty."""
    folder = _copy(export_dir, tmp_path / "yaml")
    text = (folder / "README.md").read_text()
    for metadata in ("license: [mit\n", "- a list\n- not a mapping\n"):
        (folder / "README.md").write_text(text.replace("---\n", "---\n" + metadata, 1))
        assert main(["push", str(folder), "--repo-id", "me/x"]) == 2
        err = capsys.readouterr().err.strip()
        assert "README.md' has metadata (the YAML between its first two '---' lines) that cannot be read" in err
        assert len(err.splitlines()) == 1
    assert hub["repos"] == [] and hub["commits"] == []


@pytest.mark.parametrize("public", [True, False])
def test_private_refuses_an_existing_public_repo(export_dir, tiny_vit, hub, monkeypatch, tmp_path, capsys, public):
    """--private cannot make an existing repo private (the Hub keeps its visibility): nothing is uploaded to a public
    one, and convert --push-to-hub refuses it before any work; an existing private repo takes the upload."""
    hub["existing"].add("me/x")
    monkeypatch.setattr(HfApi, "repo_info", lambda self, repo_id, **kw: SimpleNamespace(private=not public))
    out = tmp_path / "pm"
    for argv in (
        ["push", str(export_dir), "--repo-id", "me/x", "--private"],
        ["push", str(export_dir), "--repo-id", "me/x", "--private", "--revision", "v1"],
        ["convert", str(tiny_vit), "--after-layer", "2", "--tokens", "4", "-o", str(out), "--push-to-hub", "me/x",
         "--private"],
    ):  # fmt: skip
        code = main(argv)
        err = capsys.readouterr().err.strip()
        if public:
            assert code == 2 and "'me/x' exists and is public" in err and len(err.splitlines()) == 1
        else:
            assert code == 0 and "error" not in err
    assert len(hub["commits"]) == (0 if public else 3) and out.exists() is not public
    assert hub["repos"] == [] if public else len(hub["repos"]) == 6  # each: create (409: it exists), then open it
    assert hub["branches"] == ([] if public else [("me/x", "v1")])


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


# --- --push-to-hub on convert / finetune / run: checked before any work, uploaded after the export is written ---


@pytest.mark.parametrize("command", ["convert", "finetune"])
def test_private_or_create_pr_without_push_to_hub_is_refused(tiny_vit, hub, tmp_path, capsys, command):
    """`convert ... --private --create-pr` wrote the export, uploaded nothing and said nothing of the two options."""
    out = tmp_path / "o"
    argv = [command, str(tiny_vit), "--after-layer", "2", "--tokens", "4", "-o", str(out), "--data", "x"]
    argv = argv[:-2] if command == "convert" else argv
    for option in ("--private", "--create-pr"):
        assert main([*argv, option]) == 2
        err = capsys.readouterr().err.strip()
        assert f"{option} says how --push-to-hub uploads the export" in err and len(err.splitlines()) == 1
    assert not out.exists() and hub["repos"] == []


def test_convert_push_to_hub_uploads_the_new_export(tiny_vit, hub, tmp_path, capsys):
    out = tmp_path / "pm"
    argv = ["convert", str(tiny_vit), "--after-layer", "2", "--tokens", "4", "-o", str(out)]
    assert main([*argv, "--push-to-hub", "me/vit-pm", "--private"]) == 0
    assert hub["repos"] == [("me/vit-pm", {"private": True, "exist_ok": False, "repo_type": "model"})]  # created
    (commit,) = hub["commits"]
    assert set(commit["files"]) == {p.name for p in out.iterdir()} and "model.safetensors" in commit["files"]
    assert "https://huggingface.co/me/vit-pm" in capsys.readouterr().err


def test_push_to_hub_checks_the_login_before_any_work(tiny_vit, hub, monkeypatch, tmp_path, capsys):
    from test_data import make_imagefolder
    from test_recipes import tiny_recipe, write

    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    data = make_imagefolder(tmp_path / "colours", per_class=2, test_per_class=2)
    recipe = write(tmp_path / "tiny.yaml", tiny_recipe(tiny_vit, data, tmp_path / "run-out"))
    merge = [str(tiny_vit), "--after-layer", "2", "--tokens", "4"]
    commands = [
        ["convert", *merge, "-o", str(tmp_path / "c")],
        ["finetune", *merge, "--data", str(data), "-o", str(tmp_path / "f")],
        ["run", str(recipe)],
    ]
    for argv in commands:
        assert main([*argv, "--push-to-hub", "me/x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all("not logged in" in line for line in err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["colours", "tiny.yaml"]  # no output, no checkpoints
    assert hub["commits"] == [] and hub["repos"] == []


def test_push_to_hub_create_pr_opens_a_pull_request_once_the_export_is_written(tiny_vit, hub, tmp_path, capsys):
    """`convert/finetune/run --push-to-hub R --create-pr`: a repo that does not exist, or --private with it, is
    refused before any work; on an existing repo the export goes up as a pull request (no repo created)."""
    from test_data import make_imagefolder
    from test_recipes import tiny_recipe, write

    data = make_imagefolder(tmp_path / "colours", per_class=4, test_per_class=2)
    merge = [str(tiny_vit), "--after-layer", "2", "--tokens", "4"]
    commands = {
        "c": ["convert", *merge, "-o", str(tmp_path / "c")],
        "f": [
            "finetune",
            *merge,
            "--data",
            str(data),
            "--max-steps",
            "1",
            "--batch-size",
            "2",
            "-o",
            str(tmp_path / "f"),
        ],
        "r": ["run", str(write(tmp_path / "r.yaml", tiny_recipe(tiny_vit, data, tmp_path / "r"))), "--max-steps", "1"],
    }
    for argv in commands.values():
        assert main([*argv, "--push-to-hub", "org/x", "--create-pr"]) == 2
        assert main([*argv, "--push-to-hub", "org/x", "--create-pr", "--private"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 6 and all(line.startswith("retrofit: error: ") for line in err)
    assert "'org/x' does not exist (or is not visible to you); push without --create-pr" in err[0]
    assert "--private sets the visibility of a new repo, and --create-pr needs an existing one" in err[1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["colours", "r.yaml"]  # no output, no checkpoints
    hub["existing"].add("org/x")
    for name, argv in commands.items():
        assert main([*argv, "--push-to-hub", "org/x", "--create-pr"]) == 0
        assert set(hub["commits"][-1]["files"]) == {p.name for p in (tmp_path / name).iterdir()}
    assert [commit["create_pr"] for commit in hub["commits"]] == [True] * 3 and hub["repos"] == []
    assert capsys.readouterr().err.count("as pull request https://huggingface.co/org/x/discussions/7") == 3


def test_recipe_run_pushes_the_finished_export(tiny_vit, hub, tmp_path):
    from test_data import make_imagefolder
    from test_recipes import tiny_recipe, write

    data = make_imagefolder(tmp_path / "colours", per_class=4, test_per_class=2)
    out = tmp_path / "out"
    recipe = tiny_recipe(tiny_vit, data, out)
    recipe["export"].update(push_to_hub="me/tiny-pm", private=True)
    assert main(["run", str(write(tmp_path / "tiny.yaml", recipe)), "--max-steps", "2"]) == 0
    (commit,) = hub["commits"]
    assert set(commit["files"]) == {p.name for p in out.iterdir()}
    assert hub["repos"][0][1]["private"] is True
    card = commit["contents"]["README.md"].decode()
    assert "fine-tuned (2 steps, loss kd)" in card and hub["yaml"] == [card]
    assert card == (out / "README.md").read_text().replace(f'"{out.name}"', '"me/tiny-pm"')
    assert 'from_pretrained("me/tiny-pm", trust_remote_code=True)' in card  # main: no revision


def test_failed_upload_keeps_the_export_and_says_how_to_retry(tiny_vit, hub, monkeypatch, tmp_path, capsys):
    def refuse(self, *args, **kwargs):
        raise ConnectionError("connection reset by peer")

    monkeypatch.setattr(HfApi, "create_commit", refuse)
    out = tmp_path / "my pm"  # the retry command is one a shell runs as given
    argv = ["convert", str(tiny_vit), "--after-layer", "2", "--tokens", "4", "-o", str(out), "--push-to-hub", "me/x"]
    assert main([*argv, "--private"]) == 2
    *logged, err = capsys.readouterr().err.strip().splitlines()  # the log on stderr, then the error's one line
    assert logged == [f"wrote {out}"] and err.startswith(f"retrofit: error: wrote {out}, but the upload failed")
    # the retry keeps the repo private: without --private it would create a public one
    assert "connection reset by peer" in err and f"`retrofit push '{out}' --repo-id me/x --private`" in err
    assert export_files(out)  # complete: the retry can push it as it is


def test_pretrain_recipe_refuses_push_to_hub(tmp_path, capsys):
    import yaml

    recipe = {"pretrain": {"model": {}}, "data": {"name": "fashion-mnist"}, "export": {"output": str(tmp_path / "b")}}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["run", str(tmp_path / "p.yaml"), "--push-to-hub", "me/x"]) == 2
    assert "hf upload" in capsys.readouterr().err


def test_hub_card_names_the_repo_and_branch_but_not_a_pull_request():
    from retrofit.push import hub_card

    text = 'm = X.from_pretrained("path/to/this/folder", trust_remote_code=True)'
    assert hub_card(text, "me/x") == 'm = X.from_pretrained("me/x", trust_remote_code=True)'
    assert hub_card(text, "me/x", "main") == hub_card(text, "me/x")
    assert hub_card(text, "me/x", "v1") == 'm = X.from_pretrained("me/x", revision="v1", trust_remote_code=True)'
    assert hub_card(text, "me/x", "refs/pr/3") == hub_card(text, "me/x")  # what it will be once merged
    assert hub_card("a hand-written card", "me/x") == "a hand-written card"
    # Only the folder the card's own examples name: a line a user added about another model is published as written.
    card = 'Compare: `X.from_pretrained("google/vit-base")`\n## How to use\n' + text + '\npipeline(model="other")'
    assert hub_card(card, "me/x") == card.replace('"path/to/this/folder"', '"me/x"')


def test_the_loading_examples_name_a_folder_with_a_quote_as_python_reads_it(export_dir):
    """An export folder named `my"pm`: the card's examples were `from_pretrained("my"pm")` (not Python), and the Hub's
    card `from_pretrained("me/x"pm")`, a model that is not the repo."""
    import ast

    from retrofit.card import build_card
    from retrofit.loading import load_model
    from retrofit.push import hub_card

    model = load_model(export_dir)
    for folder, branch in (('my"pm', 'v"1'), ("back\\slash", "v1")):  # git takes a quote in a branch name
        local = build_card(model, folder=folder).text
        for text, name in ((local, folder), (hub_card(local, "me/x", branch), "me/x")):
            blocks = [block.split("```")[0] for block in text.split("```python\n")[1:]]
            calls = [node for block in blocks for node in ast.walk(ast.parse(block)) if isinstance(node, ast.Call)]
            named = [
                ast.literal_eval(call.args[0]) for call in calls if getattr(call.func, "attr", "") == "from_pretrained"
            ]
            named += [ast.literal_eval(k.value) for call in calls for k in call.keywords if k.arg == "model"]
            assert len(named) == 4 and set(named) == {name}, (folder, named)
            revisions = [ast.literal_eval(k.value) for call in calls for k in call.keywords if k.arg == "revision"]
            assert revisions == ([] if name == folder else [branch] * 4)


def test_create_pr_opens_a_pull_request_on_an_existing_repo(export_dir, hub, monkeypatch, capsys):
    """For a repo the user may not write to (a public one, here): no repo or branch is created, one commit is opened
    as a pull request."""
    monkeypatch.setattr(HfApi, "repo_info", lambda self, repo_id, **kw: SimpleNamespace(sha=None, private=False))
    assert main(["push", str(export_dir), "--repo-id", "org/vit-pm", "--create-pr"]) == 2
    assert "'org/vit-pm' does not exist" in capsys.readouterr().err and hub["commits"] == []
    hub["existing"].add("org/vit-pm")
    assert main(["push", str(export_dir), "--repo-id", "org/vit-pm", "--create-pr"]) == 0
    (commit,) = hub["commits"]
    assert commit["create_pr"] is True and commit["revision"] is None
    assert hub["repos"] == [] and hub["branches"] == []
    assert 'from_pretrained("org/vit-pm", trust_remote_code=True)' in commit["contents"]["README.md"].decode()
    assert "as pull request https://huggingface.co/org/vit-pm/discussions/7" in capsys.readouterr().err
    for extra in (["--revision", "v1"], ["--private"]):
        assert main(["push", str(export_dir), "--repo-id", "org/vit-pm", "--create-pr", *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("retrofit: error: ") and len(err.splitlines()) == 1
    with pytest.raises(RetrofitError, match="takes no --revision"):  # the Python API refuses it too
        push(export_dir, "org/vit-pm", create_pr=True, revision="v1", log=lambda _: None)
    assert len(hub["commits"]) == 1 and hub["branches"] == []


def test_create_pr_of_what_the_repo_already_holds_says_no_pull_request_was_opened(export_dir, hub, monkeypatch, capsys):
    """Pushing the same export twice with --create-pr: huggingface_hub skips the commit that changes nothing and opens
    no pull request; push said "uploaded ... to https://huggingface.co/org/vit-pm", as if it had."""
    hub["existing"].add("org/vit-pm")

    def unchanged(self, repo_id, operations, *, commit_message, **kwargs):  # as create_commit answers a no-op
        url = f"https://huggingface.co/{repo_id}/commit/head"
        return CommitInfo(commit_url=url, commit_message=commit_message, commit_description="", oid="head")

    monkeypatch.setattr(HfApi, "create_commit", unchanged)
    assert main(["push", str(export_dir), "--repo-id", "org/vit-pm", "--create-pr"]) == 0
    said = capsys.readouterr().err
    assert "no pull request opened: org/vit-pm's main branch already holds" in said and "uploaded" not in said


def test_pushing_what_the_repo_already_holds_says_nothing_was_uploaded(export_dir, hub, monkeypatch, capsys):
    """Pushing the same export twice: huggingface_hub skips the commit that changes nothing and answers with the
    branch's head commit; push said "uploaded ... " and named that older commit as if it were this upload's."""
    hub["existing"].add("org/vit-pm")
    hub["heads"]["org/vit-pm"] = "head"

    def unchanged(self, repo_id, operations, *, commit_message, **kwargs):  # as create_commit answers a no-op
        url = f"https://huggingface.co/{repo_id}/commit/head"
        return CommitInfo(commit_url=url, commit_message=commit_message, commit_description="", oid="head")

    monkeypatch.setattr(HfApi, "create_commit", unchanged)
    assert main(["push", str(export_dir), "--repo-id", "org/vit-pm"]) == 0
    said = capsys.readouterr().err
    assert f"nothing uploaded: https://huggingface.co/org/vit-pm already holds {export_dir} as it is" in said
    assert "uploaded " + str(export_dir) not in said and "commit: " not in said
    hub["heads"]["org/vit-pm"] = "older"  # a real upload: a new commit
    monkeypatch.setattr(HfApi, "create_commit", lambda self, repo_id, operations, **kw: CommitInfo(
        commit_url="https://huggingface.co/org/vit-pm/commit/new", commit_message="", commit_description="",
        oid="new"))  # fmt: skip
    assert main(["push", str(export_dir), "--repo-id", "org/vit-pm"]) == 0
    said = capsys.readouterr().err
    assert f"uploaded {export_dir} " in said and "commit: https://huggingface.co/org/vit-pm/commit/new" in said


def test_a_second_upload_removes_what_an_earlier_export_left_in_the_repo(export_dir, hub):
    """The repo held an earlier export, sharded, evaluated, with another family's code and a tokenizer: all stayed
    next to the new files (transformers loads a stale model.safetensors before a shard index, a stale tokenizer.json
    before a SigLIP's spiece.model; the old results file and curve went with a card that no longer shows them). A file
    of the user's stays."""
    old = ["README.md", "config.json", "model.safetensors.index.json", "model-00001-of-00002.safetensors", "notes.md",
           "modeling_deit_patch_merger.py", "retrofit_results.json", "speed.png", "tokenizer.json"]  # fmt: skip
    hub["remote"]["me/vit-pm"] = old
    assert main(["push", str(export_dir), "--repo-id", "me/vit-pm"]) == 0
    (commit,) = hub["commits"]
    assert commit["deletes"] == sorted(set(old) - {"README.md", "config.json", "notes.md"})
    assert set(commit["files"]) == {path.name for path in export_dir.iterdir()}


def test_an_upload_deletes_nothing_in_the_repos_folders(export_dir, hub):
    """The stale-file patterns are fnmatch patterns, whose `*` matches a `/` too: a user's archive of an older model
    (`model-v1/model-00001-of-00002.safetensors`) and their experiments
    (`modeling_experiments/ablation_patch_merger.py`)
    were deleted by the upload. Only what an earlier export left at the top level goes."""
    mine = ["model-v1/model-00001-of-00002.safetensors", "modeling_experiments/ablation_patch_merger.py",
            "configuration_notes/old_patch_merger.py", "archive/model.safetensors", "old/tokenizer.json"]  # fmt: skip
    hub["remote"]["me/vit-pm"] = ["README.md", "model-00001-of-00002.safetensors", *mine]
    assert main(["push", str(export_dir), "--repo-id", "me/vit-pm"]) == 0
    (commit,) = hub["commits"]
    assert commit["deletes"] == ["model-00001-of-00002.safetensors"]


def test_a_sharded_upload_removes_the_single_weight_file_an_earlier_export_left(export_dir, hub, tmp_path):
    """The other way round: transformers would load the old model.safetensors instead of the new shards."""
    folder = _shard(_copy(export_dir, tmp_path / "vit-pm"))
    hub["remote"]["me/vit-pm"] = ["README.md", "config.json", "model.safetensors"]
    assert main(["push", str(folder), "--repo-id", "me/vit-pm"]) == 0
    (commit,) = hub["commits"]
    assert commit["deletes"] == ["model.safetensors"]
    assert {"model.safetensors.index.json", "model-00001-of-00001.safetensors"} <= set(commit["files"])
