#!/usr/bin/env bash
# The GPU machine's check: environment, GPU tests, benchmarks, then a summary table.
#
#   scripts/gpu_check.sh [GROUP ...]      (default: tests)
#
# Groups (each sized to fit a 10-minute call on one H100, presets made on first use):
#   env         nvidia-smi and versions only (always printed first)
#   tiny        tiny-llama throughput + latency: checks this script and the bench plumbing (seconds)
#   tests       python3 -m pytest -q -m gpu, file by file, kernels first, TEST_WORKERS processes a file
#               (default 4; ~10 min in all with one); TEST_FILES="tests/a.py ..." and TEST_K="pytest -k
#               expression" split it over calls
#   profile     scripts/profile_step.py: host phases vs GPU kernels of a decode step, 1B and 8B (~2-4 min);
#               PROFILE_RUNS, PROFILE_MIXED (a 2048/128-like mixed step) choose the steps
#   smoke       llama-3.2-1b: latency bs=1 and a small 128/128 throughput, kiln only  (~1-2 min)
#   latency     bs=1 ISL 128 / 256 new: llama-3.2-1b and llama-3.1-8b, kiln + transformers peer (~5-8 min)
#   throughput  llama-3.1-8b 128/128 x 10,000 requests, max batch 1024, kiln + transformers peer on 256
#               (~4-6 min)
#   workloads   llama-3.1-8b 128/2048 x 512, 2048/128 x 1024, 2048/2048 x 512, kiln only (WORKLOADS changes
#               them: "ISL/OSLxREQUESTS ..."; ~8-10 min: split over two calls when they run slow)
#   ttft        llama-3.1-8b TTFT of one 2,048-token prompt: default, without prompt graphs, Triton attention
#               alone (~2-3 min)
#   nano        qwen3-0.6b nano-vllm workload (256 requests), kiln + peer on 64        (~2-4 min)
#   gemm        scripts/bench_skinny_gemm.py: decode-sized linears, cuBLAS vs the skinny GEMM and the GEMV,
#               on GEMM_PRESETS (default 1B and 8B; GEMM_ARGS, e.g. "--rows 1 --sweep"), then bs-1 latency of
#               each of GEMM_E2E (default "default fused cublas": the default linear, GEMV at one row; plus the
#               GEMV's norm and SiLU-and-mul prologues; cuBLAS for every projection; "eager": the default
#               without torch.compile; "nopdl": the default with KILN_PDL=0; "preN", e.g. pre4096: the GEMV
#               fetching N elements of K before its PDL wait, KILN_GEMV_PREFETCH_K=N) (~6-8 min)
#   ab          bs-1 latency A/B on one machine: LATENCY_MODELS with this tree, then with the files in AB_DIR
#               (default ab_base/, made by scripts/ab_prepare.sh) in place (AB_ROUNDS times; ~1-1.5 min a run)
#   variants    scripts/decode_variants.py: decode-step time under several launch settings (VARIANTS) in one
#               engine, in turns, VARIANT_MODELS at batch VARIANT_BATCH, context VARIANT_ISL (~1-2 min a model)
#   hostprof    bs-1 latency of HOSTPROF_MODELS (default llama-3.2-1b; HOSTPROF_ARGS replaces its workload) under cProfile
#               (--host-profile): where a step's host time goes, printed by own and cumulative time (~1.5 min)
#   pgemm       scripts/bench_prefill_gemm.py: a layer's projections on cuBLAS at mixed-step sizes (PGEMM_ROWS,
#               default 8150 8192 8320 8448 8580 8712 rows): whether a token budget of whole waves pays (~1 min);
#               PGEMM_ARGS="--residual --rows 2048 8448": o and down with the residual add in cuBLAS's epilogue
#   gsilu       scripts/bench_gemm_silu_mul.py: the gate|up GEMM with SiLU-and-mul in its epilogue against cuBLAS
#               + silu_and_mul, 1B and 8B shapes at 2,048-8,448 rows (GSILU_ARGS, default --sweep; ~1-2 min)
#   mbatch      scripts/bench_microbatch_overlap.py: a 2048/128 mixed step's layers as one batch against its decode
#               rows and its prompts as two micro-batches on two streams (MBATCH_ARGS; ~1 min)
#   mlp         scripts/bench_mlp_chunks.py: an 8,192-token step's gated MLP whole vs in token chunks (~1 min)
#   attn        scripts/bench_attention.py: paged attention's prefill launch configurations swept on 8B heads
#               (prefill, chunk and mixed steps), torch SDPA backends as peers (~2-3 min)
#   serve       `kiln serve` llama-3.1-8b + `kiln bench serve` ISL/OSL 1024, Poisson rates 2 4 6 (~5-7 min;
#               SERVE_MODEL, SERVE_ISL, SERVE_OSL, SERVE_RATES, SERVE_REQUESTS change it);
#               the server's packages come as wheels in .whl/ (see benchmarks/README.md) when not installed
#   all         every group above, in that order (longer than one call: use it on a long lease)
#
# Reports go to $OUT (./out when unset): one JSON and one log per benchmark, pytest's log, and
# summary.txt. Environment: PYTHON (default python3), BENCH_TIMEOUT / TEST_TIMEOUT (seconds per
# benchmark / for the tests), HF=0 to skip the transformers peers, PRESET_CACHE (preset directory),
# PACK=1 to leave only summary.txt and results.tar.gz (everything else) in $OUT.
# No installation: the repository runs from its tree (PYTHONPATH=.).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-./out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-420}
TEST_TIMEOUT=${TEST_TIMEOUT:-570}  # one worker a file: ~10 min on an H100 (2026-11-27), past one call
PEER=$([ "${HF:-1}" = "0" ] && echo kiln || echo both)
CACHE_ARGS=()
[ -n "${PRESET_CACHE:-}" ] && CACHE_ARGS=(--preset-cache "$PRESET_CACHE")
# the bs-1 latency workload (ISL 128, OSL 256); LATENCY_ITERATIONS measured iterations, the median counts
# (the 1B's iterations spread by up to ~20% on one machine: host hiccups show at a ~1.2 ms step)
BS1=(--isl 128 --osl 256 --batch-size 1 --iterations "${LATENCY_ITERATIONS:-9}")
STATUS_FILE="$OUT/status.tsv"
: >"$STATUS_FILE"
T_START=$(date +%s)

