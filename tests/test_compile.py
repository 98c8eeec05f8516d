"""--compile changes speed, not results: the compiled and eager `update()` of a script's `build_agent` take the same
parameters to the same values and `act()` picks the same actions on a fixed seed (CPU; inductor generates C++ here,
Triton on a GPU); the compiled replay (sum tree, batch assembly) computes exactly what the eager one does. On a
machine with CUDA the same comparison runs there too, with and without CUDA graphs (--compile-mode reduce-overhead),
and the GPU replay is checked against the CPU one. A compiled loop of each script traces each function once per input
shape and never recompiles after that."""

import sys

import pytest
import torch
import torch._inductor.fx_passes.post_grad as post_grad

from conftest import ROOT, load_script

sys.path.insert(0, ROOT)
from benchmark.speed import fill_replay  # noqa: E402

UPDATES = 3


def train(module, compile: bool, device: str = "cpu", mode: str = "default", updates: int = UPDATES, tf32=False,
          encoder="nature", **flags):
    args = module.Args(env_id="Pong", encoder=encoder, num_experts=2, batch_size=8, buffer_size=400, tf32=tf32,
                       compile=compile, compile_mode=mode if compile else "default", cuda=device == "cuda", **flags)
    torch.manual_seed(0)
    agent = module.build_agent(args, 6, torch.device(device))
    if compile:  # what --compile promises is compiled: acting and the replay's sampling (the step is inside update)
        tree = [agent.rb.tree.find, agent.rb.tree.update] if hasattr(agent.rb, "tree") else []
        assert all(hasattr(f, "_torchdynamo_orig_callable") for f in [agent.act.policy, agent.rb.gather, *tree])
    fill_replay(agent.rb, 300, 6)
    initial = {k: v.detach().clone() for k, v in agent.q_network.state_dict().items()}
    losses = [agent.update()[0] for _ in range(updates)]
    slots, envs = torch.arange(10, 18, device=device), torch.zeros(8, dtype=torch.long, device=device)
    greedy = torch.as_tensor(agent.act(agent.rb.stack_frames(slots, envs).cpu().numpy()), device=device)
    final = {k: v.detach().clone() for k, v in agent.q_network.state_dict().items()}
    return torch.cat([torch.stack(losses), greedy.float()]), initial, final


# full Rainbow: the most the compiled step holds (C51, noisy nets drawing noise inside it, importance weights from
# the sum tree); the other scripts compile the same train_step pattern (each CPU compile costs 40-80 s of CI time).
# fallback_random makes inductor draw the noise with eager's generator, and in eager's order since
# pytorch/pytorch#181245 (fixing #181136; in torch 2.13, not in 2.11, the GPU machine's version). Before it inductor's
# scheduler could reorder the draws (torch 2.11, CPU: the same noise given to other layers flipped 26 of 240 compiled
# noisy actions), so there the comparison turns the noise off.
RANDOM_ORDER_KEPT = hasattr(post_grad, "_chain_random_ops_for_ordering")
CASES = [("rainbow_softmoe", "cpu", "default")]
if torch.cuda.is_available():  # the GPU checks (benchmark/gpu_session.sh compile runs this file there)
    CASES += [(s, "cuda", m) for s in ("dqn_softmoe", "rainbow_softmoe") for m in ("default", "reduce-overhead")]


