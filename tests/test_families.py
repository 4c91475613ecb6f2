"""Every supported family through the real path: tiny checkpoints with the real Hub structure -> convert -> export ->
reload without retrofit -> same outputs, pipeline, other image sizes, cost, fine-tune steps; refused families."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from conftest import TINY, save_tiny, tiny_clip_tokenizer, tiny_siglip_tokenizer
from safetensors.torch import load_file, save_file
from torch import nn

from retrofit import FAMILIES, convert
from retrofit.calibrate import calibrate, model_outputs, recording_merger_inputs, replay_first_layers
from retrofit.cli import main
from retrofit.cost import layer_macs, model_cost
from retrofit.errors import RetrofitError
from retrofit.families import supported_names
from retrofit.hub_code import OLDEST_TRANSFORMERS, classifier_head
from retrofit.loading import family_and_head, layer_config
from retrofit.losses import HeadReader

K, M = 2, 3  # merge after 2 of the 4 layers into 3 tokens (of 16 patches at 32x32, 36 at 48x48)
LAYERS = TINY["num_hidden_layers"]
LABELS = {key: TINY[key] for key in ("num_labels", "id2label", "label2id")}
VISION = {key: TINY[key] for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "image_size")}
VISION |= {"patch_size": TINY["patch_size"], "intermediate_size": TINY["intermediate_size"]}
TEXT = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=99)
TEXT |= dict(max_position_embeddings=64, bos_token_id=0, eos_token_id=1, pad_token_id=1)  # the tiny tokenizers'
# Token ids the tiny text towers read: 3 texts, each ended by the end token (1), which CLIP pools.
INPUT_IDS = torch.tensor([[0, 5, 7, 9, 1], [0, 3, 1, 1, 1], [0, 11, 13, 15, 1]])
# DINOv2 configs have mlp_ratio instead of intermediate_size.
DINO = {key: value for key, value in VISION.items() if key != "intermediate_size"}


def _vit_backbone():  # like google/vit-base-patch16-224-in21k or facebook/dino-vitb16: a ViTModel checkpoint
    from transformers import ViTConfig, ViTModel

    return ViTModel(ViTConfig(**TINY))


def _deit_backbone():
    from transformers import DeiTConfig, DeiTModel

    return DeiTModel(DeiTConfig(**TINY))


def _deit_distilled():
    from transformers import DeiTConfig, DeiTForImageClassificationWithTeacher

    return DeiTForImageClassificationWithTeacher(DeiTConfig(**TINY))


def _vit_msn():  # like facebook/vit-msn-small: a ViTMSNModel backbone checkpoint
    from transformers import ViTMSNConfig, ViTMSNModel

    return ViTMSNModel(ViTMSNConfig(**TINY))


def _ijepa():  # like facebook/ijepa_vith14_1k: an IJepaModel backbone checkpoint, no CLS token
    from transformers import IJepaConfig, IJepaModel

    return IJepaModel(IJepaConfig(**TINY))


def _ijepa_classifier():
    from transformers import IJepaConfig, IJepaForImageClassification

    return IJepaForImageClassification(IJepaConfig(**TINY))


def _dinov2():  # like facebook/dinov2-small: a Dinov2Model backbone checkpoint
    from transformers import Dinov2Config, Dinov2Model

    return Dinov2Model(Dinov2Config(**DINO, **LABELS, layerscale_value=0.5))


def _dinov2_registers():  # like facebook/dinov2-with-registers-small: 4 register tokens
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    return Dinov2WithRegistersModel(Dinov2WithRegistersConfig(**DINO, **LABELS, num_register_tokens=4))


def _dinov3():  # like facebook/dinov3-vith16plus-pretrain-lvd1689m: 4 registers, gated MLP, RoPE
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    config = DINOv3ViTConfig(**VISION, num_register_tokens=4, use_gated_mlp=True, layerscale_value=0.5)
    return DINOv3ViTModel(config)


def _clip():  # like openai/clip-vit-base-patch32: a full CLIPModel (text + vision towers)
    from transformers import CLIPConfig, CLIPModel

    vision = {**VISION, "hidden_act": "quick_gelu"}
    return CLIPModel(CLIPConfig(text_config=TEXT, vision_config=vision, projection_dim=16, **LABELS))


def _clip_vision():
    from transformers import CLIPVisionConfig, CLIPVisionModel

    return CLIPVisionModel(CLIPVisionConfig(**VISION, hidden_act="quick_gelu"))


def _siglip():  # like google/siglip-base-patch16-224: a full SiglipModel
    from transformers import SiglipConfig, SiglipModel

    return SiglipModel(SiglipConfig(text_config=TEXT, vision_config=VISION, **LABELS))


def _siglip_vision():
    from transformers import SiglipVisionConfig, SiglipVisionModel

    return SiglipVisionModel(SiglipVisionConfig(**VISION))


def _beit():  # like microsoft/beit-base-patch16-224: a relative position bias per layer, mean pooling, layer scale
    from transformers import BeitConfig, BeitForImageClassification

    config = BeitConfig(**TINY, use_relative_position_bias=True, use_mean_pooling=True, layer_scale_init_value=0.1)
    return _random_bias(BeitForImageClassification(config))


def _beit_shared():  # like microsoft/beit-base-patch16-224-pt22k as BeitModel: one bias shared by all layers, CLS
    from transformers import BeitConfig, BeitModel

    config = BeitConfig(**VISION, use_shared_relative_position_bias=True, use_mean_pooling=False)
    return _random_bias(BeitModel(config))


def _data2vec_vision():  # like facebook/data2vec-vision-base-ft1k
    from transformers import Data2VecVisionConfig, Data2VecVisionForImageClassification

    config = Data2VecVisionConfig(**TINY, use_relative_position_bias=True, use_mean_pooling=True)
    return _random_bias(Data2VecVisionForImageClassification(config))


def _data2vec_vision_backbone():
    from transformers import Data2VecVisionConfig, Data2VecVisionModel

    return _random_bias(Data2VecVisionModel(Data2VecVisionConfig(**VISION, use_relative_position_bias=True)))


def _random_bias(model: nn.Module) -> nn.Module:
    """transformers initialises relative position biases to zero; trained ones are not, and the tests must see them."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("relative_position_bias_table"):
                parameter.copy_(torch.randn(parameter.shape, generator=generator))
    return model


@dataclass(frozen=True)
class Case:
    """One family as users meet it: how its tiny checkpoint is built and what the merged model should be."""

    family: str
    make: Callable[[], nn.Module]
    merged_class: str
    prefix: int
    classifier: bool = True
    # keyword arguments that make the model run at another image size (DINOv2 always interpolates)
    interpolate: dict = field(default_factory=lambda: {"interpolate_pos_encoding": True})
    task: str | None = None  # `convert --task`; None converts the checkpoint as its own class
    # prefix of every weight name in the checkpoint: vision towers saved by transformers < 5.6 (all of those on the
    # Hub) have `vision_model.`, which transformers 5.6+ strips on load; one made from a config here has none
    checkpoint_prefix: str = ""
    pooler: bool = True  # backbones: whether the model returns a pooler_output (ViTMSNModel and IJepaModel do not)
    dual: bool = False  # an image-text dual encoder (CLIPModel, SiglipModel): zero-shot classification
    tokenizer: Callable[[Path], object] | None = None  # builds the checkpoint's tokenizer (given a scratch folder)


