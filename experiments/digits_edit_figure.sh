#!/usr/bin/env bash
# The README's digits editing figures (docs/digits/edit_*.png): zero-shot edits of ten held-out digits, the
# first of each class 0-9 (--split test, never trained on; the split's first images are all 0s and 5s), by a run of the digits preset (trained first if RUN has no
# checkpoint), seed 0, each grid enlarged 4× (nearest neighbour) so 8×8 pixels can be judged by eye.
#   bash experiments/digits_edit_figure.sh [RUN_DIR=runs/digits]
set -euo pipefail
RUN=${1:-runs/digits}
OUT=docs/digits
SCRATCH=$(mktemp -d)
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
[ -d "$RUN/checkpoints" ] || python -m scgcm.train --config.preset digits --config.workdir "$RUN"
mkdir -p "$OUT"
edit() {  # NAME FLAGS...
  local name=$1; shift
  python -m scgcm.edit --workdir "$RUN" --seed 0 --input digits --split test --index 0 14 10 9 20 1 13 48 8 21 --out "$SCRATCH/$name.npz" \
    --grid "$SCRATCH/$name.png" "$@"
  python -c "import sys; from PIL import Image; i = Image.open(sys.argv[1]); i.resize((4 * i.width, 4 * i.height), Image.NEAREST).save(sys.argv[2])" \
    "$SCRATCH/$name.png" "$OUT/edit_$name.png"
}
edit inpaint      --task inpaint --mask center
edit inpaint_heun --task inpaint --mask center --sampler heun
edit superres     --task superres --factor 2
edit denoise      --task denoise
echo "wrote $OUT/edit_*.png"
