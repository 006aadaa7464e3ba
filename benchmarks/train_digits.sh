#!/usr/bin/env bash
# The training-time acceptance run: 10 epochs on the built-in digits, CPU, default settings.
# Prints the card's figures (training seconds, torch and ONNX Runtime validation accuracy).
set -euo pipefail
cd "$(dirname "$0")/.."
make -s venv
out=$(mktemp -d)
.venv/bin/python -m convserve.training --dataset digits --epochs 10 --out "$out" > /dev/null
.venv/bin/python - "$out/card.json" <<'PY'
import json, platform, sys
card = json.load(open(sys.argv[1]))
t, m = card["training"], card["metrics"]
print(f"train_seconds={t['train_seconds']} device={t['device']} epochs={t['epochs']} "
      f"torch_val_accuracy={m['torch_val_accuracy']:.4f} onnx_val_accuracy={m['onnx_val_accuracy']:.4f} "
      f"python={platform.python_version()} torch={card['versions']['torch']} "
      f"onnxruntime-gpu={card['versions']['onnxruntime-gpu']}")
PY
rm -rf "$out"
