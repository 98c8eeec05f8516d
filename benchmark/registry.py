"""The paper's experiments as named sweeps, each expanding to the exact script commands.

An experiment (one per figure of SPEC §9) is a list of variants (script + flags + budget + games) and a
list of panels (which variants are drawn and compared together, on which games). `plan()` expands an
experiment into one `Run` per (variant, game, seed), optionally shrunk for a quick look (fewer games,
seeds or steps). Nothing here starts a process; see `launch.py`.

Every run gets `--exp-name {experiment}-{variant}[-{tag}]`, unique per (experiment, variant), so the
run directory `{runs_dir}/{Game}__{exp_name}__{seed}__{unix_time}` tells which cell of which figure it is.
"""

from __future__ import annotations

import sys

if __name__ == "__main__":  # a library module, not a command: say which one to run
    print("registry.py: error: this module is a library; run python benchmark/run.py --help", file=sys.stderr)
    sys.exit(2)

import csv
import dataclasses
import difflib
import fnmatch
import functools
import importlib.util
import os
import re
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SCORES_CSV = os.path.join(HERE, "atari_scores.csv")  # copy of reference/atari_scores.csv (SPEC §8)


class BenchmarkError(Exception):
    """Bad input (unknown experiment, game, variant, ...): the CLIs print it as one line, no traceback."""


# =====================================================================================================
# THE SCRIPTS — the one place that describes how each script is driven.
# `flags` lists every flag the registry and the launcher pass to the script. For scripts that do not
# exist yet this is the contract we expect (from the team's notes); adjust it here when a script lands.
# tests/test_benchmark_registry.py parses every planned command with the script's own parser as soon as
# the file exists, and checks the commands of missing scripts against these lists.
# =====================================================================================================
ONLINE_FLAGS = (  # dqn_softmoe.py today (`python dqn_softmoe.py --help`)
    "--env-id", "--seed", "--exp-name", "--runs-dir", "--total-timesteps", "--iteration-steps", "--buffer-size",
    "--num-experts", "--moe-type", "--replay-ratio", "--expert-hidden-divide", "--tokenization", "--encoder",
    "--random-phi", "--load-balancing-coef", "--expert-variant", "--moe-l2-norm", "--impala-filter-size",
    "--metrics-every",
)
MOE_FLAGS = ("--num-experts", "--moe-type", "--tokenization", "--encoder", "--expert-hidden-divide", "--random-phi",
             "--load-balancing-coef", "--expert-variant", "--moe-l2-norm", "--impala-filter-size")


@dataclass(frozen=True)
class Script:
    """How the benchmark drives one top-level script."""

    name: str  # module name: the file is {ROOT}/{name}.py
    agent: str  # label in plots and tables
    kind: str  # "online" (Dopamine protocol), "atari100k" or "offline"
    metric: str  # the TensorBoard tag holding the paper's score
    budget_flag: str  # the flag that sets a run's length
    flags: tuple[str, ...]  # every flag we pass (the contract for scripts that do not exist yet)
    frames_per_step: int = 4  # x axis: TensorBoard steps are agent steps, frames = 4 x steps (1 for offline)

    @property
    def path(self) -> str:
        return os.path.join(ROOT, f"{self.name}.py")

    def exists(self) -> bool:
        return os.path.exists(self.path)


SCRIPTS = {
    "dqn_softmoe": Script("dqn_softmoe", "DQN", "online", "charts/iteration_return", "--total-timesteps", ONLINE_FLAGS),
    # rainbow_softmoe.py: same flag names as DQN, plus --noisy/--dueling/--double-q/--prioritized/--num-atoms/...
    "rainbow_softmoe": Script("rainbow_softmoe", "Rainbow", "online", "charts/iteration_return", "--total-timesteps",
                              ONLINE_FLAGS),
    # Atari-100k agents: --total-timesteps default 100k (12.5M for the 50M-frame runs), evaluation episodes' mean
    # logged as eval/episodic_return at the step of each evaluation (--eval-every, --eval-episodes default 100).
    "drq_softmoe": Script("drq_softmoe", "DrQ(ε)", "atari100k", "eval/episodic_return", "--total-timesteps",
                          ("--env-id", "--seed", "--exp-name", "--runs-dir", "--total-timesteps", "--buffer-size",
                           "--eval-every", *MOE_FLAGS)),
    "der_softmoe": Script("der_softmoe", "DER", "atari100k", "eval/episodic_return", "--total-timesteps",
                          ("--env-id", "--seed", "--exp-name", "--runs-dir", "--total-timesteps", "--buffer-size",
                           "--eval-every", *MOE_FLAGS)),
    # offline CQL / CQL+C51 on the DQN Replay Dataset; eval/episodic_return after each iteration. We assume its
    # TensorBoard step is the gradient step (x axis "gradient steps").
    "cql_softmoe": Script("cql_softmoe", "CQL", "offline", "eval/episodic_return", "--num-iterations",
                          ("--env-id", "--seed", "--exp-name", "--runs-dir", "--dataset-dir", "--agent",
                           "--data-fraction", "--num-iterations", "--gradient-steps-per-iteration",
                           "--checkpoints-per-iteration", *MOE_FLAGS),
                          frames_per_step=1),
}
RESUME_FLAG = ("--resume", "auto")  # passed only when the script's Args has a `resume` field (detected)


