"""`sweep`: accuracy and speed over merge placements (after-layer x tokens), to pick a setting for a target speed-up.

Each setting gets the data-calibrated merger initialisation (`retrofit.calibrate`; cheap, shares the source weights)
or, with ``method="finetune"``, a short fine-tune (`retrofit.finetune.finetune`, ``finetune_steps`` steps). Accuracy is
measured on one split with the shipped `evaluate` metrics (for a backbone: the cosine similarity of its features to
the unmerged model's, `retrofit.evaluation.feature_similarity`, which needs no labels; for a dual encoder with
``zero_shot``: zero-shot top-1 over one prompt per class of the data, `retrofit.evaluation.zero_shot_scores`);
speed with `retrofit.benchmark` (all settings and the source measured alternately in one process). Writes ``sweep.md``,
``sweep.json`` and ``sweep.png`` (accuracy or similarity against images/s, Pareto front marked, the source as a
reference point) into the output folder.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import fields, replace
from pathlib import Path

from .errors import RetrofitError, check_arguments, log_to_stderr, shown
from .reads import reads_each_folder_once
from .settings import SWEEP_NEEDS_DATA, SWEEP_TOKENS, BenchSettings, SweepArgs, SweepSettings, from_options


def pareto_front(points: list[dict], x: str = "images_per_s", y: str = "top1") -> list[dict]:
    """The points not beaten on both `x` and `y` by another point, sorted by `x` (points without both: none)."""
    front = [
        p
        for p in points
        if p.get(x) is not None
        and p.get(y) is not None
        and not any(
            q is not p
            and q.get(x) is not None
            and q.get(y) is not None
            and q[x] >= p[x]
            and q[y] >= p[y]
            and (q[x] > p[x] or q[y] > p[y])
            for q in points
        )
    ]
    return sorted(front, key=lambda p: p[x])


def _score(key: str, row: dict) -> str:
    """A setting's quality as printed: top-1 in %, or feature similarity."""
    return f"top-1 {100 * row[key]:.2f} %" if key == "top1" else f"feature similarity {row[key]:.4f}"


def best_for_target(rows: list[dict], target: float | None, key: str = "top1") -> tuple[dict | None, str]:
    """The best setting (by `key`: top1, or similarity for backbones) whose measured speed-up reaches `target`
    (ties: the faster), and a sentence. Settings whose speed-up could not be measured (None) are skipped."""
    from .benchmark import ratio_text

    if target is None:
        return None, ""
    measured = [r for r in rows if r.get("speedup") is not None and r.get(key) is not None]
    if not measured:
        return None, (
            f"No setting's speed-up could be measured (see the images/s column), so none can be named for "
            f"{target:g}x; lower --bench-batch-size and run again."
        )
    reaching = [r for r in measured if r["speedup"] >= target]
    if not reaching:
        fastest = max(measured, key=lambda r: r["speedup"])
        return None, (
            f"No setting reaches a measured speed-up of {target:g}x here; the fastest is after-layer "
            f"{fastest['after_layer']}, {fastest['tokens']} tokens at {ratio_text(fastest['speedup'], target)}x "
            f"(FLOPs ratio {ratio_text(fastest['flops_ratio'], target)}x)."
        )
    best = max(reaching, key=lambda r: (r[key], r.get("speedup") or 0))
    return best, (
        f"Best setting for a {target:g}x speed-up: --after-layer {best['after_layer']} --tokens {best['tokens']} "
        f"({_score(key, best)}, measured {ratio_text(best['speedup'], target)}x, "
        f"FLOPs ratio {ratio_text(best['flops_ratio'], target)}x)."
    )


def _unmeasured(row: dict) -> str:
    """How a row whose speed could not be measured shows: ``OOM`` (out of memory) or ``failed``."""
    return "OOM" if row.get("speed_status") == "oom" else "failed"


def _speed_cells(row: dict, speedup: float | None, target: float | None = None) -> str:
    """The images/s and measured speed-up cells of a row (``OOM``/``failed`` and ``–`` where not measured; ``⚠``
    where its repeats spread by more than `retrofit.benchmark.SPREAD_LIMIT`, as `retrofit bench` flags them; a
    speed-up on the side of the `target` speed-up it is on)."""
    if row.get("images_per_s") is None:
        return f"{_unmeasured(row)} | –"
    from .benchmark import rate_text, ratio_text

    flag = " ⚠" if _spread_too_wide(row) else ""
    ratio = "–" if speedup is None else f"{ratio_text(speedup, target or 1.0)}×"
    return f"{rate_text(row['images_per_s'])}{flag} | {ratio}"


