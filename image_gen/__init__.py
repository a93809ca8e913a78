"""Autoregressive image generation (LlamaGen-style VQ tokens) for AR-GRPO.

Ready and tested:

- :mod:`image_gen.vq` — image tokenizers behind one interface (encode → code indices, decode → pixels in
  [0, 1]): LlamaGen's VQ-16 in our own implementation (loads the official state dict), and diffusers
  ``VQModel`` (plus a ~1M-parameter tiny one and a short training loop for offline pipelines).
- :mod:`image_gen.gpt` — a LlamaGen-architecture GPT (RMSNorm, SwiGLU, 2D RoPE; class- or text-conditional
  with a null condition for CFG; KV cache), loading official LlamaGen checkpoints.
- :mod:`image_gen.text_encoder` — T5 caption features for text-conditional models (LlamaGen's conventions).
- :mod:`image_gen.prompts` / :mod:`image_gen.rewards` — procedural verifiable prompts and batched rule rewards
  on decoded images (colour fraction, object count, relative position, shape), plus CLIP rewards (raw and
  AR-GRPO's quantised map); :mod:`image_gen.judge` — a Qwen-VL judge reward, P(yes); :mod:`image_gen.hps` —
  HPSv2 (optional extra).
- :mod:`image_gen.sampling` / :mod:`image_gen.policy` — KV-cached CFG sampling and the policy that plugs all
  of this into :class:`mmrl.Trainer`; :mod:`image_gen.janus` — Janus-Pro (transformers) behind the same
  interface; :mod:`image_gen.task` — the ``task: image_gen`` wiring for the CLI.
- :mod:`image_gen.evaluate` / :mod:`image_gen.inception` — evaluation: a GenEval-like rule suite, FID / IS /
  KID with local Inception weights, CLIP score (``mmrl eval-gen``).
"""
