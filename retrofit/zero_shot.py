"""Dual encoders (CLIP, SigLIP): image and text embeddings, prompts from class names, zero-shot logits.

A merged dual encoder keeps its source's text tower, projections and logit scale (and bias); only the vision tower
is merged. Zero-shot classification compares an image's normalised embedding with the normalised embeddings of one
prompt per class ("a photo of a {}."), scaled by the model's logit scale: what transformers'
``zero-shot-image-classification`` pipeline computes, batched here over a dataset.

`retrofit evaluate --zero-shot`, `sweep --zero-shot` and recipes score a dual encoder with these, through the one
accuracy loop (`evaluation.ZeroShotClassifier`, `evaluation.zero_shot_scores`).

torch is imported where it is used: `retrofit.settings` checks a template with `template_problem` at option-parsing
time, when no torch may load.
"""

from __future__ import annotations

import string
from typing import TYPE_CHECKING

from .errors import RetrofitError, shown

if TYPE_CHECKING:
    import torch

DEFAULT_TEMPLATE = "a photo of a {}."


def template_problem(template: str) -> str | None:
    """What is wrong with a prompt template, said after its option or recipe key (``'a {} {}' must hold exactly one
    {} ...``), or None if it holds exactly one bare ``{}`` (where the class name goes) and no other field."""
    try:
        fields = [part[1:] for part in string.Formatter().parse(template) if part[1] is not None]
    except ValueError as exc:  # an unmatched brace
        return f"{shown(template)} is not a template ({exc}); write one {{}} where the class name goes, e.g. " + repr(
            DEFAULT_TEMPLATE
        )
    if fields != [("", "", None)]:  # a format spec or conversion ({:d}, {!x}) fails on a class name, or pads it
        return (
            f"{shown(template)} must hold exactly one {{}} (where the class name goes, without a format spec or "
            f"conversion) and no other field, e.g. {DEFAULT_TEMPLATE!r}"
        )
    return None


def check_template(template: str) -> str:
    """`template` if it holds exactly one ``{}`` (where the class name goes) and no other field; else one line."""
    problem = template_problem(template)
    if problem:
        raise RetrofitError(f"--prompt-template {problem}")
    return template


def prompts(class_names: list[str], template: str = DEFAULT_TEMPLATE) -> list[str]:
    """One prompt per class: `template` with the class name in place of ``{}`` (underscores become spaces)."""
    check_template(template)
    return [template.format(name.replace("_", " ")) for name in class_names]


