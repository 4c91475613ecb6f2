"""Theoretical cost of a (merged) ViT: tokens seen by each layer and multiply-accumulates per image.

Per encoder layer with N tokens, width D and MLP width I: N·(4·D² + 2·D·I) + 2·N²·D MACs (projections, MLP,
attention scores and weighted sum; ≈ 12·N·D² + 2·N²·D for I = 4·D). A PatchMerger with N inputs and M outputs
adds 2·N·M·D (scores and weighted sum). Patch embedding: N·D·C·p². GFLOPs = 2 × MACs / 1e9. In families with a
relative position bias (BEiT), each layer after the merge merges a bias (T^T · bias · T, with S = P + N and Q = P + M
tokens): heads · Q · S · (S + Q), counted with the merger. SigLIP's attention pooling head (``vision_use_head``: its
image embeddings, computed by its classifier too) reads all T tokens after the last layer with one query:
2·T·D² + 2·D² + 2·T·D + 2·D·I.
"""

from __future__ import annotations

import numbers
from dataclasses import asdict, dataclass

from transformers import PreTrainedConfig

from .errors import RetrofitError, shown, whole_number
from .loading import family_and_head, image_channels, is_merged, layer_config
from .naflex import square_side


@dataclass(frozen=True)
class Cost:
    """Cost of one model on one image size."""

    tokens_per_layer: list[int]
    macs: float
    merger_macs: float = 0.0

    @property
    def gflops(self) -> float:
        return 2 * self.macs / 1e9

    def to_dict(self) -> dict:
        return {**asdict(self), "gflops": self.gflops}


def size_pair(value: int | list | tuple) -> tuple[int, int]:
    """A config's ``image_size`` or ``patch_size`` (one side, or a (height, width) pair) as (height, width)."""
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def image_size(config: PreTrainedConfig) -> tuple[int, int]:
    """The (height, width) of a (layer) config's images: its ``image_size``; a NaFlex config (SigLIP 2) has none, and
    retrofit feeds it squares of ``num_patches`` patches (`retrofit.naflex`)."""
    size = getattr(config, "image_size", None)
    if size is None:
        side = square_side(config.num_patches, config.patch_size)
        return side, side
    return size_pair(size)


