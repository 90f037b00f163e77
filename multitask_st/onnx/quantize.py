"""The int8 graph: onnxruntime's dynamic quantisation of the encoder's matmuls, with the "outlier-split" scheme
(`options.QUANTIZATION`): the few input channels of a matmul whose calibrated range is far above the others are
computed in float32 by a thin side matmul, so they no longer set the activation scale of every other channel.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from validation_mtl import InputError

from .options import DEFAULT_QUANTIZATION, QUANTIZATION

# An input channel is an outlier when its largest |value| over the calibration tokens exceeds this many times the
# median channel's; at most this many channels per matmul are split off.
OUTLIER_FACTOR = 4.0
MAX_OUTLIER_CHANNELS = 8
# Sentences of varied length, when no calibration text is found.
_FALLBACK_TEXTS = (
    "A man is playing a guitar.",
    "Hi",
    "The quick brown fox jumps over the lazy dog near the river bank, while John Smith of Acme Corp. watches.",
    "Scientists discovered a new species of frog in Brazil last summer.",
)


def default_calibration_texts() -> list[str]:
    """The ~500 English sentences shipped in `multitask_st/default_data` (news-like, varied lengths): enough to find
    a model's outlier channels, which are a property of the weights more than of the domain."""
    folder = Path(__file__).resolve().parent.parent / "default_data"
    texts: list[str] = []
    for name in ("default_train.jsonl", "default_eval.jsonl"):
        path = folder / name
        if path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    text = json.loads(line).get("text")
                    if isinstance(text, str) and text:
                        texts.append(text)
    return texts or list(_FALLBACK_TEXTS)


def calibration_feeds(tokenizer, texts: Sequence[str], max_length: int, batch_size: int = 32) -> list[dict]:
    feeds = []
    for start in range(0, len(texts), batch_size):
        ids, mask = padded_inputs(tokenizer, texts[start : start + batch_size], max_length)
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
        feed = complete_feed(model, feed)
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


def complete_feed(model, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`feed` with zero token type ids added when the graph takes them (texts without segments)."""
    if any(item.name == "token_type_ids" for item in model.graph.input) and "token_type_ids" not in feed:
        return {**feed, "token_type_ids": np.zeros_like(feed["input_ids"])}
    return feed


def _max_output_difference(reference, rewritten, feeds: list[dict]) -> float:
    """Largest difference between two graphs' first outputs (float32 rewrites must not change results)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    first = onnxruntime.InferenceSession(reference.SerializeToString(), options, providers=["CPUExecutionProvider"])
    second = onnxruntime.InferenceSession(rewritten.SerializeToString(), options, providers=["CPUExecutionProvider"])
    name = first.get_outputs()[0].name
    feeds = [complete_feed(reference, feed) for feed in feeds]
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
        raise InputError(f"unknown quantization scheme {scheme!r}; choose from {sorted(QUANTIZATION)}")
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


def padded_inputs(tokenizer, texts: Sequence[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
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
