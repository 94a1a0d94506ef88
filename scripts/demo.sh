#!/usr/bin/env bash
# The main job, end to end on CPU: set up, synthesize the offline command corpus, train the tiny GroupNorm
# Conformer-CTC through examples/asr/speech_to_text.py, and print dev WER at the start and at the end.
# The trained model is runs/demo.nemo (the next README commands use it); the report is runs/demo_report.json.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
CORPUS=${CORPUS:-data/commands}
if [ ! -f "$CORPUS/corpus_info.json" ]; then
  layerfx make-corpus --preset commands --n 1000 --speakers 24 --seed 0 --out "$CORPUS"
fi
start=$(date +%s)
python examples/asr/speech_to_text.py --config-name conformer_gn_tiny corpus_dir="$CORPUS" \
  layerfx.report_path=runs/demo_report.json layerfx.save_to=runs/demo.nemo "$@"
echo "[demo] training + evaluation took $(( $(date +%s) - start )) s; model: runs/demo.nemo; report: runs/demo_report.json"
