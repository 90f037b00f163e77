"""A multi-task sentence transformer: one shared encoder, mask-aware pooling, and one head per task.

This file is copied next to the weights by `save_pretrained` (together with `configuration_mtl.py`), so that
`AutoModel.from_pretrained(path, trust_remote_code=True)` works on a machine without this project. It must
therefore stay self-contained: standard library, torch, numpy, transformers, and a relative import of the config.
Training code lives in `train.py` / `mtl_training.py`, never here.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from transformers import AutoConfig, AutoModel, AutoTokenizer, PretrainedConfig, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.utils import ModelOutput, logging

try:  # inside a Hub/remote-code package
    from .configuration_mtl import MultiTaskConfig
except ImportError:  # installed as top-level modules, or run from the project folder
    from configuration_mtl import MultiTaskConfig

logger = logging.get_logger(__name__)

IGNORE_INDEX = -100
SEQUENCE_TASK_TYPES = ("classification", "multi_label_classification", "regression")


@dataclass
class MultiTaskModelOutput(ModelOutput):
    r"""
    Output of [`MultiTaskModel.forward`].

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*, returned when `labels` are given):
            Sum over the labelled tasks of `loss_weight * task_loss`.
        embeddings (`torch.FloatTensor` of shape `(batch, embedding_dim)`):
            Sentence embeddings (pooled, projected if configured, L2-normalised if `config.normalize`).
        logits (`dict[str, torch.FloatTensor]`):
            Per task: `(batch, num_labels)` for sequence tasks, `(batch, seq, num_labels)` for token tasks.
        task_losses (`dict[str, torch.FloatTensor]`, *optional*, returned when `labels` are given):
            The unweighted loss of each task that received labels.
        last_hidden_state (`torch.FloatTensor` of shape `(batch, seq, hidden)`):
            The backbone's token states.
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
        self.attention_scorer = nn.Linear(hidden_size, 1) if mode == "attention" else None

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


class TaskHead(nn.Module):
    """Dropout then a linear layer, or a one-hidden-layer MLP when the task asks for more capacity."""

    def __init__(self, input_size: int, num_outputs: int, head: dict[str, Any]):
        super().__init__()
        self.dropout = nn.Dropout(head["dropout"])
        if head["type"] == "mlp":
            hidden_size = head.get("hidden_size") or input_size
            self.dense = nn.Linear(input_size, hidden_size)
            self.activation = ACT2FN[head["activation"]]
            input_size = hidden_size
        else:
            self.dense = None
        self.out_proj = nn.Linear(input_size, num_outputs)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        features = self.dropout(features)
        if self.dense is not None:
            features = self.dropout(self.activation(self.dense(features)))
        return self.out_proj(features)


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


