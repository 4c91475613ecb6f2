"""Recovery benchmark (not a test): how much accuracy a PatchMerger costs on Fashion-MNIST and how much fine-tuning
wins back.

For each merge setting (default: K = L/2 with M = 8, and the hard K = 1 with M = 4) it measures, on the test split:
the baseline's accuracy; the merged model with no training (random and calibrated merger init); and after
fine-tuning (from the calibrated init) with cross-entropy, distillation and both; plus theoretical GFLOPs and
measured images/s on this machine. Optionally (``--compare-train``) KD with only the merger and later layers trained.
``--feature-weights 0,2`` compares distillation with and without the feature term; ``--seeds 0,1,2`` repeats every
fine-tune per seed and reports the mean (the per-seed numbers are in the JSON).

    .venv/bin/python bench/recovery.py --json bench/results/recovery.json

Prints a Markdown table and writes all numbers as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

from retrofit.benchmark import images_per_second  # noqa: E402
from retrofit.calibrate import calibrate_from_data  # noqa: E402
from retrofit.cost import model_cost  # noqa: E402
from retrofit.data import dataset_label_map, load_split, make_dataloader, model_labels  # noqa: E402
from retrofit.evaluation import accuracy  # noqa: E402
from retrofit.finetune import finetune  # noqa: E402
from retrofit.loading import load_config, load_image_processor, load_model, resolve_source  # noqa: E402
from retrofit.surgery import insert_patch_merger  # noqa: E402
from retrofit.train import LABELS_FIX  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", default="retrofit:fashion-mnist-vit")
    parser.add_argument("--data", default="fashion-mnist")
    parser.add_argument("--settings", default="half:8,1:4", help="K:M pairs; K may be 'half' (= L/2)")
    parser.add_argument("--losses", default="ce,kd,mix")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--limit", type=int, help="training images (default: all 60k)")
    parser.add_argument("--eval-limit", type=int, help="test images (default: all 10k)")
    parser.add_argument("--compare-train", action="store_true", help="also KD with --train merger-and-after")
    parser.add_argument(
        "--feature-weights", help="--feature-weight values for the kd and mix runs (default: finetune's default)"
    )
    parser.add_argument("--seeds", default="0", help="seeds of the fine-tunes (the mean is reported)")
    parser.add_argument("--json", default="bench/results/recovery.json")
    return parser.parse_args(argv)


def finetune_once(args, source, k: int, m: int, loss: str, scope: str, feature_weight: float | None, seed: int) -> dict:
    """One fine-tune from the calibrated init, in a temporary folder; its final test accuracy, steps and time."""
    with tempfile.TemporaryDirectory(prefix="recovery-") as tmp:
        result = finetune(
            source,
            output=Path(tmp) / "out",
            after_layer=k,
            num_tokens=m,
            data=args.data,
            loss=loss,
            feature_weight=feature_weight,
            train=scope,
            epochs=args.epochs,
            min_steps=0,  # --epochs exactly: the protocol of the numbers in docs/recovery.md (60,000 images)
            lr=args.lr,
            batch_size=args.batch_size,
            limit=args.limit,
            eval_limit=args.eval_limit,
            eval_batch_size=500,
            seed=seed,
            progress=False,
            save_every=10**6,
            log=lambda *_: None,
        )
    run = {"seed": seed, "accuracy": result.final_accuracy, "steps": result.steps, "train_seconds": result.seconds}
    weight = "default" if feature_weight is None else f"{feature_weight:g}"
    print(f"  {loss} {scope} feature weight {weight} seed {seed}: {100 * run['accuracy']:.2f} %", flush=True)
    return run


def main(argv=None) -> int:
    args = parse_args(argv)
    seeds = [int(seed) for seed in args.seeds.split(",")]
    feature_weights = [float(w) for w in args.feature_weights.split(",")] if args.feature_weights else [None]
    source = resolve_source(args.source)
    config = load_config(source)
    processor = load_image_processor(source, config)
    layers = config.num_hidden_layers
    eval_set = load_split(args.data, "test", limit=args.eval_limit)
    eval_dl = make_dataloader(
        eval_set,
        processor,
        batch_size=500 if len(eval_set) >= 500 else len(eval_set),
        num_channels=config.num_channels,
        label_map=dataset_label_map(model_labels(config), eval_set, args.data, fix=LABELS_FIX),
    )
    baseline = load_model(source, config=config).eval()
    started = time.perf_counter()
    base_acc = accuracy(baseline, eval_dl)
    base_cost = model_cost(config)
    print(f"baseline accuracy {100 * base_acc:.2f} %", flush=True)
    rows = [{"setting": "baseline", "model": "baseline", "accuracy": base_acc, "gflops": base_cost.gflops}]
    image_size = (config.image_size, config.image_size)
    for pair in args.settings.split(","):
        k_text, m_text = pair.split(":")
        k = layers // 2 if k_text == "half" else int(k_text)
        m = int(m_text)
        setting = f"K={k}, M={m}"
        torch.manual_seed(seeds[0])
        merged = insert_patch_merger(load_model(source, config=config).eval(), k, m, source=str(source))
        cost = model_cost(merged.config)
        speed = images_per_second({"baseline": baseline, "merged": merged}, batch_size=256, image_size=image_size)
        common = {
            "setting": setting,
            "gflops": cost.gflops,
            "images_per_s": speed["merged"],
            "speedup": speed["merged"] / speed["baseline"],
        }
        rows[0].setdefault("images_per_s", speed["baseline"])
        rows.append({**common, "model": "random init, no training", "accuracy": accuracy(merged, eval_dl)})
        calibration = calibrate_from_data(merged, args.data, source=str(source), seed=seeds[0])
        rows.append(
            {
                **common,
                "model": "calibrated init, no training",
                "accuracy": accuracy(merged, eval_dl),
                "calibration_scale": calibration.scale,
            }
        )
        print(rows[-2], rows[-1], sep="\n", flush=True)
        runs = [
            (loss, "all", weight)
            for loss in args.losses.split(",")
            for weight in (feature_weights if loss != "ce" else [0])
        ]
        if args.compare_train:
            runs.append(("kd", "merger-and-after", feature_weights[-1]))
        for loss, scope, weight in runs:
            per_seed = [finetune_once(args, source, k, m, loss, scope, weight, seed) for seed in seeds]
            label = f"fine-tuned, {loss}"
            if loss != "ce" and len(feature_weights) > 1:
                label += f", feature weight {weight:g}"
            if scope != "all":
                label += f", train {scope}"
            accuracies = [run["accuracy"] for run in per_seed]
            rows.append(
                {
                    **common,
                    "model": label,
                    "accuracy": sum(accuracies) / len(accuracies),
                    "seeds": dict(zip(seeds, accuracies, strict=True)),
                    "runs": per_seed,
                }
            )
            print(rows[-1], flush=True)
    several = len(seeds) > 1
    header = "| setting | model | accuracy" + (f" (mean of {len(seeds)} seeds) | per seed" if several else "")
    table = [header + " | Δ vs baseline | GFLOPs | images/s | speed-up |", "|---" * (8 if several else 7) + "|"]
    for row in rows:
        delta = 100 * (row["accuracy"] - base_acc)
        speedup = f"{row['speedup']:.2f}x" if "speedup" in row else "1.00x"
        per_seed = ", ".join(f"{100 * a:.2f}" for a in row.get("seeds", {}).values())
        table.append(
            f"| {row['setting']} | {row['model']} | {100 * row['accuracy']:.2f} % |"
            + (f" {per_seed} |" if several else "")
            + f" {delta:+.2f} pt | {row['gflops']:.4f} | {row.get('images_per_s', 0):.0f} | {speedup} |"
        )
    text = "\n".join(table)
    print("\n" + text)
    report = {
        "command": " ".join([sys.executable.split("/")[-1], *sys.argv]),
        "args": vars(args),
        "rows": rows,
        "table": text,
        "machine": platform.platform(),
        "torch_threads": torch.get_num_threads(),
        "seconds": time.perf_counter() - started,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
