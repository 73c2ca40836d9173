#!/usr/bin/env bash
# tools/gpu_check.sh: everything this project checks on a GPU, in one call of at
# most ~10 minutes (GPU machines are lent briefly; one run should give the whole
# picture). Run from anywhere; it works in the repository root.
#
# Steps, in order (each with its own timeout, all within GPU_CHECK_BUDGET s):
#   build      LLMIO_CUDA=ON python3 -m pip install --no-build-isolation --no-deps .
#   info       llmio_native.info()["cuda"] (driver required/found, usable, why not)
#   gpu_gate   nvidia-smi sees a GPU and our _cuda module is usable (else every GPU
#              step below is "skipped" and the run fails: nothing GPU ran)
#   pytest_cuda        pytest -m cuda (side-stream and default-stream kernel, loader tests)
#   memcheck_rans      compute-sanitizer --tool memcheck: tests/test_codec_rans.py and
#                      tests/test_codec_rans1.py -m cuda
#   memcheck_int8      compute-sanitizer --tool memcheck: tests/test_quant_cuda.py
#   bench_codec        benchmarks/bench_codec.py --quick (GPU rows must be measured)
#   bench_loader       benchmarks/bench_loader.py --device cuda (small corpus)
#   bench_ddp_hook     benchmarks/bench_ddp_hook.py (small sizes; CUDA kernel rows)
#   bench_checkpoint   benchmarks/bench_checkpoint.py (256 MiB; load_file device=cuda rows)
# A failed step does not stop the run. At the end: one table (step, status,
# seconds) and exit status 0 only when every step passed; 2 when no GPU step ran.
#
# Environment: GPU_CHECK_BUDGET (seconds, default 570), GPU_CHECK_SKIP_BUILD=1
# (do not install: use the tree's python/ when its modules are built there, else the
# installed package; for CPU tests of
# this script), GPU_CHECK_LOG_DIR (per-step logs; default a temp dir).
set -u -o pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
ROOT=$(pwd)
BUDGET=${GPU_CHECK_BUDGET:-570}
LOG_DIR=${GPU_CHECK_LOG_DIR:-$(mktemp -d /tmp/gpu_check.XXXXXX)}
mkdir -p "$LOG_DIR"
START=$SECONDS
PY=${PYTHON:-python3}
if [ "${GPU_CHECK_SKIP_BUILD:-0}" = 1 ] && compgen -G "$ROOT/python/llmio_native/_core*.so" >/dev/null; then
  # a development tree with its modules built in place; otherwise the installed package
  export PYTHONPATH="$ROOT/python${PYTHONPATH:+:$PYTHONPATH}"
fi

NAMES=() STATUS=() SECS=()
GPU_RAN=0
record() { NAMES+=("$1"); STATUS+=("$2"); SECS+=("$3"); }

# run_step NAME TIMEOUT CHECK CMD...: runs CMD under `timeout`, logs to LOG_DIR/NAME.log,
# echoes its tail on failure. CHECK (a function name or "-") may turn a zero exit into a
# failure after looking at the log (e.g. "GPU rows not measured").
run_step() {
  local name=$1 limit=$2 check=$3; shift 3
  local left=$((BUDGET - (SECONDS - START)))
  if [ "$left" -lt 15 ]; then
    record "$name" "skipped (out of time budget)" 0
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  local log="$LOG_DIR/$name.log" t0=$SECONDS rc
  echo "=== [$name] (timeout ${limit}s): $*"
  timeout --kill-after=10 "$limit" "$@" >"$log" 2>&1
  rc=$?
  local st
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    st="FAIL (timeout ${limit}s)"
  elif [ $rc -ne 0 ]; then
    st="FAIL (exit $rc)"
  else
    st="ok"
    if [ "$check" != "-" ]; then
      local why
      why=$("$check" "$log") || st="FAIL ($why)"
    fi
  fi
  [ "$st" = ok ] || tail -n 25 "$log" | sed "s/^/    [$name] /"
  record "$name" "$st" $((SECONDS - t0))
}

# Checks on a step's log: print why and return 1 to fail it.
pytest_ran() {  # all skipped or nothing collected is not a pass on a GPU machine
  grep -Eq "[0-9]+ passed" "$1" || { echo "no test passed"; return 1; }
}
sanitizer_clean() {
  pytest_ran "$1" || return 1
  grep -Eq "ERROR SUMMARY: [1-9]" "$1" && { echo "memcheck errors"; return 1; }
  return 0
}
# The benchmarks print these lines when they leave their GPU rows out.
codec_gpu_rows() { ! grep -q "rans GPU: not measured" "$1" || { echo "GPU rows not measured"; return 1; }; }
loader_gpu_rows() { ! grep -q "CUDA rows skipped" "$1" || { echo "CUDA rows skipped"; return 1; }; }
ddp_gpu_rows() { ! grep -q "CUDA kernels: not measured" "$1" || { echo "CUDA kernel rows not measured"; return 1; }; }
ckpt_gpu_rows() { grep -q "cuda load_file / min(read limit, pinned H2D)" "$1" || { echo "CUDA rows not measured"; return 1; }; }

