"""`retrofit convert`: surgery, export round trip, loading without retrofit, pipeline, and every bad input."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModelForImageClassification, pipeline

from retrofit import RetrofitError, convert, insert_patch_merger, load_model
from retrofit.cli import main
from retrofit.cost import model_cost
from retrofit.errors import brief

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def vit_export(tiny_vit, tmp_path_factory):
    out = tmp_path_factory.mktemp("exports") / "vit-pm"
    result = convert(tiny_vit, after_layer=2, num_tokens=4, output=out, log=lambda _: None)
    result.model.eval()
    return result, out


def logits(model, pixels):
    with torch.no_grad():
        return model(pixel_values=pixels).logits


def test_export_folder_is_a_complete_hub_repo(vit_export):
    _, out = vit_export
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "README.md"} <= names
    assert {"configuration_vit_patch_merger.py", "modeling_vit_patch_merger.py"} <= names
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "vit_patch_merger"
    assert config["merge_after_layer"] == 2 and config["merge_num_tokens"] == 4
    assert config["merge_num_prefix_tokens"] == 1
    assert config["auto_map"] == {
        "AutoConfig": "configuration_vit_patch_merger.ViTPatchMergerConfig",
        "AutoModelForImageClassification": "modeling_vit_patch_merger.ViTPatchMergerForImageClassification",
        "AutoModel": "modeling_vit_patch_merger.ViTPatchMergerModel",  # the encoder alone, as for the source
    }
    card = (out / "README.md").read_text()
    assert "trust_remote_code=True" in card and "patch-merger" in card
    # the notes for a checkpoint of another class, or a new classifier, are not on a classifier converted as itself
    assert "a class retrofit does not convert" not in card and "the classifier is new" not in card
    assert not list(out.parent.glob(".vit-pm.tmp-*")), "temporary folder left behind"


def test_export_writes_its_code_and_auto_map_where_saving_the_model_writes_neither(vit_export, tmp_path, monkeypatch):
    """Where retrofit's cache cannot be written, the generated classes are not registered for their Auto classes and
    the merged config has no ``auto_map``, so ``save_pretrained`` writes neither: `export` writes both itself, and
    the export loads without retrofit and is one `push` takes."""
    from transformers import ViTImageProcessor

    from retrofit import export
    from retrofit.loading import load_model
    from retrofit.push import export_files

    model = load_model(vit_export[1])
    for registered in (type(model), type(model.config)):
        monkeypatch.setattr(registered, "_auto_class", None)
    model.config.__dict__.pop("auto_map")
    out = export(model, tmp_path / "pm", image_processor=ViTImageProcessor(size={"height": 32, "width": 32}))
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"] == json.loads((vit_export[1] / "config.json").read_text())["auto_map"]
    for name in ("configuration_vit_patch_merger.py", "modeling_vit_patch_merger.py"):
        assert (out / name).read_text() == (vit_export[1] / name).read_text()
    assert "modeling_vit_patch_merger.py" in export_files(out)


def test_export_refuses_in_one_line_what_would_leave_an_export_incomplete(vit_export, tmp_path):
    """`retrofit.export(merged, out)` without the image processor wrote an export without preprocessor_config.json:
    its card's pipeline example failed to load, and `retrofit push` refused it; objects of other kinds where the
    processor, card or training go failed halfway with an AttributeError."""
    from transformers import ViTImageProcessor

    from retrofit import export
    from retrofit.card import TrainingInfo

    merged, processor = vit_export[0].model, ViTImageProcessor(size={"height": 32, "width": 32})
    out = tmp_path / "pm"
    calls = {
        "needs the model's image_processor": {},
        "image_processor must be an image processor, not '/a/folder'": {"image_processor": "/a/folder"},
        "card must be a huggingface_hub ModelCard (card.build_card), not '# my card'": {"card": "# my card"},
        "training must be a retrofit.card.TrainingInfo, not {'data': 'x'}": {"training": {"data": "x"}},
        "tokenizer must be a tokenizer, not 'x'": {"tokenizer": "x"},
    }
    for message, given in calls.items():
        with pytest.raises(RetrofitError, match=re.escape(f"export()'s {message}" if "must" in message else message)):
            export(merged, out, **({"image_processor": processor, **given} if given else {}))
    with pytest.raises(RetrofitError, match=re.escape("export()'s output must be a folder path, not None")):
        export(merged, None, image_processor=processor)
    with pytest.raises(RetrofitError, match=re.escape("export's overwrite must be True or False, not 'no'")):
        export(merged, out, image_processor=processor, overwrite="no")  # it was true
    empty = copy.deepcopy(merged).to("meta")  # a NotImplementedError from safetensors, halfway
    with pytest.raises(RetrofitError, match="this one's are on the meta device .* load the weights first"):
        export(empty, out, image_processor=processor)
    assert sorted(tmp_path.iterdir()) == []
    export(merged, out, image_processor=processor, training=TrainingInfo(init="k-means"))
    from retrofit.push import export_files

    assert "preprocessor_config.json" in export_files(out)


def test_round_trip_logits_match_in_memory_model(vit_export, pixels):
    result, out = vit_export
    loaded = AutoModelForImageClassification.from_pretrained(out, trust_remote_code=True).eval()
    assert (logits(loaded, pixels) - logits(result.model, pixels)).abs().max() <= 1e-5


def test_original_weights_are_bit_exact(tiny_vit, vit_export):
    _, out = vit_export
    source, merged = load_file(tiny_vit / "model.safetensors"), load_file(out / "model.safetensors")
    for name, tensor in source.items():
        assert torch.equal(merged[name], tensor), name
    # transformers saves the legacy names (vit.encoder.layer.N) for both; the merger adds exactly three tensors.
    extra = sorted(set(merged) - set(source))
    assert extra == [f"vit.encoder.layer.2.patch_merger.{n}" for n in ("norm.bias", "norm.weight", "queries")]


def test_merged_layers_see_fewer_tokens(vit_export, pixels):
    result, _ = vit_export
    with torch.no_grad():
        hidden = result.model(pixel_values=pixels, output_hidden_states=True).hidden_states
    # embeddings + 4 layers: 16 patches + CLS until layer 2 merges them into 4 (+ CLS).
    assert [h.shape[1] for h in hidden] == [17, 17, 17, 5, 5]
    assert result.after.tokens_per_layer == [17, 17, 5, 5]
    assert result.speedup == pytest.approx(result.before.gflops / model_cost(result.model.config).gflops)
    assert result.speedup > 1.3


def test_cost_ratio_is_printed(tiny_vit, tmp_path, capsys):
    assert main(["convert", str(tiny_vit), "--after-layer", "1", "--tokens", "2", "-o", str(tmp_path / "o")]) == 0
    printed = capsys.readouterr().out
    assert "| tokens before | 17 | 17 | 17 | 17 |" in printed
    assert "| tokens after | 17 | 3 | 3 | 3 |" in printed
    before, after = printed.split("GFLOPs per image: ")[1].split(" (")[0].split(" -> ")
    assert float(before) / float(after) > 2


def test_pipeline_classifies_a_pil_image(vit_export):
    _, out = vit_export
    classifier = pipeline("image-classification", model=str(out), trust_remote_code=True)
    image = Image.fromarray((np.random.default_rng(0).random((48, 40, 3)) * 255).astype("uint8"))
    predictions = classifier(image)
    assert {p["label"] for p in predictions} == {"cat", "dog", "bird"}
    assert sum(p["score"] for p in predictions) == pytest.approx(1.0, abs=1e-4)


def test_export_loads_in_a_process_without_retrofit(vit_export, pixels, tmp_path):
    result, out = vit_export
    torch.save(pixels, tmp_path / "pixels.pt")
    torch.save(logits(result.model, pixels), tmp_path / "expected.pt")
    blocker = tmp_path / "blocker"
    (blocker / "retrofit").mkdir(parents=True)
    (blocker / "retrofit" / "__init__.py").write_text("raise ImportError('retrofit must not be needed')\n")
    script = textwrap.dedent(f"""
        import torch
        try:
            import retrofit
        except ImportError:
            pass
        else:
            raise SystemExit("retrofit was importable")
        from transformers import AutoModelForImageClassification
        model = AutoModelForImageClassification.from_pretrained({str(out)!r}, trust_remote_code=True).eval()
        with torch.no_grad():
            got = model(pixel_values=torch.load({str(tmp_path / "pixels.pt")!r})).logits
        diff = (got - torch.load({str(tmp_path / "expected.pt")!r})).abs().max().item()
        assert diff <= 1e-5, diff
        print("OK", diff)
    """)
    env = {**os.environ, "PYTHONPATH": str(blocker), "HF_MODULES_CACHE": str(tmp_path / "modules")}
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.startswith("OK")


def test_export_load_save_reproduces_tensors(vit_export, tmp_path):
    _, out = vit_export
    loaded = AutoModelForImageClassification.from_pretrained(out, trust_remote_code=True)
    loaded.save_pretrained(tmp_path / "again")
    first, second = load_file(out / "model.safetensors"), load_file(tmp_path / "again" / "model.safetensors")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_retrofit_loads_its_export_without_remote_code(vit_export, pixels):
    result, out = vit_export
    model = load_model(out).eval()
    assert type(model).__name__ == "ViTPatchMergerForImageClassification"
    assert (logits(model, pixels) - logits(result.model, pixels)).abs().max() <= 1e-5


@pytest.mark.parametrize("fixture,prefix", [("tiny_deit", 2), ("tiny_deit_distilled", 2)])
def test_deit_round_trip(request, fixture, prefix, tmp_path, pixels):
    source = request.getfixturevalue(fixture)
    out = tmp_path / f"{fixture}-pm"  # transformers caches remote code by folder name within a process
    result = convert(source, after_layer=1, num_tokens=3, output=out, log=lambda _: None)
    assert result.model.config.merge_num_prefix_tokens == prefix
    assert result.after.tokens_per_layer == [18, 5, 5, 5]
    loaded = AutoModelForImageClassification.from_pretrained(out, trust_remote_code=True).eval()
    assert type(loaded).__name__ == type(result.model).__name__
    assert (logits(loaded, pixels) - logits(result.model.eval(), pixels)).abs().max() <= 1e-5


def test_surgery_keeps_source_outputs_before_the_merge(tiny_vit, pixels):
    source = load_model(tiny_vit).eval()
    with torch.no_grad():
        before = source(pixel_values=pixels, output_hidden_states=True).hidden_states
    merged = insert_patch_merger(source, 3, 2).eval()
    with torch.no_grad():
        after = merged(pixel_values=pixels, output_hidden_states=True).hidden_states
    for layer in range(4):  # embeddings and the first 3 layers are untouched
        assert torch.equal(before[layer], after[layer])


# ---------------------------------------------------------------- bad input: one line, exit 2, nothing written


def run_cli(capsys, *args) -> tuple[int, str]:
    capsys.readouterr()  # only what the command prints (a test's own save_pretrained draws a progress bar)
    code = main(list(map(str, args)))
    err = capsys.readouterr().err.strip()
    return code, err


def assert_refused(capsys, out: Path, *args, match: str):
    code, err = run_cli(capsys, "convert", *args, "--output", out)
    assert code == 2, err
    assert err.startswith("retrofit: error: ") and "\n" not in err and "Traceback" not in err
    assert match in err, err
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.*")), "temporary folder left behind"


def test_missing_path(capsys, tmp_path):
    assert_refused(capsys, tmp_path / "o", tmp_path / "nope", "--after-layer", 1, "--tokens", 2, match="does not exist")


def test_unreachable_hub_id(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert_refused(capsys, tmp_path / "o", "nobody-xyz/no-such-model", "--after-layer", 1, "--tokens", 2,
                   match="nor a Hub model id in the cache, and HF_HUB_OFFLINE is set")  # fmt: skip


def test_long_library_messages_are_cut_at_a_sentence_or_word():
    sentences = ValueError(
        "We could not connect to the Hub.\nCheck your network   or see the offline docs at " + "x" * 200
    )
    assert brief(sentences) == "We could not connect to the Hub."
    words = brief(ValueError("word " * 100), limit=40)
    assert words.endswith("word …") and len(words) <= 42
    assert brief(KeyError("short")) == "'short'"


@pytest.mark.parametrize(("k", "match"), [(0, "--after-layer must be at least 1"), (4, "use 1..3"), (-1, "at least 1")])
def test_after_layer_out_of_range(capsys, tmp_path, tiny_vit, k, match):
    assert_refused(capsys, tmp_path / "o", tiny_vit, "--after-layer", k, "--tokens", 2, match=match)


@pytest.mark.parametrize(("m", "match"), [(0, "--tokens must be at least 1"), (16, "use 1..15"), (100, "use 1..15")])
def test_tokens_out_of_range(capsys, tmp_path, tiny_vit, m, match):
    assert_refused(capsys, tmp_path / "o", tiny_vit, "--after-layer", 1, "--tokens", m, match=match)


def test_a_merge_of_a_number_too_long_to_write_is_refused_by_its_size(tiny_vit):
    """`check_merge` from Python with a K or M of thousands of digits: the refusal itself raised ValueError (Python
    writes at most 4,300 digits); now it says the number's size, as every quoted value does (`errors.shown`)."""
    from retrofit.loading import load_config
    from retrofit.surgery import check_merge

    config = load_config(tiny_vit)
    cases = [
        (10**5000, 2, "--after-layer a number of about 5000 digits is out of range"),
        (1, -(10**5000), "--tokens a negative number of about 5000 digits is out of range"),
    ]
    for k, m, message in cases:
        with pytest.raises(RetrofitError, match=message):
            check_merge(config, k, m)


