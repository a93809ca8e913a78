"""The child processes of ``bench/vs_trl.py``: one training system each, driven step by step over pipes.

    python bench/_vs_trl_workers.py {mmrl,mmrl_papo,trl} SPEC_JSON

The child builds its trainer from the model directory and settings in ``SPEC_JSON`` (see
``vs_trl.worker_spec``), then answers one JSON line per command read from stdin: ``step`` runs one training
step (one rollout of ``prompts × group`` completions and one optimizer update) and replies with its wall time,
the time of each phase, the completion tokens and the images the vision tower encoded, and the process's
peak RSS so far; ``quit`` ends the process. The first line it writes says it is ready (or why not). The
protocol owns the real stdout: whatever else the libraries print goes to stderr.

Phases (``time.perf_counter`` around the wrapped calls, summed over the step; ``other`` is the rest):

* mmrl — ``generate``: ``Trainer._collect`` (prompt encoding, sampling, decoding, rewards); ``forward``:
  ``VisionPolicy.log_probs`` (the policy's forward with gradient; PAPO's masked-view forward too);
  ``backward``: ``Accelerator.backward``. The step is one ``Trainer._rollout_step()`` call.
* TRL — ``generate``: ``GRPOTrainer._generate_and_score_completions`` (prompt processing, sampling,
  decoding, rewards, advantages); ``forward``: ``GRPOTrainer.compute_loss`` (forward + loss); ``backward``:
  ``Accelerator.backward``. The step runs inside ``trainer.train()``: a callback blocks at ``on_step_end``
  until the next command, so one step is the loop's own work from there to the next ``on_step_end``
  (the previous step's logging, the next batch, forward/backward, clipping, optimizer and scheduler step).
"""

from __future__ import annotations

import functools
import json
import os
import resource
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PHASES = ("generate", "forward", "backward")
SYSTEMS = ("mmrl", "mmrl_papo", "trl")


def bench_reward(prompts=None, completions=None, **kwargs) -> list[float]:
    """A deterministic function of the completion text (the same on both sides; its value is irrelevant to
    timing, but it is rarely equal within a group, so advantages are non-zero). TRL passes conversational
    completions as ``[{"role": "assistant", "content": text}]``, mmrl plain strings."""
    out = []
    for completion in completions:
        if not isinstance(completion, str):
            content = completion[-1]["content"]
            completion = content if isinstance(content, str) else "".join(p.get("text", "") for p in content)
        out.append(sum(map(ord, completion)) % 5 / 4)
    return out


