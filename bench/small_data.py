"""Small-data recovery benchmark (not a test): a merged model distilled on a few thousand images, as a user with
their own small data set runs it (issue 23).

The shipped ``retrofit:fashion-mnist-vit`` (87.12 % on the test split) is merged at each setting, calibrated, and
distilled (``--loss kd``, no labels) on a shuffled sample of ``--images`` Fashion-MNIST training images (the seed
draws the sample and the training order: runs are paired by seed), then scored on all 10,000 test images. Runs:

- ``plain``: a short run as it was before the step floor (``--epochs 3 --min-steps 0``: 96 steps; lr 2e-4, batch 64);
- ``default``: what a user gets without budget options (``--epochs 1`` raised to ``--min-steps``, 1,000 steps;
  ``--epochs 3`` gives the same run): the step floor of issue 23;
- ``long``: a step budget (``--max-steps``, default 600);
- ``fm``: the step budget with function matching (``--function-matching``: teacher and student see the same
  cropped, flipped and mixed-up images);
- ``ema``: the ``default`` run exporting a moving average of its weights (``--ema-decay``, default 0.998: a time
  constant of 500 steps, about the second half of the 1,000-step run, where the cosine's learning rate is below half
  its peak);
- ``merger-lr``: the ``default`` run with the merger at a higher learning rate (``--merger-lr-scale``, default 10);
- ``features``: the ``default`` run also distilling the features the head reads (``--feature-weight``, default 1:
  the last layer's class token and mean token against the unmerged model's, a target on the tokens the merged layers
  produce);
- ``augment``: the ``default`` run on random resized crops and flips (``--augment``; teacher and student see the same
  view, as in function matching but without mixup).

    .venv/bin/python bench/small_data.py --images 2000 --runs plain,long,fm --json bench/results/small-data-2000.json
    .venv/bin/python bench/small_data.py --images 2000 --runs default --json bench/results/small-data-2000-default.json
    .venv/bin/python bench/small_data.py --images 2000 --runs ema --json bench/results/small-data-2000-ema.json

On a GPU, for any source (bench/gpu_session.sh: the ViT-S/16 of recipes/fashion-mnist-vit-s16.yaml)::

    python bench/small_data.py --source out/fashion-mnist-vit-s16 --settings 6:8,3:8 --runs default \
        --mixed-precision bf16 --num-workers 8 --eval-batch-size 500 --json small-data-vit-s16.json

Prints the budget each run chose (finetune's line), a Markdown table (steps, mean and per-seed accuracy, Δ against the
source, wall time) and writes all numbers as JSON.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import common  # first: Hub and datasets offline, this repository on the import path
import torch

from retrofit import evaluate_models, finetune
from retrofit.benchmark import hardware_name


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", default="retrofit:fashion-mnist-vit")
    parser.add_argument("--images", type=int, default=2000, help="training images (a shuffled sample per seed)")
    parser.add_argument("--settings", default="3:8,1:4", help="K:M pairs")
    parser.add_argument("--runs", default="plain,default,long,fm")
    parser.add_argument("--max-steps", type=int, default=600, help="the step budget of the long and fm runs")
    parser.add_argument("--min-steps", type=int, help="the default run's --min-steps (default: finetune's)")
    parser.add_argument("--ema-decay", type=float, default=0.998, help="the ema run's --ema-decay")
    parser.add_argument("--merger-lr-scale", type=float, default=10.0, help="the merger-lr run's --merger-lr-scale")
    parser.add_argument("--feature-weight", type=float, default=1.0, help="the features run's --feature-weight")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--eval-limit", type=int, help="test images (default: all 10,000)")
    parser.add_argument("--eval-batch-size", type=int, default=64, help="batch size of the scoring on the test set")
    parser.add_argument("--mixed-precision", default="no", help="finetune's --mixed-precision (bf16 on a GPU)")
    parser.add_argument("--num-workers", type=int, default=0, help="finetune's --num-workers (dataloader processes)")
    parser.add_argument("--json", default="bench/results/small-data.json")
    return parser.parse_args(argv)


RUNS = {
    "plain": lambda args: {"epochs": 3, "min_steps": 0},
    "default": lambda args: {} if args.min_steps is None else {"min_steps": args.min_steps},
    "ema": lambda args: {**RUNS["default"](args), "ema_decay": args.ema_decay},
    "merger-lr": lambda args: {**RUNS["default"](args), "merger_lr_scale": args.merger_lr_scale},
    "features": lambda args: {**RUNS["default"](args), "feature_weight": args.feature_weight},
    "augment": lambda args: {**RUNS["default"](args), "augment": True},
    "long": lambda args: {"max_steps": args.max_steps},
    "fm": lambda args: {"max_steps": args.max_steps, "function_matching": True},
}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet = lambda _: None  # noqa: E731
    seeds = [int(seed) for seed in args.seeds.split(",")]
    score = lambda model: evaluate_models(  # noqa: E731
        [model], data="fashion-mnist", split="test", limit=args.eval_limit, batch_size=args.eval_batch_size, log=quiet
    )["models"][0]["top1"]
    source = score(args.source)
    rows = []
    with tempfile.TemporaryDirectory(prefix="small-data-") as work:
        for setting in args.settings.split(","):
            k, m = (int(part) for part in setting.split(":"))
            for run in args.runs.split(","):
                accuracies, seconds, steps, budgets = [], [], [], []
                for seed in seeds:
                    out = Path(work) / f"{setting}-{run}-{seed}".replace(":", "_")
                    started = time.perf_counter()
                    said: list[str] = []
                    result = finetune(args.source, output=out, after_layer=k, num_tokens=m, data="fashion-mnist",
                                      loss="kd", sample=args.images, seed=seed, eval_split=None, progress=False,
                                      mixed_precision=args.mixed_precision, num_workers=args.num_workers,
                                      log=said.append, **RUNS[run](args))  # fmt: skip
                    budgets.append(next(line for line in said if line.startswith("training ")))  # the budget line
                    seconds.append(time.perf_counter() - started)
                    steps.append(result.steps)
                    accuracies.append(score(str(out)))
                    if seed == seeds[0]:
                        print(f"K={k} M={m} {run}: {budgets[0]}", flush=True)
                    print(f"K={k} M={m} {run} seed {seed}: {100 * accuracies[-1]:.2f} % ({seconds[-1]:.0f} s)",
                          flush=True)  # fmt: skip
                rows.append({"setting": setting, "run": run, "steps": steps, "budget": budgets[0],
                             "accuracies": accuracies, "seconds": seconds,
                             "mean": statistics.mean(accuracies)})  # fmt: skip
    lines = [
        f"| setting | run | steps | accuracy (mean) | seeds {args.seeds} | Δ vs source | seconds per run |",
        "|---|---|---|---|---|---|---|",
        f"| source | – | | {100 * source:.2f} % | | | |",
    ]
    for row in rows:
        per = " / ".join(f"{100 * a:.2f}" for a in row["accuracies"])
        steps = "/".join(str(n) for n in sorted(set(row["steps"])))
        lines.append(
            f"| K={row['setting'].replace(':', ' M=')} | {row['run']} | {steps} | {100 * row['mean']:.2f} % | {per} | "
            f"{100 * (row['mean'] - source):+.2f} pt | {statistics.mean(row['seconds']):.0f} |"
        )
    hardware = hardware_name("cuda" if torch.cuda.is_available() else "cpu")  # where Accelerate trained
    table = f"`{args.source}`, {args.images} training images, {hardware}, precision {args.mixed_precision}\n\n"
    table += "\n".join(lines)
    print(table)
    report = {"settings": vars(args), "hardware": hardware, "source_accuracy": source, "rows": rows, "table": table}
    common.write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
