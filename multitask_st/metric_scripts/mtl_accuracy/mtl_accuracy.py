"""Accuracy, as an `evaluate` module that loads from this folder with no network access."""

import datasets
import evaluate

_DESCRIPTION = "Fraction of predictions equal to the reference label."
_KWARGS = """
Args:
    predictions (`list[int]`): predicted label ids.
    references (`list[int]`): reference label ids.
Returns:
    accuracy (`float`): in [0, 1].
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class MtlAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references):
        if len(references) == 0:
            return {"accuracy": float("nan")}
        correct = sum(int(p == r) for p, r in zip(predictions, references))
        return {"accuracy": correct / len(references)}
