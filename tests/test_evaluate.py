"""`retrofit evaluate`: numbers equal a hand computation, label mapping by name, JSON, card, accelerate launch."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import TINY, launch_two_cpu_processes, save_tiny
from test_data import make_imagefolder, make_labelled_folder
from transformers import ViTConfig, ViTForImageClassification

import retrofit
from retrofit import convert
from retrofit.cli import main
from retrofit.data import class_names, load_split, make_dataloader
from retrofit.errors import RetrofitError
from retrofit.evaluation import evaluate_models, load_metric
from retrofit.loading import load_config, load_image_processor, load_model


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    # 5 test images per class -> 15: an odd count, so 2 processes need padding that gather_for_metrics must drop.
    return make_imagefolder(tmp_path_factory.mktemp("eval") / "colours", per_class=2, test_per_class=5)


@pytest.fixture(scope="module")
def trained_vit(tiny_vit, images, tmp_path_factory):
    """The tiny ViT trained a few steps on the colours, so that its predictions differ between images."""
    model = ViTForImageClassification.from_pretrained(tiny_vit)
    processor = load_image_processor(tiny_vit, model.config)
    dataset = load_split(str(images), "train")
    names = class_names(dataset)
    batch = next(iter(make_dataloader(dataset, processor, batch_size=len(dataset))))
    labels = torch.tensor([model.config.label2id[names[i]] for i in batch["labels"]])
    torch.manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(8):
        optimizer.zero_grad()
        model(pixel_values=batch["pixel_values"], labels=labels).loss.backward()
        optimizer.step()
    return save_tiny(model.eval(), tmp_path_factory.mktemp("trained") / "tiny-vit-trained")


@pytest.fixture(scope="module")
def export_dir(trained_vit, tmp_path_factory):
    out = tmp_path_factory.mktemp("evalexp") / "vit-pm"
    convert(trained_vit, after_layer=2, num_tokens=4, output=out, log=lambda _: None)
    return out


def by_hand(path, images) -> dict:
    """top-1, top-2 and mean loss computed directly from the logits."""
    model = load_model(path).eval()
    processor = load_image_processor(path, model.config)
    dataset = load_split(str(images), "test")
    batch = next(iter(make_dataloader(dataset, processor, batch_size=len(dataset))))
    with torch.no_grad():
        logits = model(pixel_values=batch["pixel_values"]).logits
    # The image folder numbers its classes alphabetically; the model has its own ids: map by name.
    names = class_names(dataset)
    labels = torch.tensor([model.config.label2id[names[i]] for i in batch["labels"]])
    return {
        "top1": (logits.argmax(-1) == labels).float().mean().item(),
        "top2": (logits.topk(2).indices == labels[:, None]).any(-1).float().mean().item(),
        "loss": torch.nn.functional.cross_entropy(logits, labels).item(),
        "distinct": len(set(logits.argmax(-1).tolist())),
    }


def test_shipped_metrics_load_offline():
    assert load_metric("accuracy").compute(predictions=[0, 1, 1], references=[0, 1, 0])["accuracy"] == pytest.approx(
        2 / 3
    )
    top_k = load_metric("top_k_accuracy").compute(predictions=[[2, 0], [1, 2]], references=[0, 0], k=2)
    assert top_k["top_k_accuracy"] == 0.5


def test_numbers_match_hand_computation(trained_vit, export_dir, images, tmp_path, capsys):
    """Each column equals a hand computation. The trained model is right on every image (top-1 = top-2 = 100 %), so a
    third copy favours 'cat' (a bias on its logit, so it says cat to every image): its top-1 misses what its top-2
    finds, and the table's top-2 and delta columns are checked on numbers that differ."""
    model = ViTForImageClassification.from_pretrained(trained_vit)
    with torch.no_grad():
        model.classifier.bias[model.config.label2id["cat"]] += 3.0
    biased = save_tiny(model, tmp_path / "biased")
    capsys.readouterr()  # the save's progress bars
    out = tmp_path / "eval.json"
    argv = ["evaluate", str(trained_vit), str(export_dir), str(biased), "--data", str(images), "--split", "test"]
    assert main([*argv, "--batch-size", "4", "--top-k", "2", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["num_examples"] == 15 and report["top_k"] == 2
    assert report["labels"] == ["cat", "dog", "bird"]  # the first model's, by id (not sorted by name)
    for row, path in zip(report["models"], (trained_vit, export_dir, biased), strict=True):
        expected = by_hand(path, images)
        # a real test: the model does not predict one class for everything (the biased copy says cat to all)
        assert expected["distinct"] > 1 or path == biased
        assert row["num_examples"] == 15
        assert row["top1"] == pytest.approx(expected["top1"])
        assert row["top2"] == pytest.approx(expected["top2"]) and "top5" not in row  # the key names its k
        assert row["loss"] == pytest.approx(expected["loss"], rel=1e-5)
    first, merged, favours_cat = report["models"]
    assert favours_cat["top1"] < favours_cat["top2"]  # a real test of the top-2 column
    assert merged["merged"] and merged["source"] == Path(trained_vit).name
    assert (merged["merge_after_layer"], merged["merge_num_tokens"]) == (2, 4)
    assert (first["merged"], first["source"], first["merge_after_layer"], first["merge_num_tokens"]) == (
        False, None, None, None
    )  # fmt: skip
    assert merged["gflops"] < first["gflops"]
    printed = capsys.readouterr().out
    assert f"`{trained_vit}`" in printed and "top-2" in printed and "wrote" not in printed
    line = next(line for line in printed.splitlines() if line.startswith(f"| `{biased}` |"))
    delta = 100 * (favours_cat["top1"] - first["top1"])
    assert delta < 0 and line == (
        f"| `{biased}` | {100 * favours_cat['top1']:.2f} % | {100 * favours_cat['top2']:.2f} % | "
        f"{favours_cat['loss']:.4f} | {favours_cat['gflops']:.3g} | {delta:+.2f} pt |"
    )


def test_permuted_labels_are_mapped_by_name(trained_vit, images, tmp_path):
    """A copy of the model whose classifier rows and label ids are permuted gives the same results."""
    model = ViTForImageClassification.from_pretrained(trained_vit)
    order = [2, 0, 1]  # new id i holds old class order[i]
    with torch.no_grad():
        model.classifier.weight.copy_(model.classifier.weight[order])
        model.classifier.bias.copy_(model.classifier.bias[order])
    names = [TINY["id2label"][old] for old in order]
    model.config.id2label = dict(enumerate(names))
    model.config.label2id = {name: i for i, name in enumerate(names)}
    permuted = save_tiny(model, tmp_path / "permuted")
    report = evaluate_models([str(trained_vit), str(permuted)], data=str(images), split="test", top_k=2, log=print)
    first, second = report["models"]
    assert first["top1"] > 0.5  # predictions vary, so a wrong mapping would show
    assert second["top1"] == pytest.approx(first["top1"])
    assert second["top2"] == pytest.approx(first["top2"])
    assert second["loss"] == pytest.approx(first["loss"], rel=1e-5)


def test_different_label_sets_are_refused(tiny_vit, images, tmp_path, capsys):
    other = save_tiny(
        ViTForImageClassification(ViTConfig(**{**TINY, "id2label": {0: "a", 1: "b", 2: "c"}, "label2id": None})),
        tmp_path / "other",
    )
    capsys.readouterr()  # the save's progress bars
    assert main(["evaluate", str(tiny_vit), str(other), "--data", str(images), "--split", "test"]) == 2
    err = capsys.readouterr().err.strip()
    assert "different label sets" in err and len(err.splitlines()) == 1


def test_data_with_other_classes_is_refused(tiny_vit, tmp_path, capsys):
    data = tmp_path / "shapes"
    for name in ("square", "circle"):
        (data / "test" / name).mkdir(parents=True)
    from PIL import Image

    for name in ("square", "circle"):
        Image.new("RGB", (32, 32)).save(data / "test" / name / "0.png")
    assert main(["evaluate", str(tiny_vit), "--data", str(data), "--split", "test"]) == 2
    assert "not among the models' labels" in capsys.readouterr().err


def test_card_gets_results_and_model_index(trained_vit, export_dir, images, tmp_path):
    import shutil

    from huggingface_hub import ModelCard

    folder = tmp_path / "vit-pm"
    shutil.copytree(export_dir, folder)
    argv = ["evaluate", str(trained_vit), str(folder), "--data", str(images), "--split", "test", "--card", str(folder)]
    assert main(argv) == 0
    card = ModelCard.load(folder / "README.md")
    (top1, top5) = card.data.eval_results
    stored = json.loads((folder / "retrofit_results.json").read_text())["evaluation"]
    assert top1.metric_type == "accuracy" and top1.metric_value == pytest.approx(stored["models"][1]["top1"])
    assert top5.metric_type == "top_k_accuracy" and top1.dataset_split == "test"
    assert "### Before / after" in card.text and "### Accuracy" in card.text
    assert card.text.count("## Results") == 1 and "split `test` (all 15 images)" in card.text
    assert stored["images"] == "all" and stored["sample_seed"] is None
    # The releases the numbers were measured with and the class that prepared each model's images (transformers
    # resizes with torchvision where it is installed, else with PIL): a rerun elsewhere can tell why it differs.
    import datasets
    import transformers

    releases = {"retrofit": retrofit.__version__, "torch": torch.__version__,
                "transformers": transformers.__version__, "datasets": datasets.__version__}  # fmt: skip
    assert stored["versions"] == releases
    processor = load_image_processor(folder, load_config(folder), log=lambda _: None)
    assert {row["image_processor"] for row in stored["models"]} == {type(processor).__name__}
    assert (
        "measured with `retrofit evaluate` (" + ", ".join(f"{k} {v}" for k, v in releases.items()) + "):" in card.text
    )
    # A second run replaces the section instead of appending another one, and says which images it scored.
    assert main([*argv, "--sample", "6"]) == 0
    text = ModelCard.load(folder / "README.md").text
    assert text.count("### Accuracy") == 1 and "split `test` (a shuffled sample of 6 images, seed 0)" in text
    stored = json.loads((folder / "retrofit_results.json").read_text())["evaluation"]
    assert stored["num_examples"] == 6 and stored["images"] == "sample" and stored["sample_seed"] == 0


def test_card_must_be_one_of_the_models(tiny_vit, export_dir, images, capsys):
    argv = ["evaluate", str(tiny_vit), "--data", str(images), "--split", "test", "--card", str(export_dir)]
    assert main(argv) == 2
    assert "must also be one of the models" in capsys.readouterr().err


def _evaluate_in_two_processes(models: list[str], images, out, *options: str) -> subprocess.CompletedProcess:
    done = launch_two_cpu_processes("-m", "retrofit.cli", "evaluate", *models, "--data", str(images), "--split", "test",
                                    "--batch-size", "4", "--json", str(out), *options)  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    # only the main process prints: the table on stdout, headed by the images it is on
    assert done.stdout.count("| model |") == 1 and done.stdout.count(f"{images} / test: ") == 1
    return done


@pytest.mark.slow
def test_two_processes_count_every_image_once(trained_vit, export_dir, images, tmp_path):
    """5 images on 2 processes of batch 4 (one pads its last batch): each counted once. A note (the first 5 images
    hold 1 of the split's 3 classes) is said once, not once per process."""
    single = evaluate_models([str(trained_vit), str(export_dir)], data=str(images), split="test", batch_size=4,
                             limit=5, log=lambda _: None)  # fmt: skip
    out = tmp_path / "eval.json"
    done = _evaluate_in_two_processes([str(trained_vit), str(export_dir)], images, out, "--limit", "5")
    assert done.stderr.count("hold 1 of its 3 classes") == 1, done.stderr
    report = json.loads(out.read_text())
    assert report["processes"] == 2 and report["num_examples"] == 5
    for mine, theirs in zip(report["models"], single["models"], strict=True):
        assert mine["top1"] == pytest.approx(theirs["top1"]) and mine["loss"] == pytest.approx(theirs["loss"])


@pytest.mark.slow
def test_two_processes_gather_backbone_similarity_once_per_image(backbone, backbone_other_processor, images, tmp_path):
    """A backbone, its merged twin and a copy with another image processor (feature similarity, no labels; two
    dataloaders read in lockstep): the same numbers in 2 processes as in one."""
    convert(backbone, after_layer=2, num_tokens=3, output=tmp_path / "backbone-pm", log=lambda _: None)
    models = [str(backbone), str(tmp_path / "backbone-pm"), str(backbone_other_processor)]
    single = evaluate_models(models, data=str(images), split="test", batch_size=4)
    out = tmp_path / "eval.json"
    _evaluate_in_two_processes(models, images, out)
    report = json.loads(out.read_text())
    assert report["metric"] == "similarity" and report["processes"] == 2 and report["num_examples"] == 15
    assert single["num_examples"] == 15 and single["models"][1]["similarity"] < 0.9999
    assert single["models"][2]["similarity"] == pytest.approx(
        similarity_by_hand(backbone, backbone_other_processor, images), abs=1e-6
    )
    for mine, theirs in zip(report["models"], single["models"], strict=True):
        assert mine["similarity"] == pytest.approx(theirs["similarity"], abs=1e-6)


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    from transformers import ViTModel

    torch.manual_seed(0)
    return save_tiny(ViTModel(ViTConfig(**TINY)), tmp_path_factory.mktemp("backbone") / "backbone")


@pytest.fixture(scope="module")
def backbone_other_processor(backbone, tmp_path_factory):
    """The same weights as `backbone`, saved with an image processor that normalises differently."""
    from transformers import ViTImageProcessor, ViTModel

    path = tmp_path_factory.mktemp("backbone-other") / "backbone-other"
    ViTModel.from_pretrained(backbone).save_pretrained(path)
    other = ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.2, 0.4, 0.6], image_std=[0.3, 0.2, 0.1])
    other.save_pretrained(path)
    return path