note() { echo "== [$(($(date +%s) - T_START)) s] $*"; }

env_info() {
  note "environment"
  nvidia-smi || echo "nvidia-smi failed"
  "$PY" - <<'EOF'
import platform
import torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda)
for mod in ("triton", "transformers", "numpy", "safetensors", "tokenizers"):
    try:
        print(f"{mod} {__import__(mod).__version__}")
    except Exception as e:  # noqa: BLE001
        print(f"{mod}: not importable ({e})")
if torch.cuda.is_available():
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        print(f"cuda:{i} {p.name}, {p.total_memory / 2**30:.1f} GiB, {p.multi_processor_count} SMs")
else:
    print("no CUDA device visible")
EOF
  echo "commit: $(git describe --always --dirty 2>/dev/null || echo "not a git checkout")"
}

run_tests() {
  # One pytest run per file, kernels first, sharing TEST_TIMEOUT: a file that runs out of time still
  # leaves the earlier files' results and failure reports (pytest prints them only at its end).
  # Inside a file, TEST_WORKERS pytest-xdist worker processes (default 4, when xdist is present) share
  # the card: the engine tests spend most of their time on the host (start-up, compiles, capture), and
  # they cap their KV pools so several fit. A device-side assert fails its own test and a fresh worker
  # runs the rest, instead of every later test losing the CUDA context.
  local iso=() files=() f t_end=$(($(date +%s) + TEST_TIMEOUT)) worst=0 rc left
  if ! "$PY" -c "import xdist" 2>/dev/null && ls .whl/pytest_xdist-*.whl >/dev/null 2>&1; then
    note "installing pytest-xdist from .whl/"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/kiln-test-site \
      .whl/pytest_xdist-*.whl .whl/execnet-*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/kiln-test-site"
  fi
  "$PY" -c "import xdist" 2>/dev/null && iso=(-n "${TEST_WORKERS:-4}" --max-worker-restart 100)
  [ ${#iso[@]} = 0 ] && note "pytest-xdist is missing: one process a file (carry .whl, see benchmarks/README.md)"
  # TEST_FILES picks files, TEST_K a pytest -k expression: the whole suite is close to one call's limit
  for f in ${TEST_FILES:-tests/test_triton_kernels.py $(grep -l "mark.gpu" tests/test_*.py | grep -v test_triton_kernels.py)}; do
    files+=("$f")
  done
  local sel=()
  [ -n "${TEST_K:-}" ] && sel=(-k "$TEST_K")
  note "pytest -m gpu, ${#files[@]} files (timeout ${TEST_TIMEOUT} s in all)"
  : >"$OUT/pytest_gpu.log"
  for f in "${files[@]}"; do
    left=$((t_end - $(date +%s)))
    if [ "$left" -le 10 ]; then
      echo "$f: not run (the test time ran out)" | tee -a "$OUT/pytest_gpu.log"
      worst=124
      continue
    fi
    timeout --kill-after=20 "$left" "$PY" -m pytest -q -rfE --tb=short --durations=8 -m gpu "$f" "${sel[@]}" -p no:cacheprovider "${iso[@]}" \
      --junitxml="$OUT/pytest_gpu_$(basename "$f" .py).xml" 2>&1 | grep -v -e PytestBenchmarkWarning -e "warner(" \
      | tee -a "$OUT/pytest_gpu.log"
    rc=${PIPESTATUS[0]}
    [ "$rc" = 5 ] && rc=0  # no GPU test selected in that file
    [ "$rc" != 0 ] && worst=$rc
    echo "$f: rc=$rc" | tee -a "$OUT/pytest_gpu.log"
  done
  printf 'pytest-gpu\t%s\t%s\n' "$worst" "$(grep -E "^tests/.*: (rc|not run)" "$OUT/pytest_gpu.log" | tr '\n' ' ')" \
    >>"$STATUS_FILE"
}

# bench NAME ARGS...: one `kiln bench` run, its JSON and log under $OUT, bounded by a timeout.
bench() {
  local name=$1
  shift
  note "bench $name: kiln bench $* (timeout ${BENCH_TIMEOUT} s)"
  local t0=$(date +%s)
  # STEP_LOGS=1: the engine's per-step lines (KILN_STEP_LOG) beside each report, as NAME.steps.tsv
  KILN_STEP_LOG=${STEP_LOGS:+$OUT/$name.steps.tsv} timeout --kill-after=30 "$BENCH_TIMEOUT" "$PY" -m kiln.cli bench \
    "$@" "${CACHE_ARGS[@]}" --json "$OUT/$name.json" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  local why=ok
  [ "$rc" = 124 ] || [ "$rc" = 137 ] && why="timed out after ${BENCH_TIMEOUT} s"
  [ "$rc" != 0 ] && [ "$why" = ok ] && why="failed: $(grep -m1 -E 'Error|error' "$OUT/$name.log" | cut -c1-160)"
  printf '%s\t%s\t%s (%s s)\n' "$name" "$rc" "$why" "$(($(date +%s) - t0))" >>"$STATUS_FILE"
}

tiny() {
  bench tiny_throughput throughput --model preset:tiny-llama --num-requests 16 --isl 32 --osl 16 --backend "$PEER" \
    --hf-batch-size 8
  bench tiny_latency latency --model preset:tiny-llama --isl 16 --osl 16 --iterations 2 --backend "$PEER"
}

smoke() {
  bench smoke_latency_llama1b latency --model preset:llama-3.2-1b --isl 128 --osl 128 --iterations 3
  bench smoke_throughput_llama1b throughput --model preset:llama-3.2-1b --num-requests 128 --isl 128 --osl 128
}

hostprof() {
  # HOSTPROF_ARGS replaces the bs-1 workload, e.g. "--isl 2048 --osl 16 --batch-size 1" (a TTFT run)
  local m args=("${BS1[@]}")
  [ -n "${HOSTPROF_ARGS:-}" ] && read -ra args <<<"$HOSTPROF_ARGS"
  for m in ${HOSTPROF_MODELS:-llama-3.2-1b}; do
    bench "hostprof_${m}_bs1" latency --model "preset:$m" "${args[@]}" --host-profile "$OUT/hostprof_$m.prof"
    "$PY" -m kiln.executor.host_profile "$OUT/hostprof_$m.prof" 40 >"$OUT/hostprof_$m.txt" 2>&1
    head -120 "$OUT/hostprof_$m.txt"
  done
}

latency() {
  # LATENCY_MODELS: presets to run (default: llama-3.2-1b llama-3.1-8b)
  for m in ${LATENCY_MODELS-llama-3.2-1b llama-3.1-8b}; do  # LATENCY_MODELS="" skips them
    bench "latency_${m}_bs1" latency --model "preset:$m" "${BS1[@]}" --backend "$PEER"
  done
}

throughput() {
  # MAX_BATCH: the engine's max batch size for this run (default 1024: 17,202 output tok/s against
  # 16,771 at kiln bench's own default of 512 on an H100, benchmarks/RESULTS.md);
  # NUM_REQUESTS: requests (default 10,000, ~75 s of run; TensorRT-LLM's published 128/128 runs queue 30,000)
  local mb=${MAX_BATCH:-1024} n=${NUM_REQUESTS:-10000}
  bench "throughput_llama8b_128_128${MAX_BATCH:+_bs$mb}${NUM_REQUESTS:+_n$n}" throughput --model preset:llama-3.1-8b \
    --isl 128 --osl 128 --num-requests "$n" --max-batch-size "$mb" --backend "$PEER" --hf-num-requests 256 \
    --hf-batch-size 64
}

workloads() {
  # WORKLOADS: "ISL/OSLxREQUESTS ..." llama-3.1-8b throughput runs (default: the three long targets);
  # WORKLOAD_ARGS: extra options for each, e.g. "--kv-fraction 0.95"
  local w isl osl n
  for w in ${WORKLOADS:-128/2048x512 2048/128x1024 2048/2048x512}; do
    isl=${w%%/*}; osl=${w#*/}; osl=${osl%%x*}; n=${w##*x}
    bench "throughput_llama8b_${isl}_${osl}" throughput --model preset:llama-3.1-8b --isl "$isl" --osl "$osl" \
      --num-requests "$n" --backend kiln ${WORKLOAD_ARGS:-}
  done
}

ttft() {
  # time to first token of one 2,048-token prompt (target 48 ms on an H100; bound 41 ms); TTFT_ARGS: extra
  # options for the first run, e.g. "--plugin linear_silu_mul=gemm_silu_mul"
  bench ttft_llama8b_2048 latency --model preset:llama-3.1-8b --isl 2048 --osl 16 --batch-size 1 --backend kiln \
    ${TTFT_ARGS:-}
  # the default without its prompt graph (the prefill through the piecewise graphs, attention eager)
  (export KILN_PROMPT_GRAPHS=0
   bench ttft_llama8b_2048_no_prompt_graph latency --model preset:llama-3.1-8b --isl 2048 --osl 16 --batch-size 1 \
     --backend kiln ${TTFT_ARGS:-})
  # the same with the Triton attention kernel alone (the default sends a lone fresh prompt to cuDNN)
  bench ttft_llama8b_2048_triton_attention latency --model preset:llama-3.1-8b --isl 2048 --osl 16 --batch-size 1 \
    --backend kiln --plugin attention=paged_attention
}

nano() {
  bench throughput_qwen3_nano_vllm throughput --model preset:qwen3-0.6b --workload nano-vllm \
    --backend "$PEER" --hf-num-requests 64 --hf-batch-size 64
}

profile() {
  # PROFILE_RUNS: "preset:batch ..." decode steps, "preset:batch:isl" prefill steps of batch x isl tokens,
  # "preset:batch:isl:eager" without piecewise graphs (isl 0: decode) (default: 1B and 8B decode, batch 1 and 64;
  # "" runs none); PROFILE_MIXED="D:C:P:L ...": 8B mixed steps of D decode rows at context ~C and P fresh prompts of
  # L tokens (150:2048:4:2000 is a 2048/128 run's mixed step); PROFILE_SEQUENCE=START:COUNT also lists those
  # kernels of a prefill in device order with the idle gap before each (--sequence)
  for run in ${PROFILE_RUNS-llama-3.2-1b:1 llama-3.2-1b:64 llama-3.1-8b:1 llama-3.1-8b:64}; do
    local m b isl mode extra=() name
    IFS=: read -r m b isl mode <<<"$run"
    name="profile_${m}_bs$b"
    [ -n "$isl" ] && [ "$isl" != 0 ] && extra=(--prefill --isl "$isl") && name="${name}_prefill$isl"
    [ "$mode" = eager ] && extra+=(--no-piecewise-graphs) && name="${name}_no_piecewise"
    [ -n "${PROFILE_SEQUENCE:-}" ] && extra+=(--sequence "$PROFILE_SEQUENCE")
    note "profile $m batch $b ${isl:+prefill $isl}: scripts/profile_step.py"
    timeout --kill-after=30 "$BENCH_TIMEOUT" "$PY" scripts/profile_step.py --model "preset:$m" --batch-size "$b" \
      "${extra[@]}" "${CACHE_ARGS[@]}" 2>&1 | tee "$OUT/$name.log"
    printf '%s\t%s\t%s\n' "$name" "${PIPESTATUS[0]}" "see $name.log" >>"$STATUS_FILE"
  done
  for spec in ${PROFILE_MIXED:-}; do
    local name="profile_llama-3.1-8b_mixed_${spec//:/_}"
    note "profile llama-3.1-8b mixed step $spec: scripts/profile_step.py"
    timeout --kill-after=30 "$BENCH_TIMEOUT" "$PY" scripts/profile_step.py --model preset:llama-3.1-8b --mixed "$spec" \
      "${CACHE_ARGS[@]}" 2>&1 | tee "$OUT/$name.log"
    printf '%s\t%s\t%s\n' "$name" "${PIPESTATUS[0]}" "see $name.log" >>"$STATUS_FILE"
  done
}

gsilu() {
  note "gate|up GEMM with SiLU-and-mul in its epilogue vs cuBLAS + silu_and_mul"
  timeout --kill-after=30 "$BENCH_TIMEOUT" "$PY" scripts/bench_gemm_silu_mul.py ${GSILU_ARGS:---sweep} \
    --json "$OUT/gemm_silu_mul.json" 2>&1 | tee "$OUT/gemm_silu_mul.log"
  printf 'gemm_silu_mul\t%s\tsee gemm_silu_mul.log\n' "${PIPESTATUS[0]}" >>"$STATUS_FILE"
}

pgemm() {
  note "prefill-sized projections on cuBLAS, llama-3.1-8b shapes"
  timeout --kill-after=30 "$BENCH_TIMEOUT" "$PY" scripts/bench_prefill_gemm.py --preset llama-3.1-8b \
    ${PGEMM_ROWS:+--rows $PGEMM_ROWS} ${PGEMM_ARGS:-} --json "$OUT/prefill_gemm.json" 2>&1 | tee "$OUT/prefill_gemm.log"
  printf 'prefill_gemm\t%s\tsee prefill_gemm.log\n' "${PIPESTATUS[0]}" >>"$STATUS_FILE"
}

gemm() {
  for m in ${GEMM_PRESETS-llama-3.2-1b llama-3.1-8b}; do
    note "skinny GEMM and GEMV vs cuBLAS, $m shapes"
    timeout --kill-after=30 "$BENCH_TIMEOUT" "$PY" scripts/bench_skinny_gemm.py --preset "$m" ${GEMM_ARGS:-} \
      --json "$OUT/gemm_$m.json" 2>&1 | tee "$OUT/gemm_$m.log"
    printf 'gemm_%s\t%s\tsee gemm_%s.log\n' "$m" "${PIPESTATUS[0]}" "$m" >>"$STATUS_FILE"
  done
  # end to end: the same bs-1 latency runs as `latency`, one per linear choice, on the same machine
  local fused=(--plugin add_rms_norm_linear=gemv_add_rms_norm_linear --plugin silu_mul_linear=gemv_silu_mul_linear)
  for m in ${LATENCY_MODELS-llama-3.2-1b llama-3.1-8b}; do  # LATENCY_MODELS="" skips them
    for choice in ${GEMM_E2E-default fused cublas}; do
      case "$choice" in
        default) bench "latency_${m}_bs1" latency --model "preset:$m" "${BS1[@]}" --backend kiln ;;
        fused) bench "latency_${m}_bs1_gemv_fused" latency --model "preset:$m" "${BS1[@]}" \
                 --backend kiln "${fused[@]}" ;;
        nopdl) (export KILN_PDL=0; bench "latency_${m}_bs1_nopdl" latency --model "preset:$m" "${BS1[@]}" \
                 --backend kiln) ;;
        pre[0-9]*) (export KILN_GEMV_PREFETCH_K=${choice#pre}; bench "latency_${m}_bs1_$choice" latency \
                      --model "preset:$m" "${BS1[@]}" --backend kiln) ;;
        eager) bench "latency_${m}_bs1_no_compile" latency --model "preset:$m" "${BS1[@]}" \
                 --backend kiln --no-compile ;;
        cublas) bench "latency_${m}_bs1_cublas" latency --model "preset:$m" "${BS1[@]}" \
                  --backend kiln --plugin linear=cublas_linear ;;
      esac
    done
  done
}

