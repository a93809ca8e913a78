"""Autoregressive image generation (LlamaGen-style VQ tokens, Janus-Pro) with AR-GRPO.

Not implemented yet: this package is reserved for the AR-GRPO work (it will plug a policy into
:class:`mmrl.Trainer`). Importing it is safe; it exposes nothing so far.
"""
