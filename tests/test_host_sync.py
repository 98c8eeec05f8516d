"""On a GPU the training loops synchronise with the host only to act (one wait per agent step, for the actions) and at
log and checkpoint points: an update, a replay write, sampling, priority updates and the loop's own bookkeeping queue
work and never wait for it (README, "Everything on the device"). A host read hidden in that path (an `.item()`, a
`bool()` of a tensor, boolean-mask indexing, `.tolist()`, `.cpu()`) would stall every step of a GPU run. Such reads
are visible on the CPU too: this file runs real loops of every script under a dispatch mode that records each
operation that needs a tensor's value on the host, and where it was called from."""

import os
import sys
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import ROOT, load_script, small_agent

# operators that read a device tensor's value on the host (CUDA waits for the stream to get there)
HOST_READS = {"aten._local_scalar_dense.default", "aten.is_nonzero.default", "aten.nonzero.default",
              "aten.masked_select.default", "aten.equal.default", "aten.repeat_interleave.Tensor",
              "aten._unique2.default", "aten.unique_dim.default", "aten.unique_consecutive.default"}
TENSOR_READS = ("numpy", "tolist", "cpu")  # methods that copy a tensor to the host without an operator of their own
OPTIM = os.path.join("torch", "optim", "")
WRAPPERS = [os.path.join("torch", name) for name in ("_dynamo", "_compile.py", "utils")]  # around every call
ACTS, CHECKS = ("Actor.__call__",), ("main.<locals>.stop_if_nonfinite",)


def where(frame) -> tuple[str, str, str]:
    """(innermost file, the nearest function of the project's own, the project's functions on the stack) of a call."""
    while any(part in frame.f_code.co_filename for part in WRAPPERS):
        frame = frame.f_back
    inner, names = frame.f_code.co_filename, []
    while frame is not None:
        file = frame.f_code.co_filename  # the project's own files (the scripts, benchmark/, tests/), not its venv
        if file.startswith(ROOT + os.sep) and "site-packages" not in file:
            names.append(frame.f_code.co_qualname)
        frame = frame.f_back
    return inner, (names[0] if names else ""), " < ".join(names)


class HostReads(TorchDispatchMode):
    """Counts host reads by (what, innermost file, nearest script function, script stack)."""

    def __init__(self, monkeypatch):
        super().__init__()
        self.reads = Counter()
        for name in TENSOR_READS:
            method = getattr(torch.Tensor, name)

            def recorded(tensor, *args, _method=method, _name=name, **kwargs):
                self.reads[(f"Tensor.{_name}", *where(sys._getframe(1)))] += 1
                return _method(tensor, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, recorded)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        mask = name.startswith("aten.index") and any(  # x[mask]: the number of True entries decides the shape
            isinstance(t, torch.Tensor) and t.dtype == torch.bool
            for a in args if isinstance(a, (list, tuple)) for t in a)
        if name in HOST_READS or mask:
            self.reads[(name + (" (boolean mask)" if mask else ""), *where(sys._getframe(1)))] += 1
        return func(*args, **(kwargs or {}))


def unexpected(reads: Counter) -> dict:
    """The host reads the loops must not make: all but Adam's step count (a host tensor unless `capturable`, so
    reading it waits for nothing on a GPU), the networks' initialisation, the actor's one read of the actions per call
    and the non-finite check at log, checkpoint and end points."""
    allowed = lambda inner, nearest, stack: (inner.startswith(os.path.dirname(torch.__file__)) and OPTIM in inner
                                             or "build_agent" in stack.split(" < ") or nearest in ACTS + CHECKS)
    return {key: n for key, n in reads.items() if not allowed(*key[1:])}


def test_the_detector_sees_every_kind_of_host_read(monkeypatch):
    """The check below can fail: each way of reading a value on the host is recorded, plain device work is not."""
    x = torch.arange(6.0)
    with HostReads(monkeypatch) as mode:
        y = (x * 2 + 1).sum() / 3  # queued work only
        x.max().item(), bool(x[0] > 1), float(y), x[x > 2], x.nonzero(), x.tolist(), x.numpy(), x.cpu()
        torch.repeat_interleave(x.long())
    kinds = {key[0] for key in mode.reads}
    assert kinds == {"aten._local_scalar_dense.default", "aten.index.Tensor (boolean mask)", "aten.nonzero.default",
                     "Tensor.tolist", "Tensor.numpy", "Tensor.cpu", "aten.repeat_interleave.Tensor"}, kinds
    assert all(key[2] == "test_the_detector_sees_every_kind_of_host_read" for key in mode.reads), mode.reads
    assert unexpected(mode.reads) == mode.reads


@pytest.mark.parametrize("script", ["dqn_softmoe", "rainbow_softmoe", "der_softmoe", "drq_softmoe"])
def test_online_loops_read_the_device_only_to_act(script, tmp_path, monkeypatch):
    """A real loop on Breakout (2 envs, lagged actor, prioritized replay for Rainbow and DER, episode ends and resets
    included) after learning starts: the only host reads are the actions, once per acting call, and the non-finite
    check at the end; none in updates, replay writes, sampling, priorities, target syncs or the loop's counters."""
    module = load_script(script)
    flags = dict(encoder="nature", num_experts=2, expert_hidden=16, batch_size=8, buffer_size=2000, num_envs=2,
                 env_id="Breakout", learning_starts=100, total_timesteps=300, lagged_actor=True,
                 runs_dir=str(tmp_path), metrics_every=0, log_every=10**6, print_every=10**6, cuda=False)
    if script in ("der_softmoe", "drq_softmoe"):  # fewer updates than their 1 per step (each one is checked alike)
        flags.update(eval_episodes=0, replay_ratio=0.5)
    if script != "drq_softmoe":
        flags.update(target_network_frequency=40)
    args = module.Args(**flags)
    prepared = module.prepare(args)[:2]
    calls = Counter()
    build = module.build_agent

    def counted_build(*a):
        agent = build(*a)
        update = agent.update
        agent.update = lambda: calls.update(["update"]) or update()
        return agent

    monkeypatch.setattr(module, "build_agent", counted_build)
    act = module.Actor.__call__
    monkeypatch.setattr(module.Actor, "__call__", lambda actor, obs: calls.update(["act"]) or act(actor, obs))
    with HostReads(monkeypatch) as mode:
        module.main(args, *prepared)
    assert calls["update"] >= 25
    assert unexpected(mode.reads) == {}
    acting = sum(n for (kind, _, nearest, stack), n in mode.reads.items() if nearest in ACTS)
    assert 0 < acting <= calls["act"]  # at most one read per acting call (once per vector step)
    checks = sum(n for (kind, _, nearest, stack), n in mode.reads.items() if nearest in CHECKS)
    assert 0 < checks <= 2  # once at the end (log points and checkpoints are beyond this run)


@pytest.mark.parametrize("agent", ["cql", "cql-c51"])
def test_offline_updates_read_nothing_on_the_host(agent, monkeypatch):
    """CQL's gradient steps (uniform sampling from the fixed dataset, the CQL term, the target): no host read."""
    module = load_script("cql_softmoe")
    _, built = small_agent(module, agent=agent)
    with HostReads(monkeypatch) as mode:
        for _ in range(5):
            built.update()
    assert unexpected(mode.reads) == {}
