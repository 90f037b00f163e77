"""multitask_st.data: task specs, loading every data form, label resolution and normalisation, tokenised rows
(nested token ids + one structured `labels` column), pair and contrastive sources, the collator, and one clear
error for every kind of bad data (naming task, file, split, row and column)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from datasets import Dataset, DatasetDict
from train_helpers import make_dataset, make_rows, pair_files, pair_rows, separate_sources, three_tasks, write_jsonl
from transformers import AutoTokenizer

from modeling_mtl import IGNORE_INDEX, MultiTaskModel
from multitask_st.data import (
    DataError,
    MultiTaskCollator,
    build_datasets,
    count_labelled_rows,
    parse_task_specs,
)


def build(tiny_bert, tasks, max_seq_length=32, **kwargs):
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    data = build_datasets(parse_task_specs(tasks), tokenizer, max_seq_length, **kwargs)
    return tokenizer, data


# ------------------------------------------------------------------------------------------------ single texts


def test_labels_inferred_sorted_and_aligned_to_first_subtoken(tiny_bert, tmp_path):
    rows = make_rows(6)
    rows[0]["tokens"] = ["Smithson"] + rows[0]["tokens"][1:]  # a word the tokenizer splits
    rows[0]["text"] = " ".join(rows[0]["tokens"])
    rows[1]["topic"] = None  # partially labelled row: skipped by the topic loss, still trains the others
    files = {
        "train": str(write_jsonl(tmp_path / "train.jsonl", rows)),
        "validation": str(write_jsonl(tmp_path / "validation.jsonl", rows)),
    }
    tokenizer, data = build(tiny_bert, three_tasks(files))
    specs = {spec.name: spec for spec in data.specs}
    assert specs["topic"].labels == sorted({row["topic"] for row in rows if row["topic"]})
    assert specs["ner"].labels == sorted({tag for row in rows for tag in row["ner_tags"]})
    assert data.train[1]["labels"]["topic"] == IGNORE_INDEX
    assert data.num_train_examples == {"topic": 5, "sentiment": 6, "ner": 6}
    assert data.train.column_names == ["input_ids", "labels"]

    encoding = tokenizer(rows[0]["tokens"], is_split_into_words=True)
    assert data.train[0]["input_ids"] == [encoding["input_ids"]]  # one text per row, nested
    word_ids = encoding.word_ids()
    assert word_ids.count(0) > 1, "the test word must be split into several sub-tokens"
    labels = data.train[0]["labels"]["ner"]
    first_tag = specs["ner"].labels.index(rows[0]["ner_tags"][0])
    positions = [i for i, w in enumerate(word_ids) if w == 0]
    assert labels[positions[0]] == first_tag
    assert all(labels[i] == IGNORE_INDEX for i in positions[1:])
    assert labels[0] == IGNORE_INDEX  # [CLS]

    # Option: label all sub-tokens in training (B- continues as I-); eval stays per word.
    _, data_all = build(tiny_bert, three_tasks(files), label_all_subtokens=True)
    labels_all = data_all.train[0]["labels"]["ner"]
    continuation = specs["ner"].labels.index("I-" + rows[0]["ner_tags"][0][2:])
    assert labels_all[positions[0]] == first_tag
    assert all(labels_all[i] == continuation for i in positions[1:])
    assert data_all.eval[0]["labels"]["ner"] == data.eval[0]["labels"]["ner"]


def test_unseen_eval_label_is_an_error_that_names_it(tiny_bert, tmp_path):
    files = make_dataset(tmp_path, 12, 4)
    rows = make_rows(4, seed=3)
    rows[2]["topic"] = "astrology"
    write_jsonl(Path(files["validation"]), rows)
    with pytest.raises(DataError, match=r"task 'topic': label 'astrology' in eval split 'validation' row 2"):
        build(tiny_bert, three_tasks(files))


def test_regression_and_multi_label_with_missing_labels_use_nan(tiny_bert, tmp_path):
    rows = make_rows(12)
    for index, row in enumerate(rows):
        row["score"] = None if index == 3 else float(index % 5)
        row["tags"] = None if index == 4 else [["a"], ["b"], ["a", "c"]][index % 3]
    files = {
        "train": str(write_jsonl(tmp_path / "train.jsonl", rows)),
        "validation": str(write_jsonl(tmp_path / "validation.jsonl", rows)),
    }
    tasks = [
        {"name": "score", "type": "regression", "data_files": files, "label_column": "score"},
        {"name": "tags", "type": "multi_label_classification", "data_files": files, "label_column": "tags"},
    ]
    tokenizer, data = build(tiny_bert, tasks)
    assert data.specs[1].labels == ["a", "b", "c"]
    assert data.num_train_examples == {"score": 11, "tags": 11}
    assert all(math.isnan(v) for v in data.train[3]["labels"]["score"])  # missing = NaN, stored as such
    model = MultiTaskModel.from_backbone(tiny_bert, tasks=data.model_tasks)
    batch = MultiTaskCollator(tokenizer, model.config.tasks)([data.train[i] for i in range(6)])
    assert torch.isnan(batch["labels"]["score"][3]).all() and torch.isnan(batch["labels"]["tags"][4]).all()
    assert batch["labels"]["tags"][2].tolist() == [1.0, 0.0, 1.0]
    assert torch.isfinite(model(**batch).loss)


def test_tasks_of_one_dataset_share_its_rows_and_others_get_missing_labels(tiny_bert, tmp_path):
    _, shared = build(tiny_bert, three_tasks(make_dataset(tmp_path / "shared", 12, 4)))
    assert shared.source_tasks == [["topic", "sentiment", "ner"]] and shared.source_sizes == [12]
    tokenizer, separate = build(tiny_bert, separate_sources(tmp_path / "separate"))
    assert separate.source_tasks == [["topic"], ["sentiment"], ["ner"]] and separate.source_sizes == [40, 16, 24]
    first_sentiment_row = separate.train[40]["labels"]
    assert first_sentiment_row["topic"] == IGNORE_INDEX and first_sentiment_row["sentiment"] != IGNORE_INDEX
    assert set(first_sentiment_row["ner"]) == {IGNORE_INDEX}
    assert count_labelled_rows(separate.train, "ner") == 24


# ------------------------------------------------------------------------------------------------ collator


def test_collator_gives_every_task_labels_in_every_batch(tiny_bert, tmp_path):
    tokenizer, data = build(tiny_bert, separate_sources(tmp_path))
    model = MultiTaskModel.from_backbone(tiny_bert, tasks=data.model_tasks)
    collator = MultiTaskCollator(tokenizer, model.config.tasks)
    batch = collator([data.train[i] for i in range(3)])  # rows of the topic source only
    assert set(batch["labels"]) == {"topic", "sentiment", "ner"}
    assert batch["input_ids"].dim() == 2  # one text per row: the usual (batch, seq)
    assert (batch["labels"]["topic"] != IGNORE_INDEX).all()
    assert (batch["labels"]["sentiment"] == IGNORE_INDEX).all()
    assert batch["labels"]["ner"].shape == batch["input_ids"].shape
    outputs = model(**batch)
    # The unlabelled heads still give a (zero) loss that depends on their weights.
    assert set(outputs.task_losses) == {"topic", "sentiment", "ner"}
    assert float(outputs.task_losses["sentiment"].detach()) == 0.0 and outputs.task_losses["sentiment"].requires_grad
    padded = MultiTaskCollator(tokenizer, model.config.tasks, pad_to_multiple_of=16)([data.train[0]])
    assert padded["input_ids"].shape[-1] % 16 == 0


# ------------------------------------------------------------------------------------------------ pairs


def test_pair_and_contrastive_sources(tiny_bert, tmp_path):
    files = pair_files(tmp_path / "pairs")
    tasks = [
        {"name": "sts", "type": "similarity", "data_files": files, "label_column": "score", "score_range": [0, 5]},
        {"name": "paraphrase", "type": "pair_classification", "data_files": files, "label_column": "label"},
        {"name": "retrieval", "type": "contrastive", "data_files": files, "text_column": "sentence1",
         "text_pair_column": "sentence2", "row_filter": {"label": 1}},
    ]  # fmt: skip
    tokenizer, data = build(tiny_bert, tasks)
    # sts and paraphrase read the same rows (default columns sentence1/sentence2); the filtered task has its own.
    assert data.source_tasks == [["sts", "paraphrase"], ["retrieval"]] and data.source_sizes == [12, 6]
    row = data.train[0]
    rows = pair_rows(12)
    assert row["input_ids"] == [
        tokenizer(rows[0]["sentence1"])["input_ids"],
        tokenizer(rows[0]["sentence2"])["input_ids"],
    ]
    assert row["labels"]["sts"] == 0.0 and row["labels"]["paraphrase"] == 0
    assert row["labels"]["retrieval"] == IGNORE_INDEX  # another source's task
    assert data.train[12]["labels"]["retrieval"] == 0 and math.isnan(data.train[12]["labels"]["sts"])
    assert data.specs[1].labels == ["0", "1"] and data.num_train_examples["retrieval"] == 6
    validation = pair_rows(6, seed=1)  # examples to print come from the eval split, as pairs
    assert data.examples["sts"][0] == (validation[0]["sentence1"], validation[0]["sentence2"])

    model = MultiTaskModel.from_backbone(tiny_bert, tasks=data.model_tasks)
    batch = MultiTaskCollator(tokenizer, model.config.tasks)([data.train[i] for i in range(4)])
    assert batch["input_ids"].shape[:2] == (4, 2)
    assert batch["labels"]["sts"].dtype == torch.float32 and batch["labels"]["paraphrase"].dtype == torch.long
    outputs = model(**batch)
    assert torch.isfinite(outputs.loss) and set(outputs.logits) == {"sts", "paraphrase", "retrieval"}


def test_a_mixed_batch_of_single_texts_and_pairs_pads_absent_texts(tiny_bert, tmp_path):
    files = pair_files(tmp_path / "pairs")
    tasks = [
        {"name": "topic", "data_files": make_dataset(tmp_path / "single", 8, 4), "label_column": "topic"},
        {"name": "sts", "type": "similarity", "data_files": files, "label_column": "score", "score_range": [0, 5]},
    ]
    tokenizer, data = build(tiny_bert, tasks)
    model = MultiTaskModel.from_backbone(tiny_bert, tasks=data.model_tasks)
    batch = MultiTaskCollator(tokenizer, model.config.tasks)([data.eval[i] for i in (0, 1, 4, 5)])  # 2 + 2
    assert batch["input_ids"].shape[:2] == (4, 2)
    assert batch["attention_mask"][:2, 1].sum() == 0  # single-text rows: the second text is absent
    outputs = model(**batch)
    assert torch.isfinite(outputs.loss)
    assert outputs.embeddings[:2, 1].abs().sum() == 0


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda rows: rows[2].update(sentence2=None), r"task.*train row 2, column 'sentence2' must hold a string"),
        (lambda rows: rows[3].update(sentence1=7), r"train row 3, column 'sentence1' must hold a string, got 7"),
        (lambda rows: rows[1].update(sentence2="  "), r"train row 1, column 'sentence2' is empty"),
        (lambda rows: rows[4].update(score=7.5),
         r"task 'sts': score 7.5 in train row 4.*outside score_range \[0.0, 5.0\]"),
        (lambda rows: rows[5].update(score="high"),
         r"task 'sts': train row 5, column 'score' holds 'high', not a number"),
        (lambda rows: rows[0].update(score=float("inf")), r"task 'sts': train row 0, column 'score' holds inf"),
    ],
)  # fmt: skip
def test_bad_pair_rows_name_task_row_and_column(tiny_bert, tmp_path, change, message):
    rows = pair_rows(8)
    change(rows)
    files = {"train": str(write_jsonl(tmp_path / "train.jsonl", rows))}
    task = {"name": "sts", "type": "similarity", "data_files": files, "label_column": "score", "score_range": [0, 5]}
    with pytest.raises(DataError, match=message):
        build(tiny_bert, [{**task, "eval_split": None}])


def test_a_row_without_its_hard_negative_is_named_with_what_to_do(tiny_bert, tmp_path):
    rows = [{**row, "negative": f"unrelated {i}"} for i, row in enumerate(pair_rows(6))]
    rows[4]["negative"] = None
    files = {"train": str(write_jsonl(tmp_path / "train.jsonl", rows))}
    task = {"name": "retrieval", "type": "contrastive", "data_files": files, "text_column": "sentence1",
            "text_pair_column": "sentence2", "negative_column": "negative", "eval_split": None}  # fmt: skip
    with pytest.raises(DataError, match=r"train row 4, column 'negative' must hold a string, got None \(negative_col"):
        build(tiny_bert, [task])


@pytest.mark.parametrize("subset", [{"row_filter": {"label": 1}}, {"max_train_samples": 7}])
def test_bad_rows_are_named_by_their_row_in_the_file_after_a_filter_or_subset(tiny_bert, tmp_path, subset):
    rows = pair_rows(8)
    rows[7].update(sentence2=None, label=1)
    files = {"train": str(write_jsonl(tmp_path / "train.jsonl", rows))}
    task = {"name": "retrieval", "type": "contrastive", "data_files": files, "text_column": "sentence1",
            "text_pair_column": "sentence2", "eval_split": None, **subset}  # fmt: skip
    with pytest.raises(DataError, match=r"train row 7, column 'sentence2' must hold a string"):
        build(tiny_bert, [task], seed=3)  # seed 3 keeps rows 6 and 7 of 8
    # The bad label of a classification task, too, is named by its row in the file.
    rows = [{"text": f"sentence {i}", "y": 1 if i != 6 else 2.5} for i in range(8)]
    files = {"train": str(write_jsonl(tmp_path / "labels.jsonl", rows))}
    labelled = {"name": "y", "data_files": files, "label_column": "y", "eval_split": None, **subset}
    if "row_filter" in subset:
        labelled["row_filter"] = {"text": "sentence 6"}
    with pytest.raises(DataError, match=r"fractional class label 2.5 in train row 6"):
        build(tiny_bert, [labelled], seed=3)


# ------------------------------------------------------------------------------------------------ labels


def label_task(tmp_path, values, task_type="classification", **extra) -> dict:
    rows = [{"text": f"sentence number {index}", "y": value} for index, value in enumerate(values)]
    files = {"train": str(write_jsonl(tmp_path / "train.jsonl", rows))}
    return {"name": "y", "type": task_type, "data_files": files, "label_column": "y", "eval_split": None, **extra}


def test_label_normalisations_are_documented_ones(tiny_bert, tmp_path):
    # Integer-valued floats (a CSV int column with a blank cell) and integers' strings are the same label;
    # surrounding whitespace is stripped.
    _, data = build(tiny_bert, [label_task(tmp_path / "a", [0.0, 1.0, None, 1.0])])
    assert data.specs[0].labels == ["0", "1"]
    _, data = build(tiny_bert, [label_task(tmp_path / "b", ["pos ", "pos", " neg"])])
    assert data.specs[0].labels == ["neg", "pos"]
    assert [row["labels"]["y"] for row in data.train] == [1, 1, 0]
    csv = tmp_path / "c.csv"
    csv.write_text("text,y\nfirst,0\nsecond,\nthird,1\n")
    _, data = build(
        tiny_bert, [{"name": "y", "data_files": {"train": str(csv)}, "label_column": "y", "eval_split": None}]
    )
    assert data.specs[0].labels == ["0", "1"] and data.num_train_examples["y"] == 2


def test_integers_index_named_labels_but_name_numbered_ones(tiny_bert, tmp_path):
    """With `labels: ["1", "2", "3"]` and integer data 1/2, rows trained as "2"/"3" (the integers were read as
    indexes): labels that are numbers are named by the data's integers, as `1` and `"1"` are the same label."""
    _, data = build(tiny_bert, [label_task(tmp_path / "a", [1, 2, 1, 2], labels=["1", "2", "3"])])
    assert [data.specs[0].labels[row["labels"]["y"]] for row in data.train] == ["1", "2", "1", "2"]
    # names that are words: GLUE-style 0/1 rows index them
    _, data = build(tiny_bert, [label_task(tmp_path / "b", [0, 1, 1], labels=["negative", "positive"])])
    assert [data.specs[0].labels[row["labels"]["y"]] for row in data.train] == ["negative", "positive", "positive"]


