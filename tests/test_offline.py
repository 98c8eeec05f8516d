"""cql_softmoe.py and the DQN Replay Dataset (SPEC §4, Offline): the reader against files written exactly as Dopamine
writes them, the online scripts' writer (--save-replay), data fractions, the CQL term, real short offline runs, exact
resume, and bad data giving one clear line."""

import glob
import gzip
import json
import os
import re
import signal

import numpy as np
import pytest
import torch

from conftest import load_script, read_scalars, run_script, signalled_at


@pytest.fixture(scope="module")
def cql():
    return load_script("cql_softmoe")


def label(t, run=1):
    """A frame naming (time, run) in its first three pixels; never all zero, so zero frames mean padding."""
    frame = np.random.default_rng(t).integers(1, 256, (84, 84), dtype=np.uint8)
    frame[0, :3] = 1 + t % 250, 1 + t // 250 % 250, run
    return frame


def name_of(frame):
    """(time, run) of a `label` frame, None for a zero frame."""
    return None if not frame.any() else (int(frame[0, 0]) - 1 + 250 * (int(frame[0, 1]) - 1), int(frame[0, 2]))


class DopamineLoggedBuffer:
    """What logged the public dataset, in numpy: Dopamine's OutOfGraphReplayBuffer (`add` writes stack_size - 1 = 3 zero
    transitions after every terminal and into an empty buffer, storage is circular, `add_count` counts every add) and
    batch_rl's OutOfGraphLoggedReplayBuffer (after each `add`, a checkpoint when add_count % capacity == capacity - 1,
    and a final one with add_count = cursor). Every file is a gzip of np.save(allow_pickle=False), as Dopamine's."""

    def __init__(self, log_dir, capacity):
        self.log_dir, self.capacity, self.log_count = log_dir, capacity, 0
        os.makedirs(log_dir, exist_ok=True)
        self.store = {"observation": np.empty((capacity, 84, 84), np.uint8), "action": np.empty(capacity, np.int32),
                      "reward": np.empty(capacity, np.float32), "terminal": np.empty(capacity, np.uint8)}
        self.add_count, self.invalid_range = np.array(0), np.zeros(4)

    def cursor(self):
        return int(self.add_count) % self.capacity

    def _add(self, observation, action, reward, terminal):
        for key, value in zip(self.store, (observation, action, reward, terminal)):
            self.store[key][self.cursor()] = value
        self.add_count += 1
        self.invalid_range = np.array([(self.cursor() - 1 + i) % self.capacity for i in range(4 + 1)])

    def add(self, observation, action, reward, terminal):
        if self.add_count == 0 or self.store["terminal"][self.cursor() - 1] == 1:
            for _ in range(3):
                self._add(np.zeros((84, 84), np.uint8), 0, 0.0, 0)
        self._add(observation, action, reward, terminal)
        if int(self.add_count) % self.capacity == self.capacity - 1:
            self.log()

    def log(self):
        arrays = {**{f"$store$_{k}": v for k, v in self.store.items()}, "add_count": self.add_count,
                  "invalid_range": self.invalid_range}
        for name, array in arrays.items():
            with open(os.path.join(self.log_dir, f"{name}_ckpt.{self.log_count}.gz"), "wb") as f:
                with gzip.GzipFile(fileobj=f, mode="wb") as outfile:  # Dopamine infers the mode from `f`
                    np.save(outfile, array, allow_pickle=False)
        self.log_count += 1

    def log_final(self):
        add_count, self.add_count = self.add_count, np.array(self.cursor())
        self.log()
        self.add_count = add_count


def play(buffer, steps, seed, run=1):
    """Episodes of 4 to 40 steps as Dopamine's runner stores them: (observation acted on, action, clipped reward),
    terminal on the last one. Returns the (time) labels of every stored transition."""
    rng = np.random.default_rng(seed)
    t = 0
    while t < steps:
        length = int(rng.integers(4, 41))
        for k in range(length):
            buffer.add(label(t, run), int(rng.integers(6)), float(rng.integers(-1, 2)), int(k == length - 1))
            t += 1
    return t


def dopamine_sample(files, index, n, gamma, ended_window=False):
    """Dopamine's is_valid_transition and sample_transition_batch for one index of one loaded checkpoint (the
    reference's logic, in numpy): None if invalid, else (state, action, n-step return, terminal, next state).
    `ended_window`: also allow one of the newest n transitions whose window a terminal ends (Dopamine drops them)."""
    store, add_count = files["store"], int(files["add_count"])
    capacity = len(store["terminal"])
    cursor = add_count % capacity
    full = add_count >= capacity
    newest = (cursor - index - 1) % capacity  # transitions stored after this one
    reach = n  # rows after the index that the window and next state need
    if ended_window and newest < n and store["terminal"][[(index + j) % capacity for j in range(newest + 1)]].any():
        reach = newest  # the window stops at that terminal; what follows the newest row is never read
    if not full and (index >= cursor - reach or index < 3):
        return None
    if full and not (0 <= (index - cursor) % capacity - 3 < capacity - 3 - reach):  # randint(cursor - cap + 3, cursor - n)
        return None
    if reach == n and index in set(files["invalid_range"].tolist()):  # the newest rows: unknown futures
        return None
    stack = lambda i: np.stack([store["observation"][(i - 3 + j) % capacity] for j in range(4)])
    if store["terminal"][[(index - 3 + j) % capacity for j in range(3)]].any():
        return None
    terminals = store["terminal"][[(index + j) % capacity for j in range(n)]]
    length = int(np.argmax(terminals)) + 1 if terminals.any() else n
    rewards = store["reward"][[(index + j) % capacity for j in range(length)]]
    ret = float((gamma ** np.arange(length) * rewards).sum())
    return stack(index), int(store["action"][index]), ret, bool(terminals.any()), stack((index + length) % capacity)


def read_checkpoint(log_dir, n):
    load = lambda name: np.load(gzip.open(os.path.join(log_dir, f"{name}_ckpt.{n}.gz")), allow_pickle=False)
    return {"store": {k: load(f"$store$_{k}") for k in ("observation", "action", "reward", "terminal")},
            "add_count": load("add_count"), "invalid_range": load("invalid_range")}


def fill(cql, records, n_step=3, gamma=0.9):
    rb = cql.FixedReplay(max(sum(r["rows"] for r in records), n_step + 5), "cpu", n_step, gamma, seed=0)
    rb.starts = cql.load_dataset(rb, records, workers=2)
    return rb


def slots_of(records):
    """(run, checkpoint, storage row) -> the logical slot `load_dataset` puts it in (pieces one after another)."""
    ours, slot = {}, 0
    for record in records:
        for a, b in record["chunks"]:
            ours.update({(record["run"], record["checkpoint"], row): slot + row - a for row in range(a, b)})
            slot += b - a
    return ours


# ---------------------------------------------------------------- reading the public layout


