#!/usr/bin/env bash
# Re-measure every number README.md and docs/*.md quote, printing each with the command that produced it,
# the machine and the date. It takes long (the whole set: about an hour on 2 idle CPU cores) and is not run
# in CI; tests/unit/test_docs.py checks that every command it lists parses (--list).
#
#   bash benchmarks/docs_numbers.sh                   # every section
#   bash benchmarks/docs_numbers.sh default deploy    # some sections (--sections lists them)
#   bash benchmarks/docs_numbers.sh --list            # print the commands only, run nothing
#
# Runs in $FTL_NUMBERS_DIR (default /tmp/ftl-docs-numbers, emptied first unless FTL_NUMBERS_KEEP=1), from
# where the docs' commands work as written: examples/ is linked there and runs/ is written there. Needs
# `pip install -e ".[test]"` (peft for the LoRA rows). Offline: set HF_HUB_OFFLINE=1 if you like; nothing
# here downloads. Paste the printed numbers into the page named in each section's title, with the date.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
SECTIONS=(default tests deepspeed backends checkpoint_digests classification lora_sizes sft long_inputs long_context long_context_memory sweep deploy explain)
LIST=0
case "${1:-}" in
    --list) LIST=1; shift ;;
    --sections) echo "${SECTIONS[*]}"; exit 0 ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
esac
WANT=("$@")
((${#WANT[@]})) || WANT=("${SECTIONS[@]}")
for s in "${WANT[@]}"; do
    [[ " ${SECTIONS[*]} " == *" $s "* ]] || { echo "docs_numbers.sh: unknown section $s (sections: ${SECTIONS[*]})" >&2; exit 2; }
done

PY=${PYTHON:-python}
W=${FTL_NUMBERS_DIR:-/tmp/ftl-docs-numbers}

# run CMD: print it (--list: only print it), then run it from $W.
run() {
    if ((LIST)); then echo "$*"; return 0; fi
    echo "\$ $*"
    (cd "$W" && eval "$*")
}
# say TEXT: a result line (nothing under --list).
say() { ((LIST)) || echo "  => $*"; }
section() { if ((LIST)); then echo "# $1"; else echo; echo "=== $1"; fi; }
# last_eval RUN KEY...: the last evaluation's values of a run directory
last_eval() {
    ((LIST)) && return 0
    "$PY" - "$W/$1" "${@:2}" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1] + "/metrics.jsonl") if l.strip()]
ev = [r for r in rows if any(k.startswith("eval_") for k in r)]
first, last = ev[0], ev[-1]
print("  => " + " | ".join(f"{k} {last[k]:.4g}" for k in sys.argv[2:]) + f"  (step {last['step']}; before training: "
      + " | ".join(f"{k} {first[k]:.4g}" for k in sys.argv[2:]) + ")")
EOF
}

if ((!LIST)); then
    if [[ -z ${FTL_NUMBERS_KEEP:-} ]]; then rm -rf "$W"; fi
    mkdir -p "$W"
    ln -sfn "$ROOT/examples" "$W/examples"
    ln -sfn "$ROOT/ds_configs" "$W/ds_configs"
    echo "machine: $(nproc) CPUs, $(uname -m), load $(cut -d' ' -f1-3 /proc/loadavg); $(date -u +%F)"
    "$PY" -c "import torch, transformers; print(f'torch {torch.__version__}, transformers {transformers.__version__}, cuda {torch.cuda.is_available()}')"
    echo "workdir: $W"
fi

has() { [[ " ${WANT[*]} " == *" $1 "* ]]; }
need_default() {  # runs/default: the base of the LoRA, long-context, sweep, deploy and explain sections
    ((LIST)) || [[ -f $W/runs/default/final/config.json ]] || run ftl train --no-progress
}

if has default; then
    section "default job (README.md: wall time, tokens/s, perplexities, peak RSS; measure on an idle machine)"
    # An empty Hugging Face cache, as a newcomer has: tokenization is not cached from an earlier run.
    run HF_HOME="$W/hf-empty" /usr/bin/time -v ftl train --no-progress --set run.name=numbers-default '2>' numbers-default.log
    if ((!LIST)); then
        grep -E "Elapsed \(wall|Maximum resident" "$W/numbers-default.log" | sed 's/^\s*/  => /'
        "$PY" - "$W/runs/numbers-default/metrics.jsonl" <<'EOF'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
