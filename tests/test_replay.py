"""Replay memory: one frame per step, stacks rebuilt at sampling time, n-step returns, the write cursor (SPEC §5)."""

import gzip
import os

import numpy as np
import pytest
import torch

from conftest import load_script


def label(t, env=0):
    """A frame whose pixels all equal a value identifying (time, env); never 0, so zero frames mean padding."""
    return np.full((84, 84), 1 + (t * 7 + env * 3) % 250, dtype=np.uint8)


def drive(rb, episodes, num_envs=1):
    """Feed `rb` exactly as the training loop does, for one env, from a list of episodes.

    Each episode is (rewards, end) with end "terminal" or "truncated". Returns the logical slot of each episode's
    first observation and, per slot, the frame label time.
    """
    starts, was_done, t = [], False, 0
    for rewards, end in episodes:
        starts.append(rb.t)
        for k, r in enumerate(rewards):
            last_step = k == len(rewards) - 1
            terminal = last_step and end == "terminal"
            rb.add(np.stack([label(t, e) for e in range(num_envs)]), [1] * num_envs, [r] * num_envs,
                   [terminal] * num_envs, [was_done] * num_envs)
            t, was_done = t + 1, False
        was_done = True  # the next add is the reset step: it stores this episode's final observation
        rb.add(np.stack([label(t, e) for e in range(num_envs)]), [0] * num_envs, [0.0] * num_envs,
               [False] * num_envs, [True] * num_envs)
        t, was_done = t + 1, False
    return starts


def test_stacks_zero_frames_of_earlier_episodes(dqn):
    rb = dqn.ReplayBuffer(100, 1, "cpu", n_step=1)
    starts = drive(rb, [([0.0] * 5, "terminal"), ([0.0] * 6, "terminal")])
    idx = torch.tensor([0, 2, 4, starts[1], starts[1] + 1, starts[1] + 3])
    stacks = rb.stack_frames(idx, torch.zeros(6, dtype=torch.long))[:, :, 0, 0].tolist()
    s = starts[1]
    assert stacks[0] == [0, 0, 0, label(0)[0, 0]]  # first frame ever: nothing before it
    assert stacks[1] == [0, label(0)[0, 0], label(1)[0, 0], label(2)[0, 0]]
    assert stacks[2] == [label(t)[0, 0] for t in (1, 2, 3, 4)]
    assert stacks[3] == [0, 0, 0, label(s)[0, 0]]  # the final observation (slot s-1) belongs to episode 1
    assert stacks[4] == [0, 0, label(s)[0, 0], label(s + 1)[0, 0]]
    assert stacks[5] == [label(t)[0, 0] for t in range(s, s + 4)]


def test_n_step_returns_terminal_and_truncation(dqn):
    gamma = 0.5
    rb = dqn.ReplayBuffer(100, 1, "cpu", n_step=3, gamma=gamma)
    starts = drive(rb, [([1.0, 2.0, -0.5, 0.25], "terminal"), ([1.0, 0.5], "truncated"), ([0.0] * 6, "terminal")])
    env = torch.zeros(1, dtype=torch.long)

    def batch(i):
        states, actions, returns, discounts, next_states = rb.gather(torch.tensor([i]), env)
        return returns.item(), discounts.item(), next_states[0, -1, 0, 0].item()

    # rewards are clipped to [-1, 1] inside the agent: 2.0 counts as 1.0
    assert batch(0) == pytest.approx((1 + gamma * 1 + gamma**2 * -0.5, gamma**3, label(3)[0, 0]))
    ret, disc, _ = batch(2)  # -0.5, then 0.25 ends the episode with a terminal: no bootstrap
    assert (ret, disc) == pytest.approx((-0.5 + gamma * 0.25, 0.0))
    ret, disc, _ = batch(3)
    assert (ret, disc) == pytest.approx((0.25, 0.0))
    # truncated episode: the return stops at its end and bootstraps from its final observation with gamma^steps
    s = starts[1]
    assert batch(s) == pytest.approx((1 + gamma * 0.5, gamma**2, label(s + 2)[0, 0]))
    assert batch(s + 1) == pytest.approx((0.5, gamma, label(s + 2)[0, 0]))
    final_stack = rb.gather(torch.tensor([s + 1]), env)[4][0, :, 0, 0].tolist()
    assert final_stack == [0, label(s)[0, 0], label(s + 1)[0, 0], label(s + 2)[0, 0]]


