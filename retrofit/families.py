"""The registry of supported model families: where each keeps its layers, its prefix tokens, what its head reads.

Adding a family is adding one `Family` entry to `FAMILIES`. Everything else (surgery, export, cost, training)
reads these entries; elsewhere in retrofit only the text side of SigLIP's dual encoders (how its prompts are padded
and scored: `zero_shot.tokenize`, `pooled_tokens`, `text_embeddings`, the card's usage example) and bench's list of
ViT shapes name a family.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .errors import RetrofitError, shown

if TYPE_CHECKING:  # the registry itself imports no transformers code, so the CLI can read it fast
    from transformers import PreTrainedConfig


@dataclass(frozen=True)
class Head:
    """One transformers class of a family that retrofit can convert.

    Attributes:
        class_name: the transformers class, e.g. ``ViTForImageClassification``.
        auto_class: the Auto class that loads it (written into the export's ``auto_map``).
        layer_config: Python expression, in terms of ``config``, for the config the layers are built from.
        reads: what the head reads from the last hidden state, and what that becomes after a merge.
        classifiers: the head's final layers (classifiers only); their inputs are the features the head reads, which
            `--feature-weight` distils (several are concatenated).
        features: backbones only, what users read from them and fine-tuning distils: ``pooler`` (``pooler_output``),
            ``cls`` (the CLS token of ``last_hidden_state``), ``cls+mean`` (CLS ⊕ mean of the tokens after the
            prefix tokens, DINOv2's linear-probe features) or ``mean`` (mean of the tokens after the prefix tokens,
            for models without a CLS token), or ``image_embeds`` (a dual encoder's normalised image embeddings, what
            zero-shot classification compares with the text embeddings).
        encoder: where the model has more than one encoder (a dual encoder's text and vision towers), the submodule
            that holds the layers to merge (``vision_model``); empty: the model's only encoder.
        output_class: dual encoders only, the transformers output class of the model (``CLIPOutput``), which the
            merged model returns when it is given images alone (their embeddings, without a text tower pass).
        image_modules: dual encoders only, the submodules of the image side (the vision tower, its projection): the
            only ones fine-tuning trains; the text tower, its projection and the logit scale/bias stay frozen.
    """

    class_name: str
    auto_class: str = "AutoModelForImageClassification"
    layer_config: str = "config"
    reads: str = ""
    classifiers: tuple[str, ...] = ("classifier",)
    features: str = "pooler"
    encoder: str = ""
    output_class: str = ""
    image_modules: tuple[str, ...] = ()

    @property
    def is_classifier(self) -> bool:
        """True if the class outputs logits (else it is a backbone or a dual encoder)."""
        return self.auto_class == "AutoModelForImageClassification"

    @property
    def is_dual_encoder(self) -> bool:
        """True for an image-text dual encoder (CLIPModel, SiglipModel): zero-shot classification and retrieval."""
        return self.auto_class == "AutoModelForZeroShotImageClassification"

    @property
    def auto_classes(self) -> tuple[str, ...]:
        """The Auto classes that load an export of this class (a dual encoder also loads with `AutoModel`, as the
        source checkpoint does)."""
        return (self.auto_class, "AutoModel") if self.is_dual_encoder else (self.auto_class,)

    @property
    def pipeline_tag(self) -> str:
        """The Hub pipeline tag of an export of this class, which is also its `--task`."""
        if self.is_dual_encoder:
            return "zero-shot-image-classification"
        return "image-classification" if self.is_classifier else "image-feature-extraction"


# An export's model type is its family's name with this suffix (``vit_patch_merger``): how retrofit knows one.
MERGED_SUFFIX = "_patch_merger"

TASKS = ("image-classification", "image-feature-extraction", "zero-shot-image-classification")

# Where the layers of RoPE families (`Family.rope`) rotate the merged tokens (the export's `merge_rope_positions`),
# the default first: each at the merge-weighted mean of its patches' centres, per image (measured better than no
# rotation: docs/families.md), or not at all.
ROPE_POSITIONS = ("mean", "none")


@dataclass(frozen=True, eq=False)
class Family:
    """A model family: a transformers model type and how a PatchMerger fits into it.

    Attributes:
        name: short name, also used in exported class and file names.
        model_types: the ``config.model_type`` values that belong to this family.
        example_id: a Hub checkpoint of this family, for the docs.
        modeling_module / config_module: where transformers defines the family's classes.
        config_class: the top-level config class of the checkpoints (the one in ``config.json``).
        layer_class: the encoder layer class; layers K.. are replaced by a subclass (layer K merges its input first).
        heads: the convertible classes, by class name; the first is used when the checkpoint's own class is not one.
        prefix_tokens: the tokens in front of the patch tokens, which bypass the merger: ``CLS``, ``distillation``,
            ``registers`` (as many as the layer config's ``num_register_tokens``).
        mlp_width: I such that the MLP of one layer costs 2·D·I multiply-accumulates per token (for `retrofit.cost`).
        notes: what changes, or breaks, after a merge.
        refusal: if set, the family is recognised but refused with this reason.
        display: the name shown to users; defaults to the config class without ``Config``.
        tower: for multi-modal checkpoints, the family of their vision tower (built from ``config.vision_config``),
            which `--task image-feature-extraction` converts.
        rope: if the layers rotate the queries and keys of the patch tokens by the patches' positions (RoPE), the
            class of the module that computes the rotation (the encoder hands each layer its output,
            ``position_embeddings``, the (cos, sin) of the N patches, which apply to the last N tokens). The merged
            layers rotate each merged token at the mean position of the patches it averages, or none of them
            (`ROPE_POSITIONS`, the export's `merge_rope_positions`).
        relative_position_bias: if the layers add a learned bias to the attention scores by the relative positions of
            the patches (BEiT), the class of the module that computes it. The layers after the merge give the merged
            tokens the merge-weighted bias of the patches they average, per image.
        padded_patches: if the vision tower takes each image as a sequence of patches at its own aspect ratio, a batch
            padded to one length, with ``pixel_attention_mask`` and ``spatial_shapes`` (SigLIP 2's NaFlex), the
            class of its attention pooling head. The merger then merges the real patches of each image only (their
            mask, read from the attention mask layer K is given), and the pooling head reads all M merged tokens.
            retrofit's own data, training and timing feed such a model square images (`retrofit.naflex`).
        padded_patch_towers: with `padded_patches`, the vision tower classes whose forward takes the padded patches
            (``pixel_values``, the mask, ``spatial_shapes``), by the names transformers' releases give them, which
            `naflex.take_images` lets take images.
        pooling_head: if the vision tower ends in an attention pooling head (SigLIP's) where its layer config's
            ``vision_use_head`` is true or absent (transformers 5.18 has no such field and builds the head); its
            cost reads the N or M tokens of the last layer (`retrofit.cost`).
        square_sizes: if transformers' class takes ``image_size`` and ``patch_size`` as one whole number each (square
            images and patches; CLIP, SigLIP), so a (height, width) pair is refused in one line.
        shapes: random-weight model shapes of the family's first class that ``retrofit bench`` and ``sweep
            --dry-run`` take instead of a checkpoint (name -> config fields; 224x224 images).
    """

    name: str
    model_types: tuple[str, ...]
    example_id: str = ""
    modeling_module: str = ""
    config_module: str = ""
    config_class: str = ""
    layer_class: str = ""
    heads: dict[str, Head] = field(default_factory=dict)
    prefix_tokens: tuple[str, ...] = ("CLS",)
    mlp_width: Callable[[PreTrainedConfig], float] = lambda config: config.intermediate_size
    notes: str = ""
    refusal: str | None = None
    display: str = ""
    tower: str = ""
    rope: str | None = None
    relative_position_bias: str | None = None
    padded_patches: str | None = None
    padded_patch_towers: tuple[str, ...] = ()
    pooling_head: bool = False
    square_sizes: bool = False
    shapes: dict[str, dict] = field(default_factory=dict)

    @property
    def display_name(self) -> str:
        """The prefix of the generated class names, e.g. ``CLIPVision`` for ``CLIPVisionConfig``."""
        return self.config_class.removesuffix("Config") or self.display

    def num_prefix_tokens(self, layer_config: PreTrainedConfig) -> int:
        """How many tokens bypass the merger (`prefix_tokens`, the registers counted from `layer_config`)."""
        return sum(layer_config.num_register_tokens if token == "registers" else 1 for token in self.prefix_tokens)

    @property
    def prefix_description(self) -> str:
        """The prefix tokens in words: ``1 (CLS)``, ``1 + registers (CLS, registers)``, ``0``."""
        fixed = sum(token != "registers" for token in self.prefix_tokens)
        count = f"{fixed} + registers" if "registers" in self.prefix_tokens else str(fixed)
        return f"{count} ({', '.join(self.prefix_tokens)})" if self.prefix_tokens else "0"

    @property
    def user_name(self) -> str:
        """The family's name in messages and docs."""
        return self.display or self.display_name

    def relative_position_biases(self, layer_config: PreTrainedConfig) -> int:
        """How many relative position biases each layer adds (BEiT: its own and / or one shared by all layers)."""
        if not self.relative_position_bias:
            return 0
        flags = ("use_relative_position_bias", "use_shared_relative_position_bias")
        return sum(bool(getattr(layer_config, flag, False)) for flag in flags)


FAMILIES: dict[str, Family] = {}

# The ViT sizes (ViT paper; S from DeiT): width, layers, heads, MLP width; and their patch size in the shapes' names.
_SIZES = {"ti": (192, 12, 3, 768), "s": (384, 12, 6, 1536), "b": (768, 12, 12, 3072), "l": (1024, 24, 16, 4096),
          "h": (1280, 32, 16, 5120)}  # fmt: skip
_PATCH = {"ti": 16, "s": 16, "b": 16, "l": 16, "h": 14}


def _shapes(prefix: str, sizes: str | list[str], *, vit: bool = False, **fields) -> dict[str, dict]:
    """Benchmark shapes ``<prefix>-<size><patch>`` (``vit-b16``; with `vit`, ``<prefix>-vit<size><patch>``) for the
    ViT sizes `sizes` (``"bl"``, or a list such as ["ti", "s"]), with the family's own config `fields`."""
    shapes = {}
    for size in sizes:
        width, layers, heads, mlp = _SIZES[size]
        name = f"{prefix}-{'vit' if vit else ''}{size}{_PATCH[size]}"
        shapes[name] = dict(hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads,
                            intermediate_size=mlp, patch_size=_PATCH[size], **fields)  # fmt: skip
    return shapes


def _dual_shapes(prefix: str, size: str, patch: int, **vision) -> dict[str, dict]:
    """A dual encoder's benchmark shape ``<prefix>-<size><patch>`` (``clip-b32``): the ViT size `size` as its vision
    tower (224x224), with `vision` fields, and the family's default text tower."""
    ((name, fields),) = _shapes(prefix, [size]).items()
    fields = {**fields, "patch_size": patch, "image_size": 224, **vision}
    return {name.removesuffix(str(_PATCH[size])) + str(patch): {"vision_config": fields}}


def register(family: Family) -> Family:
    """Add a family to the registry (also usable by plugins)."""
    if not isinstance(family, Family):  # AttributeError 'name' otherwise
        raise RetrofitError(f"register takes a retrofit.Family, not {shown(family)}")
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
                "ViTForImageClassification", reads="CLS token after the final LayerNorm (unchanged)"
            ),
            "ViTModel": Head(
                "ViTModel",
                auto_class="AutoModel",
                reads="CLS token after the final LayerNorm (unchanged; the pooler reads it); last_hidden_state: 1 + M",
                features="cls",
            ),
        },
        notes="CLS bypasses the merger; nothing else depends on the token count after the embeddings.",
        shapes=_shapes("vit", ["ti", "s", "b", "l", "h"]),
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
                "DeiTForImageClassification", reads="CLS token after the final LayerNorm (unchanged)"
            ),
            "DeiTForImageClassificationWithTeacher": Head(
                "DeiTForImageClassificationWithTeacher",
                reads="CLS and distillation tokens, two heads averaged (both tokens unchanged)",
                classifiers=("cls_classifier", "distillation_classifier"),
            ),
            "DeiTModel": Head(
                "DeiTModel",
                auto_class="AutoModel",
                reads="CLS token after the final LayerNorm (unchanged; the pooler reads it); last_hidden_state: 2 + M",
                features="cls",
            ),
        },
        # transformers' DeiT embeddings always prepend a CLS and a distillation token.
        prefix_tokens=("CLS", "distillation"),
        notes="CLS and distillation tokens both bypass the merger.",
    )
)