tps = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r]
ppl = [r["eval_ppl"] for r in rows if "eval_ppl" in r]
print(f"  => tokens/s median {statistics.median(tps):,.0f} (min {min(tps):,.0f}, max {max(tps):,.0f}); "
      f"eval perplexity {ppl[0]:,.0f} before, {ppl[-1]:,.0f} after")
EOF
    fi
fi

if has tests; then
    section "test suite (README.md: fresh-clone .ci/run time, passed/skipped)"
    run git clone -q "$ROOT" ci-clone '&&' cd ci-clone '&&' /usr/bin/time -f "'%e s wall'" bash .ci/run '2>&1' '|' tail -n 4
fi

if has deepspeed; then
    section "DeepSpeed ZeRO table (docs/distributed.md, Memory report)"
    run "$PY" "$ROOT/benchmarks/deepspeed_zero.py"
fi

if has backends; then
    section "the same run under every backend (docs/distributed.md: losses and bytes of DDP, ZeRO 1-3, FSDP2)"
    run "$PY" "$ROOT/benchmarks/backends_cpu.py" --out "$W/backends-cpu"
fi

if has checkpoint_digests; then
    section "what checkpoint digests cost (docs/fault-tolerance.md)"
    run "$PY" "$ROOT/benchmarks/checkpoint_digests.py" --preset gpt2-medium --repeats 3 --dir "$W/ckbench"
fi

if has classification; then
    section "classification walkthrough (docs/fine-tuning.md: imbalance, baseline, macro-F1 table at 1 and 2 threads, seeds)"
    run OMP_NUM_THREADS=1 ftl data stats examples/classification.yaml --split validation '|' grep -E "'^labels|baseline'"
    run OMP_NUM_THREADS=1 ftl train examples/classification.yaml --no-progress '2>' cls-balanced.log
    last_eval runs/stdlib-packages eval_macro_f1 eval_accuracy
    # deterministic per thread count, so the page quotes the machine's default (2 threads here) as well
    run OMP_NUM_THREADS=2 ftl train examples/classification.yaml --no-progress --set run.name=cls-2threads '2>' cls-2threads.log
    last_eval runs/cls-2threads eval_macro_f1 eval_accuracy
    run OMP_NUM_THREADS=1 ftl train examples/classification.yaml --no-progress --set run.name=cls-uniform --set data.balanced_sampling=false '2>' cls-uniform.log
    last_eval runs/cls-uniform eval_macro_f1 eval_accuracy
    run OMP_NUM_THREADS=1 ftl train examples/classification.yaml --no-progress --set run.name=cls-weights --set data.balanced_sampling=false --set loss.class_weights=auto '2>' cls-weights.log
    last_eval runs/cls-weights eval_macro_f1 eval_accuracy
    for seed in 1 2 3 4 5; do
        run OMP_NUM_THREADS=1 ftl train examples/classification.yaml --no-progress --set run.name=cls-seed$seed --set run.seed=$seed '2>' cls-seed$seed.log
        last_eval runs/cls-seed$seed eval_macro_f1
    done
    # The pre-trained LM rows. Reconstructed: the settings of the 2026-11-25 LM (1,000 steps of gpt2-tiny on
    # builtin:stdlib, eval perplexity 50) were not recorded beyond that.
    run OMP_NUM_THREADS=1 ftl train --no-progress --set run.name=stdlib-lm --set model.name=gpt2-tiny --set data.source=builtin:stdlib --set data.seq_len=64 --set data.tokenizer_vocab=1024 --set train.max_steps=1000 --set train.sample_tokens=0 '2>' stdlib-lm.log
    last_eval runs/stdlib-lm eval_ppl
    run OMP_NUM_THREADS=1 ftl train examples/classification.yaml --no-progress --set run.name=cls-lm-full --set model.name=runs/stdlib-lm/final --set optim.layer_lr_decay=0.8 '2>' cls-lm-full.log
    last_eval runs/cls-lm-full eval_macro_f1 eval_accuracy
    run OMP_NUM_THREADS=1 ftl train examples/lora.yaml --no-progress --set run.name=cls-lm-lora --set model.name=runs/stdlib-lm/final '2>' cls-lm-lora.log
    last_eval runs/cls-lm-lora eval_macro_f1 eval_accuracy
    run OMP_NUM_THREADS=1 ftl train examples/classification.yaml --no-progress --set run.name=cls-lm-probe --set model.name=runs/stdlib-lm/final --set model.freeze=body '2>' cls-lm-probe.log
    last_eval runs/cls-lm-probe eval_macro_f1 eval_accuracy
