"""Export a merged model as a complete Hub model repository: weights, config, code, processor, card."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

from huggingface_hub import ModelCard
from safetensors import SafetensorError
from transformers import PreTrainedModel

from .atomic import TOKENIZER_FILES, atomic_dir
from .card import TrainingInfo, build_card
from .errors import RetrofitError, brief, check_arguments, shown
from .families import Family
from .hub_code import load_classes
from .loading import family_and_head, is_merged, processor_image_size, save_image_processor

REQUIRED_FILES = ("config.json", "model.safetensors", "preprocessor_config.json", "README.md")


def export(
    model: PreTrainedModel,
    output: str | Path,
    *,
    image_processor=None,
    card: ModelCard | None = None,
    overwrite: bool = False,
    source_config=None,
    training: TrainingInfo | None = None,
    tokenizer=None,
    keep_same: bool = False,
    run: dict | None = None,
    log: Callable[[str], None] | None = None,
) -> Path:
    """Write `model` (a merged model) to `output` as a Hub repository, atomically.

    The folder holds ``config.json`` (with ``auto_map``), ``model.safetensors`` (or its shards and their index), the
    generated ``configuration_*.py``/``modeling_*.py``, ``preprocessor_config.json`` (from `image_processor`, the
    source's, required; a dual encoder's `tokenizer` too, naming its processor class: `name_processor`) and a
    ``README.md`` model card. Returns the folder's path.
    Load it with `retrofit.load_model`, or with the Auto class of its head (``AutoModelForImageClassification`` for a
    classifier, ``AutoModelForZeroShotImageClassification`` for a dual encoder, ``AutoModel`` for a backbone) and
    ``trust_remote_code=True``. Without a `card`, one is built from the model, `source_config` (for the cost table)
    and `training` (how it was made). Refused in one line before anything is written: a model that is not merged, or
    whose weights are on the meta device, and what `_check_arguments` refuses. `keep_same` (a resumed run, with
    nothing or nothing new to train): an `output` that already holds this very model (weights, config, processor,
    tokenizer and code alike) is left as it is, with the card a user wrote notes into and the results scored on it;
    `log` hears that it was. `run`: a recipe run's before/after table ({"table": ...}), written into the card's
    Results and `retrofit_results.json` before the folder takes its place (written after it, a kill between the two
    left an export without them), or into the export kept.
    """
    if not isinstance(model, PreTrainedModel) or not is_merged(model.config):
        raise RetrofitError("export() takes a merged model; make one with retrofit.insert_patch_merger first")
    _check_arguments(output, image_processor, card, training, tokenizer)
    check_arguments("export", flags={"overwrite": overwrite})
    placed = {parameter.device.type for parameter in model.parameters()}
    if "meta" in placed:  # safetensors failed halfway with NotImplementedError: no weights to write
        raise RetrofitError(
            "export() takes a model with its weights, and this one's are on the meta device (made under "
            "init_empty_weights or device_map without loading them); load the weights first"
        )
    output = os.path.expanduser(output)  # "~/pm" is in the home folder, as in the settings of every command
    check_tokenizer_files_kept(output, overwrite, tokenizer)
    family, head = family_and_head(model.config)
    classes = load_classes(family, head)
    model.config.auto_map = dict(classes.auto_map)
    if card is None:
        image_size = processor_image_size(image_processor) if image_processor is not None else None
        card = build_card(model, source_config=source_config, image_size=image_size, training=training, folder=output)
    try:
        _write(model, output, overwrite, classes, image_processor, tokenizer, card, family, keep_same, run)
    except _AlreadyThere:
        if run is not None:  # the export stays; this run's table replaces the one it showed
            from .card import update_card

            update_card(output, run=run)
        if log is not None:
            log(f"'{output}' already holds this model (the run had finished): left as it is, its card and results kept")
        return Path(output)
    record = getattr(model, "retrofit_source", None)
    if record is not None:
        from .provenance import remember

        remember(record)
    return Path(output)


class _AlreadyThere(Exception):
    """The export `_write` made is the one at its output already (`export`'s `keep_same`)."""


def _write(model, output, overwrite, classes, image_processor, tokenizer, card, family, keep_same, run) -> None:
    """`export`'s writing: every file into a temporary folder, which then takes `output`'s place."""
    with atomic_dir(output, overwrite) as tmp:
        try:
            model.save_pretrained(tmp)
        except SafetensorError as exc:  # safetensors' own I/O error (a full disk), not an OSError
            raise RetrofitError(
                f"cannot write the weights to '{output}' ({brief(exc)}); check the free space"
            ) from None
        for filename, text in classes.files.items():
            (tmp / filename).write_text(text, encoding="utf-8")
        written = {path.name for path in tmp.iterdir()}
        if image_processor is not None:
            save_image_processor(image_processor, tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
            name_processor(tmp, family)
            unexpected = [path.name for path in tmp.iterdir() if path.name not in written and path.name not in
                          TOKENIZER_FILES and path.name != "preprocessor_config.json"]  # fmt: skip
            if unexpected:  # a file `--overwrite` would not recognise as ours, or `push` would leave out
                raise RuntimeError(f"the tokenizer wrote files retrofit does not know: {unexpected}")
        card.save(tmp / "README.md")
        if keep_same and _same_model(Path(output), tmp, classes.files):
            raise _AlreadyThere  # (the temporary folder goes)
        if run is not None:
            from .card import update_card

            update_card(tmp, run=run)


def _same_model(output: Path, new: Path, code: dict[str, str]) -> bool:
    """Whether the export at `output` holds the model written to `new`: the same weights, config, image processor
    and tokenizer (`card.measured_on`, what its results were measured on) and the same generated code."""
    from .card import measured_on

    if not output.is_dir() or measured_on(output) != measured_on(new):
        return False
    try:
        return all((output / name).read_text(encoding="utf-8") == text for name, text in code.items())
    except (OSError, UnicodeDecodeError):
        return False


def tokenizer_file_names(tokenizer) -> set[str]:
    """The names of the files `tokenizer` writes into an export (None: none)."""
    import tempfile

    if tokenizer is None:
        return set()
    with tempfile.TemporaryDirectory(prefix="retrofit-tokenizer-") as folder:
        tokenizer.save_pretrained(folder)
        return {path.name for path in Path(folder).iterdir()}


def check_tokenizer_files_kept(output: str | Path | None, overwrite: bool, tokenizer) -> None:
    """Refuse, in one line and before any work, to replace an export that retrofit wrote without a tokenizer (its
    card says so: `NO_TOKENIZER_NOTE`) and that holds tokenizer files now, which the new export would not write. The
    card asks the user to copy the source's tokenizer in, so those files are the user's, and `--overwrite` replaces
    only what retrofit wrote (which it tells by the files' names: `atomic.TOKENIZER_FILES`)."""
    from .loading import NO_TOKENIZER_NOTE, card_says

    folder = Path(output) if output is not None else None
    if folder is None or not overwrite or not folder.is_dir() or folder.is_symlink():
        return
    present = [name for name in TOKENIZER_FILES if (folder / name).is_file()]
    if not present or not card_says(folder, NO_TOKENIZER_NOTE):
        return
    lost = [name for name in present if name not in tokenizer_file_names(tokenizer)]
    if lost:
        why = "has no tokenizer: its source has none" if tokenizer is None else "writes no file of that name"
        raise RetrofitError(
            f"--output '{output}' holds {', '.join(lost)}, which retrofit did not write there (this export {why}), "
            "so --overwrite would delete them; move them out (put a tokenizer into the source to export it), or "
            "choose another --output"
        )


def _check_arguments(output, image_processor, card, training, tokenizer) -> None:
    """Refuse, before anything is written, what `export` cannot take: an output that is not a path, no image
    processor (the export would lack preprocessor_config.json: its card's pipeline example fails to load it, and
    `retrofit push` refuses it as incomplete), or objects of other kinds where the processor, card, training and
    tokenizer go (they failed halfway, with an AttributeError)."""
    if not isinstance(output, str | os.PathLike):
        raise RetrofitError(f"export()'s output must be a folder path, not {shown(output)}")
    if image_processor is None:
        raise RetrofitError(
            "export() needs the model's image_processor (the source's: retrofit.loading.load_image_processor(source, "
            "config) or AutoImageProcessor.from_pretrained(source)); without preprocessor_config.json the export "
            "does not load in a pipeline and `retrofit push` refuses it"
        )
    wanted = {"image_processor": (image_processor, "an image processor", "save_pretrained"),
              "tokenizer": (tokenizer, "a tokenizer", "save_pretrained")}  # fmt: skip
    for name, (value, what, method) in wanted.items():
        if value is not None and not callable(getattr(value, method, None)):
            raise RetrofitError(f"export()'s {name} must be {what}, not {shown(value)}")
    if card is not None and not isinstance(card, ModelCard):
        raise RetrofitError(f"export()'s card must be a huggingface_hub ModelCard (card.build_card), not {shown(card)}")
    if training is not None and not isinstance(training, TrainingInfo):
        raise RetrofitError(f"export()'s training must be a retrofit.card.TrainingInfo, not {shown(training)}")


def processor_class(family: Family) -> str | None:
    """The processor class transformers gives the family's own checkpoints when their files name none (its
    ``PROCESSOR_MAPPING_NAMES`` by model type: CLIPProcessor, SiglipProcessor, Siglip2Processor), or None."""
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    return next((PROCESSOR_MAPPING_NAMES[t] for t in family.model_types if PROCESSOR_MAPPING_NAMES.get(t)), None)


def name_processor(folder: Path, family: Family) -> None:
    """Name the processor class in the ``tokenizer_config.json`` a dual encoder's tokenizer wrote into `folder`, as
    transformers' ``ProcessorMixin.save_pretrained`` does (``processor_class``), where the source's tokenizer did not.
    ``AutoProcessor`` reads it there on every release exports support; without it, it looks the export's model type
    (``clip_patch_merger``) up in its table, finds nothing and returns the tokenizer alone. The keys that only say
    how this machine loaded the tokenizer (`LOADING_KEYS`, which transformers saves with it) are left out."""
    path = folder / "tokenizer_config.json"
    name = processor_class(family)
    if name is None or not path.is_file():
        return
    settings = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(settings, dict):
        given = settings.get("processor_class")
        if not (isinstance(given, str) and given.isidentifier()):  # the source's own name is kept, if it is one
            settings["processor_class"] = name
        for key in (*LOADING_KEYS, "auto_map"):  # (the source's code, which an export does not hold: its own only)
            settings.pop(key, None)
        # as transformers writes it
        path.write_text(json.dumps(settings, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


# What transformers 5.x adds to a tokenizer's saved settings about how it was loaded here (a local folder, offline):
# nothing about the tokenizer, and not for a published model.
LOADING_KEYS = ("is_local", "local_files_only")
