"""An export in the hands of a transformers user: what they do with it after downloading it (load it with other
settings, edit its config), in process with the export's own code (trust_remote_code)."""

from __future__ import annotations

import pytest
import torch
from conftest import save_tiny
from transformers import AutoConfig, AutoModelForImageClassification

from retrofit import FAMILIES, convert
from retrofit.errors import RetrofitError
from retrofit.hub_code import load_classes
from retrofit.loading import load_model


@pytest.fixture(scope="module")
def vit_export(tiny_vit, tmp_path_factory):
    out = tmp_path_factory.mktemp("use") / "vit-use-pm"  # transformers caches remote code by folder name
    convert(tiny_vit, after_layer=2, num_tokens=3, output=out, log=lambda _: None)
    return out


def test_merge_settings_edited_after_the_export_are_refused_in_one_line(vit_export, tmp_path):
    """A config whose merge settings the weights cannot run with is refused by the exported code with a ValueError
    naming the setting, as transformers refuses its own bad settings. A prefix token count other than the family's ran
    without a word: 0 merged ViT's CLS token into the patches (the classifier then read a merged token), 2 passed a
    patch on unmerged; 0 merged tokens ran too, and a float or text raised a TypeError from inside torch."""
    edits = {
        "merge_num_prefix_tokens": [0, 2, True],
        "merge_num_tokens": [0, -1, 2.5, None],
        "merge_after_layer": ["2", 0, 4],
    }
    for name, values in edits.items():
        for value in values:
            with pytest.raises(ValueError, match=f"^{name} must be"):
                AutoModelForImageClassification.from_pretrained(vit_export, trust_remote_code=True, **{name: value})
    config = AutoConfig.from_pretrained(vit_export, trust_remote_code=True)
    config.merge_num_prefix_tokens = 0
    with pytest.raises(ValueError, match=r"^merge_num_prefix_tokens must be 1, .* \(CLS\), got 0$"):
        AutoModelForImageClassification.from_config(config, trust_remote_code=True)
    # retrofit's own loading of such an export: one line naming it
    edited = tmp_path / "edited"
    edited.mkdir()
    for path in vit_export.iterdir():
        (edited / path.name).write_bytes(path.read_bytes())
    text = (edited / "config.json").read_text().replace('"merge_num_prefix_tokens": 1', '"merge_num_prefix_tokens": 0')
    (edited / "config.json").write_text(text)
    with pytest.raises(RetrofitError, match="merge_num_prefix_tokens must be 1"):
        load_model(edited)
    # where the prefix counts the config's register tokens, and where there is no CLS token
    family = FAMILIES["dinov2_with_registers"]
    classes = load_classes(family, family.heads["Dinov2WithRegistersModel"])
    sizes = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8)
    merge = dict(merge_after_layer=1, merge_num_tokens=3)
    assert classes.model_class(classes.config_class(**sizes, **merge, num_register_tokens=4, merge_num_prefix_tokens=5))
    with pytest.raises(ValueError, match=r"must be 3, .* \(CLS, registers\), got 5$"):
        classes.model_class(classes.config_class(**sizes, **merge, num_register_tokens=2, merge_num_prefix_tokens=5))
    family = FAMILIES["siglip_vision"]
    classes = load_classes(family, family.heads["SiglipVisionModel"])
    with pytest.raises(ValueError, match=r"must be 0, .* \(none\), got 1$"):
        classes.model_class(classes.config_class(**sizes, **merge, merge_num_prefix_tokens=1))
    assert torch.isfinite(classes.model_class(classes.config_class(**sizes, **merge, merge_num_prefix_tokens=0))(
        pixel_values=torch.randn(1, 3, 32, 32)).last_hidden_state).all()  # fmt: skip


def test_a_dual_encoder_s_forward_names_the_source_s_parameters_so_the_trainer_keeps_their_columns(tmp_path):
    """The merged dual encoders override `forward` (images alone skip the text tower) as `(input_ids, pixel_values,
    *args, **kwargs)`; transformers' Trainer keeps only the dataset columns `forward` names, and dropped
    `attention_mask` (padded captions then attended to their padding) and `return_loss` (no loss: training stopped)."""
    import inspect

    import datasets
    import transformers
    from transformers import Trainer, TrainingArguments

    for name in ("clip", "siglip", "siglip2"):
        family = FAMILIES[name]
        head = family.heads[f"{family.display_name}Model"]
        model_class = load_classes(family, head).model_class
        source = inspect.signature(getattr(transformers, head.class_name).forward)
        assert inspect.signature(model_class.forward) == source, name
    family = FAMILIES["clip"]
    classes = load_classes(family, family.heads["CLIPModel"])
    text = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=99)
    vision = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8)
    merge = dict(merge_after_layer=1, merge_num_tokens=3, merge_num_prefix_tokens=1)
    model = classes.model_class(classes.config_class(text_config=text, vision_config=vision, **merge))
    columns = ["input_ids", "attention_mask", "pixel_values", "return_loss"]
    data = datasets.Dataset.from_dict({"caption": ["a cat"]} | {column: [[1]] for column in columns})
    trainer = Trainer(model=model, args=TrainingArguments(tmp_path, report_to=[], use_cpu=True))
    assert trainer._remove_unused_columns(data).column_names == columns


