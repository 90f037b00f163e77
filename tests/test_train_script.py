"""train.py: arguments (flags, config files, the embedded default job, the recipe defaults), a full run's output
folder contract, early stopping on the combined score, and one clear error (exit 2) for bad runs."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from train_helpers import make_dataset, pair_files, separate_sources, three_tasks, train_flags

import train
from modeling_mtl import MultiTaskModel
from multitask_st.data import parse_task_specs

ROOT = Path(__file__).resolve().parent.parent


def run(tiny_bert, tasks, output_dir, *flags) -> dict:
    assert train.main([*train_flags(tiny_bert, tasks, output_dir), *flags]) == 0
    return json.loads((Path(output_dir) / "trainer_state.json").read_text())


# ------------------------------------------------------------------------------------------------ arguments


def test_config_file_keeps_tasks_as_data_and_flags_override_it(tmp_path):
    config = {
        "tasks": [{"name": "sentiment", "dataset": "some/dataset", "labels": ["neg", "pos"]}],
        "learning_rate": 3e-4,
        "freeze_layers": 1,
        "output_dir": str(tmp_path / "a"),
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    _, data_args, mtl_args, training_args = train.parse_arguments([str(path), "--learning_rate", "1e-3"])
    assert training_args.learning_rate == 1e-3 and mtl_args.freeze_layers == 1
    assert data_args.tasks == config["tasks"]  # the list itself, never serialised to a flag and parsed back
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert train.parse_arguments([str(tmp_path / "config.json")])[3].learning_rate == 3e-4
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({**config, "learning_rat": 1}))
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['learning_rat'\]"):
        train.parse_arguments([str(tmp_path / "bad.yaml")])


def test_defaults_are_the_recipe_and_flags_alone_change_the_default_job(tmp_path):
    _, data_args, _, training_args = train.parse_arguments([])
    assert [spec.name for spec in parse_task_specs(data_args.tasks)] == ["topic", "sentiment", "ner"]
    assert training_args.metric_for_best_model == "combined_score"
    assert (training_args.learning_rate, training_args.head_learning_rate) == (1e-4, 2e-3)
    assert (training_args.warmup_steps, training_args.weight_decay) == (0.1, 0.01)
    assert training_args.embedding_protection == "auto"
    # Flags without --tasks apply to the embedded default job.
    _, data_args, _, training_args = train.parse_arguments(["--output_dir", str(tmp_path / "x"), "--seed", "3"])
    assert [spec.name for spec in parse_task_specs(data_args.tasks)] == ["topic", "sentiment", "ner"]
    assert (training_args.output_dir, training_args.seed) == (str(tmp_path / "x"), 3)
    # With --tasks, the recipe's defaults (not the plain Trainer's) apply.
    _, _, _, training_args = train.parse_arguments(["--tasks", "[]", "--output_dir", str(tmp_path / "y")])
    assert (training_args.learning_rate, training_args.per_device_train_batch_size) == (1e-4, 32)
    # Pinned memory only helps copies to an accelerator: off without one (torch warns otherwise), unless asked for.
    assert training_args.dataloader_pin_memory is torch.accelerator.is_available()
    _, _, _, training_args = train.parse_arguments(["--dataloader_pin_memory", "true", "--output_dir", "z"])
    assert training_args.dataloader_pin_memory is True


# ------------------------------------------------------------------------------------------------ full runs


def test_a_run_logs_every_task_and_writes_the_output_contract(tiny_bert, tmp_path):
    tasks = separate_sources(tmp_path / "data")
    files = pair_files(tmp_path / "pairs", train=16, evaluation=8)
    tasks.append(
        {"name": "sts", "type": "similarity", "data_files": files, "label_column": "score", "score_range": [0, 5]}
    )
    state = run(tiny_bert, tasks, tmp_path / "out", "--max_steps", "8", "--logging_steps", "4", "--eval_strategy",
                "steps", "--eval_steps", "4", "--save_strategy", "no", "--task_sampling", "round_robin",
                "--embedding_protection", "distillation")  # fmt: skip
    history = state["log_history"]
    train_logs = [entry for entry in history if "loss" in entry]
    for entry in train_logs:  # round robin over 4 sources, 4 steps per log window: every task in every window
        assert {"loss/topic", "loss/sentiment", "loss/ner", "loss/sts", "loss/embedding_distillation"} <= set(entry)
    eval_log = [entry for entry in history if "eval_loss" in entry][-1]
    for key in (
        "topic/loss",
        "ner/loss",
        "topic/accuracy",
        "ner/f1",
        "sts/spearman",
        "embedding/cosine_to_initial",
        "combined_score",
    ):
        assert f"eval_{key}" in eval_log, key

    output = tmp_path / "out"
    assert not (output / ".final-model-staging").exists()
    metrics = json.loads((output / "metrics.json").read_text())
    assert set(metrics["eval"]) == {"topic", "sentiment", "ner", "sts"}
    assert metrics["combined_score"] == pytest.approx(
        np.mean([metrics["eval"]["topic"]["macro_f1"], metrics["eval"]["sentiment"]["macro_f1"],
                 metrics["eval"]["ner"]["f1"], metrics["eval"]["sts"]["spearman"]])
    )  # fmt: skip
    assert set(metrics["embedding"]["eval"]) == {"cosine_to_initial", "knn_overlap@10"}
    record = json.loads((output / "training_config.json").read_text())
    assert record["tasks"]["ner"]["type"] == "token_classification"
    assert record["tasks"]["topic"]["num_train_examples"] == 40
    assert record["tasks"]["sts"]["input_columns"] == ["sentence1", "sentence2"]
    assert record["hyperparameters"]["task_sampling"] == "round_robin"
    assert record["hardware_details"]["precision"] == "fp32" and record["hardware_details"]["torch_threads"] >= 1
    assert record["train_runtime_s"] > 0
    model = MultiTaskModel.from_pretrained(output)
    assert model.config.get_task("topic")["labels"] == ["business", "science", "sport"]
    assert set(model.predict("John Smith loved the match in Paris")) == {"topic", "sentiment", "ner"}
    assert set(model.predict(("a", "b"))) == {"sts"}


def test_early_stopping_and_best_model_on_combined_score(tiny_bert, tmp_path):
    # A threshold no score can beat: no evaluation counts as an improvement, so training stops after the first
    # evaluation plus `patience` more.
    state = run(tiny_bert, three_tasks(make_dataset(tmp_path / "data", 32, 8)), tmp_path / "out",
                "--max_steps", "40", "--eval_strategy", "steps", "--eval_steps", "2", "--save_steps", "2",
                "--logging_steps", "2", "--load_best_model_at_end", "true", "--metric_for_best_model",
                "combined_score", "--early_stopping_patience", "2", "--early_stopping_threshold", "2.0",
                "--learning_rate", "5e-3")  # fmt: skip
    assert state["global_step"] == 6, "early stopping after 1 + 2 evaluations without improvement"
    evaluations = [entry for entry in state["log_history"] if "eval_combined_score" in entry]
    best = max(evaluations, key=lambda entry: entry["eval_combined_score"])
    assert state["best_global_step"] == best["step"]
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    # The final model is the best checkpoint (reloaded at the end): its eval score is the best one measured.
    assert metrics["combined_score"] == pytest.approx(best["eval_combined_score"], abs=1e-6)


def test_the_default_job_on_the_embedded_dataset(tiny_bert, tmp_path):
    """`python train.py` = DEFAULT_JOB; here with the tiny encoder and 2 steps, given as flags alone."""
    argv = ["--model_name_or_path", str(tiny_bert), "--output_dir", str(tmp_path / "out"), "--max_steps", "2",
            "--eval_strategy", "no", "--save_strategy", "no", "--load_best_model_at_end", "false",
            "--use_cpu", "true"]  # fmt: skip
    assert train.main(argv) == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert set(metrics["eval"]) == {"topic", "sentiment", "ner"}
    assert MultiTaskModel.from_pretrained(tmp_path / "out").config.get_task("ner")["type"] == "token_classification"


# ------------------------------------------------------------------------------------------------ bad runs


def script(*args, cwd) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args], capture_output=True, text=True, cwd=cwd, timeout=300
    )


def test_bad_runs_exit_2_with_one_line_naming_the_problem(tiny_bert, tmp_path):
    files = make_dataset(tmp_path / "data", 8, 4)
    rows = (tmp_path / "data" / "train.jsonl").read_text().splitlines()
    rows[3] = rows[3][:-5]  # a malformed JSON line
    (tmp_path / "bad.jsonl").write_text("\n".join(rows) + "\n")
    cases = [
        (["--tasks", str(tmp_path / "missing.yaml")], "--tasks file not found"),
        (["--tasks", json.dumps([{"name": "t", "data_files": {"train": str(tmp_path / "bad.jsonl")},
                                  "label_column": "topic"}])],
         "bad.jsonl line 4 is not valid JSON"),
        (["--tasks", json.dumps(three_tasks(files)), "--max_steps", "3", "--output_dir", str(tmp_path / "o"),
          "--learning_rate", "1e30", "--model_name_or_path", str(tiny_bert), "--max_seq_length", "16",
          "--save_strategy", "no", "--eval_strategy", "no"],
         "the training loss became"),
        # Checked before anything is loaded: the model folder (one without a model) is never reached.
        (["--tasks", json.dumps(three_tasks(files)), "--drift_sample_size", "-1", "--model_name_or_path",
          str(tmp_path / "data")],
         "drift_sample_size must be an int >= 0, got -1"),
    ]  # fmt: skip
    for args, message in cases:
        result = script(*args, cwd=tmp_path)
        assert result.returncode == 2, result.stderr[-2000:]
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith("error: ") and message in last, last
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "o" / "config.json").exists()  # nothing was saved as if it were a model


def damaged_checkpoint(folder: Path, broken: str) -> Path:
    """A checkpoint folder whose `broken` file is cut short (weights) or garbage (optimizer state)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    save_file({"w": torch.zeros(64)}, folder / "model.safetensors")
    torch.save({"state": {}}, folder / "optimizer.pt")
    (folder / "trainer_state.json").write_text("{}")
    path = folder / broken
    path.write_bytes(path.read_bytes()[:-50] if broken.endswith(".safetensors") else b"not a torch file")
    return folder


