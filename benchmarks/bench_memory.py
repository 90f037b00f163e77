"""Peak RSS while encoding many sentences: MultiTaskModel vs sentence-transformers, each in its own subprocess.

    python benchmarks/bench_memory.py --data_dir ../shared/data [--sizes 25000 100000] [--batch_size 32]

The corpus is real, distinct sentences: SST-2 train, then WikiANN-en train (words joined), TREC train and STS-B
train, de-duplicated and shuffled with a fixed seed (about 130k in all). Each contender and size runs in a fresh
Python process so one's allocations cannot inflate the other's peak. RSS is read after loading the model and the
texts and one warm-up call, and again at the end (`ru_maxrss`, the process's peak): the growth should track the
float32 output array (num_sentences x 384 x 4 bytes), plus a constant for the largest batch's activations, and
not grow with the number of batches. Two sizes show which it is.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, {root!r})
from benchmarks.bench_memory import load_large_corpus
from pathlib import Path
from multitask_st import default_backbone
texts = load_large_corpus(Path({data_dir!r}), {n})
if {which!r} == "peer":
    from sentence_transformers import SentenceTransformer
    model = SentenceTransformer(str(default_backbone()), device="cpu")
else:
    from modeling_mtl import MultiTaskModel
    model = MultiTaskModel.from_backbone(default_backbone())
model.encode(texts[:64], batch_size={bs})
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
start = time.perf_counter()
out = model.encode(texts, batch_size={bs})
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({{"base_mib": base, "peak_mib": peak, "output_mib": out.nbytes / 2**20, "seconds": seconds}}))
"""


def load_large_corpus(data_dir: Path, count: int, seed: int = 0) -> list[str]:
    """`count` distinct real sentences from the shared data (raises if there are fewer)."""
    import random

    def rows(path: Path):
        with path.open(encoding="utf-8") as handle:
            for line in handle:
                yield json.loads(line)

    sentences = [row["sentence"] for row in rows(data_dir / "sst2" / "train.jsonl")]
    sentences += [" ".join(row["tokens"]) for row in rows(data_dir / "wikiann-en" / "train.jsonl")]
    sentences += [row["text"] for row in rows(data_dir / "trec" / "train.jsonl")]
    for row in rows(data_dir / "stsb" / "train.jsonl"):
        sentences += [row["sentence1"], row["sentence2"]]
    unique = list(dict.fromkeys(sentence.strip() for sentence in sentences if sentence.strip()))
    if len(unique) < count:
        raise ValueError(f"only {len(unique)} distinct sentences in {data_dir}, asked for {count}")
    random.Random(seed).shuffle(unique)
    return unique[:count]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", type=Path, default=Path(os.environ.get("MTL_SHARED_DATA", "../shared/data")))
    parser.add_argument("--sizes", type=int, nargs="+", default=[25_000, 100_000], help="sentences per run")
    parser.add_argument("--batch_size", type=int, default=32)
    args = parser.parse_args(argv)
    root = str(Path(__file__).resolve().parents[1])
    print("command: python benchmarks/bench_memory.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    print(
        "| sentences | contender | RSS after load (MiB) | peak RSS (MiB) | growth (MiB) | output array (MiB) |", end=""
    )
    print(" growth - output (MiB) | seconds |")
    print("|---|---|---|---|---|---|---|---|")
    for size, which in [(size, which) for size in args.sizes for which in ("ours", "peer")]:
        code = CHILD.format(root=root, data_dir=str(args.data_dir.resolve()), n=size, which=which, bs=args.batch_size)
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root)
        row = json.loads(done.stdout.strip().splitlines()[-1])
        growth = row["peak_mib"] - row["base_mib"]
        print(
            f"| {size} | {which} | {row['base_mib']:.0f} | {row['peak_mib']:.0f} | {growth:.0f} "
            f"| {row['output_mib']:.0f} | {growth - row['output_mib']:.0f} | {row['seconds']:.1f} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
