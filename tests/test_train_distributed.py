"""Real multi-process and fault-tolerance runs: two DDP processes under `accelerate launch` (and through MPI), two
"nodes" of one process each through torchrun's c10d rendezvous, in-batch negatives gathered across processes, launches
that would silently train differently, and a run killed mid-way then resumed from its checkpoint. All start real
Python processes, so they take tens of seconds: marked `slow` (a separate CI step runs them)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from train_helpers import make_dataset, separate_sources, three_tasks, train_flags

import train
from modeling_mtl import MultiTaskModel

ROOT = Path(__file__).resolve().parent.parent


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]),
    )
    return env


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# Three tasks from three datasets: every batch holds one task, so two heads see no labels in each step.
# `ddp_find_unused_parameters false` makes DDP fail loudly if any parameter went without a gradient.
_DDP_FLAGS = [
    "--max_steps",
    "6",
    "--logging_steps",
    "3",
    "--eval_strategy",
    "steps",
    "--eval_steps",
    "3",
    "--save_steps",
    "3",
    "--ddp_find_unused_parameters",
    "false",
    "--task_sampling",
    "round_robin",
]


def _launch(launcher_flags: list[str], tiny_bert, tmp_path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """`accelerate launch <launcher_flags> train.py ...` for 6 steps on two processes; returns the finished run."""
    tasks = separate_sources(tmp_path / "data")
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        *launcher_flags,
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(_free_port()),
        str(ROOT / "train.py"),
        # no --use_cpu: train.py adds it when launched distributed on a machine without GPUs
        *[flag for flag in train_flags(tiny_bert, tasks, tmp_path / "out") if flag not in ("--use_cpu", "true")],
        *_DDP_FLAGS,
    ]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)


def _assert_one_run_on_two_processes(result: subprocess.CompletedProcess, output: Path) -> None:
    assert result.returncode == 0, result.stderr[-4000:]
    state = json.loads((output / "trainer_state.json").read_text())
    assert state["global_step"] == 6
    # 80 training examples, 6 steps of 4 per process: 0.6 epoch with two processes sharing the data, 0.3 alone
    assert state["epoch"] == pytest.approx(0.6)
    train_logs = [entry for entry in state["log_history"] if "loss" in entry]
    assert all({"loss/topic", "loss/sentiment", "loss/ner"} <= set(entry) for entry in train_logs)
    assert any("eval_ner/f1" in entry and "eval_loss" in entry for entry in state["log_history"])
    config = json.loads((output / "training_config.json").read_text())
    assert "2 process(es)" in config["hardware"]  # the world size of the process group both processes joined
    metrics = json.loads((output / "metrics.json").read_text())
    assert set(metrics["eval"]) == {"topic", "sentiment", "ner"}
    assert (output / "model.safetensors").is_file() and (output / "checkpoint-6").is_dir()
    assert result.stdout.count("Model saved to") == 1  # printed by the main process only


@pytest.mark.slow
def test_accelerate_launch_two_processes(tiny_bert, tmp_path):
    # `--multi_gpu` on a machine without GPUs starts two processes (torch elastic) joined by gloo.
    result = _launch(["--multi_gpu"], tiny_bert, tmp_path, _env())
    _assert_one_run_on_two_processes(result, tmp_path / "out")


def _open_mpi() -> bool:
    if shutil.which("mpirun") is None:
        return False
    version = subprocess.run(["mpirun", "--version"], capture_output=True, text=True, timeout=30)
    return "Open MPI" in version.stdout + version.stderr


@pytest.mark.slow
@pytest.mark.skipif(not _open_mpi(), reason="needs Open MPI's mpirun on PATH (Debian: apt-get install openmpi-bin)")
def test_accelerate_launch_cpu_flag_two_processes(tiny_bert, tmp_path):
    # accelerate 1.x: `--cpu --num_processes 2` alone starts ONE process; with `--mpirun_hostfile` it runs
    # `mpirun --hostfile H --npernode 2 -n 2 python train.py ...`, each process finds its rank in OMPI_COMM_WORLD_*
    # and they join one gloo process group (MASTER_ADDR/MASTER_PORT come from accelerate).
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")  # two slots even on a one-core machine
    env = _env()
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")  # CI containers run as root
    result = _launch(["--cpu", "--mpirun_hostfile", str(hostfile)], tiny_bert, tmp_path, env)
    _assert_one_run_on_two_processes(result, tmp_path / "out")


_SLOW_RUN = """
import pathlib, sys, time
from transformers import TrainerCallback
import train

