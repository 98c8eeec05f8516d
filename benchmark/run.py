"""Plan, launch and report the paper's experiments.

    python benchmark/run.py --list                                   # the experiments and their sizes
    python benchmark/run.py fig1 --dry-run                           # the paper's plan: every command
    python benchmark/run.py fig1 --jobs 8                            # run it here, 8 at a time over the GPUs
    python benchmark/run.py fig1 --launcher slurm --partition gpu    # one Slurm array job, one GPU per run
    python benchmark/run.py fig1 --variants 'dqn-*' --games Pong Breakout --seeds 2 --steps 100000 --report \\
        -- --learning-starts 5000                                     # a quick look; flags after -- go to every run

Finished runs (summary.json with the same arguments) are skipped, so rerunning a command resumes the sweep.
`benchmark/report.py` (or --report here) turns the runs into CSV tables, statistics and figures.
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

from benchmark.registry import (EXPERIMENTS, SCRIPTS, BenchmarkError, get_experiment, plan,  # noqa: E402
                                supports_resume)


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
                   help="budget of every run: agent steps (online, Atari 100k) or iterations (offline)")
    g.add_argument("--tag", default="", help="suffix of the exp names, to keep a variant of the plan apart")
    g.add_argument("--runs-dir", default="runs", help="where the scripts write their run directories")
    g.add_argument("--dataset-dir", default="data/dqn-replay", help="DQN Replay Dataset root for the offline runs")
    g.add_argument("--no-resume", action="store_true", help="do not pass --resume auto even if the script supports it")
    loc = p.add_argument_group("launching (here by default)")
    loc.add_argument("--launcher", choices=("local", "slurm"), default="local", help="where to run the plan")
    loc.add_argument("--jobs", type=int, default=1, help="runs at a time on this machine")
    loc.add_argument("--gpus", default=None,
                     help="comma-separated GPU ids to spread runs over (default: all visible; '' for none)")
    loc.add_argument("--threads-per-run", type=int, default=None, help="CPU threads per run (default: cores / jobs)")
    loc.add_argument("--report", action="store_true", help="after a local launch, collect and plot (report.py)")
    s = p.add_argument_group("Slurm launcher (submitit)")
    s.add_argument("--partition", default=None, help="Slurm partition")
    s.add_argument("--time-min", type=int, default=1440, help="time limit per job in minutes (jobs requeue after it)")
    s.add_argument("--gpus-per-run", type=int, default=1, help="GPUs per job (shared by its --runs-per-job runs)")
    s.add_argument("--runs-per-job", type=int, default=1,
                   help="runs sharing one job and its GPUs (each with its own --cpus-per-run and --mem-gb)")
    s.add_argument("--cpus-per-run", type=int, default=4, help="CPU cores per run (also its thread count)")
    s.add_argument("--mem-gb", type=float, default=None, help="memory per run in GB (the replay memory alone is 7 GB)")
    s.add_argument("--array-parallelism", type=int, default=256, help="runs of the array running at once")
    s.add_argument("--account", default=None, help="Slurm account")
    s.add_argument("--qos", default=None, help="Slurm QOS")
    s.add_argument("--constraint", default=None, help="Slurm node constraint (e.g. a GPU type)")
    s.add_argument("--max-requeues", type=int, default=20, help="how many time-limit requeues a run may use")
    s.add_argument("--slurm-setup", action="append", default=None, help="shell line run before each job (repeatable)")
    s.add_argument("--slurm-folder", default=None, help="submitit's logs and pickles (default {runs_dir}/submitit)")
    s.add_argument("--submitit-cluster", choices=("slurm", "local", "debug"), default="slurm",
                   help="'local' or 'debug' run the same submitit jobs on this machine (to test a setup)")
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
    budgets = Counter(next((r.flags[i + 1] for i, f in enumerate(r.flags) if f == SCRIPTS[r.script].budget_flag), "?")
                      for r in runs)
    print(f"# {experiment.name}: {experiment.title}")
    print(f"# {experiment.description}")
    print(f"# {len(runs)} runs: {len({r.variant for r in runs})} variants x {len(games)} games x {len(seeds)} seeds; "
          f"budget {', '.join(f'{int(b):,} ({n} runs)' for b, n in budgets.items())} "
          f"({'iterations' if any(SCRIPTS[r.script].kind == 'offline' for r in runs) else 'agent steps'}); "
          f"{len(runs) - todo_count} finished, {todo_count} to run")
    for script in experiment.scripts:
        if any(r.script == script for r in runs) and not SCRIPTS[script].exists():
            print(f"# {script}.py does not exist yet: its commands follow the expected flags in benchmark/registry.py")
    for run in runs:
        line = shlex.join(run.command())
        print(f"# finished: {line}" if run.key in done else line)


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
        if args.jobs < 1:
            raise BenchmarkError("--jobs must be at least 1")
        if args.runs_per_job < 1:
            raise BenchmarkError("--runs-per-job must be at least 1")
        if args.runs_per_job > 1 and args.launcher != "slurm":
            raise BenchmarkError("--runs-per-job packs runs into Slurm jobs (--launcher slurm); here, --jobs N runs N "
                                 "at a time over the GPUs")
        runs = plan(experiment, games=args.games, num_games=args.num_games, seeds=args.seeds, variants=args.variants,
                    steps=args.steps, tag=args.tag, runs_dir=args.runs_dir, dataset_dir=args.dataset_dir, extra=extra,
                    resume=False if args.no_resume else None)
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
                      f" {experiment.name} --runs-dir {args.runs_dir}" + (f" --tag {args.tag}" if args.tag else ""))
                if args.submitit_cluster != "slurm":
                    for job in jobs:
                        job.result()
                    print(f"{len(jobs)} jobs finished")
            return 0
        gpus = None if args.gpus is None else [g for g in args.gpus.split(",") if g.strip()]
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

            report_from_args(args, experiment)
        return 0
    except BenchmarkError as error:
        print(f"run.py: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
