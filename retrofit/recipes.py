"""Recipes: a YAML file describing one complete run (source, merge, data, training, evaluation, export), run with
``retrofit run RECIPE``. Options of ``run`` and ``--set section.key=value`` override recipe keys.

The schema is `retrofit.settings`: a recipe's top-level keys are `RecipeInfo`'s fields and each section's keys the
fields of its groups (`RECIPE_SECTIONS`: ``training:`` is `TrainSettings`, ``data:`` is `DataSettings`, ...), with
their defaults and checks. Unknown keys are refused naming the nearest valid key.

A recipe either fine-tunes a merged model (``source`` + ``merge``) or pretrains a baseline from scratch
(``pretrain``). ``source: retrofit:NAME`` names a checkpoint shipped in ``retrofit/assets/NAME``. Paths in a recipe
(``source``, ``teacher``, ``data.name``, ``export.output``, ...) are relative to the current folder, as on the command
line, not to the recipe's folder: the shipped recipes are run from the repository root.
"""

from __future__ import annotations

import contextlib
import os
import re
import typing
from collections.abc import Callable, Mapping
from dataclasses import fields
from pathlib import Path
from typing import Literal

from .atomic import releases_write_locks
from .errors import (
    RetrofitError,
    brief,
    check_arguments,
    counted,
    describe_os_error,
    did_you_mean,
    log_to_stderr,
)
from .reads import reads_each_folder_once
from .settings import (
    RECIPE_SECTIONS,
    FinetuneArgs,
    PretrainSettings,
    RecipeEvaluation,
    RecipeInfo,
    RunArgs,
    SettingError,
    recipe_key,
)

# Numbers written as Python's int() and float() read them, as the options do: YAML 1.1 reads some as text (1e-4, +.5,
# 08), and `_as_meant` takes those as numbers where the setting is one.
NUMBER = re.compile(r"[-+]?(\d[\d_]*\.?[\d_]*|\.\d[\d_]*)([eE][-+]?\d+)?")
DECIMAL = re.compile(r"[-+]?\d[\d_]*")
# Mappings passed through as keyword arguments (checked where they are used), so `--set` may reach inside them.
FREE_FORM = {"pretrain.model", "pretrain.image_processor"}


def section_keys(section: str, *, pretrain: bool = False) -> dict[str, tuple[type, str]]:
    """A recipe section's keys -> (the group that holds it, its field name). A pretraining recipe's ``training``
    is `PretrainSettings` (the same keys, other defaults)."""
    groups = (PretrainSettings,) if pretrain and section == "training" else RECIPE_SECTIONS[section]
    return {recipe_key(spec): (group, spec.name) for group in groups for spec in fields(group)}


def _top_keys() -> list[str]:
    return [spec.name for spec in fields(RecipeInfo)] + list(RECIPE_SECTIONS)


def validate(recipe: dict, where: str = "recipe") -> dict:
    """Check every key and value against the settings and fill in the defaults: {top-level key: value, section:
    {key: value}}. An unknown key or a bad value is a `RetrofitError` naming it (``merge.tokens in recipe 'x.yaml'
    must be a whole number, not 'eight'``)."""
    if not isinstance(recipe, dict):
        raise RetrofitError(f"{where} must be a YAML mapping of sections (source, merge, data, training, ...)")
    for key in recipe:
        if key not in _top_keys():
            raise RetrofitError(f"unknown key '{key}' in {where}{did_you_mean(str(key), _top_keys())}")
    out = {}
    top = {key: recipe.get(key) for key in (spec.name for spec in fields(RecipeInfo))}
    out.update(vars(_build(RecipeInfo, top, lambda name: name, where)))
    if out["pretrain"] is not None and not isinstance(out["pretrain"], dict):
        raise RetrofitError(f"'pretrain' in {where} must be a mapping with keys model, image_processor")
    if out["pretrain"] is not None:
        _refuse_finetune_keys(recipe, where)
    for section in RECIPE_SECTIONS:
        given = recipe.get(section)
        given = {} if given is None else given  # an empty section; `[]`, `0` or `false` is refused below
        keys = section_keys(section, pretrain=out["pretrain"] is not None)
        if not isinstance(given, dict):
            raise RetrofitError(f"'{section}' in {where} must be a mapping with keys {', '.join(keys)}")
        for key in given:
            if key not in keys:
                raise RetrofitError(f"unknown key '{section}.{key}' in {where}{did_you_mean(str(key), keys)}")
        values = {}
        for group in dict.fromkeys(owner for owner, _ in keys.values()):
            mine = {name: _as_meant(group, name, given[key])
                    for key, (owner, name) in keys.items() if owner is group and key in given}  # fmt: skip
            _require(group, mine, section, where)
            built = _build(group, mine, lambda name, s=section, g=group: f"{s}.{_key_of(g, name)}", where)
            values.update({_key_of(group, name): value for name, value in vars(built).items()})
        out[section] = values
    if out["pretrain"] is None:
        if not out["source"]:
            raise RetrofitError(f"{where} needs 'source' (a Hub id, folder or retrofit:NAME) or a 'pretrain' section")
        if out["merge"]["after_layer"] is None or out["merge"]["tokens"] is None:
            raise RetrofitError(f"{where} needs merge.after_layer and merge.tokens")
    elif out["source"]:
        raise RetrofitError(f"{where} has both 'source' and 'pretrain'; a recipe either fine-tunes or pretrains")
    if out["pretrain"] is not None and out["export"]["push_to_hub"]:
        raise RetrofitError(
            f"{where} pretrains a plain transformers checkpoint, which export.push_to_hub does not upload; remove it "
            "and upload the folder with `hf upload`"
        )
    return out


