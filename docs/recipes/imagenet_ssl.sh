#!/usr/bin/env bash
# ImageNet-1k on one node with 8 GPUs: MoCo v2 ResNet-50 teacher -> target store -> ResNet-18
# students (FKD-SSL InfoNCE, SEED, soft-ce, DisCo-style) -> kNN and linear probe.
# Explained step by step in docs/recipes/README.md.
#
#   bash docs/recipes/imagenet_ssl.sh STEP
#
# STEP (in order): teacher | targets | students | baselines | eval
#   or, with an existing MoCo v2 checkpoint instead of training one:
#   convert | targets-external | students-external
#
# Every step resumes when it is run again with the same settings (a changed setting is refused:
# use another output folder).  Paths and sizes come from the environment; defaults below.
set -euo pipefail
cd "$(dirname "$0")/../.."

IMNET=${IMNET:-/ssd/imagenet}          # $IMNET/train/<class>/*.JPEG and $IMNET/val/<class>/*.JPEG
RUNS=${RUNS:-/ssd/fkd_runs}            # run folders and stores: a local NVMe SSD
CACHE=${CACHE:-/ssd/fkd_cache}         # --data-root: feature caches of the evaluators
NPROC=${NPROC:-8}                      # GPUs; per-process batch sizes below assume 8
WORKERS=${WORKERS:-10}                 # DataLoader workers per GPU (about cores / 8)
MOCO_CKPT=${MOCO_CKPT:-/ssd/moco_v2_200ep_pretrain.pth.tar}   # only for convert
DATA="imagefolder:$IMNET"
TR="torchrun --standalone --nproc_per_node=$NPROC"

TEACHER=$RUNS/teacher-mocov2-r50-200ep/model.safetensors
STORE=$RUNS/store-mocov2-r50-proj-R200-fp16
EXT_TEACHER=$RUNS/mocov2-r50-200ep-backbone.safetensors
EXT_STORE=$RUNS/store-ext-mocov2-r50-feat-R200-pq256

step=${1:?usage: imagenet_ssl.sh teacher|targets|students|baselines|eval|convert|targets-external|students-external}
case "$step" in
teacher)
  # MoCo v2, ResNet-50, 200 epochs, global batch 256 (32 x 8), queue 65536, MoCo v2 augmentation
  $TR experiments/pretrain_teacher.py --data "$DATA" --data-root "$CACHE" \
    --out "$RUNS/teacher-mocov2-r50-200ep" --arch resnet50 --method moco --input-size 224 \
    --crop-min 0.2 --jitter 0.4 --hue 0.1 --gray-p 0.2 \
    --queue-size 65536 --temperature 0.2 --momentum 0.999 --proj-dim 128 --proj-hidden 2048 \
    --epochs 200 --batch-size 32 --optimizer sgd --lr 0.03 --weight-decay 1e-4 --warmup-epochs 0 \
    --workers "$WORKERS"
  $TR eval/knn.py --checkpoint "$TEACHER" --data "$DATA" --data-root "$CACHE" \
    --workers "$WORKERS" --results "$RUNS/results.jsonl"
  ;;
targets)
  # the teacher once over R = 200 views of every image; 128-d projections at fp16 (79.9 GB)
  $TR experiments/gen_targets.py --data "$DATA" --data-root "$CACHE" --teacher "$TEACHER" \
    --out "$STORE" --target proj --views-per-image 200 --codec fp16 \
    --batch-size 512 --group 2 --workers "$WORKERS"
  python -m fkd_ssl.store verify "$STORE"
  ;;
students)
  # ResNet-18, 200 passes (--epochs 400 at K = 2), 256 images x K = 2 stored views per step (512 views),
  # SGD lr 0.03 per 256 images (0.015 per 256 views), wd 1e-4, cosine
  $TR experiments/distill_ssl.py --data "$DATA" --data-root "$CACHE" --store "$STORE" \
    --out "$RUNS/student-r18-infonce" --arch resnet18 --input-size 224 --crops-per-image 2 \
    --loss infonce --temperature 0.2 --queue-size 65536 \
    --epochs 400 --batch-size 64 --optimizer sgd --no-center --lr 0.015 --weight-decay 1e-4 --warmup-epochs 0 \
    --workers "$WORKERS"
  $TR experiments/distill_ssl.py --data "$DATA" --data-root "$CACHE" --store "$STORE" \
    --out "$RUNS/student-r18-seed" --arch resnet18 --input-size 224 --crops-per-image 2 \
    --loss seed --seed-tau-s 0.2 --seed-tau-t 0.01 --queue-size 65536 \
    --epochs 400 --batch-size 64 --optimizer sgd --no-center --lr 0.015 --weight-decay 1e-4 --warmup-epochs 0 \
    --workers "$WORKERS"
  $TR experiments/distill_ssl.py --data "$DATA" --data-root "$CACHE" --store "$STORE" \
    --out "$RUNS/student-r18-softce" --arch resnet18 --input-size 224 --crops-per-image 2 \
    --loss soft-ce --tau 0.2 \
    --epochs 400 --batch-size 64 --optimizer sgd --no-center --lr 0.015 --weight-decay 1e-4 --warmup-epochs 0 \
    --workers "$WORKERS"
  $TR experiments/distill_ssl.py --data "$DATA" --data-root "$CACHE" --store "$STORE" \
    --out "$RUNS/student-r18-disco" --arch resnet18 --input-size 224 --crops-per-image 2 \
    --loss cosine --ssl moco --ssl-weight 1.0 --ssl-queue-size 65536 --ssl-temperature 0.2 --ssl-momentum 0.999 \
    --epochs 400 --batch-size 64 --optimizer sgd --no-center --lr 0.015 --weight-decay 1e-4 --warmup-epochs 0 \
    --workers "$WORKERS"
  ;;
