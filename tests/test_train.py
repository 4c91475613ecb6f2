"""The fine-tune loop: it learns, exports a loadable Hub folder, resumes bit-for-bit, stops on NaN, checks labels."""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY, save_tiny
from safetensors.torch import load_file, save_file
from test_data import make_imagefolder, make_labelled_folder
from transformers import ViTConfig, ViTForImageClassification

import retrofit.losses as losses
import retrofit.train as train_module
from retrofit import insert_patch_merger
from retrofit.checkpoints import list_checkpoints
from retrofit.cli import main
from retrofit.errors import RetrofitError
from retrofit.finetune import finetune
from retrofit.loading import load_model
from retrofit.settings import TrainSettings
from retrofit.train import param_groups

# min_steps 0: an --epochs budget of the tiny data is taken as it is (the 1,000-step floor is tested on its own)
FAST = dict(batch_size=8, save_every=2, progress=False, eval_batch_size=12, min_steps=0)


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    return str(make_imagefolder(tmp_path_factory.mktemp("train-data") / "colours", per_class=8, test_per_class=4))


def weights(folder) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def test_ce_finetune_learns_and_exports(tiny_vit, colours, tmp_path):
    out = tmp_path / "pm"
    result = finetune(
        tiny_vit,
        output=out,
        after_layer=2,
        num_tokens=4,
        data=colours,
        loss="ce",
        epochs=6,
        lr=3e-3,
        eval_at_start=True,
        **FAST,
    )
    history = [h["accuracy"] for h in result.eval_history]
    assert history[-1] > history[0] and history[-1] >= 0.75, history
    assert result.steps == 18 and result.final_accuracy == history[-1]
    assert {"config.json", "model.safetensors", "README.md", "preprocessor_config.json"} <= {
        p.name for p in out.iterdir()
    }
    assert not any(p.name.startswith("step-") for p in out.iterdir())  # checkpoints live next to it, not inside
    assert [p.name for p in list_checkpoints(tmp_path / "pm-checkpoints")] == ["step-00000016", "step-00000018"]
    assert "fine-tuned on" in (out / "README.md").read_text()
    assert "loss: ce (cross-entropy on labels)" in (out / "README.md").read_text()
    assert "- merger initialisation: calibrated: k-means of the layer-2 tokens of " in (out / "README.md").read_text()
    reloaded = load_model(out)
    assert torch.equal(reloaded.patch_merger.queries, result.model.patch_merger.queries)


def test_resuming_a_finished_run_keeps_its_export_and_scores_new_images_anew(tiny_vit, colours, tmp_path):
    """A job run again with --resume after it finished rewrote the export: the notes a user wrote into its card and
    the results `evaluate --card` put there were gone. Resumed with another --eval-limit (or none), the card and the
    result gave the checkpoints' last score, of other images, under the new images' name."""
    settings = dict(after_layer=2, num_tokens=4, data=colours, loss="mix", max_steps=2, eval_every=2, eval_limit=6,
                    **FAST)  # fmt: skip
    out = tmp_path / "pm"
    first = finetune(tiny_vit, output=out, **settings)
    assert first.final_evaluation["examples"] == 6
    card = out / "README.md"
    card.write_text(card.read_text() + "\n## My notes\n\nServed at batch 8 since Monday.\n")
    said: list[str] = []
    again = finetune(tiny_vit, output=out, resume=True, log=said.append, **settings)
    assert again.steps == 2 and "Served at batch 8 since Monday." in card.read_text()
    assert f"'{out}' already holds this model (the run had finished): left as it is, its card and results kept" in said
    rescored = finetune(tiny_vit, output=out, resume=True, log=said.append, **{**settings, "eval_limit": None})
    assert rescored.final_evaluation["examples"] == 12 and rescored.final_evaluation["step"] == 2
    assert any("the checkpoints' evaluations scored other images than this run does" in line for line in said)
    unscored = finetune(tiny_vit, output=out, resume=True, **{**settings, "eval_split": ""})
    assert unscored.final_evaluation == {} and unscored.eval_history == []
    (out / "NOTES.txt").write_text("mine")  # refused before training: this run could write other weights over it
    with pytest.raises(RetrofitError, match=r"\(NOTES.txt\), which replacing it \(--overwrite, or --resume of the run"):
        finetune(tiny_vit, output=out, resume=True, **settings)


def test_a_checkpoint_whose_optimizer_or_schedule_is_not_this_runs_is_refused(tiny_vit, colours, tmp_path):
    """A checkpoint of a run with another --lr, copied into this run's folder, resumed at its learning rate while the
    card named this run's; optimizer moments of other shapes (another --tokens) stopped the first step with a
    traceback; a schedule edited past the steps taken was taken as it was."""
    settings = dict(after_layer=2, num_tokens=4, data=colours, loss="ce", max_steps=4, stop_after=2, **FAST)
    finetune(tiny_vit, output=tmp_path / "other", **{**settings, "lr": 1e-3})
    finetune(tiny_vit, output=tmp_path / "five", **{**settings, "num_tokens": 5})
    step = "step-00000002"

    def resumed_with(name: str, source: Path) -> str:
        out = tmp_path / name
        finetune(tiny_vit, output=out, **settings)
        shutil.copy(source, tmp_path / f"{name}-checkpoints" / step / source.name)
        with pytest.raises(RetrofitError) as refused:
            finetune(tiny_vit, output=out, resume=True, **{**settings, "stop_after": None})
        return str(refused.value)

    said = resumed_with("lr", tmp_path / "other-checkpoints" / step / "optimizer.bin")
    assert "was written by a run of another learning rate or weight decay (lr, weight decay: 0.001" in said
    said = resumed_with("shapes", tmp_path / "five-checkpoints" / step / "optimizer.bin")
    assert "is damaged" in said and "is for no parameter of this model" in said
    schedule = torch.load(tmp_path / "lr-checkpoints" / step / "scheduler.bin", weights_only=True)
    schedule["last_epoch"] = 10**6
    torch.save(schedule, tmp_path / "edited.bin")
    said = resumed_with("schedule", (tmp_path / "edited.bin").rename(tmp_path / "scheduler.bin"))
    assert "its scheduler has taken 1000000 steps, more than the run's 2" in said


def test_resume_names_the_damaged_checkpoints_not_the_output(tiny_vit, colours, tmp_path):
    """With every checkpoint damaged (progress.json gone), --resume said the output exists and to pass --overwrite,
    which throws the checkpoints away; it names them."""
    settings = dict(after_layer=2, num_tokens=4, data=colours, loss="ce", max_steps=2, **FAST)
    finetune(tiny_vit, output=tmp_path / "pm", **settings)
    (tmp_path / "pm-checkpoints" / "step-00000002" / "progress.json").unlink()
    with pytest.raises(RetrofitError, match=r"step-00000002' is named like a checkpoint but is not a whole one"):
        finetune(tiny_vit, output=tmp_path / "pm", resume=True, **settings)
    # weights emptied in every checkpoint: "damaged; delete it to resume from step-00000001", which was too
    finetune(tiny_vit, output=tmp_path / "two", **{**settings, "save_every": 1})
    for step in ("step-00000001", "step-00000002"):
        (tmp_path / "two-checkpoints" / step / "model.safetensors").write_bytes(b"")
    with pytest.raises(RetrofitError, match=r"step-00000001' is named like a checkpoint but is not a whole one"):
        finetune(tiny_vit, output=tmp_path / "two", resume=True, **settings)


def test_resume_reaches_the_same_weights(tiny_vit, colours, tmp_path):
    """A resumed run ends with the weights of an uninterrupted one (resumed from the middle of an epoch or its end),
    and keeps the budget its first run chose (run.json), here raised by --min-steps, even when the options it is
    resumed with would choose another."""
    settings = dict(after_layer=2, num_tokens=4, data=colours, loss="mix", epochs=1, augment=True, eval_every=2,
                    **FAST)  # fmt: skip
    settings["min_steps"] = 6  # one epoch is 3 steps: raised to 6
    full = finetune(tiny_vit, output=tmp_path / "full", **settings)
    assert full.steps == 6
    # Interrupted after step 3 (after checkpoint 2): what a SIGKILL between checkpoints leaves behind.
    partial = finetune(tiny_vit, output=tmp_path / "cut", stop_after=3, **settings)
    assert partial.steps == 3 and partial.output is None and not (tmp_path / "cut").exists()
    checkpoints = tmp_path / "cut-checkpoints"
    shutil.copytree(checkpoints, tmp_path / "end-checkpoints")  # step 3 ends an epoch: its position is batch 3 of 3
    shutil.rmtree(checkpoints / "step-00000003")
    (checkpoints / ".step-00000004.tmp").mkdir()  # a half-written checkpoint of a killed run is ignored ...
    (checkpoints / ".step-00000001.old.tmp").mkdir()  # ... and so is a half-deleted one
    (checkpoints / ".step-00000001.old.tmp" / "optimizer.bin").write_bytes(b"")
    with pytest.raises(RetrofitError, match="--resume"):
        finetune(tiny_vit, output=tmp_path / "cut", **settings)
    said: list[str] = []
    others = {"min_steps": 0, "warmup_ratio": 0.5}  # a budget of 3 steps, 1 of them warm-up: the first one's is kept
    resumed = finetune(tiny_vit, output=tmp_path / "cut", resume=True, log=said.append, **{**settings, **others})
    assert resumed.steps == 6 and resumed.budget.warmup == 0
    assert not list(checkpoints.glob(".step-*"))  # and then deleted: they stayed there for good
    for name in ("full", "cut"):  # the card said "warm-up ratio 0.5" of the resumed run, which kept the first's
        assert ", 0 warm-up steps, " in (tmp_path / name / "README.md").read_text(), name
    assert (
        "training 6 steps (0 warm-up), the budget this run started with (its checkpoints' run.json), not the 3 (1 "
        "warm-up) these options give: pass --overwrite to start over with them"
    ) in said
    budget = json.loads((checkpoints / "run.json").read_text())["budget"]
    assert budget["steps"] == 6 and "below --min-steps 6" in budget["why"]
    expected, got = weights(tmp_path / "full"), weights(tmp_path / "cut")
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-6, msg=name)
    # resumed from the checkpoint at the end of an epoch (refused as damaged, or its next epoch skipped, it would not)
    assert finetune(tiny_vit, output=tmp_path / "end", resume=True, **settings).steps == 6
    got = weights(tmp_path / "end")
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-6, msg=name)
    # the resumed run's card names the calibration its checkpoints started from (it had lost the images and scores)
    init = [next(line for line in (tmp_path / name / "README.md").read_text().splitlines()
                 if line.startswith("- merger initialisation: ")) for name in ("full", "cut")]  # fmt: skip
    assert "k-means of the layer-2 tokens of 24 images of" in init[0] and init[1] == f"{init[0]} (the run was resumed)"
    # The evaluations before the interruption are kept (a recipe's before/after table lost its rows).
    assert [entry["step"] for entry in full.eval_history] == [2, 4, 6]
    assert resumed.eval_history == full.eval_history


def test_evaluating_during_training_leaves_the_trained_weights_alone(colours, tmp_path):
    """With dropout, the weights depended on the evaluation settings (--eval-every, --eval-split, eval_at_start),
    which the docs say leave them as they are: each pass over the evaluation data drew from torch's generator, and
    the dropout masks after it changed."""
    torch.manual_seed(0)
    source = save_tiny(ViTForImageClassification(ViTConfig(**TINY, hidden_dropout_prob=0.1)), tmp_path / "dropout")
    settings = dict(after_layer=2, num_tokens=4, data=colours, loss="mix", max_steps=3, lr=1e-3, **FAST)
    finetune(source, output=tmp_path / "evaluated", eval_every=1, eval_at_start=True, **settings)
    finetune(source, output=tmp_path / "not", eval_split=None, **settings)
    evaluated, plain = weights(tmp_path / "evaluated"), weights(tmp_path / "not")
    assert all(torch.equal(evaluated[name], plain[name]) for name in plain)


def test_ema_exports_the_moving_average_of_the_weights(tiny_vit, colours, tmp_path):
    """--ema-decay: the live weights train as without it; the run evaluates last, and exports, the bias-corrected
    moving average of the weights after each step (step j of n weighted by decay ** (n - j): the start's weights get
    none), which every checkpoint holds as safetensors; the card says so."""
    decay, steps = 0.6, 4
    settings = dict(after_layer=2, num_tokens=4, data=colours, loss="kd", max_steps=steps, lr=1e-3,
                    **{**FAST, "save_every": 1, "keep_checkpoints": steps})  # fmt: skip
    said: list[str] = []
    result = finetune(tiny_vit, output=tmp_path / "ema", ema_decay=decay, log=said.append, **settings)
    checkpoints = list_checkpoints(tmp_path / "ema-checkpoints")
    assert [p.name for p in checkpoints] == [f"step-{n:08d}" for n in range(1, steps + 1)]
    live = [load_file(str(p / "model.safetensors")) for p in checkpoints]  # the weights after steps 1..4
    averaged = load_file(str(checkpoints[-1] / "ema.safetensors"))
    exported = load_model(tmp_path / "ema").state_dict()  # names as in memory (the file keeps the source's)
    assert len(averaged) == len(dict(result.model.named_parameters()))  # --train all: every weight
    norm = sum(decay ** (steps - j) for j in range(1, steps + 1))
    for name, tensor in averaged.items():
        expected = sum(decay ** (steps - j) * live[j - 1][name] for j in range(1, steps + 1)) / norm
        torch.testing.assert_close(tensor, expected, rtol=0, atol=1e-6, msg=name)
        assert torch.equal(exported[name], tensor), name
    assert sum(not torch.equal(exported[name], live[-1][name]) for name in averaged) > len(averaged) / 2
    assert result.eval_history[-1]["step"] == steps and result.eval_history[-1]["weights"] == "moving average"
    assert any(line.startswith(f"step {steps}: eval accuracy (the moving average of the weights) ") for line in said)
    assert any(line.endswith("; exports the moving average of the weights (--ema-decay 0.6)") for line in said)
    assert "weights: the moving average over training (--ema-decay 0.6)" in (tmp_path / "ema" / "README.md").read_text()
    plain = finetune(tiny_vit, output=tmp_path / "plain", **settings)  # the same live weights, exported as they are
    assert "weights" not in plain.eval_history[-1]
    assert not (list_checkpoints(tmp_path / "plain-checkpoints")[-1] / "ema.safetensors").exists()
    for name, tensor in load_model(tmp_path / "plain").state_dict().items():
        assert torch.equal(tensor, live[-1][name]), name


