#!/usr/bin/env bash
# scripts/gpu-check.sh [--cpu-dry-run]: the one-command check of kormlm's GPU path, from the
# repository root. Prints one `CHECK name: PASS|FAIL|SKIP detail` line per check and writes
# $OUT/gpu-check.json ({"checks": [{"name", "result", "detail"}], "passed", "failed"}), with the
# full log, training logs and worker logs beside it. Exit status 0 when nothing FAILed.
#
# On a CUDA host: `worker info` sees CUDA, the devices and NCCL; fill-mask on cuda:0 agrees with
# the CPU; `worker train` on cuda:0 in fp32 / fp16 / bf16 against the CPU; a 1-GPU coordinator
# job (fp16 with DeepSpeed's 2^32 initial scale: it skips overflow steps first); a 2-rank NCCL job
# (two GPUs, or two ranks on one GPU made to look like two hosts with NCCL_HOSTID) whose ZeRO-2
# losses equal the 1-rank run with the same global batch; with >= 2 GPUs, `kill -9` of one rank
# ends the job within the collective timeout; a speed line against transformers + PyTorch.
#
# --cpu-dry-run runs the same command lines on the CPU (cuda:N -> cpu, CPU ring instead of NCCL,
# tiny sizes), so that every flag is checked against the real binaries where there is no GPU
# (tests/tests/gpu_semantics.rs runs it); the CUDA-only checks print SKIP.
#
# Binaries: $KORMLM_BIN_DIR, else .gpucheck/{worker,coordinator} when carried (see ../shared/gpu/README.md), else
# target/release. Python: $KORMLM_PYTHON, else /opt/torch/.venv/bin/python, else python3.
# Environment: OUT (default ./gpucheck-out), KORMLM_COLLECTIVE_TIMEOUT_S (60), GPUCHECK_KEEP=1
# keeps the scratch directory (models, runs).
set -uo pipefail
MODE=gpu
case "${1:-}" in
    "") ;;
    --cpu-dry-run) MODE=cpu ;;
    *) echo "usage: scripts/gpu-check.sh [--cpu-dry-run]" >&2; exit 2 ;;
esac
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 2
OUT=${OUT:-$ROOT/gpucheck-out}
mkdir -p "$OUT" || exit 2
W=$(mktemp -d "${TMPDIR:-/tmp}/kormlm-gpucheck.XXXXXX") || exit 2
export W MODE OUT
export KORMLM_CACHE=$W/cache HF_HUB_OFFLINE=1 KORMLM_COLLECTIVE_TIMEOUT_S=${KORMLM_COLLECTIVE_TIMEOUT_S:-60}
PY=${KORMLM_PYTHON:-/opt/torch/.venv/bin/python}
[ -x "$PY" ] || PY=python3
: > "$W/checks.jsonl"
exec 3>&1 >"$OUT/gpucheck.log" 2>&1

check() { # check NAME PASS|FAIL|SKIP DETAIL
    local line; line=$(printf 'CHECK %s: %s %s' "$1" "$2" "$3")
    echo "$line"; echo "$line" >&3
    "$PY" -c 'import json,sys; print(json.dumps({"name":sys.argv[1],"result":sys.argv[2],"detail":sys.argv[3]}))' \
        "$1" "$2" "$3" >> "$W/checks.jsonl"
}
finish() {
    "$PY" - "$W/checks.jsonl" "$OUT/gpu-check.json" "$MODE" <<'EOF'
import json, sys
checks = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
summary = {"mode": sys.argv[3], "checks": checks,
           "passed": sum(c["result"] == "PASS" for c in checks),
           "failed": sum(c["result"] == "FAIL" for c in checks),
           "skipped": sum(c["result"] == "SKIP" for c in checks)}
json.dump(summary, open(sys.argv[2], "w"), indent=1)
print(f"gpu-check: {summary['passed']} passed, {summary['failed']} failed, {summary['skipped']} skipped; {sys.argv[2]}")
EOF
    for f in "$W"/coord*.log "$W"/w?.log "$W"/st*/logs/*/*/*.log "$W"/nccl.*.log; do
        [ -f "$f" ] && { echo "=== $f"; tail -n 80 "$f"; }
    done > "$OUT/logs.txt" 2>&1
    for d in "$W"/run-* "$W"/job*; do
        [ -f "$d/training_log.jsonl" ] && { echo "=== $d"; cat "$d/training_log.jsonl"; }
    done > "$OUT/training-logs.txt" 2>&1
    tail -n 1 "$OUT/gpucheck.log" >&3
    [ -n "${GPUCHECK_KEEP:-}" ] || rm -rf "$W"
    "$PY" -c 'import json,sys; sys.exit(1 if json.load(open(sys.argv[1]))["failed"] else 0)' "$OUT/gpu-check.json"
}

