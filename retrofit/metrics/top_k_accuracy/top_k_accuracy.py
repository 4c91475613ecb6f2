"""Top-k accuracy from ranked predictions (an `evaluate` metric that loads offline).

Each prediction is the list of predicted labels, best first (e.g. ``logits.topk(5).indices``); an example counts as
correct when its reference is among the first `k` of them.
"""

import datasets
import evaluate

_DESCRIPTION = "Top-k accuracy = fraction of examples whose reference is among the k highest-ranked predictions."
_KWARGS_DESCRIPTION = """
Args:
    predictions (list of list of int): predicted labels per example, best first (at least k of them, unless the
        model has fewer classes).
    references (list of int): ground-truth labels.
    k (int): how many ranked predictions count (default 5).
Returns:
    top_k_accuracy (float), k (int).
Example:
    >>> metric = evaluate.load("retrofit/metrics/top_k_accuracy")
    >>> metric.compute(predictions=[[2, 0], [1, 2]], references=[0, 0], k=2)
    {'top_k_accuracy': 0.5, 'k': 2}
"""
_CITATION = ""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class TopKAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Sequence(datasets.Value("int64")), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, k=5):
        if k < 1:
            raise ValueError(f"k must be at least 1 (got {k})")
        if len(predictions) != len(references):
            raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
        correct = sum(int(r) in [int(p) for p in ranked[:k]] for ranked, r in zip(predictions, references, strict=True))
        return {"top_k_accuracy": correct / max(1, len(references)), "k": k}