@pytest.mark.parametrize("n_step", [1, 3])
def test_loader_matches_dopamines_sampler_on_a_logged_dataset(cql, tmp_path, n_step):
    """A dataset logged as the public one was (circular buffer of capacity 200 with its padding, 4 checkpoints, the
    last one partial): every transition Dopamine's sampler may draw, we may draw too, with the same stacked state,
    action, n-step return, terminal and next state. We also allow the 4th transition of a wrapped checkpoint, whose
    stack lies in it entirely (Dopamine's invalid_range drops it)."""
    gamma, log_dir = 0.9, tmp_path / "Pong" / "1" / "replay_logs"
    buffer = DopamineLoggedBuffer(str(log_dir), capacity=200)
    play(buffer, 700, seed=0)
    buffer.log_final()
    assert buffer.log_count == 4
    _, runs = cql.find_dataset_runs(str(tmp_path), "Pong")
    records = cql.scan_dataset(runs, (), 1.0, num_actions=6, selection="first")
    assert [r["checkpoint"] for r in records] == [0, 1, 2, 3]
    # logged when add_count % 200 == 199 after an add (padding can jump past it: batch_rl then skips a cycle)
    assert [r["add_count"] % 200 for r in records] == [199, 199, 199, int(buffer.add_count) % 200]
    rb = fill(cql, records, n_step, gamma)
    ours = {key[1:]: slot for key, slot in slots_of(records).items()}  # (checkpoint, storage row) -> logical slot
    starts = set(rb.starts.tolist())
    expected = []
    for record in records:
        files = read_checkpoint(str(log_dir), record["checkpoint"])
        wrapped = int(files["add_count"]) >= 200
        for row in range(200):
            reference = dopamine_sample(files, row, n_step, gamma, ended_window=True)
            key = (record["checkpoint"], row)
            if reference is None:
                fourth = wrapped and (row - int(files["add_count"])) % 200 == 3
                assert key not in ours or ours[key] not in starts or fourth, key
            else:
                assert ours[key] in starts, key
                expected.append((ours[key], reference))
    idx = torch.tensor([slot for slot, _ in expected])
    batch = rb.gather(idx, torch.zeros_like(idx))
    for (slot, (state, action, ret, terminal, next_state)), got in zip(expected, zip(*batch)):
        states, actions, returns, discounts, next_states = got
        assert np.array_equal(states.numpy(), state) and actions.item() == action, slot
        assert returns.item() == pytest.approx(ret, abs=1e-5) and (discounts.item() == 0) == terminal, slot
        if not terminal:
            assert discounts.item() == pytest.approx(gamma**n_step)
            assert np.array_equal(next_states.numpy(), next_state), slot
    compared = len(expected)
    assert compared > 500 and len(starts) - compared <= 3  # the three wrapped checkpoints' 4th transitions at most


def test_padding_becomes_last_slots_and_episode_boundaries_hold(cql, tmp_path):
    """The 3 zero transitions before each episode are never sampled and never bootstrap; the terminal at an episode's
    end stops the return; stacks at an episode's start hold zeros before its first frame."""
    log_dir = tmp_path / "Breakout" / "3" / "replay_logs"
    buffer = DopamineLoggedBuffer(str(log_dir), capacity=500)
    steps = play(buffer, 300, seed=1, run=3)
    buffer.log_final()
    (record,) = cql.scan_dataset(cql.find_dataset_runs(str(tmp_path), "breakout")[1], (), 1.0, num_actions=6, selection="first")
    assert record["add_count"] == int(buffer.add_count) and record["rows"] == record["add_count"]
    rb = fill(cql, [record], n_step=3)
    terminal = rb.terminals[: rb.t, 0].numpy()
    pads = np.flatnonzero(rb.last[: rb.t, 0].numpy())
    ends = np.flatnonzero(terminal)
    assert len(pads) == 3 * len(ends[ends < rb.t - 3]) and not (rb.frames[pads, 0] != 0).any()
    assert not set(pads.tolist()) & set(rb.starts.tolist())
    episode_start = ends[0] + 4  # first frame of the second episode
    states, _, _, discounts, _ = rb.gather(torch.tensor([episode_start, ends[1]]), torch.zeros(2, dtype=torch.long))
    assert [name_of(f.numpy()) for f in states[0]][:3] == [None] * 3 and name_of(states[0, 3].numpy())[1] == 3
    assert discounts[1] == 0  # an episode's last transition does not bootstrap
    names = {name_of(rb.frames[s, 0].numpy()) for s in range(rb.t)} - {None}
    assert names == {(t, 3) for t in range(steps)}


# ---------------------------------------------------------------- writing (--save-replay)


def drive(rb, steps, rng, num_envs):
    """The online training loop's writes: the step after an episode's end stores its final observation (last=True);
    some episodes end in a terminal, some are truncated. Returns every (slot, env) whose transition was truncated."""
    was_done = np.zeros(num_envs, dtype=bool)
    for t in range(steps):
        terminal = (rng.random(num_envs) < 0.06) & ~was_done
        truncated = (rng.random(num_envs) < 0.03) & ~was_done & ~terminal
        frames = np.stack([label(t, e + 1) for e in range(num_envs)])
        rb.add(frames, rng.integers(6, size=num_envs), rng.normal(size=num_envs), terminal, was_done)
        was_done = terminal | truncated


@pytest.mark.parametrize("wrapped", [False, True])
def test_writer_round_trip_keeps_every_transition(cql, tmp_path, monkeypatch, wrapped):
    """The online replay (2 envs, terminals, truncations, final observations, maybe wrapped around) written with
    checkpoint files of 120 transitions, read back: every transition the online replay could sample comes back with
    the same state, action, return, discount and next state, except that a truncated episode's last transitions end
    with a terminal, as in the DQN Replay Dataset. Files: Dopamine's names, dtypes, add_count and invalid_range."""
    monkeypatch.setattr(cql, "DATASET_CAPACITY", 120)
    n, gamma = 3, 0.9
    online = cql.ReplayBuffer(2 * 300, 2, "cpu", n_step=n, gamma=gamma)
    drive(online, 420 if wrapped else 290, np.random.default_rng(4), 2)
    written = cql.save_replay_dataset(online, str(tmp_path), "SpaceInvaders")
    assert written == [str(tmp_path / "SpaceInvaders" / "1"), str(tmp_path / "SpaceInvaders" / "2")]
    assert not glob.glob(f"{tmp_path}/**/*.tmp", recursive=True)
    for run_dir in written:
        files = sorted(os.listdir(f"{run_dir}/replay_logs"))
        assert len(files) % 6 == 0 and "$store$_observation_ckpt.0.gz" in files and "invalid_range_ckpt.0.gz" in files
        last = read_checkpoint(f"{run_dir}/replay_logs", len(files) // 6 - 1)
        assert last["add_count"].dtype == np.int64 and last["add_count"].shape == ()
        rows = int(last["add_count"])
        assert last["invalid_range"].tolist() == [(rows - 1 + i) % 120 for i in range(5)]
        assert {k: v.dtype for k, v in last["store"].items()} == {"observation": np.uint8, "action": np.int32,
                                                                   "reward": np.float32, "terminal": np.uint8}
    first = read_checkpoint(f"{written[0]}/replay_logs", 0)
    assert int(first["add_count"]) == 120  # padding first unless the replay had wrapped around
    assert (not first["store"]["observation"][:3].any()) == (not wrapped)
    _, runs = cql.find_dataset_runs(str(tmp_path), "SpaceInvaders")
    records = cql.scan_dataset(runs, (), 1.0, num_actions=6, selection="first")
    loaded = fill(cql, records, n, gamma)
    where = {name_of(loaded.frames[s, 0].numpy()): s for s in range(loaded.t)}
    starts = set(loaded.starts.tolist())
    lo, hi = online.valid_range()
    pairs = [(t, env) for t in range(lo, hi + 1) for env in range(2) if not online.last[t % online.size, env]]
    slots = [where[name_of(online.frames[t % online.size, env].numpy())] for t, env in pairs]
    kept = [i for i, slot in enumerate(slots) if slot in starts]  # a file's first 3 and last n slots: context only
    assert len(kept) > len(pairs) - 2 * (3 + n) * len(records) - 6
    a = online.gather(torch.tensor([pairs[i][0] for i in kept]), torch.tensor([pairs[i][1] for i in kept]))
    b = loaded.gather(torch.tensor([slots[i] for i in kept]), torch.zeros(len(kept), dtype=torch.long))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])  # states, actions
    torch.testing.assert_close(a[2], b[2])  # n-step returns
    truncated = (a[3] > 0) & (b[3] == 0)  # the window ends in a truncation: a terminal in the dataset
    assert truncated.any() and torch.equal(a[3][~truncated], b[3][~truncated])
    bootstrapped = b[3] > 0  # no next state after a terminal
    assert torch.equal(a[4][bootstrapped], b[4][bootstrapped])