class HoldAtStep10(TrainerCallback):  # between checkpoints 8 and 16: say so, then wait to be killed there
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 10:
            pathlib.Path(args.output_dir, "at-step-10").touch()
            time.sleep(600)

sys.exit(train.main(sys.argv[1:], callbacks=[HoldAtStep10()]))
"""


@pytest.mark.slow
def test_resume_after_kill_gives_the_same_model(tiny_bert, tmp_path):
    files = make_dataset(tmp_path / "data", 40, 8)
    flags = [
        "--max_steps",
        "24",
        "--save_steps",
        "8",
        "--logging_steps",
        "4",
        "--eval_strategy",
        "no",
        "--learning_rate",
        "1e-3",
        "--seed",
        "7",
        "--gradient_accumulation_steps",
        "2",
    ]
    reference = tmp_path / "reference"
    assert train.main(train_flags(tiny_bert, three_tasks(files), reference) + flags) == 0

    interrupted = tmp_path / "interrupted"
    process = subprocess.Popen(
        [sys.executable, "-c", _SLOW_RUN, *train_flags(tiny_bert, three_tasks(files), interrupted), *flags],
        # The reference and the resumed steps run here: the same thread count for the first steps, so that the
        # comparison sees resumption, not the rounding of another thread count.
        env={**_env(), "OMP_NUM_THREADS": str(torch.get_num_threads())},
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    checkpoint = interrupted / "checkpoint-8"
    deadline = time.time() + 120
    while not (interrupted / "at-step-10").exists():  # killed at a known step, whatever the machine's speed
        assert process.poll() is None, process.stderr.read().decode()[-3000:]
        assert time.time() < deadline, "step 10 not reached in time"
        time.sleep(0.05)
    assert (checkpoint / "trainer_state.json").is_file()
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    process.stderr.close()
    assert process.returncode == -signal.SIGKILL
    assert not (interrupted / "checkpoint-16").exists() and not (interrupted / "metrics.json").exists()

    assert (
        train.main(
            train_flags(tiny_bert, three_tasks(files), interrupted)
            + flags
            + ["--resume_from_checkpoint", str(checkpoint)]
        )
        == 0
    )
    expected = load_file(reference / "model.safetensors")
    resumed = load_file(interrupted / "model.safetensors")
    assert expected.keys() == resumed.keys()
    # An attention key bias adds the same q.b to every score of a query's row, which softmax cancels: its true
    # gradient is zero and what it receives is rounding noise, which Adam scales to full-size steps of random sign.
    # So those weights may differ between two runs while the function does not; that is checked on the outputs.
    inert = [name for name in expected if name.endswith("attention.self.key.bias")]
    assert inert
    for name, tensor in expected.items():
        if name not in inert:
            torch.testing.assert_close(resumed[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    sentences = ["John Smith lives in Paris .", "a wonderful day", "the market fell again"]
    reference_model, resumed_model = (MultiTaskModel.from_pretrained(path) for path in (reference, interrupted))
    np.testing.assert_allclose(resumed_model.encode(sentences), reference_model.encode(sentences), atol=1e-5)
    assert _rounded(resumed_model.predict(sentences)) == _rounded(reference_model.predict(sentences))
    state = json.loads((interrupted / "trainer_state.json").read_text())
    assert state["global_step"] == 24


def _rounded(value):
    """Predictions with every score rounded to 4 decimals, to compare two models' outputs."""
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, dict):
        return {key: _rounded(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_rounded(item) for item in value]
    return value


# ------------------------------------------------------------------------------------------------ multi-node


def _torchrun(tiny_bert, tasks, output, extra: list[str], env) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *extra, str(ROOT / "train.py"),
            *[flag for flag in train_flags(tiny_bert, tasks, output) if flag not in ("--use_cpu", "true")],
            *_DDP_FLAGS, "--save_strategy", "no", "--eval_strategy", "no", "--seed", "3"]  # fmt: skip


