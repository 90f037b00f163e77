"""A run's files: the output folder (`multitask_st.saving`: refuse to clobber, atomic commit, strict JSON), the last
complete checkpoint and refusing to resume a different run (`multitask_st.checkpoints`), LoRA adapters
(`multitask_st.lora`), and continuing a saved model on new tasks (`multitask_st.continue_training`)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from train_helpers import make_dataset
from transformers import TrainerCallback

import train
from modeling_mtl import MultiTaskModel
from multitask_st.checkpoints import check_resumable, last_complete_checkpoint
from multitask_st.continue_training import continue_training
from multitask_st.errors import TrainingError
from multitask_st.saving import check_output_dir, commit_model_folder, strict_json, write_json

NER_TAGS = ["B-LOC", "B-ORG", "B-PER", "I-LOC", "I-ORG", "I-PER", "O"]


# ------------------------------------------------------------------------------------------------ output folder


def saved_model(tiny_bert, folder: Path, labels=("a", "b")) -> Path:
    MultiTaskModel.from_backbone(tiny_bert, tasks=[{"name": "t", "labels": list(labels)}]).save_pretrained(folder)
    return folder


def test_a_folder_holding_a_model_is_not_overwritten_unless_asked(tiny_bert, tmp_path):
    folder = saved_model(tiny_bert, tmp_path / "out")
    with pytest.raises(TrainingError, match=r"already holds a model .*--overwrite_output_dir true"):
        check_output_dir(folder, resuming=False, overwrite=False)
    check_output_dir(folder, resuming=False, overwrite=True)
    check_output_dir(folder, resuming=True, overwrite=False)
    check_output_dir(tmp_path / "fresh", resuming=False, overwrite=False)
    (tmp_path / "file").write_text("x")
    with pytest.raises(TrainingError, match="is a file"):
        check_output_dir(tmp_path / "file", resuming=False, overwrite=True)


def test_commit_replaces_a_model_with_config_last(tiny_bert, tmp_path, monkeypatch):
    output = saved_model(tiny_bert, tmp_path / "out", labels=("old1", "old2"))
    staging = saved_model(tiny_bert, output / ".staging", labels=("new1", "new2"))
    (staging / "metrics.json").write_text("{}")
    moves = []
    import os

    original = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (moves.append(Path(b).name), original(a, b))[1])
    commit_model_folder(staging, output)
    assert moves[-1] == "config.json" and "model.safetensors" in moves
    assert not staging.exists()
    assert MultiTaskModel.from_pretrained(output).config.get_task("t")["labels"] == ["new1", "new2"]


def test_a_commit_killed_midway_leaves_no_loadable_mixture(tiny_bert, tmp_path, monkeypatch):
    output = saved_model(tiny_bert, tmp_path / "out", labels=("old1", "old2"))
    staging = saved_model(tiny_bert, output / ".staging", labels=("new1", "new2"))
    import os

    original, calls = os.replace, []

    def dies_after_the_weights(source, target):
        calls.append(target)
        if len(calls) > 1:
            raise KeyboardInterrupt  # the process is killed during the commit
        return original(source, target)

    monkeypatch.setattr(os, "replace", dies_after_the_weights)
    with pytest.raises(KeyboardInterrupt):
        commit_model_folder(staging, output)
    monkeypatch.setattr(os, "replace", original)
    assert not (output / "config.json").exists()  # the new weights may be there, the old config is not
    with pytest.raises(OSError, match="holds no config.json"):
        MultiTaskModel.from_pretrained(output)


def test_save_pretrained_over_a_model_is_atomic(tiny_bert, tmp_path, monkeypatch):
    """Saved over an existing model, a kill while the new one is written leaves the old one whole, and a kill
    while it is moved in leaves no loadable model: never the new labels over the old weights."""
    import io_mtl

    output = saved_model(tiny_bert, tmp_path / "out", labels=("old1", "old2"))
    before = MultiTaskModel.from_pretrained(output).predict("hello")["t"]
    new = MultiTaskModel.from_backbone(tiny_bert, tasks=[{"name": "t", "labels": ["new1", "new2", "new3"]}])

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("modeling_mtl.write_sentence_transformers_files", killed)  # while writing
    with pytest.raises(KeyboardInterrupt):
        new.save_pretrained(output)
    monkeypatch.undo()
    assert MultiTaskModel.from_pretrained(output).predict("hello")["t"] == before  # the old model, whole
    import os

    original, calls = os.replace, []

    def dies_after_the_weights(source, target):
        calls.append(target)
        if str(target).endswith("config.json"):
            raise KeyboardInterrupt  # killed just before the new config goes in
        return original(source, target)

    monkeypatch.setattr(io_mtl.os, "replace", dies_after_the_weights)
    with pytest.raises(KeyboardInterrupt):
        new.save_pretrained(output)
    monkeypatch.undo()
    assert any(str(target).endswith("model.safetensors") for target in calls)  # the new weights were moved in
    with pytest.raises(OSError, match="holds no config.json"):
        MultiTaskModel.from_pretrained(output)
    new.save_pretrained(output)  # a clean save over the remains
    assert set(MultiTaskModel.from_pretrained(output).predict("hello")["t"]["scores"]) == {"new1", "new2", "new3"}
    assert not any(path.name.startswith(".staging") for path in output.iterdir())


def test_a_save_over_a_sharded_model_leaves_no_stale_shards(tiny_bert, tmp_path):
    output = saved_model(tiny_bert, tmp_path / "out")
    MultiTaskModel.from_pretrained(output).save_pretrained(output, max_shard_size="100KB")
    assert (output / "model.safetensors.index.json").is_file()
    new = MultiTaskModel.from_backbone(tiny_bert, tasks=[{"name": "t", "labels": ["x", "y"]}])
    new.save_pretrained(output)  # one file now: a stale index would load the old shards
    names = {path.name for path in output.iterdir()}
    assert "model.safetensors" in names and not any(name.startswith("model-") for name in names)
    assert "model.safetensors.index.json" not in names
    assert MultiTaskModel.from_pretrained(output).predict("hi")["t"]["label"] in ("x", "y")


def test_a_save_over_a_model_sentence_transformers_could_load_leaves_no_stale_modules(tiny_bert, tmp_path):
    """A model sentence-transformers cannot express (attention pooling) saved over one it could: the old
    `modules.json` stayed, and `SentenceTransformer(folder)` embedded with the old pipeline without a word."""
    output = tmp_path / "out"
    MultiTaskModel.from_backbone(tiny_bert, tasks=[{"name": "t", "labels": ["x", "y"]}]).save_pretrained(output)
    assert (output / "modules.json").is_file()
    MultiTaskModel.from_backbone(tiny_bert, pooling="attention").save_pretrained(output)
    names = {path.name for path in output.iterdir()}
    assert not names & {"modules.json", "sentence_bert_config.json", "config_sentence_transformers.json"}


def test_the_default_job_replaces_only_its_own_output(tiny_bert, tmp_path, capsys):
    """`python train.py --output_dir <a trained model>` (the embedded default job, which replaces its own earlier
    output) used to replace that model: only the default job's own folder is replaced without asking."""
    output = saved_model(tiny_bert, tmp_path / "trained")
    assert train.run(["--output_dir", str(output)]) == 2
    assert "already holds a model" in capsys.readouterr().err
    assert MultiTaskModel.from_pretrained(output).config.task_names == ["t"]
    _, _, run_args, _ = train.parse_arguments(["--output_dir", str(output), "--overwrite_output_dir", "true"])
    assert run_args.overwrite_output_dir
    _, _, run_args, _ = train.parse_arguments([])
    assert run_args.overwrite_output_dir  # its own folder: outputs/multitask-minilm-default


