"""The building blocks of the multi-task sentence transformer: the label convention, pooling, the heads' modules (a
fresh transformer layer, a head's own copies of the encoder's top layers, the read-out) and the losses.

`modeling_mtl.MultiTaskModel` assembles them; each task type (`tasks_mtl`) picks the head and the loss it needs.
This file travels with every checkpoint (relative imports from the other model files), so it stays self-contained:
standard library, torch and transformers.
"""

from __future__ import annotations

import copy
import functools
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from transformers.activations import ACT2FN

try:  # inside a Hub/remote-code package
    from .validation_mtl import InputError
except ImportError:  # installed as top-level modules, or run from the project folder
    from validation_mtl import InputError

# The one label convention, from the data files to the loss and the metrics: integer labels (class, tag, pair-class
# ids; contrastive row markers) are missing when IGNORE_INDEX, float labels (multi-label, regression, similarity)
# when NaN. `labelled_mask` is the only place that rule is written.
IGNORE_INDEX = -100


def labelled_mask(labels: torch.Tensor) -> torch.Tensor:
    """True where a label is present: integer labels other than `IGNORE_INDEX`, float labels other than NaN."""
    return ~torch.isnan(labels) if labels.is_floating_point() else labels != IGNORE_INDEX


# ---------------------------------------------------------------------------------------------- pooling


