#!/usr/bin/env bash
# Every GPU measurement the docs still lack, as ONE prepared command for a lent GPU machine (the device tool), so a
# session spends its few device minutes measuring, not debugging. Most important first; each step has its own time
# limit, cut to what is left of BUDGET seconds (default 540) for the whole script, so it ends inside a 600 s call.
# Steps that did not fit are named at the end with the STEPS value that runs just them in a second call.
#
# The GPU machine has no network, transformers 5.17 (retrofit needs >= 5.18), no `datasets`, no `evaluate` and no
# Fashion-MNIST. Once, here, in the repository root, gather them in two ignored folders:
#   printf '/.whl/\n/.data/\n' >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl transformers==5.24.0 \
#       datasets==5.2.0 evaluate==0.4.6 dill==0.4.1 multiprocess==0.70.19
#   mkdir -p .data && cp -r /usr/share/datasets/fashion-mnist .data/
# (transformers 5.24 needs only what that machine has: huggingface_hub >= 1.31, tokenizers 0.23, safetensors 0.8;
# 5.25 needs huggingface_hub >= 2.4, which it lacks), then call the device tool with carry [".whl", ".data"], the
# command `bash bench/gpu_session.sh` and timeout_s 600. About 55 MiB travel (the limit is 64).
#
# What comes back (the tool returns at most 8 files): $OUT/session.log (every table) and $OUT/results.tgz (every
# JSON, rewritten after each step, so a call cut short keeps what it measured). Try it out on a CPU first with tiny
# shapes: `SMOKE=1 DEVICE=cpu bash bench/gpu_session.sh` (tests do).
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-bench/results/gpu-session}
DEVICE=${DEVICE:-cuda}
BUDGET=${BUDGET:-540}
STEPS=${STEPS:-.*}  # a regular expression: only the steps whose names it matches whole run
PYTHON=${PYTHON:-python3}
WHEELS=${WHEELS:-.whl}
mkdir -p "$OUT"
WORK=$(mktemp -d)     # the JSON reports, sent back as results.tgz
SCRATCH=$(mktemp -d)  # models the steps write (the ViT-S/16 teacher), not sent back
LOG="$OUT/session.log"
: >"$LOG"
export PYTHONUNBUFFERED=1

