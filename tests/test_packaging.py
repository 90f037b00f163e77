"""`pip install .` builds and installs the modules and data the package declares."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

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