@functools.lru_cache(maxsize=None)
def load_script_module(name: str):
    """Import `{ROOT}/{name}.py` as a module (its training sits under `__main__`, so this runs nothing)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


@functools.lru_cache(maxsize=None)
def supports_resume(name: str) -> bool:
    """True when the script exists and its `Args` dataclass has a `resume` field (then runs get `--resume auto`)."""
    if not SCRIPTS[name].exists():
        return False
    try:
        args = load_script_module(name).Args
    except Exception as error:  # a script being edited must not block planning the others
        print(f"warning: cannot import {name}.py ({type(error).__name__}: {error}); planning it without --resume",
              file=sys.stderr)
        return False
    return "resume" in {f.name for f in dataclasses.fields(args)}


# =====================================================================================================
# Games (SPEC §8, paper Appendix A)
# =====================================================================================================
@functools.lru_cache(maxsize=None)
def score_table() -> dict[str, dict]:
    """{Game: {"rom", "random", "human", "paper20", "atari100k26", "paper60"}} from benchmark/atari_scores.csv."""
    table = {}
    with open(SCORES_CSV) as f:
        for row in csv.DictReader(f):
            table[row["game"]] = {
                "rom": row["rom"],
                "random": float(row["random"]) if row["random"] else None,
                "human": float(row["human"]) if row["human"] else None,
                **{k: row[k] == "1" for k in ("paper20", "atari100k26", "paper60")},
            }
    return table


def game_set(column: str) -> tuple[str, ...]:
    return tuple(g for g, row in score_table().items() if row[column])


PAPER20 = game_set("paper20")  # Fedus et al. 2020's 20 games, used for most figures
ATARI100K = game_set("atari100k26")  # Kaiser et al. 2020's 26 games (Figures 12, 16)
PAPER60 = game_set("paper60")  # the 60-game set (Figure 8 left)
# Figures 11/17 use "17 Atari games following Kumar et al. 2021b (DR3)"; the MoE paper does not list them and we
# could not confirm DR3's list from a source. This is OUR labelled choice: the 17 games as we read DR3's per-game
# tables. Replace it with `--games` if you know better. All 17 are in the DQN Replay Dataset and have human scores.
OFFLINE17 = ("Asterix", "BeamRider", "Breakout", "DemonAttack", "DoubleDunk", "Enduro", "IceHockey", "Jamesbond",
             "MsPacman", "Pong", "Qbert", "RoadRunner", "Seaquest", "SpaceInvaders", "WizardOfWor", "YarsRevenge",
             "Zaxxon")
FIG10_GAMES = ("Asterix", "Pong", "SpaceInvaders")  # the three games drawn in Figure 10


def resolve_game(name: str) -> str:
    """`Pong`, `pong`, `space_invaders`, `ALE/Pong-v5` or `PongNoFrameskip-v4` -> the CamelCase name of atari_scores.csv."""
    table = score_table()
    base = re.sub(r"(NoFrameskip|Deterministic)?-v\d+$", "", name.split("/")[-1])
    key = re.sub(r"[^a-z0-9]", "", base.lower())
    by_key = {re.sub(r"[^a-z0-9]", "", g.lower()): g for g in table}
    if key in by_key:
        return by_key[key]
    close = [by_key[k] for k in difflib.get_close_matches(key, list(by_key), n=4, cutoff=0.5)]
    raise BenchmarkError(f"unknown game {name!r}" + (f"; closest: {', '.join(close)}" if close else ""))


# =====================================================================================================
# Experiments
# =====================================================================================================
@dataclass(frozen=True)
class Variant:
    """One configuration of one script, run on every game of `games` with every seed."""

    name: str  # unique within its experiment, no "__" (it becomes part of the run directory name)
    script: str  # key of SCRIPTS
    flags: tuple[str, ...]  # the configuration's flags (agent, MoE, replay ratio, ...)
    budget: int  # value of the script's budget flag (agent steps, or iterations offline)
    games: tuple[str, ...]
    x: float | None = None  # position on the x axis of the IQM-vs-x plots (number of experts, replay ratio)
    run_flags: tuple[str, ...] = ()  # run-length related flags scaled by --steps (e.g. --eval-every)


@dataclass(frozen=True)
class Panel:
    """A sub-plot of the figure: series of variants compared on the same games."""

    title: str
    series: tuple[tuple[str, tuple[str, ...]], ...]  # (legend label, variant names in x order)
    games: tuple[str, ...] | None = None  # aggregate over these games only (None: the games that were run)
    comparisons: tuple[tuple[str, str], ...] = ()  # (X, Y) pairs for the probability of improvement P(X > Y)
    point_labels: tuple[tuple[str, str], ...] = ()  # (variant, "8 experts") inside a series of several variants

    @property
    def variants(self) -> tuple[str, ...]:
        seen = []
        for _, names in self.series:
            seen += [n for n in names if n not in seen]
        return tuple(seen)

    def series_of(self, variant: str) -> str:
        return next((label for label, names in self.series if variant in names), variant)

    def label_of(self, variant: str) -> str:
        """Legend label of a variant: its series' label, plus its point ("8 experts") when the series has several."""
        for label, names in self.series:
            if variant in names:
                return label if len(names) == 1 else f"{label} ({dict(self.point_labels).get(variant, variant)})"
        return variant


