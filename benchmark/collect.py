"""Read the scripts' TensorBoard files into a tidy table (experiment, variant, game, seed, step, return).

Run directories are `{runs_dir}/{Game}__{exp_name}__{seed}__{unix_time}`; a run is finished when it holds
`summary.json`. For each (variant, game, seed) the newest finished run with the planned arguments is used (those
run.py would skip as finished: a quick look with `--steps` or other flags after `--` in the same directory is not
mistaken for the full run; with `partial`, the newest run when none has finished yet). Events are read with
tensorboard's own `EventAccumulator`.
"""

from __future__ import annotations

import sys

if __name__ == "__main__":  # a library module, not a command: say which one to run
    print("collect.py: error: this module is a library; run python benchmark/report.py --help", file=sys.stderr)
    sys.exit(2)

import concurrent.futures
import glob
import logging
import os
from dataclasses import dataclass

import numpy as np
import pandas as pd

from benchmark.launch import differing_arg, logged_args, planned_args
from benchmark.registry import SCRIPTS, Experiment, plan, steps_of

GAP_S = 30 * 60  # event gaps longer than this (queueing, requeues) do not count as training time


@dataclass(frozen=True)
class RunRecord:
    variant: str
    game: str
    seed: int
    path: str
    finished: bool


def logged_budget(path: str, script: str) -> int | None:
    """The length a finished run's summary.json logged, in the unit of run.py --steps (registry.steps_of): agent
    steps, or gradient steps offline (--num-iterations x --gradient-steps-per-iteration)."""
    return steps_of(logged_args(path) or {}, script)


def discover(experiment: Experiment, runs_dir: str, tag: str = "", partial: bool = False,
             steps: int | None = None, extra=()) -> tuple[list[RunRecord], dict]:
    """The run directories of an experiment: one per (variant, game, seed). A finished run counts only when it is a
    run of the plan `run.py {experiment} [--steps N] [--tag T] [-- extra]` (launch.args_match: what that plan skips as
    finished); the others are counted as skipped, of another budget or with other arguments.
    Returns (records, counts)."""
    # one planned run per variant: the game and seed are in the directory's name, the rest is the same for all runs
    planned = {r.variant: r for r in plan(experiment, num_games=1, seeds=1, steps=steps, tag=tag, extra=extra,
                                          resume=False)}
    variant_of = {experiment.exp_name(v.name, tag): v.name for v in experiment.variants}
    best: dict[tuple, tuple] = {}
    counts = {"directories": 0, "unfinished_skipped": 0, "older_duplicates": 0, "other_budget_skipped": 0,
              "other_args_skipped": 0, "other_args_example": ""}
    try:
        entries = list(os.scandir(runs_dir))
    except FileNotFoundError:
        return [], counts
    for entry in entries:
        parts = entry.name.split("__")
        if len(parts) != 4 or parts[1] not in variant_of or not parts[2].isdigit() or not parts[3].isdigit():
            continue
        if not entry.is_dir():
            continue
        counts["directories"] += 1
        finished = os.path.exists(os.path.join(entry.path, "summary.json"))
        key = (variant_of[parts[1]], parts[0], int(parts[2]))
        run = planned[key[0]]
        if finished:
            logged = logged_args(entry.path) or {}
            different = differing_arg(run, logged)
            if different and steps_of(logged, run.script) != steps_of(planned_args(run), run.script):
                counts["other_budget_skipped"] += 1  # e.g. a --steps quick look beside the sweep
                continue
            if different:  # e.g. a quick look with other flags after `--`
                counts["other_args_skipped"] += 1
                counts["other_args_example"] = counts["other_args_example"] or (
                    f"{entry.name}: --{different.replace('_', '-')} "
                    f"{logged.get(different, 'not logged')}, planned {planned_args(run).get(different)}")
                continue
        rank = (finished, int(parts[3]))  # finished first, then newest
        if key in best:
            counts["older_duplicates"] += 1
            if rank <= best[key][0]:
                continue
        best[key] = (rank, entry.path)
    records = []
    for (variant, game, seed), ((finished, _), path) in sorted(best.items()):
        if finished or partial:
            records.append(RunRecord(variant, game, seed, path, finished))
        else:
            counts["unfinished_skipped"] += 1
    return records, counts


