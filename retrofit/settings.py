"""Every setting of every command, once: type, default, help, and the check of its value.

Each command's settings are one dataclass (`ConvertArgs`, `FinetuneArgs`, ...), put together from groups that
commands and recipes share (`MergeSettings`, `DataSettings`, `TrainSettings`, ...). From these fields come

- the command-line options and their help (`add_options`; a field ``after_layer`` is ``--after-layer``),
- the keyword arguments of the Python API (the field names),
- the recipe schema: each recipe section is a few groups (`RECIPE_SECTIONS`), its keys their fields (a field may
  keep an older recipe spelling: `setting(key=...)`, e.g. ``data: {name: ...}`` for `DataSettings.data`), and what
  ``--set section.key=value`` may set;
- the validation: building a dataclass checks every value (`Settings.__post_init__`), so a bad value is refused in
  one line naming the option (or the recipe key), before anything is loaded.

Why not transformers' ``HfArgumentParser``: ``retrofit --help`` and usage errors answer in 0.1 s because this module
imports neither torch nor transformers (tests/test_api.py), and ``HfArgumentParser`` lives in transformers (0.8 s to
import); it also registers every option twice (``--after_layer`` and ``--after-layer``), gives booleans an optional
value (``--augment [AUGMENT]``) and has no positional arguments. `add_options` follows its rules otherwise:
``X | None`` is optional, ``Literal`` gives choices, a bool is a flag (``--no-X`` where it defaults to True), and the
help shows the default.
"""

import argparse
import dataclasses
import math
import os
import typing
from collections.abc import Iterable
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from .errors import RetrofitError, did_you_mean, shown
from .families import ROPE_POSITIONS, TASKS
from .zero_shot import DEFAULT_TEMPLATE, template_problem

# ----------------------------------------------------------------------------------------------------------------
# Declaring and checking settings
# ----------------------------------------------------------------------------------------------------------------


def setting(
    default: Any = MISSING,
    help: str = "",
    *,
    key: str | None = None,
    flag: str | None = None,
    short: str | None = None,
    metavar: str | None = None,
    positional: bool = False,
    nargs: str | None = None,
    const: Any = None,
    parse: typing.Callable[[str], Any] | None = None,
    at_least: float | None = None,
    at_most: float | None = None,
    positive: bool = False,
    interval: tuple[float, float, str] | None = None,
    expect: str | None = None,
    blank: bool = False,
    cli: bool = True,
    written: bool = False,
) -> Any:
    """A dataclass field that is a setting: `help` for ``--help``; `key` its recipe key and `flag` its option where
    they are not the field name (``--batch-size`` for `BenchSettings.batch_sizes`); `short` an extra short option;
    `positional` a positional argument (`nargs`, `const` as argparse's); `parse` turns an option's text into the value
    (``"1,32,256"`` -> (1, 32, 256)). The value must be `at_least` N (0: "0 or more"), `at_most` N, `positive`, or in
    `interval` (low, high, text such as ``"[0, 1)"``; high excluded when the text ends in ``)``); `expect` says what
    it must be when it is not (``a number of seconds from 0 to 3600``). Text that is empty or only spaces is refused
    (an unset shell variable: ``--data "$DATA"`` read the current folder as the data) unless `blank` (it means
    something, as ``--eval-split ''`` does: none). `cli` False: a recipe or Python setting only. `written`: a path
    retrofit writes to, whose leading ``~`` is the home folder as it is in the paths it reads (``--output=~/pm``,
    where the shell leaves it, and Python calls wrote a folder named ``~`` in the current one)."""
    metadata = {
        "help": help, "key": key, "flag": flag, "short": short, "metavar": metavar, "positional": positional,
        "nargs": nargs, "const": const, "parse": parse, "at_least": at_least, "at_most": at_most,
        "positive": positive, "interval": interval, "expect": expect, "blank": blank, "cli": cli, "written": written,
    }  # fmt: skip
    if isinstance(default, list | dict | set):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


class SettingError(RetrofitError):
    """A bad value of one setting: `name` (the field), `problem` (``must be positive (got 0)``). The message names the
    option; a recipe names its key instead (`recipes.py`)."""

    def __init__(self, cls: type, name: str, problem: str) -> None:
        self.cls, self.name, self.problem = cls, name, problem
        super().__init__(f"{option_of(cls, name)} {problem}")


def option_of(cls: type, name: str) -> str:
    """The command-line option of a setting (``after_layer`` -> ``--after-layer``, or its `setting(flag=...)`)."""
    spec = next((spec for spec in fields(cls) if spec.name == name), None)
    return (spec.metadata.get("flag") if spec is not None else None) or f"--{name.replace('_', '-')}"


