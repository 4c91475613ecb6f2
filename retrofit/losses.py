"""What training minimises: the outputs of a model that the losses compare (`HeadReader`), and the losses.

`kd` distils the unmerged model: the KL divergence of the logits at a temperature, plus, with a feature weight, the
relative squared error of the features the head reads (for a backbone, only the latter). `ce` is cross-entropy on
the labels; `mix` is alpha · ce + (1 - alpha) · kd.

A dual encoder (CLIP, SigLIP) has no logits: its `kd` is label-free, on what zero-shot classification reads, the
normalised image embeddings: their cosine distance to the unmerged model's (`cosine_loss`, feature weight), plus,
with a prompt weight, the KL divergence of the image-text similarity distributions over a fixed set of prompts (the
logits of `retrofit.zero_shot.zero_shot_logits`, at the kd temperature). `contrastive` pretrains a dual encoder from
scratch on images and captions written from their class names (`contrastive_loss`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from .settings import TrainSettings


class Outputs(NamedTuple):
    """What the losses compare: logits (None for a backbone) and the features the head reads (None if not asked);
    a dual encoder's image-prompt logits (images × prompts) when a prompt weight asks for them."""

    logits: torch.Tensor | None
    features: torch.Tensor | None
    prompt_logits: torch.Tensor | None = None


