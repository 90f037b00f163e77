"""ONNX export of a `MultiTaskModel` and an onnxruntime backend with the same `encode` / `predict` / `similarity`.

One call from a saved model folder to a running model (the first call exports into `MODEL_DIR/onnx`, later calls
load that export; a changed checkpoint is exported again):

```python
from multitask_st.onnx import OnnxMultiTaskModel

model = OnnxMultiTaskModel.from_pretrained("path/to/model", int8=True)
model.encode(["A man plays guitar."])
model.predict("John lives in Paris.")
```

Or in two steps, e.g. to ship only the export (`mtl export MODEL_DIR -o OUT --int8` does the first):

```python
from multitask_st.onnx import OnnxMultiTaskModel, export_onnx

export_onnx("path/to/model", "path/to/export", int8=True)
model = OnnxMultiTaskModel.from_pretrained("path/to/export", int8=True)
```

What is exported (docs/ONNX.md explains the choices):

- `model.onnx`: the whole model as one graph: encoder, pooling, projection and every single-text head. Inputs
  `input_ids` and `attention_mask`, int64 `(batch, seq)`, right-padded (1s then 0s), both axes dynamic. Outputs
  `features` (the pooled, projected, un-normalised vector the heads read), `embeddings` (the model's sentence
  embedding: `features`, L2-normalised when `config.normalize`) and `logits.<task>` for every classification,
  multi-label, regression (`(batch, labels)`) and token-classification (`(batch, seq, labels)`) task. Exported with
  the TorchScript exporter from an eager-attention copy of the model, then fused by onnxruntime's transformer
  optimizer (one `Attention` node per layer, fused embedding layer norm), exact GELU kept; the two fusions whose
  CPU kernels are slow (skip layer norm, bias+GELU) are undone (`CPU_DISABLED_FUSIONS`).
- `model_int8.onnx` (with `int8=True`): the same graph with the encoder's matmuls in int8 (per-channel weights,
  activations quantised at run time), except a few calibrated outlier input channels per matmul that a thin side
  matmul keeps in float32 (`QUANTIZATION`, "outlier-split"): STS-B within 0.15 of float32 where plain dynamic
  int8 loses 0.3.
- `pair_heads.onnx` (only for models with `pair_classification` tasks): inputs `u`, `v` `(pairs, embedding_dim)`
  (the `features` of both sides), outputs `logits.<task>` for each pair-classification head. onnxruntime runs every
  node of a graph whatever outputs are asked for, so feature inputs in the text graph would cost every call.
- `config.json`, the tokenizer files and `onnx_config.json` (outputs, tasks, how it was made, parity measured at
  export time), so the folder is complete on its own.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from inference_mtl import MultiTaskInferenceMixin, PackedTokens

from .onnx_cli import (  # noqa: F401  the command-line half, importable without torch
    DEFAULT_OPSET,
    DEFAULT_QUANTIZATION,
    ONNX_CONFIG_NAME,
    SCHEMES,
    add_export_arguments,
    run_export,
)
from .onnx_cli import main as export_main

MODEL_FILE = "model.onnx"
INT8_FILE = "model_int8.onnx"
PAIR_HEADS_FILE = "pair_heads.onnx"
FORMAT_VERSION = 2  # 2: layer norms and GELU bias adds unfused for CPU (older exports are made again)
# Single-text heads: read the pooled features (sequence tasks) or the token states (token tasks).
TOKEN_TASK_TYPES = ("token_classification",)

# int8 schemes: onnxruntime dynamic quantisation of the encoder's matmuls in the fused fp32 graph (int8 weights,
# uint8 activations quantised per tensor at run time; projection and heads stay float32). Measured in docs/ONNX.md.
# - "outlier-split" (default): per-channel weights, and the few input channels of a matmul whose calibrated range is
#   far above the others (LayerNorm outlier features, rare huge GELU units) computed in float32 by a thin side
#   matmul, so they no longer set the activation scale of every other channel. Exact in float32; 3x less
#   embedding error than "per-channel" for ~10% more CPU time (docs/ONNX.md).
# - "per-channel": one weight scale per output channel, nothing kept in float32.
# - "per-tensor": one weight scale per matrix (what optimum's avx512_vnni/avx2 dynamic configurations do).
QUANTIZATION: dict[str, dict[str, Any]] = {
    "outlier-split": {"per_channel": True, "split_outliers": True},
    "per-channel": {"per_channel": True, "split_outliers": False},
    "per-tensor": {"per_channel": False, "split_outliers": False},
}
assert tuple(QUANTIZATION) == SCHEMES  # the command line (onnx_cli, which must not import torch) lists the same
# An input channel is an outlier when its largest |value| over the calibration tokens exceeds this many times the
# median channel's; at most this many channels per matmul are split off.
OUTLIER_FACTOR = 4.0
MAX_OUTLIER_CHANNELS = 8

# Two of onnxruntime's BERT fusions have CPU kernels slower than the ops they replace (onnxruntime 1.32, AVX512:
# `SkipLayerNormalization` takes ~5x a `LayerNormalization` of the same tensor; a `BiasGelu` keeps the bias add that
# the matmul before it can absorb). The exported graph has them undone by `_unfuse_slow_cpu_kernels`, and CPU
# sessions are kept from fusing them back (docs/ONNX.md: the int8 graph runs 1.20x faster, fp32 1.04x, batch 32).
CPU_DISABLED_FUSIONS = ("SkipLayerNormFusion", "BiasGeluFusion")

# Sentences of varied length for the parity check at export time (real text, so the fused graph sees real tokens).
_CHECK_TEXTS = (
    "A man is playing a guitar.",
    "Hi",
    "",
    "The quick brown fox jumps over the lazy dog near the river bank, while John Smith of Acme Corp. watches.",
    "Scientists discovered a new species of frog in Brazil last summer.",
)


def _load_model_class():
    from modeling_mtl import MultiTaskModel

    return MultiTaskModel


def _import_onnxruntime():
    try:
        import onnxruntime
    except ImportError as error:  # pragma: no cover - the `onnx` extra is missing
        raise ImportError(
            "the ONNX backend needs onnx and onnxruntime: pip install 'multitask-sentence-transformer[onnx]'"
        ) from error
    return onnxruntime


# ---------------------------------------------------------------------------------------------- export


class _TextGraph(nn.Module):
    """What `model.onnx` computes: the model's `_batch_features` and `_batch_logits` in one pass."""

    def __init__(self, model: nn.Module, sequence_tasks: list[str], token_tasks: list[str]):
        super().__init__()
        self.model = model
        self.sequence_tasks = sequence_tasks
        self.token_tasks = token_tasks

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        from modeling_mtl import _TextGroups

        # The model's own pass and its own rule for what each head reads (shared vector, own pooling, own adapter
        # or top layers, token states).
        texts = _TextGroups(input_ids, attention_mask, None, None, None)
        tasks = [name for name in self.model.config.task_names if name in self.sequence_tasks + self.token_tasks]
        depth = max((self.model.heads[name].branch_depth for name in tasks), default=0)
        encoder_outputs, grouped = self.model._encode(texts, branch_depth=depth)  # (batch, 1, embedding_dim)
        token_states = encoder_outputs.last_hidden_state
        features = grouped[:, 0]
        embeddings = F.normalize(features, p=2, dim=-1) if self.model.config.normalize else features
        logits = [self.model._task_logits(name, grouped, token_states, attention_mask, texts) for name in tasks]
        return (features, embeddings, *logits)