def test_streamed_observation_file_is_byte_identical_to_np_save(cql, tmp_path):
    frames = np.stack([label(t) for t in range(10)])
    cql.write_npy_gz(str(tmp_path / "streamed.gz"), shape=frames.shape, blocks=[frames[:4], frames[4:]])
    cql.write_npy_gz(str(tmp_path / "saved.gz"), frames)
    assert gzip.open(tmp_path / "streamed.gz").read() == gzip.open(tmp_path / "saved.gz").read()


# ---------------------------------------------------------------- fractions


def test_fraction_takes_each_checkpoints_first_rows_and_never_mixes_checkpoints(cql, tmp_path):
    """Two runs, 4 checkpoints each (3 wrapped): 30% loads round(0.3 x stored) of every checkpoint, its first storage
    rows (the reference's store[:capacity]); sampled states and next states never hold frames of two checkpoints."""
    logged = {}
    for run in (1, 2):
        buffer = DopamineLoggedBuffer(str(tmp_path / "Pong" / str(run) / "replay_logs"), capacity=150)
        play(buffer, 520, seed=run, run=run)
        buffer.log_final()
        for n in range(buffer.log_count):
            files = read_checkpoint(str(tmp_path / "Pong" / str(run) / "replay_logs"), n)
            logged[run, n] = files
    _, runs = cql.find_dataset_runs(str(tmp_path), "Pong")
    records = cql.scan_dataset(runs, (), 0.3, num_actions=6, selection="first")
    assert len(records) == len(logged) == 8
    stored = {(r["run"], r["checkpoint"]): min(int(f["add_count"]), 150) for (r, f) in zip(records, logged.values())}
    assert [r["rows"] for r in records] == [int(0.3 * s + 0.5) for s in stored.values()]
    rb = fill(cql, records, n_step=3)
    assert rb.t == sum(r["rows"] for r in records) == pytest.approx(0.3 * sum(stored.values()), abs=len(records))
    home = {}  # frame name -> (run, checkpoint) it was logged in, for the rows loaded
    for (run, n), files in logged.items():
        rows = next(r["rows"] for r in records if (r["run"], r["checkpoint"]) == (run, n))
        for row in range(rows):
            home.setdefault(name_of(files["store"]["observation"][row]), (run, n))
    assert {name_of(rb.frames[s, 0].numpy()) for s in range(rb.t)} - {None} == set(home) - {None}
    states, _, _, discounts, next_states = rb.sample(4096)
    for state, discount, next_state in zip(states, discounts, next_states):
        homes = {home[name_of(f.numpy())] for f in state if f.any()}
        assert len(homes) == 1, homes  # its last frame at least is a real one
        if discount > 0:  # after a terminal, the next state is never used
            assert {home[name_of(f.numpy())] for f in next_state if f.any()} == homes
    frames = lambda c: {name_of(f.numpy()) for f in states[:, c]}
    assert frames(0) - {None} and (frames(0) - {None}) <= set(home)


@pytest.mark.parametrize("fraction", [1.0, 0.5])
def test_a_checkpoint_wrapped_mid_file_is_read_oldest_first_in_separate_pieces(cql, tmp_path, fraction):
    """A checkpoint saved with its cursor mid-file (Dopamine's save of a wrapped buffer): rows [cursor, rows) are the
    oldest, then [0, cursor). Without all rows the two pieces are not contiguous in time: no stack or window spans them."""
    buffer = DopamineLoggedBuffer(str(tmp_path / "Pong" / "1" / "replay_logs"), capacity=200)
    t = play(buffer, 200, seed=3)
    while buffer.cursor() != 40:  # one long episode up to a cursor of 40, in the buffer's second pass
        buffer.add(label(t), 1, 0.0, 0)
        t += 1
    buffer.log_count = 0
    buffer.log()  # as Dopamine's OutOfGraphReplayBuffer.save writes it, cursor where it stands
    cursor, rows = buffer.cursor(), int(fraction * 200 + 0.5)
    assert 4 < cursor < rows - 4
    (record,) = cql.scan_dataset(cql.find_dataset_runs(str(tmp_path), "Pong")[1], (0,), fraction, num_actions=6, selection="first")
    assert record["chunks"] == [(cursor, rows), (0, cursor)]
    rb = fill(cql, [record], n_step=3)
    times = [name_of(rb.frames[s, 0].numpy()) for s in range(rb.t)]
    real = [t for t, _ in filter(None, times)]
    assert real == sorted(real)  # oldest first
    contiguous = fraction == 1.0  # a gap in time between the pieces when rows are missing
    states, _, _, discounts, next_states = rb.sample(2048)
    for stack in torch.cat([states, next_states[discounts > 0]]):
        seen = [name_of(f.numpy())[0] for f in stack if f.any()]
        assert contiguous or all(b - a == 1 for a, b in zip(seen, seen[1:])), seen


