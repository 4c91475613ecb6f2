"""Where merged tokens are for the layers that use the patches' positions: at their mean position, or nowhere.

A merged token is a weighted average of patches, so it has no single position. Two families use positions in every
layer after the merge:

- DINOv3 rotates the queries and keys of its patch tokens by the patches' positions (RoPE). retrofit rotates each
  merged token at the merge-weighted mean of its patches' centres, recomputed for every image (`--rope-positions
  mean`, the default), or rotates none of them (`--rope-positions none`, as the prefix tokens).
- BEiT adds a learned relative position bias to the attention scores. retrofit gives two merged tokens the
  merge-weighted mean of the bias between the patches they average (T^T · bias · T, every image; `mean`); the
  alternative measured here (`none`) gives merged tokens no bias between them (CLS keeps its own entries).

This script trains a small model of the family (D = 64, 6 layers, patch 4; DINOv3 with 4 registers and a linear head
on `pooler_output`, BEiT as BeitForImageClassification with a bias per layer and mean pooling) on Fashion-MNIST,
merges it after layer K into M tokens with retrofit's calibration, once each way (the exported model code,
`retrofit.insert_patch_merger`), and compares the two on the test set: right after calibration and after one epoch
of distillation from the unmerged model (KL of the logits at T = 2), paired on the same seeds. Prints a Markdown
table and writes JSON.

    python bench/position_merge.py --family dinov3 --epochs 3 --seeds 0,1,2 --json bench/results/rope-merge.json
    python bench/position_merge.py --family beit --epochs 3 --seeds 0,1,2 --json bench/results/beit-bias-merge.json
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retrofit.calibrate import calibrate  # noqa: E402
from retrofit.data import load_split, make_dataloader  # noqa: E402
from retrofit.surgery import insert_patch_merger  # noqa: E402

VARIANTS = {
    "dinov3": {"mean": "at their mean positions (`mean`, default)", "none": "not rotated (`none`)"},
    "beit": {"mean": "merge-weighted bias (default)", "none": "no bias between merged tokens"},
}
COLUMN = {"dinov3": "merged tokens (`--rope-positions`)", "beit": "bias after the merge"}


class Probe(nn.Module):
    """A DINOv3 backbone and a linear classifier on its pooled output (CLS after the final LayerNorm), or a BEiT
    classifier; either way `forward` returns logits, and `backbone` is what gets merged."""

    def __init__(self, backbone: nn.Module, num_labels: int = 10) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.config.hidden_size, num_labels) if not hasattr(backbone, "classifier") else None

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.head is None:
            return self.backbone(pixel_values=pixel_values).logits
        return self.head(self.backbone(pixel_values=pixel_values).pooler_output)


def dinov3(seed: int) -> nn.Module:
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    torch.manual_seed(seed)
    config = DINOv3ViTConfig(
        hidden_size=64, num_hidden_layers=6, num_attention_heads=4, intermediate_size=256, image_size=28,
        patch_size=4, num_register_tokens=4, layerscale_value=1.0,
    )  # fmt: skip
    return DINOv3ViTModel(config)


def beit(seed: int) -> nn.Module:
    from transformers import BeitConfig, BeitForImageClassification

    torch.manual_seed(seed)
    config = BeitConfig(
        hidden_size=64, num_hidden_layers=6, num_attention_heads=4, intermediate_size=256, image_size=28,
        patch_size=4, use_relative_position_bias=True, use_mean_pooling=True, drop_path_rate=0.0, num_labels=10,
        architectures=["BeitForImageClassification"],
    )  # fmt: skip
    return BeitForImageClassification(config)


def merge(model: nn.Module, family: str, after_layer: int, tokens: int, positions: str) -> nn.Module:
    """`model` merged with the exported code: for DINOv3 with `--rope-positions`; BEiT has no such option."""
    if family == "dinov3":
        return insert_patch_merger(model, after_layer, tokens, rope_positions=positions)
    return insert_patch_merger(model, after_layer, tokens)


@contextmanager
def variant(model: nn.Module, family: str, positions: str):
    """For BEiT's `none`: the generated code's merged bias with the entries between merged tokens set to zero."""
    if family != "beit" or positions == "mean":
        yield
        return
    code = sys.modules[type(model.backbone).__module__]
    merge_bias = code.merge_bias

    def without_bias_between_merged_tokens(bias, transform):
        merged = merge_bias(bias, transform).clone()
        merged[..., 1:, 1:] = 0
        return merged

    code.merge_bias = without_bias_between_merged_tokens
    try:
        yield
    finally:
        code.merge_bias = merge_bias


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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=sorted(VARIANTS), default="dinov3")
    parser.add_argument("--epochs", type=int, default=3, help="pre-training epochs of the small model")
    parser.add_argument("--after-layer", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=8)
    parser.add_argument("--seeds", default="0", help="distillation seeds, comma-separated (paired across variants)")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N train and test images")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    from transformers import ViTImageProcessor

    torch.set_num_threads(2)
    processor = ViTImageProcessor(size={"height": 28, "width": 28}, image_mean=[0.286] * 3, image_std=[0.353] * 3)
    train_set = load_split("fashion-mnist", "train", limit=args.limit)
    test_set = load_split("fashion-mnist", "test", limit=args.limit)
    train_loader = make_dataloader(train_set, processor, batch_size=128, train=True, num_channels=3)
    test_loader = make_dataloader(test_set, processor, batch_size=min(500, len(test_set)), num_channels=3)

    started = time.time()
    source = Probe({"dinov3": dinov3, "beit": beit}[args.family](0))
    train(source, train_loader, args.epochs, lr=2e-3)
    baseline = accuracy(source, test_loader)
    print(f"source: {100 * baseline:.2f} % after {args.epochs} epochs ({time.time() - started:.0f} s)", flush=True)
    calibration = make_dataloader(train_set, processor, batch_size=min(256, len(train_set)), train=True, num_channels=3)
    calibration = next(iter(calibration))

    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        for positions in VARIANTS[args.family]:
            merged = copy.deepcopy(source)
            merged.backbone = merge(merged.backbone, args.family, args.after_layer, args.tokens, positions)
            with variant(merged, args.family, positions):
                torch.manual_seed(seed)
                calibrate(merged.backbone.eval(), calibration["pixel_values"], seed=seed)
                calibrated = accuracy(merged, test_loader)
                train(merged, train_loader, 1, lr=1e-3, teacher=source.eval(), seed=seed)
                distilled = accuracy(merged, test_loader)
            row = {"positions": positions, "variant": VARIANTS[args.family][positions], "seed": seed,
                   "calibrated": calibrated, "distilled": distilled}  # fmt: skip
            print(row, flush=True)
            rows.append(row)

    described = {"dinov3": "DINOv3 (D = 64, 6 layers, 4 registers)", "beit": "BEiT (D = 64, 6 layers, bias per layer)"}
    lines = [
        f"source {described[args.family]}: {100 * baseline:.2f} %; merged K = {args.after_layer}, M = {args.tokens}",
        "",
        f"| {COLUMN[args.family]} | seed | calibrated, no training | after 1 epoch of kd |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {r['variant']} | {r['seed']} | {100 * r['calibrated']:.2f} % | {100 * r['distilled']:.2f} % |" for r in rows
    ]
    for positions, name in VARIANTS[args.family].items():  # the mean over the seeds
        mine = [r for r in rows if r["positions"] == positions]
        calibrated, distilled = (sum(r[key] for r in mine) / len(mine) for key in ("calibrated", "distilled"))
        lines.append(f"| {name} | mean | {100 * calibrated:.2f} % | {100 * distilled:.2f} % |")
    print("\n".join(lines))
    if args.json:
        report = {"family": args.family, "source_accuracy": baseline, "pretrain_epochs": args.epochs,
                  "after_layer": args.after_layer, "tokens": args.tokens, "rows": rows,
                  "table": "\n".join(lines)}  # fmt: skip
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
