"""`accelerate launch` with 2 CPU processes (gloo): they train in sync, only the main process writes, and a run
resumed in the same launch ends with the weights of an uninterrupted one."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest
from conftest import launch_two_cpu_processes
from test_data import make_imagefolder

from retrofit.checkpoints import list_checkpoints

DRIVER = textwrap.dedent(
    """
    import json, sys
    from accelerate import PartialState
    from retrofit.finetune import finetune

    source, data, output, report = sys.argv[1:5]
    state = PartialState()  # before the runs, as a script that wants its rank makes it (on CPU: not distributed)
    settings = dict(after_layer=2, num_tokens=4, data=data, loss="mix", max_steps=3, batch_size=4, save_every=2,
                    progress=False, eval_batch_size=6, augment=True)
    result = finetune(source, output=output, eval_at_start=True, **settings)
    # the same run stopped after step 2 (the end of an epoch), then resumed in this process (the same process group)
    finetune(source, output=output + "-cut", stop_after=2, **settings)
    resumed = finetune(source, output=output + "-cut", resume=True, **settings)
    digest = lambda model: {name: param.detach().double().sum().item() for name, param in model.named_parameters()}
    record = {"rank": state.process_index, "processes": state.num_processes, "digest": digest(result.model),
              "resumed": digest(resumed.model), "output": None if result.output is None else str(result.output),
              "history": result.eval_history}
    with open(f"{report}/rank{state.process_index}.json", "w") as handle:
        json.dump(record, handle)
    """
)


@pytest.mark.slow
def test_two_cpu_processes_stay_in_sync(tiny_vit, tmp_path):
    data = make_imagefolder(tmp_path / "colours", per_class=4, test_per_class=2)
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    report = tmp_path / "report"
    report.mkdir()
    out = tmp_path / "runs" / "pm"
    done = launch_two_cpu_processes(str(driver), str(tiny_vit), str(data), str(out), str(report))
    assert done.returncode == 0, done.stderr[:6000]
    ranks = [json.loads((report / f"rank{i}.json").read_text()) for i in (0, 1)]
    assert [r["processes"] for r in ranks] == [2, 2]
    assert ranks[0]["digest"] == ranks[1]["digest"]  # identical weights on both processes after training
    assert ranks[0]["resumed"] == ranks[0]["digest"]  # a resumed run (with augmentation) ends the same
    assert ranks[0]["history"] == ranks[1]["history"]  # gathered metrics agree
    assert ranks[0]["history"][0]["examples"] == 6  # gather_for_metrics drops the padding of the last batch
    assert ranks[0]["output"] == str(out) and ranks[1]["output"] is None
    # no stray temp folders; the resumed run's checkpoints record its 2 processes (resuming with 1 is refused)
    assert sorted(p.name for p in out.parent.iterdir()) == ["pm", "pm-checkpoints", "pm-cut", "pm-cut-checkpoints"]
    record = json.loads((out.parent / "pm-cut-checkpoints" / "run.json").read_text())
    assert record["options"]["accelerate launch --num_processes"] == 2
    checkpoint = list_checkpoints(out.parent / "pm-checkpoints")[-1]
    assert {"random_states_0.pkl", "random_states_1.pkl", "model.safetensors"} <= {p.name for p in checkpoint.iterdir()}


def test_every_command_of_a_launch_destroys_its_process_group_at_exit(monkeypatch, capsys):
    """A process of `accelerate launch` whose command leaves its gloo process group alive may abort in the
    interpreter's teardown (SIGABRT, "terminate called without an active exception": `evaluate` failed a launch so
    after its work, in CI): every command of a launch registers the group's destruction at exit, not only training."""
    import retrofit.train
    from retrofit.cli import main

    registered = []
    monkeypatch.setattr(retrofit.train, "keep_process_group", lambda: registered.append(True))
    for world_size, expected in (("1", []), ("2", [True])):
        monkeypatch.setenv("WORLD_SIZE", world_size)
        assert main(["sweep", "vit-b16", "--after-layer", "6", "--tokens", "8", "--dry-run"]) == 0
        assert registered == expected
    capsys.readouterr()


def test_a_process_whose_peer_of_the_launch_is_gone_says_so_in_one_line(monkeypatch, capsys):
    """SIGTERM to one process of a 2-process launch: it said "retrofit: stopped (SIGTERM)", and the other printed a
    60-line traceback of gloo's "Connection closed by peer" from inside an evaluation's gather. It now says, in one
    line, that another process of the launch is gone. Outside a launch, or another RuntimeError, nothing changes."""
    import importlib

    from retrofit.cli import main

    finetune_module = importlib.import_module("retrofit.finetune")  # (`retrofit.finetune` is the function)
    gloo = "[../third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:29500"

    def failing(error: Exception):
        def run(args):
            raise error

        return run

    argv = ["finetune", "vit-b16", "--after-layer", "6", "--tokens", "8", "--data", "d", "--output", "unused"]
    monkeypatch.setattr("retrofit.train.keep_process_group", lambda: None)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(finetune_module, "run_finetune", failing(RuntimeError(gloo)))
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert (
        err.startswith("retrofit: error: another process of this launch stopped or failed")
        and len(err.splitlines()) == 1
    )
    monkeypatch.setattr(finetune_module, "run_finetune", failing(RuntimeError("a bug of retrofit's")))
    with pytest.raises(RuntimeError, match="a bug"):  # a traceback, as any bug's
        main(argv)
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setattr(finetune_module, "run_finetune", failing(RuntimeError(gloo)))
    with pytest.raises(RuntimeError, match="Connection closed"):
        main(argv)


