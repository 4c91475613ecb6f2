"""Recipes: a YAML file describing one complete run (source, merge, data, training, evaluation, export), run with
``retrofit run RECIPE``. Command-line flags override recipe fields. Unknown or mistyped keys are refused, naming the
nearest valid key.

A recipe either fine-tunes a merged model (``source`` + ``merge``) or pretrains a baseline from scratch
(``pretrain``). ``source: retrofit:NAME`` names a checkpoint shipped in ``retrofit/assets/NAME``.
"""

from __future__ import annotations

import re
import statistics
import time
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path

import torch

from .errors import RetrofitError, brief, did_you_mean
from .families import TASKS

SPEED_REPEATS = 5  # timed passes per model in the before/after speed measurement

# Valid keys per section, with defaults (None = taken from TrainArgs / not set).
SCHEMA: dict[str, dict | None] = {
    "name": None,
    "description": None,
    "source": None,
    "task": None,  # image-classification | image-feature-extraction, as `finetune --task` (None: the source's own)
    "teacher": None,
    "pretrain": {"model": None, "image_processor": None},
    "merge": {"after_layer": None, "tokens": None, "rope_positions": None, "calibrate": True, "calibrate_images": 256},
    "data": {
        "name": None,
        "train_split": "train",
        "eval_split": "test",
        "image_column": "image",
        "label_column": "label",
        "limit": None,
        "sample": None,
        "eval_limit": None,
        "num_workers": 0,
        "augment": False,
    },
    "training": {
        "loss": None,
        "temperature": None,
        "alpha": None,
        "feature_weight": None,
        "train": None,
        "epochs": None,
        "max_steps": None,
        "lr": None,
        "merger_lr_scale": None,
        "weight_decay": None,
        "warmup_ratio": None,
        "batch_size": None,
        "grad_accum": None,
        "max_grad_norm": None,
        "mixed_precision": None,
        "gradient_checkpointing": None,
        "seed": None,
        "save_every": None,
        "keep_checkpoints": None,
        "eval_every": None,
        "report_to": None,
        "num_labels": None,
    },
    "evaluation": {"before": True, "batch_size": 256, "speed": True, "speed_batch_size": 256},
    "export": {"output": None, "checkpoint_dir": None, "push_to_hub": None, "private": False, "create_pr": False},
}

# The types of the keys outside `training` and `data` (those two become `TrainArgs`, which checks its own).
TYPES: dict[str, type | tuple[type, ...]] = {
    "name": str,
    "description": str,
    "source": str,
    "teacher": str,
    "merge.after_layer": int,
    "merge.tokens": int,
    "merge.rope_positions": str,
    "merge.calibrate": bool,
    "merge.calibrate_images": int,
    "evaluation.before": bool,
    "evaluation.batch_size": int,
    "evaluation.speed": bool,
    "evaluation.speed_batch_size": int,
    "export.output": str,
    "export.checkpoint_dir": str,
    "export.push_to_hub": str,
    "export.private": bool,
    "export.create_pr": bool,
}
TYPE_NAMES = {str: "text", int: "a whole number", bool: "true or false"}
POSITIVE = {"merge.after_layer", "merge.tokens", "merge.calibrate_images", "evaluation.batch_size",
            "evaluation.speed_batch_size"}  # fmt: skip
# YAML 1.1 (PyYAML) reads 1e-4 as text; it needs 1.0e-4. Numbers written that way are read as numbers here.
EXPONENT_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")

# Mappings passed through as keyword arguments (checked where they are used), so `--set` may reach inside them.
FREE_FORM = {"pretrain.model", "pretrain.image_processor"}

# Command-line flags of `retrofit run` -> recipe keys.
FLAG_KEYS = {
    "source": "source",
    "task": "task",
    "output": "export.output",
    "checkpoint_dir": "export.checkpoint_dir",
    "push_to_hub": "export.push_to_hub",
    "private": "export.private",
    "create_pr": "export.create_pr",
    "data": "data.name",
    "limit": "data.limit",
    "sample": "data.sample",
    "eval_limit": "data.eval_limit",
    "after_layer": "merge.after_layer",
    "tokens": "merge.tokens",
    "rope_positions": "merge.rope_positions",
    "loss": "training.loss",
    "train": "training.train",
    "epochs": "training.epochs",
    "max_steps": "training.max_steps",
    "lr": "training.lr",
    "batch_size": "training.batch_size",
    "mixed_precision": "training.mixed_precision",
    "gradient_checkpointing": "training.gradient_checkpointing",
    "seed": "training.seed",
    "report_to": "training.report_to",
}


