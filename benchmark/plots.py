"""Figures in the paper's form, as PNG files.

- scaling:  IQM vs number of experts (or replay ratio) per series, with 95% CIs (Figures 1, 4, 5)
- curves:   IQM over frames (sample-efficiency curves; gradient steps offline) with 95% CIs (Figures 6-9, 11-13, 16-18)
- walltime: IQM over training hours (Figure 19)
- metrics:  return, eNTK srank, feature norm, dormant neurons over frames, per game (Figure 10)
- per_game: final raw return per game and variant, mean and seeds
- profiles: performance profiles (fraction of runs above each normalised score)
"""

from __future__ import annotations

import sys

if __name__ == "__main__":  # a library module, not a command: say which one to run
    print("plots.py: error: this module is a library; run python benchmark/report.py --help", file=sys.stderr)
    sys.exit(2)

import math
import textwrap

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from benchmark.registry import SCRIPTS, Experiment, Panel  # noqa: E402

COLORS = plt.get_cmap("tab10").colors
IQM_LABEL = "IQM human-normalized score"


def _colors(panel: Panel) -> dict[str, tuple]:
    """One colour per series of the panel; within a series of several variants (1, 2, 4, 8 experts), light to dark."""
    out = {}
    for i, (_, names) in enumerate(panel.series):
        base = np.array(matplotlib.colors.to_rgb(COLORS[i % len(COLORS)]))
        for k, n in enumerate(names):
            shade = 1.0 if len(names) == 1 else 0.35 + 0.65 * (k + 1) / len(names)
            out.setdefault(n, tuple(1 - shade * (1 - base)))  # mix with white
    return out