@dataclass(frozen=True)
class Experiment:
    name: str
    title: str
    description: str
    variants: tuple[Variant, ...]
    panels: tuple[Panel, ...]
    seeds: int = 5
    plots: tuple[str, ...] = ("curves", "per_game", "profiles")  # see plots.py
    x_label: str = ""  # x axis of the "scaling" plot
    x_log2: bool = True  # the scaling plot's x axis is log2 (number of experts, replay ratio)

    def variant(self, name: str) -> Variant:
        for v in self.variants:
            if v.name == name:
                return v
        raise BenchmarkError(f"experiment {self.name} has no variant {name!r}; variants: "
                             + ", ".join(v.name for v in self.variants))

    def exp_name(self, variant: str, tag: str = "") -> str:
        return f"{self.name}-{variant}" + (f"-{tag}" if tag else "")

    @property
    def scripts(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(v.script for v in self.variants))


M50 = 50_000_000  # agent steps = 200M frames: the paper's default budget (200 iterations of 250k steps)
M12_5 = 12_500_000  # agent steps = 50M frames: Figures 10, 12 (long runs), 13, 16 and 18
EXPERTS = (1, 2, 4, 8)
AGENTS = {"dqn": "dqn_softmoe", "rainbow": "rainbow_softmoe"}
BASELINE = ("--moe-type", "baseline", "--num-experts", "1")  # the plain network (a single 512-unit layer)


def moe(kind: str, n: int, *more: str) -> tuple[str, ...]:
    return ("--moe-type", kind, "--num-experts", str(n), *more)


def vs(pairs) -> tuple[tuple[str, str], ...]:
    return tuple(pairs)


def experts(n: int) -> str:
    return f"{n} expert" + ("s" if n > 1 else "")


def fig1() -> Experiment:
    variants, panels = [], []
    for agent, script in AGENTS.items():
        for kind in ("baseline", "softmoe", "top1"):
            variants += [Variant(f"{agent}-{kind}-{n}", script, moe(kind, n), M50, PAPER20, x=n) for n in EXPERTS]
        panels.append(Panel(SCRIPTS[script].agent, (
            ("Baseline", tuple(f"{agent}-baseline-{n}" for n in EXPERTS)),
            ("SoftMoE", tuple(f"{agent}-softmoe-{n}" for n in EXPERTS)),
            ("Top1-MoE", tuple(f"{agent}-top1-{n}" for n in EXPERTS))),
            comparisons=vs((f"{agent}-{kind}-{n}", f"{agent}-baseline-{n}") for kind in ("softmoe", "top1")
                           for n in EXPERTS),
            point_labels=tuple((f"{agent}-{kind}-{n}", experts(n)) for kind in ("baseline", "softmoe", "top1")
                               for n in EXPERTS)))
    return Experiment("fig1", "Figure 1: parameter scaling",
                      "DQN and Rainbow; the penultimate layer is a Soft MoE or Top1-MoE with 1, 2, 4, 8 experts, or "
                      "the dense baseline widened to 512 x n units; 20 games, 5 seeds, 200M frames.",
                      tuple(variants), tuple(panels), plots=("scaling", "curves", "per_game", "profiles"),
                      x_label="number of experts")


def fig4() -> Experiment:
    ratios = ("0.25", "0.5", "1", "2")
    variants, panels = [], []
    for agent, script in AGENTS.items():
        for rr in ratios:
            variants.append(Variant(f"{agent}-baseline-rr{rr}", script, (*BASELINE, "--replay-ratio", rr), M50, PAPER20,
                                    x=float(rr)))
            variants.append(Variant(f"{agent}-softmoe-8-rr{rr}", script, (*moe("softmoe", 8), "--replay-ratio", rr), M50,
                                    PAPER20, x=float(rr)))
        panels.append(Panel(SCRIPTS[script].agent, (
            ("Baseline", tuple(f"{agent}-baseline-rr{rr}" for rr in ratios)),
            ("SoftMoE", tuple(f"{agent}-softmoe-8-rr{rr}" for rr in ratios))),
            comparisons=vs((f"{agent}-softmoe-8-rr{rr}", f"{agent}-baseline-rr{rr}") for rr in ratios),
            point_labels=tuple((f"{agent}-{kind}-rr{rr}", f"replay ratio {rr}") for kind in ("baseline", "softmoe-8")
                               for rr in ratios)))
    return Experiment("fig4", "Figure 4: replay ratio",
                      "DQN and Rainbow, baseline vs Soft MoE with 8 experts at replay ratios 0.25, 0.5, 1, 2 "
                      "(gradient updates per agent step); 20 games, 5 seeds, 200M frames.",
                      tuple(variants), tuple(panels), plots=("scaling", "curves", "per_game", "profiles"),
                      x_label="replay ratio")


