#!/usr/bin/env bash
# The GPU measurements of the README's section "Speed and memory (`benchmark/speed.py`)", prepared to run in one go
# on a lent GPU machine that has torch but no ale-py, gymnasium or tyro and no network (that section's last paragraph):
#
#   here, once:   ../shared/tools/device-wheels.sh                # fills .whl/ (ignored by git)
#   on the GPU:   bash benchmark/gpu_session.sh [PHASE...]         # carry .whl; results go to $OUT
#
# PHASE (default: envs1 envs8 atari100k profile lagged: the issue's targets first, then the profile that explains them,
# then the first remedy; never run on a GPU yet, estimated 7-10 minutes on an H100: give the device call timeout_s 600,
# BUDGET below ends the command in time with what it measured; then, if device time is left, the phases it skipped,
# and `compile` and `graphs` (each compiles 2-3 scripts: minutes), in other calls):
#   envs1     dqn/rainbow, Impala, baseline vs Soft MoE x8, 1 env (the paper's setting), eager
#   lagged    the GPU cases of tests/test_actor.py (the lagged actor's own stream acts with its last refresh's
#             parameters), then dqn/rainbow Soft MoE x8, 1 env, --lagged-actor (updates hidden behind acting), with
#             the rate of the loop that never learns (the ceiling once learning is hidden)
#   envs8     the same with --num-envs 8
#   compile   the GPU cases of tests/test_compile.py (eager = compiled, with and without CUDA graphs; TF32 close to
#             float32; the replay's asynchronous copies), then dqn/rainbow Soft MoE x8, 1 env, --compile, with launch
#             counts per update, act and add (compile.md)
#   graphs    dqn/rainbow Soft MoE x8, 1 env, --compile --compile-mode reduce-overhead (CUDA graphs for the step and
#             acting, with launch counts; graphs.md), der the same with its 100k-run time (der-graphs.md), dqn/rainbow
#             with --lagged-actor too (graphs-lagged.md: the setting meant to reach 80% of the env-only rate), and
#             with --tf32 (tf32.md)
#   atari100k der/drq, Impala, Soft MoE x8 (the slower network), 1 env, and der with --lagged-actor: a 100k run's time
#   profile   rainbow/der Soft MoE x8, Impala: 20 updates, acts and adds under torch.profiler (kernel launches per call),
#             then benchmark/layers.py (padding and channels-last vs channels-first, the sum tree; in numbers.tar)
#   split     the GPU cases of tests/test_replay.py (a replay split between GPU and host memory samples the batches of
#             one on the GPU alone), then dqn/rainbow/cql Soft MoE x8, 1 env, --gpu-replay-fraction 0 (every frame
#             read from host memory: the split's largest cost; compare with envs1)
# Each phase writes $OUT/<phase>.md (benchmark/speed.py --out, rewritten after each row); its .json numbers and its log
# go into $OUT/numbers.tar as soon as it ends (with machine.txt, at most 8 files for all phases: the device tool brings
# back 8); copy them to benchmark/results/speed/<gpu>-<phase>.md and commit. BUDGET (seconds, default 560: a device
# call's 600 s less the wheels' install and the transfers) bounds the whole command: a phase that would start with
# under 45 s left is skipped, and one still running when the budget ends is stopped (its finished rows stay), so the
# call always returns what it measured. QUICK=1 shrinks every count (a smoke test of this file on any machine; the
# numbers mean nothing then; no budget unless BUDGET is set).
set -uo pipefail
cd "$(dirname "$0")/.."
phases=("$@")
[ ${#phases[@]} -eq 0 ] && phases=(envs1 envs8 atari100k profile lagged)
for p in "${phases[@]}"; do
  case $p in
    envs1|lagged|envs8|compile|graphs|atari100k|profile|split) ;;
    *) echo "gpu_session.sh: unknown phase '$p' (envs1, lagged, envs8, compile, graphs, atari100k, profile, split)"; exit 2 ;;
  esac
done
OUT=${OUT:-gpu-results}
if [ "${QUICK:-0}" = 1 ]; then BUDGET=${BUDGET:-100000}; else BUDGET=${BUDGET:-560}; fi
[[ "$BUDGET" =~ ^[0-9]+$ ]] || { echo "gpu_session.sh: BUDGET must be a number of seconds, got '$BUDGET'"; exit 2; }
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then  # the wheels the GPU machine lacks (device-wheels.sh)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -c "import ale_py, gymnasium, tyro, torch" || { echo "gpu_session.sh: missing packages; run device-wheels.sh and carry .whl"; exit 1; }
{ nvidia-smi || true; python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; } > "$OUT/machine.txt" 2>&1

if [ "${QUICK:-0}" = 1 ]; then
  counts=(--steps 200 --updates 3 --fill 500) loops=(--loop-warmup 100 --loop-steps 100)
