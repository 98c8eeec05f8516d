"""benchmark/registry.py: every experiment of SPEC §9 exists, is the paper's plan, and expands to commands that
the scripts' own parsers accept (commands of scripts not written yet are skipped, naming the script)."""

import dataclasses
import os
import subprocess
import sys

import pytest
import tyro

from conftest import ROOT, load_script

sys.path.insert(0, ROOT)
from benchmark.launch import same_value  # noqa: E402
from benchmark.registry import (EXPERIMENTS, M12_5, SCRIPTS, flag_args, flag_value, plan, split_flags,  # noqa: E402
                                steps_of)

SPEC_IDS = ["fig1", "fig4", "fig5", "fig6", "fig7", "fig8", "fig9", "fig10", "fig11", "fig12", "fig13", "fig18", "fig19"]

# Appendix A of the paper, typed from its text (independent of the CSV the registry reads)
GAMES20 = set("AirRaid Asterix Asteroids Bowling Breakout DemonAttack Freeway Gravitar Jamesbond MontezumaRevenge "
              "MsPacman Pong PrivateEye Qbert Seaquest SpaceInvaders Venture WizardOfWor YarsRevenge Zaxxon".split())
GAMES26 = set("Alien Amidar Assault Asterix BankHeist BattleZone Boxing Breakout ChopperCommand CrazyClimber "
              "DemonAttack Freeway Frostbite Gopher Hero Jamesbond Kangaroo Krull KungFuMaster MsPacman Pong PrivateEye "
              "Qbert RoadRunner Seaquest UpNDown".split())
GAMES60 = GAMES26 | set("AirRaid Asteroids Atlantis BeamRider Berzerk Bowling Carnival Centipede DoubleDunk "
                        "ElevatorAction Enduro FishingDerby Gravitar IceHockey JourneyEscape MontezumaRevenge "
                        "NameThisGame Phoenix Pitfall Pooyan Riverraid Robotank Skiing Solaris SpaceInvaders StarGunner "
                        "Tennis TimePilot Tutankham Venture VideoPinball WizardOfWor YarsRevenge Zaxxon".split())
IDENTITY = {"env-id", "seed", "exp-name", "runs-dir", "resume", "dataset-dir"}


def config(run) -> tuple:
    """A run's configuration: (script, flags other than its identity, sorted)."""
    flags = tuple(sorted((name, " ".join(part[1:]) or part[0]) for name, part in split_flags(run.flags)
                         if name not in IDENTITY))
    return run.script, flags


def cfg(script, budget, *flags, budget_flag="--total-timesteps"):
    pairs = [(budget_flag.lstrip("-"), str(budget))] + [(flags[i].lstrip("-"), flags[i + 1]) for i in range(0, len(flags), 2)]
    return script, tuple(sorted(pairs))


def moe(kind, n):
    return ("--moe-type", kind, "--num-experts", str(n))


