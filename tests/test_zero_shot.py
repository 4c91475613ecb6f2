"""Whole CLIP/SigLIP dual encoders: `evaluate --zero-shot` equals transformers' zero-shot pipeline, its JSON and card,
its refusals; label-free fine-tuning (cosine on image embeddings, optional prompt KL) with the text tower frozen;
`sweep --zero-shot`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import auto_classes_registered, save_tiny, tiny_clip_tokenizer, tiny_siglip_tokenizer
from safetensors.torch import load_file
from test_data import make_imagefolder
from test_families import INPUT_IDS, OLDEST_PYTHON, OVERLAYS, _clip, _siglip

from retrofit import convert
from retrofit.cli import main
from retrofit.data import class_names, load_split
from retrofit.evaluation import evaluate_models
from retrofit.zero_shot import DEFAULT_TEMPLATE, Captions

TOKENIZERS = {"clip": lambda _: tiny_clip_tokenizer(), "siglip": tiny_siglip_tokenizer}
MAKERS = {"clip": _clip, "siglip": _siglip}


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Three named classes (cat, dog, bird), 4 test images each."""
    return make_imagefolder(tmp_path_factory.mktemp("zs") / "animals", per_class=4, test_per_class=4)


@pytest.fixture(scope="module")
def duals(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """A tiny CLIPModel and SiglipModel checkpoint (processor and tokenizer included) and their merged exports."""
    root = tmp_path_factory.mktemp("duals")
    made = {}
    for seed, (name, make) in enumerate(MAKERS.items()):
        torch.manual_seed(seed)
        source = save_tiny(make(), root / name)
        TOKENIZERS[name](root / f"{name}-spm").save_pretrained(source)
        output = root / f"{name}-pm"
        convert(source, after_layer=2, num_tokens=3, output=output, log=lambda _: None)
        made[name] = source, output
    return made


def pipeline_predictions(model: Path, images: Path, template: str) -> list[tuple[str, str]]:
    """(class, top-1 class) of each image of the test split, in its order, by transformers' own zero-shot pipeline
    (the export through the classes retrofit registers, as a user without remote code loads it)."""
    from PIL import Image
    from transformers import pipeline

    names = class_names(load_split(str(images), "test"))
    with auto_classes_registered():
        classify = pipeline("zero-shot-image-classification", model=str(model))
    predicted = []
    for name in names:
        for path in sorted((images / "test" / name).glob("*.png")):
            ranked = classify(Image.open(path), candidate_labels=names, hypothesis_template=template)
            predicted.append((name, ranked[0]["label"]))
    return predicted


def pipeline_accuracy(model: Path, images: Path, template: str) -> float:
    """Top-1 accuracy of transformers' own zero-shot pipeline over the test split (`pipeline_predictions`)."""
    predicted = pipeline_predictions(model, images, template)
    return sum(name == top1 for name, top1 in predicted) / len(predicted)


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_zero_shot_accuracy_equals_the_transformers_pipeline(name, duals, images):
    """Each model's zero-shot top-1 is what transformers' pipeline gives with the same template and class names, and
    so is the merged model's agreement with the source (the share of images of the same top-1); the first model
    agrees with itself, top-3 of 3 classes is 100 %. Agreement with a `reference` (a recipe's fine-tuned row against
    its baseline's predictions) is with those predictions."""
    from retrofit.data import make_dataloader
    from retrofit.evaluation import zero_shot_scores
    from retrofit.loading import load_config, load_image_processor, load_model, load_tokenizer

    source, export = duals[name]
    template = "a {} in a photo."
    report = evaluate_models([str(source), str(export)], data=str(images), split="test", zero_shot=True,
                             prompt_template=template, top_k=5, log=lambda _: None)  # fmt: skip
    assert report["metric"] == "zero-shot" and report["num_examples"] == 12 and report["top_k"] == 3
    assert report["prompts"] == ["a bird in a photo.", "a cat in a photo.", "a dog in a photo."]
    first, merged = report["models"]
    assert first["agreement"] == 1.0 and first["top3"] == merged["top3"] == 1.0
    by_source, by_export = (pipeline_predictions(path, images, template) for path in (source, export))
    assert first["top1"] == pytest.approx(sum(a == b for a, b in by_source) / 12, abs=1e-9)
    assert merged["top1"] == pytest.approx(sum(a == b for a, b in by_export) / 12, abs=1e-9)
    same = sum(a[1] == b[1] for a, b in zip(by_source, by_export, strict=True)) / 12
    assert merged["agreement"] == pytest.approx(same, abs=1e-9)
    assert f"| {100 * merged['agreement']:.2f} % | {merged['gflops']:.3g} |" in report["table"]
    assert merged["gflops"] < first["gflops"]

    model, config = load_model(export), load_config(export)
    dataset = load_split(str(images), "test")
    loader = make_dataloader(dataset, load_image_processor(export, config), batch_size=4)
    tokenizers, texts = [load_tokenizer(export, config)], report["prompts"]
    alone = zero_shot_scores([model], tokenizers, loader, texts, k=3)[0]
    assert alone["agreement"] == 1.0 and alone["top1"] == merged["top1"]
    other = [(top1 + 1) % 3 for top1 in alone["predictions"]]  # a reference that differs on every image
    assert zero_shot_scores([model], tokenizers, loader, texts, k=3, reference=other)[0]["agreement"] == 0.0


def test_overwrite_replaces_a_dual_encoder_export_with_its_tokenizer(duals, tmp_path):
    """A dual encoder's export holds its tokenizer as retrofit wrote it, so --overwrite replaces it (the same names in
    a ViT export are the user's: tests/test_safety.py)."""
    import shutil

    from retrofit.atomic import EXPORT
    from retrofit.push import export_files

    for _, export in duals.values():
        assert (export / "tokenizer_config.json").is_file() and EXPORT.foreign_files(export) == []
        assert "tokenizer_config.json" in export_files(export)  # and push uploads it
    source, export = duals["siglip"]
    again = shutil.copytree(export, tmp_path / "again")
    convert(source, after_layer=2, num_tokens=3, output=again, overwrite=True, log=lambda _: None)
    assert sorted(path.name for path in again.iterdir()) == sorted(path.name for path in export.iterdir())
    assert json.loads((again / "tokenizer_config.json").read_text())["processor_class"] == "SiglipProcessor"


@pytest.mark.parametrize("name, processor", [("clip", "CLIPProcessor"), ("siglip", "SiglipProcessor")])
def test_auto_processor_gives_the_sources_processor_class(name, processor, duals, tiny_vit, tmp_path):
    """The source's files name no processor class, so transformers picks it by model type, which it does not know
    for an export's (``clip_patch_merger``): the export's tokenizer config names it (``processor_class``, as
    transformers' ProcessorMixin saves it), and AutoProcessor gives the source's class, whose outputs the model runs
    on; a ViT export has no tokenizer config to name it in. The keys transformers adds about how this machine loaded
    the tokenizer are left out."""
    import shutil

    from PIL import Image
    from transformers import AutoModel, AutoProcessor

    from retrofit.atomic import TOKENIZER_FILES, family_files
    from retrofit.push import export_files

    source, export = duals[name]
    assert "processor_class" not in json.loads((source / "tokenizer_config.json").read_text())
    saved = json.loads((export / "tokenizer_config.json").read_text())
    assert not {"is_local", "local_files_only"} & set(saved), saved  # how this machine loaded it: not published
    tokenizer = {path.name for path in export.iterdir() if path.name in TOKENIZER_FILES}
    assert "tokenizer_config.json" in tokenizer and tokenizer <= set(export_files(export))  # `push` uploads them
    assert type(AutoProcessor.from_pretrained(source)).__name__ == processor
    loaded = AutoProcessor.from_pretrained(export, trust_remote_code=True)
    assert type(loaded).__name__ == processor
    padding = {"padding": "max_length", "max_length": 64} if name == "siglip" else {"padding": True}
    inputs = loaded(text=["a photo of a cat.", "a photo of a dog."], images=Image.new("RGB", (40, 30), "red"),
                    return_tensors="pt", **padding)  # fmt: skip
    model = AutoModel.from_pretrained(export, trust_remote_code=True).eval()
    with torch.no_grad():
        assert model(**inputs).logits_per_image.shape == (1, 2)
    odd = shutil.copytree(source, tmp_path / "odd")  # a processor_class that is not a class name: the family's
    settings = json.loads((odd / "tokenizer_config.json").read_text())
    # and an auto_map naming the source's own tokenizer code, which the export has not: loading it failed
    code = {"AutoTokenizer": ["tokenization_own.OwnTokenizer", None]}
    (odd / "tokenizer_config.json").write_text(json.dumps({**settings, "processor_class": [processor],
                                                           "auto_map": code}))  # fmt: skip
    fixed = convert(odd, after_layer=2, num_tokens=3, output=tmp_path / "odd-pm", log=lambda _: None).output
    saved = json.loads((fixed / "tokenizer_config.json").read_text())
    assert saved["processor_class"] == processor and "auto_map" not in saved
    assert type(AutoProcessor.from_pretrained(fixed, trust_remote_code=True)).__name__ == processor
    vit = convert(tiny_vit, after_layer=2, num_tokens=3, output=tmp_path / "vit", log=lambda _: None).output
    assert not (vit / "tokenizer_config.json").exists()
    assert "tokenizer_config.json" not in family_files(json.loads((vit / "config.json").read_text()))


# Runs the python blocks of a section of each export's card ("registered": before "Without retrofit", else after it)
# as written, in one process; prints what they made, and whether the forward pass's probabilities are the pipeline's
# scores of the same texts (the padding and activation the pipeline uses for the family: SigLIP's are its own).
CARD_USAGE = """
import json, re, sys
from pathlib import Path
import transformers
section, made = sys.argv[1], {}
for folder in sys.argv[2:]:
    usage = Path(folder, "README.md").read_text().split("## How to use")[1].split("\\n## ")[0]
    part = usage.split("Without retrofit")[0 if section == "registered" else 1]
    names = {}
    exec(compile("\\n".join(re.findall(r"```python\\n(.*?)```", part, re.S)), folder, "exec"), names)
    pipeline_scores = {score["label"]: score["score"] for score in names["scores"]}
    same = all(abs(p - pipeline_scores[label]) < 1e-4 for p, label in zip(names["probs"][0].tolist(), ["cat", "dog"]))
    made[folder] = [type(names["model"]).__name__, type(names["processor"]).__name__, list(names["probs"].shape),
                    sorted(pipeline_scores), same]
print(json.dumps({"transformers": transformers.__version__, "made": made}))
"""


@pytest.mark.parametrize("release", ["registered", "installed", "oldest", *OVERLAYS])
def test_the_cards_usage_runs_as_written(release, duals, tmp_path):
    """A dual encoder's card shows the model, the pipeline and the processor (the source's class) with a forward pass
    on its outputs; each section runs as written, where the card names the export: with retrofit's classes
    registered, and without retrofit (every load passes trust_remote_code=True, so transformers asks nothing) on each
    release the exported code supports."""
    from PIL import Image

    python, path = sys.executable, []
    if release not in ("installed", "registered"):
        if not OLDEST_PYTHON:
            pytest.skip("RETROFIT_OLDEST_PYTHON is not set (`make test` sets it)")
        python, path = OLDEST_PYTHON, [str(OVERLAYS[release])] if release in OVERLAYS else []
    for _, export in duals.values():
        (tmp_path / export.name).symlink_to(export)  # where the card names it (`card.local_name`)
    Image.new("RGB", (40, 30), "red").save(tmp_path / "photo.jpg")
    (tmp_path / "blocker").mkdir()
    (tmp_path / "blocker" / "retrofit.py").write_text("raise ImportError('retrofit must not be needed')\n")
    blocker = [] if release == "registered" else [str(tmp_path / "blocker")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([*blocker, *path]), "HF_MODULES_CACHE": str(tmp_path / "mod")}
    env |= {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    section = "registered" if release == "registered" else "remote"
    folders = [export.name for _, export in duals.values()]
    run = subprocess.run([python, "-c", CARD_USAGE, section, *folders], cwd=tmp_path, env=env, capture_output=True,
                         text=True, stdin=subprocess.DEVNULL, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert "[y/N]" not in run.stdout + run.stderr and "custom code" not in run.stdout + run.stderr
    import transformers

    from retrofit.hub_code import OLDEST_TRANSFORMERS

    got = json.loads(run.stdout.strip().splitlines()[-1])
    expected = {"oldest": OLDEST_TRANSFORMERS}.get(release, release.removeprefix("transformers-"))
    assert got["transformers"] == (transformers.__version__ if release in ("installed", "registered") else expected)
    assert got["made"] == {
        "clip-pm": ["CLIPPatchMergerModel", "CLIPProcessor", [1, 2], ["cat", "dog"], True],
        "siglip-pm": ["SiglipPatchMergerModel", "SiglipProcessor", [1, 2], ["cat", "dog"], True],
    }


def test_evaluate_zero_shot_writes_json_and_card(duals, images, tmp_path, capsys):
    """The CLI prints the prompts and a table, writes the JSON and puts the zero-shot results into the export's card
    (results table and model-index)."""
    source, export = duals["clip"]
    out = tmp_path / "zs.json"
    argv = ["evaluate", str(source), str(export), "--data", str(images), "--split", "test", "--zero-shot",
            "--json", str(out), "--card", str(export)]  # fmt: skip
    assert main(argv) == 0
    printed, err = capsys.readouterr()
    assert "custom code" not in printed + err  # the export's tokenizer loads without a remote-code prompt
    assert "3 prompts like 'a photo of a bird.'" in printed and "| model | zero-shot top-1 |" in printed
    report = json.loads(out.read_text())
    assert report["template"] == DEFAULT_TEMPLATE and len(report["models"]) == 2
    card = (export / "README.md").read_text()
    assert "zero-shot" in card.lower()
    assert f"{100 * report['models'][1]['top1']:.2f}" in card
    assert "| | zero-shot top-1 | zero-shot top-3 | GFLOPs |" in card  # the before/after table said "top-1" alone
    assert "value:" in card and "zero-shot-image-classification" in card


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--prompt-template", "a {} of a {}"], "--prompt-template 'a {} of a {}' must hold exactly one {}"),
        (["--prompt-template", "a photo"], "--prompt-template 'a photo' must hold exactly one {}"),
        (["--prompt-template", "a {"], "--prompt-template 'a {' is not a template"),
        # a format spec or conversion: format() raised ValueError on every class name (a traceback)
        (["--prompt-template", "a {:d}."], "--prompt-template 'a {:d}.' must hold exactly one {}"),
        (["--prompt-template", "a {!x}."], "without a format spec or conversion"),
    ],
)
def test_a_bad_prompt_template_is_one_line(extra, message, duals, images, capsys):
    source, _ = duals["clip"]
    assert main(["evaluate", str(source), "--data", str(images), "--zero-shot", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_zero_shot_refuses_what_cannot_work(duals, images, tiny_vit, tmp_path, capsys):
    """A model that is not a dual encoder, an export without its tokenizer and data without class names: each one
    line, exit code 2."""
    source, export = duals["clip"]
    assert main(["evaluate", str(source), str(tiny_vit), "--data", str(images), "--zero-shot"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"'{tiny_vit}' is a classifier" in err and "dual encoders" in err and len(err.splitlines()) == 1
    argv = ["convert", str(tiny_vit), "--after-layer", "2", "--tokens", "3", "--output", str(tmp_path / "zs")]
    assert main([*argv, "--task", "zero-shot-image-classification"]) == 2  # said "an zero-shot-..."
    assert "ViT checkpoints cannot become a zero-shot-image-classification model" in capsys.readouterr().err
    from retrofit.errors import RetrofitError
    from retrofit.loading import for_task, load_config

    with pytest.raises(RetrofitError, match="^this export is a zero-shot-image-classification model "):  # "an"
        for_task(load_config(str(export)), "image-classification")

    bare = tmp_path / "bare"
    bare.mkdir()
    for path in export.iterdir():
        if not path.name.startswith(("tokenizer", "vocab", "merges", "special_tokens")):
            (bare / path.name).write_bytes(path.read_bytes())
    assert main(["evaluate", str(bare), "--data", str(images), "--split", "test", "--zero-shot"]) == 2
    err = capsys.readouterr().err.strip()
    assert "has no usable tokenizer" in err and len(err.splitlines()) == 1

    # a tokenizer without a padding token (a plain tokenizers one): transformers' ValueError was a traceback
    unpadded = tmp_path / "unpadded"
    unpadded.mkdir()
    for path in source.iterdir():
        (unpadded / path.name).write_bytes(path.read_bytes())
    settings = json.loads((source / "tokenizer_config.json").read_text())
    settings = {**settings, "tokenizer_class": "PreTrainedTokenizerFast", "pad_token": None}
    (unpadded / "tokenizer_config.json").write_text(json.dumps(settings))
    assert main(["evaluate", str(source), str(unpadded), "--data", str(images), "--split", "test", "--zero-shot"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"the tokenizer of '{unpadded}' has no padding token" in err and len(err.splitlines()) == 1

    numbers = tmp_path / "numbers"
    numbers.mkdir()
    (numbers / "metadata.csv").write_text("file_name,label\n0.png,0\n1.png,1\n")
    for index, path in enumerate(sorted((images / "test").glob("*/*.png"))[:2]):
        (numbers / f"{index}.png").write_bytes(path.read_bytes())
    assert main(["evaluate", str(source), "--data", str(numbers), "--split", "train", "--zero-shot"]) == 2
    err = capsys.readouterr().err.strip()
    assert "has no class names to build prompts from" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_finetune_trains_the_image_side_and_keeps_the_text_tower(name, duals, images, tmp_path):
    """Label-free fine-tuning of a dual encoder: cosine distillation of the image embeddings (plus the prompt KL),
    the text tower, text projection and logit scale/bias bit-exact in the export, the vision tower changed; the card
    says what the loss was."""
    from retrofit import finetune

    source, _ = duals[name]
    out = tmp_path / "ft"
    lines: list[str] = []
    result = finetune(source, output=out, after_layer=2, num_tokens=3, data=str(images), max_steps=3, batch_size=4,
                      lr=1e-2, prompt_weight=1.0, progress=False, log=lines.append)  # fmt: skip
    assert result.finished and result.eval_history and "similarity" in result.eval_history[-1]
    assert any("--prompt-weight: 3 classes x 1 prompt template(s)" in line for line in lines)
    before, after = load_file(source / "model.safetensors"), load_file(out / "model.safetensors")
    image_side = ("vision_model.", "visual_projection.")
    for key, value in before.items():
        if key.startswith(image_side):
            continue
        assert torch.equal(after[key], value), key  # text tower, text projection, logit scale and bias
    assert any(not torch.equal(after[key], before[key]) for key in before if key.startswith("vision_model.encoder"))
    card = (out / "README.md").read_text()
    assert "cosine distance (1 − cos) of the normalised image embeddings" in card
    assert "KL divergence of the image-text similarity distributions" in card and "text tower frozen" in card
    # the card claimed the projections bit-exact, the visual projection trained
    scale = "the logit scale and bias" if name == "siglip" else "the logit scale"
    assert f"The text tower, the text projection and {scale} are the source's, bit-exact (fine-tuning" in card
    assert "the projections" not in card


def test_prompt_weight_is_refused_where_it_cannot_work(tiny_vit, images, tmp_path, capsys):
    """--prompt-weight on a classifier is one line before any training."""
    argv = ["finetune", str(tiny_vit), "--after-layer", "2", "--tokens", "3", "--data", str(images),
            "--max-steps", "1", "--prompt-weight", "1", "--output", str(tmp_path / "out")]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "--prompt-weight" in err and "dual encoders" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_sweep_ranks_a_dual_encoders_settings_by_zero_shot_accuracy(duals, images, tmp_path, capsys):
    """`sweep --zero-shot`: each calibrated setting scored by zero-shot top-1 over the data's class names (the
    source agreeing with itself) and timed on its image embeddings; without --zero-shot, by image-embedding
    similarity."""
    source, _ = duals["siglip"]
    argv = ["sweep", str(source), "--after-layer", "1,2", "--tokens", "3", "--data", str(images), "--split", "test",
            "--calibrate-images", "6", "--bench-batch-size", "2", "--bench-repeats", "1"]  # fmt: skip
    assert main([*argv, "--zero-shot", "--output", str(tmp_path / "zs")]) == 0
    report = json.loads((tmp_path / "zs" / "sweep.json").read_text())
    assert report["metric"] == "zero-shot" and report["prompts"][0] == "a photo of a bird."
    assert report["source_row"]["agreement"] == 1.0 and report["source_row"]["num_examples"] == 12
    for row in report["settings_results"]:
        assert 0 <= row["top1"] <= 1 and 0 <= row["agreement"] <= 1 and row["images_per_s"] > 0
    markdown = (tmp_path / "zs" / "sweep.md").read_text()
    assert "zero-shot top-1 | top-3 | agreement with the source" in markdown
    assert "Zero-shot accuracy (one prompt per class, like 'a photo of a bird.') on" in markdown  # it named none
    assert main([*argv, "--output", str(tmp_path / "similarity")]) == 0
    assert json.loads((tmp_path / "similarity" / "sweep.json").read_text())["metric"] == "similarity"
    capsys.readouterr()


def test_calibration_of_a_dual_encoder_keeps_its_embeddings_close(duals, images, tmp_path):
    """k-means calibration on a dual encoder's layer-K tokens gives image embeddings closer to the source's than
    the random merger does (the data-driven start `finetune --calibrate` uses)."""
    from retrofit.calibrate import calibrate_from_data
    from retrofit.data import make_dataloader
    from retrofit.loading import load_image_processor, load_model
    from retrofit.surgery import insert_patch_merger
    from retrofit.zero_shot import image_embeddings

    source, _ = duals["clip"]
    base = load_model(source).eval()
    processor = load_image_processor(source, base.config)
    pixels = next(iter(make_dataloader(load_split(str(images), "test"), processor, batch_size=12)))["pixel_values"]
    torch.manual_seed(0)
    random = insert_patch_merger(load_model(source).eval(), 2, 3).eval()
    calibrated = insert_patch_merger(load_model(source).eval(), 2, 3).eval()
    calibrate_from_data(calibrated, str(images), source=str(source), num_images=12, log=lambda _: None)
    with torch.no_grad():
        want = image_embeddings(base, pixels)
        cosines = [torch.nn.functional.cosine_similarity(image_embeddings(m, pixels), want).mean() for m in
                   (random, calibrated)]  # fmt: skip
    assert cosines[1] > cosines[0]


def test_contrastive_loss_is_clips_when_every_class_is_seen_once():
    """With distinct labels the loss is CLIP's symmetric cross-entropy; captions of an image's own class are not
    pushed away (a batch whose two images share a class has a lower loss than CLIP's for the same logits)."""
    from retrofit.losses import contrastive_loss

    logits = torch.randn(4, 4, generator=torch.Generator().manual_seed(0))
    targets = torch.arange(4)
    clip = torch.nn.functional.cross_entropy(logits, targets) + torch.nn.functional.cross_entropy(logits.t(), targets)
    torch.testing.assert_close(contrastive_loss(logits, torch.tensor([3, 1, 0, 2])), clip / 2)
    assert contrastive_loss(logits, torch.tensor([0, 0, 1, 2])) != contrastive_loss(logits, targets)


def test_pretrain_a_clip_on_captions_of_class_names(images, tmp_path):
    """`pretrain` with a CLIPConfig trains a dual encoder from scratch on captions written from the class names: the
    checkpoint is a plain CLIPModel with its character tokenizer, scored by zero-shot accuracy during training, and
    `evaluate --zero-shot` reads it; the captions drawn for a batch depend on the seed alone."""
    from transformers import CLIPModel

    from retrofit.atomic import BASELINE, check_output
    from retrofit.errors import RetrofitError
    from retrofit.finetune import character_tokenizer, clip_config, pretrain

    vision = {"image_size": 32, "patch_size": 8, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
              "intermediate_size": 64}  # fmt: skip
    model = {"projection_dim": 16, "vision_config": vision, "text_config": {"hidden_size": 32, "num_hidden_layers": 1,
             "num_attention_heads": 2, "intermediate_size": 64}}  # fmt: skip
    out = tmp_path / "clip"
    said = []
    result = pretrain(model, output=out, data=str(images), loss="contrastive", max_steps=4, batch_size=6,
                      progress=False, log=said.append)  # fmt: skip
    assert result.finished and 0 <= result.eval_history[-1]["accuracy"] <= 1
    assert any(line.startswith("step 4: eval zero-shot accuracy (first template) ") for line in said), said
    assert type(CLIPModel.from_pretrained(out)).__name__ == "CLIPModel" and (out / "tokenizer.json").exists()
    info = json.loads((out / "training.json").read_text())  # what was trained, and how well
    assert (info["steps"], info["accuracy"], info["settings"]["loss"]) == (4, result.final_accuracy, "contrastive")
    # --overwrite replaces it: its tokenizer files are retrofit's (they were "files retrofit did not write")
    check_output(out, True, kind=BASELINE)
    (out / "vocab.txt").write_text("mine")
    with pytest.raises(RetrofitError, match=r"files retrofit did not write \(vocab.txt\)"):
        check_output(out, True, kind=BASELINE)
    (out / "vocab.txt").unlink()
    report = evaluate_models([str(out)], data=str(images), split="test", zero_shot=True, log=lambda _: None)
    assert report["models"][0]["top1"] == pytest.approx(result.eval_history[-1]["accuracy"], abs=1e-6)
    # ':' is unknown to its tokenizer, read as the end token CLIP pools: every prompt read 'a photo' and tied
    with pytest.raises(RetrofitError, match="gives the prompts 'a photo: bird' and 'a photo: cat' the same tokens"):
        evaluate_models([str(out)], data=str(images), split="test", zero_shot=True, prompt_template="a photo: {}")

    tokenizer = character_tokenizer()
    captions = Captions(tokenizer, ["cat", "dog"], ("a {}.", "the {}!"), clip_config(model, tokenizer))
    labels = torch.tensor([0, 1, 1, 0, 1])
    first, again = captions.sample(labels, seed=3), captions.sample(labels, seed=3)
    assert torch.equal(first["input_ids"], again["input_ids"])
    texts = tokenizer.batch_decode(first["input_ids"], skip_special_tokens=True)
    assert [("cat" in t, "dog" in t) for t in texts] == [(True, False), (False, True), (False, True), (True, False),
                                                         (False, True)]  # fmt: skip


def test_pretraining_a_clip_needs_the_contrastive_loss(images, tmp_path):
    from retrofit.errors import RetrofitError
    from retrofit.finetune import pretrain

    model = {"vision_config": {"image_size": 32, "patch_size": 8}}
    with pytest.raises(RetrofitError, match="needs loss contrastive"):
        pretrain(model, output=tmp_path / "x", data=str(images), max_steps=1)
    with pytest.raises(RetrofitError, match="unknown CLIPVisionConfig field 'patch'"):
        pretrain({"vision_config": {"patch": 8}}, output=tmp_path / "x", data=str(images), loss="contrastive")


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_images_alone_take_the_vision_arguments_and_return_dict(name, duals):
    """The export called with images alone (its own shortcut: the source needs text) answers as the full forward does
    for the image side: hidden states and attentions where asked (they were dropped: None), a tuple with
    `return_dict=False` (it gave a ModelOutput); the text tower's arguments have no text to apply to."""
    from transformers import AutoModel

    with auto_classes_registered():
        model = AutoModel.from_pretrained(duals[name][1], attn_implementation="eager").eval()
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    asked = {"output_hidden_states": True, "output_attentions": True}
    with torch.no_grad():
        alone = model(pixel_values=pixels, attention_mask=torch.ones(3, 5), **asked)
        full = model(input_ids=INPUT_IDS, pixel_values=pixels, **asked)
        as_tuple = model(pixel_values=pixels, return_dict=False)
    vision, expected = alone.vision_model_output, full.vision_model_output
    assert len(vision.hidden_states) == 4 + 1 and len(vision.attentions) == 4
    for got, want in zip(
        (*vision.hidden_states, *vision.attentions), (*expected.hidden_states, *expected.attentions), strict=True
    ):
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(alone.image_embeds, full.image_embeds)
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], alone.image_embeds)


def test_class_names_that_give_no_zero_shot_score_are_refused(duals, images, tmp_path, capsys):
    """One class (a folder of one class) scored 100 % whatever the model, a blank class name was scored as the prompt
    'a photo of a  .', and two names that give one prompt tied: each is one line, exit 2, and sweep refuses them too
    before any setting. Text labels of several classes cut by --limit to the images of one are scored over every
    class of the split: the prompts were those of the images read (one: refused; two of three: an easier choice,
    its accuracy inflated)."""
    import shutil

    from test_data import make_labelled_folder

    source, _ = duals["clip"]
    one = tmp_path / "one" / "test" / "cat"
    shutil.copytree(images / "test" / "cat", one)
    cases = [
        (str(tmp_path / "one"), [], "has 1 class ('cat'): zero-shot over one prompt always picks it"),
        (make_labelled_folder(tmp_path / "blank", images, ["cat", " ", "bird"]), [],
         "has a class with a blank name (' '), which gives no prompt"),
        (make_labelled_folder(tmp_path / "underscore", images, ["cat", "__", "bird"]), [],
         "has a class with a blank name ('__'), which gives no prompt"),  # was scored as 'a photo of a   .'
        (make_labelled_folder(tmp_path / "same", images, ["ankle_boot", "ankle boot", "bird"]), [],
         "the classes 'ankle boot' and 'ankle_boot'"),
    ]  # fmt: skip
    for data, extra, message in cases:
        split = "test" if data.endswith("one") else "train"
        assert main(["evaluate", str(source), "--data", data, "--split", split, "--zero-shot", *extra]) == 2
        captured = capsys.readouterr()
        assert message in captured.err and len(captured.err.strip().splitlines()) == 1 and not captured.out
    cut = make_labelled_folder(tmp_path / "cut", images, ["cat", "dog", "bird"])
    for limit in (1, 2):
        report = evaluate_models(source, data=cut, split="train", limit=limit, zero_shot=True, log=lambda _: None)
        assert report["labels"] == ["bird", "cat", "dog"] and report["num_examples"] == limit
    sweep = ["sweep", str(source), "--after-layer", "1", "--tokens", "3", "--data", cases[1][0], "--split", "train",
             "--calibrate-split", "nosuch", "--zero-shot", "--output", str(tmp_path / "sweep")]  # fmt: skip
    assert main(sweep) == 2
    captured = capsys.readouterr()
    assert cases[1][2] in captured.err and "setting after-layer" not in captured.out + captured.err
    assert not (tmp_path / "sweep").exists()
    # sweep's prompts too are the split's classes: the first image alone passes the class check (and then stops, for
    # want of a calibration split, before any setting is built)
    sweep[sweep.index(cases[1][0])] = cut
    assert main([*sweep, "--limit", "1"]) == 2
    assert "has no split 'nosuch'" in capsys.readouterr().err


def test_a_prompt_template_without_zero_shot_is_refused(duals, images, capsys):
    """--prompt-template without --zero-shot did nothing: the models were scored by feature similarity, and the
    report gave no sign of the template. One line, from the CLI and the Python API, before any model loads."""
    from retrofit.errors import RetrofitError
    from retrofit.sweep import SweepSettings

    source, _ = duals["clip"]
    message = "--prompt-template is used with --zero-shot only; add --zero-shot, or drop it"
    for argv in (["evaluate", str(source)], ["sweep", str(source), "--after-layer", "1", "--tokens", "2"]):
        assert main([*argv, "--data", str(images), "--prompt-template", "a {}."]) == 2
        captured = capsys.readouterr()
        assert message in captured.err and len(captured.err.strip().splitlines()) == 1 and not captured.out
    with pytest.raises(RetrofitError, match=message):
        evaluate_models([str(source)], data=str(images), prompt_template="a {}.", log=pytest.fail)
    with pytest.raises(RetrofitError, match=message):
        SweepSettings(after_layers=(1,), tokens=(2,), data=str(images), prompt_template="a {}.")


def test_texts_longer_than_the_text_tower_are_cut_and_captions_that_tie_are_refused(duals, images, tmp_path):
    """A tokenizer without a model_max_length (the tiny CLIP's, as a hand-built one has) cut nothing: a prompt of a
    long class name raised in the text tower (a ValueError traceback); it is cut at the tower's positions, as CLIP's
    own tokenizer cuts at 77. Pretraining captions that are the same tokens for two classes (characters the
    character tokenizer does not know, or cut at a short text tower) trained on identical captions without a word."""
    from test_data import make_labelled_folder

    from retrofit.errors import RetrofitError
    from retrofit.finetune import character_tokenizer, clip_config

    source, _ = duals["clip"]
    long = make_labelled_folder(tmp_path / "long", images, ["cat " * 30, "dog " * 30, "bird"])
    report = evaluate_models(str(source), data=long, split="train", zero_shot=True, log=lambda _: None)
    assert report["num_examples"] == 3 and len(report["prompts"]) == 3

    tokenizer = character_tokenizer()
    model = {"vision_config": {"image_size": 32, "patch_size": 8}}
    for names, text, message in [
        (["猫", "犬"], {}, "'a photo of a 猫.' and 'a photo of a 犬.' are the same tokens"),
        # CLIP reads up to its first end token, which an unknown character is to this tokenizer: both read 'a photo of
        # a h', though their tokens after it differ
        (["häuser", "hände"], {}, "'a photo of a häuser.' and 'a photo of a hände.' are the same tokens"),
        (["bird", "cat"], {"max_position_embeddings": 8}, "'a photo of a bird.' and 'a photo of a cat.' are the same"),
    ]:
        config = clip_config({**model, "text_config": text}, tokenizer)
        with pytest.raises(RetrofitError, match=message):
            Captions(tokenizer, names, ("a photo of a {}.", "a photo of the {}."), config)
    config = clip_config(model, tokenizer)
    Captions(tokenizer, ["bird", "cat"], ("a {}.", "a {}. "), config)  # one class's captions may be the same tokens


def test_prompts_of_the_same_tokens_are_refused_by_a_recipe_and_prompt_weight(duals, images, tmp_path):
    """A recipe's evaluation.zero_shot and finetune's --prompt-weight embedded prompts that the tokenizer turns into
    the same tokens (class names in characters it does not know: 猫, 犬) as they were: the two classes tied, and the
    run's before/after table showed a zero-shot top-1 without a word (evaluate and sweep refused them). One line,
    before training, nothing written."""
    import shutil

    import yaml

    from retrofit import finetune
    from retrofit.errors import RetrofitError
    from retrofit.recipes import run_recipe

    source, _ = duals["siglip"]
    data = tmp_path / "named"
    for split in ("train", "test"):
        for old, new in (("cat", "猫"), ("dog", "犬"), ("bird", "bird")):
            shutil.copytree(images / split / old, data / split / new)
    message = r"gives the prompts 'a \{\} 犬.' and 'a \{\} 猫.' the same tokens"
    recipe = {"source": str(source), "merge": {"after_layer": 2, "tokens": 3, "calibrate": False},
              "data": {"name": str(data), "eval_split": "test"}, "training": {"max_steps": 1, "batch_size": 4},
              "evaluation": {"zero_shot": True, "prompt_template": "a photo of a {}.", "speed": False},
              "export": {"output": str(tmp_path / "out")}}  # fmt: skip
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(recipe, allow_unicode=True))
    with pytest.raises(RetrofitError, match=message.replace(r"\{\}", "photo of a")):
        run_recipe(tmp_path / "run.yaml", log=lambda *_: None)
    with pytest.raises(RetrofitError, match=message.replace(r"\{\}", "drawing of a")):
        finetune(source, after_layer=2, num_tokens=3, data=str(data), prompt_weight=1.0,
                 prompt_templates=("a drawing of a {}.",), max_steps=1, batch_size=4, calibrate=False,
                 output=tmp_path / "ft", log=lambda *_: None)  # fmt: skip
    assert sorted(path.name for path in tmp_path.iterdir()) == ["named", "run.yaml"]


def test_prompt_weight_reads_each_class_as_the_unit_mean_of_its_prompts(duals, images):
    """--prompt-weight's class embeddings are the mean of the class's prompts' embeddings, normalised (CLIP's prompt
    ensembling): the mean of unit vectors is shorter than one, which would soften the image-text logits it is
    distilled on."""
    from types import SimpleNamespace

    from retrofit.finetune import prompt_embeddings
    from retrofit.loading import load_model, load_tokenizer
    from retrofit.settings import FinetuneArgs
    from retrofit.zero_shot import prompts, text_embeddings

    source, _ = duals["clip"]
    model = load_model(source).eval()
    tokenizer = load_tokenizer(str(source), model.config, log=lambda _: None)
    templates = ("a photo of a {}.", "a drawing of a {}.")
    args = FinetuneArgs(source=str(source), output="o", data=str(images), prompt_weight=1.0, prompt_templates=templates)
    got = prompt_embeddings(args, SimpleNamespace(teacher=None, model=model, tokenizer=tokenizer), log=lambda _: None)
    mean = torch.stack([text_embeddings(model, tokenizer, prompts(["bird", "cat", "dog"], t)) for t in templates])
    mean = mean.mean(dim=0)
    torch.testing.assert_close(got, mean / mean.norm(dim=-1, keepdim=True))
    assert mean.norm(dim=-1).max() < 0.999  # the two prompts differ: unnormalised, the rows would be shorter


def test_a_dual_encoder_exported_without_a_tokenizer_says_so_in_its_card(duals, images, tmp_path):
    """A CLIPModel checkpoint without tokenizer files converts (a warning in the log), but its card's examples embed
    text (pipeline, processor(text=...)) and said nothing of the missing tokenizer: a note says what to add.
    --prompt-weight, which embeds prompts with it, is one line before any work."""
    from retrofit import finetune
    from retrofit.errors import RetrofitError

    source, _ = duals["clip"]
    bare = tmp_path / "bare"
    bare.mkdir()
    for path in source.iterdir():
        if not path.name.startswith(("tokenizer", "vocab", "merges", "special_tokens")):
            (bare / path.name).write_bytes(path.read_bytes())
    logged = []
    convert(bare, after_layer=2, num_tokens=3, output=tmp_path / "pm", log=logged.append)
    assert any("has no tokenizer files" in line for line in logged)
    assert "- no tokenizer: the source had no usable one" in (tmp_path / "pm" / "README.md").read_text()
    # the user copies the source's tokenizer in, as the card says: --overwrite from the bare source deleted it
    added = [path.name for path in source.iterdir() if not (bare / path.name).exists()]
    assert "tokenizer_config.json" in added
    for name in added:
        (tmp_path / "pm" / name).write_bytes((source / name).read_bytes())
    for run in (lambda: convert(bare, after_layer=2, num_tokens=2, output=tmp_path / "pm", overwrite=True),
                lambda: finetune(bare, after_layer=2, num_tokens=2, data=str(images), max_steps=1, batch_size=4,
                                 output=tmp_path / "pm", overwrite=True, log=lambda *_: None)):  # fmt: skip
        with pytest.raises(
            RetrofitError, match=r"^--output '.*pm' holds .*tokenizer_config.json.*, which retrofit did"
        ):
            run()
    assert all((tmp_path / "pm" / name).is_file() for name in added)
    convert(source, after_layer=2, num_tokens=3, output=tmp_path / "pm", overwrite=True, log=logged.append)
    # an export whose tokenizer retrofit wrote is replaced whole, by one without a tokenizer too
    convert(bare, after_layer=2, num_tokens=3, output=tmp_path / "other", log=logged.append)
    convert(source, after_layer=2, num_tokens=3, output=tmp_path / "other", overwrite=True, log=logged.append)
    assert (tmp_path / "other" / "tokenizer_config.json").is_file()
    convert(bare, after_layer=2, num_tokens=3, output=tmp_path / "other", overwrite=True, log=logged.append)
    assert not (tmp_path / "other" / "tokenizer_config.json").exists()
    assert "no tokenizer" not in (tmp_path / "pm" / "README.md").read_text()
    with pytest.raises(RetrofitError, match=r"^--prompt-weight embeds prompts with the model's tokenizer, and '.*'"):
        finetune(bare, after_layer=2, num_tokens=3, data=str(images), prompt_weight=1.0, max_steps=1, batch_size=4,
                 output=tmp_path / "ft", log=lambda *_: None)  # fmt: skip
    assert not (tmp_path / "ft").exists()


def test_a_dual_encoder_whose_processor_gives_one_mean_takes_rgb_images(duals, images, tmp_path):
    """A CLIP whose image processor holds one mean and std (``image_mean: [0.5]``, as a grey-image processor writes
    them) takes 3-channel images as its vision config says: the channel count was read from the top-level config,
    which a dual encoder's has none of, so the processor's one mean made the images grey, and evaluate, calibration
    and finetune failed in the patch embedding ("expected ... 3 channels, but got 1 channels")."""
    import shutil

    from retrofit import finetune

    source = tmp_path / "clip"
    shutil.copytree(duals["clip"][0], source)
    processor = source / "preprocessor_config.json"
    settings = json.loads(processor.read_text())
    processor.write_text(json.dumps(settings | {"image_mean": [0.5], "image_std": [0.5]}))
    report = evaluate_models([source], data=str(images), split="test", zero_shot=True, log=lambda _: None)
    assert report["models"][0]["num_examples"] == 12
    out = tmp_path / "pm"
    convert(source, after_layer=2, num_tokens=3, output=out, calibrate_on=str(images), log=lambda _: None)
    result = finetune(out, output=tmp_path / "ft", data=str(images), max_steps=1, batch_size=4, progress=False,
                      log=lambda _: None)  # fmt: skip
    assert result.finished and result.eval_history


def test_zero_shot_logits_are_the_models_logits_per_image(duals):
    """The logits zero-shot scores and the prompt term of kd read (`zero_shot_logits` of `image_embeddings` and
    `text_embeddings`) are the model's own ``logits_per_image`` for the prompts as transformers' pipeline pads them:
    its learned temperature (the logit scale, exponentiated) and SigLIP's bias included, source and export alike. A
    scale or bias left out keeps every top-1 (accuracy and agreement unchanged) but gave the prompt KL another
    temperature without a word."""
    from retrofit.loading import load_config, load_model, load_tokenizer
    from retrofit.zero_shot import image_embeddings, text_embeddings, zero_shot_logits

    texts = ["a photo of a cat.", "a photo of a dog.", "a photo of a bird."]
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    # SigLIP: a tokenizer that gives a mask (transformers' default), and one that gives none (the Hub's SigLIP
    # tokenizers: `model_input_names` ["input_ids"]); the pipeline passes the text tower what the tokenizer gives
    cases = [
        ("clip", duals["clip"][0], True),
        ("siglip", duals["siglip"][1], True),
        ("siglip", duals["siglip"][1], False),
    ]
    for name, path, masked in cases:  # a source, an export
        model, config = load_model(path).eval(), load_config(path)
        tokenizer = load_tokenizer(path, config)
        if not masked:
            tokenizer.model_input_names = ["input_ids"]
        with torch.no_grad():
            model.logit_scale.fill_(1.5)  # exp: 4.48, not the scale's 1.5 itself
            if name == "siglip":
                model.logit_bias.fill_(-0.75)
            padding = {"padding": "max_length", "max_length": 64} if name == "siglip" else {"padding": True}
            inputs = tokenizer(texts, return_tensors="pt", **padding)
            assert ("attention_mask" in inputs) == masked
            expected = model(pixel_values=pixels, **inputs).logits_per_image
            text_embeds = text_embeddings(model, tokenizer, texts)
            got = zero_shot_logits(model, image_embeddings(model, pixels), text_embeds)
            in_batches = text_embeddings(model, tokenizer, texts, batch_size=2)  # 1,000 classes: in batches of 256
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5, msg=str(path))
        torch.testing.assert_close(in_batches, text_embeds, rtol=1e-5, atol=1e-5)


def test_prompts_put_each_class_name_in_the_template_in_label_order():
    """One prompt per class, in the labels' order, underscores read as spaces (``ankle_boot``: 'ankle boot'), and a
    template that is not one is one line from the Python API too (`prompts` is what every caller builds them with)."""
    from retrofit.errors import RetrofitError
    from retrofit.zero_shot import prompts

    assert prompts(["t_shirt", "ankle_boot", "cat"], "a {} here.") == [
        "a t shirt here.",
        "a ankle boot here.",
        "a cat here.",
    ]
    assert prompts(["cat"]) == [DEFAULT_TEMPLATE.format("cat")]
    for template in ("a {} {}", "a {:d}.", "a photo"):
        with pytest.raises(RetrofitError, match="^--prompt-template .* must hold exactly one"):
            prompts(["cat", "dog"], template)