def _kind(annotation) -> tuple[Any, bool]:
    """(the type a setting holds, whether None is allowed) from its annotation."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else annotation), type(None) in args
    return annotation, False


def _describe(kind) -> str:
    if typing.get_origin(kind) in (tuple, list):
        return {int: "a list of whole numbers", str: "a list of text"}.get(typing.get_args(kind)[0], "a list")
    return {int: "a whole number", float: "a finite number", str: "text", bool: "true or false"}.get(kind, str(kind))


def _problem(kind, value, spec: dataclasses.Field) -> str | None:
    """What is wrong with `value` for a setting of type `kind`, or None."""
    if typing.get_origin(kind) is Literal:
        choices = typing.get_args(kind)
        return None if value in choices else f"must be one of {', '.join(map(str, choices))}, not {shown(value)}"
    if typing.get_origin(kind) in (tuple, list):
        item = typing.get_args(kind)[0]
        items = {int: lambda v: isinstance(v, int) and not isinstance(v, bool), str: lambda v: isinstance(v, str)}
        good = items.get(item, lambda v: True)
        ok = isinstance(value, tuple | list) and all(good(v) for v in value)
        values = list(value) if ok and item is int else []
    else:
        types = {int: (int,), float: (int, float), str: (str,), bool: (bool,)}.get(kind, (object,))
        ok = isinstance(value, types) and (kind is bool or not isinstance(value, bool))
        ok = ok and not (kind is float and not math.isfinite(value))
        values = [value] if ok and kind in (int, float) else []
    meta = spec.metadata
    if not ok:
        if meta["expect"]:
            return f"must be {meta['expect']} (got {shown(value)})"
        return f"must be {_describe(kind)}, not {shown(value)}"
    if kind is str and not value.strip() and not meta.get("blank"):
        required = spec.default is MISSING and spec.default_factory is MISSING
        return f"is empty (got {shown(value)}); give a value{'' if required else ' or leave the option out'}"
    if kind is str and meta.get("written") and value.strip() == "-":  # the usual "stdout" of other tools
        return "is '-', which here would name a file '-', not stdout; give a path (such as out.json)"
    if kind is str and not value.isascii():
        try:  # a name of another encoding's bytes (Python keeps them as surrogates) cannot be written in a card or JSON
            value.encode("utf-8")
        except UnicodeEncodeError:
            return f"is not UTF-8 text (got {shown(value)}); use a name in UTF-8 (rename the file or folder)"
    for number in values:
        if meta["at_least"] is not None and number < meta["at_least"]:
            least = "0 or more" if meta["at_least"] == 0 else f"at least {meta['at_least']:g}"
            return f"must be {least} (got {_number(number)})"
        if meta.get("at_most") is not None and number > meta["at_most"]:
            return f"must be at most {_number(meta['at_most'], True)} (got {_number(number, True)})"
        if meta["positive"] and number <= 0:
            return f"must be positive (got {_number(number)})"
        if meta["interval"] is not None:
            low, high, text = meta["interval"]
            if not (low <= number and (number < high if text.endswith(")") else number <= high)):
                return f"must be {meta['expect'] or f'in {text}'} (got {_number(number)})"
    return None


def _number(number: float, commas: bool = False) -> str:
    """`number` as a message quotes it; `commas`: whole ones in groups of three (1,000,000). A whole number too long to
    write (Python refuses more than 4,300 digits) is said by its size."""
    if isinstance(number, int) and number.bit_length() > 1000:
        return shown(number)  # said by its size
    if commas and (isinstance(number, int) or number.is_integer() and abs(number) < 1e16):
        return f"{int(number):,}"
    return str(number)


class Settings:
    """Base of every settings dataclass: building one checks each value (type, range, choices), then `check` checks
    how they go together. Paths given as `os.PathLike` are kept as text, as options and recipes give them."""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for spec in fields(self):
            setattr(self, spec.name, _checked(type(self), spec, hints[spec.name], getattr(self, spec.name)))
        self.check()

    def check(self) -> None:
        """Checks across fields (subclasses extend it; each calls super().check())."""

    def refuse(self, name: str, problem: str) -> None:
        raise SettingError(type(self), name, problem)


def written_path(path: str) -> str:
    """A path retrofit writes to, as the system finds it: ``~`` is the home folder (no shell expands it in a recipe
    or a Python call), and a ``..`` is taken after the link before it (`physical_path`)."""
    path = os.path.expanduser(path) if path.startswith("~") else path
    return physical_path(path) if ".." in Path(path).parts else path


def physical_path(path: str) -> str:
    """`path` with its ``..`` taken as the system takes it, after the link before it: ``LINK/../o`` is beside LINK's
    target, where Python's lexical `os.path.abspath` (tempfile's) puts it beside LINK, so the checks and the writes of
    a run went to two folders (a fine-tune failed at its first checkpoint)."""
    parts = Path(path).parts
    last = len(parts) - parts[::-1].index("..")  # up to and with the last ".."
    try:
        head = os.path.realpath(Path(*parts[:last]), strict=True)
    except OSError:  # a folder before a ".." that is missing: the system cannot climb out of it (the checks say so)
        return path
    physical = str(Path(head, *parts[last:]))
    return path if physical == os.path.abspath(path) else physical  # no link before the "..": as the user wrote it


def _checked(cls: type, spec: dataclasses.Field, annotation, value):
    """`value` for setting `spec` of `cls`, as it is kept (option text parsed, paths as text), or a `SettingError`."""
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if spec.metadata.get("written") and isinstance(value, str):
        value = written_path(value)
    kind, optional = _kind(annotation)
    if value is None and (optional or spec.default is None):
        return value
    if isinstance(value, str) and spec.metadata.get("parse") and kind is not str:  # option text
        try:
            value = spec.metadata["parse"](value)
        except ValueError as exc:
            raise SettingError(cls, spec.name, str(exc)) from None
    if isinstance(value, list) and typing.get_origin(kind) is tuple:
        value = tuple(value)
    if typing.get_origin(kind) is tuple and isinstance(value, tuple):
        value = tuple(_plain_number(typing.get_args(kind)[0], item) for item in value)
    value = _plain_number(kind, value)
    problem = _problem(kind, value, spec)
    if problem:
        raise SettingError(cls, spec.name, problem)
    return value


def _plain_number(kind, value):
    """A NumPy (or other `numbers`) integer or real given for an int or float setting, as Python's int or float
    (``batch_size=np.int64(64)`` from ``np.arange`` was refused as "not a whole number"); anything else as it is."""
    import numbers

    if isinstance(value, bool | int | float) or not isinstance(value, numbers.Real):
        return value
    if kind is int and isinstance(value, numbers.Integral):
        return int(value)
    return float(value) if kind is float else value


def model_list(models) -> list:
    """The models a Python call names, as a list: one (a name, a path, or an object, which the settings then refuse in
    one line) or several; paths as text, as the options give them."""
    one = isinstance(models, str | os.PathLike) or not isinstance(models, Iterable)
    models = [models] if one and models is not None else list(models or [])
    return [os.fspath(spec) if isinstance(spec, os.PathLike) else spec for spec in models]


def from_options(cls: type, values: dict, *, where: str = "") -> Any:
    """A `cls` from keyword arguments (field names): an unknown one is refused naming the nearest, a bad value
    naming its option, then a missing required one (``--data is required``). `where` (``finetune()``) goes into the
    message about an unknown one."""
    specs = {spec.name: spec for spec in fields(cls)}
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        if key not in specs:
            raise RetrofitError(f"unknown setting '{key}'{f' for {where}' if where else ''}{did_you_mean(key, specs)}")
        _checked(cls, specs[key], hints[key], value)
    for name, spec in specs.items():
        if name not in values and spec.default is MISSING and spec.default_factory is MISSING:
            raise SettingError(cls, name, "is required")
    return cls(**values)


# ----------------------------------------------------------------------------------------------------------------
# Command-line options from settings
# ----------------------------------------------------------------------------------------------------------------


def add_options(
    parser, cls: type, *, unset: bool = False, shown: dict | None = None, from_recipe: frozenset[str] = frozenset()
) -> None:
    """Add an option (or positional argument) for every setting of `cls` that has one (`setting(cli=True)`), with
    the setting's help and default. `unset`: an option not given is left out of the parsed namespace (``run``: the
    recipe's value applies); `shown` (field -> value) is the default the help names instead, said to come from the
    recipe for the fields in `from_recipe` (the keys the recipe file sets)."""
    hints = typing.get_type_hints(cls)
    groups: dict[type, Any] = {}
    for spec in fields(cls):
        meta = spec.metadata
        if not meta.get("cli", True) or unset and meta["positional"]:
            continue
        owner = _owner(cls, spec.name)  # the group the setting belongs to: its options are listed together
        if owner is not cls and not meta["positional"] and hasattr(parser, "add_argument_group"):
            title = (owner.__doc__ or owner.__name__).splitlines()[0].replace("``", "").rstrip(".")
            where = groups.setdefault(owner, parser.add_argument_group(title))
        else:
            where = parser
        kind, _ = _kind(hints[spec.name])
        required = spec.default is MISSING and spec.default_factory is MISSING
        default = spec.default_factory() if spec.default_factory is not MISSING else spec.default
        show = (shown or {}).get(spec.name, None if required else default)
        hidden = show in (None, (), []) or show is False
        note = "" if hidden else f" (default: {_show(show)}{', from the recipe' if spec.name in from_recipe else ''})"
        kwargs: dict[str, Any] = {"help": meta["help"] + note}
        if meta["positional"]:
            where.add_argument(spec.name, nargs=meta["nargs"], **kwargs)
            continue
        names = [option_of(cls, spec.name)] + ([meta["short"]] if meta["short"] else [])
        kwargs["dest"] = spec.name
        if unset:
            kwargs["default"] = argparse.SUPPRESS
        elif required:
            kwargs["required"] = True
        else:
            kwargs["default"] = default
        if kind is bool:
            where.add_argument(*names, action="store_true", **kwargs)
            if default is True:
                no = {key: value for key, value in kwargs.items() if key != "help"}
                where.add_argument(f"--no-{names[0][2:]}", action="store_false", help=f"not {names[0]}", **no)
            continue
        if meta["parse"] is None and typing.get_origin(kind) is Literal:  # checked by the settings: one line
            kwargs["metavar"] = "{" + ",".join(map(str, typing.get_args(kind))) + "}"
        elif meta["parse"] is None and typing.get_origin(kind) is list and not meta["nargs"]:
            kwargs["action"] = "append"
        elif meta["parse"] is None and kind in (int, float):
            kwargs["type"] = kind
        kwargs["metavar"] = meta["metavar"] or kwargs.get("metavar")
        if meta["nargs"]:
            kwargs["nargs"], kwargs["const"] = meta["nargs"], meta["const"]
        where.add_argument(*names, **kwargs)


def _owner(cls: type, name: str) -> type:
    """The class in `cls`'s hierarchy that declares setting `name`."""
    return next(base for base in reversed(cls.__mro__) if name in getattr(base, "__annotations__", {}))


