"""Data-calibrated initialisation of a freshly inserted PatchMerger.

Random queries merge tokens into near-uniform averages, which the layers after the merger have never seen. Here the
queries start as k-means centroids of the normalised layer-K patch tokens LN(X) over a calibration batch, so each
merged token is (softly) the average of one cluster of similar patches. The centroid norm sets how sharp the
softmax is. k-means runs a few times; of all (run, scale) candidates the one closest to the unmerged model on the same
batch wins (KL of the logits; cosine distance of a backbone's features). That needs no labels: the unmerged
model is the merged one with its merger bypassed (same weights). Layers 0..K-1 run once; each candidate re-runs only
the layers after the merge, on M tokens: the 1 + 4 × 8 candidates of a ViT-B/16 merged at layer 6 cost about two
full forward passes instead of 33 (the whole calibration, k-means included, is about 4.5).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .errors import RetrofitError, brief, shown, whole_number
from .loading import family_and_head
from .losses import HeadReader
from .provenance import public_name
from .surgery import encoder_layers
from .train import keeps_callers_random_state

SCALES = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)
RESTARTS = 4  # k-means runs; the best of them by distance to the unmerged model wins
CHUNK = 64  # images per forward pass


@dataclass
class CalibrationResult:
    """The chosen query scale, and how far the merged model is from the unmerged one before and after.

    Classifiers are compared by KL of the logits and top-1 agreement; backbones (no logits) by the cosine distance
    and cosine similarity of their features (`Head.features`).
    """

    scale: float
    distance_random: float
    distance_calibrated: float
    agreement_random: float
    agreement_calibrated: float
    images: int
    metric: str = "KL"

    @property
    def chosen(self) -> str:
        """The start chosen: a query scale, or (scale 0) the random queries, which no candidate came closer than."""
        return f"query scale {self.scale:g}" if self.scale else "random queries kept: no k-means start came closer"

    def summary(self) -> str:
        agreement = "agreement with" if self.metric == "KL" else "cosine similarity to"
        return (
            f"calibrated the merger on {self.images} images: {agreement} the unmerged model "
            f"{self.agreement_random:.3f} (random init) -> {self.agreement_calibrated:.3f}, "
            f"{self.metric} {self.distance_random:.3f} -> {self.distance_calibrated:.3f} ({self.chosen})"
        )

    def describe(
        self,
        data: str,
        split: str,
        layer: int,
        seed: int | None = None,
        of: str | None = None,
        commit: str | None = None,
    ) -> str:
        """How the merger was initialised, for the model card; `seed`: the one that drew the images (a shuffled
        sample) and the k-means starts; `of`: the images of the split they were drawn from, where not all; `commit`:
        the Hub dataset's (`provenance.dataset_commit`)."""
        closeness = "top-1 agreement" if self.metric == "KL" else "cosine similarity of the features"
        drawn = "" if seed is None else f", a shuffled sample, seed {seed}"
        drawn += f", from {of}" if of else ""
        at = f" at commit `{commit}`" if commit else ""
        return (
            f"calibrated: k-means of the layer-{layer} tokens of {self.images} images of `{public_name(data)}`{at} "
            f"({split} split{drawn}), "
            f"{self.chosen}; {closeness} with the source {self.agreement_calibrated:.3f} "
            f"(random queries: {self.agreement_random:.3f})"
        )


@contextmanager
def bypass_merger(model) -> Iterator[None]:
    """Temporarily make the merger the identity: the model then computes exactly the unmerged source model."""
    handle = model.patch_merger.register_forward_hook(lambda module, inputs, output: inputs[0])
    try:
        yield
    finally:
        handle.remove()


@dataclass
class MergerInputs:
    """The inputs of layer K (the merger's), one tensor per forward pass, as `recording_merger_inputs` saw them, and
    whether the encoder layers return the hidden states in a tuple (as Data2Vec-vision's code in transformers 5.24
    still does) instead of as a tensor."""

    passes: list[torch.Tensor] = field(default_factory=list)
    tuples: bool = False


@contextmanager
def recording_merger_inputs(model) -> Iterator[MergerInputs]:
    """Record the merger's inputs (detached) and the encoder layers' output form over the forward passes inside."""
    recorded = MergerInputs()

    def output_form(module, inputs, output) -> None:
        recorded.tuples = type(output) is tuple

    hooks = [
        model.patch_merger.register_forward_pre_hook(lambda module, inputs: recorded.passes.append(inputs[0].detach())),
        encoder_layers(model)[1][0].register_forward_hook(output_form),
    ]
    try:
        yield recorded
    finally:
        for hook in hooks:
            hook.remove()