def test_unsupported_architecture(capsys, tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    source = tmp_path / "bert"
    BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                             intermediate_size=32)).save_pretrained(source)  # fmt: skip
    assert_refused(capsys, tmp_path / "o", source, "--after-layer", 1, "--tokens", 2, match="supported families: ViT")


def test_output_exists_refused_unless_overwrite(capsys, tmp_path, tiny_vit):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    code, err = run_cli(capsys, "convert", tiny_vit, "--after-layer", 1, "--tokens", 2, "--output", out)
    assert code == 2 and "already exists" in err and "--overwrite" in err
    assert (out / "keep.txt").read_text() == "user data"
    # --overwrite replaces only what retrofit wrote: not this folder (tests/test_safety.py), but an export
    code, err = run_cli(capsys, "convert", tiny_vit, "--after-layer", 1, "--tokens", 2, "--output", out, "--overwrite")
    assert code == 2 and "is not a retrofit export" in err and (out / "keep.txt").read_text() == "user data"
    (out / "keep.txt").unlink()
    for _ in range(2):  # the empty folder, then its own export
        code, _ = run_cli(
            capsys, "convert", tiny_vit, "--after-layer", 1, "--tokens", 2, "--output", out, "--overwrite"
        )
        assert code == 0 and (out / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_weights(capsys, tmp_path, tiny_vit, damage):
    import shutil

    source = tmp_path / "src"
    shutil.copytree(tiny_vit, source)
    weights = source / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x00garbage" * 64)
    assert_refused(capsys, tmp_path / "o", source, "--after-layer", 1, "--tokens", 2, match="corrupt or truncated")


def test_a_processor_size_the_model_refuses_is_refused_before_writing(capsys, tmp_path, tiny_vit):
    source = tmp_path / "src"
    shutil.copytree(tiny_vit, source)
    (source / "preprocessor_config.json").write_text('{"image_processor_type": "ViTImageProcessor"}')  # 224×224
    assert_refused(capsys, tmp_path / "o", source, "--after-layer", 2, "--tokens", 4,
                   match=f"'{source}' cannot run on the 224×224 images its image processor gives")  # fmt: skip


def test_weights_missing_from_the_backbone_are_refused(capsys, tmp_path, tiny_vit):
    from safetensors.torch import save_file

    weights = load_file(tiny_vit / "model.safetensors")
    without_layer = tmp_path / "without-layer"
    shutil.copytree(tiny_vit, without_layer)
    kept = {name: value for name, value in weights.items() if "layer.3." not in name}
    save_file(kept, without_layer / "model.safetensors", metadata={"format": "pt"})
    assert_refused(capsys, tmp_path / "o", without_layer, "--after-layer", 2, "--tokens", 4,
                   match=f"lacks {len(weights) - len(kept)} of the model's weights (vit.")  # fmt: skip
    more_layers = tmp_path / "more-layers"
    shutil.copytree(tiny_vit, more_layers)
    config = json.loads((more_layers / "config.json").read_text())
    (more_layers / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 8}))
    assert_refused(capsys, tmp_path / "o", more_layers, "--after-layer", 2, "--tokens", 4,
                   match=f"lacks {4 * (len(weights) - len(kept))} of the model's weights")  # fmt: skip
    # a new classifier is expected, not refused: a classifier checkpoint without one loads with a new head
    no_head = tmp_path / "no-head"
    shutil.copytree(tiny_vit, no_head)
    save_file({k: v for k, v in weights.items() if not k.startswith("classifier.")}, no_head / "model.safetensors",
              metadata={"format": "pt"})  # fmt: skip
    assert run_cli(capsys, "convert", no_head, "--after-layer", 2, "--tokens", 4)[0] == 0
    # ... but scored, or distilled from, its random classifier gave numbers that meant nothing (a new one each run)
    from test_data import make_imagefolder

    from retrofit import evaluate_models, finetune
    from retrofit.errors import RetrofitError

    data = str(make_imagefolder(tmp_path / "imgs", per_class=2, test_per_class=2))
    message = r"is a ViTForImageClassification checkpoint without its classifier's weights \(classifier.bias, class"
    with pytest.raises(RetrofitError, match=message):
        evaluate_models([str(no_head)], data=data, split="test", log=lambda _: None)
    with pytest.raises(RetrofitError, match=message):
        finetune(no_head, output=tmp_path / "ft", after_layer=2, num_tokens=4, data=data, max_steps=1)
    # nor is a new pooler: a classifier checkpoint (which has none) loaded as its backbone
    from retrofit.loading import load_config

    assert (
        type(load_model(tiny_vit, config=load_config(tiny_vit, task="image-feature-extraction"))).__name__ == "ViTModel"
    )