def test_life_loss_terminal_stops_bootstrapping_and_restarts_the_stack(dqn):
    """atari100k: a life loss is `terminal` without ending the game (the next slot is not `last`). Bootstrapping
    stops there and, as in Dopamine's runner, the agent's frame stack restarts with the next life."""
    rb = dqn.ReplayBuffer(100, 1, "cpu", n_step=3, gamma=0.9)
    for t in range(8):
        rb.add(label(t)[None], [0], [1.0], [t == 2], [False])
    states, _, returns, discounts, next_states = rb.gather(torch.tensor([1, 3, 5]), torch.zeros(3, dtype=torch.long))
    assert returns.tolist() == pytest.approx([1 + 0.9, 1 + 0.9 + 0.81, 1 + 0.9 + 0.81])
    assert discounts.tolist() == pytest.approx([0.0, 0.9**3, 0.9**3])
    assert states[1, :, 0, 0].tolist() == [0, 0, 0, label(3)[0, 0]]  # the new life's first frame
    assert states[2, :, 0, 0].tolist() == [0, label(3)[0, 0], label(4)[0, 0], label(5)[0, 0]]


def test_sampling_respects_cursor_and_episode_ends_after_wraparound(dqn):
    size, n = 40, 3
    rb = dqn.ReplayBuffer(size, 1, "cpu", n_step=n, seed=0)
    rng = np.random.default_rng(0)
    episodes = [([1.0] * int(rng.integers(1, 9)), "terminal" if rng.random() < 0.7 else "truncated") for _ in range(30)]
    drive(rb, episodes)
    assert rb.t > 3 * size
    lo, hi = rb.valid_range()
    assert (lo, hi) == (rb.t - size + 3, rb.t - n - 1)
    idx, envs = rb.sample_indices(4000)
    assert idx.min() >= lo and idx.max() <= hi
    assert not rb.last[idx % size, envs].any()
    # every frame of every sampled stack is the one written at that time, or zero before the episode start
    stacks = rb.stack_frames(idx, envs)[:, :, 0, 0]
    for i, stack in zip(idx.tolist(), stacks.tolist()):
        for j, value in enumerate(stack):
            t = i - 3 + j
            assert value in (0, label(t)[0, 0])
            if value == 0:
                assert all(v == 0 for v in stack[:j])  # zeros only before the episode's first frame


def test_sampling_is_uniform_over_valid_starts(dqn):
    rb = dqn.ReplayBuffer(1000, 1, "cpu", n_step=1, seed=1)
    drive(rb, [([0.0] * 10, "terminal")] * 5)  # 55 slots, 5 of them final observations
    idx, _ = rb.sample_indices(40000)
    counts = torch.bincount(idx, minlength=rb.t).float()
    valid = ~rb.last[: rb.t, 0]
    valid[rb.t - 1] = False  # its next observation is not written yet (n = 1)
    assert counts[~valid].sum() == 0
    expected = 40000 / valid.sum()
    assert (counts[valid] - expected).abs().max() < 0.15 * expected


def test_sampling_never_starts_at_a_final_observation_even_for_one_step_episodes(dqn):
    rb = dqn.ReplayBuffer(1000, 1, "cpu", n_step=1, seed=0)
    drive(rb, [([0.0], "terminal")] * 40)  # every other slot is a final observation
    idx, envs = rb.sample_indices(100_000, candidates=2)  # few candidates: the fallback is exercised
    assert not rb.last[idx, envs].any()
    lo, hi = rb.valid_range()
    assert idx.min() >= lo and idx.max() <= hi


def test_multiple_envs_keep_their_own_streams(dqn):
    rb = dqn.ReplayBuffer(200, 2, "cpu", n_step=2, seed=0)
    drive(rb, [([0.0] * 6, "terminal")] * 3, num_envs=2)
    idx, envs = rb.sample_indices(500)
    assert set(envs.tolist()) == {0, 1}
    stacks = rb.stack_frames(idx, envs)[:, -1, 0, 0]
    expected = torch.tensor([label(i, e)[0, 0] for i, e in zip(idx.tolist(), envs.tolist())], dtype=torch.uint8)
    assert torch.equal(stacks, expected)


