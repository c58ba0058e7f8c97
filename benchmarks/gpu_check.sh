#!/usr/bin/env bash
# One GPU check, from a bare GPU machine, in at most GPU_CHECK_BUDGET_S seconds (default 300) in all.
#
#   bash benchmarks/gpu_check.sh [--out DIR] [--tar FILE.tgz] [--dry-run]
#
# Sections, in order of what matters most, each under its own timeout (cut to what is left of the budget; a
# section that no longer fits is recorded as not run). Everything lands in one folder as it comes, so a run cut
# short still reports: sections.jsonl and summary.md grow after every section, each section has its log, and
# the benchmark grids write throughput.partial.json after every point.
#
#   setup       python, torch, CUDA, GPU; deepspeed and datasets installed from ./.whl (what
#               ../shared/device/prepare.sh puts there) when the image lacks them
#   point124m   GPT-2 124M, T=1024, micro-batch 16, bf16: ours compiled (the default on CUDA), with a profile
#               and its host syncs per step
#   eager124m   the same point eager: ours vs the plain PyTorch loop vs Hugging Face Trainer (a compiled
#               baseline would cost another compilation: the budget has no room for it)
#   zero2       DeepSpeed ZeRO-2 on one GPU (bf16, fp32 gradient accumulation), with its host syncs per step
#   maxbatch    the largest micro-batch of 124M at T=1024 that trains (eager)
#   tests       tests/gpu without the tests the sections above already measure (marker gpu_heavy)
#   report      summary.md: tokens/s, MFU (formula stated), peak memory, ratios, syncs, JIT builds, versions
#
# DeepSpeed builds its C++/CUDA ops on first use (JIT): their build time counts in the budget, and the ops built
# are counted in the report (TORCH_EXTENSIONS_DIR is the output folder's, so a bare machine builds from zero).
#
# --dry-run runs every section on the CPU at toy sizes (gpt2-tiny, T=32, a few steps), so the script and its
# report are exercised by CI (tests/integration/test_gpu_check.py) and do not rot between GPU runs.
set -uo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
dry_run=0
out=""
tarball=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) dry_run=1 ;;
    --out) out="$2"; shift ;;
    --tar) tarball="$2"; shift ;;  # also pack the results (no traces, caches or data) into one file
    -h|--help) sed -n '2,26p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (use --out DIR, --tar FILE, --dry-run)" >&2; exit 2 ;;
  esac
  shift
done
cd "$repo"
out=${out:-"$repo/benchmarks/out/gpu-check-$(date -u +%Y%m%d-%H%M%S)"}
mkdir -p "$out"
out=$(cd "$out" && pwd)
budget=${GPU_CHECK_BUDGET_S:-300}
slack=1  # --dry-run on a shared CI machine: GPU_CHECK_SLACK multiplies every section's limit
start_s=$(date +%s)
python=${PYTHON:-python3}
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export TORCH_EXTENSIONS_DIR="$out/torch_extensions"
: > "$out/sections.jsonl"
{
  echo "# GPU check, $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo
  echo "command: \`bash benchmarks/gpu_check.sh $([[ $dry_run == 1 ]] && echo --dry-run)\` (budget ${budget} s)"
  echo
  echo "| section | status | seconds | log |"
  echo "|---|---|---|---|"
} > "$out/summary.md"

elapsed() { echo $(( $(date +%s) - start_s )); }

# section NAME LIMIT_S MIN_S CMD...: run CMD under min(LIMIT_S, what is left), record its status as it ends
section() {
  local name=$1 limit=$2 least=$3
  shift 3
  limit=$(( limit * slack )); least=$(( least * slack ))
  local left=$(( budget - $(elapsed) ))
  local t0 status rc
  t0=$(date +%s)
  if (( left < least )); then
    status="not run: ${left} s of the budget left, the section needs ${least}"
    rc=-1
  else
    (( limit > left )) && limit=$left
    [[ "${GPU_CHECK_TIMEOUT_SECTION:-}" == "$name" ]] && limit=1  # tests: this section must time out
    timeout --kill-after=10 "$limit" "$@" > "$out/$name.log" 2>&1
    rc=$?
    case $rc in
      0) status="ok" ;;
      124|137) status="timed out after ${limit} s" ;;
      *) status="failed (exit $rc)" ;;
    esac
  fi
  local took=$(( $(date +%s) - t0 ))
  printf '{"section": "%s", "status": "%s", "seconds": %d, "exit": %d, "limit_s": %d}\n' \
    "$name" "$status" "$took" "$rc" "$limit" >> "$out/sections.jsonl"
  echo "| $name | $status | $took | $name.log |" >> "$out/summary.md"
  echo "[gpu_check] $name: $status (${took} s, $(elapsed) s of ${budget} s used)" >&2
}

