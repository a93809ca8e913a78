"""StepBatch: whole-group mini-batches, slicing every per-sample entry alike, masks and weights."""

from __future__ import annotations

import torch

from mmrl.policy import Rollout, SampleInputs
from mmrl.step import StepBatch


def make_rollout(groups: int = 4, group_size: int = 3, tokens: int = 5) -> Rollout:
    b = groups * group_size
    ids = torch.arange(b * tokens).view(b, tokens)
    mask = torch.ones(b, tokens, dtype=torch.long)
    mask[:, -1] = 0
    return Rollout(completion_ids=ids, completion_mask=mask,
                   inputs=SampleInputs(tensors={"x": torch.arange(b)}, lists={"item": list(range(b))}),
                   prompts=[f"p{i // group_size}" for i in range(b)], columns={"answer": list(range(b))},
                   group_size=group_size, truncated=torch.zeros(b, dtype=torch.bool))


def test_group_ids_are_contiguous_groups():
    batch = StepBatch.from_rollout(make_rollout(groups=4, group_size=3))
    assert batch.group_id.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert batch.num_groups == 4 and batch.size == 12
    assert torch.equal(batch.loss_mask, batch.rollout.completion_mask.float())


def test_minibatches_hold_whole_groups_and_cover_every_sample_once():
    batch = StepBatch.from_rollout(make_rollout(groups=5, group_size=4))
    g = torch.Generator().manual_seed(3)
    chunks = list(batch.minibatches(8, g))
    assert [len(c) for c in chunks] == [8, 8, 4]  # 2 + 2 + 1 groups
    assert sorted(torch.cat(chunks).tolist()) == list(range(20))
    for chunk in chunks:
        groups = batch.group_id[chunk]
        for gid in groups.unique():
            members = chunk[groups == gid]
            assert members.tolist() == list(range(4 * int(gid), 4 * int(gid) + 4))  # whole, in order
    # the order of groups is random (seeded), not the identity
    orders = {tuple(batch.group_id[torch.cat(list(batch.minibatches(8, torch.Generator().manual_seed(s))))]
                    .unique_consecutive().tolist()) for s in range(5)}
    assert len(orders) > 1


def test_minibatch_larger_than_batch_is_one_chunk():
    batch = StepBatch.from_rollout(make_rollout(groups=2, group_size=3))
    chunks = list(batch.minibatches(100, torch.Generator().manual_seed(0)))
    assert len(chunks) == 1 and sorted(chunks[0].tolist()) == list(range(6))


def test_select_slices_every_entry_alike():
    batch = StepBatch.from_rollout(make_rollout(groups=2, group_size=2, tokens=3))
    batch.rewards = torch.tensor([1.0, 2.0, 3.0, 4.0])
    batch.advantages = torch.tensor([-1.0, 1.0, -2.0, 2.0])
    batch.logps["old"] = torch.arange(12.0).view(4, 3)
    batch.token_weights["tis"] = torch.full((4, 3), 0.5)
    view = make_rollout(groups=2, group_size=2, tokens=3)
    batch.views["masked"] = (view, torch.tensor([True, True, False, False]))
    part = batch.select(torch.tensor([2, 3]))
    assert part.rewards.tolist() == [3.0, 4.0] and part.advantages.tolist() == [-2.0, 2.0]
    assert part.group_id.tolist() == [1, 1]
    assert torch.equal(part.logps["old"], torch.arange(6.0, 12.0).view(2, 3))
    assert part.token_weights["tis"].shape == (2, 3)
    assert part.views["masked"][1].tolist() == [False, False]
    assert part.rollout.columns["answer"] == [2, 3] and part.rollout.inputs.lists["item"] == [2, 3]


def test_mask_out_per_sample_and_per_token_and_weights_multiply():
    batch = StepBatch.from_rollout(make_rollout(groups=1, group_size=2, tokens=3))
    batch.mask_out(torch.tensor([True, False]))  # e.g. a group filter dropping sample 1
    assert batch.loss_mask.tolist() == [[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]]
    batch.mask_out(torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 1.0]]))  # e.g. MIS dropping a token
    assert batch.loss_mask.tolist() == [[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
    assert batch.token_weight() is None
    batch.token_weights["a"] = torch.full((2, 3), 2.0)
    batch.token_weights["b"] = torch.full((2, 3), 0.25)
    assert torch.equal(batch.token_weight(), torch.full((2, 3), 0.5))
