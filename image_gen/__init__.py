"""Autoregressive image generation (LlamaGen-style VQ tokens) for AR-GRPO — work in progress.

Ready and tested:

- :mod:`image_gen.vq` — image tokenizers behind one interface (encode → code indices, decode → pixels in
  [0, 1]): LlamaGen's VQ-16 in our own implementation (loads the official state dict), and diffusers
  ``VQModel`` (plus a ~1M-parameter tiny one and a short training loop for offline pipelines).
- :mod:`image_gen.gpt` — a LlamaGen-architecture GPT (RMSNorm, SwiGLU, 2D RoPE; class- or text-conditional
  with a null condition for CFG; KV cache), loading official LlamaGen checkpoints.
- :mod:`image_gen.prompts` / :mod:`image_gen.rewards` — procedural verifiable prompts and batched rule rewards
  on decoded images (colour fraction, object count, relative position, shape), plus a CLIP similarity reward.

Not yet: the policy that plugs these into :class:`mmrl.Trainer` (CFG sampling, log-prob modes), the tiny
offline pipeline and ``configs/image_gen/``. Nothing here is wired into the ``mmrl`` CLI yet.
"""
