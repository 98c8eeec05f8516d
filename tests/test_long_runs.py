"""Long runs survive: checkpoints, exact resume, preemption signals, non-finite losses and bad checkpoints."""

import glob
import os
import signal
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, read_scalars, run_script

BASE = ["--encoder", "nature", "--num-experts", "2", "--learning-starts", "300", "--buffer-size", "3000", "--batch-size", "8",
        "--metrics-every", "0", "--log-every", "100", "--target-network-frequency", "200"]


def only(pattern):
    (path,) = glob.glob(pattern)
    return path


# every online script, on a game where an untrained greedy (or noisy) agent still ends episodes quickly, with its own
# flags: the Atari 100k agents learn at every step and evaluate 100 games at the end by default; fewer and smaller
# updates keep these runs as short as the others
ATARI100K = ("--replay-ratio", "0.25", "--eval-episodes", "0")
ONLINE = [("dqn_softmoe", "Breakout", ()), ("rainbow_softmoe", "SpaceInvaders", ()),
          ("der_softmoe", "SpaceInvaders", ATARI100K), ("drq_softmoe", "Breakout", ATARI100K)]


def base(script):
    """BASE for `script`: DrQ(ε) has no target network (its targets come from the online network itself)."""
    if script == "drq_softmoe":
        i = BASE.index("--target-network-frequency")
        return BASE[:i] + BASE[i + 2:]
    return BASE


@pytest.mark.parametrize("script,game,extra", ONLINE)
def test_interrupted_and_resumed_run_equals_an_uninterrupted_one(tmp_path, script, game, extra):
    """Top1 with load balancing draws torch noise, as do noisy nets; epsilon-greedy draws numpy numbers, sticky
    actions the emulator's, prioritized replay its sum tree: parameters and every logged return and loss must still
    match exactly (CPU, deterministic)."""
    flags = [*base(script), *extra, "--env-id", game, "--moe-type", "top1", "--load-balancing-coef", "1",
             "--runs-dir", str(tmp_path), "--save-model"]
    full = run_script(script, *flags, "--exp-name", "full", "--total-timesteps", "800")
    assert full.returncode == 0, full.stderr[-2000:]
    first = run_script(script, *flags, "--exp-name", "split", "--total-timesteps", "450", "--checkpoint-every", "450")
    assert first.returncode == 0, first.stderr[-2000:]
    split_dir = only(f"{tmp_path}/{game}__split__1__*")
    second = run_script(script, *flags, "--exp-name", "split", "--total-timesteps", "800", "--resume", split_dir)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "resumed at agent step 450" in second.stdout
    full_dir = only(f"{tmp_path}/{game}__full__1__*")
    a = torch.load(f"{full_dir}/model.pt", weights_only=True)["model"]
    b = torch.load(f"{split_dir}/model.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = read_scalars(full_dir), read_scalars(split_dir)
    for key in ["charts/episodic_return", "charts/episodic_length", "losses/td_loss", "losses/aux_loss"]:
        assert sa[key] == sb[key], key
    assert len(sa["charts/episodic_return"]) >= 1 and len(sa["losses/td_loss"]) >= 4


# the signal handling sits in the shared checkpoint block; one script per training loop (online, Atari 100k) wires it
@pytest.mark.parametrize("script,game,extra", [ONLINE[0], ONLINE[2]])
def test_preemption_signal_checkpoints_and_resume_auto_finishes(tmp_path, script, game, extra):
    flags = [*base(script), *extra, "--env-id", game, "--runs-dir", str(tmp_path), "--total-timesteps", "800",
             "--print-every", "100", "--exp-name", "pre"]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, f"{script}.py"), "--no-cuda", *flags],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    for line in proc.stdout:
        if line.startswith("step 400/"):
            proc.send_signal(signal.SIGUSR1)
            break
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err[-2000:]  # EX_TEMPFAIL: the launcher requeues
    assert "SIGUSR1 at agent step" in out and "--resume auto" in out
    run_dir = only(f"{tmp_path}/{game}__pre__1__*")
    (checkpoint,) = glob.glob(f"{run_dir}/checkpoints/step_*.pt")
    stopped_at = int(os.path.basename(checkpoint)[5:-3])
    assert 400 <= stopped_at < 800 and not os.path.exists(f"{run_dir}/summary.json")
    resumed = run_script(script, *flags, "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed at agent step {stopped_at}" in resumed.stdout
    assert os.path.exists(f"{run_dir}/summary.json") and len(glob.glob(f"{tmp_path}/*")) == 1
    steps = [s for s, _ in read_scalars(run_dir)["charts/epsilon"]]
    assert steps == sorted(set(steps)) and steps[-1] == 800  # logging continued at the same steps, once each


@pytest.mark.parametrize("script,game,extra", ONLINE)
def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, script, game, extra):
    result = run_script(script, *base(script), *extra, "--env-id", game, "--runs-dir", str(tmp_path),
                        "--total-timesteps", "1500", "--checkpoint-every", "200", "--checkpoint-keep", "5",
                        "--learning-rate", "1e30")
    assert result.returncode == 3, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "non-finite TD loss" in lines[0] and "last good checkpoint" in lines[0]
    bad_step = int(lines[0].split("by agent step ")[1].split(";")[0])
    checkpoints = sorted(glob.glob(f"{tmp_path}/*/checkpoints/step_*.pt"))
    assert checkpoints and checkpoints[-1] in lines[0]
    for path in checkpoints:  # nothing written at or after the bad step, and what is there is finite
        assert int(os.path.basename(path)[5:-3]) < bad_step
        state = torch.load(path, weights_only=True)
        assert all(torch.isfinite(p).all() for p in state["q_network"].values())