BACKBONE, CLASSIFIER = "image-feature-extraction", "image-classification"
CASES = {
    "vit_backbone": Case("vit", _vit_backbone, "ViTPatchMergerModel", 1, classifier=False),
    "deit_distilled": Case("deit", _deit_distilled, "DeiTPatchMergerForImageClassificationWithTeacher", 2),
    "deit_backbone": Case("deit", _deit_backbone, "DeiTPatchMergerModel", 2, classifier=False),
    "vit_msn": Case("vit_msn", _vit_msn, "ViTMSNPatchMergerModel", 1, classifier=False, pooler=False),
    "vit_msn_classifier": Case("vit_msn", _vit_msn, "ViTMSNPatchMergerForImageClassification", 1, task=CLASSIFIER),
    "ijepa": Case("ijepa", _ijepa, "IJepaPatchMergerModel", 0, classifier=False, pooler=False),
    "ijepa_classifier": Case("ijepa", _ijepa_classifier, "IJepaPatchMergerForImageClassification", 0),
    "dinov2": Case("dinov2", _dinov2, "Dinov2PatchMergerModel", 1, classifier=False, interpolate={}),
    "dinov2_classifier": Case(
        "dinov2", _dinov2, "Dinov2PatchMergerForImageClassification", 1, interpolate={}, task=CLASSIFIER
    ),
    "dinov2_with_registers": Case(
        "dinov2_with_registers",
        _dinov2_registers,
        "Dinov2WithRegistersPatchMergerModel",
        1 + 4,
        classifier=False,
        interpolate={},
    ),
    "dinov2_with_registers_classifier": Case(
        "dinov2_with_registers",
        _dinov2_registers,
        "Dinov2WithRegistersPatchMergerForImageClassification",
        1 + 4,
        interpolate={},
        task=CLASSIFIER,
    ),
    "dinov3": Case("dinov3_vit", _dinov3, "DINOv3ViTPatchMergerModel", 1 + 4, classifier=False, interpolate={}),
    "beit": Case("beit", _beit, "BeitPatchMergerForImageClassification", 1),
    "beit_shared_bias": Case("beit", _beit_shared, "BeitPatchMergerModel", 1, classifier=False),
    "data2vec_vision": Case("data2vec_vision", _data2vec_vision, "Data2VecVisionPatchMergerForImageClassification", 1),
    "data2vec_vision_backbone": Case(
        "data2vec_vision",
        _data2vec_vision_backbone,
        "Data2VecVisionPatchMergerModel",
        1,
        classifier=False,
        pooler=False,
    ),
    "clip_dual": Case(
        "clip", _clip, "CLIPPatchMergerModel", 1, classifier=False, dual=True, tokenizer=lambda _: tiny_clip_tokenizer()
    ),
    "clip": Case("clip", _clip, "CLIPPatchMergerForImageClassification", 1, task=CLASSIFIER),
    "clip_tower": Case("clip_vision", _clip, "CLIPVisionPatchMergerModel", 1, classifier=False, task=BACKBONE),
    "clip_vision": Case(
        "clip_vision",
        _clip_vision,
        "CLIPVisionPatchMergerModel",
        1,
        classifier=False,
        checkpoint_prefix="vision_model.",
    ),
    "siglip_dual": Case(
        "siglip", _siglip, "SiglipPatchMergerModel", 0, classifier=False, dual=True, tokenizer=tiny_siglip_tokenizer
    ),
    "siglip": Case("siglip", _siglip, "SiglipPatchMergerForImageClassification", 0, task=CLASSIFIER),
    "siglip_tower": Case("siglip_vision", _siglip, "SiglipVisionPatchMergerModel", 0, classifier=False, task=BACKBONE),
    "siglip_vision": Case(
        "siglip_vision",
        _siglip_vision,
        "SiglipVisionPatchMergerModel",
        0,
        classifier=False,
        checkpoint_prefix="vision_model.",
    ),
}


@dataclass
class Converted:
    case: Case
    source: Path
    output: Path
    result: object  # ConvertResult


def outputs(model: nn.Module, pixels: torch.Tensor, **kwargs) -> dict[str, torch.Tensor]:
    """The outputs users read: logits for classifiers, last hidden state and pooler output (where the backbone has
    one) for backbones; a dual encoder's normalised image embeddings and its image-text logits (`INPUT_IDS`)."""
    if hasattr(model, "get_text_features"):
        with torch.no_grad():
            full = model(input_ids=INPUT_IDS, pixel_values=pixels, **kwargs)
        return {"image_embeds": full.image_embeds, "logits_per_image": full.logits_per_image}
    with torch.no_grad():
        out = model(pixel_values=pixels, **kwargs)
    keys = ("logits",) if "logits" in out else ("last_hidden_state", "pooler_output")
    return {key: out[key] for key in keys if out.get(key) is not None}


def layers_of(model: nn.Module) -> nn.ModuleList:
    from retrofit.surgery import encoder_layers

    return encoder_layers(model)[1]


def tokens_seen(model: nn.Module, pixels: torch.Tensor, **kwargs) -> list[int]:
    """How many tokens each encoder layer outputs (= works on) for `pixels`."""
    seen: list[int] = []

    def record(module: nn.Module, inputs, output) -> None:  # some families' layers return a tuple
        seen.append((output[0] if isinstance(output, tuple) else output).shape[1])

    hooks = [layer.register_forward_hook(record) for layer in layers_of(model)]
    try:
        outputs(model, pixels, **kwargs)
    finally:
        for hook in hooks:
            hook.remove()
    return seen


PIXELS = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
PIXELS_48 = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> dict[str, Converted]:
    """Each case saved as a checkpoint and converted with an export, as `retrofit convert` does."""
    root = tmp_path_factory.mktemp("families")
    made = {}
    for seed, (name, case) in enumerate(CASES.items()):
        torch.manual_seed(seed)
        source = save_tiny(case.make(), root / name)
        if case.tokenizer is not None:
            case.tokenizer(root / f"{name}-spm").save_pretrained(source)
        if case.checkpoint_prefix:
            weights = load_file(source / "model.safetensors")
            save_file(
                {case.checkpoint_prefix + key: value for key, value in weights.items()}, source / "model.safetensors"
            )
        output = root / f"{name}-pm"
        result = convert(source, after_layer=K, num_tokens=M, output=output, task=case.task, log=lambda _: None)
        result.model.eval()
        made[name] = Converted(case, source, root / f"{name}-pm", result)
    return made


RELOAD_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    REGISTERED = sys.argv[3:] == ["registered"]  # retrofit's classes registered, no trust_remote_code
    if REGISTERED:
        import retrofit
        retrofit.register_auto_classes()
        TRUST = {}
    else:
        TRUST = {"trust_remote_code": True}
        try:
            import retrofit
        except ImportError:
            pass
        else:
            raise SystemExit("retrofit was importable")
    from PIL import Image
    import transformers
    from transformers import AutoModel, AutoModelForImageClassification, AutoModelForZeroShotImageClassification
    from transformers import pipeline

    results = {}
    def reload(case):
        auto = AutoModelForImageClassification if case["classifier"] else AutoModel
        if case["dual"]:
            auto = AutoModelForZeroShotImageClassification
        model = auto.from_pretrained(case["output"], **TRUST).eval()
        data = torch.load(case["data"])
        got = {"class": type(model).__name__, "diff": {}}
        with torch.no_grad():
            for size, kwargs in (("32", {}), ("48", case["interpolate"])):
                out = model(pixel_values=data["pixels" + size], **kwargs)
                if case["dual"]:  # images alone give their embeddings; with text, the image-text logits
                    full = model(input_ids=data["input_ids"], pixel_values=data["pixels" + size], **kwargs)
                    out = {"image_embeds": out.image_embeds, "logits_per_image": full.logits_per_image}
                for key, expected in data["expected" + size].items():
                    got["diff"][f"{key}@{size}"] = (out[key] - expected).abs().max().item()
        if case["probe"]:  # a backbone's or dual encoder's export loads as its family's classifier, a new head
            probe = AutoModelForImageClassification.from_pretrained(case["output"], num_labels=5, **TRUST).eval()
            with torch.no_grad():
                tower = model.vision_model if case["dual"] else model
                ours = probe.vision_model if case["dual"] else probe.base_model
                hidden = tower(pixel_values=data["pixels32"]).last_hidden_state
                logits = probe(pixel_values=data["pixels32"]).logits
                diff = (ours(pixel_values=data["pixels32"]).last_hidden_state - hidden).abs().max().item()
            got["probe"] = {"class": type(probe).__name__, "logits": list(logits.shape), "diff": diff}
        image = Image.new("RGB", (40, 30), (200, 40, 40))
        if case["dual"]:
            classify = pipeline("zero-shot-image-classification", model=case["output"], **TRUST)
            got["pipeline"] = classify(image, candidate_labels=["cat", "dog", "ankle boot"])
            got["base_class"] = type(AutoModel.from_pretrained(case["output"], **TRUST)).__name__
            return got
        if case["classifier"]:
            classify = pipeline("image-classification", model=case["output"], **TRUST)
            got["pipeline"] = classify(image)
        if case["base"]:  # a classifier's export loads as its family's backbone too, as its source does
            base = AutoModel.from_pretrained(case["output"], **TRUST).eval()
            got["base_class"] = type(base).__name__
            with torch.no_grad():
                hidden = base(pixel_values=data["pixels32"]).last_hidden_state
            got["base_diff"] = (hidden - data["base_hidden32"]).abs().max().item()
            extract = pipeline("image-feature-extraction", model=case["output"], **TRUST)
            got["pipeline_tokens"] = len(extract(image)[0])
        elif not case["classifier"]:  # the model card's example for backbones: one vector per output token
            extract = pipeline("image-feature-extraction", model=case["output"], **TRUST)
            got["pipeline_tokens"] = len(extract(image)[0])
        return got

    for case in json.load(open(sys.argv[1])):
        try:
            results[case["name"]] = reload(case)
        except Exception as error:  # reported per case by the test
            results[case["name"]] = {"error": f"{type(error).__name__}: {error}"}
    remote = sorted(name for name in sys.modules if name.startswith("transformers_modules"))
    json.dump({"transformers": transformers.__version__, "cases": results, "remote_code_modules": remote},
              open(sys.argv[2], "w"))
