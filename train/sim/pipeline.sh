#!/usr/bin/env bash
# The whole demo pipeline on CPU, resumable step by step (each step is skipped when its output exists;
# trainers resume from their latest checkpoint). Usage: bash train/sim/pipeline.sh [RUNS_DIR]
# Stages: simulator data -> IBQ tokenizer -> tokenizer PSNR report -> text BPE -> pretokenized shards -> pretrain
# -> SFT -> self-distillation (the SFT model's own images, train.self_distill) -> DiDA -> assets/demo.
# The defaults build the shipped demo: the world model on the shipped factor-4 tokenizer (assets/ibq_f4) at
# 64x64 (82 minutes on two cores). The text BPE reads this repository's README and sources, so the exact
# shipped files come from the commit named in assets/README.md. On a lent GPU: AREA=9216 SEQ_LEN=3840 DEVICE=cuda.
set -euo pipefail
cd "$(dirname "$0")/../.."
R=${1:-runs}
D=$R/simdata
IBQ_STEPS=${IBQ_STEPS:-3000}
PRE_STEPS=${PRE_STEPS:-800}
SFT_STEPS=${SFT_STEPS:-300}
DEVICE=${DEVICE:-cpu}  # cuda on a lent GPU
DIDA_STEPS=${DIDA_STEPS:-200}
OUT=${OUT:-assets/demo}  # where train.sim.package writes the shipped checkpoints
AREA=${AREA:-4096}  # px per image in the world model's data (64x64: 14x18 codes of a ViZDoom frame)
SEQ_LEN=${SEQ_LEN:-1792}  # the LM's packed sequence, room for a whole record (the longest, 6 images: 1,765 tokens)
IBQ=${IBQ-assets/ibq_f4}  # the vision tokenizer; IBQ= (empty) trains one here (stage ibq below)
LM_MODEL='{"hidden_size":256,"intermediate_size":768,"num_layers":4,"num_heads":4,"num_kv_heads":2,"head_dim":64,"max_position_embeddings":4096,"dropout":0.0}'
gen() {  # gen NAME ARGS...: one generator run, skipped when its summary exists
  local name=$1; shift
  [ -f "$D/$name.json" ] || { python -m train.sim.generate "$@" --out "$D/$name" > "$D/$name.json.tmp" && mv "$D/$name.json.tmp" "$D/$name.json"; }
}
mkdir -p "$D"
echo "[pipeline] data $(date)"
( gen crafter-train --sim crafter --episodes 150 --seed 0 ) &
gen doom-train --sim doom --episodes 240 --seed 0
gen panda-train --sim panda --episodes 240 --seed 0
wait
gen doom-heldout --sim doom --episodes 24 --seed 1 --split heldout
gen doom-unseen-f2-map15 --sim doom --episodes 6 --seed 2 --split heldout --wad freedoom2.wad --map MAP15
gen doom-unseen-f1-e1m1 --sim doom --episodes 6 --seed 3 --split heldout --wad freedoom1.wad --map E1M1
gen panda-heldout --sim panda --episodes 24 --seed 1 --split heldout
gen crafter-heldout --sim crafter --episodes 12 --seed 1 --split heldout
echo "[pipeline] ibq $(date)"
# With IBQ= (empty) the tokenizer is trained here: IBQ_INIT_ARGS are train.sim.ibq_init's flags, by default
# assets/ibq_f4's recipe; IBQ_INIT_ARGS="" is the earlier factor-8 design (see assets/README.md).
if [ -z "$IBQ" ]; then
  [ -d "$R/ibq-init" ] || python -m train.sim.ibq_init --out "$R/ibq-init" \
    ${IBQ_INIT_ARGS---norm-groups 8 --patch-shortcut --factor 4 --base-channels 40}
  python -m train.tokenizer_ibq --recipe demo_cpu --init-from "$R/ibq-init" \
    --images "$D/doom-train/frames" "$D/panda-train/frames" "$D/panda-train/frames" \
    "$D/crafter-train/frames" "$D/crafter-train/frames" --out "$R/ibq-sim" \
    --steps "$IBQ_STEPS" --set resolution=64 batch_size=8 lr=0.001 min_lr=0.00005 warmup_steps=50 \
    perceptual_weight=0.25 disc_weight=0.0 entropy_weight=0.0 quantizer=cosine restart_every=50 save_every=250 \
    progress=false --device "$DEVICE"
  IBQ="$R/ibq-sim/checkpoints/$(cat "$R/ibq-sim/checkpoints/latest")"
