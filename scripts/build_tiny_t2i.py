"""Build the tiny *text-conditional* generator shipped in ``image_gen/assets/tiny_t2i/``.

The offline text-to-image demo (``configs/image_gen/demo_t2i.yaml``) needs the whole LlamaGen T2I stack in
miniature — a T5 encoder, caption features, a text-conditional GPT prior — trained on CPU in a few minutes:

1. a tiny **T5 encoder** (random init, 1 layer, d_model 32) with a word-level tokenizer over every word the
   procedural prompts of :mod:`image_gen.prompts` use, saved in transformers' format (``t5/``), so it loads
   through the same :class:`image_gen.text_encoder.T5TextEncoder` path as FLAN-T5-XL; its features are fixed
   random functions of the caption, which is all a conditioning signal needs;
2. renders 32x32 images of *train-split* prompts from all six GeneVal-like categories, tokenised by the
   shipped tiny VQ (``image_gen/assets/tiny/vq``, 8x8 = 64 tokens);
3. trains a ``GPT-tiny`` t2i prior on (caption features, tokens) with 10% caption dropout to the null
   caption (so CFG works), deliberately only partially, and measures the rule reward of CFG samples on
   held-out (test-split) prompts per category;
4. writes ``t5/``, ``model.safetensors``, ``gpt_config.json`` (the layout of an mmrl checkpoint's
   ``model/`` directory) and ``build_info.json``.

Usage: ``python scripts/build_tiny_t2i.py [--out image_gen/assets/tiny_t2i] [--seed 0]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
for extra in (ROOT, ROOT / "scripts"):  # run as a plain script from anywhere
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

from build_tiny_image_gen import decode_all, encode_all, to_tensor  # noqa: E402

from image_gen.gpt import GPT, get_config  # noqa: E402
from image_gen.prompts import CATEGORIES, _pool, normalize_spec, render_spec, spec_to_prompt, split_of_spec  # noqa: E402
from image_gen.rewards import geneval_rules  # noqa: E402
from image_gen.sampling import sample_image_tokens  # noqa: E402
from image_gen.text_encoder import T5TextEncoder  # noqa: E402
from image_gen.vq import DiffusersVQ  # noqa: E402

IMAGE_SIZE = 32
MAX_LENGTH = 16  # caption tokens: the longest procedural prompt has 12 words + </s>
DEFAULT_OUT = ROOT / "image_gen" / "assets" / "tiny_t2i"
TINY_VQ = ROOT / "image_gen" / "assets" / "tiny" / "vq"


def prompt_vocabulary() -> list[str]:
    """Every word of every procedural prompt (all categories, both splits), sorted."""
    return sorted({w for c in CATEGORIES for s in _pool(c) for w in spec_to_prompt(normalize_spec(s), c).split()})


def build_t5(out: Path, seed: int) -> None:
    """A random 1-layer T5 encoder + a word-level fast tokenizer that appends </s>, in transformers' format."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(prompt_vocabulary())}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=MAX_LENGTH)
    torch.manual_seed(seed)
    config = T5Config(vocab_size=len(vocab), d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
                      pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    T5EncoderModel(config).save_pretrained(out)
    fast.save_pretrained(out)


def prompt_rows(split: str, per_category: int, seed: int) -> list[dict]:
    """``per_category`` rows per category: a random spec of that split and a render seed each."""
    rng = random.Random(seed)
    rows = []
    for category in CATEGORIES:
        pool = [normalize_spec(s) for s in _pool(category) if split_of_spec(s) == split]
        for _ in range(per_category):
            spec = rng.choice(pool)
            rows.append({"spec": spec, "category": category, "prompt": spec_to_prompt(spec, category),
                         "render_seed": rng.randrange(10**9)})
    return rows


def sample_reward(gpt: GPT, vq: DiffusersVQ, encoder: T5TextEncoder, rows: list[dict], cfg_scale: float,
                  seed: int) -> dict[str, float]:
    """Mean geneval_rules of CFG samples (T = 1) per category and overall."""
    features, mask = encoder.encode([r["prompt"] for r in rows])
    gen = torch.Generator().manual_seed(seed)
    tokens = sample_image_tokens(gpt, features, gpt.config.block_size, cfg_scale, generator=gen,
                                 cond_mask=mask).tokens
    scores = geneval_rules([r["prompt"] for r in rows], list(decode_all(vq, tokens)), spec=[r["spec"] for r in rows])
    out = {c: float(np.mean([s or 0.0 for s, r in zip(scores, rows) if r["category"] == c])) for c in CATEGORIES}
    out["overall"] = float(np.mean([s or 0.0 for s in scores]))
    return out


def train_prior(gpt: GPT, tokens: torch.Tensor, features: torch.Tensor, mask: torch.Tensor,
                args: argparse.Namespace, gen: torch.Generator) -> list[float]:
    opt = torch.optim.AdamW(gpt.parameters(), lr=args.lr, weight_decay=0.05, betas=(0.9, 0.95))
    gpt.train()
    losses = []
    for step in range(1, args.steps + 1):
        pick = torch.randint(len(tokens), (args.batch,), generator=gen)
        drop = torch.rand(args.batch, generator=gen) < args.caption_dropout
        logits = gpt(tokens[pick], features[pick], mask[pick], drop_cond=drop)[:, :-1]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[pick].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(gpt.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        if step % 100 == 0 or step == args.steps:
            print(f"  gpt step {step:4d}  loss {np.mean(losses[-100:]):.3f}", flush=True)
    gpt.eval()
    return losses


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-per-category", type=int, default=1000)
    p.add_argument("--eval-per-category", type=int, default=16)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--caption-dropout", type=float, default=0.1)
    p.add_argument("--cfg-scale", type=float, default=2.0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: 2, or 1 if the machine is busy)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    threads = args.threads or (1 if os.getloadavg()[0] > 1.5 else 2)
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    build_t5(out / "t5", args.seed)
    encoder = T5TextEncoder(str(out / "t5"), max_length=MAX_LENGTH, device="cpu")
    vq = DiffusersVQ(str(TINY_VQ))

    train = prompt_rows("train", args.train_per_category, args.seed)
    held_out = prompt_rows("test", args.eval_per_category, args.seed + 1)
    images = torch.stack([to_tensor(render_spec(r["spec"], size=IMAGE_SIZE, seed=r["render_seed"])) for r in train])
    tokens = encode_all(vq, images)
    features, mask = encoder.encode([r["prompt"] for r in train])
    print(f"{len(train)} training renders -> tokens {tuple(tokens.shape)}; captions {tuple(features.shape)} "
          f"({time.perf_counter() - t0:.1f}s)", flush=True)

    gpt_cfg = get_config("GPT-tiny", model_type="t2i", vocab_size=vq.codebook_size, block_size=tokens.shape[1],
                         cls_token_num=MAX_LENGTH, caption_dim=encoder.dim, class_dropout_prob=args.caption_dropout)
    torch.manual_seed(args.seed)
    gpt = GPT(gpt_cfg)
    t = time.perf_counter()
    losses = train_prior(gpt, tokens, features, mask, args, torch.Generator().manual_seed(args.seed))
    gpt_time = time.perf_counter() - t
    prior = sample_reward(gpt, vq, encoder, held_out, args.cfg_scale, args.seed + 2)
    print(f"gpt: {gpt_time:.1f}s, held-out sample geneval_rules {json.dumps({k: round(v, 3) for k, v in prior.items()})}",
          flush=True)

    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in gpt.state_dict().items()}, str(out / "model.safetensors"))
    (out / "gpt_config.json").write_text(json.dumps(dataclasses.asdict(gpt_cfg), indent=2) + "\n")
    info = {
        "seed": args.seed, "date": datetime.date.today().isoformat(), "torch_version": torch.__version__,
        "threads": threads, "vq": str(TINY_VQ.relative_to(ROOT)), "caption_tokens": MAX_LENGTH,
        "train_images": len(train), "gpt": {"steps": args.steps, "batch": args.batch, "lr": args.lr,
                                            "caption_dropout": args.caption_dropout, "final_loss": losses[-1],
                                            "params": sum(p.numel() for p in gpt.parameters()),
                                            "seconds": round(gpt_time, 1)},
        "prior_sample": {"cfg_scale": args.cfg_scale, "per_category": args.eval_per_category, "reward": prior},
        "total_seconds": round(time.perf_counter() - t0, 1),
    }
    (out / "build_info.json").write_text(json.dumps(info, indent=2) + "\n")
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"wrote {out} ({size / 1e6:.2f} MB) in {info['total_seconds']}s", flush=True)
    return info


if __name__ == "__main__":
    main()
