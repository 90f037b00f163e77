"""`push_to_hub.py` end to end against a local Hub stand-in (`tests/hub_server.py`), and its error paths.

The push and the download each run in a fresh Python process whose environment points `huggingface_hub` at the
local server (`HF_ENDPOINT`, `HF_HUB_OFFLINE=0`, an empty `HF_HOME`): that library reads these at import time, and
the download must not see this project's files, only what the server returned.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
from hub_server import HubServer
from huggingface_hub import ModelCard
from train_helpers import separate_sources

import push_to_hub
import train
from io_mtl import model_code_files

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "hf_test_write_token"
USER = "alice"
SENTENCES = ["John Smith loved the match in Paris", "Maria discovered the terrible market in Berlin"]
# Longer than the model's max_seq_length (32): a loader that misses sentence_bert_config.json truncates elsewhere.
LONG = " ".join(["Maria loved the match in Berlin"] * 20)
# The model-index holds every per-task metric of metrics.json except losses (see multitask_st/model_card.py).
NOT_IN_MODEL_INDEX = {"loss"}


@pytest.fixture(scope="module")
def trained_model(tiny_bert, tmp_path_factory) -> Path:
    """A real (very short) `train.py` run on the tiny backbone: model, metrics, training record, log, card."""
    root = tmp_path_factory.mktemp("trained")
    # local copies that name their Hub dataset: the card's model-index names datasets by Hub id only
    tasks = [{**task, "hub_dataset": f"someone/{task['name']}-data"} for task in separate_sources(root / "data")]
    argv = [
        "--model_name_or_path", str(tiny_bert), "--tasks", json.dumps(tasks), "--output_dir", str(root / "model"),
        "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "8", "--report_to", "none",
        "--use_cpu", "true", "--max_seq_length", "32", "--num_examples_to_print", "0", "--max_steps", "6",
        "--logging_steps", "2", "--eval_strategy", "steps", "--eval_steps", "3", "--save_strategy", "no",
    ]  # fmt: skip
    assert train.main(argv) == 0
    return root / "model"


@pytest.fixture(scope="module")
def hub():
    with HubServer({TOKEN: USER}) as server:
        yield server


def hub_env(endpoint: str, home: Path, token: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE_")) and k != "PYTHONPATH"}
    env.update(HF_ENDPOINT=endpoint, HF_HUB_OFFLINE="0", HF_HOME=str(home), HF_HUB_DISABLE_XET="1")
    env.update(HF_HUB_DISABLE_TELEMETRY="1", TOKENIZERS_PARALLELISM="false")
    if token:
        env["HF_TOKEN"] = token
    return env


def run_push(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "push_to_hub.py"), *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def stored_files(hub: HubServer, repo_id: str, revision: str = "main") -> dict[str, bytes]:
    """What the server holds at `revision`: path -> content (LFS content from its blob store)."""
    commit = hub.repos[repo_id].resolve(revision)
    return {path: (hub.blobs[stored.oid] if stored.lfs else stored.content) for path, stored in commit.files.items()}


def test_the_card_of_a_run_is_named_after_its_output_folder(trained_model):
    # Written in a staging folder before the move into output_dir: the name is still output_dir's.
    card = (trained_model / "README.md").read_text()
    assert f"# {trained_model.name}\n" in card and f"- name: {trained_model.name}\n" in card
    assert ".final-model-staging" not in card


def test_push_then_load_in_a_fresh_process_gives_the_same_outputs(trained_model, hub, tmp_path):
    repo_id = f"{USER}/tiny-multitask"
    # The token comes from the saved login (HF_HOME/token), as after `hf auth login`.
    home = tmp_path / "hf_home_push"
    home.mkdir()
    (home / "token").write_text(TOKEN)
    records = {path: path.read_bytes() for path in trained_model.rglob("*.json")}
    result = run_push(
        [str(trained_model), "--repo_id", repo_id, "--commit_message", "first"], hub_env(hub.endpoint, home)
    )
    assert result.returncode == 0, result.stderr
    commit_oid = hub.repos[repo_id].refs["main"]
    assert commit_oid in result.stdout and "trust_remote_code=True" in result.stdout

    files = stored_files(hub, repo_id)
    published = set(files) - {".gitattributes"}
    expected = {
        "README.md", "config.json", "model.safetensors", *model_code_files(),
        "tokenizer.json", "tokenizer_config.json", "metrics.json", "training_config.json", "trainer_state.json",
        "training_curves.png",
        # what save_pretrained writes for sentence-transformers: without it SentenceTransformer guesses the modules
        "modules.json", "sentence_bert_config.json", "config_sentence_transformers.json", "1_Pooling/config.json",
    }  # fmt: skip
    assert published == expected, published ^ expected  # no training_args.bin pickle, nothing else
    # The staged copy lost its local paths; the model folder's own records (hard-linked there) are untouched.
    assert {path: path.read_bytes() for path in trained_model.rglob("*.json")} == records
    commit = hub.repos[repo_id].resolve("main")
    assert commit.files["model.safetensors"].lfs and not commit.files["config.json"].lfs  # weights went through LFS
    assert files["model.safetensors"] == (trained_model / "model.safetensors").read_bytes()
    assert json.loads(files["config.json"])["auto_map"]["AutoModel"] == "modeling_mtl.MultiTaskModel"
    # The local card was refreshed to the published one (it now names the repo).
    assert (trained_model / "README.md").read_bytes() == files["README.md"]

    # A fresh process, outside the project, with an empty cache and no token (the repo is public).
    work = tmp_path / "elsewhere"
    work.mkdir()
    script = textwrap.dedent(
        f"""
        import json, sys
        import numpy as np
        sys.path = [p for p in sys.path if p not in ("", {str(ROOT)!r})]
        from transformers import AutoModel
        from huggingface_hub import ModelCard
        from sentence_transformers import SentenceTransformer

        model = AutoModel.from_pretrained({repo_id!r}, trust_remote_code=True, revision={commit_oid!r})
        model.eval()
        np.save("embeddings.npy", model.encode({[*SENTENCES, LONG]!r}, convert_to_numpy=True))
        st_model = SentenceTransformer({repo_id!r}, trust_remote_code=True, revision={commit_oid!r}, device="cpu")
        np.save("st_embeddings.npy", st_model.encode({[*SENTENCES, LONG]!r}))
        card = ModelCard.load({repo_id!r})
        json.dump({{
            "module": type(model).__module__,
            "predictions": model.predict({SENTENCES!r}),
            "card_text": card.content,
        }}, open("result.json", "w"))
        """
    )
    download = subprocess.run(
        [sys.executable, "-c", script], cwd=work, env=hub_env(hub.endpoint, tmp_path / "hf_home_load"),
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert download.returncode == 0, download.stderr[-3000:]
    result = json.loads((work / "result.json").read_text())
    # The class came from the code files downloaded from the server, not from this project.
    assert result["module"].startswith("transformers_modules"), result["module"]

    from modeling_mtl import MultiTaskModel

    local = MultiTaskModel.from_pretrained(trained_model).eval()
    expected_embeddings = local.encode([*SENTENCES, LONG])
    np.testing.assert_allclose(np.load(work / "embeddings.npy"), expected_embeddings, atol=1e-6)
    # sentence-transformers reads the published modules (pooling, max length), not its defaults.
    np.testing.assert_allclose(np.load(work / "st_embeddings.npy"), expected_embeddings, atol=1e-5)
    local_predictions = json.loads(json.dumps(local.predict(SENTENCES)))
    for remote, expected_prediction in zip(result["predictions"], local_predictions):
        assert remote["topic"]["label"] == expected_prediction["topic"]["label"]
        assert remote["sentiment"]["scores"] == pytest.approx(expected_prediction["sentiment"]["scores"], abs=1e-6)
        assert [w["tag"] for w in remote["ner"]["words"]] == [w["tag"] for w in expected_prediction["ner"]["words"]]

    # The downloaded README is a valid model card whose metrics are the run's.
    card = ModelCard(result["card_text"])
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "feature-extraction"
    assert "sentence-transformers" in card.data.tags and "SentenceTransformer(" in card.text
    assert f'AutoModel.from_pretrained(\n    "{repo_id}"' in card.text
    metrics = json.loads((trained_model / "metrics.json").read_text())
    reported = {(r.task_name, r.metric_name.split(" ", 1)[1]): r.metric_value for r in card.data.eval_results}
    expected_metrics = {
        (task, metric.replace("_", " ")): value
        for task, scores in metrics["eval"].items()
        for metric, value in scores.items()
        if metric not in NOT_IN_MODEL_INDEX
    }
    assert reported == pytest.approx(expected_metrics)


def test_dry_run_writes_exactly_what_is_uploaded(trained_model, hub, tmp_path):
    repo_id = f"{USER}/dry-run-check"
    dry = tmp_path / "to_upload"
    home = tmp_path / "home"
    home.mkdir()
    dry_result = run_push(
        [str(trained_model), "--repo_id", repo_id, "--dry-run", str(dry)], hub_env(hub.endpoint, home)
    )
    assert dry_result.returncode == 0, dry_result.stderr
    assert repo_id not in hub.repos, "a dry run must not touch the Hub"
    pushed = run_push([str(trained_model), "--repo_id", repo_id], hub_env(hub.endpoint, home, token=TOKEN))
    assert pushed.returncode == 0, pushed.stderr
    files = stored_files(hub, repo_id)
    files.pop(".gitattributes")
    staged = {path.relative_to(dry).as_posix(): path.read_bytes() for path in dry.rglob("*") if path.is_file()}
    assert staged == files
    # A second dry run into a non-empty folder is refused rather than mixing two folders.
    again = run_push([str(trained_model), "--repo_id", repo_id, "--dry-run", str(dry)], hub_env(hub.endpoint, home))
    assert again.returncode == 2 and "must be empty" in again.stderr


def test_the_staged_folder_names_no_local_path(trained_model, tiny_bert, tmp_path, tmp_path_factory):
    """The base model and the data are published by name, never by where they lie on this machine; the model
    folder keeps its own records as they were."""
    before = {path: path.read_bytes() for path in trained_model.rglob("*") if path.is_file()}
    dry = tmp_path / "to_upload"
    assert push_to_hub.main([str(trained_model), "--repo_id", f"{USER}/paths", "--dry-run", str(dry)]) == 0
    local = [str(tmp_path_factory.getbasetemp()), str(trained_model.resolve()), tempfile.gettempdir(), str(ROOT)]
    for path in dry.rglob("*"):
        if path.is_file():
            content = path.read_bytes()
            assert not [root for root in local if root.encode() in content], path.name
    assert {path: path.read_bytes() for path in trained_model.rglob("*") if path.is_file()} == before

    record = json.loads((dry / "training_config.json").read_text())
    assert record["base_model"] == record["hyperparameters"]["model_name_or_path"] == f"./{tiny_bert.name}"
    assert {task: info["dataset"] for task, info in record["tasks"].items()} == {
        "topic": "./topic", "sentiment": "./sentiment", "ner": "./ner"
    }  # fmt: skip
    config = json.loads((dry / "config.json").read_text())
    assert config["backbone_config"]["_name_or_path"] == f"./{tiny_bert.name}"
    # The card names the data as before, as local copies of the Hub datasets their specs name, and claims no base
    # model.
    card = ModelCard.load(dry / "README.md")
    assert (
        "`topic`, a local copy of [someone/topic-data]" in card.text
        and f"`./{tiny_bert.name}` (a local checkpoint)" in card.text
    )
    assert card.data.datasets == ["someone/ner-data", "someone/sentiment-data", "someone/topic-data"]
    assert card.data.base_model is None
    # The training-curve figure train.py drew is published, and the card shows it.
    assert (dry / "training_curves.png").is_file() and "![training curves](training_curves.png)" in card.text


def test_every_file_save_pretrained_writes_is_published(tiny_bert, tmp_path):
    """One list says which files of a model folder are published (`io_mtl.published_files`): a model with a
    projection and normalisation (Dense and Normalize module folders) publishes all that `save_pretrained` wrote,
    and the staged folder embeds in sentence-transformers exactly as the model does."""
    import torch
    from sentence_transformers import SentenceTransformer

    from modeling_mtl import MultiTaskModel

    torch.manual_seed(0)
    model = MultiTaskModel.from_backbone(
        tiny_bert, tasks=[{"name": "t", "labels": ["a", "b"]}], projection_dim=16, projection_activation="tanh",
        normalize=True, max_seq_length=16,
    ).eval()  # fmt: skip
    model.save_pretrained(tmp_path / "model")
    dry = tmp_path / "to_upload"
    assert push_to_hub.main([str(tmp_path / "model"), "--dry-run", str(dry)]) == 0

    def files(folder: Path) -> set[str]:
        return {path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file()}

    assert files(dry) == files(tmp_path / "model") | {"README.md"}
    assert {"modules.json", "2_Dense/model.safetensors", "3_Normalize/config.json"} <= files(dry)
    theirs = SentenceTransformer(str(dry), trust_remote_code=True, device="cpu")
    np.testing.assert_allclose(theirs.encode([*SENTENCES, LONG]), model.encode([*SENTENCES, LONG]), atol=1e-5)


def test_a_model_saved_by_an_earlier_version_publishes_its_own_code_files(trained_model, hub, tmp_path):
    """A model saved before the task-type refactor carries three code files, importing only one another: what it
    must publish is what its own code imports, not what today's package would copy."""
    import shutil

    old = tmp_path / "old_model"
    shutil.copytree(trained_model, old)
    for name in model_code_files():
        (old / name).unlink()
    (old / "configuration_mtl.py").write_text("from transformers import PretrainedConfig\n")
    (old / "inference_mtl.py").write_text("import numpy\n")
    (old / "modeling_mtl.py").write_text(
        "try:\n    from .configuration_mtl import PretrainedConfig\n    from .inference_mtl import numpy\n"
        "except ImportError:\n    pass\n"
    )
    dry = tmp_path / "to_upload"
    result = run_push([str(old), "--repo_id", f"{USER}/old", "--dry-run", str(dry)], hub_env(hub.endpoint, tmp_path))
    assert result.returncode == 0, result.stderr
    assert {path.name for path in dry.glob("*.py")} == {"configuration_mtl.py", "modeling_mtl.py", "inference_mtl.py"}
    (old / "inference_mtl.py").unlink()  # a file its own code imports is missing: named
    result = run_push(
        [str(old), "--repo_id", f"{USER}/old", "--dry-run", str(tmp_path / "x")], hub_env(hub.endpoint, tmp_path)
    )
    assert result.returncode == 2 and "lacks the model code ['inference_mtl.py']" in result.stderr


