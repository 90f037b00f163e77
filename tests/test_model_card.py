"""The generated model card: parsed back with `huggingface_hub`, its metadata and every metric checked."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from modeling_mtl import MultiTaskModel
from multitask_st.model_card import write_model_card

TASKS = [
    {"name": "sentiment", "type": "classification", "labels": ["negative", "positive"]},
    {"name": "ner", "type": "token_classification", "labels": ["B-PER", "I-PER", "O"]},
    {"name": "similarity", "type": "regression"},
    {"name": "topics", "type": "multi_label_classification", "labels": ["sport", "science"], "threshold": 0.4},
    {"name": "sts", "type": "similarity", "score_range": [0, 5]},
]
METRICS = {
    "eval": {
        "sentiment": {"accuracy": 0.875, "macro_f1": 0.8711, "loss": 0.41},
        "ner": {"precision": 0.5, "recall": 0.625, "f1": 0.5555555555555556, "accuracy": 0.9, "loss": 0.3},
        "similarity": {"pearson": 0.81, "spearman": 0.79, "mse": 0.52, "loss": 0.52},
        "topics": {"micro_f1": 0.66, "macro_f1": 0.61, "loss": 0.2},
        "sts": {"pearson": 0.85, "spearman": 0.84, "loss": 1.2},
    },
    "embedding": {"eval": {"cosine_to_initial": 0.9731, "knn_overlap@10": 0.81}},
    "combined_score": 0.7133,
    "test": {"sentiment": {"accuracy": 0.86, "macro_f1": 0.859}},
    "test_combined_score": 0.859,
}


def _training_config(base_model: str) -> dict:
    def task(task_type, dataset, test_split=None, examples=("A short example.",)):
        return {"type": task_type, "dataset": dataset, "dataset_config": None, "train_split": "train",
                "eval_split": "validation", "test_split": test_split, "num_train_rows": 120, "num_train_examples": 100,
                "input_columns": ["text"], "label_column": "label", "examples": list(examples)}  # fmt: skip

    return {
        "base_model": base_model,
        "tasks": {
            "sentiment": task("classification", "stanfordnlp/sst2", "test"),
            "ner": {**task("token_classification", "../shared/data/wikiann-en"), "hub_dataset": "unimelb-nlp/wikiann"},
            "similarity": task("regression", "sentence-transformers/stsb"),
            "topics": task("multi_label_classification", json.dumps({"train": "/data/topics/train.jsonl"})),
            "sts": {
                **task("similarity", "/data/stsb", examples=[["A man plays.", "Someone plays."]]),
                "hub_dataset": "sentence-transformers/stsb",
            },
        },
        "hyperparameters": {"learning_rate": 5e-05, "max_steps": 40, "task_sampling": "temperature"},
        "embedding_protection": {"method": "distillation", "weight": 1.0},
        "hardware": "CPU (x86_64, 2 cores), 1 process(es), fp32, 2 torch thread(s)",
        "train_runtime_s": 12.5,
    }


def _trainer_state(steps: int) -> dict:
    history = []
    for step in range(1, steps + 1):
        history.append({"step": step, "epoch": step / steps, "loss": 2.0 / step, "loss/sentiment": 1.0 / step,
                        "loss/ner": 1.5 / step, "learning_rate": 1e-5, "grad_norm": 1.0})  # fmt: skip
        if step % 10 == 0:
            history.append({"step": step, "epoch": step / steps, "eval_loss": 1.0 / step,
                            "eval_sentiment/accuracy": 0.5 + step / 100, "eval_runtime": 0.1})  # fmt: skip
    history.append({"step": steps, "train_loss": 0.3, "train_runtime": 12.5})
    return {"global_step": steps, "log_history": history}


@pytest.fixture(scope="module")
def saved_model(tiny_bert, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("card") / "model"
    MultiTaskModel.from_backbone(tiny_bert, tasks=TASKS).save_pretrained(folder)
    return folder


def _with_records(saved_model: Path, target: Path, base_model: str, steps: int = 40) -> Path:
    target.mkdir()
    for path in saved_model.iterdir():
        if path.is_file():
            (target / path.name).write_bytes(path.read_bytes())
    (target / "metrics.json").write_text(json.dumps(METRICS))
    (target / "training_config.json").write_text(json.dumps(_training_config(base_model)))
    (target / "trainer_state.json").write_text(json.dumps(_trainer_state(steps)))
    return target


def test_card_metadata_and_every_metric_match_the_run(saved_model, tiny_bert, tmp_path):
    folder = _with_records(saved_model, tmp_path / "run", str(tiny_bert))
    path = write_model_card(folder, repo_id="alice/multi", figure=False)
    assert path == folder / "README.md"
    card = ModelCard.load(path)
    data = card.data

    assert data.library_name == "transformers" and data.pipeline_tag == "feature-extraction"
    for tag in ("multi-task", "sentence-embeddings", "text-classification", "token-classification", "text-regression",
                "multi-label-classification", "sentence-similarity", "sentence-transformers"):  # fmt: skip
        assert tag in data.tags, tag
    # One widget example per task, from its own data, each a text to embed: the form of the pipeline tag.
    widget = {entry["example_title"]: entry for entry in data.widget}
    assert set(widget) == {task["name"] for task in TASKS}
    assert widget["sts"] == {"text": "A man plays.", "example_title": "sts"}
    # Only Hub dataset ids go to `datasets` (a local copy's by its spec's `hub_dataset`); a local base model is not
    # claimed as a Hub `base_model`.
    assert data.datasets == ["sentence-transformers/stsb", "stanfordnlp/sst2", "unimelb-nlp/wikiann"]
    assert data.base_model is None and str(tiny_bert) in card.text

    # model-index: one result per task, split and metric (losses excepted), with the run's exact values, under
    # metric ids the Hub knows (macro_f1 -> f1 with average=macro, spearman -> spearmanr); it names datasets by Hub
    # id, so local data without one (topics) is left to the card's tables (it held their folder names).
    results = {(r.task_name, r.dataset_split, r.metric_name.split(" ", 1)[1]): r for r in data.eval_results}
    expected = {
        (task, "validation" if split == "eval" else "test", metric.replace("_", " ")): value
        for split in ("eval", "test")
        for task, scores in METRICS[split].items()
        for metric, value in scores.items()
        if metric not in ("loss", "mse") and task != "topics"
    }
    assert {key: result.metric_value for key, result in results.items()} == expected
    macro = results[("sentiment", "validation", "macro f1")]
    assert (macro.metric_type, macro.metric_args) == ("f1", {"average": "macro"})
    assert results[("sts", "validation", "spearman")].metric_type == "spearmanr"
    assert results[("sts", "validation", "spearman")].task_type == "sentence-similarity"
    assert results[("sentiment", "test", "accuracy")].dataset_type == "stanfordnlp/sst2"
    assert results[("ner", "validation", "f1")].task_type == "token-classification"
    assert results[("ner", "validation", "f1")].dataset_type == "unimelb-nlp/wikiann"
    assert "`wikiann-en`, a local copy of [unimelb-nlp/wikiann]" in card.text
    assert data.model_name == "multi"

    text = card.text
    for task in TASKS:
        for label in task.get("labels", ["score"]):
            assert f"`{label}`" in text, label
    assert "threshold 0.4" in text
    assert '"alice/multi"' in text and "trust_remote_code=True" in text and "revision=" in text
    assert "| `learning_rate` | 5e-05 |" in text and '| `task_sampling` | "temperature" |' in text
    assert "| `ner` | validation | f1 | 0.5556 |" in text and "| `ner` | validation | loss | 0.3000 |" in text
    assert "**0.7133**" in text and "**0.8590**" in text
    # Training curves: 40 logged steps, at most 25 rows shown, first and last kept, eval metrics merged in.
    curve_rows = [line for line in text.splitlines() if line.startswith("| ") and line.split("|")[1].strip().isdigit()]
    assert 2 <= len(curve_rows) <= 25 and curve_rows[0].startswith("| 1 |") and curve_rows[-1].startswith("| 40 |")
    assert "eval_sentiment/accuracy" in text and "loss/ner" in text and "train_runtime" not in text
    assert "- transformers: " in text and "- torch: " in text
    # Local data is described (name, rows, columns), the embedding's drift and similarity scores are shown, the
    # hardware line carries precision and threads, and sentence-transformers usage is given.
    assert "`topics` (local data, not on the Hub)" in text and "| 120 | 100 |" in text and "`text`, `label`" in text
    assert "| eval | 0.9731 | 0.8100 |" in text and "| `sts` | eval | 0.8400 |" in text
    assert "distillation, weight 1.0" in text and "fp32, 2 torch thread(s)" in text
    assert 'SentenceTransformer("alice/multi", trust_remote_code=True' in text
    assert 'pipeline("text-classification"' in text


def test_tasks_sharing_one_dataset_keep_one_result_each(tiny_bert, tmp_path):
    # huggingface_hub merges model-index results with the same task type, dataset, config and split; two
    # classification tasks labelled on one file must still come back as two results under their own names.
    tasks = [{"name": "topic", "labels": ["a", "b"]}, {"name": "sentiment", "labels": ["neg", "pos"]}]
    folder = tmp_path / "shared"
    MultiTaskModel.from_backbone(tiny_bert, tasks=tasks).save_pretrained(folder)
    metrics = {"eval": {"topic": {"accuracy": 0.9}, "sentiment": {"accuracy": 0.7}}}
    files = json.dumps({"train": "/data/all/train.jsonl"})
    training = _training_config(str(tiny_bert))
    training["tasks"] = {
        name: {
            "type": "classification",
            "dataset": files,
            "hub_dataset": "alice/all",
            "dataset_config": None,
            "label_column": name,
            "train_split": "train",
            "eval_split": "validation",
            "num_train_examples": 10,
        }  # fmt: skip
        for name in ("topic", "sentiment")
    }
    (folder / "metrics.json").write_text(json.dumps(metrics))
    (folder / "training_config.json").write_text(json.dumps(training))
    card = ModelCard.load(write_model_card(folder, figure=False))
    model_index = card.data.to_dict()["model-index"][0]["results"]
    assert sorted(result["task"]["name"] for result in model_index) == ["sentiment", "topic"]
    values = {(r.task_name, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert values == {("topic", "accuracy"): 0.9, ("sentiment", "accuracy"): 0.7}
    assert {r.dataset_config for r in card.data.eval_results} == {"topic", "sentiment"}


def test_default_backbone_gives_base_model_license_and_language(saved_model, tmp_path):
    folder = _with_records(saved_model, tmp_path / "run", "sentence-transformers/all-MiniLM-L6-v2", steps=3)
    data = ModelCard.load(write_model_card(folder, figure=False)).data
    # Inherited from the base model's own card (shipped with the offline copy of all-MiniLM-L6-v2).
    assert data.base_model == "sentence-transformers/all-MiniLM-L6-v2"
    assert data.license == "apache-2.0" and data.language == "en"
    # Explicit values win, extra tags are added.
    data = ModelCard.load(write_model_card(folder, license="mit", language=["en", "de"], tags=["demo"])).data
    assert data.license == "mit" and data.language == ["en", "de"] and "demo" in data.tags


def test_card_of_an_untrained_model_reports_no_numbers(saved_model, tmp_path):
    folder = tmp_path / "untrained"
    folder.mkdir()
    for path in saved_model.iterdir():
        if path.is_file():
            (folder / path.name).write_bytes(path.read_bytes())
    card = ModelCard.load(write_model_card(folder))
    assert card.data.eval_results is None and "model-index" not in card.content
    assert "No evaluation results were recorded" in card.text
    assert "No training record" in card.text and "No training log" in card.text
    assert not (folder / "training_curves.png").exists()


def test_missing_or_foreign_config_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        write_model_card(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="not a multi-task model config"):
        write_model_card(tmp_path)


@pytest.mark.parametrize(
    "weight, expected",
    [
        (1.0, "the other tasks' heads trained their own layers only, without moving the shared encoder (isolation)"),
        (
            0.9,
            "the other tasks' heads trained their own layers, with 10% of their gradient reaching the shared encoder",
        ),
    ],
)
def test_the_card_says_how_isolation_kept_the_embedding(saved_model, tiny_bert, tmp_path, weight, expected):
    folder = _with_records(saved_model, tmp_path / "run", str(tiny_bert))
    record = json.loads((folder / "training_config.json").read_text())
    record["embedding_protection"] = {"method": "isolation", "weight": weight}
    (folder / "training_config.json").write_text(json.dumps(record))
    text = write_model_card(folder, figure=False).read_text()
    assert f'Trained directly by "sts"; {expected}' in text
    assert "kept close to the base model's embedding" not in text


@pytest.mark.parametrize("weight", [1.0, 0.9])
def test_without_an_embedding_task_only_full_isolation_counts_as_keeping_it(tiny_bert, tmp_path, weight):
    heads_only = tmp_path / "heads-only"
    MultiTaskModel.from_backbone(tiny_bert, tasks=TASKS[:2]).save_pretrained(heads_only)
    folder = _with_records(heads_only, tmp_path / "run", str(tiny_bert))
    record = json.loads((folder / "training_config.json").read_text())
    record["embedding_protection"] = {"method": "isolation", "weight": weight}
    (folder / "training_config.json").write_text(json.dumps(record))
    text = write_model_card(folder, figure=False).read_text()
    if weight == 1.0:
        assert "the shared encoder was frozen and the heads trained only their own layers (isolation)" in text
        assert "The heads trained with the embedding protected (isolation)" in text
    else:  # a tenth of the heads' gradient moves the encoder under Adam about as far as all of it
        assert "No task trains the embedding, and it was not protected: the heads passed 10% of their gradient" in text
        assert "The embedding was left unprotected while the heads trained" in text
        assert "protected (isolation" not in text