def _spread_too_wide(row: dict) -> bool:
    from .benchmark import SPREAD_LIMIT

    return (row.get("speed_spread") or 0.0) > SPREAD_LIMIT


def _spread_note(report: dict) -> list[str]:
    """The line under the table that names each speed whose repeats spread too wide: on a loaded machine a measured
    speed-up (and the setting named for a target) can be noise."""
    from .benchmark import SPREAD_LIMIT

    if report.get("bench_repeats") == 1:  # no spread to flag: a loaded machine's speed would pass unseen (as in bench)
        return [
            "",
            "Each speed was measured once (--bench-repeats 1), so how much it varies is not known; measure with "
            "--bench-repeats 3 or more before choosing a setting by its speed-up.",
        ]
    rows = [("source", report["source_row"])] + [(_setting_name(r), r) for r in report["settings_results"]]
    wide = [f"{name}: {100 * row['speed_spread']:.0f} %" for name, row in rows if _spread_too_wide(row)]
    if not wide:
        return []
    return [
        "",
        f"⚠ speed repeats spread over {100 * SPREAD_LIMIT:.0f} % of the median (a loaded machine?): {'; '.join(wide)}. "
        "Measure again on an idle machine, or with more --bench-repeats.",
    ]


def markdown_table(report: dict) -> str:
    """One row per setting (and the source first): top-1, top-k and loss, or a backbone's feature similarity; a
    speed that could not be measured shows as OOM or failed; a setting whose outputs were not finite is noted."""
    from .evaluation import nonfinite_notes, number

    top_key = f"top{report.get('top_k')}"
    if report.get("metric") == "similarity":
        head, columns = "feature similarity", 1

        def quality(row: dict) -> str:
            return number(row["similarity"], ".4f")
    elif report.get("metric") == "zero-shot":
        head, columns = f"zero-shot top-1 | top-{report['top_k']} | agreement with the source", 3

        def quality(row: dict) -> str:
            return f"{100 * row['top1']:.2f} % | {100 * row[top_key]:.2f} % | {100 * row['agreement']:.2f} %"
    else:
        head, columns = f"top-1 | top-{report['top_k']} | loss", 3

        def quality(row: dict) -> str:
            return f"{100 * row['top1']:.2f} % | {100 * row[top_key]:.2f} % | {number(row['loss'], '.4f')}"

    src = report["source_row"]
    lines = [
        f"| after layer | tokens | {head} | GFLOPs | FLOPs ratio | images/s | measured speed-up | Pareto |",
        "|" + "---|" * (columns + 7),
        f"| source | all | {quality(src)} | {src['gflops']:.3g} | 1.00 | {_speed_cells(src, 1.0)} | |",
    ]
    for r in report["settings_results"]:
        lines.append(
            f"| {r['after_layer']} | {r['tokens']} | {quality(r)} | {r['gflops']:.3g} | {r['flops_ratio']:.2f} | "
            f"{_speed_cells(r, r['speedup'], report.get('target_speedup'))} | {'★' if r['pareto'] else ''} |"
        )
    return "\n".join(lines + nonfinite_notes(report["settings_results"], _setting_name) + _spread_note(report))


def _setting_name(row: dict) -> str:
    return f"after-layer {row['after_layer']}, {row['tokens']} tokens"


PLOT_MARK = "retrofit sweep"  # sweep.png's Software field: how --overwrite knows the plot is retrofit's


