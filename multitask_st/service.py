"""HTTP service around a `MultiTaskModel`: embeddings, task predictions and similarities, with OpenAPI/Swagger.

Start it with `mtl serve --model DIR_OR_HUB_ID --host 127.0.0.1 --port 8000`, or build the app yourself:

```python
import uvicorn
from multitask_st.service import create_app

uvicorn.run(create_app("path/to/model"), host="127.0.0.1", port=8000)
```

Concurrent requests are merged by a small micro-batcher: requests that arrive while the model is busy (or within
`batch_wait_ms`) are encoded in one forward pass, which is what makes a CPU/GPU encoder fast.
"""

from __future__ import annotations

import asyncio
import os
import time
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from modeling_mtl import MultiTaskModel


class EmbedRequest(BaseModel):
    texts: list[str] = Field(..., description="Sentences to embed.", examples=[["A man is playing a guitar."]])
    normalize: bool | None = Field(None, description="L2-normalise the vectors (default: the model's setting).")


class EmbedResponse(BaseModel):
    embeddings: list[list[float]]
    dimension: int


class PredictRequest(BaseModel):
    texts: list[str] = Field(..., description="Sentences to run the task heads on.", examples=[["I loved it!"]])
    tasks: list[str] | None = Field(None, description="Tasks to predict (default: all of the model's tasks).")


class PredictResponse(BaseModel):
    predictions: list[dict[str, Any]] = Field(..., description="Per sentence, task -> prediction.")


class SimilarityRequest(BaseModel):
    texts: list[str] = Field(
        ...,
        description="Sentences compared with each other (or with `texts_b`).",
        examples=[["A cat sits on the mat.", "A kitten rests on a rug."]],
    )
    texts_b: list[str] | None = Field(None, description="Optional second list: rows are `texts`, columns `texts_b`.")


class SimilarityResponse(BaseModel):
    scores: list[list[float]] = Field(..., description="Cosine similarities, rows = texts, columns = texts_b.")


class HealthResponse(BaseModel):
    status: str
    uptime_s: float


class TaskInfo(BaseModel):
    name: str
    type: str
    labels: list[str]


class InfoResponse(BaseModel):
    model: str
    backbone: str
    dimension: int
    pooling: str
    normalize: bool
    max_seq_length: int
    tasks: list[TaskInfo]
    max_batch_size: int
    max_text_length: int


class _MicroBatcher:
    """Merges concurrent requests of the same kind into one model call, run off the event loop.

    A single worker drains the queue: it takes the first waiting job, waits at most `wait_s` for more jobs, groups
    compatible ones (same operation and options) up to `max_texts` texts, and runs each group in a thread. One
    worker means the model never runs twice at once (no thread oversubscription of the CPU).
    """

    def __init__(self, model: MultiTaskModel, max_texts: int, wait_s: float):
        self.model = model
        self.max_texts = max_texts
        self.wait_s = wait_s
        self.queue: asyncio.Queue | None = None
        self.worker: asyncio.Task | None = None
        self.model_calls = 0  # how many model calls served how many requests (see /info's `batching`)
        self.requests = 0

    def start(self) -> None:
        self.queue = asyncio.Queue()
        self.worker = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self.worker is not None:
            self.worker.cancel()
            try:
                await self.worker
            except asyncio.CancelledError:
                pass

    async def submit(self, op: str, texts: list[str], key: Any = None) -> Any:
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((op, key, texts, future))
        return await future

    async def _run(self) -> None:
        pending: list = []
        while True:
            if not pending:
                pending.append(await self.queue.get())
            deadline = time.monotonic() + self.wait_s
            while True:
                timeout = deadline - time.monotonic()
                try:
                    job = self.queue.get_nowait() if timeout <= 0 else await asyncio.wait_for(self.queue.get(), timeout)
                except (asyncio.QueueEmpty, asyncio.TimeoutError):
                    break
                pending.append(job)
            # Group the first job with every compatible job that fits; the rest waits for the next round.
            op, key = pending[0][0], pending[0][1]
            group, rest, size = [], [], 0
            for job in pending:
                if job[0] == op and job[1] == key and (not group or size + len(job[2]) <= self.max_texts):
                    group.append(job)
                    size += len(job[2])
                else:
                    rest.append(job)
            pending = rest
            texts = [text for job in group for text in job[2]]
            self.model_calls += 1
            self.requests += len(group)
            try:
                results = await asyncio.to_thread(self._call, op, key, texts)
            except Exception as error:  # hand the failure to every waiting request instead of killing the worker
                for job in group:
                    if not job[3].done():
                        job[3].set_exception(error)
                continue
            start = 0
            for job in group:
                if not job[3].done():  # the client may have gone away
                    job[3].set_result(results[start : start + len(job[2])])
                start += len(job[2])

    def _call(self, op: str, key: Any, texts: list[str]) -> Any:
        if op == "embed":
            return self.model.encode(texts, batch_size=32, normalize=key, show_progress_bar=False)
        if op == "predict":
            return self.model.predict(texts, tasks=list(key) if key is not None else None, show_progress_bar=False)
        raise ValueError(f"unknown operation {op!r}")


def _swagger_static_dir() -> str | None:
    """Swagger UI's JS/CSS shipped by the `fastapi-offline` package (the `serve` extra), so /docs works offline."""
    try:
        import fastapi_offline
    except ImportError:
        return None
    folder = os.path.join(os.path.dirname(fastapi_offline.__file__), "static")
    return folder if os.path.isfile(os.path.join(folder, "swagger-ui-bundle.js")) else None


