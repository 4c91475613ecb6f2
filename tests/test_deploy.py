"""`retrofit export-onnx` and ONNX files in `retrofit bench`: the graph is checked against PyTorch before it is
kept, the file says what it is, and bad input is one line."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import error_line

import retrofit.deploy as deploy
from retrofit import convert
from retrofit.cli import main
from retrofit.errors import RetrofitError


@pytest.fixture(scope="module")
def export_dir(tiny_vit, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "vit-pm"
    convert(tiny_vit, after_layer=2, num_tokens=4, output=out, log=lambda _: None)
    return out


def refused(capsys, *argv) -> str:
    assert main([str(a) for a in argv]) == 2
    return error_line(capsys.readouterr().err)  # the one error line, after the log lines, if any


def test_export_and_bench_source_and_merged_in_onnx_runtime(tiny_vit, export_dir, tmp_path, capsys):
    for model, name in ((tiny_vit, "source.onnx"), (export_dir, "merged.onnx")):
        assert main(["export-onnx", str(model), "-o", str(tmp_path / name)]) == 0
        out, err = capsys.readouterr()  # every line is a log line, on stderr
        assert "ONNX Runtime against PyTorch on 4 images" in err and f"wrote {tmp_path / name}" in err and not out
    quick = ["--batch-size", "2", "--warmup", "1", "--repeats", "1", "--min-time", "0", "--latency-iters", "0"]
    report = tmp_path / "bench.json"
    argv = ["bench", str(tiny_vit), str(export_dir), str(tmp_path / "source.onnx"), str(tmp_path / "merged.onnx")]
    assert main([*argv, *quick, "--json", str(report)]) == 0
    rows = {row["model"]: row for row in json.loads(report.read_text())["models"]}
    merged = rows[str(tmp_path / "merged.onnx")]
    assert merged["compile"] == "onnxruntime" and merged["baseline"] == str(tmp_path / "source.onnx")
    assert merged["flops_ratio"] == pytest.approx(rows[str(export_dir)]["flops_ratio"])
    assert merged["results"]["2"]["status"] == "ok" and merged["results"]["2"]["speedup"] > 0
    assert "| onnxruntime |" in capsys.readouterr().out


def test_fp16_graph_and_overwrite_replaces_only_its_own_file(export_dir, tmp_path, capsys):
    target = tmp_path / "model.onnx"
    assert main(["export-onnx", str(export_dir), "-o", str(target), "--dtype", "fp16"]) == 0
    import onnxruntime

    session = onnxruntime.InferenceSession(str(target))
    assert session.get_inputs()[0].type == "tensor(float16)"
    assert "already exists" in refused(capsys, "export-onnx", export_dir, "-o", target)
    assert main(["export-onnx", str(export_dir), "-o", str(target), "--overwrite"]) == 0  # its own file
    other = tmp_path / "mine.onnx"
    other.write_bytes(b"not retrofit's")
    assert "is not a file retrofit wrote" in refused(capsys, "export-onnx", export_dir, "-o", other, "--overwrite")
    assert other.read_bytes() == b"not retrofit's"


def test_overwrite_replaces_only_the_weights_file_of_its_own_graph(export_dir, tmp_path, capsys, monkeypatch):
    """``X.onnx.data`` is where the exporter puts a graph's weights: one that is not the weights of the retrofit graph
    ``X.onnx`` beside it is refused before any work, with or without --overwrite; retrofit's own pair is replaced."""
    import onnx

    target, data = tmp_path / "new.onnx", tmp_path / "new.onnx.data"
    export = [str(a) for a in ("export-onnx", export_dir, "-o", target)]
    mine = "is not the weights file of an ONNX graph retrofit wrote"

    def refused_before_loading(*extra: str) -> str:
        with monkeypatch.context() as patch:
            patch.setattr("retrofit.loading.load_model", lambda *a, **k: pytest.fail("loaded the model"))
            return refused(capsys, *export, *extra)

    data.write_text("precious")  # no graph beside it
    assert mine in refused_before_loading() and mine in refused_before_loading("--overwrite")
    data.unlink()
    for extra in ((), ("--overwrite",)):  # the graph and its weights, written, then replaced
        assert main([*export, *extra]) == 0
        assert sorted(p.name for p in tmp_path.iterdir()) == ["new.onnx", "new.onnx.data"]
    info = deploy.onnx_info(target)  # retrofit's graph written with its weights inside (the TorchScript exporter)
    model = onnx.load(str(target))
    del model.metadata_props[:]
    onnx.save(model, str(target))
    deploy._write_metadata(target, {key: value for key, value in info.items() if key != "graph_sha256"})
    data.write_text("precious")
    assert mine in refused_before_loading("--overwrite")
    assert data.read_text() == "precious" and deploy.onnx_info(target) is not None


