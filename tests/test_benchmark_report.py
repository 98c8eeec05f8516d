"""benchmark/collect.py, stats.py, plots.py and report.py on real TensorBoard event files with known values:
the tidy table, human-normalised scores and IQM against hand computations, the intervals against rliable."""

import argparse
import json
import os
import subprocess
import sys
import warnings

import matplotlib.image
import numpy as np
import pandas as pd
import pytest
import tyro
from torch.utils.tensorboard import SummaryWriter

from conftest import ROOT, load_script

sys.path.insert(0, ROOT)
from benchmark.registry import EXPERIMENTS, plan  # noqa: E402
from benchmark.report import report  # noqa: E402
from benchmark.stats import improvement_probability  # noqa: E402

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from rliable import library as rly
    from rliable import metrics

# human and random scores of the paper's tables (Pong, Breakout); AirRaid has no human score
PONG, BREAKOUT = (-20.7, 14.6), (1.7, 30.5)
STAMP = 1_700_000_000


def logged_args(exp_name, game="Pong", seed=1, steps=None, extra=()):
    """What a script logs as summary.json's args for a run of this exp name (with or without a tag): every field of
    its Args, parsed from the registry's command by the script's own parser (as the script does, not as launch.py)."""
    for tagged in (False, True):
        for experiment in EXPERIMENTS.values():
            for v in experiment.variants:
                tag = exp_name.rsplit("-", 1)[-1] if tagged else ""
                if exp_name != experiment.exp_name(v.name, tag):
                    continue
                (run,) = plan(experiment, games=[game], seeds=1, variants=[v.name], steps=steps, tag=tag,
                              extra=extra, resume=False)
                module = load_script(run.script)
                args = tyro.cli(module.Args, args=[*run.flags, "--seed", str(seed)])
                args = module.with_agent_defaults(args) if hasattr(module, "with_agent_defaults") else args
                return json.loads(json.dumps(vars(args)))
    raise KeyError(exp_name)


def write_run(runs_dir, game, exp_name, seed, scalars, stamp=STAMP, finished=True, budget=None, extra=(), args=None):
    """A run directory as the scripts write it: TensorBoard events, then summary.json when finished, with the
    arguments of the registry's command (of a run.py --steps `budget` quick look, `extra` after `--`), or `args`."""
    path = os.path.join(runs_dir, f"{game}__{exp_name}__{seed}__{stamp}")
    writer = SummaryWriter(path)
    for tag, points in scalars.items():
        for point in points:
            step, value, wall = (*point, None)[:3]
            writer.add_scalar(tag, value, step, walltime=wall)
    writer.close()
    if finished:
        with open(os.path.join(path, "summary.json"), "w") as f:
            args = args if args is not None else logged_args(exp_name, game, seed, budget, extra)
            json.dump({"game": game, "exp_name": exp_name, "seed": seed, "args": args}, f)
    return path


def iteration_returns(final, first=0.0):
    return {"charts/iteration_return": [(250_000, first), (500_000, final)]}


# fig18's 4x4 panel: X = Soft MoE, Y = baseline; final returns per game and seed 1..4
X = {"Pong": [10.0, -5.0, 3.0, 20.0], "Breakout": [25.0, 5.0, 12.0, 30.0], "AirRaid": [1000.0, 2000.0, 1500.0, 1200.0]}
Y = {"Pong": [-20.0, -21.0, 3.0, 5.0], "Breakout": [2.0, 5.0, 3.0, 40.0], "AirRaid": [900.0, 800.0, 700.0, 600.0]}