def expected_configs():
    """The paper's plan per figure, written out again from the paper (not from the registry)."""
    dqn, rainbow = "dqn_softmoe", "rainbow_softmoe"
    m50, m12 = 50_000_000, 12_500_000
    e = {}
    e["fig1"] = {cfg(s, m50, *moe(k, n)) for s in (dqn, rainbow) for k in ("baseline", "softmoe", "top1") for n in (1, 2, 4, 8)}
    e["fig4"] = {cfg(s, m50, *moe(k, n), "--replay-ratio", rr) for s in (dqn, rainbow)
                 for k, n in (("baseline", 1), ("softmoe", 8)) for rr in ("0.25", "0.5", "1", "2")}
    e["fig5"] = ({cfg(rainbow, m50, *moe(k, n)) for k in ("baseline", "softmoe") for n in (1, 2, 4, 8)}
                 | {cfg(rainbow, m50, *moe("softmoe", n), "--expert-hidden-divide", "--expert-hidden-divide")
                    for n in (2, 4, 8)})
    e["fig6"] = {cfg(rainbow, m50, *moe(k, 8), "--tokenization", t) for k in ("softmoe", "top1")
                 for t in ("perconv", "perfeat", "persamp")}
    e["fig7"] = {cfg(s, m50, *moe(k, n), "--encoder", "nature") for s in (dqn, rainbow)
                 for k, n in (("baseline", 1), ("softmoe", 8), ("top1", 8))}
    e["fig8"] = {cfg(rainbow, m50, *moe("baseline", 1)), cfg(rainbow, m50, *moe("softmoe", 8)),
                 cfg(rainbow, m50, *moe("softmoe", 8), "--random-phi", "--random-phi")}
    e["fig9"] = {cfg(s, m50, *f) for s in (dqn, rainbow)
                 for f in (moe("baseline", 1), moe("top1", 8), (*moe("top1", 8), "--load-balancing-coef", "1.0"))}
    e["fig10"] = {cfg(rainbow, m12, *moe(k, n), "--metrics-every", "250000")
                  for k, n in (("baseline", 1), ("softmoe", 8), ("top1", 8))}
    e["fig11"] = {cfg("cql_softmoe", 200, *moe(k, n), "--agent", agent, "--data-fraction", frac,
                      "--gradient-steps-per-iteration", "62500", *reload, budget_flag="--num-iterations")
                  for k, n in (("baseline", 1), ("softmoe", 8), ("top1", 8))
                  for agent, frac, reload in (("cql", "0.05", ()), ("cql-c51", "0.05", ()), ("cql-c51", "0.1", ()),
                                              ("cql-c51", "0.5", ("--checkpoints-per-iteration", "5")))}
    e["fig12"] = {cfg(s, budget, *moe(k, n), *extra) for s in ("drq_softmoe", "der_softmoe")
                  for budget, extra in ((100_000, ()), (m12, ("--eval-every", "250000")))
                  for k, n in (("baseline", 1), ("softmoe", 4), ("softmoe", 8), ("top1", 4), ("top1", 8))}
    e["fig13"] = {cfg(s, m12, *moe("softmoe", 8), "--expert-variant", v, *norm) for s in (dqn, rainbow)
                  for v in ("regular", "big", "all") for norm in ((), ("--moe-l2-norm", "--moe-l2-norm"))}
    e["fig18"] = {cfg(dqn, m12, *moe(k, n), "--impala-filter-size", f) for k, n in (("baseline", 1), ("softmoe", 8))
                  for f in ("4", "6")}
    e["fig19"] = {cfg(rainbow, m50, *moe(k, n), *enc) for k, n in (("baseline", 1), ("softmoe", 8), ("top1", 8))
                  for enc in ((), ("--encoder", "nature"))}
    return e


def test_every_spec_experiment_is_registered():
    assert list(EXPERIMENTS) == SPEC_IDS


@pytest.mark.parametrize("name", SPEC_IDS)
def test_plan_is_the_papers(name):
    runs = plan(EXPERIMENTS[name], resume=False)
    assert {config(r) for r in runs} == expected_configs()[name]
    seeds = 3 if name == "fig19" else 5
    by_variant = {}
    for r in runs:
        by_variant.setdefault((r.variant, r.exp_name), set()).add((r.game, r.seed))
    assert len({exp for _, exp in by_variant}) == len(by_variant) == len(EXPERIMENTS[name].variants)  # unique exp names
    for (variant, exp_name), cells in by_variant.items():
        assert exp_name == f"{name}-{variant}" and "__" not in exp_name
        games = {g for g, _ in cells}
        assert cells == {(g, s) for g in games for s in range(1, seeds + 1)}
        expected_games = {"fig8": GAMES20 if variant.endswith("randphi") else GAMES60, "fig12": GAMES26,
                          "fig10": {"Asterix", "Pong", "SpaceInvaders"}}.get(name, GAMES20)
        if name == "fig11":  # 17 games (our labelled choice; the paper does not list them)
            assert len(games) == 17 and games <= GAMES60
        else:
            assert games == expected_games, variant


def test_every_panel_draws_existing_variants():
    for e in EXPERIMENTS.values():
        names = {v.name for v in e.variants}
        for panel in e.panels:
            assert set(panel.variants) <= names and all(x in names and y in names for x, y in panel.comparisons)
        assert names == {v for p in e.panels for v in p.variants}, e.name  # every run is drawn somewhere
        if "scaling" in e.plots:
            assert all(v.x is not None for v in e.variants)


