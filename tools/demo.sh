#!/usr/bin/env bash
# `make demo`: simulate a small run of each detector family, classify it with the embedded default model,
# and print the confusion matrix against the simulated expert labels and the throughput.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
out="$here/demo_run"
rm -rf "$out" && mkdir -p "$out"
cd "$out"
for run in "L498 cspad" "LO19 rayonix"; do
  set -- $run
  preset=$1
  echo
  echo "=== $preset ($2): simulate 48 stills, import, classify ==="
  dials.cnn_simulate preset="$preset" n_images=48 seed=20261130 nproc=2 output.directory="$preset" \
    output.log="$preset/dials.cnn_simulate.log" | tail -n 6
  (cd "$preset" && dials.import ./*.h5 output.experiments=imported.expt output.log=dials.import.log >/dev/null \
    && dials.cnn_classify imported.expt annotations=expert_annotation.txt nproc=2)
done
echo
echo "Outputs are in $out/<preset>/: cnn_classification.csv/.json (one row per image), hits.expt (Hit images only)."
