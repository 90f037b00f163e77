"""ONNX export of a `MultiTaskModel`: the text graph (encoder, pooling, projection and the heads of every task whose
type puts its logits there: `Task.onnx_graph`), the pair-head graph, fusion for onnxruntime, and the parity checks
against PyTorch that every export passes before it is written.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from modeling_mtl import MultiTaskModel, _TextGroups
from validation_mtl import InputError

from .options import (
    DEFAULT_OPSET,
    DEFAULT_QUANTIZATION,
    FORMAT_VERSION,
    INT8_FILE,
    MODEL_FILE,
    ONNX_CONFIG_NAME,
    PAIR_HEADS_FILE,
    QUANTIZATION,
    output_name,
)
from .quantize import calibration_feeds, default_calibration_texts, padded_inputs, quantize_int8
from .session import import_onnxruntime, open_session, run_text_graph

# Sentences of varied length for the parity check at export time (real text, so the fused graph sees real tokens).
CHECK_TEXTS = (
    "A man is playing a guitar.",
    "Hi",
    "",
    "The quick brown fox jumps over the lazy dog near the river bank, while John Smith of Acme Corp. watches.",
    "Scientists discovered a new species of frog in Brazil last summer.",
)


class CheckBatch(NamedTuple):
    """The check sentences as the graph's inputs: ids, mask, and token type ids where the graph takes them."""

    ids: torch.Tensor
    mask: torch.Tensor
    types: torch.Tensor | None

    @property
    def inputs(self) -> tuple[torch.Tensor, ...]:
        return (self.ids, self.mask) if self.types is None else (self.ids, self.mask, self.types)


def _check_batch(model) -> CheckBatch:
    """`CHECK_TEXTS`; where the graph takes token type ids, the second half of each text's tokens marked as a
    second segment, so that the check covers pairs read as one sequence too."""
    ids, mask = padded_inputs(model.tokenizer, CHECK_TEXTS, model.config.max_seq_length)
    if "token_type_ids" not in text_graph_inputs(model):
        return CheckBatch(ids, mask, None)
    lengths = mask.sum(-1, keepdim=True)
    types = ((torch.arange(ids.shape[1])[None, :] * 2 >= lengths) & mask.bool()).long()
    return CheckBatch(ids, mask, types)


class _TextGraph(nn.Module):
    """What `model.onnx` computes: the model's `_batch_features` and `_batch_logits` in one pass."""

    def __init__(self, model: nn.Module, sequence_tasks: list[str], token_tasks: list[str]):
        super().__init__()
        self.model = model
        self.tasks = [name for name in model.config.task_names if name in sequence_tasks + token_tasks]

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, ...]:
        # The model's own pass and its own rule for what each head reads (`Task.logits`).
        texts = _TextGroups(input_ids, attention_mask, None, token_type_ids, None)
        depth = max((self.model.heads[name].branch_depth for name in self.tasks if name in self.model.heads), default=0)
        batch = self.model._encode(texts, depth=depth)
        features = batch.features[:, 0]  # (batch, embedding_dim)
        embeddings = F.normalize(features, p=2, dim=-1) if self.model.config.normalize else features
        logits = self.model._task_logits(batch, self.tasks)
        return (features, embeddings, *(logits[name] for name in self.tasks))


class _PairGraph(nn.Module):
    """What `pair_heads.onnx` computes: every pair-classification head on two batches of features."""

    def __init__(self, model: nn.Module, pair_tasks: list[str]):
        super().__init__()
        self.model = model
        self.pair_tasks = pair_tasks

    def forward(self, u: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.model.pair_head_logits(name, u, v) for name in self.pair_tasks)


def _task_lists(config) -> tuple[list[str], list[str], list[str]]:
    """The tasks whose logits the text graph holds, per row (`sequence`) or per token (`token`), and those of the
    pair-head graph (`Task.onnx_graph`); the others are scored on the `features` output."""
    tasks = config.task_objects()
    sequence = [task.name for task in tasks if task.onnx_graph == "text" and not task.reads_words]
    token = [task.name for task in tasks if task.onnx_graph == "text" and task.reads_words]
    pair = [task.name for task in tasks if task.onnx_graph == "pair"]
    return sequence, token, pair


def text_graph_inputs(model) -> list[str]:
    """The text graph's inputs: `token_type_ids` too when a task of it reads texts with segments (a joint pair) and
    the encoder takes them."""
    segments = any(task.onnx_graph == "text" and task.uses_token_types for task in model.config.task_objects())
    return ["input_ids", "attention_mask"] + (["token_type_ids"] if segments and model.takes_token_type_ids else [])


# How `source.fingerprint` is computed (`_fingerprint`); exports that record another kind (or none: names, sizes and
# modification times, before 0.2) are only re-exported on use, never refused.
FINGERPRINT_KIND = "content-sha1-v1"


