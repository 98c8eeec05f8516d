"""der_softmoe.py and drq_softmoe.py, the Atari 100k agents (SPEC §1, §4, §8): life losses as terminals for learning
only on a real game, acting stacks equal to the replay's, DrQ's augmentation and online-network targets, the
100-episode evaluation, the human-normalised score table, the replay's size, and real short runs."""

import copy
import csv
import glob
import json
import os

import numpy as np
import pytest
import torch

from conftest import ROOT, load_script, read_scalars, run_script

AGENTS = ["der_softmoe", "drq_softmoe"]
GAMMA, N_STEP = 0.99, 10


@pytest.fixture(scope="module")
def drq():
    return load_script("drq_softmoe")


@pytest.fixture(scope="module")
def der():
    return load_script("der_softmoe")


# ---------------------------------------------------------------- score table


@pytest.mark.parametrize("script", AGENTS)
def test_score_table_is_the_reference_csv(script):
    module = load_script(script)
    paths = [os.path.join(ROOT, "benchmark", "atari_scores.csv")]
    shared = os.path.join(ROOT, "..", "shared", "reference", "atari_scores.csv")  # the project's reference copy
    paths += [shared] if os.path.exists(shared) else []
    for path in paths:
        with open(path) as f:
            rows = list(csv.DictReader(f))
        table = {r["rom"]: (float(r["random"]), float(r["human"])) for r in rows if r["random"] and r["human"]}
        assert module.ATARI_SCORES == table, path
        without_human = {r["rom"] for r in rows if not r["human"]}
        assert {"air_raid", "carnival", "elevator_action", "journey_escape", "pooyan"} <= without_human
        assert all(module.human_normalized_score(rom, [123.0]) is None for rom in without_human)
    assert len(module.ATARI_SCORES) == 55 and all(module.resolve_rom(rom) == rom for rom in module.ATARI_SCORES)
    assert module.human_normalized_score("pong", [-20.7, 14.6]) == pytest.approx(0.5)  # random 0, human 1
    assert module.human_normalized_score("breakout", [1.7 + 2 * 28.8]) == pytest.approx(2.0)


# ---------------------------------------------------------------- defaults and protocol


def test_defaults_are_the_papers(der, drq):
    """Table 1 of the paper and Dopamine's DER.gin / DrQ_eps.gin (SPEC §4)."""
    common = dict(learning_rate=1e-4, adam_eps=1.5e-4, n_step=10, learning_starts=1600, replay_ratio=1.0, gamma=0.99,
                  batch_size=32, buffer_size=1_000_000, total_timesteps=100_000, eval_episodes=100, eval_every=0,
                  eval_epsilon=0.001, encoder="impala", moe_type="softmoe", num_experts=8, num_envs=1)
    for module, own in [(der, dict(target_network_frequency=2000, noisy=True, dueling=True, double_q=True,
                                   prioritized=True, num_atoms=51, v_min=-10.0, v_max=10.0)),
                        (drq, dict(start_e=1.0, end_e=0.01, exploration_steps=5000, loss="huber", dueling=True,
                                   augmentation=True))]:
        args = module.Args()
        assert {k: getattr(args, k) for k in {**common, **own}} == {**common, **own}
    assert not hasattr(drq.Args(), "target_network_frequency")  # DrQ(ε) has no target network


@pytest.mark.parametrize("script", AGENTS)
def test_noop_starts_draw_0_to_29_agent_steps_per_game(script):
    """Dopamine's runner: randint(0, 30) no-ops per game, drawn when the game begins; `step` marks the envs playing
    one in the coming vector step and counts down."""
    module = load_script(script)
    noops, rng = module.NoopStarts(30_000), np.random.default_rng(0)
    noops.start(np.ones(30_000, dtype=bool), rng)
    counts = np.bincount(noops.left)
    assert len(counts) == 30 and counts.min() > 800  # each of 0..29 about 1,000 times, nothing above
    left = noops.left.copy()
    for k in range(30):
        assert np.array_equal(noops.step(), left > k)
    assert not noops.left.any() and not noops.step().any()
    noops.start(np.arange(30_000) < 5, rng)  # only the games beginning now draw
    assert noops.left[:5].any() and not noops.left[5:].any()


def test_der_acts_on_the_mean_of_its_return_distributions(der):
    torch.manual_seed(0)
    net = der.QNetwork(der.Args(encoder="nature", num_experts=2, expert_hidden=16), 5).eval()
    frames = torch.randint(0, 256, (3, 4, 84, 84), dtype=torch.uint8)
    torch.testing.assert_close(net.q_values(frames), der.expected_q(net(frames), torch.linspace(-10, 10, 51)))


# ---------------------------------------------------------------- life losses on a real game


def play(module, rom, steps, num_envs=2, seed=3):
    """Random play on the atari100k protocol, wired exactly as the scripts' training loop: EnvTracker, LifeLoss,
    NoopStarts and the replay (n = 10), in main()'s order. Returns the replay and, per vector step, what the loop saw
    (`slot`: where the step was stored, None for a step of no-ops only)."""
    envs = module.make_env(rom, num_envs, "atari100k")
    tracker, noops = module.EnvTracker(seed, num_envs), module.NoopStarts(num_envs)
    rb = module.ReplayBuffer(10_000, num_envs, "cpu", n_step=N_STEP, gamma=GAMMA, seed=0)
    obs, info = envs.reset(seed=tracker.seeds())
    lives = module.LifeLoss(info["lives"])
    rng, was_done, log = np.random.default_rng(seed), np.zeros(num_envs, dtype=bool), []
    noops.start(np.ones(num_envs, dtype=bool), rng)
    for _ in range(steps):
        acting = lives.acting(obs)
        actions = rng.integers(envs.single_action_space.n, size=num_envs)
        nooping = noops.step()
        actions = np.where(nooping, 0, actions)
        skipped = was_done | nooping
        tracker.send(envs, actions)
        next_obs, rewards, terminations, truncations, info = envs.recv()
        terminals = lives.step(info["lives"], terminations, skipped)
        slot = None
        if not nooping.all():
            slot = rb.t
            rb.add(obs[:, -1], actions, rewards, terminals, skipped)
        log.append({"raw": obs.copy(), "acting": acting, "rewards": rewards, "terminal": terminals, "slot": slot,
                    "terminated": terminations, "lives": info["lives"].copy(), "was_done": was_done.copy(),
                    "nooping": nooping, "last": skipped, "actions": actions, "frame": info["episode_frame_number"].copy()})
        noops.start(was_done, rng)
        obs, was_done = tracker.reset_ended(envs, was_done, next_obs), terminations | truncations
    envs.close()
    return rb, log