@pytest.fixture(scope="module")
def checkpointed_run(tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    result = run_script("dqn_softmoe", *BASE, "--runs-dir", str(runs), "--total-timesteps", "400",
                        "--checkpoint-every", "100", "--checkpoint-keep", "2")
    assert result.returncode == 0, result.stderr[-2000:]
    return only(f"{runs}/Breakout__*")


def test_checkpoints_keep_the_newest_k_and_hold_everything(checkpointed_run):
    paths = sorted(glob.glob(f"{checkpointed_run}/checkpoints/*"))
    assert [os.path.basename(p) for p in paths] == ["step_000000000300.pt", "step_000000000400.pt"]
    state = torch.load(paths[-1], weights_only=True)
    for key in ["q_network", "target_network", "optimizer", "replay", "envs", "rng", "loop", "global_step", "args"]:
        assert key in state
    assert state["replay"]["t"] == 400 and state["replay"]["frames"].shape == (400, 1, 84, 84)
    assert len(state["envs"]["actions"]) == 1


def test_save_checkpoint_is_atomic(dqn, tmp_path):
    good = dqn.save_checkpoint({"step": torch.tensor(1)}, str(tmp_path), 1, keep=1)
    with pytest.raises(Exception):  # fails half-way through writing, as a crash would
        dqn.save_checkpoint({"step": torch.zeros(1000), "bad": lambda: None}, str(tmp_path), 2, keep=1)
    assert dqn.list_checkpoints(str(tmp_path)) == [good]
    assert torch.load(good, weights_only=True)["step"] == 1


def snapshot(root):
    """Every file under root with its size and modification time."""
    return sorted((p, os.path.getsize(p), os.path.getmtime(p)) for p in glob.glob(f"{root}/**", recursive=True) if os.path.isfile(p))


def bad_resume(target, runs_root, *flags):
    """Resuming from `target` must fail with one line, exit 2, and leave everything under runs_root as it was."""
    before = snapshot(runs_root)
    result = run_script("dqn_softmoe", *BASE, "--total-timesteps", "800", "--resume", str(target),
                        "--runs-dir", str(runs_root), *flags, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert snapshot(runs_root) == before
    return lines[0]


def test_resume_with_other_flags_is_refused(checkpointed_run):
    line = bad_resume(checkpointed_run, os.path.dirname(checkpointed_run), "--num-experts", "4")
    assert "written with --num-experts 2 but this run has 4" in line


def test_truncated_checkpoint_is_refused(checkpointed_run, tmp_path):
    data = open(sorted(glob.glob(f"{checkpointed_run}/checkpoints/*"))[-1], "rb").read()
    path = tmp_path / "Breakout__trunc__1__1" / "checkpoints" / "step_000000000400.pt"
    path.parent.mkdir(parents=True)
    path.write_bytes(data[: len(data) // 2])
    assert "is unreadable" in bad_resume(path, tmp_path)
    path.write_bytes(b"not a checkpoint at all")
    assert "is unreadable" in bad_resume(path, tmp_path)


def test_checkpoint_of_another_script_is_refused(tmp_path):
    """A real Rainbow checkpoint given to the DQN script."""
    result = run_script("rainbow_softmoe", *BASE, "--runs-dir", str(tmp_path), "--total-timesteps", "100",
                        "--checkpoint-every", "100", "--learning-starts", "1000", "--exp-name", "dqn_softmoe")
    assert result.returncode == 0, result.stderr[-2000:]
    path = only(f"{tmp_path}/*/checkpoints/*.pt")
    assert "was written by rainbow_softmoe.py, not dqn_softmoe.py" in bad_resume(path, tmp_path)


def test_missing_resume_path_and_finished_checkpoint(checkpointed_run, tmp_path):
    assert "no such checkpoint file or run directory" in bad_resume(tmp_path / "nowhere", tmp_path)
    line = bad_resume(checkpointed_run, os.path.dirname(checkpointed_run), "--total-timesteps", "400")
    assert "raise --total-timesteps" in line


def test_checkpoint_without_replay_refills_before_learning(tmp_path):
    flags = [*BASE, "--runs-dir", str(tmp_path), "--no-checkpoint-replay"]
    first = run_script("dqn_softmoe", *flags, "--total-timesteps", "400", "--checkpoint-every", "400")
    assert first.returncode == 0, first.stderr[-2000:]
    run_dir = only(f"{tmp_path}/Breakout__*")
    state = torch.load(only(f"{run_dir}/checkpoints/*.pt"), weights_only=True)
    assert state["replay"] is None
    second = run_script("dqn_softmoe", *flags, "--total-timesteps", "900", "--resume", run_dir)
    assert second.returncode == 0, second.stderr[-2000:]
    loss_steps = [s for s, _ in read_scalars(run_dir)["losses/td_loss"]]
    assert any(s <= 400 for s in loss_steps) and any(s > 700 for s in loss_steps)
    assert not any(400 < s <= 700 for s in loss_steps)  # the empty replay holds 300 new steps only at step 700


@pytest.mark.parametrize("script", [s for s, _, _ in ONLINE])
def test_unwritable_run_directory(tmp_path, script):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    result = run_script(script, "--runs-dir", str(blocker / "runs"), timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "cannot write the run directory" in result.stderr and "--runs-dir" in result.stderr
