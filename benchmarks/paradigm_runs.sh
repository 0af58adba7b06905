#!/usr/bin/env bash
# Same-budget CPU runs on the moving digits: video-only vs joint image-video (VDM), and the
# temporal ops attention / conv1d / shift / causal_attention, then one table of sample scores
# (digit accuracy, temporal consistency, motion-direction accuracy) via effvid-runs compare.
#
#   benchmarks/paradigm_runs.sh [STEPS]        # default 400 steps per run
#
# Environment: DATA_ROOT (holds digits/shards/{train,val}; default data), IMAGE_ROOT (where
# digit image shards are made if missing; default $DATA_ROOT), RUNS_DIR (default runs),
# PREFIX (run-id prefix; default bench-<time>). Runs are sequential; ~0.4 s/step each alone
# on 2 cores, plus one validation (sampling) at the end.
set -euo pipefail
STEPS=${1:-400}
DATA_ROOT=${DATA_ROOT:-data}
IMAGE_ROOT=${IMAGE_ROOT:-$DATA_ROOT}
RUNS_DIR=${RUNS_DIR:-runs}
PREFIX=${PREFIX:-bench-$(date +%H%M%S)}
IMAGES=$IMAGE_ROOT/digits/image_shards/train

if [ ! -d "$IMAGES" ]; then
  effvid-data digits --images --out "$IMAGE_ROOT/digit_images" --num-videos 2000 --num-val 64
  effvid-data images --input "$IMAGE_ROOT/digit_images/train" --out "$IMAGES" --shard-size 250
fi

# The quickstart recipe's frozen text tower (its caption-clip stage), trained once per runs dir.
if [ ! -f "$RUNS_DIR/digits-text/checkpoints/last.ckpt" ]; then
  effvid-train experiment=digits_text_pretraining run_id=digits-text data_root="$DATA_ROOT" runs_dir="$RUNS_DIR"
fi

COMMON=(
  data_root="$DATA_ROOT" runs_dir="$RUNS_DIR" trainer.max_steps="$STEPS"
  trainer.val_check_interval="$STEPS" callbacks.checkpoint.every_n_train_steps="$STEPS"
  paradigm.val_samples_per_prompt=2 trainer.limit_val_batches=1 +trainer.enable_progress_bar=false
  callbacks.ema.update_starting_at_step=$((STEPS / 3)) paradigm.lr_scheduler.num_warmup_steps=$((STEPS / 12))
)
run() {  # run ID ARGS...
  local id=$PREFIX-$1; shift
  echo "=== $id $(date +%T)"
  effvid-train run_id="$id" "${COMMON[@]}" "$@"
  IDS+=("$id")
}
IDS=()
run video-attention experiment=digits_quickstart model/temporal=attention
run joint-attention experiment=vdm data.images.train_shards="$IMAGES"
run video-conv1d experiment=digits_quickstart model/temporal=conv1d
run video-shift experiment=digits_quickstart model/temporal=shift
run video-causal experiment=digits_quickstart model/temporal=causal_attention

echo "=== done $(date +%T)"
effvid-runs compare --runs-dir "$RUNS_DIR" --format markdown \
  --metrics val/digit_accuracy,val/temporal_consistency,val/direction_accuracy,val/loss,train/loss "${IDS[@]}"
