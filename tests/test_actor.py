"""The online scripts act through `Actor` (shared block): by default with the online network itself; with
--lagged-actor with a copy refreshed just before each round of updates, so that on a GPU acting never waits for the
updates in flight. On the CPU the lagged semantics are the same (no streams): these tests pin them down, and a real
loop of every online script refreshes exactly where it promises (and writes the replay where it promises: after
the next send, off the path from observation to action). The GPU case (its own stream) is checked against
the CPU semantics when a GPU is present."""

import re

import numpy as np
import pytest
import torch

from conftest import equalise_noisy_heads, load_script, small_agent

ONLINE = ["dqn_softmoe", "rainbow_softmoe", "der_softmoe", "drq_softmoe"]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def params(network) -> list[torch.Tensor]:
    return [t.detach().clone() for t in [*network.parameters(), *network.buffers()]]


def same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x.cpu(), y.cpu()) for x, y in zip(a, b))


@pytest.mark.parametrize("script", ONLINE)
def test_default_actor_acts_with_the_online_network(script):
    agent = small_agent(load_script(script))[1]
    assert agent.act.network is agent.q_network and agent.act.state_dict() is None
    states = agent.rb.stack_frames(torch.arange(10, 18), torch.zeros(8, dtype=torch.long)).numpy()
    with torch.no_grad():
        expected = agent.act.policy(agent.q_network, torch.as_tensor(states))
    if script in ("dqn_softmoe", "drq_softmoe"):  # no noise: the greedy actions of the online network
        np.testing.assert_array_equal(agent.act(states), expected.numpy())
        # the network sees the states as observed: no augmentation at acting time (DrQ shifts training batches only)
        seen = []
        hook = agent.q_network.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0].clone()))
        agent.act(states)
        hook.remove()
        assert len(seen) == 1 and torch.equal(seen[0].to(torch.uint8), torch.as_tensor(states))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("script", ONLINE)
def test_lagged_actor_acts_with_the_parameters_of_its_last_refresh(script, device):
    module = load_script(script)
    agent = small_agent(module, device=device, lagged_actor=True)[1]
    actor = agent.act
    assert actor.network is not agent.q_network
    assert not any(p.requires_grad for p in actor.network.parameters())  # never in the optimizer, never a grad
    assert {id(p) for p in actor.network.parameters()}.isdisjoint(id(p) for p in agent.q_network.parameters())
    initial = params(agent.q_network)
    states = agent.rb.stack_frames(torch.arange(10, 18, device=device),
                                   torch.zeros(8, dtype=torch.long, device=device)).cpu().numpy()

    def greedy(network):  # the actor's policy on this network, as the actor runs it (noise from the same seed)
        torch.manual_seed(1)
        with torch.no_grad():
            return actor.policy(network, torch.as_tensor(states, device=device)).cpu().numpy()

    for _ in range(3):
        agent.update()
    trained = params(agent.q_network)
    trained_state = {k: v.clone() for k, v in agent.q_network.state_dict().items()}
    assert not same(initial, trained)  # the updates moved the online network ...
    assert same(initial, params(actor.network))  # ... not the actor's copy
    expected = greedy(actor.network)
    torch.manual_seed(1)
    np.testing.assert_array_equal(actor(states), expected)

    actor.refresh()  # before the next round: the actor takes the parameters of the rounds so far
    for _ in range(3):  # queued after the refresh (on a GPU, still running while the actor acts): must not reach it
        agent.update()
    assert same(trained, params(actor.network)) and not same(trained, params(agent.q_network))
    expected = greedy(actor.network)
    torch.manual_seed(1)
    np.testing.assert_array_equal(actor(states), expected)
    state = actor.state_dict()  # what a checkpoint keeps: the copy, not the online network
    assert state.keys() == trained_state.keys() and all(torch.equal(state[k], trained_state[k]) for k in state)


class Recorder:
    """Wraps an agent's actor and update to log the loop's calls and, at each, the parameters involved."""

    def __init__(self, agent, events):
        self.actor, self.events, self.agent = agent.act, events, agent
        update = agent.update

        def recorded_update():
            events.append(("update", None))
            return update()

        agent.update = recorded_update

    def __call__(self, obs):
        self.events.append(("act", (params(self.actor.network), params(self.agent.q_network))))
        return self.actor(obs)

    def refresh(self):
        self.events.append(("refresh", params(self.agent.q_network)))
        self.actor.refresh()

    def state_dict(self):
        return self.actor.state_dict()

    def load_state_dict(self, state):
        self.actor.load_state_dict(state)


