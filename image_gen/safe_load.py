"""Loading ``.pt`` checkpoints without running their code: ``torch.load(weights_only=True)``, plus exactly the
classes a known checkpoint format needs. LlamaGen training checkpoints (GPT and VQ) pickle the run's
``argparse.Namespace`` under ``"args"``; that class only rebuilds an attribute bag, so it is allowed by
default. Anything else pickled in a file is refused, unless the caller passes ``trust_pickle=True`` (a full
unpickle: only for files you trust)."""

from __future__ import annotations

import argparse
import contextlib
import os
import pickle
import re
from collections.abc import Sequence
from typing import Any

import torch

LLAMAGEN_GLOBALS: tuple[type, ...] = (argparse.Namespace,)


def safe_torch_load(path: str | os.PathLike[str], allowed: Sequence[Any] = LLAMAGEN_GLOBALS,
                    map_location: str | torch.device = "cpu", trust_pickle: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` with ``allowed`` classes (``torch.serialization.safe_globals``)
    also accepted. Raises RuntimeError naming the file and the refused global when the file pickles anything
    else; ``trust_pickle=True`` loads it with a full unpickle instead."""
    path = os.fspath(path)
    if trust_pickle:
        return torch.load(path, map_location=map_location, weights_only=False)
    safe = getattr(torch.serialization, "safe_globals", None)  # torch >= 2.5
    try:
        with safe(list(allowed)) if safe and allowed else contextlib.nullcontext():
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:  # a refused global (a missing or corrupt file raises as usual)
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        reason = f"it pickles {found.group(1)}" if found else _first_line(err)
        names = ", ".join(f"{a.__module__}.{a.__qualname__}" if isinstance(a, type) else str(a) for a in allowed)
        raise RuntimeError(
            f"torch.load(weights_only=True) refused {path}: {reason}. Only tensors, plain containers"
            f"{f' and {names}' if names else ''} load safely; if you trust this file, load it with "
            "trust_pickle=True (a full unpickle can run arbitrary code)"
        ) from err


def _first_line(err: Exception) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else ""