class MultiTaskModel(MultiTaskPreTrainedModel):
    """A shared transformer encoder with mask-aware pooling, optional projection/normalisation and task heads.

    One backbone pass serves the sentence embedding and every head: sequence-level heads read the pooled vector,
    token-level heads read the token states.

    Args:
        config ([`MultiTaskConfig`]): the single source of truth for the architecture.
    """

    # Largest fraction of a row that `encode`/`predict` may pad (see `plan_batches`); an inference-speed knob only.
    inference_max_padding: float = 0.1
    # CPU worker threads that `encode`/`predict` run batches on side by side (`run_concurrently`), the torch
    # threads split between them; `None` = min(4, torch threads), 1 = one batch at a time. Within one batch,
    # intra-op threads leave cores idle (small matrix multiplies are bound by reading the weights; layer norms,
    # softmax and Python overhead run on one core); a second batch fills them. Each batch is computed exactly as
    # it is alone. Measured in docs/BENCHMARKS.md; capped at 4 because every worker holds one batch's activations.
    inference_workers: int | None = None

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
            input_size = config.hidden_size if task["type"] == "token_classification" else config.embedding_dim
            self.heads[task["name"]] = TaskHead(input_size, len(task["labels"]), task["head"])
        self.tokenizer = None  # attached by `from_pretrained` / `from_backbone`
        self.post_init()

    # ------------------------------------------------------------------ construction helpers

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
            kwargs: passed to `MultiTaskConfig` (e.g. `head_dropout`, `projection_activation`), or to the
                backbone's `from_pretrained` when they are loading options (`revision`, `token`, `cache_dir`,
                `local_files_only`, `attn_implementation`, `dtype`).
        """
        load_keys = ("revision", "token", "cache_dir", "local_files_only", "attn_implementation", "dtype")
        load_kwargs = {key: kwargs.pop(key) for key in load_keys if key in kwargs}
        hub_kwargs = {
            key: load_kwargs[key]
            for key in ("revision", "token", "cache_dir", "local_files_only")
            if key in load_kwargs
        }
        st_defaults = read_sentence_transformers_settings(name_or_path, **hub_kwargs)
        backbone = AutoModel.from_pretrained(name_or_path, **load_kwargs)
        _drop_backbone_pooler(backbone)
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(name_or_path, **hub_kwargs)
        if max_seq_length is None:
            max_seq_length = st_defaults.get("max_seq_length") or _default_max_length(backbone.config, tokenizer)
        config = MultiTaskConfig(
            backbone_config=backbone.config,
            pooling=pooling or st_defaults.get("pooling", "mean"),
            normalize=st_defaults.get("normalize", False) if normalize is None else normalize,
            max_seq_length=max_seq_length,
            projection_dim=projection_dim,
            tasks=tasks,
            **kwargs,
        )
        model = cls(config)
        # Swap the randomly initialised encoder for the pretrained one (same config, so same shapes).
        model.backbone = backbone
        model.to(dtype=backbone.dtype)  # heads follow the backbone's dtype (e.g. dtype=torch.bfloat16)
        model.tokenizer = tokenizer
        model.config.name_or_path = str(name_or_path)
        return model

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """`PreTrainedModel.from_pretrained`, plus the tokenizer saved beside the weights (if any)."""
        hub_kwargs = {
            key: kwargs[key] for key in ("revision", "token", "cache_dir", "local_files_only") if key in kwargs
        }
        model = super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        try:
            # Passing the config keeps AutoTokenizer from re-reading config.json (and asking about remote code).
            model.tokenizer = AutoTokenizer.from_pretrained(
                pretrained_model_name_or_path, config=model.config.backbone_config, **hub_kwargs
            )
        except (OSError, ValueError, TypeError) as error:
            logger.warning(f"no tokenizer loaded from {pretrained_model_name_or_path}: {error}")
        return model

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs) -> None:
        """`PreTrainedModel.save_pretrained`, plus the tokenizer (so the folder is complete on its own)."""
        super().save_pretrained(save_directory, *args, **kwargs)
        if self.tokenizer is not None and getattr(self, "_save_tokenizer", True):
            self.tokenizer.save_pretrained(save_directory)

    # ------------------------------------------------------------------ forward

    @property
    def task_names(self) -> list[str]:
        return self.config.task_names

    def get_input_embeddings(self) -> nn.Module:
        return self.backbone.get_input_embeddings()

    def _check_tasks(self, tasks: Iterable[str]) -> list[str]:
        tasks = [tasks] if isinstance(tasks, str) else list(tasks)
        unknown = [name for name in tasks if name not in self.heads]
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
    ) -> MultiTaskModelOutput | tuple:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch, seq)`): token ids.
            attention_mask (`torch.Tensor` of shape `(batch, seq)`): 1 for real tokens, 0 for padding.
            token_type_ids, position_ids, inputs_embeds: passed to the backbone when given.
            labels (`dict[str, torch.Tensor]`, *optional*):
                Per task: class ids `(batch,)` for classification (`-100` = unlabelled), multi-hot `(batch,
                num_labels)` floats for multi-label (`-100` or NaN = unlabelled), `(batch, seq)` tag ids for token
                tasks (`-100` = ignored sub-token), `(batch,)` or `(batch, n)` floats for regression (NaN =
                unlabelled). Tasks without an entry get logits but no loss.
            tasks (`list[str]`, *optional*): compute only these heads (default: all, or all labelled ones).
            num_items_in_batch (`dict[str, int]`, *optional*):
                Per task, the number of labelled items in the whole gradient-accumulation step; each task's
                loss is then `sum / num_items` so accumulation gives the same gradient as one large batch.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if input_ids is None and inputs_embeds is None:
            raise ValueError("forward needs `input_ids` or `inputs_embeds`")
        if labels is not None and not isinstance(labels, dict):
            raise TypeError(f"`labels` must be a dict of task name -> tensor, got {type(labels).__name__}")
        if tasks is None:
            tasks = self.task_names
        else:
            tasks = self._check_tasks(tasks)
        if labels:
            missing = [name for name in self._check_tasks(labels) if name not in tasks]
            if missing:
                raise ValueError(f"labels were given for task(s) {missing} that `tasks={list(tasks)}` excludes")
        if attention_mask is None:
            reference = input_ids if input_ids is not None else inputs_embeds[..., 0]
            attention_mask = torch.ones(reference.shape[:2], dtype=torch.long, device=reference.device)

        backbone_inputs = {"attention_mask": attention_mask}
        if input_ids is not None:
            backbone_inputs["input_ids"] = input_ids
        else:
            backbone_inputs["inputs_embeds"] = inputs_embeds
        if token_type_ids is not None:
            backbone_inputs["token_type_ids"] = token_type_ids
        if position_ids is not None:
            backbone_inputs["position_ids"] = position_ids
        encoder_outputs = self.backbone(**backbone_inputs, output_hidden_states=output_hidden_states, return_dict=True)
        token_states = encoder_outputs.last_hidden_state  # (batch, seq, hidden)

        sentence_features = self.pool(token_states, attention_mask)  # (batch, embedding_dim)
        embeddings = F.normalize(sentence_features, p=2, dim=-1) if self.config.normalize else sentence_features

        logits = {}
        for name in tasks:
            task_type = self.config.get_task(name)["type"]
            features = token_states if task_type == "token_classification" else sentence_features
            logits[name] = self.heads[name](features)  # (batch, [seq,] num_labels)

        loss, task_losses = None, None
        if labels:
            task_losses = {}
            for name, task_labels in labels.items():
                if task_labels is None:
                    continue
                task_losses[name] = self.task_loss(name, logits[name], task_labels, num_items_in_batch)
            if task_losses:
                loss = sum(self.config.get_task(name)["loss_weight"] * value for name, value in task_losses.items())

        output = MultiTaskModelOutput(
            loss=loss,
            embeddings=embeddings,
            logits=logits,
            task_losses=task_losses,
            last_hidden_state=token_states,
            hidden_states=encoder_outputs.hidden_states,
        )
        return output if return_dict else output.to_tuple()

    def pool(self, token_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Pooled (and projected, if configured) sentence features, before normalisation."""
        features = self.pooling(token_states, attention_mask)  # (batch, hidden)
        if self.projection is not None:
            features = self.projection_activation(self.projection(features))  # (batch, projection_dim)
        return features

    def task_loss(
        self,
        name: str,
        logits: torch.Tensor,
        labels: torch.Tensor,
        num_items_in_batch: dict[str, int | torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Mean loss of one task over its labelled items; unlabelled items (-100 / NaN) count for nothing.

        A batch with no labelled item for the task gives a zero that still depends on the head's parameters,
        so distributed training never sees a parameter without a gradient.
        """
        task = self.config.get_task(name)
        task_type = task["type"]
        labels = labels.to(logits.device)
        if task_type in ("classification", "token_classification"):
            if labels.is_floating_point():
                labels = labels.long()
            expected = logits.shape[:-1]
            if labels.shape != expected:
                raise ValueError(f"task '{name}': labels have shape {tuple(labels.shape)}, expected {tuple(expected)}")
            valid = labels != IGNORE_INDEX
            _check_label_range(name, labels[valid], len(task["labels"]), task["labels"])
            per_item = F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]).float(),
                labels.reshape(-1),
                ignore_index=IGNORE_INDEX,
                reduction="none",
            )
        else:
            labels = labels.to(torch.float32)
            if task_type == "regression" and labels.dim() == 1:
                labels = labels.unsqueeze(-1)
            if labels.shape != logits.shape:
                raise ValueError(
                    f"task '{name}': labels have shape {tuple(labels.shape)}, expected {tuple(logits.shape)}"
                )
            valid = ~torch.isnan(labels)
            if task_type == "multi_label_classification":
                valid &= labels != IGNORE_INDEX
                bad = labels[valid & (labels != 0) & (labels != 1)]
                if bad.numel():
                    raise ValueError(
                        f"task '{name}': multi-label targets must be 0 or 1 (or -100/NaN for unlabelled), "
                        f"got {bad[0].item()}"
                    )
                safe = torch.where(valid, labels, torch.zeros_like(labels))
                per_item = F.binary_cross_entropy_with_logits(logits.float(), safe, reduction="none")
            else:
                safe = torch.where(valid, labels, torch.zeros_like(labels))
                per_item = F.mse_loss(logits.float(), safe, reduction="none")
            per_item = per_item * valid
        total = per_item.sum()
        if num_items_in_batch is not None and name in num_items_in_batch:
            count = num_items_in_batch[name]
        else:
            count = valid.sum()
        if isinstance(count, torch.Tensor):
            count = count.to(total.device)
            return torch.where(count > 0, total / count.clamp(min=1), logits.sum() * 0.0)
        return total / count if count > 0 else logits.sum() * 0.0

    # ------------------------------------------------------------------ inference helpers

    def tokenize(
        self,
        texts: Sequence[str] | Sequence[Sequence[str]],
        max_seq_length: int | None = None,
        padding: bool | str = True,
        return_tensors: str | None = "pt",
        **kwargs,
    ):
        """Tokenise texts (or pre-split words with `is_split_into_words=True`) the way the model expects."""
        if self.tokenizer is None:
            raise ValueError(
                "this model has no tokenizer: load it with `from_pretrained`/`from_backbone`, or set `model.tokenizer`"
            )
        return self.tokenizer(
            list(texts),
            padding=padding,
            truncation=True,
            max_length=max_seq_length or self.config.max_seq_length,
            return_tensors=return_tensors,
            **kwargs,
        )

    def _padded_batches(
        self, tokens: PackedTokens, batch_size: int, show_progress_bar: bool | None
    ) -> Iterator[tuple[np.ndarray, torch.Tensor, torch.Tensor]]:
        """Yield `(indices, input_ids, attention_mask)` for already tokenised texts, in the batches chosen by
        `plan_batches`: each batch is padded only to its own longest row. `indices` map rows to input order."""
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
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
            # Always pad on the right, whatever the tokenizer's padding_side: in a single forward pass every real
            # token then keeps the position it has alone (left padding exists for generation, and shifts the
            # absolute positions of BERT-style models).
            for row, index in enumerate(indices):
                length = tokens.lengths[index]
                ids[row, :length] = tokens.row(index)
                mask[row, :length] = 1
            yield indices, torch.from_numpy(ids), torch.from_numpy(mask)

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
    ) -> np.ndarray | torch.Tensor:
        """Embed sentences into fixed-length vectors.

        All texts are tokenised in one call, sorted by token count and cut into batches that carry little
        padding (`plan_batches`); results come back in input order.

        Args:
            sentences: one string or a list of strings (empty strings are fine; long ones are truncated to
                `max_seq_length`, default `config.max_seq_length`).
            batch_size: at most this many sentences per forward pass.
            normalize: L2-normalise the vectors; default `config.normalize`.
            convert_to_numpy / convert_to_tensor: return a float32 `np.ndarray` (default) or a `torch.Tensor`
                on the model's device.
            show_progress_bar: show a tqdm bar (default: only for long inputs when logging is verbose).
            max_seq_length: truncation length in tokens for this call.
            precision: `None` (default) computes in the weights' own dtype: float32 weights match
                sentence-transformers to 1e-5. `"bfloat16"` runs the encoder under bfloat16 autocast; faster and
                more so after `model.to(torch.bfloat16)`, which also halves the weights' memory traffic (GPUs,
                and CPUs with AVX512-BF16 or AMX; measured in docs/BENCHMARKS.md). For int8 on CPU use
                `model.quantize_dynamic().encode(...)`.

        Returns:
            `(len(sentences), embedding_dim)` float32, in input order; `(embedding_dim,)` for a single string.
        """
        if precision not in (None, "float32", "bfloat16"):
            raise ValueError(f"precision must be None, 'float32' or 'bfloat16', got {precision!r}")
        if precision == "float32" and self.dtype != torch.float32:
            raise ValueError(f"precision='float32' needs float32 weights, this model's are {self.dtype}: call .float()")
        single = isinstance(sentences, str)
        texts = _check_texts([sentences] if single else sentences)
        normalize = self.config.normalize if normalize is None else normalize
        dimension = self.config.embedding_dim
        to_tensor = convert_to_tensor or not convert_to_numpy
        device = self.device
        if to_tensor:
            result = torch.empty((len(texts), dimension), dtype=torch.float32, device=device)
        else:
            result = np.empty((len(texts), dimension), dtype=np.float32)
        if not texts:
            return result
        # Tokenised in chunks and packed into one flat int32 array: 100k sentences take a few MB instead of the
        # ~70 MB of Python int lists, so memory grows with the output array, not with the token lists.
        chunk = 8192
        tokens = PackedTokens.concatenate(
            [
                PackedTokens.from_lists(
                    self._tokenize_unpadded(texts[start : start + chunk], max_seq_length)["input_ids"]
                )
                for start in range(0, len(texts), chunk)
            ]
        )

        was_training = self.training
        self.eval()
        try:
            autocast = torch.autocast(
                device.type, dtype=torch.bfloat16, enabled=precision == "bfloat16" and self.dtype == torch.float32
            )

            def embed_batch(indices: np.ndarray, batch_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
                # inference_mode and autocast are thread-local: entered here, so concurrent workers have them too.
                with torch.inference_mode(), autocast:
                    batch_ids = batch_ids.to(device, non_blocking=True)
                    attention_mask = attention_mask.to(device, non_blocking=True)
                    token_states = self.backbone(input_ids=batch_ids, attention_mask=attention_mask).last_hidden_state
                    features = self.pool(token_states, attention_mask).float()  # (batch, embedding_dim)
                    if normalize:
                        features = F.normalize(features, p=2, dim=-1)
                    if to_tensor:
                        result[torch.from_numpy(indices).to(device)] = features
                    else:
                        result[indices] = features.cpu().numpy()

            self._for_each_batch(embed_batch, self._padded_batches(tokens, batch_size, show_progress_bar))
        finally:
            self.train(was_training)
        return result[0] if single else result

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

    def _tokenize_unpadded(self, texts: list, max_seq_length: int | None = None, **kwargs):
        """Tokenise every text in one call (the fast tokenizer batches it in Rust), without padding."""
        if self.tokenizer is None:
            raise ValueError(
                "this model has no tokenizer: load it with `from_pretrained`/`from_backbone`, or set `model.tokenizer`"
            )
        return self.tokenizer(
            texts,
            padding=False,
            truncation=True,
            max_length=max_seq_length or self.config.max_seq_length,
            return_attention_mask=False,
            return_token_type_ids=False,
            **kwargs,
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

    def quantize_dynamic(self) -> MultiTaskModel:
        """Return an int8 copy for CPU inference: dynamic quantisation of every `nn.Linear` (int8 weights with one
        scale per output channel, activations quantised on the fly). Several times faster `encode` on CPUs with
        VNNI, at a quality cost measured in docs/BENCHMARKS.md; the original model is left untouched.
        Inference only."""
        import copy

        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        quantized = copy.deepcopy(self).to("cpu").float().eval()
        return quantize_dynamic(quantized, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8)

    def predict(
        self,
        sentences: str | Sequence[str] | Sequence[Sequence[str]],
        tasks: Sequence[str] | None = None,
        batch_size: int = 32,
        show_progress_bar: bool | None = None,
    ) -> dict[str, Any] | list[dict[str, Any]]:
        """Human-readable predictions of every task (or the chosen ones) from one encoder pass per batch.

        Args:
            sentences: a string, a list of strings, or a list of pre-split word lists (for token tasks on
                your own word boundaries).

        Returns:
            Per sentence, a dict task -> prediction:
            - classification: `{"label", "score", "scores": {label: probability}}`
            - multi_label_classification: `{"labels": [labels above the task threshold], "scores": {...}}`
            - regression: `{"value": float}` (one output) or `{"values": {name: float}}`
            - token_classification: `{"words": [{"word", "start", "end", "tag", "score"}], "entities":
              [{"entity", "text", "start", "end", "score"}]}` with tags per word (first sub-token) and
              character offsets into the input string.
        """
        # A single pre-split sentence cannot be told from a list of sentences: pass a list of word lists.
        single = isinstance(sentences, str)
        items = [sentences] if single else list(sentences)
        split_into_words = bool(items) and all(isinstance(item, (list, tuple)) for item in items)
        if split_into_words:
            for index, words in enumerate(items):
                for word_index, word in enumerate(words):
                    if not isinstance(word, str):
                        raise TypeError(f"sentences[{index}][{word_index}] must be a str, got {type(word).__name__}")
            texts = [" ".join(words) for words in items]
        else:
            texts = _check_texts(items)
        tasks = self.task_names if tasks is None else self._check_tasks(tasks)
        needs_words = any(self.config.get_task(name)["type"] == "token_classification" for name in tasks)
        if needs_words and not getattr(self.tokenizer, "is_fast", False):
            raise ValueError("token-classification predictions need a fast tokenizer (word ids and offsets)")

        results: list[dict[str, Any] | None] = [None] * len(items)
        if not items:
            return results
        encoding = self._tokenize_unpadded(
            items if split_into_words else texts,
            is_split_into_words=split_into_words,
            return_offsets_mapping=needs_words and not split_into_words,
        )
        was_training = self.training
        self.eval()
        try:
            tokens = PackedTokens.from_lists(encoding["input_ids"])

            def predict_batch(indices: np.ndarray, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
                with torch.inference_mode():  # thread-local: entered here, so concurrent workers have it too
                    outputs = self(
                        input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device), tasks=tasks
                    )
                    # One softmax/sigmoid and one device->host copy per task and batch, not per sentence.
                    scores = {name: self._scores(name, outputs.logits[name]) for name in tasks}
                for row, index in enumerate(indices):
                    results[index] = {}
                    for name in tasks:
                        if self.config.get_task(name)["type"] != "token_classification":
                            results[index][name] = self._describe(name, scores[name][row])
                            continue
                        length = tokens.lengths[index]
                        results[index][name] = self._describe_words(
                            name,
                            scores[name][row, :length],
                            encoding.word_ids(index),
                            None if split_into_words else encoding["offset_mapping"][index],
                            items[index],
                        )

            self._for_each_batch(predict_batch, self._padded_batches(tokens, batch_size, show_progress_bar))
        finally:
            self.train(was_training)
        return results[0] if single else results

    def _scores(self, name: str, logits: torch.Tensor) -> np.ndarray:
        """Probabilities (classification, multi-label, token tasks) or values (regression) as a numpy array."""
        task_type = self.config.get_task(name)["type"]
        logits = logits.float()
        if task_type == "multi_label_classification":
            return logits.sigmoid().cpu().numpy()
        if task_type == "regression":
            return logits.cpu().numpy()
        return logits.softmax(-1).cpu().numpy()

    def _describe(self, name: str, scores: np.ndarray) -> dict[str, Any]:
        """One sentence's prediction for a sequence-level task, from its row of `_scores`."""
        task = self.config.get_task(name)
        labels = task["labels"]
        values = scores.tolist()
        if task["type"] == "classification":
            best = int(scores.argmax())
            return {"label": labels[best], "score": values[best], "scores": dict(zip(labels, values))}
        if task["type"] == "multi_label_classification":
            chosen = [label for label, p in zip(labels, values) if p >= task["threshold"]]
            return {"labels": chosen, "scores": dict(zip(labels, values))}
        return {"value": values[0]} if len(values) == 1 else {"values": dict(zip(labels, values))}

    def _describe_words(
        self,
        name: str,
        probabilities: np.ndarray,
        word_ids: list[int | None],
        offsets: list[tuple[int, int]] | None,
        item: str | Sequence[str],
    ) -> dict[str, Any]:
        """Tags per word (read from each word's first sub-token, as in training) and grouped entity spans.

        Args:
            probabilities: `(tokens, num_labels)` for this sentence's real tokens.
            word_ids: the tokenizer's word index of every token (`None` for special tokens).
            offsets: character offsets of every token, or `None` when the input was a list of words.
            item: the input string, or its list of words.
        """
        labels = self.config.get_task(name)["labels"]
        if offsets is None:  # pre-split words: offsets into the words joined by single spaces
            spans, cursor = [], 0
            for word in item:
                spans.append((cursor, cursor + len(word)))
                cursor += len(word) + 1
            text = " ".join(item)
        else:
            text = item
        best_tags = probabilities.argmax(-1)
        words, seen = [], set()
        for position, word_id in enumerate(word_ids):
            if word_id is None or word_id in seen:
                continue
            seen.add(word_id)
            if offsets is None:
                start, end = spans[word_id]
            else:
                start, end = offsets[position]
                # A word split into several sub-tokens ends where its last sub-token ends.
                for later in range(position + 1, len(word_ids)):
                    if word_ids[later] != word_id:
                        break
                    end = offsets[later][1]
            best = int(best_tags[position])
            words.append(
                {
                    "word": text[start:end],
                    "start": start,
                    "end": end,
                    "tag": labels[best],
                    "score": float(probabilities[position, best]),
                }
            )
        return {"words": words, "entities": group_entities(words, text)}


class PackedTokens:
    """Token ids of many texts in one flat int32 array (`ids`), with each text's `lengths` and `starts`."""

    def __init__(self, ids: np.ndarray, lengths: np.ndarray):
        self.ids = ids
        self.lengths = lengths
        self.starts = np.cumsum(lengths) - lengths

    @classmethod
    def from_lists(cls, rows: list[list[int]]) -> PackedTokens:
        lengths = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
        ids = np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int32, count=int(lengths.sum()))
        return cls(ids, lengths)

    @classmethod
    def concatenate(cls, parts: list[PackedTokens]) -> PackedTokens:
        if not parts:
            return cls(np.zeros(0, dtype=np.int32), np.zeros(0, dtype=np.int64))
        return cls(np.concatenate([part.ids for part in parts]), np.concatenate([part.lengths for part in parts]))

    def row(self, index: int) -> np.ndarray:
        return self.ids[self.starts[index] : self.starts[index] + self.lengths[index]]


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
    many tiny batches, each of which pays for reading every weight from memory. On real sentences 10% was as fast
    as exact-length batches (0%) and 29% faster than sorting alone at batch size 128 (docs/BENCHMARKS.md).

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


