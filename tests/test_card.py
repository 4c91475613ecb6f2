"""The model card: metadata (base_model, tags, library_name, model-index) and the before/after results table."""

from __future__ import annotations

import json
import logging
import re
import shutil
import sys
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from retrofit import convert
from retrofit.card import RESULTS_END, TrainingInfo, build_card, check_card_target, update_card
from retrofit.errors import RetrofitError


@pytest.fixture(scope="module")
def export_dir(tiny_vit, tmp_path_factory):
    out = tmp_path_factory.mktemp("cardexp") / "vit-pm"
    convert(tiny_vit, after_layer=2, num_tokens=4, output=out, log=lambda _: None)
    return out


def evaluation(source: str, export: str) -> dict:
    rows = [
        {"model": source, "merged": False, "source": None, "top1": 0.9, "top5": 0.99, "loss": 0.3, "gflops": 17.6},
        {"model": export, "merged": True, "source": source, "top1": 0.85, "top5": 0.98, "loss": 0.4, "gflops": 9.2},
    ]
    return {"data": "fashion-mnist", "split": "test", "num_examples": 100, "top_k": 5, "models": rows, "table": "T"}


def bench(source: str, export: str) -> dict:
    def row(name, baseline, rate, gflops):
        return {
            "model": name,
            "compile": "eager",
            "baseline": baseline,
            "gflops": gflops,
            "flops_ratio": 17.6 / gflops if baseline else None,
            "results": {"8": {"status": "ok", "images_per_s": rate, "speedup": rate / 10.0, "peak_memory_mib": 400}},
            "latency_ms_batch1": {"p50": 20.0, "p90": 25.0},
        }

    return {
        "environment": {"hardware": "Test CPU (2 threads)", "dtype": "fp32", "torch": "2", "transformers": "5"},
        "settings": {"batch_sizes": [8]},
        "models": [row(source, None, 10.0, 17.6), row(export, source, 18.0, 9.2)],
    }


def test_build_card_metadata(tiny_vit, export_dir):
    from retrofit.loading import load_model

    model = load_model(export_dir)
    model.config.merge_source = "google/vit-base-patch16-224"
    card = build_card(model, repo_id="me/vit-pm", training=TrainingInfo())
    assert card.data.base_model == "google/vit-base-patch16-224"
    assert card.data.library_name == "transformers"
    assert {"retrofit", "patch-merger", "vit"} <= set(card.data.tags)
    assert "trust_remote_code=True" in card.text and "me/vit-pm" in card.text
    assert "- merger initialisation: random\n- not fine-tuned after the merge" in card.text
    assert "merged tokens, 1 prefix token passed through\n" in card.text  # was "1 prefix token(s)"
    # the command that fills in the Results section writes into the card (it named no --card, so it wrote nothing)
    assert re.search(
        r"Not evaluated yet: `retrofit evaluate \S+ THIS_FOLDER --data DATA --card THIS_FOLDER`", card.text
    )
    # convert's card names the seed that drew the merger's start (`convert --seed`): it said "random" alone
    card = (export_dir / "README.md").read_text()
    assert "- merger initialisation: random (seed 0)\n- not fine-tuned after the merge" in card
    assert "base_model" not in ModelCard(card).data.to_dict()  # a local source: no Hub model to link to
    # without a repo id, a Hub source's card is titled by its name, not its namespace
    assert "\n# vit-base-patch16-224-patch-merger\n" in build_card(model, training=TrainingInfo()).text


def test_the_card_states_the_merge_that_config_json_holds(export_dir):
    """Every sentence of convert's card that gives the merge (K, M, P) or the tokens per layer gives the export's own
    numbers (`convert --after-layer 2 --tokens 4` of a 4-layer ViT, whose CLS token bypasses the merger)."""
    config = json.loads((export_dir / "config.json").read_text())
    k, m, p = config["merge_after_layer"], config["merge_num_tokens"], config["merge_num_prefix_tokens"]
    assert (k, m, p, config["num_hidden_layers"]) == (2, 4, 1, 4)
    text = (export_dir / "README.md").read_text()
    assert f"after its first {k} encoder layers the\npatch tokens are replaced by {m} learned weighted averages" in text
    assert f"- PatchMerger before encoder layer {k} (layers 0..{k - 1} run on all tokens), {m} merged tokens, " in text
    assert f"its `last_hidden_state` has {p} + {m} tokens." in text
    assert "| tokens before | 17 | 17 | 17 | 17 |\n| tokens after | 17 | 17 | 5 | 5 |" in text  # 1 + 16 patches, 1 + 4


def test_the_card_of_a_model_merged_in_memory_names_no_source():
    """`insert_patch_merger` of a model built from a config (no checkpoint, so no source recorded), then
    `retrofit.export`: the card said "- source: `None`", "This is `` with a PatchMerger", was titled "-patch-merger"
    and told to run "retrofit evaluate  THIS_FOLDER"."""
    from conftest import TINY
    from transformers import ViTConfig, ViTForImageClassification

    from retrofit.surgery import insert_patch_merger

    merged = insert_patch_merger(ViTForImageClassification(ViTConfig(**TINY)), after_layer=2, num_tokens=4)
    assert merged.config.merge_source is None
    text = build_card(merged).text
    assert "\n# vit-patch-merger\n" in text and "This is a `ViTForImageClassification` with a **PatchMerger**" in text
    assert "- source: not recorded (merged from a model that was not loaded from a checkpoint)\n" in text
    assert "`retrofit evaluate SOURCE THIS_FOLDER --data DATA --card THIS_FOLDER`" in text
    assert "`None`" not in text and "This is `` with" not in text


def test_a_card_says_how_the_model_was_made_only_where_it_was_told(export_dir, tmp_path):
    """`retrofit.export(model, out, ...)` of a model trained elsewhere (a building block the README lists) wrote "merger
    initialisation: random ... not fine-tuned after the merge: expect lower accuracy", which export() cannot know."""
    from transformers import ViTImageProcessor

    from retrofit import export
    from retrofit.loading import load_model

    model = load_model(export_dir)
    export(model, tmp_path / "mine", image_processor=ViTImageProcessor(size={"height": 32, "width": 32}))
    text = (tmp_path / "mine" / "README.md").read_text()
    assert "- merger initialisation and training after the merge: not recorded" in text
    assert "random" not in text and "not fine-tuned" not in text


