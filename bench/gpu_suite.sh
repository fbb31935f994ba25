#!/usr/bin/env bash
# Every GPU comparison of bench/ in one call, sized to finish in under 10 minutes on one H100.
#
#   1. generation: fast vs plain `generate` new tokens/s, random Qwen3-0.6B shape in bf16: distinct prompts at batch
#      64 and 256, and 8 prompts x 16 samples of a 512-token shared prefix (TARGETS.md: >= 5x at batch 256,
#      >= 10x prefix-shared);
#   2. grpo step time: plain TRL GRPO vs the grpo stage with TRL's sampling vs with our fast engine, group 8;
#   3. sft/dpo train throughput vs plain TRL, with the faster preset (TARGETS.md: never slower; preset >= 1.5x).
# vLLM figures need vllm installed where this runs (the lent GPU machines have none and cannot fetch it): the
# generation step adds a vLLM column when ALIGNKIT_VLLM_URL points at a running OpenAI-compatible server.
#
# Where the GPU machine lacks Python packages alignkit needs (the lent image has torch, transformers, peft and
# accelerate, not trl, datasets or pydantic), prepare them here first, on a machine with PyPI:
#     bash bench/gpu_suite.sh --prepare          # wheels for Python 3.12 -> .gpu/wheels, a tokenizer -> .gpu/tokenizer
# then, on the GPU machine, with .gpu carried along (device tool: carry [".gpu"]):
#     bash bench/gpu_suite.sh                    # writes $OUT/gpu_suite.md (or bench/gpu_suite.md), one table each
# On a CPU, `GPU_SUITE_SMOKE=1 bash bench/gpu_suite.sh` runs every step on tiny sizes (checks the script, not speed).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
GPU=.gpu
REPORT=${OUT:-bench}/gpu_suite.md

if [[ "${1:-}" == "--prepare" ]]; then
  set -e
  mkdir -p "$GPU/wheels" "$GPU/tokenizer"
  grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
  # alignkit's imports beyond the GPU image (KINDS.md lists the image); pure-Python where possible
  # (the versions this project's CPU venv runs)
  for spec in trl==1.16.0 datasets==4.8.5 dill==0.4.1 multiprocess==0.70.19 pydantic==2.14.4 \
              pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 math-verify==0.9.0 \
              latex2sympy2_extended==1.11.0 antlr4-python3-runtime==4.13.2; do
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d "$GPU/wheels" "$spec"
  done
  # a real tokenizer with a chat template (the GPU machine cannot reach the Hub): SmolLM2's, converted locally
  "$PY" - "$GPU/tokenizer" <<'EOF'
import sys
from alignkit.modeling.models import load_tokenizer
load_tokenizer("smollm2-135m-instruct").save_pretrained(sys.argv[1])
EOF
  du -sh "$GPU"
  exit 0
fi

if [[ -d "$GPU/wheels" ]] && ! "$PY" -c "import trl" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$GPU"/wheels/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 WANDB_MODE=disabled HF_HUB_OFFLINE=1
mkdir -p "$(dirname "$REPORT")"

if [[ -n "${GPU_SUITE_SMOKE:-}" ]]; then   # CPU check of the script itself
  GEN="--preset tiny --batch-sizes 4 --prefix-n 2 --prefix-prompts 2 --prefix-len 16 --new-tokens 8 --repeats 1"
  SHAPE=tiny; GRPO="--steps 1 --batch-size 4 --group 2 --max-new-tokens 8 --problems 8"
  TRAIN="--steps 2 --batch-size 2 --max-length 64"; LIMITS=(600 600 600)
else
  GEN="--preset qwen3-0.6b --batch-sizes 64,256 --prefix-n 16 --prefix-prompts 8 --prefix-len 512 --new-tokens 128 --repeats 1"
  SHAPE=qwen3-0.6b; GRPO="--steps 3 --batch-size 64 --group 8 --max-new-tokens 128 --problems 64"
  TRAIN="--steps 10 --batch-size 8 --max-length 1024 --presets"; LIMITS=(110 230 200)  # 540 s of the call's 600
fi

# A model folder for the training benches: random weights of the chosen shape, the carried (or local) tokenizer.
MODEL=/tmp/gpu-suite-model
"$PY" - "$MODEL" "$SHAPE" "$GPU/tokenizer" <<'EOF' || { echo "could not build the bench model"; exit 1; }
import sys, os, torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen3Config
out, shape, tok_dir = sys.argv[1:4]
if os.path.isdir(tok_dir):
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
else:
    from alignkit.modeling.models import load_tokenizer
    tokenizer = load_tokenizer("smollm2-135m-instruct")
big = shape == "qwen3-0.6b"
config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=1024 if big else 64, intermediate_size=3072 if big else 128,
                     num_hidden_layers=28 if big else 2, num_attention_heads=16 if big else 4,
                     num_key_value_heads=8 if big else 2, head_dim=128 if big else 16, max_position_embeddings=4096,
                     tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
torch.manual_seed(0)
AutoModelForCausalLM.from_config(config).save_pretrained(out)
tokenizer.save_pretrained(out)
EOF

{
  echo "# bench/gpu_suite.sh, $(date -u +%F' '%H:%M) UTC"
  echo
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no GPU (smoke run)"
  "$PY" -c "import torch, transformers, trl, peft; print(f'torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}, peft {peft.__version__}')"
  echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
} > "$REPORT"

step() {  # seconds, title, command...: run with a time limit, keep its output in the report
  local limit=$1 title=$2; shift 2
  echo "## $title" | tee -a "$REPORT"
  echo '```' >> "$REPORT"
  echo "\$ $*" >> "$REPORT"
  local started=$SECONDS
  timeout "$limit" "$@" 2>&1 | grep -v -E "Warning|warn\(|it/s\]|s/it\]" | tee -a "$REPORT"
  echo "(exit ${PIPESTATUS[0]}, $((SECONDS - started)) s)" | tee -a "$REPORT"
  echo '```' >> "$REPORT"
}

VLLM=()
if [[ -n "${ALIGNKIT_VLLM_URL:-}" ]]; then VLLM=(--openai-url "$ALIGNKIT_VLLM_URL"); fi
step "${LIMITS[0]}" "generation: fast vs generate" "$PY" bench/generation.py $GEN "${VLLM[@]}"
step "${LIMITS[1]}" "grpo step time: plain TRL vs the grpo stage (trl sampling, fast engine)" \
  "$PY" bench/grpo_sampling.py --model "$MODEL" $GRPO
step "${LIMITS[2]}" "sft/dpo train throughput vs plain TRL" "$PY" bench/train_throughput.py --model "$MODEL" $TRAIN
echo "report: $REPORT"
