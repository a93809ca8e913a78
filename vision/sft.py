"""Supervised cold start with TRL's ``SFTTrainer`` (not rewritten here: TRL does this well).

RL from a model that never produces the expected answer format learns nothing — every group's
rewards are equal. A short SFT on (prompt, formatted answer) pairs teaches the format and gives the
policy some signal to improve on. Loss is on the answer only (prompt-completion rows).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from datasets import Dataset

from vision.data import VisionDataset, to_sft_rows
from vision.modeling import pixel_bounds, resize_image

logger = logging.getLogger(__name__)


@dataclass
class ColdStartConfig:
    """The ``cold_start:`` section of a vision config. ``steps: 0`` disables it."""

    steps: int = 0  # optimizer steps of SFT before RL
    lr: float = 2e-3
    batch_size: int = 16
    answer_format: str = "answer"  # target format: answer | r1 | boxed (match the data template)
    max_samples: int | None = None  # SFT rows taken from the training set (default: all)
    warmup_steps: int = 0
    save: bool = False  # also write the SFT model to <output_dir>/sft


_UNSET = object()  # a config attribute that did not exist before the cold start


def run_sft(model: torch.nn.Module, processor, dataset: VisionDataset, cfg: ColdStartConfig, output_dir: str | Path,
            seed: int = 0, show_progress: bool = True) -> dict[str, float]:
    """Train ``model`` in place for ``cfg.steps`` SFT steps on ``dataset``'s prompts and answers."""
    from trl import SFTConfig, SFTTrainer

    output_dir = Path(output_dir)
    rows = to_sft_rows(dataset, cfg.answer_format, cfg.max_samples)
    if not rows:
        raise ValueError("the cold-start dataset produced no usable rows (see warnings above)")
    image_processor = processor.image_processor
    factor = image_processor.patch_size * image_processor.merge_size
    # Same image sizing as the RL policy, so SFT and RL see identical inputs.
    data = Dataset.from_list([
        {"prompt": row["messages"][:-1], "completion": row["messages"][-1:],
         "images": [resize_image(im, *pixel_bounds(image_processor), factor)
                    for im in row["images"]]}
        for row in rows])
    args = SFTConfig(
        output_dir=str(output_dir), max_steps=cfg.steps, learning_rate=cfg.lr, per_device_train_batch_size=cfg.batch_size,
        warmup_steps=cfg.warmup_steps, lr_scheduler_type="constant_with_warmup" if cfg.warmup_steps else "constant",
        logging_steps=max(1, cfg.steps // 2), save_strategy="no", report_to=[], seed=seed, data_seed=seed,
        bf16=model.dtype == torch.bfloat16, use_cpu=not torch.cuda.is_available(), max_length=None,
        disable_tqdm=not show_progress, dataloader_num_workers=0, remove_unused_columns=False,
    )
    # TRL's SFTConfig turns activation checkpointing on (and use_cache off) by default and leaves it so on the
    # model: RL would then run with a setting the user did not ask for — slower, and a resumed run (which skips
    # the cold start) would train with the other setting. Each module's own setting is put back afterwards.
    checkpointing = {m: (m.gradient_checkpointing, getattr(m, "_gradient_checkpointing_func", None))
                     for m in model.modules() if isinstance(getattr(m, "gradient_checkpointing", None), bool)}
    configs = [c for c in (getattr(model, "config", None), getattr(getattr(model, "config", None), "text_config", None))
               if c is not None]
    use_cache = [(c, vars(c).get("use_cache", _UNSET)) for c in configs]
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=processor)
    try:
        result = trainer.train()
    finally:
        for module, (flag, func) in checkpointing.items():
            module.gradient_checkpointing = flag
            if func is not None:
                module._gradient_checkpointing_func = func
        for config, value in use_cache:
            if value is _UNSET:
                vars(config).pop("use_cache", None)
            else:
                config.use_cache = value
    # TRL/accelerate may leave an instance-level `forward` wrapper on the model that closes over *this*
    # object; a deepcopy (e.g. the RL reference model) would then still run the policy's live weights.
    model.__dict__.pop("forward", None)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    if cfg.save:
        model.save_pretrained(output_dir)
        processor.save_pretrained(output_dir)
    model.train()
    return {"sft/train_loss": float(result.training_loss), "sft/final_loss": float(losses[-1]) if losses else float("nan"),
            "sft/steps": float(cfg.steps), "sft/rows": float(len(rows))}
