"""The reusable pieces of benchmarks/bench_training_choices.py: adding heads to a trained model, continuing training
on a new task with old heads (and the encoder) frozen, optimizer-state accounting, the sampling schedule and the
random-init backbone. Tiny random BERT (fixture `tiny_bert`) and generated rows only; no network, no shared data.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from train_helpers import make_dataset

import train
from modeling_mtl import MultiTaskModel
from multitask_st.trainer import MultiTaskSampler

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from bench_training_choices import (  # noqa: E402
    batches_per_source,
    continue_training,
    make_random_init_backbone,
    optimizer_state_size,
)

NER_TAGS = ["B-LOC", "B-ORG", "B-PER", "I-LOC", "I-ORG", "I-PER", "O"]


@pytest.fixture(scope="module")
def phase1(tiny_bert, tmp_path_factory) -> dict:
    """A sentiment model trained by train.py, and task specs for sentiment + NER from two separate datasets."""
    root = tmp_path_factory.mktemp("phase1")
    sentiment_files = make_dataset(root / "sentiment", 24, 8, seed=0)
    ner_files = make_dataset(root / "ner", 24, 8, seed=1)
    sentiment = {
        "name": "sentiment",
        "type": "classification",
        "data_files": sentiment_files,
        "label_column": "sentiment",
        "eval_split": None,
        "test_split": "validation",
    }
    ner = {
        "name": "ner",
        "type": "token_classification",
        "data_files": ner_files,
        "eval_split": None,
        "test_split": "validation",
    }
    output = root / "model"
    argv = ["--model_name_or_path", str(tiny_bert), "--tasks", json.dumps([sentiment]), "--output_dir", str(output)]
    argv += ["--max_steps", "2", "--per_device_train_batch_size", "4", "--max_seq_length", "32", "--report_to", "none"]
    argv += ["--use_cpu", "true", "--num_examples_to_print", "0", "--save_strategy", "no", "--seed", "0"]
    assert train.main(argv) == 0
    return {"dir": output, "tasks": [sentiment, ner]}


def _training_arguments() -> dict:
    return {
        "max_steps": 3,
        "per_device_train_batch_size": 4,
        "per_device_eval_batch_size": 8,
        "learning_rate": 1e-2,
        "report_to": "none",
        "use_cpu": True,
        "save_strategy": "no",
        "seed": 0,
    }


def _state(path: Path) -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in MultiTaskModel.from_pretrained(str(path)).state_dict().items()}


def test_add_tasks_keeps_every_weight_and_adds_a_fresh_head(phase1, tmp_path):
    model = MultiTaskModel.from_pretrained(str(phase1["dir"])).eval()
    extended = model.add_tasks([{"name": "ner", "type": "token_classification", "labels": NER_TAGS}]).eval()
    assert extended.task_names == ["sentiment", "ner"]
    assert extended.config.get_task("sentiment") == model.config.get_task("sentiment")
    old = model.state_dict()
    for key, value in extended.state_dict().items():
        if key.startswith("heads.ner."):
            continue
        assert torch.equal(value, old[key]), key
    assert extended.heads["ner"].out_proj.out_features == len(NER_TAGS)
    with torch.no_grad():
        batch = model.tokenizer(["John loved the match in Paris"], return_tensors="pt")
        batch = {key: value for key, value in batch.items() if key != "token_type_ids"}
        assert torch.equal(model(**batch).logits["sentiment"], extended(**batch).logits["sentiment"])
    with pytest.raises(ValueError, match="already exist"):
        model.add_tasks([{"name": "sentiment", "type": "classification", "labels": ["a", "b"]}])
    assert model.task_names == ["sentiment"]  # the original is left untouched
    assert extended.tokenizer is model.tokenizer
    extended.save_pretrained(tmp_path / "extended")
    reloaded = MultiTaskModel.from_pretrained(str(tmp_path / "extended")).eval()
    assert reloaded.config.task_id2label("ner") == dict(enumerate(NER_TAGS))
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).logits["ner"], extended(**batch).logits["ner"])


def test_continue_training_frozen_heads_and_encoder(phase1, tmp_path):
    before = _state(phase1["dir"])
    result = continue_training(
        phase1["dir"],
        phase1["tasks"],
        ["ner"],
        tmp_path / "both_frozen",
        _training_arguments(),
        freeze_old_heads=True,
        freeze_backbone=True,
        max_seq_length=32,
    )
    # Only the new NER head trained: the old task's test scores cannot move, and the optimizer held state for
    # exactly the trainable parameters (AdamW: two float32 moments each, plus a step counter per tensor).
    assert result["before"]["sentiment"] == result["after"]["sentiment"]
    assert result["old_tasks"] == ["sentiment"] and result["new_tasks"] == ["ner"]
    ner_head = 32 * len(NER_TAGS) + len(NER_TAGS)  # tiny BERT hidden size 32
    assert result["trainable_params"] == ner_head
    assert result["params_with_optimizer_state"] == ner_head
    assert 8 * ner_head <= result["optimizer_state_bytes"] <= 8 * ner_head + 64
    after = _state(tmp_path / "both_frozen")
    assert set(after) - set(before) == {"heads.ner.out_proj.weight", "heads.ner.out_proj.bias"}
    for key, value in before.items():
        assert torch.equal(value, after[key]), key
    assert "ner" in result["after"] and "f1" in result["after"]["ner"]
    assert (tmp_path / "both_frozen" / "continue_metrics.json").is_file()


def test_continue_training_frozen_heads_trainable_encoder(phase1, tmp_path):
    before = _state(phase1["dir"])
    result = continue_training(
        phase1["dir"],
        phase1["tasks"],
        ["ner"],
        tmp_path / "heads_frozen",
        _training_arguments(),
        freeze_old_heads=True,
        max_seq_length=32,
    )
    after = _state(tmp_path / "heads_frozen")
    for key in ("heads.sentiment.out_proj.weight", "heads.sentiment.out_proj.bias"):
        assert torch.equal(before[key], after[key]), key
    changed = [key for key in before if key.startswith("backbone.") and not torch.equal(before[key], after[key])]
    assert changed, "the encoder should have trained"
    head = sum(value.numel() for key, value in before.items() if key.startswith("heads.sentiment."))
    assert result["trainable_params"] == result["total_params"] - head


def test_continue_training_rehearsal_trains_old_tasks_with_their_heads_fixed(phase1, tmp_path):
    before = _state(phase1["dir"])
    result = continue_training(
        phase1["dir"],
        phase1["tasks"],
        ["sentiment", "ner"],
        tmp_path / "rehearsal",
        _training_arguments(),
        freeze_old_heads=True,
        max_seq_length=32,
    )
    assert result["train_source_sizes"] == [24, 24]  # both sources feed the sampler, not only the new task's
    after = _state(tmp_path / "rehearsal")
    for key in ("heads.sentiment.out_proj.weight", "heads.sentiment.out_proj.bias"):
        assert torch.equal(before[key], after[key]), key
    assert any(key.startswith("backbone.") and not torch.equal(before[key], after[key]) for key in before)


def test_continue_training_rejects_a_source_shared_with_an_old_task(phase1, tmp_path):
    shared = [dict(phase1["tasks"][0]), {**phase1["tasks"][1], "data_files": phase1["tasks"][0]["data_files"]}]
    with pytest.raises(ValueError, match="outside train_tasks"):
        continue_training(phase1["dir"], shared, ["ner"], tmp_path / "out", _training_arguments(), max_seq_length=32)


def test_optimizer_state_size_counts_adam_moments_of_trained_parameters_only():
    trained, frozen = torch.nn.Linear(4, 3), torch.nn.Linear(4, 5)
    frozen.requires_grad_(False)
    optimizer = torch.optim.AdamW(trained.parameters(), lr=0.1)
    assert optimizer_state_size(optimizer) == (0, 0)  # state appears at the first step
    (trained(torch.ones(2, 4)).sum() + frozen(torch.ones(2, 4)).sum()).backward()
    optimizer.step()
    state_bytes, params = optimizer_state_size(optimizer)
    assert params == 15
    steps = sum(state["step"].numel() * state["step"].element_size() for state in optimizer.state.values())
    assert state_bytes == 2 * 15 * 4 + steps

    class Wrapped:  # accelerate's AcceleratedOptimizer keeps the real optimizer in `.optimizer`
        def __init__(self, inner):
            self.optimizer = inner

    assert optimizer_state_size(Wrapped(optimizer)) == (state_bytes, params)


@pytest.mark.parametrize("strategy", ["proportional", "temperature", "uniform", "round_robin"])
def test_batches_per_source_follows_the_sampler_across_epochs(strategy):
    sizes, batch_size, steps = [200, 10], 8, 60  # 25 + 2 = 27 batches per epoch: 60 steps span three epochs
    counts = batches_per_source(sizes, batch_size, strategy, 2.0, 7, steps)
    assert sum(counts) == steps
    sampler = MultiTaskSampler(sizes, batch_size, strategy, 2.0, 7)
    assert sampler.num_batches == 27
    expected = [0, 0]
    for epoch in range(3):
        sampler.set_epoch(epoch)
        for source in sampler.batch_sources()[: steps - 27 * epoch]:
            expected[source] += 1
    assert counts == expected
    if strategy == "round_robin":  # alternates within each epoch of 27 batches: 14 / 13, 14 / 13, then 3 / 3
        assert counts == [31, 29]


def test_make_random_init_backbone_same_architecture_new_weights(tiny_bert, tmp_path):
    from transformers import AutoModel

    target = make_random_init_backbone(tiny_bert, tmp_path / "random", seed=0)
    pretrained, scratch = AutoModel.from_pretrained(tiny_bert), AutoModel.from_pretrained(target)
    assert scratch.config.to_dict()["hidden_size"] == pretrained.config.hidden_size
    assert scratch.config.num_hidden_layers == pretrained.config.num_hidden_layers
    weights = dict(pretrained.named_parameters())
    assert {name for name, _ in scratch.named_parameters()} == set(weights)
    assert any(not torch.equal(p, weights[name]) for name, p in scratch.named_parameters())
    again = make_random_init_backbone(tiny_bert, tmp_path / "again", seed=0)
    for (name, p), (_, q) in zip(scratch.named_parameters(), AutoModel.from_pretrained(again).named_parameters()):
        assert torch.equal(p, q), name  # seeded
    model = MultiTaskModel.from_backbone(target, tasks=[{"name": "t", "type": "classification", "labels": ["a", "b"]}])
    assert model.tokenizer is not None
