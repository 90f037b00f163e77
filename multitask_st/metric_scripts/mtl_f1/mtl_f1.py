"""F1 for single-label and multi-label classification (scikit-learn), loadable offline with `evaluate.load(path)`."""

import datasets
import evaluate
from sklearn.metrics import f1_score

_DESCRIPTION = "F1 score (harmonic mean of precision and recall), averaged as requested."
_KWARGS = """
Args:
    predictions: predicted label ids, or multi-hot rows when the module is loaded with `config_name="multilabel"`.
    references: reference label ids (or multi-hot rows).
    average (`str`, defaults to `"macro"`): `"macro"`, `"micro"`, `"weighted"` or `"binary"`.
    labels (`list[int]`, *optional*): the label ids that count (default: those seen in either input).
Returns:
    f1 (`float`).
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class MtlF1(evaluate.Metric):
    def _info(self):
        if self.config_name == "multilabel":
            features = datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("int32")),
                    "references": datasets.Sequence(datasets.Value("int32")),
                }
            )
        else:
            features = datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            )
        return evaluate.MetricInfo(description=_DESCRIPTION, citation="", inputs_description=_KWARGS, features=features)

    def _compute(self, predictions, references, average="macro", labels=None):
        if len(references) == 0:
            return {"f1": float("nan")}
        return {"f1": float(f1_score(references, predictions, average=average, labels=labels, zero_division=0))}