def fig5() -> Experiment:
    s = "rainbow_softmoe"
    variants = [Variant(f"rainbow-baseline-{n}", s, moe("baseline", n), M50, PAPER20, x=n) for n in EXPERTS]
    variants += [Variant(f"rainbow-softmoe-{n}", s, moe("softmoe", n), M50, PAPER20, x=n) for n in EXPERTS]
    variants += [Variant(f"rainbow-softmoe-div-{n}", s, moe("softmoe", n, "--expert-hidden-divide"), M50, PAPER20, x=n)
                 for n in EXPERTS[1:]]  # with one expert, 512/1 is the unchanged expert
    panel = Panel("Rainbow", (
        ("Baseline", tuple(f"rainbow-baseline-{n}" for n in EXPERTS)),
        ("SoftMoE (unchanged)", tuple(f"rainbow-softmoe-{n}" for n in EXPERTS)),
        ("SoftMoE (÷ NumExperts)", ("rainbow-softmoe-1", *(f"rainbow-softmoe-div-{n}" for n in EXPERTS[1:])))),
        comparisons=vs((f"rainbow-softmoe-div-{n}", f"rainbow-softmoe-{n}") for n in EXPERTS[1:]),
        point_labels=tuple((v.name, experts(int(v.x))) for v in variants))
    return Experiment("fig5", "Figure 5: expert width",
                      "Rainbow; Soft MoE experts of 512 hidden units vs 512/n (--expert-hidden-divide), against the "
                      "widened baseline; 20 games, 5 seeds, 200M frames.",
                      tuple(variants), (panel,), plots=("scaling", "curves", "per_game", "profiles"),
                      x_label="number of experts")


def fig6() -> Experiment:
    s, toks = "rainbow_softmoe", ("perconv", "perfeat", "persamp")
    variants = [Variant(f"rainbow-{kind}-8-{t}", s, moe(kind, 8, "--tokenization", t), M50, PAPER20)
                for kind in ("softmoe", "top1") for t in toks]
    labels = {"softmoe": "SoftMoE", "top1": "Top1-MoE", "perconv": "PerConv", "perfeat": "PerFeat", "persamp": "PerSamp"}
    panel = Panel("Rainbow, 8 experts", tuple((f"{labels[v.name.split('-')[1]]} {labels[v.name.split('-')[3]]}",
                                               (v.name,)) for v in variants),
                  comparisons=vs((v.name, "rainbow-softmoe-8-perconv") for v in variants[1:]))
    return Experiment("fig6", "Figure 6: tokenization",
                      "Rainbow with 8 experts; PerConv, PerFeat and PerSamp tokens for Soft MoE and Top1-MoE; "
                      "20 games, 5 seeds, 200M frames.", tuple(variants), (panel,))


def three_way(agent: str, script: str, extra: tuple[str, ...], budget: int, games, suffix: str = "") -> list[Variant]:
    """Baseline, Top1-MoE x 8 and Soft MoE x 8 of one agent."""
    return [Variant(f"{agent}-baseline{suffix}", script, (*BASELINE, *extra), budget, games),
            Variant(f"{agent}-top1-8{suffix}", script, (*moe("top1", 8), *extra), budget, games),
            Variant(f"{agent}-softmoe-8{suffix}", script, (*moe("softmoe", 8), *extra), budget, games)]


def three_way_panel(title: str, variants: list[Variant]) -> Panel:
    base = variants[0].name
    return Panel(title, (("Baseline", (base,)), ("Top1-MoE", (variants[1].name,)), ("SoftMoE", (variants[2].name,))),
                 comparisons=((variants[2].name, base), (variants[1].name, base)))


def fig7() -> Experiment:
    variants, panels = [], []
    for agent, script in AGENTS.items():
        vs_ = three_way(agent, script, ("--encoder", "nature"), M50, PAPER20, "-nature")
        variants += vs_
        panels.append(three_way_panel(f"{SCRIPTS[script].agent}, Nature CNN", vs_))
    return Experiment("fig7", "Figure 7: Nature CNN encoder",
                      "DQN and Rainbow with the Nature CNN encoder; baseline vs Top1-MoE vs Soft MoE with 8 experts; "
                      "20 games, 5 seeds, 200M frames.", tuple(variants), tuple(panels))


