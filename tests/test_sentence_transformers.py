"""sentence-transformers, both directions: `encode` equals the peer on the same files; a saved model loads in
`SentenceTransformer` (remote code) and an exported one without remote code, with identical embeddings (pooling,
projection, normalisation, max length, long texts); `from_backbone` carries Dense, Normalize and prompts exactly,
and refuses what it cannot carry."""

import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers.utils import logging as hf_logging

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


def test_the_sentence_transformers_call_forms_give_the_peers_results(peers):
    """What a sentence-transformers user writes: normalize_embeddings, truncate_dim (cut, then normalised),
    similarity / pairwise similarity of embeddings, encode_query / encode_document."""
    ours, theirs = peers
    for dim, options in itertools.product(
        (64, 384), ({"normalize_embeddings": True}, {"normalize_embeddings": False}, {})
    ):
        expected = theirs.encode(SENTENCES, truncate_dim=dim, **options)
        got = ours.encode(SENTENCES, truncate_dim=dim, **options)
        assert got.shape == expected.shape == (len(SENTENCES), dim)
        assert np.abs(got - expected).max() <= 1e-5, (dim, options)
    # Without normalize_embeddings=True, the cut comes after the model's Normalize: not unit length.
    assert np.linalg.norm(ours.encode(SENTENCES[:1], truncate_dim=64), axis=1)[0] < 0.9
    a, b = ours.encode(SENTENCES[:3]), ours.encode(SENTENCES[3:6])
    expected = theirs.similarity(theirs.encode(SENTENCES[:3]), theirs.encode(SENTENCES[3:6]))
    tensors = ours.similarity(torch.from_numpy(a), torch.from_numpy(b))
    assert isinstance(tensors, torch.Tensor) and tensors.shape == (3, 3)
    torch.testing.assert_close(tensors, expected, atol=1e-5, rtol=0)
    arrays = ours.similarity(a, b)  # numpy embeddings: a tensor too, as sentence-transformers gives
    assert isinstance(arrays, torch.Tensor) and np.abs(arrays.numpy() - expected.numpy()).max() <= 1e-5
    assert np.abs(arrays.numpy() - ours.similarity(SENTENCES[:3], SENTENCES[3:6])).max() <= 1e-5  # the texts' cosines
    pairwise = theirs.similarity_pairwise(torch.from_numpy(a), torch.from_numpy(b))
    torch.testing.assert_close(ours.similarity_pairwise(torch.from_numpy(a), torch.from_numpy(b)), pairwise)
    assert ours.get_sentence_embedding_dimension() == theirs.get_sentence_embedding_dimension() == 384
    for role in ("query", "document"):  # no such prompts here: the plain embedding
        expected = getattr(theirs, f"encode_{role}")(SENTENCES[:3])
        assert np.abs(getattr(ours, f"encode_{role}")(SENTENCES[:3]) - expected).max() <= 1e-5


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


def sentence_transformer(folder, **kwargs):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(folder), device="cpu", **kwargs)


@pytest.mark.parametrize("projection", [None, "tanh"])
def test_saved_and_exported_folders_load_in_sentence_transformers_identically(minilm_dir, tmp_path, projection, caplog):
    torch.manual_seed(0)
    options = {"projection_dim": 64, "projection_activation": projection} if projection else {}
    model = MultiTaskModel.from_backbone(
        minilm_dir, tasks=[{"name": "t", "labels": ["a", "b"]}], max_seq_length=128, **options
    )
    expected = model.encode(SENTENCES)
    model.save_pretrained(tmp_path / "saved")
    remote = sentence_transformer(tmp_path / "saved", trust_remote_code=True)
    assert remote.max_seq_length == 128
    assert np.abs(remote.encode(SENTENCES) - expected).max() <= 1e-5
    model.export_sentence_transformers(tmp_path / "exported")
    config = json.loads((tmp_path / "exported" / "config.json").read_text())
    assert "auto_map" not in config and config["model_type"] == "bert"  # a plain encoder: no remote code
    plain = sentence_transformer(tmp_path / "exported")
    assert np.abs(plain.encode(SENTENCES) - expected).max() <= 1e-5
    assert plain[0].auto_model.pooler is None  # loaded as saved: no freshly initialised pooler (and no warning)
    np.testing.assert_allclose(np.linalg.norm(plain.encode(SENTENCES), axis=1), 1.0, rtol=1e-5)
    # ... and back: from_backbone carries the Dense layer (as the projection) and Normalize exactly.
    hf_logging.enable_propagation()  # transformers' load report, to caplog
    try:
        with caplog.at_level("WARNING"):
            back = MultiTaskModel.from_backbone(tmp_path / "exported")
    finally:
        hf_logging.disable_propagation()
    assert "MISSING" not in caplog.text  # loaded as exported, without a pooler: no report of one left uninitialised
    assert (back.config.projection_dim, back.config.projection_activation) == (64 if projection else None, projection)
    assert np.abs(back.encode(SENTENCES) - expected).max() <= 1e-5