PAIRS = [(e.name, s) for e in EXPERIMENTS.values() for s in e.scripts]


@pytest.mark.parametrize("experiment,script", PAIRS, ids=[f"{e}-{s}" for e, s in PAIRS])
def test_commands_parse_with_the_scripts_own_parser(experiment, script):
    assert SCRIPTS[script].exists(), f"the registry plans runs of {script}.py, which is missing"
    module = load_script(script)
    runs = [r for r in plan(EXPERIMENTS[experiment]) if r.script == script]
    for game in sorted({r.game for r in runs}):  # every game name is one the script accepts
        module.resolve_rom(game)
    for run in {r.variant: r for r in runs}.values():  # one command per variant (games and seeds only vary ids)
        try:
            args = tyro.cli(module.Args, args=list(run.flags))
        except SystemExit:
            pytest.fail(f"{script}.py rejects: {' '.join(run.flags)}")
        module.check_args(args)  # the script's own refusal of impossible flag combinations
        for name, part in split_flags(run.flags):
            planned = (not part[0].startswith("--no-")) if len(part) == 1 else " ".join(part[1:])
            assert same_value(planned, getattr(args, name.replace("-", "_"))), (run.variant, name)


def test_flags_of_every_script_are_in_its_contract():
    """Commands use only the flags listed in SCRIPTS (the expected flags of future scripts); for scripts that
    exist, every listed flag is one their parser has."""
    for e in EXPERIMENTS.values():
        for run in plan(e):
            used = {"--" + name for name, _ in split_flags(run.flags)} - {"--resume"}
            assert used <= set(SCRIPTS[run.script].flags), (e.name, run.script, used - set(SCRIPTS[run.script].flags))
    for script in SCRIPTS.values():
        if script.exists():
            fields = {f.name for f in dataclasses.fields(load_script(script.name).Args)}
            assert {f[2:].replace("-", "_") for f in script.flags} <= fields, script.name


def test_shrinking_a_plan():
    runs = plan(EXPERIMENTS["fig12"], games=["pong", "ALE/Breakout-v5"], seeds=2, variants=["drq-*"], steps=5000,
                tag="quick", extra=["--num-experts", "3", "--no-cuda"], resume=False)
    assert len(runs) == 10 * 2 * 2
    for r in runs:
        assert r.game in ("Pong", "Breakout") and r.seed in (1, 2) and r.exp_name.endswith("-quick")
        flags = dict((n, p[1:]) for n, p in split_flags(r.flags))
        assert flags["total-timesteps"] == ["5000"] and flags["buffer-size"] == ["5000"]
        assert flags["num-experts"] == ["3"] and r.flags.count("--num-experts") == 1  # extra flags win, once
        assert flags.get("eval-every") == (["500"] if "50Mframes" in r.variant else None)
    # a budget at or above a variant's keeps that variant's evaluation period
    long = plan(EXPERIMENTS["fig12"], games=["Pong"], seeds=1, variants=["drq-softmoe-8-*"], steps=12_500_000)
    assert [flag_value(r.flags, "eval-every") for r in long] == [None, "250000"]
    online = plan(EXPERIMENTS["fig1"], num_games=1, seeds=1, steps=1000, resume=False)
    assert {r.game for r in online} == {"Asterix"}  # AirRaid comes first but has no human score to aggregate
    assert len(online) == 24 and all("--iteration-steps" in r.flags for r in online)
    assert "--resume" in plan(EXPERIMENTS["fig1"], seeds=1, num_games=1, resume=True)[0].flags


