"""DINOv3 after the merge: where RoPE puts the merged tokens (`merge_rope_positions`, `retrofit convert
--rope-positions`). The default rotates each merged token at the merge-weighted mean of its patches' centres."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from conftest import save_tiny

from retrofit.cli import main
from retrofit.errors import RetrofitError
from retrofit.surgery import insert_patch_merger

K, M = 2, 5
PREFIX = 1 + 4  # CLS + registers


def _dinov3(**overrides):
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    torch.manual_seed(0)
    config = DINOv3ViTConfig(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64, patch_size=4,
        num_register_tokens=4, layerscale_value=0.5, **{"image_size": 32, **overrides},
    )  # fmt: skip
    return DINOv3ViTModel(config).eval()


@pytest.fixture(scope="module")
def source():
    return _dinov3()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_tiny(_dinov3(), tmp_path_factory.mktemp("dinov3") / "tiny-dinov3")


def _layers(model) -> torch.nn.ModuleList:
    return model.model.layer  # DINOv3ViTModel's encoder layers in transformers 5.24


@pytest.mark.parametrize("positions", ["mean", "none"])
@pytest.mark.parametrize("size", [(32, 32), (32, 48)])
def test_a_merged_token_that_is_one_patch_is_rotated_as_that_patch(source, positions, size):
    """With one-hot merge weights each merged token is one patch. "mean" must then rotate it exactly as the source
    rotates that patch (non-square images included: the grid is not N's square root); "none" must not rotate it.
    The reference runs the source's own layers K.. on the chosen tokens."""
    merged = insert_patch_merger(source, K, M, rope_positions=positions).eval()
    pixels = torch.randn(3, 3, *size, generator=torch.Generator().manual_seed(1))
    patches = (size[0] // 4) * (size[1] // 4)
    index = torch.stack([torch.randperm(patches, generator=torch.Generator().manual_seed(b))[:M] for b in range(3)])
    one_hot = torch.nn.functional.one_hot(index, patches).transpose(1, 2).float()  # (B, N, M)
    merged.patch_merger.merge_weights = lambda tokens, valid=None: one_hot.to(tokens.dtype)

    layers = _layers(source)
    seen = []
    hook = layers[K].register_forward_pre_hook(lambda module, args, kwargs: seen.append(args[0]), with_kwargs=True)
    with torch.no_grad():
        source(pixel_values=pixels)
        hook.remove()
        tokens = seen[0]
        chosen = torch.gather(tokens[:, PREFIX:], 1, index[..., None].expand(-1, -1, tokens.shape[-1]))
        hidden = torch.cat([tokens[:, :PREFIX], chosen], dim=1)
        cos, sin = source.rope_embeddings(pixels)  # (N, head_dim)
        cos, sin = cos[index][:, None], sin[index][:, None]  # (B, 1, M, head_dim)
        if positions == "none":
            cos, sin = torch.ones_like(cos), torch.zeros_like(sin)
        for layer in layers[K:]:
            hidden = layer(hidden, position_embeddings=(cos, sin))
        expected = source.norm(hidden)
        got = merged(pixel_values=pixels).last_hidden_state
    assert got.shape == (3, PREFIX + M, 32)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_mean_positions_move_with_the_merge_weights(source):
    """Merged tokens at their mean positions change the output compared with unrotated merged tokens, and the
    merged rotation is cos/sin of 2π · (Aᵀ · centres) ⊗ inv_freq, per image."""
    pixels = torch.randn(2, 3, 32, 48, generator=torch.Generator().manual_seed(2))
    mean = insert_patch_merger(source, K, M).eval()
    none = insert_patch_merger(source, K, M, rope_positions="none").eval()
    with torch.no_grad():  # sharp weights: random queries average nearly uniformly, around the image's centre
        mean.patch_merger.queries.mul_(50)
    none.patch_merger.load_state_dict(mean.patch_merger.state_dict())
    assert mean.config.merge_rope_positions == "mean" and none.config.merge_rope_positions == "none"
    rotations = []
    hook = _layers(mean)[K + 1].register_forward_pre_hook(
        lambda module, args, kwargs: rotations.append(kwargs["position_embeddings"]), with_kwargs=True
    )
    with torch.no_grad():
        out_mean = mean(pixel_values=pixels).last_hidden_state
        out_none = none(pixel_values=pixels).last_hidden_state
    hook.remove()
    assert (out_mean - out_none).abs().max() > 1e-4

    tokens = []
    hook = mean.patch_merger.register_forward_pre_hook(lambda module, args: tokens.append(args[0]))
    with torch.no_grad():
        mean(pixel_values=pixels)
        weights = mean.patch_merger.merge_weights(tokens[0][:, PREFIX:]).float()  # (B, N, M)
    hook.remove()
    y, x = torch.meshgrid((torch.arange(8) + 0.5) / 8 * 2 - 1, (torch.arange(12) + 0.5) / 12 * 2 - 1, indexing="ij")
    centres = weights.transpose(1, 2) @ torch.stack([y.flatten(), x.flatten()], dim=-1)  # (B, M, 2)
    angles = 2 * torch.pi * centres[..., None] * mean.rope_embeddings.inv_freq  # (B, M, 2, head_dim / 4)
    angles = torch.cat([angles.flatten(2)] * 2, dim=-1)[:, None]
    torch.testing.assert_close(rotations[0].merged[0][0], angles.cos())
    torch.testing.assert_close(rotations[0].merged[0][1], angles.sin())


@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_keeps_each_forward_passes_positions(reentrant):
    """Every forward pass carries its own merged positions, so two forward passes (other image sizes) before one
    backward pass give the same gradients with the layers recomputed under gradient checkpointing as without."""
    model = insert_patch_merger(_dinov3(pos_embed_rescale=None), K, M)  # no random RoPE augmentation in training
    with torch.no_grad():
        model.patch_merger.queries.mul_(50)  # sharp weights: the positions matter
    first, second = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 48)

    def gradients(checkpointing: bool) -> dict[str, torch.Tensor]:
        trained = copy.deepcopy(model).train()
        if checkpointing and hasattr(trained, "activation_checkpointing_enable"):  # its name from transformers 5.2x
            trained.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
        elif checkpointing:
            trained.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        loss = sum(trained(pixel_values=x).pooler_output.square().sum() for x in (first, second))
        loss.backward()
        return {name: p.grad for name, p in trained.named_parameters() if p.grad is not None}

    plain, recomputed = gradients(False), gradients(True)
    assert plain.keys() == recomputed.keys() and any("patch_merger" in name for name in plain)
    for name in plain:
        torch.testing.assert_close(recomputed[name], plain[name], msg=name)


def test_compiles_as_one_graph(source):
    """torch.compile(fullgraph=True): placing the merged tokens adds no graph break (TorchDynamo's and AOTAutograd's
    tracing, "aot_eager"; inductor compiles a merged model in tests/test_convert.py)."""
    merged = insert_patch_merger(source, K, M).eval()
    pixels = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        expected = merged(pixel_values=pixels).last_hidden_state
        got = torch.compile(merged, fullgraph=True, backend="aot_eager")(pixel_values=pixels).last_hidden_state
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_convert_writes_the_positions_and_the_export_reloads_them(checkpoint, tmp_path, capsys):
    """`retrofit convert --rope-positions`: the export's config and model card say which, and it loads with
    transformers alone (trust_remote_code) to the same outputs, on a non-square image too."""
    from transformers import AutoModel

    from retrofit import load_model

    pixels = torch.randn(2, 3, 32, 48)
    for flag, expected in (([], "mean"), (["--rope-positions", "none"], "none")):
        out = tmp_path / expected
        args = ["convert", str(checkpoint), "--after-layer", str(K), "--tokens", str(M), "-o", str(out), *flag]
        assert main(args) == 0, capsys.readouterr().err
        assert json.loads((out / "config.json").read_text())["merge_rope_positions"] == expected
        assert f"(`merge_rope_positions: {expected}`)" in (out / "README.md").read_text()  # the model card says so
        ours = load_model(out).eval()
        theirs = AutoModel.from_pretrained(out, trust_remote_code=True).eval()
        assert type(theirs).__module__.startswith("transformers_modules")
        with torch.no_grad():
            torch.testing.assert_close(
                theirs(pixel_values=pixels).last_hidden_state, ours(pixel_values=pixels).last_hidden_state
            )


def test_the_card_of_a_non_square_dinov3_names_the_transformers_it_loads_on(checkpoint, tmp_path):
    """A DINOv3 of a non-square image_size (a list) loads only on transformers releases whose DINOv3 RoPE takes one
    (5.25; not 5.17 or older, the source no more than the export): its card said `transformers>=5.0.0`."""
    from retrofit import convert

    wide = save_tiny(_dinov3(image_size=[32, 48]), tmp_path / "wide")
    for source, oldest in ((checkpoint, "5.0.0"), (wide, "5.25.0")):
        out = convert(source, after_layer=K, num_tokens=M, output=tmp_path / f"pm-{oldest}", log=lambda _: None).output
        assert f"`torch`\nand `transformers>={oldest}`)" in (out / "README.md").read_text()


def test_an_export_from_before_the_setting_keeps_unrotated_merged_tokens(checkpoint, tmp_path):
    """Exports made before `merge_rope_positions` existed have no such key; they load as "none", as they were
    trained."""
    from retrofit import convert, load_model

    out = tmp_path / "old"
    convert(checkpoint, after_layer=K, num_tokens=M, rope_positions="none", output=out, log=lambda _: None)
    config = json.loads((out / "config.json").read_text())
    del config["merge_rope_positions"]
    (out / "config.json").write_text(json.dumps(config))
    old, none = load_model(out).eval(), load_model(checkpoint)
    none = insert_patch_merger(none, K, M, rope_positions="none").eval()
    none.patch_merger.load_state_dict(old.patch_merger.state_dict())
    assert old.config.merge_rope_positions == "none"
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            old(pixel_values=pixels).last_hidden_state, none(pixel_values=pixels).last_hidden_state
        )


