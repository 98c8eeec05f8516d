"""Launch planned runs: N at a time on this machine, or as a Slurm array through submitit.

Both paths skip runs that already finished (a run directory with `summary.json` whose arguments match
the planned command), so an interrupted sweep resumes by running the same command again. Runs write
where the scripts put them (`{runs_dir}/{Game}__{exp_name}__{seed}__{time}/`); nothing is ever deleted.

Preemption (SPEC: scripts checkpoint and exit 75 on SIGTERM/SIGUSR1/SIGUSR2): the local launcher sends
SIGTERM to its runs on Ctrl-C; the submitit job forwards Slurm's preemption signal to its run and requeues
the job when the run exits with 75. Runs are started with `--resume auto` when the script supports it,
so a requeued or relaunched run continues from its checkpoint.
"""

from __future__ import annotations

import sys

if __name__ == "__main__":  # a library module, not a command: say which one to run
    print("launch.py: error: this module is a library; run python benchmark/run.py --help", file=sys.stderr)
    sys.exit(2)

import concurrent.futures
import contextlib
import dataclasses
import functools
import io
import json
import os
import queue
import shlex
import signal
import subprocess
import threading
import time

from benchmark.registry import ROOT, SCRIPTS, BenchmarkError, Run, flag_args, load_script_module, split_flags

EXIT_PREEMPTED = 75  # EX_TEMPFAIL, the scripts' "checkpointed, run me again"
# may differ between a plan and its finished run: where it writes (runs_dir), reads the data (dataset_dir) and prints
# (print_every), how it was started (resume), on which device (cuda) and where its replay's frames live
# (gpu_replay_fraction), and what it saves besides its logs (save_*; checkpoint_every/keep: a resumed run ends as an
# uninterrupted one, tests/test_long_runs.py): never scores or curves
IGNORED_WHEN_MATCHING = {"runs_dir", "dataset_dir", "print_every", "resume", "cuda", "gpu_replay_fraction",
                         "save_model", "save_replay", "checkpoint_every", "checkpoint_keep"}
IDENTITY_ARGS = {"env_id", "seed", "exp_name"}  # in the run directory's name, which matched first
NOT_COMPARED = IGNORED_WHEN_MATCHING | IDENTITY_ARGS


# ----------------------------------------------------------------------------------------------------
# Which runs are done
# ----------------------------------------------------------------------------------------------------
def index_run_dirs(runs_dir: str) -> dict[str, list[str]]:
    """{`{Game}__{exp_name}__{seed}`: its run directories `...__{unix_time}`, oldest first}, from one listing."""
    found: dict[str, list[tuple[int, str]]] = {}
    try:
        entries = list(os.scandir(runs_dir))
    except (FileNotFoundError, NotADirectoryError):
        return {}
    for entry in entries:
        key, _, stamp = entry.name.rpartition("__")
        if key.count("__") == 2 and stamp.isdigit() and entry.is_dir():
            found.setdefault(key, []).append((int(stamp), entry.path))
    return {key: [path for _, path in sorted(dirs)] for key, dirs in found.items()}


def run_dirs(run: Run, runs_dir: str, index: dict | None = None) -> list[str]:
    """Directories `{Game}__{exp_name}__{seed}__{unix_time}` of this run, oldest first."""
    return (index_run_dirs(runs_dir) if index is None else index).get(run.key, [])


def same_value(planned: str | bool, logged) -> bool:
    if isinstance(logged, bool) or isinstance(planned, bool):
        return str(planned).lower() == str(logged).lower()
    try:
        return float(planned) == float(logged)
    except (TypeError, ValueError):
        return str(planned) == str(logged)


