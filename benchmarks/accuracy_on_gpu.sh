#!/usr/bin/env bash
# Serve a model on this machine's GPU and run `sparse-eval run` against it, then stop the server.
#   benchmarks/accuracy_on_gpu.sh MODEL RUN_DIR [sparse-eval run arguments...]
# MODEL is what `sparse-serve --model` takes (a .gguf file or a Hugging Face directory). Environment:
#   SERVE_ARGS   extra sparse-serve arguments (default: --dtype float32 --max-num-seqs 64)
#   DEVICE       (default cuda)
#   PORT         (default 8716)   DEADLINE  seconds sparse-eval may run before it is stopped (default: none);
#                the run directory resumes where it stopped when the same command runs again
# Runs from a checkout without installing (python3 -m server.cli / clients.eval_cli).
set -u
model=$1; run_dir=$2; shift 2
port=${PORT:-8716}
python3 -m server.cli --model "$model" --device "${DEVICE:-cuda}" ${SERVE_ARGS:---dtype float32 --max-num-seqs 64} \
    --port "$port" --no-access-log --log-level warning > "$run_dir.server.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null' EXIT
for _ in $(seq 240); do  # up to 2 minutes, and no longer than the server lives
  kill -0 $server 2>/dev/null || { echo "server exited:"; tail -20 "$run_dir.server.log"; exit 1; }
  python3 -c "import httpx,sys; sys.exit(httpx.get('http://127.0.0.1:$port/health').status_code != 200)" \
      2>/dev/null && break
  sleep 0.5
done
${DEADLINE:+timeout $DEADLINE} python3 -m clients.eval_cli run --url "http://127.0.0.1:$port" --out "$run_dir" \
    --no-progress "$@"
echo "sparse-eval exited with $?"
