"""Tests for :class:`mmrl.data.PromptSampler`: seeded order, epochs, resumption, bad samples."""

from __future__ import annotations

import pytest

from mmrl.data import BadSample, PromptSampler


class Records:
    """A minimal dataset: ``__len__`` + ``__getitem__``; indices in ``bad`` raise :class:`BadSample`."""

    def __init__(self, n: int, bad: set[int] | frozenset[int] = frozenset()):
        self.n = n
        self.bad = set(bad)
        self.calls = 0

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict:
        self.calls += 1
        if index in self.bad:
            raise BadSample(f"unreadable image for item {index}")
        return {"id": index, "prompt": f"question {index}"}


def ids(batch: list[dict]) -> list[int]:
    return [record["id"] for record in batch]


def draw(sampler: PromptSampler, batches: int) -> list[int]:
    out: list[int] = []
    for _ in range(batches):
        out += ids(sampler.next_batch())
    return out


def test_same_seed_same_sequence():
    a = draw(PromptSampler(Records(23), batch_size=4, seed=5), 12)
    b = draw(PromptSampler(Records(23), batch_size=4, seed=5), 12)
    assert a == b


def test_different_seed_different_sequence():
    a = draw(PromptSampler(Records(50), batch_size=5, seed=0), 4)
    b = draw(PromptSampler(Records(50), batch_size=5, seed=1), 4)
    assert a != b


def test_every_index_once_per_epoch():
    n, batch = 12, 4
    sampler = PromptSampler(Records(n), batch_size=batch, seed=3)
    epochs = [draw(sampler, n // batch) for _ in range(3)]
    for order in epochs:
        assert sorted(order) == list(range(n))
    assert epochs[0] != epochs[1]  # each epoch is reshuffled
    assert sampler.epoch == 2


def test_batches_span_epoch_boundaries():
    # 10 items in batches of 4: the third batch takes 2 from epoch 0 and 2 from epoch 1
    n = 10
    sampler = PromptSampler(Records(n), batch_size=4, seed=0)
    seq = draw(sampler, 5)  # 20 draws = exactly two epochs
    assert sorted(seq[:n]) == list(range(n))
    assert sorted(seq[n:]) == list(range(n))
    assert all(len(b) == 4 for b in [seq[i:i + 4] for i in range(0, 20, 4)])


def test_no_shuffle_is_dataset_order():
    sampler = PromptSampler(Records(5), batch_size=2, seed=0, shuffle=False)
    assert draw(sampler, 4) == [0, 1, 2, 3, 4, 0, 1, 2]


@pytest.mark.parametrize("consumed", [0, 1, 3, 7])
def test_state_dict_resumes_exact_sequence(consumed):
    reference = PromptSampler(Records(11), batch_size=3, seed=42)
    full = draw(reference, 12)

    first = PromptSampler(Records(11), batch_size=3, seed=42)
    head = draw(first, consumed)
    state = first.state_dict()

    resumed = PromptSampler(Records(11), batch_size=3, seed=0)  # seed comes from the state
    resumed.load_state_dict(dict(state))
    tail = draw(resumed, 12 - consumed)
    assert head + tail == full
    assert resumed.state_dict() == reference.state_dict()


def test_state_dict_round_trips_skipped_count():
    data = Records(9, bad={0, 4})
    sampler = PromptSampler(data, batch_size=3, seed=1)
    draw(sampler, 3)
    state = sampler.state_dict()
    assert state["skipped"] == sampler.skipped > 0
    other = PromptSampler(Records(9, bad={0, 4}), batch_size=3, seed=1)
    other.load_state_dict(state)
    assert other.skipped == sampler.skipped
    assert draw(other, 4) == draw(sampler, 4)


def test_bad_samples_skipped_and_counted(caplog):
    n, bad = 10, {2, 5, 7}
    sampler = PromptSampler(Records(n, bad=bad), batch_size=7, seed=0, shuffle=False)
    batch = ids(sampler.next_batch())
    assert batch == [0, 1, 3, 4, 6, 8, 9]  # the 7 good items of epoch 0, bad ones replaced
    assert sampler.skipped == 3
    assert "skipping sample" in caplog.text
    # the next epoch skips the same items again, and the counter keeps growing
    assert ids(sampler.next_batch()) == [0, 1, 3, 4, 6, 8, 9]
    assert sampler.skipped == 6


def test_bad_samples_shuffled_never_returned():
    bad = {1, 4, 8, 13}
    sampler = PromptSampler(Records(16, bad=bad), batch_size=5, seed=9)
    seen = draw(sampler, 12)  # 60 good records = 5 epochs of 12 good items
    assert not set(seen) & bad
    assert len(seen) == 60
    # every bad item was met once in each of the 4 full epochs, and maybe again at the end of the 5th
    assert 4 * 4 <= sampler.skipped <= 4 * 5


def test_all_bad_dataset_raises_clear_error():
    data = Records(6, bad=set(range(6)))
    sampler = PromptSampler(data, batch_size=2, seed=0)
    with pytest.raises(RuntimeError, match="failed to load"):
        sampler.next_batch()
    assert data.calls > 0
    assert data.calls == sampler.skipped  # gives up after a bounded number of attempts
    assert sampler.skipped <= 20


def test_mostly_bad_dataset_returns_partial_batch():
    data = Records(50, bad=set(range(1, 50)))  # only item 0 loads
    sampler = PromptSampler(data, batch_size=4, seed=0, shuffle=False)
    assert ids(sampler.next_batch()) == [0]


def test_constructor_checks():
    with pytest.raises(ValueError, match="empty"):
        PromptSampler(Records(0), batch_size=2, seed=0)
    with pytest.raises(ValueError, match="batch_size"):
        PromptSampler(Records(3), batch_size=0, seed=0)
