"""The Python API as the README shows it: its code block runs as written, and the top-level names stay light."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from test_data import FMNIST

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_block(heading: str) -> str:
    """The first ```python block after `heading` in the README."""
    text = README.read_text()
    section = text[text.index(heading) :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow
@pytest.mark.skipif(not FMNIST.exists(), reason="dataset-fashion-mnist is not installed")
def test_the_readme_python_api_example_runs_as_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(readme_block("## Python API"), "README.md (Python API)", "exec"), namespace)
    printed = capsys.readouterr().out
    assert "1.70x fewer FLOPs" in printed
    models = {row["model"]: row for row in namespace["report"]["models"]}
    assert list(models) == ["retrofit:fashion-mnist-vit", "out/api-pm8", "out/api-pm8-kd"]
    source, calibrated, distilled = models.values()
    assert source["top1"] > 0.8 and calibrated["top1"] > 0.7  # the shipped model, merged without training
    assert distilled["top1"] > calibrated["top1"] - 0.02  # distillation does not lose what calibration kept
    assert namespace["result"].steps == 4096 // 128
    assert namespace["report"]["table"] in printed and namespace["speed"]["table"] in printed
    results = json.loads((tmp_path / "out/api-pm8-kd/retrofit_results.json").read_text())
    assert set(results) >= {"evaluation", "benchmark"}
    assert "model-index" in (tmp_path / "out/api-pm8-kd/README.md").read_text()


def test_top_level_names_import_lazily():
    """`import retrofit` loads neither torch nor transformers (nor datasets, evaluate, matplotlib); each name loads
    its module on first use, and `retrofit.convert` / `retrofit.export` stay the functions even once their modules
    are imported by others."""
    code = (
        "import sys, types, retrofit\n"
        "heavy = [m for m in ('torch', 'transformers', 'datasets', 'evaluate', 'matplotlib') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "from retrofit import TrainSettings, evaluate_models, finetune, run_recipe, update_card\n"
        "import retrofit.sweep, retrofit.benchmark, retrofit.convert, retrofit.export, retrofit.finetune\n"
        "assert callable(retrofit.sweep.sweep) and callable(retrofit.benchmark.benchmark)\n"
        "from retrofit import convert, export\n"
        "assert isinstance(convert, types.FunctionType) and isinstance(export, types.FunctionType)\n"
        "assert retrofit.convert is convert and sys.modules['retrofit.convert'].convert is convert\n"
        "assert retrofit.finetune is finetune and isinstance(finetune, types.FunctionType)\n"
        "assert set(retrofit.__all__) <= set(dir(retrofit))\n"
        "for name in retrofit.__all__: getattr(retrofit, name)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        import retrofit

        retrofit.nope  # noqa: B018


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        (["--help"], None),
        (["--version"], None),
        (["convert", "--help"], None),
        (["convert", "x", "--tokens", "8"], "--after-layer is required"),
        (["sweep", "x", "--tokens", "8"], "--data is required"),
    ],
)
def test_help_and_usage_errors_answer_without_loading_torch(argv, error):
    """`retrofit --help`, a light command's help and a usage error answer at once: the parser builds only the
    arguments of the command named, and neither torch nor transformers is imported to do it."""
    code = (
        "import sys\nfrom retrofit.cli import main\n"
        f"try:\n    print('exit', main({argv!r}))\nexcept SystemExit as exit:\n    print('exit', exit.code)\n"
        "print('loaded', [m for m in ('torch', 'transformers') if m in sys.modules])\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.stdout.splitlines()[-1] == "loaded []", done.stdout[-2000:] + done.stderr[-2000:]
    exit_code = done.stdout.splitlines()[-2]
    if error is None:
        assert exit_code == "exit 0" and ("usage: retrofit" in done.stdout or "retrofit 0." in done.stdout)
    else:  # one line: the missing flag and where to look
        assert exit_code == "exit 2" and done.stderr.count("\n") == 1 and error in done.stderr


def test_type_checkers_see_every_lazy_name_from_its_module():
    """The `if TYPE_CHECKING:` imports in retrofit/__init__.py (what editors complete) name the same modules as the
    run-time `_LAZY` table, and `__all__` lists exactly those names."""
    import ast

    import retrofit

    tree = ast.parse(Path(retrofit.__file__).read_text())
    block = next(node for node in tree.body if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING")
    seen = {alias.name: node.module for node in block.body for alias in node.names}
    assert seen == retrofit._LAZY
    assert sorted(retrofit.__all__) == sorted(seen)


def test_the_building_blocks_refuse_what_they_cannot_take_in_one_line(tiny_vit, tmp_path):
    """The building blocks the README lists, given a path where a model goes, a name where a config goes, a source
    where a merged model goes or a report of another shape, raise a RetrofitError saying what they take (they raised
    AttributeError, ValueError and KeyError from inside); a result prints without its model."""
    import retrofit
    from retrofit.errors import RetrofitError

    model = retrofit.load_model(str(tiny_vit))
    calls = [
        (lambda: retrofit.insert_patch_merger(str(tiny_vit), 1, 4), "insert_patch_merger takes a loaded model"),
        (lambda: retrofit.model_cost("vit-b16", 224), "model_cost takes a model's config"),
        (lambda: retrofit.export(model, tmp_path / "x"), "export() takes a merged model"),
    ]
    for call, message in calls:
        with pytest.raises(RetrofitError, match=re.escape(message)):
            call()
    result = retrofit.convert(str(tiny_vit), after_layer=1, num_tokens=4, output=tmp_path / "pm", log=lambda _: None)
    assert "PatchMerger" not in repr(result) and len(repr(result)) < 1000
    for report in ({"a": 1}, {"models": [{"x": 1}]}, [1, 2]):
        with pytest.raises(RetrofitError, match="update_card's evaluation must be a report as retrofit evaluate's"):
            retrofit.update_card(tmp_path / "pm", evaluation=report)
    with pytest.raises(RetrofitError, match="update_card's benchmark must be a report as retrofit bench's"):
        retrofit.update_card(tmp_path / "pm", benchmark={"models": []})
    assert not (tmp_path / "x").exists() and not (tmp_path / "pm" / "retrofit_results.json").exists()
    # A model object where a name goes (insert_patch_merger's source too), None, a whole number given as 2.0 or True, a
    # folder that is no export, a dict of settings: they were OSError "File name too long", 30 s of Hub retries for
    # "None", TypeError, "surgery mismatch", "fix that block or delete it", "not iterable" and AttributeError
    # tracebacks; insert_patch_merger recorded source=5 as the source '5'.
    from transformers import ViTForMaskedImageModeling

    from retrofit.benchmark import benchmark

    named = "a model is named by a Hub id, a folder or retrofit:NAME, not "
    calls = [
        (lambda: retrofit.load_model(model), named + "a ViTForImageClassification"),
        (lambda: retrofit.load_model(None), named + "None"),
        (lambda: retrofit.evaluate_models(model, data=str(tiny_vit)), "--models must be a list of text, not [<ViTFor"),
        (lambda: retrofit.insert_patch_merger(model, 2.0, 4), "insert_patch_merger's after_layer must be a whole"),
        (lambda: retrofit.insert_patch_merger(model, True, 4), "insert_patch_merger's after_layer must be a whole"),
        (lambda: retrofit.insert_patch_merger(model, 2, 4, source=model), "insert_patch_merger's source is the Hub"),
        (lambda: retrofit.insert_patch_merger(model, 2, 4, source=5), "the export records it), not 5"),
        (lambda: retrofit.insert_patch_merger(model, 2, 4, seed="7"), "insert_patch_merger's seed must be a whole"),
        (lambda: retrofit.insert_patch_merger(model, 2, 4, seed=2**64), "seed must be in [0, 2**32) (or None), not"),
        (lambda: retrofit.update_card(model), "update_card takes an export's folder, not a ViTForImageClassification"),
        (lambda: retrofit.update_card(tmp_path), "update_card: '" + str(tmp_path) + "' is not an export with a model"),
        (lambda: benchmark(str(tiny_vit), settings={"batch_sizes": 0}), "--batch-size must be a list of whole"),
        (lambda: benchmark(str(tiny_vit), settings=[1]), "benchmark's settings must be a BenchSettings or a dict"),
        (lambda: retrofit.register("vit"), "register takes a retrofit.Family, not 'vit'"),
        (  # a class retrofit does not convert was a RuntimeError "surgery mismatch ... missing=[...]"
            lambda: retrofit.insert_patch_merger(ViTForMaskedImageModeling(model.config), 2, 4),
            "insert_patch_merger merges the ViT classes retrofit converts (ViTForImageClassification, ViTModel), not "
            "a ViTForMaskedImageModeling; load the checkpoint with retrofit.load_model",
        ),
    ]
    for call, message in calls:
        with pytest.raises(RetrofitError, match=re.escape(message)) as refused:
            call()
        assert "\n" not in str(refused.value)  # one line (a model in a list was quoted with its whole repr)
    import numpy as np

    merged = retrofit.insert_patch_merger(model, np.int64(2), np.int64(4))  # NumPy's whole numbers are whole numbers
    assert merged.config.to_json_string() and merged.config.merge_after_layer == 2


def test_calibrate_refuses_what_it_cannot_take_in_one_line(tiny_vit):
    """`retrofit.calibrate.calibrate` given an unmerged model, a model on the meta device, pixels that are not a float
    batch, no images, another image size, or NaN pixels (which kept the random queries and printed "KL nan" without a
    word), or search settings it cannot use, raises one RetrofitError line, leaving the queries as they were; finite
    float pixels calibrate."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification

    import retrofit
    from retrofit.calibrate import calibrate
    from retrofit.errors import RetrofitError

    pixels = torch.randn(4, 3, 32, 32)
    merged = retrofit.insert_patch_merger(retrofit.load_model(str(tiny_vit)), after_layer=2, num_tokens=4)
    with torch.device("meta"):
        meta = retrofit.insert_patch_merger(ViTForImageClassification(ViTConfig.from_pretrained(tiny_vit)), 2, 4)
    queries = merged.patch_merger.queries.detach().clone()
    merged.train()
    for model, values, message in [
        (retrofit.load_model(str(tiny_vit)), pixels, "calibrate takes a merged model"),
        (meta, pixels, "this model is on the meta device"),
        (merged, [pixels], "as a float tensor .* not a list$"),
        (merged, pixels[0], "not a torch.float32 of shape \\(3, 32, 32\\)"),
        (merged, (pixels * 50).to(torch.uint8), "not a torch.uint8"),
        (merged, pixels[:0], "at least one image"),
        (merged, torch.randn(2, 3, 48, 48), "cannot run the model on pixel_values of shape \\(2, 3, 48, 48\\)"),
        (merged, torch.full_like(pixels, float("nan")), "NaN or infinite"),
    ]:
        with pytest.raises(RetrofitError, match=message):
            calibrate(model, values)
    for search, message in [  # TypeErrors from inside; no restart or no scale "calibrated" to the random queries
        ({"seed": "1"}, "calibrate's seed must be a whole number, not '1'"),
        ({"iterations": 2.5}, "calibrate's iterations must be a whole number, not 2.5"),
        ({"restarts": 0}, "calibrate needs iterations >= 0 and restarts >= 1, not 20 and 0"),
        ({"scales": ()}, "calibrate's scales must be a list of positive numbers, such as (0.5,"),
        ({"scales": 2.0}, "calibrate's scales must be a list of positive numbers"),
        ({"scales": (1.0, float("nan"))}, "calibrate's scales must be a list of positive numbers"),
        ({"scales": (1.0, 0)}, "calibrate's scales must be a list of positive numbers"),
    ]:
        with pytest.raises(RetrofitError, match=re.escape(message)):
            calibrate(merged, pixels, **search)
    assert torch.equal(merged.patch_merger.queries, queries) and merged.training
    assert calibrate(merged, pixels).images == 4 and merged.training


def test_model_cost_refuses_what_is_no_size_or_merge_in_one_line():
    """model_cost prices whole numbers (NumPy's too) and nothing else: text, a float, a bool, a size below one patch,
    a merge past the last layer or of no tokens were priced wrong without a word ("32" as 1 token a layer) or raised
    TypeError/IndexError; a size too large to price is one line, not an OverflowError."""
    import numpy as np
    from conftest import TINY
    from transformers import ViTConfig, ViTForImageClassification

    import retrofit
    from retrofit.errors import RetrofitError

    config = ViTConfig(**TINY)  # 32x32 images of 8x8 patches, 4 layers
    for size in (np.int64(32), (32, 32), [np.int32(32), 32]):
        assert retrofit.model_cost(config, size) == retrofit.model_cost(config)
    merged = retrofit.model_cost(config, merge=(np.int64(1), np.int32(4)))
    assert merged.tokens_per_layer == [17, 5, 5, 5] and all(type(n) is int for n in merged.tokens_per_layer)
    calls = [
        (("32",), {}, "image_size must be a whole number or a (height, width) pair of them, not '32'"),
        ((32.0,), {}, "image_size must be a whole number or a (height, width) pair of them, not 32.0"),
        ((True,), {}, "image_size must be a whole number or a (height, width) pair of them, not True"),
        (((32, "32"),), {}, "image_size must be a whole number, not '32'"),
        ((0,), {}, "image_size 0 is smaller than the model's 8x8 patches"),
        (((4, 32),), {}, "image_size (4, 32) is smaller than the model's 8x8 patches"),  # one side below: no patch
        ((10**400,), {}, "image_size a number of about 400 digits is too large to price"),
        ((), {"merge": ("1", 4)}, "merge after_layer must be a whole number, not '1'"),
        ((), {"merge": (1, 2.5)}, "merge num_tokens must be a whole number, not 2.5"),
        ((), {"merge": (4, 4)}, "merge after_layer 4 is out of range: this model has 4 layers, so use 1..3"),
        ((), {"merge": (1, 0)}, "merge num_tokens 0 is out of range: the model has 16 patch tokens, so use 1..15"),
        ((), {"merge": (1, 16)}, "merge num_tokens 16 is out of range: the model has 16 patch tokens, so use 1..15"),
        ((), {"merge": 3}, "merge must be a pair (after_layer, num_tokens), not 3"),
    ]
    for args, kwargs, message in calls:
        with pytest.raises(RetrofitError, match="^model_cost's " + re.escape(message) + "$"):
            retrofit.model_cost(config, *args, **kwargs)
    # a merged config with merge=: it was priced as its source merged that way, not as the model it describes
    merged = retrofit.insert_patch_merger(ViTForImageClassification(config), 1, 4).config
    assert retrofit.model_cost(merged) == retrofit.model_cost(config, merge=(1, 4))
    with pytest.raises(RetrofitError, match=r"^model_cost's merge .* already merged \(after layer 1, 4 tokens\): drop"):
        retrofit.model_cost(merged, merge=(2, 2))


def test_the_arguments_only_python_calls_take_are_refused_in_one_line_before_any_work(tiny_vit, tmp_path):
    """What no option checks (`log`, the flags, `stop_after`, sweep's settings, bench's merges as pairs, push's and
    export_onnx's model) is refused in one line before anything is loaded or written. They were TypeError tracebacks
    after the work (log=None at its first line, after calibrating; stop_after="1" in the loop), AttributeError
    (sweep's settings as a dict, which benchmark takes), OSError "File name too long" (export_onnx given a model
    object), or taken without a word: overwrite="no" is true, stop_after=-1 ran no step and wrote no export,
    stop_after=1.5 and a merge (1.5, 4) were read as 2 and 1."""
    import numpy as np

    import retrofit
    from retrofit.benchmark import benchmark
    from retrofit.deploy import export_onnx
    from retrofit.errors import RetrofitError
    from retrofit.finetune import pretrain
    from retrofit.push import push
    from retrofit.recipes import run_recipe
    from retrofit.sweep import sweep

    source, out, onnx = str(tiny_vit), tmp_path / "out", tmp_path / "m.onnx"
    train = {"source": source, "output": out, "after_layer": 1, "num_tokens": 4, "data": str(tmp_path / "none")}
    finetune, convert = retrofit.finetune, retrofit.convert
    no_function = "'s log must be a function taking one line of text (print; lambda _: None for none), not "
    calls = [
        (lambda: convert(source, after_layer=1, num_tokens=4, output=out, log=None), "convert" + no_function + "None"),
        (lambda: finetune(**train, log="x"), "finetune" + no_function + "'x'"),
        (lambda: retrofit.evaluate_models(source, data=source, log=1), "evaluate_models" + no_function + "1"),
        (lambda: benchmark(source, log=None), "benchmark" + no_function + "None"),
        (lambda: sweep(source, {"data": source}, log=None), "sweep" + no_function + "None"),
        (lambda: finetune(**train, stop_after="1"), "finetune's stop_after must be a whole number, not '1'"),
        (lambda: finetune(**train, stop_after=1.5), "finetune's stop_after must be a whole number, not 1.5"),
        (lambda: finetune(**train, stop_after=-1), "finetune's stop_after must be at least 1 (or None), not -1"),
        (lambda: finetune(**train, progress="no"), "finetune's progress must be True or False, not 'no'"),
        (lambda: finetune(**train, eval_at_start=1), "finetune's eval_at_start must be True or False, not 1"),
        (lambda: pretrain({}, output=out, data=source, overwrite="no"), "pretrain's overwrite must be True or False"),
        (lambda: run_recipe(tmp_path / "r.yaml", resume="no"), "run_recipe's resume must be True or False, not 'no'"),
        (lambda: sweep(source, {"data": source}, output=out, overwrite="no"), "sweep's overwrite must be True or"),
        (lambda: sweep(source, None), "sweep's settings must be a SweepSettings or a dict of its fields, not None"),
        (lambda: sweep(source, {"data": source, "tokns": 4}), "unknown setting 'tokns' for sweep(); did you mean"),
        (lambda: sweep(source, {"data": source}, output=3), "sweep's output must be a folder's path, not 3"),
        (lambda: benchmark(source, merges=[(1.5, 4)]), "--merge '1.5:4' is not K:M"),
        (lambda: benchmark(source, merges=5), 'benchmark\'s merges must be text such as "6:8,half:8" or a list of'),
        (lambda: push(out, "me/x", private="no"), "push's private must be True or False, not 'no'"),
        (lambda: push(retrofit.load_model(source), "me/x"), "push takes an export's folder, not a ViTForImage"),
        (lambda: push(out, None), "push's repo_id is a Hub repo id (your-user/name), not None"),
        (lambda: benchmark([retrofit.load_model(source)]), "benchmark's models are shape names, checkpoints, expor"),
        (lambda: benchmark([None]), "checkpoints, exports or .onnx files (text or paths), not None"),
        (lambda: export_onnx(retrofit.load_model(source), onnx), "--model must be text, not a ViTForImageClass"),
        (lambda: export_onnx(source, None), "--output must be text, not None"),
        (lambda: export_onnx(source, onnx, log=None), "export_onnx" + no_function + "None"),
    ]  # fmt: skip
    for call, message in calls:
        with pytest.raises(RetrofitError, match=re.escape(message)) as refused:
            call()
        assert "\n" not in str(refused.value)
    assert list(tmp_path.iterdir()) == []
    # NumPy's True and whole numbers are taken, as the settings take them
    from retrofit.errors import check_arguments

    check_arguments("finetune", log=print, flags={"progress": np.bool_(False)}, count={"stop_after": np.int64(2)})


def test_plots_leave_a_notebooks_matplotlib_backend_and_figures_alone(tmp_path):
    """sweep's plot and bench's batch-size curve (sweep(output=...), update_card, bench --plot) draw apart from
    pyplot: they called matplotlib.use("Agg"), which switched a notebook's backend for the rest of its session (its
    own figures no longer showed)."""
    import matplotlib

    before = matplotlib.get_backend()
    matplotlib.use("svg")  # a backend other than Agg, as a notebook's inline one is
    import matplotlib.pyplot as plt

    from retrofit.benchmark import batch_size_figure
    from retrofit.sweep import plot

    mine = plt.figure()
    try:
        row = dict(top1=0.5, gflops=1.0, images_per_s=50.0, after_layer=1, tokens=2, pareto=True)
        report = dict(metric="accuracy", source_row=dict(row, images_per_s=40.0), settings_results=[row], best=row)
        report |= dict(environment=dict(hardware="CPU", dtype="fp32"), bench_batch_size=8, data="d", split="test")
        plot(report | dict(source="s", method="calibrate", target_speedup=1.2), tmp_path / "sweep.png")
        results = {"1": {"images_per_s": 10.0}, "4": {"images_per_s": 30.0}}
        curve = batch_size_figure({"models": [{"model": "m", "compile": "eager", "results": results}], **report})
        assert curve[:8] == (tmp_path / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert matplotlib.get_backend() == "svg" and plt.get_fignums() == [mine.number]
    finally:
        plt.close("all")
        matplotlib.use(before)


def test_a_run_in_another_thread_is_refused_its_output_and_keeps_its_own_lock(tiny_vit, tmp_path, monkeypatch):
    """A notebook's background run (a thread) holds its output's write lock against the process's other threads: a
    second convert to that output was let through (the lock counted for the whole process), and a run ending in one
    thread released the locks another thread's run had just taken."""
    import sys
    import threading

    import retrofit
    from retrofit import atomic
    from retrofit.errors import RetrofitError

    convert_module = sys.modules[retrofit.convert.__module__]
    working, finish = threading.Event(), threading.Event()
    real_check = convert_module.check_runs_on_its_images

    def slow_check(*args):  # the background run, paused after it took its lock
        if threading.current_thread() is not threading.main_thread():
            working.set()
            finish.wait(60)
        return real_check(*args)

    monkeypatch.setattr(convert_module, "check_runs_on_its_images", slow_check)
    background = threading.Thread(
        target=retrofit.convert, args=(str(tiny_vit),),
        kwargs=dict(after_layer=1, num_tokens=4, output=tmp_path / "a", log=lambda _: None),
    )  # fmt: skip
    background.start()
    try:
        assert working.wait(60)
        with pytest.raises(RetrofitError, match="another retrofit run in this process .* is writing '.*a' \\(its --ou"):
            retrofit.convert(str(tiny_vit), after_layer=1, num_tokens=4, output=tmp_path / "a", overwrite=True)

        @atomic.releases_write_locks
        def own_run() -> None:  # takes its lock, then the background run ends meanwhile
            atomic.hold_write_lock(tmp_path / "b", "--output")
            finish.set()
            background.join(60)
            assert set(atomic._HELD) == {atomic._lock_key(tmp_path / "b")}

        own_run()
    finally:
        finish.set()
        background.join(60)
    assert not atomic._HELD and (tmp_path / "a" / "config.json").is_file()


def test_the_training_loop_called_from_python_releases_its_checkpoint_folder(tiny_vit, tmp_path):
    """`retrofit.train.train(..., checkpoint_dir=)` (the loop bench/loop_overhead.py calls) releases the folder's write
    lock when it returns: it held it until the notebook's kernel ended, and a `retrofit finetune --resume` of that
    folder in a terminal was refused as "another retrofit run (process N) is writing" it."""
    from test_data import make_imagefolder

    import retrofit
    from retrofit import atomic
    from retrofit.loading import load_config, load_image_processor
    from retrofit.settings import TrainingRun
    from retrofit.train import train

    data = make_imagefolder(tmp_path / "colours", per_class=2, test_per_class=1)
    model = retrofit.insert_patch_merger(retrofit.load_model(str(tiny_vit)), 1, 4)
    run = TrainingRun(data=str(data), loss="ce", max_steps=1, batch_size=4, eval_split=None)
    processor = load_image_processor(str(tiny_vit), load_config(str(tiny_vit)))
    result = train(model, processor, run, checkpoint_dir=tmp_path / "ck", log=lambda _: None, progress_bar=False)
    assert result.finished and (tmp_path / "ck" / "step-00000001").is_dir()
    assert not atomic._HELD and not atomic.lock_file(tmp_path / "ck").exists()


def test_convert_draws_the_same_merger_whatever_another_thread_draws(tiny_vit, tmp_path, monkeypatch):
    """`convert(seed=0)` seeded torch's global generator, then drew the merger's start from it: a notebook's other
    thread drawing meanwhile (here, just before the merger's draw) changed the export, and its card still said
    "seed 0". The merger now draws from a generator of its own."""
    import threading

    import torch
    from safetensors.torch import load_file

    from retrofit import convert

    convert(tiny_vit, after_layer=2, num_tokens=4, output=tmp_path / "alone", log=lambda _: None)
    real = torch.nn.init.trunc_normal_

    def another_thread_draws_first(*args, **kwargs):  # the merger's draw
        thread = threading.Thread(target=torch.rand, args=(8,))
        thread.start()
        thread.join()
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.nn.init, "trunc_normal_", another_thread_draws_first)
    convert(tiny_vit, after_layer=2, num_tokens=4, output=tmp_path / "busy", log=lambda _: None)
    alone, busy = (
        load_file(tmp_path / "alone" / "model.safetensors"),
        load_file(tmp_path / "busy" / "model.safetensors"),
    )
    assert alone.keys() == busy.keys() and all(torch.equal(alone[name], busy[name]) for name in alone)