@contextmanager
def replay_first_layers(model, recorded: MergerInputs) -> Iterator[None]:
    """Skip encoder layers 0..K-1: layer K-1 hands on its recorded outputs, one chunk per forward pass, in order.

    They do not change while only the merger's queries do, so each calibration candidate costs only the layers that
    run on merged tokens. The layers hand on the hidden states in the form they were recorded in (`MergerInputs`).
    """
    after = model.config.merge_after_layer
    _, layers = encoder_layers(model)
    passes = itertools.cycle(recorded.passes)
    wrap = (lambda hidden_states: (hidden_states,)) if recorded.tuples else (lambda hidden_states: hidden_states)
    for layer in layers[: after - 1]:
        layer.forward = lambda hidden_states, *args, **kwargs: wrap(hidden_states)
    layers[after - 1].forward = lambda hidden_states, *args, **kwargs: wrap(next(passes))
    try:
        yield
    finally:
        for layer in layers[:after]:
            del layer.forward


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
def model_outputs(
    model, pixel_values: torch.Tensor, batch_size: int = CHUNK, *, features: bool = False
) -> torch.Tensor:
    """What users read from the model, per image: the logits of a classifier, a backbone's `Head.features`; with
    `features`, a classifier's features too (the input of its classifier layer)."""
    read = HeadReader(model, features=features)
    try:
        outputs = [read(model, chunk) for chunk in pixel_values.split(batch_size)]
    finally:
        read.close()
    return torch.cat([(out.features if features or out.logits is None else out.logits).float() for out in outputs])


def _compare(student: torch.Tensor, teacher: torch.Tensor, metric: str) -> tuple[float, float]:
    """(distance, agreement) of the merged model's outputs to the unmerged model's."""
    if metric == "KL":
        kl = F.kl_div(F.log_softmax(student, -1), F.log_softmax(teacher, -1), log_target=True, reduction="batchmean")
        return kl.item(), (student.argmax(-1) == teacher.argmax(-1)).float().mean().item()
    similarity = F.cosine_similarity(student, teacher, dim=-1).mean().item()
    return 1 - similarity, similarity


@torch.no_grad()
def calibrate(
    model,
    pixel_values: torch.Tensor,
    *,
    iterations: int = 20,
    seed: int = 0,
    scales=SCALES,
    restarts: int = RESTARTS,
    new_classifier: bool = False,
) -> CalibrationResult:
    """Set ``model.patch_merger.queries`` from k-means of LN(layer-K input patch tokens) on `pixel_values`.

    k-means runs `restarts` times (seeds `seed`, `seed + 1`, ...), each centroid set at every scale of `scales`;
    the candidate closest to the unmerged model wins, or the random queries stay if none beats them. One full
    forward pass records the layer-K inputs; the candidates then only run the layers after the merge. A classifier
    is compared by its logits; one whose classifier is new and random (`new_classifier`: the source has none, or
    ``--num-labels`` replaced it) by the features its classifier reads, as a backbone is: its random logits are no
    output of the source's.
    """
    _check_inputs(model, pixel_values)
    iterations, restarts, scales = _checked_search(iterations, seed, scales, restarts)
    merger = model.patch_merger
    was_training = model.training
    model.eval()
    pixel_values = pixel_values.to(device=merger.queries.device, dtype=next(model.parameters()).dtype)

    def outputs() -> torch.Tensor:
        return model_outputs(model, pixel_values, features=new_classifier)

    with bypass_merger(model), recording_merger_inputs(model) as recorded:
        try:
            teacher = outputs()
        except ValueError as exc:  # transformers' own check of the image size or channels
            model.train(was_training)
            raise RetrofitError(
                f"calibrate cannot run the model on pixel_values of shape {tuple(pixel_values.shape)}: {brief(exc)}"
            ) from None
    by_logits = family_and_head(model.config)[1].is_classifier and not new_classifier
    metric = "KL" if by_logits else "1 - cos"  # a classifier, or a backbone or a new classifier's features
    tokens = torch.cat(recorded.passes)[:, merger.num_prefix_tokens :]  # (B, N, D)
    normed = merger.norm(tokens).reshape(-1, tokens.shape[-1]).float()
    with replay_first_layers(model, recorded):
        original = merger.queries.detach().clone()
        random = _compare(outputs(), teacher, metric)
        best = (original, 0.0, *random)  # never end worse than the random start
        for restart in range(restarts):
            centroids = kmeans(normed, merger.num_tokens, iterations=iterations, seed=seed + restart)
            # Unit-RMS centroids: score = scale * cos-like similarity * sqrt(D) / sqrt(D) ~ scale * similarity.
            unit = centroids / centroids.pow(2).mean(dim=1, keepdim=True).sqrt().clamp(min=1e-6)
            for scale in scales:
                queries = (unit * scale).to(merger.queries.dtype)
                merger.queries.copy_(queries)
                distance, agreement = _compare(outputs(), teacher, metric)
                if distance < best[2]:
                    best = (queries, scale, distance, agreement)
        merger.queries.copy_(best[0])
    model.train(was_training)
    return CalibrationResult(
        scale=best[1],
        distance_random=random[0],
        distance_calibrated=best[2],
        agreement_random=random[1],
        agreement_calibrated=best[3],
        images=len(pixel_values),
        metric=metric,
    )