def test_a_quick_look_at_figure_10_logs_its_metrics():
    """fig10's --metrics-every is a run flag: a --steps quick look logs the metrics ~10 times (as many as its
    iterations), not never; the full plan keeps 250k (test_plan_is_the_papers)."""
    for steps, period in ((1000, "100"), (5_000_000, "500000"), (M12_5, "250000")):
        (run,) = plan(EXPERIMENTS["fig10"], variants=["rainbow-softmoe-8"], games=["Pong"], seeds=1, steps=steps,
                      resume=False)
        assert flag_value(run.flags, "metrics-every") == period, steps
    (run,) = plan(EXPERIMENTS["fig10"], variants=["rainbow-softmoe-8"], games=["Pong"], seeds=1, steps=1000)
    assert flag_value(run.flags, "iteration-steps") == "100"


def test_a_quick_look_at_figure_11_counts_gradient_steps():
    """--steps N for the offline scripts: N gradient steps (their logged step) in ~10 iterations, the variant's own
    62,500 per iteration once there are 10 of them; the budget read back from the arguments is N."""
    cases = {1000: ("10", "100"), 7: ("7", "1"), 625_000: ("10", "62500"), 1_250_000: ("20", "62500"),
             200 * 62_500: ("200", "62500")}
    for steps, expected in cases.items():
        (run,) = plan(EXPERIMENTS["fig11"], variants=["cql-softmoe-8-5pct"], games=["Pong"], seeds=1, steps=steps,
                      resume=False)
        per_iteration = flag_value(run.flags, "gradient-steps-per-iteration")
        assert (flag_value(run.flags, "num-iterations"), per_iteration) == expected
        assert steps_of(flag_args(run.flags), "cql_softmoe") == steps
    full = plan(EXPERIMENTS["fig11"], games=["Pong"], seeds=1, resume=False)  # the paper's plan is --steps 12.5M
    assert [r.flags for r in full] == [r.flags for r in plan(EXPERIMENTS["fig11"], games=["Pong"], seeds=1,
                                                             steps=12_500_000, resume=False)]
    assert {flag_value(r.flags, "gradient-steps-per-iteration") for r in full} == {"62500"}
    assert {flag_value(r.flags, "num-iterations") for r in full} == {"200"}


def test_figure_11s_description_has_the_data_sizes_the_script_loads():
    """--data-fraction is a share of each of the 51 checkpoints (about 1M transitions) of one dataset run."""
    text = EXPERIMENTS["fig11"].description
    assert "51 checkpoints" in text and "2.5M and 5M transitions" in text and "35 GB" in text and "25M" in text
    assert "fixed replay of 2.5M" not in text  # (a share of each checkpoint, not one fixed replay)


def test_gpu_session_points_to_an_existing_readme_section():
    header = "\n".join(open(os.path.join(ROOT, "benchmark", "gpu_session.sh")).read().splitlines()[:4])
    assert "DEVELOPERS.md" not in header or os.path.exists(os.path.join(ROOT, "DEVELOPERS.md"))
    section = header.split('README\'s section "', 1)[1].split('"', 1)[0]
    assert f"## {section}\n" in open(os.path.join(ROOT, "README.md")).read()


def cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, os.path.join(ROOT, "benchmark", "run.py"), *args],
                          capture_output=True, text=True, cwd=cwd, timeout=120)


def test_dry_run_lists_the_papers_plan():
    result = cli("fig1", "--dry-run", "--runs-dir", "/nonexistent/runs")
    assert result.returncode == 0, result.stderr
    commands = [line for line in result.stdout.splitlines() if not line.startswith("#")]
    assert len(commands) == 2400
    assert commands[0].startswith("python dqn_softmoe.py --env-id AirRaid --seed 1 --exp-name fig1-dqn-baseline-1 ")
    assert sum("rainbow_softmoe.py" in c for c in commands) == 1200
    assert sum("--total-timesteps 50000000" in c for c in commands) == 2400
    assert "2400 runs: 24 variants x 20 games x 5 seeds" in result.stdout


def test_bad_input_is_one_clear_line():
    result = cli("fig2", "--dry-run")  # the real command line: exit code 2, one line, no traceback
    assert result.returncode == 2
    assert result.stderr == ("run.py: error: unknown experiment 'fig2'; did you mean fig12, fig9, fig8? experiments: "
                             + ", ".join(SPEC_IDS) + "\n")


