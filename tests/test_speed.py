"""benchmark/speed.py measures what it says on every kind of script (tiny sizes: the numbers themselves belong in
benchmark/results/, not in a test)."""

import math
import sys
import types

import pytest

from conftest import ROOT

sys.path.insert(0, ROOT)
from benchmark import speed  # noqa: E402

OPTS = dict(device="cpu", env_id="Breakout", num_experts=2, encoder="nature", num_envs=1, buffer_size=1000,
            compile=False, fill=400, updates=2, steps=20, full_loop=False)


@pytest.mark.parametrize("script", ["dqn_softmoe", "der_softmoe", "cql_softmoe"])
def test_measure_reports_rates_and_replay_size(script):
    opts = types.SimpleNamespace(**OPTS)
    result = speed.measure(script, "softmoe", opts)
    assert result["script"] == script and result["num_experts"] == 2 and result["parameters"] > 0
    assert result["updates_per_s"] > 0 and math.isfinite(result["updates_per_s"])
    # one uint8 frame, action, float reward and two flags per transition (+ the sum tree for DER's prioritized replay)
    assert result["replay_bytes_1m"] == (7_063_000_000 if script != "der_softmoe" else
                                         7_063_000_000 + 8 * 2 ** 21)
    if script == "cql_softmoe":  # offline: no env to step
        assert "acting_sps" not in result
    else:
        assert result["env_only_sps"] > result["acting_sps"] > 0
        replay_ratio = 1.0 if script == "der_softmoe" else 0.25
        assert result["learning_bound_sps"] == pytest.approx(result["updates_per_s"] / replay_ratio)
    table = speed.markdown([result], types.SimpleNamespace(**OPTS), "test machine")
    assert f"| {script} | softmoe ×2 |" in table and "test machine" in table
