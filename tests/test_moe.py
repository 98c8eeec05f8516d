"""The network pieces against the paper's equations and hand-computed cases (SPEC §2-3)."""

import math

import pytest
import torch


def reference_soft_moe(tokens, phi, experts):
    """The paper's §2.2 written out per sample, per slot, per expert, with explicit sums (no batching)."""
    n, p = experts.w1.shape[0], phi.shape[1] // experts.w1.shape[0]
    outputs = []
    for X in tokens:  # X: (m, d)
        L = X @ phi  # (m, n*p)
        D = torch.exp(L) / torch.exp(L).sum(0, keepdim=True)  # D_ij = exp(L_ij) / sum_i' exp(L_i'j)
        C = torch.exp(L) / torch.exp(L).sum(1, keepdim=True)  # C_ij = exp(L_ij) / sum_j' exp(L_ij')
        slot_inputs = D.T @ X  # X~ = D^T X
        slot_outputs = []
        for j in range(n * p):
            e = j // p  # Y~_j = f_{floor(j/p)}(X~_j)
            h = torch.relu(slot_inputs[j] @ experts.w1[e] + experts.b1[e])
            slot_outputs.append(h @ experts.w2[e] + experts.b2[e])
        outputs.append(C @ torch.stack(slot_outputs))  # Y = C Y~
    return torch.stack(outputs)


@pytest.mark.parametrize("m,d,n", [(121, 32, 8), (121, 32, 1), (32, 121, 4), (1, 3872, 2), (10, 6, 3)])
def test_soft_moe_matches_paper_equations(dqn, m, d, n):
    torch.manual_seed(0)
    moe = dqn.SoftMoE(m, d, n, dqn.Experts(n, d, 16)).double()
    with torch.no_grad():  # non-zero biases so every term of the expert is exercised
        moe.experts.b1.normal_()
        moe.experts.b2.normal_()
    tokens = torch.randn(3, m, d, dtype=torch.float64)
    y, info = moe(tokens)
    assert y.shape == (3, m, d)
    torch.testing.assert_close(y, reference_soft_moe(tokens, moe.phi, moe.experts))
    assert info["hidden"].shape == (3, n, math.ceil(m / n), 16)


class SlotRecorder(torch.nn.Module):
    """Identity 'experts' that keep their slot inputs: SoftMoE's output is then C (D^T X)."""

    def forward(self, slots):
        self.slots = slots
        return slots, slots


def test_dispatch_columns_and_combine_rows_sum_to_one(dqn):
    torch.manual_seed(0)
    experts = SlotRecorder()
    moe = dqn.SoftMoE(121, 32, 8, experts)
    moe.phi.data.normal_()  # peaked logits: a wrong softmax axis could not hide behind near-uniform weights
    tokens = torch.full((2, 121, 32), 3.0)
    y, info = moe(tokens)
    # X = 3: each slot input is 3 x (its dispatch column's sum), each output token 3 x (its combine row's sum)
    torch.testing.assert_close(experts.slots, torch.full((2, 8, 16, 32), 3.0))  # each slot mixes the 121 tokens
    torch.testing.assert_close(y, torch.full((2, 121, 32), 3.0))  # each token mixes all 8 * 16 slots
    torch.testing.assert_close(info["expert_mass"].sum(-1), torch.ones(2, 121))


@pytest.mark.parametrize("n,slots", [(1, 121), (2, 61), (4, 31), (8, 16)])
def test_slots_per_expert_for_121_tokens(dqn, n, slots):
    moe = dqn.SoftMoE(121, 32, n, dqn.Experts(n, 32, 8))
    assert moe.slots_per_expert == slots
    assert moe.phi.shape == (32, n * slots)


def test_tokens_never_mix_across_the_batch(dqn):
    torch.manual_seed(0)
    for moe in [dqn.SoftMoE(121, 32, 4, dqn.Experts(4, 32, 8)), dqn.Top1MoE(121, 32, 4, dqn.Experts(4, 32, 8))]:
        tokens = torch.randn(4, 121, 32)
        alone = torch.cat([moe(tokens[i : i + 1])[0] for i in range(4)])
        torch.testing.assert_close(moe(tokens)[0], alone)


def test_phi_initialisation_std(dqn):
    torch.manual_seed(0)
    n, d = 8, 32
    moe = dqn.SoftMoE(121, d, n, dqn.Experts(n, d, 8))
    std = 1 / math.sqrt(n * d)
    assert abs(moe.phi.std().item() / std - 1) < 0.05  # truncated normal, std 1/sqrt(n*d) after truncation
    assert moe.phi.abs().max() <= 2 * std / 0.87962566103423978 + 1e-6


