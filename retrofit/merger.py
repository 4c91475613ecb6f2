"""The PatchMerger (Renggli et al., "Learning to Merge Tokens in Vision Transformers", arXiv 2202.12015).

This module is deliberately self-contained (it imports only torch): retrofit inlines its source into every
exported ``modeling_*.py`` file so that a merged model loads with torch + transformers alone.
"""

import torch
from torch import nn


class PatchMerger(nn.Module):
    r"""Merges N patch tokens into M learned weighted averages of them.

    Shapes (B = batch, P = prefix tokens, N = patch tokens, M = merged tokens, D = hidden size)::

        input                    (B, P + N, D)
        prefix = input[:, :P]    (B, P, D)       CLS / distillation / register tokens: passed through unchanged
        x      = input[:, P:]    (B, N, D)
        scores = LN(x) @ W^T / sqrt(D)           (B, N, M)   W = ``self.queries``, shape (M, D)
        A      = softmax(scores, dim=N)          (B, N, M)   each of the M columns sums to 1 over the N inputs
        merged = A^T @ x                         (B, M, D)   each output is a convex combination of the inputs
        output = cat(prefix, merged)             (B, P + M, D)

    Choices: the scores are scaled by D^-0.5 (as in attention) so that the softmax is not saturated at
    initialisation; the weights are applied to the *un-normalised* tokens x, not LN(x), so that merged tokens
    live on the residual stream's scale and the layers after the merger see inputs of the kind they were
    trained on; the softmax is computed in float32 for stability under bf16/fp16. N may vary from call to call
    (other image sizes with ``interpolate_pos_encoding``); M is fixed. Where a batch pads its images to one number of
    patches (SigLIP 2's NaFlex inputs), ``valid`` (B, N) marks the real ones: padding gets no weight.

    Args:
        hidden_size: D, the width of the tokens.
        num_tokens: M, the number of merged tokens produced.
        num_prefix_tokens: P, the number of leading tokens that bypass the merger.
        layer_norm_eps: epsilon of the LayerNorm applied before scoring.
    """

    def __init__(self, hidden_size: int, num_tokens: int, num_prefix_tokens: int = 1, layer_norm_eps: float = 1e-6):
        super().__init__()
        self.hidden_size = hidden_size
        self.num_tokens = num_tokens
        self.num_prefix_tokens = num_prefix_tokens
        self.scale = hidden_size**-0.5
        self.norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.queries = nn.Parameter(torch.empty(num_tokens, hidden_size))
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02, generator: torch.Generator | None = None) -> None:
        """Random initialisation: queries ~ N(0, std²) (drawn from `generator`, or torch's global one), LayerNorm to
        identity."""
        nn.init.trunc_normal_(self.queries, std=std, a=-2 * std, b=2 * std, generator=generator)
        self.norm.reset_parameters()

    def merge_weights(self, tokens: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """The merge weights A of shape (B, N, M) for patch tokens of shape (B, N, D); columns sum to 1 (over the
        tokens that `valid`, a (B, N) boolean mask, marks as real, if given: the others get weight 0)."""
        scores = (torch.matmul(self.norm(tokens), self.queries.t()) * self.scale).float()
        if valid is not None:
            scores = scores.masked_fill(~valid[:, :, None], float("-inf"))
        return torch.softmax(scores, dim=1).to(tokens.dtype)

    def forward(
        self, hidden_states: torch.Tensor, valid: torch.Tensor | None = None, return_weights: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The P + M output tokens; with `return_weights`, also the merge weights A of this call (B, N, M): a model
        offloaded by accelerate (`device_map`) holds the merger's weights only during its forward call."""
        prefix = hidden_states[:, : self.num_prefix_tokens]
        tokens = hidden_states[:, self.num_prefix_tokens :]
        weights = self.merge_weights(tokens, valid)
        merged = torch.cat([prefix, torch.matmul(weights.transpose(1, 2), tokens)], dim=1)
        return (merged, weights) if return_weights else merged

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, num_tokens={self.num_tokens}, prefix={self.num_prefix_tokens}"
