"""Nothing lost, nothing run: regression tests for the holes an adversarial run found (issue 20).

Each test names the promise it keeps. `--overwrite` replaces only what retrofit wrote (`retrofit.atomic`), a resumed
run loads no pickle, an export names no code outside itself and no local path, races, full disks and uploads lose
nothing, and bad input is one line with exit code 2.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
from conftest import TINY, error_line, save_tiny
from test_data import make_imagefolder

import retrofit.atomic
import retrofit.loading
import retrofit.provenance
from retrofit import convert
from retrofit.checkpoints import list_checkpoints
from retrofit.cli import main
from retrofit.errors import RetrofitError
from retrofit.finetune import finetune

REPO = Path(__file__).resolve().parents[1]
FAST = dict(batch_size=8, save_every=2, progress=False, eval_batch_size=12)
MERGE = ["--after-layer", "2", "--tokens", "4"]
# A recipe's tiny ViT to pretrain (for the output checks: they refuse before it is built)
PRETRAIN = {**{k: TINY[k] for k in ("image_size", "patch_size", "num_attention_heads")}, "hidden_size": 16,
            "num_hidden_layers": 2, "intermediate_size": 32}  # fmt: skip


@pytest.fixture(scope="module")
def export_dir(tiny_vit, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("safety-export") / "vit-pm"
    convert(tiny_vit, after_layer=2, num_tokens=4, output=out, log=lambda _: None)
    return out


@pytest.fixture(scope="module")
def colours(tmp_path_factory) -> str:
    return str(make_imagefolder(tmp_path_factory.mktemp("safety-data") / "colours", per_class=8, test_per_class=4))


def refused(capsys, *argv) -> str:
    """Run the CLI; assert it refused with one line (after the log lines, if any) and exit code 2; return that line."""
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, err
    return error_line(err)


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` with its content."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


class Pwned:
    """A pickle that runs a command when loaded (here: writes a file)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# ---------------------------------------------------------------------------------------------------------------
# 1. --overwrite replaces only what retrofit wrote
# ---------------------------------------------------------------------------------------------------------------


def test_overwrite_of_a_checkpoint_dir_keeps_the_users_files(tiny_vit, colours, tmp_path):
    """`finetune --checkpoint-dir work --overwrite` deletes retrofit's step-* folders there, nothing else."""
    work = tmp_path / "work"
    shutil.copytree(tiny_vit, work / "my-source")
    (work / "notes.txt").write_text("mine")
    (work / "step-notes").mkdir()  # named like a checkpoint, but not one
    (work / ".step-notes.tmp").mkdir()  # named like an unfinished one (.step-NNNNNNNN.tmp), but not one: was deleted
    (work / ".step-notes.tmp" / "mine.txt").write_text("mine")
    mine = tree(work)
    settings = dict(after_layer=2, num_tokens=4, data=colours, loss="ce", max_steps=4, checkpoint_dir=work, **FAST)
    finetune(work / "my-source", output=tmp_path / "a", **settings)
    assert [p.name for p in list_checkpoints(work)] == ["step-00000002", "step-00000004"]
    finetune(work / "my-source", output=tmp_path / "a", overwrite=True, **{**settings, "max_steps": 2})
    assert [p.name for p in list_checkpoints(work)] == ["step-00000002"]
    kept = tree(work)
    assert all(kept[name] == content for name, content in mine.items())  # the user's files are all there
    assert (work / "step-notes").is_dir()


def test_overwrite_replaces_an_export_but_no_other_folder(tiny_vit, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    err = refused(capsys, "convert", tiny_vit, *MERGE, "--output", out, "--overwrite")
    assert f"output '{out}' exists and is not a retrofit export, so --overwrite does not replace it" in err
    assert (out / "keep.txt").read_text() == "user data"
    (out / "keep.txt").unlink()  # an empty folder loses nothing: replaced
    assert main(["convert", str(tiny_vit), *MERGE, "--output", str(out), "--overwrite"]) == 0
    assert main(["convert", str(tiny_vit), *MERGE, "--output", str(out), "--overwrite"]) == 0  # its own export
    (out / "notes.md").write_text("mine")  # an export the user added a file to
    err = refused(capsys, "convert", tiny_vit, *MERGE, "--output", out, "--overwrite")
    assert "is a retrofit export but also holds files retrofit did not write (notes.md)" in err
    assert (out / "notes.md").read_text() == "mine"


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc, a folder no one can write files in")
def test_a_folder_that_takes_no_files_is_refused_before_any_work(tiny_vit, tmp_path, capsys, monkeypatch):
    """Run as root (a container, CI), the permission check passed for ``/proc``, a read-only network mount or a FUSE
    folder, and the run did all its work (merge, calibration, hours of training) before the write failed. The folder
    is now tried with an empty file first, which is left nowhere."""
    import importlib

    def no_work(*args, **kwargs):
        raise AssertionError("the merge ran before the output was checked")

    monkeypatch.setattr(importlib.import_module("retrofit.convert"), "insert_patch_merger", no_work)
    err = refused(capsys, "convert", tiny_vit, *MERGE, "--output", "/proc/retrofit-out")
    assert err.startswith("retrofit: error: output '/proc/retrofit-out': cannot write in '/proc' (")
    assert err.endswith("); choose another --output") and not os.path.exists("/proc/retrofit-out")
    err = refused(capsys, "evaluate", tiny_vit, "--data", "x", "--json", "/proc/retrofit.json")
    assert err.startswith("retrofit: error: --json '/proc/retrofit.json': cannot write in '/proc' (")
    monkeypatch.undo()
    assert main(["convert", str(tiny_vit), *MERGE, "--output", str(tmp_path / "o")]) == 0  # a folder that takes them
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]  # and the trial file is gone


def test_resume_replaces_only_its_own_runs_output(tiny_vit, colours, export_dir, tmp_path):
    """--resume may replace the output of the run it continues (its export, written before an upload failed), and no
    other: resumed with another --output, an export already there (here convert's) was replaced without --overwrite,
    by finetune and by pretrain alike."""
    from retrofit.finetune import pretrain

    other = tmp_path / "other"
    shutil.copytree(export_dir, other)
    before = tree(other)
    settings = dict(after_layer=2, num_tokens=4, data=colours, loss="ce", max_steps=2, eval_split="", **FAST)
    finetune(tiny_vit, output=tmp_path / "a", checkpoint_dir=tmp_path / "work", stop_after=1, **settings)
    with pytest.raises(RetrofitError, match=f"output '{other}' already exists, and the checkpoints in .* export to "
                                            f"'{tmp_path / 'a'}': --resume replaces only its own"):  # fmt: skip
        finetune(tiny_vit, output=other, checkpoint_dir=tmp_path / "work", resume=True, **settings)
    pretrain(PRETRAIN, output=tmp_path / "b", data=colours, checkpoint_dir=tmp_path / "work-b", max_steps=1,
             eval_split="", **FAST)  # fmt: skip
    with pytest.raises(RetrofitError, match="--resume replaces only its own run's output"):
        pretrain(PRETRAIN, output=other, data=colours, checkpoint_dir=tmp_path / "work-b", max_steps=1, resume=True,
                 eval_split="", **FAST)  # fmt: skip
    assert tree(other) == before
    for _ in range(2):  # resumed into its own output: written, then replaced (as after a failed upload)
        finetune(tiny_vit, output=tmp_path / "a", checkpoint_dir=tmp_path / "work", resume=True, **settings)
    assert (tmp_path / "a" / "model.safetensors").is_file()