def validate(recipe: dict, where: str = "recipe") -> dict:
    """Check every key against `SCHEMA` and fill in defaults; unknown keys -> `RetrofitError` naming the nearest."""
    if not isinstance(recipe, dict):
        raise RetrofitError(f"{where} must be a YAML mapping of sections (source, merge, data, training, ...)")
    out: dict = {}
    for key, value in recipe.items():
        if key not in SCHEMA:
            raise RetrofitError(f"unknown key '{key}' in {where}{did_you_mean(str(key), SCHEMA)}")
        section = SCHEMA[key]
        if section is None or key == "pretrain" and value is None:
            out[key] = value
            continue
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise RetrofitError(f"'{key}' in {where} must be a mapping with keys {', '.join(section)}")
        for sub in value:
            if sub not in section:
                raise RetrofitError(f"unknown key '{key}.{sub}' in {where}{did_you_mean(str(sub), section)}")
        out[key] = value
    for key, section in SCHEMA.items():
        if isinstance(section, dict) and key != "pretrain":
            out[key] = {sub: _number(value) for sub, value in {**section, **out.get(key, {})}.items()}
        else:
            out.setdefault(key, None)
    _check_types(out, where)
    if out["pretrain"] is None:
        if not out["source"]:
            raise RetrofitError(f"{where} needs 'source' (a Hub id, folder or retrofit:NAME) or a 'pretrain' section")
        if out["merge"]["after_layer"] is None or out["merge"]["tokens"] is None:
            raise RetrofitError(f"{where} needs merge.after_layer and merge.tokens")
    elif out["source"]:
        raise RetrofitError(f"{where} has both 'source' and 'pretrain'; a recipe either fine-tunes or pretrains")
    if out["task"] not in (None, *TASKS):
        raise RetrofitError(f"task in {where} must be one of {', '.join(TASKS)}, not {out['task']!r}")
    if not out["data"]["name"]:
        raise RetrofitError(f"{where} needs data.name (fashion-mnist, an image folder or a Hub dataset id)")
    if not out["export"]["output"]:
        raise RetrofitError(f"{where} needs export.output (the folder to write)")
    if out["pretrain"] is not None and out["export"]["push_to_hub"]:
        raise RetrofitError(
            f"{where} pretrains a plain transformers checkpoint, which export.push_to_hub does not upload; remove it "
            "and upload the folder with `hf upload`"
        )
    from .train import TrainArgs

    TrainArgs(**_train_settings(out)).check()  # the training settings too, before anything is loaded
    return out


def _number(value):
    """`value`, or the float it spells if it is text such as ``1e-4`` (see `EXPONENT_NUMBER`)."""
    return float(value) if isinstance(value, str) and EXPONENT_NUMBER.fullmatch(value.strip()) else value


def _check_types(recipe: dict, where: str) -> None:
    """Refuse a value of the wrong type (``merge.tokens: eight``) in one line, before anything is loaded."""
    for dotted, kind in TYPES.items():
        section, _, sub = dotted.partition(".")
        value = recipe[section].get(sub) if sub else recipe[section]
        if value is None:
            continue
        if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
            raise RetrofitError(f"{dotted} in {where} must be {TYPE_NAMES[kind]}, not {value!r}")
        if dotted in POSITIVE and value < 1:
            raise RetrofitError(f"{dotted} in {where} must be at least 1 (got {value})")


def _parse_value(text: str):
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(recipe: dict, overrides: dict[str, object]) -> dict:
    """Set dotted keys in a raw recipe: ``training.epochs``, or one level deeper inside a free-form mapping
    (`FREE_FORM`), such as ``pretrain.model.hidden_size``. Unknown keys are refused like in the file."""
    for dotted, value in overrides.items():
        keys = dotted.split(".")
        section = keys[0]
        if section not in SCHEMA:
            raise RetrofitError(f"unknown override '{dotted}'{did_you_mean(section, SCHEMA)}")
        valid = SCHEMA[section] or {}
        if len(keys) > 1 and keys[1] not in valid:
            raise RetrofitError(f"unknown override '{dotted}'{did_you_mean(keys[1], valid)}")
        if len(keys) > 3 or len(keys) == 3 and ".".join(keys[:2]) not in FREE_FORM:
            raise RetrofitError(f"unknown override '{dotted}'; only {', '.join(sorted(FREE_FORM))} take a third key")
        target = recipe
        for key in keys[:-1]:
            if not isinstance(target.get(key), dict):
                target[key] = {}
            target = target[key]
        target[keys[-1]] = value
    return recipe


