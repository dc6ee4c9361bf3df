"""The wheel, as a user installs it: built from a copy of the source tree, installed with ``--no-deps`` into a
fresh virtual environment (``--system-site-packages`` lends it torch and the other dependencies, offline),
then ``rag-train experiment=smoke`` and ``rag-index --help`` run from a folder outside the repository, with
the configs the wheel ships (``rag/conf``) and the venv's copy of ``rag`` rather than the repository's."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
# what a source tree holds that the build must not see: VCS data, build outputs, caches, run outputs
IGNORE = shutil.ignore_patterns(
    ".git", "build", "dist", "*.egg-info", "__pycache__", ".ruff_cache", ".pytest_cache", "outputs", "results"
)


def run(args: list, cwd: Path, env: dict | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, (
        f"{args} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    )
    return proc


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    """A fresh venv with the wheel built from this tree installed; its folder."""
    root = tmp_path_factory.mktemp("wheel")
    src, dist, env_dir = root / "src", root / "dist", root / "venv"
    shutil.copytree(REPO, src, ignore=IGNORE)  # a clean copy: no stale build/ leaks into the wheel
    run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", ".", "-w", dist],
        src,
    )
    (wheel,) = dist.glob("rag-*.whl")
    run([sys.executable, "-m", "venv", "--system-site-packages", env_dir], root)
    run([env_dir / "bin" / "python", "-m", "pip", "install", "--no-deps", "-q", wheel], root)
    return env_dir


def files(folder: Path) -> set[Path]:
    return {p.relative_to(folder) for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts}


def user_env(root: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(
        RAG_HOME=str(root / "home"),
        RAG_OUTPUTS=str(root / "outputs"),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        WANDB_MODE="offline",
        TOKENIZERS_PARALLELISM="false",
        OMP_WAIT_POLICY="PASSIVE",
    )
    return env


def test_the_installed_package_is_the_wheel_with_its_configs(venv, tmp_path):
    site = run(
        [venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path
    )
    code = "import rag, rag.cli; print(rag.__file__); print(rag.cli.CONF_DIR)"
    package, conf = run([venv / "bin" / "python", "-c", code], tmp_path, user_env(tmp_path)).stdout.split()
    installed = Path(site.stdout.strip()) / "rag"
    assert Path(package) == installed / "__init__.py"  # the venv's copy, not the repository's editable one
    assert Path(conf) == installed / "conf"
    src = venv.parent / "src"  # the tree the wheel was built from (the repository may change meanwhile)
    assert files(Path(conf)) == files(src / "conf")
    # the package data setup.cfg lists: the mini-wiki and the reference weights, every file of them
    for data in ("data/miniwiki", "reference_weights"):
        assert files(installed / data) == files(src / "rag" / data) != set(), data


def test_every_console_script_of_the_wheel_loads_from_it(venv, tmp_path):
    code = (
        "import importlib.metadata as m, inspect\n"
        "eps = m.distribution('rag').entry_points.select(group='console_scripts')\n"
        "for ep in eps: print(ep.name, inspect.getfile(ep.load()))"
    )
    lines = run([venv / "bin" / "python", "-c", code], tmp_path, user_env(tmp_path)).stdout.splitlines()
    scripts = dict(line.split() for line in lines)
    assert {"rag-train", "rag-index", "rag-evaluate", "rag-reference"} <= set(scripts)
    assert all(str(venv) in path for path in scripts.values()), scripts
    assert all((venv / "bin" / name).is_file() for name in scripts)


def test_rag_train_smoke_runs_from_the_wheel(venv, tmp_path):
    out = tmp_path / "outputs" / "smoke" / "run"
    run(
        [venv / "bin" / "rag-train", "experiment=smoke", "threads=1", f"hydra.run.dir={out}"],
        tmp_path,
        user_env(tmp_path),
    )
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["global_step"] == 4 and (out / "checkpoints" / "last.ckpt").is_file()
    assert (tmp_path / "home").is_dir()  # the index was built under $RAG_HOME


def test_rag_index_help_runs_from_the_wheel(venv, tmp_path):
    proc = run([venv / "bin" / "rag-index", "--help"], tmp_path, user_env(tmp_path))
    assert "Primary config directory not found" not in proc.stdout + proc.stderr
    assert "index" in proc.stdout
