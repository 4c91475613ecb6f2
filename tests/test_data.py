"""Data loading: Fashion-MNIST from Debian's files, image folders, preprocessing, and every bad input."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import HUB_ID, error_line
from transformers import ViTImageProcessor

from retrofit.cli import main
from retrofit.data import FASHION_MNIST_CLASSES, HOLDOUT_SEED, class_names, load_split, make_dataloader
from retrofit.errors import RetrofitError

COLOURS = {"cat": (220, 30, 30), "dog": (30, 220, 30), "bird": (30, 30, 220)}
FMNIST = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")


def make_imagefolder(root: Path, per_class: int = 8, test_per_class: int = 4, size: int = 32, seed: int = 0) -> Path:
    """A tiny learnable imagefolder: one colour per class (the tiny models' cat/dog/bird) plus noise."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, count in (("train", per_class), ("test", test_per_class)):
        for name, colour in COLOURS.items():
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(count):
                pixels = np.clip(np.array(colour) + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{index}.png")
    return root


def make_labelled_folder(root: Path, images: Path, labels: list) -> str:
    """A flat folder of the first test images of `images` with a metadata.csv `label` column holding `labels`."""
    root.mkdir()
    rows = ["file_name,label"]
    for index, (path, label) in enumerate(zip(sorted((images / "test").glob("*/*.png")), labels, strict=False)):
        shutil.copy(path, root / f"{index}.png")
        rows.append(f"{index}.png,{label}")
    (root / "metadata.csv").write_text("\n".join(rows) + "\n")
    return str(root)


@pytest.fixture(scope="session")
def imagefolder(tmp_path_factory) -> Path:
    return make_imagefolder(tmp_path_factory.mktemp("images") / "colours")


def processor(size: int = 32, channels: int = 3) -> ViTImageProcessor:
    return ViTImageProcessor(
        size={"height": size, "width": size}, image_mean=[0.5] * channels, image_std=[0.5] * channels
    )


@pytest.mark.skipif(not FMNIST.exists(), reason="dataset-fashion-mnist is not installed")
def test_fashion_mnist_split_has_images_and_class_names():
    data = load_split("fashion-mnist", "validation", limit=20)
    assert len(data) == 20 and data.column_names == ["image", "label"]
    assert data["label"][:3] == [9, 2, 1]  # validation is its test split (whose train split starts 9, 0, 0)
    assert class_names(data) == FASHION_MNIST_CLASSES
    assert data[0]["image"].size == (28, 28) and data[0]["image"].mode == "L"
    unlabelled = load_split("fashion-mnist", "train", label_column=None, limit=5)
    assert unlabelled.column_names == ["image"] and class_names(unlabelled) is None


@pytest.mark.skipif(not FMNIST.exists(), reason="dataset-fashion-mnist is not installed")
def test_a_fashion_mnist_cache_another_process_wrote_first_leaves_no_copy_behind(tmp_path, monkeypatch):
    """The ranks of `accelerate launch` each cache the split on a first run; the one that renames its copy second
    failed and left its 30 MB folder in ~/.cache/retrofit for good. It now removes it and reads the split as built."""
    import retrofit.data as data_module

    monkeypatch.setattr(data_module, "CACHE_DIR", tmp_path)
    replace = os.replace

    def other_process_first(source, target):  # the other rank's copy lands between this one's write and rename
        if Path(target).parent == tmp_path / "datasets":
            shutil.copytree(source, target)
        replace(source, target)

    monkeypatch.setattr(data_module.os, "replace", other_process_first)
    data = load_split("fashion-mnist", "test")
    assert len(data) == 10_000 and data["label"][:3] == [9, 2, 1]
    cached = [path.name for path in (tmp_path / "datasets").iterdir()]
    assert len(cached) == 1 and cached[0].startswith("fashion-mnist-test-")  # the other's copy, and no half of this
    monkeypatch.setattr(data_module.os, "replace", replace)
    assert load_split("fashion-mnist", "test")["label"][:3] == [9, 2, 1]  # the other process's copy


@pytest.mark.skipif(not FMNIST.exists(), reason="dataset-fashion-mnist is not installed")
def test_grey_images_become_rgb_and_back():
    data = load_split("fashion-mnist", "test", limit=8)
    rgb = next(iter(make_dataloader(data, processor(32), batch_size=4)))
    assert rgb["pixel_values"].shape == (4, 3, 32, 32) and rgb["labels"].dtype == torch.long
    grey = next(iter(make_dataloader(data, processor(28, 1), batch_size=4)))
    assert grey["pixel_values"].shape == (4, 1, 28, 28)
    # a processor whose mean and std are per RGB channel, for a grey model (and the other way round): the first
    # value serves the one channel, one value every channel, not an error on every image
    grey_of_rgb = next(iter(make_dataloader(data, processor(28, 3), batch_size=4, num_channels=1)))
    assert torch.equal(grey_of_rgb["pixel_values"], grey["pixel_values"])
    rgb_of_grey = next(iter(make_dataloader(data, processor(32, 1), batch_size=4, num_channels=3)))
    assert torch.equal(rgb_of_grey["pixel_values"], rgb["pixel_values"])


def test_imagefolder_batches(imagefolder):
    data = load_split(str(imagefolder), "train")
    assert len(data) == 24 and class_names(data) == ["bird", "cat", "dog"]
    batch = next(iter(make_dataloader(data, processor(16), batch_size=5, train=True)))
    assert batch["pixel_values"].shape == (5, 3, 16, 16) and batch["labels"].shape == (5,)
    assert load_split(str(imagefolder), "validation").num_rows == 12  # falls back to test


def test_the_first_n_images_say_when_they_hold_fewer_classes_than_the_split(imagefolder, tmp_path):
    """An image folder lists its classes one after another, so --limit's first N may be of one class: the accuracy
    printed was that class's alone, without a word. One note says so (labels read or not: kd and backbones too),
    naming the alternative; none for a sample, a limit past the split, or where every class is in. Zero-shot
    (`split_classes`) names every class of a limited split of text labels, not only the classes of the first N."""
    from retrofit.data import label_id, sample_of

    def notes(data: str, split: str, **kwargs) -> list[str]:
        said: list[str] = []
        load_split(data, split, log=said.append, **kwargs)
        return said

    folder = str(imagefolder)  # test split: 4 images of bird, then of cat, then of dog
    one = notes(folder, "test", limit=4)
    assert len(one) == 1 and "the first 4 images of" in one[0] and "hold 1 of its 3 classes" in one[0]
    assert "use --sample N" in one[0]
    assert notes(folder, "test", limit=5, label_column=None) != []  # kd and backbones read no labels
    two = notes(folder, "test", limit=6, instead="raise it")
    assert len(two) == 1 and "hold 2 of its 3 classes" in two[0] and two[0].endswith("; raise it")
    assert notes(folder, "test", limit=4, sample_seed=0) == [] and notes(folder, "test", limit=100) == []
    sample = load_split(folder, "test", limit=6, sample_seed=0)["label"][:]
    assert len(sample) == 6 and len(set(sample)) == 3  # drawn from the whole split: dogs are its last 4 images
    assert notes(folder, "test", limit=9) == [] and notes(folder, "test", limit=1) == []  # every class it can hold

    text = make_labelled_folder(tmp_path / "text", imagefolder, ["cat", "cat", "dog", "bird"])
    assert "hold 1 of its 3 classes" in notes(text, "train", limit=2)[0]
    numbers = make_labelled_folder(tmp_path / "numbers", imagefolder, [0, 0, 1])  # ids without names
    assert "hold 1 of its 2 classes" in notes(numbers, "train", limit=2)[0]
    missing = make_labelled_folder(tmp_path / "missing", imagefolder, [0, -1, 1, 2])  # -1: no label, not a class
    said = notes(missing, "train", limit=2)
    assert len(said) == 1 and "hold 1 of its 3 classes" in said[0]
    if FMNIST.exists():
        assert "hold 2 of its 10 classes" in notes("fashion-mnist", "train", limit=3)[0]  # labels 9, 0, 0
        assert notes("fashion-mnist", "test", limit=3) == []  # 3 images of 3 classes: all that 3 can hold
        # --sample draws from the whole split (its files are read whole for it), not from its first N
        drawn = load_split("fashion-mnist", "test", limit=20, sample_seed=0)["label"][:]
        assert drawn == sample_of(load_split("fashion-mnist", "test"), 20, 0)["label"][:]

    limited = load_split(text, "train", limit=3, split_classes=True)
    assert class_names(limited) == ["bird", "cat", "dog"]  # bird is not among the first 3, yet a class of the split
    assert [class_names(limited)[label_id(value)] for value in limited["label"]] == ["cat", "cat", "dog"]
    assert load_split(text, "train", limit=3)["label"][:] == ["cat", "cat", "dog"]  # others read the text as it is


def test_augmentation_is_a_function_of_seed_epoch_and_index(imagefolder):
    data = load_split(str(imagefolder), "train")
    first = make_dataloader(data, processor(), batch_size=4, augment=True).dataset
    second = make_dataloader(data, processor(), batch_size=4, augment=True).dataset
    assert torch.equal(first[3]["pixel_values"], second[3]["pixel_values"])
    plain = make_dataloader(data, processor(), batch_size=4).dataset
    assert not torch.equal(first[3]["pixel_values"], plain[3]["pixel_values"])
    second.set_epoch(1)
    assert not torch.equal(first[3]["pixel_values"], second[3]["pixel_values"])
    twins = make_dataloader(_numbered([data[3]["image"]] * 2), processor(), batch_size=2, augment=True).dataset
    assert not torch.equal(*(item["pixel_values"] for item in twins.__getitems__([0, 1])))  # a crop per image


def test_worker_processes_load_the_same_batches(imagefolder):
    """--num-workers changes speed, not data: same shuffle, same augmentation as loading in the main process."""
    data = load_split(str(imagefolder), "train")
    settings = dict(batch_size=6, train=True, augment=True, seed=3)
    in_process = list(make_dataloader(data, processor(16), num_workers=0, **settings))
    in_workers = list(make_dataloader(data, processor(16), num_workers=2, **settings))
    assert len(in_process) == len(in_workers) == 4
    for a, b in zip(in_process, in_workers, strict=True):
        assert torch.equal(a["labels"], b["labels"]) and torch.equal(a["pixel_values"], b["pixel_values"])


def test_bad_inputs_are_one_line_errors(imagefolder, tmp_path):
    with pytest.raises(RetrofitError, match="does not exist"):
        load_split(str(tmp_path / "missing"), "train")
    with pytest.raises(RetrofitError, match="no column 'caption'.*available: image, label"):
        load_split(str(imagefolder), "train", label_column="caption")
    with pytest.raises(RetrofitError, match="no split 'holdout'"):
        load_split(str(imagefolder), "holdout")
    flat = r"no split 'validation'; available: train \(an image folder without split folders is one split, which"
    with pytest.raises(RetrofitError, match=flat):  # evaluate's default split, on a folder of class folders
        load_split(str(imagefolder / "test"), "validation")
    with pytest.raises(RetrofitError, match="larger than the data"):
        make_dataloader(load_split(str(imagefolder), "test"), processor(), batch_size=13)
    broken = make_imagefolder(tmp_path / "broken", per_class=2, test_per_class=1)
    (broken / "train" / "cat" / "bad.png").write_bytes(b"not an image at all")
    with pytest.raises(RetrofitError, match="bad.png.*unreadable"):
        load_split(str(broken), "train")


def test_empty_split_is_refused(monkeypatch):
    from datasets import Dataset

    import retrofit.data as data_module

    monkeypatch.setattr(data_module, "_fashion_mnist", lambda split, limit: Dataset.from_dict({"image": []}))
    with pytest.raises(RetrofitError, match="is empty"):
        load_split("fashion-mnist", "train")


def test_cli_bad_data_exits_2_and_writes_nothing(tiny_vit, imagefolder, tmp_path, capsys):
    out = tmp_path / "out"
    base = ["finetune", str(tiny_vit), "--after-layer", "2", "--tokens", "4", "--output", str(out)]
    assert main([*base, "--data", str(tmp_path / "nope")]) == 2
    assert main([*base, "--data", str(imagefolder), "--loss", "ce", "--label-column", "kind"]) == 2
    assert main([*base, "--data", str(imagefolder), "--batch-size", "1000"]) == 2
    shutil.copytree(imagefolder / "train", tmp_path / "train-only" / "train")  # the default --eval-split is test
    assert main([*base, "--data", str(tmp_path / "train-only"), "--batch-size", "8"]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 4 and all(line.startswith("retrofit: error:") for line in errors)
    assert "no column 'kind'" in errors[1] and "larger than the data" in errors[2]
    assert errors[3].endswith("has no split 'test'; available: train; choose one with --eval-split, hold some of the "
                              "training images out to evaluate on with --holdout (such as --holdout 0.1), or pass "
                              "--eval-split '' to train without evaluating")  # fmt: skip
    assert not out.exists() and not (tmp_path / "out-checkpoints").exists()


# ----------------------------------------------------------------------------------------------------------------
# Hub datasets: a stand-in Hub id served from local parquet files (the real `datasets` streaming code runs on them)
# ----------------------------------------------------------------------------------------------------------------


def test_a_limited_hub_split_is_streamed_not_downloaded_whole(hub_dataset, tmp_path):
    calls, full = hub_dataset
    said: list[str] = []
    part = load_split(HUB_ID, "train", limit=7, log=said.append)
    assert calls == [{"split": "train", "streaming": True}]
    assert len(said) == 1 and "hold 1 of its 3 classes" in said[0]  # the classes its features name
    assert len(part) == 7 and part["label"] == full["label"][:7]
    assert class_names(part) == ["bird", "cat", "dog"]
    assert np.array_equal(np.asarray(part[6]["image"]), np.asarray(full[6]["image"]))  # the same image, decoded

    calls.clear()
    assert len(load_split(HUB_ID, "validation")) == 12  # 'validation' finds 'test'
    assert calls == [{"split": "test", "streaming": False}]  # no limit: the whole split, as before

    # A stream that names its images by path (an image-folder repo): the kept split holds their bytes.
    expected = np.asarray(load_split(HUB_ID, "test")[1]["image"])
    by_path = load_split(HUB_ID, "test", limit=2)
    shutil.rmtree(tmp_path / "colours" / "test")
    assert np.array_equal(np.asarray(by_path[1]["image"]), expected)


def test_a_calibration_sample_from_the_hub_is_streamed_and_seeded(hub_dataset, tiny_vit):
    from retrofit.calibrate import calibration_batch
    from retrofit.loading import load_model

    calls, full = hub_dataset
    first = load_split(HUB_ID, "train", label_column=None, limit=6, sample_seed=0)
    again = load_split(HUB_ID, "train", label_column=None, limit=6, sample_seed=0)
    other = load_split(HUB_ID, "train", label_column=None, limit=6, sample_seed=1)
    assert all(call["streaming"] for call in calls)
    assert first.column_names == ["image"] and len(first) == 6
    pixels = [[np.asarray(image).tobytes() for image in part["image"]] for part in (first, again, other)]
    assert pixels[0] == pixels[1] and pixels[0] != pixels[2]  # a function of the seed
    everything = {np.asarray(image).tobytes() for image in full["image"]}
    assert set(pixels[0]) <= everything and len(set(pixels[0])) == 6

    calls.clear()
    model = load_model(str(tiny_vit))
    batch = calibration_batch(model, HUB_ID, source=str(tiny_vit), num_images=5, log=lambda _: None)
    assert batch.shape == (5, 3, 32, 32) and calls == [{"split": "train", "streaming": True}]


def test_evaluate_reads_and_records_the_commit_a_data_revision_is_at(
    hub_dataset, tiny_vit, imagefolder, tmp_path, capsys, monkeypatch
):
    """`evaluate --data-revision v1` asks the Hub once which commit v1 is at, reads that commit (a push to v1 during
    the command changes nothing it reads), and the report and the card's model-index record it; a local folder or
    Fashion-MNIST has no revisions: one line."""
    import huggingface_hub
    from huggingface_hub import ModelCard

    calls, _ = hub_dataset
    asked = []
    monkeypatch.setattr(huggingface_hub, "dataset_info", lambda repo_id, revision=None: asked.append(
        (repo_id, revision)) or type("Info", (), {"sha": "0123abc"})())  # fmt: skip
    export, report = tmp_path / "pm", tmp_path / "report.json"
    assert main(["convert", str(tiny_vit), "--after-layer", "2", "--tokens", "4", "--output", str(export)]) == 0
    argv = ["evaluate", str(tiny_vit), str(export), "--data", HUB_ID, "--split", "train", "--data-revision", "v1"]
    assert main([*argv, "--limit", "6", "--json", str(report), "--card", str(export)]) == 0
    assert asked == [(HUB_ID, "v1")] and calls == [
        {"split_names": "0123abc"}, {"split": "train", "streaming": True, "revision": "0123abc"}
    ]  # fmt: skip
    assert json.loads(report.read_text())["data_revision"] == "0123abc"
    assert {r.dataset_revision for r in ModelCard.load(export / "README.md").data.eval_results} == {"0123abc"}
    capsys.readouterr()
    for data in (str(imagefolder), "fashion-mnist"):
        assert main([*argv[:4], data, "--data-revision", "v1"]) == 2
        assert "--data-revision names a commit, branch or tag of a Hub dataset" in error_line(capsys.readouterr().err)
    # convert --calibrate-on calibrates on the revision, and its card names the commit
    calls.clear()
    asked.clear()
    calibrated = ["convert", str(tiny_vit), "--after-layer", "2", "--tokens", "4", "--output", str(tmp_path / "cal"),
                  "--calibrate-images", "4", "--data-revision", "v1"]  # fmt: skip
    assert main([*calibrated, "--calibrate-on", HUB_ID]) == 0
    assert (
        asked == [(HUB_ID, "v1")]
        and calls
        and all(call.get("revision", call.get("split_names")) == "0123abc" for call in calls)
    )
    assert f"4 images of `{HUB_ID}` at commit `0123abc` (train split" in (tmp_path / "cal" / "README.md").read_text()
    assert main(calibrated) == 2
    assert "--data-revision chooses its data, and there is none without --calibrate-on" in capsys.readouterr().err


def test_an_unreachable_hub_stream_is_a_one_line_error(hub_dataset, monkeypatch):
    import datasets

    def offline(path, split=None, streaming=False, **kwargs):
        raise ConnectionError(f"Couldn't reach '{path}' on the Hub (LocalEntryNotFoundError)\nmore lines")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(RetrofitError, match=r"cannot load dataset 'someone/colours' \(ConnectionError") as error:
        load_split(HUB_ID, "train", limit=3)
    assert "\n" not in str(error.value)


def test_a_gated_hub_dataset_says_to_log_in(monkeypatch):
    import datasets
    from datasets.exceptions import DatasetNotFoundError

    def gated(path, **kwargs):
        raise DatasetNotFoundError(
            f"Dataset '{path}' is a gated dataset on the Hub. You must be authenticated to access it."
        )

    monkeypatch.setattr(datasets, "get_dataset_split_names", gated)
    with pytest.raises(RetrofitError, match=r"gated dataset on the Hub.*`hf auth login`") as error:
        load_split("ILSVRC/imagenet-1k", "validation", limit=3)
    assert "\n" not in str(error.value)


def test_label_column_cannot_be_the_image_column(imagefolder):
    with pytest.raises(RetrofitError, match="--label-column and --image-column are both 'image'"):
        load_split(str(imagefolder), "test", label_column="image")


def test_columns_named_each_others_target_are_read(imagefolder, tmp_path):
    """Images in 'img' and their class names in a column called 'image' (or the two swapped): renamed one after the
    other, --image-column img --label-column image collided (datasets' ValueError, a traceback)."""
    from datasets import DatasetDict

    split = load_split(str(imagefolder), "test")
    names = [split.features["label"].int2str(label) for label in split["label"]]
    for image, label in (("img", "image"), ("label", "image")):
        saved = tmp_path / f"{image}-{label}"
        renamed = split.remove_columns("label").rename_column("image", image).add_column(label, names)
        DatasetDict({"test": renamed}).save_to_disk(saved)
        read = load_split(str(saved), "test", image_column=image, label_column=label)
        assert read.column_names == ["image", "label"] and read["label"] == names
        assert read[0]["image"].size == split[0]["image"].size


def test_a_mistyped_local_folder_is_named(tmp_path, monkeypatch):
    """A relative path that does not exist is tried as a Hub id; the error also says no such folder exists."""
    (tmp_path / "data").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RetrofitError, match="there is no local folder 'data/colour' either") as error:
        load_split("data/colour", "test")
    assert "\n" not in str(error.value)


def test_shortest_edge_resize_without_crop_gives_one_square_size(tmp_path):
    """Non-square images through a shortest-edge processor with no centre crop: each image is resized (aspect kept)
    and its centre square kept, so a batch of mixed shapes stacks into the size a ViT takes."""
    from PIL import Image
    from transformers import CLIPImageProcessor

    rng = np.random.default_rng(0)
    shapes = [(40, 40), (60, 40), (40, 90), (50, 20), (34, 32)]  # (width, height); the last resizes to 17 x 16
    for index, (width, height) in enumerate(shapes):
        folder = tmp_path / "mixed" / "test" / ("cat" if index % 2 else "dog")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(folder / f"{index}.png")
    edge = CLIPImageProcessor(
        size={"shortest_edge": 16}, do_center_crop=False, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )
    data = load_split(str(tmp_path / "mixed"), "test")
    batch = next(iter(make_dataloader(data, edge, batch_size=5)))
    assert batch["pixel_values"].shape == (5, 3, 16, 16)
    # The centre square of the shortest-edge resize, exactly as the processor's own resize + a 16x16 centre crop.
    cropping = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16},
                                  image_mean=[0.5] * 3, image_std=[0.5] * 3)  # fmt: skip
    assert torch.equal(batch["pixel_values"], next(iter(make_dataloader(data, cropping, batch_size=5)))["pixel_values"])