def similarity_by_hand(first, other, images) -> float:
    """Mean per-image cosine of `other`'s features to `first`'s, each model on its own processor's pixels."""
    from retrofit.losses import HeadReader

    dataset = load_split(str(images), "test", label_column=None)
    features = []
    for path in (first, other):
        model = load_model(path).eval()
        batch = next(iter(make_dataloader(dataset, load_image_processor(path, model.config), batch_size=len(dataset))))
        with torch.no_grad():
            features.append(HeadReader(model, features=False)(model, batch["pixel_values"]).features)
    return torch.nn.functional.cosine_similarity(features[1], features[0], dim=-1).mean().item()


def test_backbones_see_images_through_their_own_processors(backbone, backbone_other_processor, images):
    """Identical weights, different preprocessing: the second model is scored on its own processor's pixels (so below
    1), exactly as computed by hand, not on the first model's pixels (which would give 1)."""
    expected = similarity_by_hand(backbone, backbone_other_processor, images)
    assert expected < 0.999  # a real test: the processors' pixels give different features
    report = evaluate_models(
        [str(backbone), str(backbone_other_processor)], data=str(images), split="test", batch_size=4
    )
    first, second = report["models"]
    assert report["num_examples"] == 15 and second["num_examples"] == 15
    assert first["similarity"] == pytest.approx(1.0)
    assert second["similarity"] == pytest.approx(expected, abs=1e-6)
    assert f"| `{backbone_other_processor}` | {second['similarity']:.4f} |" in report["table"]