@pytest.mark.parametrize(
    "values, task_type, message",
    [
        ([True, False, True], "classification", r"boolean label True in train row 0, column 'y'"),
        ([0.0, 1.7, 1.0], "classification", r"fractional class label 1.7 in train row 1"),
        ([[0], [1], [0]], "classification", r"label \[0\] in train row 0, column 'y' is a list"),
        (["urgent", ["a"], ["b"]], "multi_label_classification", r"train row 0, column 'y' must hold a list of labels"),
        ([None, None, None], "classification", r"no labels found in column 'y'"),
        ([1.0, "high", 2.0], "regression", r"task 'y': train row 1, column 'y' holds 'high', not a number"),
        ([1.0, float("inf"), 2.0], "regression", r"train row 1, column 'y' holds inf, not a finite float32 number"),
        ([1.0, 1e39, 2.0], "regression", r"holds 1e\+39, not a finite float32 number"),
    ],
)
def test_bad_labels_are_one_clear_error(tiny_bert, tmp_path, values, task_type, message):
    with pytest.raises(DataError, match=message):
        build(tiny_bert, [label_task(tmp_path, values, task_type)])


def test_a_task_without_any_labelled_row_is_an_error(tiny_bert, tmp_path):
    rows = make_rows(6)
    for row in rows:
        row["sentiment"] = None
    files = {"train": str(write_jsonl(tmp_path / "train.jsonl", rows))}
    tasks = [
        {"name": "topic", "data_files": files, "label_column": "topic", "eval_split": None},
        {"name": "sentiment", "data_files": files, "labels": ["negative", "positive"], "eval_split": None},
    ]
    with pytest.raises(DataError, match=r"task 'sentiment': none of the 6 training rows has a label"):
        build(tiny_bert, tasks)