def _numbered(images: list):
    """`images` as a split whose label is each image's index, to find every image again in a shuffled batch."""
    from datasets import ClassLabel, Dataset, Features, Image

    features = Features({"image": Image(), "label": ClassLabel(num_classes=len(images))})
    return Dataset.from_dict({"image": images, "label": list(range(len(images)))}, features=features)


def _counting(processor, sizes: list):
    """`processor`'s class's __call__, noting the number of images of each call in `sizes`."""
    call = type(processor).__call__
    return lambda self, images, *args, **kwargs: sizes.append(len(images)) or call(self, images, *args, **kwargs)


def test_batches_are_the_processors_own_output(imagefolder, monkeypatch):
    """Training (augment off, shuffled) and evaluation batches hold exactly what the checkpoint's processor gives for
    the same images, converted first to the model's mode as transformers' pipeline does: a ViT-style resize to
    height x width and a DINOv2-style shortest-edge resize + centre crop, on non-square RGB and grey images; and a
    grey model gets the processor's output for the grey image. The processor runs once per batch."""
    from PIL import Image
    from transformers import BitImageProcessor

    rng = np.random.default_rng(0)
    colour = [Image.fromarray(rng.integers(0, 256, (417, 300, 3), dtype=np.uint8)) for _ in range(4)]  # 300x417
    grey = [Image.fromarray(rng.integers(0, 256, (417, 300), dtype=np.uint8), mode="L") for _ in range(2)]
    images = colour + grey + [Image.open(path) for path in sorted(imagefolder.glob("test/*/*.png"))[:2]]
    data = _numbered(images)
    vit = ViTImageProcessor(size={"height": 24, "width": 40})
    dinov2 = BitImageProcessor(  # facebook/dinov2-base's preprocessor_config.json, smaller
        size={"shortest_edge": 64}, crop_size={"height": 56, "width": 56}, resample=3, do_convert_rgb=True,
        image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225],
    )  # fmt: skip
    grey_model = ViTImageProcessor(size={"height": 20, "width": 20}, image_mean=[0.5], image_std=[0.25])
    for image_processor, mode, channels in ((vit, "RGB", 3), (dinov2, "RGB", 3), (grey_model, "L", 1)):
        expected = torch.from_numpy(np.stack(image_processor([im.convert(mode) for im in images])["pixel_values"]))
        assert expected.shape[:2] == (len(images), channels)
        sizes = []
        monkeypatch.setattr(type(image_processor), "__call__", _counting(image_processor, sizes))
        for settings in (dict(train=True, seed=5), dict()):  # a training loader, then an evaluation loader
            loader = make_dataloader(data, image_processor, batch_size=3, num_channels=channels, **settings)
            batches = list(loader)
            pixels = torch.cat([batch["pixel_values"] for batch in batches])
            order = torch.cat([batch["labels"] for batch in batches])
            assert pixels.dtype == torch.float32 and torch.equal(pixels, expected[order])
            assert (order != torch.arange(len(images))).any() == bool(settings)  # only training shuffles
        assert sizes == [3, 3, 2] * 2  # one processor call per batch
        monkeypatch.undo()


