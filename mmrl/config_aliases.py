"""Names users bring from TRL, verl and EasyR1, and the hint an unknown config key gets.

:data:`FOREIGN_KEYS` maps a foreign key to its mmrl key (with a note where the meaning differs);
:func:`unknown_key_hint` is what :func:`mmrl.config.from_dict` shows for a key it does not know.
"""

from __future__ import annotations

import difflib
import os
from typing import Any

_TOP = "a top-level key"
_LENGTH = "training length is counted in rollout steps"
_KL_NAMES = "low_var_kl is k3, kl is k1, mse is k2"
_GLOBAL = "counts prompts over all GPUs; prompts_per_step counts them per process"
_PER_UPDATE = "counts prompts per update; mini_batch_size counts samples (prompts x group_size)"


def _named(whose: str, targets: dict[str, str | None], notes: dict[str, str]) -> dict[str, tuple]:
    return {name: (target, whose, notes.get(name, "")) for name, target in targets.items()}


#: A foreign config name (a key, or a dotted path such as EasyR1's ``rollout.n``) -> (our dotted key or
#: None when there is no counterpart, whose name it is, a note on how the two differ).
FOREIGN_KEYS: dict[str, tuple[str | None, str, str]] = {
    **_named("TRL", {  # GRPOConfig / TrainingArguments
        "learning_rate": "optim.lr", "num_generations": "group_size", "beta": "algorithm.beta",
        "max_completion_length": "sampling.max_new_tokens", "max_prompt_length": "data.max_prompt_length",
        "epsilon": "algorithm.epsilon", "epsilon_high": "algorithm.epsilon_high", "seed": "seed",
        "max_grad_norm": "optim.max_grad_norm", "weight_decay": "optim.weight_decay",
        "warmup_steps": "optim.warmup_steps", "adam_beta1": "optim.betas", "adam_beta2": "optim.betas",
        "lr_scheduler_type": "optim.scheduler", "per_device_train_batch_size": "prompts_per_step",
        "gradient_accumulation_steps": "micro_batch_size", "temperature": "sampling.temperature",
        "top_p": "sampling.top_p", "top_k": "sampling.top_k", "loss_type": "algorithm.loss_type",
        "scale_rewards": "algorithm.adv_scale", "num_iterations": "algorithm.ppo_epochs",
        "save_total_limit": "save_total_limit", "gradient_checkpointing": "gradient_checkpointing",
        "report_to": "logging.report_to", "run_name": "logging.run_name", "logging_steps": None,
        "num_train_epochs": "max_steps", "eval_steps": "eval.every_steps", "bf16": "mixed_precision",
        "fp16": "mixed_precision", "model_name_or_path": "model.name_or_path", "dataset_name": "data.train",
        "use_vllm": None,
    }, {
        "num_generations": "completions per prompt", "adam_beta1": "both betas in one list: [beta1, beta2]",
        "adam_beta2": "both betas in one list: [beta1, beta2]",
        "per_device_train_batch_size": "counts completions (prompts x num_generations) per device; here a "
                                       "step samples prompts_per_step prompts per process, group_size each",
        "gradient_accumulation_steps": "accumulation is implied: micro_batch_size samples per forward, "
                                       "mini_batch_size per optimizer update",
        "scale_rewards": "group | batch | none", "num_iterations": "passes over each rollout",
        "save_total_limit": _TOP, "gradient_checkpointing": _TOP, "seed": _TOP, "num_train_epochs": _LENGTH,
        "logging_steps": "every optimizer step is logged (metrics.jsonl, and report_to)",
        "bf16": "mixed_precision: bf16", "fp16": "mixed_precision: fp16",
        "use_vllm": "completions are sampled with the policy model itself",
    }),
    **_named("EasyR1/verl", {
        "ppo_epochs": "algorithm.ppo_epochs", "n": "group_size", "rollout.n": "group_size",
        "kl_coef": "algorithm.beta", "clip_ratio_low": "algorithm.epsilon", "val_files": "data.eval",
        "clip_ratio_high": "algorithm.epsilon_high", "adv_estimator": "algorithm.advantage_estimator",
        "max_response_length": "sampling.max_new_tokens", "train_files": "data.train",
        "max_steps": "max_steps",
        "total_epochs": "max_steps", "save_freq": "save_steps", "project_name": "logging.project",
        "experiment_name": "logging.run_name", "logger": "logging.report_to",
    }, {
        "n": "rollout.n: completions per prompt", "rollout.n": "completions per prompt",
        "total_epochs": _LENGTH,
        "adv_estimator": "grpo | rloo | reinforce_pp | reinforce_pp_baseline; adv_scale scales grpo's",
        "max_steps": _TOP, "logger": "jsonl | tensorboard | wandb",
    }),
    **_named("EasyR1", {
        "rollout_batch_size": "prompts_per_step", "global_batch_size": "mini_batch_size",
        "micro_batch_size_per_device_for_update": "micro_batch_size", "kl_penalty": "algorithm.kl_estimator",
        "model_path": "model.name_or_path", "save_limit": "save_total_limit", "val_freq": "eval.every_steps",
    }, {"rollout_batch_size": _GLOBAL, "global_batch_size": _PER_UPDATE, "kl_penalty": _KL_NAMES}),
    **_named("verl", {
        "train_batch_size": "prompts_per_step", "ppo_mini_batch_size": "mini_batch_size",
        "ppo_micro_batch_size_per_gpu": "micro_batch_size", "kl_loss_coef": "algorithm.beta",
        "kl_loss_type": "algorithm.kl_estimator", "clip_ratio": "algorithm.epsilon",
        "loss_agg_mode": "algorithm.loss_type", "total_training_steps": "max_steps",
        "test_freq": "eval.every_steps",
    }, {"train_batch_size": _GLOBAL, "ppo_mini_batch_size": _PER_UPDATE, "kl_loss_type": _KL_NAMES,
        "loss_agg_mode": "token-mean is dapo/bnpo, seq-mean-token-mean is grpo"}),
    **_named("transformers", {"torch_dtype": "model.dtype"}, {}),
    # The step-pipeline options under their usual names.
    **_named("TRL", {
        "sync_ref_model": "algorithm.ref_sync_steps", "ref_model_sync_steps": "algorithm.ref_sync_steps",
        "ref_model_mixup_alpha": "algorithm.ref_sync_alpha", "top_entropy_quantile": "filters.top_entropy_fraction",
        "mask_truncated_completions": "filters.mask_truncated", "vllm_importance_sampling_mode": "mismatch.mode",
        "vllm_importance_sampling_cap": "mismatch.cap",
    }, {"sync_ref_model": "on when ref_sync_steps > 0",
        "top_entropy_quantile": "the fraction of tokens kept, as TRL's (1.0 keeps all)"}),
    **_named("verl", {
        "filter_groups": "filters.dynamic_sampling", "filter_groups.enable": "filters.dynamic_sampling",
        "filter_groups.metric": "filters.dynamic_sampling_reward",
        "max_num_gen_batches": "filters.max_sample_batches", "use_kl_in_reward": "algorithm.kl_in_reward",
        "entropy_coeff": "algorithm.entropy_coef", "clip_ratio_c": "algorithm.dual_clip",
        "overlong_buffer": "filters.overlong_cache_length", "overlong_buffer.len": "filters.overlong_cache_length",
        "overlong_buffer.penalty_factor": "filters.overlong_penalty_factor",
    }, {"max_num_gen_batches": "verl's 0 means unbounded; here it is at least 1",
        "filter_groups": "drops groups whose rewards are all equal"}),
    **_named("TRL DPOConfig", {"rpo_alpha": "algorithm.dpo_nll_coef", "label_smoothing": "algorithm.dpo_label_smoothing",
                               "sync_every": "algorithm.ref_sync_steps"},
             {"rpo_alpha": "the NLL on the chosen completion, averaged per pair (TRL: over all chosen tokens)",
              "sync_every": "semi-online DPO's s (with ref_sync_alpha 1; 0 = never): preset dpo_semi"}),
    **_named("EasyR1", {"max_try_make_batch": "filters.max_sample_batches",
                        "online_filtering": "filters.dynamic_sampling"},
             {"online_filtering": "drops groups whose rewards are all equal (EasyR1 filters by mean)"}),
}


