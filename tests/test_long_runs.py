"""Long runs survive: checkpoints, exact resume, preemption signals, non-finite losses and bad checkpoints."""

import glob
import json
import os
import shutil
import signal

import pytest
import torch

from conftest import read_scalars, run_script, signalled_at

BASE = ["--encoder", "nature", "--num-experts", "2", "--learning-starts", "300", "--buffer-size", "3000", "--batch-size", "8",
        "--metrics-every", "0", "--log-every", "100", "--target-network-frequency", "200"]


def only(pattern):
    (path,) = glob.glob(pattern)
    return path


# every online script, on a game where an untrained greedy (or noisy) agent still ends episodes quickly, with its own
# flags: the Atari 100k agents learn at every step and evaluate 100 games at the end by default; fewer and smaller
# updates keep these runs as short as the others
ATARI100K = ("--replay-ratio", "0.125", "--eval-episodes", "0")
ONLINE = [("dqn_softmoe", "Breakout", ()), ("rainbow_softmoe", "SpaceInvaders", ("--replay-ratio", "0.125")),
          ("der_softmoe", "SpaceInvaders", ATARI100K), ("drq_softmoe", "Breakout", ATARI100K)]


def base(script):
    """BASE for `script`: DrQ(ε) has no target network (its targets come from the online network itself)."""
    if script == "drq_softmoe":
        i = BASE.index("--target-network-frequency")
        return BASE[:i] + BASE[i + 2:]
    return BASE


# DER's is below, stopped by signals during its evaluations. Rainbow's acts with --lagged-actor: its noisy nets act
# greedily at every step, so an actor copy not restored exactly would change the actions after the resume
LAGGED_RAINBOW = (ONLINE[1][0], ONLINE[1][1], (*ONLINE[1][2], "--lagged-actor"))


@pytest.mark.parametrize("script,game,extra", [ONLINE[0], LAGGED_RAINBOW, ONLINE[3]])
def test_interrupted_and_resumed_run_equals_an_uninterrupted_one(tmp_path, script, game, extra):
    """Top1 with load balancing draws torch noise, as do noisy nets; epsilon-greedy draws numpy numbers, sticky
    actions the emulator's, prioritized replay its sum tree, the lagged actor holds parameters of its own: parameters
    and every logged return and loss must still match exactly (CPU, deterministic)."""
    flags = [*base(script), *extra, "--env-id", game, "--moe-type", "top1", "--load-balancing-coef", "1",
             "--runs-dir", str(tmp_path), "--save-model"]
    full = run_script(script, *flags, "--exp-name", "full", "--total-timesteps", "700")
    assert full.returncode == 0, full.stderr[-2000:]
    first = run_script(script, *flags, "--exp-name", "split", "--total-timesteps", "450", "--checkpoint-every", "450")
    assert first.returncode == 0, first.stderr[-2000:]
    split_dir = only(f"{tmp_path}/{game}__split__1__*")
    second = run_script(script, *flags, "--exp-name", "split", "--total-timesteps", "700", "--resume", split_dir)
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


# the signal handling sits in the shared checkpoint block; the Atari 100k loop's is tested below, with evaluations
def test_preemption_signals_in_training_and_in_the_final_evaluation(tmp_path):
    """DQN on Pong (an untrained agent's games end after about 760 steps): a signal during training checkpoints at
    the current step; one during the final evaluation (--eval-episodes) abandons it and checkpoints at the last step,
    from which --resume auto plays the evaluation; the finished run's checkpoint is then refused."""
    flags = [*BASE, "--env-id", "Pong", "--runs-dir", str(tmp_path), "--total-timesteps", "700", "--print-every", "100",
             "--eval-episodes", "1", "--resume", "auto"]
    code, out, err = signalled_at("dqn_softmoe", flags, "step 400/", signal.SIGUSR1)
    assert code == 75, err[-2000:]  # EX_TEMPFAIL: the launcher requeues
    assert "SIGUSR1 at agent step" in out and "--resume auto" in out
    run_dir = only(f"{tmp_path}/Pong__*")
    (checkpoint,) = glob.glob(f"{run_dir}/checkpoints/step_*.pt")
    stopped_at = int(os.path.basename(checkpoint)[5:-3])
    assert 400 <= stopped_at < 700 and not os.path.exists(f"{run_dir}/summary.json")
    code, out, err = signalled_at("dqn_softmoe", flags, "evaluating 1 games", signal.SIGTERM)
    assert code == 75 and f"resumed at agent step {stopped_at}" in out, err[-2000:]
    assert "SIGTERM at agent step 700: checkpoint written" in out and "evaluation over" not in out
    assert not os.path.exists(f"{run_dir}/summary.json")
    last = run_script("dqn_softmoe", *flags)
    assert last.returncode == 0, last.stderr[-2000:]
    assert "resumed at agent step 700" in last.stdout and "evaluation over 1 episodes" in last.stdout
    assert len(json.load(open(f"{run_dir}/summary.json"))["eval_returns"]) == 1 and len(glob.glob(f"{tmp_path}/*")) == 1
    steps = [s for s, _ in read_scalars(run_dir)["charts/epsilon"]]
    assert steps == sorted(set(steps)) and steps[-1] == 700  # logging continued at the same steps, once each
    assert "raise --total-timesteps" in bad_resume(run_dir, tmp_path, *flags[:-2])  # finished: refused


