"""Files of a saved multi-task model: the checks of a model folder before it loads, and the sentence-transformers
module files, read from a checkpoint (`from_backbone`) and written beside a saved model (`save_pretrained`).

This file travels with every checkpoint (relative imports from `modeling_mtl`), so it stays self-contained: standard
library, torch, safetensors, huggingface_hub and the other model files.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

try:  # inside a Hub/remote-code package
    from .configuration_mtl import MultiTaskConfig
    from .validation_mtl import FileError, InputError, InputTypeError, MissingFileError, UserError
except ImportError:  # installed as top-level modules, or run from the project folder
    from configuration_mtl import MultiTaskConfig
    from validation_mtl import FileError, InputError, InputTypeError, MissingFileError, UserError

# ---------------------------------------------------------------------------------------------- code files


def model_code_files(folder: str | os.PathLike | None = None) -> list[str]:
    """The code files a model carries: `modeling_mtl.py`, `configuration_mtl.py` and every file they import
    relatively, found as transformers finds them (`save_pretrained` copies them beside the weights). Of this
    package's code by default; of a saved `folder`'s own code when given (a model saved by an earlier version
    carries fewer files), a file it imports but lacks included, so that a check can name it."""
    from transformers.dynamic_module_utils import get_relative_imports

    base = Path(folder) if folder is not None else Path(__file__).resolve().parent
    names, queue = set(), ["modeling_mtl.py", "configuration_mtl.py"]
    while queue:
        name = queue.pop()
        if name in names:
            continue
        names.add(name)
        if (base / name).is_file():
            queue.extend(f"{module}.py" for module in get_relative_imports(base / name))
    return sorted(names)


# ---------------------------------------------------------------------------------------------- saving

# Written last: a folder holding a `config.json` holds a complete model (see `commit_model_folder`).
MODEL_COMMIT_FILE = "config.json"
# Files of an earlier save that a new one replaces even where it writes no file of the same name (a sharded model
# saved over by a single file: a stale index would load the old shards), with `SENTENCE_TRANSFORMERS_FILES` (a model
# sentence-transformers cannot express saved over one it could: a stale `modules.json` would embed wrongly there).
_REPLACED_PATTERNS = ("model*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin")


def commit_model_folder(staging: str | os.PathLike, output_dir: str | os.PathLike) -> None:
    """Move a fully written model from `staging` into `output_dir`, so that a kill at any moment leaves either the
    old model, or no model (no `config.json`: loading fails with a clear error), never a new config with old
    weights. The old `config.json` goes first, then the old weight files, every other file is moved in (each
    `os.replace` is atomic), and the new `config.json` comes last."""
    staging, output_dir = Path(staging), Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / MODEL_COMMIT_FILE).unlink(missing_ok=True)
    for pattern in (*_REPLACED_PATTERNS, *SENTENCE_TRANSFORMERS_FILES):
        for old in output_dir.glob(pattern):
            if not (staging / old.name).exists():
                old.unlink()
    for path in sorted(staging.iterdir()):
        if path.name != MODEL_COMMIT_FILE:
            target = output_dir / path.name
            if target.is_dir():
                shutil.rmtree(target)
            os.replace(path, target)
    os.replace(staging / MODEL_COMMIT_FILE, output_dir / MODEL_COMMIT_FILE)
    staging.rmdir()


# A save over a model writes into `.staging-<pid>` first (`staging_folder`). One that a killed save left behind is
# removed by the next save into the folder; one whose process still runs is another save in progress (two processes
# saving into one folder) and stays, unless older than this: its pid may be a new process's, or a process of another
# machine sharing the folder, which this machine cannot see.
STALE_STAGING_SECONDS = 6 * 3600
_STAGING_PREFIX = ".staging-"


def staging_folder(output_dir: str | os.PathLike) -> Path:
    """Where this process writes a model it will move into `output_dir` (`commit_model_folder`)."""
    return Path(output_dir) / f"{_STAGING_PREFIX}{os.getpid()}"


def remove_stale_staging(output_dir: str | os.PathLike) -> None:
    """Remove the staging folders in `output_dir` that no running save owns: this process's own (an earlier save of
    it, interrupted), those of processes that are gone, and any older than `STALE_STAGING_SECONDS`."""
    for path in Path(output_dir).glob(f"{_STAGING_PREFIX}*"):
        if not _staging_in_use(path):
            shutil.rmtree(path, ignore_errors=True)


def _staging_in_use(path: Path) -> bool:
    owner = path.name[len(_STAGING_PREFIX) :]
    if not owner.isdigit() or int(owner) == os.getpid():
        return False
    try:
        age = time.time() - path.stat().st_mtime
    except OSError:  # gone already: its save finished
        return True
    return age < STALE_STAGING_SECONDS and _process_alive(int(owner))


def _process_alive(pid: int) -> bool:
    if os.name == "nt":  # signal 0 is CTRL_C_EVENT on Windows, not a probe: the age alone decides there
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a process of another user
        return True
    except OSError:
        return False
    return True


# Keys `tokenizer_config.json` picks up from the call that loaded the tokenizer, not from the tokenizer: saved, they
# would replay that call's options on every later load.
_LOAD_OPTIONS = ("is_local", "local_files_only")


def save_tokenizer(tokenizer: Any, folder: str | os.PathLike, max_seq_length: int | None = None) -> None:
    """`tokenizer.save_pretrained(folder)`, with its `tokenizer_config.json` cleaned of load options and, given
    `max_seq_length`, its `model_max_length` set to the model's: a pipeline or a user of `AutoTokenizer` alone then
    truncates where the model does."""
    tokenizer.save_pretrained(str(folder))
    path = Path(folder) / "tokenizer_config.json"
    if not path.is_file():
        return
    config = json.loads(path.read_text(encoding="utf-8"))
    config = {key: value for key, value in config.items() if key not in _LOAD_OPTIONS}
    if max_seq_length is not None:
        config["model_max_length"] = int(max_seq_length)
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------- published files

# Written beside the encoder by `write_sentence_transformers_files`; the module folders it writes (`1_Pooling`,
# `2_Dense`, ...) are the ones its `modules.json` names.
SENTENCE_TRANSFORMERS_MODULES = "modules.json"
SENTENCE_TRANSFORMERS_FILES = (
    SENTENCE_TRANSFORMERS_MODULES,
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
)
# The files of a model folder that make up the published model (`published_files`): what `save_pretrained` writes
# and what a training run records beside it (`multitask_st.saving.save_run`, the card's figure). Everything else
# (checkpoints, optimizer and scheduler states, the pickled `training_args.bin`, TensorBoard runs) stays local.
PUBLISHED_PATTERNS = (
    MODEL_COMMIT_FILE,
    "model.safetensors",
    "model-*-of-*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "*.model",  # sentencepiece vocabularies (spiece.model, sentencepiece.bpe.model)
    "chat_template.jinja",
    *SENTENCE_TRANSFORMERS_FILES,
    "metrics.json",
    "training_config.json",
    "trainer_state.json",
    "training_curves.png",
)


def published_files(folder: str | os.PathLike) -> list[str]:
    """The files of the saved model in `folder` that a published copy holds, as `/`-separated paths relative to
    it: those of `PUBLISHED_PATTERNS`, its code files (`model_code_files`) and every file of the
    sentence-transformers module folders its `modules.json` names (without them `SentenceTransformer` would load
    the repo with default modules and embed differently, with no error). A module folder that is missing, or a
    path that leaves `folder`, is an error naming it."""
    folder = Path(folder)
    code = set(model_code_files(folder))
    names = [
        path.name
        for path in folder.iterdir()
        if path.is_file()
        and (path.name in code or any(fnmatch.fnmatch(path.name, pattern) for pattern in PUBLISHED_PATTERNS))
    ]
    modules_path = folder / SENTENCE_TRANSFORMERS_MODULES
    try:
        modules = json.loads(modules_path.read_text(encoding="utf-8")) if modules_path.is_file() else []
        module_paths = [module["path"] for module in modules if module["path"]]  # "": the encoder at the root
    except (ValueError, UnicodeDecodeError, TypeError, KeyError) as error:
        raise FileError(f"{modules_path} is damaged ({error}): re-save the model with save_pretrained") from None
    for module_path in module_paths:
        module = folder / module_path
        if Path(module_path).is_absolute() or ".." in Path(module_path).parts or not (module / "config.json").is_file():
            raise MissingFileError(
                f"{modules_path} names the module folder '{module_path}', which {folder} lacks (no config.json "
                "there): re-save the model with save_pretrained"
            )
        names += [path.relative_to(folder).as_posix() for path in module.rglob("*") if path.is_file()]
    return sorted(names)


# ---------------------------------------------------------------------------------------------- folder checks

# A saved tokenizer's vocabulary: one of these must be there (a `tokenizer_config.json` alone rebuilds a tokenizer
# of a handful of special tokens, which fails only at encode time).
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model")


def holds_model(folder: str | os.PathLike) -> bool:
    """Whether `folder` holds a saved model (weights, or an ONNX export): a place no other output may be written."""
    folder = Path(folder)
    if not folder.is_dir():
        return False
    names = [path.name for path in folder.iterdir()]
    weights = any(name.endswith((".safetensors", ".bin", ".onnx")) for name in names)
    return weights or "onnx_config.json" in names


def check_not_a_model_folder(folder: str | os.PathLike, action: str) -> None:
    """Refuse to write `action`'s files into a folder that holds a model (`holds_model`), which they would replace
    (a saved multi-task model would lose its config, weights and heads): one error naming the folder."""
    if not holds_model(folder):
        return
    try:
        model_type = json.loads((Path(folder) / MODEL_COMMIT_FILE).read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, UnicodeDecodeError, AttributeError):
        model_type = None
    what = "a multi-task model" if model_type == MultiTaskConfig.model_type else "a model's weights"
    raise InputError(f"{folder} holds {what}: {action} there would replace it; choose another folder")


def check_model_source(name_or_path: Any, argument: str, need_config: bool = True) -> str:
    """A model to load (`name_or_path`, named `argument` in errors) as a string: a local folder, or a Hub repo id,
    which is left to the Hub. One clear error where transformers would word a local mistake as a Hub problem: a
    non-string is an `InputTypeError`, a path that is not there (a name that cannot be a repo id: absolute,
    relative with `./`, more than one `/`) a `MissingFileError`, a file a `FileError`, and, with `need_config`, a
    folder without `config.json` a `MissingFileError`."""
    if not isinstance(name_or_path, (str, os.PathLike)) or not isinstance(os.fspath(name_or_path), str):
        raise InputTypeError(
            f"{argument} must be a folder path or a Hub model id (a string), got {type(name_or_path).__name__}: "
            f"{name_or_path!r:.80}"
        )
    source = os.fspath(name_or_path)
    if not source.strip():
        raise InputError(f"{argument} is empty: give a folder path or a Hub model id")
    if os.path.isdir(source):
        if need_config:
            _require_config(source)
        return source
    if os.path.exists(source):
        raise FileError(f"{argument}: {source} is a file, not a model folder")
    if isinstance(name_or_path, os.PathLike) or not _is_repo_id(source):
        raise MissingFileError(f"{argument}: no such folder {source}")
    return source


def _is_repo_id(name: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _require_config(folder: str) -> str:
    config_path = os.path.join(folder, MODEL_COMMIT_FILE)
    if not os.path.isfile(config_path):
        raise MissingFileError(f"{folder} holds no config.json: not a saved model (or an interrupted save)")
    return config_path


def read_model_config(folder: str | os.PathLike) -> MultiTaskConfig:
    """The `MultiTaskConfig` in `folder/config.json`, or one error naming the file: missing, not JSON, another model
    type (a plain encoder: use `from_backbone`), or invalid options and tasks."""
    folder = str(folder)
    config_path = _require_config(folder)
    try:
        with open(config_path, encoding="utf-8") as handle:
            config = json.load(handle)
    except (ValueError, UnicodeDecodeError) as error:
        raise FileError(f"{config_path} is not valid JSON ({error}): the file is damaged or truncated") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type != MultiTaskConfig.model_type:
        raise InputError(
            f"{config_path} describes a '{model_type}' model, not a multi-task model: to start from a plain encoder "
            "use MultiTaskModel.from_backbone(folder, tasks=[...])"
        )
    try:
        return MultiTaskConfig.from_dict(dict(config))
    except (UserError, ValueError, TypeError, KeyError) as error:
        raise InputError(f"{config_path}: {error}") from None


def check_model_folder(folder: str | os.PathLike, need_tokenizer: bool = True, need_config: bool = True) -> None:
    """Raise one clear error naming the file when `folder` is not a complete saved multi-task model: its config
    (`read_model_config`), missing or truncated safetensors weights, or no tokenizer files. The one rule for a model
    folder: the Python API, the command line and the service all call it. Weights must be safetensors: pickled
    weights (`pytorch_model.bin`) can run code when loaded, and this project never writes them. `need_config`:
    False when the caller brings the config (AutoModel passes the one it read)."""
    if need_config:
        read_model_config(folder)
    folder = str(folder)
    weights = sorted(name for name in os.listdir(folder) if name.endswith(".safetensors") and name.startswith("model"))
    if not weights:
        pickled = [name for name in os.listdir(folder) if name.endswith(".bin")]
        hint = (
            f" ({', '.join(pickled)} is pickled weights, which are not loaded: save again as safetensors)"
            if pickled
            else ""
        )
        raise FileError(f"{folder} holds no model*.safetensors weights{hint}")
    for name in weights:
        check_safetensors(os.path.join(folder, name))
    if need_tokenizer and not any(os.path.isfile(os.path.join(folder, name)) for name in TOKENIZER_FILES):
        raise FileError(
            f"{folder} holds no tokenizer files ({', '.join(TOKENIZER_FILES)}): save the tokenizer beside the weights "
            "(`model.tokenizer.save_pretrained(folder)`) or pass `tokenizer=` to from_pretrained"
        )


def check_loaded_weights(
    model: Any, loading_info: dict[str, Any], folder: str, allow_missing: bool = False, allow_mismatched: bool = False
) -> None:
    """Refuse a model whose weights did not all come from the file: a tensor the config has and the file lacks (a
    head, a layer), unless `allow_missing`, or one of another shape, unless `allow_mismatched` (they then start
    fresh, as transformers does); and any weight that is NaN or infinite. The error names the file and tensors."""
    missing = [] if allow_missing else sorted(loading_info.get("missing_keys") or [])
    mismatched = (
        []
        if allow_mismatched
        else sorted(
            f"{key} (file {tuple(saved)}, model {tuple(expected)})"
            for key, saved, expected in loading_info.get("mismatched_keys") or []
        )
    )
    if missing or mismatched:
        problems = []
        if missing:
            problems.append(f"no tensor for {_listed(missing)}")
        if mismatched:
            problems.append(f"tensors of another shape: {_listed(mismatched)}")
        raise FileError(
            f"{folder}: the weights do not match the config ({'; '.join(problems)}): the file is incomplete, or the "
            "config was changed after saving (add tasks with model.add_tasks; pass allow_missing_weights=True to "
            "start the missing tensors fresh on purpose)"
        )
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not tensor.isfinite().all():
            bad = int((~tensor.isfinite()).sum())
            raise FileError(f"{folder}: weight {name} holds {bad} NaN or infinite value(s): the model is damaged")


def _listed(names: list[str], shown: int = 8) -> str:
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def check_safetensors(path: str) -> None:
    """A safetensors file is an 8-byte header length, a JSON header and the tensor bytes it lists: check all three
    (a header that parses but lists no valid offsets counts as damaged)."""
    size = os.path.getsize(path)
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        length = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
        if length < 2 or 8 + length > size:
            raise FileError(f"{path} is truncated or not a safetensors file ({size} bytes)")
        try:
            header = json.loads(handle.read(length))
            ends = [int(entry["data_offsets"][1]) for key, entry in header.items() if key != "__metadata__"]
        except (ValueError, UnicodeDecodeError, TypeError, KeyError, IndexError, AttributeError):
            raise FileError(f"{path} has a damaged header: the file is truncated or not a safetensors file") from None
    if 8 + length + max(ends, default=0) > size:
        raise FileError(f"{path} is truncated: its header lists {8 + length + max(ends)} bytes, the file has {size}")


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
            raise InputError(
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
        raise InputError(
            f"{where}: a pooling that leaves out the prompt tokens (include_prompt=false) is not supported"
        )
    mode = pooling_config.get("pooling_mode")
    if isinstance(mode, str):
        return _ST_POOLING_NAMES.get(mode, mode)
    chosen = [mode for flag, mode in _ST_POOLING_FLAGS.items() if pooling_config.get(flag)]
    if len(chosen) > 1:
        raise InputError(f"{where} concatenates poolings {chosen}; MultiTaskModel pools one way")
    return chosen[0] if chosen else "mean"


def _sentence_transformers_dense(name_or_path, folder: str, where: str, **hub_kwargs) -> dict[str, Any]:
    config_path = _checkpoint_file(name_or_path, f"{folder}/config.json", **hub_kwargs)
    with open(config_path, encoding="utf-8") as handle:
        config = json.load(handle)
    names = {name: key for key, name in _ST_ACTIVATIONS.items()}
    activation = config.get("activation_function", _ST_ACTIVATIONS[None])
    if activation not in names:
        raise InputError(f"{where}: Dense activation {activation} is not one of {sorted(names)}")
    weights = _checkpoint_file(name_or_path, f"{folder}/model.safetensors", **hub_kwargs)
    if weights is None:
        raise InputError(f"{where}: no {folder}/model.safetensors (Dense weights in another format are not read)")
    return {
        "in_features": int(config["in_features"]),
        "out_features": int(config["out_features"]),
        "bias": bool(config.get("bias", True)),
        "activation": names[activation],
        "weights": weights,
    }


def unsupported_by_sentence_transformers(config: Any) -> str | None:
    """Why sentence-transformers cannot express this model's embedding, or `None` when it can."""
    if config.pooling in _ST_POOLING_FLAGS.values() and config.projection_activation in _ST_ACTIVATIONS:
        return None
    return (
        f"sentence-transformers cannot express this embedding (pooling '{config.pooling}', projection activation "
        f"{config.projection_activation!r}); supported: {sorted(_ST_POOLING_NAMES.values())} pooling and "
        f"activations {sorted(a for a in _ST_ACTIVATIONS if a)}"
    )


