"""The training loop, on Accelerate: read `train` top to bottom, like Accelerate's ``examples/complete_cv_example.py``.

`train` takes a model (a merged model to fine-tune back, or a baseline to pretrain), builds the data, the
Accelerator (mixed precision, gradient accumulation, trackers), the budget (`training_budget`: --max-steps, or
--epochs raised to --min-steps on small data; printed with why), AdamW with warm-up and cosine decay, resumes from a
checkpoint if asked (`retrofit.checkpoints`), runs the steps (`retrofit.losses`: kd, ce, mix or contrastive; clipping; a
NaN guard; with --ema-decay a moving average of the weights, `WeightAverage`), evaluates with `retrofit.evaluation`'s
loop and saves checkpoints on the way, and returns the trained model (with --ema-decay: the average's weights) in a
`TrainResult`. Loading, merging, calibrating and exporting around it are in `retrofit.finetune`.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TypeVar

import torch

from .atomic import releases_write_locks
from .checkpoints import (
    EVALUATED,
    OPTIONS,
    Progress,
    check_checkpoints,
    check_same_run,
    list_checkpoints,
    load_checkpoint,
    recorded_budget,
    remove_checkpoints,
    run_settings,
    save_checkpoint,
    scores_other_images,
    training_options,
)
from .data import mixup_batch
from .errors import RetrofitError, brief, check_interrupted, counted
from .losses import HeadReader, Outputs, compute_loss, describe_loss
from .settings import TrainingRun, TrainSettings
from .zero_shot import Captions, caption_logits

T = TypeVar("T")

# How a fine-tune ends the one line about data whose classes the model's head does not have.
LABELS_FIX = "pass --num-labels {classes} to re-initialise the head, or --loss kd to distil without labels"
NEW_HEAD_FIX = (
    "the new head (--num-labels) has the training split's classes: evaluate on a split of those (--eval-split)"
)


@dataclass
class TrainResult:
    """What a run did: steps, the last training loss, evaluation history (each evaluation's ``accuracy`` on labels,
    zero-shot for a contrastive pretraining, ``agreement`` with the teacher's predictions on a split without labels
    the model knows, or a backbone's or dual encoder's ``similarity``), the trained model (unwrapped)."""

    steps: int
    epochs: float
    last_loss: float | None
    eval_history: list[dict] = field(default_factory=list)
    output: Path | None = None  # the export (or baseline) written from it
    checkpoint_dir: Path | None = None
    seconds: float = 0.0
    model: object = field(default=None, repr=False)  # printed, it would fill the screen
    finished: bool = False  # False: stopped early (`stop_after`), to be resumed
    images: int = 0  # the training images read (on each process, under `accelerate launch`)
    budget: Budget | None = None  # the budget trained (a resumed run's: its first run's, whatever the options say now)
    is_main_process: bool = True  # the process that writes the export

    @property
    def final_evaluation(self) -> dict:
        """The evaluation of the weights the run ended with: the last one, where it is of the last step (a run resumed
        without evaluations has only older ones), else {}."""
        last = self.eval_history[-1] if self.eval_history else {}
        return last if last.get("step") == self.steps else {}

    @property
    def final_accuracy(self) -> float | None:
        return self.final_evaluation.get("accuracy")


# ----------------------------------------------------------------------------------------------------------------
# What the loop is built from
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Budget:
    """How many optimizer steps a run trains, how many of them warm up, and why: `why` is the line `train` prints
    before the first step (and ``run.json`` records, so that a resumed run keeps the budget)."""

    steps: int
    warmup: int
    why: str
    options: dict = field(default_factory=dict)  # the `BUDGET_OPTIONS` that chose it (a resumed run's: its first's)


BUDGET_OPTIONS = ("epochs", "max_steps", "min_steps", "warmup_ratio")


def _epochs(epochs: float) -> str:
    return f"{epochs:.3g} epoch{'' if epochs == 1 else 's'}"


@contextlib.contextmanager
def callers_random_state() -> Iterator[None]:
    """Restore Python's, NumPy's and torch's CPU random generators afterwards: a run seeds them all (accelerate's
    `set_seed`), which left a notebook's own draws reseeded to the run's seed. (CUDA's are not forked: that would
    initialise every GPU in every process of a multi-GPU launch.)"""
    import random

    import numpy as np

    python, numpy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            random.setstate(python)
            np.random.set_state(numpy)


def keeps_callers_random_state(run: Callable[..., T]) -> Callable[..., T]:
    """For a whole run called from Python (finetune, pretrain): the caller's random generators are given back as they
    were (`callers_random_state`)."""

    @functools.wraps(run)
    def whole_run(*args, **kwargs):
        with callers_random_state():
            return run(*args, **kwargs)

    return whole_run


@contextlib.contextmanager
def progress_bars(shown: bool) -> Iterator[None]:
    """The libraries' own progress bars (datasets' "Generating train split", transformers' "Loading weights" and
    huggingface_hub's downloads) hidden in the block unless `shown`; as they were after it."""
    if shown:
        yield
        return
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars
    from transformers.utils import logging as hf_logging

    from .data import datasets_progress_bars

    transformers_bars, hub_bars = hf_logging.is_progress_bar_enabled(), not are_progress_bars_disabled()
    hf_logging.disable_progress_bar()  # huggingface_hub's too
    try:
        with datasets_progress_bars(False):
            yield
    finally:
        if transformers_bars:
            hf_logging.enable_progress_bar()  # huggingface_hub's too
        if not hub_bars:
            disable_progress_bars()