def _checked_search(iterations, seed, scales, restarts) -> tuple[int, int, tuple[float, ...]]:
    """calibrate's search settings, or one line naming the one that is wrong (they were TypeErrors from inside, and
    no restart or no scale kept the random queries as a calibration)."""
    import math
    import numbers

    iterations, restarts = (
        whole_number(iterations, "calibrate's iterations"),
        whole_number(restarts, "calibrate's restarts"),
    )
    whole_number(seed, "calibrate's seed")
    if iterations < 0 or restarts < 1:
        raise RetrofitError(f"calibrate needs iterations >= 0 and restarts >= 1, not {iterations} and {restarts}")
    items = list(scales) if isinstance(scales, list | tuple) else []
    good = all(isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x) and x > 0 for x in items)
    if not items or not good:
        raise RetrofitError(
            f"calibrate's scales must be a list of positive numbers, such as {SCALES}, not {shown(scales)}"
        )
    return iterations, restarts, tuple(float(x) for x in items)


def _check_inputs(model, pixel_values) -> None:
    """Refuse, in one line, what `calibrate` cannot take: a model without a PatchMerger (or not loaded: on the meta
    device), pixel values that are not a batch of finite float images (NaN pixels kept the random queries silently)."""
    if not isinstance(getattr(model, "patch_merger", None), torch.nn.Module):
        raise RetrofitError(
            f"calibrate takes a merged model (retrofit.insert_patch_merger's), not a {type(model).__name__} without a "
            "PatchMerger"
        )
    if any(parameter.is_meta for parameter in model.parameters()):
        raise RetrofitError("calibrate needs the model's weights, and this model is on the meta device; load it first")
    if not isinstance(pixel_values, torch.Tensor) or pixel_values.ndim != 4 or not pixel_values.is_floating_point():
        tensor = isinstance(pixel_values, torch.Tensor)
        what = f"{pixel_values.dtype} of shape {tuple(pixel_values.shape)}" if tensor else type(pixel_values).__name__
        raise RetrofitError(
            f"calibrate takes pixel_values as a float tensor (images, channels, height, width), as the model's image "
            f"processor gives them, not a {what}"
        )
    if len(pixel_values) == 0:
        raise RetrofitError("calibrate needs at least one image in pixel_values; got none")
    if not torch.isfinite(pixel_values).all():
        raise RetrofitError("pixel_values hold NaN or infinite values; calibrate on the image processor's output")


@keeps_callers_random_state  # its data loader draws from torch's generator
def calibration_batch(
    model,
    data: str,
    *,
    source: str,
    num_images: int = 256,
    split: str = "train",
    image_column: str = "image",
    seed: int = 0,
    images=None,
    holdout: float | None = None,
    holdout_by: str | None = None,
    revision: str | None = None,
    log: Callable[[str], None] = print,
) -> torch.Tensor:
    """`num_images` preprocessed images of `data` (a shuffled sample of its `split`, less the fraction `holdout`
    keeps out, stratified by the label column `holdout_by`; a Hub dataset at `revision`), as the model expects them;
    or, given `images` (a `datasets.Dataset` with an ``image`` column, such as the images a fine-tune trains on),
    those."""
    from .data import load_split, make_dataloader
    from .loading import image_channels, load_image_processor

    dataset = images
    if dataset is None:  # only the sample is loaded (from the Hub: streamed, unless --holdout needs the whole split)
        dataset = load_split(data, split, image_column=image_column, label_column=None, limit=num_images,
                             sample_seed=seed, holdout=holdout, holdout_by=holdout_by, revision=revision)  # fmt: skip
    processor = load_image_processor(source, model.config, log=log)
    loader = make_dataloader(dataset, processor, batch_size=len(dataset), num_channels=image_channels(model.config))
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
    images=None,
    holdout: float | None = None,
    holdout_by: str | None = None,
    revision: str | None = None,
    new_classifier: bool = False,
) -> CalibrationResult:
    """Calibrate `merged`'s PatchMerger on `num_images` images of `data` (fashion-mnist, image folder or Hub id), or
    on `images` where given (`calibration_batch`); `new_classifier`: see `calibrate`."""
    pixels = calibration_batch(merged, data, source=source, num_images=num_images, split=split,
                               image_column=image_column, seed=seed, images=images, holdout=holdout,
                               holdout_by=holdout_by, revision=revision, log=log)  # fmt: skip
    result = calibrate(merged, pixels, seed=seed, new_classifier=new_classifier)
    log(result.summary())
    return result