@pytest.fixture(scope="module")
def fig18_report(tmp_path_factory):
    root = tmp_path_factory.mktemp("fig18")
    runs = str(root / "runs")
    for variant, table in (("dqn-softmoe-8-filter4", X), ("dqn-baseline-filter4", Y)):
        for game, finals in table.items():
            for seed, final in enumerate(finals, start=1):
                write_run(runs, game, f"fig18-{variant}-t", seed, iteration_returns(final, first=seed))
    # an older finished run of the same cell (ignored: the newest finished run counts) ...
    write_run(runs, "Pong", "fig18-dqn-softmoe-8-filter4-t", 1, iteration_returns(-21.0), stamp=STAMP - 10)
    # ... an unfinished run (skipped unless --partial), and runs of another tag and experiment (ignored)
    write_run(runs, "Breakout", "fig18-dqn-softmoe-8-filter4-t", 5, iteration_returns(0.0), finished=False)
    write_run(runs, "Pong", "fig18-dqn-softmoe-8-filter4", 1, iteration_returns(7.0))
    write_run(runs, "Pong", "fig1-dqn-softmoe-8-t", 1, iteration_returns(7.0))
    out = str(root / "results")
    written = report(EXPERIMENTS["fig18"], runs, out, tag="t", reps=1000, curve_reps=50, poi_reps=100, say=lambda s: None)
    return runs, out, written


def norm(game, value):
    random, human = {"Pong": PONG, "Breakout": BREAKOUT}[game]
    return (value - random) / (human - random)


def matrix(table):
    """(runs x games) human-normalised final scores, games in alphabetical order, AirRaid left out."""
    return np.array([[norm(g, table[g][s]) for g in ("Breakout", "Pong")] for s in range(4)])


def test_tidy_table_holds_what_the_runs_logged(fig18_report):
    _, out, _ = fig18_report
    returns = pd.read_csv(os.path.join(out, "returns.csv"))
    assert list(returns.columns) == ["experiment", "variant", "game", "seed", "step", "frames", "hours", "return",
                                     "normalized", "finished"]
    assert set(returns["experiment"]) == {"fig18"} and returns["finished"].all()
    expected = {(v, g, s + 1, 500_000, final) for v, table in (("dqn-softmoe-8-filter4", X), ("dqn-baseline-filter4", Y))
                for g, finals in table.items() for s, final in enumerate(finals)}
    expected |= {(v, g, s, 250_000, float(s)) for v, g, s, _, _ in expected}
    assert set(returns[["variant", "game", "seed", "step", "return"]].itertuples(index=False, name=None)) == expected
    assert (returns["frames"] == 4 * returns["step"]).all()
    for _, row in returns.iterrows():
        if row["game"] == "AirRaid":
            assert np.isnan(row["normalized"])  # no human score: raw only
        else:
            assert row["normalized"] == pytest.approx(norm(row["game"], row["return"]))


def test_iqm_median_mean_and_intervals(fig18_report):
    _, out, _ = fig18_report
    aggregates = pd.read_csv(os.path.join(out, "aggregates.csv")).set_index("variant")
    for variant, table in (("dqn-softmoe-8-filter4", X), ("dqn-baseline-filter4", Y)):
        row = aggregates.loc[variant]
        assert row["games"] == 2 and row["runs_per_game"] == 4  # AirRaid left out of the aggregates
        scores = sorted(matrix(table).ravel())  # 8 scores: the IQM is the mean of the middle four
        assert row["iqm"] == pytest.approx(sum(scores[2:6]) / 4)
        game_means = matrix(table).mean(axis=0)  # the median is over games of the mean over runs (Agarwal et al.)
        assert row["median"] == pytest.approx((game_means[0] + game_means[1]) / 2)
        assert row["mean"] == pytest.approx(sum(scores) / 8)
        assert row["optimality_gap"] == pytest.approx(1 - np.mean(np.minimum(scores, 1)))
        # the intervals are rliable's stratified bootstrap on the same matrix with numpy's generator seeded
        np.random.seed(0)
        fn = lambda s: np.array([metrics.aggregate_median(s), metrics.aggregate_iqm(s), metrics.aggregate_mean(s),  # noqa
                                 metrics.aggregate_optimality_gap(s)])
        _, ci = rly.get_interval_estimates({"m": matrix(table)}, fn, reps=1000)
        assert [row["iqm_low"], row["iqm_high"]] == pytest.approx(ci["m"][:, 1], abs=1e-12)
        assert [row["median_low"], row["median_high"]] == pytest.approx(ci["m"][:, 0], abs=1e-12)
        assert row["iqm_low"] < row["iqm"] < row["iqm_high"]


