#!/usr/bin/env bash
# Every GPU measurement the docs still lack, as ONE prepared command for a lent GPU machine (the device tool), so a
# session spends its few device minutes measuring, not debugging. Most important first; each step has its own time
# limit and the whole script stops starting steps after BUDGET seconds (default 480), well inside a 600 s call.
#
# The GPU machine has no network and transformers 5.17 (retrofit needs >= 5.18), so carry a newer one as a wheel.
# Once, here, in the repository root:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl transformers==5.24.0
# then call the device tool with carry [".whl"] and the command `bash bench/gpu_session.sh` (timeout_s 600).
#
# What comes back (the tool returns at most 8 files): $OUT/session.log (every table) and $OUT/results.tgz (every
# JSON). Try it out on a CPU first with tiny shapes: `SMOKE=1 DEVICE=cpu bash bench/gpu_session.sh` (tests do).
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-bench/results/gpu-session}
DEVICE=${DEVICE:-cuda}
BUDGET=${BUDGET:-480}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
WORK=$(mktemp -d)
LOG="$OUT/session.log"
: >"$LOG"
export PYTHONUNBUFFERED=1

if compgen -G ".whl/*.whl" >/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "could not install the carried wheels" | tee -a "$LOG"; exit 1; }
    export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}

if [ "${SMOKE:-0}" = 1 ]; then  # every kind of step once, on the smallest shapes, to try the wiring out without a GPU
    MODELS="vit-ti16:6"; B=vit-ti16; KB=6; CHECKPOINTED=vit-ti16; POSITIONS=dinov3-vits16; BATCH=2; REPEATS=1
    GC_BATCH=2; SPEED_TIMING="--repeats 1 --warmup 1 --min-time 0 --latency-iters 2"; CURVE=1,2
    CURVE_COMPILE=eager; LOOP="--batch-size 2 --steps 4 --repeats 1"; PRECISION=no
else
    MODELS="vit-b16:6 vit-l16:12 vit-h14:16"; B=vit-b16; KB=6; CHECKPOINTED="vit-b16 vit-h14"
    POSITIONS=dinov3-vitb16,dinov3-vitl16,beit-b16,beit-l16; BATCH=256; REPEATS=10; GC_BATCH=128
    SPEED_TIMING="--repeats 3"; CURVE=1,2,4,8,16,32,64,128,256; CURVE_COMPILE=eager,reduce-overhead
    LOOP="--batch-size 128 --steps 40 --repeats 3"; PRECISION=bf16
fi
DTYPE=$([ "$DEVICE" = cpu ] && echo fp32 || echo bf16)
START=$SECONDS
FAILED=0

# step NAME LIMIT COMMAND...: run COMMAND (JSON to $WORK/NAME.json when it takes --json) unless the budget is spent.
step() {
    local name=$1 limit=$2
    shift 2
    if [ $((SECONDS - START)) -ge "$BUDGET" ]; then
        echo "== $name: skipped (budget of ${BUDGET} s spent)" | tee -a "$LOG"
        return
    fi
    echo "== $name ($((SECONDS - START)) s in): $*" | tee -a "$LOG"
    if ! timeout "$limit" "$@" 2>&1 | tee -a "$LOG"; then
        echo "== $name: FAILED or timed out after ${limit} s" | tee -a "$LOG"
        FAILED=$((FAILED + 1))
    fi
}

"$PYTHON" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, \
'device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')" 2>&1 | tee -a "$LOG"

# 0. Issue 21: below which batch size is the merged ViT-B/16 slower than its source? The whole curve, eager and with
#    CUDA graphs (reduce-overhead), plotted afterwards from the JSON with `retrofit.benchmark.plot_batch_sizes`.
step "curve-$B" 240 "$PYTHON" bench/speed.py --models "$B" --merge "$KB:8" --device "$DEVICE" --dtype "$DTYPE" \
    --batch-size "$CURVE" --compile "$CURVE_COMPILE" $SPEED_TIMING --json "$WORK/curve-$B.json"
# 0b. Issue 21 item 5: the training loop's overhead over the bare kd step at ViT-B/16 (Fashion-MNIST upscaled to 224
#     by the processor, as a user's images are prepared), with the data prepared by worker processes.
step "loop-$B" 180 "$PYTHON" bench/loop_overhead.py --model "$B" --merge "$KB:8" --device "$DEVICE" \
    --mixed-precision "$PRECISION" --num-workers 8 $LOOP --json "$WORK/loop-$B.json"
# 1. Issue 4's open target (speed-up >= 0.95 x FLOPs ratio): the hook-free ratio with the model's conv patch embedding,
#    and with the merged model alone computing it as one GEMM (the question: should exports do that?).
for spec in $MODELS; do
    model=${spec%%:*} k=${spec##*:}
    for variant in conv gemm-merged-only channels-last; do
        args=(--patch-embed "${variant%%-merged-only}")
        [ "$variant" = gemm-merged-only ] && args+=(--merged-only)
        step "layers-$model-$variant" 120 "$PYTHON" bench/layer_times.py --model "$model" --merge "$k:8" \
            --batch-size "$BATCH" --dtype "$DTYPE" --device "$DEVICE" --repeats "$REPEATS" "${args[@]}" \
            --json "$WORK/layers-$model-$variant.json"
    done
done
# 2. Does 9-token attention after the merge suit another SDPA backend better?
for backend in math efficient cudnn; do
    [ "$DEVICE" = cpu ] && [ "$backend" != math ] && continue  # the fused backends are CUDA-only
    step "layers-$B-sdpa-$backend" 120 "$PYTHON" bench/layer_times.py --model "$B" --merge "$KB:8" \
        --batch-size "$BATCH" --dtype "$DTYPE" --device "$DEVICE" --repeats "$REPEATS" --merged-sdpa "$backend" \
        --json "$WORK/layers-$B-sdpa-$backend.json"
done
# 3. The families whose merged layers place the merged tokens (DINOv3: RoPE at their mean positions; BEiT: the
#    merge-weighted relative position bias, per image): only CPU numbers so far. (BEiT has no shape small enough for
#    the CPU smoke run; its shapes take the same code path here.)
step "speed-positions" 180 "$PYTHON" bench/speed.py --models "$POSITIONS" --merge half:8 --device "$DEVICE" \
    --dtype "$DTYPE" --batch-size "1,$BATCH" $SPEED_TIMING --json "$WORK/speed-positions.json"
# 4. finetune --gradient-checkpointing on a GPU: memory and step time without and with it.
for model in $CHECKPOINTED; do
    step "checkpointing-$model" 150 "$PYTHON" bench/gradient_checkpointing.py --model "$model" --merge half:8 \
        --device "$DEVICE" --dtype "$DTYPE" --batch-size "$GC_BATCH" --steps 3 --json "$WORK/checkpointing-$model.json"
done

tar czf "$OUT/results.tgz" -C "$WORK" . && rm -rf "$WORK"
echo "== done in $((SECONDS - START)) s, $FAILED step(s) failed; tables in $LOG, JSON in $OUT/results.tgz" | tee -a "$LOG"
exit $((FAILED > 0))
