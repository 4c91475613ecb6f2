"""Training checkpoints: written whole, resumed exactly, and never mixed up with anything else in their folder.

A checkpoint is ``<checkpoint_dir>/step-NNNNNNNN``: Accelerate's state (model, optimizer, scheduler, random states;
loaded with ``weights_only=True``), ``progress.json`` (the loop's position: text, so loading it runs no code) and, with
``--ema-decay``, ``ema.safetensors`` (the moving average of the weights: tensors only). It is written into
``.step-NNNNNNNN.tmp`` and renamed into place, and renamed out of place before it is deleted, so a run killed at any
moment leaves only complete checkpoints. ``run.json`` records what the checkpoints were made for (`RUN_SETTINGS`, and
the options that shape the weights, `training_options`); ``--resume`` refuses other settings, and the training budget
the run chose (`recorded_budget`), which a resumed run keeps. The folder may hold the user's own files: only
retrofit's checkpoints and its own ``run.json`` are ever listed, replaced or deleted, and of a checkpoint only the
files retrofit wrote there (``progress.json`` lists them): a user's file in one stays. One run at a time uses a folder
(`atomic.hold_write_lock`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from pathlib import Path

from .atomic import hold_write_lock, is_launch_main
from .errors import RetrofitError, brief, pickle_refused_quietly


class Progress:
    """The loop's position, saved with every checkpoint as ``progress.json`` (text: loading it runs no code)."""

    def __init__(self) -> None:
        self.step = 0  # optimizer steps done
        self.epoch = 0  # current epoch
        self.batch = 0  # batches of the current epoch consumed (per process)
        self.evaluations: list[dict] = []  # the run's evaluations so far (`TrainResult.eval_history`)

    def state_dict(self) -> dict:
        return {"step": self.step, "epoch": self.epoch, "batch": self.batch, "evaluations": self.evaluations}

    def load_state_dict(self, state: dict) -> None:
        """Restore a saved position and the evaluations before it (none in checkpoints of an older retrofit); a
        value that is not a count, an epoch past the step, or evaluations that are not a list of flat records of
        steps up to it and numbers for scores (an edited file), is a `ValueError`."""
        values = [state[key] for key in ("step", "epoch", "batch")]
        if not all(type(value) is int and value >= 0 for value in values):
            raise ValueError(f"the position {state} is not three counts")
        evaluations = state.get("evaluations", [])
        if not isinstance(evaluations, list) or not all(_is_evaluation(entry, values[0]) for entry in evaluations):
            raise ValueError("its evaluations are not a list of records of this run's steps and scores")
        if values[1] > values[0]:  # each epoch ends with an optimizer step
            raise ValueError(f"the position {state} is past its step")
        self.step, self.epoch, self.batch = values
        self.evaluations[:] = evaluations


def _is_evaluation(entry, step: int) -> bool:
    """Whether `entry` is an evaluation record the loop wrote by `step`: flat, at a step from 0 to `step`, its scores
    (and image count) numbers."""
    scalar = (str, int, float, bool, type(None))
    if not isinstance(entry, dict) or not all(isinstance(value, scalar) for value in entry.values()):
        return False
    numbers = [entry[key] for key in ("accuracy", "agreement", "similarity", "examples") if key in entry]
    at = entry.get("step")
    return type(at) is int and 0 <= at <= step and all(type(value) in (int, float) for value in numbers)


PROGRESS_FILE = "progress.json"
EMA_FILE = "ema.safetensors"  # with --ema-decay: the moving average of the trainable weights
RUN_FILE = "run.json"
OUTPUT = "output"  # run.json: the folder the run exports to (`output_record`), the one its resumed runs may replace
# What an older retrofit stored the progress in: a pickle (Accelerate's custom state), which is never loaded.
PICKLED_PROGRESS = "custom_checkpoint_0.pkl"
CHECKPOINT_NAME = re.compile(r"step-(\d{8})")
UNFINISHED_NAME = re.compile(r"\.step-\d{8}(\.old)?\.tmp")  # a checkpoint being written, or being deleted