""")


# `make test` (Makefile `oldest`) builds a Python whose transformers is the oldest release exports support, and next
# to it `pip --target` folders of later releases whose layouts differ again (transformers-5.8.0, ...), run with it.
OLDEST_PYTHON = os.environ.get("RETROFIT_OLDEST_PYTHON") and os.path.abspath(os.environ["RETROFIT_OLDEST_PYTHON"])
OVERLAYS = {Path(p).name: Path(p) for p in os.environ.get("RETROFIT_TRANSFORMERS_OVERLAYS", "").split(os.pathsep) if p}


def _base_class(item: Converted) -> str | None:
    """The merged backbone class `AutoModel` loads a classifier's export as (None: backbones, CLIP/SigLIP)."""
    family = FAMILIES[item.case.family]
    backbones = [head for head in family.heads.values() if head.pipeline_tag == "image-feature-extraction"]
    if not item.case.classifier or not backbones:
        return None
    return item.case.merged_class.split("For")[0] + "Model"


def _probe_class(item: Converted) -> str | None:
    """The classifier a backbone's or dual encoder's export loads as (`hub_code.classifier_head`), as its source does
    with ``AutoModelForImageClassification.from_pretrained(source, num_labels=...)``; None for a classifier or a family
    without one (CLIP's and SigLIP's vision towers, DINOv3)."""
    family, head = family_and_head(item.result.model.config)
    probe = classifier_head(family, head)
    return None if probe is None else family.display_name + "PatchMerger" + probe.class_name[len(family.display_name) :]