def test_weights_of_other_shapes_than_the_config_are_one_line(capsys, tmp_path, tiny_vit):
    # transformers raises "... For details look at the above report!" about a report its quieted log never shows
    source = tmp_path / "more-labels"
    shutil.copytree(tiny_vit, source)
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "id2label": {str(i): f"c{i}" for i in range(5)},
                                                    "label2id": {f"c{i}": i for i in range(5)}}))  # fmt: skip
    match = "do not match its config.json: classifier.bias is [3] in the weights but [5] by config.json (and 1 more)"
    assert_refused(capsys, tmp_path / "o", source, "--after-layer", 2, "--tokens", 4, match=match)


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        ("missing shard", "lacks model-00002-of-0000"),
        ("not json", "model.safetensors.index.json' is not a shard index (Expecting"),
        ("a list", "model.safetensors.index.json' is not a shard index (it holds a list)"),
        ("no weight_map", "model.safetensors.index.json' is not a shard index (its weight_map is not an object"),
    ],
)
def test_a_damaged_shard_index_is_one_line(capsys, tmp_path, tiny_vit, damage, match):
    from transformers import ViTForImageClassification

    source = tmp_path / "sharded"
    ViTForImageClassification.from_pretrained(tiny_vit).save_pretrained(source, max_shard_size="50KB")
    shutil.copy(tiny_vit / "preprocessor_config.json", source)
    index = source / "model.safetensors.index.json"
    shards = sorted(source.glob("model-*.safetensors"))
    assert len(shards) > 2 and not (source / "model.safetensors").exists()
    if damage == "missing shard":
        shards[1].unlink()
    else:
        index.write_text({"not json": "{oops", "a list": "[]", "no weight_map": '{"metadata": {}}'}[damage])
    capsys.readouterr()  # the progress bars of the saving above
    assert_refused(capsys, tmp_path / "o", source, "--after-layer", 2, "--tokens", 4, match=match)


