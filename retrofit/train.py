"""Fine-tune a merged model back to accuracy (or pretrain a baseline) with `accelerate`.

Read it top to bottom like Accelerate's ``examples/complete_cv_example.py``:

1. `TrainArgs` holds every knob of a run (the CLI and the recipes fill it in).
2. `finetune` loads SOURCE, inserts the PatchMerger (unless SOURCE is already a retrofit export), optionally
   calibrates it, loads the frozen teacher for distillation, calls `train_loop`, and exports a Hub repository.
3. `pretrain` builds a ViT from a config and trains it from scratch with the same loop (the Fashion-MNIST baseline).
4. `train_loop` is the loop: Accelerator (mixed precision, gradient accumulation, trackers), AdamW with warm-up and
   cosine decay, gradient clipping, atomic checkpoints every N steps with ``--resume`` mid-epoch, NaN guard, and
   periodic evaluation with ``gather_for_metrics``.

Checkpoints go to ``--checkpoint-dir`` (default: ``<output>-checkpoints`` next to ``--output``), never into the
export, which stays a clean Hub repository. Each checkpoint is written to a temporary folder and renamed into place,
so a run killed at any moment leaves only complete checkpoints; ``--resume`` continues from the newest one and
reaches the same weights as an uninterrupted run with the same seed.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .errors import RetrofitError, brief, check_at_least_one, did_you_mean

LOSSES = ("kd", "ce", "mix")
TRAINABLE = ("merger-and-after", "all")
PRECISIONS = ("no", "bf16", "fp16")


@dataclass
class TrainArgs:
    """Every setting of a training run (defaults = the recommended fine-tune)."""

    data: str = "fashion-mnist"
    split: str = "train"
    eval_split: str | None = "test"
    image_column: str = "image"
    label_column: str | None = "label"
    limit: int | None = None  # the first N training images
    sample: int | None = None  # a shuffled sample of N training images (seeded by `seed`); not with `limit`
    eval_limit: int | None = None
    loss: str = "kd"
    temperature: float = 2.0
    alpha: float = 0.5  # weight of CE in "mix" (KD gets 1 - alpha)
    # kd/mix: weight of feature distillation (see `feature_loss`); None = only where there are no logits (backbones: 1)
    feature_weight: float | None = None
    train: str = "all"
    epochs: float = 1.0
    max_steps: int | None = None
    lr: float = 2e-4
    merger_lr_scale: float = 1.0  # the merger's learning rate = lr * this (it starts from scratch, the rest does not)
    weight_decay: float = 0.05
    warmup_ratio: float = 0.05
    batch_size: int = 64
    eval_batch_size: int | None = None
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, one more forward
    seed: int = 0
    augment: bool = False
    num_workers: int = 0
    eval_every: int = 0  # optimizer steps; 0 = at the end of each epoch
    save_every: int = 200  # optimizer steps; checkpoints are also saved at the end
    keep_checkpoints: int = 2
    checkpoint_dir: str | None = None
    resume: bool = False
    overwrite: bool = False
    report_to: str | None = None
    num_labels: int | None = None
    eval_at_start: bool = False  # evaluate before the first step too (the merged model before training)
    stop_after: int | None = None  # stop (with a checkpoint) after this many steps of the full schedule
    progress: bool = True

    def __post_init__(self) -> None:
        # Python callers may pass paths (pathlib) for the data folder and the checkpoint folder: keep them as text,
        # as the CLI and recipes give them, so that they check, print and serialise the same way.
        for name in ("data", "checkpoint_dir"):
            if isinstance(getattr(self, name), os.PathLike):
                setattr(self, name, os.fspath(getattr(self, name)))

    def check(self) -> None:
        """Refuse bad settings before anything is loaded or written (from the CLI, a recipe or Python)."""
        for setting in fields(self):
            _check_type(f"--{setting.name.replace('_', '-')}", getattr(self, setting.name), setting.type)
        if self.loss not in LOSSES:
            raise RetrofitError(f"--loss {self.loss!r} is not one of {', '.join(LOSSES)}")
        if self.train not in TRAINABLE:
            raise RetrofitError(f"--train {self.train!r} is not one of {', '.join(TRAINABLE)}")
        if self.mixed_precision not in PRECISIONS:
            raise RetrofitError(f"--mixed-precision {self.mixed_precision!r} is not one of {', '.join(PRECISIONS)}")
        if self.epochs <= 0 and not self.max_steps:
            raise RetrofitError(f"--epochs must be positive (got {self.epochs})")
        positive = "lr merger_lr_scale batch_size grad_accum save_every keep_checkpoints temperature".split()
        for name in positive + ["max_steps", "eval_batch_size", "stop_after"]:
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise RetrofitError(f"--{name.replace('_', '-')} must be positive (got {value})")
        for name in ("weight_decay", "max_grad_norm", "num_workers", "eval_every"):
            if getattr(self, name) < 0:
                raise RetrofitError(f"--{name.replace('_', '-')} must be 0 or more (got {getattr(self, name)})")
        if not 0 <= self.warmup_ratio < 1:
            raise RetrofitError(f"--warmup-ratio must be in [0, 1) (got {self.warmup_ratio})")
        if not 0 <= self.seed < 2**32:
            raise RetrofitError(f"--seed must be in [0, 2**32) (got {self.seed})")
        if self.num_labels is not None and self.num_labels < 2:
            raise RetrofitError(f"--num-labels must be at least 2 (got {self.num_labels})")
        if self.limit is not None and self.sample is not None:
            raise RetrofitError("--limit (the first N images) and --sample (a shuffled sample) exclude each other")
        for name in ("limit", "sample", "eval_limit"):
            check_at_least_one(f"--{name.replace('_', '-')}", getattr(self, name))
        if self.feature_weight is not None and self.feature_weight < 0:
            raise RetrofitError(f"--feature-weight must be 0 or more (got {self.feature_weight})")
        if not 0 <= self.alpha <= 1:
            raise RetrofitError(f"--alpha must be in [0, 1] (got {self.alpha})")
        if self.report_to not in (None, "none", "tensorboard", "all", "wandb", "mlflow", "comet_ml", "aim"):
            raise RetrofitError(f"--report-to {self.report_to!r} is not a tracker Accelerate knows; try tensorboard")


# `TrainArgs` annotations (strings, see `from __future__ import annotations`) -> what a value may be and how to say it
_KINDS: dict[str, tuple[tuple[type, ...], str]] = {
    "str": ((str,), "text"),
    "int": ((int,), "a whole number"),
    "float": ((int, float), "a finite number"),
    "bool": ((bool,), "true or false"),
}


def _check_type(option: str, value, annotation: str) -> None:
    """Refuse a value of the wrong type for a `TrainArgs` field (a recipe says ``lr: fast`` or ``batch_size: 16.5``)."""
    kind, optional = annotation.removesuffix(" | None"), annotation.endswith(" | None")
    if kind not in _KINDS or value is None and optional:
        return
    types, description = _KINDS[kind]
    wrong = not isinstance(value, types) or (isinstance(value, bool) and bool not in types)
    if wrong or kind == "float" and not math.isfinite(value):
        raise RetrofitError(f"{option} must be {description}, not {value!r}")


@dataclass
class TrainResult:
    """What a run did: steps, the last training loss, evaluation history and where things were written."""

    steps: int
    epochs: float
    last_loss: float | None
    eval_history: list[dict] = field(default_factory=list)
    output: Path | None = None
    checkpoint_dir: Path | None = None
    seconds: float = 0.0
    model: object = None

    @property
    def final_accuracy(self) -> float | None:
        return self.eval_history[-1].get("accuracy") if self.eval_history else None


# ----------------------------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------------------------


def param_groups(model: torch.nn.Module, args: TrainArgs) -> list[dict]:
    """AdamW groups of the trainable parameters: weights decay; biases, norms and embeddings do not; the merger
    (new, no pretrained start) takes no decay and ``lr * merger_lr_scale``."""
    decay, no_decay, merger = [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if "patch_merger." in name:
            merger.append(param)
        else:
            (no_decay if param.ndim < 2 or "embeddings" in name else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": args.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
        {"params": merger, "weight_decay": 0.0, "lr": args.lr * args.merger_lr_scale},
    ]
    return [group for group in groups if group["params"]]


class Outputs(NamedTuple):
    """What the losses compare: logits (None for a backbone) and the features the head reads (None if not asked)."""

    logits: torch.Tensor | None
    features: torch.Tensor | None


class HeadReader:
    """Runs a model and returns its `Outputs`. The features are what its head reads: the input of a classifier's
    final layer(s) (`Head.classifiers` in the family registry, recorded by a forward pre-hook, so no extra pass;
    DeiT's two heads are concatenated), or what a backbone's users read (`Head.features`: its pooled output, its CLS
    token, or CLS ⊕ mean of the other tokens)."""

    def __init__(self, model: torch.nn.Module, *, features: bool) -> None:
        from .loading import family_and_head, layer_config

        family, head = family_and_head(model.config)
        self.is_classifier = head.is_classifier
        self.backbone_features = head.features
        config = model.config
        self.num_prefix_tokens = getattr(config, "merge_num_prefix_tokens", None)
        if self.num_prefix_tokens is None:
            self.num_prefix_tokens = family.num_prefix_tokens(layer_config(config, head))
        self._recording = False
        self._recorded: list[torch.Tensor] = []
        names = head.classifiers if features and head.is_classifier else ()
        self._hooks = [model.get_submodule(name).register_forward_pre_hook(self._record) for name in names]

    def close(self) -> None:
        """Remove the hooks (the trained model is handed back without them)."""
        for hook in self._hooks:
            hook.remove()

    def _record(self, module: torch.nn.Module, args: tuple) -> None:
        if self._recording:
            self._recorded.append(args[0])

    def __call__(self, model: torch.nn.Module, pixel_values: torch.Tensor) -> Outputs:
        """`model` may be the prepared (wrapped) form of the model the reader was built on."""
        self._recording, self._recorded = True, []
        try:
            output = model(pixel_values=pixel_values)
        finally:
            self._recording = False
        if not self.is_classifier:
            return Outputs(None, self._backbone_features(output))
        return Outputs(output.logits, torch.cat(self._recorded, dim=-1) if self._recorded else None)

    def _backbone_features(self, output) -> torch.Tensor:
        """What a backbone's users read (`Head.features`): its pooled output, its CLS token, CLS ⊕ mean of the
        tokens after the prefix tokens, or that mean alone."""
        if self.backbone_features == "pooler":
            return output.pooler_output
        hidden = output.last_hidden_state
        if self.backbone_features == "cls":
            return hidden[:, 0]
        mean = hidden[:, self.num_prefix_tokens :].mean(dim=1)
        if self.backbone_features == "mean":
            return mean
        return torch.cat([hidden[:, 0], mean], dim=-1)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton distillation: T² · KL(softmax(teacher/T) ‖ softmax(student/T)), averaged over the batch."""
    t = temperature
    student = F.log_softmax(student_logits.float() / t, dim=-1)
    teacher = F.log_softmax(teacher_logits.float() / t, dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean") * t * t


def feature_loss(student_features: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
    """Feature distillation: ‖s − t‖² / ‖t‖² per image (relative squared error of the features the head reads),
    averaged over the batch. Relative, so one weight suits models whose features differ in scale."""
    student, teacher = student_features.float(), teacher_features.float()
    error = (student - teacher).pow(2).sum(-1) / teacher.pow(2).sum(-1).clamp_min(1e-12)
    return error.mean()


def compute_loss(student: Outputs, teacher: Outputs | None, labels, args: TrainArgs) -> torch.Tensor:
    """The training loss for one batch (see `TrainArgs.loss`): `kd` is the logits' KL plus `feature_weight` times
    the `feature_loss` (a backbone has only the second); `mix` is alpha · CE + (1 - alpha) · kd."""
    if args.loss == "ce":
        return F.cross_entropy(student.logits.float(), labels)
    terms = []
    if student.logits is not None:
        terms.append(kd_loss(student.logits, teacher.logits, args.temperature))
    if args.feature_weight:
        terms.append(args.feature_weight * feature_loss(student.features, teacher.features))
    distill = sum(terms)
    if args.loss == "kd":
        return distill
    return args.alpha * F.cross_entropy(student.logits.float(), labels) + (1 - args.alpha) * distill


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------------


class Progress:
    """The loop's position, saved with every checkpoint as ``progress.json`` (text: loading it runs no code)."""

    def __init__(self) -> None:
        self.step = 0  # optimizer steps done
        self.epoch = 0  # current epoch
        self.batch = 0  # batches of the current epoch consumed (per process)

    def state_dict(self) -> dict:
        return {"step": self.step, "epoch": self.epoch, "batch": self.batch}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.epoch, self.batch = int(state["step"]), int(state["epoch"]), int(state["batch"])


PROGRESS_FILE = "progress.json"
# What an older retrofit stored the progress in: a pickle (Accelerate's custom state), which is never loaded.
PICKLED_PROGRESS = "custom_checkpoint_0.pkl"
CHECKPOINT_NAME = re.compile(r"step-(\d{8})")


def default_checkpoint_dir(output: str | Path) -> Path:
    """``<output>-checkpoints`` next to the export (the export itself stays a clean Hub repository)."""
    output = Path(output)
    return output.parent / f"{output.name}-checkpoints"


def is_checkpoint(folder: Path) -> bool:
    """A complete checkpoint written by retrofit: a real ``step-NNNNNNNN`` folder holding Accelerate's state and
    the progress (``progress.json``, or an older retrofit's pickle, which `--resume` refuses to load)."""
    if folder.is_symlink() or not folder.is_dir() or not CHECKPOINT_NAME.fullmatch(folder.name):
        return False
    weights = (folder / "model.safetensors").is_file()
    return (folder / PROGRESS_FILE).is_file() or weights and (folder / PICKLED_PROGRESS).is_file()


def list_checkpoints(checkpoint_dir: str | Path) -> list[Path]:
    """retrofit's complete checkpoints in `checkpoint_dir`, oldest first: temporary folders of killed runs and
    anything retrofit did not write are left out (and never deleted)."""
    folder = Path(checkpoint_dir)
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if is_checkpoint(p)), key=lambda p: p.name)


def remove_checkpoints(checkpoint_dir: Path) -> None:
    """Start over (``--overwrite``): delete retrofit's checkpoints, its unfinished ``.step-N.tmp`` folders and its
    ``run.json``, and nothing else: the folder may hold the user's own files."""
    if not checkpoint_dir.is_dir():
        return
    for path in checkpoint_dir.iterdir():
        unfinished = path.name.startswith(".step-") and path.name.endswith(".tmp") and not path.is_symlink()
        if is_checkpoint(path) or unfinished and path.is_dir():
            shutil.rmtree(path)
    if (checkpoint_dir / "run.json").is_file():
        (checkpoint_dir / "run.json").unlink()


def _check_checkpoints(checkpoint_dir: Path | None, args: TrainArgs) -> list[Path]:
    """Refuse to mix runs: existing checkpoints need --resume (continue) or --overwrite (start over)."""
    existing = list_checkpoints(checkpoint_dir) if checkpoint_dir else []
    if existing and not args.resume and not args.overwrite:
        raise RetrofitError(
            f"'{checkpoint_dir}' holds checkpoints of an earlier run; pass --resume to continue it or "
            "--overwrite to start over"
        )
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
}