# What only a fine-tune reads: a pretraining recipe naming one would ignore it (`run pre.yaml --tokens 8` merged
# nothing without a word). ``export.push_to_hub`` is refused in `validate` with its own hint.
FINETUNE_ONLY = ("teacher", "task", "merge", "evaluation.before", "evaluation.speed", "evaluation.speed_batch_size",
                 "evaluation.zero_shot", "evaluation.prompt_template")  # fmt: skip


def _refuse_finetune_keys(recipe: dict, where: str) -> None:
    """Refuse a pretraining recipe that sets a key only a fine-tune reads (`FINETUNE_ONLY`)."""
    for dotted in FINETUNE_ONLY:
        section, _, key = dotted.partition(".")
        value = recipe.get(section)
        given = (isinstance(value, dict) and key in value) if key else value not in (None, {})
        if given:
            raise RetrofitError(
                f"{where} pretrains from scratch, which reads no {dotted}{'.*' if section == 'merge' else ''} (it "
                "applies to fine-tuning a source): remove it"
            )


def _key_of(group: type, name: str) -> str:
    return recipe_key(next(spec for spec in fields(group) if spec.name == name))


def _require(group: type, values: dict, section: str, where: str) -> None:
    """Refuse a section that lacks a key with no default (data.name, export.output)."""
    from dataclasses import MISSING

    for spec in fields(group):
        if spec.default is MISSING and spec.default_factory is MISSING and spec.name not in values:
            raise RetrofitError(f"{where} needs {section}.{recipe_key(spec)} ({spec.metadata['help']})")


def _build(group: type, values: dict, name_of: Callable[[str], str], where: str):
    """`group(**values)`, a bad value refused naming its recipe key."""
    try:
        return group(**values)
    except SettingError as exc:
        raise RetrofitError(f"{name_of(exc.name)} in {where} {exc.problem}") from None


def _as_meant(group: type, name: str, value):
    """`value` as the recipe's author meant it, as the option of the setting reads it: text that spells a number is
    that number where the setting is one (``1e-4``, ``+.5``, ``08``: YAML 1.1 reads them as text; a text setting such
    as a revision ``1234e56`` stays text), and YAML 1.1's booleans ``no``/``yes`` (``false``/``true``,
    ``off``/``on``) are the words ``no``/``yes`` where the setting is a choice of words that has them
    (``mixed_precision: no``)."""
    kind = typing.get_type_hints(group).get(name)
    kinds = set(typing.get_args(kind)) | {kind}
    if isinstance(value, str) and NUMBER.fullmatch(value.strip()):
        with contextlib.suppress(ValueError):  # (`1__0`: text, which the setting refuses)
            if int in kinds and DECIMAL.fullmatch(value.strip()):
                return int(value, 10)
            if float in kinds:
                return float(value)
    if isinstance(value, bool):
        word = "yes" if value else "no"
        if typing.get_origin(kind) is Literal and word in typing.get_args(kind):
            return word
    return value


def parse_value(text: str):
    """A ``--set`` value as YAML reads it (``1e-4`` a number, ``true`` a bool, ``[1, 2]`` a list), else the text."""
    import yaml

    try:
        return yaml.load(text, Loader=_loader())  # noqa: S506 - a SafeLoader (see `_loader`)
    except (yaml.YAMLError, ValueError, _RepeatedKey):  # ValueError: an integer of thousands of digits
        return text
    except RecursionError:
        raise RetrofitError(f"--set value {brief(text, 60)!r} is nested too deeply; give a plain value") from None