def test_update_card_rewrites_only_a_retrofit_exports_card(tiny_vit, export_dir, tmp_path, monkeypatch):
    """`retrofit.update_card` on a model folder of the user's (config.json and README.md, no merge) replaced the
    Results section of their own card with retrofit's and added retrofit_results.json; `bench --card` refused it.
    An export that cannot be written (a read-only mount) is refused before measuring, not after."""
    from retrofit import update_card
    from retrofit.card import check_card_target

    folder = tmp_path / "my-model"
    shutil.copytree(tiny_vit, folder)
    (folder / "README.md").write_text("# My model\n\n## Results\n\nMy own numbers: 91.3 %\n")
    before = tree(folder)
    with pytest.raises(RetrofitError, match="is not a retrofit export .*so its README.md is not retrofit's to rewrite"):
        update_card(folder, run={"table": "| model |\n|---|"})
    assert tree(folder) == before
    read_only = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != export_dir and read_only(path, mode))
    with pytest.raises(RetrofitError, match="--card .*: cannot write in it"):
        check_card_target(export_dir, [str(export_dir)])
    monkeypatch.undo()  # a mount whose server says no, where every permission check passes
    refused = tempfile.mkstemp

    def read_only_mount(*args, dir=None, **kwargs):
        if Path(dir) == export_dir:
            raise OSError(errno.EROFS, "Read-only file system")
        return refused(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", read_only_mount)
    with pytest.raises(RetrofitError, match=r"--card .*: cannot write in it \(Read-only file system\)"):
        check_card_target(export_dir, [str(export_dir)])


def test_a_run_replaces_only_its_own_results_file_in_the_checkpoint_folder(tiny_vit, colours, tmp_path):
    """A recipe writes results.json into its checkpoint folder, replacing an earlier run's without --overwrite: an
    evaluation report of the user's under that name (`evaluate --json work/results.json`) was replaced too."""
    from test_recipes import tiny_recipe, write

    from retrofit import run_recipe

    work = tmp_path / "work"
    work.mkdir()
    theirs = work / "results.json"
    theirs.write_text(json.dumps({"retrofit_report": "evaluate", "models": ["mine"]}))
    recipe = tiny_recipe(tiny_vit, colours, tmp_path / "out")
    recipe["training"].update(max_steps=1)
    recipe["data"]["eval_split"] = ""
    recipe["evaluation"].update(speed=False, before=False)
    recipe["export"]["checkpoint_dir"] = str(work)
    said = []
    run_recipe(write(tmp_path / "r.yaml", recipe), progress=False, log=said.append)
    assert json.loads(theirs.read_text()) == {"retrofit_report": "evaluate", "models": ["mine"]}
    assert any("results.json not written" in line and "retrofit evaluate" in line for line in said)


def test_overwrite_knows_retrofits_files_by_their_exact_names(tiny_vit, export_dir, tmp_path, capsys):
    """Files only named like retrofit's (other code modules, a shard-like name, a tokenizer in a ViT export, which has
    none) are the user's: --overwrite refuses to delete them; the names retrofit writes for this export are its own.
    The card's curve and results file are retrofit's only where they hold what it writes: a user's speed.png or
    retrofit_results.json (which push does not upload as the card's) was deleted."""
    out = tmp_path / "o"
    shutil.copytree(export_dir, out)
    (out / "model-00001-of-00002.safetensors").write_bytes(b"")  # a shard's name: retrofit's
    mine = ["configuration_mine.py", "model-notes-of-mine.safetensors", "modeling_my_tweak.py",
            "retrofit_results.json", "speed.png", "vocab.json"]  # fmt: skip
    for name in mine:
        (out / name).write_text("# mine")
    assert retrofit.atomic.EXPORT.foreign_files(out) == mine
    err = refused(capsys, "convert", tiny_vit, *MERGE, "--output", out, "--overwrite")
    assert "holds files retrofit did not write (configuration_mine.py, model-notes-of-mine.safetensors, " in err
    assert all((out / name).read_text() == "# mine" for name in mine)


def test_sweep_overwrite_refuses_a_folder_it_did_not_write_or_its_source(tiny_vit, colours, tmp_path, capsys):
    folder = tmp_path / "reports"
    folder.mkdir()
    (folder / "mine.txt").write_text("mine")
    sweep = ["sweep", tiny_vit, "--after-layer", "2", "--tokens", "4", "--data", colours, "--overwrite"]
    assert "exists and is not a sweep report" in refused(capsys, *sweep, "--output", folder)
    assert "which this run reads" in refused(capsys, *sweep, "--output", tiny_vit)
    assert "which this run reads" in refused(capsys, *sweep, "--output", Path(colours).parent)
    assert (folder / "mine.txt").read_text() == "mine" and (Path(tiny_vit) / "config.json").is_file()


def test_run_never_replaces_its_data_or_an_output_it_did_not_make(colours, tmp_path, capsys):
    """`run --resume` with no checkpoint yet is a new run: an existing output is refused as without --resume; an
    output that is the data folder is refused even with --overwrite."""
    import yaml

    recipe = tmp_path / "pretrain.yaml"
    out = tmp_path / "baseline"
    out.mkdir()
    (out / "thesis.pdf").write_text("years of work")
    spec = {
        "pretrain": {"model": PRETRAIN},
        "data": {"name": colours},
        "training": {"max_steps": 2, "batch_size": 8},
        "export": {"output": str(out), "checkpoint_dir": str(tmp_path / "ckpt")},
    }
    recipe.write_text(yaml.safe_dump(spec))
    assert "already exists" in refused(capsys, "run", recipe, "--resume")
    assert "is not a checkpoint retrofit pretrained" in refused(capsys, "run", recipe, "--resume", "--overwrite")
    assert "which this run reads" in refused(capsys, "run", recipe, "--overwrite", "--output", colours)
    assert "which this run reads" in refused(capsys, "run", recipe, "--overwrite", "--output", tmp_path)
    inside = ["--output", tmp_path / "new", "--checkpoint-dir", tmp_path / "new" / "ckpt"]  # the export replaces it
    assert "is inside --output" in refused(capsys, "run", recipe, *inside)
    assert (out / "thesis.pdf").read_text() == "years of work" and (Path(colours) / "train").is_dir()
    assert not (tmp_path / "new").exists()


def test_an_output_inside_an_input_or_given_as_a_link_is_refused(tiny_vit, colours, tmp_path, capsys):
    """An export written into the image folder it trains on would become one of its classes; an output that is a
    link would be replaced by a folder while what it points to stays as it was. Both: one line, before any work."""
    inside = Path(colours) / "train" / "merged"
    finetune = ["finetune", tiny_vit, *MERGE, "--data", colours, "--max-steps", "1"]
    assert f"is in '{Path(colours).resolve()}', which this run reads" in refused(capsys, *finetune, "-o", inside)
    assert not inside.exists()
    export = tmp_path / "export"
    assert main(["convert", str(tiny_vit), *MERGE, "--output", str(export)]) == 0
    for target in (export, tmp_path / "nowhere"):
        link = tmp_path / f"link-to-{target.name}"
        link.symlink_to(target)
        err = refused(capsys, "convert", tiny_vit, *MERGE, "--output", link, "--overwrite")
        assert f"output '{link}' is a link (to '{target}'); give the folder itself" in err
        assert link.is_symlink() and not (tmp_path / "nowhere").exists()
    # under a link to nothing: refused at the start, not after the training as "File exists" when making its folder
    beyond = tmp_path / "link-to-nowhere" / "merged"
    err = refused(capsys, *finetune, "-o", beyond, "--checkpoint-dir", tmp_path / "work")
    assert f"--output '{beyond}': '{tmp_path / 'link-to-nowhere'}' is a link to nothing" in err
    # under a loop of links: a traceback (RuntimeError: Symlink loop, from resolving the path) for reports and ONNX
    # files, and for an --output whose checkpoints go elsewhere
    (tmp_path / "loop-a").symlink_to(tmp_path / "loop-b")
    (tmp_path / "loop-b").symlink_to(tmp_path / "loop-a")
    looped = tmp_path / "loop-a" / "x"
    for argv in (["evaluate", tiny_vit, "--data", colours, "--json", f"{looped}.json"],
                 ["bench", tiny_vit, "--json", f"{looped}.json"], ["export-onnx", export, "-o", f"{looped}.onnx"],
                 [*finetune, "-o", looped, "--checkpoint-dir", tmp_path / "work"]):  # fmt: skip
        assert f"'{tmp_path / 'loop-a'}' is a link to nothing" in refused(capsys, *argv)
    # a name that fits, but not as the temporary sibling it is written as first: failed after all the work
    for argv in (["evaluate", tiny_vit, "--data", colours, "--json", tmp_path / f"{'j' * 240}.json"],
                 ["convert", tiny_vit, *MERGE, "-o", tmp_path / ("m" * 245)]):  # fmt: skip
        assert "is too long a name (245 bytes; at most" in refused(capsys, *argv)


@pytest.fixture
def shipped(tmp_path, monkeypatch) -> Path:
    """A copy of the shipped checkpoints standing in for retrofit/assets (so no test can harm the real ones)."""
    assets = tmp_path / "assets"
    shutil.copytree(retrofit.atomic.ASSETS / "fashion-mnist-vit", assets / "fashion-mnist-vit")
    monkeypatch.setattr(retrofit.atomic, "ASSETS", assets)
    monkeypatch.setattr(retrofit.loading, "ASSETS", assets)
    return assets


def test_retrofit_names_a_shipped_checkpoint_only_and_it_is_never_replaced(shipped, tmp_path, capsys):
    outside = tmp_path / "some" / "folder"
    shutil.copytree(shipped / "fashion-mnist-vit", outside)
    for name in ("retrofit:nope", "retrofit:../some/folder", f"retrofit:{outside}", "retrofit:fashion-mnist-vit/.."):
        err = refused(capsys, "convert", name, *MERGE, "--output", outside, "--overwrite")
        assert f"there is no shipped checkpoint '{name}'" in err and "retrofit:fashion-mnist-vit" in err
    before = tree(shipped)
    err = refused(capsys, "convert", "retrofit:fashion-mnist-vit", *MERGE, "--overwrite", "--output",
                  shipped / "fashion-mnist-vit")  # fmt: skip
    assert "which this run reads" in err
    err = refused(capsys, "convert", outside, *MERGE, "--overwrite", "--output", shipped / "fashion-mnist-vit")
    assert "is or holds a checkpoint shipped with retrofit" in err
    assert tree(shipped) == before and (outside / "config.json").is_file()


def test_json_reports_replace_only_reports_and_never_a_model_file(tiny_vit, colours, tmp_path, capsys):
    quick = ["--warmup", "1", "--repeats", "1", "--min-time", "0", "--latency-iters", "0", "--batch-size", "1"]
    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": true}\n')
    config = Path(tiny_vit) / "config.json"
    before = config.read_bytes()
    for command in (["bench", tiny_vit, *quick], ["evaluate", tiny_vit, "--data", colours, "--split", "test"]):
        assert "already exists" in refused(capsys, *command, "--json", notes)
        assert "is not a report retrofit wrote" in refused(capsys, *command, "--json", notes, "--overwrite")
        assert "which this run reads" in refused(capsys, *command, "--json", config, "--overwrite")
        report = tmp_path / f"{command[0]}.json"
        assert main([str(a) for a in [*command, "--json", report]]) == 0
        assert json.loads(report.read_text())["retrofit_report"] == command[0]
        assert main([str(a) for a in [*command, "--json", report, "--overwrite"]]) == 0  # its own report
        capsys.readouterr()
    capsys.readouterr()
    assert notes.read_text() == '{"mine": true}\n' and config.read_bytes() == before


# ---------------------------------------------------------------------------------------------------------------
# 2. No pickle runs on --resume
# ---------------------------------------------------------------------------------------------------------------


def test_resume_runs_no_pickle_planted_in_a_checkpoint(tiny_vit, colours, tmp_path):
    settings = dict(after_layer=2, num_tokens=4, data=colours, loss="ce", max_steps=4, **FAST)
    finetune(tiny_vit, output=tmp_path / "o", stop_after=2, **settings)
    (latest,) = list_checkpoints(tmp_path / "o-checkpoints")
    written = ["model.safetensors", "optimizer.bin", "progress.json", "random_states_0.pkl", "scheduler.bin"]
    assert json.loads((latest / "progress.json").read_text()) == {"step": 2, "epoch": 0, "batch": 2,
                                                                 "evaluations": [], "files": written}  # fmt: skip
    marker = tmp_path / "PWNED"
    for name in ("custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin", "scheduler.bin"):
        planted = tmp_path / "planted"
        shutil.copytree(latest, planted)
        (latest / name).write_bytes(pickle.dumps(Pwned(marker)))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with pytest.raises(RetrofitError, match=r"step-00000002' is damaged \((UnpicklingError|RuntimeError)"):
                finetune(tiny_vit, output=tmp_path / "o", resume=True, **settings)
        assert not marker.exists(), f"a pickle in {name} ran"
        assert not [w for w in caught if "pickle" in str(w.message)], "the refusal is one line, no torch warning"
        shutil.rmtree(latest)
        planted.rename(latest)
    (latest / "progress.json").unlink()  # a checkpoint of an older retrofit (progress as a pickle): refused
    (latest / "custom_checkpoint_0.pkl").write_bytes(pickle.dumps(Pwned(marker)))
    with pytest.raises(RetrofitError, match="written by an older retrofit.*pass --overwrite to start over"):
        finetune(tiny_vit, output=tmp_path / "o", resume=True, **settings)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------------------------
# 3. An export names no code outside itself
# ---------------------------------------------------------------------------------------------------------------


def test_an_export_drops_the_sources_pointers_to_other_code(tiny_vit, tmp_path, capsys):
    source = tmp_path / "source"
    shutil.copytree(tiny_vit, source)
    processor = json.loads((source / "preprocessor_config.json").read_text())
    processor["auto_map"] = {"AutoImageProcessor": "evil/repo--image_processing_evil.EvilProcessor"}
    (source / "preprocessor_config.json").write_text(json.dumps(processor))
    config = json.loads((source / "config.json").read_text())
    config["custom_pipelines"] = {"image-classification": {"impl": "evil/repo--pipe.Evil", "pt": []}}
    config["auto_map"] = {"AutoConfig": "evil/repo--configuration_evil.EvilConfig"}
    (source / "config.json").write_text(json.dumps(config))
    assert main(["convert", str(source), *MERGE, "--output", str(tmp_path / "o")]) == 0
    assert "image processor names custom code" in capsys.readouterr().err
    for name in ("config.json", "preprocessor_config.json", "README.md"):
        assert "evil" not in (tmp_path / "o" / name).read_text()
    auto_map = json.loads((tmp_path / "o" / "config.json").read_text())["auto_map"]
    assert all(
        ref.startswith(("configuration_vit_patch_merger.", "modeling_vit_patch_merger.")) for ref in auto_map.values()
    )


# ---------------------------------------------------------------------------------------------------------------
# 4. merge_source: unambiguous and private
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
def registry(tmp_path, monkeypatch) -> Path:
    """A fresh record of local sources (`retrofit.provenance`), so the test sees only its own."""
    cache = tmp_path / "retrofit-cache"
    monkeypatch.setattr(retrofit.provenance, "CACHE_DIR", cache)
    return cache


def test_a_local_source_is_recorded_by_name_and_hash_and_found_from_anywhere(
    tiny_vit, colours, tmp_path, monkeypatch, registry
):
    models = tmp_path / "models"
    source = models / "vit"
    shutil.copytree(tiny_vit, source)
    monkeypatch.chdir(models)
    convert("vit", after_layer=2, num_tokens=4, output=tmp_path / "pm")
    config = json.loads((tmp_path / "pm" / "config.json").read_text())
    assert config["merge_source"] == "vit" and config["merge_source_revision"] is None
    assert len(config["merge_source_sha256"]) == 64
    for name in ("config.json", "README.md"):  # nothing that is pushed holds a local path
        assert str(tmp_path) not in (tmp_path / "pm" / name).read_text()
    # From another folder, where ./vit is a different model: the recorded source is found and used, not ./vit.
    elsewhere = tmp_path / "elsewhere"
    torch.manual_seed(123)
    from transformers import ViTConfig, ViTForImageClassification

    save_tiny(ViTForImageClassification(ViTConfig(**TINY)), elsewhere / "vit")
    monkeypatch.chdir(elsewhere)
    logs: list[str] = []
    finetune(tmp_path / "pm", output=tmp_path / "o", data=colours, loss="kd", max_steps=1, log=logs.append, **FAST)
    assert "kd from the unmerged model" in (tmp_path / "o" / "README.md").read_text()
    # The source changed since the export was made (re-trained in place): not silently used.
    shutil.copytree(elsewhere / "vit", source, dirs_exist_ok=True)
    with pytest.raises(
        RetrofitError, match=r"made from a local folder named 'vit', which is not known on this machine"
    ):
        finetune(tmp_path / "pm", output=tmp_path / "o2", data=colours, loss="kd", max_steps=1, **FAST)
    # --teacher overrides, and the card names it without its path.
    finetune(tmp_path / "pm", output=tmp_path / "o2", data=colours, loss="kd", max_steps=1,
             teacher=str(elsewhere / "vit"), **FAST)  # fmt: skip
    card = (tmp_path / "o2" / "README.md").read_text()
    assert "kd from `vit`" in card and str(tmp_path) not in card


def test_sources_recorded_by_runs_exporting_at_once_are_all_kept(tmp_path, registry):
    """Two runs exporting at the same moment each read the record of local sources before the other wrote it back:
    one source was lost, and `finetune EXPORT` later found no teacher for its export (4 processes x 25 records kept
    42 to 83 of them here)."""
    from retrofit.provenance import REGISTRY, SourceRecord, remember

    children = []
    for process in range(4):
        child = os.fork()
        if child == 0:  # pragma: no cover - a child process
            code = 0
            try:
                for index in range(25):
                    folder = tmp_path / "sources" / f"{process}-{index}"
                    folder.mkdir(parents=True)
                    remember(SourceRecord("vit", sha256=folder.name, folder=folder))
            except BaseException:  # noqa: BLE001 - any failure shows as the exit code
                code = 1
            os._exit(code)
        children.append(child)
    assert all(os.waitstatus_to_exitcode(os.waitpid(child, 0)[1]) == 0 for child in children)
    known = json.loads((registry / REGISTRY).read_text())
    assert len(known) == 100 and all(known[path.name] == [str(path)] for path in (tmp_path / "sources").iterdir())


def test_of_folders_holding_the_source_weights_the_one_with_the_recorded_name_is_the_teacher(
    tiny_vit, tmp_path, registry
):
    """Copies of one checkpoint in several folders (with other configs or processors, say) hold the same weights:
    an export's teacher is the folder with the name it recorded, even when another copy was used more recently."""
    from retrofit.provenance import find_teacher

    source, copy = tmp_path / "a" / "vit", tmp_path / "b" / "vit-copy"
    shutil.copytree(tiny_vit, source)
    shutil.copytree(tiny_vit, copy)
    exported = convert(source, after_layer=2, num_tokens=4, output=tmp_path / "pm", log=lambda _: None)
    convert(copy, after_layer=2, num_tokens=4, output=tmp_path / "pm-copy", log=lambda _: None)  # used last
    assert find_teacher(str(tmp_path / "pm"), exported.model.config) == (str(source.resolve()), None)
    shutil.rmtree(source)  # gone: another folder with the same weights serves
    assert find_teacher(str(tmp_path / "pm"), exported.model.config) == (str(copy.resolve()), None)


def test_a_folder_with_the_source_weights_but_another_encoder_config_is_not_the_teacher(
    tiny_vit, colours, tmp_path, registry
):
    """A copy of the source whose config.json differs (another activation) holds the same weights: when the recorded
    folder is gone, finetune EXPORT refuses it in one line instead of distilling from another model."""
    source, copy = tmp_path / "vit", tmp_path / "vit-relu"
    shutil.copytree(tiny_vit, source)
    shutil.copytree(tiny_vit, copy)
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "hidden_act": "relu"}))
    convert(source, after_layer=2, num_tokens=4, output=tmp_path / "pm", log=lambda _: None)
    convert(copy, after_layer=2, num_tokens=4, output=tmp_path / "pm-relu", log=lambda _: None)
    shutil.rmtree(source)
    refusal = r"'.*vit-relu' holds the weights '.*pm' was made from, but its hidden_act is 'relu', the export's 'gelu'"
    with pytest.raises(RetrofitError, match=refusal):
        finetune(tmp_path / "pm", output=tmp_path / "o", data=colours, loss="kd", max_steps=1, **FAST)
    assert not (tmp_path / "o").exists()


