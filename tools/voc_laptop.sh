#!/usr/bin/env bash
# Baseline CAM vs SEAM on real photos on a CPU (the voc_laptop preset): both start from the ImageNet
# EfficientNet-Lite0 with the same seed and budget; then multi-scale + flip CAM/PCM maps of `train` and `val`
# (scale 1 = a 320-px long side) and their scores at the fixed alpha and the alpha tuned on ground truth.
# Every step resumes when rerun with the same OUT.
#
#   tools/voc_laptop.sh VOC_ROOT OUT [SEED] [more seam_nb_train options, e.g. --steps 500 --rescale 0.3]
#   METHODS=seam tools/voc_laptop.sh ...                 # one method only (the baseline ignores --rescale)
#   SCALES=0.5,1.0,1.5 tools/voc_laptop.sh ...           # other inference scales (default 0.5,1.0,1.5,2.0)
#   TRAIN_SCORED=all tools/voc_laptop.sh ...             # score every train image (default: the first 120 of the list,
#                                                        # which keeps the whole comparison near 30 minutes on 2 cores)
#   python tools/voc_laptop_table.py OUT [OUT ...]       # the table (means over the OUT folders, e.g. seeds)
# OUT/seconds.txt: wall seconds of each stage (a rerun appends). OUT/voc_lite0_{baseline,seam}.pth are the slimmed float16 networks (data/ ships seed 0's, trained on ../shared/voc_mini).
set -euo pipefail
VOC=${1:?usage: tools/voc_laptop.sh VOC_ROOT OUT [SEED] [seam_nb_train options]}
OUT=${2:?usage: tools/voc_laptop.sh VOC_ROOT OUT [SEED] [seam_nb_train options]}
SEED=${3:-0}
shift $(( $# < 3 ? $# : 3 ))
mkdir -p "$OUT"
ids=()   # the scored train images: the first TRAIN_SCORED of the list (val: all)
if [ "${TRAIN_SCORED:-120}" != all ]; then
  head -n "${TRAIN_SCORED:-120}" "$VOC/ImageSets/Segmentation/train.txt" > "$OUT/train_scored.txt"; ids=(--list "$OUT/train_scored.txt")
fi
stamp() { echo "$1 $(( SECONDS - t0 ))" >> "$OUT/seconds.txt"; t0=$SECONDS; }   # wall seconds of each stage
for m in ${METHODS:-baseline seam}; do
  run=$OUT/train/$m
  t0=$SECONDS
  if [ ! -f "$run/summary.json" ]; then
    resume=(); [ -f "$run/last.pt" ] && resume=(--resume)
    seam_nb_train --preset voc_laptop --data-root "$VOC" --method $m --seed "$SEED" --out "$run" --no-progress "${resume[@]}" "$@"
    stamp "train/$m"
  fi
  # the network alone, float16 (what data/voc_lite0_*.pth ship: loadable by seam_nb_infer --ckpt and the widgets)
  [ -f "$OUT/voc_lite0_$m.pth" ] || python -c "import sys; from seam_nb.weights import slim_checkpoint as s; s(sys.argv[1], sys.argv[2], root=sys.argv[3], half=True)" \
                                      "$run/last.pt" "$OUT/voc_lite0_$m.pth" "$OUT"
  for split in train val; do
    sub=(); [ $split = train ] && sub=("${ids[@]}")
    seam_nb_infer --ckpt "$run/last.pt" --dataset voc --data-root "$VOC" --split $split --long-side 320 \
                  --scales "${SCALES:-0.5,1.0,1.5,2.0}" \
                  --out "$OUT/infer/$m/$split" --no-progress "${sub[@]}"
    stamp "infer/$m/$split"
    for kind in cam pcm; do
      [ $m = baseline ] && [ $kind = pcm ] && continue
      [ -f "$OUT/eval/$m/$split/$kind/metrics.json" ] && continue
      seam_nb_eval --cam-dir "$OUT/infer/$m/$split/$kind" --voc-root "$VOC" --split $split --sweep "${sub[@]}" \
                   --out "$OUT/eval/$m/$split/$kind" > /dev/null
      stamp "eval/$m/$split/$kind"
    done
  done
done
echo "script $SECONDS" >> "$OUT/seconds.txt"
python "$(dirname "$0")/voc_laptop_table.py" "$OUT"