if [ -n "${KORMLM_BIN_DIR:-}" ]; then B=$KORMLM_BIN_DIR
elif [ -x .gpucheck/worker ] && [ -x .gpucheck/coordinator ]; then B=$ROOT/.gpucheck; else B=$ROOT/target/release; fi
if [ ! -x "$B/worker" ]; then
    echo "building (no carried binaries)"
    if ! timeout 600 scripts/build.sh; then check build FAIL "scripts/build.sh failed"; finish; exit 1; fi
fi
# The NCCL / CUDA runtime links cudarc needs, beside the binaries (scripts/env.sh makes them).
# Carried binaries keep the build machine's runpath: libtorch comes from this host's torch.
# shellcheck source=scripts/env.sh
source scripts/env.sh
TORCH_LIB=$("$PY" -c 'import torch, os; print(os.path.join(os.path.dirname(torch.__file__), "lib"))' 2>/dev/null)
if [ -n "$TORCH_LIB" ] && [ -d "$TORCH_LIB" ]; then
    export LD_LIBRARY_PATH="$TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    [ -e "$B/kormlm-libs/libnccl.so" ] || kormlm_link_cuda_libs "$TORCH_LIB" "$B/kormlm-libs"
fi
if [ "$MODE" = gpu ]; then DEV=cuda:0; JOBDEV=cuda; else DEV=cpu; JOBDEV=cpu; fi

cat > "$W/h.py" <<'EOF'
import json, os, sys
w, mode = os.environ["W"], os.environ["MODE"]
cmd = sys.argv[1]
def out(name, ok, info=""):
    print(f"{name}\t{'PASS' if ok else 'FAIL'}\t{info}")
def log(d):
    r = [json.loads(l) for l in open(f"{w}/{d}/training_log.jsonl")]
    return [x for x in r if x["type"] == "train"], [x for x in r if x["type"] == "eval"]
if cmd == "cfg":
    b = json.load(open("configs/cpu-demo.json"))
    f = json.load(open("configs/ds_config.json"))["fp16"]; f["enabled"] = True
    for n, x in [("fp32", {}), ("fp16", {"fp16": {**f, "initial_scale_power": 16}}), ("fp16x", {"fp16": f}),
                 ("bf16", {"bf16": {"enabled": True}}), ("w2", {"train_micro_batch_size_per_gpu": 8})]:
        json.dump({**b, **x}, open(f"{w}/{n}.json", "w"))
elif cmd == "info":
    i = json.load(open(f"{w}/info.json"))
    ok = i["cuda_available"] and i["cuda_device_count"] >= 1 and (i["nccl_version"] or 0) >= 22800 and not i.get("cuda_libraries_error")
    out("worker info sees CUDA, devices and NCCL", ok, json.dumps(i))
elif cmd == "fm":
    a, b = [[json.loads(l) for l in open(f"{w}/fm-{d}.jsonl")] for d in ("cpu", "dev")]
    p = [(x[0], y[0]) for x, y in zip(a, b) if isinstance(x, list) and isinstance(y, list) and x and y]
    same = sum(x["token"] == y["token"] for x, y in p)
    dd = max([abs(x["score"] - y["score"]) for x, y in p] or [9])
    out("fill-mask cpu vs device", len(a) == len(b) > 0 and len(p) >= len(a) - 2 and same >= 0.95 * len(p) and dd < 1e-3,
        f"{len(p)}/{len(a)} lines, top-1 agree {same}, max score diff {dd:.1e}")
elif cmd == "train":
    L = {}
    for d in sys.argv[2:]:
        try:
            t, e = log(d); L[d] = [x["loss"] for x in t]
            print(f"#\t{d} losses {[round(x, 4) for x in L[d]]} skipped {t[-1]['skipped_steps']} grad_norm {t[-1]['grad_norm']}")
        except Exception as ex:
            # The precision runs are judged below (a CPU without bf16 refuses bf16 by design).
            if d not in ("run-dev-fp16", "run-dev-bf16"):
                out(f"{d} ran", False, repr(ex))
    def rel(a, b):
        if a in L and b in L and len(L[a]) == len(L[b]) > 0:
            return max(abs(x - y) / max(abs(x), 1e-12) for x, y in zip(L[a], L[b]))
        return 9.0
    r = rel("run-cpu-fp32", "run-dev-fp32"); out("fp32 losses cpu vs device (dropout 0) within 1%", r < 1e-2, f"max rel diff {r:.2e}")
    for d in ("run-dev-fp16", "run-dev-bf16"):
        if mode == "gpu":
            r = rel("run-dev-fp32", d); out(f"{d} tracks fp32 within 5%", r < 5e-2, f"max rel diff {r:.2e}")
        elif d in L:
            out(f"{d} ran", True, "CPU: precision flags accepted")
        else:
            err = open(f"{w}/{d}.err", errors="replace").read() if os.path.exists(f"{w}/{d}.err") else ""
            refused = d.endswith("bf16") and "neither AVX-512 BF16 nor AMX" in err
            out(f"{d} ran", refused, "CPU without bf16: refused naming the config key" if refused else "no training log; see gpucheck.log")
    r = rel("run-dev-fp32", "job2"); out("2 ranks ZeRO-2 (8x2) == 1 rank (16) within 1%", r < 1e-2, f"max rel diff {r:.2e}")
    if "job1" in L:
        s = log("job1")[0][-1]["skipped_steps"]
        if mode == "gpu":
            out("job1 fp16 from 2^32 skips overflow steps then trains", 8 <= s <= 30, f"skipped {s}")
        else:
            out("job1 ran (1-rank coordinator job)", True, f"skipped {s}")
    else:
        out("job1 ran (1-rank coordinator job)", False, "no training log")