@pytest.mark.parametrize("n_step", [1, 3])
def test_random_selection_loads_whole_episodes_that_dopamines_sampler_would_draw(cql, tmp_path, n_step):
    """--data-selection random (the paper's "drawn randomly"): 30% of each checkpoint's stored rows, as whole episodes
    drawn at random, only the last one drawn cut short; different per seed, the same for a seed. Every start it allows
    is one Dopamine's sampler allows on the full checkpoint, with the same state, action, return and next state."""
    gamma, logged = 0.9, {}
    for run in (1, 2):
        log_dir = tmp_path / "Pong" / str(run) / "replay_logs"
        buffer = DopamineLoggedBuffer(str(log_dir), capacity=150)
        play(buffer, 520, seed=run, run=run)
        buffer.log_final()
        logged.update({(run, n): read_checkpoint(str(log_dir), n) for n in range(buffer.log_count)})
    _, runs = cql.find_dataset_runs(str(tmp_path), "Pong")
    records = cql.scan_dataset(runs, (), 0.3, 6, "random", seed=7)
    first = cql.scan_dataset(runs, (), 0.3, 6, "first", seed=7)
    assert [r["rows"] for r in records] == [r["rows"] for r in first]
    assert [r["chunks"] for r in records] == [r["chunks"] for r in cql.scan_dataset(runs, (), 0.3, 6, "random", seed=7)]
    assert [r["chunks"] for r in records] != [r["chunks"] for r in cql.scan_dataset(runs, (), 0.3, 6, "random", seed=8)]
    for record in records:
        files = logged[record["run"], record["checkpoint"]]
        terminal = files["store"]["terminal"].astype(bool)
        add_count = int(files["add_count"])
        oldest = add_count % 150 if add_count >= 150 else 0
        newest = (add_count - 1) % 150
        assert sum(b - a for a, b in record["chunks"]) == record["rows"]
        starts_episode = [a == oldest or terminal[a - 1] for a, _ in record["chunks"]]
        ends_episode = [b - 1 == newest or b == 150 or terminal[b - 1] for _, b in record["chunks"]]  # 150: wraps
        assert all(starts_episode) and sum(not e for e in ends_episode) <= 1  # only the last drawn is cut
    assert sum(r["chunks"] != f["chunks"] for r, f in zip(records, first)) >= len(records) - 2  # not the first rows
    rb = fill(cql, records, n_step, gamma)
    slot_of = slots_of(records)
    key_of = {slot: key for key, slot in slot_of.items()}
    starts = rb.starts.tolist()
    padding = 3 * int(rb.terminals[: rb.t].sum())  # the zero transitions after each terminal
    pieces = [b - a for r in records for a, b in r["chunks"]]
    ends = torch.as_tensor(np.cumsum(pieces) - 1)
    open_ends = int((~rb.terminals[ends, 0]).sum())  # pieces not ending in a terminal: their last n start nothing
    assert len(starts) >= rb.t - padding - 3 * len(pieces) - n_step * open_ends
    assert set(ends[rb.terminals[ends, 0]].tolist()) <= set(starts)  # an episode's last transition is drawn
    expected = [dopamine_sample(logged[key_of[s][:2]], key_of[s][2], n_step, gamma, True) for s in starts]
    assert None not in expected
    batch = rb.gather(torch.tensor(starts), torch.zeros(len(starts), dtype=torch.long))
    for (state, action, ret, terminal, next_state), got in zip(expected, zip(*batch)):
        states, actions, returns, discounts, next_states = got
        assert np.array_equal(states.numpy(), state) and actions.item() == action
        assert returns.item() == pytest.approx(ret, abs=1e-5) and (discounts.item() == 0) == terminal
        if not terminal:
            assert np.array_equal(next_states.numpy(), next_state)


def test_random_selection_splits_an_episode_where_a_circular_file_wraps(cql):
    """Positions are chronological (oldest row = the cursor); an episode drawn across the file's end becomes two
    pieces, oldest first; adjacent episodes join one piece."""
    terminal = np.zeros(20, dtype=np.uint8)
    terminal[[2, 9, 14]] = 1  # chronological from cursor 12: rows 12-14 | 15-19, 0-2 | 3-9 | 10-11
    pieces = cql.random_episodes(terminal, 12, 20, 20, np.random.default_rng(0))
    assert pieces == [(12, 20), (0, 12)]
    for seed in range(20):
        pieces = cql.random_episodes(terminal, 12, 20, 8, np.random.default_rng(seed))
        rows = [row for a, b in pieces for row in range(a, b)]
        assert len(rows) == len(set(rows)) == 8
        if (15, 20) in pieces:  # the episode across the wrap, whole or cut
            assert pieces[pieces.index((15, 20)) + 1][0] == 0


def test_run_and_checkpoint_selection(cql, tmp_path):
    for run in (1, 2, 5):
        buffer = DopamineLoggedBuffer(str(tmp_path / "Pong" / str(run) / "replay_logs"), capacity=100)
        play(buffer, 250, seed=run, run=run)
        buffer.log_final()
    (tmp_path / "Pong" / "7").mkdir()  # a run being written (no replay_logs yet) is not a run
    game_dir, runs = cql.find_dataset_runs(str(tmp_path), "pong")
    assert sorted(runs) == [1, 2, 5]
    records = cql.scan_dataset({2: runs[2]}, (0, 2), 0.5, num_actions=6, selection="first")
    assert [(r["run"], r["checkpoint"]) for r in records] == [(2, 0), (2, 2)]
    assert len(cql.scan_dataset({1: runs[1], 5: runs[5]}, (), 0.5, num_actions=6, selection="first")) == 4 + 3
    with pytest.raises(cql.DatasetError, match=r"2/replay_logs/\$store\$_observation_ckpt.3.gz: missing"):
        cql.scan_dataset({2: runs[2]}, (3,), 0.5, num_actions=6, selection="first")


# ---------------------------------------------------------------- the CQL term


def tiny_args(cql, **flags):
    return cql.with_agent_defaults(cql.Args(encoder="nature", moe_type="baseline", num_experts=1, expert_hidden=16, **flags))


def batch_of(size, num_actions, gen):
    return (torch.randint(0, 255, (size, 4, 84, 84), dtype=torch.uint8, generator=gen),
            torch.randint(0, num_actions, (size,), generator=gen), torch.randn(size, generator=gen),
            torch.tensor([0.99, 0.0, 0.99, 0.97, 0.99, 0.0])[:size], torch.randint(0, 255, (size, 4, 84, 84), dtype=torch.uint8, generator=gen))


def test_cql_term_and_huber_td_by_hand(cql):
    torch.manual_seed(0)
    args = tiny_args(cql)
    assert (args.learning_rate, args.adam_eps, args.n_step, args.target_update_period) == (5e-5, 3.125e-4, 1, 2000)
    online, target = cql.QNetwork(args, 4), cql.QNetwork(args, 4)
    batch = batch_of(6, 4, torch.Generator().manual_seed(1))
    td, term, aux, q_mean = cql.offline_losses(online, target, batch, args)
    q, q_next = online(batch[0]).detach().double(), target(batch[4]).detach().double()
    by_hand_term, by_hand_td = 0.0, 0.0
    for b in range(6):
        chosen = q[b, batch[1][b]]
        by_hand_term += (np.log(sum(np.exp(v) for v in q[b].tolist())) - chosen.item()) / 6
        error = abs(batch[2][b].item() + batch[3][b].item() * q_next[b].max().item() - chosen.item())
        by_hand_td += (0.5 * error**2 if error < 1 else error - 0.5) / 6
    assert term.item() == pytest.approx(by_hand_term, rel=1e-5) and td.item() == pytest.approx(by_hand_td, rel=1e-5)
    assert q_mean.item() == pytest.approx(q[torch.arange(6), batch[1]].mean().item(), rel=1e-5) and aux.item() == 0
    (td + term).backward()
    assert online.head.weight.grad.abs().sum() > 0 and all(p.grad is None for p in target.parameters())