def stored(log):
    """The steps the replay holds, in slot order."""
    kept = [step for step in log if step["slot"] is not None]
    assert [step["slot"] for step in kept] == list(range(len(kept)))
    return kept


@pytest.fixture(scope="module")
def breakout(drq):
    return play(drq, "breakout", 700)


def test_life_loss_is_terminal_for_learning_while_the_game_goes_on(breakout):
    """Real Breakout (5 lives): every life loss is stored as a terminal, the game is not reset (frames keep counting,
    lives keep falling), and only the 5th loss, the game over, ends the episode."""
    rb, log = breakout
    life_losses, games, later_lives_scored = 0, 0, False
    for e in range(2):
        lives, frame, game_return, first_life_return = 5, 0, 0.0, None
        for step in stored(log):
            t = step["slot"]
            if step["was_done"][e]:  # the reset step: its lives and frames are the next game's
                assert not step["terminal"][e] and step["lives"][e] == 5
                lives, frame, game_return, first_life_return = 5, 0, 0.0, None
                continue
            if step["nooping"][e]:  # the game's no-op start: nothing is lost or scored yet
                assert step["lives"][e] == 5 and step["rewards"][e] == 0 and rb.last[t, e]
                continue
            game_return += step["rewards"][e]
            lost = step["lives"][e] < lives
            assert bool(step["terminal"][e]) == lost and rb.terminals[t, e] == lost
            assert step["frame"][e] > frame  # the same game goes on
            if lost and step["lives"][e] > 0:
                life_losses += 1
                assert not step["terminated"][e]
                first_life_return = game_return if first_life_return is None else first_life_return
            elif lost:  # game over: the episode ends, with a return over all five lives
                games += 1
                assert step["terminated"][e]
                later_lives_scored |= game_return > first_life_return
            lives, frame = step["lives"][e], step["frame"][e]
    assert games >= 3 and life_losses >= 4 * games and later_lives_scored


def test_games_begin_after_0_to_29_noop_agent_steps(breakout):
    """Every game, the first and each after a reset step, plays k < 30 NOOP agent steps of 4 frames (Dopamine's
    runner; ale-py's own no-ops would be single frames) before the agent's first step, which acts on the frame after
    them alone. The no-op steps are stored as final-observation slots (no transition starts there), or not at all
    when both envs play one."""
    rb, log = breakout
    starts = []
    for e in range(2):
        k = 0  # no-op steps since the game began (the reset, or a reset step); None once the agent has acted
        for step in log:
            if step["was_done"][e]:
                k = 0
            elif step["nooping"][e]:
                assert k is not None and step["actions"][e] == 0
                assert step["slot"] is None or rb.last[step["slot"], e]
                k += 1
                assert step["frame"][e] == 4 * k  # agent steps of 4 frames since the game's first frame
            elif k is not None:  # the game's first agent step
                assert step["frame"][e] == 4 * (k + 1) and not step["acting"][e, :3].any() and step["acting"][e, 3].any()
                assert step["slot"] == 0 or rb.last[step["slot"] - 1, e]  # the replay's stack starts here too
                starts.append(k)
                k = None
    assert len(starts) >= 6 and max(starts) < 30 and len(set(starts)) >= 4
    assert any(step["slot"] is None for step in log) and any(s["nooping"].any() and s["slot"] is not None for s in log)


def test_acting_stacks_equal_the_replays_across_life_losses(breakout):
    """What the network acts on, at every step of both envs, is the stack the replay rebuilds for that slot: frames of
    an earlier life (or game) are zero in both, as Dopamine restarts the agent's stack at each life."""
    rb, log = breakout
    log = stored(log)
    acting = torch.as_tensor(np.stack([step["acting"] for step in log]))  # (T, N, 4, 84, 84)
    slots = torch.arange(len(log))
    for e in range(2):
        assert torch.equal(rb.stack_frames(slots, torch.full_like(slots, e)), acting[:, e])
    # the zeroing is real: right after a life loss the env's own stack still holds the previous life's frames
    after_loss = [(t + 1, e) for t, step in enumerate(log[:-1]) for e in range(2)
                  if step["terminal"][e] and step["lives"][e] > 0]
    assert after_loss and all(log[t]["raw"][e, :3].any() and not log[t]["acting"][e, :3].any() for t, e in after_loss)


