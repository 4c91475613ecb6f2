"""`evaluate`: top-1 / top-k accuracy and loss of several models on the same data, side by side.

Accuracy goes through `evaluate` metric modules that ship with retrofit (``retrofit/metrics/*``, loaded by path, so
no Hub access is needed). Under ``accelerate launch`` the data are sharded over the processes and the predictions are
gathered with ``gather_for_metrics`` (which drops the padding of the last batch: every image counts once).

Labels: the first model's labels are the reference. Other models must have the same label *names* (their ids may
differ: predictions are mapped by name); the data's class names must be among them (mapped by name too).

Backbones (DINOv2, CLIP/SigLIP vision towers, ...) have no labels: for them the report is the mean cosine similarity
of each model's features (`Head.features`, what `finetune` distils) to the first model's, per image, on the same
images (labels are not read), each model seeing them as its own image processor prepares them. Classifiers and
backbones are not mixed in one run.

Zero-shot (``--zero-shot``, image-text dual encoders: CLIP, SigLIP and their exports): one prompt per class of the
data (`retrofit.zero_shot.prompts`), embedded once per model by its own tokenizer and text tower; each model is then a
classifier over those prompts (`ZeroShotClassifier`) scored by the same loop, with the agreement of its top-1
predictions with the first model's (`zero_shot_scores`).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace

import torch

from .atomic import hold_write_lock, releases_write_locks
from .data import dataset_label_map, generic_labels, model_labels, same_class_name
from .errors import RetrofitError, brief, check_arguments, check_interrupted, log_to_stderr
from .provenance import dataset_commit, versions
from .reads import reads_each_folder_once
from .settings import EVALUATE_SEED, EvaluateArgs, chosen_images, model_list
from .train import keeps_callers_random_state
from .zero_shot import DEFAULT_TEMPLATE

METRICS_DIR = Path(__file__).parent / "metrics"


def load_metric(name: str):
    """One of retrofit's shipped `evaluate` metrics (``accuracy``, ``top_k_accuracy``), loaded offline by path."""
    import evaluate

    path = METRICS_DIR / name
    if not (path / f"{name}.py").is_file():
        raise RetrofitError(f"metric '{name}' is not shipped with retrofit; available: accuracy, top_k_accuracy")
    return evaluate.load(str(path), keep_in_memory=True)


def is_backbone(config) -> bool:
    """True for a supported family's backbone (Dinov2Model, CLIPVisionModel, ...); False for classifiers and for
    models of families retrofit does not convert (left to the label checks)."""
    from .loading import family_and_head

    try:
        return not family_and_head(config)[1].is_classifier
    except RetrofitError:
        return False


def prediction_map(reference: dict[int, str], other: dict[int, str], names: tuple[str, str]) -> list[int] | None:
    """For each of `other`'s label ids, the reference id with the same name (None: identical ids already)."""
    if other == reference:
        return None
    if generic_labels(other) and generic_labels(reference) and len(other) == len(reference):
        return None
    by_name, theirs = _ids_by_name(reference, names[0]), _ids_by_name(other, names[1])
    if by_name.keys() != theirs.keys():
        only = sorted(by_name.keys() ^ theirs.keys())[:4]
        raise RetrofitError(
            f"'{names[1]}' and '{names[0]}' have different label sets ({len(other)} vs {len(reference)} labels, e.g. "
            f"{only}); compare models trained on the same classes"
        )
    return [by_name[same_class_name(other[index])] for index in range(len(other))]


def check_label_ids(spec: str, config) -> None:
    """Refuse a classifier whose labels are not numbered 0..N-1 (its config.json's id2label): its N logits could not
    be named, nor a class id read as one of them (a label would be blamed on the data as out of range)."""
    ids = sorted(model_labels(config))
    if ids != list(range(len(ids))):
        raise RetrofitError(
            f"the labels of '{spec}' have the ids {ids[:8]}, not 0..{len(ids) - 1}: a classifier's N classes are "
            "numbered 0..N-1; fix the id2label of its config.json"
        )


def _ids_by_name(labels: dict[int, str], spec: str) -> dict[str, int]:
    """A model's label ids by name, to map its predictions onto another model's; a name given to two ids is one
    line (its predictions of either could not be told apart)."""
    ids: dict[str, int] = {}
    for index, name in sorted(labels.items()):
        key = same_class_name(name)
        if key in ids:
            raise RetrofitError(
                f"'{spec}' names two classes {name!r} (ids {ids[key]} and {index}), so its predictions cannot be "
                "mapped by name onto another model's ids; compare models whose labels have the same ids"
            )
        ids[key] = index
    return ids


def _accelerator(*, fresh: bool = False):
    """The Accelerator scoring runs under. `fresh`: forget the precision a training run set (Accelerate keeps it
    process-wide), so that models scored after training are scored as the ones before it were."""
    from accelerate import Accelerator

    if fresh:
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(reset_partial_state=False)
        GradientState._reset_state()
    return Accelerator(cpu=not torch.cuda.is_available())