def test_resume_with_ema_reaches_the_same_average(tiny_vit, colours, tmp_path):
    """A resumed --ema-decay run exports the same average as an uninterrupted one (the average is in the checkpoint);
    resuming with another --ema-decay, or with one from checkpoints that hold no average, is one line."""
    settings = dict(after_layer=2, num_tokens=4, data=colours, loss="kd", max_steps=6, augment=True, **FAST)
    finetune(tiny_vit, output=tmp_path / "full", ema_decay=0.7, **settings)
    finetune(tiny_vit, output=tmp_path / "cut", ema_decay=0.7, stop_after=3, **settings)
    checkpoints = tmp_path / "cut-checkpoints"
    shutil.rmtree(checkpoints / "step-00000003")  # resumed from step 2
    message = r"holds checkpoints of a run with --ema-decay 0.7, not 0.0: resume with --ema-decay 0.7, or pass"
    with pytest.raises(RetrofitError, match=message):
        finetune(tiny_vit, output=tmp_path / "cut", resume=True, **settings)
    resumed = finetune(tiny_vit, output=tmp_path / "cut", ema_decay=0.7, resume=True, **settings)
    assert resumed.steps == 6
    expected, got = weights(tmp_path / "full"), weights(tmp_path / "cut")
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
    # checkpoints of a retrofit from before --ema-decay (no ema_decay in run.json, no average) cannot resume with it
    finetune(tiny_vit, output=tmp_path / "old", stop_after=2, **settings)
    run = json.loads((tmp_path / "old-checkpoints" / "run.json").read_text())
    (tmp_path / "old-checkpoints" / "run.json").write_text(
        json.dumps({k: v for k, v in run.items() if k != "ema_decay"})
    )
    message = r"^checkpoint '.*step-00000002' holds no moving average of the weights \(its run had no --ema-decay\)"
    with pytest.raises(RetrofitError, match=message):
        finetune(tiny_vit, output=tmp_path / "old", ema_decay=0.7, resume=True, **settings)


def test_resume_refuses_checkpoints_of_other_merge_settings(tiny_vit, colours, tmp_path, monkeypatch):
    """Checkpoints remember what they were trained for (run.json): resuming them with another --tokens or --train,
    or with another source, data, seed, batch size or number of processes (which resumed silently, and the card named
    only the new settings), is a one-line error naming the flag, not a state-dict traceback, and the checkpoints stay
    as they were. The data given by another path to the same folder is the same run. Older checkpoint folders without
    run.json get a one-line error from loading the state."""
    from transformers import ViTConfig, ViTForImageClassification

    settings = dict(after_layer=2, data=colours, loss="ce", max_steps=4, **FAST)
    finetune(tiny_vit, output=tmp_path / "out", num_tokens=4, stop_after=2, **settings)
    checkpoints = tmp_path / "out-checkpoints"
    assert json.loads((checkpoints / "run.json").read_text())["merge_num_tokens"] == 4
    before = sorted(p.name for p in checkpoints.iterdir())
    message = r"^'.*out-checkpoints' holds checkpoints of a run with --tokens 4, not 5: resume with --tokens 4, or"
    with pytest.raises(RetrofitError, match=message):
        finetune(tiny_vit, output=tmp_path / "out", num_tokens=5, resume=True, **settings)
    with pytest.raises(RetrofitError, match="a run with --train all, not merger-and-after: resume with --train all"):
        finetune(tiny_vit, output=tmp_path / "out", num_tokens=4, resume=True, train="merger-and-after", **settings)
    torch.manual_seed(7)  # the same architecture and labels, other weights
    other = save_tiny(ViTForImageClassification(ViTConfig(**TINY)), tmp_path / "other-vit")
    refusals = [
        (other, {}, r"a run with SOURCE's weights \(sha256\) '[0-9a-f]{64}', not '[0-9a-f]{64}'"),
        (tiny_vit, {"seed": 1}, "a run with --seed 0, not 1"),
        (tiny_vit, {"batch_size": 4}, "a run with --batch-size 8, not 4"),
        # the checkpoints hold the calibrated merger, but the card said "merger initialisation: random"
        (tiny_vit, {"calibrate": False}, "a run with --calibrate True, not False"),
        (
            tiny_vit,
            {"data": shutil.copytree(colours, tmp_path / "copy")},
            f"a run with --data '{colours}', not '{tmp_path}/copy'",
        ),
    ]
    with monkeypatch.context() as patch:  # refused before calibrating
        patch.setattr(importlib.import_module("retrofit.finetune"), "_calibrate", lambda *a, **k: pytest.fail("work"))
        for source, change, message in refusals:
            with pytest.raises(
                RetrofitError, match=f"^'.*out-checkpoints' holds checkpoints of {message}: resume with"
            ):
                finetune(source, output=tmp_path / "out", num_tokens=4, resume=True, **{**settings, **change})
        # the data folder changed since (it resumed on other data, at a position in another order of it)
        extra = Path(colours) / "train" / "cat" / "extra.png"
        shutil.copy(extra.with_name("0.png"), extra)
        try:
            message = r"of a run with training images \(--data, --split\) 24, not 25: resume with"
            with pytest.raises(RetrofitError, match=message):
                finetune(tiny_vit, output=tmp_path / "out", num_tokens=4, resume=True, **settings)
        finally:
            extra.unlink()
    record = (checkpoints / "run.json").read_text()
    launched = json.loads(record)
    launched["options"]["accelerate launch --num_processes"] = 2  # as `accelerate launch --num_processes 2` writes
    (checkpoints / "run.json").write_text(json.dumps(launched))
    with pytest.raises(RetrofitError, match="a run with accelerate launch --num_processes 2, not 1: resume with"):
        finetune(tiny_vit, output=tmp_path / "out", num_tokens=4, resume=True, **settings)
    (checkpoints / "run.json").write_text(record)
    assert sorted(p.name for p in checkpoints.iterdir()) == before
    monkeypatch.chdir(os.path.dirname(colours))
    same = finetune(tiny_vit, output=tmp_path / "out", num_tokens=4, resume=True, stop_after=3,
                    **{**settings, "data": os.path.basename(colours)})  # fmt: skip
    assert same.steps == 3
    shutil.rmtree(checkpoints / "step-00000003")
    (checkpoints / "run.json").unlink()  # deleted since: it resumed another --seed, --lr, --data... without a word
    with pytest.raises(RetrofitError, match=r"run.json' is missing: retrofit wrote it with the checkpoints .*; put it"):
        finetune(tiny_vit, output=tmp_path / "out", num_tokens=4, resume=True, **{**settings, "seed": 1})
    progress = checkpoints / "step-00000002" / "progress.json"  # as an older retrofit wrote it, without run.json
    progress.write_text(json.dumps({k: v for k, v in json.loads(progress.read_text()).items() if k != "files"}))
    with pytest.raises(RetrofitError, match=r"does not fit this run \(Error\(s\) in loading state_dict .*\); resume"):
        finetune(tiny_vit, output=tmp_path / "out", num_tokens=5, resume=True, **settings)
    with pytest.raises(RetrofitError, match=r"step-00000002' is past this run's budget of 1 step; resume with --max"):
        finetune(tiny_vit, output=tmp_path / "out", num_tokens=4, resume=True, **{**settings, "max_steps": 1})
    ended = finetune(tiny_vit, output=tmp_path / "out", num_tokens=4, resume=True, **{**settings, "max_steps": 2})
    assert ended.steps == 2 and ended.finished  # a checkpoint at the end of its budget is not past it
    resumed = finetune(tiny_vit, output=tmp_path / "out", num_tokens=4, resume=True, **settings)
    assert resumed.steps == 4


def test_gradient_accumulation_matches_the_larger_batch(tiny_vit, colours, tmp_path):
    """Two accumulated batches of 4 make the same optimizer steps as batches of 8: same data order, loss averaged."""
    settings = dict(after_layer=2, num_tokens=4, data=colours, loss="ce", max_steps=3, lr=1e-3, **FAST)
    settings.pop("batch_size")
    big = finetune(tiny_vit, output=tmp_path / "big", batch_size=8, **settings)
    accumulated = finetune(tiny_vit, output=tmp_path / "acc", batch_size=4, grad_accum=2, **settings)
    assert big.steps == accumulated.steps == 3
    expected, got = weights(tmp_path / "big"), weights(tmp_path / "acc")
    changed = [
        name for name in expected if not torch.equal(expected[name], weights(tiny_vit).get(name, expected[name]))
    ]
    assert changed  # the runs trained
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-5, msg=name)


def test_gradient_checkpointing_recomputes_layers_and_reaches_the_same_weights(
    tiny_vit, colours, tmp_path, monkeypatch
):
    """--gradient-checkpointing re-runs the encoder layers (the merging one included) in the backward pass and
    trains to the same weights as a run that keeps the activations."""
    from transformers.models.vit.modeling_vit import ViTMLP

    calls = {"n": 0}
    forward = ViTMLP.forward

    def counting(self, *args, **kwargs):
        if torch.is_grad_enabled():  # training passes, not evaluation or the teacher
            calls["n"] += 1
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(ViTMLP, "forward", counting)
    settings = dict(after_layer=2, num_tokens=4, data=colours, max_steps=2, lr=1e-3, eval_split=None, **FAST)
    runs = {}
    for flag in (False, True):
        calls["n"] = 0
        finetune(tiny_vit, output=tmp_path / str(flag), gradient_checkpointing=flag, calibrate=False, **settings)
        runs[flag] = calls["n"]
    assert runs[True] == 2 * runs[False] > 0  # each layer's MLP runs again in the backward pass
    expected, got = weights(tmp_path / "False"), weights(tmp_path / "True")
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-6, msg=name)
    config = json.loads((tmp_path / "True" / "config.json").read_text())
    assert "gradient_checkpointing" not in config  # a training setting, not part of the published model


