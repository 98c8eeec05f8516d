"""Flags reach what they configure. The unit tests call losses and replays with explicit values; these check that
`build_agent` hands each script's Args to them: Adam's learning rate and epsilon, the replay's n-step and discount,
and the weights of the loss terms in the gradient step (a flag accepted but ignored would pass everything else)."""

import copy
import glob
import json

import pytest
import torch

from conftest import SCRIPTS, load_script, small_agent



@pytest.mark.parametrize("script", SCRIPTS)
def test_optimizer_and_replay_take_their_flags(script):
    module = load_script(script)
    _, agent = small_agent(module, learning_rate=3e-4, adam_eps=2e-3, n_step=5, gamma=0.5)
    group = agent.optimizer.param_groups[0]
    assert (group["lr"], group["eps"], group["betas"]) == (3e-4, 2e-3, (0.9, 0.999))
    assert agent.rb.n_step == 5 and agent.rb.gamma == 0.5
    torch.testing.assert_close(agent.rb.discounts, 0.5 ** torch.arange(6, dtype=torch.float32))
    assert {id(p) for p in group["params"]} == {id(p) for p in agent.q_network.parameters()}  # the online network's


def step_gradients(module, agent, args):
    """Runs agent.update(). Returns its gradients (Adam's step leaves them in .grad) and `reference(weighted_loss)`:
    the gradients of weighted_loss(q, target) from the same parameters, replay (contents, priorities, generator) and
    torch RNG state; weighted_loss samples its batch from agent.rb itself."""
    q_state = copy.deepcopy(agent.q_network.state_dict())
    target_state = None if agent.target_network is None else copy.deepcopy(agent.target_network.state_dict())
    replay_state, torch_state = copy.deepcopy(agent.rb.state_dict()), torch.get_rng_state()
    agent.update()
    got = [p.grad.clone() for p in agent.q_network.parameters()]

    def reference(weighted_loss):
        q, target = module.QNetwork(args, 4), None
        q.load_state_dict(q_state)
        if target_state is not None:
            target = module.QNetwork(args, 4)
            target.load_state_dict(target_state)
        agent.rb.load_state_dict(copy.deepcopy(replay_state))
        torch.set_rng_state(torch_state)
        weighted_loss(q, target).backward()
        return [p.grad for p in q.parameters()]

    return got, reference


def same(a, b):
    return all(torch.allclose(x, y, rtol=1e-5, atol=1e-7) for x, y in zip(a, b, strict=True))


def test_dqn_step_uses_the_loss_and_the_load_balancing_weight(dqn):
    args, agent = small_agent(dqn, moe_type="top1", loss="huber", load_balancing_coef=0.5)

    def loss(q, target, kind="huber", coef=0.5):
        td, aux, _ = dqn.dqn_loss(q, target, agent.rb.sample(args.batch_size), kind)
        return td + coef * aux

    got, reference = step_gradients(dqn, agent, args)
    assert same(got, reference(loss))
    for wrong in (dict(kind="mse"), dict(coef=0.0)):  # either flag ignored would give these gradients
        assert not same(got, reference(lambda q, t: loss(q, t, **wrong))), wrong


@pytest.mark.parametrize("agent_type", ["cql", "cql-c51"])
def test_cql_step_weighs_the_cql_term_by_alpha(agent_type):
    cql = load_script("cql_softmoe")
    args, agent = small_agent(cql, agent=agent_type, moe_type="top1", cql_alpha=2.0, load_balancing_coef=0.5)

    def loss(q, target, alpha=2.0, coef=0.5):
        td, conservative, aux, _ = cql.offline_losses(q, target, agent.rb.sample(args.batch_size), args)
        return td + alpha * conservative + coef * aux

    got, reference = step_gradients(cql, agent, args)
    assert same(got, reference(loss))
    for wrong in (dict(alpha=0.1), dict(coef=0.0)):  # either flag ignored would give these gradients
        assert not same(got, reference(lambda q, t: loss(q, t, **wrong))), wrong