def test_memory_for_one_million_transitions(dqn):
    nbytes = dqn.ReplayBuffer.nbytes(1_000_000)
    assert nbytes == 1_000_000 * (84 * 84 + 7)  # frame + uint8 action + float32 reward + 2 flags
    assert nbytes < 7.1e9  # vs 28 GB for a stack of 4 frames per state
    # what a replay really allocates is what nbytes says (a stored stack or int64 actions would show here)
    rb = dqn.ReplayBuffer(1000, 2, "cpu", n_step=3)
    storage = [t for t in vars(rb).values() if isinstance(t, torch.Tensor) and t.numel() >= 1000]
    assert sum(t.numel() * t.element_size() for t in storage) == dqn.ReplayBuffer.nbytes(1000)  # 500 per env


def test_rebuilt_stacks_equal_what_a_real_env_returned(dqn):
    """Breakout with random actions, a short frame cap (truncations) and game overs: every sampled state and
    next state rebuilt from single frames equals the stacked observation the env itself gave."""
    envs = dqn.make_env("breakout", 2, "dopamine", max_episode_frames=1200)
    rb = dqn.ReplayBuffer(10_000, 2, "cpu", n_step=3, seed=0)
    obs, _ = envs.reset(seed=0)
    rng = np.random.default_rng(0)
    seen, was_done, ends = [], np.zeros(2, dtype=bool), 0
    for _ in range(900):
        actions = rng.integers(4, size=2)
        next_obs, rewards, terms, truncs, _ = envs.step(actions)
        rb.add(obs[:, -1], actions, rewards, terms, was_done)
        seen.append(obs.copy())
        ends += int((terms | truncs).sum())
        obs, was_done = next_obs, terms | truncs
    assert ends >= 4
    seen = torch.as_tensor(np.stack(seen))  # (T, N, 4, 84, 84)
    idx, env = rb.sample_indices(600)
    states, _, _, discounts, next_states = rb.gather(idx, env)
    assert torch.equal(states, seen[idx, env])

    def bootstrap_slot(i, e):  # the 3-step window stops at a terminal (no bootstrap) or an episode's end
        for k in range(3):
            if rb.terminals[i + k, e]:
                return None
            if rb.last[i + k + 1, e]:
                return i + k + 1
        return i + 3

    for k, (i, e) in enumerate(zip(idx.tolist(), env.tolist())):
        j = bootstrap_slot(i, e)
        if j is None:
            assert discounts[k] == 0
        else:
            assert discounts[k] > 0 and torch.equal(next_states[k], seen[j, e])


@pytest.mark.parametrize("script,kind", [("dqn_softmoe", "ReplayBuffer"), ("rainbow_softmoe", "PrioritizedReplayBuffer")])
def test_a_deferred_add_reads_as_an_immediate_one(script, kind, tmp_path):
    """The loops add each step with `defer=True` and flush after the next send. Until then nothing is written; every
    read (valid range, sampling, priorities, state_dict, the dataset writer) flushes first, so a replay fed deferred
    adds is read exactly as one fed immediate adds, whatever reads come between the adds."""
    module = load_script(script)
    make = getattr(module, kind)
    now, later = make(300, 2, "cpu", n_step=3, seed=0), make(300, 2, "cpu", n_step=3, seed=0)
    rng = np.random.default_rng(0)
    for t in range(260):
        step = (rng.integers(0, 256, (2, 84, 84), dtype=np.uint8), rng.integers(4, size=2), rng.normal(size=2),
                rng.random(2) < 0.05, rng.random(2) < 0.05)
        now.add(*step)
        later.add(*step, defer=True)
        slot = (now.t - 1) % now.size  # held, not written (it still holds zeros or, after a wrap, an older frame)
        assert later.t == now.t - 1 and not torch.equal(later.frames[slot], now.frames[slot])
        read = t % 4
        if read == 0 and t > 40:  # sampling first: no other read flushes before it
            for rb in (now, later):
                rb.batch = rb.sample(16)
                if kind == "PrioritizedReplayBuffer":  # the loop's update: new priorities for the batch
                    idx, envs = rb.sample_indices(16)
                    rb.update_priorities(idx, envs, torch.arange(16.0) + t)
            for a, b in zip(now.batch, later.batch, strict=True):
                assert torch.equal(a, b)
        elif read == 1:
            a, b = now.state_dict(), later.state_dict()
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k] for k in a)
        elif read == 2:
            later.flush()  # where the loop flushes
            assert later.t == now.t
        else:
            assert later.valid_range() == now.valid_range() and later.t == now.t
    written = [module.save_replay_dataset(rb, str(tmp_path / name), "pong") for name, rb in (("now", now), ("later", later))]
    later.add(*step, defer=True)  # a held slot is dropped by a load: the loaded contents replace everything
    later.load_state_dict(now.state_dict())
    assert later.t == now.t and later.deferred is None
    assert len(written[0]) == 2
    for a, b in zip(*written, strict=True):
        files = sorted(os.path.relpath(os.path.join(d, f), a) for d, _, names in os.walk(a) for f in names)
        assert files and files == sorted(os.path.relpath(os.path.join(d, f), b) for d, _, names in os.walk(b) for f in names)
        for name in files:  # the gzip headers hold the time of writing: compare the contents
            with gzip.open(os.path.join(a, name)) as fa, gzip.open(os.path.join(b, name)) as fb:
                assert fa.read() == fb.read(), name