@reads_each_folder_once
@keeps_callers_random_state
def evaluate_models(
    models: list[str | os.PathLike] | str | os.PathLike,
    *,
    data: str | os.PathLike,
    data_revision: str | None = None,
    split: str | None = None,
    limit: int | None = None,
    sample: int | None = None,
    holdout: float | None = None,
    batch_size: int = 64,
    top_k: int = 5,
    image_column: str = "image",
    label_column: str = "label",
    trust_remote_code: bool = False,
    zero_shot: bool = False,
    prompt_template: str = DEFAULT_TEMPLATE,
    log: Callable[[str], None] = print,
) -> dict:
    """Evaluate `models` (checkpoints, Hub ids, exports: one or a list) on one split (validation, or test where the
    data has that instead; with `holdout`, train): its first `limit` images, or a shuffled `sample` of them, the same
    every run; of the fraction `holdout` of it that ``finetune --holdout`` held out of training. Returns a JSON-ready
    report with a table. `zero_shot`: score image-text dual encoders by zero-shot classification with
    `prompt_template`. The settings are checked as the command's options are."""
    from .data import load_split, make_dataloader, split_read
    from .loading import (
        family_and_head,
        image_channels,
        load_config,
        load_image_processor,
        load_model,
        trained_head_config,
    )

    check_arguments("evaluate_models", log=log)
    models = model_list(models)  # one, or several
    if not models:
        raise RetrofitError("no models to evaluate; pass one or more checkpoint folders, Hub ids or exports")
    args = EvaluateArgs(  # the checks of the command's options, for Python callers too (folders as paths)
        models=models, data=data, data_revision=data_revision, split=split, limit=limit, sample=sample, holdout=holdout,
        batch_size=batch_size, top_k=top_k, image_column=image_column, label_column=label_column,
        trust_remote_code=trust_remote_code, zero_shot=zero_shot, prompt_template=prompt_template,
    )  # fmt: skip
    models, data, split, batch_size, top_k = args.models, args.data, args.split, args.batch_size, args.top_k
    split = split_read(data, split, revision=args.data_revision)  # validation read as the data's test names test
    # which images: the first --limit, or a shuffled --sample (of those --holdout held out); `log` says where the first
    # N miss classes of the split
    choose = {**chosen_images(args.limit, args.sample, EVALUATE_SEED), "log": log, "revision": args.data_revision}
    if args.holdout is not None:  # stratified by --label-column, as finetune's training images are
        choose |= {"holdout": args.holdout, "held": True, "holdout_by": args.label_column}
    # the commit of a Hub dataset's --data-revision (or main branch), asked as it is read, for the report
    commit = dataset_commit(args.data, args.data_revision)
    recorded = {"data_revision": commit} if commit else {}
    image_column, label_column, trust_remote_code = args.image_column, args.label_column, args.trust_remote_code
    saved = [load_config(spec, trust_remote_code=trust_remote_code) for spec in models]
    if zero_shot:
        return _evaluate_zero_shot(
            models, saved, data=data, split=split, choose=choose, batch_size=batch_size, top_k=top_k,
            image_column=image_column, label_column=label_column, template=prompt_template,
            trust_remote_code=trust_remote_code, log=log,
        ) | recorded  # fmt: skip
    configs = [trained_head_config(config) for config in saved]  # unsupported types are refused here
    for spec, before, config in zip(models, saved, configs, strict=True):
        if config is not before:
            log(
                f"note: '{spec}' ({', '.join(before.architectures)}) has no trained classifier; comparing the features "
                f"of its {family_and_head(config)[1].class_name}"
            )
    backbones = [is_backbone(config) for config in configs]
    if any(backbones):
        if not all(backbones):
            other = backbones.index(not backbones[0])
            raise RetrofitError(
                f"'{models[0]}' is {_what(configs[0])} ({_kind(saved[0], configs[0])}) and '{models[other]}' "
                f"{_what(configs[other])} ({_kind(saved[other], configs[other])}); evaluate compares classifiers "
                "by accuracy or backbones by feature similarity, so pass models of one kind"
            )
        features = [_features(config) for config in configs]
        other = next((i for i, each in enumerate(features) if each != features[0]), None)
        if other is not None:  # cosines of features of two kinds (a CLIP's projection against its tower's pooler)
            raise RetrofitError(
                f"'{models[0]}' ({_kind(saved[0], configs[0])}) is compared by {features[0]} and '{models[other]}' "
                f"({_kind(saved[other], configs[other])}) by {features[other]}, which are not comparable; compare a "
                "merged model with its own source (both full dual encoders, or both vision towers)"
            )
        return _evaluate_backbones(
            models, configs, data=data, split=split, choose=choose, batch_size=batch_size, image_column=image_column,
            trust_remote_code=trust_remote_code, log=log,
        ) | recorded  # fmt: skip
    reference = model_labels(configs[0])
    if not reference:
        raise RetrofitError(f"'{models[0]}' has no labels (no classification head); evaluate classifiers")
    for spec, config in zip(models, configs, strict=True):
        check_label_ids(spec, config)
    maps = [
        prediction_map(reference, model_labels(config), (models[0], spec))
        for spec, config in zip(models, configs, strict=True)
    ]
    dataset = load_split(data, split, image_column=image_column, label_column=label_column, **choose)
    label_map = dataset_label_map(
        reference,
        dataset,
        data,
        hint=f"evaluate needs a label for every image, a class id (0..{len(reference) - 1}) or one of the models' "
        "class names: fix the data, or choose the label column with --label-column",
    )

    accelerator = _accelerator(fresh=True)  # not at the precision of a training run earlier in this process
    loaded = []
    for spec, config in zip(models, configs, strict=True):
        model = load_model(spec, config=config, trust_remote_code=trust_remote_code).eval()
        processor = load_image_processor(spec, config, log=log)
        loaded.append((spec, config, model.to(accelerator.device), processor))
    groups = _preprocessing_groups([(processor, config) for _, config, _, processor in loaded])

    k = min(top_k, len(reference))
    scores: dict[int, dict] = {}
    for indices in groups.values():
        _, config, _, processor = loaded[indices[0]]
        loader = make_dataloader(
            dataset,
            processor,
            batch_size=min(batch_size, len(dataset)),
            label_map=label_map,
            num_channels=image_channels(config),
        )
        group = score_models([loaded[i][2] for i in indices], loader, k=k, maps=[maps[i] for i in indices])
        scores.update(zip(indices, group, strict=True))
    rows = [
        {**_row(spec, config, processor), **scores[index]} for index, (spec, config, _, processor) in enumerate(loaded)
    ]
    report = {
        "metric": "accuracy",
        "data": data,
        "split": split,
        "num_examples": rows[0]["num_examples"],
        **images_chosen(choose, rows[0]["num_examples"]),
        "top_k": k,
        "processes": accelerator.num_processes,
        "versions": versions(),
        "labels": [reference[i] for i in range(len(reference))],
        "models": rows,
    }
    report["table"] = markdown_table(report)
    return report | recorded


