"""`convert`: load a checkpoint, insert a PatchMerger, report the cost and export: the Python API behind the CLI."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedModel

from .atomic import check_output
from .cost import Cost, compare, model_cost
from .errors import RetrofitError, check_at_least_one
from .export import export
from .loading import load_config, load_image_processor, load_model, processor_image_size, resolve_source
from .push import check_push, push_written
from .surgery import check_merge, insert_patch_merger


@dataclass
class ConvertResult:
    """What `convert` made: the merged model, its cost before/after, and where it was written."""

    model: PreTrainedModel
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
    rope_positions: str | None = None,
    output: str | Path | None = None,
    task: str | None = None,
    overwrite: bool = False,
    trust_remote_code: bool = False,
    revision: str | None = None,
    calibrate_on: str | None = None,
    calibrate_split: str = "train",
    calibrate_images: int = 256,
    image_column: str = "image",
    push_to_hub: str | None = None,
    private: bool = False,
    create_pr: bool = False,
    log: Callable[[str], None] = print,
) -> ConvertResult:
    """Insert a PatchMerger into `source` (Hub id or folder) after `after_layer` layers with `num_tokens` tokens.

    The checkpoint is converted as its own class; `task` (``image-classification`` or ``image-feature-extraction``)
    converts it as the family's classifier or backbone instead (e.g. a DINOv2 backbone with a new classifier, or the
    vision tower of a full CLIP checkpoint). `rope_positions` is for RoPE models (DINOv3): see `insert_patch_merger`.

    With `calibrate_on` (fashion-mnist, an image folder or a Hub dataset id), the merger starts from k-means of the
    layer-K tokens of a shuffled sample of `calibrate_images` images of its `calibrate_split` split (column
    `image_column`) instead of at random. With `push_to_hub` (a repo id), the export is then uploaded there
    (`private` if the repo is new; `create_pr`: as a pull request on an existing repo); the login is checked first.
    Bad input raises `RetrofitError` before anything is written; `output`, if given, is written atomically.
    """
    check_at_least_one("--calibrate-images", calibrate_images)
    resolve_source(source)  # a bad retrofit:NAME is refused first
    if output is not None:
        check_output(output, overwrite, inputs=(source, calibrate_on))
    if push_to_hub:
        if output is None:
            raise RetrofitError("--push-to-hub uploads the export, so it needs --output")
        check_push(push_to_hub, private=private, create_pr=create_pr)
    config = load_config(source, trust_remote_code=trust_remote_code, revision=revision, task=task)
    processor = load_image_processor(source, config, revision=revision, log=log)
    image_size = processor_image_size(processor)
    check_merge(config, after_layer, num_tokens, image_size, rope_positions=rope_positions)
    model = load_model(source, config=config, trust_remote_code=trust_remote_code, revision=revision)
    model.eval()
    merged = insert_patch_merger(model, after_layer, num_tokens, source=str(source), rope_positions=rope_positions)
    training = None
    if calibrate_on is not None:
        from .calibrate import calibrate_from_data
        from .card import TrainingInfo

        calibration = calibrate_from_data(
            merged,
            calibrate_on,
            source=str(source),
            num_images=calibrate_images,
            split=calibrate_split,
            image_column=image_column,
            log=log,
        )
        training = TrainingInfo(init=calibration.describe(calibrate_on, calibrate_split, after_layer))
    before, after = model_cost(config, image_size), model_cost(merged.config, image_size)
    log(compare(before, after))
    if output is not None:
        export(merged, output, image_processor=processor, overwrite=overwrite, source_config=config, training=training)
        log(f"wrote {output}")
        if push_to_hub:
            push_written(output, push_to_hub, private=private, create_pr=create_pr, log=log)
    return ConvertResult(model=merged, before=before, after=after, output=Path(output) if output else None)
