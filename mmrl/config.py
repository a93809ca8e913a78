"""Typed configuration: dataclasses loaded from YAML, with ``key.sub=value`` CLI overrides.

Unknown keys are errors that name the nearest valid key in any section, or the equivalent of a name
brought from TRL / EasyR1 / verl (``learning_rate`` → ``optim.lr``; see :mod:`mmrl.config_checks`).
Values are checked against the dataclass field types (int, float, bool, str, Optional, list, fixed-length
tuple, dict, nested dataclasses); ranges, names and paths are checked after loading by
:func:`mmrl.config_checks.validate_config`. The sections that depend on the task (``model``, ``data``,
``cold_start``, ``masking``) are typed by the task itself: the loader is given their dataclasses by
whoever wires tasks together (the CLI), so ``mmrl`` never imports a task.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import logging
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mmrl.policy import Sampling

# --------------------------------------------------------------------------------------------------
# Trainer configuration (task-agnostic)
# --------------------------------------------------------------------------------------------------

logger = logging.getLogger(__name__)


@dataclass
class RewardConfig:
    name: str  # registry name or "path/to/file.py:function"
    weight: float = 1.0
    # Keyword arguments: for a model-backed reward (clip_score, vlm_judge, hpsv2, ...) its constructor's
    # (e.g. {model: openai/clip-vit-base-patch32}); for a plain function, extra keywords of every call.
    args: dict = field(default_factory=dict)


@dataclass
class AlgorithmConfig:
    # The objective (mmrl.objectives.OBJECTIVES): ppo | gspo | gspo_token | gmpo | cispo | sapo | dpo.
    # `preset: <name>` brings each one's published clip range and aggregation.
    objective: str = "ppo"
    # How per-token losses become one number (mmrl.algorithms.LOSS_AGGREGATIONS), normalised by the whole
    # mini-batch's counts over every process: grpo (mean over sequences of token means) | bnpo, dapo (mean
    # over tokens) | dr_grpo (token sum / (sequences × max_new_tokens)).
    loss_type: str = "grpo"
    advantage_estimator: str = "grpo"  # grpo | rloo | reinforce_pp | reinforce_pp_baseline (mmrl.advantages)
    adv_scale: str = "group"  # grpo estimator: group | batch | none (Dr. GRPO)
    epsilon: float = 0.2  # PPO clip, lower side (and upper unless epsilon_high is set); gmpo: on log r
    epsilon_high: float | None = None  # DAPO clip-higher, e.g. 0.28; cispo: IS-weight cap = 1 + epsilon_high
    dual_clip: float | None = None  # ppo: cap −A·r at −A·C for A < 0 (verl's clip_ratio_c, e.g. 3.0)
    delta: float | None = None  # ppo: TRL's two-sided clip, ratio <= delta (e.g. 1.5)
    tau_pos: float = 1.0  # sapo: gate temperature for A > 0
    tau_neg: float = 1.05  # sapo: gate temperature for A <= 0
    beta: float = 0.0  # weight of KL to the frozen reference model; 0 = no reference model
    kl_estimator: str = "k3"
    kl_clamp: bool = False  # verl's clamps on k3 (log-ratio to ±20, estimate to [-10, 10])
    kl_in_reward: bool = False  # β·KL as a per-token reward penalty (verl's use_kl_in_reward) instead of a loss term
    ref_sync_steps: int = 0  # every N optimizer updates π_ref ← α·π + (1−α)·π_ref (TRL's sync_ref_model; 0 = frozen)
    ref_sync_alpha: float = 0.6  # α of that mix (TRL's ref_model_mixup_alpha)
    # Which weights sample the rollouts: policy | reference (semi-online DPO: the generator is synced with
    # the policy every ref_sync_steps updates, together with the reference).
    rollout_model: str = "policy"
    # dpo (mmrl.preference): beta, loss (sigmoid | ipo), cDPO label smoothing, NLL on the chosen (TRL's rpo_alpha)
    dpo_beta: float = 0.1
    dpo_loss: str = "sigmoid"
    dpo_label_smoothing: float = 0.0
    dpo_nll_coef: float = 0.0
    # dpo's pairs: sampled (best vs worst of each group) | dataset (each record's `chosen` / `rejected`)
    pairs: str = "sampled"
    entropy_coef: float = 0.0  # entropy bonus: − c·H of the full token distribution (verl's entropy_coeff)
    ppo_epochs: int = 1  # μ: optimisation passes over each rollout batch


@dataclass
class PAPOConfig:
    """PAPO's implicit perception loss: loss = policy loss + β·KL_ref − γ·KL_prcp + η₁·H_orig + η₂·H_mask."""

    enabled: bool = False
    gamma: float = 0.02  # paper: 0.02 (GRPO, 3B), 0.01 with DAPO or without KL_ref; >= 0.04 collapses
    gamma_schedule: str = "constant"  # constant | linear (anneal to 0)
    anneal_fraction: float = 1.0  # linear: γ reaches 0 after this fraction of max_steps
    kl_estimator: str = "k3"  # k3 (every published run; our default) | k1 (official dataclass default) | k2
    kl_token_clip: float | None = None  # optional upper clip of the per-token perception KL in the loss
    masked_grad: bool = False  # False (paper): masked log-probs from a no-grad forward; True: with gradient
    eta_orig: float = 0.0  # η₁: double-entropy weight, sampled-token entropy under the original image
    eta_mask: float = 0.0  # η₂: under the masked image (has a gradient only with masked_grad: true)
    monitor_window: int = 10  # steps per window for the KL-hacking warnings


