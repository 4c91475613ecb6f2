"""Zero-shot recovery benchmark (not a test): what a PatchMerger costs a CLIP's zero-shot accuracy and what
label-free distillation wins back, on Fashion-MNIST.

The source is the small CLIP shipped as ``retrofit:fashion-mnist-clip`` (pretrained here on captions written from the
class names: recipes/fashion-mnist-clip.yaml). For each seed, on the 10,000 test images with one prompt per class
(``"a photo of a {}."``), it scores: the source; the merged model with its calibrated merger and no training; after
one epoch of `finetune` with the dual-encoder kd (cosine distance of the image embeddings, no labels read); and the
same plus the prompt term (``--prompt-weight 1``: KL of the image-text similarities over the class-name prompts).
The calibrated start is made once (`convert --calibrate-on`, its fixed sample of 256 training images); the seed sets
the fine-tunes' training order, so the rows are paired by seed.

    .venv/bin/python bench/zero_shot_recovery.py --json bench/results/fashion-mnist-clip-zero-shot.json

Prints a Markdown table (mean and per-seed top-1, agreement with the source) and writes all numbers as JSON.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import common  # first: Hub and datasets offline, this repository on the import path

from retrofit import convert, evaluate_models, finetune

ROWS = ("source", "merged, calibrated, no training", "kd: cosine (1 epoch)", "kd: cosine + prompt KL (1 epoch)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", default="retrofit:fashion-mnist-clip")
    parser.add_argument("--data", default="fashion-mnist")
    parser.add_argument("--after-layer", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=8)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--eval-limit", type=int, help="test images (default: all 10k)")
    parser.add_argument("--json", default="bench/results/fashion-mnist-clip-zero-shot.json")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    seeds = [int(seed) for seed in args.seeds.split(",")]
    per_seed: list[dict] = []
    quiet = lambda _: None  # noqa: E731
    with tempfile.TemporaryDirectory(prefix="zero-shot-recovery-") as work:
        merged = Path(work) / "calibrated"
        convert(args.source, after_layer=args.after_layer, num_tokens=args.tokens, output=merged,
                calibrate_on=args.data, log=quiet)  # fmt: skip
        for seed in seeds:
            started = time.perf_counter()
            models = [args.source, str(merged)]
            for name, extra in (("cosine", {}), ("prompt", {"prompt_weight": 1.0})):
                out = Path(work) / f"{name}-{seed}"
                finetune(merged, output=out, data=args.data, epochs=args.epochs, lr=args.lr, seed=seed,
                         min_steps=0, eval_split=None, progress=False, log=quiet, **extra)  # fmt: skip
                models.append(str(out))
            report = evaluate_models(models, data=args.data, split="test", limit=args.eval_limit, zero_shot=True,
                                     log=quiet)  # fmt: skip
            rows = [{"row": row, "top1": m["top1"], "agreement": m["agreement"]} for row, m in
                    zip(ROWS, report["models"], strict=True)]  # fmt: skip
            per_seed.append({"seed": seed, "rows": rows, "seconds": time.perf_counter() - started})
            print(f"seed {seed}: " + ", ".join(f"{r['row']} {100 * r['top1']:.2f} %" for r in rows), flush=True)
    summary = []
    for index, row in enumerate(ROWS):
        top1 = [run["rows"][index]["top1"] for run in per_seed]
        agreement = [run["rows"][index]["agreement"] for run in per_seed]
        summary.append({"row": row, "top1_mean": statistics.mean(top1), "top1": top1,
                        "agreement_mean": statistics.mean(agreement)})  # fmt: skip
    return {
        "source": args.source,
        "data": args.data,
        "merge": f"{args.after_layer}:{args.tokens}",
        "epochs": args.epochs,
        "lr": args.lr,
        "seeds": seeds,
        "template": report["template"],
        "num_examples": report["num_examples"],
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "summary": summary,
        "per_seed": per_seed,
    }


def table(result: dict) -> str:
    seeds = ", ".join(str(seed) for seed in result["seeds"])
    lines = [
        f"| model | zero-shot top-1, mean | per seed ({seeds}) | agreement with the source, mean |",
        "|---|---|---|---|",
    ]
    for row in result["summary"]:
        per = " / ".join(f"{100 * value:.2f}" for value in row["top1"])
        lines.append(f"| {row['row']} | {100 * row['top1_mean']:.2f} % | {per} | {100 * row['agreement_mean']:.2f} % |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    result["table"] = table(result)
    print(result["table"])
    common.write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
