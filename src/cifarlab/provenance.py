"""What a result was made with: package versions, the git commit of the code (and whether it had uncommitted
changes) when it runs from a checkout, and the device. Written into metrics.json and the HParams session."""

from __future__ import annotations

import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

PACKAGES = ("torch", "lightning", "hydra-core", "cifarlab")
CHECKOUT = Path(__file__).resolve().parents[2]  # the repository root, for an install from a checkout (make)


def git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(CHECKOUT), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name ("cpu" where the system does not say)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), None)
    return model or platform.processor() or "cpu"


def stamp(device: torch.device) -> dict[str, Any]:
    """{python, torch, lightning, hydra-core, cifarlab, git_commit, git_dirty, device_name}; the git fields are None
    outside a git checkout (an installed wheel)."""
    out: dict[str, Any] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    inside = (CHECKOUT / ".git").exists() and git("rev-parse", "--is-inside-work-tree") == "true"
    out["git_commit"] = git("rev-parse", "HEAD") if inside else None
    status = git("status", "--porcelain") if inside else None
    out["git_dirty"] = None if status is None else bool(status)
    out["device_name"] = device_name(device)
    return out