@functools.lru_cache(maxsize=None)
def script_args(script: str, flags: tuple[str, ...]) -> tuple[dict, dict] | None:
    """(every field of the Args the script makes of `flags`, as its summary.json logs them; the fields' defaults),
    or None when the script is missing or cannot be imported. Cached: one parse per variant of a plan."""
    if not SCRIPTS[script].exists():
        return None
    try:
        module = load_script_module(script)
    except Exception:  # a script being edited: supports_resume() has warned; its given flags are compared
        return None
    import tyro

    text = io.StringIO()
    try:
        with contextlib.redirect_stderr(text), contextlib.redirect_stdout(text):
            args = tyro.cli(module.Args, args=list(flags))
    except SystemExit:
        from benchmark.run import tyro_message

        raise BenchmarkError(f"{script}.py rejects `{shlex.join(flags)}`: {tyro_message(text.getvalue())}")
    if hasattr(module, "with_agent_defaults"):  # what the script runs with and logs (cql: --agent's values)
        args = module.with_agent_defaults(args)
    defaults = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                for f in dataclasses.fields(module.Args)
                if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING}
    as_logged = lambda values: json.loads(json.dumps(values, default=str))  # noqa: E731  (tuples become lists)
    return as_logged(vars(args)), as_logged(defaults)


def parsed_plan(run: Run) -> tuple[dict, dict] | None:
    """script_args of the run's flags, without those never compared: one parse serves every run of a variant."""
    return script_args(run.script, tuple(token for name, part in split_flags(run.flags)
                                         if name.replace("-", "_") not in NOT_COMPARED for token in part))


def planned_args(run: Run) -> dict:
    """Every argument the run's script will log for it (only the flags given when the script cannot tell)."""
    parsed = parsed_plan(run)
    return flag_args(run.flags) if parsed is None else parsed[0]


def differing_arg(run: Run, logged: dict) -> str | None:
    """The first argument of the planned run that the finished run (its summary.json's args) had otherwise, or None
    when it is this run. The one test of both the launcher (skip as finished) and the report (the runs it reads)."""
    parsed = parsed_plan(run)
    if parsed is None:  # no Args to parse with: compare the flags given, as the command line has them
        planned, defaults, same = {k: v for k, v in flag_args(run.flags).items() if k in logged}, {}, same_value
    else:  # JSON values on both sides (1 == 1.0, tuples as lists)
        (planned, defaults), same = parsed, lambda a, b: a == b  # noqa: E731
    for key, value in planned.items():  # (a field only the run logged, since removed, cannot be planned)
        if key in NOT_COMPARED:
            continue
        # a field missing from summary.json is one the run's (older) script did not have yet: that script ran as
        # the field's default does, so the run matches a plan that leaves the field at its default
        if key not in logged and key not in defaults or not same(value, logged.get(key, defaults.get(key))):
            return key
    return None


def args_match(run: Run, logged: dict) -> bool:
    return differing_arg(run, logged) is None


def logged_args(path: str) -> dict | None:
    """The arguments a finished run logged in its summary.json; None when unfinished or unreadable."""
    try:
        with open(os.path.join(path, "summary.json")) as f:
            logged = json.load(f).get("args", {})
    except (OSError, ValueError, AttributeError):
        return None
    return logged if isinstance(logged, dict) else None


def finished_dir(run: Run, runs_dir: str, index: dict | None = None) -> str | None:
    """The newest finished run directory of this run (summary.json, matching arguments), or None."""
    for path in reversed(run_dirs(run, runs_dir, index)):
        logged = logged_args(path)
        if logged is not None and args_match(run, logged):
            return path
    return None


def runs_dir_of(run: Run) -> str:
    """The --runs-dir a run writes to (the scripts' default: runs)."""
    found = [part[1] for name, part in split_flags(run.flags) if name == "runs-dir" and len(part) > 1]
    return found[-1] if found else "runs"


def split_done(runs: list[Run], runs_dir: str) -> tuple[list[Run], list[Run]]:
    """(runs still to do, runs already finished)."""
    todo, done, index = [], [], index_run_dirs(runs_dir)
    for run in runs:
        (done if finished_dir(run, runs_dir, index) else todo).append(run)
    return todo, done


# ----------------------------------------------------------------------------------------------------
# Local: N at a time, spread over GPUs and CPU threads
# ----------------------------------------------------------------------------------------------------
def visible_gpus() -> list[str]:
    """GPU ids this process may use: CUDA_VISIBLE_DEVICES when set, else every GPU torch sees."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g for g in env.split(",") if g.strip() and g.strip() != "-1"]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:  # no torch or no driver: CPU only
        return []


def child_env(gpu: str, threads: int) -> dict:
    """The run's environment: its GPU ("" = none) and its share of the CPU threads."""
    return dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
                CUDA_VISIBLE_DEVICES=gpu)