def test_card_shows_both_ways_to_load_names_the_folder_and_guesses_no_link(tiny_vit, tmp_path, monkeypatch):
    """Registered classes (no remote code) and bundled code (trust_remote_code), naming the export as it was given,
    or by its name alone where that was an absolute path; no address the package does not declare."""
    monkeypatch.chdir(tmp_path)
    for output, name in (("out/vit-pm8", "out/vit-pm8"), (str(tmp_path / "abs-pm8"), "abs-pm8")):
        convert(tiny_vit, after_layer=2, num_tokens=4, output=output, log=lambda _: None)
        text = (tmp_path / output / "README.md").read_text()
        assert "retrofit.register_auto_classes()" in text
        assert f'AutoModelForImageClassification.from_pretrained("{name}")' in text
        assert f'AutoModelForImageClassification.from_pretrained("{name}", trust_remote_code=True)' in text
        assert "path/to/this/folder" not in text and str(tmp_path) not in text
        assert "github.com" not in text and "retrofit-vit" not in text


def test_update_card_writes_before_after_table_and_model_index(tiny_vit, export_dir, tmp_path):
    folder = tmp_path / "vit-pm"
    shutil.copytree(export_dir, folder)
    source = str(tiny_vit)
    update_card(folder, evaluation=evaluation(source, str(folder)))
    update_card(folder, benchmark=bench(source, str(folder)))  # a later bench keeps the evaluation
    card = ModelCard.load(folder / "README.md")
    before_after = card.text.split("### Before / after")[1].split("###")[0]
    assert "images/s (Test CPU (2 threads), fp32, batch 8)" in before_after
    assert f"| before: source (`{tiny_vit.name}`) | 90.00 % | 99.00 % | 17.6 | 10.0 |" in before_after
    assert "| after: this model (`vit-pm`) | 85.00 % | 98.00 % | 9.2 | 18.0 |" in before_after
    assert "### Speed" in card.text and "1.80×" in card.text
    (top1, top5) = card.data.eval_results
    assert (top1.metric_type, top1.metric_value, top1.dataset_name) == ("accuracy", 0.85, "fashion-mnist")
    assert (top5.metric_type, top5.metric_value, top5.metric_args) == ("top_k_accuracy", 0.98, {"k": 5})
    metadata = card.data.to_dict()
    assert metadata["model-index"][0]["results"][0]["task"]["type"] == "image-classification"
    assert metadata["library_name"] == "transformers" and "patch-merger" in metadata["tags"]
    stored = json.loads((folder / "retrofit_results.json").read_text())
    # the name in the model-index; the model and tokenizer the results were measured on
    assert set(stored) == {"evaluation", "benchmark", "model_name", "model_sha256", "tokenizer_sha256"}
    # The rest of the card is untouched, and only one Results section exists.
    assert card.text.count("## Results") == 1 and "## How to use" in card.text


def test_update_card_keeps_what_the_user_wrote_into_the_card(tiny_vit, export_dir, tmp_path):
    """A model-index entry of the user's named as retrofit names its own ("Top-1 accuracy", on other data), a note in
    the Results section and a comment in the YAML metadata were all lost to `evaluate --card`."""
    folder = tmp_path / "vit-pm"
    shutil.copytree(export_dir, folder)
    source = str(tiny_vit)
    readme = folder / "README.md"
    mine = """# reviewed by legal: keep this comment
model-index:
- name: vit-pm
  results:
  - task:
      type: image-classification
    dataset:
      name: ImageNet-1k (our run)
      type: ILSVRC/imagenet-1k
      split: validation
    metrics:
    - type: accuracy
      value: 0.812
      name: Top-1 accuracy
"""
    text = readme.read_text().replace("---\n", "---\n" + mine, 1)
    readme.write_text(text.replace("\n## Results\n", "\n## Results\n\nOur private test set: 79.9 %.\n", 1))
    for _ in range(2):  # the second replaces the first's entries
        update_card(folder, evaluation=evaluation(source, str(folder)))
    update_card(folder, benchmark=bench(source, str(folder)))
    text = readme.read_text()
    assert text.startswith("---\n# reviewed by legal: keep this comment\nmodel-index:\n")
    assert "Our private test set: 79.9 %." in text and text.count("## Results") == 1 and "1.80×" in text
    card = ModelCard.load(readme)
    entries = [(r.dataset_name, r.metric_name, r.metric_value) for r in card.data.eval_results]
    assert entries == [("ImageNet-1k (our run)", "Top-1 accuracy", 0.812), ("fashion-mnist", "Top-1 accuracy", 0.85),
                       ("fashion-mnist", "Top-5 accuracy", 0.98)]  # fmt: skip
    update_card(folder, evaluation={**evaluation(source, str(folder)), "split": "train"})  # another split: replaced
    card = ModelCard.load(readme)
    assert [r.dataset_split for r in card.data.eval_results] == ["validation", "train", "train"]
    assert "# reviewed by legal" in readme.read_text() and "Our private test set" in readme.read_text()
    # one of retrofit's two lines deleted by hand, a note below: refused, not the whole section replaced
    text = readme.read_text()
    readme.write_text(text.replace(RESULTS_END, "") + "\nMy note after the results.\n")
    before = readme.read_bytes()
    for update in (lambda: update_card(folder, benchmark=bench(source, str(folder))),
                   lambda: check_card_target(folder, [str(folder)])):  # fmt: skip
        with pytest.raises(RetrofitError, match="one is missing, repeated or out of order"):
            update()
    assert readme.read_bytes() == before


def test_a_results_section_without_retrofits_lines_keeps_the_users_text(tiny_vit, export_dir, tmp_path):
    """A user who wrote their own results in place of retrofit's "Not evaluated yet" (its two marker lines with it)
    lost them to the next `--card`: a section without the lines was replaced whole. Retrofit's results now go at its
    top, between their lines, the user's text below; the next update replaces only retrofit's."""
    folder = shutil.copytree(export_dir, tmp_path / "vit-pm")
    readme = folder / "README.md"
    text = readme.read_text()
    mine = "## Results\n\nOur own measurement on an A100: 1234 images/s.\n\n## Citation\n\n@misc{me}\n"
    readme.write_text(text[: text.index("## Results")] + mine)
    for report in (
        {"benchmark": bench(str(tiny_vit), str(folder))},
        {"evaluation": evaluation(str(tiny_vit), str(folder))},
    ):
        update_card(folder, **report)
        text = readme.read_text()
        section = text[text.index("## Results") : text.index("## Citation")]
        assert section.index(RESULTS_END) < section.index("Our own measurement on an A100: 1234 images/s.")
        assert text.count("Our own measurement") == 1 and text.endswith("## Citation\n\n@misc{me}\n")
    assert "1.80×" in text and "85.00 %" in text and "Not evaluated yet" not in text
    # the two lines deleted, a note written under retrofit's "Not evaluated yet": only that paragraph goes
    fresh = shutil.copytree(export_dir, tmp_path / "fresh")
    text = (fresh / "README.md").read_text()
    text = "".join(line for line in text.splitlines(True) if not line.startswith("<!-- retrofit:"))
    (fresh / "README.md").write_text(text.rstrip("\n") + "\n\nMY NOTES: 81.2 % on our set.\n")  # (Results: last)
    assert "Not evaluated yet" in text
    update_card(fresh, benchmark=bench(str(tiny_vit), str(fresh)))
    text = (fresh / "README.md").read_text()
    assert "MY NOTES: 81.2 % on our set." in text and "Not evaluated yet" not in text
    # both lines deleted again (as --card advises where one is missing): retrofit's results shown there go, unedited
    text = "".join(line for line in text.splitlines(True) if not line.startswith("<!-- retrofit:"))
    (fresh / "README.md").write_text(text)
    update_card(fresh, evaluation={**evaluation(str(tiny_vit), str(fresh)), "split": "train"})
    text = (fresh / "README.md").read_text()
    assert text.count("### Before / after") == text.count("### Speed") == 1 and "MY NOTES" in text