def write_sentence_transformers_files(
    model: Any, folder: str | os.PathLike, model_args: dict[str, Any] | None = None
) -> bool:
    """Write the sentence-transformers module files for `model`'s embedding into `folder` (whose root holds the
    encoder and tokenizer), so that `SentenceTransformer(folder)` embeds exactly as `model.encode` does;
    `model_args`: keyword arguments for loading the encoder there (`sentence_bert_config.json`). Returns
    `False`, writing nothing, when the embedding has a part sentence-transformers cannot express (learned
    attention pooling, a projection activation it has no class for)."""
    from safetensors.torch import save_file

    config = model.config
    if unsupported_by_sentence_transformers(config):
        return False
    flags = {mode: flag for flag, mode in _ST_POOLING_FLAGS.items()}
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
    st_config = {
        "prompts": dict(config.prompts or {}),
        "default_prompt_name": config.default_prompt_name,
        "similarity_fn_name": "cosine",
    }
    # The names come from the list of published files: a file written here is one push_to_hub.py uploads.
    for name, content in zip(SENTENCE_TRANSFORMERS_FILES, (modules, bert_config, st_config), strict=True):
        with open(os.path.join(folder, name), "w", encoding="utf-8") as handle:
            json.dump(content, handle, indent=2)
    return True


__all__ = [
    "TOKENIZER_FILES",
    "model_code_files",
    "MODEL_COMMIT_FILE",
    "PUBLISHED_PATTERNS",
    "SENTENCE_TRANSFORMERS_FILES",
    "SENTENCE_TRANSFORMERS_MODULES",
    "published_files",
    "save_tokenizer",
    "check_loaded_weights",
    "check_model_source",
    "check_not_a_model_folder",
    "commit_model_folder",
    "check_model_folder",
    "check_safetensors",
    "holds_model",
    "read_model_config",
    "read_sentence_transformers_settings",
    "remove_stale_staging",
    "staging_folder",
    "unsupported_by_sentence_transformers",
    "write_sentence_transformers_files",
]
