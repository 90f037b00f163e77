"""`pip install .` builds and installs the modules and data the package declares."""

import json
import os
import shlex
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_contains_modules_and_data_and_installs(tmp_path):
    # --no-build-isolation: use the installed setuptools (no network); --no-deps: only this project.
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(ROOT),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "wheel"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    wheel = next((tmp_path / "wheel").glob("multitask_sentence_transformer-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for module in (
        "configuration_mtl.py",
        "modeling_mtl.py",
        "tasks_mtl.py",
        "layers_mtl.py",
        "inference_mtl.py",
        "validation_mtl.py",
        "io_mtl.py",
        "train.py",
        "push_to_hub.py",
        "multitask_st/__init__.py",
        "multitask_st/default_data/default_train.jsonl",
        "multitask_st/metric_scripts/mtl_retrieval/mtl_retrieval.py",
        "multitask_st/templates/model_card.md",
    ):
        assert module in names, f"{module} missing from the wheel"
    assert not any(name.startswith("tests/") for name in names)
    entry_points = next(name for name in names if name.endswith("entry_points.txt"))
    assert "mtl = multitask_st.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()

    target = tmp_path / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert install.returncode == 0, install.stderr[-2000:]
    env = {**os.environ, "PYTHONPATH": str(target)}
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; sys.modules.pop('modeling_mtl', None); import modeling_mtl, multitask_st;"
            "print(modeling_mtl.__file__)",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert probe.returncode == 0, probe.stderr[-2000:]
    assert probe.stdout.strip().startswith(str(target))


def test_the_dockerfile_copies_every_top_level_module_setup_cfg_installs():
    """`pip install ".[serve]"` in the image needs every module of `py_modules`; the code files that travel with a
    checkpoint are among them (`io_mtl.model_code_files`)."""
    import configparser
    import fnmatch

    from io_mtl import model_code_files

    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    modules = [f"{name}.py" for name in config["options"]["py_modules"].split()]
    assert set(model_code_files()) <= set(modules)
    copies = [line.split()[1:-1] for line in (ROOT / "Dockerfile").read_text().splitlines() if line.startswith("COPY ")]
    patterns = [pattern for line in copies for pattern in line]
    missing = [module for module in modules if not any(fnmatch.fnmatch(module, p) for p in patterns)]
    assert not missing, f"the Dockerfile does not copy {missing}"


def test_the_base_install_has_every_package_the_metrics_import():
    """`pip install .` then `python train.py` trained, then failed at the final evaluation (seqeval was an extra):
    every package a bundled metric script imports is a base requirement."""
    import ast
    import configparser
    import re

    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    required = {
        re.split(r"[<>=!\[ ]", line.strip())[0].lower() for line in config["options"]["install_requires"].split("\n")
    }
    pip_names = {"sklearn": "scikit-learn", "yaml": "pyyaml"}
    imported = set()
    for script in (ROOT / "multitask_st" / "metric_scripts").glob("*/*.py"):
        for node in ast.walk(ast.parse(script.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else []
            imported |= {name.split(".")[0] for name in names}
    third_party = {pip_names.get(name, name) for name in imported if name not in sys.stdlib_module_names}
    assert {"scikit-learn", "scipy", "seqeval"} <= third_party  # the scan sees what the scripts import
    assert third_party <= required, f"metric packages missing from install_requires: {third_party - required}"


@pytest.mark.parametrize(
    "env, options, code, message",
    [
        ({}, [], 2, "--host 0.0.0.0 without an API key serves anyone who can reach it"),
        ({"MTL_NO_API_KEY": "true"}, [], 2, "or --no-api-key (or MTL_NO_API_KEY=1) to serve without"),
        ({"MTL_API_KEY": "k"}, [], 1, "no such model folder"),  # past the key rule: the model is what is missing
        ({"MTL_NO_API_KEY": "1"}, [], 1, "no such model folder"),  # told to serve without a key
        ({}, ["--no-api-key"], 1, "no such model folder"),
        ({}, ["--no-api-key", "--api-key", "k"], 2, "argument --api-key: not allowed with argument --no-api-key"),
    ],
)
def test_the_docker_command_needs_a_key_or_an_explicit_opt_out(env, options, code, message, capsys, monkeypatch):
    """The image listens on 0.0.0.0: its command refuses to start without MTL_API_KEY (before loading anything)
    unless MTL_NO_API_KEY=1 says to serve without one. The Dockerfile's own CMD runs, with its variables filled."""
    from multitask_st.cli import main

    lines = [line for line in (ROOT / "Dockerfile").read_text().splitlines() if not line.lstrip().startswith("#")]
    assert not any("MTL_NO_API_KEY" in line or "MTL_API_KEY" in line for line in lines)  # the image sets neither
    shell, flag, command = json.loads(next(line for line in lines if line.startswith("CMD "))[4:])
    assert (shell, flag) == ("sh", "-c")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for name in ("MTL_API_KEY", "MTL_NO_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    for name, value in {"MODEL": "/nonexistent/model", "PORT": str(port), **env}.items():
        monkeypatch.setenv(name, value)
    argv = shlex.split(os.path.expandvars(command))
    assert argv[:3] == ["exec", "mtl", "serve"] and "--no-api-key" not in argv
    try:
        result = main(argv[2:] + options)
    except SystemExit as exit_:  # argparse's errors
        result = exit_.code
    assert result == code
    stderr = capsys.readouterr().err
    assert message in stderr and len(stderr.strip().splitlines()) == 1, stderr
