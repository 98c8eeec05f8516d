"""benchmark/speed.py measures what it says on every kind of script (tiny sizes: the numbers themselves belong in
benchmark/results/, not in a test)."""

import math
import sys
import types

import numpy as np
import pytest
import torch

from conftest import ROOT

sys.path.insert(0, ROOT)
from benchmark import speed  # noqa: E402

OPTS = dict(device="cpu", env_id="Breakout", num_experts=2, encoder="nature", num_envs=1, buffer_size=1000,
            compile=False, fill=400, updates=2, steps=20, full_loop=False, profile=2)


@pytest.mark.parametrize("script", ["dqn_softmoe", "der_softmoe", "cql_softmoe"])
def test_measure_reports_rates_and_replay_size(script):
    opts = types.SimpleNamespace(**OPTS)
    result = speed.measure(script, "softmoe", opts)
    assert result["script"] == script and result["num_experts"] == 2 and result["parameters"] > 0
    assert result["updates_per_s"] > 0 and math.isfinite(result["updates_per_s"])
    # one uint8 frame, action, float reward and two flags per transition (+ the sum tree for DER's prioritized replay)
    assert result["replay_bytes_1m"] == (7_063_000_000 if script != "der_softmoe" else
                                         7_063_000_000 + 8 * 2 ** 21)
    if script == "cql_softmoe":  # offline: no env to step
        assert "acting_sps" not in result
    else:
        assert result["env_only_sps"] > result["acting_sps"] > 0
        replay_ratio = 1.0 if script == "der_softmoe" else 0.25
        assert result["learning_bound_sps"] == pytest.approx(result["updates_per_s"] / replay_ratio)
    profile = result["profile"]  # where an agent step's time goes: operators by self time, calls per update
    update = profile["update"]
    assert profile["updates"] == 2 and update["ops_per_call"] > 10 and update["launches_per_call"] is None
    assert len(update["top"]) == 12 and all(t["name"] and t["ms_per_call"] >= 0 for t in update["top"])
    assert update["top"][0]["ms_per_call"] == max(t["ms_per_call"] for t in update["top"])
    if script == "cql_softmoe":  # offline: no acting, no adds
        assert "act" not in profile and "add" not in profile
    else:  # an act is a forward pass; an add is 5 copies (nested operators counted too), DER's also updates its sum tree
        assert profile["act"]["ops_per_call"] > 10 and profile["act"]["launches_per_call"] is None
        assert (profile["add"]["ops_per_call"] > 100) == (script == "der_softmoe") and profile["add"]["ops_per_call"] >= 5
    table = speed.markdown([result], types.SimpleNamespace(**OPTS), "test machine")
    assert f"| {script} | softmoe ×2 |" in table and "test machine" in table
    assert f"Profile of {script} softmoe (2 calls each): `update()` {update['ops_per_call']:,.0f} operator calls" in table


def test_atari100k_rows_give_a_whole_runs_time():
    row = dict(script="der_softmoe", moe_type="softmoe", num_experts=2, parameters=1, updates_per_s=1.0,
               both_sps=500.0, replay_bytes_1m=1)
    assert "der_softmoe softmoe: a 100k-step run takes about 3 min" in speed.markdown([row], types.SimpleNamespace(**OPTS), "m")


def test_gpu_session_script_checks_its_phases(tmp_path):
    """benchmark/gpu_session.sh (the prepared GPU measurements) parses, and an unknown phase is one clear line."""
    import subprocess

    script = f"{ROOT}/benchmark/gpu_session.sh"
    assert subprocess.run(["bash", "-n", script]).returncode == 0
    result = subprocess.run(["bash", script, "envs1", "envs2"], capture_output=True, text=True, timeout=60,
                            env={"PATH": "/usr/bin:/bin", "OUT": str(tmp_path / "out")})
    assert result.returncode == 2 and result.stdout == "gpu_session.sh: unknown phase 'envs2' (envs1, lagged, envs8, compile, graphs, atari100k, profile, split)\n"
    assert not (tmp_path / "out").exists()  # checked before anything is installed, measured or written