fi
[ -f "$R/ibq-psnr.json" ] || python -m train.sim.tokenizer_eval --vision-tokenizer "$IBQ" --data-root "$D" \
  --areas "$AREA" > "$R/ibq-psnr.json"
echo "[pipeline] bpe $(date)"
[ -f "$R/tok-sim/tokenizer.json" ] || python -m train.text_bpe --recipe demo --out "$R/tok-sim" \
  --text README.md model/*.py worldsim/*.py train/*.py train/data/*.py --shards "$D/doom-train" "$D/panda-train" "$D/crafter-train"
echo "[pipeline] pretokenize $(date)"
C=$R/simcodes  # the training shards with code grids: the LM stages then never run the IBQ
for s in doom-train panda-train crafter-train; do
  [ -d "$C/$s" ] || python -m train.data.pretokenize --vision-tokenizer "$IBQ" --image-area "$AREA" --data "$D/$s" --out "$C/$s"
done
# The LM mix: ViZDoom has ~10k records, PyBullet ~1.4k and Crafter fewer, so the small two are listed 3x
# (train/data/pack.py interleaves shards in proportion to their records, a shard listed twice counting twice).
MIX="$C/doom-train $C/panda-train $C/panda-train $C/panda-train $C/crafter-train $C/crafter-train $C/crafter-train"
echo "[pipeline] pretrain $(date)"
python -m train.pretrain --recipe demo_cpu --data $MIX \
  --tokenizer "$R/tok-sim" --out "$R/pretrain-sim" --steps "$PRE_STEPS" --device "$DEVICE" \
  --set vision_tokenizer="$IBQ" image_area="$AREA" "model_overrides=$LM_MODEL" lr=0.001 min_lr=0.0001 \
  batch_size=4 warmup_steps=100 micro_batch_size=0 seq_len="$SEQ_LEN" save_every=100 progress=false
echo "[pipeline] sft $(date)"
python -m train.sft --recipe demo_cpu --data $MIX \
  --init-from "$R/pretrain-sim" --out "$R/sft-sim" --steps "$SFT_STEPS" --device "$DEVICE" \
  --set vision_tokenizer="$IBQ" image_area="$AREA" lr=0.0003 min_lr=0.00003 batch_size=4 warmup_steps=50 micro_batch_size=0 seq_len="$SEQ_LEN" \
  save_every=100 progress=false
echo "[pipeline] self-distill $(date)"
# the AR teacher needs a packaged folder (model + its vision tokenizer); runs/ is not assets/, so no size budget
[ -d "$R/sft-packed" ] || python -m train.sim.package --model "$R/sft-sim" --vision-tokenizer "$IBQ" --out "$R/sft-packed" \
  --max-mb 1e9 --image-area "$AREA"
[ -d "$R/self-distill/panda" ] || python -m train.self_distill --checkpoint "$R/sft-packed" --data "$C/panda-train" \
  --records 150 --out "$R/self-distill/panda"
[ -d "$R/self-distill/mix" ] || python -m train.self_distill --checkpoint "$R/sft-packed" --data "$C/doom-train" \
  "$C/crafter-train" --records 40 --out "$R/self-distill/mix"
SD="$R/self-distill/panda $R/self-distill/panda $R/self-distill/panda $R/self-distill/mix $R/self-distill/mix $R/self-distill/mix"
echo "[pipeline] dida $(date)"
python -m train.dida --recipe demo_cpu --data $MIX $SD \
  --init-from "$R/sft-sim" --out "$R/dida-sim" --steps "$DIDA_STEPS" --device "$DEVICE" \
  --set vision_tokenizer="$IBQ" image_area="$AREA" lr=0.0003 min_lr=0.00003 batch_size=4 warmup_steps=20 micro_batch_size=0 seq_len="$SEQ_LEN" \
  save_every=100 progress=false
# No balancing pass after DiDA: 80 steps on PyBullet + Crafter (alone, or 4x/8x beside ViZDoom) taught plans
# and guides their own sentences but cost 3.9-4.3 dB of explore PSNR (see assets/README.md).
echo "[pipeline] package $(date)"
# the 80 MB budget is for what assets/ ships; elsewhere (OUT=runs/...) the folders beside OUT are not checkpoints
case "$OUT" in assets/*) MAX_MB=80 ;; *) MAX_MB=1e9 ;; esac
python -m train.sim.package --model "$R/dida-sim" --vision-tokenizer "$IBQ" --out "$OUT" --image-area "$AREA" --max-mb "$MAX_MB"
echo "[pipeline] done $(date)"