def test_a_hub_source_is_recorded_with_its_commit(tiny_vit, colours, tmp_path, monkeypatch, registry):
    """A Hub id is recorded with the commit its files came from (here from a local Hub cache, offline), and the
    teacher is loaded at that commit."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    cache = tmp_path / "hub"
    snapshot = cache / "models--someone--tiny-vit" / "snapshots" / commit
    shutil.copytree(tiny_vit, snapshot)
    (cache / "models--someone--tiny-vit" / "refs").mkdir()
    (cache / "models--someone--tiny-vit" / "refs" / "main").write_text(commit)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))  # read at each call
    convert("someone/tiny-vit", after_layer=2, num_tokens=4, output=tmp_path / "pm")
    config = json.loads((tmp_path / "pm" / "config.json").read_text())
    assert config["merge_source"] == "someone/tiny-vit" and config["merge_source_revision"] == commit
    card = (tmp_path / "pm" / "README.md").read_text()
    assert "base_model: someone/tiny-vit" in card and commit in card
    assert finetune(tmp_path / "pm", output=tmp_path / "o", data=colours, loss="kd", max_steps=1, **FAST).steps == 1


# ---------------------------------------------------------------------------------------------------------------
# 5. Races, full disks, uploads, temporary files
# ---------------------------------------------------------------------------------------------------------------


def test_an_output_that_appears_during_the_run_is_not_replaced(tiny_vit, tmp_path, monkeypatch, capsys):
    """Two runs to the same new --output: the one that finishes second is refused and the first one's export stays."""
    export_module = sys.modules["retrofit.export"]  # `retrofit.export` is the function
    out = tmp_path / "o"
    real_save = export_module.save_image_processor

    def other_run_finishes_first(processor, folder):
        real_save(processor, folder)
        if not others:  # while this run writes its export, another one writes the same output
            others.append(folder)
            assert main(["convert", str(tiny_vit), *MERGE, "--output", str(out)]) == 0

    others: list[Path] = []

    monkeypatch.setattr(export_module, "save_image_processor", other_run_finishes_first)
    err = refused(capsys, "convert", tiny_vit, "--after-layer", "1", "--tokens", "2", "--output", out)
    assert "appeared while this run was working" in err
    assert json.loads((out / "config.json").read_text())["merge_after_layer"] == 2  # the other run's export
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]


def test_an_overwrite_stopped_at_its_last_rename_leaves_the_old_export_in_place(tiny_vit, tmp_path, monkeypatch):
    """Where the system has no one-step swap, --overwrite moves the old export aside, then the new one in: stopped
    between the two (Ctrl-C, an error), the old export stayed hidden in a .o.old-* folder and the output was gone."""
    out = tmp_path / "o"
    convert(tiny_vit, after_layer=2, num_tokens=4, output=out, log=lambda _: None)
    real_replace = os.replace

    def stopped(src, dst):
        if Path(src).name.startswith(".o.tmp-") and Path(dst) == out:
            raise KeyboardInterrupt
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", stopped)
    monkeypatch.setattr(retrofit.atomic, "_exchange", lambda a, b: False)  # a system without a one-step swap
    with pytest.raises(KeyboardInterrupt):
        convert(tiny_vit, after_layer=1, num_tokens=2, output=out, overwrite=True, log=lambda _: None)
    assert json.loads((out / "config.json").read_text())["merge_after_layer"] == 2  # the old export, in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]