@dataclass
class FiltersConfig:
    """Reward shaping and group filters between the rewards and the advantages (mmrl.components)."""

    overlong_cache_length: int = 0  # DAPO soft overlong penalty over the last L tokens before the limit (0 = off)
    overlong_penalty_factor: float = 1.0  # the penalty at the limit
    mask_truncated: bool = False  # completions that hit the length limit leave the loss (TRL)
    dynamic_sampling: bool = False  # DAPO: drop groups with equal rewards, generate more until the batch is full
    max_sample_batches: int = 10  # dynamic sampling: at most this many generation rounds per step
    dynamic_sampling_reward: str | None = None  # judge "all equal" on this reward (verl's metric: acc); None = total
    top_entropy_fraction: float | None = None  # train on the top q of tokens by entropy (80/20 paper: 0.2)
    gfpo_k: int | None = None  # GFPO: keep the k best of each group (None = off); 1 <= k <= group_size
    gfpo_metric: str = "length"  # length (shortest) | reward_per_token
    gfpo_adaptive: bool = False  # k per prompt from its difficulty (gfpo_k_per_bucket, hardest first)
    gfpo_k_per_bucket: list[int] = field(default_factory=lambda: [8, 8, 6, 4])  # paper: of G = 16
    gfpo_quantiles: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75])
    # SRPO history resampling: prompts whose every rollout was correct in an epoch skip the next epoch
    history_resampling: bool = False
    history_reward: str = "accuracy"  # the reward (a name in rewards) that judges "correct"
    history_threshold: float = 1.0  # a rollout is correct when that reward >= threshold


@dataclass
class MismatchConfig:
    """Rollout/training mismatch correction (TIS / MIS); needs a policy that records sampler log-probs."""

    mode: str | None = None  # token_truncate | token_mask | sequence_truncate | sequence_mask (None = off)
    cap: float = 2.0  # C: truncation cap (TIS paper, verl; TRL uses 3.0)
    low: float | None = None  # MIS lower bound on the ratio (None = none)
    high: float | None = None  # MIS upper bound (None = cap)


@dataclass
class OptimConfig:
    lr: float = 1e-6
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    max_grad_norm: float = 1.0
    warmup_steps: int = 0
    scheduler: str = "constant"  # any transformers scheduler name: constant | linear | cosine | ...


@dataclass
class LoggingConfig:
    report_to: list[str] = field(default_factory=lambda: ["jsonl"])  # jsonl | tensorboard | wandb
    project: str = "mmrl"  # W&B project
    run_name: str | None = None
    log_completions: int = 2  # completions printed into the log every logging step (0 = none)
    progress_bar: bool = True


@dataclass
class EvalConfig:
    reward: str = "accuracy"  # reward whose mean over the held-out set is reported as accuracy
    before_training: bool = True
    after_training: bool = True
    every_steps: int = 0  # 0 = only before/after
    max_new_tokens: int | None = None  # default: sampling.max_new_tokens
    temperature: float = 0.0  # 0 = greedy decoding; > 0 samples with the training top_p/top_k
    batch_size: int = 32