class _PairGraph(nn.Module):
    """What `pair_heads.onnx` computes: every pair-classification head on two batches of features."""

    def __init__(self, model: nn.Module, pair_tasks: list[str]):
        super().__init__()
        self.model = model
        self.pair_tasks = pair_tasks

    def forward(self, u: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.model.pair_head_logits(name, u, v) for name in self.pair_tasks)


def _task_lists(config) -> tuple[list[str], list[str], list[str]]:
    from configuration_mtl import SEQUENCE_TASK_TYPES  # already loaded with the config; lazy as in `from_pretrained`

    sequence = [t["name"] for t in config.tasks if t["type"] in SEQUENCE_TASK_TYPES]
    token = [t["name"] for t in config.tasks if t["type"] in TOKEN_TASK_TYPES]
    pair = [t["name"] for t in config.tasks if t["type"] == "pair_classification"]
    return sequence, token, pair


def _output_name(task: str) -> str:
    return f"logits.{task}"


def _fingerprint(path: str | os.PathLike) -> str | None:
    """A cheap identity of a saved checkpoint folder: names, sizes and modification times of its config and weight
    files (a re-saved or retrained model changes it). `None` for something that is not a local folder."""
    folder = Path(path)
    if not folder.is_dir():
        return None
    entries = []
    for file in sorted(folder.iterdir()):
        if file.is_file() and (file.name == "config.json" or file.suffix in (".safetensors", ".bin", ".pt")):
            stat = file.stat()
            entries.append([file.name, stat.st_size, stat.st_mtime_ns])
    return hashlib.sha1(json.dumps(entries).encode()).hexdigest() if entries else None