def apply_overrides(recipe: dict, overrides: dict[str, object]) -> dict:
    """Set dotted keys in a raw recipe: ``training.epochs``, or one level deeper inside a free-form mapping
    (`FREE_FORM`), such as ``pretrain.model.hidden_size``. A mapping given for a mapping sets the keys it names (the
    others stay); null for a whole section is refused. Unknown keys are refused like in the file."""
    for dotted, value in overrides.items():
        if not isinstance(dotted, str):
            raise RetrofitError(f"an override's key is dotted text such as 'training.lr', not {_kind(dotted)}")
        keys = dotted.split(".")
        section = keys[0]
        if section not in _top_keys():  # a section's key without its section (`lr`) names where it lives
            owners = [f"{name}.{section}" for name in RECIPE_SECTIONS
                      if section in section_keys(name) | section_keys(name, pretrain=True)]  # fmt: skip
            hint = f"; did you mean {' or '.join(map(repr, owners))}?" if owners else did_you_mean(section, _top_keys())
            raise RetrofitError(f"unknown override '{dotted}'{hint}")
        if section in RECIPE_SECTIONS:  # a key of either kind of recipe: `validate` refuses the other kind's
            valid = section_keys(section) | section_keys(section, pretrain=True)
        elif section == "pretrain":
            valid = {"model": 0, "image_processor": 0}
        elif len(keys) > 1:
            raise RetrofitError(f"unknown override '{dotted}'; '{section}' holds no keys: --set {section}=VALUE")
        if len(keys) > 1 and keys[1] not in valid:
            raise RetrofitError(f"unknown override '{dotted}'{did_you_mean(keys[1], valid)}")
        if len(keys) > 3 or len(keys) == 3 and ".".join(keys[:2]) not in FREE_FORM:
            raise RetrofitError(f"unknown override '{dotted}'; only {', '.join(sorted(FREE_FORM))} take a third key")
        target = recipe
        for key in keys[:-1]:
            if not isinstance(target.get(key), dict):
                target[key] = {}
            target = target[key]
        given = target.get(keys[-1])
        if isinstance(given, dict) and value is None and dotted in RECIPE_SECTIONS:
            raise RetrofitError(
                f"override '{dotted}' is null, which would drop every key of the recipe's {dotted} section; set its "
                f"keys instead: --set {dotted}.KEY=VALUE"
            )
        # A mapping for a mapping sets the keys it names (`--set 'training={lr: 1.0e-4}'` kept max_steps, epochs,
        # ...: replacing the section dropped them to their defaults without a word).
        target[keys[-1]] = _merged(given, value) if isinstance(given, dict) and isinstance(value, Mapping) else value
    return recipe


def _merged(given: dict, value: Mapping) -> dict:
    """`given` with the keys of `value` set, mappings inside merged the same way (new dicts: YAML aliases share)."""
    out = dict(given)
    for key, new in value.items():
        old = out.get(key)
        out[key] = _merged(old, new) if isinstance(old, dict) and isinstance(new, Mapping) else new
    return out


def load_recipe(path: str | Path, overrides: dict[str, object] | None = None) -> dict:
    """Read, override and validate a recipe file."""
    import yaml

    if not isinstance(path, str | os.PathLike):
        raise RetrofitError(f"a recipe is a YAML file's path, such as recipes/fashion-mnist.yaml, not {_kind(path)}")
    if overrides is not None and not isinstance(overrides, Mapping):
        raise RetrofitError(f"overrides must be a mapping such as {{'training.lr': 1e-4}}, not {_kind(overrides)}")
    path = Path(path)
    if path.is_dir():
        raise RetrofitError(f"recipe '{path}' is a folder; pass a YAML file such as recipes/fashion-mnist.yaml")
    if not path.exists():
        raise RetrofitError(f"recipe '{path}' does not exist; pass a YAML file such as recipes/fashion-mnist.yaml")
    if not path.is_file():  # a pipe (`<(...)`) or a device, which may never end: read only files
        raise RetrofitError(f"recipe '{path}' is not a file (a pipe or a device?); save the recipe to a file first")
    try:
        text = path.read_text(encoding="utf-8")
        raw = yaml.load(text, Loader=_loader())  # noqa: S506 - a SafeLoader that also refuses repeated keys
    except _RepeatedKey as exc:
        raise RetrofitError(f"recipe '{path}' {exc}; keep one of them") from None
    except yaml.YAMLError as exc:
        raise RetrofitError(f"recipe '{path}' is not valid YAML ({brief(exc)})") from None
    except UnicodeDecodeError as exc:
        raise RetrofitError(f"recipe '{path}' is not UTF-8 text ({brief(exc)}); save it as UTF-8") from None
    except ValueError as exc:  # an integer of thousands of digits, which Python refuses to convert
        raise RetrofitError(f"recipe '{path}' holds a value YAML cannot read ({brief(exc, 100)})") from None
    except RecursionError:
        raise RetrofitError(f"recipe '{path}' is nested too deeply to read; a recipe is sections of settings") from None
    except OSError as exc:
        raise RetrofitError(f"cannot read recipe '{path}': {describe_os_error(exc)}") from None
    if raw is None:
        raise RetrofitError(f"recipe '{path}' is empty; start from one in recipes/, such as recipes/fashion-mnist.yaml")
    if not isinstance(raw, dict):
        raise RetrofitError(f"recipe '{path}' must be a YAML mapping")
    _check_size(raw, f"recipe '{path}'")
    overrides = overrides or {}
    if _holdout_without_eval_split(overrides) and isinstance(raw.get("data"), dict) and raw["data"].get("eval_split"):
        raw["data"] = {key: value for key, value in raw["data"].items() if key != "eval_split"}
    return validate(apply_overrides(raw, overrides), where=f"recipe '{path}'")