def test_a_checkpoint_that_cannot_be_written_is_one_line_and_leaves_nothing(tiny_vit, colours, tmp_path, monkeypatch):
    from accelerate import Accelerator

    def disk_full(self, output_dir, **kwargs):
        (Path(output_dir) / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 512")

    monkeypatch.setattr(Accelerator, "save_state", disk_full)
    with pytest.raises(RetrofitError, match=r"cannot write checkpoint '.*step-00000002': .*unexpected pos"):
        finetune(tiny_vit, output=tmp_path / "o", after_layer=2, num_tokens=4, data=colours, loss="ce", max_steps=2,
                 **FAST)  # fmt: skip
    checkpoints = tmp_path / "o-checkpoints"
    assert not (tmp_path / "o").exists() and not [p for p in checkpoints.iterdir() if p.name != "run.json"]


def test_a_run_killed_while_it_deletes_an_old_checkpoint_leaves_whole_ones(tiny_vit, colours, tmp_path, monkeypatch):
    """Keeping the newest --keep-checkpoints deletes the older ones: a run killed while one was being deleted (here
    after its progress.json went) left a step folder that was no checkpoint, so --resume started over or was refused.
    Now a checkpoint is whole or gone, and the run resumes from its newest (here: it had finished, and exports)."""
    real_rmtree = shutil.rmtree

    def killed_meanwhile(path, *args, **kwargs):
        if (Path(path) / "progress.json").exists():  # a checkpoint being deleted
            (Path(path) / "progress.json").unlink()
            raise KeyboardInterrupt
        return real_rmtree(path, *args, **kwargs)

    settings = dict(after_layer=2, num_tokens=4, data=colours, loss="ce", max_steps=6, eval_split="", **FAST)
    monkeypatch.setattr(shutil, "rmtree", killed_meanwhile)
    with pytest.raises(KeyboardInterrupt):
        finetune(tiny_vit, output=tmp_path / "o", **settings)
    monkeypatch.undo()
    checkpoints = tmp_path / "o-checkpoints"
    assert [p.name for p in list_checkpoints(checkpoints)] == ["step-00000004", "step-00000006"]
    assert not (checkpoints / "step-00000002").exists() and not (tmp_path / "o").exists()
    assert finetune(tiny_vit, output=tmp_path / "o", resume=True, **settings).steps == 6
    assert (tmp_path / "o" / "model.safetensors").is_file()


def test_push_uploads_only_the_exports_own_regular_files(export_dir, tmp_path, capsys, monkeypatch):
    from huggingface_hub import HfApi

    folder = tmp_path / "pm"
    shutil.copytree(export_dir, folder)
    secret = tmp_path / "token"
    secret.write_text("hf_secret")
    (folder / "token").symlink_to(secret)  # an extra file: a link to a secret
    (folder / "notes.txt").write_text("mine")
    uploaded = {}

    def upload_folder(self, *, folder_path, **kwargs):
        uploaded.update({p.name: p.read_bytes() for p in Path(folder_path).iterdir()})
        return type("Info", (), {"commit_url": None})()

    monkeypatch.setenv("HF_TOKEN", "hf_test")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setattr(HfApi, "whoami", lambda self: {"name": "me"})
    monkeypatch.setattr(HfApi, "create_repo", lambda self, *a, **k: "https://huggingface.co/me/pm")
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    monkeypatch.setattr(HfApi, "list_repo_files", lambda self, *a, **k: [".gitattributes"])  # a new, empty repo
    assert main(["push", str(folder), "--repo-id", "me/pm"]) == 0
    assert "not uploaded (not part of the export): notes.txt, token" in capsys.readouterr().err
    assert set(uploaded) == {p.name for p in export_dir.iterdir()} and b"hf_secret" not in b"".join(uploaded.values())
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors").symlink_to(export_dir / "model.safetensors")
    assert "has links where its own files belong (model.safetensors)" in refused(
        capsys, "push", folder, "--repo-id", "me/pm"
    )


def test_the_generated_code_is_imported_without_temporary_files(tmp_path):
    """A run killed at any point leaves no folder of generated code behind: none is written."""
    script = (
        "import os; from retrofit.families import FAMILIES; from retrofit.hub_code import load_classes\n"
        "family = FAMILIES['vit']; load_classes(family, next(iter(family.heads.values())))\n"
        "os._exit(0)  # as if killed: no atexit handler runs\n"
    )
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, check=True, timeout=120)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------------------------
# 6. One line where a traceback was printed
# ---------------------------------------------------------------------------------------------------------------


def _edit_json(path: Path, change) -> None:
    value = json.loads(path.read_text()) if path.exists() else None
    path.write_text(json.dumps(change(value)))


@pytest.mark.parametrize(
    "damage, message",
    [
        ("pickle", "are a pickle that is not plain tensors, so loading them was refused"),
        ("config-file", "is a file; pass the folder that holds config.json"),
        ("config-null", "config.json' holds null, not a model config"),
        ("config-list", "config.json' holds a list, not a model config"),
        ("processor-list", "preprocessor_config.json' is not an image processor config (holds a list)"),
        ("processor-size", "gives images of 0×0 pixels; fix the size (or crop_size) in its preprocessor_config.json"),
        ("patch-size-0", "patch_size must be a positive whole number, not 0"),
        ("act-unknown", "config.json': hidden_act 'evil' is not an activation transformers knows"),
        ("layers-text", "config.json' is not a valid config (Validation error for field 'num_hidden_layers'"),
        ("dtype-number", "config.json': dtype '5' is not a floating-point type; make it float32, float16 or"),
        ("dtype-int8", "config.json': dtype 'int8' is not a floating-point type"),
        ("no-model-type", "config.json' has no model_type; add the checkpoint's (vit, deit"),
        ("id2label-text", "config.json' is not a valid config (invalid literal for int() with base 10: 'a'); fix or"),
        ("model-type-unknown", "model type 'foobar' is not supported (no single token sequence retrofit knows how"),
        ("dtype-auto", "config.json': dtype 'auto' is not a torch dtype; make it float32, bfloat16 or float16, or"),
        ("torch_dtype-unknown", "config.json': torch_dtype 'float33' is not a torch dtype; make it float32, bfloat16"),
        ("model-type-number", "config.json' holds an object whose model_type is not text, not a model config"),
    ],
)
def test_a_broken_source_is_one_line(tiny_vit, tmp_path, capsys, damage, message):
    source = tmp_path / "source"
    shutil.copytree(tiny_vit, source)
    marker = tmp_path / "PWNED"
    if damage == "pickle":
        (source / "model.safetensors").unlink()
        (source / "pytorch_model.bin").write_bytes(pickle.dumps(Pwned(marker)))
    elif damage == "config-null":
        (source / "config.json").write_text("null")
    elif damage == "config-list":
        (source / "config.json").write_text("[1, 2]")
    elif damage == "processor-list":
        (source / "preprocessor_config.json").write_text("[]")
    elif damage == "processor-size":  # was "--tokens 4 is out of range ... 1..0"
        _edit_json(source / "preprocessor_config.json", lambda c: {**c, "size": {"height": 0, "width": 0}})
    elif damage == "patch-size-0":
        _edit_json(source / "config.json", lambda c: {**c, "patch_size": 0})
    elif damage == "act-unknown":
        _edit_json(source / "config.json", lambda c: {**c, "hidden_act": "evil"})
    elif damage == "layers-text":
        _edit_json(source / "config.json", lambda c: {**c, "num_hidden_layers": "two"})
    elif damage == "no-model-type":  # these three were "cannot load ...; pass a folder holding config.json and weights"
        _edit_json(source / "config.json", lambda c: {k: v for k, v in c.items() if k != "model_type"})
    elif damage == "id2label-text":
        _edit_json(source / "config.json", lambda c: {**c, "id2label": {"a": "cat"}})
    elif damage == "model-type-unknown":
        _edit_json(source / "config.json", lambda c: {**c, "model_type": "foobar"})
    elif damage == "torch_dtype-unknown":  # the older key, read when there is no dtype
        _edit_json(
            source / "config.json", lambda c: {**{k: v for k, v in c.items() if k != "dtype"}, "torch_dtype": "float33"}
        )
    elif damage == "model-type-number":
        _edit_json(source / "config.json", lambda c: {**c, "model_type": 5})
    elif damage.startswith("dtype-"):  # was "'int' object has no attribute 'is_floating_point'; pass a folder ..."
        dtype = {"dtype-number": 5, "dtype-int8": "int8", "dtype-auto": "auto"}[damage]  # auto: "module 'torch' has
        _edit_json(source / "config.json", lambda c: {**c, "dtype": dtype})  # no attribute 'auto'" before
    target = source / "config.json" if damage == "config-file" else source
    with warnings.catch_warnings(record=True) as caught:  # a warning would reach the user's stderr before the line
        warnings.simplefilter("always")
        assert message in refused(capsys, "convert", target, *MERGE, "--output", tmp_path / "o")
    assert not (tmp_path / "o").exists() and not marker.exists()
    assert not [w for w in caught if "pickle" in str(w.message)]


def test_an_export_with_a_mistyped_merge_setting_is_one_line(export_dir, tmp_path, colours, capsys):
    export = tmp_path / "pm"
    shutil.copytree(export_dir, export)
    _edit_json(export / "config.json", lambda c: {**c, "merge_num_tokens": "four"})
    for command in (
        ["evaluate", export, "--data", colours],
        ["finetune", export, "--data", colours, "-o", tmp_path / "o"],
    ):
        assert "merge_num_tokens must be a positive whole number, not 'four'" in refused(capsys, *command)


def test_an_export_whose_config_json_transformers_refuses_is_one_line(export_dir, tmp_path, colours, capsys):
    """A field of an export's config.json that its config class cannot read (as `test_a_broken_source_is_one_line`
    has for sources) escaped as a traceback: ValueError, StrictDataclassFieldValidationError, AttributeError. One
    naming no class is refused too, not loaded as its family's first class."""
    for name, change, message in (
        ("id2label", {"id2label": {"a": "cat"}}, "config.json' is not a valid config (invalid literal for int() with"),
        ("layers", {"num_hidden_layers": "two"}, "config.json' is not a valid config (Validation error for field"),
        ("dtype", {"dtype": "auto"}, "config.json': dtype 'auto' is not a torch dtype; make it float32"),
        ("class", {"architectures": None}, "cannot tell which ViT class this export is ([]); re-export it"),
        ("after", {"merge_after_layer": 4}, "config.json': merge_after_layer 4 is not below num_hidden_layers 4; fix"),
    ):
        export = tmp_path / name
        shutil.copytree(export_dir, export)
        _edit_json(export / "config.json", lambda c, change=change: {**c, **change})
        assert message in refused(capsys, "evaluate", export, "--data", colours)


def test_bad_recipes_are_one_line(colours, tmp_path, capsys):
    import yaml

    latin = tmp_path / "latin1.yaml"
    latin.write_bytes("name: café\n".encode("latin-1"))
    assert "is not UTF-8 text" in refused(capsys, "run", latin)
    recipe = tmp_path / "pretrain.yaml"
    recipe.write_text(yaml.safe_dump({
        "pretrain": {"model": PRETRAIN},
        "data": {"name": colours}, "export": {"output": str(tmp_path / "b")},
    }))  # fmt: skip
    err = refused(capsys, "run", recipe, "--set", "pretrain.image_processor.size=5")
    assert "pretrain.image_processor gives 5×5 images, but pretrain.model.image_size is 32" in err
    err = refused(capsys, "run", recipe, "--set", "pretrain.image_processor.do_resize=maybe")  # any text resized
    assert "pretrain.image_processor.do_resize must be true or false, not 'maybe'" in err
    err = refused(capsys, "run", recipe, "--set", "pretrain.model.qkv_bias=0")
    assert "pretrain.model.qkv_bias must be true or false, not 0" in err
    for setting, message in (  # each failed inside transformers or torch, or blamed the data
        ("patch_size=64", "pretrain.model: patch_size 64 is larger than image_size 32"),
        ("hidden_act=evil", "pretrain.model: hidden_act 'evil' is not an activation transformers knows; use one of"),
        ("num_channels=0", "pretrain.model: num_channels must be a positive whole number, not 0"),
        ("num_channels=2", "pretrain.model: num_channels must be 1 (grey images) or 3 (RGB), not 2"),
        ("hidden_size=17", "pretrain.model: hidden_size 17 is not a multiple of num_attention_heads 2"),
    ):
        assert message in refused(capsys, "run", recipe, "--set", f"pretrain.model.{setting}")
    assert not (tmp_path / "b").exists()


