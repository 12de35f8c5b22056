#!/usr/bin/env bash
# One command for a lent GPU machine: make the two environments, then run the rollout-engine benchmark.
#
#   benchmarks/gpu_rollout_engine.sh [options of gpu_rollout_engine.py]     # from the repository root
#
# 1. The project environment: a venv over the machine's own CUDA torch and transformers
#    (--system-site-packages), plus the few small packages the benchmark imports when missing.
#    The project pins torch 2.13.0+cpu for CPU machines; on the GPU the image's CUDA build is used.
# 2. The engine environment: a separate venv with vLLM at the version the engine code was checked
#    against (GPU build; it pins its own torch, so it cannot share the project's environment,
#    docs/rollout-engine-notes.md). Needs a package index (PIP_INDEX_URL may name a mirror) or a
#    folder of wheels (WHEELHOUSE=DIR installs from there, offline). If it cannot be installed, the
#    benchmark still runs native vs transformers and the JSON says why vllm is missing.
# 3. The benchmark; the JSON goes to $OUT/gpu_rollout_engine.json (or --out).
# Every part prints "TIMING <part> <seconds>"; the whole is meant to stay under ~9 minutes on an H100.
set -uo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
WORK=${RLHF_BENCH_WORK:-/tmp/rlhf-gpu-bench}
VLLM_PACKAGE=${VLLM_PACKAGE:-vllm==0.34.0}  # = GPU_PACKAGE in rlhf_core/rollout/engines/vllm_environment.py
PROJECT_PACKAGES=(httpx pydantic pyyaml safetensors tokenizers psutil)
mkdir -p "$WORK"

now() { date +%s.%N; }
report_time() { awk -v a="$2" -v b="$(now)" -v l="$1" 'BEGIN { printf "TIMING %s %.1f s\n", l, b - a }'; }
pip_install() {  # pip_install VENV PACKAGE...: from WHEELHOUSE when set, else the index; uv when present
    local venv=$1; shift
    local source=()
    [[ -n "${WHEELHOUSE:-}" ]] && source=(--no-index --find-links "$WHEELHOUSE")
    if command -v uv >/dev/null; then
        uv pip install --quiet --python "$venv/bin/python" "${source[@]}" "$@"
    else
        "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "${source[@]}" "$@"
    fi
}

start=$(now)
"$PYTHON" -c "import torch, transformers; assert torch.cuda.is_available(), 'no CUDA device'" || {
    echo "the machine's $PYTHON needs a CUDA torch and transformers"; exit 1; }
[[ -x "$WORK/project/bin/python" ]] || "$PYTHON" -m venv --system-site-packages "$WORK/project"
missing=()
for package in "${PROJECT_PACKAGES[@]}"; do
    "$WORK/project/bin/python" -c "import ${package/pyyaml/yaml}" 2>/dev/null || missing+=("$package")
done
[[ ${#missing[@]} -eq 0 ]] || pip_install "$WORK/project" "${missing[@]}"
report_time project_environment "$start"

start=$(now)
engines=(vllm native transformers)
ENGINE_PY=${RLHF_VLLM_PYTHON:-$WORK/engine/bin/python}
if ! "$ENGINE_PY" -c "import vllm" 2>/dev/null; then
    ENGINE_PY=$WORK/engine/bin/python
    rm -rf "$WORK/engine" && "$PYTHON" -m venv "$WORK/engine" && pip_install "$WORK/engine" "$VLLM_PACKAGE"
    if ! "$ENGINE_PY" -c "import vllm"; then
        echo "could not install $VLLM_PACKAGE: running native vs transformers only"
        engines=(native transformers)
    fi
fi
report_time engine_environment "$start"

start=$(now)
RLHF_VLLM_PYTHON=$ENGINE_PY HF_HUB_OFFLINE=1 PYTHONPATH=$PWD \
    "$WORK/project/bin/python" benchmarks/gpu_rollout_engine.py --engines "${engines[@]}" "$@"
status=$?
report_time benchmark "$start"
exit $status