class Meter:
    """Per-step phase times and vision-tower image counts, filled by wrappers and a forward hook."""

    def __init__(self) -> None:
        self.phase: str | None = None
        self.reset()

    def reset(self) -> None:
        self.times = dict.fromkeys(PHASES, 0.0)
        self.images = dict.fromkeys((*PHASES, "other"), 0)
        self.completion_tokens = 0

    def wrap(self, owner, name: str, phase: str, after=None) -> None:
        """Replace ``owner.name`` (on the instance) by a timed call attributed to ``phase``."""
        inner = getattr(owner, name)

        @functools.wraps(inner)
        def timed(*args, **kwargs):
            outer, self.phase = self.phase, phase
            start = time.perf_counter()
            try:
                result = inner(*args, **kwargs)
            finally:
                self.times[phase] += time.perf_counter() - start
                self.phase = outer
            if after is not None:
                after(result)
            return result

        setattr(owner, name, timed)

    def count_images(self, model) -> None:
        """Forward hook on the vision tower: images encoded = rows of ``image_grid_thw`` per call."""
        visual = getattr(getattr(model, "model", model), "visual", None) or getattr(model, "visual", None)
        if visual is None:
            raise RuntimeError(f"{type(model).__name__} has no vision tower at .model.visual or .visual")

        def hook(module, args, kwargs, output):
            grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
            self.images[self.phase or "other"] += int(grid.shape[0]) if grid is not None else 0

        visual.register_forward_hook(hook, with_kwargs=True)

    def reply(self, step_s: float) -> dict:
        return {"step_s": step_s, "phases": dict(self.times), "images": dict(self.images),
                "completion_tokens": self.completion_tokens,
                "rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}


class Channel:
    """JSON lines over the original stdout; fd 1 is pointed at stderr so stray prints cannot corrupt it."""

    def __init__(self) -> None:
        self.out = os.fdopen(os.dup(1), "w", buffering=1)
        os.dup2(2, 1)
        sys.stdout = sys.stderr

    def send(self, message: dict) -> None:
        self.out.write(json.dumps(message) + "\n")
        self.out.flush()

    def command(self) -> str:
        line = sys.stdin.readline().strip()
        return line or "quit"  # the parent went away: stop


def records(spec: dict):
    """The synthetic prompts both systems train on (the same config, hence the same records)."""
    from vision.data import VisionDataConfig, build_datasets

    data = VisionDataConfig(train=spec["data"], template="answer", max_train_samples=spec["samples"],
                            synthetic_options={"image_size": spec["image_size"]}, seed=spec["seed"])
    return build_datasets(data)[0]


def model_config(spec: dict):
    from vision.modeling import VisionModelConfig

    return VisionModelConfig(name_or_path=spec["model_dir"], dtype="float32", min_pixels=28 * 28 * 4,
                             max_pixels=spec["image_size"] ** 2)


# ------------------------------------------------------------------------------------------------ mmrl


def run_mmrl(spec: dict, channel: Channel, papo: bool, out_dir: str) -> None:
    import torch

    from mmrl.config import load_config
    from mmrl.trainer import Trainer
    from vision import task as vision_task
    from vision.masking import MaskingConfig
    from vision.modeling import load_model_and_processor
    from vision.policy import VisionPolicy

    tokens = spec["tokens"]
    overrides = [
        f"output_dir={out_dir}", f"seed={spec['seed']}", f"max_steps={spec['max_steps']}",
        f"prompts_per_step={spec['prompts']}", f"group_size={spec['group']}", f"micro_batch_size={spec['prompts'] * spec['group']}",
        f"gradient_checkpointing={str(spec['gradient_checkpointing']).lower()}", "mixed_precision='no'",
        "save_final=false", "logging.progress_bar=false", "logging.log_completions=0",
        "sampling.temperature=1.0", "sampling.top_p=1.0", "sampling.top_k=0",
        f"sampling.max_new_tokens={tokens}", f"sampling.min_new_tokens={tokens}",
        "algorithm.loss_type=dapo", "algorithm.beta=0.0", "algorithm.ppo_epochs=1", f"optim.lr={spec['lr']}",
        f"papo.enabled={str(papo).lower()}"]
    cfg = load_config(None, overrides, section_types=vision_task.SECTION_TYPES)
    cfg.model, cfg.masking = model_config(spec), MaskingConfig()
    model, processor = load_model_and_processor(cfg.model)
    policy = VisionPolicy(model, processor, cfg.logprob_chunk_size, masking=cfg.masking)
    trainer = Trainer(cfg, policy, records(spec), reward_funcs=[bench_reward])
    meter = Meter()
    meter.count_images(trainer.accelerator.unwrap_model(trainer.model))

    def collected(result) -> None:
        meter.completion_tokens += int(result[0].batch.rollout.completion_mask.sum())

    meter.wrap(trainer, "_collect", "generate", after=collected)
    meter.wrap(policy, "log_probs", "forward")
    meter.wrap(trainer.accelerator, "backward", "backward")
    channel.send({"ready": True, "versions": {"torch": torch.__version__},
                  "params": sum(p.numel() for p in model.parameters())})
    while channel.command() == "step":
        meter.reset()
        start = time.perf_counter()
        trainer._rollout_step()
        channel.send(meter.reply(time.perf_counter() - start))


# ------------------------------------------------------------------------------------------------ TRL


def run_trl(spec: dict, channel: Channel, out_dir: str) -> None:
    import torch
    import transformers
    import trl
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from vision.modeling import load_model_and_processor

    model, processor = load_model_and_processor(model_config(spec))
    vocab = processor.tokenizer.get_vocab()
    # mmrl's policy never samples image/video placeholders (a sampled one breaks the next forward); the same here.
    suppress = [vocab[t] for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>") if t in vocab]
    dataset = records(spec)
    # TRL's own row format for VLMs (a datasets.Dataset: the images are stored encoded, decoded when read)
    rows = Dataset.from_list([{"prompt": r["prompt"], "images": r["images"]} for r in (dataset[i] for i in range(len(dataset)))])
    tokens, batch = spec["tokens"], spec["prompts"] * spec["group"]
    gc = spec["gradient_checkpointing"]
    args = GRPOConfig(
        output_dir=out_dir, max_steps=spec["max_steps"], per_device_train_batch_size=batch,
        gradient_accumulation_steps=1, steps_per_generation=1, num_iterations=1, num_generations=spec["group"],
        max_completion_length=tokens, generation_kwargs={"min_new_tokens": tokens, "suppress_tokens": suppress},
        temperature=1.0, top_p=1.0, top_k=0, beta=0.0, loss_type="dapo", learning_rate=spec["lr"],
        bf16=False, fp16=False, gradient_checkpointing=gc,
        gradient_checkpointing_kwargs={"use_reentrant": False} if gc else None,
        report_to="none", save_strategy="no", seed=spec["seed"])
    meter = Meter()
    meter.count_images(model)

    class Driver(TrainerCallback):
        """Blocks the training loop between steps until the parent asks for the next one."""

        start = 0.0

        def wait(self) -> None:
            if channel.command() != "step":
                channel.out.flush()
                os._exit(0)  # no teardown: the parent is done with this system
            meter.reset()
            self.start = time.perf_counter()

        def on_train_begin(self, args, state, control, **kwargs):
            channel.send({"ready": True, "params": sum(p.numel() for p in model.parameters()),
                          "versions": {"trl": trl.__version__, "transformers": transformers.__version__,
                                       "torch": torch.__version__}})
            self.wait()

        def on_step_end(self, args, state, control, **kwargs):
            channel.send(meter.reply(time.perf_counter() - self.start))
            self.wait()

    trainer = GRPOTrainer(model=model, reward_funcs=[bench_reward], args=args, train_dataset=rows,
                          processing_class=processor, callbacks=[Driver()])

    def scored(output) -> None:
        meter.completion_tokens += int(output["completion_mask"].sum())

    meter.wrap(trainer, "_generate_and_score_completions", "generate", after=scored)
    meter.wrap(trainer, "compute_loss", "forward")
    meter.wrap(trainer.accelerator, "backward", "backward")
    trainer.train()
    channel.command()  # after the last step: wait for "quit"


def main(argv: list[str]) -> None:
    system, spec = argv[0], json.loads(argv[1])
    if system not in SYSTEMS:
        raise SystemExit(f"unknown system {system!r}; one of {SYSTEMS}")
    channel = Channel()
    try:
        with tempfile.TemporaryDirectory(prefix=f"vs_trl_{system}_") as out_dir:
            if system == "trl":
                run_trl(spec, channel, out_dir)
            else:
                run_mmrl(spec, channel, system == "mmrl_papo", out_dir)
    except BaseException as exc:  # the parent prints it and stops
        if isinstance(exc, SystemExit) and not exc.code:
            raise
        channel.send({"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()})
        raise SystemExit(1) from exc


if __name__ == "__main__":
    main(sys.argv[1:])