def test_a_graph_changed_after_export_is_the_users_file(export_dir, tmp_path, capsys):
    """A quantised copy of retrofit's graph (ONNX Runtime's own tool) keeps its metadata, but it is the user's file:
    --overwrite leaves it, and bench refuses to take it for the fp32 graph that metadata describes."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    graph = tmp_path / "pm.onnx"
    assert main(["export-onnx", str(export_dir), "-o", str(graph)]) == 0
    mine = tmp_path / "pm-int8.onnx"
    quantize_dynamic(str(graph), str(mine), weight_type=QuantType.QInt8)
    assert any(prop.key == deploy.MODEL_KEY for prop in onnx.load(str(mine)).metadata_props)  # kept by the tool
    before = mine.read_bytes()
    line = refused(capsys, "bench", mine, "--batch-size", "1", "--repeats", "1", "--min-time", "0")
    assert "was changed after retrofit wrote it" in line and "quantised" in line
    line = refused(capsys, "export-onnx", export_dir, "-o", mine, "--overwrite")
    assert "is not a file retrofit wrote" in line
    assert mine.read_bytes() == before and not (tmp_path / "pm-int8.onnx.data").exists()
    assert deploy.onnx_info(graph) is not None and deploy.onnx_info(mine) is None


def test_weights_changed_in_place_beside_the_graph_are_the_users(export_dir, tmp_path, capsys):
    """Weights edited in ``X.onnx.data`` itself (the graph left as it was) were replaced by --overwrite, and timed by
    bench as the graph the metadata describes: the file's sha256 is recorded beside the graph's."""
    graph, data = tmp_path / "pm.onnx", tmp_path / "pm.onnx.data"
    assert main(["export-onnx", str(export_dir), "-o", str(graph)]) == 0 and data.is_file()
    weights = bytearray(data.read_bytes())
    weights[100] ^= 1
    data.write_bytes(weights)
    line = refused(capsys, "export-onnx", export_dir, "-o", graph, "--overwrite")
    assert "'pm.onnx.data' was changed after retrofit wrote it" in line.replace(str(tmp_path) + "/", "")
    line = refused(capsys, "bench", graph, "--batch-size", "1", "--repeats", "1", "--min-time", "0")
    assert "was changed after retrofit wrote it" in line and "weights of" in line
    assert data.read_bytes() == weights
    weights[100] ^= 1  # as retrofit wrote it: its own again
    data.write_bytes(weights)
    assert main(["export-onnx", str(export_dir), "-o", str(graph), "--overwrite"]) == 0


def test_overwrite_with_a_graph_that_keeps_its_weights_inside_removes_the_old_weights_file(
    export_dir, tmp_path, monkeypatch
):
    """Replacing retrofit's graph + weights pair by a graph without external data (what the TorchScript exporter
    writes for small models) leaves no stale ``.onnx.data`` beside it."""
    import onnx

    target = tmp_path / "new.onnx"
    assert main(["export-onnx", str(export_dir), "-o", str(target)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new.onnx", "new.onnx.data"]
    real_export = deploy._export

    def weights_inside(model, pixels, path, exporter):
        names = real_export(model, pixels, path, exporter)
        onnx.save(onnx.load(str(path)), str(path))  # loads the external data and writes one file
        path.with_name(f"{path.name}.data").unlink()
        return names

    monkeypatch.setattr(deploy, "_export", weights_inside)
    assert main(["export-onnx", str(export_dir), "-o", str(target), "--overwrite"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new.onnx"]
    assert deploy.onnx_info(target) is not None


def test_overwrite_does_not_replace_a_file_put_there_during_the_export(export_dir, tmp_path, capsys, monkeypatch):
    """--overwrite checked that the graph and weights file were retrofit's before any work only: files of the user's
    copied there while the model was exported were replaced at the end without a word. Checked again, refused."""
    target, data = tmp_path / "new.onnx", tmp_path / "new.onnx.data"
    export = ["export-onnx", str(export_dir), "-o", str(target), "--overwrite"]
    assert main(export) == 0
    real_export = deploy._export

    def users_files_meanwhile(model, pixels, path, exporter):
        names = real_export(model, pixels, path, exporter)
        for file, text in ((target, "my graph"), (data, "my data")):
            file.unlink()
            file.write_text(text)
        return names

    monkeypatch.setattr(deploy, "_export", users_files_meanwhile)
    assert "became a file retrofit did not write while this run was working" in refused(capsys, *export)
    assert target.read_text() == "my graph" and data.read_text() == "my data"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new.onnx", "new.onnx.data"]


def test_a_ctrl_c_while_overwrite_swaps_the_graph_leaves_no_old_weights_file(export_dir, tmp_path, capsys, monkeypatch):
    """Ctrl-C as `export-onnx --overwrite` deleted the weights file of the graph it had replaced left that file (as
    large as the model) hidden beside the new pair, `.new.onnx.data.old-PID`. The swap ends first, then the command
    stops (exit 130), the new pair in place and nothing beside it."""
    import os
    import signal
    from pathlib import Path

    target = tmp_path / "new.onnx"
    export = ["export-onnx", str(export_dir), "-o", str(target)]
    assert main(export) == 0
    real_unlink, interrupted = Path.unlink, []

    def unlink_interrupted(path, *args, **kwargs):
        if ".old-" in path.name and not interrupted:
            interrupted.append(path)
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C lands as the old weights file is deleted
        return real_unlink(path, *args, **kwargs)

    handler = signal.signal(signal.SIGINT, signal.default_int_handler)  # a background job (CI) starts with SIG_IGN
    try:
        monkeypatch.setattr(Path, "unlink", unlink_interrupted)
        assert main([*export, "--overwrite"]) == 130
    finally:
        signal.signal(signal.SIGINT, handler)
        monkeypatch.undo()
    assert interrupted and "stopping once the new graph is in place" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new.onnx", "new.onnx.data"]
    assert deploy.onnx_info(target) is not None


def test_bad_input_is_one_line_and_writes_nothing(export_dir, tmp_path, capsys, monkeypatch):
    assert "must be a file name ending in .onnx" in refused(capsys, "export-onnx", export_dir, "-o", tmp_path / "m")
    err = refused(capsys, "export-onnx", export_dir, "-o", tmp_path / "m.safetensors")
    assert f"ending in .onnx, e.g. {tmp_path / 'm.onnx'}" in err  # in the folder given, not the current one
    for folder in (".", "/"):  # a folder without .onnx: said so (it raised ValueError: "has an empty name")
        assert "is a folder; give a file name, e.g. " in refused(capsys, "export-onnx", export_dir, "-o", folder)
    assert "does not exist" in refused(capsys, "export-onnx", tmp_path / "nope", "-o", tmp_path / "m.onnx")
    (tmp_path / "d.onnx").mkdir()
    err = refused(capsys, "export-onnx", export_dir, "-o", tmp_path / "d.onnx")
    assert f"is a folder; give a file name, e.g. {tmp_path / 'd.onnx' / 'model.onnx'}" in err
    assert "is a folder, not an ONNX file" in refused(capsys, "bench", tmp_path / "d.onnx")  # it said: does not exist
    (tmp_path / "d.onnx").rmdir()
    err = refused(capsys, "export-onnx", export_dir, "-o", export_dir / "model.onnx")
    assert "which this run reads" in err
    assert "--dtype must be one of fp32, fp16" in refused(capsys, "export-onnx", export_dir, "-o", "m.onnx", "--dtype",
                                                         "int8")  # fmt: skip
    real_run = deploy._run

    def drifting(path, pixels):  # a graph that computes something else
        return {name: value + 1.0 for name, value in real_run(path, pixels).items()}

    monkeypatch.setattr(deploy, "_run", drifting)
    err = refused(capsys, "export-onnx", export_dir, "-o", tmp_path / "m.onnx")
    assert "differ from PyTorch's by" in err and "it was not written" in err
    assert "--tolerance above" in err and "--dtype fp32" not in err  # it was fp32 already
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    assert "does not exist; make it with `retrofit export-onnx" in refused(capsys, "bench", tmp_path / "x.onnx")
    (tmp_path / "x.onnx").write_bytes(b"junk")
    assert "is not an ONNX file retrofit wrote" in refused(capsys, "bench", tmp_path / "x.onnx")


def test_a_graph_whose_weights_file_is_missing_or_cut_short_is_one_line_in_bench(export_dir, tmp_path, capsys):
    graph, data = tmp_path / "m.onnx", tmp_path / "m.onnx.data"
    assert main(["export-onnx", str(export_dir), "-o", str(graph)]) == 0 and data.is_file()
    capsys.readouterr()
    whole = data.read_bytes()
    quick = ["--batch-size", "1", "--warmup", "1", "--repeats", "1", "--min-time", "0", "--latency-iters", "0"]
    for weights in (None, whole[:1000]):
        data.unlink(missing_ok=True)
        if weights is not None:
            data.write_bytes(weights)
        assert main(["bench", str(graph), *quick]) == 2
        if weights is not None:  # cut short: not the file retrofit wrote (its sha256 is recorded), refused first
            err = capsys.readouterr().err.strip()
            assert "was changed after retrofit wrote it (quantised, cut short?)" in err and "\n" not in err
            assert "write new ones with `retrofit export-onnx` to another --output" in err
            line = refused(capsys, "export-onnx", export_dir, "-o", graph, "--overwrite")  # as it says: kept
            assert "was changed after retrofit wrote it" in line and data.read_bytes() == weights
            continue
        progress, err = capsys.readouterr().err.strip().splitlines()  # bench's progress is on stderr too
        assert progress == f"loading {graph} (ONNX Runtime) ..." and err.startswith("retrofit: error: ")
        assert f"ONNX Runtime cannot load '{graph}'" in err and "write it again with `retrofit export-onnx" in err


def test_a_processor_size_the_model_refuses_is_one_line_and_writes_nothing(export_dir, tmp_path, capsys):
    import shutil

    model = tmp_path / "vit-pm-224"
    shutil.copytree(export_dir, model)
    (model / "preprocessor_config.json").write_text('{"image_processor_type": "ViTImageProcessor"}')  # 224×224
    err = refused(capsys, "export-onnx", model, "-o", tmp_path / "m.onnx")
    assert f"'{model}' cannot run on the 224×224 images its image processor gives" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == [model.name]


def test_noise_images_go_through_the_models_own_processor(export_dir):
    from retrofit.loading import load_config, load_image_processor

    config = load_config(export_dir)
    pixels = deploy._sample_images(load_image_processor(export_dir, config, log=lambda _: None), config, 3)
    assert pixels.shape == (3, 3, 32, 32) and pixels.dtype == torch.float32 and pixels.std() > 0.1


def test_a_graph_records_the_gflops_of_the_images_it_runs_on(tmp_path):
    """A DINOv2's config says one size and its processor crops a smaller one, the size the graph is traced at: the
    file recorded the config size's GFLOPs, so bench showed the ONNX row at 4x the PyTorch row's cost."""
    from test_evaluate import _dinov2_fed_smaller_crops

    source = _dinov2_fed_smaller_crops(tmp_path / "dinov2")  # config 64x64, processor 32x32
    merged = convert(source, after_layer=2, num_tokens=4, output=tmp_path / "pm", log=lambda _: None)
    assert main(["export-onnx", str(tmp_path / "pm"), "--output", str(tmp_path / "pm.onnx")]) == 0
    info = deploy.onnx_info(tmp_path / "pm.onnx")
    assert info["gflops"] == pytest.approx(merged.after.gflops)
    assert info["model"] == "pm"  # the folder's name: a file one shares holds no local path


def test_a_bf16_export_gives_an_fp32_graph_checked_against_the_fp32_model(tiny_vit, tmp_path, capsys):
    """An export keeps its source's dtype (a bf16 checkpoint gives a bf16 export); its fp32 graph is checked against
    the model in fp32 (its weights upcast, exactly), not in bf16, whose rounding (~1e-3) failed the fp32 tolerance."""
    from conftest import save_tiny
    from transformers import ViTForImageClassification

    source = save_tiny(ViTForImageClassification.from_pretrained(tiny_vit, dtype=torch.bfloat16), tmp_path / "bf16")
    export = tmp_path / "bf16-pm"
    convert(source, after_layer=2, num_tokens=4, output=export, log=lambda _: None)
    assert json.loads((export / "config.json").read_text())["dtype"] == "bfloat16"
    assert main(["export-onnx", str(export), "-o", str(tmp_path / "model.onnx")]) == 0
    assert "(tolerance 0.0001); exporter: dynamo, fp32" in capsys.readouterr().err


def test_an_overwrite_stopped_between_the_weights_and_the_graph_keeps_the_old_pair(tmp_path, monkeypatch):
    """The new weights file goes in before the new graph: a Ctrl-C between the two renames left the old graph with the
    new graph's weights (offsets into another file). The old weights now go back beside the old graph."""
    output, work = tmp_path / "m.onnx", tmp_path / "work"
    work.mkdir()
    output.write_bytes(b"old graph")
    (tmp_path / "m.onnx.data").write_bytes(b"old weights")
    (work / "m.onnx").write_bytes(b"new graph")
    (work / "m.onnx.data").write_bytes(b"new weights")
    monkeypatch.setattr(deploy, "written_by_retrofit", lambda path: True)  # these bytes stand for retrofit's files,
    monkeypatch.setattr(deploy, "_own_weights_file", lambda output: True)  # as --overwrite checks again at the end
    replace, moved = os.replace, []

    def stopped_at_the_second_file(source, target):  # the graph, which goes in last: in place with its weights
        if Path(source).parent == work:
            moved.append(Path(source).name)
            if len(moved) == 2:
                raise KeyboardInterrupt
        replace(source, target)

    monkeypatch.setattr(deploy.os, "replace", stopped_at_the_second_file)
    with pytest.raises(KeyboardInterrupt):
        deploy._move_into_place(work, output, overwrite=True)
    assert moved == ["m.onnx.data", "m.onnx"]
    assert output.read_bytes() == b"old graph" and (tmp_path / "m.onnx.data").read_bytes() == b"old weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data", "work"]
    monkeypatch.setattr(deploy.os, "replace", replace)
    (work / "m.onnx.data").write_bytes(b"new weights")  # the exporter's files again, as a rerun writes them
    deploy._move_into_place(work, output, overwrite=True)
    assert output.read_bytes() == b"new graph" and (tmp_path / "m.onnx.data").read_bytes() == b"new weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data", "work"]
    # without --overwrite, a file that appeared at the output while the run was working is not replaced
    (work / "m.onnx").write_bytes(b"newer graph")
    with pytest.raises(RetrofitError, match="'.*m.onnx' appeared while this run was working; it was not replaced"):
        deploy._move_into_place(work, output, overwrite=False)
    assert output.read_bytes() == b"new graph"