def test_sharded_weights_convert(capsys, tmp_path, tiny_vit):
    from transformers import ViTForImageClassification

    source = tmp_path / "sharded"
    ViTForImageClassification.from_pretrained(tiny_vit).save_pretrained(source, max_shard_size="50KB")
    shutil.copy(tiny_vit / "preprocessor_config.json", source)
    code, _ = run_cli(capsys, "convert", source, "--after-layer", 1, "--tokens", 2, "--output", tmp_path / "o")
    assert code == 0 and (tmp_path / "o" / "model.safetensors").is_file()
    # one weights file beside an index whose shards were not downloaded: transformers reads the file, so retrofit must
    shutil.copy(tiny_vit / "model.safetensors", source)
    for shard in source.glob("model-*.safetensors"):
        shard.unlink()
    assert load_model(source).vit.embeddings.patch_embeddings.projection.weight.shape[0] == 32


@pytest.mark.parametrize("key", ["dtype", "torch_dtype"])
def test_a_config_dtype_other_than_the_weights_converts_in_that_dtype(capsys, tmp_path, tiny_vit, key):
    source = tmp_path / "half"
    shutil.copytree(tiny_vit, source)
    config = {k: v for k, v in json.loads((source / "config.json").read_text()).items() if k != "dtype"}
    (source / "config.json").write_text(json.dumps({**config, key: "bfloat16"}))  # float32 weights
    code, _ = run_cli(capsys, "convert", source, "--after-layer", 1, "--tokens", 2, "--output", tmp_path / "o")
    assert code == 0
    assert {t.dtype for t in load_file(tmp_path / "o" / "model.safetensors").values()} == {torch.bfloat16}
    assert "- weights stored in bfloat16\n" in (tmp_path / "o" / "README.md").read_text()  # only the log said it


def test_the_vision_tower_of_a_half_precision_clip_converts_in_its_dtype(tmp_path):
    """A full CLIP saved after `.half()` says float16 at the top of config.json and (stale) float32 in vision_config:
    `--task image-feature-extraction` exported its vision tower in float32, twice the size, without a word."""
    from conftest import TINY, save_tiny
    from transformers import CLIPConfig, CLIPModel

    keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "image_size", "patch_size")
    text = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=99)
    config = CLIPConfig(vision_config={key: TINY[key] for key in keys}, text_config=text, projection_dim=16)
    config.vision_config.dtype = torch.float32  # as a checkpoint loaded in float32 and then halved carries it
    source = save_tiny(CLIPModel(config).half(), tmp_path / "clip")
    assert json.loads((source / "config.json").read_text())["vision_config"]["dtype"] == "float32"
    convert(source, after_layer=2, num_tokens=4, output=tmp_path / "o", task="image-feature-extraction",
            log=lambda _: None)  # fmt: skip
    assert json.loads((tmp_path / "o" / "config.json").read_text())["dtype"] == "float16"
    assert {t.dtype for t in load_file(tmp_path / "o" / "model.safetensors").values()} == {torch.float16}
    assert "- weights stored in float16\n" in (tmp_path / "o" / "README.md").read_text()


def test_load_model_takes_retrofits_dtype_names_and_refuses_others_as_the_dtype(tiny_vit):
    """`load_model(dtype="bf16")`, as `retrofit bench --dtype` spells it, was refused as a bad checkpoint folder
    ("pass a folder holding config.json and weights"), and so was an integer type."""
    assert load_model(tiny_vit, dtype="bf16").dtype == torch.bfloat16
    assert load_model(tiny_vit, dtype=torch.float16).dtype == torch.float16
    for dtype, shown_as in (("int8", "'int8'"), (torch.int8, "int8"), ("fp8", "'fp8'")):
        with pytest.raises(RetrofitError, match=f"^load_model: dtype {shown_as} is not a floating-point type") as info:
            load_model(tiny_vit, dtype=dtype)
        assert "folder" not in str(info.value)