setup() {
  set -e
  if ! "$python" -c "import deepspeed, datasets" 2>/dev/null; then
    if [[ ! -d "$repo/.whl" && -x "$repo/../shared/device/prepare.sh" ]]; then
      (cd "$repo" && ../shared/device/prepare.sh)
    fi
    if [[ -d "$repo/.whl" ]]; then
      "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/ftl-gpu-check-site "$repo"/.whl/*.whl
      echo "installed from .whl: $(cd "$repo/.whl" && printf '%s ' *.whl)"
    else
      echo "deepspeed/datasets missing and no .whl folder: run ../shared/device/prepare.sh first" >&2
    fi
  fi
  "$python" - <<'EOF'
import importlib.metadata as md, json, os, platform, sys
import torch
info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "gpu_count": torch.cuda.device_count(), "cpu_count": os.cpu_count()}
for name in ("transformers", "deepspeed", "datasets", "triton", "accelerate", "tokenizers"):
    try:
        info[name] = md.version(name)
    except md.PackageNotFoundError:
        info[name] = None
print(json.dumps(info))
json.dump(info, open(os.path.join(os.environ["GPU_CHECK_OUT"], "environment.json"), "w"), indent=1)
EOF
  if command -v nvidia-smi > /dev/null; then nvidia-smi || true; fi
}

export GPU_CHECK_OUT="$out"
if [[ $dry_run == 1 ]]; then
  # the same sections at toy sizes on the CPU
  slack=${GPU_CHECK_SLACK:-3}
  budget=$(( budget * slack ))
  model=(--preset gpt2-tiny --seq-len 32 --vocab 512 --steps 2 --warmup 1)
  mb=4
  maxbatch_range="2,4"
  export CUDA_VISIBLE_DEVICES="" DS_ACCELERATOR=cpu OMP_NUM_THREADS=1
  compile_backend=(--set perf.compile_backend=aot_eager)
else
  model=(--preset gpt2 --seq-len 1024 --steps 10 --warmup 3)
  mb=16
  maxbatch_range="64,512"
  compile_backend=()
fi

export -f setup
export python repo
section setup 60 20 bash -c setup
export PYTHONPATH="$repo:/tmp/ftl-gpu-check-site:$PYTHONPATH"  # the wheels first, as prepare.sh says
# ours compiled (the default on CUDA), with a profile of it and its host syncs per step
section point124m 120 60 "$python" -m engine.cli bench "${model[@]}" --micro-batch "$mb" --compile on \
  --baselines none --profile "${compile_backend[@]}" --out "$out/point124m"
# the same point eager: ours, the plain PyTorch loop, Hugging Face Trainer
section eager124m 60 30 "$python" -m engine.cli bench "${model[@]}" --micro-batch "$mb" --compile off \
  --baselines torch,hf --out "$out/eager124m"
section zero2 50 30 "$python" -m engine.cli bench "${model[@]}" --micro-batch "$mb" --compile off --backend zero2 \
  --baselines none --profile --out "$out/zero2"
section maxbatch 45 25 "$python" -m engine.cli bench "${model[@]}" --find-max-micro-batch --mb-range "$maxbatch_range" \
  --out "$out/maxbatch"
# tests/gpu, most telling first (the sections above already measure the gpu_heavy ones)
gpu_tests=(
  tests/gpu/test_fastpath_gpu.py::test_fused_chunked_loss_equals_the_plain_loss_on_gpu
  tests/gpu/test_fastpath_gpu.py::test_train_step_never_waits_on_the_host
  tests/gpu/test_fastpath_gpu.py::test_a_default_gpu_run_compiles_without_graph_breaks_and_passes_its_export_check
  tests/gpu/test_deepspeed_gpu.py::test_bf16_zero_on_one_gpu
  tests/gpu/test_fastpath_gpu.py::test_tf32_getters_and_the_deferred_final_step_on_gpu
  tests/gpu/test_gpu_smoke.py
  tests/gpu/test_fault_gpu.py
  tests/gpu/test_gpu_finetune.py
  tests/gpu/test_fastpath_gpu.py::test_inductor_compile_matches_eager_on_gpu
)
if [[ $dry_run == 1 ]]; then
  section tests 60 10 "$python" -m pytest -q -p no:cacheprovider "${gpu_tests[@]}" -m "not gpu_heavy" --co
else
  section tests 90 20 "$python" -m pytest -v -p no:cacheprovider "${gpu_tests[@]}" -m "not gpu_heavy" \
    --basetemp "$out/pytest"
fi
section report 30 5 "$python" "$here/gpu_check_report.py" "$out"
cat "$out/summary.md"
echo "results: $out" >&2
if [[ -n "$tarball" ]]; then
  tar czf "$tarball" -C "$out" --exclude='*-trace.json' --exclude=torch_extensions --exclude=_data --exclude=_runs \
    --exclude=pytest . && echo "packed: $tarball" >&2
fi