class Pooling(nn.Module):
    """Turns token states into one vector per sentence. Every mode ignores padded positions."""

    def __init__(self, mode: str, hidden_size: int):
        super().__init__()
        self.mode = mode
        # Only the learned mode has parameters: a scoring vector that decides which tokens matter.
        # No bias: softmax ignores a shift shared by every score, so a bias would only collect numerical noise.
        self.attention_scorer = nn.Linear(hidden_size, 1, bias=False) if mode == "attention" else None

    def forward(self, token_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask.unsqueeze(-1).to(token_states.dtype)  # (batch, seq, 1)
        if self.mode == "cls":
            return token_states[:, 0]
        if self.mode in ("mean", "mean_sqrt_len"):
            summed = (token_states * mask).sum(dim=1)  # (batch, hidden)
            # Same clamp as sentence-transformers, so both give bit-for-bit comparable means.
            counts = mask.sum(dim=1).clamp(min=1e-9)  # (batch, 1)
            return summed / (counts if self.mode == "mean" else counts.sqrt())
        if self.mode == "max":
            masked = token_states.masked_fill(mask == 0, torch.finfo(token_states.dtype).min)
            return masked.max(dim=1).values
        if self.mode == "weighted_mean":
            # Position-weighted mean (SGPT): later tokens have seen more context in causal models.
            positions = torch.arange(1, token_states.shape[1] + 1, device=token_states.device)
            weights = mask * positions.to(token_states.dtype).view(1, -1, 1)  # (batch, seq, 1)
            return (token_states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
        if self.mode == "last_token":
            # Index of the last real token; works for left and right padding alike.
            positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
            last = (attention_mask.long() * positions).argmax(dim=1)  # (batch,)
            return token_states[torch.arange(token_states.shape[0], device=token_states.device), last]
        if self.mode == "attention":
            scores = self.attention_scorer(token_states).squeeze(-1)  # (batch, seq)
            scores = scores.masked_fill(attention_mask == 0, torch.finfo(scores.dtype).min)
            weights = scores.softmax(dim=-1).unsqueeze(-1)  # (batch, seq, 1)
            return (token_states * weights).sum(dim=1)
        raise ValueError(f"unknown pooling mode '{self.mode}'")


# ---------------------------------------------------------------------------------------------- a head's own layers


class AdapterLayer(nn.Module):
    """A post-norm transformer layer (self-attention over the real tokens, then a GELU feed-forward), freshly
    initialised: a task's own contextual view of the shared token states. Plain operations only, so that it exports
    to ONNX exactly."""

    def __init__(self, size: int, heads: int, feed_forward: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value = (nn.Linear(size, size) for _ in range(3))
        self.output = nn.Linear(size, size)
        self.attention_norm = nn.LayerNorm(size)
        self.feed_forward = nn.Sequential(nn.Linear(size, feed_forward), nn.GELU(), nn.Linear(feed_forward, size))
        self.output_norm = nn.LayerNorm(size)
        self.dropout = nn.Dropout(dropout)

    def forward(self, states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        batch, seq, size = states.shape

        def split(tensor: torch.Tensor) -> torch.Tensor:  # (batch, heads, seq, size / heads)
            return tensor.view(batch, seq, self.heads, size // self.heads).transpose(1, 2)

        query, key, value = split(self.query(states)), split(self.key(states)), split(self.value(states))
        scores = query @ key.transpose(-1, -2) / (size // self.heads) ** 0.5  # (batch, heads, seq, seq)
        scores = scores.masked_fill(attention_mask[:, None, None, :] == 0, torch.finfo(scores.dtype).min)
        context = (scores.softmax(-1) @ value).transpose(1, 2).reshape(batch, seq, size)
        states = self.attention_norm(states + self.dropout(self.output(context)))
        return self.output_norm(states + self.dropout(self.feed_forward(states)))


def backbone_depth(backbone_config: Any) -> int | None:
    """Number of transformer layers of a backbone config (BERT-style `num_hidden_layers`, DistilBERT's `n_layers`)."""
    return getattr(backbone_config, "num_hidden_layers", None) or getattr(backbone_config, "n_layers", None)


def backbone_layers(backbone: nn.Module) -> nn.ModuleList:
    """The backbone's stack of transformer layers: its `nn.ModuleList` of `num_hidden_layers` modules."""
    depth = backbone_depth(backbone.config)
    for module in backbone.modules():
        if isinstance(module, nn.ModuleList) and len(module) == depth:
            return module
    raise InputError(
        f"cannot find the {depth} transformer layers of a {type(backbone).__name__} (its layers are shared or nested): "
        "use heads without `layers` for this backbone"
    )


# The arguments a layer of a BERT-style encoder takes besides its hidden states and attention mask, and which the
# encoder leaves at their defaults in an encoder-only forward pass.
_PLAIN_LAYER_ARGUMENTS = {
    "self",
    "hidden_states",
    "x",
    "attention_mask",
    "attn_mask",
    "encoder_hidden_states",
    "encoder_attention_mask",
    "past_key_value",
    "past_key_values",
    "cache",
    "output_attentions",
    "head_mask",
    "kwargs",
}


def _layer_arguments_modernbert(backbone: nn.Module, states: torch.Tensor, attention_mask: torch.Tensor):
    from transformers.masking_utils import create_bidirectional_mask, create_bidirectional_sliding_window_mask

    config = backbone.config
    masks = {
        "full_attention": create_bidirectional_mask(config=config, inputs_embeds=states, attention_mask=attention_mask),
        "sliding_attention": create_bidirectional_sliding_window_mask(
            config=config, inputs_embeds=states, attention_mask=attention_mask
        ),
    }
    position_ids = torch.arange(states.shape[1], device=states.device).unsqueeze(0)
    positions = {kind: backbone.rotary_emb(states, position_ids, kind) for kind in set(config.layer_types)}
    return lambda layer: {
        "attention_mask": masks[layer.attention_type],
        "position_embeddings": positions[layer.attention_type],
    }


def _layer_arguments_mpnet(backbone: nn.Module, states: torch.Tensor, attention_mask: torch.Tensor):
    from transformers.masking_utils import create_bidirectional_mask

    mask = create_bidirectional_mask(config=backbone.config, inputs_embeds=states, attention_mask=attention_mask)
    position_bias = backbone.encoder.compute_position_bias(states)
    return lambda layer: {"attention_mask": mask, "position_bias": position_bias}


def _layer_arguments_deberta_v2(backbone: nn.Module, states: torch.Tensor, attention_mask: torch.Tensor):
    encoder = backbone.encoder
    mask = encoder.get_attention_mask(attention_mask)
    relative_pos = encoder.get_rel_pos(states)
    rel_embeddings = encoder.get_rel_embedding()
    return lambda layer: {"attention_mask": mask, "relative_pos": relative_pos, "rel_embeddings": rel_embeddings}


def _layer_arguments_plain(backbone: nn.Module, states: torch.Tensor, attention_mask: torch.Tensor):
    from transformers.masking_utils import create_bidirectional_mask

    mask = create_bidirectional_mask(config=backbone.config, inputs_embeds=states, attention_mask=attention_mask)
    return lambda layer: {"attention_mask": mask}


# How each encoder family's layers are called in its own forward pass, written out (transformers' code for that
# family is the reference; tests/test_layers_mtl.py checks that running the backbone's own top layers this way gives
# its output exactly). Families not listed take the plain call if their layers accept nothing else.
LAYER_ARGUMENTS: dict[str, Callable] = {
    "modernbert": _layer_arguments_modernbert,
    "mpnet": _layer_arguments_mpnet,
    "deberta-v2": _layer_arguments_deberta_v2,
}


def layer_arguments(backbone: nn.Module) -> Callable:
    """The function that gives, for one batch's hidden states and 2-D attention mask, the keyword arguments each of
    the backbone's layers takes beside its hidden states; an error naming the arguments for a family whose layers
    need more than this file knows how to make."""
    model_type = getattr(backbone.config, "model_type", None)
    if model_type in LAYER_ARGUMENTS:
        return LAYER_ARGUMENTS[model_type]
    layer = backbone_layers(backbone)[0]
    parameters = inspect.signature(type(layer).forward).parameters
    unknown = [
        name
        for name, parameter in parameters.items()
        if name not in _PLAIN_LAYER_ARGUMENTS
        and parameter.kind not in (parameter.VAR_KEYWORD, parameter.VAR_POSITIONAL)
    ]
    if unknown:
        raise InputError(
            f"heads with layers of their own cannot run the layers of a '{model_type}' encoder: its layers also take "
            f"{unknown}, which this model does not know how to compute; use heads without `layers` for this backbone"
        )
    return _layer_arguments_plain


def run_layers(
    layers: Sequence[nn.Module],
    states: torch.Tensor,
    attention_mask: torch.Tensor,
    backbone: nn.Module,
    gradient_scale: float = 1.0,
) -> torch.Tensor:
    """Run `layers` (the backbone's own or copies of them) on `states` as the backbone's forward pass runs its
    layers; `gradient_scale` scales the gradient of every input taken from the shared encoder (the states and any
    tensor the backbone makes from its own weights, e.g. relative position embeddings)."""
    arguments = layer_arguments(backbone)(backbone, states, attention_mask)
    states = scale_gradient(states, gradient_scale)
    for layer in layers:
        extra = {
            key: scale_gradient(value, gradient_scale) if isinstance(value, torch.Tensor) else value
            for key, value in arguments(layer).items()
        }
        output = layer(states, **extra)
        states = output[0] if isinstance(output, tuple) else output
    return states


# The norm a family applies after its last layer (pre-LayerNorm encoders), which a head's copies of the top layers
# apply too, by attribute path in the backbone.
FINAL_NORMS = {
    "modernbert": "final_norm",
    "megatron-bert": "encoder.ln",
    "xlm-roberta-xl": "encoder.LayerNorm",
    "roberta-prelayernorm": "LayerNorm",
}


def final_norm(backbone: nn.Module) -> nn.Module | None:
    """The backbone's norm after its last layer (`FINAL_NORMS`), or `None` for a post-LayerNorm family."""
    path = FINAL_NORMS.get(getattr(backbone.config, "model_type", None))
    module = backbone
    for part in path.split(".") if path else []:
        module = getattr(module, part, None)
    return module if path and isinstance(module, nn.Module) else None


def check_top_layers(backbone: nn.Module, depth: int) -> None:
    """Run the backbone's own top `depth` layers as a head's copies will run them, on a small padded batch, and
    refuse the family (an `InputError` naming it) when that does not give the backbone's output: a family whose
    layers need something this file does not give them fails here, when the head is built, not silently later.
    Skipped for a backbone whose weights are not there yet (built on the meta device while loading)."""
    parameter = next(backbone.parameters(), None)
    if parameter is None or parameter.device.type == "meta":
        return
    vocab = int(getattr(backbone.config, "vocab_size", 100) or 100)
    ids = (torch.arange(16) * 7 % max(vocab - 1, 1) + 1).view(2, 8).to(parameter.device)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    model_type = getattr(backbone.config, "model_type", None)
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.no_grad():
            out = backbone(input_ids=ids, attention_mask=mask, output_hidden_states=True)
            try:
                states = run_layers(backbone_layers(backbone)[-depth:], out.hidden_states[-depth - 1], mask, backbone)
            except (TypeError, ValueError, RuntimeError, IndexError) as error:
                raise InputError(
                    f"heads with layers of their own cannot run the layers of a '{model_type}' encoder on their own "
                    f"({type(error).__name__}: {error}); use heads without `layers` for this backbone"
                ) from None
            norm = final_norm(backbone)
            states = norm(states) if norm is not None else states
    finally:
        backbone.train(was_training)
    real = mask.bool()
    expected = out.last_hidden_state[real].float()
    difference = float((states[real].float() - expected).abs().max())
    tolerance = (1e-4 if parameter.dtype == torch.float32 else 5e-2) * max(1.0, float(expected.abs().max()))
    if not difference <= tolerance:
        raise InputError(
            f"heads with layers of their own: running the top {depth} layer(s) of a '{model_type}' encoder on their "
            f"own does not give its output (max difference {difference:.3g}); use heads without `layers` for this "
            "backbone"
        )


class TopLayers(nn.Module):
    """A task's own copies of the encoder's top layers (and its final norm, where the architecture has one), run on
    the hidden states that enter the shared copies, with the same masks and position encodings, so that the task
    can reshape its top of the encoder while the shared one keeps serving the embedding. The copies share the
    backbone's config object, so they follow its attention implementation."""

    def __init__(self, backbone: nn.Module, depth: int):
        super().__init__()
        layer_arguments(backbone)  # a family whose layers cannot be run on their own fails here, when built
        check_top_layers(backbone, depth)
        self.layers = nn.ModuleList(copy.deepcopy(layer) for layer in backbone_layers(backbone)[-depth:])
        norm = final_norm(backbone)
        self.final_norm = copy.deepcopy(norm) if norm is not None else None
        for module in self.modules():
            if hasattr(module, "config") and not isinstance(module, TopLayers):
                module.config = backbone.config

    @property
    def depth(self) -> int:
        return len(self.layers)

    def forward(
        self, states: torch.Tensor, attention_mask: torch.Tensor, backbone: nn.Module, gradient_scale: float = 1.0
    ) -> torch.Tensor:
        """`states`: `(batch, seq, hidden)`, the hidden states entering the backbone's top `depth` layers."""
        states = run_layers(self.layers, states, attention_mask, backbone, gradient_scale)
        return self.final_norm(states) if self.final_norm is not None else states


# ---------------------------------------------------------------------------------------------- the read-out


class TaskHead(nn.Module):
    """Dropout then a linear layer, or a one-hidden-layer MLP when the task asks for more capacity; optionally with
    its own view of the token states: its own copies of the encoder's top layers (`branch`), a fresh transformer
    layer (`adapter`) and its own attention pooling (`pooling`).

    Args:
        input_size: the size of what the read-out reads (a sentence vector, a token state, or pair features).
        num_outputs: labels (or regression values).
        head: the task's normalised `head` entry (`type`, `dropout`, `hidden_size`, `activation`, `pooling`,
            `layers`).
        attention_heads: attention heads of an `adapter` layer.
        backbone: the encoder whose top layers a head with `layers` copies.
    """

    def __init__(
        self,
        input_size: int,
        num_outputs: int,
        head: dict[str, Any],
        attention_heads: int = 1,
        backbone: nn.Module | None = None,
    ):
        super().__init__()
        self.branch = TopLayers(backbone, head["layers"]) if head.get("layers") else None
        self.adapter = None
        if head["type"] == "transformer":
            heads = attention_heads if input_size % attention_heads == 0 else 1
            self.adapter = AdapterLayer(input_size, heads, head.get("hidden_size") or 2 * input_size, head["dropout"])
        # A head with its own pooling reads the token states, not the shared sentence vector.
        self.pooling = Pooling("attention", input_size) if head.get("pooling") == "attention" else None
        self.dropout = nn.Dropout(head["dropout"])
        if head["type"] == "mlp":
            hidden_size = head.get("hidden_size") or input_size
            self.dense = nn.Linear(input_size, hidden_size)
            self.activation = ACT2FN[head["activation"]]
            input_size = hidden_size
        else:
            self.dense = None
        self.out_proj = nn.Linear(input_size, num_outputs)

    @property
    def branch_depth(self) -> int:
        return self.branch.depth if self.branch is not None else 0

    @property
    def reads_tokens(self) -> bool:
        """Whether the head reads token states (its own pooling, adapter or layers) rather than a vector."""
        return self.branch is not None or self.adapter is not None or self.pooling is not None

    def adapt(self, token_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The token states this head reads: its own transformer layer's output, or the states given."""
        if self.adapter is None:
            return token_states
        return self.adapter(token_states, attention_mask)  # (batch, seq, hidden)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        features = self.dropout(features)
        if self.dense is not None:
            features = self.dropout(self.activation(self.dense(features)))
        return self.out_proj(features)


def pair_features(u: torch.Tensor, v: torch.Tensor, combination: Sequence[str]) -> torch.Tensor:
    """The SBERT classifier input: the chosen of u, v, |u-v|, u*v, concatenated on the last dimension."""
    parts = {"u": lambda: u, "v": lambda: v, "|u-v|": lambda: (u - v).abs(), "u*v": lambda: u * v}
    return torch.cat([parts[name]() for name in combination], dim=-1)  # (batch, len(combination) * dim)


# ---------------------------------------------------------------------------------------------- gradients


class _ScaleGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.scale, None


def scale_gradient(tensor: torch.Tensor, scale: float) -> torch.Tensor:
    """`tensor` unchanged in the forward pass; `scale` times its gradient in the backward pass. At 0 the gradient is
    an exact zero but the graph is kept, so distributed training still sees every parameter take part."""
    if scale == 1.0 or not tensor.requires_grad:
        return tensor
    return _ScaleGradient.apply(tensor, scale)


# ---------------------------------------------------------------------------------------------- losses
#
# Each loss returns `(sum over labelled items, number of labelled items)`; the model divides by the count (of this
# batch, or of the whole accumulated step when the trainer passes `num_items_in_batch`).


def classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy over class or tag ids; `(batch, num_labels)` or `(batch, seq, num_labels)` logits."""
    per_item = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    )
    return per_item.sum(), labelled_mask(labels).sum()


def elementwise_loss(logits: torch.Tensor, labels: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Binary cross-entropy (`bce`) or squared error (`mse`) over the labelled entries."""
    valid = labelled_mask(labels)
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    if kind == "bce":
        per_item = F.binary_cross_entropy_with_logits(logits.float(), safe, reduction="none")
    else:
        per_item = F.mse_loss(logits.float(), safe, reduction="none")
    return (per_item * valid).sum(), valid.sum()


def cosent_loss(cosines: torch.Tensor, scores: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """CoSENT (Su, 2022): for every pair of pairs (i, j) with gold score i > j, penalise cos_j > cos_i:
    `log(1 + Σ exp(scale · (cos_j − cos_i)))`. It learns the *order* of the gold scores, which is what Spearman
    measures, and unlike cosine-MSE it does not force cosines onto the gold scale. A batch-level loss: it is
    returned as `loss · n` with `n` labelled pairs, so averaging over items weighs batches by their size."""
    valid = labelled_mask(scores)
    cosines, scores = cosines[valid].float(), scores[valid]
    count = valid.sum()
    if cosines.numel() < 2:
        return cosines.sum() * 0.0, count
    differences = scale * (cosines[None, :] - cosines[:, None])  # (n, n): cos_j − cos_i
    differences = differences.masked_fill(~(scores[:, None] > scores[None, :]), float("-inf"))
    zero = torch.zeros(1, dtype=differences.dtype, device=differences.device)
    return torch.logsumexp(torch.cat([zero, differences.flatten()]), dim=0) * count, count


def contrastive_loss(
    anchors: torch.Tensor,
    candidates: torch.Tensor,
    targets: torch.Tensor,
    candidate_ids: torch.Tensor,
    anchor_ids: torch.Tensor,
    scale: float,
    positive_of: torch.Tensor | None = None,
) -> torch.Tensor:
    """Multiple-negatives ranking (InfoNCE): cross-entropy of each anchor's scaled cosines over every candidate,
    the target being its own positive. Candidates that are positives for the anchor too are not negatives: they
    are masked out instead of being pushed away (false negatives). That is a candidate holding the same text as
    the anchor or as its positive, and the positive of another row with the same anchor text (several positives
    per query).

    Args:
        anchors: `(n, dim)`; candidates: `(m, dim)` (all positives, then all hard negatives).
        targets: `(n,)` index of each anchor's positive in `candidates`.
        candidate_ids / anchor_ids: `(m,)` / `(n,)` text fingerprints (`text_fingerprints`) for the duplicate mask.
        positive_of: `(m,)` for a candidate that is some row's positive, that row's anchor fingerprint; for a hard
            negative, its own fingerprint (a row's hard negative is a negative for every row with its anchor, and
            an anchor equal to its text is masked by `candidate_ids` already).

    Returns: the summed loss over the anchors.
    """
    logits = scale * F.normalize(anchors.float(), dim=-1) @ F.normalize(candidates.float(), dim=-1).T  # (n, m)
    positive_ids = candidate_ids[targets]  # (n,)
    duplicate = (candidate_ids[None, :] == positive_ids[:, None]) | (candidate_ids[None, :] == anchor_ids[:, None])
    if positive_of is not None:
        duplicate |= positive_of[None, :] == anchor_ids[:, None]
    duplicate[torch.arange(len(targets), device=targets.device), targets] = False
    logits = logits.masked_fill(duplicate, float("-inf"))
    return F.cross_entropy(logits, targets, reduction="sum")


# ---------------------------------------------------------------------------------------------- texts across processes

_HASH_BASE = 0x9E3779B97F4A7C15  # odd, so its powers mod 2**64 never vanish


@functools.lru_cache(maxsize=16)
def _hash_powers(length: int) -> tuple[int, ...]:
    """`B**1 .. B**length` mod 2**64, as int64 values."""
    powers, value = [], 1
    for _ in range(length):
        value = value * _HASH_BASE % (1 << 64)
        powers.append(value - (1 << 64) if value >= 1 << 63 else value)
    return tuple(powers)


def text_fingerprints(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """One int64 per text, equal for equal token sequences (right-padded: padding does not count): the polynomial
    hash `sum_i (id_i + 1) * B**(i+1)` mod 2**64 (int64 products and sums wrap, deterministically on every device),
    xor the length. Used to recognise duplicate texts among in-batch negatives, also across processes, and to
    group an eval split's retrieval rows by text."""
    powers = torch.tensor(_hash_powers(input_ids.shape[-1]), dtype=torch.int64, device=input_ids.device)
    ids = (input_ids.to(torch.int64) + 1) * attention_mask.to(torch.int64)
    return (ids * powers).sum(-1) ^ attention_mask.sum(-1).to(torch.int64)


def gather_with_grad(tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All processes' rows of `tensor`, concatenated in rank order, with gradients flowing back to each owner;
    returns the gathered tensor and the offset of this process's rows. Rows may differ in number between processes.
    Without an initialised process group, the tensor itself and 0."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor, 0
    from torch.distributed.nn.functional import all_gather

    size = torch.tensor([tensor.shape[0]], device=tensor.device)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    sizes = [int(s) for s in sizes]
    padded = F.pad(tensor, (0,) * (2 * (tensor.dim() - 1)) + (0, max(sizes) - tensor.shape[0]))
    parts = all_gather(padded)
    rank = dist.get_rank()
    return torch.cat([part[:n] for part, n in zip(parts, sizes)]), sum(sizes[:rank])


def gathered_offset(local_count: torch.Tensor) -> int:
    """Index of this process's first row once every process's rows are gathered in rank order."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return 0
    counts = [torch.zeros_like(local_count) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, local_count)
    return int(sum(int(c) for c in counts[: dist.get_rank()]))


__all__ = [
    "IGNORE_INDEX",
    "AdapterLayer",
    "Pooling",
    "TaskHead",
    "TopLayers",
    "backbone_depth",
    "backbone_layers",
    "classification_loss",
    "contrastive_loss",
    "cosent_loss",
    "elementwise_loss",
    "labelled_mask",
    "pair_features",
    "run_layers",
    "scale_gradient",
    "text_fingerprints",
]