if compgen -G "$WHEELS/*.whl" >/dev/null; then
    SITE=$(mktemp -d)
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        "$WHEELS"/*.whl || { echo "could not install the carried wheels" | tee -a "$LOG"; exit 1; }
    export PYTHONPATH=$SITE:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
[ -d .data/fashion-mnist ] && export RETROFIT_FASHION_MNIST_DIR=$PWD/.data/fashion-mnist

if [ "${SMOKE:-0}" = 1 ]; then  # every kind of step once, on the smallest shapes, to try the wiring out without a GPU
    MODELS="vit-ti16:6"; B=vit-ti16; KB=6; CHECKPOINTED=vit-ti16; POSITIONS=dinov3-vits16; BATCH=2; REPEATS=1
    GC_BATCH=2; SPEED_TIMING="--repeats 1 --warmup 1 --min-time 0 --latency-iters 2"; CURVE=1,2
    CURVE_COMPILE=eager; LOOP="--batch-size 2 --steps 6 --block 2 --repeats 1 --num-workers 1"; PRECISION=no
    # the ViT-S/16 recipe shrunk to a few steps of a tiny model at 32×32, scored on a few test images
    TEACHER=(--set pretrain.model.image_size=32 --set pretrain.model.hidden_size=32 --set pretrain.model.num_hidden_layers=4
        --set pretrain.model.num_attention_heads=2 --set pretrain.model.intermediate_size=64 --set training.max_steps=2
        --set data.limit=64 --set data.eval_limit=64 --set data.num_workers=0 --set training.mixed_precision=no
        --set pretrain.model.patch_size=4 --set training.batch_size=16)
    SMALL=(--settings 2:4 --images 64 --seeds 0 --min-steps 2 --eval-limit 64 --num-workers 0 --mixed-precision no)
    SMALL_FULL=(--settings 2:4 --images 128 --seeds 0 --min-steps 2 --eval-limit 64 --num-workers 0 --mixed-precision no)
else
    MODELS="vit-b16:6 vit-l16:12 vit-h14:16"; B=vit-b16; KB=6; CHECKPOINTED="vit-b16 vit-h14"
    POSITIONS=dinov3-vitb16,dinov3-vitl16,beit-b16,beit-l16; BATCH=256; REPEATS=10; GC_BATCH=128
    SPEED_TIMING="--repeats 3"; CURVE=1,2,4,8,16,32,64,128,256; CURVE_COMPILE=eager,reduce-overhead
    LOOP="--batch-size 128 --steps 60 --block 5 --repeats 3 --num-workers 8"; PRECISION=bf16
    TEACHER=()
    SMALL=(--settings 6:8,3:8 --images 2000 --seeds 0,1,2 --num-workers 8 --mixed-precision bf16)
    SMALL_FULL=(--settings 6:8,3:8 --images 60000 --seeds 0 --num-workers 8 --mixed-precision bf16)
fi
DTYPE=$([ "$DEVICE" = cpu ] && echo fp32 || echo bf16)
START=$SECONDS
FAILED=0
SKIPPED=()
NODATA=0  # set by the preflight when Fashion-MNIST cannot be read: the steps that need it are skipped

# step NAME LIMIT COMMAND...: run COMMAND (JSON to $WORK/NAME.json when it takes --json) within LIMIT seconds and
# what is left of the budget; a step left out by STEPS is silent, one the budget cannot fit is named at the end.
step() {
    local name=$1 limit=$2 left
    shift 2
    [[ $name =~ ^($STEPS)$ ]] || return 0
    left=$((BUDGET - (SECONDS - START)))
    if [ "$left" -lt 30 ]; then
        echo "== $name: skipped (${BUDGET} s budget spent)" | tee -a "$LOG"
        SKIPPED+=("$name")
        return
    fi
    # the smoke run's tiny steps may use the whole budget left: the limits are the GPU's, and a loaded CPU ran the
    # smoke's loop step (8 data workers on 2 cores) past its 180 s, which failed the test of the script's wiring
    { [ "${SMOKE:-0}" = 1 ] || [ "$limit" -gt "$left" ]; } && limit=$left
    echo "== $name ($((SECONDS - START)) s in, ${limit} s at most): $*" | tee -a "$LOG"
    if ! timeout "$limit" "$@" 2>&1 | tee -a "$LOG"; then
        echo "== $name: FAILED or timed out after ${limit} s" | tee -a "$LOG"
        FAILED=$((FAILED + 1))
    fi
    tar czf "$OUT/results.tgz" -C "$WORK" .  # every JSON so far: a call cut short keeps them
}

# data_step NAME LIMIT COMMAND...: a step that reads Fashion-MNIST
data_step() {
    if [ "$NODATA" = 1 ] && [[ $1 =~ ^($STEPS)$ ]]; then
        echo "== $1: skipped (no Fashion-MNIST, see the preflight)" | tee -a "$LOG"
        FAILED=$((FAILED + 1))
        return
    fi
    step "$@"
}

# teacher_step NAME LIMIT COMMAND...: a data step that fine-tunes the ViT-S/16 teacher the step teacher-vit-s16 trains
teacher_step() {
    if [ -f "$SCRATCH/vit-s16/config.json" ] || ! [[ $1 =~ ^($STEPS)$ ]]; then
        data_step "$@"
    elif [[ " ${SKIPPED[*]} " =~ " teacher-vit-s16 " ]]; then
        echo "== $1: skipped (its teacher was)" | tee -a "$LOG"
        SKIPPED+=("$1")
    else
        echo "== $1: skipped (no teacher: run teacher-vit-s16 with it)" | tee -a "$LOG"
        FAILED=$((FAILED + 1))
    fi
}

# Preflight (seconds, one process): the versions, retrofit importable (else exit 3: nothing can run), Fashion-MNIST
# readable through retrofit's data path (else exit 4: the steps that need it are skipped).
"$PYTHON" - <<'PREFLIGHT' 2>&1 | tee -a "$LOG"
import sys, traceback
import torch, transformers
device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
print("torch", torch.__version__, "transformers", transformers.__version__, "device", device, flush=True)
try:
    import retrofit.benchmark
except Exception:
    traceback.print_exc()
    sys.exit(3)
try:
    import evaluate
    from retrofit.data import load_split
    print("Fashion-MNIST test split:", len(load_split("fashion-mnist", "test")), "images")
except Exception:
    traceback.print_exc()
    sys.exit(4)
PREFLIGHT
case ${PIPESTATUS[0]} in
    0) ;;
    4) echo "== no Fashion-MNIST through retrofit.data (carry .data and the datasets wheels): its steps are skipped" \
        | tee -a "$LOG"
       NODATA=1 ;;
    *) echo "== retrofit does not import: nothing can run (carry the wheels named at the top)" | tee -a "$LOG"
       exit 1 ;;
esac

# 0. Issue 21: below which batch size is the merged ViT-B/16 slower than its source? The whole curve, eager and with
#    CUDA graphs (reduce-overhead), plotted afterwards from the JSON with `retrofit.benchmark.plot_batch_sizes`.
step "curve-$B" 240 "$PYTHON" bench/speed.py --models "$B" --merge "$KB:8" --device "$DEVICE" --dtype "$DTYPE" \
    --batch-size "$CURVE" --compile "$CURVE_COMPILE" $SPEED_TIMING --json "$WORK/curve-$B.json"
# 0b. Issue 21 item 5: the training loop's overhead over the bare kd step at ViT-B/16 (Fashion-MNIST upscaled to 224
#     by the processor, as a user's images are prepared), with the data prepared by worker processes.
data_step "loop-$B" 180 "$PYTHON" bench/loop_overhead.py --model "$B" --merge "$KB:8" --device "$DEVICE" \
    --mixed-precision "$PRECISION" $LOOP --json "$WORK/loop-$B.json"
# 1. Issue 4's open target (speed-up >= 0.95 x FLOPs ratio) and issue 21 item 2: the hook-free ratio with the model's
#    conv patch embedding, and with the merged model alone computing it as one GEMM (should exports do that?).
layers() {  # layers MODEL K VARIANT
    local args=(--patch-embed "${3%%-merged-only}")
    [ "$3" = gemm-merged-only ] && args+=(--merged-only)
    step "layers-$1-$3" 120 "$PYTHON" bench/layer_times.py --model "$1" --merge "$2:8" --batch-size "$BATCH" \
        --dtype "$DTYPE" --device "$DEVICE" --repeats "$REPEATS" "${args[@]}" --json "$WORK/layers-$1-$3.json"
}
layers "$B" "$KB" conv
layers "$B" "$KB" gemm-merged-only
# 2. Issue 23 item 5: small-data recovery at a real width. A ViT-S/16-shaped teacher trained from scratch on
#    Fashion-MNIST upscaled to 224 (recipes/fashion-mnist-vit-s16.yaml), then the default fine-tune (kd, the step
#    floor) on 2,000 images at K=6 M=8 and K=3 M=8, three paired seeds, scored on the 10,000 test images.
data_step "teacher-vit-s16" 150 "$PYTHON" -m retrofit run recipes/fashion-mnist-vit-s16.yaml --overwrite \
    --set export.output="$SCRATCH/vit-s16" --set export.checkpoint_dir="$SCRATCH/checkpoints" "${TEACHER[@]}"
teacher_step "small-data-vit-s16" 240 "$PYTHON" bench/small_data.py --source "$SCRATCH/vit-s16" --runs default \
    "${SMALL[@]}" --eval-batch-size 500 --json "$WORK/small-data-vit-s16.json"
# 3. The rest of issue 21 item 2: B with a channels-last conv, L/16 and H/14 with all three.
layers "$B" "$KB" channels-last
for spec in $MODELS; do
    model=${spec%%:*} k=${spec##*:}
    [ "$model" = "$B" ] && continue
    for variant in conv gemm-merged-only channels-last; do
        layers "$model" "$k" "$variant"
    done
done
# 4. Does 9-token attention after the merge suit another SDPA backend better?
for backend in math efficient cudnn; do
    [ "$DEVICE" = cpu ] && [ "$backend" != math ] && continue  # the fused backends are CUDA-only
    step "layers-$B-sdpa-$backend" 120 "$PYTHON" bench/layer_times.py --model "$B" --merge "$KB:8" \
        --batch-size "$BATCH" --dtype "$DTYPE" --device "$DEVICE" --repeats "$REPEATS" --merged-sdpa "$backend" \
        --json "$WORK/layers-$B-sdpa-$backend.json"
done
# 5. The families whose merged layers place the merged tokens (DINOv3: RoPE at their mean positions; BEiT: the
#    merge-weighted relative position bias, per image): only CPU numbers so far. (BEiT has no shape small enough for
#    the CPU smoke run; its shapes take the same code path here.)
step "speed-positions" 180 "$PYTHON" bench/speed.py --models "$POSITIONS" --merge half:8 --device "$DEVICE" \
    --dtype "$DTYPE" --batch-size "1,$BATCH" $SPEED_TIMING --json "$WORK/speed-positions.json"
# 6. finetune --gradient-checkpointing on a GPU: memory and step time without and with it.
for model in $CHECKPOINTED; do
    step "checkpointing-$model" 150 "$PYTHON" bench/gradient_checkpointing.py --model "$model" --merge half:8 \
        --device "$DEVICE" --dtype "$DTYPE" --batch-size "$GC_BATCH" --steps 3 --json "$WORK/checkpointing-$model.json"
done
# 7. Issue 23 item 5 on all 60,000 training images (one seed): the ViT-S's ceiling, beside its 2,000-image numbers.
teacher_step "full-data-vit-s16" 120 "$PYTHON" bench/small_data.py --source "$SCRATCH/vit-s16" --runs default \
    "${SMALL_FULL[@]}" --eval-batch-size 500 --json "$WORK/full-data-vit-s16.json"

tar czf "$OUT/results.tgz" -C "$WORK" . && rm -rf "$WORK" "$SCRATCH"
echo "== done in $((SECONDS - START)) s, $FAILED step(s) failed; tables in $LOG, JSON in $OUT/results.tgz" | tee -a "$LOG"
if [ ${#SKIPPED[@]} -gt 0 ]; then
    # the small-data steps fine-tune the teacher, which a fresh machine must train again
    [[ " ${SKIPPED[*]} " =~ -data-vit-s16 && ! " ${SKIPPED[*]} " =~ " teacher-vit-s16 " ]] \
        && SKIPPED=(teacher-vit-s16 "${SKIPPED[@]}")
    echo "== not run for lack of time; next call: STEPS='$(IFS='|'; echo "${SKIPPED[*]}")' bash bench/gpu_session.sh" \
        | tee -a "$LOG"
fi
exit $((FAILED > 0))
