"""Inference engine of the multi-task sentence transformer: `encode`, `predict` and `similarity`.

`modeling_mtl.MultiTaskModel` inherits these methods from `MultiTaskInferenceMixin`; the model file holds only the
model proper (config, modules, forward, losses). This file travels with every checkpoint beside `modeling_mtl.py`
(relative import), so it stays self-contained: standard library, numpy, torch, transformers.

How it is fast (measured in docs/BENCHMARKS.md): every text is tokenised once, in one call, and packed into a flat
int32 array; texts are sorted by token count and cut into batches that pad at most 10% of a row (`plan_batches`);
on CPU, batches run side by side on worker threads (`run_concurrently`), because one small batch cannot keep several
cores busy; results come back in input order. Inputs are checked by `validation_mtl`, the same checks the command
line and the service run.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F
from transformers.utils import logging

try:  # inside a Hub/remote-code package
    from .tasks_mtl import group_entities
    from .validation_mtl import (
        InputError,
        InputTypeError,
        UserError,
        check_batch_size,
        check_flag,
        check_int,
        check_max_seq_length,
        check_pair,
        check_tasks,
        check_text,
        check_texts,
        check_words,
        requested_tasks,
    )
except ImportError:  # installed as top-level modules, or run from the project folder
    from tasks_mtl import group_entities
    from validation_mtl import (
        InputError,
        InputTypeError,
        UserError,
        check_batch_size,
        check_flag,
        check_int,
        check_max_seq_length,
        check_pair,
        check_tasks,
        check_text,
        check_texts,
        check_words,
        requested_tasks,
    )

logger = logging.get_logger(__name__)

# Work bound for over-long inputs: a text is cut at a word boundary after this many characters per token of the
# truncation length before tokenising (a 50 MB line then costs what its first few thousand characters cost). No
# tokenizer in use emits a token for fewer than 1 in 32 characters of ordinary text; when a cut text still yields
# fewer tokens than the limit (runs of whitespace, say), the whole text is tokenised, so results never change.
_CHARS_PER_TOKEN_BOUND = 32
# Token tasks read a text longer than `max_seq_length` tokens in windows (`_window_encoding`) that share this fraction
# of their text tokens with the next window: each token is read from the window where it lies farthest from a cut
# edge (`window_choice`), so it has at least half the overlap of context on either side wherever the text has any.
_WINDOW_OVERLAP = 0.25


class PackedTokens:
    """Token ids of many texts in one flat int32 array (`ids`), with each text's `lengths` and `starts`, and their
    token type ids (`types`, int8, same layout) for texts that carry segments (a joint text pair)."""

    def __init__(self, ids: np.ndarray, lengths: np.ndarray, types: np.ndarray | None = None):
        self.ids = ids
        self.lengths = lengths
        self.starts = np.cumsum(lengths) - lengths
        self.types = types

    @classmethod
    def from_lists(cls, rows: list[list[int]], types: list[list[int]] | None = None) -> PackedTokens:
        lengths = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
        count = int(lengths.sum())
        ids = np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int32, count=count)
        packed_types = None
        if types is not None:
            packed_types = np.fromiter(itertools.chain.from_iterable(types), dtype=np.int8, count=count)
        return cls(ids, lengths, packed_types)

    @classmethod
    def concatenate(cls, parts: list[PackedTokens]) -> PackedTokens:
        if not parts:
            return cls(np.zeros(0, dtype=np.int32), np.zeros(0, dtype=np.int64))
        types = None
        if all(part.types is not None for part in parts):
            types = np.concatenate([part.types for part in parts])
        return cls(
            np.concatenate([part.ids for part in parts]), np.concatenate([part.lengths for part in parts]), types
        )

    def row(self, index: int) -> np.ndarray:
        return self.ids[self.starts[index] : self.starts[index] + self.lengths[index]]

    def row_types(self, index: int) -> np.ndarray:
        return self.types[self.starts[index] : self.starts[index] + self.lengths[index]]


def run_concurrently(function: Any, jobs: Iterable[tuple], workers: int, threads_per_worker: int = 1) -> None:
    """Call `function(*job)` for every job on `workers` threads, each with `threads_per_worker` intra-op threads.

    For CPU work made of independent pieces (inference batches) that one piece alone cannot spread over every
    core. At most `2 * workers` jobs are in flight, so a lazy `jobs` iterator is never materialised. The
    caller's torch thread count is restored afterwards (the BLAS library may keep one process-wide setting).
    The first error of any job is raised.
    """
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    threads = torch.get_num_threads()
    pending: set = set()
    try:
        with ThreadPoolExecutor(workers, initializer=torch.set_num_threads, initargs=(threads_per_worker,)) as pool:
            try:
                for job in jobs:
                    if len(pending) >= 2 * workers:
                        done, pending = wait(pending, return_when=FIRST_COMPLETED)
                        for future in done:
                            future.result()
                    pending.add(pool.submit(function, *job))
                for future in pending:
                    future.result()
            except BaseException:
                for future in pending:
                    future.cancel()
                raise
    finally:
        torch.set_num_threads(threads)


def plan_batches(lengths: np.ndarray, batch_size: int, max_padding: float = 0.1) -> list[np.ndarray]:
    """Cut texts into inference batches, longest first, so that padding wastes little compute.

    Texts are sorted by token count (descending, stable). A batch takes the next texts until it holds
    `batch_size` of them or the next one is shorter than `(1 - max_padding)` times the batch's longest, so a row
    is at most `max_padding` padding. Sorting alone leaves the first batches of a large `batch_size` mostly
    padding (a 55-token sentence next to 20-token ones); exact-length buckets would remove all padding but run
    many tiny batches, each of which pays for reading every weight from memory (docs/BENCHMARKS.md measures the
    choice of 10%).

    Args:
        lengths: token count of every text, `(num_texts,)`.
        batch_size: most texts per batch.
        max_padding: largest fraction of a row that may be padding.

    Returns:
        Index arrays into `lengths`, one per batch; every index appears exactly once.
    """
    lengths = np.asarray(lengths)
    order = np.argsort(-lengths, kind="stable")
    descending = lengths[order]
    batches, start = [], 0
    while start < len(order):
        window = -descending[start : start + batch_size]  # ascending
        # Rows whose length is >= (1 - max_padding) * the longest row of this batch.
        size = int(np.searchsorted(window, -(descending[start] * (1.0 - max_padding)), side="right"))
        batches.append(order[start : start + max(size, 1)])
        start += max(size, 1)
    return batches


def window_choice(counts: list[int], stride: int, from_the_end: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Which window each token of a text cut into overlapping windows is read from, and where it is in that window.

    The tokenizer cuts the text's token sequence into windows of `counts[k]` text tokens, each sharing `stride`
    tokens with the next (its `return_overflowing_tokens`): from the start (window k begins at `k * step`), or with
    `from_the_end` (left truncation) from the end, window 0 being the last tokens. A token near a window's cut
    edge was encoded without the context beyond it, so each token is read from the window where it lies farthest
    from a cut edge (a window edge at the text's own start or end cuts nothing off); of equally good windows, the
    earlier one in the text. With windows overlapping by `stride`, every token then keeps at least `stride // 2`
    tokens of context on each side where the text has them. (Transformers' pipeline instead merges the entities of
    overlapping windows afterwards, keeping the longest.)

    Returns:
        `(window, index)`: per token of the whole sequence, `(total,)` each, the window it is read from and its
        position among that window's text tokens.
    """
    windows = len(counts)
    step = counts[0] - stride if windows > 1 else 0
    total = (windows - 1) * step + counts[-1]
    starts = [total - k * step - counts[k] if from_the_end else k * step for k in range(windows)]
    room = np.full(total, -1.0)
    chosen = np.zeros(total, dtype=np.int64)
    local = np.zeros(total, dtype=np.int64)
    for window in sorted(range(windows), key=lambda k: starts[k]):
        start, count = starts[window], counts[window]
        index = np.arange(count)
        before = index if start > 0 else np.full(count, np.inf)
        after = count - 1 - index if start + count < total else np.full(count, np.inf)
        here = np.minimum(before, after)
        better = here > room[start : start + count]
        room[start : start + count][better] = here[better]
        chosen[start : start + count][better] = window
        local[start : start + count][better] = index[better]
    return chosen, local


