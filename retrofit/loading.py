"""Loading source checkpoints and retrofit exports, with every failure turned into a one-line `RetrofitError`."""

from __future__ import annotations

import copy
import json
import operator
import os
import pickle
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, PreTrainedConfig, PreTrainedModel

from .atomic import ASSETS, SHIPPED_NAME, TOKENIZER_FILES
from .errors import RetrofitError, brief, pickle_refused_quietly, shown
from .families import FAMILIES, MERGED_SUFFIX, TASKS, Family, Head, family_for
from .naflex import square_side, take_images

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # by `settings.DTYPE_NAMES`' names


def shipped_checkpoints() -> list[str]:
    """The ``retrofit:NAME`` sources shipped with retrofit (folders of ``retrofit/assets``)."""
    return [f"retrofit:{p.name}" for p in sorted(ASSETS.iterdir()) if p.is_dir() and SHIPPED_NAME.fullmatch(p.name)]


def resolve_source(source: str | Path) -> str:
    """``retrofit:NAME`` -> the checkpoint shipped in ``retrofit/assets/NAME`` (NAME is a name, not a path); a
    leading ``~`` -> the home folder (a Python call's "~/model", which no shell expanded, was read as a Hub id);
    anything else unchanged."""
    if not isinstance(source, str | os.PathLike):  # str() of a model object or None was read as a Hub id
        raise RetrofitError(f"a model is named by a Hub id, a folder or retrofit:NAME, not {shown(source)}")
    source = os.fspath(source)
    if not source.startswith("retrofit:"):
        return os.path.expanduser(source) if source.startswith("~") else source
    name = source.removeprefix("retrofit:")
    shipped = ", ".join(shipped_checkpoints()) or "none"
    if not SHIPPED_NAME.fullmatch(name) or ".." in name or not (ASSETS / name).is_dir():
        raise RetrofitError(
            f"there is no shipped checkpoint '{source}' (retrofit:NAME names one of: {shipped}); for a folder of "
            "your own, pass its path"
        )
    folder = ASSETS / name
    if not (folder / "config.json").is_file():
        raise RetrofitError(
            f"shipped checkpoint '{source}' is incomplete ({folder} has no config.json); reinstall retrofit, or "
            "rebuild it with its recipe (recipes/fashion-mnist-baseline-wide.yaml writes out/fashion-mnist-vit-wide)"
        )
    return str(folder)


def _source_error(source: str, exc: Exception) -> RetrofitError:
    text = str(exc)
    if isinstance(exc, pickle.UnpicklingError):
        return RetrofitError(
            f"the weights in '{source}' are a pickle that is not plain tensors, so loading them was refused (it could "
            "run code); use a checkpoint saved as safetensors, or re-save this one where you trust it"
        )
    if "no file named" in text.lower():
        return RetrofitError(
            f"'{source}' has no weights file ({brief(exc)}); copy the checkpoint's weights (model.safetensors) into "
            "it, or re-download or re-save the checkpoint"
        )
    if "safetensor" in text.lower() or "deserializ" in text.lower() or "header" in text.lower():
        return RetrofitError(
            f"the weights in '{source}' are corrupt or truncated ({brief(exc)}); re-download or re-save the checkpoint"
        )
    if Path(source).exists() or source.startswith((".", "/", "~")):
        return RetrofitError(
            f"cannot load '{source}': {brief(exc, 200)}; pass a folder holding config.json and weights"
        )
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:  # no network was tried: the cache lacks it
        return RetrofitError(
            f"'{source}' is neither a local folder nor a Hub model id in the cache, and HF_HUB_OFFLINE is set; "
            "unset HF_HUB_OFFLINE to download it, or check the path or id"
        )
    return RetrofitError(
        f"'{source}' is neither a local folder nor a reachable Hub model id ({brief(exc)}); "
        "check the path or id, your network, or log in with `hf auth login` for private models"
    )


def load_config(
    source: str | Path, *, trust_remote_code: bool = False, revision: str | None = None, task: str | None = None
) -> PreTrainedConfig:
    """The config of a local folder, Hub id or ``retrofit:NAME``. Remote code runs only if the user asked for it.

    `task` (``image-classification``, ``image-feature-extraction`` or ``zero-shot-image-classification``) picks the
    class the checkpoint is loaded as (see `for_task`); None keeps the checkpoint's own class where retrofit supports
    it.
    """
    source = resolve_source(source)
    local = Path(source).expanduser()
    if source.startswith((".", "/", "~")) and not local.exists():
        raise RetrofitError(f"'{source}' does not exist; pass an existing folder or a Hub model id")
    if local.exists():
        _check_local_config(source, local)
    export = False
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code, revision=revision)
    except ValueError as exc:
        if MERGED_SUFFIX in str(exc) or "trust_remote_code" in str(exc):
            export = True  # a retrofit export: its config class is ours, read below (its errors are handled there)
        elif local.is_dir():  # config.json is a JSON object (`_check_local_config`) that transformers refuses
            raise _local_config_error(source, local, exc) from None
        else:
            raise _source_error(source, exc) from None
    except OSError as exc:
        raise _source_error(source, exc) from None
    except ImportError as exc:  # a config class that needs a package (timm's TimmWrapperConfig needs timm)
        model_type = _raw_model_type(source, revision)
        if model_type:
            family_for(model_type)  # a refused family says why it is refused, whether or not the package is there
        raise RetrofitError(f"loading '{source}' needs a package that is not installed ({brief(exc)})") from None
    except Exception as exc:  # noqa: BLE001 - a field of the wrong type: TypeError, huggingface_hub's strict checks
        raise _config_error(source, local, exc) from None
    if export:
        config = _load_export_config(source, local, revision)
    else:
        config = _subclassed_classifier(config, local)
    config = for_task(config, task)
    check_config(config, f"'{source}/config.json'")
    return config