def group_entities(words: list[dict[str, Any]], text: str) -> list[dict[str, Any]]:
    """Group per-word BIO/IOB2 tags (`B-PER`, `I-PER`, `O`; plain `PER` counts as inside) into entity spans."""
    entities: list[dict[str, Any]] = []
    current = None
    for word in words:
        tag = word["tag"]
        if tag == "O" or not tag:
            current = None
            continue
        prefix, _, entity_type = tag.partition("-") if tag[:2] in ("B-", "I-", "E-", "S-") else ("I", "", tag)
        if current is not None and prefix in ("I", "E") and current["entity"] == entity_type:
            current["end"] = word["end"]
            current["scores"].append(word["score"])
        else:
            current = {"entity": entity_type, "start": word["start"], "end": word["end"], "scores": [word["score"]]}
            entities.append(current)
        if prefix in ("E", "S"):
            current = None
    return [
        {
            "entity": e["entity"],
            "text": text[e["start"] : e["end"]],
            "start": e["start"],
            "end": e["end"],
            "score": float(np.mean(e["scores"])),
        }
        for e in entities
    ]


def read_sentence_transformers_settings(name_or_path: str | os.PathLike, **hub_kwargs) -> dict[str, Any]:
    """Pooling, normalisation and max length of a sentence-transformers checkpoint, or `{}` for a plain model."""

    def read_json(filename: str) -> Any | None:
        local = os.path.join(str(name_or_path), filename)
        if os.path.isdir(str(name_or_path)):
            if not os.path.isfile(local):
                return None
            with open(local, encoding="utf-8") as handle:
                return json.load(handle)
        try:
            from huggingface_hub import hf_hub_download

            path = hf_hub_download(str(name_or_path), filename, **hub_kwargs)
        except Exception:  # no such file in the repo, or offline: a plain transformers model
            return None
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)

    modules = read_json("modules.json")
    if not modules:
        return {}
    settings: dict[str, Any] = {"normalize": False}
    for module in modules:
        module_type = module.get("type", "")
        if module_type.endswith("Normalize"):
            settings["normalize"] = True
        elif module_type.endswith("Pooling"):
            pooling_config = read_json(f"{module['path']}/config.json") or {}
            settings["pooling"] = _sentence_transformers_pooling(pooling_config)
    bert_config = read_json("sentence_bert_config.json") or {}
    if bert_config.get("max_seq_length"):
        settings["max_seq_length"] = int(bert_config["max_seq_length"])
    return settings


