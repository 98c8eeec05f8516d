"""Speed and memory of every script's training loop: acting only, updating only, and both.

    python benchmark/speed.py                                   # every script x MoE type, on CUDA if present
    python benchmark/speed.py --scripts dqn_softmoe rainbow_softmoe --moe-types softmoe baseline --num-envs 8
    python benchmark/speed.py --device cpu --encoder nature --out benchmark/results/speed/cpu.md

For each (script, MoE type) it measures, on the same game and device:
- env only: ale-py's vector env stepped with random actions (the emulator's ceiling for this --num-envs);
- acting: env step + the agent's action selection on the device (`agent.act`), as in the training loop;
- updating: gradient updates per second of the script's own `agent.update()` on a replay of random frames,
  and the agent steps per second this allows at the script's replay ratio;
- both: a real run of the script (a subprocess), agent steps per second once learning has started, read from
  its `charts/SPS`, with the run's peak host memory (and peak GPU memory from its summary.json);
- with --profile N: N updates, N acting calls and N replay adds under torch.profiler: operator calls, kernel
  launches and host-device copies per call, and the update's operators that take the most time (what to change first).
Scripts provide `build_agent(args, num_actions, device)`, the same function their `main` uses.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import typing

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from benchmark.registry import SCRIPTS, load_script_module  # noqa: E402

PROTOCOL = {"online": "dopamine", "atari100k": "atari100k", "offline": "dopamine"}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rate(count: int, seconds: float) -> float:
    return count / max(seconds, 1e-9)


def played(was_done: np.ndarray, terminations, truncations) -> tuple[int, np.ndarray]:
    """Agent steps of one vector step, as the scripts count them: an env's reset step (the step after its game
    ended: ale-py ignores the action and plays no frame) is none. Returns them and the envs whose next step resets."""
    return len(was_done) - int(was_done.sum()), terminations | truncations


def env_only(module, rom: str, protocol: str, num_envs: int, steps: int, seed: int = 0) -> float:
    """Agent steps per second of the emulator alone, random actions."""
    envs = module.make_env(rom, num_envs, protocol)
    envs.reset(seed=seed)
    rng = np.random.default_rng(seed)
    n = envs.single_action_space.n
    count, was_done = 0, np.zeros(num_envs, dtype=bool)
    start = time.perf_counter()
    for _ in range(steps // num_envs):
        _, _, terminations, truncations, _ = envs.step(rng.integers(n, size=num_envs))
        stepped, was_done = played(was_done, terminations, truncations)
        count += stepped
    elapsed = time.perf_counter() - start
    envs.close()
    return rate(count, elapsed)


def acting(module, agent, rom: str, protocol: str, num_envs: int, steps: int, seed: int = 0) -> float:
    """Agent steps per second of env step + the agent's `act` (states up, actions down: one host sync per step)."""
    envs = module.make_env(rom, num_envs, protocol)
    obs, _ = envs.reset(seed=seed)
    was_done = np.zeros(num_envs, dtype=bool)
    for _ in range(5):  # warm-up (lazy init, cuDNN autotuning)
        obs, _, terminations, truncations, _ = envs.step(agent.act(obs))
        _, was_done = played(was_done, terminations, truncations)
    count = 0
    start = time.perf_counter()
    for _ in range(steps // num_envs):
        obs, _, terminations, truncations, _ = envs.step(agent.act(obs))
        stepped, was_done = played(was_done, terminations, truncations)
        count += stepped
    elapsed = time.perf_counter() - start
    envs.close()
    return rate(count, elapsed)


def fill_replay(rb, slots: int, num_actions: int, seed: int = 0) -> None:
    """Random frames and episodes of 50 steps: the update's cost does not depend on what the frames show."""
    rng = np.random.default_rng(seed)
    for t in range(slots):
        end = t % 51 == 50
        rb.add(rng.integers(0, 256, (rb.num_envs, 84, 84), dtype=np.uint8), rng.integers(num_actions, size=rb.num_envs),
               rng.random(rb.num_envs), np.full(rb.num_envs, t % 51 == 49), np.full(rb.num_envs, end))


def updating(agent, updates: int, device) -> float:
    """Gradient updates per second of `agent.update()` (sampling included), timed after a warm-up."""
    for _ in range(3):  # warm-up: compilation, autotuning, allocator
        agent.update()
    sync(device)
    start = time.perf_counter()
    for _ in range(updates):
        agent.update()
    sync(device)
    return rate(updates, time.perf_counter() - start)


def profile_calls(fn, calls: int, device, top: int = 0) -> dict:
    """`calls` calls of `fn` under torch.profiler (after one outside it): per call, the operator calls, the kernel (or
    CUDA graph) launches and host-device copies on a GPU, and the `top` operators by self time (device time on a GPU)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(calls):
            fn()
        sync(device)
    events = prof.key_averages()
    on_device = device.type == "cuda"
    count = lambda *keys: sum(e.count for e in events if any(k in e.key for k in keys)) / calls if on_device else None
    self_us = (lambda e: e.self_device_time_total) if on_device else (lambda e: e.self_cpu_time_total)
    ranked = sorted(events, key=self_us, reverse=True)[:top]
    return {"ops_per_call": sum(e.count for e in events if e.key.startswith("aten::")) / calls,
            "launches_per_call": count("LaunchKernel", "GraphLaunch"), "copies_per_call": count("cudaMemcpy"),
            "top": [{"name": e.key, "ms_per_call": self_us(e) / 1000 / calls, "calls_per_call": e.count / calls}
                    for e in ranked]}


def profile_updates(agent, updates: int, device, num_actions: int, online: bool, top: int = 12) -> dict:
    """Where an agent step's device work goes: `updates` calls of `agent.update()` (with its `top` operators), and
    for the online scripts as many calls of `agent.act()` on a batch of num_envs states and of the replay's `add()`
    (an agent step = one act, one add and replay-ratio updates)."""
    result = {"updates": updates, "update": profile_calls(agent.update, updates, device, top)}
    if online:
        rb, rng = agent.rb, np.random.default_rng(0)
        states = np.zeros((rb.num_envs, 4, 84, 84), dtype=np.uint8)  # from the host, as the loop acts
        frames = rng.integers(0, 256, (rb.num_envs, 84, 84), dtype=np.uint8)
        no = np.zeros(rb.num_envs, dtype=bool)
        result["act"] = profile_calls(lambda: agent.act(states), updates, device)
        result["add"] = profile_calls(lambda: rb.add(frames, rng.integers(num_actions, size=rb.num_envs),
                                                     rng.random(rb.num_envs), no, no), updates, device)
    return result


def full_loop(script: str, flags: list[str], learning_starts: int, total: int, device: str) -> dict:
    """A real run of the script: agent steps/s after learning starts (median of its charts/SPS, the first tenth left
    out), peak memory. With learning_starts >= total learning never starts: the rate after the first tenth."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    start = 0 if learning_starts >= total else learning_starts
    with tempfile.TemporaryDirectory() as runs:
        command = [sys.executable, os.path.join(ROOT, f"{script}.py"), *flags, "--runs-dir", runs,
                   "--learning-starts", str(learning_starts), "--total-timesteps", str(total), "--metrics-every", "0",
                   "--log-every", str(max(1, (total - start) // 10)), "--print-every", str(total),
                   "--eval-episodes", "0"]  # an untrained greedy agent may never serve: 100 games to the 27k-step cap
        if device == "cpu":
            command.append("--no-cuda")
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        out, err = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"{script} failed: {err.strip().splitlines()[-1] if err.strip() else out[-300:]}")
        (run_dir,) = glob.glob(os.path.join(runs, "*"))
        acc = EventAccumulator(run_dir, size_guidance={"scalars": 0})
        acc.Reload()
        sps = [e.value for e in acc.Scalars("charts/SPS") if e.step > start + (total - start) // 10]
        with open(os.path.join(run_dir, "summary.json")) as f:
            summary = json.load(f)
    return {"sps": statistics.median(sps) if sps else float("nan"), "peak_host_bytes": summary.get("peak_host_memory_bytes"),
            "peak_gpu_bytes": summary.get("peak_gpu_memory_bytes"), "peak_gpu_reserved_bytes": summary.get("peak_gpu_reserved_bytes")}


def script_args(module, moe_type: str, opts):
    """(the script's Args for this measurement, the overrides it was built from)."""
    overrides = dict(env_id=opts.env_id, moe_type=moe_type, num_experts=opts.num_experts if moe_type != "baseline" else 1,
                     encoder=opts.encoder, num_envs=opts.num_envs, buffer_size=opts.buffer_size, compile=opts.compile,
                     compile_mode=getattr(opts, "compile_mode", "default"), tf32=getattr(opts, "tf32", False),
                     lagged_actor=getattr(opts, "lagged_actor", False), cuda=opts.device == "cuda",
                     gpu_replay_fraction=getattr(opts, "gpu_replay_fraction", None))
    fields = set(module.Args.__dataclass_fields__)
    return module.Args(**{k: v for k, v in overrides.items() if k in fields}), overrides


def measure(script: str, moe_type: str, opts) -> dict:
    module = load_script_module(script)
    spec = SCRIPTS[script]
    protocol = PROTOCOL[spec.kind]
    device = torch.device(opts.device)
    rom = module.resolve_rom(opts.env_id)
    args, overrides = script_args(module, moe_type, opts)
    envs = module.make_env(rom, 1, protocol)
    num_actions = int(envs.single_action_space.n)
    envs.close()
    torch.manual_seed(0)
    if spec.kind == "offline":  # cql_softmoe.py: --agent sets some defaults; the fixed replay takes the random frames
        args = module.with_agent_defaults(args)
        agent = module.build_agent(args, num_actions, device, opts.fill)
        fill_replay(agent.rb, opts.fill, num_actions)
        lo, hi = agent.rb.valid_range()
        agent.rb.starts = torch.arange(lo, hi, device=device)
    else:
        agent = module.build_agent(args, num_actions, device)
        fill_replay(agent.rb, opts.fill // agent.rb.num_envs, num_actions)
    result = {"script": script, "moe_type": moe_type, "num_experts": overrides["num_experts"],
              "parameters": sum(p.numel() for p in agent.q_network.parameters()),
              "updates_per_s": updating(agent, opts.updates, device)}
    if getattr(opts, "profile", 0):
        result["profile"] = profile_updates(agent, opts.profile, device, num_actions, spec.kind != "offline")
    replay_ratio = getattr(args, "replay_ratio", None)
    if spec.kind != "offline":
        result["env_only_sps"] = env_only(module, rom, protocol, opts.num_envs, opts.steps)
        result["acting_sps"] = acting(module, agent, rom, protocol, opts.num_envs, opts.steps)
        result["learning_bound_sps"] = result["updates_per_s"] / replay_ratio
        if opts.full_loop:
            flags = ["--env-id", opts.env_id, "--moe-type", moe_type, "--num-experts", str(overrides["num_experts"]),
                     "--encoder", opts.encoder, "--num-envs", str(opts.num_envs), "--buffer-size", str(opts.buffer_size)]
            if opts.compile:
                flags += ["--compile", "--compile-mode", overrides["compile_mode"]]
            if overrides["tf32"]:
                flags += ["--tf32"]
            if overrides["lagged_actor"]:
                flags += ["--lagged-actor"]
            if overrides["gpu_replay_fraction"] is not None:
                flags += ["--gpu-replay-fraction", str(overrides["gpu_replay_fraction"])]
            if getattr(opts, "no_learning_loop", False):  # emulator + replay adds + the loop's own work (+ noisy acting)
                result["no_learning_sps"] = full_loop(script, flags, 10**9, opts.loop_steps, opts.device)["sps"]
            loop = full_loop(script, flags, opts.loop_warmup, opts.loop_warmup + opts.loop_steps, opts.device)
            result.update({"both_sps": loop["sps"], "peak_host_bytes": loop["peak_host_bytes"],
                           "peak_gpu_bytes": loop["peak_gpu_bytes"], "peak_gpu_reserved_bytes": loop["peak_gpu_reserved_bytes"]})
    result["replay_bytes_1m"] = (module.PrioritizedReplayBuffer if getattr(args, "prioritized", False)
                                 else module.ReplayBuffer).nbytes(1_000_000)
    return result


def markdown(results: list[dict], opts, machine: str) -> str:
    lines = [f"Machine: {machine}. Device: {opts.device}. Game {opts.env_id}, encoder {opts.encoder}, "
             f"{opts.num_envs} env(s), batch 32, compile "
             f"{getattr(opts, 'compile_mode', 'default') if opts.compile else 'off'}, "
             f"{'TF32' if getattr(opts, 'tf32', False) else 'float32'} matmuls and convolutions"
             f"{', lagged actor' if getattr(opts, 'lagged_actor', False) else ''}"
             f"{'' if getattr(opts, 'gpu_replay_fraction', None) is None else f', {opts.gpu_replay_fraction:g} of the replay on the GPU'}.",
             f"Command: `python benchmark/speed.py {' '.join(sys.argv[1:])}`", "",
             "| script | MoE | params | env only (steps/s) | no learning (steps/s) | acting (steps/s) | updates/s "
             "| learning-bound (steps/s) | both (steps/s) | peak host GB | peak GPU GB (allocated / reserved) "
             "| replay at 1M (GB) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda v, spec="{:,.0f}": "–" if v is None or (isinstance(v, float) and v != v) else spec.format(v)
    gb = lambda v: fmt(None if v is None else v / 1e9, "{:.2f}")
    for r in results:
        moe = r["moe_type"] + (f" ×{r['num_experts']}" if r["moe_type"] != "baseline" else "")
        lines.append(f"| {r['script']} | {moe} | {r['parameters']:,} | {fmt(r.get('env_only_sps'))} | "
                     f"{fmt(r.get('no_learning_sps'))} | {fmt(r.get('acting_sps'))} | {fmt(r['updates_per_s'], '{:,.1f}')} | {fmt(r.get('learning_bound_sps'))} | "
                     f"{fmt(r.get('both_sps'))} | {gb(r.get('peak_host_bytes'))} | {gb(r.get('peak_gpu_bytes') or None)} / {gb(r.get('peak_gpu_reserved_bytes') or None)} | "
                     f"{gb(r['replay_bytes_1m'])} |")
    lines += ["", "no learning = a real run of the script in which learning never starts (with --no-learning-loop: "
              "the emulator, replay adds and the loop's own work; Rainbow/DER act with their noisy nets, the others "
              "at random); learning-bound = updates/s divided by the replay ratio (the steps/s if acting were free); "
              "both = a real run of the script after its warm-up."]
    def counts(c: dict) -> str:
        on_gpu = c["launches_per_call"] is not None
        return f"{c['ops_per_call']:,.0f} operator calls" + (
            f", {c['launches_per_call']:,.0f} kernel launches, {c['copies_per_call']:,.0f} copies" if on_gpu else "")

    for r in results:  # where an agent step's time goes
        if r.get("profile"):
            p = r["profile"]
            lines += ["", f"Profile of {r['script']} {r['moe_type']} ({p['updates']} calls each): `update()` "
                      f"{counts(p['update'])}"
                      + "".join(f"; `{k}()` {counts(p[k])}" for k in ("act", "add") if k in p) + " per call.", "",
                      "| operator in `update()` | self ms / update | calls / update |", "|---|---|---|"]
            lines += [f"| `{t['name']}` | {t['ms_per_call']:.3f} | {t['calls_per_call']:.1f} |" for t in p["update"]["top"]]
    for r in results:  # the Atari 100k target: a whole run's time at the measured rate (evaluation not included)
        if SCRIPTS[r["script"]].kind == "atari100k" and r.get("both_sps"):
            lines.append(f"- {r['script']} {r['moe_type']}: a 100k-step run takes about "
                         f"{100_000 / r['both_sps'] / 60:,.0f} min at the 'both' rate.")
    return "\n".join(lines) + "\n"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def check_options(opts) -> None:
    """Every refusal, before anything is measured or written: one line each (speed.py: error: ...)."""
    def refuse(message: str) -> None:
        sys.exit(f"speed.py: error: {message}")

    existing = [name for name, spec in SCRIPTS.items() if spec.exists()]
    unknown = [s for s in opts.scripts if s not in SCRIPTS or not SCRIPTS[s].exists()]
    if unknown:
        refuse(f"unknown or missing scripts {unknown}; present: {existing}")
    if opts.device not in ("cpu", "cuda"):
        refuse(f"--device {opts.device!r}: use cpu or cuda")
    if opts.device == "cuda" and not torch.cuda.is_available():
        refuse("--device cuda but torch sees no GPU; use --device cpu")
    if opts.compile_mode != "default" and not (opts.compile and opts.device == "cuda"):
        refuse(f"--compile-mode {opts.compile_mode} needs --compile and --device cuda")
    if opts.profile < 0:
        refuse(f"--profile must be >= 0, got {opts.profile}")
    if opts.tf32 and opts.device != "cuda":
        refuse("--tf32 applies to --device cuda")
    for name in ("num_experts", "num_envs", "steps", "updates", "fill", "buffer_size"):
        if getattr(opts, name) < 1:  # 0 steps or updates would be timed as a rate of 0
            refuse(f"--{name.replace('_', '-')} must be at least 1, got {getattr(opts, name)}")
    if opts.no_learning_loop and not opts.full_loop:
        refuse("--no-learning-loop times a real run, which --no-full-loop skips; drop one or the other")
    if not opts.full_loop and (opts.loop_warmup is not None or opts.loop_steps is not None):
        refuse("--loop-warmup and --loop-steps size the real runs, which --no-full-loop skips; drop one or the other")
    opts.loop_warmup = 1000 if opts.loop_warmup is None else opts.loop_warmup
    opts.loop_steps = 2000 if opts.loop_steps is None else opts.loop_steps
    if opts.loop_warmup < 0 or opts.loop_steps < 1:
        refuse("--loop-warmup must be >= 0 and --loop-steps at least 1")
    online = [s for s in opts.scripts if SCRIPTS[s].kind != "offline"]
    per_env = opts.fill // opts.num_envs if online else opts.fill
    if per_env < 51:  # fill_replay writes episodes of 51 steps; updates sample n-step windows of whole frame stacks
        refuse(f"--fill {opts.fill} gives {per_env} random steps per env; at least 51 (one whole episode) are needed")
    if online and opts.fill > opts.buffer_size:
        refuse(f"--fill {opts.fill} exceeds --buffer-size {opts.buffer_size}: the replay would wrap; lower --fill or raise "
               "--buffer-size")
    if opts.out:
        out, parent = opts.out, os.path.dirname(os.path.abspath(opts.out))
        if os.path.isdir(out) or out.endswith(os.sep):
            refuse(f"--out {out} is a directory; give a file name, e.g. {os.path.join(out, 'speed.md')}")
        if os.path.splitext(out)[1] == ".json":
            refuse(f"--out {out}: the numbers go to the .json beside the table; give the table a .md name")
        if not os.path.isdir(parent):
            refuse(f"--out {out}: folder {parent} does not exist; create it first")
        if not os.access(parent, os.W_OK) or any(os.path.exists(f) and not os.access(f, os.W_OK)
                                                 for f in (out, os.path.splitext(out)[0] + ".json")):
            refuse(f"--out {out}: cannot write there")
    for script in opts.scripts:  # the scripts' own checks: game names, MoE types, flag values
        module = load_script_module(script)
        choices = typing.get_args(typing.get_type_hints(module.Args)["moe_type"])
        bad = [m for m in opts.moe_types if m not in choices]
        if bad:
            refuse(f"--moe-types {' '.join(bad)}: {script}.py has {', '.join(choices)}")
        try:
            module.resolve_rom(opts.env_id)
        except ValueError as error:
            refuse(f"--env-id: {error}")
        for moe in opts.moe_types:
            args, _ = script_args(module, moe, opts)
            try:
                module.check_args(module.with_agent_defaults(args) if hasattr(module, "with_agent_defaults") else args)
            except ValueError as error:
                refuse(f"{script}.py refuses these settings: {error}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    existing = [name for name, spec in SCRIPTS.items() if spec.exists()]
    parser.add_argument("--scripts", nargs="+", default=existing, help="scripts to measure (default: all present)")
    parser.add_argument("--moe-types", nargs="+", default=["baseline", "softmoe", "top1"], help="penultimate layers")
    parser.add_argument("--num-experts", type=int, default=8, help="experts of softmoe/top1 (baseline: 1, the plain network)")
    parser.add_argument("--encoder", default="impala", choices=["impala", "nature"], help="encoder of every network")
    parser.add_argument("--env-id", default="Breakout", help="game")
    parser.add_argument("--num-envs", type=int, default=1, help="environments stepped together")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    parser.add_argument("--compile", action="store_true", help="measure with the scripts' --compile")
    parser.add_argument("--compile-mode", default="default", choices=["default", "reduce-overhead"],
                        help="the scripts' --compile-mode (reduce-overhead: CUDA graphs)")
    parser.add_argument("--tf32", action="store_true", help="measure with the scripts' --tf32 (GPU only)")
    parser.add_argument("--lagged-actor", action="store_true",
                        help="measure with the scripts' --lagged-actor (the online scripts; acting never waits for updates)")
    parser.add_argument("--gpu-replay-fraction", type=float, default=None,
                        help="the scripts' --gpu-replay-fraction: the rest of the replay's frames in host memory")
    parser.add_argument("--steps", type=int, default=2000, help="agent steps timed for env-only and acting")
    parser.add_argument("--updates", type=int, default=50, help="gradient updates timed")
    parser.add_argument("--fill", type=int, default=5000, help="replay transitions of random frames for the update timing")
    parser.add_argument("--buffer-size", type=int, default=100_000, help="replay capacity of the measured agents")
    parser.add_argument("--profile", type=int, default=0, help="profile this many updates, acting calls and replay adds with torch.profiler (0: off)")
    parser.add_argument("--no-full-loop", dest="full_loop", action="store_false", help="skip the real runs")
    parser.add_argument("--no-learning-loop", action="store_true",
                        help="also time a real run of --loop-steps steps in which learning never starts (the loop's cost)")
    parser.add_argument("--loop-warmup", type=int, default=None, help="agent steps before learning in the real runs (default 1000)")
    parser.add_argument("--loop-steps", type=int, default=None, help="agent steps timed in the real runs (default 2000)")
    parser.add_argument("--out", default=None,
                        help="write the Markdown table to this file (its folder must exist; the numbers go to a .json "
                             "beside it)")
    opts = parser.parse_args(argv)
    check_options(opts)
    machine = (torch.cuda.get_device_name(0) if opts.device == "cuda" else
               f"{cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads") + f", torch {torch.__version__}"
    results = []
    for script in opts.scripts:
        for moe in opts.moe_types:
            results.append(measure(script, moe, opts))
            print(json.dumps(results[-1]), flush=True)
            if opts.out:  # rewritten after each row: a run stopped by a time limit keeps the rows it measured
                table = markdown(results, opts, machine)
                with open(opts.out, "w") as f:
                    f.write(table)
                with open(os.path.splitext(opts.out)[0] + ".json", "w") as f:
                    json.dump({"machine": machine, "options": vars(opts), "results": results}, f, indent=1)
    print(markdown(results, opts, machine))


if __name__ == "__main__":
    main()