def test_random_phi_is_redrawn_and_not_a_parameter(dqn):
    torch.manual_seed(0)
    moe = dqn.SoftMoE(121, 32, 2, dqn.Experts(2, 32, 8), random_phi=True)
    assert not any("phi" in name for name, _ in moe.named_parameters())
    tokens = torch.randn(1, 121, 32)
    assert not torch.allclose(moe(tokens)[0], moe(tokens)[0])
    # one Phi per sample, as the official code's per-sample keys: a batch of one sample twice gets two routings
    twice = moe(tokens.expand(2, -1, -1))[0]
    assert not torch.allclose(twice[0], twice[1])
    per_samp = dqn.PerSampSoftMoE(40, 4, random_phi=True)
    token, outputs = torch.randn(1, 40).expand(2, -1), torch.randn(1, 4, 6).expand(2, -1, -1)
    mixed, combine = per_samp(token, outputs)
    assert mixed.shape == (2, 6) and not torch.allclose(combine[0], combine[1])
    fixed = dqn.PerSampSoftMoE(40, 4, l2_norm=True)
    mixed, combine = fixed(token, outputs)
    torch.testing.assert_close(combine[0], combine[1])
    torch.testing.assert_close(combine.sum(-1), torch.ones(2))


def test_per_samp_soft_moe_combine_by_hand(dqn):
    """The 'big'/'all' variants' one-token Soft MoE: combine = softmax_n(x Phi), and with --moe-l2-norm
    softmax_n(scale (x/|x|) (Phi/|Phi| over d)), invariant to the token's scale; the output mixes the experts' outputs."""
    torch.manual_seed(0)
    token, outputs = torch.randn(2, 6, dtype=torch.float64), torch.randn(2, 3, 5, dtype=torch.float64)
    for l2 in (False, True):
        moe = dqn.PerSampSoftMoE(6, 3, l2_norm=l2).double()
        phi = moe.phi.detach()
        if l2:
            with torch.no_grad():
                moe.scale.fill_(2.5)
            logits = 2.5 * (token / token.norm(dim=1, keepdim=True)) @ (phi / phi.norm(dim=0, keepdim=True))
        else:
            logits = token @ phi
        mixed, combine = moe(token, outputs)
        torch.testing.assert_close(combine, logits.softmax(1), rtol=1e-5, atol=1e-8)  # eps 1e-6 in the norms
        torch.testing.assert_close(mixed, (combine[:, :, None] * outputs).sum(1))
        scaled = moe(3 * token, outputs)[1]
        assert torch.allclose(scaled, combine, rtol=1e-5) == l2  # only normalised logits ignore the token's scale


def test_l2_norm_makes_logits_scale_invariant(dqn):
    torch.manual_seed(0)
    moe = dqn.SoftMoE(16, 8, 2, dqn.Experts(2, 8, 4), l2_norm=True).double()
    tokens = torch.randn(1, 16, 8, dtype=torch.float64)
    # normalised logits: scaling X changes only the slot inputs (computed from un-normalised X), linearly
    with torch.no_grad():
        moe.experts.b1.zero_()
        moe.experts.b2.zero_()
    torch.testing.assert_close(moe(3 * tokens)[0], 3 * moe(tokens)[0])
    assert moe.scale.item() == 1.0
    # logits = scale * (X / |X|) (Phi / |Phi| over d), by hand, with identity experts: y = C (D^T X)
    moe = dqn.SoftMoE(16, 8, 2, SlotRecorder(), l2_norm=True).double()
    with torch.no_grad():
        moe.scale.fill_(2.5)
    unit = lambda v, dim: v / (v.norm(dim=dim, keepdim=True) + 1e-6)  # the official l2_normalize, eps 1e-6
    logits = 2.5 * unit(tokens, -1) @ unit(moe.phi, 0)
    expected = logits.softmax(2) @ (logits.softmax(1).transpose(1, 2) @ tokens)
    torch.testing.assert_close(moe(tokens)[0], expected)


def test_experts_are_independent_and_batched(dqn):
    torch.manual_seed(0)
    experts = dqn.Experts(3, 5, 7)
    assert not torch.allclose(experts.w1[0], experts.w1[1])
    x = torch.randn(2, 3, 4, 5)
    y, hidden = experts(x)
    for e in range(3):
        h = torch.relu(x[:, e] @ experts.w1[e] + experts.b1[e])
        torch.testing.assert_close(hidden[:, e], h)
        torch.testing.assert_close(y[:, e], h @ experts.w2[e] + experts.b2[e])


