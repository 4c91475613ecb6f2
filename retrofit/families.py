"""The registry of supported model families: where each keeps its layers, its prefix tokens, what its head reads.

Adding a family is adding one `Family` entry to `FAMILIES`. Everything else (surgery, export, cost, training)
reads these entries; nothing else in retrofit knows a family by name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from transformers import PreTrainedConfig

from .errors import RetrofitError


@dataclass(frozen=True)
class Head:
    """One transformers class of a family that retrofit can convert.

    Attributes:
        class_name: the transformers class, e.g. ``ViTForImageClassification``.
        layers_path: attribute path from that class to the ``nn.ModuleList`` of encoder layers.
        auto_class: the Auto class that loads it (written into the export's ``auto_map``).
        layer_config: Python expression, in terms of ``config``, for the config the layers are built from.
        reads: what the head reads from the last hidden state, and what that becomes after a merge.
    """

    class_name: str
    layers_path: str
    auto_class: str = "AutoModelForImageClassification"
    layer_config: str = "config"
    reads: str = ""


@dataclass(frozen=True, eq=False)
class Family:
    """A model family: a transformers model type and how a PatchMerger fits into it.

    Attributes:
        name: short name, also used in exported class and file names.
        model_types: the ``config.model_type`` values that belong to this family.
        example_id: a Hub checkpoint of this family, for the docs.
        modeling_module / config_module: where transformers defines the family's classes.
        config_class: the top-level config class of the checkpoints (the one in ``config.json``).
        layer_class: the encoder layer class; layer K is replaced by a subclass of it that merges first.
        heads: the convertible classes, by class name.
        num_prefix_tokens: tokens in front of the patch tokens (CLS, distillation, registers), from the layer config.
        notes: what changes, or breaks, after a merge.
        refusal: if set, the family is recognised but refused with this reason.
    """

    name: str
    model_types: tuple[str, ...]
    example_id: str
    modeling_module: str
    config_module: str
    config_class: str
    layer_class: str
    heads: dict[str, Head] = field(default_factory=dict)
    num_prefix_tokens: Callable[[PreTrainedConfig], int] = lambda config: 1
    notes: str = ""
    refusal: str | None = None

    @property
    def display_name(self) -> str:
        return self.config_class.removesuffix("Config")

    def head(self, class_name: str) -> Head:
        """The `Head` for a transformers class name, or a clear refusal."""
        if class_name not in self.heads:
            supported = ", ".join(self.heads)
            raise RetrofitError(
                f"{class_name} is not supported for {self.display_name}; load the checkpoint as one of: {supported}"
            )
        return self.heads[class_name]


FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    """Add a family to the registry (also usable by plugins)."""
    FAMILIES[family.name] = family
    return family


register(
    Family(
        name="vit",
        model_types=("vit",),
        example_id="google/vit-base-patch16-224",
        modeling_module="transformers.models.vit.modeling_vit",
        config_module="transformers.models.vit.configuration_vit",
        config_class="ViTConfig",
        layer_class="ViTLayer",
        heads={
            "ViTForImageClassification": Head(
                "ViTForImageClassification", "vit.layers", reads="CLS token after the final LayerNorm (unchanged)"
            ),
        },
        num_prefix_tokens=lambda config: 1,
        notes="CLS bypasses the merger; nothing else depends on the token count after the embeddings.",
    )
)

register(
    Family(
        name="deit",
        model_types=("deit",),
        example_id="facebook/deit-base-distilled-patch16-224",
        modeling_module="transformers.models.deit.modeling_deit",
        config_module="transformers.models.deit.configuration_deit",
        config_class="DeiTConfig",
        layer_class="DeiTLayer",
        heads={
            "DeiTForImageClassification": Head(
                "DeiTForImageClassification", "deit.layers", reads="CLS token after the final LayerNorm (unchanged)"
            ),
            "DeiTForImageClassificationWithTeacher": Head(
                "DeiTForImageClassificationWithTeacher",
                "deit.layers",
                reads="CLS and distillation tokens, two heads averaged (both tokens unchanged)",
            ),
        },
        # transformers' DeiT embeddings always prepend a CLS and a distillation token.
        num_prefix_tokens=lambda config: 2,
        notes="CLS and distillation tokens both bypass the merger.",
    )
)


def supported_names() -> str:
    """'ViT, DeiT, ...': the families retrofit converts, for error messages."""
    return ", ".join(f.display_name for f in FAMILIES.values() if f.refusal is None)


def family_for(model_type: str) -> Family:
    """The family of a ``config.model_type``, or a one-line refusal naming the supported families."""
    for family in FAMILIES.values():
        if model_type in family.model_types:
            if family.refusal:
                raise RetrofitError(f"{family.display_name} cannot be merged: {family.refusal}")
            return family
    if model_type.endswith("_patch_merger"):
        raise RetrofitError(
            "this checkpoint already has a PatchMerger (it is a retrofit export); convert its source instead, "
            "or pass it to `retrofit finetune` to continue training it"
        )
    raise RetrofitError(
        f"model type '{model_type}' is not supported (no single token sequence retrofit knows how to merge); "
        f"supported families: {supported_names()}"
    )
