"""Checkpoints: everything needed to continue a run exactly, in a directory per step.

Layout of ``<output_dir>/checkpoint-<step>/``::

    model/              the policy's own export (e.g. config + model.safetensors + processor): loadable by path
    optimizer.pt        optimizer state
    scheduler.pt        LR scheduler state
    rng.pt              Python, NumPy, torch (CPU and CUDA) RNG states and the trainer's generators
    trainer_state.json  step, data position (epoch, index), metrics history
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

CHECKPOINT_PREFIX = "checkpoint-"


def rng_state(generators: dict[str, torch.Generator]) -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "generators": {name: g.get_state() for name, g in generators.items()},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], generators: dict[str, torch.Generator]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    for name, generator in generators.items():
        if name in state["generators"]:
            generator.set_state(state["generators"][name])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_training_state(path: Path, optimizer, scheduler, generators: dict[str, torch.Generator], state: dict) -> None:
    path.mkdir(parents=True, exist_ok=True)
    torch.save(optimizer.state_dict(), path / "optimizer.pt")
    torch.save(scheduler.state_dict(), path / "scheduler.pt")
    torch.save(rng_state(generators), path / "rng.pt")
    (path / "trainer_state.json").write_text(json.dumps(state, indent=1))


def load_training_state(path: Path, optimizer, scheduler, generators: dict[str, torch.Generator]) -> dict:
    missing = [n for n in ("optimizer.pt", "scheduler.pt", "rng.pt", "trainer_state.json") if not (path / n).exists()]
    if missing:
        raise FileNotFoundError(f"{path} is not a complete mmrl checkpoint: missing {missing}")
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=False))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    set_rng_state(torch.load(path / "rng.pt", weights_only=False), generators)
    return json.loads((path / "trainer_state.json").read_text())


def load_model_weights(model: torch.nn.Module, directory: Path) -> None:
    """Load ``model.safetensors`` (or its shards, via the index) from ``directory`` into ``model``.

    Every parameter of the model must be found; extra keys in the file are an error too."""
    single = directory / "model.safetensors"
    index = directory / "model.safetensors.index.json"
    if single.exists():
        files = [single]
    elif index.exists():
        shard_names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [directory / name for name in shard_names]
    else:
        raise FileNotFoundError(f"no model.safetensors (or index) in {directory}")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(str(file)))
    if set(state) != set(model.state_dict()) and hasattr(type(model), "from_pretrained"):
        # transformers may save under a different key layout than the module uses (e.g. Qwen2.5-VL's
        # legacy names); its own loader knows the mapping.
        dtype = next(model.parameters()).dtype
        state = type(model).from_pretrained(str(directory), dtype=dtype).state_dict()
    result = model.load_state_dict(state, strict=False)
    # Tied weights (e.g. lm_head = embed_tokens) are saved once; anything else missing is a real mismatch.
    tied = {name for name, p in model.named_parameters(remove_duplicate=False)} - set(dict(model.named_parameters()))
    missing = [k for k in result.missing_keys if k not in tied]
    if missing or result.unexpected_keys:
        raise RuntimeError(
            f"checkpoint weights in {directory} do not match the model: missing {missing[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )


def latest_checkpoint(output_dir: Path) -> Path | None:
    found = [p for p in output_dir.glob(CHECKPOINT_PREFIX + "*") if p.name[len(CHECKPOINT_PREFIX):].isdigit()]
    return max(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):])) if found else None