ab() {
  # AB_DIR (default ab_base/): the files of the change under test as they were before it, at their
  # repository paths (make it with scripts/ab_prepare.sh COMMIT FILE...; the GPU machine's git may lack
  # the commit). Runs bs-1 latency of each of LATENCY_MODELS with this tree, then with those files in
  # place, AB_ROUNDS times in turn on one machine (default 1); the tree's files are put back afterwards.
  # AB_ARGS replaces the bs-1 workload, e.g. "--isl 2048 --osl 16 --batch-size 1" (TTFT)
  local dir=${AB_DIR:-ab_base} saved f m r files args=("${BS1[@]}")
  [ -n "${AB_ARGS:-}" ] && read -ra args <<<"$AB_ARGS"
  if [ ! -d "$dir" ]; then
    printf 'ab\t2\tno %s/ (scripts/ab_prepare.sh COMMIT FILE...)\n' "$dir" >>"$STATUS_FILE"
    return
  fi
  files=$(cd "$dir" && find . -type f | sed 's|^\./||')
  saved=$(mktemp -d)
  for f in $files; do
    mkdir -p "$saved/$(dirname "$f")" && cp "$f" "$saved/$f" || { printf 'ab\t2\tno file %s\n' "$f" >>"$STATUS_FILE"; return; }
  done
  note "ab: $(echo "$files" | tr '\n' ' ')"
  for r in $(seq 1 "${AB_ROUNDS:-1}"); do
    for f in $files; do cp "$saved/$f" "$f"; done
    for m in ${LATENCY_MODELS-llama-3.2-1b llama-3.1-8b}; do
      bench "latency_${m}_ab_new_r$r" latency --model "preset:$m" "${args[@]}" --backend kiln
    done
    for f in $files; do cp "$dir/$f" "$f"; done
    for m in ${LATENCY_MODELS-llama-3.2-1b llama-3.1-8b}; do
      bench "latency_${m}_ab_base_r$r" latency --model "preset:$m" "${args[@]}" --backend kiln
    done
  done
  for f in $files; do cp "$saved/$f" "$f"; done
}