register(
    Family(
        name="vit_msn",
        display="ViT-MSN",
        model_types=("vit_msn",),
        example_id="facebook/vit-msn-small",
        modeling_module="transformers.models.vit_msn.modeling_vit_msn",
        config_module="transformers.models.vit_msn.configuration_vit_msn",
        config_class="ViTMSNConfig",
        layer_class="ViTMSNLayer",
        heads={
            "ViTMSNForImageClassification": Head(
                "ViTMSNForImageClassification", reads="CLS token after the final LayerNorm (unchanged)"
            ),
            "ViTMSNModel": Head(
                "ViTMSNModel",
                auto_class="AutoModel",
                reads="CLS token after the final LayerNorm (unchanged); last_hidden_state: 1 + M tokens",
                features="cls",
            ),
        },
        notes="A ViT pretrained with Masked Siamese Networks: CLS bypasses the merger, as in ViT.",
    )
)

register(
    Family(
        name="ijepa",
        display="I-JEPA",
        model_types=("ijepa",),
        example_id="facebook/ijepa_vith14_1k",
        modeling_module="transformers.models.ijepa.modeling_ijepa",
        config_module="transformers.models.ijepa.configuration_ijepa",
        config_class="IJepaConfig",
        layer_class="IJepaLayer",
        heads={
            "IJepaForImageClassification": Head(
                "IJepaForImageClassification",
                reads="mean of all tokens: after the merge, the mean of the M merged tokens",
            ),
            "IJepaModel": Head(
                "IJepaModel",
                auto_class="AutoModel",
                reads="mean of all tokens: after the merge, the mean of the M merged tokens; last_hidden_state: M",
                features="mean",
            ),
        },
        prefix_tokens=(),
        notes="No CLS token: every token is merged (zero prefix tokens), as in SigLIP.",
    )
)