def test_a_card_saved_with_windows_line_endings_keeps_them(tiny_vit, export_dir, tmp_path):
    """A card saved with CRLF line endings (an editor on Windows) came back from `evaluate --card` with the metadata's
    lines ending in LF and the rest in CRLF."""
    folder = tmp_path / "vit-pm"
    shutil.copytree(export_dir, folder)
    readme = folder / "README.md"
    text = readme.read_text().replace("---\n", "---\n# keep me\n", 1) + "\nMy note.\n"
    readme.write_bytes(text.replace("\n", "\r\n").encode())
    for _ in range(2):
        update_card(folder, evaluation=evaluation(str(tiny_vit), str(folder)))
    raw = readme.read_bytes()
    assert raw.count(b"\r\n") == raw.count(b"\n") > 50
    text = raw.decode()
    assert text.count("## Results") == 1 and "# keep me" in text and "My note." in text and "85.00 %" in text
    assert len(ModelCard.load(readme).data.eval_results) == 2  # retrofit's top-1 and top-5, once


def test_the_model_index_never_files_retrofits_scores_under_the_users_data_set(tiny_vit, export_dir, tmp_path):
    """huggingface_hub groups model-index entries by task, dataset type, config and split: retrofit's scores on one
    image folder were shown under the user's entry on another (both imagefolder), and added again by each run."""
    folder = tmp_path / "vit-pm"
    shutil.copytree(export_dir, folder)
    readme = folder / "README.md"
    mine = """model-index:
- name: vit-pm
  results:
  - task:
      type: image-classification
    dataset:
      name: my-holdout
      type: imagefolder
      split: test
    metrics:
    - type: f1
      value: 0.5
      name: Macro F1
"""
    readme.write_text(readme.read_text().replace("---\n", "---\n" + mine, 1))
    for _ in range(2):
        update_card(folder, evaluation={**evaluation(str(tiny_vit), str(folder)), "data": str(tmp_path / "imgs")})
    entries = [(r.dataset_name, r.metric_name) for r in ModelCard.load(readme).data.eval_results]
    assert entries == [("my-holdout", "Macro F1"), ("imgs", "Top-1 accuracy"), ("imgs", "Top-5 accuracy")]


def test_results_of_weights_changed_since_are_neither_shown_nor_pushed(tiny_vit, export_dir, tmp_path, capsys):
    """The user trained the export further and saved its weights in place: the stored results are of another model.
    push refuses to publish them, and the next --card run drops them (and their curve) before adding its own."""
    from safetensors.torch import load_file, save_file

    from retrofit.card import _stale_reports, measured_on, stale_results
    from retrofit.cli import main

    folder = tmp_path / "vit-pm"
    shutil.copytree(export_dir, folder)
    source = str(tiny_vit)
    update_card(folder, evaluation=evaluation(source, str(folder)))
    assert stale_results(folder) is None
    weights = load_file(folder / "model.safetensors")
    weights["classifier.bias"] += 1.0
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    assert "measured on another model" in stale_results(folder)
    assert main(["push", str(folder), "--repo-id", "me/vit-pm"]) == 2
    err = capsys.readouterr().err.strip()
    assert "measured on another model than the folder holds now" in err and len(err.splitlines()) == 1
    update_card(folder, benchmark=bench(source, str(folder)))
    stored = json.loads((folder / "retrofit_results.json").read_text())
    assert "evaluation" not in stored and "benchmark" in stored and stale_results(folder) is None
    card = ModelCard.load(folder / "README.md")
    assert not card.data.eval_results and "85.00 %" not in card.text and "1.80×" in card.text
    written = (folder / "config.json").read_text()
    config = json.loads(written)  # the classes renamed, the weights as they were
    config["id2label"] = {key: f"class {key}" for key in config["id2label"]}
    (folder / "config.json").write_text(json.dumps(config))
    assert "measured on another model" in stale_results(folder)
    (folder / "config.json").write_text(written)
    assert stale_results(folder) is None
    # a tokenizer put in since: a dual encoder's zero-shot scores read the prompts with it (they stayed, pushed);
    # speed and accuracy against labels do not (a tokenizer copied into an export as its card asks kept them)
    (folder / "tokenizer.json").write_text("{}")
    assert stale_results(folder) is None
    stored = json.loads((folder / "retrofit_results.json").read_text())
    zero_shot = stored | {"evaluation": {"metric": "zero-shot"}}
    (folder / "retrofit_results.json").write_text(json.dumps(zero_shot))
    assert "image processor or tokenizer changed" in stale_results(folder)
    assert _stale_reports(zero_shot, measured_on(folder)) == {"evaluation"}  # what the next --card drops
    del zero_shot["tokenizer_sha256"]  # results stored before the tokenizer was recorded: not compared
    (folder / "retrofit_results.json").write_text(json.dumps(zero_shot))
    assert stale_results(folder) is None


def test_a_card_names_local_models_and_data_without_their_paths(tiny_vit, export_dir, tmp_path):
    """`evaluate --card` / `bench --card` results are pushed with the export (README.md, retrofit_results.json): a
    local model or data set is named by its last parts, never by the path on this machine, with more parts where two
    folders have one name, so the before/after rows stay the right ones; Hub ids stay as they are."""
    source, folder = tmp_path / "runs" / "a" / "model", tmp_path / "runs" / "b" / "model"
    shutil.copytree(tiny_vit, source)
    shutil.copytree(export_dir, folder)
    report = evaluation(str(source), str(folder))
    report.update(data=str(tmp_path / "my images"), table=f"On `{tmp_path / 'my images'}`: `{source}` and `{folder}`")
    update_card(folder, evaluation=report)
    update_card(folder, benchmark=bench(str(source), str(folder)))
    text, stored = (folder / "README.md").read_text(), (folder / "retrofit_results.json").read_text()
    assert str(tmp_path) not in text and str(tmp_path) not in stored
    assert "| before: source (`a/model`) | 90.00 % | 99.00 % | 17.6 | 10.0 |" in text
    assert "| after: this model (`b/model`) | 85.00 % | 98.00 % | 9.2 | 18.0 |" in text
    assert "On `my images`: `a/model` and `b/model`" in text
    results = json.loads(stored)
    assert results["evaluation"]["this"] == results["benchmark"]["this"] == "b/model"
    assert [row["model"] for row in results["benchmark"]["models"]] == ["a/model", "b/model"]
    update_card(folder, evaluation=evaluation("google/vit-base-patch16-224", str(folder)))
    stored = json.loads((folder / "retrofit_results.json").read_text())["evaluation"]
    assert stored["models"][0]["model"] == "google/vit-base-patch16-224" and stored["data"] == "fashion-mnist"