def test_device_map_keeps_merged_layers_whole_and_offloaded_layers_find_the_merge(vit_export, tmp_path):
    """`from_pretrained(..., device_map=...)`: transformers keeps each of `_no_split_modules` on one device, and the
    merged layers were not among them: `device_map="auto"` split one across devices (its residual sums then met
    tensors on two). The hooks of a dispatched or offloaded model copy each layer's arguments: BEiT's merged layers,
    which find layer K's merge weights by the `resolution` object of the forward pass, found none (RuntimeError), and
    DINOv3's RoPE rotation (a tuple that carries the merged tokens' rotation) could not be rebuilt (TypeError). Both
    read layer K's merge weights after the merger's call, when an offloaded merger's weights are on the meta device
    again: the merged tokens' positions were wrong (no error)."""
    from transformers import AutoModel, BeitConfig, BeitModel, DINOv3ViTConfig, DINOv3ViTModel
    from transformers.integrations.accelerate import infer_auto_device_map

    model = AutoModelForImageClassification.from_pretrained(vit_export, trust_remote_code=True)
    assert "ViTLayerOnMergedTokens" in model._no_split_modules
    # a memory budget at which the source's unsplittable classes alone let layer K straddle the CPU and the disk
    device_map = infer_auto_device_map(model, max_memory={"cpu": 110_000, "disk": 10**9},
                                       no_split_module_classes=model._no_split_modules)  # fmt: skip
    assert [name for name in device_map if name.startswith("vit.layers.2.")] == [], device_map
    sizes = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64, image_size=32)
    # layers K and after offloaded to the disk: every module gets hooks
    on_cpu = {"embeddings": "cpu", "layers.0": "cpu", "layers.1": "cpu", "layers.2": "disk", "layers.3": "disk"}
    sources = {
        "beit": (
            BeitModel(BeitConfig(**sizes, patch_size=8, use_shared_relative_position_bias=True)),
            {**on_cpu, "shared_position_bias": "cpu", "layernorm": "cpu", "pooler": "cpu"},
        ),
        "dinov3": (
            DINOv3ViTModel(DINOv3ViTConfig(**sizes, patch_size=8, num_register_tokens=2)),
            {key.replace("layers", "model.layer"): device for key, device in on_cpu.items()}
            | {"rope_embeddings": "cpu", "norm": "cpu"},
        ),
    }
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for name, (source, placed) in sources.items():
        export = tmp_path / f"{name}-device-map-pm"
        convert(save_tiny(source, tmp_path / name), after_layer=2, num_tokens=3, output=export, log=lambda _: None)
        with torch.no_grad():
            expected = AutoModel.from_pretrained(export, trust_remote_code=True).eval()(pixel_values=pixels)
            offloaded = AutoModel.from_pretrained(
                export, trust_remote_code=True, device_map=placed, offload_folder=tmp_path / f"{name}-offload"
            ).eval()
            got = offloaded(pixel_values=pixels)
        torch.testing.assert_close(got.last_hidden_state, expected.last_hidden_state)


def test_a_traced_export_runs_at_other_batch_sizes(tmp_path):
    """`torch.jit.trace` of an export, as of its source, gives a model that takes any batch size. BEiT's merged layers
    built their merge of the relative position bias by assigning into slices of a new tensor, which the tracer records
    at the traced batch size: the traced model failed at any other ('The size of tensor a (5) must match ...')."""
    import warnings

    from transformers import AutoModel, BeitConfig, BeitModel

    sizes = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64, image_size=32)
    source = BeitModel(BeitConfig(**sizes, patch_size=8, use_relative_position_bias=True))
    export = tmp_path / "beit-trace-pm"
    convert(save_tiny(source, tmp_path / "beit"), after_layer=2, num_tokens=3, output=export, log=lambda _: None)
    model = AutoModel.from_pretrained(export, trust_remote_code=True).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # the source's own shape checks
        traced = torch.jit.trace(model, (torch.randn(2, 3, 32, 32, generator=generator),), strict=False)
        for batch_size in (1, 5):
            pixels = torch.randn(batch_size, 3, 32, 32, generator=generator)
            expected = model(pixel_values=pixels).last_hidden_state
            torch.testing.assert_close(traced(pixels)["last_hidden_state"], expected)
