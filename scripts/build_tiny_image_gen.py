"""Build the tiny pretrained image generator shipped in ``image_gen/assets/tiny/``.

The offline AR-GRPO demo needs a generator that already draws *something* sensible but leaves room for
RL to improve it. This script makes one from scratch, on CPU, in a few minutes:

1. renders 32x32 images of one object (the 18 ``single_object`` specs: 6 colours x 3 shapes) with
   :func:`image_gen.prompts.render_spec`, many seeds per spec for position/size variety;
2. trains the tiny diffusers VQ (:func:`image_gen.vq.build_tiny_diffusers_vq`: 8x8 = 64 tokens, 64 codes)
   on those images plus multi-object renders (counting / two-object specs: more coloured pixels, so
   the six palette colours stay apart) and checks that decode(encode(x)) of held-out renders still
   satisfies the spec (``geneval_rules``);
3. trains a class-conditional ``GPT-tiny`` prior over those tokens (teacher forcing, 10% class dropout
   to the null class so classifier-free guidance works), deliberately only *partially*, and measures
   the rule reward of CFG samples;
4. writes ``vq/``, ``gpt.safetensors``, ``gpt_config.json``, ``classes.json`` and ``build_info.json``.

Class ids of the tiny prior are a compact ``0..17`` index over the single-object specs (in
:mod:`image_gen.prompts` enumeration order); ``classes.json`` maps each to its spec, prompt and the
global ``image_gen.prompts`` class id. Id 18 is the null (unconditional) class.

Usage: ``python scripts/build_tiny_image_gen.py [--out image_gen/assets/tiny] [--seed 0]``.
Deterministic for a given seed and thread count.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a plain script from anywhere
    sys.path.insert(0, str(ROOT))

from image_gen.gpt import GPT, get_config  # noqa: E402
from image_gen.prompts import _pool, class_for_spec, render_spec, spec_to_prompt, split_of_spec  # noqa: E402
from image_gen.rewards import geneval_rules  # noqa: E402
from image_gen.vq import DiffusersVQ, build_tiny_diffusers_vq, train_vq  # noqa: E402

IMAGE_SIZE = 32
CATEGORY = "single_object"
DEFAULT_OUT = ROOT / "image_gen" / "assets" / "tiny"


def single_object_classes() -> list[dict]:
    """The 18 single-object specs in class-id order, with prompts and their global class ids."""
    rows = []
    for i, spec in enumerate(_pool(CATEGORY)):
        rows.append(
            {
                "class_id": i,
                "spec": spec,
                "prompt": spec_to_prompt(spec, CATEGORY),
                "global_class_id": class_for_spec(spec),
                "split": split_of_spec(spec),
            }
        )
    return rows


def to_tensor(img) -> torch.Tensor:
    """PIL RGB -> float [3, H, W] in [0, 1]."""
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


def render_set(classes: list[dict], per_class: int, seed_offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``per_class`` renders of every class (render seeds ``seed_offset + j``): images [N,3,32,32], labels [N]."""
    images, labels = [], []
    for row in classes:
        for j in range(per_class):
            images.append(to_tensor(render_spec(row["spec"], size=IMAGE_SIZE, seed=seed_offset + j)))
            labels.append(row["class_id"])
    return torch.stack(images), torch.tensor(labels, dtype=torch.long)


def render_dense(n: int, seed_offset: int, seed: int) -> torch.Tensor:
    """``n`` multi-object renders (counting and two-object specs) for the VQ only: they hold 2-4x more
    coloured pixels than single-object images, so pixel MSE spends more of its gradient on object colours."""
    specs = _pool("counting") + _pool("two_objects")
    rng = np.random.default_rng(seed)
    picks = rng.integers(len(specs), size=n)
    return torch.stack(
        [to_tensor(render_spec(specs[k], size=IMAGE_SIZE, seed=seed_offset + j)) for j, k in enumerate(picks)]
    )


def mean_reward(images: torch.Tensor, labels: torch.Tensor, classes: list[dict]) -> float:
    specs = [classes[int(c)]["spec"] for c in labels]
    prompts = [classes[int(c)]["prompt"] for c in labels]
    scores = geneval_rules(prompts, list(images), spec=specs)
    return float(np.mean([0.0 if s is None else s for s in scores]))


def random_batches(data: torch.Tensor, batch: int, steps: int, gen: torch.Generator):
    """Generator of ``steps`` random minibatches (with replacement across batches)."""
    for _ in range(steps):
        yield data[torch.randint(len(data), (batch,), generator=gen)]