def _recipe(tmp_path: Path, source: Path, colours: str) -> Path:
    import yaml

    recipe = tmp_path / f"{source.name}.yaml"
    recipe.write_text(yaml.safe_dump({
        "source": str(source), "merge": {"after_layer": 2, "tokens": 4},
        "data": {"name": colours, "eval_limit": 6}, "training": {"max_steps": 1, "batch_size": 8},
        "evaluation": {"batch_size": 6, "speed_batch_size": 2},
        "export": {"output": str(tmp_path / f"{source.name}-pm")},
    }))  # fmt: skip
    return recipe


def test_run_takes_non_square_models_and_refuses_a_processor_of_another_size(colours, tmp_path, capsys):
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    wide = tmp_path / "wide"
    ViTForImageClassification(ViTConfig(**{**TINY, "image_size": [32, 48]})).save_pretrained(wide)
    ViTImageProcessor(size={"height": 32, "width": 48}).save_pretrained(wide)
    assert main(["run", str(_recipe(tmp_path, wide, colours))]) == 0
    err = capsys.readouterr().err  # data.eval_limit 6: the first 6 test images are 4 of one class and 2 of another
    assert "hold 2 of its 3 classes" in err and "leave out --eval-limit (data.eval_limit in a recipe)" in err
    assert "at 32×48" in (tmp_path / "wide-pm" / "README.md").read_text()
    other = save_tiny(ViTForImageClassification(ViTConfig(**TINY)), tmp_path / "other", image_size=48)
    for argv in (
        ["run", _recipe(tmp_path, other, colours)],
        ["finetune", other, *MERGE, "--data", colours, "-o", tmp_path / "x"],
    ):
        err = refused(capsys, *argv)
        assert f"'{other}' cannot run on the 48×48 images its image processor gives" in err
    assert not (tmp_path / "other-pm").exists() and not (tmp_path / "x").exists()


def test_a_bad_image_read_by_a_worker_is_one_line(tiny_vit, tmp_path, capsys):
    """A PNG whose header is fine but whose pixels are not: found by a DataLoader worker, reported as one line; the
    workers are gone when the command returns (a cycle through torch's re-raise kept them until the garbage collector
    ran, whose shutdown of them then stalled 10 s)."""
    import multiprocessing
    import struct
    import zlib

    data = make_imagefolder(tmp_path / "images", per_class=4, test_per_class=2)
    image = sorted((data / "train" / "cat").glob("*.png"))[0]
    raw = bytearray(image.read_bytes())
    start = raw.find(b"IDAT")
    length = struct.unpack(">I", raw[start - 4 : start])[0]
    for index in range(start + 14, start + 4 + length - 10):
        raw[index] ^= 0x5A  # scramble the compressed pixels, keep the chunk's checksum valid
    raw[start + 4 + length : start + 8 + length] = struct.pack(">I", zlib.crc32(bytes(raw[start : start + 4 + length])))
    image.write_bytes(bytes(raw))
    argv = ["finetune", tiny_vit, *MERGE, "--data", data, "-o", tmp_path / "o", "--loss", "ce", "--no-calibrate",
            "--batch-size", "4", "--num-workers", "2", "--eval-split", ""]  # fmt: skip
    assert main([str(a) for a in argv]) == 2
    assert not multiprocessing.active_children()
    err = capsys.readouterr().err.strip()  # the progress bar, then one line
    assert err.splitlines()[-1].startswith("retrofit: error: image ") and "is unreadable" in err
    assert "Traceback" not in err and not (tmp_path / "o").exists()


def test_library_retry_messages_do_not_reach_the_user(tmp_path, capsys, monkeypatch):
    """An unreachable Hub ends in the one line, without huggingface_hub's "Retrying in Ns" lines before it."""
    from huggingface_hub.utils import logging as hub_logging
    from transformers import AutoConfig

    def unreachable(*args, **kwargs):
        for attempt in range(1, 6):
            hub_logging.get_logger("huggingface_hub.utils._http").warning(f"Retrying in 1s [Retry {attempt}/5].")
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files.")

    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # online, the Hub unreachable (the tests run offline)
    monkeypatch.setattr(AutoConfig, "from_pretrained", unreachable)
    for handler in logging.getLogger("huggingface_hub").handlers:  # as outside pytest: its records reach stderr
        monkeypatch.setattr(handler, "stream", sys.stderr)
    assert main(["convert", "someone/model", *MERGE, "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("retrofit: error: ") and "neither a local folder nor a reachable Hub model id" in err
    assert len(err.splitlines()) == 1 and "Retrying" not in err


def test_a_ctrl_c_while_the_cli_exits_prints_no_traceback():
    """A Ctrl-C that arrives after the command finished, while the libraries' exit handlers run (the user pressing
    it just as "wrote ..." appears), changes nothing and prints nothing."""
    script = """if True:
        import atexit, os, signal, sys
        from retrofit.cli import main
        def late_ctrl_c():  # registered last, so it runs first of the exit handlers
            os.kill(os.getpid(), signal.SIGINT)
            sum(range(1000))  # the interrupt lands here
        atexit.register(late_ctrl_c)
        sys.argv = ["retrofit", "sweep", "vit-b16", "--after-layer", "3", "--tokens", "8", "--dry-run"]
        sys.exit(main())
    """
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "KeyboardInterrupt" not in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("name", ["SIGTERM", "SIGHUP"])
def test_sigterm_and_sighup_stop_a_command_as_ctrl_c_does(tiny_vit, tmp_path, name):
    """`kill`, `timeout`, a job scheduler (SIGTERM) or a closed terminal (SIGHUP) ended a command at once, without a
    word (exit 143 or 129), its temporary folder, a whole model, left beside the output for good. They now stop it as
    Ctrl-C does: cleaned up, one line, exit 128 + the signal."""
    import signal

    number = int(getattr(signal, name))
    script = f"""if True:
        import os, signal, sys
        import retrofit.atomic
        from retrofit.cli import main
        signal.signal({number}, signal.SIG_DFL)  # as in a terminal (nohup, CI's runner, ignore SIGHUP)
        real = retrofit.atomic._sync_folder
        def signalled(path):  # the export written into its temporary folder, not yet in place
            os.kill(os.getpid(), {number})
            return real(path)
        retrofit.atomic._sync_folder = signalled
        sys.exit(main(["convert", {str(tiny_vit)!r}, "--after-layer", "2", "--tokens", "4", "--output",
                       {str(tmp_path / "o")!r}]))
    """
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 128 + number and done.stderr.splitlines()[-1] == f"retrofit: stopped ({name})"
    assert "Traceback" not in done.stderr and list(tmp_path.iterdir()) == []  # no .o.tmp-* left, no output


@pytest.mark.skipif(sys.platform != "linux", reason="renameat2(RENAME_EXCHANGE) is Linux's")
def test_a_sigkill_while_overwrite_swaps_the_output_leaves_an_export_in_place(tiny_vit, tmp_path):
    """`--overwrite` moved the old export aside, then the new one in: a SIGKILL (the OOM killer, a preempted job)
    between the two renames left no export at the output path, the old one hidden in a .o.old-* folder. On Linux the
    two now trade places in one step: killed just after it, the new export is in place."""
    out = tmp_path / "o"
    assert main(["convert", str(tiny_vit), "--after-layer", "2", "--tokens", "4", "--output", str(out)]) == 0
    script = f"""if True:
        import os
        import retrofit.atomic as atomic
        from retrofit.cli import main
        out, real_replace, real_exchange = {str(out)!r}, os.replace, atomic._exchange
        def killed_after(change):  # the process dies right after its first change to the output path
            def changed(src, dst, *args):
                done = change(src, dst, *args)
                if out in (os.fspath(src), os.fspath(dst)):
                    os._exit(137)
                return done
            return changed
        os.replace, atomic._exchange = killed_after(real_replace), killed_after(real_exchange)
        main(["convert", {str(tiny_vit)!r}, "--after-layer", "3", "--tokens", "4", "--output", out, "--overwrite"])
    """
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 137, done.stderr
    assert json.loads((out / "config.json").read_text())["merge_after_layer"] == 3  # the new export, whole


def test_the_python_api_names_its_own_argument(tiny_vit, tmp_path):
    (tmp_path / "o").mkdir()
    with pytest.raises(RetrofitError, match=r"already exists; .*pass --overwrite \(overwrite=True in Python\)"):
        convert(tiny_vit, after_layer=2, num_tokens=4, output=tmp_path / "o")


# ---------------------------------------------------------------------------------------------------------------
# 7. Consistency
# ---------------------------------------------------------------------------------------------------------------


def test_ce_accepts_class_names_as_evaluate_does(tiny_vit, colours, tmp_path, capsys):
    from test_data import make_labelled_folder

    data = make_labelled_folder(tmp_path / "named", Path(colours), ["cat", "dog", "bird", "cat", "dog", "bird"])
    assert main(["evaluate", str(tiny_vit), "--data", data, "--split", "train"]) == 0
    few = {**FAST, "batch_size": 2}
    result = finetune(tiny_vit, output=tmp_path / "o", after_layer=2, num_tokens=4, data=data, loss="ce",
                      eval_split=None, max_steps=1, **few)  # fmt: skip
    assert result.steps == 1
    other = make_labelled_folder(tmp_path / "fish", Path(colours), ["cat", "fish", "bird", "cat"])
    with pytest.raises(RetrofitError, match=r"\['fish'\]\) are not among .*pass --num-labels 3"):
        finetune(tiny_vit, output=tmp_path / "o2", after_layer=2, num_tokens=4, data=other, loss="ce",
                 eval_split=None, max_steps=1, **few)  # fmt: skip


def test_a_report_or_plot_never_goes_into_a_folder_retrofit_wrote(tiny_vit, export_dir, tmp_path, capsys):
    """`bench other --plot EXPORT/speed.png --overwrite` replaced an export's card figure (pushed with it) with a
    plot of another model, because retrofit had drawn that file: a --json or --plot file inside an export, a
    pretrained baseline or a sweep folder is refused before any work, whoever drew it."""
    export = tmp_path / "vit-pm"
    shutil.copytree(export_dir, export)
    (export / "notes.json").write_text("{}")
    before = tree(export)
    quick = ["--warmup", "1", "--repeats", "1", "--min-time", "0", "--latency-iters", "0", "--batch-size", "1"]
    for option, name in (("--plot", "speed.png"), ("--json", "notes.json"), ("--json", "new.json")):
        err = refused(capsys, "bench", tiny_vit, option, export / name, "--overwrite", *quick)
        inside = f"is inside a retrofit export ('{export.resolve()}'), whose files are its own (the card's, pushed"
        assert inside in err
    err = refused(capsys, "evaluate", tiny_vit, "--data", "fashion-mnist", "--json", export / "r.json")
    assert "is inside a retrofit export" in err
    assert tree(export) == before


def test_no_output_folder_goes_into_a_folder_retrofit_wrote(tiny_vit, export_dir, tmp_path, capsys):
    """`sweep -o EXPORT/sub` or `convert -o EXPORT/sub` wrote into the export: the sub-folder was pushed with it, and
    the export's own --overwrite then refused 'files retrofit did not write (sub)'. Any output or checkpoint folder
    inside an export, a pretrained baseline or a sweep report, at any depth, is refused before any work."""
    export = tmp_path / "vit-pm"
    shutil.copytree(export_dir, export)
    before = tree(export)
    merge = ["--after-layer", "2", "--tokens", "4"]
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "link").symlink_to(export)
    for target in (export / "sub", export / "a" / "b", tmp_path / "work" / "link" / "out"):
        err = refused(capsys, "convert", tiny_vit, *merge, "-o", target)
        assert f"output '{target}' is inside a retrofit export ('{export.resolve()}')" in err
    err = refused(capsys, "sweep", tiny_vit, "--after-layer", "2", "--tokens", "4", "--data", "fashion-mnist",
                  "-o", export / "sweep")  # fmt: skip
    assert "is inside a retrofit export" in err
    err = refused(capsys, "finetune", tiny_vit, *merge, "--data", "fashion-mnist", "-o", tmp_path / "ft",
                  "--checkpoint-dir", export / "ck")  # fmt: skip
    assert f"--checkpoint-dir '{export / 'ck'}' is inside a retrofit export" in err
    for folder in (export, tmp_path / "work" / "link"):  # the export itself (its run.json, step-* were its files)
        err = refused(capsys, "finetune", tiny_vit, *merge, "--data", "fashion-mnist", "-o", tmp_path / "ft",
                      "--checkpoint-dir", folder)  # fmt: skip
        assert f"--checkpoint-dir '{folder}' is a retrofit export, whose files are its own" in err
    assert tree(export) == before
    assert main(["convert", str(tiny_vit), *merge, "-o", str(export), "--overwrite"]) == 0  # still its own to replace
    assert main(["convert", str(tiny_vit), *merge, "-o", str(export / ".." / "beside")]) == 0  # next to it: fine


def test_a_report_writes_nan_as_null_so_that_it_stays_json(tmp_path):
    """Python writes NaN and Infinity, which JSON readers other than Python's refuse: a report holds null."""
    path = retrofit.atomic.write_report(tmp_path / "r.json", {"loss": float("nan"), "rows": [{"x": float("inf")}]},
                                        kind="test")  # fmt: skip
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text)["loss"] is None and json.loads(text)["rows"] == [{"x": None}]


