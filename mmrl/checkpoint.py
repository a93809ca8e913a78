"""Checkpoints: everything needed to continue a run exactly, written so that a crash never leaves a
directory that looks like a checkpoint but is not one.

Layout of ``<output_dir>/checkpoint-<step>/``::

    model/                 the policy's own export (config + weights + processor): loadable by path; for a
                           LoRA run the adapter (adapter_config.json naming the base + adapter weights)
    reference/             the KL reference model's weights (only when the run has a separate one, not for
                           LoRA's adapter-disabled base; hard-linked from the previous checkpoint unless it is
                           refreshed, algorithm.ref_sync_steps)
    optimizer.pt           optimizer state (main process; identical on every process under DDP)
                           (under FSDP gathered from every process first, by parameter name)
    optimizer-rank-<r>.pt  instead, under DeepSpeed ZeRO, which shards the optimizer state: each process's
                           own part (resume with the same number of processes)
    scheduler.pt           LR scheduler state
    rank-<r>.pt            per process: Python / NumPy / torch (CPU, CUDA) RNG states, the trainer's generators
    rank-<r>.json          per process: the prompt sampler's position (epoch, index, skipped, SRPO history,
                           stage), reward-fault counts, components' memories (dynamic sampling, GFPO adaptive k)
    trainer_state.json     rollout step, optimizer step, run facts (e.g. accuracy before RL), monitor states
    manifest.json          size and SHA-256 of every file above; written last

and ``<output_dir>/latest``, a one-line file naming the newest complete checkpoint.

How a save stays crash-safe: everything is written into ``.tmp-checkpoint-<step>/`` and fsynced; the
manifest is written last; the directory is renamed to ``checkpoint-<step>`` (an atomic rename on POSIX)
and only then is ``latest`` replaced (write + rename) and old checkpoints beyond ``save_total_limit``
removed. A kill at any point leaves either the previous checkpoint with ``latest`` pointing at it, or the
new one complete. Loading verifies the manifest: a missing, truncated or altered file is an error naming it.

Every ``.pt`` file holds tensors, numbers, strings, lists and dicts only, so it loads with
``torch.load(weights_only=True)``: resuming from someone else's checkpoint cannot run code. The one addition:
DeepSpeed's optimizer state holds a few of DeepSpeed's own plain-data objects (its loss scaler), admitted by
name when its shards are loaded (:func:`load_optimizer_shard`); any other class is refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import logging
import os
import random
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from mmrl.processes import load_full_state_dict, own_class, whole_parameters

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
TMP_PREFIX = ".tmp-" + CHECKPOINT_PREFIX
TRASH_PREFIX = ".trash-" + CHECKPOINT_PREFIX
MANIFEST = "manifest.json"
LATEST = "latest"
REFERENCE_DIR = "reference"
REFERENCE_FILE = "model.safetensors"
ADAPTER_FILE = "adapter_model.safetensors"  # a PEFT (LoRA) model's checkpoint: the adapter only


class CheckpointError(RuntimeError):
    """A checkpoint that is incomplete, damaged, or does not fit the run resuming from it."""


# ---------------------------------------------------------------------------------------------- RNG


def rng_state(generators: dict[str, torch.Generator]) -> dict[str, Any]:
    """Every random stream of this process, as tensors and plain numbers (``weights_only``-loadable)."""
    version, mt_state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": version, "state": torch.tensor(mt_state, dtype=torch.int64),
                   "gauss": gauss},
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
        "generators": {name: g.get_state() for name, g in generators.items()},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], generators: dict[str, torch.Generator]) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached"]))
    torch.set_rng_state(state["torch"])
    for name, generator in generators.items():
        if name in state["generators"]:
            generator.set_state(state["generators"][name])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------- files


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some filesystems do not allow opening a directory
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(root: Path, step: int) -> None:
    """fsync every file under ``root``, then write ``manifest.json`` (sizes + SHA-256) and fsync it."""
    entries = {}
    for path in _files(root):
        _fsync_file(path)
        entries[path.relative_to(root).as_posix()] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    for directory in sorted({p.parent for p in _files(root)} | {root}, key=lambda p: len(p.parts), reverse=True):
        _fsync_dir(directory)
    manifest = root / MANIFEST
    manifest.write_text(json.dumps({"format": 1, "step": step, "files": entries}, indent=1))
    _fsync_file(manifest)
    _fsync_dir(root)


def verify_checkpoint(root: Path) -> None:
    """Raise :class:`CheckpointError` naming the first file that is missing, truncated or altered."""
    manifest = root / MANIFEST
    if not manifest.is_file():
        raise CheckpointError(f"{root} has no {MANIFEST}: the save did not finish (or it is not an mmrl checkpoint)")
    try:
        entries = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError) as exc:
        raise CheckpointError(f"{manifest} is damaged ({exc})") from None
    for name, meta in entries.items():
        path = root / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint file {path} is missing")
        if path.stat().st_size != meta["size"]:
            raise CheckpointError(f"checkpoint file {path} has {path.stat().st_size} bytes, the manifest says "
                                  f"{meta['size']}: truncated or replaced")
        if _sha256(path) != meta["sha256"]:
            raise CheckpointError(f"checkpoint file {path} is damaged: its SHA-256 does not match the manifest")


def step_of(path: Path) -> int | None:
    suffix = path.name[len(CHECKPOINT_PREFIX):]
    return int(suffix) if path.name.startswith(CHECKPOINT_PREFIX) and suffix.isdigit() else None


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints (with a manifest) in ``output_dir``, oldest first."""
    found = [p for p in Path(output_dir).glob(CHECKPOINT_PREFIX + "*")
             if p.is_dir() and step_of(p) is not None and (p / MANIFEST).is_file()]
    return sorted(found, key=step_of)


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The checkpoint ``latest`` names, else the newest complete one; ``None`` if there is none."""
    output_dir = Path(output_dir)
    pointer = output_dir / LATEST
    if pointer.is_file():
        target = output_dir / pointer.read_text().strip()
        if (target / MANIFEST).is_file():
            return target
        logger.warning("%s names %s, which is not a complete checkpoint; using the newest complete one",
                       pointer, target.name)
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def resolve_resume(spec: str, output_dir: Path) -> Path | None:
    """``"latest"`` → the newest checkpoint of ``output_dir`` (``None``: none yet, start from scratch);
    any other value is a checkpoint directory (or a run directory, whose latest checkpoint is used)."""
    if spec == "latest":
        return latest_checkpoint(output_dir)
    path = Path(spec)
    if not path.is_dir():
        raise FileNotFoundError(f"resume_from={spec!r} is not a directory (use 'latest' or a checkpoint-N folder)")
    if not (path / MANIFEST).is_file() and step_of(path) is None:
        inner = latest_checkpoint(path)  # a run's output directory
        if inner is None:
            raise CheckpointError(f"resume_from={spec!r} holds no complete checkpoint")
        return inner
    return path


# ---------------------------------------------------------------------------------------------- save / load


def staging_dir(output_dir: Path, step: int) -> Path:
    return Path(output_dir) / f"{TMP_PREFIX}{step}"


def remove_stale_saves(output_dir: Path) -> None:
    """Delete what a killed save left behind (staging and swap directories); never a complete checkpoint."""
    output_dir = Path(output_dir)
    for stale in [*output_dir.glob(TMP_PREFIX + "*"), *output_dir.glob(TRASH_PREFIX + "*")]:
        if stale.is_dir():
            logger.warning("removing %s, left by a save that did not finish", stale)
            shutil.rmtree(stale, ignore_errors=True)


def begin_save(output_dir: Path, step: int) -> Path:
    """Create an empty staging directory for checkpoint ``step`` (removing a stale one)."""
    staging = staging_dir(output_dir, step)
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    return staging


def save_rank_state(staging: Path, rank: int, generators: dict[str, torch.Generator], state: dict) -> None:
    """This process's random streams (``rank-<r>.pt``) and its JSON-able state, e.g. the sampler's position
    and its counters (``rank-<r>.json``): under ``accelerate launch`` every process has its own."""
    torch.save(rng_state(generators), staging / f"rank-{rank}.pt")
    (staging / f"rank-{rank}.json").write_text(json.dumps(state, indent=1))


def save_main_state(staging: Path, optimizer, scheduler, trainer_state: dict,
                    reference: torch.nn.Module | None = None, previous: Path | None = None) -> None:
    """The state every process shares. ``optimizer``: the optimizer, or its state already gathered (a dict,
    FSDP), or None when each process saves its own part (:func:`save_optimizer_shard`)."""
    if optimizer is not None:
        torch.save(optimizer if isinstance(optimizer, dict) else optimizer.state_dict(), staging / "optimizer.pt")
    torch.save(scheduler.state_dict(), staging / "scheduler.pt")
    (staging / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1))
    if reference is not None:
        save_reference(staging / REFERENCE_DIR, reference, previous)


def save_reference(directory: Path, reference: torch.nn.Module, previous: Path | None) -> None:
    """A frozen reference never changes: hard-link the previous checkpoint's copy when there is one (no
    extra disk, and deleting the old checkpoint keeps the file), else write it. A refreshed reference
    (``algorithm.ref_sync_steps``) changes, so the caller passes ``previous=None`` and it is written."""
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / REFERENCE_FILE
    source = None if previous is None else previous / REFERENCE_DIR / REFERENCE_FILE
    if source is not None and source.is_file():
        try:
            os.link(source, target)
            return
        except OSError:
            shutil.copy2(source, target)
            return
    state = {k: v.detach().contiguous().cpu() for k, v in reference.state_dict().items()}
    save_file(_dedupe_shared(state), str(target))


def _dedupe_shared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors sharing memory (tied weights): keep them as independent copies."""
    seen: dict[int, str] = {}
    out = {}
    for key, value in state.items():
        ptr = value.data_ptr()
        out[key] = value.clone() if ptr in seen else value
        seen.setdefault(ptr, key)
    return out


