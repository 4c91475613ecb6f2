"""BEiT and Data2Vec-vision after the merge: the layers after it give the merged tokens the merge-weighted relative
position bias of the patches they average (T^T · bias · T, per image). tests/test_families.py runs both families
through convert, export, reload (transformers 5.0 .. installed), pipeline, calibration and fine-tuning; this file
checks what the bias after the merge is."""

from __future__ import annotations

import copy
import sys

import pytest
import torch
from torch import nn

from retrofit.calibrate import bypass_merger
from retrofit.cost import model_cost
from retrofit.surgery import insert_patch_merger

K, M = 2, 3
LAYERS = 4


def _model(family: str, bias: str, cls: str = "Model", **overrides) -> nn.Module:
    """A tiny BEiT or Data2Vec-vision with a random (not zero) relative position bias, per layer or shared."""
    import transformers

    prefix = {"beit": "Beit", "data2vec": "Data2VecVision"}[family]
    config_class = getattr(transformers, f"{prefix}Config")
    model_class = getattr(transformers, f"{prefix}{cls}")
    torch.manual_seed(0)
    config = config_class(
        hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=2, intermediate_size=64, image_size=32,
        patch_size=8, num_labels=3, use_relative_position_bias=bias == "layer",
        use_shared_relative_position_bias=bias == "shared", architectures=[model_class.__name__],
        **{"layer_scale_init_value": 1.0, **overrides},  # trained layer scales are larger than the initial 0.1
    )  # fmt: skip
    model = model_class(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("relative_position_bias_table"):
                parameter.normal_()
    return model


MODELS = {
    "beit-layer": lambda: _model("beit", "layer", "ForImageClassification"),
    "beit-shared": lambda: _model("beit", "shared"),
    "data2vec-layer": lambda: _model("data2vec", "layer", "ForImageClassification"),
    "data2vec-shared": lambda: _model("data2vec", "shared"),
}


def _bias_modules(model: nn.Module) -> list[nn.Module]:
    return [module for module in model.modules() if "RelativePositionBias" in type(module).__name__]


def _layers(model: nn.Module) -> nn.ModuleList:
    return next(module for module in model.modules() if isinstance(module, nn.ModuleList))


def _select(bias: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """bias (1 or B, heads, S, S) -> (B, heads, Q, Q): the entries between the tokens `keep` (B, Q) of each image."""
    batch, queries = keep.shape
    bias = bias.expand(batch, -1, -1, -1)
    heads, tokens = bias.shape[1], bias.shape[-1]
    rows = torch.gather(bias, 2, keep[:, None, :, None].expand(-1, heads, -1, tokens))
    return torch.gather(rows, 3, keep[:, None, None, :].expand(-1, heads, queries, -1))


def _source_on_tokens(source: nn.Module, pixels: torch.Tensor, keep: torch.Tensor, **kwargs):
    """The source model with layers K.. running on the tokens `keep` (B, Q) of their input only, each pair of them
    with its own relative position bias, as if the other tokens were not there."""
    layers = _layers(source)
    merged_layers = {id(layer) for layer in layers[K:]}
    handles = []

    def select_tokens(module, args, kwargs):
        hidden_states = args[0]
        chosen = torch.gather(hidden_states, 1, keep[..., None].expand(-1, -1, hidden_states.shape[-1]))
        return (chosen, *args[1:]), kwargs

    def select_shared_bias(module, args, kwargs):  # passed as `attention_mask` or `relative_position_bias`
        return args, {name: _select(v, keep) if torch.is_tensor(v) and v.is_floating_point() else v
                      for name, v in kwargs.items()}  # fmt: skip

    handles.append(layers[K].register_forward_pre_hook(select_tokens, with_kwargs=True))
    for layer in layers[K:]:
        handles.append(layer.register_forward_pre_hook(select_shared_bias, with_kwargs=True))
    owners = {id(bias): id(layer) for layer in layers for bias in _bias_modules(layer)}
    for bias in _bias_modules(source):
        compute = bias.forward

        def forward(window_size, interpolate_pos_encoding=False, dim_size=None, compute=compute, own=bias):
            full = compute(window_size, interpolate_pos_encoding, dim_size=1 + window_size[0] * window_size[1])
            return _select(full, keep) if owners.get(id(own)) in merged_layers else full

        bias.forward = forward
    try:
        with torch.no_grad():
            return source(pixel_values=pixels, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
        for bias in _bias_modules(source):
            del bias.forward


@pytest.mark.parametrize("size", [32, 48])
@pytest.mark.parametrize("name", MODELS)
def test_a_merged_token_that_is_one_patch_gets_that_patchs_bias(name, size):
    """With one-hot merge weights each merged token is one patch: the merged model must then compute what the source
    computes on those patches alone, with the bias between them (per layer or shared, at the native image size and
    at another one). The reference runs the source's own layers and bias tables."""
    source = MODELS[name]()
    merged = insert_patch_merger(source, K, M).eval()
    pixels = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1))
    patches = (size // 8) ** 2
    index = torch.stack([torch.randperm(patches, generator=torch.Generator().manual_seed(b))[:M] for b in range(3)])
    one_hot = nn.functional.one_hot(index, patches).transpose(1, 2).float()  # (B, N, M)
    merged.patch_merger.merge_weights = lambda tokens, valid=None: one_hot.to(tokens.dtype)
    keep = torch.cat([torch.zeros(3, 1, dtype=torch.long), index + 1], dim=1)  # CLS and the chosen patches
    kwargs = {"interpolate_pos_encoding": True} if size != 32 else {}

    with torch.no_grad():
        got = merged(pixel_values=pixels, **kwargs)
    expected = _source_on_tokens(source, pixels, keep, **kwargs)
    key = "logits" if "logits" in got else "last_hidden_state"
    assert got[key].shape == expected[key].shape
    torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-5)
    # and the comparison can fail: without the bias the outputs differ by far more than the tolerance
    with torch.no_grad():
        for bias in _bias_modules(source):
            bias.relative_position_bias_table.zero_()
        without = merged(pixel_values=pixels, **kwargs)[key]
    assert (without - got[key]).abs().max() > 1e-3


def test_merged_bias_is_the_merge_weighted_mean_of_the_patches_bias():
    """With soft merge weights, the bias a merged layer adds is T^T · bias · T: the entries of CLS unchanged, and
    between merged tokens i and j the sum over patches p, q of A[p, i] · A[q, j] · bias[p, q]."""
    merged = insert_patch_merger(MODELS["beit-layer"](), K, M).eval()
    with torch.no_grad():
        merged.patch_merger.queries.normal_(std=3.0)
    layer = _layers(merged)[K + 1]
    bias_module = _bias_modules(layer)[0]
    seen = []
    handle = bias_module.register_forward_hook(lambda module, args, output: seen.append(output))
    pixels = torch.randn(2, 3, 32, 32)
    weights = []
    weights_hook = merged.patch_merger.register_forward_pre_hook(
        lambda module, args: weights.append(module.merge_weights(args[0][:, 1:]))
    )
    with torch.no_grad():
        merged(pixel_values=pixels)
        sys.modules[type(merged).__module__].set_merge_transform(bias_module, None)  # the unmerged bias
        full = bias_module((4, 4))  # (1, heads, 17, 17)
    handle.remove()
    weights_hook.remove()
    a = weights[0]  # (B, N, M)
    got = seen[0]  # (B, heads, 1 + M, 1 + M)
    assert got.shape == (2, 2, 1 + M, 1 + M)
    expected = torch.einsum("bpi,hpq,bqj->bhij", a, full[0, :, 1:, 1:], a)
    torch.testing.assert_close(got[:, :, 1:, 1:], expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[:, :, 0, 0], full[:, :, 0, 0].expand(2, -1))  # CLS to CLS
    torch.testing.assert_close(got[:, :, 0, 1:], full[:, :, 0, 1:2].expand(2, -1, M))  # CLS to any patch
    torch.testing.assert_close(got[:, :, 1:, 0], full[:, :, 1:2, 0].expand(2, -1, M))  # any patch to CLS


@pytest.mark.parametrize("name", MODELS)
def test_bypassed_merger_computes_the_source_model(name):
    """The merger replaced by the identity: every bias is the source's (T = I), so the outputs are exactly the
    source's, at another image size too."""
    source = MODELS[name]()
    merged = insert_patch_merger(source, K, M).eval()
    pixels = torch.randn(2, 3, 48, 48)
    with torch.no_grad(), bypass_merger(merged):
        got = merged(pixel_values=pixels, interpolate_pos_encoding=True)
    with torch.no_grad():
        expected = source(pixel_values=pixels, interpolate_pos_encoding=True)
    key = "logits" if "logits" in got else "last_hidden_state"
    torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "family, bias, cls, reentrant",
    [("beit", "layer", "ForImageClassification", False), ("data2vec", "shared", "Model", True)],
)
def test_gradient_checkpointing_keeps_each_forward_passes_merge(family, bias, cls, reentrant):
    """Each forward pass files its own merge weights, so two forward passes (other image sizes, so other N) before one
    backward pass give the same gradients with the layers recomputed under gradient checkpointing as without, also
    with reentrant checkpointing, whose first pass runs without gradients."""
    model = insert_patch_merger(_model(family, bias, cls, drop_path_rate=0.0), K, M)  # no random stochastic depth
    with torch.no_grad():
        model.patch_merger.queries.mul_(50)  # sharp weights: the bias between merged tokens matters
    first, second = torch.randn(2, 3, 32, 32), torch.randn(3, 3, 48, 48)

    def gradients(checkpointing: bool) -> dict[str, torch.Tensor]:
        trained = copy.deepcopy(model).train()
        if checkpointing:
            trained.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        out = [trained(pixel_values=x, interpolate_pos_encoding=True) for x in (first, second)]
        loss = sum((o.logits if "logits" in o else o.last_hidden_state).square().sum() for o in out)
        loss.backward()
        return {name: p.grad for name, p in trained.named_parameters() if p.grad is not None}

    plain, recomputed = gradients(False), gradients(True)
    assert plain.keys() == recomputed.keys()
    assert any("relative_position_bias" in name for name in plain) and any("patch_merger" in name for name in plain)
    for name in plain:  # reentrant sums some gradients in another order: CLS's (~4e3) moves by ~1e-3
        scale = float(plain[name].abs().max())
        torch.testing.assert_close(recomputed[name], plain[name], atol=1e-5 + 1e-6 * scale, rtol=1.3e-6, msg=name)


