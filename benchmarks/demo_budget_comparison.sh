#!/usr/bin/env bash
# The demo's budget (80 kimg), single-decoder vs multi-stage, both with the patch schedule: each runs the
# demo's one command, then --mode=eval (FID of the EMA network, 1000 samples vs the 1,797 digits). Runs one
# after the other (2 cores: never in parallel). Prints wall times; logs and eval JSONs stay under OUT.
#   bash benchmarks/demo_budget_comparison.sh [OUT]   (default /tmp/demo_budget_comparison)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-/tmp/demo_budget_comparison}
rm -rf "$out"; mkdir -p "$out"
for cfg in digits digits_multistage; do
  s=$(date +%s)
  python3 -m patch_diffusion.main --config=configs/$cfg.py --workdir="$out/$cfg" > "$out/$cfg.train.log" 2>&1
  e=$(date +%s); echo "$cfg train_command_wall_s $((e-s))" | tee -a "$out/summary.txt"
  python3 -m patch_diffusion.main --config=configs/$cfg.py --workdir="$out/$cfg" --mode=eval \
      --config.eval.num_samples=1000 > "$out/$cfg.eval.log" 2>&1
  f=$(date +%s); echo "$cfg eval_wall_s $((f-e))" | tee -a "$out/summary.txt"
  grep -h "compiled [0-9]* train steps\|training done\|eval (" "$out/$cfg.train.log" "$out/$cfg.eval.log" | cut -c1-200
done