@pytest.mark.parametrize("args,message", [
    (["fig1", "--games", "Pongg", "--dry-run"], "run.py: error: unknown game 'Pongg'; closest: Pong"),
    (["fig1", "--variants", "ppo-*", "--dry-run"], "run.py: error: no variant of fig1 matches ppo-*"),
    (["fig1", "--seeds", "0", "--dry-run"], "run.py: error: --seeds, --num-games and --steps must be positive"),
    (["fig1", "--tag", "a__b", "--dry-run"], "run.py: error: --tag 'a__b': use letters, digits"),
    # a tag that makes another variant's exp name: a report of either would read the other's runs
    (["fig9", "--variants", "dqn-top1-8", "--tag", "lb", "--dry-run"],
     "run.py: error: --tag 'lb': fig9-dqn-top1-8-lb, the exp name of dqn-top1-8's runs with it, is that of variant "
     "dqn-top1-8-lb's runs; pick another tag\n"),
    (["fig13", "--variants", "dqn-regular", "--tag", "l2-x", "--dry-run"],
     "run.py: error: --tag 'l2-x': fig13-dqn-regular-l2-x, the exp name of dqn-regular's runs with it, is that of "
     "variant dqn-regular-l2's runs with --tag x; pick another tag\n"),
    ([], "run.py: error: name an experiment (or use --list)"),
    (["fig1", "--runs-per-job", "4", "--dry-run"], "run.py: error: --runs-per-job packs runs into Slurm jobs"),
    (["fig1", "--launcher", "slurm", "--runs-per-job", "0"], "run.py: error: --runs-per-job must be at least 1"),
])
def test_bad_options_are_one_clear_line(capsys, args, message):
    from benchmark import run

    assert run.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1, err


QUICK = ["fig1", "--variants", "dqn-softmoe-1", "--games", "Pong", "--seeds", "1", "--dry-run"]


@pytest.mark.parametrize("args,message", [
    # flags after -- may add to a plan, never change what it sets
    ([*QUICK, "--", "--num-experts", "4"], "run.py: error: -- --num-experts: variant dqn-softmoe-1 is defined by "
                                           "`--num-experts 1` and its runs would be named and plotted as it"),
    ([*QUICK, "--", "--moe-type", "baseline", "--random-phi"], "run.py: error: -- --moe-type: variant dqn-softmoe-1 is "
                                                               "defined by `--moe-type softmoe`"),
    ([*QUICK, "--", "--seed", "3"], "run.py: error: -- --seed: run.py plans --seed for every run; use --seeds instead"),
    ([*QUICK, "--steps", "600", "--", "--buffer-size", "50"], "run.py: error: -- --buffer-size: the plan sets "
                                                               "`--buffer-size 600` for dqn-softmoe-1"),
    (["fig10", "--variants", "rainbow-baseline", "--games", "Pong", "--seeds", "1", "--steps", "1000", "--dry-run",
      "--", "--metrics-every", "5"], "run.py: error: -- --metrics-every: the plan sets `--metrics-every 100` for "
                               "rainbow-baseline (its budget, or --steps); use --steps"),
    (["fig11", "--variants", "cql-baseline-5pct", "--games", "Pong", "--seeds", "1", "--steps", "1000", "--dry-run",
      "--", "--gradient-steps-per-iteration", "5"],
     "run.py: error: -- --gradient-steps-per-iteration: the plan sets `--gradient-steps-per-iteration 100` for "
     "cql-baseline-5pct (its budget"),
    # ... and are checked against the script's own Args before anything starts
    ([*QUICK, "--", "--bogus-flag", "3"], "run.py: error: -- --bogus-flag: dqn_softmoe.py has no such flag; see "
                                          "python dqn_softmoe.py --help"),
    ([*QUICK, "--", "--learning-startz", "3"], "run.py: error: -- --learning-startz: dqn_softmoe.py has no such flag "
                                               "(did you mean --learning-starts"),
    ([*QUICK, "--", "--learning-starts", "x"], "run.py: error: flags after --: dqn_softmoe.py says: Error parsing "
                                               "--learning-starts: invalid literal for int()"),
    (["fig1", "--variants", "dqn-baseline-1", "--games", "Pong", "--seeds", "1", "--dry-run", "--", "--random-phi"],
     "run.py: error: flags after --: dqn_softmoe.py refuses dqn-baseline-1's runs: --random-phi and --moe-l2-norm are "
     "Soft MoE options"),
    # options that would do nothing with the chosen launcher, or without --report
    ([*QUICK, "--partition", "gpu", "--qos", "high"], "run.py: error: --partition, --qos apply to --launcher slurm"),
    ([*QUICK, "--time-min", "60"], "run.py: error: --time-min applies to --launcher slurm"),
    ([*QUICK, "--submitit-cluster", "local"], "run.py: error: --submitit-cluster applies to --launcher slurm"),
    ([*QUICK, "--launcher", "slurm", "--jobs", "4"], "run.py: error: --jobs applies to --launcher local"),
    ([*QUICK, "--launcher", "slurm", "--gpus", "0"], "run.py: error: --gpus applies to --launcher local"),
    ([*QUICK, "--launcher", "slurm", "--threads-per-run", "2"], "run.py: error: --threads-per-run applies to --launcher"),
    ([*QUICK, "--launcher", "slurm", "--report"], "run.py: error: --report applies to --launcher local"),
    ([*QUICK, "--launcher", "slurm", "--submitit-cluster", "local", "--account", "a"],
     "run.py: error: --account applies to a real Slurm cluster, not --submitit-cluster local"),
    ([*QUICK, "--reps", "100", "--out", "x"], "run.py: error: --out, --reps apply to the report; add --report"),
    ([*QUICK, "--threads-per-run", "0"], "run.py: error: --threads-per-run must be at least 1, got 0"),
    ([*QUICK, "--launcher", "slurm", "--cpus-per-run", "0"], "run.py: error: --cpus-per-run must be at least 1"),
])
def test_flags_that_would_do_nothing_or_change_the_plan_are_refused(capsys, args, message):
    from benchmark import run

    assert run.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1, err