def plot(report: dict, path: Path) -> None:
    """accuracy (backbones: feature similarity) against images/s, settings labelled K/M, Pareto front joined, the
    source as a star; settings whose speed could not be measured are listed under the plot instead. The PNG carries
    `PLOT_MARK`."""
    from .benchmark import figure

    src = report["source_row"]
    key = "similarity" if report.get("metric") == "similarity" else "top1"
    rows = [r for r in report["settings_results"] if r.get("images_per_s") is not None and r.get(key) is not None]
    unmeasured = [f"K={r['after_layer']},M={r['tokens']}" for r in report["settings_results"] if r not in rows]
    unmeasured = (["source"] if src.get("images_per_s") is None else []) + unmeasured
    scale = 1 if key == "similarity" else 100
    fig, ax = figure(figsize=(7, 4.5), dpi=120)
    ax.scatter([r["images_per_s"] for r in rows], [scale * r[key] for r in rows], c="tab:blue", label="settings")
    front = [r for r in rows if r["pareto"]]
    front.sort(key=lambda r: r["images_per_s"])
    ax.plot(
        [r["images_per_s"] for r in front], [scale * r[key] for r in front], "-o", c="tab:red", label="Pareto front"
    )
    if src.get("images_per_s") is not None:
        ax.scatter([src["images_per_s"]], [scale * src[key]], marker="*", s=200, c="black", label="source", zorder=3)
        if report.get("target_speedup"):
            ax.axvline(src["images_per_s"] * report["target_speedup"], ls="--", c="grey", label="target speed-up")
    if unmeasured:  # a legend entry without a marker
        ax.plot([], [], " ", label=f"not measured (OOM, failed or NaN): {', '.join(unmeasured)}")
    if report.get("best"):
        best = report["best"]
        ax.scatter([best["images_per_s"]], [scale * best[key]], s=200, facecolors="none", edgecolors="green", lw=2)
    env = report["environment"]
    ax.set_xlabel(f"images/s ({env['hardware']}, {env['dtype']}, batch {report['bench_batch_size']})")
    quality = "feature similarity to the source" if key == "similarity" else "top-1 accuracy (%)"
    if report.get("metric") == "zero-shot":
        quality = "zero-shot top-1 accuracy (%)"
    held = " (held out)" if report.get("holdout") else ""
    ax.set_ylabel(f"{quality} on {Path(report['data']).name} {report['split']}{held}")
    ax.set_title(f"PatchMerger placement sweep: {Path(report['source']).name} ({report['method']})", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    source_point = [(src["images_per_s"], scale * src[key])] if src.get("images_per_s") is not None else []
    names = [(f"K={r['after_layer']},M={r['tokens']}", r["images_per_s"], scale * r[key]) for r in rows]
    _label_points(fig, ax, names, avoid=source_point)
    fig.savefig(path, format="png", metadata={"Software": PLOT_MARK})


# Where a point's label may go, in points from the point, tried in this order.
LABEL_OFFSETS = ((4, 3), (4, -9), (-4, 3), (-4, -9), (4, 10), (-4, 10), (4, -16), (-4, -16))


def _label_points(fig, ax, labels: list[tuple[str, float, float]], avoid: list[tuple[float, float]] = ()) -> None:
    """Label each point (text, x, y) beside it, at the first of `LABEL_OFFSETS` where the label stays inside the axes
    and overlaps no label placed before it, no other point and none of `avoid` (x, y); at the first offset if none is
    free. Settings that lie close together so stay readable. Labels are placed from the top of the plot down."""
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    obstacles = ax.transData.transform([(x, y) for _, x, y in labels] + list(avoid)) if labels else []
    placed = []
    for text, x, y in sorted(labels, key=lambda label: -label[2]):
        here = ax.transData.transform((x, y))
        others = [point for point in obstacles if abs(point[0] - here[0]) + abs(point[1] - here[1]) > 1e-6]
        for tried in (*LABEL_OFFSETS, None):
            offset = tried or LABEL_OFFSETS[0]  # None: nowhere free, the first place
            label = ax.annotate(
                text, (x, y), xytext=offset, textcoords="offset points", fontsize=7,
                ha="left" if offset[0] > 0 else "right",
            )  # fmt: skip
            box = label.get_window_extent(renderer)
            inside = frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
            padded = box.expanded(1.05, 1.1)
            free = inside and not any(padded.overlaps(other) for other in placed)
            free = free and not any(padded.contains(px, py) for px, py in others)
            if free or tried is None:
                placed.append(box)
                break
            label.remove()


def _merged_models(
    source, source_model, pixels, settings: SweepSettings, work: Path, log, task: str | None = None
) -> tuple[list[tuple], int | None]:
    """(K, M, model) per setting, initialised by calibration on `pixels` (the same images for every setting) or a
    short fine-tune (of the source loaded for `task`: its backbone, where it has no trained classifier); and the
    number of images each fine-tune read (None: calibrated)."""

    from .calibrate import calibrate
    from .loading import load_model
    from .surgery import insert_patch_merger

    models, images = [], None
    for k in settings.after_layers:
        for m in settings.tokens:
            log(f"setting after-layer {k}, {m} tokens ({settings.method}) ...")
            if settings.method == "calibrate":
                size = tuple(pixels.shape[-2:])  # the processor's: `check_merge` bounded m by it
                # the random start (kept where no k-means candidate beats it) drawn from the seed, as convert draws
                # it: it came from whatever the process had drawn before, so a sweep's numbers changed between runs
                merged = insert_patch_merger(source_model, k, m, source=str(source), image_size=size,
                                             seed=settings.seed).eval()  # fmt: skip
                log(calibrate(merged, pixels, seed=settings.seed).summary())
            else:
                from .data import BatchLargerThanData
                from .finetune import finetune

                out = work / f"k{k}-m{m}"
                try:
                    images = finetune(
                        source,
                        output=out,
                        after_layer=k,
                        num_tokens=m,
                        data=settings.data,
                        data_revision=settings.data_revision,
                        split=settings.calibrate_split,
                        holdout=settings.holdout,  # never the images the sweep scores
                        image_column=settings.image_column,
                        label_column=settings.label_column,
                        calibrate_images=settings.calibrate_images,
                        # as many images as the steps read, the same shuffled sample for every setting: from the
                        # Hub only these are downloaded
                        sample=settings.finetune_steps * settings.finetune_batch_size,
                        batch_size=settings.finetune_batch_size,
                        eval_split=None,
                        max_steps=settings.finetune_steps,
                        seed=settings.seed,
                        task=task,
                        progress=False,
                        overwrite=True,
                        log=log,
                    ).images  # fewer than steps × batch where the split holds fewer
                except BatchLargerThanData as exc:
                    raise BatchLargerThanData(exc.batch_size, exc.examples, "--finetune-batch-size") from None
                merged = load_model(out).eval()
            models.append((k, m, merged))
    return models, images


def bench_settings(settings: SweepSettings) -> BenchSettings:
    """How a sweep measures speed: every setting and the source at one batch size, alternately."""
    return BenchSettings(
        device=settings.device,
        dtype=settings.dtype,
        batch_sizes=(settings.bench_batch_size,),
        warmup=2,
        repeats=settings.bench_repeats,
        min_time=0.5,
        latency_iters=3,
    )


def check_output_folder(settings: SweepSettings, output: str | Path | None, overwrite: bool, source: str) -> None:
    """Refuse, before any work, an `output` folder a sweep of `source` may not write (`retrofit.atomic`)."""
    from .atomic import SWEEP, check_output

    if output is not None:
        if not str(output).strip():
            raise RetrofitError("--output is empty; give a folder name, or leave it out for sweep-<source name>")
        check_output(output, overwrite, kind=SWEEP, inputs=(source, settings.data))


@reads_each_folder_once
def sweep(
    source: str,
    settings: SweepSettings | dict,
    *,
    output: str | Path | None = None,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
) -> dict:
    """Run the sweep; returns the report (and writes sweep.md/json/png into `output` if given). `settings`: a
    `SweepSettings`, or a dict of its fields (as `retrofit.benchmark.benchmark` takes them). The caller's random
    generators are left as they were."""
    from .train import callers_random_state

    with callers_random_state():
        return _sweep(source, settings, output=output, overwrite=overwrite, log=log)


def _splits_as_read(settings: SweepSettings) -> SweepSettings:
    """`settings` naming the splits the sweep reads (`split_read`: validation of a folder of train/ and test/ reads
    test/), refused where calibration and scoring would read one split under two names."""
    from .data import split_read

    read = {"calibrate_split": split_read(settings.data, settings.calibrate_split, revision=settings.data_revision)}
    if settings.split is not None:
        read["split"] = split_read(settings.data, settings.split, revision=settings.data_revision)
        if read["split"] == read["calibrate_split"] and settings.holdout is None:
            raise RetrofitError(
                f"--split '{settings.split}' and --calibrate-split '{settings.calibrate_split}' both read the split "
                f"'{read['split']}' of '{settings.data}' (validation and test read the evaluation split it has), so "
                "each setting would be scored on images it saw; measure on another split, or hold some of it out with "
                "--holdout 0.1"
            )
    return replace(settings, **read) if any(getattr(settings, k) != v for k, v in read.items()) else settings


def _sweep(
    source: str,
    settings: SweepSettings | dict,
    *,
    output: str | Path | None,
    overwrite: bool,
    log: Callable[[str], None],
) -> dict:
    """`sweep`'s work."""
    import tempfile

    from .benchmark import Variant, environment, parse_device, place_model, run_benchmark, spread, timed_part
    from .benchmark import _input_shape as input_shape
    from .cost import model_cost
    from .data import dataset_label_map, load_split, make_dataloader, model_labels
    from .evaluation import (
        check_dual_encoders,
        check_label_ids,
        feature_similarity,
        images_chosen,
        is_backbone,
        load_zero_shot_tokenizer,
        score_models,
        zero_shot_classes,
        zero_shot_scores,
    )
    from .loading import (
        check_runs_on_its_images,
        family_and_head,
        image_channels,
        load_config,
        load_image_processor,
        load_model,
        processor_image_size,
        trained_head_config,
    )
    from .provenance import dataset_commit, versions
    from .settings import scored_images
    from .surgery import check_merge
    from .zero_shot import prompts

    if isinstance(settings, dict):  # the fields of SweepSettings, as a notebook writes them
        settings = from_options(SweepSettings, settings, where="sweep()")
    elif not isinstance(settings, SweepSettings):
        raise RetrofitError(f"sweep's settings must be a SweepSettings or a dict of its fields, not {shown(settings)}")
    check_arguments("sweep", log=log, flags={"overwrite": overwrite})
    if output is not None and not isinstance(output, str | os.PathLike):
        raise RetrofitError(f"sweep's output must be a folder's path, not {shown(output)}")
    if output is not None:  # "~/sweep" is in the home folder, as in the settings of every command
        output = os.path.expanduser(output)
    if settings.data is None:
        raise RetrofitError(f"--data {SWEEP_NEEDS_DATA}")
    settings = _splits_as_read(settings)
    check_output_folder(settings, output, overwrite, source)
    parse_device(settings.device)  # a GPU this machine lacks, before any setting is built (the speed test needs it)
    saved = load_config(source)
    config = trained_head_config(saved)  # a checkpoint without a trained classifier is ranked by its features
    if config is not saved:
        log(
            f"note: '{source}' ({', '.join(saved.architectures)}) has no trained classifier; ranking the settings by "
            f"the features of its {family_and_head(config)[1].class_name}"
        )
    zero_shot = settings.zero_shot  # a dual encoder ranked by zero-shot top-1 on the data's class names
    if zero_shot:
        check_dual_encoders([source], [config])
    backbone = is_backbone(config) and not zero_shot  # ranked by feature similarity to the source (no labels read)
    key = "similarity" if backbone else "top1"
    # the size of the images the processor gives the model, which it is scored, timed and priced at (DINOv2's config
    # says 518, its processor crops 224), as --dry-run and convert price it
    processor = load_image_processor(source, config, log=log)
    image_size = processor_image_size(processor)
    if settings.after_layers is None or settings.tokens is None:
        after_layers, tokens = default_grid(config, image_size, settings.after_layers, settings.tokens)
        log(f"trying after-layer {','.join(map(str, after_layers))} × tokens {','.join(map(str, tokens))}")
        settings = replace(settings, after_layers=after_layers, tokens=tokens)
    for k in settings.after_layers:
        for m in settings.tokens:
            check_merge(config, k, m, image_size)
    chosen = scored_images(settings)  # the images every setting is scored on
    chosen["revision"] = settings.data_revision
    # --holdout: scored on the fraction of the calibration split that calibration and fine-tuning never read
    held_out = settings.holdout is not None
    if held_out:  # stratified by --label-column, as the calibration images and finetune's are (read or not)
        chosen |= {"holdout": settings.holdout, "held": True, "holdout_by": settings.label_column}
    # the split the scores are on, as read (`_splits_as_read`: test read as validation names it)
    split = settings.calibrate_split if held_out else settings.split
    commit = dataset_commit(settings.data, settings.data_revision)  # a Hub dataset's, asked as it is read
    dataset = load_split(
        settings.data, split, image_column=settings.image_column,
        label_column=None if backbone else settings.label_column, split_classes=zero_shot, log=log, **chosen,
    )  # fmt: skip
    if zero_shot:  # class names, the prompts and the tokenizer, refused in one line before any setting is built
        names, zero_shot_map = zero_shot_classes(dataset, settings.data)
        texts = prompts(names, settings.prompt_template)
        tokenizer = load_zero_shot_tokenizer(source, config, texts=texts)
    # The calibration images, loaded before any setting starts (a missing --calibrate-split fails here): calibrate
    # uses them for every setting; finetune reads its own sample of the split, so one image checks the split.
    calibrate_on = load_split(
        settings.data,
        settings.calibrate_split,
        image_column=settings.image_column,
        label_column=None,
        limit=settings.calibrate_images if settings.method == "calibrate" else 1,
        sample_seed=settings.seed if settings.method == "calibrate" else None,
        revision=settings.data_revision,
        holdout=settings.holdout,
        holdout_by=settings.label_column,
    )
    label_map = zero_shot_map if zero_shot else None
    if not (backbone or zero_shot):  # string labels mapped by class name, bad ones refused before any setting is built
        check_label_ids(source, config)
        label_map = dataset_label_map(model_labels(config), dataset, settings.data)
    source_model = load_model(source, config=config).eval()
    check_runs_on_its_images(source_model, processor, source)
    pixels = None
    if settings.method == "calibrate":
        channels = image_channels(config)
        batch = make_dataloader(calibrate_on, processor, batch_size=len(calibrate_on), num_channels=channels)
        pixels = next(iter(batch))["pixel_values"]

    with tempfile.TemporaryDirectory(prefix="retrofit-sweep-") as work:
        task = "image-feature-extraction" if config is not saved else None  # as it is scored: its backbone
        merged, trained_on = _merged_models(source, source_model, pixels, settings, Path(work), log, task)
        loader = make_dataloader(
            dataset,
            processor,
            batch_size=min(settings.batch_size, len(dataset)),
            label_map=label_map,
            num_channels=image_channels(config),
        )
        k_top = None if backbone else min(5, len(names) if zero_shot else len(model_labels(config)))
        held = f" (held out of calibration, --holdout {settings.holdout:g})" if held_out else ""
        log(f"evaluating {len(merged) + 1} models on {len(dataset)} images of {settings.data} {split}{held} ...")
        models = [source_model] + [model for _, _, model in merged]
        if zero_shot:
            scores = zero_shot_scores(models, [tokenizer] * len(models), loader, texts, k=k_top)
            for score in scores:
                del score["predictions"]
        elif backbone:
            scores = feature_similarity(models, loader)
        else:
            scores = score_models(models, loader, k=k_top)
        if scores[0]["nonfinite"]:
            raise RetrofitError(
                f"'{source}' gives non-finite outputs (NaN or inf) on {scores[0]['nonfinite']} of "
                f"{scores[0]['num_examples']} images of {settings.data} {split}, so no setting can be "
                "compared with it; check its weights for NaN"
            )
        for score in scores:  # NaN is not a similarity, nor valid JSON
            if "similarity" in score and not math.isfinite(score["similarity"]):
                score["similarity"] = None

        bench = bench_settings(settings)
        source_gflops = model_cost(config, image_size).gflops
        variants = [Variant("source", source_model, config, "eager", source_gflops)]
        for k, m, model in merged:
            gflops = model_cost(model.config, image_size).gflops
            variants.append(
                Variant(f"k{k}-m{m}", model, model.config, "eager", gflops, "source", source_gflops / gflops)
            )
        for v in variants:  # evaluated in float32 above; measured on the device in the dtype asked for
            v.runner = timed_part(place_model(v.model, bench.device, bench.dtype), v.config)
            if image_size is not None:  # on images of the size it was scored on
                v.input_shape = (input_shape(v)[0], *image_size)
        log("measuring speed (all settings alternately) ...")
        run_benchmark(variants, bench, log=log)

    bs = settings.bench_batch_size
    source_result = variants[0].results[bs]
    source_row = {
        **scores[0],
        "gflops": source_gflops,
        "images_per_s": source_result.get("images_per_s"),
        "speed_status": _status(source_result),
        "speed_spread": spread(source_result),
    }
    rows = []
    for (k, m, _), score, v in zip(merged, scores[1:], variants[1:], strict=True):
        result = v.results[bs]
        rows.append(
            {
                "after_layer": k,
                "tokens": m,
                **score,
                "gflops": v.gflops,
                "flops_ratio": v.flops_ratio,
                "images_per_s": result.get("images_per_s"),  # None: not measured (speed_status says why)
                "speedup": result.get("speedup"),
                "speed_status": _status(result),
                "speed_spread": spread(result),  # (max - min) / median of the repeats; None: fewer than two
            }
        )
    front = pareto_front(rows + [{**source_row, "source": True}], y=key)
    for row in rows:
        row["pareto"] = any(p is row for p in front)
    best, verdict = best_for_target(rows, settings.target_speedup, key)
    report = {
        "source": str(source),
        "metric": "zero-shot" if zero_shot else "similarity" if backbone else "accuracy",
        "method": settings.method if settings.method == "calibrate" else f"finetune {settings.finetune_steps} steps",
        # the images each setting started from, which its scores depend on (convert --calibrate-on with these makes
        # a calibrate row's model): the sweep named only the method
        "initialisation": {
            "split": settings.calibrate_split,
            "images": len(calibrate_on) if settings.method == "calibrate" else trained_on,
            "seed": settings.seed,
            **({} if settings.method == "calibrate" else {"calibrate_images": settings.calibrate_images}),
        },
        "data": settings.data,
        **({"data_revision": commit} if commit else {}),
        "split": split,
        "num_examples": source_row["num_examples"],
        **images_chosen(chosen, source_row["num_examples"]),
        "top_k": k_top,
        **({"template": settings.prompt_template, "prompts": texts} if zero_shot else {}),
        "bench_batch_size": bs,
        "bench_repeats": settings.bench_repeats,
        "environment": environment(bench),
        "versions": versions(),
        "target_speedup": settings.target_speedup,
        "source_row": source_row,
        "settings_results": rows,
        "best": best,
        "verdict": verdict,
    }
    report["table"] = markdown_table(report)
    if output is not None:
        write_report(report, output, overwrite, source=source)
    return report


def _status(result: dict) -> str:
    """A benchmark result's status: ``ok``, ``oom`` or ``error: ...`` (`retrofit.benchmark`)."""
    return str(result.get("status") or "failed")


def write_report(report: dict, output: str | Path, overwrite: bool = False, *, source: str | None = None) -> None:
    """sweep.json, sweep.md and sweep.png into the folder `output`, all or nothing; a write error is one line."""
    from .atomic import SWEEP, atomic_dir
    from .errors import describe_os_error

    try:
        with atomic_dir(output, overwrite, kind=SWEEP, inputs=(source, report.get("data"))) as tmp:
            (tmp / "sweep.json").write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
            (tmp / "sweep.md").write_text(_markdown_report(report), encoding="utf-8")
            plot(report, tmp / "sweep.png")
    except OSError as exc:  # a full disk: nothing is left behind
        raise RetrofitError(f"cannot write the sweep into '{output}': {describe_os_error(exc)}") from None


_QUALITY = {  # a sweep's metric in its report's first line
    "similarity": "Feature similarity to the source",
    "zero-shot": "Zero-shot accuracy (one prompt per class)",
}


def _markdown_report(report: dict) -> str:
    from .evaluation import images_text

    env = report["environment"]
    quality = _QUALITY.get(report.get("metric"), "Accuracy")
    if report.get("prompts"):  # which prompts the zero-shot scores are over, as evaluate's card says
        quality = quality.removesuffix(")") + f", like {report['prompts'][0]!r})"
    start = report.get("initialisation")  # None in the report of a retrofit that did not record it
    method = report["method"]
    if start:
        less = f" less the {100 * report['holdout']:g} % held out" if report.get("holdout") else ""  # scored on
        on = f"`{report['data']}` {start['split']}{less} (a shuffled sample, seed {start['seed']})"
        method = (
            f"{method}, k-means of {start['images']} images of {on}"
            if "calibrate_images" not in start
            else f"{method} on {start['images']} images of {on}, the merger calibrated first on up to "
            f"{start['calibrate_images']} images of that split"
        )
    return (
        f"# PatchMerger sweep of `{report['source']}`\n\n"
        f"Initialisation: {method}. "
        f"{quality} on "
        f"`{report['data']}` {report['split']} "
        f"({images_text(report)}); speed on {env['hardware']}, {env['dtype']}, batch "
        f"{report['bench_batch_size']} (median of repeats, settings measured alternately).\n\n"
        f"{report['table']}\n\n{report['verdict']}\n\n![sweep](sweep.png)\n"
    )


def default_grid(
    config, image_size: tuple[int, int] | None, after_layers: tuple[int, ...] | None, tokens: tuple[int, ...] | None
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The K and M values to try: those given, else K at a quarter, half and three quarters of the encoder's depth
    (3,6,9 for 12 layers) and M from `SWEEP_TOKENS` below the number of patches (half of them if none is)."""
    from .cost import num_patches
    from .loading import family_and_head, layer_config

    layer = layer_config(config, family_and_head(config)[1])
    depth, patches = layer.num_hidden_layers, num_patches(layer, image_size)
    if after_layers is None:
        after_layers = tuple(dict.fromkeys(min(max(round(depth * q), 1), depth - 1) for q in (0.25, 0.5, 0.75)))
    if tokens is None:
        tokens = tuple(m for m in SWEEP_TOKENS if m < patches) or (max(patches // 2, 1),)
    return after_layers, tokens


def cost_grid(
    source: str,
    after_layers: tuple[int, ...] | None,
    tokens: tuple[int, ...] | None,
    *,
    target_speedup: float | None = None,
) -> dict:
    """Every setting's theoretical cost from the source's config and image processor alone (`retrofit sweep
    --dry-run`; `source` may also be a `retrofit.benchmark.SHAPES` name such as vit-b16): no weights or images are
    read, so it says in seconds which settings can reach a speed-up at all.
    Returns a JSON-ready report with a Markdown table and, for `target_speedup`, a verdict."""
    from .benchmark import SHAPES, check_shape, ratio_text, shape_config
    from .cost import image_size as config_image_size
    from .cost import model_cost
    from .loading import family_and_head, layer_config, load_config, load_image_processor, processor_image_size
    from .surgery import check_merge

    check_shape(source)
    if source in SHAPES:  # a named shape (vit-b16, ...): its config at its own size, as bench prices and times it
        config = shape_config(source)
        image_size = config_image_size(layer_config(config, family_and_head(config)[1]))
    else:
        config = load_config(source)
        image_size = processor_image_size(load_image_processor(source, config, log=lambda _: None))
    before = model_cost(config, image_size)
    after_layers, tokens = default_grid(config, image_size, after_layers, tokens)
    rows = []
    for k in after_layers:
        for m in tokens:
            check_merge(config, k, m, image_size)
            after = model_cost(config, image_size, merge=(k, m))
            rows.append(
                {"after_layer": k, "tokens": m, "gflops": after.gflops, "flops_ratio": before.gflops / after.gflops}
            )
    lines = [
        f"| after layer | tokens | GFLOPs | FLOPs ratio |{' reaches target |' if target_speedup else ''}",
        "|---|---|---|---|" + ("---|" if target_speedup else ""),
        f"| source | all | {before.gflops:.4g} | 1.00 |{' |' if target_speedup else ''}",
    ]
    for row in rows:
        mark = (" ✓ |" if row["flops_ratio"] >= target_speedup else " |") if target_speedup else ""
        lines.append(
            f"| {row['after_layer']} | {row['tokens']} | {row['gflops']:.4g} | "
            f"{ratio_text(row['flops_ratio'], target_speedup or 1.0)} |{mark}"
        )
    verdict = ""
    if target_speedup:
        reaching = [r for r in rows if r["flops_ratio"] >= target_speedup]
        if reaching:
            names = ", ".join(f"K={r['after_layer']} M={r['tokens']}" for r in reaching)
            verdict = (
                f"{len(reaching)} of {len(rows)} settings have a FLOPs ratio of {target_speedup:g}x or more ({names}). "
                "A measured speed-up is usually somewhat lower than the FLOPs ratio; run the sweep without --dry-run "
                "to measure it and the accuracy of each."
            )
        else:
            best = max(rows, key=lambda r: r["flops_ratio"])
            verdict = (
                f"No setting reaches {target_speedup:g}x fewer FLOPs; the most is "
                f"{ratio_text(best['flops_ratio'], target_speedup)}x "
                f"(K={best['after_layer']} M={best['tokens']}): merge earlier or into fewer tokens."
            )
    return {
        "source": str(source),
        "dry_run": True,
        "image_size": list(image_size) if image_size else None,
        "source_gflops": before.gflops,
        "settings_results": rows,
        "target_speedup": target_speedup,
        "verdict": verdict,
        "table": "\n".join(lines),
    }


def _print_table(report: dict) -> None:
    """The result on stdout: a sweep's (or a dry run's) table, then its verdict where it has one."""
    print(report["table"], flush=True)
    if report["verdict"]:
        print(report["verdict"], flush=True)


def run_sweep(args: SweepArgs, *, log: Callable[[str], None] = log_to_stderr) -> dict:
    """`retrofit sweep`: run, print the table and the verdict on stdout (the rest goes to `log`), write the output
    folder. With --dry-run, print each setting's theoretical cost instead, and write nothing."""
    if args.dry_run:
        report = cost_grid(args.source, args.after_layers, args.tokens, target_speedup=args.target_speedup)
        size = "x".join(map(str, report["image_size"] or [])) or "the config's size"
        # what the table is heads it (a table redirected to a file says so itself)
        print(f"{args.source}: theoretical cost per image at {size} (no weights or data read)\n", flush=True)
        _print_table(report)
        return report
    settings = SweepSettings(**{spec.name: getattr(args, spec.name) for spec in fields(SweepSettings)})
    output = f"sweep-{Path(str(args.source).rstrip('/')).name}" if args.output is None else args.output
    check_output_folder(settings, output, args.overwrite, args.source)
    # the folder is written after the table is printed, so that a full disk does not lose the results
    report = sweep(args.source, settings, log=log)
    _print_table(report)
    write_report(report, output, args.overwrite, source=args.source)
    log(f"wrote {output}/sweep.md, sweep.json, sweep.png")
    return report
