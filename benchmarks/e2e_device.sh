#!/usr/bin/env bash
# The recorded e2e run on the team's device (one H200), in steps that fit its 10-minute calls:
#   bash benchmarks/e2e_device.sh STEP...      (parts go to $OUT, logs beside them)
# Steps: model (write the Qwen2.5-7B-shaped model to /tmp; once per lease), native-ttft (TTFT 8K/32K/128K alone),
# vs-breakdown (benchmarks/kernel_bench.py on vertical_slash and flexprefill at 128K), native-a (TTFT, agreement,
# decode at batch 1 and 8), native-b (decode at batch 32 and at 128K, inter-token latency while a 128K prompt
# prefills; native-decode: the same without it), native-cap (capacity on 8 GiB of KV), vllm (bare vLLM, dense:
# TTFT, agreement, decode at batch 1/4/8/32/128K; batch 4 at 32K is the most 8 GiB holds for vLLM: its best
# batch on the capacity memory),
# vllm-decode / vllm-ttft (bare vLLM: decode at batch 32/8/4/1, or TTFT alone),
# sparse-vllm (`sparse-serve --engine vllm`: dense and each method; needs vllm's three parts), sparse-vllm-ttft (its
# TTFT for dense and the bars' prefill patterns; E2E_PATTERNS overrides), sparse-vllm-decode
# (its sparse decode methods at batch 1, 8 and 32, and a profile of 20 steps of the first), sdpa
# (benchmarks/sdpa_chunk.py), calibrate (benchmarks/calibrate_fallback.py: the dense-fallback profile of this card,
# under $OUT and /tmp/e2e-prefill-profile.json; the steps after it in the same call use it, later calls of the lease
# with SPARSE_SERVE_PREFILL_PROFILE=/tmp/e2e-prefill-profile.json; commit it as
# attention_backends/profiles/prefill-<card>.json), gpu-tests (tests/gpu with the engine's log shown; GPU_TESTS_K
# selects tests; needs .device-bundle's two GGUF halves carried first). Every call first runs the vLLM bundle's stash
# (../shared/tools/vllm-gpu/README.md: three calls of one lease carry deps.tar + vllm.00, vllm.01, vllm.02; the vllm
# step needs all three), e.g.
#   call 1: model native-a    call 2: native-b native-cap    call 3: vllm
# then here: python benchmarks/e2e.py report PARTS.json... --out-dir benchmarks/results
# A call carries at most 64 MiB, the working tree included: with deps.tar + vllm.00 (60 MB) the tracked files
# must stay under about 7 MB; on 2026-11-30 the accuracy results (4.5 MB) were moved aside for the calls.
# Native steps alone need only .device-bundle/stash and deps.tar (the server's wheels, benchmarks/device_bundle.sh)
# in the first call.
set -eu
dir=/tmp/e2e-model
out=${OUT:-/tmp/e2e-out}
mkdir -p "$out"
if [ -f .vllm-bundle/stash ]; then
  bash .vllm-bundle/stash > "$out/stash.log" 2>&1 || { tail -5 "$out/stash.log"; exit 1; }
fi
if [ -f .device-bundle/deps.tar ]; then bash .device-bundle/stash > "$out/dev-stash.log" 2>&1 || true; fi
# the server's packages: the vLLM bundle's (once its deps.tar came; vLLM itself once all three parts did), else
# the smaller device bundle's (.device-bundle/deps.tar, 8 MB: enough for the native steps)
if [ -d /tmp/vllm-site/fastapi ]; then export PYTHONPATH=/tmp/vllm-site; else export PYTHONPATH=/tmp/dev-site; fi
# E2E_PATTERNS=dense,quest:10 (optional): measure only these patterns in the ttft and decode parts (a re-measure)
e2e() { name=$1; shift; python3 benchmarks/e2e.py run --dir $dir --out "$out/$name.json" "$@" \
  ${E2E_PATTERNS:+--patterns "$E2E_PATTERNS"} 2>&1 | tee "$out/$name.log" | grep -E "^\[" || true; }
