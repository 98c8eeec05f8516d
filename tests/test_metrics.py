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


def test_srank_default_delta_is_spec_001(dqn):
    """SPEC §6's delta is 0.01 and analysis_metrics calls srank with the default: singular values 1, .5, .25, .125
    (cumulative shares 0.533, 0.8, 0.933, 1) give 4 at delta 0.01 but 3 at 0.1."""
    matrix = torch.diag(torch.tensor([1.0, 0.5, 0.25, 0.125]))
    assert dqn.srank(matrix) == 4


def _linear_q_batch():
    """Q(x) = W x, W = 0 (4 actions), target 1, a different action per sample: the eNTK Gram matrix is
    diag(4 |x_i|^2) = diag(4, 2, 1, 0.5), the spectrum of test_srank_default_delta_is_spec_001 (srank 4 at 0.01, 3 at 0.1)."""
    model = torch.nn.Linear(2, 4, bias=False)
    torch.nn.init.zeros_(model.weight)
    states = torch.tensor([[1.0, 0.0], [0.5 ** 0.5, 0.0], [0.5, 0.0], [0.125 ** 0.5, 0.0]])
    return model, (states, torch.arange(4), torch.ones(4))


def test_entk_srank_default_delta_is_spec_001(dqn):
    """The eNTK srank uses srank's delta 0.01 ("the same δ", SPEC §6) when called as analysis_metrics calls it."""
    model, inputs = _linear_q_batch()
    assert dqn.entk_srank(model, dqn.td_sample_loss("mse"), inputs) == 4


class _StubQNetwork(torch.nn.Module):
    """The Q-network interface analysis_metrics uses: q = W x (the eNTK of _linear_q_batch) and, with return_info,
    fixed hidden units, capacity mask, head-input features and expert mass."""

    def __init__(self, info):
        super().__init__()
        self.linear, _ = _linear_q_batch()
        self.info = info

    def forward(self, x, return_info=False):
        q = self.linear(x)
        return (q, dict(self.info)) if return_info else q


def _analysis_metrics(dqn, **info):
    model = _StubQNetwork(info)
    _, inputs = _linear_q_batch()
    return dqn.analysis_metrics(model, inputs[0], dqn.td_sample_loss("mse"), inputs)


def test_analysis_metrics_feature_norm_by_hand(dqn):
    """Feature norm (SPEC §6) = mean over the batch of each sample's L2 norm: features (3, 4) and (0, 0) give
    (5 + 0) / 2 = 2.5 (a norm over the batch axis would give 3.5, the squared norm 12.5, the sum 5)."""
    hidden = torch.ones(2, 1, 1, 2)
    metrics = _analysis_metrics(dqn, hidden=hidden, hidden_mask=None, features=torch.tensor([[3.0, 4.0], [0.0, 0.0]]))
    assert metrics["metrics/feature_norm"] == pytest.approx(2.5)


def test_analysis_metrics_wiring(dqn):
    """analysis_metrics logs dormant fractions at tau 0 and 0.1 under their keys with Top1's capacity mask, srank of the
    head-input features (not of the hidden units) with delta 0.01, the eNTK srank, and the routing statistics."""
    # (B=4 copies, n=2 experts, p=2 slots, h=2 units); expert 0's slot 1 is capacity padding holding 1.0s
    sample = torch.tensor([[[0.0, 0.05], [1.0, 1.0]], [[2.0, 2.0], [2.0, 2.0]]])
    mask = torch.tensor([[1, 0], [1, 1]])
    # with the mask: unit means 0, 0.05, 2, 2 (layer mean 1.0125) -> scores 0, 0.049, 1.98, 1.98: tau 0 -> 1/4, 0.1 -> 2/4
    # without it: means 0.5, 0.525, 2, 2 -> scores 0.40, 0.42, 1.59, 1.59: nothing dormant
    features = torch.diag(torch.tensor([1.0, 0.5, 0.25, 0.125]))  # srank 4 (3 at delta 0.1); the hidden units' is 1
    mass = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]).expand(4, 3, 2)
    metrics = _analysis_metrics(dqn, hidden=sample.expand(4, 2, 2, 2), hidden_mask=mask.expand(4, 2, 2),
                                features=features, expert_mass=mass)
    assert metrics["metrics/dormant_tau0"] == 0.25 and metrics["metrics/dormant_tau0.1"] == 0.5
    assert metrics["metrics/srank"] == 4 and metrics["metrics/entk_srank"] == 4
    assert metrics["metrics/feature_norm"] == pytest.approx((1 + 0.5 + 0.25 + 0.125) / 4)
    assert metrics["moe/expert_load_0"] == pytest.approx(2 / 3) and metrics["moe/router_entropy"] == pytest.approx(0.0)


