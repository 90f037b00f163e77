"""Multi-task training: data handling, loss scaling, logging, evaluation, freezing, optimizer groups, config files.

Everything runs on the tiny random BERT (fixture `tiny_bert`) and a few dozen generated rows; no network.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from train_helpers import make_dataset, make_rows, separate_sources, three_tasks, train_flags, write_jsonl
from transformers import AutoTokenizer, TrainingArguments

import train
from modeling_mtl import MultiTaskModel
from multitask_st.data import IGNORE_INDEX, MultiTaskCollator, build_datasets, parse_task_specs
from multitask_st.metrics import build_compute_metrics
from multitask_st.trainer import (
    MultiTaskSampler,
    MultiTaskTrainer,
    apply_freezing,
    sampling_probabilities,
)


def _build(tiny_bert, tasks, max_seq_length=32, **kwargs):
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    data = build_datasets(parse_task_specs(tasks), tokenizer, max_seq_length, **kwargs)
    model = MultiTaskModel.from_backbone(
        tiny_bert, tasks=data.model_tasks, tokenizer=tokenizer, max_seq_length=max_seq_length
    )
    return tokenizer, data, model


def _trainer(model, data, tokenizer, output_dir, **kwargs):
    trainer_kwargs = {
        key: kwargs.pop(key)
        for key in ("head_learning_rate", "layerwise_lr_decay", "loss_weighting", "task_sampling")
        if key in kwargs
    }
    args = TrainingArguments(output_dir=str(output_dir), report_to="none", use_cpu=True, **kwargs)
    return MultiTaskTrainer(
        model=model,
        args=args,
        train_dataset=data.train,
        eval_dataset=data.eval,
        data_collator=MultiTaskCollator(tokenizer, model.config.tasks),
        processing_class=tokenizer,
        compute_metrics=build_compute_metrics(model.config.tasks),
        source_sizes=data.source_sizes,
        **trainer_kwargs,
    )


def _run(tiny_bert, tasks, output_dir, *flags):
    argv = [*train_flags(tiny_bert, tasks, output_dir), *flags]
    assert train.main(argv) == 0
    return json.loads((Path(output_dir) / "trainer_state.json").read_text())


# ------------------------------------------------------------------------------------------------ data


def test_labels_inferred_sorted_and_aligned_to_first_subtoken(tiny_bert, tmp_path):
    rows = make_rows(6)
    rows[0]["tokens"] = ["Smithson"] + rows[0]["tokens"][1:]  # a word the tokenizer splits
    rows[0]["text"] = " ".join(rows[0]["tokens"])
    rows[1]["topic"] = None  # partially labelled row: skipped by the topic loss, still trains the others
    files = {
        "train": str(write_jsonl(tmp_path / "train.jsonl", rows)),
        "validation": str(write_jsonl(tmp_path / "validation.jsonl", rows)),
    }
    tokenizer, data, _ = _build(tiny_bert, three_tasks(files))
    specs = {spec.name: spec for spec in data.specs}
    assert specs["topic"].labels == sorted({row["topic"] for row in rows if row["topic"]})
    assert specs["ner"].labels == sorted({tag for row in rows for tag in row["ner_tags"]})
    assert data.train[1]["labels_topic"] == IGNORE_INDEX
    assert data.num_train_examples == {"topic": 5, "sentiment": 6, "ner": 6}

    encoding = tokenizer(rows[0]["tokens"], is_split_into_words=True)
    word_ids = encoding.word_ids()
    assert word_ids.count(0) > 1, "the test word must be split into several sub-tokens"
    labels = data.train[0]["labels_ner"]
    first_tag = specs["ner"].labels.index(rows[0]["ner_tags"][0])
    positions = [i for i, w in enumerate(word_ids) if w == 0]
    assert labels[positions[0]] == first_tag
    assert all(labels[i] == IGNORE_INDEX for i in positions[1:])
    assert labels[0] == IGNORE_INDEX  # [CLS]

    # Option: label all sub-tokens in training (B- continues as I-); eval stays per word.
    _, data_all, _ = _build(tiny_bert, three_tasks(files), label_all_subtokens=True)
    labels_all = data_all.train[0]["labels_ner"]
    continuation = specs["ner"].labels.index("I-" + rows[0]["ner_tags"][0][2:])
    assert labels_all[positions[0]] == first_tag
    assert all(labels_all[i] == continuation for i in positions[1:])
    assert data_all.eval[0]["labels_ner"] == data.eval[0]["labels_ner"]


def test_unseen_eval_label_is_an_error_that_names_it(tiny_bert, tmp_path):
    files = make_dataset(tmp_path, 12, 4)
    rows = make_rows(4, seed=3)
    rows[2]["topic"] = "astrology"
    write_jsonl(Path(files["validation"]), rows)
    with pytest.raises(ValueError, match=r"task 'topic': label 'astrology' in eval split 'validation' row 2"):
        _build(tiny_bert, three_tasks(files))


def test_collator_gives_every_task_labels_in_every_batch(tiny_bert, tmp_path):
    tokenizer, data, model = _build(tiny_bert, separate_sources(tmp_path))
    collator = MultiTaskCollator(tokenizer, model.config.tasks)
    batch = collator([data.train[i] for i in range(3)])  # rows of the topic source only
    assert set(batch["labels"]) == {"topic", "sentiment", "ner"}
    assert (batch["labels"]["topic"] != IGNORE_INDEX).all()
    assert (batch["labels"]["sentiment"] == IGNORE_INDEX).all()
    assert batch["labels"]["ner"].shape == batch["input_ids"].shape
    outputs = model(**batch)
    # The unlabelled heads still give a (zero) loss that depends on their weights.
    assert set(outputs.task_losses) == {"topic", "sentiment", "ner"}
    assert float(outputs.task_losses["sentiment"].detach()) == 0.0 and outputs.task_losses["sentiment"].requires_grad


def test_sampler_strategies_are_deterministic_and_single_source(tmp_path):
    sizes = [100, 10, 40]
    np.testing.assert_allclose(sampling_probabilities(sizes, "proportional"), np.array(sizes) / 150)
    temperature = sampling_probabilities(sizes, "temperature", 2.0)
    np.testing.assert_allclose(temperature, np.sqrt(sizes) / np.sqrt(sizes).sum())
    np.testing.assert_allclose(sampling_probabilities(sizes, "uniform"), [1 / 3] * 3)
    with pytest.raises(ValueError, match="task_sampling 'nope'"):
        sampling_probabilities(sizes, "nope")

    sampler = MultiTaskSampler(sizes, batch_size=4, strategy="temperature", seed=1)
    first = list(sampler)
    assert len(first) == len(sampler) == (25 + 3 + 10) * 4
    assert list(sampler) == first  # same epoch -> same order (resuming replays it)
    sampler.set_epoch(1)
    assert list(sampler) != first
    bounds = np.cumsum([0] + sizes)
    for start in range(0, len(first), 4):
        block = first[start : start + 4]
        sources = {int(np.searchsorted(bounds, index, side="right") - 1) for index in block}
        assert len(sources) == 1, f"batch {block} mixes sources"
    round_robin = MultiTaskSampler(sizes, batch_size=4, strategy="round_robin")
    assert round_robin.batch_sources()[:6] == [0, 1, 2, 0, 1, 2]


# ------------------------------------------------------------------------------------------------ loss


def test_gradient_accumulation_matches_one_large_batch(tiny_bert, tmp_path):
    tokenizer, data, model = _build(tiny_bert, separate_sources(tmp_path, sizes=(8, 8, 8)))
    model.eval()  # no dropout, so both passes see the same function
    trainer = _trainer(model, data, tokenizer, tmp_path / "out", per_device_train_batch_size=4)
    collator = trainer.data_collator
    # Sources 0-7 topic, 8-15 sentiment, 16-23 NER: micro-batches with very different label counts per task.
    rows = [data.train[i] for i in (0, 1, 2, 8, 3, 16, 17, 18)]
    large = collator(rows)
    small = [collator(rows[:4]), collator(rows[4:])]

    def gradients(batches):
        model.zero_grad()
        counts = trainer._get_num_items_in_batch(batches, torch.device("cpu"))
        total = sum(trainer.compute_loss(model, batch, num_items_in_batch=counts) for batch in batches)
        total.backward()
        return total.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss_large, grads_large = gradients([large])
    loss_accumulated, grads_accumulated = gradients(small)
    torch.testing.assert_close(loss_accumulated, loss_large, rtol=1e-5, atol=1e-6)
    for name, grad in grads_large.items():
        torch.testing.assert_close(grads_accumulated[name], grad, rtol=1e-4, atol=1e-6, msg=name)

    # The naive way (mean per micro-batch, divided by the number of micro-batches) would not match.
    with torch.no_grad():
        naive = sum(model(**batch).loss for batch in small) / 2
    assert abs(float(naive) - float(loss_large)) > 0.2


def test_uncertainty_weighting_is_learned_and_removed_before_saving(tiny_bert, tmp_path):
    state = _run(
        tiny_bert,
        separate_sources(tmp_path / "data"),
        tmp_path / "out",
        "--max_steps",
        "6",
        "--logging_steps",
        "3",
        "--eval_strategy",
        "no",
        "--loss_weighting",
        "uncertainty",
        "--learning_rate",
        "1e-2",
        "--save_strategy",
        "no",
    )
    logged = [entry for entry in state["log_history"] if "loss" in entry]
    assert all(f"task_weight_{name}" in logged[-1] for name in ("topic", "sentiment", "ner"))
    assert any(logged[-1][f"task_weight_{name}"] != 1.0 for name in ("topic", "sentiment", "ner"))
    config = json.loads((tmp_path / "out" / "training_config.json").read_text())
    assert set(config["hyperparameters"]["learned_task_weights"]) == {"topic", "sentiment", "ner"}
    reloaded = MultiTaskModel.from_pretrained(tmp_path / "out")
    assert not any(name.startswith("loss_weighting") for name in reloaded.state_dict())


# ------------------------------------------------------------------------------------------------ full runs


def test_training_run_logs_per_task_losses_and_writes_the_output_contract(tiny_bert, tmp_path):
    tasks = separate_sources(tmp_path / "data")
    state = _run(
        tiny_bert,
        tasks,
        tmp_path / "out",
        "--max_steps",
        "8",
        "--logging_steps",
        "4",
        "--eval_strategy",
        "steps",
        "--eval_steps",
        "4",
        "--save_strategy",
        "no",
        "--remove_unused_columns",
        "true",
        "--task_sampling",
        "round_robin",
    )
    history = state["log_history"]
    train_logs = [entry for entry in history if "loss" in entry]
    # round robin over 3 sources, 4 steps per log window: every task appears in every window
    for entry in train_logs:
        assert {"loss_topic", "loss_sentiment", "loss_ner"} <= set(entry)
    eval_logs = [entry for entry in history if "eval_loss" in entry]
    assert eval_logs, "eval_loss must be logged"
    for key in (
        "eval_topic_loss",
        "eval_ner_loss",
        "eval_topic_accuracy",
        "eval_topic_macro_f1",
        "eval_ner_f1",
        "eval_combined_score",
    ):
        assert key in eval_logs[-1], key
    # The weighted sum of the per-task eval losses is the eval loss (weights are 1; each eval row has one task,
    # so the per-batch mean of the total differs slightly; but each task loss must be finite and positive).
    assert all(eval_logs[-1][f"eval_{t}_loss"] > 0 for t in ("topic", "sentiment", "ner"))

    output = tmp_path / "out"
    metrics = json.loads((output / "metrics.json").read_text())
    assert set(metrics["eval"]) == {"topic", "sentiment", "ner"}
    assert 0.0 <= metrics["eval"]["topic"]["accuracy"] <= 1.0 and "f1" in metrics["eval"]["ner"]
    assert metrics["combined_score"] == pytest.approx(
        np.mean(
            [
                metrics["eval"]["topic"]["macro_f1"],
                metrics["eval"]["sentiment"]["macro_f1"],
                metrics["eval"]["ner"]["f1"],
            ]
        )
    )
    config = json.loads((output / "training_config.json").read_text())
    assert config["tasks"]["ner"]["type"] == "token_classification"
    assert config["tasks"]["topic"]["num_train_examples"] == 40
    assert config["hyperparameters"]["task_sampling"] == "round_robin"
    assert config["hyperparameters"]["max_steps"] == 8
    assert config["train_runtime_s"] > 0 and "process" in config["hardware"]
    model = MultiTaskModel.from_pretrained(output)
    assert model.config.get_task("topic")["labels"] == ["business", "science", "sport"]
    assert set(model.predict("John Smith loved the match in Paris")) == {"topic", "sentiment", "ner"}


def test_early_stopping_and_best_model_on_combined_score(tiny_bert, tmp_path):
    files = make_dataset(tmp_path / "data", 32, 8)
    # A threshold no score can beat: no evaluation counts as an improvement, so training stops after the first
    # evaluation plus `patience` more.
    state = _run(
        tiny_bert,
        three_tasks(files),
        tmp_path / "out",
        "--max_steps",
        "40",
        "--eval_strategy",
        "steps",
        "--eval_steps",
        "2",
        "--save_steps",
        "2",
        "--logging_steps",
        "2",
        "--load_best_model_at_end",
        "true",
        "--metric_for_best_model",
        "combined_score",
        "--early_stopping_patience",
        "2",
        "--early_stopping_threshold",
        "2.0",
        "--learning_rate",
        "5e-3",
    )
    assert state["global_step"] == 6, "early stopping after 1 + 2 evaluations without improvement"
    evaluations = [entry for entry in state["log_history"] if "eval_combined_score" in entry]
    best = max(evaluations, key=lambda entry: entry["eval_combined_score"])
    assert state["best_global_step"] == best["step"]
    assert state["best_metric"] == pytest.approx(best["eval_combined_score"], abs=1e-6)
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    # The final model is the best checkpoint (reloaded at the end): its eval score is the best one measured.
    assert metrics["combined_score"] == pytest.approx(best["eval_combined_score"], abs=1e-6)


def test_config_file_and_flag_overrides(tmp_path):
    config = {
        "tasks": [{"name": "sentiment", "dataset": "some/dataset"}],
        "learning_rate": 3e-4,
        "freeze_layers": 1,
        "output_dir": str(tmp_path / "a"),
        "report_to": ["none"],
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    model_args, data_args, mtl_args, training_args = train.parse_arguments([str(path), "--learning_rate", "1e-3"])
    assert training_args.learning_rate == 1e-3 and mtl_args.freeze_layers == 1
    assert parse_task_specs(data_args.tasks)[0].dataset == "some/dataset"
    json_path = tmp_path / "config.json"
    json_path.write_text(json.dumps(config))
    assert train.parse_arguments([str(json_path)])[3].learning_rate == 3e-4
    # No arguments: the embedded default job.
    _, default_data, _, default_training = train.parse_arguments([])
    assert [spec.name for spec in parse_task_specs(default_data.tasks)] == ["topic", "sentiment", "ner"]
    assert default_training.metric_for_best_model == "combined_score"


# ------------------------------------------------------------------------------------------------ optimizer


def test_freezing_options_leave_frozen_parameters_out_of_the_optimizer(tiny_bert, tmp_path):
    tokenizer, data, model = _build(tiny_bert, three_tasks(make_dataset(tmp_path / "data", 8, 4)))
    frozen = apply_freezing(model, freeze_layers=1, freeze_heads=["sentiment"])
    names = dict(model.named_parameters())
    assert any(".embeddings." in name for name in frozen)
    assert any(".layer.0." in name for name in frozen)
    assert not any(".layer.1." in name for name in frozen)
    assert all(not names[name].requires_grad for name in frozen)
    assert not names["heads.sentiment.out_proj.weight"].requires_grad
    assert names["heads.topic.out_proj.weight"].requires_grad

    trainer = _trainer(
        model, data, tokenizer, tmp_path / "out", max_steps=1, per_device_train_batch_size=4, save_strategy="no"
    )
    trainer.train()
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert not any(id(names[name]) in optimized for name in frozen)
    with_state = {id(parameter) for parameter in trainer.optimizer.state}
    assert not any(id(names[name]) in with_state for name in frozen)
    assert id(names["heads.topic.out_proj.weight"]) in with_state

    with pytest.raises(ValueError, match=r"freeze_heads: unknown task\(s\) \['nope'\]"):
        apply_freezing(model, freeze_heads=["nope"])
    apply_freezing(model, freeze_backbone=True)
    assert not any(p.requires_grad for n, p in model.named_parameters() if n.startswith("backbone."))


def test_layerwise_learning_rate_decay_param_groups(tiny_bert, tmp_path):
    tokenizer, data, model = _build(tiny_bert, three_tasks(make_dataset(tmp_path / "data", 8, 4)))
    trainer = _trainer(
        model, data, tokenizer, tmp_path / "out", learning_rate=1e-3, head_learning_rate=1e-2, layerwise_lr_decay=0.5
    )
    # The per-task label columns are not forward() arguments but must survive remove_unused_columns.
    kept = trainer._remove_unused_columns(data.train.add_column("unused", [0] * len(data.train)))
    assert {"labels_topic", "labels_sentiment", "labels_ner", "input_ids"} <= set(kept.column_names)
    assert "unused" not in kept.column_names
    trainer.create_optimizer()
    learning_rates = {}
    for group in trainer.optimizer.param_groups:
        for parameter in group["params"]:
            learning_rates[id(parameter)] = group["lr"]
    names = dict(model.named_parameters())

    def lr(name):
        return learning_rates[id(names[name])]

    # 2 layers: top layer lr*0.5, bottom lr*0.25, embeddings lr*0.125; heads use their own rate.
    assert lr("heads.topic.out_proj.weight") == pytest.approx(1e-2)
    assert lr("backbone.encoder.layer.1.attention.self.query.weight") == pytest.approx(5e-4)
    assert lr("backbone.encoder.layer.0.attention.self.query.weight") == pytest.approx(2.5e-4)
    assert lr("backbone.embeddings.word_embeddings.weight") == pytest.approx(1.25e-4)
    # Weight decay only where the Trainer would apply it.
    decay = {id(p): g["weight_decay"] for g in trainer.optimizer.param_groups for p in g["params"]}
    assert decay[id(names["backbone.encoder.layer.0.attention.self.query.bias"])] == 0.0


def test_default_job_wiring_on_the_embedded_dataset(tiny_bert, tmp_path):
    """`python train.py` with no arguments = DEFAULT_JOB on default_tasks(); here with the tiny encoder, 2 steps."""
    if not (train.DEFAULT_DATA_DIR / "default_train.jsonl").is_file():
        pytest.skip("the embedded default dataset (multitask_st/data/default_train.jsonl) is not there yet")
    argv = train._to_flags({**train.DEFAULT_JOB, "tasks": train.default_tasks()}) + [
        "--model_name_or_path",
        str(tiny_bert),
        "--output_dir",
        str(tmp_path / "out"),
        "--max_steps",
        "2",
        "--eval_strategy",
        "no",
        "--save_strategy",
        "no",
        "--load_best_model_at_end",
        "false",
        "--use_cpu",
        "true",
    ]
    assert train.main(argv) == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert set(metrics["eval"]) == {"topic", "sentiment", "ner"}
    model = MultiTaskModel.from_pretrained(tmp_path / "out")
    assert model.config.get_task("ner")["type"] == "token_classification"


def test_regression_and_multi_label_tasks_with_missing_labels(tiny_bert, tmp_path):
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
    tokenizer, data, model = _build(tiny_bert, tasks)
    assert data.specs[1].labels == ["a", "b", "c"]
    assert data.num_train_examples == {"score": 11, "tags": 11}
    batch = MultiTaskCollator(tokenizer, model.config.tasks)([data.train[i] for i in range(6)])
    assert torch.isnan(batch["labels"]["score"][3]).all() and torch.isnan(batch["labels"]["tags"][4]).all()
    assert batch["labels"]["tags"][2].tolist() == [1.0, 0.0, 1.0]
    outputs = model(**batch)
    assert torch.isfinite(outputs.loss)
    trainer = _trainer(model, data, tokenizer, tmp_path / "out", per_device_eval_batch_size=5)
    metrics = trainer.evaluate()
    assert {"eval_score_pearson", "eval_score_spearman", "eval_tags_micro_f1", "eval_score_loss"} <= set(metrics)