def _what(config) -> str:
    """A model's kind in words, for messages."""
    from .loading import family_and_head

    head = family_and_head(config)[1]
    if head.is_dual_encoder:
        return "an image-text dual encoder"
    return "a classifier" if head.is_classifier else "a vision backbone"


FEATURES = {  # a backbone's `Head.features`, in words
    "pooler": "its pooler output",
    "cls": "its CLS token",
    "cls+mean": "its CLS token and mean patch token",
    "mean": "its mean patch token",
    "image_embeds": "its projected image embeddings",
}


def _features(config) -> str:
    """What feature similarity compares of a backbone or dual encoder, in words: a dual encoder whose image
    embeddings are its vision tower's pooler output, normalised (SigLIP: no projection), compares as that tower."""
    from .loading import family_and_head

    head = family_and_head(config)[1]
    if head.is_dual_encoder and tuple(head.image_modules) == (head.encoder,):
        return FEATURES["pooler"]
    return FEATURES.get(head.features, head.features)


def _kind(saved, config) -> str:
    """What a model is scored as, for messages: its class, and for a full CLIP/SigLIP model the part compared."""
    from .loading import family_and_head

    name = family_and_head(config)[1].class_name
    own = ", ".join(getattr(saved, "architectures", None) or []) or name
    return own if own == name or config is saved else f"{own}, compared by its {name}"


def _preprocessing_groups(pairs: list[tuple]) -> dict[str, list[int]]:
    """Indices of the (image processor, config) pairs that prepare images the same way (equal processor settings and
    channel count), keyed by those settings: such models share one pass over the data."""
    from .loading import image_channels

    groups: dict[str, list[int]] = {}
    for index, (processor, config) in enumerate(pairs):
        key = json.dumps([processor.to_dict(), image_channels(config)], sort_keys=True, default=str)
        groups.setdefault(key, []).append(index)
    return groups


def _row(spec: str, config, processor) -> dict:
    """The columns every evaluated model has: what it is and what it costs, at the size of the images its `processor`
    gives it (what it was scored on; a DINOv2 config says 518 and its processor crops 224, as convert prices it)."""
    from .cost import model_cost
    from .loading import has_untrained_classifier, is_merged, processor_image_size

    merged = is_merged(config)
    row = {
        "model": spec,
        "merged": merged,
        "source": getattr(config, "merge_source", None) if merged else None,
        "merge_after_layer": getattr(config, "merge_after_layer", None),
        "merge_num_tokens": getattr(config, "merge_num_tokens", None),
        "gflops": model_cost(config, processor_image_size(processor)).gflops,
        # which class prepared its images: transformers resizes with torchvision where it is installed, else with PIL
        "image_processor": type(processor).__name__,
    }
    if merged and has_untrained_classifier(spec):  # scored, its numbers are chance (`markdown_table` says so)
        row["untrained_classifier"] = True
    return row


def _models_and_loaders(
    models: list[str], configs: list, dataset, batch_size: int, label_map, trust_remote_code: bool, log
) -> tuple[list, list, list]:
    """The models, loaded for scoring, one dataloader per model over `dataset`, each preparing the images with the
    model's own image processor (models that prepare them the same way share one loader, scored in one pass), and
    those processors."""
    from .data import make_dataloader
    from .loading import image_channels, load_image_processor, load_model

    loaded = [
        load_model(spec, config=config, trust_remote_code=trust_remote_code).eval()
        for spec, config in zip(models, configs, strict=True)
    ]
    processors = [load_image_processor(spec, config, log=log) for spec, config in zip(models, configs, strict=True)]
    loaders: list = [None] * len(models)
    for indices in _preprocessing_groups(list(zip(processors, configs, strict=True))).values():
        loader = make_dataloader(  # no shuffling: every loader gives the same images in the same order
            dataset,
            processors[indices[0]],
            batch_size=min(batch_size, len(dataset)),
            label_map=label_map,
            num_channels=image_channels(configs[indices[0]]),
        )
        for index in indices:
            loaders[index] = loader
    return loaded, loaders, processors


