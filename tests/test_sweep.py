"""`retrofit sweep`: one row per setting, the Pareto front, the verdict for a target speed-up, table + JSON + PNG."""

from __future__ import annotations

import json

import pytest
from conftest import HUB_ID
from test_data import make_imagefolder

from retrofit.cli import main
from retrofit.sweep import best_for_target, pareto_front


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_imagefolder(tmp_path_factory.mktemp("sweep") / "colours", per_class=3, test_per_class=3)


def test_pareto_front_and_best_setting():
    rows = [
        {"after_layer": 1, "tokens": 2, "top1": 0.5, "images_per_s": 300, "speedup": 3.0, "flops_ratio": 3.1},
        {"after_layer": 2, "tokens": 2, "top1": 0.7, "images_per_s": 200, "speedup": 2.0, "flops_ratio": 2.1},
        {"after_layer": 2, "tokens": 4, "top1": 0.6, "images_per_s": 150, "speedup": 1.5, "flops_ratio": 1.6},
        {"after_layer": 3, "tokens": 4, "top1": 0.9, "images_per_s": 120, "speedup": 1.2, "flops_ratio": 1.3},
    ]
    front = pareto_front(rows)
    assert [(r["after_layer"], r["tokens"]) for r in front] == [(3, 4), (2, 2), (1, 2)]  # (2, 4) is dominated
    best, verdict = best_for_target(rows, 1.8)
    assert (best["after_layer"], best["tokens"]) == (2, 2) and "--after-layer 2 --tokens 2" in verdict
    none, verdict = best_for_target(rows, 5.0)
    assert none is None and "No setting reaches" in verdict and "after-layer 1, 2 tokens" in verdict


def test_sweep_writes_table_json_and_plot(tiny_vit, images, tmp_path, capsys):
    out = tmp_path / "sweep"
    argv = ["sweep", str(tiny_vit), "--after-layer", "1,2", "--tokens", "2,4", "--data", str(images)]
    argv += ["--split", "test", "--calibrate-images", "6", "--bench-batch-size", "2", "--bench-repeats", "1"]
    assert main([*argv, "--target-speedup", "1.01", "--output", str(out)]) == 0
    report = json.loads((out / "sweep.json").read_text())
    settings = [(r["after_layer"], r["tokens"]) for r in report["settings_results"]]
    assert settings == [(1, 2), (1, 4), (2, 2), (2, 4)]
    for row in report["settings_results"]:
        assert 0 <= row["top1"] <= 1 and row["num_examples"] == 9 and row["images_per_s"] > 0
        assert row["flops_ratio"] > 1
    assert report["source_row"]["num_examples"] == 9 and report["source_row"]["images_per_s"] > 0
    rows = report["settings_results"]
    front = pareto_front(rows + [report["source_row"]])  # timings vary: check consistency, not which point wins
    assert [row["pareto"] for row in rows] == [any(p is row for p in front) for row in rows]
    assert report["verdict"]
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| source | all |" in (out / "sweep.md").read_text()
    printed = capsys.readouterr().out
    assert "| after layer | tokens |" in printed and report["verdict"] in printed


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--after-layer", "9", "--tokens", "2"], "--after-layer 9 is out of range"),
        (["--after-layer", "x", "--tokens", "2"], "not a comma-separated list"),
        (["--after-layer", "1", "--tokens", "2", "--target-speedup", "0.5"], "--target-speedup"),
        (["--after-layer", "1", "--tokens", "2", "--method", "magic"], "--method"),
        (["--after-layer", "1", "--tokens", "2", "--calibrate-images", "0"], "--calibrate-images must be at least 1"),
        (["--after-layer", "1", "--tokens", "2", "--finetune-batch-size", "0"], "--finetune-batch-size must be at"),
    ],
)
def test_bad_sweep_input(tiny_vit, images, tmp_path, capsys, options, message):
    out = tmp_path / "sweep"
    assert main(["sweep", str(tiny_vit), *options, "--data", str(images), "--output", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_finetune_sweep_on_a_hub_dataset_streams_only_what_it_uses(tiny_vit, hub_dataset, tmp_path, capsys):
    """--method finetune: each setting is fine-tuned briefly on a shuffled sample of the calibration split (steps x
    batch images), so a Hub dataset is streamed, never downloaded whole."""
    calls, _ = hub_dataset
    out = tmp_path / "sweep"
    argv = ["sweep", str(tiny_vit), "--after-layer", "1,2", "--tokens", "2", "--data", HUB_ID, "--split", "test"]
    argv += ["--method", "finetune", "--finetune-steps", "2", "--bench-batch-size", "2", "--bench-repeats", "1"]
    assert main([*argv, "--output", str(out), "--finetune-batch-size", "64"]) == 2  # 64 > the 30 training images
    assert "lower --finetune-batch-size" in capsys.readouterr().err and not out.exists()
    calls.clear()
    assert main([*argv, "--output", str(out), "--finetune-batch-size", "8"]) == 0
    report = json.loads((out / "sweep.json").read_text())
    assert report["method"] == "finetune 2 steps" and len(report["settings_results"]) == 2
    assert all(row["num_examples"] == 12 for row in report["settings_results"])
    assert calls and all(call["streaming"] for call in calls), calls
    assert {call["split"] for call in calls} == {"train", "test"}
