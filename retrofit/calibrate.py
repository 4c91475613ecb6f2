"""Data-calibrated initialisation of a freshly inserted PatchMerger.

Random queries merge tokens into near-uniform averages, which the layers after the merger have never seen. Here the
queries start as k-means centroids of the normalised layer-K patch tokens LN(X) over a calibration batch, so each
merged token is (softly) the average of one cluster of similar patches. The centroid norm sets how sharp the
softmax is; the scale is chosen from a small grid by agreement (KL) with the unmerged model on the same batch, which
needs no labels: the unmerged model is the merged one with its merger bypassed (same weights).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

SCALES = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)


@dataclass
class CalibrationResult:
    """The chosen query scale and the merged model's KL to / agreement with the unmerged model, before and after."""

    scale: float
    kl_random: float
    kl_calibrated: float
    agreement_random: float
    agreement_calibrated: float
    images: int

    def summary(self) -> str:
        return (
            f"calibrated the merger on {self.images} images: agreement with the unmerged model "
            f"{self.agreement_random:.3f} (random init) -> {self.agreement_calibrated:.3f}, "
            f"KL {self.kl_random:.3f} -> {self.kl_calibrated:.3f} (query scale {self.scale:g})"
        )


@contextmanager
def bypass_merger(model) -> Iterator[None]:
    """Temporarily make the merger the identity: the model then computes exactly the unmerged source model."""
    handle = model.patch_merger.register_forward_hook(lambda module, inputs, output: inputs[0])
    try:
        yield
    finally:
        handle.remove()


def kmeans(points: torch.Tensor, k: int, *, iterations: int = 20, seed: int = 0) -> torch.Tensor:
    """Plain k-means (k-means++ seeding, Lloyd iterations) on (n, d) points; returns (k, d) centroids."""
    generator = torch.Generator().manual_seed(seed)
    points = points.float()
    n = points.shape[0]
    centroids = points[torch.randint(n, (1,), generator=generator)]
    for _ in range(1, k):
        distance = torch.cdist(points, centroids).min(dim=1).values.pow(2)
        probabilities = distance / distance.sum() if distance.sum() > 0 else torch.full_like(distance, 1 / n)
        centroids = torch.cat([centroids, points[torch.multinomial(probabilities, 1, generator=generator)]])
    for _ in range(iterations):
        assignment = torch.cdist(points, centroids).argmin(dim=1)
        sums = torch.zeros_like(centroids).index_add_(0, assignment, points)
        counts = torch.bincount(assignment, minlength=k).unsqueeze(1)
        empty = counts.squeeze(1) == 0
        updated = torch.where(empty.unsqueeze(1), centroids, sums / counts.clamp(min=1))
        if torch.allclose(updated, centroids):
            break
        centroids = updated
    return centroids


@torch.no_grad()
def _logits(model, pixel_values: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    return torch.cat([model(pixel_values=chunk).logits.float() for chunk in pixel_values.split(batch_size)])


def _compare(student: torch.Tensor, teacher: torch.Tensor) -> tuple[float, float]:
    kl = F.kl_div(F.log_softmax(student, -1), F.log_softmax(teacher, -1), log_target=True, reduction="batchmean")
    return kl.item(), (student.argmax(-1) == teacher.argmax(-1)).float().mean().item()


@torch.no_grad()
def calibrate(
    model, pixel_values: torch.Tensor, *, iterations: int = 20, seed: int = 0, scales=SCALES
) -> CalibrationResult:
    """Set ``model.patch_merger.queries`` from k-means of LN(layer-K input patch tokens) on `pixel_values`."""
    merger = model.patch_merger
    was_training = model.training
    model.eval()
    device = merger.queries.device
    pixel_values = pixel_values.to(device=device, dtype=next(model.parameters()).dtype)
    captured: list[torch.Tensor] = []
    hook = merger.register_forward_pre_hook(lambda module, inputs: captured.append(inputs[0].detach()))
    with bypass_merger(model):
        teacher = _logits(model, pixel_values)
    hook.remove()
    kl_random, agree_random = _compare(_logits(model, pixel_values), teacher)
    tokens = torch.cat(captured)[:, merger.num_prefix_tokens :]  # (B, N, D)
    normed = merger.norm(tokens).reshape(-1, tokens.shape[-1]).float()
    centroids = kmeans(normed, merger.num_tokens, iterations=iterations, seed=seed)
    # Unit-RMS centroids: score = scale * cos-like similarity * sqrt(D) / sqrt(D) ~ scale * similarity.
    unit = centroids / centroids.pow(2).mean(dim=1, keepdim=True).sqrt().clamp(min=1e-6)
    original = merger.queries.detach().clone()
    best = None
    for scale in scales:
        merger.queries.copy_((unit * scale).to(merger.queries.dtype))
        kl, agree = _compare(_logits(model, pixel_values), teacher)
        if best is None or kl < best[1]:
            best = (scale, kl, agree)
    if best[1] >= kl_random:  # never make it worse than the random start
        merger.queries.copy_(original)
        best = (0.0, kl_random, agree_random)
    else:
        merger.queries.copy_((unit * best[0]).to(merger.queries.dtype))
    model.train(was_training)
    return CalibrationResult(
        scale=best[0],
        kl_random=kl_random,
        kl_calibrated=best[1],
        agreement_random=agree_random,
        agreement_calibrated=best[2],
        images=len(pixel_values),
    )


def calibration_batch(
    model,
    data: str,
    *,
    source: str,
    num_images: int = 256,
    split: str = "train",
    image_column: str = "image",
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> torch.Tensor:
    """`num_images` preprocessed images of `data` (a shuffled sample), as the model expects them."""
    from .data import load_split, make_dataloader
    from .loading import load_image_processor

    dataset = load_split(data, split, image_column=image_column, label_column=None)
    if len(dataset) > num_images:
        dataset = dataset.shuffle(seed=seed).select(range(num_images))
    processor = load_image_processor(source, model.config, log=log)
    loader = make_dataloader(
        dataset, processor, batch_size=len(dataset), num_channels=getattr(model.config, "num_channels", None)
    )
    return next(iter(loader))["pixel_values"]


def calibrate_from_data(
    merged,
    data: str,
    *,
    source: str,
    log: Callable[[str], None] = print,
    num_images: int = 256,
    split: str = "train",
    image_column: str = "image",
    seed: int = 0,
) -> CalibrationResult:
    """Calibrate `merged`'s PatchMerger on `num_images` images of `data` (fashion-mnist, image folder or Hub id)."""
    pixels = calibration_batch(
        merged, data, source=source, num_images=num_images, split=split, image_column=image_column, seed=seed, log=log
    )
    result = calibrate(merged, pixels, seed=seed)
    log(result.summary())
    return result
