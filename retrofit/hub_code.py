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

import jinja2
import transformers

from . import __version__
from .families import MERGED_SUFFIX, Family, Head
from .merger import PatchMerger

TEMPLATES = Path(__file__).parent / "templates"
# The oldest transformers release the exported code supports; `make test` reloads every family's export with it
# (Makefile `OLDEST_TRANSFORMERS`). retrofit itself needs a newer one (pyproject.toml).
OLDEST_TRANSFORMERS = "5.0.0"


def oldest_transformers_for(config) -> str:
    """The oldest transformers release an export of `config` loads on, as its card says: `OLDEST_TRANSFORMERS`, or a
    later one where transformers' own class of the source needs it. A DINOv3 of a non-square image_size (a list): its
    RoPE takes one in 5.25 (where it was checked), not in 5.17 or older, the source no more than the export."""
    vision = getattr(config, "vision_config", None) or config
    if config.model_type.startswith("dinov3") and not isinstance(getattr(vision, "image_size", 0), int):
        return "5.25.0"
    return OLDEST_TRANSFORMERS


@dataclass(frozen=True)
class MergedClasses:
    """The generated classes for one (family, head) and the files that define them."""

    config_class: type
    model_class: type
    files: dict[str, str]
    auto_map: dict[str, str]
    saves_code: bool = True  # save_pretrained writes the files and auto_map (False: retrofit's cache is not writable)


def _names(family: Family, head: Head) -> dict[str, str]:
    prefix = family.display_name
    model_class = head.class_name
    if model_class.startswith(prefix):
        model_class = f"{prefix}PatchMerger{model_class[len(prefix) :]}"
    else:
        model_class = f"PatchMerger{model_class}"
    stem = f"{family.name}{MERGED_SUFFIX}"
    return {
        "model_type": stem,
        "config_class": f"{prefix}PatchMergerConfig",
        "model_class": model_class,
        "layer_class": f"{family.layer_class}OnMergedTokens",
        "config_module_name": f"configuration_{stem}",
        "modeling_module_name": f"modeling_{stem}",
    }


def code_files(family: Family, head: Head) -> tuple[str, str]:
    """The names of the files `render` writes for (family, head): its configuration and modeling modules."""
    names = _names(family, head)
    return f"{names['config_module_name']}.py", f"{names['modeling_module_name']}.py"


def base_head(family: Family, head: Head) -> Head | None:
    """The family's backbone class of a classifier with the same config (ViTModel for ViTForImageClassification):
    the export of the classifier also loads as it with `AutoModel`, as the source checkpoint does."""
    if not head.is_classifier:
        return None
    return next((other for other in family.heads.values() if other.pipeline_tag == "image-feature-extraction"), None)


def classifier_head(family: Family, head: Head) -> Head | None:
    """The family's classifier that a backbone or dual-encoder export also loads as, with
    ``AutoModelForImageClassification`` and a new classifier (``num_labels=...``), as the source checkpoint does:
    the family's first classifier (DeiTForImageClassification, not the one with a distillation head)."""
    if head.is_classifier:
        return None
    return next((other for other in family.heads.values() if other.is_classifier), None)


def render(family: Family, head: Head, *, retrofit_version: str = __version__) -> tuple[dict[str, str], dict[str, str]]:
    """The generated source files (name -> text) and the ``auto_map`` for a family's head class, and for the other
    classes its export loads as: a classifier's family backbone (`base_head`, for `AutoModel`), a backbone's or dual
    encoder's family classifier (`classifier_head`, for ``AutoModelForImageClassification``).

    The files are `templates/configuration.py.jinja` and `templates/modeling.py.jinja` rendered with `context`
    (the templates' first comment says what each name in it is); `retrofit_version` goes into their headers only."""
    names = _names(family, head)
    heads = [head] + [other for other in (base_head(family, head), classifier_head(family, head)) if other is not None]
    merged_classes = {each.class_name: _names(family, each)["model_class"] for each in heads}  # source -> merged
    context = {
        "family": family,
        "head": head,
        "merged": {
            "config_class": names["config_class"],
            "config_module": names["config_module_name"],
            "modeling_module": names["modeling_module_name"],
            "layer_class": names["layer_class"],
            "model_type": names["model_type"],
        },
        "models": [{"source": source, "merged": merged} for source, merged in merged_classes.items()],
        "source_model_type": getattr(transformers, family.config_class).model_type,
        "merger_source": inspect.getsource(PatchMerger).rstrip(),
        "retrofit_version": retrofit_version,
        "oldest_transformers": OLDEST_TRANSFORMERS,
    }
    templates = ("configuration.py.jinja", "modeling.py.jinja")
    files = {
        name: _templates().get_template(template).render(context)
        for name, template in zip(code_files(family, head), templates, strict=True)
    }
    auto_map = {"AutoConfig": f"{names['config_module_name']}.{names['config_class']}"}
    for each in heads:
        for auto_class in each.auto_classes:
            auto_map[auto_class] = f"{names['modeling_module_name']}.{merged_classes[each.class_name]}"
    return files, auto_map


