"""Entity-level precision/recall/F1 over BIO tag sequences (seqeval, CoNLL-style), loadable offline."""

import datasets
import evaluate
from seqeval.metrics import accuracy_score, f1_score, precision_score, recall_score

_DESCRIPTION = "Entity-level scores: an entity counts as correct only if its type and its whole span match."
_KWARGS = """
Args:
    predictions (`list[list[str]]`): predicted tags, one list per sentence (one tag per word).
    references (`list[list[str]]`): reference tags, same shapes.
Returns:
    precision, recall, f1 (micro-averaged over entities), macro_f1 (mean over entity types), accuracy (per tag).
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class MtlSeqeval(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("string")),
                    "references": datasets.Sequence(datasets.Value("string")),
                }
            ),
        )

    def _compute(self, predictions, references):
        if len(references) == 0:
            return {
                "precision": float("nan"),
                "recall": float("nan"),
                "f1": float("nan"),
                "macro_f1": float("nan"),
                "accuracy": float("nan"),
            }
        return {
            "precision": float(precision_score(references, predictions, zero_division=0)),
            "recall": float(recall_score(references, predictions, zero_division=0)),
            "f1": float(f1_score(references, predictions, zero_division=0)),
            "macro_f1": float(f1_score(references, predictions, average="macro", zero_division=0)),
            "accuracy": float(accuracy_score(references, predictions)),
        }