def write_bad_inputs(tmp: Path) -> None:
    """The files the cases of `BAD_INPUTS` name."""
    out = tmp / "out"
    (tmp / "a-file").write_text("")
    (tmp / "dup.yaml").write_text(f"output_dir: {out}\nlearning_rate: 1e-4\nlearning_rate: 3e-4\n")
    (tmp / "bad.yaml").write_text(f"output_dir: {out}\ntasks: [{{name: a}}\nseed: 3\n")
    (tmp / "dup.json").write_text(f'{{"output_dir": "{out}", "seed": 1,\n "seed": 2}}')
    (tmp / "tasks.yaml").write_text("- name: topic\n  dataset: some/data\n  dataset: other/data\n")
    for name in ("model.safetensors", "optimizer.pt"):
        damaged_checkpoint(tmp / name, name)


# (arguments, the error line), `{tmp}` standing for the test's folder. Each trained nothing and saved it as a finished
# run, kept the second of two keys, or failed with a traceback (after training started, at the final save, or deep in
# a library).
BAD_INPUTS = {
    "no epochs": (["--num_train_epochs", "0"], "num_train_epochs must be a finite number > 0 (or max_steps > 0), got "
                  "0.0: the run would train nothing"),
    "no steps and no epochs": (["--max_steps", "0", "--num_train_epochs", "0"], "num_train_epochs must be a finite"),
    "negative head learning rate": (["--head_learning_rate", "-1"],
                                    "head_learning_rate must be a finite number > 0, got -1.0"),
    "batch size 0": (["--per_device_train_batch_size", "0"],
                     "per_device_train_batch_size must be an int >= 1, got 0"),
    "accumulation 0": (["--gradient_accumulation_steps", "0"],
                       "gradient_accumulation_steps must be an int >= 1, got 0"),
    "missing model folder": (["--model_name_or_path", "{tmp}/no-model"],
                             "model_name_or_path {tmp}/no-model: no such folder, and not a Hub model id"),
    "output_dir under a file": (["--output_dir", "{tmp}/a-file/out"],
                                "output_dir {tmp}/a-file/out cannot be written: Not a directory"),
    "output_dir in /proc": (["--output_dir", "/proc/x"], "output_dir /proc/x cannot be written: "),
    "unknown report_to": (["--report_to", "wandbb"], "report_to 'wandbb' is not one of ['azure_ml', "),
    "report_to without its package": (["--report_to", "wandb"],
                                      "report_to 'wandb' needs the wandb package, which is not installed or not usable "
                                      "here: `pip install wandb`, or --report_to none"),
    "duplicate YAML key": (["{tmp}/dup.yaml"], "config file {tmp}/dup.yaml line 3: key 'learning_rate' is given twice"),
    "malformed YAML": (["{tmp}/bad.yaml"], "config file {tmp}/bad.yaml line 3: expected ',' or ']', but got '<scalar>' "
                       "(while parsing a flow sequence at line 2)"),
    "duplicate JSON key": (["{tmp}/dup.json"], "config file {tmp}/dup.json: key 'seed' is given twice"),
    "duplicate key in a --tasks file": (["--tasks", "{tmp}/tasks.yaml"],
                                        "--tasks file {tmp}/tasks.yaml line 3: key 'dataset' is given twice"),
    "duplicate key in --tasks JSON": (["--tasks", '[{"name": "topic", "dataset": "a/b", "name": "sentiment"}]'],
                                      "--tasks: key 'name' is given twice"),
    "truncated checkpoint weights": (["--resume_from_checkpoint", "{tmp}/model.safetensors"],
                                     "cannot resume from {tmp}/model.safetensors: {tmp}/model.safetensors/"
                                     "model.safetensors is truncated: its header lists"),
    "garbage optimizer state": (["--resume_from_checkpoint", "{tmp}/optimizer.pt"],
                                "cannot resume from {tmp}/optimizer.pt: {tmp}/optimizer.pt/optimizer.pt is truncated "
                                "or not a PyTorch file. Resume from an earlier checkpoint, or start a new run"),
}  # fmt: skip
SKIPPED = {  # case: (skip it, why)
    "output_dir in /proc": (not Path("/proc").is_dir(), "no /proc"),
    "report_to without its package": (importlib.util.find_spec("wandb") is not None, "wandb is installed"),
}