@pytest.mark.parametrize("script", AGENTS)
def test_the_training_loop_acts_on_the_replays_stacks(script, tmp_path, monkeypatch):
    """In a real loop of each script on Breakout (2 envs, 5 lives each), every acting call sees the stacks the replay
    rebuilds for that step's slots: frames of an earlier life are zero there too, not the env's own frames (the
    network would otherwise act on inputs it never learns from)."""
    module = load_script(script)
    seen, recvs, agents = [], [], []
    make_env, build, act = module.make_env, module.build_agent, module.Actor.__call__

    def recorded_make_env(*args, **kwargs):
        envs = make_env(*args, **kwargs)
        if not recvs:  # the training envs (made first): count and keep what each step returned
            recv = envs.recv
            recvs.append(None)
            envs.recv = lambda: recvs.append(recv()) or recvs[-1]
        return envs

    monkeypatch.setattr(module, "make_env", recorded_make_env)
    monkeypatch.setattr(module, "build_agent", lambda *args: agents.append(build(*args)) or agents[-1])
    # each call: the vector steps received so far, and the slot the acted-on observation goes to (the previous
    # step's slot is written after the call); a step of no-ops only writes none, the next call has its slot
    monkeypatch.setattr(module.Actor, "__call__", lambda actor, obs: seen.append(
        (len(recvs) - 1, agents[0].rb.t + (agents[0].rb.deferred is not None), obs.copy())) or act(actor, obs))
    args = module.Args(encoder="nature", num_experts=2, expert_hidden=16, batch_size=8, buffer_size=2000, num_envs=2,
                       env_id="Breakout", learning_starts=20, total_timesteps=300, replay_ratio=0.25,
                       runs_dir=str(tmp_path), metrics_every=0, eval_episodes=0, print_every=10**6, cuda=False)
    module.main(args, *module.prepare(args)[:2])
    rb = agents[0].rb
    rb.flush()
    by_slot = {slot: (step, obs) for step, slot, obs in seen}  # the last call per slot is the one stored there
    assert len(by_slot) > 100 and max(by_slot) < rb.t  # acting from step ~10 to the last, every slot written
    after_loss = 0
    for slot, (step, obs) in by_slot.items():
        slots = torch.full((2,), slot)
        torch.testing.assert_close(rb.stack_frames(slots, torch.arange(2)), torch.as_tensor(obs), rtol=0, atol=0)
        raw = recvs[step][0] if step else None
        after_loss += sum(raw is not None and raw[e, :3].any() and not obs[e, :3].any() for e in range(2))
    assert after_loss >= 2  # the zeroing was exercised: the env's own stack held the previous life's frames


