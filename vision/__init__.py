"""Vision-language reasoning on Qwen2-VL / Qwen2.5-VL / Qwen3-VL.

The unit of data here is a *record* (one prompt), a dict::

    {
        "prompt": [                                 # chat messages, Hugging Face format
            {"role": "system", "content": "..."},   # optional
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many ...?"}]},
        ],
        "images": [PIL.Image.Image, ...],           # RGB, one per {"type": "image"} in order
        "answer": "3",                              # ground truth, and any other dataset columns
        ...
    }

The trainer hands records to :class:`vision.policy.VisionPolicy`; every key other than ``prompt`` and
``images`` is passed to reward functions as a keyword column.
"""
