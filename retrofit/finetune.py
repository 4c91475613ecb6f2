"""`finetune` and `pretrain`: the steps around the training loop, in the order they run.

`finetune`: check where it writes → load the source (or a retrofit export to continue) → insert the PatchMerger →
load the teacher → calibrate the merger → `retrofit.train.train` → export with its model card → push. `pretrain`
builds a ViT from a config and trains it from scratch with the same loop (the Fashion-MNIST baselines).

Checkpoints go to ``--checkpoint-dir`` (default: ``<output>-checkpoints`` next to ``--output``), never into the
export, which stays a clean Hub repository; ``--resume`` continues from the newest and reaches the same weights as an
uninterrupted run with the same seed (`retrofit.checkpoints`).
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .atomic import releases_write_locks
from .errors import RetrofitError, brief, check_arguments, counted, did_you_mean, log_to_stderr, shown
from .reads import reads_each_folder_once
from .settings import FinetuneArgs, PretrainRun, TrainingRun, from_options, written_path
from .train import (
    TrainResult,
    hides_library_bars,
    keeps_callers_random_state,
    launched_processes,
    settle_losses,
    train,
    training_data,
)


def finetune(
    source: str | Path,
    *,
    output: str | Path,
    after_layer: int | None = None,
    num_tokens: int | None = None,
    eval_at_start: bool = False,
    stop_after: int | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    **settings,
) -> TrainResult:
    """Insert a PatchMerger into `source` after `after_layer` layers with `num_tokens` tokens (or continue training
    a retrofit export) and fine-tune it; export to `output`. `settings` are `retrofit.settings.FinetuneArgs` fields
    (data, loss, epochs, lr, task, teacher, calibrate, push_to_hub, ...: the options of ``retrofit finetune``).
    `eval_at_start` also scores the merged model before training; `stop_after` N stops after N steps (a checkpoint
    to resume from); `progress` shows progress bars (False: none, datasets' too)."""
    args = from_options(
        FinetuneArgs,
        {"source": source, "output": output, "after_layer": after_layer, "tokens": num_tokens, **settings},
        where="finetune()",
    )
    check_arguments("finetune", log=log, flags={"eval_at_start": eval_at_start, "progress": progress},
                    count={"stop_after": stop_after})  # fmt: skip
    return run_finetune(args, eval_at_start=eval_at_start, stop_after=stop_after, progress=progress, log=log)


@dataclass
class Prepared:
    """A fine-tune ready to train (`prepare`): the merged model, the teacher, how the images are prepared, and what
    the export and its card need afterwards (`finish`)."""

    model: torch.nn.Module
    teacher: torch.nn.Module | None
    processor: object
    config: object  # the source's config as the model is trained (after --task)
    source_config: object | None  # for the card's cost table
    init: str  # how the merger started, for the card
    checkpoint_dir: Path
    resuming: bool
    stored_dtype: torch.dtype  # the source's: the export is saved in it
    tokenizer: object | None = None  # a dual encoder's, saved into the export
    text_embeds: torch.Tensor | None = None  # a dual encoder's prompt embeddings, for --prompt-weight
    data: tuple | None = None  # the training and evaluation dataloaders (`train.training_data`)
    notes: list[str] = field(default_factory=list)  # what the card must say about the source (a class not converted)
    teacher_name: str | None = None  # the teacher's Hub id or folder (an export's: the source it was made from)


@reads_each_folder_once
@releases_write_locks
@keeps_callers_random_state
@hides_library_bars
def run_finetune(
    args: FinetuneArgs,
    *,
    eval_at_start: bool = False,
    stop_after: int | None = None,
    progress: bool = True,
    log: Callable[[str], None] = log_to_stderr,
) -> TrainResult:
    """`finetune` for settings already checked (the CLI builds `FinetuneArgs` itself): `prepare`, train, `finish`."""
    from .data import read_splits

    args = read_splits(args)  # the splits as read: --eval-split test of data with validation/ instead names it
    ready = prepare(args, log=log)
    result = train_prepared(args, ready, eval_at_start=eval_at_start, stop_after=stop_after, progress=progress, log=log)
    finish(args, ready, result, log=log)
    publish(args, result, log=log)
    return result


def train_prepared(
    args: FinetuneArgs,
    ready: Prepared,
    *,
    eval_at_start: bool = False,
    stop_after: int | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> TrainResult:
    """`retrofit.train.train` on what `prepare` made ready (``finetune`` and a recipe's fine-tune both run it)."""
    from .checkpoints import EVALUATED, INIT, output_record

    same_run = output_record(args.output) | {INIT: ready.init}  # a resumed run's card repeats how the merger started
    same_run[EVALUATED] = evaluated_images(args, ready)
    return train(ready.model.float(), ready.processor, args, teacher=ready.teacher, text_embeds=ready.text_embeds,
                 checkpoint_dir=ready.checkpoint_dir, resume=args.resume, overwrite=args.overwrite, data=ready.data,
                 eval_at_start=eval_at_start, stop_after=stop_after, progress_bar=progress, same_run=same_run,
                 stored_dtype=ready.stored_dtype, log=log)  # fmt: skip


def prepare(
    args: FinetuneArgs,
    *,
    log: Callable[[str], None] = print,
    merge_names: tuple[str, str] = ("--after-layer", "--tokens"),
) -> Prepared:
    """Everything before the training loop, in order: check where the run writes (export, checkpoints, Hub login)
    before any work → load the source as the model it is trained as (or a retrofit export to continue) → insert the
    PatchMerger → load the teacher → the dataloaders (every data error, before calibrating) → calibrate the merger
    → embed the prompts of ``--prompt-weight``. `merge_names`: how a K or M out of the model's range is named (a
    recipe's keys for `run`)."""
    from accelerate.utils import set_seed

    from .atomic import check_checkpoint_dir, check_output, hold_write_lock
    from .checkpoints import (
        OPTIONS,
        PROCESSES,
        check_checkpoints,
        check_same_run,
        default_checkpoint_dir,
        resume_owns_output,
        resumes,
        run_settings,
        training_options,
    )
    from .export import check_tokenizer_files_kept
    from .loading import (
        NO_TOKENIZER_NOTE,
        check_runs_on_its_images,
        classifier_is_new,
        converted_as_other_class,
        family_and_head,
        for_task,
        is_merged,
        load_config,
        load_image_processor,
        load_tokenizer,
        resolve_source,
    )

    source, output = args.source, args.output
    resolve_source(source)  # a bad retrofit:NAME is refused first
    checkpoint_dir = Path(args.checkpoint_dir) if args.checkpoint_dir else default_checkpoint_dir(output)
    check_checkpoint_dir(checkpoint_dir, output, inputs=(source, args.teacher, args.data))
    resuming = resumes(checkpoint_dir, resume=args.resume, overwrite=args.overwrite)
    owned = resuming and resume_owns_output(checkpoint_dir, output)  # the output the resumed run was writing
    check_output(output, args.overwrite or owned, inputs=(source, args.teacher, args.data))
    hold_write_lock(output, "--output")
    if args.push_to_hub:
        from .push import check_push

        check_push(args.push_to_hub, private=args.private, create_pr=args.create_pr)
    check_checkpoints(checkpoint_dir, resume=args.resume, overwrite=args.overwrite)
    set_seed(args.seed)  # the merger's random initialisation must be the same in a resumed run

    saved = load_config(source, trust_remote_code=args.trust_remote_code, revision=args.revision)
    config = for_task(saved, task_for(args.task, args.num_labels))
    check_teacher_logits(source, saved, config, args.loss)
    other_class = converted_as_other_class(saved, config)  # a pretraining head or a projection left behind
    if other_class:
        log(f"note: {other_class}")
    had_none = classifier_is_new(saved, config)  # a backbone or a dual encoder trained as a classifier
    new_head = had_none or args.num_labels is not None  # the classifier's outputs start random
    task = family_and_head(config)[1].pipeline_tag  # the teacher is loaded as the same kind of model
    processor = load_image_processor(source, config, revision=args.revision, log=log)
    tokenizer = load_tokenizer(source, config, revision=args.revision, log=log)  # dual encoders only
    check_tokenizer_files_kept(args.output, args.overwrite or resuming, tokenizer)
    if args.prompt_weight:
        check_prompt_weight(args, config, tokenizer)
    if is_merged(config):
        model, teacher, teacher_name, source_config = _continue_export(args, config, task)
        init = "continued from a retrofit export"
    else:
        model, teacher, source_config = _merge_source(args, config, processor, task, merge_names)
        teacher_name, init = args.teacher or source, "random"
    check_runs_on_its_images(model, processor, source)
    if teacher is not None:
        check_teacher_fits(teacher, model, processor, teacher_name)
    settle_losses(model, args)
    data = training_data(model, processor, args, log)
    if resuming:  # checkpoints of other settings are refused now, not after calibrating (`train` checks them again)
        options = training_options(model, args, 1, data[0].dataset, processor)
        options.pop(PROCESSES)  # launched: `train` checks it
        check_same_run(checkpoint_dir, run_settings(model, args.train, args.ema_decay) | {OPTIONS: options})
    if args.calibrate and init == "random":
        resumed = checkpoint_dir if resuming else None
        init = _calibrate(model, args, resumed=resumed, trained=data[0].dataset.dataset, new_classifier=new_head,
                          log=log)  # fmt: skip
    notes = [other_class] if other_class else []
    if new_head:
        notes.append(new_classifier_note(had_none, model.config.num_labels, zeroed=args.num_labels is not None))
    if tokenizer is None and family_and_head(config)[1].is_dual_encoder:
        notes.append(NO_TOKENIZER_NOTE)
    ready = Prepared(model, teacher, processor, config, source_config, init, checkpoint_dir, resuming, model.dtype,
                     tokenizer, data=data, notes=notes, teacher_name=teacher_name)  # fmt: skip
    if args.prompt_weight:
        ready.text_embeds = prompt_embeddings(args, ready, log=log)
    return ready


def check_prompt_weight(args: FinetuneArgs, config, tokenizer) -> None:
    """What ``--prompt-weight`` cannot work with, in one line before the model is loaded: a model that is not a dual
    encoder, or one without a tokenizer."""
    from .evaluation import check_dual_encoders

    check_dual_encoders([args.source], [config], where="--prompt-weight")
    if tokenizer is None:
        raise RetrofitError(
            f"--prompt-weight embeds prompts with the model's tokenizer, and '{args.source}' has none; copy its "
            "source's tokenizer files into it, or leave out --prompt-weight"
        )


def prompt_embeddings(args: FinetuneArgs, ready: Prepared, *, log: Callable[[str], None] = print) -> torch.Tensor:
    """For ``--prompt-weight``: one text embedding per class of the training data, the mean of its prompts'
    (``--prompt-templates``, CLIP's prompt ensembling) by the unmerged model's frozen text tower, normalised. Data
    without class names is one line, before training (`check_prompt_weight` refused the rest earlier)."""
    from .data import load_split
    from .evaluation import zero_shot_classes
    from .zero_shot import prompts, text_embeddings

    data = load_split(args.data, **args.images(), split_classes=True)
    names = zero_shot_classes(data, args.data)[0]
    text_model = ready.teacher if ready.teacher is not None else ready.model
    per_template = [text_embeddings(text_model, ready.tokenizer, prompts(names, t)) for t in args.prompt_templates]
    mean = torch.stack(per_template).mean(dim=0)
    log(f"--prompt-weight: {len(names)} classes x {len(per_template)} prompt template(s), e.g. "
        f"{prompts(names[:1], args.prompt_templates[0])[0]!r}")  # fmt: skip
    return mean / mean.norm(dim=-1, keepdim=True)


def finish(
    args: FinetuneArgs,
    ready: Prepared,
    result: TrainResult,
    *,
    run: dict | None = None,
    log: Callable[[str], None] = print,
) -> None:
    """After the training loop, on the process that writes: export the trained model with its model card, in the
    source's dtype, and `run`, a recipe's before/after table, in its Results. A run stopped early (`stop_after`)
    writes nothing."""
    if not (result.finished and result.is_main_process):
        return
    from .card import build_card
    from .export import export
    from .loading import processor_image_size

    trained = result.model.to(ready.stored_dtype).eval()
    if ready.stored_dtype != torch.float32:
        log(f"saving in {str(ready.stored_dtype).removeprefix('torch.')}, as the source is stored (trained in float32)")
    training = _training_info(args, result, ready.init, args.teacher, images=len(ready.data[0].dataset))
    training.notes[:0] = ready.notes
    card = build_card(trained, source_config=ready.source_config, image_size=processor_image_size(ready.processor),
                      training=training, folder=args.output)  # fmt: skip
    # resumed after it finished (a job run again): the export there holds these weights, and the card the notes and
    # results written since; it stays
    export(trained, args.output, image_processor=ready.processor, tokenizer=ready.tokenizer, card=card,
           overwrite=args.overwrite or ready.resuming, source_config=ready.source_config,
           keep_same=ready.resuming, run=run, log=(kept := []).append)  # fmt: skip
    log(kept[0] if kept else f"wrote {args.output} (checkpoints in {ready.checkpoint_dir})")
    result.output = Path(args.output)


def publish(args: FinetuneArgs, result: TrainResult, *, log: Callable[[str], None] = print) -> None:
    """Upload the export `finish` wrote, if ``--push-to-hub`` asks for it (the login was checked before training)."""
    if args.push_to_hub and result.output is not None:
        from .push import push_written

        push_written(args.output, args.push_to_hub, private=args.private, create_pr=args.create_pr, log=log)


def _merge_source(args: FinetuneArgs, config, processor, task: str, merge_names: tuple[str, str]) -> tuple:
    """Load the source and insert the PatchMerger; the teacher for kd/mix is a frozen copy of the unmerged source
    (or the --teacher). Returns (merged model, teacher or None, the source's config for the card)."""
    from .loading import load_config, load_model, processor_image_size
    from .surgery import check_merge, insert_patch_merger

    if args.after_layer is None or args.tokens is None:
        raise RetrofitError("--after-layer and --tokens are required when SOURCE is not a retrofit export")
    image_size = processor_image_size(processor)
    check_merge(config, args.after_layer, args.tokens, image_size, rope_positions=args.rope_positions,
                names=merge_names)  # fmt: skip
    # a checkpoint saved as a classifier without one trains a new one from labels or another teacher (not from itself)
    trained_anew = args.num_labels is not None or args.loss == "ce" or args.teacher is not None
    base = load_model(args.source, config=config, trust_remote_code=args.trust_remote_code, revision=args.revision,
                      new_classifier_ok=trained_anew)  # fmt: skip
    teacher = None
    if args.loss != "ce":  # its own copy: the merged model shares the source's tensors
        if args.teacher is None:
            teacher = copy.deepcopy(base).eval()
        else:
            teacher_config = load_config(args.teacher, trust_remote_code=args.trust_remote_code, task=task)
            check_teacher_head(args.teacher, teacher_config, args)
            teacher = load_model(args.teacher, config=teacher_config, trust_remote_code=args.trust_remote_code).eval()
    model = insert_patch_merger(base.eval(), args.after_layer, args.tokens, source=str(args.source),
                                rope_positions=args.rope_positions, image_size=image_size)  # fmt: skip
    return model, teacher, config


def _continue_export(args: FinetuneArgs, config, task: str) -> tuple:
    """Load a retrofit export to train on, and the model to distil from: --teacher, or the model it was made from
    (found and checked, `retrofit.provenance.find_teacher`). Returns (model, teacher or None, teacher's name, the
    source's config for the card or None)."""
    from .loading import load_config, load_model
    from .provenance import find_teacher

    if args.after_layer not in (None, config.merge_after_layer) or args.tokens not in (None, config.merge_num_tokens):
        raise RetrofitError(
            f"'{args.source}' is already merged (after layer {config.merge_after_layer}, {config.merge_num_tokens} "
            "tokens); drop --after-layer/--tokens to continue training it, or fine-tune its source"
        )
    if args.rope_positions not in (None, getattr(config, "merge_rope_positions", None)):
        raise RetrofitError(
            f"'{args.source}' is already merged with --rope-positions "
            f"{getattr(config, 'merge_rope_positions', None) or '(none: not a RoPE model)'}; drop "
            "--rope-positions to continue training it, or fine-tune its source"
        )
    model = load_model(args.source, config=config, revision=args.revision)
    if args.loss == "ce":
        return model, None, None, None
    name, revision = (args.teacher, None) if args.teacher else find_teacher(str(args.source), config)
    try:
        teacher_config = load_config(name, trust_remote_code=args.trust_remote_code, revision=revision, task=task)
    except RetrofitError as exc:
        if args.teacher:
            raise
        raise RetrofitError(
            f"the teacher of --loss {args.loss} is '{args.source}''s source, '{config.merge_source}', which cannot "
            f"be loaded ({exc}); pass --teacher, or use --loss ce"
        ) from None
    if args.teacher:
        check_teacher_head(name, teacher_config, args)
    else:
        _check_same_encoder(config, teacher_config, args.source, name)
    teacher = load_model(name, config=teacher_config, trust_remote_code=args.trust_remote_code, revision=revision)
    return model, teacher.eval(), name, None if args.teacher else teacher_config


# Encoder settings an export and the model found as its source may differ in: names and bookkeeping, and the
# merge's own (its config is the source's plus `merge_*`).
_NOT_STRUCTURE = {"architectures", "auto_map", "model_type", "transformers_version", "_name_or_path", "torch_dtype",
                  "dtype", "id2label", "label2id", "num_labels", "problem_type", "custom_pipelines"}  # fmt: skip


def _check_same_encoder(config, teacher_config, export, found: str) -> None:
    """Refuse a teacher found by the hash of its weights (a folder on this machine holding the weights the export was
    made from) whose encoder is configured otherwise (another activation, norm epsilon, ...: a copy with another
    config.json), before training distils from a model the export was never made from."""
    from .loading import family_and_head, layer_config

    ours = layer_config(config, family_and_head(config)[1]).to_dict()
    theirs = layer_config(teacher_config, family_and_head(teacher_config)[1]).to_dict()
    differ = sorted(key for key in ours.keys() & theirs.keys() - _NOT_STRUCTURE
                    if not key.startswith("merge_") and ours[key] != theirs[key])  # fmt: skip
    if differ:
        key = differ[0]
        raise RetrofitError(
            f"'{found}' holds the weights '{export}' was made from, but its {key} is {theirs[key]!r}, the export's "
            f"{ours[key]!r}: not the model it was made from; pass --teacher with the unmerged model"
        )


def evaluated_images(args: FinetuneArgs, ready: Prepared) -> str | None:
    """The images the run's evaluations score, as run.json records them (`checkpoints.EVALUATED`): the data (links
    resolved), the split, how many of its images and, where they are files, their paths, sizes and labels
    (`data.image_files_digest`: a test folder relabelled since); None where it scores none."""
    from .checkpoints import local_or_named
    from .data import image_files_digest
    from .evaluation import first_images_text

    if ready.data is None or ready.data[1] is None:
        return None
    images = ready.data[1].dataset
    files = image_files_digest(images.dataset)
    scored = (
        f"{local_or_named(str(args.data))} {args.evaluated_on()}: {first_images_text(args.eval_limit, len(images))}"
    )
    return scored + (f" (files {files})" if files else "")


def _calibrate(model, args: FinetuneArgs, *, resumed: Path | None, trained, new_classifier: bool, log) -> str:
    """Start the merger from k-means of the layer-K tokens of a shuffled sample of `trained`, the images the run
    trains on (those ``--limit`` or ``--sample`` keep, not the whole split), closest to the source by its logits, or
    (`new_classifier`) by the features its new classifier reads; returns the card's line for it. A resumed
    run's checkpoints (in the folder `resumed`) already hold the calibrated merger: the line is the one their run.json
    recorded."""
    from .checkpoints import INIT, read_run_record
    from .data import sample_of
    from .provenance import public_name

    if resumed is not None:
        recorded = (read_run_record(resumed) or {}).get(INIT)
        if isinstance(recorded, str) and recorded.startswith("calibrated"):
            return f"{recorded} (the run was resumed)"
        data = public_name(args.data)  # checkpoints of a retrofit that did not record it
        return f"calibrated (k-means of the layer-{args.after_layer} tokens of `{data}`; the run was resumed)"
    from .calibrate import calibrate_from_data

    # --sample's images are shuffled already: their first ones (for local data, those a sample of the split with
    # this seed takes); the whole split's and --limit's are shuffled here
    images = sample_of(trained, args.calibrate_images, None if args.sample else args.seed).select_columns("image")
    calibration = calibrate_from_data(model, args.data, source=str(args.source), log=log, seed=args.seed,
                                      num_images=args.calibrate_images, split=args.split, images=images,
                                      new_classifier=new_classifier)  # fmt: skip
    whole = args.limit is None and args.sample is None and args.holdout is None
    of = None if whole else f"the {len(trained):,} images trained on"
    return calibration.describe(args.data, args.split, args.after_layer, args.seed, of=of)


# ----------------------------------------------------------------------------------------------------------------
# Checks before training
# ----------------------------------------------------------------------------------------------------------------


def task_for(task: str | None, num_labels: int | None) -> str | None:
    """The `--task` a fine-tune loads its source for: `--num-labels` asks for a new classifier, so it implies
    ``image-classification`` (a DINOv2 backbone checkpoint then gets one)."""
    if num_labels is None or task == "image-classification":
        return task
    if task is not None:
        raise RetrofitError(
            f"--num-labels gives the model a new classifier, which --task {task} leaves out; drop one of them"
        )
    return "image-classification"


def new_classifier_note(had_none: bool, num_labels: int, zeroed: bool) -> str:
    """The card's line where the classifier trained (of `num_labels` outputs) is not the source's: the checkpoint
    `had_none` (a backbone, a dual encoder), or ``--num-labels`` replaced its own; `zeroed`: ``--num-labels`` gave it
    zero weights (`train.reinit_head`), else transformers' random ones."""
    start = "at zero" if zeroed else "random"
    if had_none:
        return f"the classifier is new (the checkpoint has none): its {num_labels} outputs started {start}"
    return (f"the classifier is new (--num-labels {num_labels}): the source's own was replaced by one of {num_labels} "
            f"outputs that started {start}")  # fmt: skip


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


def check_teacher_head(teacher: str, loaded, args: FinetuneArgs) -> None:
    """Refuse a --teacher whose checkpoint holds no classifier of the kind the model is trained as (a CLIP/SigLIP dual
    encoder or a backbone as the teacher of a classifier): loaded as one, its head would be new and random, and kd
    would distil random logits (its refusal named only their shape, as if the labels differed)."""
    from .loading import classifier_is_new, family_and_head, load_config

    saved = load_config(teacher, trust_remote_code=args.trust_remote_code)
    if classifier_is_new(saved, loaded):
        saved_as = (saved.architectures or ["?"])[0]
        raise RetrofitError(
            f"the teacher '{teacher}' is a {saved_as} checkpoint, with no classifier: loaded as a "
            f"{family_and_head(loaded)[1].class_name}, its logits would come from a new, random one; pass a "
            "--teacher that classifies the model's labels, or use --loss ce"
        )


def blank_outputs(model, image_size: tuple[int, int]) -> torch.Tensor:
    """What `model`'s head gives for one blank image of `image_size` (logits, or a backbone's features): a cheap
    check that the model runs on the images it will be given."""
    from .loading import blank_images
    from .losses import HeadReader

    with torch.no_grad():
        read = HeadReader(model, features=False)(model, blank_images(model, image_size))
    return read.logits if read.logits is not None else read.features


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
    ours, theirs = _class_names(student), _class_names(teacher)
    if ours and theirs and ours != theirs:  # as many classes, other names: kd would teach class i the teacher's i
        index = next(i for i, (mine, its) in enumerate(zip(ours, theirs, strict=True)) if mine != its)
        order = " in another order" if sorted(ours) == sorted(theirs) else ""
        raise RetrofitError(
            f"the teacher '{teacher_source}' has other classes{order}: class {index} is {shown(theirs[index])} to it, "
            f"{shown(ours[index])} to the model; pass a --teacher with the model's labels, or use --loss ce"
        )


def _class_names(model) -> list[str] | None:
    """The names of a classifier's classes in order, or None where it has none of its own (transformers' default
    LABEL_0, LABEL_1, ..., as backbones and dual encoders have)."""
    from .data import generic_labels, model_labels

    labels = model_labels(model.config)
    return None if generic_labels(labels) else [labels[index] for index in sorted(labels)]


def _training_info(
    run: TrainingRun, result: TrainResult, init: str, teacher: str | None = None, *, images: int | None = None
):
    """How the model was trained, for its card: which `images` of the split (their number), the settings that shape
    the weights (`checkpoints.TRAINING_SETTINGS`; the card named neither the split, a --limit or --sample, nor
    --augment, --weight-decay, --warmup-ratio, --max-grad-norm, --merger-lr-scale, --mixed-precision), the accuracy."""
    from .card import TrainingInfo
    from .evaluation import first_images_text, images_chosen, images_text
    from .loading import is_dual_encoder
    from .losses import describe_loss
    from .provenance import dataset_commit, public_name
    from .settings import chosen_images

    lr = f"lr {run.lr:g}" + (f" (the merger's ×{run.merger_lr_scale:g})" if run.merger_lr_scale != 1 else "")
    processes = launched_processes()
    batch = f"batch {run.batch_size}x{run.grad_accum}" + (f" on each of {processes} processes" if processes > 1 else "")
    clip = f"gradient norm clipped at {run.max_grad_norm:g}" if run.max_grad_norm else "no gradient clipping"
    warmup = counted(result.budget.warmup if result.budget else 0, "warm-up step")  # of the budget trained
    how = [lr, f"weight decay {run.weight_decay:g}", warmup, clip, batch]
    if run.mixed_precision != "no":
        how.append(f"mixed precision {run.mixed_precision}")
    if run.augment:
        how.append("augmented (random resized crops and horizontal flips)")
    notes = [f"trained: {run.train}; {', '.join(how)}, seed {run.seed}"]
    if run.ema_decay:
        notes.append(f"weights: the moving average over training (--ema-decay {run.ema_decay:g}), not the last step's")
    last = result.final_evaluation
    on = f"`{public_name(run.data)}` {run.evaluated_on()}"
    if "examples" in last:  # which of the split's images: the first --eval-limit, or all
        on += f" ({first_images_text(run.eval_limit, last['examples'])})"
    if result.final_accuracy is not None:
        notes.append(f"accuracy on {on}: {100 * result.final_accuracy:.2f} %")  # in % as every table shows it
    elif "agreement" in last:  # no labels this model knows
        notes.append(f"top-1 agreement with the teacher on {on}: {100 * last['agreement']:.2f} %")
    loss = describe_loss(run, teacher, dual_encoder=result.model is not None and is_dual_encoder(result.model.config))
    epochs = round(result.epochs, 3) or float(f"{result.epochs:.3g}")  # a few steps of large data: not 0.0
    read = None
    if images is not None:  # the split, and the first --limit, a --sample or all of it
        chosen = images_chosen(chosen_images(run.limit, run.sample, run.seed), images)
        read = f"{run.split} ({images_text({'num_examples': images, **chosen})})"
        if run.holdout is not None:  # the images counted are of the rest ("all 18 images, less the 25 %" read as 13)
            purpose = " to evaluate on" if run.eval_split else ""
            read = (f"{run.split} less the {100 * run.holdout:g} % held out{purpose} (--holdout {run.holdout:g}); of "
                    f"the rest, {images_text({'num_examples': images, **chosen})}")  # fmt: skip
    return TrainingInfo(data=run.data, data_revision=dataset_commit(run.data, run.data_revision), images=read,
                        steps=result.steps, epochs=epochs, loss=loss, init=init, notes=notes)  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# Pretraining a baseline
# ----------------------------------------------------------------------------------------------------------------


@reads_each_folder_once
@releases_write_locks
@keeps_callers_random_state
@hides_library_bars
def pretrain(
    model_config: dict,
    *,
    output: str | Path,
    image_processor: dict | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
    **settings,
) -> TrainResult:
    """Train a ViT (built from `model_config`, a `ViTConfig` dict) from scratch with cross-entropy, or a CLIP (a
    `CLIPConfig` dict: ``vision_config``, ``text_config``, ``projection_dim``) with the contrastive loss on captions
    written from the class names, and save a plain transformers checkpoint (config, weights, image processor, a CLIP's
    tokenizer, ``training.json``) to `output`. `settings` are `PretrainRun` fields (data, epochs, lr, ...; loss ce
    and lr 1e-3 unless given). Labels come from the data."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    from .atomic import BASELINE, atomic_dir, check_checkpoint_dir, check_output, hold_write_lock
    from .checkpoints import (
        check_checkpoints,
        default_checkpoint_dir,
        output_record,
        resume_owns_output,
        resumes,
    )
    from .data import class_names, load_split, named_classes, read_splits
    from .loading import check_config, processor_image_size

    run = read_splits(from_options(PretrainRun, settings, where="pretrain()"))
    check_arguments("pretrain", log=log, flags={"resume": resume, "overwrite": overwrite, "progress": progress})
    for name, value in (("pretrain.model", model_config), ("pretrain.image_processor", image_processor or {})):
        if not isinstance(value, dict):
            raise RetrofitError(f"{name} must be a mapping of config fields, not {shown(value)}")
    for name, value in (("output", output), ("checkpoint_dir", checkpoint_dir)):
        if not isinstance(value, str | os.PathLike) and (name == "output" or value is not None):
            raise RetrofitError(f"pretrain's {name} must be a folder's path, not {shown(value)}")
    output = written_path(os.fspath(output))  # "~/baseline" is in the home folder, as `written` settings are
    if checkpoint_dir is not None:
        checkpoint_dir = written_path(os.fspath(checkpoint_dir))
    clip = "vision_config" in model_config  # a CLIP dual encoder, pretrained on captions
    if clip != (run.loss == "contrastive"):
        raise RetrofitError(
            "pretraining a CLIP (pretrain.model with vision_config) needs loss contrastive, a ViT loss ce"
        )
    reserved = sorted({"num_labels", "id2label", "label2id"} & set(model_config))
    if reserved:
        raise RetrofitError(
            f"pretrain.model.{reserved[0]} is taken from the data's class names; remove it from the recipe"
        )
    if clip:
        _check_clip_keys(model_config)
    else:
        _check_keys(model_config, ViTConfig().to_dict(), "pretrain.model", "ViTConfig field")
    _check_keys(
        image_processor or {}, ViTImageProcessor().to_dict(), "pretrain.image_processor", "ViTImageProcessor field"
    )
    checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else default_checkpoint_dir(output)
    check_checkpoint_dir(checkpoint_dir, output, inputs=(run.data,))
    resuming = resumes(checkpoint_dir, resume=resume, overwrite=overwrite)
    owned = resuming and resume_owns_output(checkpoint_dir, output)  # the output the resumed run was writing
    check_output(output, overwrite or owned, kind=BASELINE, inputs=(run.data,))
    hold_write_lock(output, "--output")
    check_checkpoints(checkpoint_dir, resume=resume, overwrite=overwrite)
    columns = {"image_column": run.image_column, "label_column": run.label_column}
    first = load_split(run.data, run.split, **columns, limit=1, revision=run.data_revision)
    names = class_names(first)
    if names is None and not clip and named_classes(first) is not None:  # text labels: the sorted names training reads
        names = named_classes(load_split(run.data, **run.images(), split_classes=True))
    if not names:
        what = "a ClassLabel" if clip else "a ClassLabel or text labels"
        raise RetrofitError(f"'{run.data}' has no class names ({what}); pretraining needs them")
    tokenizer = None
    try:
        if clip:
            tokenizer = character_tokenizer()
            config = clip_config(model_config, tokenizer)
            vision = config.vision_config
        else:
            labels = {"num_labels": len(names), "id2label": dict(enumerate(names))}
            config = vision = ViTConfig(**model_config, **labels, label2id={n: i for i, n in enumerate(names)})
        check_config(vision, "pretrain.model")
        if vision.num_channels not in (1, 3):  # `retrofit.data` reads images as L or RGB
            raise RetrofitError(
                f"pretrain.model: num_channels must be 1 (grey images) or 3 (RGB), not {vision.num_channels!r}"
            )
        size = vision.image_size  # one side, or (height, width) as transformers' configs take it
        height, width = size if isinstance(size, list | tuple) else (size, size)
        processor = ViTImageProcessor(**{
            "size": {"height": height, "width": width},
            "image_mean": [0.5] * vision.num_channels,
            "image_std": [0.5] * vision.num_channels,
            **(image_processor or {}),
        })  # fmt: skip
    except RetrofitError:
        raise
    except Exception as exc:  # noqa: BLE001 - TypeError, ValueError, huggingface_hub's StrictDataclassError
        raise RetrofitError(f"bad pretrain.model or pretrain.image_processor: {brief(exc)}") from None
    for key in ("image_mean", "image_std"):
        value = getattr(processor, key, None)
        if isinstance(value, list | tuple) and len(value) != vision.num_channels:
            raise RetrofitError(
                f"pretrain.image_processor.{key} has {len(value)} values for {vision.num_channels} channels "
                f"(pretrain.model.num_channels); give one per channel"
            )
    if processor_image_size(processor) != (height, width):
        raise RetrofitError(
            f"pretrain.image_processor gives {'×'.join(map(str, processor_image_size(processor)))} images, but "
            f"pretrain.model.image_size is {size}; give both the same size"
        )
    try:  # a value it takes but cannot use (resample 99, image_mean 'abc') failed at the first image, "fix the dataset"
        from PIL import Image

        processor(images=[Image.new("RGB" if vision.num_channels == 3 else "L", (width, height))], return_tensors="pt")
    except Exception as exc:  # noqa: BLE001 - whatever the processor raises, it is its settings'
        raise RetrofitError(f"pretrain.image_processor cannot process an image ({brief(exc)}); fix its values") from exc
    torch.manual_seed(run.seed)
    captions = None
    try:
        if clip:
            from transformers import CLIPModel

            from .zero_shot import Captions

            model = CLIPModel(config)
            captions = Captions(tokenizer, names, run.caption_templates, config)
        else:
            model = ViTForImageClassification(config)
    except (MemoryError, RuntimeError) as exc:  # "can't allocate memory" for a model too large for this machine
        raise RetrofitError(f"pretrain.model could not be built ({brief(exc)}); make it smaller") from None
    # For --resume: the model and processor as built, every field, so a field the recipe adds at its default value
    # (or drops) changes nothing, and a changed one is named
    from .checkpoints import without_release

    same_run = {"pretrain": {"model": without_release(config.to_dict()),
                             "image_processor": without_release(processor.to_dict())}}  # fmt: skip
    same_run |= output_record(output)
    result = train(model, processor, run, captions=captions, checkpoint_dir=checkpoint_dir, resume=resume,
                   overwrite=overwrite, progress_bar=progress, same_run=same_run, log=log)  # fmt: skip
    if not (result.finished and result.is_main_process):
        return result
    with atomic_dir(output, overwrite or owned, kind=BASELINE, inputs=(run.data,)) as tmp:
        result.model.float().save_pretrained(tmp)
        processor.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        evaluated_on = run.evaluated_on() if run.eval_split else None  # with --holdout: the images held out
        settings = asdict(run) | {"eval_split": evaluated_on} | result.budget.options  # resumed: the first budget
        processes = launched_processes()  # settings' batch_size is each process's
        info = {"data": run.data, "steps": result.steps, "epochs": result.epochs, "accuracy": result.final_accuracy,
                "eval_split": evaluated_on, "processes": processes,
                "global_batch_size": run.batch_size * run.grad_accum * processes, "settings": settings}  # fmt: skip
        (tmp / "training.json").write_text(json.dumps(info, indent=2, default=str) + "\n")
    log(f"wrote {output}")
    result.output = Path(output)
    return result


# The characters a pretrained CLIP's tokenizer knows (`character_tokenizer`): captions of class names, lowercased.
CAPTION_CHARACTERS = "abcdefghijklmnopqrstuvwxyz0123456789 .,-/'&()"


def character_tokenizer():
    """A CLIP tokenizer whose tokens are single characters (BPE without merges; ``<|startoftext|>`` 0,
    ``<|endoftext|>`` 1, also the padding and unknown token), built offline: enough for captions of class names, and
    what a small CLIP pretrained here ships with."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in CAPTION_CHARACTERS.replace(" ", ""):
        vocab[char] = len(vocab)
        vocab[char + "</w>"] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    tokenizer.model_max_length = 64
    return tokenizer


def clip_config(model_config: dict, tokenizer):
    """A `CLIPConfig` from a recipe's ``pretrain.model`` (``vision_config``, ``text_config``, ``projection_dim``),
    its text tower sized for `tokenizer` (vocabulary, start/end/padding ids, 64 positions)."""
    from transformers import CLIPConfig

    text = {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "max_position_embeddings": tokenizer.model_max_length,
        **model_config.get("text_config", {}),
    }
    rest = {key: value for key, value in model_config.items() if key not in ("vision_config", "text_config")}
    return CLIPConfig(vision_config=model_config["vision_config"], text_config=text, **rest)


# A pretrained CLIP's text tower fields that `clip_config` takes from the character tokenizer: another vocabulary size
# or position count failed in torch.embedding ("index out of range"), another end id pooled the wrong token.
TOKENIZER_FIELDS = ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id", "max_position_embeddings")


def _check_clip_keys(model_config: dict) -> None:
    from transformers import CLIPConfig, CLIPTextConfig, CLIPVisionConfig

    _check_keys(model_config, CLIPConfig().to_dict(), "pretrain.model", "CLIPConfig field")
    for key, config_class in (("vision_config", CLIPVisionConfig), ("text_config", CLIPTextConfig)):
        given = model_config.get(key) or {}
        if not isinstance(given, dict):
            raise RetrofitError(f"pretrain.model.{key} must be a mapping of {config_class.__name__} fields, not "
                                f"{shown(given)}")  # fmt: skip
        _check_keys(given, config_class().to_dict(), f"pretrain.model.{key}", f"{config_class.__name__} field")
    taken = next((key for key in TOKENIZER_FIELDS if key in (model_config.get("text_config") or {})), None)
    if taken:
        raise RetrofitError(f"pretrain.model.text_config.{taken} is set from the captions' character tokenizer; "
                            "remove it from the recipe")  # fmt: skip


def _not_settings() -> set[str]:
    """What every config's `to_dict` holds besides its model's own fields (`PretrainedConfig`'s: how a saved model
    was made and how its outputs are returned): the pretraining sets them itself, so a recipe's value was taken
    without effect (dtype), broke the run after the data was read (model_type, return_dict), or mislabelled the
    export (problem_type: a softmax classifier trained, sigmoid scores served)."""
    from transformers import PretrainedConfig

    return {*PretrainedConfig().to_dict(), "torch_dtype"}


def _check_keys(given: dict, valid, where: str, what: str) -> None:
    """Refuse keys that `valid` lacks (configs accept unknown keyword arguments silently) or that the pretraining sets
    itself (`_not_settings`), and a value that is not true or false where `valid` (a dict of defaults) holds a
    switch: `do_resize: maybe` resized, as any text is true."""
    reserved = _not_settings() if where.startswith("pretrain.model") else set()
    for key, value in given.items():
        if key in reserved:
            raise RetrofitError(f"{where}.{key} is not a setting of the model: the pretraining sets it itself (a "
                                "float32 classifier of its class, returning its outputs as transformers does); remove "
                                "it from the recipe")  # fmt: skip
        if key not in valid:
            raise RetrofitError(f"unknown {what} '{key}' in {where}{did_you_mean(key, valid)}")
        if isinstance(valid, dict) and isinstance(valid[key], bool) and not isinstance(value, bool):
            raise RetrofitError(f"{where}.{key} must be true or false, not {shown(value)}")