@pytest.fixture(scope="module", params=["registered", "installed", "oldest", *OVERLAYS])
def reloaded(request, converted, tmp_path_factory) -> dict:
    """Every export loaded with Auto classes + trust_remote_code in ONE fresh process where `import retrofit` fails,
    with the installed transformers, the oldest release the exported code supports, and releases in between; and
    ("registered") in one where retrofit registered its classes, without trust_remote_code."""
    python, path = sys.executable, []
    if request.param not in ("installed", "registered"):
        if not OLDEST_PYTHON:
            pytest.skip("RETROFIT_OLDEST_PYTHON is not set (`make test` sets it)")
        python, path = OLDEST_PYTHON, [str(OVERLAYS[request.param])] if request.param in OVERLAYS else []
    root = tmp_path_factory.mktemp("reload")
    manifest = []
    for name, item in converted.items():
        model = item.result.model
        data = {
            "pixels32": PIXELS,
            "pixels48": PIXELS_48,
            "expected32": outputs(model, PIXELS),
            "expected48": outputs(model, PIXELS_48, **item.case.interpolate),
        }
        base = _base_class(item)
        if base:
            with torch.no_grad():
                data["base_hidden32"] = model.base_model(pixel_values=PIXELS).last_hidden_state
        if item.case.dual:
            data["input_ids"] = INPUT_IDS
        torch.save(data, root / f"{name}.pt")
        manifest.append(
            {
                "name": name,
                "output": str(item.output),
                "data": str(root / f"{name}.pt"),
                "classifier": item.case.classifier,
                "dual": item.case.dual,
                "interpolate": item.case.interpolate,
                "base": base,
                "probe": _probe_class(item),
            }
        )
    (root / "manifest.json").write_text(json.dumps(manifest))
    (root / "blocker").mkdir()
    (root / "blocker" / "retrofit.py").write_text("raise ImportError('retrofit must not be needed')\n")
    blocker = [] if request.param == "registered" else [str(root / "blocker")]
    python_path = os.pathsep.join([*blocker, *path])
    env = {**os.environ, "PYTHONPATH": python_path, "HF_MODULES_CACHE": str(root / "modules")}
    env |= {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    mode = ["registered"] if request.param == "registered" else []
    command = [python, "-c", RELOAD_SCRIPT, str(root / "manifest.json"), str(root / "results.json"), *mode]
    run = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads((root / "results.json").read_text())


def test_every_supported_class_has_a_case(converted):
    """Every (family, class) retrofit converts is built here, except the two tests/test_convert.py covers and
    SigLIP 2's, whose NaFlex inputs tests/test_siglip2.py feeds."""
    tested = {
        (item.case.family, family_and_head(item.result.model.config)[1].class_name) for item in converted.values()
    }
    tested |= {("vit", "ViTForImageClassification"), ("deit", "DeiTForImageClassification")}
    tested |= {("siglip2", "Siglip2Model"), ("siglip2", "Siglip2ForImageClassification")}  # NaFlex: test_siglip2.py
    tested |= {("siglip2_vision", "Siglip2VisionModel")}
    supported = {(name, cls) for name, family in FAMILIES.items() if family.refusal is None for cls in family.heads}
    assert tested == supported


def test_reloads_ran_with_the_transformers_they_name(request, reloaded):
    import transformers

    param = request.node.callspec.params["reloaded"]
    installed = transformers.__version__
    expected = {"installed": installed, "registered": installed, "oldest": OLDEST_TRANSFORMERS}.get(param)
    assert reloaded["transformers"] == (expected or param.removeprefix("transformers-"))
    # with retrofit's classes registered, no file of any export is imported; with trust_remote_code, each family's is
    assert (reloaded["remote_code_modules"] == []) == (param == "registered")


SAVED_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    from transformers import AutoModel, AutoModelForImageClassification, AutoModelForZeroShotImageClassification

    AUTO = {"classifier": AutoModelForImageClassification, "backbone": AutoModel,
            "dual": AutoModelForZeroShotImageClassification}
    results = {}
    for folder, kind, key in json.load(open(sys.argv[1])):  # in this order, in one process
        model = AUTO[kind].from_pretrained(folder, trust_remote_code=True).eval()
        diff = None
        if key is not None:
            data = torch.load(folder + ".pt")
            with torch.no_grad():
                diff = (model(pixel_values=data["pixels"])[key] - data["expected"]).abs().max().item()
        results[folder] = [type(model).__name__, diff]
    json.dump(results, open(sys.argv[2], "w"))
""")
SAVED_KINDS = {"vit_backbone": ("backbone", "last_hidden_state"), "deit_distilled": ("classifier", "logits"),
               "clip_dual": ("dual", "image_embeds")}  # fmt: skip


def test_a_model_saved_after_a_registered_load_or_from_convert_loads_without_retrofit(converted, tmp_path):
    """``save_pretrained`` (so Trainer and ``push_to_hub``) of a model made of retrofit's classes, loaded after
    `register_auto_classes` (in a process of its own: registering changes what every later load in a process gets)
    or returned by `convert`, writes their code files and ``auto_map`` as it does for a model loaded with
    ``trust_remote_code``; the folder loads where retrofit is not installed. Two exports of one family in folders of
    the same name (``runs/*/export``), loaded in one process, each load as their own class."""
    import shutil

    save_registered = textwrap.dedent("""
        import json, sys
        import retrofit
        from transformers import AutoModel, AutoModelForImageClassification, AutoModelForZeroShotImageClassification

        retrofit.register_auto_classes()
        AUTO = {"classifier": AutoModelForImageClassification, "backbone": AutoModel,
                "dual": AutoModelForZeroShotImageClassification}
        for export, kind, folder in json.load(open(sys.argv[1])):
            AUTO[kind].from_pretrained(export).save_pretrained(folder)
    """)
    jobs = [[str(converted[name].output), kind, str(tmp_path / "registered" / name)]
            for name, (kind, _) in SAVED_KINDS.items()]  # fmt: skip
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    run = subprocess.run([sys.executable, "-c", save_registered, str(tmp_path / "jobs.json")], env=env,
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    manifest = []
    for name, (kind, key) in SAVED_KINDS.items():
        item = converted[name]
        stem = f"{item.case.family}_patch_merger"
        item.result.model.save_pretrained(tmp_path / "convert" / name)
        for how in ("registered", "convert"):
            folder = tmp_path / how / name
            code = sorted(path.name for path in folder.glob("*.py"))
            assert code == [f"configuration_{stem}.py", f"modeling_{stem}.py"], (how, name, code)
            # the configuration file names the model classes of the modeling file saved with it (a DeiT with teacher
            # loaded through the registered classes saved the configuration file of the DeiT classifier's code)
            named = re.search(r"Its model classes.*?:\s+(.*?)\.\n", (folder / code[0]).read_text(), re.S)[1]
            defined = re.findall(r"^class (\w+)\(", (folder / code[1]).read_text(), re.M)
            assert set(re.findall(r"\[`(\w+)`\]", named)) <= set(defined), (how, name, named)
            assert json.loads((folder / "config.json").read_text())["auto_map"] == item.result.model.config.auto_map
            with torch.no_grad():
                expected = item.result.model(pixel_values=PIXELS)[key]
            torch.save({"pixels": PIXELS, "expected": expected}, f"{folder}.pt")
            manifest.append([str(folder), kind, key])
    for parent, name, key in (("distilled", "deit_distilled", "logits"), ("probe", "deit_backbone", None)):
        folder = tmp_path / parent / "export"  # the same folder name, family and Auto class; other model classes
        shutil.copytree(converted[name].output, folder)
        with torch.no_grad():
            expected = converted[name].result.model(pixel_values=PIXELS).logits if key else None
        torch.save({"pixels": PIXELS, "expected": expected}, f"{folder}.pt")
        manifest.append([str(folder), "classifier", key])
    (tmp_path / "blocker").mkdir()
    (tmp_path / "blocker" / "retrofit.py").write_text("raise ImportError('retrofit must not be needed')\n")
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "blocker"), "HF_MODULES_CACHE": str(tmp_path / "modules")}
    env |= {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    command = [sys.executable, "-c", SAVED_SCRIPT, str(tmp_path / "manifest.json"), str(tmp_path / "results.json")]
    run = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    for folder, _, _ in manifest[:-2]:
        got = results[folder]
        assert got[0] == CASES[Path(folder).name].merged_class and got[1] <= 1e-5, (folder, got)
    distilled, probe = (results[folder] for folder, _, _ in manifest[-2:])
    assert distilled[0] == "DeiTPatchMergerForImageClassificationWithTeacher" and distilled[1] <= 1e-5, distilled
    assert probe[0] == "DeiTPatchMergerForImageClassification", probe


def test_exported_code_refuses_an_older_transformers_in_one_line(converted, monkeypatch):
    """transformers 4.x would fail inside the encoder; the exported config module says what to do instead."""
    import transformers

    code = (converted["vit_backbone"].output / "configuration_vit_patch_merger.py").read_text()
    monkeypatch.setattr(transformers, "__version__", "4.57.1")
    with pytest.raises(ImportError, match=r"^this model needs transformers>=5\.0\.0, found 4\.57\.1: pip install -U"):
        exec(compile(code, "configuration_vit_patch_merger.py", "exec"), {})


@pytest.mark.parametrize("name", CASES)
def test_export_reloads_without_retrofit_with_equal_outputs(name, converted, reloaded):
    got, case = reloaded["cases"][name], CASES[name]
    assert "error" not in got, got["error"]
    assert got["class"] == case.merged_class
    keys = ["logits"] if case.classifier else ["last_hidden_state", "pooler_output"]
    if not case.pooler:
        keys.remove("pooler_output")
    if case.dual:
        keys = ["image_embeds", "logits_per_image"]
    assert set(got["diff"]) == {f"{key}@{size}" for key in keys for size in ("32", "48")}
    assert max(got["diff"].values()) <= 1e-5, got["diff"]
    if case.classifier:
        labels = {p["label"] for p in got["pipeline"]}
        assert labels <= {"cat", "dog", "bird"} and len(got["pipeline"]) == 3, got["pipeline"]
    probe = _probe_class(converted[name])
    if probe:  # a linear probe on the merged backbone: its tokens are the export's, the classifier is new
        assert got["probe"]["class"] == probe and got["probe"]["logits"] == [2, 5], got["probe"]
        assert got["probe"]["diff"] <= 1e-5, got["probe"]
    else:
        assert "probe" not in got
    if case.dual:  # the zero-shot pipeline ranks the candidate labels; AutoModel loads the same class
        assert sorted(p["label"] for p in got["pipeline"]) == ["ankle boot", "cat", "dog"], got["pipeline"]
        assert abs(sum(p["score"] for p in got["pipeline"]) - 1) < 1e-4 or "siglip" in name, got["pipeline"]
        assert got["base_class"] == case.merged_class
        return
    base = _base_class(converted[name])
    if base:  # AutoModel and the feature-extraction pipeline on a classifier's export, as on its source
        assert got["base_class"] == base and got["base_diff"] <= 1e-5, got
    if base or not case.classifier:
        assert got["pipeline_tokens"] == case.prefix + M


@pytest.mark.parametrize("name", CASES)
def test_export_keeps_the_source_checkpoints_weight_names(name, converted):
    """transformers renames old checkpoint weights on load and names them back on save; the export does the same,
    so its weights have the source checkpoint's names (plus the merger's, next to layer K's) and transformers
    releases from before a renaming load it too."""
    item = converted[name]
    source = set(load_file(item.source / "model.safetensors"))
    export = set(load_file(item.output / "model.safetensors"))
    prefix = item.result.model.base_model_prefix + "."  # a classifier made from a backbone adds it
    merger = {key for key in export if ".patch_merger." in key}
    assert {key.split(".patch_merger.")[1] for key in merger} == {"norm.weight", "norm.bias", "queries"}
    (layer_k,) = {key.split(".patch_merger.")[0] + "." for key in merger}
    assert any(key.startswith((layer_k, layer_k.removeprefix(prefix))) for key in source), layer_k
    # a classifier made from a backbone or from a full CLIP/SigLIP checkpoint has a new head
    new_head = {key for key in export if key.startswith("classifier.") and key not in source}
    renamed = {
        key for key in export - merger - new_head if key not in source and key.removeprefix(prefix) not in source
    }
    assert not renamed, sorted(renamed)[:5]


@pytest.mark.parametrize("name", CASES)
def test_export_files(name, converted):
    item = converted[name]
    family = FAMILIES[item.case.family]
    config = json.loads((item.output / "config.json").read_text())
    stem = f"{family.name}_patch_merger"
    assert config["model_type"] == stem
    assert config["architectures"] == [item.case.merged_class]
    assert config["merge_num_prefix_tokens"] == item.case.prefix
    head = family_and_head(item.result.model.config)[1]
    assert head.is_classifier == item.case.classifier
    auto = "AutoModelForImageClassification" if item.case.classifier else "AutoModel"
    base = {"AutoModel": f"modeling_{stem}.{_base_class(item)}"} if _base_class(item) else {}
    if item.case.dual:  # the zero-shot pipeline's Auto class, and AutoModel, as for the source checkpoint
        auto = "AutoModelForZeroShotImageClassification"
        base = {"AutoModel": f"modeling_{stem}.{item.case.merged_class}"}
    probe = {"AutoModelForImageClassification": f"modeling_{stem}.{_probe_class(item)}"} if _probe_class(item) else {}
    assert config["auto_map"] == {
        "AutoConfig": f"configuration_{stem}.{family.display_name}PatchMergerConfig",
        auto: f"modeling_{stem}.{item.case.merged_class}",
        **base,
        **probe,
    }
    tokenizer = {"clip": {"tokenizer.json", "tokenizer_config.json"}}
    tokenizer["siglip"] = {"spiece.model", "tokenizer_config.json"}

    assert {path.name for path in item.output.iterdir()} == {
        "config.json", "model.safetensors", "preprocessor_config.json", "README.md", f"configuration_{stem}.py",
        f"modeling_{stem}.py", *(tokenizer[family.name] if item.case.dual else ()),
    }  # fmt: skip
    card = (item.output / "README.md").read_text()  # says what the export also loads as
    probe_line = f'`AutoModelForImageClassification.from_pretrained("{item.output.name}", num_labels=...)` loads it as'
    assert (probe_line in card) == bool(_probe_class(item))
    code = (item.output / f"modeling_{stem}.py").read_text()
    assert "import retrofit" not in code and "from retrofit" not in code
    assert f"from {family.modeling_module} import (\n    {family.layer_class},\n" in code
    assert max(len(line) for line in code.splitlines()) <= 120


@pytest.mark.parametrize("name", CASES)
def test_prefix_tokens_bypass_the_merger(name, converted):
    model = converted[name].result.model
    prefix = CASES[name].prefix
    merger = model.patch_merger
    assert merger.num_prefix_tokens == prefix == model.config.merge_num_prefix_tokens
    seen = {}
    # the families that read the merge weights (BEiT's bias, DINOv3's RoPE) call it with return_weights=True
    hook = merger.register_forward_hook(
        lambda _m, args, out: seen.update(input=args[0], output=out[0] if isinstance(out, tuple) else out)
    )
    try:
        outputs(model, PIXELS)
    finally:
        hook.remove()
    assert seen["input"].shape[1] == prefix + 16 and seen["output"].shape[1] == prefix + M
    assert torch.equal(seen["output"][:, :prefix], seen["input"][:, :prefix])


@pytest.mark.parametrize("name", CASES)
def test_other_image_sizes_keep_m_tokens(name, converted):
    """N follows the image size (16 patches at 32x32, 36 at 48x48); the layers after the merge always see P + M."""
    model, case = converted[name].result.model, CASES[name]
    for pixels, patches in ((PIXELS, 16), (PIXELS_48, 36)):
        seen = tokens_seen(model, pixels, **case.interpolate)
        assert seen == [case.prefix + patches] * K + [case.prefix + M] * (LAYERS - K)
        assert seen == model_cost(model.config, image_size=pixels.shape[-1]).tokens_per_layer


def test_hidden_states_and_attentions_are_what_the_exported_code_says(converted):
    """``output_hidden_states`` / ``output_attentions`` (eager) as the exported module's docstring describes them, for
    every case: L + 1 hidden states, those up to layer K with P + N tokens and the rest with P + M; L attention maps,
    those of layers K.. over P + M tokens; ``return_dict=False`` gives the same tensors in the output's order."""
    import inspect

    asked = {"output_hidden_states": True, "output_attentions": True}
    for name, item in converted.items():
        case = item.case  # eager set at load: BEiT-like models pick their attention classes when built
        model = type(item.result.model).from_pretrained(item.output, attn_implementation="eager").eval()
        doc = inspect.getmodule(type(model)).__doc__
        assert "`output_hidden_states=True` returns L + 1 hidden states" in doc, name
        text = {"input_ids": INPUT_IDS} if case.dual else {}
        with torch.no_grad():
            out = model(pixel_values=PIXELS, **text, **asked)
            as_tuple = model(pixel_values=PIXELS, **text, **asked, return_dict=False)
        vision = out.vision_model_output if case.dual else out
        tokens = [case.prefix + 16] * (K + 1) + [case.prefix + M] * (LAYERS - K)
        assert [hidden.shape[1] for hidden in vision.hidden_states] == tokens, name
        assert [tuple(a.shape[-2:]) for a in vision.attentions] == [(n, n) for n in tokens[1:]], name
        expected, got = _tensors(out), _tensors(as_tuple)
        assert len(got) == len(expected) and all(map(torch.equal, got, expected)), name


def _tensors(output) -> list[torch.Tensor]:
    """The tensors of a model output or its tuple, nested outputs (hidden states, a tower's output) in order."""
    if torch.is_tensor(output):
        return [output]
    parts = output.to_tuple() if hasattr(output, "to_tuple") else output
    return [tensor for part in parts for tensor in _tensors(part)]


@pytest.mark.parametrize("name", CASES)
def test_cost_counts_tokens_and_macs(name, converted):
    """Tokens per layer count the family's prefix tokens; per-layer MACs match the layer's actual matrices."""
    item, prefix = converted[name], CASES[name].prefix
    before, after = item.result.before, item.result.after
    assert before.tokens_per_layer == [prefix + 16] * LAYERS
    assert after.tokens_per_layer == [prefix + 16] * K + [prefix + M] * (LAYERS - K)
    assert after.gflops < before.gflops
    config = item.result.model.config
    lc = layer_config(config, family_and_head(config)[1])
    linear = sum(m.in_features * m.out_features for m in layers_of(item.result.model)[0].modules()
                 if isinstance(m, nn.Linear))  # fmt: skip
    tokens, width = prefix + 16, FAMILIES[CASES[name].family].mlp_width(lc)
    assert layer_macs(tokens, lc.hidden_size, width) == tokens * linear + 2 * tokens**2 * lc.hidden_size


def test_dinov2_swiglu_cost_matches_its_matrices():
    from transformers import Dinov2Config
    from transformers.models.dinov2.modeling_dinov2 import Dinov2Layer

    config = Dinov2Config(**DINO, use_swiglu_ffn=True)
    linear = sum(m.in_features * m.out_features for m in Dinov2Layer(config).modules() if isinstance(m, nn.Linear))
    assert layer_macs(1, 32, FAMILIES["dinov2"].mlp_width(config)) == linear + 2 * 32


def test_cost_of_an_oblong_image_and_the_ratio_printed_are_counted_here_again():
    """`model_cost` of a 32x64 image (4 x 8 patches) with a merge, against the count of the module docstring written
    out here; `compare` prints before / after (how many times fewer) and the merger's GFLOPs."""
    from transformers import ViTConfig

    from retrofit.cost import compare

    config = ViTConfig(**TINY)  # D 32, I 64, 3 channels, 8x8 patches, 4 layers, one CLS token
    n, d, i, k, m = 4 * 8, 32, 64, 1, 5

    def layer(t: int) -> int:
        return t * d * d * 4 + t * d * i * 2 + t * t * d * 2

    embed = n * d * 3 * 8 * 8
    before, after = model_cost(config, (32, 64)), model_cost(config, (32, 64), merge=(k, m))
    assert before.tokens_per_layer == [1 + n] * 4 and after.tokens_per_layer == [1 + n] + [1 + m] * 3
    assert before.macs == embed + 4 * layer(1 + n) and before.gflops == 2 * before.macs / 1e9
    assert after.merger_macs == 2 * n * m * d and after.macs == embed + layer(1 + n) + 3 * layer(1 + m) + 2 * n * m * d
    assert model_cost(config, [64, 32]) == model_cost(config, (64, 32)) == before
    table = compare(before, after)  # the merger's share in GFLOPs too: 2 FLOPs a MAC, as the totals
    assert f"({before.macs / after.macs:.3f}x fewer; merger {2 * 2 * n * m * d / 1e9:.2g})" in table


def test_siglip_pooling_head_cost_is_what_a_flop_counter_counts():
    """`pooling_head_macs`, exactly, against torch's FlopCounterMode on SigLIP's attention pooling head alone (the
    whole-model test compares within 1 %, where a term of D² is lost)."""
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import SiglipVisionConfig
    from transformers.models.siglip.modeling_siglip import SiglipMultiheadAttentionPoolingHead

    from retrofit.cost import pooling_head_macs

    config = SiglipVisionConfig(**VISION)
    head = SiglipMultiheadAttentionPoolingHead(config).eval()
    for tokens in (5, 17):
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            head(torch.randn(1, tokens, config.hidden_size))
        macs = pooling_head_macs(tokens, config.hidden_size, config.intermediate_size)
        assert 2 * macs == counter.get_total_flops(), tokens


DINOV3_PROCESSOR = {  # as published with the DINOv3 checkpoints: a torchvision-only processor
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.485, 0.456, 0.406],
    "image_processor_type": "DINOv3ViTImageProcessorFast",
    "image_std": [0.229, 0.224, 0.225],
    "resample": 2,
    "rescale_factor": 1 / 255,
    "size": {"height": 32, "width": 32},
}


def test_a_torchvision_only_processor_is_stood_in_for_and_exported_as_it_was(converted, tmp_path, capsys):
    """Without torchvision, DINOv3's processor cannot load: a PIL processor with its settings prepares the images
    (one warning line) and the export keeps the source's processor config, for users who have torchvision, less its
    pointer to custom code (a second warning line)."""
    import importlib.util

    from PIL import Image

    from retrofit.loading import load_config, load_image_processor

    if importlib.util.find_spec("torchvision") is not None:
        pytest.skip("torchvision is installed: DINOv3's own processor loads")
    source = tmp_path / "dinov3"
    source.mkdir()
    for file in ("config.json", "model.safetensors"):
        (source / file).write_bytes((converted["dinov3"].source / file).read_bytes())
    # with a pointer to code elsewhere, which the export must not keep (it has not that code)
    (source / "preprocessor_config.json").write_text(json.dumps({**DINOV3_PROCESSOR, "auto_map": {"A": "x.Y"}}))
    out = tmp_path / "out"
    assert main(["convert", str(source), "--after-layer", "2", "--tokens", "3", "--output", str(out)]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert warnings == [
        f"warning: '{source}' uses DINOv3ViTImageProcessorFast, which needs torchvision (not installed); preparing "
        "images with a PIL ViT processor with the same settings (pip install torchvision for the original)",
        f"warning: '{source}''s image processor names custom code ({{'A': 'x.Y'}}); retrofit uses transformers' "
        "ViTImageProcessorPil and exports do not name that code",
    ]
    assert json.loads((out / "preprocessor_config.json").read_text()) == DINOV3_PROCESSOR
    processor = load_image_processor(out, load_config(out), log=lambda _: None)
    pixels = processor(Image.new("RGB", (40, 30), (200, 40, 40)), return_tensors="pt").pixel_values
    mean, std = torch.tensor(DINOV3_PROCESSOR["image_mean"]), torch.tensor(DINOV3_PROCESSOR["image_std"])
    expected = (torch.tensor([200, 40, 40]) / 255 - mean) / std
    assert pixels.shape == (1, 3, 32, 32)
    torch.testing.assert_close(pixels[0], expected[:, None, None].expand(3, 32, 32))


# ---------------------------------------------------------------- what each head reads after the merge


def test_deit_distilled_heads_still_average(converted):
    model = converted["deit_distilled"].result.model
    with torch.no_grad():
        out = model(pixel_values=PIXELS)
        hidden = model.deit(pixel_values=PIXELS).last_hidden_state
    assert hidden.shape[1] == 2 + M
    assert torch.allclose(out.cls_logits, model.cls_classifier(hidden[:, 0]), atol=1e-6)
    assert torch.allclose(out.distillation_logits, model.distillation_classifier(hidden[:, 1]), atol=1e-6)
    assert torch.allclose(out.logits, (out.cls_logits + out.distillation_logits) / 2, atol=1e-6)


@pytest.mark.parametrize(
    "name, base", [("dinov2_classifier", "dinov2"), ("dinov2_with_registers_classifier", "dinov2_with_registers")]
)
def test_dinov2_head_reads_cls_and_mean_of_merged_tokens(name, base, converted):
    model = converted[name].result.model
    prefix = CASES[name].prefix
    with torch.no_grad():
        hidden = getattr(model, base)(pixel_values=PIXELS).last_hidden_state
        logits = model(pixel_values=PIXELS).logits
    assert hidden.shape[1] == prefix + M  # the classifier's slice [:, 1 + num_register_tokens:] is the M merged tokens
    expected = model.classifier(torch.cat([hidden[:, 0], hidden[:, prefix:].mean(dim=1)], dim=1))
    assert torch.allclose(logits, expected, atol=1e-6)


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_clip_siglip_classifiers_read_mean_of_merged_tokens(name, converted):
    model = converted[name].result.model
    prefix = CASES[name].prefix
    with torch.no_grad():
        hidden = model.vision_model(pixel_values=PIXELS).last_hidden_state
        logits = model(pixel_values=PIXELS).logits
    assert hidden.shape[1] == prefix + M
    assert torch.allclose(logits, model.classifier(hidden[:, prefix:].mean(dim=1)), atol=1e-6)


def test_clip_vision_pooler_is_cls(converted):
    model = converted["clip_vision"].result.model
    with torch.no_grad():
        out = model(pixel_values=PIXELS)
    assert out.last_hidden_state.shape[1] == 1 + M
    assert torch.allclose(out.pooler_output, model.post_layernorm(out.last_hidden_state[:, 0]), atol=1e-6)


def test_siglip_vision_attention_pooling_reads_merged_tokens(converted):
    model = converted["siglip_vision"].result.model
    with torch.no_grad():
        out = model(pixel_values=PIXELS)
    assert out.last_hidden_state.shape[1] == M  # no prefix token: everything was merged
    assert torch.allclose(out.pooler_output, model.head(out.last_hidden_state), atol=1e-6)


@pytest.mark.parametrize("name", ["clip_dual", "siglip_dual"])
def test_full_model_checkpoint_stays_a_dual_encoder(name, converted):
    """By default a full CLIPModel/SiglipModel stays one: every source weight (text tower, projections, logit scale
    and bias) bit-exact in the export, the merger's added; the text embeddings are the source's."""
    from retrofit.loading import load_model
    from retrofit.zero_shot import text_embeddings

    item = converted[name]
    source, merged = load_file(item.source / "model.safetensors"), load_file(item.output / "model.safetensors")
    assert {key for key in merged if ".patch_merger." not in key} == set(source)
    assert all(torch.equal(merged[key], value) for key, value in source.items())
    assert any(key.startswith("text_model.") for key in merged) and "logit_scale" in merged
    tokenizer = __import__("transformers").AutoTokenizer.from_pretrained(item.output)
    texts = ["a photo of a cat.", "a dog"]
    expected = text_embeddings(load_model(item.source).eval(), tokenizer, texts)
    torch.testing.assert_close(text_embeddings(item.result.model, tokenizer, texts), expected, rtol=0, atol=0)


@pytest.mark.parametrize(
    "name, base",
    [("clip", "CLIPModel"), ("siglip", "SiglipModel"), ("clip_tower", "CLIPModel"), ("siglip_tower", "SiglipModel")],
)
def test_full_model_checkpoint_keeps_only_the_vision_tower(name, base, converted):
    """With --task image-classification a full CLIPModel/SiglipModel converts to the classifier (new head), with
    --task image-feature-extraction to its vision tower alone: vision weights bit-exact, text tower dropped."""
    item = converted[name]
    assert json.loads((item.source / "config.json").read_text())["architectures"] == [base]
    source, merged = load_file(item.source / "model.safetensors"), load_file(item.output / "model.safetensors")
    vision = {key: value for key, value in source.items() if key.startswith("vision_model.")}
    assert vision and all(torch.equal(merged[key], value) for key, value in vision.items())
    assert not any(key.startswith("text_model.") for key in merged)
    new = {key for key in set(merged) - set(vision) if ".patch_merger." not in key}
    assert new == ({"classifier.weight", "classifier.bias"} if CASES[name].classifier else set())


# ---------------------------------------------------------------- fine-tuning


@pytest.mark.parametrize("name", CASES)
def test_a_few_finetune_steps_train_the_merger(name, converted):
    torch.manual_seed(0)
    model = copy.deepcopy(converted[name].result.model).train()
    read = HeadReader(model, features=False)
    pixels = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    probe = None  # backbones: a linear probe on the features their users read
    if not CASES[name].classifier:
        with torch.no_grad():
            probe = nn.Linear(read(model, pixels).features.shape[-1], 3)
    params = list(model.parameters()) + (list(probe.parameters()) if probe else [])
    optimizer = torch.optim.AdamW(params, lr=3e-3)
    losses = []
    for step in range(4):
        out = read(model, pixels)
        logits = out.logits if probe is None else probe(out.features)
        loss = nn.functional.cross_entropy(logits, labels)
        optimizer.zero_grad()
        loss.backward()
        if step == 0:
            grads = [p.grad for p in model.patch_merger.parameters()]
            assert all(g is not None and g.abs().sum() > 0 for g in grads)
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses


@pytest.mark.parametrize("name", CASES)
def test_feature_distillation_reads_what_the_head_reads(name, converted):
    """`--feature-weight` compares the features the head reads: a classifier's layer(s) applied to them give the
    logits (DeiT's two heads averaged); a backbone's are its pooled output. Recorded without a second forward."""
    model = copy.deepcopy(converted[name].result.model).eval()
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    read = HeadReader(model, features=True)
    with torch.no_grad():
        got = read(model, pixels)
        model(pixel_values=pixels)  # a plain forward (evaluation, the teacher's logits) records nothing
        head = family_and_head(model.config)[1]
        assert len(read._recorded) == (len(head.classifiers) if CASES[name].classifier else 0)
        read.close()
        assert not any(module._forward_pre_hooks for module in model.modules())
        if CASES[name].dual:  # its normalised image embeddings, as its forward gives them
            assert got.logits is None
            torch.testing.assert_close(got.features, model(pixel_values=pixels).image_embeds)
            torch.testing.assert_close(got.features.norm(dim=-1), torch.ones(3))
        elif CASES[name].classifier:
            classifiers = [model.get_submodule(n) for n in head.classifiers]
            parts = got.features.split([c.in_features for c in classifiers], dim=-1)
            heads = torch.stack([c(part) for c, part in zip(classifiers, parts, strict=True)]).mean(0)
            torch.testing.assert_close(heads, got.logits)
        else:
            assert got.logits is None
            # what these backbones' users read: DINOv2's linear-probe features; the mean where there is no CLS or pooler
            kinds = {"Dinov2Model": "cls+mean", "Dinov2WithRegistersModel": "cls+mean", "IJepaModel": "mean",
                     "Data2VecVisionModel": "mean", "ViTModel": "cls"}  # fmt: skip
            assert head.features == kinds.get(head.class_name, head.features), head.class_name
            out, prefix = model(pixel_values=pixels), CASES[name].prefix
            hidden = out.last_hidden_state
            expected = {
                "pooler": out.get("pooler_output"),
                "cls": hidden[:, 0],
                "cls+mean": torch.cat([hidden[:, 0], hidden[:, prefix:].mean(dim=1)], dim=-1),
                "mean": hidden[:, prefix:].mean(dim=1),
            }[head.features]
            torch.testing.assert_close(got.features, expected)


@pytest.mark.parametrize("name", CASES)
def test_bypassed_merger_computes_the_source_model(name, converted):
    """With the merger replaced by the identity the merged model is its source, exactly: calibration measures its
    candidates against that (`bypass_merger`). DINOv3's RoPE must then rotate the patches as the source does."""
    from retrofit.calibrate import bypass_merger
    from retrofit.loading import for_task, load_config, load_model

    item = converted[name]
    source = load_model(item.source, config=for_task(load_config(item.source), item.case.task)).eval()
    merged = item.result.model

    def last_layer_output(model: nn.Module) -> torch.Tensor:
        seen = []
        hook = layers_of(model)[-1].register_forward_hook(lambda _m, _i, out: seen.append(out))
        try:
            outputs(model, PIXELS_48, **item.case.interpolate)
        finally:
            hook.remove()
        return seen[0]

    with bypass_merger(merged):
        torch.testing.assert_close(last_layer_output(merged), last_layer_output(source), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", CASES)
def test_calibration_works_on_the_family(name, converted):
    """k-means calibration on classifiers and backbones: the shortcut it takes (layers 0..K-1 replayed from one
    recorded pass) reproduces the full forward, and the result is no further from the unmerged model than random."""
    model = copy.deepcopy(converted[name].result.model).eval()
    pixels = torch.randn(24, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    full = model_outputs(model, pixels, batch_size=8)
    with recording_merger_inputs(model) as recorded:
        model_outputs(model, pixels, batch_size=8)
    with replay_first_layers(model, recorded):
        torch.testing.assert_close(model_outputs(model, pixels, batch_size=8), full)
    torch.testing.assert_close(model_outputs(model, pixels, batch_size=8), full)  # the layers are back
    result = calibrate(model, pixels, scales=(1.0, 8.0), restarts=2)
    assert result.metric == ("KL" if CASES[name].classifier else "1 - cos")
    assert result.distance_calibrated <= result.distance_random


@pytest.mark.parametrize("name", ["siglip"])
def test_retrofit_finetune_runs_on_the_family(name, converted, tmp_path):
    """`retrofit.train.finetune` end to end (k-means calibration, CE steps, export) with no prefix token."""
    from test_data import make_imagefolder

    from retrofit.finetune import finetune
    from retrofit.loading import load_model

    data = make_imagefolder(tmp_path / "colours", per_class=4, test_per_class=2)
    out = tmp_path / "pm"
    result = finetune(converted[name].source, output=out, after_layer=K, num_tokens=M, data=str(data), loss="ce",
                      task=CASES[name].task, max_steps=3, batch_size=6, lr=3e-3, progress=False,
                      log=lambda _: None)  # fmt: skip
    assert result.steps == 3 and result.last_loss is not None and result.last_loss == result.last_loss
    reloaded = load_model(out)
    assert type(reloaded).__name__ == CASES[name].merged_class
    assert "no prefix token (every token is merged)" in (out / "README.md").read_text()  # was "0 prefix token(s)"
    assert torch.equal(reloaded.patch_merger.queries, result.model.patch_merger.queries)
    assert not torch.equal(reloaded.patch_merger.queries, converted[name].result.model.patch_merger.queries)


def test_a_class_retrofit_does_not_convert_is_named_in_the_log_and_card(tmp_path):
    """A ViTForMaskedImageModeling checkpoint (a pretraining head) becomes a classifier with a new random head, a
    CLIPVisionModelWithProjection its tower without the projection: both said in the log and the card, with
    --calibrate-on too (the calibration's start replaced the card's notes)."""
    from test_data import make_imagefolder
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection, ViTConfig, ViTForMaskedImageModeling

    data = make_imagefolder(tmp_path / "data", per_class=2, test_per_class=1)
    made = {
        "ViTForMaskedImageModeling": (ViTForMaskedImageModeling(ViTConfig(**VISION)), {"calibrate_on": str(data)}),
        "CLIPVisionModelWithProjection": (
            CLIPVisionModelWithProjection(CLIPVisionConfig(**VISION)),
            {"task": "image-feature-extraction"},  # the task it is: the projection is still not in the export
        ),
    }
    for saved_as, (model, options) in made.items():
        source = save_tiny(model, tmp_path / saved_as)
        logs: list[str] = []
        out = tmp_path / f"{saved_as}-pm"
        result = convert(source, after_layer=K, num_tokens=M, output=out, log=logs.append, **options)
        converted_as = type(result.model).__name__.replace("PatchMerger", "")
        said = f"the checkpoint is a {saved_as}, a class retrofit does not convert: it is converted as {converted_as}"
        card = (out / "README.md").read_text()
        assert any(line.startswith(f"note: {said}") for line in logs), logs
        assert said in card
        if saved_as == "ViTForMaskedImageModeling":
            assert "k-means" in card or "calibrat" in card
            assert "the classifier is new" in card and any("the classifier is new" in line for line in logs)
    # finetune says it too: it dropped CLIPVisionModelWithProjection's projection without a word
    from retrofit.finetune import finetune

    logs, out = [], tmp_path / "finetuned"
    finetune(tmp_path / "CLIPVisionModelWithProjection", output=out, after_layer=K, num_tokens=M, data=str(data),
             loss="kd", max_steps=1, batch_size=2, eval_split="", calibrate=False, progress=False,
             log=logs.append)  # fmt: skip
    said = "the checkpoint is a CLIPVisionModelWithProjection, a class retrofit does not convert: it is converted as"
    assert any(line.startswith(f"note: {said}") for line in logs) and said in (out / "README.md").read_text()


def test_a_task_the_checkpoint_already_has_keeps_its_class():
    """`--task image-classification` on a distilled DeiT (DeiTForImageClassificationWithTeacher) keeps it that class,
    with its distillation head, rather than the family's first classifier."""
    from transformers import DeiTConfig

    from retrofit.loading import for_task

    distilled = DeiTConfig(**TINY, architectures=["DeiTForImageClassificationWithTeacher"])
    loaded = for_task(distilled, "image-classification")
    assert family_and_head(loaded)[1].class_name == "DeiTForImageClassificationWithTeacher"


def test_a_vision_tower_saved_without_its_prefix_is_exported_with_it(tmp_path):
    """A CLIPVisionModel/SiglipVisionModel saved by transformers >= 5.6 names its weights without `vision_model.`;
    its export did too, which transformers 5.0-5.5 (releases exports support) loaded as random weights without an
    error. The export names them as every release loads them, and still reloads to the same outputs."""
    from retrofit.loading import load_model

    for make in (_clip_vision, _siglip_vision):
        torch.manual_seed(0)
        source = save_tiny(make(), tmp_path / make.__name__)
        assert not any(key.startswith("vision_model.") for key in load_file(source / "model.safetensors"))
        out = tmp_path / f"{make.__name__}-pm"
        result = convert(source, after_layer=K, num_tokens=M, output=out, log=lambda _: None)
        names = set(load_file(out / "model.safetensors"))
        assert names and all(key.startswith("vision_model.") for key in names), sorted(names)[:3]
        expected = outputs(result.model.eval(), PIXELS)
        got = outputs(load_model(str(out)).eval(), PIXELS)
        assert all(torch.equal(got[key], value) for key, value in expected.items())


def test_tokens_are_bounded_by_the_patches_the_processor_feeds(tmp_path):
    """A DINOv2 whose processor feeds 48x48 (36 patches) while its config says 32x32 (16): convert checked --tokens 20
    against the 36, then insert_patch_merger refused it against the 16 ("so use 1..15"), as it did SigLIP 2 with a
    processor's max_num_patches above its config's num_patches (finetune, sweep and bench merged the same way)."""
    torch.manual_seed(0)
    source = save_tiny(_dinov2(), tmp_path / "dinov2", image_size=48)
    result = convert(source, after_layer=K, num_tokens=20, output=tmp_path / "out", log=lambda _: None)
    assert result.model.config.merge_num_tokens == 20
    assert tokens_seen(result.model.eval(), PIXELS_48) == result.after.tokens_per_layer == [37, 37, 21, 21]
    # the Python API takes the size too, checked: "48" was read as 4x8 pixels, (48,) failed with an IndexError
    from retrofit.loading import load_model
    from retrofit.surgery import insert_patch_merger

    model = load_model(str(source))
    assert insert_patch_merger(model, K, 20, image_size=(48, 48)).config.merge_num_tokens == 20
    for bad in ("48", (48,), (4, 4)):
        with pytest.raises(RetrofitError, match="insert_patch_merger's image_size"):
            insert_patch_merger(model, K, 20, image_size=bad)


# ---------------------------------------------------------------- refusals


def _swin():
    from transformers import SwinConfig, SwinForImageClassification

    config = SwinConfig(image_size=32, patch_size=4, embed_dim=8, depths=[1, 1], num_heads=[1, 1], window_size=4)
    return SwinForImageClassification(config)


def _convnext():
    from transformers import ConvNextConfig, ConvNextForImageClassification

    return ConvNextForImageClassification(
        ConvNextConfig(num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], image_size=32)
    )


@pytest.mark.parametrize(
    "make, reason",
    [
        (_swin, "'swin' (hierarchical or convolutional) cannot be merged"),
        (_convnext, "'convnext' (hierarchical or convolutional) cannot be merged"),
    ],
)
def test_refused_families(make, reason, tmp_path, capsys):
    source = tmp_path / "source"
    make().save_pretrained(source)
    capsys.readouterr()  # saving prints a progress bar
    out = tmp_path / "out"
    code = main(["convert", str(source), "--after-layer", "1", "--tokens", "2", "--output", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("retrofit: error: model type ") and "\n" not in err and "Traceback" not in err
    assert reason in err, err
    assert err.endswith(f"supported families: {supported_names()}")
    assert "DINOv2" in err and "CLIP" in err and "SigLIP" in err
    supported = err.split("supported families: ")[1]  # the refused families are not offered
    assert "hierarchical" not in supported and "timm" not in supported, supported
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_a_model_too_small_to_merge_is_refused_in_one_line(tmp_path, capsys):
    """One encoder layer, or one patch at the processor's size: the refusal said "so use 1..0"."""
    from transformers import ViTConfig, ViTModel

    for name, changed in (("one-layer", {"num_hidden_layers": 1}), ("one-patch", {"image_size": 8})):
        source = save_tiny(ViTModel(ViTConfig(**{**TINY, **changed})), tmp_path / name, changed.get("image_size", 32))
        capsys.readouterr()
        out = tmp_path / f"{name}-pm"
        code = main(["convert", str(source), "--after-layer", "1", "--tokens", "1", "--output", str(out)])
        err = capsys.readouterr().err.strip()
        assert code == 2 and "\n" not in err and "1..0" not in err and not out.exists(), err
        assert ("1 encoder layer" if name == "one-layer" else "1 patch token") in err, err
        with pytest.raises(RetrofitError, match="merge a deeper model" if name == "one-layer" else "nothing to merge"):
            model_cost(ViTConfig(**{**TINY, **changed}), merge=(1, 1))


def test_a_size_pair_for_a_family_of_square_sizes_is_refused_in_one_line(tmp_path, capsys):
    """CLIP and SigLIP build their embeddings from one image_size and patch_size: a (height, width) pair in config.json
    failed as "cannot load ...: unsupported operand type(s) for //; pass a folder holding config.json and weights"."""
    for make, name in ((_clip_vision, "CLIP vision tower"), (_clip, "CLIP")):  # the full model: in vision_config
        source = save_tiny(make(), tmp_path / name)
        config = json.loads((source / "config.json").read_text())
        if "vision_config" in config:
            config["vision_config"]["image_size"] = [32, 32]
        (source / "config.json").write_text(json.dumps({**config, "image_size": [32, 32]}))
        capsys.readouterr()
        code = main(["convert", str(source), "--after-layer", "1", "--tokens", "2"])
        err = capsys.readouterr().err.strip()
        assert code == 2 and "\n" not in err, err
        assert f"image_size must be one whole number for {name} (its" in err and "[32, 32]" in err, err


def test_timm_checkpoints_are_refused_in_one_line(tmp_path, capsys):
    """A timm Hub repo's config.json (no model_type; transformers loads it as TimmWrapper, which needs timm)."""
    source = tmp_path / "timm-vit"
    source.mkdir()
    config = {"architecture": "vit_base_patch16_224", "num_classes": 1000, "global_pool": "token",
              "pretrained_cfg": {"input_size": [3, 224, 224], "num_classes": 1000}}  # fmt: skip
    (source / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    code = main(["convert", str(source), "--after-layer", "6", "--tokens", "8", "--output", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "Traceback" not in err, err
    assert "model type 'timm_wrapper' (timm) cannot be merged" in err, err
    assert "google/vit-base-patch16-224" in err and err.endswith(f"supported families: {supported_names()}")
    assert not out.exists()


@pytest.mark.parametrize("name", CASES)
def test_export_onnx_matches_pytorch_at_any_batch_size(name, converted, tmp_path):
    """`retrofit export-onnx` for every family and class: the exporter its family needs, traced at batch 2, checked
    by ONNX Runtime against PyTorch on 4 images through the export's processor (refused above 1e-4)."""
    from retrofit.deploy import export_onnx, onnx_info

    item = converted[name]
    result = export_onnx(item.output, tmp_path / "model.onnx", log=lambda _: None)
    assert result.max_difference <= 1e-4 and result.images == 4
    expected = "torchscript" if FAMILIES[item.case.family].relative_position_bias else "dynamo"
    assert result.exporter == expected
    info = onnx_info(tmp_path / "model.onnx")
    assert info["merge_num_tokens"] == M and info["class"] == family_and_head(item.result.model.config)[1].class_name


def test_a_siglip_config_without_vision_use_head_is_priced_with_its_pooling_head(monkeypatch):
    """transformers 5.18 (pyproject's floor) writes no ``vision_use_head`` into SigLIP's vision config and builds the
    pooling head where the field is absent; the cost model left the head out there (siglip2-b16: 46.20 GFLOPs for
    46.82). A family without a pooling head (ViT) is not given one for lacking the field."""
    from retrofit.benchmark import shape_config
    from retrofit.cost import pooling_head_macs

    for shape in ("siglip-b16", "siglip2-b16"):
        config = shape_config(shape)
        with_field = model_cost(config, merge=(6, 8)).gflops
        vision = config.vision_config if hasattr(config, "vision_config") else config
        vision.__dict__.pop("vision_use_head", None)  # as 5.18 has it: neither on the config nor on its class
        monkeypatch.delattr(type(vision), "vision_use_head", raising=False)
        assert not hasattr(vision, "vision_use_head")
        assert model_cost(config, merge=(6, 8)).gflops == pytest.approx(with_field)
        vision.vision_use_head = False
        head = pooling_head_macs(8, vision.hidden_size, vision.intermediate_size)
        assert model_cost(config, merge=(6, 8)).gflops == pytest.approx(with_field - 2 * head / 1e9)
    vit = shape_config("vit-b16")
    assert not hasattr(vit, "vision_use_head") and model_cost(vit).gflops == pytest.approx(35.13, abs=0.01)


def test_cost_is_what_a_flop_counter_counts(converted):
    """`model_cost` against torch's FlopCounterMode on the real modules (eager attention, which it counts), source
    and merged, every case: within 1 % (the counter also sees the classifier or projection, which the cost leaves
    out). SigLIP's attention pooling head attends over all N (then M) tokens, and was left out: 5 % under here."""
    from torch.utils.flop_counter import FlopCounterMode

    from retrofit.loading import load_config, load_model

    for name, item in converted.items():
        for path in (item.source, item.output):
            config = load_config(path, task=item.case.task if path == item.source else None)
            model = load_model(path, config=config, attn_implementation="eager").eval()
            with FlopCounterMode(display=False) as counter, torch.no_grad():
                if item.case.dual:
                    model.get_image_features(pixel_values=PIXELS)
                else:
                    model(pixel_values=PIXELS)
            counted = counter.get_total_flops() / len(PIXELS) / 1e9
            assert model_cost(model.config, 32).gflops == pytest.approx(counted, rel=0.01), (name, str(path))


def test_a_half_precision_beit_is_evaluated_and_distilled_from(tmp_path, capsys):
    """transformers' BEiT does not cast its input to its weights' dtype: a bf16 BEiT (or its export) failed in
    evaluate, and as the kd teacher of finetune (the source as stored), with "Input type (float) and bias type
    (c10::BFloat16)"; retrofit feeds every model its pixels in its own dtype, as transformers' pipelines do. And
    evaluate, then finetune, in one process failed with "Inference tensors cannot be saved for backward": BEiT caches
    its relative position index process-wide, and evaluate made it under torch.inference_mode (now no_grad). The
    40x40 images give a window (5x5) no other test makes, so the cache starts empty here."""
    from test_data import make_imagefolder
    from transformers import BeitConfig, BeitForImageClassification

    from retrofit.finetune import finetune

    data = make_imagefolder(tmp_path / "colours", per_class=4, test_per_class=2, size=40)
    config = BeitConfig(**{**TINY, "image_size": 40}, use_relative_position_bias=True, use_mean_pooling=True)
    source = save_tiny(_random_bias(BeitForImageClassification(config)).to(torch.bfloat16), tmp_path / "beit", 40)
    assert main(["evaluate", str(source), "--data", str(data), "--batch-size", "3"]) == 0, capsys.readouterr().err
    result = finetune(str(source), output=tmp_path / "pm", after_layer=1, num_tokens=4, data=str(data), loss="kd",
                      max_steps=1, batch_size=4, min_steps=0, progress=False, log=lambda _: None)  # fmt: skip
    assert result.finished and result.last_loss == result.last_loss  # not NaN
    assert main(["evaluate", str(source), str(tmp_path / "pm"), "--data", str(data)]) == 0, capsys.readouterr().err
