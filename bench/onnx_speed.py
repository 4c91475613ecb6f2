#!/usr/bin/env python
"""Does the speed-up survive deployment? A source ViT and its merged twin exported to ONNX and timed in ONNX Runtime,
side by side. Prints a Markdown table, optionally writes JSON.

Both models (a named shape with random weights, 224x224, 1000 classes) are exported with `torch.onnx.export`
(dynamo, dynamic batch size), as the README shows for an export, then run in ONNX Runtime sessions on the CPU: one
warm-up run each, then `--repeats` timed runs per model, the models alternating; images/s is the median. Needs
`pip install -e ".[onnx]"`. Example::

    python bench/onnx_speed.py --model vit-b16 --merge 6:8 --batch-size 8 --threads 1 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retrofit.benchmark import VIT_SHAPES, hardware_name, merge_option, resolve_after_layer, shape_model  # noqa: E402
from retrofit.cost import model_cost  # noqa: E402
from retrofit.errors import RetrofitError  # noqa: E402
from retrofit.surgery import insert_patch_merger  # noqa: E402


def export_onnx(model: torch.nn.Module, path: Path) -> Path:
    """`model` as an ONNX graph taking `pixel_values` of any batch size (the README's recipe)."""
    size = model.config.image_size
    torch.onnx.export(
        model,
        kwargs={"pixel_values": torch.randn(2, 3, size, size)},
        f=path,
        dynamo=True,
        input_names=["pixel_values"],
        output_names=["logits"],
        dynamic_shapes={"pixel_values": {0: torch.export.Dim("batch")}},
    )
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit-b16", choices=VIT_SHAPES, help="ViT shape (random weights)")
    parser.add_argument("--merge", default="half:8", help="K:M, where to merge and into how many tokens")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: its default)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per model")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    try:
        import onnxruntime
    except ImportError:
        print("onnx_speed.py: error: ONNX Runtime is not installed; pip install -e '.[onnx]'", file=sys.stderr)
        return 2
    try:
        (after, tokens), *_ = merge_option(args.merge)
        source = shape_model(args.model, torch.device("cpu"), torch.float32)
        after_layer = resolve_after_layer(source.config, after)
        merged = insert_patch_merger(source, after_layer, tokens).eval()
    except RetrofitError as exc:
        print(f"onnx_speed.py: error: {exc}", file=sys.stderr)
        return 2
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = args.threads
    size = source.config.image_size
    pixels = {"pixel_values": torch.randn(args.batch_size, 3, size, size).numpy()}
    with tempfile.TemporaryDirectory() as folder:
        sessions = {
            name: onnxruntime.InferenceSession(export_onnx(model, Path(folder) / f"{name}.onnx"), options)
            for name, model in (("source", source), ("merged", merged))
        }
        times: dict[str, list[float]] = {name: [] for name in sessions}
        for session in sessions.values():
            session.run(None, pixels)
        for _ in range(args.repeats):
            for name, session in sessions.items():
                started = time.perf_counter()
                session.run(None, pixels)
                times[name].append(time.perf_counter() - started)
    speed = {name: args.batch_size / statistics.median(values) for name, values in times.items()}
    flops_ratio = model_cost(source.config).gflops / model_cost(merged.config).gflops
    threads = args.threads or "its default"
    report = {
        "hardware": f"{hardware_name('cpu')}, ONNX Runtime {onnxruntime.__version__} (intra-op threads: {threads})",
        "model": args.model,
        "merge": f"{after_layer}:{tokens}",
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "images_per_s": speed,
        "seconds": times,
        "flops_ratio": flops_ratio,
        "speedup": speed["merged"] / speed["source"],
    }
    print(f"Hardware: {report['hardware']}, fp32, batch {args.batch_size}, median of {args.repeats} runs\n")
    print("| model | images/s | speed-up | FLOPs ratio | speed-up ÷ FLOPs ratio |\n|---|---|---|---|---|")
    print(f"| `{args.model}` | {speed['source']:.1f} | 1.00× | – | – |")
    print(
        f"| `{args.model}+pm{report['merge']}` | {speed['merged']:.1f} | {report['speedup']:.2f}× | "
        f"{flops_ratio:.3f}× | {report['speedup'] / flops_ratio:.2f} |"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
