"""Encoders, initialisations, dueling heads and noisy nets against hand-written references (SPEC §2-4)."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import equalise_noisy_heads, load_script, small_agent


def tf_same(size, kernel, stride):
    """TensorFlow 'SAME' pads (before, after) of one axis, written out: out = ceil(in / stride), the odd pixel last."""
    out = (size + stride - 1) // stride
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def pad_same(x, kernel, stride, value=0.0):
    (top, bottom), (left, right) = tf_same(x.shape[-2], kernel, stride), tf_same(x.shape[-1], kernel, stride)
    return F.pad(x, [left, right, top, bottom], value=value)


def conv_same(x, conv, stride=1):
    return F.conv2d(pad_same(x, conv.weight.shape[-1], stride), conv.weight, conv.bias, stride)


def reference_impala(encoder, x):
    """Espeholt et al. (2018) as SPEC §2 states it, per stack: conv -> 3x3/2 max-pool (-inf 'SAME' padding) -> 2 x
    [x + conv_b(relu(conv_a(relu(x))))]; one ReLU after the last stack only."""
    for stage in encoder.stages:
        x = conv_same(x, stage.conv)
        x = F.max_pool2d(pad_same(x, 3, 2, value=-math.inf), 3, 2)
        for conv_a, conv_b in stage.blocks:
            x = x + conv_same(F.relu(conv_same(F.relu(x), conv_a)), conv_b)
    return F.relu(x)


# ---------------------------------------------------------------- encoders


@pytest.mark.parametrize("filter_size", [3, 4])
def test_impala_encoder_matches_hand_written_forward(dqn, filter_size):
    """Impala ResNet = F.conv2d / F.max_pool2d / F.relu with SPEC §2's order and TF-SAME pads, on its own weights."""
    torch.manual_seed(0)
    encoder = dqn.make_encoder("impala", 1, filter_size).double()
    with torch.no_grad():
        for module in encoder.modules():
            if isinstance(module, torch.nn.Conv2d):
                module.bias.normal_(0.0, 0.1)  # non-zero biases: every ReLU sees negative and positive inputs
    x = torch.rand(2, 4, 84, 84, dtype=torch.float64)
    with torch.no_grad():
        out = encoder(x)
        expected = reference_impala(encoder, x)
        # intermediate stacks end without a ReLU: their outputs have negative entries
        inner = encoder.stages[1](encoder.stages[0](x))
    assert out.shape == expected.shape == (2, 32, 11, 11)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    assert (inner < 0).any()


def test_nature_encoder_layers_and_hand_written_forward(dqn):
    """Nature CNN: convs (32, 8x8/4), (64, 4x4/2), (64, 3x3/1), TF-SAME pads, ReLU after each (SPEC §2)."""
    torch.manual_seed(0)
    encoder = dqn.make_encoder("nature", 1, 3).double()
    convs = [m for m in encoder.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.stride) for c in convs] == [
        (4, 32, (8, 8), (4, 4)), (32, 64, (4, 4), (2, 2)), (64, 64, (3, 3), (1, 1))]
    with torch.no_grad():
        for conv in convs:
            conv.bias.normal_(0.0, 0.1)
    x = torch.rand(2, 4, 84, 84, dtype=torch.float64)
    expected = x
    for conv, stride in zip(convs, (4, 2, 1)):
        expected = F.relu(conv_same(expected, conv, stride))
    with torch.no_grad():
        out = encoder(x)
    assert out.shape == (2, 64, 11, 11)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------- initialisation


