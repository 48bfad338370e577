#!/usr/bin/env bash
# ImageNet-1k on one node with 8 GPUs, supervised FKD: a classifier teacher's top-5 soft labels
# over R = 500 stored views per image -> ResNet-50 student with 4 crops per image per step.
# Explained in docs/recipes/README.md.
#
#   bash docs/recipes/imagenet_sup.sh STEP        STEP: targets | students | baselines
#
# Every step resumes when it is run again with the same settings.
set -euo pipefail
cd "$(dirname "$0")/../.."

IMNET=${IMNET:-/ssd/imagenet}          # $IMNET/train/<class>/*.JPEG and $IMNET/val/<class>/*.JPEG
RUNS=${RUNS:-/ssd/fkd_runs}            # run folders and stores: a local NVMe SSD
CACHE=${CACHE:-/ssd/fkd_cache}
NPROC=${NPROC:-8}
WORKERS=${WORKERS:-10}
# The classifier teacher: a local plain timm state dict and its timm name (FKD used an
# EfficientNet-L2 at 475 px), or TEACHER=effnet-lite0 (shipped, weaker; TEACHER_ARCH is then
# ignored: set it empty).
TEACHER=${TEACHER:-/ssd/teachers/tf_efficientnet_l2.ns_jft_in1k_475.safetensors}
TEACHER_ARCH=${TEACHER_ARCH-tf_efficientnet_l2.ns_jft_in1k_475}
VIEW_SIZE=${VIEW_SIZE:-475}            # the side the teacher sees (224 for effnet-lite0)
DATA="imagefolder:$IMNET"
TR="torchrun --standalone --nproc_per_node=$NPROC"

STORE=$RUNS/store-sup-R500-top5
LABEL_MAP=$RUNS/labelmap-top5

step=${1:?usage: imagenet_sup.sh targets|students|baselines}
case "$step" in
targets)
  # 500 geometry-only views (RandomResizedCrop 0.08-1 + flip) per image; top-5, marginal smoothing.
  # The teacher is the bottleneck here, so few workers: each holds 4 prefetched images of
  # 500 x 3 x 475 x 475 bytes (338 MB) of rendered views.
  $TR experiments/gen_targets.py --data "$DATA" --data-root "$CACHE" --teacher "$TEACHER" --arch "$TEACHER_ARCH" \
    --out "$STORE" --target probs --temp 1.0 --views-per-image 500 --codec topk --topk 5 --topk-mode smooth \
    --view-size "$VIEW_SIZE" --crop-min 0.08 --photometric off \
    --batch-size 100 --group 1 --workers 4
  python -m fkd_ssl.store verify "$STORE"
  ;;
students)
  # distill_sup.py counts budgets as FKD does: --batch-size is
  # views per step (128 x 8 = 1024) and --epochs counts views per image (300 = 75 passes at K = 4);
  # --lr is per 256 views (FKD's lr 0.1 at 1024 views = 0.025). FKD ResNet-50 "plain": SGD, wd 1e-4,
  # cosine, no warm-up, no colour jitter.
  $TR experiments/distill_sup.py --data "$DATA" --data-root "$CACHE" --targets store --store "$STORE" \
    --out "$RUNS/sup-r50-fkd" --arch resnet50 --input-size 224 --crops-per-image 4 \
    --epochs 300 --batch-size 128 --optimizer sgd --lr 0.025 --weight-decay 1e-4 --warmup-epochs 0 \
    --workers "$WORKERS"
  ;;
baselines)
  # the same budget (views and steps) and optimiser, other targets.
  # plain labels, one fresh RandomResizedCrop view per decoded image (the conventional pipeline)
  $TR experiments/distill_sup.py --data "$DATA" --data-root "$CACHE" --targets hard \
    --out "$RUNS/sup-r50-hard" --arch resnet50 --input-size 224 --crops-per-image 1 --crop-min 0.08 \
    --epochs 300 --batch-size 128 --optimizer sgd --lr 0.025 --weight-decay 1e-4 --warmup-epochs 0 \
    --workers "$WORKERS"
  # vanilla KD: the teacher labels the store's views at every step (at the store's 475 px)
  $TR experiments/distill_sup.py --data "$DATA" --data-root "$CACHE" --targets online --store "$STORE" \
    --teacher "$TEACHER" --teacher-arch "$TEACHER_ARCH" \
    --out "$RUNS/sup-r50-online" --arch resnet50 --input-size 224 --crops-per-image 4 \
    --epochs 300 --batch-size 128 --optimizer sgd --lr 0.025 --weight-decay 1e-4 --warmup-epochs 0 \
    --workers "$WORKERS"
  # ReLabel: the teacher once over every whole image -> top-5 label maps, then RoIAlign per fresh crop
  $TR experiments/gen_label_map.py --data "$DATA" --data-root "$CACHE" --teacher "$TEACHER" --teacher-arch "$TEACHER_ARCH" \
    --out "$LABEL_MAP" --topk 5 --input-size "$VIEW_SIZE" --batch-size 16 --workers 4
  $TR experiments/distill_sup.py --data "$DATA" --data-root "$CACHE" --targets relabel --label-map "$LABEL_MAP" \
    --out "$RUNS/sup-r50-relabel" --arch resnet50 --input-size 224 --crops-per-image 1 --crop-min 0.08 \
    --epochs 300 --batch-size 128 --optimizer sgd --lr 0.025 --weight-decay 1e-4 --warmup-epochs 0 \
    --workers "$WORKERS"
  ;;
*)
  echo "unknown step: $step" >&2
  exit 2
  ;;
esac
