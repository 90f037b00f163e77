"""The HTTP service, run for real: uvicorn on 127.0.0.1 and an httpx client.

Three servers per module: `server` serves a real tiny `MultiTaskModel` (every endpoint, every bad input), `probe_server`
serves the same model through `ProbeModel`, a plain object with the model's API (duck typing), which records every
model call and can hold the model (to queue requests deterministically) or fail on chosen inputs; it also needs an
API key and closes idle connections after 1 s. A third, `roomy_server`, takes bodies of up to 8 MB.
"""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import socket
import threading
import time

import httpx
import numpy as np
import pytest

TASKS = [
    {"name": "sentiment", "type": "classification", "labels": ["negative", "positive"]},
    {"name": "topics", "type": "multi_label_classification", "labels": ["sport", "music", "film"]},
    {"name": "ner", "type": "token_classification", "labels": ["O", "B-PER", "I-PER", "B-ORG", "I-ORG"]},
    {"name": "rating", "type": "regression"},
    {"name": "nli", "type": "pair_classification", "labels": ["no", "yes"]},
    {"name": "sts", "type": "similarity"},
]
TEXT_TASKS = ["sentiment", "topics", "ner", "rating"]
PAIR_TASKS = ["nli", "sts"]
TEXTS = ["I loved this movie!", "John Smith works for Acme Corporation in New York.", "What is the capital?", ""]
PAIRS = [("A man plays a guitar.", "Someone makes music."), ("The cat sleeps.", "Stocks fell sharply today.")]
API_KEY = "s3cret-key"


def make_tiny_model(backbone, path):
    from modeling_mtl import MultiTaskModel

    model = MultiTaskModel.from_backbone(str(backbone), tasks=TASKS)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model_dir(tiny_bert, tmp_path_factory):
    return make_tiny_model(tiny_bert, tmp_path_factory.mktemp("service_model"))


@pytest.fixture(scope="module")
def model(model_dir):
    from modeling_mtl import MultiTaskModel

    return MultiTaskModel.from_pretrained(model_dir).eval()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerThread:
    """uvicorn.Server in a background thread, stopped cleanly with `should_exit`."""

    def __init__(self, app, **config):
        import uvicorn

        self.port = free_port()
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", **config)
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def app(model):
    from multitask_st.service import create_app

    return create_app(model, max_batch_size=16, max_text_length=500)


@pytest.fixture(scope="module")
def server(app):
    with ServerThread(app) as url:
        yield url


@pytest.fixture()
def client(server):
    with httpx.Client(base_url=server, timeout=30) as client:
        yield client


class ProbeModel:
    """The model's API on a plain object (not a `MultiTaskModel`): records calls, can hold or fail them.

    - a call with a text containing "HOLD" waits until `release` is set (requests queue up meanwhile);
    - "POISON" in a text raises ValueError (an input the model rejects), "CRASH" a RuntimeError.
    """

    def __init__(self, model):
        self.model = model
        self.config = model.config
        self.tokenizer = model.tokenizer
        self.task_names = model.task_names
        self.calls: list[list[str]] = []
        self.holding = threading.Event()
        self.release = threading.Event()

    def _observe(self, items) -> None:
        texts = [text for item in items for text in (item if isinstance(item, tuple) else (item,))]
        self.calls.append(texts)
        if any("HOLD" in text for text in texts):
            self.holding.set()
            assert self.release.wait(30), "test never released the model"
        if any("POISON" in text for text in texts):
            raise ValueError("the backend rejects this text")
        if any("CRASH" in text for text in texts):
            raise RuntimeError("backend crashed")

    def encode(self, texts, **kwargs):
        self._observe(texts)
        return self.model.encode(texts, **kwargs)

    def predict(self, inputs, **kwargs):
        self._observe(inputs)
        return self.model.predict(inputs, **kwargs)

    def similarity(self, a, b, **kwargs):
        return self.model.similarity(a, b, **kwargs)


@pytest.fixture(scope="module")
def probe(model):
    return ProbeModel(model)