# ------------------------------------------------------------------------------------------------ data forms


def test_a_save_to_disk_folder_with_sliced_splits(tiny_bert, tmp_path):
    rows = make_rows(20)
    DatasetDict({"train": Dataset.from_list(rows), "validation": Dataset.from_list(make_rows(6, 1))}).save_to_disk(
        tmp_path / "saved"
    )
    task = {"name": "topic", "dataset": str(tmp_path / "saved"), "label_column": "topic"}
    _, data = build(tiny_bert, [{**task, "train_split": "train[:-5]", "test_split": "train[-5:]"}])
    assert data.source_sizes == [15] and len(data.test) == 5 and len(data.eval) == 6


@pytest.mark.parametrize(
    "write, message",
    [
        (lambda p: p.write_text('{"text": "a", "topic": "x"}\n{"text": "b", "topic": \n'),
         r"train.jsonl line 2 is not valid JSON"),
        (lambda p: p.write_bytes(b'{"text": "caf\xe9", "topic": "x"}\n'), r"train.jsonl line 1 is not valid UTF-8"),
        (lambda p: p.write_text(""), r"data file .*train.jsonl is empty"),
    ],
)  # fmt: skip
def test_unreadable_data_files_name_file_and_line(tiny_bert, tmp_path, write, message):
    path = tmp_path / "train.jsonl"
    write(path)
    task = {"name": "topic", "data_files": {"train": str(path)}, "label_column": "topic", "eval_split": None}
    with pytest.raises(DataError, match=message):
        build(tiny_bert, [task])