def _show(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple | list) else str(value)


def from_namespace(cls: type, namespace: argparse.Namespace) -> Any:
    """The `cls` the parsed options of `add_options(parser, cls)` describe (checked as it is built)."""
    return cls(**{spec.name: getattr(namespace, spec.name) for spec in fields(cls) if hasattr(namespace, spec.name)})


def comma_items(text: str, example: str) -> list[str]:
    """The items of a comma-separated option value, stripped. Every list option is read this way, as one rule: an
    empty value, or an empty item (``1,,2``, ``1,2,``, ``,``: a typo or an unset shell variable) -> ValueError naming
    `example`."""
    items = [part.strip() for part in str(text).split(",")]
    if not str(text).strip():
        raise ValueError(f"is empty; give one or more values separated by commas, e.g. {example}")
    if "" in items:
        raise ValueError(f"{shown(str(text))} has an empty item; separate the values by single commas, e.g. {example}")
    return items


def comma_ints(text: str) -> tuple[int, ...]:
    """``"3,6,9"`` -> (3, 6, 9), repeats dropped; not a list of whole numbers -> ValueError."""
    items = comma_items(text, "3,6,9")
    try:
        return tuple(dict.fromkeys(int(part) for part in items))
    except ValueError:
        raise ValueError(f"{shown(str(text))} is not a comma-separated list of whole numbers, e.g. 3,6,9") from None


# ----------------------------------------------------------------------------------------------------------------
# The groups of settings that commands and recipes share
# ----------------------------------------------------------------------------------------------------------------

SOURCE_HELP = (
    "a Hub model id, a local folder, retrofit:NAME (a checkpoint shipped with retrofit: "
    "retrofit:fashion-mnist-vit, retrofit:fashion-mnist-vit-wide, retrofit:fashion-mnist-clip)"
)
DATA_HELP = (
    "fashion-mnist, an image folder (datasets' imagefolder layout), a folder written by datasets' save_to_disk, or a "
    "Hub dataset id"
)
LOSSES = ("kd", "ce", "mix")
PRETRAIN_LOSSES = ("ce", "contrastive")  # a ViT classifier from labels; a CLIP dual encoder from captions
# The captions a contrastive pretraining writes for each image from its class name (`PretrainSettings`).
CAPTION_TEMPLATES = ("a photo of a {}.", "a {}.", "a picture of a {}.", "an image of a {}.", "a photo of the {}.")
TRAINABLE = ("merger-and-after", "all")
# Upper bounds far above any real use, so that a typo (an extra digit, 1e30) is one line, not a MemoryError or a
# fork of that many processes: --num-workers (DataLoader processes), --num-labels (the new head's rows and label
# names), --epochs (1e308 overflowed the step count), export-onnx --images (one batch through both runtimes),
# --grad-accum (Accelerate divides the loss by it as a tensor: past 2**63 an OverflowError at the first step).
MAX_WORKERS = 1024
MAX_GRAD_ACCUM = 1_000_000
MAX_LABELS = 1_000_000
MAX_EPOCHS = 1_000_000
MAX_STEPS = 1_000_000_000  # --max-steps, --min-steps: far past any run, within the schedule's float arithmetic
MAX_CHECK_IMAGES = 1024
# --lr and --merger-lr-scale: AdamW's first step is 10 x their product, kept in float32 (1e300 raised a RuntimeError
# from the optimizer); 1e6 each keeps it far inside, and far above any learning rate that trains.
MAX_LR = 1e6
SEEDS = (0, 2**32, "[0, 2**32)")  # what every generator retrofit seeds takes (NumPy's refuses a negative seed)
PRECISIONS = ("no", "bf16", "fp16")
TRACKERS = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",), "mlflow": ("mlflow",),
            "comet_ml": ("comet_ml",), "aim": ("aim",), "clearml": ("clearml",), "dvclive": ("dvclive",)}  # fmt: skip


def task_setting() -> Any:
    return setting(
        None,
        "convert SOURCE as its family's classifier, backbone or (CLIP, SigLIP) dual encoder (default: as the "
        "checkpoint's own class; e.g. a DINOv2 backbone gets a new classifier, a full CLIP checkpoint gives its vision "
        "tower alone)",
    )


def calibrate_images_setting() -> Any:
    return setting(256, "images to calibrate on, a shuffled sample", at_least=1)


def sample_setting(what: str, seed: str) -> Any:
    """``--sample N``: `what` a shuffled sample of N images, seeded as `seed` says, instead of ``--limit``'s first N."""
    return setting(
        None, f"{what} a shuffled sample of N images ({seed}; from the Hub only those are downloaded)", metavar="N",
        at_least=1,
    )  # fmt: skip


def chosen_images(limit: int | None, sample: int | None, seed: int) -> dict:
    """`load_split`'s `limit` and `sample_seed` for a command's ``--limit N`` (the first N images) or ``--sample N``
    (a shuffled sample of N, drawn with `seed`); the settings refuse both at once."""
    return {"limit": sample or limit, "sample_seed": seed if sample else None}


def data_revision_setting(**kwargs: Any) -> Any:
    """``--data-revision REV``: the commit, branch or tag of a Hub dataset to read (`retrofit.data.load_split`)."""
    return setting(
        None, "commit, branch or tag of a Hub dataset --data (default: its main branch; the commit read is recorded)",
        metavar="REV", **kwargs,
    )  # fmt: skip


TRAIN_SPLIT = "train"  # the default training split (which --holdout holds images out of)
EVAL_SPLIT = "test"  # the default evaluation split (``validation`` where the data has that instead, `load_split`)


class _DefaultSplit(str):
    """`EVAL_SPLIT` as the default of ``--eval-split``: equal to ``"test"``, yet told apart from a ``--eval-split test``
    someone gave, which `DataSettings.check` refuses beside ``--holdout`` (the held-out images are scored instead)."""


DEFAULT_EVAL_SPLIT = _DefaultSplit(EVAL_SPLIT)


def holdout_setting(help: str) -> Any:
    """``--holdout F``: a fraction of a split held out of training for evaluation (`retrofit.data.load_split`)."""
    return setting(None, help, metavar="F", positive=True, interval=(0, 1, "(0, 1)"))


def _check_limit_or_sample(settings: "Settings") -> None:
    """--limit (the first N images) and --sample (a shuffled sample) are two ways of choosing images: one at most."""
    if settings.limit is not None and settings.sample is not None:
        raise RetrofitError("--limit (the first N images) and --sample (a shuffled sample) exclude each other")


def image_column_setting() -> Any:
    return setting("image", "image column of the data")


def overwrite_setting(what: str, more: str = "") -> Any:
    return setting(False, f"replace {what} if retrofit wrote it (never a folder of yours or an input of the run){more}")


@dataclass(kw_only=True)
class SourceSettings(Settings):
    """How SOURCE is read."""

    revision: str | None = setting(None, "Hub revision (branch, tag or commit) of SOURCE")
    trust_remote_code: bool = setting(False, "allow SOURCE's own modeling code to run (off by default)")


@dataclass(kw_only=True)
class MergeSettings(Settings):
    """Where the PatchMerger goes (recipe section ``merge``)."""

    after_layer: int | None = setting(
        None, "number of encoder layers that still run on all tokens (1 <= K < number of layers)", metavar="K",
        at_least=1,
    )  # fmt: skip
    tokens: int | None = setting(
        None, "number of merged tokens (prefix tokens such as CLS come on top)", metavar="M", at_least=1
    )
    rope_positions: Literal[ROPE_POSITIONS] | None = setting(
        None,
        "RoPE models (DINOv3): rotate each merged token at the merge-weighted mean position of its patches (mean, "
        "the default) or not at all (none)",
    )


