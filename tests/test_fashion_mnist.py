"""The embedded default on real data: the shipped Fashion-MNIST ViT, its exports through `pipeline`, and accuracy won
back by fine-tuning (Debian's dataset-fashion-mnist; skipped where it is not installed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_data import FMNIST
from transformers import pipeline

from retrofit import insert_patch_merger, load_model
from retrofit.calibrate import calibrate_from_data
from retrofit.cli import main
from retrofit.data import FASHION_MNIST_CLASSES, load_split, make_dataloader
from retrofit.evaluation import accuracy
from retrofit.finetune import finetune
from retrofit.loading import load_config, load_image_processor, resolve_source

pytestmark = pytest.mark.skipif(not FMNIST.exists(), reason="dataset-fashion-mnist is not installed")
SOURCE = "retrofit:fashion-mnist-vit"
EVAL_IMAGES = 2000


@pytest.fixture(scope="module")
def test_images():
    source = resolve_source(SOURCE)
    config = load_config(source)
    data = load_split("fashion-mnist", "test", limit=EVAL_IMAGES)
    return data, make_dataloader(data, load_image_processor(source, config), batch_size=500)


@pytest.mark.parametrize("source", [SOURCE, "retrofit:fashion-mnist-vit-wide"])  # tests' baseline, demo's baseline
def test_shipped_baselines_are_the_trained_models(test_images, source):
    data, _ = test_images
    folder = resolve_source(source)
    config = load_config(folder)
    loader = make_dataloader(data, load_image_processor(folder, config), batch_size=500)
    info = json.loads((Path(folder) / "training.json").read_text())
    measured = accuracy(load_model(source), loader)
    assert abs(measured - info["accuracy"]) < 0.02  # 2,000 of the 10,000 test images the recorded number used
    assert config.id2label == dict(enumerate(FASHION_MNIST_CLASSES))


def test_pipeline_on_an_export_agrees_with_retrofits_data_path(test_images, tmp_path, capsys):
    """A grey PIL image through `pipeline` (which converts it to RGB) gives the prediction that retrofit's own
    preprocessing gives: users and the evaluation see the same model."""
    data, loader = test_images
    out = tmp_path / "fm-pm8"
    assert main(["convert", SOURCE, "--after-layer", "3", "--tokens", "8", "--output", str(out)]) == 0
    capsys.readouterr()
    classifier = pipeline("image-classification", model=str(out), trust_remote_code=True)
    images = [data[i]["image"] for i in range(16)]
    assert images[0].mode == "L"
    predicted = [top[0]["label"] for top in classifier(images, top_k=1)]
    merged = load_model(out).eval()
    pixels = next(iter(loader))["pixel_values"][:16]
    with torch.no_grad():
        expected = [merged.config.id2label[i] for i in merged(pixel_values=pixels).logits.argmax(-1).tolist()]
    assert predicted == expected


@pytest.mark.slow
def test_finetuning_wins_back_accuracy(test_images, tmp_path):
    """Merge at L/2 with 8 tokens; a short distillation on real images recovers (most of) the baseline accuracy."""
    _, loader = test_images
    baseline = accuracy(load_model(SOURCE), loader)
    torch.manual_seed(0)
    merged = insert_patch_merger(load_model(SOURCE).eval(), 3, 8, source=SOURCE)
    random_init = accuracy(merged, loader)
    calibrate_from_data(merged, "fashion-mnist", source=SOURCE, log=lambda _: None)
    calibrated = accuracy(merged, loader)
    result = finetune(
        SOURCE,
        output=tmp_path / "out",
        after_layer=3,
        num_tokens=8,
        data="fashion-mnist",
        loss="kd",
        epochs=1,
        min_steps=0,  # one epoch of the 8,000 images, 63 steps: the short run this test is about
        limit=8000,
        lr=5e-4,
        batch_size=128,
        eval_limit=EVAL_IMAGES,
        eval_batch_size=500,
        progress=False,
        save_every=10**6,
        log=lambda _: None,
    )
    recovered = accuracy(load_model(tmp_path / "out"), loader)
    assert recovered == pytest.approx(result.final_accuracy, abs=1e-9)  # the export is the trained model
    assert calibrated >= random_init
    assert recovered > calibrated + 0.01
    assert recovered >= baseline - 0.02, (baseline, random_init, calibrated, recovered)


def test_shipped_clip_does_zero_shot_and_its_export_through_the_pipeline(test_images, tmp_path):
    """The shipped CLIP (pretrained on captions of the class names) has the zero-shot accuracy its training.json
    records; merged and exported, transformers' zero-shot pipeline on grey PIL images predicts what
    `evaluate --zero-shot`'s data path predicts."""
    from retrofit import convert
    from retrofit.evaluation import ZeroShotClassifier
    from retrofit.loading import load_tokenizer
    from retrofit.zero_shot import prompts, text_embeddings

    data, _ = test_images
    source = "retrofit:fashion-mnist-clip"
    folder = resolve_source(source)
    info = json.loads((Path(folder) / "training.json").read_text())
    report = __import__("retrofit").evaluate_models(
        [source], data="fashion-mnist", split="test", limit=EVAL_IMAGES, zero_shot=True, log=lambda _: None
    )
    assert abs(report["models"][0]["top1"] - info["accuracy"]) < 0.02  # 2,000 of the 10,000 images it used

    out = tmp_path / "clip-pm8"
    convert(source, after_layer=3, num_tokens=8, output=out, log=lambda _: None)
    classify = pipeline("zero-shot-image-classification", model=str(out), trust_remote_code=True)
    images = [data[i]["image"] for i in range(16)]
    labels = list(FASHION_MNIST_CLASSES)
    ranked = classify(images, candidate_labels=labels, hypothesis_template="a photo of a {}.")
    predicted = [scores[0]["label"] for scores in ranked]
    merged = load_model(out).eval()
    config = load_config(out)
    texts = text_embeddings(merged, load_tokenizer(out, config), prompts(labels))
    loader = make_dataloader(data.select(range(16)), load_image_processor(out, config), batch_size=16)
    with torch.no_grad():
        logits = ZeroShotClassifier(merged, texts)(next(iter(loader))["pixel_values"]).logits
    assert predicted == [labels[i] for i in logits.argmax(-1).tolist()]