else
  counts=(--steps 3000 --updates 200 --fill 10000) loops=(--loop-warmup 1000 --loop-steps 3000)
fi
device=$(python3 -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")

left() { echo $((BUDGET - SECONDS)); }

enough() {  # enough NAME: whether NAME may start (45 s of the budget left), else a line saying it is skipped
  [ "$(left)" -ge 45 ] || { echo "== $1 skipped: $(left) s of the ${BUDGET} s budget left"; return 1; }
}

bounded() {  # bounded NAME COMMAND...: run COMMAND within the budget left (its whole process group stopped at the end)
  local name=$1
  shift
  enough "$name" || return 1
  timeout -k 10 "$(left)" "$@"
  local status=$?
  [ $status -eq 124 ] || [ $status -eq 137 ] && echo "== $name stopped: the ${BUDGET} s budget ran out"
  return $status
}

phase() {  # phase NAME [speed.py flags...]: one table, its log, and a line saying how long it took
  local name=$1 start=$SECONDS
  shift
  enough "$name" || return 0
  local sizes=("${counts[@]}")
  [[ " $* " == *" --no-full-loop "* ]] || sizes+=("${loops[@]}")  # speed.py refuses loop sizes without the real runs
  echo "== $name: python benchmark/speed.py --device $device ${sizes[*]} $*"
  bounded "$name" python3 benchmark/speed.py --device "$device" "${sizes[@]}" "$@" --out "$OUT/$name.md" 2>&1 \
    | tee "$OUT/$name.log"
  for f in "$name.json" "$name.log"; do  # into one archive at once: a call cut off by its time limit keeps them
    [ -f "$OUT/$f" ] && (cd "$OUT" && tar -rf numbers.tar "./$f" && rm -f "./$f")
  done
  echo "== $name took $((SECONDS - start)) s"
}

gpu_tests() {  # the GPU cases of a test file: each failure's line and the summary (pytest.ini already adds -q)
  bounded "tests $*" python3 -m pytest -p no:cacheprovider -rfE "$@" 2>&1 \
    | grep -E "^(FAILED|ERROR) | (passed|failed|skipped|deselected|error)" | tail -n 20
}

for p in "${phases[@]}"; do
  case $p in
    envs1) phase envs1 --scripts dqn_softmoe rainbow_softmoe --moe-types baseline softmoe --num-envs 1 ;;
    lagged)
      gpu_tests tests/test_actor.py -k cuda
      phase lagged --scripts dqn_softmoe rainbow_softmoe --moe-types softmoe --num-envs 1 --lagged-actor \
        --no-learning-loop ;;
    envs8) phase envs8 --scripts dqn_softmoe rainbow_softmoe --moe-types baseline softmoe --num-envs 8 ;;
    compile)  # compiled = eager on the GPU (CUDA graphs too; the GPU cases only), then the compiled speed
      gpu_tests tests/test_compile.py -k "cuda or gpu or tf32"
      phase compile --scripts dqn_softmoe rainbow_softmoe --moe-types softmoe --num-envs 1 --compile --profile 20 ;;
    graphs)
      phase graphs --scripts dqn_softmoe rainbow_softmoe --moe-types softmoe --num-envs 1 --compile \
        --compile-mode reduce-overhead --profile 20
      phase der-graphs --scripts der_softmoe --moe-types softmoe --num-envs 1 --compile --compile-mode reduce-overhead \
        --profile 20
      phase graphs-lagged --scripts dqn_softmoe rainbow_softmoe --moe-types softmoe --num-envs 1 --compile \
        --compile-mode reduce-overhead --lagged-actor
      phase tf32 --scripts dqn_softmoe rainbow_softmoe --moe-types softmoe --num-envs 1 --compile \
        --compile-mode reduce-overhead --tf32 ;;
    atari100k)
      phase atari100k --scripts der_softmoe drq_softmoe --moe-types softmoe --num-envs 1
      phase atari100k-lagged --scripts der_softmoe --moe-types softmoe --num-envs 1 --lagged-actor ;;
    profile) phase profile --scripts rainbow_softmoe der_softmoe --moe-types softmoe --num-envs 1 --no-full-loop \
      --profile 20
      bounded layers python3 benchmark/layers.py --device "$device" > "$OUT/layers.md" 2>&1; tail -n 25 "$OUT/layers.md"
      (cd "$OUT" && tar -rf numbers.tar ./layers.md && rm -f ./layers.md) ;;  # the 8 files that come back are taken
    split)
      gpu_tests tests/test_replay.py -k cuda
      phase split --scripts dqn_softmoe rainbow_softmoe cql_softmoe --moe-types softmoe --num-envs 1 \
        --gpu-replay-fraction 0 ;;
  esac
done
ls -l "$OUT"