class HeadReader:
    """Runs a model and returns its `Outputs`. The features are what its head reads: the input of a classifier's
    final layer(s) (`Head.classifiers` in the family registry, recorded by a forward pre-hook, so no extra pass;
    DeiT's two heads are concatenated), or what a backbone's users read (`Head.features`: its pooled output, its CLS
    token, or CLS ⊕ mean of the other tokens; a dual encoder's normalised image embeddings)."""

    def __init__(self, model: torch.nn.Module, *, features: bool, prompts: torch.Tensor | None = None) -> None:
        """`prompts`: a dual encoder's normalised prompt embeddings (prompts × D); the outputs then carry the
        image-prompt logits too."""
        from .loading import family_and_head, layer_config

        family, head = family_and_head(model.config)
        self.is_classifier = head.is_classifier
        self.is_dual_encoder = head.is_dual_encoder
        self.prompts = prompts
        self.backbone_features = head.features
        config = model.config
        self.num_prefix_tokens = getattr(config, "merge_num_prefix_tokens", None)
        if self.num_prefix_tokens is None:
            self.num_prefix_tokens = family.num_prefix_tokens(layer_config(config, head))
        self._recording = False
        self._recorded: list[torch.Tensor] = []
        names = head.classifiers if features and head.is_classifier else ()
        self._hooks = [model.get_submodule(name).register_forward_pre_hook(self._record) for name in names]

    def close(self) -> None:
        """Remove the hooks (the trained model is handed back without them)."""
        for hook in self._hooks:
            hook.remove()

    def _record(self, module: torch.nn.Module, args: tuple) -> None:
        if self._recording:
            self._recorded.append(args[0])

    def __call__(self, model: torch.nn.Module, pixel_values: torch.Tensor) -> Outputs:
        """`model` may be the prepared (wrapped) form of the model the reader was built on. The pixels go in in the
        model's dtype (a bf16 teacher of a float32 run; `loading.in_model_dtype`)."""
        from .loading import in_model_dtype

        pixel_values = in_model_dtype(pixel_values, model)
        if self.backbone_features == "image_embeds":  # a dual encoder: its normalised image embeddings
            from .zero_shot import image_embeddings, zero_shot_logits

            embeds = image_embeddings(model, pixel_values)
            logits = None if self.prompts is None else zero_shot_logits(model, embeds, self.prompts)
            return Outputs(None, embeds, logits)
        self._recording, self._recorded = True, []
        try:
            output = model(pixel_values=pixel_values)
        finally:
            self._recording = False
        if not self.is_classifier:
            return Outputs(None, self._backbone_features(output))
        return Outputs(output.logits, torch.cat(self._recorded, dim=-1) if self._recorded else None)

    def _backbone_features(self, output) -> torch.Tensor:
        """What a backbone's users read (`Head.features`): its pooled output, its CLS token, CLS ⊕ mean of the
        tokens after the prefix tokens, or that mean alone."""
        if self.backbone_features == "pooler":
            return output.pooler_output
        hidden = output.last_hidden_state
        if self.backbone_features == "cls":
            return hidden[:, 0]
        mean = hidden[:, self.num_prefix_tokens :].mean(dim=1)
        if self.backbone_features == "mean":
            return mean
        return torch.cat([hidden[:, 0], mean], dim=-1)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton distillation: T² · KL(softmax(teacher/T) ‖ softmax(student/T)), averaged over the batch."""
    t = temperature
    student = F.log_softmax(student_logits.float() / t, dim=-1)
    teacher = F.log_softmax(teacher_logits.float() / t, dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean") * t * t


def feature_loss(student_features: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
    """Feature distillation: ‖s − t‖² / ‖t‖² per image (relative squared error of the features the head reads),
    averaged over the batch. Relative, so one weight suits models whose features differ in scale."""
    student, teacher = student_features.float(), teacher_features.float()
    error = (student - teacher).pow(2).sum(-1) / teacher.pow(2).sum(-1).clamp_min(1e-12)
    return error.mean()


def cosine_loss(student_embeds: torch.Tensor, teacher_embeds: torch.Tensor) -> torch.Tensor:
    """1 − cos(s, t) per image, averaged over the batch: how far a dual encoder's image embedding points from the
    unmerged model's, which is all zero-shot classification and retrieval read of it (for unit vectors, half their
    squared distance)."""
    return (1 - F.cosine_similarity(student_embeds.float(), teacher_embeds.float(), dim=-1)).mean()


def contrastive_loss(logits_per_image: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric InfoNCE over a batch of image-caption pairs (`logits_per_image`: images × captions, the
    scaled cosine similarities), with the captions of an image's class all counted as its matches: the target of
    each row (and column) is uniform over the captions (images) of its class. With one image per class in the batch
    this is CLIP's loss; with captions written from a few class names it does not push apart an image and a caption
    of its own class."""
    logits = logits_per_image.float()
    same = (labels[:, None] == labels[None, :]).float()
    target = same / same.sum(dim=1, keepdim=True)  # symmetric: the same for rows and columns
    images = -(target * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
    captions = -(target * F.log_softmax(logits.t(), dim=1)).sum(dim=1).mean()
    return (images + captions) / 2


def compute_loss(
    student: Outputs, teacher: Outputs | None, labels, args: TrainSettings, *, embeddings: bool = False
) -> torch.Tensor:
    """The training loss for one batch (see `TrainSettings.loss`): `kd` is the logits' KL plus `feature_weight`
    times the `feature_loss` (a backbone has only the second); `mix` is alpha · CE + (1 - alpha) · kd; `contrastive`
    (pretrain) is `contrastive_loss` on the batch's image-caption logits. `embeddings`: the features are a dual
    encoder's normalised image embeddings, compared by `cosine_loss`, plus `prompt_weight` times the KL of the
    image-prompt logits (`Outputs.prompt_logits`)."""
    if args.loss == "ce":
        return F.cross_entropy(student.logits.float(), labels)
    if args.loss == "contrastive":  # `student.logits`: the batch's image-caption logits
        return contrastive_loss(student.logits, labels)
    terms = []
    if student.logits is not None:
        terms.append(kd_loss(student.logits, teacher.logits, args.temperature))
    if args.feature_weight:
        compare = cosine_loss if embeddings else feature_loss
        terms.append(args.feature_weight * compare(student.features, teacher.features))
    if args.prompt_weight and student.prompt_logits is not None:
        terms.append(args.prompt_weight * kd_loss(student.prompt_logits, teacher.prompt_logits, args.temperature))
    distill = sum(terms)
    if args.loss == "kd":
        return distill
    return args.alpha * F.cross_entropy(student.logits.float(), labels) + (1 - args.alpha) * distill


def describe_loss(args: TrainSettings, teacher: str | None = None, *, dual_encoder: bool = False) -> str:
    """The loss in words, for the model card; `teacher`: a --teacher other than the unmerged source model;
    `dual_encoder`: the model is an image-text dual encoder (its kd reads image embeddings, not logits)."""
    from .provenance import public_name

    if args.loss == "ce":
        return "ce (cross-entropy on labels)"
    if args.loss == "contrastive":
        templates = args.caption_templates
        return (
            f"contrastive (CLIP's symmetric InfoNCE between images and captions written from their class names with "
            f"{len(templates)} templates such as {templates[0]!r}; captions of one class count as matches)"
        )
    source = f"`{public_name(teacher)}`" if teacher else "the unmerged model"
    if dual_encoder:
        parts = []
        if args.feature_weight:
            weight = f"{args.feature_weight:g} × " if args.feature_weight != 1 else ""
            parts.append(f"{weight}cosine distance (1 − cos) of the normalised image embeddings")
        if args.prompt_weight:
            templates = ", ".join(repr(template) for template in args.prompt_templates)
            parts.append(
                f"{args.prompt_weight:g} × KL divergence of the image-text similarity distributions over the data's "
                f"class-name prompts ({templates}; T = {args.temperature:g})"
            )
        return f"kd from {source}, label-free: {' + '.join(parts)}; text tower frozen"
    features = f", feature weight {args.feature_weight:g}" if args.feature_weight else ""
    if args.function_matching:
        features += "; function matching: teacher and student see the same cropped, flipped and mixed-up images"
    kd = f"kd from {source} (T = {args.temperature:g}{features})"
    return kd if args.loss == "kd" else f"mix ({args.alpha:g} × ce + {1 - args.alpha:g} × {kd})"
