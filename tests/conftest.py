"""Shared test helpers: import the top-level scripts as modules and run them as subprocesses."""

import glob
import importlib.util
import os
import subprocess
import sys

import pytest

# With pytest-xdist (`-n N`), each worker and the scripts it starts get cores/N torch threads: with every process
# using all cores the suite ran 2x slower than serially, with the cores split it runs 1.5x faster (2 cores, -n 2).
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _threads = str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
    for _name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_name, _threads)  # read when torch is imported, here and in every subprocess

# Slowest files first: with pytest-xdist their long runs then overlap the many short tests instead of ending alone.
SLOW_FIRST = ["test_long_runs.py", "test_offline.py", "test_learning.py", "test_benchmark_launch.py", "test_atari100k.py",
              "test_rainbow.py", "test_runs.py"]


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FIRST)))  # stable: each file keeps its order


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted(os.path.basename(p)[: -len(".py")] for p in glob.glob(os.path.join(ROOT, "*_softmoe.py")))


def load_script(name: str):
    """Import `{name}.py` from the repository root (scripts are importable: their run sits under __main__)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def small_agent(module, num_actions: int = 4, device: str = "cpu", **flags):
    """(args, agent) of `module.build_agent` with a small Nature-CNN network (2 experts, batch 8) and a replay of 300
    random transitions, seeded: what the unit tests of a script's update and acting start from."""
    import torch

    sys.path.insert(0, ROOT)
    from benchmark.speed import fill_replay

    torch.manual_seed(0)
    small = dict(encoder="nature", num_experts=2, expert_hidden=16, batch_size=8, cuda=device == "cuda")
    if module.__name__ == "cql_softmoe":  # no --buffer-size (the dataset sets it); None flags take --agent's values
        args = module.with_agent_defaults(module.Args(**small, **flags))
        agent = module.build_agent(args, num_actions, torch.device(device), 400)
        fill_replay(agent.rb, 300, num_actions)
        agent.rb.starts = torch.arange(3, 250, device=device)  # FixedReplay samples from the starts load_dataset allows
    else:
        args = module.Args(**small, buffer_size=400, **flags)
        agent = module.build_agent(args, num_actions, torch.device(device))
        fill_replay(agent.rb, 300, num_actions)
    return args, agent


def equalise_noisy_heads(network) -> None:
    """Zero the means of a noisy dueling network's heads: every action then has the same noise-free value (uniform
    atoms, Q = 0), so which action a noisy call picks comes from the noise alone, whatever the initialisation (torch
    versions draw different initial weights from one seed, and with untouched heads one action can win every draw)."""
    import torch

    with torch.no_grad():
        for head in [network.value, network.advantage]:
            head.weight_mu.zero_()
            head.bias_mu.zero_()


def run_script(name: str, *flags: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run a script on the CPU as a user would (no terminal, so progress comes as plain lines)."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, f"{name}.py"), "--no-cuda", *flags],
        capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env,
    )



def signalled_at(name: str, flags, marker: str, sig) -> tuple[int, str, str]:
    """Run a script like run_script until a line of its output starts with `marker`, send it `sig`, and return
    (returncode, stdout, stderr)."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, f"{name}.py"), "--no-cuda", *flags], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith(marker):
            proc.send_signal(sig)
            break
    out, err = proc.communicate(timeout=300)
    return proc.returncode, "".join(seen) + out, err

def read_scalars(run_dir: str) -> dict:
    """All scalars of a run's TensorBoard files, read with tensorboard's own event reader: {tag: [(step, value)]}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.fixture(scope="session")
def dqn():
    return load_script("dqn_softmoe")
