"""Training checkpoints: safetensors for tensors, JSON for everything else, written atomically.

A checkpoint is a directory ``checkpoints/step-XXXXXXXX/`` holding ``model.safetensors``,
``optimizer.safetensors`` (AdamW moments and step counts, by parameter index), ``rng.safetensors``
(torch's generator state) and ``trainer_state.json`` (step, counters, optimizer hyperparameters and
a manifest of every file's size and SHA-256). It is written into a temporary directory, flushed to
disk, then renamed into place, and only then does ``checkpoints/latest`` (itself replaced
atomically) point at it: a run killed at any moment leaves the previous checkpoint intact and
never a half-written one under a final name. Loading never unpickles; it checks the manifest
first, so a truncated or altered file gives a clear error instead of garbage.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model

LATEST = "latest"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated or corrupted."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync(path.parent)


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    state = optimizer.state_dict()
    tensors = {}
    for index, per_param in state["state"].items():
        for key, value in per_param.items():
            t = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"{index}.{key}"] = t.detach().cpu().contiguous()
    return tensors, {"param_groups": state["param_groups"]}


def save_checkpoint(
    root: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Write checkpoint ``step`` under ``root`` atomically, point ``latest`` at it, keep the last ``keep``."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".step-{step:08d}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    # 1. tensors
    save_model(model, str(tmp / "model.safetensors"))
    opt_tensors, opt_meta = _optimizer_tensors(optimizer)
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    save_file({"torch_rng": torch.get_rng_state()}, str(tmp / "rng.safetensors"))
    # 2. the manifest last, once every file it describes is complete
    manifest = {}
    for name in ("model.safetensors", "optimizer.safetensors", "rng.safetensors"):
        _fsync(tmp / name)
        manifest[name] = {"bytes": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)}
    state = {**trainer_state, "step": step, "optimizer": opt_meta, "manifest": manifest}
    _write_text_atomic(tmp / "trainer_state.json", json.dumps(state, indent=1))
    # 3. publish: rename into place, then move the pointer
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync(root)
    _write_text_atomic(root / LATEST, final.name + "\n")
    # 4. prune older checkpoints (and temporary directories a killed run left behind)
    done = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".step-*.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    return final


def latest_checkpoint(root: Path) -> Path | None:
    """The directory ``latest`` points at, or None when there is no checkpoint."""
    pointer = root / LATEST
    if not pointer.exists():
        return None
    path = root / pointer.read_text(encoding="utf-8").strip()
    if not path.is_dir():
        raise CheckpointError(f"{pointer} points at {path.name}, which does not exist")
    return path


def verify_checkpoint(path: Path) -> dict[str, Any]:
    """Read ``trainer_state.json`` and check every file against its manifest; return the state."""
    state_file = path / "trainer_state.json"
    try:
        state = json.loads(state_file.read_text(encoding="utf-8"))
        manifest = state["manifest"]
    except (OSError, ValueError, KeyError) as err:
        raise CheckpointError(f"checkpoint {path}: unreadable trainer_state.json ({err})") from err
    for name, want in manifest.items():
        file = path / name
        if not file.exists():
            raise CheckpointError(f"checkpoint {path}: {name} is missing")
        size = file.stat().st_size
        if size != want["bytes"]:
            raise CheckpointError(
                f"checkpoint {path}: {name} has {size} bytes, expected {want['bytes']} "
                "(truncated or replaced)"
            )
        if _sha256(file) != want["sha256"]:
            raise CheckpointError(f"checkpoint {path}: {name} does not match its SHA-256 (corrupted)")
    return state


def load_checkpoint(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None
) -> dict[str, Any]:
    """Restore model, optimizer and RNG from ``path`` after verifying it; return the trainer state."""
    state = verify_checkpoint(path)
    try:
        missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=False)
        if missing or unexpected:
            raise CheckpointError(
                f"checkpoint {path}: model mismatch (missing {sorted(missing)[:5]}, "
                f"unexpected {sorted(unexpected)[:5]})"
            )
        if optimizer is not None:
            tensors = load_file(str(path / "optimizer.safetensors"))
            per_param: dict[int, dict[str, torch.Tensor]] = {}
            for key, value in tensors.items():
                index, name = key.split(".", 1)
                per_param.setdefault(int(index), {})[name] = value
            optimizer.load_state_dict(
                {"state": per_param, "param_groups": state["optimizer"]["param_groups"]}
            )
        torch.set_rng_state(load_file(str(path / "rng.safetensors"))["torch_rng"])
    except SafetensorError as err:
        raise CheckpointError(f"checkpoint {path}: unreadable safetensors file ({err})") from err
    return state
