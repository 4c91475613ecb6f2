"""What training minimises: the outputs of a model that the losses compare (`HeadReader`), and the losses.

`kd` distils the unmerged model: the KL divergence of the logits at a temperature, plus, with a feature weight, the
relative squared error of the features the head reads (for a backbone, only the latter). `ce` is cross-entropy on
the labels; `mix` is alpha · ce + (1 - alpha) · kd.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from .settings import TrainSettings


class Outputs(NamedTuple):
    """What the losses compare: logits (None for a backbone) and the features the head reads (None if not asked)."""

    logits: torch.Tensor | None
    features: torch.Tensor | None


class HeadReader:
    """Runs a model and returns its `Outputs`. The features are what its head reads: the input of a classifier's
    final layer(s) (`Head.classifiers` in the family registry, recorded by a forward pre-hook, so no extra pass;
    DeiT's two heads are concatenated), or what a backbone's users read (`Head.features`: its pooled output, its CLS
    token, or CLS ⊕ mean of the other tokens; a dual encoder's normalised image embeddings)."""

    def __init__(self, model: torch.nn.Module, *, features: bool) -> None:
        from .loading import family_and_head, layer_config

        family, head = family_and_head(model.config)
        self.is_classifier = head.is_classifier
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
        """`model` may be the prepared (wrapped) form of the model the reader was built on."""
        if self.backbone_features == "image_embeds":  # a dual encoder: its normalised image embeddings
            from .zero_shot import image_embeddings

            return Outputs(None, image_embeddings(model, pixel_values))
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


def compute_loss(student: Outputs, teacher: Outputs | None, labels, args: TrainSettings) -> torch.Tensor:
    """The training loss for one batch (see `TrainArgs.loss`): `kd` is the logits' KL plus `feature_weight` times
    the `feature_loss` (a backbone has only the second); `mix` is alpha · CE + (1 - alpha) · kd."""
    if args.loss == "ce":
        return F.cross_entropy(student.logits.float(), labels)
    terms = []
    if student.logits is not None:
        terms.append(kd_loss(student.logits, teacher.logits, args.temperature))
    if args.feature_weight:
        terms.append(args.feature_weight * feature_loss(student.features, teacher.features))
    distill = sum(terms)
    if args.loss == "kd":
        return distill
    return args.alpha * F.cross_entropy(student.logits.float(), labels) + (1 - args.alpha) * distill


def describe_loss(args: TrainSettings, teacher: str | None = None) -> str:
    """The loss in words, for the model card; `teacher`: a --teacher other than the unmerged source model."""
    from .provenance import public_name

    if args.loss == "ce":
        return "ce (cross-entropy on labels)"
    features = f", feature weight {args.feature_weight:g}" if args.feature_weight else ""
    source = f"`{public_name(teacher)}`" if teacher else "the unmerged model"
    kd = f"kd from {source} (T = {args.temperature:g}{features})"
    return kd if args.loss == "kd" else f"mix ({args.alpha:g} × ce + {1 - args.alpha:g} × {kd})"
