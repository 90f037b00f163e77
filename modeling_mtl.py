"""A multi-task sentence transformer: one shared encoder, mask-aware pooling, and one head per task.

This file is copied next to the weights by `save_pretrained` (with the files it imports: `configuration_mtl.py`,
`tasks_mtl.py`, `layers_mtl.py`, `inference_mtl.py`, `validation_mtl.py`, `io_mtl.py`), so that
`AutoModel.from_pretrained(path, trust_remote_code=True)` works on a machine without this project. It holds the model
proper, read top to bottom: the output type, the model and its forward pass, the views that serve standard
pipelines. The building blocks (pooling, heads, losses) are in `layers_mtl.py`, what each task type does in
`tasks_mtl.py`, the inference engine (`encode`, `predict`, `similarity`) in `inference_mtl.py`, and the file formats
in `io_mtl.py`; training code lives in the `multitask_st` package, never here.
"""

from __future__ import annotations

import copy
import functools
import inspect
import os
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from transformers import AutoConfig, AutoModel, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.activations import ACT2FN
from transformers.modeling_outputs import SequenceClassifierOutput, TokenClassifierOutput
from transformers.utils import ModelOutput, logging

try:  # inside a Hub/remote-code package
    from .configuration_mtl import EMBEDDING_TASK_TYPES, MultiTaskConfig, normalize_tasks
    from .inference_mtl import MultiTaskInferenceMixin, plan_batches, run_concurrently
    from .io_mtl import (
        MODEL_COMMIT_FILE,
        check_loaded_weights,
        check_model_folder,
        check_model_source,
        check_not_a_model_folder,
        commit_model_folder,
        read_sentence_transformers_settings,
        remove_stale_staging,
        save_tokenizer,
        staging_folder,
        unsupported_by_sentence_transformers,
        write_sentence_transformers_files,
    )
    from .layers_mtl import IGNORE_INDEX, Pooling, TaskHead, labelled_mask, scale_gradient, text_fingerprints
    from .tasks_mtl import as_label_tensor, group_entities
    from .validation_mtl import (
        InputError,
        InputTypeError,
        check_flag,
        check_number,
        check_tasks,
        position_limit,
        requested_tasks,
        resolve_max_seq_length,
    )
except ImportError:  # installed as top-level modules, or run from the project folder
    from configuration_mtl import EMBEDDING_TASK_TYPES, MultiTaskConfig, normalize_tasks
    from inference_mtl import MultiTaskInferenceMixin, plan_batches, run_concurrently
    from io_mtl import (
        MODEL_COMMIT_FILE,
        check_loaded_weights,
        check_model_folder,
        check_model_source,
        check_not_a_model_folder,
        commit_model_folder,
        read_sentence_transformers_settings,
        remove_stale_staging,
        save_tokenizer,
        staging_folder,
        unsupported_by_sentence_transformers,
        write_sentence_transformers_files,
    )
    from layers_mtl import IGNORE_INDEX, Pooling, TaskHead, labelled_mask, scale_gradient, text_fingerprints
    from tasks_mtl import as_label_tensor, group_entities
    from validation_mtl import (
        InputError,
        InputTypeError,
        check_flag,
        check_number,
        check_tasks,
        position_limit,
        requested_tasks,
        resolve_max_seq_length,
    )