def _subclassed_classifier(config: PreTrainedConfig, folder: Path) -> PreTrainedConfig:
    """A local checkpoint saved from a user's subclass (``class MyViT(ViTForImageClassification)``: architectures
    ``["MyViT"]``, a class transformers does not define) whose weights hold the family's classifier, as that
    classifier class: it was scored by its features and its trained classifier called new. Otherwise (and for the
    dual-encoder families, whose subclass may hold a text tower: converted as before, with convert's note) `config`."""
    architectures = getattr(config, "architectures", None) or []
    if not architectures or any(_is_transformers_class(name) for name in architectures) or not folder.is_dir():
        return config
    try:
        heads = list(family_for(config.model_type).heads.values())
    except RetrofitError:  # an unsupported model type: refused where it is loaded, in its words
        return config
    if any(head.is_dual_encoder for head in heads):  # a CLIP of the user's may hold a text tower: converted as before
        return config
    shapes = _weight_shapes(folder)

    def held(head: Head) -> bool:  # the head's own linear classifier(s), one row per label (a shard index: by name)
        return all(
            f"{name}.bias" in shapes and shapes.get(f"{name}.weight", (0,))[:1] in ((), (config.num_labels,))
            for name in head.classifiers
        )

    # (DeiT's with-teacher head first: its two classifiers, where the plain head would miss them)
    classifiers = sorted((head for head in heads if head.is_classifier), key=lambda head: -len(head.classifiers))
    classifier = next((head for head in classifiers if head.classifiers and held(head)), None)
    if classifier is None:  # a head of the user's own (an MLP named classifier, another number of outputs)
        return config
    config = copy.deepcopy(config)
    config.architectures = [classifier.class_name]
    return config


def _is_transformers_class(name: str) -> bool:
    """Whether transformers defines a class `name` (ViTForMaskedImageModeling), not a user's subclass of one."""
    try:
        return isinstance(getattr(transformers, name, None), type)
    except Exception:  # noqa: BLE001 - a lazy import that fails: not a class this machine has
        return False


def _weight_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """The weight names of a local checkpoint's safetensors and their shapes (read from the file's header; () where a
    shard index names them alone); none for other formats."""
    from safetensors import safe_open

    try:
        if (folder / "model.safetensors").is_file():
            with safe_open(folder / "model.safetensors", framework="pt") as weights:
                return {name: tuple(weights.get_slice(name).get_shape()) for name in weights.keys()}
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            return dict.fromkeys(json.loads(index.read_text(encoding="utf-8"))["weight_map"], ())
    except Exception:  # noqa: BLE001 - unreadable weights: loading them says why, in one line
        pass
    return {}


def _check_local_config(source: str, folder: Path) -> None:
    """Refuse a local source that is not a folder holding a JSON object in config.json, in one line (transformers
    would fail on it with a traceback)."""
    if not folder.is_dir():
        raise RetrofitError(f"'{source}' is a file; pass the folder that holds config.json and the weights")
    try:
        raw = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RetrofitError(f"'{source}' has no config.json; pass a folder holding config.json and weights") from None
    except (OSError, ValueError) as exc:  # UnicodeDecodeError is a ValueError
        raise RetrofitError(f"'{source}/config.json' is not readable JSON ({brief(exc)}); fix or re-save it") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("model_type", ""), str):
        what = _json_kind(raw) if not isinstance(raw, dict) else "an object whose model_type is not text"
        raise RetrofitError(f"'{source}/config.json' holds {what}, not a model config; fix or re-save it")


def _config_error(source: str, local: Path, exc: Exception) -> RetrofitError:
    """The one line for a config.json whose fields its config class cannot read: a local folder's says which field
    (`_local_config_error`), a Hub checkpoint's quotes the library."""
    if local.is_dir():
        return _local_config_error(source, local, exc)
    return RetrofitError(f"'{source}/config.json' is not a valid config ({brief(exc)}); fix or re-save it")


def _local_config_error(source: str, folder: Path, exc: Exception) -> RetrofitError:
    """The one line for a local config.json that transformers refuses: no model type, an unknown one, or a field it
    cannot read (``id2label`` keys that are not numbers, a ``dtype`` torch does not have); "pass a folder holding
    config.json" would not help."""
    raw = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    model_type = raw.get("model_type")
    if not model_type:
        return RetrofitError(
            f"'{source}/config.json' has no model_type; add the checkpoint's (vit, deit, dinov2, clip, ...), or "
            "re-save it with transformers"
        )
    try:
        if not str(model_type).endswith(MERGED_SUFFIX):  # an export's type is known: it is one of its fields
            family_for(model_type)  # an unknown model type: say which families retrofit merges
    except RetrofitError as refusal:
        return refusal
    for key in ("dtype", "torch_dtype"):
        dtype = raw.get(key)
        if isinstance(dtype, str) and isinstance(exc, AttributeError) and f"'{dtype}'" in str(exc):
            return RetrofitError(
                f"'{source}/config.json': {key} {shown(dtype)} is not a torch dtype; make it float32, bfloat16 or "
                "float16, or remove it"
            )
    return RetrofitError(f"'{source}/config.json' is not a valid config ({brief(exc)}); fix or re-save it")


