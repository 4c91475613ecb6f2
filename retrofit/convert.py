"""`convert`: load a checkpoint, insert a PatchMerger, report the cost and export: the Python API behind the CLI."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from transformers import PreTrainedModel

from .atomic import check_output, hold_write_lock, releases_write_locks
from .card import TrainingInfo
from .cost import Cost, compare, model_cost
from .errors import RetrofitError, check_arguments, log_to_stderr
from .export import check_tokenizer_files_kept, export
from .loading import (
    NO_TOKENIZER_NOTE,
    UNTRAINED_CLASSIFIER,
    check_runs_on_its_images,
    classifier_is_new,
    converted_as_other_class,
    family_and_head,
    load_config,
    load_image_processor,
    load_model,
    load_tokenizer,
    processor_image_size,
    resolve_source,
)
from .push import check_push, push_written
from .reads import reads_each_folder_once
from .settings import ConvertArgs, from_options
from .surgery import check_merge, insert_patch_merger
from .train import keeps_callers_random_state


@dataclass
class ConvertResult:
    """What `convert` made: the merged model, its cost before/after, and where it was written."""

    model: PreTrainedModel = field(repr=False)  # printed, it would fill the screen
    before: Cost
    after: Cost
    output: Path | None

    @property
    def speedup(self) -> float:
        """Theoretical speed-up: the ratio of FLOPs before and after."""
        return self.before.gflops / self.after.gflops


def convert(
    source: str | Path,
    *,
    after_layer: int,
    num_tokens: int,
    output: str | Path | None = None,
    log: Callable[[str], None] = print,
    **settings,
) -> ConvertResult:
    """Insert a PatchMerger into `source` (Hub id, folder or ``retrofit:NAME``) after `after_layer` layers with
    `num_tokens` tokens, report the cost and, with `output`, export it (atomically). `settings` are the other
    `retrofit.settings.ConvertArgs` fields, the options of ``retrofit convert``: `task` converts the checkpoint as its
    family's classifier, backbone (e.g. the vision tower of a full CLIP checkpoint) or dual encoder; `rope_positions` is
    for RoPE models (DINOv3); with `calibrate_on` (fashion-mnist, an image folder or a Hub dataset id) the merger starts
    from k-means of the layer-K tokens of `calibrate_images` images of `calibrate_split` instead of at random (`seed`
    draws either start: one seed, one export); with `push_to_hub` (a repo id) the export is uploaded (`private`,
    `create_pr`), the login checked first; `overwrite`, `revision`, `trust_remote_code`. Bad input raises
    `RetrofitError` before anything is written."""
    args = from_options(ConvertArgs, {"source": source, "after_layer": after_layer, "tokens": num_tokens,
                                      "output": output, **settings}, where="convert()")  # fmt: skip
    check_arguments("convert", log=log)
    return run_convert(args, log=log, show=log)


@reads_each_folder_once
@releases_write_locks
@keeps_callers_random_state
def run_convert(
    args: ConvertArgs, *, log: Callable[[str], None] = log_to_stderr, show: Callable[[str], None] = print
) -> ConvertResult:
    """`convert` for settings already checked (``retrofit convert`` builds `ConvertArgs` itself): the cost table goes
    to `show` (the CLI's stdout), every other line to `log` (its stderr)."""
    source, output = args.source, args.output
    resolve_source(source)  # a bad retrofit:NAME is refused first
    if output is not None:
        check_output(output, args.overwrite, inputs=(source, args.calibrate_on))
        hold_write_lock(output, "--output")
    if args.push_to_hub:
        if output is None:
            raise RetrofitError("--push-to-hub uploads the export, so it needs --output")
        check_push(args.push_to_hub, private=args.private, create_pr=args.create_pr)
    config = load_config(source, trust_remote_code=args.trust_remote_code, revision=args.revision, task=args.task)
    processor = load_image_processor(source, config, revision=args.revision, log=log)
    tokenizer = load_tokenizer(source, config, revision=args.revision, log=log)  # dual encoders only
    check_tokenizer_files_kept(output, args.overwrite, tokenizer)
    image_size = processor_image_size(processor)
    check_merge(config, args.after_layer, args.tokens, image_size, rope_positions=args.rope_positions)
    model = load_model(source, config=config, trust_remote_code=args.trust_remote_code, revision=args.revision,
                       new_classifier_ok=True)  # fmt: skip
    model.eval()
    check_runs_on_its_images(model, processor, source)
    # the same export every time, whatever the caller (or another thread) draws, and their draws left alone
    merged = insert_patch_merger(model, args.after_layer, args.tokens, source=str(source),
                                 rope_positions=args.rope_positions, image_size=image_size, seed=args.seed)  # fmt: skip
    training = TrainingInfo(init=f"random (seed {args.seed})")  # not fine-tuned; the card said no seed to rerun
    saved = (
        load_config(source, trust_remote_code=args.trust_remote_code, revision=args.revision) if args.task else config
    )
    other_class = converted_as_other_class(saved, config)
    if other_class:
        log(f"note: {other_class}")
        training.notes.append(other_class)
    if tokenizer is None and family_and_head(config)[1].is_dual_encoder:
        training.notes.append(NO_TOKENIZER_NOTE)
    new_classifier = classifier_is_new(saved, config)
    if new_classifier:
        new_head = (
            f"the classifier is new (the checkpoint has none): its {config.num_labels} {UNTRAINED_CLASSIFIER} "
            "(`retrofit finetune --loss ce --num-labels N`)"
        )
        log(f"note: {new_head}")
        training.notes.append(new_head)
    if args.calibrate_on is not None:
        from .calibrate import calibrate_from_data
        from .data import split_read
        from .provenance import dataset_commit

        calibration = calibrate_from_data(merged, args.calibrate_on, source=str(source), log=log,
                                          num_images=args.calibrate_images, split=args.calibrate_split,
                                          image_column=args.image_column, seed=args.seed,
                                          holdout=args.holdout, holdout_by=args.label_column,
                                          revision=args.data_revision, new_classifier=new_classifier)  # fmt: skip
        held = args.holdout
        of = None if held is None else f"all but the {100 * held:g} % that --holdout {held:g} keeps out"
        commit = dataset_commit(args.calibrate_on, args.data_revision)  # a Hub dataset's
        read = split_read(args.calibrate_on, args.calibrate_split, revision=args.data_revision)  # as load_split did
        training.init = calibration.describe(args.calibrate_on, read, args.after_layer, args.seed,
                                             of=of, commit=commit)  # fmt: skip
    before, after = model_cost(config, image_size), model_cost(merged.config, image_size)
    show(compare(before, after))
    if output is not None:
        export(merged, output, image_processor=processor, tokenizer=tokenizer, overwrite=args.overwrite,
               source_config=config, training=training)  # fmt: skip
        log(f"wrote {output}")
        if args.push_to_hub:
            push_written(output, args.push_to_hub, private=args.private, create_pr=args.create_pr, log=log)
    return ConvertResult(model=merged, before=before, after=after, output=Path(output) if output else None)
