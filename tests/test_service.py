"""The HTTP service, run for real: uvicorn on 127.0.0.1 and an httpx client."""

from __future__ import annotations

import concurrent.futures
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
    {"name": "similarity", "type": "regression"},
]
TEXTS = ["I loved this movie!", "John Smith works for Acme Corporation in New York.", "What is the capital?", ""]


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

    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
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


def test_health_and_info(client, model):
    health = client.get("/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    info = client.get("/info").json()
    assert info["dimension"] == model.config.embedding_dim
    assert info["backbone"] == "bert"
    assert [task["name"] for task in info["tasks"]] == ["sentiment", "topics", "ner", "similarity"]
    assert info["tasks"][0]["labels"] == ["negative", "positive"]
    assert info["max_batch_size"] == 16


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
        assert set(got) == {"sentiment", "topics", "ner", "similarity"}
        assert got["sentiment"]["label"] == want["sentiment"]["label"]
        assert got["similarity"]["value"] == pytest.approx(want["similarity"]["value"], abs=1e-5)
        assert [w["word"] for w in got["ner"]["words"]] == [w["word"] for w in want["ner"]["words"]]
    subset = client.post("/predict", json={"texts": TEXTS[:1], "tasks": ["sentiment"]}).json()["predictions"]
    assert list(subset[0]) == ["sentiment"]
    assert set(subset[0]["sentiment"]["scores"]) == {"negative", "positive"}


def test_similarity(client, model):
    vectors = model.encode(TEXTS[:3], normalize=True)
    scores = np.array(client.post("/similarity", json={"texts": TEXTS[:3]}).json()["scores"])
    np.testing.assert_allclose(scores, vectors @ vectors.T, atol=1e-5)
    np.testing.assert_allclose(np.diag(scores), 1.0, atol=1e-5)
    cross = np.array(client.post("/similarity", json={"texts": TEXTS[:2], "texts_b": TEXTS[2:3]}).json()["scores"])
    np.testing.assert_allclose(cross, vectors[:2] @ vectors[2:3].T, atol=1e-5)


@pytest.mark.parametrize(
    "path, payload, status, message",
    [
        ("/embed", {"texts": "not a list"}, 422, "texts"),
        ("/embed", {"texts": [1, 2]}, 422, "texts.0"),
        ("/embed", {}, 422, "texts"),
        ("/embed", {"texts": []}, 422, "texts is empty"),
        ("/embed", {"texts": ["x"] * 17}, 413, "at most 16"),
        ("/embed", {"texts": ["ok", "x" * 501]}, 422, "texts[1] has 501 characters"),
        ("/predict", {"texts": ["hi"], "tasks": ["sentiment", "nope"]}, 422, "unknown task(s) ['nope']"),
        ("/predict", {"texts": ["hi"], "tasks": []}, 422, "tasks is empty"),
        ("/similarity", {"texts": ["a"], "texts_b": ["b"] * 16}, 413, "at most 16"),
        ("/similarity", {"texts": ["a"], "texts_b": []}, 422, "texts_b is empty"),
    ],
)
def test_bad_input(client, path, payload, status, message):
    response = client.post(path, json=payload)
    assert response.status_code == status, response.text
    assert message in response.json()["detail"]


def test_not_json(client):
    response = client.post("/embed", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 422


def test_openapi_and_docs(client):
    schema = client.get("/openapi.json").json()
    assert {"/embed", "/predict", "/similarity", "/health", "/info"} <= set(schema["paths"])
    assert "EmbedRequest" in schema["components"]["schemas"]
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
