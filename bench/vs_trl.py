"""Benchmark: mmrl vs TRL's ``GRPOTrainer``, side by side in one run, on identical work.

Each system trains in its own child process (``bench/_vs_trl_workers.py``), so each one's peak RSS is its
own. The parent builds one model and saves it once to a temporary directory, starts the children, and
drives them over pipes one step at a time, alternating (the order rotated every round), so machine load
falls on both alike. Per system it takes the median over ``--steps`` steps after ``--warmup`` unmeasured
ones.

The same work on both sides:

* model: a ≈4M-parameter Qwen2.5-VL built locally (text 256 wide × 4 layers, vision 128 wide × 4 blocks,
  the tokenizer of ``tiny-qwen2.5-vl``), random init, fp32, loaded by path through
  ``vision.modeling.load_model_and_processor`` on both sides (TRL gets that processor object as
  ``processing_class``: the image-only processor that needs no torchvision); ``--tiny`` uses the 0.7M
  built-in shape instead (for the test);
* data: ``synthetic:single_shape`` records (one procedural 224×224 image each; ``--long``: 448×448, four
  times the image tokens), built by each child from the same config; each system's own sampler draws them;
* per step: 2 prompts × G=8 completions, every completion exactly ``--tokens`` long (mmrl:
  ``sampling.min_new_tokens = max_new_tokens``; TRL: ``max_completion_length`` plus
  ``generation_kwargs.min_new_tokens``) — counted on both sides every step, and the run fails if the counts
  differ; temperature 1, top_p 1, top_k 0, and on both the four image/video placeholder tokens never
  sampled (mmrl's policy suppresses them; TRL gets the same ``suppress_tokens``); a deterministic reward of
  the completion text (``bench_reward``);
* update: β = 0, ``dapo`` aggregation, one optimizer update per rollout (TRL: ``num_iterations=1``,
  ``per_device_train_batch_size=16``, ``gradient_accumulation_steps = steps_per_generation = 1``; mmrl:
  ``mini_batch_size`` = the rollout, ``micro_batch_size=16``), the same ``--lr``, gradient checkpointing
  as ``--gradient-checkpointing`` says on both (non-reentrant). TRL is otherwise at its defaults (its
  linear learning-rate decay, logging every 10 steps), with ``report_to="none"`` and no checkpoints.

It prints the step-time ratio mmrl/TRL, the peak-RSS ratio (each child's ``ru_maxrss``), the images the
vision tower encodes per step on each side (a forward hook counting ``image_grid_thw`` rows, split by the
phase it ran in) and a per-phase breakdown (generate / log-prob forward / backward / other; how each is
measured: see the workers' docstring). ``--papo`` adds a third child, mmrl with ``papo.enabled=true``, and
prints mmrl's PAPO/GRPO step-time ratio. Only with ``--write`` does it replace its section of
BENCHMARKS.md (``vs_trl``, ``vs_trl_long`` with ``--long``).

    python bench/vs_trl.py [--steps 10] [--warmup 2] [--tokens 64] [--long] [--papo] [--write]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the benches' shared helpers
import _sections  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "BENCHMARKS.md"
WORKERS = Path(__file__).resolve().parent / "_vs_trl_workers.py"
LABELS = {"mmrl": "mmrl", "mmrl_papo": "mmrl + PAPO", "trl": "TRL"}
PHASES = ("generate", "forward", "backward", "other")


def build_model(out_dir: str, tiny: bool, seed: int = 0) -> int:
    """Build the benchmark model, save model + processor to ``out_dir``; its parameter count."""
    import torch
    from transformers import AutoTokenizer, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from vision.modeling import TINY_TOKENIZER_DIR, build_processor, tiny_qwen2_5_vl_config

    tokenizer = AutoTokenizer.from_pretrained(str(TINY_TOKENIZER_DIR))
    config = tiny_qwen2_5_vl_config(tokenizer)  # the built-in 0.7M shape: text 128 × 2, vision 64 × 2
    if not tiny:
        text = {**config.text_config.to_dict(), "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4,
                "num_attention_heads": 4, "num_key_value_heads": 2, "layer_types": None,
                "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [8, 12, 12]}}
        vision = {**config.vision_config.to_dict(), "depth": 4, "hidden_size": 128, "intermediate_size": 512,
                  "num_heads": 4, "out_hidden_size": 256, "fullatt_block_indexes": [1, 3]}
        special = {k: getattr(config, k) for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                                                   "vision_end_token_id", "eos_token_id", "pad_token_id")}
        config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True, **special)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(config)
    image_processor = Qwen2VLImageProcessorPil(patch_size=14, merge_size=2, temporal_patch_size=2)
    model.save_pretrained(out_dir)
    build_processor("qwen2_5_vl", tokenizer, image_processor).save_pretrained(out_dir)
    return sum(p.numel() for p in model.parameters())


def worker_spec(args: argparse.Namespace, model_dir: str) -> dict:
    return {"model_dir": model_dir, "data": "synthetic:single_shape", "image_size": args.image_size,
            "samples": 64, "seed": 0, "prompts": 2, "group": 8, "tokens": args.tokens, "lr": args.lr,
            "gradient_checkpointing": args.gradient_checkpointing, "max_steps": args.warmup + args.steps}


class Child:
    """One system's worker process; JSON lines over its stdin/stdout, its stderr in a log file."""

    def __init__(self, system: str, spec: dict, log_dir: str):
        self.system = system
        self.log_path = Path(log_dir) / f"{system}.log"
        self.log = self.log_path.open("w")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
        self.proc = subprocess.Popen([sys.executable, str(WORKERS), system, json.dumps(spec)], cwd=ROOT, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True)

    def read(self) -> dict:
        line = self.proc.stdout.readline()
        message = json.loads(line) if line.strip() else {"error": f"exited with code {self.proc.wait()}"}
        if "error" in message:
            self.log.flush()
            tail = "".join(self.log_path.read_text().splitlines(keepends=True)[-30:])
            raise RuntimeError(f"{LABELS[self.system]} worker failed: {message['error']}\n"
                               f"{message.get('traceback', '')}--- its stderr (tail) ---\n{tail}")
        return message

    def step(self) -> dict:
        self.proc.stdin.write("step\n")
        self.proc.stdin.flush()
        return self.read()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.close()
                self.proc.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def measure(args: argparse.Namespace, systems: list[str]) -> dict:
    """Alternating steps; {"model_params", "ready": {system: ready message}, "steps": {system: [replies]}}."""
    with tempfile.TemporaryDirectory(prefix="vs_trl_") as tmp:
        model_dir = f"{tmp}/model"
        params = build_model(model_dir, args.tiny)
        spec = worker_spec(args, model_dir)
        children = {name: Child(name, spec, tmp) for name in systems}
        try:
            ready = {name: child.read() for name, child in children.items()}
            steps: dict[str, list[dict]] = {name: [] for name in systems}
            for r in range(args.warmup + args.steps):
                shift = r % len(systems)
                replies = {name: children[name].step() for name in systems[shift:] + systems[:shift]}
                counts = {name: reply["completion_tokens"] for name, reply in replies.items()}
                expected = spec["prompts"] * spec["group"] * spec["tokens"]
                if len(set(counts.values())) != 1 or expected not in counts.values():
                    raise RuntimeError(f"step {r}: completion tokens differ: {counts} (expected {expected} each)")
                if r >= args.warmup:
                    for name, reply in replies.items():
                        steps[name].append(reply)
        finally:
            for child in children.values():
                child.close()
    return {"model_params": params, "ready": ready, "steps": steps}


