"""Benchmark: mmrl's sampling loop (``vision.decoding``) against transformers' ``model.generate``.

Both sample through ``VisionPolicy.generate`` on the same model and prompts — the ``bench/vs_trl.py``
model (≈4M-parameter Qwen2.5-VL, text 256 × 4, vision 128 × 4; ``--tiny``: the 0.7M built-in shape),
2 prompts × G = 8 completions, ``synthetic:single_shape`` images of ``--image-size`` px, every completion
exactly ``--tokens`` long (``min_new_tokens``), temperature 1, fp32, prompt prefill shared on both — and
differ only in ``lean_decoding``. Before timing, the two must draw identical tokens from the same seed.
Calls alternate (lean, generate, generate, lean, …) so machine load falls on both; medians of
``--repeats`` calls after one warm-up round. Prints the time per call and per decoded token of each and
their ratio; only with ``--write`` does it replace its section of BENCHMARKS.md.

    python bench/decode_loop.py [--repeats 10] [--tokens 64] [--image-size 224] [--tiny] [--write]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))
import _sections  # noqa: E402
import vs_trl  # noqa: E402

from mmrl.policy import Sampling  # noqa: E402
from vision.data import VisionDataConfig, build_datasets  # noqa: E402
from vision.modeling import VisionModelConfig, load_model_and_processor  # noqa: E402
from vision.policy import VisionPolicy  # noqa: E402

BENCHMARKS = ROOT / "BENCHMARKS.md"
SECTION = "decode_loop"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=10, help="timed calls of each")
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per completion (forced)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--tiny", action="store_true", help="the 0.7M built-in model shape (for tests)")
    parser.add_argument("--write", action="store_true", help="replace this benchmark's section of BENCHMARKS.md")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as model_dir:
        params = vs_trl.build_model(model_dir, args.tiny)
        model, processor = load_model_and_processor(VisionModelConfig(
            name_or_path=model_dir, dtype="float32", min_pixels=28 * 28 * 4, max_pixels=args.image_size ** 2))
    model.eval()
    data = VisionDataConfig(train="synthetic:single_shape", template="answer", max_train_samples=args.prompts,
                            synthetic_options={"image_size": args.image_size}, seed=0)
    records = [build_datasets(data)[0][i] for i in range(args.prompts)]
    sampling = Sampling(temperature=1.0, max_new_tokens=args.tokens, min_new_tokens=args.tokens)
    policies = {"loop": VisionPolicy(model, processor, lean_decoding=True),
                "generate": VisionPolicy(model, processor, lean_decoding=False)}
    drawn = {}
    for name, policy in policies.items():
        torch.manual_seed(0)
        drawn[name] = policy.generate(model, records, args.group, sampling).completion_ids
    if not torch.equal(drawn["loop"], drawn["generate"]):
        raise SystemExit("the loop and model.generate drew different tokens from the same seed")
    times: dict[str, list[float]] = {name: [] for name in policies}
    load_before = os.getloadavg()[0]
    for i in range(args.repeats + 1):  # round 0 warms both up and is not timed
        for name in (("loop", "generate") if i % 2 else ("generate", "loop")):
            start = time.perf_counter()
            policies[name].generate(model, records, args.group, sampling)
            if i:
                times[name].append(time.perf_counter() - start)
    load_after = os.getloadavg()[0]
    median = {name: statistics.median(ts) for name, ts in times.items()}
    ratio = median["loop"] / median["generate"]
    per_token = {name: 1e3 * m / args.tokens for name, m in median.items()}
    machine = (f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
               f"1-min load {load_before:.1f} → {load_after:.1f}")
    table = ("| date | work per call | `model.generate` | mmrl loop | loop / generate | machine |\n"
             "|---|---|---|---|---|---|\n"
             f"| {datetime.date.today()} | {params / 1e6:.2f}M-parameter Qwen2.5-VL, {args.prompts} prompts × "
             f"{args.group}, {args.image_size}-px images, {args.tokens} tokens each | {median['generate']:.3f} s "
             f"({per_token['generate']:.2f} ms/token) | {median['loop']:.3f} s ({per_token['loop']:.2f} ms/token) | "
             f"**{ratio:.3f}** | {machine} |")
    print(table)
    if args.write:
        body = ("## VLM sampling: mmrl's loop vs `model.generate`\n\n"
                f"`python bench/decode_loop.py --repeats {args.repeats} --write`: `VisionPolicy.generate` with "
                "`lean_decoding` on and off, same model, prompts and seed (tokens checked identical first), "
                f"prompt prefill shared on both, calls alternating, medians of {args.repeats}.\n\n" + table)
        BENCHMARKS.write_text(_sections.update_section(BENCHMARKS.read_text(), body, SECTION))
    return {"loop_s": median["loop"], "generate_s": median["generate"], "ratio": ratio}


if __name__ == "__main__":
    main()