def test_probability_of_improvement_matches_rliable(fig18_report):
    _, out, _ = fig18_report
    poi = pd.read_csv(os.path.join(out, "probability_of_improvement.csv"))
    row = poi[(poi["x"] == "dqn-softmoe-8-filter4") & (poi["y"] == "dqn-baseline-filter4")].iloc[0]
    mx, my = matrix(X), matrix(Y)
    assert row["probability"] == pytest.approx(metrics.probability_of_improvement(mx, my))
    np.random.seed(0)
    _, ci = rly.get_interval_estimates({"p": [mx, my]}, metrics.probability_of_improvement, reps=100)
    assert [row["low"], row["high"]] == pytest.approx(np.ravel(ci["p"]), abs=1e-12)
    rng = np.random.default_rng(0)
    for shape_x, shape_y in (((5, 3), (5, 3)), ((3, 4), (6, 4))):  # ties included (small integers)
        a, b = rng.integers(0, 4, shape_x).astype(float), rng.integers(0, 4, shape_y).astype(float)
        assert improvement_probability(a, b) == pytest.approx(metrics.probability_of_improvement(a, b))


def test_summary_and_figures(fig18_report):
    runs, out, written = fig18_report
    summary = open(os.path.join(out, "summary.md")).read()
    assert "## Filter size (4x4)" in summary and "| SoftMoE | `fig18-dqn-softmoe-8-filter4-t` |" in summary
    assert "AirRaid" in summary and "left out of aggregates" in summary
    assert "24 runs read from" in summary and "24 finished; 1 unfinished skipped" in summary
    for name in ("curves", "per_game:Filter size (4x4)", "profiles:Filter size (4x4)"):
        assert_png(written[name])
    # --partial adds the unfinished run; Breakout then has 5 seeds and the matrix keeps 4 per game
    partial = report(EXPERIMENTS["fig18"], runs, out + "-partial", tag="t", partial=True, reps=200, curve_reps=20,
                     poi_reps=20, say=lambda s: None)
    returns = pd.read_csv(partial["returns.csv"])
    assert (~returns["finished"]).sum() == 2
    assert pd.read_csv(partial["aggregates.csv"])["runs_per_game"].tolist() == [4, 4]


def assert_png(path):
    assert os.path.getsize(path) > 5_000, path
    pixels = matplotlib.image.imread(path)
    assert pixels.ndim == 3 and pixels.std() > 0.01, path  # not a blank image


def test_atari100k_evaluations_and_figure_1_plots(tmp_path):
    runs = str(tmp_path / "runs")
    for seed in (1, 2):
        for game, offset in (("Pong", 0.0), ("Breakout", 10.0)):
            for n in (1, 2):
                for kind in ("baseline", "softmoe"):
                    value = offset + n * seed + (kind == "softmoe")
                    write_run(runs, game, f"fig1-dqn-{kind}-{n}", seed,
                              {"charts/iteration_return": [(k * 250_000, value * k / 3) for k in (1, 2, 3)]})
        # Atari 100k: eval/episodic_return at the step of the evaluation (the scripts log the games' mean; runs of
        # earlier versions logged one value per game, which count as their mean)
        write_run(runs, "Pong", "fig12-drq-softmoe-8-100k", seed, {"eval/episodic_return": [(100_000, 1.0 * seed),
                                                                                             (100_000, 2.0 * seed),
                                                                                             (100_000, 3.0 * seed)]})
    written = report(EXPERIMENTS["fig1"], runs, str(tmp_path / "fig1"), reps=200, curve_reps=20, poi_reps=20,
                     say=lambda s: None)
    for name in ("scaling", "curves", "per_game:DQN", "profiles:DQN"):
        assert_png(written[name])
    assert os.path.basename(written["scaling"]) == "fig1_iqm_vs_number-of-experts.png"
    aggregates = pd.read_csv(written["aggregates.csv"])
    assert set(aggregates["variant"]) == {"dqn-baseline-1", "dqn-baseline-2", "dqn-softmoe-1", "dqn-softmoe-2"}
    curves = pd.read_csv(written["curves.csv"])
    assert sorted(set(curves["step"])) == [250_000, 500_000, 750_000]

    written = report(EXPERIMENTS["fig12"], runs, str(tmp_path / "fig12"), reps=200, curve_reps=20, poi_reps=20,
                     say=lambda s: None)
    returns = pd.read_csv(written["returns.csv"])
    assert returns[["seed", "step", "frames", "return"]].values.tolist() == [[1, 100_000, 400_000, 2.0],
                                                                             [2, 100_000, 400_000, 4.0]]