def test_branch_pull_request_private_and_bad_token(trained_model, hub, tmp_path):
    repo_id = f"{USER}/branches"
    env = hub_env(hub.endpoint, tmp_path, token=TOKEN)
    assert run_push([str(trained_model), "--repo_id", repo_id, "--private"], env).returncode == 0
    main_oid = hub.repos[repo_id].refs["main"]
    assert hub.repos[repo_id].private

    # A branch is created from main; pushing the same files there is a no-op commit, which is still a success.
    result = run_push([str(trained_model), "--repo_id", repo_id, "--branch", "v1", "--license", "mit"], env)
    assert result.returncode == 0, result.stderr
    assert hub.repos[repo_id].refs["main"] == main_oid, "pushing to a branch must not move main"
    v1_card = ModelCard(stored_files(hub, repo_id, "v1")["README.md"].decode())
    assert v1_card.data.license == "mit"

    result = run_push([str(trained_model), "--repo_id", repo_id, "--create_pr", "--tags", "demo"], env)
    assert result.returncode == 0, result.stderr
    assert "refs/pr/1" in hub.repos[repo_id].refs and "Pull request:" in result.stdout
    assert hub.repos[repo_id].refs["main"] == main_oid

    # A repo id without namespace goes to the token owner's namespace.
    result = run_push([str(trained_model), "--repo_id", "no-namespace"], env)
    assert result.returncode == 0 and f"{USER}/no-namespace" in hub.repos, result.stderr

    # A rejected token is a failure with a clear message, never "Uploaded".
    bad = run_push([str(trained_model), "--repo_id", repo_id], hub_env(hub.endpoint, tmp_path, token="hf_wrong"))
    assert bad.returncode == 1 and "token was rejected" in bad.stderr and "Uploaded" not in bad.stdout
    # Another user's namespace: the server refuses, the script reports it.
    other = run_push([str(trained_model), "--repo_id", "bob/model"], env)
    assert other.returncode == 1 and "403" in other.stderr


