"""Small labelled datasets written to temporary folders, for the training tests (no network)."""

from __future__ import annotations

import json
import random
from pathlib import Path

SUBJECTS = [
    (["John", "Smith"], "PER"),
    (["Maria"], "PER"),
    (["Acme", "Corporation"], "ORG"),
    (["Paris"], "LOC"),
    (["New", "York"], "LOC"),
    (["Berlin"], "LOC"),
]
TOPICS = {
    "sport": ["played", "football", "match"],
    "business": ["stock", "market", "fell"],
    "science": ["scientists", "discovered", "frog"],
}
SENTIMENTS = {"positive": ["loved", "wonderful"], "negative": ["terrible", "boring"]}


def make_rows(count: int, seed: int = 0) -> list[dict]:
    """Rows labelled for topic, sentiment and NER, with words the tiny tokenizers know."""
    rng = random.Random(seed)
    rows = []
    for index in range(count):
        words, tags = [], []
        subject, kind = rng.choice(SUBJECTS)
        words += subject
        tags += [f"B-{kind}"] + [f"I-{kind}"] * (len(subject) - 1)
        # Labels cycle (rather than being drawn) so that even a few rows hold every label.
        topic = sorted(TOPICS)[(index + seed) % len(TOPICS)]
        sentiment = sorted(SENTIMENTS)[(index // len(TOPICS) + seed) % len(SENTIMENTS)]
        for word in [rng.choice(TOPICS[topic]), "the", rng.choice(SENTIMENTS[sentiment]), "in"]:
            words.append(word)
            tags.append("O")
        place, place_kind = rng.choice([s for s in SUBJECTS if s[1] == "LOC"])
        words += place
        tags += [f"B-{place_kind}"] + [f"I-{place_kind}"] * (len(place) - 1)
        rows.append(
            {"text": " ".join(words), "tokens": words, "ner_tags": tags, "topic": topic, "sentiment": sentiment}
        )
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def make_dataset(folder: Path, train: int = 48, evaluation: int = 16, seed: int = 0) -> dict[str, str]:
    """Write train/validation JSONL files; return `data_files`."""
    return {
        "train": str(write_jsonl(folder / "train.jsonl", make_rows(train, seed))),
        "validation": str(write_jsonl(folder / "validation.jsonl", make_rows(evaluation, seed + 1))),
    }


def three_tasks(data_files: dict[str, str]) -> list[dict]:
    return [
        {"name": "topic", "type": "classification", "data_files": data_files, "label_column": "topic"},
        {"name": "sentiment", "type": "classification", "data_files": data_files, "label_column": "sentiment"},
        {"name": "ner", "type": "token_classification", "data_files": data_files},
    ]


def separate_sources(folder: Path, sizes=(40, 16, 24)) -> list[dict]:
    """Three tasks, each from its own dataset of a different size: heads see no data in some batches."""
    tasks = []
    for (name, task_type, column), size in zip(
        [
            ("topic", "classification", "topic"),
            ("sentiment", "classification", "sentiment"),
            ("ner", "token_classification", None),
        ],
        sizes,
    ):
        files = make_dataset(folder / name, size, 8, seed=len(tasks))
        task = {"name": name, "type": task_type, "data_files": files}
        if column:
            task["label_column"] = column
        tasks.append(task)
    return tasks


def pair_rows(count: int, seed: int = 0) -> list[dict]:
    rows = make_rows(count, seed)
    return [
        {
            "sentence1": row["text"],
            "sentence2": " ".join(reversed(row["tokens"])),
            "score": float(index % 6),
            "label": index % 2,
        }
        for index, row in enumerate(rows)
    ]


def pair_files(folder: Path, train: int = 12, evaluation: int = 6) -> dict[str, str]:
    return {
        "train": str(write_jsonl(folder / "train.jsonl", pair_rows(train))),
        "validation": str(write_jsonl(folder / "validation.jsonl", pair_rows(evaluation, seed=1))),
    }


def train_flags(model_dir: str | Path, tasks: list[dict], output_dir: str | Path) -> list[str]:
    """The train.py arguments every training test shares: tiny batches, short sequences, CPU, no reporting."""
    return [
        "--model_name_or_path",
        str(model_dir),
        "--tasks",
        json.dumps(tasks),
        "--output_dir",
        str(output_dir),
        "--per_device_train_batch_size",
        "4",
        "--per_device_eval_batch_size",
        "8",
        "--report_to",
        "none",
        "--use_cpu",
        "true",
        "--max_seq_length",
        "32",
        "--num_examples_to_print",
        "1",
    ]


# The text tasks (one of each type, an MLP head, loss weights) the model and inference tests build models with.
TEXT_TASKS = [
    {"name": "topic", "labels": ["sports", "politics", "science"], "head": {"type": "mlp", "hidden_size": 16}},
    {"name": "tags", "type": "multi_label_classification", "labels": ["a", "b", "c"]},
    {
        "name": "ner",
        "type": "token_classification",
        "labels": ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"],
        "loss_weight": 0.5,
    },
    {"name": "score", "type": "regression", "loss_weight": 2.0},
]
SENTENCES = ["John Smith works for Acme Corporation in New York.", "I loved this movie!", "What is the capital?"]
