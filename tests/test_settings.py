"""One settings source per command (`retrofit.settings`): options, recipe keys, Python keywords, help and checks all
come from the same dataclass fields."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from retrofit.cli import build_parser, main
from retrofit.errors import RetrofitError
from retrofit.recipes import load_recipe, option_overrides, section_keys
from retrofit.settings import RECIPE_SECTIONS, FinetuneArgs, TrainSettings, option_of

REPO = Path(__file__).resolve().parents[1]


def test_the_help_of_run_shows_the_values_the_recipe_applies(capsys):
    """`run RECIPE --help` shows the recipe's lr (5e-4) and batch size (128), not the fine-tune defaults."""
    with pytest.raises(SystemExit):
        main(["run", str(REPO / "recipes" / "fashion-mnist.yaml"), "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "peak learning rate (default: 0.0005, from the recipe)" in text
    assert "images per batch and process (default: 128, from the recipe)" in text
    # a value the recipe does not set is the settings' default, not the recipe's (it said "256, from the recipe")
    assert "images to calibrate on, a shuffled sample (default: 256)" in text
    with pytest.raises(SystemExit):
        main(["finetune", "--help"])
    assert "peak learning rate (default: 0.0002)" in " ".join(capsys.readouterr().out.split())


def test_every_training_setting_is_a_finetune_option_a_run_option_and_a_recipe_key():
    finetune = {a.dest for a in build_parser(["finetune"])._subparsers._group_actions[0].choices["finetune"]._actions}
    run = {a.dest for a in build_parser(["run"])._subparsers._group_actions[0].choices["run"]._actions}
    for spec in fields(TrainSettings):
        assert spec.name in finetune and spec.name in run and spec.name in section_keys("training")
    assert option_overrides({"lr": 1e-4, "data": "x", "output": "o", "source": "s"}) == {
        "training.lr": 1e-4, "data.name": "x", "export.output": "o", "source": "s",
    }  # fmt: skip
    for section, groups in RECIPE_SECTIONS.items():  # a recipe section's keys are its groups' fields
        assert set(section_keys(section)) == {
            spec.metadata.get("key") or spec.name for g in groups for spec in fields(g)
        }


def test_a_value_is_checked_once_whichever_way_it_comes(tmp_path, capsys):
    """The same check, named as the user gave the value: an option, a Python keyword, a recipe key."""
    with pytest.raises(RetrofitError, match=r"^--warmup-ratio must be in \[0, 1\) \(got 1.5\)$"):
        FinetuneArgs(source="s", output="o", data="d", warmup_ratio=1.5)
    assert main(["finetune", "s", "-o", str(tmp_path / "o"), "--data", "d", "--warmup-ratio", "1.5"]) == 2
    assert capsys.readouterr().err.strip() == "retrofit: error: --warmup-ratio must be in [0, 1) (got 1.5)"
    recipe = tmp_path / "r.yaml"
    recipe.write_text("source: s\nmerge: {after_layer: 1, tokens: 2}\ndata: {name: d}\nexport: {output: o}\n")
    with pytest.raises(RetrofitError, match=r"training.warmup_ratio in recipe '.*' must be in \[0, 1\) \(got 1.5\)"):
        load_recipe(recipe, {"training.warmup_ratio": 1.5})
    assert option_of(TrainSettings, "warmup_ratio") == "--warmup-ratio"


def test_a_tracker_that_is_not_installed_is_an_error():
    """--report-to names a tracker whose package is missing: refused, not silently logging nothing."""
    import importlib.util

    missing = next(name for name in ("wandb", "mlflow", "comet_ml", "aim") if importlib.util.find_spec(name) is None)
    with pytest.raises(RetrofitError, match=f"--report-to {missing} needs its package: pip install"):
        TrainSettings(report_to=missing)
    with pytest.raises(RetrofitError, match="--report-to must be one of tensorboard"):
        TrainSettings(report_to="notebook")


def test_help_and_usage_errors_import_no_torch():
    """Settings and options are light: `run RECIPE --help` reads the recipe without torch or transformers."""
    code = (
        "import sys\nfrom retrofit.cli import main\n"
        "try:\n    main(['run', 'recipes/fashion-mnist.yaml', '--help'])\nexcept SystemExit:\n    pass\n"
        "print([m for m in ('torch', 'transformers') if m in sys.modules])\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.stdout.splitlines()[-1] == "[]", done.stderr[-2000:]


def test_a_wrong_value_is_quoted_short_in_its_one_line_message(tiny_vit):
    """A model object where a checkpoint goes, or a huge value, gives a short line saying what it got (it printed the
    whole model, many lines; a huge list hung while the message was built)."""
    from transformers import AutoModelForImageClassification

    import retrofit

    model = AutoModelForImageClassification.from_pretrained(tiny_vit)
    with pytest.raises(RetrofitError) as refused:
        retrofit.convert(model, after_layer=1, num_tokens=2)
    assert str(refused.value) == (
        f"--source must be text, not a {type(model).__name__} object (save it with save_pretrained and give its folder)"
    )
    for value, shown in (([1] * 10**7, "[1, 1, 1, 1, 1, 1, 1, 1, ...]"), ("7" * 1000, "'77777")):
        with pytest.raises(RetrofitError) as refused:
            retrofit.convert(str(tiny_vit), after_layer=value, num_tokens=2)
        assert f"--after-layer must be a whole number, not {shown}" in str(refused.value)
        assert len(str(refused.value)) < 200 and "\n" not in str(refused.value)


def test_an_error_quoting_a_value_with_a_line_break_is_still_one_line(capsys):
    """A value holding a line break (or another control character) is quoted escaped, as repr shows it: the error
    stays one line (``--device $'cuda\\n'`` printed two)."""
    for argv, shown in (
        (["bench", "m", "--device", "cuda\n"], "unknown device 'cuda\\n'"),
        (["sweep", "s", "--after-layer", "1\n2", "--tokens", "2"], "--after-layer '1\\n2' is not"),
        (["push", "e", "--repo-id", "u/r", "extra\nword"], "unrecognized arguments: extra\\nword"),
        (["bench", "m", "--dtype", "fp32\x1b[31m"], "unknown dtype 'fp32\\x1b[31m'"),
    ):
        try:
            code = main(argv)
        except SystemExit as exc:  # a usage error, from argparse
            code = exc.code
        err = capsys.readouterr().err
        assert code == 2 and shown in err and err.count("\n") == 1, err


def test_empty_text_is_refused_where_it_means_nothing(tmp_path, monkeypatch, capsys):
    """An empty (or all-space) value, as an unset shell variable gives, is refused in one line before anything is
    read: ``--data ''`` read the current folder as an image folder (100 s here) before it failed, ``--card ''`` and
    ``--push-to-hub ''`` were ignored, ``-o ''`` became '.'. ``--eval-split ''`` keeps its meaning: none."""
    monkeypatch.chdir(tmp_path)
    for argv, option in (
        (["evaluate", "m", "--data", ""], "--data"),
        (["evaluate", "m", "--data", "d", "--card", " "], "--card"),
        (["convert", "s", "--after-layer", "1", "--tokens", "2", "-o", "o", "--push-to-hub", ""], "--push-to-hub"),
        (["export-onnx", "m", "-o", ""], "--output"),
        (["run", ""], "--recipe"),
        (["finetune", "s", "-o", "o", "--data", "d", "--teacher", ""], "--teacher"),
    ):
        assert main(argv) == 2
        assert capsys.readouterr().err.startswith(f"retrofit: error: {option} is empty (got ")
    assert not list(tmp_path.iterdir())
    assert FinetuneArgs(source="s", output="o", data="d", eval_split="").eval_split is None
    recipe = tmp_path / "r.yaml"
    recipe.write_text("source: s\nmerge: {after_layer: 1, tokens: 2}\ndata: {name: ''}\nexport: {output: o}\n")
    with pytest.raises(RetrofitError, match=r"^data.name in recipe '.*' is empty \(got ''\); give a value$"):
        load_recipe(recipe)


def test_every_path_retrofit_writes_to_under_a_tilde_is_in_the_home_folder(tmp_path, monkeypatch):
    """A Python call's "~/..." (no shell expands it) for a path retrofit writes is the home folder's, as its inputs'
    is; so is ``--plot=~/speed.png``, where the shell leaves it (bench refused it: "folder '~' does not exist")."""
    from retrofit import settings

    monkeypatch.setenv("HOME", str(tmp_path))
    built = [
        settings.FinetuneArgs(source="s", data="d", output="~/o", checkpoint_dir="~/checkpoints"),
        settings.EvaluateArgs(models=["m"], data="d", json="~/evaluate.json", card="~/export"),
        settings.BenchArgs(models=["m"], json="~/bench.json", plot="~/speed.png", card="~/export"),
        settings.SweepArgs(source="s", data="d", output="~/sweep"),
        settings.ExportOnnxArgs(model="m", output="~/m.onnx"),
        settings.ConvertArgs(source="s", after_layer=1, tokens=2, output="~/converted"),
    ]
    checked = set()
    for args in built:
        for spec in fields(args):
            if spec.metadata.get("written"):
                value = getattr(args, spec.name)
                assert value.startswith(str(tmp_path) + os.sep), (type(args).__name__, spec.name, value)
                checked.add((type(args).__name__, spec.name))
    assert len(checked) == 10  # every written setting of these commands
    assert built[2].plot == str(tmp_path / "speed.png")


def test_option_words_mean_what_the_help_says():
    """bench's --compile both is eager and default, off is eager; --merge is K:M whole (6:8x was read as 6:8);
    --report-to all is a tracker setting of its own."""
    from retrofit.settings import BenchArgs, BenchSettings

    assert BenchSettings(compile_modes="both").compile_modes == ("eager", "default")
    assert BenchSettings(compile_modes="off,max-autotune").compile_modes == ("eager", "max-autotune")
    assert BenchArgs(models=["m"], merge="half:8,6:4").merge == (("half", 8), ("6", 4))
    with pytest.raises(RetrofitError, match=r"^--merge '6:8x' is not K:M \(e.g. 6:8 or half:8\)$"):
        BenchArgs(models=["m"], merge="6:8x")
    assert TrainSettings(report_to="all").report_to == "all"


def test_a_name_that_is_not_utf8_is_refused_before_anything_is_written(tmp_path, monkeypatch, capsys):
    """A file name in another encoding's bytes (``-o $'out-\\xff'``) reaches Python as text with surrogates, which no
    card, JSON or lock name can hold: convert wrote the export's weights, then failed with a traceback."""
    monkeypatch.chdir(tmp_path)
    name, rename = os.fsdecode(b"out-\xff"), "(rename the file or folder)"
    for argv, option in (
        (["convert", "s", "--after-layer", "1", "--tokens", "2", "-o", name], "--output"),
        (["bench", "m", "--json", name], "--json"),
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err == f"retrofit: error: {option} is not UTF-8 text (got 'out-\\udcff'); use a name in UTF-8 {rename}\n"
    assert not list(tmp_path.iterdir())


def test_every_list_option_reads_its_commas_one_way(capsys):
    """bench --batch-size/--merge/--compile and sweep --after-layer/--tokens: an empty item (``1,,2``, ``1,2,``,
    ``,``) or an empty value is refused, not skipped (``--batch-size 1,,2`` measured 1 and 2, ``--merge ,`` merged
    nothing); repeats are dropped; K and M below 1 are refused up front, as convert's are."""
    from retrofit.settings import BenchArgs, SweepArgs, comma_ints, parse_compile, parse_merges

    for value in ("1,,2", "1,2,", ",", "", " "):
        for argv in (
            ["bench", "m", "--batch-size", value],
            ["bench", "m", "--merge", value.replace("1", "6:8").replace("2", "3:4")],
            ["bench", "m", "--compile", value.replace("1", "eager").replace("2", "default")],
            ["sweep", "s", "--after-layer", value, "--tokens", "2"],
            ["sweep", "s", "--after-layer", "1", "--tokens", value],
        ):
            assert main(argv) == 2, argv
            err = capsys.readouterr().err
            assert ("has an empty item" in err or "is empty" in err) and err.count("\n") == 1, err
    assert comma_ints(" 8, 8 ,16") == (8, 16) and parse_merges("half:8,half:8") == (("half", 8),)
    assert parse_compile("eager,off") == ("eager",) and parse_merges(None) == ()
    assert BenchArgs(models=["m"], batch_sizes="1, 32").batch_sizes == (1, 32)
    for value in ("0", "-1", "3,0"):
        with pytest.raises(RetrofitError, match=r"^--after-layer must be at least 1 \(got"):
            SweepArgs(source="s", after_layers=value, tokens="2")
        with pytest.raises(RetrofitError, match=r"^--tokens must be at least 1 \(got"):
            SweepArgs(source="s", after_layers="1", tokens=value)


def test_a_list_of_text_is_checked_item_by_item(capsys):
    """``run R --set=--`` (argparse hands such an option an empty list) raised AttributeError from the recipe code:
    a list setting's items are checked like a tuple's."""
    from retrofit.settings import EvaluateArgs

    assert main(["run", "r.yaml", "--set=--"]) == 2
    assert capsys.readouterr().err == "retrofit: error: --set must be a list of text, not [[]]\n"
    with pytest.raises(RetrofitError, match=r"^--models must be a list of text, not \['a', 1\]$"):
        EvaluateArgs(models=["a", 1], data="d")
    assert EvaluateArgs(models=["a", "b"], data="d").models == ["a", "b"]


def test_a_count_far_above_any_real_use_is_refused_in_one_line(capsys):
    """A typo's huge count is refused before anything runs: export-onnx --images 1e9 raised MemoryError making its
    check batch, --num-labels 1e30 raised MemoryError naming the new head's labels, --epochs 1e308 raised
    OverflowError counting the steps, --num-workers 1e30 would have forked processes until the system refused, and
    --grad-accum 1e30 raised OverflowError at the first step (Accelerate divides the loss by it)."""
    from retrofit.settings import (
        MAX_CHECK_IMAGES,
        MAX_EPOCHS,
        MAX_GRAD_ACCUM,
        MAX_LABELS,
        MAX_STEPS,
        MAX_WORKERS,
        ExportOnnxArgs,
    )

    huge = str(10**30)
    for argv, message in (
        (
            ["export-onnx", "m", "-o", "m.onnx", "--images", str(10**9)],
            "--images must be at most 1,024 (got 1,000,000,000)",
        ),
        (["finetune", "s", "-o", "o", "--data", "d", "--num-labels", huge], "--num-labels must be at most 1,000,000"),
        (
            ["finetune", "s", "-o", "o", "--data", "d", "--epochs", "1e308"],
            "--epochs must be at most 1,000,000 (got 1e+308)",
        ),
        (["finetune", "s", "-o", "o", "--data", "d", "--num-workers", huge], "--num-workers must be at most 1,024"),
        (["finetune", "s", "-o", "o", "--data", "d", "--grad-accum", huge], "--grad-accum must be at most 1,000,000"),
        # OverflowError counting the budget, after the model was loaded and calibrated
        (["finetune", "s", "-o", "o", "--data", "d", "--max-steps", huge], "--max-steps must be at most 1,000,000,000"),
        (["finetune", "s", "-o", "o", "--data", "d", "--min-steps", huge], "--min-steps must be at most 1,000,000,000"),
    ):
        assert main(argv) == 2
        assert capsys.readouterr().err.startswith(f"retrofit: error: {message}")
    assert main(["run", str(REPO / "recipes" / "fashion-mnist.yaml"), "--num-workers", huge]) == 2
    assert "data.num_workers in recipe " in capsys.readouterr().err
    # a recipe's speed batch was refused only after the source was scored, as bench's --batch-size
    assert (
        main(["run", str(REPO / "recipes" / "fashion-mnist.yaml"), "--set", f"evaluation.speed_batch_size={huge}"]) == 2
    )
    assert (
        f"evaluation.speed_batch_size in recipe '{REPO / 'recipes' / 'fashion-mnist.yaml'}' {huge} is too large to be a"
        in (capsys.readouterr().err)
    )
    good = FinetuneArgs(source="s", output="o", data="d", num_labels=MAX_LABELS, epochs=MAX_EPOCHS,
                        num_workers=MAX_WORKERS, grad_accum=MAX_GRAD_ACCUM, max_steps=MAX_STEPS,
                        min_steps=MAX_STEPS)  # fmt: skip
    assert (good.num_labels, good.num_workers, good.grad_accum) == (MAX_LABELS, MAX_WORKERS, MAX_GRAD_ACCUM)
    assert good.max_steps == good.min_steps == MAX_STEPS
    assert ExportOnnxArgs(model="m", output="m.onnx", images=MAX_CHECK_IMAGES).images == MAX_CHECK_IMAGES


def test_a_long_tracker_or_template_is_quoted_short():
    """--report-to, a prompt template, bench's and sweep's --device and --dtype, and --plot quoted the whole value
    (5,000 characters of a pasted file: a 5,000-character 'line'); they are cut as every other quoted value is."""
    from retrofit.settings import BenchArgs, EvaluateArgs, SweepArgs

    for build, option in (
        (lambda value: TrainSettings(report_to=value), "--report-to"),
        (lambda value: EvaluateArgs(models=["m"], data="d", prompt_template=value), "--prompt-template"),
        (lambda value: TrainSettings(prompt_templates=("{}", value)), "--prompt-templates"),
        (lambda value: BenchArgs(models=["m"], device=value), "unknown device"),
        (lambda value: BenchArgs(models=["m"], dtype=value), "unknown dtype"),
        (lambda value: BenchArgs(models=["m"], plot=value), "--plot"),
        (lambda value: SweepArgs(source="s", after_layers="1", tokens="2", device=value), "unknown device"),
    ):
        with pytest.raises(RetrofitError) as refused:
            build("x" * 5000)
        assert str(refused.value).startswith(f"{option} ") and len(str(refused.value)) < 250


def test_a_pasted_value_thousands_of_characters_long_gives_a_short_line(tmp_path, capsys):
    """A 5,000-character path: `run` showed a traceback (looking for the recipe to show its values in the help, the
    system refused the name), the others a 5,000-character line quoting it whole; the line keeps its start and end."""
    long = str(tmp_path / ("x" * 5000))
    for argv in (["run", long + ".yaml"], ["convert", long, "--after-layer", "1", "--tokens", "2"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("retrofit: error: ") and err.count("\n") == 1 and len(err) < 400, err[:500]
        assert "xxx…xxx" in err


def test_every_seed_is_one_the_generators_take():
    """bench's and sweep's seeds (Python settings) took any integer: -1 or 2**70 reached NumPy or torch as a
    ValueError traceback; they are checked as --seed is. An all-space --eval-split means none, as '' does."""
    from retrofit.settings import BenchSettings, DataSettings, SweepSettings

    for build in (
        lambda seed: BenchSettings(seed=seed),
        lambda seed: SweepSettings(after_layers="1", tokens="2", seed=seed),
    ):
        for seed in (-1, 2**70):
            with pytest.raises(RetrofitError, match=r"^--seed must be in \[0, 2\*\*32\)"):
                build(seed)
        assert build(2**32 - 1).seed == 2**32 - 1
    assert DataSettings(data="d", eval_split="  ").eval_split is None


def test_a_learning_rate_beyond_float32_is_refused_and_a_huge_number_is_said_by_its_size(capsys):
    """--lr 1e300 passed the checks and raised RuntimeError from AdamW's first step (float32 overflow); a whole number
    of 5,000 digits (Python settings) raised ValueError writing the message that refused it."""
    assert main(["finetune", "s", "-o", "o", "--data", "d", "--lr", "1e300"]) == 2
    assert capsys.readouterr().err == "retrofit: error: --lr must be at most 1,000,000 (got 1e+300)\n"
    with pytest.raises(RetrofitError, match=r"^--merger-lr-scale must be at most 1,000,000 \(got 10,000,000\)$"):
        TrainSettings(merger_lr_scale=1e7)
    with pytest.raises(
        RetrofitError, match=r"^--batch-size must be positive \(got a negative number of about 5000 digits"
    ):
        TrainSettings(batch_size=-(10**5000))
    assert TrainSettings(lr=1e6, merger_lr_scale=1e6).lr == 1e6


def test_a_device_is_one_torch_reads():
    """``cuda:00`` and ``cuda:٣`` (a non-ASCII digit) passed the device check, and torch refuses both with a
    RuntimeError where there is a GPU. `benchmark.place_model` (the API, the bench scripts) checked devices with a copy
    of the pattern that still took them."""
    import torch

    from retrofit.benchmark import place_model
    from retrofit.settings import BenchSettings, SweepSettings

    for device in ("cuda:00", "cuda:٣", "cuda:-1", "cuda:"):
        with pytest.raises(RetrofitError, match="^unknown device"):
            BenchSettings(device=device)
        with pytest.raises(RetrofitError, match="^unknown device"):
            SweepSettings(after_layers="1", tokens="2", device=device)
        with pytest.raises(RetrofitError, match="^unknown device"):
            place_model(torch.nn.Linear(1, 1), device, "fp32")
    assert [BenchSettings(device=device).device for device in ("cpu", "cuda", "cuda:0", "cuda:10")]


def test_the_help_of_run_finds_the_recipe_after_options(capsys):
    """``run --lr 1e-3 RECIPE --help`` took the option's value (1e-3) for the recipe and showed the settings'
    defaults; the recipe is the positional argument wherever it stands."""
    for argv in (["--lr", "1e-3"], ["--data", "x", "--no-calibrate", "--set", "training.seed=1"]):
        with pytest.raises(SystemExit):
            main(["run", *argv, str(REPO / "recipes" / "fashion-mnist.yaml"), "--help"])
        assert "peak learning rate (default: 0.0005, from the recipe)" in " ".join(capsys.readouterr().out.split())


def test_numpy_numbers_are_numbers():
    """Python callers' NumPy numbers (``np.arange`` of batch sizes, a float32 learning rate) were refused as "not a
    whole number" / "not a finite number"; they are kept as Python's int and float. A float for a count still is not."""
    import numpy as np

    from retrofit.settings import BenchSettings

    run = TrainSettings(batch_size=np.int64(8), lr=np.float32(0.5), seed=np.uint32(3))
    assert (run.batch_size, run.lr, run.seed) == (8, 0.5, 3) and type(run.batch_size) is int and type(run.lr) is float
    assert BenchSettings(batch_sizes=tuple(np.arange(1, 3))).batch_sizes == (1, 2)
    with pytest.raises(RetrofitError, match="^--batch-size must be a whole number"):
        TrainSettings(batch_size=np.float64(8.0))


def test_python_lists_follow_the_rule_of_the_options_text():
    """Given as Python lists, sweep's K and M lists could be empty (a sweep of nothing) and every list kept its
    repeats, which the options' text drops: the same rule now holds both ways."""
    from retrofit.settings import BenchSettings, SweepSettings

    for empty in ({"after_layers": ()}, {"tokens": []}):
        with pytest.raises(RetrofitError, match="is empty; give one or more values"):
            SweepSettings(**{"after_layers": (1,), "tokens": (2,), **empty})
    sweep = SweepSettings(after_layers=[3, 3, 1], tokens=(8, 8))
    assert (sweep.after_layers, sweep.tokens) == ((3, 1), (8,))
    assert BenchSettings(batch_sizes=[8, 8, 1]).batch_sizes == (8, 1)


def test_a_pretraining_model_with_impossible_sizes_is_one_line():
    """``--set pretrain.model.hidden_dropout_prob=2`` raised ValueError from torch's Dropout, ``hidden_size=1e30`` a
    TypeError from torch.randn (as did ``image_size=2**40``: 2**74 patches), and ``intermediate_size=0`` trained and
    saved a model of empty MLPs."""
    from transformers import ViTConfig

    from retrofit.loading import check_config

    base = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2)
    for change, message in (
        ({"hidden_dropout_prob": 2.0}, "hidden_dropout_prob must be a probability from 0 to 1, not 2.0"),
        ({"attention_probs_dropout_prob": float("nan")}, "attention_probs_dropout_prob must be a probability"),
        ({"hidden_size": 10**30}, "hidden_size 1000000000000000000000000000000 is above what torch takes"),
        ({"intermediate_size": 0}, "intermediate_size must be a positive whole number, not 0"),
        ({"image_size": 2**40}, "image_size 1099511627776 makes more patches of patch_size 8 than torch takes"),
    ):
        with pytest.raises(RetrofitError, match=f"^pretrain.model: {re.escape(message)}"):
            check_config(ViTConfig(**{**base, **change}), "pretrain.model")
    check_config(ViTConfig(**base, hidden_dropout_prob=0.1, intermediate_size=64), "pretrain.model")
    check_config(ViTConfig(**base, hidden_dropout_prob=1, attention_probs_dropout_prob=0.0), "pretrain.model")  # 0, 1


def test_options_are_read_whole_and_verbose_keeps_the_exit_code(tmp_path, monkeypatch, capsys):
    """A shortened option was read as the one it starts (``--over`` as ``--overwrite``, ``--after 2`` as
    ``--after-layer 2``): now refused with the option meant. ``-v`` after the command was an unknown argument, and
    with ``-v`` bad input exited with 1 (the traceback escaped) instead of 2; now the traceback, then the same line."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as usage:
        main(["convert", "s", "--after", "1", "--tokens", "2", "-o", "o"])
    assert usage.value.code == 2
    assert capsys.readouterr().err == (
        "retrofit convert: error: unrecognized arguments: --after 1; did you mean --after-layer? "
        "(see retrofit convert --help)\n"
    )
    with pytest.raises(SystemExit):  # a pasted list after an unknown option: named by its start and count
        main(["evaluate", "m", "--data", "d", "--bogus", *map(str, range(3000))])
    assert capsys.readouterr().err.startswith(
        "retrofit evaluate: error: unrecognized arguments: --bogus 0 1 2 3 4 … (3001"
    )
    for argv in (["-v", "convert", "s", "--after-layer", "0"], ["convert", "s", "--after-layer", "0", "-v"]):
        assert main([*argv, "--tokens", "2", "-o", "o"]) == 2
        err = capsys.readouterr().err
        assert "Traceback" in err and err.endswith("retrofit: error: --after-layer must be at least 1 (got 0)\n"), err
    assert main(["convert", "s", "--after-layer", "0", "--tokens", "2", "-o", "o"]) == 2
    assert "Traceback" not in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_a_dash_for_an_output_is_refused_not_written_as_a_file_named_dash(tmp_path, monkeypatch, capsys):
    """``evaluate ... --json - | jq`` wrote the JSON into a file named '-' in the current folder and printed the table
    (and "wrote -") to the pipe."""
    monkeypatch.chdir(tmp_path)
    for argv, option in (
        (["evaluate", "m", "--data", "d", "--json", "-"], "--json"),
        (["bench", "m", "--json", "-"], "--json"),
        (["convert", "s", "--after-layer", "1", "--tokens", "2", "-o", "-"], "--output"),
    ):
        assert main(argv) == 2
        assert capsys.readouterr().err.startswith(f"retrofit: error: {option} is '-', which here would name a file")
    assert not list(tmp_path.iterdir())


def test_a_table_reaches_a_stdout_that_cannot_encode_it(tiny_vit, tmp_path, monkeypatch):
    """With ``PYTHONIOENCODING=ascii`` (or a Windows code page) evaluate failed with a UnicodeEncodeError traceback
    at its table's 'Δ top-1' column, after all the work; now the character is written as its escape."""
    import io

    from test_data import make_imagefolder

    data = make_imagefolder(tmp_path / "colours", per_class=2, test_per_class=2)
    stdout = io.TextIOWrapper(io.BytesIO(), encoding="ascii")
    monkeypatch.setattr(sys, "stdout", stdout)
    assert main(["evaluate", str(tiny_vit), str(tiny_vit), "--data", str(data), "--split", "test", "--limit", "4"]) == 0
    stdout.flush()
    assert "| \\u0394 top-1 vs first |" in stdout.buffer.getvalue().decode("ascii")


def test_a_reader_that_leaves_early_stops_the_command_quietly(tiny_vit, monkeypatch, capsys):
    """``retrofit sweep ... --dry-run | head -1`` (the reader gone before the output ends) was a BrokenPipeError
    traceback with exit code 1; now nothing more is written and the code is 141, as Unix tools give."""

    class ClosedPipe:
        encoding = "utf-8"

        def write(self, text: str) -> int:
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self) -> None:  # what a closed pipe still holds fails again
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    assert main(["sweep", str(tiny_vit), "--dry-run"]) == 141
    assert capsys.readouterr().err == ""  # no traceback


def test_a_hub_id_missing_from_the_cache_in_offline_mode_says_so(tmp_path, monkeypatch, capsys):
    """With ``HF_HUB_OFFLINE=1`` (a CI job's cache) a model not in the cache was said to be unreachable, with "check
    your network": no network was tried. The line now names the setting."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    assert main(["convert", "someone/not-in-the-cache", "--after-layer", "1", "--tokens", "2", "-o", "out"]) == 2
    err = capsys.readouterr().err
    assert err.endswith("and HF_HUB_OFFLINE is set; unset HF_HUB_OFFLINE to download it, or check the path or id\n")
    assert not list(tmp_path.iterdir())


def test_an_empty_folder_variable_means_its_default_not_the_current_folder(tmp_path, monkeypatch):
    """``RETROFIT_CACHE=`` (an unset variable in a CI file) put the cache in the current folder: convert wrote
    ``code/`` and ``locks/`` there; ``RETROFIT_FASHION_MNIST_DIR=`` looked for the data files there."""
    import importlib.util

    import retrofit

    monkeypatch.setenv("RETROFIT_CACHE", "")
    monkeypatch.setenv("RETROFIT_FASHION_MNIST_DIR", " ")
    monkeypatch.setenv("HOME", str(tmp_path))
    folders = {}
    for module, constant in (("provenance", "CACHE_DIR"), ("data", "FASHION_MNIST_DIR")):  # fresh copies: read now
        spec = importlib.util.spec_from_file_location(
            f"retrofit._fresh_{module}", Path(retrofit.__file__).with_name(f"{module}.py")
        )
        copy = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, spec.name, copy)  # where its dataclasses look themselves up
        spec.loader.exec_module(copy)
        folders[constant] = getattr(copy, constant)
    assert folders == {
        "CACHE_DIR": tmp_path / ".cache" / "retrofit",
        "FASHION_MNIST_DIR": Path("/usr/share/datasets/fashion-mnist"),
    }


def test_a_cache_folder_that_cannot_be_written_names_its_variable(tmp_path, monkeypatch):
    """``HF_HOME`` set to a file (or a folder the user cannot write) failed with "Not a directory
    ('<HF_HOME>/modules'); check the path": a path the user never gave. The line now names the variable."""
    import errno

    from retrofit.errors import describe_os_error

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    inside = OSError(errno.ENOTDIR, "Not a directory", str(tmp_path / "hf" / "modules"))
    assert describe_os_error(inside) == (
        f"Not a directory ('{tmp_path}/hf/modules'), under HF_HOME={tmp_path}/hf; point HF_HOME at a folder you can "
        "write, or check its permissions and the free space"
    )
    outside = OSError(errno.EACCES, "Permission denied", str(tmp_path / "hfx" / "out"))  # only a shared prefix
    assert describe_os_error(outside).endswith("; check the path, its permissions and the free space")
    # A file inside an output being written is named inside the output the user gave, not its temporary sibling.
    writing = OSError(errno.EROFS, "Read-only file system", str(tmp_path / ".out.tmp-k2j_x9qa" / "config.json"))
    assert describe_os_error(writing).startswith(f"Read-only file system ('{tmp_path}/out/config.json'); check")
    plot = OSError(errno.EACCES, "Permission denied", str(tmp_path / ".speed.png.tmp-0a1b2c3d.png"))
    assert describe_os_error(plot).startswith(f"Permission denied ('{tmp_path}/speed.png'); check")


def test_an_export_is_written_in_utf8_whatever_the_locale(tiny_vit, tmp_path):
    """Under a locale whose encoding is not UTF-8 (``LC_ALL=C`` without Python's UTF-8 coercion, a Windows code page)
    convert failed with a UnicodeEncodeError traceback writing the generated code (its '²'); a code page that has the
    character would have written a modeling file Python cannot import as UTF-8."""
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONCOERCECLOCALE": "0", "PYTHONUTF8": "0",
           "PYTHONIOENCODING": "", "RETROFIT_CACHE": str(tmp_path / "cache")}  # fmt: skip
    script = (
        "import locale, sys; print(locale.getpreferredencoding()); "
        "from retrofit.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    argv = ["convert", str(tiny_vit), "--after-layer", "1", "--tokens", "2", "-o", str(tmp_path / "out")]
    done = subprocess.run([sys.executable, "-c", script, *argv], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.startswith("ANSI_X3.4-1968\n"), done.stderr[-2000:]
    code = next((tmp_path / "out").glob("modeling_*.py")).read_text(encoding="utf-8")
    assert not code.isascii()  # what the locale could not write


def test_an_evaluation_split_that_is_the_training_split_is_refused(tmp_path, capsys):
    """``finetune --split test --eval-split test`` reported as held-out an accuracy on the images it had trained on,
    without a word; training on test (the default --eval-split) was the same. --holdout scores images kept out."""
    from retrofit.cli import main
    from retrofit.settings import DataSettings, FinetuneArgs

    for given in ({"split": "test"}, {"split": "test", "eval_split": "test"}, {"eval_split": "train"}):
        with pytest.raises(RetrofitError, match=r"^--eval-split names the training split '\w+', so its accuracy"):
            FinetuneArgs(source="s", output="o", data="d", **given)
    assert main(["finetune", "s", "--after-layer", "2", "--tokens", "4", "--data", "d", "--split", "test",
                 "--output", str(tmp_path / "no")]) == 2  # fmt: skip
    assert "--holdout 0.1" in capsys.readouterr().err and not (tmp_path / "no").exists()
    assert DataSettings(data="d", split="test", holdout=0.1).images(evaluation=True)["split"] == "test"
    assert DataSettings(data="d", split="test", eval_split="").eval_split is None
    assert DataSettings(data="d", split="train[:90%]", eval_split="train[90%:]").eval_split == "train[90%:]"
