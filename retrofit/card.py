"""The model card (README.md) of an export, built with huggingface_hub's ModelCard."""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from transformers import PreTrainedModel

from . import __version__
from .atomic import CURVE_FILE, RESULTS_FILE, cannot_write_in, hold_write_lock, releases_write_locks, write_files
from .cost import compare, model_cost
from .data import (
    FASHION_MNIST_HUB,
    fashion_mnist_split,
    hub_dataset_id,
    is_fashion_mnist,
    is_local_data,
    local_format,
)
from .errors import RetrofitError, brief, counted, describe_os_error, shown
from .families import MERGED_SUFFIX
from .hub_code import base_head, classifier_head, oldest_transformers_for
from .loading import family_and_head, layer_config
from .provenance import public_name


def local_name(folder: str | Path | None) -> str:
    """How a card's loading examples name an export before it is pushed (`retrofit push` names the repo instead):
    the folder as it was given where that is a relative path inside the current folder, else its name alone (no
    local path in anything that can be pushed)."""
    if folder is None:
        return "path/to/this/folder"
    path = Path(folder)
    return path.as_posix() if not path.is_absolute() and ".." not in path.parts else path.name


def python_text(text: str) -> str:
    """`text` as a double-quoted Python string literal, as the card's loading examples name a model."""
    return json.dumps(text, ensure_ascii=False)


@dataclass
class TrainingInfo:
    """How the merged model was made, beyond the merge settings in its config."""

    data: str | None = None
    data_revision: str | None = None  # the commit of a Hub dataset `data` (`provenance.dataset_commit`)
    images: str | None = None  # which of `data`'s images were trained on: "train (the first 1000 images)"
    steps: int | None = None
    epochs: float | None = None
    loss: str | None = None
    init: str = "random"
    notes: list[str] = field(default_factory=list)


# The license fields of a model card's metadata (the Hub's model card spec), carried from the source's card.
LICENSE_KEYS = ("license", "license_name", "license_link")
HUB = "https://huggingface.co"


def _is_hub_id(source: str) -> bool:
    return source.count("/") == 1 and not source.startswith((".", "/", "~"))


def published_dataset(data: str | None) -> str | None:
    """The Hub dataset a card's metadata names for `data`: its id, fashion-mnist's Hub copy, None for a local folder."""
    return FASHION_MNIST_HUB if data is not None and is_fashion_mnist(str(data)) else hub_dataset_id(data)


def hub_card_metadata(repo_id: str, revision: str | None = None) -> dict | None:
    """The metadata (YAML front matter) of a Hub model's README.md, from the local cache or the Hub."""
    from huggingface_hub import hf_hub_download, metadata_load

    return metadata_load(hf_hub_download(repo_id, "README.md", revision=revision))


def _source_card_metadata(model: PreTrainedModel) -> tuple[dict, str | None]:
    """The metadata of the source's own model card and, for a Hub source, its repo id (None for a local one)."""
    from huggingface_hub import metadata_load

    from .provenance import find_local

    config = model.config
    record = getattr(model, "retrofit_source", None)  # set by `insert_patch_merger`: a local source's folder
    folder = getattr(record, "folder", None)
    source = str(getattr(config, "merge_source", None) or "")
    if folder is None and _is_hub_id(source):
        return hub_card_metadata(source, getattr(config, "merge_source_revision", None)) or {}, source
    sha256 = getattr(config, "merge_source_sha256", None)
    if folder is None and sha256 and not source.startswith("retrofit:"):  # an export trained on: where its source is
        folder = find_local(sha256, source)
    readme = Path(folder) / "README.md" if folder is not None else None
    if readme is None or not readme.is_file() or readme.is_symlink():  # a link may point at a private file
        return {}, None
    return metadata_load(readme) or {}, None


# What a license field may hold to be carried over: an id (``mit``, ``apache-2.0``, ``other``), a name, a link
# (a web address, or a file in the source's Hub repo); anything else (several lines, markup) is left out.
_LICENSE_VALUE = {
    "license": re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,99}"),
    "license_name": re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,99}"),
    "license_link": re.compile(r"(https?://)?[A-Za-z0-9._~/%+-]{1,400}(#[A-Za-z0-9._-]*)?"),
}


def source_license(model: PreTrainedModel) -> dict[str, str]:
    """The license of the model a merged model was made from, as its own model card states it (`LICENSE_KEYS`): a
    local folder's README.md front matter, or a Hub model's card. A merge does not change the license, so the export's
    card carries it. Empty where the source has no card or it cannot be read (offline, say): never an error. A
    relative ``license_link`` points into the source's Hub repo; a local source's is left out (the file is not in the
    export, and no local path is published)."""
    try:
        metadata, repo_id = _source_card_metadata(model)
    except Exception:  # noqa: BLE001 - no network, no such repo, broken YAML: the card goes without a license
        return {}
    if not isinstance(metadata, dict):
        return {}
    found = {
        key: value.strip()
        for key in LICENSE_KEYS
        if isinstance(value := metadata.get(key), str) and _LICENSE_VALUE[key].fullmatch(value.strip())
    }
    link = found.get("license_link")
    if link and not link.startswith(("https://", "http://")):
        revision = getattr(model.config, "merge_source_revision", None) or "main"
        if repo_id is None:
            del found["license_link"]
        else:
            found["license_link"] = HUB + link if link.startswith("/") else f"{HUB}/{repo_id}/blob/{revision}/{link}"
    return found if "license" in found else {}