@dataclass
class TrainConfig:
    task: str = "vision"
    output_dir: str = "runs/mmrl"
    seed: int = 0
    max_steps: int = 100  # rollout steps
    prompts_per_step: int = 8  # P: prompts per rollout step (per process)
    group_size: int = 8  # G: completions per prompt
    mini_batch_size: int | None = None  # samples per optimizer update; default all P*G of the rollout
    micro_batch_size: int = 8  # samples per forward/backward; gradient accumulation fills a mini-batch
    logprob_chunk_size: int = 1024  # tokens per slice when projecting hidden states to fp32 logits
    gradient_checkpointing: bool = False
    mixed_precision: str = "auto"  # auto (bf16 on a GPU that supports it) | no | bf16 | fp16
    save_steps: int = 0  # checkpoint every N rollout steps (0 = only at the end, or when preempted)
    save_final: bool = True
    save_total_limit: int | None = None  # keep only the newest K checkpoints (None = keep all)
    # "latest" (the newest checkpoint in output_dir; starts from scratch if there is none yet) or a
    # checkpoint directory. The CLI's `--resume [latest|DIR]` sets it.
    resume_from: str | None = None
    # Optimizer updates with a NaN/inf loss or gradient are skipped (counted); this many in a row stop the run.
    max_consecutive_skips: int = 10
    reward_timeout: float | None = 300.0  # seconds per reward-function call (judge models included); None = no limit
    rewards: list[RewardConfig] = field(default_factory=lambda: [RewardConfig("accuracy")])
    sampling: Sampling = field(default_factory=Sampling)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    papo: PAPOConfig = field(default_factory=PAPOConfig)
    filters: FiltersConfig = field(default_factory=FiltersConfig)
    mismatch: MismatchConfig = field(default_factory=MismatchConfig)
    preset: str | None = None  # a named set of defaults (mmrl.config.PRESETS) under this file's values
    # Task-typed sections; their dataclasses come from the task (see module docstring).
    model: Any = None
    data: Any = None
    cold_start: Any = None
    masking: Any = None  # how a task builds the counterfactual (e.g. masked-image) view for PAPO


TASK_SECTIONS = ("model", "data", "cold_start", "masking")

# Named defaults (``preset: NAME``): the algorithm settings of a paper, under whatever the file sets.
PRESETS: dict[str, dict] = {
    "grpo": {"algorithm": {"loss_type": "grpo", "adv_scale": "group", "epsilon": 0.2}},
    # DAPO (Yu et al., 2025): token-level loss, clip-higher, no KL, dynamic sampling (verl's recipe bounds it
    # at 10 generation rounds). Its overlong shaping depends on the length limit: set
    # filters.overlong_cache_length yourself (the paper: the last 4096 of 20480 tokens).
    "dapo": {"algorithm": {"loss_type": "dapo", "adv_scale": "group", "epsilon": 0.2, "epsilon_high": 0.28,
                           "beta": 0.0},
             "filters": {"dynamic_sampling": True, "max_sample_batches": 10}},
    "dr_grpo": {"algorithm": {"loss_type": "dr_grpo", "adv_scale": "none"}},
    # PAPO (Wang et al., 2025) on GRPO: KL_ref k3 0.01, clip 0.2/0.3, γ 0.02, n=5, T=1.0, top_p 0.99, lr 1e-6;
    # token-mean aggregation as every official run (`loss_avg_mode: token`).
    "papo_grpo": {
        "group_size": 5, "sampling": {"temperature": 1.0, "top_p": 0.99}, "optim": {"lr": 1e-6},
        "algorithm": {"loss_type": "dapo", "epsilon": 0.2, "epsilon_high": 0.3, "beta": 0.01, "kl_estimator": "k3"},
        "papo": {"enabled": True, "gamma": 0.02, "kl_estimator": "k3"},
    },
    # PAPO on DAPO: no KL_ref, clip 0.2/0.28, token-level loss, γ 0.01.
    "papo_dapo": {
        "group_size": 5, "sampling": {"temperature": 1.0, "top_p": 0.99}, "optim": {"lr": 1e-6},
        "algorithm": {"loss_type": "dapo", "epsilon": 0.2, "epsilon_high": 0.28, "beta": 0.0},
        "papo": {"enabled": True, "gamma": 0.01, "kl_estimator": "k3"},
    },
}

