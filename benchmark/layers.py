"""Timings of single layers behind the README's speed notes: the encoders' 'SAME' padding and memory layout, the
max-pool's layout, the sum tree's update. Each figure is the best of --repeats timings of --calls calls, in ms.

    python benchmark/layers.py                                  # on the CPU
    python benchmark/layers.py --device cuda --script rainbow_softmoe

- encoder: Impala and Nature CNN, forward at batch 1 (acting) and forward + backward at batch 32 (an update's online
  pass), with the padding the scripts use (the convolution pads itself where 'SAME' is symmetric) or explicit
  padded copies (`F.pad` before every convolution and max-pool), and with channels-first or channels-last weights
  (the scripts use channels-last on the CPU);
  on a GPU also with `cudnn.benchmark` (cuDNN times its algorithms per shape) and with TF32 (`--tf32`);
- maxpool: the Impala encoder's first 3x3/2 max-pool on a batch of 32 (32x16x84x84), channels-first and -last;
- sumtree: `SumTree.update` of 3 leaves (one prioritized add with one env) and 32 (a batch's new priorities) in a
  1M-leaf tree.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmark.registry import load_script_module  # noqa: E402


def best_ms(fn, device: torch.device, calls: int, repeats: int) -> float:
    for _ in range(2):  # warm-up: lazy initialisation, oneDNN/cuDNN algorithm choice
        fn()
    best = math.inf
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, (time.perf_counter() - start) / calls * 1e3)
    return best


@contextlib.contextmanager
def cudnn_flags(benchmark: bool = False, tf32: bool = False):
    """The encoders as the scripts run them on a GPU (cuDNN's heuristic choice, float32), or with cuDNN timing each
    convolution's algorithms once per shape (`cudnn.benchmark`, no flag of the scripts yet) or with TF32 (--tf32)."""
    saved = torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.benchmark = benchmark
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@contextlib.contextmanager
def explicit_padding(module):
    """The script's encoders as they were before: every convolution and max-pool reads an F.pad copy of its input."""
    conv_forward, pool = module.SameConv2d.forward, module.same_max_pool

    def padded_conv(self, x):
        x = module.same_pad(x, self.kernel_size[0], self.stride[0])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, 1, self.groups)

    module.SameConv2d.forward = padded_conv
    module.same_max_pool = lambda x, k, s: F.max_pool2d(module.same_pad(x, k, s, value=-math.inf), k, s)
    try:
        yield
    finally:
        module.SameConv2d.forward, module.same_max_pool = conv_forward, pool


def encoder_rows(module, device, calls, repeats):
    rows = []
    for name in ("impala", "nature"):
        torch.manual_seed(0)
        for layout in (torch.contiguous_format, torch.channels_last):
            encoder = module.make_encoder(name, 1, 3).to(device, memory_format=layout)
            one, batch = torch.rand(1, 4, 84, 84, device=device), torch.rand(32, 4, 84, 84, device=device)

            def act():
                with torch.no_grad():
                    encoder(one)

            def learn():
                encoder(batch).square().mean().backward()

            variants = {"scripts": [], "explicit": [lambda: explicit_padding(module)]}
            if device.type == "cuda":  # the scripts pin cuDNN to float32 and leave its algorithm choice to heuristics
                variants = {name: [cudnn_flags, *contexts] for name, contexts in variants.items()}
                variants["scripts + cudnn.benchmark"] = [lambda: cudnn_flags(benchmark=True)]
                variants["scripts + TF32"] = [lambda: cudnn_flags(tf32=True)]
            for padding, contexts in variants.items():
                with contextlib.ExitStack() as stack:
                    for context in contexts:
                        stack.enter_context(context())
                    times = [best_ms(act, device, calls, repeats), best_ms(learn, device, max(1, calls // 5), repeats)]
                layout_name = "channels-last" if layout == torch.channels_last else "channels-first"
                rows.append(f"| {name} | {layout_name} | {padding} | {times[0]:.2f} | {times[1]:.1f} |")
    return rows


def main(argv=None) -> list[str]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--script", default="rainbow_softmoe", help="the script whose layers are timed (the "
                        "encoders are a shared block; the sum tree is Rainbow's and DER's)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--calls", type=int, default=50, help="calls per timing (a fifth of it for batch-32 passes)")
    parser.add_argument("--repeats", type=int, default=5, help="timings per figure; the best is reported")
    opts = parser.parse_args(argv)
    if opts.device not in ("cpu", "cuda") or (opts.device == "cuda" and not torch.cuda.is_available()):
        parser.error(f"--device {opts.device}: use cpu, or cuda on a machine whose torch sees a GPU")
    device = torch.device(opts.device)
    module = load_script_module(opts.script)
    command = " ".join(["python benchmark/layers.py", *(argv if argv is not None else sys.argv[1:])])
    lines = [f"Command: `{command}` (torch {torch.__version__}, {torch.get_num_threads()} threads, device {device})", "",
             "| encoder | weights | padding | forward, batch 1 (ms) | forward + backward, batch 32 (ms) |",
             "|---|---|---|---|---|", *encoder_rows(module, device, opts.calls, opts.repeats), ""]

    x = torch.randn(32, 16, 84, 84, device=device)
    lines += ["| 3x3/2 max-pool of 32x16x84x84 | ms |", "|---|---|"]
    for layout in (torch.contiguous_format, torch.channels_last):
        y = x.contiguous(memory_format=layout)
        ms = best_ms(lambda: module.same_max_pool(y, 3, 2), device, opts.calls, opts.repeats)
        lines.append(f"| {'channels-last' if layout == torch.channels_last else 'channels-first'} | {ms:.2f} |")

    if hasattr(module, "SumTree"):
        tree = module.SumTree(1_000_000, device)
        lines += ["", "| SumTree.update, 1M leaves | ms |", "|---|---|"]
        for k in (3, 32):
            leaves = torch.randint(0, 1_000_000, (k,), device=device)
            values = torch.rand(k, dtype=torch.float64, device=device)
            ms = best_ms(lambda: tree.update(leaves, values), device, opts.calls, opts.repeats)
            lines.append(f"| {k} leaves | {ms:.3f} |")
    print("\n".join(lines))
    return lines


if __name__ == "__main__":
    main()