class RecordedEnvs:
    """The training envs, logging `send` and `recv`."""

    def __init__(self, envs, events):
        self.envs, self.events = envs, events

    def send(self, actions):
        self.events.append("s")
        return self.envs.send(actions)

    def recv(self):
        self.events.append("r")
        return self.envs.recv()

    def __getattr__(self, name):
        return getattr(self.envs, name)


@pytest.mark.parametrize("script", ONLINE)
def test_the_loop_refreshes_the_lagged_actor_before_each_round(script, tmp_path, monkeypatch):
    """A real loop (2 envs, replay ratio 0.75: rounds of 1 and 2 updates, no update at some steps): every round of
    updates is preceded by one refresh taking the online parameters of that moment, there is no refresh without a
    round, and every action is taken with the parameters of the latest refresh, never with the newest. The replay
    is written where the loop promises: each step's slot after the next step's send (while the emulators step),
    before that step's updates; nothing between a recv and the next send, the path from observation to action. The
    target network syncs after a step's updates, only at the steps that cross a multiple of its period."""
    module = load_script(script)
    events, io = [], []
    build, make_env = module.build_agent, module.make_env

    def recorded_build(*args):
        agent = build(*args)
        agent.act = Recorder(agent, events)
        write, update = agent.rb.write, agent.update

        def recorded_write(*transition):
            io.append("w")
            write(*transition)

        def recorded_update():
            io.append("u")
            return update()

        agent.rb.write, agent.update = recorded_write, recorded_update
        target = getattr(agent, "target_network", None)  # DrQ(ε) has none
        if target is not None:
            sync = target.load_state_dict
            target.load_state_dict = lambda state: io.append("t") or sync(state)
        return agent

    def recorded_make_env(*args, **kwargs):  # the first envs made are the training envs
        envs = make_env(*args, **kwargs)
        made.append(envs)
        protocols.append(args[2])
        return RecordedEnvs(envs, io) if len(made) == 1 else envs

    made, protocols = [], []
    monkeypatch.setattr(module, "build_agent", recorded_build)
    monkeypatch.setattr(module, "make_env", recorded_make_env)
    flags = dict(encoder="nature", num_experts=2, expert_hidden=16, batch_size=8, buffer_size=2000, num_envs=2,
                 env_id="Breakout", learning_starts=100, total_timesteps=160, replay_ratio=0.75, lagged_actor=True,
                 runs_dir=str(tmp_path), metrics_every=0, log_every=1000, print_every=1000, cuda=False)
    if script in ("dqn_softmoe", "drq_softmoe"):  # epsilon-greedy: act greedily from the first learning step
        flags.update(exploration_steps=2, end_e=0.0)
    if script in ("der_softmoe", "drq_softmoe"):
        flags.update(eval_episodes=0)
    if script != "drq_softmoe":  # learning starts by agent step 102: the target syncs at steps 120 and 160 only
        flags.update(target_network_frequency=40)
    args = module.Args(**flags)
    module.main(args, *module.prepare(args)[:2])

    # SPEC §1: DQN and Rainbow train on the Dopamine protocol, the Atari 100k agents on theirs
    assert protocols[0] == ("atari100k" if script in ("der_softmoe", "drq_softmoe") else "dopamine")
    steps = "".join(io).split("s")
    assert steps[0] == "" and steps[1] == "r"  # nothing held yet
    if protocols[0] == "dopamine":
        assert len(steps) == args.total_timesteps // args.num_envs + 1
        assert all(re.fullmatch("wu*t?r", step) for step in steps[2:]), steps  # a sync after its step's updates
    else:  # Atari 100k: no-op steps are no agent steps, and a step of no-ops only (here the first few) is not stored
        assert len(steps) > args.total_timesteps // args.num_envs + 1
        assert all(re.fullmatch("w?u*t?r", step) for step in steps[2:]), steps
        assert 0 < sum(step[0] != "w" for step in steps[2:]) < 30
    assert "".join(steps).count("t") == (0 if script == "drq_softmoe" else 2)
    assert sum(step.count("u") for step in steps) >= 20
    kinds = [kind for kind, _ in events]
    assert kinds.count("update") >= 20 and kinds.count("act") >= 20
    rounds = "".join({"act": "a", "refresh": "r", "update": "u"}[k] for k in kinds).split("a")
    for segment in rounds:  # between two actions: nothing, or one refresh then the round's updates
        assert segment == "" or (segment[0] == "r" and set(segment[1:]) == {"u"}), segment
    assert {len(s) - 1 for s in rounds if s} == {1, 2}
    latest, lagging = None, 0
    for i, (kind, tensors) in enumerate(events):
        if kind == "refresh":
            latest = tensors
        elif kind == "act" and latest is not None:
            actor, online = tensors
            assert same(actor, latest)
            if kinds[i - 1] == "update":  # right after a round: the online network is one round ahead
                assert not same(actor, online)
                lagging += 1
    assert lagging >= 10


