"""Recall@1 and mean reciprocal rank for retrieval (contrastive tasks), loadable offline."""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = (
    "Each query scores every candidate; the reference is the index of its correct candidate. A candidate ranks above "
    "the correct one only with a strictly higher score, so exact duplicates of the correct candidate do not count "
    "against it."
)
_KWARGS = """
Args:
    predictions (`list[list[float]]`): per query, the score of every candidate.
    references (`list[int]`): per query, the index of its correct candidate.
Returns:
    recall_at_1, mrr (`float`).
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class MtlRetrieval(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS,
            features=datasets.Features(
                {"predictions": datasets.Sequence(datasets.Value("float32")), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references):
        scores = np.asarray(predictions, dtype=np.float64)
        references = np.asarray(references, dtype=np.int64)
        correct = scores[np.arange(len(references)), references]
        ranks = 1 + (scores > correct[:, None]).sum(axis=1)
        return {"recall_at_1": float((ranks == 1).mean()), "mrr": float((1.0 / ranks).mean())}