def test_sample_and_calibration_images_are_seeded_shuffled_subsets(tiny_vit, colours, tmp_path, monkeypatch, capsys):
    """The card names the images trained on and the settings that shape the weights: it said "fine-tuned on `colours`
    for 2 steps (1.0 epochs)" of a sample of 16 of its 24 images, and named neither --augment nor the optimizer's
    other settings, so its numbers could not be reproduced from it. The merger's k-means start drew its images from
    the whole split, not from the N images of --limit N trained on."""
    from transformers import AutoConfig

    import retrofit.calibrate
    import retrofit.data
    from retrofit.data import make_dataloader
    from retrofit.loading import load_image_processor

    asked, real = [], retrofit.data.load_split
    monkeypatch.setattr(retrofit.data, "load_split", lambda *a, **kw: asked.append(kw) or real(*a, **kw))
    calibrated_on, calibrate = [], retrofit.calibrate.calibrate
    monkeypatch.setattr(
        retrofit.calibrate, "calibrate", lambda m, p, **kw: calibrated_on.append(p) or calibrate(m, p, **kw)
    )
    settings = dict(after_layer=2, num_tokens=4, data=colours, epochs=1, eval_split=None, **FAST)
    result = finetune(tiny_vit, output=tmp_path / "pm", sample=16, seed=3, calibrate_images=5, augment=True,
                      weight_decay=0.1, merger_lr_scale=3, **settings)  # fmt: skip
    assert result.steps == 2  # 16 of the 24 training images, batch 8
    assert [(kw["limit"], kw["sample_seed"]) for kw in asked] == [(16, 3)]  # loaded once: calibration draws from it
    # k-means saw 5 of the 16 images trained on: the sample's first 5
    config = AutoConfig.from_pretrained(tiny_vit)
    processor = load_image_processor(str(tiny_vit), config, log=lambda _: None)

    def images(**chosen) -> torch.Tensor:
        dataset = real(colours, "train", label_column=None, **chosen)
        return next(iter(make_dataloader(dataset, processor, batch_size=len(dataset))))["pixel_values"]

    torch.testing.assert_close(calibrated_on.pop(), images(limit=16, sample_seed=3)[:5], rtol=0, atol=0)
    card = (tmp_path / "pm" / "README.md").read_text()
    assert "k-means of the layer-2 tokens of 5 images of" in card
    assert "(train split, a shuffled sample, seed 3, from the 16 images trained on)" in card
    assert "- fine-tuned on `colours` train (a shuffled sample of 16 images, seed 3) for 2 steps (1.0 epochs)" in card
    assert (
        "- trained: all; lr 0.0002 (the merger's ×3), weight decay 0.1, 0 warm-up steps, gradient norm clipped at "
        "1, batch 8x1, augmented (random resized crops and horizontal flips), seed 3\n"
    ) in card
    # --limit 4: all 4 of those first images (5 of the whole split's 24 before), said on the card
    finetune(tiny_vit, output=tmp_path / "first", limit=4, seed=3, calibrate_images=5, **{**settings, "batch_size": 4})
    assert sorted(calibrated_on.pop().flatten(1).tolist()) == sorted(images(limit=4).flatten(1).tolist())
    assert "from the 4 images trained on" in (tmp_path / "first" / "README.md").read_text()
    capsys.readouterr()
    # --limit with --sample, no calibration images: one line each, nothing written
    base = ["finetune", str(tiny_vit), "--after-layer", "2", "--tokens", "4", "--data", colours]
    assert main([*base, "--output", str(tmp_path / "both"), "--limit", "8", "--sample", "8"]) == 2
    assert main([*base, "--output", str(tmp_path / "both"), "--calibrate-images", "0"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert "--limit (the first N images) and --sample" in err[0] and "--calibrate-images must be at least 1" in err[1]
    assert not (tmp_path / "both").exists()


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_reaches_the_same_weights(tiny_vit, colours, tmp_path):
    """A real `kill -9` of `retrofit finetune` at some moment between checkpoints: nothing half-written is used, no
    export appears, and `--resume` ends with the weights of a run that was never interrupted."""
    args = ["finetune", str(tiny_vit), "--after-layer", "2", "--tokens", "4", "--data", colours, "--loss", "mix",
            "--max-steps", "150", "--batch-size", "8", "--save-every", "5", "--augment"]  # fmt: skip
    killed, checkpoints = tmp_path / "killed", tmp_path / "killed-checkpoints"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    # the threads of this process (conftest caps them at 2), which resumes the run and trains the straight one: on a
    # machine with more cores the killed run had more, whose reductions round otherwise
    env["OMP_NUM_THREADS"] = str(torch.get_num_threads())
    process = subprocess.Popen(
        [sys.executable, "-m", "retrofit", *args, "--output", str(killed)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        done = list_checkpoints(checkpoints) if checkpoints.exists() else []
        if done and int(done[-1].name.split("-")[1]) >= 15:
            break
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "the run ended before it could be killed; give it more steps"
    assert not killed.exists()
    steps_kept = int(list_checkpoints(checkpoints)[-1].name.split("-")[1])
    assert 15 <= steps_kept < 150
    assert main([*args, "--output", str(killed), "--resume"]) == 0
    assert main([*args, "--output", str(tmp_path / "straight")]) == 0
    expected, got = weights(tmp_path / "straight"), weights(killed)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-6, msg=name)


def test_kd_needs_no_labels_and_merger_and_after_freezes_the_start(tiny_vit, colours, tmp_path):
    result = finetune(
        tiny_vit,
        output=tmp_path / "kd",
        after_layer=2,
        num_tokens=4,
        data=colours,
        loss="kd",
        label_column=None,
        train="merger-and-after",
        epochs=1,
        lr=1e-2,
        calibrate=False,
        **FAST,
    )
    source = load_model(tiny_vit)
    trained = result.model
    for name, tensor in source.vit.layers[0].state_dict().items():
        assert torch.equal(trained.vit.layers[0].state_dict()[name], tensor), name
    assert torch.equal(trained.vit.embeddings.cls_token, source.vit.embeddings.cls_token)
    assert not torch.equal(trained.classifier.weight, source.classifier.weight)
    assert "loss: kd from the unmerged model (T = 2)\n" in (tmp_path / "kd" / "README.md").read_text()  # logits only


def test_the_teacher_is_the_unmerged_source_with_weights_of_its_own(tiny_vit, colours, tmp_path):
    """kd distils the source as it was: the teacher is unmerged and shares no tensor with the student (the merged
    model shares the source's), so training the student cannot move its target."""
    from retrofit.atomic import releases_write_locks
    from retrofit.finetune import prepare
    from retrofit.settings import FinetuneArgs

    args = FinetuneArgs(source=str(tiny_vit), output=str(tmp_path / "o"), data=colours, after_layer=2, tokens=4,
                        calibrate=False, batch_size=8)  # fmt: skip
    ready = releases_write_locks(prepare)(args, log=lambda _: None)
    student = {tensor.data_ptr() for tensor in ready.model.state_dict().values()}
    assert not any(tensor.data_ptr() in student for tensor in ready.teacher.state_dict().values())
    assert not hasattr(ready.teacher, "patch_merger") and not ready.teacher.training
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ready.teacher(pixel_values=pixels).logits,
                                   load_model(tiny_vit).eval()(pixel_values=pixels).logits)  # fmt: skip


def test_a_run_stopped_before_its_export_uploads_nothing(monkeypatch):
    """--push-to-hub uploads the export `finish` wrote; a run stopped early (`stop_after`, to be resumed) wrote none."""
    import retrofit.push
    from retrofit.finetune import publish
    from retrofit.settings import FinetuneArgs
    from retrofit.train import TrainResult

    pushed = []
    monkeypatch.setattr(retrofit.push, "push_written", lambda *args, **kwargs: pushed.append(args))
    args = FinetuneArgs(source="s", output="o", data="d", push_to_hub="me/pm")
    publish(args, TrainResult(steps=3, epochs=0.5, last_loss=1.0), log=pytest.fail)
    assert pushed == []
    publish(args, TrainResult(steps=6, epochs=1.0, last_loss=1.0, output=Path("o"), finished=True), log=print)
    assert pushed == [("o", "me/pm")]


def test_the_merger_gets_its_own_learning_rate_and_no_weight_decay(tiny_vit):
    model = insert_patch_merger(load_model(tiny_vit), after_layer=1, num_tokens=2)
    groups = param_groups(model, TrainSettings(lr=1e-4, merger_lr_scale=10, weight_decay=0.05))
    names = {id(p): n for n, p in model.named_parameters()}
    grouped = [names[id(p)] for group in groups for p in group["params"]]
    assert sorted(grouped) == sorted(names.values())  # every parameter exactly once
    (merger,) = [g for g in groups if any("patch_merger." in names[id(p)] for p in g["params"])]
    assert merger["lr"] == pytest.approx(1e-3) and merger["weight_decay"] == 0
    assert all("patch_merger." in names[id(p)] for p in merger["params"])
    decayed = {names[id(p)] for g in groups if g["weight_decay"] for p in g["params"]}
    assert "classifier.weight" in decayed and not any(n.endswith(".bias") for n in decayed)


def test_continue_training_an_export(tiny_vit, colours, tmp_path):
    source = shutil.copytree(tiny_vit, tmp_path / "licensed")
    (source / "README.md").write_text("---\nlicense: mit\n---\n")
    first = finetune(
        source, output=tmp_path / "a", after_layer=1, num_tokens=2, data=colours, loss="kd", max_steps=2, **FAST
    )
    again = finetune(tmp_path / "a", output=tmp_path / "b", data=colours, loss="kd", max_steps=2, **FAST)
    assert again.model.config.merge_after_layer == 1 and first.output and again.output
    # the continued export keeps the license of the model it was first made from (found again by its weights)
    card = (tmp_path / "b" / "README.md").read_text()
    assert "license: mit" in card
    # its trained merger goes on training: the default --calibrate does not replace its queries by a k-means start
    assert "- merger initialisation: continued from a retrofit export" in card
    with pytest.raises(RetrofitError, match="already merged"):
        finetune(tmp_path / "a", output=tmp_path / "c", after_layer=2, num_tokens=2, data=colours, **FAST)
    with pytest.raises(RetrofitError, match=r"already merged \(after layer 1, 2 tokens\)"):  # other tokens alone
        finetune(tmp_path / "a", output=tmp_path / "c", after_layer=1, num_tokens=4, data=colours, **FAST)


def test_a_bf16_source_is_exported_in_bf16_like_it(tiny_vit, colours, tmp_path):
    from transformers import AutoModelForImageClassification

    source = tmp_path / "bf16"
    save_tiny(load_model(tiny_vit).to(torch.bfloat16), source)
    result = finetune(source, output=tmp_path / "pm", after_layer=2, num_tokens=4, data=colours, max_steps=2, **FAST)
    assert {tensor.dtype for tensor in weights(tmp_path / "pm").values()} == {torch.bfloat16}
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path / "pm", trust_remote_code=True)
    assert reloaded.dtype == torch.bfloat16
    pixels = torch.randn(2, 3, 32, 32, dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(reloaded(pixel_values=pixels).logits, result.model(pixel_values=pixels).logits)


def test_nan_loss_stops_with_the_last_good_checkpoint(tiny_vit, colours, tmp_path, monkeypatch):
    real = train_module.compute_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(train_module, "compute_loss", poisoned)
    with pytest.raises(RetrofitError, match=r"loss became nan at step 3.*step-00000002"):
        finetune(
            tiny_vit, output=tmp_path / "nan", after_layer=2, num_tokens=4, data=colours, loss="ce", epochs=2, **FAST
        )
    assert not (tmp_path / "nan").exists()
    assert [p.name for p in list_checkpoints(tmp_path / "nan-checkpoints")] == ["step-00000002"]


def test_label_mismatch_is_refused_unless_num_labels(tiny_vit, tmp_path):
    other = make_imagefolder(tmp_path / "other", per_class=4, test_per_class=2)
    (other / "train" / "bird").rename(other / "train" / "fish")
    (other / "test" / "bird").rename(other / "test" / "fish")
    with pytest.raises(RetrofitError, match="--num-labels 3"):
        finetune(tiny_vit, output=tmp_path / "x", after_layer=2, num_tokens=4, data=str(other), loss="ce", **FAST)
    assert not (tmp_path / "x").exists() and not (tmp_path / "x-checkpoints").exists()
    result = finetune(
        tiny_vit,
        output=tmp_path / "y",
        after_layer=2,
        num_tokens=4,
        data=str(other),
        loss="ce",
        num_labels=3,
        max_steps=1,
        **FAST,
    )
    assert result.model.config.id2label == {0: "cat", 1: "dog", 2: "fish"}
    config = json.loads((tmp_path / "y" / "config.json").read_text())
    assert config["id2label"] == {"0": "cat", "1": "dog", "2": "fish"}
    card = (tmp_path / "y" / "README.md").read_text()  # said nothing of the source's head being replaced
    new = "- the classifier is new (--num-labels 3): the source's own was replaced by one of 3 outputs that started at"
    assert f"{new} zero" in card


def test_cli_finetune(tiny_deit, colours, tmp_path, monkeypatch, capsys):
    import tqdm.auto

    intervals = []  # the training bar's, where stderr is no terminal (a CI log): a refresh a minute, not 10 a second

    class Bar(tqdm.auto.tqdm):
        def __init__(self, *args, **kwargs) -> None:
            if kwargs.get("desc") == "train":
                intervals.append(kwargs.get("mininterval", 0.1))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(tqdm.auto, "tqdm", Bar)
    out = tmp_path / "deit-pm"
    args = ["finetune", str(tiny_deit), "--after-layer", "2", "--tokens", "3", "--data", colours, "--output", str(out)]
    tracked = ["--report-to", "tensorboard", "--mixed-precision", "bf16"]
    assert main([*args, "--loss", "kd", "--max-steps", "2", "--batch-size", "8", "--save-every", "1", *tracked]) == 0
    assert intervals == [60]
    assert (out / "model.safetensors").exists() and len(list_checkpoints(tmp_path / "deit-pm-checkpoints")) == 2
    assert any((tmp_path / "deit-pm-checkpoints" / "logs").rglob("events.out.tfevents*"))
    assert main([*args, "--max-steps", "2"]) == 2  # output exists
    assert "already exists" in capsys.readouterr().err
    assert main([*args, "--loss", "focal"]) == 2  # checked with the other settings: one line, code 2
    assert capsys.readouterr().err.strip() == "retrofit: error: --loss must be one of kd, ce, mix, not 'focal'"


def test_feature_loss_is_relative_and_adds_to_kd():
    teacher = torch.randn(4, 16, generator=torch.Generator().manual_seed(0))
    student = teacher + 0.1 * torch.randn(4, 16, generator=torch.Generator().manual_seed(1))
    loss = losses.feature_loss(student, teacher)
    assert losses.feature_loss(teacher, teacher) == 0 and loss > 0
    torch.testing.assert_close(losses.feature_loss(10 * student, 10 * teacher), loss)  # scale-free
    logits = torch.randn(4, 3), torch.randn(4, 3)
    s, t = losses.Outputs(logits[0], student), losses.Outputs(logits[1], teacher)
    kd = losses.kd_loss(logits[0], logits[1], 2.0)
    both = losses.compute_loss(s, t, None, TrainSettings(loss="kd", feature_weight=3.0))
    torch.testing.assert_close(both, kd + 3.0 * loss)
    torch.testing.assert_close(losses.compute_loss(s, t, None, TrainSettings(loss="kd", feature_weight=0)), kd)


def test_losses_are_their_formulas_written_out():
    """kd, feature, cosine and mix losses against their definitions computed here: T² · KL(teacher ‖ student) at T,
    averaged over images; ‖s − t‖² / ‖t‖² per image; 1 − cos; alpha · ce + (1 − alpha) · (kd + w · features); a dual
    encoder's w · cosine + prompt weight · kd of the prompt logits."""
    gen = torch.Generator().manual_seed(3)
    student, teacher = torch.randn(5, 7, generator=gen) * 3, torch.randn(5, 7, generator=gen) * 3
    for t in (1.0, 3.0):
        p, q = (teacher / t).softmax(-1), (student / t).softmax(-1)
        expected = t * t * (p * (p.log() - q.log())).sum(-1).mean()
        torch.testing.assert_close(losses.kd_loss(student, teacher, t), expected)
    fs, ft = torch.randn(5, 4, generator=gen), torch.randn(5, 4, generator=gen)
    feature = ((fs - ft) ** 2).sum(-1).div((ft**2).sum(-1)).mean()
    torch.testing.assert_close(losses.feature_loss(fs, ft), feature)
    cosine = 1 - (fs * ft).sum(-1).div(fs.norm(dim=-1) * ft.norm(dim=-1)).mean()
    torch.testing.assert_close(losses.cosine_loss(fs, ft), cosine)
    labels = torch.tensor([0, 1, 2, 3, 4])
    ce = -student.log_softmax(-1)[torch.arange(5), labels].mean()
    s, te = losses.Outputs(student, fs), losses.Outputs(teacher, ft)
    mix = TrainSettings(loss="mix", alpha=0.3, temperature=3.0, feature_weight=2.0)
    kd3 = losses.kd_loss(student, teacher, 3.0)
    torch.testing.assert_close(losses.compute_loss(s, te, labels, mix), 0.3 * ce + 0.7 * (kd3 + 2.0 * feature))
    torch.testing.assert_close(losses.compute_loss(s, te, labels, TrainSettings(loss="ce")), ce)
    dual = TrainSettings(loss="kd", temperature=3.0, feature_weight=2.0, prompt_weight=0.5)
    s, te = losses.Outputs(None, fs, student), losses.Outputs(None, ft, teacher)
    got = losses.compute_loss(s, te, None, dual, embeddings=True)
    torch.testing.assert_close(got, 2.0 * cosine + 0.5 * kd3)
    logits, classes = torch.randn(4, 4, generator=gen), torch.tensor([0, 0, 1, 2])  # two images of one class
    target = torch.tensor([[0.5, 0.5, 0, 0], [0.5, 0.5, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 1.0]])
    rows = -(target * logits.log_softmax(1)).sum(1).mean()
    columns = -(target * logits.t().log_softmax(1)).sum(1).mean()
    torch.testing.assert_close(losses.contrastive_loss(logits, classes), (rows + columns) / 2)


def test_the_cards_loss_line_gives_each_term_its_own_weight():
    """The card's loss line is what training minimised: mix's kd weight is 1 − alpha (it showed alpha twice where
    alpha ≠ 0.5), a feature or cosine weight other than 1 is named, and a --teacher and function matching are said."""
    from retrofit.settings import PretrainSettings

    mix = losses.describe_loss(TrainSettings(loss="mix", alpha=0.3))
    assert mix == "mix (0.3 × ce + 0.7 × kd from the unmerged model (T = 2))"
    kd = losses.describe_loss(TrainSettings(temperature=4, feature_weight=0.5, function_matching=True), "org/big")
    assert kd.startswith("kd from `org/big` (T = 4, feature weight 0.5; function matching: teacher and student see ")
    dual = losses.describe_loss(TrainSettings(feature_weight=2.0, prompt_weight=0.5), dual_encoder=True)
    assert dual.startswith("kd from the unmerged model, label-free: 2 × cosine distance (1 − cos) of the normalised ")
    assert "+ 0.5 × KL divergence of the image-text similarity distributions" in dual and "T = 2); text tower" in dual
    plain = losses.describe_loss(TrainSettings(feature_weight=1.0), dual_encoder=True)
    assert (
        plain == "kd from the unmerged model, label-free: cosine distance (1 − cos) of the normalised image "
        "embeddings; text tower frozen"
    )
    assert "with 5 templates such as 'a photo of a {}.'" in losses.describe_loss(PretrainSettings(loss="contrastive"))


def test_the_cards_training_notes_say_how_it_was_trained():
    """The card's notes on training: no clipping where --max-grad-norm is 0 (not "clipped at 0"), the mixed
    precision, the batch and its accumulation, and the final accuracy in % (or the agreement with the teacher)."""
    from retrofit.finetune import _training_info
    from retrofit.settings import TrainingRun
    from retrofit.train import Budget, TrainResult

    run = TrainingRun(data="org/data", max_grad_norm=0, mixed_precision="bf16", grad_accum=2, batch_size=8, limit=40)
    done = TrainResult(steps=10, epochs=2.0, last_loss=0.1, eval_history=[{"step": 10, "accuracy": 0.875}],
                       budget=Budget(steps=10, warmup=1, why=""))  # fmt: skip
    info = _training_info(run, done, "random", images=40)
    assert info.notes == [
        "trained: all; lr 0.0002, weight decay 0.05, 1 warm-up step, no gradient clipping, batch 8x2, mixed "
        "precision bf16, seed 0",
        "accuracy on `org/data` test: 87.50 %",
    ]
    assert (info.images, info.steps, info.epochs) == ("train (the first 40 images)", 10, 2.0)
    unlabelled = TrainResult(steps=10, epochs=2.0, last_loss=0.1, eval_history=[{"step": 10, "agreement": 0.5}])
    notes = _training_info(TrainingRun(data="d", mixed_precision="fp16"), unlabelled, "random").notes
    assert "mixed precision fp16" in notes[0] and notes[1] == "top-1 agreement with the teacher on `d` test: 50.00 %"


@pytest.fixture(scope="module")
def tiny_clip_vision(tmp_path_factory):
    from conftest import TINY, save_tiny
    from transformers import CLIPVisionConfig, CLIPVisionModel

    keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "image_size", "patch_size")
    torch.manual_seed(3)
    model = CLIPVisionModel(CLIPVisionConfig(**{key: TINY[key] for key in keys}))
    return save_tiny(model, tmp_path_factory.mktemp("clip") / "tiny-clip-vision")


def test_a_backbone_is_distilled_through_its_pooled_output(tiny_clip_vision, colours, tmp_path, capsys):
    """A vision tower (no logits) fine-tunes with kd on its pooled output and reports its similarity to the teacher;
    losses that need logits are refused with one line and exit code 2. A recipe reports the same similarity."""
    out = tmp_path / "clip-pm"
    result = finetune(
        tiny_clip_vision, output=out, after_layer=1, num_tokens=2, data=colours, epochs=3, lr=3e-4,
        calibrate=False, eval_at_start=True, **FAST,
    )  # fmt: skip
    before, after = (h["similarity"] for h in (result.eval_history[0], result.eval_history[-1]))
    assert result.eval_history[-1]["reference"] == "teacher features" and result.final_accuracy is None
    assert before < 0.99 < after <= 1, (before, after)  # 0.975 -> 0.999 (cosine of the pooled outputs)
    assert type(load_model(out)).__name__ == "CLIPVisionPatchMergerModel"
    assert "loss: kd from the unmerged model (T = 2, feature weight 1)" in (out / "README.md").read_text()
    args = ["finetune", str(tiny_clip_vision), "--after-layer", "2", "--tokens", "3", "--data", colours]
    assert main([*args, "--output", str(tmp_path / "ce"), "--loss", "ce"]) == 2
    assert "backbone" in capsys.readouterr().err and not (tmp_path / "ce").exists()
    assert main([*args, "--output", str(tmp_path / "w0"), "--feature-weight", "0"]) == 2
    capsys.readouterr()
    recipe = tmp_path / "tower.yaml"
    recipe.write_text(
        f"source: {tiny_clip_vision}\nmerge: {{after_layer: 2, tokens: 3}}\ndata: {{name: {colours}}}\n"
        "training: {max_steps: 4, batch_size: 8, lr: 3.0e-4}\n"
        "evaluation: {batch_size: 12, speed_batch_size: 4}\n"
    )
    assert main(["run", str(recipe), "--output", str(tmp_path / "run")]) == 0
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("|")]
    assert table[0].startswith("| model | feature similarity |") and table[2].startswith("| baseline ")
    similarity = [float(line.split("|")[2]) for line in table[2:]]
    assert similarity[0] == 1 and similarity[1] < similarity[2] < 1, similarity  # fine-tuning moves it up
    assert "no training" in table[3] and "fine-tuned (4 steps, loss kd)" in table[4]
    assert "| model | feature similarity |" in (tmp_path / "run" / "README.md").read_text()