def test_images_of_different_sizes_are_one_line(tmp_path):
    from PIL import Image

    for index, size in enumerate((16, 24)):
        folder = tmp_path / "sizes" / "test" / "cat"
        folder.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (size, size)).save(folder / f"{index}.png")
    keep_size = ViTImageProcessor(do_resize=False)
    loader = make_dataloader(load_split(str(tmp_path / "sizes"), "test", label_column=None), keep_size, batch_size=2)
    with pytest.raises(RetrofitError, match=r"images of different sizes \(3x16x16 and 3x24x24\)"):
        next(iter(loader))


def test_labels_are_checked_as_class_ids():
    from datasets import Dataset

    from retrofit.data import check_labels, generic_labels

    check_labels(Dataset.from_dict({"label": [0, 2, 1.0]}), 3)  # a whole float is a class id
    check_labels(Dataset.from_dict({"label": ["b", "a"]}), 3, label_map={"a": 0, "b": 2})
    check_labels(Dataset.from_dict({"image": [1]}), 3)  # no label column: nothing to check
    # placeholder names only where every label is one (a model naming some classes maps the data by name)
    assert generic_labels({0: "LABEL_0", 1: "LABEL_1"}) and not generic_labels({0: "LABEL_0", 1: "dog"})
    for labels, message in (
        ([0, 3], r"example 1 has the label 3, outside the 3 classes \(ids 0..2\)"),
        ([0.0, 1.5], "example 1 has the label 1.5, which is not a class id"),
        ([1, None], r"example 1 has no label \(None\)"),
        ([-1, 0], r"example 0 has no label \(-1\)"),
        ([True, False], "example 0 has the label True, which is not a class id"),  # a yes/no column, not ids
        (["a", "z"], "example 1 has the label 'z', which is not a class id"),
        (["a", "z" * 100_000], "example 1 has the label 'zzzz.*zzzz', which is not a class id"),  # shortened
    ):
        with pytest.raises(RetrofitError, match=f"{message}.*; fix the labels") as error:
            check_labels(Dataset.from_dict({"label": labels}), 3, label_map={"a": 0})
        assert len(str(error.value)) < 300  # a mask image or a long text as a label printed 130,000 characters


def test_a_label_that_is_not_a_class_id_is_one_line_when_read(imagefolder):
    """Training reads labels example by example: a string there is a one-line error, not a ValueError."""
    from datasets import Value

    data = load_split(str(imagefolder), "test").cast_column("label", Value("string"))
    dataset = make_dataloader(data, processor(), batch_size=2).dataset
    with pytest.raises(RetrofitError, match="example 0 has the label '.*', which is not a class id"):
        dataset[0]
    missing = load_split(str(imagefolder), "test").cast_column("label", Value("int64")).map(lambda _: {"label": -1})
    with pytest.raises(RetrofitError, match="example 1 has no label; use --loss kd"):  # not a class -1
        make_dataloader(missing, processor(), batch_size=2).dataset[1]


def test_datasets_progress_bars_stay_off_stderr(tiny_vit, imagefolder, tmp_path):
    """The first load of an image folder ("Generating train split") prints nothing: the CLI's stderr is the error."""
    import os
    import subprocess
    import sys

    data = tmp_path / "fresh"
    shutil.copytree(imagefolder, data)
    env = {**os.environ, "HF_DATASETS_CACHE": str(tmp_path / "cache")}
    env.pop("HF_DATASETS_DISABLE_PROGRESS_BARS", None)
    argv = [sys.executable, "-m", "retrofit.cli", "evaluate", str(tiny_vit), "--data", str(data), "--label-column",
            "kind"]  # fmt: skip
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "no column 'kind'" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