@torch.no_grad()
def encode_all(vq: DiffusersVQ, images: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    return torch.cat([vq.encode(images[i : i + chunk]) for i in range(0, len(images), chunk)])


@torch.no_grad()
def decode_all(vq: DiffusersVQ, tokens: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    return torch.cat([vq.decode(tokens[i : i + chunk]) for i in range(0, len(tokens), chunk)])


@torch.no_grad()
def sample_cfg(
    model: GPT, labels: torch.Tensor, cfg_scale: float, temperature: float, gen: torch.Generator
) -> torch.Tensor:
    """Plain (uncached) CFG sampling: full forward per step, logits u + s * (c - u); returns [B, block_size]."""
    b = labels.shape[0]
    cond = torch.cat([labels, model.null_condition(b, labels.device)])
    idx = torch.zeros(b, 0, dtype=torch.long, device=labels.device)
    for _ in range(model.config.block_size):
        logits = model(torch.cat([idx, idx]), cond)[:, -1]
        c, u = logits[:b], logits[b:]
        probs = F.softmax((u + cfg_scale * (c - u)) / temperature, dim=-1)
        idx = torch.cat([idx, torch.multinomial(probs, 1, generator=gen)], dim=1)
    return idx


def prior_reward(
    model: GPT,
    vq: DiffusersVQ,
    classes: list[dict],
    per_class: int,
    cfg_scale: float,
    temperature: float,
    seed: int,
) -> float:
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(len(classes)).repeat_interleave(per_class)
    tokens = sample_cfg(model, labels, cfg_scale, temperature, gen)
    model.train(was_training)
    return mean_reward(decode_all(vq, tokens), labels, classes)


def train_prior(
    model: GPT,
    tokens: torch.Tensor,
    labels: torch.Tensor,
    args: argparse.Namespace,
    gen: torch.Generator,
    on_eval=None,
) -> list[float]:
    opt = torch.optim.AdamW(model.parameters(), lr=args.gpt_lr, weight_decay=0.05, betas=(0.9, 0.95))
    model.train()
    losses = []
    for step in range(1, args.gpt_steps + 1):
        pick = torch.randint(len(tokens), (args.gpt_batch,), generator=gen)
        idx, cond = tokens[pick], labels[pick]
        drop = torch.rand(args.gpt_batch, generator=gen) < args.class_dropout
        logits = model(idx, cond, drop_cond=drop)[:, :-1]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), idx.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        if step % args.log_every == 0 or step == args.gpt_steps:
            print(f"  gpt step {step:4d}  loss {np.mean(losses[-args.log_every :]):.3f}", flush=True)
        if on_eval is not None and args.eval_every and step % args.eval_every == 0 and step != args.gpt_steps:
            on_eval(step)
    model.eval()
    return losses


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads", type=int, default=0, help="torch threads (0: 1 if the machine is busy, else 2)"
    )
    p.add_argument("--train-per-class", type=int, default=128, help="training renders per class")
    p.add_argument("--eval-per-class", type=int, default=8, help="held-out renders per class (recon check)")
    p.add_argument("--vq-dense-images", type=int, default=1152, help="extra multi-object renders for the VQ")
    p.add_argument("--vq-steps", type=int, default=600)
    p.add_argument("--vq-batch", type=int, default=32)
    p.add_argument("--vq-lr", type=float, default=2e-3)
    p.add_argument("--gpt-steps", type=int, default=200)
    p.add_argument("--gpt-batch", type=int, default=64)
    p.add_argument("--gpt-lr", type=float, default=1e-3)
    p.add_argument("--class-dropout", type=float, default=0.1)
    p.add_argument("--cfg-scale", type=float, default=2.0)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument(
        "--sample-per-class", type=int, default=8, help="prior samples per class for the reward check"
    )
    p.add_argument(
        "--eval-every", type=int, default=0, help="also report the prior's sample reward every N steps"
    )
    p.add_argument("--log-every", type=int, default=50)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    threads = args.threads or (1 if os.getloadavg()[0] > 1.5 else 2)
    torch.set_num_threads(threads)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    classes = single_object_classes()
    n_cls = len(classes)
    print(f"{n_cls} classes, {threads} thread(s), seed {args.seed}", flush=True)

    # 1. data: training renders use seeds [base, base + train_per_class); held-out renders follow them
    base = args.seed * 100_000
    train_x, train_y = render_set(classes, args.train_per_class, base)
    eval_x, eval_y = render_set(classes, args.eval_per_class, base + args.train_per_class)
    vq_x = torch.cat([train_x, render_dense(args.vq_dense_images, base + 50_000, args.seed)])
    print(
        f"rendered {len(train_x)} train / {len(eval_x)} held-out images ({time.perf_counter() - t0:.1f}s)",
        flush=True,
    )

    # 2. VQ tokenizer
    gen = torch.Generator().manual_seed(args.seed)
    vq = build_tiny_diffusers_vq(seed=args.seed)
    t = time.perf_counter()
    print(f"training VQ for {args.vq_steps} steps on {len(vq_x)} images...", flush=True)
    vq_losses = train_vq(
        vq, random_batches(vq_x, args.vq_batch, args.vq_steps, gen), args.vq_steps, lr=args.vq_lr
    )
    for i in range(0, len(vq_losses), 100):  # one train_vq call (one Adam state); losses reported afterwards
        print(
            f"  vq steps {i + 1:4d}-{min(i + 100, len(vq_losses)):4d}  loss {np.mean(vq_losses[i : i + 100]):.4f}"
        )
    vq.eval()
    vq_time = time.perf_counter() - t
    recon = decode_all(vq, encode_all(vq, eval_x))
    recon_mse = float(F.mse_loss(recon, eval_x))
    recon_reward = mean_reward(recon, eval_y, classes)
    original_reward = mean_reward(eval_x, eval_y, classes)
    print(
        f"vq: {vq_time:.1f}s, held-out recon MSE (0-1 pixels) {recon_mse:.4f}, geneval_rules recon "
        f"{recon_reward:.3f} (originals {original_reward:.3f})",
        flush=True,
    )

    # 3. class-conditional prior over VQ tokens
    train_tokens = encode_all(vq, train_x)
    used = int(train_tokens.unique().numel())
    print(f"tokens {tuple(train_tokens.shape)}, {used}/{vq.codebook_size} codes used", flush=True)
    gpt_cfg = get_config(
        "GPT-tiny",
        vocab_size=vq.codebook_size,
        block_size=train_tokens.shape[1],
        num_classes=n_cls,
        class_dropout_prob=args.class_dropout,
    )
    torch.manual_seed(args.seed)
    gpt = GPT(gpt_cfg)
    n_params = sum(p.numel() for p in gpt.parameters())
    sample_seed = args.seed + 1

    def report(step: int) -> None:
        r = prior_reward(
            gpt, vq, classes, args.sample_per_class, args.cfg_scale, args.temperature, sample_seed
        )
        print(f"  gpt step {step:4d}  sample geneval_rules {r:.3f}", flush=True)

    t = time.perf_counter()
    gpt_losses = train_prior(gpt, train_tokens, train_y, args, gen, on_eval=report)
    gpt_time = time.perf_counter() - t
    prior = prior_reward(
        gpt, vq, classes, args.sample_per_class, args.cfg_scale, args.temperature, sample_seed
    )
    print(
        f"gpt ({n_params} params): {gpt_time:.1f}s, sample geneval_rules {prior:.3f} "
        f"(cfg {args.cfg_scale}, T {args.temperature})",
        flush=True,
    )

    # 4. write assets
    from safetensors.torch import save_file

    out: Path = args.out
    if (out / "vq").exists():
        shutil.rmtree(out / "vq")
    out.mkdir(parents=True, exist_ok=True)
    vq.save_pretrained(out / "vq")
    save_file({k: v.contiguous() for k, v in gpt.state_dict().items()}, str(out / "gpt.safetensors"))
    (out / "gpt_config.json").write_text(json.dumps(dataclasses.asdict(gpt_cfg), indent=2) + "\n")
    (out / "classes.json").write_text(
        json.dumps(
            {
                "category": CATEGORY,
                "image_size": IMAGE_SIZE,
                "num_classes": n_cls,
                "null_class_id": n_cls,
                "classes": classes,
            },
            indent=2,
        )
        + "\n"
    )
    info = {
        "seed": args.seed,
        "date": datetime.date.today().isoformat(),
        "torch_version": torch.__version__,
        "threads": threads,
        "image_size": IMAGE_SIZE,
        "tokens_per_image": int(train_tokens.shape[1]),
        "codebook_size": vq.codebook_size,
        "codes_used": used,
        "train_images_per_class": args.train_per_class,
        "vq_dense_images": args.vq_dense_images,
        "vq": {
            "steps": args.vq_steps,
            "batch": args.vq_batch,
            "lr": args.vq_lr,
            "final_loss": vq_losses[-1],
            "recon_mse": recon_mse,
            "recon_reward": recon_reward,
            "original_reward": original_reward,
            "eval_images_per_class": args.eval_per_class,
            "seconds": round(vq_time, 1),
        },
        "gpt": {
            "steps": args.gpt_steps,
            "batch": args.gpt_batch,
            "lr": args.gpt_lr,
            "class_dropout": args.class_dropout,
            "params": n_params,
            "final_loss": gpt_losses[-1],
            "seconds": round(gpt_time, 1),
        },
        "prior_sample": {
            "reward": prior,
            "cfg_scale": args.cfg_scale,
            "temperature": args.temperature,
            "per_class": args.sample_per_class,
            "sample_seed": sample_seed,
        },
        "total_seconds": round(time.perf_counter() - t0, 1),
    }
    (out / "build_info.json").write_text(json.dumps(info, indent=2) + "\n")
    size = dir_size(out)
    print(f"wrote {out} ({size / 1e6:.2f} MB) in {info['total_seconds']}s", flush=True)
    print(json.dumps({"recon_reward": recon_reward, "prior_reward": prior, "bytes": size}), flush=True)
    return info


if __name__ == "__main__":
    main()