def default_checkpoint_dir(output: str | Path) -> Path:
    """``<output>-checkpoints`` next to the export (the export itself stays a clean Hub repository)."""
    output = Path(output)
    return output.parent / f"{output.name}-checkpoints"


def is_checkpoint(folder: Path) -> bool:
    """A complete checkpoint written by retrofit: a real ``step-NNNNNNNN`` folder holding Accelerate's state (its
    weights, not empty) and the progress (``progress.json``, or an older retrofit's pickle, which `--resume` refuses to
    load). One without its weights is not: `--resume` named it "damaged" and told to resume from an older one, just
    as damaged."""
    if folder.is_symlink() or not folder.is_dir() or not CHECKPOINT_NAME.fullmatch(folder.name):
        return False
    weights = folder / "model.safetensors"
    if not weights.is_file() or weights.stat().st_size == 0:
        return False
    return (folder / PROGRESS_FILE).is_file() or (folder / PICKLED_PROGRESS).is_file()


def list_checkpoints(checkpoint_dir: str | Path) -> list[Path]:
    """retrofit's complete checkpoints in `checkpoint_dir`, oldest first: temporary folders of killed runs and
    anything retrofit did not write are left out (and never deleted)."""
    folder = Path(checkpoint_dir)
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if is_checkpoint(p)), key=lambda p: p.name)


INIT = "init"  # run.json: the card's line on how the merger started, which a resumed run's card repeats; not compared
# run.json: the images the first run's evaluations scored (data, split, how many): a resumed run may score others, and
# a recipe's table then leaves out the step-0 score its checkpoints hold; not compared
EVALUATED = "evaluated"


def output_record(output: str | Path) -> dict:
    """What ``run.json`` records of the run's output (`OUTPUT`, absolute): a resumed run replaces that folder as its
    own (`resume_owns_output`), and no other; not compared on --resume (a resumed run may export elsewhere)."""
    return {OUTPUT: os.path.abspath(output)}


def resume_owns_output(checkpoint_dir: Path, output: str | Path) -> bool:
    """Whether a run resuming the checkpoints in `checkpoint_dir` may replace `output` without --overwrite (which
    --resume excludes): the output their run exports to (``run.json``'s `OUTPUT`) or, in a record without it (an
    older retrofit), the output the folder is named after (`default_checkpoint_dir`). Any other `output` that exists
    is refused in one line: resuming makes neither another run's export nor anything else there this run's."""
    recorded = (read_run_record(checkpoint_dir) or {}).get(OUTPUT)
    target = Path(output).resolve()
    if isinstance(recorded, str):
        owned = Path(recorded).resolve() == target
    else:
        owned = Path(checkpoint_dir).resolve() == default_checkpoint_dir(target)
    if not owned and os.path.lexists(output):
        theirs = f"'{recorded}'" if isinstance(recorded, str) else "an output their run.json does not name"
        raise RetrofitError(
            f"output '{output}' already exists, and the checkpoints in '{checkpoint_dir}' export to {theirs}: "
            "--resume replaces only its own run's output; resume with that --output or choose another one"
        )
    return owned


def scores_other_images(checkpoint_dir: Path, evaluated: str | None) -> bool:
    """Whether a resumed run scoring `evaluated` (`finetune.evaluated_images`) scores other images than the run its
    checkpoints began (``run.json``'s `EVALUATED`; a record without it, of an older retrofit, is taken as alike):
    their evaluations, the last one of a finished run too, are of those images."""
    record = read_run_record(checkpoint_dir) or {}
    return EVALUATED in record and record[EVALUATED] != evaluated


def resumes(checkpoint_dir: Path, *, resume: bool, overwrite: bool) -> bool:
    """Whether a run continues the checkpoints in `checkpoint_dir` (``--resume`` and a whole one there). With
    ``--resume`` and none whole, damaged ones are refused by name first (`check_checkpoints`): the output they export
    to was refused as existing instead, with advice to pass ``--overwrite``, which throws them away."""
    resuming = resume and bool(list_checkpoints(checkpoint_dir))
    if resume and not overwrite and not resuming:
        check_checkpoints(checkpoint_dir, resume=resume, overwrite=overwrite)
    return resuming


