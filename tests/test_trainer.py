"""multitask_st.trainer: task sampling, exact loss scaling under gradient accumulation (text and pair tasks),
per-task logging, learned loss weights, freezing, optimizer groups, the embedding protection terms and the drift
measured at every evaluation. Tiny random BERT (`tiny_bert`) and generated rows; no network."""

from __future__ import annotations

import itertools
import json
import logging

import numpy as np
import pytest
import torch
from train_helpers import make_dataset, pair_files, separate_sources, three_tasks, write_jsonl
from transformers import AutoTokenizer, TrainerCallback, TrainingArguments

from modeling_mtl import IGNORE_INDEX, MultiTaskModel
from multitask_st.data import build_datasets, parse_task_specs
from multitask_st.trainer import (
    MultiTaskSampler,
    MultiTaskTrainer,
    apply_freezing,
    sampling_probabilities,
)
from tasks_mtl import make_task


def build(tiny_bert, tasks, max_seq_length=32):
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    data = build_datasets(parse_task_specs(tasks), tokenizer, max_seq_length)
    torch.manual_seed(0)
    model = MultiTaskModel.from_backbone(tiny_bert, tasks=data.model_tasks, tokenizer=tokenizer, max_seq_length=32)
    return data, model


def trainer_for(model, data, output_dir, trainer_options=None, **arguments):
    args = TrainingArguments(output_dir=str(output_dir), report_to="none", use_cpu=True, **arguments)
    return MultiTaskTrainer(
        model=model,
        args=args,
        train_dataset=data.train,
        eval_dataset=data.eval,
        source_sizes=data.source_sizes,
        **(trainer_options or {}),
    )


def pair_tasks(folder):
    files = pair_files(folder, train=16, evaluation=8)
    return [
        {"name": "sts", "type": "similarity", "data_files": files, "label_column": "score", "score_range": [0, 5],
         "loss": "cosine_mse"},
        {"name": "paraphrase", "type": "pair_classification", "data_files": files, "label_column": "label"},
    ]  # fmt: skip


# ------------------------------------------------------------------------------------------------ sampling


def test_sampler_strategies_are_deterministic_and_single_source():
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


@pytest.mark.parametrize("strategy", ["temperature", "round_robin"])
def test_every_process_trains_the_same_task_at_each_step(strategy):
    from accelerate.data_loader import prepare_data_loader
    from torch.utils.data import DataLoader

    sizes, batch_size = [30, 9, 13], 4
    single = MultiTaskSampler(sizes, batch_size, strategy, seed=3)
    sampler = MultiTaskSampler(sizes, batch_size, strategy, seed=3, num_processes=2)
    assert len(sampler) == 16 * batch_size  # 15 batches a process-epoch, rounded up to whole steps of 2
    bounds = np.cumsum([0] + sizes)
    source = lambda index: int(np.searchsorted(bounds, index, side="right") - 1)  # noqa: E731
    per_process = []
    for rank in range(2):  # the batches each process gets, dealt out by accelerate as in training
        loader = DataLoader(range(sum(sizes)), batch_size=batch_size, sampler=sampler)
        batches = list(prepare_data_loader(loader, num_processes=2, process_index=rank, put_on_device=False))
        per_process.append([{source(int(index)) for index in batch} for batch in batches])
    assert len(per_process[0]) == len(per_process[1]) == 8
    assert per_process[0] == per_process[1]  # step by step, one source, the same on both processes
    assert all(len(sources) == 1 for sources in per_process[0])
    if strategy == "round_robin":
        assert [next(iter(sources)) for sources in per_process[0]] == [0, 1, 2, 0, 1, 2, 0, 1]
    # One process: a source drawn per batch, as before the option (the runs recorded in the docs replay as they were).
    drawn = np.random.default_rng([3, 0, 1]).choice(3, size=15, p=single.probabilities).tolist()
    assert single.batch_sources() == (drawn if strategy == "temperature" else [b % 3 for b in range(15)])


# ------------------------------------------------------------------------------------------------ loss


def accumulated_gradients(trainer, model, batches):
    model.zero_grad()
    counts = trainer._get_num_items_in_batch(batches, torch.device("cpu"))
    total = sum(trainer.compute_loss(model, batch, num_items_in_batch=counts) for batch in batches)
    total.backward()
    return total.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["text", "pair"])
