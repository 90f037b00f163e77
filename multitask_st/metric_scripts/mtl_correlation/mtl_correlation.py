"""Pearson and Spearman correlation for regression tasks (scipy), loadable offline."""

import datasets
import evaluate
from scipy.stats import pearsonr, spearmanr

_DESCRIPTION = "Pearson (linear) and Spearman (rank) correlation between predictions and references."
_KWARGS = """
Args:
    predictions (`list[float]`), references (`list[float]`).
Returns:
    pearson, spearman (`float`, NaN when fewer than two items or a constant input).
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class MtlCorrelation(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS,
            features=datasets.Features(
                {"predictions": datasets.Value("float64"), "references": datasets.Value("float64")}
            ),
        )

    def _compute(self, predictions, references):
        if len(references) < 2 or len(set(predictions)) < 2 or len(set(references)) < 2:
            return {"pearson": float("nan"), "spearman": float("nan")}
        return {
            "pearson": float(pearsonr(predictions, references)[0]),
            "spearman": float(spearmanr(predictions, references)[0]),
        }