@pytest.mark.parametrize(
    "given, published",
    [
        ("C:/Users/me/models/vit-pm", "vit-pm"),
        ("C:\\Users\\me\\models\\vit-pm", "vit-pm"),
        ("\\\\server\\share\\vit-pm", "vit-pm"),
        ("google/vit-base-patch16-224", "google/vit-base-patch16-224"),
        ("retrofit:fashion-mnist-vit", "retrofit:fashion-mnist-vit"),
    ],
)
def test_a_windows_path_is_published_by_its_name_alone(given, published):
    """A path written on Windows (a drive, or backslashes) named a user's folders in what is pushed, where a POSIX
    path was already cut to its last part; Hub ids and shipped names stay as they are."""
    assert retrofit.provenance.public_name(given) == published


def test_a_rank_that_is_not_a_number_takes_no_lock_and_no_traceback(tiny_vit, tmp_path, monkeypatch):
    """`RANK` is set by launchers; a value that is not a number (a stray variable) raised a ValueError traceback in
    every command that writes (the lock reads it): such a process takes no lock, like any process but the first."""
    monkeypatch.setenv("RANK", "abc")
    assert main(["convert", str(tiny_vit), "--after-layer", "2", "--tokens", "4", "--output", str(tmp_path / "o")]) == 0
    assert not retrofit.atomic._HELD


def test_a_step_folder_that_is_no_checkpoint_is_refused_by_the_main_process_only(tmp_path, monkeypatch):
    """A ``step-NNNNNNNN`` that is no whole checkpoint is refused before any work, by the main process: another
    process of `accelerate launch` may look while the main one renames checkpoints away for --overwrite, and must not
    refuse those (its refusal would stop the launch)."""
    from retrofit.checkpoints import check_checkpoints

    (tmp_path / "step-00000002").mkdir()
    try:
        with pytest.raises(RetrofitError, match=r"step-00000002' is named like a checkpoint but is not a whole one"):
            check_checkpoints(tmp_path, resume=False, overwrite=True)
    finally:
        retrofit.atomic.release_write_lock(tmp_path)
    monkeypatch.setenv("RANK", "1")
    assert check_checkpoints(tmp_path, resume=False, overwrite=True) == []


def test_a_signal_inside_a_finalizer_stops_the_run_in_one_line_not_a_traceback(monkeypatch):
    """SIGTERM landing in a library's __del__ (`evaluate`'s metric modules, freed after an in-training evaluation)
    was raised there: Python printed "Exception ignored" and a traceback above retrofit's one line. The handler
    only remembers it there; the run stops at its next `check_interrupted`."""
    import gc
    import os
    import signal

    from retrofit import errors

    class Metric:
        def __del__(self) -> None:
            os.kill(os.getpid(), signal.SIGTERM)

    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        pytest.skip("SIGTERM has a handler of the caller's here, which the CLI leaves alone")
    ignored = []  # what Python prints as "Exception ignored in: ..." goes through this hook
    monkeypatch.setattr(sys, "unraisablehook", ignored.append)
    with errors.interrupts_watched():
        metric = Metric()
        del metric
        gc.collect()
        with pytest.raises(errors.Stopped):
            errors.check_interrupted()
    assert ignored == []


def test_a_signal_remembered_in_a_finalizer_is_not_lost_by_a_command_that_writes_nothing(tiny_vit, capsys, monkeypatch):
    """A SIGTERM remembered inside a __del__ (tqdm's, as evaluate read the data) was never acted on: the command
    printed its table and exited 0. It exits 143 with its one line."""
    import importlib
    import signal

    from retrofit import errors

    convert_module = importlib.import_module("retrofit.convert")
    real = convert_module.insert_patch_merger

    class Bar:
        def __del__(self) -> None:
            errors.interrupt(signal.SIGTERM, sys._getframe())  # the handler, called where the signal landed

    def merge_after_a_finalizer(*args, **kwargs):
        Bar()
        return real(*args, **kwargs)

    monkeypatch.setattr(convert_module, "insert_patch_merger", merge_after_a_finalizer)
    assert main(["convert", str(tiny_vit), "--after-layer", "2", "--tokens", "4"]) == 143
    assert capsys.readouterr().err.strip().endswith("retrofit: stopped (SIGTERM)")


def test_a_ctrl_c_a_library_swallowed_still_stops_the_command_before_it_writes(tiny_vit, tmp_path, capsys, monkeypatch):
    """Ctrl-C landing in a weakref callback or a __del__ is printed by Python as "Exception ignored" and the run goes
    on: `sweep --method finetune` went on to write its output. The CLI's handler remembers it, and the command stops
    (exit 130) before its output takes its place; the next command starts afresh, and so does Python's handler."""
    import importlib
    import signal

    from retrofit import errors

    convert_module = importlib.import_module("retrofit.convert")  # `retrofit.convert` is the function
    real = convert_module.insert_patch_merger

    def merge_in_a_callback(*args, **kwargs):
        try:
            errors.interrupt()  # what the handler does when Ctrl-C comes ...
        except KeyboardInterrupt:
            pass  # ... and a library's callback swallowing it
        return real(*args, **kwargs)

    argv = ["convert", str(tiny_vit), "--after-layer", "2", "--tokens", "4", "--output", str(tmp_path / "o")]
    handler = signal.signal(signal.SIGINT, signal.default_int_handler)  # a background job (CI) starts with SIG_IGN
    try:
        with monkeypatch.context() as patch:
            patch.setattr(convert_module, "insert_patch_merger", merge_in_a_callback)
            assert main(argv) == 130
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Python's handler is back
    finally:
        signal.signal(signal.SIGINT, handler)
    assert "retrofit: interrupted" in capsys.readouterr().err and not (tmp_path / "o").exists()
    assert list(tmp_path.iterdir()) == []  # no temporary folder left either
    assert main(argv) == 0 and (tmp_path / "o" / "config.json").exists()


def test_a_ctrl_c_while_a_checkpoint_is_written_leaves_no_half_written_folder(tiny_vit, colours, tmp_path,
                                                                               monkeypatch):  # fmt: skip
    """Ctrl-C as Accelerate wrote a checkpoint left its `.step-N.tmp` folder behind (a failed write did not)."""
    import accelerate

    real = accelerate.Accelerator.save_state

    def interrupted(self, output_dir, **kwargs):
        real(self, output_dir, **kwargs)
        raise KeyboardInterrupt  # Ctrl-C as the last file was written

    monkeypatch.setattr(accelerate.Accelerator, "save_state", interrupted)
    with pytest.raises(KeyboardInterrupt):
        finetune(tiny_vit, output=tmp_path / "o", after_layer=2, num_tokens=4, data=colours, max_steps=2, **FAST)
    assert [path.name for path in (tmp_path / "o-checkpoints").iterdir()] == ["run.json"]


def test_an_output_through_a_link_and_dot_dot_is_where_the_system_puts_it(tiny_vit, colours, tmp_path, monkeypatch):
    """``--output LINK/../o`` is beside LINK's target for the system, but Python's lexical abspath (tempfile's, the
    lock's) put it beside LINK: a fine-tune passed every check, trained, and failed at its first checkpoint naming a
    path never given, its empty checkpoint folder left behind; a second run on the real folder was not locked out."""
    from retrofit.settings import physical_path

    (tmp_path / "elsewhere" / "dir").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere" / "dir")
    monkeypatch.chdir(tmp_path)
    assert physical_path("link/../o") == str(tmp_path / "elsewhere" / "o")
    result = finetune(tiny_vit, output="link/../o", after_layer=2, num_tokens=4, data=colours, max_steps=2, **FAST)
    assert result.output == tmp_path / "elsewhere" / "o" and (result.output / "config.json").is_file()
    assert sorted(path.name for path in (tmp_path / "elsewhere").iterdir()) == ["dir", "o", "o-checkpoints"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["elsewhere", "link"]  # nothing beside the link
    argv = ["evaluate", str(tiny_vit), "link/../o", "--data", colours, "--limit", "4", "--card", "link/../o"]
    assert main(argv) == 0  # --card through the link too (it was "cannot write in it")
    assert "model-index" in (result.output / "README.md").read_text()


def test_a_held_signal_whose_line_cannot_be_written_still_waits_for_the_step():
    """SIGHUP from a closed terminal during export-onnx: the line saying the signal is held could not be written
    (EIO), and the OSError raised inside torch.onnx was reported as the export's failure. The step goes on, then the
    command stops."""
    import os
    import signal

    from retrofit.errors import interrupts_deferred

    def closed_terminal(line: str) -> None:
        raise OSError(5, "Input/output error")

    went_on = []
    handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt), interrupts_deferred("the step", closed_terminal):
            os.kill(os.getpid(), signal.SIGINT)
            went_on.append(True)
    finally:
        signal.signal(signal.SIGINT, handler)
    assert went_on


