"""Recipes: validation with nearest-key hints, overrides, the shipped recipes parse, and an end-to-end tiny run."""

from __future__ import annotations

import json
import random
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from test_data import make_imagefolder

from retrofit.cli import main
from retrofit.errors import RetrofitError
from retrofit.recipes import load_recipe, run_recipe

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def write(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe))
    return path


def tiny_recipe(source, data, output) -> dict:
    return {
        "source": str(source),
        "merge": {"after_layer": 2, "tokens": 4},
        "data": {"name": str(data)},
        "training": {"loss": "kd", "max_steps": 3, "batch_size": 8, "save_every": 2},
        "evaluation": {"batch_size": 12, "speed_batch_size": 4},
        "export": {"output": str(output)},
    }


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_are_valid(path):
    recipe = load_recipe(path)
    assert recipe["export"]["output"] and recipe["data"]["name"]


def test_mistyped_keys_name_the_nearest(tmp_path, capsys):
    recipe = tiny_recipe("x", "y", tmp_path / "out")
    recipe["training"]["learning_rate"] = 1e-3
    path = write(tmp_path / "bad.yaml", recipe)
    with pytest.raises(RetrofitError, match="unknown key 'training.learning_rate'.*"):
        load_recipe(path)
    recipe["training"].pop("learning_rate")
    recipe["trainng"] = {}
    write(path, recipe)
    with pytest.raises(RetrofitError, match="unknown key 'trainng'.*did you mean 'training'"):
        load_recipe(path)
    assert main(["run", str(path)]) == 2
    assert main(["run", str(RECIPES / "fashion-mnist.yaml"), "--set", "training.epoch=2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "did you mean 'training'" in err[0] and "did you mean 'epochs'" in err[1]
    assert not (tmp_path / "out").exists()
    # a key given twice, with two values: the last one won without a word
    fashion = str(RECIPES / "fashion-mnist.yaml")
    twice = {"an option": ["--lr", "0.1"], "an earlier --set": ["--set", "training.lr=0.1"]}
    for other, first in twice.items():
        argv = [*first, "--set", "training.lr=0.2"]
        assert main(["run", fashion, *argv]) == 2
        assert f"--set 'training.lr=0.2' gives training.lr another value than {other} does (0.1); give it" in (
            capsys.readouterr().err
        )
    assert main(["run", fashion, "--lr", "0.1", "--set", "training={lr: 0.2}"]) == 2  # a whole section gives it too
    assert "gives training.lr another value than an option does (0.1)" in capsys.readouterr().err


def test_a_value_given_twice_alike_is_one_value_and_numbers_read_as_the_options_read_them(monkeypatch, capsys):
    """`--set training.lr=1e-4` after `--lr 1e-4` was refused as "another value" (YAML 1.1 reads 1e-4 as text), and
    `--set merge.tokens=010` or `tokens: 010` merged into 8 tokens (YAML 1.1's octal) where `--tokens 010` gives 10.
    A text setting keeps text that spells a number: `--data-revision 1234e56` (a short commit) was refused."""
    from retrofit import recipes

    ran = []
    monkeypatch.setattr(recipes, "_run_recipe", lambda path, overrides, **kw: ran.append(overrides) or {})
    fashion = str(RECIPES / "fashion-mnist.yaml")
    twice = (["--lr", "1e-4", "--set", "training.lr=1e-4"], ["--set", "training.lr=1e-4", "--set",
             "training={lr: 1.0e-4}"], ["--tokens", "010", "--set", "merge.tokens=10"], ["--tokens", "08", "--set",
             "merge.tokens=08"], ["--mixed-precision", "no", "--set", "training.mixed_precision=no"])  # fmt: skip
    for argv in twice:
        assert main(["run", fashion, *argv]) == 0, capsys.readouterr().err
    assert main(["run", fashion, "--data-revision", "1234e56", "--set", "training.alpha=+.5"]) == 0
    read = [recipes.load_recipe(fashion, overrides) for overrides in ran]
    assert read[0]["training"]["lr"] == read[1]["training"]["lr"] == 1e-4
    assert read[2]["merge"]["tokens"] == 10 and read[3]["merge"]["tokens"] == 8
    assert read[4]["training"]["mixed_precision"] == "no"
    assert read[5]["data"]["revision"] == "1234e56" and read[5]["training"]["alpha"] == 0.5


def test_a_recipe_file_that_is_no_recipe_is_one_line(tmp_path, capsys):
    """A folder, an empty file, a key given twice (PyYAML keeps the last silently: `training:` twice dropped the
    first section's settings), YAML nested too deeply (a RecursionError traceback), an alias repeated inside itself
    (the error message's repr of a billion-item list hung), and in Python a recipe or overrides of the wrong type:
    each is one `RetrofitError` line, at once."""
    from retrofit.recipes import parse_value

    recipe = yaml.safe_dump(tiny_recipe("x", "y", tmp_path / "out"))
    repeated = tmp_path / "twice.yaml"
    repeated.write_text(recipe + "training:\n  lr: 1.0e-3\n")
    (tmp_path / "empty.yaml").write_text("# nothing yet\n")
    deep = sys.getrecursionlimit() + 100  # each level is a frame of PyYAML's composer at least: a RecursionError
    (tmp_path / "deep.yaml").write_text("name: " + "[" * deep + "]" * deep + "\n")
    aliases = [f"  - &a0 [{', '.join(['lol'] * 9)}]"]
    aliases += [f"  - &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
    (tmp_path / "aliases.yaml").write_text("name:\n" + "\n".join(aliases) + "\n")
    (tmp_path / "loop.yaml").write_text("name: &a [*a]\n")
    for name, message in [
        ("", "is a folder; pass a YAML file"),
        ("/dev/null", "is not a file \\(a pipe or a device\\?\\); save the recipe to a file first"),
        ("empty.yaml", "is empty; start from one in recipes/"),
        ("twice.yaml", "sets 'training' twice in one mapping \\(lines 12 and 17\\); keep one"),
        ("deep.yaml", "is nested too deeply to read"),
        ("aliases.yaml", "holds more than 10,000 values"),
        ("loop.yaml", "holds more than 10,000 values"),
    ]:
        with pytest.raises(RetrofitError, match=message):
            load_recipe(tmp_path / name)
    # A key merged in (<<) may be set again beside it (that is what merging is for), and aliases still work.
    merged = recipe.replace("training:\n", "training:\n  <<: {lr: 1.0e-2, max_steps: 5}\n")
    (tmp_path / "merged.yaml").write_text(merged.replace("tokens: 4", "tokens: &m 4").replace("size: 8", "size: *m"))
    loaded = load_recipe(tmp_path / "merged.yaml")["training"]
    assert (loaded["lr"], loaded["max_steps"], loaded["batch_size"]) == (1e-2, 3, 4)
    assert main(["run", str(tmp_path / "deep.yaml")]) == 2 and main(["run", str(repeated)]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 2
    for path, overrides, message in [
        (5, None, "a recipe is a YAML file's path, such as recipes/fashion-mnist.yaml, not a int"),
        ({"source": "x"}, None, "not a dict"),
        (repeated, ["training.lr=1"], "overrides must be a mapping such as {'training.lr': 1e-4}, not a list"),
        (tmp_path / "merged.yaml", {5: 1}, "an override's key is dotted text such as 'training.lr', not a int"),
    ]:
        with pytest.raises(RetrofitError, match=re.escape(message)):
            run_recipe(path, overrides)
    with pytest.raises(RetrofitError, match=re.escape("log must be a function taking one line of text (print; lambda")):
        run_recipe(tmp_path / "merged.yaml", log=None)  # a TypeError traceback from inside the run
    with pytest.raises(RetrofitError, match="nested too deeply"):
        parse_value("[" * deep)
    # An integer of thousands of digits (Python refuses to convert it: a ValueError traceback), in the file or --set.
    (tmp_path / "long.yaml").write_text(recipe.replace("max_steps: 3", "max_steps: " + "9" * 5000))
    with pytest.raises(RetrofitError, match="holds a value YAML cannot read"):
        load_recipe(tmp_path / "long.yaml")
    with pytest.raises(RetrofitError, match="training.max_steps in recipe .* must be a whole number"):
        load_recipe(tmp_path / "merged.yaml", {"training.max_steps": parse_value("9" * 5000)})


def test_yaml_no_is_the_word_no_where_a_setting_offers_it(tmp_path):
    """YAML 1.1 reads ``no`` as false: ``mixed_precision: no`` in a file and ``--set training.mixed_precision=no``
    must still mean "no mixed precision", while a true/false setting keeps its boolean and a bad one is refused."""
    from retrofit.recipes import parse_value

    path = tmp_path / "r.yaml"
    text = yaml.safe_dump(tiny_recipe("x", "y", tmp_path / "out")).replace(
        "loss: kd", "loss: kd\n  mixed_precision: no"
    )
    path.write_text(text)
    assert load_recipe(path)["training"]["mixed_precision"] == "no"
    overrides = {"training.mixed_precision": parse_value("no"), "training.gradient_checkpointing": parse_value("no")}
    recipe = load_recipe(write(tmp_path / "s.yaml", tiny_recipe("x", "y", tmp_path / "out")), overrides)
    assert recipe["training"]["mixed_precision"] == "no" and recipe["training"]["gradient_checkpointing"] is False
    with pytest.raises(RetrofitError, match="training.mixed_precision .*must be one of no, bf16, fp16, not True"):
        load_recipe(path, {"training.mixed_precision": parse_value("yes")})


def test_run_a_tiny_recipe_with_overrides(tiny_vit, tmp_path, capsys):
    data = make_imagefolder(tmp_path / "colours", per_class=4, test_per_class=4)
    path = write(tmp_path / "tiny.yaml", tiny_recipe(tiny_vit, data, tmp_path / "ignored"))
    out = tmp_path / "out"
    options = ["--set", "training.max_steps=2", "--loss", "mix", "--batch-size", "4", "--set", "data.eval_limit=6"]
    assert main(["run", str(path), "--output", str(out), *options]) == 0
    printed, err = capsys.readouterr()  # the before/after table on stdout, the log on stderr
    assert "at batch 4)" in err  # --batch-size is the training's (it set evaluation.batch_size, which has none)
    assert "| baseline" in printed and "no training" in printed and "fine-tuned (2 steps, loss mix)" in printed
    assert printed.startswith("| model |") and "wrote" not in printed and "wrote" in err
    assert (out / "model.safetensors").exists() and not (tmp_path / "ignored").exists()
    card = (out / "README.md").read_text()
    assert "| baseline" in card and "images/s: " in card and " CPU (" in card  # the speed says what it ran on
    assert "fp32, batch 4 at 32×32" in card  # evaluation.speed_batch_size, not evaluation.batch_size (12)
    assert f"This is `{Path(tiny_vit).name}`" in card  # a local source by its name (no local path in an export)
    # which images the accuracies are on (data.eval_limit: the split's first 6), in the table and in how it was made
    assert "scored on `colours` test: the first 6 images" in card and "scored on `colours` test: the first 6" in printed
    assert re.search(r"accuracy on `colours` test \(the first 6 images\): \d+\.\d{2} %", card)
    rows = json.loads((tmp_path / "out-checkpoints" / "results.json").read_text())["rows"]
    speeds = [row["images_per_s"] for row in rows]  # the merged model's speed on both of its rows, the source's apart
    assert speeds[1] == speeds[2] != speeds[0] and None not in speeds
    random.seed(7), np.random.seed(7), torch.manual_seed(7)  # a caller's own generators, which the run seeds
    before = random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state()
    logged: list[str] = []  # a speed batch larger than memory: n/a in the table, and a line that says why
    overrides = {"export.output": str(out), "evaluation.speed_batch_size": 10**11}
    summary = run_recipe(path, overrides, overwrite=True, log=logged.append)
    assert summary["steps"] == 3 and len(summary["rows"]) == 3
    assert all(row.get("images_per_s") is None for row in summary["rows"])
    assert any("images/s not measured at evaluation.speed_batch_size 100000000000" in line for line in logged)
    assert "not measured (out of memory?)" in (out / "README.md").read_text()
    after = random.getstate(), np.random.get_state()[1], torch.get_rng_state()
    assert after[0] == before[0] and (after[1] == before[1]).all() and torch.equal(after[2], before[2])
    # data.holdout: the baseline and the fine-tuned model are scored on the images it keeps out of training
    run_recipe(path, {"export.output": str(out), "data.holdout": 0.25}, overwrite=True, log=logged.append)
    held = "scored on `colours` train, the 25 % held out of training (--holdout 0.25): all 3 images"
    assert held in (out / "README.md").read_text()
    # Resuming those checkpoints with another merge is refused before the baseline is scored and timed (on ImageNet,
    # minutes of work that the refusal made useless).
    logged.clear()
    with pytest.raises(RetrofitError, match="holds checkpoints of a run with --tokens 4, not 3"):
        run_recipe(path, {"export.output": str(out), "merge.tokens": 3}, resume=True, log=logged.append)
    assert not any("baseline" in line for line in logged), logged
    # A merge out of the model's range names the recipe key it came from (the options' names meant nothing to `run`).
    capsys.readouterr()
    for option, key, value, problem in (
        ("--after-layer", "after_layer", "4", "this model has 4 layers, so use 1..3"),
        ("--tokens", "tokens", "16", "the model has 16 patch tokens, so use 1..15"),
    ):
        assert main(["run", str(path), "--output", str(tmp_path / "wide"), option, value]) == 2
        error = f"retrofit: error: recipe '{path}': merge.{key} {value} is out of range: {problem}"
        assert capsys.readouterr().err.strip().splitlines()[-1] == error
    assert not (tmp_path / "wide").exists()


def test_a_recipe_that_does_not_score_the_baseline_still_gives_the_agreement_it_trained_with(tiny_vit, tmp_path):
    """evaluation.before off, kd on an evaluation split of classes the model does not know: the training scored
    agreement with the teacher, and the fine-tuned row holds it (it held an empty accuracy). Resumed with
    evaluation.before on, the run's first evaluation is after training: no row calls it the untrained merged model."""
    data = make_imagefolder(tmp_path / "colours", per_class=4, test_per_class=2)
    for old, new in zip(("cat", "dog", "bird"), ("lion", "tiger", "bear"), strict=True):
        (data / "test" / old).rename(data / "test" / new)
    recipe = tiny_recipe(tiny_vit, data, tmp_path / "out")
    recipe["evaluation"] |= {"before": False, "speed": False}
    path = write(tmp_path / "tiny.yaml", recipe)
    summary = run_recipe(path, log=lambda _: None)
    baseline, tuned = summary["rows"]
    assert 0 <= tuned["teacher_agreement"] <= 1 and tuned.get("accuracy") is None and "accuracy" not in baseline
    resumed = run_recipe(path, {"evaluation.before": True}, resume=True, log=lambda _: None)
    assert len(resumed["rows"]) == 2 and not any("no training" in row["model"] for row in resumed["rows"])


def test_pretrain_recipe_with_nested_overrides(tmp_path, capsys):
    """A `pretrain` recipe trains a plain ViT; `--set` reaches inside pretrain.model, and a mistyped ViTConfig field
    is refused (transformers configs would accept it silently) before anything is written."""
    from transformers import AutoModelForImageClassification

    data = make_imagefolder(tmp_path / "colours", per_class=4, test_per_class=2, size=16)
    recipe = {
        "pretrain": {"model": {"image_size": 16, "patch_size": 4, "hidden_size": 16, "num_hidden_layers": 2,
                               "num_attention_heads": 2, "intermediate_size": 32}},
        "data": {"name": str(data)},
        "training": {"loss": "ce", "max_steps": 2, "batch_size": 4},
        "export": {"output": str(tmp_path / "baseline")},
    }  # fmt: skip
    path = write(tmp_path / "pretrain.yaml", recipe)
    overrides = ("pretrain.model.hiden_size=32", "pretrain.model.hidden_size.x=1", "pretrain.model.num_labels=3",
                 "pretrain.model.model_type=vit", "pretrain.model.return_dict=false")  # fmt: skip
    for override in overrides:
        assert main(["run", str(path), "--set", override]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 5 and "unknown ViTConfig field 'hiden_size'" in err[0] and "did you mean 'hidden_size'" in err[0]
    assert "only pretrain.image_processor, pretrain.model take a third key" in err[1]
    assert "pretrain.model.num_labels is taken from the data's class names" in err[2]
    # accepted, model_type failed after the data was read ("cannot tell which ViT class"), dtype did nothing
    # a traceback after the data was read (return_dict), or a run that failed there (model_type)
    assert "pretrain.model.model_type is not a setting of the model: the pretraining sets it itself" in err[3]
    assert "pretrain.model.return_dict is not a setting of the model" in err[4]
    assert not (tmp_path / "baseline").exists()

    assert main(["run", str(path), "--set", "pretrain.model.hidden_size=24", "--set", "training.max_steps=1"]) == 0
    model = AutoModelForImageClassification.from_pretrained(tmp_path / "baseline")
    assert model.config.hidden_size == 24 and model.config.num_labels == 3
    assert model.config.id2label[0] in {"bird", "cat", "dog"}
    capsys.readouterr()
    logged: list[str] = []  # from Python: no progress bar when asked, the accuracy as the CLI's tables give it
    summary = run_recipe(path, {"training.max_steps": 1}, overwrite=True, progress=False, log=logged.append)
    assert "train:" not in capsys.readouterr().err and summary["steps"] == 1
    assert re.fullmatch(r"baseline accuracy: \d+\.\d\d %; trained 1 step in .*", logged[-1]), logged[-1]


def test_a_recipe_says_which_kind_of_run_it_is_whole(tmp_path):
    """A fine-tune needs its source and both merge keys (one alone left the run to fail after loading, naming
    command-line options the recipe has none of); a recipe naming a source and a pretrain section would pretrain
    and drop the source without a word."""
    fine_tune = tiny_recipe("x", "y", tmp_path / "out")
    for merge in ({"after_layer": 2}, {"tokens": 4}):
        with pytest.raises(RetrofitError, match="needs merge.after_layer and merge.tokens"):
            load_recipe(write(tmp_path / "r.yaml", fine_tune | {"merge": merge}))
    with pytest.raises(RetrofitError, match="needs 'source' .* or a 'pretrain' section"):
        load_recipe(write(tmp_path / "r.yaml", {key: value for key, value in fine_tune.items() if key != "source"}))
    pretraining = {"pretrain": {"model": {"image_size": 16}}, "data": {"name": "y"}, "export": {"output": "o"}}
    with pytest.raises(
        RetrofitError, match="has both 'source' and 'pretrain'; a recipe either fine-tunes or pretrains"
    ):
        load_recipe(write(tmp_path / "r.yaml", pretraining | {"source": "x"}))


def test_a_recipes_evaluation_batch_size_is_its_training_evaluations(tmp_path, monkeypatch):
    """``evaluation.batch_size`` is the batch of the evaluations during training (``training.eval_batch_size`` where
    given), of a fine-tune and of a pretraining alike; dropped, they ran at the training's batch size."""
    import importlib
    from types import SimpleNamespace

    from retrofit.recipes import finetune_args

    recipe = tiny_recipe("x", "y", tmp_path / "out")  # training.batch_size 8, evaluation.batch_size 12
    args = finetune_args(load_recipe(write(tmp_path / "r.yaml", recipe)), overwrite=False, resume=False)
    assert (args.batch_size, args.eval_batch_size) == (8, 12)
    given = load_recipe(tmp_path / "r.yaml", {"training.eval_batch_size": 5})
    assert finetune_args(given, overwrite=False, resume=False).eval_batch_size == 5
    called = {}

    def pretrain(model, **settings):
        called.update(settings)
        return SimpleNamespace(steps=1, final_accuracy=None, seconds=1.0)

    monkeypatch.setattr(importlib.import_module("retrofit.finetune"), "pretrain", pretrain)
    pretraining = {"pretrain": {"model": {"image_size": 16}}, "data": {"name": "y"}, "export": {"output": "o"},
                   "training": {"batch_size": 8}, "evaluation": {"batch_size": 12}}  # fmt: skip
    run_recipe(write(tmp_path / "p.yaml", pretraining), log=lambda _: None)
    assert (called["batch_size"], called["eval_batch_size"]) == (8, 12)


def test_a_pretraining_recipe_refuses_what_only_a_fine_tune_reads(tmp_path, capsys):
    """`run PRETRAIN.yaml --tokens 8` (or merge:, teacher: in the file) merged nothing without a word; a pretraining
    key is taken by --set as in the file; `--set pretrain=5` names pretrain, not a training key it confused."""
    recipe = {"pretrain": {"model": {"image_size": 16}}, "data": {"name": "x"}, "export": {"output": "o"}}
    path = write(tmp_path / "pretrain.yaml", recipe)
    for argv in (["--tokens", "8"], ["--teacher", "t"], ["--set", "evaluation.speed=false"]):
        assert main(["run", str(path), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all("pretrains from scratch, which reads no" in line for line in err)
    assert "merge.*" in err[0] and "teacher" in err[1] and "evaluation.speed" in err[2]
    with pytest.raises(RetrofitError, match="reads no merge"):
        load_recipe(write(path, recipe | {"merge": {"after_layer": 3}}))
    path = write(path, recipe | {"evaluation": {"batch_size": 8}})
    overrides = {"training.caption_templates": ["a {}"], "training.loss": "contrastive"}
    assert load_recipe(path, overrides)["training"]["caption_templates"] == ("a {}",)
    fine_tune = write(tmp_path / "tiny.yaml", tiny_recipe("x", "y", "o"))
    with pytest.raises(RetrofitError, match="unknown key 'training.caption_templates'"):
        load_recipe(fine_tune, overrides)
    with pytest.raises(RetrofitError, match="'pretrain' in recipe .* must be a mapping"):
        load_recipe(fine_tune, {"pretrain": 5})
    with pytest.raises(RetrofitError, match="unknown override 'name.x'; 'name' holds no keys"):
        load_recipe(fine_tune, {"name.x": 5})
    # what trains, distillation's and the prompts' settings: taken and recorded as what trained, though every
    # parameter trained on labels alone
    for key, value in (("train", "merger-and-after"), ("prompt_templates", ["x {}"]), ("temperature", 3.0),
                       ("alpha", 0.2), ("prompt_weight", 1.0), ("merger_lr_scale", 10.0)):  # fmt: skip
        with pytest.raises(RetrofitError, match=f"training.{key} in recipe .* pretraining from scratch does not read"):
            load_recipe(path, {f"training.{key}": value})
    with pytest.raises(RetrofitError, match="training.feature_weight in recipe .* pretraining from scratch has no"):
        load_recipe(path, {"training.feature_weight": 0.7})
    with pytest.raises(RetrofitError, match="training.caption_templates .* not of --loss ce"):
        load_recipe(path, {"training.caption_templates": ["a sketch of {}"]})  # a ViT's pretraining: no captions
    from retrofit.finetune import pretrain

    with pytest.raises(RetrofitError, match="train is for fine-tuning a merged model"):
        pretrain({}, output=tmp_path / "p", data="x", train="merger-and-after")


def test_values_of_the_wrong_type_are_refused_and_1e_4_is_a_number(tmp_path, capsys):
    """PyYAML reads `lr: 1e-4` as text (YAML 1.1 wants 1.0e-4): retrofit reads it as the number the user meant.
    Other wrong types are one-line errors naming the key, before anything is loaded."""
    from retrofit.recipes import parse_value

    recipe = tiny_recipe("x", "y", tmp_path / "out")
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe).replace("max_steps: 3", "max_steps: 3\n  lr: 1e-4"))
    assert "lr: 1e-4" in path.read_text() and load_recipe(path)["training"]["lr"] == 1e-4
    # YAML 1.1 reads 1:30 in base 60 (90 epochs, or a name "must be text, not 90"); YAML 1.2, and retrofit, as text.
    timed = tmp_path / "timed.yaml"
    timed.write_text(path.read_text().replace("max_steps: 3", "max_steps: 3\n  epochs: 1:30") + "name: 1:30\n")
    with pytest.raises(RetrofitError, match="training.epochs in recipe .* must be a finite number, not '1:30'"):
        load_recipe(timed)
    assert load_recipe(path, {"name": parse_value("1:30")})["name"] == "1:30"
    assert load_recipe(path, {"training.lr": "3e-3"})["training"]["lr"] == 3e-3
    for dotted, value, message in [
        ("merge.tokens", {"a": 1}, "merge.tokens in recipe '.*' must be a whole number, not {'a': 1}"),
        ("merge.tokens", 0, "merge.tokens in recipe '.*' must be at least 1 \\(got 0\\)"),
        ("merge.calibrate", "yes", "merge.calibrate in recipe '.*' must be true or false, not 'yes'"),
        ("evaluation.speed_batch_size", 2.5, "evaluation.speed_batch_size in recipe '.*' must be a whole number"),
        ("source", 5, "source in recipe '.*' must be text, not 5"),
        ("training", [], "'training' in recipe '.*' must be a mapping with keys"),  # was read as an empty section
        ("training", False, "'training' in recipe '.*' must be a mapping with keys"),
    ]:
        with pytest.raises(RetrofitError, match=message):
            load_recipe(path, {dotted: value})
    assert main(["run", str(path), "--set", "training.batch_size=16.5"]) == 2
    assert main(["run", str(path), "--set", "training.lr=.nan"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"retrofit: error: training.batch_size in recipe '{path}' must be a whole number, not 16.5",
        f"retrofit: error: training.lr in recipe '{path}' must be a finite number, not nan",
    ]


def test_a_runs_speed_note_flags_passes_that_spread_as_bench_does(tiny_vit):
    """The before/after table a run writes into the card gave images/s and a speed-up measured on a loaded machine
    without a word (bench and sweep flag repeats that spread by more than 10 % of their median); now its note does."""
    from retrofit.benchmark import images_per_second
    from retrofit.loading import load_model
    from retrofit.recipes import _speed_note

    model, spreads = load_model(tiny_vit), {}
    speeds = images_per_second({"baseline": model, "merged": model}, batch_size=2, spreads=spreads)
    assert set(spreads) == set(speeds) and all(value >= 0 for value in spreads.values())
    steady = _speed_note("Test CPU", 32, (224, 224), {"baseline": 100.0, "merged": 180.0}, {"baseline": 0.04})
    assert steady == "images/s: Test CPU, fp32, batch 32 at 224×224, median of 5 passes, the two models alternated"
    noisy = _speed_note("Test CPU", 32, (224, 224), {"baseline": 100.0, "merged": 180.0}, {"baseline": 0.04,
                        "merged": 0.3})  # fmt: skip
    assert noisy == steady + (
        "; ⚠ passes spread over 10 % of the median (merged 30 %: a loaded machine?), so the speed-up may be noise"
    )
    none = _speed_note("Test CPU", 32, (224, 224), {"baseline": None, "merged": None}, {"baseline": None})
    assert none == steady + "; not measured (out of memory?): lower evaluation.speed_batch_size"
    # one model out of memory (the larger baseline) is said too: its row says n/a and the speed-up has no reference
    assert _speed_note("Test CPU", 32, (224, 224), {"baseline": None, "merged": 180.0}, {}) == none


def test_a_runs_table_puts_each_cell_under_its_column():
    """The before/after table of a dual encoder: feature similarity as a cosine, zero-shot top-1 and agreement with
    the baseline as percentages, each under its own header, and a speed-up over the baseline row; kd without labels
    the model knows gives agreement with the teacher instead of an accuracy."""
    from retrofit.recipes import results_table

    rows = [{"model": "base", "similarity": 1.0, "zero_shot_top1": 0.5, "agreement": 1.0, "gflops": 2.0,
             "images_per_s": 100.0},
            {"model": "merged", "similarity": 0.875, "zero_shot_top1": 0.25, "agreement": 0.75, "gflops": 1.0,
             "images_per_s": 150.0}]  # fmt: skip
    assert results_table(rows, note="scored on x").splitlines() == [
        "| model | feature similarity | zero-shot top-1 | agreement with the baseline | GFLOPs/image "
        "| images/s (measured) | speed-up |",
        "|---|---|---|---|---|---|---|",
        "| base | 1.0000 | 50.00 % | 100.00 % | 2.0000 | 100 | 1.00x |",
        "| merged | 0.8750 | 25.00 % | 75.00 % | 1.0000 | 150 | 1.50x |",
        "",
        "scored on x",
    ]
    rows = [{"model": "base", "teacher_agreement": 1.0, "gflops": 2.0}, {"model": "m", "teacher_agreement": None,
            "gflops": 1.0}]  # fmt: skip
    assert results_table(rows).splitlines()[::2] == [
        "| model | agreement with the teacher | GFLOPs/image | images/s (measured) | speed-up |",
        "| base | 100.00 % | 2.0000 | n/a | n/a |",
    ]
    assert results_table(rows).splitlines()[-1] == "| m | n/a | 1.0000 | n/a | n/a |"


def test_a_dual_encoder_recipe_reports_zero_shot_before_and_after(tmp_path, capsys):
    """`evaluation.zero_shot`: the before/after table of a CLIP recipe has zero-shot top-1 and agreement with the
    baseline for the baseline, the untrained merger and the fine-tuned model; the card carries it."""
    import torch
    from conftest import save_tiny, tiny_clip_tokenizer
    from test_families import _clip

    from retrofit import evaluate_models

    source, teacher = tmp_path / "clip", tmp_path / "teacher"
    for seed, folder in ((0, source), (6, teacher)):  # seed 6: a teacher of another zero-shot top-1 than the source
        torch.manual_seed(seed)
        save_tiny(_clip(), folder)
        tiny_clip_tokenizer().save_pretrained(folder)
    data = make_imagefolder(tmp_path / "animals", per_class=4, test_per_class=4)
    recipe = tiny_recipe(source, data, tmp_path / "out") | {"teacher": str(teacher)}
    recipe["merge"]["calibrate"] = False
    recipe["training"] |= {"prompt_weight": 1.0, "batch_size": 4, "lr": 0.1}  # a step that moves its predictions
    recipe["evaluation"] |= {"zero_shot": True, "prompt_template": "a {}."}
    summary = run_recipe(write(tmp_path / "clip.yaml", recipe), log=lambda *_: None)
    baseline, untrained, trained = summary["rows"]
    assert baseline["agreement"] == 1.0 and "similarity" in trained
    assert all(0 <= row["zero_shot_top1"] <= 1 for row in (baseline, untrained, trained))
    # The baseline row is the source (not the teacher the recipe names, whose similarity to itself is no 1.0), and
    # the untrained merger says it starts random (merge.calibrate false).
    # The fine-tuned row's agreement is with the baseline's predictions (not its own: 100 % whatever it predicts).
    report = evaluate_models([source, tmp_path / "out"], data=data, split="test", zero_shot=True,
                             prompt_template="a {}.", log=print)  # fmt: skip
    assert baseline["zero_shot_top1"] == report["models"][0]["top1"] and baseline["similarity"] is None
    merged = report["models"][1]
    assert (trained["zero_shot_top1"], trained["agreement"]) == (merged["top1"], merged["agreement"]), merged
    assert untrained["model"] == "merged K=2 M=4, random init, no training"
    card = (tmp_path / "out" / "README.md").read_text()
    assert "| zero-shot top-1 | agreement with the baseline |" in card
    assert "; zero-shot over one prompt per class, like 'a bird.'" in card  # the prompts were named nowhere
    recipe["evaluation"]["prompt_template"] = "a photo"
    with pytest.raises(RetrofitError, match="evaluation.prompt_template .*must hold exactly one"):
        load_recipe(write(tmp_path / "bad.yaml", recipe))


def test_a_resumed_dual_encoder_recipe_gives_its_calibrated_start_no_zero_shot_score_of_another_model(tmp_path):
    """A resumed run does not calibrate again: the "calibrated init, no training" row's zero-shot cells scored the
    random merger the resumed run starts from, not the calibrated one its checkpoints began with. They are n/a; its
    similarity (from the checkpoints' record of the step-0 evaluation) and the other rows are scored as before."""
    import torch
    from conftest import save_tiny, tiny_clip_tokenizer
    from test_families import _clip

    from retrofit.finetune import run_finetune
    from retrofit.recipes import finetune_args

    source = tmp_path / "clip"
    torch.manual_seed(0)
    save_tiny(_clip(), source)
    tiny_clip_tokenizer().save_pretrained(source)
    data = make_imagefolder(tmp_path / "animals", per_class=4, test_per_class=4)
    recipe = tiny_recipe(source, data, tmp_path / "out")
    recipe["merge"]["calibrate"] = True
    recipe["training"] |= {"batch_size": 4, "save_every": 1}
    recipe["evaluation"] |= {"zero_shot": True, "speed": False}
    path = write(tmp_path / "clip.yaml", recipe)
    whole = run_recipe(path, progress=False, log=lambda *_: None)["rows"]
    assert whole[1]["model"].endswith("calibrated init, no training") and whole[1]["zero_shot_top1"] is not None
    recipe["export"]["output"] = str(tmp_path / "cut")
    path = write(tmp_path / "clip.yaml", recipe)
    # as the recipe's run (its step-0 evaluation included), interrupted after step 1
    run_finetune(finetune_args(load_recipe(path), overwrite=False, resume=False), eval_at_start=True, stop_after=1,
                 progress=False, log=lambda _: None)  # fmt: skip
    lines: list[str] = []
    resumed = run_recipe(path, resume=True, progress=False, log=lines.append)["rows"]
    assert resumed[1]["model"] == whole[1]["model"]
    assert (resumed[1]["zero_shot_top1"], resumed[1]["agreement"]) == (None, None)
    assert resumed[1]["similarity"] == whole[1]["similarity"] and resumed[0] == whole[0]
    assert resumed[2]["zero_shot_top1"] == whole[2]["zero_shot_top1"]
    assert any("its calibrated start gets no zero-shot score" in line for line in lines)
    assert "| n/a | n/a |" in (tmp_path / "cut" / "README.md").read_text()


def test_a_mapping_given_for_a_section_sets_its_keys_and_null_is_refused(tmp_path, capsys):
    """`--set 'training={lr: 1.0e-4}'` replaced the whole section: max_steps (and epochs, loss, ...) fell back to their
    defaults without a word, so the run trained for full epochs. A mapping now sets the keys it names, also inside
    pretrain.model; `--set training=null`, which dropped the section, is one line."""
    from retrofit.recipes import parse_value

    path = write(tmp_path / "r.yaml", tiny_recipe("x", "y", tmp_path / "out"))
    recipe = load_recipe(path, {"training": parse_value("{lr: 1.0e-4, seed: 3}")})
    assert recipe["training"]["lr"] == 1e-4 and recipe["training"]["seed"] == 3
    assert (recipe["training"]["max_steps"], recipe["training"]["batch_size"], recipe["training"]["loss"]) == (
        3,
        8,
        "kd",
    )
    assert load_recipe(path, {"merge": {"tokens": 8}})["merge"] == load_recipe(path)["merge"] | {"tokens": 8}
    assert main(["run", str(path), "--set", "training=null"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "would drop every key of the recipe's training section" in err[0]
    model = {"image_size": 16, "patch_size": 4}
    pretraining = write(
        tmp_path / "p.yaml", {"pretrain": {"model": model}, "data": {"name": "y"}, "export": {"output": "o"}}
    )
    merged = load_recipe(pretraining, {"pretrain": {"model": {"hidden_size": 24}}})["pretrain"]["model"]
    assert merged == model | {"hidden_size": 24}
    assert not (tmp_path / "out").exists()


def test_a_prompt_template_without_zero_shot_is_refused(tmp_path):
    """`evaluation.prompt_template` is read by the zero-shot rows only: without `evaluation.zero_shot` a recipe's
    template was ignored without a word (evaluate refuses --prompt-template without --zero-shot)."""
    recipe = tiny_recipe("x", "y", tmp_path / "out")
    recipe["evaluation"]["prompt_template"] = "a drawing of a {}."
    path = write(tmp_path / "r.yaml", recipe)
    with pytest.raises(RetrofitError, match="evaluation.prompt_template .* is used with evaluation.zero_shot only"):
        load_recipe(path)
    assert load_recipe(path, {"evaluation.zero_shot": True})["evaluation"]["prompt_template"] == "a drawing of a {}."


def test_an_override_without_its_section_names_the_section(tmp_path):
    """`run_recipe(path, {"lr": 1e-4})` (or `--set lr=...`) listed the top-level keys; it names where the key lives."""
    path = write(tmp_path / "r.yaml", tiny_recipe("x", "y", tmp_path / "out"))
    with pytest.raises(RetrofitError, match=re.escape("unknown override 'lr'; did you mean 'training.lr'?")):
        load_recipe(path, {"lr": 1e-4})
    with pytest.raises(RetrofitError, match="did you mean 'training.batch_size' or 'evaluation.batch_size'"):
        load_recipe(path, {"batch_size": 4})


def test_a_recipe_continuing_an_export_does_not_call_it_the_unmerged_baseline(tiny_vit, tmp_path):
    """A recipe whose source is a retrofit export (merged, not recalibrated) gave a table whose "baseline" row was that
    merged export, and whose untrained row said "calibrated init" of a merger nobody calibrated; the card showed it.
    The merger now starts "as exported", and the baseline row is the model it names: then that row was labelled as
    the export, merged, but its accuracy and speed were the unmerged source's (the teacher's). It is now the source,
    named as such, with its own GFLOPs; without a teacher (loss ce), the export itself."""
    from retrofit import convert, evaluate_models

    # a copy of its own name: the other test process's tiny-vit holds the same weights, and the export's source is
    # found again by weights and folder name (the most recently used of two alike)
    tiny_vit = shutil.copytree(tiny_vit, tmp_path / "continued-vit")
    data = make_imagefolder(tmp_path / "colours", per_class=4, test_per_class=4)
    export = convert(str(tiny_vit), after_layer=2, num_tokens=4, output=tmp_path / "pm", log=lambda _: None).output
    recipe = tiny_recipe(export, data, tmp_path / "out")
    recipe["training"]["max_steps"], recipe["evaluation"]["speed"] = 1, False
    rows = run_recipe(write(tmp_path / "r.yaml", recipe), progress=False, log=lambda _: None)["rows"]
    assert [row["model"] for row in rows] == [
        f"baseline `{tiny_vit}` (the model `{export}` was made from)",
        "merged K=2 M=4, as exported, no training",
        "merged K=2 M=4, fine-tuned (1 step, loss kd)",
    ]
    scores = evaluate_models([str(tiny_vit), str(export)], data=str(data), log=lambda _: None)
    assert [rows[0]["accuracy"], rows[1]["accuracy"]] == [row["top1"] for row in scores["models"]]
    assert rows[0]["gflops"] == scores["models"][0]["gflops"] > rows[1]["gflops"] == scores["models"][1]["gflops"]
    card = (tmp_path / "out" / "README.md").read_text()
    assert "as exported, no training" in card and "calibrated init" not in card and " for 1 step (" in card
    recipe["training"]["loss"], recipe["export"]["output"] = "ce", str(tmp_path / "out2")  # no teacher
    rows = run_recipe(write(tmp_path / "r2.yaml", recipe), progress=False, log=lambda _: None)["rows"]
    assert rows[0]["model"] == f"baseline `{export}` (the export, already merged)"
    assert rows[0]["gflops"] == rows[1]["gflops"]


def test_a_run_resumed_without_evaluations_gives_its_trained_row_no_stale_score(tiny_vit, tmp_path):
    """A recipe resumed with data.eval_split '' (no evaluation) gave its fine-tuned row the score of an evaluation
    from before the interruption (step 1 of 3), as the trained model's, in the table and the card. Resumed with
    another training.max_steps, it trains its first budget, and its results.json recorded the other."""
    from retrofit.finetune import run_finetune
    from retrofit.recipes import finetune_args

    data = make_imagefolder(tmp_path / "colours", per_class=4, test_per_class=4)
    recipe = tiny_recipe(tiny_vit, data, tmp_path / "out")
    recipe["training"].update(max_steps=3, save_every=1, eval_every=1)
    recipe["evaluation"].update(speed=False, before=False)
    args = finetune_args(load_recipe(write(tmp_path / "r.yaml", recipe)), overwrite=False, resume=False)
    stopped = run_finetune(args, stop_after=1, progress=False, log=lambda _: None)
    assert stopped.eval_history[-1]["step"] == 1 and stopped.eval_history[-1]["accuracy"] is not None
    recipe["data"]["eval_split"] = ""
    recipe["training"]["max_steps"] = 50  # a resumed run keeps its first budget, and results.json says which it ran
    summary = run_recipe(write(tmp_path / "r.yaml", recipe), resume=True, progress=False, log=lambda _: None)
    (trained,) = summary["rows"][1:]
    assert summary["steps"] == 3 and trained["model"].endswith("fine-tuned (3 steps, loss kd)")
    assert trained.get("accuracy") is None  # not step 1's
    written = json.loads((tmp_path / "out-checkpoints" / "results.json").read_text())
    assert written["recipe"]["training"]["max_steps"] == summary["recipe"]["training"]["max_steps"] == 3


def test_a_run_resumed_on_other_evaluation_images_gives_no_stale_untrained_score(tiny_vit, tmp_path):
    """A recipe resumed with another data.eval_limit, or after its test folder was relabelled, showed its untrained
    row's score from the step-0 evaluation of its first run, on other images, under a note saying every row was
    scored on the new ones (75 % of 7 images). That cell is now n/a, and the log says why; the baseline and
    fine-tuned rows are scored on the new images."""
    from retrofit.finetune import run_finetune
    from retrofit.recipes import finetune_args

    data = make_imagefolder(tmp_path / "colours", per_class=4, test_per_class=4)

    def relabelled() -> None:  # two classes' test folders swapped: as many images, other labels
        test = data / "test"
        (test / "cat").rename(test / "swap")
        (test / "dog").rename(test / "cat")
        (test / "swap").rename(test / "dog")

    for name, change in (("limit", lambda recipe: recipe["data"].update(eval_limit=5)), ("labels", None)):
        recipe = tiny_recipe(tiny_vit, data, tmp_path / name)
        recipe["training"].update(max_steps=2, save_every=1)
        recipe["evaluation"].update(speed=False)
        args = finetune_args(load_recipe(write(tmp_path / "r.yaml", recipe)), overwrite=False, resume=False)
        stopped = run_finetune(args, eval_at_start=True, stop_after=1, progress=False, log=lambda _: None)
        assert stopped.eval_history[0]["step"] == 0 and stopped.eval_history[0]["accuracy"] is not None
        change(recipe) if change else relabelled()
        lines: list[str] = []
        summary = run_recipe(write(tmp_path / "r.yaml", recipe), resume=True, progress=False, log=lines.append)
        baseline, untrained, tuned = summary["rows"]
        assert untrained["model"].endswith("no training") and untrained["accuracy"] is None, name
        assert baseline["accuracy"] is not None and tuned["accuracy"] is not None
        assert any("the untrained row's score, from that run, is n/a" in line for line in lines)
    assert "the first 5 images" in (tmp_path / "limit" / "README.md").read_text()


def test_a_kill_once_the_export_is_written_leaves_it_with_its_results(tiny_vit, tmp_path):
    """A kill just after a recipe's export took its place, before its before/after table and retrofit_results.json
    went into it, left an export without them, which `push` uploaded as whole and a rerun refused as existing (a
    Ctrl-C waited for them; a SIGKILL cannot be made to). The table is in the export before it takes its place."""
    import subprocess

    data = make_imagefolder(tmp_path / "colours", per_class=4, test_per_class=4)
    recipe = tiny_recipe(tiny_vit, data, tmp_path / "out")
    recipe["evaluation"].update(speed=False)
    path = write(tmp_path / "r.yaml", recipe)
    script = ("import os, signal, sys\nfrom retrofit.recipes import run_recipe\n"
              "def log(line):\n    if line.startswith('wrote '):\n        os.kill(os.getpid(), signal.SIGKILL)\n"
              f"run_recipe({str(path)!r}, progress=False, log=log)\n")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert done.returncode == -9, done.stderr[-2000:]
    assert "Before and after fine-tuning" in (tmp_path / "out" / "README.md").read_text()
    assert "run" in json.loads((tmp_path / "out" / "retrofit_results.json").read_text())


def test_holdout_refuses_an_evaluation_split_someone_named_and_takes_a_recipes_place(tmp_path):
    """``--holdout`` scores the images it keeps out. Beside it, an evaluation split someone named is refused: ``finetune
    --holdout 0.1 --eval-split test`` scored the held-out images without a word, for 'test' equalled the default. A
    ``--holdout`` given to ``run`` takes the place of the recipe's ``eval_split`` (the shipped recipes name test);
    a recipe's ``eval_split: ''`` (score nothing) stays, and a recipe naming both is refused."""
    from retrofit.recipes import finetune_args
    from retrofit.settings import DataSettings, FinetuneArgs

    for split in ("test", "validation"):
        with pytest.raises(RetrofitError, match=f"--holdout evaluates on the images it holds out.*'{split}'; drop one"):
            FinetuneArgs(source="s", output="o", data="d", holdout=0.1, eval_split=split)
    assert main(["finetune", "s", "--after-layer", "2", "--tokens", "4", "--data", "d", "--holdout", "0.1",
                 "--eval-split", "test", "--output", str(tmp_path / "no")]) == 2  # fmt: skip
    assert not (tmp_path / "no").exists()
    held = DataSettings(data="d", holdout=0.1)
    assert held.images(evaluation=True)["split"] == "train" and held.eval_split  # scored: the held-out images
    assert DataSettings(data="d", holdout=0.1, eval_split="").eval_split is None  # kept out, not scored
    assert DataSettings(data="d", holdout=0.1, eval_split=None).eval_split is None
    assert json.dumps(DataSettings(data="d").eval_split) == '"test"' and type(DataSettings(data="d").eval_split) is str

    recipe = tiny_recipe("x", "y", tmp_path / "out") | {"data": {"name": "y", "eval_split": "test"}}
    path = write(tmp_path / "r.yaml", recipe)
    for overrides in ({"data.holdout": 0.1}, {"data": {"holdout": 0.1}}):
        args = finetune_args(load_recipe(path, overrides), overwrite=False, resume=False)
        assert args.holdout == 0.1 and args.images(evaluation=True)["split"] == "train"
    for overrides in ({"data.holdout": 0.1, "data.eval_split": "test"}, {"data": {"holdout": 0.1, "eval_split": "x"}}):
        with pytest.raises(RetrofitError, match="data.holdout in recipe .* drop one"):
            load_recipe(path, overrides)
    with pytest.raises(RetrofitError, match="data.holdout in recipe .* names split 'test'; drop one"):
        both = {"name": "y", "eval_split": "test", "holdout": 0.1}
        load_recipe(write(tmp_path / "both.yaml", recipe | {"data": both}))
    unscored = load_recipe(write(tmp_path / "none.yaml", recipe | {"data": {"name": "y", "eval_split": ""}}),
                           {"data.holdout": 0.1})  # fmt: skip
    assert unscored["data"]["eval_split"] is None