@pytest.mark.parametrize("agent", ["cql", "cql-c51"])
@pytest.mark.parametrize("flags", [dict(moe_type="baseline"), dict(), dict(moe_type="top1", tokenization="perfeat"),
                                   dict(expert_variant="big"), dict(expert_variant="all")])
def test_networks_of_both_agents(cql, agent, flags):
    """cql: Q-values from DQN's head (each expert's own with big/all); cql-c51: dueling C51 log-probabilities, no noise."""
    torch.manual_seed(0)
    args = cql.with_agent_defaults(cql.Args(encoder="nature", num_experts=2, expert_hidden=16, agent=agent, **flags))
    net = cql.QNetwork(args, 5)
    frames = torch.randint(0, 255, (3, 4, 84, 84), dtype=torch.uint8)
    out, info = net(frames, return_info=True)
    assert out.shape == ((3, 5, 51) if agent == "cql-c51" else (3, 5)) and info["features"].shape[0] == 3
    q = net.q_values(frames)
    torch.testing.assert_close(q, (out.exp() * net.support).sum(-1) if agent == "cql-c51" else out)
    torch.testing.assert_close(net(frames), out, rtol=0, atol=0)  # no noise anywhere
    heads = [name for name, _ in net.named_parameters() if name.startswith(("head.", "value.", "advantage."))]
    assert sorted({h.split(".")[0] for h in heads}) == (["advantage", "value"] if agent == "cql-c51" else ["head"])


def test_cql_c51_term_uses_the_expected_q(cql):
    torch.manual_seed(0)
    args = tiny_args(cql, agent="cql-c51")
    assert (args.learning_rate, args.adam_eps, args.n_step, args.target_update_period) == (6.25e-5, 1.5e-4, 3, 100)
    online, target = cql.QNetwork(args, 3), cql.QNetwork(args, 3)
    assert hasattr(online, "value") and hasattr(online, "advantage")  # dueling
    batch = batch_of(6, 3, torch.Generator().manual_seed(2))
    td, term, _, q_mean = cql.offline_losses(online, target, batch, args)
    log_probs = online(batch[0]).detach().double()
    support = torch.linspace(-10, 10, 51, dtype=torch.float64)
    expected = [[sum(p * z for p, z in zip(log_probs[b, a].exp().tolist(), support.tolist())) for a in range(3)] for b in range(6)]
    by_hand = np.mean([np.log(sum(np.exp(v) for v in row)) - row[a] for row, a in zip(expected, batch[1].tolist())])
    assert term.item() == pytest.approx(by_hand, rel=1e-5)
    assert q_mean.item() == pytest.approx(np.mean([row[a] for row, a in zip(expected, batch[1].tolist())]), rel=1e-5)
    target_dist = cql.c51_target(online, target, batch[4], batch[2], batch[3], online.support, double_q=True)
    assert td.item() == pytest.approx(-(target_dist.double() * log_probs[torch.arange(6), batch[1]]).sum(1).mean().item(), rel=1e-5)


# ---------------------------------------------------------------- real runs

BASE = ["--encoder", "nature", "--num-experts", "2", "--eval-episodes", "1", "--log-every", "10", "--print-every", "10"]


@pytest.fixture(scope="module")
def pong_dataset(tmp_path_factory):
    """A tiny dataset made by the DQN script: 2 envs on Pong, 260 steps each, one run directory per env."""
    root = tmp_path_factory.mktemp("data")
    result = run_script("dqn_softmoe", "--env-id", "Pong", "--encoder", "nature", "--num-envs", "2", "--total-timesteps",
                        "520", "--learning-starts", "600", "--buffer-size", "1000", "--metrics-every", "0",
                        "--runs-dir", str(root / "runs"), "--save-replay", str(root))
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"replay written to {root}/Pong/1, {root}/Pong/2" in result.stdout
    return root


def test_short_cql_run_on_a_dataset_of_the_dqn_script(pong_dataset, tmp_path):
    result = run_script("cql_softmoe", "--dataset-dir", str(pong_dataset), "--game", "Pong", *BASE, "--num-iterations",
                        "2", "--gradient-steps-per-iteration", "20", "--metrics-every", "20", "--data-fraction", "0.5",
                        "--seed", "2", "--runs-dir", str(tmp_path), "--save-model")
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = glob.glob(f"{tmp_path}/Pong__cql_softmoe__2__*")
    summary = json.load(open(f"{run_dir}/summary.json"))
    assert summary["dataset"] == {"runs": [2], "checkpoints": 1, "transitions": int(0.5 * 263 + 0.5)}  # seed 2 -> run 2
    assert summary["global_step"] == 40 and len(summary["eval_returns"]) == 1
    scalars = read_scalars(run_dir)
    assert [s for s, _ in scalars["eval/episodic_return"]] == [20, 40]
    assert all(-21 <= v <= 21 for _, v in scalars["eval/episodic_return"])
    for key in ["losses/td_loss", "losses/cql_loss", "losses/q_values", "charts/SPS", "metrics/dormant_tau0",
                "metrics/srank", "metrics/entk_srank", "moe/expert_load_0", "moe/router_entropy"]:
        assert key in scalars, key
    assert all(v >= 0 for _, v in scalars["losses/cql_loss"])  # logsumexp >= max >= Q of any action
    assert "model" in torch.load(f"{run_dir}/model.pt", weights_only=True)