@pytest.mark.slow
def test_two_nodes_of_one_process_train_like_two_processes_on_one_node(tiny_bert, tmp_path):
    tasks = separate_sources(tmp_path / "data")
    env = _env()
    one_node = subprocess.run(
        _torchrun(tiny_bert, tasks, tmp_path / "one_node",
                  ["--nproc_per_node", "2", "--master_port", str(_free_port())], env),
        env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert one_node.returncode == 0, one_node.stderr[-3000:]
    # Two torchrun launchers (two "machines" on 127.0.0.1) meet through the c10d rendezvous.
    endpoint = f"127.0.0.1:{_free_port()}"
    nodes = [
        subprocess.Popen(
            _torchrun(
                tiny_bert,
                tasks,
                tmp_path / "two_nodes",
                [
                    "--nnodes",
                    "2",
                    "--nproc_per_node",
                    "1",
                    "--rdzv_backend",
                    "c10d",
                    "--rdzv_endpoint",
                    endpoint,
                    "--rdzv_id",
                    "mtl-test",
                ],
                env,
            ),
            env=env,
            cwd=tmp_path / f"node{rank}",
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for rank in range(2)
        if (tmp_path / f"node{rank}").mkdir() is None
    ]
    for node in nodes:
        _, stderr = node.communicate(timeout=300)
        assert node.returncode == 0, stderr[-3000:]
    expected = load_file(tmp_path / "one_node" / "model.safetensors")
    got = load_file(tmp_path / "two_nodes" / "model.safetensors")
    assert expected.keys() == got.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    config = json.loads((tmp_path / "two_nodes" / "training_config.json").read_text())
    assert "2 process(es)" in config["hardware"]


@pytest.mark.slow
def test_launches_that_would_train_differently_are_refused(tiny_bert, tmp_path):
    tasks = separate_sources(tmp_path / "data")
    common = [str(ROOT / "train.py"), *train_flags(tiny_bert, tasks, tmp_path / "out"), "--max_steps", "1"]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no",
              "--dynamo_backend", "no"]  # fmt: skip
    alone = subprocess.run([*launch, "--cpu", "--num_processes", "2", *common], env=_env(), capture_output=True,
                           text=True, timeout=300, cwd=tmp_path)  # fmt: skip
    assert alone.returncode != 0 and "started ONE process" in alone.stderr
    config = tmp_path / "fsdp.yaml"
    config.write_text("distributed_type: FSDP\nfsdp_config:\n  fsdp_version: 2\nnum_machines: 1\nnum_processes: 2\n"
                      "use_cpu: true\nmixed_precision: 'no'\n")  # fmt: skip
    fsdp = subprocess.run([*launch[:3], "--config_file", str(config), *common], env=_env(), capture_output=True,
                          text=True, timeout=300, cwd=tmp_path)  # fmt: skip
    assert fsdp.returncode != 0 and "accelerate only shards on GPUs" in fsdp.stderr
    assert not (tmp_path / "out" / "config.json").exists()


# ------------------------------------------------------------------------------------------------ gathered negatives


def _contrastive_gradients(rank: int, world: int, tiny_bert: str, port: int, gather: bool, results: dict) -> None:
    """One process of a 2-process group: its half of a contrastive batch, negatives gathered from both; the
    gradients averaged over processes as DDP does."""
    import torch.distributed as dist

    from modeling_mtl import MultiTaskModel

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)
    task = {"name": "retrieval", "type": "contrastive", "gather_across_processes": gather}
    model = MultiTaskModel.from_backbone(tiny_bert, tasks=[task]).eval()
    batch = _contrastive_batch(model)
    half = slice(rank * 4, rank * 4 + 4)
    output = model(input_ids=batch["input_ids"][half], attention_mask=batch["attention_mask"][half],
                   labels={"retrieval": torch.zeros(4, dtype=torch.long)})  # fmt: skip
    output.loss.backward()
    gradients = {}
    for name, parameter in model.named_parameters():
        if parameter.grad is not None:
            dist.all_reduce(parameter.grad)
            gradients[name] = parameter.grad / world
    losses = [torch.zeros(1) for _ in range(world)]
    dist.all_gather(losses, output.loss.detach().reshape(1))
    if rank == 0:
        results["gradients"] = gradients
        results["loss"] = float(sum(losses) / world)
    dist.destroy_process_group()