@pytest.fixture(scope="module")
def tiny_multimodal(tmp_path_factory) -> dict[str, str]:
    """A full CLIPModel (text + vision towers) and a Dinov2Model backbone, saved as their Hub checkpoints are."""
    from conftest import TINY
    from transformers import CLIPConfig, CLIPModel, Dinov2Config, Dinov2Model

    keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "image_size", "patch_size")
    vision = {key: TINY[key] for key in keys}
    text = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=99)
    root = tmp_path_factory.mktemp("tasks")
    torch.manual_seed(5)
    clip = CLIPModel(CLIPConfig(text_config=text, vision_config={**vision, "intermediate_size": 64}))
    return {
        "clip": str(save_tiny(clip, root / "tiny-clip")),
        "dinov2": str(save_tiny(Dinov2Model(Dinov2Config(**vision)), root / "tiny-dinov2")),
    }


def test_num_labels_implies_image_classification_and_agrees_with_it():
    """--num-labels gives the model a new classifier: it implies --task image-classification, takes it said too, and
    refuses another task."""
    from retrofit.finetune import task_for

    assert task_for(None, 3) == task_for("image-classification", 3) == "image-classification"
    assert task_for("image-feature-extraction", None) == "image-feature-extraction" and task_for(None, None) is None
    with pytest.raises(
        RetrofitError,
        match="^--num-labels gives the model a new classifier, which --task image-feature-extraction leaves",
    ):
        task_for("image-feature-extraction", 3)


def test_task_trains_a_vision_tower_or_a_new_classifier(tiny_multimodal, colours, tmp_path, capsys):
    """--task image-feature-extraction on a full CLIP checkpoint distils its vision tower from the unmerged tower;
    --num-labels on a DINOv2 backbone trains a new classifier; kd into a classifier the checkpoint does not have (its
    head would be random, differently in teacher and student) and contradictory tasks are one-line errors."""
    clip, dinov2 = tiny_multimodal["clip"], tiny_multimodal["dinov2"]
    tower = finetune(clip, output=tmp_path / "tower", after_layer=1, num_tokens=2, data=colours, max_steps=2,
                     task="image-feature-extraction", calibrate=False, eval_at_start=True, **FAST)  # fmt: skip
    assert tower.eval_history[0]["reference"] == "teacher features" and tower.eval_history[0]["similarity"] > 0.5
    assert type(load_model(tmp_path / "tower")).__name__ == "CLIPVisionPatchMergerModel"
    classifier = finetune(dinov2, output=tmp_path / "cls", after_layer=1, num_tokens=2, data=colours, max_steps=2,
                          loss="ce", num_labels=3, calibrate_images=8, **FAST)  # fmt: skip
    # the card says the classifier is new, and the merger is calibrated by the features it reads (the source has no
    # logits: its card said "top-1 agreement with the source" of the new, random head's)
    card = (tmp_path / "cls" / "README.md").read_text()
    assert "- the classifier is new (the checkpoint has none): its 3 outputs started at zero" in card  # (reinit_head)
    assert "; cosine similarity of the features with the source " in card and "top-1 agreement" not in card
    reloaded = load_model(tmp_path / "cls")
    assert type(reloaded).__name__ == "Dinov2PatchMergerForImageClassification" and classifier.steps == 2
    assert sorted(reloaded.config.id2label.values()) == ["bird", "cat", "dog"]  # the data's class names
    recipe = tmp_path / "clip.yaml"  # a recipe takes the task too, and reports the tower's feature similarity
    recipe.write_text(
        f"source: {clip}\nmerge: {{after_layer: 1, tokens: 2}}\ndata: {{name: {colours}}}\n"
        "training: {max_steps: 2, batch_size: 8}\nevaluation: {batch_size: 12, speed: false}\n"
    )
    capsys.readouterr()
    assert main(["run", str(recipe), "--task", "image-feature-extraction", "--output", str(tmp_path / "run")]) == 0
    assert "| model | feature similarity |" in capsys.readouterr().out
    assert type(load_model(tmp_path / "run")).__name__ == "CLIPVisionPatchMergerModel"
    # a backbone given a classifier by a recipe: the random head before training is not scored
    overrides = ["--set", "training.num_labels=3", "--loss", "ce", "--output", str(tmp_path / "run-cls")]
    assert main(["run", str(recipe), "--source", dinov2, *overrides]) == 0
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("|")]
    assert len(table) == 4 and "(its classifier is new: not scored) | n/a |" in table[2]
    assert "fine-tuned (2 steps, loss ce)" in table[3] and " % |" in table[3]

    def refused(*args: str) -> str:
        output = tmp_path / "refused"
        assert main([*args, "--after-layer", "1", "--tokens", "2", "--output", str(output)]) == 2
        assert not output.exists()
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1, err
        return err

    classify = ("--task", "image-classification")  # without it, a full CLIP checkpoint stays a dual encoder
    assert "CLIPModel checkpoint, so its classifier would be new" in refused("finetune", clip, "--data", colours,
                                                                             *classify)  # fmt: skip
    mix = refused("finetune", clip, "--data", colours, *classify, "--loss", "mix")  # mix distils the logits too
    assert "its classifier would be new and random, with no logits to distil (--loss mix)" in mix
    assert "CLIPModel checkpoint, so its classifier would be new" in refused("run", str(recipe), *classify)
    err = refused("run", str(recipe), "--set", "task=segmentation")
    assert "must be one of image-classification, image-feature-extraction, zero-shot-image-classification, not" in err
    err = refused("finetune", dinov2, "--data", colours, "--task", "image-classification")
    assert "Dinov2Model checkpoint, so its classifier would be new" in err and "--num-labels N --loss ce" in err
    err = refused("finetune", dinov2, "--data", colours, "--num-labels", "3", "--task", "image-feature-extraction")
    assert "--num-labels gives the model a new classifier" in err
    err = refused("convert", str(tmp_path / "tower"), "--task", "image-classification")
    assert "this export is an image-feature-extraction model" in err and "convert its source" in err
    err = refused("finetune", str(tmp_path / "tower"), "--data", colours, "--task", "image-classification")
    assert "this export is an image-feature-extraction model" in err


def test_evaluate_and_sweep_rank_backbones_by_feature_similarity(tiny_clip_vision, colours, tmp_path, capsys, tiny_vit):
    """Backbones have no labels: `evaluate` reports each model's feature similarity to the first one (the source
    scores 1, a merged twin less), writes it into the export's card, and refuses to mix in a classifier; `sweep`
    ranks its settings by the same similarity and names one for a target speed-up."""
    import yaml
    from huggingface_hub import ModelCard

    from retrofit import convert

    export = tmp_path / "tower-pm"
    convert(tiny_clip_vision, after_layer=2, num_tokens=3, output=export, log=lambda _: None)
    report_file = tmp_path / "eval.json"
    tower = str(tiny_clip_vision)
    args = ["evaluate", tower, str(export), "--data", colours, "--split", "test", "--batch-size", "5"]
    assert main([*args, "--json", str(report_file), "--card", str(export)]) == 0
    report = json.loads(report_file.read_text())
    source, merged = report["models"]
    assert report["metric"] == "similarity" and report["num_examples"] == 12  # every test image, counted once
    assert source["similarity"] == pytest.approx(1.0) and 0 < merged["similarity"] < 0.9999
    assert merged["merged"] and merged["gflops"] < source["gflops"]
    card = ModelCard.load(export / "README.md")
    assert "### Feature similarity" in card.text and f"{merged['similarity']:.4f}" in card.text
    index = yaml.safe_load(card.content.split("---")[1])["model-index"][0]["results"][0]
    assert index["task"]["type"] == "image-feature-extraction"
    assert index["metrics"][0] == {
        "type": "cosine_similarity",
        "value": merged["similarity"],
        "name": f"Feature cosine similarity to {tiny_clip_vision.name}",  # a local folder by name: the card is pushed
    }
    capsys.readouterr()
    assert main(["evaluate", tower, str(tiny_vit), "--data", colours, "--split", "test"]) == 2
    assert "pass models of one kind" in capsys.readouterr().err

    sweep = ["sweep", tower, "--after-layer", "1,2", "--tokens", "2,8", "--data", colours]
    sweep += ["--limit", "6", "--batch-size", "6", "--calibrate-images", "8", "--bench-batch-size", "4"]
    assert main([*sweep, "--target-speedup", "1.01", "--output", str(tmp_path / "sweep")]) == 0
    result = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert result["metric"] == "similarity" and len(result["settings_results"]) == 4
    assert all(0 < row["similarity"] <= 1 for row in result["settings_results"])
    assert "| after layer | tokens | feature similarity |" in result["table"]
    assert (tmp_path / "sweep" / "sweep.png").stat().st_size > 0