def test_der_stopped_during_its_evaluations_resumes_them_and_equals_an_uninterrupted_run(tmp_path):
    """DER evaluates during training and at the end (100 games by default, minutes on a CPU): a signal abandons the
    games, checkpoints and exits 75, and the resumed run plays the same evaluation first. Evaluations, parameters,
    returns and losses equal an uninterrupted run's (Top1 with load balancing, noisy nets, prioritized replay)."""
    flags = [*BASE, *ATARI100K[:2], "--env-id", "SpaceInvaders", "--moe-type", "top1", "--load-balancing-coef", "1",
             "--runs-dir", str(tmp_path), "--total-timesteps", "800", "--eval-every", "400", "--eval-episodes", "1",
             "--save-model"]
    full = run_script("der_softmoe", *flags, "--exp-name", "full")
    assert full.returncode == 0, full.stderr[-2000:]
    flags += ["--exp-name", "split", "--resume", "auto"]
    code, out, err = signalled_at("der_softmoe", flags, "evaluating 1 games at agent step 400", signal.SIGTERM)
    assert code == 75 and "SIGTERM at agent step 400: checkpoint written" in out, err[-2000:]
    assert "evaluation at agent step 400" not in out  # abandoned, not logged
    code, out, err = signalled_at("der_softmoe", flags, "evaluating 1 games at agent step 800", signal.SIGUSR1)
    assert code == 75 and "resumed at agent step 400" in out and "evaluation at agent step 400 over 1" in out, err[-2000:]
    assert "SIGUSR1 at agent step 800: checkpoint written" in out  # the final evaluation, after training
    last = run_script("der_softmoe", *flags)
    assert last.returncode == 0, last.stderr[-2000:]
    assert "resumed at agent step 800" in last.stdout and "evaluation at agent step 800 over 1" in last.stdout
    full_dir, split_dir = only(f"{tmp_path}/SpaceInvaders__full__1__*"), only(f"{tmp_path}/SpaceInvaders__split__1__*")
    a, b = (json.load(open(f"{d}/summary.json")) for d in (full_dir, split_dir))
    assert [e["step"] for e in b["evaluations"]] == [400, 800] and a["evaluations"] == b["evaluations"]
    ma = torch.load(f"{full_dir}/model.pt", weights_only=True)["model"]
    mb = torch.load(f"{split_dir}/model.pt", weights_only=True)["model"]
    assert ma.keys() == mb.keys() and all(torch.equal(ma[k], mb[k]) for k in ma)
    sa, sb = read_scalars(full_dir), read_scalars(split_dir)
    for key in ["charts/episodic_return", "charts/episodic_length", "losses/td_loss", "losses/aux_loss",
                "eval/episodic_return"]:
        assert sa[key] == sb[key], key
    assert [s for s, _ in sb["eval/episodic_return"]] == [400, 800] and len(sa["losses/td_loss"]) >= 3


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
                        "--checkpoint-every", "50", "--checkpoint-keep", "3")
    assert result.returncode == 0, result.stderr[-2000:]
    return only(f"{runs}/Breakout__*")