# DPO through the group sampling (mmrl.preference; Lanchantin et al., 2025): pairs = best vs worst of each
# group, the reference re-synced to the policy every s updates (s = 1 online, s = 5 semi-online — rollouts
# then come from the synced weights —, never = offline: pairs from the initial model). TRL's β = 0.1.
_DPO = {"objective": "dpo", "loss_type": "grpo", "advantage_estimator": "preference", "beta": 0.0,
        "ref_sync_alpha": 1.0, "ppo_epochs": 1}
PRESETS.update({
    "dpo_online": {"algorithm": {**_DPO, "ref_sync_steps": 1, "rollout_model": "policy"}},
    "dpo_semi": {"algorithm": {**_DPO, "ref_sync_steps": 5, "rollout_model": "reference"}},
    "dpo_offline": {"algorithm": {**_DPO, "ref_sync_steps": 0, "rollout_model": "reference"}},
})
PRESETS["dpo"] = PRESETS["dpo_online"]


def _objective_presets() -> dict[str, dict]:
    """``preset: gspo | gspo_token | gmpo | cispo | sapo``: the objective with its published clip range and
    aggregation (mmrl.objectives.OBJECTIVE_PRESETS)."""
    from mmrl.objectives import OBJECTIVE_PRESETS

    return {name: {"algorithm": {"objective": name, "loss_type": spec["loss_type"], **spec["params"]}}
            for name, spec in OBJECTIVE_PRESETS.items() if name != "ppo"}


PRESETS.update(_objective_presets())

# --------------------------------------------------------------------------------------------------
# Generic loading
# --------------------------------------------------------------------------------------------------


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


class UnknownKeyError(ConfigError):
    """An unknown key; :func:`from_dict` rewrites the message at the top level, where the whole schema
    (task sections included) is known, so the hint can point into any section."""

    def __init__(self, message: str, key: str, where: str, valid: list[str], value: Any = None):
        super().__init__(message)
        self.key, self.where, self.valid, self.value = key, where, valid, value


def _unknown_key(key: Any, valid: list[str], where: str, value: Any = None,
                 schema: list[str] | None = None) -> UnknownKeyError:
    """The error for ``where + key``: a foreign name's equivalent (TRL / EasyR1 / verl, see
    :data:`mmrl.config_checks.FOREIGN_KEYS`), else the nearest key here or in any section of ``schema``."""
    from mmrl.config_checks import unknown_key_hint  # only on the error path (it imports torch)

    key = str(key)
    hint = unknown_key_hint(key, valid, where, value, schema)
    return UnknownKeyError(f"unknown config key {where + key!r}{hint} Valid keys here: {sorted(valid)}",
                           key, where, valid, value)


def schema_keys(cls: type, section_types: dict[str, type] | None = None, prefix: str = "") -> list[str]:
    """Every dotted key of dataclass ``cls`` (nested dataclass sections expanded, task sections typed by
    ``section_types``), in declaration order: what an unknown key is compared against."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        tp = (section_types or {}).get(f.name, hints[f.name])
        if typing.get_origin(tp) in (typing.Union, types.UnionType):
            inner = [t for t in typing.get_args(tp) if t is not type(None)]
            tp = inner[0] if len(inner) == 1 else tp
        if dataclasses.is_dataclass(tp):
            out.extend(schema_keys(tp, None, f"{prefix}{f.name}."))
        else:
            out.append(prefix + f.name)
    return out


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against type ``tp`` (converting where YAML is looser, e.g. int → float)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where)
            except UnknownKeyError:
                raise
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, where + ".")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if origin is tuple and args and Ellipsis not in args and len(value) != len(args):
            raise ConfigError(f"{where}: expected a list of {len(args)} values, got {value!r}")
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                return float(value)
            except OverflowError:  # an integer beyond float range
                raise ConfigError(f"{where}: {value!r} is too large for a number") from None
        if isinstance(value, str):  # YAML 1.1 reads "1e-6" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, bool):  # YAML 1.1 reads unquoted no/yes/off/on as booleans
            raise ConfigError(f"{where}: expected a string, got {value!r} (YAML reads unquoted no/yes/off/on "
                              f"as booleans: quote it, e.g. {where}='no')")
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


def from_dict(cls: type, data: dict, where: str = "", section_types: dict[str, type] | None = None) -> Any:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys."""
    if where:
        return _from_dict(cls, data, where, section_types)
    try:
        return _from_dict(cls, data, where, section_types)
    except UnknownKeyError as exc:  # at the top: suggest from the whole schema, task sections included
        schema = schema_keys(cls, section_types)
        raise _unknown_key(exc.key, exc.valid, exc.where, exc.value, schema) from None