@dataclass(kw_only=True)
class CalibrationSettings(Settings):
    """How the merger starts (recipe section ``merge``)."""

    calibrate: bool = setting(
        True, "start the merger from k-means of the layer-K tokens of a shuffled sample of training images"
    )
    calibrate_images: int = calibrate_images_setting()


@dataclass(kw_only=True)
class DataSettings(Settings):
    """The training and evaluation data (recipe section ``data``)."""

    data: str = setting(help=DATA_HELP, key="name")
    data_revision: str | None = data_revision_setting(key="revision")
    split: str = setting(TRAIN_SPLIT, "training split", key="train_split")
    eval_split: str | None = setting(
        DEFAULT_EVAL_SPLIT, "evaluation split ('' for none); with --holdout, the held-out images are scored instead "
        "(give none), or kept out of training and not scored ('')", blank=True,
    )  # fmt: skip
    image_column: str = image_column_setting()
    label_column: str | None = setting("label", "label column of the data")
    limit: int | None = setting(None, "use only the first N training images", metavar="N", at_least=1)
    sample: int | None = sample_setting("train on", "seeded by --seed")
    eval_limit: int | None = setting(None, "use only the first N evaluation images", metavar="N", at_least=1)
    holdout: float | None = holdout_setting(
        "hold this fraction of the training split out of training and evaluate on it, for data without an evaluation "
        "split (an image folder of class folders): stratified by class, the same images every run"
    )
    num_workers: int = setting(0, "dataloader worker processes", at_least=0, at_most=MAX_WORKERS)
    augment: bool = setting(False, "random resized crops and horizontal flips of the training images")

    def check(self) -> None:
        super().check()
        if self.eval_split is not None and not self.eval_split.strip():  # '' (or spaces): none
            self.eval_split = None
        if self.holdout is None:
            self.eval_split = None if self.eval_split is None else str(self.eval_split)  # a plain str from here on
            if self.eval_split == self.split:
                self.refuse("eval_split", f"names the training split '{self.split}', so its accuracy would be on "
                            "images trained on; hold some out of training to score instead (--holdout 0.1), name "
                            "another split, or pass --eval-split '' to train without evaluating")  # fmt: skip
        elif self.eval_split is not None and not isinstance(self.eval_split, _DefaultSplit):  # None: kept out, unscored
            self.refuse("holdout", f"evaluates on the images it holds out, and --eval-split names split "
                        f"'{self.eval_split}'; drop one")  # fmt: skip
        _check_limit_or_sample(self)

    def images(self, evaluation: bool = False) -> dict:
        """`load_split`'s arguments for the training images (or, `evaluation`, the evaluation images) these settings
        choose, ``--holdout`` included: the split with its column names, and which images of it."""
        columns = {"image_column": self.image_column, "label_column": self.label_column, "revision": self.data_revision,
                   "holdout_by": self.label_column}  # fmt: skip
        if evaluation:
            split = self.split if self.holdout is not None else self.eval_split
            return {**columns, "split": split, "limit": self.eval_limit, "holdout": self.holdout, "held": True}
        chosen = chosen_images(self.limit, self.sample, self.seed)
        return {**columns, "split": self.split, "holdout": self.holdout, **chosen}

    def evaluated_on(self) -> str:
        """The evaluation images as a card and a results table name them: a split, or what --holdout keeps out."""
        if self.holdout is None:
            return str(self.eval_split)
        return f"{self.split}, the {100 * self.holdout:g} % held out of training (--holdout {self.holdout:g})"


@dataclass(kw_only=True)
class TrainSettings(Settings):
    """How the model is trained (recipe section ``training``)."""

    loss: Literal[LOSSES] = setting(
        "kd", "kd: distil the unmerged model (needs no labels); ce: cross-entropy on labels; mix: both"
    )
    function_matching: bool = setting(
        False, "kd: teacher and student see the same strongly augmented view of each image (--augment's crops and "
        "flips, then mixup between the images of the batch), so the student learns the teacher's function, not "
        "only its outputs on the training images (Beyer et al. 2022); labels are not read",
    )  # fmt: skip
    temperature: float = setting(2.0, "KD temperature", positive=True)
    alpha: float = setting(0.5, "weight of ce in --loss mix (kd gets 1 - alpha)", interval=(0, 1, "[0, 1]"))
    feature_weight: float | None = setting(
        None, "kd/mix: weight of distilling the features the head reads (default: 0 for classifiers, 1 for backbones "
        "and dual encoders; a dual encoder's are its normalised image embeddings, compared by cosine)", at_least=0,
    )  # fmt: skip
    prompt_weight: float = setting(
        0.0, "kd, dual encoders (CLIP, SigLIP): weight of the KL divergence between the unmerged and the merged "
        "model's image-text similarity distributions over the data's class-name prompts (--prompt-templates; at "
        "--temperature; text embedded once by the frozen text tower); 0: off", at_least=0,
    )  # fmt: skip
    prompt_templates: tuple[str, ...] = setting(
        (DEFAULT_TEMPLATE,), "dual encoders, with --prompt-weight: the prompts made from each class name of the "
        "training data ({} is where it goes); a class's text embedding is the mean of its prompts'",
        nargs="+", metavar="TEMPLATE",
    )  # fmt: skip
    train: Literal[TRAINABLE] = setting(
        "all", "what trains: all, or the merger and the layers after it (a dual encoder: of its vision tower; its "
        "text tower, text projection and logit scale stay frozen)",
    )  # fmt: skip
    epochs: float = setting(
        1.0, "epochs (fractions allowed); a budget below --min-steps is raised to it (more epochs of small data)",
        at_most=MAX_EPOCHS,
    )  # fmt: skip
    max_steps: int | None = setting(
        None, "optimizer steps, exactly (overrides --epochs, --min-steps)", positive=True, at_most=MAX_STEPS
    )
    min_steps: int = setting(
        1000, "the fewest optimizer steps an --epochs budget trains: on small data a few epochs are too few steps to "
        "recover, so the run takes more epochs (docs/recovery.md, small data); 0: off", at_least=0, at_most=MAX_STEPS,
    )  # fmt: skip
    lr: float = setting(2e-4, "peak learning rate", positive=True, at_most=MAX_LR)
    merger_lr_scale: float = setting(
        1.0, "the merger's learning rate is --lr times this", positive=True, at_most=MAX_LR
    )
    weight_decay: float = setting(0.05, "AdamW weight decay", at_least=0)
    warmup_ratio: float = setting(
        0.05, "fraction of the steps trained (the budget chosen) spent warming up, before the cosine decay",
        interval=(0, 1, "[0, 1)"),
    )  # fmt: skip
    ema_decay: float = setting(
        0.0, "evaluate last and export an exponential moving average of the trainable weights, updated after each "
        "optimizer step with this decay (bias-corrected: the start's weights count for nothing; 0.998 averages over "
        "about the last 500 steps), instead of the last step's weights; 0: off", interval=(0, 1, "[0, 1)"),
    )  # fmt: skip
    batch_size: int = setting(64, "images per batch and process", positive=True)
    eval_batch_size: int | None = setting(None, "evaluation batch size (default: --batch-size)", positive=True)
    grad_accum: int = setting(1, "gradient accumulation steps", positive=True, at_most=MAX_GRAD_ACCUM)
    max_grad_norm: float = setting(1.0, "gradient clipping (0: none)", at_least=0)
    mixed_precision: Literal[PRECISIONS] = setting("no", "no, bf16 or fp16")
    gradient_checkpointing: bool = setting(
        False, "recompute activations in the backward pass (less memory for large models, one more forward pass)"
    )
    seed: int = setting(0, "random seed", interval=SEEDS)
    eval_every: int = setting(
        0, "evaluate every N steps (0: at the end of each epoch, at most 10 times a run, and at the end)", at_least=0
    )
    save_every: int = setting(200, "checkpoint every N steps (and at the end)", positive=True)
    keep_checkpoints: int = setting(2, "checkpoints kept", positive=True)
    report_to: str | None = setting(None, f"tracker for Accelerate: {', '.join(TRACKERS)} or all")
    num_labels: int | None = setting(
        None, "a new N-class classifier (implies --task image-classification)", metavar="N", at_least=2,
        at_most=MAX_LABELS,
    )  # fmt: skip

    def check(self) -> None:
        super().check()
        if self.epochs <= 0 and not self.max_steps:
            self.refuse("epochs", f"must be positive (got {self.epochs})")
        if self.function_matching and self.loss != "kd":
            self.refuse("function_matching", f"is for --loss kd, which reads no labels (got --loss {self.loss})")
        _check_templates(self, "prompt_templates")
        if self.report_to in (None, "none", "all"):
            return
        if self.report_to not in TRACKERS:
            self.refuse("report_to", f"must be one of {', '.join(TRACKERS)} or all, not {shown(self.report_to)}")
        import importlib.util

        if not any(importlib.util.find_spec(package) for package in TRACKERS[self.report_to]):
            self.refuse("report_to", f"{self.report_to} needs its package: pip install {TRACKERS[self.report_to][0]}")