@pytest.mark.parametrize(
    "setting, message",
    [
        (dict(lr=float("nan")), "--lr must be a finite number, not nan"),
        (dict(epochs=float("inf")), "--epochs must be a finite number, not inf"),
        (dict(batch_size=16.5), "--batch-size must be a whole number, not 16.5"),
        (dict(lr="fast"), "--lr must be a finite number, not 'fast'"),
        (dict(augment="yes"), "--augment must be true or false, not 'yes'"),
        (dict(limit=True), "--limit must be a whole number, not True"),
        (dict(seed=-1), r"--seed must be in \[0, 2\*\*32\) \(got -1\)"),
        (dict(num_workers=-1), "--num-workers must be 0 or more"),
        (dict(warmup_ratio=1.0), r"--warmup-ratio must be in \[0, 1\)"),
        (dict(ema_decay=1.0), r"--ema-decay must be in \[0, 1\) \(got 1.0\)"),
        (dict(ema_decay=-0.5), r"--ema-decay must be in \[0, 1\)"),
        (dict(num_labels=-1), "--num-labels must be at least 2"),
        (dict(max_steps=0), "--max-steps must be positive"),
        (dict(min_steps=1.5), "--min-steps must be a whole number, not 1.5"),
        (dict(eval_limit=0), "--eval-limit must be at least 1"),
        (dict(), "--data is required$"),  # a Python call without it: a TypeError from the dataclass
        (dict(data="d", epochs=0), "--epochs must be positive"),  # a budget of no steps, without --max-steps
        (
            dict(data="d", loss="mix", function_matching=True),
            r"--function-matching is for --loss kd, .*\(got --loss mix\)",
        ),
    ],
)
def test_bad_training_settings_are_refused_before_any_work(setting, message, tmp_path):
    """From the CLI, a recipe or Python: wrong types, NaN/inf and out-of-range values are one-line errors, raised
    before the source is even looked at (it does not exist here)."""
    with pytest.raises(RetrofitError, match=f"^{message}"):
        finetune(tmp_path / "missing", output=tmp_path / "out", after_layer=2, num_tokens=4, **setting)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out-checkpoints").exists()
    TrainSettings(lr=1, epochs=2)  # an int where a float is expected is fine


def test_the_budget_is_raised_to_min_steps_on_small_data_and_says_why():
    """--epochs gives the steps unless they are below --min-steps (small data), which then decides; --max-steps is
    always exact; --min-steps 0 turns the floor off. The warm-up is --warmup-ratio of the steps chosen."""
    from retrofit.train import training_budget

    small = training_budget(TrainSettings(epochs=3), images=2000, steps_per_epoch=32)
    assert (small.steps, small.warmup) == (1000, 50)
    assert small.why == (
        "training 1,000 steps (31.2 epochs of 2,000 images at batch 64): --epochs 3 would be 96 steps, below "
        "--min-steps 1000 (set --max-steps for an exact budget, --min-steps 0 to turn this off)"
    )
    default = training_budget(TrainSettings(), images=2000, steps_per_epoch=32)  # --epochs 1: 32 steps
    assert default.steps == 1000 and "--epochs 1 would be 32 steps, below --min-steps 1000" in default.why
    large = training_budget(TrainSettings(epochs=3), images=60000, steps_per_epoch=938)
    assert (large.steps, large.warmup) == (2814, 140)
    assert large.why == "training 2,814 steps (3 epochs of 60,000 images at batch 64)"
    exact = training_budget(TrainSettings(epochs=3, max_steps=200), images=2000, steps_per_epoch=32)
    assert (exact.steps, exact.warmup) == (200, 10)
    assert exact.why == "training 200 steps (--max-steps: 6.25 epochs of 2,000 images at batch 64)"
    off = training_budget(TrainSettings(epochs=3, min_steps=0), images=2000, steps_per_epoch=32)
    assert (off.steps, off.warmup) == (96, 4)
    assert off.why == "training 96 steps (3 epochs of 2,000 images at batch 64, --min-steps 0)"
    # the epochs the steps are, not the --epochs they were rounded up from (it said 0.001 epochs)
    tiny = training_budget(TrainSettings(epochs=0.001, min_steps=0, batch_size=8), images=24, steps_per_epoch=3)
    assert tiny.steps == 1 and tiny.why == "training 1 step (0.333 epochs of 24 images at batch 8, --min-steps 0)"
    part = training_budget(TrainSettings(epochs=1.5, min_steps=0, batch_size=8), images=24, steps_per_epoch=3)
    assert part.why == "training 5 steps (1.67 epochs of 24 images at batch 8, --min-steps 0)"
    # the batch of one step: per process × processes × accumulated batches
    shared = training_budget(TrainSettings(batch_size=32, grad_accum=2), images=2000, steps_per_epoch=16, processes=2)
    assert shared.steps == 1000
    assert shared.why.startswith("training 1,000 steps (62.5 epochs of 2,000 images at batch 128 (32 × 2 processes × 2")
    with pytest.raises(RetrofitError, match="^--min-steps must be 0 or more"):
        TrainSettings(min_steps=-1)


def test_cli_prints_results_on_stdout_and_logs_on_stderr(tiny_vit, colours, tmp_path, capsys):
    """``retrofit evaluate ... > table.md`` keeps the table alone: each command's result (convert's cost table,
    evaluate's accuracy table, headed by the images it is on) is all its stdout holds; loading notes, the budget,
    "wrote ..." lines go to stderr. finetune's result is its export: nothing on stdout."""
    export, tuned, report = tmp_path / "pm", tmp_path / "ft", tmp_path / "report.json"
    merge = ["--after-layer", "2", "--tokens", "4"]
    assert main(["convert", str(tiny_vit), *merge, "--output", str(export)]) == 0
    out, err = capsys.readouterr()
    assert [line for line in out.splitlines() if not line.startswith("|")] == ["", out.splitlines()[-1]]
    assert out.splitlines()[-1].startswith("GFLOPs per image: ") and "tokens after" in out
    assert err.splitlines() == [f"wrote {export}"]
    argv = ["finetune", str(tiny_vit), *merge, "--data", colours, "--loss", "kd", "--max-steps", "2", "--batch-size",
            "8", "--eval-batch-size", "12", "--min-steps", "0", "--output", str(tuned)]  # fmt: skip
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert out == ""
    assert "training 2 steps (--max-steps: " in err and f"wrote {tuned} (checkpoints in " in err
    argv = ["evaluate", str(tiny_vit), str(tuned), "--data", colours, "--split", "test", "--json", str(report)]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    table = out.splitlines()  # headed by what it is on, so that the redirected table says it too
    assert table[0].startswith(f"{colours} / test: ") and table[1] == "" and table[2].startswith("| model |")
    assert all(line.startswith("|") or not line for line in table[1:])
    assert err.splitlines() == [f"wrote {report}"]


def test_finetune_prints_the_budget_it_trains(tiny_vit, colours, tmp_path, capsys):
    """The line is printed before training and the run trains what it says: raised from --epochs, or exactly
    --max-steps; the CLI takes --min-steps, and a recipe its key training.min_steps."""
    settings = dict(after_layer=2, num_tokens=4, data=colours, loss="kd", eval_split=None, calibrate=False,
                    **{**FAST, "save_every": 100, "min_steps": 5})  # fmt: skip
    said: list[str] = []
    raised = finetune(tiny_vit, output=tmp_path / "raised", epochs=1, log=said.append, **settings)
    assert raised.steps == 5 and raised.epochs == pytest.approx(5 / 3)
    assert (
        "training 5 steps (1.67 epochs of 24 images at batch 8): --epochs 1 would be 3 steps, below --min-steps 5 "
        "(set --max-steps for an exact budget, --min-steps 0 to turn this off)"
    ) in said
    assert "for 5 steps (1.667 epochs)" in (tmp_path / "raised" / "README.md").read_text()
    argv = ["finetune", str(tiny_vit), "--after-layer", "2", "--tokens", "4", "--data", colours, "--loss", "kd",
            "--eval-split", "", "--no-calibrate", "--batch-size", "8", "--min-steps", "50"]  # fmt: skip
    assert main([*argv, "--max-steps", "2", "--output", str(tmp_path / "exact")]) == 0
    assert "training 2 steps (--max-steps: 0.667 epochs of 24 images at batch 8)\n" in capsys.readouterr().err
    assert json.loads((tmp_path / "exact-checkpoints" / "run.json").read_text())["budget"]["steps"] == 2
    from pathlib import Path

    from retrofit.recipes import load_recipe

    demo = Path(__file__).resolve().parents[1] / "recipes" / "fashion-mnist.yaml"  # one epoch exactly: min_steps 0
    assert load_recipe(demo)["training"]["min_steps"] == 0
    assert load_recipe(demo, {"training.min_steps": 300})["training"]["min_steps"] == 300


def test_resume_from_a_damaged_checkpoint_is_one_line(tiny_vit, colours, tmp_path):
    """A checkpoint damaged after it was written (a file deleted or truncated, run.json edited) is named, with the
    older checkpoint to resume from instead."""
    settings = dict(after_layer=2, num_tokens=4, data=colours, loss="ce", max_steps=6, **FAST)
    finetune(tiny_vit, output=tmp_path / "out", stop_after=4, **settings)
    checkpoints = tmp_path / "out-checkpoints"
    latest = list_checkpoints(checkpoints)[-1]
    (latest / "model.safetensors").write_bytes((latest / "model.safetensors").read_bytes()[:100])
    with pytest.raises(
        RetrofitError, match=r"step-00000004' is damaged \(.*\); delete it to resume from step-00000002"
    ):
        finetune(tiny_vit, output=tmp_path / "out", resume=True, **settings)
    shutil.rmtree(latest)
    (checkpoints / "step-00000002" / "optimizer.bin").unlink()
    with pytest.raises(RetrofitError, match=r"step-00000002' is damaged \(.*\); delete it or pass --overwrite"):
        finetune(tiny_vit, output=tmp_path / "out", resume=True, **settings)
    record = (checkpoints / "run.json").read_text()
    (checkpoints / "run.json").write_text("{not json")  # edited since: not retrofit's, so not even --overwrite takes it
    for how in (dict(resume=True), dict(overwrite=True)):
        with pytest.raises(RetrofitError, match=r"run.json' is not a run record retrofit wrote \(a file of yours, or"):
            finetune(tiny_vit, output=tmp_path / "out", **how, **settings)
    assert (checkpoints / "run.json").read_text() == "{not json"
    (checkpoints / "run.json").write_text(record.replace('"steps": 6', '"steps": -4'))
    with pytest.raises(RetrofitError, match=r"run.json' records no usable budget \(.*\): it was changed since"):
        finetune(tiny_vit, output=tmp_path / "out", resume=True, **settings)
    # a budget below its checkpoints' step: --max-steps, which it said to pass, changes no recorded budget
    (checkpoints / "run.json").write_text(record.replace('"steps": 6', '"steps": 1'))
    with pytest.raises(RetrofitError, match=r"run.json' records a budget of 1 step, below its checkpoint '.*step-0+2"):
        finetune(tiny_vit, output=tmp_path / "out", resume=True, **settings)
    (checkpoints / "run.json").write_text(record)
    # past the step (an epoch of 10**30 was an OverflowError traceback), or past the epoch's 3 batches (it resumed,
    # skipping the rest of the epoch)
    positions = [{"step": -5, "epoch": 0, "batch": 0}, {"step": 1, "epoch": 0, "batch": 1}]
    positions += [{"step": 2, "epoch": 10**30, "batch": 0}, {"step": 2, "epoch": 0, "batch": 99}]
    # evaluations without their step, or not scores (a KeyError or ValueError traceback after training, at the card)
    for evaluation in ({"accuracy": 0.5}, {"step": 2, "accuracy": "high"}, {"step": 7, "accuracy": 0.5}):
        positions.append({"step": 2, "epoch": 0, "batch": 2, "evaluations": [evaluation]})
    for position in positions:
        (checkpoints / "step-00000002" / "progress.json").write_text(json.dumps(position))
        with pytest.raises(RetrofitError, match=r"step-00000002' is damaged \(ValueError: .*\); delete it or pass"):
            finetune(tiny_vit, output=tmp_path / "out", resume=True, **settings)
    assert sorted(p.name for p in checkpoints.iterdir()) == ["run.json", "step-00000002"]
    # Without its progress.json it is no checkpoint: --resume started from none and, after training to step 2, could
    # not save there; refused before any work, as with --overwrite, which leaves it
    (checkpoints / "step-00000002" / "progress.json").unlink()
    message = r"step-00000002' is named like a checkpoint but is not a whole one retrofit wrote \(a file of it deleted"
    for how in (dict(resume=True), dict(overwrite=True)):
        with pytest.raises(RetrofitError, match=message):
            finetune(tiny_vit, output=tmp_path / "out", stop_after=1, **how, **settings)
    assert sorted(p.name for p in checkpoints.iterdir()) == ["run.json", "step-00000002"]
    shutil.rmtree(checkpoints / "step-00000002")
    assert finetune(tiny_vit, output=tmp_path / "out", overwrite=True, **settings).steps == 6


def test_a_run_that_stops_before_its_first_checkpoint_leaves_no_folder(tiny_vit, colours, tmp_path, monkeypatch):
    """run.json is written with the first checkpoint, so a run that fails before it leaves nothing to --resume or to
    refuse later; and a run.json left by an older run without checkpoints is replaced, not trusted."""
    monkeypatch.setattr(train_module, "compute_loss", lambda *args, **kwargs: torch.tensor(float("nan")))
    with pytest.raises(RetrofitError, match=r"loss became nan at step 1; stopped\. .*then start again$"):
        finetune(tiny_vit, output=tmp_path / "o", after_layer=2, num_tokens=4, data=colours, loss="ce", **FAST)
    assert not (tmp_path / "o").exists() and not (tmp_path / "o-checkpoints").exists()
    monkeypatch.undo()
    (tmp_path / "o-checkpoints").mkdir()
    older = {"architecture": "ViTForImageClassification", "merge_after_layer": 2, "merge_num_tokens": 99}
    (tmp_path / "o-checkpoints" / "run.json").write_text(json.dumps(older))
    finetune(tiny_vit, output=tmp_path / "o", after_layer=2, num_tokens=4, data=colours, loss="ce", max_steps=2, **FAST)
    assert json.loads((tmp_path / "o-checkpoints" / "run.json").read_text())["merge_num_tokens"] == 4