variants() {
  # VARIANT_MODELS (default: llama-3.1-8b llama-3.2-1b) at batch VARIANT_BATCH (default 1); VARIANTS: the
  # settings timed in turn in one engine (scripts/decode_variants.py), "NAME=ENV=VALUE,... ...";
  # VARIANT_ROUNDS (default 3), VARIANT_ISL (default 128), VARIANT_ARGS (more options, e.g. "--steps 16")
  local v m args=(--rounds "${VARIANT_ROUNDS:-3}" ${VARIANT_ARGS:-})
  for v in ${VARIANTS:-base= tile=KILN_GEMV_PREFETCH_K=0 pre1024=KILN_GEMV_PREFETCH_K=1024 \
                       pre2048=KILN_GEMV_PREFETCH_K=2048 nopdl=KILN_PDL=0}; do
    args+=(--variant "$v")
  done
  for m in ${VARIANT_MODELS:-llama-3.1-8b llama-3.2-1b}; do
    note "decode variants, $m: scripts/decode_variants.py"
    timeout --kill-after=30 "$BENCH_TIMEOUT" "$PY" scripts/decode_variants.py --model "preset:$m" \
      --batch-size "${VARIANT_BATCH:-1}" --isl "${VARIANT_ISL:-128}" "${args[@]}" "${CACHE_ARGS[@]}" --json "$OUT/variants_$m.json" 2>&1 \
      | tee "$OUT/variants_$m.log"
    printf 'variants_%s\t%s\tsee variants_%s.log\n' "$m" "${PIPESTATUS[0]}" "$m" >>"$STATUS_FILE"
  done
}