def test_gpu_ids_are_checked_when_launching_here(capsys, monkeypatch, tmp_path):
    from benchmark import launch, run

    monkeypatch.setattr(launch, "launch_local", lambda *a, **k: pytest.fail("launched despite bad --gpus"))
    args = ["fig1", "--variants", "dqn-softmoe-1", "--games", "Pong", "--seeds", "1", "--runs-dir", str(tmp_path)]
    monkeypatch.setattr("torch.cuda.device_count", lambda: 0)
    assert run.main([*args, "--gpus", "0"]) == 2
    assert capsys.readouterr().err == ("run.py: error: --gpus 0: torch sees no GPU on this machine; drop --gpus (runs "
                                       "use the CPU)\n")
    monkeypatch.setattr("torch.cuda.device_count", lambda: 2)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert run.main([*args, "--gpus", "1,9"]) == 2
    assert capsys.readouterr().err == "run.py: error: --gpus: no GPU 9 here; this machine's GPUs: 0, 1\n"
    assert run.main([*args, "--gpus", "9", "--dry-run"]) == 0  # a dry run launches nothing: any plan prints


def test_valid_options_keep_their_defaults_and_dry_run_works_with_everything(capsys):
    from benchmark import run

    args = run.build_parser().parse_args(["fig1"])
    run.check_options(args)
    assert (args.jobs, args.time_min, args.gpus_per_run, args.runs_per_job, args.cpus_per_run, args.array_parallelism,
            args.max_requeues, args.submitit_cluster) == (1, 1440, 1, 1, 4, 256, 20, "slurm")
    assert "default 1440)" in run.build_parser().format_help()
    for extra in (["--launcher", "slurm", "--partition", "gpu", "--runs-per-job", "4", "--time-min", "60"],
                  ["--jobs", "2", "--threads-per-run", "2", "--report", "--reps", "10", "--gpus", ""],
                  ["--steps", "600", "--", "--encoder", "nature", "--learning-starts", "500", "--no-cuda"]):
        assert run.main([*QUICK, *extra]) == 0, capsys.readouterr().err
        assert "dqn_softmoe.py --env-id Pong" in capsys.readouterr().out