def test_a_run_json_of_the_users_in_the_checkpoint_folder_stays(tiny_vit, colours, tmp_path, capsys):
    """The checkpoint folder may hold the user's files: a run.json retrofit did not write is neither replaced by the
    run's record nor deleted by --overwrite (one line, exit 2, before any work); --resume with --overwrite, which
    contradict each other, is refused the same way."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "run.json").write_text('{"my": "notes"}')
    argv = ["finetune", str(tiny_vit), "--after-layer", "2", "--tokens", "4", "--data", colours, "--loss", "ce",
            "--eval-split", "", "--no-calibrate", "--batch-size", "8", "--max-steps", "1",
            "--checkpoint-dir", str(mine), "--output", str(tmp_path / "o")]  # fmt: skip
    for extra in ([], ["--overwrite"], ["--resume"]):
        assert main([*argv, *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"retrofit: error: '{mine / 'run.json'}' is not a run record retrofit wrote") and (
            err.count("\n") == 1
        )
    assert (mine / "run.json").read_text() == '{"my": "notes"}' and not (tmp_path / "o").exists()
    (mine / "run.json").unlink()
    assert main([*argv, "--resume", "--overwrite"]) == 2
    assert "--resume continues the newest checkpoint and --overwrite starts over from none; pass one of them\n" in (
        capsys.readouterr().err
    )
    assert not (tmp_path / "o").exists()


def test_a_second_run_on_a_checkpoint_folder_in_use_is_refused(tiny_vit, colours, tmp_path, capsys, monkeypatch):
    """Two runs on one checkpoint folder would prune and resume each other's checkpoints: while another process runs
    on it, a run is refused (one line naming that process, exit 2, before loading anything); the lock goes with the
    process, and a finished run releases it for the next."""
    import subprocess
    import sys

    folder = tmp_path / "ckpt"
    holder = ("import sys; from pathlib import Path; from retrofit.checkpoints import check_checkpoints; "
              f"check_checkpoints(Path({str(folder)!r}), resume=True, overwrite=False); print('held', flush=True); "
              "sys.stdin.read()")  # fmt: skip
    argv = ["finetune", str(tiny_vit), "--after-layer", "2", "--tokens", "4", "--data", colours, "--loss", "ce",
            "--eval-split", "", "--no-calibrate", "--batch-size", "8", "--max-steps", "1",
            "--checkpoint-dir", str(folder), "--output", str(tmp_path / "o")]  # fmt: skip
    other = subprocess.Popen([sys.executable, "-c", holder], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline() == "held\n"
        with monkeypatch.context() as patch:
            patch.setattr("retrofit.loading.load_model", lambda *a, **k: pytest.fail("loaded the model"))
            for extra in ([], ["--resume"], ["--overwrite"]):
                assert main([*argv, *extra]) == 2
                err = capsys.readouterr().err
                assert err == (
                    f"retrofit: error: another retrofit run (process {other.pid}) is writing '{folder}' (its "
                    "--checkpoint-dir); wait for it to end, or give this run another --checkpoint-dir\n"
                )
    finally:
        other.communicate("")  # the process ends, and its lock with it
    assert not (tmp_path / "o").exists() and not folder.exists()
    assert main(argv) == 0 and (tmp_path / "o").is_dir()
    after = subprocess.run([sys.executable, "-c", holder], input="", capture_output=True, text=True, timeout=120)
    assert after.stdout == "held\n", after.stderr  # the finished run let go of the folder


def test_a_second_run_writing_an_output_in_use_is_refused_at_its_start(
    tiny_vit, colours, tmp_path, capsys, monkeypatch
):
    """Two runs with one --output (their checkpoints elsewhere) used to train both, and the second was refused only
    at its end (or, with --overwrite, replaced the first's export): while another process writes the output, a
    finetune or convert to it is refused before loading anything, naming that process; one run's checkpoint folder
    is not another's output either."""
    output, elsewhere = tmp_path / "o", tmp_path / "elsewhere"
    holder = ("import sys; from retrofit.atomic import hold_write_lock; "
              f"hold_write_lock({str(output)!r}, '--output'); hold_write_lock({str(elsewhere)!r}, '--checkpoint-dir'); "
              "print('held', flush=True); sys.stdin.read()")  # fmt: skip
    tune = ["finetune", str(tiny_vit), "--after-layer", "2", "--tokens", "4", "--data", colours, "--loss", "ce",
            "--eval-split", "", "--no-calibrate", "--batch-size", "8", "--max-steps", "1"]  # fmt: skip
    other = subprocess.Popen([sys.executable, "-c", holder], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline() == "held\n"
        convert_module = importlib.import_module("retrofit.convert")  # `retrofit.convert` is the function
        with monkeypatch.context() as patch:
            patch.setattr("retrofit.loading.load_model", lambda *a, **k: pytest.fail("loaded the model"))
            patch.setattr(convert_module, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
            runs = [
                [*tune, "--checkpoint-dir", str(tmp_path / "c1"), "--output", str(output)],
                [*tune, "--checkpoint-dir", str(tmp_path / "c2"), "--output", str(output), "--overwrite"],
                ["convert", str(tiny_vit), "--after-layer", "2", "--tokens", "4", "--output", str(output)],
            ]
            for argv in runs:
                assert main(argv) == 2
                assert capsys.readouterr().err == (
                    f"retrofit: error: another retrofit run (process {other.pid}) is writing '{output}' (its "
                    "--output); wait for it to end, or give this run another --output\n"
                )
            assert (
                main(["convert", str(tiny_vit), "--after-layer", "2", "--tokens", "4", "--output", str(elsewhere)]) == 2
            )
            assert capsys.readouterr().err == (
                f"retrofit: error: another retrofit run (process {other.pid}) is writing '{elsewhere}' (its "
                "--checkpoint-dir); wait for it to end, or give this run another --output\n"
            )
    finally:
        other.communicate("")
    assert not output.exists() and not elsewhere.exists()
    assert main([*tune, "--checkpoint-dir", str(tmp_path / "c1"), "--output", str(output)]) == 0 and output.is_dir()
    assert main(["convert", str(tiny_vit), "--after-layer", "2", "--tokens", "4", "--output", str(elsewhere)]) == 0


def test_the_checkpoint_lock_lasts_the_whole_run_and_no_longer(tiny_vit, colours, tmp_path, monkeypatch):
    """The lock covers the export too (a second run could otherwise take the folder while the first writes its
    output), is released when a call fails (a refused or interrupted call in a notebook keeps no one out), and its
    file in the cache is never followed: a link there is not written through."""
    import importlib

    from retrofit import atomic, finetune

    module = importlib.import_module("retrofit.finetune")  # `retrofit.finetune` is the function
    folder = tmp_path / "o-checkpoints"
    real_finish, during = module.finish, []

    def finish(*args, **kwargs):
        during.append({atomic._lock_key(folder), atomic._lock_key(tmp_path / "o")} <= set(atomic._HELD))
        return real_finish(*args, **kwargs)

    monkeypatch.setattr(module, "finish", finish)
    finetune(tiny_vit, output=tmp_path / "o", after_layer=2, num_tokens=4, data=colours, loss="ce", max_steps=1, **FAST)
    assert during == [True] and not atomic._HELD
    with pytest.raises(RetrofitError, match="holds checkpoints of an earlier run"):  # refused after the lock
        finetune(tiny_vit, output=tmp_path / "o2", checkpoint_dir=folder, after_layer=2, num_tokens=4, data=colours,
                 loss="ce", max_steps=1, **FAST)  # fmt: skip
    assert not atomic._HELD and not atomic.lock_file(folder).exists()
    precious = tmp_path / "precious.txt"
    precious.write_text("mine")
    lock = atomic.lock_file(folder)
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.symlink_to(precious)
    finetune(tiny_vit, output=tmp_path / "o", after_layer=2, num_tokens=4, data=colours, loss="ce", max_steps=2,
             resume=True, **FAST)  # fmt: skip
    assert precious.read_text() == "mine" and lock.is_symlink()
    lock.unlink()


def test_kd_evaluates_an_unlabelled_split_against_the_teacher(tiny_vit, colours, tmp_path):
    """kd needs no labels: where the folder gives none (images at two depths), the evaluation split is scored as
    agreement with the teacher instead of refusing the run (after calibrating) for want of labels it does not use,
    and the agreement is never published as accuracy: not in the result, the card or a recipe's before/after table."""
    from retrofit.recipes import run_recipe

    root = tmp_path / "unlabelled"
    shutil.copytree(colours, root)
    for split in ("train", "test"):
        (root / split / "cat" / "more").mkdir()
        shutil.copy(root / split / "cat" / "0.png", root / split / "cat" / "more" / "0.png")
    lines = []
    result = finetune(tiny_vit, output=tmp_path / "o", after_layer=2, num_tokens=4, data=root, loss="kd",
                      eval_split="test", max_steps=2, log=lines.append, **FAST)  # fmt: skip
    assert result.final_accuracy is None and 0 <= result.eval_history[-1]["agreement"] <= 1
    assert result.eval_history[-1]["reference"] == "teacher"
    card = (tmp_path / "o" / "README.md").read_text()
    assert "agreement with the teacher on `unlabelled` test (all " in card and "accuracy on `unlabelled`" not in card
    recipe = {"source": str(tiny_vit), "merge": {"after_layer": 2, "tokens": 4},
              "data": {"name": str(root), "eval_split": "test"},
              "training": {"loss": "kd", "max_steps": 2, "batch_size": 8, "min_steps": 0},
              "evaluation": {"batch_size": 12, "speed": False}, "export": {"output": str(tmp_path / "r")}}  # fmt: skip
    (tmp_path / "r.yaml").write_text(json.dumps(recipe))
    summary = run_recipe(tmp_path / "r.yaml", progress=False, log=lambda _: None)
    baseline, untrained, trained = summary["rows"]
    assert baseline["teacher_agreement"] == 1.0 and "accuracy" not in trained
    table = (tmp_path / "r" / "README.md").read_text()
    assert "| model | agreement with the teacher |" in table and "| 100.00 % |" in table
    # Labels of classes the model does not know: the same agreement, in training and the baseline row alike.
    other = tmp_path / "other"
    shutil.copytree(colours, other)
    for split in ("train", "test"):
        for folder in sorted((other / split).iterdir()):
            folder.rename(folder.with_name(f"unknown-{folder.name}"))
    recipe["data"]["name"], recipe["export"]["output"] = str(other), str(tmp_path / "r2")
    (tmp_path / "r2.yaml").write_text(json.dumps(recipe))
    baseline, untrained, trained = run_recipe(tmp_path / "r2.yaml", progress=False, log=lambda _: None)["rows"]
    assert baseline["teacher_agreement"] == 1.0 and 0 <= trained["teacher_agreement"] <= 1
    assert not any("accuracy" in row for row in (baseline, untrained, trained))


def test_kd_reads_the_label_column_the_user_named(tiny_vit, colours, tmp_path):
    """kd falls back to agreement with the teacher where a split has no labels; a label column the user named is not
    such a split: a misspelt ``--label-column`` (or the image column given twice) was silently dropped and the run
    published agreement where the user asked for accuracy. Fashion-MNIST ignored both column options altogether."""
    settings = dict(after_layer=2, num_tokens=4, data=colours, loss="kd", eval_split="test", max_steps=1, **FAST)
    with pytest.raises(RetrofitError, match="dataset '.*' has no column 'lable'; available: image, label"):
        finetune(tiny_vit, output=tmp_path / "a", label_column="lable", **settings)
    with pytest.raises(RetrofitError, match="--label-column and --image-column are both 'image'"):
        finetune(tiny_vit, output=tmp_path / "b", label_column="image", **settings)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    from retrofit.data import load_split

    with pytest.raises(RetrofitError, match="fashion-mnist's labels are its column 'label', not 'lable'; leave out --"):
        load_split("fashion-mnist", "test", label_column="lable", limit=1)
    with pytest.raises(RetrofitError, match="fashion-mnist's images are its column 'image', not 'img'; leave out --"):
        load_split("fashion-mnist", "test", image_column="img", limit=1)


def test_small_data_evaluates_at_most_ten_times_a_run(tiny_vit, colours, tmp_path):
    """On small data the step floor makes dozens of short epochs, and --eval-every 0 scored the evaluation split after
    each of them: more work than the training (1,000 steps on 2,000 images, 31 passes). It now evaluates every few
    epochs, at most 10 times, and at the end; --eval-every N still evaluates every N steps."""
    lines: list[str] = []
    settings = dict(after_layer=2, num_tokens=4, data=colours, loss="ce", limit=8, epochs=1, **FAST)
    result = finetune(tiny_vit, output=tmp_path / "a", **{**settings, "min_steps": 13, "save_every": 100},
                      log=lines.append)  # fmt: skip
    assert result.steps == 13 and [entry["step"] for entry in result.eval_history] == [2, 4, 6, 8, 10, 12, 13]
    assert "evaluating every 2 epochs and at the end, not after each of the 13 (at most 10 evaluations a run; " in (
        "\n".join(lines)
    )


def test_checkpoints_inside_the_output_are_refused(tiny_vit, colours, tmp_path):
    with pytest.raises(
        RetrofitError, match=r"--checkpoint-dir '.*' is inside --output '.*', which the export replaces"
    ):
        finetune(tiny_vit, output=tmp_path / "o", checkpoint_dir=tmp_path / "o" / "ckpt", after_layer=2, num_tokens=4,
                 data=colours, **FAST)  # fmt: skip
    assert not (tmp_path / "o").exists()
    # the other way round, an output named as a checkpoint is: it failed after training (the checkpoint there), or
    # was written where pruning had been, and the next run refused it as a damaged checkpoint
    checkpoints = tmp_path / "ck"
    settings = dict(after_layer=2, num_tokens=4, data=colours, max_steps=1, checkpoint_dir=checkpoints, **FAST)
    for output in ("step-00000002", "step-00000002/x", "run.json", ".step-00000002.tmp"):
        with pytest.raises(RetrofitError, match=r"is in --checkpoint-dir '.*' under a name its checkpoints take"):
            finetune(tiny_vit, output=checkpoints / output, **settings)
    assert not checkpoints.exists()
    finetune(tiny_vit, output=checkpoints / "final", **settings)  # other names are the user's to choose
    assert (checkpoints / "final" / "config.json").is_file() and (checkpoints / "step-00000001").is_dir()
    # a link to nothing (a moved disk) failed at the first checkpoint, after all the steps before it
    (tmp_path / "gone").symlink_to(tmp_path / "unmounted")
    for folder in (tmp_path / "gone", tmp_path / "gone" / "ckpt"):
        with pytest.raises(RetrofitError, match=r"^--checkpoint-dir '.*': '.*gone' is a link to nothing; choose"):
            finetune(tiny_vit, output=tmp_path / "o", checkpoint_dir=folder, after_layer=2, num_tokens=4, data=colours,
                     **FAST)  # fmt: skip
    assert not (tmp_path / "o").exists() and not (tmp_path / "unmounted").exists()
    # in the source or the data: step folders were written among the model's files, or became a class of the images
    for folder in (Path(tiny_vit), Path(colours) / "ckpt"):
        with pytest.raises(RetrofitError, match=r"^--checkpoint-dir '.*' is in '.*', which this run reads; choose"):
            finetune(tiny_vit, output=tmp_path / "o", checkpoint_dir=folder, after_layer=2, num_tokens=4, data=colours,
                     **FAST)  # fmt: skip
    assert not (Path(colours) / "ckpt").exists() and not list(Path(tiny_vit).glob("step-*"))


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(num_labels=5), r"gives outputs of shape \(1, 5\), the model \(1, 3\) \(other labels\?\)"),
        (dict(image_size=48), r"cannot run on the 32×32 images the model is trained on"),
        # as many classes, in another order: kd taught the student's cat the teacher's dog
        (dict(id2label={0: "dog", 1: "cat", 2: "bird"}), r"has other classes in another order: class 0 is 'dog' to it"),
        (dict(id2label={0: "cat", 1: "dog", 2: "fish"}), r"has other classes: class 2 is 'fish' to it, 'bird' to the"),
    ],
)
def test_a_teacher_that_does_not_fit_is_refused_before_training(tiny_vit, colours, tmp_path, change, message):
    from conftest import TINY
    from transformers import ViTConfig, ViTForImageClassification

    labels = {"id2label": {i: f"c{i}" for i in range(5)}, "label2id": {f"c{i}": i for i in range(5)}}
    extra = labels if "num_labels" in change else {}
    if "id2label" in change:
        change = {**change, "label2id": {name: index for index, name in change["id2label"].items()}}
    teacher = save_tiny(ViTForImageClassification(ViTConfig(**{**TINY, **change, **extra})), tmp_path / "teacher")
    with pytest.raises(RetrofitError, match=f"the teacher '{teacher}' {message}"):
        finetune(tiny_vit, output=tmp_path / "o", teacher=str(teacher), after_layer=2, num_tokens=4, data=colours,
                 loss="kd", **FAST)  # fmt: skip
    assert not (tmp_path / "o").exists() and not (tmp_path / "o-checkpoints").exists()