def _how_made(
    config, training: TrainingInfo | None, licensing: dict[str, str] | None = None, dtype: str | None = None
) -> str:
    revision = getattr(config, "merge_source_revision", None)
    source = (
        f"`{config.merge_source}`" + (f" at commit `{revision}`" if revision else "")
        if config.merge_source
        else "not recorded (merged from a model that was not loaded from a checkpoint)"
    )
    lines = [
        f"- source: {source}",
        f"- PatchMerger before encoder layer {config.merge_after_layer} (layers 0..{config.merge_after_layer - 1} "
        f"run on all tokens), {counted(config.merge_num_tokens, 'merged token')}, "
        + (
            f"{counted(config.merge_num_prefix_tokens, 'prefix token')} passed through"
            if config.merge_num_prefix_tokens
            else "no prefix token (every token is merged)"
        ),
    ]
    if dtype not in (None, "float32"):  # a half-precision export: said where a reader looks, not only in the log
        lines.append(f"- weights stored in {dtype}")
    rope = getattr(config, "merge_rope_positions", None)  # RoPE families (DINOv3) only
    if rope is not None:
        where = "at the merge-weighted mean position of their patches" if rope == "mean" else "not rotated"
        lines.append(f"- RoPE after the merge: merged tokens {where} (`merge_rope_positions: {rope}`)")
    family, head = family_and_head(config)
    if family.relative_position_biases(layer_config(config, head)):
        lines.append(  # BEiT, Data2Vec-vision
            "- relative position bias after the merge: between merged tokens, the merge-weighted mean of the bias "
            "between the patches they average (Tᵀ·bias·T, per image); CLS keeps its own"
        )
    if training is None:  # `retrofit.export` of a model made elsewhere: how is not known here
        lines.append(
            "- merger initialisation and training after the merge: not recorded (exported with `retrofit.export`, "
            "which was not told how the model was made)"
        )
    else:
        lines.append(f"- merger initialisation: {training.init}")
        if training.data:
            lines.append(
                f"- fine-tuned on `{public_name(training.data)}`"
                f"{f' at commit `{training.data_revision}`' if training.data_revision else ''}"
                f"{f' {training.images}' if training.images else ''} "
                f"for {counted(training.steps, 'step')} "
                f"({training.epochs} epochs), loss: {training.loss}"
            )
        else:
            lines.append("- not fine-tuned after the merge: expect lower accuracy than the source until it is")
        lines.extend(f"- {note}" for note in training.notes)
    if licensing:
        named = licensing.get("license_name", licensing["license"])
        link = f" ({licensing['license_link']})" if "license_link" in licensing else ""
        lines.append(f"- license: `{named}`{link}, the source's, as its model card states it")
    return "\n".join(lines)


def _zero_shot_usage(name: str, config, trained: bool = False) -> Callable[[bool], str]:
    """A dual encoder's usage beyond the pipeline: its processor (the source's class: CLIPProcessor, SiglipProcessor,
    ...) and a forward pass on an image and texts, with the padding and activation transformers' zero-shot pipeline
    uses for the family (SigLIP: padded to 64 tokens, sigmoid), as a function of `remote`: True for the section
    without retrofit, whose every load of the export passes ``trust_remote_code=True`` (transformers 5.25's
    AutoProcessor and AutoTokenizer read the export's config, and would ask whether to run its code). `trained`: the
    image side was fine-tuned (the visual projection with it), so only the text side is the source's, bit-exact."""
    siglip = "siglip" in config.model_type
    scale = "the logit scale and bias" if siglip else "the logit scale"
    if trained:
        kept = (
            f"The text tower, the text projection and {scale} are the source's, bit-exact (fine-tuning trained the "
            "image side only, the visual projection with it)"
        )
    else:
        kept = f"The text tower, the projections and {scale} are the source's, bit-exact"
    padding = 'padding="max_length", max_length=64' if siglip else "padding=True"
    scores = "sigmoid()  # one probability per text" if siglip else "softmax(dim=-1)  # over the texts"

    def usage(remote: bool) -> str:
        trust = ", trust_remote_code=True" if remote else ""
        return f"""
```python
import torch
from PIL import Image
from transformers import AutoProcessor

processor = AutoProcessor.from_pretrained({name}{trust})
inputs = processor(text=["a photo of a cat.", "a photo of a dog."], images=Image.open("photo.jpg"),
                   return_tensors="pt", {padding})
with torch.no_grad():
    probs = model(**inputs).logits_per_image.{scores}

scores = pipe(Image.open("photo.jpg"), candidate_labels=["cat", "dog"], hypothesis_template="a photo of a {{}}.")
```

{kept}: its text embeddings are unchanged;
`get_image_features` and `get_text_features` work as on the source.
"""

    return usage