@pytest.mark.parametrize("script", ["dqn_softmoe", "rainbow_softmoe", "der_softmoe", "drq_softmoe"])
def test_a_replay_that_does_not_fit_is_refused_before_anything_is_created(script, tmp_path, monkeypatch):
    """The online scripts compare the replay's bytes (plus a GiB) with the memory where it would live: one line
    naming the bytes and the fix, and no run directory, instead of an out-of-memory error once running."""
    module = load_script(script)
    args = module.Args(buffer_size=100_000, total_timesteps=100_000, runs_dir=str(tmp_path / "runs"), cuda=False)
    capacity = module.replay_slots(args) if hasattr(module, "replay_slots") else args.buffer_size
    replay = module.PrioritizedReplayBuffer if getattr(args, "prioritized", False) else module.ReplayBuffer
    need = replay.nbytes(capacity) + 2**30
    monkeypatch.setattr(module, "available_memory", lambda device: (need - 1, "host memory is available"))
    with pytest.raises(ValueError) as error:
        module.prepare(args)
    assert str(error.value) == (f"the replay of {capacity:,} transitions needs {replay.nbytes(capacity) / 1e9:.2f} GB "
                                f"but {(need - 1) / 1e9:.1f} GB of host memory is available; lower --buffer-size")
    assert not (tmp_path / "runs").exists()
    monkeypatch.setattr(module, "available_memory", lambda device: (need, "host memory is available"))
    module.prepare(args)
    assert (tmp_path / "runs").exists()


SPLIT_DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])  # gpu_session.sh split runs the cuda cases