@pytest.mark.parametrize("script", AGENTS)
def test_the_training_loop_plays_noop_starts_outside_the_agent_steps(script, tmp_path, monkeypatch):
    """A real loop of each script (Breakout, 2 envs): every game opens with k < 30 NOOP agent steps, varying from game
    to game, that count nowhere. Its frames are 4 x (k + logged length) at its game over, its logged return is the
    score after them, the run's agent steps are the vector steps minus reset and no-op steps. Their replay slots do not
    count towards --learning-starts, and a step in which both envs play a no-op writes no slot."""
    module = load_script(script)
    stream, agents, noop_starts, first_update, acted = [], [], [], [], {}
    make_env, build, noop_class, act = module.make_env, module.build_agent, module.NoopStarts, module.Actor.__call__

    def recorded_make_env(*args, **kwargs):  # the training envs: what each step was sent and returned
        envs = make_env(*args, **kwargs)
        send, recv = envs.send, envs.recv

        def recorded_recv():
            obs, *returned = recv()
            stream[-1].update(zip(["rewards", "terminated", "truncated", "info"], returned))
            return obs, *returned

        envs.send = lambda actions: stream.append({"actions": np.array(actions)}) or send(actions)
        envs.recv = recorded_recv
        return envs

    def recorded_build(*args):
        agent = build(*args)
        update = agent.update
        agent.update = lambda: first_update.append((agent.rb.t, noop_starts[0].slots)) or update()
        return agents.append(agent) or agent

    class RecordedNoopStarts(noop_class):
        def __init__(self, *args):
            super().__init__(*args)
            noop_starts.append(self)

    monkeypatch.setattr(module, "make_env", recorded_make_env)
    monkeypatch.setattr(module, "build_agent", recorded_build)
    monkeypatch.setattr(module, "NoopStarts", RecordedNoopStarts)
    monkeypatch.setattr(module.Actor, "__call__", lambda actor, obs: acted.update({len(stream): obs.copy()})
                        or act(actor, obs))  # keyed by the vector step it acts for
    args = module.Args(encoder="nature", num_experts=2, expert_hidden=16, batch_size=8, buffer_size=4000, num_envs=2,
                       env_id="Breakout", learning_starts=700, total_timesteps=1200, replay_ratio=0.5,
                       runs_dir=str(tmp_path), metrics_every=0, eval_episodes=0, print_every=10**6, cuda=False)
    rom, run_dir = module.prepare(args)[:2]
    module.main(args, rom, run_dir)
    scalars = read_scalars(run_dir)
    logged = list(zip([int(v) for _, v in scalars["charts/episodic_length"]],
                      [v for _, v in scalars["charts/episodic_return"]]))
    games, resets = [], 0  # games: (vector step of its game over, env, its steps)
    for e in range(2):
        game = []  # this env's steps since its game began; None: the next step is the reset step
        for i, step in enumerate(stream):
            if game is None:
                resets, game = resets + 1, []
                continue
            game.append(step)
            if step["terminated"][e] or step["truncated"][e]:
                games.append((i, e, game))
                game = None
    noops, first_acts = [], 0
    for (_, e, game), (length, score) in zip(sorted(games, key=lambda g: g[:2]), logged):  # in the order logged
        # agent steps of 4 frames (ale-py cuts the game-over step short): beyond the logged length, the no-ops
        k = -(-game[-1]["info"]["episode_frame_number"][e] // 4) - length
        assert 0 <= k < 30 and len(game) == k + length
        assert all(step["actions"][e] == 0 for step in game[:k])
        assert score == sum(step["rewards"][e] for step in game[k:])
        noops.append(k)
        first = next(i for i, step in enumerate(stream) if step is game[k])
        if first in acted and k > 0:  # the game's first agent step acts on the frame after the no-ops alone
            assert not acted[first][e, :3].any() and acted[first][e, 3].any()
            first_acts += 1
    assert len(noops) == len(logged) >= 4 and len(set(noops)) >= 3 and first_acts >= 1
    rb, written_noops = agents[0].rb, noop_starts[0].slots
    assert rb.t < len(stream) and written_noops > 0  # a step of no-ops only is not stored, the others are
    t, slots = first_update[0]
    # the first update: no-op slots not counted; the count grows by up to 2 a step, and a step where one env plays
    # (the other resets or plays a no-op) adds half an update's credit, so the first may come a step later
    assert slots > 10 and args.learning_starts < 2 * t - slots <= args.learning_starts + 4
    global_step = json.load(open(os.path.join(run_dir, "summary.json")))["global_step"]
    assert global_step in (1200, 1201) and global_step <= 2 * len(stream) - resets - sum(noops)  # unfinished games' no-ops


def test_n_step_returns_stop_at_a_life_loss(breakout):
    rb, log = breakout
    log = stored(log)
    terminal = np.stack([step["terminal"] for step in log])
    last = np.stack([step["last"] for step in log])
    rewards = np.clip(np.stack([step["rewards"] for step in log]), -1, 1)
    idx, envs, want = [], [], []
    for e in range(2):
        for t in range(len(log) - N_STEP - 1):
            if last[t, e]:
                continue
            ret, discount = 0.0, GAMMA**N_STEP
            for k in range(N_STEP):
                ret += GAMMA**k * rewards[t + k, e]
                if terminal[t + k, e]:
                    discount = 0.0
                    break
                if last[t + k + 1, e]:  # a truncation would bootstrap from the final observation
                    discount = GAMMA ** (k + 1)
                    break
            idx.append(t), envs.append(e), want.append((ret, discount))
    _, _, returns, discounts, _ = rb.gather(torch.tensor(idx), torch.tensor(envs))
    want = torch.tensor(want, dtype=torch.float32)
    torch.testing.assert_close(returns, want[:, 0])
    torch.testing.assert_close(discounts, want[:, 1])
    assert (want[:, 1] == 0).sum() > 60  # the windows of 10 steps before each life loss


# ---------------------------------------------------------------- DrQ: augmentation


def test_augmentation_crops_an_84x84_window_of_the_edge_padded_stack(drq):
    """Pixel values encode (frame, row, column): each output is exactly a window of the replicate-padded input at an
    offset in [0, 8) (Dopamine's randint excludes 8), the same window for the 4 frames of a stack, and the windows
    differ from stack to stack."""
    batch, i = 512, torch.arange(84.0)
    stack = (i[:, None] * 100 + i[None, :]) + 10_000 * torch.arange(4.0)[:, None, None]  # (4, 84, 84)
    torch.manual_seed(0)
    out = drq.augment(stack.expand(batch, 4, 84, 84), intensity=0.0)
    assert out.shape == (batch, 4, 84, 84) and out.dtype == torch.float32
    centre = out[:, 0, 42, 42].long()  # (42 + top - 4) * 100 + (42 + left - 4)
    top, left = centre // 100 - 38, centre % 100 - 38
    padded = np.pad(stack.numpy(), ((0, 0), (4, 4), (4, 4)), mode="edge")  # (4, 92, 92)
    for b in range(batch):
        assert np.array_equal(out[b].numpy(), padded[:, top[b]:top[b] + 84, left[b]:left[b] + 84]), b
    assert set(top.tolist()) == set(left.tolist()) == set(range(8))
    assert len(set(zip(top.tolist(), left.tolist()))) >= 60  # of 64 windows
    frames = torch.randint(0, 256, (3, 4, 84, 84), dtype=torch.uint8)  # what the replay gives
    out = drq.augment(frames)
    assert out.dtype == torch.float32 and out.min() >= 0 and out.max() <= 255 * 1.1 + 1e-3


def test_augmentation_intensity_is_one_clipped_factor_per_stack(drq):
    """x * (1 + 0.05 clip(N(0, 1), -2, 2)): one factor per stack, for all its frames and pixels, in [0.9, 1.1]."""
    torch.manual_seed(1)
    out = drq.augment(torch.full((20_000, 4, 8, 8), 200, dtype=torch.uint8))
    factor = out[:, 0, 0, 0] / 200
    assert torch.equal(out.amin((1, 2, 3)), out.amax((1, 2, 3)))
    assert factor.min() >= 0.9 - 1e-6 and factor.max() <= 1.1 + 1e-6
    clipped_low, clipped_high = (factor < 0.9 + 1e-6).float().mean(), (factor > 1.1 - 1e-6).float().mean()
    assert abs(clipped_low - 0.02275) < 0.005 and abs(clipped_high - 0.02275) < 0.005  # P(N(0, 1) < -2)
    assert abs(factor.mean() - 1.0) < 0.002 and abs(factor.std() - 0.05 * 0.9595) < 0.002  # std of clip(N, -2, 2)
    assert len(set(factor.tolist())) > 0.9 * len(factor)


def test_states_and_next_states_are_augmented_independently(drq):
    """In an update, s and s' get their own windows and factors (Dopamine splits one key for each): the encoder sees
    exactly augment(s) and a second, independent augment(s'); with --no-augmentation it sees the frames."""
    torch.manual_seed(0)
    args = drq.Args(encoder="nature", num_experts=2, expert_hidden=16)
    net = drq.QNetwork(args, 4)
    seen = []
    net.encoder.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0].detach().clone()))
    frames = torch.randint(0, 256, (8, 4, 84, 84), dtype=torch.uint8)
    batch = (frames, torch.arange(8) % 4, torch.zeros(8), torch.full((8,), 0.9), frames.clone())
    torch.manual_seed(5)
    drq.drq_loss(net, batch, args)
    torch.manual_seed(5)
    augmented_s, augmented_next = drq.augment(frames), drq.augment(frames)
    next_input, state_input = seen  # the target comes first, from s'
    torch.testing.assert_close(state_input, augmented_s / 255.0, rtol=0, atol=0)
    torch.testing.assert_close(next_input, augmented_next / 255.0, rtol=0, atol=0)
    assert not torch.equal(state_input, next_input)  # same frames, different augmentations
    seen.clear()
    drq.drq_loss(net, batch, drq.Args(encoder="nature", num_experts=2, expert_hidden=16, augmentation=False))
    assert all(torch.equal(x, frames.float() / 255.0) for x in seen)


