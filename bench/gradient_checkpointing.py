#!/usr/bin/env python
"""What `finetune --gradient-checkpointing` costs and saves: training-step memory and time of a merged ViT, without
and with activation checkpointing, side by side. Prints a Markdown table, optionally writes JSON.

Each setting runs in its own process (so the CPU peak RSS of one does not hide the other's): a merged model of a
named shape (random weights, 224x224, 1000 classes), AdamW, one warm-up step, then `--steps` timed steps of
forward + cross-entropy + backward + optimizer step on random images. Memory is the peak above what weights and
optimizer state hold after the warm-up (CUDA: `max_memory_allocated`; CPU: peak RSS): the gradients (the same in both
settings, shown apart) plus the activations that checkpointing trades for a second forward pass. Example::

    python bench/gradient_checkpointing.py --model vit-b16 --merge 6:8 --device cpu --batch-size 16 --steps 3
    python bench/gradient_checkpointing.py --model vit-h14 --merge half:8 --device cuda --dtype bf16 --batch-size 128
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retrofit.benchmark import (  # noqa: E402
    DTYPES,
    VIT_SHAPES,
    checked_merge,
    hardware_name,
    merge_option,
    parse_device,
    resolve_after_layer,
    rss_mib,
    shape_config,
    shape_model,
)
from retrofit.errors import RetrofitError  # noqa: E402
from retrofit.surgery import insert_patch_merger  # noqa: E402
from retrofit.train import enable_gradient_checkpointing  # noqa: E402


def _rss(key: str) -> float:
    """Resident memory from /proc (`rss_mib`), in bytes; the CPU measurement needs Linux."""
    value = rss_mib(key)
    if value is None:
        raise RetrofitError(f"/proc/self/status has no {key}; CPU memory needs Linux")
    return value * 2**20


def measure(args: argparse.Namespace, checkpointing: bool) -> dict:
    """One setting, in this process: peak extra memory (MiB) and median step time (s) of a training step."""
    device, dtype = parse_device(args.device), DTYPES[args.dtype]
    torch.manual_seed(0)
    source = shape_model(args.model, device, torch.float32)
    (after, tokens), *_ = merge_option(args.merge)
    model = insert_patch_merger(source, resolve_after_layer(source.config, after), tokens).train()
    if checkpointing:
        enable_gradient_checkpointing(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    size = model.config.image_size
    pixels = torch.randn(args.batch_size, 3, size, size, device=device)
    labels = torch.randint(0, model.config.num_labels, (args.batch_size,), device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = torch.nn.functional.cross_entropy(model(pixel_values=pixels).logits.float(), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    step()  # warm-up: allocates the optimizer state
    if device.type == "cuda":
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        Path("/proc/self/clear_refs").write_text("5")  # resets the peak RSS to the current RSS
        before = _rss("VmRSS")
    times = []
    for _ in range(args.steps):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else _rss("VmHWM")
    gradients = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad) / 2**20
    return {
        "checkpointing": checkpointing,
        "peak_extra_mib": (peak - before) / 2**20,
        "gradients_mib": gradients,
        "step_s": statistics.median(times),
    }


def markdown_table(report: dict) -> str:
    off, on = report["results"]
    lines = [
        f"Hardware: {report['hardware']}, {report['dtype']}, {report['model']} merged at {report['merge']}, "
        f"batch {report['batch_size']}, median of {report['steps']} training steps",
        "",
        "| gradient checkpointing | peak memory above weights + optimizer (MiB) | of which gradients (MiB) | "
        "step time (s) | memory | time |",
        "|---|---|---|---|---|---|",
    ]
    for row in (off, on):
        lines.append(
            f"| {'on' if row['checkpointing'] else 'off'} | {row['peak_extra_mib']:.0f} | {row['gradients_mib']:.0f} | "
            f"{row['step_s']:.3f} | {row['peak_extra_mib'] / off['peak_extra_mib']:.2f}× | "
            f"{row['step_s'] / off['step_s']:.2f}× |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit-b16", choices=VIT_SHAPES, help="ViT shape (random weights)")
    parser.add_argument("--merge", default="half:8", help="K:M, where to merge and into how many tokens")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="fp32", choices=DTYPES, help="autocast dtype of the forward pass")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per setting (after one warm-up)")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--child", choices=("on", "off"), help=argparse.SUPPRESS)  # one setting, as JSON on stdout
    args = parser.parse_args(argv)
    try:
        parse_device(args.device)
        (after, tokens), *_ = merge_option(args.merge)
        config = shape_config(args.model)
        checked_merge(config, after, tokens)  # before any process is started
        if args.child:
            print(json.dumps(measure(args, args.child == "on")))
            return 0
        results = []
        for setting in ("off", "on"):
            command = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--child", setting]
            run = subprocess.run(command, capture_output=True, text=True)
            if run.returncode:
                raise RetrofitError(f"the run with checkpointing {setting} failed: {run.stderr.strip()[-300:]}")
            results.append(json.loads(run.stdout.strip().splitlines()[-1]))
    except RetrofitError as exc:
        print(f"gradient_checkpointing.py: error: {exc}", file=sys.stderr)
        return 2
    report = {
        "hardware": hardware_name(args.device),
        "torch": torch.__version__,
        "model": args.model,
        "merge": args.merge,
        "dtype": args.dtype,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "results": results,
    }
    print(markdown_table(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
