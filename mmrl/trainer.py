"""The one trainer: GRPO-family RL for any :class:`~mmrl.policy.Policy`.

One rollout step, one line per phase in :meth:`Trainer._rollout_step`:

1. **collect** — ``P`` prompts, ``G`` completions each (group sampling), decoded and rewarded; with DAPO's
   dynamic sampling, repeated until the batch holds ``P`` informative groups (:mod:`mmrl.collect`);
2. **prepare** (no gradient) — what the registered components declare they need: old / reference /
   sampler log-probs, entropies, PAPO's masked view;
3. **shape** → **select** → **advantages** → **weigh** — step components (:mod:`mmrl.components`) change
   rewards, take samples or tokens out of the loss, and add per-token weights; the advantage estimator
   (:mod:`mmrl.advantages`) works on whole groups;
4. **updates** — ``ppo_epochs`` passes over mini-batches of whole groups, each one optimizer update
   accumulated over micro-batches: objective (:mod:`mmrl.objectives`) → weights → mask → aggregation over
   the mini-batch's global counts → + each loss term (:mod:`mmrl.loss_terms`).

Multi-GPU goes through ``accelerate``: each process samples its own prompts, so groups never span
processes; loss normalisers and metrics are reduced across processes.

Nothing is lost: a checkpoint (:mod:`mmrl.checkpoint`) holds every process's RNG and sampler state and
the KL reference, so a killed run resumes bit-exactly; SIGTERM/SIGINT finish the step, save and stop
(``trainer.preempted``); an update with a non-finite loss or gradient is skipped (:mod:`mmrl.faults`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import get_scheduler

from mmrl import algorithms, checkpoint
from mmrl.advantages import ADVANTAGE_ESTIMATORS, AdvantageParams
from mmrl.checkpoint import isolated_rng
from mmrl.collect import ROLLOUT_SOURCES, Chunk, Collected, build_collector, generation_metrics, keep_groups
from mmrl.components import build_components
from mmrl.config import TrainConfig, to_dict
from mmrl.data import make_sampler
from mmrl.evaluation import evaluate_policy
from mmrl.faults import StopRequest, UpdateGuard
from mmrl.logger import MetricsLogger, plot_reward_curve
from mmrl.loss_terms import MicroBatch, build_loss_terms
from mmrl.objectives import ObjectiveParams, get_objective, objective_spec
from mmrl.perception import CollapseMonitor, MaskedViewPolicy
from mmrl.policy import Policy, Rollout, Sampling
from mmrl.processes import (
    configure_deepspeed,
    end_processes,
    ignored_backend,
    make_accelerator,
    unsupported_setup,
    whole_root_parameters,
)
from mmrl.reference import Reference
from mmrl.resumable import Resumable
from mmrl.rewards import RewardFaults, RewardFn, build_reward, compute_rewards, get_reward, reward_name
from mmrl.step import StepBatch

logger = logging.getLogger(__name__)

Tensor = torch.Tensor


def _mixed_precision(setting: str) -> str:
    if setting != "auto":
        return setting
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


class Trainer(Resumable):
    """Trains ``policy`` with GRPO-family RL on ``train_dataset`` (a sequence of prompt records).

    ``reward_funcs`` overrides ``config.rewards``: callables (or registry names) with TRL's signature,
    weighted by ``reward_weights`` (default 1 each).
    """

    def __init__(
        self,
        config: TrainConfig,
        policy: Policy,
        train_dataset: Sequence[dict],
        eval_dataset: Sequence[dict] | None = None,
        reward_funcs: Sequence[RewardFn | str] | None = None,
        reward_weights: Sequence[float] | None = None,
    ):
        self.config = cfg = config
        self._check_config(cfg)
        self.accelerator = make_accelerator(mixed_precision=_mixed_precision(cfg.mixed_precision))
        running = getattr(self.accelerator.distributed_type, "value", self.accelerator.distributed_type)
        if (backend := ignored_backend(running)) is not None and self.accelerator.is_main_process:
            logger.warning("the accelerate config asks for %s, but accelerate runs %s (on CPU processes it does not "
                           "shard): every process holds the whole model", backend, running)
        set_seed(cfg.seed + self.accelerator.process_index)
        self.generator = torch.Generator().manual_seed(cfg.seed)  # mini-batch shuffling
        # PAPO's masks: their own stream, so turning PAPO on does not change the mini-batch order.
        self.mask_generator = torch.Generator().manual_seed(cfg.seed + 7919 * (1 + self.accelerator.process_index))
        self.collapse_monitor = CollapseMonitor(cfg.papo.monitor_window) if cfg.papo.enabled else None

        self.policy = policy
        if reward_funcs is None:
            reward_funcs = [r.name for r in cfg.rewards]
            reward_weights = [r.weight for r in cfg.rewards] if reward_weights is None else reward_weights
            self.reward_fns: list[RewardFn] = [build_reward(r.name, r.args) for r in cfg.rewards]
        else:
            self.reward_fns = [get_reward(f) for f in reward_funcs]
        self.reward_names = [f if isinstance(f, str) and ".py:" not in f else reward_name(g)
                             for f, g in zip(reward_funcs, self.reward_fns)]
        self.reward_weights = list(reward_weights) if reward_weights is not None else [1.0] * len(self.reward_fns)
        if len(self.reward_weights) != len(self.reward_fns):
            raise ValueError(f"{len(self.reward_fns)} reward functions but {len(self.reward_weights)} weights")

        # The algorithm, as registered components chosen by name: the objective (policy-ratio loss), the
        # advantage estimator, and the loss terms the config turns on (KL, PAPO's perception term, ...).
        # Each term declares what it needs prepared; the trainer builds only that.
        alg = cfg.algorithm
        self.objective = get_objective(alg.objective)
        self.objective_spec = objective_spec(alg.objective)  # what it compares to (old / ref log-probs)
        self.objective_params = ObjectiveParams(epsilon=alg.epsilon, epsilon_high=alg.epsilon_high,
                                                dual_clip=alg.dual_clip, delta=alg.delta, tau_pos=alg.tau_pos,
                                                tau_neg=alg.tau_neg, dpo_beta=alg.dpo_beta, dpo_loss=alg.dpo_loss,
                                                dpo_label_smoothing=alg.dpo_label_smoothing,
                                                dpo_nll_coef=alg.dpo_nll_coef)
        self.advantage_fn = ADVANTAGE_ESTIMATORS[alg.advantage_estimator]
        self.advantage_params = AdvantageParams(scale=cfg.algorithm.adv_scale)
        self.loss_terms = build_loss_terms(cfg)
        self.collector = build_collector(cfg)  # one generation round, or DAPO's dynamic sampling; DPO's pairs
        self.rollout_source = ROLLOUT_SOURCES[alg.pairs]  # sampled, or a preference dataset's pairs
        self.components = build_components(cfg)  # reward shaping, group filters, per-token weights
        self.needs = frozenset().union(*(c.needs for c in [*self.loss_terms.values(), *self.components.values(),
                                                            self.objective_spec]))
        if alg.rollout_model == "reference":  # semi-online DPO: the generator is the (periodically synced) reference
            self.needs |= {"model:ref"}
        if "logps:sampler" in self.needs:
            if not hasattr(policy, "record_sampler_logp"):
                raise ValueError(f"{sorted(self.components)} need the sampler's log-probs; "
                                 f"{type(policy).__name__} does not record them")
            policy.record_sampler_logp = True
        self._entropy_mode: bool | str = "grad" if "entropy:grad" in self.needs else True
        if "views:masked" in self.needs and not isinstance(policy, MaskedViewPolicy):
            raise ValueError(f"{sorted(self.loss_terms)} need a policy with a masked_view() method; "
                             f"{type(policy).__name__} has none")

        model = policy.model
        # A task may have checkpointed parts of the model itself (vision: model.gradient_checkpointing).
        already = any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())
        if cfg.gradient_checkpointing and not already and hasattr(model, "gradient_checkpointing_enable"):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # The KL reference (mmrl.reference), built when a component needs it: a frozen copy of the starting
        # weights, or for a LoRA model the policy with its adapter disabled. ref_model: the copy, else None.
        self.reference = (Reference(model, self.accelerator.device, refreshed=alg.ref_sync_steps > 0)
                          if self.needs & {"logps:ref", "model:ref"} else None)
        self.ref_model = self.reference.state if self.reference is not None else None

        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                                      weight_decay=cfg.optim.weight_decay)
        self.updates_per_step = cfg.algorithm.ppo_epochs * math.ceil(self.rollout_size / self.mini_batch_size)
        scheduler = get_scheduler(cfg.optim.scheduler, optimizer, num_warmup_steps=cfg.optim.warmup_steps,
                                  num_training_steps=cfg.max_steps * self.updates_per_step)
        if (reason := unsupported_setup(self.accelerator, model)) is not None:
            raise ValueError(reason)
        for note in configure_deepspeed(self.accelerator, cfg.optim.max_grad_norm, cfg.micro_batch_size):
            if self.accelerator.is_main_process:
                logger.warning(note)
        self.model, self.optimizer, self.scheduler = self.accelerator.prepare(model, optimizer, scheduler)

        self.train_dataset = train_dataset
        self.eval_dataset = eval_dataset
        self.sampler = make_sampler(train_dataset, cfg, self.accelerator.process_index)  # SRPO: history, stages
        self.output_dir = Path(cfg.output_dir)
        self.rollout_step = 0
        self.global_step = 0  # optimizer update slots (a skipped non-finite update still takes its slot)
        self.metrics_logger: MetricsLogger | None = None
        self.update_guard = UpdateGuard(cfg.max_consecutive_skips, warn=self.accelerator.is_main_process)
        self.reward_faults = RewardFaults()  # this process's missing-reward counts (warned once per kind)
        # Facts about the run that a resumed run must not re-measure (e.g. accuracy before RL, the cold
        # start's metrics): whoever drives the trainer fills it; every checkpoint carries it.
        self.run_info: dict[str, Any] = {}
        self.preempted = False  # set when a stop signal ended train() early (after saving)
        self.resumed_from: Path | None = None
        if self.accelerator.is_main_process:
            checkpoint.remove_stale_saves(self.output_dir)
        if cfg.resume_from:
            path = checkpoint.resolve_resume(cfg.resume_from, self.output_dir)
            if path is None:
                logger.info("resume_from=latest: no checkpoint in %s yet; starting from scratch", self.output_dir)
            else:
                self._resume(path)

    # ------------------------------------------------------------------ configuration

    @property
    def rollout_size(self) -> int:
        return self.config.prompts_per_step * self.config.group_size

    @property
    def mini_batch_size(self) -> int:
        return self.config.mini_batch_size or self.rollout_size

    @staticmethod
    def _check_config(cfg: TrainConfig) -> None:
        algorithms.aggregate_loss(torch.zeros(1, 1), torch.ones(1, 1), cfg.algorithm.loss_type)  # validates name
        if cfg.algorithm.adv_scale not in algorithms.ADVANTAGE_SCALES:
            raise ValueError(f"algorithm.adv_scale={cfg.algorithm.adv_scale!r}; valid: {list(algorithms.ADVANTAGE_SCALES)}")
        if cfg.algorithm.kl_estimator not in algorithms.KL_ESTIMATORS:
            raise ValueError(f"algorithm.kl_estimator={cfg.algorithm.kl_estimator!r}; valid: {sorted(algorithms.KL_ESTIMATORS)}")
        if cfg.group_size < 2:
            raise ValueError(f"group_size must be >= 2 for group-relative advantages, got {cfg.group_size}")
        for name in ("prompts_per_step", "micro_batch_size", "max_steps"):
            if getattr(cfg, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(cfg, name)}")

    # ------------------------------------------------------------------ the loop

    def train(self) -> list[dict[str, Any]]:
        """Run rollout steps up to ``max_steps`` (from where a resumed run left off). Returns the logged
        metrics of the whole run (main process). A stop signal ends it early, after a checkpoint."""
        cfg, acc = self.config, self.accelerator
        if acc.is_main_process:
            self.metrics_logger = MetricsLogger(
                self.output_dir, cfg.logging.report_to, config=to_dict(cfg), project=cfg.logging.project,
                run_name=cfg.logging.run_name, resume_step=self.global_step if self.resumed_from else None)
        bar = tqdm(total=cfg.max_steps, initial=self.rollout_step, desc="GRPO", unit="step",
                   disable=not (cfg.logging.progress_bar and acc.is_main_process), dynamic_ncols=True)
        with StopRequest() as stop:
            while self.rollout_step < cfg.max_steps:
                metrics = self._rollout_step()
                bar.update(1)
                bar.set_postfix(reward=f"{metrics['reward']:.3f}", kl=f"{metrics.get('kl', 0.0):.3f}")
                if cfg.eval.every_steps and self.eval_dataset is not None and self.rollout_step % cfg.eval.every_steps == 0:
                    self._log({f"eval/{k}": v for k, v in self.evaluate().items()})
                if self._stop_requested(stop):
                    self.save_checkpoint()
                    self.preempted = True
                    logger.warning("stopped by %s after rollout step %d; resume with --resume latest",
                                   stop.signal_name or "a signal on another process", self.rollout_step)
                    break
                if cfg.save_steps and self.rollout_step % cfg.save_steps == 0 and self.rollout_step < cfg.max_steps:
                    self.save_checkpoint()
            bar.close()
            if cfg.save_final and not self.preempted:
                self.save_checkpoint()
        history = self.metrics_logger.history if self.metrics_logger else []
        if self.metrics_logger is not None:
            plot_reward_curve(history, self.output_dir / "reward_curve.png", title=f"reward — {self.output_dir.name}")
            self.metrics_logger.close()
        return history

    def close(self) -> None:
        """End the run's processes at the end of a script under ``accelerate launch`` (the ``mmrl`` command
        does this itself); a no-op in a single process. The model is unwrapped first: the DDP wrapper holds the
        process group, which would otherwise outlive ``destroy_process_group`` and be torn down during
        interpreter exit, where a gloo worker thread aborts the process (see
        :func:`mmrl.processes.end_processes`). No training or evaluation on this trainer afterwards."""
        self.model = self.accelerator.unwrap_model(self.model)
        self.accelerator.free_memory()  # accelerate's own references to the wrapped model
        end_processes()

    def _rollout_step(self) -> dict[str, float]:
        """One rollout step, one line per phase."""
        cfg = self.config
        start = time.perf_counter()
        collected, gen_time = self._collect()                         # generate → rewards → dynamic sampling
        batch = collected.batch
        self._prepare(batch)                                          # old/ref/sampler log-probs, views
        self._phase("shape", batch)                                   # reward shaping (overlong, KL in reward)
        self._phase("select", batch)                                  # group filters (GFPO, truncation, ...)
        batch.advantages = self._advantages(batch)                    # group-relative advantages
        self._phase("weigh", batch)                                   # per-token weights (TIS / MIS, top-entropy)
        rollout_metrics = self._step_metrics(collected, gen_time)     # what was generated, what each phase did
        update_metrics: dict[str, float] = {}
        self.model.train()
        for _ in range(cfg.algorithm.ppo_epochs):                     # updates on whole-group mini-batches
            for index in batch.minibatches(self.mini_batch_size, self.generator):
                update_metrics = self._update(batch.select(index))
                self._after_update(rollout_metrics, update_metrics, start)
        if not update_metrics:  # nothing to train on (dynamic sampling found no informative group)
            update_metrics = {"update_skipped": 1.0, "skipped_updates": float(self.update_guard.skipped_total)}
            self._after_update(rollout_metrics, update_metrics, start)
        self.rollout_step += 1
        return {**rollout_metrics, **update_metrics}

    def _step_metrics(self, collected: Collected, gen_time: float) -> dict[str, float]:
        batch = collected.batch
        metrics = self._rollout_metrics(collected)
        metrics["timing/generate_s"] = gen_time
        shaped = batch.rewards[~torch.isnan(batch.rewards)]  # after shaping and filters ("reward" is before)
        component_metrics = {"reward_shaped": float(shaped.mean()) if shaped.numel() else float("nan")}
        for component in [self.collector, *self.components.values()]:
            component_metrics.update(component.metrics())
        metrics.update(self._mean_across_processes(component_metrics))
        if "masked" in batch.views:
            metrics["papo/samples_without_view"] = float((~batch.views["masked"][1]).sum())
        return metrics

    def _collect(self) -> tuple[Collected, float]:
        """Generation rounds until the batch is full (:mod:`mmrl.collect`); under several processes every
        process keeps the same number of groups (the smallest), so all run the same updates."""
        gen_time = 0.0

        def generate() -> Chunk:
            nonlocal gen_time
            chunk = self._generate_chunk()
            gen_time += chunk.generate_s
            return chunk

        collected = self.collector.collect(generate, self.config.prompts_per_step, self._any_process)
        if self.accelerator.num_processes > 1:
            groups = torch.tensor([float(collected.batch.num_groups)], device=self.accelerator.device)
            groups = self.accelerator.gather(groups).min()
            collected = keep_groups(collected, int(groups.item()))
        return collected, gen_time

    def _generate_chunk(self) -> Chunk:
        """Sample a group per prompt (no gradient, eval mode for deterministic layers), decode, reward."""
        cfg, acc = self.config, self.accelerator
        start = time.perf_counter()
        records = self.sampler.next_batch(self.rollout_step)  # the step picks the stage (data.stages)
        self.model.eval()
        with torch.no_grad(), whole_root_parameters(self.model):
            rollout = self._with_rollout_model(
                lambda model: self.rollout_source(self.policy, acc.unwrap_model(model), records, cfg.group_size,
                                                  cfg.sampling))
        generate_s = time.perf_counter() - start
        completions = self.policy.decode(rollout)
        rewards = compute_rewards(self.reward_fns, self.reward_weights, rollout.prompts, completions,
                                  rollout.columns, timeout=cfg.reward_timeout, names=self.reward_names,
                                  faults=self.reward_faults)
        # SRPO history resampling remembers each prompt's outcomes (a no-op when it is off)
        self.sampler.record(rewards, torch.arange(rollout.batch_size) // rollout.group_size)
        return Chunk(rollout, completions, rewards, generate_s)

    def _with_rollout_model(self, fn: Callable[[torch.nn.Module], Rollout]) -> Rollout:
        """``fn(model)`` with the weights that sample (``algorithm.rollout_model``): the policy, or the
        reference (semi-online DPO), which :meth:`Reference.score` provides."""
        if self.config.algorithm.rollout_model == "reference":
            return self.reference.score(fn, self.model)
        return fn(self.model)

    def _phase(self, phase: str, batch: StepBatch) -> None:
        for component in self.components.values():
            getattr(component, phase)(batch)

    def _advantages(self, batch: StepBatch) -> Tensor:
        """Advantages over every process's samples: a group never spans processes, but batch-level statistics
        (``adv_scale: batch``, REINFORCE++ whitening) are those of the global batch, as in TRL. Every process
        holds the same number of samples (collect trims to the smallest), so a gather lines them up."""
        acc = self.accelerator
        if acc.num_processes == 1:
            return self.advantage_fn(batch.rewards, batch.group_id, self.advantage_params).to(acc.device)
        rewards = acc.gather(batch.rewards.to(acc.device))
        group_id = acc.gather((batch.group_id + acc.process_index * batch.num_groups).to(acc.device))
        advantages = self.advantage_fn(rewards.cpu(), group_id.cpu(), self.advantage_params)
        return advantages[acc.process_index * batch.size:(acc.process_index + 1) * batch.size].to(acc.device)

    def _prepare(self, batch: StepBatch) -> None:
        """What the update and the loss terms need, computed once per rollout without gradient."""
        # With one update per rollout the policy has not moved yet when it is scored, so old_logp =
        # logp.detach() and this pass is skipped (as in TRL).
        if self.updates_per_step > 1 or "logps:old" in self.needs or "entropy:old" in self.needs:
            logp, entropy = self._score(self.model, batch.rollout, with_entropy="entropy:old" in self.needs)
            if self.updates_per_step > 1 or "logps:old" in self.needs:
                batch.logps["old"] = logp
            if entropy is not None:  # e.g. top-entropy token selection, over the whole rollout
                batch.entropies["old"] = entropy
        if "logps:sampler" in self.needs:
            if batch.rollout.sampler_logp is None:
                raise ValueError(f"{type(self.policy).__name__}.generate did not fill Rollout.sampler_logp")
            batch.logps["sampler"] = batch.rollout.sampler_logp
        if "logps:ref" in self.needs:
            batch.logps["ref"] = self.reference.score(lambda model: self._score(model, batch.rollout)[0], self.model)
        if "views:masked" in self.needs:  # PAPO: one mask per prompt, shared by its group
            batch.views["masked"] = self.policy.masked_view(batch.rollout, self.mask_generator)

    def _after_update(self, rollout_metrics: dict[str, float], update_metrics: dict[str, float], start: float) -> None:
        if self.collapse_monitor is not None and "papo/perception_kl" in update_metrics:
            self.collapse_monitor.update(update_metrics["papo/perception_kl"], update_metrics["papo/entropy_orig"],
                                         update_metrics["papo/entropy_masked"], self.global_step)
        self.global_step += 1
        self._sync_reference()
        step_time = time.perf_counter() - start
        self._log({**rollout_metrics, **update_metrics, "step_time": step_time,
                   "tokens_per_second": rollout_metrics["completions/total_tokens"] / step_time,
                   "learning_rate": self.scheduler.get_last_lr()[0],
                   "epoch": self.sampler.epoch, "rollout_step": self.rollout_step + 1})

    @torch.no_grad()
    def _sync_reference(self) -> None:
        """TRL's ``sync_ref_model``: every ``ref_sync_steps`` optimizer updates, π_ref ← α·π + (1−α)·π_ref."""
        steps, alpha = self.config.algorithm.ref_sync_steps, self.config.algorithm.ref_sync_alpha
        if self.reference is None or not steps or self.global_step % steps:
            return
        self.reference.sync(self.accelerator.unwrap_model(self.model), alpha)

    def _stop_requested(self, stop: StopRequest) -> bool:
        """True on every process if any process got a stop signal (all must save and stop together)."""
        return self._any_process(stop.requested)

    def _any_process(self, flag: bool) -> bool:
        """``flag`` or-ed over every process (a collective: every process must call it)."""
        value = torch.tensor([1.0 if flag else 0.0], device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            value = self.accelerator.reduce(value, reduction="sum")
        return bool(value.item() > 0)

    # ------------------------------------------------------------------ pieces of a step

    @torch.no_grad()
    def _score(self, model: torch.nn.Module, rollout: Rollout, with_entropy: bool = False) -> tuple[Tensor, Tensor | None]:
        """Per-token log-probs (and entropies) of the whole rollout under ``model``, micro-batch by micro-batch."""
        model.eval()
        parts = [self.policy.log_probs(model, rollout.select(i), with_entropy=with_entropy)
                 for i in torch.arange(rollout.batch_size).split(self.config.micro_batch_size) if i.numel()]
        logp = torch.cat([p[0] for p in parts]).detach() if parts else torch.zeros(rollout.completion_ids.shape)
        entropy = torch.cat([p[1] for p in parts]).detach() if with_entropy and parts else None
        return logp, entropy

    def _global_counts(self, mask: Tensor) -> tuple[Tensor, Tensor]:
        """(tokens, sequences) of a mini-batch's mask summed over every process: the loss normaliser."""
        counts = torch.stack([mask.sum(), (mask.sum(dim=1) > 0).sum().to(mask.dtype)]).float()
        if self.accelerator.num_processes > 1:
            counts = self.accelerator.reduce(counts, reduction="sum")
        return counts[0], counts[1]

    def _update(self, batch: StepBatch) -> dict[str, float]:
        """One optimizer update on a mini-batch of whole groups, accumulating over micro-batches.

        Order per micro-batch (as TRL's ``_compute_loss``): per-token objective (importance ratio →
        objective) → per-token weights → the loss mask → aggregation over the *global* token/sequence counts
        of the mini-batch → plus each loss term. Under DDP each process's loss is multiplied by the number of
        processes, because DDP averages gradients while the normaliser already counts every process."""
        cfg, alg, acc = self.config, self.config.algorithm, self.accelerator
        loss_mask = batch.loss_mask.to(acc.device)
        normalisers = {"loss": self._global_counts(loss_mask)}
        for name, (_, has_view) in batch.views.items():
            normalisers[f"view:{name}"] = self._global_counts(loss_mask * has_view.to(loss_mask).unsqueeze(-1))

        def aggregate(values: Tensor, mask: Tensor, normaliser: str) -> Tensor:
            tokens, sequences = normalisers[normaliser]
            total = algorithms.aggregate_loss(values, mask, alg.loss_type, cfg.sampling.max_new_tokens,
                                              global_tokens=tokens, global_sequences=sequences)
            return total * acc.num_processes

        micro = batch.micro_batches(cfg.micro_batch_size)
        sums: dict[str, float] = {}
        for n, index in enumerate(micro):
            part = batch.select(index)
            mask = part.loss_mask.to(acc.device)
            last = n == len(micro) - 1
            sync = contextlib.nullcontext() if last else acc.no_sync(self.model)
            # accelerate's DeepSpeed backward steps the engine whenever sync_gradients is set: only after the
            # last micro-batch of the mini-batch (measured: 4 micro-batches made 4 ZeRO optimizer steps before).
            # A private setter: accelerate's public accumulate() decides by counting steps, not by our batches.
            acc.gradient_state._set_sync_gradients(last)
            with sync:
                logp, entropy = self.policy.log_probs(self.model, part.rollout, with_entropy=self._entropy_mode)
                # the log-probs the objective compares to: "old" (the sampling policy; the current one,
                # detached, when it has not moved yet) or "ref" (DPO)
                baseline = self.objective_spec.compares_to
                old = part.logps[baseline].to(logp.device) if baseline in part.logps else logp.detach()
                per_token, metrics = self.objective(logp, old, part.advantages, mask, self.objective_params)
                weight = part.token_weight()
                if weight is not None:
                    per_token = per_token * weight.to(per_token.device)
                loss = aggregate(per_token, mask, "loss")
                metrics["policy_loss"] = loss.detach()
                metrics["entropy"] = algorithms.masked_mean(entropy.detach(), mask)
                context = MicroBatch(part, logp, entropy, mask, self.model, self.policy, self.rollout_step,
                                     cfg.max_steps, aggregate)
                for term in self.loss_terms.values():
                    value, term_metrics = term(context)
                    loss = loss + value
                    metrics.update(term_metrics)
                acc.backward(loss)
            metrics["loss"] = loss.detach()
            for key, value in metrics.items():  # loss parts add up over micro-batches; monitors are averaged
                share = 1.0 if key in ("loss", "policy_loss") else 1.0 / len(micro)
                sums[key] = sums.get(key, 0.0) + float(value) * share
        return self._apply_update(sums)

    def _apply_update(self, sums: dict[str, float]) -> dict[str, float]:
        """Clip, check for non-finite values (all processes skip together), step."""
        cfg, acc = self.config, self.accelerator
        # The norm is always measured (max_norm=inf scales by exactly 1.0): a non-finite one must be seen.
        max_norm = cfg.optim.max_grad_norm if cfg.optim.max_grad_norm and cfg.optim.max_grad_norm > 0 else math.inf
        # Under DeepSpeed this reads the engine's norm back: the engine has clipped and stepped inside backward —
        # or skipped the step and cleared the gradients on a non-finite norm (ZeRO's overflow check), which it
        # reports as an infinite norm, so the skip is counted below all the same.
        norm = acc.clip_grad_norm_(self.model.parameters(), max_norm)
        sums["grad_norm"] = float("nan") if norm is None else float(norm)
        # With fp16 the grad scaler itself skips an overflowed step and lowers its scale: only a
        # non-finite loss is ours to catch there.
        grad_ok = math.isfinite(sums["grad_norm"]) or acc.scaler is not None
        bad = torch.tensor([0.0 if math.isfinite(sums["loss"]) and grad_ok else 1.0], device=acc.device)
        if acc.num_processes > 1:  # skip on every process together, or the replicas would drift apart
            bad = acc.reduce(bad, reduction="sum")
        if self.update_guard.check(sums["loss"], sums["grad_norm"], self.global_step, elsewhere_bad=bool(bad.item() > 0)):
            self.optimizer.step()
            self.scheduler.step()
            skipped = 0.0
        else:
            skipped = 1.0
        self.optimizer.zero_grad(set_to_none=True)
        out = self._mean_across_processes(sums)
        out["update_skipped"] = skipped
        out["skipped_updates"] = float(self.update_guard.skipped_total)
        return out

    def _rollout_metrics(self, collected: Collected) -> dict[str, float]:
        """Reward and length statistics of every sample generated this step (what the policy does; with
        dynamic sampling that includes the dropped groups — ``reward_shaped`` is over the trained batch)."""
        rollout, rewards, completions = collected.generated, collected.generated_rewards, collected.generated_completions
        m = generation_metrics(rollout, rewards)
        m["skipped_samples"] = float(self.sampler.skipped)
        total = rewards.total
        m.update(self.reward_faults.metrics())
        m.update(self.sampler.metrics())  # SRPO
        if self.config.logging.log_completions and self.accelerator.is_main_process:
            for i in range(min(self.config.logging.log_completions, len(completions))):
                logger.info("step %d sample %d reward=%s: %r", self.rollout_step, i,
                            f"{float(total[i]):.3f}", completions[i] if isinstance(completions[i], str) else type(completions[i]).__name__)
        out = self._mean_across_processes(m)
        for key in self.reward_faults.metrics():  # counts: the sum over processes, not the mean
            out[key] = float(round(out[key] * self.accelerator.num_processes))
        return out

    def _mean_across_processes(self, metrics: dict[str, float]) -> dict[str, float]:
        if self.accelerator.num_processes == 1:
            return metrics
        keys = sorted(metrics)
        values = torch.tensor([metrics[k] for k in keys], device=self.accelerator.device)
        values = self.accelerator.reduce(values, reduction="mean")
        return dict(zip(keys, values.tolist()))

    def _log(self, metrics: dict[str, Any]) -> None:
        if self.metrics_logger is not None:
            self.metrics_logger.log(metrics, self.global_step)

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(self, dataset: Sequence[dict] | None = None, reward: str | Callable | None = None,
                 max_samples: int | None = None) -> dict[str, float]:
        """One completion per record (greedy unless ``eval.temperature > 0``), averaged ``reward``
        (default ``eval.reward``). A missing reward counts as 0 (wrong) and is reported in ``missing``."""
        dataset = self.eval_dataset if dataset is None else dataset
        if dataset is None:
            raise ValueError("no evaluation dataset: pass one to evaluate() or to the Trainer")
        cfg = self.config
        sampling = Sampling(temperature=cfg.eval.temperature, top_p=cfg.sampling.top_p, top_k=cfg.sampling.top_k,
                            max_new_tokens=cfg.eval.max_new_tokens or cfg.sampling.max_new_tokens)
        reward = reward if reward is not None else cfg.eval.reward
        if isinstance(reward, str):  # a training reward's name: same args, same (cached) instance
            args = next((r.args for r in cfg.rewards if r.name == reward), {})
            reward = build_reward(reward, args)
        # Its own random streams, restored afterwards: evaluating (or not) never shifts the training run's
        # randomness, and a resumed run evaluates exactly like the uninterrupted one.
        with isolated_rng(cfg.seed), whole_root_parameters(self.model):
            return evaluate_policy(self.policy, self.accelerator.unwrap_model(self.model), dataset, reward, sampling,
                                   batch_size=cfg.eval.batch_size, max_samples=max_samples,
                                   show_progress=cfg.logging.progress_bar, reward_timeout=cfg.reward_timeout)