def run_settings(model, args: TrainArgs) -> dict:
    """The settings in `RUN_SETTINGS` of a run training `model` with `args`."""
    from .loading import family_and_head

    config = model.config
    settings = {key: getattr(config, key, None) for key in RUN_SETTINGS if key.startswith("merge_")}
    classifier = hasattr(config, "num_labels") and family_and_head(config)[1].is_classifier
    return {
        "architecture": (config.architectures or [type(model).__name__])[0],
        "num_labels": config.num_labels if classifier else None,
        **settings,
        "train": args.train,
    }


def check_same_run(checkpoint_dir: Path, settings: dict) -> None:
    """Refuse to resume checkpoints written with other `RUN_SETTINGS` (a one-line error naming the first)."""
    path = checkpoint_dir / "run.json"
    if not path.is_file():  # written by a retrofit from before run.json; loading the state checks what it can
        return
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        saved = exc
    if not isinstance(saved, dict):
        raise RetrofitError(
            f"'{path}' is damaged ({brief(saved) if isinstance(saved, Exception) else 'not a JSON object'}); "
            "pass --overwrite to start over"
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


def save_checkpoint(accelerator, checkpoint_dir: Path, progress: Progress, keep: int, settings: dict) -> Path:
    """`accelerator.save_state` and `progress` (``progress.json``) into a temporary folder, renamed into place,
    keeping the newest `keep` checkpoints. The first checkpoint in the folder also writes `run.json` (`settings`,
    replacing one left by a run that stopped before its first checkpoint): a run that stops before it leaves no
    folder behind. A write that fails (a full disk, a file-size limit) is one line and leaves no temporary folder."""
    from safetensors import SafetensorError

    from .atomic import write_text
    from .errors import describe_os_error

    final = checkpoint_dir / f"step-{progress.step:08d}"
    tmp = checkpoint_dir / f".step-{progress.step:08d}.tmp"
    if final.exists() and not is_checkpoint(final):
        raise RetrofitError(f"'{final}' exists and is not a retrofit checkpoint; move it out of --checkpoint-dir")
    try:
        if accelerator.is_main_process:
            if not list_checkpoints(checkpoint_dir):
                write_text(checkpoint_dir / "run.json", json.dumps(settings, indent=2) + "\n")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp), safe_serialization=True)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            (tmp / PROGRESS_FILE).write_text(json.dumps(progress.state_dict()) + "\n")
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            for old in list_checkpoints(checkpoint_dir)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    except (OSError, RuntimeError, SafetensorError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        why = describe_os_error(exc) if isinstance(exc, OSError) else f"{brief(exc, 120)}; check the free space"
        raise RetrofitError(f"cannot write checkpoint '{final}': {why}") from None
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, checkpoint: Path, progress: Progress, older: list[Path]) -> None:
    """Restore a checkpoint written by `save_checkpoint`: the model, optimizer, scheduler and random states through
    Accelerate with ``weights_only=True`` (no pickle runs code), the progress from ``progress.json``. A checkpoint
    that does not fit or is damaged is one line."""
    from accelerate.utils import load as load_tensors

    fallback = f"delete it to resume from {older[-1].name}, " if older else "delete it "
    if not (checkpoint / PROGRESS_FILE).is_file():
        raise RetrofitError(
            f"checkpoint '{checkpoint}' was written by an older retrofit, which kept its progress as a pickle that "
            "retrofit no longer loads (it could run code); pass --overwrite to start over"
        )
    try:
        progress.load_state_dict(json.loads((checkpoint / PROGRESS_FILE).read_text()))
        # Accelerate ignores random states it cannot load: check them here, so a resumed run is the same run.
        load_tensors(checkpoint / f"random_states_{accelerator.process_index}.pkl")
        accelerator.load_state(str(checkpoint), load_kwargs={"weights_only": True})
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