def num_patches(config: PreTrainedConfig, image_size: int | tuple[int, int] | None = None) -> int:
    """Number of patch tokens for a (layer) config at its own or the given image size (a NaFlex config, SigLIP 2's,
    has no image size: at most ``num_patches`` patches per image, whatever its shape)."""
    if image_size is None and getattr(config, "image_size", None) is None:
        return int(config.num_patches)
    height, width = size_pair(image_size or config.image_size)
    patch_h, patch_w = size_pair(config.patch_size)
    return (height // patch_h) * (width // patch_w)


def layer_macs(tokens: int, hidden: int, intermediate: float) -> float:
    """MACs of one transformer layer on `tokens` tokens."""
    return tokens * (4 * hidden * hidden + 2 * hidden * intermediate) + 2 * tokens * tokens * hidden


def pooling_head_macs(tokens: int, hidden: int, intermediate: float) -> float:
    """MACs of an attention pooling head (SigLIP's) over `tokens` tokens: the keys and values of every token, the
    query and output projections of its one probe, its attention, and its MLP on the one pooled token."""
    return 2 * tokens * hidden * hidden + 2 * hidden * hidden + 2 * tokens * hidden + 2 * hidden * intermediate


def model_cost(
    config: PreTrainedConfig,
    image_size: int | tuple[int, int] | None = None,
    *,
    merge: tuple[int, int] | None = None,
) -> Cost:
    """Cost of the model a (source or merged) config describes; `image_size` defaults to the config's. `merge`
    (K, M) prices an unmerged config as if a PatchMerger were inserted before layer K with M tokens, without building
    the merged model (`retrofit sweep --dry-run`); a config already merged is priced as it is, and refuses `merge`."""
    if not isinstance(config, PreTrainedConfig):
        raise RetrofitError(f"model_cost takes a model's config (model.config, load_config), not {shown(config)}")
    family, head = family_and_head(config)
    lc = layer_config(config, head)
    patch_h, patch_w = size_pair(lc.patch_size)
    size = None if image_size is None else checked_image_size(image_size, (patch_h, patch_w))
    patches = num_patches(lc, size)
    if merge is not None and is_merged(config):  # it was priced as its source with this merge instead of its own
        raise RetrofitError(
            f"model_cost's merge prices a merge of an unmerged config, and this one is already merged (after layer "
            f"{config.merge_after_layer}, {config.merge_num_tokens} tokens): drop merge to price it as it is"
        )
    if merge is not None:
        merge = _checked_merge(merge, lc.num_hidden_layers, patches)
    elif is_merged(config):
        merge = (config.merge_after_layer, config.merge_num_tokens)
    hidden, intermediate, channels = lc.hidden_size, family.mlp_width(lc), image_channels(config)
    prefix = family.num_prefix_tokens(lc)
    tokens = patches + prefix
    macs = patches * hidden * channels * patch_h * patch_w
    merger_macs = 0.0
    seen = []
    biases = family.relative_position_biases(lc)
    full = prefix + patches
    for index in range(lc.num_hidden_layers):
        if merge is not None and index == merge[0]:
            merger_macs = 2 * patches * merge[1] * hidden
            tokens = prefix + merge[1]
        if merge is not None and index >= merge[0]:
            merger_macs += biases * lc.num_attention_heads * tokens * full * (full + tokens)
        seen.append(tokens)
        macs += layer_macs(tokens, hidden, intermediate)
    if family.pooling_head and getattr(lc, "vision_use_head", True):  # 5 % of a tiny SigLIP, 1.4 % of a base one
        macs += pooling_head_macs(tokens, hidden, intermediate)
    try:
        return Cost(tokens_per_layer=seen, macs=float(macs + merger_macs), merger_macs=float(merger_macs))
    except OverflowError:
        raise RetrofitError(f"model_cost's image_size {shown(image_size)} is too large to price") from None


def checked_image_size(image_size, patch: tuple[int, int], what: str = "model_cost's image_size") -> tuple[int, int]:
    """An `image_size` given to `model_cost` or `surgery.insert_patch_merger` (`what` names it in errors: a whole
    number or a (height, width) pair of them, NumPy's too) as a pair of ints, each at least the model's `patch` side;
    anything else is a one-line error (``"32"`` cost 1 token a layer)."""
    pair = isinstance(image_size, tuple | list) and len(image_size) == 2
    if not pair and (isinstance(image_size, bool) or not isinstance(image_size, numbers.Integral)):
        raise RetrofitError(f"{what} must be a whole number or a (height, width) pair of them, not {shown(image_size)}")
    sides = image_size if pair else (image_size, image_size)
    height, width = (whole_number(side, what) for side in sides)
    if height < patch[0] or width < patch[1]:
        raise RetrofitError(f"{what} {shown(image_size)} is smaller than the model's {patch[0]}x{patch[1]} patches")
    return height, width


def check_merge_range(
    after_layer: int,
    num_tokens: int,
    layers: int,
    patches: int,
    *,
    after_name: str = "--after-layer",
    tokens_name: str = "--tokens",
) -> None:
    """The one range check of a merge setting, K in 1..layers-1 and M in 1..patches-1, for `surgery.check_merge`
    (options' names) and `model_cost(merge=)` (its own); a model too small for any merge gets its own line."""
    if layers < 2:
        raise RetrofitError(
            f"this model has {layers} encoder layer{'s' * (layers != 1)}, and a merge needs at least one before and "
            "one after it: merge a deeper model"
        )
    if not 1 <= after_layer < layers:
        raise RetrofitError(
            f"{after_name} {shown(after_layer)} is out of range: this model has {layers} layers, so use 1..{layers - 1}"
        )
    if patches < 2:
        raise RetrofitError(
            f"the model has {patches} patch token{'s' * (patches != 1)} at its image size, so there is nothing to "
            "merge: feed it larger images (its image processor's size) or merge a model with smaller patches"
        )
    if not 1 <= num_tokens < patches:
        raise RetrofitError(
            f"{tokens_name} {shown(num_tokens)} is out of range: the model has {patches} patch tokens, so use "
            f"1..{patches - 1}"
        )


def _checked_merge(merge, layers: int, patches: int) -> tuple[int, int]:
    """`model_cost`'s `merge` as (K, M) ints in the range `check_merge_range` allows; anything else is a one-line
    error (a merge past the last layer was priced as none)."""
    if not (isinstance(merge, tuple | list) and len(merge) == 2):
        raise RetrofitError(f"model_cost's merge must be a pair (after_layer, num_tokens), not {shown(merge)}")
    after_layer = whole_number(merge[0], "model_cost's merge after_layer")
    num_tokens = whole_number(merge[1], "model_cost's merge num_tokens")
    check_merge_range(
        after_layer,
        num_tokens,
        layers,
        patches,
        after_name="model_cost's merge after_layer",
        tokens_name="model_cost's merge num_tokens",
    )
    return after_layer, num_tokens


def compare(before: Cost, after: Cost) -> str:
    """A Markdown table of tokens per layer and GFLOPs before/after, with the ratio."""
    layers = len(before.tokens_per_layer)
    lines = ["| layer | " + " | ".join(str(i) for i in range(layers)) + " |", "|---" * (layers + 1) + "|"]
    lines.append("| tokens before | " + " | ".join(map(str, before.tokens_per_layer)) + " |")
    lines.append("| tokens after | " + " | ".join(map(str, after.tokens_per_layer)) + " |")
    lines.append("")
    lines.append(
        f"GFLOPs per image: {before.gflops:.4g} -> {after.gflops:.4g} "
        f"({before.gflops / after.gflops:.3f}x fewer; merger {2 * after.merger_macs / 1e9:.2g})"
    )
    return "\n".join(lines)