def test_checkpoints_keep_the_newest_k_and_hold_everything(checkpointed_run):
    paths = sorted(glob.glob(f"{checkpointed_run}/checkpoints/*"))
    assert [os.path.basename(p) for p in paths] == ["step_000000000300.pt", "step_000000000350.pt", "step_000000000400.pt"]
    state = torch.load(paths[-1], weights_only=True)
    for key in ["q_network", "target_network", "optimizer", "replay", "envs", "rng", "loop", "global_step", "args"]:
        assert key in state
    t, last = state["replay"]["t"], state["replay"]["last"][:, 0]
    assert t - int(last.sum()) == 400 and state["replay"]["frames"].shape == (t, 1, 84, 84)  # a reset step's slot: no step
    assert len(state["envs"]["actions"]) == 1
    # --replay-ratio 0.25 once the replay holds more than --learning-starts 300 slots: from the loop pass writing slot
    # 301 on, each played step (not a reset step) adds 0.25 credit; --target-network-frequency 200: the target is
    # synced after step 400's updates
    played = int((~last[301:t]).sum())
    assert 95 <= played <= 100 and int(state["optimizer"]["state"][0]["step"]) == played // 4
    assert all(torch.equal(state["target_network"][k], state["q_network"][k]) for k in state["q_network"])
    first = torch.load(paths[0], weights_only=True)  # step 300: no update yet, so the synced target is not the start
    assert not first["optimizer"]["state"]
    assert not all(torch.equal(first["q_network"][k], state["q_network"][k]) for k in state["q_network"])
    # step 350: a dozen updates later the target is still the one synced at step 200 (the start), not the online one
    middle = torch.load(paths[1], weights_only=True)
    assert int(middle["optimizer"]["state"][0]["step"]) > 0
    assert all(torch.equal(middle["target_network"][k], first["q_network"][k]) for k in first["q_network"])
    assert not all(torch.equal(middle["target_network"][k], middle["q_network"][k]) for k in middle["q_network"])


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


def test_resume_auto_skips_an_unfinished_run_with_other_flags(tmp_path):
    """A shortened look at an experiment (other --iteration-steps) left unfinished under the same exp name: the full
    run's --resume auto starts a run of its own, saying why, and leaves it be; the look's own flags resume it."""
    flags = [*BASE, "--runs-dir", str(tmp_path), "--exp-name", "look", "--checkpoint-every", "100", "--resume", "auto"]
    first = run_script("dqn_softmoe", *flags, "--total-timesteps", "200", "--iteration-steps", "20")
    assert first.returncode == 0, first.stderr[-2000:]
    look = only(f"{tmp_path}/Breakout__look__*")
    os.remove(f"{look}/summary.json")  # as if stopped before its end
    full = run_script("dqn_softmoe", *flags, "--total-timesteps", "200")
    assert full.returncode == 0, full.stderr[-2000:]
    assert f"--resume auto: not resuming {look}: checkpoint" in full.stdout
    assert "written with --iteration-steps 20 but this run has 250000" in full.stdout
    runs = sorted(glob.glob(f"{tmp_path}/Breakout__look__*"))
    assert len(runs) == 2 and not os.path.exists(f"{look}/summary.json")
    resumed = run_script("dqn_softmoe", *flags, "--total-timesteps", "300", "--iteration-steps", "20")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed at agent step 200" in resumed.stdout and "not resuming" not in resumed.stdout
    assert json.load(open(f"{look}/summary.json"))["global_step"] == 300


