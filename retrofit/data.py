"""Data: load an image-classification split (Fashion-MNIST from Debian's files, a local image folder, or a Hub
dataset) and turn it into batches of ``{"pixel_values", "labels"}`` with the checkpoint's own preprocessing.

Every failure (unknown dataset, missing column, unreadable image, empty split, batch larger than the data) is a
one-line `RetrofitError`.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import hashlib
import math
import os
import re
import shutil
import tempfile
import unicodedata
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .errors import RetrofitError, brief, check_at_least_one, shown
from .naflex import patches_to_images
from .provenance import CACHE_DIR, environment_folder
from .reads import COMMAND_READS, command_memo

FASHION_MNIST = "fashion-mnist"
FASHION_MNIST_DIR = environment_folder("RETROFIT_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
_FMNIST_FILES = {"train": "train", "test": "t10k"}
_SPLIT_ALIASES = {"validation": "test", "valid": "test", "val": "test", "eval": "test"}
# The Hub dataset of the same IDX files (the same images, in the same order), which model cards name for fashion-mnist.
FASHION_MNIST_HUB = "zalando-datasets/fashion_mnist"


# ----------------------------------------------------------------------------------------------------------------
# Loading splits
# ----------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def datasets_progress_bars(shown: bool) -> Iterator[None]:
    """datasets' own progress bars ("Generating train split", "Map") hidden in the block unless `shown`; as they were
    after it (shown: left as they are, so the CLI's switch-off holds)."""
    if shown:
        yield
        return
    from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_disabled = are_progress_bars_disabled()
    disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            enable_progress_bars()


def _read_idx(path: Path, offset: int) -> np.ndarray:
    try:
        with gzip.open(path) as handle:
            raw = handle.read()
    except FileNotFoundError:
        raise RetrofitError(
            f"Fashion-MNIST file '{path}' is missing; install it with `sudo apt-get install dataset-fashion-mnist` "
            "(or `make data`)"
        ) from None
    except (OSError, EOFError) as exc:
        raise RetrofitError(
            f"Fashion-MNIST file '{path}' is unreadable ({exc}); reinstall dataset-fashion-mnist"
        ) from None
    return np.frombuffer(raw, dtype=np.uint8, offset=offset)


def _fashion_mnist(split: str, limit: int | None):
    """Fashion-MNIST as a `datasets.Dataset` (Image + ClassLabel), built from the IDX files and cached on disk."""
    from datasets import ClassLabel, Dataset, Features, Image, load_from_disk

    split = fashion_mnist_split(split)
    if split not in _FMNIST_FILES:
        raise RetrofitError(f"fashion-mnist has no split '{split}'; use train or test (validation = test)")
    prefix = FASHION_MNIST_DIR / _FMNIST_FILES[split]
    images_path, labels_path = Path(f"{prefix}-images-idx3-ubyte.gz"), Path(f"{prefix}-labels-idx1-ubyte.gz")
    stamp = hashlib.sha1(
        f"{images_path.stat().st_mtime if images_path.exists() else 0}:{limit is None}".encode()
    ).hexdigest()[:8]
    cached = CACHE_DIR / "datasets" / f"fashion-mnist-{split}-{stamp}"
    if limit is None and cached.is_dir():
        try:
            return load_from_disk(str(cached))
        except Exception:  # a damaged cache is rebuilt below
            shutil.rmtree(cached, ignore_errors=True)
    images = _read_idx(images_path, 16).reshape(-1, 28, 28)
    labels = _read_idx(labels_path, 8).astype(np.int64)
    if len(images) != len(labels):
        raise RetrofitError(f"Fashion-MNIST '{split}' files disagree ({len(images)} images, {len(labels)} labels)")
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    features = Features({"image": Image(), "label": ClassLabel(names=FASHION_MNIST_CLASSES)})
    dataset = Dataset.from_dict({"image": list(images), "label": labels.tolist()}, features=features)
    if limit is None:
        tmp = None
        try:  # cache the encoded split (atomically: temp folder + rename); a failure only costs time next run
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp = tempfile.mkdtemp(prefix=f".{cached.name}.tmp-", dir=cached.parent)
            with datasets_progress_bars(False):
                dataset.save_to_disk(tmp)
            os.replace(tmp, cached)
            dataset = load_from_disk(str(cached))
        except OSError:  # another process cached it first (the other ranks of `accelerate launch`), or the disk is
            if tmp is not None:  # full: the split is used from memory, and its half-written copy is not left behind
                shutil.rmtree(tmp, ignore_errors=True)
    return dataset


def _check_local_images(dataset, image_column: str, source: str) -> bool:
    """Fail early, naming the file, if a local image cannot be opened (header check only: cheap). True where every
    image is stored in the dataset itself (bytes), none as a path to a file that may change apart from it."""
    from datasets import Image
    from PIL import Image as PILImage

    raw = dataset.cast_column(image_column, Image(decode=False))
    inside = True
    for index, item in enumerate(raw[image_column]):
        if item is None or (item.get("bytes") is None and not item.get("path")):
            raise RetrofitError(
                f"image {index} in '{source}' is missing (the example has no image); remove the example or give it "
                "an image"
            )
        path = item.get("path")
        inside = inside and item.get("bytes") is not None
        try:
            if item.get("bytes") is not None:
                import io

                PILImage.open(io.BytesIO(item["bytes"])).verify()
            else:
                with PILImage.open(path) as image:
                    image.verify()
        except Exception as exc:  # PIL raises many types for bad files
            where = f" ('{path}')" if path else " (stored as bytes)"
            why = f"{type(exc).__name__}: {brief(exc)}" if str(exc).strip() else type(exc).__name__
            raise RetrofitError(
                f"image {index}{where} in '{source}' is unreadable ({why}); remove or replace it"
            ) from None
    return inside


def is_fashion_mnist(data: str) -> bool:
    """True where `data` names Fashion-MNIST, which `load_split` reads from Debian's files (any of its spellings)."""
    return data.lower() in (FASHION_MNIST, "fashion_mnist", "fashionmnist")


def fashion_mnist_split(split: str) -> str:
    """The Fashion-MNIST split a split name reads (it has train and test; validation, val, ... are its test split)."""
    return _SPLIT_ALIASES.get(split, split)


def _chosen_split(split: str, available: list[str]) -> str | None:
    """The split of `available` that `split` reads: itself, or for validation or test, the evaluation split the data
    has instead (validation, test, valid or val); None where there is none."""
    if split in available:
        return split
    if split in ("validation", "test"):
        return next((name for name in ("validation", "test", "valid", "val") if name in available), None)
    return None


def split_read(data: str | os.PathLike, split: str, *, revision: str | None = None) -> str:
    """The name of the split `load_split(data, split)` reads, for what a report or card says was scored: `split`, or
    the evaluation split the data has in place of a validation or test it lacks (a folder of train/ and validation/
    read for finetune's default --eval-split test had its card say test). `split` where the data cannot be read
    here: `load_split` then says why."""
    data = str(data)
    if is_fashion_mnist(data):
        return fashion_mnist_split(split)
    if split not in ("validation", "test"):  # read as named, or refused (no Hub call, no folder read, here)
        return split
    try:
        if is_local_data(data):
            available = list(_local_splits(Path(data).expanduser(), data))
        else:
            available = _hub_split_names(data, _hub_revision(data, revision))
    except Exception:  # noqa: BLE001 - any failure to read is load_split's to report, in its words
        return split
    return _chosen_split(split, available) or split


def _hub_split_names(data: str, revision: str | None) -> list[str]:
    """The split names of Hub dataset `data` at `revision` (None: its main branch), asked once per command."""
    import datasets

    at = {"revision": revision} if revision else {}
    return command_memo(("hub splits", data, revision), lambda: list(datasets.get_dataset_split_names(data, **at)))


def _hub_revision(data: str, revision: str | None) -> str | None:
    """Within a command, the commit Hub dataset `data`'s `revision` is at (`provenance.dataset_commit`: asked once),
    so that each of its loads reads the files its card records, even if the dataset is pushed to meanwhile; outside
    one (or offline), `revision` as given."""
    if COMMAND_READS.get() is None:
        return revision
    from .provenance import dataset_commit

    return dataset_commit(data, revision)


def read_splits(run):
    """`run` (`DataSettings`) naming the splits its loads read (`split_read`): its training split, and its evaluation
    split where it scores one (not the held-out images of ``--holdout``), so that the card names them."""
    from dataclasses import replace

    named = {"split": split_read(run.data, run.split, revision=run.data_revision)}
    if run.holdout is None and run.eval_split:
        named["eval_split"] = split_read(run.data, run.eval_split, revision=run.data_revision)
    return run if all(getattr(run, key) == value for key, value in named.items()) else replace(run, **named)


def is_local_data(data: str) -> bool:
    """True where `load_split` reads `data` from a local folder: it exists here, or is written as a path."""
    return Path(data).expanduser().exists() or data.startswith((".", "/", "~"))


def local_format(data: str) -> str:
    """How a model-index names the format of local data `load_split` reads: ``arrow`` for a ``save_to_disk`` folder
    (Arrow files), ``imagefolder`` for an image folder (datasets' builders of those names)."""
    return "arrow" if _saved(Path(data).expanduser()) else "imagefolder"


def hub_dataset_id(data: str | os.PathLike | None) -> str | None:
    """The Hub dataset id `load_split` reads `data` from; None for fashion-mnist (Debian's files) and local folders,
    whose paths no model card may name."""
    if data is None or not str(data).strip():
        return None
    data = str(data)
    return None if is_fashion_mnist(data) or is_local_data(data) else data


def _cache_files_elsewhere(function: Callable) -> Callable:
    """`function` with datasets' caching of transforms off while it runs: a dataset loaded from files (a save_to_disk
    folder) otherwise gets the cache files of its shuffle, select and cast written next to those files, into the
    user's data; with caching off they go to a temporary folder (removed at exit). Loading itself is unaffected."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        from datasets import disable_caching, enable_caching, is_caching_enabled

        was_enabled = is_caching_enabled()
        disable_caching()
        try:
            return function(*args, **kwargs)
        finally:
            if was_enabled:
                enable_caching()

    return wrapper


@_cache_files_elsewhere
def sample_of(dataset, size: int, seed: int | None):
    """`size` examples of `dataset` (all of them where it holds no more): a shuffled sample drawn with `seed`, or
    without one its first `size` (of a dataset already shuffled, such as ``--sample``'s, a shuffled sample too). No
    cache file is written next to a save_to_disk folder's own."""
    if len(dataset) <= size:
        return dataset
    return dataset.select(range(size)) if seed is None else dataset.shuffle(seed=seed).select(range(size))


# The held-out images (``--holdout``) depend on the split and the fraction alone, not on a run's --seed: runs that
# compare seeds, and `evaluate --holdout` afterwards, score the same images.
HOLDOUT_SEED = 0


def _classes_to_stratify(dataset) -> list[int] | None:
    """Each image's class as a number, in the order of the classes' values (a ClassLabel's ids, text or integer labels;
    a missing label is a class of its own), for `_held_out` to stratify by; None where the split has no such labels."""
    from datasets import ClassLabel, Value

    feature = dataset.features.get("label")
    text = isinstance(feature, Value) and feature.dtype in ("string", "large_string")
    integer = isinstance(feature, Value) and feature.dtype.startswith(("int", "uint"))
    if not (isinstance(feature, ClassLabel) or text or integer):
        return None
    labels = column_values(dataset)
    order = sorted(set(labels), key=lambda label: (label is None, label if label is not None else 0))
    number = {label: index for index, label in enumerate(order)}
    return [number[label] for label in labels]


def _held_out_positions(classes: list[int] | None, count: int, fraction: float) -> tuple[list[int], list[int]]:
    """(the rest, the held out): the positions datasets' ``train_test_split(test_size=fraction, seed=HOLDOUT_SEED,
    stratify_by_column=...)`` splits `count` images into, stratified by `classes` where given. Its own generator and
    stratified draw, fed the classes directly: `train_test_split` reads a column row by row (16 s for Fashion-MNIST's
    60,000 labels in datasets 5). A ValueError where a side would be empty or lack a class."""
    import numpy as np

    held = math.ceil(fraction * count)  # as train_test_split counts them
    if not 0 < held < count:
        raise ValueError("a side would be empty")
    rng = np.random.default_rng(HOLDOUT_SEED)
    if classes is None:
        order = rng.permutation(count)
        return order[held:].tolist(), order[:held].tolist()
    try:
        from datasets.utils.stratify import stratified_shuffle_split_generate_indices
    except ImportError:  # a later datasets moved it: its public split, slowly
        from datasets import ClassLabel, Dataset, Features, Value

        features = Features({"position": Value("int64"), "class": ClassLabel(num_classes=max(classes) + 1)})
        positions = Dataset.from_dict({"position": list(range(count)), "class": classes}, features=features)
        parts = positions.train_test_split(test_size=fraction, seed=HOLDOUT_SEED, stratify_by_column="class")
        return parts["train"]["position"], parts["test"]["position"]
    rest, held_out = next(stratified_shuffle_split_generate_indices(np.asarray(classes), count - held, held, rng=rng))
    return rest.tolist(), held_out.tolist()


def _held_out(dataset, fraction: float, held: bool, data: str, split: str):
    """The images `--holdout fraction` holds out of `dataset` (`held`) or the rest: datasets' seeded split
    (`_held_out_positions`), stratified by class where the split has labels (`_classes_to_stratify`), so each class
    keeps its share; the labels need not be a ClassLabel, and no image is read. A ClassLabel split holds out the same
    images as ``dataset.train_test_split`` would."""
    classes = _classes_to_stratify(dataset)
    try:
        rest, held_out = _held_out_positions(classes, len(dataset), fraction)
    except ValueError:  # too few images for the fraction, or for one of each class on both sides
        count = math.ceil(fraction * len(dataset))
        each = "one image" if classes is None else f"one image of each of the {len(set(classes))} classes"
        raise RetrofitError(
            f"--holdout {fraction:g} of split '{split}' of '{data}' ({len(dataset)} images) would hold out {count} "
            f"and train on {len(dataset) - count}, and each side needs at least {each}; choose another --holdout, "
            "or data with an evaluation split of its own"
        ) from None
    return dataset.select(held_out if held else rest)


@_cache_files_elsewhere
def load_split(
    data: str,
    split: str,
    *,
    image_column: str = "image",
    label_column: str | None = "label",
    limit: int | None = None,
    sample_seed: int | None = None,
    split_classes: bool = False,
    log: Callable[[str], None] | None = None,
    instead: str = "use --sample N for a shuffled sample of the split",
    choose: str | None = None,
    holdout: float | None = None,
    held: bool = False,
    holdout_by: str | None = None,
    revision: str | None = None,
):
    """One split of an image-classification dataset as a `datasets.Dataset` with columns ``image`` (and ``label``).

    `data` is ``fashion-mnist`` (Debian's files, split ``train``/``test``; ``validation`` means ``test``), a local
    folder in the `datasets` imagefolder layout, or a Hub dataset id. `limit` keeps the first `limit` examples, or,
    with `sample_seed`, a shuffled sample of `limit` examples. From the Hub, a limited split is streamed: only the
    examples kept are downloaded, not the whole split.

    Where the first `limit` examples hold fewer classes than the split (an image folder lists its classes one after
    another), `log` gets one line saying so, ending in `instead`. `split_classes` (zero-shot, whose prompts are the
    classes): a column of text labels names the classes of the whole split, not only those of the examples kept (a
    ClassLabel of their sorted names); from a streamed Hub split only the examples read are known, and `log` says so.
    `choose` ends the line refusing a split a local or Hub dataset lacks (how to name another: the caller's option).

    `holdout` (``--holdout``, a fraction): the split without the images held out of it for evaluation, or with
    `held` those images alone (`_held_out`); `limit` and `sample_seed` then choose among them. `holdout_by`: the
    label column they are stratified by (the user's ``--label-column``; default: `label_column`, else ``label``),
    read or not by this call, so that the loads of every command hold out the same images. `revision`
    (``--data-revision``): the commit, branch or tag of a Hub dataset to read.
    """
    import datasets

    check_at_least_one("--limit", limit)
    if revision is not None and (is_fashion_mnist(str(data)) or is_local_data(str(data))):
        what = "Debian's Fashion-MNIST files" if is_fashion_mnist(str(data)) else "a local folder"
        raise RetrofitError(
            f"--data-revision names a commit, branch or tag of a Hub dataset, and '{data}' is {what}; leave it out"
        )
    if holdout is not None:  # held out of the whole split, whatever is read of it afterwards
        by = holdout_by or label_column or "label"
        if label_column not in (None, by):
            raise ValueError(f"load_split reads labels from '{label_column}' and stratifies --holdout by '{by}'")
        whole = dict(data=data, split=split, image_column=image_column, split_classes=split_classes, choose=choose,
                     revision=revision, log=log)  # fmt: skip
        try:  # stratified by class even where the caller reads no labels (kd, calibration)
            dataset = load_split(**whole, label_column=by)
        except RetrofitError:  # data without labels (kd, calibration) is held out of unstratified
            if label_column is not None or by != "label":  # a column the user named (--label-column) must be there
                raise
            dataset = load_split(**whole, label_column=None)
        dataset = _held_out(dataset, holdout, held, str(data), split)
        if label_column is None and "label" in dataset.column_names:
            dataset = dataset.remove_columns("label")
        return dataset if limit is None else sample_of(dataset, limit, sample_seed)
    if label_column is not None and label_column == image_column:
        raise RetrofitError(
            f"--label-column and --image-column are both '{label_column}'; the labels need a column of their own: "
            "choose it with --label-column"
        )
    data = str(data)
    sample = limit is not None and sample_seed is not None
    # the classes of the whole split and of its first `limit` examples, counted even where the labels are not read
    # (kd, backbones): the first N of an image folder may be of one class
    whole: list | None = None
    kept: list | None = None
    counted = label_column or "label"
    if is_fashion_mnist(data):
        for column, option, its in (
            (image_column, "--image-column", "image"),
            (label_column, "--label-column", "label"),
        ):
            if column not in (None, its):  # the files are read as these two columns: another name was not honoured
                raise RetrofitError(
                    f"fashion-mnist's {its}s are its column '{its}', not '{column}'; leave out {option}"
                )
        dataset = _fashion_mnist(split, None if sample else limit)
        if limit is not None:
            whole, kept = FASHION_MNIST_CLASSES, _distinct_labels(dataset, "label")
    else:
        local = Path(data).expanduser()
        is_local = is_local_data(data)
        try:
            if is_local:
                if not local.is_dir():
                    what = "is a file, not a folder" if local.is_file() else "does not exist or is not a folder"
                    raise RetrofitError(
                        f"dataset '{data}' {what}; pass fashion-mnist, an image folder (class sub-folders, optionally "
                        "under train/ and test/), a folder written by `datasets`' save_to_disk or a Hub dataset id"
                    )
                splits = _local_splits(local, data)
                available = list(splits.keys())
            else:  # a Hub dataset: download only the split that is needed, at the command's commit
                revision = _hub_revision(data, revision)
                available = _hub_split_names(data, revision)
            chosen = _chosen_split(split, available)
            if chosen is None:
                how = f"; {choose}" if choose else ""
                if is_local and available == ["train"] and not _saved(local) and not (local / "train").is_dir():
                    how = " (an image folder without split folders is one split, which datasets calls train)" + how
                raise RetrofitError(f"dataset '{data}' has no split '{split}'; available: {', '.join(available)}{how}")
            dataset = splits[chosen] if is_local else _hub_split(data, chosen, limit, sample_seed, revision)
            if is_local and label_column == "label" and dataset.column_names == ["image"] and not _saved(local):
                dataset = _one_class(dataset, local, data)  # an image folder's labels, or why it has none
            if is_local and log is not None and label_column == "label" and not _saved(local):
                shared = _shared_class_folders(dataset, local)
                if shared:
                    name, places = shared
                    log(
                        f"note: datasets takes each image's class from the folder holding it, so the images of "
                        f"{' and '.join(map(repr, places[:2]))}{' ...' if len(places) > 2 else ''} in '{data}' are all "
                        f"one class, {name!r}; if the class is the folder above, move each class's images into one "
                        "folder (CLASS/IMAGE)"
                    )
        except RetrofitError:
            raise
        except Exception as exc:
            if is_local and not _saved(local) and not any(_image_files(local)):
                raise RetrofitError(
                    f"dataset '{data}' holds no image files; pass an image folder (class sub-folders, optionally "
                    "under train/ and test/) or a folder written by `datasets`' save_to_disk"
                ) from None
            text = brief(exc)
            local_too = "" if is_local else f", and there is no local folder '{data}' either"
            login = "" if is_local else " (log in with `hf auth login` for a gated or private one)"
            raise RetrofitError(
                f"cannot load dataset '{data}' ({type(exc).__name__}: {text}){local_too}; pass fashion-mnist, an "
                f"image folder or a reachable Hub dataset id{login}"
            ) from None
        if limit is not None:  # a local split is whole here; a streamed Hub split has only its features' names
            whole = _distinct_labels(dataset, counted) if is_local else _declared_classes(dataset, counted)
        if limit is not None and not sample:
            dataset = dataset.select(range(min(limit, len(dataset))))
            kept = _distinct_labels(dataset, counted)
        for column in (image_column, label_column):
            if column is not None and column not in dataset.column_names:
                raise RetrofitError(
                    f"dataset '{data}' has no column '{column}'; available: {', '.join(dataset.column_names)} "
                    f"(choose with --image-column / --label-column)"
                )
        if is_local and _stored_as(dataset.features[image_column]) in ("paths", "bytes"):
            dataset = _as_images(dataset, image_column, data)
        if not isinstance(dataset.features[image_column], datasets.Image):
            raise RetrofitError(
                f"column '{image_column}' of '{data}' does not hold images ({dataset.features[image_column]}); "
                "choose another with --image-column"
            )
        if not dataset.features[image_column].decode:  # saved with Image(decode=False): its images as dicts of bytes
            dataset = dataset.cast_column(image_column, datasets.Image())
        keep = [image_column] + ([label_column] if label_column else [])
        dataset = dataset.remove_columns([c for c in dataset.column_names if c not in keep])
        # at once: one renamed after the other, --image-column img --label-column image collided (a traceback)
        names = {image_column: "image"} | ({label_column: "label"} if label_column else {})
        names = {old: new for old, new in names.items() if old != new}
        if names:
            dataset = dataset.rename_columns(names)
        checked = _READ_FOLDERS.get(os.path.realpath(local), (None, None, set()))[2] if is_local else set()
        if is_local and len(dataset) and chosen not in checked:  # once while the folder stays unchanged
            inside = _check_local_images(dataset, "image", data)
            # the whole split (not its first --limit images), whose images the folder's state covers: an image
            # folder's files, or a saved dataset's images stored in it (not as paths to files elsewhere)
            if (limit is None or sample) and (inside or not _saved(local)):
                checked.add(chosen)
    if sample:
        dataset = sample_of(dataset, limit, sample_seed)
    if label_column is None and "label" in dataset.column_names:
        dataset = dataset.remove_columns("label")
    if len(dataset) == 0:
        raise RetrofitError(f"split '{split}' of dataset '{data}' is empty; choose another split or dataset")
    fewer = whole and kept is not None and len(kept) < min(len(whole), len(dataset))  # N images hold at most N
    if log is not None and limit is not None and not sample and fewer:
        log(
            f"note: the first {len(dataset)} images of '{data}' ({split}) hold {len(kept)} of its {len(whole)} "
            f"classes, so what they measure is for those classes alone; {instead}"
        )
    if split_classes and limit is not None and "label" in dataset.column_names:
        if getattr(dataset.features["label"], "dtype", None) in ("string", "large_string"):
            if whole is None:
                if log is not None:
                    log(
                        f"note: the classes of '{data}' ({split}) are those of the {len(dataset)} images read (a "
                        "streamed Hub split names no classes before it is read)"
                    )
            elif set(whole) != set(_distinct_labels(dataset, "label")):  # classes left out: a ClassLabel names all
                classes = datasets.ClassLabel(names=sorted(whole))
                features = dataset.features.copy()
                features["label"] = classes
                with datasets_progress_bars(False):  # a map, not cast_column: datasets 4.6 cannot cast text to ids
                    dataset = dataset.map(lambda labels: {"label": classes.str2int(labels)}, input_columns="label",
                                          batched=True, features=features)  # fmt: skip
    return dataset


def _declared_classes(dataset, column: str) -> list[str] | None:
    """The class names of `dataset`'s `column` if it is a `ClassLabel` (else None)."""
    from datasets import ClassLabel

    feature = dataset.features.get(column) if column in dataset.column_names else None
    return list(feature.names) if isinstance(feature, ClassLabel) else None


def column_values(dataset, column: str = "label") -> list:
    """The values of `dataset`'s `column` as Python values, read from Arrow at once: iterating ``dataset[column]``
    formats each row on its own (1 s for Fashion-MNIST's 60,000 labels, 20 s for ImageNet's)."""
    return dataset.with_format("arrow")[column].to_pylist()


def _distinct_labels(dataset, column: str | None) -> list | None:
    """The distinct labels of `dataset`'s `column` (missing ones, None or a negative id, left out), read from Arrow;
    None where it holds no labels one by one (no such column, lists)."""
    import pyarrow.compute as pc
    from datasets import ClassLabel, Value

    if column is None or column not in dataset.column_names:
        return None
    if not isinstance(dataset.features[column], ClassLabel | Value):
        return None
    # not `dataset.unique`: on a shuffled sample it writes the sample out first (into a save_to_disk folder's files)
    values = pc.unique(dataset.with_format("arrow")[column]).to_pylist()
    return [value for value in values if value is not None and not (isinstance(value, int | np.integer) and value < 0)]


def _stored_as(feature) -> str | None:
    """How a column without an `Image` feature holds images, as a ``save_to_disk`` folder written from paths or
    files' bytes does: "paths" (text), "bytes" (binary values), else None."""
    dtype = getattr(feature, "dtype", None)
    return {"string": "paths", "large_string": "paths", "binary": "bytes", "large_binary": "bytes"}.get(dtype)


def _as_images(dataset, column: str, data: str):
    """A local split whose `column` holds image files' paths or encoded images' bytes, with that column as images
    (then checked one by one, naming the file, as any local image is); a column of text that names no file is
    refused as not holding images."""
    from datasets import Image

    if _stored_as(dataset.features[column]) == "paths":
        for index, value in enumerate(column_values(dataset, column)):
            if value is None or not Path(value).is_file():
                raise RetrofitError(
                    f"column '{column}' of '{data}' holds text, not images: example {index} is {shown(value)}, no "
                    f"image file here (paths are read from {os.getcwd()}); choose another with --image-column, or "
                    "give every example the path of its image"
                )
    return dataset.cast_column(column, Image())


def _saved(folder: Path) -> bool:
    """Whether `folder` was written by `datasets`' ``save_to_disk`` (a DatasetDict, or one Dataset)."""
    return (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file()


# Local folders read, by path: what they held then (`_folder_state`), their splits, and the splits whose images
# `_check_local_images` opened since. `datasets` finds an image folder's files anew at each `load_dataset`, through
# fsspec (25 s for 20,000 images, most of it stat calls; opening each image adds 2 s; opening those of a save_to_disk
# folder 1.7 s), and a command reads its splits several times (training, evaluation, each setting of a sweep); a
# folder changed since is read and checked again.
_READ_FOLDERS: dict[str, tuple[str, dict, set[str]]] = {}
_READ_FOLDERS_KEPT = 4


def _folder_state(folder: Path) -> str:
    """A digest of every entry under `folder`: its path, size and modification time (a file added, removed, renamed
    or rewritten changes it). Links are not followed, as `_check_split_folders` refuses linked folders."""
    digest = hashlib.sha256()
    for root, folders, files in os.walk(folder):
        folders.sort()
        for name in sorted(files) + folders:
            path = os.path.join(root, name)
            try:
                stat = os.lstat(path)
            except OSError:  # removed while walking: the state is another one anyway
                continue
            digest.update(f"{os.path.relpath(path, folder)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _local_splits(folder: Path, data: str) -> dict:
    """The splits of a local folder by name: a ``save_to_disk`` folder's (one Dataset: the split it was saved as,
    else train), else an image folder's (`datasets`' imagefolder); read once while it stays as it is
    (`_READ_FOLDERS`), and once per command (`reads_each_folder_once`)."""
    key, command_reads = os.path.realpath(folder), COMMAND_READS.get()
    if command_reads is not None and key in command_reads:  # read earlier in this command: the same images
        return dict(command_reads[key])
    state = _folder_state(folder)
    if key in _READ_FOLDERS and _READ_FOLDERS[key][0] == state:
        splits = dict(_READ_FOLDERS[key][1])
    else:
        splits = _saved_splits(folder) if _saved(folder) else _image_folder_splits(folder, data)
        _READ_FOLDERS.pop(key, None)
        while len(_READ_FOLDERS) >= _READ_FOLDERS_KEPT:
            _READ_FOLDERS.pop(next(iter(_READ_FOLDERS)))  # the one read longest ago
        _READ_FOLDERS[key] = (state, dict(splits), set())
    if command_reads is not None:
        command_reads[key] = dict(splits)
    return splits


def _image_folder_splits(folder: Path, data: str) -> dict:
    """An image folder's splits, as `datasets`' imagefolder reads them; a path it would misread is one line."""
    import datasets

    real = os.path.realpath(folder)  # datasets reads the folder's path, links resolved, as a glob pattern
    magic = sorted(set(re.findall(r"[][*?]", real)))
    if magic:
        raise RetrofitError(
            f"image folder '{data}' lies at '{real}', whose {' '.join(magic)} datasets reads as a file pattern "
            "(it then finds no images); rename the folders on that path, or move the images to another folder"
        )
    variable = _variable(real)
    if variable:
        raise RetrofitError(
            f"image folder '{data}' lies at '{real}', whose {variable} datasets replaces with that environment "
            "variable's value (it then reads another folder, or none); rename the folders on that path"
        )
    try:
        splits = dict(datasets.load_dataset("imagefolder", data_dir=str(folder)))
    except Exception:
        _refuse_variables(folder, data)  # a file it could not open: a $NAME in its path?
        raise
    _check_split_folders(folder, splits, data)
    return splits


def _saved_splits(folder: Path) -> dict:
    """A ``save_to_disk`` folder's splits: a DatasetDict's, or one Dataset as the split it was saved as (else train)."""
    import datasets

    saved = datasets.load_from_disk(str(folder))
    if isinstance(saved, datasets.DatasetDict):
        return dict(saved)
    # one Dataset: the split it was loaded as, without a slice (load_dataset(..., split="train[:10%]") names it so)
    return {re.sub(r"\[.*\]$", "", str(saved.split or "")) or "train": saved}


# Photo formats datasets' imagefolder does not read (not in its extensions): a folder of them would lose them quietly
_UNREAD_IMAGES = {".heic", ".heif", ".avif", ".avifs", ".jxl", ".svg", ".dng", ".cr2", ".cr3", ".nef", ".arw", ".orf",
                  ".rw2", ".mpo", ".qoi", ".pfm"}  # fmt: skip


def _check_split_folders(folder: Path, splits: dict, data: str) -> None:
    """Refuse an image folder whose splits `datasets` took from class folders named like a split: it reads a folder
    named train, test, val, ... anywhere as a split, so a class 'train' (CIFAR-100's) puts test/train/ into the train
    split too, and a flat folder with a class 'train' becomes a train split of that class alone, the other classes
    read by no split. An image twice in a split or in two splits, or (without a metadata file, which may leave images
    out on purpose) an image in none or a photo in a format it skips (HEIC, AVIF, raw), and a linked folder (not
    followed), is one line naming it."""
    from datasets import Image
    from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder

    read: dict[str, str] = {}
    for name, split in splits.items():
        for item in column_values(split.cast_column("image", Image(decode=False)), "image"):
            path = os.path.realpath(item["path"])
            if read.get(path) == name:  # a metadata file naming it twice: it counted twice, once per label
                _refuse_variables(folder, data)  # or a $NAME datasets expanded made two paths one
                raise RetrofitError(
                    f"image '{os.path.relpath(path, os.path.realpath(folder))}' of image folder '{data}' is in its "
                    f"{name} split twice (its metadata file names it twice?), so it would count twice; name each "
                    "image once"
                )
            if read.setdefault(path, name) != name:
                raise RetrofitError(
                    f"image '{os.path.relpath(path, os.path.realpath(folder))}' of image folder '{data}' is in both "
                    f"its {read[path]} and {name} splits: datasets takes every folder named like a split (train, "
                    "test, val, ...) for one, class folders too; rename the class folder"
                )
    for path, name in read.items() if len(splits) > 1 else ():  # splits of file names alone (cat/train0.png and
        # cat/test0.png): each image is in one, so nothing else here caught it, and a third of the folder went unread
        parts = Path(os.path.relpath(path, os.path.realpath(folder))).parts
        if not any(map(_is_split_name, parts[:-1])) and _is_split_name(Path(parts[-1]).stem):
            raise RetrofitError(
                f"image '{Path(*parts)}' of image folder '{data}' is read as its {name} split for its file name: "
                "datasets takes every folder or file named like a split (train, test, val, ...) for one; rename the "
                "files named like a split, or put the class folders under train/ (and test/)"
            )
    for split in splits.values():  # SPLIT/IMAGE (a metadata file beside the split folders or none): 'test', 'train'
        taken = _declared_classes(split, "label") or []
        if taken and all(_is_split_name(name) for name in taken):
            raise RetrofitError(
                f"image folder '{data}' gives its images the classes {', '.join(map(repr, taken))}: datasets took its "
                "split folders for class folders; put the class folders in each split folder (SPLIT/CLASS/IMAGE), or "
                "a metadata.csv with a label column in each split folder"
            )
    files = []  # one walk of the folder (which may hold a million images); like datasets, links are not followed
    for parent, folders, names in os.walk(folder):
        for name in folders:
            relative = Path(parent, name).relative_to(folder)
            if os.path.islink(Path(parent, name)) and not _hidden(relative):
                raise RetrofitError(
                    f"'{relative}' of image folder '{data}' is a link to a folder, which datasets' imagefolder does "
                    "not follow (its images would be left out without a word); copy the folder in, or link its "
                    "files one by one"
                )
        files += [Path(parent, name) for name in names]
    metadata = set(getattr(ImageFolder, "METADATA_FILENAMES", None) or ["metadata.csv", "metadata.jsonl"])
    if any(path.name in metadata for path in files):
        return
    files = [path for path in files if not _hidden(path.relative_to(folder))]
    for path in files:
        if path.suffix.lower() in ImageFolder.EXTENSIONS and path.is_file() and os.path.realpath(path) not in read:
            _check_no_variable(path, folder, data)  # read as another file
            taken, split = next(iter(read.items()), ("", ""))
            example = f", e.g. '{os.path.relpath(taken, os.path.realpath(folder))}' as {split}" if taken else ""
            raise RetrofitError(
                f"image '{path.relative_to(folder)}' of image folder '{data}' is in none of its splits "
                f"({', '.join(splits)}): datasets takes every folder or file named like a split (train, test, val, "
                f"...) for one, class folders too, and then reads only those{example}; rename what is named like a "
                "split, or put the class folders under train/ (and test/)"
            )
    for path in files:
        if path.suffix.lower() in ImageFolder.EXTENSIONS and path.is_symlink() and not path.exists():
            raise RetrofitError(
                f"'{path.relative_to(folder)}' of image folder '{data}' is a link to '{os.readlink(path)}', which "
                "does not exist (datasets' imagefolder would leave it out without a word); fix the link or remove it"
            )
        if path.suffix.lower() in _UNREAD_IMAGES:
            raise RetrofitError(
                f"'{path.relative_to(folder)}' of image folder '{data}' is an image in {path.suffix[1:].upper()} "
                "format, which datasets' imagefolder skips without a word; convert it to JPEG or PNG, or move it out "
                "of the folder"
            )


def _metadata_files(folder: Path) -> list[Path]:
    """The metadata files (metadata.csv, metadata.jsonl, ...) that datasets' imagefolder reads under `folder`."""
    from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder

    names = set(getattr(ImageFolder, "METADATA_FILENAMES", None) or ["metadata.csv", "metadata.jsonl"])
    return sorted(path for path in folder.rglob("metadata.*") if path.name in names and path.is_file())


def _variable(path: str) -> str | None:
    """The first ``$NAME`` or ``${NAME}`` in `path` that names an environment variable (datasets expands them in the
    paths of local files, `os.path.expandvars`), else None."""
    for match in re.finditer(r"\$(\w+|\{[^}]*\})", path):
        if os.path.expandvars(match.group()) != match.group():
            return match.group()
    return None


def _refuse_variables(folder: Path, data: str) -> None:
    """Refuse an image folder with an image whose path has a ``$NAME`` datasets expands (`_check_no_variable`)."""
    for path in _image_files(folder):
        _check_no_variable(path, folder, data)


def _check_no_variable(path: Path, folder: Path, data: str) -> None:
    """Refuse an image whose path inside the image folder has a ``$NAME`` datasets expands (`_variable`)."""
    variable = _variable(str(path.relative_to(folder)))
    if variable:
        raise RetrofitError(
            f"image '{path.relative_to(folder)}' of image folder '{data}' has {variable} in its path, which datasets "
            "replaces with that environment variable's value when it opens the image (another file, or none); "
            "rename it"
        )


def _hidden(relative: Path) -> bool:
    """Whether a path inside an image folder is one that datasets' imagefolder passes over (.git, ._x, __MACOSX)."""
    return any(part.startswith((".", "__")) for part in relative.parts)


def _image_files(folder: Path):
    """The files under `folder` that `datasets`' imagefolder reads as images (by extension)."""
    from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder

    return (path for path in folder.rglob("*") if path.suffix.lower() in ImageFolder.EXTENSIONS and path.is_file())


def _is_split_name(name: str) -> bool:
    """Whether `datasets` reads a folder of this name as a split (train, test, val, ...), not a class."""
    from datasets.data_files import SPLIT_KEYWORDS

    words = {word for word in re.split(r"[-._ 0-9]+", name.lower()) if word}
    return any(keyword in words for keywords in SPLIT_KEYWORDS.values() for keyword in keywords)


def _shared_class_folders(dataset, folder: Path) -> tuple[str, list[str]] | None:
    """The first class of an image folder's split whose images lie in several folders (cat/2019 and dog/2019 are
    both class '2019' to datasets), with those folders; None where each class is one folder."""
    from datasets import Image

    names = _declared_classes(dataset, "label")
    if not names:
        return None
    places: dict[int, set[str]] = {}
    items = column_values(dataset.cast_column("image", Image(decode=False)), "image")
    for item, label in zip(items, column_values(dataset), strict=True):
        if label is not None and 0 <= label < len(names):
            places.setdefault(label, set()).add(os.path.relpath(os.path.dirname(item["path"]), folder))
    label = next((label for label, where in sorted(places.items()) if len(where) > 1), None)
    return None if label is None else (names[label], sorted(places[label]))


def _one_class(dataset, folder: Path, data: str):
    """An image folder's split that `datasets` left without labels: it infers classes only from two or more class
    folders holding every image at one depth. Where all the split's images lie in one class folder, that class is its
    label (a one-class folder is a folder of classes too); otherwise one line says why there are none."""
    from datasets import ClassLabel, Image

    root = os.path.abspath(folder)
    places = []
    for item in column_values(dataset.cast_column("image", Image(decode=False)), "image"):
        relative = Path(os.path.relpath(os.path.abspath(item["path"]), root))
        if relative.parts[:1] == ("..",):  # the folder is a link: datasets names its target
            relative = Path(os.path.relpath(os.path.realpath(item["path"]), os.path.realpath(folder)))
        places.append(relative)
    parents = {path.parent for path in places}
    (parent,) = parents if len(parents) == 1 else (None,)
    if parent is not None and parent.parts and not _is_split_name(parent.name):
        return dataset.add_column("label", [0] * len(dataset), feature=ClassLabel(names=[parent.name]))
    metadata = _metadata_files(folder)
    if metadata:  # datasets takes no classes from the folders of images a metadata file names
        raise RetrofitError(
            f"image folder '{data}' gives no class labels: its '{metadata[0].relative_to(folder)}' has no label "
            "column, and datasets' imagefolder takes no classes from folders where a metadata file names the images; "
            "add a label column to it (or name its column with --label-column), or move it out of the folder"
        )
    shallow, deep = min(places, key=lambda p: len(p.parts)), max(places, key=lambda p: len(p.parts))
    backslash = next((path for path in places if "\\" in str(path)), None)
    if backslash is not None:  # (legal in a name here; datasets splits paths at it, as Windows does)
        raise RetrofitError(
            f"image '{backslash}' of image folder '{data}' has a backslash in its name, which datasets reads as a "
            "folder separator (it then finds no class for the folder's images); rename it"
        )
    if len(shallow.parts) != len(deep.parts):
        found = f"'{shallow}' and '{deep}' lie at different depths"
    elif parent is not None:
        found = f"'{shallow}' lies in no class folder"
    elif len({path.parent.name for path in places}) == 1:  # CLASS/photos/IMAGE: one folder name above every image
        other = next(path for path in places if path.parent != shallow.parent)
        found = (
            f"the folder holding each image has one name, '{shallow.parent.name}' ('{shallow}' and '{other}'), so "
            "its images would be one class: a class folder must hold its images itself"
        )
    else:
        found = "the images of another split lie at another depth"
    raise RetrofitError(
        f"image folder '{data}' gives no class labels: datasets' imagefolder takes each image's class from the folder "
        f"holding it only where every image lies in a class folder, all at one depth (CLASS/IMAGE or "
        f"SPLIT/CLASS/IMAGE), and {found}; move the images into class folders, or name a metadata.csv column with "
        "--label-column"
    )


def _hub_split(data: str, split: str, limit: int | None, sample_seed: int | None, revision: str | None = None):
    """A Hub dataset's split (at `revision`: a commit, branch or tag; None: its default branch). With a `limit`, it
    is streamed and only `limit` examples are downloaded (the first ones, or with `sample_seed` a sample from a
    shuffled stream) and then kept as a `datasets.Dataset` in the cache. Calibrating on 256 ImageNet images thus reads
    a few hundred MB instead of the whole training split."""
    import datasets

    at = {"revision": revision} if revision else {}
    if limit is None:
        return datasets.load_dataset(data, split=split, **at)
    stream = datasets.load_dataset(data, split=split, streaming=True, **at)
    if stream.features is None:  # no schema without reading the data: download the split after all
        return datasets.load_dataset(data, split=split, **at)
    features = stream.features
    if sample_seed is not None:
        stream = stream.shuffle(seed=sample_seed, buffer_size=max(1_000, 4 * limit))
    stream = stream.decode(False).take(limit)  # images stay as their encoded bytes
    return datasets.Dataset.from_generator(_examples, features=features, gen_kwargs={"stream": stream})


def _examples(stream):
    """The examples of `stream`, with the bytes of every image that the stream names only by path read in, so that
    the kept split decodes offline later."""
    from datasets.utils.file_utils import xopen

    for example in stream:
        for value in example.values():
            if isinstance(value, dict) and value.get("bytes") is None and value.get("path"):
                with xopen(value["path"], "rb") as file:
                    value["bytes"], value["path"] = file.read(), None
        yield example


def class_names(dataset) -> list[str] | None:
    """The class names of a split's ``label`` column, if it is a `ClassLabel` (else None)."""
    return _declared_classes(dataset, "label")


def named_classes(dataset) -> list[str] | None:
    """The class names of a split's ``label`` column: a `ClassLabel`'s, or the sorted distinct names of a column of
    text labels (missing ones left out); else None."""
    names = class_names(dataset)
    if names is None and getattr(dataset.features.get("label"), "dtype", None) in ("string", "large_string"):
        names = sorted(_distinct_labels(dataset, "label"))
    return names


def label_id(value, label_map: dict | None = None) -> int | None:
    """A label as a class id: an int (or a whole float), after `label_map` (keys: data ids or class names); None if
    it is not one (a string, a fraction, a list). Missing labels (None, negative ids) come back as they are."""
    if label_map and isinstance(value, (int, float, str)) and value in label_map:
        value = label_map[value]
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return None
    if isinstance(value, (float, np.floating)) and not float(value).is_integer():
        return None
    return int(value)


def model_labels(config) -> dict[int, str]:
    """A config's label names by id (``id2label`` with int keys and text names)."""
    return {int(k): str(v) for k, v in (getattr(config, "id2label", None) or {}).items()}


def generic_labels(id2label: dict[int, str]) -> bool:
    """True for transformers' placeholder names (``LABEL_0``, ``LABEL_1``, ...), which carry no class names."""
    return all(name == f"LABEL_{index}" for index, name in id2label.items())


def dataset_label_map(
    reference: dict[int, str],
    dataset,
    data: str,
    *,
    hint: str = "fix the labels of the split",
    fix: str = "evaluate on data with the models' classes",
) -> dict | None:
    """Map a split's labels to a model's label ids (`reference`: `model_labels`) by class name, then check every
    label (`check_labels`) before any image is read. The one rule for evaluate, sweep, finetune and run:

    - a ClassLabel column is mapped by its class names, a column of strings by those names (compared as Unicode
      NFC); the data's classes must be among the model's labels (a model with placeholder names ``LABEL_i`` takes a
      ClassLabel's ids as they are);
    - a column of ids is taken as the model's ids.

    Returns the mapping (keys: data ids or class names), None if none is needed or there is no label column. Classes
    the model does not have are one line ending in `fix` (``{classes}`` in it: the data's number of classes); bad
    labels one line ending in `hint`."""
    if "label" not in dataset.column_names:
        return None
    names = class_names(dataset)
    if names is not None and generic_labels(reference) and len(names) == len(reference):
        names = None  # placeholder labels: the data's ids are the model's
    label_map: dict | None = None
    if names is not None or getattr(dataset.features["label"], "dtype", None) in ("string", "large_string"):
        strings = names is None
        declared = sorted({value for value in column_values(dataset) if value is not None}) if strings else names
        # the ids the split holds: a ClassLabel may name more classes (an image folder's, those of all its splits)
        held = set(range(len(declared))) if strings else set(_distinct_labels(dataset, "label"))
        by_name: dict[str, list[int]] = {}
        for index, name in sorted(reference.items()):
            by_name.setdefault(same_class_name(name), []).append(index)
        unknown = [name for i, name in enumerate(declared) if i in held and same_class_name(name) not in by_name]
        if unknown:
            raise RetrofitError(
                f"the class names in '{data}' ({len(declared)}, e.g. {unknown[:4]}) are not among the models' labels "
                f"({len(reference)}, e.g. {list(by_name)[:4]}); {fix.format(classes=len(declared))}"
            )
        label_map = {}
        for index, name in enumerate(declared):
            ids = by_name.get(same_class_name(name))
            if ids is None:  # a class of the data's ClassLabel that no example of the split has
                continue
            if not strings and index in ids:  # a name the model gives two ids (ImageNet's "crane"): the data's own id
                label_map[index] = index
            elif len(ids) == 1:
                label_map[name if strings else index] = ids[0]
            elif index in held:
                raise RetrofitError(
                    f"the class {shown(name)} of '{data}' is the name of {len(ids)} of the model's labels "
                    f"(ids {', '.join(map(str, ids))}), so which one it is cannot be told by name; give the data "
                    "a ClassLabel column numbered as the model's labels"
                )
        if not strings and all(k == v for k, v in label_map.items()):
            label_map = None
    check_labels(dataset, len(reference), data=data, label_map=label_map, hint=hint)
    return label_map


def same_class_name(name: str) -> str:
    """A class name as compared with a model's labels: Unicode NFC, so that a folder named on macOS (decomposed,
    NFD: "cafe" + U+0301) matches the label "café" it shows as."""
    return unicodedata.normalize("NFC", str(name))


def check_labels(
    dataset,
    num_labels: int,
    *,
    data: str | None = None,
    label_map: dict | None = None,
    hint: str = "fix the labels of the split",
) -> None:
    """Refuse, before any image is read, a ``label`` column (no-op without one) with an example whose label is not
    a class id in 0..num_labels-1 once `label_map` has been applied: missing (None, -1), a fraction, a string with
    no mapping, or a number out of range. The one-line message names the first such example and its value."""
    if "label" not in dataset.column_names:
        return
    for index, value in enumerate(column_values(dataset)):
        label = label_id(value, label_map)
        if label is not None and 0 <= label < num_labels:
            continue
        if value is None or (label is not None and label < 0):
            what = f"has no label ({shown(value)})"
        elif label is None:
            what = f"has the label {shown(value)}, which is not a class id (an integer) or a known class name"
        else:
            what = f"has the label {shown(value)}, outside the {num_labels} classes (ids 0..{num_labels - 1})"
        where = f" of '{data}'" if data else ""
        raise RetrofitError(f"example {index}{where} {what}; {hint}")


# ----------------------------------------------------------------------------------------------------------------
# Preprocessing and batching
# ----------------------------------------------------------------------------------------------------------------


def _centre_square(processor) -> int | None:
    """The side of the centre square kept after the processor's output, or None.

    A shortest-edge resize without a centre crop keeps the aspect ratio, so images of other shapes would come out in
    other sizes, which a ViT (a fixed number of patches) cannot take: retrofit keeps the centre square of the
    processor's output, exactly as the processor itself would with a centre crop to that square."""
    size = getattr(processor, "size", None) or {}
    if getattr(processor, "do_resize", True) is False or getattr(processor, "do_center_crop", False):
        return None
    if size.get("shortest_edge") and not size.get("longest_edge"):
        return int(size["shortest_edge"])
    return None


def _channel_stats(processor, num_channels: int) -> dict:
    """``image_mean``/``image_std`` for the processor call when its own are for another number of channels than the
    model takes (a 3-channel mean for a grey model: the first value); {} when they fit, as they do for any processor
    saved with its model: the processor then runs exactly as saved."""
    mean, std = getattr(processor, "image_mean", None), getattr(processor, "image_std", None)
    if getattr(processor, "do_normalize", False) is False or mean is None or std is None:
        return {}
    if all(isinstance(v, (int, float)) or len(v) == num_channels for v in (mean, std)):
        return {}  # one number for every channel, or one per channel (a one-item list is not broadcast by every
        # processor: torchvision's normalize refuses it for RGB images)
    mean = [mean] if isinstance(mean, (int, float)) else list(mean)
    std = [std] if isinstance(std, (int, float)) else list(std)
    return {
        "image_mean": (mean * num_channels)[:num_channels] if len(mean) == 1 else mean[:num_channels],
        "image_std": (std * num_channels)[:num_channels] if len(std) == 1 else std[:num_channels],
    }


def augment_image(pixels: torch.Tensor, *, seed: int, epoch: int, index: int) -> torch.Tensor:
    """Train-time augmentation of one processed image (C, H, W): a random resized crop (scale 0.7..1 of the area,
    aspect 3/4..4/3, resized back bilinearly) and then a horizontal flip with probability 0.5.

    A pure function of (seed, epoch, index), so a resumed run and a run with worker processes see exactly the same
    images as an uninterrupted one in one process. Bilinear resizing and flipping commute with the processor's
    per-channel rescale and normalisation, so augmenting its output equals (up to float rounding) augmenting the
    rescaled pixels before normalising them."""
    generator = torch.Generator().manual_seed(hash((seed, epoch, index)) & 0x7FFFFFFF)
    _, height, width = pixels.shape
    area = height * width
    for _ in range(10):  # random resized crop, scale (0.7, 1), aspect (3/4, 4/3), as in Inception-style crops
        scale = 0.7 + 0.3 * torch.rand((), generator=generator).item()
        log_ratio = math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * torch.rand((), generator=generator).item()
        ratio = math.exp(log_ratio)
        crop_w = round(math.sqrt(area * scale * ratio))
        crop_h = round(math.sqrt(area * scale / ratio))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            top = int(torch.randint(0, height - crop_h + 1, (), generator=generator))
            left = int(torch.randint(0, width - crop_w + 1, (), generator=generator))
            crop = pixels[:, top : top + crop_h, left : left + crop_w]
            pixels = F.interpolate(crop[None], size=(height, width), mode="bilinear", align_corners=False)[0]
            break
    if torch.rand((), generator=generator).item() < 0.5:
        pixels = pixels.flip(-1)
    return pixels


def mixup_batch(pixels: torch.Tensor, *, seed: int) -> torch.Tensor:
    """Mixup between the images of a batch (B, C, H, W): each image blended with another of the batch (a random
    permutation) at a weight drawn uniformly from [0, 1] per image (Beta(1, 1)). No labels are mixed: it is for
    distillation, where teacher and student read the same mixed images (function matching). A pure function of
    `seed`, so a resumed run mixes as an uninterrupted one."""
    generator = torch.Generator().manual_seed(seed & 0x7FFFFFFF)
    partner = torch.randperm(len(pixels), generator=generator)
    weight = torch.rand(len(pixels), generator=generator).to(pixels)[:, None, None, None]
    return weight * pixels + (1 - weight) * pixels[partner.to(pixels.device)]


def _unreadable(index: int, exc: Exception, dataset=None) -> RetrofitError:
    """One line for an image that cannot be read or prepared, naming its file where the split knows it."""
    where = ""
    if dataset is not None:
        try:
            from datasets import Image

            path = dataset.cast_column("image", Image(decode=False))[index]["image"].get("path")
            where = f" ('{path}')" if path else ""
        except Exception:  # noqa: BLE001, S110 - the name is a courtesy; the error is the one to report
            pass
    return RetrofitError(f"image {index}{where} is unreadable ({type(exc).__name__}: {brief(exc)}); fix the dataset")


def _in_mode(image, mode: str):
    """`image` in PIL `mode` ("RGB" or "L"). A 16-bit grey image (a 16-bit PNG: mode I;16, or I in older Pillow) is
    first brought to 8 bits by its top byte: PIL's own conversion clips its values at 255, which turns nearly every
    pixel white."""
    if image.mode == mode:
        return image
    if image.mode.startswith("I;16") or (image.mode == "I" and image.format == "PNG"):
        from PIL import Image

        image = Image.fromarray((np.asarray(image).astype(np.uint16) >> 8).astype(np.uint8), mode="L")
    return image if image.mode == mode else image.convert(mode)


def image_files_digest(dataset) -> str | None:
    """A digest of the image files a `datasets.Dataset` (columns "image" and maybe "label") reads from disk, in its
    order: each file's path, size and label. Files moved to another class, renamed, or rewritten at another size since
    change it, where the number of images stays; copied anew (unpacked again, staged to another disk at the same
    path) they do not, as their modification times would. None where no image is a file (images held in the data: a
    ``save_to_disk`` folder, Fashion-MNIST, a Hub dataset at its recorded commit). Read from the Arrow table's path
    column and the bytes column's validity alone, so that images held in the data are never read. Once per command."""
    import pyarrow as pa

    from .reads import command_memo

    def digest() -> str | None:
        table = dataset.data.table  # (memory-mapped) every row, before a selection (`_indices`) takes its rows
        if "image" not in table.column_names or not pa.types.is_struct(table.schema.field("image").type):
            return None  # not images as datasets' Image feature stores them: nothing here names files
        images = table.column("image").chunks
        if sum(chunk.field("bytes").null_count for chunk in images) == 0:
            return None  # every image is held in the data
        paths = pa.chunked_array([chunk.field("path") for chunk in images], pa.string())
        stored = pa.chunked_array([chunk.field("bytes").is_valid() for chunk in images], pa.bool_())
        labels = table.column("label") if "label" in table.column_names else None
        if dataset._indices is not None:
            rows = dataset._indices.column(0)
            paths, stored = paths.take(rows), stored.take(rows)
            labels = labels.take(rows) if labels is not None else None
        total, files = hashlib.sha256(), 0
        labels = labels.to_pylist() if labels is not None else [None] * len(paths)
        for path, held, label in zip(paths.to_pylist(), stored.to_pylist(), labels, strict=True):
            if held or not path:
                continue
            try:
                size = os.stat(path).st_size
            except OSError:  # gone: loading it says so
                size = None
            total.update(f"{path}\0{size}\0{label}\n".encode())
            files += 1
        return total.hexdigest()[:16] if files else None

    return command_memo(("image files", dataset._fingerprint, len(dataset)), digest)


class TransformedDataset(torch.utils.data.Dataset):
    """A `datasets.Dataset` split prepared by the checkpoint's own image processor (and an optional label
    remapping), with optional train-time `augment`ation of the processor's output.

    Each image is first converted to the mode the model takes ("RGB", or "L" for one channel), as transformers'
    image-classification pipeline does (a 16-bit grey image by its top 8 bits, `_in_mode`). A DataLoader fetches a
    whole batch through `__getitems__`, so the processor runs once per batch (in the worker processes too), not once
    per image."""

    def __init__(
        self,
        dataset,
        image_processor,
        *,
        num_channels: int,
        label_map: dict | None = None,
        augment: bool = False,
        seed: int = 0,
    ):
        self.dataset = dataset
        self.image_processor = image_processor
        self.num_channels = num_channels
        self.mode = "L" if num_channels == 1 else "RGB"  # the PIL mode the model takes
        self.overrides = _channel_stats(image_processor, num_channels)
        self.square = _centre_square(image_processor)
        # A NaFlex processor (SigLIP 2) gives each image as patches at its own aspect ratio; retrofit feeds it the
        # centre square of each image and reads the patches back as one image (`retrofit.naflex`)
        naflex = getattr(image_processor, "max_num_patches", None)
        self.naflex_patch = getattr(image_processor, "patch_size", None) if naflex else None
        self.has_labels = "label" in dataset.column_names
        self.label_map = label_map
        self.augment = augment
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.dataset)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, index: int) -> dict:
        return self.__getitems__([index])[0]

    def _read(self, indices: list[int]) -> dict[str, list]:
        """The examples at `indices` as columns; an image that cannot be decoded is one line naming its index."""
        try:
            return self.dataset[indices]
        except Exception:  # noqa: BLE001 - PIL/datasets raise many types: find the image, one at a time
            for index in indices:
                try:
                    self.dataset[index]
                except Exception as exc:  # noqa: BLE001
                    raise _unreadable(index, exc, self.dataset) from None
            raise  # every image reads on its own: not one bad image, so the library's error as it is

    def _process(self, images: list, indices: list[int]) -> list[torch.Tensor]:
        """The processor's pixel values for `images`, one (C, H, W) float tensor each (one processor call)."""
        try:
            images = [_in_mode(image, self.mode) for image in images]
            if self.naflex_patch:
                images = [_square_image(image) for image in images]
                output = self.image_processor(images, **self.overrides, return_tensors="pt")
                pixels = patches_to_images(output["pixel_values"], output["spatial_shapes"], self.naflex_patch)
            else:
                pixels = self.image_processor(images, **self.overrides)["pixel_values"]
        except Exception as exc:  # noqa: BLE001 - find the image that fails, one at a time
            if len(images) == 1:
                raise _unreadable(indices[0], exc, self.dataset) from None
            for image, index in zip(images, indices, strict=True):
                self._process([image], [index])
            raise RetrofitError(
                f"the image processor fails on images {indices[0]}..{indices[-1]} together ({type(exc).__name__}: "
                f"{brief(exc)}) though not on each alone; use a processor that prepares every image the same way"
            ) from None
        pixels = [value if isinstance(value, torch.Tensor) else torch.from_numpy(np.asarray(value)) for value in pixels]
        if self.square:
            side = self.square
            pixels = [_centre_crop(value, side) for value in pixels]
        return pixels

    def __getitems__(self, indices) -> list[dict]:
        """The examples at `indices`, each ``{"pixel_values": (C, H, W) float, "labels": int}`` (no ``labels`` if
        the split has none); `collate` stacks them."""
        indices = [int(index) for index in indices]
        columns = self._read(indices)
        items = []
        for position, index in enumerate(indices):
            item = {}
            if self.has_labels:
                item["labels"] = self._label(columns["label"][position], index)
            items.append(item)
        pixels = self._process(columns["image"], indices)
        for item, index, value in zip(items, indices, pixels, strict=True):
            if self.augment:
                value = augment_image(value, seed=self.seed, epoch=self.epoch, index=index)
            item["pixel_values"] = value.contiguous()
        return items

    def _label(self, value, index: int) -> int:
        label = label_id(value, self.label_map)
        if value is None or (label is not None and label < 0):
            raise RetrofitError(f"example {index} has no label; use --loss kd for unlabelled data")
        if label is None:
            raise RetrofitError(
                f"example {index} has the label {shown(value)}, which is not a class id (an integer) or a known class "
                "name; give every example a class id or a ClassLabel"
            )
        return label


def _square_image(image):
    """The centre square of a PIL image (for a NaFlex processor, which keeps each image's aspect ratio)."""
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    return image if image.width == image.height else image.crop((left, top, left + side, top + side))


def _centre_crop(pixels: torch.Tensor, side: int) -> torch.Tensor:
    """The centre `side` x `side` square of (C, H, W) pixels, placed as transformers' `center_crop` places it."""
    _, height, width = pixels.shape
    top, left = max(0, (height - side) // 2), max(0, (width - side) // 2)
    return pixels[:, top : top + side, left : left + side]


def collate(items: list[dict]) -> dict[str, torch.Tensor]:
    """Stack items into ``{"pixel_values": (B, C, H, W) float, "labels": (B,) long}``."""
    shapes = sorted({"x".join(map(str, item["pixel_values"].shape)) for item in items})
    if len(shapes) > 1:
        raise RetrofitError(
            f"the image processor gives images of different sizes ({shapes[0]} and {shapes[1]}); use a processor "
            "that resizes or crops every image to one size"
        )
    batch = {"pixel_values": torch.stack([item["pixel_values"] for item in items])}
    if "labels" in items[0]:
        batch["labels"] = torch.tensor([item["labels"] for item in items], dtype=torch.long)
    return batch


class BatchLargerThanData(RetrofitError):
    """A batch size above the number of examples (a caller may name its own option in the message)."""

    def __init__(self, batch_size: int, examples: int, option: str = "--batch-size") -> None:
        super().__init__(f"batch size {batch_size} is larger than the data ({examples} examples); lower {option}")
        self.batch_size, self.examples = batch_size, examples


def make_dataloader(
    dataset,
    image_processor,
    *,
    batch_size: int,
    train: bool = False,
    augment: bool = False,
    num_workers: int = 0,
    seed: int = 0,
    drop_last: bool = False,
    num_channels: int | None = None,
    label_map: dict[int, int] | None = None,
) -> torch.utils.data.DataLoader:
    """A DataLoader of ``{"pixel_values", "labels"}`` batches (no ``labels`` if the split has none), prepared by
    `image_processor` (the checkpoint's own), one processor call per batch.

    `train` shuffles (with a generator seeded by `seed`); `augment` adds random resized crops and flips to the
    processor's output; `num_channels` (default: from the processor's mean) converts grey <-> RGB first;
    `label_map` remaps dataset label ids to the model's.
    """
    if batch_size < 1:
        raise RetrofitError(f"batch size must be at least 1 (got {batch_size})")
    if batch_size > len(dataset):
        raise BatchLargerThanData(batch_size, len(dataset))
    if not num_channels:
        mean = getattr(image_processor, "image_mean", None)
        num_channels = 1 if isinstance(mean, (int, float)) else len(mean) if mean else 3
    if num_channels not in (1, 3):
        raise RetrofitError(
            f"this model takes {num_channels}-channel images, and retrofit reads a dataset's images as RGB or grey "
            "(3 or 1 channels): it can convert and bench this model, but not evaluate, train or calibrate it on data"
        )
    prepared = TransformedDataset(
        dataset, image_processor, num_channels=num_channels, label_map=label_map, augment=augment, seed=seed
    )
    generator = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(
        prepared,
        batch_size=batch_size,
        shuffle=train,
        generator=generator if train else None,
        num_workers=num_workers,
        collate_fn=collate,
        drop_last=drop_last,
        persistent_workers=False,
    )