def hides_library_bars(run: Callable[..., T]) -> Callable[..., T]:
    """For a whole run called from Python (finetune, pretrain): ``progress=False`` hides the libraries' progress bars
    (`progress_bars`) as well as the training's."""

    @functools.wraps(run)
    def whole_run(*args, **kwargs):
        with progress_bars(kwargs.get("progress", True)):
            return run(*args, **kwargs)

    return whole_run


def training_budget(run: TrainSettings, images: int, steps_per_epoch: int, processes: int = 1) -> Budget:
    """The budget of `run` on `images` training images, `steps_per_epoch` optimizer steps per epoch: ``--max-steps``
    exactly; otherwise ``--epochs`` of the data, raised to ``--min-steps`` where that is more (a few epochs of a small
    data set are a few dozen steps, too few to recover a merge: docs/recovery.md, small data). The warm-up is
    ``--warmup-ratio`` of the steps chosen, then the learning rate decays along a cosine to 0 at the last step."""
    per_step = run.batch_size * processes * run.grad_accum
    parts = [f"{run.batch_size}"] + [f"{processes} processes"] * (processes > 1)
    parts += [f"{run.grad_accum} accumulated"] * (run.grad_accum > 1)
    data = f"{images:,} images at batch {per_step:,}" + (f" ({' × '.join(parts)})" if len(parts) > 1 else "")
    from_epochs = max(1, math.ceil(run.epochs * steps_per_epoch))
    if run.max_steps:
        steps = run.max_steps
        why = f"training {counted(steps, 'step')} (--max-steps: {_epochs(steps / steps_per_epoch)} of {data})"
    elif run.min_steps and from_epochs < run.min_steps:
        steps = run.min_steps
        why = (
            f"training {steps:,} steps ({_epochs(steps / steps_per_epoch)} of {data}): --epochs {run.epochs:g} would "
            f"be {from_epochs:,} steps, below --min-steps {run.min_steps} (set --max-steps for an exact budget, "
            "--min-steps 0 to turn this off)"
        )
    else:
        steps = from_epochs
        off = ", --min-steps 0" if not run.min_steps else ""
        why = f"training {counted(steps, 'step')} ({_epochs(steps / steps_per_epoch)} of {data}{off})"
    options = {name: getattr(run, name) for name in BUDGET_OPTIONS}
    return Budget(steps=steps, warmup=int(run.warmup_ratio * steps), why=why, options=options)


# --eval-every 0 evaluates at the end of each epoch, but not more often than this in a run (and at the end): on small
# data the step floor (--min-steps) makes dozens of short epochs, and scoring the evaluation split after each cost
# more than the training itself (1,000 steps on 2,000 images: 31 passes over the evaluation split).
MAX_EPOCH_EVALUATIONS = 10


def resumed_budget(budget: Budget, recorded: dict | None) -> Budget:
    """The budget a resumed run trains: the one its first run chose (`recorded`, from ``run.json``), whatever the
    options now say (a different total would change the learning rate schedule halfway); `budget` where none was
    recorded (checkpoints of a retrofit from before the record)."""
    if recorded is None:
        return budget
    options = recorded.get("options") or budget.options  # none recorded before retrofit kept them
    if (recorded["steps"], recorded["warmup"]) == (budget.steps, budget.warmup):
        return Budget(budget.steps, budget.warmup, budget.why, options)
    steps, warmup = recorded["steps"], recorded["warmup"]
    why = (
        f"training {steps:,} steps ({warmup:,} warm-up), the budget this run started with (its checkpoints' run.json), "
        f"not the {budget.steps:,} ({budget.warmup:,} warm-up) these options give: pass --overwrite to start over "
        "with them"
    )
    return Budget(steps=steps, warmup=warmup, why=why, options=options)


def settle_losses(model, run: TrainingRun, *, captions: Captions | None = None) -> None:
    """Fill in `run`'s default feature weight for `model` (so that the model card names it) and refuse, in one line
    and before any data is read, a loss `model` cannot train with: a backbone or dual encoder has no logits."""
    from .loading import family_and_head

    head = family_and_head(model.config)[1]
    classifier, dual = head.is_classifier, head.is_dual_encoder
    if run.feature_weight is None:
        run.feature_weight = 0.0 if classifier else 1.0  # classifiers: logits (features measured neutral on them)
    if run.loss == "contrastive" and (not dual or captions is None):
        raise RetrofitError("loss contrastive pretrains an image-text dual encoder (CLIPModel) on captions")
    distils = run.loss == "kd" and bool(run.feature_weight or (dual and run.prompt_weight))
    if not classifier and run.loss != "contrastive" and not distils:
        what = "an image-text dual encoder" if dual else "a backbone"
        also = " or --prompt-weight" if dual else ""
        raise RetrofitError(
            f"{type(model).__name__} is {what} (no classifier head, no logits): fine-tune it with --loss kd and a "
            f"positive --feature-weight{also}, which distil its {'image embeddings' if dual else 'features'} from "
            "the unmerged model"
        )


