"""The model card (README.md) of an export, built with huggingface_hub's ModelCard."""

from __future__ import annotations

from dataclasses import dataclass, field

from huggingface_hub import ModelCard, ModelCardData
from transformers import PreTrainedModel

from .cost import compare, model_cost


@dataclass
class TrainingInfo:
    """How the merged model was made, beyond the merge settings in its config."""

    data: str | None = None
    steps: int | None = None
    epochs: float | None = None
    loss: str | None = None
    init: str = "random"
    notes: list[str] = field(default_factory=list)


def _how_made(config, training: TrainingInfo | None) -> str:
    lines = [
        f"- source: `{config.merge_source}`",
        f"- PatchMerger before encoder layer {config.merge_after_layer} (layers 0..{config.merge_after_layer - 1} "
        f"run on all tokens), {config.merge_num_tokens} merged tokens, {config.merge_num_prefix_tokens} prefix "
        "token(s) passed through",
    ]
    if training is not None:
        lines.append(f"- merger initialisation: {training.init}")
        if training.data:
            lines.append(
                f"- fine-tuned on `{training.data}` for {training.steps} steps ({training.epochs} epochs), "
                f"loss: {training.loss}"
            )
        lines.extend(f"- {note}" for note in training.notes)
    else:
        lines.append("- not fine-tuned after the merge: expect lower accuracy than the source until it is")
    return "\n".join(lines)


def build_card(
    model: PreTrainedModel,
    *,
    source_config=None,
    training: TrainingInfo | None = None,
    results_table: str | None = None,
    eval_results: list | None = None,
    repo_id: str | None = None,
) -> ModelCard:
    """A model card for a merged model: metadata, how it was made, how to load it, and its cost."""
    config = model.config
    source = str(config.merge_source or "")
    is_hub_id = source.count("/") == 1 and not source.startswith((".", "/", "~"))
    data = ModelCardData(
        base_model=source if is_hub_id else None,
        library_name="transformers",
        pipeline_tag="image-classification" if getattr(config, "num_labels", 0) else "image-feature-extraction",
        tags=["retrofit", "patch-merger", "token-merging", "vision", config.model_type.removesuffix("_patch_merger")],
        eval_results=eval_results or None,
        model_name=repo_id.split("/")[-1] if repo_id else None,
    )
    cost_text = ""
    if source_config is not None:
        cost_text = compare(model_cost(source_config), model_cost(config))
    name = repo_id or "path/to/this/folder"
    content = f"""---
{data.to_yaml()}
---

# {repo_id or config.merge_source.split("/")[-1] + "-patch-merger"}

This is {f"[`{source}`](https://huggingface.co/{source})" if is_hub_id else f"`{source}`"} with a **PatchMerger**
(Renggli et al., [Learning to Merge Tokens in Vision Transformers](https://arxiv.org/abs/2202.12015)) inserted
by [retrofit](https://github.com/retrofit-vit/retrofit): after encoder layer {config.merge_after_layer} the patch tokens
are replaced by {config.merge_num_tokens} learned weighted averages of them, so the remaining layers run on far fewer
tokens.

## How it was made

{_how_made(config, training)}

## How to use

```python
from transformers import AutoModelForImageClassification, pipeline

model = AutoModelForImageClassification.from_pretrained("{name}", trust_remote_code=True)
classifier = pipeline("image-classification", model="{name}", trust_remote_code=True)
```

The modeling code ships in this repository (`modeling_*.py`, `configuration_*.py`); it needs only `torch` and
`transformers`, not retrofit.

## Cost (theoretical, per image)

{cost_text or "See `config.json` for the merge settings."}

## Results

{results_table or "Not evaluated yet: run `retrofit evaluate SOURCE THIS_FOLDER --data ...` to add results."}
"""
    return ModelCard(content)