def _evaluate_backbones(
    models: list[str], configs: list, *, data, split, choose, batch_size, image_column, trust_remote_code, log
) -> dict:
    """Feature similarity of backbones to the first one, on one split (its labels are not read). Each model sees the
    images as its own image processor prepares them; models that prepare them the same way share one loader."""
    from .data import load_split

    dataset = load_split(data, split, image_column=image_column, label_column=None, **choose)
    loaded, loaders, processors = _models_and_loaders(
        models, configs, dataset, batch_size, None, trust_remote_code, log
    )
    scores = feature_similarity(loaded, loaders, names=models)
    for score in scores:  # NaN (a model's or the first one's features) is not a similarity, nor valid JSON
        score["similarity"] = score["similarity"] if math.isfinite(score["similarity"]) else None
    rows = [
        {**_row(spec, config, processor), **score}
        for spec, config, processor, score in zip(models, configs, processors, scores, strict=True)
    ]
    report = {
        "metric": "similarity",
        "data": data,
        "split": split,
        "num_examples": rows[0]["num_examples"],
        **images_chosen(choose, rows[0]["num_examples"]),
        "processes": _accelerator().num_processes,
        "versions": versions(),
        "models": rows,
    }
    report["table"] = markdown_table(report)
    return report


# ----------------------------------------------------------------------------------------------------------------
# Zero-shot classification of image-text dual encoders
# ----------------------------------------------------------------------------------------------------------------


def check_dual_encoders(models: list[str], configs: list, *, where: str = "--zero-shot") -> None:
    """Refuse (one line) a model that is not an image-text dual encoder: zero-shot classification needs a text tower."""
    from .loading import family_and_head

    for spec, config in zip(models, configs, strict=True):
        head = family_and_head(config)[1]  # an unsupported model type is refused here
        if not head.is_dual_encoder:
            raise RetrofitError(
                f"{where} needs image-text dual encoders, and '{spec}' is {_what(config)} ({head.class_name}); pass "
                "full CLIPModel/SiglipModel checkpoints or their retrofit exports (converted without --task), or "
                f"leave out {where}"
            )


def zero_shot_classes(dataset, data: str) -> tuple[list[str], dict | None]:
    """The class names of a labelled split (a ClassLabel's names, as image folders and fashion-mnist have, or the
    distinct names of a column of text labels, sorted; a split limited by `load_split(split_classes=True)` names all
    of its split's) and the map of its labels to their index (None: the ids are); every label checked. No class names:
    one line."""
    from .data import check_labels, class_names, column_values

    names, label_map = class_names(dataset), None
    text = getattr(dataset.features.get("label"), "dtype", None) in ("string", "large_string")
    if names is None and text:
        names = sorted({value for value in column_values(dataset) if value is not None})
        label_map = {name: index for index, name in enumerate(names)}
    if not names:
        raise RetrofitError(
            f"'{data}' has no class names to build prompts from (its label column holds numbers, not a ClassLabel "
            "or text); zero-shot needs named classes: use an image folder (one sub-folder per class), fashion-mnist "
            "or a dataset whose label column is a ClassLabel (choose it with --label-column)"
        )
    _check_class_names(names, data)
    check_labels(dataset, len(names), data=data, label_map=label_map, hint="give every image one of the classes")
    return names, label_map


def _check_class_names(names: list[str], data: str) -> None:
    """Refuse class names that give no zero-shot score: one class (its prompt always wins: 100 % by construction), a
    blank name (no prompt), two names that give one prompt (underscores become spaces: the classes would tie)."""
    if len(names) < 2:
        raise RetrofitError(
            f"'{data}' has 1 class ({names[0]!r}): zero-shot over one prompt always picks it (100 % whatever "
            "the model); use images of two or more classes"
        )
    shown: dict[str, str] = {}
    for name in names:
        if not name.replace("_", " ").strip():  # "_" too: underscores become spaces
            raise RetrofitError(
                f"'{data}' has a class with a blank name ({name!r}), which gives no prompt; name every class"
            )
        words = name.replace("_", " ")
        if words in shown:
            raise RetrofitError(
                f"the classes {shown[words]!r} and {name!r} of '{data}' give one prompt (underscores become spaces), "
                "so zero-shot cannot tell them apart; rename one of them"
            )
        shown[words] = name


def load_zero_shot_tokenizer(spec: str, config, *, revision: str | None = None, texts: Sequence[str] = ()):
    """A dual encoder's tokenizer, which zero-shot classification needs; none is one line saying what to add, and so
    is one that turns two of `texts` (the prompts) into the same tokens: the classes would tie (transformers builds a
    tokenizer with an empty vocabulary for a checkpoint without tokenizer files, which gives every prompt the same)."""
    from .loading import load_tokenizer
    from .zero_shot import same_tokens

    reasons: list[str] = []
    tokenizer = load_tokenizer(spec, config, revision=revision, log=reasons.append)
    if tokenizer is None:
        raise RetrofitError(
            f"'{spec}' has no usable tokenizer, which zero-shot classification needs to embed the prompts; copy its "
            "source's tokenizer files (tokenizer.json or vocab.json/merges.txt or spiece.model, with "
            "tokenizer_config.json and special_tokens_map.json) into it"
        )
    try:
        pair = same_tokens(tokenizer, list(texts), config) if texts else None
    except RetrofitError as exc:  # a tokenizer without a padding token
        raise RetrofitError(str(exc).replace("the model's tokenizer", f"the tokenizer of '{spec}'")) from None
    if pair:
        raise RetrofitError(
            f"the tokenizer of '{spec}' ({len(tokenizer)} tokens) gives the prompts {pair[0]!r} and {pair[1]!r} the "
            "same tokens (as its text tower reads them: characters it does not know, or cut at its length), so "
            "zero-shot cannot tell their classes apart; if its tokenizer files are missing, copy its source's "
            "(tokenizer.json or vocab.json/merges.txt or spiece.model, with tokenizer_config.json) into it, else "
            "rename those classes or change --prompt-template"
        )
    return tokenizer