def training_data(model, image_processor, run: TrainingRun, log: Callable[[str], None] | None = None) -> tuple:
    """The training and evaluation dataloaders of `run` for `model` (every data error is raised here, before any
    folder is created). Labels are mapped to the model's by class name; ``--num-labels`` gives the model a new head
    for the data's classes. Without labels the model the evaluation compares with is the teacher. `log` hears where
    the first --limit or --eval-limit images hold fewer classes than their split."""
    from .data import dataset_label_map, load_split, make_dataloader, model_labels, named_classes
    from .loading import family_and_head, image_channels

    classifier = family_and_head(model.config)[1].is_classifier
    label_column = None if run.loss == "kd" else run.label_column
    new_head = run.num_labels is not None  # its classes are the data's: the whole split's, text labels too
    train_set = load_split(run.data, **(run.images() | {"label_column": label_column}), log=log,
                           split_classes=new_head, choose="choose one with --split")  # fmt: skip
    if new_head:
        if run.loss != "ce":
            raise RetrofitError("--num-labels re-initialises the head, so the teacher cannot guide it; use --loss ce")
        reinit_head(model, named_classes(train_set), run.num_labels)
    label_map = None
    if label_column and classifier:  # one line now, not a missing label or an IndexError at some step mid-run
        hint = "fix the labels of the split, or use --loss kd, which needs none"
        label_map = dataset_label_map(model_labels(model.config), train_set, run.data, hint=hint, fix=LABELS_FIX)
    channels = image_channels(model.config)
    augment = run.augment or run.function_matching  # function matching: teacher and student see strong views
    train_dl = make_dataloader(train_set, image_processor, batch_size=run.batch_size, train=True, augment=augment,
                               num_workers=run.num_workers, seed=run.seed, num_channels=channels,
                               label_map=label_map)  # fmt: skip
    if not run.eval_split:
        return train_dl, None
    return train_dl, evaluation_loader(model.config, image_processor, run, log)


EVAL_LIMIT_INSTEAD = "leave out --eval-limit (data.eval_limit in a recipe), or raise it, to measure every class"


def evaluation_loader(
    config, image_processor, run: TrainingRun, log: Callable[[str], None] | None = None
) -> torch.utils.data.DataLoader:
    """The dataloader of `run`'s evaluation split for a model of `config`. kd needs no labels: on a split without
    them, or with classes the model does not know, its loader has none (``loader.dataset.has_labels`` is False) and
    kd's evaluations are agreement with the teacher (`evaluate`). With ``--num-labels`` (a new head for the training
    split's classes) the split's labels are mapped to the head's by name as well: its classes need not be numbered
    as the training split's."""
    from .data import dataset_label_map, load_split, make_dataloader, model_labels
    from .loading import family_and_head, image_channels

    labels = run.label_column
    choose = (
        "choose one with --eval-split, hold some of the training images out to evaluate on with --holdout (such as "
        "--holdout 0.1), or pass --eval-split '' to train without evaluating"
    )
    images = run.images(evaluation=True)
    try:
        eval_set = load_split(run.data, **images, log=log, instead=EVAL_LIMIT_INSTEAD, choose=choose)
    except RetrofitError:
        if run.loss != "kd" or labels != "label":  # a column the user named is one they expect to be read
            raise
        labels = None  # kd needs no labels: an unlabelled split measures agreement with the teacher
        eval_set = load_split(run.data, **(images | {"label_column": None}), log=log, instead=EVAL_LIMIT_INSTEAD,
                              choose=choose)  # fmt: skip
    eval_map = None
    if labels and family_and_head(config)[1].is_classifier:  # a new head (--num-labels) too: by the data's names
        fix = LABELS_FIX if run.num_labels is None else NEW_HEAD_FIX
        try:
            eval_map = dataset_label_map(model_labels(config), eval_set, run.data, fix=fix)
        except RetrofitError:
            if run.loss != "kd":
                raise
            eval_set = eval_set.remove_columns("label")  # a head with other classes: agreement with the teacher
    batch_size = min(run.eval_batch_size or run.batch_size, len(eval_set))
    return make_dataloader(eval_set, image_processor, batch_size=batch_size, num_workers=run.num_workers,
                           num_channels=image_channels(config), label_map=eval_map)  # fmt: skip


def reinit_head(model, names: list[str] | None, num_labels: int) -> None:
    """Replace the classifier(s) (`Head.classifiers` in the registry) with zeroed ones for `num_labels` classes and
    set the config's labels (the data's class names, if it has that many)."""
    from .loading import family_and_head

    names = names if names and len(names) == num_labels else [f"LABEL_{i}" for i in range(num_labels)]
    head = family_and_head(model.config)[1]
    for name in head.classifiers:
        old = model.get_submodule(name)
        if not isinstance(old, torch.nn.Linear):
            raise RetrofitError(f"this model's classifier '{name}' is not a linear layer; drop --num-labels")
        new = torch.nn.Linear(old.in_features, num_labels).to(old.weight.dtype)
        torch.nn.init.zeros_(new.weight)
        torch.nn.init.zeros_(new.bias)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, new)
    model.config.num_labels = num_labels
    model.config.id2label = dict(enumerate(names))
    model.config.label2id = {name: i for i, name in enumerate(names)}