def clip_cosines(products: np.ndarray) -> np.ndarray:
    """Dot products of unit vectors as cosines: rounding can put them a hair outside [-1, 1] (1.0000001 for two
    equal texts)."""
    return np.clip(products, -1.0, 1.0)


def is_pair(item: Any) -> bool:
    """A text pair is a tuple of two strings (lists are pre-split words), or `{"text": a, "text_pair": b}`."""
    if isinstance(item, dict):
        return set(item) == {"text", "text_pair"}
    return isinstance(item, tuple) and len(item) == 2


def _bounded(text: str, max_tokens: int) -> str:
    limit = max_tokens * _CHARS_PER_TOKEN_BOUND
    if len(text) <= limit:
        return text
    cut = text.rfind(" ", 0, limit)  # a word boundary, so the words kept tokenise as they do in the whole text
    return text[: cut if cut > 0 else limit]


class MultiTaskInferenceMixin:
    """`encode`, `predict` and `similarity` over a backend that provides `config`, `tokenizer`, `device`, `dtype`,
    `task_names` and four hooks: `_batch_features` (pooled features of a padded batch), `_batch_logits` (every asked
    task's logits of a padded batch, with token type ids for tasks whose texts carry segments), `_pair_logits` (a
    pair-classification head on two feature batches) and `_inference_session` (a context for a whole call).
    `MultiTaskModel` implements them with torch; an exported graph can implement them with another runtime and keep
    every output identical. What each task's prediction looks like is its task type's (`tasks_mtl`)."""

    # Largest fraction of a row that `encode`/`predict` may pad (see `plan_batches`); an inference-speed knob only.
    inference_max_padding: float = 0.1
    # CPU worker threads that `encode`/`predict` run batches on side by side (`run_concurrently`), the torch
    # threads split between them; `None` = min(4, torch threads), 1 = one batch at a time. Within one batch,
    # intra-op threads leave cores idle (small matrix multiplies are bound by reading the weights; layer norms,
    # softmax and Python overhead run on one core); a second batch fills them. Each batch is computed exactly as
    # it is alone (docs/BENCHMARKS.md); capped at 4 because every worker holds one batch's activations.
    inference_workers: int | None = None

    # ------------------------------------------------------------------ tokenisation

    def _require_tokenizer(self) -> Any:
        if self.tokenizer is None:
            raise InputError(
                "this model has no tokenizer: load it with `from_pretrained`/`from_backbone`, or set `model.tokenizer`"
            )
        return self.tokenizer

    def tokenize(
        self,
        texts: Sequence[str] | Sequence[Sequence[str]],
        max_seq_length: int | None = None,
        padding: bool | str = True,
        return_tensors: str | None = "pt",
        **kwargs,
    ):
        """Tokenise texts (or pre-split words with `is_split_into_words=True`) the way the model expects."""
        return self._require_tokenizer()(
            list(texts),
            padding=padding,
            truncation=True,
            max_length=max_seq_length or self.config.max_seq_length,
            return_tensors=return_tensors,
            **kwargs,
        )

    def _tokenize_unpadded(self, texts: list, max_seq_length: int | None = None, **kwargs):
        """Tokenise every text in one call (the fast tokenizer batches it in Rust), without padding.

        Strings far longer than the truncation length are cut at a word boundary first (`_bounded`), so the cost of
        a huge input is bounded by the truncation length; if a cut text yields fewer tokens than the limit, it is
        tokenised whole, so the result is always that of the full text.
        """
        tokenizer = self._require_tokenizer()
        max_length = max_seq_length or self.config.max_seq_length
        options = {
            "padding": False,
            "truncation": True,
            "max_length": max_length,
            "return_attention_mask": False,
            "return_token_type_ids": False,
            **kwargs,
        }
        if kwargs.get("is_split_into_words"):
            return tokenizer(texts, **options)
        bounded = [_bounded(text, max_length) for text in texts]
        encoding = tokenizer(bounded, **options)
        redo = [
            index
            for index, (text, cut) in enumerate(zip(texts, bounded))
            if cut is not text and len(encoding["input_ids"][index]) < max_length
        ]
        if redo:  # cut texts that did not fill the limit: their full text decides
            if kwargs.get("return_offsets_mapping"):
                redo_set = set(redo)
                bounded = [texts[index] if index in redo_set else cut for index, cut in enumerate(bounded)]
                return tokenizer(bounded, **options)
            full = tokenizer([texts[index] for index in redo], **options)
            for position, index in enumerate(redo):
                encoding["input_ids"][index] = full["input_ids"][position]
        return encoding

    def _packed_tokens(self, texts: list[str], max_seq_length: int | None = None) -> PackedTokens:
        # Tokenised in chunks and packed into one flat int32 array (docs/BENCHMARKS.md measures the memory it saves
        # over Python int lists), so memory grows with the output array, not with the token lists.
        chunk = 8192
        return PackedTokens.concatenate(
            [
                PackedTokens.from_lists(
                    self._tokenize_unpadded(texts[start : start + chunk], max_seq_length)["input_ids"]
                )
                for start in range(0, len(texts), chunk)
            ]
        )

    # ------------------------------------------------------------------ batching

    def _padded_batches(
        self, tokens: PackedTokens, batch_size: int, show_progress_bar: bool | None
    ) -> Iterator[
        tuple[np.ndarray, torch.Tensor, torch.Tensor] | tuple[np.ndarray, torch.Tensor, torch.Tensor, torch.Tensor]
    ]:
        """Yield `(indices, input_ids, attention_mask)` for already tokenised texts (with `token_type_ids` too when
        they carry them), in the batches chosen by `plan_batches`: each batch is padded only to its own longest row.
        `indices` map rows to input order."""
        check_batch_size(batch_size)
        batches = plan_batches(tokens.lengths, batch_size, self.inference_max_padding)
        if show_progress_bar is None:
            show_progress_bar = logger.getEffectiveLevel() <= logging.INFO and len(tokens.lengths) > 10 * batch_size
        if show_progress_bar:
            from tqdm.auto import tqdm

            batches = tqdm(batches, desc="Batches")
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        for indices in batches:
            width = int(tokens.lengths[indices[0]])
            ids = np.full((len(indices), width), pad_id, dtype=np.int64)  # (batch, seq)
            mask = np.zeros((len(indices), width), dtype=np.int64)  # (batch, seq)
            types = np.zeros((len(indices), width), dtype=np.int64) if tokens.types is not None else None
            # Always pad on the right, whatever the tokenizer's padding_side: in a single forward pass every real
            # token then keeps the position it has alone (left padding exists for generation, and shifts the
            # absolute positions of BERT-style models).
            for row, index in enumerate(indices):
                length = tokens.lengths[index]
                ids[row, :length] = tokens.row(index)
                mask[row, :length] = 1
                if types is not None:
                    types[row, :length] = tokens.row_types(index)
            if types is None:
                yield indices, torch.from_numpy(ids), torch.from_numpy(mask)
            else:
                yield indices, torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(types)

    def _for_each_batch(self, function: Any, batches: Iterator[tuple]) -> None:
        """Call `function(*batch)` per batch: side by side on `inference_workers` threads on CPU when there is
        more than one batch, else one after the other. `function` must enter its own `inference_mode`."""
        batches = iter(batches)
        head = list(itertools.islice(batches, 2))  # one batch alone has nothing to overlap with
        jobs = itertools.chain(head, batches)
        threads = torch.get_num_threads()
        workers = min(4, threads) if self.inference_workers is None else self.inference_workers
        if len(head) < 2 or self.device.type != "cpu" or workers < 2:
            for batch in jobs:
                function(*batch)
        else:
            run_concurrently(function, jobs, workers, threads_per_worker=max(1, threads // workers))

    # ------------------------------------------------------------------ embeddings

    def encode(
        self,
        sentences: str | Sequence[str],
        batch_size: int = 32,
        normalize: bool | None = None,
        convert_to_numpy: bool = True,
        convert_to_tensor: bool = False,
        show_progress_bar: bool | None = None,
        max_seq_length: int | None = None,
        precision: str | None = None,
        prompt_name: str | None = None,
        prompt: str | None = None,
        normalize_embeddings: bool | None = None,
        truncate_dim: int | None = None,
    ) -> np.ndarray | torch.Tensor:
        """Embed sentences into fixed-length vectors.

        All texts are tokenised in one call, sorted by token count and cut into batches that carry little
        padding (`plan_batches`); results come back in input order.

        Args:
            sentences: one string or a list of strings (empty strings are fine; long ones are truncated to
                `max_seq_length`, default `config.max_seq_length`).
            batch_size: at most this many sentences per forward pass.
            normalize: L2-normalise the vectors; default `config.normalize`. `False` returns the pooled (and
                projected) features that the sequence heads read.
            convert_to_numpy / convert_to_tensor: return a float32 `np.ndarray` (default) or a `torch.Tensor`
                on the model's device.
            show_progress_bar: show a tqdm bar (default: only for long inputs when logging is verbose).
            max_seq_length: truncation length in tokens for this call.
            precision: `None` (default) computes in the weights' own dtype: float32 weights match
                sentence-transformers to 1e-5. `"bfloat16"` runs the encoder under bfloat16 autocast; faster and
                more so after `model.to(torch.bfloat16)`, which also halves the weights' memory traffic (GPUs,
                and CPUs with AVX512-BF16 or AMX; measured in docs/BENCHMARKS.md).
            prompt_name / prompt: text put before every sentence, as in sentence-transformers: a name from
                `config.prompts`, or the text itself (`prompt` wins); default `config.default_prompt_name`'s.
            normalize_embeddings: as in sentence-transformers: `True` makes the vectors unit length (after
                `truncate_dim`'s cut); `False` / `None` leave the model's own normalisation (`config.normalize`,
                sentence-transformers' Normalize module) as it is. `True` with `normalize=False` is refused.
            truncate_dim: keep the first `truncate_dim` dimensions (Matryoshka-style), as sentence-transformers does:
                the cut comes after the model's own normalisation, so the kept part is not unit length unless
                `normalize_embeddings=True` (or `normalize=True`) normalises it again.

        Returns:
            `(len(sentences), embedding_dim)` float32 (`truncate_dim` columns if given), in input order;
            `(embedding_dim,)` for a single string.
        """
        if precision not in (None, "float32", "bfloat16"):
            raise InputError(f"precision must be None, 'float32' or 'bfloat16', got {precision!r}")
        if precision == "float32" and self.dtype != torch.float32:
            raise InputError(f"precision='float32' needs float32 weights, this model's are {self.dtype}: call .float()")
        normalize = check_flag("normalize", normalize)
        normalize_embeddings = check_flag("normalize_embeddings", normalize_embeddings)
        if normalize_embeddings and normalize is not None and not normalize:
            raise InputError("normalize=False and normalize_embeddings=True disagree: give one of them")
        unit = bool(normalize or normalize_embeddings)  # unit vectors out, after any cut
        own = self.config.normalize if normalize is None else normalize  # the model's own, before any cut
        dim = self.config.embedding_dim
        if truncate_dim is not None:
            truncate_dim = check_int("truncate_dim", truncate_dim, minimum=1, maximum=dim)
        if max_seq_length is not None:
            check_max_seq_length(max_seq_length, self.config.backbone_config)
        check_batch_size(batch_size)
        single = isinstance(sentences, str)
        texts = check_texts([sentences] if single else sentences)
        prefix = self._prompt(prompt_name, prompt)
        if prefix:
            texts = [prefix + text for text in texts]
        tokens = self._packed_tokens(texts, max_seq_length)
        as_tensor = convert_to_tensor or not convert_to_numpy
        if truncate_dim is None or truncate_dim == dim:
            result = self.encode_tokens(tokens, batch_size, own or unit, as_tensor, show_progress_bar, precision)
        else:
            result = self.encode_tokens(tokens, batch_size, own, as_tensor, show_progress_bar, precision)
            cut = int(truncate_dim)
            result = result[:, :cut].contiguous() if as_tensor else np.ascontiguousarray(result[:, :cut])
            if unit:
                result = _unit_rows(result)
        return result[0] if single else result

    def encode_query(self, sentences: str | Sequence[str], **kwargs: Any) -> np.ndarray | torch.Tensor:
        """`encode` for search queries, as sentence-transformers' `encode_query`: with the model's `"query"` prompt
        unless `prompt_name` / `prompt` is given; without one, no prompt (not the default prompt)."""
        return self.encode(sentences, **self._role_prompt("query", kwargs))

    def encode_document(self, sentences: str | Sequence[str], **kwargs: Any) -> np.ndarray | torch.Tensor:
        """`encode` for the documents searched, as sentence-transformers' `encode_document`: with the model's
        `"document"` prompt unless `prompt_name` / `prompt` is given; without one, no prompt (not the default
        prompt). (sentence-transformers 6 looks for "document", then "passage", then "corpus", but every model of
        it has a "document" prompt, empty unless saved: the others are never reached, and are not here either.)"""
        return self.encode(sentences, **self._role_prompt("document", kwargs))

    def _role_prompt(self, role: str, kwargs: dict[str, Any]) -> dict[str, Any]:
        if kwargs.get("prompt_name") is None and kwargs.get("prompt") is None:
            return {**kwargs, "prompt_name": role}
        return kwargs

    def _prompts(self) -> dict[str, str]:
        """The model's prompts, with an empty "query" and "document" prompt where it has none, as every
        sentence-transformers 6 model has."""
        return {"query": "", "document": "", **(getattr(self.config, "prompts", None) or {})}

    def _prompt(self, prompt_name: str | None, prompt: str | None) -> str:
        if prompt is not None:
            check_text(prompt, "prompt")
            return prompt
        prompts = self._prompts()
        name = prompt_name if prompt_name is not None else getattr(self.config, "default_prompt_name", None)
        if name is None:
            return ""
        if name not in prompts:
            raise InputError(f"prompt_name '{name}' is not one of this model's prompts {sorted(prompts)}")
        return prompts[name]

    def encode_tokens(
        self,
        tokens: PackedTokens | Sequence[Sequence[int]],
        batch_size: int = 32,
        normalize: bool | None = None,
        convert_to_tensor: bool = False,
        show_progress_bar: bool | None = None,
        precision: str | None = None,
    ) -> np.ndarray | torch.Tensor:
        """`encode` for texts tokenised already (lists of token ids, special tokens included, or `PackedTokens`)."""
        if not isinstance(tokens, PackedTokens):
            tokens = PackedTokens.from_lists(list(tokens))
        normalize = self.config.normalize if normalize is None else normalize
        shape = (len(tokens.lengths), self.config.embedding_dim)
        if convert_to_tensor:
            result = torch.empty(shape, dtype=torch.float32, device=self.device)
        else:
            result = np.empty(shape, dtype=np.float32)
        if not len(tokens.lengths):
            return result
        with self._inference_session():

            def embed_batch(indices: np.ndarray, batch_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
                features = self._batch_features(batch_ids, attention_mask, precision)  # (batch, embedding_dim)
                if normalize:
                    features = F.normalize(features, p=2, dim=-1)
                if convert_to_tensor:
                    result[torch.from_numpy(indices).to(result.device)] = features.to(result.device)
                else:
                    result[indices] = features.cpu().numpy()

            self._for_each_batch(embed_batch, self._padded_batches(tokens, batch_size, show_progress_bar))
        return result

    def similarity(
        self,
        texts_a: str | Sequence[str] | np.ndarray | torch.Tensor,
        texts_b: str | Sequence[str] | np.ndarray | torch.Tensor,
        pairwise: bool = False,
        batch_size: int = 32,
    ) -> np.ndarray | torch.Tensor:
        """Cosine similarity of sentence embeddings: of texts (embedded here), or of embeddings you have already
        (`encode`'s output, as in sentence-transformers' `model.similarity(embeddings_a, embeddings_b)`).

        Args:
            texts_a, texts_b: strings (or one string each), or embeddings: `(n, dim)` / `(dim,)` numpy arrays or
                tensors (both sides the same kind).
            pairwise: `False` (default) gives the `(len(a), len(b))` matrix of every a against every b; `True`
                gives `(n,)`: a[i] against b[i], for two lists of the same length.

        Returns:
            float32 cosines in [-1, 1]: a numpy array for texts; for embeddings a tensor (on the first side's
            device), as sentence-transformers gives.
        """
        pairwise = check_flag("pairwise", pairwise, allow_none=False)
        vectors = [_is_embeddings(side) for side in (texts_a, texts_b)]
        if any(vectors):
            if not all(vectors):
                raise InputTypeError("texts_a and texts_b must both be texts or both be embeddings (arrays or tensors)")
            return _embedding_cosines(texts_a, texts_b, pairwise)
        a = check_texts([texts_a] if isinstance(texts_a, str) else texts_a, "texts_a")
        b = check_texts([texts_b] if isinstance(texts_b, str) else texts_b, "texts_b")
        if pairwise and len(a) != len(b):
            raise InputError(f"pairwise similarity needs lists of the same length, got {len(a)} and {len(b)}")
        embeddings = self.encode(a + b, batch_size=batch_size, normalize=True)
        left, right = embeddings[: len(a)], embeddings[len(a) :]
        cosines = np.einsum("nd,nd->n", left, right) if pairwise else left @ right.T
        return clip_cosines(cosines).astype(np.float32)

    def similarity_pairwise(
        self,
        texts_a: str | Sequence[str] | np.ndarray | torch.Tensor,
        texts_b: str | Sequence[str] | np.ndarray | torch.Tensor,
        batch_size: int = 32,
    ) -> np.ndarray | torch.Tensor:
        """`similarity(texts_a, texts_b, pairwise=True)`, under sentence-transformers' name."""
        return self.similarity(texts_a, texts_b, pairwise=True, batch_size=batch_size)

    def get_sentence_embedding_dimension(self) -> int:
        """The embedding's size (`config.embedding_dim`), under sentence-transformers' name."""
        return self.config.embedding_dim

    # ------------------------------------------------------------------ predictions

    def predict(
        self,
        sentences: str | Sequence[Any],
        tasks: Sequence[str] | None = None,
        batch_size: int = 32,
        show_progress_bar: bool | None = None,
    ) -> dict[str, Any] | list[dict[str, Any]]:
        """Human-readable predictions of every task (or the chosen ones) from one encoder pass per batch.

        Args:
            sentences: a string, a list of strings, a list of pre-split word *lists* (token tasks on your own word
                boundaries), or, for pair tasks, a pair `(text_a, text_b)` *tuple* (or
                `{"text": a, "text_pair": b}`) or a list of them. Where every task predicted is a pair task (`tasks`
                names only pair tasks, or the model has no other), `[text_a, text_b]` lists are pairs too (one
                such list: one pair), as sentence-transformers' `CrossEncoder.predict` reads them; elsewhere lists
                are words.
            tasks: the tasks to predict. Default: every single-text task for texts, every pair task for pairs.

        Returns:
            Per input, a dict task -> prediction, worded by the task's type (`tasks_mtl`):
            - classification / pair_classification: `{"label", "score", "scores": {label: probability}}`
            - multi_label_classification: `{"labels": [labels above the task threshold], "scores": {...}}`
            - regression: `{"value": float}` (one output) or `{"values": {name: float}}`
            - token_classification: `{"words": [{"word", "start", "end", "tag", "score"}], "entities":
              [{"entity", "text", "start", "end", "score"}]}`: one entry per word (the tokenizer's words of a string,
              each spanning its characters up to the next word or whitespace; your words of a word list), its tag
              read from its first sub-token; character offsets into the input string. A word with no token (an
              empty string) has `tag: null`. A text longer than `max_seq_length` tokens is read whole, in windows
              of `max_seq_length` tokens that overlap by a quarter of their text tokens (transformers'
              token-classification pipeline's `stride`), each word tagged from the window where its first
              sub-token lies farthest from a window edge.
            - similarity / contrastive: `{"cosine": float}`, the cosine of the two embeddings.

            Sentence-level tasks read a text's first `max_seq_length` tokens (special tokens included); the rest is
            truncated, as in `encode`.
        """
        if sentences is None:
            raise InputTypeError("sentences must be a string, a list of strings, word lists or pairs, got None")
        check_batch_size(batch_size)
        tasks = requested_tasks(tasks)
        pair_tasks_only = self._pair_tasks_only(tasks)
        if pair_tasks_only and _two_texts(sentences):  # one [a, b] pair, as CrossEncoder.predict reads it
            sentences = tuple(sentences)
        single = isinstance(sentences, (str, tuple)) or (isinstance(sentences, dict) and is_pair(sentences))
        if isinstance(sentences, dict) and not single:
            raise InputTypeError("a dict input must be a pair {'text': ..., 'text_pair': ...}")
        items = [sentences] if single else list(_iterable(sentences))
        if not single and pair_tasks_only:  # no task reads words: [a, b] lists are pairs
            items = [tuple(item) if _two_texts(item) else item for item in items]
        pairs = bool(items) and all(is_pair(item) for item in items)
        if items and not pairs and any(is_pair(item) for item in items):
            raise InputTypeError(
                "sentences mixes text pairs (tuples) with single texts: predict them in separate calls"
            )
        tasks = self._predict_tasks(tasks, pairs)
        if not items:
            return []
        # One session for the whole call: every path (a pair head on `encode`'s features included) runs in eval mode,
        # without dropout, whatever mode the model was left in.
        with self._inference_session():
            results = (
                self._predict_pairs(items, tasks, batch_size)
                if pairs
                else self._predict_texts(items, tasks, batch_size, show_progress_bar)
            )
        return results[0] if single else results

    def _pair_tasks_only(self, tasks: list[str] | None) -> bool:
        """Whether every task `predict` would run takes pairs (unknown names: no; `check_tasks` names them)."""
        names = self.task_names if tasks is None else tasks
        return bool(names) and all(
            isinstance(name, str) and name in self.task_names and self.config.task(name).takes_pairs for name in names
        )

    def _predict_tasks(self, tasks: list[str] | None, pairs: bool) -> list[str]:
        chosen = check_tasks(tasks, self.config, pairs)
        if chosen is None:
            return [name for name in self.task_names if self.config.task(name).takes_pairs == pairs]
        return chosen

    def _predict_texts(
        self, items: list[Any], tasks: list[str], batch_size: int, show_progress_bar: bool | None
    ) -> list[dict[str, Any]]:
        split_into_words = all(isinstance(item, list) for item in items)
        if split_into_words:
            for index, words in enumerate(items):
                check_words(words, f"sentences[{index}]")
        else:
            check_texts(items)
        task_objects = {name: self.config.task(name) for name in tasks}
        word_tasks = [name for name, task in task_objects.items() if task.reads_words]
        if word_tasks and not getattr(self.tokenizer, "is_fast", False):
            raise InputError("token-classification predictions need a fast tokenizer (word ids and offsets)")
        if word_tasks:
            encoding = self._window_encoding(items, split_into_words)
            text_of_row = encoding.get("overflow_to_sample_mapping") or list(range(len(items)))
        else:
            encoding = self._tokenize_unpadded(items, is_split_into_words=split_into_words)
            text_of_row = list(range(len(items)))
        rows_of_text: list[list[int]] = [[] for _ in items]  # each text's windows, in the tokenizer's order
        for row, index in enumerate(text_of_row):
            rows_of_text[index].append(row)
        first_rows = [rows[0] for rows in rows_of_text]
        further_rows = [row for rows in rows_of_text for row in rows[1:]]
        ids = encoding["input_ids"]
        scores: list[dict[str, np.ndarray] | None] = [None] * len(ids)  # per window: each task's scores

        def predict_batch(
            rows: list[int], names: list[str], indices: np.ndarray, input_ids: torch.Tensor, mask: torch.Tensor
        ) -> None:
            logits = self._batch_logits(input_ids, mask, names)
            # One softmax/sigmoid and one device->host copy per task and batch, not per sentence.
            batch_scores = {name: task_objects[name].scores(logits[name]) for name in names}
            for position, index in enumerate(indices):
                scores[rows[index]] = {name: value[position] for name, value in batch_scores.items()}

        # A text's first window (its usual truncated tokens) runs every task; further windows only the token tasks.
        batches = itertools.chain(
            (
                (first_rows, tasks, *batch)
                for batch in self._padded_batches(
                    PackedTokens.from_lists([ids[row] for row in first_rows]), batch_size, show_progress_bar
                )
            ),
            (
                (further_rows, word_tasks, *batch)
                for batch in self._padded_batches(
                    PackedTokens.from_lists([ids[row] for row in further_rows]), batch_size, False
                )
            ),
        )
        self._for_each_batch(predict_batch, batches)
        results = []
        for index, item in enumerate(items):
            words = self._merge_windows(encoding, rows_of_text[index], scores, word_tasks, split_into_words)
            result = {}
            for name, task in task_objects.items():
                if task.reads_words:
                    probabilities, word_ids, offsets = words[name]
                    result[name] = task.describe_words(probabilities, word_ids, offsets, item)
                else:
                    result[name] = task.describe(scores[first_rows[index]][name])
            results.append(result)
        return results

    def _window_encoding(self, items: list[Any], split_into_words: bool) -> Any:
        """Every text tokenised whole for the token tasks, in windows of at most `max_seq_length` tokens (special
        tokens included) that share `_WINDOW_OVERLAP` of their text tokens with the next one, as transformers'
        token-classification pipeline reads long texts (`stride`): one row per window, `overflow_to_sample_mapping`
        naming its text. A text's first window is its usual truncated tokenisation, which the sentence-level tasks
        read."""
        tokenizer = self._require_tokenizer()
        max_length = self.config.max_seq_length
        options = {
            "padding": False,
            "truncation": True,
            "max_length": max_length,
            "return_attention_mask": False,
            "return_token_type_ids": False,
            "return_offsets_mapping": not split_into_words,
            "is_split_into_words": split_into_words,
        }
        stride = self._window_stride()
        if stride is not None:
            options.update(return_overflowing_tokens=True, stride=stride)
        return tokenizer(items, **options)

    def _window_stride(self) -> int | None:
        """How many text tokens consecutive windows share, or `None` where a window has no room for text (the
        tokenizer would then return the whole text as one window, longer than the positions allow)."""
        room = self.config.max_seq_length - self._require_tokenizer().num_special_tokens_to_add(pair=False)
        return int(room * _WINDOW_OVERLAP) if room >= 1 else None

    def _merge_windows(
        self,
        encoding: Any,
        rows: list[int],
        scores: list[dict[str, np.ndarray] | None],
        tasks: list[str],
        split_into_words: bool,
    ) -> dict[str, tuple[np.ndarray, list[int | None], list[tuple[int, int]] | None]]:
        """One text's token scores of every token task over its whole token sequence (text tokens only), each token's
        row taken from the window `window_choice` picks, with the word id and character offsets of every token."""
        if not tasks:
            return {}
        spans = []  # per window: where its text tokens are in its row
        for row in rows:
            text_positions = [position for position, sequence in enumerate(encoding.sequence_ids(row)) if sequence == 0]
            spans.append((text_positions[0], len(text_positions)) if text_positions else (0, 0))
        if len(rows) == 1:  # a text that fits one window: its own tokens, as they are
            (row,), ((first, count),) = rows, spans
            text = slice(first, first + count)
            offsets = None if split_into_words else encoding["offset_mapping"][row][text]
            return {name: (scores[row][name][text], encoding.word_ids(row)[text], offsets) for name in tasks}
        chosen, local = window_choice(
            [count for _, count in spans], self._window_stride() or 0, self.tokenizer.truncation_side == "left"
        )
        word_ids: list[int | None] = [None] * len(chosen)
        offsets: list[tuple[int, int]] | None = None if split_into_words else [(0, 0)] * len(chosen)
        merged = {
            name: np.empty((len(chosen), *scores[rows[0]][name].shape[1:]), dtype=scores[rows[0]][name].dtype)
            for name in tasks
        }
        for window, (row, (first, _)) in enumerate(zip(rows, spans)):
            positions = np.flatnonzero(chosen == window)
            if not len(positions):
                continue
            tokens = first + local[positions]  # positions in this window's row
            row_word_ids = encoding.word_ids(row)
            row_offsets = None if split_into_words else encoding["offset_mapping"][row]
            for position, token in zip(positions.tolist(), tokens.tolist()):
                word_ids[position] = row_word_ids[token]
                if offsets is not None:
                    offsets[position] = row_offsets[token]
            for name in tasks:
                merged[name][positions] = scores[row][name][tokens]
        return {name: (merged[name], word_ids, offsets) for name in tasks}

    def _predict_pairs(self, items: list[Any], tasks: list[str], batch_size: int) -> list[dict[str, Any]]:
        pairs = [(item["text"], item["text_pair"]) if isinstance(item, dict) else item for item in items]
        for index, (a, b) in enumerate(pairs):
            check_pair(a, b, f"sentences[{index}]")
        inputs = PairInputs(self, pairs, batch_size)
        predictions = {name: self.config.task(name).predict_pairs(inputs) for name in tasks}
        return [{name: predictions[name][row] for name in tasks} for row in range(len(pairs))]

    def _joint_logits(self, name: str, pairs: list[tuple[str, str]], batch_size: int) -> torch.Tensor:
        """One task's logits of text pairs encoded jointly (`[CLS] a [SEP] b [SEP]`), as a cross-encoder reads them:
        `(pairs, outputs)` in input order."""
        tokenizer = self._require_tokenizer()
        encoding = tokenizer(
            [a for a, _ in pairs],
            [b for _, b in pairs],
            truncation="longest_first",
            max_length=self.config.max_seq_length,
            padding=False,
            return_attention_mask=False,
            return_token_type_ids=True,
        )
        types = encoding.get("token_type_ids") or [[0] * len(ids) for ids in encoding["input_ids"]]
        tokens = PackedTokens.from_lists(encoding["input_ids"], types)
        rows: list[torch.Tensor | None] = [None] * len(pairs)
        with self._inference_session():

            def score_batch(indices, input_ids, attention_mask, token_type_ids) -> None:
                logits = self._batch_logits(input_ids, attention_mask, [name], token_type_ids)[name].float().cpu()
                for row, index in enumerate(indices):
                    rows[index] = logits[row]

            self._for_each_batch(score_batch, self._padded_batches(tokens, batch_size, False))
        return torch.stack(rows)


class PairInputs:
    """The text pairs of one `predict` call, as the pair task types read them (`tasks_mtl.Task.predict_pairs`):
    each side's features (the fast `encode` path, computed once for every task that reads them), the cosine of the
    two embeddings, a pair-classification head on them, or a task's logits of the pairs encoded jointly."""

    def __init__(self, model: MultiTaskInferenceMixin, pairs: list[tuple[str, str]], batch_size: int):
        self.model = model
        self.pairs = pairs
        self.batch_size = batch_size
        self._features: tuple[torch.Tensor, torch.Tensor] | None = None

    def features(self) -> tuple[torch.Tensor, torch.Tensor]:
        """`(u, v)`: the pooled (projected) features of each side, before normalisation."""
        if self._features is None:
            texts = [a for a, _ in self.pairs] + [b for _, b in self.pairs]
            features = self.model.encode(texts, batch_size=self.batch_size, normalize=False, convert_to_tensor=True)
            self._features = features[: len(self.pairs)], features[len(self.pairs) :]
        return self._features

    def cosines(self) -> np.ndarray:
        u, v = self.features()
        return clip_cosines(F.cosine_similarity(u, v, dim=-1).float().cpu().numpy())

    def pair_head_logits(self, name: str) -> torch.Tensor:
        u, v = self.features()
        return self.model._pair_logits(name, u, v)

    def joint_logits(self, name: str) -> torch.Tensor:
        return self.model._joint_logits(name, self.pairs, self.batch_size)


def _is_embeddings(value: Any) -> bool:
    """Numbers, not texts: a tensor, or a numpy array of numbers (an array of strings is texts). Booleans and complex
    numbers count as numbers here, so that `_embedding_cosines` refuses them by the one rule for both kinds."""
    return isinstance(value, torch.Tensor) or (isinstance(value, np.ndarray) and value.dtype.kind in "biufc")


def _unit_rows(vectors: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    if isinstance(vectors, torch.Tensor):
        return F.normalize(vectors, p=2, dim=-1)
    return vectors / np.clip(np.linalg.norm(vectors, axis=-1, keepdims=True), 1e-12, None)


def _embedding_cosines(
    a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor, pairwise: bool
) -> np.ndarray | torch.Tensor:
    """`similarity` of embeddings given: the same cosines (float32, clipped) as for texts, as a tensor."""
    sides = []
    for name, side in (("texts_a", a), ("texts_b", b)):
        side = torch.as_tensor(side)
        if side.is_complex() or side.dtype == torch.bool:  # a cast to float would drop the imaginary part silently
            raise InputTypeError(f"{name} must be real-valued embeddings (floats or integers), got {side.dtype}")
        side = side.float()
        side = side.unsqueeze(0) if side.dim() == 1 else side
        if side.dim() != 2 or not side.shape[-1]:
            raise InputError(f"{name} must be embeddings of shape (n, dim) or (dim,), got {tuple(side.shape)}")
        if not torch.isfinite(side).all():
            raise InputError(f"{name} holds a non-finite value")
        sides.append(F.normalize(side, p=2, dim=-1))
    left, right = sides
    if left.shape[-1] != right.shape[-1]:
        raise InputError(f"embeddings of different sizes: {left.shape[-1]} (texts_a) and {right.shape[-1]} (texts_b)")
    if pairwise and len(left) != len(right):
        raise InputError(f"pairwise similarity needs the same number of rows, got {len(left)} and {len(right)}")
    right = right.to(left.device)
    cosines = (left * right).sum(-1) if pairwise else left @ right.T
    return cosines.clamp(-1.0, 1.0)


def _two_texts(item: Any) -> bool:
    return isinstance(item, list) and len(item) == 2 and all(isinstance(text, str) for text in item)


def _iterable(items: Any) -> Iterable:
    if isinstance(items, (bytes, dict)) or not isinstance(items, Iterable):
        raise InputTypeError(
            f"sentences must be a string, a list of strings, word lists or pairs, got {type(items).__name__}"
        )
    return items


__all__ = [
    "MultiTaskInferenceMixin",
    "PackedTokens",
    "PairInputs",
    "UserError",
    "check_texts",
    "group_entities",
    "is_pair",
    "plan_batches",
    "run_concurrently",
    "window_choice",
]