_ST_POOLING_FLAGS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len",
    "pooling_mode_weightedmean_tokens": "weighted_mean",
    "pooling_mode_lasttoken": "last_token",
}


def _sentence_transformers_pooling(pooling_config: dict[str, Any]) -> str:
    if isinstance(pooling_config.get("pooling_mode"), str):
        mode = pooling_config["pooling_mode"]
        aliases = {
            "mean_tokens": "mean",
            "cls_token": "cls",
            "max_tokens": "max",
            "lasttoken": "last_token",
            "weightedmean": "weighted_mean",
            "mean_sqrt_len_tokens": "mean_sqrt_len",
        }
        return aliases.get(mode, mode)
    chosen = [mode for flag, mode in _ST_POOLING_FLAGS.items() if pooling_config.get(flag)]
    if len(chosen) > 1:
        logger.warning(f"the checkpoint concatenates poolings {chosen}; using '{chosen[0]}' only")
    return chosen[0] if chosen else "mean"


def _drop_backbone_pooler(backbone: nn.Module) -> None:
    # BERT/RoBERTa build a tanh "pooler" for next-sentence prediction. We pool ourselves, so it would be dead
    # weight and, worse, a parameter without gradient that makes DistributedDataParallel fail.
    if getattr(backbone, "pooler", None) is not None:
        backbone.pooler = None