def bad_input(case: str):
    skip, why = SKIPPED.get(case, (False, ""))
    return pytest.param(case, marks=pytest.mark.skipif(skip, reason=why))


@pytest.mark.parametrize("case", [bad_input(case) for case in BAD_INPUTS])
def test_bad_input_is_one_line_before_anything_is_loaded(tmp_path, capsys, monkeypatch, case):
    """Each bad input is one line (exit 2) before any tokenizer, config or model is read."""
    write_bad_inputs(tmp_path)
    args, message = BAD_INPUTS[case]
    args, message = [arg.replace("{tmp}", str(tmp_path)) for arg in args], message.replace("{tmp}", str(tmp_path))

    def loaded(*args, **kwargs):
        pytest.fail("a model file was read before the bad input was refused")

    for name in ("AutoTokenizer", "AutoConfig"):
        monkeypatch.setattr(getattr(train, name), "from_pretrained", loaded)
    if args[0].startswith("-"):  # (a config file names its own output_dir)
        args = ["--output_dir", str(tmp_path / "out"), *args]
    assert train.run(args) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last, last
    assert not (tmp_path / "out" / "config.json").exists()


@pytest.mark.parametrize(
    "metric, message",
    [
        ("combined_scor", "metric_for_best_model 'combined_scor' is not a metric this run's evaluation reports: "
         "choose one of ['combined_score', 'loss', 'topic/loss', 'topic/macro_f1', 'sentiment/loss', "
         "'sentiment/macro_f1', 'ner/loss', 'ner/f1', 'embedding/cosine_to_initial'], or another metric a task "
         "reports, as '<task>/<metric>'"),
        ("eval_topics/accuracy", "metric_for_best_model 'eval_topics/accuracy' is not a metric"),
        # The task exists: its metrics other than its loss and primary metric are known at the first evaluation.
        ("topic/acuracy", "metric_for_best_model 'topic/acuracy' is not among the metrics the evaluation reported: "
         "['combined_score', 'embedding/cosine_to_initial', "),
    ],
)  # fmt: skip
def test_a_misspelt_metric_for_best_model_is_one_line(tiny_bert, tmp_path, capsys, metric, message):
    files = make_dataset(tmp_path / "data", 8, 4)
    argv = [*train_flags(tiny_bert, three_tasks(files), tmp_path / "out"), "--max_steps", "1", "--eval_strategy",
            "steps", "--eval_steps", "1", "--save_steps", "1", "--load_best_model_at_end", "true",
            "--metric_for_best_model", metric]  # fmt: skip
    assert train.run(argv) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last, last
    if "reports: choose" in message:  # refused before training: not a single step was taken
        assert not list((tmp_path / "out").glob("checkpoint-*"))