def test_backbones_with_equal_processors_share_one_pass(backbone, backbone_other_processor, images, monkeypatch):
    """A model compared with itself scores 1; models whose processors are equal share one dataloader."""
    import retrofit.data

    built = []
    original = retrofit.data.make_dataloader
    monkeypatch.setattr(retrofit.data, "make_dataloader", lambda *a, **kw: built.append(a[1]) or original(*a, **kw))
    models = [str(backbone), str(backbone), str(backbone_other_processor)]
    report = evaluate_models(models, data=str(images), split="test", batch_size=4)
    assert len(built) == 2  # one loader per distinct processor, not one per model
    assert [row["similarity"] for row in report["models"][:2]] == pytest.approx([1.0, 1.0])
    expected = similarity_by_hand(backbone, backbone_other_processor, images)
    assert report["models"][2]["similarity"] == pytest.approx(expected, abs=1e-6)


def test_feature_similarity_takes_one_loader_or_one_per_model(backbone, images):
    from retrofit.evaluation import feature_similarity

    model = load_model(backbone).eval()
    dataset = load_split(str(images), "test", label_column=None)
    loader = make_dataloader(dataset, load_image_processor(backbone, model.config), batch_size=5)
    shared = feature_similarity([model, model], loader)
    assert [row["similarity"] for row in shared] == pytest.approx([1.0, 1.0]) and shared[1]["num_examples"] == 15
    assert feature_similarity([model, model], [loader, loader]) == shared
    with pytest.raises(RetrofitError, match="2 dataloaders for 3 models"):
        feature_similarity([model, model, model], [loader, loader])
    other = make_dataloader(dataset, load_image_processor(backbone, model.config), batch_size=3)
    with pytest.raises(RetrofitError, match="same images in the same order"):
        feature_similarity([model, model], [loader, other])
    shuffled = make_dataloader(dataset, load_image_processor(backbone, model.config), batch_size=5, train=True)
    with pytest.raises(RetrofitError, match=r"same images in the same order .*shuffled: True"):
        feature_similarity([model, model], [loader, shuffled])  # the same size, in another order


