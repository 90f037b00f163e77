"""Correctness of encode's fast paths: token-length batching, bfloat16 autocast and the int8 copy (no timings)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from modeling_mtl import MultiTaskModel, plan_batches

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


@pytest.mark.parametrize("batch_size", [1, 3, 8, 128])
@pytest.mark.parametrize("max_padding", [0.0, 0.1, 0.5, 1.0])
def test_plan_batches_covers_every_text_once_within_the_padding_bound(batch_size, max_padding):
    lengths = np.random.default_rng(0).integers(2, 60, size=257)
    batches = plan_batches(lengths, batch_size, max_padding)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(len(lengths)))
    for batch in batches:
        assert 1 <= len(batch) <= batch_size
        width = lengths[batch[0]]
        assert width == lengths[batch].max()  # the first row is the longest: it sets the padded width
        assert (lengths[batch] >= width * (1 - max_padding)).all()
    widths = [lengths[batch[0]] for batch in batches]
    assert widths == sorted(widths, reverse=True)
    if max_padding == 0.0:
        assert all(len(set(lengths[batch].tolist())) == 1 for batch in batches)  # exact-length buckets


def test_plan_batches_bounds_padding_on_real_tokenised_lengths(model):
    texts = [" ".join(["word"] * n) for n in (40, 3, 3, 3, 3, 3, 3, 3, 38, 5)]
    lengths = np.array([len(ids) for ids in model.tokenize(texts, padding=False, return_tensors=None)["input_ids"]])
    batches = plan_batches(lengths, batch_size=32)
    padded = sum(len(batch) * lengths[batch].max() for batch in batches)
    assert padded <= 1.1 * lengths.sum()  # sorting alone would pad all ten rows to 42 tokens
    assert len(batches) == 3  # [40, 38], [5], [3 x 7]


def test_bfloat16_weights_encode_close_to_float32(model):
    import copy

    full = model.encode(TEXTS, normalize=True)
    half_model = copy.deepcopy(model).to(torch.bfloat16)
    half = half_model.encode(TEXTS, normalize=True)
    assert half.dtype == np.float32 and half.shape == full.shape
    assert (full * half).sum(1).min() > 0.98
    with pytest.raises(ValueError, match="float32 weights"):
        half_model.encode(TEXTS, precision="float32")