def test_an_fp16_source_finetunes_under_bf16_autocast_and_exports_in_fp16(tiny_vit, tmp_path):
    """The kd teacher is the source as stored: an fp16 one under --mixed-precision bf16 failed with a traceback from
    inside torch.cat (autocast takes float32 and its own dtype only); the export stays in the source's fp16. The
    card's accuracy is of the weights as stored: it was of the float32 ones before the cast (a bf16 ViT's card said
    87.50 % where `retrofit evaluate` of the export gave 87.40 % on the same images)."""
    from test_data import make_imagefolder

    from retrofit import evaluate_models, finetune

    source = tmp_path / "fp16"
    load_model(tiny_vit).half().save_pretrained(source)
    shutil.copy(tiny_vit / "preprocessor_config.json", source)
    data = make_imagefolder(tmp_path / "colours", per_class=2, test_per_class=1)
    before = evaluate_models(source, data=str(data), split="test", log=lambda _: None)["models"]
    said: list[str] = []
    result = finetune(source, output=tmp_path / "o", after_layer=2, num_tokens=4, data=str(data), loss="kd",
                      max_steps=1, min_steps=0, batch_size=6, mixed_precision="bf16", calibrate=False, progress=False,
                      log=said.append)  # fmt: skip
    assert json.loads((tmp_path / "o" / "config.json").read_text())["dtype"] == "float16"
    assert {t.dtype for t in load_file(tmp_path / "o" / "model.safetensors").values()} == {torch.float16}
    last = result.final_evaluation
    assert last["dtype"] == "float16" and any("eval accuracy (the weights as stored, in float16)" in x for x in said)
    report = evaluate_models(tmp_path / "o", data=str(data), split="test", log=lambda _: None)
    assert last["accuracy"] == report["models"][0]["top1"]
    # Scored after the bf16 run as before it: Accelerate kept the run's precision process-wide, and evaluate scored
    # under bf16 autocast (other numbers; an fp16 model failed in torch.cat)
    assert evaluate_models(source, data=str(data), split="test", log=lambda _: None)["models"] == before
    assert (
        f"accuracy on `colours` test (all 3 images): {100 * last['accuracy']:.2f} %"
        in (tmp_path / "o" / "README.md").read_text()
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 autocast runs on a GPU")
def test_a_mixed_precision_the_cpu_cannot_run_is_refused_not_trained_in_float32():
    """Accelerate takes fp16 on the CPU and trains in float32 without a word, while the log ("precision fp16") and
    run.json said fp16; bf16 autocasts on the CPU and stays allowed."""
    from retrofit.settings import TrainSettings
    from retrofit.train import make_accelerator

    with pytest.raises(
        RetrofitError, match="--mixed-precision fp16 does not run on the CPU .*use --mixed-precision bf16"
    ):
        make_accelerator(TrainSettings(mixed_precision="fp16"), None)
    accelerator = make_accelerator(TrainSettings(mixed_precision="bf16"), None)
    with accelerator.autocast():
        assert torch.nn.Linear(2, 2)(torch.ones(1, 2)).dtype == torch.bfloat16


def test_converting_an_export_is_refused(capsys, tmp_path, vit_export):
    _, out = vit_export
    assert_refused(capsys, tmp_path / "o", out, "--after-layer", 1, "--tokens", 2, match="already has a PatchMerger")


@pytest.mark.parametrize(
    ("config_file", "code_file", "base", "fields", "refusal"),
    [
        ("config.json", "configuration_evil.py", "ViTConfig",
         {"model_type": "evil", "auto_map": {"AutoConfig": "configuration_evil.Evil"}}, "--trust-remote-code"),
        # transformers asked on stdin whether to run it, ran it on "y" (and the export kept its auto_map), or,
        # unanswered, retrofit said the source had no image processor and used a default one
        ("preprocessor_config.json", "image_processing_evil.py", "ViTImageProcessor",
         {"image_processor_type": "Evil", "auto_map": {"AutoImageProcessor": "image_processing_evil.Evil"}},
         "is custom code of its own (auto_map in preprocessor_config.json)"),
        # a processor's layout (processor_config.json, the image processor's settings nested), which transformers
        # refused as having no image processor type: retrofit said the source had none, and used a default one
        ("processor_config.json", "image_processing_evil.py", "ViTImageProcessor",
         {"image_processor": {"image_processor_type": "Evil"},
          "auto_map": {"AutoProcessor": "image_processing_evil.Evil"}},
         "is custom code of its own (auto_map in processor_config.json)"),
    ],
    ids=["config", "image-processor", "processor"],
)  # fmt: skip
def test_source_code_never_runs_without_trust_remote_code(
    capsys, tmp_path, tiny_vit, config_file, code_file, base, fields, refusal
):
    """A source naming a class of its own code (auto_map) is refused in one line; nothing runs, nothing is asked."""
    source = tmp_path / "custom"
    shutil.copytree(tiny_vit, source)
    marker = tmp_path / "code-ran"
    (source / code_file).write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        f"from transformers import {base}\n\nclass Evil({base}):\n    model_type = 'evil'\n"
    )
    if config_file == "processor_config.json":
        processor = json.loads((source / "preprocessor_config.json").read_text())
        (source / "preprocessor_config.json").unlink()
        fields = {**fields, "image_processor": {**processor, **fields["image_processor"]}}
    config = json.loads((source / config_file).read_text()) if (source / config_file).exists() else {}
    (source / config_file).write_text(json.dumps({**config, **fields}))
    code, err = run_cli(capsys, "convert", source, "--after-layer", 1, "--tokens", 2, "--output", tmp_path / "o")
    assert code == 2 and refusal in err, err
    assert not marker.exists() and not (tmp_path / "o").exists()


def test_the_custom_code_hint_names_the_commands_that_take_trust_remote_code(capsys, tmp_path, tiny_vit):
    """bench said "pass --trust-remote-code if you trust it", an option bench refuses as unknown."""
    source = tmp_path / "custom"
    shutil.copytree(tiny_vit, source)
    config = json.loads((source / "config.json").read_text())
    custom = {"model_type": "mine", "auto_map": {"AutoConfig": "configuration_mine.Mine"}}
    (source / "config.json").write_text(json.dumps({**config, **custom}))
    code, err = run_cli(capsys, "bench", source, "--batch-size", 1)
    assert code == 2 and "pass --trust-remote-code to convert, finetune or evaluate (bench, sweep" in err, err


