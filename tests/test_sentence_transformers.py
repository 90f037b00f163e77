"""Correctness against the peer: sentence-transformers on the same all-MiniLM-L6-v2 files."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from modeling_mtl import MultiTaskModel

ROOT = Path(__file__).resolve().parent.parent
SENTENCES = [
    "A man is playing a guitar.",
    "",
    "What is the capital of France?",
    "The new movie is awesome and I loved every minute of it!",
    "Ünïcödé wörds, émojis 🙂 and numbers 12,345.67 mixed together",
    " ".join(["very long text"] * 200),  # beyond the 256-token limit: truncated by both
    "short",
]


@pytest.fixture(scope="module")
def peers(minilm_dir):
    from sentence_transformers import SentenceTransformer

    return MultiTaskModel.from_backbone(minilm_dir), SentenceTransformer(str(minilm_dir), device="cpu")


@pytest.mark.parametrize("batch_size", [1, 3, 32])
def test_encode_matches_sentence_transformers(peers, batch_size):
    ours, theirs = peers
    expected = theirs.encode(SENTENCES, batch_size=batch_size)
    got = ours.encode(SENTENCES, batch_size=batch_size)
    assert got.shape == expected.shape == (len(SENTENCES), 384)
    assert np.abs(got - expected).max() <= 1e-5


def test_encode_matches_on_real_sentences(peers, shared_data):
    ours, theirs = peers
    rows = [json.loads(line) for line in (shared_data / "stsb" / "validation.jsonl").open()][:300]
    sentences = [row["sentence1"] for row in rows] + [row["sentence2"] for row in rows]
    assert np.abs(ours.encode(sentences, batch_size=64) - theirs.encode(sentences, batch_size=64)).max() <= 1e-5


def test_quickstart_example_runs():
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "embeddings: shape (5, 384), dtype float32" in result.stdout
    # The two guitar sentences are each other's nearest neighbour.
    assert "most similar to 'A man is playing a guitar on stage.': 'Someone performs music with a guitar.'" in (
        result.stdout
    )
