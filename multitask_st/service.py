"""HTTP service around a multi-task model: embeddings, task predictions and similarities, with OpenAPI/Swagger.

Start it with `mtl serve --model DIR_OR_HUB_ID --host 127.0.0.1 --port 8000`, or build the app yourself:

```python
import uvicorn
from multitask_st.service import create_app

uvicorn.run(create_app("path/to/model"), host="127.0.0.1", port=8000, timeout_keep_alive=5)
```

Requests do not call the model themselves: a scheduler (`_MicroBatcher`) merges concurrent requests into model calls
of bounded size, shares every call fairly between the requests waiting (a short request is never stuck behind large
ones), drops the work of clients that went away, and runs the model on one worker thread at a time. An input the
model fails on fails only its own request (docs/SERVICE.md).

Every check of a request's texts, pairs and tasks is `validation_mtl`'s, the one the Python API and the command line
run, so the same input gets the same message from each of them (HTTP 422; 413 for a count over a limit).
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import json
import logging
import os
import time
from collections.abc import Callable
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
from fastapi import Depends, FastAPI, HTTPException, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import APIKeyHeader, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, StrictBool
from starlette.exceptions import HTTPException as StarletteHTTPException

from inference_mtl import clip_cosines
from modeling_mtl import MultiTaskModel
from validation_mtl import (
    InputError,
    InputLimitError,
    InputTypeError,
    UserError,
    check_int,
    check_number,
    check_pair,
    check_tasks,
    check_texts,
)

logger = logging.getLogger(__name__)

# What `create_app` needs from a model object: `MultiTaskModel` has it all, and so may another backend (e.g. an
# ONNX runtime session wrapped with the same `encode` / `predict` / `similarity` API).
MODEL_ATTRIBUTES = ("config", "tokenizer", "task_names", "encode", "predict", "similarity")
# Paths that stay open when an API key is set: liveness (Docker's HEALTHCHECK sends no key) and the API description.
OPEN_PATHS = ("/health", "/docs", "/docs/oauth2-redirect", "/openapi.json")
OPEN_PREFIXES = ("/static-docs/",)
JSON_PATHS = ("/embed", "/predict", "/similarity")
# Validation problems a 422 lists (`detail` and `errors`); the rest are counted.
_ERRORS_SHOWN = 5
# Most fields a body may have (a request has at most 3; a few misspelt ones are named by pydantic). More is a 413
# before validation: pydantic names each unknown field, so its time and its error grow with their number.
_MAX_BODY_FIELDS = 16
# Characters of a text that count towards a model call's budget, per token of the model's `max_seq_length`: the
# texts are truncated to that many tokens, so a longer text costs no more.
_CHARS_PER_TOKEN = 4


# ---------------------------------------------------------------------------------------------------- schemas

_Pair = Annotated[list[str], Field(min_length=2, max_length=2)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt field is an error, not silently ignored


class EmbedRequest(_Strict):
    texts: list[str] = Field(..., description="Sentences to embed.", examples=[["A man is playing a guitar."]])
    normalize: StrictBool | None = Field(None, description="L2-normalise the vectors (default: the model's setting).")


class EmbedResponse(BaseModel):
    embeddings: list[list[float]]
    dimension: int


class PredictRequest(_Strict):
    texts: list[str] | None = Field(
        None,
        description="Sentences for the single-text tasks. Send `texts` or `pairs`, not both.",
        examples=[["I loved it!"]],
    )
    pairs: list[_Pair] | None = Field(
        None,
        description="Text pairs `[text, text_pair]` for the pair tasks (see `/info`: tasks with `input: pair`).",
        examples=[[["A man plays a guitar.", "Someone makes music."]]],
    )
    tasks: list[str] | None = Field(
        None, description="Tasks to predict (default: every task that takes this kind of input)."
    )


class PredictResponse(BaseModel):
    predictions: list[dict[str, Any]] = Field(..., description="Per text (or pair), task -> prediction.")


class SimilarityRequest(_Strict):
    texts: list[str] = Field(
        ...,
        description="Sentences compared with each other (or with `texts_b`).",
        examples=[["A cat sits on the mat.", "A kitten rests on a rug."]],
    )
    texts_b: list[str] | None = Field(None, description="Optional second list: rows are `texts`, columns `texts_b`.")
    pairwise: StrictBool = Field(
        False, description="Compare texts[i] with texts_b[i] only (same lengths): one score per pair."
    )


class SimilarityResponse(BaseModel):
    scores: list[list[float]] | list[float] = Field(
        ..., description="Cosine similarities: rows = texts, columns = texts_b; a flat list when `pairwise`."
    )


class HealthResponse(BaseModel):
    status: str
    uptime_s: float


class TaskInfo(BaseModel):
    name: str
    type: str
    labels: list[str]
    input: str = Field(..., description="`text`: send `texts`; `pair`: send `pairs` to /predict.")
    output: str = Field(..., description="What its prediction holds.")


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
    max_body_bytes: int
    api_key_required: bool


# ---------------------------------------------------------------------------------------------------- scheduling


class ItemFailure(Exception):
    """The model failed on one input of a request: `index` into the request's items (None: not pinned down)."""

    def __init__(self, index: int | None, error: BaseException):
        super().__init__(str(error))
        self.index = index
        self.error = error