def test_bad_rope_positions_are_refused_in_one_line(checkpoint, tiny_vit, tmp_path, capsys):
    """An unknown value, the option on a model without RoPE, and a different value for an export being trained
    further: one-line errors, exit code 2, nothing written."""
    from retrofit import convert
    from retrofit.finetune import finetune

    out = tmp_path / "out"
    code = main(["convert", str(tiny_vit), "--after-layer", "2", "--tokens", "4", "-o", str(out), "--rope-positions",
                 "none"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and not out.exists()
    assert err == (
        "retrofit: error: --rope-positions is for models whose layers use RoPE (DINOv3); ViT has position "
        "embeddings instead: drop the option"
    )
    code = main(["convert", str(checkpoint), "--after-layer", "2", "--tokens", "4", "-o", str(out), "--rope-positions",
                 "centre"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and not out.exists()
    assert err == "retrofit: error: --rope-positions must be one of mean, none, not 'centre'"
    with pytest.raises(RetrofitError, match="--rope-positions must be one of mean, none, not 'centre'"):
        convert(checkpoint, after_layer=K, num_tokens=M, rope_positions="centre")

    export = tmp_path / "export"
    convert(checkpoint, after_layer=K, num_tokens=M, output=export, log=lambda _: None)
    with pytest.raises(RetrofitError, match=r"already merged with --rope-positions mean; drop --rope-positions"):
        finetune(export, output=tmp_path / "more", rope_positions="none", data="fashion-mnist", loss="ce")


@pytest.mark.slow
def test_onnx_export_keeps_the_positions(source, tmp_path):
    """The README's deployment path (torch.onnx.export with a dynamic batch, ONNX Runtime) computes the merged
    tokens' positions per image as PyTorch does."""
    pytest.importorskip("onnxruntime")
    from conftest import onnx_run

    merged = insert_patch_merger(source, K, M).eval()
    with torch.no_grad():
        merged.patch_merger.queries.mul_(50)  # sharp weights: the positions matter
    pixels = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    got = onnx_run(merged, pixels, tmp_path / "model.onnx", "last_hidden_state")
    with torch.no_grad():
        expected = merged(pixel_values=pixels).last_hidden_state
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_a_recipe_takes_the_positions_and_refuses_them_for_a_vit(tmp_path, capsys):
    """`merge.rope_positions` in a recipe (or `retrofit run --rope-positions`) is checked before anything runs."""
    from retrofit.recipes import validate

    recipe = {"source": "x", "merge": {"after_layer": 1, "tokens": 2, "rope_positions": "none"}}
    recipe |= {"data": {"name": "fashion-mnist"}, "export": {"output": "out"}}
    assert validate(recipe)["merge"]["rope_positions"] == "none"
    out = tmp_path / "out"
    repo = Path(__file__).resolve().parents[1]
    code = main(["run", str(repo / "recipes" / "fashion-mnist.yaml"), "-o", str(out), "--rope-positions", "mean"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "--rope-positions is for models whose layers use RoPE" in err, err
    assert not out.exists()