def launch_local(runs: list[Run], jobs: int = 1, gpus: list[str] | None = None, threads: int | None = None,
                 log_dir: str = "runs/launcher-logs", python: str = sys.executable, say=print) -> dict[str, list[Run]]:
    """Run `runs` with at most `jobs` at a time; run i gets GPU gpus[i % len(gpus)] and `threads` CPU threads.

    gpus: None = every visible GPU; [] = none (the runs see no GPU).

    Each run's output goes to `{log_dir}/{Game}__{exp_name}__{seed}.log` (appended). Ctrl-C sends SIGTERM to
    the running scripts (they checkpoint and exit 75) and returns; so does a SIGTERM to the launcher. Rerun the same
    command to continue.
    Returns {"finished": [...], "failed": [...], "interrupted": [...], "not_started": [...]}.
    """
    gpus = visible_gpus() if gpus is None else gpus
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    threads = threads if threads is not None else max(1, (os.cpu_count() or 1) // jobs)
    slots: queue.Queue = queue.Queue()
    for i in range(jobs):
        slots.put(gpus[i % len(gpus)] if gpus else "")
    os.makedirs(log_dir, exist_ok=True)
    stop = threading.Event()
    live: dict[int, subprocess.Popen] = {}
    outcome: dict[str, list[Run]] = {"finished": [], "failed": [], "interrupted": [], "not_started": []}
    lock = threading.Lock()
    total = len(runs)

    def one(index: int, run: Run) -> None:
        gpu = slots.get()
        try:
            if stop.is_set():
                with lock:
                    outcome["not_started"].append(run)
                return
            log_path = os.path.join(log_dir, f"{run.key}.log")
            command = run.command(python)
            where = f" on GPU {gpu}" if gpu else ""
            say(f"[{index}/{total}] start {run.game} {run.exp_name} seed {run.seed}{where}")
            start = time.time()
            with open(log_path, "a") as log:
                log.write(f"\n$ {shlex.join(command)}\n")
                log.flush()
                # a new session: a Ctrl-C in the terminal reaches the launcher only, which stops runs cleanly
                proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=child_env(gpu, threads),
                                        start_new_session=True)
                with lock:
                    live[proc.pid] = proc
                code = proc.wait()
                with lock:
                    live.pop(proc.pid, None)
            took = time.time() - start
            if code == 0:
                kind, text = "finished", f"done in {took:.0f}s"
            elif code == EXIT_PREEMPTED:
                kind, text = "interrupted", "interrupted (checkpointed, exit 75)"
            elif stop.is_set() and code == -signal.SIGTERM:
                kind, text = "interrupted", "interrupted (stopped before it could checkpoint)"
            else:
                kind, text = "failed", f"FAILED with exit code {code}; log: {log_path}"
            with lock:
                outcome[kind].append(run)
            say(f"[{index}/{total}] {text}: {run.game} {run.exp_name} seed {run.seed}")
        finally:
            slots.put(gpu)

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}  # Ctrl-C or kill
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=jobs)
    futures = [pool.submit(one, i + 1, run) for i, run in enumerate(runs)]
    try:
        for future in concurrent.futures.as_completed(futures):
            future.result()
    except KeyboardInterrupt:
        stop.set()
        say("interrupted: asking the running scripts to checkpoint and stop (SIGTERM) ...")
        with lock:
            procs = list(live.values())
        for proc in procs:
            try:
                proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
        concurrent.futures.wait(futures)
    finally:
        pool.shutdown(wait=True)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return outcome


# ----------------------------------------------------------------------------------------------------
# Slurm through submitit
# ----------------------------------------------------------------------------------------------------
try:
    from submitit.helpers import Checkpointable as _Checkpointable
    from submitit.helpers import DelayedSubmission as _DelayedSubmission
except ImportError:  # submitit is only needed for the cluster path
    _Checkpointable, _DelayedSubmission = object, None


def preempt_signal() -> signal.Signals:
    """The signal submitit uses for preemption and time limits (USR2 unless SUBMITIT_PREEMPT_SIGNAL says otherwise)."""
    return getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"))


