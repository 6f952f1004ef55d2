#!/usr/bin/env bash
# Feature cache benchmark: runs one experiment twice with a fresh, shared feature cache. The first
# run computes the activations at the cutoff (a miss per split), the second reads them (a hit per
# split) and never runs the base. Prints the wall time of each, the base batches each ran and the
# ratio. Extra arguments go to both runs, e.g. --set train.epochs=5.
#
#   RUNNER_ASSETS=../shared/assets tools/bench_cache.sh experiments/feature_extraction.toml --set train.epochs=5
set -euo pipefail
exp="${1:-experiments/feature_extraction.toml}"
shift || true
target="${CARGO_TARGET_DIR:-target}"
runner="${RUNNER_BIN:-$target/release/runner}"
[ -x "$runner" ] || cargo build --release --quiet
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
declare -A secs
for run in miss hit; do
  start=$(date +%s.%N)
  "$runner" "$exp" --device cpu --cache "$work/cache" --results "$work/results-$run" "$@" \
    > "$work/$run.out" 2> "$work/$run.err"
  end=$(date +%s.%N)
  secs[$run]=$(awk "BEGIN { print $end - $start }")
done
count() { cat "$work"/results-"$1"/*.log.jsonl | grep -c "\"message\":\"$2\"" || true; }
printf '%-6s | %9s | %-34s | %-27s | %s\n' run seconds "base batches run (Extracting ...)" "cache hits / misses" result
for run in miss hit; do
  printf '%-6s | %9.1f | %-34s | %-27s | %s\n' "$run" "${secs[$run]}" "$(count $run 'Extracting features.') progress events" \
    "$(count $run 'Feature cache hit.') / $(count $run 'Feature cache miss.')" "$(tail -1 "$work/$run.out")"
done
echo "ratio miss / hit: $(awk "BEGIN { printf \"%.1f\", ${secs[miss]} / ${secs[hit]} }")x  (cache: $(du -sh "$work/cache" | cut -f1))"