def test_gpu_session_script_keeps_to_its_budget(tmp_path):
    """BUDGET bounds the whole GPU session (a device call has 600 s): a phase with too little time left is skipped with
    a line saying so, the call still ends normally with what it has; a BUDGET that is no number is refused."""
    import os
    import shutil
    import subprocess

    (tmp_path / "benchmark").mkdir()  # a copy: it runs from its folder's parent, where no .whl/ of a GPU run is found
    script = shutil.copy(f"{ROOT}/benchmark/gpu_session.sh", tmp_path / "benchmark")
    env = {"PATH": f"{os.path.dirname(sys.executable)}:/usr/bin:/bin", "OUT": str(tmp_path / "out")}
    result = subprocess.run(["bash", script, "envs1", "profile"], capture_output=True, text=True, timeout=120,
                            env={**env, "BUDGET": "0"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "== envs1 skipped: " in result.stdout and "== profile skipped: " in result.stdout
    assert "benchmark/speed.py" not in result.stdout  # nothing was started
    result = subprocess.run(["bash", script], capture_output=True, text=True, timeout=60, env={**env, "BUDGET": "9m"})
    assert result.returncode == 2 and result.stdout == "gpu_session.sh: BUDGET must be a number of seconds, got '9m'\n"


def test_each_measured_row_is_saved_at_once(tmp_path, monkeypatch):
    """speed.py rewrites --out's table and numbers after every row: a run stopped part-way (a time limit, a crash in
    a later script) keeps the rows it measured."""
    row = dict(script="dqn_softmoe", moe_type="baseline", num_experts=1, parameters=1, updates_per_s=1.0,
               env_only_sps=900.0, acting_sps=300.0, replay_bytes_1m=1)
    rows = iter([row])
    monkeypatch.setattr(speed, "measure", lambda script, moe, opts: next(rows))  # the second row fails
    out = tmp_path / "t.md"
    with pytest.raises(StopIteration):
        speed.main(["--device", "cpu", "--scripts", "dqn_softmoe", "--moe-types", "baseline", "softmoe", "--no-full-loop",
                    "--out", str(out)])
    assert "| dqn_softmoe | baseline | 1 | 900 |" in out.read_text()
    import json
    assert json.load(open(tmp_path / "t.json"))["results"] == [row]


def test_gpu_only_options_are_refused_on_the_cpu():
    import subprocess

    for flags, message in [(["--tf32"], "--tf32 applies to --device cuda"),
                           (["--compile", "--compile-mode", "reduce-overhead"], "needs --compile and --device cuda")]:
        result = subprocess.run([sys.executable, f"{ROOT}/benchmark/speed.py", "--device", "cpu", *flags],
                                capture_output=True, text=True, timeout=120)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 1 and len(lines) == 1 and lines[0].startswith("speed.py: error:") and message in lines[0]


def test_no_learning_loop_times_a_real_run_that_never_learns():
    """--no-learning-loop: a real DQN run whose learning never starts (random acting): its rate comes from the
    run's own charts/SPS after the first tenth; the table shows it beside the emulator's."""
    flags = ["--env-id", "Breakout", "--encoder", "nature", "--num-experts", "2", "--buffer-size", "1000"]
    loop = speed.full_loop("dqn_softmoe", flags, 10**9, 300, "cpu")
    assert loop["sps"] > 0 and math.isfinite(loop["sps"]) and loop["peak_host_bytes"] > 0
    row = dict(script="dqn_softmoe", moe_type="softmoe", num_experts=2, parameters=1, updates_per_s=1.0,
               env_only_sps=900.0, no_learning_sps=700.0, acting_sps=300.0, replay_bytes_1m=1)
    assert "| dqn_softmoe | softmoe ×2 | 1 | 900 | 700 | 300 | 1.0 |" in speed.markdown([row], types.SimpleNamespace(**OPTS), "m")


def test_layer_timings_cover_both_paddings_and_layouts_and_restore_the_script():
    from benchmark import layers

    module = layers.load_script_module("rainbow_softmoe")
    conv_forward, pool = module.SameConv2d.forward, module.same_max_pool
    x = torch.rand(2, 4, 21, 21)
    conv = module.SameConv2d(4, 8, 3)
    with layers.explicit_padding(module):  # the old way, copies and all, computes the same
        assert module.SameConv2d.forward is not conv_forward
        explicit = module.same_max_pool(conv(x), 3, 2)
    assert module.SameConv2d.forward is conv_forward and module.same_max_pool is pool
    torch.testing.assert_close(module.same_max_pool(conv(x), 3, 2), explicit)
    lines = layers.main(["--calls", "1", "--repeats", "1"])
    rows = [line for line in lines if line.startswith("| impala") or line.startswith("| nature")]
    cases = {tuple(row.strip("| ").split(" | ")[:3]) for row in rows}
    assert len(rows) == 8 and cases == {(e, w, p) for e in ("impala", "nature") for w in ("channels-first", "channels-last")
                                        for p in ("scripts", "explicit")}
    assert any(line.startswith("| 32 leaves |") for line in lines)


def test_rates_count_agent_steps_not_reset_steps(monkeypatch):
    """A vector step counts the envs that played: an env whose game ended on the previous step only resets (ale-py's
    next-step autoreset ignores its action), as the scripts' loops count. A fake env of 2 whose first env ends a game
    every 3rd step: 30 vector steps = 60 env steps, 9 of them reset steps (steps 4, 7, ..., 28)."""
    class Envs:
        single_action_space = types.SimpleNamespace(n=4)
        t = 0

        def reset(self, seed=None):
            return np.zeros((2, 4, 84, 84), np.uint8), {}

        def step(self, actions):
            self.t += 1
            terminated = np.array([self.t % 3 == 0, False])
            return np.zeros((2, 4, 84, 84), np.uint8), np.zeros(2), terminated, np.zeros(2, bool), {}

        def close(self):
            pass

    module = types.SimpleNamespace(make_env=lambda rom, num_envs, protocol: Envs())
    clock = iter(range(100))
    monkeypatch.setattr(speed.time, "perf_counter", lambda: float(next(clock)))  # each call: one second later
    assert speed.env_only(module, "breakout", "dopamine", 2, 60) == 51.0  # 51 steps played in 1 "second"
    assert speed.played(np.array([False, True]), np.array([True, False]), np.array([False, False]))[0] == 1


def test_dataset_load_benchmark_times_both_selections(tmp_path, capsys):
    from benchmark import dataset_load

    out = tmp_path / "load.md"
    table = dataset_load.main(["--rows", "3000", "--fractions", "0.5", "--repeats", "1", "--out", str(out)])
    assert out.read_text() == table and table.splitlines()[3].endswith("| load (s) | reload (s) |")
    rows = [line.split(" | ") for line in table.splitlines() if line.startswith("| 0.5 |")]
    assert [r[1] for r in rows] == ["first", "random"] and all(r[3] == "1,500" for r in rows)
    assert rows[0][2] == "1" and int(rows[1][2]) > 1  # random: several episodes, first: one piece
    assert all(0 < int(r[4].replace(",", "")) <= 1500 for r in rows)
    with pytest.raises(SystemExit):
        dataset_load.main(["--fractions", "0"])
    assert "--fractions in (0, 1]" in capsys.readouterr().err


@pytest.mark.parametrize("flags,message", [
    (["--moe-types", "softmoe", "bogus"], "--moe-types bogus: dqn_softmoe.py has softmoe, top1, baseline"),
    (["--env-id", "Foo"], "--env-id: unknown game 'Foo'"),
    (["--num-experts", "0"], "--num-experts must be at least 1, got 0"),
    (["--device", "gpu"], "--device 'gpu': use cpu or cuda"),
    (["--steps", "0"], "--steps must be at least 1, got 0"),
    (["--updates", "0"], "--updates must be at least 1, got 0"),
    (["--fill", "5000", "--buffer-size", "500"], "--fill 5000 exceeds --buffer-size 500: the replay would wrap"),
    (["--fill", "10"], "--fill 10 gives 10 random steps per env; at least 51"),
    (["--no-full-loop", "--no-learning-loop"], "--no-learning-loop times a real run, which --no-full-loop skips"),
    (["--loop-steps", "0"], "--loop-warmup must be >= 0 and --loop-steps at least 1"),
    (["--no-full-loop", "--loop-steps", "500"], "--loop-warmup and --loop-steps size the real runs, which --no-full-loop"),
    (["--num-envs", "0"], "--num-envs must be at least 1, got 0"),
    (["--out", "{tmp}"], "--out {tmp} is a directory; give a file name, e.g. {tmp}/speed.md"),
    (["--out", "{tmp}/missing/t.md"], "--out {tmp}/missing/t.md: folder {tmp}/missing does not exist; create it first"),
    (["--out", "{tmp}/t.json"], "the numbers go to the .json beside the table; give the table a .md name"),
    (["--gpu-replay-fraction", "0"], "dqn_softmoe.py refuses these settings: --gpu-replay-fraction splits the replay "
                                     "between a GPU and host memory and this run is on the CPU"),
])
def test_bad_options_are_one_line_before_anything_is_measured(tmp_path, monkeypatch, flags, message):
    """Each refusal comes at start-up (nothing measured, nothing written), as one line naming the flag."""
    flags = [f.format(tmp=tmp_path) for f in flags]
    monkeypatch.setattr(speed, "measure", lambda *a: pytest.fail("measured despite bad options"))
    with pytest.raises(SystemExit) as exit_:
        speed.main(["--scripts", "dqn_softmoe", "--device", "cpu", *flags])
    text = str(exit_.value.code)
    assert text.startswith("speed.py: error: ") and message.format(tmp=tmp_path) in text and "\n" not in text, text
    assert sorted(p.name for p in tmp_path.iterdir()) == []