# ---------------------------------------------------------------- DrQ: network and loss


def test_drq_targets_come_from_the_online_network(drq):
    """Target period 1: r + gamma^n Q(s', argmax Q(s', .)) from the network being trained, without a gradient through
    the target; the Huber loss on Q(s, a). After an update the targets move with the network (a frozen copy would not)."""
    torch.manual_seed(0)
    args = drq.Args(encoder="nature", num_experts=2, expert_hidden=16, augmentation=False)
    net = drq.QNetwork(args, 6)
    gen = torch.Generator().manual_seed(1)
    states = torch.randint(0, 256, (16, 4, 84, 84), dtype=torch.uint8, generator=gen)
    next_states = torch.randint(0, 256, (16, 4, 84, 84), dtype=torch.uint8, generator=gen)
    returns, discounts = 3 * torch.randn(16, generator=gen), torch.full((16,), GAMMA**N_STEP)
    discounts[::4] = 0.0
    batch = (states, torch.arange(16) % 6, returns, discounts, next_states)

    def by_hand(network):
        with torch.no_grad():
            target = returns + discounts * network(next_states).max(1).values
        q = network(states)[torch.arange(16), batch[1]]
        error = (q - target).abs()  # Huber: quadratic below 1, linear above
        return torch.where(error <= 1, 0.5 * error**2, error - 0.5).mean(), target

    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    frozen = copy.deepcopy(net)
    for _ in range(2):  # before and after an update
        loss, _, q_mean = drq.drq_loss(net, batch, args)
        expected, target = by_hand(net)
        torch.testing.assert_close(loss, expected)
        optimizer.zero_grad()
        loss.backward()
        grads = [p.grad.clone() for p in net.parameters()]
        optimizer.zero_grad()
        expected.backward()  # its target is a constant
        assert all(torch.allclose(a, p.grad) for a, p in zip(grads, net.parameters()))
        optimizer.step()
    assert not torch.allclose(by_hand(frozen)[1], target)


def test_drq_dueling_head(drq):
    torch.manual_seed(0)
    for flags in [dict(), dict(moe_type="baseline"), dict(expert_variant="big")]:
        net = drq.QNetwork(drq.Args(encoder="nature", num_experts=2, expert_hidden=16, **flags), 5)
        frames = torch.randint(0, 256, (3, 4, 84, 84), dtype=torch.uint8)
        q, info = net(frames, return_info=True)
        advantage = net.advantage(info["features"])
        torch.testing.assert_close(q, net.value(info["features"]) + advantage - advantage.mean(1, keepdim=True))
        assert q.shape == (3, 5) and net.value.out_features == 1 and torch.equal(net.q_values(frames), q)
    net = drq.QNetwork(drq.Args(encoder="nature", dueling=False), 5)
    assert not hasattr(net, "value") and net.head.out_features == 5


# ---------------------------------------------------------------- evaluation


class RandomPolicy(torch.nn.Module):
    """Uniformly random Q-values drawn from the global torch RNG, with the `q_values` interface `evaluate` uses; it
    records the Q-values of every call and the stacks shown for game 0."""

    def __init__(self, num_actions):
        super().__init__()
        self.num_actions, self.calls, self.game0 = num_actions, [], []

    def q_values(self, x):
        assert not self.training  # evaluate switches to eval mode (noisy nets off)
        q = torch.rand(x.shape[0], self.num_actions)
        self.calls.append(q)
        self.game0.append(x[0].clone())
        return q


def test_evaluation_plays_its_games_to_game_over(drq):
    """32 Breakout games at once in one vector env (the default is 100: the same code, 3x the CI time); each plays
    its no-op start (NOOP agent steps, the first draws of the evaluation's generator) and runs to its game over (a
    life loss ends nothing), as an independent replay of three games with the same seeds and actions shows. The
    network acts only for games past their no-ops, and only their steps count. The training's RNG is left alone."""
    policy, seed = RandomPolicy(4), 11
    torch.manual_seed(0)
    rng_before = torch.get_rng_state()
    scores, lengths = drq.evaluate(policy, "breakout", 32, 0.0, torch.device("cpu"), seed)
    assert torch.equal(torch.get_rng_state(), rng_before) and policy.training
    assert len(scores) == len(lengths) == 32 and max(lengths) < 27_000
    lengths = np.array(lengths)
    noops = np.random.default_rng(seed).integers(0, 30, size=32)
    assert len(set(noops.tolist())) > 10
    steps = np.arange((noops + lengths).max())[:, None]
    playing = (steps >= noops) & (steps < noops + lengths)  # (vector steps, games)
    calls = np.flatnonzero(playing.any(1))  # the vector steps at which the network was asked
    assert len(policy.calls) == len(calls)
    for game in (0, 1, 29):
        actions, shown = [], []
        for call, step in enumerate(calls):
            if playing[step, game]:  # the game's row: its rank among the games playing then
                actions.append(int(policy.calls[call][playing[step, :game].sum()].argmax()))
                shown.append(policy.game0[call] if game == 0 else None)
        env = drq.make_env("breakout", 1, "atari100k")
        obs, info = env.reset(seed=np.array([drq.episode_seed(seed, game, 0)]))
        for _ in range(noops[game]):
            obs, _, _, _, info = env.step(np.zeros(1, dtype=np.int64))
        assert info["episode_frame_number"][0] == 4 * noops[game]
        score, lives, losses, life_frames = 0.0, info["lives"][0], 0, 1
        for k, action in enumerate(actions):
            if game == 0:  # what the policy saw: the env's stack without frames of earlier lives or the no-ops
                assert np.array_equal(shown[k].numpy(), obs[0] * (np.arange(4) >= 4 - life_frames)[:, None, None]), k
            obs, reward, terminated, truncated, info = env.step(np.array([action]))
            score += reward[0]
            life_frames = 1 if info["lives"][0] < lives else min(life_frames + 1, 4)
            losses += int(info["lives"][0] < lives)
            lives = info["lives"][0]
            assert (terminated[0] or truncated[0]) == (k == len(actions) - 1)
        env.close()
        assert terminated[0] and lives == 0 and losses == 5 and score == scores[game]