class _Job:
    """One request's items, served in chunks by the scheduler."""

    _ids = itertools.count()

    def __init__(self, kind: tuple, items: list, costs: list[int], sizes: list[int]):
        self.kind = kind  # (operation, options): only jobs of one kind share a model call
        self.items = items
        self.costs = costs  # characters each item counts towards a call's budget
        self.sizes = sizes  # texts in each item (2 for a pair)
        self.future: asyncio.Future = asyncio.get_running_loop().create_future()
        self.offset = 0  # items [0, offset) are done
        self.pieces: list = []
        self.seq = next(self._ids)
        self.last_served = time.monotonic()  # arrival, then the end of its last model call
        self.cancelled = False

    def remaining_cost(self) -> int:
        return sum(self.costs[self.offset :])

    def fit(self, start: int, chars: float, texts: float) -> tuple[int, int, int]:
        """How many items from `start` fit in `chars` characters and `texts` texts: (items, chars, texts)."""
        count = used_chars = used_texts = 0
        for index in range(start, len(self.items)):
            if used_chars + self.costs[index] > chars or used_texts + self.sizes[index] > texts:
                break
            count += 1
            used_chars += self.costs[index]
            used_texts += self.sizes[index]
        return count, used_chars, used_texts

    def finish(self) -> None:
        if self.future.done():
            return
        if self.pieces and isinstance(self.pieces[0], np.ndarray):
            self.future.set_result(np.concatenate(self.pieces))
        else:
            self.future.set_result([row for piece in self.pieces for row in piece])