def set_trainable(model, scope: str, *, text: bool = False) -> tuple[int, int]:
    """Freeze per `scope` ("all", or "merger-and-after": the embeddings and the layers before the merger are
    frozen). A dual encoder trains its image side only (`Head.image_modules`): the text tower, the text projection
    and the logit scale/bias stay frozen, so that the text embeddings stay the source's; `text` (contrastive
    pretraining) trains them too. Returns (trainable, total) parameter counts."""
    from .loading import family_and_head, is_merged
    from .surgery import encoder_layers

    image_side = () if text else tuple(f"{name}." for name in family_and_head(model.config)[1].image_modules)
    for param_name, param in model.named_parameters():
        param.requires_grad_(not image_side or param_name.startswith(image_side))
    if scope == "merger-and-after" and is_merged(model.config):
        _, layers = encoder_layers(model)
        for layer in list(layers)[: model.config.merge_after_layer]:
            layer.requires_grad_(False)
        for param_name, param in model.named_parameters():
            if "embeddings" in param_name:
                param.requires_grad_(False)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def param_groups(model: torch.nn.Module, settings: TrainSettings) -> list[dict]:
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
        {"params": decay, "weight_decay": settings.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
        {"params": merger, "weight_decay": 0.0, "lr": settings.lr * settings.merger_lr_scale},
    ]
    return [group for group in groups if group["params"]]


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Recompute every encoder layer's activations in the backward pass (the merging layer included: it is a
    checkpointed layer too) instead of keeping them: less memory for one more forward pass per layer."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # newer transformers 5.x; the old name warns there
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