class RunJob(_Checkpointable):
    """Runs as one submitit job: starts each script as a child process, all at once (with --runs-per-job, they share
    the job's GPUs), and waits for them.

    On the preemption/time-limit signal, submitit calls `checkpoint()`, which forwards the signal to the scripts,
    waits up to `grace_s` for their checkpoints, and returns a job of the runs that did not finish for submitit to
    requeue. When a script exits with 75 by itself (SIGTERM forwarded, or any other stop), the job requeues the runs
    that exited with 75 once the others have ended. A run that fails is reported and not requeued. A (re)started
    job skips runs that have finished meanwhile (summary.json), so a run never starts over in a new directory.
    """

    def __init__(self, runs: list[Run], cwd: str, env: dict, python: str = sys.executable, grace_s: float = 80.0):
        self.runs, self.cwd, self.env, self.python, self.grace_s = list(runs), cwd, dict(env), python, grace_s
        self.commands: list[list[str]] = []  # of the runs started by __call__
        self._procs: list[subprocess.Popen] = []

    def __getstate__(self):  # the child processes do not travel with the pickled job
        return {k: v for k, v in self.__dict__.items() if k != "_procs"}

    def __setstate__(self, state):
        self.__dict__.update(state, _procs=[])

    def _forward(self, signum, frame=None) -> None:
        for proc in self._procs:
            if proc.poll() is None:
                proc.send_signal(signum)

    @staticmethod
    def _relay(proc: subprocess.Popen, prefix: str) -> None:
        for line in proc.stdout:  # one run's lines, tagged, into the job's log
            sys.stdout.write(prefix + line)
            sys.stdout.flush()

    def _unfinished(self) -> list[Run]:
        """Runs to requeue: those that checkpointed (75), were stopped by a signal, or are still running."""
        return [r for r, p in zip(self.runs, self._procs)
                if p.poll() is None or p.returncode == EXIT_PREEMPTED or p.returncode < 0]

    def _failed(self) -> list[tuple[list[str], int]]:
        """Runs that ended with an error or were killed (an out-of-memory kill is -9), not by a checkpoint (75)."""
        return [(c, p.returncode) for c, p in zip(self.commands, self._procs)
                if p.poll() is not None and p.returncode not in (0, EXIT_PREEMPTED)]

    def __call__(self) -> dict:
        finished = [r for r in self.runs if finished_dir(r, os.path.join(self.cwd, runs_dir_of(r)))]
        for run in finished:
            print(f"already finished: {run.key}", flush=True)
        self.runs = [r for r in self.runs if r not in finished]
        self.commands = [run.command(self.python) for run in self.runs]
        if not self.runs:
            return {"commands": [], "returncodes": []}
        packed = len(self.commands) > 1
        gpus = visible_gpus() if packed else []  # the job's GPUs (Slurm sets CUDA_VISIBLE_DEVICES)
        self._procs = []
        for i, (run, command) in enumerate(zip(self.runs, self.commands)):
            env = dict(os.environ, **self.env)
            if gpus:  # a script uses its first visible GPU: packed runs go round robin over the job's GPUs
                env["CUDA_VISIBLE_DEVICES"] = gpus[i % len(gpus)]
            print(f"$ {shlex.join(command)}" + (f"  (GPU {env['CUDA_VISIBLE_DEVICES']})" if gpus else ""), flush=True)
            # a new session: signals reach the scripts through this job only, once
            proc = subprocess.Popen(command, cwd=self.cwd, env=env, start_new_session=True,
                                    **(dict(stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) if packed else {}))
            if packed:
                threading.Thread(target=self._relay, args=(proc, f"[{run.key}] "), daemon=True).start()
            self._procs.append(proc)
        signal.signal(signal.SIGTERM, self._forward)  # submitit ignores SIGTERM; the scripts checkpoint on it
        # poll, not wait(): a blocking wait() holds Popen's lock, and checkpoint() (run inside submitit's signal
        # handler, on this thread) could then neither see the scripts exit nor wait for them
        while any(proc.poll() is None for proc in self._procs):
            time.sleep(0.5)
        failed = self._failed()
        for command, code in failed:
            print(f"FAILED with exit code {code}: {shlex.join(command)}", flush=True)
        if any(proc.returncode == EXIT_PREEMPTED for proc in self._procs):
            print(f"{len(self._unfinished())} of {len(self.commands)} runs checkpointed and exited with 75: requeueing "
                  "them", flush=True)
            handler = signal.getsignal(preempt_signal())
            if callable(handler):  # submitit's handler: calls checkpoint() below, requeues, exits
                os.kill(os.getpid(), preempt_signal())
                time.sleep(5)  # the handler runs before this returns
            raise RuntimeError("a run was interrupted (exit 75) and this executor cannot requeue; submit it again")
        if failed:
            raise RuntimeError(f"{len(failed)} of {len(self.commands)} runs failed: "
                               + "; ".join(f"{shlex.join(c)} exited with code {code}" for c, code in failed))
        return {"commands": self.commands, "returncodes": [proc.returncode for proc in self._procs]}

    def checkpoint(self, *args, **kwargs):
        running = [proc for proc in self._procs if proc.poll() is None]
        if running:
            print(f"forwarding {preempt_signal().name} to {len(running)} runs and waiting for their checkpoints",
                  flush=True)
            for proc in running:
                proc.send_signal(preempt_signal())
            deadline = time.time() + self.grace_s
            for proc in running:
                try:
                    proc.wait(timeout=max(0.0, deadline - time.time()))
                except subprocess.TimeoutExpired:
                    print(f"a run did not stop within {self.grace_s:.0f}s", flush=True)
        todo = self._unfinished() if self._procs else self.runs  # requeued before it started: all of them
        return _DelayedSubmission(RunJob(todo, self.cwd, self.env, self.python, self.grace_s))


