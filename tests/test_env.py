"""Game names and the Dopamine protocol on real ALE games (SPEC §1): check ale-py's behaviour, don't trust defaults."""

import numpy as np
import pytest


@pytest.mark.parametrize("name,rom", [("Breakout", "breakout"), ("breakout", "breakout"), ("ALE/Breakout-v5", "breakout"),
                                      ("BreakoutNoFrameskip-v4", "breakout"), ("SpaceInvaders", "space_invaders"),
                                      ("space_invaders", "space_invaders"), ("MontezumaRevenge", "montezuma_revenge"),
                                      ("ALE/MsPacman-v5", "ms_pacman"), ("UpNDown", "up_n_down"), ("PongDeterministic-v4", "pong")])
def test_resolve_rom(dqn, name, rom):
    assert dqn.resolve_rom(name) == rom


def test_unknown_game_names_closest_roms(dqn):
    with pytest.raises(ValueError, match="unknown game 'Breakot'.*closest ROM ids: breakout"):
        dqn.resolve_rom("Breakot")
    with pytest.raises(ValueError, match="space_invaders"):
        dqn.resolve_rom("SpaceInvader")


def test_game_name(dqn):
    assert [dqn.game_name(r) for r in ["space_invaders", "up_n_down", "jamesbond"]] == ["SpaceInvaders", "UpNDown", "Jamesbond"]


def test_dopamine_protocol_raw_rewards_and_lives(dqn):
    """Rewards are raw game scores (ale-py clips by default), and losing a life is not a terminal."""
    envs = dqn.make_env("space_invaders", 1, "dopamine")
    envs.reset(seed=0)
    rng, rewards, lives_lost, was_done = np.random.default_rng(0), [], 0, False
    prev_lives = None
    for _ in range(3000):
        _, reward, term, trunc, info = envs.step(rng.integers(envs.single_action_space.n, size=1))
        rewards.append(reward[0])
        if prev_lives is not None and not was_done and info["lives"][0] < prev_lives:
            lives_lost += 1
            assert term[0] == (info["lives"][0] == 0)  # only the game over ends the episode
        prev_lives, was_done = info["lives"][0], bool(term[0] or trunc[0])
        if was_done:
            break
    assert max(rewards) > 1  # unclipped: Space Invaders scores 5 to 30 per alien
    assert lives_lost >= 2


def test_dopamine_protocol_has_no_noop_starts(dqn):
    """No random no-ops: every env starts from the same frame whatever its seed (atari100k's are the loop's)."""
    first = [dqn.make_env("pong", 1, "dopamine").reset(seed=s)[0] for s in range(3)]
    assert all(np.array_equal(first[0], f) for f in first)


def test_episode_cap_is_a_truncation_in_frames(dqn):
    envs = dqn.make_env("pong", 1, "dopamine", max_episode_frames=400)
    envs.reset(seed=0)
    for step in range(1, 101):
        _, _, term, trunc, info = envs.step(np.zeros(1, dtype=np.int64))
        if trunc[0] or term[0]:
            break
    assert (step, bool(trunc[0]), bool(term[0])) == (100, True, False)  # 400 frames = 100 agent steps
    _, reward, term, trunc, info = envs.step(np.zeros(1, dtype=np.int64))  # the reset step
    assert info["episode_frame_number"][0] == 0 and reward[0] == 0 and not term[0]


def test_sticky_actions_make_the_dopamine_protocol_stochastic(dqn):
    """Sticky actions (0.25): the same actions from the same start diverge under different seeds; ALE itself is
    deterministic, so without them (and without no-ops) both trajectories would be identical."""
    actions = np.random.default_rng(0).integers(6, size=300)
    frames = []
    for seed in (0, 1):
        envs = dqn.make_env("pong", 1, "dopamine")
        envs.reset(seed=seed)
        frames.append(np.stack([envs.step(actions[t:t + 1])[0][0, -1] for t in range(300)]))
        envs.close()
    assert not np.array_equal(frames[0], frames[1])


