"""The model card: metadata (base_model, tags, library_name, model-index) and the before/after results table."""

from __future__ import annotations

import json
import shutil

import pytest
from huggingface_hub import ModelCard

from retrofit import convert
from retrofit.card import build_card, check_card_target, update_card
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
    card = build_card(model, repo_id="me/vit-pm")
    assert card.data.base_model == "google/vit-base-patch16-224"
    assert card.data.library_name == "transformers"
    assert {"retrofit", "patch-merger", "vit"} <= set(card.data.tags)
    assert "trust_remote_code=True" in card.text and "me/vit-pm" in card.text
    assert "- merger initialisation: random\n- not fine-tuned after the merge" in card.text


def test_update_card_writes_before_after_table_and_model_index(tiny_vit, export_dir, tmp_path):
    folder = tmp_path / "vit-pm"
    shutil.copytree(export_dir, folder)
    source = str(tiny_vit)
    update_card(folder, evaluation=evaluation(source, str(folder)))
    update_card(folder, benchmark=bench(source, str(folder)))  # a later bench keeps the evaluation
    card = ModelCard.load(folder / "README.md")
    before_after = card.text.split("### Before / after")[1].split("###")[0]
    assert "images/s (Test CPU (2 threads), fp32, batch 8)" in before_after
    assert f"| before: source (`{source}`) | 90.00 % | 99.00 % | 17.6 | 10.0 |" in before_after
    assert f"| after: this model (`{folder}`) | 85.00 % | 98.00 % | 9.2 | 18.0 |" in before_after
    assert "### Speed" in card.text and "1.80×" in card.text
    (top1, top5) = card.data.eval_results
    assert (top1.metric_type, top1.metric_value, top1.dataset_name) == ("accuracy", 0.85, "fashion-mnist")
    assert (top5.metric_type, top5.metric_value, top5.metric_args) == ("top_k_accuracy", 0.98, {"k": 5})
    metadata = card.data.to_dict()
    assert metadata["model-index"][0]["results"][0]["task"]["type"] == "image-classification"
    assert metadata["library_name"] == "transformers" and "patch-merger" in metadata["tags"]
    stored = json.loads((folder / "retrofit_results.json").read_text())
    assert set(stored) == {"evaluation", "benchmark"}
    # The rest of the card is untouched, and only one Results section exists.
    assert card.text.count("## Results") == 1 and "## How to use" in card.text


def test_card_target_checks(tiny_vit, export_dir):
    with pytest.raises(RetrofitError, match="not a retrofit export|not an export folder"):
        check_card_target(tiny_vit, [str(tiny_vit)])
    with pytest.raises(RetrofitError, match="must also be one of the models"):
        check_card_target(export_dir, [str(tiny_vit)])
    assert check_card_target(export_dir, [str(export_dir)]) == export_dir
