#!/usr/bin/env bash
# Peak memory and time of a feature-extraction run as the dataset grows (README, "Memory as the
# dataset grows"). Usage: bench/scale.sh BIN LABEL SIZES...   (e.g. target/release/runner now
# 4000 20000 50000). The folders $SCALE/n<SIZE> are made by bench/make_scale.py; $RUNNER_ASSETS
# names the mirror (MobileNetV2 weights). Per size: a run with an empty cache ("miss": extraction,
# 1 epoch) and a run from that cache ("hit": 2 epochs), each under /usr/bin/time.
set -u
BIN=$1; LABEL=$2; shift 2
SCALE=${SCALE:-/work/scale}
OUT=${OUT:-/work/scale_results}; mkdir -p "$OUT"
CACHE=${CACHE:-/work/scale_cache}
EXP="$(cd "$(dirname "$0")/.." && pwd)/experiments/mobilenet_feature_extraction.toml"
for n in "$@"; do
  for mode in miss hit; do
    res=/tmp/sr-$LABEL-$n-$mode; rm -rf "$res"
    [ $mode = miss ] && rm -rf "$CACHE/$LABEL-$n"
    epochs=1; [ $mode = hit ] && epochs=2
    /usr/bin/time -f "%M %e" -o "$OUT/$LABEL-$n-$mode.time" "$BIN" "$EXP" \
      --device cpu --results "$res" --cache "$CACHE/$LABEL-$n" \
      --set data.dir="$SCALE/n$n" --set data.image_size=[96,96] --set train.epochs=$epochs \
      > "$OUT/$LABEL-$n-$mode.out" 2>&1
    echo "$LABEL $n $mode rc=$? peak_kb,wall_s=$(tail -1 "$OUT/$LABEL-$n-$mode.time") cache=$(du -sm "$CACHE/$LABEL-$n" | cut -f1)MB"
    cp "$res"/*.log.jsonl "$OUT/$LABEL-$n-$mode.log.jsonl" 2>/dev/null
  done
done
