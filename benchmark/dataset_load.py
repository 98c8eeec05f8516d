"""Time the offline loader (cql_softmoe.py's `scan_dataset` + `load_dataset`) on a synthetic checkpoint in the DQN
Replay Dataset layout, for each `--data-selection` and data fraction. A run's first load of a file decompresses all of
it (to check its gzip checksum); a reload (`--checkpoints-per-iteration`) only up to the last row it loads: the last
episode drawn for `random` (nearly all of it), the first rows for `first`. This measures both.

    python benchmark/dataset_load.py                                   # 200k rows, fractions 0.05 and 0.5
    python benchmark/dataset_load.py --rows 1000000 --out benchmark/results/speed/cpu-dataset-load.md

The checkpoint: Dopamine's 3 zero transitions before each episode, episodes of 150-400 steps, frames of a fixed
picture and one row of noise (they compress about 60x; how well real frames compress changes the times).
"""

import argparse
import os
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmark.registry import load_script_module  # noqa: E402


def write_checkpoint(cql, root: str, rows: int, seed: int = 0) -> None:
    """One checkpoint (N = 0) of run 1 of game Pong under `root`, `rows` transitions, never wrapped."""
    log_dir = os.path.join(root, "Pong", "1", "replay_logs")
    os.makedirs(log_dir, exist_ok=True)
    rng = np.random.default_rng(seed)
    terminal, action, reward = np.zeros(rows, np.uint8), np.zeros(rows, np.int32), np.zeros(rows, np.float32)
    t = 0
    while t < rows:
        t += 3  # the zero transitions before an episode
        length = int(rng.integers(150, 401))
        end = min(t + length, rows)
        action[t:end], reward[t:end] = rng.integers(6, size=end - t), rng.integers(-1, 2, size=end - t)
        terminal[end - 1] = end - t == length
        t = end
    picture = np.zeros((84, 84), np.uint8)
    picture[10:70, 20:60] = 80

    def blocks():
        for first in range(0, rows, 10_000):
            frames = np.repeat(picture[None], min(10_000, rows - first), 0)
            frames[:, 40] = rng.integers(0, 256, (len(frames), 84), dtype=np.uint8)
            yield frames

    cql.write_npy_gz(os.path.join(log_dir, "$store$_observation_ckpt.0.gz"), shape=(rows, 84, 84), blocks=blocks())
    for name, array in [("action", action), ("reward", reward), ("terminal", terminal)]:
        cql.write_npy_gz(os.path.join(log_dir, f"$store$_{name}_ckpt.0.gz"), array)
    cql.write_npy_gz(os.path.join(log_dir, "add_count_ckpt.0.gz"), np.array(rows, np.int64))


def measure(cql, root: str, fraction: float, selection: str, workers: int, repeats: int) -> dict:
    """Best of `repeats` each: seconds to scan (checks, columns, the draw), to load (frames into the replay; the file
    read to its end for its checksum, as a run's first load) and to reload (the checksum already checked)."""
    runs = cql.find_dataset_runs(root, "Pong")[1]
    best = {}
    for _ in range(repeats):
        start = time.perf_counter()
        records = cql.scan_dataset(runs, (), fraction, 6, selection, seed=1)
        scanned = time.perf_counter()
        rb = cql.FixedReplay(sum(r["rows"] for r in records) + 8, "cpu", 3, 0.99, seed=0)
        verified = set()
        starts = cql.load_dataset(rb, records, workers=workers, verified=verified)
        loaded = time.perf_counter()
        cql.load_dataset(rb, records, workers=workers, verified=verified)
        times = {"scan_s": scanned - start, "load_s": loaded - scanned, "reload_s": time.perf_counter() - loaded}
        best = {key: min(value, best.get(key, value)) for key, value in times.items()}
        best.update({"fraction": fraction, "selection": selection, "pieces": sum(len(r["chunks"]) for r in records),
                     "rows": rb.t, "starts": starts.numel()})
    return best


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=200_000, help="transitions in the synthetic checkpoint")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.05, 0.5], help="--data-fraction values")
    parser.add_argument("--workers", type=int, default=2, help="load_dataset's reader threads (one file: one is used)")
    parser.add_argument("--repeats", type=int, default=2, help="timed loads per case; the best is reported")
    parser.add_argument("--out", default=None, help="also write the markdown table here")
    args = parser.parse_args(argv)
    if args.rows < 1000 or not all(0 < f <= 1 for f in args.fractions) or args.repeats < 1:
        parser.error("--rows must be at least 1000, --fractions in (0, 1], --repeats positive")
    cql = load_script_module("cql_softmoe")
    with tempfile.TemporaryDirectory() as root:
        start = time.perf_counter()
        write_checkpoint(cql, root, args.rows)
        size = os.path.getsize(os.path.join(root, "Pong", "1", "replay_logs", "$store$_observation_ckpt.0.gz"))
        written = time.perf_counter() - start
        results = [measure(cql, root, f, s, args.workers, args.repeats) for f in args.fractions for s in ("first", "random")]
    lines = [f"Synthetic checkpoint: {args.rows:,} transitions, frames {size / 1e6:.0f} MB gzipped (written in "
             f"{written:.0f} s); {os.cpu_count()} cores, {args.workers} reader thread(s), best of {args.repeats}.",
             f"Command: `python benchmark/dataset_load.py {' '.join(argv if argv is not None else sys.argv[1:])}`", "",
             "| --data-fraction | --data-selection | pieces | rows | sample starts | scan (s) | load (s) | reload (s) |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['fraction']:g} | {r['selection']} | {r['pieces']:,} | {r['rows']:,} | {r['starts']:,} | "
              f"{r['scan_s']:.2f} | {r['load_s']:.2f} | {r['reload_s']:.2f} |" for r in results]
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(table)
    return table


if __name__ == "__main__":
    main()
