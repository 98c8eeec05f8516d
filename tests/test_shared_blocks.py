"""The scripts repeat each other on purpose; their shared pieces must stay identical, in text and in behaviour.

Every `*_softmoe.py` joins automatically: blocks between `# === shared: NAME ===` and `# === end shared ===`
must have the same text wherever they appear, the core blocks must appear in every script, and the shared
components must give identical outputs for identical parameters and inputs.
"""

import copy
import os
import re

import numpy as np
import pytest
import torch

from conftest import ROOT, SCRIPTS, load_script, small_agent

CORE = ["environment", "encoders", "tokenize", "Experts", "SoftMoE", "Top1MoE", "ReplayBuffer", "metrics", "progress",
        "checkpoint"]
BLOCK = re.compile(r"^# === shared: (\w+) ===\n(.*?)^# === end shared ===$", re.S | re.M)


def blocks(script):
    text = open(os.path.join(ROOT, f"{script}.py")).read()
    found = BLOCK.findall(text)
    assert text.count("# === shared:") == len(found) == text.count("# === end shared ==="), f"unbalanced markers in {script}"
    names = [name for name, _ in found]
    assert len(names) == len(set(names)), f"a block appears twice in {script}"
    return dict(found)


def test_every_script_carries_the_core_blocks():
    for script in SCRIPTS:
        missing = set(CORE) - set(blocks(script))
        assert not missing, f"{script} lacks shared blocks {sorted(missing)}"


def test_shared_blocks_have_identical_text():
    texts = {}
    for script in SCRIPTS:
        for name, text in blocks(script).items():
            texts.setdefault(name, {})[script] = text
    for name, by_script in texts.items():
        reference_script, reference = next(iter(by_script.items()))
        for script, text in by_script.items():
            assert text == reference, f"shared block {name!r} differs between {reference_script} and {script}"


OTHERS = [s for s in SCRIPTS if s != "dqn_softmoe"]


