"""retrofit: make pretrained Vision Transformers faster by inserting a PatchMerger, then fine-tuning it back.

The Python API mirrors the CLI, one function per command::

    from retrofit import convert, evaluate_models, finetune, run_recipe
    from retrofit.benchmark import BenchSettings, benchmark
    from retrofit.deploy import export_onnx
    from retrofit.push import push
    from retrofit.sweep import SweepSettings, sweep

    convert(source, after_layer=6, num_tokens=8, output=...)                  # retrofit convert
    finetune(source, after_layer=6, num_tokens=8, output=..., data=...)       # retrofit finetune
    evaluate_models([source, export], data=..., split=...)                    # retrofit evaluate
    benchmark([source, export], settings=BenchSettings(...))                  # retrofit bench
    sweep(source, SweepSettings(after_layers=(3, 6), tokens=(8,), data=...))  # retrofit sweep
    push(export, repo_id)                                                     # retrofit push
    export_onnx(export, "model.onnx")                                         # retrofit export-onnx
    run_recipe("recipes/fashion-mnist.yaml")                                  # retrofit run

plus the building blocks: `insert_patch_merger`, `export`, `load_model`, `model_cost`, `update_card`. (`benchmark`,
`sweep`, `push` and `calibrate` are also the names of their modules, so their functions are imported from them.)
Bad input raises `RetrofitError` (one line: what is wrong, what to do). Every name is imported on first use (PEP 562),
so ``import retrofit`` and ``retrofit --help`` load neither torch nor transformers.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING

__version__ = "0.1.0"

if TYPE_CHECKING:  # what type checkers and editors see; at run time each name is imported on first use (_LAZY)
    from .card import update_card
    from .convert import ConvertResult, convert
    from .cost import Cost, model_cost
    from .errors import RetrofitError
    from .evaluation import evaluate_models
    from .export import export
    from .families import FAMILIES, Family, Head, register
    from .finetune import finetune
    from .hub_code import register_auto_classes
    from .loading import load_model
    from .merger import PatchMerger
    from .recipes import run_recipe
    from .settings import TrainSettings
    from .surgery import insert_patch_merger
    from .train import TrainResult

# name -> the module that defines it, imported when the name is first used
_LAZY = {
    "ConvertResult": "convert",
    "convert": "convert",
    "Cost": "cost",
    "model_cost": "cost",
    "RetrofitError": "errors",
    "export": "export",
    "FAMILIES": "families",
    "Family": "families",
    "Head": "families",
    "register": "families",
    "load_model": "loading",
    "PatchMerger": "merger",
    "insert_patch_merger": "surgery",
    "register_auto_classes": "hub_code",
    "finetune": "finetune",
    "TrainSettings": "settings",
    "TrainResult": "train",
    "evaluate_models": "evaluation",
    "run_recipe": "recipes",
    "update_card": "card",
}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'retrofit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


class _Package(types.ModuleType):
    """Keeps `retrofit.convert`, `retrofit.export` and `retrofit.finetune` the functions: importing a submodule binds
    its name on the package, and these share their module's name."""

    def __setattr__(self, name: str, value) -> None:
        if isinstance(value, types.ModuleType) and _LAZY.get(name) == name:
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

__all__ = [
    "FAMILIES",
    "ConvertResult",
    "Cost",
    "Family",
    "Head",
    "PatchMerger",
    "RetrofitError",
    "TrainResult",
    "TrainSettings",
    "convert",
    "evaluate_models",
    "export",
    "finetune",
    "insert_patch_merger",
    "load_model",
    "model_cost",
    "register",
    "register_auto_classes",
    "run_recipe",
    "update_card",
]
