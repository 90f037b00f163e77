"""inference_mtl: encode / predict / similarity contracts and bad input, and the correctness of the fast paths
(token-length batching, batches run side by side on worker threads, bfloat16); no timings."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from train_helpers import SENTENCES, TEXT_TASKS

from configuration_mtl import POOLING_MODES, TASK_TYPES
from inference_mtl import group_entities, plan_batches, run_concurrently, window_choice
from modeling_mtl import MultiTaskModel
from tasks_mtl import task_class

TASKS = [
    *TEXT_TASKS,
    {"name": "sts", "type": "similarity", "score_range": [0, 5]},
    {"name": "paraphrase", "type": "pair_classification", "labels": ["no", "yes"]},
]

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
    torch.manual_seed(0)
    return MultiTaskModel.from_backbone(tiny_bert, tasks=TASKS).eval()


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


def batch_threads(model) -> list[int]:
    """Spy on the batches `encode`/`predict` run: the thread each one ran on."""
    import threading

    seen = []
    for hook in ("_batch_features", "_batch_logits"):
        original = getattr(model, hook)

        def spy(*args, _original=original, **kwargs):
            seen.append(threading.get_ident())
            return _original(*args, **kwargs)

        setattr(model, hook, spy)
    return seen


@pytest.mark.parametrize("variant", ["float32", "bfloat16-weights"])
@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_concurrent_batches_give_the_sequential_result(model, two_torch_threads, batch_size, variant):
    import threading

    texts = [f"{text} {index}" for index in range(30) for text in TEXTS[:4]]  # 120 texts: several batches
    model = copy.deepcopy(model)
    if variant == "bfloat16-weights":
        model = model.to(torch.bfloat16)
    assert model.inference_workers is None  # default: min(4, torch threads) = 2 workers here
    threads = batch_threads(model)
    concurrent = model.encode(texts, batch_size=batch_size, normalize=False)
    # The concurrent path really ran: batches on worker threads, not on the caller's.
    assert len(threads) > 1 and threading.get_ident() not in threads
    threads.clear()
    model.inference_workers = 1  # one batch at a time
    sequential = model.encode(texts, batch_size=batch_size, normalize=False)
    assert set(threads) == {threading.get_ident()}
    model.inference_workers = None
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
        # Heads with their own top layers read layer calls recorded per thread: batches side by side must not mix.
        {"name": "ner_own", "type": "token_classification", "labels": ["O", "B-PER", "I-PER"], "head": {"layers": 1}},
        {"name": "mood", "labels": ["a", "b"], "head": {"layers": 1, "pooling": "attention"}},
    ]
    import threading

    model = MultiTaskModel.from_backbone(tiny_bert, tasks=tasks).eval()
    texts = [f"Maria Lopez met {index} people in Lyon" + " again" * (index % 7) for index in range(40)]
    threads = batch_threads(model)
    concurrent = model.predict(texts, batch_size=3)
    assert len(threads) > 1 and threading.get_ident() not in threads
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
        assert got["mood"]["scores"] == pytest.approx(expected["mood"]["scores"], abs=1e-6)
        assert spans(got["ner_own"]["words"]) == spans(expected["ner_own"]["words"])
    assert torch.get_num_threads() == 2


# ---------------------------------------------------------------- contracts


@pytest.mark.parametrize("mode", POOLING_MODES)
def test_embedding_does_not_depend_on_batch_mates(tiny_bert, mode):
    model = MultiTaskModel.from_backbone(tiny_bert, pooling=mode).eval()
    alone = model.encode(["short one"], batch_size=1)
    together = model.encode(["short one", "a much longer sentence that forces padding on the short one"], batch_size=2)
    np.testing.assert_allclose(alone[0], together[0], atol=1e-5)


def test_encode_contract(model):
    empty = model.encode([])
    assert empty.shape == (0, 32) and empty.dtype == np.float32
    assert model.encode([], convert_to_tensor=True).shape == (0, 32)
    single = model.encode("hello there")
    assert single.shape == (32,)
    many = model.encode(SENTENCES + ["", "hello there"], batch_size=2)
    assert many.shape == (5, 32) and np.isfinite(many).all()
    np.testing.assert_allclose(many[4], single, atol=1e-6)  # input order kept despite length sorting
    tensor = model.encode(SENTENCES, convert_to_tensor=True)
    assert isinstance(tensor, torch.Tensor)
    np.testing.assert_allclose(tensor.numpy(), many[:3], atol=1e-6)
    with pytest.raises(TypeError, match=r"sentences\[1\] must be a string, got int"):
        model.encode(["fine", 3])
    with pytest.raises(TypeError, match=r"sentences\[0\] must be a string, got NoneType"):
        model.encode([None])
    with pytest.raises(ValueError, match="batch_size must be an int >= 1, got 0"):
        model.encode(["x"], batch_size=0)


def test_long_texts_truncate_at_max_seq_length(tiny_bert):
    model = MultiTaskModel.from_backbone(tiny_bert, max_seq_length=16).eval()
    long_text = " ".join(["movie"] * 200)
    assert model.tokenize([long_text])["input_ids"].shape[1] == 16
    # Everything past the limit is ignored: changing the tail changes nothing.
    np.testing.assert_allclose(
        model.encode(long_text), model.encode(long_text + " totally different ending"), atol=1e-6
    )


def test_predict_formats(model):
    text = "John Smith works for Acme Corporation in New York."
    result = model.predict(text)
    assert set(result) == {"topic", "tags", "ner", "score"}
    topic = result["topic"]
    assert topic["label"] in TASKS[0]["labels"]
    assert abs(sum(topic["scores"].values()) - 1) < 1e-5
    assert topic["score"] == max(topic["scores"].values())
    tags = result["tags"]
    assert set(tags["scores"]) == {"a", "b", "c"}
    assert tags["labels"] == [label for label, p in tags["scores"].items() if p >= 0.5]
    assert isinstance(result["score"]["value"], float)
    words = result["ner"]["words"]
    # One tag per word (not per sub-token), with character offsets into the input text.
    assert [w["word"] for w in words] == [
        "John",
        "Smith",
        "works",
        "for",
        "Acme",
        "Corporation",
        "in",
        "New",
        "York",
        ".",
    ]
    for word in words:
        assert text[word["start"] : word["end"]] == word["word"]
        assert word["tag"] in TASKS[2]["labels"]
    for entity in result["ner"]["entities"]:
        assert text[entity["start"] : entity["end"]] == entity["text"]

    subset = model.predict(["a", "b"], tasks=["score"])
    assert [set(r) for r in subset] == [{"score"}, {"score"}]
    with pytest.raises(ValueError, match=r"unknown task\(s\) \['sentiment'\]; this model's tasks are \['topic'"):
        model.predict("x", tasks=["sentiment"])
    assert model.predict([]) == []


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_predict_batched_equals_one_at_a_time(model, padding_side):
    # Sentences of very different lengths land in different padded batches; every prediction (token tags and
    # scores included) must equal the one made for the sentence alone. Batches are always padded on the right,
    # so a tokenizer set to pad on the left (which would shift BERT's absolute positions) changes nothing.
    long = "Maria Lopez , who lives in Lyon with John Smith , works in Paris for Acme Corporation every day"
    # The last two differ by one word: within plan_batches' padding bound, so they share a padded batch.
    texts = SENTENCES + ["x", long, long.replace(" every day", " daily")]
    original = model.tokenizer.padding_side
    model.tokenizer.padding_side = padding_side
    try:
        batched = model.predict(texts, batch_size=4)
        alone = [model.predict(text) for text in texts]
    finally:
        model.tokenizer.padding_side = original
    tolerance = 1e-5
    for got, expected in zip(batched, alone):
        assert got["topic"]["label"] == expected["topic"]["label"]
        assert got["topic"]["score"] == pytest.approx(expected["topic"]["score"], abs=tolerance)
        assert got["score"]["value"] == pytest.approx(expected["score"]["value"], abs=tolerance)
        assert [(w["word"], w["tag"]) for w in got["ner"]["words"]] == [
            (w["word"], w["tag"]) for w in expected["ner"]["words"]
        ]
        assert [w["score"] for w in got["ner"]["words"]] == pytest.approx(
            [w["score"] for w in expected["ner"]["words"]], abs=tolerance
        )


def test_predict_pre_split_words(model):
    words = ["Maria", "Lopez", "visited", "Paris", "."]
    result = model.predict([words], tasks=["ner"])[0]["ner"]
    assert [w["word"] for w in result["words"]] == words
    text = " ".join(words)
    assert all(text[w["start"] : w["end"]] == w["word"] for w in result["words"])


def test_group_entities_bio_spans():
    text = "Maria Lopez flew to New York ."
    spans = [(0, 5), (6, 11), (12, 16), (17, 19), (20, 23), (24, 28), (29, 30)]
    tags = ["B-PER", "I-PER", "O", "O", "B-LOC", "I-LOC", "O"]
    words = [{"word": text[s:e], "start": s, "end": e, "tag": t, "score": 0.9} for (s, e), t in zip(spans, tags)]
    entities = group_entities(words, text)
    assert [(e["entity"], e["text"], e["start"], e["end"]) for e in entities] == [
        ("PER", "Maria Lopez", 0, 11),
        ("LOC", "New York", 20, 28),
    ]
    # A B- tag always starts a new entity; an I- of another type does too.
    words[1]["tag"] = "B-PER"
    words[5]["tag"] = "I-ORG"
    assert [e["text"] for e in group_entities(words, text)] == ["Maria", "Lopez", "New", "York"]


def test_predict_on_pairs_and_similarity(model):
    pairs = [("A man plays a guitar.", "Someone plays music."), ("The market fell.", "Stocks dropped.")]
    results = model.predict(pairs)
    assert [set(result) for result in results] == [{"sts", "paraphrase"}] * 2
    embeddings = model.encode([a for a, _ in pairs] + [b for _, b in pairs], normalize=True)
    cosines = (embeddings[:2] * embeddings[2:]).sum(1)
    assert [result["sts"]["cosine"] for result in results] == pytest.approx(cosines.tolist(), abs=1e-5)
    paraphrase = results[0]["paraphrase"]
    assert paraphrase["label"] in ("no", "yes") and sum(paraphrase["scores"].values()) == pytest.approx(1.0)
    # A single pair, and the dict form, give the same answer.
    single = model.predict(pairs[0], tasks=["paraphrase"])
    assert single["paraphrase"]["scores"] == pytest.approx(paraphrase["scores"])
    as_dict = model.predict([{"text": pairs[0][0], "text_pair": pairs[0][1]}])[0]
    assert as_dict["sts"]["cosine"] == pytest.approx(results[0]["sts"]["cosine"], abs=1e-6)

    matrix = model.similarity([a for a, _ in pairs], [b for _, b in pairs])
    assert matrix.shape == (2, 2) and np.diag(matrix) == pytest.approx(cosines.tolist(), abs=1e-5)
    assert model.similarity([a for a, _ in pairs], [b for _, b in pairs], pairwise=True) == pytest.approx(
        cosines.tolist(), abs=1e-5
    )


def test_pairs_as_lists_where_every_task_predicted_takes_pairs(model, tiny_bert):
    pairs = [("A man plays a guitar.", "Someone plays music."), ("The market fell.", "Stocks dropped.")]
    as_tuples = model.predict(pairs)
    as_lists = model.predict([list(pair) for pair in pairs], tasks=iter(["sts", "paraphrase"]))
    assert [r["sts"]["cosine"] for r in as_lists] == pytest.approx([r["sts"]["cosine"] for r in as_tuples])
    assert [r["paraphrase"]["scores"] for r in as_lists] == [r["paraphrase"]["scores"] for r in as_tuples]
    # With a single-text task among those predicted, lists stay pre-split words.
    assert set(model.predict([list(pairs[0])])[0]) == {task["name"] for task in TEXT_TASKS}
    # A model of pair tasks only reads them as pairs without `tasks`, and says how to give pairs.
    torch.manual_seed(0)
    pair_only = MultiTaskModel.from_backbone(
        tiny_bert, tasks=[task for task in TASKS if task.get("type") in ("similarity", "pair_classification")]
    ).eval()
    assert set(pair_only.predict([list(pairs[0])])[0]) == {"sts", "paraphrase"}
    # One flat [a, b] list is one pair there (CrossEncoder.predict's reading), as the tuple is.
    assert pair_only.predict(list(pairs[0]))["sts"] == pair_only.predict(pairs[0])["sts"]
    assert model.predict(list(pairs[0]), tasks=["sts"])["sts"] == model.predict(pairs[0], tasks=["sts"])["sts"]
    with pytest.raises(
        ValueError,
        match=r"no single-text tasks .*; give it pairs: \(text, text_pair\) tuples or \[text, text_pair\] lists",
    ):
        pair_only.predict(["one", "two", "three"])


def test_truncated_embeddings_are_the_first_dimensions_normalised_after_the_cut(model):
    full = model.encode(TEXTS[:4], normalize=False)
    for as_tensor in (False, True):
        cut = model.encode(TEXTS[:4], truncate_dim=5, normalize=True, convert_to_tensor=as_tensor)
        cut = cut.numpy() if as_tensor else cut
        expected = full[:, :5] / np.linalg.norm(full[:, :5], axis=1, keepdims=True)
        assert cut.shape == (4, 5) and np.abs(cut - expected).max() <= 1e-6
    assert np.abs(model.encode(TEXTS[:4], truncate_dim=5, normalize=False) - full[:, :5]).max() <= 1e-6
    # Embeddings that carry gradients keep them (a loss can use the cosines), beside a numpy side too.
    vectors = torch.ones(1, 3, requires_grad=True)
    assert float(model.similarity(np.ones((1, 3)), vectors)[0, 0].detach()) == pytest.approx(1.0)
    assert model.similarity(vectors, vectors).requires_grad
    # An array of strings is texts, not embeddings.
    assert model.similarity(np.array(TEXTS[:2]), TEXTS[2:4]) == pytest.approx(model.similarity(TEXTS[:2], TEXTS[2:4]))


def test_similarity_stays_within_minus_one_and_one(model, monkeypatch):
    # Unit vectors' dot products can round a hair past 1 (1.0000001 for two equal texts): cosines are clipped.
    unit = np.array([[1.0 + 1e-6, 0.0], [-1.0 - 1e-6, 0.0]], dtype=np.float32)
    monkeypatch.setattr(model, "encode", lambda texts, **kwargs: np.concatenate([unit, unit]))
    assert model.similarity(["a", "b"], ["a", "b"], pairwise=True).tolist() == [1.0, 1.0]
    assert model.similarity(["a", "b"], ["a", "b"]).tolist() == [[1.0, -1.0], [-1.0, 1.0]]


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda m: m.encode({"text": "x"}), TypeError, "sentences must be a string or a list of strings, got dict"),
        (lambda m: m.encode(["x"], normalize="yes"), TypeError, "normalize must be True, False or None"),
        (lambda m: m.encode(["x"], max_seq_length=0), ValueError, "max_seq_length must be an int >= 2"),
        (lambda m: m.predict(None), TypeError, "got None"),
        (lambda m: m.predict(42), TypeError, "got int"),
        (lambda m: m.predict(["a", ("b", "c")]), TypeError, "mixes text pairs"),
        (lambda m: m.predict([("a", "b")], tasks=["topic"]), ValueError, r"task\(s\) \['topic'\] take single texts"),
        (lambda m: m.predict(["a"], tasks=["paraphrase"]), ValueError, r"\['paraphrase'\] take text pairs"),
        (lambda m: m.predict([("a", 3)]), TypeError, r"sentences\[0\]\[1\] must be a string, got int"),
        (lambda m: m.predict([["a", 3]]), TypeError, r"sentences\[0\]\[1\] must be a string"),
        (lambda m: m.similarity(["a", "b"], ["c"], pairwise=True), ValueError, "lists of the same length, got 2 and 1"),
        (lambda m: m.similarity(["a", None], ["c"]), TypeError, r"texts_a\[1\] must be a string"),
        (lambda m: m.similarity(["a"], ["c"], pairwise="no"), TypeError, "pairwise must be True or False, got 'no'"),
        (lambda m: m.predict([("a", "b"), ("c", "")]), ValueError, r"sentences\[1\]\[1\] is empty"),
        (lambda m: m.predict("a", tasks=[]), ValueError, "tasks is empty"),
        (lambda m: m.encode("a", normalize=False, normalize_embeddings=True), ValueError, "disagree"),
        (lambda m: m.encode("a", normalize_embeddings=1), TypeError, "normalize_embeddings must be True, False"),
        (lambda m: m.encode("a", truncate_dim=0), ValueError, "truncate_dim must be an int from 1 to 32, got 0"),
        (lambda m: m.encode("a", truncate_dim=10_000), ValueError, "truncate_dim must be an int from 1"),
        (lambda m: m.similarity(np.ones((2, 3)), ["a"]), TypeError, "both be texts or both be embeddings"),
        (lambda m: m.similarity(np.ones((2, 3)), np.ones((2, 4))), ValueError, r"different sizes: 3 \(texts_a\)"),
        (lambda m: m.similarity(np.ones((2, 3)), np.ones((3, 3)), pairwise=True), ValueError, "same number of rows"),
        (lambda m: m.similarity(np.array([[np.nan, 1.0]]), np.ones((1, 2))), ValueError, "texts_a holds a non-finite"),
        (lambda m: m.similarity(np.ones((2, 2, 2)), np.ones((1, 2))), ValueError, r"got \(2, 2, 2\)"),
        # complex numbers: refused, as a tensor and as an array alike (a cast would drop the imaginary part)
        *(
            (lambda m, c=c: m.similarity(c, np.ones((1, 2))), TypeError, "texts_a must be real-valued embeddings")
            for c in (torch.ones(1, 2, dtype=torch.complex64), np.ones((1, 2), dtype=np.complex64))
        ),
        (lambda m: m.similarity(torch.ones(1, 2), torch.ones(1, 2).bool()), TypeError, "texts_b must be real-valued"),
        (lambda m: m.predict("a", tasks=5), TypeError, "tasks must be a task name or a list of task names, got int"),
    ],
)
def test_bad_input_is_one_clear_error(model, call, error, message):
    with pytest.raises(error, match=message):
        call(model)


def test_pre_split_words_get_one_entry_per_input_word(model):
    words = ["Maria", "", "Lopez", "visited", "Paris"]
    result = model.predict([words], tasks=["ner"])[0]["ner"]
    assert [w["word"] for w in result["words"]] == words  # the empty word keeps its place
    assert result["words"][1]["tag"] is None and result["words"][1]["score"] is None
    assert all(w["tag"] is not None for i, w in enumerate(result["words"]) if i != 1)


def test_huge_texts_cost_what_their_truncated_prefix_costs(model, monkeypatch):
    huge = "maria visited paris with john " * 200_000  # a 6 MB line of ordinary words
    lengths = []
    tokenizer_class = type(model.tokenizer)
    original = tokenizer_class.__call__

    def spy(self, text, *args, **kwargs):
        lengths.append(max(map(len, text)) if isinstance(text, list) else len(text))
        return original(self, text, *args, **kwargs)

    monkeypatch.setattr(tokenizer_class, "__call__", spy)
    bounded = model.encode(huge)
    assert max(lengths) < 100_000  # the tokenizer never saw the 6 MB
    np.testing.assert_allclose(bounded, model.encode(huge[:10_000]), atol=1e-6)
    # A cut text that no longer fills the limit is tokenised whole: results never change.
    spaced = "paris" + " " * 20_000 + "lyon"
    full = model.tokenizer([spaced], truncation=True, max_length=model.config.max_seq_length)["input_ids"][0]
    assert model._tokenize_unpadded([spaced])["input_ids"][0] == full


# ---------------------------------------------------------------- eval mode, words, long texts


@pytest.mark.parametrize("task_type", TASK_TYPES)
def test_predict_is_deterministic_on_a_model_left_in_train_mode(tiny_bert, task_type):
    # `from_backbone` returns a model in train mode: every prediction path (the pair heads on `encode`'s features
    # included) must run without dropout, and leave the model in the mode it found it in.
    cls = task_class(task_type)
    spec = {"name": "t", "type": task_type}
    if cls.has_labels and cls.default_labels is None:
        spec["labels"] = ["O", "B-PER", "I-PER"]
    torch.manual_seed(0)
    model = MultiTaskModel.from_backbone(tiny_bert, tasks=[spec], head_dropout=0.5)
    assert model.training
    item = ("a cat sits on the mat", "a kitten rests on a rug") if cls.takes_pairs else "John Smith lives in Paris"
    predictions = [model.predict(item)["t"] for _ in range(3)]
    assert predictions[1] == predictions[0] and predictions[2] == predictions[0]
    assert model.training


@pytest.mark.parametrize(
    "text, words",
    [
        ("e\u0301te\u0301 Zoe\u0308", ["e\u0301te\u0301", "Zoe\u0308"]),  # decomposed (NFD): marks the tokenizer drops
        ("\u00e9t\u00e9 Zo\u00eb", ["\u00e9t\u00e9", "Zo\u00eb"]),  # composed (NFC)
        ("Zoe\u0308, na\u0131\u0308ve cafe\u0301.", ["Zoe\u0308", ",", "na\u0131\u0308ve", "cafe\u0301", "."]),
        ("(John) lives in Paris.", ["(", "John", ")", "lives", "in", "Paris", "."]),  # punctuation: its own word
    ],
)
def test_token_predictions_span_whole_words(model, text, words):
    result = model.predict(text, tasks=["ner"])["ner"]
    assert [w["word"] for w in result["words"]] == words
    assert all(text[w["start"] : w["end"]] == w["word"] and w["tag"] is not None for w in result["words"])
    assert "".join(words) == "".join(text.split())  # every character belongs to a word


@pytest.mark.parametrize("from_the_end", [False, True])
def test_window_choice_reads_each_token_farthest_from_a_cut_edge(from_the_end):
    # Three windows of 6, 6 and 5 tokens sharing 2 with the next: 13 tokens at 0-5, 4-9 and 8-12 (from the start).
    window, index = window_choice([6, 6, 5], stride=2)
    assert window.tolist() == [0] * 5 + [1] * 4 + [2] * 4
    assert index.tolist() == [0, 1, 2, 3, 4, 1, 2, 3, 4, 1, 2, 3, 4]
    if from_the_end:  # window 0 is the last 6 tokens (7-12), window 2 the first 5 (0-4)
        window, index = window_choice([6, 6, 5], stride=2, from_the_end=True)
        assert window.tolist() == [2] * 4 + [1] * 4 + [0] * 5
        assert index.tolist() == [0, 1, 2, 3, 1, 2, 3, 4, 1, 2, 3, 4, 5]


def centred_reference(model, text: str, task: str) -> list[str]:
    """Each word's tag by the windowing rule, written out plainly: the text's tokens cut into windows of the
    model's length from the start (or the end, for left truncation), consecutive ones sharing a quarter; each word
    read from a plain forward pass of the window where its first sub-token lies farthest from a cut edge."""
    tokenizer = model.tokenizer
    whole = tokenizer(text, add_special_tokens=False)
    ids, word_ids = whole["input_ids"], whole.word_ids()
    room = model.config.max_seq_length - tokenizer.num_special_tokens_to_add()
    step = room - room // 4
    windows = [(0, min(room, len(ids)))]  # (start, end) in the text's tokens
    while windows[-1][1] < len(ids):
        windows.append((windows[-1][0] + step, min(windows[-1][0] + step + room, len(ids))))
    if tokenizer.truncation_side == "left":  # the same cuts, counted from the end
        windows = sorted((max(0, len(ids) - step * k - room), len(ids) - step * k) for k in range(len(windows)))
    with torch.inference_mode():
        probabilities = [
            model(
                torch.tensor([[tokenizer.cls_token_id, *ids[start:end], tokenizer.sep_token_id]]), tasks=[task]
            ).logits[task][0, 1:-1]
            for start, end in windows
        ]
    tags = []
    for position, word in enumerate(word_ids):
        if word is None or (position and word_ids[position - 1] == word):
            continue  # not a word's first sub-token
        best, best_room = None, -1.0
        for (start, end), rows in zip(windows, probabilities):
            if not start <= position < end:
                continue
            before = position - start if start > 0 else float("inf")
            after = end - 1 - position if end < len(ids) else float("inf")
            if min(before, after) > best_room:
                best, best_room = rows[position - start], min(before, after)
        tags.append(model.config.task(task).labels[int(best.argmax())])
    return tags


@pytest.mark.parametrize("side", ["right", "left"])
def test_long_texts_are_tagged_whole_in_overlapping_windows(tiny_bert, side):
    torch.manual_seed(0)
    model = MultiTaskModel.from_backbone(tiny_bert, tasks=TASKS, max_seq_length=16).eval()
    model.tokenizer = copy.deepcopy(model.tokenizer)
    model.tokenizer.truncation_side = side
    # Several windows long, with names on and around the window borders (a window holds 14 text tokens).
    words = "John Smith visited the Louvre museum in Paris with Maria and John Smith last summer".split() * 4
    text = " ".join(words)
    result = model.predict(text, tasks=["topic", "ner"])
    tagged = result["ner"]["words"]
    assert [w["word"] for w in tagged] == words  # every word, none cut off
    assert all(w["tag"] is not None for w in tagged)
    assert [w["tag"] for w in tagged] == centred_reference(model, text, "ner")
    # Sentence-level tasks still read the first max_seq_length tokens only.
    assert result["topic"] == model.predict(text, tasks=["topic"])["topic"]
    # Pre-split words are windowed the same way: the same tags, word for word.
    assert [w["tag"] for w in model.predict([words], tasks=["ner"])[0]["ner"]["words"]] == [w["tag"] for w in tagged]
