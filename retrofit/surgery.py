"""Surgery: insert a PatchMerger into a loaded transformers model, keeping every original weight bit-exact."""

from __future__ import annotations

import os

import torch
from transformers import PreTrainedConfig, PreTrainedModel

from .cost import check_merge_range, num_patches
from .errors import RetrofitError, shown, whole_number
from .families import ALREADY_MERGED, ROPE_POSITIONS, Family, Head, family_for
from .hub_code import load_classes
from .loading import family_and_head, is_merged, layer_config
from .naflex import take_images
from .provenance import SourceRecord, source_record


def encoder_layers(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """The model's encoder layers and their name, found by the family's layer class (`Family.layer_class`), wherever
    the installed transformers release keeps them (``vit.encoder.layer`` became ``vit.layers`` in 5.9), as the
    exported code finds them. In a dual encoder they are the vision tower's (`Head.encoder`), not the text tower's."""
    family, head = family_and_head(model.config)
    scope = model.get_submodule(head.encoder) if head.encoder else model
    for name, module in scope.named_modules():
        if (
            isinstance(module, torch.nn.ModuleList)
            and len(module)
            and all(any(cls.__name__ == family.layer_class for cls in type(layer).__mro__) for layer in module)
        ):
            return (f"{head.encoder}.{name}" if head.encoder else name), module
    raise RuntimeError(f"no {family.layer_class} layers in {type(model).__name__}")


def check_merge(
    config: PreTrainedConfig,
    after_layer: int,
    num_tokens: int,
    image_size: tuple[int, int] | None = None,
    *,
    rope_positions: str | None = None,
    names: tuple[str, str] = ("--after-layer", "--tokens"),
) -> tuple[Family, Head, int]:
    """Validate a merge setting against a source config; return (family, head, number of prefix tokens).

    `image_size` is the size the model is fed (see `loading.processor_image_size`); defaults to the config's.
    `rope_positions` (see `insert_patch_merger`) is only for families whose layers use RoPE. `names`: how an error
    names K and M (the options the user gave them with).
    """
    if is_merged(config):
        raise RetrofitError(ALREADY_MERGED)
    family, head = family_and_head(config)
    lc = layer_config(config, head)
    check_merge_range(after_layer, num_tokens, lc.num_hidden_layers, num_patches(lc, image_size),
                      after_name=names[0], tokens_name=names[1])  # fmt: skip
    if rope_positions is not None and rope_positions not in ROPE_POSITIONS:
        raise RetrofitError(f"unknown --rope-positions '{rope_positions}': use one of {', '.join(ROPE_POSITIONS)}")
    if rope_positions is not None and not family.rope:
        raise RetrofitError(
            f"--rope-positions is for models whose layers use RoPE (DINOv3); {family.user_name} has position "
            "embeddings instead: drop the option"
        )
    return family, head, family.num_prefix_tokens(lc)


def merged_config(
    model: PreTrainedModel,
    after_layer: int,
    num_tokens: int,
    *,
    source: str | SourceRecord | None = None,
    rope_positions: str | None = None,
    image_size: tuple[int, int] | None = None,
) -> PreTrainedConfig:
    """The config of `model` with the merge settings added, as the generated config class. `source` (default: the
    folder or Hub id `model` was loaded from) is recorded as `retrofit.provenance` says; `image_size` as in
    `check_merge`."""
    family, head, prefix = check_merge(model.config, after_layer, num_tokens, image_size, rope_positions=rope_positions)
    rope = {"merge_rope_positions": rope_positions or ROPE_POSITIONS[0]} if family.rope else {}
    classes = load_classes(family, head)
    values = model.config.to_dict()
    for key in ("model_type", "transformers_version", "auto_map", "custom_pipelines"):
        values.pop(key, None)
    config = classes.config_class.from_dict(
        {
            **values,
            "architectures": [classes.model_class.__name__],
            # saved with the model (with its code files): the folder loads without retrofit
            **({"auto_map": dict(classes.auto_map)} if classes.saves_code else {}),
            "merge_after_layer": after_layer,
            "merge_num_tokens": num_tokens,
            "merge_num_prefix_tokens": prefix,
            **_record(model, source).config_fields(),
            **rope,
        }
    )
    config._attn_implementation = model.config._attn_implementation
    return config


def _record(model: PreTrainedModel, source: str | SourceRecord | None) -> SourceRecord:
    if isinstance(source, SourceRecord):
        return source
    if source is not None and not isinstance(source, str | os.PathLike):  # a model object: OSError "name too long"
        raise RetrofitError(
            f"insert_patch_merger's source is the Hub id or folder the model was loaded from (the export records it), "
            f"not {shown(source)}"
        )
    return source_record(source or getattr(model.config, "_name_or_path", None) or None)


def insert_patch_merger(
    model: PreTrainedModel,
    after_layer: int,
    num_tokens: int,
    *,
    source: str | None = None,
    rope_positions: str | None = None,
    image_size: tuple[int, int] | None = None,
    seed: int | None = None,
) -> PreTrainedModel:
    """Return `model` with a PatchMerger before encoder layer `after_layer` (a new model object).

    The merged model shares its original parameters with `model` (no copy is made; train a separate copy if you
    still need the source). The merger is randomly initialised (see `retrofit.calibrate` for a data-driven start).
    For families whose layers use RoPE (DINOv3), `rope_positions` says where the merged tokens are rotated: "mean"
    (the default: at the merge-weighted mean of their patches' positions, per image) or "none" (not rotated).
    `source`: the Hub id or folder `model` was loaded from, which the export records (default: the model's own
    ``name_or_path``). `image_size`: the (height, width) the model will be fed (its processor's,
    `loading.processor_image_size`; default: the config's), which bounds `num_tokens` by its patch count. `seed`:
    the merger's random start is drawn from a generator of its own, seeded so (the same merger whatever else the
    process, or another thread, draws); None: from torch's global generator.

    Refused in one line (`RetrofitError`): anything but a loaded model, a class of the family retrofit does not
    convert (CLIPVisionModelWithProjection), a model that is already merged, and merge settings out of range
    (`check_merge`). A SigLIP 2 (NaFlex) model is returned with `naflex.take_images` on it (it takes images).
    """
    if not isinstance(model, PreTrainedModel):
        raise RetrofitError(
            f"insert_patch_merger takes a loaded model (retrofit.load_model), not {shown(model)}; or use "
            "retrofit.convert, which takes a Hub id or folder"
        )
    # 2.0 was a TypeError, True a "mismatch"; NumPy's become Python's: the config is saved as JSON
    after_layer = whole_number(after_layer, "insert_patch_merger's after_layer")
    num_tokens = whole_number(num_tokens, "insert_patch_merger's num_tokens")
    if seed is not None:
        from .settings import SEEDS

        seed = whole_number(seed, "insert_patch_merger's seed")
        if not SEEDS[0] <= seed < SEEDS[1]:
            raise RetrofitError(f"insert_patch_merger's seed must be in {SEEDS[2]} (or None), not {seed}")
    if not is_merged(model.config):
        family = family_for(model.config.model_type)
        if type(model).__name__ not in family.heads:  # a CLIPVisionModelWithProjection: a "surgery mismatch"
            raise RetrofitError(
                f"insert_patch_merger merges the {family.user_name} classes retrofit converts "
                f"({', '.join(family.heads)}), not a {type(model).__name__}; load the checkpoint with "
                "retrofit.load_model, which loads it as one of them"
            )
        if (model.config.architectures or [None])[0] != type(model).__name__:
            # A classifier loaded from a backbone or dual-encoder checkpoint (`ViTForImageClassification` from a
            # ViTModel's): merged as the class it is, as save_pretrained would name it, not as its checkpoint's
            model.config.architectures = [type(model).__name__]
    if image_size is not None:  # "48" was read as 4x8 pixels, (48,) failed with an IndexError
        from .cost import checked_image_size, size_pair

        patch = size_pair(layer_config(model.config, family_and_head(model.config)[1]).patch_size)
        image_size = checked_image_size(image_size, patch, "insert_patch_merger's image_size")
    record = _record(model, source)
    config = merged_config(  # validated
        model, after_layer, num_tokens, source=record, rope_positions=rope_positions, image_size=image_size
    )
    family, head = family_and_head(model.config)
    model_class = load_classes(family, head).model_class
    with torch.device("meta"):
        merged = model_class(config)
    state = model.state_dict()
    missing, unexpected = merged.load_state_dict(state, strict=False, assign=True)
    merger_prefix = f"{encoder_layers(merged)[0]}.{after_layer}.patch_merger."
    if unexpected or any(not key.startswith(merger_prefix) for key in missing):
        raise RuntimeError(f"surgery mismatch for {head.class_name}: missing={missing} unexpected={unexpected}")
    # Buffers that are not saved in the state dict (e.g. position ids) are taken from the source model.
    source_buffers = dict(model.named_buffers())
    for name, buffer in list(merged.named_buffers()):
        if buffer.is_meta:
            module_name, _, buffer_name = name.rpartition(".")
            merged.get_submodule(module_name)._buffers[buffer_name] = source_buffers[name]
    reference = next(model.parameters())
    merger = merged.patch_merger
    merger.to_empty(device=reference.device)
    generator = None if seed is None else torch.Generator(device=reference.device).manual_seed(seed)
    merger.reset_parameters(std=merged._merger_init_std(), generator=generator)
    merger.to(dtype=reference.dtype)
    merged.train(model.training)
    # transformers renames old checkpoint weights on load (`encoder.layer.N` -> `layers.N`, ...) and names them back
    # on save with the renamings it used, kept on the model. Keeping them makes the export carry the source
    # checkpoint's weight names, which older transformers releases can load.
    if hasattr(model, "_weight_conversions"):
        merged._weight_conversions = model._weight_conversions
    if not getattr(model, "_weight_conversions", None) and _is_vision_tower(family):
        # A vision tower saved by transformers >= 5.6 has no `vision_model.` in its weight names; releases before
        # 5.6 (which exports support) load such names as random weights, without an error. Saved with the prefix
        # that transformers strips on load, as towers saved by earlier releases are, every release loads the export.
        merged._weight_conversions = _prefix_conversions(model)
    merged.retrofit_source = record  # `export` notes where a local source lives, on this machine only
    return take_images(merged) if family.padded_patches else merged


def _is_vision_tower(family: Family) -> bool:
    """True for a dual encoder's vision tower family (CLIPVisionModel, SiglipVisionModel, ...)."""
    from .families import FAMILIES

    return any(other.tower == family.name for other in FAMILIES.values())


def _prefix_conversions(model: PreTrainedModel) -> list:
    """The renamings transformers applies to `model`'s class when it loads a checkpoint that names its weights with a
    prefix (``vision_model.``), as the model would have kept them had its checkpoint had that prefix; none where the
    installed release has no such renaming."""
    try:
        from transformers.conversion_mapping import extract_weight_conversions_for_model
        from transformers.core_model_loading import PrefixChange
    except ImportError:
        return []
    return [change for change in extract_weight_conversions_for_model(model) or [] if isinstance(change, PrefixChange)]
