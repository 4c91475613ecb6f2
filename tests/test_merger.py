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
