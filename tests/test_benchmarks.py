"""The reusable pieces of the benchmark scripts (optimizer-state accounting, the sampling schedule, the random-init
backbone): tested so that the figures the docs quote come from code that does what it says."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from modeling_mtl import MultiTaskModel
from multitask_st.trainer import MultiTaskSampler

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from bench_training_choices import batches_per_source, make_random_init_backbone, optimizer_state_size  # noqa: E402


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


def test_protection_bench_refuses_a_cached_run_whose_heads_the_defaults_no_longer_give(tmp_path):
    """The recipe's sentence heads went from 1 to 2 own layers: a cached run with 1 must not pass for today's run
    behind the same flags; with `--extra --head_layers 1` it is that run again and passes the check."""
    import argparse
    import json

    import bench_embedding_protection as bench

    names, flags = bench.CONFIGS["heads-distillation"]
    model = tmp_path / "heads-distillation-seed0" / "model"
    model.mkdir(parents=True)
    heads = {"sst2": {"pooling": "attention", "layers": 1}, "trec": {"pooling": "attention", "layers": 1}}
    heads["wikiann"] = {"layers": 2}
    tasks = [{"name": name, "head": {"type": "linear", "dropout": 0.1, **heads[name]}} for name in names]
    (model / "config.json").write_text(json.dumps({"tasks": tasks}))
    args = argparse.Namespace(
        output_root=str(tmp_path), steps=600, steps_per_task=200, single_fraction=1.0, train_samples=4000, extra=[]
    )
    with pytest.raises(RuntimeError, match=r"heads were .*'layers': 1.*--head_layers 1"):
        bench.run_config(args, "heads-distillation", 0)
    assert bench.expected_heads(names, ["--head_layers", "1"]) == {
        name: bench.own_view(task["head"]) for name, task in zip(names, tasks)
    }
    # A cached result of that run, asked for with the flag that gives its heads, is reused (nothing trains).
    cached = {"settings": {"train_samples": 4000, "extra": ["--head_layers", "1"], "flags": flags}, "steps": 600}
    (model.parent / "bench_result.json").write_text(json.dumps({**cached, "validation": {}}))
    args.extra = ["--head_layers", "1"]
    assert bench.run_config(args, "heads-distillation", 0)["steps"] == 600


def test_transfer_bench_scores_runs_against_the_base_model(tiny_bert, tmp_path, monkeypatch, capsys):
    """A run whose model is the base model scores exactly the base model's AP and MRR (+0.00), and the scores are
    those of the definitions: AP of the cosines, and the contrastive task's retrieval metric."""
    import json

    import bench_embedding_transfer as bench
    from sklearn.metrics import average_precision_score

    base = MultiTaskModel.from_backbone(tiny_bert)
    base.save_pretrained(tmp_path / "runs" / "base-model")
    for seed in (0, 1):
        base.save_pretrained(tmp_path / "runs" / f"same-seed{seed}" / "model")
    words = ["cat", "dog", "sat", "ran", "paris", "london", "film", "music", "market", "fell", "rose", "rain"]
    rows = [
        {"sentence1": f"the {words[i]} {words[(i + 1) % 12]}", "sentence2": f"a {words[(i + 1) % 12]} {words[i]}",
         "label": i % 3 != 0}
        for i in range(12)
    ]  # fmt: skip
    (tmp_path / "data" / "mrpc").mkdir(parents=True)
    (tmp_path / "data" / "mrpc" / "test.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    argv = ["bench", "--runs", str(tmp_path / "runs"), "--configs", "same", "--data_dir", str(tmp_path / "data")]
    monkeypatch.setattr(sys, "argv", argv)
    bench.main()
    lines = capsys.readouterr().out.splitlines()
    base_row = next(line for line in lines if line.startswith("| base model"))
    run_row = next(line for line in lines if line.startswith("| same |"))
    assert run_row.count("+0.00") == 2 and "| 0, 1 |" in run_row
    a = base.encode([row["sentence1"] for row in rows], normalize=True)
    b = base.encode([row["sentence2"] for row in rows], normalize=True)
    ap = 100 * average_precision_score([row["label"] for row in rows], (a * b).sum(1))
    assert f"| {ap:.2f} |" in base_row
    expected = bench.scores(base, rows)
    assert f"| {expected['mrr']:.2f} |" in base_row and expected["ap"] == pytest.approx(ap)
    monkeypatch.setattr(sys, "argv", [*argv[:4], "missing", *argv[5:]])
    with pytest.raises(SystemExit, match="no runs of missing"):
        bench.main()