def check_config(config: PreTrainedConfig, where: str) -> None:
    """Refuse, in one line, a config whose sizes retrofit computes with are not positive whole numbers (a config.json
    edited by hand: ``patch_size: 0``, ``"num_hidden_layers": "two"``), or an export whose merge settings are not.
    Families retrofit does not convert are left to the family check."""
    try:
        family, head = family_and_head(config)
    except RetrofitError:
        return
    lc = layer_config(config, head)
    sizes = {
        name: getattr(lc, name, None)
        for name in ("image_size", "patch_size", "hidden_size", "num_hidden_layers", "num_attention_heads")
    }
    if family.padded_patches:  # NaFlex: no image size, at most num_patches patches per image
        sizes["num_patches"] = getattr(lc, "num_patches", None)
        sizes.pop("image_size")
    if hasattr(lc, "num_channels"):
        sizes["num_channels"] = lc.num_channels
    if getattr(lc, "intermediate_size", None) is not None:  # 0 built empty MLPs, which trained and saved (pretrain)
        sizes["intermediate_size"] = lc.intermediate_size
    if is_merged(config):
        sizes |= {name: getattr(config, name, None) for name in ("merge_after_layer", "merge_num_tokens")}
    for name, value in sizes.items():
        if family.square_sizes and name in ("image_size", "patch_size") and isinstance(value, list | tuple):
            # transformers fails to build the model with "unsupported operand type(s) for //: 'list' and 'int'"
            raise RetrofitError(
                f"{where}: {name} must be one whole number for {family.user_name} (its transformers class takes "
                f"square images and patches), not {value!r}; fix the config"
            )
        values = list(value) if isinstance(value, list | tuple) and len(value) == 2 else [value]
        if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values):
            raise RetrofitError(f"{where}: {name} must be a positive whole number, not {value!r}; fix the config")
        if any(v > MAX_SIZE for v in values):
            raise RetrofitError(f"{where}: {name} {value!r} is above what torch takes (2**63 - 1); fix the config")
    _check_probabilities(lc, where)
    _check_shapes(lc, sizes, where)
    for dtype in {id(c): getattr(c, "dtype", None) for c in (config, lc)}.values():
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            # transformers fails later with "'int' object has no attribute 'is_floating_point'" or "cannot be
            # instantiated under `dtype=torch.int8`"
            raise RetrofitError(
                f"{where}: dtype {str(dtype).removeprefix('torch.')!r} is not a floating-point type; make it "
                "float32, float16 or bfloat16 (the weights' type), or remove it"
            )
    prefix = getattr(config, "merge_num_prefix_tokens", 0) if is_merged(config) else 0
    if not isinstance(prefix, int) or isinstance(prefix, bool) or prefix < 0:
        raise RetrofitError(f"{where}: merge_num_prefix_tokens must be a whole number ≥ 0, not {prefix!r}")
    if is_merged(config) and config.merge_after_layer >= lc.num_hidden_layers:
        raise RetrofitError(
            f"{where}: merge_after_layer {config.merge_after_layer} is not below num_hidden_layers "
            f"{lc.num_hidden_layers}; fix the config"
        )


MAX_SIZE = 2**63 - 1  # the largest tensor dimension torch takes: above it torch raises TypeError, not a size error


def _check_probabilities(lc: PreTrainedConfig, where: str) -> None:
    """Refuse a dropout probability outside [0, 1] (``hidden_dropout_prob: 2`` raised ValueError from torch's Dropout
    when the model was built)."""
    for name, value in vars(lc).items():
        if not (name.endswith(("dropout", "dropout_prob", "drop_path_rate")) and isinstance(value, int | float)):
            continue
        if isinstance(value, bool) or not 0 <= value <= 1:
            raise RetrofitError(f"{where}: {name} must be a probability from 0 to 1, not {value!r}; fix the config")