def _holdout_without_eval_split(overrides: Mapping[str, object]) -> bool:
    """Whether `overrides` set data.holdout and not data.eval_split: the held-out images are then scored in place of
    the recipe's evaluation split (``run recipes/fashion-mnist.yaml --holdout 0.1`` had to be refused for the
    recipe's ``eval_split: test``). A recipe's ``eval_split: ''`` stays: held out, not scored."""
    data = overrides.get("data")
    data = data if isinstance(data, Mapping) else {}
    holdout = overrides.get("data.holdout", data.get("holdout"))
    return holdout is not None and "data.eval_split" not in overrides and "eval_split" not in data


# More values than any recipe holds (a CLIP recipe's 80 prompt templates are the most): YAML aliases can make a
# short file read as billions of them (a list of a list of ... repeated by alias), which no check should walk.
MAX_VALUES = 10_000


def _check_size(raw: dict, where: str) -> None:
    """Refuse a recipe holding more than `MAX_VALUES` values, counting each use of an alias."""
    pending, count = [raw], 0
    while pending:
        value = pending.pop()
        count += 1
        if count > MAX_VALUES:
            raise RetrofitError(
                f"{where} holds more than {MAX_VALUES:,} values (an alias repeated inside itself?); a recipe is a "
                "few dozen settings"
            )
        if isinstance(value, dict):
            pending.extend(value.keys())
            pending.extend(value.values())
        elif isinstance(value, list | tuple):
            pending.extend(value)


class _RepeatedKey(Exception):
    """A key given twice in one mapping of a recipe (PyYAML keeps the last one silently)."""


def _loader() -> type:
    """`yaml.SafeLoader` refusing a key repeated in one mapping: ``training:`` twice would drop the first section's
    settings without a word. The keys ``<<: *alias`` merges in may be repeated (that is what merging is for).
    Integers read as the options read them (Python's ``int``), not as YAML 1.1 does: ``010`` is ten (YAML 1.1: octal
    8, where ``--tokens 010`` is 10), and ``1:30`` stays text (YAML 1.1: base 60, 90); what YAML 1.1 reads as text
    (``1e-4``, ``08``) `_as_meant` reads as the setting's option would."""
    import yaml

    class RecipeLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            if isinstance(node, yaml.MappingNode):
                seen: dict = {}
                for key_node, _ in node.value:
                    if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                        continue
                    key = self.construct_object(key_node)
                    if key in seen:
                        lines = f"lines {seen[key] + 1} and {key_node.start_mark.line + 1}"
                        raise _RepeatedKey(f"sets '{key}' twice in one mapping ({lines})")
                    seen[key] = key_node.start_mark.line
            return super().construct_mapping(node, deep=deep)

        def construct_yaml_int(self, node):
            text = self.construct_scalar(node)
            if ":" in text:  # 1:30 (YAML 1.1's base 60)
                return text
            # decimal as the options read it (010 is ten), 0x/0b as Python reads them; a ValueError (thousands of
            # digits) is YAML that cannot be read
            return int(text, 0 if text.lstrip("+-")[1:2] in ("x", "b") else 10)

        def construct_yaml_float(self, node):
            text = self.construct_scalar(node)
            return text if ":" in text else super().construct_yaml_float(node)

    RecipeLoader.add_constructor("tag:yaml.org,2002:int", RecipeLoader.construct_yaml_int)
    RecipeLoader.add_constructor("tag:yaml.org,2002:float", RecipeLoader.construct_yaml_float)
    return RecipeLoader


def _kind(value) -> str:
    """What `value` is, in a few words (never its possibly long repr)."""
    return f"a {type(value).__name__}"


def _meant(dotted: str, value):
    """`value` of the recipe key `dotted` (``section.key``) as the setting reads it (`_as_meant`): ``1e-4`` and
    0.0001, ``no`` and false, are one value given twice."""
    section, _, key = dotted.partition(".")
    if section not in RECIPE_SECTIONS:
        return value
    owner = (section_keys(section) | section_keys(section, pretrain=True)).get(key)
    return value if owner is None else _as_meant(owner[0], owner[1], value)


def _given_value(overrides: dict[str, object], name: str) -> object:
    """The value `overrides` give key `name` (``section.key``), directly or in a whole section's mapping."""
    if name in overrides:
        return overrides[name]
    section, _, key = name.rpartition(".")
    whole = _given_value(overrides, section) if section else None
    return whole.get(key) if isinstance(whole, dict) else None


def option_overrides(values: dict[str, object]) -> dict[str, object]:
    """``run``'s options as recipe keys: {"lr": 1e-4, "data": "x"} -> {"training.lr": 1e-4, "data.name": "x"}. Only
    settings that are options count: ``--batch-size`` is training.batch_size, not evaluation.batch_size (no option)."""
    owner = {spec.name: (section, recipe_key(spec)) for section, groups in RECIPE_SECTIONS.items()
             for group in groups for spec in fields(group) if spec.metadata.get("cli", True)}  # fmt: skip
    out = {}
    for name, value in values.items():
        if name in owner:
            section, key = owner[name]
            out[f"{section}.{key}"] = value
        else:
            out[name] = value  # a top-level key (source, task, teacher)
    return out