@pytest.fixture(scope="module")
def probe_app(probe):
    from multitask_st.service import create_app

    return create_app(
        probe, max_batch_size=16, max_text_length=500, batch_wait_ms=0, max_call_chars=2000, api_key=API_KEY
    )


@pytest.fixture(scope="module")
def probe_server(probe_app):
    with ServerThread(probe_app, timeout_keep_alive=1) as url:
        yield url


@pytest.fixture()
def probe_client(probe_server, probe):
    probe.calls.clear()
    probe.holding.clear()
    probe.release.clear()
    with httpx.Client(base_url=probe_server, timeout=30, headers={"X-API-Key": API_KEY}) as client:
        yield client
    probe.release.set()  # never leave the worker stuck


def hold_model(probe, probe_server) -> concurrent.futures.Future:
    """Start a request that holds the model (until `probe.release` is set) and wait until it runs."""
    pool = concurrent.futures.ThreadPoolExecutor(1)
    holder = pool.submit(post, probe_server, "/embed", {"texts": ["HOLD the model"]})
    pool.shutdown(wait=False)
    assert probe.holding.wait(30)
    return holder


def post(url: str, path: str, payload: dict, timeout: float = 30) -> httpx.Response:
    return httpx.post(url + path, json=payload, timeout=timeout, headers={"X-API-Key": API_KEY})