class WeightAverage:
    """An exponential moving average of `model`'s trainable parameters (--ema-decay), kept in float32 next to the
    model and updated after each optimizer step (`update`); the run ends by putting it into the model
    (`copy_to_model`), which is what is evaluated last and exported. It is bias-corrected: after n steps it is the
    mean of the weights after steps 1..n, step j weighted by ``decay ** (n - j)`` (step 1 copies the weights), so the
    weights the run started from (the merged model before training) count for nothing however close to 1 the decay
    is; ``decay ** n`` of them would remain otherwise (0.998 over 1,000 steps: 13 %). Its state (`state_dict`: the
    averaged tensors by parameter name) goes into every checkpoint as safetensors; the number of updates is the
    checkpoint's step. Why not ``torch.optim.swa_utils.AveragedModel``: it copies the whole model, frozen parts
    included, and a checkpoint would pickle it."""

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.params = {name: param for name, param in model.named_parameters() if param.requires_grad}
        self.average = {name: param.detach().float().clone() for name, param in self.params.items()}

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Average in the weights after optimizer step `step` (1, 2, ...)."""
        weight = (1 - self.decay) / (1 - self.decay**step)
        for name, param in self.params.items():
            self.average[name].lerp_(param.detach().float(), weight)

    @torch.no_grad()
    def copy_to_model(self) -> None:
        for name, param in self.params.items():
            param.copy_(self.average[name])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: tensor.contiguous() for name, tensor in self.average.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state.keys() != self.average.keys():
            raise ValueError(f"its moving average has other weights than this run trains ({len(state)} tensors)")
        for name, tensor in state.items():
            self.average[name].copy_(tensor)


def launched_processes() -> int:
    """How many processes `accelerate launch` (torchrun) started (``WORLD_SIZE``), 1 when not launched."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def make_accelerator(settings: TrainSettings, project_dir: Path | None):
    """A fresh Accelerator for one run (precision, accumulation, trackers logging under `project_dir`)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState, PartialState
    from accelerate.utils import DataLoaderConfiguration, DistributedType, ProjectConfiguration

    # Without a GPU, say so: Accelerate then runs several launched processes as MULTI_CPU (gloo).
    has_device = torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())
    has_device = has_device or torch.backends.mps.is_available()
    # Each call is a new run, possibly with another precision than the last one in this process (sweeps, notebooks).
    # Accelerate keeps its state process-wide and refuses a change, so start from a clean AcceleratorState; the
    # PartialState (devices, process group of `accelerate launch`: `train` leaves it for the next run) is kept, unless
    # a script made it without a GPU before the run (a plain `PartialState()`: a single process, not distributed, in
    # each launched process, which then trained a whole run of its own into the same checkpoints and export).
    alone = PartialState._shared_state.get("distributed_type") == DistributedType.NO
    AcceleratorState._reset_state(reset_partial_state=alone and not has_device and launched_processes() > 1)
    GradientState._reset_state()
    try:
        accelerator = Accelerator(
            cpu=not has_device,
            mixed_precision=settings.mixed_precision,
            gradient_accumulation_steps=settings.grad_accum,
            log_with=None if settings.report_to in (None, "none") else settings.report_to,
            project_config=ProjectConfiguration(
                project_dir=str(project_dir) if project_dir else None,
                logging_dir=str(project_dir / "logs") if project_dir else None,
            ),
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        )
    except (ValueError, RuntimeError) as exc:  # e.g. fp16 on a device without it
        raise RetrofitError(f"cannot set up training: {brief(exc, 200)}") from None
    if settings.mixed_precision != "no" and not accelerator.native_amp:
        # Accelerate takes fp16 on the CPU without a word and trains in float32, which the log and run.json called fp16
        raise RetrofitError(
            f"--mixed-precision {settings.mixed_precision} does not run on the {accelerator.device.type.upper()} "
            "(Accelerate would train in float32); use --mixed-precision bf16 or no there, or train on a GPU"
        )
    return accelerator


def evaluate(model, eval_dl, accelerator, teacher=None, captions: Captions | None = None) -> dict:
    """The model on the evaluation data, with `retrofit.evaluation`'s loop: accuracy on labels; without labels, top-1
    agreement with the teacher; a backbone or a dual encoder, the cosine similarity of its features to the teacher's;
    a dual encoder pretrained on `captions`, its zero-shot accuracy with their first template. {} where there is
    nothing to compare with (no labels and no teacher)."""
    from .evaluation import ZeroShotClassifier, feature_similarity, score_models
    from .loading import family_and_head
    from .zero_shot import prompts, text_embeddings

    model = accelerator.unwrap_model(model)
    if captions is not None and eval_dl.dataset.has_labels:
        texts = prompts(captions.names, captions.templates[0])
        classifier = ZeroShotClassifier(model, text_embeddings(model, captions.tokenizer, texts))
        score = score_models([classifier], eval_dl, k=1, accelerator=accelerator)[0]
        result = {"accuracy": score["top1"], "examples": score["num_examples"], "reference": "labels"}
    elif not family_and_head(model.config)[1].is_classifier:
        score = feature_similarity([teacher, model], eval_dl, accelerator=accelerator)[1]
        result = {"similarity": score["similarity"], "examples": score["num_examples"], "reference": "teacher features"}
    elif eval_dl.dataset.has_labels or teacher is not None:
        reference = "labels" if eval_dl.dataset.has_labels else "teacher"
        labels_from = None if reference == "labels" else teacher
        score = score_models([model], eval_dl, k=1, accelerator=accelerator, labels_from=labels_from)[0]
        key = "accuracy" if reference == "labels" else "agreement"  # never published as accuracy
        result = {key: score["top1"], "examples": score["num_examples"], "reference": reference}
    else:
        result = {}
    model.train()
    return result


# ----------------------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------------------


def batch_loss(
    batch: dict,
    model,
    read: HeadReader,
    run: TrainingRun,
    accelerator,
    *,
    seed: int,
    dual: bool,
    teacher=None,
    read_teacher: HeadReader | None = None,
    captions: Captions | None = None,
) -> torch.Tensor:
    """The loss of one batch: the student's forward pass (and the teacher's, without gradients, for kd/mix) under
    the run's mixed precision, then `losses.compute_loss`. `seed` draws this batch's mixup (function matching) and,
    for a contrastive run, its captions."""
    pixels = batch["pixel_values"]
    if run.function_matching:  # the same mixed view for teacher and student
        pixels = mixup_batch(pixels, seed=seed)
    with accelerator.autocast():
        if captions is not None:  # contrastive: each image against one caption of each image
            texts = captions.sample(batch["labels"], seed=seed)
            student = Outputs(caption_logits(model, pixels, texts), None)
        else:
            student = read(model, pixels)
        expected = None
        if run.loss in ("kd", "mix"):
            with torch.no_grad():
                expected = read_teacher(teacher, pixels)
    return compute_loss(student, expected, batch.get("labels"), run, embeddings=dual)


def refuse_non_finite(loss: torch.Tensor, accelerator, step: int, checkpoint_dir: Path | None) -> None:
    """Stop every process, in one line naming what to change, if any process's loss at `step` is NaN or infinite."""
    bad = accelerator.reduce(torch.tensor(float(not torch.isfinite(loss)), device=loss.device), "sum")
    if bad.item() > 0:
        good = list_checkpoints(checkpoint_dir) if checkpoint_dir else []
        again = f"--resume from the last good checkpoint, {good[-1]}" if good else "start again"
        # a finite loss here: another process's became non-finite (this one's was quoted as what went wrong)
        became = loss.item() if not torch.isfinite(loss) else "non-finite on another process"
        raise RetrofitError(
            f"the loss became {became} at step {step}; stopped. Lower --lr or use --mixed-precision no or bf16, "
            f"then {again}"
        )