def _contrastive_batch(model):
    anchors = [f"anchor sentence number {index} about paris" for index in range(8)]
    # One query with a positive on each process: each process must know the other's row is the same anchor's, or
    # it would push that positive away where one process holding both rows masks it.
    anchors[5] = anchors[1]
    positives = [f"positive text {index} mentions john" for index in range(8)]
    flat = model.tokenize(anchors + positives, return_token_type_ids=False)
    reshape = lambda t: t.view(2, 8, -1).transpose(0, 1)  # noqa: E731
    return {"input_ids": reshape(flat["input_ids"]), "attention_mask": reshape(flat["attention_mask"])}


def _spawned(tiny_bert: str, gather: bool) -> dict:
    import torch.multiprocessing as mp

    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_contrastive_gradients, args=(2, tiny_bert, _free_port(), gather, results), nprocs=2, join=True)
        return dict(results)


@pytest.mark.slow
def test_gathered_negatives_give_every_process_the_whole_batch(tiny_bert):
    from modeling_mtl import MultiTaskModel

    torch.manual_seed(0)
    task = {"name": "retrieval", "type": "contrastive", "gather_across_processes": True}
    model = MultiTaskModel.from_backbone(tiny_bert, tasks=[task]).eval()
    output = model(**_contrastive_batch(model), labels={"retrieval": torch.zeros(8, dtype=torch.long)})
    output.loss.backward()
    gathered = _spawned(str(tiny_bert), gather=True)
    # 2 processes x 4 rows, every negative gathered = one process with the 8 rows: same loss, same gradients.
    assert gathered["loss"] == pytest.approx(float(output.loss.detach()), rel=1e-5)
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(gathered["gradients"][name], parameter.grad, rtol=1e-4, atol=1e-6, msg=name)
    local = _spawned(str(tiny_bert), gather=False)  # each process sees only its own 4 negatives
    assert local["loss"] < gathered["loss"] - 1e-3


def _mixed_step(rank: int, tiny_bert: str, port: int, results: dict) -> None:
    """One training step of a 2-process group in which only process 1's batch holds the gathering contrastive
    task's rows (process 0 got a batch of the single-text task): both must get through the gathers, the backward
    and the gradients' all-reduce."""
    import datetime

    import torch.distributed as dist

    from modeling_mtl import MultiTaskModel

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60)
    )
    torch.manual_seed(0)
    model = MultiTaskModel.from_backbone(tiny_bert, tasks=MIXED_TASKS).eval()
    batch, labels = _mixed_batch(model, rank)
    output = model(**batch, labels=labels)
    output.loss.backward()
    for parameter in model.parameters():
        if parameter.grad is not None:
            dist.all_reduce(parameter.grad)  # what DDP does next
    results[rank] = float(output.loss)
    dist.destroy_process_group()