def fig8() -> Experiment:
    s = "rainbow_softmoe"
    variants = (Variant("rainbow-baseline", s, BASELINE, M50, PAPER60),
                Variant("rainbow-softmoe-8", s, moe("softmoe", 8), M50, PAPER60),
                Variant("rainbow-softmoe-8-randphi", s, moe("softmoe", 8, "--random-phi"), M50, PAPER20))
    panels = (Panel("60 games", (("Baseline", ("rainbow-baseline",)), ("SoftMoE", ("rainbow-softmoe-8",))),
                    games=PAPER60, comparisons=(("rainbow-softmoe-8", "rainbow-baseline"),)),
              Panel("Random Φ (20 games)", (("Baseline", ("rainbow-baseline",)), ("SoftMoE", ("rainbow-softmoe-8",)),
                                           ("SoftMoE (RandPhi)", ("rainbow-softmoe-8-randphi",))),
                    games=PAPER20, comparisons=(("rainbow-softmoe-8", "rainbow-softmoe-8-randphi"),
                                                ("rainbow-softmoe-8-randphi", "rainbow-baseline"))))
    return Experiment("fig8", "Figure 8: 60 games; random Φ",
                      "Rainbow with 8 experts. Left: baseline vs Soft MoE on the 60 games. Right: Soft MoE with a "
                      "random, redrawn Φ (--random-phi) on the 20 games (the baseline and Soft MoE runs of the "
                      "left panel are reused on those 20 games); 5 seeds, 200M frames.", variants, panels)


def fig9() -> Experiment:
    variants, panels = [], []
    for agent, script in AGENTS.items():
        vs_ = [Variant(f"{agent}-baseline", script, BASELINE, M50, PAPER20),
               Variant(f"{agent}-top1-8", script, moe("top1", 8), M50, PAPER20),
               Variant(f"{agent}-top1-8-lb", script, moe("top1", 8, "--load-balancing-coef", "1.0"), M50, PAPER20)]
        variants += vs_
        panels.append(Panel(SCRIPTS[script].agent, (("Baseline", (vs_[0].name,)), ("Top1-MoE_8", (vs_[1].name,)),
                                                    ("Top1-MoE_8 (LoadBalancing)", (vs_[2].name,))),
                            comparisons=((vs_[2].name, vs_[1].name), (vs_[1].name, vs_[0].name))))
    return Experiment("fig9", "Figure 9: load balancing",
                      "DQN and Rainbow; Top1-MoE with 8 experts with and without the importance and load losses of "
                      "Ruiz et al. 2021 (--load-balancing-coef 1.0), against the baseline; 20 games, 5 seeds, "
                      "200M frames.", tuple(variants), tuple(panels))


def fig10() -> Experiment:
    # --metrics-every is a run flag: a --steps quick look logs the metrics ~10 times, not never (shrink_flags)
    variants = [dataclasses.replace(v, run_flags=("--metrics-every", "250000"))
                for v in three_way("rainbow", "rainbow_softmoe", (), M12_5, FIG10_GAMES)]
    return Experiment("fig10", "Figure 10: analysis metrics",
                      "Rainbow (Impala); baseline, Top1-MoE and Soft MoE with 8 experts; return, empirical-NTK srank, "
                      "feature norm and dormant neurons (batch of 32, every 250k steps) on Asterix, Pong and "
                      "SpaceInvaders; 5 seeds, 50M frames.", tuple(variants),
                      (three_way_panel("Rainbow", variants),), plots=("metrics", "curves", "per_game"))


def fig11() -> Experiment:
    variants, panels = [], []
    cases = [("cql", "CQL", "5"), ("cql-c51", "CQL+C51", "5"), ("cql-c51", "CQL+C51", "10"), ("cql-c51", "CQL+C51", "50")]
    for agent, label, pct in cases:
        extra = ("--agent", agent, "--data-fraction", str(int(pct) / 100), "--gradient-steps-per-iteration", "62500")
        if pct == "50":  # ~25M transitions (177 GB) fit no GPU: reload 5 random checkpoints an iteration, as batch_rl
            extra += ("--checkpoints-per-iteration", "5")
        vs_ = three_way(agent, "cql_softmoe", extra, 200, OFFLINE17, f"-{pct}pct")
        variants += vs_
        figure = "11" if pct == "5" else "17"
        panels.append(three_way_panel(f"{label}, {pct}% data (Fig. {figure})", vs_))
    return Experiment("fig11", "Figures 11 and 17: offline RL",
                      "CQL and CQL+C51 on the DQN Replay Dataset, 200 iterations of 62,500 gradient steps; baseline, "
                      "Top1-MoE and Soft MoE with 8 experts; 5% of the data (Figure 11), 10% and 50% for CQL+C51 "
                      "(Figure 17); 17 games (our labelled choice, see registry.OFFLINE17), 5 seeds. --data-fraction "
                      "is a share of each of the 51 checkpoints (50M transitions in all) of one dataset run: 5% and "
                      "10% (about 2.5M and 5M transitions, 17.7 and 35 GB at 7,071 B each) are loaded once; 50% "
                      "(about 25M, 177 GB) reloads 5 random checkpoints' share every iteration, as the reference's "
                      "loader, so Figure 17's 10% and 50% also differ in how the data is sampled.",
                      tuple(variants), tuple(panels))


