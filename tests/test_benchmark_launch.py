"""benchmark/run.py and launch.py with real tiny runs of dqn_softmoe.py: the local launcher (N at a time, finished
runs skipped, then the report), and the Slurm path through submitit's local executor, preemption included."""

import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import tyro

from conftest import ROOT, load_script

sys.path.insert(0, ROOT)
from benchmark.launch import RunJob, launch_submitit  # noqa: E402
from benchmark.registry import EXPERIMENTS, plan, split_flags, supports_resume  # noqa: E402

TINY = ["--games", "Breakout", "--seeds", "1", "--steps", "300"]
SCRIPT_FLAGS = ["--", "--encoder", "nature", "--learning-starts", "290", "--metrics-every", "0", "--no-cuda"]


def run_py(*args, cwd):
    return subprocess.run([sys.executable, os.path.join(ROOT, "benchmark", "run.py"), *args], capture_output=True,
                          text=True, cwd=cwd, timeout=300)


def finished(runs_dir):
    return sorted(os.path.basename(os.path.dirname(p)) for p in glob.glob(os.path.join(runs_dir, "*", "summary.json")))


def test_local_launch_skips_finished_runs_and_reports(tmp_path, capsys):
    runs = str(tmp_path / "runs")
    first = run_py("fig1", "--variants", "dqn-baseline-1", *TINY, "--runs-dir", runs, *SCRIPT_FLAGS, cwd=tmp_path)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "1 runs planned, 0 already finished, 1 to run" in first.stdout
    (done,) = finished(runs)
    assert done.startswith("Breakout__fig1-dqn-baseline-1__1__")

    # the same sweep with two more variants: the finished run is skipped, the two others run side by side
    second = run_py("fig1", "--variants", "dqn-baseline-1", "dqn-softmoe-1", "dqn-softmoe-2", *TINY, "--runs-dir", runs,
                    "--jobs", "2", "--report", "--reps", "200", "--curve-reps", "20", "--poi-reps",
                    "20", "--workers", "1", *SCRIPT_FLAGS, cwd=tmp_path)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "3 runs planned, 1 already finished, 2 to run" in second.stdout
    names = finished(runs)
    assert len(names) == 3 and done in names  # nothing rerun, nothing deleted
    for name in names:
        summary = json.load(open(os.path.join(runs, name, "summary.json")))
        assert summary["global_step"] == 300 and summary["args"]["resume"] == "auto"
        assert os.path.exists(os.path.join(runs, "launcher-logs", name.rsplit("__", 1)[0] + ".log"))
    out = tmp_path / "results" / "fig1-steps300"  # a quick look's report: never over the full one in results/fig1
    assert not (tmp_path / "results" / "fig1").exists()
    for name in ("returns.csv", "final_scores.csv", "aggregates.csv", "summary.md", "fig1_iqm_vs_number-of-experts.png"):
        assert (out / name).stat().st_size > 0, name
    assert "| SoftMoE (2 experts) | `fig1-dqn-softmoe-2` |" in (out / "summary.md").read_text()

    dry = run_main(capsys, "fig1", "--variants", "dqn-*-1", "dqn-softmoe-2", *TINY, "--runs-dir", runs, "--dry-run",
                   *SCRIPT_FLAGS)
    lines = [line for line in dry.splitlines() if "dqn_softmoe.py" in line]
    assert len(lines) == 4 and sum(line.startswith("# finished: ") for line in lines) == 3  # dqn-top1-1 is to run

    # a different budget is a different run: not mistaken for the finished one
    other = run_main(capsys, "fig1", "--variants", "dqn-baseline-1", *TINY[:-1], "400", "--runs-dir", runs, "--dry-run",
                     *SCRIPT_FLAGS)
    assert "0 finished, 1 to run" in other


def test_local_slots_are_spread_over_the_gpus_with_their_threads(tmp_path):
    """--jobs N: N slots spread round robin over the GPUs; each run gets its slot's GPU and --threads-per-run."""
    from benchmark.launch import launch_local

    python = tmp_path / "fake-python"  # stands in for the interpreter: records the GPU and threads each run was given
    python.write_text(f"#!/bin/sh\necho \"$CUDA_VISIBLE_DEVICES $OMP_NUM_THREADS\" > {tmp_path}/run-$$\n")
    python.chmod(0o755)
    runs = plan(EXPERIMENTS["fig1"], variants=["dqn-softmoe-1"], games=["Breakout"], seeds=4, steps=300,
                runs_dir=str(tmp_path / "runs"), resume=False)
    said = []
    outcome = launch_local(runs, jobs=2, gpus=["0", "1"], threads=3, log_dir=str(tmp_path / "logs"),
                           python=str(python), say=said.append)
    assert len(outcome["finished"]) == 4
    seen = sorted(open(p).read().split() for p in glob.glob(f"{tmp_path}/run-*"))
    assert {gpu for gpu, _ in seen} == {"0", "1"} and {threads for _, threads in seen} == {"3"}
    assert any("on GPU 0" in line for line in said) and any("on GPU 1" in line for line in said)
    with pytest.raises(ValueError, match="threads must be at least 1"):  # 0 is refused, not replaced by the default
        launch_local(runs, jobs=1, gpus=[], threads=0, log_dir=str(tmp_path / "logs"), python=str(python))


