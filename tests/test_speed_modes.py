"""Correctness of encode's fast paths: token-length batching, bfloat16 autocast and the int8 copy (no timings)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from modeling_mtl import MultiTaskModel

TEXTS = [
    "short",
    "",
    "a somewhat longer sentence with a few more words in it than the others",
    "medium length sentence here",
    "x " * 300,  # truncated at max_seq_length
    "another one",
]


@pytest.fixture(scope="module")
def model(tiny_bert):
    return MultiTaskModel.from_backbone(tiny_bert).eval()


def reference_embeddings(model: MultiTaskModel, texts: list[str]) -> np.ndarray:
    """One sentence at a time, through the plain tokenizer and forward: no batching or padding involved."""
    rows = []
    with torch.inference_mode():
        for text in texts:
            batch = model.tokenize([text], return_token_type_ids=False)
            rows.append(model(batch["input_ids"], batch["attention_mask"]).embeddings[0].numpy())
    return np.stack(rows)


@pytest.mark.parametrize("batch_size", [1, 2, 4, 64])
def test_batching_matches_unbatched_in_input_order(model, batch_size):
    expected = reference_embeddings(model, TEXTS)
    got = model.encode(TEXTS, batch_size=batch_size, normalize=False)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_bfloat16_precision_close_to_float32(model):
    full = model.encode(TEXTS, normalize=True)
    half = model.encode(TEXTS, normalize=True, precision="bfloat16")
    assert half.dtype == np.float32 and half.shape == full.shape
    assert (full * half).sum(1).min() > 0.98


def test_unknown_precision_is_rejected(model):
    with pytest.raises(ValueError, match="precision"):
        model.encode(TEXTS, precision="float8")


def test_quantize_dynamic_returns_int8_copy_and_leaves_model_alone(model):
    before = {name: param.clone() for name, param in model.state_dict().items()}
    quantized = model.quantize_dynamic()
    assert any("quantized" in type(module).__module__ for module in quantized.modules())
    assert all(type(module) is not torch.nn.Linear for module in quantized.backbone.modules())
    for name, param in model.state_dict().items():
        assert torch.equal(param, before[name]), name
    full = model.encode(TEXTS, normalize=True)
    int8 = quantized.encode(TEXTS, normalize=True)
    assert int8.shape == full.shape
    assert (full * int8).sum(1).mean() > 0.9
    assert quantized.encode([]).shape == (0, model.config.embedding_dim)