def summarise(replies: list[dict]) -> dict:
    """Medians over the measured steps; ``other`` = step time minus the three measured phases."""
    phases = {p: statistics.median(r["phases"][p] for r in replies) for p in PHASES[:3]}
    phases["other"] = statistics.median(r["step_s"] - sum(r["phases"][p] for p in PHASES[:3]) for r in replies)
    return {"step_s": statistics.median(r["step_s"] for r in replies), "phases": phases,
            "images": {k: statistics.median(r["images"][k] for r in replies) for k in replies[0]["images"]},
            "tokens": statistics.median(r["completion_tokens"] for r in replies),
            "rss_mb": max(r["rss_kb"] for r in replies) / 1024}


def report(results: dict) -> str:
    s = {name: summarise(replies) for name, replies in results["steps"].items()}
    mmrl, trl = s["mmrl"], s["trl"]
    lines = [
        f"**step time mmrl/TRL: {mmrl['step_s'] / trl['step_s']:.3f}** ({mmrl['step_s']:.3f} s vs {trl['step_s']:.3f} s); "
        f"**peak RSS mmrl/TRL: {mmrl['rss_mb'] / trl['rss_mb']:.3f}** ({mmrl['rss_mb']:.0f} MB vs {trl['rss_mb']:.0f} MB)"]
    if "mmrl_papo" in s:
        papo = s["mmrl_papo"]
        lines.append(f"**mmrl PAPO/GRPO step time: {papo['step_s'] / mmrl['step_s']:.3f}** "
                     f"({papo['step_s']:.3f} s vs {mmrl['step_s']:.3f} s)")
    lines += ["", "| system | step (median) | generate | log-prob forward | backward | other | images encoded "
              "per step (generate + forward + other) | completion tokens per step | peak RSS |",
              "|---|---|---|---|---|---|---|---|---|"]
    for name, r in s.items():
        share = " | ".join(f"{r['phases'][p]:.3f} s ({100 * r['phases'][p] / r['step_s']:.0f}%)" for p in PHASES)
        im = r["images"]
        images = f"{im['generate'] + im['forward'] + im['backward'] + im['other']:g} " \
                 f"({im['generate']:g} + {im['forward']:g} + {im['backward'] + im['other']:g})"
        lines.append(f"| {LABELS[name]} | {r['step_s']:.3f} s | {share} | {images} | {r['tokens']:g} | {r['rss_mb']:.0f} MB |")
    return "\n".join(lines)


