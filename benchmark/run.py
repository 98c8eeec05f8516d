"""Plan, launch and report the paper's experiments.

    python benchmark/run.py --list                                   # the experiments and their sizes
    python benchmark/run.py fig1 --dry-run                           # the paper's plan: every command
    python benchmark/run.py fig1 --jobs 8                            # run it here, 8 at a time over the GPUs
    python benchmark/run.py fig1 --launcher slurm --partition gpu    # one Slurm array job, one GPU per run
    python benchmark/run.py fig1 --variants 'dqn-*' --games Pong Breakout --seeds 2 --steps 100000 --report \\
        -- --learning-starts 5000                                     # a quick look; flags after -- go to every run

Finished runs (summary.json with the same arguments) are skipped, so rerunning a command resumes the sweep.
`benchmark/report.py` (or --report here) turns the runs into CSV tables, statistics and figures; give it the same
--steps, --tag and flags after `--`: it reads the runs this command skips as finished.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
from collections import Counter

if __package__ in (None, ""):  # run as a script: make `benchmark` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmark.registry import (EXPERIMENTS, SCRIPTS, BenchmarkError, flag_args, get_experiment,  # noqa: E402
                                plan, steps_of, supports_resume)


DEFAULTS = {"jobs": 1, "time_min": 1440, "gpus_per_run": 1, "runs_per_job": 1, "cpus_per_run": 4,
            "array_parallelism": 256, "max_requeues": 20, "submitit_cluster": "slurm"}
LOCAL_ONLY = ("jobs", "gpus", "threads_per_run", "report")
SLURM_ONLY = ("partition", "time_min", "gpus_per_run", "runs_per_job", "cpus_per_run", "mem_gb", "array_parallelism",
              "account", "qos", "constraint", "max_requeues", "slurm_setup", "slurm_folder", "submitit_cluster")
SLURM_CLUSTER_ONLY = ("partition", "array_parallelism", "account", "qos", "constraint")  # unused by submitit local/debug
IDENTITY = {"env-id": "--games", "seed": "--seeds", "exp-name": "--tag", "runs-dir": "run.py's own --runs-dir",
            "dataset-dir": "run.py's own --dataset-dir", "resume": "--no-resume"}  # flags run.py plans itself


def build_parser() -> argparse.ArgumentParser:
    from benchmark.report import add_report_options

    p = argparse.ArgumentParser(prog="run.py", description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiment", nargs="?", help="experiment name: " + ", ".join(EXPERIMENTS))
    p.add_argument("--list", action="store_true", help="list the experiments and exit")
    p.add_argument("--dry-run", action="store_true", help="print the commands (finished runs marked) and exit")
    g = p.add_argument_group("shrinking a plan (a quick look; nothing to edit)")
    g.add_argument("--games", nargs="+", default=None, help="run these games instead of the paper's (e.g. Pong Breakout)")
    g.add_argument("--num-games", type=int, default=None, help="keep the first N games of each variant (those with a human score first)")
    g.add_argument("--seeds", type=int, default=None, help="run seeds 1..N (the paper: 5, Figure 19: 3)")
    g.add_argument("--variants", nargs="+", default=None, help="keep variants matching these patterns (e.g. 'dqn-*')")
    g.add_argument("--steps", type=int, default=None,
                   help="budget of every run: agent steps (online, Atari 100k) or gradient steps (offline: ~10 "
                        "iterations); periods and iterations shrink to ~10 points")
    g.add_argument("--tag", default="", help="suffix of the exp names, to keep a variant of the plan apart (one that "
                                             "makes another variant's name is refused)")
    g.add_argument("--runs-dir", default="runs", help="where the scripts write their run directories")
    g.add_argument("--dataset-dir", default="data/dqn-replay", help="DQN Replay Dataset root for the offline runs")
    g.add_argument("--no-resume", action="store_true", help="do not pass --resume auto even if the script supports it")
    loc = p.add_argument_group("launching (here by default)")
    loc.add_argument("--launcher", choices=("local", "slurm"), default="local", help="where to run the plan")
    d = DEFAULTS  # None in the parser: an option given for the other launcher is refused, not silently ignored
    loc.add_argument("--jobs", type=int, default=None, help=f"runs at a time on this machine (default {d['jobs']})")
    loc.add_argument("--gpus", default=None,
                     help="comma-separated GPU ids to spread runs over (default: all visible; '' for none)")
    loc.add_argument("--threads-per-run", type=int, default=None, help="CPU threads per run (default: cores / jobs)")
    loc.add_argument("--report", action="store_true", help="after a local launch, collect and plot (report.py)")
    s = p.add_argument_group("Slurm launcher (submitit)")
    s.add_argument("--partition", default=None, help="Slurm partition")
    s.add_argument("--time-min", type=int, default=None,
                   help=f"time limit per job in minutes (jobs requeue after it; default {d['time_min']})")
    s.add_argument("--gpus-per-run", type=int, default=None,
                   help=f"GPUs per job (shared by its --runs-per-job runs; default {d['gpus_per_run']})")
    s.add_argument("--runs-per-job", type=int, default=None,
                   help="runs sharing one job and its GPUs (each with its own --cpus-per-run and --mem-gb; default "
                        f"{d['runs_per_job']})")
    s.add_argument("--cpus-per-run", type=int, default=None,
                   help=f"CPU cores per run (also its thread count; default {d['cpus_per_run']})")
    s.add_argument("--mem-gb", type=float, default=None, help="memory per run in GB (the replay memory alone is 7 GB)")
    s.add_argument("--array-parallelism", type=int, default=None,
                   help=f"runs of the array running at once (default {d['array_parallelism']})")
    s.add_argument("--account", default=None, help="Slurm account")
    s.add_argument("--qos", default=None, help="Slurm QOS")
    s.add_argument("--constraint", default=None, help="Slurm node constraint (e.g. a GPU type)")
    s.add_argument("--max-requeues", type=int, default=None,
                   help=f"how many time-limit requeues a run may use (default {d['max_requeues']})")
    s.add_argument("--slurm-setup", action="append", default=None, help="shell line run before each job (repeatable)")
    s.add_argument("--slurm-folder", default=None, help="submitit's logs and pickles (default {runs_dir}/submitit)")
    s.add_argument("--submitit-cluster", choices=("slurm", "local", "debug"), default=None,
                   help="'local' or 'debug' run the same submitit jobs on this machine (to test a setup; default "
                        f"{d['submitit_cluster']})")
    r = p.add_argument_group("report (with --report)")
    add_report_options(r)
    return p


def list_experiments() -> None:
    for e in EXPERIMENTS.values():
        runs = plan(e, resume=False)
        scripts = ", ".join(f"{s}.py" + ("" if SCRIPTS[s].exists() else " (not written yet)") for s in e.scripts)
        print(f"{e.name:6s} {e.title}: {len(e.variants)} variants, {len(runs)} runs; {scripts}")


def print_plan(experiment, runs, done: set, todo_count: int) -> None:
    games = Counter(r.game for r in runs)
    seeds = sorted({r.seed for r in runs})
    budgets = Counter(steps_of(flag_args(r.flags), r.script) or "?" for r in runs)
    print(f"# {experiment.name}: {experiment.title}")
    print(f"# {experiment.description}")
    print(f"# {len(runs)} runs: {len({r.variant for r in runs})} variants x {len(games)} games x {len(seeds)} seeds; "
          f"budget {', '.join(f'{int(b):,} ({n} runs)' for b, n in budgets.items())} "
          f"({'gradient steps' if any(SCRIPTS[r.script].kind == 'offline' for r in runs) else 'agent steps'}); "
          f"{len(runs) - todo_count} finished, {todo_count} to run")
    for script in experiment.scripts:
        if any(r.script == script for r in runs) and not SCRIPTS[script].exists():
            print(f"# {script}.py does not exist yet: its commands follow the expected flags in benchmark/registry.py")
    for run in runs:
        line = shlex.join(run.command())
        print(f"# finished: {line}" if run.key in done else line)


def flag_names(names) -> str:
    return ", ".join("--" + n.replace("_", "-") for n in names)


def apply(names) -> str:
    return "applies" if len(names) == 1 else "apply"


def check_options(args) -> None:
    """Refuse options that would do nothing with the chosen launcher (or without --report); then fill the defaults."""
    from benchmark.report import given_report_options

    given = lambda names: [n for n in names if getattr(args, n) not in (None, False)]  # noqa: E731
    if args.launcher == "local":
        if args.runs_per_job is not None and args.runs_per_job != 1:
            raise BenchmarkError("--runs-per-job packs runs into Slurm jobs (--launcher slurm); here, --jobs N runs N "
                                 "at a time over the GPUs")
        if given(SLURM_ONLY):
            raise BenchmarkError(f"{flag_names(given(SLURM_ONLY))} {apply(given(SLURM_ONLY))} to --launcher slurm; "
                                 "add it, or drop them to run here")
        if args.threads_per_run is not None and args.threads_per_run < 1:
            raise BenchmarkError(f"--threads-per-run must be at least 1, got {args.threads_per_run}")
    else:
        if args.report:
            raise BenchmarkError("--report applies to --launcher local (a Slurm launch returns once its jobs are "
                                 "submitted); run benchmark/report.py when they are done")
        if given(LOCAL_ONLY):
            raise BenchmarkError(f"{flag_names(given(LOCAL_ONLY))} {apply(given(LOCAL_ONLY))} to --launcher local; "
                                 "Slurm jobs take --runs-per-job, --gpus-per-run and --cpus-per-run")
        if args.submitit_cluster not in (None, "slurm") and given(SLURM_CLUSTER_ONLY):
            raise BenchmarkError(f"{flag_names(given(SLURM_CLUSTER_ONLY))} {apply(given(SLURM_CLUSTER_ONLY))} to a real "
                                 f"Slurm cluster, not --submitit-cluster {args.submitit_cluster}; drop them")
    if not args.report and given_report_options(args):
        raise BenchmarkError(f"{', '.join(given_report_options(args))} {apply(given_report_options(args))} to the "
                             "report; add --report, or run benchmark/report.py later")
    for name, default in DEFAULTS.items():
        setattr(args, name, default if getattr(args, name) is None else getattr(args, name))
    for name, low in (("time_min", 1), ("cpus_per_run", 1), ("gpus_per_run", 0), ("array_parallelism", 1),
                      ("max_requeues", 0)):
        if getattr(args, name) < low:
            raise BenchmarkError(f"{flag_names([name])} must be at least {low}, got {getattr(args, name)}")
    if args.mem_gb is not None and args.mem_gb <= 0:
        raise BenchmarkError(f"--mem-gb must be positive, got {args.mem_gb}")


def check_gpus(gpus: list[str]) -> None:
    """Every id of --gpus is a GPU this machine has (a run given another would quietly train on the CPU)."""
    from benchmark.launch import visible_gpus

    try:
        import torch

        seen = visible_gpus() if torch.cuda.device_count() else []
    except Exception:  # no torch or no driver: no GPU
        seen = []
    unknown = [g for g in gpus if g not in seen]
    if unknown and not seen:
        raise BenchmarkError(f"--gpus {','.join(gpus)}: torch sees no GPU on this machine; drop --gpus (runs use the CPU)")
    if unknown:
        raise BenchmarkError(f"--gpus: no GPU {', '.join(unknown)} here; this machine's GPUs: {', '.join(seen)}")


def tyro_message(text: str) -> str:
    """tyro's boxed error as one line: the message between the box's first two rules, without the help text."""
    lines = [line.strip().strip("│|").strip() for line in text.splitlines()]
    rules = [i for i, line in enumerate(lines) if line and set(line) <= set("-─━╭╮╰╯")]
    body = lines[rules[0] + 1:rules[1]] if len(rules) >= 2 else lines
    return " ".join(line for line in body if line) or "rejected"


def refuse_planned_flags(experiment, base_runs, extra) -> None:
    """Flags after `--` may add to a plan, never change it: a flag the plan sets (a variant's own, the budget and what
    --steps sets, a run's identity) is refused (by report.py too: runs of such a plan do not exist)."""
    from benchmark.registry import shrink_flags, split_flags

    variants = {v.name: v for v in experiment.variants}
    for run in {r.variant: r for r in base_runs}.values():
        planned = dict(split_flags(run.flags))
        run_length = {name for name, _ in split_flags(shrink_flags(variants[run.variant], 1))}  # what --steps sets
        own = {name for name, _ in split_flags(variants[run.variant].flags)} - run_length
        for name, _ in split_flags(extra):
            if name not in planned:
                continue
            if name in IDENTITY:
                raise BenchmarkError(f"-- --{name}: run.py plans --{name} for every run; use {IDENTITY[name]} instead")
            if name not in own:
                raise BenchmarkError(f"-- --{name}: the plan sets `{' '.join(planned[name])}` for {run.variant} (its budget, "
                                     "or --steps); use --steps, or run the script itself for other values")
            raise BenchmarkError(f"-- --{name}: variant {run.variant} is defined by `{' '.join(planned[name])}` and its runs "
                                 "would be named and plotted as it; pick variants with --variants, or run the script "
                                 "itself (a new variant goes in benchmark/registry.py)")


def check_extra(experiment, runs, base_runs, extra, node_has_gpu: bool | None = None) -> None:
    """refuse_planned_flags, then every script that exists must accept the flags and their values (tyro, then its own
    check_args, as on a node with a GPU or not: `node_has_gpu`, None for this machine)."""
    import contextlib
    import difflib
    import io
    from unittest import mock

    import torch
    import tyro

    from benchmark.registry import load_script_module, split_flags

    refuse_planned_flags(experiment, base_runs, extra)
    extra_flags = split_flags(extra)
    for run in {r.variant: r for r in runs}.values():
        if not SCRIPTS[run.script].exists():
            continue
        try:
            module = load_script_module(run.script)
        except Exception:  # a script being edited: supports_resume() has said so; its runs will tell
            continue
        fields = {f.replace("_", "-") for f in module.Args.__dataclass_fields__}
        for name, part in extra_flags:
            raw = part[0][2:].split("=", 1)[0]
            if name not in fields and raw not in fields:
                close = difflib.get_close_matches(raw, sorted(fields), n=3, cutoff=0.6)
                raise BenchmarkError(f"-- --{raw}: {run.script}.py has no such flag"
                                     + (f" (did you mean {', '.join('--' + c for c in close)}?)" if close else "")
                                     + f"; see python {run.script}.py --help")
        text = io.StringIO()
        try:
            with contextlib.redirect_stderr(text), contextlib.redirect_stdout(text):
                args = tyro.cli(module.Args, args=list(run.flags))
        except SystemExit:
            raise BenchmarkError(f"flags after --: {run.script}.py says: {tyro_message(text.getvalue())}")
        if hasattr(module, "check_args"):
            gpu = torch.cuda.is_available() if node_has_gpu is None else node_has_gpu
            try:
                with mock.patch.object(torch.cuda, "is_available", lambda: gpu):  # the GPU checks, as on the node
                    module.check_args(module.with_agent_defaults(args) if hasattr(module, "with_agent_defaults") else args)
            except ValueError as error:
                raise BenchmarkError(f"flags after --: {run.script}.py refuses {run.variant}'s runs: {error}")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = []
    if "--" in argv:  # flags after `--` go to every script
        extra, argv = argv[argv.index("--") + 1:], argv[:argv.index("--")]
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.list:
            list_experiments()
            return 0
        if not args.experiment:
            raise BenchmarkError("name an experiment (or use --list): " + ", ".join(EXPERIMENTS))
        experiment = get_experiment(args.experiment)
        check_options(args)
        if args.jobs < 1:
            raise BenchmarkError("--jobs must be at least 1")
        if args.runs_per_job < 1:
            raise BenchmarkError("--runs-per-job must be at least 1")
        if args.gpus and args.gpus.strip(", ") and not args.dry_run:  # a dry run launches nothing
            check_gpus([g.strip() for g in args.gpus.split(",") if g.strip()])
        shape = dict(games=args.games, num_games=args.num_games, seeds=args.seeds, variants=args.variants,
                     steps=args.steps, tag=args.tag, runs_dir=args.runs_dir, dataset_dir=args.dataset_dir,
                     resume=False if args.no_resume else None)
        runs = plan(experiment, extra=extra, **shape)
        if extra:
            check_extra(experiment, runs, plan(experiment, **shape), extra,
                        (args.gpus_per_run > 0 if args.launcher == "slurm" else
                         None if args.gpus is None else bool(args.gpus.strip(", "))))
        from benchmark.launch import finished_dir, launch_local, launch_submitit, split_done

        todo, done = split_done(runs, args.runs_dir)
        if args.dry_run:
            signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `| head` ends the listing quietly
            print_plan(experiment, runs, {r.key for r in done}, len(todo))
            return 0
        missing = sorted({f"{r.script}.py" for r in todo if not SCRIPTS[r.script].exists()})
        if missing:
            raise BenchmarkError(f"{', '.join(missing)} does not exist yet; run the other agents with --variants "
                                 "(e.g. --variants 'dqn-*')")
        print(f"{experiment.name}: {len(runs)} runs planned, {len(done)} already finished, {len(todo)} to run"
              + ("" if all(supports_resume(s) for s in {r.script for r in todo}) else
                 " (some scripts cannot resume: an interrupted run of theirs starts over)"))
        if args.launcher == "slurm":
            if todo:
                folder = args.slurm_folder or os.path.join(args.runs_dir, "submitit", "%j")
                try:
                    jobs = launch_submitit(todo, folder, args.submitit_cluster, args.partition, args.time_min,
                                           args.gpus_per_run, args.cpus_per_run, args.mem_gb, args.array_parallelism,
                                           args.account, args.qos, args.constraint, args.max_requeues,
                                           args.slurm_setup, name=experiment.name, runs_per_job=args.runs_per_job)
                except (OSError, RuntimeError, ValueError, subprocess.CalledProcessError) as error:
                    raise BenchmarkError(f"submission through submitit failed: {str(error).strip().splitlines()[-1]}")
                print(f"submitted {len(jobs)} jobs of up to {args.runs_per_job} runs (first id {jobs[0].job_id}); "
                      f"submitit logs in {folder}")
                print(f"when they are done: python {os.path.relpath(os.path.join(os.path.dirname(__file__), 'report.py'))}"
                      f" {experiment.name} --runs-dir {args.runs_dir}" + (f" --tag {args.tag}" if args.tag else "")
                      + (f" --steps {args.steps}" if args.steps else "")
                      + (f" -- {shlex.join(extra)}" if extra else ""))
                if args.submitit_cluster != "slurm":
                    for job in jobs:
                        job.result()
                    print(f"{len(jobs)} jobs finished")
            return 0
        gpus = None if args.gpus is None else [g.strip() for g in args.gpus.split(",") if g.strip()]
        outcome = launch_local(todo, args.jobs, gpus, args.threads_per_run,
                               log_dir=os.path.join(args.runs_dir, "launcher-logs"))
        print(f"{len(outcome['finished'])} finished, {len(outcome['failed'])} failed, "
              f"{len(outcome['interrupted'])} interrupted, {len(outcome['not_started'])} not started")
        if outcome["failed"] or outcome["interrupted"] or outcome["not_started"]:
            if outcome["interrupted"] or outcome["not_started"]:
                print("run the same command again to continue")
            return 1
        unmarked = [r for r in todo if not finished_dir(r, args.runs_dir)]
        if unmarked:  # a script bug: exit 0 but no summary.json with the planned arguments
            print(f"warning: {len(unmarked)} runs exited 0 without a matching summary.json, e.g. {unmarked[0].key}")
        if args.report:
            from benchmark.report import report_from_args

            report_from_args(args, experiment, extra)
        return 0
    except BenchmarkError as error:
        print(f"run.py: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