def test_a_config_nested_too_deeply_to_parse_is_one_line(tiny_vit, tmp_path, capsys):
    """json's parser gives up on a file nested thousands deep (damaged, or made to crash) with a RecursionError,
    which no reader's `except ValueError` took: a traceback, exit 1. One line, exit 2."""
    source = tmp_path / "deep"
    shutil.copytree(tiny_vit, source)
    text = (source / "config.json").read_text().rstrip().removesuffix("}")
    (source / "config.json").write_text(text + ', "x": ' + "[" * 100_000 + "]" * 100_000 + "}")
    code, err = run_cli(capsys, "convert", source, "--after-layer", 1, "--tokens", 2, "--output", tmp_path / "o")
    assert code == 2 and err.strip().splitlines() == [
        "retrofit: error: a file this command read (a config, a report, a checkpoint's record) is nested too deeply "
        "to read: it is damaged; write it again or remove it (-v shows which)"
    ]
    assert not (tmp_path / "o").exists()


def test_a_checkpoint_of_a_users_subclass_keeps_its_trained_classifier(tiny_vit, tiny_deit_distilled, tmp_path, capsys):
    """`save_pretrained` of ``class MyViT(ViTForImageClassification)`` names MyViT, a class transformers does not
    define: its trained classifier was called new (card and log) and evaluate scored its features. Its weights say
    what it is: a classifier where they hold one; a subclass of the backbone still gets a new classifier, said so."""
    from retrofit.loading import load_config

    source = tmp_path / "mine"
    shutil.copytree(tiny_vit, source)
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "architectures": ["MyViT"]}))
    code, err = run_cli(capsys, "convert", source, "--after-layer", 1, "--tokens", 2, "--output", tmp_path / "o")
    assert code == 0 and "classifier is new" not in err + (tmp_path / "o" / "README.md").read_text()
    assert load_config(source).architectures == ["ViTForImageClassification"]
    deit = shutil.copytree(tiny_deit_distilled, tmp_path / "my-deit")  # two classifiers, named as DeiT's own
    config = json.loads((deit / "config.json").read_text())
    (deit / "config.json").write_text(json.dumps({**config, "architectures": ["MyDeiT"]}))
    assert load_config(deit).architectures == ["DeiTForImageClassificationWithTeacher"]
    from safetensors.torch import load_file, save_file
    from transformers import CLIPConfig, CLIPModel

    clip = tmp_path / "my-clip"  # a CLIP with a linear probe: its text tower goes only with convert's note
    small = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    vision = {**small, "image_size": 32, "patch_size": 8}
    CLIPModel(CLIPConfig(text_config=small, vision_config=vision)).save_pretrained(clip)
    config = json.loads((clip / "config.json").read_text())
    (clip / "config.json").write_text(json.dumps({**config, "architectures": ["MyCLIP"]}))
    probe = {"classifier.weight": torch.zeros(2, 32), "classifier.bias": torch.zeros(2)}
    save_file({**load_file(clip / "model.safetensors"), **probe}, clip / "model.safetensors", metadata={"format": "pt"})
    assert load_config(clip).architectures == ["MyCLIP"]
    backbone = tmp_path / "backbone"
    load_model(tiny_vit, config=load_config(tiny_vit, task="image-feature-extraction")).save_pretrained(backbone)
    config = json.loads((backbone / "config.json").read_text())
    (backbone / "config.json").write_text(json.dumps({**config, "architectures": ["MyBackbone"]}))
    assert load_config(backbone).architectures == ["MyBackbone"]  # no classifier weights: what it was
    code, err = run_cli(capsys, "convert", backbone, "--after-layer", 1, "--tokens", 2, "--output", tmp_path / "b")
    assert code == 0 and "the classifier is new (the checkpoint has none)" in err
    weights = load_file(backbone / "model.safetensors")
    for own in (
        {"classifier.0.weight": torch.zeros(16, 32), "classifier.0.bias": torch.zeros(16)},  # an MLP
        {"classifier.weight": torch.zeros(10, 32), "classifier.bias": torch.zeros(10)},
    ):  # 10 outputs, not 3
        save_file({**weights, **own}, backbone / "model.safetensors", metadata={"format": "pt"})
        assert load_config(backbone).architectures == ["MyBackbone"]  # a head of the user's own: not ViT's classifier


def test_python_api_raises_retrofit_error(tiny_vit):
    with pytest.raises(RetrofitError, match="use 1..3"):
        convert(tiny_vit, after_layer=9, num_tokens=2, log=lambda _: None)


def test_an_attention_mask_over_the_input_tokens_does_not_break_merged_layers(vit_export, pixels):
    # transformers materialises an all-visible (B, N) mask in some paths (torch.compile in 5.17, user masks);
    # layers after the merge run on P + M tokens and must not receive it.
    result, _ = vit_export
    mask = torch.ones(pixels.shape[0], 17, dtype=torch.long)
    with torch.no_grad():
        masked = result.model(pixel_values=pixels, attention_mask=mask).logits
    torch.testing.assert_close(masked, logits(result.model, pixels))


@pytest.mark.slow
def test_merged_model_compiles_as_one_graph(vit_export, pixels):
    """`bench --compile` and users' torch.compile: the merged layers add no graph break (fullgraph=True)."""
    result, _ = vit_export
    compiled = torch.compile(result.model, fullgraph=True)
    torch.testing.assert_close(logits(compiled, pixels), logits(result.model, pixels))


@pytest.mark.slow
def test_export_runs_in_onnx_runtime_with_any_batch_size(vit_export, tmp_path):
    """The README's deployment snippet: load the export with transformers, torch.onnx.export it with a dynamic
    batch, and ONNX Runtime gives the same logits at another batch size."""
    pytest.importorskip("onnxruntime")
    from conftest import onnx_run
    from transformers import AutoModelForImageClassification

    _, out = vit_export
    model = AutoModelForImageClassification.from_pretrained(out, trust_remote_code=True).eval()
    pixels = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    onnx_logits = onnx_run(model, pixels, tmp_path / "model.onnx", "logits")
    torch.testing.assert_close(onnx_logits, logits(model, pixels), atol=1e-5, rtol=1e-4)


