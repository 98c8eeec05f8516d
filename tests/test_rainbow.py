"""rainbow_softmoe.py: the C51 projection, the sum tree and prioritized replay, noisy layers, the network, the loss,
a two-state MDP whose Q* is known, and real short runs on ALE games (SPEC §4)."""

import glob
import json
import math
import os

import numpy as np
import pytest
import torch

from conftest import load_script, read_scalars, run_script


@pytest.fixture(scope="module")
def rainbow():
    return load_script("rainbow_softmoe")


# ---------------------------------------------------------------- C51 projection


def brute_force_projection(target_support, probs, support):
    """Bellemare et al. (2017) one sample and one atom at a time: atom j's mass goes to atom i with weight
    max(0, 1 - |clip(Tz_j) - z_i| / dz) (the form Dopamine's project_distribution uses)."""
    v_min, v_max = support[0], support[-1]
    dz = (v_max - v_min) / (len(support) - 1)
    out = []
    for tz_row, p_row in zip(target_support, probs):
        row = [0.0] * len(support)
        for tz, p in zip(tz_row, p_row):
            tz = min(max(tz, v_min), v_max)
            for i, z in enumerate(support):
                row[i] += p * max(0.0, 1.0 - abs(tz - z) / dz)
        out.append(row)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("num_atoms,v_min,v_max", [(51, -10.0, 10.0), (7, -1.0, 2.0)])
def test_projection_matches_brute_force(rainbow, num_atoms, v_min, v_max):
    gen = torch.Generator().manual_seed(0)
    batch, gamma = 24, 0.99
    support = torch.linspace(v_min, v_max, num_atoms, dtype=torch.float64)
    probs = torch.rand(batch, num_atoms, generator=gen, dtype=torch.float64).softmax(-1)
    # returns far outside the support too; discounts of 1 to 3 steps, and 0 after a terminal
    returns = (torch.rand(batch, generator=gen, dtype=torch.float64) - 0.5) * 3 * (v_max - v_min)
    steps = torch.randint(1, 4, (batch,), generator=gen)
    discounts = gamma**steps * (torch.arange(batch) % 4 != 0)
    returns[1], discounts[1] = support[3], 0.0  # a terminal landing exactly on an atom
    returns[2], discounts[2] = 0.0, 1.0  # every shifted atom exactly on an atom
    target_support = returns[:, None] + discounts[:, None] * support
    projected = rainbow.project_distribution(target_support, probs, support)
    expected = brute_force_projection(target_support.tolist(), probs.tolist(), support.tolist())
    torch.testing.assert_close(projected, expected)
    torch.testing.assert_close(projected.sum(-1), torch.ones(batch, dtype=torch.float64))
    terminal = discounts == 0  # all the mass on the clipped return
    clipped = returns[terminal].clamp(v_min, v_max)
    torch.testing.assert_close((projected[terminal] * support).sum(-1), clipped)
    torch.testing.assert_close(projected[1], torch.eye(num_atoms, dtype=torch.float64)[3])
    torch.testing.assert_close(projected[2], probs[2])


def test_projection_keeps_the_mean_inside_the_support(rainbow):
    support = torch.linspace(-10, 10, 51, dtype=torch.float64)
    probs = torch.rand(8, 51, dtype=torch.float64).softmax(-1)
    target_support = 0.3 + 0.5 * support  # within [-4.7, 5.3]: nothing is clipped
    projected = rainbow.project_distribution(target_support.expand(8, -1), probs, support)
    torch.testing.assert_close((projected * support).sum(-1), (probs * target_support).sum(-1))


# ---------------------------------------------------------------- sum tree and prioritized replay


