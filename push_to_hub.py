"""Publish a trained multi-task model to the Hugging Face Hub.

```bash
python push_to_hub.py outputs/multitask-model --repo_id my-name/my-multitask-model [--private] [--revision v1]
python push_to_hub.py outputs/multitask-model --repo_id my-name/my-multitask-model --dry-run /tmp/to-upload
```

The folder is checked first (config with `auto_map`, safetensors weights, the code files, tokenizer files), and
exactly the files that belong to a published model (`io_mtl.published_files`) are staged: weights, config, code,
tokenizer, the sentence-transformers modules, the metrics/training records and the training-curve figure; never
optimizer states, checkpoints or pickled `training_args.bin`. In the staged copy the records name no local path (the
base model by its Hub id or `./<name>`, local data by name: `multitask_st.model_card.remove_local_paths`), the model
card is regenerated for the target repo, and the folder is uploaded in one commit with `HfApi.upload_folder`.
`--dry-run DIR` writes that same folder to DIR and uploads nothing. The model folder itself is left as it is (only its
README.md is refreshed to the published card after an upload).

Exit status: 0 on success, 2 for a bad argument or model folder, 1 when the Hub refused or could not be reached (the
message says which; a failed upload is never reported as success).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from io_mtl import model_code_files, published_files
from validation_mtl import UserError

# Cards written by `multitask_st.model_card` carry this; a README.md without it was written by hand.
GENERATED_CARD_MARK = "multitask_st.model_card"
TOKENIZER_VOCAB_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "*.model")


class PushError(Exception):
    """A problem the user can fix; `exit_code` 2 for bad input, 1 for Hub/network failures."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=os.path.basename(sys.argv[0]),  # push_to_hub.py, or `mtl push`
        description="Upload a trained multi-task model folder (weights, config, code, tokenizer, model card) to the "
        "Hugging Face Hub.",
    )
    parser.add_argument("model_dir", help="the saved model: a `train.py` output dir or a `save_pretrained` folder")
    parser.add_argument("--repo_id", help="target repo, `namespace/name` (or `name` for your own namespace)")
    parser.add_argument("--token", help="Hub access token with write access (default: HF_TOKEN, then the saved login)")
    parser.add_argument("--private", action="store_true", help="create the repo as private (ignored if it exists)")
    parser.add_argument(
        "--revision",
        "--branch",
        dest="revision",
        default=None,
        help="branch to commit to (created from main if missing; default main)",
    )
    parser.add_argument("--commit_message", default=None, help="default: 'Upload multi-task model <folder name>'")
    parser.add_argument("--commit_description", default=None, help="longer description of the commit")
    parser.add_argument("--create_pr", action="store_true", help="open a pull request instead of committing to main")
    parser.add_argument(
        "--dry-run",
        "--dry_run",
        dest="dry_run",
        metavar="DIR",
        default=None,
        help="write the folder that would be uploaded to DIR (must be empty or missing) and upload nothing",
    )
    parser.add_argument("--endpoint", default=None, help="Hub endpoint (default: HF_ENDPOINT or huggingface.co)")
    parser.add_argument("--license", default=None, help="license for the card (default: the base model's, if known)")
    parser.add_argument("--language", nargs="+", default=None, help="language codes for the card metadata")
    parser.add_argument("--tags", nargs="+", default=None, help="extra tags for the card metadata")
    parser.add_argument("--no_card", action="store_true", help="upload the folder's README.md as it is")
    parser.add_argument(
        "--overwrite_readme",
        action="store_true",
        help="replace a hand-written README.md in model_dir with the generated card (otherwise that is an error)",
    )
    return parser