@pytest.mark.parametrize("script", ["rainbow_softmoe", "der_softmoe"])
def test_rainbow_step_weighs_samples_by_priority_and_the_load_balancing_loss(script):
    """--prioritized: the cross-entropy of each sample weighted by its importance weight from the sum tree (uniform
    weights without it); --load-balancing-coef weighs Top1's auxiliary loss."""
    module = load_script(script)
    args, agent = small_agent(module, moe_type="top1", load_balancing_coef=0.5)
    rb = agent.rb
    slots = torch.arange(3, 290)
    rb.update_priorities(slots, torch.zeros_like(slots), torch.rand(len(slots)) * 4)  # unequal priorities

    def loss(q, target, prioritized=True, coef=0.5):
        idx, envs = rb.sample_indices(args.batch_size)
        weights = rb.importance_weights(idx, envs) if prioritized else torch.ones(args.batch_size)
        assert not prioritized or weights.min() < 1.0  # the weights differ, else this test could not see them
        ce, _, aux, _ = module.rainbow_loss(q, target, rb.gather(idx, envs), args, weights)
        return ce + coef * aux

    got, reference = step_gradients(module, agent, args)
    assert same(got, reference(loss))
    for wrong in (dict(prioritized=False), dict(coef=0.0)):
        assert not same(got, reference(lambda q, t: loss(q, t, **wrong))), wrong


@pytest.mark.parametrize("script", ["rainbow_softmoe", "der_softmoe"])
def test_new_priorities_are_each_sample_s_unweighted_loss(script):
    """After an update the sampled transitions' priorities come from their own cross-entropy before the step
    (Dopamine), not from the importance-weighted loss that drives the gradient."""
    module = load_script(script)
    args, agent = small_agent(module, noisy=False)
    rb = agent.rb
    slots = torch.arange(3, 290)
    rb.update_priorities(slots, torch.zeros_like(slots), torch.rand(len(slots)) * 4)  # unequal priorities
    q, target = copy.deepcopy(agent.q_network), copy.deepcopy(agent.target_network)
    seen = {}
    weights_of, update_priorities = rb.importance_weights, rb.update_priorities
    rb.importance_weights = lambda idx, envs: seen.setdefault("weights", weights_of(idx, envs))
    rb.update_priorities = lambda idx, envs, losses: seen.update(idx=idx, envs=envs, losses=losses.clone()) or \
        update_priorities(idx, envs, losses)
    agent.update()
    assert seen["weights"].min() < 0.99  # weighted and unweighted losses differ, else this test could not tell them
    _, expected, _, _ = module.rainbow_loss(q, target, rb.gather(seen["idx"], seen["envs"]), args,
                                            torch.ones(args.batch_size))
    torch.testing.assert_close(seen["losses"], expected.detach())


def test_drq_step_uses_the_load_balancing_weight():
    drq = load_script("drq_softmoe")
    args, agent = small_agent(drq, moe_type="top1", load_balancing_coef=0.5)

    def loss(q, target, coef=0.5):
        td, aux, _ = drq.drq_loss(q, agent.rb.sample(args.batch_size), args)
        return td + coef * aux

    got, reference = step_gradients(drq, agent, args)
    assert same(got, reference(loss))
    assert not same(got, reference(lambda q, t: loss(q, t, coef=0.0)))


@pytest.mark.parametrize("variant", ["regular", "big", "all"])
@pytest.mark.parametrize("script", SCRIPTS)
def test_phi_flags_reach_every_soft_moe_of_the_network(script, variant):
    """--moe-l2-norm (Figure 13) and --random-phi (Figure 8) set every Soft MoE of the network the flags build,
    whichever the expert variant: a learned scale per MoE with l2 normalisation, no Phi at all when it is random."""
    module = load_script(script)
    args = dict(encoder="nature", num_experts=2, expert_hidden=16, expert_variant=variant)
    torch.manual_seed(0)
    plain, normed, random = (module.QNetwork(module.Args(**args, **flags), 4)
                             for flags in ({}, dict(moe_l2_norm=True), dict(random_phi=True)))
    moes = lambda net: [m for m in net.modules() if hasattr(m, "random_phi")]  # SoftMoE, PerSampSoftMoE
    count = lambda net: sum(p.numel() for p in net.parameters())
    assert moes(plain) and all(not m.l2_norm and not m.random_phi and hasattr(m, "phi") for m in moes(plain))
    assert len(moes(normed)) == len(moes(random)) == len(moes(plain))
    assert all(m.l2_norm and m.scale.requires_grad for m in moes(normed))
    assert count(normed) == count(plain) + len(moes(plain))
    assert all(m.random_phi and not hasattr(m, "phi") for m in moes(random))
    assert count(random) == count(plain) - sum(m.phi.numel() for m in moes(plain))
    frames = torch.randint(0, 255, (8, 4, 84, 84), dtype=torch.uint8)
    random.eval()  # no noisy-net noise: only Phi is drawn
    # `big` routes whole frames: its logits saturate, each draw picks one expert per sample; 8 samples x 3 draws
    first = random(frames)  # all picking alike would be a chance of 2^-16
    assert any(not torch.allclose(random(frames), first) for _ in range(2))
    normed.eval()
    before = normed(frames)
    with torch.no_grad():
        for m in moes(normed):
            m.scale.fill_(3.0)
    assert not torch.allclose(normed(frames), before)  # the scale is used