class _MicroBatcher:
    """Merges concurrent requests into model calls of bounded size, shared fairly, run off the event loop.

    One worker task plans and runs one model call at a time (in a thread, so the event loop keeps serving):

    - a call holds at most `max_texts` texts and `max_chars` characters (each text counted up to
      4 x `max_seq_length`), so no call runs for long;
    - the requests of a call are those of one kind (operation and options) as the request that has waited longest
      since it was last served, and the call's budget is shared max-min fairly between them: every request that
      needs less than an equal share is served whole, the others get equal chunks. A one-sentence request that
      arrives behind eight large ones rides along in the next call; large requests advance side by side;
    - a request whose client went away is dropped before its turn (`cancel`); its results are never computed;
    - if a merged call fails, each request's part is run alone, then (for the part that fails alone) each item,
      so only the request holding the faulty input fails, with the index of that input.

    `model_calls`, `requests`, `dropped` and `isolated` count what happened (tests and `bench_service.py` read them).
    """

    def __init__(self, call: Callable[[str, Any, list], Any], max_texts: int, max_chars: int, wait_s: float):
        self.call = call
        self.max_texts = max_texts
        self.max_chars = max_chars
        self.wait_s = wait_s
        self.jobs: list[_Job] = []
        self.worker: asyncio.Task | None = None
        self._wakeup: asyncio.Event | None = None
        self.model_calls = 0  # model calls made
        self.requests = 0  # requests answered (results or errors)
        self.dropped = 0  # requests whose clients went away before their work was done
        self.isolated = 0  # failed merged calls re-run part by part

    def start(self) -> None:
        if self.worker is None or self.worker.done():
            self._wakeup = asyncio.Event()
            self.worker = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self.worker is not None:
            self.worker.cancel()
            try:
                await self.worker
            except asyncio.CancelledError:
                pass
            self.worker = None

    def submit(self, kind: tuple, items: list, costs: list[int], sizes: list[int]) -> _Job:
        self.start()  # started by the app's lifespan; also lazily, for servers that skip lifespan events
        job = _Job(kind, items, costs, sizes)
        self.jobs.append(job)
        self._wakeup.set()
        return job

    def cancel(self, job: _Job) -> None:
        """Forget a job (its client went away): it gets no further model time."""
        if not job.cancelled and not job.future.done():
            job.cancelled = True
            self.dropped += 1
            job.future.cancel()
        if job in self.jobs:
            self.jobs.remove(job)

    async def _run(self) -> None:
        while True:
            self.jobs = [job for job in self.jobs if not job.cancelled and not job.future.done()]
            if not self.jobs:
                self._wakeup.clear()
                await self._wakeup.wait()
                if self.wait_s > 0:  # let concurrent requests arrive, so they share the first call
                    await asyncio.sleep(self.wait_s)
                continue
            parts = self._plan()
            try:
                await self._execute(parts)
            except asyncio.CancelledError:
                raise
            except Exception as error:  # a bug here must not stop the worker: fail the jobs involved instead
                logger.exception("batching worker error")
                for job, _, _ in parts:
                    if not job.future.done():
                        job.future.set_exception(error)

    def _plan(self) -> list[tuple[_Job, int, int]]:
        """The next model call: `(job, start, end)` item ranges, all of one kind."""
        head = min(self.jobs, key=lambda job: (job.last_served, job.seq))
        group = [job for job in self.jobs if job.kind == head.kind]
        take = dict.fromkeys(group, 0)
        chars, texts = float(self.max_chars), float(self.max_texts)
        # Max-min fair shares: smallest remaining work first; each job gets at most an equal share of what is left.
        by_need = sorted(group, key=lambda job: (job.remaining_cost(), job.last_served, job.seq))
        for position, job in enumerate(by_need):
            left = len(by_need) - position
            count, used_chars, used_texts = job.fit(job.offset, chars / left, texts // left)
            take[job], chars, texts = count, chars - used_chars, texts - used_texts
        # Budget left over (shares that did not divide into whole texts): fill it, least recently served first.
        for job in sorted(group, key=lambda job: (job.last_served, job.seq)):
            count, used_chars, used_texts = job.fit(job.offset + take[job], chars, texts)
            take[job], chars, texts = take[job] + count, chars - used_chars, texts - used_texts
        if not any(take.values()):  # one item over the budget on its own: it still has to run
            take[head] = 1
        return [(job, job.offset, job.offset + take[job]) for job in group if take[job]]

    async def _execute(self, parts: list[tuple[_Job, int, int]]) -> None:
        op, key = parts[0][0].kind
        items = [item for job, start, end in parts for item in job.items[start:end]]
        self.model_calls += 1
        try:
            result = await asyncio.to_thread(self.call, op, key, items)
        except asyncio.CancelledError:
            raise
        except BaseException as error:  # includes the tokenizer's Rust panics (BaseException subclasses)
            self.isolated += 1 if len(parts) > 1 or parts[0][2] - parts[0][1] > 1 else 0
            outcomes = [await self._isolate(op, key, job, start, end, error, len(parts)) for job, start, end in parts]
        else:
            outcomes, position = [], 0
            for _, start, end in parts:
                outcomes.append(result[position : position + end - start])
                position += end - start
        now = time.monotonic()
        for (job, _, end), outcome in zip(parts, outcomes):
            job.last_served = now
            if job.cancelled or job.future.done():
                continue
            if isinstance(outcome, BaseException):
                self.requests += 1
                job.future.set_exception(outcome)
                continue
            job.pieces.append(outcome)
            job.offset = end
            if end == len(job.items):
                self.requests += 1
                job.finish()

    async def _isolate(self, op: str, key: Any, job: _Job, start: int, end: int, error: BaseException, parts: int):
        """Outcome of one job's part after a failed call: its results, or an `ItemFailure` naming the bad item."""
        if job.cancelled:
            return ItemFailure(None, error)
        if parts > 1:  # the failure may belong to another request: run this part alone
            try:
                self.model_calls += 1
                return await asyncio.to_thread(self.call, op, key, job.items[start:end])
            except asyncio.CancelledError:
                raise
            except BaseException as part_error:
                error = part_error
        if end - start == 1:
            return ItemFailure(start, error)
        for index in range(start, end):  # pin the failure to one item: the first that fails alone
            try:
                self.model_calls += 1
                await asyncio.to_thread(self.call, op, key, job.items[index : index + 1])
            except asyncio.CancelledError:
                raise
            except BaseException as item_error:
                return ItemFailure(index, item_error)
        return ItemFailure(None, error)


# ---------------------------------------------------------------------------------------------------- middleware


def _json_response(status: int, detail: str, headers: list[tuple[bytes, bytes]] = ()) -> tuple[dict, dict]:
    body = json.dumps({"detail": detail}).encode()
    start = {
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers],
    }
    return start, {"type": "http.response.body", "body": body}