def build_card(
    model: PreTrainedModel,
    *,
    source_config=None,
    training: TrainingInfo | None = None,
    results_table: str | None = None,
    eval_results: list | None = None,
    repo_id: str | None = None,
    image_size: tuple[int, int] | None = None,
    folder: str | Path | None = None,
) -> ModelCard:
    """A model card for a merged model: metadata, how it was made, how to load it, and its cost.

    `image_size` is the size the processor feeds the model (for the cost table); defaults to the config's. The
    loading examples name `repo_id`, else the export `folder` (`local_name`); `retrofit push` names the repo instead.
    """
    config = model.config
    family, head = family_and_head(config)
    base = base_head(family, head)
    source = str(config.merge_source or "")
    is_hub_id = _is_hub_id(source)
    if not source:  # a model built in memory and merged with `insert_patch_merger`: no source to name ("None")
        named = f"a `{head.class_name}`"
    elif is_hub_id:
        named = f"[`{source}`](https://huggingface.co/{source})"
    else:
        named = f"`{source}`"
    title = source.split("/")[-1].removeprefix("retrofit:") or config.model_type.removesuffix(MERGED_SUFFIX)
    dataset = published_dataset(training.data) if training else None  # a local folder's path is never published
    licensing = source_license(model)
    data = ModelCardData(
        base_model=source if is_hub_id else None,
        datasets=[dataset] if dataset else None,
        **licensing,
        library_name="transformers",
        pipeline_tag=head.pipeline_tag,
        tags=["retrofit", "patch-merger", "token-merging", "vision", config.model_type.removesuffix(MERGED_SUFFIX)],
        eval_results=eval_results or None,
        model_name=repo_id.split("/")[-1] if repo_id else None,
    )
    cost_text = ""
    if source_config is not None:
        cost_text = compare(model_cost(source_config, image_size), model_cost(config, image_size))
    name = python_text(repo_id or local_name(folder))  # a folder's name may hold a quote or a backslash
    encoder_only = (
        f"\n`AutoModel.from_pretrained({name})` loads the encoder without the classifier ({base.class_name} with "
        f"the merger), as it does for the source checkpoint; its `last_hidden_state` has "
        f"{config.merge_num_prefix_tokens} + {config.merge_num_tokens} tokens.\n"
        if base
        else ""
    )
    probe = classifier_head(family, head)
    if probe is not None:  # a backbone or dual encoder: a linear probe or fine-tune starts from a new classifier
        encoder_only += (
            f"\n`AutoModelForImageClassification.from_pretrained({name}, num_labels=...)` loads it as "
            f"{probe.class_name} with the merger and a new classifier (a linear probe, a fine-tune), as it does for "
            "the source checkpoint.\n"
        )
    zero_shot = _zero_shot_usage(name, config, training is not None) if head.is_dual_encoder else lambda remote: ""
    content = f"""---
{data.to_yaml()}
---

# {repo_id or title + "-patch-merger"}

This is {named} with a **PatchMerger**
(Renggli et al., [Learning to Merge Tokens in Vision Transformers](https://arxiv.org/abs/2202.12015)) inserted
by retrofit {__version__}: after its first {config.merge_after_layer} encoder layers the
patch tokens are replaced by {config.merge_num_tokens} learned weighted averages of them, so the remaining layers run
on far fewer tokens.

## How it was made

{_how_made(config, training, licensing, str(model.dtype).removeprefix("torch."))}

## How to use

Where retrofit is installed, transformers loads the model with retrofit's own classes: no code from this folder or
repository runs.

```python
import retrofit
from transformers import {head.auto_class}, pipeline

retrofit.register_auto_classes()
model = {head.auto_class}.from_pretrained({name})
pipe = pipeline("{head.pipeline_tag}", model={name})
```
{zero_shot(False)}{encoder_only}
Without retrofit, the modeling code that ships here (`modeling_*.py`, `configuration_*.py`; it needs only `torch`
and `transformers>={oldest_transformers_for(config)}`) runs when you allow it:

```python
from transformers import {head.auto_class}, pipeline

model = {head.auto_class}.from_pretrained({name}, trust_remote_code=True)
pipe = pipeline("{head.pipeline_tag}", model={name}, trust_remote_code=True)
```
{zero_shot(True)}
## Cost (theoretical, per image)

{cost_text or "See `config.json` for the merge settings."}

## Results

{_marked(results_table or _not_evaluated(source or "SOURCE"))}
"""
    return ModelCard(content)


def _not_evaluated(source: str) -> str:
    """The Results section of a card before any evaluation: the command that fills it in (with ``--card``, without
    which evaluate writes no card)."""
    return (
        f"Not evaluated yet: `retrofit evaluate {source} THIS_FOLDER --data DATA --card THIS_FOLDER` scores it next to "
        "its source and writes the results here."
    )


# ----------------------------------------------------------------------------------------------------------------
# Results: `retrofit evaluate --card` / `retrofit bench --card` write measured numbers into an export's card
# ----------------------------------------------------------------------------------------------------------------

# `RESULTS_FILE` holds them; `CURVE_FILE`: images/s against batch size, drawn by `bench --card` when it measured
# several batch sizes (named in `retrofit.atomic`, which tells them from a user's files of the same name).
MODEL_NAME = "model_name"  # in `RESULTS_FILE`: the name `update_card` gave the model in the card's model-index
MEASURED_KEY = "model_sha256"  # in `RESULTS_FILE`: the model its results were measured on (`export_model_sha256`)
TOKENIZER_KEY = "tokenizer_sha256"  # and the tokenizer a dual encoder's zero-shot results read the prompts with


def export_model_sha256(export: str | Path) -> str | None:
    """The sha256 of what makes `export` the model it is: its weight files, config.json (labels, merge) and image
    processor config (None: no weights there)."""
    from .provenance import weight_files, weights_sha256

    weights = weight_files(str(export))
    settings = [Path(export) / name for name in ("config.json", "preprocessor_config.json")]
    return weights_sha256([*weights, *(path for path in settings if path.is_file())]) if weights else None


def measured_on(export: str | Path) -> dict[str, str | None]:
    """What `RESULTS_FILE` records of the model its results were measured on: `export_model_sha256`, and the sha256
    of the tokenizer files (`atomic.TOKENIZER_FILES`) the export holds (None: none), which a dual encoder's zero-shot
    scores depend on as much as on its weights. A key a results file lacks (written before it was recorded) is taken
    as the same."""
    from .atomic import TOKENIZER_FILES
    from .provenance import weights_sha256

    tokenizer = [Path(export) / name for name in TOKENIZER_FILES if (Path(export) / name).is_file()]
    return {MEASURED_KEY: export_model_sha256(export), TOKENIZER_KEY: weights_sha256(tokenizer)}


def _stale_reports(results: dict, now: dict[str, str | None]) -> set[str]:
    """The reports in `results` (`_REPORTS`) measured on another model than `now` (`measured_on`): all of them where
    the weights or settings changed; where only the tokenizer did, those that read it (zero-shot scores)."""
    stored = {key for key in _REPORTS if key in results}
    if MEASURED_KEY in results and results[MEASURED_KEY] != now[MEASURED_KEY]:
        return stored
    if TOKENIZER_KEY in results and results[TOKENIZER_KEY] != now[TOKENIZER_KEY]:
        return {key for key in stored if _reads_the_tokenizer(results[key])}
    return set()


def _reads_the_tokenizer(report) -> bool:
    """Whether a stored report holds zero-shot scores: an evaluation with ``--zero-shot``, a recipe's table with
    zero-shot columns (a benchmark's speed never reads the tokenizer)."""
    if not isinstance(report, dict):
        return False
    return report.get("metric") == "zero-shot" or "zero-shot top-1" in str(report.get("table", ""))