def make_routed_top1(dqn):
    """5 tokens of dim 2, 2 experts, capacity ceil(5/2) = 3; the router sends tokens 0-3 to expert 0, token 4 to 1."""
    experts = dqn.Experts(2, 2, 4)
    moe = dqn.Top1MoE(5, 2, 2, experts).double()
    with torch.no_grad():
        moe.router.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))  # logit_e = token[e]
        moe.experts.b1.fill_(0.1)
        moe.experts.b2.fill_(0.2)
    tokens = torch.tensor([[[2.0, 0.0], [3.0, 1.0], [1.0, 0.5], [4.0, 0.0], [0.0, 2.0]]], dtype=torch.float64)
    return moe, tokens


def test_top1_capacity_dropping_and_gate_scaling(dqn):
    moe, tokens = make_routed_top1(dqn)
    assert moe.capacity == 3
    y, info = moe(tokens)
    probs = torch.softmax(tokens, -1)  # router logits are the tokens themselves
    for t, e in [(0, 0), (1, 0), (2, 0), (4, 1)]:  # kept: expert output times its gate probability
        expected, _ = moe.experts(tokens[:, t][:, None, None].expand(1, 2, 1, 2))
        torch.testing.assert_close(y[0, t], probs[0, t, e] * expected[0, e, 0])
    assert torch.equal(y[0, 3], torch.zeros(2, dtype=torch.float64))  # 4th token for expert 0: over capacity
    assert info["dropped"].item() == pytest.approx(1 / 5)
    assert info["hidden_mask"][0].tolist() == [[1, 1, 1], [1, 0, 0]]  # expert 1 holds one real token


def test_top1_load_balancing_losses(dqn):
    moe, tokens = make_routed_top1(dqn)
    probs = torch.softmax(tokens, -1)
    importance = probs.sum(1)[0]
    expected = (importance.std(unbiased=False) / importance.mean()) ** 2
    torch.testing.assert_close(moe.importance_loss(probs), expected)
    balanced = torch.full((1, 4, 2), 0.5, dtype=torch.float64)
    assert moe.importance_loss(balanced).item() == pytest.approx(0.0)
    torch.manual_seed(0)
    # one expert far ahead for every token: it is selected with probability ~1, the other ~0 -> CV^2 = 1
    assert moe.load_loss(torch.tensor([[[50.0, 0.0]] * 4])).item() == pytest.approx(1.0, abs=1e-6)
    # by hand (Ruiz et al. 2021): P(expert i selected) = 1 - Phi((max noisy logit - logit_i) / sigma), sigma = 1/n
    logits = torch.tensor([[[0.3, 0.1], [0.0, 0.2], [0.5, -0.1], [0.2, 0.2]]], dtype=torch.float64)
    torch.manual_seed(1)
    noise = torch.randn_like(logits)
    threshold = (logits + noise / 2).max(-1, keepdim=True).values
    p = 1 - 0.5 * (1 + torch.erf((threshold - logits) / 0.5 / math.sqrt(2)))
    load = p.mean(1)[0]
    torch.manual_seed(1)
    assert moe.load_loss(logits).item() == pytest.approx(((load.std(unbiased=False) / load.mean()) ** 2).item())
    moe.load_balancing = True
    torch.manual_seed(2)
    _, info = moe(tokens)
    torch.manual_seed(2)
    router_logits = moe.router(tokens).float()
    expected = moe.importance_loss(router_logits.softmax(-1)) + moe.load_loss(router_logits)
    assert info["aux_loss"].requires_grad and info["aux_loss"].item() == pytest.approx(expected.item())


def test_tokenize_shapes(dqn):
    x = torch.randn(2, 32, 11, 11)
    assert dqn.tokenize(x, "perconv").shape == (2, 121, 32)
    assert dqn.tokenize(x, "perfeat").shape == (2, 32, 121)
    assert dqn.tokenize(x, "persamp").shape == (2, 1, 3872)
    torch.testing.assert_close(dqn.tokenize(x, "perconv")[1, 5 * 11 + 3], x[1, :, 5, 3])  # token = one position
    torch.testing.assert_close(dqn.tokenize(x, "perfeat")[1, 7], x[1, 7].flatten())  # token = one feature map
    for tok in ["perconv", "perfeat", "persamp"]:
        m, d = dqn.num_tokens_and_dim(32, 11, 11, tok)
        assert dqn.tokenize(x, tok).shape[1:] == (m, d)