# ----------------------------------------------------------------------------------------------------------------
# Odd local folders: 16-bit images, files that fail to decode, one class, no class folders, save_to_disk folders
# ----------------------------------------------------------------------------------------------------------------


def test_a_16_bit_grey_png_is_read_by_its_top_byte(tmp_path):
    """PIL's own conversion clips 16-bit values at 255 (a nearly white image); the model sees the image's top byte."""
    from PIL import Image

    from retrofit.data import _in_mode

    deep = (np.random.default_rng(0).random((32, 32)) * 65535).astype(np.uint16)
    for name, image in (("a", Image.fromarray(deep)), ("b", Image.fromarray((deep >> 8).astype(np.uint8)))):
        (tmp_path / "grey" / name).mkdir(parents=True)
        image.save(tmp_path / "grey" / name / "0.png")
    data = load_split(str(tmp_path / "grey"), "train")
    assert data[0]["image"].mode == "I;16" and data[1]["image"].mode == "L"
    for channels in (3, 1):
        pixels = next(iter(make_dataloader(data, processor(32, channels), batch_size=2)))["pixel_values"]
        assert torch.equal(pixels[0], pixels[1]) and pixels[0].mean().abs() < 0.1
    older = Image.fromarray(deep.astype(np.int32))  # how older Pillow releases open the same PNG: mode I
    older.format = "PNG"
    assert np.array_equal(np.asarray(_in_mode(older, "L")), deep >> 8)