# ---------------------------------------------------------------- replay size, checks of the flags


@pytest.mark.parametrize("script", AGENTS)
def test_replay_holds_what_a_run_can_write(script):
    module = load_script(script)
    # 100k agent steps and at most as many reset steps, 3 spare slots: 1.41 GB, not 7.06 GB
    assert module.replay_slots(module.Args()) == 200_003
    assert module.ReplayBuffer.nbytes(module.replay_slots(module.Args())) < 1.42e9
    assert module.replay_slots(module.Args(total_timesteps=12_500_000)) == 1_000_000
    assert module.replay_slots(module.Args(num_envs=3, total_timesteps=1000, buffer_size=100_000)) == 3 * (2 * 334 + 3)
    assert module.replay_slots(module.Args(num_envs=3, total_timesteps=10**6, buffer_size=1000)) == 999


def test_prioritized_replay_loads_into_another_size(der):
    """A resume with another --total-timesteps loads the replay into a larger (or smaller) one: same contents, same
    priorities, and the rebuilt sum tree samples exactly the same transitions."""
    rng = np.random.default_rng(0)
    rb = der.PrioritizedReplayBuffer(300, 2, "cpu", n_step=N_STEP, seed=4)
    for t in range(120):
        rb.add(rng.integers(0, 256, (2, 84, 84), dtype=np.uint8), [1, 2], rng.normal(size=2), rng.random(2) < 0.05,
               [False, False])
        if t > 20:
            idx, envs = rb.sample_indices(8)
            rb.update_priorities(idx, envs, torch.as_tensor(rng.random(8) * t))
    state = rb.state_dict()
    for capacity in (2 * 1000, 2 * 125, 300):
        other = der.PrioritizedReplayBuffer(capacity, 2, "cpu", n_step=N_STEP, seed=4)
        der.load_replay(other, state)
        assert torch.equal(other.tree.total(), rb.tree.total()) and torch.equal(other.max_priority, rb.max_priority)
        torch.testing.assert_close(other.tree.get(torch.arange(240)), rb.tree.get(torch.arange(240)), rtol=0, atol=0)
        other.generator.set_state(rb.generator.get_state())
        generator_state = rb.generator.get_state()
        for a, b in zip(rb.sample(64), other.sample(64)):
            assert torch.equal(a, b)
        rb.generator.set_state(generator_state)


def test_the_sum_tree_of_a_100k_run_is_rebuilt_in_one_pass(der):
    """load_replay's rebuild at the size of a real 100k run's replay (2^18 leaves; setting them through `update` needs
    a 2^18 x 2^18 comparison) gives every node the sum of its children, and on a small tree exactly what `update` gives."""
    rng = np.random.default_rng(1)
    tree = der.SumTree(der.replay_slots(der.Args()), "cpu")
    assert tree.first_leaf == 2**18
    leaves = torch.as_tensor(rng.random(200_003) * (rng.random(200_003) < 0.9))
    der.rebuild_tree(tree, leaves)
    assert torch.equal(tree.get(torch.arange(200_003)), leaves) and not tree.nodes[tree.first_leaf + 200_003:].any()
    children = tree.nodes.view(-1, 2).sum(1)
    assert torch.equal(tree.nodes[1: tree.first_leaf], children[1: tree.first_leaf])
    small, rebuilt = der.SumTree(300, "cpu"), der.SumTree(300, "cpu")
    small.update(torch.arange(240), leaves[:240])
    rebuilt.update(torch.arange(5), torch.ones(5))  # a rebuild starts from nothing
    der.rebuild_tree(rebuilt, leaves[:240])
    assert torch.equal(rebuilt.nodes, small.nodes)


@pytest.mark.parametrize("script", AGENTS)
@pytest.mark.parametrize("flags,message", [
    (dict(eval_every=1000, eval_episodes=0), "--eval-every 1000 needs --eval-episodes above 0"),
    (dict(eval_every=-5), "--eval-every must be >= 0"),
    (dict(total_timesteps=5), "leaves too few replay slots per env"),  # 2 x 5 + 3 slots, not above n + 4
    (dict(moe_type="top1", random_phi=True), "--random-phi and --moe-l2-norm are Soft MoE options"),
])
def test_impossible_combinations_are_refused(script, flags, message):
    module = load_script(script)
    with pytest.raises(ValueError) as error:
        module.check_args(module.Args(**flags))
    assert message in str(error.value)


def test_der_epsilon_flags_need_no_noisy(der):
    with pytest.raises(ValueError, match="apply only with --no-noisy"):
        der.check_args(der.Args(exploration_steps=5000))
    der.check_args(der.Args(noisy=False, exploration_steps=5000))
    der.check_args(der.Args(noisy_epsilon=0.01))  # the official agent's constant epsilon beside the noise
    with pytest.raises(ValueError, match="--noisy-epsilon applies to noisy nets"):
        der.check_args(der.Args(noisy=False, noisy_epsilon=0.01))


