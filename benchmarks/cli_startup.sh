#!/usr/bin/env bash
# Wall time of `rlhf --help`, `rlhf models --help`, `rlhf models list` and `rlhf models lineage` for two
# checkouts, alternating them; prints every run and the median per command and checkout.
#   benchmarks/cli_startup.sh BEFORE_TREE AFTER_TREE HOME MODEL [REPEATS=5]
# HOME: an rlhf home with a registered MODEL (e.g. after `rlhf run recipes/quickstart.yaml --home HOME`).
# Bytecode is cached under /tmp/cli-startup-pyc (as an installed package would have its .pyc files).
set -euo pipefail
before=$1 after=$2 home=$3 model=$4 repeats=${5:-5}
python=${PYTHON:-.venv/bin/python}
unset PYTHONDONTWRITEBYTECODE
export PYTHONPYCACHEPREFIX=/tmp/cli-startup-pyc
cmds=("--help" "models --help" "models list --home $home" "models lineage $model --home $home")
declare -A runs
for tree in "$before" "$after"; do  # once untimed: writes the bytecode cache
  for c in "${cmds[@]}"; do (cd "$tree" && PYTHONPATH=$tree $python -m cli.app $c >/dev/null 2>&1); done  # shellcheck disable=SC2086
done
for _ in $(seq "$repeats"); do
  for tree in "$before" "$after"; do
    for c in "${cmds[@]}"; do
      start=$(date +%s%N)
      # shellcheck disable=SC2086
      (cd "$tree" && PYTHONPATH=$tree $python -m cli.app $c >/dev/null 2>&1)
      runs["$tree|$c"]+="$(( ($(date +%s%N) - start) / 1000000 )) "
    done
  done
done
for c in "${cmds[@]}"; do
  for tree in "$before" "$after"; do
    v=${runs["$tree|$c"]}
    median=$(echo "$v" | tr ' ' '\n' | grep . | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')
    echo "rlhf $c | $tree | ms: $v| median $median ms"
  done
done