class ZeroShotClassifier(torch.nn.Module):
    """A dual encoder as a classifier over fixed texts (one prompt per class): its logits are the model's image-text
    logits (``logits_per_image``) of the images against the texts' embeddings, computed once (`text_embeds`,
    normalised; `retrofit.zero_shot.text_embeddings`)."""

    def __init__(self, model: torch.nn.Module, text_embeds: torch.Tensor) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("text_embeds", text_embeds, persistent=False)

    def forward(self, pixel_values: torch.Tensor) -> SimpleNamespace:
        from .zero_shot import image_embeddings, zero_shot_logits

        embeds = image_embeddings(self.model, pixel_values)
        return SimpleNamespace(logits=zero_shot_logits(self.model, embeds, self.text_embeds))


def agreement(predictions: list[int], reference: list[int]) -> float:
    """The share of images on which `predictions` (top-1 ids) equal `reference`'s (the shipped accuracy metric)."""
    if len(predictions) != len(reference):
        raise RetrofitError(f"{len(predictions)} predictions against {len(reference)}; score both on the same images")
    return load_metric("accuracy").compute(predictions=predictions, references=reference)["accuracy"]


def _loaders_per_model(loader, count: int) -> tuple[list, list]:
    """`loader` (one dataloader for all `count` models, or one per model) as one per model, and the distinct ones
    (a loader shared by several models is run once). Distinct loaders must give the same images in the same order:
    the same number of images, one batch size, no shuffling; else one line."""
    per_model = list(loader) if isinstance(loader, Sequence) else [loader] * count
    if len(per_model) != count:
        raise RetrofitError(f"{len(per_model)} dataloaders for {count} models; pass one loader, or one per model")
    distinct = list({id(each): each for each in per_model}.values())
    if len(distinct) > 1:
        shapes = {(len(each.dataset), each.batch_size) for each in distinct}
        shuffled = any(not isinstance(each.sampler, torch.utils.data.SequentialSampler) for each in distinct)
        if len(shapes) > 1 or shuffled:
            raise RetrofitError(
                f"the models' dataloaders do not give the same images in the same order ((images, batch size): "
                f"{sorted(shapes)}, shuffled: {shuffled}); build them over one dataset, one batch size, no shuffling"
            )
    return per_model, distinct


def zero_shot_scores(
    models: list,
    tokenizers: list,
    loader: torch.utils.data.DataLoader | Sequence[torch.utils.data.DataLoader],
    texts: list[str],
    *,
    k: int,
    reference: list[int] | None = None,
    fresh: bool = False,
) -> list[dict]:
    """Zero-shot top-1, top-k and agreement of dual encoders on labelled images whose label i is the class of
    ``texts[i]`` (one prompt per class): each model embeds the texts once with its tokenizer and text tower, then is
    scored by `score_models`. Agreement: the share of images whose top-1 equals the first model's (or `reference`'s,
    top-1 ids from an earlier call's ``predictions``). `loader` is one dataloader for all models, or one per model
    (models that share one are scored in one pass; all must give the same images in the same order). `fresh`: after
    a training run in this process, score at the precision the models before it were scored at (`_accelerator`)."""
    from .zero_shot import text_embeddings

    if len(tokenizers) != len(models):
        raise RetrofitError(f"{len(tokenizers)} tokenizers for {len(models)} models; pass one per model")
    per_model, distinct = _loaders_per_model(loader, len(models))
    accelerator = _accelerator(fresh=fresh)
    classifiers = []
    for model, tokenizer in zip(models, tokenizers, strict=True):
        model = model.to(accelerator.device).eval()
        classifiers.append(ZeroShotClassifier(model, text_embeddings(model, tokenizer, texts)))
    scores: dict[int, dict] = {}
    for mine in distinct:
        indices = [i for i, each in enumerate(per_model) if each is mine]
        group = score_models([classifiers[i] for i in indices], mine, k=k, predictions=True)
        scores.update(zip(indices, group, strict=True))
    first = reference if reference is not None else scores[0]["predictions"]
    return [
        {
            "top1": scores[i]["top1"],
            f"top{k}": scores[i][f"top{k}"],
            "agreement": agreement(scores[i]["predictions"], first),
            "num_examples": scores[i]["num_examples"],
            "nonfinite": scores[i]["nonfinite"],
            "predictions": scores[i]["predictions"],
        }
        for i in range(len(models))
    ]


def _evaluate_zero_shot(
    models: list[str], configs: list, *, data, split, choose, batch_size, top_k, image_column, label_column, template,
    trust_remote_code, log,
) -> dict:  # fmt: skip
    """`evaluate --zero-shot`: everything a user can get wrong (not a dual encoder, data without class names, no
    tokenizer) is refused before any model is loaded."""
    from .data import load_split
    from .zero_shot import prompts

    check_dual_encoders(models, configs)
    dataset = load_split(data, split, image_column=image_column, label_column=label_column, split_classes=True,
                         **choose)  # fmt: skip
    names, label_map = zero_shot_classes(dataset, data)
    texts = prompts(names, template)
    tokenizers = [
        load_zero_shot_tokenizer(spec, config, texts=texts) for spec, config in zip(models, configs, strict=True)
    ]
    loaded, loaders, processors = _models_and_loaders(
        models, configs, dataset, batch_size, label_map, trust_remote_code, log
    )
    k = min(top_k, len(names))
    scores = zero_shot_scores(loaded, tokenizers, loaders, texts, k=k)
    rows = []
    for spec, config, processor, score in zip(models, configs, processors, scores, strict=True):
        score.pop("predictions")
        rows.append({**_row(spec, config, processor), **score})
    report = {
        "metric": "zero-shot",
        "data": data,
        "split": split,
        "num_examples": rows[0]["num_examples"],
        **images_chosen(choose, rows[0]["num_examples"]),
        "top_k": k,
        "processes": _accelerator().num_processes,
        "versions": versions(),
        "template": template,
        "labels": names,
        "prompts": texts,
        "models": rows,
    }
    report["table"] = markdown_table(report)
    return report