def test_preempted_and_resumed_offline_run_equals_an_uninterrupted_one(pong_dataset, tmp_path):
    """CQL+C51 reloading one of the two runs' checkpoints each iteration, Top1 with load balancing (torch noise, also
    in evaluation), metrics (extra batches): a run stopped by SIGUSR1 during its first evaluation, checkpointed (exit
    75) and continued with --resume auto (which plays that evaluation again first) ends with the parameters, losses
    and returns of an uninterrupted run (CPU, deterministic)."""
    flags = ["--dataset-dir", str(pong_dataset), "--env-id", "Pong", *BASE, "--agent", "cql-c51", "--runs", "1", "2",
             "--checkpoints-per-iteration", "1", "--moe-type", "top1", "--load-balancing-coef", "1", "--num-iterations",
             "2", "--gradient-steps-per-iteration", "10", "--metrics-every", "10", "--target-update-period", "4",
             "--print-every", "3", "--runs-dir", str(tmp_path), "--save-model"]
    full = run_script("cql_softmoe", *flags, "--exp-name", "full")
    assert full.returncode == 0, full.stderr[-2000:]
    assert full.stdout.count("loaded ") == 2  # one load per iteration
    code, out, err = signalled_at("cql_softmoe", [*flags, "--exp-name", "split"], "evaluating 1 games at gradient step 10",
                                  signal.SIGUSR1)
    assert code == 75 and "SIGUSR1 at gradient step" in out, err[-2000:]
    (split_dir,) = glob.glob(f"{tmp_path}/Pong__split__*")
    (checkpoint,) = glob.glob(f"{split_dir}/checkpoints/step_*.pt")
    stopped_at = int(os.path.basename(checkpoint)[5:-3])
    assert stopped_at == 10 and not os.path.exists(f"{split_dir}/model.pt") and "iteration 1/2" not in out
    resumed = run_script("cql_softmoe", *flags, "--exp-name", "split", "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed at gradient step {stopped_at}" in resumed.stdout and "iteration 1/2: evaluation" in resumed.stdout
    (full_dir,) = glob.glob(f"{tmp_path}/Pong__full__*")
    a = torch.load(f"{full_dir}/model.pt", weights_only=True)["model"]
    b = torch.load(f"{split_dir}/model.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = read_scalars(full_dir), read_scalars(split_dir)
    for key in ["eval/episodic_return", "losses/td_loss", "losses/cql_loss", "losses/aux_loss", "metrics/srank"]:
        assert sa[key] == sb[key], key
    assert [s for s, _ in sa["eval/episodic_return"]] == [10, 20]


def test_nonfinite_loss_stops_with_one_line(pong_dataset, tmp_path):
    result = run_script("cql_softmoe", "--dataset-dir", str(pong_dataset), "--env-id", "Pong", *BASE, "--eval-episodes",
                        "0", "--num-iterations", "1", "--gradient-steps-per-iteration", "20", "--data-fraction", "1",
                        "--learning-rate", "1e30", "--checkpoint-every", "5", "--checkpoint-keep", "9", "--runs-dir", str(tmp_path))
    assert result.returncode == 3, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "non-finite loss, Q-value or weights by gradient step" in lines[0], result.stderr
    bad_step = int(lines[0].split("by gradient step ")[1].split(";")[0])
    for path in glob.glob(f"{tmp_path}/*/checkpoints/step_*.pt"):  # none written at or after the bad step
        assert int(os.path.basename(path)[5:-3]) < bad_step


# ---------------------------------------------------------------- bad data


def tiny_dataset(root, game="Pong"):
    buffer = DopamineLoggedBuffer(str(root / game / "1" / "replay_logs"), capacity=60)
    play(buffer, 80, seed=2)
    buffer.log_final()
    assert buffer.log_count == 2
    return root / game / "1" / "replay_logs"


def resave(path, array, pickle=False):
    with open(path, "wb") as f, gzip.GzipFile(fileobj=f, mode="wb") as out:
        np.save(out, array, allow_pickle=pickle)


def ruin(kind, logs):
    """Damage one file of a good dataset as `kind` says; returns the file's name."""
    name = {"missing": "$store$_reward_ckpt.1.gz", "shape": "$store$_observation_ckpt.0.gz",
            "dtype": "$store$_action_ckpt.1.gz", "truncated": "$store$_observation_ckpt.1.gz",
            "truncated_small": "$store$_terminal_ckpt.0.gz", "pickle": "$store$_reward_ckpt.0.gz",
            "not_gzip": "add_count_ckpt.1.gz", "length": "$store$_terminal_ckpt.1.gz"}[kind]
    path = logs / name
    if kind == "missing":
        path.unlink()
    elif kind == "shape":
        resave(path, np.zeros((60, 84, 80), np.uint8))
    elif kind == "dtype":
        resave(path, np.zeros(60, np.int64))
    elif kind in ("truncated", "truncated_small"):
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "pickle":
        resave(path, np.array([None] * 60, dtype=object), pickle=True)
    elif kind == "not_gzip":
        with path.open("wb") as f:
            np.save(f, np.array(5))
    elif kind == "length":
        resave(path, np.zeros(59, np.uint8))
    return name


@pytest.mark.parametrize("kind,message", [
    ("missing", "missing; every checkpoint needs"), ("shape", "expected uint8 frames of shape (N, 84, 84)"),
    ("dtype", "expected int32 of shape (60,)"), ("truncated", "truncated gzip"), ("truncated_small", "truncated gzip"),
    ("pickle", "holds pickled Python objects"), ("not_gzip", "not a readable gzip file"),
    ("length", "expected uint8 of shape (60,) like the observations"),
])
def test_bad_data_is_one_clear_line_naming_the_file(cql, tmp_path, kind, message):
    name = ruin(kind, tiny_dataset(tmp_path / "data"))
    args = cql.with_agent_defaults(cql.Args(dataset_dir=str(tmp_path / "data"), runs_dir=str(tmp_path / "runs"), cuda=False))
    with pytest.raises(ValueError) as error:
        cql.prepare(args)
    line = str(error.value)
    assert message in line and name in line and "\n" not in line, line
    assert not (tmp_path / "runs").exists()  # nothing created


def flip_last_data_byte(path):
    """Re-save a dataset file uncompressed inside its gzip (stored blocks) and flip the array's last byte: the file
    stays a readable gzip of a well-formed .npy of the same length, and only the gzip checksum (CRC-32) can tell."""
    with gzip.open(path, "rb") as f:
        array = np.load(f, allow_pickle=False)
    with open(path, "wb") as f, gzip.GzipFile(fileobj=f, mode="wb", compresslevel=0) as out:
        np.save(out, array, allow_pickle=False)
    data, tail = bytearray(path.read_bytes()), array.tobytes()[-16:]
    data[data.rfind(tail) + 15] ^= 0xFF  # the array's last byte, stored as is
    path.write_bytes(bytes(data))
    with gzip.open(path, "rb") as f:  # what np.load alone sees: a good array, one value changed
        changed = np.load(f, allow_pickle=False)
    assert changed.shape == array.shape and (changed != array).sum() == 1


@pytest.mark.parametrize("name", ["$store$_reward_ckpt.1.gz", "$store$_observation_ckpt.0.gz"])
def test_a_flipped_byte_is_found_by_the_gzip_checksum(cql, tmp_path, capsys, name):
    """A byte changed inside the data (not the gzip structure) is caught by the checksum, not loaded: the small
    arrays when the dataset is checked (nothing created), the frames when first loaded (one line naming the file; the
    new run's directory, still empty, is removed)."""
    flip_last_data_byte(tiny_dataset(tmp_path / "data") / name)
    args = tiny_args(cql, dataset_dir=str(tmp_path / "data"), env_id="Pong", num_iterations=1,
                     gradient_steps_per_iteration=2, batch_size=8, eval_episodes=0, data_fraction=1.0,
                     runs_dir=str(tmp_path / "runs"))
    if "reward" in name:
        with pytest.raises(ValueError, match=re.escape(f"{name}: not a readable gzip file (CRC check failed")):
            cql.prepare(args)
    else:
        prepared = cql.prepare(args)  # the frames' gzip trailer gives the right length
        with pytest.raises(SystemExit) as exit:
            cql.main(args, *prepared)
        assert exit.value.code == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and name in lines[0] and "CRC check failed" in lines[0], lines
    assert not (tmp_path / "runs").exists() or not os.listdir(tmp_path / "runs")  # no run directory left


def test_each_frame_file_is_read_to_its_end_once(cql, tmp_path, monkeypatch):
    """The first load of a frame file reads it to its end (its checksum); a reload with the same `verified` set stops
    at its last loaded row, and loads the same replay."""
    tiny_dataset(tmp_path)
    drained, drain = [], cql.drain_gzip
    monkeypatch.setattr(cql, "drain_gzip", lambda f: drained.append(os.path.basename(f.name)) or drain(f))
    records = cql.scan_dataset({1: str(tmp_path / "Pong" / "1")}, (), 0.5, 6, "first")
    rb, verified = fill(cql, records), set()  # (no set: every file read to its end, as by benchmark/dataset_load.py)
    frames = rb.frames.clone()
    drained.clear()  # scan_dataset's small arrays and fill's frames
    for _ in range(2):
        rb.starts = cql.load_dataset(rb, records, workers=2, verified=verified)
        assert torch.equal(rb.frames, frames)
    assert sorted(drained) == [f"$store$_observation_ckpt.{n}.gz" for n in (0, 1)]


def test_a_corrupt_checkpoint_met_mid_run_keeps_what_was_learned(cql, tmp_path, capsys):
    """--checkpoints-per-iteration 1: the corrupt frame file first drawn at iteration 1 stops the run with one line,
    after a checkpoint of its training so far; once the file is fixed, --resume auto ends as an uninterrupted run."""
    logs = tiny_dataset(tmp_path / "data")
    seed = next(s for s in range(1, 50) if [np.random.default_rng([s, i]).choice(2, 1)[0] for i in (0, 1)] == [0, 1])
    good = (logs / "$store$_observation_ckpt.1.gz").read_bytes()
    flip_last_data_byte(logs / "$store$_observation_ckpt.1.gz")
    flags = dict(dataset_dir=str(tmp_path / "data"), env_id="Pong", num_iterations=2, gradient_steps_per_iteration=3,
                 checkpoints_per_iteration=1, batch_size=8, eval_episodes=0, data_fraction=1.0, metrics_every=0,
                 log_every=1, print_every=100, seed=seed, torch_deterministic=True)
    args = tiny_args(cql, **flags, runs_dir=str(tmp_path / "runs"))
    with pytest.raises(SystemExit) as exit:
        cql.main(args, *cql.prepare(args))
    assert exit.value.code == 2
    line = capsys.readouterr().err.strip()
    assert "$store$_observation_ckpt.1.gz: not a readable gzip file (CRC check failed" in line and "\n" not in line
    assert "checkpoint written to" in line and "continue with --resume auto once the file is fixed" in line
    (logs / "$store$_observation_ckpt.1.gz").write_bytes(good)
    resumed = tiny_args(cql, **flags, runs_dir=str(tmp_path / "runs"), resume="auto")
    cql.main(resumed, *cql.prepare(resumed))
    full = tiny_args(cql, **flags, runs_dir=str(tmp_path / "full"))
    cql.main(full, *cql.prepare(full))
    (run_dir,), (full_dir,) = glob.glob(f"{tmp_path}/runs/*"), glob.glob(f"{tmp_path}/full/*")
    assert json.load(open(f"{run_dir}/summary.json"))["global_step"] == 6
    assert read_scalars(run_dir)["losses/td_loss"] == read_scalars(full_dir)["losses/td_loss"]


def test_resumed_with_no_evaluation_games_a_pending_evaluation_is_dropped(cql, tmp_path, monkeypatch):
    """A run stopped during an evaluation, resumed with --eval-episodes 0, trains on without playing it (a vector env
    of 0 games crashed the interpreter)."""
    tiny_dataset(tmp_path)
    monkeypatch.setattr(cql, "evaluate", lambda *a, **k: None)  # what a signal during the games returns
    flags = dict(dataset_dir=str(tmp_path), env_id="Pong", num_iterations=2, gradient_steps_per_iteration=3,
                 batch_size=8, data_fraction=1.0, metrics_every=0, log_every=100, print_every=100,
                 runs_dir=str(tmp_path / "runs"))
    args = tiny_args(cql, **flags, eval_episodes=2)
    with pytest.raises(SystemExit) as exit:
        cql.main(args, *cql.prepare(args))
    assert exit.value.code == cql.EXIT_PREEMPTED
    monkeypatch.setattr(cql, "evaluate", lambda *a, **k: pytest.fail("an evaluation was played"))
    resumed = tiny_args(cql, **flags, eval_episodes=0, resume="auto")
    cql.main(resumed, *cql.prepare(resumed))
    (summary,) = glob.glob(f"{tmp_path}/runs/*/summary.json")
    assert json.load(open(summary))["global_step"] == 6


@pytest.mark.parametrize("case", ["no_root", "no_game", "truncated"])
def test_bad_data_on_the_command_line(tmp_path, case):
    data = tmp_path / "data"
    if case != "no_root":
        tiny_dataset(data, "Breakout")
    if case == "truncated":
        ruin("truncated", tiny_dataset(data))
    result = run_script("cql_softmoe", "--dataset-dir", str(data), "--game", "Pong", "--runs-dir", str(tmp_path / "runs"),
                        timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cql_softmoe.py: error: "), result.stderr
    assert {"no_root": f"dataset directory {data} does not exist", "no_game": "games in", "truncated": "truncated gzip"}[case] in lines[0]
    assert not (tmp_path / "runs").exists()


def test_dataset_selections_that_cannot_work_are_refused(cql, tmp_path):
    """As many checkpoints per iteration as selected or more (every iteration would reload the same data), and a run
    whose replay_logs holds no checkpoint files: one line each, naming the fix, nothing created."""
    tiny_dataset(tmp_path / "data")  # run 1: checkpoints 0 and 1
    args = dict(dataset_dir=str(tmp_path / "data"), runs_dir=str(tmp_path / "runs"), cuda=False, data_fraction=1.0)
    for k in (2, 3):
        with pytest.raises(ValueError, match=re.escape(f"--checkpoints-per-iteration {k} is not below the 2 checkpoint(s)")):
            cql.prepare(cql.with_agent_defaults(cql.Args(**args, checkpoints_per_iteration=k)))
    (tmp_path / "data" / "Pong" / "2" / "replay_logs").mkdir(parents=True)
    with pytest.raises(ValueError, match=re.escape("2/replay_logs holds no *_ckpt.N.gz files")):
        cql.prepare(cql.with_agent_defaults(cql.Args(**args, runs=(2,))))
    assert not (tmp_path / "runs").exists()
    cql.prepare(cql.with_agent_defaults(cql.Args(**args, checkpoints_per_iteration=1)))


def test_memory_is_checked_before_loading(cql, tmp_path, monkeypatch):
    tiny_dataset(tmp_path / "data")
    monkeypatch.setattr(cql, "available_memory", lambda device: (10**9, "host memory is available"))
    args = cql.with_agent_defaults(cql.Args(dataset_dir=str(tmp_path / "data"), runs_dir=str(tmp_path / "runs"),
                                            cuda=False, data_fraction=1.0))
    with pytest.raises(ValueError) as error:
        cql.prepare(args)
    assert "needs 0.0 GB but 1.0 GB of host memory is available; use --checkpoints-per-iteration 5" in str(error.value)
    # the bound: 7,071 B per loaded transition (frame, action, reward, 2 flags, start index) plus 1 GiB of headroom
    records = cql.scan_dataset({1: str(tmp_path / "data" / "Pong" / "1")}, (), 1.0, 6, "first")
    need = sum(r["rows"] for r in records) * 7_071 + 2**30
    for free, refused in ((need - 1, True), (need, False)):
        monkeypatch.setattr(cql, "available_memory", lambda device, free=free: (free, "host memory is available"))
        if refused:
            with pytest.raises(ValueError, match="needs"):
                cql.prepare(args)
        else:
            cql.prepare(args)


@pytest.mark.parametrize("flags,message", [
    (dict(data_fraction=0.0), "--data-fraction must be in (0, 1]"),
    (dict(num_atoms=21), "apply to --agent cql-c51"),
    (dict(n_step=0), "--n-step must be positive"),
    (dict(checkpoints_per_iteration=-1), "--checkpoints-per-iteration must be >= 0"),
    (dict(checkpoints=(0, 1, 0)), "--checkpoints lists 0 more than once"),
    (dict(runs=(1, 1)), "--runs lists 1 more than once"),
])
def test_impossible_flags_are_refused(cql, flags, message):
    with pytest.raises(ValueError) as error:
        cql.check_args(cql.Args(**flags))
    assert message in str(error.value)


@pytest.mark.parametrize("agent", ["cql", "cql-c51"])
def test_target_network_syncs_every_target_update_period(cql, tmp_path, monkeypatch, agent):
    """--target-update-period P in a real run: the target network takes the online one after gradient steps P, 2P, ...
    and at no other time (counted at each of its load_state_dict calls), across iterations."""
    tiny_dataset(tmp_path)
    updates, syncs = [0], []
    build = cql.build_agent

    def recorded_build(*args):
        agent = build(*args)
        update, load = agent.update, agent.target_network.load_state_dict

        def counted_update():
            updates[0] += 1
            return update()

        def recorded_load(state, *rest, **kwargs):
            syncs.append(updates[0])
            return load(state, *rest, **kwargs)

        agent.update, agent.target_network.load_state_dict = counted_update, recorded_load
        return agent

    monkeypatch.setattr(cql, "build_agent", recorded_build)
    args = tiny_args(cql, agent=agent, dataset_dir=str(tmp_path), env_id="Pong", num_iterations=2,
                     gradient_steps_per_iteration=20, target_update_period=7, batch_size=8, eval_episodes=0, data_fraction=1.0,
                     metrics_every=0, log_every=100, print_every=100, runs_dir=str(tmp_path / "runs"))
    cql.main(args, *cql.prepare(args))
    assert updates[0] == 40 and syncs == [7, 14, 21, 28, 35]


def test_checkpoints_per_iteration_draws_each_iteration_s_checkpoints(cql, tmp_path, monkeypatch):
    """--checkpoints-per-iteration K (the reference's .gz loader): every iteration reloads K checkpoints drawn
    without replacement from (seed, iteration), so iterations train on different checkpoints."""
    tiny_dataset(tmp_path)  # checkpoints 0 and 1
    loads, load_dataset = [], cql.load_dataset
    monkeypatch.setattr(cql, "load_dataset", lambda rb, chosen, *a, **k: loads.append([r["checkpoint"] for r in chosen])
                        or load_dataset(rb, chosen, *a, **k))
    args = tiny_args(cql, dataset_dir=str(tmp_path), env_id="Pong", num_iterations=6, gradient_steps_per_iteration=2,
                     checkpoints_per_iteration=1, batch_size=8, eval_episodes=0, data_fraction=1.0, metrics_every=0,
                     log_every=100, print_every=100, seed=3, runs_dir=str(tmp_path / "runs"))
    cql.main(args, *cql.prepare(args))
    expected = [[int(np.random.default_rng([3, i]).choice(2, 1)[0])] for i in range(6)]
    assert loads == expected and len({tuple(c) for c in loads}) == 2


def test_a_split_fixed_replay_loads_and_samples_as_one_on_the_device_alone(cql, tmp_path):
    """SPEC §5 "as much as fits" for the offline data: `load_dataset` writes through the split (pieces crossing it
    included) and batches are the same as with all frames on the device."""
    tiny_dataset(tmp_path / "data")
    records = cql.scan_dataset({1: str(tmp_path / "data" / "Pong" / "1")}, (), 1.0, 6, "random", 3)
    capacity = sum(r["rows"] for r in records)
    whole = cql.FixedReplay(capacity, "cpu", 3, 0.9, seed=0)
    for near in (0, 37, capacity - 1):
        split = cql.FixedReplay(capacity, "cpu", 3, 0.9, seed=0, device_slots=near)
        for rb in (whole, split):
            rb.starts = cql.load_dataset(rb, records, workers=2)
            rb.generator.manual_seed(near)
        assert len(split.frames) == near and torch.equal(split.starts, whole.starts)
        assert torch.equal(split.read_frames(torch.arange(capacity)[:, None], 0).squeeze(1), whole.frames[:, 0])
        for _ in range(3):
            assert all(torch.equal(a, b) for a, b in zip(whole.sample(16), split.sample(16), strict=True))


def test_data_too_large_for_the_gpu_keeps_as_much_as_fits_there(cql, monkeypatch):
    """Hand-computed for 1,000,000 transitions: 7,056 bytes of frame each, and 15 more (action, reward, 2 flags, the
    start index) that stay on the GPU; a GiB to spare on each side."""
    gib, free = 2**30, {"cuda": 10**12, "cpu": 10**12}
    monkeypatch.setattr(cql.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cql, "available_memory", lambda device: (free[torch.device(device).type], "host memory is available"))
    args, n, rest = cql.Args(), 1_000_000, 15_000_000
    assert cql.check_replay_memory(args, n) is None
    free["cuda"] = gib + rest + 250_000 * 7056 + 7055
    assert cql.check_replay_memory(args, n) == 250_000
    free["cpu"] = gib + 750_000 * 7056 - 1
    with pytest.raises(ValueError, match=r"^the replay of 1,000,000 transitions needs 7\.1 GB: the GPU holds 1\.8 GB, "
                                         r"and the other 5\.3 GB and a GiB to spare exceed the 6\.4 GB of host memory "
                                         r"available; use --checkpoints-per-iteration 5 "):
        cql.check_replay_memory(args, n)
    free["cpu"] += 1
    assert cql.check_replay_memory(args, n) == 250_000
    free["cuda"] = gib + rest - 1
    with pytest.raises(ValueError, match=r"^1\.1 GB of GPU memory is free, too little for the networks and the "
                                         r"replay's 15\.0 MB of actions, rewards, flags and start indices; free the GPU"):
        cql.check_replay_memory(args, n)
    free["cuda"], free["cpu"], args.gpu_replay_fraction = 10**12, 10**12, 0.1
    assert cql.check_replay_memory(args, n) == 100_000
    with pytest.raises(ValueError, match=r"^--gpu-replay-fraction splits the replay between a GPU and host memory"):
        cql.check_args(cql.with_agent_defaults(cql.Args(gpu_replay_fraction=0.5, cuda=False)))