def test_an_image_that_fails_to_decode_is_named_by_its_file(imagefolder, tmp_path):
    """A truncated JPEG passes the header check when the split loads; reading it names the file, not just an index."""
    import io

    from PIL import Image

    folder = tmp_path / "cut"
    shutil.copytree(imagefolder, folder)
    encoded = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 30, 3), dtype=np.uint8)).save(encoded, "JPEG")
    (folder / "test" / "cat" / "cut.jpg").write_bytes(encoded.getvalue()[: len(encoded.getvalue()) // 2])
    data = load_split(str(folder), "test")
    with pytest.raises(RetrofitError, match=r"image \d+ \('.*test/cat/cut.jpg'\) is unreadable \(OSError"):
        list(make_dataloader(data, processor(), batch_size=13))


def test_a_one_class_folder_is_labelled_and_a_folder_without_class_folders_says_why(imagefolder, tmp_path):
    """datasets' imagefolder gives no labels to one class folder, nor to images outside class folders or at several
    depths: the first is a class all the same, the others one line (not "no column 'label'")."""
    one = tmp_path / "one"
    for split in ("train", "test"):
        shutil.copytree(imagefolder / split / "cat", one / split / "cat")
    data = load_split(str(one), "test")
    assert class_names(data) == ["cat"] and data["label"] == [0] * 4
    assert load_split(str(one), "test", label_column=None).column_names == ["image"]
    nested = tmp_path / "nested"
    shutil.copytree(imagefolder, nested)
    (nested / "test" / "cat" / "more").mkdir()
    shutil.copy(imagefolder / "test" / "cat" / "0.png", nested / "test" / "cat" / "more" / "0.png")
    with pytest.raises(RetrofitError, match=r"no class labels.*'test/bird/0.png' and 'test/cat/more/0.png' lie at"):
        load_split(str(nested), "test")
    flat = tmp_path / "flat"
    shutil.copytree(imagefolder / "test" / "cat", flat / "test")
    with pytest.raises(RetrofitError, match=r"no class labels.*'test/0.png' lies in no class folder"):
        load_split(str(flat), "test")
    deep = tmp_path / "deep"  # CLASS/photos/IMAGE: every image's own folder is 'photos'
    for name in ("bird", "cat"):
        shutil.copytree(imagefolder / "test" / name, deep / name / "photos")
    with pytest.raises(RetrofitError, match=r"no class labels.*one name, 'photos' \('bird/photos/0.png' and 'cat/"):
        load_split(str(deep), "train")
    listed = tmp_path / "listed"  # class folders, and a metadata.csv (file names only) that turns their classes off
    shutil.copytree(imagefolder / "test", listed)
    names = sorted(path.relative_to(listed).as_posix() for path in listed.glob("*/*.png"))
    (listed / "metadata.csv").write_text("file_name\n" + "\n".join(names) + "\n")
    with pytest.raises(RetrofitError, match=r"no class labels: its 'metadata.csv' has no label column, and datasets"):
        load_split(str(listed), "train")  # was: "the images of another split lie at another depth"


def test_a_class_folder_named_like_a_split_is_refused_not_read_as_a_split(tmp_path):
    """datasets takes a folder named train, test, val, ... anywhere for a split, class folders too: CIFAR-100's
    class 'train' put test/train/ into the train split as well, and in a flat folder made a train split of that class
    alone, the other classes read by none. Both are one line naming an image; hidden folders stay ignored."""
    from PIL import Image

    def folder(root: Path, places: list[str]) -> str:
        for place in places:
            (root / place).mkdir(parents=True)
            for index in range(2):
                Image.fromarray(np.full((8, 8, 3), 40 * index, np.uint8)).save(root / place / f"{index}.png")
        return str(root)

    split = folder(tmp_path / "split", ["train/bus", "train/train", "test/bus", "test/train"])
    with pytest.raises(RetrofitError, match="'test/train/0.png' of .* is in both its train and test splits"):
        load_split(split, "train")
    flat = folder(tmp_path / "flat", ["bus", "train"])
    with pytest.raises(RetrofitError, match=r"'bus/0.png' of image folder .* is in none of its splits \(train\)"):
        load_split(flat, "train")
    named = folder(tmp_path / "named", ["bus", "car"])  # a photo named test_*.png made a test split of itself alone
    shutil.copy(Path(named) / "car" / "0.png", Path(named) / "car" / "test_drive.png")
    with pytest.raises(RetrofitError, match=r"in none of its splits \(test\).* e.g. 'car/test_drive.png' as test;"):
        load_split(named, "test")
    # every photo named like a split: two splits of file names, each image in one, and finetune --holdout read half
    for index, image in enumerate(sorted((tmp_path / "named").rglob("*.png"))):
        image.rename(image.with_name(f"{('train', 'test')[index % 2]}_{index}.png"))
    with pytest.raises(RetrofitError, match=r"'\w+/(train|test)[\w.]+png' of .* is read as its \w+ split for its file"):
        load_split(named, "train")
    hidden = folder(tmp_path / "hidden", ["bus", "car [old]", ".thumbnails", "__MACOSX"])
    data = load_split(hidden, "train")
    assert class_names(data) == ["bus", "car [old]"] and data["label"] == [0, 0, 1, 1]
    for photo in ("IMG_0001.HEIC", "IMG_0002.mpo"):  # (PIL reads MPO, a camera's JPEG; datasets skips it)
        (tmp_path / "hidden" / "car [old]" / photo).write_bytes(b"a camera's photo")
        kind = Path(photo).suffix[1:].upper()
        with pytest.raises(RetrofitError, match=rf"'car \[old\]/{photo}' of image folder .* is an image in {kind} fo"):
            load_split(hidden, "train")
        (tmp_path / "hidden" / "car [old]" / photo).unlink()
    twice = tmp_path / "twice"  # a metadata.csv naming one image twice (two labels): it counted twice
    shutil.copytree(Path(hidden) / "bus", twice / "test")
    (twice / "test" / "metadata.csv").write_text("file_name,label\n0.png,bus\n1.png,bus\n0.png,car\n")
    with pytest.raises(RetrofitError, match=r"image 'test/0.png' of image folder .* is in its test split twice"):
        load_split(str(twice), "test")
    (tmp_path / "linked").mkdir()
    (tmp_path / "linked" / "bus").symlink_to(Path(hidden) / "bus", target_is_directory=True)
    shutil.copytree(Path(hidden) / "car [old]", tmp_path / "linked" / "car")
    with pytest.raises(RetrofitError, match=r"'bus' of image folder .* is a link to a folder, which datasets'"):
        load_split(str(tmp_path / "linked"), "train")  # datasets would read the class car alone
    (tmp_path / "linked" / "bus").unlink()
    (tmp_path / "linked" / "car" / "moved.png").symlink_to(tmp_path / "nowhere.png")  # a link to a file moved away
    with pytest.raises(RetrofitError, match=r"'car/moved.png' of image folder .* is a link to '.*nowhere.png', which"):
        load_split(str(tmp_path / "linked"), "train")  # datasets would leave it out without a word
    shutil.copytree(hidden, tmp_path / "photos [2023]")  # brackets in a class folder are fine, not in its path
    with pytest.raises(RetrofitError, match=r"'.*photos \[2023\]', whose \[ \] datasets reads as a file pattern"):
        load_split(str(tmp_path / "photos [2023]"), "train")


def test_a_folder_written_by_save_to_disk_is_read(imagefolder, tmp_path):
    import datasets

    splits = datasets.load_dataset("imagefolder", data_dir=str(imagefolder))
    splits.save_to_disk(str(tmp_path / "all"))
    splits["test"].save_to_disk(str(tmp_path / "test-only"))
    for folder in ("all", "test-only"):
        data = load_split(str(tmp_path / folder), "validation")
        assert len(data) == 12 and class_names(data) == ["bird", "cat", "dog"] and data[0]["image"].size == (32, 32)
    with pytest.raises(RetrofitError, match="has no split 'train'; available: test"):
        load_split(str(tmp_path / "test-only"), "train")
    # a slice saved as it was loaded: its split is named 'test[:5]', which no --split matched but 'test[:5]' itself
    datasets.load_dataset("imagefolder", data_dir=str(imagefolder), split="test[:5]").save_to_disk(
        str(tmp_path / "cut")
    )
    assert len(load_split(str(tmp_path / "cut"), "test")) == 5
    (tmp_path / "tables").mkdir()
    splits["test"].to_parquet(str(tmp_path / "tables" / "test.parquet"))
    with pytest.raises(RetrofitError, match="'.*tables' holds no image files"):
        load_split(str(tmp_path / "tables"), "test")
    with pytest.raises(RetrofitError, match="'.*test.parquet' is a file, not a folder; pass .* save_to_disk"):
        load_split(str(tmp_path / "tables" / "test.parquet"), "test")


def test_a_saved_split_holding_image_paths_or_bytes_is_read_and_a_text_column_is_refused(imagefolder, tmp_path):
    """A save_to_disk folder written without an Image feature holds its images as paths (text) or encoded bytes:
    both are its images, read without writing anything into the folder; text that names no file is no image."""
    import PIL.Image
    from datasets import Dataset, Image

    paths = sorted(str(path) for path in (imagefolder / "test").glob("*/*.png"))
    labels = [["bird", "cat", "dog"].index(Path(path).parent.name) for path in paths]
    captions = ["a photo"] * len(paths)
    Dataset.from_dict({"file": paths, "label": labels, "caption": captions}).save_to_disk(str(tmp_path / "paths"))
    encoded = [Path(path).read_bytes() for path in paths]
    Dataset.from_dict({"png": encoded, "label": labels}).save_to_disk(str(tmp_path / "bytes"))
    before = {folder: sorted(p.name for p in (tmp_path / folder).iterdir()) for folder in ("paths", "bytes")}
    for folder, column in (("paths", "file"), ("bytes", "png")):
        data = load_split(str(tmp_path / folder), "train", image_column=column)
        assert data.column_names == ["image", "label"] and data["label"] == labels
        for index in (0, len(paths) - 1):
            assert np.array_equal(np.asarray(data[index]["image"]), np.asarray(PIL.Image.open(paths[index])))
        batch = next(iter(make_dataloader(data, processor(), batch_size=len(paths))))
        assert batch["pixel_values"].shape == (len(paths), 3, 32, 32) and batch["labels"].tolist() == labels
    undecoded = Dataset.from_dict({"image": paths, "label": labels}).cast_column("image", Image(decode=False))
    undecoded.save_to_disk(str(tmp_path / "undecoded"))  # saved with Image(decode=False): still its images
    batch = next(iter(make_dataloader(load_split(str(tmp_path / "undecoded"), "train"), processor(), batch_size=2)))
    assert batch["pixel_values"].shape == (2, 3, 32, 32)
    assert {folder: sorted(p.name for p in (tmp_path / folder).iterdir()) for folder in before} == before
    with pytest.raises(RetrofitError, match="column 'caption' .* holds text, not images: example 0 is 'a photo'"):
        load_split(str(tmp_path / "paths"), "train", image_column="caption", label_column=None)
    Dataset.from_dict({"png": [encoded[0], None, b"GIF89a"]}).save_to_disk(str(tmp_path / "gaps"))
    with pytest.raises(RetrofitError, match=r"image 1 in '.*gaps' is missing \(the example has no image\)"):
        load_split(str(tmp_path / "gaps"), "train", image_column="png", label_column=None)
    Dataset.from_dict({"png": [encoded[0], b"GIF89a"]}).save_to_disk(str(tmp_path / "cut"))
    with pytest.raises(RetrofitError, match=r"image 1 \(stored as bytes\) in '.*cut' is unreadable \(\w+: .*\);"):
        load_split(str(tmp_path / "cut"), "train", image_column="png", label_column=None)


def test_class_names_match_a_models_labels_whatever_their_unicode_form():
    """A folder named on macOS holds "café" decomposed (NFD); the model's label is composed (NFC): the same class."""
    import unicodedata

    from datasets import ClassLabel, Dataset, Features, Value

    from retrofit.data import dataset_label_map

    model = {0: "dog", 1: unicodedata.normalize("NFC", "café")}
    decomposed = unicodedata.normalize("NFD", "café")
    by_id = Dataset.from_dict({"label": [0, 1]}, features=Features({"label": ClassLabel(names=[decomposed, "dog"])}))
    assert dataset_label_map(model, by_id, "mac") == {0: 1, 1: 0}
    by_text = Dataset.from_dict({"label": [decomposed, "dog"]}, features=Features({"label": Value("string")}))
    assert dataset_label_map(model, by_text, "mac") == {decomposed: 1, "dog": 0}


def test_placeholder_labels_take_the_datas_ids_only_for_as_many_classes():
    """A model whose labels are transformers' placeholders (LABEL_0, ...) takes a ClassLabel's ids as they are where
    the data has as many classes; data of another number of classes is refused by name, not scored by id."""
    from datasets import ClassLabel, Dataset, Features

    from retrofit.data import dataset_label_map

    generic = {i: f"LABEL_{i}" for i in range(3)}

    def classes(*names: str) -> Dataset:
        return Dataset.from_dict({"label": [0, 1]}, features=Features({"label": ClassLabel(names=list(names))}))

    assert dataset_label_map(generic, classes("a", "b", "c"), "abc") is None
    with pytest.raises(RetrofitError, match=r"the class names in 'ab' \(2, e.g. \['a', 'b'\]\) are not among"):
        dataset_label_map(generic, classes("a", "b"), "ab")


def test_a_class_name_the_model_gives_two_ids_keeps_the_datas_id_or_is_refused():
    """ImageNet's labels name "crane" twice (the bird, 134, and the machine, 517): mapped by name, every crane of the
    data became 517, silently (wrong accuracy; a fine-tune taught the bird as the machine). A ClassLabel whose id of
    that name is one of the model's ids of that name keeps it; a name that cannot be told apart is one line."""
    from datasets import ClassLabel, Dataset, Features, Value

    from retrofit.data import dataset_label_map

    model = {0: "crane", 1: "dog", 2: "crane", 3: "cat"}

    def classes(*names: str) -> Dataset:
        return Dataset.from_dict({"label": [0, 1]}, features=Features({"label": ClassLabel(names=list(names))}))

    assert dataset_label_map(model, classes("crane", "dog"), "imagenet") is None  # the data's ids are the model's
    assert dataset_label_map(model, classes("dog", "cat", "crane"), "imagenet") == {0: 1, 1: 3, 2: 2}
    refused = r"^the class 'crane' of 'imagenet' is the name of 2 of the model's labels \(ids 0, 2\), so which"
    for labels, features in (
        (["crane", "dog"], Features({"label": Value("string")})),
        ([0, 1], Features({"label": ClassLabel(names=["dog", "crane"])})),  # its crane is 1: the model's 0 or 2?
    ):
        dataset = Dataset.from_dict({"label": labels}, features=features)
        with pytest.raises(RetrofitError, match=refused):
            dataset_label_map(model, dataset, "imagenet")


def test_a_new_head_takes_text_labels_and_its_evaluation_split_is_mapped_by_name(tmp_path):
    """``--num-labels`` (a new head for the data's classes): a split of text labels (a metadata.csv of class names)
    was refused, telling the user to pass the --num-labels they had passed; and the evaluation split's ids went to
    the head unmapped, so a test split whose ClassLabel lacks a class (its ids [a, c]) scored every c as b:
    silently wrong accuracy."""
    import datasets
    from conftest import TINY
    from PIL import Image
    from transformers import ViTConfig, ViTForImageClassification

    from retrofit.settings import TrainingRun
    from retrofit.train import training_data

    def split(labels: list, names: list[str] | None = None) -> datasets.Dataset:
        label = datasets.ClassLabel(names=names) if names else datasets.Value("string")
        features = datasets.Features({"image": datasets.Image(), "label": label})
        return datasets.Dataset.from_dict(
            {"image": [Image.new("RGB", (8, 8))] * len(labels), "label": labels}, features
        )

    def labels(loader) -> list[int]:
        return [int(label) for batch in loader for label in batch["labels"]]

    named = datasets.DatasetDict(train=split([0, 1, 2, 1], ["a", "b", "c"]), test=split([0, 1, 1], ["a", "c"]))
    named.save_to_disk(str(tmp_path / "named"))
    text = datasets.DatasetDict(train=split(["dog", "cat", "bird", "dog"]), test=split(["bird", "dog", "cat"]))
    text.save_to_disk(str(tmp_path / "text"))
    cases = (
        ("named", ["a", "b", "c"], [0, 1, 1, 2], [0, 2, 2]),
        ("text", ["bird", "cat", "dog"], [0, 1, 2, 2], [0, 2, 1]),
    )
    for data, classes, trained, scored in cases:
        model = ViTForImageClassification(ViTConfig(**TINY))
        run = TrainingRun(data=str(tmp_path / data), loss="ce", num_labels=3, batch_size=2)
        train, evaluation = training_data(model, processor(), run)
        assert list(model.config.id2label.values()) == classes
        assert sorted(labels(train)) == trained  # shuffled
        assert labels(evaluation) == scored


def test_a_class_only_another_split_holds_does_not_refuse_this_one(imagefolder, tmp_path):
    """An image folder's ClassLabel names the classes of all its splits: with a class in test/ alone (fish), the
    train split of a cat/dog/bird model's classes was refused for 'fish', which none of its images is."""
    from retrofit.data import dataset_label_map

    folder = tmp_path / "fishy"
    shutil.copytree(imagefolder, folder)
    shutil.copytree(imagefolder / "test" / "cat", folder / "test" / "fish")
    model = {0: "cat", 1: "dog", 2: "bird"}
    train = load_split(str(folder), "train")
    assert class_names(train) == ["bird", "cat", "dog", "fish"]
    label_map = dataset_label_map(model, train, "fishy")
    assert label_map == {0: 2, 1: 0, 2: 1} and sorted({label_map[label] for label in train["label"]}) == [0, 1, 2]
    with pytest.raises(RetrofitError, match=r"the class names in 'fishy' \(4, e.g. \['fish'\]\) are not among"):
        dataset_label_map(model, load_split(str(folder), "test"), "fishy")


def test_a_recipe_giving_a_classifier_a_new_head_does_not_score_its_old_one(tiny_vit, tmp_path):
    """``training.num_labels`` on a classifier: the baseline row scored the source's own head (cat, dog, bird as
    ids 0, 1, 2) against labels in the new head's ids (the data's bird, cat, dog), and the merged row before
    training the zeroed new head: two accuracies in the table and the card that measured nothing."""
    from retrofit.recipes import run_recipe

    data = make_imagefolder(tmp_path / "colours", per_class=2, test_per_class=2)
    recipe = tmp_path / "head.yaml"
    recipe.write_text(
        f"source: {tiny_vit}\nmerge: {{after_layer: 2, tokens: 4}}\ndata: {{name: {data}}}\n"
        "training: {loss: ce, num_labels: 3, max_steps: 1, batch_size: 6}\nevaluation: {speed: false}\n"
    )
    summary = run_recipe(recipe, {"export.output": str(tmp_path / "out")}, log=lambda line: None)
    baseline, trained = summary["rows"][0], summary["rows"][-1]
    assert len(summary["rows"]) == 2 and "(--num-labels gives a new head: not scored)" in baseline["model"]
    assert baseline.get("accuracy") is None and trained["accuracy"] is not None


def test_a_dollar_name_in_an_image_folder_is_refused_not_read_as_another_path(tmp_path, monkeypatch):
    """datasets expands environment variables in local files' paths (`os.path.expandvars`): a class folder 'a$EMPTY'
    was refused as "in none of its splits ... named like a split", one named 'b$WHERE' as "cannot load dataset ... No
    such file '.../b/elsewhere/0.png'", a data folder '$WHERE' as holding images in none of the splits (datasets read
    the folder 'other'): each refusal named a wrong cause."""
    from PIL import Image

    monkeypatch.setenv("EMPTY", "")
    monkeypatch.setenv("WHERE", "/elsewhere")
    for folder, variable in (("a$EMPTY", "$EMPTY"), ("b$WHERE", "$WHERE")):
        root = tmp_path / variable[1:]
        for name in ("a", "b", folder):
            (root / name).mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (4, 4)).save(root / name / "0.png")
        with pytest.raises(RetrofitError, match=rf"^image '{re.escape(folder)}/0.png' of .* has \{variable} in its"):
            load_split(str(root), "train")
    monkeypatch.setenv("WHERE", "other")  # the folder itself: the image folder 'other' would be read instead
    for root in ("other", "$WHERE"):
        for name in ("a", "b"):
            (tmp_path / root / name).mkdir(parents=True)
            Image.new("RGB", (4, 4)).save(tmp_path / root / name / "0.png")
    with pytest.raises(RetrofitError, match=r"lies at '.*/\$WHERE', whose \$WHERE datasets replaces with"):
        load_split(str(tmp_path / "$WHERE"), "train")


def test_a_backslash_in_an_image_name_is_named(tmp_path):
    """A file name with a backslash (legal on Linux) left datasets without classes for the folder, and the refusal
    blamed "the images of another split" at "another depth" in a folder of one split, every image at one depth."""
    from PIL import Image

    for name in ("cat", "dog"):
        (tmp_path / "data" / "test" / name).mkdir(parents=True)
        Image.new("RGB", (4, 4)).save(tmp_path / "data" / "test" / name / "0.png")
    Image.new("RGB", (4, 4)).save(tmp_path / "data" / "test" / "cat" / "scan\\2.png")
    with pytest.raises(RetrofitError, match=r"^image 'test/cat/scan\\2.png' of image folder .* has a backslash in its"):
        load_split(str(tmp_path / "data"), "test")


def test_reading_a_saved_folder_writes_nothing_into_it(tmp_path):
    """datasets writes the cache files of a shuffle, a select, a cast or `unique` of a dataset loaded from files next
    to those files: --sample, a new head's text classes (``split_classes``) and the label checks left
    cache-*.arrow files in the user's save_to_disk folder."""
    import datasets
    from PIL import Image

    from retrofit.data import dataset_label_map, named_classes

    images = [Image.new("RGB", (4, 4), (index * 40, 0, 0)) for index in range(6)]
    for name, labels in (("ids", [0, 1, 2, 0, 1, 2]), ("names", ["cat", "dog", "bird", "cat", "dog", "bird"])):
        folder = tmp_path / name
        datasets.Dataset.from_dict({"image": images, "label": labels}).save_to_disk(str(folder))
        before = sorted(folder.iterdir())
        for sample_seed in (None, 3):
            data = load_split(str(folder), "train", limit=2, sample_seed=sample_seed, split_classes=True)
            assert len(data) == 2 and len(named_classes(data) or [0, 1, 2]) == 3
            dataset_label_map({0: "cat", 1: "dog", 2: "bird"}, data, name)
        assert sorted(folder.iterdir()) == before


def test_split_folders_without_class_folders_are_not_read_as_two_classes(imagefolder, tmp_path):
    """train/IMAGE and test/IMAGE (with a metadata.csv beside the split folders, or none): datasets labelled every
    image by its split folder, ClassLabel ['test', 'train'], so a --num-labels 2 fine-tune learnt to tell the splits
    apart and a two-class model was scored against 'train' = 1 without a word."""
    root = tmp_path / "flat-splits"
    rows = ["file_name,label"]
    for split in ("train", "test"):
        shutil.copytree(imagefolder / split / "cat", root / split)
        rows += [f"{split}/{path.name},cat" for path in sorted((root / split).glob("*.png"))]
    for metadata in (False, True):
        if metadata:
            (root / "metadata.csv").write_text("\n".join(rows) + "\n")
        for split in ("train", "test"):
            with pytest.raises(RetrofitError, match=r"gives its images the classes 'test', 'train': datasets took its"):
                load_split(str(root), split)
    for split in ("training", "testing"):  # split folders named otherwise: classes 'testing', 'training'
        shutil.copytree(imagefolder / "test" / "cat", tmp_path / "named" / split)
    with pytest.raises(RetrofitError, match=r"the classes 'testing', 'training': datasets took its split folders"):
        load_split(str(tmp_path / "named"), "train")


def test_a_class_made_of_several_folders_is_said(imagefolder, tmp_path):
    """CLASS/YEAR/IMAGE (cat/2019, dog/2019, ...): datasets takes the folder holding each image for its class, so
    cats and dogs of one year were one class, '2019', without a word (a new head learnt the years). Which folder is
    the class cannot be told (batch1/cat, batch2/cat is the other way round), so one note says it."""
    root = tmp_path / "years"
    for name in ("cat", "dog"):
        for year in ("2019", "2020"):
            shutil.copytree(imagefolder / "test" / name, root / name / year)
    notes: list[str] = []
    data = load_split(str(root), "train", log=notes.append)
    assert class_names(data) == ["2019", "2020"] and len(notes) == 1
    assert "the images of 'cat/2019' and 'dog/2019' in '" in notes[0] and "are all one class, '2019'" in notes[0]
    load_split(str(imagefolder), "train", log=notes.append)  # one folder per class: nothing to say
    assert len(notes) == 1


def test_pretraining_takes_text_labels_as_class_names(imagefolder, tmp_path):
    """A metadata.csv of class names: evaluate and finetune read them, pretrain refused them ("has no class names
    (ClassLabel)"). The ViT's labels are their sorted names, as a new head's are."""
    from retrofit.finetune import pretrain

    data = make_labelled_folder(tmp_path / "named", imagefolder, ["dog", "cat", "bird", "dog", "cat", "bird"])
    model = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32,
             "image_size": 16, "patch_size": 8}  # fmt: skip
    result = pretrain(model, output=tmp_path / "vit", data=data, eval_split=None, max_steps=1, min_steps=1,
                      batch_size=2, progress=False, log=lambda line: None)  # fmt: skip
    assert result.model.config.id2label == {0: "bird", 1: "cat", 2: "dog"} and result.steps == 1