def feature_similarity(
    models: list,
    loader: torch.utils.data.DataLoader | Sequence[torch.utils.data.DataLoader],
    *,
    names: list[str] | None = None,
    accelerator=None,
) -> list[dict]:
    """Mean cosine similarity, per image, of each model's features (`Head.features`) to the first model's; the first
    model scores 1. Gathered over the processes of an `accelerate launch`. ``nonfinite``: the images whose features
    hold NaN or inf (the similarity is then NaN).

    `loader` is one dataloader for all models, or a sequence of one dataloader per model (the same loader object may
    serve several models: it is run once). Per-model loaders must give the same images in the same order (the same
    unshuffled dataset and batch size, each with its model's preprocessing); they are prepared here and read in
    lockstep, so every batch compares the models on the same images. With an `accelerator` (a training loop's),
    the loaders are ones it has prepared already."""
    import torch.nn.functional as F

    from .losses import HeadReader

    names = names or [type(model).__name__ for model in models]
    per_model, distinct = _loaders_per_model(loader, len(models))
    which = [next(i for i, each in enumerate(distinct) if each is mine) for mine in per_model]
    accelerator, prepared = _prepared(accelerator, distinct)  # prepared alike, so the shards hold the same images
    models = [model.to(accelerator.device).eval() for model in models]
    readers = [HeadReader(model, features=False) for model in models]
    totals, count = torch.zeros(len(models), dtype=torch.float64), 0
    nonfinite = torch.zeros(len(models), dtype=torch.long)  # images whose features hold NaN or inf, per model
    with torch.no_grad():  # not inference_mode, as transformers' Trainer: see `score_models`
        for batches in zip(*prepared, strict=True):  # equal lengths and padding: gather_for_metrics drops it once
            pixels = [batches[i]["pixel_values"].to(accelerator.device) for i in which]
            with accelerator.autocast():
                features = [
                    _forward(read, model, mine).features.float()
                    for read, model, mine in zip(readers, models, pixels, strict=True)
                ]
            for name, feature in zip(names, features, strict=True):
                if feature.shape != features[0].shape:
                    raise RetrofitError(
                        f"'{name}' gives {feature.shape[-1]} features and '{names[0]}' {features[0].shape[-1]}, so "
                        "they cannot be compared; evaluate a merged model against its own source"
                    )
            similarity = torch.stack([F.cosine_similarity(f, features[0], dim=-1) for f in features], dim=1)
            broken = torch.stack([~torch.isfinite(f).all(dim=-1) for f in features], dim=1)
            similarity, broken = accelerator.gather_for_metrics((similarity, broken))
            totals += similarity.double().sum(dim=0).cpu()
            nonfinite += broken.sum(dim=0).cpu()
            count += len(similarity)
    return [
        {"similarity": float(total) / max(1, count), "num_examples": count, "nonfinite": int(bad)}
        for total, bad in zip(totals, nonfinite, strict=True)
    ]


def score_models(
    models: list,
    loader,
    *,
    k: int,
    maps: list | None = None,
    accelerator=None,
    labels_from=None,
    predictions: bool = False,
) -> list[dict]:
    """top-1, top-k, mean loss and image count of each model over one dataloader, gathered over the processes of an
    `accelerate launch`: the one accuracy loop of retrofit (evaluate, sweep, the training loop, recipes, benchmarks).
    An image whose logits are not all finite (NaN weights, an overflow) counts as wrong at top-1 and top-k, and is
    counted in ``nonfinite``; the loss is then None (not a number, and not valid JSON as NaN).
    `maps[i]` maps model i's label ids to the loader's (None: the same). `labels_from`: a model whose top-1 is the
    label (agreement with a teacher, for data without labels). `predictions`: also each model's top-1 per image, in
    the loader's order (``predictions``). With an `accelerator` (a training loop's), `loader` is one it has prepared
    already; without one, it is prepared here."""
    from .data import TransformedDataset, check_labels
    from .loading import in_model_dtype

    data = getattr(loader, "dataset", None)
    num_labels = getattr(getattr(models[0], "config", None), "num_labels", None) if models else None
    if isinstance(data, TransformedDataset) and data.has_labels and num_labels:
        check_labels(data.dataset, num_labels, label_map=data.label_map)  # one line, not an IndexError mid-run
    accelerator, (loader,) = _prepared(accelerator, [loader])
    maps = maps or [None] * len(models)
    if labels_from is not None:
        labels_from = labels_from.to(accelerator.device).eval()
    models = [model.to(accelerator.device).eval() for model in models]
    stats = [
        {"top1": load_metric("accuracy"), "topk": load_metric("top_k_accuracy"), "loss": 0.0, "count": 0}
        | {"nonfinite": 0}
        | ({"predictions": []} if predictions else {})
        for _ in models
    ]
    # no_grad, not inference_mode (as transformers' Trainer evaluates): a tensor a model caches in its first call
    # would be an inference tensor, which no later training in the process can use (BEiT's relative position index,
    # cached process-wide by window size: evaluate, then finetune, failed with "Inference tensors cannot be saved")
    with torch.no_grad():
        for batch in loader:
            check_interrupted()  # a stop signal that came inside a library's __del__ (or that it swallowed)
            labels = batch.get("labels")
            if labels_from is not None:
                with accelerator.autocast():
                    pixels = in_model_dtype(batch["pixel_values"].to(accelerator.device), labels_from)
                    labels = labels_from(pixel_values=pixels).logits.argmax(-1)
            for model, pred_map, stat in zip(models, maps, stats, strict=True):
                _score_batch(model, pred_map, batch["pixel_values"], labels, k, accelerator, stat)
    return [
        {
            "top1": stat["top1"].compute()["accuracy"],
            f"top{k}": stat["topk"].compute(k=k)["top_k_accuracy"],
            "loss": stat["loss"] / max(1, stat["count"]) if not stat["nonfinite"] else None,
            "num_examples": stat["count"],
            "nonfinite": stat["nonfinite"],
        }
        | ({"predictions": stat["predictions"]} if predictions else {})
        for stat in stats
    ]