@dataclass(kw_only=True)
class HubSettings(Settings):
    """Uploading the export when it is written (recipe section ``export``)."""

    push_to_hub: str | None = setting(
        None, "upload the export to this Hub repo when done (the login is checked first), e.g. your-user/vit-b16-pm8",
        metavar="REPO_ID",
    )  # fmt: skip
    private: bool = setting(False, "with --push-to-hub: a private repo")
    create_pr: bool = setting(
        False, "with --push-to-hub: open a pull request on an existing repo (an organisation's) instead of committing"
    )

    def check(self) -> None:
        super().check()
        for name in ("private", "create_pr"):  # each says how the upload goes: without one, it was ignored
            if getattr(self, name) and self.push_to_hub is None:
                self.refuse(name, f"says how --push-to-hub uploads the export, and nothing is uploaded without it; "
                            f"add --push-to-hub REPO_ID, or drop {option_of(type(self), name)}")  # fmt: skip


@dataclass(kw_only=True)
class OutputSettings(Settings):
    """Where the export goes (recipe section ``export``)."""

    output: str = setting(help="folder to write the Hub-format model to", short="-o", written=True)


@dataclass(kw_only=True)
class CheckpointSettings(Settings):
    """Where training checkpoints go (recipe section ``export``)."""

    checkpoint_dir: str | None = setting(None, "where checkpoints go (default: <output>-checkpoints)", written=True)


@dataclass(kw_only=True)
class TrainingRun(DataSettings, TrainSettings):
    """What a training loop reads: the data and how to train on it (`retrofit.train.train`)."""


def _check_templates(settings: Settings, name: str) -> None:
    """Refuse a prompt template (or an empty list of them, or one in it) without exactly one {}."""
    value = getattr(settings, name)
    templates = (value,) if isinstance(value, str) else value
    if not templates:
        settings.refuse(name, f"is empty; give one or more templates, e.g. {DEFAULT_TEMPLATE!r}")
    for template in templates:
        problem = template_problem(template)
        if problem:
            settings.refuse(name, problem)


def _check_zero_shot_only(settings: Settings, zero_shot: str = "--zero-shot", turn_on: str = "add --zero-shot") -> None:
    """Refuse a prompt template given without zero-shot scoring (`zero_shot`: how the user turns it on), which would
    not be used (the models would be scored otherwise, by accuracy or feature similarity)."""
    if not settings.zero_shot and settings.prompt_template != DEFAULT_TEMPLATE:
        settings.refuse("prompt_template", f"is used with {zero_shot} only; {turn_on}, or drop it")


# TrainSettings fields only a fine-tune reads: the merger's lr and what trains, distillation's, a dual encoder's prompts
FINETUNE_ONLY_TRAINING = ("train", "merger_lr_scale", "temperature", "alpha", "prompt_weight", "prompt_templates")


@dataclass(kw_only=True)
class PretrainSettings(TrainSettings):
    """How a baseline is trained from scratch (a recipe with a ``pretrain`` section): cross-entropy for a ViT, a
    contrastive loss on captions for a CLIP, a higher lr."""

    loss: Literal[PRETRAIN_LOSSES] = setting(
        "ce", "pretraining has no teacher: ce (a ViT classifier, on labels) or contrastive (a CLIP model: CLIP's "
        "symmetric InfoNCE between images and captions written from their class names, captions of one class "
        "counted as matches)",
    )  # fmt: skip
    lr: float = setting(1e-3, "peak learning rate", positive=True, at_most=MAX_LR)
    caption_templates: tuple[str, ...] = setting(
        CAPTION_TEMPLATES, "contrastive: the captions of an image, its class name in each ({} is where it goes); each "
        "image gets one of them at random at each step", cli=False,
    )  # fmt: skip

    def check(self) -> None:
        super().check()
        _check_templates(self, "caption_templates")
        defaults = {spec.name: spec.default for spec in fields(TrainSettings)}
        for name in FINETUNE_ONLY_TRAINING:  # a setting pretraining ignores would be recorded as what trained
            if getattr(self, name) != defaults[name]:
                self.refuse(name, "is for fine-tuning a merged model, and pretraining from scratch does not read it "
                            "(every parameter trains, on labels or captions alone): remove it")  # fmt: skip
        if self.feature_weight is not None:  # (`train.settle_losses` fills in its default later)
            self.refuse("feature_weight", "distils a teacher's features, and pretraining from scratch has no teacher:"
                        " remove it")  # fmt: skip
        if self.loss != "contrastive" and self.caption_templates != CAPTION_TEMPLATES:
            self.refuse("caption_templates", f"writes the captions of --loss contrastive (a CLIP), not of --loss "
                        f"{self.loss}: remove it")  # fmt: skip


@dataclass(kw_only=True)
class PretrainRun(DataSettings, PretrainSettings):
    """What `retrofit.finetune.pretrain` trains with."""


# ----------------------------------------------------------------------------------------------------------------
# One dataclass per command
# ----------------------------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class ConvertArgs(HubSettings, OutputSettings, MergeSettings, SourceSettings):
    """`retrofit convert`: insert a PatchMerger into a checkpoint and export it."""

    source: str = setting(help=SOURCE_HELP, positional=True)
    output: str | None = setting(
        None,
        "folder to write the Hub-format model to (without it, convert reports the cost only)",
        short="-o",
        written=True,
    )
    task: Literal[TASKS] | None = task_setting()
    overwrite: bool = overwrite_setting("--output")
    calibrate_on: str | None = setting(
        None, f"initialise the merger from k-means of layer-K tokens of DATA ({DATA_HELP})", metavar="DATA"
    )
    calibrate_split: str = setting(TRAIN_SPLIT, "split of DATA to calibrate on")
    data_revision: str | None = setting(
        None, "commit, branch or tag of a Hub dataset --calibrate-on DATA (default: its main branch; the card names "
        "the commit read)", metavar="REV",
    )  # fmt: skip
    calibrate_images: int = calibrate_images_setting()
    holdout: float | None = holdout_setting(
        "calibrate on --calibrate-split without the fraction `finetune --holdout F` holds out of it, so that "
        "`evaluate --holdout F` scores images the merger never saw"
    )
    image_column: str = image_column_setting()
    label_column: str = setting("label", "label column of DATA, which --holdout stratifies by as `finetune --holdout` "
                                "does (not read otherwise)")  # fmt: skip
    seed: int = setting(0, "seed of the merger's random start and of the calibration sample", interval=SEEDS)

    def check(self) -> None:
        super().check()
        for name in ("after_layer", "tokens"):
            if getattr(self, name) is None:
                self.refuse(name, "is required (see retrofit convert --help)")
        for name, does in (("holdout", "keeps images out of calibration"), ("data_revision", "chooses its data")):
            if getattr(self, name) is not None and self.calibrate_on is None:
                self.refuse(name, f"{does}, and there is none without --calibrate-on DATA; add it, or drop "
                            f"{option_of(type(self), name)}")  # fmt: skip


