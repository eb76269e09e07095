#!/usr/bin/env bash
# The recorded e2e run on the team's device (one H200): three calls of one lease, back to back, each carrying its
# part of the vLLM bundle (../shared/tools/vllm-gpu/README.md: call N carries .vllm-bundle/stash, and deps.tar +
# vllm.00 for call 1, vllm.01 for call 2, vllm.02 for call 3). Each call runs real work after the stash step:
#   1: the model directory; native TTFT (8K/32K/128K), agreement, decode at batch 1 and 8
#   2: native decode at batch 32 and at 128K, and inter-token latency while a 128K prompt prefills
#   3: native capacity on 8 GiB of KV; then bare vLLM (dense): TTFT, agreement, decode at batch 1/4/8/32/128K
#      (batch 4 at 32K is the most 8 GiB holds for vLLM: its best batch on the capacity memory)
#   bash benchmarks/e2e_device.sh CALL        (parts go to $OUT, logs beside them)
# then here: python benchmarks/e2e.py report PARTS.json... --out-dir benchmarks/results
set -eu
call=$1
dir=/tmp/e2e-model
out=${OUT:-/tmp/e2e-out}
mkdir -p "$out"
bash .vllm-bundle/stash > "$out/stash-$call.log" 2>&1 || { tail -5 "$out/stash-$call.log"; exit 1; }
e2e() { name=$1; shift; python3 benchmarks/e2e.py run --dir $dir --out "$out/$name.json" "$@" 2>&1 | tee "$out/$name.log" | grep -E "^\[" || true; }
case $call in
  1) python3 benchmarks/e2e.py write-model --dir $dir 2>&1 | tail -1
     e2e native-a --engine native --part ttft,agree,decode:1,decode:8 --deadline 420 ;;
  2) e2e native-b --engine native --part decode:32,decode:long,interference --deadline 480 ;;
  3) e2e native-cap --engine native --part capacity --kv-memory-mib 8192 --deadline 170
     export PYTHONPATH=/tmp/vllm-site
     e2e vllm --engine vllm --part ttft,agree,decode:1,decode:4,decode:8,decode:32,decode:long --deadline 380 ;;
  *) echo "call must be 1, 2 or 3"; exit 2 ;;
esac