def wait_for(condition, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


# ---------------------------------------------------------------------------------------------------- good path


def test_health_and_info(client, model, model_dir):
    health = client.get("/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    info = client.get("/info").json()
    assert info["dimension"] == model.config.embedding_dim
    assert info["backbone"] == "bert"
    assert [task["name"] for task in info["tasks"]] == TEXT_TASKS + PAIR_TASKS
    assert info["tasks"][0]["labels"] == ["negative", "positive"]
    assert {task["name"]: task["input"] for task in info["tasks"]} == {
        **dict.fromkeys(TEXT_TASKS, "text"),
        **dict.fromkeys(PAIR_TASKS, "pair"),
    }
    assert info["tasks"][4]["type"] == "pair_classification" and info["tasks"][5]["labels"] == []
    assert info["max_batch_size"] == 16 and info["api_key_required"] is False
    # The server's local path is private: /info shows the folder name, and neither the schema nor /docs has the path.
    assert info["model"] == model_dir.name
    for path in ("/info", "/openapi.json", "/docs"):
        assert str(model_dir) not in client.get(path).text


def test_embed_matches_model_encode(client, model):
    response = client.post("/embed", json={"texts": TEXTS})
    assert response.status_code == 200
    body = response.json()
    embeddings = np.array(body["embeddings"])
    assert embeddings.shape == (len(TEXTS), model.config.embedding_dim) == (len(TEXTS), body["dimension"])
    np.testing.assert_allclose(embeddings, model.encode(TEXTS), atol=1e-5)
    raw = np.array(client.post("/embed", json={"texts": TEXTS[:2], "normalize": False}).json()["embeddings"])
    np.testing.assert_allclose(raw, model.encode(TEXTS[:2], normalize=False), atol=1e-5)


def test_predict_all_and_subset(client, model):
    body = client.post("/predict", json={"texts": TEXTS}).json()
    assert len(body["predictions"]) == len(TEXTS)
    expected = model.predict(TEXTS)
    for got, want in zip(body["predictions"], expected):
        assert set(got) == set(TEXT_TASKS)
        assert got["sentiment"]["label"] == want["sentiment"]["label"]
        assert got["rating"]["value"] == pytest.approx(want["rating"]["value"], abs=1e-5)
        assert [w["word"] for w in got["ner"]["words"]] == [w["word"] for w in want["ner"]["words"]]
    subset = client.post("/predict", json={"texts": TEXTS[:1], "tasks": ["sentiment"]}).json()["predictions"]
    assert list(subset[0]) == ["sentiment"]
    assert set(subset[0]["sentiment"]["scores"]) == {"negative", "positive"}


def test_predict_pairs(client, model):
    body = client.post("/predict", json={"pairs": [list(pair) for pair in PAIRS]}).json()
    expected = model.predict(PAIRS)
    assert len(body["predictions"]) == len(PAIRS)
    for got, want in zip(body["predictions"], expected):
        assert set(got) == set(PAIR_TASKS)
        assert got["nli"]["label"] == want["nli"]["label"] and set(got["nli"]["scores"]) == {"no", "yes"}
        assert got["sts"]["cosine"] == pytest.approx(want["sts"]["cosine"], abs=1e-5)
    subset = client.post("/predict", json={"pairs": [list(PAIRS[0])], "tasks": ["sts"]}).json()["predictions"]
    assert list(subset[0]) == ["sts"]


def test_similarity_matrix_and_pairwise(client, model):
    vectors = model.encode(TEXTS[:3], normalize=True)
    scores = np.array(client.post("/similarity", json={"texts": TEXTS[:3]}).json()["scores"])
    np.testing.assert_allclose(scores, vectors @ vectors.T, atol=1e-5)
    np.testing.assert_allclose(np.diag(scores), 1.0, atol=1e-5)
    cross = np.array(client.post("/similarity", json={"texts": TEXTS[:2], "texts_b": TEXTS[2:3]}).json()["scores"])
    np.testing.assert_allclose(cross, vectors[:2] @ vectors[2:3].T, atol=1e-5)
    a, b = [pair[0] for pair in PAIRS], [pair[1] for pair in PAIRS]
    pairwise = client.post("/similarity", json={"texts": a, "texts_b": b, "pairwise": True}).json()["scores"]
    np.testing.assert_allclose(pairwise, model.similarity(a, b, pairwise=True), atol=1e-5)


def test_similarity_cosines_stay_within_minus_one_and_one(client):
    # Equal texts: dot products of unit vectors round a hair past 1 for some of them; the answer is clipped.
    texts = [pair[0] for pair in PAIRS] + [pair[1] for pair in PAIRS] + TEXTS
    response = client.post("/similarity", json={"texts": texts, "texts_b": texts, "pairwise": True}).json()
    assert max(response["scores"]) == 1.0
    assert np.max(client.post("/similarity", json={"texts": texts}).json()["scores"]) == 1.0


def test_json_content_type_variants_accepted(client):
    for content_type in ("application/json; charset=utf-8", "application/vnd.api+json"):
        response = client.post("/embed", content=b'{"texts": ["hi"]}', headers={"content-type": content_type})
        assert response.status_code == 200, (content_type, response.text)


def test_openapi_and_docs(client):
    schema = client.get("/openapi.json").json()
    assert {"/embed", "/predict", "/similarity", "/health", "/info"} <= set(schema["paths"])
    assert {"EmbedRequest", "PredictRequest", "SimilarityRequest"} <= set(schema["components"]["schemas"])
    assert "pairs" in schema["components"]["schemas"]["PredictRequest"]["properties"]
    assert "pairwise" in schema["components"]["schemas"]["SimilarityRequest"]["properties"]
    docs = client.get("/docs")
    assert docs.status_code == 200 and "swagger-ui" in docs.text


def test_concurrent_load_is_correct_and_batched(server, app, model):
    """8 clients x 25 requests at once: every answer equals `model.encode` of its own text, none dropped."""
    texts = [f"sentence number {i} about {word}" for i, word in enumerate(["cats", "music", "films", "rain"] * 50)]
    expected = {text: vector for text, vector in zip(texts, model.encode(texts))}
    latencies, errors = [], []

    def worker(offset: int) -> int:
        done = 0
        with httpx.Client(base_url=server, timeout=30) as client:
            for i in range(25):
                chunk = texts[(offset * 25 + i) % len(texts) :][:2]
                start = time.perf_counter()
                response = client.post("/embed", json={"texts": chunk})
                latencies.append(time.perf_counter() - start)
                if response.status_code != 200:
                    errors.append(response.text)
                    continue
                got = np.array(response.json()["embeddings"])
                if got.shape[0] != len(chunk) or not all(
                    np.allclose(vector, expected[text], atol=1e-5) for vector, text in zip(got, chunk)
                ):
                    errors.append(f"wrong embedding for {chunk}")
                    continue
                done += 1
        return done

    calls_before, requests_before = app.state.batcher.model_calls, app.state.batcher.requests
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        completed = sum(pool.map(worker, range(8), timeout=60))
    elapsed = time.perf_counter() - start
    assert not errors, errors[:3]
    assert completed == 200 and len(latencies) == 200
    assert elapsed < 60
    # Concurrent requests were merged: fewer model calls than requests.
    assert app.state.batcher.requests - requests_before == 200
    assert app.state.batcher.model_calls - calls_before < 200


# ---------------------------------------------------------------------------------------------------- bad input

LONG = "x" * 501
SURROGATE = "\ud800"


@pytest.mark.parametrize(
    "path, payload, status, message",
    [
        ("/embed", {"texts": "not a list"}, 422, "texts: Input should be a valid list"),
        ("/embed", {"texts": [1, 2]}, 422, "texts[0]: Input should be a valid string"),
        ("/embed", {"texts": ["ok", None]}, 422, "texts[1]: Input should be a valid string"),
        ("/embed", {}, 422, "texts: Field required"),
        ("/embed", ["a", "b"], 422, "body: Input should be a valid dictionary"),
        ("/embed", {"texts": []}, 422, "texts is empty"),
        ("/embed", {"texts": ["x"] * 17}, 413, "texts has 17 texts; at most 16"),
        ("/embed", {"texts": [1] * 17}, 413, "texts has 17 texts; at most 16"),  # counted before the items
        ("/embed", {"texts": [1] * 16}, 422, "texts[4]: Input should be a valid string; and 11 more problems"),
        ("/embed", {"texts": ["a"], **{f"x{i}": 1 for i in range(16)}}, 413, "body has 17 fields; at most 16"),
        ("/embed", {"texts": ["a"], "x": list(range(17))}, 413, "x has 17 items; at most 16 per request"),
        ("/embed", {"texts": ["ok", LONG]}, 422, "texts[1] has 501 characters; at most 500"),
        ("/embed", {"texts": ["ok", SURROGATE]}, 422, "texts[1] holds a lone surrogate (U+D800) at character 0"),
        ("/embed", {"texts": ["ab\udfffc"]}, 422, "texts[0] holds a lone surrogate (U+DFFF) at character 2"),
        ("/embed", {"texts": ["a"], "normalize": "yes"}, 422, "normalize: Input should be a valid boolean"),
        ("/embed", {"texts": ["a"], "normalise": True}, 422, "normalise: Extra inputs are not permitted"),
        ("/predict", {"texts": ["hi"], "tasks": ["sentiment", "nope"]}, 422, "unknown task(s) ['nope']"),
        ("/predict", {"texts": ["hi"], "tasks": []}, 422, "tasks is empty"),
        ("/predict", {"texts": ["hi"], "pairs": [["a", "b"]]}, 422, "send either texts or pairs, not both"),
        ("/predict", {"tasks": ["nli"]}, 422, "send texts (a list of strings) or pairs"),
        ("/predict", {"pairs": []}, 422, "pairs is empty"),
        ("/predict", {"pairs": [["a"]]}, 422, "pairs[0]: List should have at least 2 items"),
        ("/predict", {"pairs": [["a", "b"], ["a", "b", "c"]]}, 422, "pairs[1]: List should have at most 2 items"),
        ("/predict", {"pairs": [["a", 1]]}, 422, "pairs[0][1]: Input should be a valid string"),
        ("/predict", {"pairs": ["a b"]}, 422, "pairs[0]: Input should be a valid list"),
        ("/predict", {"pairs": [["a", "b"]] * 9}, 413, "pairs has 9 pairs (18 texts); at most 16 texts"),
        ("/predict", {"pairs": [1] * 9}, 413, "pairs has 9 pairs (18 texts); at most 16 texts"),
        ("/predict", {"texts": ["hi"], "tasks": ["sentiment"] * 17}, 413, "tasks has 17 items; at most 16"),
        ("/predict", {"pairs": [["a", LONG]]}, 422, "pairs[0][1] has 501 characters; at most 500"),
        ("/predict", {"pairs": [["a", "b"], [SURROGATE, "b"]]}, 422, "pairs[1][0] holds a lone surrogate"),
        ("/predict", {"pairs": [["a", "b"], ["a", " "]]}, 422, "pairs[1][1] is empty: both texts of a pair"),
        ("/predict", {"texts": ["hi"], "tasks": ["nli"]}, 422, "tasks: task(s) ['nli'] take text pairs"),
        ("/predict", {"pairs": [["a", "b"]], "tasks": ["sentiment", "sts"]}, 422, "task(s) ['sentiment'] take single"),
        ("/similarity", {"texts": ["a"], "texts_b": ["b"] * 16}, 413, "texts + texts_b have 17 texts; at most 16"),
        ("/similarity", {"texts": ["a"], "texts_b": []}, 422, "texts_b is empty"),
        ("/similarity", {"texts": []}, 422, "texts is empty"),
        ("/similarity", {"texts": ["a"], "texts_b": [SURROGATE]}, 422, "texts_b[0] holds a lone surrogate"),
        ("/similarity", {"texts": ["a", "b"], "pairwise": True}, 422, "pairwise needs texts_b"),
        ("/similarity", {"texts": ["a", "b"], "texts_b": ["c"], "pairwise": True}, 422, "same length, got 2 and 1"),
        ("/similarity", {"texts": ["a"], "texts_b": ["c"], "pairwise": "true"}, 422, "pairwise: Input should be"),
    ],
)
def test_bad_input(client, path, payload, status, message):
    # json.dumps escapes lone surrogates as "\\ud800" (httpx's json= would fail to encode them as UTF-8).
    response = client.post(path, content=json.dumps(payload), headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    assert message in response.json()["detail"]


@pytest.mark.parametrize(
    "body, headers, status, message",
    [
        (b"texts=hi", {"content-type": "text/plain"}, 415, "Content-Type: application/json' (got 'text/plain')"),
        (b"texts=hi", {"content-type": "application/x-www-form-urlencoded"}, 415, "application/x-www-form-urlencoded"),
        (b"--b\r\n\r\nhi\r\n--b--\r\n", {"content-type": "multipart/form-data; boundary=b"}, 415, "multipart"),
        (b'{"texts": ["hi"]}', {}, 415, "no Content-Type was sent"),
        (b"{not json", {"content-type": "application/json"}, 422, "body is not valid JSON: Expecting property name"),
        (b'{"texts": ["\xff"]}', {"content-type": "application/json"}, 422, "UnicodeDecodeError"),
        (b"[" * 50_000, {"content-type": "application/json"}, 422, "RecursionError"),
        (b"", {"content-type": "application/json"}, 422, "body is empty: send a JSON object"),
        (b'{"texts": ["\xed\xa0\x80"]}', {"content-type": "application/json"}, 422, "texts[0] holds a lone surrogate"),
    ],
)
def test_not_json(client, body, headers, status, message):
    """Bodies that are not JSON objects get 415/422 with a message, never a 500."""
    response = client.post("/embed", content=body, headers=headers)
    assert response.status_code == status, response.text
    assert message in response.json()["detail"]


def test_body_size_is_capped_before_reading(client, app):
    limit = 16 * (6 * 500 + 16) + 65_536  # the default for max_batch_size=16, max_text_length=500
    declared = client.post("/embed", content=b" " * (limit + 1), headers={"content-type": "application/json"})
    assert declared.status_code == 413 and f"Content-Length is {limit + 1} bytes" in declared.json()["detail"]

    def chunks():  # no Content-Length: the size is counted as the body streams in
        for _ in range(limit // 65_536 + 2):
            yield b" " * 65_536

    streamed = client.post("/embed", content=chunks(), headers={"content-type": "application/json"})
    assert streamed.status_code == 413 and f"more than {limit} bytes" in streamed.json()["detail"]
    # The largest valid request (every character a \\u escape) fits under the default limit.
    payload = '{"texts": [' + ",".join(['"' + "\\u00e9" * 500 + '"'] * 16) + "]}"
    assert len(payload) < limit
    ok = client.post("/embed", content=payload.encode(), headers={"content-type": "application/json"})
    assert ok.status_code == 200, ok.text


def test_validation_errors_list_the_first_five(client):
    body = client.post("/embed", json={"texts": [1] * 16}).json()
    assert [error["loc"] for error in body["errors"]] == [["body", "texts", i] for i in range(5)]
    assert body["detail"].count("Input should be a valid string") == 5 and body["detail"].endswith("11 more problems")


@pytest.fixture(scope="module")
def roomy_server(model):
    """Room for bodies of millions of tiny items: the body limit lets them through to the JSON parser."""
    from multitask_st.service import create_app

    with ServerThread(create_app(model, max_batch_size=16, max_text_length=500, max_body_bytes=8_000_000)) as url:
        yield url


MANY = 1_500_000  # tiny invalid items: "1," each, 3 MB in all


@pytest.mark.parametrize(
    "path, template, message",
    [
        ("/embed", '{"texts": ITEMS}', f"texts has {MANY} texts; at most 16 per request"),
        ("/similarity", '{"texts": ["a"], "texts_b": ITEMS}', f"texts_b has {MANY} texts; at most 16 per request"),
        ("/predict", '{"pairs": ITEMS}', f"pairs has {MANY} pairs ({2 * MANY} texts); at most 16 texts per request"),
        ("/predict", '{"texts": ["a"], "tasks": ITEMS}', f"tasks has {MANY} items; at most 16 per request"),
        ("/embed", '{"texts": ["a"], "words": ITEMS}', f"words has {MANY} items; at most 16 per request"),
        ("/embed", '{"texts": ["a"], FIELDS}', "body has 250001 fields; at most 16 per request"),
    ],
)
def test_a_huge_body_of_tiny_items_is_refused_before_validation(roomy_server, path, template, message):
    """Issue 34: millions of invalid items (under the body limit) were each validated and listed in the error, while
    /health waited. Now the count is checked before any item: a short 413 naming field and limit."""
    if "ITEMS" in template:
        body = template.replace("ITEMS", "[" + ",".join(["1"] * MANY) + "]")
    else:
        body = template.replace("FIELDS", ", ".join(f'"k{i}": 1' for i in range(250_000)))
    assert len(body) < 8_000_000
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(
            httpx.post, roomy_server + path, content=body, headers={"content-type": "application/json"}, timeout=300
        )
        assert httpx.get(roomy_server + "/health", timeout=300).status_code == 200
        response = pending.result()
    assert response.status_code == 413, response.text[:300]
    assert len(response.content) < 10_000 and message in response.json()["detail"]
    assert httpx.get(roomy_server + "/health").status_code == 200


def test_wrong_method_and_path(client):
    assert client.get("/embed").status_code == 405
    missing = client.post("/nope", json={})
    assert missing.status_code == 404 and missing.json()["detail"] == "Not Found"


def test_surrogate_fails_only_its_own_request_and_keeps_the_connection(server, model):
    """The issue's case: one request with a lone surrogate among concurrent innocent ones."""
    texts = [f"innocent request {i}" for i in range(7)]
    expected = model.encode(texts)

    def send(index: int) -> httpx.Response:
        batch = ["fine", "\ud800 broken"] if index == 7 else [texts[index]]
        body = json.dumps({"texts": batch})
        return httpx.post(server + "/embed", content=body, headers={"content-type": "application/json"}, timeout=30)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(send, range(8)))
    for index in range(7):
        assert responses[index].status_code == 200, responses[index].text
        np.testing.assert_allclose(responses[index].json()["embeddings"][0], expected[index], atol=1e-5)
    assert responses[7].status_code == 422 and "texts[1] holds a lone surrogate" in responses[7].json()["detail"]

    # The same keep-alive connection serves the next request after the 422.
    connection = http.client.HTTPConnection("127.0.0.1", int(server.rsplit(":", 1)[1]), timeout=30)
    try:
        connection.request(
            "POST", "/embed", body=b'{"texts": ["\\ud800"]}', headers={"content-type": "application/json"}
        )
        first = connection.getresponse()
        assert first.status == 422 and b"lone surrogate" in first.read()
        sock = connection.sock
        connection.request("POST", "/embed", body=b'{"texts": ["fine"]}', headers={"content-type": "application/json"})
        second = connection.getresponse()
        assert second.status == 200 and b"embeddings" in second.read()
        assert connection.sock is sock  # not reset and reopened
    finally:
        connection.close()


# ---------------------------------------------------------------------------------------------------- scheduling


def test_any_model_object_with_the_api_is_served(probe_client, probe, model):
    from modeling_mtl import MultiTaskModel

    assert not isinstance(probe, MultiTaskModel)
    response = probe_client.post("/embed", json={"texts": TEXTS})
    assert response.status_code == 200
    np.testing.assert_allclose(response.json()["embeddings"], model.encode(TEXTS), atol=1e-5)
    assert probe.calls == [TEXTS]
    pairs = probe_client.post("/predict", json={"pairs": [list(PAIRS[0])], "tasks": ["nli"]}).json()
    assert pairs["predictions"][0]["nli"]["label"] == model.predict(PAIRS[0], tasks=["nli"])["nli"]["label"]


def test_create_app_rejects_bad_arguments(model):
    from multitask_st.service import create_app

    with pytest.raises(TypeError, match="has no config, tokenizer, task_names, encode, predict, similarity"):
        create_app(object())
    with pytest.raises(ValueError, match="max_batch_size must be an int >= 1, got 0"):
        create_app(model, max_batch_size=0)
    with pytest.raises(ValueError, match="api_key must be a non-empty string"):
        create_app(model, api_key=" ")


def test_model_failure_fails_only_the_faulty_request(probe_client, probe, probe_app, probe_server, model):
    """Requests merged into one call with an input the model rejects: only that request fails, naming the index."""
    batcher = probe_app.state.batcher
    isolated = batcher.isolated
    holder = hold_model(probe, probe_server)
    batches = [[f"innocent {i}", f"text {i}"] for i in range(4)] + [["fine", "POISON here", "fine too"]]
    with concurrent.futures.ThreadPoolExecutor(5) as pool:
        futures = [pool.submit(post, probe_server, "/embed", {"texts": batch}) for batch in batches]
        wait_for(lambda: len(batcher.jobs) == 6)  # the holder + 5 queued requests
        probe.release.set()
        responses = [future.result() for future in futures]
    assert holder.result().status_code == 200
    for batch, response in zip(batches[:4], responses[:4]):
        assert response.status_code == 200, response.text
        np.testing.assert_allclose(response.json()["embeddings"], model.encode(batch), atol=1e-5)
    assert responses[4].status_code == 422
    assert (
        "texts[1]: the model cannot process this input (ValueError: the backend rejects"
        in responses[4].json()["detail"]
    )
    # They really were merged: one call held the poison and innocent texts together, then it was isolated.
    assert any("POISON here" in call and "innocent 0" in call for call in probe.calls)
    assert batcher.isolated == isolated + 1


def test_model_crash_is_a_500_for_that_request_only(probe_client, probe):
    crash = probe_client.post("/embed", json={"texts": ["ok", "CRASH now"]})
    assert crash.status_code == 500
    assert "texts[1]: the model failed (RuntimeError: backend crashed)" in crash.json()["detail"]
    assert probe_client.post("/embed", json={"texts": ["still serving"]}).status_code == 200


def test_short_request_is_not_stuck_behind_large_ones(probe_client, probe, probe_app, probe_server, model):
    """8 large requests then 1 short one, all queued: the short one rides in the very next model call, calls stay
    within the character budget, and every large request still gets correct results."""
    batcher = probe_app.state.batcher
    holder = hold_model(probe, probe_server)
    large = [[f"request {r} text {i} " + "word " * 80 for i in range(16)] for r in range(8)]
    done_order: list[str] = []

    def send(name: str, texts: list[str]) -> httpx.Response:
        response = post(probe_server, "/embed", {"texts": texts})
        done_order.append(name)
        return response

    with concurrent.futures.ThreadPoolExecutor(9) as pool:
        futures = [pool.submit(send, f"large {r}", texts) for r, texts in enumerate(large)]
        wait_for(lambda: len(batcher.jobs) == 9)
        short = pool.submit(send, "short", ["a short question?"])
        wait_for(lambda: len(batcher.jobs) == 10)
        calls_before = len(probe.calls)
        probe.release.set()
        responses = [future.result() for future in futures]
        assert short.result().status_code == 200
    assert holder.result().status_code == 200
    calls = probe.calls[calls_before:]
    assert "a short question?" in calls[0]  # the first call after the held one
    assert done_order[0] == "short"
    cap = 4 * model.config.max_seq_length
    assert all(sum(min(len(text), cap) + 1 for text in call) <= 2000 for call in calls)
    assert len(calls) >= 8  # the large requests were split into budget-sized calls
    for texts, response in zip(large, responses):
        assert response.status_code == 200
        np.testing.assert_allclose(response.json()["embeddings"], model.encode(texts), atol=1e-5)


def test_work_of_clients_that_left_is_dropped(probe_client, probe, probe_app, probe_server):
    batcher = probe_app.state.batcher
    dropped = batcher.dropped
    holder = hold_model(probe, probe_server)
    with pytest.raises(httpx.TimeoutException):
        post(probe_server, "/embed", {"texts": ["GONE before its turn"]}, timeout=0.5)
    wait_for(lambda: batcher.dropped == dropped + 1)
    assert len(batcher.jobs) == 1  # only the holder is left
    probe.release.set()
    assert holder.result().status_code == 200
    assert probe_client.post("/embed", json={"texts": ["after"]}).status_code == 200
    assert not any("GONE before its turn" in call for call in probe.calls)


# ---------------------------------------------------------------------------------------------------- auth, timeouts


@pytest.mark.parametrize(
    "headers, message",
    [
        ({}, "this server needs an API key"),
        ({"Authorization": "Basic czNjcmV0"}, "this server needs an API key"),
        ({"Authorization": "Bearer wrong"}, "wrong API key"),
        ({"X-API-Key": "wrong"}, "wrong API key"),
        ({"X-API-Key": ""}, "this server needs an API key"),
    ],
)
def test_api_key_required(probe_server, headers, message):
    for method, path in (("POST", "/embed"), ("GET", "/info")):
        response = httpx.request(method, probe_server + path, json={"texts": ["hi"]}, headers=headers)
        assert response.status_code == 401, response.text
        assert message in response.json()["detail"] and "X-API-Key" in response.json()["detail"]
        assert response.headers["www-authenticate"] == "Bearer"


def test_api_key_accepted_and_open_paths(probe_server):
    for headers in ({"Authorization": f"Bearer {API_KEY}"}, {"X-API-Key": API_KEY}):
        assert httpx.post(probe_server + "/embed", json={"texts": ["hi"]}, headers=headers).status_code == 200
    assert httpx.get(probe_server + "/info", headers={"X-API-Key": API_KEY}).json()["api_key_required"] is True
    assert httpx.get(probe_server + "/health").status_code == 200  # Docker's HEALTHCHECK sends no key
    schema = httpx.get(probe_server + "/openapi.json").json()
    assert {"HTTPBearer", "APIKeyHeader"} <= set(schema["components"]["securitySchemes"])
    assert httpx.get(probe_server + "/docs").status_code == 200
    # The key is checked before the body is read: a huge declared body without a key is a 401, not a 413.
    unauthorised = httpx.post(
        probe_server + "/embed", content=b" " * 2_000_000, headers={"content-type": "application/json"}
    )
    assert unauthorised.status_code == 401


def test_idle_keep_alive_connections_are_closed(probe_server):
    """timeout_keep_alive=1: an idle connection is closed by the server about a second after its last response."""
    connection = http.client.HTTPConnection("127.0.0.1", int(probe_server.rsplit(":", 1)[1]), timeout=10)
    try:
        connection.request("GET", "/health")
        response = connection.getresponse()
        assert response.status == 200 and response.read().startswith(b'{"status":"ok"')
        start = time.monotonic()
        assert connection.sock.recv(1) == b""  # the server closed the idle connection
        assert 0.5 < time.monotonic() - start < 5
    finally:
        connection.close()