def fig12() -> Experiment:
    variants, panels = [], []
    for agent, script in (("drq", "drq_softmoe"), ("der", "der_softmoe")):
        label = SCRIPTS[script].agent
        for budget, suffix, run_flags in ((100_000, "-100k", ()), (M12_5, "-50Mframes", ("--eval-every", "250000"))):
            base = Variant(f"{agent}-baseline{suffix}", script, BASELINE, budget, ATARI100K, run_flags=run_flags)
            moes = [Variant(f"{agent}-{kind}-{n}{suffix}", script, moe(kind, n), budget, ATARI100K, run_flags=run_flags)
                    for n in (4, 8) for kind in ("top1", "softmoe")]
            variants += [base, *moes]
            if suffix == "-100k":
                panels.append(Panel(f"{label}, 100k steps", (("Baseline", (base.name,)),) + tuple(
                    (f"{'SoftMoE' if 'softmoe' in v.name else 'Top1-MoE'} x{v.name.split('-')[2]}", (v.name,))
                    for v in moes), comparisons=tuple((v.name, base.name) for v in moes)))
            else:
                for n, figure in ((8, 12), (4, 16)):
                    top1, soft = (f"{agent}-top1-{n}{suffix}", f"{agent}-softmoe-{n}{suffix}")
                    panels.append(Panel(f"{label}, {n} experts, 50M frames (Fig. {figure})",
                                        (("Top1-MoE", (top1,)), ("SoftMoE", (soft,)), ("Baseline", (base.name,))),
                                        comparisons=((soft, base.name), (top1, base.name))))
    return Experiment("fig12", "Figures 12 and 16: low-data regime",
                      "DrQ(ε) and DER (Atari-100k protocol); baseline, Top1-MoE and Soft MoE with 4 and 8 experts; "
                      "100k agent steps and 50M frames (12.5M steps, evaluated every 250k steps); 26 games, 5 seeds.",
                      tuple(variants), tuple(panels))


def fig13() -> Experiment:
    variants, panels = [], []
    for agent, script in AGENTS.items():
        vs_ = []
        for kind in ("regular", "big", "all"):
            for norm in (False, True):
                flags = (*moe("softmoe", 8), "--expert-variant", kind) + (("--moe-l2-norm",) if norm else ())
                vs_.append(Variant(f"{agent}-{kind}" + ("-l2" if norm else ""), script, flags, M12_5, PAPER20))
        variants += vs_
        names = {"regular": "Regular", "big": "BIG", "all": "All"}
        panels.append(Panel(SCRIPTS[script].agent, tuple(
            (f"{names[v.name.split('-')[1]]}, normalization {'on' if v.name.endswith('-l2') else 'off'}", (v.name,))
            for v in vs_), comparisons=tuple((v.name, f"{agent}-regular") for v in vs_[1:])))
    return Experiment("fig13", "Figure 13: expert variants",
                      "DQN and Rainbow with a Soft MoE of 8 experts: regular (penultimate layer), big (a whole "
                      "network per expert) and all (a Soft MoE at every layer), each with and without l2 "
                      "normalisation; 20 games, 5 seeds, 50M frames.", tuple(variants), tuple(panels))


def fig18() -> Experiment:
    variants, panels = [], []
    for size in (4, 6):
        extra = ("--impala-filter-size", str(size))
        vs_ = [Variant(f"dqn-baseline-filter{size}", "dqn_softmoe", (*BASELINE, *extra), M12_5, PAPER20),
               Variant(f"dqn-softmoe-8-filter{size}", "dqn_softmoe", (*moe("softmoe", 8), *extra), M12_5, PAPER20)]
        variants += vs_
        panels.append(Panel(f"Filter size ({size}x{size})", (("SoftMoE", (vs_[1].name,)), ("Baseline", (vs_[0].name,))),
                            comparisons=((vs_[1].name, vs_[0].name),)))
    return Experiment("fig18", "Figure 18: Impala filter size",
                      "DQN with Impala convolutions of 4x4 and 6x6 (default 3x3); baseline vs Soft MoE with 8 "
                      "experts; 20 games, 5 seeds, 50M frames.", tuple(variants), tuple(panels))


def fig19() -> Experiment:
    variants, panels = [], []
    for encoder, title in (("impala", "Impala CNN"), ("nature", "CNN")):
        extra = () if encoder == "impala" else ("--encoder", "nature")
        vs_ = three_way("rainbow", "rainbow_softmoe", extra, M50, PAPER20, f"-{encoder}")
        variants += vs_
        panels.append(three_way_panel(f"Rainbow, {title}", vs_))
    return Experiment("fig19", "Figure 19: wall time",
                      "Rainbow with the Impala and the Nature CNN encoders; baseline, Soft MoE and Top1-MoE with 8 "
                      "experts; IQM against training hours; 20 games, 3 seeds, 200M frames.",
                      tuple(variants), tuple(panels), seeds=3, plots=("walltime", "curves", "per_game"))