def test_metrics_json_is_strict_json(tmp_path):
    value = {"a": float("nan"), "b": [1.0, float("inf")], "c": {"d": 2.5}}
    assert strict_json(value) == {"a": None, "b": [1.0, None], "c": {"d": 2.5}}
    write_json(tmp_path / "m.json", value)
    assert json.loads((tmp_path / "m.json").read_text(), parse_constant=lambda name: pytest.fail(name))["c"] == {
        "d": 2.5
    }


# ------------------------------------------------------------------------------------------------ checkpoints


def fake_checkpoint(folder: Path, state: str | None = "{}") -> Path:
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    save_file({"w": torch.zeros(64)}, folder / "model.safetensors")
    torch.save({"state": {}}, folder / "optimizer.pt")
    if state is not None:
        (folder / "trainer_state.json").write_text(state)
    return folder


def test_the_last_complete_checkpoint_is_chosen(tmp_path, caplog):
    fake_checkpoint(tmp_path / "checkpoint-8")
    fake_checkpoint(tmp_path / "checkpoint-16", state='{"global_step": 1')  # killed while writing its state
    fake_checkpoint(tmp_path / "checkpoint-24", state=None)  # killed before its state
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-8")
    with pytest.raises(TrainingError, match="no complete checkpoint"):
        last_complete_checkpoint(tmp_path / "checkpoint-24")


