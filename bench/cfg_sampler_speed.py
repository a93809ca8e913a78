"""Benchmark: image tokens/s of the CFG sampler against the previous implementation, side by side.

The config of the issue: a LlamaGen GPT with dim 256, 8 layers (4 heads of 64, as in LlamaGen's presets),
a 16384-entry codebook and 256 image tokens (16×16), class-conditioned; 16 images per call with CFG 2.0
(so a batch of 32 per forward), temperature 1, no top-k/top-p, KV cache on. The baseline is the sampler
and model of git revision ``--baseline`` (default: the commit before the speed-ups), loaded from
``git show`` into a temporary module and given the same weights. Calls alternate (old, new, new, old, …)
so machine load hits both alike; the medians are compared. Before timing, greedy decoding (no random draw)
of both must give the same tokens: the guided distribution itself is unchanged.

Target: ≥ 2× the baseline's tokens/s. Prints a table; only with ``--write`` does it replace its section of
BENCHMARKS.md. On a loaded machine the ratio is noisy: re-measure on a quiet one.

    python bench/cfg_sampler_speed.py [--repeats 5] [--batch 16] [--tokens 256] [--baseline REV] [--write]
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _sections  # noqa: E402

from image_gen.gpt import GPT, get_config  # noqa: E402
from image_gen.sampling import sample_image_tokens  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "BENCHMARKS.md"
SECTION = "cfg_sampler_speed"
BASELINE_REV = "7d3383747647"  # last commit with the multinomial sampler and the unfused decoding step


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16, help="images per call (CFG doubles the batch)")
    parser.add_argument("--tokens", type=int, default=256, help="image tokens per image (a square number)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls of each sampler")
    parser.add_argument("--baseline", default=BASELINE_REV, help="git revision holding the previous sampler")
    parser.add_argument("--write", action="store_true", help="replace this benchmark's section of BENCHMARKS.md")
    return parser.parse_args(argv)


def load_baseline(rev: str):
    """``(gpt, sampling)`` modules of ``image_gen`` at git revision ``rev``, imported from temporary files."""
    modules = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("gpt", "sampling"):
            source = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:image_gen/{name}.py"],
                                    capture_output=True, text=True, check=True).stdout
            path = Path(tmp) / f"baseline_{name}.py"
            path.write_text(source)
            module_name = f"_cfg_baseline_{name}"
            spec = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[module_name] = module  # dataclasses look their module up while the class is built
            spec.loader.exec_module(module)
            modules.append(module)
    return tuple(modules)


def build_models(tokens: int, baseline_gpt) -> tuple[torch.nn.Module, torch.nn.Module]:
    config = get_config("GPT-B", dim=256, n_layer=8, n_head=4, vocab_size=16384, block_size=tokens, num_classes=10)
    torch.manual_seed(0)
    new = GPT(config).eval()
    torch.nn.init.normal_(new.output.weight, std=0.02)  # the zero-initialised head would sample uniformly
    old = baseline_gpt.GPT(baseline_gpt.GPTConfig(**vars(config))).eval()
    old.load_state_dict(new.state_dict())
    return old, new


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    old_gpt, old_sampling = load_baseline(args.baseline)
    old_model, new_model = build_models(args.tokens, old_gpt)
    samplers = {"old": (old_sampling.sample_image_tokens, old_model), "new": (sample_image_tokens, new_model)}
    cond = torch.arange(args.batch) % 10
    greedy = {name: fn(model, cond, min(args.tokens, 32), cfg_scale=2.0, temperature=0.0).tokens
              for name, (fn, model) in samplers.items()}
    if not torch.equal(greedy["old"], greedy["new"]):
        raise SystemExit("greedy tokens differ between the baseline and the current sampler")
    times: dict[str, list[float]] = {"old": [], "new": []}
    load_before = os.getloadavg()[0]
    for i in range(args.repeats + 1):  # round 0 warms both up and is not timed
        for name in (("old", "new") if i % 2 else ("new", "old")):
            fn, model = samplers[name]
            generator = torch.Generator().manual_seed(i)
            start = time.perf_counter()
            fn(model, cond, args.tokens, cfg_scale=2.0, temperature=1.0, generator=generator, with_logp=True)
            if i:
                times[name].append(time.perf_counter() - start)
    load_after = os.getloadavg()[0]
    n = args.batch * args.tokens
    rate = {name: n / statistics.median(ts) for name, ts in times.items()}
    ratio = rate["new"] / rate["old"]
    machine = (f"{platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads, torch "
               f"{torch.__version__}, 1-min load {load_before:.1f} → {load_after:.1f}")
    table = ("| date | sampler config | baseline (git " + args.baseline + ") | current | ratio | machine |\n"
             "|---|---|---|---|---|---|\n"
             f"| {datetime.date.today()} | GPT dim 256 × 8 layers, vocab 16384, {args.batch} images × {args.tokens} "
             f"tokens, CFG 2.0, KV cache, logp recorded | {rate['old']:.0f} tok/s | {rate['new']:.0f} tok/s | "
             f"**{ratio:.2f}×** (target ≥ 2×) | {machine} |")
    print(table)
    if args.write:
        body = ("## CFG sampler: image tokens/s against the previous implementation\n\n"
                f"`python bench/cfg_sampler_speed.py --repeats {args.repeats} --write`: both samplers in one "
                f"process on the same weights, calls alternating, medians of {args.repeats}; greedy tokens "
                "checked identical first. Target: ≥ 2×.\n\n" + table)
        BENCHMARKS.write_text(_sections.update_section(BENCHMARKS.read_text(), body, SECTION))
    return {"old_tok_s": rate["old"], "new_tok_s": rate["new"], "ratio": ratio}


if __name__ == "__main__":
    main()
