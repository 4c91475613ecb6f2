"""SigLIP 2 (NaFlex): a Siglip2Model converts to a dual encoder whose merger merges each image's own patches only.

Its vision tower takes each image as patches at its own aspect ratio, a batch padded to one length; the tests feed
the processor's own padded batches. The export reloads without retrofit on every transformers release it supports,
keeps the text tower bit-exact, runs in transformers' zero-shot pipeline; retrofit evaluates, calibrates, fine-tunes
and times it on square images (`retrofit.naflex`).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_families import OLDEST_PYTHON, OVERLAYS, TEXT
from test_zero_shot import images, pipeline_accuracy  # noqa: F401 - the fixture is used by name

from retrofit import convert, finetune
from retrofit.cli import main
from retrofit.evaluation import evaluate_models
from retrofit.naflex import images_to_patches, patches_to_images
from retrofit.surgery import insert_patch_merger

K, M = 2, 3
VISION = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64, patch_size=8)
VISION |= {"num_patches": 16}  # at most 4x4 patches of 8x8 pixels per image


def _siglip2():
    from transformers import Siglip2Config, Siglip2Model

    return Siglip2Model(Siglip2Config(text_config=TEXT, vision_config=VISION))


def tiny_siglip2_tokenizer():
    """A SigLIP 2 (Gemma-style BPE) tokenizer over single characters, built offline: 5 special tokens, then "▁" (a
    space), the lowercase letters, "." and "-"."""
    import string

    from transformers import Siglip2Tokenizer

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4}
    for char in "▁" + string.ascii_lowercase + ".-":
        vocab[char] = len(vocab)
    return Siglip2Tokenizer(vocab=vocab, merges=[])


def _processor():
    from transformers import Siglip2ImageProcessor

    return Siglip2ImageProcessor(patch_size=8, max_num_patches=16)


def padded_batch() -> dict[str, torch.Tensor]:
    """The processor's inputs for a square image (4x4 patches) and a wide one (2x6 = 12 patches, padded to 16)."""
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    square = (torch.rand(32, 32, 3, generator=generator) * 255).to(torch.uint8).numpy()
    wide = (torch.rand(16, 48, 3, generator=generator) * 255).to(torch.uint8).numpy()
    inputs = _processor()([Image.fromarray(square), Image.fromarray(wide)], return_tensors="pt")
    assert inputs["pixel_attention_mask"].sum(1).tolist() == [16, 12]  # the wide image is padded
    return dict(inputs)