def test_figure_10_metrics_and_figure_19_wall_time(tmp_path):
    runs = str(tmp_path / "runs")
    t0 = 1_700_000_000.0
    for seed in (1, 2):
        for variant in ("baseline", "softmoe-8"):
            write_run(runs, "Pong", f"fig10-rainbow-{variant}", seed, {
                "charts/iteration_return": [(250_000, -20.0 + seed), (500_000, -10.0 + seed)],
                "metrics/entk_srank": [(250_000, 10.0 + seed), (500_000, 12.0)],
                "metrics/feature_norm": [(250_000, 3.0), (500_000, 4.0 + seed)],
                "metrics/dormant_tau0": [(250_000, 0.1), (500_000, 0.2)]})
            # 1 h of training (an event every 10 min), a 5 h gap (a requeue: not training time), 1 h more
            walls = [t0, t0 + 3600, t0 + 6 * 3600, t0 + 7 * 3600]
            ticks = [t0 + 600 * k for k in range(7)] + [t0 + 6 * 3600 + 600 * k for k in range(7)]
            write_run(runs, "Pong", f"fig19-rainbow-{variant}-impala", seed, {
                "charts/SPS": [(k, 100.0, w) for k, w in enumerate(ticks)],
                "charts/iteration_return": [(250_000 * (k + 1), float(k + seed), w) for k, w in enumerate(walls)]})
    written = report(EXPERIMENTS["fig10"], runs, str(tmp_path / "fig10"), reps=200, curve_reps=20, poi_reps=20,
                     say=lambda s: None)
    assert_png(written["metrics"])
    metric_rows = pd.read_csv(written["metrics.csv"])
    assert len(metric_rows) == 2 * 2 * 3 * 2 and set(metric_rows["metric"]) == {
        "metrics/entk_srank", "metrics/feature_norm", "metrics/dormant_tau0"}
    written = report(EXPERIMENTS["fig19"], runs, str(tmp_path / "fig19"), reps=200, curve_reps=20, poi_reps=20,
                     say=lambda s: None)
    assert_png(written["walltime"])
    returns = pd.read_csv(written["returns.csv"])
    assert returns.groupby("step")["hours"].first().tolist() == pytest.approx([0.0, 1.0, 1.0, 2.0])
    hours = pd.read_csv(written["walltime_curves.csv"])
    assert sorted(set(hours["hours"])) == pytest.approx([0.0, 1.0, 2.0])


def test_a_quick_look_beside_the_sweep_is_not_scored_as_the_full_run(tmp_path):
    runs = str(tmp_path / "runs")
    for game, full in (("Pong", 5.0), ("Breakout", 20.0)):  # the full runs, then a newer --steps 600 quick look
        write_run(runs, game, "fig18-dqn-softmoe-8-filter4", 1, iteration_returns(full))
        write_run(runs, game, "fig18-dqn-softmoe-8-filter4", 1, {"charts/iteration_return": [(600, -1.0)]},
                  stamp=STAMP + 10, budget=600)

    def scores(**options):
        written = report(EXPERIMENTS["fig18"], runs, str(tmp_path / "out"), reps=100, curve_reps=10, poi_reps=10,
                         say=lambda s: None, **options)
        final = pd.read_csv(written["returns.csv"]).groupby("game")["return"].last()
        return final.to_dict(), open(written["summary.md"]).read()

    full, summary = scores()
    assert full == {"Breakout": 20.0, "Pong": 5.0} and "2 finished runs of another budget skipped" in summary
    assert scores(steps=600)[0] == {"Breakout": -1.0, "Pong": -1.0}