def test_a_pretraining_with_holdout_records_that_its_accuracy_is_on_the_held_out_images(imagefolder, tmp_path):
    """training.json's eval_split said 'test' beside an accuracy `pretrain --holdout` measured on images held out of
    train."""
    from retrofit.finetune import pretrain

    model = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32,
             "image_size": 16, "patch_size": 8}  # fmt: skip
    result = pretrain(model, output=tmp_path / "vit", data=str(imagefolder), holdout=0.25, max_steps=1, min_steps=1,
                      batch_size=2, progress=False, log=lambda line: None)  # fmt: skip
    info = json.loads((tmp_path / "vit" / "training.json").read_text())
    assert result.final_accuracy is not None and info["accuracy"] == result.final_accuracy
    assert info["eval_split"] == "train, the 25 % held out of training (--holdout 0.25)"
    assert info["settings"]["eval_split"] == info["eval_split"]  # not the unused default 'test' beside it


def test_a_model_of_other_than_1_or_3_channels_is_refused_data_in_one_line_naming_why(tmp_path, capsys):
    """A 4-channel model was refused with "image 0 is unreadable (mean must have 3 elements ...); fix the dataset":
    the dataset was fine, and the data path reads images as RGB or grey. convert without data still works."""
    from PIL import Image
    from transformers import ViTConfig, ViTForImageClassification

    source = tmp_path / "rgba"
    config = ViTConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
                       image_size=32, patch_size=8, num_channels=4, num_labels=2)  # fmt: skip
    ViTForImageClassification(config).save_pretrained(source)
    ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 4, image_std=[0.5] * 4).save_pretrained(
        source
    )
    for split in ("train", "test"):
        for name in ("a", "b"):
            (tmp_path / "images" / split / name).mkdir(parents=True)
            Image.new("RGB", (32, 32)).save(tmp_path / "images" / split / name / "0.png")
    data, out = str(tmp_path / "images"), tmp_path / "rgba-pm"
    merge = ["--after-layer", "1", "--tokens", "4"]
    for argv in (
        ["evaluate", str(source), "--data", data],
        ["convert", str(source), *merge, "--calibrate-on", data, "--output", str(out)],
    ):
        capsys.readouterr()
        assert main(argv) == 2
        error = capsys.readouterr().err
        assert error.count("\n") == 1 and "takes 4-channel images" in error and "fix the dataset" not in error, error
        assert not out.exists()
    assert main(["convert", str(source), *merge, "--output", str(out)]) == 0 and (out / "config.json").is_file()