@pytest.fixture(scope="module")
def siglip2(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny Siglip2Model checkpoint (NaFlex image processor, sentencepiece tokenizer) and its merged export."""
    root = tmp_path_factory.mktemp("siglip2")
    torch.manual_seed(0)
    source = root / "source"
    _siglip2().save_pretrained(source)
    _processor().save_pretrained(source)
    tiny_siglip2_tokenizer().save_pretrained(source)
    output = root / "merged"
    convert(source, after_layer=K, num_tokens=M, output=output, log=lambda _: None)
    return source, output


def _features(model, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    from test_families import INPUT_IDS

    with torch.no_grad():
        image = model.get_image_features(**inputs)
        text = model.get_text_features(input_ids=INPUT_IDS)
    return getattr(image, "pooler_output", image), getattr(text, "pooler_output", text)


def test_padding_gets_no_weight(siglip2):
    """An image's embedding is the same alone as in a batch where it is padded (SDPA and eager masks): the merger
    merges its own patches only, the pooling head reads all M merged tokens, and padding reaches neither."""
    from transformers import AutoModel

    _, output = siglip2
    model = AutoModel.from_pretrained(output, trust_remote_code=True).eval()
    batch = padded_batch()
    alone = {key: value[1:, :12] for key, value in batch.items() if key != "spatial_shapes"}
    alone["spatial_shapes"] = batch["spatial_shapes"][1:]
    for implementation in ("sdpa", "eager"):
        model.set_attn_implementation(implementation)
        padded, _ = _features(model, batch)
        single, _ = _features(model, alone)
        torch.testing.assert_close(padded[1:], single, atol=1e-5, rtol=1e-5)
    layer = model.patch_merger
    tokens = torch.randn(2, 16, VISION["hidden_size"])
    valid = batch["pixel_attention_mask"].bool()
    weights = layer.merge_weights(tokens, valid)
    assert torch.all(weights[1, 12:] == 0) and torch.allclose(weights.sum(1), torch.ones(2, M))


def test_the_dual_encoder_keeps_its_text_tower_and_class(siglip2):
    """The export is a Siglip2Model with the vision tower merged: text tower, logit scale and bias bit-exact; it
    loads with AutoModel and AutoModelForZeroShotImageClassification; the processor and tokenizer travel with it."""
    from transformers import (
        AutoImageProcessor,
        AutoModel,
        AutoModelForZeroShotImageClassification,
        AutoTokenizer,
        Siglip2Model,
    )

    source, output = siglip2
    config = json.loads((output / "config.json").read_text())
    assert config["architectures"] == ["Siglip2PatchMergerModel"] and config["merge_num_prefix_tokens"] == 0
    before, after = load_file(source / "model.safetensors"), load_file(output / "model.safetensors")
    for key, value in before.items():
        if not key.startswith("vision_model."):
            assert torch.equal(after[key], value), key
    assert any("patch_merger" in key for key in after)
    for auto in (AutoModel, AutoModelForZeroShotImageClassification):
        model = auto.from_pretrained(output, trust_remote_code=True)
        assert isinstance(model, Siglip2Model) and type(model).__name__ == "Siglip2PatchMergerModel"
    assert type(AutoImageProcessor.from_pretrained(output)).__name__.startswith("Siglip2ImageProcessor")
    assert AutoTokenizer.from_pretrained(output, trust_remote_code=True)("a cat")["input_ids"]
    source_model = Siglip2Model.from_pretrained(source).eval()
    _, text = _features(source_model, padded_batch())
    _, merged_text = _features(model.eval(), padded_batch())
    assert torch.equal(text, merged_text)


@pytest.fixture(scope="module")
def siglip2_classifier(siglip2) -> Path:
    """The tiny Siglip2Model converted with --task image-classification (a new classifier)."""
    source, output = siglip2
    classifier = output.with_name("classifier")
    torch.manual_seed(1)
    convert(source, after_layer=K, num_tokens=M, output=classifier, task="image-classification", log=lambda _: None)
    config = json.loads((classifier / "config.json").read_text())
    assert config["architectures"] == ["Siglip2PatchMergerForImageClassification"], config["architectures"]
    return classifier


def test_a_classifier_reads_the_mean_of_the_merged_tokens(siglip2, siglip2_classifier):
    """`--task image-classification` gives a Siglip2ForImageClassification (it had no AutoModelForImageClassification
    export). The source averages the last hidden state over each image's own patches; after the merge the classifier
    reads the mean of the M merged tokens, so a padded image gets the logits it gets alone, and with the merger
    bypassed the model is its source. The dual encoder's export loads as that classifier too (a linear probe)."""
    from transformers import AutoModelForImageClassification, Siglip2ForImageClassification

    from retrofit.calibrate import bypass_merger

    source, output = siglip2
    model = AutoModelForImageClassification.from_pretrained(siglip2_classifier, trust_remote_code=True).eval()
    assert type(model).__name__ == "Siglip2PatchMergerForImageClassification"
    batch = padded_batch()
    alone = {key: value[1:, :12] for key, value in batch.items() if key != "spatial_shapes"}
    alone["spatial_shapes"] = batch["spatial_shapes"][1:]
    with torch.no_grad():
        padded, single = model(**batch).logits, model(**alone).logits
        tokens = model.vision_model(**batch).last_hidden_state
        assert tokens.shape[1] == M and model(**batch, labels=torch.tensor([0, 1])).loss > 0
    torch.testing.assert_close(padded[1:], single, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(padded, model.classifier(tokens.mean(1)))
    torch.manual_seed(2)
    unmerged = Siglip2ForImageClassification.from_pretrained(source, num_labels=3).eval()
    merged = insert_patch_merger(copy.deepcopy(unmerged), K, M).eval()
    square = {key: value[:1] for key, value in batch.items()}  # unpadded: the merged layers take no mask
    with torch.no_grad(), bypass_merger(merged):
        torch.testing.assert_close(merged(**square).logits, unmerged(**square).logits, atol=1e-5, rtol=1e-5)
    probe = AutoModelForImageClassification.from_pretrained(output, trust_remote_code=True, num_labels=3)
    assert type(probe).__name__ == "Siglip2PatchMergerForImageClassification"


RELOAD = """
import json, sys, torch, transformers
from PIL import Image
from transformers import AutoModel, AutoModelForImageClassification, AutoProcessor
data = torch.load(sys.argv[2])
model = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(sys.argv[1], trust_remote_code=True)
# the tiny model's patches (Siglip2Processor's own defaults are 16 pixels and 256 patches, over the image processor's)
inputs = processor(text=["a photo of a cat."], images=[Image.new("RGB", (48, 16), "red")], return_tensors="pt",
                   padding="max_length", max_length=16, patch_size=8, max_num_patches=16)
with torch.no_grad():
    image = model.get_image_features(**data["inputs"])
    text = model.get_text_features(input_ids=data["input_ids"])
    output = model(input_ids=data["input_ids"], **data["inputs"])
    processed = model(**inputs)
    classifier = AutoModelForImageClassification.from_pretrained(sys.argv[3], trust_remote_code=True).eval()
    logits = classifier(**data["inputs"]).logits
image = getattr(image, "pooler_output", image)
text = getattr(text, "pooler_output", text)
print(json.dumps({
    "version": transformers.__version__,
    "image": (image - data["image"]).abs().max().item(),
    "text": (text - data["text"]).abs().max().item(),
    "logits": list(output.logits_per_image.shape),
    "processor": type(processor).__name__,
    "processed": list(processed.logits_per_image.shape),
    "classifier": (logits - data["logits"]).abs().max().item(),
}))
"""


@pytest.mark.parametrize("release", ["installed", "oldest", *OVERLAYS])
def test_the_export_reloads_without_retrofit(release, siglip2, siglip2_classifier, tmp_path):
    """In a process where `import retrofit` fails, with each transformers release the export supports: the same image
    features for the processor's padded batch, the same text features, a full image-text forward; AutoProcessor gives
    the source's Siglip2Processor (the export's tokenizer config names it), whose outputs the model runs on. The
    classifier export gives the same logits for the padded batch."""
    from test_families import INPUT_IDS

    from retrofit.loading import load_model

    python, path = sys.executable, []
    if release != "installed":
        if not OLDEST_PYTHON:
            pytest.skip("RETROFIT_OLDEST_PYTHON is not set (`make test` sets it)")
        python, path = OLDEST_PYTHON, [str(OVERLAYS[release])] if release in OVERLAYS else []
    _, output = siglip2
    inputs = padded_batch()
    image, text = _features(load_model(output).eval(), inputs)
    with torch.no_grad():
        logits = load_model(siglip2_classifier).eval()(**inputs).logits
    data = {"inputs": inputs, "input_ids": INPUT_IDS, "image": image, "text": text, "logits": logits}
    torch.save(data, tmp_path / "data.pt")
    (tmp_path / "blocker").mkdir()
    (tmp_path / "blocker" / "retrofit.py").write_text("raise ImportError('retrofit must not be needed')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "blocker"), *path])}
    env |= {"HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    run = subprocess.run([python, "-c", RELOAD, str(output), str(tmp_path / "data.pt"), str(siglip2_classifier)],
                         env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["image"] < 1e-5 and got["text"] < 1e-5 and got["logits"] == [2, 3] and got["classifier"] < 1e-5
    assert got["processor"] == "Siglip2Processor" and got["processed"] == [1, 1]


def test_retrofit_feeds_square_images_as_the_processor_would(siglip2):
    """retrofit's (C, H, W) images and the processor's patches are exact inverses, in the processor's order."""
    batch = padded_batch()
    squares = patches_to_images(batch["pixel_values"], batch["spatial_shapes"], 8)
    assert [tuple(image.shape) for image in squares] == [(3, 32, 32), (3, 16, 48)]
    for index, image in enumerate(squares):
        patches = images_to_patches(image[None], 8)
        count = int(batch["pixel_attention_mask"][index].sum())
        assert torch.equal(patches["pixel_values"][0], batch["pixel_values"][index, :count])
        assert patches["spatial_shapes"][0].tolist() == batch["spatial_shapes"][index].tolist()


def test_zero_shot_evaluation_equals_the_pipeline(siglip2, images):  # noqa: F811 - the fixture
    """`evaluate --zero-shot` on both models gives transformers' zero-shot pipeline accuracy (which feeds the
    processor's NaFlex inputs); the merged model costs less."""
    source, output = siglip2
    report = evaluate_models([str(source), str(output)], data=str(images), split="test", zero_shot=True,
                             log=lambda _: None)  # fmt: skip
    first, merged = report["models"]
    assert first["top1"] == pytest.approx(pipeline_accuracy(source, images, "a photo of a {}."), abs=1e-9)
    assert merged["top1"] == pytest.approx(pipeline_accuracy(output, images, "a photo of a {}."), abs=1e-9)
    assert merged["gflops"] < first["gflops"]


def test_finetune_and_calibration_train_the_image_side(siglip2, images, tmp_path):  # noqa: F811 - the fixture
    """Calibrated, label-free fine-tuning of a Siglip2Model: the text tower and logit scale/bias bit-exact, the
    vision tower trained; the result reloads and scores."""
    source, _ = siglip2
    out = tmp_path / "ft"
    result = finetune(source, output=out, after_layer=K, num_tokens=M, data=str(images), max_steps=3, batch_size=4,
                      lr=1e-2, prompt_weight=1.0, progress=False, log=lambda _: None)  # fmt: skip
    assert result.finished and "similarity" in result.eval_history[-1]
    before, after = load_file(source / "model.safetensors"), load_file(out / "model.safetensors")
    for key, value in before.items():
        if not key.startswith("vision_model."):
            assert torch.equal(after[key], value), key
    assert any(not torch.equal(after[key], before[key]) for key in before if key.startswith("vision_model.encoder"))
    report = evaluate_models([str(out)], data=str(images), split="test", zero_shot=True, log=lambda _: None)
    assert 0 <= report["models"][0]["top1"] <= 1
    # --task image-classification: a new classifier trained with cross-entropy on the data's classes, which scores
    classifier = finetune(source, output=tmp_path / "cls", after_layer=K, num_tokens=M, data=str(images),
                          task="image-classification", num_labels=3, loss="ce", max_steps=2, batch_size=4,
                          progress=False, log=lambda _: None)  # fmt: skip
    assert classifier.finished and type(classifier.model).__name__ == "Siglip2PatchMergerForImageClassification"
    report = evaluate_models([str(tmp_path / "cls")], data=str(images), split="test", log=lambda _: None)
    assert 0 <= report["models"][0]["top1"] <= 1


def test_the_vision_tower_alone_and_bench(siglip2, images, tmp_path, capsys):  # noqa: F811 - the fixture
    """--task image-feature-extraction gives the merged Siglip2VisionModel; `bench` times both on square images, and
    `evaluate` scores its features against the source's (it failed with a traceback: the merged tower did not take
    images, for its class is named otherwise than the source's)."""
    from transformers import AutoModel

    source, _ = siglip2
    tower = tmp_path / "tower"
    assert main(["convert", str(source), "--after-layer", str(K), "--tokens", str(M), "--task",
                 "image-feature-extraction", "--output", str(tower)]) == 0  # fmt: skip
    model = AutoModel.from_pretrained(tower, trust_remote_code=True).eval()
    assert type(model).__name__ == "Siglip2VisionPatchMergerModel"
    batch = padded_batch()
    with torch.no_grad():
        out = model(**batch)
    assert out.last_hidden_state.shape[1] == M and out.pooler_output.shape == (2, VISION["hidden_size"])
    json_path = tmp_path / "bench.json"
    argv = ["bench", str(source), str(tower), "--batch-size", "2", "--repeats", "1", "--warmup", "1", "--json",
            str(json_path)]  # fmt: skip
    assert main(argv) == 0
    report = json.loads(json_path.read_text())
    assert len(report["models"]) == 2 and all(row["results"]["2"]["status"] == "ok" for row in report["models"])
    scores = evaluate_models([str(tower)], data=str(images), split="test", log=lambda _: None)  # its own features
    assert scores["models"][0]["similarity"] == pytest.approx(1.0)
    capsys.readouterr()


def test_onnx_refuses_naflex_in_one_line(siglip2, tmp_path, capsys):
    """`retrofit export-onnx` would need the patches, mask and shapes as graph inputs: one line, nothing written."""
    _, output = siglip2
    target = tmp_path / "model.onnx"
    assert main(["export-onnx", str(output), "--output", str(target)]) == 2
    err = capsys.readouterr().err.strip()
    assert "does not export SigLIP 2 models" in err and len(err.splitlines()) == 1
    assert not target.exists()


def test_prompt_embeddings_take_the_tokenizers_mask_as_the_pipeline_does(siglip2):
    """SigLIP 2's tokenizer gives an attention mask, which transformers' pipeline passes to the text tower (SigLIP's
    gives none, and its tower attends to the padding): retrofit's prompt embeddings are the tower's with that mask."""
    from retrofit.loading import load_config, load_model, load_tokenizer
    from retrofit.zero_shot import text_embeddings

    source, _ = siglip2
    config = load_config(source)
    model, tokenizer = load_model(source, config=config).eval(), load_tokenizer(source, config)
    texts = ["a photo of a cat.", "a photo of a dog."]
    inputs = tokenizer(texts, padding="max_length", max_length=64, return_tensors="pt")
    with torch.no_grad():
        features = model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    expected = torch.nn.functional.normalize(getattr(features, "pooler_output", features), dim=-1)
    torch.testing.assert_close(text_embeddings(model, tokenizer, texts), expected)