def _default_max_length(backbone_config: PretrainedConfig, tokenizer: Any) -> int:
    candidates = [512]
    model_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(model_max, int) and 1 < model_max < 100_000:
        candidates.append(model_max)
    positions = getattr(backbone_config, "max_position_embeddings", None)
    if isinstance(positions, int) and positions > 1:
        candidates.append(positions)
    return min(candidates)


def _check_texts(items: Sequence[Any]) -> list[str]:
    if isinstance(items, (str, bytes)) or not isinstance(items, Iterable):
        raise TypeError(f"expected a string or a list of strings, got {type(items).__name__}")
    texts = list(items)
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"sentences[{index}] must be a str, got {type(text).__name__}: {text!r:.80}")
    return texts


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


# Register with the Auto classes: `AutoModel.from_pretrained(dir)` then works without `trust_remote_code` once
# this module is imported, and `save_pretrained` writes `auto_map` and copies this file and the config's.
MultiTaskConfig.register_for_auto_class()
MultiTaskModel.register_for_auto_class("AutoModel")
if not __name__.startswith("transformers_modules"):
    AutoConfig.register(MultiTaskConfig.model_type, MultiTaskConfig, exist_ok=True)
    AutoModel.register(MultiTaskConfig, MultiTaskModel, exist_ok=True)


__all__ = [
    "MultiTaskModel",
    "MultiTaskPreTrainedModel",
    "MultiTaskModelOutput",
    "MultiTaskConfig",
    "Pooling",
    "TaskHead",
    "group_entities",
    "plan_batches",
    "run_concurrently",
    "read_sentence_transformers_settings",
]