@pytest.mark.parametrize("script", SCRIPTS)
def test_encoder_flags_reach_the_network(script):
    """--encoder-scale widens the Impala encoder's channels (16, 32, 32) and so the tokens the MoE sees;
    --impala-filter-size (Figure 18) sets its convolutions' filters."""
    module = load_script(script)
    net = module.QNetwork(module.Args(encoder_scale=2, impala_filter_size=4, num_experts=2, expert_hidden=16), 4)
    convs = [m for m in net.encoder.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs[0].out_channels == 32 and convs[-1].out_channels == 64
    assert all(c.kernel_size == (4, 4) for c in convs)
    assert net.moe.phi.shape == (64, 2 * 61)  # token dim 32 x 2; 121 tokens, 61 slots per expert


@pytest.mark.parametrize("script", ["rainbow_softmoe", "der_softmoe"])
def test_noisy_epsilon_sets_the_share_of_random_actions(script, tmp_path, monkeypatch):
    """--noisy-epsilon in a real loop (Breakout, 4 actions, a policy that always picks action 0): at epsilon 0 every
    action is the policy's, at 0.5 action 0's share is 1 - 0.5 + 0.5 / 4 = 0.625 (+-0.1: over 400 steps the
    standard deviation is 0.024), from the first step on (noisy nets need no warm-up epsilon)."""
    module = load_script(script)
    agents = []
    build = module.build_agent

    def recorded_build(*args):
        agent = build(*args)
        agent.act.policy = lambda network, states: torch.zeros(len(states), dtype=torch.long, device=states.device)
        agents.append(agent)
        return agent

    monkeypatch.setattr(module, "build_agent", recorded_build)
    for epsilon, share in [(0.0, 1.0), (0.5, 0.625)]:
        flags = dict(encoder="nature", num_experts=2, expert_hidden=16, buffer_size=2000, env_id="Breakout", seed=3,
                     learning_starts=1000, total_timesteps=400, noisy_epsilon=epsilon, metrics_every=0, log_every=1000,
                     print_every=1000, runs_dir=str(tmp_path / str(epsilon)), cuda=False)
        if script == "der_softmoe":
            flags.update(eval_episodes=0)
        args = module.Args(**flags)
        module.main(args, *module.prepare(args)[:2])
        rb = agents[-1].rb
        rb.flush()  # the loop holds the last step's slot for a next step that never comes
        actions = rb.actions[: rb.t, 0]
        assert rb.t - int(rb.last[: rb.t, 0].sum()) == 400  # agent steps; a reset step's slot is none
        assert abs((actions == 0).float().mean().item() - share) <= (0.1 if epsilon else 0.0)


@pytest.mark.parametrize("script", ["dqn_softmoe", "rainbow_softmoe"])
def test_final_evaluation_gets_the_dopamine_protocol_and_the_eval_flags(script, tmp_path, monkeypatch):
    """--eval-episodes and --eval-epsilon reach the final evaluation, played on the Dopamine protocol (SPEC §1) as
    training is; its scores go to summary.json. (The evaluation itself is tested in test_atari100k.py.)"""
    module = load_script(script)
    calls, protocols = [], []
    make_env = module.make_env
    monkeypatch.setattr(module, "make_env", lambda rom, n, protocol, *a, **k: protocols.append(protocol) or
                        make_env(rom, n, protocol, *a, **k))
    monkeypatch.setattr(module, "evaluate", lambda model, rom, protocol, episodes, epsilon, device, seed, stop=None:
                        calls.append((protocol, episodes, epsilon)) or [float(i) for i in range(episodes)])
    args = module.Args(encoder="nature", num_experts=2, expert_hidden=16, buffer_size=400, env_id="Breakout",
                       learning_starts=1000, total_timesteps=60, eval_episodes=3, eval_epsilon=0.05, metrics_every=0,
                       log_every=1000, print_every=1000, runs_dir=str(tmp_path), cuda=False)
    module.main(args, *module.prepare(args)[:2])
    assert protocols == ["dopamine"] and calls == [("dopamine", 3, 0.05)]
    (summary,) = glob.glob(f"{tmp_path}/*/summary.json")
    assert json.load(open(summary))["eval_returns"] == [0.0, 1.0, 2.0]


def test_cql_evaluates_with_its_eval_flags(tmp_path, monkeypatch):
    """CQL's per-iteration evaluation gets --eval-episodes and --eval-epsilon (Dopamine protocol inside evaluate)."""
    import test_offline

    cql = load_script("cql_softmoe")
    test_offline.tiny_dataset(tmp_path)
    calls = []
    monkeypatch.setattr(cql, "evaluate", lambda model, rom, episodes, epsilon, device, seed, stop=None:
                        calls.append((episodes, epsilon)) or [1.0] * episodes)
    args = test_offline.tiny_args(cql, dataset_dir=str(tmp_path), env_id="Pong", num_iterations=2,
                                  gradient_steps_per_iteration=5, batch_size=8, eval_episodes=2, eval_epsilon=0.05,
                                  data_fraction=1.0, metrics_every=0, log_every=100, print_every=100,
                                  runs_dir=str(tmp_path / "runs"))
    cql.main(args, *cql.prepare(args))
    assert calls == [(2, 0.05), (2, 0.05)]


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_replay_sampler_follows_seed(script):
    """--seed seeds the replay's sampling (another seed, other batches; the same seed, the same ones)."""
    module = load_script(script)
    draws = []
    for seed in (1, 1, 7):
        args, agent = small_agent(module, seed=seed)
        if script == "cql_softmoe":
            draws.append(agent.rb.sample(8)[0])
        else:
            draws.append(agent.rb.sample_indices(8)[0])
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])