def test_card_of_a_vision_tower_says_how_to_load_it(tmp_path):
    from conftest import save_tiny
    from transformers import CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                              image_size=32, patch_size=8)  # fmt: skip
    source = save_tiny(CLIPVisionModel(config), tmp_path / "clip-vision")
    convert(source, after_layer=2, num_tokens=4, output=tmp_path / "out", log=lambda _: None)
    card = (tmp_path / "out" / "README.md").read_text()
    assert "pipeline_tag: image-feature-extraction" in card
    assert "AutoModel.from_pretrained(" in card and "AutoModelForImageClassification" not in card


def test_cost_uses_the_size_the_processor_feeds(tmp_path):
    from transformers import BitImageProcessor, Dinov2Config, Dinov2ForImageClassification

    # Like facebook/dinov2-*: the config says a large image_size, the processor crops smaller.
    config = Dinov2Config(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, mlp_ratio=2, image_size=64,
                          patch_size=8, num_labels=2)  # fmt: skip
    source = tmp_path / "dinov2"
    Dinov2ForImageClassification(config).save_pretrained(source)
    BitImageProcessor(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32}).save_pretrained(source)
    result = convert(source, after_layer=2, num_tokens=4, output=tmp_path / "pm", log=lambda _: None)
    assert result.before.tokens_per_layer == [17] * 4  # 32x32 crops: 16 patches + CLS, not 64 + CLS
    card = (tmp_path / "pm" / "README.md").read_text()  # and the card's cost table, at the same size
    assert "| tokens before | 17 | 17 | 17 | 17 |\n| tokens after | 17 | 17 | 5 | 5 |" in card
    assert f"GFLOPs per image: {result.before.gflops:.4g} -> {result.after.gflops:.4g}" in card
    with pytest.raises(RetrofitError, match="use 1..15"):
        convert(source, after_layer=2, num_tokens=20, log=lambda _: None)


def test_the_image_size_is_the_processors_crop_or_resize_or_the_configs_without_one(tmp_path):
    """The size a model is priced and checked at: its processor's crop where it crops, else its resize (a shortest
    edge included); a source without a processor is fed its config's (height, width), not (width, height)."""
    from conftest import TINY
    from transformers import BitImageProcessor, ViTConfig, ViTModel

    from retrofit.loading import load_config, load_image_processor, processor_image_size

    crop = {"height": 32, "width": 32}
    assert processor_image_size(BitImageProcessor(size={"shortest_edge": 40}, crop_size=crop)) == (32, 32)
    no_crop = BitImageProcessor(size={"shortest_edge": 40}, crop_size=crop, do_center_crop=False)
    assert processor_image_size(no_crop) == (40, 40)
    source = tmp_path / "oblong"
    ViTModel(ViTConfig(**{**TINY, "image_size": [32, 48]})).save_pretrained(source)
    processor = load_image_processor(source, load_config(source), log=lambda _: None)
    assert processor_image_size(processor) == (32, 48)