@pytest.mark.parametrize(
    "broken, damage, problem",
    [
        ("model.safetensors", lambda data: data[:-50], "model.safetensors is truncated: its header lists"),
        ("optimizer.pt", lambda data: b"garbage", "optimizer.pt is truncated or not a PyTorch file"),
        ("optimizer.pt", lambda data: data[: len(data) // 2], "optimizer.pt is truncated or not a PyTorch file"),
    ],
)
def test_a_checkpoint_with_a_damaged_file_is_skipped_or_refused(tmp_path, caplog, broken, damage, problem):
    """A complete checkpoint can still hold a cut-short file (a full disk, a copy interrupted): resuming from it
    failed deep inside the Trainer with a traceback. Resuming from the last checkpoint now skips it, with a warning
    naming the file, for the one before; a checkpoint named explicitly is refused, naming the file."""
    from transformers.utils import logging as hf_logging

    fake_checkpoint(tmp_path / "checkpoint-8")
    latest = fake_checkpoint(tmp_path / "checkpoint-16")
    (latest / broken).write_bytes(damage((latest / broken).read_bytes()))
    hf_logging.enable_propagation()  # transformers' loggers, to caplog
    try:
        with caplog.at_level("WARNING"):
            assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-8")
    finally:
        hf_logging.disable_propagation()
    assert f"skipping {latest}: {latest / broken}" in caplog.text and problem in caplog.text
    with pytest.raises(TrainingError, match=f"cannot resume from {latest}: {latest / broken}"):
        check_resumable(latest, None, "static")
    shutil.rmtree(tmp_path / "checkpoint-8")
    with pytest.raises(TrainingError, match="no complete checkpoint"):  # nothing earlier to fall back to
        last_complete_checkpoint(tmp_path)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"labels": ["b", "a"]}, r"task 't': labels was \['a', 'b'\], is \['b', 'a'\]"),
        ({"name": "u"}, r"task 't' is in the checkpoint but not in this run; task 'u' is in this run"),
        ({"loss_weight": 2.0}, r"task 't': loss_weight was 1.0, is 2.0"),
    ],
)
def test_resuming_a_different_run_names_what_changed(tiny_bert, tmp_path, change, message):
    checkpoint = saved_model(tiny_bert, tmp_path / "checkpoint-4")
    model = MultiTaskModel.from_backbone(tiny_bert, tasks=[{"name": "t", "labels": ["a", "b"], **change}])
    with pytest.raises(TrainingError, match=message):
        check_resumable(checkpoint, model, "static")
    same = MultiTaskModel.from_backbone(tiny_bert, tasks=[{"name": "t", "labels": ["a", "b"]}])
    check_resumable(checkpoint, same, "static")
    with pytest.raises(TrainingError, match="loss_weighting was 'static', is 'uncertainty'"):
        check_resumable(checkpoint, same, "uncertainty")


# ------------------------------------------------------------------------------------------------ LoRA