def test_every_output_a_user_reads_is_checked_at_the_tolerance_of_its_dtype(tmp_path, capsys, monkeypatch):
    """A backbone's graph returns its hidden states and its pooler output, and both are checked: a graph whose pooler
    output alone drifts is refused (the check read the closest output). A refused fp16 graph is held to fp16's
    tolerance (2e-2) and suggests fp32. The exporter and ONNX Runtime are stood in for: what they would return is the
    PyTorch outputs plus a chosen drift."""
    from conftest import save_tiny
    from test_families import _vit_backbone

    source = save_tiny(_vit_backbone(), tmp_path / "backbone")
    drift = {}

    def export(model, pixels, path, exporter):
        drift["expected"] = deploy._outputs(model.float(), pixels)
        return list(drift["expected"])

    def run(path, pixels):
        return {name: value + drift.get(name, 0.0) for name, value in drift["expected"].items()}

    monkeypatch.setattr(deploy, "_export", export)
    monkeypatch.setattr(deploy, "_write_metadata", lambda path, info: None)
    monkeypatch.setattr(deploy, "_run", run)
    drift["pooler_output"] = 1.0
    err = refused(capsys, "export-onnx", source, "-o", tmp_path / "m.onnx", "--images", "2")
    assert list(drift["expected"]) == ["last_hidden_state", "pooler_output"]
    assert "differ from PyTorch's by 1 (more than 0.0001)" in err and "--dtype fp32" not in err
    drift["pooler_output"] = 0.5
    err = refused(capsys, "export-onnx", source, "-o", tmp_path / "m.onnx", "--images", "2", "--dtype", "fp16")
    assert "by 0.5 (more than 0.02); it was not written. Try --dtype fp32, a --tolerance above 0.5 " in err


