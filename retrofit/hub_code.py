"""The exported modeling code: rendered per family from `templates/`, written into exports, imported in-process.

The in-memory merged model retrofit trains and the model users load from the Hub with ``trust_remote_code=True``
are instances of the very same generated classes, so what is measured here is what gets published.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import inspect
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from string import Template

import transformers

from . import __version__
from .families import Family, Head
from .merger import PatchMerger

TEMPLATES = Path(__file__).parent / "templates"
# The oldest transformers release the exported code supports; `make test` reloads every family's export with it
# (Makefile `OLDEST_TRANSFORMERS`). retrofit itself needs a newer one (pyproject.toml).
OLDEST_TRANSFORMERS = "5.0.0"


@dataclass(frozen=True)
class MergedClasses:
    """The generated classes for one (family, head) and the files that define them."""

    config_class: type
    model_class: type
    files: dict[str, str]
    auto_map: dict[str, str]


# Rendered into the merged layers of every family: the mask built for the P + N input tokens is dropped.
MASKS = """
        # The encoder passes its mask positionally or by keyword, depending on the transformers release: drop it
        # either way (the layer's other positional arguments, where it has any, are masks as well).
        args = (None,) * len(args)
        kwargs = {name: None if name.endswith("mask") else value for name, value in kwargs.items()}"""

# Rendered into the merged layers of RoPE families (`Family.rope`), after the masks are dropped.
ROPE = """
        # RoPE: transformers rotates the last N tokens by the rotation of the N patches it is given. Unmerged tokens
        # (P + N, e.g. with the merger replaced by the identity) keep it, as in the source model. Merged tokens get
        # the rotation layer K gave them (`merge_rope_positions="mean"`), or none, as the prefix tokens get none.
        rotation = kwargs["position_embeddings"]
        cos, sin = rotation
        if hidden_states.shape[-2] != self.num_prefix_tokens + cos.shape[-2]:
            kwargs["position_embeddings"] = getattr(rotation, "merged", None) or (cos[..., :0, :], sin[..., :0, :])"""

ROPE_DOC = """

The layers rotate the patch tokens' queries and keys by the patches' positions (RoPE). With
`config.merge_rope_positions == "mean"` the RoPE module also says where the patches are ([`PatchRotation`]), and
layer K places each merged token at the merge-weighted mean of its patches' centres, for every image
([`place_merged_tokens`]); with `"none"` merged tokens are not rotated, like the prefix tokens."""

ROPE_INSERT = """
    if config.merge_rope_positions == "mean":
        rotate_merged_tokens(model)
    elif config.merge_rope_positions != "none":
        raise ValueError(f"merge_rope_positions must be 'mean' or 'none', got {config.merge_rope_positions!r}")"""

ROPE_CONFIG_DOC = """
        merge_rope_positions (`str`, *optional*, defaults to `"none"`):
            Where the layers after the merge place the merged tokens for RoPE. `"mean"`: each merged token is rotated
            at the merge-weighted mean of the centres of the patches it averages, computed for every image. `"none"`:
            merged tokens are not rotated (they attend by content, as the CLS and register tokens do); exports made
            before this setting existed work this way."""

# Rendered into the merged layers of families with a relative position bias (`Family.relative_position_bias`).
BIAS_MASKS = """
        # The merge of this forward pass (T, None if not merged) gives the merged tokens their bias: the layer's own,
        # and one shared by all layers (`use_shared_relative_position_bias`), which arrives for the P + N input tokens
        # as `relative_position_bias` or inside `attention_mask`, depending on the transformers release. Any other
        # mask does not fit the merged tokens and is dropped, as in every family.
        transform = self.merged_positions.transform(kwargs.get("resolution"))
        args = (None,) * len(args)
        kwargs = {name: merged_layer_argument(name, value, transform) for name, value in kwargs.items()}
        for module in self.modules():
            if isinstance(module, ${bias_class}ForMergedTokens):
                module.merge_transform = transform  # for this call: super().forward asks it for the layer's bias"""