@releases_write_locks  # called from Python, the checkpoint folder's lock is released when it returns
def train(
    model,
    image_processor,
    run: TrainingRun,
    *,
    teacher=None,
    text_embeds: torch.Tensor | None = None,
    captions: Captions | None = None,
    checkpoint_dir: Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    eval_at_start: bool = False,
    stop_after: int | None = None,
    progress_bar: bool = True,
    same_run: dict | None = None,
    data: tuple | None = None,
    stored_dtype: torch.dtype | None = None,
    log: Callable[[str], None] = print,
) -> TrainResult:
    """Train `model` on `run`'s data with `run`'s settings, distilling from `teacher` for kd/mix; return the trained
    model (unwrapped, in the dtype it came in: finetune and run pass it in float32) and what happened. `text_embeds`: a
    dual encoder's normalised prompt embeddings (classes × D), for the prompt term of its kd
    (`TrainSettings.prompt_weight`). `captions`: the captions of a contrastive pretraining (``loss="contrastive"``),
    which also score its evaluations by zero-shot accuracy on their class names with the first template. Checkpoints go
    to `checkpoint_dir` (`resume`: continue from the newest; `overwrite`: start over); `same_run`: more settings (JSON)
    that ``run.json`` records and a resumed run must share (pretraining's model and image processor); `data`: the
    (training, evaluation) dataloaders `training_data` already made for `model` (finetune makes them before calibrating,
    so that a data error comes before that work). `eval_at_start` also evaluates before the first step; `stop_after` N
    stops after N steps of the full schedule (with a checkpoint), as if killed. `stored_dtype`: the dtype the export
    stores the weights in (a bf16 source's); a finished run ends with the model in it, and its last evaluation is of
    those weights, the ones published."""
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm
    from transformers import get_cosine_schedule_with_warmup

    from .loading import DTYPES, family_and_head

    started = time.perf_counter()
    settle_losses(model, run, captions=captions)
    dual = family_and_head(model.config)[1].is_dual_encoder
    if run.prompt_weight and (not dual or text_embeds is None):
        raise RetrofitError(
            "--prompt-weight distils the image-text similarities of a dual encoder (CLIP, SigLIP) over the data's "
            f"class-name prompts; {type(model).__name__} is not one"
            if not dual
            else "--prompt-weight needs the prompts' text embeddings (finetune makes them from the data's class names)"
        )
    set_seed(run.seed)
    train_dl, eval_dl = data or training_data(model, image_processor, run, log)
    images = len(train_dl.dataset)

    # Checkpoints: refuse to mix runs
    existing = check_checkpoints(checkpoint_dir, resume=resume, overwrite=overwrite)
    resuming = resume and bool(existing)
    if resume and not existing:
        log(f"--resume: no checkpoint in '{checkpoint_dir}'; starting from the beginning")
    settings = run_settings(model, run.train, run.ema_decay) | (same_run or {})

    # Accelerator, model, optimizer, schedule
    accelerator = make_accelerator(run, checkpoint_dir)
    settings[OPTIONS] = training_options(model, run, accelerator.num_processes, train_dl.dataset, image_processor)
    if resuming:
        check_same_run(checkpoint_dir, settings)
    if checkpoint_dir and accelerator.is_main_process and existing and not resume:  # --overwrite: start over
        remove_checkpoints(checkpoint_dir)
    trainable, total = set_trainable(model, run.train, text=run.loss == "contrastive")
    features = run.loss != "ce" and run.feature_weight > 0
    prompts = text_embeds.to(accelerator.device) if run.prompt_weight else None
    read = HeadReader(model, features=features, prompts=prompts)  # before `prepare`: hooks go on the model itself
    read_teacher = HeadReader(teacher, features=features, prompts=prompts) if teacher is not None else None
    optimizer = torch.optim.AdamW(param_groups(model, run), lr=run.lr)
    if run.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    model, optimizer, train_dl = accelerator.prepare(model, optimizer, train_dl)
    eval_dl = accelerator.prepare(eval_dl) if eval_dl is not None else None
    if teacher is not None:
        teacher = teacher.to(accelerator.device).eval().requires_grad_(False)
        autocast_dtype = DTYPES.get(run.mixed_precision)  # "no": None
        if autocast_dtype is not None and teacher.dtype not in (torch.float32, autocast_dtype):
            # an fp16 teacher (the source as stored) under bf16 autocast, or bf16 under fp16: autocast takes float32
            # and its own dtype only, and failed inside torch.cat ("Unexpected floating ScalarType")
            teacher = teacher.float()
    steps_per_epoch = max(1, math.ceil(len(train_dl) / run.grad_accum))
    budget = training_budget(run, images, steps_per_epoch, accelerator.num_processes)
    if resuming:
        budget = resumed_budget(budget, recorded_budget(checkpoint_dir))
    settings["budget"] = {"steps": budget.steps, "warmup": budget.warmup, "why": budget.why,
                          "options": budget.options}  # for run.json  # fmt: skip
    total_steps = budget.steps
    planned_epochs = math.ceil(total_steps / steps_per_epoch)
    eval_epochs = max(1, math.ceil(planned_epochs / MAX_EPOCH_EVALUATIONS))  # between --eval-every 0 evaluations
    # The prepared scheduler steps once per process for each optimizer step, hence the factor.
    scheduler = get_cosine_schedule_with_warmup(
        optimizer, budget.warmup * accelerator.num_processes, total_steps * accelerator.num_processes
    )
    scheduler = accelerator.prepare(scheduler)
    average = WeightAverage(accelerator.unwrap_model(model), run.ema_decay) if run.ema_decay else None
    progress = Progress()
    if resuming:
        *older, latest = list_checkpoints(checkpoint_dir)
        if int(latest.name.removeprefix("step-")) > total_steps and recorded_budget(checkpoint_dir) is not None:
            raise RetrofitError(  # run.json edited since: --max-steps would not change the budget it records
                f"'{checkpoint_dir / 'run.json'}' records a budget of {counted(total_steps, 'step')}, below its "
                f"checkpoint '{latest}': it was changed since retrofit wrote it; pass --overwrite to start over"
            )
        load_checkpoint(accelerator, latest, progress, older, average, batches=len(train_dl))
        if progress.step > total_steps:  # checkpoints of an older retrofit, which kept no budget
            raise RetrofitError(
                f"checkpoint '{latest}' is past this run's budget of {counted(total_steps, 'step')}; resume with "
                f"--max-steps {progress.step} or more, or pass --overwrite to start over"
            )
        log(f"resumed from {latest} (step {progress.step}, epoch {progress.epoch}, batch {progress.batch})")
        if progress.evaluations and EVALUATED in settings and scores_other_images(checkpoint_dir, settings[EVALUATED]):
            log("note: the checkpoints' evaluations scored other images than this run does (data, --eval-split or "
                "--eval-limit changed), so they are dropped; the trained model is scored again at the end")  # fmt: skip
            progress.evaluations.clear()
    if accelerator.trackers == [] and run.report_to not in (None, "none"):
        # trackers take scalars: a list setting (the prompt templates) goes in as its text
        hparams = {
            k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in asdict(run).items() if v is not None
        }
        accelerator.init_trackers("retrofit", config=hparams)
    try:  # the trackers are finished however the run ends (a Ctrl-C left a tensorboard writer's thread)
        loss_text = describe_loss(run, dual_encoder=dual)
        log(budget.why)
        if eval_dl is not None and not run.eval_every and eval_epochs > 1:
            log(
                f"evaluating every {eval_epochs} epochs and at the end, not after each of the "
                f"{planned_epochs:,} (at most {MAX_EPOCH_EVALUATIONS} evaluations a run; "
                "--eval-every N for every N steps)"
            )
        log(
            f"{trainable / 1e6:.3g}M of {total / 1e6:.3g}M parameters train ({run.train}) with loss {loss_text}, "
            f"lr {run.lr:g} after {budget.warmup:,} warm-up steps, cosine decay to 0; on "
            f"{counted(accelerator.num_processes, 'process', 'processes')}, {accelerator.device}, "
            f"precision {run.mixed_precision}"
            + (f"; exports the moving average of the weights (--ema-decay {run.ema_decay:g})" if average else "")
        )
        result = TrainResult(
            steps=progress.step,
            epochs=0.0,
            last_loss=None,
            checkpoint_dir=checkpoint_dir,
            eval_history=progress.evaluations,
            budget=budget,
            images=images,
        )  # saved with each checkpoint: a resumed run keeps it

        def run_eval(averaged: bool = False, stored: str | None = None) -> None:
            if eval_dl is None:
                return
            # scoring draws from torch's generator (each pass over a loader draws its base seed): with dropout or
            # drop path, whether and how often the run evaluated (--eval-every, --eval-split) changed its weights
            with callers_random_state():
                metrics = {**evaluate(model, eval_dl, accelerator, teacher, captions), "step": progress.step}
            if averaged:
                metrics["weights"] = "moving average"
            if stored:
                metrics["dtype"] = stored
            result.eval_history.append(metrics)
            if "reference" in metrics:
                what = {
                    "labels": "zero-shot accuracy (first template)" if captions is not None else "accuracy",
                    "teacher": "agreement with the teacher",
                }.get(metrics["reference"], "cosine similarity to the teacher")
                key = next(key for key in ("accuracy", "agreement", "similarity") if key in metrics)
                with tqdm.external_write_mode():  # print above the progress bar, not into it
                    of = " (the moving average of the weights)" if averaged else ""
                    of += f" (the weights as stored, in {stored})" if stored else ""
                    log(f"step {progress.step}: eval {what}{of} {metrics[key]:.4f} on {metrics['examples']} images")
                accelerator.log({f"eval/{key}": metrics[key]}, step=progress.step)

        if eval_at_start and progress.step == 0:
            run_eval()  # before the bar starts, so that its time estimate is the training's alone
        # stderr a log file or CI log, not a terminal (nor a notebook's widget): an update a minute, not ten a second
        logged = tqdm.__module__ != "tqdm.notebook" and not (hasattr(sys.stderr, "isatty") and sys.stderr.isatty())
        bar = tqdm(total=total_steps, initial=progress.step, desc="train", dynamic_ncols=True,
                   mininterval=60 if logged else 0.1,
                   disable=not (progress_bar and accelerator.is_main_process))  # fmt: skip
        model.train()
        stop_at = min(total_steps, stop_after or total_steps)
        last_saved = progress.step if resuming else -1
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
                        seed = hash((run.seed, epoch, progress.batch))
                        loss = batch_loss(batch, model, read, run, accelerator, seed=seed, dual=dual,
                                          teacher=teacher, read_teacher=read_teacher, captions=captions)  # fmt: skip
                        refuse_non_finite(loss, accelerator, progress.step + 1, checkpoint_dir)
                        accelerator.backward(loss)
                        if accelerator.sync_gradients and run.max_grad_norm:
                            accelerator.clip_grad_norm_(model.parameters(), run.max_grad_norm)
                        optimizer.step()
                        scheduler.step()
                        optimizer.zero_grad()
                    progress.batch += 1
                    if not accelerator.sync_gradients:
                        continue
                    progress.step += 1
                    check_interrupted()  # a Ctrl-C a library swallowed mid-step stops the run here
                    result.last_loss = loss.item()
                    if average is not None:
                        average.update(progress.step)
                    lr = scheduler.get_last_lr()[0]
                    bar.set_postfix(loss=f"{result.last_loss:.4f}", lr=f"{lr:.2e}", refresh=False)
                    bar.update(1)  # one refresh per step, with the new loss
                    accelerator.log({"train/loss": result.last_loss, "train/lr": lr}, progress.step)
                    if run.eval_every and progress.step % run.eval_every == 0:
                        run_eval()  # before the checkpoint, which keeps the evaluations so far for a resumed run
                    if checkpoint_dir and progress.step % run.save_every == 0:
                        save_checkpoint(
                            accelerator, checkpoint_dir, progress, run.keep_checkpoints, settings, average, log
                        )
                        last_saved = progress.step
                    if progress.step >= stop_at:
                        break
                else:  # the epoch ran to its end
                    epoch += 1
                    progress.epoch, progress.batch = epoch, 0
                    if not run.eval_every and progress.step < stop_at and epoch % eval_epochs == 0:
                        run_eval()
        finally:
            bar.close()
        for reader in (read, read_teacher):
            if reader is not None:
                reader.close()
        if checkpoint_dir and last_saved != progress.step:
            save_checkpoint(accelerator, checkpoint_dir, progress, run.keep_checkpoints, settings, average, log)
        result.finished = progress.step >= total_steps
        if result.finished and average is not None:  # the live weights are done training: the average is the result
            average.copy_to_model()
        stored = None  # a bf16 source's export is stored in bf16: the card's accuracy is of those weights, not these
        if result.finished and stored_dtype not in (None, next(model.parameters()).dtype):
            # without the autocast Accelerate wrapped its forward in for --mixed-precision: as the export runs
            accelerator.unwrap_model(model, keep_fp32_wrapper=False).to(stored_dtype)
            stored = str(stored_dtype).removeprefix("torch.")
        if result.finished and (average is not None or stored):
            with without_autocast(accelerator) if stored else contextlib.nullcontext():  # as evaluate runs the export
                run_eval(averaged=average is not None, stored=stored)
        elif result.finished and (not result.eval_history or result.eval_history[-1]["step"] != progress.step):
            run_eval()
        result.steps, result.epochs = progress.step, progress.step / steps_per_epoch
        result.seconds = time.perf_counter() - started
        result.model = accelerator.unwrap_model(model)
        result.is_main_process = accelerator.is_main_process
        accelerator.wait_for_everyone()
        # Release the distributed (DDP) wrapper while the process group still exists: if DDP's reducer held the
        # last reference to a gloo group, destroying the group would wait on gloo's threads with the GIL held, a
        # deadlock seen under `accelerate launch` on CPU. The caller gets the unwrapped model (`result.model`).
        model, optimizer, scheduler = accelerator.free_memory(model, optimizer, scheduler)
    except BaseException as exc:
        # An error a DataLoader worker raised (an unreadable image) comes back through torch's `reraise`, whose frame
        # and the exception's traceback hold each other, and the loader's iterator with them: only the garbage
        # collector frees it, and then its workers' shutdown waits 5 s each (a caller's later `gc.collect()` stalled
        # 10 s). The finished frames' locals are not needed to report it.
        traceback.clear_frames(exc.__traceback__)
        raise
    finally:
        for tracker in accelerator.trackers:  # `end_training` without destroying the process group
            tracker.finish()
    keep_process_group()
    return result


@contextlib.contextmanager
def without_autocast(accelerator) -> Iterator[None]:
    """The accelerator's `autocast()` does nothing inside the block (its --mixed-precision off): the weights run in
    their own dtype, as `retrofit evaluate` runs them."""
    from accelerate.utils import AutocastKwargs

    handler = accelerator.autocast_handler
    accelerator.autocast_handler = AutocastKwargs(enabled=False)
    try:
        yield
    finally:
        accelerator.autocast_handler = handler


@functools.cache
def keep_process_group() -> None:
    """Leave the process group of `accelerate launch` to later runs in this process (a sweep's fine-tunes, a script's
    second call) and destroy it when the process exits: `Accelerator.end_training` destroyed it after the first run,
    and the next one failed in DDP (a group made again hung in its rendezvous). Every command of a launch registers
    it (`cli`): a process that exits with the group alive may abort in the interpreter's teardown (gloo's threads
    still hold tensors: "terminate called without an active exception", SIGABRT), failing the launch after its work
    (`evaluate` did, once in CI)."""
    import atexit

    def destroy() -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    atexit.register(destroy)
