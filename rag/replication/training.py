"""Resumable ``rag-train`` runs in fixed folders: the reference model's stages and the studies' trained cells.

A run folder holds Hydra's ``.hydra/``, ``checkpoints/last.ckpt`` (written every ``last_checkpoint`` steps),
``csv/`` logs and, once finished, ``metrics.json``. :func:`train_run` skips a finished run, resumes an
unfinished one from the newer of ``last.ckpt`` / ``interrupted.ckpt`` (so stopping loses minutes at most),
and continues a finished one that is asked for more steps (``trainer.max_steps=N`` among the overrides).
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from rag.replication.provenance import ROOT


def last_checkpoint(folder: Path) -> Path:
    return Path(folder) / "checkpoints" / "last.ckpt"


def is_finished(folder: Path) -> bool:
    return (Path(folder) / "metrics.json").is_file()


def requested_steps(overrides: Sequence[str]) -> int | None:
    """The last ``trainer.max_steps=N`` among ``overrides``, if any."""
    steps = [o.split("=", 1)[1] for o in overrides if o.lstrip("+").startswith("trainer.max_steps=")]
    return int(steps[-1]) if steps else None


log = logging.getLogger(__name__)


def train_run(
    folder: Path,
    overrides: Sequence[str],
    *,
    name: str | None = None,
    test: bool = False,
    log: Callable[[str], None] = log.info,
) -> Path:
    """Train ``rag-train <overrides>`` into ``folder`` (skip / resume / continue as the module says).

    Runs in a subprocess (``python -m rag.cli.train``) so that each run's Hydra app, threads and memory are
    its own; its output streams to this process's. Returns the path of the run's ``last.ckpt``.
    """
    folder = Path(folder).resolve()
    name = name or folder.name
    overrides = list(overrides)
    done = folder / "metrics.json"
    if done.is_file():
        finished_at = json.loads(done.read_text()).get("global_step", 0)
        wanted = requested_steps(overrides)
        if wanted is None or wanted <= finished_at:
            log(f"{name}: finished earlier at step {finished_at} ({done}), skipped")
            return last_checkpoint(folder)
        # a longer run asked of a finished one: continue it from its last checkpoint
        log(f"{name}: finished at step {finished_at}; continuing to trainer.max_steps={wanted}")
        done.unlink()
    candidates = [folder / "checkpoints" / n for n in ("last.ckpt", "interrupted.ckpt")]
    existing = [c for c in candidates if c.is_file()]
    resume = max(existing, key=lambda c: c.stat().st_mtime) if existing else None
    args = list(overrides)
    if resume is not None:
        args.append(f"ckpt_path={resume}")
        log(f"{name}: resuming from {resume}")
    cmd = [
        sys.executable,
        "-m",
        "rag.cli.train",
        *args,
        f"test={str(test).lower()}",
        f"hydra.run.dir={folder}",
    ]
    log(f"{name}: rag-train {' '.join(cmd[3:])}")
    started = time.time()
    subprocess.run(cmd, check=True, cwd=ROOT)
    log(f"{name}: done in {time.time() - started:.0f} s")
    if not done.is_file():
        raise RuntimeError(f"{name}: rag-train ended without writing {done}")
    return last_checkpoint(folder)
