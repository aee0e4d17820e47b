#!/usr/bin/env bash
# ReViT + TLA on Fashion-MNIST (tiny ViT, 28 px, patch 2, grids 14/10/7 = 28/20/14 px): the whole pipeline
# from the command line, then benchmarks/revit_report.py turns the run folders into tables and a plot.
#   bash benchmarks/revit_fmnist.sh [main|ablations]     (OUT, EPOCHS, SUBSET override the defaults)
set -euo pipefail
OUT=${OUT:-runs/bench_revit_fmnist}
EPOCHS=${EPOCHS:-6}
SUBSET=${SUBSET:-10000}
TT=${TT:-.venv/bin/tokenthrift}
COMMON=(-c fmnist_vit_tiny --epochs "$EPOCHS" --train-subset "$SUBSET" --no-progress --output "$OUT")
case "${1:-main}" in
  main)
    "$TT" train "${COMMON[@]}" --method revit --name revit
    "$TT" train "${COMMON[@]}" --method full --name single_grid
    "$TT" assign-labels --checkpoint "$OUT/revit/last.pth" --split train --out "$OUT/labels_train.pt"
    "$TT" assign-labels --checkpoint "$OUT/revit/last.pth" --split eval --out "$OUT/labels_eval.pt"
    "$TT" train "${COMMON[@]}" --method tla --tla-labels "$OUT/labels_train.pt" \
      --tla-eval-labels "$OUT/labels_eval.pt" --tla-balanced --tla-model test_byobnet --name tla
    # the library's default assigner, for comparison (same MACs budget, far slower per MAC at 14 px)
    "$TT" train "${COMMON[@]}" --method tla --tla-labels "$OUT/labels_train.pt" \
      --tla-eval-labels "$OUT/labels_eval.pt" --tla-balanced --tla-model mobilenetv3_small_050 --name tla_mnv3
    "$TT" adaptive --checkpoint "$OUT/revit/last.pth" --assigner "$OUT/tla/last.pth" \
      --oracle-labels "$OUT/labels_eval.pt" --gamma 0.3 0.5 0.6 0.7 0.8 0.9 0.95 | tee "$OUT/adaptive.txt"
    ;;
  ablations)
    "$TT" train "${COMMON[@]}" --method revit --no-revit-tal-ln --name revit_no_talln
    "$TT" train "${COMMON[@]}" --method revit --no-revit-tlsd --name revit_no_tlsd
    ;;
  -h|--help)
    echo "usage: bash benchmarks/revit_fmnist.sh [main|ablations]   (environment: OUT, EPOCHS, SUBSET, TT)"
    ;;
  *)
    echo "usage: bash benchmarks/revit_fmnist.sh [main|ablations]" >&2
    exit 2
    ;;
esac
