"""`OnnxMultiTaskModel`: an export run by onnxruntime, with the same `encode` / `predict` / `similarity` as the
PyTorch model (`MultiTaskInferenceMixin`: only the backend hooks differ)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoTokenizer

from configuration_mtl import MultiTaskConfig
from inference_mtl import MultiTaskInferenceMixin, PackedTokens
from validation_mtl import FileError, InputError, MissingFileError, check_batch_size

from .export import export_is_current, export_onnx, stale_source
from .options import DEFAULT_QUANTIZATION, ONNX_CONFIG_NAME, output_name
from .session import open_session, text_graph_feeds


class OnnxMultiTaskModel(MultiTaskInferenceMixin):
    """A `MultiTaskModel` export run by onnxruntime, with the same `encode`, `encode_tokens`, `predict`,
    `similarity` and `tokenize` (inherited from `MultiTaskInferenceMixin`; only the four backend hooks differ).

    Load it with `OnnxMultiTaskModel.from_pretrained(folder)`. Outputs match the PyTorch model's (float32: within
    1e-4, same labels and entity spans); `int8=True` runs `model_int8.onnx`.

    Attributes:
        config: the `MultiTaskConfig`; tokenizer: the tokenizer; session: the onnxruntime session of the text
        graph; int8: whether it runs the int8 graph; path: the export folder.
    """

    # One batch at a time, each on every intra-op thread of the session: onnxruntime parallelises inside an
    # operator well, and concurrent runs would share (and oversubscribe) one session's thread pool.
    inference_workers: int | None = 1
    device = torch.device("cpu")
    dtype = torch.float32

    def __init__(
        self,
        path: str | os.PathLike,
        config: Any,
        tokenizer: Any,
        int8: bool = False,
        threads: int | None = None,
        providers: Sequence[str] | None = None,
        file_name: str | None = None,
        session_config: dict[str, str] | None = None,
        check_source: bool = True,
    ):
        self.path = Path(path)
        self.config = config
        self.tokenizer = tokenizer
        self.int8 = int8
        self.description = json.loads((self.path / ONNX_CONFIG_NAME).read_text(encoding="utf-8"))
        stale = stale_source(self.description) if check_source else None
        if stale is not None:  # the graph would answer for a model that is no longer there
            raise FileError(
                f"{self.path} is an ONNX export of {stale}, which holds another model now (re-saved or retrained "
                f"since): export it again (mtl export {stale} -o {self.path}), or load {stale} itself, which "
                "exports on use"
            )
        files = self.description["files"]
        if int8 and "int8" not in files and file_name is None:
            raise MissingFileError(f"{self.path} has no int8 graph: export it with export_onnx(..., int8=True)")
        self.file_name = file_name or files["int8" if int8 else "fp32"]
        self.threads = int(threads or torch.get_num_threads())
        self.session = open_session(self.path / self.file_name, self.threads, providers, session_config)
        self.pair_session = (
            open_session(self.path / files["pair_heads"], 1, providers) if "pair_heads" in files else None
        )
        self._output_names = [output.name for output in self.session.get_outputs()]
        missing = [name for name in self.task_names if self._task_output(name) is None]
        if missing:
            raise FileError(f"{self.path} has no outputs for task(s) {missing}: export it again")

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        int8: bool = False,
        threads: int | None = None,
        export: bool = True,
        export_dir: str | os.PathLike | None = None,
        quantization: str = DEFAULT_QUANTIZATION,
        providers: Sequence[str] | None = None,
        file_name: str | None = None,
        session_config: dict[str, str] | None = None,
    ) -> OnnxMultiTaskModel:
        """Load an export folder, or a saved `MultiTaskModel` (exported on first use into `export_dir`, default
        `<folder>/onnx`, and again whenever the checkpoint's files change).

        Args:
            path: an `export_onnx` folder, a `save_pretrained` folder, or a Hub id (then `export_dir` is required).
            int8: run the int8 graph (exported with `quantization` if the folder lacks it).
            threads: onnxruntime intra-op threads; default `torch.get_num_threads()`.
            export: allow exporting; `False` raises if no up-to-date export exists.
            providers: onnxruntime execution providers; default CPU.
            file_name: run this graph of the folder instead (e.g. an int8 variant written with `quantize_int8`).
            session_config: onnxruntime session configuration entries, e.g.
                `{"session.intra_op.allow_spinning": "0"}` on a machine shared with other busy processes.
        """
        path_str = str(path)
        if os.path.isfile(os.path.join(path_str, ONNX_CONFIG_NAME)) and export_dir is None:
            return cls._load(path_str, int8, threads, providers, file_name, session_config)
        local = os.path.isdir(path_str)
        if export_dir is None:
            if not local:
                if os.path.exists(path_str) or path_str.startswith((".", "/")):
                    raise MissingFileError(f"{path_str}: no such model folder")
                raise InputError(f"{path_str} is not a local folder: give export_dir, where its export is written")
            export_dir = Path(path_str) / "onnx"
        export_dir = Path(export_dir)
        if not export_is_current(export_dir, path_str if local else None, int8):
            if not export:
                raise MissingFileError(f"no up-to-date ONNX export of {path_str} in {export_dir} (export=False)")
            export_onnx(path_str, export_dir, int8=int8, quantization=quantization)
        # checked against `path` just now (a Hub id: nothing to check against)
        return cls._load(export_dir, int8, threads, providers, file_name, session_config, check_source=False)

    @classmethod
    def _load(
        cls,
        folder: str | os.PathLike,
        int8: bool,
        threads: int | None,
        providers,
        file_name: str | None = None,
        session_config: dict[str, str] | None = None,
        check_source: bool = True,
    ) -> OnnxMultiTaskModel:
        config = MultiTaskConfig.from_pretrained(folder)
        tokenizer = AutoTokenizer.from_pretrained(folder, config=config.backbone_config)
        return cls(
            folder,
            config,
            tokenizer,
            int8=int8,
            threads=threads,
            providers=providers,
            file_name=file_name,
            session_config=session_config,
            check_source=check_source,
        )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({str(self.path)!r}, {self.file_name}, tasks={self.task_names}, "
            f"threads={self.threads})"
        )

    # ------------------------------------------------------------------ what the mixin needs

    @property
    def task_names(self) -> list[str]:
        return self.config.task_names

    def eval(self) -> OnnxMultiTaskModel:
        """A no-op (always in inference mode), for code written against `MultiTaskModel`."""
        return self

    def _task_output(self, name: str) -> str | None:
        """Where a task's outputs are: its logits in the text or pair-head graph, or `features` for a task scored on
        the embeddings (`Task.onnx_graph`); `None` when this export lacks them."""
        graph = self.config.task(name).onnx_graph
        if graph is None:
            return "features"
        if graph == "pair":
            return name if self.pair_session is not None else None
        output = output_name(name)
        return output if output in self._output_names else None

    def _inference_session(self):
        return nullcontext()

    def encode_tokens(
        self,
        tokens: PackedTokens | Sequence[Sequence[int]],
        batch_size: int = 32,
        normalize: bool | None = None,
        convert_to_tensor: bool = False,
        show_progress_bar: bool | None = None,
        precision: str | None = None,
    ) -> np.ndarray | torch.Tensor:
        """`MultiTaskInferenceMixin.encode_tokens` (same batches, same graph, same results), kept in numpy from
        the tokens to the output: a single text skips the batching plan and padding, and the L2 normalisation
        (`x / max(|x|, 1e-12)`, as `F.normalize`) runs in numpy. The Python around a one-sentence call is what
        single-request latency is made of (docs/ONNX.md measures it)."""
        if convert_to_tensor:
            return super().encode_tokens(tokens, batch_size, normalize, True, show_progress_bar, precision)
        if precision == "bfloat16":
            raise InputError("precision='bfloat16' is a PyTorch option; the ONNX backend runs float32 or int8 graphs")
        check_batch_size(batch_size)
        if not isinstance(tokens, PackedTokens):
            tokens = PackedTokens.from_lists(list(tokens))
        normalize = self.config.normalize if normalize is None else normalize
        count = len(tokens.lengths)
        if count == 1:  # one text: one unpadded row, nothing to plan
            ids = tokens.ids[None, : int(tokens.lengths[0])].astype(np.int64)
            feeds = text_graph_feeds(self.session, torch.from_numpy(ids), torch.ones(ids.shape, dtype=torch.int64))
            (features,) = self.session.run(["features"], feeds)
            return _l2_normalize(features) if normalize else features
        result = np.empty((count, self.config.embedding_dim), dtype=np.float32)
        if not count:
            return result

        def embed_batch(indices: np.ndarray, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
            (features,) = self.session.run(["features"], self._feeds(input_ids, attention_mask))
            result[indices] = _l2_normalize(features) if normalize else features

        self._for_each_batch(embed_batch, self._padded_batches(tokens, batch_size, show_progress_bar))
        return result

    def _feeds(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None
    ) -> dict[str, np.ndarray]:
        return text_graph_feeds(self.session, input_ids, attention_mask, token_type_ids)

    def _batch_features(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, precision: str | None = None
    ) -> torch.Tensor:
        if precision == "bfloat16":
            raise InputError("precision='bfloat16' is a PyTorch option; the ONNX backend runs float32 or int8 graphs")
        (features,) = self.session.run(["features"], self._feeds(input_ids, attention_mask))
        return torch.from_numpy(features)

    def _batch_logits(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        tasks: list[str],
        token_type_ids: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        names = [output_name(name) for name in tasks]
        values = self.session.run(names, self._feeds(input_ids, attention_mask, token_type_ids))
        return {name: torch.from_numpy(value) for name, value in zip(tasks, values)}

    def _pair_logits(self, name: str, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.pair_session is None:
            raise FileError(f"{self.path} has no pair-head graph for task '{name}': export it again")
        feeds = {"u": u.float().cpu().numpy(), "v": v.float().cpu().numpy()}
        (logits,) = self.pair_session.run([output_name(name)], feeds)
        return torch.from_numpy(logits)


def _l2_normalize(features: np.ndarray) -> np.ndarray:
    norms = np.sqrt(np.einsum("ij,ij->i", features, features))[:, None]
    return features / np.maximum(norms, 1e-12)
