"""The PatchMerger module on its own: shapes, prefix bypass, convex combinations, permutation invariance."""

import pytest
import torch

from retrofit.merger import PatchMerger


def make(d=16, m=4, p=1) -> PatchMerger:
    torch.manual_seed(0)
    merger = PatchMerger(d, m, p)
    torch.nn.init.normal_(merger.queries, std=1.0)  # sharp enough that outputs differ from the plain mean
    return merger


@pytest.mark.parametrize("prefix", [0, 1, 2, 5])
def test_shapes_and_prefix_bypass(prefix):
    merger = make(p=prefix)
    x = torch.randn(3, prefix + 20, 16)
    y = merger(x)
    assert y.shape == (3, prefix + 4, 16)
    assert torch.equal(y[:, :prefix], x[:, :prefix])


def test_outputs_are_convex_combinations_of_patch_tokens():
    merger = make()
    x = torch.randn(2, 1 + 10, 16)
    weights = merger.merge_weights(x[:, 1:])
    assert weights.shape == (2, 10, 4)
    assert torch.all(weights >= 0)
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(2, 4))
    torch.testing.assert_close(merger(x)[:, 1:], weights.transpose(1, 2) @ x[:, 1:])
    # Merged tokens are not all the plain mean: the queries do select.
    assert not torch.allclose(merger(x)[:, 1], x[:, 1:].mean(1), atol=1e-3)


def test_identical_tokens_merge_to_themselves():
    merger = make()
    token = torch.randn(16)
    x = torch.cat([torch.randn(1, 1, 16), token.expand(1, 12, 16)], dim=1)
    torch.testing.assert_close(merger(x)[0, 1:], token.expand(4, 16))


def test_permutation_invariant_over_patch_tokens():
    merger = make()
    x = torch.randn(2, 1 + 9, 16)
    perm = torch.randperm(9) + 1
    shuffled = torch.cat([x[:, :1], x[:, perm]], dim=1)
    torch.testing.assert_close(merger(x), merger(shuffled))


def test_any_number_of_inputs_and_gradients_reach_queries():
    merger = make()
    for n in (5, 50):
        merger(torch.randn(2, 1 + n, 16)).sum().backward()
    assert merger.queries.grad is not None and merger.queries.grad.abs().sum() > 0


def test_bf16_keeps_weights_normalised():
    merger = make().to(torch.bfloat16)
    y = merger(torch.randn(2, 1 + 30, 16, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()


@pytest.mark.parametrize("prefix", [0, 2])
def test_output_is_the_documented_formula(prefix):
    """Against the formula of the class docstring, written out here: LN (with its affine and eps), the D^-0.5 scale,
    a softmax over the N patch tokens, the weights applied to the un-normalised tokens, the prefix passed through."""
    torch.manual_seed(0)
    merger = PatchMerger(16, 3, prefix, layer_norm_eps=0.5)  # an eps large enough to matter
    torch.nn.init.normal_(merger.queries, std=1.0)
    torch.nn.init.normal_(merger.norm.weight, mean=1.0, std=0.5)  # not the identity: the affine counts
    torch.nn.init.normal_(merger.norm.bias, std=0.5)
    x = torch.randn(2, prefix + 7, 16) * 3 + 1
    tokens = x[:, prefix:]
    mean = tokens.mean(-1, keepdim=True)
    var = tokens.var(-1, unbiased=False, keepdim=True)
    normed = (tokens - mean) / torch.sqrt(var + 0.5) * merger.norm.weight + merger.norm.bias
    scores = torch.einsum("bnd,md->bnm", normed, merger.queries) / 4.0  # sqrt(D) = 4
    weights = torch.exp(scores - scores.amax(1, keepdim=True))
    weights = weights / weights.sum(1, keepdim=True)  # over the N patch tokens
    expected = torch.cat([x[:, :prefix], torch.einsum("bnm,bnd->bmd", weights, tokens)], dim=1)
    with torch.no_grad():
        output, returned = merger(x, return_weights=True)
    torch.testing.assert_close(returned, weights)
    torch.testing.assert_close(output, expected)
    assert torch.equal(output[:, :prefix], x[:, :prefix])


def test_reset_parameters_draws_queries_at_the_given_std():
    """Surgery initialises the queries at the config's initializer_range: std is honoured, truncated at 2 std."""
    merger = PatchMerger(64, 32, 1)
    torch.nn.init.normal_(merger.norm.weight)
    merger.reset_parameters(std=0.5)
    assert 0.3 < merger.queries.std() < 0.5 and merger.queries.abs().max() <= 1.0
    assert torch.equal(merger.norm.weight, torch.ones(64)) and torch.equal(merger.norm.bias, torch.zeros(64))