GRAPHED = [("dqn_softmoe", {}), ("drq_softmoe", {}), ("rainbow_softmoe", {"noisy": False}), ("der_softmoe", {"noisy": False}),
           ("dqn_softmoe", {"moe_type": "top1", "load_balancing_coef": 1.0}), ("dqn_softmoe", {"expert_variant": "big"}),
           ("rainbow_softmoe", {"noisy": False, "expert_variant": "all"})]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (reduce-overhead is refused elsewhere)")
@pytest.mark.parametrize("lagged", [False, True])
@pytest.mark.parametrize("script,flags", GRAPHED)
def test_cuda_graphed_actor_acts_as_the_policy(script, flags, lagged):
    """--compile-mode reduce-overhead: acting replays a CUDA graph captured per batch shape. Its actions must be the
    policy's on the parameters of the moment (updated in place by Adam or a refresh, which the graph reads), for
    every batch shape, on the first call (the capture) and on later ones (replays); for every head and MoE kind
    (noisy nets off here: a graph draws other noise than eager; the next test captures them)."""
    module = load_script(script)
    agent = small_agent(module, device="cuda", lagged_actor=lagged, **flags)[1]
    actor = module.Actor(agent.q_network, agent.act.policy, lagged, graphs=True)
    for batch in (8, 1, 8):
        states = agent.rb.stack_frames(torch.arange(10, 10 + batch, device="cuda"),
                                       torch.zeros(batch, dtype=torch.long, device="cuda")).cpu().numpy()
        for _ in range(2):
            with torch.no_grad():
                expected = actor.policy(actor.network, torch.as_tensor(states, device="cuda")).cpu().numpy()
            np.testing.assert_array_equal(actor(states), expected)
            agent.update()
            actor.refresh()
    assert set(actor.graphs) == {torch.Size([8, 4, 84, 84]), torch.Size([1, 4, 84, 84])}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (reduce-overhead is refused elsewhere)")
@pytest.mark.parametrize("script", ["rainbow_softmoe", "der_softmoe"])
def test_cuda_graphed_noisy_actor_draws_new_noise_at_each_replay(script):
    """Noisy nets inside a captured graph: the capture registers the CUDA generator, so each replay draws new noise
    (with equal noise-free values, 20 replays on the same states pick every action, and each state's changes). The
    warm-up before the capture draws on a forked generator: after the first call the generator stands where one
    uncaptured call leaves it (not three calls further), so a run's noise does not depend on when graphs were
    captured."""
    module = load_script(script)
    agent = small_agent(module, device="cuda")[1]
    equalise_noisy_heads(agent.q_network)  # the actions come from the noise alone: all four appear
    actor = module.Actor(agent.q_network, agent.act.policy, graphs=True)
    states = agent.rb.stack_frames(torch.arange(10, 18, device="cuda"),
                                   torch.zeros(8, dtype=torch.long, device="cuda")).cpu().numpy()
    torch.cuda.manual_seed(5)
    with torch.no_grad():
        actor.policy(actor.network, torch.as_tensor(states, device="cuda"))
    after_one_call = torch.cuda.get_rng_state()
    torch.cuda.manual_seed(5)
    actor(states)  # warm-up, capture, first replay
    assert torch.equal(torch.cuda.get_rng_state(), after_one_call)
    replays = np.stack([actor(states) for _ in range(20)])
    assert replays.shape == (20, 8) and replays.min() >= 0 and replays.max() < 4
    assert set(np.unique(replays)) == {0, 1, 2, 3}, replays
    assert (replays != replays[0]).any(axis=0).all(), replays  # each state's action changes between replays
