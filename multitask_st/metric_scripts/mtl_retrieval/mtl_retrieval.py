"""Recall@1 and mean reciprocal rank for retrieval (contrastive tasks), loadable offline."""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = (
    "Each query scores every candidate; the references are the indices of its relevant candidates (one or more). A "
    "query's rank is 1 + the number of candidates that are not relevant and score at least as high as its best "
    "relevant one (a tie counts against it, so collapsed embeddings score low, not perfectly; a candidate scored "
    "-inf is left out). A NaN score makes both metrics NaN."
)
_KWARGS = """
Args:
    predictions (`list[list[float]]`): per query, the score of every candidate.
    references (`list[list[int]]`): per query, the indices of its relevant candidates.
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
                {
                    "predictions": datasets.Sequence(datasets.Value("float32")),
                    "references": datasets.Sequence(datasets.Value("int64")),
                }
            ),
        )

    def _compute(self, predictions, references):
        scores = np.asarray(predictions, dtype=np.float64)
        relevant = np.zeros(scores.shape, dtype=bool)
        for query, indices in enumerate(references):
            if not len(indices):
                raise ValueError(f"query {query} has no relevant candidate")
            relevant[query, indices] = True
        if np.isnan(scores).any():
            return {"recall_at_1": float("nan"), "mrr": float("nan")}
        best = np.where(relevant, scores, -np.inf).max(axis=1)
        ranks = 1 + ((scores >= best[:, None]) & ~relevant & (scores > -np.inf)).sum(axis=1)
        return {"recall_at_1": float((ranks == 1).mean()), "mrr": float((1.0 / ranks).mean())}