def _flatten(value: Any, prefix: str, depth: int = 4) -> list[str]:
    """Dotted paths of the keys inside a nested mapping (an unknown section brought from another trainer)."""
    if not isinstance(value, dict) or depth == 0:
        return []
    out = []
    for k, v in value.items():
        path = f"{prefix}.{k}"
        out.append(path)
        out.extend(_flatten(v, path, depth - 1))
    return out


def _foreign_notes(full: str, value: Any, schema: list[str] | None) -> list[str]:
    """What ``full`` (and, for an unknown section, the keys inside it) are called here."""
    known = set(schema or [])
    notes: list[str] = []
    for path in [full, *_flatten(value, full)]:
        parts = path.split(".")
        leaf = parts[-1]
        # The longest tail first: EasyR1's worker.rollout.n matches "rollout.n" before "n".
        tails = [".".join(parts[i:]) for i in range(len(parts))]
        name = next((tail for tail in tails if tail in FOREIGN_KEYS), None)
        if name is not None:
            target, whose, note = FOREIGN_KEYS[name]
            if target == path or (target is not None and known and target not in known):
                continue  # already in place, or this task has no such key
            text = f"is `{target}` here" if target else "has no counterpart here"
            notes.append(f"{whose}'s {name} {text}" + (f" ({note})" if note else ""))
        elif path != full:  # e.g. EasyR1's worker.actor.optim.lr: the same name exists here, in its own place
            targets = [k for k in schema or [] if k.rsplit(".", 1)[-1] == leaf]
            if targets:  # the one sharing the longest tail (optim.lr, not cold_start.lr)
                best = max(targets, key=lambda k: len(os.path.commonprefix([k.split(".")[::-1],
                                                                            parts[::-1]])))
                notes.append(f"{path} is `{best}` here")
        if len(notes) == 4:
            break
    return list(dict.fromkeys(notes))