@pytest.mark.parametrize("script", ["dqn_softmoe", "der_softmoe"])
def test_update_credit_counts_played_steps_not_reset_steps(script, tmp_path, monkeypatch):
    """Episodes cut after 10 agent steps (40 frames) put a reset step (no frame played, no agent step) after every
    10 played ones: the replay ratio's updates are `replay_ratio` per played step from the pass that writes slot
    learning_starts + 1 on (as tests/test_long_runs.py's checkpoint test counts), none for the reset steps."""
    module = load_script(script)
    make_env, build = module.make_env, module.build_agent
    monkeypatch.setattr(module, "make_env", lambda rom, n, protocol, *a, **k: make_env(rom, n, protocol, 40))
    agents, updates = [], [0]

    def recorded_build(*args):
        agent = build(*args)
        update = agent.update
        agent.update = lambda: updates.__setitem__(0, updates[0] + 1) or update()
        agents.append(agent)
        return agent

    monkeypatch.setattr(module, "build_agent", recorded_build)
    flags = dict(encoder="nature", num_experts=2, expert_hidden=16, batch_size=8, buffer_size=2000, env_id="Breakout",
                 learning_starts=100, total_timesteps=300, replay_ratio=0.25, metrics_every=0, log_every=1000,
                 print_every=1000, runs_dir=str(tmp_path), cuda=False)
    if script == "der_softmoe":
        flags.update(eval_episodes=0)
    args = module.Args(**flags)
    module.main(args, *module.prepare(args)[:2])
    rb = agents[0].rb
    rb.flush()
    assert rb.t <= rb.size  # DER's replay, sized by replay_slots, holds the reset steps' slots too: it never wraps
    last = rb.last[: rb.t, 0]
    assert int(last.sum()) >= 25  # a reset slot every 11
    played = int((~last[101: rb.t]).sum())
    assert updates[0] == played // 4