fi

if has lora_sizes; then
    section "LoRA sizes (docs/fine-tuning.md, Transfer learning: trainable parameters and adapter bytes at rank 8)"
    run "$PY" "$ROOT/benchmarks/lora_sizes.py" runs/cls-lm-lora runs/stdlib-packages
fi

if has sft; then
    section "chat fine-tuning (docs/sft.md: the walkthrough's losses and packing efficiency, then packing against padding)"
    run ftl train examples/sft.yaml --no-progress '2>&1' '|' grep -E "'^data: (train|validation)|eval (before|after)'"
    last_eval runs/sft-chat eval_loss eval_ppl
    run "$PY" "$ROOT/benchmarks/sft_packing.py" --out "$W/sft-packing"
fi

if has long_inputs; then
    section "long inputs (docs/fine-tuning.md, Long inputs)"
    run ftl train examples/long_inputs.yaml --no-progress '2>&1' '|' grep -E "'^model|after training'"
    run ftl train examples/long_inputs.yaml --no-progress --set run.name=long-window --set data.overflow=window --set data.stride=8 '2>&1' '|' grep -E "'^model|after training'"
    run ftl eval runs/long-window --data examples/data/long_docs.jsonl
fi

if has long_context; then
    section "more than 1,024 positions (docs/fine-tuning.md)"
    need_default
    run ftl train examples/long_context.yaml --no-progress '2>&1' '|' grep -E "'^model|^step|after training'"
    run "$PY" -c "\"from transformers import AutoModelForCausalLM as M; m = M.from_pretrained('runs/long-context/final'); print(m.config.n_positions, tuple(m.transformer.wpe.weight.shape))\""
fi

if has long_context_memory; then
    section "activation memory of long sequences (docs/fine-tuning.md, benchmarks/LONG_CONTEXT.md)"
    run "$PY" "$ROOT/benchmarks/long_context.py"
fi

if has sweep; then
    section "sweep (docs/sweeps.md)"
    need_default
    run /usr/bin/time -f "'%e s wall'" ftl sweep examples/sweep.yaml --grid optim.lr=3e-4,1e-3,3e-3,1e-2 --grid train.micro_batch=8,16 --rungs 10,20 --out sweeps/lr '2>' sweep.log
    ((LIST)) || tail -n 1 "$W/sweep.log"
    run ftl sweep examples/sweep.yaml --random 3 --seed 1 --grid optim.lr=loguniform:1e-5:1e-3 --grid model.dropout=uniform:0:0.2 --grid train.micro_batch=8,16 --dry-run
fi

if has deploy; then
    section "export, generate, serve (docs/deployment.md)"
    need_default
    run ftl export runs/default --format onnx --out exported/default-onnx
    run ls exported/default-onnx
    run ftl export runs/default/final --format torchscript --out exported/default-ts
    run ftl export runs/default/checkpoints/step-000300 --format hf --out exported/default-step300
    run printf "'The with statement\nA class definition\n\nThe import statement\n'" '>' /tmp/prompts.txt
    run ftl generate runs/default --prompts-file /tmp/prompts.txt --max-new-tokens 12 --seed 0
    run ftl generate runs/default/final --prompt "'The with statement'" --max-new-tokens 40
    run ftl serve runs/default --port 8765 --quiet '&' sleep 20 '&&' curl -s localhost:8765/health '&&' echo \
        '&&' curl -s localhost:8765/generate -d "'{\"prompts\": [\"A class\", \"The import\"], \"max_new_tokens\": 6, \"temperature\": 0}'" '&&' echo \
        '&&' curl -s -w "'%{http_code}\n'" localhost:8765/generate -d "'{\"prompt\": 5, \"max_new_tokens\": 100000, \"colour\": \"blue\"}'" \
        '&&' "$PY" -c "\"import json; print(json.dumps({'prompt': 'x' * 70000}))\"" '>' /tmp/big.json \
        '&&' curl -s -w "'%{http_code}\n'" localhost:8765/generate --data-binary @/tmp/big.json ';' kill '$!'
    run ftl eval runs/default --data builtin:pydoc
fi

if has explain; then
    section "explain (docs/evaluation.md)"
    need_default
    run ftl explain runs/default --text "'The with statement is used to wrap the execution of a'" --attention 3:mean
fi
