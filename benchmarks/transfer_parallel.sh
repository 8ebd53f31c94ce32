#!/usr/bin/env bash
# benchmarks/transfer.py as parallel processes, for a machine with many cores (and a GPU): one
# process per dataset, seed and arm, then one ensemble process per dataset and seed (its members
# are finished by then, so only the ensemble is computed), then one pass that tabulates every
# finished run into docs/. Finished runs are skipped, so the script can be run again.
#
#   benchmarks/transfer_parallel.sh WORK "0 1 2" [--data-root busi=DIR] [--set ...]
#
# Environment: ARMS (default: every arm but the ensemble), ENSEMBLE (0: no ensemble pass),
# BUSI_MANIFEST (data.manifest of the BUSI runs only), RUN_S (each run's time limit in
# seconds, default none), NOTE (a line printed with the tables).
set -u
work=$1; seeds=$2; shift 2
here=$(cd "$(dirname "$0")" && pwd)
limit=(); [[ -n ${RUN_S:-} ]] && limit=(timeout "$RUN_S")
mkdir -p "$work/logs" "$work/parts"
launch() {  # dataset seed tag arms...
  local dataset=$1 seed=$2 tag=$3; shift 3
  local extra=()
  [[ $dataset == busi && -n ${BUSI_MANIFEST:-} ]] && extra=(--set "data.manifest=$BUSI_MANIFEST")
  OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} "${limit[@]}" python3 "$here/transfer.py" --work "$work" \
    --datasets "$dataset" --seeds "$seed" --arms "$@" "${ARGS[@]}" "${extra[@]}" \
    --out-results "$work/parts/results-$tag.md" --out-compute "$work/parts/compute-$tag.md" \
    > "$work/logs/$tag.log" 2>&1 &
}
ARGS=("$@")
for dataset in busi breastmnist; do
  for seed in $seeds; do
    for arm in ${ARMS:-mae_entropy mae_random scratch imagenet_lite0 imagenet_lite2}; do
      launch "$dataset" "$seed" "$dataset-$seed-$arm" "$arm"
    done
  done
done
wait
if [[ ${ENSEMBLE:-1} != 0 ]]; then
  for dataset in busi breastmnist; do
    for seed in $seeds; do
      launch "$dataset" "$seed" "$dataset-$seed-ensemble" mae_entropy imagenet_lite0 ensemble
    done
  done
  wait
fi
# shellcheck disable=SC2086
python3 "$here/transfer.py" --work "$work" --seeds $seeds --report-only "$@" \
  --note "${NOTE:-runs launched as parallel processes by benchmarks/transfer_parallel.sh}"
