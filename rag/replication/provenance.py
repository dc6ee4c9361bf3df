"""What produced a result: the commit (``+uncommitted`` when code or configs differ from it), the command line,
the hardware and library versions, and when."""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def git_commit(root: Path = ROOT) -> str:
    """HEAD of the checkout, ``+uncommitted`` when code or configs differ from it; ``unknown`` outside git."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            # code and configs only: exported weights and results are outputs, not what made them
            ["git", "status", "--porcelain", "--", "rag", "conf", "scripts", ":!rag/reference_weights"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        return commit + ("+uncommitted" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def hardware() -> dict:
    """CPU model and count, torch threads and version, the GPU if any, Python."""
    import torch

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
    }


def command_line(prog: str | None = None) -> str:
    """This process's command line as a user would type it (the console script's name, quoted args)."""
    name = prog or Path(sys.argv[0]).name
    return " ".join([name, *(shlex.quote(a) for a in sys.argv[1:])])


def record(command: str) -> dict:
    return {
        "command": command,
        "commit": git_commit(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "hardware": hardware(),
    }