def create_app(
    model_or_path: MultiTaskModel | str,
    max_batch_size: int = 64,
    max_text_length: int = 10_000,
    batch_wait_ms: float = 2.0,
) -> FastAPI:
    """Build the FastAPI app serving one model.

    Args:
        model_or_path: a loaded `MultiTaskModel`, or a local folder / Hub id to load one from.
        max_batch_size: most texts accepted in one request (more gives HTTP 413).
        max_text_length: most characters per text (longer gives HTTP 422); texts are also truncated to the
            model's `max_seq_length` tokens.
        batch_wait_ms: how long the micro-batcher waits for more concurrent requests before running the model.
    """
    if isinstance(model_or_path, MultiTaskModel):
        model, source = model_or_path, model_or_path.config.name_or_path or "in-memory model"
    else:
        model, source = MultiTaskModel.from_pretrained(model_or_path), str(model_or_path)
    if model.tokenizer is None:
        raise ValueError(f"the model from {source} has no tokenizer; save one beside the weights")
    model.eval()
    config = model.config
    batcher = _MicroBatcher(model, max_texts=max(max_batch_size, 64), wait_s=batch_wait_ms / 1000)
    started = time.monotonic()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        yield
        await batcher.stop()

    static_dir = _swagger_static_dir()
    app = FastAPI(
        title="Multi-task sentence transformer",
        description=f"Sentence embeddings and task predictions from `{source}`.",
        version="0.1.0",
        lifespan=lifespan,
        # Without local Swagger assets FastAPI's /docs loads them from a CDN, which offline machines cannot reach.
        docs_url=None if static_dir else "/docs",
    )
    if static_dir:
        from fastapi.openapi.docs import get_swagger_ui_html
        from fastapi.staticfiles import StaticFiles

        app.mount("/static-docs", StaticFiles(directory=static_dir), name="static-docs")

        @app.get("/docs", include_in_schema=False)
        async def swagger_ui():
            return get_swagger_ui_html(
                openapi_url=app.openapi_url,
                title=f"{app.title} - Swagger UI",
                swagger_js_url="/static-docs/swagger-ui-bundle.js",
                swagger_css_url="/static-docs/swagger-ui.css",
                swagger_favicon_url="/static-docs/favicon.png",
            )

    app.state.model = model
    app.state.batcher = batcher

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        # Keep FastAPI's structured errors, plus one readable sentence naming the field.
        messages = [f"{'.'.join(str(part) for part in item['loc'])}: {item['msg']}" for item in error.errors()]
        return JSONResponse(status_code=422, content={"detail": "; ".join(messages), "errors": error.errors()})

    def check_texts(texts: list[str], field: str = "texts") -> None:
        if not texts:
            raise HTTPException(422, f"{field} is empty: send at least one text")
        if len(texts) > max_batch_size:
            raise HTTPException(413, f"{field} has {len(texts)} texts; at most {max_batch_size} per request")
        for index, text in enumerate(texts):
            if len(text) > max_text_length:
                raise HTTPException(
                    422, f"{field}[{index}] has {len(text)} characters; at most {max_text_length} per text"
                )

    @app.get("/health", response_model=HealthResponse, summary="Liveness check")
    async def health() -> HealthResponse:
        return HealthResponse(status="ok", uptime_s=round(time.monotonic() - started, 3))

    @app.get("/info", response_model=InfoResponse, summary="Tasks, labels, embedding dimension and backbone")
    async def info() -> InfoResponse:
        return InfoResponse(
            model=source,
            backbone=config.backbone_config.model_type,
            dimension=config.embedding_dim,
            pooling=config.pooling,
            normalize=bool(config.normalize),
            max_seq_length=int(config.max_seq_length),
            tasks=[TaskInfo(name=t["name"], type=t["type"], labels=list(t["labels"])) for t in config.tasks],
            max_batch_size=max_batch_size,
            max_text_length=max_text_length,
        )

    @app.post("/embed", response_model=EmbedResponse, summary="Sentence embeddings")
    async def embed(request: EmbedRequest) -> EmbedResponse:
        check_texts(request.texts)
        vectors = await batcher.submit("embed", request.texts, key=request.normalize)
        return EmbedResponse(embeddings=np.asarray(vectors).tolist(), dimension=config.embedding_dim)

    @app.post("/predict", response_model=PredictResponse, summary="Task predictions (all tasks or a subset)")
    async def predict(request: PredictRequest) -> PredictResponse:
        check_texts(request.texts)
        tasks = None
        if request.tasks is not None:
            if not request.tasks:
                raise HTTPException(422, "tasks is empty: leave it out for all tasks, or name at least one")
            unknown = [name for name in request.tasks if name not in model.task_names]
            if unknown:
                raise HTTPException(422, f"unknown task(s) {unknown}; this model's tasks are {model.task_names}")
            tasks = tuple(dict.fromkeys(request.tasks))
        predictions = await batcher.submit("predict", request.texts, key=tasks)
        return PredictResponse(predictions=predictions)

    @app.post("/similarity", response_model=SimilarityResponse, summary="Cosine similarity matrix")
    async def similarity(request: SimilarityRequest) -> SimilarityResponse:
        check_texts(request.texts)
        texts = list(request.texts)
        if request.texts_b is not None:
            check_texts(request.texts_b, "texts_b")
            if len(texts) + len(request.texts_b) > max_batch_size:
                raise HTTPException(
                    413,
                    f"texts + texts_b have {len(texts) + len(request.texts_b)} texts; "
                    f"at most {max_batch_size} per request",
                )
            texts += request.texts_b
        vectors = np.asarray(await batcher.submit("embed", texts, key=True))
        a = vectors[: len(request.texts)]
        b = vectors[len(request.texts) :] if request.texts_b is not None else a
        return SimilarityResponse(scores=(a @ b.T).tolist())

    return app