def run_main(capsys, *args):
    """benchmark/run.py in this process (a dry run starts nothing)."""
    from benchmark import run

    capsys.readouterr()
    assert run.main(list(args)) == 0
    return capsys.readouterr().out


def fake_finished(run, drop=(), stamp=1_700_000_000):
    """A finished run directory of a planned run, without training: summary.json's args as the script logs them
    (every field of its Args, from its own parser), less the fields in `drop` (a run of an older script)."""
    module = load_script(run.script)
    args = json.loads(json.dumps(vars(tyro.cli(module.Args, args=list(run.flags)))))
    path = os.path.join(dict(split_flags(run.flags))["runs-dir"][1], f"{run.key}__{stamp}")
    os.makedirs(path)
    with open(os.path.join(path, "summary.json"), "w") as f:
        json.dump({"args": {k: v for k, v in args.items() if k not in drop}}, f)


def test_a_run_with_other_flags_is_not_a_finished_run_of_the_plan(tmp_path, capsys):
    """A quick look launched with flags after `--` (the Nature CNN) is not a finished run of the plain plan (Impala by
    default), nor the other way round; flags that change no score or curve (device, logging, checkpoints) may differ."""
    runs = str(tmp_path / "runs")
    quick = ["fig1", "--variants", "dqn-*-1", "--games", "Breakout", "--seeds", "2", "--steps", "600", "--runs-dir",
             runs, "--dry-run"]
    nature = ["--encoder", "nature", "--learning-starts", "500", "--metrics-every", "0"]
    for run in plan(EXPERIMENTS["fig1"], variants=["dqn-*-1"], games=["Breakout"], seeds=2, steps=600, runs_dir=runs,
                    extra=nature):
        fake_finished(run)
    assert "6 finished, 0 to run" in run_main(capsys, *quick, "--", *nature)
    assert "0 finished, 6 to run" in run_main(capsys, *quick)
    assert "0 finished, 6 to run" in run_main(capsys, *quick, "--", *nature[:2])
    assert "6 finished, 0 to run" in run_main(capsys, *quick, "--", *nature, "--no-cuda", "--print-every", "7",
                                              "--checkpoint-every", "100", "--checkpoint-keep", "2", "--save-model")
    # the plan of every run, from the script's own parser with its defaults: a default given explicitly is the same
    assert "6 finished, 0 to run" in run_main(capsys, *quick, "--", *nature, "--encoder-scale", "1", "--loss", "mse")
    assert "0 finished, 6 to run" in run_main(capsys, *quick, "--", *nature, "--loss", "huber")


def test_an_older_run_without_a_newer_field_ran_as_its_default(tmp_path, capsys):
    """summary.json of a script from before a field existed: the run matches a plan that leaves the field at its
    default, not one that sets it otherwise."""
    runs = str(tmp_path / "runs")
    (run,) = plan(EXPERIMENTS["fig1"], variants=["dqn-baseline-1"], games=["Breakout"], seeds=1, steps=600,
                  runs_dir=runs)
    fake_finished(run, drop=("loss", "lagged_actor"))
    quick = ["fig1", "--variants", "dqn-baseline-1", "--games", "Breakout", "--seeds", "1", "--steps", "600",
             "--runs-dir", runs, "--dry-run"]
    assert "1 finished, 0 to run" in run_main(capsys, *quick)
    assert "0 finished, 1 to run" in run_main(capsys, *quick, "--", "--loss", "huber")