logger = logging.get_logger(__name__)


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
    three) texts, which go through the encoder together in that same pass. A head with its own copies of the top
    layers runs them on the hidden states that enter the shared ones (`output_hidden_states`).

    Args:
        config ([`MultiTaskConfig`]): the single source of truth for the architecture.
        backbone (`PreTrainedModel`, *optional*): the encoder to use (e.g. a pretrained one, as `from_backbone`
            passes); by default one is built from `config.backbone_config` with fresh weights.
    """

    def __init__(self, config: MultiTaskConfig, backbone: PreTrainedModel | None = None):
        super().__init__(config)
        self.backbone = backbone if backbone is not None else AutoModel.from_config(config.backbone_config)
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
        for task in config.task_objects():
            head = task.build_head(config, self.backbone)
            if head is not None:  # types without a head score the embeddings themselves
                self.heads[task.name] = head
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
            name_or_path: a Hub id or local folder of any encoder `AutoModel` can load (a path that is not there is
                a `MissingFileError`, not a Hub lookup).
            tasks: task descriptions (see `configuration_mtl.normalize_task`).
            pooling / normalize / max_seq_length / projection_dim: override the defaults (`projection_dim`: 1 to
                `configuration_mtl.MAX_PROJECTION_DIM`).
            tokenizer: a tokenizer object to use instead of the checkpoint's own (not a name: load it with
                `AutoTokenizer.from_pretrained` first).
            kwargs: `MultiTaskConfig` options (`head_dropout`, `projection_activation`), or the backbone's
                loading options (`revision`, `token`, `cache_dir`, `local_files_only`, `attn_implementation`,
                `dtype`: `"auto"`, one of `DTYPE_NAMES` or a floating `torch.dtype`). Anything else is an error.
        """
        load_keys = ("revision", "token", "cache_dir", "local_files_only", "attn_implementation", "dtype")
        config_keys = ("head_dropout", "projection_activation")
        unknown = sorted(set(kwargs) - set(load_keys) - set(config_keys))
        if unknown:
            raise InputTypeError(
                f"from_backbone got unexpected keyword argument(s) {unknown}; "
                f"allowed: {sorted((*load_keys, *config_keys))}"
            )
        name_or_path = check_model_source(name_or_path, "name_or_path")
        load_kwargs = {key: kwargs.pop(key) for key in load_keys if key in kwargs}
        if "dtype" in load_kwargs:
            check_dtype(load_kwargs["dtype"])
        hub_kwargs = {
            key: load_kwargs[key]
            for key in ("revision", "token", "cache_dir", "local_files_only")
            if key in load_kwargs
        }
        tokenizer = check_tokenizer(tokenizer)
        st_defaults = read_sentence_transformers_settings(name_or_path, **hub_kwargs)
        if st_defaults.get("add_pooling_layer") is False:  # load it as saved, as sentence-transformers does
            load_kwargs["add_pooling_layer"] = False
        backbone_config = AutoConfig.from_pretrained(name_or_path, **hub_kwargs)
        if backbone_config.model_type == MultiTaskConfig.model_type:
            raise InputError(
                f"{name_or_path} is a multi-task model already: load it with MultiTaskModel.from_pretrained, and add "
                "tasks with model.add_tasks([...]); from_backbone starts from a plain encoder"
            )
        backbone = AutoModel.from_pretrained(name_or_path, **load_kwargs)
        _drop_backbone_pooler(backbone)
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(name_or_path, **hub_kwargs)
        dense = st_defaults.get("dense")
        if dense is not None:  # the checkpoint's Dense layer becomes the projection, weights and all
            if projection_dim is not None and projection_dim != dense["out_features"]:
                raise InputError(
                    f"{name_or_path} has a Dense layer to {dense['out_features']} dimensions: projection_dim="
                    f"{projection_dim} would replace it; start from the underlying encoder to use another projection"
                )
            if not dense["bias"]:
                raise InputError(f"{name_or_path}: a Dense layer without bias is not supported")
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
        # The pretrained encoder goes in as it is; heads with their own top layers copy its pretrained ones.
        model = cls(config, backbone=backbone)
        if dense is not None:
            from safetensors.torch import load_file

            weights = load_file(dense["weights"])
            model.projection.load_state_dict({"weight": weights["linear.weight"], "bias": weights["linear.bias"]})
        model.to(dtype=backbone.dtype)  # heads follow the backbone's dtype (e.g. dtype=torch.bfloat16)
        model.tokenizer = tokenizer
        model.config.name_or_path = str(name_or_path)
        return model

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path,
        *model_args,
        tokenizer: Any | None = None,
        allow_missing_weights: bool = False,
        **kwargs,
    ):
        """`PreTrainedModel.from_pretrained`, plus the tokenizer saved beside the weights, and a model that is whole.

        A local folder is checked first, so that a wrong or damaged folder is one clear error naming the file
        (`io_mtl.check_model_folder`) instead of a model with guessed weights or an empty tokenizer; after loading,
        a tensor the config has and the weights lack (a head, a layer), one of another shape, or a weight that is
        NaN or infinite is an error naming it (`io_mtl.check_loaded_weights`), where transformers would warn and
        initialise it afresh. `allow_missing_weights=True` starts missing tensors fresh on purpose. `tokenizer`
        supplies a tokenizer object for a folder saved without one. A path that is not there is a `MissingFileError`,
        not a Hub lookup.
        """
        allow_missing_weights = check_flag("allow_missing_weights", allow_missing_weights, allow_none=False)
        if kwargs.get("dtype") is not None:
            check_dtype(kwargs["dtype"])
        hub_kwargs = {
            key: kwargs[key] for key in ("revision", "token", "cache_dir", "local_files_only") if key in kwargs
        }
        folder = check_model_source(pretrained_model_name_or_path, "pretrained_model_name_or_path", need_config=False)
        tokenizer = check_tokenizer(tokenizer)
        if os.path.isdir(folder):  # AutoModel passes the config it read: the weights and tokenizer still count
            check_model_folder(folder, need_tokenizer=tokenizer is None, need_config="config" not in kwargs)
        wants_info = kwargs.pop("output_loading_info", False)
        allow_mismatched = kwargs.pop("ignore_mismatched_sizes", False)
        # Mismatched shapes are left to `check_loaded_weights`, whose error names the tensors (transformers' own
        # refers to a report printed above it).
        model, info = super().from_pretrained(
            pretrained_model_name_or_path, *model_args, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs
        )
        check_loaded_weights(model, info, folder, allow_missing_weights, allow_mismatched)
        if tokenizer is None:
            # Passing the config keeps AutoTokenizer from re-reading config.json (and asking about remote code).
            tokenizer = AutoTokenizer.from_pretrained(
                pretrained_model_name_or_path, config=model.config.backbone_config, **hub_kwargs
            )
        model.tokenizer = tokenizer
        return (model, info) if wants_info else model

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs) -> None:
        """`PreTrainedModel.save_pretrained`, plus the tokenizer (so the folder is complete on its own) and the
        sentence-transformers module files, so that `SentenceTransformer(folder, trust_remote_code=True)` embeds
        exactly as `encode` does. Saved over a model, the new one is written beside it and moved in with its
        `config.json` last (`io_mtl.commit_model_folder`): a kill midway never leaves new labels over old weights."""
        self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}), **_AUTO_MAP}
        target = str(save_directory)
        replacing = os.path.isfile(os.path.join(target, MODEL_COMMIT_FILE)) and not kwargs.get("push_to_hub")
        folder = str(staging_folder(target)) if replacing else target
        remove_stale_staging(target)  # what interrupted saves left behind; another process's save in progress stays
        super().save_pretrained(folder, *args, **kwargs)
        if self.tokenizer is not None:
            save_tokenizer(self.tokenizer, folder, self.config.max_seq_length)
            write_sentence_transformers_files(self, folder)
        if replacing:
            commit_model_folder(folder, target)

    def export_sentence_transformers(self, folder: str | os.PathLike) -> None:
        """Save the embedding part alone as a plain sentence-transformers folder (the encoder as its own
        `AutoModel`, the tokenizer, Pooling, the projection as a Dense module, Normalize): it loads with
        `SentenceTransformer(folder)` and no remote code, for vector databases, MTEB or TEI. The heads are left out.
        A folder that holds a model already (this one saved, say) is refused: the export would replace it."""
        if self.tokenizer is None:
            raise InputError("export_sentence_transformers needs the model's tokenizer")
        problem = unsupported_by_sentence_transformers(self.config)
        if problem:
            raise InputError(problem)
        check_not_a_model_folder(folder, "exporting the embedding")
        os.makedirs(folder, exist_ok=True)
        self.backbone.save_pretrained(folder)
        save_tokenizer(self.tokenizer, folder, self.config.max_seq_length)
        # The encoder is saved without the pooler it never uses: sentence-transformers loads it without one, rather
        # than with a freshly initialised one and a "newly initialized weights" warning.
        without_pooler = "add_pooling_layer" in inspect.signature(type(self.backbone).__init__).parameters
        write_sentence_transformers_files(self, folder, {"add_pooling_layer": False} if without_pooler else None)

    def add_tasks(self, tasks: list[dict[str, Any]]) -> MultiTaskModel:
        """A new model with every weight of this one (encoder, pooling, projection, heads) plus freshly initialised
        heads for `tasks` (task dicts as in `MultiTaskConfig(tasks=...)`), e.g. to add a task to a trained model
        and train it with `MultiTaskTrainer` (docs/TRAINING_CHOICES.md: freeze the old heads and keep their tasks
        in the mix, or freeze the encoder too). The old tasks and their labels are unchanged; this model is left
        untouched. Call `transformers.set_seed` first for a reproducible new head.
        """
        names = [task["name"] for task in normalize_tasks(tasks, self.config.head_dropout)]
        clash = sorted(set(names) & set(self.config.task_names))
        if clash:
            raise InputError(f"task(s) {clash} already exist in the model ({self.config.task_names})")
        config_dict = self.config.to_dict()
        config_dict["tasks"] = [*self.config.tasks, *tasks]
        # Built on a copy of this encoder: a new head with its own top layers starts from this model's top layers,
        # as it would from a pretrained backbone's.
        extended = type(self)(type(self.config).from_dict(config_dict), backbone=copy.deepcopy(self.backbone))
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
        return check_tasks(tasks, self.config)

    @property
    def takes_token_type_ids(self) -> bool:
        """Whether the encoder reads token type ids: segment embeddings of two or more types, as BERT has. Those
        given to one that has none (DistilBERT, ModernBERT), or only the one type (RoBERTa), are left out."""
        types = getattr(self.backbone.config, "type_vocab_size", 2)
        return _takes_token_type_ids(type(self.backbone)) and (types is None or types >= 2)

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
        self._check_inputs(input_ids, attention_mask, token_type_ids, inputs_embeds)
        if labels is not None and not isinstance(labels, dict):
            raise InputTypeError(f"`labels` must be a dict of task name -> tensor, got {type(labels).__name__}")
        head_gradient_scale = check_number("head_gradient_scale", head_gradient_scale, 0.0, 1.0)
        if tasks is None:
            tasks = self.task_names
        else:
            tasks = requested_tasks(tasks)
            tasks = self._check_tasks(tasks) if tasks else []
        if labels:
            excluded = [name for name in self._check_tasks(list(labels)) if name not in tasks]
            if excluded:
                raise InputError(f"labels were given for task(s) {excluded} that `tasks={list(tasks)}` excludes")

        texts = _TextGroups(input_ids, attention_mask, inputs_embeds, token_type_ids, position_ids)
        depth = max((self.heads[name].branch_depth for name in tasks if name in self.heads), default=0)
        batch = self._encode(texts, output_hidden_states, depth)
        logits = self._task_logits(batch, tasks, head_gradient_scale)
        loss, task_losses = None, None
        if labels:
            task_losses = {
                name: self.task_loss(name, logits.get(name), task_labels, num_items_in_batch, batch)
                for name, task_labels in labels.items()
                if task_labels is not None
            }
            if task_losses:
                loss = sum(self.config.get_task(name)["loss_weight"] * value for name, value in task_losses.items())
                # Heads with their own top layers skip the shared ones: an exact zero keeps the whole shared
                # encoder in the graph, so distributed training sees every parameter take part in every step.
                loss = loss + batch.features.sum() * 0.0

        features = batch.features
        embeddings = F.normalize(features, p=2, dim=-1) if self.config.normalize else features
        output = MultiTaskModelOutput(
            loss=loss,
            embeddings=embeddings if texts.grouped else embeddings[:, 0],
            logits=logits,
            task_losses=task_losses,
            last_hidden_state=batch.first_token_states,
            hidden_states=batch.hidden_states if output_hidden_states else None,
        )
        return output if return_dict else output.to_tuple()

    def _check_inputs(self, input_ids, attention_mask, token_type_ids, inputs_embeds) -> None:
        """What `forward` and `embed` are given, checked before the encoder sees it, so that a wrong input is one
        error naming it rather than an index or shape error deep inside the backbone: tensors of the right type,
        `(batch, seq)` or `(batch, texts, seq)`, no longer than the backbone's positions, masks of the same shape,
        and token ids within the vocabulary (one min/max over the ids)."""
        if input_ids is None and inputs_embeds is None:
            raise InputError("forward needs `input_ids` or `inputs_embeds`")
        name, tensor = ("input_ids", input_ids) if input_ids is not None else ("inputs_embeds", inputs_embeds)
        if not isinstance(tensor, torch.Tensor):
            raise InputTypeError(
                f"{name} must be a torch tensor (as model.tokenize(texts) gives), got {type(tensor).__name__}"
            )
        if input_ids is not None and (
            input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool
        ):
            raise InputTypeError(f"input_ids must hold integer token ids, got {input_ids.dtype}")
        if input_ids is None and not inputs_embeds.is_floating_point():
            raise InputTypeError(f"inputs_embeds must be floating point, got {inputs_embeds.dtype}")
        shape = tuple(tensor.shape if input_ids is not None else tensor.shape[:-1])
        if len(shape) not in (2, 3):
            what = "(batch, seq) or (batch, texts, seq)" + (", hidden" if input_ids is None else "")
            raise InputError(f"{name} must have shape {what}, got {tuple(tensor.shape)}")
        limit = position_limit(self.config.backbone_config)
        if limit is not None and shape[-1] > limit:
            raise InputError(
                f"{name} holds {shape[-1]} tokens per text; the backbone encodes at most {limit} positions: truncate "
                f"the texts (max_seq_length={self.config.max_seq_length})"
            )
        for other_name, other in (("attention_mask", attention_mask), ("token_type_ids", token_type_ids)):
            if other is None:
                continue
            if not isinstance(other, torch.Tensor):
                raise InputTypeError(f"{other_name} must be a torch tensor, got {type(other).__name__}")
            if tuple(other.shape) != shape:
                raise InputError(f"{other_name} has shape {tuple(other.shape)}, {name} {shape}: they must match")
        if input_ids is not None and input_ids.numel():
            low, high = (int(value) for value in torch.aminmax(input_ids))
            size = self.get_input_embeddings().num_embeddings
            if low < 0 or high >= size:
                raise InputError(
                    f"input_ids holds the token id {low if low < 0 else high}: the encoder's vocabulary has ids 0 to "
                    f"{size - 1} (were the texts tokenised by another model's tokenizer?)"
                )

    def _encode(self, texts: _TextGroups, output_hidden_states: bool | None = None, depth: int = 0) -> EncodedBatch:
        """One backbone pass over the present texts. `depth`: the most top layers a head of this pass runs copies
        of; the hidden states entering them are kept for it."""
        inputs = texts.backbone_inputs()
        if "token_type_ids" in inputs and not self.takes_token_type_ids:
            del inputs["token_type_ids"]  # an encoder without segment embeddings (DistilBERT, ModernBERT)
        encoder_outputs = self.backbone(
            **inputs, output_hidden_states=bool(output_hidden_states or depth), return_dict=True
        )
        token_states = encoder_outputs.last_hidden_state  # (present texts, seq, hidden), first texts first
        features = texts.scatter(self.pool(token_states, texts.present_mask))  # (batch, texts, dim)
        return EncodedBatch(self, texts, token_states, encoder_outputs.hidden_states, features)

    def _task_logits(
        self, batch: EncodedBatch, tasks: Sequence[str], gradient_scale: float = 1.0
    ) -> dict[str, torch.Tensor]:
        """Each task's output for one encoder pass; pair tasks are absent from a batch of single texts."""
        logits = {}
        for name in tasks:
            task = self.config.task(name)
            scale = gradient_scale if not task.trains_embedding else 1.0
            value = task.logits(self.heads[name] if name in self.heads else None, batch, scale)
            if value is not None:
                logits[name] = value
        return logits

    def embed(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        normalize: bool | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Sentence embeddings of tokenised texts, without running any head.

        Args:
            input_ids / attention_mask / token_type_ids: `(batch, seq)` or `(batch, texts, seq)`, as for `forward`.
            normalize: L2-normalise (default `config.normalize`).

        Returns: `(batch, embedding_dim)` or `(batch, texts, embedding_dim)`.
        """
        self._check_inputs(input_ids, attention_mask, token_type_ids, None)
        texts = _TextGroups(input_ids, attention_mask, None, token_type_ids, None)
        features = self._encode(texts).features
        if self.config.normalize if normalize is None else normalize:
            features = F.normalize(features, p=2, dim=-1)
        return features if texts.grouped else features[:, 0]

    def pool(self, token_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Pooled (and projected, if configured) sentence features, before normalisation."""
        features = self.pooling(token_states, attention_mask)  # (batch, hidden)
        if self.projection is not None:
            features = self.projection_activation(self.projection(features))  # (batch, projection_dim)
        return features

    def pair_head_logits(self, name: str, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """A pair-classification head on two batches of sentence features."""
        return self.config.task(name).pair_logits(self.heads[name], u, v)

    def task_loss(
        self,
        name: str,
        logits: torch.Tensor | None,
        labels: torch.Tensor,
        num_items_in_batch: dict[str, int | torch.Tensor] | None = None,
        batch: EncodedBatch | None = None,
    ) -> torch.Tensor:
        """Mean loss of one task over its labelled items; missing labels (`labelled_mask`) count for nothing.

        A batch with no labelled item for the task gives a zero that still depends on the task's parameters, so
        distributed training never sees a parameter without a gradient.
        """
        task = self.config.task(name)
        labels = as_label_tensor(name, labels)
        if logits is None:  # a pair task in a batch of single texts: nothing to learn, only touch the head
            if labelled_mask(labels).any():
                raise InputError(
                    f"task '{name}': labels were given for a batch of single texts; a {task.type} task scores rows "
                    "of several texts (input_ids of shape (batch, texts, seq))"
                )
            return task.empty_batch_loss(self, batch)
        total, count = task.loss(logits, labels.to(logits.device), batch)
        if num_items_in_batch is not None and name in num_items_in_batch:
            count = num_items_in_batch[name]
        features = batch.features if batch is not None else None
        if isinstance(count, torch.Tensor):
            count = count.to(total.device)
            return torch.where(count > 0, total / count.clamp(min=1), self.zero_loss(name, features, logits))
        return total / count if count > 0 else self.zero_loss(name, features, logits)

    def zero_loss(self, name: str, features: torch.Tensor | None, logits: torch.Tensor | None = None) -> torch.Tensor:
        """An exact zero that depends on the task's parameters (its head), or on the features for headless tasks."""
        if name in self.heads:
            return sum(parameter.sum() for parameter in self.heads[name].parameters()) * 0.0
        return (logits if logits is not None else features).sum() * 0.0

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
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        tasks: list[str],
        token_type_ids: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        with torch.inference_mode():
            extra = {"token_type_ids": token_type_ids.to(self.device)} if token_type_ids is not None else {}
            return self(
                input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device), tasks=tasks, **extra
            ).logits

    def _pair_logits(self, name: str, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.pair_head_logits(name, u.to(self.device, self.dtype), v.to(self.device, self.dtype))


class EncodedBatch:
    """One encoder pass over a batch, as the task types read it (`tasks_mtl.Task.logits` / `.loss`).

    Attributes:
        texts: the batch's texts (`_TextGroups`: how rows of several texts were flattened).
        token_states: `(present texts, seq, hidden)`, the backbone's last hidden states, first texts first.
        hidden_states: the backbone's hidden states per layer (kept when a head runs its own top layers).
        features: `(batch, texts, dim)` pooled (projected) features, before normalisation; zeros for absent texts.
    """

    def __init__(self, model: MultiTaskModel, texts: _TextGroups, token_states, hidden_states, features):
        self.model = model
        self.texts = texts
        self.token_states = token_states
        self.hidden_states = hidden_states
        self.features = features

    @property
    def num_texts(self) -> int:
        return self.features.shape[1]

    @property
    def batch_size(self) -> int:
        return self.texts.batch_size

    @property
    def first_token_states(self) -> torch.Tensor:
        """`(batch, seq, hidden)`: the token states of each row's first text."""
        return self.token_states[: self.texts.batch_size]

    @property
    def first_mask(self) -> torch.Tensor:
        return self.texts.present_mask[: self.texts.batch_size]

    def head_token_states(self, head: TaskHead, gradient_scale: float = 1.0) -> torch.Tensor:
        """The token states a head reads, of each row's first text: its own top layers' output, run on the hidden
        states that enter the shared top layers, or else the shared last states. `gradient_scale` scales what flows
        back into the shared encoder."""
        if head.branch is None:
            return scale_gradient(self.first_token_states, gradient_scale)
        rows = self.texts.batch_size
        entering = self.hidden_states[-head.branch_depth - 1][:rows]  # (batch, seq, hidden)
        return head.branch(entering, self.first_mask, self.model.backbone, gradient_scale)


class _SingleTaskView(MultiTaskPreTrainedModel):
    """One task of a saved multi-task model behind a standard transformers head class, so that `pipeline(...)` and
    the Hub widget can use it. The task is `config.pipeline_task` (pass `model_kwargs={"pipeline_task": name}` to
    `pipeline`) or, by default, the model's first task that the pipeline can serve (`Task.pipeline`)."""

    pipeline: str = ""

    def __init__(self, config: MultiTaskConfig):
        super().__init__(config)
        self.mtl = MultiTaskModel(config)
        candidates = [task.name for task in config.task_objects() if task.pipeline == self.pipeline]
        chosen = getattr(config, "pipeline_task", None) or (candidates[0] if candidates else None)
        if chosen not in candidates:
            raise InputError(
                f"{type(self).__name__} serves a task for pipeline '{self.pipeline}': pipeline_task={chosen!r} is not "
                f"one (candidates: {candidates})"
            )
        self.task_name = chosen
        task = config.task(chosen)
        config.id2label = dict(enumerate(task.labels))
        config.label2id = {label: index for index, label in enumerate(task.labels)}
        config.problem_type = task.problem_type
        self.post_init()

    def forward(
        self, input_ids=None, attention_mask=None, token_type_ids=None, labels=None, return_dict=None, **kwargs
    ):
        task = self.config.task(self.task_name)
        extra = {"token_type_ids": token_type_ids} if token_type_ids is not None and task.uses_token_types else {}
        outputs = self.mtl(input_ids=input_ids, attention_mask=attention_mask, tasks=[self.task_name], **extra)
        loss = None
        if labels is not None:
            loss = self.mtl.task_loss(self.task_name, outputs.logits[self.task_name], labels)
        return self.output_class(loss=loss, logits=outputs.logits[self.task_name], hidden_states=outputs.hidden_states)


class MultiTaskModelForSequenceClassification(_SingleTaskView):
    """A sentence-level task (classification, multi-label, regression) for `pipeline("text-classification")`."""

    pipeline = "text-classification"
    output_class = SequenceClassifierOutput


class MultiTaskModelForTokenClassification(_SingleTaskView):
    """A token task for `pipeline("token-classification")` (its `aggregation_strategy` groups entities)."""

    pipeline = "token-classification"
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

    def present_mask_grouped(self) -> torch.Tensor:
        return self._present

    def fingerprints(self) -> torch.Tensor:
        """`(batch * texts,)` fingerprints in row-major order (row 0's texts, then row 1's, ...)."""
        ids = self._tensors["input_ids"]
        if ids is None:
            raise InputError("contrastive tasks need input_ids (to recognise duplicate texts), not inputs_embeds")
        mask = self._tensors["attention_mask"]
        return text_fingerprints(ids.reshape(-1, ids.shape[-1]), mask.reshape(-1, mask.shape[-1]))


# The `dtype` names `from_backbone` and `from_pretrained` take (with "auto": the checkpoint's own, and any floating
# `torch.dtype`); transformers would look any other string up as a torch attribute and fail on it.
DTYPE_NAMES = ("float32", "float16", "bfloat16", "float64")


def check_dtype(value: Any) -> None:
    if isinstance(value, torch.dtype) and value.is_floating_point:
        return
    if isinstance(value, str) and value in ("auto", *DTYPE_NAMES):
        return
    raise InputError(f"dtype must be 'auto', one of {list(DTYPE_NAMES)} or a floating torch.dtype, got {value!r}")


def check_tokenizer(tokenizer: Any) -> Any:
    """The `tokenizer=` of `from_backbone` / `from_pretrained`: `None` (the checkpoint's own) or a tokenizer object.
    Anything else, a name or path included, is an error now rather than a "not callable" at the first `encode`: a
    string here would be a second source to resolve beside `name_or_path`, and the checkpoint's own tokenizer is
    what the weights were trained with; load another with `AutoTokenizer.from_pretrained` and pass it."""
    if tokenizer is None or isinstance(tokenizer, PreTrainedTokenizerBase):
        return tokenizer
    hint = (
        f": load it first, tokenizer=AutoTokenizer.from_pretrained({tokenizer!r})" if isinstance(tokenizer, str) else ""
    )
    raise InputTypeError(f"tokenizer must be a tokenizer object (or None), got {type(tokenizer).__name__}{hint}")


@functools.lru_cache(maxsize=32)
def _takes_token_type_ids(backbone_class: type) -> bool:
    return "token_type_ids" in inspect.signature(backbone_class.forward).parameters


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
    "EncodedBatch",
    "MultiTaskConfig",
    "MultiTaskModel",
    "MultiTaskModelForSequenceClassification",
    "MultiTaskModelForTokenClassification",
    "MultiTaskModelOutput",
    "MultiTaskPreTrainedModel",
    "Pooling",
    "TaskHead",
    "DTYPE_NAMES",
    "check_dtype",
    "check_tokenizer",
    "check_model_folder",
    "group_entities",
    "labelled_mask",
    "plan_batches",
    "read_sentence_transformers_settings",
    "resolve_max_seq_length",
    "run_concurrently",
]