def test_the_report_of_a_plan_reads_the_runs_that_plan_skips_as_finished(tmp_path, capsys):
    """Runs of the right name launched with other flags after `--` (a Nature-CNN quick look beside Impala runs of the
    same budget) are skipped and counted; the report given the same flags (report.py's `--`) reads them instead."""
    from benchmark.report import main as report_main

    runs = str(tmp_path / "runs")
    nature = ("--encoder", "nature", "--learning-starts", "500", "--metrics-every", "0")
    for game in ("Pong", "Breakout"):
        write_run(runs, game, "fig18-dqn-softmoe-8-filter4", 1, {"charts/iteration_return": [(600, 3.0)]}, budget=600)
        write_run(runs, game, "fig18-dqn-softmoe-8-filter4", 1, {"charts/iteration_return": [(600, -1.0)]},
                  stamp=STAMP + 10, budget=600, extra=nature)

    def scores(**options):
        written = report(EXPERIMENTS["fig18"], runs, str(tmp_path / "out"), reps=50, curve_reps=5, poi_reps=5,
                         say=lambda s: None, steps=600, **options)
        final = pd.read_csv(written["returns.csv"]).groupby("game")["return"].last()
        return final.to_dict(), open(written["summary.md"]).read()

    impala, summary = scores()
    assert impala == {"Breakout": 3.0, "Pong": 3.0}
    assert "2 finished runs launched with other arguments skipped" in summary and "--learning-starts 500" in summary
    quick, summary = scores(extra=nature)
    assert quick == {"Breakout": -1.0, "Pong": -1.0} and "2 finished runs launched with other arguments" in summary
    # flags that change no score or curve may differ; the command line takes the flags after `--` as run.py does
    assert scores(extra=(*nature, "--no-cuda", "--checkpoint-every", "100"))[0] == quick
    options = ["--runs-dir", runs, "--steps", "600", "--out", str(tmp_path / "cli"), "--reps", "50", "--curve-reps",
               "5", "--poi-reps", "5", "--workers", "1"]
    assert report_main(["fig18", *options, "--", *nature]) == 0
    assert pd.read_csv(tmp_path / "cli" / "returns.csv")["return"].tolist() == [-1.0, -1.0]
    # only Nature-CNN runs, reported as the plan's default: one line saying why there is nothing and what differs
    only = str(tmp_path / "only")
    write_run(only, "Pong", "fig18-dqn-softmoe-8-filter4", 1, iteration_returns(1.0), extra=nature)
    capsys.readouterr()
    assert report_main(["fig18", "--runs-dir", only, "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"report.py: error: no results for fig18 in {only}: 1 run directories, 1 finished with other "
                          "arguments (pass the flags after -- they were run with; e.g. "
                          "Pong__fig18-dqn-softmoe-8-filter4__1__1700000000: --learning-starts 500, planned 20000)")
    assert err.count("\n") == 1, err
    # a flag the plan sets matches no run: refused as run.py refuses it
    assert report_main(["fig18", "--runs-dir", only, "--", "--num-experts", "4"]) == 2
    assert capsys.readouterr().err.startswith("report.py: error: -- --num-experts: variant dqn-baseline-filter4 is "
                                              "defined by `--num-experts 1`")


def test_a_tag_that_makes_another_variants_name_is_refused(tmp_path, capsys):
    from benchmark.report import main as report_main

    assert report_main(["fig9", "--runs-dir", str(tmp_path), "--tag", "lb"]) == 2
    assert capsys.readouterr().err == ("report.py: error: --tag 'lb': fig9-dqn-top1-8-lb, the exp name of dqn-top1-8's "
                                       "runs with it, is that of variant dqn-top1-8-lb's runs; pick another tag\n")


def test_offline_runs_are_scored_at_a_gradient_step(tmp_path):
    """fig11's logged step is the gradient step: --at-step and summary.md say so; a --steps quick look counts
    gradient steps (10 iterations of 100 for --steps 1000), read back from summary.json consistently."""
    from benchmark.collect import logged_budget
    from benchmark.report import add_report_options

    runs = str(tmp_path / "runs")
    for steps, value in ((None, 5.0), (1000, 2.0)):
        length = steps or 200 * 62_500
        path = write_run(runs, "Pong", "fig11-cql-softmoe-8-5pct", 1, {"eval/episodic_return": [
            (length // 2, value - 1), (length, value)]}, stamp=STAMP + bool(steps), budget=steps)
        assert logged_budget(path, "cql_softmoe") == length
    for steps, expected in ((None, 4.0), (1000, 1.0)):
        written = report(EXPERIMENTS["fig11"], runs, str(tmp_path / f"out{steps}"), reps=50, curve_reps=5, poi_reps=5,
                         say=lambda s: None, steps=steps, at_step=(steps or 200 * 62_500) // 2)
        assert pd.read_csv(written["final_scores.csv"])["return"].tolist() == [expected]
        summary = open(written["summary.md"]).read()
        assert f"at or before gradient step {(steps or 200 * 62_500) // 2:,}" in summary and "agent step" not in summary
    parser = argparse.ArgumentParser()
    add_report_options(parser)
    assert "gradient steps for offline" in " ".join(parser.format_help().split())


def test_no_results_is_one_clear_line(tmp_path):
    (tmp_path / "runs").mkdir()
    write_run(str(tmp_path / "runs"), "Pong", "fig1-dqn-softmoe-8", 1, iteration_returns(1.0), finished=False)
    result = subprocess.run([sys.executable, os.path.join(ROOT, "benchmark", "report.py"), "fig1", "--runs-dir",
                             str(tmp_path / "runs"), "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr == (f"report.py: error: no results for fig1 in {tmp_path / 'runs'}: 1 run directories, "
                             "1 unfinished (use --partial to include them)\n")
    assert not (tmp_path / "out").exists()


def test_unreadable_event_files_and_runs_without_a_score_are_named_and_counted(tmp_path):
    """A damaged event file is named (one warning line each), and so is every run left without a score; summary.md
    counts them instead of calling every run read a finished, scored run."""
    runs = str(tmp_path / "runs")
    paths = {game: write_run(runs, game, "fig18-dqn-softmoe-8-filter4", 1, iteration_returns(value))
             for game, value in (("Pong", 5.0), ("Breakout", 20.0), ("Asterix", 1.0))}
    write_run(runs, "Pong", "fig18-dqn-baseline-filter4", 1, {"charts/SPS": [(100, 50.0)]})  # no score logged
    garbage, = [os.path.join(paths["Breakout"], f) for f in os.listdir(paths["Breakout"]) if "tfevents" in f]
    with open(garbage, "wb") as f:
        f.write(os.urandom(300))
    cut, = [os.path.join(paths["Asterix"], f) for f in os.listdir(paths["Asterix"]) if "tfevents" in f]
    data = open(cut, "rb").read()
    with open(cut, "wb") as f:  # the last record cut: its first return is read, the final one is lost
        f.write(data[:-7])
    warnings_, said = [], []
    written = report(EXPERIMENTS["fig18"], runs, str(tmp_path / "out"), reps=100, curve_reps=10, poi_reps=10,
                     say=said.append, warn=warnings_.append)
    assert all(line.startswith("warning: ") and "\n" not in line for line in warnings_)
    named = sorted(line[len("warning: "):].split(": ", 1)[0] for line in warnings_)
    assert named == sorted([garbage, cut, paths["Breakout"], os.path.join(runs, "Pong__fig18-dqn-baseline-filter4__1__1700000000")])
    assert f"warning: {garbage}: unreadable from a damaged or cut record on (failed header crc32 check)" in warnings_
    assert f"warning: {cut}: unreadable from a damaged or cut record on (has truncated record in data)" in warnings_
    assert said[0].startswith("fig18: 4 runs (2 without a score, left out), 3 logged returns -> ")
    summary = open(written["summary.md"]).read()
    assert "4 runs read from" in summary and "2 of them have no score and are left out of every table" in summary
    assert "2 event files could not be read" in summary and garbage in summary


def test_report_cli_names_unreadable_files_on_stderr_and_still_reports(tmp_path):
    runs = str(tmp_path / "runs")
    write_run(runs, "Pong", "fig18-dqn-softmoe-8-filter4", 1, iteration_returns(5.0))
    bad = write_run(runs, "Breakout", "fig18-dqn-softmoe-8-filter4", 1, iteration_returns(20.0))
    for name in os.listdir(bad):
        if "tfevents" in name:
            with open(os.path.join(bad, name), "wb") as f:
                f.write(b"\x00garbage" * 40)
    result = subprocess.run([sys.executable, os.path.join(ROOT, "benchmark", "report.py"), "fig18", "--runs-dir", runs,
                             "--out", str(tmp_path / "out"), "--reps", "50", "--curve-reps", "5", "--poi-reps", "5",
                             "--workers", "1"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith(f"warning: {bad}") for line in lines), result.stderr
    assert "1 without a score" in result.stdout and (tmp_path / "out" / "summary.md").exists()


def test_missing_runs_dir_is_one_clear_line(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "benchmark", "report.py"), "fig1", "--runs-dir",
                             str(tmp_path / "nonexistent")], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr == (f"report.py: error: --runs-dir {tmp_path / 'nonexistent'} does not exist; pass the "
                             "--runs-dir the runs were launched with (default: runs)\n")
    assert not (tmp_path / "results").exists()


def test_a_quick_look_report_goes_to_its_own_folder(tmp_path, monkeypatch):
    """report.py --steps N writes results/{exp}-steps{N}/, never over the full report in results/{exp}/."""
    from benchmark.report import main as report_main

    runs = str(tmp_path / "runs")
    for game in ("Pong", "Breakout"):
        write_run(runs, game, "fig18-dqn-softmoe-8-filter4", 1, iteration_returns(5.0))
        write_run(runs, game, "fig18-dqn-softmoe-8-filter4", 1, {"charts/iteration_return": [(600, -1.0)]},
                  stamp=STAMP + 10, budget=600)
    monkeypatch.chdir(tmp_path)
    options = ["--runs-dir", runs, "--reps", "50", "--curve-reps", "5", "--poi-reps", "5", "--workers", "1"]
    assert report_main(["fig18", *options]) == 0
    full = (tmp_path / "results" / "fig18" / "returns.csv").read_text()
    assert report_main(["fig18", "--steps", "600", *options]) == 0
    assert (tmp_path / "results" / "fig18" / "returns.csv").read_text() == full  # the full report is untouched
    quick = pd.read_csv(tmp_path / "results" / "fig18-steps600" / "returns.csv")
    assert quick["return"].tolist() == [-1.0, -1.0]
    assert report_main(["fig18", "--steps", "600", "--tag", "t", *options]) == 2  # (no runs of that tag)


def test_no_stale_curves_or_figures_from_an_earlier_report(tmp_path):
    out = str(tmp_path / "out")
    first = str(tmp_path / "first")
    for game in ("Pong", "Breakout"):
        write_run(first, game, "fig18-dqn-softmoe-8-filter4", 1, iteration_returns(5.0))
    written = report(EXPERIMENTS["fig18"], first, out, reps=50, curve_reps=5, poi_reps=5, say=lambda s: None)
    assert len(pd.read_csv(written["curves.csv"])) > 0 and "curves" in written
    second = str(tmp_path / "second")  # AirRaid only: no human score, so no curve to draw
    write_run(second, "AirRaid", "fig18-dqn-softmoe-8-filter4", 1, iteration_returns(5.0))
    written = report(EXPERIMENTS["fig18"], second, out, reps=50, curve_reps=5, poi_reps=5, say=lambda s: None)
    curves = pd.read_csv(written["curves.csv"])
    assert curves.empty and list(curves.columns) == ["panel", "variant", "label", "step", "iqm", "low", "high"]
    assert "curves" not in written and not os.path.exists(os.path.join(out, "fig18_iqm_curves.png"))


@pytest.mark.parametrize("module,command", [("collect", "report.py"), ("plots", "report.py"), ("stats", "report.py"),
                                            ("launch", "run.py"), ("registry", "run.py")])
def test_library_modules_run_directly_say_which_command_to_use(module, command):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "benchmark", f"{module}.py"), "--help"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == (f"{module}.py: error: this module is a library; run python benchmark/{command} --help\n")
