"""Data loading: Fashion-MNIST from Debian's files, image folders, preprocessing, and every bad input."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import HUB_ID
from transformers import ViTImageProcessor

from retrofit.cli import main
from retrofit.data import FASHION_MNIST_CLASSES, class_names, load_split, make_dataloader
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
    assert class_names(data) == FASHION_MNIST_CLASSES
    assert data[0]["image"].size == (28, 28) and data[0]["image"].mode == "L"
    unlabelled = load_split("fashion-mnist", "train", label_column=None, limit=5)
    assert unlabelled.column_names == ["image"] and class_names(unlabelled) is None


@pytest.mark.skipif(not FMNIST.exists(), reason="dataset-fashion-mnist is not installed")
def test_grey_images_become_rgb_and_back():
    data = load_split("fashion-mnist", "test", limit=8)
    rgb = next(iter(make_dataloader(data, processor(32), batch_size=4)))
    assert rgb["pixel_values"].shape == (4, 3, 32, 32) and rgb["labels"].dtype == torch.long
    grey = next(iter(make_dataloader(data, processor(28, 1), batch_size=4)))
    assert grey["pixel_values"].shape == (4, 1, 28, 28)


def test_imagefolder_batches(imagefolder):
    data = load_split(str(imagefolder), "train")
    assert len(data) == 24 and class_names(data) == ["bird", "cat", "dog"]
    batch = next(iter(make_dataloader(data, processor(16), batch_size=5, train=True)))
    assert batch["pixel_values"].shape == (5, 3, 16, 16) and batch["labels"].shape == (5,)
    assert load_split(str(imagefolder), "validation").num_rows == 12  # falls back to test


def test_augmentation_is_a_function_of_seed_epoch_and_index(imagefolder):
    data = load_split(str(imagefolder), "train")
    first = make_dataloader(data, processor(), batch_size=4, augment=True).dataset
    second = make_dataloader(data, processor(), batch_size=4, augment=True).dataset
    assert torch.equal(first[3]["pixel_values"], second[3]["pixel_values"])
    plain = make_dataloader(data, processor(), batch_size=4).dataset
    assert not torch.equal(first[3]["pixel_values"], plain[3]["pixel_values"])
    second.set_epoch(1)
    assert not torch.equal(first[3]["pixel_values"], second[3]["pixel_values"])


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
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 3 and all(line.startswith("retrofit: error:") for line in errors)
    assert "no column 'kind'" in errors[1] and "larger than the data" in errors[2]
    assert not out.exists() and not (tmp_path / "out-checkpoints").exists()


# ----------------------------------------------------------------------------------------------------------------
# Hub datasets: a stand-in Hub id served from local parquet files (the real `datasets` streaming code runs on them)
# ----------------------------------------------------------------------------------------------------------------


def test_a_limited_hub_split_is_streamed_not_downloaded_whole(hub_dataset, tmp_path):
    calls, full = hub_dataset
    part = load_split(HUB_ID, "train", limit=7)
    assert calls == [{"split": "train", "streaming": True}]
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


def test_an_unreachable_hub_stream_is_a_one_line_error(hub_dataset, monkeypatch):
    import datasets

    def offline(path, split=None, streaming=False, **kwargs):
        raise ConnectionError(f"Couldn't reach '{path}' on the Hub (LocalEntryNotFoundError)\nmore lines")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(RetrofitError, match=r"cannot load dataset 'someone/colours' \(ConnectionError") as error:
        load_split(HUB_ID, "train", limit=3)
    assert "\n" not in str(error.value)