def _from_dict(cls: type, data: dict, where: str, section_types: dict[str, type] | None) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise _unknown_key(key, names, where, value)
        tp = (section_types or {}).get(key, hints[key])
        kwargs[key] = _coerce(value, tp, where + key)
    try:
        obj = cls(**kwargs)
    except TypeError as exc:  # a required field is missing
        raise ConfigError(f"{where.rstrip('.') or 'config'}: {exc}") from None
    except ValueError as exc:  # a section's own __post_init__ check (e.g. masking.prob)
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"{where.rstrip('.') or 'config'}: {exc}") from None
    for key, tp in (section_types or {}).items():
        if getattr(obj, key, None) is None and dataclasses.is_dataclass(tp):
            try:
                setattr(obj, key, tp())
            except TypeError as exc:  # the section has required fields and the config omits it
                raise ConfigError(f"section {where + key!r} is required here: {exc}") from None
    return obj


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` strings to a nested dict; values are parsed as YAML (``lr=1e-5``, ``x=[1,2]``)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. optim.lr=1e-5)")
        dotted, _, text = item.partition("=")
        try:
            value = yaml.safe_load(text) if text != "" else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({exc})") from None
        node = raw
        parts = dotted.strip().split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
            node = child
        node[parts[-1]] = value
    return raw


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not a readable YAML file ({exc})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys to values")
    return raw


def load_config(
    path: str | Path | None,
    overrides: list[str] | None = None,
    section_types: dict[str, type] | None = None,
) -> TrainConfig:
    """Load a :class:`TrainConfig` from YAML plus overrides; task sections typed by ``section_types``."""
    file_raw = load_yaml(path) if path is not None else {}
    raw = apply_overrides(copy.deepcopy(file_raw), overrides or [])
    preset = raw.get("preset")
    if preset is not None:
        if not isinstance(preset, str) or preset not in PRESETS:
            close = difflib.get_close_matches(str(preset), PRESETS, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"unknown preset {preset!r}.{hint} Valid presets: {sorted(PRESETS)}")
        # The later, more specific choice wins: a preset in the file sits under the file's values; a preset
        # chosen on the command line sits over the file and under the other command-line overrides (so
        # `demo.yaml preset=gspo` gets GSPO's clip range, not the demo's PPO epsilon).
        from_cli = file_raw.get("preset") != preset
        base = apply_overrides(merge_dicts(file_raw, copy.deepcopy(PRESETS[preset])), overrides or []) if from_cli else None
        merged = base if from_cli else merge_dicts(PRESETS[preset], raw)
        for key, (preset_value, value) in _shadowed(PRESETS[preset], merged).items():
            logger.warning("preset %s sets %s=%r; %s keeps %r", preset, key, preset_value,
                           "the command line" if from_cli else "the config", value)
        raw = merged
    return from_dict(TrainConfig, raw, section_types=section_types)


def _shadowed(preset: dict, merged: dict, prefix: str = "") -> dict[str, tuple[Any, Any]]:
    """Dotted keys where ``merged`` differs from the preset's value: (preset value, final value)."""
    out = {}
    for key, value in preset.items():
        final = merged.get(key)
        if isinstance(value, dict) and isinstance(final, dict):
            out.update(_shadowed(value, final, f"{prefix}{key}."))
        elif final != value:
            out[prefix + key] = (value, final)
    return out


def merge_dicts(base: dict, top: dict) -> dict:
    """Deep merge: values of ``top`` win, nested mappings are merged key by key."""
    out = dict(base)
    for key, value in top.items():
        out[key] = merge_dicts(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def to_dict(config: Any) -> Any:
    """A plain, YAML-serialisable copy of a config."""
    if dataclasses.is_dataclass(config):
        return {f.name: to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, (list, tuple)):
        return [to_dict(v) for v in config]
    if isinstance(config, dict):
        return {k: to_dict(v) for k, v in config.items()}
    return config