def test_commands_that_run_as_one_process_are_refused_under_a_launch(tiny_vit, tmp_path, monkeypatch, capsys):
    """Under `accelerate launch`, sweep ran whole in each process (its fine-tunes crashed: each process wrote its
    settings' exports to a temporary folder of its own), timed against the others and failed writing one output
    twice; convert, bench, export-onnx and push ran N times too. One line each, before any work."""
    from retrofit.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    for argv in (["sweep", str(tiny_vit), "--after-layer", "2", "--tokens", "4", "--data", str(tmp_path / "d")],
                 ["convert", str(tiny_vit), "--after-layer", "2", "--tokens", "4", "--output", str(tmp_path / "o")],
                 ["bench", str(tiny_vit)]):  # fmt: skip
        assert main(argv) == 2
        assert f"`retrofit {argv[0]}` runs as one process: under accelerate launch each process ran it whole (" in (
            capsys.readouterr().err
        )
    assert list(tmp_path.iterdir()) == []


RECIPE_DRIVER = textwrap.dedent(
    """
    import sys
    from retrofit.cli import main
    from retrofit.finetune import pretrain

    recipe, data, baseline = sys.argv[1:4]
    code = main(["run", recipe])
    vit = {"image_size": 32, "patch_size": 8, "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
           "intermediate_size": 32}
    pretrain(vit, output=baseline, data=data, max_steps=2, batch_size=4, eval_split="", progress=False)
    sys.exit(code)
    """
)


@pytest.mark.slow
def test_a_launched_recipe_times_and_shows_its_table_once_and_a_pretraining_records_its_processes(tiny_vit, tmp_path):
    """`run RECIPE` under `accelerate launch`: every process timed the two models against the others on the same
    machine and printed its own before/after table (the card kept one of them). The main process times while the
    others wait, and shows the table. A pretraining's training.json gave each process's batch size alone, beside
    steps and epochs that only add up with the number of processes: it records them and the global batch."""
    import yaml

    data = make_imagefolder(tmp_path / "colours", per_class=4, test_per_class=2)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "source": str(tiny_vit), "merge": {"after_layer": 2, "tokens": 4}, "data": {"name": str(data)},
        "training": {"loss": "kd", "max_steps": 2, "batch_size": 4}, "export": {"output": str(tmp_path / "pm")},
        "evaluation": {"batch_size": 6, "speed_batch_size": 2},
    }))  # fmt: skip
    driver = tmp_path / "driver.py"
    driver.write_text(RECIPE_DRIVER)
    done = launch_two_cpu_processes(str(driver), str(recipe), str(data), str(tmp_path / "base"))
    assert done.returncode == 0, done.stderr[-6000:]
    assert len([line for line in done.stdout.splitlines() if line.startswith("| baseline")]) == 1, done.stdout
    assert "images/s: " in (tmp_path / "pm" / "README.md").read_text()
    info = json.loads((tmp_path / "base" / "training.json").read_text())
    assert info["processes"] == 2 and info["global_batch_size"] == 8 and info["settings"]["batch_size"] == 4


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_launch_process_ends_when_its_launcher_is_killed():
    """`accelerate launch` killed with SIGKILL left its processes running, waiting on each other for gloo's half-hour
    timeout, the first one holding the output's lock: every retry and --resume was refused. They end with it now."""
    import signal
    import subprocess
    import time

    import psutil

    rank = ("import time; from retrofit.cli import _end_with_the_launch; _end_with_the_launch(); "
            "print('ready', flush=True); time.sleep(120)")  # fmt: skip
    launcher = ("import os, subprocess, sys, time; "
                f"child = subprocess.Popen([sys.executable, '-c', {rank!r}], env={{**os.environ, 'WORLD_SIZE': '2'}}, "
                "stdout=sys.stdout); print(child.pid, flush=True); time.sleep(120)")  # fmt: skip
    with subprocess.Popen([sys.executable, "-c", launcher], stdout=subprocess.PIPE, text=True) as process:
        child = int(process.stdout.readline())
        assert process.stdout.readline().strip() == "ready"
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)

    def gone() -> bool:
        try:
            return psutil.Process(child).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    deadline = time.monotonic() + 30
    while not gone() and time.monotonic() < deadline:
        time.sleep(0.1)
    if not gone():
        psutil.Process(child).kill()
        pytest.fail("the launch's process outlived its launcher")