def _fingerprint(path: str | os.PathLike) -> str | None:
    """The identity of a saved model folder's contents: a hash of its config and weight files, whole (a head
    retrained on a frozen encoder changes a few kilobytes anywhere in the file). Modification times are left out: a
    copied or cloned folder is the same model. `None` for something that is not a local folder."""
    folder = Path(path)
    if not folder.is_dir():
        return None
    digest, seen = hashlib.sha1(), False
    for file in sorted(folder.iterdir()):
        if not file.is_file() or not (file.name == "config.json" or file.suffix in (".safetensors", ".bin", ".pt")):
            continue
        digest.update(f"{file.name}\0{file.stat().st_size}\0".encode())
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
        seen = True
    return digest.hexdigest() if seen else None


def stale_source(description: dict) -> str | None:
    """The source model folder an export was made from when that folder is here and now holds another model (re-saved,
    retrained or replaced since), else `None`: an export folder whose source is elsewhere is taken as it is."""
    source = description.get("source") or {}
    path = source.get("path")
    if source.get("fingerprint_kind") != FINGERPRINT_KIND or not isinstance(path, str) or not Path(path).is_dir():
        return None
    return path if _fingerprint(path) != source.get("fingerprint") else None


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
        output_name(name) for name in model.config.task_names if name in sequence or name in token
    ]
    inputs = text_graph_inputs(model)
    dynamic_axes: dict[str, dict[int, str]] = {name: {0: "batch", 1: "sequence"} for name in inputs}
    dynamic_axes.update(features={0: "batch"}, embeddings={0: "batch"})
    for name in sequence:
        dynamic_axes[output_name(name)] = {0: "batch"}
    for name in token:
        dynamic_axes[output_name(name)] = {0: "batch", 1: "sequence"}
    # A dummy batch with a padded row, so every mask-dependent step is traced on a real mask.
    vocab = int(model.config.backbone_config.vocab_size)
    ids = torch.arange(16, dtype=torch.int64).remainder(vocab).view(2, 8)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    dummy = (ids, mask, (torch.arange(8) >= 4).long().expand(2, 8).contiguous())[: len(inputs)]
    with warnings.catch_warnings(), torch.no_grad():
        # The TorchScript exporter warns that it is legacy, and the tracer about Python conditions on shapes that
        # are constant for right-padded inputs (checked by the parity test at export time).
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper,
            dummy,
            str(path),
            input_names=inputs,
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
            output_names=[output_name(name) for name in pair],
            dynamic_axes={"u": {0: "pairs"}, "v": {0: "pairs"}, **{output_name(n): {0: "pairs"} for n in pair}},
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
    import_onnxruntime()
    if quantization not in QUANTIZATION:
        raise InputError(f"unknown quantization scheme {quantization!r}; choose from {sorted(QUANTIZATION)}")
    model, source = _model_and_source(model_or_path)
    output_dir = _prepare_output_dir(model, source, output_dir)
    if model.device.type != "cpu" or model.dtype != torch.float32:
        model = copy.deepcopy(model).to("cpu", torch.float32)
    was_training = model.training
    model.eval()
    config = model.config
    tasks = _task_lists(config)
    started = time.perf_counter()
    batch = _check_batch(model)
    try:
        written = _write_graphs(
            model, output_dir, batch, tasks, int8, quantization, optimize, opset, tolerance, calibration_texts
        )
    finally:
        model.train(was_training)
    config.save_pretrained(output_dir)
    model.tokenizer.save_pretrained(output_dir)
    description = _export_description(model, written, tasks, opset, int8, quantization, source, started)
    # Written last: its presence marks a complete export.
    (output_dir / ONNX_CONFIG_NAME).write_text(json.dumps(description, indent=2) + "\n", encoding="utf-8")
    return output_dir


def _model_and_source(model_or_path: Any) -> tuple[Any, str | None]:
    """The model to export, and the path or Hub id it was loaded from (`None` for an in-memory model)."""
    model_class = MultiTaskModel
    if isinstance(model_or_path, model_class):
        return model_or_path, None
    source = str(model_or_path)
    return model_class.from_pretrained(source), source