def finetune_args(recipe: dict, *, overwrite: bool, resume: bool) -> FinetuneArgs:
    """The `FinetuneArgs` a fine-tune recipe describes (its evaluation batch size is the training's, unless set)."""
    values = {"source": str(recipe["source"]), "task": recipe["task"], "teacher": recipe["teacher"]}
    for section in ("merge", "data", "training", "export"):
        for key, (_, name) in section_keys(section).items():
            values[name] = recipe[section][key]
    values["eval_batch_size"] = values["eval_batch_size"] or recipe["evaluation"]["batch_size"]
    return FinetuneArgs(**values, overwrite=overwrite, resume=resume)


# ----------------------------------------------------------------------------------------------------------------
# Running a recipe
# ----------------------------------------------------------------------------------------------------------------


def run_from_cli(
    args: RunArgs, namespace, *, log: Callable[[str], None] = log_to_stderr, show: Callable[[str], None] = print
) -> dict:
    """`retrofit run`: the recipe, with the options given (`cli._recipe_options`) and ``--set`` as overrides; the
    before/after table goes to `show` (stdout), every other line to `log` (stderr)."""
    given = {name: value for name, value in vars(namespace).items() if name not in _RUN_OWN}
    overrides = option_overrides(given)
    given_keys = dict.fromkeys(overrides, "an option")  # each key given, by whom, to refuse one given two values
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise RetrofitError(f"--set {item!r} must look like section.key=value, e.g. training.epochs=0.5")
        key, value = key.strip(), parse_value(value)
        named = {f"{key}.{name}": each for name, each in value.items()} if isinstance(value, dict) else {key: value}
        for name, each in named.items():  # (a whole section, --set 'training={lr: 1}', gives each of its keys)
            earlier = _given_value(overrides, name)
            if name in given_keys and _meant(name, earlier) != _meant(name, each):  # the last one won without a word
                raise RetrofitError(f"--set {item!r} gives {name} another value than {given_keys[name]} does "
                                    f"({earlier!r}); give it once")  # fmt: skip
            given_keys[name] = "an earlier --set"
        overrides[key] = value
    return _run_recipe(args.recipe, overrides, overwrite=args.overwrite, resume=args.resume, log=log, show=show)


# What the parsed options of `run` hold besides recipe settings.
_RUN_OWN = {"command", "verbose", "recipe", "set", "overwrite", "resume"}