def read_run_record(checkpoint_dir: Path) -> dict | None:
    """The ``run.json`` retrofit wrote into `checkpoint_dir` (a regular file holding a JSON object with the keys every
    retrofit since run.json records), or None: there is none, or the file there is not one (retrofit writes it whole,
    so a damaged one was changed since)."""
    path = checkpoint_dir / RUN_FILE
    if path.is_symlink() or not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    recorded = isinstance(record, dict) and {"architecture", "merge_after_layer", "merge_num_tokens"} <= record.keys()
    return record if recorded else None


# Accelerate's files, by name: what a checkpoint of a retrofit that did not list its files (`retrofit_files`) holds
ACCELERATE_FILES = re.compile(
    r"(model|optimizer|scheduler|sampler|dl_state_dict)(_\d+)?\.(safetensors|bin)|random_states_\d+\.pkl|scaler\.pt"
)


def folder_entries(folder: Path) -> tuple[set[str], set[str]]:
    """The files (links included, never followed) and the real folders under `folder`, as relative POSIX paths."""
    files, folders = set(), set()
    for root, dirs, names in os.walk(folder):
        where = Path(root).relative_to(folder)
        for name in dirs:
            (files if (Path(root) / name).is_symlink() else folders).add((where / name).as_posix())
        files.update((where / name).as_posix() for name in names)
    return files, folders


def retrofit_files(checkpoint: Path) -> set[str]:
    """The files in `checkpoint` that retrofit wrote there: those its ``progress.json`` lists (`save_checkpoint`), or,
    in a checkpoint of a retrofit that listed none, its own and Accelerate's by name."""
    files = folder_entries(checkpoint)[0]
    try:
        listed = json.loads((checkpoint / PROGRESS_FILE).read_text()).get("files")
    except (OSError, ValueError, AttributeError):
        listed = None
    if isinstance(listed, list) and all(isinstance(name, str) for name in listed):
        return files & {*listed, PROGRESS_FILE}
    ours = {PROGRESS_FILE, EMA_FILE, PICKLED_PROGRESS}
    return {name for name in files if name in ours or ACCELERATE_FILES.fullmatch(name)}


def _lists_its_files(checkpoint: Path) -> bool:
    """Whether `checkpoint`'s ``progress.json`` lists its files: written by a retrofit that also wrote ``run.json``."""
    try:
        return "files" in json.loads((checkpoint / PROGRESS_FILE).read_text())
    except (OSError, ValueError, TypeError):
        return False


def users_files(checkpoint: Path) -> list[str]:
    """What `checkpoint` holds that retrofit did not write (files and folders of the user's), sorted."""
    ours = retrofit_files(checkpoint)
    files, folders = folder_entries(checkpoint)
    holding = {parent.as_posix() for name in files for parent in Path(name).parents}
    return sorted((files - ours) | (folders - holding))


