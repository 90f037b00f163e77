"""multitask_st.metrics: every task type's metrics from predictions and references (missing labels skipped by the
one `labelled_mask` rule), the combined score, and keys that keep their structure."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import pearsonr, spearmanr

from modeling_mtl import IGNORE_INDEX
from multitask_st.metrics import build_compute_metrics, combined_score, nest_metrics, task_metrics

NAN = float("nan")


def test_classification_skips_missing_labels():
    task = {"name": "t", "type": "classification", "labels": ["a", "b", "c"]}
    logits = np.array([[2.0, 0, 0], [0, 2.0, 0], [0, 0, 2.0], [2.0, 0, 0]])
    scores = task_metrics(task, logits, np.array([0, 1, IGNORE_INDEX, 1]))
    assert scores["accuracy"] == pytest.approx(2 / 3)
    # macro-F1 over the three labels: a (P=1/2, R=1), b (P=1, R=1/2), c (no support, no prediction: 0)
    assert scores["macro_f1"] == pytest.approx((2 / 3 + 2 / 3 + 0) / 3)
    assert task_metrics(task, logits, np.full(4, IGNORE_INDEX)) == {}


def test_token_classification_is_per_word_and_entity_level():
    task = {"name": "ner", "type": "token_classification", "labels": ["O", "B-PER", "I-PER"]}
    predicted = np.array([[0, 1, 2, 0, 0], [0, 1, 0, 1, 0]])
    gold = np.array([[IGNORE_INDEX, 1, 2, IGNORE_INDEX, 0], [IGNORE_INDEX, 1, 0, 0, IGNORE_INDEX]])
    scores = task_metrics(task, predicted, gold)
    # gold entities: (PER 1-2) in row 0, (PER 1) in row 1; predicted: the same two plus a spurious PER in row 1
    assert scores["precision"] == pytest.approx(2 / 3) and scores["recall"] == pytest.approx(1.0)


def test_multi_label_uses_the_threshold_and_skips_nan_rows():
    task = {"name": "m", "type": "multi_label_classification", "labels": ["x", "y"], "threshold": 0.7}
    logits = np.array([[2.0, 0.5], [-3.0, 3.0], [0.0, 0.0]])  # sigmoid(0.5)=0.62 < 0.7
    gold = np.array([[1.0, 0.0], [0.0, 1.0], [NAN, NAN]])
    scores = task_metrics(task, logits, gold)
    assert scores["micro_f1"] == pytest.approx(1.0) and scores["macro_f1"] == pytest.approx(1.0)


def test_similarity_correlates_cosines_with_gold_scores():
    task = {"name": "s", "type": "similarity", "labels": []}
    cosines = np.array([0.9, 0.1, 0.5, 0.3, 0.7])
    gold = np.array([5.0, 0.5, NAN, 2.0, 1.0])
    scores = task_metrics(task, cosines, gold)
    keep = ~np.isnan(gold)
    assert scores["spearman"] == pytest.approx(spearmanr(cosines[keep], gold[keep])[0])
    assert scores["pearson"] == pytest.approx(pearsonr(cosines[keep], gold[keep])[0])


def retrieval(anchors, positives, anchor_ids, positive_ids):
    task = {"name": "r", "type": "contrastive", "labels": []}
    embeddings = np.stack([np.asarray(anchors, float), np.asarray(positives, float)], axis=1)
    references = np.stack([anchor_ids, positive_ids], axis=1)
    # A row without the task (another task's row of the split) is left out.
    embeddings = np.concatenate([embeddings, np.zeros((1, *embeddings.shape[1:]))])
    references = np.concatenate([references, [[IGNORE_INDEX, IGNORE_INDEX]]])
    return task_metrics(task, embeddings, references)


def test_retrieval_ranks_each_anchor_among_all_positives():
    anchors = np.eye(3, 4)
    # Anchor 1 is closer to positive 2 than to its own (rank 2); anchors 0 and 2 rank theirs first.
    positives = np.array([[1.0, 0, 0, 0], [0, 0.2, 0, 1.0], [0, 0.5, 1.0, 0]])
    scores = retrieval(anchors, positives, [10, 11, 12], [20, 21, 22])
    assert scores["recall_at_1"] == pytest.approx(2 / 3)
    assert scores["mrr"] == pytest.approx((1 + 1 / 2 + 1) / 3)


def test_retrieval_counts_every_positive_of_a_repeated_anchor_as_relevant():
    # Query 10 has two rows, positives 20 and 21; 21 scores higher for it. Per row, the row (10, 20) would rank 2.
    # As a query with two relevant passages it ranks first; query 11 (positive 22) ranks below passage 21: rank 2.
    anchors = [[1.0, 0, 0], [1.0, 0, 0], [0, 1.0, 0]]
    positives = [[0.6, 0.8, 0], [1.0, 0.1, 0], [0.0, 0.6, 0.8]]
    scores = retrieval(anchors, positives, [10, 10, 11], [20, 21, 22])
    assert scores["recall_at_1"] == pytest.approx(1 / 2)
    assert scores["mrr"] == pytest.approx((1 + 1 / 2) / 2)
    # A repeated positive text is one passage: rows (11, 20) and (10, 20) share it, and it ranks first for both.
    anchors = [[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]]
    positives = [[0.7, 0.7, 0], [0.7, 0.7, 0], [0, 0, 1.0]]
    scores = retrieval(anchors, positives, [10, 11, 12], [20, 20, 22])
    assert scores["mrr"] == pytest.approx(1.0)


def test_retrieval_of_collapsed_or_broken_embeddings_is_not_perfect():
    same = np.ones((3, 4))
    scores = retrieval(same, same, [10, 11, 12], [20, 21, 22])  # every passage ties: each query ranks last
    assert scores["mrr"] == pytest.approx(1 / 3) and scores["recall_at_1"] == 0.0
    broken = np.full((3, 4), np.nan)
    assert all(np.isnan(value) for value in retrieval(broken, broken, [10, 11, 12], [20, 21, 22]).values())


def test_the_retrieval_metric_leaves_out_candidates_scored_minus_infinity():
    from multitask_st.metrics import load_metric

    metric = load_metric("mtl_retrieval")
    scores = metric.compute(predictions=[[-np.inf, -np.inf, 0.5], [0.1, -np.inf, 0.9]], references=[[0], [0]])
    assert scores["mrr"] == pytest.approx((1 / 2 + 1 / 2) / 2)  # each ranks below the one finite competitor


def test_retrieval_leaves_out_a_passage_holding_the_query_text():
    # Row 1's positive has the text of row 0's anchor (id 10): for query 10 it is not a competitor.
    anchors = [[1.0, 0, 0], [0.9, -0.4, 0]]
    positives = [[0.8, 0.6, 0], [1.0, 0, 0]]
    scores = retrieval(anchors, positives, [10, 11], [20, 10])
    assert scores["mrr"] == pytest.approx(1.0)
    # With another text it counts: query 10 ranks its own positive second.
    scores = retrieval(anchors, positives, [10, 11], [20, 30])
    assert scores["mrr"] == pytest.approx((1 / 2 + 1) / 2)


def test_compute_metrics_keys_keep_their_structure():
    tasks = [
        {"name": "ner_fine", "type": "classification", "labels": ["a", "b"]},
        {"name": "ner", "type": "regression", "labels": ["score"]},
    ]
    compute = build_compute_metrics(tasks)

    class Prediction:
        predictions = (np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([[0.1], [0.9]]))
        label_ids = (np.array([0, 1]), np.array([[0.0], [1.0]]))

    flat = compute(Prediction())
    assert flat["ner_fine/accuracy"] == 1.0 and "ner/spearman" in flat
    nested = nest_metrics({f"eval_{key}": value for key, value in flat.items()})
    assert set(nested) == {"ner_fine", "ner"}  # no guessing: `ner_fine` is never mistaken for `ner`
    assert nested["ner_fine"]["macro_f1"] == 1.0
    assert flat["combined_score"] == pytest.approx(np.mean([1.0, nested["ner"]["spearman"]]))


def test_combined_score_leaves_out_tasks_without_a_finite_value():
    tasks = [{"name": "a", "type": "classification"}, {"name": "b", "type": "similarity"}]
    assert combined_score({"a": {"macro_f1": 0.5}, "b": {"spearman": NAN}}, tasks) == 0.5
    assert math.isnan(combined_score({}, tasks))