def test_compiles_as_one_graph():
    """torch.compile(fullgraph=True): filing and reading the merge weights adds no graph break. A graph break is
    TorchDynamo's to find, and AOTAutograd's tracing the ops it keeps, so the test stops there ("aot_eager"); inductor
    compiles a merged model in tests/test_convert.py."""
    merged = insert_patch_merger(MODELS["beit-layer"](), K, M).eval()
    pixels = torch.randn(2, 3, 32, 32)
    compiled = torch.compile(merged, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        for _ in range(2):
            torch.testing.assert_close(compiled(pixel_values=pixels).logits, merged(pixel_values=pixels).logits)


def test_merged_layers_keep_their_stochastic_depth():
    """The merged layers are rebuilt with the drop-path rate their source layer had (it grows with depth)."""
    source = _model("beit", "layer", "ForImageClassification", drop_path_rate=0.3)
    merged = insert_patch_merger(source, K, M)
    rates = [getattr(layer.drop_path, "drop_prob", 0.0) for layer in _layers(merged)]
    assert rates == [getattr(layer.drop_path, "drop_prob", 0.0) for layer in _layers(source)]
    assert rates[-1] == pytest.approx(0.3) and rates[K] > 0


def test_cost_counts_merging_the_bias():
    """Merging the bias costs heads · (P+M) · S · (S + P+M) MACs per image in each layer after the merge (S = P+N),
    counted with the merger's cost; the layers' own cost is the same as for any ViT."""
    per_layer, shared = MODELS["beit-layer"]().config, MODELS["beit-shared"]().config
    tokens, merged = 1 + 16, 1 + M
    bias_macs = 2 * merged * tokens * (tokens + merged) * (LAYERS - K)
    merger_macs = 2 * 16 * M * 32
    assert model_cost(per_layer, merge=(K, M)).merger_macs == merger_macs + bias_macs
    assert model_cost(shared, merge=(K, M)).merger_macs == merger_macs + bias_macs
    no_bias = per_layer.to_dict() | {"use_relative_position_bias": False}
    assert model_cost(type(per_layer).from_dict(no_bias), merge=(K, M)).merger_macs == merger_macs
    both = per_layer.to_dict() | {"use_shared_relative_position_bias": True}  # each layer adds (and merges) both
    assert model_cost(type(per_layer).from_dict(both), merge=(K, M)).merger_macs == merger_macs + 2 * bias_macs


def test_convert_prints_the_cost_and_the_card_says_how_the_bias_is_merged(tmp_path, capsys):
    """`retrofit convert` on a BEiT checkpoint: the printed cost counts merging the bias, and the model card says
    what the bias between merged tokens is."""
    from retrofit.cli import main

    source = tmp_path / "beit"
    MODELS["beit-layer"]().save_pretrained(source)
    capsys.readouterr()
    out = tmp_path / "beit-pm"
    assert main(["convert", str(source), "--after-layer", str(K), "--tokens", str(M), "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    merger = 2 * 16 * M * 32 + 2 * (1 + M) * 17 * (17 + 1 + M) * (LAYERS - K)
    assert f"merger {2 * merger / 1e9:.2g})" in printed, printed
    card = (out / "README.md").read_text()
    assert "relative position bias after the merge: between merged tokens, the merge-weighted mean" in card


@pytest.mark.parametrize("name", ["beit-layer", "data2vec-shared"])
def test_onnx_export_merges_the_bias_per_image(name, tmp_path):
    """torch.onnx.export with a dynamic batch, then ONNX Runtime, merges the bias for every image as PyTorch does.
    BEiT's own code does not export with `dynamo=True` (transformers 5.24, torch 2.13: the source models fail too),
    so this is the TorchScript exporter (`dynamo=False`) the docs name for these two families."""
    pytest.importorskip("onnxruntime")
    from conftest import onnx_run

    merged = insert_patch_merger(MODELS[name](), K, M).eval()
    with torch.no_grad():
        merged.patch_merger.queries.mul_(50)  # sharp weights: the bias between merged tokens matters
    key = "logits" if "ForImageClassification" in type(merged).__name__ else "last_hidden_state"
    pixels = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    got = onnx_run(merged, pixels, tmp_path / "model.onnx", key, dynamo=False)
    with torch.no_grad():
        expected = merged(pixel_values=pixels)[key]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["beit-layer", "data2vec-layer"])
def test_threads_running_the_model_at_once_each_merge_their_own_bias(name):
    """An inference server runs one model from several threads at once. Each merged layer used to hand its bias module
    the merge of the call as an attribute, shared by the threads: a thread merged its bias with another thread's
    merge, a failing forward (another batch size) or a silently wrong one (the same batch size). With more threads than
    the forward passes kept for gradient checkpointing (8), a pass's merge weights were pushed out by the others'
    before its last layer ran: a RuntimeError."""
    import threading

    merged = insert_patch_merger(MODELS[name](), K, M).eval()
    with torch.no_grad():
        merged.patch_merger.queries.mul_(50)  # sharp weights: each batch's merge differs
    sizes = [2, 2, 3] * 4  # 12 threads
    batches = [torch.randn(size, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i, size in enumerate(sizes)]
    with torch.no_grad():
        expected = [merged(pixel_values=pixels).logits for pixels in batches]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads often: the race shows within a few calls
    failures = []

    def run(index: int) -> None:
        for _ in range(30):
            try:
                with torch.no_grad():
                    got = merged(pixel_values=batches[index]).logits
            except RuntimeError as error:
                failures.append(f"batch {index}: {error}")
                continue
            if not torch.allclose(got, expected[index], rtol=0, atol=1e-5):
                failures.append(f"batch {index}: logits differ by {(got - expected[index]).abs().max():.3g}")

    threads = [threading.Thread(target=run, args=(index,)) for index in range(len(batches))]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    assert not failures, failures[:3]