def load_recipe(path: str | Path, overrides: dict[str, object] | None = None) -> dict:
    """Read, override and validate a recipe file."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise RetrofitError(f"recipe '{path}' does not exist; pass a YAML file such as recipes/fashion-mnist.yaml")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise RetrofitError(f"recipe '{path}' is not valid YAML ({brief(exc)})") from None
    except UnicodeDecodeError as exc:
        raise RetrofitError(f"recipe '{path}' is not UTF-8 text ({brief(exc)}); save it as UTF-8") from None
    if not isinstance(raw, dict):
        raise RetrofitError(f"recipe '{path}' must be a YAML mapping")
    return validate(apply_overrides(raw, overrides or {}), where=f"recipe '{path}'")


def _train_settings(recipe: dict, **extra) -> dict:
    from .train import TrainArgs

    valid = {f.name for f in fields(TrainArgs)}
    data, training = recipe["data"], recipe["training"]
    settings = {key: value for key, value in training.items() if value is not None and key in valid}
    settings.update(
        data=data["name"],
        split=data["train_split"],
        eval_split=data["eval_split"],
        image_column=data["image_column"],
        label_column=data["label_column"],
        limit=data["limit"],
        sample=data["sample"],
        eval_limit=data["eval_limit"],
        num_workers=data["num_workers"],
        augment=data["augment"],
        checkpoint_dir=recipe["export"]["checkpoint_dir"],
        eval_batch_size=recipe["evaluation"]["batch_size"],
        **extra,
    )
    return settings


# ----------------------------------------------------------------------------------------------------------------
# Measurements for the before/after table
# ----------------------------------------------------------------------------------------------------------------


@torch.inference_mode()
def images_per_second(
    models: dict[str, torch.nn.Module], shape: tuple, *, repeats: int = SPEED_REPEATS
) -> dict[str, float]:
    """Measured CPU/GPU forward throughput of each model on a random batch of `shape`, alternating the models;
    the median of `repeats` timed passes after a warm-up."""
    pixels = torch.randn(*shape)
    times: dict[str, list[float]] = {name: [] for name in models}
    for model in models.values():
        model.eval()(pixel_values=pixels)
    for _ in range(repeats):
        for name, model in models.items():
            started = time.perf_counter()
            model(pixel_values=pixels)
            times[name].append(time.perf_counter() - started)
    return {name: shape[0] / statistics.median(values) for name, values in times.items()}


@torch.inference_mode()
def accuracy(model, dataloader) -> float:
    """Top-1 accuracy of `model` on a dataloader of labelled batches (single process)."""
    model.eval()
    correct = seen = 0
    for batch in dataloader:
        correct += (model(pixel_values=batch["pixel_values"]).logits.argmax(-1) == batch["labels"]).sum().item()
        seen += len(batch["labels"])
    return correct / seen


def results_table(rows: list[dict], note: str | None = None) -> str:
    """A Markdown before/after table from rows of {model, accuracy, gflops, images_per_s} (a backbone's rows have
    `similarity`, its features' cosine similarity to the baseline's, instead of `accuracy`); `note` (how the speed was
    measured) goes under it."""
    backbone = any("similarity" in row for row in rows)
    quality = "feature similarity" if backbone else "accuracy"
    lines = [f"| model | {quality} | GFLOPs/image | images/s (measured) | speed-up |", "|---|---|---|---|---|"]
    base_speed = rows[0].get("images_per_s") if rows else None
    for row in rows:
        value = row.get("similarity" if backbone else "accuracy")
        acc = "n/a" if value is None else f"{value:.4f}" if backbone else f"{100 * value:.2f} %"
        speed = row.get("images_per_s")
        ratio = f"{speed / base_speed:.2f}x" if speed and base_speed else "n/a"
        speed_text = f"{speed:.0f}" if speed else "n/a"
        lines.append(f"| {row['model']} | {acc} | {row['gflops']:.4f} | {speed_text} | {ratio} |")
    if note:
        lines += ["", note]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# Running a recipe
# ----------------------------------------------------------------------------------------------------------------


def run_recipe(
    path: str | Path,
    overrides: dict[str, object] | None = None,
    *,
    overwrite: bool = False,
    resume: bool = False,
    log: Callable[[str], None] = print,
) -> dict:
    """Run a recipe end to end; returns a summary dict (also written as ``results.json`` next to the checkpoints)."""
    from .atomic import BASELINE, EXPORT, check_checkpoint_dir, check_output
    from .train import default_checkpoint_dir, list_checkpoints

    recipe = load_recipe(path, overrides)
    if recipe["source"]:
        from .loading import resolve_source

        resolve_source(recipe["source"])  # a bad retrofit:NAME is refused first
    # Before anything is measured or trained: where the run writes (the pretrain or fine-tune checks it again).
    output, export = recipe["export"]["output"], recipe["export"]
    checkpoint_dir = Path(export["checkpoint_dir"] or default_checkpoint_dir(output))
    check_checkpoint_dir(checkpoint_dir)
    resuming = resume and bool(list_checkpoints(checkpoint_dir))  # the run being resumed owns the output
    kind = EXPORT if recipe["pretrain"] is None else BASELINE
    inputs = (path, recipe["source"], recipe["teacher"], recipe["data"]["name"])
    check_output(output, overwrite or resuming, kind=kind, inputs=inputs)
    if recipe["pretrain"] is not None:
        return _run_pretrain(recipe, overwrite=overwrite, resume=resume, log=log)
    return _run_finetune(recipe, overwrite=overwrite, resume=resume, log=log)


def _run_pretrain(recipe: dict, *, overwrite: bool, resume: bool, log) -> dict:
    from .train import pretrain

    spec = recipe["pretrain"]
    if not isinstance(spec, dict) or not isinstance(spec.get("model"), dict):
        raise RetrofitError("pretrain.model must be a mapping of ViTConfig fields (image_size, hidden_size, ...)")
    output = recipe["export"]["output"]
    result = pretrain(
        spec["model"],
        output=output,
        image_processor=spec.get("image_processor"),
        log=log,
        **_train_settings(recipe, overwrite=overwrite, resume=resume),
    )
    summary = {"recipe": recipe, "steps": result.steps, "accuracy": result.final_accuracy, "seconds": result.seconds}
    log(f"baseline accuracy: {result.final_accuracy}; trained {result.steps} steps in {result.seconds / 60:.1f} min")
    return summary


def _run_finetune(recipe: dict, *, overwrite: bool, resume: bool, log) -> dict:
    from .atomic import write_report
    from .benchmark import hardware_name
    from .cost import model_cost
    from .data import load_split, make_dataloader
    from .evaluation import is_backbone
    from .loading import (
        classifier_is_new,
        for_task,
        load_config,
        load_image_processor,
        load_model,
        processor_image_size,
    )
    from .surgery import check_merge, insert_patch_merger
    from .train import (
        LABELS_FIX,
        check_runs_on_its_images,
        check_teacher_logits,
        default_checkpoint_dir,
        finetune,
        task_for,
    )

    source = str(recipe["source"])  # as the user wrote it (a Hub id, a folder or retrofit:NAME): it goes in the card
    merge, data, evaluation, export = recipe["merge"], recipe["data"], recipe["evaluation"], recipe["export"]
    output = export["output"]
    if export["push_to_hub"]:  # before the baseline is measured: a run must not end in "not logged in"
        from .push import check_push

        check_push(export["push_to_hub"], private=bool(export["private"]), create_pr=bool(export["create_pr"]))
    saved = load_config(source)
    config = for_task(saved, task_for(recipe["task"], recipe["training"]["num_labels"]))  # as `finetune` will load it
    # A classifier the checkpoint does not hold (a backbone given --num-labels) starts random: nothing to score
    # before training, so only the fine-tuned row has an accuracy.
    new_classifier = classifier_is_new(saved, config)
    before = bool(evaluation["before"]) and not new_classifier
    settings = _train_settings(recipe, overwrite=overwrite, resume=resume, eval_at_start=before)
    # A backbone has no labels to score: its rows give the cosine similarity of its features to the baseline's.
    backbone = is_backbone(config)
    quality, reference = ("similarity", "teacher features") if backbone else ("accuracy", "labels")
    check_teacher_logits(source, saved, config, settings.get("loss", "kd"))
    processor = load_image_processor(source, config, log=log)
    image_size = processor_image_size(processor)
    check_merge(config, merge["after_layer"], merge["tokens"], image_size, rope_positions=merge["rope_positions"])

    # Baseline: accuracy on the evaluation split, cost and measured speed (source vs merged architecture).
    baseline = load_model(source, config=config).eval()
    check_runs_on_its_images(baseline, processor, source)
    baseline_name = f"baseline `{recipe['source']}`" + (
        " (its classifier is new: not scored)" if new_classifier else ""
    )
    rows = [{"model": baseline_name, "gflops": model_cost(config, image_size).gflops}]
    # The untrained merged architecture: its cost here, its speed below (the fine-tuned model is built by `finetune`).
    merged_arch = insert_patch_merger(load_model(source, config=config), merge["after_layer"], merge["tokens"],
                                      rope_positions=merge["rope_positions"]).eval()  # fmt: skip
    merged_cost = model_cost(merged_arch.config, image_size)
    if backbone:  # similarity to the teacher: the baseline itself unless the recipe names another one
        rows[0]["similarity"] = None if recipe["teacher"] else 1.0
    elif before and data["eval_split"]:
        eval_set = load_split(data["name"], data["eval_split"], image_column=data["image_column"],
                              label_column=data["label_column"], limit=data["eval_limit"])  # fmt: skip
        from .data import dataset_label_map, model_labels

        eval_dl = make_dataloader(
            eval_set,
            processor,
            batch_size=min(evaluation["batch_size"], len(eval_set)),
            num_channels=getattr(config, "num_channels", None),
            label_map=dataset_label_map(model_labels(config), eval_set, data["name"], fix=LABELS_FIX),
        )
        rows[0]["accuracy"] = accuracy(baseline, eval_dl)
        log(f"baseline accuracy: {100 * rows[0]['accuracy']:.2f} %")
    speeds, speed_note = {}, None
    if evaluation["speed"]:
        height, width = image_size
        shape = (evaluation["speed_batch_size"], getattr(config, "num_channels", 3), height, width)
        speeds = images_per_second({"baseline": baseline, "merged": merged_arch}, shape)
        rows[0]["images_per_s"] = speeds["baseline"]
        speed_note = (
            f"images/s: {hardware_name('cpu')}, fp32, batch {shape[0]} at {height}×{width}, median of "
            f"{SPEED_REPEATS} passes, the two models alternated"
        )
    del merged_arch
    tag = f"merged K={merge['after_layer']} M={merge['tokens']}"

    def table_rows(result) -> list[dict]:
        out = [dict(rows[0])]
        history = [h for h in result.eval_history if h.get("reference") == reference]
        if before and history and history[0]["step"] == 0:
            init = "calibrated" if merge["calibrate"] else "random"
            out.append({"model": f"{tag}, {init} init, no training", quality: history[0][quality],
                        "gflops": merged_cost.gflops, "images_per_s": speeds.get("merged")})  # fmt: skip
        out.append({"model": f"{tag}, fine-tuned ({result.steps} steps, loss {settings.get('loss', 'kd')})",
                    quality: history[-1][quality] if history else None, "gflops": merged_cost.gflops,
                    "images_per_s": speeds.get("merged")})  # fmt: skip
        return out

    result = finetune(
        source,
        output=output,
        after_layer=merge["after_layer"],
        num_tokens=merge["tokens"],
        rope_positions=merge["rope_positions"],
        calibrate=bool(merge["calibrate"]),
        calibrate_images=merge["calibrate_images"],
        teacher=recipe["teacher"],
        task=recipe["task"],
        card_results=lambda res: results_table(table_rows(res), note=speed_note),
        push_to_hub=export["push_to_hub"],
        private=bool(export["private"]),
        create_pr=bool(export["create_pr"]),
        log=log,
        **settings,
    )
    table = results_table(table_rows(result), note=speed_note)
    log("")
    log(table)
    summary = {"recipe": recipe, "rows": table_rows(result), "steps": result.steps, "seconds": result.seconds}
    checkpoint_dir = Path(export["checkpoint_dir"] or default_checkpoint_dir(output))
    if checkpoint_dir.is_dir():
        try:  # replaces the results.json of an earlier run, nothing else
            write_report(checkpoint_dir / "results.json", summary, overwrite=True, kind="run")
        except RetrofitError as exc:
            log(f"warning: results.json not written: {exc}")
    return summary