def test_truncated_checkpoint_is_refused(checkpointed_run, tmp_path):
    data = open(sorted(glob.glob(f"{checkpointed_run}/checkpoints/*"))[-1], "rb").read()
    path = tmp_path / "Breakout__trunc__1__1" / "checkpoints" / "step_000000000400.pt"
    path.parent.mkdir(parents=True)
    path.write_bytes(data[: len(data) // 2])
    assert "is unreadable (truncated, corrupt or not a checkpoint" in bad_resume(path, tmp_path)
    path.write_bytes(b"not a checkpoint at all")
    assert "is unreadable (truncated, corrupt or not a checkpoint" in bad_resume(path, tmp_path)


def test_finished_run_is_not_resumed_from_before_its_end(checkpointed_run):
    """Resuming a finished run from an earlier checkpoint would play its last steps again and overwrite its summary
    and curves: refused, the run untouched (bad_resume)."""
    earlier = sorted(glob.glob(f"{checkpointed_run}/checkpoints/*"))[0]
    line = bad_resume(earlier, os.path.dirname(checkpointed_run))
    assert "finished at agent step 400 but checkpoint" in line and "is at agent step 300" in line


def test_checkpoint_outside_its_run_is_refused(checkpointed_run, tmp_path):
    """A copied checkpoint file names no run: the run's files would land two folders above it."""
    loose = tmp_path / "loose" / "ck.pt"
    loose.parent.mkdir()
    shutil.copy(sorted(glob.glob(f"{checkpointed_run}/checkpoints/*"))[-1], loose)
    assert "a run continues from its own RUN/checkpoints/step_N.pt" in bad_resume(loose, tmp_path)


def test_resume_path_does_not_compare_runs_dir(dqn, checkpointed_run):
    """The checkpoint's path decides where the run continues; a moved run resumes without its old --runs-dir."""
    path = sorted(glob.glob(f"{checkpointed_run}/checkpoints/*"))[-1]
    saved = torch.load(path, weights_only=True, mmap=True)["args"]
    dqn.load_checkpoint(path, "dqn_softmoe.py", {**saved, "runs_dir": "/somewhere/else"}, mmap=True)
    with pytest.raises(ValueError, match="written with --seed"):
        dqn.load_checkpoint(path, "dqn_softmoe.py", {**saved, "seed": 7}, mmap=True)


def test_checkpoint_of_another_script_is_refused(tmp_path):
    """A real Rainbow checkpoint given to the DQN script."""
    result = run_script("rainbow_softmoe", *BASE, "--runs-dir", str(tmp_path), "--total-timesteps", "100",
                        "--checkpoint-every", "100", "--learning-starts", "1000", "--exp-name", "dqn_softmoe")
    assert result.returncode == 0, result.stderr[-2000:]
    path = only(f"{tmp_path}/*/checkpoints/*.pt")
    assert "was written by rainbow_softmoe.py, not dqn_softmoe.py" in bad_resume(path, tmp_path)


def test_checkpoint_of_an_older_format_is_refused(dqn, tmp_path):
    """Format 1 (before the lagged actor and per-segment reseeding) lacks what a resume needs: one clear line."""
    path = tmp_path / "old.pt"
    torch.save({"format": 1, "script": "dqn_softmoe.py", "args": {}}, path)
    with pytest.raises(ValueError, match="has format 1, this script reads format 3; resume it with the version"):
        dqn.load_checkpoint(str(path), "dqn_softmoe.py", {})


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


def test_resumed_run_dir_by_hand(dqn, tmp_path):
    """Which checkpoint may continue a run: below the end; at the end only while that end has no summary.json (one
    written by an earlier, shorter end does not count); never before the end of a finished run."""
    path = tmp_path / "Breakout__x__1__1" / "checkpoints" / "step_000000000800.pt"
    path.parent.mkdir(parents=True)
    path.touch()
    run = str(path.parent.parent)
    assert dqn.resumed_run_dir(str(path), 800, 1000, "agent step", "fix") == run
    assert dqn.resumed_run_dir(str(path), 800, 800, "agent step", "fix") == run  # stopped during the final evaluation
    (path.parent.parent / "summary.json").write_text(json.dumps({"global_step": 400}))
    assert dqn.resumed_run_dir(str(path), 800, 800, "agent step", "fix") == run  # extended from 400, not yet finished
    (path.parent.parent / "summary.json").write_text(json.dumps({"global_step": 800}))
    with pytest.raises(ValueError, match="is at agent step 800, not below fix"):
        dqn.resumed_run_dir(str(path), 800, 800, "agent step", "fix")
    assert dqn.resumed_run_dir(str(path), 800, 900, "agent step", "fix") == run  # extending a finished run
    (path.parent.parent / "summary.json").write_text(json.dumps({"global_step": 900}))
    with pytest.raises(ValueError, match="finished at agent step 900 but checkpoint"):
        dqn.resumed_run_dir(str(path), 800, 1000, "agent step", "fix")