# ---------------------------------------------------------------- build + info
if [ "${GPU_CHECK_SKIP_BUILD:-0}" = 1 ]; then
  record build "skipped (GPU_CHECK_SKIP_BUILD=1; tree's python/)" 0
else
  run_step build 300 - env LLMIO_CUDA=ON "$PY" -m pip install --no-build-isolation --no-deps .
fi
# Outside the tree, so the installed package is the one imported (unless SKIP_BUILD).
run_step info 60 - bash -c "cd / && \"$PY\" -c 'import llmio_native; print(llmio_native.info()[\"cuda\"])'"
[ -f "$LOG_DIR/info.log" ] && sed 's/^/    [info] /' "$LOG_DIR/info.log" | tail -n 5

# ---------------------------------------------------------------- is there a GPU we can use?
GPU_WHY=""
if ! command -v nvidia-smi >/dev/null 2>&1; then
  GPU_WHY="no GPU: nvidia-smi not found"
elif ! nvidia-smi -L 2>/dev/null | grep -q "^GPU"; then
  GPU_WHY="no GPU: nvidia-smi lists none"
else
  GPU_WHY=$(cd / && "$PY" -c 'from llmio_native import _native
ok, why = _native.cuda_usable()
print("" if ok else "our _cuda is unusable: " + why)' 2>&1 | tail -n 1) || GPU_WHY="cannot import llmio_native"
fi
t0=$SECONDS
if [ -z "$GPU_WHY" ]; then
  record gpu_gate ok $((SECONDS - t0))
else
  record gpu_gate "FAIL ($GPU_WHY)" $((SECONDS - t0))
fi

GPU_STEPS=(pytest_cuda memcheck_rans memcheck_int8 bench_codec bench_loader bench_ddp_hook bench_checkpoint)
if [ -n "$GPU_WHY" ]; then
  for s in "${GPU_STEPS[@]}"; do record "$s" "skipped ($GPU_WHY)" 0; done
else
  GPU_RAN=1
  # No caching allocator under memcheck: an overrun into a cached neighbour would go unseen.
  SAN=(env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 1 --print-limit 20)
  command -v compute-sanitizer >/dev/null 2>&1 || SAN=()
  run_step pytest_cuda 150 pytest_ran "$PY" -m pytest -q -m cuda -p no:cacheprovider tests
  if [ ${#SAN[@]} -eq 0 ]; then
    record memcheck_rans "FAIL (compute-sanitizer not found)" 0
    record memcheck_int8 "FAIL (compute-sanitizer not found)" 0
  else
    run_step memcheck_rans 120 sanitizer_clean "${SAN[@]}" "$PY" -m pytest -q -m cuda -p no:cacheprovider \
      tests/test_codec_rans.py tests/test_codec_rans1.py
    run_step memcheck_int8 120 sanitizer_clean "${SAN[@]}" "$PY" -m pytest -q -p no:cacheprovider \
      tests/test_quant_cuda.py
  fi
  run_step bench_codec 90 codec_gpu_rows "$PY" benchmarks/bench_codec.py --quick --datasets zipf-50257
  run_step bench_loader 90 loader_gpu_rows "$PY" benchmarks/bench_loader.py --device cuda --size-gib 0.05 --zstd-gib 0.02 \
    --batches 100 --dir "$LOG_DIR/loader"
  run_step bench_ddp_hook 60 ddp_gpu_rows "$PY" benchmarks/bench_ddp_hook.py --numel $((1 << 22)) --reps 3 \
    --wire-numel $((1 << 20)) --measure-numel $((1 << 16)) --gpt-steps 0
  run_step bench_checkpoint 120 ckpt_gpu_rows "$PY" benchmarks/bench_checkpoint.py --size 256MiB --no-dcp
fi

# ---------------------------------------------------------------- summary
echo
printf '%-16s %-60s %8s\n' step status seconds
printf '%-16s %-60s %8s\n' ---- ------ -------
fail=0
for i in "${!NAMES[@]}"; do
  printf '%-16s %-60s %8s\n' "${NAMES[$i]}" "${STATUS[$i]:0:60}" "${SECS[$i]}"
  case "${STATUS[$i]}" in ok|skipped\ \(GPU_CHECK_SKIP_BUILD*) ;; *) fail=1 ;; esac
done
echo "total $((SECONDS - START)) s; logs in $LOG_DIR"
if [ $GPU_RAN = 0 ]; then
  echo "NO GPU STEP RAN ($GPU_WHY): this run checked the build and info() only."
  exit 2
fi
[ $fail = 0 ] && echo "all steps passed" || echo "SOME STEPS FAILED"
exit $fail