def finish_save(staging: Path, step: int, save_total_limit: int | None) -> Path:
    """Manifest, atomic rename to ``checkpoint-<step>``, ``latest`` pointer, rotation. Main process only."""
    write_manifest(staging, step)
    final = staging.parent / f"{CHECKPOINT_PREFIX}{step}"
    if final.exists():  # re-saving a step (e.g. a preempted run saved it already): swap atomically-ish
        trash = staging.parent / f"{TRASH_PREFIX}{step}"
        if trash.exists():
            shutil.rmtree(trash)
        final.rename(trash)
        staging.rename(final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        staging.rename(final)
    _fsync_dir(final.parent)
    pointer_tmp = final.parent / f".{LATEST}.tmp"
    pointer_tmp.write_text(final.name + "\n")
    _fsync_file(pointer_tmp)
    os.replace(pointer_tmp, final.parent / LATEST)
    _fsync_dir(final.parent)
    if save_total_limit:
        for old in list_checkpoints(final.parent)[:-save_total_limit]:
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
                logger.info("removed old checkpoint %s (save_total_limit=%d)", old, save_total_limit)
    return final


def load_rank_state(path: Path, rank: int, generators: dict[str, torch.Generator]) -> dict:
    """Restore this process's RNG streams; return the state it saved with them."""
    rng_file, sampler_file = path / f"rank-{rank}.pt", path / f"rank-{rank}.json"
    if not rng_file.is_file():
        ranks = sorted(p.stem for p in path.glob("rank-*.pt"))
        raise CheckpointError(f"{path} has no state for process {rank} (it has {ranks}): it was written by a run "
                              "with fewer processes; resume with the same number of processes")
    set_rng_state(torch.load(rng_file, weights_only=True), generators)
    return json.loads(sampler_file.read_text())


def load_trainer_state(path: Path) -> dict:
    return json.loads((path / "trainer_state.json").read_text())


def load_main_state(path: Path, load_optimizer, scheduler) -> None:
    """The shared optimizer state, handed to ``load_optimizer`` (``None``: loaded per process,
    :func:`load_optimizer_shard`), and the scheduler's."""
    if load_optimizer is not None:
        if not (path / "optimizer.pt").is_file():
            raise CheckpointError(f"{path} has no optimizer.pt: it was written under a backend that shards the "
                                  "optimizer state (optimizer-rank-<r>.pt); resume under the same backend")
        load_optimizer(torch.load(path / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))


OPTIMIZER_SHARD = "optimizer-rank-{rank}.pt"


def save_optimizer_shard(staging: Path, rank: int, optimizer) -> None:
    """This process's part of DeepSpeed ZeRO's sharded optimizer state, as the engine returns it."""
    torch.save(optimizer.state_dict(), staging / OPTIMIZER_SHARD.format(rank=rank))


def load_optimizer_shard(path: Path, rank: int) -> Any:
    """This process's part of the optimizer state saved by :func:`save_optimizer_shard`.

    Loaded with ``weights_only=True``; the classes the file names beyond plain data must belong to DeepSpeed
    (its optimizer state pickles its loss scaler) and are admitted by name — any other class is an error."""
    file = path / OPTIMIZER_SHARD.format(rank=rank)
    if not file.is_file():
        raise CheckpointError(f"{path} has no {file.name}: it was written under a backend that does not shard the "
                              "optimizer state (optimizer.pt), or by fewer processes; resume the way it was run")
    names = torch.serialization.get_unsafe_globals_in_checkpoint(str(file))
    if foreign := [name for name in names if not name.startswith("deepspeed.")]:
        raise CheckpointError(f"{file} names classes outside DeepSpeed, refused: {foreign}")
    classes = []
    for name in names:
        module, _, attribute = name.rpartition(".")
        classes.append(getattr(importlib.import_module(module), attribute))
    with torch.serialization.safe_globals(classes):
        return torch.load(file, weights_only=True)


def load_reference(path: Path, reference: torch.nn.Module) -> None:
    file = path / REFERENCE_DIR / REFERENCE_FILE
    if not file.is_file():
        raise CheckpointError(f"{path} has no {REFERENCE_DIR}/{REFERENCE_FILE}, but this run has a KL reference "
                              "model: it was saved by a run without one")
    result = reference.load_state_dict(load_file(str(file)), strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(f"reference weights in {file} do not fit the model: missing {result.missing_keys[:5]}, "
                              f"unexpected {result.unexpected_keys[:5]}")


def load_model_weights(model: torch.nn.Module, directory: Path) -> None:
    """Load ``model.safetensors`` (or its shards, via the index) from ``directory`` into ``model``; for a
    PEFT model (LoRA), its adapter's weights from ``adapter_model.safetensors`` (the base is not saved).
    Under FSDP pass the sharded model as the trainer holds it (FSDP1: the root wrapper); every process then
    calls this together and keeps its own shards.

    Every parameter of the model must be found; extra keys in the file are an error too."""
    if hasattr(model, "peft_config"):
        _load_adapter_weights(model, directory)
        return
    single = directory / "model.safetensors"
    if (directory / ADAPTER_FILE).exists() and not single.exists():
        raise RuntimeError(f"{directory} holds a LoRA adapter ({ADAPTER_FILE}), but this run's model has none: "
                           "resume with the same model.lora")
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
    module = getattr(model, "module", model) if type(model).__name__ == "FullyShardedDataParallel" else model
    if set(state) != set(model.state_dict()) and hasattr(own_class(module), "from_pretrained"):
        # transformers may save under a different key layout than the module uses (e.g. Qwen2.5-VL's
        # legacy names); its own loader knows the mapping.
        # Under DeepSpeed ZeRO-3 transformers builds that copy partitioned (empty tensors): gather it first.
        dtype = next(model.parameters()).dtype
        legacy = own_class(module).from_pretrained(str(directory), dtype=dtype)
        with whole_parameters(legacy):
            state = {key: value.clone() for key, value in legacy.state_dict().items()}
    result = load_full_state_dict(model, state)  # under FSDP: each process keeps its shards
    if result is None:
        result = model.load_state_dict(state, strict=False)
    # Tied weights (e.g. lm_head = embed_tokens) are saved once; anything else missing is a real mismatch.
    tied = {name for name, p in model.named_parameters(remove_duplicate=False)} - set(dict(model.named_parameters()))
    missing = [k for k in result.missing_keys if k not in tied]
    if missing or result.unexpected_keys:
        raise RuntimeError(
            f"checkpoint weights in {directory} do not match the model: missing {missing[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )


def _load_adapter_weights(model: torch.nn.Module, directory: Path) -> None:
    """The adapter of a PEFT model, as its ``save_pretrained`` wrote it: every adapter tensor, no other."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    file = directory / ADAPTER_FILE
    if not file.is_file():
        raise RuntimeError(f"no {ADAPTER_FILE} in {directory}: it was saved without a LoRA adapter, and this "
                           "run's model has one (model.lora)")
    state = load_file(str(file))
    expected = set(get_peft_model_state_dict(model))
    if set(state) != expected:
        raise RuntimeError(f"adapter weights in {file} do not match the model's adapter: missing "
                           f"{sorted(expected - set(state))[:5]}, unexpected {sorted(set(state) - expected)[:5]}")
    set_peft_model_state_dict(model, state)


@contextlib.contextmanager
def isolated_rng(seed: int) -> Iterator[None]:
    """Run a block (an evaluation, a sample grid) on its own seeded random streams and restore every
    global stream afterwards, so that it neither depends on nor disturbs the training run's randomness:
    a run resumed from a checkpoint then draws exactly what the uninterrupted run drew."""
    saved = rng_state({})
    try:
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
        yield
    finally:
        set_rng_state(saved, {})
