"""Benchmark: `worker train` against transformers + torch.optim.AdamW with dynamic padding
(DataCollatorForLanguageModeling on unpadded features: the anchor a competent user runs), in the
same precision on both sides (fp32 vs fp32; bf16: `torch.autocast("cpu", dtype=torch.bfloat16)` vs
`"bf16": {"enabled": true}`), plus the original project's setup (padding every batch to
max_seq_len, fp32) as an extra column. Same base-sized random model (hidden 768, 12 layers, vocab
32k), batch 8, same NSMC sentences, same CPU threads, side by side in one run. Every side runs in
its own process: samples/s of the timed steps (loading and tokenisation excluded) and the peak
RSS of the whole process (wait4's ru_maxrss). For kormlm also tokens/s and the model-FLOPs
utilisation its training log reports (against the matmul peak of the precision in use), and the
dev loss `worker train` reaches after the run's steps in each precision (bf16 against fp32).

usage: python scripts/bench/train.py [--threads N] [--steps 30] [--precision fp32|bf16|both]"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from common import DATA, WORKER, base_model

BATCH, MAX_LEN = 8, 100


def nsmc(n):
    with open(os.path.join(DATA, "nsmc", "ratings_train.txt"), encoding="utf-8") as f:
        rows = [line.rstrip("\n").split("\t") for line in f][1:]
    return [r[1] for r in rows if len(r) == 3 and r[1]][:n]


def run_measured(cmd, env=None):
    """Runs `cmd`, returns (stdout, peak RSS in GB of that process)."""
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            raise SystemExit(f"{cmd[:3]} failed with {proc.returncode}")
        out.seek(0)
        return out.read().decode(), usage.ru_maxrss * 1024 / 1e9


def transformers_side(args):
    """The child process of one transformers run: prints its samples/s as JSON."""
    import torch
    from transformers import AutoModelForMaskedLM, AutoTokenizer, DataCollatorForLanguageModeling

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = AutoModelForMaskedLM.from_pretrained(args.model)
    model.train()
    tok = AutoTokenizer.from_pretrained(args.model)
    collator = DataCollatorForLanguageModeling(tok, mlm_probability=0.15)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-4, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.01)
    sentences = nsmc(BATCH * (args.steps + args.warmup))
    padding = "max_length" if args.side == "original" else False
    enc = tok(sentences, padding=padding, truncation=True, max_length=MAX_LEN)
    features = [{"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i]}
                for i in range(len(sentences))]
    bf16 = args.precision == "bf16"
    timed, tokens = 0.0, 0
    for step in range(args.warmup + args.steps):
        b = collator(features[step * BATCH:(step + 1) * BATCH])
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"])
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        if step >= args.warmup:
            timed += time.perf_counter() - start
            tokens += int(b["attention_mask"].sum())
    print(json.dumps({"samples_per_s": args.steps * BATCH / timed, "tokens_per_s": tokens / timed}))


def worker_side(args, model_dir, precision, tmp):
    corpus = os.path.join(tmp, "corpus.txt")
    if not os.path.isfile(corpus):
        with open(corpus, "w", encoding="utf-8") as f:
            f.write("\n".join(nsmc(20000)) + "\n")
    config = os.path.join(tmp, f"ds-{precision}.json")
    with open(config, "w") as f:
        json.dump({"train_micro_batch_size_per_gpu": BATCH, "bf16": {"enabled": precision == "bf16"},
                   "optimizer": {"type": "AdamW", "params": {"lr": 2e-4, "betas": [0.9, 0.99], "eps": 1e-6,
                                                              "weight_decay": 0.01}}}, f)
    out_dir = os.path.join(tmp, f"out-{precision}")
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    _, rss = run_measured([WORKER, "train", "--config", config, "--model_name_or_path", model_dir, "--data_path",
                           corpus, "--output_dir", out_dir, "--max_seq_len", str(MAX_LEN), "--max_steps",
                           str(args.warmup + args.steps), "--logging_steps", str(args.warmup), "--cache_dir",
                           os.path.join(tmp, "cache")], env=env)
    with open(os.path.join(out_dir, "training_log.jsonl")) as f:
        records = [json.loads(line) for line in f]
    start = next(r for r in records if r["type"] == "start")
    # Records every `warmup` steps: skip the first window (warm-up), combine the rest by time.
    windows = [r for r in records if r["type"] == "train"][1:]
    evaluation = [r for r in records if r["type"] == "eval"][-1]
    seconds = [args.warmup * BATCH / r["samples_per_s"] for r in windows]
    total = sum(seconds)
    return {
        "samples_per_s": len(windows) * args.warmup * BATCH / total,
        "tokens_per_s": sum(r["tokens_per_s"] * s for r, s in zip(windows, seconds)) / total,
        "mfu": sum(r["mfu"] * s for r, s in zip(windows, seconds)) / total,
        "peak_gflops": start["peak_gflops"],
        "rss_gb": rss,
        "val_loss": evaluation["val_loss"],
    }


def transformers_run(args, model_dir, side, precision):
    out, rss = run_measured([sys.executable, os.path.abspath(__file__), "--child", side, "--model", model_dir,
                             "--precision", precision, "--threads", str(args.threads), "--steps", str(args.steps),
                             "--warmup", str(args.warmup)])
    result = json.loads(out.strip().splitlines()[-1])
    result["rss_gb"] = rss
    return result


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--precision", default="both", choices=["fp32", "bf16", "both"])
    parser.add_argument("--child", choices=["dynamic", "original"], help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.side = args.child
        transformers_side(args)
        return
    model_dir = base_model()
    precisions = ["fp32", "bf16"] if args.precision == "both" else [args.precision]
    print(f"batch {BATCH}, max_seq_len {MAX_LEN}, threads {args.threads}, {args.steps} timed steps")
    dev_loss = {}
    with tempfile.TemporaryDirectory() as tmp:
        for precision in precisions:
            anchor = transformers_run(args, model_dir, "dynamic", precision)
            ours = worker_side(args, model_dir, precision, tmp)
            print(f"{precision} transformers + torch AdamW (dynamic padding): {anchor['samples_per_s']:.2f} samples/s, "
                  f"{anchor['tokens_per_s']:.0f} tokens/s, peak RSS {anchor['rss_gb']:.2f} GB")
            print(f"{precision} kormlm worker train: {ours['samples_per_s']:.2f} samples/s, {ours['tokens_per_s']:.0f} "
                  f"tokens/s, MFU {ours['mfu'] * 100:.1f} % of {ours['peak_gflops']:.0f} GFLOP/s, "
                  f"peak RSS {ours['rss_gb']:.2f} GB")
            print(f"{precision} speed-up: {ours['samples_per_s'] / anchor['samples_per_s']:.2f}x, "
                  f"peak RSS ratio {ours['rss_gb'] / anchor['rss_gb']:.2f}")
            dev_loss[precision] = ours["val_loss"]
            print(f"{precision} kormlm dev loss after {args.warmup + args.steps} steps: {ours['val_loss']:.4f}")
            if precision == "fp32":
                original = transformers_run(args, model_dir, "original", precision)
                print(f"fp32 original setup (padding to {MAX_LEN}): {original['samples_per_s']:.2f} samples/s, "
                      f"peak RSS {original['rss_gb']:.2f} GB")
                print(f"fp32 speed-up vs original setup: "
                      f"{ours['samples_per_s'] / original['samples_per_s']:.2f}x")
    if len(dev_loss) == 2:
        print(f"bf16 dev loss vs fp32: {(dev_loss['bf16'] / dev_loss['fp32'] - 1) * 100:.2f} %")


if __name__ == "__main__":
    main()