def run_recipe(
    path: str | Path,
    overrides: dict[str, object] | None = None,
    *,
    overwrite: bool = False,
    resume: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict:
    """Run a recipe end to end; returns a summary dict (a fine-tune's is also written as ``results.json`` next to the
    checkpoints; a pretraining's output holds ``training.json``). `progress` shows progress bars (False: none,
    datasets' too). The run seeds the random generators (``training.seed``); the caller's Python, NumPy and torch CPU
    generators are given back as they were."""
    check_arguments("run_recipe", log=log, flags={"overwrite": overwrite, "resume": resume, "progress": progress})
    return _run_recipe(path, overrides, overwrite=overwrite, resume=resume, progress=progress, log=log, show=log)


@reads_each_folder_once
def _run_recipe(
    path: str | Path,
    overrides: dict[str, object] | None,
    *,
    overwrite: bool,
    resume: bool,
    log: Callable[[str], None],
    show: Callable[[str], None],
    progress: bool = True,
) -> dict:
    """`run_recipe` for arguments already checked; a fine-tune's before/after table goes to `show`."""
    from .train import callers_random_state, progress_bars

    recipe = load_recipe(path, overrides)
    with callers_random_state(), progress_bars(progress):
        if recipe["pretrain"] is not None:
            return _run_pretrain(recipe, path, overwrite=overwrite, resume=resume, progress=progress, log=log)
        return _run_finetune(recipe, path, overwrite=overwrite, resume=resume, progress=progress, log=log,
                             show=show)  # fmt: skip


def _run_pretrain(recipe: dict, path, *, overwrite: bool, resume: bool, progress: bool, log) -> dict:
    from .atomic import refuse_inputs
    from .finetune import pretrain

    spec = recipe["pretrain"]
    if not isinstance(spec.get("model"), dict):
        raise RetrofitError("pretrain.model must be a mapping of ViTConfig fields (image_size, hidden_size, ...)")
    refuse_inputs(recipe["export"]["output"], (path,))  # the recipe is an input of the run too
    settings = {name: recipe[section][key] for section in ("data", "training")
                for key, (_, name) in section_keys(section, pretrain=True).items()}  # fmt: skip
    settings["eval_batch_size"] = settings["eval_batch_size"] or recipe["evaluation"]["batch_size"]
    result = pretrain(spec["model"], output=recipe["export"]["output"], image_processor=spec.get("image_processor"),
                      checkpoint_dir=recipe["export"]["checkpoint_dir"], resume=resume, overwrite=overwrite,
                      progress=progress, log=log, **settings)  # fmt: skip
    summary = {"recipe": recipe, "steps": result.steps, "accuracy": result.final_accuracy, "seconds": result.seconds}
    accuracy = "n/a (no data.eval_split)" if result.final_accuracy is None else f"{100 * result.final_accuracy:.2f} %"
    log(f"baseline accuracy: {accuracy}; trained {counted(result.steps, 'step')} in {result.seconds / 60:.1f} min")
    return summary


@releases_write_locks
def _run_finetune(recipe: dict, path, *, overwrite: bool, resume: bool, progress: bool, log, show) -> dict:
    """`finetune`'s steps with a before/after table: the source and the calibrated merged model are scored before
    training (the loop's step-0 evaluation) and timed against each other; the table goes into the model card."""
    from .atomic import is_launch_main, refuse_inputs, write_report
    from .benchmark import hardware_name, images_per_second
    from .checkpoints import scores_other_images
    from .cost import model_cost
    from .data import read_splits
    from .evaluation import first_images_text, is_backbone
    from .finetune import evaluated_images, finish, prepare, publish, train_prepared
    from .loading import classifier_is_new, is_merged, load_config, load_model, processor_image_size
    from .provenance import public_name

    args = read_splits(finetune_args(recipe, overwrite=overwrite, resume=resume))  # the splits as read
    refuse_inputs(args.output, (path,))  # the recipe is an input of the run too
    evaluation = RecipeEvaluation(**recipe["evaluation"])
    keys = (f"recipe '{path}': merge.after_layer", f"recipe '{path}': merge.tokens")  # a merge out of range names them
    ready = prepare(args, log=log, merge_names=keys)
    # A classifier the checkpoint does not hold (a backbone given --num-labels) starts random, and --num-labels gives
    # a classifier a new head (the source's predicts its own classes, in other ids): nothing to score before
    # training, so only the fine-tuned row has an accuracy.
    random_head = classifier_is_new(load_config(args.source), ready.config)
    new_classifier = random_head or args.num_labels is not None
    before = evaluation.before and not new_classifier
    # the baseline: the teacher where it is the source (for an export, the unmerged model it was made from), else the
    # source as loaded (an export: merged already)
    baseline = ready.teacher if args.teacher is None and ready.teacher is not None else None
    named = ready.teacher_name if baseline is not None else args.source
    baseline = baseline or load_model(args.source, config=ready.config).eval()
    image_size = processor_image_size(ready.processor)
    tag = f"merged K={args.after_layer} M={args.tokens}"
    continued = ready.init.startswith("continued")  # the source is a retrofit export
    unscored = " (its classifier is new: not scored)" if random_head else " (--num-labels gives a new head: not scored)"
    baseline_name = f"baseline `{named}`" + (unscored if new_classifier else "")
    if continued:
        merged = is_merged(baseline.config)
        baseline_name += " (the export, already merged)" if merged else f" (the model `{args.source}` was made from)"
    rows = [{"model": baseline_name, "gflops": model_cost(baseline.config, image_size).gflops}]
    merged_cost = model_cost(ready.model.config, image_size)
    # A backbone has no labels to score: its rows give the cosine similarity of its features to the baseline's.
    backbone = is_backbone(ready.config)
    quality = "similarity" if backbone else "accuracy"
    if backbone:  # similarity to the teacher: the baseline itself unless the recipe names another one
        rows[0]["similarity"] = None if args.teacher else 1.0
    elif before and args.eval_split:
        accuracy = _baseline_accuracy(baseline, ready)
        if accuracy is None:  # kd on a split without labels this model knows: agreement with the teacher
            quality, rows[0]["teacher_agreement"] = "agreement", None if args.teacher else 1.0
            log("baseline: the evaluation split has no labels this model knows; the table gives agreement with the "
                "teacher's predictions")  # fmt: skip
        else:
            rows[0]["accuracy"] = accuracy
            log(f"baseline accuracy: {100 * accuracy:.2f} %")
    speeds, speed_note, spreads = {}, None, {}
    main_process = is_launch_main()  # under `accelerate launch` one process times and shows: N timed against each
    if evaluation.speed and main_process:  # other on one machine, and printed N tables (the card kept one of them)
        speeds = images_per_second({"baseline": baseline, "merged": ready.model},
                                   batch_size=evaluation.speed_batch_size, image_size=image_size,
                                   spreads=spreads)  # fmt: skip
        rows[0]["images_per_s"] = speeds["baseline"]
        speed_note = _speed_note(hardware_name("cpu"), evaluation.speed_batch_size, image_size, speeds, spreads)
        if None in speeds.values():  # out of memory at that batch size: the table says n/a, the note says why
            log(f"warning: images/s not measured at evaluation.speed_batch_size {evaluation.speed_batch_size} (out "
                "of memory?); lower it to time the models")  # fmt: skip
    if evaluation.speed:
        from accelerate import PartialState

        PartialState().wait_for_everyone()  # the other processes wait while it times, not working beside it

    zero_shot, prompts = _zero_shot_scorer(args, ready, evaluation, log) if evaluation.zero_shot else (None, [])
    # the untrained merger too, but not a resumed run's: calibration is not run again, so its model is not the
    # calibrated start its checkpoints began from (the row's accuracy is that start's, from the checkpoints' record)
    unscored_start = ready.resuming and ready.init.startswith("calibrated")
    if zero_shot and unscored_start:
        log("note: a resumed run does not calibrate again, so its calibrated start gets no zero-shot score (n/a)")
    zero_shot_before = zero_shot([baseline] if unscored_start else [baseline, ready.model]) if zero_shot else None
    untrained_cells = {}  # the untrained merger's zero-shot cells in its row
    if zero_shot_before:
        rows[0] |= _zero_shot_cells(zero_shot_before[0])
        unscored = {"zero_shot_top1": None, "agreement": None}
        untrained_cells = unscored if unscored_start else _zero_shot_cells(zero_shot_before[1])
        log(f"baseline zero-shot top-1: {100 * rows[0]['zero_shot_top1']:.2f} %")

    result = train_prepared(args, ready, eval_at_start=before, progress=progress, log=log)
    if quality == "accuracy" and any("agreement" in h for h in result.eval_history):
        quality = "agreement"  # the training's evaluations had no labels this model knows
    history = [h for h in result.eval_history if quality in h]
    column = "teacher_agreement" if quality == "agreement" else quality  # a row's "agreement" is zero-shot's
    # a resumed run that scores other images than its checkpoints' first run: `train` dropped their evaluations
    elsewhere = ready.resuming and scores_other_images(ready.checkpoint_dir, evaluated_images(args, ready))
    if before and (elsewhere or history and history[0]["step"] == 0):
        init = "as exported" if continued else "calibrated init" if args.calibrate else "random init"
        start = None if elsewhere else history[0][quality]
        if elsewhere:  # the step-0 score was of other images
            log(
                "note: the resumed run scores other images (or none) than the run its checkpoints began (data, "
                "data.eval_split or data.eval_limit changed), so the untrained row's score, from that run, is n/a"
            )
        rows.append({"model": f"{tag}, {init}, no training", column: start,
                     "gflops": merged_cost.gflops, "images_per_s": speeds.get("merged")}
                    | untrained_cells)  # fmt: skip
    after = {}
    if zero_shot:  # every process: the scores are gathered across them; agreement with the baseline's predictions
        reference = zero_shot_before[0]["predictions"]
        after = _zero_shot_cells(zero_shot([result.model], reference=reference, fresh=True)[0])
    rows.append({"model": f"{tag}, fine-tuned ({counted(result.steps, 'step')}, loss {args.loss})",
                 column: result.final_evaluation.get(quality), "gflops": merged_cost.gflops,
                 "images_per_s": speeds.get("merged")} | after)  # fmt: skip
    scored = None  # which images the quality column is on: the evaluation split's first data.eval_limit, or all
    if ready.data is not None and ready.data[1] is not None:
        count = len(ready.data[1].dataset)
        images = first_images_text(args.eval_limit, count)
        scored = f"scored on `{public_name(args.data)}` {args.evaluated_on()}: {images}"
        if prompts:  # which prompts the zero-shot column is over, as evaluate's card says
            scored += f"; zero-shot over one prompt per class, like {prompts[0]!r}"
    table = results_table(rows, note="\n\n".join(line for line in (scored, speed_note) if line) or None)
    # the table goes into the export before it takes its place: written after, a kill between the two (a Ctrl-C then
    # waited) left an export without it, which a rerun refused as existing and `push` uploaded
    finish(args, ready, result, run={"table": table}, log=log)
    if result.output is not None:
        publish(args, result, log=log)
    if main_process:
        log("")
        show(table)
    if result.budget is not None and recipe.get("training") is not None:  # resumed: the budget its first run chose
        trained = {key: value for key, value in result.budget.options.items() if key in recipe["training"]}
        recipe = {**recipe, "training": {**recipe["training"], **trained}}
    summary = {"recipe": recipe, "rows": rows, "steps": result.steps, "seconds": result.seconds}
    if ready.checkpoint_dir.is_dir():
        try:  # replaces the results.json of an earlier run, nothing else
            write_report(ready.checkpoint_dir / "results.json", summary, overwrite=True, kind="run", same_kind=True)
        except (RetrofitError, OSError) as exc:  # (a full disk: the run itself is done, its export written)
            log(f"warning: results.json not written: {exc}")
    return summary


def _speed_note(hardware: str, batch_size: int, image_size: tuple[int, int], speeds: dict, spreads: dict) -> str:
    """The line under a run's before/after table that says how its images/s were measured, and where they were not
    (out of memory) or where a model's passes spread by more than `retrofit.benchmark.SPREAD_LIMIT` of their median
    (a loaded machine: the speed-up in the card may be noise), as `retrofit bench` and `sweep` flag them."""
    from .benchmark import SPEED_REPEATS, SPREAD_LIMIT

    note = (f"images/s: {hardware}, fp32, batch {batch_size} at {image_size[0]}×{image_size[1]}, median of "
            f"{SPEED_REPEATS} passes, the two models alternated")  # fmt: skip
    if None in speeds.values():
        note += "; not measured (out of memory?): lower evaluation.speed_batch_size"
    wide = [f"{name} {100 * value:.0f} %" for name, value in spreads.items() if (value or 0.0) > SPREAD_LIMIT]
    if wide:
        note += (f"; ⚠ passes spread over {100 * SPREAD_LIMIT:.0f} % of the median ({', '.join(wide)}: a loaded "
                 "machine?), so the speed-up may be noise")  # fmt: skip
    return note


def _zero_shot_scorer(
    args: FinetuneArgs, ready, evaluation: RecipeEvaluation, log: Callable[[str], None]
) -> tuple[Callable[..., list[dict]], list[str]]:
    """For ``evaluation.zero_shot``: a function scoring dual encoders (`retrofit.evaluation.zero_shot_scores`) on
    the evaluation split, one prompt per class (``evaluation.prompt_template``), with the source's tokenizer; and
    those prompts. What cannot work (not a dual encoder, no evaluation split or class names, no tokenizer) is one
    line before training."""
    from .data import load_split, make_dataloader
    from .evaluation import check_dual_encoders, zero_shot_classes, zero_shot_scores
    from .loading import image_channels
    from .train import EVAL_LIMIT_INSTEAD
    from .zero_shot import prompts

    check_dual_encoders([args.source], [ready.config], where="evaluation.zero_shot")
    if not args.eval_split:
        raise RetrofitError("evaluation.zero_shot scores the evaluation split: set data.eval_split")
    if ready.tokenizer is None:
        raise RetrofitError(
            f"evaluation.zero_shot embeds prompts with the source's tokenizer, and '{args.source}' has none"
        )
    dataset = load_split(args.data, **args.images(evaluation=True), split_classes=True, log=log,
                         instead=EVAL_LIMIT_INSTEAD)  # fmt: skip
    names, label_map = zero_shot_classes(dataset, args.data)
    loader = make_dataloader(dataset, ready.processor, batch_size=min(evaluation.batch_size, len(dataset)),
                             label_map=label_map, num_channels=image_channels(ready.config))  # fmt: skip
    texts = prompts(names, evaluation.prompt_template)

    def score(models: list, **kwargs) -> list[dict]:
        return zero_shot_scores(models, [ready.tokenizer] * len(models), loader, texts, k=min(5, len(names)), **kwargs)

    return score, texts


def _zero_shot_cells(score: dict) -> dict:
    """A before/after row's zero-shot cells from one `zero_shot_scores` row."""
    return {"zero_shot_top1": score["top1"], "agreement": score["agreement"]}


def _baseline_accuracy(baseline, ready) -> float | None:
    """The source's accuracy on the evaluation split (the training's own loader, `train.evaluation_loader`), through
    the one accuracy loop; None for kd on a split without labels the model knows (kd needs none: its evaluations are
    agreement with the teacher, `train.evaluate`)."""
    from .evaluation import accuracy

    loader = ready.data[1]
    return accuracy(baseline, loader) if loader.dataset.has_labels else None


def results_table(rows: list[dict], note: str | None = None) -> str:
    """A Markdown before/after table from rows of {model, accuracy, gflops, images_per_s} (a backbone's rows have
    `similarity`, its features' cosine similarity to the baseline's, instead of `accuracy`; kd on a split without
    labels the model knows, `teacher_agreement`); `note` (which images were scored, how the speed was measured) goes
    under it."""
    backbone = any("similarity" in row for row in rows)
    agreement = not backbone and any("teacher_agreement" in row for row in rows)  # kd without labels the model knows
    key = "similarity" if backbone else "teacher_agreement" if agreement else "accuracy"
    quality = {"similarity": "feature similarity", "teacher_agreement": "agreement with the teacher"}.get(key, key)
    zero_shot = any("zero_shot_top1" in row for row in rows)  # a dual encoder's, with evaluation.zero_shot
    extra = " zero-shot top-1 | agreement with the baseline |" if zero_shot else ""
    lines = [f"| model | {quality} |{extra} GFLOPs/image | images/s (measured) | speed-up |",
             "|---|---|" + "---|" * (2 * zero_shot) + "---|---|---|"]  # fmt: skip
    from .benchmark import rate_text

    base_speed = rows[0].get("images_per_s") if rows else None
    for row in rows:
        value = row.get(key)
        acc = "n/a" if value is None else f"{value:.4f}" if backbone else f"{100 * value:.2f} %"
        if zero_shot:
            cells = [row.get("zero_shot_top1"), row.get("agreement")]
            acc += "".join(" | n/a" if cell is None else f" | {100 * cell:.2f} %" for cell in cells)
        speed = row.get("images_per_s")
        ratio = f"{speed / base_speed:.2f}x" if speed and base_speed else "n/a"
        speed_text = rate_text(speed, decimals=0) if speed else "n/a"
        lines.append(f"| {row['model']} | {acc} | {row['gflops']:.4f} | {speed_text} | {ratio} |")
    if note:
        lines += ["", note]
    return "\n".join(lines)