mbatch() {
  note "mixed-step layers: one batch vs decode rows and prompts on two streams"
  timeout --kill-after=30 "$BENCH_TIMEOUT" "$PY" scripts/bench_microbatch_overlap.py ${MBATCH_ARGS:-} \
    --json "$OUT/microbatch_overlap.json" 2>&1 | tee "$OUT/microbatch_overlap.log"
  printf 'microbatch_overlap\t%s\tsee microbatch_overlap.log\n' "${PIPESTATUS[0]}" >>"$STATUS_FILE"
}

mlp() {
  note "gated MLP whole vs chunked: scripts/bench_mlp_chunks.py"
  # MLP_ARGS: extra options, e.g. "--preset llama-3.2-1b --chunks 512"
  # shellcheck disable=SC2086
  timeout --kill-after=30 "$BENCH_TIMEOUT" "$PY" scripts/bench_mlp_chunks.py ${MLP_ARGS:-} --json "$OUT/mlp_chunks.json" 2>&1 \
    | tee "$OUT/mlp_chunks.log"
  printf 'mlp_chunks\t%s\tsee mlp_chunks.log\n' "${PIPESTATUS[0]}" >>"$STATUS_FILE"
}

attn() {
  note "paged attention prefill sweep: scripts/bench_attention.py (timeout ${BENCH_TIMEOUT} s)"
  local t0=$(date +%s)
  # ATTN_ARGS: extra options, e.g. "--varlen --case prefill1 prefill4 chunk prefill64"
  # shellcheck disable=SC2086
  timeout --kill-after=30 "$BENCH_TIMEOUT" "$PY" scripts/bench_attention.py ${ATTN_ARGS:-} --json "$OUT/attention_sweep.json" 2>&1 \
    | tee "$OUT/attention_sweep.log"
  local rc=${PIPESTATUS[0]}
  printf 'attention_sweep\t%s\tsee attention_sweep.log (%s s)\n' "$rc" "$(($(date +%s) - t0))" >>"$STATUS_FILE"
}