def discard_checkpoint(checkpoint: Path, log=None) -> None:
    """Delete the files retrofit wrote into `checkpoint` (`retrofit_files`), and the folder where nothing else is
    left, so that a run killed meanwhile leaves it whole or gone, never a part of it (which is no checkpoint, and then
    refused as a stray `step-NNNNNNNN`): renamed out of the way first, to a hidden ``.tmp`` name that
    `list_checkpoints` ignores and `remove_checkpoints` deletes. Where the user put files of theirs into it, those
    stay in place (without ``progress.json``, deleted first, it is no checkpoint any more), and `log` says so."""
    theirs = users_files(checkpoint)
    if not theirs:
        doomed = checkpoint.with_name(f".{checkpoint.name}.old.tmp")
        shutil.rmtree(doomed, ignore_errors=True)
        os.replace(checkpoint, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
        return
    ours = retrofit_files(checkpoint)
    for name in sorted(ours, key=lambda name: name != PROGRESS_FILE):
        (checkpoint / name).unlink()
    for folder in sorted({parent for name in ours for parent in Path(name).parents} - {Path(".")}, reverse=True):
        with contextlib.suppress(OSError):  # a folder retrofit's files were in, emptied (deepest first)
            (checkpoint / folder).rmdir()
    if log is not None:
        log(
            f"deleted checkpoint '{checkpoint}' but kept the folder: it holds files retrofit did not write "
            f"({brief(', '.join(theirs), 80)}); move them out of the checkpoint folder"
        )


def remove_checkpoints(checkpoint_dir: Path) -> None:
    """Start over (``--overwrite``): delete retrofit's checkpoints, its unfinished ``.step-N.tmp`` folders and its
    ``run.json``, and nothing else: the folder may hold the user's own files (`check_checkpoints` refused checkpoints
    holding some)."""
    if not checkpoint_dir.is_dir():
        return
    for path in checkpoint_dir.iterdir():
        unfinished = UNFINISHED_NAME.fullmatch(path.name) and not path.is_symlink()
        if is_checkpoint(path):
            discard_checkpoint(path)
        elif unfinished and path.is_dir():
            shutil.rmtree(path)
    if read_run_record(checkpoint_dir) is not None:
        (checkpoint_dir / RUN_FILE).unlink()


def check_checkpoints(checkpoint_dir: Path | None, *, resume: bool, overwrite: bool) -> list[Path]:
    """Refuse to mix runs: another run using the folder now (`atomic.hold_write_lock`), existing checkpoints without
    --resume (continue) or --overwrite (start over), or with both; a ``run.json`` there that retrofit did not write
    (the run writes its own) is the user's and stays; so is a ``step-NNNNNNNN`` that is not a whole checkpoint."""
    if resume and overwrite:
        raise RetrofitError(
            "--resume continues the newest checkpoint and --overwrite starts over from none; pass one of them"
        )
    if checkpoint_dir:
        hold_write_lock(checkpoint_dir, "--checkpoint-dir")
    record = checkpoint_dir / RUN_FILE if checkpoint_dir else None
    if record and os.path.lexists(record) and read_run_record(checkpoint_dir) is None:
        raise RetrofitError(
            f"'{record}' is not a run record retrofit wrote (a file of yours, or one changed since), and retrofit "
            "writes its own there: move it out of the checkpoint folder or choose another one"
        )
    # (by the main process: the others of a launch may look while it deletes checkpoints for --overwrite)
    named = sorted(checkpoint_dir.iterdir()) if is_launch_main() and checkpoint_dir and checkpoint_dir.is_dir() else []
    for path in named:  # resumed from an older one (or none) instead, and at its step the run could not save
        if CHECKPOINT_NAME.fullmatch(path.name) and not is_checkpoint(path):
            raise RetrofitError(
                f"'{path}' is named like a checkpoint but is not a whole one retrofit wrote (a file of it deleted "
                "since, or something of yours): delete it or move it out of the checkpoint folder"
            )
    existing = list_checkpoints(checkpoint_dir) if checkpoint_dir else []
    for path in existing if overwrite and is_launch_main() else []:  # deleted before any work: check all first
        theirs = users_files(path)
        if theirs:
            raise RetrofitError(
                f"checkpoint '{path}' holds files retrofit did not write ({brief(', '.join(theirs), 80)}), which "
                "--overwrite would leave in place of the new run's: move them out of the checkpoint folder"
            )
    if existing and not resume and not overwrite:
        raise RetrofitError(
            f"'{checkpoint_dir}' holds checkpoints of an earlier run; pass --resume to continue it or "
            "--overwrite to start over"
        )
    for path in named:  # a checkpoint an earlier run was writing or deleting when it was stopped: retrofit's own
        if UNFINISHED_NAME.fullmatch(path.name) and path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
    return existing


# What a checkpoint's weights and optimizer state were made for (`run.json` in the checkpoint folder), with the flag
# that sets each: resuming with another value would load them into a different model, or change it silently.
RUN_SETTINGS = {
    "architecture": "--task",
    "num_labels": "--num-labels",
    "merge_after_layer": "--after-layer",
    "merge_num_tokens": "--tokens",
    "merge_rope_positions": "--rope-positions",
    "train": "--train",
    "ema_decay": "--ema-decay",  # the moving average in the checkpoints (`EMA_FILE`) is of this decay
}


# The settings of a `TrainingRun` that shape the trained weights (`training_options`): resumed with another value, a
# run would continue other training than its checkpoints hold, and its model card would name only the second part's.
# The budget (--epochs, --max-steps, --min-steps, --warmup-ratio) is kept from run.json instead; evaluation, logging
# and checkpointing settings, --num-workers and --gradient-checkpointing leave the weights as they are. finetune's
# --calibrate is one: resumed without it, the card said the merger its checkpoints hold started random.
TRAINING_SETTINGS = ("data", "data_revision", "split", "image_column", "label_column", "limit", "sample", "holdout",
                     "augment", "loss", "function_matching", "temperature", "alpha", "feature_weight", "prompt_weight",
                     "prompt_templates", "caption_templates", "lr", "merger_lr_scale", "weight_decay", "batch_size",
                     "grad_accum", "max_grad_norm", "mixed_precision", "seed", "calibrate")  # fmt: skip
OPTIONS = "options"  # run.json's record of them, by option (`check_same_run` names the option)
PROCESSES = "accelerate launch --num_processes"  # the data's order and the random states are per process
IMAGES = "training images (--data, --split)"


PATH_OPTIONS = ("--data", "--teacher")  # recorded by `local_or_named`


def local_or_named(value: str | None) -> str | None:
    """A path that exists here as the folder it is, links resolved (a resumed run may be started from another folder,
    or name it through a link), else as it is (a Hub id)."""
    return os.path.realpath(value) if value and os.path.exists(value) else value


IMAGE_FILES = "training images' files (paths, sizes, labels)"
# config fields that name where or how a model was loaded, not what it is; the source's commit too: its weights (their
# sha256), config and image processor are compared themselves, and a commit that changed only its README is the same
_NOT_THE_MODEL = ("_name_or_path", "transformers_version", "merge_source", "merge_source_revision", "dtype",
                  "torch_dtype", "_commit_hash")  # fmt: skip


def training_options(model, run, processes: int, images, image_processor) -> dict:
    """What a resumed `run` must share with the run that wrote its checkpoints (run.json's `OPTIONS`), by option:
    `TRAINING_SETTINGS`, the teacher (and its weights), the number of processes, the training `images` (a
    `TransformedDataset`: their number, and their files where they are files: a data folder whose images were added,
    removed, renamed, resized or relabelled since is other data), the source's weights (their sha256, where `model`
    records it), and the model's config and `image_processor` (a source whose config.json or preprocessor_config.json
    was edited since trains another model, or on other inputs)."""
    from .data import image_files_digest
    from .provenance import source_record
    from .settings import option_of

    options = {option_of(type(run), name): getattr(run, name) for name in TRAINING_SETTINGS if hasattr(run, name)}
    options["--data"] = local_or_named(run.data)
    if hasattr(run, "teacher"):  # finetune's
        options["--teacher"] = local_or_named(run.teacher)
        if run.teacher:
            options["--teacher's weights (sha256)"] = source_record(run.teacher).sha256
    options[PROCESSES] = processes
    options[IMAGES] = len(images)
    files = image_files_digest(images.dataset)
    if files:
        options[IMAGE_FILES] = files
    sha256 = getattr(model.config, "merge_source_sha256", None)
    if sha256:
        options["SOURCE's weights (sha256)"] = sha256
    config = {key: value for key, value in model.config.to_dict().items() if key not in _NOT_THE_MODEL}
    options["the model's config"] = without_release(config)
    options["the image processor"] = without_release(image_processor.to_dict())
    return options


def without_release(settings: dict) -> dict:
    """A config's or image processor's `to_dict()` without the transformers release that wrote it (at any depth)."""
    return {key: without_release(value) if isinstance(value, dict) else value
            for key, value in settings.items() if key != "transformers_version"}  # fmt: skip


def run_settings(model, train: str, ema_decay: float) -> dict:
    """The settings in `RUN_SETTINGS` of a run training `model` (`train`: its --train; `ema_decay`: its
    --ema-decay)."""
    from .loading import family_and_head

    config = model.config
    settings = {key: getattr(config, key, None) for key in RUN_SETTINGS if key.startswith("merge_")}
    classifier = hasattr(config, "num_labels") and family_and_head(config)[1].is_classifier
    return {
        "architecture": (config.architectures or [type(model).__name__])[0],
        "num_labels": config.num_labels if classifier else None,
        **settings,
        "train": train,
        "ema_decay": ema_decay,
    }


def check_same_run(checkpoint_dir: Path, settings: dict) -> None:
    """Refuse to resume checkpoints written with other `RUN_SETTINGS`, other `OPTIONS` (`training_options`) or other
    settings of the caller's (a one-line error naming the first). Without a record (a retrofit from before run.json;
    `check_checkpoints` refused any other file) loading the state checks what it can; checkpoints that list their
    files (`retrofit_files`) were written with one, so its absence is a file deleted since."""
    saved = read_run_record(checkpoint_dir)
    if saved is None and any(_lists_its_files(checkpoint) for checkpoint in list_checkpoints(checkpoint_dir)):
        raise RetrofitError(
            f"'{checkpoint_dir / RUN_FILE}' is missing: retrofit wrote it with the checkpoints there (what they were "
            "trained with, which --resume checks); put it back, or pass --overwrite to start over"
        )
    saved = saved or {}
    merged = [record.get("merge_after_layer") is not None for record in (saved, settings)]
    if "merge_after_layer" in saved and merged[0] != merged[1]:  # no option of this command resumes those
        kinds = ["a fine-tune (a merged model)", "a pretraining (no merge)"]
        was, now = kinds if merged[0] else kinds[::-1]
        raise RetrofitError(
            f"'{checkpoint_dir}' holds checkpoints of {was}, not of {now}: give this run another checkpoint folder "
            "(--checkpoint-dir), or pass --overwrite to start over"
        )
    for key, flag in RUN_SETTINGS.items():
        if key in saved and saved[key] != settings[key]:
            if key == "architecture":  # a class name, set through --task / --num-labels
                was, fix = f"{saved[key]} ({flag})", f"the {flag} of that run"
            else:
                was, fix = f"{flag} {saved[key]}", f"{flag} {saved[key]}"
            raise RetrofitError(
                f"'{checkpoint_dir}' holds checkpoints of a run with {was}, not {settings[key]}: resume with {fix}, "
                "or pass --overwrite to start over"
            )
    if isinstance(saved.get(OPTIONS), dict):  # a path recorded before links were resolved (`local_or_named`)
        saved[OPTIONS] = {**saved[OPTIONS], **{key: local_or_named(value) for key, value in saved[OPTIONS].items()
                                               if key in PATH_OPTIONS and isinstance(value, str)}}  # fmt: skip
    for key, value in settings.items():  # options and a caller's own settings (`train`'s same_run): JSON, by path
        if key in RUN_SETTINGS or key in ("budget", OUTPUT, INIT, EVALUATED) or key not in saved:
            continue
        where = "" if key == OPTIONS else key  # an option is named by itself
        difference = _first_difference(saved[key], json.loads(json.dumps(value, default=str)), where)
        if difference is not None:
            where, was, now = difference
            raise RetrofitError(
                f"'{checkpoint_dir}' holds checkpoints of a run with {where} {was!r}, not {now!r}: resume with that "
                "run's settings, or pass --overwrite to start over"
            )


def _first_difference(saved, now, where: str) -> tuple[str, object, object] | None:
    """The first place where two JSON values differ, as (dotted key, saved value, new value), or None. A key only one
    side holds is not compared: the settings are recorded whole (every field of a config), so such a key is a field
    one transformers release has and another lacks, not a setting."""
    if isinstance(saved, dict) and isinstance(now, dict):
        for key in sorted(saved.keys() & now.keys()):
            difference = _first_difference(saved[key], now[key], f"{where}.{key}" if where else key)
            if difference is not None:
                return difference
        return None
    return None if saved == now else (where, saved, now)


def recorded_budget(checkpoint_dir: Path) -> dict | None:
    """The budget a run chose when it started (``run.json``'s ``budget``: steps, warm-up steps, why), which its
    resumed runs keep; None where it was not recorded (a retrofit from before it). One that is not a budget (at least
    one step, 0 <= warm-up <= steps) was changed since: a one-line error."""
    budget = (read_run_record(checkpoint_dir) or {}).get("budget")
    if budget is None:
        return None
    steps, warmup = (budget.get(key) if isinstance(budget, dict) else None for key in ("steps", "warmup"))
    if not (type(steps) is int and type(warmup) is int and 0 <= warmup <= steps and steps >= 1):
        raise RetrofitError(
            f"'{checkpoint_dir / RUN_FILE}' records no usable budget ({brief(str(budget), 80)}): it was changed since "
            "retrofit wrote it; pass --overwrite to start over"
        )
    return budget


def save_checkpoint(
    accelerator, checkpoint_dir: Path, progress: Progress, keep: int, settings: dict, average=None, log=None
) -> Path:
    """`accelerator.save_state`, `progress` (``progress.json``, which lists the files retrofit wrote) and the moving
    average of the weights `average` (an object with ``state_dict()`` of float tensors: ``ema.safetensors``) into a
    temporary folder, renamed into place, keeping the newest `keep` checkpoints (`discard_checkpoint`: a user's files
    in an older one stay, and `log` says so). The first checkpoint in the folder also writes `run.json` (`settings`,
    replacing one left by a run that stopped before its first checkpoint): a run that stops before it leaves no
    folder behind. A write that fails (a full disk, a file-size limit) is one line and leaves no temporary folder."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    from .atomic import write_text
    from .errors import describe_os_error, peer_gone

    final = checkpoint_dir / f"step-{progress.step:08d}"
    tmp = checkpoint_dir / f".step-{progress.step:08d}.tmp"
    if final.exists() and not is_checkpoint(final):
        raise RetrofitError(f"'{final}' exists and is not a retrofit checkpoint; move it out of --checkpoint-dir")
    try:
        if accelerator.is_main_process:
            if not list_checkpoints(checkpoint_dir):
                write_text(checkpoint_dir / RUN_FILE, json.dumps(settings, indent=2, default=str) + "\n")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp), safe_serialization=True)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            if average is not None:
                save_file(average.state_dict(), str(tmp / EMA_FILE))
            written = {"files": sorted({*folder_entries(tmp)[0], PROGRESS_FILE})}  # what pruning may delete
            (tmp / PROGRESS_FILE).write_text(json.dumps(progress.state_dict() | written) + "\n")
            if final.exists():
                discard_checkpoint(final)
            os.replace(tmp, final)
            for old in list_checkpoints(checkpoint_dir)[:-keep]:
                with contextlib.suppress(OSError):
                    discard_checkpoint(old, log)
    except (OSError, RuntimeError, SafetensorError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if peer_gone(exc):  # another process of the launch is gone mid-save: no disk's fault (`cli` says so)
            raise
        why = describe_os_error(exc) if isinstance(exc, OSError) else f"{brief(exc, 120)}; check the free space"
        raise RetrofitError(f"cannot write checkpoint '{final}': {why}") from None
    except BaseException:  # Ctrl-C mid-write: the half-written checkpoint goes too
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    accelerator.wait_for_everyone()
    return final


def _hyperparameters(accelerator) -> list[list[tuple]]:
    """What each optimizer's parameter groups train with (learning rate before its schedule, weight decay)."""
    return [[(group.get("initial_lr"), group.get("weight_decay")) for group in optimizer.param_groups]
            for optimizer in accelerator._optimizers]  # fmt: skip


def _check_loaded_state(accelerator, progress: Progress, hyperparameters: list, checkpoint: Path) -> None:
    """Refuse optimizer and scheduler states that `load_state` took without a word: moments of other shapes than the
    parameters (a traceback at the first step), learning rates or weight decays other than this run's (a checkpoint
    of another run copied in: it trained on at that run's rate while the card named this one's), and a schedule past
    the steps taken (torch steps it once per process per optimizer step, fewer where fp16 skipped one)."""
    import torch

    for optimizer in accelerator._optimizers:
        for group in optimizer.param_groups:
            for param in group["params"]:
                for name, value in optimizer.state.get(param, {}).items():
                    if torch.is_tensor(value) and value.dim() > 0 and value.shape != param.shape:
                        raise ValueError(f"its optimizer's {name} of shape {tuple(value.shape)} is for no parameter "
                                         f"of this model (one of {tuple(param.shape)})")  # fmt: skip
    loaded = _hyperparameters(accelerator)
    if loaded != hyperparameters:
        groups = [*zip(loaded[0], hyperparameters[0], strict=False), (loaded[0][0], hyperparameters[0][0])]
        theirs, ours = next(pair for pair in groups if pair[0] != pair[1] or pair is groups[-1])
        raise RetrofitError(
            f"checkpoint '{checkpoint}' was written by a run of another learning rate or weight decay (lr, weight "
            f"decay: {theirs[0]}, {theirs[1]}; this run: {ours[0]}, {ours[1]}), not by the run its run.json describes; "
            "resume with that run's checkpoints, or pass --overwrite to start over"
        )
    for scheduler in accelerator._schedulers:
        steps = getattr(scheduler.scheduler, "last_epoch", 0)
        if not 0 <= steps <= progress.step * accelerator.num_processes:
            raise ValueError(f"its scheduler has taken {steps} steps, more than the run's {progress.step}")


def load_checkpoint(
    accelerator, checkpoint: Path, progress: Progress, older: list[Path], average=None, batches: int | None = None
) -> None:
    """Restore a checkpoint written by `save_checkpoint`: the model, optimizer, scheduler and random states through
    Accelerate with ``weights_only=True`` (no pickle runs code), the progress from ``progress.json`` (its batch within
    an epoch of `batches` batches), and `average`'s state (``load_state_dict``) from ``ema.safetensors``. A checkpoint
    that does not fit or is damaged is one line."""
    from accelerate.utils import load as load_tensors
    from safetensors.torch import load_file

    fallback = f"delete it to resume from {older[-1].name}, " if older else "delete it "
    if not (checkpoint / PROGRESS_FILE).is_file():
        raise RetrofitError(
            f"checkpoint '{checkpoint}' was written by an older retrofit, which kept its progress as a pickle that "
            "retrofit no longer loads (it could run code); pass --overwrite to start over"
        )
    if average is not None and not (checkpoint / EMA_FILE).is_file():
        raise RetrofitError(
            f"checkpoint '{checkpoint}' holds no moving average of the weights (its run had no --ema-decay): resume "
            "without --ema-decay, or pass --overwrite to start over"
        )
    try:
        progress.load_state_dict(json.loads((checkpoint / PROGRESS_FILE).read_text()))
        if progress.step != int(CHECKPOINT_NAME.fullmatch(checkpoint.name).group(1)):
            raise ValueError(f"its progress.json says step {progress.step}")
        if batches is not None and progress.batch > batches:  # the rest of the epoch would be skipped
            raise ValueError(f"its progress.json says batch {progress.batch} of an epoch of {batches}")
        if average is not None:
            average.load_state_dict(load_file(checkpoint / EMA_FILE))
        with pickle_refused_quietly():
            # Accelerate ignores random states it cannot load: check them here, so a resumed run is the same run.
            load_tensors(checkpoint / f"random_states_{accelerator.process_index}.pkl")
            hyperparameters = _hyperparameters(accelerator)  # this run's, which the loaded state replaces
            accelerator.load_state(str(checkpoint), load_kwargs={"weights_only": True})
        _check_loaded_state(accelerator, progress, hyperparameters, checkpoint)
    except RetrofitError:
        raise
    except Exception as exc:
        if isinstance(exc, RuntimeError) and "state_dict" in str(exc):  # other merge settings (before run.json)
            raise RetrofitError(
                f"checkpoint '{checkpoint}' does not fit this run ({brief(exc, 200)}); resume with the settings of "
                "the run that wrote it, or pass --overwrite to start over"
            ) from None
        # a file missing or damaged since it was written (checkpoints are written whole), or one that is not what
        # retrofit wrote (a pickle that is not plain tensors is refused by weights_only)
        raise RetrofitError(
            f"checkpoint '{checkpoint}' is damaged ({type(exc).__name__}: {brief(exc, 120)}); {fallback}or pass "
            "--overwrite to start over"
        ) from None