def _dinov2_mlp_width(config: PreTrainedConfig) -> float:
    """DINOv2's MLP width: ``mlp_ratio·D``; SwiGLU (3 matrices of D × 2/3 of that, rounded to 8) counts 1.5×."""
    width = int(config.hidden_size * config.mlp_ratio)
    if config.use_swiglu_ffn:
        return 1.5 * ((int(width * 2 / 3) + 7) // 8 * 8)
    return width


register(
    Family(
        name="dinov2",
        display="DINOv2",
        model_types=("dinov2",),
        example_id="facebook/dinov2-small",
        modeling_module="transformers.models.dinov2.modeling_dinov2",
        config_module="transformers.models.dinov2.configuration_dinov2",
        config_class="Dinov2Config",
        layer_class="Dinov2Layer",
        heads={
            "Dinov2ForImageClassification": Head(
                "Dinov2ForImageClassification",
                reads="CLS ⊕ mean of the tokens after CLS: after the merge, CLS ⊕ mean of the M merged tokens",
            ),
            "Dinov2Model": Head(
                "Dinov2Model",
                auto_class="AutoModel",
                reads="pooler_output = CLS after the final LayerNorm (unchanged); last_hidden_state: 1 + M tokens",
                features="cls+mean",
            ),
        },
        mlp_width=_dinov2_mlp_width,
        notes=(
            "Backbone checkpoints (Dinov2Model) stay backbones; --task image-classification gives them a new "
            "classifier. Layer scale is per channel, so it is unaffected. Position embeddings are always "
            "interpolated to the image size, so N varies with it. A user-supplied attention_mask no longer fits "
            "after the merge."
        ),
    )
)

register(
    Family(
        name="dinov2_with_registers",
        display="DINOv2 with registers",
        model_types=("dinov2_with_registers",),
        example_id="facebook/dinov2-with-registers-small",
        modeling_module="transformers.models.dinov2_with_registers.modeling_dinov2_with_registers",
        config_module="transformers.models.dinov2_with_registers.configuration_dinov2_with_registers",
        config_class="Dinov2WithRegistersConfig",
        layer_class="Dinov2WithRegistersLayer",
        heads={
            "Dinov2WithRegistersForImageClassification": Head(
                "Dinov2WithRegistersForImageClassification",
                reads=(
                    "CLS ⊕ mean of tokens[1 + num_register_tokens:]: after the merge, CLS ⊕ mean of the M merged "
                    "tokens (the registers still sit in front of them)"
                ),
            ),
            "Dinov2WithRegistersModel": Head(
                "Dinov2WithRegistersModel",
                auto_class="AutoModel",
                reads="pooler_output = CLS after the final LayerNorm (unchanged); last_hidden_state: 1 + R + M",
                features="cls+mean",
            ),
        },
        prefix_tokens=("CLS", "registers"),
        mlp_width=_dinov2_mlp_width,
        notes=(
            "CLS and the register tokens bypass the merger. Backbone checkpoints stay backbones; --task "
            "image-classification gives them a new classifier. Position embeddings are always "
            "interpolated to the image size, so N varies with it."
        ),
    )
)


def _gated_mlp_width(config: PreTrainedConfig) -> float:
    """An MLP of width I costs 2·D·I MACs per token; a gated one (gate, up and down projections) 3·D·I."""
    return config.intermediate_size * (1.5 if config.use_gated_mlp else 1)


register(
    Family(
        name="dinov3_vit",
        display="DINOv3",
        model_types=("dinov3_vit",),
        example_id="facebook/dinov3-vits16-pretrain-lvd1689m",
        modeling_module="transformers.models.dinov3_vit.modeling_dinov3_vit",
        config_module="transformers.models.dinov3_vit.configuration_dinov3_vit",
        config_class="DINOv3ViTConfig",
        layer_class="DINOv3ViTLayer",
        heads={
            "DINOv3ViTModel": Head(
                "DINOv3ViTModel",
                auto_class="AutoModel",
                reads="pooler_output = CLS after the final LayerNorm (unchanged); last_hidden_state: 1 + R + M tokens",
                features="pooler",
            ),
        },
        prefix_tokens=("CLS", "registers"),
        mlp_width=_gated_mlp_width,
        rope="DINOv3ViTRopePositionEmbedding",
        shapes=_shapes("dinov3", "sbl", vit=True, num_register_tokens=4, layerscale_value=1e-5),
        notes=(
            "CLS and the register tokens bypass the merger. Positions enter only through RoPE, which rotates the "
            "patch tokens' queries and keys in every layer; the layers after the merge rotate each merged token at "
            "the merge-weighted mean of its patches' centres, per image (--rope-positions none: not at all, like "
            "CLS and the registers). RoPE follows the image size, so N varies with it without a flag. A "
            "checkpoint of a non-square image_size (a list) loads only on transformers releases whose DINOv3 takes "
            "one (5.25 does; 5.17 and older do not), the source as much as the export; its card says so."
        ),
    )
)

_CLIP_NOTES = (
    "Pre-LayerNorm (pre_layrnorm) runs before the layers, so the merger sees normalised-then-residual tokens like "
    "any layer does. interpolate_pos_encoding=True gives other image sizes."
)

register(
    Family(
        name="clip",
        square_sizes=True,
        display="CLIP",
        model_types=("clip",),
        example_id="openai/clip-vit-base-patch32",
        modeling_module="transformers.models.clip.modeling_clip",
        config_module="transformers.models.clip.configuration_clip",
        config_class="CLIPConfig",
        layer_class="CLIPEncoderLayer",
        heads={
            "CLIPModel": Head(
                "CLIPModel",
                auto_class="AutoModelForZeroShotImageClassification",
                layer_config="config.vision_config",
                reads="image embeddings = projection of the post-LayerNorm CLS (unchanged); text tower unchanged",
                features="image_embeds",
                encoder="vision_model",
                output_class="CLIPOutput",
                image_modules=("vision_model", "visual_projection"),
            ),
            "CLIPForImageClassification": Head(
                "CLIPForImageClassification",
                layer_config="config.vision_config",
                reads="mean of the tokens after CLS: after the merge, the mean of the M merged tokens",
            ),
        },
        notes=(
            "A full CLIPModel checkpoint stays a dual encoder: the vision tower is merged, the text tower, the "
            "projections and the logit scale are kept bit-exact, and zero-shot classification works as before. "
            "--task image-classification gives a CLIPForImageClassification (text tower dropped, new classifier: "
            "fine-tune it), --task image-feature-extraction the vision tower alone (CLIPVisionModel). " + _CLIP_NOTES
        ),
        tower="clip_vision",
        shapes=_dual_shapes("clip", "b", 32, hidden_act="quick_gelu"),
    )
)

register(
    Family(
        name="clip_vision",
        square_sizes=True,
        display="CLIP vision tower",
        model_types=("clip_vision_model",),
        example_id="openai/clip-vit-base-patch32",
        modeling_module="transformers.models.clip.modeling_clip",
        config_module="transformers.models.clip.configuration_clip",
        config_class="CLIPVisionConfig",
        layer_class="CLIPEncoderLayer",
        heads={
            "CLIPVisionModel": Head(
                "CLIPVisionModel",
                auto_class="AutoModel",
                reads="pooler_output = post-LayerNorm of CLS (unchanged); last_hidden_state has 1 + M tokens",
            ),
        },
        notes="Checkpoints saved from CLIPVisionModel (model type clip_vision_model). " + _CLIP_NOTES,
    )
)

register(
    Family(
        name="siglip",
        pooling_head=True,
        square_sizes=True,
        display="SigLIP",
        model_types=("siglip",),
        example_id="google/siglip-base-patch16-224",
        modeling_module="transformers.models.siglip.modeling_siglip",
        config_module="transformers.models.siglip.configuration_siglip",
        config_class="SiglipConfig",
        layer_class="SiglipEncoderLayer",
        heads={
            "SiglipModel": Head(
                "SiglipModel",
                auto_class="AutoModelForZeroShotImageClassification",
                layer_config="config.vision_config",
                reads="image embeddings = attention pooling over all tokens: after the merge, over the M merged "
                "tokens; text tower unchanged",
                features="image_embeds",
                encoder="vision_model",
                output_class="SiglipOutput",
                image_modules=("vision_model",),
            ),
            "SiglipForImageClassification": Head(
                "SiglipForImageClassification",
                layer_config="config.vision_config",
                reads="mean of all tokens: after the merge, the mean of the M merged tokens",
            ),
        },
        prefix_tokens=(),
        notes=(
            "No CLS token: every token is merged (zero prefix tokens). A full SiglipModel checkpoint stays a dual "
            "encoder (vision tower merged; text tower, logit scale and bias kept bit-exact); --task "
            "image-classification gives a SiglipForImageClassification (text tower dropped, new classifier), "
            "--task image-feature-extraction the vision tower alone (SiglipVisionModel). "
            "interpolate_pos_encoding=True gives other image sizes."
        ),
        tower="siglip_vision",
        shapes=_dual_shapes("siglip", "b", 16),
    )
)

register(
    Family(
        name="siglip_vision",
        pooling_head=True,
        square_sizes=True,
        display="SigLIP vision tower",
        model_types=("siglip_vision_model",),
        example_id="google/siglip-base-patch16-224",
        modeling_module="transformers.models.siglip.modeling_siglip",
        config_module="transformers.models.siglip.configuration_siglip",
        config_class="SiglipVisionConfig",
        layer_class="SiglipEncoderLayer",
        heads={
            "SiglipVisionModel": Head(
                "SiglipVisionModel",
                auto_class="AutoModel",
                reads="pooler_output = attention pooling over all tokens: after the merge, over the M merged tokens",
            ),
        },
        prefix_tokens=(),
        notes=(
            "Checkpoints saved from SiglipVisionModel (model type siglip_vision_model). No CLS token: every token is "
            "merged. interpolate_pos_encoding=True gives other image sizes."
        ),
    )
)

_SIGLIP2_NOTES = (
    "NaFlex: each image is a sequence of patches at its own aspect ratio (at most num_patches of them), a batch padded "
    "to one length with pixel_attention_mask. The merger merges each image's real patches only (padding gets no "
    "weight) into M tokens, so after layer K every image has M tokens and no padding; the attention pooling head "
    "reads all of them. No CLS token: every token is merged. retrofit trains, scores and times it on square images "
    "(the centre square of each, as max_num_patches patches); the export takes the processor's NaFlex inputs as the "
    "source does. SigLIP 2's fixed-resolution checkpoints (e.g. google/siglip2-base-patch16-224) are SiglipModel "
    "checkpoints and convert as SigLIP."
)

_SIGLIP2_TOWERS = ("Siglip2VisionModel", "Siglip2VisionTransformer")  # the second: older transformers releases

register(
    Family(
        name="siglip2",
        pooling_head=True,
        square_sizes=True,
        display="SigLIP 2",
        model_types=("siglip2",),
        example_id="google/siglip2-base-patch16-naflex",
        modeling_module="transformers.models.siglip2.modeling_siglip2",
        config_module="transformers.models.siglip2.configuration_siglip2",
        config_class="Siglip2Config",
        layer_class="Siglip2EncoderLayer",
        heads={
            "Siglip2Model": Head(
                "Siglip2Model",
                auto_class="AutoModelForZeroShotImageClassification",
                layer_config="config.vision_config",
                reads="image embeddings = attention pooling over the M merged tokens (no padding after the merge); "
                "text tower unchanged",
                features="image_embeds",
                encoder="vision_model",
                output_class="Siglip2Output",
                image_modules=("vision_model",),
            ),
            "Siglip2ForImageClassification": Head(
                "Siglip2ForImageClassification",
                layer_config="config.vision_config",
                reads="mean of each image's own tokens (pixel_attention_mask): after the merge, the mean of its M "
                "merged tokens",
            ),
        },
        prefix_tokens=(),
        padded_patches="Siglip2MultiheadAttentionPoolingHead",
        padded_patch_towers=_SIGLIP2_TOWERS,
        notes=(
            _SIGLIP2_NOTES + " A full Siglip2Model checkpoint stays a dual encoder (vision tower merged; text tower, "
            "logit scale and bias kept bit-exact); --task image-classification gives a Siglip2ForImageClassification "
            "(text tower dropped, new classifier), --task image-feature-extraction the vision tower alone "
            "(Siglip2VisionModel)."
        ),
        tower="siglip2_vision",
        # google/siglip2-base-patch16-naflex at 256 patches (256x256 square images)
        shapes={"siglip2-b16": {"vision_config": {**_shapes("siglip2", "b")["siglip2-b16"], "num_patches": 256}}},
    )
)

register(
    Family(
        name="siglip2_vision",
        pooling_head=True,
        square_sizes=True,
        display="SigLIP 2 vision tower",
        model_types=("siglip2_vision_model",),
        example_id="google/siglip2-base-patch16-naflex",
        modeling_module="transformers.models.siglip2.modeling_siglip2",
        config_module="transformers.models.siglip2.configuration_siglip2",
        config_class="Siglip2VisionConfig",
        layer_class="Siglip2EncoderLayer",
        heads={
            "Siglip2VisionModel": Head(
                "Siglip2VisionModel",
                auto_class="AutoModel",
                reads="pooler_output = attention pooling over the M merged tokens; last_hidden_state: M tokens per "
                "image, no padding",
            ),
        },
        prefix_tokens=(),
        padded_patches="Siglip2MultiheadAttentionPoolingHead",
        padded_patch_towers=_SIGLIP2_TOWERS,
        notes="Checkpoints saved from Siglip2VisionModel (model type siglip2_vision_model). " + _SIGLIP2_NOTES,
    )
)


_BEIT_NOTES = (
    "Each layer adds a learned relative position bias to its attention scores (per layer in the fine-tuned "
    "checkpoints, one shared by all layers in some pretrained ones). The layers after the merge give each pair of "
    "tokens the merge-weighted bias of the patches they average, per image (Tᵀ·bias·T): the source's own bias for a "
    "merged token that copies one patch. The classifier reads the LayerNorm of the mean of the tokens after CLS "
    "(use_mean_pooling, as published), or CLS. interpolate_pos_encoding=True gives other image sizes."
)


def _beit_family(name: str, display: str, example_id: str, prefix: str, module: str, backbone: Head,
                 shapes: dict[str, dict] | None = None) -> Family:  # fmt: skip
    """BEiT or Data2Vec-vision: the same model, whose code transformers keeps twice. `prefix` starts the class names
    (``Beit``), `module` is the modeling module under ``transformers.models``, `backbone` the base model's `Head`."""
    return Family(
        name=name,
        display=display,
        model_types=(name.replace("_", "-"),),
        example_id=example_id,
        modeling_module=f"transformers.models.{module}",
        config_module=f"transformers.models.{module.replace('modeling', 'configuration')}",
        config_class=f"{prefix}Config",
        layer_class=f"{prefix}Layer",
        heads={
            f"{prefix}ForImageClassification": Head(
                f"{prefix}ForImageClassification",
                reads=(
                    "LayerNorm of the mean of the tokens after CLS (use_mean_pooling): after the merge, of the M "
                    "merged tokens; without mean pooling, CLS after the final LayerNorm (unchanged)"
                ),
            ),
            backbone.class_name: backbone,
        },
        relative_position_bias=f"{prefix}RelativePositionBias",
        notes=_BEIT_NOTES,
        shapes=shapes or {},
    )


register(
    _beit_family(
        "beit", "BEiT", "microsoft/beit-base-patch16-224", "Beit", "beit.modeling_beit",
        Head("BeitModel", auto_class="AutoModel", features="pooler",
             reads="pooler_output as the classifier reads it (mean of the M merged tokens, or CLS); "
                   "last_hidden_state: 1 + M tokens"),
        # the fine-tuned classifiers: a relative position bias per layer, mean pooling
        _shapes("beit", "bl", use_relative_position_bias=True, use_mean_pooling=True, layer_scale_init_value=0.1),
    )
)  # fmt: skip
register(
    _beit_family(
        "data2vec_vision", "Data2Vec-vision", "facebook/data2vec-vision-base-ft1k", "Data2VecVision",
        "data2vec.modeling_data2vec_vision",
        # Data2VecVisionModel has no pooler by default: its users read the tokens
        Head("Data2VecVisionModel", auto_class="AutoModel", features="mean",
             reads="no pooler; last_hidden_state: 1 + M tokens (features: the mean of the M merged tokens, which "
                   "the classifier's mean pooling reads)"),
    )
)  # fmt: skip


register(
    Family(
        name="hierarchical",
        model_types=(
            "swin",
            "swinv2",
            "convnext",
            "convnextv2",
            "dinov3_convnext",
            "dinat",
            "focalnet",
            "hiera",
            "pvt",
            "pvt_v2",
            "cvt",
            "levit",
            "poolformer",
            "resnet",
            "regnet",
            "bit",
            "efficientnet",
            "mobilenet_v1",
            "mobilenet_v2",
            "mobilevit",
            "mobilevitv2",
            "swiftformer",
            "hgnet_v2",
            "textnet",
        ),
        display="hierarchical or convolutional",
        refusal=(
            "its stages work on a 2-D grid of patches that they downsample, so there is no single token sequence for "
            "a PatchMerger to merge"
        ),
    )
)


register(
    Family(
        name="timm",
        model_types=("timm_wrapper", "timm_backbone"),
        display="timm",
        refusal=(
            "transformers runs timm's own model code for it (TimmWrapper), and retrofit rewrites transformers' "
            "classes; convert a transformers checkpoint of the model instead (e.g. google/vit-base-patch16-224 for a "
            "ViT-B/16)"
        ),
    )
)


# The refusal to merge a retrofit export again (`family_for`, `surgery.check_merge`).
ALREADY_MERGED = (
    "this checkpoint already has a PatchMerger (it is a retrofit export); convert its source instead, or pass it to "
    "`retrofit finetune` to continue training it"
)


def supported_names() -> str:
    """'ViT, DeiT, ...': the families retrofit converts, for error messages."""
    return ", ".join(f.user_name for f in FAMILIES.values() if f.refusal is None)


def family_for(model_type: str) -> Family:
    """The family of a ``config.model_type``, or a one-line refusal naming the supported families."""
    for family in FAMILIES.values():
        if model_type in family.model_types:
            if family.refusal:
                raise RetrofitError(
                    f"model type '{model_type}' ({family.user_name}) cannot be merged: {family.refusal}; "
                    f"supported families: {supported_names()}"
                )
            return family
    if model_type.endswith(MERGED_SUFFIX):
        raise RetrofitError(ALREADY_MERGED)
    raise RetrofitError(
        f"model type '{model_type}' is not supported (no single token sequence retrofit knows how to merge); "
        f"supported families: {supported_names()}"
    )