class _RequestGuard:
    """ASGI middleware that runs before any body is parsed: API key (401), JSON content type (415), body size (413).

    The body is read here, counted as it streams in, and handed to the app only when it is within `max_body_bytes`;
    a `Content-Length` over the limit is refused without reading anything.
    """

    def __init__(self, app, api_key: str | None, max_body_bytes: int):
        self.app = app
        self.api_key = api_key.encode() if api_key else None
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers: dict[str, str] = {}
        for name, value in scope["headers"]:
            headers[name.decode("latin-1").lower()] = value.decode("latin-1")
        path = scope["path"]
        if self.api_key and path not in OPEN_PATHS and not path.startswith(OPEN_PREFIXES):
            problem = self._key_problem(headers)
            if problem:
                await self._refuse(send, 401, problem, [(b"www-authenticate", b"Bearer")])
                return
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            await self._refuse(send, 413, self._too_large(f"Content-Length is {int(length)} bytes"))
            return
        if scope["method"] == "POST" and path in JSON_PATHS:
            content_type = headers.get("content-type", "").split(";")[0].strip().lower()
            if content_type != "application/json" and not content_type.endswith("+json"):
                shown = f"got {content_type!r}" if content_type else "no Content-Type was sent"
                await self._refuse(send, 415, f"send the body as JSON with 'Content-Type: application/json' ({shown})")
                return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away while sending
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body_bytes:
                await self._refuse(send, 413, self._too_large(f"more than {self.max_body_bytes} bytes were sent"))
                return
            if not message.get("more_body", False):
                break
        replay = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def buffered_receive():
            return replay.pop() if replay else await receive()

        await self.app(scope, buffered_receive, send)

    def _key_problem(self, headers: dict[str, str]) -> str | None:
        supplied = headers.get("x-api-key")
        authorization = headers.get("authorization", "")
        if supplied is None and authorization[:7].lower() == "bearer ":
            supplied = authorization[7:].strip()
        how = "send it as 'Authorization: Bearer <key>' or 'X-API-Key: <key>'"
        if not supplied:
            return f"this server needs an API key: {how}"
        # Header values arrive as latin-1 text: encoding back gives the bytes sent, compared with the key's UTF-8.
        if not hmac.compare_digest(supplied.encode("latin-1"), self.api_key):
            return f"wrong API key ({how})"
        return None

    def _too_large(self, what: str) -> str:
        return f"request body too large: {what}; at most {self.max_body_bytes} bytes per request"

    @staticmethod
    async def _refuse(send, status: int, detail: str, headers: list[tuple[bytes, bytes]] = ()) -> None:
        if status == 413:  # the rest of the body is not read: the connection cannot be reused
            headers = [*headers, (b"connection", b"close")]
        start, body = _json_response(status, detail, headers)
        await send(start)
        await send(body)


# ---------------------------------------------------------------------------------------------------- the app


@contextmanager
def _as_http_error():
    """A check's `UserError` as the request's HTTP error: 413 for a count over a limit, 422 for the rest."""
    try:
        yield
    except InputLimitError as error:
        raise HTTPException(413, str(error)) from None
    except UserError as error:
        raise HTTPException(422, str(error)) from None


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("multitask-sentence-transformer")
    except PackageNotFoundError:  # run from a source folder that was never installed
        return "unknown"


def _swagger_static_dir() -> str | None:
    """Swagger UI's JS/CSS shipped by the `fastapi-offline` package (the `serve` extra), so /docs works offline."""
    try:
        import fastapi_offline
    except ImportError:
        return None
    folder = os.path.join(os.path.dirname(fastapi_offline.__file__), "static")
    return folder if os.path.isfile(os.path.join(folder, "swagger-ui-bundle.js")) else None


def display_name(name_or_path: str | os.PathLike | None) -> str:
    """What the service shows as the model's name: a local path becomes its folder name (the server's file system
    stays private); a Hub id (`user/model`) is shown as it is."""
    if not name_or_path:
        return "in-memory model"
    text = os.fspath(name_or_path)
    if os.path.isabs(text) or text.startswith(("./", "../", "~")) or os.path.exists(text):
        return os.path.basename(os.path.normpath(text)) or "model"
    return text


def _check_model(model: Any) -> None:
    missing = [name for name in MODEL_ATTRIBUTES if not hasattr(model, name)]
    if missing:
        raise InputTypeError(
            f"create_app needs a model folder, a Hub id, or a loaded model with {', '.join(MODEL_ATTRIBUTES)}; "
            f"this {type(model).__name__} has no {', '.join(missing)}"
        )


def _locate(field: str) -> Callable[[int], str]:
    return lambda index: f"{field}[{index}]"


@dataclass(frozen=True)
class _Limits:
    """The request and scheduling limits of one app (see `create_app`)."""

    max_batch_size: int
    max_text_length: int
    max_body_bytes: int
    max_call_chars: int
    batch_wait_ms: float

    @classmethod
    def checked(
        cls,
        max_batch_size: Any,
        max_text_length: Any,
        batch_wait_ms: Any,
        max_body_bytes: Any,
        max_call_chars: Any,
    ) -> _Limits:
        """The limits `create_app` was given, checked; `max_body_bytes=None` follows from the text limits."""
        max_batch_size = check_int("max_batch_size", max_batch_size, minimum=1)
        max_text_length = check_int("max_text_length", max_text_length, minimum=1)
        max_call_chars = check_int("max_call_chars", max_call_chars, minimum=1)
        check_number("batch_wait_ms", batch_wait_ms, minimum=0)
        if max_body_bytes is None:
            max_body_bytes = max_batch_size * (6 * max_text_length + 16) + 65_536
        max_body_bytes = check_int("max_body_bytes", max_body_bytes, minimum=1)
        return cls(max_batch_size, max_text_length, max_body_bytes, max_call_chars, batch_wait_ms)


