"""Loading LlamaGen's released GPT checkpoints (C2I / T2I) into :class:`image_gen.gpt.GPT`.

Parameter names in :mod:`image_gen.gpt` follow LlamaGen's ``autoregressive/models/gpt.py``, so a checkpoint's
state dict loads as it is, once wrappers (``model`` / ``module`` / ``state_dict``) and prefixes (DDP's
``module.``, torch.compile's ``_orig_mod.``) are removed and runtime buffers some forks save are dropped.
"""

from __future__ import annotations

import os

import torch

from image_gen.gpt import GPT, GPTConfig
from image_gen.safe_load import safe_torch_load

_IGNORED_KEYS = ("freqs_cis", "causal_mask", "kv_cache")  # runtime tensors some forks save


def _read_state_dict(path: str | os.PathLike, trust_pickle: bool) -> dict:
    path = os.fspath(path)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    # weights_only, plus the argparse.Namespace of training args LlamaGen checkpoints carry under "args"
    return safe_torch_load(path, trust_pickle=trust_pickle)


def load_llamagen_checkpoint(
    path_or_state_dict: str | os.PathLike | dict, config: GPTConfig, trust_pickle: bool = False
) -> GPT:
    """Build a :class:`GPT` for ``config`` holding LlamaGen weights (fp32, on CPU, in eval mode).

    Accepts a ``.pt``/``.pth``/``.safetensors`` path or an already-loaded dict. A ``.pt`` file is read with
    ``weights_only=True`` (its pickled ``argparse.Namespace`` of training args allowed); a file pickling
    any other class is refused unless ``trust_pickle=True`` (only for files you trust). The state dict may be
    top level or under ``"model"``, ``"module"`` or ``"state_dict"``, and ``module.``/``_orig_mod.``
    prefixes (DDP, torch.compile) are stripped. Raises ``ValueError`` naming every missing,
    unexpected or wrongly-shaped key, since a silently half-loaded generator just produces noise.
    """
    sd = path_or_state_dict
    if not isinstance(sd, dict):
        sd = _read_state_dict(sd, trust_pickle)
    sd = next((sd[k] for k in ("model", "module", "state_dict") if isinstance(sd.get(k), dict)), sd)
    clean = {}
    for k, v in sd.items():
        k = k.removeprefix("module.").removeprefix("_orig_mod.")
        if not any(part in k for part in _IGNORED_KEYS):
            clean[k] = v
    with torch.device("meta"):  # skip the random init of up to billions of weights
        model = GPT(config)
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(clean)), sorted(set(clean) - set(expected))
    shapes = [
        f"{k}: checkpoint {tuple(clean[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(clean) & set(expected))
        if clean[k].shape != expected[k].shape
    ]
    if missing or unexpected or shapes:
        raise ValueError(
            f"LlamaGen checkpoint does not fit GPTConfig({config.model_type}, dim={config.dim}, "
            f"n_layer={config.n_layer}, block_size={config.block_size}):\n  missing keys: {missing}\n"
            f"  unexpected keys: {unexpected}\n  shape mismatches: {shapes}"
        )
    copy = isinstance(path_or_state_dict, dict)  # never alias the caller's tensors
    model.load_state_dict({k: v.to("cpu", torch.float32, copy=copy) for k, v in clean.items()}, assign=True)
    return model.eval()