def accuracy(model, loader) -> float:
    """Top-1 accuracy of `model` on a dataloader of labelled images (`score_models`)."""
    return score_models([model], loader, k=1)[0]["top1"]


def _prepared(accelerator, loaders: list) -> tuple:
    """(accelerator, loaders) ready for scoring: a given accelerator's loaders are prepared by it already; without
    one, a new one prepares them."""
    if accelerator is not None:
        return accelerator, loaders
    # fresh: a --mixed-precision bf16 run earlier in this process (a notebook's finetune, a sweep's) left Accelerate's
    # process-wide precision at bf16, and the same models scored after it gave other numbers (or an fp16 one failed)
    accelerator = _accelerator(fresh=True)
    return accelerator, [accelerator.prepare(loader) for loader in loaders]


def _forward(call: Callable, model, pixels: torch.Tensor):
    """`call(model, pixels)`, the pixels in the model's dtype (`loading.in_model_dtype`); a model that refuses the
    images (a size other than its ``image_size``) is one line."""
    from .loading import in_model_dtype

    try:
        return call(model, in_model_dtype(pixels, model))
    except ValueError as exc:
        if "size" not in str(exc):
            raise
        reason = brief(exc).rstrip(".")
        raise RetrofitError(
            f"{type(model).__name__} cannot take the images its image processor gives ({reason}); make the "
            "processor's size (or crop_size) match the model's image_size"
        ) from exc


def _score_batch(model, pred_map, pixels, labels, k, accelerator, stats) -> None:
    """Forward one batch; gather ranked predictions (reference ids), labels and per-image losses; add to metrics."""
    with accelerator.autocast():
        logits = _forward(lambda model, pixels: model(pixel_values=pixels), model, pixels.to(accelerator.device))
    logits = logits.logits.float()
    labels = labels.to(logits.device)
    if pred_map is not None:
        to_ref = torch.tensor(pred_map, device=logits.device)
        to_model = torch.empty_like(to_ref)
        to_model[to_ref] = torch.arange(len(pred_map), device=logits.device)
        losses = torch.nn.functional.cross_entropy(logits, to_model[labels], reduction="none")
        ranked = to_ref[logits.topk(k, dim=-1).indices]
    else:
        losses = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
        ranked = logits.topk(k, dim=-1).indices
    ranked = ranked.masked_fill(~torch.isfinite(logits).all(dim=-1, keepdim=True), -1)  # no class: wrong, not a guess
    ranked, labels, losses = accelerator.gather_for_metrics((ranked, labels, losses))
    stats["top1"].add_batch(predictions=ranked[:, 0].tolist(), references=labels.tolist())
    stats["topk"].add_batch(predictions=ranked.tolist(), references=labels.tolist())
    stats["loss"] += float(losses.double().sum())
    stats["count"] += len(labels)
    stats["nonfinite"] += int((ranked[:, 0] < 0).sum())
    if "predictions" in stats:
        stats["predictions"].extend(ranked[:, 0].tolist())


def images_chosen(choose: dict, count: int) -> dict:
    """What a report records of the images it was measured on, from `load_split`'s `limit` and `sample_seed`
    (`retrofit.settings.chosen_images`) and the number scored: ``images`` is ``first`` (the split's first `count`),
    ``sample`` (a shuffled sample, drawn with ``sample_seed``) or ``all`` (no limit, or one the split is smaller
    than); with ``holdout``, of the images ``--holdout`` held out of training."""
    limit, seed, holdout = choose.get("limit"), choose.get("sample_seed"), choose.get("holdout")
    kind = "all" if limit is None or count < limit else "first" if seed is None else "sample"
    chosen = {"images": kind, "sample_seed": seed if kind == "sample" else None}
    return chosen | ({"holdout": holdout} if holdout else {})


def images_text(report: dict) -> str:
    """The images a report's numbers are on, in words: "the first 1000 images", "a shuffled sample of 1000 images,
    seed 0", "all 10000 images"; "1000 images" for a report written before retrofit recorded which; each "held out of
    training (--holdout 0.1)" where they were."""
    count, kind = report["num_examples"], report.get("images")
    if kind == "first":
        text = f"the first {count} images"
    elif kind == "sample":
        text = f"a shuffled sample of {count} images, seed {report.get('sample_seed')}"
    else:
        text = f"all {count} images" if kind == "all" else f"{count} images"
    holdout = report.get("holdout")
    return text if not holdout else f"{text} held out of training (--holdout {holdout:g})"