def _check_api_key(api_key: Any) -> None:
    if api_key is not None and (not isinstance(api_key, str) or not api_key.strip()):
        raise InputError("api_key must be a non-empty string (or None for no authentication)")


def _load_model(model_or_path: Any, model_name: str | None) -> tuple[Any, str]:
    """The model to serve, in eval mode (loaded when given a folder or Hub id), and the name the service shows."""
    if isinstance(model_or_path, (str, os.PathLike)):
        model = MultiTaskModel.from_pretrained(model_or_path)
        name = model_name or display_name(model_or_path)
    else:
        model = model_or_path
        _check_model(model)
        name = model_name or display_name(getattr(model.config, "name_or_path", None))
    if model.tokenizer is None:
        raise InputError(f"the model {name} has no tokenizer; save one beside the weights")
    if callable(getattr(model, "eval", None)):
        model.eval()
    return model, name


# ---------------------------------------------------------------------------------------------------- endpoints


class _ClientGone(Exception):
    """The client disconnected while its request waited: nothing to answer."""


async def _wait_for_disconnect(request: Request) -> None:
    # The body has been read, so the next ASGI message is `http.disconnect`, sent when the client closes the
    # connection (or when the response is complete, by which time this task is cancelled).
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class _Routes:
    """The endpoints of one app: one method per route, sharing the model, its tasks, the limits and the scheduler.

    Each endpoint checks its request against the limits (HTTP 413/422 with a message naming the field), then hands
    the texts to the scheduler (`run`) and shapes the model's results into the response.
    """

    def __init__(self, model: Any, name: str, limits: _Limits, api_key_required: bool):
        self.model = model
        self.name = name
        self.limits = limits
        self.api_key_required = api_key_required
        self.config = config = model.config
        self.pair_tasks = [name for name in model.task_names if config.task(name).takes_pairs]
        self.text_tasks = [name for name in model.task_names if name not in self.pair_tasks]
        self.max_seq_length = int(config.max_seq_length)
        self.text_cost_cap = _CHARS_PER_TOKEN * self.max_seq_length
        self.batcher = _MicroBatcher(
            self._call,
            max_texts=max(limits.max_batch_size, 64),
            max_chars=limits.max_call_chars,
            wait_s=limits.batch_wait_ms / 1000,
        )
        self.started = time.monotonic()

    @asynccontextmanager
    async def lifespan(self, app: FastAPI):
        self.batcher.start()
        yield
        await self.batcher.stop()

    # ------------------------------------------------------------------------------------ model calls

    def _call(self, op: str, key: Any, items: list) -> Any:
        """One model call of the scheduler (on its worker thread)."""
        if op == "embed":
            return self.model.encode(items, batch_size=32, normalize=key, show_progress_bar=False)
        if op == "predict":
            return self.model.predict(items, tasks=list(key) if key is not None else None, show_progress_bar=False)
        if op == "predict_pairs":
            tasks = list(key) if key is not None else None
            return self.model.predict([tuple(pair) for pair in items], tasks=tasks, show_progress_bar=False)
        raise ValueError(f"unknown operation {op!r}")

    def _cost(self, text: str) -> int:
        return min(len(text), self.text_cost_cap) + 1

    async def run(self, request: Request, kind: tuple, items: list, locate: Callable[[int], str], pairs: bool = False):
        """The results for a request's items, from the scheduler; an input the model fails on is the request's error."""
        costs = [self._cost(a) + self._cost(b) for a, b in items] if pairs else [self._cost(text) for text in items]
        job = self.batcher.submit(kind, items, costs, [2 if pairs else 1] * len(items))
        disconnected = asyncio.ensure_future(_wait_for_disconnect(request))
        try:
            await asyncio.wait({job.future, disconnected}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            self.batcher.cancel(job)
            raise
        finally:
            disconnected.cancel()
        if not job.future.done():  # the client went away before its work was done: drop it
            self.batcher.cancel(job)
            raise _ClientGone()
        try:
            return job.future.result()
        except ItemFailure as error:
            where = locate(error.index) if error.index is not None else locate(0).split("[")[0]
            reason = f"{type(error.error).__name__}: {error.error}"
            if isinstance(error.error, (UserError, ValueError, TypeError)) or not isinstance(error.error, Exception):
                raise HTTPException(422, f"{where}: the model cannot process this input ({reason})") from None
            logger.error("model failure on %s", where, exc_info=error.error)
            raise HTTPException(500, f"{where}: the model failed ({reason})") from None

    # ------------------------------------------------------------------------------------ request checks
    #
    # The rules are `validation_mtl`'s (the Python API and the command line run the same ones); here they get the
    # request's limits, and their errors become HTTP errors naming the field.

    def check_texts(self, texts: list[str], field: str) -> None:
        with _as_http_error():
            check_texts(
                texts,
                field,
                max_items=self.limits.max_batch_size,
                max_chars=self.limits.max_text_length,
                allow_empty=False,
            )

    def check_pair_count(self, count: int) -> None:
        limit = self.limits.max_batch_size
        if 2 * count > limit:  # a pair is two texts
            raise HTTPException(413, f"pairs has {count} pairs ({2 * count} texts); at most {limit} texts per request")

    async def check_sizes(self, request: Request) -> None:
        """The body's field count and every list in it within the limits (413), before pydantic validates any item.

        pydantic reports every bad item, so a body under the byte limit holding millions of tiny bad items
        (`{"texts": [1, 1, ...]}`) costs time and memory in proportion, and an error listing each, while the event
        loop (`/health` too) waits (measured in docs/SERVICE.md#scheduling). A route dependency runs after FastAPI
        has parsed the JSON (cached on the request: it is not parsed twice) and before the body is validated. The
        list rules are the endpoints' own (`check_texts`, `check_pair_count`), applied early; a list without one
        (`tasks`, an unknown field) may hold `max_batch_size` items.
        """
        try:
            body = await request.json()
        except (ValueError, RecursionError):  # not JSON that FastAPI parsed: its own error answers the request
            return
        if not isinstance(body, dict):
            return
        if len(body) > _MAX_BODY_FIELDS:
            raise HTTPException(413, f"body has {len(body)} fields; at most {_MAX_BODY_FIELDS} per request")
        limit = self.limits.max_batch_size
        for field, value in body.items():
            if not isinstance(value, list):
                continue
            if field == "pairs":
                self.check_pair_count(len(value))
            elif len(value) > limit:
                if field in ("texts", "texts_b"):
                    self.check_texts(value, field)  # counts before it looks at any item: its 413
                raise HTTPException(413, f"{field} has {len(value)} items; at most {limit} per request")

    def _check_predict_inputs(self, body: PredictRequest) -> bool:
        """Exactly one of `texts` and `pairs`, within the limits; True when the request sends pairs."""
        if body.texts is not None and body.pairs is not None:
            raise HTTPException(422, "send either texts or pairs, not both (pair tasks take pairs, the others texts)")
        if body.texts is None and body.pairs is None:
            raise HTTPException(422, "send texts (a list of strings) or pairs (a list of [text, text_pair] lists)")
        if body.pairs is None:
            self.check_texts(body.texts, "texts")
            return False
        if not body.pairs:
            raise HTTPException(422, "pairs is empty: send at least one [text, text_pair]")
        self.check_pair_count(len(body.pairs))
        with _as_http_error():
            for index, (a, b) in enumerate(body.pairs):
                check_pair(a, b, f"pairs[{index}]", self.limits.max_text_length)
        return True

    def _predict_tasks(self, tasks: list[str] | None, pairs: bool) -> tuple[str, ...] | None:
        """The tasks a /predict request asks for (None: all those taking its kind of input), checked."""
        with _as_http_error():
            chosen = check_tasks(tasks, self.config, pairs, pair_input='"pairs": a list of [text, text_pair] lists')
        return None if chosen is None else tuple(chosen)

    def _check_similarity_inputs(self, body: SimilarityRequest) -> list[str]:
        """`texts` (and `texts_b`) within the limits and fit for `pairwise`: all the texts to embed."""
        self.check_texts(body.texts, "texts")
        if body.texts_b is not None:
            self.check_texts(body.texts_b, "texts_b")
        texts = list(body.texts) + list(body.texts_b or [])
        if len(texts) > self.limits.max_batch_size:  # each list fits; together they are one request's texts
            raise HTTPException(
                413, f"texts + texts_b have {len(texts)} texts; at most {self.limits.max_batch_size} per request"
            )
        if body.pairwise:
            if body.texts_b is None:
                raise HTTPException(422, "pairwise needs texts_b: one score per (texts[i], texts_b[i])")
            if len(body.texts_b) != len(body.texts):
                raise HTTPException(
                    422,
                    f"pairwise needs texts and texts_b of the same length, got {len(body.texts)} and "
                    f"{len(body.texts_b)}",
                )
        return texts

    # ------------------------------------------------------------------------------------ endpoints

    async def health(self) -> HealthResponse:
        return HealthResponse(status="ok", uptime_s=round(time.monotonic() - self.started, 3))

    async def info(self) -> InfoResponse:
        config = self.config
        backbone = getattr(getattr(config, "backbone_config", None), "model_type", None)
        return InfoResponse(
            model=self.name,
            backbone=str(backbone or "unknown"),
            dimension=int(config.embedding_dim),
            pooling=str(getattr(config, "pooling", "unknown")),
            normalize=bool(getattr(config, "normalize", False)),
            max_seq_length=self.max_seq_length,
            tasks=[
                TaskInfo(
                    name=task.name,
                    type=task.type,
                    labels=list(task.labels or []),
                    input="pair" if task.takes_pairs else "text",
                    output=task.predict_hint,
                )
                for task in config.task_objects()
            ],
            max_batch_size=self.limits.max_batch_size,
            max_text_length=self.limits.max_text_length,
            max_body_bytes=self.limits.max_body_bytes,
            api_key_required=self.api_key_required,
        )

    async def embed(self, body: EmbedRequest, request: Request) -> EmbedResponse:
        self.check_texts(body.texts, "texts")
        vectors = await self.run(request, ("embed", body.normalize), body.texts, _locate("texts"))
        return EmbedResponse(embeddings=np.asarray(vectors).tolist(), dimension=int(self.config.embedding_dim))

    async def predict(self, body: PredictRequest, request: Request) -> PredictResponse:
        pairs = self._check_predict_inputs(body)
        tasks = self._predict_tasks(body.tasks, pairs)
        if pairs:
            items = [tuple(pair) for pair in body.pairs]
            predictions = await self.run(request, ("predict_pairs", tasks), items, _locate("pairs"), pairs=True)
        else:
            predictions = await self.run(request, ("predict", tasks), body.texts, _locate("texts"))
        return PredictResponse(predictions=predictions)

    async def similarity(self, body: SimilarityRequest, request: Request) -> SimilarityResponse:
        texts = self._check_similarity_inputs(body)
        count = len(body.texts)

        def locate(index: int) -> str:
            return f"texts[{index}]" if index < count else f"texts_b[{index - count}]"

        vectors = np.asarray(await self.run(request, ("embed", True), texts, locate))
        a = vectors[:count]
        b = vectors[count:] if body.texts_b is not None else a
        if body.pairwise:
            return SimilarityResponse(scores=clip_cosines(np.einsum("nd,nd->n", a, b)).tolist())
        return SimilarityResponse(scores=clip_cosines(a @ b.T).tolist())


def _add_routes(app: FastAPI, routes: _Routes, secured: list) -> None:
    """The API: one route per `_Routes` endpoint; `secured` declares the API key on all but /health; the endpoints
    with a body check its sizes before validating it (`check_sizes`)."""
    with_body = [*secured, Depends(routes.check_sizes)]
    app.add_api_route(
        "/health",
        routes.health,
        methods=["GET"],
        response_model=HealthResponse,
        summary="Liveness check (never needs the API key)",
    )
    app.add_api_route(
        "/info",
        routes.info,
        methods=["GET"],
        response_model=InfoResponse,
        summary="Tasks (and which take pairs), labels, embedding dimension, limits",
        dependencies=secured,
    )
    app.add_api_route(
        "/embed",
        routes.embed,
        methods=["POST"],
        response_model=EmbedResponse,
        summary="Sentence embeddings",
        dependencies=with_body,
    )
    app.add_api_route(
        "/predict",
        routes.predict,
        methods=["POST"],
        response_model=PredictResponse,
        summary="Task predictions for texts or text pairs (all tasks or a subset)",
        dependencies=with_body,
    )
    app.add_api_route(
        "/similarity",
        routes.similarity,
        methods=["POST"],
        response_model=SimilarityResponse,
        summary="Cosine similarity matrix, or one score per pair",
        dependencies=with_body,
    )


def _security(api_key: str | None) -> list:
    """The key is checked by `_RequestGuard` (before the body is read); these only declare it in the OpenAPI schema,
    so Swagger UI shows an "Authorize" button."""
    if not api_key:
        return []
    return [Security(HTTPBearer(auto_error=False)), Security(APIKeyHeader(name="X-API-Key", auto_error=False))]


# ---------------------------------------------------------------------------------------------------- errors


async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    # One readable sentence naming each field (`texts[1]`), plus the structured list without the inputs (which
    # can be large, or bytes that JSON cannot hold). Only the first few problems: the answer to a body of many bad
    # items (up to `max_batch_size` per list, any number of unknown fields) stays small.
    messages, errors = [], []
    problems = error.errors()
    for item in problems[:_ERRORS_SHOWN]:
        loc = list(item.get("loc", ()))
        path = loc[1:] if loc[:1] == ["body"] and len(loc) > 1 else loc
        field = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in path).lstrip(".")
        if item.get("type") == "missing" and not path[1:] and path[:1] == ["body"]:
            messages.append('body is empty: send a JSON object, e.g. {"texts": ["..."]}')
        elif item.get("type") == "json_invalid":
            reason = (item.get("ctx") or {}).get("error", "")
            messages.append(f"body is not valid JSON: {reason} (at character {path[-1] if path else '?'})")
        else:
            messages.append(f"{field or 'body'}: {item.get('msg', 'invalid')}")
        loc = [part if isinstance(part, int) else str(part) for part in loc]
        errors.append({"loc": loc, "msg": str(item.get("msg", "")), "type": str(item.get("type", ""))})
    if len(problems) > _ERRORS_SHOWN:
        messages.append(f"and {len(problems) - _ERRORS_SHOWN} more problems")
    return JSONResponse(status_code=422, content={"detail": "; ".join(messages), "errors": errors})