def test_a_ctrl_c_while_overwrite_swaps_the_output_leaves_no_half_deleted_export(tiny_vit, tmp_path, capsys):
    """Ctrl-C while `convert --overwrite` removed the export it had just replaced stopped the removal: the old export
    was left half-deleted in a hidden `.o.old-*` folder that nothing removes. The swap and the removal now finish
    first, then the command stops (exit 130), its new export in place, nothing beside it."""
    import os
    import signal

    import retrofit.atomic

    argv = ["convert", str(tiny_vit), "--after-layer", "2", "--tokens", "4", "--output", str(tmp_path / "o")]
    assert main(argv) == 0
    real = retrofit.atomic.shutil.rmtree
    interrupted = []

    def removal_interrupted(path, *args, **kwargs):
        if (".o.old-" in str(path) or ".o.tmp-" in str(path)) and not interrupted:
            interrupted.append(path)
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C lands in the removal of the replaced export (swapped out)
        return real(path, *args, **kwargs)

    handler = signal.signal(signal.SIGINT, signal.default_int_handler)  # a background job (CI) starts with SIG_IGN
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(retrofit.atomic.shutil, "rmtree", removal_interrupted)
            assert main([*argv[:3], "3", *argv[4:], "--overwrite"]) == 130
    finally:
        signal.signal(signal.SIGINT, handler)
    err = capsys.readouterr().err
    assert interrupted and "stopping once the new output is in place" in err and "retrofit: interrupted" in err
    assert json.loads((tmp_path / "o" / "config.json").read_text())["merge_after_layer"] == 3  # the new export, whole
    assert [path.name for path in tmp_path.iterdir()] == ["o"]  # no hidden half of the old one


def test_a_ctrl_c_a_library_swallowed_stops_onnx_plots_and_cards_before_they_are_written(
    export_dir, tmp_path, capsys, monkeypatch
):
    """The same for the writers outside `atomic_dir`: export-onnx wrote its graph, bench its --plot and the card of
    --card (bench, evaluate) after a swallowed Ctrl-C."""
    import signal

    import retrofit.benchmark
    import retrofit.deploy
    from retrofit import errors

    def swallowing(real):
        def step(*args, **kwargs):
            try:
                errors.interrupt()
            except KeyboardInterrupt:
                pass
            return real(*args, **kwargs)

        return step

    export = tmp_path / "export"
    shutil.copytree(export_dir, export)
    card = tree(export)
    bench = [
        "bench",
        export,
        "--batch-size",
        "1,2",
        "--warmup",
        "1",
        "--repeats",
        "1",
        "--min-time",
        "0",
        "--latency-iters",
        "1",
    ]
    runs = [(retrofit.deploy, "_export", ["export-onnx", export, "-o", tmp_path / "m.onnx"]),
            (retrofit.benchmark, "run_benchmark", [*bench, "--plot", tmp_path / "p.png"]),
            (retrofit.benchmark, "run_benchmark", [*bench, "--card", export])]  # fmt: skip
    handler = signal.signal(signal.SIGINT, signal.default_int_handler)  # a background job (CI) starts with SIG_IGN
    try:
        for module, name, argv in runs:
            with monkeypatch.context() as patch:
                patch.setattr(module, name, swallowing(getattr(module, name)))
                assert main([str(a) for a in argv]) == 130, argv[0]
    finally:
        signal.signal(signal.SIGINT, handler)
    assert capsys.readouterr().err.count("retrofit: interrupted") == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"] and tree(export) == card