def unknown_key_hint(key: str, valid: list[str], where: str, value: Any = None,
                     schema: list[str] | None = None) -> str:
    """The hint after "unknown config key 'where+key'": the equivalent of a TRL / EasyR1 / verl name, else
    the same name in another section, else the nearest key — here (as before) or, when clearly nearer, in
    any section of ``schema`` (every dotted key, see :func:`mmrl.config.schema_keys`)."""
    full = where + key
    notes = _foreign_notes(full, value, schema)
    if notes:
        local = difflib.get_close_matches(key, valid, n=1, cutoff=0.85)  # optim.beta: betas or algorithm.beta
        return " — " + "; ".join(notes) + (f"; or did you mean {local[0]!r}?" if local else ".")
    schema = schema or []
    elsewhere = [k for k in schema if k.rsplit(".", 1)[-1] == key and k != full]
    if elsewhere:
        also = f" (or {', '.join(repr(k) for k in elsewhere[1:])})" if len(elsewhere) > 1 else ""
        return f". Did you mean {elsewhere[0]!r}{also}?"
    local = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    local_score = difflib.SequenceMatcher(None, key, local[0]).ratio() if local else 0.0
    leaves: dict[str, list[str]] = {}
    for k in schema:
        leaves.setdefault(k.rsplit(".", 1)[-1], []).append(k)
    near = difflib.get_close_matches(key, list(leaves), n=1, cutoff=0.75)
    if near and difflib.SequenceMatcher(None, key, near[0]).ratio() > local_score:
        targets = [k for k in leaves[near[0]] if k != where + near[0]]
        if targets:
            also = f" (or {', '.join(repr(k) for k in targets[1:])})" if len(targets) > 1 else ""
            return f". Did you mean {targets[0]!r}{also}?"
    return f". Did you mean {local[0]!r}?" if local else "."