def test_server_down_is_a_clear_network_error(trained_model, tmp_path):
    with HubServer({TOKEN: USER}) as server:
        endpoint = server.endpoint
    # The port is closed now: nothing answers there.
    result = run_push([str(trained_model), "--repo_id", f"{USER}/m"], hub_env(endpoint, tmp_path, token=TOKEN))
    assert result.returncode == 1
    assert "could not reach the Hub" in result.stderr and endpoint in result.stderr
    assert "Uploaded" not in result.stdout


def _copy_model(trained_model: Path, target: Path, skip: tuple[str, ...] = ()) -> Path:
    target.mkdir()
    for path in trained_model.iterdir():
        if path.is_file() and path.name not in skip:
            (target / path.name).write_bytes(path.read_bytes())
    return target


@pytest.mark.parametrize(
    ("skip", "edit_config", "message"),
    [
        (("model.safetensors",), None, "has no model.safetensors"),
        (("modeling_mtl.py",), None, "lacks the model code ['modeling_mtl.py']"),
        (("tokenizer_config.json",), None, "has no tokenizer_config.json"),
        (("tokenizer.json",), None, "has no tokenizer vocabulary"),
        ((), None, "names the module folder '1_Pooling', which"),  # `_copy_model` copies no folder
        ((), lambda config: config.pop("auto_map"), "has no `auto_map`"),
        ((), lambda config: config.pop("tasks"), "is not a multi-task model config"),
    ],
)
def test_incomplete_model_dir_is_refused_with_the_missing_part(
    trained_model, tmp_path, capsys, skip, edit_config, message
):
    folder = _copy_model(trained_model, tmp_path / "model", skip)
    if edit_config:
        config = json.loads((folder / "config.json").read_text())
        edit_config(config)
        (folder / "config.json").write_text(json.dumps(config))
    assert push_to_hub.main([str(folder), "--repo_id", "alice/x", "--token", TOKEN]) == 2
    assert message in capsys.readouterr().err


def test_bad_arguments_fail_before_any_network_call(trained_model, tmp_path, capsys, monkeypatch):
    assert push_to_hub.main([str(tmp_path / "missing"), "--repo_id", "alice/x"]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "file.txt").write_text("x")
    assert push_to_hub.main([str(tmp_path / "file.txt"), "--repo_id", "alice/x"]) == 2
    assert "is not a directory" in capsys.readouterr().err
    for repo_id in ("alice/x/y", "bad name", "alice/-bad--", "https://huggingface.co/alice/x"):
        assert push_to_hub.main([str(trained_model), "--repo_id", repo_id, "--token", TOKEN]) == 2
        assert f"--repo_id '{repo_id}' is malformed" in capsys.readouterr().err
    assert push_to_hub.main([str(trained_model)]) == 2
    assert "--repo_id is required" in capsys.readouterr().err

    # No token anywhere: not as an argument, not in the environment, no saved login.
    from huggingface_hub import constants

    for variable in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no_token"))
    assert push_to_hub.main([str(trained_model), "--repo_id", "alice/x"]) == 2
    err = capsys.readouterr().err
    assert "no Hugging Face token" in err and "HF_TOKEN" in err and "hf auth login" in err
