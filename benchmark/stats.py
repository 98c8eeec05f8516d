"""The paper's statistics (SPEC §8): human-normalised scores, IQM / median / mean / optimality gap with 95%
stratified bootstrap confidence intervals, probability of improvement and performance profiles, via rliable.

rliable ignores its `random_state` argument, so every bootstrap seeds numpy's global generator first
(`np.random.seed(seed)`): the same data and seed give the same intervals.
"""

from __future__ import annotations

import sys

if __name__ == "__main__":  # a library module, not a command: say which one to run
    print("stats.py: error: this module is a library; run python benchmark/report.py --help", file=sys.stderr)
    sys.exit(2)

import warnings

import numpy as np
import pandas as pd

from benchmark.registry import Experiment, Panel, score_table

METRICS = ("median", "iqm", "mean", "optimality_gap")


def _rliable():
    with warnings.catch_warnings():  # rliable 1.2 imports arch, which warns about its own deprecations
        warnings.simplefilter("ignore")
        from rliable import library, metrics
    return library, metrics


def normalize(games: pd.Series, scores: pd.Series) -> pd.Series:
    """(score - random) / (human - random); NaN for games without a human score (they stay raw, out of aggregates)."""
    table = score_table()
    random = games.map(lambda g: table.get(g, {}).get("random"))
    human = games.map(lambda g: table.get(g, {}).get("human"))
    valid = random.notna() & human.notna()
    out = pd.Series(np.nan, index=scores.index, dtype=float)
    out[valid] = (scores[valid] - random[valid].astype(float)) / (human[valid].astype(float) - random[valid].astype(float))
    return out


def has_human_score(game: str) -> bool:
    row = score_table().get(game, {})
    return row.get("human") is not None and row.get("random") is not None


def final_scores(returns: pd.DataFrame, at_step: int | None = None, window: int = 1) -> pd.DataFrame:
    """One row per (variant, game, seed): the mean of the run's last `window` scores at or before `at_step`."""
    data = returns if at_step is None else returns[returns["step"] <= at_step]
    rows = []
    for (variant, game, seed), group in data.sort_values("step").groupby(["variant", "game", "seed"], sort=True):
        tail = group.tail(window)
        rows.append({"variant": variant, "game": game, "seed": seed, "step": int(tail["step"].iloc[-1]),
                     "return": float(tail["return"].mean()), "finished": bool(group["finished"].iloc[-1])})
    final = pd.DataFrame(rows, columns=["variant", "game", "seed", "step", "return", "finished"])
    final["normalized"] = normalize(final["game"], final["return"])
    return final


def panel_games(final: pd.DataFrame, panel: Panel) -> tuple[list[str], list[str]]:
    """Games aggregated in a panel: with a human score, in the panel's games, run by every variant that has data.

    Returns (games, variants with data)."""
    present = final[final["variant"].isin(panel.variants)]
    variants = [v for v in panel.variants if v in set(present["variant"])]
    games = None
    for v in variants:
        have = set(present.loc[present["variant"] == v, "game"])
        games = have if games is None else games & have
    games = sorted(g for g in (games or set()) if has_human_score(g) and (panel.games is None or g in panel.games))
    return games, variants


def score_matrix(final: pd.DataFrame, variant: str, games: list[str], column: str = "normalized") -> np.ndarray:
    """(runs x games) matrix; every game keeps its first R seeds, R = the fewest seeds any game has."""
    rows = final[(final["variant"] == variant) & final["game"].isin(games)].sort_values("seed")
    per_game = [rows.loc[rows["game"] == g, column].to_numpy(float) for g in games]
    runs = min(len(s) for s in per_game)
    return np.stack([s[:runs] for s in per_game], axis=1)


def aggregate_fn(scores: np.ndarray) -> np.ndarray:
    _, metrics = _rliable()
    return np.array([metrics.aggregate_median(scores), metrics.aggregate_iqm(scores), metrics.aggregate_mean(scores),
                     metrics.aggregate_optimality_gap(scores)])


def interval_estimates(matrices: dict, func, reps: int, seed: int):
    """rliable's stratified bootstrap (percentile, 95%) with numpy's global generator seeded."""
    library, _ = _rliable()
    np.random.seed(seed)
    return library.get_interval_estimates(matrices, func, reps=reps)


def aggregate(final: pd.DataFrame, panel: Panel, reps: int = 50_000, seed: int = 0) -> pd.DataFrame:
    """Median, IQM, mean and optimality gap of the normalised final scores, with 95% CIs, per variant."""
    games, variants = panel_games(final, panel)
    rows = []
    for v in variants:
        if not games:
            break
        matrix = score_matrix(final, v, games)
        point, interval = interval_estimates({v: matrix}, aggregate_fn, reps, seed)
        row = {"panel": panel.title, "variant": v, "label": panel.label_of(v), "games": len(games),
               "runs_per_game": matrix.shape[0]}
        for i, name in enumerate(METRICS):
            row[name], row[f"{name}_low"], row[f"{name}_high"] = point[v][i], interval[v][0, i], interval[v][1, i]
        rows.append(row)
    return pd.DataFrame(rows)