baselines)
  # the same SEED student with the teacher running at every step (vanilla KD), fresh views
  $TR experiments/distill_ssl.py --data "$DATA" --data-root "$CACHE" --store "$STORE" \
    --online-teacher "$TEACHER" \
    --out "$RUNS/student-r18-seed-online" --arch resnet18 --input-size 224 --crops-per-image 2 \
    --loss seed --seed-tau-s 0.2 --seed-tau-t 0.01 --queue-size 65536 \
    --epochs 400 --batch-size 64 --optimizer sgd --no-center --lr 0.015 --weight-decay 1e-4 --warmup-epochs 0 \
    --workers "$WORKERS"
  ;;
eval)
  for run in teacher-mocov2-r50-200ep student-r18-infonce student-r18-seed student-r18-softce student-r18-disco; do
    ckpt=$RUNS/$run/model.safetensors
    [ -f "$ckpt" ] || { echo "skip $run (no $ckpt)"; continue; }
    $TR eval/knn.py --checkpoint "$ckpt" --data "$DATA" --data-root "$CACHE" \
      --workers "$WORKERS" --results "$RUNS/results.jsonl"
    # MoCo v3 protocol: 90 epochs, global batch 1024, SGD lr 0.1 per 256, cosine, wd 0
    $TR eval/linear_probe.py --checkpoint "$ckpt" --data "$DATA" --data-root "$CACHE" --full \
      --epochs 90 --batch-size 128 --lr 0.1 --out "$RUNS/probe-$run" \
      --workers "$WORKERS" --results "$RUNS/results.jsonl"
    # closer to the probe behind the published SEED / DisCo / BINGO numbers: 100 epochs, batch 256, lr 30
    $TR eval/linear_probe.py --checkpoint "$ckpt" --data "$DATA" --data-root "$CACHE" --full \
      --epochs 100 --batch-size 32 --lr 30 --out "$RUNS/probe-lr30-$run" --name "$run (probe lr 30)" \
      --workers "$WORKERS" --results "$RUNS/results.jsonl"
  done
  ;;
convert)
  # an official MoCo v2 checkpoint -> a plain timm ResNet-50 state dict (query encoder, no MLP head)
  python - "$MOCO_CKPT" "$EXT_TEACHER" <<'EOF'
import sys, torch
from safetensors.torch import save_file
src, dst = sys.argv[1], sys.argv[2]
sd = torch.load(src, map_location="cpu", weights_only=True)["state_dict"]
pre = "module.encoder_q."
out = {k[len(pre):]: v.contiguous() for k, v in sd.items() if k.startswith(pre) and not k.startswith(pre + "fc.")}
save_file(out, dst)
print(f"{dst}: {len(out)} tensors")
EOF
  $TR eval/knn.py --checkpoint "$EXT_TEACHER" --arch resnet50 --data "$DATA" --data-root "$CACHE" \
    --workers "$WORKERS" --results "$RUNS/results.jsonl"
  ;;
targets-external)
  # a plain state dict has no projection head: the target is the 2048-d pooled feature
  $TR experiments/gen_targets.py --data "$DATA" --data-root "$CACHE" --teacher "$EXT_TEACHER" --arch resnet50 \
    --out "$EXT_STORE" --target feature --views-per-image 200 --codec pq --pq-m 256 \
    --batch-size 512 --group 2 --workers "$WORKERS"
  python -m fkd_ssl.store verify "$EXT_STORE"
  ;;
students-external)
  $TR experiments/distill_ssl.py --data "$DATA" --data-root "$CACHE" --store "$EXT_STORE" \
    --out "$RUNS/student-r18-seed-ext" --arch resnet18 --input-size 224 --crops-per-image 2 --head-hidden 2048 \
    --loss seed --seed-tau-s 0.2 --seed-tau-t 0.01 --queue-size 65536 \
    --epochs 400 --batch-size 64 --optimizer sgd --no-center --lr 0.015 --weight-decay 1e-4 --warmup-epochs 0 \
    --workers "$WORKERS"
  $TR experiments/distill_ssl.py --data "$DATA" --data-root "$CACHE" --store "$EXT_STORE" \
    --online-teacher "$EXT_TEACHER" --teacher-arch resnet50 \
    --out "$RUNS/student-r18-seed-ext-online" --arch resnet18 --input-size 224 --crops-per-image 2 --head-hidden 2048 \
    --loss seed --seed-tau-s 0.2 --seed-tau-t 0.01 --queue-size 65536 \
    --epochs 400 --batch-size 64 --optimizer sgd --no-center --lr 0.015 --weight-decay 1e-4 --warmup-epochs 0 \
    --workers "$WORKERS"
  ;;
*)
  echo "unknown step: $step" >&2
  exit 2
  ;;
esac