@pytest.mark.parametrize("device", SPLIT_DEVICES)
@pytest.mark.parametrize("script,kind", [("dqn_softmoe", "ReplayBuffer"), ("rainbow_softmoe", "PrioritizedReplayBuffer")])
@pytest.mark.parametrize("device_slots", [0, 1, 60, 149])
def test_a_split_replay_reads_as_one_on_the_device_alone(script, kind, device_slots, device, tmp_path):
    """SPEC §5 "as much as fits": with `device_slots` the frames of slots [device_slots, size) live in host memory. Every
    read (sampled batches, priorities, state_dict, a load, the dataset writer) gives what the replay on the device alone
    gives, before and after the write cursor wraps and crosses the split."""
    module = load_script(script)
    make = getattr(module, kind)
    whole, split = make(300, 2, device, n_step=3, seed=0), make(300, 2, device, n_step=3, seed=0, device_slots=device_slots)
    assert len(split.frames) == device_slots and len(split.host_frames) == 150 - device_slots
    assert split.host_frames.device.type == "cpu" and split.host_frames.is_pinned() == (device == "cuda")
    rng = np.random.default_rng(device_slots)
    for t in range(420):  # wraps at 150 slots per env
        step = (rng.integers(0, 256, (2, 84, 84), dtype=np.uint8), rng.integers(4, size=2), rng.normal(size=2),
                rng.random(2) < 0.05, rng.random(2) < 0.05)
        whole.add(*step, defer=t % 2 == 0)
        split.add(*step, defer=t % 2 == 0)
        if t > 30 and t % 7 == 0:
            batches = [rb.sample(16) for rb in (whole, split)]
            for a, b in zip(*batches, strict=True):
                assert a.device.type == device and torch.equal(a, b)
            if kind == "PrioritizedReplayBuffer":
                idx, envs = whole.sample_indices(16)
                assert torch.equal(whole.importance_weights(idx, envs), split.importance_weights(*split.sample_indices(16)))
                for rb in (whole, split):
                    rb.update_priorities(idx, envs, torch.arange(16.0, device=device) + t)
        if t in (100, 419):  # not yet full, then full
            a, b = whole.state_dict(), split.state_dict()
            assert a.keys() == b.keys() and all(torch.equal(a[k].cpu(), b[k].cpu()) if torch.is_tensor(a[k]) else a[k] == b[k] for k in a)
    slots = torch.arange(150, device=device)
    for env in range(2):
        assert torch.equal(split.read_frames(slots, env), whole.frames[:, env])
    # a checkpoint of either kind loads into the other
    for source, target in ((whole, make(300, 2, device, n_step=3, device_slots=device_slots)), (split, make(300, 2, device, n_step=3))):
        target.load_state_dict(source.state_dict())
        assert torch.equal(target.read_frames(slots[:, None], torch.arange(2, device=device)), whole.frames)
        assert all(torch.equal(a, b) for a, b in zip(target.sample(16), source.sample(16), strict=True))
    # the dataset writer (--save-replay) reads the frames through the split
    written = [module.save_replay_dataset(rb, str(tmp_path / name), "Pong") for name, rb in (("whole", whole), ("split", split))]
    for a, b in zip(*written, strict=True):
        for name in sorted(os.listdir(os.path.join(a, "replay_logs"))):
            with gzip.open(os.path.join(a, "replay_logs", name)) as fa, gzip.open(os.path.join(b, "replay_logs", name)) as fb:
                assert fa.read() == fb.read(), name


def test_a_split_replay_keeps_its_gather_eager_under_compile(dqn):
    """--compile fuses `gather` (fullgraph); a split replay's reads go through the host, so its `gather` stays eager."""
    whole, split = dqn.ReplayBuffer(100, 1, "cpu"), dqn.ReplayBuffer(100, 1, "cpu", device_slots=50)
    for rb in (whole, split):
        rb.compile()
    assert getattr(whole.gather, "__func__", None) is not dqn.ReplayBuffer.gather  # the compiled wrapper
    assert split.gather.__func__ is dqn.ReplayBuffer.gather