def test_a_card_keeps_apart_a_folder_named_as_it_was_given_and_knows_local_data(
    tiny_vit, export_dir, tmp_path, monkeypatch
):
    """`evaluate ../model model --card model`: a bare name was kept as given and read like the other folder's
    shortened name, so the card showed the other model's numbers as this one's; and a local data folder, once
    published by its name, was declared a Hub dataset in the model-index."""
    source, folder = tmp_path / "a" / "model", tmp_path / "b" / "model"
    shutil.copytree(tiny_vit, source)
    shutil.copytree(export_dir, folder)
    (tmp_path / "b" / "images").mkdir()
    monkeypatch.chdir(tmp_path / "b")
    report = evaluation("../a/model", "model")
    report["data"] = "images"
    update_card("model", evaluation=report)
    text = (folder / "README.md").read_text()
    assert "| before: source (`a/model`) | 90.00 % |" in text and "| after: this model (`b/model`) | 85.00 % |" in text
    monkeypatch.chdir(tmp_path)  # a later update from elsewhere keeps what the data was
    update_card(folder, benchmark=bench(str(source), str(folder)))
    (top1, _) = ModelCard.load(folder / "README.md").data.eval_results
    assert (top1.dataset_type, top1.dataset_name, top1.metric_value) == ("imagefolder", "images", 0.85)
    saved = tmp_path / "saved"  # a `save_to_disk` folder is Arrow files, not an image folder
    saved.mkdir()
    (saved / "dataset_dict.json").write_text('{"splits": ["test"]}')
    update_card(folder, evaluation={**evaluation(str(source), str(folder)), "data": str(saved)})
    (top1, _) = ModelCard.load(folder / "README.md").data.eval_results
    assert (top1.dataset_type, top1.dataset_name) == ("arrow", "saved")


def test_card_target_checks(tiny_vit, export_dir):
    with pytest.raises(RetrofitError, match="not a retrofit export"):
        check_card_target(tiny_vit, [str(tiny_vit)])
    with pytest.raises(RetrofitError, match="must also be one of the models"):
        check_card_target(export_dir, [str(tiny_vit)])
    assert check_card_target(export_dir, [str(export_dir)]) == export_dir


def test_update_card_refuses_a_results_file_of_another_shape_in_one_line(tiny_vit, export_dir, tmp_path):
    folder = shutil.copytree(export_dir, tmp_path / "vit-pm")
    (folder / "retrofit_results.json").write_text('{"benchmark": 5}')
    before = (folder / "README.md").read_text()
    with pytest.raises(RetrofitError, match="retrofit_results.json does not hold retrofit's results"):
        update_card(folder, evaluation=evaluation(str(tiny_vit), str(folder)))
    assert (folder / "README.md").read_text() == before


# --- --card on a broken or full export: refused up front in one line, and never half-updated ---


BROKEN_CARDS = {
    "yaml": ("README.md", "---\nfoo: [unclosed\n---\n# hi\n", "README.md's metadata"),
    "yaml-list": ("README.md", "---\n- a\n- b\n---\n# hi\n", "README.md's metadata"),
    "json": ("retrofit_results.json", "{not json", "retrofit_results.json cannot be read"),
    "json-list": ("retrofit_results.json", "[1, 2]", "does not hold retrofit's results"),
    "json-shape": ("retrofit_results.json", '{"evaluation": {"models": [{"x": 1}]}}', "does not hold retrofit's"),
    # a user's notes under that name: the update kept them and added retrofit's keys, and push then uploaded them
    "json-users": ("retrofit_results.json", '{"my_notes": "private: see /home/alice/thesis"}', "so it is yours"),
}