def test_the_yaml_example_of_the_training_docs_runs_as_written(tiny_bert, tmp_path):
    text = (ROOT / "docs" / "TRAINING.md").read_text()
    example = yaml.safe_load(text.split("```yaml\n", 1)[1].split("```", 1)[0])
    for task in example["tasks"]:  # paths are relative to the project folder, as the docs say
        task["data_files"] = {split: str(ROOT / path) for split, path in task["data_files"].items()}
    example["output_dir"] = str(tmp_path / "out")
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(example))
    argv = [str(path), "--model_name_or_path", str(tiny_bert), "--max_steps", "2", "--use_cpu", "true",
            "--num_examples_to_print", "0"]  # fmt: skip
    assert train.main(argv) == 0
    assert set(json.loads((tmp_path / "out" / "metrics.json").read_text())["eval"]) == {"topic", "ner"}


def test_a_bad_flag_value_is_one_line_not_the_usage_block(capsys):
    with pytest.raises(SystemExit) as exit_:
        train.parse_arguments(["--max_steps", "abc"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--max_steps" in err and "invalid int value: 'abc'" in err
    with pytest.raises(SystemExit) as exit_:  # a misspelt flag: one line, exit 2, as argparse's own errors
        train.parse_arguments(["--per_device_train_batch_sise", "4"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.strip().endswith(": error: unrecognized arguments: --per_device_train_batch_sise 4 (see --help)")
    assert len(err.strip().splitlines()) == 1


def test_user_errors_are_one_line_and_anything_else_keeps_its_traceback(tmp_path, capsys, monkeypatch):
    """`train.run` turned every ValueError into one line, so a bug inside transformers or datasets lost its
    traceback: only what the user can fix (`UserError`) is one line now, with `MTL_DEBUG` showing its traceback."""
    from validation_mtl import UserError

    bad = ["--output_dir", str(tmp_path / "o"), "--drift_sample_size", "-1"]
    assert train.run(bad) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == "error: drift_sample_size must be an int >= 0, got -1"
    monkeypatch.setenv("MTL_DEBUG", "1")
    with pytest.raises(UserError, match="drift_sample_size"):
        train.run(bad)
    monkeypatch.delenv("MTL_DEBUG")

    def bug(*args, **kwargs):
        raise ValueError("a bug deep inside a library")

    monkeypatch.setattr(train, "_load_data", bug)
    with pytest.raises(ValueError, match="a bug deep inside a library"):
        train.run(["--output_dir", str(tmp_path / "p")])


def test_the_record_names_the_batch_size_and_learning_rate_even_at_trainingarguments_defaults(tmp_path):
    from transformers import TrainingArguments

    from multitask_st.records import non_default_hyperparameters

    record = non_default_hyperparameters(
        TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, learning_rate=5e-5)
    )
    assert record["per_device_train_batch_size"] == 8 and record["learning_rate"] == 5e-5  # train.py's are 32, 1e-4
    assert "debug" not in record  # unset either way