def _check_shapes(lc: PreTrainedConfig, sizes: dict, where: str) -> None:
    """The checks of `check_config` that relate its sizes (all positive whole numbers by now), and the activation:
    what would otherwise fail inside the first forward pass, or when the model is built."""
    from transformers.activations import ACT2FN

    def pair(value) -> list[int]:  # (height, width): one number, or two
        return list(value) if isinstance(value, list | tuple) else [value, value]

    patch = pair(sizes["patch_size"])
    image = pair(sizes["image_size"]) if "image_size" in sizes else patch  # NaFlex: no image size
    if any(p > i for p, i in zip(patch, image, strict=True)):
        raise RetrofitError(
            f"{where}: patch_size {sizes['patch_size']} is larger than image_size {sizes['image_size']}; make it at "
            "most the image size"
        )
    if (image[0] // patch[0]) * (image[1] // patch[1]) >= MAX_SIZE:  # a TypeError from torch building the model
        raise RetrofitError(
            f"{where}: image_size {sizes['image_size']} makes more patches of patch_size {sizes['patch_size']} than "
            "torch takes in a tensor (2**63 - 1); make it smaller"
        )
    if getattr(lc, "head_dim", None) is None and sizes["hidden_size"] % sizes["num_attention_heads"]:
        raise RetrofitError(
            f"{where}: hidden_size {sizes['hidden_size']} is not a multiple of num_attention_heads "
            f"{sizes['num_attention_heads']}; change one of them"
        )
    act = getattr(lc, "hidden_act", None)
    if act is not None and not (isinstance(act, str) and act in ACT2FN):
        raise RetrofitError(
            f"{where}: hidden_act {act!r} is not an activation transformers knows; use one of: {', '.join(ACT2FN)}"
        )


def _raw_model_type(source: str, revision: str | None) -> str:
    """The model type in a checkpoint's config.json without building its config class ('' if unreadable).

    timm checkpoints have none: their config.json names an ``architecture``, which transformers loads as
    ``timm_wrapper``.
    """
    try:
        config_dict, _ = PreTrainedConfig.get_config_dict(source, revision=revision)
    except (OSError, ValueError):
        return ""
    return config_dict.get("model_type") or ("timm_wrapper" if "architecture" in config_dict else "")


def _article(task: str) -> str:
    """The article before a task's name: an image-classification, a zero-shot-image-classification model."""
    return "an" if task[0] in "aeiou" else "a"


def for_task(config: PreTrainedConfig, task: str | None) -> PreTrainedConfig:
    """The config that loads `config`'s checkpoint as a model for `task` (a copy; `config` is left as it is).

    ``image-classification`` picks the family's ...ForImageClassification class (a backbone checkpoint gets a new
    classifier), ``image-feature-extraction`` its backbone class (a classifier checkpoint loses its classifier; a
    full CLIP/SigLIP checkpoint gives its vision tower alone), ``zero-shot-image-classification`` its dual encoder
    (CLIP, SigLIP, SigLIP 2 only). An export can only be what it is; a task the family has no class for is refused
    in one line naming the classes retrofit converts.
    """
    if task is None:
        return config
    if task not in TASKS:
        raise RetrofitError(f"unknown task '{task}'; choose one of: {', '.join(TASKS)}")
    family, head = family_and_head(config)
    if head.pipeline_tag == task:
        return config
    if is_merged(config):
        raise RetrofitError(
            f"this export is {_article(head.pipeline_tag)} {head.pipeline_tag} model "
            f"({head.class_name} with a PatchMerger), not {task}; "
            f"drop --task, or convert its source with --task {task}"
        )
    for candidate in family.heads.values():
        if candidate.pipeline_tag == task:
            config = copy.deepcopy(config)
            config.architectures = [candidate.class_name]
            return config
    if family.tower and task == "image-feature-extraction":
        tower = copy.deepcopy(layer_config(config, head))
        tower.architectures = [next(iter(FAMILIES[family.tower].heads))]
        tower._name_or_path = config._name_or_path
        # A bf16 checkpoint's tower loads as bf16, like the checkpoint: the top-level dtype is the weights'
        # (save_pretrained writes it), a sub-config's can be stale (float32 in a checkpoint saved after `.half()`).
        if getattr(config, "dtype", None) is not None or getattr(tower, "dtype", None) is None:
            tower.dtype = config.dtype
        return tower
    classes = ", ".join(f"{h.class_name} ({h.pipeline_tag})" for h in family.heads.values())
    raise RetrofitError(
        f"{family.user_name} checkpoints cannot become {_article(task)} {task} model; retrofit converts: {classes}"
    )


def _load_export_config(source: str, local: Path, revision: str | None) -> PreTrainedConfig:
    """The config of a retrofit export, built from its dict by retrofit's own config class (no remote code); a field
    that class cannot read is one line, as for a source (a traceback from transformers before)."""
    config_dict, _ = PreTrainedConfig.get_config_dict(source, revision=revision)
    model_type = config_dict.get("model_type", "")
    if not model_type.endswith(MERGED_SUFFIX):
        raise RetrofitError(
            f"'{source}' needs custom code (model type '{model_type}'); if you trust it, pass --trust-remote-code to "
            "convert, finetune or evaluate (bench, sweep, export-onnx and run never run a checkpoint's own code)"
        )
    family, head = merged_family_and_head(config_dict)
    from .hub_code import load_classes

    try:
        return load_classes(family, head).config_class.from_pretrained(source, revision=revision)
    except Exception as exc:  # noqa: BLE001 - a field of the wrong type: ValueError, TypeError, AttributeError, ...
        raise _config_error(source, local, exc) from None


def merged_family_and_head(config: PreTrainedConfig | dict) -> tuple[Family, Head]:
    """The (family, head) of a retrofit export's config."""
    get = config.get if isinstance(config, dict) else lambda key, default=None: getattr(config, key, default)
    # Exports are typed `<family name>_patch_merger`; a family's name need not be one of its model types.
    stem = get("model_type", "").removesuffix(MERGED_SUFFIX)
    family = FAMILIES[stem] if stem in FAMILIES else family_for(stem)
    architectures = get("architectures") or []
    for head in family.heads.values():
        if architectures and architectures[0].replace("PatchMerger", "") == head.class_name:
            return family, head
    raise RetrofitError(f"cannot tell which {family.display_name} class this export is ({architectures}); re-export it")


def is_merged(config: PreTrainedConfig) -> bool:
    """True for the config of a model that already has a PatchMerger."""
    return config.model_type.endswith(MERGED_SUFFIX)


def is_dual_encoder(config: PreTrainedConfig) -> bool:
    """True for an image-text dual encoder (a CLIPModel/SiglipModel or its export); False for every other model,
    including models of families retrofit does not convert (refused elsewhere)."""
    try:
        return family_and_head(config)[1].is_dual_encoder
    except RetrofitError:
        return False


def classifier_is_new(saved: PreTrainedConfig, loaded: PreTrainedConfig) -> bool:
    """True if `loaded` (`saved`, possibly through `for_task`) is a classifier the checkpoint does not hold, so its
    head starts random: a backbone, or a full CLIP/SigLIP checkpoint, loaded for image classification."""
    if is_merged(saved):
        return False
    head = family_and_head(loaded)[1]
    architectures = getattr(saved, "architectures", None) or []
    return head.is_classifier and bool(architectures) and head.class_name not in architectures


def converted_as_other_class(saved: PreTrainedConfig, loaded: PreTrainedConfig) -> str | None:
    """What a reader must know when `loaded` (whatever the `--task`) is not the class `saved`'s checkpoint was saved
    as, because retrofit does not convert that class (ViTForMaskedImageModeling, CLIPVisionModelWithProjection, ...):
    the weights only that class has (a pretraining head, a projection) are not in the export. None otherwise."""
    if is_merged(saved):
        return None
    head = family_and_head(loaded)[1]
    saved_as = (getattr(saved, "architectures", None) or [None])[0]
    if not saved_as or saved_as in family_and_head(saved)[0].heads:
        return None
    return (
        f"the checkpoint is a {saved_as}, a class retrofit does not convert: it is converted as {head.class_name}, "
        f"without the weights only {saved_as} has"
    )


def trained_head_config(config: PreTrainedConfig) -> PreTrainedConfig:
    """The config to score `config`'s checkpoint with (`evaluate`, `sweep`): its own class (a full CLIP/SigLIP model
    is scored as a dual encoder), or, where that class would get a new random classifier (a checkpoint of a class
    retrofit does not load, such as ViTForMaskedImageModeling), its backbone (`for_task`), which is scored by its
    features. An unsupported model type is refused here, before any data is read."""
    family_and_head(config)  # "model type 'bert' is not supported ..."
    return for_task(config, "image-feature-extraction") if classifier_is_new(config, config) else config


def family_and_head(config: PreTrainedConfig) -> tuple[Family, Head]:
    """The (family, head) a source config will be loaded as: its own architecture if supported, else the first head
    (`for_task` sets the architecture to choose another)."""
    if is_merged(config):
        return merged_family_and_head(config)
    family = family_for(config.model_type)
    architectures = getattr(config, "architectures", None) or []
    for name in architectures:
        if name in family.heads:
            return family, family.heads[name]
    return family, next(iter(family.heads.values()))


def layer_config(config: PreTrainedConfig, head: Head) -> PreTrainedConfig:
    """The config the encoder layers are built from (``config`` itself, or e.g. ``config.vision_config``)."""
    path = head.layer_config.removeprefix("config").lstrip(".")
    return operator.attrgetter(path)(config) if path else config


def load_model(
    source: str | Path,
    *,
    config: PreTrainedConfig | None = None,
    trust_remote_code: bool = False,
    revision: str | None = None,
    dtype: str | torch.dtype | None = None,
    new_classifier_ok: bool = False,
    **kwargs,
) -> PreTrainedModel:
    """Load a supported source checkpoint or a retrofit export as a transformers model.

    A checkpoint saved as a classifier without its classifier's weights is refused in one line (scored, or used as a
    teacher, its random classifier gives numbers that mean nothing) unless `new_classifier_ok` (a merge to be trained
    with labels, a speed benchmark).

    Exports are loaded with retrofit's own generated classes, so no code from the folder is executed. `dtype`: None or
    ``"auto"`` (as stored), a floating-point `torch.dtype`, or its name as torch or ``retrofit bench --dtype`` spells
    it (``bfloat16``, ``bf16``, ...).
    """
    dtype = _load_dtype(dtype)
    source = resolve_source(source)
    config = config or load_config(source, trust_remote_code=trust_remote_code, revision=revision)
    family, head = family_and_head(config)
    if is_merged(config):
        from .hub_code import load_classes

        model_class = load_classes(family, head).model_class
    else:
        model_class = getattr(transformers, head.class_name)
    # Shapes that differ from config.json are refused below, in one line: transformers' own error points at a report
    # that its quieted log never shows.
    kwargs.setdefault("ignore_mismatched_sizes", True)
    _check_shard_index(source)
    try:
        with pickle_refused_quietly():
            model, info = model_class.from_pretrained(
                source, config=config, revision=revision, dtype=dtype, output_loading_info=True, **kwargs
            )
    except Exception as exc:  # noqa: BLE001 - OSError, SafetensorError, UnpicklingError, ...: the files are bad
        raise _source_error(source, exc) from exc
    _check_mismatched_weights(source, info.get("mismatched_keys") or ())
    _check_missing_weights(source, info["missing_keys"], head)
    if not new_classifier_ok:
        _check_classifier_weights(
            source, info["missing_keys"], head, trust_remote_code=trust_remote_code, revision=revision
        )
    return take_images(model) if family.padded_patches else model


def _load_dtype(dtype: str | torch.dtype | None) -> str | torch.dtype | None:
    """`load_model`'s `dtype` as transformers takes it; one line for one it cannot load in (transformers' own error,
    for ``bf16`` or an integer type, was reported as a bad checkpoint folder)."""
    from .settings import DTYPE_NAMES

    if dtype is None or dtype == "auto":
        return dtype
    named = dtype
    if isinstance(dtype, str):
        named = DTYPES.get(DTYPE_NAMES.get(dtype), getattr(torch, dtype, None))
    if isinstance(named, torch.dtype) and named.is_floating_point:
        return named
    shown_dtype = str(dtype).removeprefix("torch.") if isinstance(dtype, torch.dtype) else shown(dtype)
    raise RetrofitError(
        f"load_model: dtype {shown_dtype} is not a floating-point type to load weights in; pass fp32, bf16 or fp16 "
        "(torch.float32, torch.bfloat16, torch.float16), or None for the stored one"
    )


WEIGHT_FILES = (
    ("model.safetensors", "model.safetensors.index.json"),
    ("pytorch_model.bin", "pytorch_model.bin.index.json"),
)


def _check_shard_index(source: str) -> None:
    """Refuse, in one line, a local folder whose sharded weights' index (the file transformers reads, in its order:
    one weights file before an index) is not an index or names a shard the folder lacks; transformers fails on
    those with a bare KeyError, TypeError or JSON error."""
    folder = Path(source).expanduser()
    if not folder.is_dir():
        return
    for single, index_name in WEIGHT_FILES:
        if (folder / single).is_file():
            return
        index = folder / index_name
        if index.exists():
            break
    else:
        return
    try:
        raw = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # UnicodeDecodeError is a ValueError
        raw = exc
    weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        if isinstance(raw, Exception):
            what = brief(raw)
        elif not isinstance(raw, dict):
            what = f"it holds {_json_kind(raw)}"
        else:
            what = "its weight_map is not an object of weight names and file names"
        raise RetrofitError(f"'{index}' is not a shard index ({what}); re-download or re-save the checkpoint")
    lacking = sorted(name for name in set(weight_map.values()) if not (folder / name).is_file())
    if lacking:
        more = f" (and {len(lacking) - 1} more)" if len(lacking) > 1 else ""
        raise RetrofitError(
            f"'{source}' lacks {lacking[0]}{more}, a shard of the weights its {index_name} names; copy it into the "
            "folder, or re-download or re-save the checkpoint"
        )


def _check_mismatched_weights(source: str, mismatched) -> None:
    """Refuse, in one line, weights whose shapes are not the ones config.json gives (``num_labels`` edited, a
    config.json from another size of the model); each entry is (name, checkpoint shape, model shape)."""
    entries = sorted((tuple(entry) if isinstance(entry, tuple | list) else (entry,)) for entry in mismatched)
    if not entries:
        return
    first = entries[0]
    shapes = f" is {list(first[1])} in the weights but {list(first[2])} by config.json" if len(first) >= 3 else ""
    more = f" (and {len(entries) - 1} more)" if len(entries) > 1 else ""
    raise RetrofitError(
        f"the weights in '{source}' do not match its config.json: {first[0]}{shapes}{more}; fix config.json "
        "(num_labels, hidden_size, ...) to match the weights, or re-download or re-save the checkpoint"
    )


def _check_missing_weights(source: str, missing, head: Head) -> None:
    """Refuse, in one line, weights that leave part of the backbone random (a layer missing from the file, a
    config.json with more layers than the weights). A new task head is expected (a backbone checkpoint loaded as a
    classifier, a classifier's as a backbone): the classifier(s) and a pooler may be missing. transformers leaves
    out of `missing` the keys a model may lack (non-persistent buffers, its ``_keys_to_ignore_on_load_missing``)."""
    new_head = _classifier_prefixes(head)
    lacking = sorted(key for key in missing if not key.startswith(new_head) and ".pooler." not in f".{key}")
    if lacking:
        names = ", ".join(lacking[:2]) + (", ..." if len(lacking) > 2 else "")
        raise RetrofitError(
            f"'{source}' lacks {len(lacking)} of the model's weights ({names}), which would start random; re-download "
            "or re-save the checkpoint, or fix its config.json (num_hidden_layers, ...) to match its weights"
        )


def _check_classifier_weights(source: str, missing, head: Head, **load) -> None:
    """Refuse, in one line, a checkpoint saved as this classifier without its classifier's weights: scored, or used as
    a teacher, its random classifier gives numbers that mean nothing. A checkpoint saved as a backbone may lack them
    (its new head is what the caller trains)."""
    absent = sorted(key for key in missing if key.startswith(_classifier_prefixes(head)))
    if not head.is_classifier or not absent:
        return
    saved = load_config(source, **load)
    if is_merged(saved) or head.class_name in (getattr(saved, "architectures", None) or []):  # saved with one
        raise RetrofitError(
            f"'{source}' is a {head.class_name} checkpoint without its classifier's weights ({', '.join(absent)}), so "
            "the classifier would start random and its scores mean nothing; re-save the checkpoint with its "
            "classifier, or load it as a backbone (--task image-feature-extraction)"
        )


def _classifier_prefixes(head: Head) -> tuple[str, ...]:
    """The weight-name prefixes of `head`'s classifier(s) (``classifier.``)."""
    return tuple(f"{name}." for name in head.classifiers)


def load_image_processor(source: str | Path, config: PreTrainedConfig, *, revision: str | None = None, log=print):
    """The source's image processor; if it has none, a ViT-style one for the config's image size (and a warning).

    Some processors (DINOv3's) exist only for torchvision; without it, a PIL ViT processor with the same settings
    prepares the images (a warning says so), and exports still get the source's own processor config
    (`save_image_processor`).
    """
    from transformers import AutoImageProcessor, ViTImageProcessor

    resolved = resolve_source(source)
    local = Path(resolved).expanduser() / "preprocessor_config.json"
    if local.exists():
        try:
            settings = json.loads(local.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            settings = exc
        if not isinstance(settings, dict):
            what = brief(settings) if isinstance(settings, Exception) else f"holds {_json_kind(settings)}"
            raise RetrofitError(
                f"'{local}' is not an image processor config ({what}); fix it, or delete it to use a default one"
            )
    try:  # never the source's own code (an auto_map): transformers would ask on stdin whether to run it
        processor = AutoImageProcessor.from_pretrained(resolved, revision=revision, trust_remote_code=False)
    except ImportError as exc:
        if "torchvision" not in str(exc).lower():
            raise
        processor = _pil_processor(source, revision=revision, log=log)
    except (OSError, ValueError) as exc:
        own = _own_processor_code(Path(resolved).expanduser())
        if own or "trust_remote_code" in str(exc):  # a class only the source's code defines
            raise RetrofitError(
                f"the image processor of '{source}' is custom code of its own (auto_map in {own or 'its config'}), "
                "which retrofit does not run; give it a transformers image processor (image_processor_type, e.g. "
                "ViTImageProcessor)"
            ) from None
        _, head = family_and_head(config)
        from .cost import image_size  # cost imports this module

        height, width = image_size(layer_config(config, head))
        log(f"warning: '{source}' has no image processor; using resize to {height}x{width} and mean=std=0.5")
        return ViTImageProcessor(size={"height": height, "width": width}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    except Exception as exc:  # noqa: BLE001 - a field of the wrong type in the processor config
        raise RetrofitError(
            f"the image processor of '{source}' cannot be loaded ({brief(exc)}); fix its preprocessor_config.json"
        ) from None
    if getattr(processor, "auto_map", None):  # code outside transformers (another repo's): an export must not name it
        log(f"warning: '{source}''s image processor names custom code ({processor.auto_map}); retrofit uses "
            f"transformers' {type(processor).__name__} and exports do not name that code")  # fmt: skip
        del processor.auto_map
    size = processor_image_size(processor)
    if size is not None and min(size) < 1:
        raise RetrofitError(
            f"the image processor of '{source}' gives images of {size[0]}×{size[1]} pixels; fix the size (or "
            "crop_size) in its preprocessor_config.json"
        )
    return processor


def _own_processor_code(folder: Path) -> str | None:
    """The processor config file of a local source that names image-processor code of the source's own (an
    ``auto_map``, or a class transformers lacks, at its top or in a processor's ``image_processor``), or None."""
    for name in ("preprocessor_config.json", "processor_config.json"):
        try:
            settings = json.loads((folder / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        nested = settings.get("image_processor") if isinstance(settings, dict) else None
        for part in (settings, nested):
            if not isinstance(part, dict):
                continue
            kind = part.get("image_processor_type")
            if "auto_map" in part or (isinstance(kind, str) and not _is_transformers_class(kind)):
                return name
    return None


# The card's note on a dual encoder exported without a tokenizer (`load_tokenizer` returned None): its usage examples
# embed text, and a user reading them would not see the warning that went to the log.
NO_TOKENIZER_NOTE = (
    "no tokenizer: the source had no usable one, so this folder has none; copy the source's tokenizer files into it "
    "before zero-shot use (the pipeline and `processor(text=...)` below need them)"
)
# the words of the card's note on a classifier `convert` added to a checkpoint without one (`has_untrained_classifier`)
UNTRAINED_CLASSIFIER = "outputs are random until it is trained"


def card_says(folder: str | Path, words: str) -> bool:
    """Whether the model card (README.md) in `folder` holds `words`, one of the notes retrofit writes into it
    (`NO_TOKENIZER_NOTE`, `UNTRAINED_CLASSIFIER`); False where there is none to read."""
    readme = Path(folder).expanduser() / "README.md"
    try:
        return readme.is_file() and words in readme.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False


def has_untrained_classifier(spec: str) -> bool:
    """Whether `spec` is an export whose card (retrofit's) says that its classifier was never trained: `convert`
    gave a backbone or dual-encoder checkpoint a classifier, whose scores are chance until `finetune` trains it."""
    return card_says(spec, UNTRAINED_CLASSIFIER)


def load_tokenizer(source: str | Path, config: PreTrainedConfig, *, revision: str | None = None, log=print):
    """A dual encoder's text tokenizer (CLIP's BPE, SigLIP's sentencepiece), which zero-shot classification and the
    export's ``zero-shot-image-classification`` pipeline need; None for other models, or (with a warning) for a dual
    encoder checkpoint that has none."""
    from transformers import AutoTokenizer, PreTrainedConfig

    if not family_and_head(config)[1].is_dual_encoder:
        return None
    # An export's tokenizer_config.json names its class; a blank config keeps AutoTokenizer from reading the export's
    # config.json, whose auto_map would ask to run the bundled code.
    blank = {"config": PreTrainedConfig()} if is_merged(config) else {}
    folder = Path(resolve_source(source))
    if folder.is_dir() and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        # transformers would build a tokenizer of 2 tokens from config.json alone: every prompt the same, every class
        # tied in zero-shot scores
        log(f"warning: '{source}' has no tokenizer files; the export will not run zero-shot classification until "
            "its tokenizer files are added")  # fmt: skip
        return None
    try:
        return AutoTokenizer.from_pretrained(  # never the source's own code (see load_image_processor)
            resolve_source(source), revision=revision, trust_remote_code=False, **blank
        )
    except (OSError, ValueError, ImportError) as exc:
        log(f"warning: '{source}' has no usable tokenizer ({brief(exc)}); the export will not run zero-shot "
            "classification until its tokenizer files are added")  # fmt: skip
        return None


def _json_kind(value) -> str:
    """How a message names a JSON value's type: null, a list, text, a number, ..."""
    if value is None:
        return "null"
    return {list: "a list", str: "text", bool: "true or false", int: "a number", float: "a number"}.get(
        type(value), f"a {type(value).__name__}"
    )


_STOOD_IN: set[str] = set()  # sources whose processor `_pil_processor` has warned about


def _pil_processor(source: str | Path, *, revision: str | None, log):
    """A PIL `ViTImageProcessorPil` with the settings of `source`'s torchvision-only processor."""
    from transformers import ViTImageProcessorPil
    from transformers.image_processing_utils import ImageProcessingMixin

    settings, _ = ImageProcessingMixin.get_image_processor_dict(resolve_source(source), revision=revision)
    kind = settings.get("image_processor_type", "its image processor")
    if str(source) not in _STOOD_IN:  # once per source, though a run loads its processor more than once
        _STOOD_IN.add(str(source))
        log(
            f"warning: '{source}' uses {kind}, which needs torchvision (not installed); preparing images with a PIL "
            "ViT processor with the same settings (pip install torchvision for the original)"
        )
    names = ("image_processor_type", "processor_class")
    processor = ViTImageProcessorPil(**{k: v for k, v in settings.items() if v is not None and k not in names})
    processor.retrofit_source_settings = {k: v for k, v in settings.items() if k != "auto_map"}  # what exports save
    return processor


def save_image_processor(processor, folder: Path) -> None:
    """Save `processor` into `folder`; a stand-in for a torchvision-only processor saves the source's settings."""
    settings = getattr(processor, "retrofit_source_settings", None)
    if settings is None:
        processor.save_pretrained(folder)
    else:
        (Path(folder) / "preprocessor_config.json").write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")


def processor_image_size(processor) -> tuple[int, int] | None:
    """The (height, width) of the images the processor hands the model: its crop size if it crops, else its size.

    DINOv2 checkpoints, for one, say ``image_size: 518`` in their config but are fed 224x224 crops; costs and token
    limits must use what the model really sees.
    """
    crop = getattr(processor, "crop_size", None)
    patches, patch = getattr(processor, "max_num_patches", None), getattr(processor, "patch_size", None)
    if patches and patch:  # NaFlex (SigLIP 2): retrofit feeds it squares of as many patches (`retrofit.naflex`)
        side = square_side(patches, patch)
        return side, side
    if getattr(processor, "do_center_crop", False) and crop and "height" in crop:
        return int(crop["height"]), int(crop["width"])
    size = getattr(processor, "size", None) or {}
    if "height" in size and "width" in size:
        return int(size["height"]), int(size["width"])
    if "shortest_edge" in size:
        return int(size["shortest_edge"]), int(size["shortest_edge"])
    return None


def in_model_dtype(pixels: torch.Tensor, model: torch.nn.Module) -> torch.Tensor:
    """`pixels` in the floating dtype of `model`'s weights, as transformers' pipelines feed a model: a bf16 or fp16
    BEiT does not cast its input itself ("Input type (float) and bias type (c10::BFloat16)")."""
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), pixels.dtype)
    return pixels.to(dtype) if pixels.is_floating_point() else pixels


def image_channels(config: PreTrainedConfig) -> int:
    """How many channels the images of a (source or merged) config's model have: its layer config's ``num_channels``
    (a dual encoder's is in its vision config), 3 where it has none."""
    return getattr(layer_config(config, family_and_head(config)[1]), "num_channels", 3)


def blank_images(model: PreTrainedModel, image_size: tuple[int, int]) -> torch.Tensor:
    """One blank image of `image_size` with the model's channels and dtype."""
    return torch.zeros(1, image_channels(model.config), *image_size, dtype=model.dtype)


def check_runs_on_its_images(model: PreTrainedModel, processor, source: str | Path) -> None:
    """Refuse, in one line and before any work is written, a model that cannot run on the images its image processor
    gives (a preprocessor_config.json whose size is not the config's image_size, say): one blank image through it.
    Every command that loads a model with its processor calls this."""
    size = processor_image_size(processor)
    if size is None:  # a processor that keeps each image's own size: nothing to try
        return
    dual_source = is_dual_encoder(model.config) and not is_merged(model.config)  # CLIPModel: no text, no forward
    run = model.get_image_features if dual_source else model
    try:
        with torch.no_grad():
            run(pixel_values=blank_images(model, size))
    except Exception as exc:  # noqa: BLE001 - any failure here would end the command later, with a traceback
        raise RetrofitError(
            f"'{source}' cannot run on the {size[0]}×{size[1]} images its image processor gives ({brief(exc, 120)}); "
            "fix its preprocessor_config.json or config.json so that they agree"
        ) from None
