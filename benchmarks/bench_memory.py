"""Peak RSS while encoding many sentences: MultiTaskModel vs sentence-transformers, each in its own subprocess.

    python benchmarks/bench_memory.py --data_dir ../shared/data [--num_sentences 100000] [--batch_size 32]

The corpus (SST-2 + STS-B sentences) is repeated to reach `--num_sentences`. Each contender runs in a fresh
Python process so one's allocations cannot inflate the other's peak; the baseline RSS after loading the model is
printed too, so the growth (which should track the float32 output array, num_sentences x 384 x 4 bytes) is visible.
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
from benchmarks.bench_encode import load_corpus
from pathlib import Path
from multitask_st import default_backbone
corpus = load_corpus(Path({data_dir!r}))
texts = (corpus * ({n} // len(corpus) + 1))[:{n}]
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", type=Path, default=Path(os.environ.get("MTL_SHARED_DATA", "../shared/data")))
    parser.add_argument("--num_sentences", type=int, default=100_000)
    parser.add_argument("--batch_size", type=int, default=32)
    args = parser.parse_args(argv)
    root = str(Path(__file__).resolve().parents[1])
    print("| contender | RSS after load (MiB) | peak RSS (MiB) | growth (MiB) | output array (MiB) | seconds |")
    print("|---|---|---|---|---|---|")
    for which in ("ours", "peer"):
        code = CHILD.format(
            root=root, data_dir=str(args.data_dir.resolve()), n=args.num_sentences, which=which, bs=args.batch_size
        )
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root)
        row = json.loads(done.stdout.strip().splitlines()[-1])
        print(
            f"| {which} | {row['base_mib']:.0f} | {row['peak_mib']:.0f} | {row['peak_mib'] - row['base_mib']:.0f} "
            f"| {row['output_mib']:.0f} | {row['seconds']:.1f} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