elif cmd == "speed":
    t, _ = log("run-dev-bf16")
    ours = max(x["tokens_per_s"] for x in t)
    try:
        import time, torch, transformers
        cfg = json.load(open(f"{w}/init/config.json"))
        model = transformers.ElectraForMaskedLM(transformers.ElectraConfig(**{k: v for k, v in cfg.items() if k != "architectures"})).cuda()
        params = sum(p.numel() for p in model.parameters())
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        ids = torch.randint(5, cfg["vocab_size"], (16, 48), device="cuda")
        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward(); opt.step(); opt.zero_grad()
        for _ in range(5): step()
        torch.cuda.synchronize(); s = time.time()
        for _ in range(30): step()
        torch.cuda.synchronize(); theirs = 30 * ids.numel() / (time.time() - s)
        peak = 989e12  # H100/H200 dense bf16
        mfu = lambda tps: 6 * params * tps / peak
        print(f"speed\tPASS\tkormlm {ours:.0f} tokens/s (MFU {mfu(ours):.2%}) vs transformers+PyTorch bf16 autocast {theirs:.0f} tokens/s (MFU {mfu(theirs):.2%}), {params} params, batch 16x48")
    except ImportError as ex:
        print(f"speed\tSKIP\tkormlm {ours:.0f} tokens/s; no comparison: {ex}")
EOF
pyck() { "$PY" "$W/h.py" "$@" | while IFS=$'\t' read -r name result detail; do
    if [ "$name" = "#" ]; then echo "$result"; else check "$name" "$result" "$detail"; fi; done; }

echo "== env ($MODE)"; date -u
command -v nvidia-smi >/dev/null && nvidia-smi -L
"$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available())'
readelf -d "$B/worker" | grep -E 'RUNPATH'; ls -l "$B/kormlm-libs/" 2>&1
"$B/worker" info; "$B/worker" info --json > "$W/info.json"
NGPU=$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["cuda_device_count"])' "$W/info.json" 2>/dev/null || echo 0)
if [ "$MODE" = gpu ]; then pyck info; else check "worker info sees CUDA, devices and NCCL" SKIP "CPU dry run"; fi

echo "== data + tiny model (CPU)"
head -n 2400 configs/demo/corpus.txt > "$W/train.txt"; "$PY" "$W/h.py" cfg
tail -n 100 configs/demo/corpus.txt | sed -E 's/^[^ ]+ /[MASK] /' | grep -F '[MASK]' > "$W/mask.txt"
if [ "$MODE" = gpu ]; then STEPS=40; HID=256; LAY=4; else STEPS=4; HID=64; LAY=2; head -n 400 "$W/train.txt" > "$W/t" && mv "$W/t" "$W/train.txt"; head -n 8 "$W/mask.txt" > "$W/t" && mv "$W/t" "$W/mask.txt"; fi
"$B/worker" tokenizer-train --input "$W/train.txt" --vocab_size 2000 --output "$W/tok" \
  && "$B/worker" init-model --tokenizer "$W/tok" --output "$W/init" --embedding_size 128 --hidden_size $HID \
       --num_hidden_layers $LAY --num_attention_heads 4 --intermediate_size $((HID * 4)) --dropout 0 \
  || check "tokenizer-train + init-model" FAIL "see gpucheck.log"
BASE=(--model_name_or_path "$W/init" --data_path "$W/train.txt" --max_seq_len 48 --num_train_epochs 1 --logging_steps 1 --seed 1)
T=("${BASE[@]}" --max_steps $STEPS)

echo "== worker train"
for r in "cpu fp32 cpu" "$DEV fp32 dev" "$DEV fp16 dev" "$DEV bf16 dev"; do
    set -- $r; d=run-$3-$2; s=$SECONDS
    timeout 300 "$B/worker" train --config "$W/$2.json" --device "$1" "${T[@]}" --output_dir "$W/$d" > "$W/$d.json" 2> "$W/$d.err"
    rc=$?; cat "$W/$d.err" >&2
    echo "$d exit $rc in $((SECONDS - s)) s"
