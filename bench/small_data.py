"""Small-data recovery benchmark (not a test): a merged model distilled on a few thousand images, as a user with
their own small data set runs it (issue 23).

The shipped ``retrofit:fashion-mnist-vit`` (87.12 % on the test split) is merged at each setting, calibrated, and
distilled (``--loss kd``, no labels) on a shuffled sample of ``--images`` Fashion-MNIST training images (the seed
draws the sample and the training order: runs are paired by seed), then scored on all 10,000 test images. Runs:

- ``plain``: today's defaults for a short run (``--epochs 3``, lr 2e-4, batch 64);
- ``long``: the same with a step budget (``--max-steps``, default 600);
- ``fm``: the step budget with function matching (``--function-matching``: teacher and student see the same
  cropped, flipped and mixed-up images).

    .venv/bin/python bench/small_data.py --images 2000 --json bench/results/small-data-2000.json

Prints a Markdown table (mean, per-seed accuracy, Δ against the source, wall time) and writes all numbers as JSON.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import common  # first: Hub and datasets offline, this repository on the import path

from retrofit import evaluate_models, finetune


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", default="retrofit:fashion-mnist-vit")
    parser.add_argument("--images", type=int, default=2000, help="training images (a shuffled sample per seed)")
    parser.add_argument("--settings", default="3:8,1:4", help="K:M pairs")
    parser.add_argument("--runs", default="plain,long,fm")
    parser.add_argument("--max-steps", type=int, default=600, help="the step budget of the long and fm runs")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--eval-limit", type=int, help="test images (default: all 10,000)")
    parser.add_argument("--json", default="bench/results/small-data.json")
    return parser.parse_args(argv)


RUNS = {
    "plain": lambda args: {"epochs": 3},
    "long": lambda args: {"max_steps": args.max_steps},
    "fm": lambda args: {"max_steps": args.max_steps, "function_matching": True},
}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet = lambda _: None  # noqa: E731
    seeds = [int(seed) for seed in args.seeds.split(",")]
    score = lambda model: evaluate_models(  # noqa: E731
        [model], data="fashion-mnist", split="test", limit=args.eval_limit, log=quiet
    )["models"][0]["top1"]
    source = score(args.source)
    rows = []
    with tempfile.TemporaryDirectory(prefix="small-data-") as work:
        for setting in args.settings.split(","):
            k, m = (int(part) for part in setting.split(":"))
            for run in args.runs.split(","):
                accuracies, seconds = [], []
                for seed in seeds:
                    out = Path(work) / f"{setting}-{run}-{seed}".replace(":", "_")
                    started = time.perf_counter()
                    finetune(args.source, output=out, after_layer=k, num_tokens=m, data="fashion-mnist", loss="kd",
                             sample=args.images, seed=seed, eval_split=None, progress=False, log=quiet,
                             **RUNS[run](args))  # fmt: skip
                    seconds.append(time.perf_counter() - started)
                    accuracies.append(score(str(out)))
                    print(f"K={k} M={m} {run} seed {seed}: {100 * accuracies[-1]:.2f} % ({seconds[-1]:.0f} s)",
                          flush=True)  # fmt: skip
                rows.append({"setting": setting, "run": run, "accuracies": accuracies, "seconds": seconds,
                             "mean": statistics.mean(accuracies)})  # fmt: skip
    lines = [
        f"| setting | run | accuracy (mean) | seeds {args.seeds} | Δ vs source | seconds per run |",
        "|---|---|---|---|---|---|",
        f"| source | – | {100 * source:.2f} % | | | |",
    ]
    for row in rows:
        per = " / ".join(f"{100 * a:.2f}" for a in row["accuracies"])
        lines.append(
            f"| K={row['setting'].replace(':', ' M=')} | {row['run']} | {100 * row['mean']:.2f} % | {per} | "
            f"{100 * (row['mean'] - source):+.2f} pt | {statistics.mean(row['seconds']):.0f} |"
        )
    table = "\n".join(lines)
    print(table)
    report = {"settings": vars(args), "source_accuracy": source, "rows": rows, "table": table}
    common.write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
