#!/usr/bin/env bash
# Does masked-LM augmentation help a Korean hate-speech classifier? The experiment of
# `augment-eval` on Korean HateSpeech (`hate`: none / offensive / hate), sized for a 2-core CPU
# (about 30 minutes):
#   1. a small ELECTRA (the demo size of run.sh: 4 layers, hidden 256) pretrained by MLM from
#      scratch on Korean HateSpeech's unlabelled comments and the labelled training comments
#      (never the test comments), MLM_STEPS steps;
#   2. a coordinator job with two CPU workers (`--task augment-eval`): for SEEDS seeds and the
#      low-resource training fractions FRACTIONS of labeled/train.tsv (10 % of it held out as the
#      dev set for early stopping), a classifier fine-tuned from that MLM on the rows alone and on
#      the rows plus one augmented copy each; every classifier scored on labeled/dev.tsv, the
#      test set here (the corpus's own test set has no labels);
#   3. the report: mean ± std per condition, the paired bootstrap interval of the difference,
#      report.png.
# Usage: scripts/augment-eval-demo.sh [OUTPUT_DIR]   (default: ./out-augment-eval)
# Sizes: SEEDS (3), FRACTIONS (0.1,0.25), MLM_STEPS (900), EPOCHS (3); KORMLM_DATA (../shared/data).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-out-augment-eval}
data=${KORMLM_DATA:-../shared/data}
seeds=${SEEDS:-3}
fractions=${FRACTIONS:-0.1,0.25}
mlm_steps=${MLM_STEPS:-900}
epochs=${EPOCHS:-3}
khs=$data/korean-hate-speech
for f in "$khs/unlabeled/unlabeled_comments_5.txt" "$khs/labeled/train.tsv" "$khs/labeled/dev.tsv"; do
    [ -f "$f" ] || { echo "missing $f (set KORMLM_DATA to the shared corpora)" >&2; exit 1; }
done
started=$(date +%s)
scripts/build.sh
bin=target/release
rm -rf "$out"
mkdir -p "$out"

echo "==> MLM corpus: unlabelled comments + labelled training comments (no test comments)"
tail -n +2 "$khs/labeled/train.tsv" | cut -f1 > "$out/train-comments.txt"
cat "$khs/unlabeled/unlabeled_comments_5.txt" "$out/train-comments.txt" > "$out/mlm-corpus.txt"
"$bin/worker" tokenizer-train --input "$out/mlm-corpus.txt" --vocab_size 8000 --output "$out/tokenizer"
"$bin/worker" init-model --tokenizer "$out/tokenizer" --output "$out/init-model" \
    --embedding_size 128 --hidden_size 256 --num_hidden_layers 4 --num_attention_heads 4 --intermediate_size 1024

echo "==> worker train: MLM pretraining, $mlm_steps steps of 32 comments"
"$bin/worker" train --config configs/augment-eval/mlm.json --model_name_or_path "$out/init-model" \
    --data_path "$out/mlm-corpus.txt" --output_dir "$out/mlm" --max_seq_len 64 --num_train_epochs 100 \
    --max_steps "$mlm_steps" --logging_steps 100 --eval_batch_size 128 > "$out/mlm-summary.json" 2> "$out/mlm.log"
cat "$out/mlm-summary.json"
mlm_done=$(date +%s)

echo "==> coordinator --task augment-eval --num_workers 2 (seeds: $seeds, fractions: $fractions)"
"$bin/coordinator" --task augment-eval --config configs/augment-eval/classifier.json \
    --num_workers 2 --device cpu --exit-when-done --listen 127.0.0.1:0 --state-dir "$out/state" \
    --model_name_or_path "$out/mlm/best" --augment_model "$out/mlm/best" \
    --train_file "$khs/labeled/train.tsv" --test_file "$khs/labeled/dev.tsv" --dataset khs-hate --dev_split 0.1 \
    --seeds "$seeds" --train_fractions "$fractions" --num_augmentations 1 \
    --output_dir "$out/experiment" --max_seq_len 64 --num_train_epochs "$epochs" --max_stop_number 1 \
    --logging_steps 50 --eval_batch_size 128 --seed 1 \
    2> "$out/coordinator.log" > /dev/null &
coordinator_pid=$!
trap 'kill $coordinator_pid 2>/dev/null || true' EXIT
for _ in $(seq 1 300); do
    [ -f "$out/state/coordinator.addr" ] && break
    sleep 0.1
done
"$bin/coordinator" watch --addr "$(cat "$out/state/coordinator.addr")" --state-dir "$out/state" > /dev/null || true
status=0
wait "$coordinator_pid" || status=$?
trap - EXIT
if [ "$status" != 0 ] || [ ! -f "$out/experiment/report.json" ]; then
    echo "the experiment did not succeed (exit $status); see $out/coordinator.log and $out/state/logs/" >&2
    exit 1
fi
ended=$(date +%s)
echo "==> report ($out/experiment/report.md, report.json, report.png)"
cat "$out/experiment/report.md"
echo "wall time: $((ended - started)) s (MLM pretraining $((mlm_done - started)) s, experiment $((ended - mlm_done)) s)"