done

echo "== fill-mask"
timeout 120 "$B/worker" fill-mask --model "$W/run-dev-fp32/final" --device cpu < "$W/mask.txt" > "$W/fm-cpu.jsonl"; echo "fill-mask cpu exit $?"
timeout 120 "$B/worker" fill-mask --model "$W/run-dev-fp32/final" --device "$DEV" < "$W/mask.txt" > "$W/fm-dev.jsonl"; echo "fill-mask $DEV exit $?"
pyck fm

echo "== job1: 1 rank through the coordinator, fp16 with ds_config's 2^32 scale"
if [ "$MODE" = gpu ]; then LAUNCH=(--num_gpus 1); else LAUNCH=(--num_workers 1 --device cpu); fi
s=$SECONDS
timeout 300 "$B/coordinator" --config "$W/fp16x.json" "${LAUNCH[@]}" --exit-when-done --listen 127.0.0.1:0 \
    --state-dir "$W/st1" --worker-bin "$B/worker" "${T[@]}" --output_dir "$W/job1" > "$W/coord1.log" 2>&1
echo "job1 exit $? in $((SECONDS - s)) s"
echo "localhost slots=2" > "$W/hostfile"
out=$("$B/coordinator" --dry-run --config "$W/w2.json" --hostfile "$W/hostfile" --include localhost:0,0 "${T[@]}" 2>&1)
case "$out" in *"lists slot 0 twice"*) check "duplicate slot refused up front" PASS "" ;;
    *) check "duplicate slot refused up front" FAIL "$out" ;; esac

echo "== job2: 2 external ranks (NCCL on one GPU with distinct NCCL_HOSTID, or the CPU ring)"
export NCCL_SOCKET_IFNAME=lo NCCL_IB_DISABLE=1 NCCL_DEBUG=WARN NCCL_DEBUG_FILE=$W/nccl.%h.%p.log
s=$SECONDS
timeout 300 "$B/coordinator" --config "$W/w2.json" --world_size 2 --device $JOBDEV --exit-when-done --listen 127.0.0.1:0 \
    --state-dir "$W/st2" "${T[@]}" --output_dir "$W/job2" > "$W/coord2.log" 2>&1 & C2=$!
for _ in $(seq 300); do [ -s "$W/st2/coordinator.addr" ] && break; sleep 0.2; done
U=$(cat "$W/st2/coordinator.addr" 2>/dev/null)
for r in 0 1; do KORMLM_TOKEN_FILE="$W/st2/token" NCCL_HOSTID=gc$r timeout 290 "$B/worker" --rank $r --local_rank 0 --coordinator "$U" > "$W/w$r.log" 2>&1 & done
wait $C2; echo "job2 exit $? in $((SECONDS - s)) s"; wait
pyck train run-cpu-fp32 run-dev-fp32 run-dev-fp16 run-dev-bf16 job1 job2

echo "== kill -9 of one rank"
if [ "$MODE" = gpu ] && [ "${NGPU:-0}" -ge 2 ]; then
    timeout 400 "$B/coordinator" --config "$W/w2.json" --num_gpus 2 --exit-when-done --listen 127.0.0.1:0 --state-dir "$W/st3" \
        --worker-bin "$B/worker" --max_restarts 0 "${BASE[@]}" --max_steps 100000 --output_dir "$W/job3" > "$W/coord3.log" 2>&1 & C3=$!
    for _ in $(seq 600); do grep -q '"type": *"train"' "$W/job3/training_log.jsonl" 2>/dev/null && break; sleep 0.5; done
    A=$(cat "$W/st3/coordinator.addr")
    PID=$("$B/coordinator" status --addr "$A" --json | "$PY" -c 'import json,sys; print([w["pid"] for w in json.load(sys.stdin)["workers"] if w["rank"]==1][0])')
    s=$SECONDS; kill -9 "$PID"; wait $C3; took=$((SECONDS - s))
    if [ "$took" -le $((KORMLM_COLLECTIVE_TIMEOUT_S + 30)) ]; then check "kill -9 of rank 1 ends the job in time" PASS "${took} s (timeout ${KORMLM_COLLECTIVE_TIMEOUT_S} s)"
    else check "kill -9 of rank 1 ends the job in time" FAIL "${took} s (timeout ${KORMLM_COLLECTIVE_TIMEOUT_S} s)"; fi
else
    check "kill -9 of rank 1 ends the job in time" SKIP "needs 2 GPUs (this host: ${NGPU:-0})"
fi

echo "== speed"
if [ "$MODE" = gpu ]; then pyck speed; else check speed SKIP "CPU dry run"; fi
finish