@cache
def _templates() -> jinja2.Environment:
    """The templates: Python, not HTML (no escaping); an undefined name is an error; block tags leave no blank lines."""
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        autoescape=False,  # Python, not HTML
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )


class _GeneratedCode(importlib.abc.SourceLoader):
    """Imports the rendered files of one package from memory, so that what runs is what `render` returned (and
    `inspect.getsource` and tracebacks show it, through `get_source`). The modules' ``__file__`` is in `folder`, where
    `_write_copy` keeps a copy of the same files for ``save_pretrained`` to copy into a saved model (as it copies the
    files of a model loaded with ``trust_remote_code``); in `GENERATED_ROOT` where there is none."""

    def __init__(self, package: str, files: dict[str, str], folder: Path | None) -> None:
        self.package, self.files, self.folder = package, files, folder

    def find_spec(self, fullname: str, path=None, target=None):
        name = fullname.removeprefix(f"{self.package}.")
        if fullname == self.package or f"{name}.py" in self.files and fullname.startswith(f"{self.package}."):
            return importlib.util.spec_from_loader(fullname, self, is_package=fullname == self.package)
        return None

    def get_filename(self, fullname: str) -> str:
        name = "__init__" if fullname == self.package else fullname.removeprefix(f"{self.package}.")
        return f"{self.folder or f'{GENERATED_ROOT}/{self.package}'}/{name}.py"

    def get_data(self, path: str) -> bytes:
        return self.files.get(Path(path).name, "").encode()


# Where generated modules say they come from when no copy could be written (no such folder exists).
GENERATED_ROOT = "/retrofit-generated"


def _write_copy(package: str, files: dict[str, str]) -> Path | None:
    """A folder holding `files` (and an empty ``__init__.py``) under ``$RETROFIT_CACHE/code``, named by the package and
    a hash of the files, written whole (a temporary folder renamed into place) and checked; None where the cache
    cannot be written."""
    import hashlib
    import os
    import shutil
    import tempfile

    from .provenance import CACHE_DIR

    digest = hashlib.sha256("\0".join(f"{name}\0{text}" for name, text in sorted(files.items())).encode())
    folder = CACHE_DIR / "code" / f"{package}-{digest.hexdigest()[:16]}"
    wanted = {**files, "__init__.py": ""}

    def holds(path: Path, text: str) -> bool:
        return path.is_file() and not path.is_symlink() and path.read_text(encoding="utf-8") == text

    try:
        if not folder.is_dir():
            folder.parent.mkdir(parents=True, exist_ok=True)
            work = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
            for name, text in wanted.items():
                (work / name).write_text(text, encoding="utf-8")
            try:
                os.rename(work, folder)
            except OSError:  # another process wrote it meanwhile
                shutil.rmtree(work, ignore_errors=True)
        for name, text in wanted.items():  # a file edited (or removed) since: written again, whole
            if not holds(folder / name, text):
                with tempfile.NamedTemporaryFile("w", dir=folder, prefix=f".{name}.", delete=False) as file:
                    file.write(text)
                os.replace(file.name, folder / name)
        if all(holds(folder / name, text) for name, text in wanted.items()) and not folder.is_symlink():
            return folder
    except OSError:
        pass
    return None


@cache
def load_classes(family: Family, head: Head) -> MergedClasses:
    """Render the code for (family, head), import it as a package (from memory), and return its classes. They are
    registered for their Auto classes, as transformers registers the classes of a model loaded with
    ``trust_remote_code``: saving a model made of them (``save_pretrained``, ``Trainer``, ``push_to_hub``) writes their
    files and the ``auto_map``, so that the saved folder loads without retrofit too. Where the cache cannot be written
    (no copy of the files on disk) they are not registered, and `MergedClasses.saves_code` is False."""
    files, auto_map = render(family, head)
    names = _names(family, head)
    package = f"retrofit_generated_{names['model_type']}_{head.class_name.lower()}"
    folder = _write_copy(package, files)
    loader = _GeneratedCode(package, files, folder)
    sys.meta_path.append(loader)
    importlib.import_module(package)
    config_module = importlib.import_module(f"{package}.{names['config_module_name']}")
    modeling_module = importlib.import_module(f"{package}.{names['modeling_module_name']}")
    if folder is not None:  # without a copy on disk, save_pretrained would have no files to copy
        for auto_class, reference in auto_map.items():
            module = config_module if auto_class == "AutoConfig" else modeling_module
            generated = getattr(module, reference.rsplit(".", 1)[1])
            if generated.__dict__.get("_auto_class") is None:  # a dual encoder's class serves two Auto classes
                generated.register_for_auto_class(auto_class)
                generated.save_pretrained = _saving_the_rendered_code(generated, package, files)
    return MergedClasses(
        config_class=getattr(config_module, names["config_class"]),
        model_class=getattr(modeling_module, names["model_class"]),
        files=files,
        auto_map=auto_map,
        saves_code=folder is not None,
    )


