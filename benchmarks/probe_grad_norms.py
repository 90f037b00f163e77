"""The gradient norm of each task's batches before clipping: why `MultiTaskTrainer` scales the clipping threshold by
the step's loss weights (docs/TRAINING.md §3).

    python benchmarks/probe_grad_norms.py --data_dir ../shared/data [--configs heads+sts+mrpc] [--steps 60]

Trains a config of `bench_embedding_protection.py` for a few steps from the bundled all-MiniLM-L6-v2 (train.py in a
subprocess, 600 training rows per task, logging every step) and prints, per task, the range and median of the
pre-clipping gradient norms of its steps, against `max_grad_norm`: a task whose norms are all above it is clipped
on every step.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from bench_embedding_protection import CONFIGS, task_dicts  # noqa: E402

from multitask_st.trainer import clip_factor  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default=str(ROOT.parent.parent / "shared" / "data"))
    parser.add_argument("--configs", nargs="*", default=["heads+sts+mrpc"], choices=list(CONFIGS))
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max_grad_norm", type=float, default=1.0, help="the Trainer's default")
    args = parser.parse_args(argv)
    if not (Path(args.data_dir) / "sst2").is_dir():
        parser.error(f"no real data at {args.data_dir}")
    for config in args.configs:
        names, flags, *overrides = CONFIGS[config]
        tasks = task_dicts(Path(args.data_dir), names, 600, *overrides)
        for task in tasks:  # training only: a small eval split, no test split
            task.pop("test_split", None)
            task.pop("max_test_samples", None)
            task["max_eval_samples"] = 50
        with tempfile.TemporaryDirectory() as folder:
            job = {
                "tasks": tasks,
                "output_dir": f"{folder}/model",
                "max_steps": args.steps,
                "logging_steps": 1,
                "do_eval": False,
                "do_predict": False,
                "drift_sample_size": 0,
                "seed": args.seed,
                "max_grad_norm": args.max_grad_norm,
                "num_examples_to_print": 0,
            }
            Path(folder, "job.json").write_text(json.dumps(job))
            command = [sys.executable, str(ROOT.parent / "train.py"), f"{folder}/job.json", *flags]
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            state = json.loads(Path(folder, "model", "trainer_state.json").read_text())
        max_grad_norm = args.max_grad_norm
        norms = defaultdict(list)
        for entry in state["log_history"]:
            if "grad_norm" in entry:  # one step, one task: the task whose loss was logged
                trained = [key[5:] for key, value in entry.items() if key.startswith("loss/") and value != 0]
                norms[",".join(trained)].append(entry["grad_norm"])
        print(f"{config}: pre-clipping gradient norms over {args.steps} steps (max_grad_norm {max_grad_norm})")
        weights = {task["name"]: task.get("loss_weight", 1.0) for task in tasks}
        for task, values in norms.items():
            threshold = max_grad_norm * clip_factor(weights[name] for name in task.split(",") if name in weights)
            clipped = sum(value > threshold for value in values)
            print(
                f"  {task:16s} {len(values):3d} steps  min {min(values):7.2f}  median {np.median(values):7.2f}  "
                f"max {max(values):7.2f}  clipped at {threshold:g}: {clipped}/{len(values)}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