def test_dormant_fraction_normalises_by_the_layer_mean(dqn):
    """s_i divides by the mean over the layer's units (SPEC §6), not the max: unit means 4, 1, 1, 0.25 (|h|, signs
    mixed) have layer mean 1.5625, so the last scores 0.16: alive at tau 0.1, dormant at 0.2 (by the max, 0.0625)."""
    hidden = torch.tensor([[4.0, 1.0, -1.0, 0.5], [-4.0, -1.0, 1.0, 0.0]]).view(2, 1, 1, 4)
    assert dqn.dormant_fraction(hidden, None, 0.1) == 0.0 and dqn.dormant_fraction(hidden, None, 0.2) == 0.25


def test_dormant_fraction_normalises_over_all_experts_together(dqn):
    """For an MoE the neurons are all (expert, unit) pairs of the layer (SPEC §6), so one mean over all of them: expert 0's
    units at 1, 1 and expert 1's at 0.05, 0.05 -> mean 0.525, expert 1's score 0.095: half the layer dormant at 0.1
    (normalising each expert by its own mean would find none)."""
    hidden = torch.tensor([[1.0, 1.0], [0.05, 0.05]]).view(1, 2, 1, 2)
    assert dqn.dormant_fraction(hidden, None, 0.1) == 0.5


@pytest.mark.parametrize("mass,expected", [
    ([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]], [2 / 3, 1 / 3]),  # B=1, m=3: 2 of 3 tokens to expert 0
    ([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], [[0.0, 1.0]] * 3], [1 / 3, 2 / 3]),  # B=2: (2/3 + 0) / 2, (1/3 + 1) / 2
    ([[[0.6, 0.4], [0.2, 0.8], [1.0, 0.0]]], [0.6, 0.4]),  # Soft MoE mass: (0.6 + 0.2 + 1) / 3
])
def test_routing_stats_expert_load_with_more_tokens_than_experts(dqn, mass, expected):
    """Expert load = share of the batch's token mass per expert (SPEC §6): the mean over samples and tokens, so the
    loads sum to 1 (m=3 tokens != n=2 experts tells dividing by m from dividing by n or by B)."""
    stats = dqn.routing_stats({"expert_mass": torch.tensor(mass)})
    assert [stats["moe/expert_load_0"], stats["moe/expert_load_1"]] == pytest.approx(expected)


@pytest.mark.parametrize("script", ["dqn_softmoe", "drq_softmoe"])
@pytest.mark.parametrize("loss,target,expected", [
    ("huber", 3.0, 2.5),  # Huber with delta 1 (F.huber_loss, as training uses): |x| - 0.5
    ("huber", 0.5, 0.125),  # quadratic part: 0.5 x^2
    ("mse", 3.0, 9.0),  # training's F.mse_loss on one sample: x^2, no 1/2
])
def test_td_sample_loss_by_hand(script, loss, target, expected):
    """The eNTK's per-sample loss is the training TD loss on one sample: Q = 0 against the target."""
    from conftest import load_script

    sample_loss = load_script(script).td_sample_loss(loss)
    value = sample_loss(lambda state: torch.zeros(3), torch.zeros(2), torch.tensor(1), torch.tensor(target))
    assert float(value) == pytest.approx(expected)