# ----------------------------------------------------------------------------------------------------------------
# Data and model helpers
# ----------------------------------------------------------------------------------------------------------------


# How a fine-tune ends the one line about data whose classes the model's head does not have.
LABELS_FIX = "pass --num-labels {classes} to re-initialise the head, or --loss kd to distil without labels"


def reinit_head(model, names: list[str] | None, num_labels: int) -> None:
    """Replace the classifier(s) with fresh ones for `num_labels` classes and update the config's labels."""
    names = names if names and len(names) == num_labels else [f"LABEL_{i}" for i in range(num_labels)]
    replaced = 0
    for attr in ("classifier", "cls_classifier", "distillation_classifier"):
        old = getattr(model, attr, None)
        if isinstance(old, torch.nn.Linear):
            new = torch.nn.Linear(old.in_features, num_labels)
            torch.nn.init.zeros_(new.weight)
            torch.nn.init.zeros_(new.bias)
            setattr(model, attr, new.to(old.weight.dtype))
            replaced += 1
    if not replaced:
        raise RetrofitError("cannot find this model's classifier to re-initialise; drop --num-labels")
    model.config.num_labels = num_labels
    model.config.id2label = dict(enumerate(names))
    model.config.label2id = {name: i for i, name in enumerate(names)}


def set_trainable(model, scope: str) -> tuple[int, int]:
    """Freeze per `scope` ("all" or "merger-and-after": the merger, the layers after it and the head).

    Returns (trainable, total) parameter counts.
    """
    from .loading import family_and_head, is_merged

    if scope == "merger-and-after" and is_merged(model.config):
        _, head = family_and_head(model.config)
        k = model.config.merge_after_layer
        frozen = [f"{head.layers_path}.{i}." for i in range(k)]
        for name, param in model.named_parameters():
            before_merge = "embeddings" in name or any(name.startswith(prefix) for prefix in frozen)
            param.requires_grad_(not before_merge)
    else:
        for param in model.parameters():
            param.requires_grad_(True)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