def _prepare_output_dir(model, source: str | None, output_dir: str | os.PathLike | None) -> Path:
    """The export folder (default `<source folder>/onnx`), created, without its `onnx_config.json`."""
    if output_dir is None:
        if source is None or not os.path.isdir(source):
            raise InputError("export_onnx needs output_dir for an in-memory model or a Hub id")
        output_dir = Path(source) / "onnx"
    if model.tokenizer is None:
        raise InputError("the model has no tokenizer; the export folder needs one (set `model.tokenizer`)")
    output_dir = Path(output_dir)
    if any(output_dir.glob("*.safetensors")) or any(output_dir.glob("*.bin")):
        raise InputError(
            f"{output_dir} holds a model's weights: an export there would replace its config and tokenizer with "
            f"another's; export into a folder of its own (default: the model's onnx/ subfolder)"
        )
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
    batch: CheckBatch,
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
    reference = _reference_outputs(model, sequence, token, batch)
    with tempfile.TemporaryDirectory(dir=output_dir, prefix=".export-") as scratch:
        scratch = Path(scratch)
        output_names, diff = _export_checked_text_graph(model, scratch, opset, tasks, reference, batch, tolerance)
        chosen, fused_nodes = scratch / "plain.onnx", None
        if optimize:
            fused = _fuse_checked(scratch, model.config.backbone_config, reference, batch, tolerance)
            if fused is not None:
                chosen, (fused_nodes, diff) = scratch / "fused.onnx", fused
        os.replace(chosen, output_dir / MODEL_FILE)
        files = {"fp32": MODEL_FILE}
        int8_check = None
        if int8:
            int8_check = _write_int8_graph(
                model, output_dir, scratch, quantization, calibration_texts, reference["features"], batch
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


def _reference_outputs(model, sequence: list[str], token: list[str], batch: CheckBatch) -> dict[str, torch.Tensor]:
    """PyTorch's `features`, `embeddings` and `logits.<task>` of the check batch: what every graph must match."""
    extra = {"token_type_ids": batch.types} if batch.types is not None else {}
    with torch.no_grad():
        reference = dict(zip(["features", "embeddings"], _TextGraph(model, sequence, token)(*batch.inputs)[:2]))
        logits = model(input_ids=batch.ids, attention_mask=batch.mask, tasks=sequence + token, **extra).logits
    reference.update({output_name(name): value for name, value in logits.items()})
    return reference


def _export_checked_text_graph(
    model,
    scratch: Path,
    opset: int,
    tasks: tuple[list[str], list[str], list[str]],
    reference: dict[str, torch.Tensor],
    batch: CheckBatch,
    tolerance: float,
) -> tuple[list[str], dict[str, float]]:
    """Trace the text graph into `scratch/plain.onnx` and check it against PyTorch (an error beyond `tolerance`);
    returns its output names and max abs difference per output."""
    sequence, token, _ = tasks
    with _eager_attention(model):
        output_names = _export_text_graph(model, scratch / "plain.onnx", opset, sequence, token)
    plain_diff = _max_abs_diff(
        reference, run_text_graph(open_session(scratch / "plain.onnx"), *batch.inputs), batch.mask
    )
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
    batch: CheckBatch,
    tolerance: float,
) -> tuple[dict[str, int], dict[str, float]] | None:
    """Fuse `scratch/plain.onnx` into `scratch/fused.onnx`; returns its node counts and max abs difference per
    output, or `None` (with a warning: the plain graph is kept) if fusion failed or moved an output beyond
    `tolerance`."""
    # stacklevel=4: the warnings point at the caller of `export_onnx` (through `_write_graphs` and this function).
    try:
        fused_nodes = _fuse(scratch / "plain.onnx", scratch / "fused.onnx", backbone_config)
        fused = run_text_graph(open_session(scratch / "fused.onnx"), *batch.inputs)
        fused_diff = _max_abs_diff(reference, fused, batch.mask)
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
    batch: CheckBatch,
) -> dict[str, Any]:
    """Quantise `output_dir/model.onnx` into `output_dir/model_int8.onnx`; returns what was done and how close its
    features stay to PyTorch's (for `onnx_config.json`)."""
    calibration = calibration_feeds(
        model.tokenizer,
        list(calibration_texts) if calibration_texts is not None else default_calibration_texts(),
        model.config.max_seq_length,
    )
    done = quantize_int8(output_dir / MODEL_FILE, scratch / "int8.onnx", quantization, calibration)
    int8_out = run_text_graph(open_session(scratch / "int8.onnx"), *batch.inputs)
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
    model,
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

    config = model.config
    sequence, token, pair = tasks
    return {
        "format_version": FORMAT_VERSION,
        "files": written.files,
        "inputs": text_graph_inputs(model),
        "outputs": written.output_names,
        "tasks": {name: output_name(name) for name in sequence + token + pair},
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
        "parity": {"max_abs_diff": written.diff, "pair_max_abs_diff": written.pair_diff, "texts": len(CHECK_TEXTS)},
        "source": {
            "path": os.path.abspath(source) if source and os.path.isdir(source) else source,  # any working directory
            "fingerprint": _fingerprint(source) if source else None,
            "fingerprint_kind": FINGERPRINT_KIND,
        },
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "onnxruntime": onnxruntime.__version__,
        },
        "export_seconds": round(time.perf_counter() - started, 2),
    }


def _check_pair_graph(model, path: Path, features: torch.Tensor, pair: list[str]) -> dict[str, float]:
    u, v = features, features.roll(1, dims=0)
    session = open_session(path)
    outputs = session.run(None, {"u": u.numpy(), "v": v.numpy()})
    with torch.no_grad():
        return {
            name: float(np.abs(value - model.pair_head_logits(name, u, v).numpy()).max())
            for name, value in zip(pair, outputs)
        }


def export_is_current(export_dir: Path, source: str | None, int8: bool) -> bool:
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