def test_lora_trains_adapters_and_heads_and_saves_a_merged_model(tiny_bert, tmp_path):
    from train_helpers import three_tasks, train_flags

    from multitask_st.lora import load_lora_model

    files = make_dataset(tmp_path / "data", 24, 8)
    output = tmp_path / "out"
    flags = ["--max_steps", "4", "--lora_rank", "4", "--learning_rate", "5e-3", "--save_strategy", "no"]
    assert train.main(train_flags(tiny_bert, three_tasks(files), output) + flags) == 0
    merged = MultiTaskModel.from_pretrained(output)
    assert not any("lora" in name for name in merged.state_dict())  # a plain model: loads without peft
    base = MultiTaskModel.from_backbone(tiny_bert, tasks=merged.config.tasks)
    changed = [n for n, p in merged.backbone.state_dict().items() if not torch.equal(p, base.backbone.state_dict()[n])]
    assert changed and all(".embeddings." not in name for name in changed)  # adapters sit on linear layers only
    # as documented: the adapter names its base encoder (PEFT left it empty: "Repo id must use alphanumeric chars")
    assert json.loads((output / "lora_adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    adapter = load_lora_model(output / "lora_adapter").eval()
    texts = ["John Smith loved the match in Paris", "stocks fell"]
    torch.testing.assert_close(
        torch.from_numpy(adapter.get_base_model().encode(texts)),
        torch.from_numpy(merged.eval().encode(texts)),
        atol=1e-5,
        rtol=1e-4,
    )
    record = json.loads((output / "training_config.json").read_text())
    assert record["hyperparameters"]["lora_rank"] == 4


# ------------------------------------------------------------------------------------------------ continuing


class TrainableCount(TrainerCallback):
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        self.total = sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def phase1(tiny_bert, tmp_path_factory) -> dict:
    """A sentiment model trained by train.py, and task specs for sentiment + NER from two separate datasets."""
    root = tmp_path_factory.mktemp("phase1")
    common = {"eval_split": None, "test_split": "validation"}
    sentiment = {
        "name": "sentiment",
        "data_files": make_dataset(root / "sentiment", 24, 8, seed=0),
        "label_column": "sentiment",
        **common,
    }
    ner = {
        "name": "ner",
        "type": "token_classification",
        "data_files": make_dataset(root / "ner", 24, 8, seed=1),
        **common,
    }
    output = root / "model"
    argv = ["--model_name_or_path", str(tiny_bert), "--tasks", json.dumps([sentiment]), "--output_dir", str(output)]
    argv += ["--max_steps", "2", "--per_device_train_batch_size", "4", "--max_seq_length", "32", "--use_cpu", "true"]
    argv += ["--num_examples_to_print", "0", "--save_strategy", "no", "--seed", "0"]
    assert train.main(argv) == 0
    return {"dir": output, "tasks": [sentiment, ner]}


def training_arguments() -> dict:
    return {"max_steps": 3, "per_device_train_batch_size": 4, "learning_rate": 1e-2, "report_to": "none",
            "use_cpu": True, "save_strategy": "no", "seed": 0}  # fmt: skip


def weights(path: Path) -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in MultiTaskModel.from_pretrained(str(path)).state_dict().items()}


def test_continue_training_with_frozen_heads_and_encoder_trains_only_the_new_head(phase1, tmp_path):
    before, count = weights(phase1["dir"]), TrainableCount()
    result = continue_training(phase1["dir"], phase1["tasks"], ["ner"], tmp_path / "frozen", training_arguments(),
                               freeze_old_heads=True, freeze_backbone=True, max_seq_length=32,
                               callbacks=[count])  # fmt: skip
    assert result["before"]["sentiment"] == result["after"]["sentiment"]
    assert result["old_tasks"] == ["sentiment"] and result["new_tasks"] == ["ner"]
    assert count.trainable == 32 * len(NER_TAGS) + len(NER_TAGS)  # the NER head of the tiny BERT (hidden 32)
    after = weights(tmp_path / "frozen")
    assert set(after) - set(before) == {"heads.ner.out_proj.weight", "heads.ner.out_proj.bias"}
    assert all(torch.equal(value, after[key]) for key, value in before.items())
    assert "f1" in result["after"]["ner"] and (tmp_path / "frozen" / "continue_metrics.json").is_file()


def test_continue_training_rehearsal_trains_old_tasks_with_their_heads_fixed(phase1, tmp_path):
    before = weights(phase1["dir"])
    result = continue_training(phase1["dir"], phase1["tasks"], ["sentiment", "ner"], tmp_path / "rehearsal",
                               training_arguments(), freeze_old_heads=True, max_seq_length=32)  # fmt: skip
    assert result["train_source_sizes"] == [24, 24]  # both sources feed the sampler, not only the new task's
    after = weights(tmp_path / "rehearsal")
    for key in ("heads.sentiment.out_proj.weight", "heads.sentiment.out_proj.bias"):
        assert torch.equal(before[key], after[key]), key
    assert any(key.startswith("backbone.") and not torch.equal(before[key], after[key]) for key in before)


def test_continue_training_rejects_a_source_shared_with_an_old_task(phase1, tmp_path):
    shared = [dict(phase1["tasks"][0]), {**phase1["tasks"][1], "data_files": phase1["tasks"][0]["data_files"]}]
    with pytest.raises(ValueError, match="outside train_tasks"):
        continue_training(phase1["dir"], shared, ["ner"], tmp_path / "out", training_arguments(), max_seq_length=32)


def test_add_tasks_keeps_every_weight_and_adds_a_fresh_head(phase1, tmp_path):
    model = MultiTaskModel.from_pretrained(str(phase1["dir"])).eval()
    extended = model.add_tasks([{"name": "ner", "type": "token_classification", "labels": NER_TAGS}]).eval()
    assert extended.task_names == ["sentiment", "ner"]
    old = model.state_dict()
    assert all(
        torch.equal(value, old[key]) for key, value in extended.state_dict().items() if not key.startswith("heads.ner.")
    )
    with torch.no_grad():
        batch = model.tokenize(["John loved the match in Paris"], return_token_type_ids=False)
        # The weights are equal bit for bit (above); the outputs to rounding (kernels may order sums differently).
        torch.testing.assert_close(model(**batch).logits["sentiment"], extended(**batch).logits["sentiment"])
    with pytest.raises(ValueError, match="already exist"):
        model.add_tasks([{"name": "sentiment", "labels": ["a", "b"]}])
    extended.save_pretrained(tmp_path / "extended")
    reloaded = MultiTaskModel.from_pretrained(str(tmp_path / "extended")).eval()
    assert reloaded.config.task_id2label("ner") == dict(enumerate(NER_TAGS))
    assert not math.isnan(float(reloaded(**batch).logits["ner"].sum().detach()))