def test_slurm_path_with_submitits_local_executor(tmp_path, capsys):
    runs = str(tmp_path / "runs")
    result = run_py("fig1", "--variants", "dqn-softmoe-1", *TINY, "--runs-dir", runs, "--launcher", "slurm",
                    "--submitit-cluster", "local", "--gpus-per-run", "0", "--cpus-per-run", "1", "--time-min", "10",
                    *SCRIPT_FLAGS, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 jobs finished" in result.stdout
    (name,) = finished(runs)
    assert name.startswith("Breakout__fig1-dqn-softmoe-1__1__")
    assert glob.glob(os.path.join(runs, "submitit", "*", "*_log.out"))  # submitit's logs, beside the runs
    # a requeued job whose run finished meanwhile (e.g. signalled while exiting) skips it instead of starting over
    (run,) = plan(EXPERIMENTS["fig1"], variants=["dqn-softmoe-1"], games=["Breakout"], seeds=1, steps=300,
                  runs_dir=runs, extra=SCRIPT_FLAGS[1:])
    assert RunJob([run], str(tmp_path), {})() == {"commands": [], "returncodes": []}
    assert f"already finished: {run.key}" in capsys.readouterr().out and len(finished(runs)) == 1


def test_packed_job_spreads_its_runs_over_the_jobs_gpus(tmp_path, monkeypatch, capsys):
    """Each script uses its first visible GPU: a job's K runs must not all land on the job's first GPU."""
    python = tmp_path / "fake-python"  # stands in for the interpreter: records the GPU each run was given
    python.write_text(f"#!/bin/sh\necho \"$CUDA_VISIBLE_DEVICES\" > {tmp_path}/gpu-$$\n")
    python.chmod(0o755)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    runs = plan(EXPERIMENTS["fig1"], variants=["dqn-softmoe-1"], games=["Breakout"], seeds=3, steps=300,
                runs_dir=str(tmp_path / "runs"), resume=False)
    assert RunJob(runs, str(tmp_path), {}, str(python))()["returncodes"] == [0, 0, 0]
    assert sorted(open(p).read().strip() for p in glob.glob(f"{tmp_path}/gpu-*")) == ["3", "3", "5"]
    assert "(GPU 5)" in capsys.readouterr().out


def children(pid: int) -> list[int]:
    found = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            fields = open(stat).read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.split("/")[2]))
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the job's process in /proc")
def test_packed_submitit_job_forwards_preemption_and_requeues_the_unfinished_run(tmp_path):
    assert supports_resume("dqn_softmoe")  # requeued runs resume; without --resume this test has nothing to check
    runs_dir = str(tmp_path / "runs")
    flags = ["--encoder", "nature", "--buffer-size", "2000", "--metrics-every", "0", "--no-cuda"]
    # two runs in one job (--runs-per-job 2): a short one that finishes, and random play only (learning starts at
    # the end) long enough to be preempted twice
    (short,) = plan(EXPERIMENTS["fig1"], variants=["dqn-softmoe-1"], games=["Breakout"], seeds=1, steps=300,
                    runs_dir=runs_dir, extra=[*flags, "--learning-starts", "300"])
    (long,) = plan(EXPERIMENTS["fig1"], variants=["dqn-baseline-1"], games=["Breakout"], seeds=1, steps=8_000,
                   runs_dir=runs_dir, extra=[*flags, "--learning-starts", "8000"])
    (job,) = launch_submitit([short, long], str(tmp_path / "submitit" / "%j"), cluster="local", gpus_per_run=0,
                             cpus_per_run=1, time_min=60, runs_per_job=2)  # signalled well before its time limit
    deadline = time.time() + 150
    while not glob.glob(os.path.join(runs_dir, "Breakout__fig1-dqn-softmoe-1__*", "summary.json")):  # short: done
        assert time.time() < deadline and job.state != "FINISHED", job.stdout()
        time.sleep(0.2)
    (worker,) = children(job._process.pid)  # the submitit task running RunJob (the controller's child)
    while len(children(worker)) > 1:  # the short run's process has exited
        assert time.time() < deadline, job.stdout()
        time.sleep(0.1)
    os.kill(worker, signal.SIGUSR2)  # what Slurm sends before a preemption or the time limit
    while "resumed at agent step" not in job.stdout():  # requeued: a new task continues the long run only
        assert time.time() < deadline and job.state != "FINISHED", job.stdout()
        time.sleep(0.1)
    time.sleep(0.3)  # the script's signal handlers are installed right after that line
    (worker,) = children(job._process.pid)
    os.kill(worker, signal.SIGTERM)  # forwarded to the script, which checkpoints and exits 75: the job requeues itself
    job.result()  # waits through the requeues; raises if the job failed
    log = job.stdout()
    # both runs' output, tagged with their names, in the job's log
    assert f"[{short.key}] done: 300 agent steps" in log and f"[{long.key}] SIGUSR2 at agent step" in log
    assert "forwarding SIGUSR2 to 1 runs" in log
    assert "SIGTERM at agent step" in log and "1 of 1 runs checkpointed and exited with 75: requeueing" in log
    assert log.count("resumed at agent step") == 2 and log.count("--exp-name fig1-dqn-softmoe-1") == 1  # short ran once
    (run_dir,) = glob.glob(os.path.join(runs_dir, "Breakout__fig1-dqn-baseline-1__*"))  # continued in place
    assert json.load(open(os.path.join(run_dir, "summary.json")))["global_step"] == 8_000
    (short_dir,) = glob.glob(os.path.join(runs_dir, "Breakout__fig1-dqn-softmoe-1__*"))
    assert json.load(open(os.path.join(short_dir, "summary.json")))["global_step"] == 300
    assert "this job is preempted" in job.stderr()