BIAS_IMPORT = "from transformers.utils import is_torchdynamo_compiling"

BIAS_DOC = """

The layers add a learned relative position bias to their attention scores. Layer K records each image's merge
weights ([`place_merged_tokens`]), and the layers after it give the merged tokens the merge-weighted bias of the
patches they average ([`MergedTokenPositions`]): exact for a merged token that copies one patch, and the source
model's own bias with the merger bypassed."""

BIAS_INSERT = """
    give_merged_tokens_positions(model, list(layers[k:]), config.merge_num_prefix_tokens)"""


def _names(family: Family, head: Head) -> dict[str, str]:
    prefix = family.display_name
    model_class = head.class_name
    if model_class.startswith(prefix):
        model_class = f"{prefix}PatchMerger{model_class[len(prefix) :]}"
    else:
        model_class = f"PatchMerger{model_class}"
    stem = f"{family.name}_patch_merger"
    return {
        "model_type": stem,
        "config_class": f"{prefix}PatchMergerConfig",
        "model_class": model_class,
        "layer_class": f"{family.layer_class}OnMergedTokens",
        "config_module_name": f"configuration_{stem}",
        "modeling_module_name": f"modeling_{stem}",
    }


def base_head(family: Family, head: Head) -> Head | None:
    """The family's backbone class of a classifier with the same config (ViTModel for ViTForImageClassification):
    the export of the classifier also loads as it with `AutoModel`, as the source checkpoint does."""
    if not head.is_classifier:
        return None
    return next((other for other in family.heads.values() if not other.is_classifier), None)


def render(family: Family, head: Head) -> tuple[dict[str, str], dict[str, str]]:
    """The generated source files (name -> text) and the ``auto_map`` for a family's head class (and, for a
    classifier, for its family's backbone class, which `AutoModel` loads the same export as)."""
    names = _names(family, head)
    heads = [head] + [base for base in [base_head(family, head)] if base is not None]
    merged_classes = {each.class_name: _names(family, each)["model_class"] for each in heads}  # source -> merged
    model_class_template = Template((TEMPLATES / "model_class.py.tmpl").read_text())
    classes = [
        model_class_template.substitute(
            model_class=merged,
            source_model_class=source,
            config_class=names["config_class"],
            layer_config=head.layer_config,
        )
        for source, merged in merged_classes.items()
    ]
    values = {
        **names,
        "retrofit_version": __version__,
        "oldest_transformers": OLDEST_TRANSFORMERS,
        "config_module": family.config_module,
        "modeling_module": family.modeling_module,
        "source_config_class": family.config_class,
        "source_model_type": getattr(transformers, family.config_class).model_type,
        "source_model_class": head.class_name,
        "source_layer_class": family.layer_class,
        "layer_config": head.layer_config,
        "merger_source": inspect.getsource(PatchMerger).rstrip(),
        **_positions_values(family),
        "source_imports": "\n".join(
            f"    {name}," for name in [family.layer_class, *merged_classes, *_position_imports(family)]
        ),
        "model_classes": "\n".join(classes),
        "all_model_classes": "\n".join(f'    "{merged}",' for merged in merged_classes.values()),
    }
    files = {
        f"{names[module]}.py": Template((TEMPLATES / template).read_text()).substitute(values)
        for module, template in (
            ("config_module_name", "configuration.py.tmpl"),
            ("modeling_module_name", "modeling.py.tmpl"),
        )
    }
    auto_map = {"AutoConfig": f"{names['config_module_name']}.{names['config_class']}"}
    for each in heads:
        auto_map[each.auto_class] = f"{names['modeling_module_name']}.{merged_classes[each.class_name]}"
    return files, auto_map


def _position_imports(family: Family) -> list[str]:
    if family.rope:
        return [family.rope, "get_patches_center_coordinates"]
    return [family.relative_position_bias] if family.relative_position_bias else []