@pytest.mark.parametrize("script", OTHERS)
def test_shared_components_give_identical_outputs(dqn, script):
    other = load_script(script)
    frames = torch.randint(0, 256, (2, 4, 84, 84), dtype=torch.uint8).float() / 255
    for name in ["impala", "nature"]:
        torch.manual_seed(0)
        a = dqn.make_encoder(name, 1, 3)
        torch.manual_seed(0)
        b = other.make_encoder(name, 1, 3)
        torch.testing.assert_close(a(frames), b(frames), rtol=0, atol=0)
        for tok in ["perconv", "perfeat", "persamp"]:
            torch.testing.assert_close(dqn.tokenize(a(frames), tok), other.tokenize(b(frames), tok), rtol=0, atol=0)
    tokens = torch.randn(2, 121, 32)
    for make in [lambda m: m.SoftMoE(121, 32, 4, m.Experts(4, 32, 16)),
                 lambda m: m.SoftMoE(121, 32, 4, m.Experts(4, 32, 16), l2_norm=True),
                 lambda m: m.Top1MoE(121, 32, 4, m.Experts(4, 32, 16), load_balancing=True)]:
        torch.manual_seed(0)
        a = make(dqn)
        torch.manual_seed(0)
        b = make(other)
        torch.manual_seed(1)
        ya, info_a = a(tokens)
        torch.manual_seed(1)
        yb, info_b = b(tokens)
        torch.testing.assert_close(ya, yb, rtol=0, atol=0)
        assert info_a.keys() == info_b.keys()
    replays = [m.ReplayBuffer(300, 2, "cpu", n_step=3, seed=0) for m in (dqn, other)]
    rng = np.random.default_rng(0)
    for t in range(200):
        frame, reward, done = rng.integers(0, 256, (2, 84, 84), dtype=np.uint8), rng.random(2), rng.random(2) < 0.05
        for rb in replays:
            rb.add(frame, [1, 2], reward, done, done)
    for x, y in zip(*(rb.sample(16) for rb in replays)):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    features = torch.randn(32, 64)
    assert dqn.srank(features) == other.srank(features)
    hidden = torch.rand(8, 2, 3, 5)
    assert dqn.dormant_fraction(hidden, None, 0.1) == other.dormant_fraction(hidden, None, 0.1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU these flags are accepted")
@pytest.mark.parametrize("script", SCRIPTS)
def test_gpu_only_flags_are_refused_on_the_cpu_and_may_change_on_resume(script):
    module = load_script(script)
    for flags, message in [(dict(tf32=True), "--tf32 applies to NVIDIA GPUs"),
                           (dict(compile=True, compile_mode="reduce-overhead"), "captures CUDA graphs and needs a GPU")]:
        with pytest.raises(ValueError, match=message):
            module.check_args(module.Args(**flags))
    assert {"tf32", "compile", "compile_mode", "cuda"} <= module.RESUMABLE_CHANGES  # speed, not results


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_checkpoint_of_the_other_device_resumes(script):
    """--cuda may change on resume: a GPU run's sampler state (16 bytes) and Adam state (torch.compile makes it
    `capturable` on CUDA) must load on the CPU."""
    module = load_script(script)
    a, b = torch.Generator(), torch.Generator()
    cuda_state = torch.arange(16, dtype=torch.uint8)  # a CUDA generator's state: seed and offset
    module.restore_generator(a, cuda_state)
    module.restore_generator(b, cuda_state)
    assert torch.equal(torch.rand(4, generator=a), torch.rand(4, generator=b))  # a new stream, the same every time
    module.restore_generator(b, cuda_state.flip(0))
    module.restore_generator(a, cuda_state)
    assert not torch.equal(torch.rand(4, generator=a), torch.rand(4, generator=b))  # and it follows the saved state
    c = torch.Generator().manual_seed(5)
    saved = c.get_state()
    expected = torch.rand(3, generator=c)
    module.restore_generator(a, saved)  # same device: exactly the saved stream
    assert torch.equal(torch.rand(3, generator=a), expected)

    p = torch.nn.Parameter(torch.ones(3))
    adam = torch.optim.Adam([p], lr=0.1)
    p.grad = torch.ones(3)
    adam.step()
    state = adam.state_dict()
    state["param_groups"][0]["capturable"] = True
    resumed = torch.optim.Adam([p], lr=0.1)
    module.load_optimizer(resumed, state, torch.device("cpu"))
    resumed.step()  # with capturable=True on the CPU, Adam refuses to step
    assert resumed.param_groups[0]["capturable"] is False and int(resumed.state[p]["step"]) == 2


@pytest.mark.parametrize("script", SCRIPTS)
def test_cpu_networks_are_channels_last_and_compute_what_channels_first_ones_do(script):
    """On the CPU build_agent lays every convolution weight out channels-last (oneDNN's fast layout); the Q-values are
    those of the same network channels-first, up to rounding."""
    module = load_script(script)
    _, agent = small_agent(module)
    networks = [n for n in (agent.q_network, getattr(agent, "target_network", None)) if n is not None]  # DrQ: none
    states = torch.randint(0, 256, (3, 4, 84, 84), dtype=torch.uint8)
    for network in networks:
        weights = [p for p in network.parameters() if p.dim() == 4]
        assert weights and all(w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous() for w in weights)
        reference = copy.deepcopy(network).to(memory_format=torch.contiguous_format)
        assert all(p.is_contiguous() for p in reference.parameters())
        network.eval(), reference.eval()  # no noisy-net noise
        with torch.no_grad():
            torch.testing.assert_close(network(states), reference(states), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("script", SCRIPTS)
def test_flags_that_would_do_nothing_or_break_the_run_layout_are_refused(script):
    """Every script refuses the same nonsense: an exp name that is no single run-directory part (report.py and
    --resume auto split `game__exp-name__seed__time`), an evaluation epsilon without evaluation games, a seed numpy
    cannot take (it crashed after the run directory was made); the online
    ones also a batch larger than the replay, an explicit iteration longer than the run (no iteration_return), and
    DER/DrQ an evaluation period longer than the run."""
    module = load_script(script)
    cases = [(dict(exp_name="a/b"), "must be a non-empty name without '/' or '__'"),
             (dict(exp_name="a__b"), "must be a non-empty name without '/' or '__'"),
             (dict(eval_episodes=0, eval_epsilon=0.05), "--eval-epsilon 0.05 applies to evaluation games"),
             (dict(seed=-1), "--seed must be in [0, 2^32 - 1]"), (dict(seed=2**32), "--seed must be in [0, 2^32 - 1]")]
    if script != "cql_softmoe":
        cases += [(dict(batch_size=200, buffer_size=100), "--batch-size 200 exceeds --buffer-size 100"),
                  (dict(total_timesteps=1000, iteration_steps=2000), "--iteration-steps 2000 exceeds --total-timesteps")]
        module.check_args(module.Args(total_timesteps=1000))  # the default iteration: curves only, no refusal
    if script in ("der_softmoe", "drq_softmoe"):
        cases += [(dict(total_timesteps=1000, eval_every=2000), "--eval-every 2000 exceeds --total-timesteps 1000")]
    for flags, message in cases:
        with pytest.raises(ValueError, match=re.escape(message)):
            module.check_args(module.Args(**flags))
    module.check_args(module.Args(eval_episodes=0))
    module.check_args(module.Args(seed=2**32 - 1))
    assert "runs_dir" in module.RESUMABLE_CHANGES  # --resume PATH decides where the run continues, not --runs-dir


@pytest.mark.parametrize("script", SCRIPTS)
def test_evaluation_games_of_consecutive_seeds_never_share_an_emulator_seed(script, monkeypatch):
    """Every script's evaluate seeds each game on its own (ale-py would give game i the seed + i, so seeds s and s + 1
    shared all but one game's sticky-action stream), within ale-py's int32 seeds even for the largest --seed."""
    module = load_script(script)
    seen = []

    class Recorded(Exception):
        pass

    class Env:
        def reset(self, seed=None, **kwargs):
            seen.append([int(s) for s in np.atleast_1d(seed)])
            raise Recorded

        def close(self):
            pass

    monkeypatch.setattr(module, "make_env", lambda rom, n, *a, **k: Env())
    protocol = ("dopamine",) if script in ("dqn_softmoe", "rainbow_softmoe") else ()
    for seed in (101, 102, 2**32 - 1 + 100):
        with pytest.raises(Recorded):
            module.evaluate(None, "pong", *protocol, 10, 0.001, torch.device("cpu"), seed)
    assert all(len(set(games)) == 10 for games in seen)
    assert not set(seen[0]) & set(seen[1])
    assert all(0 <= s < 2**31 - 1 for games in seen for s in games)