@pytest.mark.parametrize("size,kernel,stride,pads", [(84, 8, 4, [2, 2]), (21, 4, 2, [1, 2]), (11, 3, 1, [1, 1]),
                                                      (84, 3, 2, [0, 1]), (21, 3, 2, [1, 1]), (84, 4, 1, [1, 2])])
def test_same_padding_matches_tensorflow(dqn, size, kernel, stride, pads):
    x = torch.zeros(1, 1, size, size)
    padded = dqn.same_pad(x, kernel, stride, value=1.0)
    assert padded.shape[-1] == size + sum(pads)
    assert padded[0, 0, 0, : pads[0]].eq(1).all() and padded[0, 0, -1, size + pads[0]:].eq(1).all()
    assert (padded.shape[-1] - kernel) // stride + 1 == math.ceil(size / stride)  # TF: out = ceil(in / stride)


@pytest.mark.parametrize("size,kernel,stride,groups", [(84, 3, 1, 1), (42, 3, 1, 2), (21, 4, 1, 1), (11, 6, 1, 1),
                                                        (84, 8, 4, 2), (21, 4, 2, 1), (11, 3, 1, 1), (20, 5, 3, 1)])
def test_same_conv_is_a_convolution_of_the_padded_input(dqn, size, kernel, stride, groups):
    # symmetric pads go to the convolution itself, asymmetric ones are explicit: both must be TF 'SAME'
    torch.manual_seed(0)
    conv = dqn.SameConv2d(2 * groups, 3 * groups, kernel, stride, groups)
    torch.nn.init.normal_(conv.bias)
    x = torch.randn(2, 2 * groups, size, size + 1)
    expected = torch.nn.functional.conv2d(dqn.same_pad(x, kernel, stride), conv.weight, conv.bias, stride, 0, 1, groups)
    assert expected.shape[-2:] == (math.ceil(size / stride), math.ceil((size + 1) / stride))
    torch.testing.assert_close(conv(x), expected)


@pytest.mark.parametrize("kernel", [2, 3, 4, 5])
@pytest.mark.parametrize("stride", [1, 2, 3])
def test_same_max_pool_is_a_max_pool_of_the_minus_infinity_padded_input(dqn, kernel, stride):
    torch.manual_seed(0)
    for size in [84, 42, 21, 11, 10, 7, 6, 5]:  # the Impala stacks pool 84, 42 and 21 with 3x3/2
        x = torch.randn(1, 2, size, size + 1) - 10.0  # all negative: a zero padding would win the max
        expected = torch.nn.functional.max_pool2d(dqn.same_pad(x, kernel, stride, value=-math.inf), kernel, stride)
        assert torch.equal(dqn.same_max_pool(x, kernel, stride), expected), size


@pytest.mark.parametrize("name,copies", [("impala", 0), ("nature", 2)])
def test_encoders_pad_by_copying_only_for_strided_convolutions(dqn, name, copies):
    # a padded copy is a fill and a copy kernel on a GPU; only the Nature CNN's 8x8/4 and 4x4/2 still make one
    encoder = dqn.make_encoder(name, 1, 3)
    with torch.no_grad(), torch.profiler.profile() as prof:
        encoder(torch.rand(1, 4, 84, 84))
    assert sum(event.name == "aten::constant_pad_nd" for event in prof.events()) == copies


@pytest.mark.parametrize("name,scale,filt,channels", [("impala", 1, 3, 32), ("impala", 2, 3, 64), ("impala", 1, 4, 32),
                                                      ("impala", 1, 6, 32), ("nature", 1, 3, 64)])
def test_encoder_output_is_11x11(dqn, name, scale, filt, channels):
    encoder = dqn.make_encoder(name, scale, filt)
    assert encoder(torch.rand(2, 4, 84, 84)).shape == (2, channels, 11, 11)
    assert encoder.out_channels == channels