def test_lecun_normal_std_and_truncation(dqn):
    """lecun_normal_: truncated normal (+-2 sigma) whose std after truncation is 1/sqrt(fan_in) (SPEC §2, Flax)."""
    torch.manual_seed(0)
    weight = torch.empty(64, 256, 3, 3)
    dqn.lecun_normal_(weight)
    target = 1 / math.sqrt(256 * 9)
    assert abs(weight.std().item() / target - 1) < 0.02, weight.std().item() / target
    assert abs(weight.mean().item()) < 0.01 * target
    # truncated at 2 sigma of the untruncated normal, sigma = target / 0.8796...
    assert weight.abs().max() <= 2 * target / 0.87962566103423978 * (1 + 1e-6)
    assert weight.abs().max() > 1.9 * target / 0.87962566103423978
    # the residual blocks' convs use it (fan_in = 64 channels x 3 x 3 at scale 2)
    encoder = dqn.make_encoder("impala", 2, 3)
    conv = encoder.stages[2].blocks[0][0]
    assert abs(conv.weight.std().item() * math.sqrt(64 * 9) - 1) < 0.02


@pytest.mark.parametrize("name", ["nature", "impala"])
def test_grouped_conv_xavier_bound_counts_fans_per_group(dqn, name):
    """Grouped encoders (big/all variants): each group is Glorot-uniform with its own fan_in/fan_out (SPEC §2, §5.3)."""
    torch.manual_seed(0)
    groups = 4
    encoder = dqn.make_encoder(name, 1, 3, groups=groups)
    convs = [encoder.stages[0]] if name == "nature" else [encoder.stages[0].conv]
    convs += [encoder.stages[1]] if name == "nature" else [encoder.stages[1].conv]
    for conv in convs:
        out_channels, in_per_group, k, _ = conv.weight.shape
        receptive = k * k
        bound = math.sqrt(6 / (in_per_group * receptive + out_channels // groups * receptive))
        for group in conv.weight.view(groups, -1):
            assert group.abs().max() <= bound and group.abs().max() > 0.9 * bound
    single = dqn.make_encoder(name, 1, 3)
    first = single.stages[0] if name == "nature" else single.stages[0].conv
    bound = math.sqrt(6 / (first.weight[0].numel() + first.weight.shape[0] * first.weight[0, 0].numel()))
    assert first.weight.abs().max() <= bound and first.weight.abs().max() > 0.9 * bound


def test_grouped_linear_and_experts_xavier_bound_per_group(dqn):
    """GroupedLinear and the experts' layers: Glorot-uniform bound sqrt(6/(in+out)) of one group, zero bias (SPEC §3)."""
    torch.manual_seed(0)
    layer = dqn.GroupedLinear(4, 300, 100)
    bound = math.sqrt(6 / (300 + 100))
    assert layer.weight.shape == (4, 300, 100) and layer.bias.eq(0).all()
    for group in layer.weight:
        assert group.abs().max() <= bound and group.abs().max() > 0.9 * bound
    experts = dqn.Experts(3, 200, 40)
    bound = math.sqrt(6 / (200 + 40))
    for w in (experts.w1, experts.w2):
        for expert in w:
            assert expert.abs().max() <= bound and expert.abs().max() > 0.9 * bound
    assert experts.b1.eq(0).all() and experts.b2.eq(0).all()


# ---------------------------------------------------------------- dueling heads


@pytest.mark.parametrize("moe_type", ["baseline", "softmoe"])
@pytest.mark.parametrize("script", ["rainbow_softmoe", "der_softmoe", "cql_softmoe"])
def test_dueling_c51_heads_and_q_values(script, moe_type):
    """Rainbow's, DER's and CQL+C51's dueling heads: logits = value + advantage - mean over actions of advantage, per
    atom, and Q = the expected value over the support (SPEC §4)."""
    module = load_script(script)
    torch.manual_seed(0)
    args = module.Args(encoder="nature", num_experts=2, expert_hidden=16, moe_type=moe_type,
                       **({"agent": "cql-c51"} if script == "cql_softmoe" else {}))
    net = module.QNetwork(module.with_agent_defaults(args) if script == "cql_softmoe" else args, 3).eval()
    frames = torch.randint(0, 255, (2, 4, 84, 84), dtype=torch.uint8)
    log_probs, info = net(frames, return_info=True)
    value = net.value(info["features"]).view(2, 1, 51)
    advantage = net.advantage(info["features"]).view(2, 3, 51)
    expected = (value + advantage - advantage.mean(1, keepdim=True)).log_softmax(-1)
    torch.testing.assert_close(log_probs, expected)
    q = net.q_values(frames) if hasattr(net, "q_values") else module.expected_q(log_probs, net.support)
    torch.testing.assert_close(q, (expected.exp() * torch.linspace(-10, 10, 51)).sum(-1))


# ---------------------------------------------------------------- noisy nets


@pytest.mark.parametrize("script", ["rainbow_softmoe", "der_softmoe"])
def test_noisy_grouped_linear_init(script):
    """NoisyGroupedLinear (noisy experts): mu ~ U(+-1/sqrt(in)), sigma = 0.1/sqrt(in), weight and bias (SPEC §4)."""
    module = load_script(script)
    torch.manual_seed(0)
    layer = module.NoisyGroupedLinear(3, 400, 250)
    bound = 1 / math.sqrt(400)
    assert layer.weight_mu.shape == layer.weight_sigma.shape == (3, 400, 250)
    assert layer.bias_mu.shape == layer.bias_sigma.shape == (3, 250)
    for sigma in (layer.weight_sigma, layer.bias_sigma):
        assert torch.all(sigma == 0.1 * bound)
    for mu in (layer.weight_mu, layer.bias_mu):
        for group in mu:
            assert group.abs().max() <= bound and group.abs().max() > 0.9 * bound
    assert not torch.equal(layer.weight_mu[0], layer.weight_mu[1])  # groups initialised independently


@pytest.mark.parametrize("script", ["rainbow_softmoe", "der_softmoe"])
def test_target_network_keeps_its_noise(script):
    """build_agent's target network stays in training mode (noise on, as Dopamine), also after a sync and an update
    (SPEC §4)."""
    module = load_script(script)
    _, agent = small_agent(module)
    target = agent.target_network
    frames = agent.rb.stack_frames(torch.arange(10, 14), torch.zeros(4, dtype=torch.long))

    def noisy():
        with torch.no_grad():
            return not torch.allclose(target(frames), target(frames))

    assert target.training and all(m.training for m in target.modules())
    assert noisy()
    target.load_state_dict(agent.q_network.state_dict())  # the training loop's target update
    assert target.training and noisy()
    agent.update()
    assert target.training and noisy()


@pytest.mark.parametrize("script", ["rainbow_softmoe", "der_softmoe"])
def test_acting_draws_noise(script):
    """Acting with noisy nets draws noise (SPEC §4). With the heads' means zeroed every action has the same noise-free
    value (argmax: action 0 on every call in eval mode), so the actions of training mode's calls come from the noise
    alone: all four appear. Independent of the initialisation (torch versions draw different ones from one seed)."""
    module = load_script(script)
    _, agent = small_agent(module)
    states = agent.rb.stack_frames(torch.arange(10, 18), torch.zeros(8, dtype=torch.long)).numpy()

    def acting(calls):
        return np.stack([agent.act(states) for _ in range(calls)])

    agent.q_network.eval()  # noise off: the same actions every call
    try:
        still = acting(3)
    finally:
        agent.q_network.train()
    assert (still == still[0]).all()
    equalise_noisy_heads(agent.q_network)
    agent.q_network.eval()
    try:
        assert (acting(3) == 0).all()  # equal noise-free values: argmax takes the first action
    finally:
        agent.q_network.train()
    actions = acting(20)
    assert actions.shape == (20, 8)
    assert set(np.unique(actions)) == {0, 1, 2, 3}, actions  # P(an action missing by chance) < 4 (3/4)^160 = 1e-19
    assert (actions != actions[0]).any(axis=0).all(), actions  # and each state's action changes between calls