# ----------------------------------------------------------------------------------------------------------------
# --holdout: evaluation images held out of a split, for data with no evaluation split of its own
# ----------------------------------------------------------------------------------------------------------------


def _pixels(dataset) -> list[bytes]:
    return [np.asarray(image).tobytes() for image in dataset["image"]]


def test_holdout_keeps_each_class_share_out_of_training_the_same_every_time(imagefolder):
    """The held-out images and the rest partition the split, each class keeps its share on both sides, the same
    images come back whoever asks (kd reads no labels; --eval-limit takes some of them); too few images is one line."""
    whole = load_split(str(imagefolder), "train")  # 3 classes x 8 images
    held = load_split(str(imagefolder), "train", holdout=0.25, held=True)
    rest = load_split(str(imagefolder), "train", holdout=0.25)
    assert sorted(held["label"]) == [0, 0, 1, 1, 2, 2] and sorted(rest["label"]) == sorted([0, 1, 2] * 6)
    assert sorted(_pixels(held) + _pixels(rest)) == sorted(_pixels(whole))  # disjoint, and nothing left out
    unlabelled = load_split(str(imagefolder), "train", label_column=None, holdout=0.25, held=True)
    assert unlabelled.column_names == ["image"] and _pixels(unlabelled) == _pixels(held)
    assert _pixels(load_split(str(imagefolder), "train", holdout=0.25, held=True, limit=4)) == _pixels(held)[:4]
    too_few = r"--holdout {} of split 'train' of .* \(24 images\) would hold out {} and train on {}, and each side"
    with pytest.raises(RetrofitError, match=too_few.format(0.05, 2, 22) + " needs at least one image of each of the 3"):
        load_split(str(imagefolder), "train", holdout=0.05, held=True)  # 2 images for 3 classes
    with pytest.raises(RetrofitError, match=too_few.format(0.99, 24, 0)):
        load_split(str(imagefolder), "train", holdout=0.99)


def test_an_image_folder_is_read_once_while_it_stays_the_same(imagefolder, tmp_path, monkeypatch):
    """datasets globs every file of an image folder at each load (25 s for 20,000 images) and retrofit opened each
    image again; a command loads its splits several times. A folder is read once, and again once it changes: an image
    added is in the split, an image broken since is one line."""
    import datasets
    from PIL import Image

    folder = tmp_path / "colours"
    shutil.copytree(imagefolder, folder)
    reads = []
    real = datasets.load_dataset
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: reads.append(k.get("data_dir")) or real(*a, **k))
    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda *a, **k: opened.append(a[0]) or real_open(*a, **k))
    first = load_split(str(folder), "train")
    assert load_split(str(folder), "test", limit=2) and load_split(str(folder), "train", holdout=0.25)
    assert load_split(str(folder), "test")
    assert len(reads) == 1 and len(opened) == len(first) + 2 + 12  # train's images once, test's first 2, then all
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(folder / "train" / "cat" / "new.png")
    assert len(load_split(str(folder), "train")) == len(first) + 1 and len(reads) == 2
    (folder / "train" / "dog" / "0.png").write_bytes(b"not an image")
    with pytest.raises(RetrofitError, match=r"image \d+ \('.*0.png'\) in '.*' is unreadable"):
        load_split(str(folder), "train")


def test_a_folder_changed_during_a_command_keeps_its_held_out_images_out_of_training(
    tiny_vit, imagefolder, tmp_path, monkeypatch
):
    """Images added to a folder while `finetune --holdout` ran (after its training load, before its evaluation load)
    made the evaluation load draw the held-out images anew: 3 of 12 had been trained on. A command reads each folder
    once; the next command reads it as it is then."""
    from PIL import Image

    import retrofit.data

    folder = tmp_path / "growing"
    shutil.copytree(imagefolder / "train", folder / "train")
    read, reads = [], []
    made, local_splits = retrofit.data.make_dataloader, retrofit.data._local_splits
    monkeypatch.setattr(retrofit.data, "make_dataloader", lambda dataset, *a, **k: read.append(dataset) or made(
        dataset, *a, **k))  # fmt: skip

    def then_more_images(*args):  # another process adds images once the run has read the folder
        reads.append(local_splits(*args))
        for name in ("cat", "dog", "bird"):
            for index in range(4):
                Image.fromarray(np.full((32, 32, 3), 40 * index, np.uint8)).save(
                    folder / "train" / name / f"n{index}.png"
                )
        return reads[-1]

    monkeypatch.setattr(retrofit.data, "_local_splits", then_more_images)
    argv = [
        "finetune",
        str(tiny_vit),
        "--after-layer",
        "2",
        "--tokens",
        "4",
        "--data",
        str(folder),
        "--holdout",
        "0.25",
        "--max-steps",
        "1",
        "--min-steps",
        "0",
        "--batch-size",
        "6",
        "--output",
        str(tmp_path / "out"),
    ]
    assert main(argv) == 0
    assert [len(dataset) for dataset in read] == [18, 6, 18]  # training, evaluation, then calibration's images
    assert not set(_pixels(read[0])) & set(_pixels(read[1]))  # none of the images scored was trained on
    assert [len(splits["train"]) for splits in reads] == [24, 24]  # each load: the folder as the command first read it
    monkeypatch.setattr(retrofit.data, "_local_splits", local_splits)
    assert len(load_split(str(folder), "train")) == 24 + 12  # after the command: the folder as it is now


def test_a_save_to_disk_folder_is_checked_once_while_it_and_its_images_stay_the_same(
    imagefolder, tmp_path, monkeypatch
):
    """Every load of a save_to_disk folder opened each of its images again (1.7 s for 20,000; ImageNet's 1.28 M, a
    minute and a half per load, several per command). Images stored in it are opened once while the folder stays the
    same; images it names by path, files that may change apart from it, at each load."""
    import datasets
    from PIL import Image

    saved = tmp_path / "saved"
    datasets.load_dataset("imagefolder", data_dir=str(imagefolder)).save_to_disk(str(saved))  # images stored in it
    external = tmp_path / "external"
    shutil.copytree(imagefolder / "test", external)
    files = sorted(str(path) for path in external.glob("*/*.png"))
    datasets.Dataset.from_dict({"file": files, "label": [0] * len(files)}).save_to_disk(str(tmp_path / "paths"))
    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda *a, **k: opened.append(a[0]) or real_open(*a, **k))
    first = load_split(str(saved), "train")
    assert len(load_split(str(saved), "train")) == len(first) and len(opened) == len(first)
    opened.clear()
    assert load_split(str(tmp_path / "paths"), "train", image_column="file")
    assert load_split(str(tmp_path / "paths"), "train", image_column="file") and len(opened) == 2 * len(files)
    Path(files[1]).write_bytes(b"not an image")  # a file the saved folder names, changed apart from it
    with pytest.raises(RetrofitError, match=r"image 1 \('.*external.*'\) in '.*paths' is unreadable"):
        load_split(str(tmp_path / "paths"), "train", image_column="file")
    shutil.rmtree(saved)  # the folder saved again, with an image that does not decode
    features = datasets.Features({"image": datasets.Image(), "label": first.features["label"]})
    broken = datasets.Dataset.from_dict({"image": [{"bytes": b"GIF89a", "path": None}], "label": [0]}, features)
    broken.save_to_disk(str(saved))
    with pytest.raises(RetrofitError, match=r"image 0 \(stored as bytes\) in '.*saved' is unreadable"):
        load_split(str(saved), "train")