EXPERIMENTS: dict[str, Experiment] = {e.name: e for e in (fig1(), fig4(), fig5(), fig6(), fig7(), fig8(), fig9(), fig10(),
                                                         fig11(), fig12(), fig13(), fig18(), fig19())}


def get_experiment(name: str) -> Experiment:
    if name not in EXPERIMENTS:
        close = difflib.get_close_matches(name, list(EXPERIMENTS), n=3, cutoff=0.5)
        raise BenchmarkError(f"unknown experiment {name!r}; " + (f"did you mean {', '.join(close)}? " if close else "")
                             + f"experiments: {', '.join(EXPERIMENTS)}")
    return EXPERIMENTS[name]


# =====================================================================================================
# Plans: experiments expanded to commands
# =====================================================================================================
@dataclass(frozen=True)
class Run:
    """One planned run: a script and its flags."""

    experiment: str
    variant: str
    script: str
    game: str
    seed: int
    exp_name: str
    flags: tuple[str, ...]  # everything after `python {script}.py`

    def command(self, python: str = "python") -> list[str]:
        """The command line; the script path is relative to the current directory when it is below it."""
        path = os.path.relpath(SCRIPTS[self.script].path)
        return [python, path if not path.startswith("..") else SCRIPTS[self.script].path, *self.flags]

    @property
    def key(self) -> str:
        """Prefix of the run's directory name: `{Game}__{exp_name}__{seed}`."""
        return f"{self.game}__{self.exp_name}__{self.seed}"


def split_flags(tokens) -> list[tuple[str, list[str]]]:
    """`['--a', '1', '--no-b', '--c', '-10']` -> [('a', ['--a', '1']), ('b', ['--no-b']), ('c', ['--c', '-10'])]."""
    groups: list[tuple[str, list[str]]] = []
    for token in tokens:
        if token.startswith("--") and len(token) > 2:
            name = token[2:].split("=", 1)[0]
            groups.append((name[3:] if name.startswith("no-") else name, [token]))
        elif groups:
            groups[-1][1].append(token)
        else:
            raise BenchmarkError(f"expected a --flag before {token!r}")
    return groups


def merge_flags(*groups) -> tuple[str, ...]:
    """Concatenate flag lists, a later flag replacing an earlier one of the same name (`--x`/`--no-x` alike)."""
    merged: dict[str, list[str]] = {}
    for tokens in groups:
        for name, part in split_flags(tokens):
            merged[name] = part  # dict keeps the first position, the last value
    return tuple(token for part in merged.values() for token in part)


def flag_value(flags, name: str) -> str | None:
    for key, part in split_flags(flags):
        if key == name.lstrip("-"):
            return part[1] if len(part) > 1 else ("false" if part[0].startswith("--no-") else "true")
    return None


OFFLINE_ITERATION = 62_500  # cql_softmoe.py's default --gradient-steps-per-iteration (Table 3)