@dataclass(kw_only=True)
class FinetuneArgs(HubSettings, CheckpointSettings, OutputSettings, TrainingRun, CalibrationSettings, MergeSettings,
                   SourceSettings):  # fmt: skip
    """`retrofit finetune`: insert a PatchMerger and fine-tune it back (or continue training an export)."""

    source: str = setting(help=f"{SOURCE_HELP}, or a retrofit export to continue training", positional=True)
    task: Literal[TASKS] | None = task_setting()
    teacher: str | None = setting(None, "the model to distil from (default: SOURCE, or the export's source)")
    overwrite: bool = overwrite_setting("--output", "; start over from no checkpoint")
    resume: bool = setting(False, "continue from the newest checkpoint")


ZERO_SHOT_HELP = (
    "score image-text dual encoders (CLIP, SigLIP and their exports) by zero-shot classification: one prompt per "
    "class of the data, each model with its own tokenizer and text tower"
)
PROMPT_TEMPLATE_HELP = "the zero-shot prompt: the class name goes where {} is"
EVALUATE_SPLIT = "validation"  # evaluate's split (`load_split` reads test where the data has no validation split)
EVALUATE_SEED = 0  # evaluate --sample: every run, and so every model compared across runs, scores the same images


@dataclass(kw_only=True)
class EvaluateArgs(Settings):
    """`retrofit evaluate`: top-1/top-5 accuracy and loss of several models, side by side (or their zero-shot
    accuracy)."""

    models: list[str] = setting(help="checkpoints, Hub ids or exports (the first sets the labels)", positional=True,
                                nargs="+")  # fmt: skip
    data: str = setting(help=DATA_HELP)
    data_revision: str | None = data_revision_setting()
    split: str | None = setting(
        None, f"split to evaluate on (default: {EVALUATE_SPLIT}, or test where the data has that instead; with "
        f"--holdout, {TRAIN_SPLIT}: the split `finetune --holdout` holds images out of)",
    )  # fmt: skip
    limit: int | None = setting(None, "use only the first N images (an image folder lists its classes in turn, so "
                                "they may be of one class: see --sample)", metavar="N", at_least=1)  # fmt: skip
    sample: int | None = sample_setting("evaluate on", f"seed {EVALUATE_SEED}: the same images every run")
    holdout: float | None = holdout_setting(
        "evaluate on the fraction of --split that `finetune --holdout F` held out of training (the same images)"
    )
    batch_size: int = setting(64, "images per batch and process", at_least=1)
    top_k: int = setting(5, "k of the top-k accuracy", at_least=1)
    image_column: str = image_column_setting()
    label_column: str = setting("label", "label column of the data")
    json: str | None = setting(None, "write the results to FILE", metavar="FILE", written=True)
    overwrite: bool = overwrite_setting("the --json file")
    card: str | None = setting(None, "write the results into this export's README.md", metavar="EXPORT", written=True)
    trust_remote_code: bool = setting(False, "allow the models' own code to run (off by default)")
    zero_shot: bool = setting(False, ZERO_SHOT_HELP + "; reports top-1, top-k and agreement with the first model")
    prompt_template: str = setting(DEFAULT_TEMPLATE, PROMPT_TEMPLATE_HELP + " (with --zero-shot)", metavar="TEXT")

    def check(self) -> None:
        super().check()
        if self.split is None:  # --holdout scores the images finetune --holdout kept out of its training split
            self.split = TRAIN_SPLIT if self.holdout is not None else EVALUATE_SPLIT
        _check_limit_or_sample(self)
        _check_templates(self, "prompt_template")
        _check_zero_shot_only(self)


@dataclass(kw_only=True)
class PushArgs(Settings):
    """`retrofit push`: upload an export to the Hugging Face Hub."""

    export: str = setting(help="the export folder (the --output of convert or finetune)", positional=True)
    repo_id: str = setting(help="Hub repo to create or update, e.g. your-user/vit-b16-pm8")
    private: bool = setting(False, "create the repo as private")
    revision: str | None = setting(None, "branch to push to (created if needed; default main)")
    commit_message: str | None = setting(None, "commit message")
    create_pr: bool = setting(
        False, "open a pull request on an existing repo instead of committing to it (e.g. an organisation's repo)"
    )


@dataclass(kw_only=True)
class RunArgs(Settings):
    """`retrofit run`: run a recipe. Every recipe setting is also an option here (`RECIPE_SECTIONS`); given, it
    overrides the recipe's value."""

    recipe: str = setting(help="path to a recipe YAML file (recipes/*.yaml)", positional=True)
    set: list[str] = setting([], "override any recipe key, e.g. training.lr=1e-4", metavar="KEY=VALUE")
    overwrite: bool = overwrite_setting("export.output", "; start over from no checkpoint")
    resume: bool = setting(False, "continue from the newest checkpoint")


@dataclass(kw_only=True)
class RecipeInfo(Settings):
    """A recipe's top-level keys."""

    name: str | None = setting(None, "what the recipe is called", blank=True, cli=False)
    description: str | None = setting(None, "what it does", blank=True, cli=False)
    source: str | None = setting(None, SOURCE_HELP)
    task: Literal[TASKS] | None = task_setting()
    teacher: str | None = setting(None, "the model to distil from (default: source)")
    pretrain: dict | None = setting(None, "train a ViT from scratch: model (ViTConfig fields), image_processor",
                                    cli=False)  # fmt: skip


@dataclass(kw_only=True)
class RecipeEvaluation(Settings):
    """A recipe's before/after table (recipe section ``evaluation``)."""

    before: bool = setting(True, "score the source and the calibrated merged model before training", cli=False)
    batch_size: int = setting(256, "evaluation batch size", at_least=1, cli=False)
    speed: bool = setting(True, "measure images/s of the source and the merged model", cli=False)
    speed_batch_size: int = setting(256, "batch size of the speed measurement", at_least=1, cli=False)
    zero_shot: bool = setting(False, "a dual encoder's rows: zero-shot accuracy on the evaluation split's classes",
                              cli=False)  # fmt: skip
    prompt_template: str = setting(DEFAULT_TEMPLATE, PROMPT_TEMPLATE_HELP, cli=False)

    def check(self) -> None:
        super().check()
        _check_templates(self, "prompt_template")
        _check_zero_shot_only(self, "evaluation.zero_shot", "set evaluation.zero_shot: true")
        # (the speed measurement refused it only after the source was scored, naming bench's --batch-size)
        _check_batch_sizes(self, "speed_batch_size", (self.speed_batch_size,))


# Recipe section -> the groups whose fields are its keys (the top-level keys are `RecipeInfo`'s).
RECIPE_SECTIONS: dict[str, tuple[type, ...]] = {
    "merge": (MergeSettings, CalibrationSettings),
    "data": (DataSettings,),
    "training": (TrainSettings,),
    "evaluation": (RecipeEvaluation,),
    "export": (OutputSettings, CheckpointSettings, HubSettings),
}


def recipe_key(spec: dataclasses.Field) -> str:
    """A setting's key in a recipe section (its field name, or the older spelling `setting(key=...)` keeps)."""
    return spec.metadata.get("key") or spec.name


