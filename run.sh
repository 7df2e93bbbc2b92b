#!/usr/bin/env bash
# The main job: provisions libtorch, builds, and runs the system end to end on this machine —
# a WordPiece vocabulary and a small ELECTRA trained from scratch on the embedded demo corpus
# by a coordinator with two CPU workers (live progress, early stopping), then augmentation of
# held-back sentences with the best model.
#
# Usage: ./run.sh [OUTPUT_DIR]   (default: ./out)
set -euo pipefail
cd "$(dirname "$0")"
out=${1:-out}
scripts/build.sh
bin=target/release
rm -rf "$out"
mkdir -p "$out"
corpus=configs/demo/corpus.txt
head -n -100 "$corpus" > "$out/train.txt"
tail -n 100 "$corpus" > "$out/heldout.txt"

echo "==> worker tokenizer-train (cased BERT WordPiece on the demo corpus)"
"$bin/worker" tokenizer-train --input "$out/train.txt" --vocab_size 2000 --output "$out/tokenizer"
echo "==> worker init-model (a small random ELECTRA: 4 layers, hidden 256)"
"$bin/worker" init-model --tokenizer "$out/tokenizer" --output "$out/init-model" \
    --embedding_size 128 --hidden_size 256 --num_hidden_layers 4 --num_attention_heads 4 --intermediate_size 1024

echo "==> coordinator --config configs/cpu-demo.json --num_workers 2 --device cpu --exit-when-done"
"$bin/coordinator" --config configs/cpu-demo.json --num_workers 2 --device cpu --exit-when-done \
    --listen 127.0.0.1:0 --state-dir "$out/state" \
    --model_name_or_path "$out/init-model" --data_path "$out/train.txt" --output_dir "$out/training" \
    --max_seq_len 48 --num_train_epochs 100 --max_stop_number 2 --logging_steps 20 \
    2> "$out/coordinator.log" > /dev/null &
coordinator_pid=$!
trap 'kill $coordinator_pid 2>/dev/null || true' EXIT
for _ in $(seq 1 200); do
    [ -f "$out/state/coordinator.addr" ] && break
    sleep 0.1
done
"$bin/coordinator" watch --addr "$(cat "$out/state/coordinator.addr")" || true
status=0
wait "$coordinator_pid" || status=$?
trap - EXIT
if [ "$status" != 0 ] || [ ! -f "$out/training/summary.json" ]; then
    echo "training did not succeed (exit $status); see $out/coordinator.log and $out/state/logs/" >&2
    exit 1
fi
echo "==> training summary ($out/training/summary.json)"
cat "$out/training/summary.json"

echo "==> worker augment (held-back sentences, best model)"
"$bin/worker" augment --model "$out/training/best" --input "$out/heldout.txt" \
    --output "$out/augmented.csv" --num_augmentations 2 --threshold 0.5 --mlm_prob 0.2 --seed 1 > "$out/augment-summary.json"
python3 - "$out/augmented.csv" <<'PY'
import csv, sys
rows = list(csv.reader(open(sys.argv[1], encoding="utf-8")))
for row in rows[1:16]:
    print(f"{row[0]}\n    -> {row[1]}\n    -> {row[2]}")
print(f"... {len(rows) - 1} sentences in {sys.argv[1]}")
PY
echo "==> outputs in $out:"
echo "    training/best/              best model (Hugging Face layout)"
echo "    training/training_log.jsonl training log (train and eval records)"
echo "    training/loss_curve.png     train and dev loss per epoch"
echo "    augmented.csv               held-back sentences and their augmentations"
echo "    coordinator.log, state/logs coordinator and worker logs"
