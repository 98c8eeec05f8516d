"""Collect an experiment's runs and write its tables, statistics and figures.

    python benchmark/report.py fig1                       # reads runs/, writes results/fig1/
    python benchmark/report.py fig1 --steps 600           # a run.py --steps 600 quick look: results/fig1-steps600/
    python benchmark/report.py fig1 --steps 600 -- --encoder nature   # ... launched with these flags after --
    python benchmark/report.py fig1 --runs-dir /scratch/runs --out results/fig1 --partial

Writes returns.csv (the tidy table: experiment, variant, game, seed, step, frames, hours, return, normalized,
finished), final_scores.csv, aggregates.csv (median / IQM / mean / optimality gap with 95% stratified bootstrap
CIs, rliable), probability_of_improvement.csv, curves.csv, metrics.csv (Figure 10), the PNG figures and
summary.md. Games without a human score are reported raw and left out of every aggregate. The runs read are
those run.py skips as finished for the same plan (--steps, --tag and flags after `--`): same arguments.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

if __package__ in (None, ""):  # run as a script: make `benchmark` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from benchmark import plots, stats  # noqa: E402
from benchmark.collect import collect  # noqa: E402
from benchmark.registry import SCRIPTS, BenchmarkError, Experiment, get_experiment, plan  # noqa: E402

TAUS = np.linspace(0.0, 8.0, 81)  # thresholds of the performance profiles when a panel has no scores


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def fmt_ci(value, low, high) -> str:
    return f"{value:.3f} [{low:.3f}, {high:.3f}]"


def markdown_summary(experiment: Experiment, runs_dir: str, tag: str, counts: dict, final: pd.DataFrame,
                     aggregates: pd.DataFrame, poi: pd.DataFrame, figures: list[str], options: dict) -> str:
    lines = [f"# {experiment.name}: {experiment.title}", "", experiment.description, ""]
    unfinished = int((~final["finished"]).sum())
    tags = sorted({SCRIPTS[experiment.variant(v).script].metric for v in set(final["variant"])})
    lines += [f"{counts['runs']} runs read from `{runs_dir}`" + (f" (tag `{tag}`)" if tag else "") + ": "
              + (f"{counts['runs'] - unfinished} finished, {unfinished} unfinished included (--partial)." if unfinished
                 else f"{counts['runs']} finished; {counts['unfinished_skipped']} unfinished skipped (--partial includes them).")
              + (f" {counts['other_budget_skipped']} finished runs of another budget skipped (a --steps quick look, or "
                 "the full runs when reporting with --steps)." if counts.get("other_budget_skipped") else "")
              + (f" {counts['other_args_skipped']} finished runs launched with other arguments skipped (flags after "
                 f"`--` other than this report's; e.g. `{counts['other_args_example']}`)."
                 if counts.get("other_args_skipped") else "")
              + (f" {len(counts['without_scores'])} of them have no score and are left out of every table: "
                 + ", ".join(f"`{os.path.basename(p.split(': ', 1)[0])}`" for p in counts["without_scores"]) + "."
                 if counts.get("without_scores") else "")
              + (f" {len(counts['unreadable'])} event files could not be read, whole or in part (their events from the "
                 "damage on are lost): " + "; ".join(f"`{line}`" for line in counts["unreadable"]) + "."
                 if counts.get("unreadable") else ""),
              "Score of a run: " + ("its last logged" if options["window"] == 1 else f"the mean of its last {options['window']}")
              + f" `{'`, `'.join(tags)}`" + (f" at or before {step_unit(experiment)} {options['at_step']:,}"
                                             if options["at_step"] else "")
              + ", human-normalised with benchmark/atari_scores.csv. Intervals: 95% stratified bootstrap (rliable; "
              f"{options['reps']:,} reps, {options['poi_reps']:,} for the probability of improvement; numpy seed "
              f"{options['seed']}).", ""]
    for panel in experiment.panels:
        data = aggregates[aggregates["panel"] == panel.title] if not aggregates.empty else aggregates
        if data.empty:
            continue
        row0 = data.iloc[0]
        lines += [f"## {panel.title}", "", f"Games: {int(row0['games'])}; runs per game: {int(row0['runs_per_game'])}.", "",
                  "| variant | exp name | IQM [95% CI] | median | mean | optimality gap |", "|---|---|---|---|---|---|"]
        for _, r in data.iterrows():
            lines.append(f"| {r['label']} | `{experiment.exp_name(r['variant'], tag)}` | {fmt_ci(r['iqm'], r['iqm_low'], r['iqm_high'])} | "
                         f"{fmt_ci(r['median'], r['median_low'], r['median_high'])} | "
                         f"{fmt_ci(r['mean'], r['mean_low'], r['mean_high'])} | "
                         f"{fmt_ci(r['optimality_gap'], r['optimality_gap_low'], r['optimality_gap_high'])} |")
        p = poi[poi["panel"] == panel.title] if not poi.empty else poi
        if not p.empty:
            lines += ["", "| probability of improvement | P(X > Y) [95% CI] |", "|---|---|"]
            for _, r in p.iterrows():
                lines.append(f"| {r['x_label']} > {r['y_label']} | {fmt_ci(r['probability'], r['low'], r['high'])} |")
        lines.append("")
    raw_only = sorted(g for g in set(final["game"]) if not stats.has_human_score(g))
    if raw_only:
        lines += [f"Games without a human score (raw scores only, left out of aggregates): {', '.join(raw_only)}.", ""]
    table = stats.per_game_table(final, experiment)
    variants = [v.name for v in experiment.variants if v.name in set(table["variant"])]
    lines += ["## Final raw return per game (mean ± std over seeds)", "",
              "| game | " + " | ".join(f"`{v}`" for v in variants) + " |", "|---" * (len(variants) + 1) + "|"]
    for game, rows in table.groupby("game"):
        cells = []
        for v in variants:
            r = rows[rows["variant"] == v]
            cells.append("" if r.empty else f"{r['mean'].iloc[0]:.1f} ± {0.0 if pd.isna(r['std'].iloc[0]) else r['std'].iloc[0]:.1f}"
                         f" (n={int(r['count'].iloc[0])})")
        lines.append(f"| {game} | " + " | ".join(cells) + " |")
    if figures:
        lines += ["", "## Figures", ""] + [f"![{os.path.basename(f)}]({os.path.basename(f)})" for f in figures]
    return "\n".join(lines) + "\n"


def step_unit(experiment: Experiment) -> str:
    """What a logged step counts: gradient steps offline (fig11), agent steps otherwise."""
    return "gradient step" if any(SCRIPTS[v.script].kind == "offline" for v in experiment.variants) else "agent step"


def stack(frames: list[pd.DataFrame]) -> pd.DataFrame:
    """The frames one after the other; empty ones only give the columns (pandas warns about concatenating them)."""
    full = [f for f in frames if not f.empty]
    return pd.concat(full, ignore_index=True) if full else frames[0]


def default_out(experiment: str, tag: str = "", steps: int | None = None) -> str:
    """results/{experiment}[-{tag}][-steps{N}]: a --steps quick look never overwrites the full report."""
    return os.path.join("results", experiment + (f"-{tag}" if tag else "") + (f"-steps{steps}" if steps else ""))


def warn_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def report(experiment: Experiment, runs_dir: str = "runs", out: str | None = None, tag: str = "", partial: bool = False,
           at_step: int | None = None, window: int = 1, reps: int = 50_000, curve_reps: int = 2_000,
           poi_reps: int = 2_000, seed: int = 0, workers: int = 1, say=print, steps: int | None = None,
           warn=warn_stderr, extra=()) -> dict[str, str]:
    """Collect, aggregate and plot one experiment; returns {name: path} of everything written. `steps`: the runs'
    budget when they were launched with run.py --steps (else each variant's own); `extra`: the flags they were
    launched with after `--`. `warn` gets one line per unreadable event file and per run without a score."""
    out = out or default_out(experiment.name, tag, steps)
    if not os.path.isdir(runs_dir):
        raise BenchmarkError(f"--runs-dir {runs_dir} " + ("is not a directory" if os.path.exists(runs_dir) else
                                                           "does not exist") + "; pass the --runs-dir the runs were "
                             "launched with (default: runs)")
    if extra:  # refused as run.py refuses them: a flag the plan sets would match no run of it
        from benchmark.run import refuse_planned_flags

        base = plan(experiment, num_games=1, seeds=1, steps=steps, tag=tag, resume=False)
        refuse_planned_flags(experiment, base, extra)
    returns, metrics, counts = collect(experiment, runs_dir, tag, partial, workers, steps, extra)
    for line in counts["unreadable"] + counts["without_scores"]:  # left out, but never silently
        warn(f"warning: {line}")
    if returns.empty:
        found = counts["directories"]
        hint = (f"{counts['unfinished_skipped']} unfinished (use --partial to include them)"
                if counts["unfinished_skipped"] else
                f"{counts['other_budget_skipped']} finished with another budget (pass the --steps they were run with)"
                if counts["other_budget_skipped"] else
                f"{counts['other_args_skipped']} finished with other arguments (pass the flags after -- they were run "
                f"with; e.g. {counts['other_args_example']})" if counts["other_args_skipped"] else
                "none logged a score yet" if found else
                f"no directory named {{Game}}__{experiment.name}-{{variant}}{'-' + tag if tag else ''}__{{seed}}__{{time}}")
        raise BenchmarkError(f"no results for {experiment.name} in {runs_dir}: {found} run directories, {hint}")
    os.makedirs(out, exist_ok=True)
    written = {}

    def save_csv(name: str, frame: pd.DataFrame) -> None:
        path = os.path.join(out, name)
        frame.to_csv(path, index=False)
        written[name] = path

    save_csv("returns.csv", returns)
    if metrics is not None:
        save_csv("metrics.csv", metrics)  # written even when empty: no stale table of an earlier report stays
    final = stats.final_scores(returns, at_step, window)
    final.insert(0, "experiment", experiment.name)
    save_csv("final_scores.csv", final)
    aggregates = pd.concat([stats.aggregate(final, p, reps, seed) for p in experiment.panels], ignore_index=True)
    poi = pd.concat([stats.probability_of_improvement(final, p, poi_reps, seed) for p in experiment.panels],
                    ignore_index=True)
    save_csv("aggregates.csv", aggregates)
    save_csv("probability_of_improvement.csv", poi)

    figures = []

    def keep(name: str, draw, path: str) -> None:
        if draw(path):
            figures.append(path)
            written[name] = path
        elif os.path.exists(path):  # nothing to draw now: an earlier report's figure would pass for this one's
            os.remove(path)

    prefix = os.path.join(out, experiment.name)
    if "scaling" in experiment.plots:
        keep("scaling", lambda f: plots.plot_scaling(aggregates, experiment, f),
             f"{prefix}_iqm_vs_{slug(experiment.x_label)}.png")
    if "curves" in experiment.plots:
        curves = stack([stats.iqm_curve(returns, final, p, "step", reps=curve_reps, seed=seed) for p in experiment.panels])
        save_csv("curves.csv", curves)  # a header only when empty: no stale curves of an earlier report stay
        keep("curves", lambda f: plots.plot_curves(curves, experiment, f), f"{prefix}_iqm_curves.png")
    if "walltime" in experiment.plots:
        hours = stack([stats.iqm_curve(returns, final, p, "hours", reps=curve_reps, seed=seed) for p in experiment.panels])
        save_csv("walltime_curves.csv", hours)
        keep("walltime", lambda f: plots.plot_curves(hours, experiment, f, axis="hours"), f"{prefix}_iqm_vs_hours.png")
    if "metrics" in experiment.plots:
        keep("metrics", lambda f: plots.plot_metrics(returns, metrics, experiment, f), f"{prefix}_metrics.png")
    for panel in experiment.panels:
        keep(f"per_game:{panel.title}", lambda f: plots.plot_per_game(final, experiment, panel, f),
             f"{prefix}_per_game_{slug(panel.title)}.png")
        if "profiles" in experiment.plots:
            scores = final.loc[final["variant"].isin(panel.variants), "normalized"].dropna()
            taus = np.linspace(min(0.0, scores.min()), max(1.0, scores.max()), 81) if len(scores) else TAUS
            profiles, cis = stats.performance_profiles(final, panel, taus, poi_reps, seed)
            keep(f"profiles:{panel.title}", lambda f: plots.plot_profiles(profiles, cis, taus, experiment, panel, f),
                 f"{prefix}_profiles_{slug(panel.title)}.png")
    options = {"window": window, "at_step": at_step, "reps": reps, "poi_reps": poi_reps, "seed": seed}
    summary = markdown_summary(experiment, runs_dir, tag, counts, final, aggregates, poi, figures, options)
    path = os.path.join(out, "summary.md")
    with open(path, "w") as f:
        f.write(summary)
    written["summary.md"] = path
    unscored = f" ({len(counts['without_scores'])} without a score, left out)" if counts["without_scores"] else ""
    say(f"{experiment.name}: {counts['runs']} runs{unscored}, {len(returns)} logged returns -> {out}/ "
        f"({len([k for k in written if k.endswith('.csv')])} CSV files, {len(figures)} figures, summary.md)")
    return written


# None in the parser, so run.py can tell an option given from its default (and refuse it without --report)
REPORT_DEFAULTS = {"final_window": 1, "reps": 50_000, "curve_reps": 2_000, "poi_reps": 2_000, "stats_seed": 0,
                   "workers": min(8, os.cpu_count() or 1)}


def add_report_options(parser: argparse.ArgumentParser) -> None:
    d = REPORT_DEFAULTS
    parser.add_argument("--out", default=None,
                        help="output directory (default results/{experiment}[-{tag}], with -steps{N} after --steps N)")
    parser.add_argument("--partial", action="store_true", help="include unfinished runs (their latest scores)")
    parser.add_argument("--at-step", type=int, default=None,
                        help="score runs at this logged step (agent steps; gradient steps for offline experiments, "
                             "fig11) instead of at their end")
    parser.add_argument("--final-window", type=int, default=None,
                        help=f"average the last K logged scores of each run (default {d['final_window']})")
    parser.add_argument("--reps", type=int, default=None,
                        help=f"bootstrap replications for IQM/median/mean CIs (default {d['reps']:,})")
    parser.add_argument("--curve-reps", type=int, default=None,
                        help=f"bootstrap replications per curve (default {d['curve_reps']:,})")
    parser.add_argument("--poi-reps", type=int, default=None,
                        help="bootstrap replications for probability of improvement and performance profiles "
                             f"(default {d['poi_reps']:,})")
    parser.add_argument("--stats-seed", type=int, default=None, help=f"numpy seed of the bootstraps (default {d['stats_seed']})")
    parser.add_argument("--workers", type=int, default=None,
                        help=f"processes reading TensorBoard files (default {d['workers']})")


def given_report_options(args) -> list[str]:
    """The report options given on the command line (not left at their defaults)."""
    names = ["out", "partial", "at_step", *REPORT_DEFAULTS]
    return ["--" + n.replace("_", "-") for n in names if getattr(args, n) not in (None, False)]


def report_from_args(args, experiment: Experiment, extra=()) -> dict[str, str]:
    o = {k: REPORT_DEFAULTS[k] if getattr(args, k) is None else getattr(args, k) for k in REPORT_DEFAULTS}
    if o["final_window"] < 1 or o["reps"] < 1 or o["curve_reps"] < 1 or o["poi_reps"] < 1 or o["workers"] < 1:
        raise BenchmarkError("--final-window, --workers and the --*reps options must be positive")
    if getattr(args, "steps", None) is not None and args.steps < 1:
        raise BenchmarkError("--steps must be positive")
    return report(experiment, args.runs_dir, args.out, args.tag, args.partial, args.at_step, o["final_window"],
                  o["reps"], o["curve_reps"], o["poi_reps"], o["stats_seed"], o["workers"],
                  steps=getattr(args, "steps", None), extra=extra)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = []
    if "--" in argv:  # the flags after `--` the runs were launched with (run.py's)
        extra, argv = argv[argv.index("--") + 1:], argv[:argv.index("--")]
    parser = argparse.ArgumentParser(prog="report.py", description=__doc__.split("\n\n")[0],
                                     epilog="Flags after `--`: those the runs were launched with after run.py's `--` "
                                            "(e.g. -- --encoder nature); runs launched with others are skipped.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", help="experiment name (fig1 ... fig19; `python benchmark/run.py --list`)")
    parser.add_argument("--runs-dir", default="runs", help="directory holding the run directories")
    parser.add_argument("--tag", default="", help="the --tag the runs were launched with")
    parser.add_argument("--steps", type=int, default=None,
                        help="the --steps the runs were launched with (default: each variant's budget); finished runs "
                             "of another budget are skipped")
    add_report_options(parser)
    args = parser.parse_args(argv)
    try:
        report_from_args(args, get_experiment(args.experiment), extra)
    except BenchmarkError as error:
        print(f"report.py: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