def test_gradient_accumulation_matches_one_large_batch(tiny_bert, tmp_path, kind):
    if kind == "text":
        data, model = build(tiny_bert, separate_sources(tmp_path, sizes=(8, 8, 8)))
        rows = [data.train[i] for i in (0, 1, 2, 8, 3, 16, 17, 18)]  # very different label counts per micro-batch
    else:
        data, model = build(tiny_bert, pair_tasks(tmp_path))
        rows = [data.train[i] for i in range(8)]
        for row in rows[:3]:
            row["labels"]["paraphrase"] = -100  # unevenly labelled micro-batches
        with torch.no_grad():  # confident logits: per-pair losses far apart, so a wrong weighting shows
            for parameter in model.heads["paraphrase"].parameters():
                parameter.mul_(30)
    model.eval()  # no dropout, so both passes see the same function
    trainer = trainer_for(
        model, data, tmp_path / "out", {"embedding_protection": "none"}, per_device_train_batch_size=4
    )
    large = trainer.data_collator(rows)
    small = [trainer.data_collator(rows[:4]), trainer.data_collator(rows[4:])]
    loss_large, grads_large = accumulated_gradients(trainer, model, [large])
    loss_accumulated, grads_accumulated = accumulated_gradients(trainer, model, small)
    torch.testing.assert_close(loss_accumulated, loss_large, rtol=1e-5, atol=1e-6)
    for name, grad in grads_large.items():
        torch.testing.assert_close(grads_accumulated[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    # The naive way (mean per micro-batch, divided by the number of micro-batches) would not match.
    with torch.no_grad():
        naive = sum(model(**batch).loss for batch in small) / 2
    assert abs(float(naive) - float(loss_large)) > 1e-3


def test_eval_scores_every_task_on_a_split_mixing_single_texts_and_pairs(tiny_bert, tmp_path):
    files = make_dataset(tmp_path / "single", 16, 8)
    tasks = three_tasks(files) + pair_tasks(tmp_path / "pairs")
    tasks.append({**tasks[-1], "name": "retrieval", "type": "contrastive", "text_column": "sentence1",
                  "text_pair_column": "sentence2", "row_filter": {"label": 1}, "label_column": None})  # fmt: skip
    data, model = build(tiny_bert, tasks)
    trainer = trainer_for(model, data, tmp_path / "out", per_device_eval_batch_size=5)  # batches straddle sources
    metrics = trainer.evaluate()
    for key in ("topic/accuracy", "ner/f1", "sts/spearman", "paraphrase/accuracy", "retrieval/mrr", "retrieval/loss"):
        assert f"eval_{key}" in metrics, key
    assert np.isfinite(metrics["eval_combined_score"])


def test_retrieval_is_scored_per_distinct_query_with_every_positive_of_its_rows_relevant(tiny_bert, tmp_path):
    """The eval split's contrastive rows reach the metric as text ids: a repeated anchor is one query whose
    relevant passages are its rows' positives, a repeated positive one passage."""
    anchors = ["the cat sat", "a dog ran", "the cat sat", "birds fly south", "a dog ran", "rain falls"]
    positives = ["a cat was sitting", "the dog was running", "the cat sits", "birds migrate", "a cat was sitting",
                 "it is raining"]  # fmt: skip
    rows = [{"anchor": a, "positive": p} for a, p in zip(anchors, positives)]
    files = {
        "train": str(write_jsonl(tmp_path / "retrieval" / "train.jsonl", rows)),
        "validation": str(write_jsonl(tmp_path / "retrieval" / "validation.jsonl", rows)),
    }
    tasks = [*three_tasks(make_dataset(tmp_path / "single", 8, 4))[:1],
             {"name": "retrieval", "type": "contrastive", "data_files": files}]  # fmt: skip
    data, model = build(tiny_bert, tasks)
    trainer = trainer_for(model, data, tmp_path / "out", per_device_eval_batch_size=3)
    output = trainer.predict(data.eval)
    embeddings, ids = output.predictions[1], output.label_ids[1]
    assert (ids[:4] == IGNORE_INDEX).all()  # the topic rows come first in the eval split
    embeddings, ids = embeddings[4:], ids[4:]
    # Equal ids exactly for equal texts, anchors and positives alike.
    texts = np.array([anchors, positives]).T
    for column in (0, 1):
        same_text = texts[:, None, column] == texts[None, :, column]
        assert ((ids[:, None, column] == ids[None, :, column]) == same_text).all()
    # The metric, computed here by hand from the same embeddings.
    unit = embeddings / np.linalg.norm(embeddings, axis=-1, keepdims=True)
    queries, passages = sorted(set(anchors)), sorted(set(positives))
    ranks = []
    for query in queries:
        vector = unit[anchors.index(query), 0]
        scores = {p: float(vector @ unit[positives.index(p), 1]) for p in passages}
        relevant = {p for a, p in zip(anchors, positives) if a == query}
        best = max(scores[p] for p in relevant)
        ranks.append(1 + sum(score >= best for p, score in scores.items() if p not in relevant))
    assert output.metrics["test_retrieval/mrr"] == pytest.approx(np.mean([1 / rank for rank in ranks]), abs=1e-6)
    assert output.metrics["test_retrieval/recall_at_1"] == pytest.approx(np.mean([r == 1 for r in ranks]))


# ------------------------------------------------------------------------------------------------ protection


def test_distillation_is_zero_at_the_start_and_one_minus_cosine_after(tiny_bert, tmp_path):
    data, model = build(tiny_bert, separate_sources(tmp_path, sizes=(8, 8, 8)) + pair_tasks(tmp_path / "pairs"))
    model.eval()
    trainer = trainer_for(
        model, data, tmp_path / "out", {"embedding_protection": "distillation", "protection_weight": 2.0}
    )
    protection = trainer.protection
    batch = trainer.data_collator([data.train[i] for i in range(4)])  # topic rows
    assert float(protection.loss(model, batch, model(**batch).embeddings).detach()) == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        model.backbone.encoder.layer[1].output.dense.weight.add_(
            0.05 * torch.randn_like(model.backbone.encoder.layer[1].output.dense.weight)
        )
    current = torch.nn.functional.normalize(model(**batch).embeddings, dim=-1)
    initial = torch.nn.functional.normalize(
        protection.teacher.embed(batch["input_ids"], batch["attention_mask"]), dim=-1
    )
    expected = 2.0 * (1 - (current * initial).sum(-1)).mean()
    assert float(expected.detach()) > 1e-4
    torch.testing.assert_close(protection.loss(model, batch, model(**batch).embeddings), expected)
    # Rows of a task that trains the embedding itself (similarity, pair classification) are left to it.
    pair_batch = trainer.data_collator([data.train[i] for i in range(24, 28)])
    assert protection.loss(model, pair_batch, model(**pair_batch).embeddings) is None


def test_the_distillation_teacher_sees_the_token_type_ids_the_model_sees(tiny_bert, tmp_path):
    """Rows whose texts carry segments (a pair encoded as one sequence) are distilled against the initial encoder's
    embedding of the same input, segments included: zero at the start, as for plain texts."""
    data, model = build(tiny_bert, separate_sources(tmp_path, sizes=(8, 8, 8)))
    model.eval()
    trainer = trainer_for(model, data, tmp_path / "out", {"embedding_protection": "distillation"})
    batch = trainer.data_collator([data.train[i] for i in range(4)])
    batch["token_type_ids"] = (torch.arange(batch["input_ids"].shape[1]) >= 3).long().expand_as(batch["input_ids"])
    embeddings = model(**batch).embeddings
    loss = trainer.protection.loss(model, batch, embeddings)
    assert float(loss.detach()) == pytest.approx(0.0, abs=1e-6)
    without_segments = trainer.protection.teacher.embed(batch["input_ids"], batch["attention_mask"], normalize=True)
    assert not torch.allclose(without_segments, torch.nn.functional.normalize(embeddings, dim=-1), atol=1e-3)


def test_l2sp_penalty_is_the_squared_distance_to_the_initial_encoder(tiny_bert, tmp_path):
    data, model = build(tiny_bert, separate_sources(tmp_path, sizes=(8, 8, 8)))
    trainer = trainer_for(model, data, tmp_path / "out", {"embedding_protection": "l2sp", "protection_weight": 0.5})
    batch = trainer.data_collator([data.train[0]])
    assert float(trainer.protection.loss(model, batch, None).detach()) == 0.0
    weight = model.backbone.encoder.layer[0].attention.self.query.weight
    with torch.no_grad():
        weight.add_(0.1)
    assert float(trainer.protection.loss(model, batch, None).detach()) == pytest.approx(
        0.5 * 0.5 * 0.01 * weight.numel(), rel=1e-4
    )


def drift_after_training(tiny_bert, tmp_path, protection):
    data, model = build(tiny_bert, separate_sources(tmp_path / "data", sizes=(24, 24, 24)))
    options = {"embedding_protection": protection, "protection_weight": 10.0}
    trainer = trainer_for(model, data, tmp_path / protection, options, max_steps=30, learning_rate=5e-3,
                          per_device_train_batch_size=8, save_strategy="no", warmup_steps=0)  # fmt: skip
    trainer.train()
    return trainer.evaluate()


def test_distillation_keeps_the_embedding_where_plain_training_moves_it(tiny_bert, tmp_path):
    plain = drift_after_training(tiny_bert, tmp_path, "none")
    protected = drift_after_training(tiny_bert, tmp_path, "distillation")
    assert protected["eval_embedding/cosine_to_initial"] > plain["eval_embedding/cosine_to_initial"] + 0.02
    assert protected["eval_embedding/cosine_to_initial"] > 0.95


def test_drift_is_measured_at_every_evaluation_and_warns(tiny_bert, tmp_path, caplog):
    data, model = build(tiny_bert, separate_sources(tmp_path, sizes=(8, 8, 8)))
    trainer = trainer_for(model, data, tmp_path / "out", {"drift_warning_cosine": 0.99})
    start = trainer.evaluate()
    assert start["eval_embedding/cosine_to_initial"] == pytest.approx(1.0, abs=1e-5)
    assert start["eval_embedding/knn_overlap@10"] == pytest.approx(1.0)
    with torch.no_grad():
        for parameter in model.backbone.parameters():
            parameter.add_(0.2 * torch.randn_like(parameter))
    with caplog.at_level(logging.WARNING):
        moved = trainer.evaluate()
    assert moved["eval_embedding/cosine_to_initial"] < 0.99
    assert moved["eval_embedding/knn_overlap@10"] < 1.0
    assert "the sentence embedding has drifted" in caplog.text


def isolation_tasks(tmp_path, with_similarity: bool) -> list[dict]:
    tasks = separate_sources(tmp_path / "data", sizes=(8, 8, 8))
    tasks[0]["head"] = {"layers": 1, "pooling": "attention"}  # topic: its own top layer and pooling
    tasks[2]["head"] = {"layers": 1}  # ner: its own top layer
    return tasks + pair_tasks(tmp_path / "pairs")[:1] if with_similarity else tasks


def test_auto_protection_isolates_heads_with_an_embedding_task_and_distils_without(tiny_bert, tmp_path):
    data, model = build(tiny_bert, isolation_tasks(tmp_path, with_similarity=True))
    protection = trainer_for(model, data, tmp_path / "out").protection
    assert (protection.method, protection.weight) == ("isolation", 0.9)
    assert protection.head_gradient_scale == pytest.approx(0.1)
    assert protection.teacher is None and any(p.requires_grad for p in model.backbone.parameters())
    data, model = build(tiny_bert, isolation_tasks(tmp_path / "heads", with_similarity=False))
    protection = trainer_for(model, data, tmp_path / "out2").protection
    assert (protection.method, protection.weight, protection.head_gradient_scale) == ("distillation", 3.0, 1.0)


def test_isolation_keeps_every_encoder_parameter_in_the_graph_for_ddp(tiny_bert, tmp_path):
    tasks = isolation_tasks(tmp_path, with_similarity=False)[:1] + pair_tasks(tmp_path / "pairs")[1:]
    data, model = build(tiny_bert, tasks)  # topic (own top layer) + paraphrase (a pair head: no zero loss via features)
    trainer = trainer_for(model, data, tmp_path / "out", {"embedding_protection": "isolation", "protection_weight": 1})
    _, grads = accumulated_gradients(trainer, model, [trainer.data_collator([data.train[i] for i in range(4)])])
    encoder = {name for name, p in model.named_parameters() if name.startswith("backbone.") and p.requires_grad}
    assert encoder and encoder <= set(grads)  # a gradient for every parameter (DDP needs it) ...
    assert all(grads[name].abs().sum() == 0 for name in encoder)  # ... and it is zero: nothing of the head's


def test_a_weight_out_of_range_names_the_protection_auto_chose(tiny_bert, tmp_path):
    data, model = build(tiny_bert, isolation_tasks(tmp_path, with_similarity=True))
    with pytest.raises(ValueError, match=r"protection_weight 10 is out of range for isolation .*chosen by 'auto'"):
        trainer_for(model, data, tmp_path / "out", {"protection_weight": 10})


def test_isolation_keeps_head_gradients_out_of_the_shared_encoder(tiny_bert, tmp_path):
    data, model = build(tiny_bert, isolation_tasks(tmp_path, with_similarity=True))
    model.eval()  # no dropout: passes with and without isolation compute the same function
    trainer = trainer_for(model, data, tmp_path / "out", {"embedding_protection": "isolation", "protection_weight": 1})
    assert trainer.protection.loss(model, trainer.data_collator([data.train[0]]), None) is None  # no loss term

    def gradients(rows, protection, weight=1.0):
        trainer.protection.method, trainer.protection.weight = protection, weight
        _, grads = accumulated_gradients(trainer, model, [trainer.data_collator([data.train[i] for i in rows])])
        return grads

    for rows in (range(0, 4), range(16, 20)):  # topic rows (own layer + pooling), ner rows (own layer)
        isolated = gradients(rows, "isolation")
        assert any(
            name.startswith("heads.") and name.endswith("branch.layers.0.output.dense.weight") for name in isolated
        )
        assert not any(name.startswith("backbone.") and grad.abs().sum() > 0 for name, grad in isolated.items())
        plain = gradients(rows, "none")  # the same rows without isolation reach the encoder
        assert plain["backbone.encoder.layer.0.output.dense.weight"].abs().sum() > 0
        for name, grad in isolated.items():  # and give the heads the same gradients
            if name.startswith("heads."):
                torch.testing.assert_close(grad, plain[name], msg=name)
        partial = gradients(rows, "isolation", 0.75)  # a quarter of the heads' gradient gets through
        for name, grad in plain.items():
            if name.startswith("backbone.") and grad.abs().sum() > 0:
                torch.testing.assert_close(partial[name], 0.25 * grad, msg=name)
    similarity = gradients(range(24, 28), "isolation")  # the embedding task trains the encoder
    assert similarity["backbone.encoder.layer.0.output.dense.weight"].abs().sum() > 0


def test_isolation_steps_move_the_encoder_only_for_embedding_tasks(tiny_bert, tmp_path):
    data, model = build(tiny_bert, isolation_tasks(tmp_path, with_similarity=True))
    options = {"task_sampling": "round_robin", "embedding_protection": "isolation", "protection_weight": 1.0,
               "head_learning_rate": 1e-2}  # fmt: skip
    trainer = trainer_for(model, data, tmp_path / "out", options, max_steps=4, per_device_train_batch_size=8,
                          learning_rate=1e-2, weight_decay=0.1, save_strategy="no")  # fmt: skip
    snapshots = [{name: p.detach().clone() for name, p in model.backbone.named_parameters()}]

    class Snapshot(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            snapshots.append({name: p.detach().clone() for name, p in model.backbone.named_parameters()})

    trainer.add_callback(Snapshot())
    trainer.train()  # round robin: topic, sentiment, ner, sts

    def moved(step):
        return any(not torch.equal(snapshots[step][n], p) for n, p in snapshots[step + 1].items())

    assert not moved(0) and not moved(1) and not moved(2)  # no momentum or weight decay moves it on head steps
    assert moved(3)


def test_isolation_without_an_embedding_task_freezes_the_encoder_and_keeps_encode_exact(tiny_bert, tmp_path):
    data, model = build(tiny_bert, isolation_tasks(tmp_path, with_similarity=False))
    texts = ["Maria visited Paris", "a short one", "John went home to Berlin today"]
    before = model.encode(texts)
    heads_before = {name: p.detach().clone() for name, p in model.heads.named_parameters()}
    options = {"embedding_protection": "isolation", "protection_weight": 1.0}
    trainer = trainer_for(model, data, tmp_path / "out", options, max_steps=6,
                          per_device_train_batch_size=8, learning_rate=1e-2, save_strategy="no")  # fmt: skip
    assert not any(p.requires_grad for p in model.backbone.parameters())
    trainer.train()
    np.testing.assert_array_equal(model.encode(texts), before)
    assert any(not torch.equal(heads_before[n], p) for n, p in model.heads.named_parameters())


def test_partial_isolation_without_an_embedding_task_warns_because_adam_undoes_it(tiny_bert, tmp_path, caplog):
    def encoder_after_training(options, folder):
        data, model = build(tiny_bert, isolation_tasks(tmp_path / folder, with_similarity=False))
        # The tiny random encoder's gradients are near Adam's default epsilon (1e-8), where epsilon damps the step;
        # a real encoder's gradients, and a tenth of them, are orders of magnitude above it (docs/TRAINING.md §4).
        # A tiny epsilon puts the tiny model where the real one is.
        trainer = trainer_for(model, data, tmp_path / folder / "out", options, max_steps=4, max_grad_norm=0,
                              adam_epsilon=1e-15, per_device_train_batch_size=8, learning_rate=1e-3,
                              save_strategy="no")  # fmt: skip
        trainer.train()
        return {name: p.detach().clone() for name, p in model.backbone.named_parameters()}

    _, start = build(tiny_bert, isolation_tasks(tmp_path / "start", with_similarity=False))
    with caplog.at_level(logging.WARNING):
        scaled = encoder_after_training({"embedding_protection": "isolation", "protection_weight": 0.9}, "scaled")
    assert "protects (almost) nothing" in caplog.text
    plain = encoder_after_training({"embedding_protection": "none"}, "plain")
    # The claim of the warning: a tenth of the gradient gives the same Adam steps as all of it.
    moved = max((plain[n] - p).abs().max().item() for n, p in start.backbone.named_parameters())
    assert moved > 1e-3  # four steps at 1e-3 really moved it ...
    for name, parameter in plain.items():  # ... and the scaled gradients moved it the same way
        if not name.endswith("attention.self.key.bias"):  # its true gradient is 0: Adam amplifies rounding noise
            torch.testing.assert_close(scaled[name], parameter, atol=1e-5, rtol=0, msg=name)


def test_the_partial_isolation_warning_stays_quiet_where_isolation_works(tiny_bert, tmp_path, caplog):
    cases = [(False, 1.0), (True, 0.9), (False, 0.0)]  # frozen encoder; beside an embedding task; no protection
    for index, (with_similarity, weight) in enumerate(cases):
        data, model = build(tiny_bert, isolation_tasks(tmp_path / str(index), with_similarity=with_similarity))
        with caplog.at_level(logging.WARNING):
            trainer_for(model, data, tmp_path / str(index) / "out",
                        {"embedding_protection": "isolation", "protection_weight": weight})  # fmt: skip
    assert "protects (almost) nothing" not in caplog.text


def test_the_protection_goes_by_the_tasks_that_train_not_every_task_of_the_model(tiny_bert, tmp_path, caplog):
    # A model with a similarity head, continued on its heads alone (`continue_training`): nothing trains the
    # embedding, so `auto` distils and explicit isolation below 1 warns.
    data, model = build(tiny_bert, isolation_tasks(tmp_path, with_similarity=True))
    heads = ["topic", "sentiment", "ner"]
    protection = trainer_for(model, data, tmp_path / "a", {"train_tasks": heads}).protection
    assert (protection.method, protection.weight, protection.embedding_tasks) == ("distillation", 3.0, [])
    with caplog.at_level(logging.WARNING):
        trainer_for(model, data, tmp_path / "b", {"train_tasks": heads, "embedding_protection": "isolation"})
    assert "protects (almost) nothing" in caplog.text
    protection = trainer_for(model, data, tmp_path / "c", {"train_tasks": [*heads, "sts"]}).protection
    assert (protection.method, protection.embedding_tasks) == ("isolation", ["sts"])
    with pytest.raises(ValueError, match=r"train_tasks \['topics'\] are not tasks of the model"):
        trainer_for(model, data, tmp_path / "d", {"train_tasks": ["topics"]})
    with pytest.raises(ValueError, match="train_tasks must be a list of task names"):
        trainer_for(model, data, tmp_path / "e", {"train_tasks": "sts"})


def test_rows_of_a_task_outside_train_tasks_stop_training_with_one_error(tiny_bert, tmp_path):
    data, model = build(tiny_bert, isolation_tasks(tmp_path, with_similarity=True))
    options = {"train_tasks": ["topic", "sentiment", "ner"], "task_sampling": "round_robin"}
    trainer = trainer_for(model, data, tmp_path / "out", options, max_steps=4, per_device_train_batch_size=4)
    with pytest.raises(ValueError, match=r"labelled rows for task\(s\) \['sts'\], which are not in train_tasks"):
        trainer.train()


def test_resuming_where_the_protection_froze_the_encoder_and_now_would_not_is_refused(tiny_bert, tmp_path):
    # Isolation at weight 1 freezes the shared encoder only when no embedding task trains: the same method and
    # weight with the similarity task now training would need optimizer state the checkpoint does not hold.
    from multitask_st.errors import TrainingError

    data, model = build(tiny_bert, isolation_tasks(tmp_path, with_similarity=True))
    heads, sizes = ["topic", "sentiment", "ner"], data.source_sizes
    args = TrainingArguments(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True, max_steps=2,
                             save_steps=2, per_device_train_batch_size=4)  # fmt: skip
    options = {"embedding_protection": "isolation", "protection_weight": 1.0}
    trainer = MultiTaskTrainer(model=model, args=args, train_dataset=data.train.select(range(sum(sizes[:3]))),
                               source_sizes=sizes[:3], train_tasks=heads, **options)  # fmt: skip
    trainer.train()
    checkpoint = tmp_path / "out" / "checkpoint-2"
    assert json.loads((checkpoint / "embedding_protection.json").read_text())["frozen_encoder"] is True
    data, model = build(tiny_bert, isolation_tasks(tmp_path, with_similarity=True))
    other = trainer_for(model, data, tmp_path / "out", options, max_steps=4, per_device_train_batch_size=4)
    with pytest.raises(TrainingError, match=r"the shared encoder was frozen \(by the protection\), is trained"):
        other.train(resume_from_checkpoint=str(checkpoint))


def test_a_checkpoint_records_its_protection_and_resuming_with_another_is_refused(tiny_bert, tmp_path):
    from multitask_st.errors import TrainingError

    data, model = build(tiny_bert, isolation_tasks(tmp_path, with_similarity=True))
    arguments = {"max_steps": 2, "save_steps": 2, "per_device_train_batch_size": 4}
    trainer_for(model, data, tmp_path / "out", **arguments).train()  # auto: isolation, weight 0.9
    checkpoint = tmp_path / "out" / "checkpoint-2"
    record = json.loads((checkpoint / "embedding_protection.json").read_text())
    assert record == {"method": "isolation", "weight": 0.9, "frozen_encoder": False}
    data, model = build(tiny_bert, isolation_tasks(tmp_path, with_similarity=True))
    other = trainer_for(model, data, tmp_path / "out", {"embedding_protection": "distillation"}, **arguments)
    with pytest.raises(TrainingError, match=r"embedding_protection was isolation \(weight 0.9\), is distillation"):
        other.train(resume_from_checkpoint=str(checkpoint))


# ------------------------------------------------------------------------------------------------ logging, weights


def test_per_task_and_protection_losses_are_logged(tiny_bert, tmp_path):
    data, model = build(tiny_bert, separate_sources(tmp_path, sizes=(8, 8, 8)) + pair_tasks(tmp_path / "pairs"))
    options = {"task_sampling": "round_robin", "embedding_protection": "distillation"}
    trainer = trainer_for(model, data, tmp_path / "out", options, max_steps=10, logging_steps=5,
                          per_device_train_batch_size=4, save_strategy="no")  # fmt: skip
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    # round robin over 4 sources, 5 steps per window: every task and the distillation term appear
    expected = {f"loss/{name}" for name in ("topic", "sentiment", "ner", "sts", "paraphrase", "embedding_distillation")}
    assert all(expected <= set(entry) for entry in logged)


def test_uncertainty_weighting_is_learned(tiny_bert, tmp_path):
    data, model = build(tiny_bert, separate_sources(tmp_path, sizes=(8, 8, 8)))
    trainer = trainer_for(model, data, tmp_path / "out", {"loss_weighting": "uncertainty"}, max_steps=6,
                          logging_steps=3, learning_rate=1e-2, save_strategy="no")  # fmt: skip
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry][-1]
    weights = [logged[f"task_weight/{name}"] for name in ("topic", "sentiment", "ner")]
    assert any(weight != 1.0 for weight in weights)


def clipped_step_sizes(tiny_bert, tmp_path, weights, accumulation=1) -> list[float]:
    """The size of each plain-SGD step over topic's batch, then sentiment's (two steps, or with `accumulation` 2 one
    step over both) when every gradient is clipped."""
    tasks = separate_sources(tmp_path / "data", sizes=(8, 8, 8))[:2]
    for task, weight in zip(tasks, weights):
        task["loss_weight"] = weight
    data, model = build(tiny_bert, tasks)
    trainer = trainer_for(model, data, tmp_path / f"out-{weights}-{accumulation}", {"task_sampling": "round_robin"},
                          max_steps=2 // accumulation, gradient_accumulation_steps=accumulation,
                          per_device_train_batch_size=8, optim="sgd", learning_rate=1.0, weight_decay=0.0,
                          lr_scheduler_type="constant", max_grad_norm=1e-4, save_strategy="no")  # fmt: skip
    snapshots = [torch.cat([p.detach().flatten().clone() for p in model.parameters()])]

    class Snapshot(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            snapshots.append(torch.cat([p.detach().flatten().clone() for p in model.parameters()]))

    trainer.add_callback(Snapshot())
    trainer.train()
    assert trainer.args.max_grad_norm == 1e-4  # the scaled threshold is the step's only
    return [float((after - before).norm()) for before, after in itertools.pairwise(snapshots)]


def test_clipping_keeps_static_loss_weights(tiny_bert, tmp_path):
    # One task per batch: a single clipping threshold would give a weight-4 task's clipped step the size of a
    # weight-1 task's. Scaled by the step's loss weight, the steps keep the weights' ratio (a step of exactly
    # lr x threshold is a clipped one: the unclipped gradients here are orders of magnitude larger).
    assert clipped_step_sizes(tiny_bert, tmp_path, (1.0, 1.0)) == pytest.approx([1e-4, 1e-4], rel=1e-3)
    assert clipped_step_sizes(tiny_bert, tmp_path, (4.0, 0.5)) == pytest.approx([4e-4, 0.5e-4], rel=1e-3)
    # One step over both tasks' batches is clipped at their mean weight; a weight-0 task, which adds nothing to the
    # step's gradient, does not halve the other's step.
    assert clipped_step_sizes(tiny_bert, tmp_path, (3.0, 1.0), accumulation=2) == pytest.approx([2e-4], rel=1e-3)
    assert clipped_step_sizes(tiny_bert, tmp_path, (3.0, 0.0), accumulation=2) == pytest.approx([3e-4], rel=1e-3)


# ------------------------------------------------------------------------------------------------ optimizer


def test_freezing_options_leave_frozen_parameters_out_of_the_optimizer(tiny_bert, tmp_path):
    data, model = build(tiny_bert, three_tasks(make_dataset(tmp_path / "data", 8, 4)))
    frozen = apply_freezing(model, freeze_layers=1, freeze_heads=["sentiment"])
    names = dict(model.named_parameters())
    assert any(".embeddings." in name for name in frozen)
    assert any(".layer.0." in name for name in frozen)
    assert not any(".layer.1." in name for name in frozen)
    assert all(not names[name].requires_grad for name in frozen)
    assert not names["heads.sentiment.out_proj.weight"].requires_grad
    assert names["heads.topic.out_proj.weight"].requires_grad

    trainer = trainer_for(model, data, tmp_path / "out", max_steps=1, per_device_train_batch_size=4, save_strategy="no")
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
    data, model = build(tiny_bert, three_tasks(make_dataset(tmp_path / "data", 8, 4)))
    options = {"head_learning_rate": 1e-2, "layerwise_lr_decay": 0.5}
    trainer = trainer_for(model, data, tmp_path / "out", options, learning_rate=1e-3)
    # The structured `labels` column and the nested token ids survive remove_unused_columns.
    kept = trainer._remove_unused_columns(data.train.add_column("unused", [0] * len(data.train)))
    assert set(kept.column_names) == {"labels", "input_ids"}
    trainer.create_optimizer()
    learning_rates = {id(p): group["lr"] for group in trainer.optimizer.param_groups for p in group["params"]}
    names = dict(model.named_parameters())

    def lr(name):
        return learning_rates[id(names[name])]

    # 2 layers: top layer lr*0.5, bottom lr*0.25, embeddings lr*0.125; heads use their own rate.
    assert lr("heads.topic.out_proj.weight") == pytest.approx(1e-2)
    assert lr("backbone.encoder.layer.1.attention.self.query.weight") == pytest.approx(5e-4)
    assert lr("backbone.encoder.layer.0.attention.self.query.weight") == pytest.approx(2.5e-4)
    assert lr("backbone.embeddings.word_embeddings.weight") == pytest.approx(1.25e-4)
    decay = {id(p): g["weight_decay"] for g in trainer.optimizer.param_groups for p in g["params"]}
    assert decay[id(names["backbone.encoder.layer.0.attention.self.query.bias"])] == 0.0


def test_a_heads_own_transformer_layers_learn_at_the_head_rate(tiny_bert, tmp_path):
    tasks = three_tasks(make_dataset(tmp_path / "data", 8, 4))
    tasks[2]["head"] = {"layers": 1}  # NER: its own copy of the top layer
    tasks[0]["head"] = {"type": "transformer", "pooling": "attention"}  # topic: an adapter layer of its own
    data, model = build(tiny_bert, tasks)
    trainer = trainer_for(model, data, tmp_path / "out", {"head_learning_rate": 1e-2}, learning_rate=1e-4)
    trainer.create_optimizer()
    rates = {id(p): group["lr"] for group in trainer.optimizer.param_groups for p in group["params"]}
    names = dict(model.named_parameters())
    assert rates[id(names["heads.ner.branch.layers.0.attention.self.query.weight"])] == pytest.approx(1e-2)
    assert rates[id(names["heads.topic.adapter.query.weight"])] == pytest.approx(1e-2)
    assert rates[id(names["backbone.encoder.layer.1.attention.self.query.weight"])] == pytest.approx(1e-4)
    assert rates[id(names["heads.ner.out_proj.weight"])] == pytest.approx(1e-2)
    assert rates[id(names["heads.topic.pooling.attention_scorer.weight"])] == pytest.approx(1e-2)


@pytest.mark.parametrize("head_learning_rate", [None, 1e-2])  # the Trainer's optimizer, and the grouped one
def test_a_heads_parameters_stay_put_on_steps_without_its_task(tiny_bert, tmp_path, head_learning_rate):
    data, model = build(tiny_bert, separate_sources(tmp_path, sizes=(8, 8, 8)))
    options = {"task_sampling": "round_robin", "embedding_protection": "none", "head_learning_rate": head_learning_rate}
    trainer = trainer_for(model, data, tmp_path / "out", options, max_steps=4, per_device_train_batch_size=8,
                          learning_rate=1e-2, weight_decay=0.1, save_strategy="no")  # fmt: skip
    snapshots = []

    class Snapshot(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            snapshots.append({name: p.detach().clone() for name, p in model.heads.named_parameters()})

    trainer.add_callback(Snapshot())
    trainer.train()  # round robin over one batch per source: topic, sentiment, ner, topic

    def moved(step, task):
        before = snapshots[step - 1]
        return any(not torch.equal(before[n], p) for n, p in snapshots[step].items() if n.startswith(f"{task}."))

    # The third step trains `ner` only: the classification heads (with a momentum and weight decay that would move
    # them) stay exactly where they are, the token head moves; the fourth trains `topic` only.
    assert moved(2, "ner")
    assert not moved(2, "topic") and not moved(2, "sentiment")
    assert moved(3, "topic") and not moved(3, "ner")
    # Skipped steps leave no optimizer step count behind: topic's head was updated twice in 4 steps.
    topic_weight = model.heads["topic"].out_proj.weight
    assert int(trainer.optimizer.state[topic_weight]["step"]) == 2


@pytest.mark.parametrize("steps", [2, 0.5])  # a number of steps, and a share of the run's 4
def test_freeze_encoder_steps_trains_the_heads_alone_first_then_everything(tiny_bert, tmp_path, steps):
    data, model = build(tiny_bert, separate_sources(tmp_path, sizes=(8, 8, 8)))
    options = {"task_sampling": "round_robin", "embedding_protection": "none", "freeze_encoder_steps": steps}
    trainer = trainer_for(model, data, tmp_path / "out", options, max_steps=4, per_device_train_batch_size=8,
                          learning_rate=1e-2, weight_decay=0.1, save_strategy="no")  # fmt: skip
    snapshots = [{name: p.detach().clone() for name, p in model.named_parameters()}]

    class Snapshot(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            snapshots.append({name: p.detach().clone() for name, p in model.named_parameters()})

    trainer.add_callback(Snapshot())
    trainer.train()  # round robin: topic, sentiment, ner, topic

    def moved(step, prefix):
        before, after = snapshots[step], snapshots[step + 1]
        return any(not torch.equal(before[n], after[n]) for n in after if n.startswith(prefix))

    assert trainer.encoder_frozen_steps() == 2
    # Two steps of heads only (weight decay 0.1 would move a skipped encoder), then the encoder trains too.
    assert moved(0, "heads.topic.") and moved(1, "heads.sentiment.")
    assert not moved(0, "backbone.") and not moved(1, "backbone.")
    assert moved(2, "backbone.") and moved(3, "backbone.")
    # Adam starts on the encoder at its first real step: two updates in four steps.
    encoder_weight = model.backbone.embeddings.word_embeddings.weight
    assert int(trainer.optimizer.state[encoder_weight]["step"]) == 2


@pytest.mark.parametrize(
    "option, message",
    [
        ({"drift_sample_size": -1}, "drift_sample_size must be an int >= 0"),
        ({"drift_sample_size": 2.5}, "drift_sample_size must be an int >= 0"),
        ({"drift_warning_cosine": 1.5}, r"drift_warning_cosine must be a finite number in \[-1, 1\], got 1.5"),
        ({"embedding_protection": "freeze"}, "embedding_protection 'freeze' is not one of"),
        (
            {"task_sampling": "temperature", "sampling_temperature": 0},
            r"sampling_temperature must be a finite number > 0",
        ),
        ({"loss_weighting": "gradnorm"}, "loss_weighting 'gradnorm' is not one of"),
        ({"head_learning_rate": -1e-3}, r"head_learning_rate must be a finite number > 0, got -0.001"),
        ({"layerwise_lr_decay": 1.5}, r"layerwise_lr_decay must be a finite number in \(0, 1\], got 1.5"),
        ({"protection_weight": -1.0}, r"protection_weight must be a finite number >= 0"),
    ],
)
def test_trainer_options_are_checked_when_the_arguments_are_made(tmp_path, option, message):
    """Each option is declared once, as a field of MultiTaskTrainingArguments, and checked when the arguments are
    made: before any model or data is loaded (train.py parses them first). The same check runs when an option is
    given to the trainer as a keyword argument."""
    from multitask_st.arguments import MultiTaskTrainingArguments
    from validation_mtl import UserError

    MultiTaskTrainingArguments(output_dir=str(tmp_path))  # the defaults pass
    with pytest.raises(UserError, match=message):
        MultiTaskTrainingArguments(output_dir=str(tmp_path), **option)


def test_trainer_options_given_as_keywords_land_in_args(tiny_bert, tmp_path):
    data, model = build(tiny_bert, separate_sources(tmp_path, sizes=(8, 8, 8)))
    trainer = trainer_for(model, data, tmp_path / "out", {"task_sampling": "uniform", "head_learning_rate": 0.01})
    assert trainer.args.task_sampling == "uniform" and trainer.args.head_learning_rate == 0.01
    assert trainer.args.output_dir == str(tmp_path / "out")  # the TrainingArguments fields carried over
    name = next(name for name, _ in model.named_parameters() if name.startswith("heads."))
    assert trainer.parameter_learning_rate(name, model) == 0.01


@pytest.mark.parametrize("steps", [-1, 2.5])
def test_freeze_encoder_steps_must_be_whole_steps_or_a_share(tiny_bert, tmp_path, steps):
    data, model = build(tiny_bert, separate_sources(tmp_path, sizes=(8, 8, 8)))
    with pytest.raises(ValueError, match=f"freeze_encoder_steps .*got {steps}"):
        trainer_for(model, data, tmp_path / "out", {"freeze_encoder_steps": steps})


# ------------------------------------------------------------------------------------------------ streaming


def test_a_stream_of_millions_of_rows_trains_with_the_sampling_strategy_and_never_materialises(tiny_bert, tmp_path):
    from datasets import Dataset, Features, IterableDataset, Value
    from train_helpers import make_rows

    produced = []

    def rows():  # 2 million rows, generated only when drawn
        topics = ("business", "science", "sport")
        for index in range(2_000_000):
            produced.append(index)
            yield {"text": f"Maria visited Paris with John number {index}", "topic": topics[index % 3]}

    stream = IterableDataset.from_generator(
        rows, features=Features({"text": Value("string"), "topic": Value("string")})
    )
    tasks = [
        {"name": "topic", "dataset": stream, "labels": ["business", "science", "sport"], "eval_split": None},
        {"name": "sentiment", "dataset": Dataset.from_list(make_rows(24)), "eval_split": None},
    ]
    data, model = build(tiny_bert, tasks)
    assert data.source_sizes == [None, 24] and data.num_train_examples["topic"] is None
    seen_sources = []
    trainer = trainer_for(model, data, tmp_path / "out", {"task_sampling": "uniform"}, max_steps=40,
                          per_device_train_batch_size=4, save_strategy="no", learning_rate=1e-3)  # fmt: skip
    collate = trainer.data_collator

    def spy(features):
        batch = collate(features)
        labelled = [name for name in ("topic", "sentiment") if (batch["labels"][name] != -100).any()]
        seen_sources.append(labelled)
        return batch

    trainer.data_collator = spy
    trainer.train()
    assert trainer.state.global_step == 40
    assert all(len(labelled) == 1 for labelled in seen_sources)  # every batch from one source
    share = sum(labelled == ["topic"] for labelled in seen_sources) / len(seen_sources)
    assert 0.25 < share < 0.75  # uniform sampling over the two sources, honoured for the stream
    assert len(produced) < 10_000  # drawn lazily: a shuffle buffer and a map batch, never the 2 million rows
    with pytest.raises(ValueError, match="weighs sources by size, and a streamed source has no known size"):
        trainer_for(model, data, tmp_path / "out2", {"task_sampling": "temperature"}, max_steps=2)


def test_the_filler_predictions_of_a_pair_task_are_made_on_the_batchs_device():
    # The Trainer concatenates the batches' predictions on the device before moving them to the CPU: a filler made
    # on the CPU stopped the evaluation of every GPU run that mixed pair and single-text tasks (found on an H100).
    from types import SimpleNamespace

    meta = torch.device("meta")
    outputs = SimpleNamespace(
        logits={"sst2": torch.zeros(4, 2, device=meta)}, embeddings=torch.zeros(4, 8, device=meta)
    )
    tasks = [
        {"name": "sts", "type": "similarity"},
        {"name": "mrpc", "type": "pair_classification", "labels": ["no", "yes"]},
        {"name": "sst2", "type": "classification", "labels": ["neg", "pos"]},
    ]
    shapes = {"sts": (4,), "mrpc": (4, 2), "sst2": (4, 2)}
    for task in tasks:
        predictions = make_task(task).eval_predictions(outputs, 4)
        assert predictions.device == meta, task["name"]
        assert tuple(predictions.shape) == shapes[task["name"]]


def test_the_protection_weight_a_record_states_is_finite():
    """`protection_setting` checked the weight with its own copy of the number rule, which let `inf` through (all
    protection, no task learning): it runs `check_number` now."""
    from multitask_st.protection import protection_setting
    from validation_mtl import InputError

    tasks = [{"name": "t", "labels": ["a", "b"]}]
    assert protection_setting("distillation", 0, tasks) == ("none", 0.0)
    assert protection_setting("distillation", 2, tasks) == ("distillation", 2.0)
    with pytest.raises(InputError, match="protection_weight must be a finite number >= 0, got inf"):
        protection_setting("distillation", float("inf"), tasks)


def test_metric_for_best_model_is_checked_when_the_trainer_is_made(tiny_bert, tmp_path):
    """A metric the evaluation never reports was found at the first evaluation, a KeyError after training had
    started; the names that are known before any evaluation (the combined score, losses, primary metrics, the tasks,
    the drift) are checked when the trainer is made."""
    from validation_mtl import InputError

    data, model = build(tiny_bert, separate_sources(tmp_path, sizes=(8, 8, 8)))
    made = {"eval_strategy": "steps", "load_best_model_at_end": True, "save_strategy": "steps"}
    for name in ["combined_score", "eval_combined_score", "loss", "eval_loss", "topic/macro_f1", "topic/accuracy",
                 "eval_ner/f1", "ner/loss", "embedding/cosine_to_initial"]:  # fmt: skip
        trainer_for(model, data, tmp_path / "out", metric_for_best_model=name, **made)
    for name in ["accuracy", "f1", "topic_accuracy", "eval_topics/accuracy", "combined-score"]:
        with pytest.raises(InputError, match=f"metric_for_best_model '{name}' is not a metric this run's evaluation"):
            trainer_for(model, data, tmp_path / "out", metric_for_best_model=name, **made)
    with pytest.raises(
        InputError, match=r"'embedding/cosine_to_initial' is not a metric .*\['combined_score', 'loss',"
    ):
        trainer_for(model, data, tmp_path / "out", {"drift_sample_size": 0}, **made,
                    metric_for_best_model="embedding/cosine_to_initial")  # fmt: skip