def validate_model_dir(model_dir: str | os.PathLike) -> list[Path]:
    """Check that `model_dir` holds a complete saved multi-task model; return the files to publish.

    Raises:
        PushError: naming what is missing or malformed.
    """
    folder = Path(model_dir)
    if not folder.exists():
        raise PushError(f"model_dir '{folder}' does not exist")
    if not folder.is_dir():
        raise PushError(f"model_dir '{folder}' is not a directory")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise PushError(f"model_dir '{folder}' has no config.json: is it a saved model (save_pretrained / train.py)?")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise PushError(f"{config_path} is not valid JSON: {error}") from error
    auto_map = config.get("auto_map") if isinstance(config, dict) else None
    if not isinstance(auto_map, dict) or "AutoModel" not in auto_map or "AutoConfig" not in auto_map:
        raise PushError(
            f"{config_path} has no `auto_map` for AutoConfig/AutoModel: without it `AutoModel.from_pretrained(..., "
            "trust_remote_code=True)` cannot load the model. Re-save it with `MultiTaskModel.save_pretrained`."
        )
    if "tasks" not in config or "backbone_config" not in config:
        raise PushError(f"{config_path} is not a multi-task model config (no `tasks` / `backbone_config`)")

    missing_code = [name for name in model_code_files(folder) if not (folder / name).is_file()]
    if missing_code:
        raise PushError(
            f"model_dir '{folder}' lacks the model code {missing_code} that its own code files import: re-save it "
            "with `MultiTaskModel.save_pretrained`"
        )

    index_path = folder / "model.safetensors.index.json"
    if index_path.is_file():
        try:
            shards = sorted(set(json.loads(index_path.read_text(encoding="utf-8"))["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as error:
            raise PushError(f"{index_path} is malformed: {error}") from error
        missing_shards = [shard for shard in shards if not (folder / shard).is_file()]
        if missing_shards:
            raise PushError(
                f"model_dir '{folder}': weight shards listed in {index_path.name} are missing: {missing_shards}"
            )
    elif not (folder / "model.safetensors").is_file():
        other = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
        hint = f" (found {other}: only safetensors weights are published)" if other else ""
        raise PushError(f"model_dir '{folder}' has no model.safetensors{hint}")

    if not (folder / "tokenizer_config.json").is_file():
        raise PushError(f"model_dir '{folder}' has no tokenizer_config.json: save the tokenizer with the model")
    if not any(list(folder.glob(pattern)) for pattern in TOKENIZER_VOCAB_FILES):
        raise PushError(f"model_dir '{folder}' has no tokenizer vocabulary (one of {list(TOKENIZER_VOCAB_FILES)})")

    check_model_loads(folder)
    try:  # one list says what a published model holds: `io_mtl.published_files`, beside what save_pretrained writes
        return [folder / name for name in published_files(folder)]
    except UserError as error:
        raise PushError(str(error)) from None


def check_model_loads(folder: Path) -> None:
    """Load the folder as a user would and run one forward pass: damaged weights (a truncated safetensors file),
    an invalid config or a model whose outputs are not finite (diverged training) are never published."""
    import torch

    from modeling_mtl import MultiTaskModel, check_model_folder

    try:
        check_model_folder(folder)
        model = MultiTaskModel.from_pretrained(str(folder)).eval()
    except (OSError, ValueError, RuntimeError) as error:
        raise PushError(f"model_dir '{folder}' does not load: {error}") from None
    with torch.inference_mode():
        batch = model.tokenize(["A short check sentence."], return_token_type_ids=False)
        outputs = model(**batch)
    bad = [
        name
        for name, value in {"embeddings": outputs.embeddings, **outputs.logits}.items()
        if not torch.isfinite(value).all()
    ]
    if bad:
        raise PushError(f"model_dir '{folder}' gives non-finite outputs for {bad}: the model is broken, not published")


def check_readme(model_dir: Path, args) -> None:
    readme = model_dir / "README.md"
    if args.no_card or args.overwrite_readme or not readme.is_file():
        return
    if GENERATED_CARD_MARK not in readme.read_text(encoding="utf-8", errors="replace"):
        raise PushError(
            f"{readme} was not written by this project's model card generator: pass --no_card to publish it as it "
            "is, or --overwrite_readme to replace it with a generated card"
        )


def validate_repo_id(repo_id: str | None) -> str:
    """Check the shape of a repo id (`namespace/name` or `name`) the way the Hub does, before any network call."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id as hub_validate_repo_id

    if not repo_id:
        raise PushError("--repo_id is required (e.g. `my-name/my-multitask-model`), except with --dry-run")
    if repo_id.count("/") > 1:
        raise PushError(f"--repo_id '{repo_id}' is malformed: use `namespace/name` (one '/'), not a URL or a path")
    try:
        hub_validate_repo_id(repo_id)
    except HFValidationError as error:
        raise PushError(f"--repo_id '{repo_id}' is malformed: {error}") from error
    return repo_id


def resolve_token(token: str | None) -> str:
    from huggingface_hub import get_token

    token = token or get_token()
    if not token:
        raise PushError(
            "no Hugging Face token: pass --token, set the HF_TOKEN environment variable, or run `hf auth login` "
            "(the token needs write access)"
        )
    return token


def stage_folder(
    model_dir: Path, files: list[Path], target: Path, repo_id: str | None, args, link: bool = False
) -> list[str]:
    """Copy the files to publish into `target`, rewrite its records without local paths and write the refreshed
    model card there; return their paths relative to `target`.

    `link=True` hard-links instead of copying where possible (for the temporary upload folder: no copy of large
    weights); a dry-run folder gets real copies, so editing it cannot touch the model. The records rewritten in
    `target` are new files, never written through a link into `model_dir`.
    """
    from multitask_st.model_card import base_model_metadata, remove_local_paths, write_model_card

    target.mkdir(parents=True, exist_ok=True)
    for path in files:
        destination = target / path.relative_to(model_dir)
        destination.parent.mkdir(parents=True, exist_ok=True)
        try:
            if not link:
                raise OSError
            os.link(path, destination)
        except OSError:
            shutil.copy2(path, destination)
    # The base model's own card (license, language) is read while the records still name its local copy.
    base_metadata = base_model_metadata(target)
    remove_local_paths(target)
    if args.no_card:
        if (model_dir / "README.md").is_file():
            shutil.copy2(model_dir / "README.md", target / "README.md")
    else:
        overrides = {
            key: value
            for key, value in (("license", args.license), ("language", args.language), ("tags", args.tags))
            if value
        }
        # The figure is drawn only when the model folder has none (train.py's card already drew it).
        write_model_card(
            target,
            repo_id=repo_id,
            figure=not (target / "training_curves.png").exists(),
            **{**base_metadata, **overrides},
        )
    return sorted(path.relative_to(target).as_posix() for path in target.rglob("*") if path.is_file())


def _describe_hub_error(error: Exception, endpoint: str) -> str:
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if isinstance(error, OfflineModeIsEnabled):
        return f"HF_HUB_OFFLINE is set, so nothing can be uploaded ({error}); unset it to publish"
    if isinstance(error, HfHubHTTPError):
        status = error.response.status_code if error.response is not None else "?"
        reason = {
            401: "the token was rejected (invalid or expired)",
            403: "the token may not write to this namespace or repo",
        }.get(status, f"the Hub answered HTTP {status}")
        return f"{reason}: {error}"
    name = type(error).__name__
    if "Connect" in name or "Timeout" in name or "Network" in name or isinstance(error, ConnectionError):
        return f"could not reach the Hub at {endpoint} ({name}: {error}); check the network, proxy and HF_ENDPOINT"
    return f"{name}: {error}"


def main(argv: list[str] | None = None) -> int:
    """Push a model folder to the Hub. Returns the exit status (0 success, 2 bad input, 1 Hub/network failure)."""
    args = build_parser().parse_args(argv)
    try:
        model_dir = Path(args.model_dir)
        files = validate_model_dir(model_dir)
        check_readme(model_dir, args)
        repo_id = validate_repo_id(args.repo_id) if (args.repo_id or not args.dry_run) else None
        if args.create_pr and args.revision not in (None, "main"):
            raise PushError("--create_pr opens a pull request against main: do not combine it with --revision")

        if args.dry_run:
            target = Path(args.dry_run)
            if target.exists() and (not target.is_dir() or any(target.iterdir())):
                raise PushError(f"--dry-run directory '{target}' must be empty or not exist yet")
            if target.resolve() == model_dir.resolve():
                raise PushError("--dry-run directory must differ from model_dir")
            names = stage_folder(model_dir, files, target, repo_id, args)
            print(f"Dry run: the {len(names)} files that would be uploaded are in {target}:")
            for name in names:
                print(f"  {name}  ({(target / name).stat().st_size:,} bytes)")
            return 0

        token = resolve_token(args.token)
    except PushError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code

    from huggingface_hub import HfApi, constants

    endpoint = args.endpoint or constants.ENDPOINT
    api = HfApi(endpoint=endpoint, token=token)
    step = "connecting"
    try:
        if "/" not in repo_id:
            step = "looking up the token's user name"
            repo_id = f"{api.whoami()['name']}/{repo_id}"
        step = f"creating repo {repo_id}"
        repo_url = api.create_repo(repo_id, private=args.private, exist_ok=True)
        if args.revision and args.revision != "main":
            step = f"creating branch {args.revision}"
            api.create_branch(repo_id, branch=args.revision, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="push_to_hub_") as staging:
            names = stage_folder(model_dir, files, Path(staging), repo_id, args, link=True)
            step = f"uploading {len(names)} files"
            commit = api.upload_folder(
                repo_id=repo_id,
                folder_path=staging,
                commit_message=args.commit_message or f"Upload multi-task model {model_dir.resolve().name}",
                commit_description=args.commit_description,
                revision=args.revision,
                create_pr=args.create_pr,
            )
            if not args.no_card:
                try:  # the local folder keeps the card that was published
                    shutil.copyfile(Path(staging) / "README.md", model_dir / "README.md")
                except OSError as error:
                    print(f"warning: could not refresh {model_dir / 'README.md'}: {error}", file=sys.stderr)
    except Exception as error:  # every failure past this point comes from the Hub or the network
        print(f"error: push to {repo_id} failed while {step}: {_describe_hub_error(error, endpoint)}", file=sys.stderr)
        print("Nothing was published by this run unless the Hub shows a new commit.", file=sys.stderr)
        return 1

    print(f"Uploaded {len(names)} files to {repo_url}: {', '.join(names)}")
    print(f"Commit: {commit.commit_url}")
    if commit.pr_url:
        print(f"Pull request: {commit.pr_url}")
    print(f"Load it with: AutoModel.from_pretrained({repo_id!r}, trust_remote_code=True, revision={commit.oid!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
