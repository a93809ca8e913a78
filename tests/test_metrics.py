"""Hand-computed values for :mod:`mmrl.metrics`."""

from __future__ import annotations

from math import comb

import pytest
import torch

from mmrl.metrics import avg_at_k, majority_at_k, pass_at_k


def row(c: int, n: int) -> list[int]:
    return [1] * c + [0] * (n - c)


@pytest.mark.parametrize(
    "c, n, k, expected",
    [
        (2, 5, 1, 0.4),  # pass@1 = c / n
        (2, 5, 2, 0.7),  # 1 - C(3,2)/C(5,2) = 1 - 3/10
        (2, 5, 3, 0.9),  # 1 - C(3,3)/C(5,3) = 1 - 1/10
        (2, 5, 4, 1.0),  # n - c = 3 < k: every draw of 4 holds a correct sample
        (0, 5, 3, 0.0),
        (5, 5, 1, 1.0),
        (5, 5, 5, 1.0),
        (1, 5, 5, 1.0),  # k = n: correct iff any sample is
        (0, 5, 5, 0.0),
        (1, 4, 2, 0.5),  # 1 - C(3,2)/C(4,2) = 1 - 3/6
        (3, 10, 4, 1 - 35 / 210),  # 1 - C(7,4)/C(10,4)
    ],
)
def test_pass_at_k_hand_computed(c, n, k, expected):
    out = pass_at_k(torch.tensor([row(c, n)]), k)
    assert out.shape == (1,)
    assert out.item() == pytest.approx(expected, abs=1e-6)


def test_pass_at_k_order_of_samples_does_not_matter():
    a = pass_at_k(torch.tensor([[1, 0, 0, 1, 0]]), 2)
    b = pass_at_k(torch.tensor([[0, 0, 1, 1, 0]]), 2)
    assert a.item() == pytest.approx(0.7) and b.item() == pytest.approx(0.7)


def test_pass_at_k_batch_bool_and_float_inputs():
    rows = [row(0, 6), row(1, 6), row(3, 6), row(6, 6)]
    expected = [0.0, 1 - comb(5, 2) / comb(6, 2), 1 - comb(3, 2) / comb(6, 2), 1.0]  # 0, 1/3, 0.8, 1
    for tensor in (torch.tensor(rows, dtype=torch.bool), torch.tensor(rows, dtype=torch.float32)):
        out = pass_at_k(tensor, 2)
        assert out.shape == (4,) and out.dtype == torch.get_default_dtype()
        assert out.tolist() == pytest.approx(expected, abs=1e-6)


def test_pass_at_k_large_n_is_stable():
    # C(200, 100) ~ 9e58 would overflow float32; the product form never forms it.
    out = pass_at_k(torch.tensor([row(10, 200)]), 100)
    expected = 1 - comb(190, 100) / comb(200, 100)
    assert torch.isfinite(out).all()
    assert out.item() == pytest.approx(expected, abs=1e-5)


def test_pass_at_1_equals_avg():
    correct = torch.tensor([[1, 0, 1, 1], [0, 0, 0, 1], [0, 0, 0, 0]])
    assert pass_at_k(correct, 1).tolist() == pytest.approx([0.75, 0.25, 0.0])
    assert avg_at_k(correct).tolist() == pytest.approx([0.75, 0.25, 0.0])


@pytest.mark.parametrize("k", [0, -1, 6])
def test_pass_at_k_bad_k(k):
    with pytest.raises(ValueError, match="k must be in 1..n"):
        pass_at_k(torch.ones(2, 5), k)


@pytest.mark.parametrize(
    "bad, message",
    [
        (torch.ones(5), r"\[N, n\]"),
        (torch.ones(2, 3, 4), r"\[N, n\]"),
        (torch.ones(3, 0), "no samples"),
        (torch.tensor([[0.5, 1.0]]), "only 0/1"),
        (torch.tensor([[2, 0]]), "only 0/1"),
    ],
)
def test_input_errors(bad, message):
    with pytest.raises(ValueError, match=message):
        pass_at_k(bad, 1)
    with pytest.raises(ValueError, match=message):
        avg_at_k(bad)


def test_avg_at_k_values_and_shape():
    out = avg_at_k(torch.tensor([[True, False, False, False, True], [True] * 5]))
    assert out.shape == (2,)
    assert out.tolist() == pytest.approx([0.4, 1.0])


def test_majority_at_k():
    answers = torch.tensor(
        [
            [3, 3, 7, 3, 7],  # 3 wins 3:2, and 3 is correct
            [3, 3, 7, 3, 7],  # same votes, but here 3 is wrong
            [5, 9, 9, 5, 1],  # tie 5 vs 9: the first sampled (5) wins
            [-1, -1, -1, 2, -1],  # "no answer" never wins, however many
            [-1, -1, -1, -1, -1],  # nobody answered: 0
        ]
    )
    correct = torch.tensor(
        [
            [1, 1, 0, 1, 0],
            [0, 0, 1, 0, 1],
            [1, 0, 0, 1, 0],
            [0, 0, 0, 1, 0],
            [0, 0, 0, 0, 0],
        ]
    )
    assert majority_at_k(answers, correct).tolist() == [1.0, 0.0, 1.0, 1.0, 0.0]


def test_majority_at_k_errors():
    with pytest.raises(ValueError, match="differ in shape"):
        majority_at_k(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="integer ids"):
        majority_at_k(torch.zeros(2, 3), torch.zeros(2, 3))