class _DataLoss(logging.Handler):
    """Collects tensorboard's "Truncated record in FILE (ERROR)": where it stops reading a damaged event file, which it
    says only at debug level (the events after that point are lost without a word)."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.seen: list[str] = []

    def emit(self, record):
        if str(record.msg).startswith("Truncated record in") and len(record.args or ()) == 2:
            path, error = str(record.args[0]), str(record.args[1])
            reason = error.replace(repr(path.encode()), "").replace(path, "").strip() or "DataLossError"
            self.seen.append(f"{path}: unreadable from a damaged or cut record on ({reason})")


def read_scalars(path: str) -> tuple[dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]], list[str]]:
    """({tag: (steps, values, wall_times)} of every scalar in a run directory, [one line per unreadable event file])."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util import tb_logging

    if not glob.glob(os.path.join(glob.escape(path), "*tfevents*")):
        return {}, [f"{path}: no TensorBoard event file"]
    logger, catch = tb_logging.get_logger(), _DataLoss()
    level, propagate = logger.level, logger.propagate
    logger.setLevel(logging.DEBUG)
    logger.propagate = False  # tensorboard's other debug lines stay quiet
    logger.addHandler(catch)
    try:
        acc = EventAccumulator(path, size_guidance={"scalars": 0})
        acc.Reload()
    except Exception as error:  # unreadable file or directory, an undecodable event: the report goes on without it
        return {}, [f"{path}: unreadable ({type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''})"]
    finally:
        logger.removeHandler(catch)
        logger.setLevel(level)
        logger.propagate = propagate
    out = {}
    for tag in acc.Tags()["scalars"]:
        events = acc.Scalars(tag)
        out[tag] = (np.array([e.step for e in events], dtype=np.int64), np.array([e.value for e in events], float),
                    np.array([e.wall_time for e in events], float))
    return out, catch.seen


def active_hours(scalars: dict) -> callable:
    """wall time -> training hours since the run's first event, not counting gaps longer than GAP_S."""
    walls = np.sort(np.concatenate([w for _, _, w in scalars.values()])) if scalars else np.zeros(1)
    gaps = np.diff(walls)
    elapsed = np.concatenate([[0.0], np.cumsum(np.where(gaps > GAP_S, 0.0, gaps))])
    return lambda t: np.interp(t, walls, elapsed) / 3600.0


def read_run(record: RunRecord, metric: str, with_metrics: bool) -> tuple[list[dict], list[dict], list[str]]:
    """Rows of the returns table and (optionally) of the analysis-metrics table for one run, and its unreadable files."""
    scalars, problems = read_scalars(record.path)
    hours = active_hours(scalars)
    base = {"variant": record.variant, "game": record.game, "seed": record.seed, "finished": record.finished}
    returns = []
    if metric in scalars:
        steps, values, walls = scalars[metric]
        frame = pd.DataFrame({"step": steps, "value": values, "wall": walls})
        # several values at one step: a step logged again after a resume (same value), or runs from before evaluations
        # logged their mean (one value per episode then): their mean either way
        grouped = frame.groupby("step").agg(value=("value", "mean"), wall=("wall", "max")).reset_index()
        for step, value, wall in grouped.itertuples(index=False):
            returns.append({**base, "step": int(step), "hours": float(hours(wall)), "return": float(value)})
    metrics = []
    if with_metrics:
        for tag, (steps, values, _) in scalars.items():
            if tag.startswith("metrics/") or tag.startswith("moe/"):
                metrics += [{**base, "step": int(s), "metric": tag, "value": float(v)} for s, v in zip(steps, values)]
    return returns, metrics, problems


def collect(experiment: Experiment, runs_dir: str, tag: str = "", partial: bool = False, workers: int = 1,
            steps: int | None = None, extra=()):
    """Returns (returns table, metrics table or None, counts). Frames = 4 x agent steps (x 1 for offline). counts also
    lists the unreadable event files ("unreadable": one line each) and the runs without a score ("without_scores")."""
    records, counts = discover(experiment, runs_dir, tag, partial, steps, extra)
    variants = {v.name: v for v in experiment.variants}
    with_metrics = "metrics" in experiment.plots
    jobs = [(r, SCRIPTS[variants[r.variant].script].metric, with_metrics) for r in records]
    if workers > 1 and len(jobs) > 1:
        with concurrent.futures.ProcessPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(read_run, *zip(*jobs)))
    else:
        results = [read_run(*job) for job in jobs]
    returns = [row for rows, _, _ in results for row in rows]
    metrics = [row for _, rows, _ in results for row in rows]
    counts["runs"] = len(records)
    counts["unreadable"] = [line for _, _, problems in results for line in problems]
    counts["without_scores"] = [f"{job[0].path}: no `{job[1]}` logged; the run is left out of every table"
                                for job, (rows, _, _) in zip(jobs, results) if not rows]
    counts["runs_without_scores"] = len(counts["without_scores"])
    columns = ["experiment", "variant", "game", "seed", "step", "frames", "hours", "return", "normalized", "finished"]
    table = pd.DataFrame(returns, columns=[c for c in columns if c not in ("experiment", "frames", "normalized")])
    table.insert(0, "experiment", experiment.name)
    per_step = table["variant"].map(lambda v: SCRIPTS[variants[v].script].frames_per_step)
    table.insert(5, "frames", table["step"] * per_step)
    from benchmark.stats import normalize

    table["normalized"] = normalize(table["game"], table["return"])
    table = table[columns].sort_values(["variant", "game", "seed", "step"]).reset_index(drop=True)
    metric_table = None
    if with_metrics:
        metric_table = pd.DataFrame(metrics, columns=["variant", "game", "seed", "finished", "step", "metric", "value"])
        metric_table.insert(0, "experiment", experiment.name)
        metric_table.insert(5, "frames", metric_table["step"] * metric_table["variant"].map(
            lambda v: SCRIPTS[variants[v].script].frames_per_step))
    return table, metric_table, counts