def test_impala_structure_and_init(dqn):
    encoder = dqn.make_encoder("impala", 1, 3)
    assert [stage.conv.out_channels for stage in encoder.stages] == [16, 32, 32]
    assert all(len(stage.blocks) == 2 for stage in encoder.stages)
    conv = encoder.stages[0].conv
    bound = math.sqrt(6 / (4 * 9 + 16 * 9))  # xavier-uniform
    assert conv.weight.abs().max() <= bound and conv.weight.abs().max() > 0.9 * bound
    assert conv.bias.eq(0).all()
    assert (encoder(torch.rand(1, 4, 84, 84)) >= 0).all()  # a ReLU after the last stack
    # residual blocks add to their input: with every block's second conv zeroed, a stack is conv -> max-pool
    stack = encoder.stages[0]
    x = torch.rand(1, 4, 84, 84)
    with torch.no_grad():
        for _, conv_b in stack.blocks:
            conv_b.weight.zero_()
            conv_b.bias.fill_(0.5)
        # 84 -> 42 with TF-SAME: one pixel of -inf padding at the bottom and right only
        pooled = torch.nn.functional.max_pool2d(torch.nn.functional.pad(stack.conv(x), (0, 1, 0, 1), value=-math.inf), 3, 2)
        out = stack(x)
    assert out.shape == (1, 16, 42, 42)
    torch.testing.assert_close(out, pooled + 1.0)  # + 0.5 from each of the 2 blocks


def test_grouped_encoder_is_independent_encoders(dqn):
    torch.manual_seed(0)
    grouped = dqn.make_encoder("nature", 1, 3, groups=2)
    single = dqn.make_encoder("nature", 1, 3)
    x = torch.rand(2, 4, 84, 84)
    out = grouped(x.repeat(1, 2, 1, 1)).view(2, 2, 64, 11, 11)
    for g in range(2):
        for s_single, s_grouped in zip(single.stages, grouped.stages):
            s_single.weight.data.copy_(s_grouped.weight.data.view(2, -1, *s_grouped.weight.shape[1:])[g])
            s_single.bias.data.copy_(s_grouped.bias.data.view(2, -1)[g])
        torch.testing.assert_close(out[:, g], single(x))


def param_count(module):
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_parameter_counts_baseline_vs_moe(dqn, n):
    actions, F_, h = 6, 32 * 121, 512
    encoder = param_count(dqn.make_encoder("impala", 1, 3))
    base = dqn.QNetwork(dqn.Args(moe_type="baseline", num_experts=n), actions)
    assert param_count(base) == encoder + (F_ * h * n + h * n) + (h * n * actions + actions)
    soft = dqn.QNetwork(dqn.Args(moe_type="softmoe", num_experts=n), actions)
    slots = n * math.ceil(121 / n)
    experts = n * (32 * h + h + h * 32 + 32)
    assert param_count(soft) == encoder + 32 * slots + experts + (F_ * actions + actions)
    top1 = dqn.QNetwork(dqn.Args(moe_type="top1", num_experts=n), actions)
    assert param_count(top1) == encoder + 32 * n + experts + (F_ * actions + actions)
    divided = dqn.QNetwork(dqn.Args(moe_type="softmoe", num_experts=n, expert_hidden_divide=True), actions)
    hd = h // n
    assert param_count(divided) == encoder + 32 * slots + n * (32 * hd + hd + hd * 32 + 32) + F_ * actions + actions


@pytest.mark.parametrize("flags", [dict(moe_type="baseline", num_experts=2), dict(moe_type="softmoe", num_experts=2),
                                   dict(moe_type="top1", num_experts=2, tokenization="perfeat"),
                                   dict(expert_variant="big", num_experts=2), dict(expert_variant="all", num_experts=2),
                                   dict(moe_type="softmoe", tokenization="persamp", moe_l2_norm=True)])
def test_qnetwork_shapes_and_info(dqn, flags):
    torch.manual_seed(0)
    net = dqn.QNetwork(dqn.Args(encoder="nature", **flags), 5)
    frames = torch.randint(0, 255, (3, 4, 84, 84), dtype=torch.uint8)
    q, info = net(frames, return_info=True)
    assert q.shape == (3, 5) and torch.isfinite(q).all()
    assert info["features"].shape[0] == 3 and info["hidden"].dim() == 4
    torch.testing.assert_close(net(frames), q)


def test_big_variant_mixes_whole_networks_per_sample(dqn):
    torch.manual_seed(0)
    net = dqn.QNetwork(dqn.Args(encoder="nature", expert_variant="big", num_experts=3), 4)
    x = torch.randint(0, 255, (2, 4, 84, 84), dtype=torch.uint8)
    q, info = net(x, return_info=True)
    combine = info["expert_mass"][:, 0]
    torch.testing.assert_close(combine.sum(-1), torch.ones(2))
    xf = x.float() / 255
    per_expert = net.head(torch.relu(net.dense(net.encoder(xf.repeat(1, 3, 1, 1)).view(2, 3, -1))))  # (B, n, A)
    torch.testing.assert_close(q, (combine[..., None] * per_expert).sum(1))