@pytest.mark.parametrize("broken", BROKEN_CARDS)
def test_card_target_refuses_a_broken_readme_or_results_file(tiny_vit, export_dir, tmp_path, capsys, broken):
    from retrofit.cli import main

    name, text, message = BROKEN_CARDS[broken]
    folder = tmp_path / "vit-pm"
    shutil.copytree(export_dir, folder)
    (folder / name).write_text(text)
    with pytest.raises(RetrofitError, match=message):
        check_card_target(folder, [str(folder)])
    # The CLI refuses before it loads any data (which does not exist here), in one line.
    argv = ["evaluate", str(tiny_vit), str(folder), "--data", str(tmp_path / "no-data"), "--card", str(folder)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and ("delete" in err or "move it out" in err) and len(err.splitlines()) == 1
    assert (folder / name).read_text() == text


@pytest.mark.parametrize("name", ["README.md", "retrofit_results.json"])
def test_card_refuses_a_link_or_a_folder_where_it_writes(tiny_vit, export_dir, tmp_path, capsys, name):
    """A README.md or results file that is a link is refused before any measurement, in one line (the update would
    copy the linked file into the export, and `push` would upload it), as is a folder in its place."""
    from retrofit.cli import main

    secret = tmp_path / "private.txt"
    secret.write_text("SECRET=hunter2\n")
    folder = tmp_path / "vit-pm"
    shutil.copytree(export_dir, folder)
    message = f"{name} there is a link or not a regular file"
    (folder / name).unlink(missing_ok=True)
    (folder / name).symlink_to(secret)
    with pytest.raises(RetrofitError, match=message):
        update_card(folder, evaluation=evaluation(str(tiny_vit), str(folder)))
    argv = ["evaluate", str(tiny_vit), str(folder), "--data", str(tmp_path / "no-data"), "--card", str(folder)]
    assert main(argv) == 2  # before it loads any data (there is none)
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert (folder / name).is_symlink() and secret.read_text() == "SECRET=hunter2\n"
    copied = [path for path in folder.iterdir() if not path.is_symlink() and "SECRET" in path.read_text("latin-1")]
    assert not copied
    (folder / name).unlink()
    (folder / name).mkdir()
    with pytest.raises(RetrofitError, match=message):
        check_card_target(folder, [str(folder)])


def test_readme_without_metadata_is_updated_quietly(tiny_vit, export_dir, tmp_path, caplog):
    folder = tmp_path / "vit-pm"
    shutil.copytree(export_dir, folder)
    (folder / "README.md").write_text("# my notes\n\nHand-written card.\n")
    with caplog.at_level(logging.INFO):
        check_card_target(folder, [str(folder)])
        update_card(folder, evaluation=evaluation(str(tiny_vit), str(folder)))
    assert not [r for r in caplog.records if "metadata" in r.getMessage()]  # huggingface_hub: "...block was not found."
    card = ModelCard.load(folder / "README.md")
    assert "Hand-written card." in card.text and card.data.eval_results[0].metric_value == 0.85


@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_FSIZE and SIGXFSZ as on Linux")
def test_update_card_on_a_full_disk_leaves_the_export_as_it_was(tiny_vit, export_dir, tmp_path):
    import resource
    import signal

    folder = tmp_path / "vit-pm"
    shutil.copytree(export_dir, folder)
    update_card(folder, benchmark=bench(str(tiny_vit), str(folder)))  # an earlier results file to keep
    before = {path.name: path.read_bytes() for path in folder.iterdir()}
    # Writes past this size fail (EFBIG) as on a full disk: the new results file fits, the longer new README not.
    limit = len(before["README.md"])
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    writes_bytecode, sys.dont_write_bytecode = sys.dont_write_bytecode, True  # (Python keeps a .pyc cut at the limit)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        with pytest.raises(RetrofitError, match="the card was left as it was") as refused:
            update_card(folder, evaluation=evaluation(str(tiny_vit), str(folder)))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        sys.dont_write_bytecode = writes_bytecode
        signal.signal(signal.SIGXFSZ, handler)
    assert len(str(refused.value).splitlines()) == 1
    assert {path.name: path.read_bytes() for path in folder.iterdir()} == before  # no temp file, nothing replaced


def test_update_card_refuses_reports_that_do_not_measure_the_export(tiny_vit, export_dir, tmp_path):
    """`--card` refuses an export that is not one of the models measured; `update_card` from Python wrote the other
    models' tables into the card, and `push` published them."""
    folder = shutil.copytree(export_dir, tmp_path / "vit-pm")
    card = (folder / "README.md").read_bytes()
    for report in ({"evaluation": evaluation(str(tiny_vit), "other")}, {"benchmark": bench(str(tiny_vit), "other")}):
        with pytest.raises(RetrofitError, match=r"^update_card: no model of the \w+ is the export '.*vit-pm' \(its "):
            update_card(folder, **report)
    assert (folder / "README.md").read_bytes() == card and not (folder / "retrofit_results.json").exists()


def test_a_ctrl_c_while_a_card_is_written_leaves_its_files_all_new(tiny_vit, export_dir, tmp_path, monkeypatch):
    """`--card` renames the new retrofit_results.json and README.md into place one by one: a Ctrl-C between the two
    left the results file new and the card old (and the next --card showed the interrupted numbers). The renames now
    finish first, then the Ctrl-C stops the call."""
    import os
    import signal

    folder = shutil.copytree(export_dir, tmp_path / "vit-pm")
    update_card(folder, benchmark=bench(str(tiny_vit), str(folder)))
    real, renamed = os.replace, []

    def ctrl_c_after_the_first(src, dst):
        real(src, dst)
        if Path(dst).parent == folder and not renamed:
            renamed.append(dst)
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(os, "replace", ctrl_c_after_the_first)
    handler = signal.signal(signal.SIGINT, signal.default_int_handler)  # a background job (CI) starts with SIG_IGN
    try:
        with pytest.raises(KeyboardInterrupt):
            update_card(folder, evaluation=evaluation(str(tiny_vit), str(folder)))
    finally:
        signal.signal(signal.SIGINT, handler)
    assert renamed and "evaluation" in json.loads((folder / "retrofit_results.json").read_text())
    assert "90.00 %" in (folder / "README.md").read_text()  # the card shows that evaluation too


@pytest.mark.parametrize("key", ["top2", "top5"])  # as evaluate writes it; older files: "top5" for any k
def test_card_names_the_k_of_top_k(tiny_vit, export_dir, tmp_path, key):
    folder = tmp_path / "vit-pm"
    shutil.copytree(export_dir, folder)
    report = evaluation(str(tiny_vit), str(folder))
    report["top_k"] = 2
    report["models"] = [{**{k: v for k, v in row.items() if k != "top5"}, key: row["top5"]} for row in report["models"]]
    update_card(folder, evaluation=report)
    card = ModelCard.load(folder / "README.md")
    before_after = card.text.split("### Before / after")[1].split("###")[0]
    assert "| top-1 | top-2 |" in before_after and "top-5" not in before_after
    assert "| after: this model (`vit-pm`) | 85.00 % | 98.00 % |" in before_after
    (_, top_k) = card.data.eval_results
    assert (top_k.metric_name, top_k.metric_value, top_k.metric_args) == ("Top-2 accuracy", 0.98, {"k": 2})
    # `evaluate --top-k 1`: one "Top-1 accuracy" entry (there were two, top_k_accuracy with k 1 the second)
    update_card(folder, evaluation=report | {"top_k": 1})
    (top1,) = ModelCard.load(folder / "README.md").data.eval_results
    assert (top1.metric_type, top1.metric_name, top1.metric_value) == ("accuracy", "Top-1 accuracy", 0.85)


def curve_bench(source: str, export: str) -> dict:
    """A benchmark over batch sizes 1, 8 and 64 in two compile modes: CUDA graphs win at batch 1, eager above."""
    rates = {  # (model, mode) -> images/s at batch 1, 8, 64
        (source, "eager"): (100.0, 700.0, 1000.0),
        (export, "eager"): (90.0, 800.0, 1800.0),
        (source, "reduce-overhead"): (200.0, 720.0, 1000.0),
        (export, "reduce-overhead"): (250.0, 790.0, 1700.0),
    }
    models = []
    for (name, mode), row_rates in rates.items():
        baseline = source if name == export else None
        results = {}
        for bs, rate in zip((1, 8, 64), row_rates, strict=True):
            theirs = rates[(source, mode)][(1, 8, 64).index(bs)]
            results[str(bs)] = {"status": "ok", "images_per_s": rate, "speedup": rate / theirs if baseline else None}
        models.append({"model": name, "compile": mode, "baseline": baseline, "gflops": 9.2 if baseline else 17.6,
                       "flops_ratio": 1.9 if baseline else None, "results": results, "latency_ms_batch1": None,
                       "faster_from_batch_size": 1 if baseline and mode == "reduce-overhead" else None})  # fmt: skip
    return {
        "environment": {"hardware": "Test GPU", "dtype": "bf16", "torch": "2", "transformers": "5"},
        "settings": {"batch_sizes": [1, 8, 64]},
        "models": models,
    }


def test_a_benchmark_against_another_model_is_not_the_cards_before(tiny_vit, export_dir, tmp_path):
    """`bench OTHER EXPORT --card EXPORT` timed the export against an unmerged model it was not made from (same
    architecture, other weights): the card's Before / after table called that model "before: source". Only the model
    the export was made from (by its weights) is; the export's own speed stays."""
    import torch
    from conftest import TINY, save_tiny
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(5)
    other = save_tiny(ViTForImageClassification(ViTConfig(**TINY)), tmp_path / "other")
    folder = shutil.copytree(export_dir, tmp_path / "vit-pm")
    update_card(folder, benchmark=curve_bench(str(other), str(folder)))
    text = (folder / "README.md").read_text()
    assert "before: source" not in text and "| after: this model (`vit-pm`) | – | – | 9.2 | 1800.0 |" in text
    update_card(folder, benchmark=curve_bench(str(tiny_vit), str(folder)))  # timed against its source: shown
    assert f"| before: source (`{tiny_vit.name}`) | – | – | 17.6 | 1000.0 |" in (folder / "README.md").read_text()
    # a benchmark stored by an older retrofit (no "source"): its source's speed stays in the row, as it showed
    stored = json.loads((folder / "retrofit_results.json").read_text())
    del stored["benchmark"]["source"]
    (folder / "retrofit_results.json").write_text(json.dumps(stored))
    update_card(folder, evaluation=evaluation(str(tiny_vit), str(folder)))
    assert (
        f"| before: source (`{tiny_vit.name}`) | 90.00 % | 99.00 % | 17.6 | 1000.0 |"
        in (folder / "README.md").read_text()
    )


def test_the_card_shows_the_batch_size_curve_and_which_mode_serves_each_batch_size(tiny_vit, export_dir, tmp_path):
    """A benchmark of several batch sizes puts its curve (speed.png, retrofit's PNG) into the export, shown in the
    card with the advice of which compile mode serves each batch size; push uploads it; a later benchmark of one batch
    size removes it; a speed.png of the user's is never replaced, and the card is then left as it was."""
    from PIL import Image

    from retrofit.push import export_files

    folder = tmp_path / "vit-pm"
    shutil.copytree(export_dir, folder)
    update_card(folder, benchmark=curve_bench(str(tiny_vit), str(folder)))
    with Image.open(folder / "speed.png") as image:
        assert image.format == "PNG" and image.info["Software"] == "retrofit bench"
    text = (folder / "README.md").read_text()
    assert "![images/s against batch size, source and merged](speed.png)" in text
    assert "| images/s (Test GPU, bf16, batch 64) |" in text  # the before/after table: the largest batch's speeds
    assert f"| before: source (`{tiny_vit.name}`) | – | – | 17.6 | 1000.0 |" in text
    assert "| after: this model (`vit-pm`) | – | – | 9.2 | 1800.0 |" in text
    assert (
        "Fastest way to serve `vit-pm`: reduce-overhead at batch 1 (1.25×); eager at batch 8–64 (1.14–1.80×) "
        "(speed-up over the source in the same mode); at least as fast as its source in that mode at every batch "
        "size measured." in text
    )
    assert "speed.png" in export_files(folder)
    update_card(folder, evaluation=evaluation(str(tiny_vit), str(folder)))  # an evaluation keeps the curve
    assert "](speed.png)" in (folder / "README.md").read_text() and (folder / "speed.png").is_file()
    update_card(folder, benchmark=bench(str(tiny_vit), str(folder)))  # one batch size: no curve to show
    assert not (folder / "speed.png").exists() and "speed.png" not in (folder / "README.md").read_text()
    assert "speed.png" not in export_files(folder)
    Image.new("RGB", (4, 4)).save(folder / "speed.png")  # the user's own picture
    before = {path.name: path.read_bytes() for path in folder.iterdir()}
    check_card_target(folder, [str(folder)])  # `evaluate --card` draws no curve: the picture is no obstacle
    with pytest.raises(RetrofitError, match="speed.png there is not a plot retrofit drew"):
        check_card_target(folder, [str(folder)], curve=True)  # `bench --card` over several batch sizes
    with pytest.raises(RetrofitError, match="speed.png there is not a plot retrofit drew"):
        update_card(folder, benchmark=curve_bench(str(tiny_vit), str(folder)))
    assert {path.name: path.read_bytes() for path in folder.iterdir()} == before
    # push uploads the card's own files, not the user's files of those names (it published both)
    assert "speed.png" not in export_files(folder) and "retrofit_results.json" in export_files(folder)
    (folder / "retrofit_results.json").write_text('{"my": "notes"}')
    assert "retrofit_results.json" not in export_files(folder)


def test_the_mode_advice_names_the_batch_sizes_where_the_export_is_slower():
    from retrofit.benchmark import fastest_modes, markdown_table

    report = curve_bench("src", "out")
    report["models"][1]["results"]["8"].update(images_per_s=600.0, speedup=600.0 / 700.0)  # eager out, batch 8
    report["models"][3]["results"]["8"].update(images_per_s=700.0, speedup=700.0 / 720.0)  # graphs out, batch 8
    (advice,) = fastest_modes(report)
    assert advice.startswith("Fastest way to serve `out`: reduce-overhead at batch 1–8 (0.97–1.25×); eager at batch ")
    assert advice.endswith("slower than its source in that mode at batch 8 (0.97×).")
    assert advice in markdown_table(report)
    report["models"] = [row for row in report["models"] if row["compile"] == "eager"]  # one mode: nothing to choose
    assert fastest_modes(report) == []


def _card_metadata(export) -> dict:
    return ModelCard.load(export / "README.md").data.to_dict()


def test_the_card_carries_the_license_of_a_local_sources_card(tiny_vit, export_dir, tmp_path):
    """A merge keeps the source's license: `license` (and `license_name`, a web `license_link`) from the source
    folder's README.md front matter; a relative link (a file not in the export) is left out; a source without a card
    gives none."""
    source = shutil.copytree(tiny_vit, tmp_path / "licensed")
    (source / "README.md").write_text("---\nlicense: mit\nlicense_link: LICENSE\ntags: [x]\n---\n# A model\n")
    convert(source, after_layer=2, num_tokens=4, output=tmp_path / "mit", log=lambda _: None)
    data = _card_metadata(tmp_path / "mit")
    assert data["license"] == "mit" and "license_link" not in data
    assert "- license: `mit`, the source's" in (tmp_path / "mit" / "README.md").read_text()
    link = "https://ai.meta.com/resources/models-and-libraries/dinov3-license/"
    (source / "README.md").write_text(f"---\nlicense: other\nlicense_name: dinov3-license\nlicense_link: {link}\n---\n")
    convert(source, after_layer=2, num_tokens=4, output=tmp_path / "other", log=lambda _: None)
    data = _card_metadata(tmp_path / "other")
    assert (data["license"], data["license_name"], data["license_link"]) == ("other", "dinov3-license", link)
    assert f"- license: `dinov3-license` ({link}), the source's" in (tmp_path / "other" / "README.md").read_text()
    assert not {"license", "license_name", "license_link"} & set(_card_metadata(export_dir))  # tiny_vit has no card
    # A name or link without the license id: no license (the Hub's spec needs the id; the card read it and failed)
    (source / "README.md").write_text(f"---\nlicense_name: dinov3-license\nlicense_link: {link}\n---\n")
    convert(source, after_layer=2, num_tokens=4, output=tmp_path / "no-id", log=lambda _: None)
    assert not {"license", "license_name", "license_link"} & set(_card_metadata(tmp_path / "no-id"))
    # Only a license id, a name and a web link are carried: not markup, not several lines, not another scheme.
    bad = '---\nlicense: "mit\\n## Injected <img src=x>"\nlicense_link: "javascript:alert(1)"\n---\n'
    (source / "README.md").write_text(bad)
    convert(source, after_layer=2, num_tokens=4, output=tmp_path / "bad", log=lambda _: None)
    assert "license" not in _card_metadata(tmp_path / "bad")
    assert "Injected" not in (tmp_path / "bad" / "README.md").read_text()
    # A README.md that is a link (to a private file, say) is not read.
    private = tmp_path / "private.md"
    private.write_text("---\nlicense: secret-note-of-mine\n---\n")
    (source / "README.md").unlink()
    (source / "README.md").symlink_to(private)
    convert(source, after_layer=2, num_tokens=4, output=tmp_path / "linked", log=lambda _: None)
    assert "secret-note-of-mine" not in (tmp_path / "linked" / "README.md").read_text()


def test_the_card_carries_the_license_of_a_hub_sources_card_and_fails_soft(tiny_vit, export_dir, monkeypatch):
    """A Hub source's card is read through huggingface_hub (at the recorded commit; a relative license link points
    into its repo); when it cannot be read (offline, here), the card has no license and the export is written."""
    from retrofit import card
    from retrofit.loading import load_model

    model = load_model(export_dir)
    model.config.merge_source, model.config.merge_source_revision = "google/vit-base-patch16-224", "abc123"
    asked = []

    def card_metadata(repo_id, revision=None):
        asked.append((repo_id, revision))
        return {"license": "apache-2.0", "license_link": "LICENSE.md", "datasets": ["imagenet-1k"]}

    monkeypatch.setattr(card, "hub_card_metadata", card_metadata)
    data = build_card(model).data.to_dict()
    assert asked == [("google/vit-base-patch16-224", "abc123")]
    assert data["license"] == "apache-2.0" and "datasets" not in data  # the source's training data is not ours
    assert data["license_link"] == "https://huggingface.co/google/vit-base-patch16-224/blob/abc123/LICENSE.md"
    monkeypatch.undo()
    built = build_card(model)  # the real loader, offline (HF_HUB_OFFLINE=1 in the tests)
    assert "license" not in built.data.to_dict() and "- license:" not in built.text

    def unreachable(repo_id, revision=None):
        raise OSError("no network")

    monkeypatch.setattr(card, "hub_card_metadata", unreachable)
    assert "license" not in build_card(model).data.to_dict()


def test_a_fine_tune_lists_its_hub_dataset_but_not_a_local_folder(tiny_vit, hub_dataset, tmp_path):
    """`datasets:` names the Hub dataset a fine-tune trained on; a local folder's path is never published."""
    from conftest import HUB_ID

    from retrofit import finetune

    calls, _ = hub_dataset
    settings = dict(after_layer=2, num_tokens=4, max_steps=1, batch_size=8, progress=False, log=lambda _: None)
    finetune(tiny_vit, output=tmp_path / "ft-hub", data=HUB_ID, data_revision="v1", split="train", **settings)
    assert _card_metadata(tmp_path / "ft-hub")["datasets"] == [HUB_ID]
    # --data-revision: every read is of that revision, and the card says which (offline: the revision asked for)
    assert calls and all(call.get("revision", call.get("split_names")) == "v1" for call in calls), calls
    assert f"- fine-tuned on `{HUB_ID}` at commit `v1` train" in (tmp_path / "ft-hub" / "README.md").read_text()
    local = tmp_path / "colours"  # the image folder `hub_dataset` serves as HUB_ID
    finetune(tiny_vit, output=tmp_path / "ft-local", data=str(local), split="train", **settings)
    assert "datasets" not in _card_metadata(tmp_path / "ft-local")
    assert str(tmp_path) not in (tmp_path / "ft-local" / "README.md").read_text()


def test_a_fine_tune_reads_and_records_one_commit_though_the_hub_dataset_moves(
    tiny_vit, hub_dataset, tmp_path, monkeypatch
):
    """A fine-tune on a Hub dataset's branch read each split at the branch as it was at that load, and its card named
    the commit the branch was at when the card was written: a push during the run made the card name files it never
    read. The command asks once, and every load and the card use that commit."""
    import huggingface_hub
    from conftest import HUB_ID

    from retrofit import finetune

    calls, _ = hub_dataset
    asked = []

    def moving(repo_id, revision=None):  # each question finds a new commit on the branch
        asked.append(revision)
        return type("Info", (), {"sha": f"commit{len(asked)}"})()

    monkeypatch.setattr(huggingface_hub, "dataset_info", moving)
    finetune(tiny_vit, output=tmp_path / "ft", data=HUB_ID, data_revision="main", split="train", eval_split="test",
             after_layer=2, num_tokens=4, max_steps=1, batch_size=8, progress=False, log=lambda _: None)  # fmt: skip
    assert asked == ["main"]
    assert len(calls) >= 3 and all(call.get("revision", call.get("split_names")) == "commit1" for call in calls)
    assert f"- fine-tuned on `{HUB_ID}` at commit `commit1` train" in (tmp_path / "ft" / "README.md").read_text()


def test_a_value_the_evaluation_could_not_give_has_no_model_index_entry(tiny_vit, export_dir, tmp_path):
    """A model with non-finite outputs gets null for its loss or similarity (`evaluate`): the model-index entry was
    written without a value; now there is none, and an earlier evaluation's entries do not stay behind."""
    folder = tmp_path / "vit-pm"
    shutil.copytree(export_dir, folder)
    update_card(folder, evaluation=evaluation(str(tiny_vit), str(folder)))
    assert len(ModelCard.load(folder / "README.md").data.eval_results) == 2
    report = evaluation(str(tiny_vit), str(folder))
    report["models"][1] |= {"top1": None, "top5": None}
    update_card(folder, evaluation=report)
    card = ModelCard.load(folder / "README.md")
    assert not card.data.eval_results and "model-index" not in card.data.to_dict()
    report["models"][1] |= {"top1": 0.5}
    update_card(folder, evaluation=report)
    (top1,) = ModelCard.load(folder / "README.md").data.eval_results
    assert (top1.metric_type, top1.metric_value) == ("accuracy", 0.5)


def test_model_index_names_a_hub_dataset_and_the_images_the_values_are_on(tiny_vit, export_dir, tmp_path):
    """`evaluate --data fashion-mnist --limit 128 --card` published "accuracy on fashion-mnist (type fashion-mnist,
    split validation)": no Hub dataset of that id, fashion-mnist's validation is its test split, and nothing said
    the value was on 128 images only (and a fine-tune on it listed no dataset). The entry round-trips through
    huggingface_hub as the Hub reads it."""
    from huggingface_hub import metadata_load
    from huggingface_hub.repocard_data import model_index_to_eval_results

    folder = tmp_path / "vit-pm"
    shutil.copytree(export_dir, folder)
    report = evaluation(str(tiny_vit), str(folder)) | {"split": "validation", "images": "first", "num_examples": 128}
    update_card(folder, evaluation=report)
    name, results = model_index_to_eval_results(metadata_load(folder / "README.md")["model-index"])
    assert name == "vit-pm" and [r.metric_value for r in results] == [0.85, 0.98]
    for result in results:
        assert (result.dataset_type, result.dataset_split) == ("zalando-datasets/fashion_mnist", "test")
        assert result.dataset_name == "fashion-mnist (the first 128 images)"
    update_card(folder, evaluation=report | {"images": "sample", "sample_seed": 3})
    (top1, _) = ModelCard.load(folder / "README.md").data.eval_results
    assert top1.dataset_name == "fashion-mnist (a shuffled sample of 128 images, seed 3)"
    update_card(folder, evaluation=report | {"data": "me/pets", "images": "all"})  # a Hub dataset, all of its split
    (top1, _) = ModelCard.load(folder / "README.md").data.eval_results
    assert (top1.dataset_type, top1.dataset_name, top1.dataset_split) == ("me/pets", "me/pets", "validation")
    # a model fine-tuned on fashion-mnist lists the same Hub dataset under `datasets` (it listed none)
    from retrofit.loading import load_model

    training = TrainingInfo(data="fashion-mnist", steps=10, epochs=1.0, loss="kd")
    assert build_card(load_model(export_dir), training=training).data.datasets == ["zalando-datasets/fashion_mnist"]


def test_model_index_entries_the_user_added_stay(tiny_vit, export_dir, tmp_path):
    """`evaluate --card` replaced the whole model-index: an entry the user had added (their own ImageNet score) was
    lost. Now only retrofit's entries of an earlier evaluation are replaced, once each."""
    from huggingface_hub import EvalResult

    folder = tmp_path / "vit-pm"
    shutil.copytree(export_dir, folder)
    card = ModelCard.load(folder / "README.md")
    card.data.model_name = "vit-pm"
    mine = EvalResult(task_type="image-classification", dataset_type="imagenet-1k", dataset_name="ImageNet",
                      metric_type="accuracy", metric_value=0.8, metric_name="ImageNet top-1 (my eval)")  # fmt: skip
    card.data.eval_results = [mine]
    card.text += "\n## Citation\n\nMy paper.\n"  # a section of the user's after Results
    card.save(folder / "README.md")
    for _ in range(2):
        update_card(folder, evaluation=evaluation(str(tiny_vit), str(folder)))
        names = [result.metric_name for result in ModelCard.load(folder / "README.md").data.eval_results]
        assert names == ["ImageNet top-1 (my eval)", "Top-1 accuracy", "Top-5 accuracy"]
    report = evaluation(str(tiny_vit), str(folder))
    report["models"][1] |= {"top1": None, "top5": None}
    update_card(folder, evaluation=report)
    card = ModelCard.load(folder / "README.md")
    assert [(r.metric_name, r.metric_value) for r in card.data.eval_results] == [("ImageNet top-1 (my eval)", 0.8)]
    assert card.text.endswith("\n## Citation\n\nMy paper.\n") and card.text.count("## Results") == 1


def test_a_new_evaluation_replaces_retrofit_s_zero_shot_entries_and_names_the_source_it_was_made_from(
    tiny_vit, tiny_deit, export_dir, tmp_path
):
    """A second `evaluate --zero-shot --card` left the first one's entries in the model-index next to its own (they
    read as the user's), had retrofit not known its zero-shot metric names; and the before row is the model the export
    was made from (its recorded weights), not the first unmerged model evaluated."""
    folder = tmp_path / "vit-pm"
    shutil.copytree(export_dir, folder)
    report = evaluation(str(tiny_vit), str(folder))
    report["models"].insert(0, {**report["models"][0], "model": str(tiny_deit), "top1": 0.5})  # not its source
    for top1 in (0.6, 0.7):
        report["models"][-1]["top1"] = top1
        update_card(folder, evaluation=report | {"metric": "zero-shot", "prompts": ["a photo of a {}."]})
    card = ModelCard.load(folder / "README.md")
    assert [(r.metric_name, r.metric_value) for r in card.data.eval_results] == [
        ("Zero-shot top-1 accuracy", 0.7),
        ("Zero-shot top-5 accuracy", 0.98),
    ]
    assert f"| before: source (`{tiny_vit.name}`) | 90.00 % | 99.00 % |" in card.text
    assert "| | zero-shot top-1 | zero-shot top-5 |" in card.text  # not a classifier's own accuracy
    assert "### Zero-shot accuracy (prompts like 'a photo of a {}.')" in card.text


def test_a_backbone_measured_against_itself_publishes_no_similarity(tiny_vit, export_dir, tmp_path):
    """`evaluate EXPORT SOURCE --card EXPORT` of backbones: similarity is to the first model, the export itself, and
    the model-index published "Feature cosine similarity to vit-pm: 1.0" as the export's result."""
    folder = tmp_path / "vit-pm"
    shutil.copytree(export_dir, folder)
    rows = [{"model": str(folder), "merged": True, "similarity": 1.0, "gflops": 9.2},
            {"model": str(tiny_vit), "merged": False, "similarity": 0.97, "gflops": 17.6}]  # fmt: skip
    report = {"metric": "similarity", "data": "fashion-mnist", "split": "test", "num_examples": 100, "models": rows,
              "table": "T"}  # fmt: skip
    update_card(folder, evaluation=report)
    assert not ModelCard.load(folder / "README.md").data.eval_results
    update_card(folder, evaluation=report | {"models": rows[::-1]})  # the source first: similarity to it
    (result,) = ModelCard.load(folder / "README.md").data.eval_results
    assert (result.metric_type, result.metric_value) == ("cosine_similarity", 1.0)
    assert result.metric_name == f"Feature cosine similarity to {tiny_vit.name}"
