#!/usr/bin/env bash
# Make-A-Video's three stages on the moving digits, short CPU runs: clip (contrastive CLIP on
# digit image-caption shards) -> t2i (spatial layers on images, CLIP image embedding) ->
# video (temporal convs on uncaptioned clips, spatial layers frozen). Prints each stage's
# final metrics: val/zero_shot_accuracy of the CLIP, then the digit metric of text-prompted
# samples (through the prior) after t2i and after the video stage.
#
#   benchmarks/make_a_video_stages.sh [CLIP_STEPS] [T2I_STEPS] [VIDEO_STEPS]   # default 300 300 300
#
# Environment: DATA_ROOT (holds digits/shards and digits/image_shards; default data),
# RUNS_DIR (default runs), PREFIX (run-id prefix; default mav-<time>).
set -euo pipefail
CLIP_STEPS=${1:-300}; T2I_STEPS=${2:-300}; VIDEO_STEPS=${3:-300}
DATA_ROOT=${DATA_ROOT:-data}
RUNS_DIR=${RUNS_DIR:-runs}
PREFIX=${PREFIX:-mav-$(date +%H%M%S)}
COMMON=(data_root="$DATA_ROOT" runs_dir="$RUNS_DIR" +trainer.enable_progress_bar=false trainer.limit_val_batches=1)
stage() {  # stage NAME STEPS ARGS...
  local name=$1 steps=$2; shift 2
  echo "=== $PREFIX-$name $(date +%T)"
  effvid-train run_id="$PREFIX-$name" "${COMMON[@]}" trainer.max_steps="$steps" trainer.val_check_interval="$steps" \
    callbacks.checkpoint.every_n_train_steps="$steps" "$@"
}
CLIP=$RUNS_DIR/$PREFIX-clip/checkpoints/last.ckpt
stage clip "$CLIP_STEPS" experiment=make_a_video_clip
stage t2i "$T2I_STEPS" experiment=make_a_video_t2i paradigm.clip.weights="$CLIP" \
  callbacks.ema.update_starting_at_step=$((T2I_STEPS / 3)) paradigm.lr_scheduler.num_warmup_steps=$((T2I_STEPS / 12))
stage video "$VIDEO_STEPS" experiment=make_a_video paradigm.clip.weights="$CLIP" \
  paradigm.init_from="$RUNS_DIR/$PREFIX-t2i/checkpoints/last.ckpt" \
  callbacks.ema.update_starting_at_step=$((VIDEO_STEPS / 3)) paradigm.lr_scheduler.num_warmup_steps=$((VIDEO_STEPS / 12))
echo "=== done $(date +%T)"