@torch.no_grad()
def evaluate_loop(model, dataloader, accelerator, teacher=None) -> dict:
    """Accuracy over a prepared dataloader, on all processes; without labels, top-1 agreement with the teacher; for
    a backbone, the mean cosine similarity of its features to the teacher's."""
    model.eval()
    read = HeadReader(accelerator.unwrap_model(model), features=False)
    read_teacher = HeadReader(teacher, features=False) if teacher is not None else None
    total = seen = 0
    reference = "labels"
    for batch in dataloader:
        pixels = batch["pixel_values"]
        with accelerator.autocast():
            student = read(model, pixels)
        labels = batch.get("labels") if student.logits is not None else None
        if labels is None:
            if read_teacher is None:
                continue
            with accelerator.autocast():
                expected = read_teacher(teacher, pixels)
        if student.logits is None:
            scores = F.cosine_similarity(student.features.float(), expected.features.float(), dim=-1)
            reference = "teacher features"
        else:
            if labels is None:
                labels, reference = expected.logits.argmax(-1), "teacher"
            scores = (student.logits.argmax(-1) == labels).float()
        scores = accelerator.gather_for_metrics(scores)
        total += scores.sum().item()
        seen += scores.numel()
    model.train()
    if not seen:
        return {}
    key = "similarity" if reference == "teacher features" else "accuracy"
    return {key: total / seen, "examples": seen, "reference": reference}


def _make_accelerator(args: TrainArgs, project_dir: Path | None):

    log_with = None if args.report_to in (None, "none") else args.report_to
    # Without a GPU, say so: Accelerate then runs several launched processes as MULTI_CPU (gloo) instead of treating
    # each as a separate single-process run.
    has_device = torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())
    has_device = has_device or torch.backends.mps.is_available()
    try:
        return _accelerator(args, project_dir, log_with, cpu=not has_device)
    except (ValueError, RuntimeError) as exc:  # e.g. fp16 without a GPU
        raise RetrofitError(f"cannot set up training: {brief(exc, 200)}") from None


def _accelerator(args: TrainArgs, project_dir: Path | None, log_with, *, cpu: bool):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration

    # Each call is a new training run, possibly with another precision than the last one in this process (sweeps,
    # notebooks, the recovery benchmark). Accelerate keeps its state process-wide and refuses a change, so start from a
    # clean AcceleratorState; the PartialState (devices, process group of `accelerate launch`) is kept.
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    return Accelerator(
        cpu=cpu,
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.grad_accum,
        log_with=log_with,
        project_config=ProjectConfiguration(
            project_dir=str(project_dir) if project_dir else None,
            logging_dir=str(project_dir / "logs") if project_dir else None,
        ),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )


# ----------------------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------------------


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Recompute every encoder layer's activations in the backward pass (the merging layer included: it is a
    checkpointed layer too) instead of keeping them: less memory for one more forward pass per layer."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # newer transformers 5.x; the old name warns there
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def train_loop(
    model,
    image_processor,
    args: TrainArgs,
    *,
    teacher=None,
    checkpoint_dir: Path | None = None,
    on_end: Callable | None = None,
    log: Callable[[str], None] = print,
) -> TrainResult:
    """Train `model` per `args` on the data; `on_end(accelerator, unwrapped_model, result)` runs on the main process
    after the last step (export). Data problems are found before anything is written."""
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm
    from transformers import get_cosine_schedule_with_warmup

    from .data import class_names, dataset_label_map, load_split, make_dataloader, model_labels
    from .loading import family_and_head

    started = time.perf_counter()
    args.check()
    classifier = family_and_head(model.config)[1].is_classifier
    if args.feature_weight is None:  # filled in here, so the model card names it
        # classifiers: logits only (features measured neutral on top of them, docs/recovery.md); backbones: features
        args.feature_weight = 0.0 if classifier else 1.0
    if not classifier and (args.loss != "kd" or not args.feature_weight):
        raise RetrofitError(
            f"{type(model).__name__} is a backbone (no classifier head, no logits): fine-tune it with --loss kd and "
            "a positive --feature-weight, which distil its features from the unmerged model"
        )
    set_seed(args.seed)

    # --- data (every data error is raised here, before any folder is created) ---
    label_column = None if args.loss == "kd" else args.label_column
    train_set = load_split(
        args.data,
        args.split,
        image_column=args.image_column,
        label_column=label_column,
        limit=args.sample or args.limit,
        sample_seed=args.seed if args.sample else None,
    )
    names = class_names(train_set)
    if args.num_labels is not None:
        if args.loss != "ce":
            raise RetrofitError("--num-labels re-initialises the head, so the teacher cannot guide it; use --loss ce")
        reinit_head(model, names, args.num_labels)
    label_map = None
    if label_column and classifier:  # one line now, not a missing label or an IndexError at some step mid-run
        label_map = dataset_label_map(
            model_labels(model.config),
            train_set,
            args.data,
            hint="fix the labels of the split, or use --loss kd, which needs none",
            fix=LABELS_FIX,
        )
    num_channels = getattr(model.config, "num_channels", None)
    train_dl = make_dataloader(
        train_set,
        image_processor,
        batch_size=args.batch_size,
        train=True,
        augment=args.augment,
        num_workers=args.num_workers,
        seed=args.seed,
        num_channels=num_channels,
        label_map=label_map,
    )
    eval_dl = None
    if args.eval_split:
        eval_set = load_split(
            args.data,
            args.eval_split,
            image_column=args.image_column,
            label_column=args.label_column,
            limit=args.eval_limit,
        )
        eval_map = None
        if args.num_labels is None and args.label_column:
            try:
                eval_map = dataset_label_map(model_labels(model.config), eval_set, args.data, fix=LABELS_FIX)
            except RetrofitError:
                if args.loss != "kd":
                    raise
                # Distilling onto a head with other classes: evaluate agreement with the teacher instead.
                eval_set = eval_set.remove_columns("label")
        eval_dl = make_dataloader(
            eval_set,
            image_processor,
            batch_size=min(args.eval_batch_size or args.batch_size, len(eval_set)),
            num_workers=args.num_workers,
            num_channels=num_channels,
            label_map=eval_map,
        )

    # --- checkpoints: refuse to mix runs ---
    existing = _check_checkpoints(checkpoint_dir, args)
    if args.resume and not existing:
        log(f"--resume: no checkpoint in '{checkpoint_dir}'; starting from the beginning")
    settings = run_settings(model, args)
    if args.resume and existing:
        check_same_run(checkpoint_dir, settings)

    # --- accelerator, optimizer, schedule ---
    accelerator = _make_accelerator(args, checkpoint_dir)
    if checkpoint_dir and accelerator.is_main_process and existing and not args.resume:  # --overwrite: start over
        remove_checkpoints(checkpoint_dir)
    trainable, total = set_trainable(model, args.train)
    features = args.loss != "ce" and args.feature_weight > 0
    read = HeadReader(model, features=features)  # before `prepare`: hooks go on the model itself
    read_teacher = HeadReader(teacher, features=features) if teacher is not None else None
    optimizer = torch.optim.AdamW(param_groups(model, args), lr=args.lr)
    if args.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    model, optimizer, train_dl = accelerator.prepare(model, optimizer, train_dl)
    if eval_dl is not None:
        eval_dl = accelerator.prepare(eval_dl)
    if teacher is not None:
        teacher = teacher.to(accelerator.device).eval().requires_grad_(False)
    steps_per_epoch = max(1, math.ceil(len(train_dl) / args.grad_accum))
    total_steps = args.max_steps or max(1, math.ceil(args.epochs * steps_per_epoch))
    warmup = int(args.warmup_ratio * total_steps)
    # The prepared scheduler steps once per process for each optimizer step, hence the factor.
    scheduler = get_cosine_schedule_with_warmup(
        optimizer, warmup * accelerator.num_processes, total_steps * accelerator.num_processes
    )
    scheduler = accelerator.prepare(scheduler)
    progress = Progress()
    if args.resume and existing:
        *older, latest = list_checkpoints(checkpoint_dir)
        load_checkpoint(accelerator, latest, progress, older)
        log(f"resumed from {latest} (step {progress.step}, epoch {progress.epoch}, batch {progress.batch})")
    if accelerator.trackers == [] and args.report_to not in (None, "none"):
        accelerator.init_trackers("retrofit", config={k: v for k, v in asdict(args).items() if v is not None})
    log(
        f"training {trainable / 1e6:.3g}M of {total / 1e6:.3g}M parameters ({args.train}) with loss "
        f"{describe_loss(args)} for {total_steps} steps ({total_steps / steps_per_epoch:.3g} epochs of "
        f"{steps_per_epoch} steps) on {accelerator.num_processes} process(es), {accelerator.device}, "
        f"precision {args.mixed_precision}"
    )

    result = TrainResult(steps=progress.step, epochs=0.0, last_loss=None, checkpoint_dir=checkpoint_dir)

    def run_eval() -> None:
        if eval_dl is None:
            return
        metrics = evaluate_loop(model, eval_dl, accelerator, teacher=teacher)
        metrics["step"] = progress.step
        result.eval_history.append(metrics)
        if metrics:
            what = {"labels": "accuracy", "teacher": "agreement with the teacher"}.get(
                metrics["reference"], "cosine similarity to the teacher"
            )
            key = "accuracy" if "accuracy" in metrics else "similarity"
            with tqdm.external_write_mode():  # print above the progress bar, not into it
                log(f"step {progress.step}: eval {what} {metrics[key]:.4f} on {metrics['examples']} images")
            accelerator.log({f"eval/{key}": metrics[key]}, step=progress.step)

    bar = tqdm(
        total=total_steps,
        initial=progress.step,
        disable=not (args.progress and accelerator.is_main_process),
        desc="train",
        dynamic_ncols=True,
    )
    if args.eval_at_start and progress.step == 0:
        run_eval()
    model.train()
    stop_at = min(total_steps, args.stop_after or total_steps)
    last_saved = progress.step if args.resume and existing else -1
    epoch = progress.epoch
    try:  # the progress bar ends before any error line is printed
        while progress.step < stop_at:
            train_dl.set_epoch(epoch)
            train_dl.dataset.set_epoch(epoch)
            skip = progress.batch if epoch == progress.epoch else 0
            batches = accelerator.skip_first_batches(train_dl, skip) if skip else train_dl
            progress.epoch, progress.batch = epoch, skip
            for batch in batches:
                with accelerator.accumulate(model):
                    with accelerator.autocast():
                        student = read(model, batch["pixel_values"])
                        expected = None
                        if args.loss != "ce":
                            with torch.no_grad():
                                expected = read_teacher(teacher, batch["pixel_values"])
                    loss = compute_loss(student, expected, batch.get("labels"), args)
                    bad = accelerator.reduce(torch.tensor(float(not torch.isfinite(loss)), device=loss.device), "sum")
                    if bad.item() > 0:
                        good = list_checkpoints(checkpoint_dir) if checkpoint_dir else []
                        again = f"--resume from the last good checkpoint, {good[-1]}" if good else "start again"
                        raise RetrofitError(
                            f"the loss became {loss.item()} at step {progress.step + 1}; stopped. Lower --lr or use "
                            f"--mixed-precision no or bf16, then {again}"
                        )
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and args.max_grad_norm:
                        accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad()
                progress.batch += 1
                if not accelerator.sync_gradients:
                    continue
                progress.step += 1
                result.last_loss = loss.item()
                bar.update(1)
                bar.set_postfix(loss=f"{result.last_loss:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
                accelerator.log({"train/loss": result.last_loss, "train/lr": scheduler.get_last_lr()[0]}, progress.step)
                if checkpoint_dir and progress.step % args.save_every == 0:
                    save_checkpoint(accelerator, checkpoint_dir, progress, args.keep_checkpoints, settings)
                    last_saved = progress.step
                if args.eval_every and progress.step % args.eval_every == 0:
                    run_eval()
                if progress.step >= stop_at:
                    break
            else:  # the epoch ran to its end
                epoch += 1
                progress.epoch, progress.batch = epoch, 0
                if not args.eval_every and progress.step < stop_at:
                    run_eval()
                continue
    finally:
        bar.close()
    for reader in (read, read_teacher):
        if reader is not None:
            reader.close()
    if checkpoint_dir and last_saved != progress.step:
        save_checkpoint(accelerator, checkpoint_dir, progress, args.keep_checkpoints, settings)
    if progress.step >= total_steps and (not result.eval_history or result.eval_history[-1]["step"] != progress.step):
        run_eval()
    result.steps = progress.step
    result.epochs = progress.step / steps_per_epoch
    result.seconds = time.perf_counter() - started
    unwrapped = accelerator.unwrap_model(model)
    result.model = unwrapped
    accelerator.wait_for_everyone()
    if progress.step >= total_steps and on_end is not None and accelerator.is_main_process:
        result.output = on_end(accelerator, unwrapped, result)
    accelerator.wait_for_everyone()
    # Release the distributed (DDP) wrapper while the process group still exists: if DDP's reducer held the last
    # reference to a gloo group, destroying the group would wait on gloo's threads with the GIL held, a deadlock seen
    # under `accelerate launch` on CPU. The caller gets the unwrapped model (`result.model`).
    model, optimizer, scheduler = accelerator.free_memory(model, optimizer, scheduler)
    accelerator.end_training()
    return result


# ----------------------------------------------------------------------------------------------------------------
# Entry points
# ----------------------------------------------------------------------------------------------------------------


def describe_loss(args: TrainArgs, teacher: str | None = None) -> str:
    """The loss in words, for the model card; `teacher`: a --teacher other than the unmerged source model."""
    from .provenance import public_name

    if args.loss == "ce":
        return "ce (cross-entropy on labels)"
    features = f", feature weight {args.feature_weight:g}" if args.feature_weight else ""
    source = f"`{public_name(teacher)}`" if teacher else "the unmerged model"
    kd = f"kd from {source} (T = {args.temperature:g}{features})"
    return kd if args.loss == "kd" else f"mix ({args.alpha:g} × ce + {1 - args.alpha:g} × {kd})"


def _training_info(args: TrainArgs, result: TrainResult, init: str, teacher: str | None = None):
    from .card import TrainingInfo
    from .provenance import public_name

    notes = [f"trained: {args.train}; lr {args.lr}, batch {args.batch_size}x{args.grad_accum}, seed {args.seed}"]
    if result.final_accuracy is not None:
        notes.append(f"accuracy on `{public_name(args.data)}` {args.eval_split}: {result.final_accuracy:.4f}")
    return TrainingInfo(
        data=args.data,
        steps=result.steps,
        epochs=round(result.epochs, 3),
        loss=describe_loss(args, teacher),
        init=init,
        notes=notes,
    )


def task_for(task: str | None, num_labels: int | None) -> str | None:
    """The `--task` a fine-tune loads its source for: `--num-labels` asks for a new classifier, so it implies
    ``image-classification`` (a DINOv2 backbone checkpoint then gets one)."""
    if num_labels is None or task == "image-classification":
        return task
    if task is not None:
        raise RetrofitError(
            f"--num-labels gives the model a new classifier, which a {task} model has none of; drop one of them"
        )
    return "image-classification"


def check_teacher_logits(source: str | Path, saved, config, loss: str) -> None:
    """Refuse distilling logits into a classifier the checkpoint does not have: teacher and student would each get
    their own random head (a backbone or a full CLIP/SigLIP checkpoint loaded for image classification)."""
    from .loading import classifier_is_new

    if loss != "ce" and classifier_is_new(saved, config):
        saved_as = (saved.architectures or ["?"])[0]
        raise RetrofitError(
            f"'{source}' is a {saved_as} checkpoint, so its classifier would be new and random, with no logits to "
            f"distil (--loss {loss}); train one with --num-labels N --loss ce on labelled data, or keep a backbone "
            "with --task image-feature-extraction"
        )


def blank_outputs(model, image_size: tuple[int, int]) -> torch.Tensor:
    """What `model`'s head gives for one blank image of `image_size` (logits, or a backbone's features): a cheap
    check that the model runs on the images it will be given."""
    config = model.config
    vision = getattr(config, "vision_config", None)
    channels = getattr(config, "num_channels", None) or getattr(vision, "num_channels", 3)
    pixels = torch.zeros(1, channels, *image_size, dtype=model.dtype)
    with torch.no_grad():
        read = HeadReader(model, features=False)(model, pixels)
    return read.logits if read.logits is not None else read.features


def check_runs_on_its_images(model, processor, source) -> tuple[int, int]:
    """Refuse, before any work, a checkpoint that cannot run on the images its own image processor gives (another
    size than its config's, say). Returns that size."""
    from .loading import processor_image_size

    height, width = processor_image_size(processor)
    try:
        blank_outputs(model, (height, width))
    except Exception as exc:  # noqa: BLE001 - any failure here would end the run at its first step
        raise RetrofitError(
            f"'{source}' cannot run on the {height}×{width} images its image processor gives ({brief(exc, 120)}); "
            "fix its preprocessor_config.json or config.json so that they agree"
        ) from None
    return height, width


def check_teacher_fits(teacher, student, processor, teacher_source) -> None:
    """Refuse, before training, a teacher that cannot read the student's images or gives other outputs (another
    image size, another number of labels): one forward pass of a blank image through both."""
    from .loading import processor_image_size

    height, width = processor_image_size(processor)
    try:
        expected = blank_outputs(teacher, (height, width))
    except Exception as exc:  # noqa: BLE001 - any failure here would end the run at its first step
        raise RetrofitError(
            f"the teacher '{teacher_source}' cannot run on the {height}×{width} images the model is trained on "
            f"({brief(exc, 120)}); pass a --teacher made for them"
        ) from None
    shapes = {"teacher": tuple(expected.shape), "student": tuple(blank_outputs(student, (height, width)).shape)}
    if shapes["teacher"] != shapes["student"]:
        raise RetrofitError(
            f"the teacher '{teacher_source}' gives outputs of shape {shapes['teacher']}, the model {shapes['student']} "
            "(other labels?); pass a --teacher with the same labels, or use --loss ce"
        )


def finetune(
    source: str | Path,
    *,
    output: str | Path,
    after_layer: int | None = None,
    num_tokens: int | None = None,
    rope_positions: str | None = None,
    task: str | None = None,
    calibrate: bool = True,
    calibrate_images: int = 256,
    teacher: str | Path | None = None,
    trust_remote_code: bool = False,
    revision: str | None = None,
    card_results: Callable[[TrainResult], str] | None = None,
    push_to_hub: str | None = None,
    private: bool = False,
    create_pr: bool = False,
    log: Callable[[str], None] = print,
    **settings,
) -> TrainResult:
    """Insert a PatchMerger into `source` (or continue training a retrofit export) and fine-tune it; export to
    `output`. `settings` are `TrainArgs` fields (loss, epochs, lr, data, ...); `card_results(result)` may give the
    model card's results table. `calibrate` starts the merger from k-means of the layer-K tokens of a shuffled sample
    of `calibrate_images` training images (`retrofit.calibrate`) instead of at random. `task` loads the source as
    the family's classifier or backbone (`retrofit.convert.convert`); `--num-labels` implies a classifier.
    `rope_positions` is for RoPE models (DINOv3): see `retrofit.insert_patch_merger`. With
    `push_to_hub` (a repo id) the main process uploads the export at the end (`create_pr`: as a pull request on an
    existing repo; the login is checked before training starts)."""
    from accelerate.utils import set_seed

    from .atomic import check_checkpoint_dir, check_output
    from .loading import (
        family_and_head,
        for_task,
        is_merged,
        load_config,
        load_image_processor,
        load_model,
        processor_image_size,
        resolve_source,
    )
    from .provenance import find_teacher, public_name
    from .surgery import check_merge, insert_patch_merger

    args = TrainArgs(**settings)
    args.check()
    resolve_source(source)  # a bad retrofit:NAME is refused first
    if calibrate:
        check_at_least_one("--calibrate-images", calibrate_images)
    checkpoint_dir = Path(args.checkpoint_dir) if args.checkpoint_dir else default_checkpoint_dir(output)
    if checkpoint_dir.resolve().is_relative_to(Path(output).resolve()):
        raise RetrofitError(
            f"--checkpoint-dir '{checkpoint_dir}' is inside --output '{output}', which the export replaces; put the "
            "checkpoints elsewhere (the default is <output>-checkpoints)"
        )
    check_checkpoint_dir(checkpoint_dir)
    resuming = args.resume and bool(list_checkpoints(checkpoint_dir))  # then the run being resumed owns `output`
    check_output(output, args.overwrite or resuming, inputs=(source, teacher, args.data))
    if push_to_hub:
        from .push import check_push

        check_push(push_to_hub, private=private, create_pr=create_pr)
    _check_checkpoints(checkpoint_dir, args)
    set_seed(args.seed)  # the merger's random initialisation must be the same in a resumed run
    saved = load_config(source, trust_remote_code=trust_remote_code, revision=revision)
    config = for_task(saved, task_for(task, args.num_labels))
    check_teacher_logits(source, saved, config, args.loss)
    task = family_and_head(config)[1].pipeline_tag  # the teacher is loaded as the same kind of model
    processor = load_image_processor(source, config, revision=revision, log=log)
    init = "continued from a retrofit export"
    if is_merged(config):
        if after_layer not in (None, config.merge_after_layer) or num_tokens not in (None, config.merge_num_tokens):
            raise RetrofitError(
                f"'{source}' is already merged (after layer {config.merge_after_layer}, {config.merge_num_tokens} "
                "tokens); drop --after-layer/--tokens to continue training it, or fine-tune its source"
            )
        if rope_positions not in (None, getattr(config, "merge_rope_positions", None)):
            raise RetrofitError(
                f"'{source}' is already merged with --rope-positions "
                f"{getattr(config, 'merge_rope_positions', None) or '(none: not a RoPE model)'}; drop "
                "--rope-positions to continue training it, or fine-tune its source"
            )
        model = load_model(source, config=config, revision=revision)
        teacher_source, teacher_revision, teacher_config = teacher, None, None
        if args.loss != "ce":
            if teacher is None:  # the model the export was made from, found and checked (`retrofit.provenance`)
                teacher_source, teacher_revision = find_teacher(str(source), config)
            try:
                teacher_config = load_config(
                    teacher_source, trust_remote_code=trust_remote_code, revision=teacher_revision, task=task
                )
            except RetrofitError as exc:
                if teacher:
                    raise
                raise RetrofitError(
                    f"the teacher of --loss {args.loss} is '{source}''s source, '{config.merge_source}', which cannot "
                    f"be loaded ({exc}); pass --teacher, or use --loss ce"
                ) from None
        source_config = teacher_config if teacher is None else None  # the card's cost table compares with it
    else:
        if after_layer is None or num_tokens is None:
            raise RetrofitError("--after-layer and --tokens are required when SOURCE is not a retrofit export")
        check_merge(config, after_layer, num_tokens, processor_image_size(processor), rope_positions=rope_positions)
        base = load_model(source, config=config, trust_remote_code=trust_remote_code, revision=revision)
        model = insert_patch_merger(
            base.eval(), after_layer, num_tokens, source=str(source), rope_positions=rope_positions
        )
        teacher_source, teacher_revision, source_config = teacher or source, revision, config
        teacher_config = None
        if args.loss != "ce":
            teacher_config = copy.deepcopy(config) if teacher is None else load_config(
                teacher, trust_remote_code=trust_remote_code, task=task
            )  # fmt: skip
        init = "random"
    check_runs_on_its_images(model, processor, source)
    teacher_model = None
    if args.loss != "ce":
        # A separate copy: the student shares its tensors with a freshly loaded source, so load the teacher again.
        teacher_model = load_model(teacher_source, config=teacher_config, trust_remote_code=trust_remote_code,
                                   revision=teacher_revision).eval()  # fmt: skip
        check_teacher_fits(teacher_model, model, processor, teacher_source)
    if calibrate and init == "random":
        if args.resume and list_checkpoints(checkpoint_dir):  # the checkpoint holds the calibrated merger
            data = public_name(args.data)
            init = f"calibrated (k-means of the layer-{after_layer} tokens of `{data}`; the run was resumed)"
        else:
            from .calibrate import calibrate_from_data

            calibration = calibrate_from_data(
                model,
                args.data,
                source=str(source),
                log=log,
                num_images=calibrate_images,
                split=args.split,
                image_column=args.image_column,
                seed=args.seed,
            )
            init = calibration.describe(args.data, args.split, after_layer)
    stored_dtype = model.dtype  # the source's (a bf16 checkpoint loads as bf16): the export is saved the same way
    model.float()

    def on_end(accelerator, trained, result: TrainResult) -> Path:
        from .card import build_card
        from .export import export
        from .loading import processor_image_size

        trained = trained.to(stored_dtype).eval()
        if stored_dtype != torch.float32:
            log(f"saving in {str(stored_dtype).removeprefix('torch.')}, as the source is stored (trained in float32)")
        card = build_card(
            trained,
            source_config=source_config,
            image_size=processor_image_size(processor),
            training=_training_info(args, result, init, teacher),
            results_table=card_results(result) if card_results else None,
        )
        export(trained, output, image_processor=processor, card=card, overwrite=args.overwrite or resuming,
               source_config=source_config)  # fmt: skip
        log(f"wrote {output} (checkpoints in {checkpoint_dir})")
        return Path(output)

    result = train_loop(
        model, processor, args, teacher=teacher_model, checkpoint_dir=checkpoint_dir, on_end=on_end, log=log
    )
    if push_to_hub and result.output is not None:  # set on the main process, once the export is written
        from .push import push_written

        push_written(result.output, push_to_hub, private=private, create_pr=create_pr, log=log)
    return result


def _check_keys(given: dict, valid, where: str, what: str) -> None:
    """Refuse keys that `valid` lacks: configs accept unknown keyword arguments silently."""
    for key in given:
        if key not in valid:
            raise RetrofitError(f"unknown {what} '{key}' in {where}{did_you_mean(key, valid)}")


def pretrain(
    model_config: dict,
    *,
    output: str | Path,
    image_processor: dict | None = None,
    log: Callable[[str], None] = print,
    **settings,
) -> TrainResult:
    """Train a ViT (built from `model_config`, a `ViTConfig` dict) from scratch with cross-entropy; save a plain
    transformers checkpoint (config, weights, image processor) to `output`. Labels come from the data."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    from .atomic import BASELINE, atomic_dir, check_checkpoint_dir, check_output
    from .data import class_names, load_split
    from .loading import check_config, processor_image_size

    args = TrainArgs(**{"loss": "ce", "lr": 1e-3, **settings})
    args.check()
    if args.loss != "ce":
        raise RetrofitError("pretraining has no teacher; use loss ce")
    reserved = sorted({"num_labels", "id2label", "label2id"} & set(model_config))
    if reserved:
        raise RetrofitError(
            f"pretrain.model.{reserved[0]} is taken from the data's class names; remove it from the recipe"
        )
    _check_keys(model_config, ViTConfig().to_dict(), "pretrain.model", "ViTConfig field")
    _check_keys(
        image_processor or {}, ViTImageProcessor().to_dict(), "pretrain.image_processor", "ViTImageProcessor field"
    )
    checkpoint_dir = Path(args.checkpoint_dir) if args.checkpoint_dir else default_checkpoint_dir(output)
    check_checkpoint_dir(checkpoint_dir)
    resuming = args.resume and bool(list_checkpoints(checkpoint_dir))  # then the run being resumed owns `output`
    check_output(output, args.overwrite or resuming, kind=BASELINE, inputs=(args.data,))
    names = class_names(load_split(args.data, args.split, label_column=args.label_column, limit=1))
    if not names:
        raise RetrofitError(f"'{args.data}' has no class names (ClassLabel); pretraining needs them")
    try:
        config = ViTConfig(
            **model_config,
            num_labels=len(names),
            id2label=dict(enumerate(names)),
            label2id={n: i for i, n in enumerate(names)},
        )
        check_config(config, "pretrain.model")
        size = config.image_size
        processor = ViTImageProcessor(**{
            "size": {"height": size, "width": size},
            "image_mean": [0.5] * config.num_channels,
            "image_std": [0.5] * config.num_channels,
            **(image_processor or {}),
        })  # fmt: skip
    except RetrofitError:
        raise
    except Exception as exc:  # noqa: BLE001 - TypeError, ValueError, huggingface_hub's StrictDataclassError
        raise RetrofitError(f"bad pretrain.model or pretrain.image_processor: {brief(exc)}") from None
    if processor_image_size(processor) != (size, size):
        raise RetrofitError(
            f"pretrain.image_processor gives {'×'.join(map(str, processor_image_size(processor)))} images, but "
            f"pretrain.model.image_size is {size}; give both the same size"
        )
    torch.manual_seed(args.seed)
    model = ViTForImageClassification(config)
    _check_checkpoints(checkpoint_dir, args)

    def on_end(accelerator, trained, result: TrainResult) -> Path:
        with atomic_dir(output, args.overwrite or resuming, kind=BASELINE, inputs=(args.data,)) as tmp:
            trained.float().save_pretrained(tmp)
            processor.save_pretrained(tmp)
            info = {
                "data": args.data,
                "steps": result.steps,
                "epochs": result.epochs,
                "accuracy": result.final_accuracy,
                "eval_split": args.eval_split,
                "settings": asdict(args),
            }
            (tmp / "training.json").write_text(json.dumps(info, indent=2, default=str) + "\n")
        log(f"wrote {output}")
        return Path(output)

    return train_loop(model, processor, args, checkpoint_dir=checkpoint_dir, on_end=on_end, log=log)