def test_ctrl_c_during_the_onnx_trace_stops_once_it_ends_and_writes_nothing(export_dir, tmp_path, capsys, monkeypatch):
    """Ctrl-C while torch.onnx's dynamo exporter traced the model aborted the process in C++ (a screen of C++ frames,
    exit 134, its temporary folder left beside the output). The first Ctrl-C is held until the export ends; the
    command then stops (exit 130) with nothing written, from the CLI or Python, and the next run starts afresh."""
    import signal

    real, traced = deploy._export, []

    def interrupted_mid_trace(*args):
        signal.raise_signal(signal.SIGINT)
        traced.append(real(*args))  # the trace goes on to its end
        return traced[-1]

    output = tmp_path / "m.onnx"
    handler = signal.signal(signal.SIGINT, signal.default_int_handler)  # a background job (CI) starts with SIG_IGN
    try:
        with monkeypatch.context() as patch:
            patch.setattr(deploy, "_export", interrupted_mid_trace)
            assert main(["export-onnx", str(export_dir), "--output", str(output)]) == 130
            assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
            said: list[str] = []
            with pytest.raises(KeyboardInterrupt):
                deploy.export_onnx(export_dir, output, log=said.append)
            assert said == ["stopping once the ONNX export ends (Ctrl-C again to stop at once)"]
        assert len(traced) == 2 and list(tmp_path.iterdir()) == []
        err = capsys.readouterr().err.strip().splitlines()
        assert err == ["stopping once the ONNX export ends (Ctrl-C again to stop at once)", "retrofit: interrupted"]
        assert deploy.export_onnx(export_dir, output, log=lambda _: None).output == output  # no interrupt held over
    finally:
        signal.signal(signal.SIGINT, handler)
