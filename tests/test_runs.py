"""Real short runs of the scripts on ALE games (CPU, tiny budgets), and bad input giving one clear line."""

import glob
import json
import os

import numpy as np
import pytest
import torch

from conftest import read_scalars, run_script

GPU_ONLY = pytest.mark.skipif(torch.cuda.is_available(), reason="accepted on a GPU")

TINY = ["--total-timesteps", "600", "--learning-starts", "300", "--buffer-size", "2000", "--batch-size", "8", "--iteration-steps", "200",
        "--metrics-every", "500", "--log-every", "100", "--print-every", "300"]


def run_dir_of(tmp_path):
    (run_dir,) = glob.glob(os.path.join(tmp_path, "*"))
    return run_dir


@pytest.mark.parametrize("flags", [
    ["--encoder", "nature", "--moe-type", "baseline", "--num-experts", "2", "--exploration-steps", "200", "--end-e", "0.1"],
    ["--encoder", "nature", "--moe-type", "softmoe", "--num-experts", "4"],
    ["--encoder", "nature", "--moe-type", "top1", "--load-balancing-coef", "1.0", "--tokenization", "perfeat"],
    ["--encoder", "nature", "--expert-variant", "big", "--num-experts", "2", "--num-envs", "2", "--replay-ratio", "0.125"],
])
def test_dqn_short_run_logs_every_key(tmp_path, flags):
    result = run_script("dqn_softmoe", "--env-id", "Breakout", "--runs-dir", str(tmp_path), *TINY, *flags)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step 600/600" in result.stdout  # plain progress lines when not on a terminal
    run_dir = run_dir_of(tmp_path)
    assert os.path.basename(run_dir).startswith("Breakout__dqn_softmoe__1__")
    scalars = read_scalars(run_dir)
    for key in ["charts/episodic_return", "charts/episodic_length", "charts/iteration_return", "charts/SPS",
                "losses/td_loss", "losses/q_values", "metrics/dormant_tau0", "metrics/dormant_tau0.1",
                "metrics/feature_norm", "metrics/srank", "metrics/entk_srank"]:
        assert key in scalars, key
    if "baseline" not in flags:
        assert "moe/router_entropy" in scalars and "moe/expert_load_0" in scalars
    if "top1" in flags:
        assert "moe/dropped_fraction" in scalars and "losses/aux_loss" in scalars
    assert all(step <= 600 for step, _ in scalars["charts/episodic_return"])
    if "--num-envs" not in flags:  # a reset step plays no frame and is no agent step: game k ends at the k first lengths
        lengths = [int(v) for _, v in scalars["charts/episodic_length"]]
        assert len(lengths) >= 2 and [s for s, _ in scalars["charts/episodic_return"]] == list(np.cumsum(lengths))
    assert all(0 <= v <= 1 for _, v in scalars["metrics/dormant_tau0.1"])
    if "--exploration-steps" in flags:  # 1 through the warm-up, then linear to 0.1 over 200 steps (Dopamine); the
        # epsilon logged at step s is the one that chose step s's action, at step s - 1
        expected = {s: 1.0 if s - 1 < 300 else max(1 - 0.9 * (s - 1 - 300) / 200, 0.1) for s in range(100, 601, 100)}
        assert dict(scalars["charts/epsilon"]) == pytest.approx(expected)


def test_dqn_impala_softmoe_saves_and_evaluates(tmp_path):
    result = run_script("dqn_softmoe", "--env-id", "ALE/Pong-v5", "--runs-dir", str(tmp_path), "--total-timesteps", "120",
                        "--learning-starts", "80", "--buffer-size", "500", "--metrics-every", "0", "--num-experts", "2",
                        "--save-model", "--eval-episodes", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = run_dir_of(tmp_path)
    assert os.path.basename(run_dir).startswith("Pong__")
    assert os.path.getsize(os.path.join(run_dir, "model.pt")) > 0
    summary = json.load(open(os.path.join(run_dir, "summary.json")))
    assert summary["global_step"] == 120 and summary["game"] == "Pong" and len(summary["eval_returns"]) == 2
    returns = [v for _, v in read_scalars(run_dir)["eval/episodic_return"]]  # the mean of the 2 games
    assert returns == [pytest.approx(sum(summary["eval_returns"]) / 2)] and all(-21 <= r <= 21 for r in returns)


@pytest.mark.parametrize("flags,message", [
    (["--env-id", "Breakot"], "unknown game 'Breakot'; closest ROM ids: breakout"),
    (["--num-experts", "0"], "--num-experts must be positive"),
    (["--buffer-size", "-5"], "--buffer-size must be positive"),
    (["--replay-ratio", "0"], "--replay-ratio must be positive"),
    (["--moe-type", "top1", "--random-phi"], "--random-phi and --moe-l2-norm are Soft MoE options"),
    (["--moe-type", "softmoe", "--load-balancing-coef", "1"], "--load-balancing-coef applies to --moe-type top1"),
    (["--moe-type", "baseline", "--tokenization", "perfeat"], "the baseline has no tokens"),
    (["--expert-variant", "big", "--moe-type", "top1"], "--expert-variant big is a Soft MoE"),
    (["--encoder", "nature", "--impala-filter-size", "4"], "apply to the Impala encoder"),
    (["--expert-hidden-divide", "--num-experts", "3"], "divisible by --num-experts"),
    (["--end-e", "0.5", "--start-e", "0.1"], "epsilons must satisfy"),
    (["--compile-mode", "reduce-overhead"], "--compile-mode reduce-overhead applies to --compile; add --compile"),
    pytest.param(["--compile", "--compile-mode", "reduce-overhead"], "captures CUDA graphs and needs a GPU", marks=GPU_ONLY),
    pytest.param(["--tf32"], "--tf32 applies to NVIDIA GPUs and this run is on the CPU; drop --tf32", marks=GPU_ONLY),
])
def test_bad_input_is_one_clear_line(tmp_path, flags, message):
    result = run_script("dqn_softmoe", "--runs-dir", str(tmp_path), *flags, timeout=120)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert not os.listdir(tmp_path)  # nothing was created


def test_invalid_choice_is_refused_by_the_parser(tmp_path):
    result = run_script("dqn_softmoe", "--moe-type", "dense", timeout=120)
    assert result.returncode != 0 and "Traceback" not in result.stderr and "moe-type" in result.stderr