def _grid(n: int, cols: int, size=(4.2, 3.2)):
    cols = max(1, min(cols, n))
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(size[0] * cols, size[1] * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def _save(fig, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def x_axis(experiment: Experiment, panel: Panel) -> tuple[float, str]:
    """(factor from TensorBoard steps to the x axis, its label) for a panel's curves."""
    scripts = {SCRIPTS[experiment.variant(v).script] for v in panel.variants}
    if any(s.kind == "offline" for s in scripts):
        return 1.0, "gradient steps"
    return 4 / 1e6, "frames (millions)"


def plot_scaling(aggregates: pd.DataFrame, experiment: Experiment, path: str) -> str | None:
    """IQM against each variant's x (number of experts, replay ratio), one line per series, one axis per panel."""
    panels = [p for p in experiment.panels if not aggregates.empty and p.title in set(aggregates["panel"])]
    if not panels:
        return None
    fig, axes = _grid(len(panels), 2)
    for ax, panel in zip(axes, panels):
        data = aggregates[aggregates["panel"] == panel.title].set_index("variant")
        xs_all = set()
        for i, (label, names) in enumerate(panel.series):
            names = [n for n in names if n in data.index]
            if not names:
                continue
            xs = np.array([experiment.variant(n).x for n in names], float)
            iqm = data.loc[names, "iqm"].to_numpy()
            err = np.abs(np.stack([iqm - data.loc[names, "iqm_low"], data.loc[names, "iqm_high"] - iqm]))
            ax.errorbar(xs, iqm, yerr=err, marker="o", capsize=4, color=COLORS[i % len(COLORS)], label=label)
            xs_all |= set(xs)
        if experiment.x_log2:
            ax.set_xscale("log", base=2)
        ticks = sorted(xs_all)
        ax.set_xticks(ticks)
        ax.set_xticklabels([f"{t:g}" for t in ticks])
        ax.set_xlabel(experiment.x_label)
        ax.set_ylabel(IQM_LABEL)
        ax.set_title(panel.title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(experiment.title)
    return _save(fig, path)


def plot_curves(curves: pd.DataFrame, experiment: Experiment, path: str, axis: str = "step") -> str | None:
    """IQM along training (frames, gradient steps or hours) with a shaded 95% CI, one axis per panel."""
    panels = [p for p in experiment.panels if not curves.empty and p.title in set(curves["panel"])]
    if not panels:
        return None
    fig, axes = _grid(len(panels), 2, size=(5.2, 3.6))
    for ax, panel in zip(axes, panels):
        scale, label = (1.0, "training time (hours)") if axis == "hours" else x_axis(experiment, panel)
        colors = _colors(panel)
        data = curves[curves["panel"] == panel.title]
        for v in panel.variants:
            d = data[data["variant"] == v]
            if d.empty:
                continue
            x = d[axis].to_numpy(float) * scale
            ax.plot(x, d["iqm"], marker="." if len(d) < 3 else None, color=colors[v], label=panel.label_of(v))
            ax.fill_between(x, d["low"], d["high"], color=colors[v], alpha=0.2)
        ax.set_xlabel(label)
        ax.set_ylabel(IQM_LABEL)
        ax.set_title(panel.title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(experiment.title + (": IQM against training hours" if axis == "hours" else ""))
    return _save(fig, path)


def plot_per_game(final: pd.DataFrame, experiment: Experiment, panel: Panel, path: str) -> str | None:
    """Bars of the mean final raw return per variant, one axis per game; dots are the seeds."""
    data = final[final["variant"].isin(panel.variants)]
    if panel.games is not None:
        data = data[data["game"].isin(panel.games)]
    if data.empty:
        return None
    games = sorted(set(data["game"]))
    variants = [v for v in panel.variants if v in set(data["variant"])]
    colors = _colors(panel)
    fig, axes = _grid(len(games), 5, size=(max(2.4, 0.55 * len(variants) + 1.2), 2.2 + 0.09 * max(
        len(panel.label_of(v)) for v in variants)))
    for ax, game in zip(axes, games):
        for i, v in enumerate(variants):
            seeds = data[(data["game"] == game) & (data["variant"] == v)]["return"].to_numpy(float)
            if len(seeds):
                ax.bar(i, seeds.mean(), color=colors[v], alpha=0.8)
                ax.scatter(np.full(len(seeds), i), seeds, s=8, color="black", zorder=3)
        ax.set_title(game, fontsize="small")
        ax.set_xticks(range(len(variants)))
        ax.set_xticklabels([panel.label_of(v) for v in variants], rotation=60, ha="right", fontsize="x-small")
        ax.tick_params(axis="y", labelsize="x-small")
    fig.suptitle(textwrap.fill(f"{experiment.title} — {panel.title}: final return per game (raw score)",
                               max(30, int(fig.get_figwidth() * 11))), fontsize="medium")
    return _save(fig, path)


def plot_profiles(profiles: dict, profile_cis: dict, taus: np.ndarray, experiment: Experiment, panel: Panel,
                  path: str) -> str | None:
    """Performance profile: fraction of runs with human-normalised score above tau, with 95% CIs."""
    if not profiles:
        return None
    colors = _colors(panel)
    fig, ax = plt.subplots(figsize=(6, 4))
    for v, profile in profiles.items():
        ax.plot(taus, profile, color=colors[v], label=panel.label_of(v))
        ax.fill_between(taus, profile_cis[v][0], profile_cis[v][1], color=colors[v], alpha=0.2)
    ax.set_xlabel(r"human-normalized score ($\tau$)")
    ax.set_ylabel(r"fraction of runs with score $> \tau$")
    ax.set_title(f"{experiment.title} — {panel.title}", fontsize="medium")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, path)


METRIC_COLUMNS = (("metrics/entk_srank", "eNTK srank"), ("metrics/feature_norm", "feature norm"),
                  ("metrics/dormant_tau0", "dormant neurons (τ=0)"), ("metrics/dormant_tau0.1", "dormant neurons (τ=0.1)"),
                  ("metrics/srank", "feature srank"))


def plot_metrics(returns: pd.DataFrame, metrics: pd.DataFrame, experiment: Experiment, path: str) -> str | None:
    """Figure 10: one row per game; the return and each analysis metric over frames; mean over seeds ± std."""
    if returns.empty and (metrics is None or metrics.empty):
        return None
    panel = experiment.panels[0]
    colors = _colors(panel)
    present = set(metrics["metric"]) if metrics is not None else set()
    columns = [("return", "return")] + [(tag, name) for tag, name in METRIC_COLUMNS if tag in present]
    games = sorted(set(returns["game"]) | (set(metrics["game"]) if metrics is not None else set()))
    fig, axes = plt.subplots(len(games), len(columns), figsize=(3.4 * len(columns), 2.6 * len(games)), squeeze=False)
    for row, game in zip(axes, games):
        for ax, (tag, name) in zip(row, columns):
            if tag == "return":
                data = returns[returns["game"] == game].rename(columns={"return": "value"})
            else:
                data = metrics[(metrics["game"] == game) & (metrics["metric"] == tag)]
            for v in panel.variants:
                d = data[data["variant"] == v]
                if d.empty:
                    continue
                stats = d.groupby("frames")["value"].agg(["mean", "std"]).reset_index().fillna(0.0)
                x = stats["frames"] / 1e6
                ax.plot(x, stats["mean"], color=colors[v], label=panel.label_of(v), marker="." if len(stats) < 3 else None)
                ax.fill_between(x, stats["mean"] - stats["std"], stats["mean"] + stats["std"], color=colors[v], alpha=0.2)
            ax.set_title(f"{game}: {name}", fontsize="small")
            ax.set_xlabel("frames (millions)", fontsize="small")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize="x-small")
    fig.suptitle(experiment.title)
    return _save(fig, path)
