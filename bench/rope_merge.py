"""DINOv3's RoPE after a merge: merged tokens rotated at their mean positions (the default) or not rotated.

A DINOv3 rotates the queries and keys of its patch tokens by the patches' positions in every layer. A merged token
has no single position: retrofit rotates each at the merge-weighted mean of its patches' centre coordinates,
recomputed for every image (`--rope-positions mean`, the default), or rotates none of them (`--rope-positions none`,
as the prefix tokens). This script trains a small DINOv3 (D = 64, 6 layers, 4 registers, patch 4, a linear head on
`pooler_output`) on Fashion-MNIST, merges it after layer K into M tokens with retrofit's calibration, once each way
(the exported model code, `retrofit.insert_patch_merger(..., rope_positions=...)`), and compares the two on the test
set: right after calibration and after one epoch of distillation from the unmerged model (KL of the logits at
T = 2), paired on the same seeds. Prints a Markdown table and writes JSON.

    python bench/rope_merge.py --epochs 3 --seeds 0,1,2 --json bench/results/rope-merge.json
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retrofit.calibrate import calibrate  # noqa: E402
from retrofit.data import load_split, make_dataloader  # noqa: E402
from retrofit.families import ROPE_POSITIONS  # noqa: E402
from retrofit.surgery import insert_patch_merger  # noqa: E402

VARIANTS = {"mean": "at their mean positions (`mean`, default)", "none": "not rotated (`none`)"}


class Probe(nn.Module):
    """A DINOv3 backbone and a linear classifier on its pooled output (CLS after the final LayerNorm)."""

    def __init__(self, backbone: nn.Module, num_labels: int = 10) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.config.hidden_size, num_labels)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(pixel_values=pixel_values).pooler_output)


def dinov3(seed: int) -> nn.Module:
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    torch.manual_seed(seed)
    config = DINOv3ViTConfig(
        hidden_size=64, num_hidden_layers=6, num_attention_heads=4, intermediate_size=256, image_size=28,
        patch_size=4, num_register_tokens=4, layerscale_value=1.0,
    )  # fmt: skip
    return DINOv3ViTModel(config)


def accuracy(model: nn.Module, loader) -> float:
    model.eval()
    correct = total = 0
    with torch.inference_mode():
        for batch in loader:
            correct += (model(batch["pixel_values"]).argmax(-1) == batch["labels"]).sum().item()
            total += len(batch["labels"])
    return correct / total


def train(model: nn.Module, loader, epochs: int, lr: float, teacher: nn.Module | None = None, seed: int = 0) -> None:
    """AdamW with 5 % warm-up and cosine decay: cross-entropy, or KL to `teacher`'s logits at T = 2."""
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    steps = epochs * len(loader)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))
    )
    model.train()
    for _ in range(epochs):
        for batch in loader:
            logits = model(batch["pixel_values"])
            if teacher is None:
                loss = F.cross_entropy(logits, batch["labels"])
            else:
                with torch.no_grad():
                    target = F.log_softmax(teacher(batch["pixel_values"]) / 2, dim=-1)
                loss = F.kl_div(F.log_softmax(logits / 2, dim=-1), target, log_target=True, reduction="batchmean") * 4
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=3, help="pre-training epochs of the small DINOv3")
    parser.add_argument("--after-layer", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=8)
    parser.add_argument("--seeds", default="0", help="distillation seeds, comma-separated (paired across variants)")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N train and test images")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    from transformers import ViTImageProcessor

    torch.set_num_threads(2)
    processor = ViTImageProcessor(size={"height": 28, "width": 28}, image_mean=[0.286] * 3, image_std=[0.353] * 3)
    train_set = load_split("fashion-mnist", "train", limit=args.limit)
    test_set = load_split("fashion-mnist", "test", limit=args.limit)
    train_loader = make_dataloader(train_set, processor, batch_size=128, train=True, num_channels=3)
    test_loader = make_dataloader(test_set, processor, batch_size=min(500, len(test_set)), num_channels=3)

    started = time.time()
    source = Probe(dinov3(0))
    train(source, train_loader, args.epochs, lr=2e-3)
    baseline = accuracy(source, test_loader)
    print(f"source: {100 * baseline:.2f} % after {args.epochs} epochs ({time.time() - started:.0f} s)", flush=True)
    calibration = make_dataloader(train_set, processor, batch_size=min(256, len(train_set)), train=True, num_channels=3)
    calibration = next(iter(calibration))

    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        for positions in ROPE_POSITIONS:
            variant = VARIANTS[positions]
            merged = copy.deepcopy(source)
            merged.backbone = insert_patch_merger(
                merged.backbone, args.after_layer, args.tokens, rope_positions=positions
            )
            torch.manual_seed(seed)
            calibrate(merged.backbone.eval(), calibration["pixel_values"], seed=seed)
            calibrated = accuracy(merged, test_loader)
            train(merged, train_loader, 1, lr=1e-3, teacher=source.eval(), seed=seed)
            distilled = accuracy(merged, test_loader)
            row = {"positions": positions, "variant": variant, "seed": seed, "calibrated": calibrated,
                   "distilled": distilled}  # fmt: skip
            print(row, flush=True)
            rows.append(row)

    lines = [
        f"source DINOv3 (D = 64, 6 layers, 4 registers): {100 * baseline:.2f} %; merged K = {args.after_layer}, "
        f"M = {args.tokens}",
        "",
        "| merged tokens (`--rope-positions`) | seed | calibrated, no training | after 1 epoch of kd |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {r['variant']} | {r['seed']} | {100 * r['calibrated']:.2f} % | {100 * r['distilled']:.2f} % |" for r in rows
    ]
    for positions in ROPE_POSITIONS:  # the mean over the seeds
        mine = [r for r in rows if r["positions"] == positions]
        calibrated, distilled = (sum(r[key] for r in mine) / len(mine) for key in ("calibrated", "distilled"))
        lines.append(f"| {VARIANTS[positions]} | mean | {100 * calibrated:.2f} % | {100 * distilled:.2f} % |")
    print("\n".join(lines))
    if args.json:
        report = {"source_accuracy": baseline, "pretrain_epochs": args.epochs, "after_layer": args.after_layer,
                  "tokens": args.tokens, "rows": rows, "table": "\n".join(lines)}  # fmt: skip
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
