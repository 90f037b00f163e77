"""onnxruntime sessions of an export, with the graph fusions that are slow on CPU kept off."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

# Two of onnxruntime's BERT fusions have CPU kernels slower than the ops they replace (`SkipLayerNormalization`
# against a `LayerNormalization` of the same tensor; a `BiasGelu` keeps the bias add that the matmul before it can
# absorb). The exported graph has them undone (`export._unfuse_slow_cpu_kernels`), and CPU sessions are kept from
# fusing them back (docs/ONNX.md measures both).
CPU_DISABLED_FUSIONS = ("SkipLayerNormFusion", "BiasGeluFusion")


def import_onnxruntime():
    try:
        import onnxruntime
    except ImportError as error:  # pragma: no cover - the `onnx` extra is missing
        raise ImportError(
            "the ONNX backend needs onnx and onnxruntime: pip install 'multitask-sentence-transformer[onnx]'"
        ) from error
    return onnxruntime


def open_session(
    path: str | os.PathLike,
    threads: int | None = None,
    providers: Sequence[str] | None = None,
    config_entries: dict[str, str] | None = None,
):
    onnxruntime = import_onnxruntime()
    options = onnxruntime.SessionOptions()
    for key, value in (config_entries or {}).items():  # e.g. {"session.intra_op.allow_spinning": "0"}
        options.add_session_config_entry(key, str(value))
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = int(threads or torch.get_num_threads())
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only: no "removing initializer" chatter at load time
    providers = list(providers) if providers else ["CPUExecutionProvider"]
    disabled = disabled_fusions(providers, onnxruntime.get_available_providers())
    return onnxruntime.InferenceSession(str(path), options, providers=providers, disabled_optimizers=disabled)


def disabled_fusions(providers: Sequence[Any], available: Sequence[str]) -> list[str]:
    """`CPU_DISABLED_FUSIONS` when the session will run on the CPU provider alone (a provider is a name or a
    `(name, options)` pair; requested providers this onnxruntime lacks fall back to CPU), else none: other
    providers have good fused kernels, and fusing is onnxruntime's default."""
    names = {provider if isinstance(provider, str) else provider[0] for provider in providers}
    accelerated = (names - {"CPUExecutionProvider"}) & set(available)
    return [] if accelerated else list(CPU_DISABLED_FUSIONS)


def text_graph_feeds(
    session, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None
) -> dict[str, np.ndarray]:
    """The inputs of a text graph: token type ids only where the graph takes them (zeros when none are given)."""
    feeds = {"input_ids": input_ids.numpy(), "attention_mask": attention_mask.numpy()}
    if any(item.name == "token_type_ids" for item in session.get_inputs()):
        types = token_type_ids if token_type_ids is not None else torch.zeros_like(input_ids)
        feeds["token_type_ids"] = types.numpy()
    return feeds


def run_text_graph(
    session, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None
) -> dict[str, np.ndarray]:
    names = [output.name for output in session.get_outputs()]
    values = session.run(names, text_graph_feeds(session, input_ids, attention_mask, token_type_ids))
    return dict(zip(names, values))