def test_prompts_are_carried_and_used_like_sentence_transformers(minilm_dir, tmp_path):
    model = MultiTaskModel.from_backbone(minilm_dir)
    model.export_sentence_transformers(tmp_path / "st")
    settings = tmp_path / "st" / "config_sentence_transformers.json"
    settings.write_text(json.dumps({"prompts": {"query": "query: ", "doc": ""}, "default_prompt_name": "query"}))
    peer = sentence_transformer(tmp_path / "st")
    ours = MultiTaskModel.from_backbone(tmp_path / "st")
    assert ours.config.prompts == {"query": "query: "} and ours.config.default_prompt_name == "query"
    assert np.abs(ours.encode(SENTENCES[:3]) - peer.encode(SENTENCES[:3])).max() <= 1e-5  # default prompt applied
    assert np.abs(ours.encode(SENTENCES[:3], prompt="x: ") - peer.encode(SENTENCES[:3], prompt="x: ")).max() <= 1e-5
    # encode_query takes the "query" prompt; encode_document, without a document prompt, none (not the default).
    for role in ("query", "document"):
        expected = getattr(peer, f"encode_{role}")(SENTENCES[:3])
        assert np.abs(getattr(ours, f"encode_{role}")(SENTENCES[:3]) - expected).max() <= 1e-5
    assert np.abs(ours.encode_query(SENTENCES[:3]) - ours.encode(SENTENCES[:3], prompt="query: ")).max() <= 1e-6
    assert np.abs(ours.encode_document(SENTENCES[:3]) - ours.encode(SENTENCES[:3], prompt="")).max() <= 1e-6
    with pytest.raises(
        ValueError, match=r"prompt_name 'nope' is not one of this model's prompts \['document', 'query'\]"
    ):
        ours.encode("a", prompt_name="nope")


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda f: f.update(pooling_mode_max_tokens=True), r"concatenates poolings \['mean', 'max'\]"),
        (lambda f: f.update(include_prompt=False), "leaves out the prompt tokens"),
    ],
)
def test_modules_that_cannot_be_carried_are_refused(minilm_dir, tmp_path, change, message):
    MultiTaskModel.from_backbone(minilm_dir).export_sentence_transformers(tmp_path / "st")
    pooling = tmp_path / "st" / "1_Pooling" / "config.json"
    config = json.loads(pooling.read_text())
    change(config)
    pooling.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        MultiTaskModel.from_backbone(tmp_path / "st")


def test_an_unknown_module_is_refused_by_name(minilm_dir, tmp_path):
    MultiTaskModel.from_backbone(minilm_dir).export_sentence_transformers(tmp_path / "st")
    modules = json.loads((tmp_path / "st" / "modules.json").read_text())
    modules.append({"idx": 3, "name": "3", "path": "3_LSTM", "type": "sentence_transformers.models.LSTM"})
    (tmp_path / "st" / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(ValueError, match=r"module 3 \(sentence_transformers.models.LSTM\) cannot be carried"):
        MultiTaskModel.from_backbone(tmp_path / "st")