# ----------------------------------------------------------------------------------------------------------------
# Measuring speed (`retrofit bench`) and sweeping settings (`retrofit sweep`)
# ----------------------------------------------------------------------------------------------------------------

DTYPE_NAMES = {"fp32": "fp32", "float32": "fp32", "float": "fp32", "bf16": "bf16", "bfloat16": "bf16",
               "fp16": "fp16", "float16": "fp16", "half": "fp16"}  # fmt: skip
COMPILE_MODES = ("eager", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
DEVICE = r"cpu|cuda(:(0|[1-9][0-9]*))?"  # as torch reads it: N in ASCII digits, no leading zero


def check_device(device: str) -> None:
    """Refuse in one line a device other than cpu, cuda or cuda:N (`DEVICE`)."""
    import re

    if not isinstance(device, str) or not re.fullmatch(DEVICE, device):
        raise RetrofitError(f"unknown device {shown(device)}; use cpu, cuda or cuda:N")


def check_dtype(dtype: str) -> None:
    """Refuse in one line a dtype name other than those of `DTYPE_NAMES`."""
    if not isinstance(dtype, str) or dtype not in DTYPE_NAMES:
        raise RetrofitError(f"unknown dtype {shown(dtype)}; use fp32, bf16 or fp16")


MAX_DIMENSION = 2**63 - 1  # the largest tensor dimension torch takes; larger sizes overflow inside torch
MAX_MIN_TIME = 3600.0  # seconds per timed block; more is a typo, not a benchmark


def parse_compile(text: str | None) -> tuple[str, ...]:
    """Compile modes to measure: ``eager``/``off``, ``default``, ``reduce-overhead`` (CUDA graphs), ``max-autotune``
    ..., comma-separated; ``both`` = eager and default."""
    if text is None:
        return ("eager",)
    modes: list[str] = []
    for part in comma_items(text, "default,reduce-overhead"):
        if part == "both":
            modes += ["eager", "default"]
        elif part in ("off", "none", "eager"):
            modes.append("eager")
        elif part in COMPILE_MODES:
            modes.append(part)
        else:
            raise ValueError(f"has the unknown mode {shown(part)}; use {', '.join(COMPILE_MODES)}, both or off")
    return tuple(dict.fromkeys(modes))


def parse_merges(text: str | None) -> tuple[tuple[str, int], ...]:
    """``"6:8"``, ``"half:8"`` or several comma-separated -> ((after_layer or 'half', tokens), ...), repeats dropped;
    None -> () (no merge)."""
    import re

    if text is None:
        return ()
    merges = []
    for part in comma_items(text, "6:8 or half:8,3:16"):
        match = re.fullmatch(r"(half|\d+):(\d+)", part)
        if not match:
            raise ValueError(f"{shown(part)} is not K:M (e.g. 6:8 or half:8)")
        merges.append((match.group(1), int(match.group(2))))
    return tuple(dict.fromkeys(merges))


def _check_batch_sizes(settings: Settings, name: str, sizes: tuple[int, ...]) -> None:
    if not sizes:
        settings.refuse(name, "is empty; give one or more sizes >= 1, e.g. 1,32,256")
    for size in sizes:
        if size > MAX_DIMENSION:
            settings.refuse(name, f"{size} is too large to be a tensor dimension (at most 2**63 - 1); lower it")


@dataclass(kw_only=True)
class BenchSettings(Settings):
    """What `retrofit bench` measures and how."""

    device: str = setting("cpu", "cpu, cuda or cuda:N")
    dtype: str = setting("fp32", "fp32, bf16 or fp16")
    batch_sizes: tuple[int, ...] = setting((1, 32, 256), "comma-separated batch sizes", flag="--batch-size",
                                           parse=comma_ints, at_least=1)  # fmt: skip
    compile_modes: tuple[str, ...] = setting(
        ("eager",), "torch.compile the models: default, reduce-overhead (CUDA graphs), max-autotune, ...; "
        "comma-separate several; 'both' = eager and default; bare --compile = default", flag="--compile",
        metavar="MODES", nargs="?", const="default", parse=parse_compile,
    )  # fmt: skip
    warmup: int = setting(3, "warm-up passes per model and batch size", at_least=1)
    repeats: int = setting(5, "timed repeats; the median is reported", at_least=1)
    min_time: float = setting(
        0.5, f"seconds per timed block, 0 to {MAX_MIN_TIME:g}", interval=(0, MAX_MIN_TIME, f"[0, {MAX_MIN_TIME:g}]"),
        expect=f"a number of seconds from 0 to {MAX_MIN_TIME:g}",
    )  # fmt: skip
    latency_iters: int = setting(20, "batch-1 passes for p50/p90 (0: skip)", at_least=0)
    seed: int = setting(0, "seed of the random inputs", interval=SEEDS, cli=False)

    def check(self) -> None:
        super().check()
        check_device(self.device)
        check_dtype(self.dtype)
        _check_batch_sizes(self, "batch_sizes", self.batch_sizes)
        self.batch_sizes = tuple(dict.fromkeys(self.batch_sizes))  # as the option's text gives them: repeats dropped
        for mode in self.compile_modes:
            if mode not in COMPILE_MODES:
                modes = ", ".join(COMPILE_MODES)
                raise RetrofitError(f"unknown --compile mode {shown(mode)}; use {modes}, both or off")


@dataclass(kw_only=True)
class BenchArgs(BenchSettings):
    """`retrofit bench`: images/s, latency and memory of source and merged models, measured alternately."""

    models: list[str] = setting(
        help="checkpoint folders, Hub ids, exports, .onnx files of `retrofit export-onnx` (run in ONNX Runtime), or "
        "random-weight shapes (vit-b16, ..., dinov3-vitb16, beit-b16)",
        positional=True, nargs="+",
    )  # fmt: skip
    merge: tuple[tuple[str, int], ...] = setting(
        (), "also measure a merged twin of each unmerged model: after layer K (or 'half') with M tokens; "
        "comma-separate several. Already-merged models (exports) are measured as they are", metavar="K:M",
        parse=parse_merges,
    )  # fmt: skip
    threads: int | None = setting(None, "CPU threads for torch, 1 to the machine's CPU count (default: torch's)")
    json: str | None = setting(None, "write all measurements to FILE", metavar="FILE", written=True)
    plot: str | None = setting(
        None, "draw images/s against batch size (each model and --compile mode; the batch size from which each merged "
        "model is faster marked) into FILE.png: pass several --batch-size values, e.g. 1,2,4,...,256", metavar="FILE",
        written=True,
    )  # fmt: skip
    overwrite: bool = overwrite_setting("the --json and --plot files")
    card: str | None = setting(
        None, "write the speed table into this export's README.md", metavar="EXPORT", written=True
    )

    def check(self) -> None:
        super().check()
        if self.plot is not None and not self.plot.endswith(".png"):
            named = (
                0 < len(self.plot) <= 200 and self.plot.isprintable() and Path(self.plot).name not in ("", ".", "..")
            )
            example = Path(self.plot).with_suffix(".png") if named else "speed.png"
            self.refuse("plot", f"must be a file name ending in .png, e.g. {example} (got {shown(self.plot)})")
        cpus = os.cpu_count() or 1
        if self.threads is not None and not 1 <= self.threads <= cpus:
            self.refuse("threads", f"must be between 1 and {cpus}, this machine's CPU count (got {self.threads})")


METHODS = ("calibrate", "finetune")
SWEEP_NEEDS_DATA = "is required: the sweep measures accuracy on it (or pass --dry-run for FLOPs alone)"
SWEEP_SPLIT = "test"  # the split a sweep measures on, unless --split (or --holdout) says otherwise
SWEEP_LIMIT = 1000  # sweep scores every setting: the first 1000 images, unless --limit or --sample says otherwise
SWEEP_TOKENS = (8, 16, 32)  # sweep's default M values: the paper's M = 8 (after L/2) and two milder merges


def scored_images(settings: "SweepSettings") -> dict:
    """The images a sweep scores every setting on (`chosen_images`): --limit, --sample, or the first `SWEEP_LIMIT`
    (left out of the settings, so that a copy given --sample is not refused for a --limit no one gave)."""
    limit = SWEEP_LIMIT if settings.limit is None and settings.sample is None else settings.limit
    return chosen_images(limit, settings.sample, settings.seed)


@dataclass(kw_only=True)
class SweepSettings(Settings):
    """What `retrofit sweep` tries and how it measures each setting."""

    after_layers: tuple[int, ...] | None = setting(
        None, "comma-separated K values, e.g. 3,6,9 (default: a quarter, half and three quarters of the depth)",
        flag="--after-layer", metavar="K,...", parse=comma_ints, at_least=1,
    )  # fmt: skip
    tokens: tuple[int, ...] | None = setting(
        None, f"comma-separated M values, e.g. 4,8,16 (default: {','.join(map(str, SWEEP_TOKENS))}, those below the "
        "number of patches)",
        metavar="M,...", parse=comma_ints, at_least=1,
    )  # fmt: skip
    data: str | None = setting(None, f"{DATA_HELP} (not with --dry-run)")
    data_revision: str | None = data_revision_setting()
    split: str | None = setting(None, f"split to measure accuracy on (default: {SWEEP_SPLIT}; not with --holdout, "
                                "which measures on --calibrate-split)")  # fmt: skip
    calibrate_split: str = setting(TRAIN_SPLIT, "split to calibrate (and fine-tune) on")
    limit: int | None = setting(None, f"evaluate on the first N images (default: {SWEEP_LIMIT}, unless --sample)",
                                metavar="N", at_least=1)  # fmt: skip
    sample: int | None = sample_setting("evaluate on", "instead of the first --limit; seed 0")
    holdout: float | None = holdout_setting(
        "hold this fraction of --calibrate-split out of calibration and fine-tuning and measure on it instead of "
        "--split, for data without an evaluation split (an image folder of class folders): the images `finetune "
        "--holdout F` holds out"
    )
    image_column: str = image_column_setting()
    label_column: str = setting("label", "label column of the data (not read for backbones)")
    calibrate_images: int = calibrate_images_setting()
    method: Literal[METHODS] = setting("calibrate", "calibrate (k-means start) or finetune (a short fine-tune)")
    finetune_steps: int = setting(100, "steps per setting with --method finetune", at_least=1)
    finetune_batch_size: int = setting(
        64, "batch size of those steps; they read a shuffled sample of steps × this many images", at_least=1
    )
    target_speedup: float | None = setting(None, "name the most accurate setting at least this fast")
    batch_size: int = setting(64, "evaluation batch size", at_least=1)
    bench_batch_size: int = setting(32, "batch size of the speed test", at_least=1)
    bench_repeats: int = setting(3, "timed repeats of the speed test", at_least=1)
    device: str = setting("cpu", "cpu, cuda or cuda:N for the speed test")
    dtype: str = setting("fp32", "fp32, bf16 or fp16 for the speed test")
    zero_shot: bool = setting(False, "rank a dual encoder's settings by zero-shot top-1 on the classes of DATA (one "
                              "prompt per class) instead of image-embedding similarity")  # fmt: skip
    prompt_template: str = setting(DEFAULT_TEMPLATE, PROMPT_TEMPLATE_HELP + " (with --zero-shot)", metavar="TEXT")
    seed: int = setting(0, "seed of the calibration sample", interval=SEEDS, cli=False)

    def check(self) -> None:
        super().check()
        for name, example in (("after_layers", "3,6,9"), ("tokens", "4,8,16")):  # as the option's text gives them
            if getattr(self, name) is None:
                continue  # the default grid, from the model (`retrofit.sweep.default_grid`)
            if not getattr(self, name):
                self.refuse(name, f"is empty; give one or more values, e.g. {example}")
            setattr(self, name, tuple(dict.fromkeys(getattr(self, name))))
        _check_limit_or_sample(self)  # (neither: the first `SWEEP_LIMIT`, `scored_images`)
        if self.holdout is not None and self.split is not None:  # even --split test, the default: the user asked
            held = f"measures on the images it holds out of --calibrate-split '{self.calibrate_split}'"
            self.refuse("holdout", f"{held}, and --split names '{self.split}'; drop one")
        if self.split is None and self.holdout is None:
            self.split = SWEEP_SPLIT
        if self.holdout is None and self.split == self.calibrate_split:
            self.refuse("split", f"names the split calibration and fine-tuning read, '{self.split}', so each setting "
                        "would be scored on images it saw; measure on another split, or hold some of it out with "
                        "--holdout 0.1")  # fmt: skip
        _check_templates(self, "prompt_template")
        _check_zero_shot_only(self)
        if self.target_speedup is not None and not self.target_speedup > 1:
            self.refuse("target_speedup", f"must be a finite number above 1, e.g. 1.8 (got {self.target_speedup})")
        _check_batch_sizes(self, "bench_batch_size", (self.bench_batch_size,))
        BenchSettings(device=self.device, dtype=self.dtype)  # their checks, under the same option names


@dataclass(kw_only=True)
class SweepArgs(SweepSettings):
    """`retrofit sweep`: accuracy and speed over after-layer × tokens; pick a setting."""

    source: str = setting(help=f"{SOURCE_HELP} (an unmerged classifier, backbone or dual encoder), or a shape such "
                          "as vit-b16 with --dry-run", positional=True)  # fmt: skip
    output: str | None = setting(None, "folder for sweep.md, sweep.json and sweep.png (default: sweep-<source>)",
                                 short="-o", written=True)  # fmt: skip
    overwrite: bool = overwrite_setting("--output")
    dry_run: bool = setting(
        False, "print each setting's theoretical GFLOPs and FLOPs ratio from the config alone (no weights, data or "
        "measurement; nothing written)",
    )  # fmt: skip

    def check(self) -> None:
        super().check()
        if not self.dry_run and self.data is None:
            self.refuse("data", SWEEP_NEEDS_DATA)
        for name in ("data", "sample", "holdout", "output"):  # --dry-run reads no data and writes nothing: a user
            # giving them expects both
            if self.dry_run and getattr(self, name) is not None:
                self.refuse(name, "is not used with --dry-run, which reads the config alone and writes nothing; "
                            "drop one of them")  # fmt: skip


# export-onnx's precisions and, by default, the largest |ONNX - PyTorch| output difference each accepts (relative to
# the outputs' scale)
ONNX_TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2}


@dataclass(kw_only=True)
class ExportOnnxArgs(Settings):
    """`retrofit export-onnx`: an ONNX graph of a model that takes any batch size, checked against PyTorch."""

    model: str = setting(help="a retrofit export (or a checkpoint retrofit converts, to compare with)", positional=True)
    output: str = setting(
        help="the .onnx file to write (its weights may go beside it, in OUTPUT.data: keep the two together)",
        short="-o",
        written=True,
    )
    dtype: Literal[tuple(ONNX_TOLERANCE)] = setting("fp32", "the graph's precision (fp16: half the size, for GPUs)")
    images: int = setting(
        4, "noise images, prepared by the model's own processor, for the check (one batch)", at_least=2,
        at_most=MAX_CHECK_IMAGES,
    )  # fmt: skip
    tolerance: float | None = setting(
        None, "largest accepted |ONNX - PyTorch| output difference, relative to the outputs' scale (default: "
        + ", ".join(f"{limit:.0e} for {dtype}".replace("e-0", "e-") for dtype, limit in ONNX_TOLERANCE.items()) + ")",
        positive=True,
    )  # fmt: skip
    overwrite: bool = overwrite_setting("--output")