def test_bad_input_is_one_clear_line(tmp_path):
    result = run_script("drq_softmoe", "--runs-dir", str(tmp_path), "--eval-every", "500", "--eval-episodes", "0",
                        timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("drq_softmoe.py: error: --eval-every 500 needs"), result.stderr
    assert not os.listdir(tmp_path)


# ---------------------------------------------------------------- real short runs

TINY = ["--encoder", "nature", "--num-experts", "2", "--total-timesteps", "800", "--learning-starts", "770",
        "--iteration-steps", "200", "--log-every", "100", "--print-every", "400", "--metrics-every", "790",
        "--eval-episodes", "2", "--checkpoint-every", "800", "--save-model"]
# games whose episodes end within 800 steps while nothing is learned yet: DrQ(ε) plays at random in its warm-up
# (RoadRunner: 130-370 steps a game); DER's untrained noisy network plays an almost constant action, and every constant
# action loses SpaceInvaders' three lives in 375-725 steps. Both greedy evaluations end as fast.
RUNS = {"drq_softmoe": ["--env-id", "RoadRunner", "--exploration-steps", "100", "--eval-every", "400"],
        "der_softmoe": ["--env-id", "SpaceInvaders"]}
KEYS = ["charts/episodic_return", "charts/episodic_length", "charts/iteration_return", "charts/SPS", "charts/epsilon",
        "losses/td_loss", "losses/q_values", "metrics/dormant_tau0", "metrics/dormant_tau0.1", "metrics/feature_norm",
        "metrics/srank", "metrics/entk_srank", "moe/expert_load_0", "moe/router_entropy", "eval/episodic_return",
        "eval/human_normalized_score"]


@pytest.mark.parametrize("script", AGENTS)
def test_short_run_logs_evaluates_and_returns_whole_games(tmp_path, script):
    result = run_script(script, "--runs-dir", str(tmp_path), *TINY, *RUNS[script])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step 800/800" in result.stdout
    (run_dir,) = glob.glob(os.path.join(tmp_path, "*"))
    game, rom = ("RoadRunner", "road_runner") if script == "drq_softmoe" else ("SpaceInvaders", "space_invaders")
    assert os.path.basename(run_dir).startswith(f"{game}__{script}__1__")
    scalars = read_scalars(run_dir)
    for key in KEYS:
        assert key in scalars, key
    lengths = [int(v) for _, v in scalars["charts/episodic_length"]]  # whole games; reset steps are no agent steps
    assert lengths and [s for s, _ in scalars["charts/episodic_return"]] == list(np.cumsum(lengths))
    epsilons = dict(scalars["charts/epsilon"])
    if script == "drq_softmoe":  # 1 in the warm-up; at step 800, chosen at 799: 29 of 100 decay steps later
        assert all(epsilons[s] == 1.0 for s in range(100, 800, 100)) and epsilons[800] == pytest.approx(1 - 0.99 * 29 / 100)
    else:  # noisy nets explore
        assert set(epsilons.values()) == {0.0}
    # evaluations: 2 games each, at --eval-every and at the end: their mean return and human-normalised score logged
    summary = json.load(open(os.path.join(run_dir, "summary.json")))
    assert summary["global_step"] == 800 and summary["game"] == game
    evaluations = {e["step"]: e["returns"] for e in summary["evaluations"]}
    assert evaluations.keys() == ({400, 800} if script == "drq_softmoe" else {800})
    assert all(len(returns) == 2 for returns in evaluations.values()) and summary["eval_returns"] == evaluations[800]
    assert scalars["eval/episodic_return"] == [(step, pytest.approx(np.mean(r))) for step, r in evaluations.items()]
    module = load_script(script)
    random_score, human_score = module.ATARI_SCORES[rom]
    for step, value in scalars["eval/human_normalized_score"]:
        assert value == pytest.approx(np.mean([(s - random_score) / (human_score - random_score) for s in evaluations[step]]))
    assert summary["eval_human_normalized_score"] == pytest.approx(dict(scalars["eval/human_normalized_score"])[800])
    saved = torch.load(os.path.join(run_dir, "model.pt"), weights_only=True)["model"]
    assert ("moe.experts.layer1.weight_sigma" in saved) == (script == "der_softmoe")
    # the checkpoint's replay: each logged return is a whole game, over all its lives, each life ended by a terminal
    state = torch.load(glob.glob(os.path.join(run_dir, "checkpoints", "*.pt"))[0], weights_only=True)
    assert ("target_network" in state) == (script == "der_softmoe")  # DrQ(ε)'s targets come from the online network
    replay = state["replay"]
    rewards, terminals, last = replay["rewards"][:, 0], replay["terminals"][:, 0], replay["last"][:, 0]
    games, start = [], 0
    for t in range(1, len(last)):
        if last[t]:  # slot t holds the final observation of the game that ended at step t - (earlier reset slots)
            games.append((t - len(games), float(rewards[start:t].sum()), t - start, int(terminals[start:t].sum())))
            assert terminals[t - 1]  # the game over
            start = t + 1
    logged = [(s, r) for s, r in scalars["charts/episodic_return"]]
    assert logged == [(t, r) for t, r, _, _ in games] and len(games) >= 1
    assert [length for _, length in scalars["charts/episodic_length"]] == [n for _, _, n, _ in games]
    assert all(lost == 3 for *_, lost in games)  # both games have three lives


# ---------------------------------------------------------------- --save-replay


@pytest.mark.parametrize("script", AGENTS)
def test_save_replay_writes_a_dataset_the_offline_loader_reads(script, tmp_path):
    """SpaceInvaders with life losses (an untrained agent loses lives there fast): the replay goes to the DQN Replay
    Dataset layout and loads back in cql_softmoe.py's loader. Every agent step is one row (the reset steps' final
    observations are none), every episode (and every life: a life loss is terminal) starts with 3 zero rows."""
    result = run_script(script, "--env-id", "SpaceInvaders", "--encoder", "nature", "--num-experts", "2",
                        "--total-timesteps", "600", "--learning-starts", "1000", "--buffer-size", "1000", "--metrics-every",
                        "0", "--eval-episodes", "0", "--runs-dir", str(tmp_path / "runs"), "--save-replay", str(tmp_path / "data"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"replay written to {tmp_path}/data/SpaceInvaders/1" in result.stdout
    cql = load_script("cql_softmoe")
    _, runs = cql.find_dataset_runs(str(tmp_path / "data"), "SpaceInvaders")
    (record,) = cql.scan_dataset(runs, [], 1.0, 6, "first")
    terminal = np.asarray(record["terminal"]).astype(bool)
    starts = 1 + int(terminal[:-1].sum())  # a new (agent) episode follows every terminal but a final one
    assert terminal.sum() >= 2
    assert record["rows"] == 600 + 3 * starts  # the reset steps' slots (final observations) are no rows, nor steps


def test_unwritable_save_replay_fails_before_training(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    result = run_script("drq_softmoe", "--runs-dir", str(tmp_path / "runs"), "--save-replay", str(blocker / "data"),
                        timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "cannot write --save-replay" in result.stderr
    assert not (tmp_path / "runs").exists()  # refused before the run directory is created
    # the other way round: an unwritable run directory leaves no --save-replay directory behind (exit 2's promise)
    result = run_script("drq_softmoe", "--runs-dir", str(blocker / "runs"), "--save-replay", str(tmp_path / "data"),
                        timeout=120)
    assert result.returncode == 2 and "cannot write the run directory" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


class Fire(torch.nn.Module):
    """Q-values that always prefer FIRE (action 1 of Breakout's minimal set): the paddle never moves, games end fast."""

    def q_values(self, x):
        return torch.tensor([0.0, 1.0, 0.0, 0.0]).expand(x.shape[0], -1)

    forward = q_values  # dqn_softmoe's evaluate calls the network itself


class FireDistribution(torch.nn.Module):
    """C51 logits whose expected Q prefers FIRE; called in training mode (noisy nets' noise on) it fails the test."""

    def __init__(self):
        super().__init__()
        self.register_buffer("support", torch.linspace(-10.0, 10.0, 51))

    def forward(self, x):
        assert not self.training, "the evaluation must act with the mean network (noise off)"
        logits = torch.zeros(x.shape[0], 4, 51)
        logits[:, 1, -1] = 10.0
        return logits


def recorded_actions(module, monkeypatch):
    """Every action array handed to the vector envs that `module.make_env` builds from now on."""
    taken, make_env = [], module.make_env

    def recording(*args, **kwargs):
        envs = make_env(*args, **kwargs)
        step = envs.step
        envs.step = lambda actions: (taken.append(np.array(actions)), step(actions))[1]
        return envs

    monkeypatch.setattr(module, "make_env", recording)
    return taken


@pytest.mark.parametrize("script", ["drq_softmoe", "dqn_softmoe", "rainbow_softmoe"])
@pytest.mark.parametrize("epsilon", [0.0, 0.5])
def test_evaluation_acts_epsilon_greedy(script, epsilon, monkeypatch):
    """--eval-epsilon: with probability epsilon a uniform action, else the greedy one (FIRE): FIRE's share of the
    played steps is 1 - epsilon + epsilon / 4 (the atari100k evaluation of DER/DrQ and the Dopamine one of DQN and
    Rainbow, whose network acts in eval mode: noise off)."""
    module = load_script(script)
    taken = recorded_actions(module, monkeypatch)
    if script in ("dqn_softmoe", "rainbow_softmoe"):  # its games all play on (and act) until the last one ends
        model = FireDistribution() if script == "rainbow_softmoe" else Fire()
        module.evaluate(model, "breakout", "dopamine", 4, epsilon, "cpu", 0)
        assert model.training  # back to training mode for the next updates
        played = np.stack(taken).ravel()
    else:  # game g acts in the lengths[g] steps after its no-ops (the first draws of the evaluation's generator)
        _, lengths = module.evaluate(Fire(), "breakout", 4, epsilon, torch.device("cpu"), 0)
        noops = np.random.default_rng(0).integers(0, 30, size=4)
        taken = np.stack(taken)
        assert all((taken[:k, g] == 0).all() for g, k in enumerate(noops))  # NOOP, whatever epsilon
        played = np.concatenate([taken[k:k + n, g] for g, (k, n) in enumerate(zip(noops, lengths))])
    share = (played == 1).mean()
    assert len(played) > 400, len(played)
    if epsilon == 0:
        assert share == 1.0
    else:  # 600-800 played steps (seeded): a standard deviation of about 0.02
        assert abs(share - (1 - epsilon + epsilon / 4)) < 0.06, share


@pytest.mark.parametrize("script", AGENTS)
def test_resumed_with_no_evaluation_games_a_pending_evaluation_is_dropped(script, tmp_path, monkeypatch):
    """A run stopped during an evaluation, resumed with --eval-episodes 0, trains on to its end without playing it
    (a vector env of 0 games crashed the interpreter)."""
    module = load_script(script)
    monkeypatch.setattr(module, "evaluate", lambda *a, **k: None)  # what a signal during the games returns
    # acting only (no update before 1,000 slots): the evaluation's bookkeeping is under test, not learning
    flags = dict(encoder="nature", num_experts=2, expert_hidden=16, batch_size=8, env_id="Pong", learning_starts=1000,
                 total_timesteps=120, metrics_every=0, log_every=1000, print_every=1000, runs_dir=str(tmp_path),
                 cuda=False)
    args = module.Args(**flags, eval_every=60, eval_episodes=2)
    with pytest.raises(SystemExit) as exit:
        module.main(args, *module.prepare(args))
    assert exit.value.code == module.EXIT_PREEMPTED
    monkeypatch.setattr(module, "evaluate", lambda *a, **k: pytest.fail("an evaluation was played"))
    resumed = module.Args(**flags, eval_every=0, eval_episodes=0, resume="auto")
    module.main(resumed, *module.prepare(resumed))
    (summary,) = glob.glob(f"{tmp_path}/*/summary.json")
    assert json.load(open(summary))["global_step"] == 120
