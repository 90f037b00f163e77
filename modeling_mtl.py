"""A multi-task sentence transformer: one shared encoder, mask-aware pooling, and one head per task.

This file is copied next to the weights by `save_pretrained` (with `configuration_mtl.py` and `inference_mtl.py`),
so that `AutoModel.from_pretrained(path, trust_remote_code=True)` works on a machine without this project. It stays
self-contained: standard library, torch, numpy, transformers, and relative imports of those two files. It holds the
model proper, read top to bottom: output type, label convention, pooling, heads, losses, the model and its forward.
The inference engine (`encode`, `predict`, `similarity`) is in `inference_mtl.py`; training code lives in the
`multitask_st` package, never here.
"""

from __future__ import annotations

import copy
import functools
import inspect
import json
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from transformers import AutoConfig, AutoModel, AutoTokenizer, PretrainedConfig, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_outputs import SequenceClassifierOutput, TokenClassifierOutput
from transformers.utils import ModelOutput, logging

try:  # inside a Hub/remote-code package
    from .configuration_mtl import EMBEDDING_TASK_TYPES, HEADLESS_TASK_TYPES, MultiTaskConfig, backbone_depth
    from .inference_mtl import MultiTaskInferenceMixin, group_entities, plan_batches, run_concurrently
except ImportError:  # installed as top-level modules, or run from the project folder
    from configuration_mtl import EMBEDDING_TASK_TYPES, HEADLESS_TASK_TYPES, MultiTaskConfig, backbone_depth
    from inference_mtl import MultiTaskInferenceMixin, group_entities, plan_batches, run_concurrently

logger = logging.get_logger(__name__)

# The one label convention, from the data files to the loss and the metrics: integer labels (class, tag, pair-class
# ids; contrastive row markers) are missing when IGNORE_INDEX, float labels (multi-label, regression, similarity)
# when NaN. `labelled_mask` is the only place that rule is written.
IGNORE_INDEX = -100


def labelled_mask(labels: torch.Tensor) -> torch.Tensor:
    """True where a label is present: integer labels other than `IGNORE_INDEX`, float labels other than NaN."""
    return ~torch.isnan(labels) if labels.is_floating_point() else labels != IGNORE_INDEX


@dataclass
class MultiTaskModelOutput(ModelOutput):
    r"""
    Output of [`MultiTaskModel.forward`].

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*, returned when `labels` are given):
            Sum over the labelled tasks of `loss_weight * task_loss`.
        embeddings (`torch.FloatTensor` of shape `(batch, embedding_dim)` or `(batch, texts, embedding_dim)`):
            Sentence embeddings (pooled, projected if configured, L2-normalised if `config.normalize`), one per text;
            texts absent from a row (all-zero attention mask) are zero vectors.
        logits (`dict[str, torch.FloatTensor]`):
            Per task: `(batch, num_labels)` for sequence and pair-classification tasks, `(batch, seq, num_labels)`
            for token tasks, `(batch,)` cosines for `similarity`, `(batch, candidates)` scaled cosines of each
            anchor to every in-batch positive/negative for `contrastive`. Pair tasks are absent from batches of
            single texts.
        task_losses (`dict[str, torch.FloatTensor]`, *optional*, returned when `labels` are given):
            The unweighted loss of each task that received labels.
        last_hidden_state (`torch.FloatTensor` of shape `(batch, seq, hidden)`):
            The backbone's token states of each row's first text.
        hidden_states (`tuple(torch.FloatTensor)`, *optional*): returned with `output_hidden_states=True`.
    """

    loss: torch.FloatTensor | None = None
    embeddings: torch.FloatTensor | None = None
    logits: dict[str, torch.FloatTensor] | None = None
    task_losses: dict[str, torch.FloatTensor] | None = None
    last_hidden_state: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None


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


def backbone_layers(backbone: nn.Module) -> nn.ModuleList:
    """The backbone's stack of transformer layers: its `nn.ModuleList` of `num_hidden_layers` modules."""
    depth = backbone_depth(backbone.config)
    for module in backbone.modules():
        if isinstance(module, nn.ModuleList) and len(module) == depth:
            return module
    raise ValueError(f"cannot find the {depth} transformer layers of a {type(backbone).__name__}")


class LayerBranch(nn.Module):
    """A task's own copies of the encoder's top layers (and its final norm, where the architecture has one): run on
    the states that enter the shared copies, with the same masks and position encodings, so that the task can
    reshape its top of the encoder while the shared one keeps serving the embedding."""

    def __init__(self, backbone: nn.Module, depth: int):
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for layer in backbone_layers(backbone)[-depth:])
        norm = getattr(backbone, "final_norm", None)
        self.final_norm = copy.deepcopy(norm) if isinstance(norm, nn.Module) else None

    def load_from(self, backbone: nn.Module) -> None:
        for mine, theirs in zip(self.layers, backbone_layers(backbone)[-len(self.layers) :]):
            mine.load_state_dict(theirs.state_dict())
        if self.final_norm is not None:
            self.final_norm.load_state_dict(backbone.final_norm.state_dict())

    def forward(self, calls: list[tuple[tuple, dict]]) -> torch.Tensor:
        """`calls`: the positional and keyword arguments the shared copies of these layers received."""
        states = calls[0][0][0]
        for layer, (args, kwargs) in zip(self.layers, calls):
            output = layer(states, *args[1:], **kwargs)
            states = output[0] if isinstance(output, tuple) else output
        return self.final_norm(states) if self.final_norm is not None else states


