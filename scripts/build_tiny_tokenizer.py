"""Build the tiny byte-level BPE tokenizer shipped in ``vision/assets/tiny_tokenizer``.

It only needs to cover the offline synthetic tasks' prompts and answers (plus generic English), and it
must carry Qwen-VL's special tokens so that the real Qwen processors and chat format work unchanged.
Run once; the output is committed (tens of KB). Deterministic: same corpus → same file.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]
# Tag words the tiny model must emit; as single tokens they are learned in a handful of steps.
TAG_TOKENS = ["<think>", "</think>", "<answer>", "</answer>", "\\boxed{"]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def corpus() -> list[str]:
    from vision.data import PROMPT_TEMPLATES
    from vision.synthetic import available_synthetic_tasks, make_synthetic

    lines = []
    for name in available_synthetic_tasks():
        for row in make_synthetic(name, num_samples=200, seed=1):
            lines.append(row["problem"].replace("<image>", ""))
            lines.append(f"<answer>{row['answer']}</answer>")
            for template in PROMPT_TEMPLATES.values():
                lines.append(template.format(question=row["problem"].replace("<image>", "")))
    lines += ["The answer is " + str(i) for i in range(100)]
    lines += ["Let me look at the image and think step by step.", "system", "user", "assistant",
              "You are a helpful assistant."]
    return lines


def build(out_dir: Path, vocab_size: int = 512) -> None:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus(), trainer=trainer)
    tok.add_tokens(TAG_TOKENS)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "bos_token": None,
        "unk_token": None,
        "model_max_length": 4096,
        "padding_side": "left",
        "chat_template": CHAT_TEMPLATE,
        "extra_special_tokens": {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                                 "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>"},
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    print(f"wrote {out_dir} ({tok.get_vocab_size()} tokens)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "vision/assets/tiny_tokenizer")
    parser.add_argument("--vocab-size", type=int, default=512)
    args = parser.parse_args()
    build(args.out, args.vocab_size)