def test_a_teacher_without_a_classifier_is_refused_for_what_it_is(tiny_vit, colours, tmp_path):
    """A backbone or a CLIP dual encoder as --teacher of a classifier got a new random head with transformers' 2
    labels, and was refused as "gives outputs of shape (1, 2) ... (other labels?)"; with 3 labels it trained on
    random logits. Also for a retrofit export continued with --teacher."""
    from conftest import TINY
    from transformers import CLIPConfig, CLIPModel, ViTConfig, ViTModel

    clip = CLIPConfig(text_config={"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                                   "intermediate_size": 64, "vocab_size": 99},
                      vision_config={**TINY}, projection_dim=16)  # fmt: skip
    export = tmp_path / "pm"
    assert main(["convert", str(tiny_vit), "--after-layer", "2", "--tokens", "4", "--output", str(export)]) == 0
    for name, model in (("backbone", ViTModel(ViTConfig(**TINY))), ("clip", CLIPModel(clip))):
        teacher = save_tiny(model, tmp_path / name)
        for source, merge in ((str(tiny_vit), dict(after_layer=2, num_tokens=4)), (str(export), {})):
            with pytest.raises(
                RetrofitError,
                match=f"^the teacher '{teacher}' is a {type(model).__name__} "
                "checkpoint, with no classifier: .* random one; pass a --teacher that classifies",
            ):
                finetune(source, output=tmp_path / "o", teacher=str(teacher), data=colours, loss="kd", **merge,
                         **FAST)  # fmt: skip
            assert not (tmp_path / "o").exists() and not (tmp_path / "o-checkpoints").exists()


def test_an_export_whose_source_is_gone_needs_a_teacher(tiny_vit, colours, tmp_path, monkeypatch):
    """Continuing an export with kd distils from its merge_source; when that is gone, say so and how to go on."""
    import retrofit.provenance
    from retrofit import convert

    monkeypatch.setattr(retrofit.provenance, "CACHE_DIR", tmp_path / "cache")  # no other folder with these weights
    source = tmp_path / "source"
    shutil.copytree(tiny_vit, source)
    convert(str(source), after_layer=2, num_tokens=4, output=tmp_path / "pm")
    shutil.rmtree(source)
    message = (
        r"'.*pm' was made from a local folder named 'source', which is not known on this machine \(or has changed "
        r"since\); pass --teacher with the unmerged model$"
    )
    with pytest.raises(RetrofitError, match=message):
        finetune(tmp_path / "pm", output=tmp_path / "o", data=colours, loss="kd", **FAST)
    result = finetune(tmp_path / "pm", output=tmp_path / "o", data=colours, teacher=str(tiny_vit), loss="kd",
                      max_steps=1, **FAST)  # fmt: skip
    assert result.steps == 1
    # --loss ce reads no teacher: the export goes on training without its source
    alone = finetune(tmp_path / "pm", output=tmp_path / "ce", data=colours, loss="ce", max_steps=1, eval_split="",
                     **FAST)  # fmt: skip
    assert alone.steps == 1 and alone.output


def test_training_labels_that_are_not_class_ids_are_refused_before_training(tiny_vit, colours, tmp_path):
    """A ce run checks every training label first (not an IndexError at some step); kd reads no labels at all."""
    from pathlib import Path

    data = make_labelled_folder(tmp_path / "labelled", Path(colours), [0, 1, 2, 5, 0, 1, 2, 0])
    settings = dict(after_layer=2, num_tokens=4, data=data, eval_split=None, max_steps=1, **FAST)
    with pytest.raises(RetrofitError, match=r"example 3 of '.*' has the label 5, outside the 3 classes .*--loss kd"):
        finetune(tiny_vit, output=tmp_path / "o", loss="ce", **settings)
    assert not (tmp_path / "o").exists() and not (tmp_path / "o-checkpoints").exists()
    assert finetune(tiny_vit, output=tmp_path / "o", loss="kd", **settings).steps == 1


def test_function_matching_shows_teacher_and_student_the_same_mixed_views(tiny_vit, colours, tmp_path, monkeypatch):
    """--function-matching: every batch is cropped, flipped (the dataset's --augment) and mixed up between its images,
    the same tensor going to the teacher and the student; a resumed run mixes as the uninterrupted one (the same
    weights); the card says so; with labels (ce, mix) it is refused in one line."""
    from retrofit import data as data_module
    from retrofit import train as train_module

    seen: list[torch.Tensor] = []
    mixup = data_module.mixup_batch

    def recording_mixup(pixels, *, seed):
        seen.append(mixed := mixup(pixels, seed=seed))
        return mixed

    monkeypatch.setattr(train_module, "mixup_batch", recording_mixup)
    read: list[torch.Tensor] = []
    original = train_module.HeadReader.__call__
    monkeypatch.setattr(
        train_module.HeadReader, "__call__", lambda self, model, px: read.append(px) or original(self, model, px)
    )
    settings = dict(after_layer=2, num_tokens=4, data=colours, loss="kd", epochs=2, function_matching=True, **FAST)
    full = finetune(tiny_vit, output=tmp_path / "full", **settings)
    assert full.steps == 6 and len(seen) == 6
    for mixed in seen:  # the student and the teacher both read exactly the mixed batch
        assert sum(px is mixed for px in read) == 2
    assert "function matching" in (tmp_path / "full" / "README.md").read_text()
    monkeypatch.undo()
    fresh = finetune(tiny_vit, output=tmp_path / "fresh", **settings)
    finetune(tiny_vit, output=tmp_path / "cut", stop_after=3, **settings)
    finetune(tiny_vit, output=tmp_path / "cut", resume=True, **settings)
    expected, got = weights(tmp_path / "fresh"), weights(tmp_path / "cut")
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-6, msg=name)
    assert fresh.steps == 6
    with pytest.raises(RetrofitError, match="function_matching is for --loss kd|--function-matching is for --loss kd"):
        finetune(tiny_vit, output=tmp_path / "ce", **{**settings, "loss": "ce"})


def test_resume_refuses_a_source_teacher_or_data_changed_in_place(tiny_vit, colours, tmp_path):
    """The same paths with other contents resumed without a word: a teacher retrained in place, a source whose
    preprocessor_config.json or config.json was edited (other inputs, another model), and a data folder relabelled
    with as many images as before (two classes' folders swapped). Each is refused in one line naming what changed;
    unchanged, the run resumes."""
    source, teacher = shutil.copytree(tiny_vit, tmp_path / "vit"), shutil.copytree(tiny_vit, tmp_path / "teacher")
    data = Path(shutil.copytree(colours, tmp_path / "data"))
    settings = dict(after_layer=2, num_tokens=4, data=str(data), teacher=str(teacher), max_steps=4, calibrate=False,
                    output=tmp_path / "out", **FAST)  # fmt: skip
    finetune(source, stop_after=2, **settings)

    def refused(message: str) -> None:
        with pytest.raises(RetrofitError, match=f"^'.*out-checkpoints' holds checkpoints of a run with {message}"):
            finetune(source, resume=True, **settings)

    def edited(path: Path, old: str, new: str) -> str:
        text = path.read_text()
        assert old in text
        path.write_text(text.replace(old, new))
        return text

    trained = (teacher / "model.safetensors").read_bytes()
    state = load_file(str(teacher / "model.safetensors"))
    save_file({name: value * 1.5 for name, value in state.items()}, str(teacher / "model.safetensors"))
    refused(r"--teacher's weights \(sha256\) '[0-9a-f]{64}', not '[0-9a-f]{64}'")
    (teacher / "model.safetensors").write_bytes(trained)
    processor = edited(source / "preprocessor_config.json", "0.5", "0.2")
    refused(re.escape("the image processor.image_mean [0.5, 0.5, 0.5], not [0.2, 0.2, 0.2]"))
    (source / "preprocessor_config.json").write_text(processor)
    config = edited(source / "config.json", '"hidden_dropout_prob": 0.0', '"hidden_dropout_prob": 0.3')
    refused(re.escape("the model's config.hidden_dropout_prob 0.0, not 0.3"))
    (source / "config.json").write_text(config)
    train = data / "train"
    os.rename(train / "cat", train / "swap")
    os.rename(train / "dog", train / "cat")
    os.rename(train / "swap", train / "dog")
    refused(r"training images' files \(paths, sizes, labels\) '[0-9a-f]{16}', not '[0-9a-f]{16}'")
    os.rename(train / "cat", train / "swap")
    os.rename(train / "dog", train / "cat")
    os.rename(train / "swap", train / "dog")
    shutil.rmtree(data)  # the same files copied anew (unpacked again: other modification times): the same data
    shutil.copytree(colours, data, copy_function=shutil.copy)
    # ... given through links: the same folders
    (tmp_path / "data-link").symlink_to(data, target_is_directory=True)
    (tmp_path / "teacher-link").symlink_to(teacher, target_is_directory=True)
    links = {"data": str(tmp_path / "data-link"), "teacher": str(tmp_path / "teacher-link")}
    assert finetune(source, resume=True, **{**settings, **links}).steps == 4


def test_resume_follows_a_hub_source_whose_main_moved_to_the_same_files(tiny_vit, colours, tmp_path, monkeypatch):
    """A Hub source whose `main` moved by a commit that changed only its README (a model card edit) was refused on
    --resume, as if it were another model: the commit is recorded with the model's config. Its weights, config and
    image processor are compared themselves, so the run resumes; a commit that changed its config.json is refused."""
    cache = tmp_path / "hub" / "models--someone--tiny-vit"
    first, readme_edit, config_edit = "1" * 40, "2" * 40, "3" * 40
    for commit in (first, readme_edit, config_edit):
        shutil.copytree(tiny_vit, cache / "snapshots" / commit)
    (cache / "snapshots" / readme_edit / "README.md").write_text("# a card edit\n")
    config = cache / "snapshots" / config_edit / "config.json"
    config.write_text(config.read_text().replace('"hidden_dropout_prob": 0.0', '"hidden_dropout_prob": 0.3'))
    (cache / "refs").mkdir()
    main_ref = cache / "refs" / "main"
    main_ref.write_text(first)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))  # read at each call
    settings = dict(after_layer=2, num_tokens=4, data=colours, max_steps=4, calibrate=False, output=tmp_path / "o",
                    **FAST)  # fmt: skip
    finetune("someone/tiny-vit", stop_after=2, **settings)
    main_ref.write_text(config_edit)
    with pytest.raises(RetrofitError, match=re.escape("the model's config.hidden_dropout_prob 0.0, not 0.3")):
        finetune("someone/tiny-vit", resume=True, **settings)
    main_ref.write_text(readme_edit)
    assert finetune("someone/tiny-vit", resume=True, **settings).steps == 4


def test_mixup_blends_each_image_with_another_of_the_batch():
    from retrofit.data import mixup_batch

    pixels = torch.arange(4, dtype=torch.float32)[:, None, None, None].expand(4, 3, 2, 2)
    mixed = mixup_batch(pixels, seed=7)
    assert torch.equal(mixed, mixup_batch(pixels, seed=7)) and not torch.equal(mixed, mixup_batch(pixels, seed=8))
    assert mixed.min() >= 0 and mixed.max() <= 3 and mixed.shape == pixels.shape
    assert torch.allclose(mixed, mixed[:, :1].expand_as(mixed))  # one weight per image, over all its pixels