MIXED_TASKS = [
    {"name": "topic", "labels": ["a", "b"]},
    {"name": "retrieval", "type": "contrastive", "gather_across_processes": True},
]


def _mixed_batch(model, rank: int) -> tuple[dict, dict]:
    from modeling_mtl import IGNORE_INDEX

    if rank == 0:  # a batch of the single-text source
        batch = model.tokenize([f"sentence {index} about paris" for index in range(4)], return_token_type_ids=False)
        labels = {"topic": torch.tensor([0, 1, 0, 1]), "retrieval": torch.full((4,), IGNORE_INDEX)}
        return dict(batch), labels
    full = _contrastive_batch(model)
    batch = {key: value[:4] for key, value in full.items()}
    return batch, {"topic": torch.full((4,), IGNORE_INDEX), "retrieval": torch.zeros(4, dtype=torch.long)}


@pytest.mark.slow
def test_a_step_where_only_some_processes_hold_the_gathered_task_completes(tiny_bert):
    import torch.multiprocessing as mp

    from modeling_mtl import MultiTaskModel

    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_mixed_step, args=(str(tiny_bert), _free_port(), results), nprocs=2, join=True)
        results = dict(results)
    torch.manual_seed(0)
    model = MultiTaskModel.from_backbone(tiny_bert, tasks=MIXED_TASKS).eval()
    for rank in (0, 1):  # process 0 gathered no candidates: process 1 ranks against its own, as alone
        batch, labels = _mixed_batch(model, rank)
        assert results[rank] == pytest.approx(float(model(**batch, labels=labels).loss.detach()), rel=1e-5)


_EVAL_SCRIPT = """
import json, os, sys
from transformers import AutoTokenizer, TrainingArguments
from modeling_mtl import MultiTaskModel
from multitask_st.data import build_datasets, parse_task_specs
from multitask_st.trainer import MultiTaskTrainer
import torch

bert, tasks, output = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
tokenizer = AutoTokenizer.from_pretrained(bert)
data = build_datasets(parse_task_specs(tasks), tokenizer, 32)
torch.manual_seed(0)
model = MultiTaskModel.from_backbone(bert, tasks=data.model_tasks, tokenizer=tokenizer, max_seq_length=32)
args = TrainingArguments(output_dir=output, report_to="none", use_cpu=True, per_device_eval_batch_size=5)
trainer = MultiTaskTrainer(model=model, args=args, train_dataset=data.train, eval_dataset=data.eval,
                           source_sizes=data.source_sizes, drift_sample_size=0)
metrics = trainer.evaluate()
if args.process_index == 0:
    print("METRICS " + json.dumps(metrics))
"""


@pytest.mark.slow
def test_eval_losses_do_not_count_the_rows_that_pad_the_last_batch_of_each_process(tiny_bert, tmp_path):
    """14 eval rows, 5 per process and batch: the last step's 10 slots hold 4 rows and 6 repeats. Per-task losses
    and metrics must be those of one process (per-row losses do not depend on the batch for these tasks)."""
    files = make_dataset(tmp_path / "data", 8, 14)
    script = tmp_path / "eval_run.py"
    script.write_text(_EVAL_SCRIPT)
    args = [str(script), str(tiny_bert), json.dumps(three_tasks(files))]
    runs = {}
    for processes in (1, 2):
        launcher = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port())]
        command = [sys.executable, *(launcher if processes == 2 else []), *args, str(tmp_path / f"out{processes}")]
        result = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-4000:]
        line = next(line for line in result.stdout.splitlines() if line.startswith("METRICS "))
        runs[processes] = json.loads(line[len("METRICS ") :])
    for key in ("eval_topic/loss", "eval_sentiment/loss", "eval_ner/loss", "eval_topic/accuracy", "eval_ner/f1"):
        assert runs[2][key] == pytest.approx(runs[1][key], rel=1e-5, abs=1e-7), key