def test_an_unreachable_hub_dataset_says_what_to_do(tiny_bert, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match=r"task 'topic': could not load dataset 'someone/nothing'.*save_to_disk"):
        build(tiny_bert, [{"name": "topic", "dataset": "someone/nothing", "eval_split": None}])


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"name": "a", "dataset": "d", "max_train_samples": 0}, "max_train_samples must be an int >= 1, got 0"),
        ({"name": "a", "dataset": "d", "max_eval_samples": -3}, "max_eval_samples must be an int >= 1, got -3"),
        ({"name": "a", "dataset": "d", "hub_dataset": "../glue"}, "hub_dataset must be a Hub dataset id"),
        ({"name": "a"}, "give `dataset`"),
        ({"name": "a", "dataset": "d", "colour": 1}, r"unknown keys \['colour'\]"),
        ({"name": "a", "type": "ranking", "dataset": "d"}, "type 'ranking' is not one of"),
        ({"name": "a", "dataset": "d", "negative_column": "n"}, "negative_column only applies to contrastive"),
        ({"name": "a", "dataset": "d", "text_pair_column": "b"}, "text_pair_column only applies to pair tasks"),
        ({"name": "a", "type": "similarity", "dataset": "d", "score_range": [1, 0]}, "score_range must be"),
    ],
)
def test_bad_task_specs_fail_before_any_data_is_read(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_task_specs([spec])


def test_tasks_argument_forms(tmp_path):
    tasks = [{"name": "a", "dataset": "d"}]
    (tmp_path / "tasks.json").write_text(json.dumps(tasks))
    (tmp_path / "tasks.yaml").write_text("- {name: a, dataset: d}\n")
    for form in (
        tasks,
        json.dumps(tasks),
        str(tmp_path / "tasks.json"),
        str(tmp_path / "tasks.yaml"),
        {"a": {"dataset": "d"}},
    ):
        assert [spec.name for spec in parse_task_specs(form)] == ["a"]
    with pytest.raises(ValueError, match="--tasks file not found: .*missing.yaml"):
        parse_task_specs(str(tmp_path / "missing.yaml"))
    with pytest.raises(ValueError, match="neither a file nor valid JSON"):
        parse_task_specs("[{name: a")
    with pytest.raises(ValueError, match=r"duplicate task names \['a'\]"):
        parse_task_specs(tasks * 2)
