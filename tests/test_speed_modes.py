"""Correctness of encode's fast paths: token-length batching, bfloat16 autocast and the int8 copy (no timings)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from modeling_mtl import MultiTaskModel, plan_batches, run_concurrently

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


@pytest.fixture
def two_torch_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("variant", ["float32", "bfloat16-weights", "int8"])
@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_concurrent_batches_give_the_sequential_result(model, two_torch_threads, batch_size, variant):
    texts = [f"{text} {index}" for index in range(30) for text in TEXTS[:4]]  # 120 texts: several batches
    if variant == "bfloat16-weights":
        model = copy.deepcopy(model).to(torch.bfloat16)
    elif variant == "int8":
        model = model.quantize_dynamic()
    assert model.inference_workers is None  # default: min(4, torch threads) = 2 workers here
    concurrent = model.encode(texts, batch_size=batch_size, normalize=False)
    model.inference_workers = 1  # one batch at a time, on this instance only
    try:
        sequential = model.encode(texts, batch_size=batch_size, normalize=False)
    finally:
        del model.inference_workers  # back to the class default
    np.testing.assert_allclose(concurrent, sequential, atol=1e-6)
    if variant == "float32":
        np.testing.assert_allclose(concurrent, reference_embeddings(model, texts), atol=1e-5)
    assert torch.get_num_threads() == 2  # the caller's setting survives


def test_run_concurrently_calls_every_job_once_on_single_thread_workers(two_torch_threads):
    import threading

    drawn, seen, lock = [], {}, threading.Lock()

    def jobs():
        for index in range(50):
            drawn.append(index)
            yield (index,)

    def work(index):
        with lock:
            seen[index] = (threading.get_ident(), torch.get_num_threads())

    run_concurrently(work, jobs(), workers=2)
    assert sorted(seen) == list(range(50)) and drawn == list(range(50))
    assert {threads for _, threads in seen.values()} == {1}  # one intra-op thread per worker
    assert threading.get_ident() not in {ident for ident, _ in seen.values()}
    assert torch.get_num_threads() == 2


def test_run_concurrently_raises_the_first_error_and_bounds_work_in_flight(two_torch_threads):
    import threading

    release = threading.Event()
    drawn, drawn_when_released = [], []

    def jobs():
        for index in range(100):
            drawn.append(index)
            yield (index,)

    def work(index):
        release.wait(timeout=10)
        if index == 0:
            raise ValueError("job 0 failed")

    def let_go():
        drawn_when_released.append(len(drawn))
        release.set()

    timer = threading.Timer(0.5, let_go)
    timer.start()
    with pytest.raises(ValueError, match="job 0 failed"):
        run_concurrently(work, jobs(), workers=2)
    timer.join()
    # While every job was blocked, the lazy iterator was drawn only as far as 2 * workers jobs (+1 waiting).
    assert drawn_when_released[0] <= 5
    assert len(drawn) < 100  # and drawing stopped after the error
    assert torch.get_num_threads() == 2


def test_predict_concurrent_batches_give_the_sequential_result(tiny_bert, two_torch_threads):
    tasks = [
        {"name": "topic", "labels": ["a", "b", "c"]},
        {"name": "ner", "type": "token_classification", "labels": ["O", "B-PER", "I-PER"]},
        {"name": "tags", "type": "multi_label_classification", "labels": ["x", "y"]},
        {"name": "quality", "type": "regression"},
    ]
    model = MultiTaskModel.from_backbone(tiny_bert, tasks=tasks).eval()
    texts = [f"Maria Lopez met {index} people in Lyon" + " again" * (index % 7) for index in range(40)]
    concurrent = model.predict(texts, batch_size=3)
    model.inference_workers = 1
    sequential = model.predict(texts, batch_size=3)
    assert len(concurrent) == len(texts)
    for got, expected in zip(concurrent, sequential):
        assert got["topic"]["label"] == expected["topic"]["label"]

        def spans(words):
            return [(w["word"], w["start"], w["end"], w["tag"]) for w in words]

        assert spans(got["ner"]["words"]) == spans(expected["ner"]["words"])
        assert [w["score"] for w in got["ner"]["words"]] == pytest.approx(
            [w["score"] for w in expected["ner"]["words"]], abs=1e-6
        )
        assert got["tags"]["scores"] == pytest.approx(expected["tags"]["scores"], abs=1e-6)
        assert got["quality"]["value"] == pytest.approx(expected["quality"]["value"], abs=1e-6)
    assert torch.get_num_threads() == 2