@pytest.mark.parametrize("script", ["dqn_softmoe", "rainbow_softmoe", "der_softmoe", "drq_softmoe"])
def test_a_replay_too_large_for_the_gpu_keeps_as_much_as_fits_there(script, monkeypatch):
    """SPEC §5: on a GPU, the whole replay, or the frames of as many slots as fit with a GiB to spare; the rest in host
    memory, and a refusal when even both together cannot hold it. Hand-computed for 100,000 transitions over 2 envs:
    50,000 slots of 2 x 7,056 bytes of frames, and the other 7 bytes per transition (plus Rainbow's sum tree)."""
    module = load_script(script)
    gib, free = 2**30, {"cuda": 0, "cpu": 0}
    monkeypatch.setattr(module.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(module, "available_memory", lambda device: (free[torch.device(device).type], "host memory is available"))
    args = module.Args(buffer_size=100_000, total_timesteps=100_000, num_envs=2)
    capacity = module.replay_slots(args) if hasattr(module, "replay_slots") else args.buffer_size
    assert capacity == 100_000
    replay = module.PrioritizedReplayBuffer if getattr(args, "prioritized", False) else module.ReplayBuffer
    nbytes, slot = replay.nbytes(capacity), 2 * 84 * 84
    rest = 700_000 + (2 * 2**17 * 8 if replay is not module.ReplayBuffer else 0)  # 7 bytes per transition (+ the tree)
    assert nbytes == 50_000 * slot + rest
    free["cpu"] = 10**12
    free["cuda"] = nbytes + gib  # all of it fits
    assert module.check_replay_memory(args, capacity, nbytes) is None
    free["cuda"] = nbytes + gib - 1  # one byte short: all slots but one
    assert module.check_replay_memory(args, capacity, nbytes) == 49_999
    free["cuda"] = gib + rest + 1_000 * slot + slot - 1
    assert module.check_replay_memory(args, capacity, nbytes) == 1_000
    free["cuda"] = gib + rest  # the flags alone: every frame in host memory
    assert module.check_replay_memory(args, capacity, nbytes) == 0
    free["cuda"] = gib + rest - 1
    with pytest.raises(ValueError, match=rf"^1\.1 GB of GPU memory is free, too little for the networks and the "
                                         rf"replay's {rest / 1e6:.1f} MB of actions, rewards and flags; free the GPU or "
                                         r"run with --no-cuda$"):
        module.check_replay_memory(args, capacity, nbytes)
    free["cuda"], free["cpu"] = gib + rest + 1_000 * slot, gib + 49_000 * slot - 1  # host memory one byte short
    with pytest.raises(ValueError, match=r"^the replay of 100,000 transitions needs 0\.71 GB: the GPU holds 0\.0\d GB, "
                                         r"and the other 0\.69 GB and a GiB to spare exceed the 1\.8 GB of host memory "
                                         r"available; lower --buffer-size$"):
        module.check_replay_memory(args, capacity, nbytes)
    free["cpu"] += 1
    assert module.check_replay_memory(args, capacity, nbytes) == 1_000
    # --gpu-replay-fraction sets the GPU's share instead, and is refused where that share does not fit
    free["cuda"], free["cpu"] = 10**12, 10**12
    args.gpu_replay_fraction = 0.25
    assert module.check_replay_memory(args, capacity, nbytes) == 12_500
    args.gpu_replay_fraction = 1.0
    assert module.check_replay_memory(args, capacity, nbytes) is None
    free["cuda"] = gib + rest + 12_500 * slot - 1
    args.gpu_replay_fraction = 0.25
    with pytest.raises(ValueError, match=r"^--gpu-replay-fraction 0\.25 keeps 0\.18 GB of the replay on the GPU; with a "
                                         r"GiB to spare that exceeds the 1\.3 GB of GPU memory free; lower "
                                         r"--gpu-replay-fraction$"):
        module.check_replay_memory(args, capacity, nbytes)
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match=rf"^--gpu-replay-fraction must be in \[0, 1\], got {bad}$"):
            module.check_args(module.Args(gpu_replay_fraction=bad))


@pytest.mark.parametrize("script", ["dqn_softmoe", "rainbow_softmoe", "der_softmoe", "drq_softmoe"])
def test_gpu_replay_fraction_is_refused_on_the_cpu(script, tmp_path):
    module = load_script(script)
    args = module.Args(gpu_replay_fraction=0.5, cuda=False, runs_dir=str(tmp_path / "runs"))
    with pytest.raises(ValueError, match=r"^--gpu-replay-fraction splits the replay between a GPU and host memory and "
                                         r"this run is on the CPU; drop --gpu-replay-fraction$"):
        module.prepare(args)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("script", ["dqn_softmoe", "rainbow_softmoe", "der_softmoe", "drq_softmoe"])
def test_runs_sharing_a_gpu_place_their_replays_one_at_a_time(script, tmp_path, monkeypatch):
    """Runs started together on one GPU would all see the same free memory: `build_agent` measures it and allocates
    the replay under an exclusive lock named after the GPU, so each run sees what the ones before it took."""
    import threading
    import types

    module = load_script(script)
    monkeypatch.setattr(module.tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(module.torch.cuda, "get_device_properties", lambda device: types.SimpleNamespace(uuid="GPU-1"))
    gpu, entered = torch.device("cuda"), threading.Event()

    def second_run():
        with module.gpu_lock(gpu):
            entered.set()

    with module.gpu_lock(gpu):
        thread = threading.Thread(target=second_run)
        thread.start()
        assert not entered.wait(0.5)  # waits while the first run holds the lock
        with module.gpu_lock(torch.device("cpu")):  # the CPU takes no lock
            pass
    assert entered.wait(30)
    thread.join()
    assert os.listdir(tmp_path) == ["softmoe-gpu-GPU-1.lock"]