serve_bench() {
  if ! "$PY" -c "import kiln.serve.server, httpx" 2>/dev/null; then
    note "installing the server's wheels from .whl/"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/kiln-site .whl/*.whl \
      && export PYTHONPATH="$PYTHONPATH:/tmp/kiln-site"
    if ! "$PY" -c "import kiln.serve.server, httpx" >"$OUT/serve_import.log" 2>&1; then
      printf 'serve\t1\tthe server does not import: %s\n' "$(tail -n 1 "$OUT/serve_import.log")" >>"$STATUS_FILE"
      return
    fi
  fi
  local dir
  local model=${SERVE_MODEL:-llama-3.1-8b}
  dir=$("$PY" -m kiln.cli bench presets --make "$model" "${CACHE_ARGS[@]}" | tail -n 1)
  note "kiln serve $dir"
  local t0=$(date +%s)
  "$PY" -m kiln.cli serve "$dir" --port 8123 >"$OUT/serve_server.log" 2>&1 &
  local pid=$!
  until curl -sf http://127.0.0.1:8123/health >/dev/null; do
    if ! kill -0 $pid 2>/dev/null || [ $(($(date +%s) - t0)) -gt 240 ]; then
      printf 'serve_%s\t1\tserver did not come up (see serve_server.log)\n' "$model" >>"$STATUS_FILE"
      kill $pid 2>/dev/null
      return
    fi
    sleep 1
  done
  note "server up in $(($(date +%s) - t0)) s"
  local plot=png
  "$PY" -c "import matplotlib" 2>/dev/null || plot=svg
  timeout --kill-after=30 "$BENCH_TIMEOUT" "$PY" -m kiln.cli bench serve --base-url http://127.0.0.1:8123 \
    --isl "${SERVE_ISL:-1024}" --osl "${SERVE_OSL:-1024}" --rate ${SERVE_RATES:-2 4 6} \
    --num-requests "${SERVE_REQUESTS:-160}" --json "$OUT/serve_$model.json" --plot "$OUT/serve_$model.$plot" 2>&1 \
    | tee "$OUT/serve_$model.log"
  local rc=${PIPESTATUS[0]}
  kill -TERM $pid
  wait $pid
  printf 'serve_%s\t%s\tsee serve_%s.log (%s s)\n' "$model" "$rc" "$model" "$(($(date +%s) - t0))" >>"$STATUS_FILE"
}

summary() {
  note "summary"
  "$PY" - "$OUT" "$STATUS_FILE" <<'EOF' | tee "$OUT/summary.txt"
import glob
import json
import os
import sys

out, status_file = sys.argv[1], sys.argv[2]
rows = [line.rstrip("\n").split("\t") for line in open(status_file) if line.strip()]
head = ("run", "kind", "model", "kiln", "transformers", "bound", "kiln/bound", "card")
table = [head]
for name, rc, why in rows:
    path = os.path.join(out, f"{name}.json")
    if name == "pytest-gpu" or name.startswith(("serve", "gemm", "attention", "mlp", "variants", "prefill")) or not os.path.isfile(path):
        table.append((name, "-", "-", f"rc={rc}", "-", "-", "-", why[:60]))
        continue
    r = json.load(open(path))
    key = {"throughput": "output_tok_s", "latency": "decode_tok_s"}.get(r.get("kind"))
    if key is None:  # a script's own report (pgemm, ...), not a bench run: its log holds the figures
        table.append((name, "-", "-", f"rc={rc}", "-", "-", "-", why[:60]))
        continue
    res = r["results"]

    def fig(b):
        v = (res.get(b) or {}).get(key)
        return "-" if v is None else f"{v:,.1f}"

    share = (res.get("kiln") or {}).get("roofline_share")
    table.append((
        name, f"{r['kind']} ({key})", r["model"].get("name", "?"), fig("kiln"), fig("hf"),
        f"{r['roofline'].get('bound', 0):,.1f}", "-" if share is None else f"{share:.1%}", r["env"]["card"],
    ))
widths = [max(len(str(row[i])) for row in table) for i in range(len(head))]
for row in table:
    print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)))
print()
for name, rc, why in rows:
    print(f"{name}: {why}")
# the variant comparisons' own tables (their figures are not in a bench JSON)
for name, rc, why in rows:
    log = os.path.join(out, f"{name}.log")
    if name.startswith("variants") and os.path.isfile(log):
        lines = open(log).read().splitlines()
        start = next((i for i, line in enumerate(lines) if line.startswith("== decode step")), None)
        if start is not None:
            print()
            print("\n".join(lines[start:]))
EOF
}

groups=("$@")
[ ${#groups[@]} -eq 0 ] && groups=(tests)
for g in "${groups[@]}"; do
  case "$g" in
    env | tiny | tests | smoke | profile | latency | throughput | workloads | ttft | nano | gemm | pgemm | gsilu | ab | variants | hostprof | mbatch | mlp | attn | serve | all) ;;
    *) echo "unknown group '$g'; use env, tiny, tests, smoke, profile, latency, throughput, workloads, ttft, nano, gemm, pgemm, gsilu, ab, variants, hostprof, mbatch, mlp, attn, serve or all" >&2
       exit 2 ;;
  esac
done
env_info
for g in "${groups[@]}"; do
  case "$g" in
    env) ;;
    tiny) tiny ;;
    tests) run_tests ;;
    smoke) smoke ;;
    profile) profile ;;
    latency) latency ;;
    throughput) throughput ;;
    workloads) workloads ;;
    ttft) ttft ;;
    nano) nano ;;
    gemm) gemm ;;
    pgemm) pgemm ;;
    gsilu) gsilu ;;
    ab) ab ;;
    variants) variants ;;
    hostprof) hostprof ;;
    mbatch) mbatch ;;
    mlp) mlp ;;
    attn) attn ;;
    serve) serve_bench ;;
    all) run_tests; smoke; latency; throughput; nano; attn ;;
  esac
done
summary
note "done"
# Non-zero when any step failed, so a caller sees it without reading the table.
failed=0
awk -F'\t' '$2 != 0 { bad = 1 } END { exit !bad }' "$STATUS_FILE" && failed=1
# PACK=1: everything but the summary in one archive, for callers that fetch only a few files back
if [ "${PACK:-0}" = 1 ]; then
  (cd "$OUT" && find . -maxdepth 1 -type f ! -name summary.txt ! -name results.tar.gz -printf '%P\n' \
    | tar czf results.tar.gz -T - --remove-files) && note "packed into $OUT/results.tar.gz"
fi
exit $failed