def test_a_full_disk_is_one_line_and_leaves_nothing(capsys, tmp_path, tiny_vit, monkeypatch):
    """A file-system error (here the disk fills up as the export is moved into place) is one line naming the path,
    not a traceback, and the temporary folder is removed. The line names the output the user gave, not the temporary
    sibling it was written as (``.o.tmp-k2j4x9qa``), which the error names first."""
    import errno

    import retrofit.atomic

    def full(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device", str(src), None, str(dst))  # as os.replace does

    monkeypatch.setattr(retrofit.atomic.os, "replace", full)
    out = tmp_path / "o"
    message = f"No space left on device ('{out}'); check the path, its permissions and the free space"
    assert_refused(capsys, out, tiny_vit, "--after-layer", 1, "--tokens", 2, match=message)


def test_an_output_holding_the_current_folder_is_refused(capsys, tmp_path, tiny_vit, monkeypatch):
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    for output in (".", ".."):
        code, err = run_cli(capsys, "convert", tiny_vit, "--after-layer", 1, "--tokens", 2, "--output", output,
                            "--overwrite")  # fmt: skip
        assert code == 2 and err == (
            f"retrofit: error: output '{output}' holds the current folder, so it cannot be replaced; choose another "
            "--output"
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"] and not list((tmp_path / "work").iterdir())


def test_an_output_that_is_or_holds_the_source_is_refused(capsys, tmp_path, tiny_vit):
    """--overwrite must never replace the checkpoint being read: the source is kept, nothing is written."""
    source = tmp_path / "models" / "vit"
    shutil.copytree(tiny_vit, source)
    before = sorted(p.name for p in source.iterdir())
    for output in (source, source.parent):
        code, err = run_cli(capsys, "convert", source, "--after-layer", 1, "--tokens", 2, "--output", output,
                            "--overwrite")  # fmt: skip
        assert code == 2 and err == (
            f"retrofit: error: output '{output}' is or holds '{source}', which this run reads; choose another --output"
        )
    assert sorted(p.name for p in source.iterdir()) == before


def test_an_output_that_cannot_be_written_is_refused_before_any_work(capsys, tmp_path, tiny_vit):
    (tmp_path / "a-file").write_text("x")
    assert_refused(capsys, tmp_path / "a-file" / "out", tiny_vit, "--after-layer", 1, "--tokens", 2,
                   match=f"is under '{tmp_path / 'a-file'}', which is a file; choose another --output")  # fmt: skip
    code, err = run_cli(capsys, "convert", tiny_vit, "--after-layer", 1, "--tokens", 2, "--output", " ")
    assert code == 2 and err == "retrofit: error: --output is empty (got ' '); give a value or leave the option out"


def test_a_full_disk_while_saving_the_weights_is_one_line(capsys, tmp_path, tiny_vit, monkeypatch):
    """safetensors reports its own I/O errors as SafetensorError, not OSError: still one line, nothing left."""
    from safetensors import SafetensorError
    from transformers import PreTrainedModel

    def full(self, *args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full)
    out = tmp_path / "o"
    assert_refused(capsys, out, tiny_vit, "--after-layer", 1, "--tokens", 2,
                   match=f"cannot write the weights to '{out}' (Error while serializing")  # fmt: skip


def test_a_tilde_in_an_output_is_the_home_folder(tiny_vit, tmp_path, monkeypatch):
    """``--output=~/pm`` (the shell leaves ``~`` alone after ``=``) and Python calls with "~/..." wrote a folder named
    ``~`` in the current one, while the inputs' ``~`` was the home folder."""
    from transformers import AutoImageProcessor

    from retrofit import export

    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir(), cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    assert main(["convert", str(tiny_vit), "--after-layer", "2", "--tokens", "4", "--output=~/cli"]) == 0
    result = convert(str(tiny_vit), after_layer=2, num_tokens=4, output="~/api")
    export(result.model, "~/exported", image_processor=AutoImageProcessor.from_pretrained(tiny_vit))
    assert {path.name for path in home.iterdir()} == {"cli", "api", "exported"}
    assert list(cwd.iterdir()) == []
    # a source under "~" in a Python call (no shell expands it) is the home folder's too: it was read as a Hub id
    shutil.copytree(tiny_vit, home / "source")
    again = convert("~/source", after_layer=2, num_tokens=4, output="~/from-home")
    assert again.model.config.merge_source == "source" and (home / "from-home" / "config.json").is_file()
    with pytest.raises(RetrofitError, match="which this run reads"):  # the home folder's source is an input
        convert("~/source", after_layer=2, num_tokens=4, output=str(home / "source"), overwrite=True)


def test_a_classifier_loaded_from_a_backbone_checkpoint_is_merged_as_the_class_it_is(tmp_path):
    """`ViTForImageClassification.from_pretrained(<a ViTModel checkpoint>)` keeps the checkpoint's architectures
    (ViTModel): insert_patch_merger built a merged ViTModel for it and failed with "surgery mismatch"."""
    from conftest import TINY
    from test_data import make_imagefolder
    from transformers import ViTConfig, ViTForImageClassification, ViTModel

    ViTModel(ViTConfig(**TINY)).save_pretrained(tmp_path / "backbone")
    classifier = ViTForImageClassification.from_pretrained(tmp_path / "backbone")
    merged = insert_patch_merger(classifier, 2, 4)
    assert type(merged).__name__ == "ViTPatchMergerForImageClassification"
    assert merged.config.architectures == ["ViTPatchMergerForImageClassification"]
    # convert --task image-classification: the card and the log say that the classifier is random (it said nothing)
    logged = []
    convert(tmp_path / "backbone", after_layer=2, num_tokens=4, output=tmp_path / "pm", task="image-classification",
            log=logged.append)  # fmt: skip
    new = "the classifier is new (the checkpoint has none): its 3 outputs are random until it is trained"
    assert f"note: {new}" in "\n".join(logged) and new in (tmp_path / "pm" / "README.md").read_text()
    # calibrated by the features the new classifier reads: the card gave the random head's "agreement with the source"
    data = str(make_imagefolder(tmp_path / "colours"))
    convert(tmp_path / "backbone", after_layer=2, num_tokens=4, output=tmp_path / "cal", task="image-classification",
            calibrate_on=data, calibrate_images=4, log=logged.append)  # fmt: skip
    card = (tmp_path / "cal" / "README.md").read_text()
    assert "; cosine similarity of the features with the source " in card and "top-1 agreement" not in card
    # scored as it is, the random head's accuracy was shown as the model's: the table now says it is chance
    from retrofit import evaluate_models

    report = evaluate_models([str(tmp_path / "pm")], data=data, split="test", log=lambda _: None)
    assert report["models"][0]["untrained_classifier"] is True
    assert "`'s classifier was never trained (its card says so" in report["table"]


def test_convert_is_reproducible_and_leaves_the_callers_random_state_alone(tiny_vit, tmp_path):
    """Two converts of one checkpoint give the same merger (its random start was drawn from the caller's generator, so
    each export differed and a notebook's later draws moved); --seed picks another start. Calibrating leaves the
    caller's draws alone too (its data loader drew from torch's generator)."""
    from test_data import make_imagefolder

    state = torch.random.get_rng_state()
    queries = [
        dict(convert(tiny_vit, after_layer=1, num_tokens=4, log=lambda _: None, **seed).model.named_parameters())[
            "vit.layers.1.patch_merger.queries"
        ].detach()
        for seed in ({}, {}, {"seed": 1})
    ]
    assert torch.equal(torch.random.get_rng_state(), state)
    data = make_imagefolder(tmp_path / "colours", per_class=2, test_per_class=1)
    convert(tiny_vit, after_layer=1, num_tokens=4, calibrate_on=str(data), calibrate_images=4, log=lambda _: None)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(queries[0], queries[1]) and not torch.equal(queries[0], queries[2])
    assert main(["convert", str(tiny_vit), "--after-layer", "1", "--tokens", "4", "--seed", "-1"]) == 2


def test_surgery_keeps_the_models_settings():
    """The merged model keeps what the source model was given: its mode (eval or train), its dtype, its attention
    implementation; the merger takes the config's layer_norm_eps and draws its queries at its initializer_range."""
    from conftest import TINY
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(**TINY, layer_norm_eps=1e-3, initializer_range=0.5, attn_implementation="eager")
    source = ViTForImageClassification(config).to(torch.bfloat16).eval()
    merged = insert_patch_merger(source, 1, 8)
    merger = merged.patch_merger
    assert not merged.training and not merger.training
    assert merger.queries.dtype == merger.norm.weight.dtype == torch.bfloat16
    assert merger.norm.eps == 1e-3 and 0.3 < merger.queries.float().std() < 0.5
    assert merged.config._attn_implementation == "eager"
    assert insert_patch_merger(ViTForImageClassification(ViTConfig(**TINY)).train(), 1, 8).training