def _check_inputs(tokenizer, texts: Sequence[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded int64 `(input_ids, attention_mask)` of `texts`, as `encode` batches them."""
    rows = tokenizer(list(texts), truncation=True, max_length=max_length, add_special_tokens=True)["input_ids"]
    width = max(len(row) for row in rows)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(rows), width), pad_id, dtype=torch.int64)
    mask = torch.zeros((len(rows), width), dtype=torch.int64)
    for index, row in enumerate(rows):
        ids[index, : len(row)] = torch.tensor(row, dtype=torch.int64)
        mask[index, : len(row)] = 1
    return ids, mask


def _session(
    path: str | os.PathLike,
    threads: int | None = None,
    providers: Sequence[str] | None = None,
    config_entries: dict[str, str] | None = None,
):
    onnxruntime = _import_onnxruntime()
    options = onnxruntime.SessionOptions()
    for key, value in (config_entries or {}).items():  # e.g. {"session.intra_op.allow_spinning": "0"}
        options.add_session_config_entry(key, str(value))
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = int(threads or torch.get_num_threads())
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only: no "removing initializer" chatter at load time
    providers = list(providers) if providers else ["CPUExecutionProvider"]
    disabled = _disabled_fusions(providers, onnxruntime.get_available_providers())
    return onnxruntime.InferenceSession(str(path), options, providers=providers, disabled_optimizers=disabled)


def _disabled_fusions(providers: Sequence[Any], available: Sequence[str]) -> list[str]:
    """`CPU_DISABLED_FUSIONS` when the session will run on the CPU provider alone (a provider is a name or a
    `(name, options)` pair; requested providers this onnxruntime lacks fall back to CPU), else none: other
    providers have good fused kernels, and fusing is onnxruntime's default."""
    names = {provider if isinstance(provider, str) else provider[0] for provider in providers}
    accelerated = (names - {"CPUExecutionProvider"}) & set(available)
    return [] if accelerated else list(CPU_DISABLED_FUSIONS)


def _run_text_graph(session, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, np.ndarray]:
    names = [output.name for output in session.get_outputs()]
    values = session.run(names, {"input_ids": input_ids.numpy(), "attention_mask": attention_mask.numpy()})
    return dict(zip(names, values))


def _max_abs_diff(
    reference: dict[str, torch.Tensor], outputs: dict[str, np.ndarray], attention_mask: torch.Tensor
) -> dict[str, float]:
    """Max |difference| per output; token outputs `(batch, seq, labels)` compared on real tokens only (what
    padded positions hold is never read)."""
    real = attention_mask.numpy().astype(bool)
    diffs = {}
    for name, value in reference.items():
        difference = np.abs(outputs[name] - value.numpy())
        if difference.ndim == 3:
            difference = difference[real]
        diffs[name] = float(difference.max()) if difference.size else 0.0
    return diffs


def _export_text_graph(model, path: Path, opset: int, sequence: list[str], token: list[str]) -> list[str]:
    """Trace `_TextGraph` into `path` with dynamic batch and sequence axes; returns the output names."""
    wrapper = _TextGraph(model, sequence, token).eval()
    output_names = ["features", "embeddings"] + [
        _output_name(name) for name in model.config.task_names if name in sequence or name in token
    ]
    dynamic_axes: dict[str, dict[int, str]] = {
        "input_ids": {0: "batch", 1: "sequence"},
        "attention_mask": {0: "batch", 1: "sequence"},
        "features": {0: "batch"},
        "embeddings": {0: "batch"},
    }
    for name in sequence:
        dynamic_axes[_output_name(name)] = {0: "batch"}
    for name in token:
        dynamic_axes[_output_name(name)] = {0: "batch", 1: "sequence"}
    # A dummy batch with a padded row, so every mask-dependent step is traced on a real mask.
    vocab = int(model.config.backbone_config.vocab_size)
    ids = torch.arange(16, dtype=torch.int64).remainder(vocab).view(2, 8)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    with warnings.catch_warnings(), torch.no_grad():
        # The TorchScript exporter warns that it is legacy, and the tracer about Python conditions on shapes that
        # are constant for right-padded inputs (checked by the parity test at export time).
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper,
            (ids, mask),
            str(path),
            input_names=["input_ids", "attention_mask"],
            output_names=output_names,
            dynamic_axes=dynamic_axes,
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    return output_names


def _fuse(source: Path, target: Path, backbone_config) -> dict[str, int]:
    """onnxruntime's transformer fusion of an exported BERT-style graph; returns the node types it produced."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions("bert")
    options.use_raw_attention_mask(True)  # any 0/1 mask, not only lengths
    options.enable_gelu_approximation = False  # keep the exact GELU: outputs stay those of PyTorch
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optimized = optimize_model(
            str(source),
            model_type="bert",
            num_heads=int(getattr(backbone_config, "num_attention_heads", 0) or 0),
            hidden_size=int(getattr(backbone_config, "hidden_size", 0) or 0),
            optimization_options=options,
            opt_level=0,  # fusion only: no hardware-specific ORT rewrites baked into the file
        )
    _unfuse_slow_cpu_kernels(optimized.model)
    optimized.save_model_to_file(str(target))
    counts: dict[str, int] = {}
    for node in optimized.model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def _unfuse_slow_cpu_kernels(model) -> None:
    """Rewrite (in place) `SkipLayerNormalization(x, skip, gamma, beta, bias)` as `LayerNormalization((x + bias) +
    skip)` and `BiasGelu(x, bias)` as `Gelu(x + bias)`: the same arithmetic, with the bias add first so that
    onnxruntime folds it into the matmul that produces `x` (`CPU_DISABLED_FUSIONS`)."""
    from onnx import helper

    # LayerNormalization is a standard op from opset 17 (an older opset keeps the fused node).
    has_layer_norm = any(entry.domain in ("", "ai.onnx") and entry.version >= 17 for entry in model.opset_import)
    nodes = []
    for node in model.graph.node:
        outputs = list(node.output) + [""] * 4
        if node.op_type == "SkipLayerNormalization" and has_layer_norm and not (outputs[1] or outputs[2]):
            x, skip, gamma, beta = node.input[:4]
            if len(node.input) > 4 and node.input[4]:
                nodes.append(helper.make_node("Add", [x, node.input[4]], [f"{node.name}/biased"], f"{node.name}/bias"))
                x = f"{node.name}/biased"
            total = outputs[3] or f"{node.name}/sum"  # output 3: the sum, when a later node reads it
            nodes.append(helper.make_node("Add", [x, skip], [total], f"{node.name}/skip"))
            epsilon = [attribute.f for attribute in node.attribute if attribute.name == "epsilon"]
            nodes.append(
                helper.make_node(
                    "LayerNormalization",
                    [total, gamma, beta],
                    [outputs[0]],
                    f"{node.name}/norm",
                    axis=-1,
                    epsilon=epsilon[0] if epsilon else 1e-12,
                )
            )
        elif node.op_type == "BiasGelu":
            nodes.append(helper.make_node("Add", list(node.input[:2]), [f"{node.name}/biased"], f"{node.name}/bias"))
            nodes.append(
                helper.make_node("Gelu", [f"{node.name}/biased"], [node.output[0]], node.name, domain="com.microsoft")
            )
        else:
            nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)


def default_calibration_texts() -> list[str]:
    """The ~500 English sentences shipped in `multitask_st/default_data` (news-like, varied lengths): enough to find
    a model's outlier channels, which are a property of the weights more than of the domain."""
    folder = Path(__file__).resolve().parent / "default_data"
    texts: list[str] = []
    for name in ("default_train.jsonl", "default_eval.jsonl"):
        path = folder / name
        if path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    text = json.loads(line).get("text")
                    if isinstance(text, str) and text:
                        texts.append(text)
    return texts or list(_CHECK_TEXTS)


def calibration_feeds(tokenizer, texts: Sequence[str], max_length: int, batch_size: int = 32) -> list[dict]:
    feeds = []
    for start in range(0, len(texts), batch_size):
        ids, mask = _check_inputs(tokenizer, texts[start : start + batch_size], max_length)
        feeds.append({"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
    return feeds


def _encoder_matmuls(model) -> tuple[list[Any], dict[str, Any]]:
    """The encoder's weight matmuls (constant 2-D right operand) and fused Attention nodes; heads, projection and
    pooling are named after their modules (`/<task>/...`, `/projection/...`) and stay float32."""
    from onnx import numpy_helper

    initializers = {init.name: init for init in model.graph.initializer}
    chosen = []
    for node in model.graph.node:
        if node.op_type == "Attention" or (
            node.op_type == "MatMul"
            and node.name.startswith("/backbone/")
            and "/outlier_" not in node.name  # the float32 side matmuls of the outlier split
            and node.input[1] in initializers
            and len(numpy_helper.to_array(initializers[node.input[1]]).shape) == 2
        ):
            chosen.append(node)
    return chosen, initializers


def _split_outliers(model, feeds: list[dict], factor: float, max_channels: int) -> tuple[list[str], dict]:
    """Rewrite `x @ W` as `(x * keep) @ W + x[..., idx] @ W[idx]` for every encoder MatMul whose calibrated input
    has outlier channels `idx` (in place); returns the names of the float32 side matmuls and what was split.

    When `x` is an FFN's activation `Gelu(h @ W1 + b1)` read by this matmul only (an FFN's second matmul), the
    outlier units are silenced in the GELU itself instead (their bias set to -1e4: GELU gives exactly 0 there) and
    recomputed on the side from the FFN input `h`, so no extra pass over the wide activation is needed."""
    nodes, initializers = _encoder_matmuls(model)
    matmuls = [node for node in nodes if node.op_type == "MatMul"]
    if not matmuls:
        return [], {}
    maxima = _calibrated_input_maxima(model, matmuls, feeds)
    producers, readers = _producers_and_readers(model)
    # Found before any rewrite: splitting an FFN's first matmul renames its input, and the side matmul of its second
    # must read the original one.
    ffns = {node.name: _ffn_gelu(node.input[0], producers, readers, initializers) for node in matmuls}
    side_names, report = [], {}
    for node in matmuls:
        outliers = _outlier_channels(maxima[node.input[0]], factor, max_channels)
        if not len(outliers):
            continue
        _split_matmul(model, node, outliers, initializers, ffns[node.name])
        side_names.append(f"{node.name}/outlier_matmul")
        report[node.name] = [int(index) for index in outliers]
    return side_names, report


def _calibrated_input_maxima(model, matmuls: list[Any], feeds: list[dict]) -> dict[str, np.ndarray]:
    """Largest |value| per input channel of each matmul's input `x`, over the real tokens of the calibration feeds
    (the graph run once per feed with every `x` added as an output)."""
    import onnx
    import onnxruntime
    from onnx import helper

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    inputs = list(dict.fromkeys(node.input[0] for node in matmuls))
    for name in inputs:
        probe.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = torch.get_num_threads()
    session = onnxruntime.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    maxima: dict[str, np.ndarray] = {}
    for feed in feeds:
        real = feed["attention_mask"].reshape(-1).astype(bool)  # real tokens only
        for name, value in zip(inputs, session.run(inputs, feed)):
            channel_max = np.abs(value.reshape(-1, value.shape[-1])[real]).max(axis=0)
            maxima[name] = channel_max if name not in maxima else np.maximum(maxima[name], channel_max)
    return maxima


def _producers_and_readers(model) -> tuple[dict[str, Any], dict[str, int]]:
    """The node that produces each tensor, and how many node inputs read each tensor."""
    producers = {output: node for node in model.graph.node for output in node.output}
    readers: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    return producers, readers


def _outlier_channels(channel_max: np.ndarray, factor: float, max_channels: int) -> np.ndarray:
    """The (sorted) channels among the `max_channels` largest whose maximum exceeds `factor` times the median."""
    order = np.argsort(-channel_max)[:max_channels]
    return np.sort(order[channel_max[order] > factor * np.median(channel_max)])


def _ffn_gelu(x: str, producers: dict[str, Any], readers: dict[str, int], initializers: dict[str, Any]):
    """When `x` is `Gelu(h @ W1 + b1)` (an FFN's activation, each step read by the next only, `W1` and `b1`
    constants), `(h, W1, the Add node, the index of b1 among its inputs)`; else `None`."""
    from onnx import numpy_helper

    gelu = producers.get(x)
    # The exact GELU of onnxruntime's domain (what fusion and `_unfuse_slow_cpu_kernels` write): the side path
    # recomputes the outlier units with that same op.
    if gelu is None or gelu.op_type != "Gelu" or gelu.domain != "com.microsoft" or readers.get(x) != 1:
        return None
    add = producers.get(gelu.input[0])
    if add is None or add.op_type != "Add" or readers.get(add.output[0]) != 1:
        return None
    for bias_index in (0, 1):
        bias, pre = add.input[bias_index], add.input[1 - bias_index]
        matmul = producers.get(pre)
        if (
            bias in initializers
            and matmul is not None
            and matmul.op_type == "MatMul"
            and readers.get(pre) == 1
            and matmul.input[1] in initializers
        ):
            bias_shape = numpy_helper.to_array(initializers[bias]).shape
            weight_shape = numpy_helper.to_array(initializers[matmul.input[1]]).shape
            if len(weight_shape) == 2 and bias_shape == (weight_shape[1],):  # one bias per unit, no broadcast
                return matmul.input[0], matmul.input[1], add, bias_index
    return None


def _split_matmul(model, node, outliers: np.ndarray, initializers: dict[str, Any], ffn) -> None:
    """Rewrite one MatMul `x @ W -> y` in place: the inlier product plus `outliers @ W[outliers]` (a float32 side
    matmul, `<name>/outlier_matmul`), summed into `y`. The outlier inputs come from the FFN's first matmul when
    `ffn` (from `_ffn_gelu`) is given."""
    from onnx import helper, numpy_helper

    weight = numpy_helper.to_array(initializers[node.input[1]])
    prefix, y = node.name, node.output[0]
    new_initializers = [numpy_helper.from_array(np.ascontiguousarray(weight[outliers]), f"{prefix}/outlier_weight")]
    if ffn is not None:
        side_initializers, before = _outliers_from_ffn(prefix, ffn, outliers, initializers)
    else:
        side_initializers, before = _outliers_from_input(node, outliers, weight.shape[0])
    model.graph.initializer.extend(new_initializers + side_initializers)
    node.output[0] = f"{prefix}/inlier_product"
    side = helper.make_node(
        "MatMul",
        [f"{prefix}/outliers", f"{prefix}/outlier_weight"],
        [f"{prefix}/outlier_product"],
        name=f"{prefix}/outlier_matmul",
    )
    bias_add = _sole_bias_add(model, y, initializers)
    if bias_add is not None:
        # Sum after the layer's bias add, which then reads the matmul directly and is folded into it by onnxruntime.
        bias_add.input[list(bias_add.input).index(y)] = f"{prefix}/inlier_product"
        total = bias_add.output[0]
        bias_add.output[0] = f"{prefix}/biased_product"
        add = helper.make_node(
            "Add", [f"{prefix}/biased_product", f"{prefix}/outlier_product"], [total], name=f"{prefix}/outlier_add"
        )
    else:
        bias_add = node
        add = helper.make_node(
            "Add", [f"{prefix}/inlier_product", f"{prefix}/outlier_product"], [y], name=f"{prefix}/outlier_add"
        )
    nodes = model.graph.node
    nodes.insert(list(nodes).index(bias_add) + 1, add)
    nodes.insert(list(nodes).index(node) + 1, side)
    position = list(nodes).index(node)
    for offset, new in enumerate(before):
        nodes.insert(position + offset, new)


def _sole_bias_add(model, y: str, initializers: dict[str, Any]):
    """The `Add` of a 1-D constant (a layer's bias) that is the only reader of `y`, else `None`."""
    from onnx import numpy_helper

    if any(output.name == y for output in model.graph.output):  # renaming it would remove a graph output
        return None
    readers = [node for node in model.graph.node if y in node.input]
    if len(readers) != 1 or readers[0].op_type != "Add":
        return None
    (other,) = [name for name in readers[0].input if name != y] or [None]
    if other in initializers and numpy_helper.to_array(initializers[other]).ndim == 1:
        return readers[0]
    return None


def _outliers_from_ffn(prefix: str, ffn, outliers: np.ndarray, initializers: dict[str, Any]) -> tuple[list, list]:
    """Silence the outlier units of an FFN activation `Gelu(h @ W1 + b1)` (their bias set to -1e4: GELU gives
    exactly 0) and recompute them on the side as `Gelu(h @ W1[:, outliers] + b1[outliers])` into
    `<prefix>/outliers`, a thin float32 matmul on the FFN input; returns the new initializers and the nodes to put
    before the matmul. The main matmul and bias add stay untouched, so onnxruntime still fuses them."""
    from onnx import helper, numpy_helper

    h, first_weight_name, add, bias_index = ffn
    bias = numpy_helper.to_array(initializers[add.input[bias_index]])
    silenced = bias.copy()
    silenced[outliers] = -1e4
    first_weight = numpy_helper.to_array(initializers[first_weight_name])
    new_initializers = [
        numpy_helper.from_array(silenced, f"{prefix}/silenced_bias"),
        numpy_helper.from_array(np.ascontiguousarray(first_weight[:, outliers]), f"{prefix}/outlier_pre_weight"),
        numpy_helper.from_array(np.ascontiguousarray(bias[outliers]), f"{prefix}/outlier_bias"),
    ]
    add.input[bias_index] = f"{prefix}/silenced_bias"
    before = [
        helper.make_node(
            "MatMul",
            [h, f"{prefix}/outlier_pre_weight"],
            [f"{prefix}/outlier_pre"],
            name=f"{prefix}/outlier_pre_matmul",
        ),
        helper.make_node(
            "Add",
            [f"{prefix}/outlier_pre", f"{prefix}/outlier_bias"],
            [f"{prefix}/outlier_biased"],
            name=f"{prefix}/outlier_bias_add",
        ),
        helper.make_node(
            "Gelu",
            [f"{prefix}/outlier_biased"],
            [f"{prefix}/outliers"],
            name=f"{prefix}/outlier_gelu",
            domain="com.microsoft",
        ),
    ]
    return new_initializers, before


def _outliers_from_input(node, outliers: np.ndarray, channels: int) -> tuple[list, list]:
    """Make `node` read its input `x` with the outlier channels zeroed (`<name>/inliers`) and gather them into
    `<name>/outliers`; returns the new initializers and the nodes to put before the matmul."""
    from onnx import helper, numpy_helper

    prefix, x = node.name, node.input[0]
    gather = helper.make_node(
        "Gather", [x, f"{prefix}/outlier_index"], [f"{prefix}/outliers"], axis=-1, name=f"{prefix}/gather"
    )
    keep = np.ones(channels, dtype=np.float32)
    keep[outliers] = 0.0
    new_initializers = [
        numpy_helper.from_array(keep, f"{prefix}/outlier_keep"),
        numpy_helper.from_array(outliers.astype(np.int64), f"{prefix}/outlier_index"),
    ]
    node.input[0] = f"{prefix}/inliers"
    before = [
        helper.make_node("Mul", [x, f"{prefix}/outlier_keep"], [f"{prefix}/inliers"], name=f"{prefix}/keep"),
        gather,
    ]
    return new_initializers, before


def _max_output_difference(reference, rewritten, feeds: list[dict]) -> float:
    """Largest difference between two graphs' first outputs (float32 rewrites must not change results)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    first = onnxruntime.InferenceSession(reference.SerializeToString(), options, providers=["CPUExecutionProvider"])
    second = onnxruntime.InferenceSession(rewritten.SerializeToString(), options, providers=["CPUExecutionProvider"])
    name = first.get_outputs()[0].name
    return max(float(np.abs(first.run([name], f)[0] - second.run([name], f)[0]).max()) for f in feeds)


def quantize_int8(
    source: str | os.PathLike,
    target: str | os.PathLike,
    scheme: str = DEFAULT_QUANTIZATION,
    calibration: list[dict] | None = None,
) -> dict[str, Any]:
    """Write an int8 copy of an fp32 text graph (`model.onnx`) with one of the `QUANTIZATION` schemes.

    Args:
        calibration: onnxruntime feeds (`input_ids`, `attention_mask` arrays) for "outlier-split"; see
            `default_calibration_texts`.

    Returns: what was done (`quantized` node count, `outlier_channels` per split matmul).
    """
    if scheme not in QUANTIZATION:
        raise ValueError(f"unknown quantization scheme {scheme!r}; choose from {sorted(QUANTIZATION)}")
    import logging

    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    options = QUANTIZATION[scheme]
    model = onnx.load(str(source))
    split: dict[str, list[int]] = {}
    split_difference = None
    if options["split_outliers"]:
        if not calibration:
            raise ValueError(f"scheme {scheme!r} needs calibration feeds")
        original = onnx.ModelProto()
        original.CopyFrom(model)
        _, split = _split_outliers(model, calibration, OUTLIER_FACTOR, MAX_OUTLIER_CHANNELS)
        # The rewrite is exact in float32 (up to summation order): checked before anything is quantised.
        split_difference = _max_output_difference(original, model, calibration[:2])
        if split_difference > 1e-3:
            raise RuntimeError(f"the outlier split changed the float32 outputs (max abs diff {split_difference})")
    to_quantize = [node.name for node in _encoder_matmuls(model)[0]]
    with tempfile.TemporaryDirectory() as scratch:
        prepared = Path(scratch) / "prepared.onnx"
        onnx.save(model, str(prepared))
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)  # the quantizer logs a generic "consider pre-processing" warning on every call
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                quantize_dynamic(
                    prepared,
                    Path(target),
                    nodes_to_quantize=to_quantize,
                    per_channel=options["per_channel"],
                    reduce_range=False,
                    weight_type=QuantType.QInt8,
                    # Shape inference cannot type the outputs of fused contrib ops (Attention): they are float32.
                    extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
                )
        finally:
            root.setLevel(level)
    return {"quantized": len(to_quantize), "outlier_channels": split, "split_max_abs_diff": split_difference}


def _export_pair_graph(model, path: Path, opset: int, pair: list[str]) -> None:
    wrapper = _PairGraph(model, pair).eval()
    dim = int(model.config.embedding_dim)
    u, v = torch.randn(3, dim), torch.randn(3, dim)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper,
            (u, v),
            str(path),
            input_names=["u", "v"],
            output_names=[_output_name(name) for name in pair],
            dynamic_axes={"u": {0: "pairs"}, "v": {0: "pairs"}, **{_output_name(n): {0: "pairs"} for n in pair}},
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )


@contextmanager
def _eager_attention(model) -> Iterator[None]:
    """Eager attention while tracing: its MatMul/Softmax pattern is what onnxruntime's fusion turns into one
    `Attention` node (the traced SDPA decomposition is not recognised). Restored afterwards."""
    backbone = model.backbone
    before = getattr(backbone.config, "_attn_implementation", None)
    setter = getattr(backbone, "set_attn_implementation", None)
    changed = False
    if before not in (None, "eager"):
        try:
            if setter is not None:
                setter("eager")
            else:
                backbone.config._attn_implementation = "eager"
            changed = True
        except (ValueError, TypeError, AttributeError):  # a backbone without the switch: trace what it has
            changed = False
    try:
        yield
    finally:
        if changed:
            if setter is not None:
                setter(before)
            else:
                backbone.config._attn_implementation = before


def export_onnx(
    model_or_path: Any,
    output_dir: str | os.PathLike | None = None,
    *,
    int8: bool = False,
    quantization: str = DEFAULT_QUANTIZATION,
    optimize: bool = True,
    opset: int = DEFAULT_OPSET,
    tolerance: float = 1e-4,
    calibration_texts: Sequence[str] | None = None,
) -> Path:
    """Export a `MultiTaskModel` (or a saved one: folder or Hub id) to a folder `OnnxMultiTaskModel` loads.

    Args:
        model_or_path: a `MultiTaskModel`, or what `MultiTaskModel.from_pretrained` takes.
        output_dir: where to write; default `<model folder>/onnx` (required for an in-memory model or a Hub id).
        int8: also write `model_int8.onnx`, quantised with `quantization` (one of `QUANTIZATION`).
        optimize: fuse the graph with onnxruntime's transformer optimizer (kept only if it still matches PyTorch
            within `tolerance`; otherwise the plain export is used, with a warning).
        opset: ONNX opset of the exported graphs.
        tolerance: largest max-abs difference to PyTorch float32 (features and every head's logits) accepted on
            the check sentences; a larger one is an error.
        calibration_texts: sentences that find the outlier channels for the "outlier-split" int8 scheme (default
            `default_calibration_texts()`, ~500 sentences shipped with the package).

    Returns:
        The output folder: `model.onnx`, `model_int8.onnx` (if `int8`), `pair_heads.onnx` (if the model has
        pair-classification tasks), `config.json`, the tokenizer, `onnx_config.json`.
    """
    _import_onnxruntime()
    if quantization not in QUANTIZATION:
        raise ValueError(f"unknown quantization scheme {quantization!r}; choose from {sorted(QUANTIZATION)}")
    model, source = _model_and_source(model_or_path)
    output_dir = _prepare_output_dir(model, source, output_dir)
    if model.device.type != "cpu" or model.dtype != torch.float32:
        model = copy.deepcopy(model).to("cpu", torch.float32)
    was_training = model.training
    model.eval()
    config = model.config
    tasks = _task_lists(config)
    started = time.perf_counter()
    ids, mask = _check_inputs(model.tokenizer, _CHECK_TEXTS, config.max_seq_length)
    try:
        written = _write_graphs(
            model, output_dir, ids, mask, tasks, int8, quantization, optimize, opset, tolerance, calibration_texts
        )
    finally:
        model.train(was_training)
    config.save_pretrained(output_dir)
    model.tokenizer.save_pretrained(output_dir)
    description = _export_description(config, written, tasks, opset, int8, quantization, source, started)
    # Written last: its presence marks a complete export.
    (output_dir / ONNX_CONFIG_NAME).write_text(json.dumps(description, indent=2) + "\n", encoding="utf-8")
    return output_dir


def _model_and_source(model_or_path: Any) -> tuple[Any, str | None]:
    """The model to export, and the path or Hub id it was loaded from (`None` for an in-memory model)."""
    model_class = _load_model_class()
    if isinstance(model_or_path, model_class):
        return model_or_path, None
    source = str(model_or_path)
    return model_class.from_pretrained(source), source


def _prepare_output_dir(model, source: str | None, output_dir: str | os.PathLike | None) -> Path:
    """The export folder (default `<source folder>/onnx`), created, without its `onnx_config.json`."""
    if output_dir is None:
        if source is None or not os.path.isdir(source):
            raise ValueError("export_onnx needs output_dir for an in-memory model or a Hub id")
        output_dir = Path(source) / "onnx"
    if model.tokenizer is None:
        raise ValueError("the model has no tokenizer; the export folder needs one (set `model.tokenizer`)")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    # An export in progress (or interrupted) is never taken for a complete one: the description goes first.
    (output_dir / ONNX_CONFIG_NAME).unlink(missing_ok=True)
    return output_dir


@dataclass
class _WrittenGraphs:
    """What `_write_graphs` put in the export folder, for `onnx_config.json`."""

    output_names: list[str]
    files: dict[str, str]
    fused_nodes: dict[str, int] | None
    diff: dict[str, float]
    int8_check: dict[str, Any] | None
    pair_diff: dict[str, float] | None


def _write_graphs(
    model,
    output_dir: Path,
    ids: torch.Tensor,
    mask: torch.Tensor,
    tasks: tuple[list[str], list[str], list[str]],
    int8: bool,
    quantization: str,
    optimize: bool,
    opset: int,
    tolerance: float,
    calibration_texts: Sequence[str] | None,
) -> _WrittenGraphs:
    """Export, check against PyTorch and move into `output_dir` the text graph (fused if `optimize` and still
    within `tolerance`), the int8 graph (if `int8`) and the pair-head graph (if the model has pair tasks); an int8
    or pair-head graph left by an older export that this one does not write is removed."""
    sequence, token, pair = tasks
    reference = _reference_outputs(model, sequence, token, ids, mask)
    with tempfile.TemporaryDirectory(dir=output_dir, prefix=".export-") as scratch:
        scratch = Path(scratch)
        output_names, diff = _export_checked_text_graph(model, scratch, opset, tasks, reference, ids, mask, tolerance)
        chosen, fused_nodes = scratch / "plain.onnx", None
        if optimize:
            fused = _fuse_checked(scratch, model.config.backbone_config, reference, ids, mask, tolerance)
            if fused is not None:
                chosen, (fused_nodes, diff) = scratch / "fused.onnx", fused
        os.replace(chosen, output_dir / MODEL_FILE)
        files = {"fp32": MODEL_FILE}
        int8_check = None
        if int8:
            int8_check = _write_int8_graph(
                model, output_dir, scratch, quantization, calibration_texts, reference["features"], ids, mask
            )
            files["int8"] = INT8_FILE
        elif (output_dir / INT8_FILE).exists():
            (output_dir / INT8_FILE).unlink()  # from an older export of another model: stale
        pair_diff = None
        if pair:
            pair_diff = _write_pair_graph(model, output_dir, scratch, opset, pair, reference["features"], tolerance)
            files["pair_heads"] = PAIR_HEADS_FILE
        elif (output_dir / PAIR_HEADS_FILE).exists():
            (output_dir / PAIR_HEADS_FILE).unlink()
    return _WrittenGraphs(output_names, files, fused_nodes, diff, int8_check, pair_diff)


def _reference_outputs(
    model, sequence: list[str], token: list[str], ids: torch.Tensor, mask: torch.Tensor
) -> dict[str, torch.Tensor]:
    """PyTorch's `features`, `embeddings` and `logits.<task>` of the check batch: what every graph must match."""
    with torch.no_grad():
        reference = dict(zip(["features", "embeddings"], _TextGraph(model, sequence, token)(ids, mask)[:2]))
        logits = model(input_ids=ids, attention_mask=mask, tasks=sequence + token).logits
    reference.update({_output_name(name): value for name, value in logits.items()})
    return reference


def _export_checked_text_graph(
    model,
    scratch: Path,
    opset: int,
    tasks: tuple[list[str], list[str], list[str]],
    reference: dict[str, torch.Tensor],
    ids: torch.Tensor,
    mask: torch.Tensor,
    tolerance: float,
) -> tuple[list[str], dict[str, float]]:
    """Trace the text graph into `scratch/plain.onnx` and check it against PyTorch (an error beyond `tolerance`);
    returns its output names and max abs difference per output."""
    sequence, token, _ = tasks
    with _eager_attention(model):
        output_names = _export_text_graph(model, scratch / "plain.onnx", opset, sequence, token)
    plain_diff = _max_abs_diff(reference, _run_text_graph(_session(scratch / "plain.onnx"), ids, mask), mask)
    if max(plain_diff.values()) > tolerance:
        raise RuntimeError(
            f"the exported graph does not match PyTorch (max abs diff per output {plain_diff}); "
            f"backbone type '{model.config.backbone_config.model_type}' may not export with the TorchScript exporter"
        )
    return output_names, plain_diff


def _fuse_checked(
    scratch: Path,
    backbone_config,
    reference: dict[str, torch.Tensor],
    ids: torch.Tensor,
    mask: torch.Tensor,
    tolerance: float,
) -> tuple[dict[str, int], dict[str, float]] | None:
    """Fuse `scratch/plain.onnx` into `scratch/fused.onnx`; returns its node counts and max abs difference per
    output, or `None` (with a warning: the plain graph is kept) if fusion failed or moved an output beyond
    `tolerance`."""
    # stacklevel=4: the warnings point at the caller of `export_onnx` (through `_write_graphs` and this function).
    try:
        fused_nodes = _fuse(scratch / "plain.onnx", scratch / "fused.onnx", backbone_config)
        fused_diff = _max_abs_diff(reference, _run_text_graph(_session(scratch / "fused.onnx"), ids, mask), mask)
        if max(fused_diff.values()) <= tolerance:
            return fused_nodes, fused_diff
        warnings.warn(
            f"onnxruntime's fusion changed the outputs (max abs diff {fused_diff}); keeping the unfused graph",
            stacklevel=4,
        )
    except Exception as error:  # fusion is an optimisation: any failure keeps the plain graph
        warnings.warn(f"onnxruntime's fusion failed ({error}); keeping the unfused graph", stacklevel=4)
    return None


def _write_int8_graph(
    model,
    output_dir: Path,
    scratch: Path,
    quantization: str,
    calibration_texts: Sequence[str] | None,
    reference_features: torch.Tensor,
    ids: torch.Tensor,
    mask: torch.Tensor,
) -> dict[str, Any]:
    """Quantise `output_dir/model.onnx` into `output_dir/model_int8.onnx`; returns what was done and how close its
    features stay to PyTorch's (for `onnx_config.json`)."""
    calibration = calibration_feeds(
        model.tokenizer,
        list(calibration_texts) if calibration_texts is not None else default_calibration_texts(),
        model.config.max_seq_length,
    )
    done = quantize_int8(output_dir / MODEL_FILE, scratch / "int8.onnx", quantization, calibration)
    int8_out = _run_text_graph(_session(scratch / "int8.onnx"), ids, mask)
    cosines = F.cosine_similarity(torch.from_numpy(int8_out["features"]), reference_features, dim=-1)
    int8_check = {
        "quantized_nodes": done["quantized"],
        "outlier_channels": done["outlier_channels"],
        "split_max_abs_diff": done["split_max_abs_diff"],
        "calibration_texts": sum(len(feed["input_ids"]) for feed in calibration),
        "min_cosine_to_fp32": float(cosines.min()),
    }
    os.replace(scratch / "int8.onnx", output_dir / INT8_FILE)
    return int8_check


def _write_pair_graph(
    model, output_dir: Path, scratch: Path, opset: int, pair: list[str], features: torch.Tensor, tolerance: float
) -> dict[str, float]:
    """Export the pair heads into `output_dir/pair_heads.onnx`, checked against PyTorch on `features` (an error
    beyond `tolerance`); returns the max abs difference per head."""
    _export_pair_graph(model, scratch / "pair.onnx", opset, pair)
    pair_diff = _check_pair_graph(model, scratch / "pair.onnx", features, pair)
    if max(pair_diff.values()) > tolerance:
        raise RuntimeError(f"the pair-head graph does not match PyTorch (max abs diff {pair_diff})")
    os.replace(scratch / "pair.onnx", output_dir / PAIR_HEADS_FILE)
    return pair_diff


def _export_description(
    config,
    written: _WrittenGraphs,
    tasks: tuple[list[str], list[str], list[str]],
    opset: int,
    int8: bool,
    quantization: str,
    source: str | None,
    started: float,
) -> dict[str, Any]:
    """The contents of `onnx_config.json`: outputs, tasks, how the export was made and its measured parity."""
    import onnxruntime
    import transformers

    sequence, token, pair = tasks
    return {
        "format_version": FORMAT_VERSION,
        "files": written.files,
        "inputs": ["input_ids", "attention_mask"],
        "outputs": written.output_names,
        "tasks": {name: _output_name(name) for name in sequence + token + pair},
        "pair_inputs": ["u", "v"] if pair else [],
        "normalize": bool(config.normalize),
        "embedding_dim": int(config.embedding_dim),
        "opset": opset,
        "exporter": "torch.onnx.export(dynamo=False), eager attention",
        "fused": written.fused_nodes is not None,
        "fused_nodes": written.fused_nodes,
        "quantization": (
            {"scheme": quantization, **QUANTIZATION[quantization], **(written.int8_check or {})} if int8 else None
        ),
        "parity": {"max_abs_diff": written.diff, "pair_max_abs_diff": written.pair_diff, "texts": len(_CHECK_TEXTS)},
        "source": {"path": source, "fingerprint": _fingerprint(source) if source else None},
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "onnxruntime": onnxruntime.__version__,
        },
        "export_seconds": round(time.perf_counter() - started, 2),
    }


def _check_pair_graph(model, path: Path, features: torch.Tensor, pair: list[str]) -> dict[str, float]:
    u, v = features, features.roll(1, dims=0)
    session = _session(path)
    outputs = session.run(None, {"u": u.numpy(), "v": v.numpy()})
    with torch.no_grad():
        return {
            name: float(np.abs(value - model.pair_head_logits(name, u, v).numpy()).max())
            for name, value in zip(pair, outputs)
        }


# ---------------------------------------------------------------------------------------------- runtime


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
    ):
        self.path = Path(path)
        self.config = config
        self.tokenizer = tokenizer
        self.int8 = int8
        self.description = json.loads((self.path / ONNX_CONFIG_NAME).read_text(encoding="utf-8"))
        files = self.description["files"]
        if int8 and "int8" not in files and file_name is None:
            raise FileNotFoundError(f"{self.path} has no int8 graph: export it with export_onnx(..., int8=True)")
        self.file_name = file_name or files["int8" if int8 else "fp32"]
        self.threads = int(threads or torch.get_num_threads())
        self.session = _session(self.path / self.file_name, self.threads, providers, session_config)
        self.pair_session = _session(self.path / files["pair_heads"], 1, providers) if "pair_heads" in files else None
        self._output_names = [output.name for output in self.session.get_outputs()]
        missing = [name for name in self.task_names if self._task_output(name) is None]
        if missing:
            raise ValueError(f"{self.path} has no outputs for task(s) {missing}: export it again")

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
                    raise FileNotFoundError(f"{path_str}: no such model folder")
                raise ValueError(f"{path_str} is not a local folder: give export_dir, where its export is written")
            export_dir = Path(path_str) / "onnx"
        export_dir = Path(export_dir)
        if not _export_is_current(export_dir, path_str if local else None, int8):
            if not export:
                raise FileNotFoundError(f"no up-to-date ONNX export of {path_str} in {export_dir} (export=False)")
            export_onnx(path_str, export_dir, int8=int8, quantization=quantization)
        return cls._load(export_dir, int8, threads, providers, file_name, session_config)

    @classmethod
    def _load(
        cls,
        folder: str | os.PathLike,
        int8: bool,
        threads: int | None,
        providers,
        file_name: str | None = None,
        session_config: dict[str, str] | None = None,
    ) -> OnnxMultiTaskModel:
        from transformers import AutoTokenizer

        from configuration_mtl import MultiTaskConfig

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

    def _check_tasks(self, tasks: Iterable[str]) -> list[str]:
        tasks = [tasks] if isinstance(tasks, str) else list(tasks)
        unknown = [name for name in tasks if name not in set(self.task_names)]
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}; this model's tasks are {self.task_names}")
        return tasks

    def eval(self) -> OnnxMultiTaskModel:
        """A no-op (always in inference mode), for code written against `MultiTaskModel`."""
        return self

    def _task_output(self, name: str) -> str | None:
        from configuration_mtl import HEADLESS_TASK_TYPES  # lazy, as in `_task_lists`

        task_type = self.config.get_task(name)["type"]
        if task_type in HEADLESS_TASK_TYPES:
            return "features"  # scored on the embeddings by the mixin
        if task_type == "pair_classification":
            return name if self.pair_session is not None else None
        output = _output_name(name)
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
        (`x / max(|x|, 1e-12)`, as `F.normalize`) runs in numpy. That removes ~100 us of the ~200 us of Python
        around a one-sentence call, which is what single-request latency is made of."""
        if convert_to_tensor:
            return super().encode_tokens(tokens, batch_size, normalize, True, show_progress_bar, precision)
        if precision == "bfloat16":
            raise ValueError("precision='bfloat16' is a PyTorch option; the ONNX backend runs float32 or int8 graphs")
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if not isinstance(tokens, PackedTokens):
            tokens = PackedTokens.from_lists(list(tokens))
        normalize = self.config.normalize if normalize is None else normalize
        count = len(tokens.lengths)
        if count == 1:  # one text: one unpadded row, nothing to plan
            ids = tokens.ids[None, : int(tokens.lengths[0])].astype(np.int64)
            (features,) = self.session.run(["features"], {"input_ids": ids, "attention_mask": np.ones_like(ids)})
            return _l2_normalize(features) if normalize else features
        result = np.empty((count, self.config.embedding_dim), dtype=np.float32)
        if not count:
            return result

        def embed_batch(indices: np.ndarray, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
            (features,) = self.session.run(["features"], self._feeds(input_ids, attention_mask))
            result[indices] = _l2_normalize(features) if normalize else features

        self._for_each_batch(embed_batch, self._padded_batches(tokens, batch_size, show_progress_bar))
        return result

    def _feeds(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, np.ndarray]:
        return {"input_ids": input_ids.numpy(), "attention_mask": attention_mask.numpy()}

    def _batch_features(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, precision: str | None = None
    ) -> torch.Tensor:
        if precision == "bfloat16":
            raise ValueError("precision='bfloat16' is a PyTorch option; the ONNX backend runs float32 or int8 graphs")
        (features,) = self.session.run(["features"], self._feeds(input_ids, attention_mask))
        return torch.from_numpy(features)

    def _batch_logits(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, tasks: list[str]
    ) -> dict[str, torch.Tensor]:
        names = [_output_name(name) for name in tasks]
        values = self.session.run(names, self._feeds(input_ids, attention_mask))
        return {name: torch.from_numpy(value) for name, value in zip(tasks, values)}

    def _pair_logits(self, name: str, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.pair_session is None:
            raise ValueError(f"{self.path} has no pair-head graph for task '{name}': export it again")
        feeds = {"u": u.float().cpu().numpy(), "v": v.float().cpu().numpy()}
        (logits,) = self.pair_session.run([_output_name(name)], feeds)
        return torch.from_numpy(logits)


def _l2_normalize(features: np.ndarray) -> np.ndarray:
    norms = np.sqrt(np.einsum("ij,ij->i", features, features))[:, None]
    return features / np.maximum(norms, 1e-12)


def _export_is_current(export_dir: Path, source: str | None, int8: bool) -> bool:
    description_file = export_dir / ONNX_CONFIG_NAME
    if not description_file.is_file():
        return False
    try:
        description = json.loads(description_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if description.get("format_version") != FORMAT_VERSION:
        return False
    if int8 and "int8" not in description.get("files", {}):
        return False
    if source is not None and description.get("source", {}).get("fingerprint") != _fingerprint(source):
        return False
    return all((export_dir / name).is_file() for name in description.get("files", {}).values())


# ---------------------------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    """`python -m multitask_st.onnx MODEL -o OUT [--int8]`: the same as `mtl export`."""
    return export_main(argv)


__all__ = [
    "DEFAULT_QUANTIZATION",
    "OnnxMultiTaskModel",
    "QUANTIZATION",
    "add_export_arguments",
    "calibration_feeds",
    "default_calibration_texts",
    "export_onnx",
    "quantize_int8",
    "run_export",
]

if __name__ == "__main__":
    sys.exit(main())