@pytest.mark.parametrize("script,device,mode", CASES)
def test_compiled_update_matches_eager(script, device, mode):
    import torch._inductor.config as inductor_config

    torch._dynamo.reset()
    module = load_script(script)
    updates = UPDATES + (3 if mode == "reduce-overhead" else 0)  # CUDA graphs: warm-up, recording, then replays
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # fp32 on a GPU: kernels may differ
    try:
        with inductor_config.patch(fallback_random=True):
            flags = {} if RANDOM_ORDER_KEPT or not hasattr(module.Args, "noisy") else {"noisy": False}
            eager_losses, initial, eager = train(module, False, device, updates=updates, **flags)
            compiled_losses, _, compiled = train(module, True, device, mode, updates, **flags)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    tol = dict(rtol=1e-4, atol=1e-5) if device == "cpu" else dict(rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(compiled_losses, eager_losses, **tol)
    assert eager.keys() == compiled.keys()
    for name in eager:
        torch.testing.assert_close(compiled[name], eager[name], **tol, msg=name)
    # the updates did something: a comparison of untouched parameters would pass for any update
    changed = [n for n in eager if initial[n].is_floating_point() and not torch.equal(initial[n], eager[n])]
    assert len(changed) > len(eager) // 2, changed


@pytest.mark.skipif(not torch.cuda.is_available(), reason="TF32 exists on NVIDIA GPUs only (--tf32 is refused elsewhere)")
@pytest.mark.parametrize("script", ["dqn_softmoe", "rainbow_softmoe"])
def test_tf32_update_stays_close_to_float32(script):
    """--tf32 rounds matmul/conv inputs to a 10-bit mantissa: the same updates on the Impala encoder land within
    about 1e-3 of float32's (a bound, not equality; whether learning curves match needs full runs)."""
    module = load_script(script)
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        exact_losses, initial, exact = train(module, False, "cuda", encoder="impala")
        tf32_losses, _, fast = train(module, False, "cuda", tf32=True, encoder="impala")
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32  # build_agent set them
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    # the losses, not the greedy actions after them: an argmax flips where two Q-values lie within TF32's rounding
    torch.testing.assert_close(tf32_losses[:UPDATES], exact_losses[:UPDATES], rtol=2e-2, atol=1e-3)
    for name in exact:
        torch.testing.assert_close(fast[name], exact[name], rtol=2e-2, atol=1e-4, msg=name)
    assert any(not torch.equal(initial[n], exact[n]) for n in exact if initial[n].is_floating_point())


def test_compiled_replay_matches_eager():
    """--compile's replay: the sum tree's fused level loops and the compiled batch assembly give the eager results
    exactly (same sampled starts, same tree after adds and priority updates, a leaf given twice keeps its last value)."""
    torch._dynamo.reset()
    module = load_script("rainbow_softmoe")
    eager, compiled = (module.PrioritizedReplayBuffer(400, 1, "cpu", n_step=3, seed=0) for _ in range(2))
    compiled.compile()
    assert all(hasattr(f, "_torchdynamo_orig_callable") for f in (compiled.gather, compiled.tree.find, compiled.tree.update))
    for rb in (eager, compiled):
        fill_replay(rb, 300, 6)  # 300 adds: each sets 3 leaves (the compiled update's first shape)
    assert torch.equal(compiled.tree.nodes, eager.tree.nodes) and compiled.tree.total() > 0
    losses = torch.rand(6, 8, generator=torch.Generator().manual_seed(0))
    losses[5, 4:] = 0.0  # priority sqrt(1e-10) on some leaves
    for loss in losses:
        batches = []
        for rb in (eager, compiled):
            idx, envs = rb.sample_indices(8)
            batches.append((idx, envs, rb.importance_weights(idx, envs), *rb.gather(idx, envs)))
            rb.update_priorities(idx, envs, loss)  # 8 leaves: the compiled update's second shape
        assert batches[0][0].unique().numel() > 1
        for e, c in zip(*batches):
            torch.testing.assert_close(c, e, rtol=0, atol=1e-6)  # exact for the indices, frames, actions
        assert torch.equal(compiled.tree.nodes, eager.tree.nodes)
    leaf, value = torch.tensor([7, 3, 7, 11, 7, 3, 20, 21]), torch.arange(1.0, 9.0, dtype=torch.float64)
    for rb in (eager, compiled):
        rb.tree.update(leaf, value)
    assert torch.equal(compiled.tree.nodes, eager.tree.nodes)
    assert compiled.tree.get(torch.tensor([7, 3])).tolist() == [5.0, 6.0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the replay's CUDA path (asynchronous pinned copies)")
@pytest.mark.parametrize("script", ["dqn_softmoe", "rainbow_softmoe"])
def test_replay_on_the_gpu_holds_what_the_cpu_replay_holds(script):
    """On CUDA `add` copies from page-locked memory without waiting: the stored transitions, a batch gathered for the
    same starts and the sum tree equal the CPU replay's."""
    module = load_script(script)
    replays = [module.PrioritizedReplayBuffer(400, 2, device, n_step=3, seed=0) if script == "rainbow_softmoe" else
               module.ReplayBuffer(400, 2, device, n_step=3, seed=0) for device in ("cpu", "cuda")]
    for rb in replays:
        fill_replay(rb, 300, 6)
    cpu, gpu = replays
    for name in ("frames", "actions", "rewards", "terminals", "last") + (("tree",) if script == "rainbow_softmoe" else ()):
        a, b = (getattr(rb, name) if name != "tree" else rb.tree.nodes for rb in replays)
        assert torch.equal(b.cpu(), a), name
    idx, envs = cpu.sample_indices(32)
    for a, b in zip(cpu.gather(idx, envs), gpu.gather(idx.cuda(), envs.cuda())):
        torch.testing.assert_close(b.cpu(), a)


@pytest.mark.skipif(not hasattr(torch._dynamo.config, "fail_on_recompile_limit_hit"),
                    reason="this torch's dynamo cannot fail on a recompile (no fail_on_recompile_limit_hit; torch 2.4)")
@pytest.mark.parametrize("script", ["dqn_softmoe", "rainbow_softmoe", "der_softmoe", "drq_softmoe"])
def test_a_compiled_run_compiles_each_piece_once_per_shape(script, tmp_path, monkeypatch):
    """A real --compile loop (1 env as in the paper, lagged actor, metrics, logs, a checkpoint) traces each
    compiled function once per input shape and never again: a guard that fails every few steps (a batch shape that
    varies in the fixed-shape replay and acting functions, a new object each step) would recompile (seconds each on a
    GPU) until dynamo gives up and runs the function eagerly. Dynamo decides this before any backend runs, so the runs
    here use its `eager` backend (no code generation: seconds instead of minutes); every function may hold two
    versions (the sum tree's update sees the 3 leaves of an add and a batch's leaves) and the run fails on a third."""
    import torch._dynamo.config as dynamo_config

    compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda f, mode=None, **kw: compile(f, backend="eager", **kw))
    module = load_script(script)
    flags = dict(encoder="nature", num_experts=2, expert_hidden=16, batch_size=8, buffer_size=2000, num_envs=1,
                 compile=True, lagged_actor=True, env_id="Breakout", learning_starts=100, total_timesteps=300,
                 runs_dir=str(tmp_path), metrics_every=100, log_every=50, print_every=10**6, checkpoint_every=150,
                 eval_episodes=0, cuda=False)  # evaluation plays the eager network
    if script in ("der_softmoe", "drq_softmoe"):  # fewer updates than their 1 per step: a recompile shows at once
        flags.update(replay_ratio=0.25)
    args = module.Args(**flags)
    prepared = module.prepare(args)[:2]
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()  # this run's frames only (a pytest worker has compiled other tests' too)
    with dynamo_config.patch(recompile_limit=2, fail_on_recompile_limit_hit=True):
        module.main(args, *prepared)
    frames = torch._dynamo.utils.counters["frames"]
    assert frames["ok"] == frames["total"] > 0
