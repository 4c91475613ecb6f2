#!/usr/bin/env python
"""How much the training loop adds to the arithmetic of a `finetune --loss kd` step.

A step of kd is: the teacher's forward (no gradients), the merged student's forward and backward, the KL loss and an
AdamW step. This times that step two ways on the same model, batch size and thread count:

- **raw**: those operations alone, on one batch of images already in memory (a copy of the model);
- **loop**: `retrofit.train.train`, the loop `finetune` runs (its dataloader reading and preparing Fashion-MNIST
  images through the checkpoint's processor, Accelerate's wrappers, clipping, the NaN check, the scheduler, the
  progress bar);
- **loop, data in memory**: the same loop with its dataset's ``__getitems__`` serving the raw step's prepared batch
  (no image read or processed), so that the loop's own machinery is separated from preparing the images.

The two alternate inside one run of the loop, in blocks of ``--block`` steps: every ``--block`` loop steps, where the
loop is about to compute its loss, ``--block`` raw steps run and are timed apart, so a loop block and the raw block
after it see the same machine (a shared machine's speed drifts from one minute to the next). The first pair is
warm-up and dropped; each pair gives loop ÷ raw − 1, and the loop's overhead is the median over the pairs of all
repeats (the issue's target: at most 15 %).

``--model vit-b16`` times a named shape instead (random weights, a 224×224 processor that upscales Fashion-MNIST, as
`retrofit bench` builds it), on a GPU with ``--device cuda --mixed-precision bf16`` (the raw step under the same
autocast; `train` picks the GPU itself). ``--num-workers`` gives the loop's dataloader worker processes. Examples::

    python bench/loop_overhead.py --json bench/results/cpu-loop-overhead.json
    python bench/loop_overhead.py --model vit-b16 --merge 6:8 --device cuda --mixed-precision bf16 --batch-size 128 \
        --steps 60 --block 5 --num-workers 8 --json bench/results/gpu-loop-overhead-vit-b16.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import common  # first: Hub and datasets offline, this repository on the import path
import torch

from retrofit.benchmark import DTYPES, hardware_name
from retrofit.losses import kd_loss


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", default="retrofit:fashion-mnist-vit")
    parser.add_argument("--model", help="a named shape (vit-b16, ...) with random weights instead of --source")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (the raw step's; the loop takes the GPU if any)")
    parser.add_argument("--mixed-precision", default="no", choices=["no", "bf16", "fp16"])
    parser.add_argument("--merge", default="3:8", help="K:M")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=200, help="steps of each loop run")
    parser.add_argument("--block", type=int, default=10, help="loop steps, then as many raw steps, alternately")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each loop (data in memory, then read)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--num-workers", type=int, default=0, help="the loop's dataloader worker processes")
    parser.add_argument("--json", help="write the measurements to FILE")
    args = parser.parse_args(argv)
    if args.block < 1 or args.steps <= 2 * args.block:
        parser.error(f"--steps must be above 2 × --block (the first block pair is warm-up), got {args.steps}")
    return args


def raw_stepper(student, teacher, pixels: torch.Tensor, precision: str = "no") -> Callable[[], None]:
    """One kd step on one in-memory batch per call: teacher forward, student forward/backward, AdamW (under autocast
    to `precision` where it is not "no", as Accelerate runs the loop)."""
    device = pixels.device
    student, teacher = student.to(device).train(), teacher.to(device)
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-4)
    dtype = DTYPES.get(precision)  # "no": None

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            with torch.no_grad():
                expected = teacher(pixel_values=pixels).logits
            loss = kd_loss(student(pixel_values=pixels).logits, expected, 2.0)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    return step


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def shape_folder(name: str, folder: Path) -> Path:
    """A named shape with random weights saved with a processor that resizes any image to its input size (grey
    images become RGB in retrofit's data path), so that `train` reads it like a checkpoint."""
    from transformers import ViTImageProcessor

    from retrofit.benchmark import shape_model

    model = shape_model(name, torch.device("cpu"), torch.float32)
    model.save_pretrained(folder)
    size = model.config.image_size
    ViTImageProcessor(size={"height": size, "width": size}, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(
        folder
    )
    return folder


@contextlib.contextmanager
def data_in_memory(pixels: torch.Tensor) -> Iterator[None]:
    """Inside: every dataset `train` builds serves rows of the already prepared batch `pixels` instead of reading and
    preparing images (a probe of the loop's own cost, not a way to train)."""
    from retrofit.data import TransformedDataset

    real = TransformedDataset.__getitems__
    cpu = pixels.cpu()
    TransformedDataset.__getitems__ = lambda self, indices: [{"pixel_values": cpu[i % len(cpu)]} for i in indices]
    try:
        yield
    finally:
        TransformedDataset.__getitems__ = real


def interleaved_seconds(merged, teacher, processor, pixels: torch.Tensor, *, batch_size: int, steps: int, block: int,
                        num_workers: int = 0, precision: str = "no") -> list[tuple[float, float]]:  # fmt: skip
    """One run of `train` for `steps` steps with raw steps (on a copy of `merged`) run in between: every `block` loop
    steps, where the loop is about to compute its loss, `block` raw steps. Returns (loop, raw) seconds per step of
    each block pair after the first (warm-up)."""
    import retrofit.train as loop_module
    from retrofit.settings import TrainingRun

    device = pixels.device
    raw = raw_stepper(copy.deepcopy(merged), teacher, pixels, precision)
    for _ in range(3):
        raw()
    pairs: list[tuple[float, float]] = []
    count, since = 0, 0.0
    real = loop_module.compute_loss

    def timed(*args, **kwargs):
        nonlocal count, since
        synchronize(device)
        now = time.perf_counter()
        if count and count % block == 0:  # a block of loop steps ended here: time it, then a block of raw steps
            loop = (now - since) / block
            for _ in range(block):
                raw()
            synchronize(device)
            pairs.append((loop, (time.perf_counter() - now) / block))
            now = time.perf_counter()
        if count % block == 0:
            since = now
        count += 1
        return real(*args, **kwargs)

    settings = TrainingRun(data="fashion-mnist", loss="kd", max_steps=steps, batch_size=batch_size, eval_split=None,
                           sample=steps * batch_size, seed=0, num_workers=num_workers,
                           mixed_precision=precision)  # fmt: skip
    loop_module.compute_loss = timed
    try:
        loop_module.train(copy.deepcopy(merged), processor, settings, teacher=teacher, progress_bar=True,
                          log=lambda _: None)  # fmt: skip
    finally:
        loop_module.compute_loss = real
    return pairs[1:]


def main(argv: list[str] | None = None) -> int:
    from retrofit import insert_patch_merger, load_model
    from retrofit.data import load_split, make_dataloader
    from retrofit.loading import load_config, load_image_processor, resolve_source

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="loop-overhead-") as work:
        source = str(shape_folder(args.model, Path(work))) if args.model else args.source
        folder = resolve_source(source)
        processor = load_image_processor(folder, load_config(folder))
        teacher = load_model(source).eval().requires_grad_(False)
        k, m = (int(part) for part in args.merge.split(":"))
        torch.manual_seed(0)
        merged = insert_patch_merger(copy.deepcopy(teacher).requires_grad_(True), k, m, source=source)
        images = load_split("fashion-mnist", "train", limit=args.batch_size)
        pixels = next(iter(make_dataloader(images, processor, batch_size=args.batch_size)))["pixel_values"]
        pixels = pixels.to(args.device)
        runs = {"memory": [], "loop": []}  # each repeat: the (loop, raw) block pairs of one run
        for _ in range(args.repeats):
            for name in runs:
                with data_in_memory(pixels) if name == "memory" else contextlib.nullcontext():
                    runs[name].append(interleaved_seconds(
                        merged, teacher, processor, pixels, batch_size=args.batch_size, steps=args.steps,
                        block=args.block, num_workers=args.num_workers, precision=args.mixed_precision,
                    ))  # fmt: skip
    # per repeat: the median loop and raw step; the overheads: every pair's loop ÷ raw − 1, median over all repeats
    loop = [statistics.median(lp for lp, _ in pairs) for pairs in runs["loop"]]
    memory = [statistics.median(lp for lp, _ in pairs) for pairs in runs["memory"]]
    raw = [statistics.median(r for _, r in pairs) for pairs in runs["loop"]]
    ratios = {name: [lp / r - 1 for pairs in repeats for lp, r in pairs] for name, repeats in runs.items()}
    overhead, machinery = statistics.median(ratios["loop"]), statistics.median(ratios["memory"])

    def spread(values: list[float]) -> str:
        if len(values) < 2:
            return "one pair"
        low, _, high = statistics.quantiles(values, n=4)
        return f"middle half of the pairs {100 * low:+.1f} to {100 * high:+.1f} %"

    lines = [
        f"`{args.model or args.source}` merged {args.merge}, kd, batch {args.batch_size}, "
        f"{hardware_name(args.device)}, mixed precision {args.mixed_precision}, "
        f"{args.num_workers} dataloader workers, torch {torch.__version__}; loop and raw steps alternated in blocks of "
        f"{args.block}, {len(ratios['loop'])} pairs per loop",
        "",
        "| step | ms per step (median) | per repeat |",
        "|---|---|---|",
        f"| raw: teacher fwd + student fwd/bwd + AdamW | {1e3 * statistics.median(raw):.1f} | "
        + " / ".join(f"{1e3 * s:.1f}" for s in raw)
        + " |",
        f"| `train()` loop, data in memory, per step | {1e3 * statistics.median(memory):.1f} | "
        + " / ".join(f"{1e3 * s:.1f}" for s in memory)
        + " |",
        f"| `train()` loop, per step | {1e3 * statistics.median(loop):.1f} | "
        + " / ".join(f"{1e3 * s:.1f}" for s in loop)
        + " |",
        "",
        f"loop overhead: {100 * overhead:+.1f} % ({spread(ratios['loop'])}); with the data in memory: "
        f"{100 * machinery:+.1f} % ({spread(ratios['memory'])})",
    ]
    print("\n".join(lines))
    if args.json:
        report = {"settings": vars(args), "raw_seconds": raw, "loop_seconds": loop, "memory_loop_seconds": memory,
                  "overhead": overhead, "memory_overhead": machinery, "pairs": runs, "torch": torch.__version__,
                  "table": "\n".join(lines)}  # fmt: skip
        common.write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