# ----------------------------------------------------------------------------------------------------------------
# Bad input: one line, before the work
# ----------------------------------------------------------------------------------------------------------------


def test_bad_json_targets_are_refused_before_evaluating(tiny_vit, images, tmp_path, capsys):
    (tmp_path / "a-file").write_text("x")
    argv = ["evaluate", str(tiny_vit), "--data", str(images), "--split", "test", "--json"]
    for target, message in ((tmp_path, "is a folder"), (tmp_path / "a-file" / "x.json", "which is a file")):
        assert main([*argv, str(target)]) == 2
        out, err = capsys.readouterr()
        assert message in err and len(err.splitlines()) == 1
        assert out == ""  # refused before the run: no table printed


def test_json_is_written_whole_or_not_at_all(tiny_vit, images, tmp_path, capsys, monkeypatch):
    import errno

    import retrofit.atomic

    target = tmp_path / "eval.json"
    target.write_text('{"retrofit_report": "evaluate"}\n')  # an earlier run's report, which --overwrite replaces

    def disk_full(*args):
        raise OSError(errno.ENOSPC, "No space left on device", str(target))

    monkeypatch.setattr(retrofit.atomic.os, "replace", disk_full)
    argv = ["evaluate", str(tiny_vit), "--data", str(images), "--split", "test", "--json", str(target), "--overwrite"]
    assert main(argv) == 2
    assert "No space left" in capsys.readouterr().err
    assert target.read_text() == '{"retrofit_report": "evaluate"}\n' and sorted(p.name for p in tmp_path.iterdir()) == [
        "eval.json"
    ]


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        ([0, 1, 7, 2], "example 2 of '.*' has the label 7, outside the 3 classes"),
        ([0, 0.5, 1, 2], "example 1 of '.*' has the label 0.5, which is not a class id"),
        ([0, 1, -1, 2], r"example 2 of '.*' has no label \(-1\)"),
        (
            ["cat", "dog", "fish", "bird"],
            r"class names in '.*' \(4, e.g. \['fish'\]\) are not among the models' labels",
        ),
    ],
)
def test_labels_that_are_not_class_ids_are_refused(tiny_vit, images, tmp_path, capsys, monkeypatch, labels, message):
    """Labels outside a ClassLabel column: one line naming the example and its value, with evaluate's own hint (no
    --loss), before any model is loaded."""
    import re

    import retrofit.loading

    data = make_labelled_folder(tmp_path / "labelled", images, labels)
    monkeypatch.setattr(retrofit.loading, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    assert main(["evaluate", str(tiny_vit), "--data", data, "--split", "train", "--batch-size", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert re.search(message, err) and len(err.splitlines()) == 1 and "--loss" not in err


def test_string_labels_are_mapped_by_class_name(trained_vit, images, tmp_path):
    """A label column of class names scores exactly as the image folder's ClassLabel does on the same images."""
    files = sorted((images / "test").glob("*/*.png"))
    data = make_labelled_folder(tmp_path / "named", images, [path.parent.name for path in files])
    named = evaluate_models([str(trained_vit)], data=data, split="train", top_k=2)["models"][0]
    folder = evaluate_models([str(trained_vit)], data=str(images), split="test", top_k=2)["models"][0]
    assert folder["top1"] > 0.5  # a real test: names mapped in another order would score lower
    assert named["num_examples"] == folder["num_examples"] == 15
    assert named["top1"] == pytest.approx(folder["top1"]) and named["loss"] == pytest.approx(folder["loss"], rel=1e-5)


def test_score_models_refuses_labels_out_of_range(tiny_vit, images, tmp_path):
    """`sweep` scores through `score_models` directly: a label out of range is one line, not an IndexError."""
    from retrofit.evaluation import score_models

    data = load_split(make_labelled_folder(tmp_path / "labelled", images, [0, 1, 3, 2]), "train")
    model = load_model(tiny_vit).eval()
    loader = make_dataloader(data, load_image_processor(tiny_vit, model.config), batch_size=2)
    with pytest.raises(RetrofitError, match="example 2 has the label 3, outside the 3 classes"):
        score_models([model], loader, k=1)


def test_agreement_with_a_teacher_is_scored_on_the_teachers_top1(trained_vit, images):
    """`score_models(labels_from=teacher)` (kd on data without labels) takes the teacher's top-1 as each image's
    label: the teacher agrees with itself on every image. The zero-shot table's delta is the row's top-1 minus the
    first's."""
    from retrofit.evaluation import markdown_table, score_models

    teacher = load_model(trained_vit).eval()
    dataset = load_split(str(images), "test", label_column=None)
    loader = make_dataloader(dataset, load_image_processor(trained_vit, teacher.config), batch_size=5)
    itself = score_models([teacher], loader, k=1, labels_from=teacher)[0]
    assert (itself["top1"], itself["num_examples"]) == (1.0, 15)
    rows = [{"model": name, "top1": top1, "top3": 1.0, "agreement": 1.0, "gflops": 1.0} for name, top1 in
            (("a", 0.5), ("b", 0.25))]  # fmt: skip
    assert markdown_table({"metric": "zero-shot", "top_k": 3, "models": rows}).endswith("| 1 | -25.00 pt |")


@pytest.fixture(scope="module")
def full_clip(tmp_path_factory):
    """A tiny two-tower CLIPModel (no classifier) and a CLIPVisionModel holding the same vision weights."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPVisionModel

    torch.manual_seed(0)
    vision = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
                  patch_size=8)  # fmt: skip
    text = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=100)
    model = CLIPModel(CLIPConfig(vision_config=vision, text_config=text, projection_dim=16))
    root = tmp_path_factory.mktemp("clip")
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    model.save_pretrained(root / "clip")
    processor.save_pretrained(root / "clip")
    tower = CLIPVisionModel(model.config.vision_config)
    tower.load_state_dict(model.vision_model.state_dict())  # transformers >= 5.6: no vision_model wrapper
    tower.save_pretrained(root / "tower")
    processor.save_pretrained(root / "tower")
    return root / "clip", root / "tower"


def test_a_full_clip_model_is_compared_by_its_image_embeddings(full_clip, tiny_vit, images, capsys):
    """No random classifier is scored: a full CLIP model is a dual encoder, compared by its normalised image
    embeddings (similarity 1 to itself), and mixing it with a classifier names it for what it is."""
    clip, _ = full_clip
    report = evaluate_models([str(clip), str(clip)], data=str(images), split="test", batch_size=5)
    assert report["metric"] == "similarity" and report["num_examples"] == 15
    assert report["models"][1]["similarity"] == pytest.approx(1.0, abs=1e-6)
    capsys.readouterr()
    assert main(["evaluate", str(tiny_vit), str(clip), "--data", str(images), "--split", "test"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"'{clip}' an image-text dual encoder (CLIPModel)" in err
    assert len(err.splitlines()) == 1


def test_a_checkpoint_without_a_trained_classifier_is_compared_by_its_features(images, tmp_path):
    """A ViTForMaskedImageModeling checkpoint has no classifier (a new random one would score noise): evaluate
    compares the features of its ViTModel, and says so for each such model."""
    from transformers import ViTForMaskedImageModeling

    torch.manual_seed(0)
    mim = str(save_tiny(ViTForMaskedImageModeling(ViTConfig(**TINY)), tmp_path / "mim"))
    said: list[str] = []
    report = evaluate_models([mim, mim], data=str(images), split="test", batch_size=5, log=said.append)
    assert report["metric"] == "similarity" and [row["similarity"] for row in report["models"]] == pytest.approx(
        [1.0, 1.0]
    )
    note = (
        f"note: '{mim}' (ViTForMaskedImageModeling) has no trained classifier; comparing the features of its ViTModel"
    )
    assert [line for line in said if "classifier" in line] == [note, note]


def test_unsupported_models_and_missing_weights_are_named(tiny_vit, images, tmp_path, capsys):
    import shutil

    from transformers import BertConfig

    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(
        tmp_path / "bert"
    )
    shutil.copytree(tiny_vit, tmp_path / "no-weights")
    (tmp_path / "no-weights" / "model.safetensors").unlink()
    for model, message in (("bert", "model type 'bert' is not supported"), ("no-weights", "has no weights file")):
        assert main(["evaluate", str(tmp_path / model), "--data", str(images), "--split", "test"]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1 and "corrupt" not in err


def test_a_processor_size_the_model_refuses_is_one_line(tiny_vit, images, tmp_path, capsys):
    from transformers import ViTImageProcessor

    folder = tmp_path / "vit-48"
    load_model(tiny_vit).save_pretrained(folder)
    ViTImageProcessor(size={"height": 48, "width": 48}).save_pretrained(folder)
    assert main(["evaluate", str(folder), "--data", str(images), "--split", "test"]) == 2
    err = capsys.readouterr().err.strip()
    assert "cannot take the images its image processor gives" in err and len(err.splitlines()) == 1


def _with_nan(path: Path, out: Path, weight: str) -> Path:
    """A copy of the checkpoint at `path` whose parameter `weight` is NaN (a diverged fine-tune)."""
    from transformers import AutoModel, AutoModelForImageClassification

    auto = AutoModelForImageClassification if "classifier" in weight else AutoModel
    model = auto.from_pretrained(path)
    with torch.no_grad():
        model.get_parameter(weight).fill_(float("nan"))
    return save_tiny(model, out)


def test_non_finite_outputs_are_wrong_answers_not_guesses(trained_vit, backbone, images, tmp_path, capsys):
    """A model whose logits are NaN scores 0 % (not the accuracy of argmax over NaN, which picks a class), its loss
    and a backbone's similarity are null in valid JSON (not NaN), and the table says why."""
    broken = _with_nan(trained_vit, tmp_path / "diverged", "classifier.weight")
    out = tmp_path / "eval.json"
    argv = ["evaluate", str(trained_vit), str(broken), "--data", str(images), "--split", "test", "--json", str(out)]
    assert main(argv) == 0
    report = json.loads(out.read_text(), parse_constant=lambda name: pytest.fail(f"{name} in the JSON"))
    good, bad = report["models"]
    assert good["nonfinite"] == 0 and good["loss"] > 0 and good["top1"] == by_hand(trained_vit, images)["top1"]
    assert (bad["top1"], bad["top3"], bad["loss"], bad["nonfinite"]) == (0.0, 0.0, None, 15)
    printed = capsys.readouterr().out
    assert f"| `{broken}` | 0.00 % | 0.00 % | NaN |" in printed
    assert f"⚠ `{broken}` gives non-finite outputs (NaN or inf) on 15 of 15 images" in printed
    assert f"⚠ `{trained_vit}`" not in printed  # the model with finite outputs has no note

    broken_backbone = _with_nan(backbone, tmp_path / "diverged-backbone", "layernorm.weight")
    report = evaluate_models([str(backbone), str(broken_backbone)], data=str(images), split="test")
    assert [row["similarity"] for row in report["models"]] == [pytest.approx(1.0), None]
    assert [row["nonfinite"] for row in report["models"]] == [0, 15]


def test_zero_shot_refuses_a_tokenizer_that_gives_two_prompts_the_same_tokens(full_clip, images, capsys, tmp_path):
    """transformers builds a CLIPModel checkpoint without tokenizer files a tokenizer with an empty vocabulary:
    every prompt got the same tokens, so every class the same logit, and evaluate reported those ties as zero-shot
    accuracy. Without tokenizer files there is no tokenizer; one saved that way is refused for what it does."""
    import shutil

    from transformers import AutoTokenizer

    clip, _ = full_clip
    assert main(["evaluate", str(clip), "--data", str(images), "--split", "test", "--zero-shot"]) == 2
    captured = capsys.readouterr()
    assert f"'{clip}' has no usable tokenizer, which zero-shot classification" in captured.err
    assert len(captured.err.strip().splitlines()) == 1 and not captured.out
    empty = shutil.copytree(clip, tmp_path / "clip")
    AutoTokenizer.from_pretrained(clip).save_pretrained(empty)  # the 2-token tokenizer, saved with the model
    assert main(["evaluate", str(empty), "--data", str(images), "--split", "test", "--zero-shot"]) == 2
    captured = capsys.readouterr()
    prompts = "gives the prompts 'a photo of a bird.' and 'a photo of a cat.' the same tokens"
    assert f"the tokenizer of '{empty}' (2 tokens) {prompts}" in captured.err
    assert "copy its source's" in captured.err and len(captured.err.strip().splitlines()) == 1 and not captured.out


def _dinov2_fed_smaller_crops(path: Path) -> Path:
    """A tiny DINOv2 whose config says 64x64 images and whose processor crops 32x32 (as the Hub's say 518 and 224)."""
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    config = Dinov2Config(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                          image_size=64, patch_size=8)  # fmt: skip
    Dinov2Model(config).save_pretrained(path)
    crop = {"height": 32, "width": 32}
    BitImageProcessor(size={"shortest_edge": 32}, crop_size=crop, do_center_crop=True).save_pretrained(path)
    return path


def test_gflops_are_those_of_the_images_the_models_were_scored_on(images, tmp_path):
    """evaluate priced a model at its config's image size (DINOv2: 518) while its processor fed it 224 crops, so its
    GFLOPs and ratios disagreed with convert's and the card's, which price what the model sees."""
    from retrofit.cost import model_cost

    source = _dinov2_fed_smaller_crops(tmp_path / "dinov2")
    merged = convert(source, after_layer=2, num_tokens=4, output=tmp_path / "merged", log=lambda _: None)
    report = evaluate_models([str(source), str(merged.output)], data=str(images), split="test")
    assert [row["gflops"] for row in report["models"]] == [merged.before.gflops, merged.after.gflops]
    assert merged.before.gflops < model_cost(load_model(source).config).gflops  # what the config's 64x64 would cost


def test_a_dual_encoder_and_a_vision_tower_are_compared_only_by_like_features(full_clip, images, tmp_path, capsys):
    """A CLIPModel is compared by its projected image embeddings and a CLIPVisionModel by its pooler output: with a
    projection as wide as the tower, evaluate reported the cosine of the two (0.06 for the same vision weights) as
    their similarity. Now one line; a SigLIP, whose image embeddings are its tower's pooler output, compares with
    its tower (similarity 1)."""
    from conftest import save_tiny
    from test_families import TEXT, VISION
    from transformers import CLIPConfig, CLIPModel, SiglipConfig, SiglipModel, SiglipVisionModel

    _, tower = full_clip
    torch.manual_seed(0)
    clip = CLIPModel(CLIPConfig(vision_config=VISION, text_config=TEXT, projection_dim=VISION["hidden_size"]))
    clip = save_tiny(clip, tmp_path / "clip")
    capsys.readouterr()
    assert main(["evaluate", str(clip), str(tower), "--data", str(images), "--split", "test"]) == 2
    captured = capsys.readouterr()
    compared = f"'{clip}' (CLIPModel) is compared by its projected image embeddings and '{tower}' (CLIPVisionModel)"
    assert f"{compared} by its pooler output, which are not comparable" in captured.err
    assert len(captured.err.strip().splitlines()) == 1 and not captured.out

    siglip = SiglipModel(SiglipConfig(vision_config=VISION, text_config=TEXT))
    siglip_tower = SiglipVisionModel(siglip.config.vision_config)
    siglip_tower.load_state_dict(siglip.vision_model.state_dict())
    specs = [str(save_tiny(siglip, tmp_path / "siglip")), str(save_tiny(siglip_tower, tmp_path / "siglip-tower"))]
    report = evaluate_models(specs, data=str(images), split="test", log=lambda _: None)
    assert [row["similarity"] for row in report["models"]] == [pytest.approx(1.0), pytest.approx(1.0, abs=1e-5)]


def test_the_python_api_takes_paths_and_checks_its_settings_as_the_cli_does(tiny_vit, images):
    """`evaluate_models` read one model given as text letter by letter ("'/' has no config.json"), put a data Path
    into the JSON-ready report (which json.dumps then refused), and let a fractional top_k reach torch (TypeError).
    It leaves the caller's random generators as they were (its data loader drew from torch's)."""
    state = torch.random.get_rng_state()
    report = evaluate_models(str(tiny_vit), data=images, split="test", limit=2, log=lambda _: None)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert [row["model"] for row in report["models"]] == [str(tiny_vit)] and report["data"] == str(images)
    # top-5 of 3 classes is top-3, in the report and the table
    assert report["top_k"] == 3 and "| top-3 |" in report["table"] and report["images"] == "first"
    json.dumps(report)
    report = evaluate_models([Path(tiny_vit)], data=str(images), split="test", limit=20, log=lambda _: None)
    assert report["models"][0]["model"] == str(tiny_vit)
    assert report["num_examples"] == 15 and report["images"] == "all"  # a limit above the split's size: all of it
    for bad, message in ((dict(top_k=1.5), "--top-k must be a whole number"), (dict(split=""), "--split is empty")):
        with pytest.raises(RetrofitError, match=message):
            evaluate_models([tiny_vit], data=images, **bad, log=pytest.fail)


def test_a_limit_of_one_class_says_so_and_a_sample_takes_every_class(trained_vit, images, capsys):
    """The test split lists 5 birds, then 5 cats, then 5 dogs: --limit 5 scored the birds alone, printed as the
    accuracy without a word. One note says so and names --sample, which scores a shuffled sample, the same images
    every run; --limit and --sample together are one line."""
    from retrofit.evaluation import images_chosen
    from retrofit.settings import EVALUATE_SEED

    argv = ["evaluate", str(trained_vit), "--data", str(images), "--split", "test"]
    assert main([*argv, "--limit", "5"]) == 0
    out, err = capsys.readouterr()
    assert "the first 5 images" in err and "hold 1 of its 3 classes" in err and "--sample N" in err
    assert f"{images} / test: the first 5 images\n" in out  # the table's heading says it too
    assert main([*argv, "--sample", "6"]) == 0
    out, err = capsys.readouterr()
    assert ": a shuffled sample of 6 images, seed 0" in out and "note:" not in err
    assert len(set(load_split(str(images), "test", limit=6, sample_seed=EVALUATE_SEED)["label"])) > 1
    runs = [evaluate_models(trained_vit, data=images, split="test", sample=6, log=pytest.fail) for _ in range(2)]
    assert runs[0]["models"] == runs[1]["models"] and runs[0]["num_examples"] == 6
    assert (runs[0]["images"], runs[0]["sample_seed"]) == ("sample", EVALUATE_SEED)
    # a sample of more images than the split holds is all of them, in no order a seed chose
    assert images_chosen({"limit": 20, "sample_seed": 0}, 15) == {"images": "all", "sample_seed": None}
    assert main([*argv, "--limit", "5", "--sample", "6"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--limit (the first N images) and --sample (a shuffled sample) exclude each other" in err
    assert len(err.splitlines()) == 1


def test_labels_are_mapped_between_models_by_one_name_per_id(images, tmp_path, capsys):
    """A model naming two classes alike (ImageNet's id2label has 'crane' twice) compared with another whose ids
    differ: its label's id in the other model was read from uninitialised memory (an IndexError traceback 'Target
    94646931462204 is out of bounds', or a wrong loss and accuracy). Now one line. Names match as Unicode NFC, as the
    data's class names do (a label written decomposed is the same class)."""
    from retrofit.evaluation import prediction_map

    made = []
    for name, labels in (("twice", {0: "cat", 1: "dog", 2: "cat"}), ("other-ids", {0: "dog", 1: "cat", 2: "cat"})):
        config = ViTConfig(**{**TINY, "id2label": labels, "label2id": None})
        made.append(str(save_tiny(ViTForImageClassification(config), tmp_path / name)))
    data = make_labelled_folder(tmp_path / "ids", images, [0, 1, 2, 0, 1, 2])
    capsys.readouterr()
    assert main(["evaluate", *made, "--data", data, "--split", "train"]) == 2
    captured = capsys.readouterr()
    assert f"'{made[0]}' names two classes 'cat' (ids 0 and 2), so its predictions cannot be mapped" in captured.err
    assert len(captured.err.strip().splitlines()) == 1 and not captured.out
    composed, decomposed = {0: "caf\u00e9", 1: "dog"}, {0: "dog", 1: "cafe\u0301"}
    assert prediction_map(composed, decomposed, ("a", "b")) == [1, 0]
    # placeholder names (LABEL_i) carry no classes: ids are the same only where the counts are
    generic = {i: f"LABEL_{i}" for i in range(3)}
    with pytest.raises(RetrofitError, match="'b' and 'a' have different label sets \\(2 vs 3 labels"):
        prediction_map(generic, {0: "LABEL_0", 1: "LABEL_1"}, ("a", "b"))


def test_a_classifier_whose_labels_are_not_numbered_0_to_n_is_one_line(tiny_vit, images, tmp_path, capsys):
    """A config.json whose id2label skips ids (0, 1, 5 for 3 classes): evaluate beside another model ended in a
    KeyError traceback, alone it blamed the data ('the label 0, outside the 3 classes'); sweep too."""
    bad = save_tiny(load_model(tiny_vit), tmp_path / "skips")
    config = json.loads((bad / "config.json").read_text())
    config["id2label"] = {"0": "cat", "1": "dog", "5": "bird"}
    (bad / "config.json").write_text(json.dumps(config))
    capsys.readouterr()
    sweep = ["sweep", str(bad), "--after-layer", "1", "--tokens", "2", "--output", str(tmp_path / "sweep")]
    for argv in (["evaluate", str(tiny_vit), str(bad)], ["evaluate", str(bad)], sweep):
        assert main([*argv, "--data", str(images), "--split", "test"]) == 2
        captured = capsys.readouterr()
        assert f"the labels of '{bad}' have the ids [0, 1, 5], not 0..2" in captured.err
        assert len(captured.err.strip().splitlines()) == 1 and not captured.out