def machine_line(results: dict) -> str:
    import torch

    versions = results["ready"]["trl"]["versions"]
    return (f"TRL {versions['trl']}, transformers {versions['transformers']}, torch {versions['torch']}; "
            f"{platform.machine()}, {torch.get_num_threads()} threads (OMP_NUM_THREADS="
            f"{os.environ.get('OMP_NUM_THREADS', 'unset')}); model {results['model_params'] / 1e6:.2f}M parameters")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="measured steps per system (medians over them)")
    parser.add_argument("--warmup", type=int, default=2, help="steps per system run first and not measured")
    parser.add_argument("--tokens", type=int, default=64, help="completion length, forced on both sides")
    parser.add_argument("--lr", type=float, default=1e-6, help="learning rate of both")
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=False,
                        help="gradient checkpointing on both (default off)")
    parser.add_argument("--long", action="store_true", help="448×448 images (4× the image tokens of 224×224)")
    parser.add_argument("--papo", action="store_true", help="a third child: mmrl with PAPO; prints PAPO/GRPO")
    parser.add_argument("--tiny", action="store_true", help="the 0.7M built-in model shape and 56×56 images (tests)")
    parser.add_argument("--write", action="store_true", help="replace this benchmark's section of BENCHMARKS.md")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.tokens < 1:
        parser.error(f"need --steps >= 1, --warmup >= 0, --tokens >= 1; got {args.steps}, {args.warmup}, {args.tokens}")
    args.image_size = 56 if args.tiny else 448 if args.long else 224
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    systems = ["mmrl", "trl", *(["mmrl_papo"] if args.papo else [])]
    results = measure(args, systems)
    table, machine = report(results), machine_line(results)
    print(table)
    print(machine)
    if args.write:
        command = shlex.join(["python", "bench/vs_trl.py", *(argv if argv is not None else sys.argv[1:])])
        size = f"{args.image_size}×{args.image_size}"
        body = (f"## mmrl vs TRL `GRPOTrainer`{' (long prompts)' if args.long else ''}\n\n"
                f"`{command}` ({datetime.date.today()}; {machine}): each system in its own process, steps "
                f"alternating, same saved model, `synthetic:single_shape` with {size} images, 2 prompts × 8 "
                f"completions of exactly {args.tokens} tokens per step (counted on both), β = 0, `dapo`, one update "
                f"per rollout, fp32, gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}; "
                f"{args.warmup} warm-up steps, medians of {args.steps}. How each phase is measured: "
                f"`bench/_vs_trl_workers.py`.\n\n{table}")
        name = "vs_trl_long" if args.long else "vs_trl"
        text = BENCHMARKS.read_text() if BENCHMARKS.exists() else "# Benchmarks\n"
        BENCHMARKS.write_text(_sections.update_section(text, body, name))
        print(f"updated {BENCHMARKS}")
    return results


if __name__ == "__main__":
    main()
