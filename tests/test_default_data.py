"""Fast checks of the built-in default multi-task dataset (multitask_st/default_data/default_*.jsonl)."""

import json
from collections import Counter
from pathlib import Path

import pytest

DATA_DIR = Path(__file__).resolve().parent.parent / "multitask_st" / "default_data"
TOPICS = {"business", "science", "sports", "politics", "entertainment"}
SENTIMENTS = {"positive", "negative", "neutral"}
NER_TAGS = {"O"} | {f"{p}-{t}" for p in "BI" for t in ("PER", "ORG", "LOC")}


def _load(split: str) -> list[dict]:
    with open(DATA_DIR / f"default_{split}.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def splits() -> dict[str, list[dict]]:
    return {"train": _load("train"), "eval": _load("eval")}


def test_sizes(splits):
    assert 400 <= len(splits["train"]) <= 500
    assert 100 <= len(splits["eval"]) <= 120


@pytest.mark.parametrize("split", ["train", "eval"])
def test_schema_and_labels(splits, split):
    for i, row in enumerate(splits[split]):
        where = f"{split} row {i}"
        assert set(row) == {"text", "tokens", "ner_tags", "topic", "sentiment"}, where
        assert row["text"] == " ".join(row["tokens"]), where
        assert all(tok and " " not in tok for tok in row["tokens"]), where
        assert len(row["tokens"]) == len(row["ner_tags"]), where
        assert row["topic"] in TOPICS, where
        assert row["sentiment"] in SENTIMENTS, where
        prev = "O"
        for tag in row["ner_tags"]:
            assert tag in NER_TAGS, f"{where}: bad tag {tag!r}"
            if tag.startswith("I-"):
                # BIO: an I-X continues a B-X or I-X of the same type.
                assert prev != "O" and prev[2:] == tag[2:], f"{where}: {tag!r} after {prev!r}"
            prev = tag


def test_every_label_in_both_splits(splits):
    for split, rows in splits.items():
        assert {r["topic"] for r in rows} == TOPICS, split
        assert {r["sentiment"] for r in rows} == SENTIMENTS, split
        assert {t for r in rows for t in r["ner_tags"]} == NER_TAGS, split


def test_no_overlap_and_no_duplicates(splits):
    train = [r["text"] for r in splits["train"]]
    eval_ = [r["text"] for r in splits["eval"]]
    assert len(set(train)) == len(train)
    assert len(set(eval_)) == len(eval_)
    assert not set(train) & set(eval_)


def test_balance_and_topic_sentiment_not_confounded(splits):
    for split, rows in splits.items():
        n = len(rows)
        for task, labels in (("topic", TOPICS), ("sentiment", SENTIMENTS)):
            counts = Counter(r[task] for r in rows)
            # No class below half or above twice its uniform share.
            assert all(0.5 * n / len(labels) <= counts[lab] <= 2 * n / len(labels) for lab in labels), (split, counts)
        pairs = Counter((r["topic"], r["sentiment"]) for r in rows)
        assert all(pairs[(t, s)] > 0 for t in TOPICS for s in SENTIMENTS), (split, pairs)
        # Entities are varied, not a handful repeated.
        entities = {" ".join(r["tokens"][i] for i in range(len(r["tokens"])) if r["ner_tags"][i] != "O") for r in rows}
        assert len(entities) > n // 2, split
