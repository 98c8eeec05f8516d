"""The Figure 10 analysis metrics (SPEC §6) on hand-computed cases: srank, dormant neurons (with Top1's capacity
mask), the empirical-NTK srank of a linear model whose per-sample gradients are known, and routing statistics."""

import math

import pytest
import torch


@pytest.mark.parametrize("singular_values,delta,expected", [
    ([1.0, 1.0, 0.001], 0.01, 2),  # cumulative shares 0.49975, 0.9995, 1
    ([1.0, 0.5, 0.25, 0.125], 0.01, 4),  # shares 0.533, 0.8, 0.933, 1
    ([1.0, 0.5, 0.25, 0.125], 0.1, 3),
    ([0.0, 0.0], 0.01, 0),
])
def test_srank_by_hand(dqn, singular_values, delta, expected):
    torch.manual_seed(0)
    k = len(singular_values)
    u, _ = torch.linalg.qr(torch.randn(6, k, dtype=torch.float64))  # any orthonormal bases: only the spectrum counts
    v, _ = torch.linalg.qr(torch.randn(5, k, dtype=torch.float64))
    matrix = u @ torch.diag(torch.tensor(singular_values, dtype=torch.float64)) @ v.T
    assert dqn.srank(matrix, delta) == expected


def test_dormant_fraction_by_hand(dqn):
    # a baseline layer (B, 1, 1, units): mean |h| per unit 1, 1, 1, 0 -> scores 4/3, 4/3, 4/3, 0
    hidden = torch.tensor([[1.0, -1.0, 2.0, 0.0], [-1.0, 1.0, 0.0, 0.0]]).view(2, 1, 1, 4)
    assert dqn.dormant_fraction(hidden, None, 0.0) == 0.25 and dqn.dormant_fraction(hidden, None, 0.1) == 0.25
    # a nearly dead unit: mean |h| 0.05 against a layer mean of 0.7625 -> score 0.066: dormant at 0.1, not at 0
    hidden[:, 0, 0, 3] = 0.05
    assert dqn.dormant_fraction(hidden, None, 0.0) == 0.0 and dqn.dormant_fraction(hidden, None, 0.1) == 0.25


def test_dormant_fraction_ignores_top1_capacity_padding(dqn):
    # (B=1, n=2 experts, p=2 slots, h=2 units); expert 0's second slot holds no token (mask 0) and garbage values
    hidden = torch.tensor([[[[1.0, 0.0], [100.0, 100.0]], [[1.0, 1.0], [1.0, 1.0]]]])
    mask = torch.tensor([[[1, 0], [1, 1]]])
    assert dqn.dormant_fraction(hidden, mask, 0.0) == 0.25  # expert 0's unit 1 never fires on a real token
    assert dqn.dormant_fraction(hidden, None, 0.0) == 0.0  # counted with the padding it would look alive


@pytest.mark.parametrize("actions,states,expected", [
    ([0, 1, 2], [[1.0, 0.0]] * 3, 3),  # gradients on different output rows: orthogonal, equal norms
    ([0, 0, 0], [[1.0, 0.0], [2.0, 0.0], [3.0, 0.0]], 1),  # one row, parallel inputs: one direction
])
def test_entk_srank_of_a_linear_q_function(dqn, actions, states, expected):
    """Q(x) = W x with W = 0 and target 1: the gradient of (Q(x)[a] - 1)^2 is -2 e_a x^T, so the Gram matrix of
    per-sample gradients is 4 [a_i = a_j] x_i . x_j."""
    model = torch.nn.Linear(2, 3, bias=False)
    torch.nn.init.zeros_(model.weight)
    inputs = (torch.tensor(states), torch.tensor(actions), torch.ones(3))
    assert dqn.entk_srank(model, dqn.td_sample_loss("mse"), inputs) == expected


def test_routing_stats_by_hand(dqn):
    # 2 samples x 2 tokens over 2 experts: loads are the mean mass per expert; entropy normalised by log n
    mass = torch.tensor([[[1.0, 0.0], [0.5, 0.5]], [[1.0, 0.0], [0.5, 0.5]]])
    stats = dqn.routing_stats({"expert_mass": mass})
    assert stats["moe/expert_load_0"] == pytest.approx(0.75) and stats["moe/expert_load_1"] == pytest.approx(0.25)
    assert stats["moe/router_entropy"] == pytest.approx(0.5 * math.log(2) / math.log(2))  # one-hot 0, uniform 1
    stats = dqn.routing_stats({"expert_mass": mass, "gate_probs": torch.full((2, 2, 2), 0.5), "dropped": torch.tensor(0.25)})
    assert stats["moe/router_entropy"] == pytest.approx(1.0) and stats["moe/dropped_fraction"] == 0.25