def _unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DistributedDataParallel (or similar) wrapper."""
    return getattr(model, "module", model)


def image_embeddings(model: torch.nn.Module, pixel_values: torch.Tensor, **kwargs) -> torch.Tensor:
    """The normalised image embeddings of a dual encoder, as its forward computes them (``image_embeds``).

    A merged dual encoder given images alone returns them without a text tower pass, so it is called through its
    forward (which a training wrapper such as DDP needs); a source model takes ``get_image_features``."""
    from .loading import is_merged

    if is_merged(_unwrapped(model).config):
        return model(pixel_values=pixel_values, **kwargs).image_embeds
    features = _unwrapped(model).get_image_features(pixel_values=pixel_values, **kwargs)
    embeds = getattr(features, "pooler_output", features)  # an output object in transformers 5.x
    return embeds / embeds.norm(p=2, dim=-1, keepdim=True)


def tokenize(tokenizer, texts: list[str], config) -> dict[str, torch.Tensor]:
    """`texts` as the model's text tower takes them: SigLIP was trained on text padded to 64 tokens, as transformers'
    zero-shot pipeline pads it; CLIP to the longest text. Either is cut at the text tower's positions (a tokenizer
    without a ``model_max_length`` cut nothing, and a longer text raised in the text tower)."""
    if getattr(tokenizer, "pad_token_id", None) is None:  # transformers raised a ValueError (a traceback)
        raise RetrofitError(
            "the model's tokenizer has no padding token, which a batch of prompts needs; set the one its text tower "
            "was trained with as pad_token in its tokenizer_config.json (CLIP's is '<|endoftext|>', SigLIP's '</s>', "
            "SigLIP 2's '<pad>')"
        )
    positions = getattr(getattr(config, "text_config", None), "max_position_embeddings", None) or 64
    if "siglip" in config.model_type:
        length = min(64, positions)
        return tokenizer(texts, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
    length = min(positions, getattr(tokenizer, "model_max_length", None) or positions)
    return tokenizer(texts, padding=True, truncation=True, max_length=length, return_tensors="pt")


def pooled_tokens(ids: list[int], config) -> tuple[int, ...]:
    """The tokens of one text that its embedding depends on: SigLIP's text tower attends to all of them; CLIP's is
    causal and pools its end token (the first, or the highest id where its config's end token is the old 2), so a
    character its tokenizer does not know, read as that end token (retrofit's pretraining tokenizer), ends the text."""
    if "siglip" in config.model_type:
        return tuple(ids)
    end_token = getattr(getattr(config, "text_config", None), "eos_token_id", None)
    end = ids.index(max(ids)) if end_token == 2 else ids.index(end_token) if end_token in ids else len(ids) - 1
    return tuple(ids[: end + 1])


def same_tokens(tokenizer, texts: list[str], config) -> tuple[str, str] | None:
    """The first two of `texts` that `tokenizer` turns into the same tokens (`pooled_tokens`: characters it does not
    know, or cut at the text tower's length), or None: as prompts of two classes, those classes would tie."""
    seen: dict[tuple, str] = {}
    for text, ids in zip(texts, tokenize(tokenizer, texts, config)["input_ids"].tolist(), strict=True):
        tokens = pooled_tokens(ids, config)
        if tokens in seen:
            return seen[tokens], text
        seen[tokens] = text
    return None


def text_embeddings(model: torch.nn.Module, tokenizer, texts: list[str], *, batch_size: int = 256) -> torch.Tensor:
    """The normalised embeddings of `texts` (one prompt per class) by the dual encoder's text tower (no gradients: it
    stays frozen). Two prompts of the same tokens are one line: their classes would tie."""
    import torch

    inner = _unwrapped(model)
    pair = same_tokens(tokenizer, texts, inner.config) if texts else None
    if pair:
        raise RetrofitError(
            f"the tokenizer gives the prompts {pair[0]!r} and {pair[1]!r} the same tokens (characters it does not "
            "know, or prompts longer than the text tower takes), so their classes would tie (one text embedding); "
            "rename those classes, or change the prompt template"
        )
    device = next(inner.parameters()).device
    chunks = []
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            inputs = tokenize(tokenizer, texts[start : start + batch_size], inner.config)
            # the mask where the tokenizer gives one, as the pipeline passes it: the Hub's SigLIP tokenizers give none
            # (their text tower was trained attending to the padding), SigLIP 2's and a SigLIP tokenizer saved
            # without that setting (`model_input_names`) do
            inputs = {key: value.to(device) for key, value in inputs.items() if key in ("input_ids", "attention_mask")}
            features = inner.get_text_features(**inputs)
            embeds = getattr(features, "pooler_output", features).float()
            chunks.append(embeds / embeds.norm(p=2, dim=-1, keepdim=True))
    return torch.cat(chunks)


def zero_shot_logits(model: torch.nn.Module, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """Image-text logits (images × texts) as the model's forward computes ``logits_per_image``: cosine similarity
    times the learned logit scale, plus SigLIP's learned bias."""
    inner = _unwrapped(model)
    logits = image_embeds.float() @ text_embeds.float().t().to(image_embeds.device) * inner.logit_scale.exp().float()
    bias = getattr(inner, "logit_bias", None)
    return logits + bias.float() if bias is not None else logits


class Captions:
    """The captions of a contrastive pretraining (`retrofit.finetune.pretrain`): each class name in each template,
    tokenized once (classes × templates × length). `sample` gives each image of a batch one caption of its class,
    its template drawn at random from a seed, so that a resumed run draws the same ones."""

    def __init__(self, tokenizer, names: list[str], templates: tuple[str, ...], config) -> None:
        self.tokenizer, self.names, self.templates = tokenizer, list(names), tuple(templates)
        texts = [template.format(name.replace("_", " ")) for name in names for template in templates]
        inputs = tokenize(tokenizer, texts, config)
        seen: dict[tuple, tuple[str, str]] = {}  # tokens: (their class, caption)
        classes = [name for name in names for _ in templates]
        for name, text, ids in zip(classes, texts, inputs["input_ids"].tolist(), strict=True):
            other, caption = seen.setdefault(pooled_tokens(ids, config), (name, text))
            if other != name:  # characters the tokenizer does not know (its unknown token), or cut at its length
                raise RetrofitError(
                    f"the captions {caption!r} and {text!r} are the same tokens to the tokenizer (characters it does "
                    "not know, or captions longer than the text tower takes), so pretraining could not tell their "
                    "classes apart; rename those classes, or change the caption templates"
                )
        shape = (len(names), len(templates), -1)
        self.input_ids = inputs["input_ids"].reshape(shape)
        self.attention_mask = inputs["attention_mask"].reshape(shape)

    def sample(self, labels: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
        """One caption per label (a class id), as text tower inputs on the labels' device."""
        import torch

        generator = torch.Generator().manual_seed(seed)
        which = torch.randint(len(self.templates), (len(labels),), generator=generator)
        rows = labels.cpu()
        return {
            "input_ids": self.input_ids[rows, which].to(labels.device),
            "attention_mask": self.attention_mask[rows, which].to(labels.device),
        }


def caption_logits(model: torch.nn.Module, pixel_values: torch.Tensor, captions: dict) -> torch.Tensor:
    """The image-caption logits (images × captions) of a dual encoder's forward, for `losses.contrastive_loss`."""
    return model(pixel_values=pixel_values, **captions).logits_per_image