def _positions_values(family: Family) -> dict[str, str]:
    """The template values that say where the merged tokens are, for families whose layers use the patches'
    positions: RoPE (`Family.rope`) or a relative position bias (`Family.relative_position_bias`)."""
    values = {
        "imports": "import torch\nfrom torch import nn",
        "positions_code": "",
        "merge_call": "self.patch_merger(hidden_states)",
        "masks": MASKS,
        "positions": "",
        "positions_doc": "",
        "positions_insert": "",
        "layer_arguments": "",
        "rope_config_doc": "",
        "rope_config_field": "",
    }
    if family.rope:
        rope_code = Template((TEMPLATES / "rope.py.tmpl").read_text()).substitute(rope_class=family.rope)
        values |= {
            "imports": "import math\n\nimport torch\nfrom torch import nn",
            "positions_code": "\n" + rope_code.rstrip(),
            "merge_call": 'place_merged_tokens(self.patch_merger, hidden_states, kwargs["position_embeddings"])',
            "positions": ROPE,
            "positions_doc": ROPE_DOC,
            "positions_insert": ROPE_INSERT,
            "rope_config_doc": ROPE_CONFIG_DOC,
            "rope_config_field": '\n    merge_rope_positions: str = "none"',
        }
    elif family.relative_position_bias:
        bias_code = Template((TEMPLATES / "relative_position_bias.py.tmpl").read_text()).substitute(
            bias_class=family.relative_position_bias, source_layer_class=family.layer_class
        )
        values |= {
            "imports": "\n".join(["import inspect", "", "import torch", "from torch import nn", BIAS_IMPORT]),
            "positions_code": "\n" + bias_code.rstrip(),
            "merge_call": (
                "place_merged_tokens(\n"
                '                self.patch_merger, hidden_states, self.merged_positions, kwargs.get("resolution")\n'
                "            )"
            ),
            "masks": Template(BIAS_MASKS).substitute(bias_class=family.relative_position_bias),
            "positions_doc": BIAS_DOC,
            "positions_insert": BIAS_INSERT,
            "layer_arguments": "\n            **source_layer_arguments(layers[index]),",
        }
    return values


class _GeneratedCode(importlib.abc.SourceLoader):
    """Imports the rendered files of one package from memory: nothing is written to disk (so nothing is left behind
    by a killed run), and `inspect.getsource` and tracebacks still show the code (through `get_source`)."""

    def __init__(self, package: str, files: dict[str, str]) -> None:
        self.package, self.files = package, files

    def find_spec(self, fullname: str, path=None, target=None):
        name = fullname.removeprefix(f"{self.package}.")
        if fullname == self.package or f"{name}.py" in self.files and fullname.startswith(f"{self.package}."):
            return importlib.util.spec_from_loader(fullname, self, is_package=fullname == self.package)
        return None

    def get_filename(self, fullname: str) -> str:
        name = "__init__" if fullname == self.package else fullname.removeprefix(f"{self.package}.")
        return f"{GENERATED_ROOT}/{self.package}/{name}.py"

    def get_data(self, path: str) -> bytes:
        return self.files.get(Path(path).name, "").encode()


# Where generated modules say they come from (no such folder exists: the loader serves them from memory).
GENERATED_ROOT = "/retrofit-generated"


@cache
def load_classes(family: Family, head: Head) -> MergedClasses:
    """Render the code for (family, head), import it as a package (from memory), and return its classes."""
    files, auto_map = render(family, head)
    names = _names(family, head)
    package = f"retrofit_generated_{names['model_type']}_{head.class_name.lower()}"
    loader = _GeneratedCode(package, files)
    sys.meta_path.append(loader)
    importlib.import_module(package)
    config_module = importlib.import_module(f"{package}.{names['config_module_name']}")
    modeling_module = importlib.import_module(f"{package}.{names['modeling_module_name']}")
    return MergedClasses(
        config_class=getattr(config_module, names["config_class"]),
        model_class=getattr(modeling_module, names["model_class"]),
        files=files,
        auto_map=auto_map,
    )
