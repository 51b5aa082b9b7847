"""The environment record every results file carries, so anyone can rerun a benchmark."""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import psutil

REPO_ROOT = Path(__file__).resolve().parents[2]


def _cpuinfo() -> dict:
    """CPU model and flags from /proc/cpuinfo (Linux); empty elsewhere."""
    path = Path("/proc/cpuinfo")
    if not path.is_file():
        return {}
    out: dict = {}
    for line in path.read_text(errors="replace").splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and "cpu_model" not in out:
            out["cpu_model"] = value.strip()
        elif key == "flags" and "cpu_flags" not in out:
            out["cpu_flags"] = value.split()
    return out


def git_commit() -> str | None:
    """HEAD of the repository this code runs from, with '-dirty' if tracked files changed."""
    try:
        commit = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("-dirty" if dirty else "")


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:  # noqa: BLE001 - an absent optional package is just "not installed"
        return None


ISA_CAP_VARIABLES = ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")


def machine_record() -> dict:
    """Cores, CPU model and flags, memory, GPUs, Python/torch/transformers versions."""
    import torch

    from engine.loading.kernels import cpu_features

    record = {
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_bytes": psutil.virtual_memory().total,
        **_cpuinfo(),
        "cuda": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available()
        else [],
        "cpu_features": cpu_features(),
        # ISA caps in force (ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2: this host run as an AVX2-only CPU)
        "isa_caps": {name: os.environ[name] for name in ISA_CAP_VARIABLES if name in os.environ},
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "sklearn": _version("sklearn"),
    }
    return record


def command_line(argv: list[str] | None = None) -> str:
    """The command to rerun, on one line: `specdecpp` plus the arguments given, shell-quoted (an argument with
    a line break in bash's $'...' form, e.g. a stop string)."""
    return " ".join(_quoted(a) for a in ["specdecpp", *(sys.argv[1:] if argv is None else argv)])


def _quoted(arg: str) -> str:
    if "\n" not in arg:
        return shlex.quote(arg)
    return "$'" + arg.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


def results_meta(argv: list[str] | None, dataset: str, extra: dict) -> dict:
    """The start of every results file's meta: how to rerun it, from which commit, when and where."""
    return {
        "command": command_line(argv),
        "git_commit": git_commit(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine_record(),
        "dataset": dataset,
        **extra,
    }
