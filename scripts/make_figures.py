"""Render the figures in docs/figures/: a sentence-similarity heatmap and (given a training run) training curves.

Usage:
    python scripts/make_figures.py                                # heatmap with the default MiniLM encoder
    python scripts/make_figures.py --model out/mtl --train-dir out/mtl   # heatmap of a trained model + curves
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SENTENCES = [
    "A man is playing a guitar.",
    "Someone is strumming an acoustic guitar.",
    "A woman is slicing onions in the kitchen.",
    "A chef chops vegetables for dinner.",
    "The stock market fell sharply on Monday.",
    "Shares dropped after the earnings report.",
    "What is the capital of France?",
    "Paris is the capital city of France.",
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a saved multi-task model (default: the pretrained all-MiniLM-L6-v2 encoder)")
    parser.add_argument("--train-dir", help="a training output folder holding trainer_state.json")
    parser.add_argument("--output-dir", default=str(ROOT / "docs" / "figures"))
    args = parser.parse_args(argv)

    from modeling_mtl import MultiTaskModel
    from multitask_st import default_backbone
    from multitask_st.plots import similarity_heatmap, training_curves

    output = Path(args.output_dir)
    if args.model:
        model, name = MultiTaskModel.from_pretrained(args.model), Path(args.model).name
    else:  # the embeddings come from the pretrained encoder; heads play no part in similarity
        model, name = MultiTaskModel.from_backbone(default_backbone()), "all-MiniLM-L6-v2"
    vectors = model.encode(SENTENCES, normalize=True)
    path = similarity_heatmap(
        vectors @ vectors.T, SENTENCES, output / "similarity_heatmap.png", title=f"Cosine similarity ({name})"
    )
    print(f"wrote {path}")
    if args.train_dir:
        path = training_curves(args.train_dir, output / "training_curve.png")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