def test_a_resumed_pretraining_keeps_its_model_and_image_processor(colours, tmp_path):
    """`pretrain --resume` with another activation or normalisation loaded the checkpoint's weights into the changed
    model and exported them with the new settings, without a word: refused in one line naming the first difference;
    the same settings resume."""
    from retrofit.finetune import pretrain

    vit = {"image_size": 32, "patch_size": 8, "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
           "intermediate_size": 32}  # fmt: skip
    common = dict(output=tmp_path / "base", data=colours, max_steps=2, batch_size=8, save_every=1, eval_split="",
                  progress=False, log=lambda _: None)  # fmt: skip
    pretrain(vit, **common)
    written = (tmp_path / "base" / "config.json").read_text()
    for model, processor, message in (
        ({**vit, "hidden_act": "relu"}, None, "pretrain.model.hidden_act 'gelu', not 'relu'"),
        (
            vit,
            {"image_mean": [0.1, 0.1, 0.1]},
            "pretrain.image_processor.image_mean [0.5, 0.5, 0.5], not [0.1, 0.1, 0.1]",
        ),
    ):
        with pytest.raises(RetrofitError, match=r"holds checkpoints of a run with " + re.escape(message)):
            pretrain(model, image_processor=processor, resume=True, **common)
    assert (tmp_path / "base" / "config.json").read_text() == written
    # The same model and processor, with a field written out at its default value: the same run.
    same = {"hidden_act": "gelu", "layer_norm_eps": 1e-12}
    assert pretrain(vit | same, image_processor={"do_resize": True}, resume=True, **common).steps == 2
    # Resumed with another budget, it keeps its first run's, and training.json says so (it said max_steps 6 beside
    # "steps": 2)
    assert pretrain(vit, resume=True, **{**common, "max_steps": 6, "warmup_ratio": 0.5}).steps == 2
    info = json.loads((tmp_path / "base" / "training.json").read_text())
    assert info["steps"] == 2 and (info["settings"]["max_steps"], info["settings"]["warmup_ratio"]) == (2, 0.05)
    # A fine-tune cannot resume a pretraining's checkpoints (it was told to resume with the --task of that run)
    with pytest.raises(RetrofitError, match=r"holds checkpoints of a pretraining \(no merge\), not of a fine-tune"):
        finetune(tmp_path / "base", after_layer=1, num_tokens=4, loss="ce", resume=True, calibrate=False,
                 **{**common, "output": tmp_path / "tuned"}, checkpoint_dir=tmp_path / "base-checkpoints")  # fmt: skip
    # An image size as (height, width), as transformers' configs take it (a TypeError traceback building the processor)
    common["output"] = tmp_path / "oblong"
    assert pretrain(vit | {"image_size": [32, 24]}, **common).steps == 2
    processor = json.loads((tmp_path / "oblong" / "preprocessor_config.json").read_text())
    assert processor["size"] == {"height": 32, "width": 24}
    # Data whose image column is named otherwise: --image-column (the class names were read from "image": refused)
    from datasets import DatasetDict

    from retrofit.data import load_split

    saved = tmp_path / "renamed"
    DatasetDict({"train": load_split(colours, "train").rename_column("image", "img")}).save_to_disk(saved)
    common |= {"output": tmp_path / "renamed-base", "data": str(saved), "image_column": "img"}
    assert pretrain(vit, **common).steps == 2


def test_pretrain_refuses_what_it_cannot_build_in_one_line(colours, tmp_path):
    """Settings pretraining cannot use are one line before any training: not a mapping, not a path, an image_mean
    with a value per channel missing (it failed at the first image, blaming the data), a model too large to build, a
    switch given as text, a ViT given the contrastive loss."""
    from retrofit.finetune import pretrain

    vit = {"image_size": 32, "patch_size": 8, "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
           "intermediate_size": 32}  # fmt: skip
    clip = {"projection_dim": 8, "vision_config": vit, "text_config": {"hidden_size": 16, "num_attention_heads": 2}}
    contrastive = {"loss": "contrastive"}
    out = tmp_path / "base"
    cases = [
        (None, {}, "pretrain.model must be a mapping of config fields, not None"),
        ("vit", {}, "pretrain.model must be a mapping of config fields, not 'vit'"),
        (vit, {"output": 5}, "pretrain's output must be a folder's path, not 5"),
        (vit, {"image_processor": {"image_mean": [0.5]}}, "pretrain.image_processor.image_mean has 1 values for 3"),
        ({**vit, "hidden_size": 2**40, "num_attention_heads": 1}, {}, "pretrain.model could not be built"),
        # any text is true: "maybe" resized
        (vit, {"image_processor": {"do_resize": "maybe"}}, "pretrain.image_processor.do_resize must be true or false"),
        (vit, {"loss": "contrastive"}, "needs loss contrastive, a ViT loss ce"),  # a ViT has no captions to match
        (vit, {"checkpoint_dir": 5}, "pretrain's checkpoint_dir must be a folder's path, not 5"),  # a TypeError
        # blamed on the first image: "image 0 (...png) is unreadable (Unknown resampling filter (99).); fix the dataset"
        (vit, {"image_processor": {"resample": 99}}, "cannot process an image (Unknown resampling"),
        (vit, {"image_processor": {"image_mean": "abc"}}, "pretrain.image_processor cannot process an image"),
        # a CLIP's: an AttributeError traceback, and torch.embedding's "index out of range in self"
        ({**clip, "text_config": 5}, contrastive, "pretrain.model.text_config must be a mapping of CLIPTextConfig"),
        ({**clip, "vision_config": [1]}, contrastive, "pretrain.model.vision_config must be a mapping of CLIPVision"),
        ({**clip, "text_config": {"vocab_size": 5}}, contrastive, "text_config.vocab_size is set from the captions'"),
        ({**clip, "text_config": {"eos_token_id": 77}}, contrastive, "text_config.eos_token_id is set from"),
    ]
    for model, change, message in cases:
        options = {"output": out, "data": colours, "max_steps": 1, "progress": False, "log": lambda _: None, **change}
        with pytest.raises(RetrofitError, match=re.escape(message)):
            pretrain(model, **options)
    assert not out.exists()


def test_finetune_and_pretrain_give_the_callers_random_generators_back(tiny_vit, colours, tmp_path):
    """A run seeds Python's, NumPy's and torch's generators (its own draws must repeat); a notebook's draws after
    `finetune()` or `pretrain()` continue as if the run had not happened, as after `run_recipe()`."""
    import random

    import numpy as np

    from retrofit.finetune import pretrain

    def draws() -> tuple:
        return random.random(), float(np.random.rand()), float(torch.rand(1))

    vit = {"image_size": 32, "patch_size": 8, "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
           "intermediate_size": 32}  # fmt: skip
    runs = [
        lambda: finetune(
            tiny_vit, output=tmp_path / "o", after_layer=2, num_tokens=4, data=colours, loss="ce", max_steps=1, **FAST
        ),  # fmt: skip
        lambda: pretrain(
            vit, output=tmp_path / "b", data=colours, max_steps=1, batch_size=8, progress=False, log=lambda _: None
        ),  # fmt: skip
    ]
    for run in runs:
        random.seed(11), np.random.seed(11), torch.manual_seed(11)
        expected = draws()
        random.seed(11), np.random.seed(11), torch.manual_seed(11)
        run()
        assert draws() == expected


def test_data_errors_come_before_calibrating(tiny_vit, colours, tmp_path, monkeypatch):
    """A batch larger than the data, or labels the model does not know, is refused before the k-means calibration
    (minutes on a real model), with nothing written."""
    import retrofit.calibrate

    def calibrated(*args, **kwargs):
        raise AssertionError("calibrated before the data was checked")

    monkeypatch.setattr(retrofit.calibrate, "calibrate_from_data", calibrated)
    with pytest.raises(RetrofitError, match=r"batch size 1000 is larger than the data \(\d+ examples\)"):
        finetune(tiny_vit, output=tmp_path / "o", after_layer=2, num_tokens=4, data=colours, max_steps=2,
                 **FAST | {"batch_size": 1000})  # fmt: skip
    with pytest.raises(RetrofitError, match="column 'kind'"):
        finetune(tiny_vit, output=tmp_path / "o", after_layer=2, num_tokens=4, data=colours, loss="ce",
                 label_column="kind", max_steps=2, **FAST)  # fmt: skip
    assert not (tmp_path / "o").exists()


def test_progress_false_hides_the_libraries_bars_too(tiny_vit, colours, tmp_path, capfd, monkeypatch):
    """`finetune(progress=False)` from Python printed the libraries' own bars (datasets' "Generating train split" for
    a new image folder, transformers' "Loading weights"); now nothing, and their switches are given back as they
    were."""
    import importlib

    from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from transformers.utils.logging import disable_progress_bar, enable_progress_bar, is_progress_bar_enabled

    # datasets reads HF_DATASETS_DISABLE_PROGRESS_BARS once, when imported: in a process where a test ran the CLI
    # (which sets it) before datasets was first imported, its bars could not be switched on again
    monkeypatch.setattr(importlib.import_module("datasets.utils.tqdm"), "HF_DATASETS_DISABLE_PROGRESS_BARS", None)
    was_disabled = are_progress_bars_disabled(), not is_progress_bar_enabled()  # the CLI switches them off
    enable_progress_bars()
    enable_progress_bar()
    try:
        data = tmp_path / "new-data"  # not in datasets' cache: its splits are generated
        shutil.copytree(colours, data)
        capfd.readouterr()
        finetune(tiny_vit, output=tmp_path / "o", after_layer=2, num_tokens=4, data=data, max_steps=1,
                 log=lambda _: None, **FAST)  # fmt: skip
        printed = capfd.readouterr().err
        assert not are_progress_bars_disabled() and is_progress_bar_enabled()
    finally:
        if was_disabled[0]:
            disable_progress_bars()
        if was_disabled[1]:
            disable_progress_bar()
    assert "Generating" not in printed and "it/s]" not in printed and "examples/s]" not in printed, printed


def test_pruning_and_overwrite_delete_only_what_retrofit_wrote(tiny_vit, colours, tmp_path):
    """A checkpoint pruned to --keep-checkpoints loses the files retrofit wrote there and nothing else: files the
    user put into it stay, and the log says so; --overwrite of checkpoints holding such files is refused before any
    work, one line, nothing deleted."""
    settings = dict(after_layer=2, num_tokens=4, data=colours, loss="ce", max_steps=3,
                    **{**FAST, "save_every": 1, "keep_checkpoints": 5})  # fmt: skip
    finetune(tiny_vit, output=tmp_path / "out", stop_after=2, **settings)
    checkpoints = tmp_path / "out-checkpoints"
    first = checkpoints / "step-00000001"
    written = {p.name for p in first.iterdir()}
    assert {"model.safetensors", "optimizer.bin", "progress.json"} <= written
    (first / "notes.txt").write_text("mine")
    (first / "eval").mkdir()
    (first / "eval" / "result.json").write_text("{}")
    (first / "empty").mkdir()
    said: list[str] = []
    finetune(tiny_vit, output=tmp_path / "out", resume=True, log=said.append, **{**settings, "keep_checkpoints": 1})
    assert sorted(p.name for p in checkpoints.iterdir()) == ["run.json", "step-00000001", "step-00000003"]
    assert sorted(p.relative_to(first).as_posix() for p in first.rglob("*")) == [
        "empty", "eval", "eval/result.json", "notes.txt"
    ]  # fmt: skip
    assert (first / "notes.txt").read_text() == "mine"
    assert (
        f"deleted checkpoint '{first}' but kept the folder: it holds files retrofit did not write (empty, "
        "eval/result.json, notes.txt); move them out of the checkpoint folder"
    ) in said
    shutil.move(first / "notes.txt", checkpoints / "step-00000003" / "notes.txt")
    shutil.rmtree(first)
    with pytest.raises(RetrofitError, match=r"step-00000003' holds files retrofit did not write \(notes.txt\), which"):
        finetune(tiny_vit, output=tmp_path / "out", overwrite=True, **settings)
    assert (checkpoints / "step-00000003" / "model.safetensors").is_file()
    (checkpoints / "step-00000003" / "notes.txt").unlink()
    assert finetune(tiny_vit, output=tmp_path / "out", overwrite=True, **settings).steps == 3


def test_an_interrupted_run_finishes_its_tracker(tiny_vit, colours, tmp_path, monkeypatch):
    """--report-to tensorboard: a run stopped by Ctrl-C (or any error) mid-run closes its tracker's writer (its event
    file flushed, no writer thread left behind in a notebook), as a run that ends does."""
    import threading

    real, calls = train_module.compute_loss, {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "compute_loss", interrupted)
    before = set(threading.enumerate())
    settings = dict(after_layer=2, num_tokens=4, data=colours, loss="ce", max_steps=3, report_to="tensorboard")
    with pytest.raises(KeyboardInterrupt):
        finetune(tiny_vit, output=tmp_path / "o", **settings, **FAST)
    left = [thread for thread in set(threading.enumerate()) - before if thread.is_alive()]
    assert not left, left
    events = list((tmp_path / "o-checkpoints" / "logs").rglob("events.out.tfevents*"))
    assert events and all(event.stat().st_size > 0 for event in events)


def test_the_card_names_a_fraction_of_an_epoch_as_it_is():
    """A few steps of a large data set are a small fraction of an epoch: the card said '(0.0 epochs)'."""
    from retrofit.finetune import _training_info
    from retrofit.settings import TrainingRun
    from retrofit.train import TrainResult

    run = TrainingRun(data="data", loss="ce", eval_split="")
    assert _training_info(run, TrainResult(steps=1, epochs=1 / 3000, last_loss=0.5), "random").epochs == 0.000333
    assert _training_info(run, TrainResult(steps=5, epochs=5 / 3, last_loss=0.5), "random").epochs == 1.667


def test_a_run_resumed_without_evaluations_reports_no_stale_accuracy(tiny_vit, colours, tmp_path):
    """Resumed with --eval-split '' (no evaluation), a run's last evaluation is one from before the interruption: the
    card gave it as the trained model's accuracy ("accuracy on `colours` None ...: 0.6667", of step 1)."""
    settings = dict(after_layer=2, num_tokens=4, data=colours, loss="ce", max_steps=3, eval_every=1, **FAST)
    said: list[str] = []  # --resume on a folder without checkpoints starts from the beginning
    finetune(tiny_vit, output=tmp_path / "o", stop_after=1, resume=True, log=said.append, **settings)
    assert f"--resume: no checkpoint in '{tmp_path / 'o-checkpoints'}'; starting from the beginning" in said
    resumed = finetune(tiny_vit, output=tmp_path / "o", resume=True, **{**settings, "eval_split": ""})
    assert resumed.steps == 3 and resumed.eval_history == []  # step 1's, of images this run does not score, went
    assert resumed.final_accuracy is None and resumed.final_evaluation == {}
    assert "accuracy on" not in (tmp_path / "o" / "README.md").read_text()


def test_a_non_finite_loss_on_another_process_is_not_quoted_as_this_ones():
    """Under `accelerate launch`, every process stops when one's loss is NaN; the others quoted their own finite loss
    as what "became" non-finite ("the loss became 0.0007 at step 1")."""
    from retrofit.train import refuse_non_finite

    class Launch:  # another process's loss was NaN: the count over the processes is one more than this one's
        def reduce(self, tensor, reduction):
            return tensor + 1

    with pytest.raises(RetrofitError, match=r"^the loss became non-finite on another process at step 3; stopped"):
        refuse_non_finite(torch.tensor(0.5), Launch(), 3, None)
    with pytest.raises(RetrofitError, match=r"^the loss became nan at step 3; stopped"):
        refuse_non_finite(torch.tensor(float("nan")), Launch(), 3, None)