class TaskHead(nn.Module):
    """Dropout then a linear layer, or a one-hidden-layer MLP when the task asks for more capacity; optionally with
    its own view of the token states: a transformer layer of its own (`adapt`) and its own attention pooling."""

    def __init__(
        self,
        input_size: int,
        num_outputs: int,
        head: dict[str, Any],
        attention_heads: int = 1,
        backbone: nn.Module | None = None,
    ):
        super().__init__()
        self.branch = LayerBranch(backbone, head["layers"]) if head.get("layers") else None
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
        return len(self.branch.layers) if self.branch is not None else 0

    def adapt(self, token_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The token states this head reads: its own transformer layer's output, or the shared states."""
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


# ---------------------------------------------------------------------------------------------- losses
#
# Each loss returns `(sum over labelled items, number of labelled items)`; `MultiTaskModel.task_loss` divides by the
# count (of this batch, or of the whole accumulated step when the trainer passes `num_items_in_batch`).


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


def classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy over class or tag ids; `(batch, num_labels)` or `(batch, seq, num_labels)` logits."""
    per_item = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    )
    return per_item.sum(), labelled_mask(labels).sum()


def elementwise_loss(logits: torch.Tensor, labels: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Binary cross-entropy (multi-label) or squared error (regression) over the labelled entries."""
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


# ---------------------------------------------------------------------------------------------- the model


class MultiTaskPreTrainedModel(PreTrainedModel):
    config_class = MultiTaskConfig
    config: MultiTaskConfig
    base_model_prefix = "mtl"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True


class MultiTaskModel(MultiTaskInferenceMixin, MultiTaskPreTrainedModel):
    """A shared transformer encoder with mask-aware pooling, optional projection/normalisation and task heads.

    One backbone pass serves the sentence embedding and every head: sequence-level heads read the pooled vector of a
    row's (first) text, token-level heads its token states, pair tasks the pooled vectors of the row's two (or
    three) texts, which go through the encoder together in that same pass.

    Args:
        config ([`MultiTaskConfig`]): the single source of truth for the architecture.
    """

    def __init__(self, config: MultiTaskConfig):
        super().__init__(config)
        self.backbone = AutoModel.from_config(config.backbone_config)
        _drop_backbone_pooler(self.backbone)
        self.pooling = Pooling(config.pooling, config.hidden_size)
        if config.projection_dim is not None:
            self.projection = nn.Linear(config.hidden_size, config.projection_dim)
            self.projection_activation = (
                ACT2FN[config.projection_activation] if config.projection_activation else nn.Identity()
            )
        else:
            self.projection = None
        self.heads = nn.ModuleDict()
        for task in config.tasks:
            if task["type"] in HEADLESS_TASK_TYPES:
                continue  # scored on the embeddings themselves
            if task["type"] == "token_classification" or task["head"].get("pooling") == "attention":
                input_size = config.hidden_size
            elif task["type"] == "pair_classification":
                input_size = len(task["pair_features"]) * config.embedding_dim
            else:
                input_size = config.embedding_dim
            attention_heads = getattr(config.backbone_config, "num_attention_heads", None) or getattr(
                config.backbone_config, "n_heads", 1
            )
            self.heads[task["name"]] = TaskHead(
                input_size, len(task["labels"]), task["head"], attention_heads, self.backbone
            )
        self.tokenizer = None  # attached by `from_pretrained` / `from_backbone`
        self.post_init()

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_backbone(
        cls,
        name_or_path: str | os.PathLike,
        tasks: list[dict] | None = None,
        pooling: str | None = None,
        normalize: bool | None = None,
        max_seq_length: int | None = None,
        projection_dim: int | None = None,
        tokenizer: Any | None = None,
        **kwargs,
    ) -> MultiTaskModel:
        """Build a model whose encoder carries pretrained weights, with freshly initialised heads.

        If `name_or_path` is a sentence-transformers checkpoint (it has `modules.json`), pooling, normalisation
        and max sequence length default to what that checkpoint was trained with; arguments given here win.

        Args:
            name_or_path: a Hub id or local folder of any encoder `AutoModel` can load.
            tasks: task descriptions (see `configuration_mtl.normalize_task`).
            pooling / normalize / max_seq_length / projection_dim: override the defaults.
            tokenizer: a tokenizer to use instead of the checkpoint's own.
            kwargs: `MultiTaskConfig` options (`head_dropout`, `projection_activation`), or the backbone's
                loading options (`revision`, `token`, `cache_dir`, `local_files_only`, `attn_implementation`,
                `dtype`). Anything else is an error.
        """
        load_keys = ("revision", "token", "cache_dir", "local_files_only", "attn_implementation", "dtype")
        config_keys = ("head_dropout", "projection_activation")
        unknown = sorted(set(kwargs) - set(load_keys) - set(config_keys))
        if unknown:
            raise TypeError(
                f"from_backbone got unexpected keyword argument(s) {unknown}; "
                f"allowed: {sorted((*load_keys, *config_keys))}"
            )
        load_kwargs = {key: kwargs.pop(key) for key in load_keys if key in kwargs}
        hub_kwargs = {
            key: load_kwargs[key]
            for key in ("revision", "token", "cache_dir", "local_files_only")
            if key in load_kwargs
        }
        st_defaults = read_sentence_transformers_settings(name_or_path, **hub_kwargs)
        if st_defaults.get("add_pooling_layer") is False:  # load it as saved, as sentence-transformers does
            load_kwargs["add_pooling_layer"] = False
        backbone = AutoModel.from_pretrained(name_or_path, **load_kwargs)
        _drop_backbone_pooler(backbone)
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(name_or_path, **hub_kwargs)
        dense = st_defaults.get("dense")
        if dense is not None:  # the checkpoint's Dense layer becomes the projection, weights and all
            if projection_dim is not None and projection_dim != dense["out_features"]:
                raise ValueError(
                    f"{name_or_path} has a Dense layer to {dense['out_features']} dimensions: projection_dim="
                    f"{projection_dim} would replace it; start from the underlying encoder to use another projection"
                )
            if not dense["bias"]:
                raise ValueError(f"{name_or_path}: a Dense layer without bias is not supported")
            projection_dim = dense["out_features"]
            kwargs.setdefault("projection_activation", dense["activation"])
        config = MultiTaskConfig(
            backbone_config=backbone.config,
            pooling=pooling or st_defaults.get("pooling", "mean"),
            normalize=st_defaults.get("normalize", False) if normalize is None else normalize,
            max_seq_length=resolve_max_seq_length(backbone.config, tokenizer, st_defaults, max_seq_length),
            projection_dim=projection_dim,
            tasks=tasks,
            prompts=st_defaults.get("prompts"),
            default_prompt_name=st_defaults.get("default_prompt_name"),
            **kwargs,
        )
        model = cls(config)
        if dense is not None:
            from safetensors.torch import load_file

            weights = load_file(dense["weights"])
            model.projection.load_state_dict({"weight": weights["linear.weight"], "bias": weights["linear.bias"]})
        # Swap the randomly initialised encoder for the pretrained one (same config, so same shapes); the heads'
        # own top layers start as copies of the pretrained ones.
        model.backbone = backbone
        for head in model.heads.values():
            if head.branch is not None:
                head.branch.load_from(backbone)
        model.to(dtype=backbone.dtype)  # heads follow the backbone's dtype (e.g. dtype=torch.bfloat16)
        model.tokenizer = tokenizer
        model.config.name_or_path = str(name_or_path)
        return model

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, tokenizer: Any | None = None, **kwargs):
        """`PreTrainedModel.from_pretrained`, plus the tokenizer saved beside the weights.

        A local folder is checked first, so that a wrong or damaged folder is one clear error naming the file
        (`check_model_folder`) instead of a model with guessed weights or an empty tokenizer. `tokenizer` supplies
        a tokenizer for a folder saved without one.
        """
        hub_kwargs = {
            key: kwargs[key] for key in ("revision", "token", "cache_dir", "local_files_only") if key in kwargs
        }
        if os.path.isdir(str(pretrained_model_name_or_path)) and "config" not in kwargs:
            check_model_folder(pretrained_model_name_or_path, need_tokenizer=tokenizer is None)
        model = super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        if tokenizer is None:
            # Passing the config keeps AutoTokenizer from re-reading config.json (and asking about remote code).
            tokenizer = AutoTokenizer.from_pretrained(
                pretrained_model_name_or_path, config=model.config.backbone_config, **hub_kwargs
            )
        model.tokenizer = tokenizer
        return model

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs) -> None:
        """`PreTrainedModel.save_pretrained`, plus the tokenizer (so the folder is complete on its own) and the
        sentence-transformers module files, so that `SentenceTransformer(folder, trust_remote_code=True)` embeds
        exactly as `encode` does."""
        self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}), **_AUTO_MAP}
        super().save_pretrained(save_directory, *args, **kwargs)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(save_directory)
            write_sentence_transformers_files(self, save_directory)

    def export_sentence_transformers(self, folder: str | os.PathLike) -> None:
        """Save the embedding part alone as a plain sentence-transformers folder (the encoder as its own
        `AutoModel`, the tokenizer, Pooling, the projection as a Dense module, Normalize): it loads with
        `SentenceTransformer(folder)` and no remote code, for vector databases, MTEB or TEI. The heads are left out."""
        if self.tokenizer is None:
            raise ValueError("export_sentence_transformers needs the model's tokenizer")
        os.makedirs(folder, exist_ok=True)
        self.backbone.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)
        # The encoder is saved without the pooler it never uses: sentence-transformers loads it without one, rather
        # than with a freshly initialised one and a "newly initialized weights" warning.
        without_pooler = "add_pooling_layer" in inspect.signature(type(self.backbone).__init__).parameters
        model_args = {"add_pooling_layer": False} if without_pooler else None
        if not write_sentence_transformers_files(self, folder, model_args):
            raise ValueError(
                f"sentence-transformers cannot express this embedding (pooling '{self.config.pooling}', projection "
                f"activation {self.config.projection_activation!r}); supported: {sorted(_ST_POOLING_NAMES.values())} "
                f"pooling and activations {sorted(a for a in _ST_ACTIVATIONS if a)}"
            )

    def add_tasks(self, tasks: list[dict[str, Any]]) -> MultiTaskModel:
        """A new model with every weight of this one (encoder, pooling, projection, heads) plus freshly initialised
        heads for `tasks` (task dicts as in `MultiTaskConfig(tasks=...)`), e.g. to add a task to a trained model
        and train it with `MultiTaskTrainer` (docs/TRAINING_CHOICES.md: freeze the old heads and keep their tasks
        in the mix, or freeze the encoder too). The old tasks and their labels are unchanged; this model is left
        untouched. Call `transformers.set_seed` first for a reproducible new head.
        """
        names = [task["name"] for task in tasks]
        clash = sorted(set(names) & set(self.config.task_names))
        if clash:
            raise ValueError(f"task(s) {clash} already exist in the model ({self.config.task_names})")
        config_dict = self.config.to_dict()
        config_dict["tasks"] = [*self.config.tasks, *tasks]
        extended = type(self)(type(self.config).from_dict(config_dict))
        missing, unexpected = extended.load_state_dict(self.state_dict(), strict=False)
        new_prefixes = tuple(f"heads.{name}." for name in names)
        wrong = [key for key in missing if not key.startswith(new_prefixes)]
        if wrong or unexpected:
            raise RuntimeError(f"weights did not carry over: missing {wrong}, unexpected {list(unexpected)}")
        extended.to(device=self.device, dtype=self.dtype)
        extended.tokenizer = self.tokenizer
        return extended

    # ------------------------------------------------------------------ forward

    @property
    def task_names(self) -> list[str]:
        return self.config.task_names

    def get_input_embeddings(self) -> nn.Module:
        return self.backbone.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.backbone.set_input_embeddings(value)

    def resize_token_embeddings(
        self, new_num_tokens: int | None = None, pad_to_multiple_of: int | None = None, **kwargs
    ):
        """Resize the encoder's token embeddings (after adding domain tokens to `model.tokenizer`); the nested
        backbone config records the new size, so the saved model reloads with it."""
        embeddings = self.backbone.resize_token_embeddings(new_num_tokens, pad_to_multiple_of, **kwargs)
        self.config.backbone_config.vocab_size = embeddings.num_embeddings
        return embeddings

    def compile_encoder(self, **compile_kwargs) -> MultiTaskModel:
        """Compile the encoder in place with `torch.compile` (`nn.Module.compile`), so that `encode`, `predict`,
        `similarity` and `forward` all run the compiled graph. `torch.compile(model)` alone does not do this: it
        wraps `forward` only, and `encode` calls the encoder directly. Shapes vary with every batch, so
        `dynamic=True` is the default. Returns the model."""
        self.backbone.compile(**{"dynamic": True, **compile_kwargs})
        return self

    def _check_tasks(self, tasks: Iterable[str]) -> list[str]:
        tasks = [tasks] if isinstance(tasks, str) else list(tasks)
        names = set(self.task_names)
        unknown = [name for name in tasks if name not in names]
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}; this model's tasks are {self.task_names}")
        return tasks

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: dict[str, torch.Tensor] | None = None,
        tasks: Sequence[str] | None = None,
        num_items_in_batch: dict[str, int | torch.Tensor] | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        head_gradient_scale: float = 1.0,
    ) -> MultiTaskModelOutput | tuple:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch, seq)`, or `(batch, texts, seq)` for rows of several
                texts: `[text_a, text_b]` for similarity / pair classification, `[anchor, positive(, negative)]`
                for contrastive tasks). A text whose attention mask is all zero is absent and not encoded.
            attention_mask (`torch.Tensor`, same shape): 1 for real tokens, 0 for padding.
            token_type_ids, position_ids, inputs_embeds: passed to the backbone when given.
            labels (`dict[str, torch.Tensor]`, *optional*):
                Per task, with `IGNORE_INDEX` (-100) marking a missing integer label and NaN a missing float label
                (`labelled_mask`): class ids `(batch,)` for classification and pair classification, multi-hot
                `(batch, num_labels)` floats for multi-label, `(batch, seq)` tag ids for token tasks (-100 also for
                sub-tokens that are not scored), `(batch,)` or `(batch, n)` floats for regression, `(batch,)` gold
                scores for similarity, `(batch,)` ints for contrastive (0: the row takes part). Tasks without an
                entry get logits but no loss.
            tasks (`list[str]`, *optional*): compute only these heads (default: all).
            num_items_in_batch (`dict[str, int]`, *optional*):
                Per task, the number of labelled items in the whole gradient-accumulation step; each task's
                loss is then `sum / num_items` so accumulation gives the same gradient as one large batch.
            head_gradient_scale (`float`, defaults to 1): the fraction of their gradients that the heads of single-text
                tasks (classification, multi-label, token classification, regression) pass back into the shared
                encoder. 0: their losses train only their own layers, pooling and linear layers, and the shared
                encoder learns from the tasks that train the embedding (similarity, pair classification,
                contrastive). The forward pass is the same whatever the value.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if input_ids is None and inputs_embeds is None:
            raise ValueError("forward needs `input_ids` or `inputs_embeds`")
        if labels is not None and not isinstance(labels, dict):
            raise TypeError(f"`labels` must be a dict of task name -> tensor, got {type(labels).__name__}")
        tasks = self.task_names if tasks is None else self._check_tasks(tasks)
        if labels:
            excluded = [name for name in self._check_tasks(labels) if name not in tasks]
            if excluded:
                raise ValueError(f"labels were given for task(s) {excluded} that `tasks={list(tasks)}` excludes")

        texts = _TextGroups(input_ids, attention_mask, inputs_embeds, token_type_ids, position_ids)
        branch_depth = max((self.heads[name].branch_depth for name in tasks if name in self.heads), default=0)
        encoder_outputs, features = self._encode(texts, output_hidden_states, branch_depth)  # (batch, texts, dim)
        first_token_states = encoder_outputs.last_hidden_state[: texts.batch_size]  # (batch, seq, hidden)

        first_mask = texts.present_mask[: texts.batch_size]  # (batch, seq)
        logits = {
            name: self._task_logits(name, features, first_token_states, first_mask, texts, head_gradient_scale)
            for name in tasks
        }
        logits = {name: value for name, value in logits.items() if value is not None}
        loss, task_losses = None, None
        if labels:
            task_losses = {
                name: self.task_loss(name, logits.get(name), task_labels, num_items_in_batch, features, texts)
                for name, task_labels in labels.items()
                if task_labels is not None
            }
            if task_losses:
                loss = sum(self.config.get_task(name)["loss_weight"] * value for name, value in task_losses.items())
                # Heads with their own top layers skip the shared ones: an exact zero keeps the whole shared
                # encoder in the graph, so distributed training sees every parameter take part in every step.
                loss = loss + features.sum() * 0.0

        embeddings = F.normalize(features, p=2, dim=-1) if self.config.normalize else features
        output = MultiTaskModelOutput(
            loss=loss,
            embeddings=embeddings if texts.grouped else embeddings[:, 0],
            logits=logits,
            task_losses=task_losses,
            last_hidden_state=first_token_states,
            hidden_states=encoder_outputs.hidden_states,
        )
        return output if return_dict else output.to_tuple()

    def _encode(
        self, texts: _TextGroups, output_hidden_states: bool | None = None, branch_depth: int = 0
    ) -> tuple[Any, torch.Tensor]:
        """One backbone pass over the present texts; returns its outputs and the `(batch, texts, dim)` features.
        With `branch_depth`, the calls of the top `branch_depth` layers are recorded in `texts.layer_calls` (for the
        heads that run their own copies of those layers)."""
        if branch_depth and not getattr(self.backbone, "_records_layer_calls", False):
            layers = backbone_layers(self.backbone)
            for index, layer in enumerate(layers):
                layer.register_forward_pre_hook(functools.partial(_record_call, index - len(layers)), with_kwargs=True)
            self.backbone._records_layer_calls = True
        # Thread-local: `encode`/`predict` run batches on several threads through the same layers.
        _LAYER_CALLS.store = texts.layer_calls if branch_depth else None
        try:
            encoder_outputs = self.backbone(
                **texts.backbone_inputs(), output_hidden_states=output_hidden_states, return_dict=True
            )
        finally:
            _LAYER_CALLS.store = None
        token_states = encoder_outputs.last_hidden_state  # (present texts, seq, hidden), first texts first
        return encoder_outputs, texts.scatter(self.pool(token_states, texts.present_mask))

    def embed(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, normalize: bool | None = None
    ) -> torch.Tensor:
        """Sentence embeddings of tokenised texts, without running any head.

        Args:
            input_ids / attention_mask: `(batch, seq)` or `(batch, texts, seq)`, as for `forward`.
            normalize: L2-normalise (default `config.normalize`).

        Returns: `(batch, embedding_dim)` or `(batch, texts, embedding_dim)`.
        """
        texts = _TextGroups(input_ids, attention_mask, None, None, None)
        features = self._encode(texts)[1]
        if self.config.normalize if normalize is None else normalize:
            features = F.normalize(features, p=2, dim=-1)
        return features if texts.grouped else features[:, 0]

    def pool(self, token_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Pooled (and projected, if configured) sentence features, before normalisation."""
        features = self.pooling(token_states, attention_mask)  # (batch, hidden)
        if self.projection is not None:
            features = self.projection_activation(self.projection(features))  # (batch, projection_dim)
        return features

    def _task_logits(
        self,
        name: str,
        features: torch.Tensor,
        token_states: torch.Tensor,
        first_mask: torch.Tensor,
        texts: _TextGroups | None = None,
        gradient_scale: float = 1.0,
    ) -> torch.Tensor | None:
        """One task's output for a batch; `None` for a pair task in a batch of single texts. `gradient_scale`: see
        `forward`'s `head_gradient_scale`."""
        task = self.config.get_task(name)
        task_type = task["type"]
        if task_type in ("token_classification", "classification", "multi_label_classification", "regression"):
            head = self.heads[name]
            features = scale_gradient(features, gradient_scale)
            if head.branch is not None:  # the head's own top layers, on the first texts' rows
                calls = texts.first_rows_calls(head.branch_depth)
                # Every input of the branch that carries a gradient: the states, and whatever else a backbone
                # hands its layers from shared weights (e.g. DeBERTa's relative position embeddings).
                token_states = head.branch(_map_tensors(calls, lambda tensor: scale_gradient(tensor, gradient_scale)))
            else:
                token_states = scale_gradient(token_states, gradient_scale)
            if task_type == "token_classification":
                return head(head.adapt(token_states, first_mask))  # (batch, seq, num_labels)
            if head.pooling is not None:  # the head's own view of the sentence: (batch, hidden)
                return head(head.pooling(head.adapt(token_states, first_mask), first_mask))
            return head(features[:, 0])  # (batch, num_labels)
        if features.shape[1] < 2:
            return None
        u, v = features[:, 0], features[:, 1]
        if task_type == "pair_classification":
            return self.pair_head_logits(name, u, v)  # (batch, num_labels)
        if task_type == "similarity":
            return F.cosine_similarity(u.float(), v.float(), dim=-1)  # (batch,)
        candidates = features[:, 1:].transpose(0, 1).reshape(-1, features.shape[-1])  # positives, then negatives
        return task["scale"] * F.normalize(u.float(), dim=-1) @ F.normalize(candidates.float(), dim=-1).T

    def pair_head_logits(self, name: str, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """A pair-classification head on two batches of sentence features."""
        return self.heads[name](pair_features(u, v, self.config.get_task(name)["pair_features"]))

    def task_loss(
        self,
        name: str,
        logits: torch.Tensor | None,
        labels: torch.Tensor,
        num_items_in_batch: dict[str, int | torch.Tensor] | None = None,
        features: torch.Tensor | None = None,
        texts: _TextGroups | None = None,
    ) -> torch.Tensor:
        """Mean loss of one task over its labelled items; missing labels (`labelled_mask`) count for nothing.

        A batch with no labelled item for the task gives a zero that still depends on the task's parameters, so
        distributed training never sees a parameter without a gradient.
        """
        task = self.config.get_task(name)
        task_type = task["type"]
        if logits is None:  # a pair task in a batch of single texts: nothing to learn, only touch the head
            if labelled_mask(_as_label_tensor(name, labels)).any():
                raise ValueError(
                    f"task '{name}': labels were given for a batch of single texts; a {task_type} task scores rows "
                    "of several texts (input_ids of shape (batch, texts, seq))"
                )
            if self._gathers(task):  # the other processes gather this task's candidates: join them, with none
                return self._zero_loss(name, features) + self._join_gathers(features)
            return self._zero_loss(name, features)
        labels = _as_label_tensor(name, labels).to(logits.device)
        if task_type in ("classification", "token_classification", "pair_classification", "contrastive"):
            if labels.is_floating_point():
                raise ValueError(f"task '{name}': labels must be integer ids ({IGNORE_INDEX} for missing), got floats")
            expected = logits.shape[:-1] if task_type != "contrastive" else logits.shape[:1]
            _check_shape(name, labels, expected)
        else:
            labels = labels.to(torch.float32)
            if task_type == "regression" and labels.dim() == 1:
                labels = labels.unsqueeze(-1)
            _check_shape(name, labels, logits.shape)
        valid = labelled_mask(labels)
        if task_type == "contrastive":
            total, count = self._contrastive(name, features, texts, valid)
        elif task_type in ("classification", "token_classification", "pair_classification"):
            _check_label_range(name, labels[valid], len(task["labels"]), task["labels"])
            total, count = classification_loss(logits, labels)
        elif task_type == "multi_label_classification":
            bad = labels[valid & (labels != 0) & (labels != 1)]
            if bad.numel():
                raise ValueError(
                    f"task '{name}': multi-label targets must be 0 or 1 (NaN for missing), got {bad[0].item()}"
                )
            total, count = elementwise_loss(logits, labels, "bce")
        elif task_type == "regression":
            total, count = elementwise_loss(logits, labels, "mse")
        else:  # similarity: gold scores mapped from the declared range to [0, 1]
            low, high = task["score_range"]
            scores = labels[valid]
            bad = scores[~torch.isfinite(scores) | (scores < low) | (scores > high)]
            if bad.numel():
                raise ValueError(
                    f"task '{name}': gold scores must be finite and within its score_range [{low:g}, {high:g}] "
                    f"(NaN for missing), got {bad[0].item()}"
                )
            targets = (labels - low) / (high - low)
            if task["loss"] == "cosent":
                total, count = cosent_loss(logits, targets, task["scale"])
            else:
                total, count = elementwise_loss(logits, targets, "mse")
        if num_items_in_batch is not None and name in num_items_in_batch:
            count = num_items_in_batch[name]
        if isinstance(count, torch.Tensor):
            count = count.to(total.device)
            return torch.where(count > 0, total / count.clamp(min=1), self._zero_loss(name, features, logits))
        return total / count if count > 0 else self._zero_loss(name, features, logits)

    def _contrastive(
        self, name: str, features: torch.Tensor, texts: _TextGroups, valid: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """In-batch negatives of one contrastive task: its rows' positives (and hard negatives), gathered from every
        process when the task asks for it."""
        task = self.config.get_task(name)
        rows = valid.nonzero().squeeze(-1)
        fingerprints = texts.fingerprints().view(texts.batch_size, -1)[rows]  # (n, texts)
        anchors = features[rows, 0]  # (n, dim)
        candidates = features[rows, 1:].transpose(0, 1).reshape(-1, features.shape[-1])  # (n * (texts-1), dim)
        # Per candidate: its text, and for a positive its row's anchor (a hard negative: its own text; see
        # `contrastive_loss`), so that another row's positive for the same anchor text is not a negative.
        positive_of = torch.cat([fingerprints[:, :1], fingerprints[:, 2:]], dim=1)  # (n, texts - 1)
        candidate_ids = torch.stack([fingerprints[:, 1:], positive_of], -1).transpose(0, 1).reshape(-1, 2)
        present = texts.present_mask_grouped()[rows, 1:].transpose(0, 1).reshape(-1)
        candidates, candidate_ids = candidates[present], candidate_ids[present]
        offset = 0
        if self._gathers(task):
            candidate_ids, _ = gather_with_grad(candidate_ids)
            candidates, _ = gather_with_grad(candidates)
            # This process's positives come first among its own candidates.
            offset = _gathered_offset(present.sum())
        targets = offset + torch.arange(len(rows), device=features.device)
        total = contrastive_loss(
            anchors, candidates, targets, candidate_ids[:, 0], fingerprints[:, 0], task["scale"], candidate_ids[:, 1]
        )
        return total, valid.sum()

    def _gathers(self, task: dict[str, Any]) -> bool:
        """Whether a contrastive task gathers its candidates from every process: when gradients are computed only.
        Gathering serves the gradient; an evaluation (under `no_grad`) may give one process a batch with the task's
        rows and another none, and there the loss is each process's own."""
        return task["type"] == "contrastive" and task["gather_across_processes"] and torch.is_grad_enabled()

    def _join_gathers(self, features: torch.Tensor) -> torch.Tensor:
        """Take part, with no candidates, in the collective calls `_contrastive` makes (same calls, same order), so
        that processes whose batches hold a gathering task's rows do not wait for this one. Returns an exact zero
        that depends on the gathered candidates, so the gather's backward (a collective too) runs here as well."""
        gather_with_grad(torch.zeros(0, 2, dtype=torch.long, device=features.device))  # the candidates' ids
        candidates, _ = gather_with_grad(features[:0, 0])  # (0, dim), in the graph
        _gathered_offset(torch.zeros((), dtype=torch.long, device=features.device))
        return candidates.float().sum() * 0.0

    # ------------------------------------------------------------------ inference hooks (see `inference_mtl`)

    @contextmanager
    def _inference_session(self) -> Iterator[None]:
        was_training = self.training
        self.eval()
        try:
            yield
        finally:
            self.train(was_training)

    def _batch_features(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, precision: str | None = None
    ) -> torch.Tensor:
        """Pooled (projected) float32 features of one right-padded batch. `inference_mode` and autocast are
        thread-local: entered here, so the worker threads of `encode` have them too."""
        bf16 = precision == "bfloat16" and self.dtype == torch.float32
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16):
            input_ids = input_ids.to(self.device, non_blocking=True)
            attention_mask = attention_mask.to(self.device, non_blocking=True)
            token_states = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            return self.pool(token_states, attention_mask).float()  # (batch, embedding_dim)

    def _batch_logits(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, tasks: list[str]
    ) -> dict[str, torch.Tensor]:
        with torch.inference_mode():
            return self(
                input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device), tasks=tasks
            ).logits

    def _pair_logits(self, name: str, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.pair_head_logits(name, u.to(self.device, self.dtype), v.to(self.device, self.dtype))

    def _zero_loss(self, name: str, features: torch.Tensor, logits: torch.Tensor | None = None) -> torch.Tensor:
        """An exact zero that depends on the task's parameters (its head), or on the features for headless tasks."""
        if name in self.heads:
            return sum(parameter.sum() for parameter in self.heads[name].parameters()) * 0.0
        return (logits if logits is not None else features).sum() * 0.0


class _SingleTaskView(MultiTaskPreTrainedModel):
    """One task of a saved multi-task model behind a standard transformers head class, so that `pipeline(...)` and
    the Hub widget can use it. The task is `config.pipeline_task` (pass `model_kwargs={"pipeline_task": name}` to
    `pipeline`) or, by default, the model's first task of a type the pipeline can serve."""

    task_types: tuple[str, ...] = ()

    def __init__(self, config: MultiTaskConfig):
        super().__init__(config)
        self.mtl = MultiTaskModel(config)
        candidates = [task["name"] for task in config.tasks if task["type"] in self.task_types]
        chosen = getattr(config, "pipeline_task", None) or (candidates[0] if candidates else None)
        if chosen not in candidates:
            raise ValueError(
                f"{type(self).__name__} serves a task of type {list(self.task_types)}: pipeline_task={chosen!r} is not "
                f"one (candidates: {candidates})"
            )
        self.task_name = chosen
        task = config.get_task(chosen)
        config.id2label = dict(enumerate(task["labels"]))
        config.label2id = {label: index for index, label in enumerate(task["labels"])}
        config.problem_type = {
            "multi_label_classification": "multi_label_classification",
            "regression": "regression",
        }.get(task["type"], "single_label_classification")
        self.post_init()

    def forward(
        self, input_ids=None, attention_mask=None, token_type_ids=None, labels=None, return_dict=None, **kwargs
    ):
        outputs = self.mtl(input_ids=input_ids, attention_mask=attention_mask, tasks=[self.task_name])
        loss = None
        if labels is not None:
            loss = self.mtl.task_loss(self.task_name, outputs.logits[self.task_name], labels)
        return self.output_class(loss=loss, logits=outputs.logits[self.task_name], hidden_states=outputs.hidden_states)


class MultiTaskModelForSequenceClassification(_SingleTaskView):
    """A sentence-level task (classification, multi-label, regression) for `pipeline("text-classification")`."""

    task_types = ("classification", "multi_label_classification", "regression")
    output_class = SequenceClassifierOutput


class MultiTaskModelForTokenClassification(_SingleTaskView):
    """A token task for `pipeline("token-classification")` (its `aggregation_strategy` groups entities)."""

    task_types = ("token_classification",)
    output_class = TokenClassifierOutput


class _TextGroups:
    """The texts of a batch: `(batch, seq)` (one text per row) or `(batch, texts, seq)` inputs flattened for one
    backbone pass over the texts that are present (first texts of every row first, then the others), and the way
    back to `(batch, texts, ...)`."""

    def __init__(self, input_ids, attention_mask, inputs_embeds, token_type_ids, position_ids):
        reference = input_ids if input_ids is not None else inputs_embeds[..., 0]
        self.grouped = reference.dim() == 3
        if attention_mask is None:
            attention_mask = torch.ones(reference.shape, dtype=torch.long, device=reference.device)
        if not self.grouped:
            input_ids, attention_mask, inputs_embeds, token_type_ids, position_ids = (
                None if t is None else t.unsqueeze(1)
                for t in (input_ids, attention_mask, inputs_embeds, token_type_ids, position_ids)
            )
        self.batch_size, self.num_texts = attention_mask.shape[:2]
        self._tensors = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "inputs_embeds": inputs_embeds,
            "token_type_ids": token_type_ids,
            "position_ids": position_ids,
        }
        present = attention_mask.bool().any(-1)  # (batch, texts)
        present[:, 0] = True  # every row has a first text, even an empty one
        self._present = present
        if self.num_texts == 1:
            self.order = None
        else:
            flat = present.transpose(0, 1).reshape(-1)  # text-major: all first texts, then all second texts, ...
            self.order = flat.nonzero().squeeze(-1)  # positions in text-major order
        self.present_mask = self._select(attention_mask)  # (present texts, seq)
        self.layer_calls: dict[int, tuple[tuple, dict]] = {}  # filled by `MultiTaskModel._encode` when asked

    def _select(self, tensor: torch.Tensor | None) -> torch.Tensor | None:
        if tensor is None:
            return None
        if self.order is None:
            return tensor[:, 0]
        flat = tensor.transpose(0, 1).reshape(-1, *tensor.shape[2:])
        return flat[self.order]

    def backbone_inputs(self) -> dict[str, torch.Tensor]:
        return {key: self._select(value) for key, value in self._tensors.items() if value is not None}

    def scatter(self, rows: torch.Tensor) -> torch.Tensor:
        """`(present texts, dim)` back to `(batch, texts, dim)`, zeros for absent texts."""
        if self.order is None:
            return rows.unsqueeze(1)
        out = rows.new_zeros(self.num_texts * self.batch_size, rows.shape[-1])
        out = out.index_copy(0, self.order, rows)
        return out.view(self.num_texts, self.batch_size, -1).transpose(0, 1)

    def first_rows_calls(self, depth: int) -> list[tuple[tuple, dict]]:
        """The recorded calls of the top `depth` layers, cut to the rows of each row's first text."""
        total = self.present_mask.shape[0]
        return [_first_rows(self.layer_calls[index], self.batch_size, total) for index in range(-depth, 0)]

    def present_mask_grouped(self) -> torch.Tensor:
        return self._present

    def fingerprints(self) -> torch.Tensor:
        """`(batch * texts,)` fingerprints in row-major order (row 0's texts, then row 1's, ...)."""
        ids = self._tensors["input_ids"]
        if ids is None:
            raise ValueError("contrastive tasks need input_ids (to recognise duplicate texts), not inputs_embeds")
        mask = self._tensors["attention_mask"]
        return text_fingerprints(ids.reshape(-1, ids.shape[-1]), mask.reshape(-1, mask.shape[-1]))


_LAYER_CALLS = threading.local()  # where this thread's forward records the layers' calls (None: it does not)


def _record_call(key: int, module: nn.Module, args: tuple, kwargs: dict) -> None:
    store = getattr(_LAYER_CALLS, "store", None)
    if store is not None:
        store[key] = (args, kwargs)


def _map_tensors(value: Any, function: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """`value` with `function` applied to every tensor in it (through tuples, lists and dicts)."""
    if isinstance(value, torch.Tensor):
        return function(value)
    if isinstance(value, (tuple, list)):
        return type(value)(_map_tensors(item, function) for item in value)
    if isinstance(value, dict):
        return {key: _map_tensors(item, function) for key, item in value.items()}
    return value


def _first_rows(value: Any, rows: int, total: int) -> Any:
    """`value` with every tensor whose first dimension counts the encoded texts cut to the first `rows` of them."""
    if rows == total:
        return value
    return _map_tensors(value, lambda tensor: tensor[:rows] if tensor.dim() and tensor.shape[0] == total else tensor)


def _gathered_offset(local_count: torch.Tensor) -> int:
    """Index of this process's first row once every process's rows are gathered in rank order."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return 0
    counts = [torch.zeros_like(local_count) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, local_count)
    return int(sum(int(c) for c in counts[: dist.get_rank()]))


# ---------------------------------------------------------------------------------------------- helpers


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model")


def check_model_folder(folder: str | os.PathLike, need_tokenizer: bool = True) -> None:
    """Raise one clear error naming the file when `folder` is not a complete saved multi-task model: no or invalid
    `config.json`, a config of another model type (a plain encoder: use `from_backbone`), invalid tasks, missing
    or truncated safetensors weights, or no tokenizer files."""
    folder = str(folder)
    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        raise OSError(f"{folder} holds no config.json: not a saved model (or an interrupted save)")
    try:
        with open(config_path, encoding="utf-8") as handle:
            config = json.load(handle)
    except (ValueError, UnicodeDecodeError) as error:
        raise OSError(f"{config_path} is not valid JSON ({error}): the file is damaged or truncated") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type != MultiTaskConfig.model_type:
        raise ValueError(
            f"{config_path} describes a '{model_type}' model, not a multi-task model: to start from a plain encoder "
            "use MultiTaskModel.from_backbone(folder, tasks=[...])"
        )
    try:
        MultiTaskConfig.from_dict(dict(config))
    except (ValueError, TypeError, KeyError) as error:
        raise ValueError(f"{config_path}: {error}") from None
    weights = [name for name in os.listdir(folder) if name.endswith(".safetensors") and name.startswith("model")]
    if not weights:
        raise OSError(f"{folder} holds no model*.safetensors weights")
    for name in weights:
        _check_safetensors(os.path.join(folder, name))
    if need_tokenizer and not any(os.path.isfile(os.path.join(folder, name)) for name in _TOKENIZER_FILES):
        raise OSError(
            f"{folder} holds no tokenizer files ({', '.join(_TOKENIZER_FILES)}): save the tokenizer beside the weights "
            "(`model.tokenizer.save_pretrained(folder)`) or pass `tokenizer=` to from_pretrained"
        )


def _check_safetensors(path: str) -> None:
    """A safetensors file is an 8-byte header length, a JSON header and the tensor bytes it lists: check all three."""
    size = os.path.getsize(path)
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        length = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
        if length < 2 or 8 + length > size:
            raise OSError(f"{path} is truncated or not a safetensors file ({size} bytes)")
        try:
            header = json.loads(handle.read(length))
        except (ValueError, UnicodeDecodeError):
            raise OSError(f"{path} has a damaged header: the file is truncated or not a safetensors file") from None
    ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
    if 8 + length + max(ends, default=0) > size:
        raise OSError(f"{path} is truncated: its header lists {8 + length + max(ends)} bytes, the file has {size}")


def resolve_max_seq_length(
    backbone_config: PretrainedConfig,
    tokenizer: Any,
    sentence_transformers_settings: dict[str, Any] | None = None,
    requested: int | None = None,
) -> int:
    """The truncation length, decided in one place: the requested one; else a sentence-transformers checkpoint's
    `max_seq_length`; else the smallest of 512, the tokenizer's `model_max_length` and the backbone's position
    embeddings (a tokenizer without a limit reports ~1e30, so it cannot decide alone)."""
    if requested is not None:
        return requested
    configured = (sentence_transformers_settings or {}).get("max_seq_length")
    if configured:
        return int(configured)
    candidates = [512]
    model_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(model_max, int) and 1 < model_max < 100_000:
        candidates.append(model_max)
    positions = getattr(backbone_config, "max_position_embeddings", None)
    if isinstance(positions, int) and positions > 1:
        candidates.append(positions)
    return min(candidates)


def _as_label_tensor(name: str, labels: Any) -> torch.Tensor:
    """Labels as a tensor: lists and numpy arrays are converted; booleans and other types are an error."""
    if not isinstance(labels, torch.Tensor):
        try:
            labels = torch.as_tensor(labels)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"task '{name}': labels must be a tensor, a numpy array or a list of numbers") from None
    if labels.dtype == torch.bool or labels.is_complex():
        raise TypeError(f"task '{name}': labels must be numbers (class ids or scores), got {labels.dtype}")
    return labels


def _check_shape(name: str, labels: torch.Tensor, expected: Sequence[int]) -> None:
    if tuple(labels.shape) != tuple(expected):
        raise ValueError(f"task '{name}': labels have shape {tuple(labels.shape)}, expected {tuple(expected)}")


def _check_label_range(name: str, labels: torch.Tensor, num_labels: int, label_names: list[str]) -> None:
    if labels.numel() == 0:
        return
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= num_labels:
        bad = low if low < 0 else high
        raise ValueError(
            f"task '{name}': label id {bad} is out of range; valid ids are 0..{num_labels - 1} "
            f"({label_names}) or {IGNORE_INDEX} for unlabelled"
        )


# ---------------------------------------------------------------------------------------------- sentence-transformers
#
# Both directions, in the sentence-transformers 2.x file format (which every later version, 6.x included, reads):
# `modules.json` lists Transformer -> Pooling -> [Dense] -> [Normalize], `sentence_bert_config.json` holds the
# max length, `config_sentence_transformers.json` the prompts. Reading refuses what this model cannot reproduce.

_ST_POOLING_FLAGS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len",
    "pooling_mode_weightedmean_tokens": "weighted_mean",
    "pooling_mode_lasttoken": "last_token",
}
_ST_POOLING_NAMES = {
    "mean_tokens": "mean",
    "cls_token": "cls",
    "max_tokens": "max",
    "lasttoken": "last_token",
    "weightedmean": "weighted_mean",
    "weightedmean_tokens": "weighted_mean",
    "mean_sqrt_len_tokens": "mean_sqrt_len",
}
# Projection activations with a torch class sentence-transformers can name (ACT2FN's "gelu" is the exact erf GELU).
_ST_ACTIVATIONS = {
    None: "torch.nn.modules.linear.Identity",
    "tanh": "torch.nn.modules.activation.Tanh",
    "gelu": "torch.nn.modules.activation.GELU",
    "relu": "torch.nn.modules.activation.ReLU",
    "sigmoid": "torch.nn.modules.activation.Sigmoid",
    "silu": "torch.nn.modules.activation.SiLU",
}


def _checkpoint_file(name_or_path: str | os.PathLike, filename: str, **hub_kwargs) -> str | None:
    """Local path of one file of a folder or Hub repo, or `None` when it has no such file (or the Hub is offline)."""
    if os.path.isdir(str(name_or_path)):
        path = os.path.join(str(name_or_path), filename)
        return path if os.path.isfile(path) else None
    try:
        from huggingface_hub import hf_hub_download

        return hf_hub_download(str(name_or_path), filename, **hub_kwargs)
    except Exception:  # no such file in the repo, or offline: a plain transformers model
        return None


def read_sentence_transformers_settings(name_or_path: str | os.PathLike, **hub_kwargs) -> dict[str, Any]:
    """What a sentence-transformers checkpoint adds to its encoder, or `{}` for a plain model: `pooling`,
    `normalize`, `max_seq_length`, `prompts` / `default_prompt_name`, `add_pooling_layer` (False for an encoder
    saved without its pooler), and `dense` (in/out features, bias,
    activation and the weights file) for a Dense layer after pooling. Modules this model cannot reproduce (a second
    Dense, several poolings concatenated, a pooling that leaves out the prompt, any other module type) are an error
    naming them, never silently dropped."""

    def read_json(filename: str) -> Any | None:
        path = _checkpoint_file(name_or_path, filename, **hub_kwargs)
        if path is None:
            return None
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)

    modules = read_json("modules.json")
    if not modules:
        return {}
    settings: dict[str, Any] = {"normalize": False}
    for position, module in enumerate(modules):
        kind = module.get("type", "").rsplit(".", 1)[-1]
        where = f"{name_or_path}: module {position} ({module.get('type')})"
        if kind == "Transformer" and position == 0:
            continue
        if kind == "Pooling" and "pooling" not in settings:
            settings["pooling"] = _sentence_transformers_pooling(
                read_json(f"{module['path']}/config.json") or {}, where
            )
        elif kind == "Dense" and "pooling" in settings and "dense" not in settings and not settings["normalize"]:
            settings["dense"] = _sentence_transformers_dense(name_or_path, module["path"], where, **hub_kwargs)
        elif kind == "Normalize" and "pooling" in settings and not settings["normalize"]:
            settings["normalize"] = True
        else:
            raise ValueError(
                f"{where} cannot be carried by MultiTaskModel, which reproduces Transformer -> Pooling -> [Dense] -> "
                "[Normalize] exactly; start from the underlying encoder instead"
            )
    bert_config = read_json("sentence_bert_config.json") or {}
    if bert_config.get("max_seq_length"):
        settings["max_seq_length"] = int(bert_config["max_seq_length"])
    model_kwargs = bert_config.get("model_kwargs") or bert_config.get("model_args") or {}
    if model_kwargs.get("add_pooling_layer") is False:  # an encoder saved without its pooler (an export of ours)
        settings["add_pooling_layer"] = False
    st_config = read_json("config_sentence_transformers.json") or {}
    prompts = {name: text for name, text in (st_config.get("prompts") or {}).items() if text}
    if prompts:
        settings["prompts"] = prompts
    if st_config.get("default_prompt_name"):
        settings["default_prompt_name"] = st_config["default_prompt_name"]
    return settings


def _sentence_transformers_pooling(pooling_config: dict[str, Any], where: str) -> str:
    if pooling_config.get("include_prompt") is False:
        raise ValueError(
            f"{where}: a pooling that leaves out the prompt tokens (include_prompt=false) is not supported"
        )
    mode = pooling_config.get("pooling_mode")
    if isinstance(mode, str):
        return _ST_POOLING_NAMES.get(mode, mode)
    chosen = [mode for flag, mode in _ST_POOLING_FLAGS.items() if pooling_config.get(flag)]
    if len(chosen) > 1:
        raise ValueError(f"{where} concatenates poolings {chosen}; MultiTaskModel pools one way")
    return chosen[0] if chosen else "mean"


def _sentence_transformers_dense(name_or_path, folder: str, where: str, **hub_kwargs) -> dict[str, Any]:
    config_path = _checkpoint_file(name_or_path, f"{folder}/config.json", **hub_kwargs)
    with open(config_path, encoding="utf-8") as handle:
        config = json.load(handle)
    names = {name: key for key, name in _ST_ACTIVATIONS.items()}
    activation = config.get("activation_function", _ST_ACTIVATIONS[None])
    if activation not in names:
        raise ValueError(f"{where}: Dense activation {activation} is not one of {sorted(names)}")
    weights = _checkpoint_file(name_or_path, f"{folder}/model.safetensors", **hub_kwargs)
    if weights is None:
        raise ValueError(f"{where}: no {folder}/model.safetensors (Dense weights in another format are not read)")
    return {
        "in_features": int(config["in_features"]),
        "out_features": int(config["out_features"]),
        "bias": bool(config.get("bias", True)),
        "activation": names[activation],
        "weights": weights,
    }


def write_sentence_transformers_files(
    model: MultiTaskModel, folder: str | os.PathLike, model_args: dict[str, Any] | None = None
) -> bool:
    """Write the sentence-transformers module files for `model`'s embedding into `folder` (whose root holds the
    encoder and tokenizer), so that `SentenceTransformer(folder)` embeds exactly as `model.encode` does;
    `model_args`: keyword arguments for loading the encoder there (`sentence_bert_config.json`). Returns
    `False`, writing nothing, when the embedding has a part sentence-transformers cannot express (learned
    attention pooling, a projection activation it has no class for)."""
    from safetensors.torch import save_file

    config = model.config
    flags = {mode: flag for flag, mode in _ST_POOLING_FLAGS.items()}
    if config.pooling not in flags or config.projection_activation not in _ST_ACTIVATIONS:
        return False
    folder = str(folder)
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}]

    def add(kind: str, settings: dict[str, Any]) -> str:
        path = f"{len(modules)}_{kind}"
        modules.append(
            {
                "idx": len(modules),
                "name": str(len(modules)),
                "path": path,
                "type": f"sentence_transformers.models.{kind}",
            }
        )
        os.makedirs(os.path.join(folder, path), exist_ok=True)
        with open(os.path.join(folder, path, "config.json"), "w", encoding="utf-8") as handle:
            json.dump(settings, handle, indent=2)
        return os.path.join(folder, path)

    add(
        "Pooling",
        {
            "word_embedding_dimension": config.hidden_size,
            **{flag: config.pooling == mode for mode, flag in flags.items()},
        },
    )
    if model.projection is not None:
        dense = add(
            "Dense",
            {
                "in_features": config.hidden_size,
                "out_features": config.projection_dim,
                "bias": model.projection.bias is not None,
                "activation_function": _ST_ACTIVATIONS[config.projection_activation],
            },
        )
        tensors = {"linear.weight": model.projection.weight.detach().cpu().contiguous()}
        if model.projection.bias is not None:
            tensors["linear.bias"] = model.projection.bias.detach().cpu().contiguous()
        save_file(tensors, os.path.join(dense, "model.safetensors"))
    if config.normalize:
        add("Normalize", {})
    bert_config = {"max_seq_length": config.max_seq_length, "do_lower_case": False}
    if model_args:
        bert_config["model_args"] = model_args
    for name, content in (
        ("modules.json", modules),
        ("sentence_bert_config.json", bert_config),
        (
            "config_sentence_transformers.json",
            {
                "prompts": dict(config.prompts or {}),
                "default_prompt_name": config.default_prompt_name,
                "similarity_fn_name": "cosine",
            },
        ),
    ):
        with open(os.path.join(folder, name), "w", encoding="utf-8") as handle:
            json.dump(content, handle, indent=2)
    return True


def _drop_backbone_pooler(backbone: nn.Module) -> None:
    # BERT/RoBERTa build a tanh "pooler" for next-sentence prediction. We pool ourselves, so it would be dead
    # weight and, worse, a parameter without gradient that makes DistributedDataParallel fail.
    if getattr(backbone, "pooler", None) is not None:
        backbone.pooler = None


# Register with the Auto classes: `AutoModel.from_pretrained(dir)` then works without `trust_remote_code` once
# this module is imported, and `save_pretrained` writes `auto_map` and copies this file and the ones it imports.
MultiTaskConfig.register_for_auto_class()
MultiTaskModel.register_for_auto_class("AutoModel")
# `save_pretrained` of a MultiTaskModel maps these too (see `_AUTO_MAP`), so that standard pipelines find a class.
_AUTO_MAP = {
    "AutoModelForSequenceClassification": "modeling_mtl.MultiTaskModelForSequenceClassification",
    "AutoModelForTokenClassification": "modeling_mtl.MultiTaskModelForTokenClassification",
}
if not __name__.startswith("transformers_modules"):
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification

    AutoConfig.register(MultiTaskConfig.model_type, MultiTaskConfig, exist_ok=True)
    AutoModel.register(MultiTaskConfig, MultiTaskModel, exist_ok=True)
    AutoModelForSequenceClassification.register(MultiTaskConfig, MultiTaskModelForSequenceClassification, exist_ok=True)
    AutoModelForTokenClassification.register(MultiTaskConfig, MultiTaskModelForTokenClassification, exist_ok=True)


__all__ = [
    "IGNORE_INDEX",
    "EMBEDDING_TASK_TYPES",
    "MultiTaskConfig",
    "MultiTaskModel",
    "MultiTaskModelForSequenceClassification",
    "MultiTaskModelForTokenClassification",
    "MultiTaskModelOutput",
    "MultiTaskPreTrainedModel",
    "Pooling",
    "TaskHead",
    "group_entities",
    "labelled_mask",
    "plan_batches",
    "check_model_folder",
    "read_sentence_transformers_settings",
    "resolve_max_seq_length",
    "run_concurrently",
]
