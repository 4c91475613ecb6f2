#!/usr/bin/env python
"""What a merge adds to one forward pass besides arithmetic: operator calls and host (Python + dispatch) time.

At batch 1 on a GPU the merged model's extra time is host work, not FLOPs. This measures it where it can be
measured without a GPU: a ViT shape at batch 1 on the CPU, with a hidden size so small (``--tiny``, default) that the
arithmetic is small and the forward time is mostly host work. For the source and its merged twins it reports the
aten operator calls per forward (``torch.profiler``) and the median wall time per forward over alternating blocks.
A twin that keeps almost every token (``6:195`` of a 224×224 patch-16 shape's 196, the most `check_merge` allows)
does the source's arithmetic plus the merger's, so its extra time is the merge's own overhead; a real setting
(``6:8``) shows what the fewer tokens save against it. Example::

    python bench/forward_overhead.py --model vit-b16 --merge 6:8,6:195 --json bench/results/cpu-forward-overhead.json
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retrofit.benchmark import shape_config  # noqa: E402
from retrofit.surgery import insert_patch_merger  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vit-b16", help="a shape name (its layer count and patch grid are kept)")
    parser.add_argument("--merge", default="6:8,6:195", help="comma-separated K:M settings, one twin each")
    parser.add_argument("--tiny", type=int, default=16, help="hidden size to shrink the shape to (0: keep it)")
    parser.add_argument("--blocks", type=int, default=9, help="timed blocks per model, alternating")
    parser.add_argument("--passes", type=int, default=300, help="forwards per block")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="write the measurements to FILE")
    return parser.parse_args(argv)


def build(args: argparse.Namespace) -> dict[str, torch.nn.Module]:
    from transformers import AutoModelForImageClassification

    config = shape_config(args.model)
    if args.tiny:
        config.hidden_size, config.intermediate_size = args.tiny, 4 * args.tiny
        config.num_attention_heads = max(1, args.tiny // 16)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    source = AutoModelForImageClassification.from_config(config).eval()
    models = {"source": source}
    for setting in args.merge.split(","):
        k, m = (int(part) for part in setting.split(":"))
        models[f"merged {k}:{m}"] = insert_patch_merger(copy.deepcopy(source), k, m).eval()
    return models


def operators(model: torch.nn.Module, pixels: torch.Tensor) -> Counter:
    """aten operator calls of one forward (top-level calls only: what the Python code issues)."""
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as recorded:
        model(pixel_values=pixels)
    events = [event for event in recorded.events() if event.name.startswith("aten::")]
    top = [event for event in events if not (event.cpu_parent and event.cpu_parent.name.startswith("aten::"))]
    return Counter(event.name for event in top)


def time_forwards(models: dict[str, torch.nn.Module], pixels: torch.Tensor, blocks: int, passes: int) -> dict:
    per_forward: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for model in models.values():  # warm-up
            for _ in range(20):
                model(pixel_values=pixels)
        for block in range(blocks):
            order = list(models.items())
            order = order[block % len(order) :] + order[: block % len(order)]
            for name, model in order:
                start = time.perf_counter()
                for _ in range(passes):
                    model(pixel_values=pixels)
                per_forward[name].append((time.perf_counter() - start) / passes * 1e6)
    return per_forward


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    models = build(args)
    config = models["source"].config
    pixels = torch.randn(1, config.num_channels, config.image_size, config.image_size)
    from retrofit.benchmark import _c_stderr_silenced  # the profiler's C++ start/stop lines

    with _c_stderr_silenced():
        counts = {name: operators(model, pixels) for name, model in models.items()}
    times = time_forwards(models, pixels, args.blocks, args.passes)
    median = {name: statistics.median(values) for name, values in times.items()}
    spread = {name: (max(v) - min(v)) / median[name] for name, v in times.items()}
    hidden = config.hidden_size
    lines = [
        f"{args.model} shape, {config.num_hidden_layers} layers, hidden size {hidden}, batch 1, CPU "
        f"({args.threads} thread), torch {torch.__version__}",
        "",
        "| model | aten calls per forward | µs per forward (median) | repeats' spread |",
        "|---|---|---|---|",
    ]
    for name in models:
        lines.append(
            f"| {name} | {sum(counts[name].values())} | {median[name]:.0f} | {100 * spread[name]:.0f} %"
            + (" ⚠" if spread[name] > 0.10 else "")
            + " |"
        )
    lines.append("")
    for name in list(models)[1:]:
        extra = counts[name] - counts["source"]
        added = ", ".join(f"{op.removeprefix('aten::')} ×{n}" for op, n in sorted(extra.items()))
        lines.append(
            f"{name} − source: {sum(counts[name].values()) - sum(counts['source'].values()):+d} aten calls "
            f"({added or 'none added'}), {median[name] - median['source']:+.0f} µs per forward "
            f"({100 * (median[name] / median['source'] - 1):+.1f} %)"
        )
    print("\n".join(lines))
    if args.json:
        report = {
            "model": args.model,
            "merge": args.merge,
            "hidden_size": hidden,
            "threads": args.threads,
            "torch": torch.__version__,
            "operators": {name: dict(count) for name, count in counts.items()},
            "microseconds_per_forward": times,
            "table": "\n".join(lines),
        }
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
