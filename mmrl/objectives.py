"""Policy-ratio objectives of the GRPO family, rollout/training mismatch weights, and token selection.

Every objective has one signature, :data:`ObjectiveFn`::

    fn(logp [B, T], old_logp [B, T], advantages [B], mask [B, T], params) -> (per-token loss [B, T], metrics)

and returns a per-token loss that :func:`mmrl.algorithms.aggregate_loss` reduces (``policy_loss`` does
both). Sequence-level objectives (``gspo``, ``gmpo``) return their per-sequence loss on each of the
sequence's valid tokens (0 on padding), so the ``grpo`` aggregation (mean over sequences of token means)
gives the mean over sequences. :data:`OBJECTIVE_PRESETS` says which aggregation and clip range each one
was published with. Metrics are detached scalars; ``ratio_*`` are over valid tokens for token-level
objectives and over sequences with a valid token for sequence-level ones.

Where verl (``verl/trainer/ppo/core_algos.py``), TRL (``GRPOTrainer._compute_loss``) and EasyR1
(``verl/trainer/core_algos.py``) disagree, each docstring says which one we follow.

Adding an objective = one function decorated with :func:`register_objective` + one test.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

from mmrl.algorithms import aggregate_loss, masked_mean

Tensor = torch.Tensor

LOG_RATIO_CLAMP = 20.0  # |log r| bound before exp, as verl (sapo, cispo, rollout correction) and EasyR1


# --------------------------------------------------------------------------------------------------
# Parameters and registry
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ObjectiveParams:
    """Settings of every objective (each reads the fields it needs).

    - ``epsilon`` (0.2; PPO, Schulman et al. 2017; TRL's and verl's default): lower clip, ratio ≥ 1 − ε.
      For ``gmpo`` the bound is on log r: log r ≥ −ε (GMPO uses 0.4).
    - ``epsilon_high`` (None → ``epsilon``): upper clip, ratio ≤ 1 + ε_high (DAPO's clip-higher: 0.28;
      GSPO: ε = 3e-4, ε_high = 4e-4). ``gmpo``: log r ≤ ε_high. ``cispo``: the IS weight cap is 1 + ε_high.
    - ``dual_clip`` (None = off; verl's ``clip_ratio_c`` = 3.0 and EasyR1's ``clip_ratio_dual`` = 3.0,
      always on there; dual-clip PPO, Ye et al. 2020, arXiv:1912.09729): for A < 0 the ``ppo`` loss is
      capped at −A·C. Must be > 1.
    - ``delta`` (None = off; TRL's ``delta``, INTELLECT-2's two-sided clip): the unclipped ratio of ``ppo``
      is clamped to ≤ δ. Must be > 1 (TRL recommends > 1 + ε).
    - ``tau_pos`` (1.0) / ``tau_neg`` (1.05): SAPO's gate temperatures for A > 0 / A ≤ 0 (the SAPO paper's
      values, the defaults of verl, TRL and EasyR1).
    - ``cispo_epsilon_low`` (None = no lower bound on the CISPO weight, as the MiniMax-M1 paper and TRL;
      verl clips at 1 − ``clip_ratio_low``, its example sets it to 10, i.e. no bound either).
    - ``dpo_beta`` (0.1, TRL's default), ``dpo_loss`` (``sigmoid`` = DPO, ``ipo`` = IPO),
      ``dpo_label_smoothing`` (cDPO's ε, sigmoid only), ``dpo_nll_coef`` (the NLL term on the chosen
      completion, TRL's ``rpo_alpha``; 0 = off): the ``dpo`` objective (:mod:`mmrl.preference`).
    """

    epsilon: float = 0.2
    epsilon_high: float | None = None
    dual_clip: float | None = None
    delta: float | None = None
    tau_pos: float = 1.0
    tau_neg: float = 1.05
    cispo_epsilon_low: float | None = None
    dpo_beta: float = 0.1
    dpo_loss: str = "sigmoid"
    dpo_label_smoothing: float = 0.0
    dpo_nll_coef: float = 0.0

    def __post_init__(self) -> None:
        problems = []
        for name in ("epsilon", "epsilon_high", "cispo_epsilon_low"):
            value = getattr(self, name)
            if value is not None and not (0.0 <= value < math.inf):
                problems.append(f"{name} must be a finite number >= 0, got {value!r}")
        for name in ("dual_clip", "delta"):
            value = getattr(self, name)
            if value is not None and not (1.0 < value < math.inf):
                problems.append(f"{name} must be a finite number > 1 (or None to disable), got {value!r}")
        for name in ("tau_pos", "tau_neg"):
            value = getattr(self, name)
            if not (0.0 < value < math.inf):
                problems.append(f"{name} must be a finite number > 0, got {value!r}")
        if not (0.0 < self.dpo_beta < math.inf):
            problems.append(f"dpo_beta must be a finite number > 0, got {self.dpo_beta!r}")
        if self.dpo_loss not in DPO_LOSSES:
            problems.append(f"dpo_loss must be one of {list(DPO_LOSSES)}, got {self.dpo_loss!r}")
        if not (0.0 <= self.dpo_label_smoothing < 0.5):
            problems.append(f"dpo_label_smoothing must be in [0, 0.5), got {self.dpo_label_smoothing!r}")
        if not (0.0 <= self.dpo_nll_coef < math.inf):
            problems.append(f"dpo_nll_coef must be a finite number >= 0, got {self.dpo_nll_coef!r}")
        if problems:
            raise ValueError("invalid objective parameters: " + "; ".join(problems))

    @property
    def upper_epsilon(self) -> float:
        """ε_high, falling back to ε."""
        return self.epsilon if self.epsilon_high is None else self.epsilon_high


DPO_LOSSES = ("sigmoid", "ipo")

ObjectiveFn = Callable[[Tensor, Tensor, Tensor, Tensor, ObjectiveParams], tuple[Tensor, dict[str, Tensor]]]

OBJECTIVES: dict[str, ObjectiveFn] = {}


@dataclass(frozen=True)
class ObjectiveSpec:
    """What an objective needs from the step around it (the trainer reads it; no objective is special-cased).

    - ``compares_to``: the named log-probs passed as the function's second argument — ``"old"`` (the
      policy that sampled: every ratio objective; the current policy, detached, when no separate pass is
      needed) or ``"ref"`` (the reference model: DPO's implicit reward);
    - ``pairwise``: the rows come in adjacent (chosen, rejected) pairs, which the collect phase forms
      from each group (:class:`mmrl.collect.PreferencePairs`).
    """

    compares_to: str = "old"
    pairwise: bool = False

    @property
    def needs(self) -> frozenset[str]:
        return frozenset({f"logps:{self.compares_to}"}) if self.compares_to != "old" else frozenset()


OBJECTIVE_SPECS: dict[str, ObjectiveSpec] = {}


def register_objective(name: str, spec: ObjectiveSpec | None = None) -> Callable[[ObjectiveFn], ObjectiveFn]:
    """Decorator adding an objective to :data:`OBJECTIVES` under ``name`` (names are unique), with what it
    needs (:class:`ObjectiveSpec`; default: a ratio against the sampling policy's log-probs)."""

    def decorate(fn: ObjectiveFn) -> ObjectiveFn:
        if name in OBJECTIVES and OBJECTIVES[name] is not fn:
            raise ValueError(f"objective {name!r} is already registered")
        OBJECTIVES[name] = fn
        OBJECTIVE_SPECS[name] = spec or ObjectiveSpec()
        return fn

    return decorate


def objective_spec(name: str) -> ObjectiveSpec:
    """The :class:`ObjectiveSpec` of the registered objective ``name``."""
    get_objective(name)
    return OBJECTIVE_SPECS[name]


def get_objective(name: str) -> ObjectiveFn:
    """The registered objective ``name``; ValueError listing the valid names otherwise."""
    try:
        return OBJECTIVES[name]
    except KeyError:
        raise ValueError(f"unknown objective {name!r}; valid: {sorted(OBJECTIVES)}") from None


# Published settings: the aggregation (``loss_type``) and parameters each objective's preset should use.
OBJECTIVE_PRESETS: dict[str, dict[str, Any]] = {
    # today's default; DAPO's preset is ppo + loss_type "dapo" + epsilon_high 0.28
    "ppo": {"loss_type": "grpo", "params": {}},
    # GSPO paper's experiments (and verl's example): 3e-4 / 4e-4; verl forces "seq-mean-token-mean"
    "gspo": {"loss_type": "grpo", "params": {"epsilon": 3e-4, "epsilon_high": 4e-4}},
    "gspo_token": {"loss_type": "grpo", "params": {"epsilon": 3e-4, "epsilon_high": 4e-4}},
    # GMPO paper and verl's example: log r clipped to [-0.4, 0.4]; verl takes the mean over sequences
    "gmpo": {"loss_type": "grpo", "params": {"epsilon": 0.4, "epsilon_high": 0.4}},
    # MiniMax-M1 normalises by the batch's tokens (TRL: global token count → "dapo"); weight cap 5 is
    # ScaleRL's ε_max (arXiv:2510.13786) as TRL documents it (verl's example caps at 1.2)
    "cispo": {"loss_type": "dapo", "params": {"epsilon_high": 4.0}},
    # SAPO paper; verl forces "seq-mean-token-mean", TRL's sapo uses the same per-sequence mean
    "sapo": {"loss_type": "grpo", "params": {"tau_pos": 1.0, "tau_neg": 1.05}},
}


def preset_params(objective: str, **overrides: Any) -> ObjectiveParams:
    """:class:`ObjectiveParams` with ``objective``'s preset values, then ``overrides`` (user settings)."""
    get_objective(objective)
    preset = OBJECTIVE_PRESETS.get(objective, {"params": {}})["params"]
    return replace(ObjectiveParams(), **{**preset, **overrides})


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


def _valid(mask: Tensor) -> Tensor:
    return mask != 0


def _masked_extrema(values: Tensor, valid: Tensor, empty: float) -> tuple[Tensor, Tensor]:
    # min and max over valid entries without a host sync; ``empty`` when nothing is valid
    values = values.detach()
    lo = torch.where(valid, values, torch.full_like(values, math.inf)).amin()
    hi = torch.where(valid, values, torch.full_like(values, -math.inf)).amax()
    fallback = torch.full_like(lo, empty)
    any_valid = valid.any()
    return torch.where(any_valid, lo, fallback), torch.where(any_valid, hi, fallback)


def _ratio_metrics(ratio: Tensor, valid: Tensor) -> dict[str, Tensor]:
    lo, hi = _masked_extrema(ratio, valid, 1.0)
    return {"ratio_mean": masked_mean(ratio.detach(), valid), "ratio_min": lo, "ratio_max": hi}


def _clip_metrics(low: Tensor, high: Tensor, valid: Tensor) -> dict[str, Tensor]:
    return {
        "clip_ratio/low_mean": masked_mean(low.float(), valid),
        "clip_ratio/high_mean": masked_mean(high.float(), valid),
        "clip_ratio/region_mean": masked_mean((low | high).float(), valid),
    }


def _sequence_log_ratio(logp: Tensor, old_logp: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Masked token-mean of log r per sequence ``[B]``, the valid-token map, and which rows have a token."""
    valid = _valid(mask)
    weights = mask.to(logp.dtype)
    log_ratio = torch.where(valid, logp - old_logp, torch.zeros_like(logp))
    mean_log_ratio = (log_ratio * weights).sum(-1) / weights.sum(-1).clamp(min=1.0)
    return mean_log_ratio, valid, valid.any(-1)


def _broadcast(per_sequence: Tensor, valid: Tensor) -> Tensor:
    """A per-sequence ``[B]`` value on each valid token of its row, 0 on padding."""
    per_token = per_sequence.unsqueeze(-1).expand(valid.shape)
    return torch.where(valid, per_token, torch.zeros_like(per_token))


# --------------------------------------------------------------------------------------------------
# Objectives
# --------------------------------------------------------------------------------------------------


@register_objective("ppo")
def ppo_objective(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor,
                  params: ObjectiveParams) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO's clipped surrogate on token ratios (GRPO, DAPO, Dr. GRPO): −min(r·A, clip(r, 1−ε, 1+ε_high)·A).

    No clamp on log r, as TRL (verl clamps it to ±20). ``delta``: TRL's two-sided clip, the unclipped
    term uses min(r, δ) (for A < 0 this caps the loss at −A·δ). ``dual_clip`` = C: verl's/EasyR1's
    dual-clip, for A < 0 the loss is min(loss, −A·C). With δ ≥ 1 + ε_high the two give the same loss
    and gradient; TRL has only ``delta``, verl and EasyR1 only ``dual_clip`` (on by default there, off here).
    Metrics: ``clip_ratio/{low,high,region}_mean`` as TRL, ``clip_ratio/dual_mean`` (A < 0 and r > C) and
    ``clip_ratio/delta_mean`` (A < 0 and r > δ) when enabled, ``ratio_{mean,min,max}``.
    """
    eps_low, eps_high = params.epsilon, params.upper_epsilon
    ratio = torch.exp(logp - old_logp)
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    adv = advantages.unsqueeze(-1)
    unclipped = ratio if params.delta is None else torch.clamp(ratio, max=params.delta)
    per_token = -torch.min(unclipped * adv, clipped * adv)
    if params.dual_clip is not None:
        per_token = torch.where(adv < 0, torch.min(per_token, -adv * params.dual_clip), per_token)
    with torch.no_grad():
        valid = _valid(mask)
        low, high = (ratio < 1.0 - eps_low) & (adv < 0), (ratio > 1.0 + eps_high) & (adv > 0)
        metrics = _clip_metrics(low, high, mask)
        metrics["ratio_mean"] = masked_mean(ratio.detach(), mask)
        metrics["ratio_min"], metrics["ratio_max"] = _masked_extrema(ratio, valid, 1.0)
        if params.dual_clip is not None:
            dual = (adv < 0) & (ratio > params.dual_clip)
            metrics["clip_ratio/dual_mean"] = masked_mean(dual.float(), mask)
        if params.delta is not None:
            capped = (adv < 0) & (ratio > params.delta)
            metrics["clip_ratio/delta_mean"] = masked_mean(capped.float(), mask)
    return per_token, metrics


def _sequence_clip_metrics(ratio: Tensor, advantages: Tensor, has_token: Tensor, low_bound: float,
                           high_bound: float) -> dict[str, Tensor]:
    # fractions of sequences (with a valid token) whose sequence ratio was clipped, as TRL reports them
    low = (ratio < low_bound) & (advantages < 0)
    high = (ratio > high_bound) & (advantages > 0)
    return {**_clip_metrics(low, high, has_token), **_ratio_metrics(ratio, has_token)}


@register_objective("gspo")
def gspo_objective(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor,
                   params: ObjectiveParams) -> tuple[Tensor, dict[str, Tensor]]:
    """GSPO (Zheng et al., 2025, "Group Sequence Policy Optimization", arXiv:2507.18071), sequence-level.

    s_i = exp(mean_t log r_{i,t}) (masked token mean, i.e. the length-normalised sequence ratio);
    loss_i = −min(s_i·A_i, clip(s_i, 1−ε, 1+ε_high)·A_i), put on each valid token. The gradient flows
    through s_i, so every token of a sequence gets the same weight −A_i·s_i/|y_i| (when not clipped).
    Preset: ``grpo`` aggregation (verl forces seq-mean-token-mean), ε = 3e-4, ε_high = 4e-4. Mean log r is
    clamped to ±20 before exp as EasyR1 (verl: ≤ 10). verl implements only the ``gspo_token`` form
    (same values and, with one advantage per sequence, the same gradient); EasyR1 and TRL
    (``importance_sampling_level="sequence"``) implement this one. Metrics are over sequences.
    """
    eps_low, eps_high = params.epsilon, params.upper_epsilon
    mean_log_ratio, valid, has_token = _sequence_log_ratio(logp, old_logp, mask)
    seq_ratio = torch.exp(mean_log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    clipped = torch.clamp(seq_ratio, 1.0 - eps_low, 1.0 + eps_high)
    per_sequence = -torch.min(seq_ratio * advantages, clipped * advantages)
    with torch.no_grad():
        metrics = _sequence_clip_metrics(seq_ratio, advantages, has_token, 1.0 - eps_low, 1.0 + eps_high)
    return _broadcast(per_sequence, valid), metrics


@register_objective("gspo_token")
def gspo_token_objective(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor,
                         params: ObjectiveParams) -> tuple[Tensor, dict[str, Tensor]]:
    """GSPO-token (Zheng et al., 2025, eq. for token-level advantages): s_{i,t} = sg[s_i]·π(o_t)/sg[π(o_t)].

    Each token's value equals s_i, but its gradient is s_i·∇log π(o_t) of that token alone; per-token loss
    −min(s_{i,t}·A_i, clip(s_{i,t})·A_i). With one advantage per sequence it matches ``gspo`` in value and
    in gradient under every aggregation (the GSPO paper's remark). verl's ``gspo`` loss is this form;
    log s_{i,t} is clamped to ±20 (verl: ≤ 10). Same preset and metrics as ``gspo``.
    """
    eps_low, eps_high = params.epsilon, params.upper_epsilon
    mean_log_ratio, valid, has_token = _sequence_log_ratio(logp, old_logp, mask)
    log_token_ratio = mean_log_ratio.detach().unsqueeze(-1) + logp - logp.detach()
    token_ratio = torch.exp(log_token_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    clipped = torch.clamp(token_ratio, 1.0 - eps_low, 1.0 + eps_high)
    adv = advantages.unsqueeze(-1)
    per_token = -torch.min(token_ratio * adv, clipped * adv)
    per_token = torch.where(valid, per_token, torch.zeros_like(per_token))
    with torch.no_grad():
        seq_ratio = torch.exp(mean_log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
        metrics = _sequence_clip_metrics(seq_ratio, advantages, has_token, 1.0 - eps_low, 1.0 + eps_high)
    return per_token, metrics


@register_objective("gmpo")
def gmpo_objective(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor,
                   params: ObjectiveParams) -> tuple[Tensor, dict[str, Tensor]]:
    """GMPO (Zhao et al., 2025, "Geometric-Mean Policy Optimization", arXiv:2507.20673), verl's ``geo_mean``.

    Token log-ratios are clipped sign-aware: for A > 0, log r ≤ ε_high; for A < 0, log r ≥ −ε (the side
    that would let the update run away; the other side is left free, as PPO's min). The sequence ratio is
    the geometric mean exp(mean_t clipped log r) and loss_i = −A_i·ratio_i, put on each valid token.
    Preset: ε = ε_high = 0.4 and the ``grpo`` aggregation (verl: mean over sequences). As verl (and the
    GMPO code) no clamp at ±20 is applied. Metrics: ``clip_ratio/*`` are fractions of valid *tokens* whose
    log-ratio was clipped (verl counts tokens where the two-sided clamp changes log r, even on the free
    side; we count only effective clips); ``ratio_*`` are over sequence ratios.
    """
    eps_low, eps_high = params.epsilon, params.upper_epsilon
    valid = _valid(mask)
    weights = mask.to(logp.dtype)
    log_ratio = torch.where(valid, logp - old_logp, torch.zeros_like(logp))
    adv = advantages.unsqueeze(-1)
    clipped = torch.where(adv > 0, log_ratio.clamp(max=eps_high), log_ratio)
    clipped = torch.where(adv < 0, log_ratio.clamp(min=-eps_low), clipped)
    seq_ratio = torch.exp((clipped * weights).sum(-1) / weights.sum(-1).clamp(min=1.0))
    per_sequence = -advantages * seq_ratio
    with torch.no_grad():
        low = (adv < 0) & (log_ratio < -eps_low)
        high = (adv > 0) & (log_ratio > eps_high)
        metrics = {**_clip_metrics(low, high, mask), **_ratio_metrics(seq_ratio, valid.any(-1))}
    return _broadcast(per_sequence, valid), metrics


@register_objective("cispo")
def cispo_objective(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor,
                    params: ObjectiveParams) -> tuple[Tensor, dict[str, Tensor]]:
    """CISPO (MiniMax-M1, arXiv:2506.13585): −sg(clip(r, max = 1 + ε_high))·A·log π, a REINFORCE term per
    token with the importance weight clipped and detached, so every token keeps a gradient (−w·A·∇log π).

    Lower bound: none by default, as the paper ("ε_low^IS set large") and TRL; ``cispo_epsilon_low`` adds
    verl's 1 − ε_low bound. The cap is 1 + ε_high as in the paper and verl (TRL's ``epsilon_high`` is the
    cap itself: TRL ε_high = 5 ≡ our ε_high = 4). log r clamped to ±20 (verl). Preset: ``dapo``
    aggregation (token mean), cap 5. The loss *value* is −w·A·log π, not comparable with the ratio
    objectives'. Metrics: ``clip_ratio/high_mean`` = tokens whose weight was capped (any sign of A; TRL's
    ``cispo_clip_ratio`` counts A > 0 only), ``low_mean`` likewise for the lower bound.
    """
    valid = _valid(mask)
    ratio = torch.exp((logp - old_logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    upper = 1.0 + params.upper_epsilon
    lower = None if params.cispo_epsilon_low is None else 1.0 - params.cispo_epsilon_low
    weight = torch.clamp(ratio, min=lower, max=upper).detach()
    per_token = -weight * advantages.unsqueeze(-1) * logp
    per_token = torch.where(valid, per_token, torch.zeros_like(per_token))
    with torch.no_grad():
        low = ratio < lower if lower is not None else torch.zeros_like(valid)
        metrics = {**_clip_metrics(low, ratio > upper, mask), **_ratio_metrics(ratio, valid)}
    return per_token, metrics


@register_objective("sapo")
def sapo_objective(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor,
                   params: ObjectiveParams) -> tuple[Tensor, dict[str, Tensor]]:
    """SAPO ("Soft Adaptive Policy Optimization", arXiv:2511.20347): a smooth gate instead of the clip.

    f(r) = σ(τ·(r − 1))·4/τ, per-token loss −f(r)·A, τ = ``tau_pos`` for A > 0 and ``tau_neg`` otherwise
    (verl and TRL; EasyR1 uses τ_pos for A ≥ 0, which changes nothing since A = 0 gives 0). f'(r) =
    4σ(1−σ) is 1 at r = 1 (PPO's on-policy gradient) and decays smoothly away from it. log r clamped to
    ±20 (verl; TRL has no clamp). Preset: ``grpo`` aggregation (verl forces seq-mean-token-mean).
    Metrics: ``sapo/gate_grad_mean`` = mean f'(r) over valid tokens (1 = no damping) and ``ratio_*``; no
    hard clip, so no ``clip_ratio/*``.
    """
    valid = _valid(mask)
    ratio = torch.exp((logp - old_logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    adv = advantages.unsqueeze(-1)
    tau = torch.where(adv > 0, params.tau_pos, params.tau_neg).to(ratio.dtype)
    gate_sigmoid = torch.sigmoid(tau * (ratio - 1.0))
    per_token = -(gate_sigmoid * 4.0 / tau) * adv
    per_token = torch.where(valid, per_token, torch.zeros_like(per_token))
    with torch.no_grad():
        metrics = {"sapo/gate_grad_mean": masked_mean(4.0 * gate_sigmoid * (1.0 - gate_sigmoid), mask),
                   **_ratio_metrics(ratio, valid)}
    return per_token, metrics


# --------------------------------------------------------------------------------------------------
# Rollout/training mismatch: truncated and masked importance sampling (TIS / MIS)
# --------------------------------------------------------------------------------------------------

MISMATCH_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


def mismatch_weights(old_logp: Tensor, sampler_logp: Tensor, mask: Tensor, mode: str, cap: float = 2.0,
                     low: float | None = None, high: float | None = None,
                     ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """Importance weights correcting for the sampler's distribution differing from the trainer's.

    From Yao et al., 2025 ("Your Efficient RL Framework Secretly Brings You Off-Policy RL Training"), with
    TRL's four modes (``vllm_importance_sampling_mode``); ρ = π_old/π_sampler = exp(old − sampler):

    - ``token_truncate`` (TIS): w = min(ρ_t, ``cap``) (and ≥ ``low`` when given, as TRL's C_min);
    - ``token_mask`` (MIS): w = ρ_t where ``low`` ≤ ρ_t ≤ ``high``, else 0 (token dropped);
    - ``sequence_truncate``: the sequence ratio ρ = exp(Σ_t masked log ρ_t) — a *product* over tokens, as
      TRL (not a geometric mean) — truncated like ``token_truncate`` and put on every token;
    - ``sequence_mask``: w = ρ on every token of sequences with ``low`` ≤ ρ ≤ ``high``, whole sequence
      dropped otherwise.

    ``cap`` = C (2.0: the TIS paper's and verl's ``rollout_is_threshold``; TRL's default is 3.0) is the
    truncation bound; ``high`` (None → ``cap``) and ``low`` (None → no lower bound, TRL's default) are the
    mask bounds. Kept tokens keep ρ as their weight in mask modes, as TRL (masked IS); use ``keep`` alone
    for pure rejection (verl's ``rollout_rs``). log ρ is clamped to ±20 before exp (verl's safety bound;
    TRL has none) — no weight changes for bounds in [e^−20, e^20].

    Returns ``weights`` ``[B, T]`` (0 on padding and dropped tokens; multiply the per-token loss by them —
    dropped tokens then still count in the loss normaliser, as in TRL; aggregate with ``mask * keep`` to
    remove them from it too, as verl's rejection mask does), ``keep`` (bool ``[B, T]``: valid and not
    dropped), and detached metrics ``mismatch/{logp_abs_diff_mean, logp_abs_diff_max, masked_fraction,
    truncated_fraction, weight_mean, ratio_min, ratio_max}`` (fractions and means over valid tokens; ratios
    over tokens or sequences as the mode).
    """
    if mode not in MISMATCH_MODES:
        raise ValueError(f"unknown mismatch mode {mode!r}; valid: {list(MISMATCH_MODES)}")
    high = cap if high is None else high
    problems = []
    if not 1.0 <= cap < math.inf:
        problems.append(f"cap C must be >= 1, got {cap!r}")
    if not 1.0 <= high < math.inf:
        problems.append(f"high C_max must be >= 1, got {high!r}")
    if low is not None and not 0.0 <= low <= 1.0:
        problems.append(f"low C_min must be in [0, 1], got {low!r}")
    if problems:
        raise ValueError("invalid mismatch bounds: " + "; ".join(problems))

    valid = _valid(mask)
    diff = torch.where(valid, old_logp - sampler_logp, torch.zeros_like(old_logp)).detach()
    sequence_level = mode.startswith("sequence")
    log_ratio = diff.sum(-1, keepdim=True) if sequence_level else diff
    ratio = torch.exp(log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    if mode.endswith("truncate"):
        weights = torch.clamp(ratio, min=low, max=cap)
        changed = weights != ratio
        kept = torch.ones_like(ratio, dtype=torch.bool)
    else:
        kept = (ratio <= high) if low is None else (ratio >= low) & (ratio <= high)
        weights = torch.where(kept, ratio, torch.zeros_like(ratio))
        changed = torch.zeros_like(kept)
    keep = valid & kept
    weights = torch.where(keep, weights.expand_as(diff), torch.zeros_like(diff))

    with torch.no_grad():
        abs_diff = diff.abs()
        has_token = valid.any(-1, keepdim=True)
        lo, hi = _masked_extrema(ratio, has_token if sequence_level else valid, 1.0)
        metrics = {
            "mismatch/logp_abs_diff_mean": masked_mean(abs_diff, valid),
            "mismatch/logp_abs_diff_max": _masked_extrema(abs_diff, valid, 0.0)[1],
            "mismatch/masked_fraction": masked_mean((valid & ~keep).float(), valid),
            "mismatch/truncated_fraction": masked_mean(changed.expand_as(valid).float(), valid),
            "mismatch/weight_mean": masked_mean(weights, valid),
            "mismatch/ratio_min": lo,
            "mismatch/ratio_max": hi,
        }
    return weights, keep, metrics


# --------------------------------------------------------------------------------------------------
# Token selection and entropy
# --------------------------------------------------------------------------------------------------


def top_entropy_mask(entropy: Tensor, mask: Tensor, fraction: float) -> Tensor:
    """``mask`` restricted to the top ``fraction`` of its valid tokens by entropy, over the whole batch
    ("Beyond the 80/20 Rule", Wang et al., 2025, arXiv:2506.01939: train on the ~20 % highest-entropy
    "forking" tokens).

    Exactly ceil(fraction · n_valid) tokens are kept (at least one when any is valid); ties are broken
    by position (row-major: earlier rows, then earlier tokens, win), so the result is deterministic.
    TRL's ``top_entropy_quantile`` instead keeps every token at or above the (1 − ρ) quantile (ties all
    kept) and gathers the entropies of every process; this works on the tensors it is given. Returns a
    tensor of ``mask``'s dtype. ``fraction`` must be in (0, 1]; 1 returns ``mask`` unchanged.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"top-entropy fraction must be in (0, 1], got {fraction!r}")
    if fraction == 1.0:
        return mask.clone()
    valid = _valid(mask).flatten()
    scores = entropy.detach().flatten().float()
    scores = torch.where(valid, scores, torch.full_like(scores, -math.inf))
    order = torch.sort(scores, descending=True, stable=True).indices
    count = math.ceil(fraction * int(valid.sum()))
    selected = torch.zeros_like(valid)
    selected[order[:count]] = True
    selected = (selected & valid).view_as(mask)
    return mask * selected.to(mask.dtype) if mask.dtype != torch.bool else mask & selected


def entropy_bonus(entropy: Tensor, mask: Tensor, coef: float, loss_type: str = "grpo",
                  max_completion_length: int | None = None, global_tokens: float | Tensor | None = None,
                  global_sequences: float | Tensor | None = None) -> Tensor:
    """The entropy-bonus term to *add* to the loss: −coef · aggregate(entropy), aggregated like the policy
    loss (verl's ``entropy_coeff`` · ``agg_loss(entropy)``, subtracted; TRL subtracts coef · token mean).

    ``entropy`` must be the per-token entropy of the full distribution *with* gradient (e.g. computed from
    the logits). The sampled-token estimate −log π(o_t) has the right value but zero expected gradient
    (E_o[∇ log π(o)] = 0), so it cannot serve as a bonus. Returns 0 (with gradient) when ``coef`` is 0.
    """
    return -coef * aggregate_loss(entropy, mask, loss_type, max_completion_length, global_tokens,
                                  global_sequences)


# DPO registers itself into the registry above (its module imports this one).
from mmrl import preference as _preference  # noqa: E402,F401