def test_an_output_that_climbs_out_of_a_missing_folder_is_refused_before_any_work(
    tiny_vit, tmp_path, monkeypatch, capsys
):
    """`-o x/../y` with no x: the checks asked the system about 'x/../y' (nothing there), the run made x at its end and
    then found y, a user's folder: refused after all the work, or, with --overwrite, checked as nothing at all."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    merge = ["--after-layer", "2", "--tokens", "4"]
    for argv in (
        ["convert", str(tiny_vit), *merge, "--output", "nox/../mine", "--overwrite"],
        ["evaluate", str(tiny_vit), "--data", "fashion-mnist", "--limit", "2", "--json", "nox/../mine/r.json"],
    ):
        capsys.readouterr()
        assert main(argv) == 2
        error = capsys.readouterr().err
        assert error.count("\n") == 1 and "climbs ('..') out of 'nox', which does not exist" in error, error
    assert not (tmp_path / "nox").exists() and [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]
    assert main(["convert", str(tiny_vit), *merge, "--output", "mine/../pm"]) == 0 and Path("pm/config.json").is_file()


def test_atomic_writes_recheck_at_the_end_and_share_what_they_write(tmp_path):
    """`write_report` never replaces a file that appeared after its check, a file that is not a report, or (with
    `same_kind`) another command's report; `atomic_dir` checks its output again before the rename (a user's file put
    there meanwhile stays) and leaves its files readable by all (0644, folders 0755), temporary ones included."""
    import stat
    import tempfile

    from retrofit.atomic import atomic_dir, write_report

    report = tmp_path / "r.json"
    report.write_text('{"mine": 1}')
    for overwrite in (False, True):
        with pytest.raises(RetrofitError):
            write_report(report, {"a": 1}, overwrite, kind="bench")
    write_report(tmp_path / "e.json", {"a": 1}, kind="evaluate")
    with pytest.raises(RetrofitError, match="not this run's"):
        write_report(tmp_path / "e.json", {"a": 2}, True, kind="bench", same_kind=True)
    assert report.read_text() == '{"mine": 1}' and json.loads((tmp_path / "e.json").read_text())["a"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.json", "r.json"]

    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(RetrofitError), atomic_dir(out, overwrite=True) as work:
        (out / "notes.txt").write_text("the user's")
    assert (out / "notes.txt").read_text() == "the user's"
    with atomic_dir(tmp_path / "shared") as work:
        tempfile.mkstemp(dir=work)
        tempfile.mkdtemp(dir=work)
    modes = {stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "shared").rglob("*")}
    assert modes == {0o644, 0o755}


def test_what_a_write_publishes_is_on_the_disk_before_the_rename(tmp_path, monkeypatch):
    """Written whole or not at all after a power loss too: a rename can reach the disk before the data it
    publishes, leaving an empty or partial file under the final name. Every file of an `atomic_dir` folder, of
    `write_files` and of `write_report` is fsync'd before the rename that publishes it, and the folder it lands in
    after it."""
    from retrofit.atomic import SWEEP, atomic_dir, write_files, write_report

    events: list[tuple[str, str]] = []
    real_fsync, real_replace, real_link = os.fsync, os.replace, os.link

    def fsync(fd):
        events.append(("sync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("rename", str(src)))
        real_replace(src, dst)

    def link(src, dst):
        events.append(("rename", str(src)))
        real_link(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "link", link)

    def synced_before_renamed(expected_files: int) -> None:
        renamed = next(i for i, (what, _) in enumerate(events) if what == "rename")
        source = events[renamed][1]
        synced = [path for what, path in events[:renamed] if what == "sync" and path.startswith(source)]
        assert len(synced) >= expected_files, events
        assert ("sync", str(tmp_path)) in events[renamed:], events  # the rename itself
        events.clear()

    with atomic_dir(tmp_path / "sweep", kind=SWEEP) as folder:
        for name in ("sweep.json", "sweep.md"):
            (folder / name).write_text("{}")  # closed without a sync, as save_pretrained leaves its files
    synced_before_renamed(2 + 1)  # both files and the folder
    write_files({tmp_path / "a.txt": "a", tmp_path / "b.txt": b"b"})
    assert [what for what, _ in events].count("sync") >= 3
    assert events.index(("sync", str(tmp_path))) > max(i for i, (what, _) in enumerate(events) if what == "rename")
    first_rename = next(i for i, (what, _) in enumerate(events) if what == "rename")
    assert sum(what == "sync" for what, _ in events[:first_rename]) == 2  # both files, before either is renamed
    events.clear()
    write_report(tmp_path / "r.json", {"x": 1}, kind="evaluate")
    assert [what for what, _ in events] == ["sync", "rename", "sync"] and events[-1] == ("sync", str(tmp_path))


def test_the_checkpoint_folder_keeps_to_what_retrofit_wrote_there(tmp_path, monkeypatch):
    """The bookkeeping under --resume, --overwrite and pruning, without a run: a link named like a checkpoint, or a
    folder with an older retrofit's pickled progress but no weights, is no checkpoint (it is the user's: never
    listed, moved or deleted), nor is a linked run.json a run record; --overwrite deletes retrofit's run.json and
    unfinished folders, not the user's whose names only begin like those (``step-N-copy``); an older retrofit's
    checkpoint (no file list) owns its moving average; a deleted checkpoint holding a user's file loses its
    progress.json first (killed meanwhile, what is left is no checkpoint, never a part of one) and the folders its
    files were in; and a position at the end of a one-step epoch is a position."""
    from retrofit.checkpoints import (
        Progress,
        discard_checkpoint,
        is_checkpoint,
        read_run_record,
        remove_checkpoints,
        retrofit_files,
    )

    folder = tmp_path / "checkpoints"
    folder.mkdir()
    elsewhere = tmp_path / "elsewhere"  # a whole checkpoint outside the folder, and a run record
    elsewhere.mkdir()
    (elsewhere / "model.safetensors").write_bytes(b"weights")
    (elsewhere / "progress.json").write_text(json.dumps({"step": 1, "epoch": 0, "batch": 1, "files": []}))
    record = {"architecture": "ViTForImageClassification", "merge_after_layer": 2, "merge_num_tokens": 4}
    (elsewhere / "run.json").write_text(json.dumps(record))
    (folder / "step-00000001").symlink_to(elsewhere, target_is_directory=True)
    (folder / "run.json").symlink_to(elsewhere / "run.json")
    pickled = folder / "step-00000002"
    pickled.mkdir()
    (pickled / "custom_checkpoint_0.pkl").write_bytes(b"mine")
    assert not is_checkpoint(folder / "step-00000001") and not is_checkpoint(pickled)
    assert read_run_record(folder) is None
    remove_checkpoints(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["run.json", "step-00000001", "step-00000002"]
    assert sorted(p.name for p in elsewhere.iterdir()) == ["model.safetensors", "progress.json", "run.json"]
    (folder / "run.json").unlink()  # retrofit's own run.json and unfinished folders go, a link of that name stays
    (folder / "run.json").write_text(json.dumps(record))
    (folder / ".step-00000005.tmp").mkdir()
    (folder / ".step-00000006.old.tmp").mkdir()
    (folder / ".step-00000007.tmp").symlink_to(elsewhere, target_is_directory=True)
    (folder / ".step-00000008.tmp-mine").mkdir()  # names that only begin like retrofit's are the user's
    shutil.copytree(elsewhere, folder / "step-00000009-copy")
    remove_checkpoints(folder)
    kept = [".step-00000007.tmp", ".step-00000008.tmp-mine", "step-00000001", "step-00000002", "step-00000009-copy"]
    assert sorted(p.name for p in folder.iterdir()) == kept
    assert sorted(p.name for p in (folder / "step-00000009-copy").iterdir()) == sorted(os.listdir(elsewhere))

    older = tmp_path / "older" / "step-00000004"  # written by a retrofit that listed no files
    older.mkdir(parents=True)
    for name in ("model.safetensors", "ema.safetensors", "random_states_0.pkl"):
        (older / name).write_bytes(b"")
    (older / "progress.json").write_text(json.dumps({"step": 4, "epoch": 1, "batch": 0}))
    assert retrofit_files(older) == {"model.safetensors", "ema.safetensors", "random_states_0.pkl", "progress.json"}

    checkpoint = folder / "step-00000003"
    (checkpoint / "sub").mkdir(parents=True)
    for name in ("model.safetensors", "optimizer.bin", "sub/extra.bin"):
        (checkpoint / name).write_bytes(b"")
    files = ["model.safetensors", "optimizer.bin", "progress.json", "sub/extra.bin"]
    (checkpoint / "progress.json").write_text(json.dumps({"step": 3, "epoch": 0, "batch": 3, "files": files}))
    (checkpoint / "notes.txt").write_text("mine")
    real_unlink, unlinked = Path.unlink, []

    def killed_at_the_second(path, *args, **kwargs):
        if unlinked:
            raise OSError("killed")
        unlinked.append(path.name)
        real_unlink(path, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(Path, "unlink", killed_at_the_second)
        with pytest.raises(OSError, match="killed"):
            discard_checkpoint(checkpoint)
    assert unlinked == ["progress.json"] and not is_checkpoint(checkpoint)
    (checkpoint / "progress.json").write_text(json.dumps({"step": 3, "epoch": 0, "batch": 3, "files": files}))
    said: list[str] = []
    discard_checkpoint(checkpoint, said.append)
    assert sorted(p.name for p in checkpoint.iterdir()) == ["notes.txt"] and len(said) == 1

    progress = Progress()  # one step per epoch: after step 1, epoch 1 begins
    progress.load_state_dict({"step": 1, "epoch": 1, "batch": 0})
    assert (progress.step, progress.epoch, progress.batch) == (1, 1, 0)


def test_resume_compares_every_recorded_setting_but_the_budget_output_and_start(tmp_path, monkeypatch):
    """`check_same_run` against a run.json, without a run: each setting the weights depend on, an option or a
    caller's own record (pretraining's model config, by key) that differs is refused in one line naming it; the
    budget, the output and the card's line on the merger's start are not compared (the run keeps or repeats them),
    nor is a key of a config only one side has (another transformers release). A budget that is not one (warm-up past
    the steps, no step) was edited since, and so was a folder of listing checkpoints without its run.json. A fine-tune
    records each option that shapes the weights, and none of the budget's (kept from run.json) or of the ones that
    leave the weights as they are."""
    from dataclasses import replace
    from types import SimpleNamespace

    from retrofit.checkpoints import check_same_run, recorded_budget, resume_owns_output, training_options
    from retrofit.settings import FinetuneArgs

    saved = {"architecture": "ViTForImageClassification", "num_labels": 3, "merge_after_layer": 2,
             "merge_num_tokens": 4, "merge_rope_positions": "mean", "train": "all", "ema_decay": 0.5,
             "options": {"--lr": 0.001, "--loss": "kd", "--grad-accum": 1, "--teacher": "/t"},
             "model": {"hidden_size": 16, "layer_norm_eps": 1e-12}, "budget": {"steps": 4, "warmup": 1, "why": "w"},
             "output": "/out", "init": "random"}  # fmt: skip
    (tmp_path / "run.json").write_text(json.dumps(saved))
    same = {**saved, "budget": {"steps": 9, "warmup": 0, "why": "x"}, "output": "/elsewhere", "init": "k-means",
            "model": {"hidden_size": 16, "only_in_this_release": True}}  # fmt: skip
    check_same_run(tmp_path, same)
    changes = [
        ({"num_labels": 5}, "a run with --num-labels 3, not 5"),
        ({"merge_rope_positions": "none"}, "a run with --rope-positions mean, not none"),
        ({"ema_decay": 0.0}, "a run with --ema-decay 0.5, not 0.0"),
        ({"merge_after_layer": None, "merge_num_tokens": None}, r"a fine-tune \(a merged model\), not"),
        ({"options": {**saved["options"], "--lr": 0.01}}, "a run with --lr 0.001, not 0.01"),
        ({"options": {**saved["options"], "--teacher": "/u"}}, "a run with --teacher '/t', not '/u'"),
        ({"model": {"hidden_size": 32}}, "a run with model.hidden_size 16, not 32"),
    ]
    for change, message in changes:
        with pytest.raises(RetrofitError, match=f"holds checkpoints of {message}"):
            check_same_run(tmp_path, {**same, **change})
    for budget in ({"steps": 2, "warmup": 3}, {"steps": 0, "warmup": 0}):
        (tmp_path / "run.json").write_text(json.dumps({**saved, "budget": budget}))
        with pytest.raises(RetrofitError, match="records no usable budget"):
            recorded_budget(tmp_path)
    (tmp_path / "run.json").write_text(json.dumps({**saved, "budget": {"steps": 1, "warmup": 1}}))
    assert recorded_budget(tmp_path) == {"steps": 1, "warmup": 1}
    # what a fine-tune records of its options: each setting that shapes the weights, and none of the budget's
    run = FinetuneArgs(source="s", data="d", after_layer=2, tokens=4, output="o")
    model = SimpleNamespace(config=SimpleNamespace(to_dict=lambda: {"hidden_size": 16}))
    processor = SimpleNamespace(to_dict=lambda: {"image_mean": [0.5]})

    class Images(list):  # training images held in the data, not files (files: test_train's resume tests)
        dataset = None

    monkeypatch.setattr("retrofit.data.image_files_digest", lambda dataset: None)
    options = training_options(model, run, 1, Images([0] * 24), processor)
    shaping = dict(data="e", split="other", image_column="img", label_column="y", limit=5, sample=5, augment=True,
                   loss="ce", function_matching=True, temperature=3.0, alpha=0.1, feature_weight=1.0,
                   prompt_weight=1.0, prompt_templates=("a {}.",), lr=0.1, merger_lr_scale=2.0, weight_decay=0.0,
                   batch_size=8, grad_accum=2, max_grad_norm=0.5, mixed_precision="bf16", seed=1, calibrate=False,
                   teacher="t")  # fmt: skip
    for name, value in shaping.items():
        assert training_options(model, replace(run, **{name: value}), 1, Images([0] * 24), processor) != options, name
    assert training_options(model, run, 2, Images([0] * 24), processor) != options
    assert training_options(model, run, 1, Images([0] * 25), processor) != options
    budget = dict(max_steps=9, epochs=9.0, min_steps=9, warmup_ratio=0.5, eval_every=1, save_every=1,
                  keep_checkpoints=9, num_workers=3, gradient_checkpointing=True)  # fmt: skip
    assert training_options(model, replace(run, **budget), 1, Images([0] * 24), processor) == options
    checkpoint = tmp_path / "step-00000002"
    checkpoint.mkdir()
    (checkpoint / "progress.json").write_text(json.dumps({"step": 2, "epoch": 0, "batch": 2, "files": []}))
    (checkpoint / "model.safetensors").write_bytes(b"weights")
    (tmp_path / "run.json").unlink()
    with pytest.raises(RetrofitError, match=r"run.json' is missing: retrofit wrote it with the checkpoints there"):
        check_same_run(tmp_path, same)
    # an older run.json names no output: the resumed run owns the one its folder is named after, and no other
    older = tmp_path / "o-checkpoints"
    older.mkdir()
    (older / "run.json").write_text(json.dumps({k: v for k, v in saved.items() if k != "output"}))
    (tmp_path / "o").mkdir()
    (tmp_path / "mine").mkdir()
    assert resume_owns_output(older, tmp_path / "o")
    with pytest.raises(RetrofitError, match=r"--resume replaces only its own run's output"):
        resume_owns_output(older, tmp_path / "mine")


def test_a_process_of_the_launch_gone_mid_checkpoint_is_not_called_a_full_disk(tmp_path, monkeypatch):
    """A rank killed while the others saved a checkpoint: gloo's "Connection reset by peer" came out as "cannot write
    checkpoint ...; check the free space". It reaches the CLI, which says another process of the launch stopped."""
    from types import SimpleNamespace

    from retrofit.checkpoints import Progress, save_checkpoint

    def save_state(path, **kwargs):
        raise RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error: Connection reset by peer")

    accelerator = SimpleNamespace(is_main_process=True, wait_for_everyone=lambda: None, save_state=save_state)
    progress = Progress()
    progress.step = 2
    with pytest.raises(RetrofitError, match="check the free space"):  # one process: no launch to blame
        save_checkpoint(accelerator, tmp_path / "one", progress, 2, {})
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="Connection reset by peer"):
        save_checkpoint(accelerator, tmp_path / "two", progress, 2, {})
    assert not [path for path in (tmp_path / "two").iterdir() if path.name.startswith(".step-")]


def test_a_checkpoint_is_saved_beside_the_users_files_and_never_over_them(tmp_path):
    """`save_checkpoint` with a stand-in for Accelerate: run.json is written with the first checkpoint only (a resumed
    run's would replace the record of how its run started), progress.json lists what retrofit wrote, the newest
    --keep-checkpoints stay, and a ``step-NNNNNNNN`` of the user's made meanwhile at the step it saves is refused,
    nothing of it deleted. A damaged checkpoint's error names the newest older one to resume from."""
    from types import SimpleNamespace

    from retrofit.checkpoints import Progress, load_checkpoint, save_checkpoint

    def save_state(path, **kwargs):
        (Path(path) / "model.safetensors").write_bytes(b"weights")

    accelerator = SimpleNamespace(is_main_process=True, wait_for_everyone=lambda: None, save_state=save_state)
    progress = Progress()
    for step in (1, 2, 3):
        progress.step = step
        save_checkpoint(accelerator, tmp_path, progress, 2, {"started": step})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json", "step-00000002", "step-00000003"]
    assert json.loads((tmp_path / "run.json").read_text()) == {"started": 1}
    listed = json.loads((tmp_path / "step-00000003" / "progress.json").read_text())["files"]
    assert listed == ["model.safetensors", "progress.json"]
    mine = tmp_path / "step-00000004"
    mine.mkdir()
    (mine / "model.safetensors").write_text("mine")
    progress.step = 4
    with pytest.raises(RetrofitError, match=r"step-00000004' exists and is not a retrofit checkpoint; move it out"):
        save_checkpoint(accelerator, tmp_path, progress, 2, {"started": 4})
    assert (mine / "model.safetensors").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json", "step-00000002", "step-00000003", "step-00000004"]
    (tmp_path / "step-00000003" / "progress.json").write_text("{}")  # damaged: the newest older one is named
    older = [tmp_path / "step-00000001", tmp_path / "step-00000002"]
    with pytest.raises(
        RetrofitError, match=r"step-00000003' is damaged \(KeyError: .*\); delete it to resume from step-00000002,"
    ):
        load_checkpoint(accelerator, tmp_path / "step-00000003", Progress(), older)
