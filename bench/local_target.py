"""Probe (not a test, not an option of retrofit): a local target for the merger on small data (issue 23, item 3).

Runs `bench/small_data.py`'s ``default`` run (kd, the 1,000-step floor, 2,000 images) with one more loss term that
distils the tokens of every layer after the merger against the unmerged model's. The merged model has M tokens there
and the unmerged model N, so each merged token's target is the same weighted average of the unmerged model's tokens
that the merger took of its input: with the merge weights A (B, N, M) of the batch,

    target_l = cat(prefix_l, Aᵀ · patches_l)          for the teacher's output of layer l, l = K .. L-1

and the term is the relative squared error ‖s − t‖² / ‖t‖² per token, averaged over tokens and layers, times
``--local-weight`` (added to the kd loss; gradients reach the merger through A as well). Prefix tokens (CLS) are
compared one to one. A probe patches the training loop from outside (`retrofit.train.compute_loss` and the
`retrofit.finetune.train` it calls) instead of adding an option, because an option is kept only if it wins:

    .venv/bin/python bench/local_target.py --images 2000 --json bench/results/small-data-2000-local.json

Its rows pair by seed with ``bench/small_data.py --runs default`` (same samples, order and budget).
"""

from __future__ import annotations

import argparse
import importlib
import sys

import common  # noqa: F401  first: Hub and datasets offline, this repository on the import path
import small_data
import torch

from retrofit.surgery import encoder_layers


class LocalTarget:
    """Forward hooks that keep the merge weights and the outputs of the layers after the merger, for one student
    and its teacher; `loss` turns what one training step recorded into the local term and forgets it."""

    def __init__(self, student: torch.nn.Module, teacher: torch.nn.Module, weight: float):
        self.weight = weight
        # the generated modeling code's copy of retrofit.merger.PatchMerger
        self.merger = next(module for module in student.modules() if type(module).__name__ == "PatchMerger")
        after = student.config.merge_after_layer  # layers 0..K-1 run on all tokens, K.. on the merged ones
        _, student_layers = encoder_layers(student)
        _, teacher_layers = encoder_layers(teacher)
        self.student_out: list[torch.Tensor] = []
        self.teacher_out: list[torch.Tensor] = []
        self.weights: torch.Tensor | None = None
        self.values: list[float] = []  # the term at each step, unweighted
        self.hooks = [self.merger.register_forward_hook(self._record_weights)]
        self.hooks += [layer.register_forward_hook(self._keep(self.student_out)) for layer in student_layers[after:]]
        self.hooks += [layer.register_forward_hook(self._keep(self.teacher_out)) for layer in teacher_layers[after:]]

    def _record_weights(self, module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
        self.weights = module.merge_weights(args[0][:, module.num_prefix_tokens :])

    @staticmethod
    def _keep(store: list[torch.Tensor]):
        def hook(module: torch.nn.Module, args: tuple, output) -> None:
            store.append(output[0] if isinstance(output, tuple) else output)

        return hook

    def loss(self) -> torch.Tensor:
        prefix = self.merger.num_prefix_tokens
        terms = []
        for student, teacher in zip(self.student_out, self.teacher_out, strict=True):
            merged = torch.matmul(self.weights.transpose(1, 2), teacher[:, prefix:])
            target = torch.cat([teacher[:, :prefix], merged], dim=1).float()
            error = (student.float() - target).pow(2).sum(-1) / target.pow(2).sum(-1).clamp_min(1e-12)
            terms.append(error.mean())
        self.student_out.clear()
        self.teacher_out.clear()
        term = torch.stack(terms).mean()
        self.values.append(term.item())
        return self.weight * term

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()


def patch(weight: float) -> None:
    """Make every `finetune` run train with the local term added to its loss."""
    finetune, training = (importlib.import_module(f"retrofit.{name}") for name in ("finetune", "train"))
    original_train, original_loss = finetune.train, training.compute_loss
    active: list[LocalTarget] = []

    def train(model, processor, args, *, teacher=None, **kwargs):
        active.append(LocalTarget(model, teacher, weight))
        try:
            return original_train(model, processor, args, teacher=teacher, **kwargs)
        finally:
            done = active.pop()
            done.remove()
            print(f"local term (relative squared error, weight {weight:g}): {done.values[0]:.4f} at the first "
                  f"step, {done.values[-1]:.4f} at the last of {len(done.values)}", flush=True)  # fmt: skip

    def compute_loss(student, teacher, labels, args, **kwargs):
        return original_loss(student, teacher, labels, args, **kwargs) + active[-1].loss()

    finetune.train, training.compute_loss = train, compute_loss


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--local-weight", type=float, default=1.0)
    ours, rest = parser.parse_known_args(argv)
    patch(ours.local_weight)
    small_data.RUNS["local"] = small_data.RUNS["default"]
    return small_data.main(["--runs", "local", *rest])


if __name__ == "__main__":
    sys.exit(main())
