"""Benchmark: KV-cached vs uncached classifier-free-guided sampling of 256 image tokens (16×16 grid) on the
tiny GPT, measured side by side in one run (alternating repeats, medians). Target: cached ≥ 5× tokens/s.
Prints a table row; only with ``--write`` is it appended to BENCHMARKS.md.

    python bench/cfg_kv_cache.py [--batch 16] [--repeats 3] [--write]
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _sections  # noqa: E402

from image_gen.gpt import GPT, get_config
from image_gen.sampling import sample_image_tokens

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "BENCHMARKS.md"
SECTION = "cfg_kv_cache"
HEADING = """## CFG sampling: KV cache vs none

`python bench/cfg_kv_cache.py --write` (one row per run): GPT-tiny, the same calls with and without the KV
cache, alternating, medians. Target ≥ 5×.

| date | what | measured | ratio | machine |
|---|---|---|---|---|"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16, help="conditions per call (CFG doubles the batch)")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--write", action="store_true", help="add the result row to its table in BENCHMARKS.md")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.manual_seed(0)
    model = GPT(get_config("GPT-tiny", vocab_size=64, block_size=args.tokens, num_classes=10)).eval()
    cond = torch.arange(args.batch) % 10
    times: dict[bool, list[float]] = {True: [], False: []}
    sample_image_tokens(model, cond, 8, use_cache=True)  # warm-up
    for _ in range(args.repeats):
        for cached in (True, False):
            start = time.perf_counter()
            sample_image_tokens(model, cond, args.tokens, cfg_scale=2.0, use_cache=cached)
            times[cached].append(time.perf_counter() - start)
    tokens = args.batch * args.tokens
    fast, slow = tokens / statistics.median(times[True]), tokens / statistics.median(times[False])
    line = (f"| {datetime.date.today()} | CFG sampling, {args.tokens} tokens × {args.batch} images, GPT-tiny: "
            f"KV-cached vs uncached | cached {fast:.0f} tok/s, uncached {slow:.0f} tok/s (medians of {args.repeats}) | "
            f"**{fast / slow:.1f}×** (target ≥ 5×) | {platform.machine()}, {torch.get_num_threads()} threads, "
            f"torch {torch.__version__} |")
    print(line)
    if args.write:
        BENCHMARKS.write_text(_sections.append_row(BENCHMARKS.read_text(), SECTION, HEADING, line))
        print(f"updated {BENCHMARKS}")


if __name__ == "__main__":
    main()