def first_images_text(limit: int | None, count: int) -> str:
    """`images_text` for a training run's evaluation split, which is its first ``--eval-limit`` images (or all)."""
    return images_text({"num_examples": count, **images_chosen({"limit": limit}, count)})


def markdown_table(report: dict) -> str:
    """Models side by side: top-1, top-k, loss, GFLOPs and the change against the first model (backbones: feature
    similarity to the first model and GFLOPs; zero-shot: top-1, top-k, agreement with the first model, GFLOPs and the
    change of top-1)."""
    if report.get("metric") == "zero-shot":
        k, first = report["top_k"], report["models"][0]
        lines = [
            f"| model | zero-shot top-1 | top-{k} | agreement with `{first['model']}` | GFLOPs | Δ top-1 vs first |",
            "|---|---|---|---|---|---|",
        ]
        for row in report["models"]:
            delta = 100 * (row["top1"] - first["top1"])
            lines.append(
                f"| `{row['model']}` | {100 * row['top1']:.2f} % | {100 * row[f'top{k}']:.2f} % | "
                f"{100 * row['agreement']:.2f} % | {row['gflops']:.3g} | {delta:+.2f} pt |"
            )
        return "\n".join(lines + nonfinite_notes(report["models"]))
    if report.get("metric") == "similarity":
        lines = [
            f"| model | feature similarity to `{report['models'][0]['model']}` | GFLOPs |",
            "|---|---|---|",
        ]
        for row in report["models"]:
            lines.append(f"| `{row['model']}` | {number(row['similarity'], '.4f')} | {row['gflops']:.3g} |")
        return "\n".join(lines + nonfinite_notes(report["models"]))
    k = report["top_k"]
    lines = [
        f"| model | top-1 | top-{k} | loss | GFLOPs | Δ top-1 vs first |",
        "|---|---|---|---|---|---|",
    ]
    first = report["models"][0]["top1"]
    for row in report["models"]:
        delta = 100 * (row["top1"] - first)
        lines.append(
            f"| `{row['model']}` | {100 * row['top1']:.2f} % | {100 * row[f'top{k}']:.2f} % | "
            f"{number(row['loss'], '.4f')} | {row['gflops']:.3g} | {delta:+.2f} pt |"
        )
    untrained = [
        f"⚠ `{row['model']}`'s classifier was never trained (its card says so: `convert` gave it a new one), so its "
        "scores are chance, not the model's; train it with `retrofit finetune` (--loss ce --num-labels N)"
        for row in report["models"]
        if row.get("untrained_classifier")
    ]
    return "\n".join(lines + nonfinite_notes(report["models"]) + (["", *untrained] if untrained else []))


def number(value: float | None, spec: str) -> str:
    """A table cell: `value` formatted, or NaN where it could not be computed (None)."""
    return "NaN" if value is None else format(value, spec)


def nonfinite_notes(rows: list[dict], name: Callable[[dict], str] = lambda row: f"`{row['model']}`") -> list[str]:
    """Lines under a table for each row whose model gave non-finite outputs (``nonfinite`` images): the numbers of
    such a model are not its accuracy, and say so."""
    notes = [
        f"⚠ {name(row)} gives non-finite outputs (NaN or inf) on {row['nonfinite']} of {row['num_examples']} images: "
        "they count as wrong and its loss or similarity is not a number; check its weights for NaN (or its dtype)."
        for row in rows
        if row.get("nonfinite")
    ]
    return ["", *notes] if notes else []


@releases_write_locks
def run_evaluate(args: EvaluateArgs, *, log: Callable[[str], None] = log_to_stderr) -> dict:
    """`retrofit evaluate`: evaluate, print the table on stdout (main process; the rest goes to `log`), write --json
    and --card."""
    from accelerate import PartialState

    from .atomic import check_file_output, write_report

    if args.card:
        from .card import check_card_target

        check_card_target(args.card, args.models)
        # held until the command ends: an upload of the export, or another --card run, would otherwise take a
        # README of one evaluation beside the results file of another
        hold_write_lock(args.card, "--card")
    if args.json is not None:
        check_file_output(args.json, "--json", args.overwrite, inputs=[*args.models, args.data])
    report = evaluate_models(
        args.models,
        data=args.data,
        data_revision=args.data_revision,
        split=args.split,
        limit=args.limit,
        sample=args.sample,
        holdout=args.holdout,
        batch_size=args.batch_size,
        top_k=args.top_k,
        image_column=args.image_column,
        label_column=args.label_column,
        trust_remote_code=args.trust_remote_code,
        zero_shot=args.zero_shot,
        prompt_template=args.prompt_template,
        log=log,
    )
    if PartialState().is_main_process:
        classes = f", {len(report['prompts'])} prompts like {report['prompts'][0]!r}" if args.zero_shot else ""
        # what the table is on heads it (a table redirected to a file says so itself)
        heading = f"{args.data} / {report['split']}: {images_text(report)}{classes}"  # the split read (`split_read`)
        print(f"{heading}\n\n{report['table']}", flush=True)
        if args.json is not None:
            write_report(args.json, report, args.overwrite, kind="evaluate")
            log(f"wrote {args.json}")
        if args.card:
            from .card import update_card

            update_card(args.card, evaluation=report)
            log(f"updated {args.card}/README.md")
    return report