def _saving_the_rendered_code(generated: type, package: str, files: dict[str, str]):
    """`generated`'s ``save_pretrained``: its parent's (looked up at each call), after making sure the copy it copies
    the code from holds what runs (`_write_copy` writes again a file edited since), so that a saved model never
    carries other code than the rendered one."""

    def save_pretrained(self, *args, **kwargs):
        if _write_copy(package, files) is None:
            raise RuntimeError(
                f"retrofit's copy of the generated code for {package} cannot be written again in its cache "
                "($RETROFIT_CACHE/code); the model was not saved"
            )
        return super(generated, self).save_pretrained(*args, **kwargs)

    save_pretrained.__doc__ = generated.save_pretrained.__doc__
    return save_pretrained


def register_auto_classes() -> None:
    """Register every family's merged config and model classes with transformers' Auto classes, so that an export
    loads with ``AutoModelForImageClassification.from_pretrained(export)``, ``AutoModel`` and ``pipeline(...,
    model=export)`` without ``trust_remote_code``: transformers then uses these classes, rendered in this process from
    retrofit's own templates, and imports no file from the export (its bundled code is the same, for users without
    retrofit). Calling it again does nothing."""
    import transformers

    from .families import FAMILIES

    for family in FAMILIES.values():
        if family.refusal:
            continue
        heads = list(family.heads.values())
        # The first head's package holds the classes the family's exports load as (its classifier and backbone, or
        # dual encoder and classifier: `render`; DeiT's second classifier has its own), and the first registered
        # class of each Auto class comes from it: its config class is the family's, so that a model loaded this way
        # saves configuration and modeling files of one package.
        config_class = load_classes(family, heads[0]).config_class
        transformers.AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        by_auto: dict[str, list[type]] = {}
        for head in heads:  # DeiT has two classifiers: transformers picks one by the config's `architectures`
            classes = load_classes(family, head)
            module = sys.modules[classes.model_class.__module__]
            for auto_class, reference in classes.auto_map.items():
                model_class = getattr(module, reference.rsplit(".", 1)[1]) if auto_class != "AutoConfig" else None
                names = [each.__name__ for each in by_auto.get(auto_class, [])]
                if model_class is not None and model_class.__name__ not in names:
                    by_auto.setdefault(auto_class, []).append(model_class)
        for auto_class, model_classes in by_auto.items():
            chosen = model_classes[0] if len(model_classes) == 1 else tuple(model_classes)
            getattr(transformers, auto_class).register(config_class, chosen, exist_ok=True)


# The rendered files of every convertible (family, head) are kept in tests/golden/ (tests/test_hub_code.py checks that
# rendering reproduces them byte for byte), rendered with this version in place of retrofit's own, so that they change
# with the code only, not with every release.
GOLDEN_VERSION = "<version>"
GOLDEN_COMMAND = "python -m retrofit.hub_code --write-golden tests/golden"


def golden_files() -> dict[str, str]:
    """The generated files of every (family, head) that retrofit converts, by path: `<family>/<head class
    lowercased>/<file>`, rendered with `GOLDEN_VERSION`."""
    from .families import FAMILIES

    files = {}
    for family in FAMILIES.values():
        if family.refusal:
            continue
        for head in family.heads.values():
            rendered, _ = render(family, head, retrofit_version=GOLDEN_VERSION)
            for name, text in rendered.items():
                files[f"{family.name}/{head.class_name.lower()}/{name}"] = text
    return files


def write_golden(folder: Path) -> None:
    """Write `golden_files()` under `folder`, removing the generated files there that they no longer include."""
    files = golden_files()
    for path in sorted(folder.glob("*/*/*.py")):
        if path.relative_to(folder).as_posix() not in files:
            path.unlink()
            print(f"removed {path}")
    for name, text in files.items():
        path = folder / name
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path}")
    for directory in sorted(folder.glob("*/*/"), reverse=True) + sorted(folder.glob("*/")):
        if directory.is_dir() and not any(directory.iterdir()):
            directory.rmdir()


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(prog="python -m retrofit.hub_code", description="Keep the golden generated files.")
    parser.add_argument("--write-golden", type=Path, required=True, metavar="FOLDER", help="e.g. tests/golden")
    write_golden(parser.parse_args().write_golden)
