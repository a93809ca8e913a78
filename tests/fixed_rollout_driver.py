"""Driver for tests/test_multiprocess_training.py: trains the tiny vision policy on *fixed* rollouts, once
per loss type, and writes the per-step metrics and final weights (main process) plus the prompts each
process trained on. Run directly (1 process) or under ``accelerate launch`` (several).

Fixed rollouts: ``policy.generate`` is replaced by a function that returns, for each record and sample j
of its group, completion tokens drawn from a generator seeded with (record uid, j) — with a stop token at
a drawn position, or none (truncated) — so that the completions of a prompt do not depend on the process,
the batch it is in, or any random state. The reward is a hash of the decoded completion.

``--emulate N`` (1 process only): the sampler is the union of the N samplers N processes would have
(``PromptSampler`` seeded ``seed + k``), each batch their batches concatenated in process order, so a
1-process run with ``prompts_per_step = N * P`` sees exactly the prompts of an N-process run with ``P``.
"""

from __future__ import annotations

import argparse
import json
import zlib
from pathlib import Path

import torch

from mmrl.config import load_config
from mmrl.data import PromptSampler
from mmrl.policy import Rollout
from mmrl.processes import end_processes
from mmrl.trainer import Trainer
from vision import task

ROOT = Path(__file__).resolve().parents[1]
LOSS_TYPES = ("grpo", "bnpo", "dapo", "dr_grpo")
FIRST_TOKEN = 7  # the tiny tokenizer's ids below 7 are pad / stop / image placeholders


class UidDataset:
    """``dataset``'s records with their index as column ``uid`` (what the fixed completions are keyed on)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        return {**self.dataset[index], "uid": int(index)}


class UnionSampler:
    """One process standing in for ``processes``: process k's sampler (seed + k), batches concatenated."""

    def __init__(self, dataset, per_process: int, seed: int, processes: int):
        self.parts = [PromptSampler(dataset, per_process, seed + k) for k in range(processes)]

    def next_batch(self, step: int | None = None) -> list[dict]:
        return [record for part in self.parts for record in part.next_batch(step)]

    def record(self, *args, **kwargs) -> None:
        pass

    def metrics(self) -> dict[str, float]:
        return {}

    @property
    def skipped(self) -> int:
        return sum(part.skipped for part in self.parts)

    @property
    def epoch(self) -> int:
        return self.parts[0].epoch


def fixed_generate(policy, seen: list[list[int]]):
    def generate(model, records, group_size, sampling) -> Rollout:
        seen.append([record["uid"] for record in records])
        repeat = torch.arange(len(records)).repeat_interleave(group_size)
        length = sampling.max_new_tokens
        ids = torch.empty(len(repeat), length, dtype=torch.long)
        for row, i in enumerate(repeat.tolist()):
            g = torch.Generator().manual_seed(zlib.crc32(f"{records[i]['uid']}:{row % group_size}".encode()))
            ids[row] = torch.randint(FIRST_TOKEN, len(policy.tokenizer), (length,), generator=g)
            stop = int(torch.randint(1, length + 2, (1,), generator=g))  # length + 1: no stop token
            if stop <= length:
                ids[row, stop - 1] = policy.eos_token_ids[0]
        mask, truncated = policy._completion_mask(ids)
        keys = [k for k in records[0] if k not in ("prompt", "images")]
        return Rollout(completion_ids=ids.masked_fill(mask == 0, policy.pad_token_id), completion_mask=mask,
                       inputs=policy.encode_prompts(records).select(repeat),
                       prompts=[records[i]["prompt"] for i in repeat.tolist()],
                       columns={k: [records[i][k] for i in repeat.tolist()] for k in keys},
                       group_size=group_size, truncated=truncated, temperature=sampling.temperature)
    return generate


def hashed_reward(prompts, completions, **kwargs) -> list[float]:
    return [(zlib.crc32(c.encode()) % 5) / 4 for c in completions]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--emulate", type=int, default=1)
    parser.add_argument("--loss-types", default=",".join(LOSS_TYPES))
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    out = Path(args.out)
    torch.set_num_threads(1)
    for loss_type in args.loss_types.split(","):
        cfg = load_config(str(ROOT / "configs/vision/demo.yaml"), [
            f"output_dir={out / loss_type}", f"algorithm.loss_type={loss_type}", "logging.report_to=[jsonl]",
            "logging.progress_bar=false", "mixed_precision='no'", "save_steps=0", "save_final=false",
            "eval.every_steps=0", *args.overrides], section_types=task.SECTION_TYPES)
        built = task.build(cfg)
        train = UidDataset(built.train_dataset)
        seen: list[list[int]] = []
        built.policy.generate = fixed_generate(built.policy, seen)
        initial = {k: v.detach().clone() for k, v in built.policy.model.state_dict().items()}
        trainer = Trainer(cfg, built.policy, train, reward_funcs=[hashed_reward])
        if args.emulate > 1:
            if trainer.accelerator.num_processes != 1 or cfg.prompts_per_step % args.emulate:
                raise SystemExit("--emulate needs 1 process and prompts_per_step divisible by it")
            trainer.sampler = UnionSampler(train, cfg.prompts_per_step // args.emulate, cfg.seed, args.emulate)
        history = trainer.train()
        rank = trainer.accelerator.process_index
        (out / loss_type / f"prompts-{rank}.json").write_text(json.dumps(seen))
        if trainer.accelerator.is_main_process:
            (out / loss_type / "history.json").write_text(json.dumps(history))
            state = trainer.accelerator.unwrap_model(trainer.model).state_dict()
            torch.save({k: v.detach().cpu().clone() for k, v in state.items()}, out / loss_type / "weights.pt")
            torch.save(initial, out / loss_type / "initial.pt")
        trainer.accelerator.wait_for_everyone()


if __name__ == "__main__":
    main()
    end_processes()  # after main's trainers (their DDP wrappers hold the group) are gone
