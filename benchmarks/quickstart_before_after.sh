#!/usr/bin/env bash
# Quickstart wall time, fresh home then fully cached re-run, in two checkouts side by side.
#   benchmarks/quickstart_before_after.sh OLD_CHECKOUT NEW_CHECKOUT [TRIALS]
# Each checkout needs its own .venv (make install). Trials alternate old/new so machine drift hits both.
set -u
old=$1 new=$2 trials=${3:-3}
for trial in $(seq 1 "$trials"); do
  for label in old new; do
    dir=${!label}; home=$(mktemp -d)
    start=$(date +%s.%N); (cd "$dir" && .venv/bin/rlhf run recipes/quickstart.yaml --home "$home" >/dev/null 2>&1)
    first=$(echo "$(date +%s.%N) - $start" | bc)
    start=$(date +%s.%N); (cd "$dir" && .venv/bin/rlhf run recipes/quickstart.yaml --home "$home" >/dev/null 2>&1)
    cached=$(echo "$(date +%s.%N) - $start" | bc)
    printf '%s trial=%s first_s=%.1f cached_s=%.1f\n' "$label" "$trial" "$first" "$cached"
    rm -rf "$home"
  done
done