async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
    cause = error.__cause__
    if error.status_code == 400 and cause is not None:  # FastAPI could not parse the body (bad UTF-8, nesting)
        detail = f"body is not valid JSON: {type(cause).__name__}: {str(cause)[:200]}"
        return JSONResponse(status_code=422, content={"detail": detail})
    return JSONResponse(status_code=error.status_code, content={"detail": error.detail}, headers=error.headers)


async def _internal_error(request: Request, error: Exception) -> JSONResponse:
    logger.error("unhandled error on %s", request.url.path, exc_info=error)
    detail = f"internal server error ({type(error).__name__}); the server log has the details"
    return JSONResponse(status_code=500, content={"detail": detail})


async def _client_gone(request: Request, error: Exception) -> Response:
    return Response(status_code=499)  # nobody reads it: the connection is gone


def _add_error_handlers(app: FastAPI) -> None:
    """Every error is JSON with a readable `detail`."""
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _internal_error)
    app.add_exception_handler(_ClientGone, _client_gone)


def _serve_swagger_ui(app: FastAPI, static_dir: str) -> None:
    """/docs from local Swagger UI assets, mounted under /static-docs."""
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


def create_app(
    model_or_path: Any,
    max_batch_size: int = 64,
    max_text_length: int = 10_000,
    batch_wait_ms: float = 2.0,
    *,
    model_name: str | None = None,
    api_key: str | None = None,
    max_body_bytes: int | None = None,
    max_call_chars: int = 32_768,
) -> FastAPI:
    """Build the FastAPI app serving one model.

    Args:
        model_or_path: a local model folder or Hub id (loaded with `MultiTaskModel.from_pretrained`), or a loaded
            model: a `MultiTaskModel` or any object with `config` (`tasks`, `embedding_dim`, `max_seq_length`, ...),
            `tokenizer`, `task_names`, `encode`, `predict` and `similarity` with the same signatures.
        max_batch_size: most texts in one request (a pair counts as two; more gives HTTP 413).
        max_text_length: most characters per text (longer gives HTTP 422); texts are also truncated to the
            model's `max_seq_length` tokens.
        batch_wait_ms: how long the scheduler waits for more concurrent requests after being idle.
        model_name: the name `/info` and the OpenAPI description show (default: the folder name of a local path,
            or the Hub id; never the full local path).
        api_key: when set, every endpoint except `/health`, `/docs` and `/openapi.json` needs this key
            (`Authorization: Bearer <key>` or `X-API-Key: <key>`; HTTP 401 otherwise).
        max_body_bytes: largest request body (HTTP 413 beyond, checked before the body is read). Default: enough
            for `max_batch_size` texts of `max_text_length` characters, each written as `\\uXXXX` escapes.
        max_call_chars: most characters per model call (each text counted up to 4 x `max_seq_length`): large
            requests are split into calls of this size and share them with the requests waiting beside them.
    """
    limits = _Limits.checked(max_batch_size, max_text_length, batch_wait_ms, max_body_bytes, max_call_chars)
    _check_api_key(api_key)
    model, name = _load_model(model_or_path, model_name)
    routes = _Routes(model, name, limits, api_key_required=bool(api_key))

    static_dir = _swagger_static_dir()
    app = FastAPI(
        title="Multi-task sentence transformer",
        description=f"Sentence embeddings, task predictions and similarities from `{name}`.",
        version=_package_version(),
        lifespan=routes.lifespan,
        # Without local Swagger assets FastAPI's /docs loads them from a CDN, which offline machines cannot reach.
        docs_url=None if static_dir else "/docs",
    )
    if static_dir:
        _serve_swagger_ui(app, static_dir)
    app.add_middleware(_RequestGuard, api_key=api_key, max_body_bytes=limits.max_body_bytes)
    app.state.model = model
    app.state.batcher = routes.batcher
    app.state.model_name = name
    _add_error_handlers(app)
    _add_routes(app, routes, _security(api_key))
    return app