def test_holdout_is_datasets_own_split_without_reading_the_labels_row_by_row(imagefolder, monkeypatch):
    """The held-out images are those `train_test_split` picks (its seeded, stratified draw, fed the classes at once:
    it read Fashion-MNIST's labels row by row, 16 s), and the same where a later datasets moves that draw."""
    import sys

    whole = load_split(str(imagefolder), "train")
    theirs = whole.train_test_split(test_size=0.25, seed=HOLDOUT_SEED, stratify_by_column="label")
    assert _pixels(load_split(str(imagefolder), "train", holdout=0.25, held=True)) == _pixels(theirs["test"])
    monkeypatch.setitem(sys.modules, "datasets.utils.stratify", None)  # import fails: train_test_split itself
    assert _pixels(load_split(str(imagefolder), "train", holdout=0.25)) == _pixels(theirs["train"])


@pytest.mark.parametrize("labels", [["cat", "dog", "bird"] * 4, [3, 7, 11] * 4], ids=["text", "integer"])
def test_holdout_stratifies_labels_that_are_not_a_class_label(imagefolder, tmp_path, labels):
    """A metadata.csv of text (or integer) labels is no ClassLabel, and datasets stratifies only by one: its held-out
    images were drawn at random, and a small split could hold a class out whole or not at all."""
    folder = make_labelled_folder(tmp_path / "labelled", imagefolder, labels)
    held = load_split(folder, "train", holdout=0.5, held=True)
    rest = load_split(folder, "train", holdout=0.5)
    assert sorted(held["label"]) == sorted(rest["label"]) == sorted(labels[:6])  # 2 of each class on each side
    assert sorted(_pixels(held) + _pixels(rest)) == sorted(_pixels(load_split(folder, "train")))


def test_holdout_keeps_the_same_images_out_whether_a_command_reads_the_labels_or_not(
    tiny_vit, imagefolder, tmp_path, monkeypatch, capsys
):
    """With --label-column, the loads that read no labels (kd training, calibration) held out images by the `label`
    column, or at random without one, and those that read them by the column named: `finetune --holdout` scored
    images it had trained on, and so did sweep and `evaluate` after `convert --calibrate-on`. Every load now holds out
    the images stratified by --label-column."""
    import retrofit.data

    folder = make_labelled_folder(tmp_path / "species", imagefolder, ["cat", "dog", "bird"] * 4)
    metadata = Path(folder) / "metadata.csv"
    metadata.write_text(metadata.read_text().replace("file_name,label", "file_name,species"))
    read = []  # the images of every dataloader made
    made = retrofit.data.make_dataloader
    monkeypatch.setattr(retrofit.data, "make_dataloader", lambda dataset, *a, **k: read.append(dataset) or made(
        dataset, *a, **k))  # fmt: skip
    held = _pixels(load_split(folder, "train", label_column="species", holdout=0.5, held=True))
    common = ["--after-layer", "2", "--tokens", "4", "--label-column", "species", "--holdout", "0.5"]
    runs = {
        "finetune": ["finetune", str(tiny_vit), "--data", folder, *common, "--max-steps", "1", "--min-steps", "0",
                     "--batch-size", "6", "--output", str(tmp_path / "ft")],
        "convert": ["convert", str(tiny_vit), "--calibrate-on", folder, *common, "--calibrate-images", "6",
                    "--output", str(tmp_path / "cv")],
        "sweep": ["sweep", str(tiny_vit), "--data", folder, *common, "--calibrate-images", "6",
                  "--bench-batch-size", "2", "--bench-repeats", "1", "--output", str(tmp_path / "sw")],
    }  # fmt: skip
    for command, argv in runs.items():
        read.clear()
        assert main(argv) == 0, command
        scored = [dataset for dataset in read if sorted(_pixels(dataset)) == sorted(held)]
        started = [dataset for dataset in read if sorted(_pixels(dataset)) != sorted(held)]
        assert started and all(not set(_pixels(dataset)) & set(held) for dataset in started), command
        assert scored or command == "convert", command  # convert scores nothing; `evaluate --holdout` scores `held`
    # a --label-column the data lacks (misspelt) is refused, not held out of at random: those would not be the
    # images `evaluate --holdout` scores as held out
    for command, argv in runs.items():
        argv = ["specie" if value == "species" else value for value in argv[:-1]] + [str(tmp_path / "no")]
        assert main(argv) == 2 and not (tmp_path / "no").exists(), command
        assert "has no column 'specie'; available: image, species" in capsys.readouterr().err, command


def test_finetune_evaluates_on_the_images_holdout_keeps_out_and_evaluate_scores_them_again(
    tiny_vit, imagefolder, tmp_path, capsys
):
    """A folder of class folders, no evaluation split: `finetune --holdout` trains on the rest, scores the held-out
    images, says so on the card, and `evaluate --holdout` scores the same images to the same accuracy."""
    folder = tmp_path / "train-only"
    shutil.copytree(imagefolder / "train", folder / "train")
    out, report = tmp_path / "out", tmp_path / "report.json"
    argv = ["finetune", str(tiny_vit), "--after-layer", "2", "--tokens", "4", "--data", str(folder), "--holdout",
            "0.25", "--loss", "ce", "--max-steps", "2", "--min-steps", "0", "--batch-size", "6",
            "--output", str(out)]  # fmt: skip
    assert main(argv) == 0
    card = (out / "README.md").read_text()
    said = re.search(r"accuracy on `train-only` train, the 25 % held out of training \(--holdout 0.25\) \(all 6 "
                     r"images\): ([\d.]+) %", card)  # fmt: skip
    trained = ("fine-tuned on `train-only` train less the 25 % held out to evaluate on (--holdout 0.25); of the rest, "
               "all 18 images for ")  # fmt: skip
    assert said and trained in card
    # (--holdout's split is the training split, train, unless --split names another)
    assert main(["evaluate", str(out), "--data", str(folder), "--holdout", "0.25", "--json", str(report), "--card",
                 str(out)]) == 0  # fmt: skip
    index = (out / "README.md").read_text().split("model-index:")[1].split("\n---")[0]  # the Hub's results
    assert "name: train-only (all 6 images held out of training (--holdout 0.25))" in index, index
    scored = json.loads(report.read_text())
    assert scored["num_examples"] == 6 and scored["holdout"] == 0.25
    assert f"{100 * scored['models'][0]['top1']:.2f}" == said.group(1)
    assert "all 6 images held out of training (--holdout 0.25)" in capsys.readouterr().out
    capsys.readouterr()
    resumed = [*argv, "--resume"]
    resumed[resumed.index("0.25")] = "0.5"  # other training images: another run
    assert main(resumed) == 2 and "--holdout" in error_line(capsys.readouterr().err)
    for extra, error in ((["--eval-split", "val"], "split 'val'"), (["--holdout", "1"], "must be in (0, 1)")):
        assert main([*argv[:-2], "--output", str(tmp_path / "no"), *extra]) == 2
        assert error in capsys.readouterr().err
    assert not (tmp_path / "no").exists()


def test_reports_and_cards_name_the_split_read_not_the_one_asked(tiny_vit, imagefolder, tmp_path, capsys):
    """Data without the split asked for validation or test is read at the one it has instead; the report, card and
    model-index named the split asked: finetune's default --eval-split test of a folder of train/ and validation/, or
    evaluate's default validation of one of train/ and test/. A sweep scored on its calibration split, and a run
    whose evaluation split turns out to be its training split, are refused."""
    from retrofit.data import read_splits, split_read
    from retrofit.settings import DataSettings

    data = tmp_path / "colours"
    shutil.copytree(imagefolder, data)
    (data / "test").rename(data / "validation")
    out = tmp_path / "ft"
    argv = ["finetune", str(tiny_vit), "--after-layer", "2", "--tokens", "4", "--data", str(data), "--max-steps", "1",
            "--min-steps", "0", "--batch-size", "4", "--no-calibrate", "--output", str(out)]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    card = (out / "README.md").read_text()
    assert "- accuracy on `colours` validation (all 12 images): " in card and "`colours` test" not in card
    capsys.readouterr()
    assert main(["evaluate", str(tiny_vit), "--data", str(imagefolder), "--json", str(tmp_path / "e.json")]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["split"] == "test"  # asked: validation, the default
    assert capsys.readouterr().out.startswith(f"{imagefolder} / test: all 12 images")  # the table's heading too
    assert split_read(str(data), "test") == "validation" and split_read(str(data), "train") == "train"
    assert split_read("fashion-mnist", "validation") == "test" and split_read(str(tmp_path / "none"), "x") == "x"
    with pytest.raises(RetrofitError, match="--eval-split names the training split 'validation'"):
        read_splits(DataSettings(data=str(data), split="validation"))  # its test is validation too
    assert main(["sweep", str(tiny_vit), "--data", str(imagefolder), "--split", "train"]) == 2
    assert "--split names the split calibration and fine-tuning read, 'train'" in capsys.readouterr().err
    # two names of one split: calibrated on the images each setting would be scored on, under another name
    for folder, split, calibrate, read in ((imagefolder, "test", "validation", "test"), (data, "test", "validation",
                                                                                        "validation")):  # fmt: skip
        sweep = ["sweep", str(tiny_vit), "--data", str(folder), "--split", split, "--calibrate-split", calibrate]
        assert main([*sweep, "--output", str(tmp_path / "sweep")]) == 2 and not (tmp_path / "sweep").exists()
        assert f"--split '{split}' and --calibrate-split '{calibrate}' both read the split '{read}' of" in (
            capsys.readouterr().err
        )
    argv = ["convert", str(tiny_vit), "--after-layer", "2", "--tokens", "4", "--output", str(out)]
    assert main([*argv, "--overwrite", "--calibrate-on", str(imagefolder), "--calibrate-split", "validation"]) == 0
    assert "12 images of `colours` (test split, a shuffled sample" in (out / "README.md").read_text()  # as read