def test_sum_tree_update_keeps_every_node_the_sum_of_its_children(rainbow):
    tree = rainbow.SumTree(1000, "cpu")
    assert tree.first_leaf == 1024 and tree.depth == 10
    gen = torch.Generator().manual_seed(0)
    values = torch.rand(1000, generator=gen, dtype=torch.float64)
    tree.update(torch.arange(1000), values)
    leaves = torch.tensor([5, 999, 5, 0])  # a repeated leaf gets its last value, as Dopamine's in-order updates
    tree.update(leaves, torch.tensor([7.0, 3.0, 2.0, 0.0], dtype=torch.float64))
    values[leaves] = torch.tensor([2.0, 3.0, 2.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(tree.get(torch.arange(1000)), values)
    torch.testing.assert_close(tree.total(), values.sum())
    nodes = tree.nodes
    assert torch.equal(nodes[1:1024], nodes[2:2048:2] + nodes[3:2048:2])  # exact: each node is its children's sum


def test_sum_tree_sampling_frequencies_match_priorities(rainbow):
    """Batches of 32 stratified draws; a chi-square statistic on 40 leaves (some with priority 0). With 39 degrees of
    freedom the statistic is below 80 with probability > 0.9999; a tree off by one leaf, or sampling uniformly, or
    ignoring one level, gives thousands."""
    tree = rainbow.SumTree(40, "cpu")
    priorities = torch.tensor([(i % 5) * (1 + i // 10) for i in range(40)], dtype=torch.float64)  # every 5th is 0
    tree.update(torch.arange(40), priorities)
    gen = torch.Generator().manual_seed(0)
    draws = torch.cat([tree.stratified_sample(32, gen) for _ in range(2500)])
    counts = torch.bincount(draws, minlength=40).double()
    assert draws.max() < 40 and counts[priorities == 0].sum() == 0
    expected = priorities / priorities.sum() * len(draws)
    nonzero = priorities > 0
    chi2 = ((counts[nonzero] - expected[nonzero]) ** 2 / expected[nonzero]).sum()
    assert chi2 < 80, chi2
    # stratified: the k-th draw of a batch lies in the k-th 1/32 of the cumulative priority
    batch = tree.stratified_sample(32, gen)
    cumulative = priorities.cumsum(0) / priorities.sum()
    low, high = cumulative[batch] - priorities[batch] / priorities.sum(), cumulative[batch]
    k = torch.arange(32, dtype=torch.float64)
    assert ((high > k / 32 - 1e-12) & (low < (k + 1) / 32 + 1e-12)).all()


def test_sum_tree_never_returns_a_zero_priority_leaf_at_boundaries(rainbow):
    tree = rainbow.SumTree(8, "cpu")
    priorities = torch.tensor([0.0, 0.1, 0.0, 0.2, 0.0, 0.0, 0.3, 0.0], dtype=torch.float64)
    tree.update(torch.arange(8), priorities)
    # queries exactly at every cumulative boundary, and just below the total
    below_total = torch.nextafter(tree.total(), torch.zeros((), dtype=torch.float64))
    queries = torch.cat([torch.zeros(1, dtype=torch.float64), priorities.cumsum(0)[:-3], below_total.view(1)])
    found = tree.find(queries.clamp(max=below_total))
    assert (priorities[found] > 0).all(), found


def feed(rb, steps, rng, num_envs):
    """Store `steps` agent steps as the training loop does (next-step autoreset: the step after an episode's end
    stores its final observation with last=True); yields after every add."""
    was_done = np.zeros(num_envs, dtype=bool)
    for t in range(steps):
        terminal = rng.random(num_envs) < 0.12
        done = terminal | (rng.random(num_envs) < 0.05)  # some truncations
        frames = np.full((num_envs, 84, 84), t % 250 + 1, dtype=np.uint8)
        rb.add(frames, rng.integers(4, size=num_envs), rng.normal(size=num_envs), terminal & ~was_done, was_done)
        was_done = done & ~was_done
        yield t


def valid_starts(rb):
    """(size, num_envs) mask of the slots a transition may start at, from the replay's own bounds and flags."""
    lo, hi = rb.valid_range()
    mask = torch.zeros(rb.size, rb.num_envs, dtype=torch.bool)
    for i in range(lo, hi + 1):
        mask[i % rb.size] = ~rb.last[i % rb.size]
    return mask


@pytest.mark.parametrize("num_envs", [1, 2])
def test_prioritized_replay_gives_priority_exactly_to_valid_starts(rainbow, num_envs):
    size, n = 23, 3
    rb = rainbow.PrioritizedReplayBuffer(size * num_envs, num_envs, "cpu", n_step=n, seed=0)
    rng = np.random.default_rng(0)
    for t in feed(rb, 6 * size, rng, num_envs):
        priorities = rb.tree.get(torch.arange(size * num_envs)).view(size, num_envs)
        assert torch.equal(priorities > 0, valid_starts(rb)), t
        lo, hi = rb.valid_range()
        if hi >= 0:  # the start that just became valid has the largest priority so far (0 if a final observation)
            torch.testing.assert_close(priorities[hi % size], rb.max_priority * ~rb.last[hi % size])
        if t % 10 == 9 and rb.can_sample():  # learn from time to time: new priorities from losses
            idx, envs = rb.sample_indices(8)
            assert not rb.last[idx % size, envs].any() and idx.min() >= lo and idx.max() <= hi
            losses = torch.as_tensor(rng.random(8) * (t + 1))
            rb.update_priorities(idx, envs, losses)
            leaves = rb.leaves(idx, envs)  # every sampled leaf gets sqrt(loss + 1e-10), a repeated one its last loss
            last = [max(j for j in range(8) if leaves[j] == leaves[i]) for i in range(8)]
            torch.testing.assert_close(rb.tree.get(leaves), (losses[last] + 1e-10).sqrt())
    assert rb.max_priority > 5.0  # raised by the losses


def test_prioritized_sampling_follows_priorities_after_wraparound(rainbow):
    size = 30
    rb = rainbow.PrioritizedReplayBuffer(2 * size, 2, "cpu", n_step=3, seed=1)
    for _ in feed(rb, 4 * size + 7, np.random.default_rng(1), 2):
        pass
    valid = valid_starts(rb)
    lo, hi = rb.valid_range()
    idx = torch.tensor([i for i in range(lo, hi + 1) for e in range(2) if valid[i % size, e]])
    envs = torch.tensor([e for i in range(lo, hi + 1) for e in range(2) if valid[i % size, e]])
    priority = (idx % 5 + 1 + envs).double()  # set through the learner's path: priority = sqrt(loss + 1e-10)
    rb.update_priorities(idx, envs, priority**2 - 1e-10)
    counts = {}
    for _ in range(1500):
        sample_idx, sample_envs = rb.sample_indices(32)
        assert sample_idx.min() >= lo and sample_idx.max() <= hi  # logical slots, consistent with valid_range()
        for key in zip(sample_idx.tolist(), sample_envs.tolist()):
            counts[key] = counts.get(key, 0) + 1
    expected = priority / priority.sum() * 1500 * 32
    observed = torch.tensor([counts.get(key, 0) for key in zip(idx.tolist(), envs.tolist())], dtype=torch.float64)
    assert sum(counts.values()) == observed.sum()  # nothing outside the valid starts
    chi2 = ((observed - expected) ** 2 / expected).sum()
    assert chi2 < 2 * len(idx) + 40, (chi2, len(idx))
    # the batch the learner gets: states and next states rebuilt at those logical slots
    states, actions, returns, discounts, next_states = rb.gather(sample_idx, sample_envs)
    assert torch.equal(states[:, -1, 0, 0], rb.frames[sample_idx % size, sample_envs, 0, 0])


def test_importance_weights_by_hand(rainbow):
    rb = rainbow.PrioritizedReplayBuffer(100, 1, "cpu", n_step=1, seed=0)
    for t in range(12):
        rb.add(np.full((1, 84, 84), t + 1, np.uint8), [0], [0.0], [False], [False])
    lo, hi = rb.valid_range()
    assert (lo, hi) == (0, 10)
    starts = torch.arange(11)
    rb.update_priorities(starts, torch.zeros(11, dtype=torch.long), (starts + 1.0) ** 2 - 1e-10)  # priority i + 1
    idx = torch.tensor([0, 3, 10, 3])
    weights = rb.importance_weights(idx, torch.zeros(4, dtype=torch.long))
    by_hand = [1 / math.sqrt(i + 1) for i in (0, 3, 10, 3)]  # 1 / sqrt(P(i)) over the batch max: the total cancels
    torch.testing.assert_close(weights, torch.tensor(by_hand, dtype=torch.float32) / max(by_hand))
    assert weights[0] == 1.0  # the least likely transition of the batch gets the largest weight
    # Dopamine adds the 1e-10 to the raw priority (its `sampling_probabilities`), not to P(i): it shows on a zero loss
    rb.update_priorities(torch.tensor([5]), torch.zeros(1, dtype=torch.long), torch.zeros(1))  # priority 1e-5
    weights = rb.importance_weights(torch.tensor([5, 10]), torch.zeros(2, dtype=torch.long))
    torch.testing.assert_close(weights, torch.tensor([1.0, math.sqrt((1e-5 + 1e-10) / (11 + 1e-10))]), rtol=1e-6, atol=0)
    assert rb.max_priority.item() == pytest.approx(11.0)
    rb.add(np.full((1, 84, 84), 13, np.uint8), [0], [0.0], [False], [False])
    assert rb.tree.get(torch.tensor([11])).item() == pytest.approx(11.0)  # a new transition: the largest so far


# ---------------------------------------------------------------- noisy layers


def test_noisy_linear_init_and_modes(rainbow):
    torch.manual_seed(0)
    layer = rainbow.NoisyLinear(400, 30)
    bound = 1 / math.sqrt(400)
    for sigma in (layer.weight_sigma, layer.bias_sigma):
        assert torch.all(sigma == 0.1 * bound)
    for mu in (layer.weight_mu, layer.bias_mu):
        assert mu.abs().max() <= bound and mu.abs().max() > 0.9 * bound
    x = torch.randn(1, 400).expand(4, -1)  # four identical samples
    y = layer(x)
    assert not torch.allclose(y[0], y[1]) and not torch.allclose(y, layer(x))  # per sample, per call
    layer.eval()
    torch.testing.assert_close(layer(x), x @ layer.weight_mu.T + layer.bias_mu)
    torch.testing.assert_close(layer(x), layer(x), rtol=0, atol=0)


def test_noisy_linear_equals_per_sample_factorised_weights(rainbow):
    """y_b = x_b (mu_W + sigma_W * f(e_out,b) f(e_in,b)^T)^T + mu_b + sigma_b * f(e_out,b), noise drawn in + out."""
    torch.manual_seed(0)
    layer = rainbow.NoisyLinear(6, 5).double()
    with torch.no_grad():
        layer.weight_sigma.uniform_(0.1, 1.0)
        layer.bias_sigma.uniform_(0.1, 1.0)
    x = torch.randn(3, 6, dtype=torch.float64)
    torch.manual_seed(7)
    y = layer(x)
    torch.manual_seed(7)
    f = lambda e: e.sign() * e.abs().sqrt()
    eps_in, eps_out = f(torch.randn(3, 6, dtype=torch.float64)), f(torch.randn(3, 5, dtype=torch.float64))
    for b in range(3):
        weight = layer.weight_mu + layer.weight_sigma * torch.outer(eps_out[b], eps_in[b])
        bias = layer.bias_mu + layer.bias_sigma * eps_out[b]
        torch.testing.assert_close(y[b], weight @ x[b] + bias)


def test_noisy_linear_output_variance_is_factorised(rainbow):
    """Var(y_o) = E f(e)^2 (E f(e)^2 sum_i x_i^2 sigma_oi^2 + sigma_bo^2), E f(e)^2 = E|e| = sqrt(2/pi)."""
    torch.manual_seed(0)
    layer = rainbow.NoisyLinear(8, 3).double()
    x = torch.randn(1, 8, dtype=torch.float64)
    samples = layer(x.expand(40_000, -1))
    c = math.sqrt(2 / math.pi)
    expected = c * (c * (x**2 * layer.weight_sigma**2).sum(1) + layer.bias_sigma**2)
    torch.testing.assert_close(samples.var(0), expected.detach(), rtol=0.05, atol=0)


def test_noisy_experts_noise_per_sample_shared_by_experts_and_slots(rainbow):
    """Dopamine's experts all hold one key (`ExpertModel.rng_key`): within a sample every expert and slot draws the
    same f(e_in), f(e_out); samples draw their own."""
    torch.manual_seed(0)
    experts = rainbow.NoisyExperts(3, 5, 7)
    bound = 1 / math.sqrt(5)
    assert torch.all(experts.layer1.weight_sigma == 0.1 * bound) and experts.layer1.weight_sigma.shape == (3, 5, 7)
    experts.double()
    with torch.no_grad():
        experts.layer1.weight_sigma.uniform_(0.1, 1.0)
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    x[1] = x[0]  # 2 identical samples
    torch.manual_seed(7)
    y, hidden = experts(x)
    assert not torch.allclose(y[0], y[1])  # samples draw their own noise
    torch.manual_seed(7)
    f = lambda e: e.sign() * e.abs().sqrt()
    eps_in, eps_out = f(torch.randn(2, 1, 1, 5, dtype=torch.float64)), f(torch.randn(2, 1, 1, 7, dtype=torch.float64))
    layer = experts.layer1
    for b in range(2):
        for e in range(3):  # expert e's factorised weight with the sample's one noise draw
            weight = layer.weight_mu[e] + layer.weight_sigma[e] * torch.outer(eps_in[b, 0, 0], eps_out[b, 0, 0])
            bias = layer.bias_mu[e] + layer.bias_sigma[e] * eps_out[b, 0, 0]
            torch.testing.assert_close(hidden[b, e], torch.relu(x[b, e] @ weight + bias))
    experts.eval()
    y, hidden = experts(x)
    for e in range(3):  # noise off: the means through `Experts`' computation
        h = torch.relu(x[:, e] @ experts.layer1.weight_mu[e] + experts.layer1.bias_mu[e])
        torch.testing.assert_close(hidden[:, e], h)
        torch.testing.assert_close(y[:, e], h @ experts.w2[e] + experts.b2[e])


# ---------------------------------------------------------------- network and loss


def tiny_args(rainbow, **flags):
    return rainbow.Args(encoder="nature", num_experts=2, expert_hidden=16, **flags)


@pytest.mark.parametrize("flags", [dict(moe_type="baseline"), dict(), dict(moe_type="top1", tokenization="perfeat"),
                                   dict(expert_variant="big"), dict(expert_variant="all"),
                                   dict(noisy=False, dueling=False), dict(num_atoms=5, v_min=-1.0, v_max=3.0)])
def test_network_outputs_distributions_and_noise_where_asked(rainbow, flags):
    torch.manual_seed(0)
    args = tiny_args(rainbow, **flags)
    net = rainbow.QNetwork(args, 4)
    frames = torch.randint(0, 255, (3, 4, 84, 84), dtype=torch.uint8)
    log_probs, info = net(frames, return_info=True)
    assert log_probs.shape == (3, 4, args.num_atoms)
    torch.testing.assert_close(log_probs.exp().sum(-1), torch.ones(3, 4))
    assert info["features"].shape[0] == 3 and info["hidden"].dim() == 4
    noisy = [m for m in net.modules() if isinstance(m, (rainbow.NoisyLinear, rainbow.NoisyGroupedLinear))]
    plain = [m for name, m in net.named_modules() if isinstance(m, torch.nn.Linear) and "router" not in name]
    if args.noisy:
        heads = 2 if args.dueling else 1
        penultimate = 1  # the baseline's dense layer, the experts' first layer, or the big/all dense copies
        assert len(noisy) == heads + penultimate and not plain
        assert not torch.allclose(net(frames), log_probs)
    else:
        assert not noisy and len(plain) == 1
        torch.testing.assert_close(net(frames), log_probs)
    net.eval()
    torch.testing.assert_close(net(frames), net(frames), rtol=0, atol=0)


@pytest.mark.parametrize("n", [1, 8])
def test_parameter_counts(rainbow, n):
    actions, F_, h, atoms = 6, 32 * 121, 512, 51
    encoder = sum(p.numel() for p in rainbow.make_encoder("impala", 1, 3).parameters())
    count = lambda net: sum(p.numel() for p in net.parameters())
    heads = lambda f: (f * atoms + atoms) + (f * actions * atoms + actions * atoms)  # dueling value + advantage
    soft = rainbow.QNetwork(rainbow.Args(num_experts=n), actions)
    slots = n * math.ceil(121 / n)
    experts = n * (2 * (32 * h + h) + h * 32 + 32)  # noisy first layer: mu and sigma
    assert count(soft) == encoder + 32 * slots + experts + 2 * heads(F_)
    base = rainbow.QNetwork(rainbow.Args(moe_type="baseline", num_experts=n, noisy=False), actions)
    assert count(base) == encoder + (F_ * h * n + h * n) + heads(h * n)


def test_c51_target_uses_the_online_network_for_double_q(rainbow):
    torch.manual_seed(3)
    args = tiny_args(rainbow, moe_type="baseline")
    online, target = rainbow.QNetwork(args, 6).eval(), rainbow.QNetwork(args, 6).eval()  # eval: no noise
    next_states = torch.randint(0, 255, (16, 4, 84, 84), dtype=torch.uint8)
    returns, discounts = torch.linspace(-2, 2, 16), torch.full((16,), 0.99**3)
    discounts[::5] = 0.0
    support = online.support
    online_actions = rainbow.expected_q(online(next_states), support).argmax(1)
    target_actions = rainbow.expected_q(target(next_states), support).argmax(1)
    assert (online_actions != target_actions).any()  # otherwise this test could not tell them apart
    for double_q, actions in [(True, online_actions), (False, target_actions)]:
        got = rainbow.c51_target(online, target, next_states, returns, discounts, support, double_q)
        probs = target(next_states).exp()[torch.arange(16), actions]
        want = brute_force_projection((returns[:, None] + discounts[:, None] * support).tolist(), probs.tolist(),
                                      support.tolist())
        torch.testing.assert_close(got, want.float())


@pytest.mark.parametrize("flags", [dict(moe_type="baseline"), dict(), dict(expert_variant="big")])
def test_c51_target_draws_one_noise_for_the_batch_and_both_networks(rainbow, flags):
    """Dopamine's target_output vmaps the batch with one key, given to the target and the online network alike."""
    torch.manual_seed(3)
    args = tiny_args(rainbow, **flags)
    online, target = rainbow.QNetwork(args, 6), rainbow.QNetwork(args, 6)  # training mode: noise on
    target.load_state_dict(online.state_dict())
    next_states = torch.randint(0, 255, (1, 4, 84, 84), dtype=torch.uint8).expand(5, -1, -1, -1)  # 5 equal samples
    returns, discounts = torch.zeros(5), torch.full((5,), 0.99**3)
    support = online.support
    got = rainbow.c51_target(online, target, next_states, returns, discounts, support)
    torch.testing.assert_close(got, got[:1].expand(5, -1))  # one draw for the batch (per sample: ~1e-2 apart)
    assert all(m.shared_noise is None for net in (online, target) for m in net.modules() if hasattr(m, "shared_noise"))
    assert not torch.allclose(online(next_states)[0], online(next_states)[1])  # outside the target: per sample
    # the same draw in both networks: with equal parameters the online network picks the target network's argmax
    rainbow.share_noise((online, target), True)
    torch.testing.assert_close(online(next_states), target(next_states))
    shared = target(next_states)
    rainbow.share_noise((online, target), False)
    actions = rainbow.expected_q(shared, support).argmax(1)
    probs = shared.exp()[torch.arange(5), actions]
    want = rainbow.project_distribution(returns[:, None] + discounts[:, None] * support, probs, support)
    assert not torch.allclose(got, want)  # a fresh draw: another distribution than this one
    torch.manual_seed(11)
    got = rainbow.c51_target(online, target, next_states, returns, discounts, support)
    torch.manual_seed(11)
    rainbow.share_noise((online, target), True)
    shared = target(next_states)
    rainbow.share_noise((online, target), False)
    actions = rainbow.expected_q(shared, support).argmax(1)
    want = rainbow.project_distribution(returns[:, None] + discounts[:, None] * support,
                                        shared.exp()[torch.arange(5), actions], support)
    torch.testing.assert_close(got, want)


def test_rainbow_loss_is_weighted_cross_entropy(rainbow):
    torch.manual_seed(0)
    args = tiny_args(rainbow)
    q_network, target_network = rainbow.QNetwork(args, 4).eval(), rainbow.QNetwork(args, 4).eval()
    gen = torch.Generator().manual_seed(0)
    batch = (torch.randint(0, 255, (8, 4, 84, 84), dtype=torch.uint8, generator=gen), torch.arange(8) % 4,
             torch.randn(8, generator=gen), torch.full((8,), 0.97), torch.randint(0, 255, (8, 4, 84, 84), dtype=torch.uint8))
    weights = torch.rand(8, generator=gen)
    loss, sample_losses, aux_loss, q_mean = rainbow.rainbow_loss(q_network, target_network, batch, args, weights)
    target = rainbow.c51_target(q_network, target_network, batch[4], batch[2], batch[3], q_network.support)
    log_probs = q_network(batch[0])[torch.arange(8), batch[1]]
    torch.testing.assert_close(sample_losses, -(target * log_probs).sum(-1))
    torch.testing.assert_close(loss, (weights * sample_losses).mean())
    torch.testing.assert_close(q_mean, rainbow.expected_q(log_probs, q_network.support).mean())
    loss.backward()
    assert all(p.grad is None for p in target_network.parameters())
    assert q_network.moe.phi.grad.abs().sum() > 0


# ---------------------------------------------------------------- a two-state MDP with a known Q*

GAMMA = 0.9
Q_STAR = {"A": [0.5, 0.9], "B": [-0.5, 1.0]}
FRAME = {"A": np.full((84, 84), 60, np.uint8), "B": np.full((84, 84), 180, np.uint8)}


def play_mdp(rb, episodes, rng):
    """State A: action 0 gives 0.5 and ends; action 1 gives 0 and leads to B. B: action 0 gives -0.5, 1 gives 1, both end."""
    was_done = False
    for _ in range(episodes):
        state = "A"
        while True:
            action = int(rng.integers(2))
            if state == "A":
                reward, terminal, nxt = (0.5, True, None) if action == 0 else (0.0, False, "B")
            else:
                reward, terminal, nxt = (-0.5 if action == 0 else 1.0), True, None
            rb.add(FRAME[state][None], [action], [reward], [terminal], [was_done])
            was_done = False
            if terminal:
                rb.add(FRAME[state][None], [0], [0.0], [False], [True])  # reset step: the final observation
                break
            state = nxt


def test_full_rainbow_update_converges_to_q_star(rainbow):
    """Noisy nets, dueling, double-Q, C51 and prioritized replay together drive the expected Q to Q*."""
    torch.manual_seed(0)
    args = tiny_args(rainbow, gamma=GAMMA, n_step=1)
    q_network, target_network = rainbow.QNetwork(args, 2), rainbow.QNetwork(args, 2)
    target_network.load_state_dict(q_network.state_dict())
    optimizer = torch.optim.Adam(q_network.parameters(), lr=2e-3, eps=args.adam_eps)
    rb = rainbow.PrioritizedReplayBuffer(1000, 1, "cpu", n_step=1, gamma=GAMMA, seed=0)
    play_mdp(rb, 60, np.random.default_rng(0))
    for update in range(150):
        idx, envs = rb.sample_indices(32)
        weights = rb.importance_weights(idx, envs)
        loss, sample_losses, _, _ = rainbow.rainbow_loss(q_network, target_network, rb.gather(idx, envs), args, weights)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        rb.update_priorities(idx, envs, sample_losses.detach())
        if update % 25 == 24:
            target_network.load_state_dict(q_network.state_dict())
    zeros = np.zeros((84, 84), np.uint8)
    states = torch.as_tensor(np.stack([np.stack([zeros, zeros, zeros, FRAME["A"]]),
                                       np.stack([zeros, zeros, FRAME["A"], FRAME["B"]])]))
    with torch.no_grad():
        q = rainbow.expected_q(q_network.eval()(states), q_network.support)
    assert (q - torch.tensor([Q_STAR["A"], Q_STAR["B"]])).abs().max() < 0.05, q
    assert rb.max_priority > 1.0  # priorities came from the losses


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("flags,message", [
    (dict(num_atoms=1), "--num-atoms must be at least 2"),
    (dict(v_min=5.0, v_max=5.0), "--v-min (5.0) must be below --v-max (5.0)"),
    (dict(start_e=0.5), "apply only with --no-noisy"),
    (dict(exploration_steps=1000), "apply only with --no-noisy"),
    (dict(noisy=False, noisy_epsilon=0.01), "--noisy-epsilon applies to noisy nets"),
    (dict(noisy_epsilon=1.5), "--noisy-epsilon must be in [0, 1]"),
    (dict(moe_type="top1", random_phi=True), "--random-phi and --moe-l2-norm are Soft MoE options"),
    (dict(expert_variant="all", tokenization="perfeat"), "--expert-variant all is a Soft MoE"),
])
def test_impossible_combinations_are_refused(rainbow, flags, message):
    with pytest.raises(ValueError) as error:
        rainbow.check_args(rainbow.Args(**flags))
    assert message in str(error.value)


def test_no_noisy_accepts_an_epsilon_schedule(rainbow):
    rainbow.check_args(rainbow.Args(noisy=False, start_e=0.5, end_e=0.05, exploration_steps=1000))


def test_bad_input_is_one_clear_line(tmp_path):
    result = run_script("rainbow_softmoe", "--runs-dir", str(tmp_path), "--v-min", "3", "--v-max", "-3", timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rainbow_softmoe.py: error: --v-min (3.0) must be below"), result.stderr
    assert not os.listdir(tmp_path)


# ---------------------------------------------------------------- real short runs

# SpaceInvaders: with noisy nets the untrained agent acts greedily from the first step, and in SpaceInvaders even a
# constant action loses all lives in 380-730 steps (sticky actions), so these seeded runs see episodes end; a greedy
# agent may never serve in Breakout
TINY = ["--encoder", "nature", "--total-timesteps", "720", "--buffer-size", "1000", "--batch-size", "8", "--iteration-steps", "100",
        "--metrics-every", "700", "--log-every", "100", "--print-every", "360"]
KEYS = ["charts/episodic_return", "charts/episodic_length", "charts/iteration_return", "charts/SPS", "charts/epsilon",
        "losses/td_loss", "losses/q_values", "metrics/dormant_tau0", "metrics/dormant_tau0.1", "metrics/feature_norm",
        "metrics/srank", "metrics/entk_srank"]


def run_dir_of(tmp_path):
    (run_dir,) = glob.glob(os.path.join(tmp_path, "*"))
    return run_dir


@pytest.mark.parametrize("flags", [
    ["--moe-type", "baseline", "--num-experts", "1"],
    ["--moe-type", "softmoe", "--num-experts", "4"],
    ["--moe-type", "top1", "--load-balancing-coef", "1.0", "--tokenization", "perfeat", "--noisy-epsilon", "0.01"],
])
def test_rainbow_short_run_logs_every_key(tmp_path, flags):
    result = run_script("rainbow_softmoe", "--env-id", "SpaceInvaders", "--runs-dir", str(tmp_path), *TINY,
                        "--learning-starts", "650", *flags)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step 720/720" in result.stdout
    run_dir = run_dir_of(tmp_path)
    assert os.path.basename(run_dir).startswith("SpaceInvaders__rainbow_softmoe__1__")
    scalars = read_scalars(run_dir)
    for key in KEYS:
        assert key in scalars, key
    # noisy nets explore, with the official code's constant epsilon 0.01 on top when asked
    assert [v for _, v in scalars["charts/epsilon"]] == pytest.approx([0.01 if "--noisy-epsilon" in flags else 0.0] * 7)
    assert len(scalars["losses/td_loss"]) == 1 and 0 < scalars["losses/td_loss"][0][1] < math.log(51) + 1
    if "baseline" not in flags:
        assert "moe/router_entropy" in scalars and "moe/expert_load_0" in scalars
    if "top1" in flags:
        assert "moe/dropped_fraction" in scalars and "losses/aux_loss" in scalars
    assert all(0 <= v <= 1 for _, v in scalars["metrics/dormant_tau0.1"])


def test_rainbow_ablations_and_big_variant_run(tmp_path):
    """Every Rainbow component off at once (epsilon-greedy, plain heads, no double-Q, uniform replay), on the
    'big' expert variant with two envs and replay ratio 0.5; a random warm-up ends Breakout episodes."""
    result = run_script("rainbow_softmoe", "--env-id", "Breakout", "--runs-dir", str(tmp_path), *TINY,
                        "--learning-starts", "680", "--exploration-steps", "20",
                        "--no-noisy", "--no-dueling", "--no-double-q", "--no-prioritized",
                        "--expert-variant", "big", "--num-experts", "2", "--num-envs", "2", "--replay-ratio", "0.5")
    assert result.returncode == 0, result.stderr[-3000:]
    scalars = read_scalars(run_dir_of(tmp_path))
    for key in KEYS:
        assert key in scalars, key
    epsilons = dict(scalars["charts/epsilon"])
    # logged at agent step 600 (the step's epsilon, chosen at 598: warm-up) and 700 (chosen at 698: 18 steps later)
    assert epsilons[600] == 1.0 and epsilons[700] == pytest.approx(1.0 - 0.99 * 18 / 20)


def test_rainbow_impala_softmoe_saves_and_evaluates(tmp_path):
    result = run_script("rainbow_softmoe", "--env-id", "ALE/Pong-v5", "--runs-dir", str(tmp_path), "--total-timesteps",
                        "120", "--learning-starts", "80", "--buffer-size", "500", "--metrics-every", "0",
                        "--num-experts", "2", "--save-model", "--eval-episodes", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = run_dir_of(tmp_path)
    assert os.path.basename(run_dir).startswith("Pong__rainbow_softmoe__")
    saved = torch.load(os.path.join(run_dir, "model.pt"), weights_only=True)  # tensors and plain Python values only
    assert "moe.experts.layer1.weight_sigma" in saved["model"] and saved["model"]["support"].shape == (51,)
    summary = json.load(open(os.path.join(run_dir, "summary.json")))
    assert summary["global_step"] == 120 and summary["script"] == "rainbow_softmoe.py" and len(summary["eval_returns"]) == 2
    returns = [v for _, v in read_scalars(run_dir)["eval/episodic_return"]]  # the mean of the 2 games
    assert returns == [pytest.approx(np.mean(summary["eval_returns"]))] and all(-21 <= r <= 21 for r in returns)


def test_prioritized_replay_allocates_what_nbytes_says(rainbow):
    rb = rainbow.PrioritizedReplayBuffer(1000, 2, "cpu", n_step=3)
    storage = [t for t in vars(rb).values() if isinstance(t, torch.Tensor) and t.numel() >= 1000] + [rb.tree.nodes]
    assert sum(t.numel() * t.element_size() for t in storage) == rainbow.PrioritizedReplayBuffer.nbytes(1000)
    assert rainbow.PrioritizedReplayBuffer.nbytes(1_000_000) == 7_063_000_000 + 2 * 2**20 * 8  # < 7.1 GB