def improvement_probability(scores_x: np.ndarray, scores_y: np.ndarray) -> float:
    """P(X > Y) averaged over tasks: rliable's `probability_of_improvement` (Mann-Whitney U / (n_x n_y), ties
    count half), vectorised so that the bootstrap is fast."""
    wins = np.sign(scores_x[:, None, :] - scores_y[None, :, :])  # (runs_x, runs_y, tasks)
    return float(np.mean((wins + 1.0) / 2.0))


def probability_of_improvement(final: pd.DataFrame, panel: Panel, reps: int = 2_000, seed: int = 0) -> pd.DataFrame:
    """P(X > Y) with a 95% CI for the panel's (X, Y) comparisons that both have data."""
    games, variants = panel_games(final, panel)
    rows = []
    for x, y in panel.comparisons:
        if not games or x not in variants or y not in variants:
            continue
        pair = [score_matrix(final, x, games), score_matrix(final, y, games)]
        point, interval = interval_estimates({f"{x},{y}": pair}, improvement_probability, reps, seed)
        key = f"{x},{y}"
        rows.append({"panel": panel.title, "x": x, "y": y, "x_label": panel.label_of(x), "y_label": panel.label_of(y),
                     "games": len(games), "probability": float(point[key]),
                     "low": float(np.ravel(interval[key])[0]), "high": float(np.ravel(interval[key])[1])})
    return pd.DataFrame(rows)


def performance_profiles(final: pd.DataFrame, panel: Panel, taus: np.ndarray, reps: int = 2_000, seed: int = 0):
    """rliable score distributions: the fraction of runs with normalised score > tau, with 95% CIs."""
    library, _ = _rliable()
    games, variants = panel_games(final, panel)
    if not games:
        return {}, {}
    matrices = {v: score_matrix(final, v, games) for v in variants}
    np.random.seed(seed)
    return library.create_performance_profile(matrices, taus, reps=reps)


def value_at(steps: np.ndarray, values: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """The last value logged at or before each grid point (NaN before the first one)."""
    index = np.searchsorted(steps, grid, side="right") - 1
    out = np.where(index >= 0, values[np.clip(index, 0, None)], np.nan)
    return out


def iqm_curve(returns: pd.DataFrame, final: pd.DataFrame, panel: Panel, axis: str = "step", points: int = 40,
              reps: int = 2_000, seed: int = 0) -> pd.DataFrame:
    """IQM of normalised scores along `axis` ("step" or "hours") with 95% CIs, per variant of the panel.

    The grid runs up to the point every run has reached; each run contributes its last score at or before
    each grid point. The runs are those of the final scores (the same seeds per game as the aggregates)."""
    _, metrics = _rliable()
    games, variants = panel_games(final, panel)
    rows = []
    for v in variants:
        if not games:
            break
        chosen = final[(final["variant"] == v) & final["game"].isin(games)].sort_values("seed")
        runs_per_game = min(chosen.groupby("game").size())
        chosen = chosen.groupby("game").head(runs_per_game)
        series = {}
        for _, r in chosen.iterrows():
            d = returns[(returns["variant"] == v) & (returns["game"] == r["game"]) & (returns["seed"] == r["seed"])]
            d = d.sort_values(axis)
            series[(r["game"], r["seed"])] = (d[axis].to_numpy(float), d["normalized"].to_numpy(float))
        end = min(s[0][-1] for s in series.values())
        grid = np.unique(np.concatenate([s[0] for s in series.values()]))
        grid = grid[grid <= end]
        if len(grid) > points:
            grid = grid[np.unique(np.linspace(0, len(grid) - 1, points).round().astype(int))]
        cube = np.full((runs_per_game, len(games), len(grid)), np.nan)
        for j, g in enumerate(games):
            seeds = sorted(s for (game, s) in series if game == g)
            for i, s in enumerate(seeds):
                cube[i, j] = value_at(*series[(g, s)], grid)
        keep = ~np.isnan(cube).any(axis=(0, 1))
        cube, grid = cube[:, :, keep], grid[keep]
        if not len(grid):
            continue
        func = lambda s: np.array([metrics.aggregate_iqm(s[..., k]) for k in range(s.shape[-1])])  # noqa: E731
        point, interval = interval_estimates({v: cube}, func, reps, seed)
        for k, x in enumerate(grid):
            rows.append({"panel": panel.title, "variant": v, "label": panel.label_of(v), axis: x,
                         "iqm": point[v][k], "low": interval[v][0, k], "high": interval[v][1, k]})
    return pd.DataFrame(rows, columns=["panel", "variant", "label", axis, "iqm", "low", "high"])  # a header when empty


def per_game_table(final: pd.DataFrame, experiment: Experiment) -> pd.DataFrame:
    """Mean and std over seeds of the raw final return, per game and variant (all games, with or without human score)."""
    table = final.groupby(["variant", "game"])["return"].agg(["mean", "std", "count"]).reset_index()
    order = {v.name: i for i, v in enumerate(experiment.variants)}
    return table.sort_values(["game", "variant"], key=lambda c: c.map(order) if c.name == "variant" else c)