def shrink_flags(variant: Variant, steps: int) -> tuple[str, ...]:
    """Budget flags for a quick look of `steps`: agent steps, or gradient steps for offline scripts (the unit of
    their logged step, the x axis of their curves).

    Also shortens what only shapes the logs so that short runs still have curves: online scripts get ~10
    iterations (`--iteration-steps`), offline ones ~10 iterations (`--gradient-steps-per-iteration`, the variant's
    own once there are 10 of them), and a variant's run flags (a period: DER/DrQ's `--eval-every`, fig10's
    `--metrics-every`) ~10 points (the 100k Atari-100k variants evaluate only at their end, with 100 games, as in
    the paper); the replay capacity is capped at the budget (a bigger buffer is never filled). Learning
    hyper-parameters are left alone: pass them after `--`.
    """
    script = SCRIPTS[variant.script]
    if script.kind == "offline":  # N gradient steps: ~10 iterations, rounded down to a whole number of them
        own = int(flag_value(variant.flags, "gradient-steps-per-iteration") or OFFLINE_ITERATION)
        per_iteration = own if steps >= 10 * own else max(steps // 10, 1)
        flags = [script.budget_flag, str(max(steps // per_iteration, 1)), "--gradient-steps-per-iteration",
                 str(per_iteration)]
    else:
        flags = [script.budget_flag, str(steps)]
    if script.kind == "online" and steps < 10 * 250_000:
        flags += ["--iteration-steps", str(max(steps // 10, 1))]
    for name, part in split_flags(variant.run_flags):  # the variant's own period when the run is not shorter
        flags += [part[0], str(max(steps // 10, 1)) if steps < full_steps(variant) else part[1]]
    if script.kind in ("online", "atari100k"):
        flags += ["--buffer-size", str(min(steps, 1_000_000))]
    return tuple(flags)


def full_steps(variant: Variant) -> int:
    """A variant's budget in the unit of run.py --steps (offline: iterations x gradient steps per iteration)."""
    if SCRIPTS[variant.script].kind == "offline":
        return variant.budget * int(flag_value(variant.flags, "gradient-steps-per-iteration") or OFFLINE_ITERATION)
    return variant.budget


def steps_of(args: dict, script: str) -> int | None:
    """A run's length in the unit of run.py --steps, from its arguments ({field: value}, as summary.json logs them):
    --total-timesteps, or offline --num-iterations x --gradient-steps-per-iteration. None when they are missing."""
    try:
        if SCRIPTS[script].kind == "offline":
            return int(args["num_iterations"]) * int(args.get("gradient_steps_per_iteration", OFFLINE_ITERATION))
        return int(args[SCRIPTS[script].budget_flag[2:].replace("-", "_")])
    except (KeyError, TypeError, ValueError):
        return None


def flag_args(flags) -> dict:
    """{field: value} of the flags given (`--no-x` -> x: False, `--x` -> True, values as strings)."""
    return {name.replace("-", "_"): (not part[0].startswith("--no-")) if len(part) == 1 else " ".join(part[1:])
            for name, part in split_flags(flags)}


def tag_clash(experiment: Experiment, tag: str) -> str | None:
    """Why `tag` would give a variant's runs the exp name of another variant's (`fig9-dqn-top1-8` + `-lb` is
    `fig9-dqn-top1-8-lb`), with or without a tag of its own; None when it is safe."""
    for v in experiment.variants:
        for w in experiment.variants:
            rest = w.name[len(v.name) + 1:] if w.name.startswith(v.name + "-") else ""
            if rest and (tag == rest or tag.startswith(rest + "-")):
                other = "" if tag == rest else f" with --tag {tag[len(rest) + 1:]}"
                return (f"--tag {tag!r}: {experiment.exp_name(v.name, tag)}, the exp name of {v.name}'s runs with it, "
                        f"is that of variant {w.name}'s runs{other}; pick another tag")
    return None


def plan(experiment: Experiment, games=None, num_games: int | None = None, seeds: int | None = None,
         variants=None, steps: int | None = None, tag: str = "", runs_dir: str = "runs",
         dataset_dir: str = "data/dqn-replay", extra=(), resume: bool | None = None) -> list[Run]:
    """Expand an experiment to its runs, optionally shrunk.

    games: replace every variant's games (names resolved as in atari_scores.csv); num_games: keep the first N
    that have a human score (then the others);
    seeds: the first N seeds (1..N); variants: fnmatch patterns on variant names; steps: the budget of every run
    (agent steps; gradient steps offline, see shrink_flags); tag: appended to exp names (refused when it makes another
    variant's name); extra: flags appended to every command (they win over the registry's);
    resume: pass `--resume auto` (None: when the script supports it).
    """
    if tag and not re.fullmatch(r"[A-Za-z0-9.]+(-[A-Za-z0-9.]+)*", tag):
        raise BenchmarkError(f"--tag {tag!r}: use letters, digits, '.' and single '-'")
    if tag and tag_clash(experiment, tag):  # a report of either variant would read the other's runs
        raise BenchmarkError(tag_clash(experiment, tag))
    if seeds is not None and seeds < 1 or num_games is not None and num_games < 1 or steps is not None and steps < 1:
        raise BenchmarkError("--seeds, --num-games and --steps must be positive")
    chosen = list(experiment.variants)
    if variants:
        chosen = [v for v in chosen if any(fnmatch.fnmatchcase(v.name, p) for p in variants)]
        if not chosen:
            raise BenchmarkError(f"no variant of {experiment.name} matches {' '.join(variants)}; variants: "
                                 + ", ".join(v.name for v in experiment.variants))
    replaced = tuple(dict.fromkeys(resolve_game(g) for g in games)) if games else None
    split_flags(extra)  # validate early
    runs = []
    for v in chosen:
        script = SCRIPTS[v.script]
        v_games = replaced or v.games
        if num_games:  # games with a human score first: a quick look should have something to aggregate
            v_games = tuple(sorted(v_games, key=lambda g: score_table()[g]["human"] is None))[:num_games]
        exp_name = experiment.exp_name(v.name, tag)
        budget = shrink_flags(v, steps) if steps else (script.budget_flag, str(v.budget), *v.run_flags)
        data = ("--dataset-dir", dataset_dir) if script.kind == "offline" else ()
        with_resume = supports_resume(v.script) if resume is None else resume
        for game in v_games:
            for seed in range(1, (seeds or experiment.seeds) + 1):
                flags = merge_flags(("--env-id", game, "--seed", str(seed), "--exp-name", exp_name, "--runs-dir", runs_dir),
                                    v.flags, data, budget, extra, RESUME_FLAG if with_resume else ())
                runs.append(Run(experiment.name, v.name, v.script, game, seed, exp_name, flags))
    return runs