def stale_results(export: str | Path) -> str | None:
    """Why the results stored in `export`'s card are not of the weights it holds now (None: they are, or none are
    stored, or they were stored before retrofit recorded the weights)."""
    try:
        results = json.loads((Path(export) / RESULTS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(results, dict) or not any(key in results for key in _REPORTS):
        return None
    if results.get(MEASURED_KEY) is None or not _stale_reports(results, measured_on(export)):
        return None
    return (
        "its card's results were measured on another model than the folder holds now (its weights, config.json, "
        "image processor or tokenizer changed after the --card run)"
    )


_REPORTS = ("evaluation", "benchmark", "run")
_RESULTS_KEYS = {*_REPORTS, MODEL_NAME, MEASURED_KEY, TOKENIZER_KEY}  # all `update_card` writes into `RESULTS_FILE`


def _same_model(spec: str, export: Path) -> bool:
    path = Path(spec).expanduser()
    return path.exists() and path.resolve() == export.resolve()


def _same_path(a: str, b: str) -> bool:
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


@contextmanager
def _no_missing_metadata_warning() -> Iterator[None]:
    """Silence huggingface_hub's "Repo card metadata block was not found." for a README without YAML (we add it)."""
    logger = logging.getLogger("huggingface_hub.repocard")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _load_card(export: Path) -> tuple[ModelCard, str]:
    """The export's README.md as a ModelCard, and its text as on disk (line endings and all), read once; a broken
    YAML front matter is a one-line `RetrofitError`."""
    readme = export / "README.md"
    try:
        text = readme.read_bytes().decode("utf-8")
        with _no_missing_metadata_warning():
            return ModelCard(text.removeprefix("\ufeff")), text  # as ModelCard.load reads it
    except Exception as exc:  # noqa: BLE001 - yaml.YAMLError, ValueError, UnicodeDecodeError: one line
        raise RetrofitError(
            f"--card {export}: {readme.name}'s metadata (the YAML between its first two '---' lines) cannot be read "
            f"({type(exc).__name__}: {brief(exc, 120)}); fix that block or delete it, then retry"
        ) from None


def _load_results(export: Path) -> dict:
    """The results stored by earlier `--card` runs ({} if none); a corrupt file is a one-line `RetrofitError`."""
    store = export / RESULTS_FILE
    if not store.exists():
        return {}
    try:
        results = json.loads(store.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RetrofitError(
            f"--card {export}: {RESULTS_FILE} cannot be read ({brief(exc, 120)}); fix it, or delete it to start the "
            "card's results afresh"
        ) from None
    if not _holds_our_results(results):  # a file of the user's by that name: `push` leaves it out, so must --card
        raise RetrofitError(
            f"--card {export}: {RESULTS_FILE} does not hold retrofit's results (a JSON object of "
            f"{', '.join(sorted(_RESULTS_KEYS))}), so it is yours and not replaced; move it out, then retry"
        )
    return results


def is_results_file(path: Path) -> bool:
    """Whether `path` holds the results `update_card` stores (`RESULTS_FILE`), as far as its shape tells."""
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return _holds_our_results(results)


def _holds_our_results(results) -> bool:
    """Whether `results` (a results file read) is what `update_card` writes: only its keys, at least one report or
    the model the reports were measured on (reports measured on another model are dropped, the record stays)."""
    return (
        isinstance(results, dict)
        and set(results) <= _RESULTS_KEYS
        and all(key not in results or _is_report(key, results[key]) for key in _REPORTS)
        and (MEASURED_KEY in results or any(key in results for key in _REPORTS))
    )


def _render(results: dict, curve: bool = False) -> tuple[str, list[EvalResult] | None]:
    """The card's Results section and model-index entries (None: no evaluation of the export) for `results`;
    `curve`: the export holds `CURVE_FILE`, drawn from the stored benchmark."""
    evaluation = results.get("evaluation")
    row = _find(_rows(evaluation), "model", (evaluation or {}).get("this"))
    return results_section(results, curve), None if row is None else eval_results_from(evaluation, row)


def _is_our_curve(curve: Path) -> bool:
    """True if `curve` is a regular file (not a link) holding a plot retrofit drew."""
    from .benchmark import is_our_plot

    return curve.is_file() and not curve.is_symlink() and is_our_plot(curve)


def _check_curve(export: Path) -> None:
    """Refuse to write the card's curve over a `CURVE_FILE` that retrofit did not draw."""
    curve = export / CURVE_FILE
    if (curve.exists() or curve.is_symlink()) and not _is_our_curve(curve):
        raise RetrofitError(
            f"--card {export}: {CURVE_FILE} there is not a plot retrofit drew, and the card's batch-size curve goes "
            "there; move it out of the export, then retry"
        )


def _check_card_files(export: Path) -> None:
    """Refuse a README.md or `RESULTS_FILE` that is a link or not a regular file: the card update reads and rewrites
    them, and would copy what a link points to into the export (and to the Hub with it)."""
    for name in ("README.md", RESULTS_FILE):
        path = export / name
        if path.is_symlink() or (path.exists() and not path.is_file()):
            raise RetrofitError(
                f"--card {export}: {name} there is a link or not a regular file, and the card update rewrites it; put "
                "a regular file in its place (or re-export), then retry"
            )


def check_card_target(export: str | Path, models: list[str], *, curve: bool = False) -> Path:
    """Check that `export` is a retrofit export with a README.md and is one of `models`, and that its card and
    stored results (and, with `curve`, its `CURVE_FILE`) can be read and updated; return its path. Called before any
    measurement."""
    from .loading import is_merged, load_config

    export = Path(export)
    _check_card_files(export)
    if not (export / "config.json").is_file():
        raise RetrofitError(f"--card {export}: not a model folder (no config.json); pass a retrofit export")
    if not is_merged(load_config(export)):
        raise RetrofitError(f"--card {export}: not a retrofit export (no PatchMerger in its config)")
    if not (export / "README.md").is_file():
        raise RetrofitError(f"--card {export}: the export has no README.md (model card) to update; re-export it")
    why = cannot_write_in(export)  # (it failed after all the measuring, the card left as it was)
    if why is not None:
        raise RetrofitError(f"--card {export}: cannot write in it ({why}); copy the export")
    if not any(_same_model(spec, export) for spec in models):
        raise RetrofitError(f"--card {export}: the export must also be one of the models measured; add it to them")
    _check_results_lines(_load_card(export)[0].text, export)
    if curve:
        _check_curve(export)
    results = _load_results(export)
    try:
        _render(results)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        raise RetrofitError(
            f"--card {export}: {RESULTS_FILE} does not hold retrofit's results ({type(exc).__name__}: "
            f"{brief(exc, 80)}); delete it to start the card's results afresh"
        ) from None
    return export


def _rows(report: dict | None) -> list[dict]:
    return list((report or {}).get("models", []))


def _find(rows: list[dict], key: str, spec: str | None) -> dict | None:
    return next((row for row in rows if spec is not None and row.get(key) == spec), None)


def top_k(evaluation: dict | None) -> int:
    """The k of an evaluation report's top-k accuracy (``top_k``; 5 for reports that do not say)."""
    return int((evaluation or {}).get("top_k") or 5)


def top_k_value(row: dict, k: int) -> float | None:
    """A model row's top-k accuracy: under ``top<k>`` (as `retrofit evaluate` writes it), ``topk`` or, as results
    files of earlier versions hold it for any k, ``top5``."""
    return next((row[key] for key in (f"top{k}", "topk", "top5") if row.get(key) is not None), None)


# The metric names of the model-index entries `eval_results_from` writes (any other entry is the user's).
_OUR_METRIC = re.compile(r"(Zero-shot top|Top)-[0-9]+ accuracy|Feature cosine similarity to .+")

_TASKS = {  # an evaluation's metric -> the model-index task it measures
    "similarity": ("image-feature-extraction", "Image Feature Extraction"),
    "zero-shot": ("zero-shot-image-classification", "Zero-Shot Image Classification"),
}


def eval_results_from(evaluation: dict, row: dict) -> list[EvalResult]:
    """model-index entries (top-1 and, for k > 1, top-k accuracy, zero-shot for a dual encoder; a backbone's feature
    similarity to the first model evaluated, none for that model itself) for one evaluated model; a value the
    evaluation could not give (null: a model with non-finite outputs) has no entry."""
    data = str(evaluation["data"])
    local = evaluation["data_is_local"] if "data_is_local" in evaluation else is_local_data(data)  # `update_card`
    metric = evaluation.get("metric")
    similarity = metric == "similarity"
    task_type, task_name = _TASKS.get(metric, ("image-classification", "Image Classification"))
    zero_shot = "Zero-shot top" if metric == "zero-shot" else "Top"
    split = evaluation.get("split")
    # a local folder: no Hub id, the format read (files of an earlier version: image folders, the only kind then)
    local_type = evaluation.get("data_format") or "imagefolder"
    dataset_type, dataset_name = (local_type, Path(data).name) if local else (data, data)
    if is_fashion_mnist(data):  # read from Debian's IDX files: the Hub's copy of them, whose test split it is
        dataset_type, split = FASHION_MNIST_HUB, fashion_mnist_split(split)
    if evaluation.get("images") in ("first", "sample") or evaluation.get("holdout"):  # not the whole split: the Hub
        # shows the name next to the value
        from .evaluation import images_text

        dataset_name += f" ({images_text(evaluation)})"
    common = dict(
        task_type=task_type,
        task_name=task_name,
        dataset_type=dataset_type,
        dataset_name=dataset_name,
        dataset_split=split,
        dataset_revision=None if local else evaluation.get("data_revision"),
    )
    if similarity:
        reference = evaluation["models"][0]["model"]
        name = f"Feature cosine similarity to {reference}"
        value = None if row["model"] == reference else row.get("similarity")  # (the reference: 1 to itself)
        return [] if value is None else [
            EvalResult(metric_type="cosine_similarity", metric_name=name, metric_value=value, **common)
        ]  # fmt: skip
    results = []
    if row.get("top1") is not None:
        name = f"{zero_shot}-1 accuracy"
        results.append(EvalResult(metric_type="accuracy", metric_name=name, metric_value=row["top1"], **common))
    k = top_k(evaluation)
    if k > 1 and top_k_value(row, k) is not None:  # (top-1 is the entry above)
        results.append(
            EvalResult(
                metric_type="top_k_accuracy",
                metric_name=f"{zero_shot}-{k} accuracy",
                metric_value=top_k_value(row, k),
                metric_args={"k": k},
                **common,
            )
        )
    return results


def _source_row(report: dict | None) -> dict | None:
    """The row of `report` (an evaluation or a benchmark the card holds) of the model the export was made from; a
    benchmark stored by an older retrofit, without "source": the model its speed-ups were against, as it showed."""
    report = report or {}
    this = _find(_rows(report), "model", report.get("this")) or {}
    source = report["source"] if "source" in report else this.get("baseline")
    return next(
        (row for row in _rows(report) if source and (row["model"] == source or _same_path(row["model"], source))), None
    )


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.2f} %"


def results_section(results: dict, curve: bool = False) -> str:
    """Markdown for the card's Results section: a before/after table, then the full evaluation and speed tables
    (with the batch-size curve, `CURVE_FILE`, where `curve`)."""
    from .benchmark import largest_measured, rate_text
    from .evaluation import images_text

    evaluation, bench = results.get("evaluation"), results.get("benchmark")
    this_eval = _find(_rows(evaluation), "model", (evaluation or {}).get("this"))
    this_bench = _find(_rows(bench), "model", (bench or {}).get("this"))
    before_eval, before_bench = (_source_row(report) for report in (evaluation, bench))
    parts = []
    if results.get("run"):  # the before/after table of the recipe run that made the export
        parts.append(f"### Before and after fine-tuning (`retrofit run`)\n\n{results['run']['table']}")
    speed_head = "images/s"
    largest = None
    if bench:
        env = bench["environment"]
        largest = largest_measured(bench, [row for row in (before_bench, this_bench) if row], every=True)
        speed_head = f"images/s ({env['hardware']}, {env['dtype']}, batch {largest})"
    similarity = (evaluation or {}).get("metric") == "similarity"
    k = top_k(evaluation)
    quality = "feature similarity to the first model evaluated" if similarity else f"top-1 | top-{k}"
    if (evaluation or {}).get("metric") == "zero-shot":  # not the accuracy of a classifier's own head
        quality = f"zero-shot top-1 | zero-shot top-{k}"
    lines = [f"| | {quality} | GFLOPs | {speed_head} |", f"|---|{'---|' if similarity else '---|---|'}---|---|"]
    for label, ev, be in (("before: source", before_eval, before_bench), ("after: this model", this_eval, this_bench)):
        if ev is None and be is None:
            continue
        rate = (be or {}).get("results", {}).get(largest or "", {}).get("images_per_s") if be else None
        gflops = (ev or be or {}).get("gflops")
        name = (ev or be or {}).get("model", "")
        if similarity:
            score = "–" if (ev or {}).get("similarity") is None else f"{ev['similarity']:.4f}"
        else:
            score = f"{_pct((ev or {}).get('top1'))} | {_pct(top_k_value(ev or {}, k))}"
        lines.append(
            f"| {label} (`{name}`) | {score} | "
            f"{'–' if gflops is None else f'{gflops:.3g}'} | {'–' if rate is None else rate_text(rate)} |"
        )
    if len(lines) > 2:
        parts.append("### Before / after\n\n" + "\n".join(lines))
    if evaluation:
        heading = {"similarity": "Feature similarity", "zero-shot": "Zero-shot accuracy"}.get(
            evaluation.get("metric"), "Accuracy"
        )
        if evaluation.get("metric") == "zero-shot":
            heading += f" (prompts like {evaluation['prompts'][0]!r})"
        versions = evaluation.get("versions")  # None in a report of a retrofit that did not record them
        releases = (
            f" ({', '.join(f'{name} {release}' for name, release in versions.items())})"
            if isinstance(versions, dict)
            else ""
        )
        parts.append(
            f"### {heading}\n\nOn `{evaluation['data']}` split "
            f"`{evaluation['split']}` "
            f"({images_text(evaluation)}), measured with `retrofit evaluate`{releases}:\n\n{evaluation['table']}"
        )
    if bench:
        from .benchmark import markdown_table

        picture = f"\n\n![images/s against batch size, source and merged]({CURVE_FILE})" if curve else ""
        parts.append(
            "### Speed\n\nMeasured with `retrofit bench` (median of repeats, models measured alternately):\n\n"
            + markdown_table(bench)
            + picture
        )
    return "\n\n".join(parts) if parts else "Not evaluated yet."


# The Results section's lines retrofit rewrites lie between these two (a user's notes around them stay)
RESULTS_START = "<!-- retrofit: the results below are rewritten by `retrofit evaluate/bench --card` -->"
RESULTS_END = "<!-- retrofit: end of results (write your own notes outside these two lines) -->"


def _marked(body: str) -> str:
    return f"{RESULTS_START}\n{body}\n{RESULTS_END}"


def _check_results_lines(text: str, export: Path) -> None:
    """Refuse a card whose two results lines are not one `RESULTS_START` before one `RESULTS_END` (one deleted or
    moved by hand): retrofit cannot tell its results from the user's notes. Neither is fine (`_replace_results`)."""
    starts, ends = text.count(RESULTS_START), text.count(RESULTS_END)
    if starts == ends == 0 or (starts == ends == 1 and text.find(RESULTS_START) < text.find(RESULTS_END)):
        return
    raise RetrofitError(
        f"--card {export}: README.md's results lie between two `<!-- retrofit: ... -->` lines, and one is missing, "
        "repeated or out of order; put them back around retrofit's results, or delete both (retrofit's results then go "
        "at the top of the Results section, your text below them)"
    )


def _replace_results(text: str, body: str, before: str | None = None) -> str:
    """`text` with retrofit's results `body` between `RESULTS_START` and `RESULTS_END`. A card without them (the user
    wrote their own results in place of them, deleted them, or it was written before them) gets them at the top of
    its Results section, what the section says kept below: only retrofit's "Not evaluated yet" paragraph goes, and
    `before`, the results retrofit showed there (rendered from the stored ones), where the section holds them
    unedited. No section: one at the end."""
    start, end = text.find(RESULTS_START), text.find(RESULTS_END)
    if 0 <= start < end:
        return text[:start] + _marked(body) + text[end + len(RESULTS_END) :]
    marker = "\n## Results\n"
    start = text.find(marker)
    if start < 0:
        return text.rstrip("\n") + f"\n{marker}\n{_marked(body)}\n"
    after = start + len(marker)
    end = text.find("\n## ", after)
    section, tail = (text[after:], "") if end < 0 else (text[after:end], text[end:])
    section = section.replace("\r\n", "\n")  # (the card's line endings are set on writing)
    if before and before.strip("\n") in section:
        section = section.replace(before.strip("\n"), "", 1)
    paragraphs = [part.strip("\n") for part in section.split("\n\n") if part.strip("\n")]
    kept = "\n\n".join(part for part in paragraphs if not part.startswith("Not evaluated yet"))  # retrofit's own
    return text[:after] + f"\n{_marked(body)}\n" + (f"\n{kept}\n" if kept else "") + tail


_TOP_LEVEL_KEY = re.compile(r"""^(?!-|#|\s)(["']?)([^:"'#]+)\1:(\s|$)""")


def keeping_the_users_yaml(original: str, card: ModelCard) -> str:
    """`card` as text, its YAML metadata written as the `original` README had it where a value did not change (a
    user's comments and layout stay), only the top-level keys whose values changed (model-index, model_name) dumped
    anew. Where that would not read back as `card`'s metadata, the metadata is dumped whole, as huggingface_hub does.
    The lines end as most of the `original`'s do (CRLF or LF), all of them."""
    crlf = original.count("\r\n") * 2 > original.count("\n")

    def ending_as_original(text: str) -> str:
        text = text.replace("\r\n", "\n")
        return text.replace("\n", "\r\n") if crlf else text

    return ending_as_original(_with_the_users_yaml(original, card))


def _with_the_users_yaml(original: str, card: ModelCard) -> str:
    import yaml
    from huggingface_hub.repocard import REGEX_YAML_BLOCK

    whole = str(card)
    match = REGEX_YAML_BLOCK.search(original)
    try:
        old = yaml.safe_load(match.group(2)) if match else None
        target = yaml.safe_load(card.data.to_yaml()) or {}
    except yaml.YAMLError:
        return whole
    if not isinstance(old, dict) or not isinstance(target, dict):
        return whole
    blocks: list[tuple[str | None, list[str]]] = [(None, [])]  # (top-level key or None: comments, lines)
    for line in match.group(2).splitlines(keepends=True):
        key = _TOP_LEVEL_KEY.match(line)
        if key or line.startswith("#"):
            blocks.append((key.group(2).strip() if key else None, []))
        blocks[-1][1].append(line)
    kept, seen = [], set()
    for key, lines in blocks:
        seen.add(key)
        if key is None or (key in target and target[key] == old.get(key)):
            kept.extend(lines)
        elif key in target:
            kept.append(yaml.dump({key: target[key]}, sort_keys=False, allow_unicode=True))
    kept += [yaml.dump({k: v}, sort_keys=False, allow_unicode=True) for k, v in target.items() if k not in seen]
    text = "".join(line if line.endswith("\n") else line + "\n" for line in kept).rstrip("\n")
    try:
        if yaml.safe_load(text) != target:
            return whole
    except yaml.YAMLError:
        return whole
    return f"{match.group(1)}{text}{match.group(3)}{card.text}"


def _kept_apart(new: list[EvalResult], kept: list[EvalResult]) -> list[EvalResult]:
    """`new` entries, those that would join a kept entry of another data set in the model-index named as their
    configuration: huggingface_hub groups entries by task, dataset type, configuration, split and revision and names
    a group by its first entry's dataset, so retrofit's scores on `imgs` were shown as the user's on another image
    folder (both type imagefolder), and then kept as the user's by the next run."""
    taken = {result.unique_identifier: result.dataset_name for result in kept}
    for result in new:
        if taken.get(result.unique_identifier, result.dataset_name) != result.dataset_name:
            result.dataset_config = result.dataset_name
    return new


def _index_key(result: EvalResult) -> tuple:
    """What tells a model-index entry apart (as the card's YAML gives it back)."""
    return (result.task_type, result.dataset_type, result.dataset_name, result.dataset_split, result.metric_type,
            result.metric_name, result.metric_value)  # fmt: skip


def _not_ours(entries: list[EvalResult], previous: list[EvalResult], new: list[EvalResult]) -> list[EvalResult]:
    """The card's model-index entries that are not retrofit's to replace. Retrofit's: one it wrote from the stored
    evaluation, or one of its metrics on the data and split the new evaluation scored (a results file deleted since,
    an older version's entry). A user's entry (another data set, a metric of theirs, a value they edited) stays."""
    written = {_index_key(old) for old in previous}
    scored = {(r.task_type, r.dataset_type, r.dataset_name, r.dataset_split) for r in new}

    def ours(result: EvalResult) -> bool:
        on = (result.task_type, result.dataset_type, result.dataset_name, result.dataset_split)
        return _index_key(result) in written or bool(_OUR_METRIC.fullmatch(result.metric_name or "")) and on in scored

    return [result for result in entries if not ours(result)]


_BACKTICKED = re.compile(r"`([^`\n]+)`")
_NAMED_BY = ("model", "baseline", "this", "source", "data")  # report keys whose value names a model or data set


def _published(report: dict) -> dict:
    """`report` as an export's card and `RESULTS_FILE` publish it (`push` uploads both): every local path it names a
    model or data set by (its fields, and the backticked names in its tables) becomes the path's last part
    (`provenance.public_name`), or its last parts where two paths would otherwise read alike, so that rows stay
    apart; Hub ids and ``retrofit:NAME`` stay as they are."""
    found: set[str] = set()

    def collect(value) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                if key in _NAMED_BY and isinstance(item, str):
                    found.add(item)
                collect(item)
        elif isinstance(value, list):
            for item in value:
                collect(item)
        elif isinstance(value, str):
            found.update(_BACKTICKED.findall(value))

    collect(report)
    local = [spec for spec in found if public_name(spec) != spec or Path(spec).expanduser().exists()]
    short = {Path(spec).expanduser().resolve().name for spec in local}  # a table may name them so already
    names = _short_names(local, taken={spec for spec in found if spec not in local and spec not in short})

    def publish(value, key: str | None = None):
        if isinstance(value, dict):
            return {name: publish(item, name) for name, item in value.items()}
        if isinstance(value, list):
            return [publish(item) for item in value]
        if isinstance(value, str):
            if key in _NAMED_BY and value in names:
                return names[value]
            return _BACKTICKED.sub(lambda match: f"`{names.get(match.group(1), match.group(1))}`", value)
        return value

    return publish(report) if names else report


def _short_names(paths: list[str], taken: set[str] = frozenset()) -> dict[str, str]:
    """Each local path by its last part, with more parts where that would name two different folders alike or read
    as one of the names in `taken` (the report's Hub ids)."""
    resolved = {spec: Path(spec).expanduser().resolve().parts for spec in paths}
    names: dict[str, str] = {}
    for spec, parts in resolved.items():
        depth = 1
        while depth < len(parts) and (
            "/".join(parts[-depth:]) in taken
            or any(other[-depth:] == parts[-depth:] and other != parts for other in resolved.values())
        ):
            depth += 1
        names[spec] = "/".join(parts[-depth:]).lstrip("/") or spec
    return names


def _is_report(key: str, report) -> bool:
    """True if `report` has the shape `update_card` reads for `key` (an evaluation, a benchmark or a run's table)."""
    if not isinstance(report, dict):
        return False
    if key == "run":
        return isinstance(report.get("table"), str)
    rows = report.get("models")
    if not isinstance(rows, list) or not all(
        isinstance(row, dict) and isinstance(row.get("model"), str) for row in rows
    ):
        return False
    settings = report.get("settings")
    return key == "evaluation" or (
        isinstance(settings, dict) and isinstance(settings.get("batch_sizes"), list)
        and isinstance(report.get("environment"), dict)
    )  # fmt: skip


@releases_write_locks
def update_card(
    export: str | Path, *, evaluation: dict | None = None, benchmark: dict | None = None, run: dict | None = None
) -> Path:
    """Write new evaluation and/or benchmark results (or a recipe run's before/after table, `run`: {"table": ...})
    into an export: `retrofit_results.json`, the README's Results section, (for evaluations) the model-index
    metadata and (for a benchmark of several batch sizes) its curve, `CURVE_FILE`, all files or none. Returns the
    README path. Model-index entries the user added to the card stay; retrofit's own, of an earlier evaluation, are
    replaced. Refused in one line: a folder that is not a retrofit export with a README.md, a report not of the shape
    `retrofit evaluate` / `retrofit bench` ``--json`` write, a README.md or results file that is a link or cannot be
    read, and (drawing a curve) a `CURVE_FILE` retrofit did not draw."""
    from .loading import is_merged, load_config
    from .provenance import made_from

    if not isinstance(export, str | os.PathLike):
        raise RetrofitError(f"update_card takes an export's folder, not {shown(export)}")
    export = Path(export)
    if not (export / "config.json").is_file() or not (export / "README.md").is_file():
        raise RetrofitError(
            f"update_card: '{export}' is not an export with a model card (no config.json or README.md); pass the "
            "folder convert or finetune wrote"
        )
    if not is_merged(load_config(export)):  # a model of the user's: its card (a Results section of theirs) stays
        raise RetrofitError(
            f"update_card: '{export}' is not a retrofit export (no PatchMerger in its config), so its README.md is "
            "not retrofit's to rewrite; pass the folder convert or finetune wrote"
        )
    hold_write_lock(export, "--card")  # not while `push` uploads it or another run writes it
    for key, report in (("evaluation", evaluation), ("benchmark", benchmark), ("run", run)):
        if report is not None and not _is_report(key, report):
            command = {"evaluation": "retrofit evaluate's", "benchmark": "retrofit bench's"}.get(key)
            what = f"a report as {command} --json writes it" if command else 'a mapping with the "table" to show'
            raise RetrofitError(f"update_card's {key} must be {what}, not {shown(report)}")
    _check_card_files(export)
    results = _load_results(export)
    curve = export / CURVE_FILE
    ours = _is_our_curve(curve)
    # the Results section and model-index entries retrofit wrote from what is stored
    shown_before, previous = _render(results, ours)
    previous = previous or []
    model = measured_on(export)
    dropped = _stale_reports(results, model)  # measured on another model than the export holds now: they go
    results = {key: value for key, value in results.items() if key not in dropped} | model
    if run is not None:
        results["run"] = _published(dict(run))
    config = load_config(export)
    for key, report in (("evaluation", evaluation), ("benchmark", benchmark)):
        if report is None:
            continue
        report = dict(report)
        this = next((row["model"] for row in report.get("models", []) if _same_model(row["model"], export)), None)
        if this is None:  # as --card refuses it: the card would show other models' numbers as this one's
            raise RetrofitError(
                f"update_card: no model of the {key} is the export '{export}' (its models: "
                f"{', '.join(shown(row.get('model')) for row in report.get('models', []))}; a relative path is read "
                "from the current folder): measure the export too, or call update_card from the folder the report "
                "was made in"
            )
        report["this"] = this
        # the row of the model the export was made from, if it was evaluated or timed too (the card's "before")
        others = (row["model"] for row in report.get("models", []) if row["model"] != this and not row.get("merged"))
        report["source"] = next((spec for spec in others if made_from(config, spec)), None)
        if key == "evaluation" and "data_is_local" not in report:  # decided before publishing shortens the data's name
            report["data_is_local"] = is_local_data(str(report.get("data")))
        if key == "evaluation" and report["data_is_local"] and "data_format" not in report:
            report["data_format"] = local_format(str(report.get("data")))
        results[key] = _published(report)
    readme = export / "README.md"
    card, on_disk = _load_card(export)
    _check_results_lines(card.text, export)
    drawn = None  # a new benchmark over several batch sizes: its curve goes into the card (and to the Hub with it)
    if benchmark is not None and len(benchmark["settings"]["batch_sizes"]) > 1:
        from .benchmark import batch_size_figure

        _check_curve(export)
        drawn = batch_size_figure(results["benchmark"])  # its legend names the models as the card does
    # a curve of an older benchmark than the new one, or of another model
    stale = ours and drawn is None and (benchmark is not None or "benchmark" in dropped)
    has_curve = drawn is not None or (ours and not stale)
    section, eval_results = _render(results, has_curve)
    card.text = _replace_results(card.text, section, shown_before)
    if eval_results is not None or "evaluation" in dropped:  # an earlier evaluation's entries go; the user's stay
        new = eval_results or []
        kept = _not_ours(card.data.eval_results or [], previous, new)
        card.data.eval_results = kept + _kept_apart(new, kept) or None
    if eval_results:
        folder = export.resolve().name  # retrofit names it by its folder, which may have been renamed or copied since
        if card.data.model_name in (None, results.get(MODEL_NAME), folder):  # retrofit's name for it (a user's stays)
            card.data.model_name = results[MODEL_NAME] = folder
    content = keeping_the_users_yaml(on_disk, card)  # (its line endings as they are)
    files = {export / RESULTS_FILE: json.dumps(results, indent=2) + "\n", readme: content}
    if drawn is not None:
        files[curve] = drawn
    try:
        write_files(files)
        if stale:
            curve.unlink()
    except OSError as exc:
        raise RetrofitError(
            f"--card {export}: could not write the results ({describe_os_error(exc)}); the card was left as it was"
        ) from None
    return readme