def launch_submitit(runs: list[Run], folder: str, cluster: str = "slurm", partition: str | None = None,
                    time_min: int = 1440, gpus_per_run: int = 1, cpus_per_run: int = 4, mem_gb: float | None = None,
                    array_parallelism: int = 256, account: str | None = None, qos: str | None = None,
                    constraint: str | None = None, max_requeues: int = 20, setup: list[str] | None = None,
                    name: str = "benchmark", python: str = sys.executable, runs_per_job: int = 1) -> list:
    """Submit the runs as one Slurm array through submitit, `runs_per_job` runs per job; returns the jobs.

    A job gets `gpus_per_run` GPUs, which its runs share (one 1-env run leaves most of a modern GPU idle), and
    `cpus_per_run` cores and `mem_gb` of memory per run. cluster "local" or "debug" runs the same jobs on this
    machine with submitit's local/debug executor.
    """
    if runs_per_job < 1:
        raise ValueError(f"--runs-per-job must be at least 1, got {runs_per_job}")
    import submitit

    executor = submitit.AutoExecutor(folder=folder, cluster=cluster, slurm_max_num_timeout=max_requeues)
    params = dict(name=name, timeout_min=time_min, gpus_per_node=gpus_per_run, tasks_per_node=1,
                  cpus_per_task=cpus_per_run * min(runs_per_job, len(runs)))
    if mem_gb:
        params["mem_gb"] = mem_gb * min(runs_per_job, len(runs))
    if cluster == "slurm":
        extra = {k: v for k, v in (("account", account), ("qos", qos), ("constraint", constraint)) if v}
        params.update(slurm_array_parallelism=array_parallelism, slurm_additional_parameters=extra,
                      slurm_setup=[f"export PYTHONPATH={shlex.quote(ROOT)}${{PYTHONPATH:+:$PYTHONPATH}}",
                                   *(setup or [])])
        if partition:
            params["slurm_partition"] = partition
    elif cluster == "local" and setup:
        params["local_setup"] = list(setup)
    executor.update_parameters(**params)
    cwd = os.getcwd()
    env = {"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(cpus_per_run), "MKL_NUM_THREADS": str(cpus_per_run)}
    python_path = ROOT + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else "")
    with submitit.helpers.environment_variables(PYTHONPATH=python_path):  # workers unpickle benchmark.launch.RunJob
        with executor.batch():
            jobs = [executor.submit(RunJob(runs[i:i + runs_per_job], cwd, env, python))
                    for i in range(0, len(runs), runs_per_job)]
    return jobs