@pytest.mark.parametrize("protocol,sticky", [("dopamine", 0.25), ("atari100k", 0.0)])
def test_every_protocol_setting_is_explicit(dqn, monkeypatch, protocol, sticky):
    """ale-py's defaults are neither protocol (SPEC §1): each setting is passed, with the protocol's value. ale-py's
    no-ops are single frames, never Dopamine's agent steps: off, the Atari 100k loops play their own (NoopStarts)."""
    seen = {}
    monkeypatch.setattr(dqn, "AtariVectorEnv", lambda game, num_envs, **kwargs: seen.update(kwargs))
    dqn.make_env("pong", 2, protocol)
    assert {k: seen[k] for k in ["repeat_action_probability", "noop_max", "use_fire_reset", "reward_clipping",
                                 "episodic_life", "frameskip", "maxpool", "stack_num", "grayscale", "full_action_space",
                                 "max_num_frames_per_episode", "img_height", "img_width"]} == dict(
        repeat_action_probability=sticky, noop_max=0, use_fire_reset=False, reward_clipping=False, episodic_life=False,
        frameskip=4, maxpool=True, stack_num=4, grayscale=True, full_action_space=False,
        max_num_frames_per_episode=108_000, img_height=84, img_width=84)


def loop_steps(dqn, envs, tracker, obs, was_done, actions):
    """The training loop's env calls, in its order; returns the observations acted on and the final state."""
    seen, ended, reseeded = [], 0, 0
    for a in actions:
        before = tracker.segments.copy()
        tracker.send(envs, a)
        next_obs, _, terminations, truncations, _ = envs.recv()
        obs, was_done = tracker.reset_ended(envs, was_done, next_obs), terminations | truncations
        ended, reseeded = ended + int(was_done.sum()), reseeded + int((tracker.segments > before).sum())
        seen.append(obs.copy())
    return seen, obs, was_done, ended, reseeded


@pytest.mark.parametrize("protocol", ["dopamine", "atari100k"])
def test_resume_replays_several_episodes_between_seeded_resets(dqn, protocol):
    """A seeded reset reloads the ROM (~0.2 s), so an env is reseeded only at the first episode end `reseed_steps`
    after its last one; episodes in between start from ale-py's auto-reset (sticky actions keep drawing from the
    env's generator). A tracker restored mid-run must replay those episodes
    exactly: the restored envs then see the same observations as the uninterrupted ones, reseeds included."""
    rng = np.random.default_rng(0)
    actions = [rng.integers(4, size=2) for _ in range(900)]
    envs = dqn.make_env("breakout", 2, protocol)
    tracker = dqn.EnvTracker(5, 2, reseed_steps=250)
    obs, _ = envs.reset(seed=tracker.seeds())
    _, obs, was_done, ended, reseeded = loop_steps(dqn, envs, tracker, obs, np.zeros(2, dtype=bool), actions[:600])
    state, saved_obs, saved_done = tracker.state_dict(), obs.copy(), was_done.copy()
    assert reseeded >= 1 and ended > reseeded  # episodes ended both with and without a seeded reset
    assert max(len(a) for a in tracker.actions) > 150  # some env replays more than its current episode
    uninterrupted, *_ = loop_steps(dqn, envs, tracker, obs, was_done, actions[600:])
    envs.close()

    fresh = dqn.make_env("breakout", 2, protocol)
    restored = dqn.EnvTracker(5, 2, reseed_steps=250)
    obs = restored.restore(fresh, state, saved_obs)  # raises unless the replay reproduces the saved observations
    resumed, _, _, ended_after, reseeded_after = loop_steps(dqn, fresh, restored, obs, saved_done, actions[600:])
    fresh.close()
    assert ended_after >= 1
    assert all(np.array_equal(a, b) for a, b in zip(uninterrupted, resumed))