# the plugin's entry point must be installed for vLLM's engine process to load it
plugin() { python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . > "$out/pip.log" 2>&1; }
for step in "$@"; do
  case $step in
    model) [ -f $dir/config.json ] || python3 benchmarks/e2e.py write-model --dir $dir 2>&1 | tail -1 ;;
    native-ttft) e2e native-ttft --engine native --part ttft --deadline 420 ;;
    vs-breakdown)  # vertical_slash / flexprefill at 128K on one layer: estimate, budget search, attention apart
      python3 benchmarks/kernel_bench.py --out "$out" --vs-only --lengths 131072 --skip decode,snapkv,api \
        > "$out/vs-breakdown.log" 2>&1; grep -E "vertical_slash|flexprefill|  vs " "$out/vs-breakdown.log" ;;
    native-a) e2e native-a --engine native --part ttft,agree,decode:1,decode:8 --deadline 420 ;;
    native-b) e2e native-b --engine native --part decode:32,decode:long,interference --deadline 330 ;;
    native-decode) e2e native-decode --engine native --part decode:32,decode:long --deadline 300 ;;
    native-cap) e2e native-cap --engine native --part capacity --kv-memory-mib 8192 --deadline 170 ;;
    vllm) e2e vllm --engine vllm --part ttft,agree,decode:1,decode:4,decode:8,decode:32,decode:long --deadline 420 ;;
    vllm-decode) e2e vllm-decode --engine vllm --part decode:32,decode:8,decode:4,decode:1 --deadline 200 ;;
    vllm-ttft) e2e vllm-ttft --engine vllm --part ttft --deadline 170 ;;
    sparse-vllm-ttft)  # TTFT of the bars' prefill patterns at 8K / 32K / 128K (block_sparse:10/b64 is the bar's block
      # 64; plain block_sparse:10 is block 16, about dense's time at 128K: session4/README.md of 2026-12-03's parts)
      plugin
      E2E_PATTERNS=${E2E_PATTERNS:-dense,vertical_slash:10,block_sparse:10/b64} \
        e2e sparse-vllm-ttft --engine sparse-vllm --part ttft --deadline "${E2E_DEADLINE:-300}" ;;
    sparse-vllm)
      plugin
      e2e sparse-vllm --engine sparse-vllm --part ttft,agree,decode:1,decode:8,decode:32 --deadline 420 ;;
    sparse-vllm-decode)  # the sparse decode methods alone at 32K (start-up alone is 175-230 s), with a torch profile
      # of 20 steps at batch 1 inside its window (server/vllm_engine/step_profile.py; 2026-12-03, Quest in vLLM's full
      # decode graph: 0.65 / 1.11 / 1.77x vLLM at batch 1 / 8 / 32)
      # E2E_PROFILE=FILE:SKIPS:STEPS[:decode] and E2E_DECODE_PARTS=decode:32,... override the profile and the order
      # (2026-12-03, third session: decode:32 first, windows after 100 and 500 uniform decode steps: dense, then Quest);
      # SnapKV / Ada-SnapKV run inside the full decode graphs (SPARSE_SERVE_VLLM_KEEP_GRAPH=0: the per-step path);
      # E2E_DEADLINE (s, from the server's start) stops it: four patterns at four batches need about 500 s fresh
      plugin
      SPARSE_SERVE_VLLM_PROFILE="${E2E_PROFILE:-$out/sparse-vllm-profile-b1.txt:200:20}" \
        E2E_PATTERNS=${E2E_PATTERNS:-quest:10,snapkv:10,ada_snapkv:10} \
        e2e sparse-vllm-decode --engine sparse-vllm --part ${E2E_DECODE_PARTS:-decode:1,decode:8,decode:32} \
        --deadline "${E2E_DEADLINE:-420}" ;;
    sdpa) python3 benchmarks/sdpa_chunk.py 2>&1 | tee "$out/sdpa-chunk.log" ;;
    calibrate) python3 benchmarks/calibrate_fallback.py --out "$out/prefill-profile.json" > "$out/calibrate.log" 2>&1
      tail -2 "$out/calibrate.log"
      cp "$out/prefill-profile.json" /tmp/e2e-prefill-profile.json
      export SPARSE_SERVE_PREFILL_PROFILE=/tmp/e2e-prefill-profile.json ;;
    gpu-tests)  # tests/gpu (needs .device-bundle's wheels and GGUF: tests/gpu/README.md); GPU_TESTS_K=... picks tests;
      # the engine's log and a stack dump of a stalled test reach the output (2026-12-02: the graph test stalled)
      SPARSE_SERVE_GPU_TEST_MODEL=/tmp/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf PYTHONPATH=/tmp/dev-site \
        timeout 560 python3 -m pytest -q -s -p no:cacheprovider -rA --durations=0 -o log_cli=true \
        --log-cli-level=WARNING -o faulthandler_timeout=240 ${GPU_TESTS_K:+-k "$GPU_TESTS_K"} tests/gpu \
        > "$out/gpu-tests.txt" 2>&1 || true
      tail -30 "$out/gpu-tests.txt" ;;
    *) echo "unknown step $step"; exit 2 ;;
  esac
done
