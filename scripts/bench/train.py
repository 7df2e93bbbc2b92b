"""Benchmark: `worker train` against transformers + torch.optim.AdamW (the original project's
training step: padding to max_seq_len, full-vocabulary logits at every position), same
base-sized random model (hidden 768, 12 layers, vocab 32k), batch 8, max_seq_len 100, same CPU
threads, side by side in one run. Reports samples/s of the timed steps (model loading and
tokenisation excluded on both sides).

usage: python scripts/bench/train.py [--threads N] [--steps 30]"""
import argparse
import json
import os
import subprocess
import tempfile
import time

from common import DATA, WORKER, base_model

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def nsmc(n):
    with open(os.path.join(DATA, "nsmc", "ratings_train.txt"), encoding="utf-8") as f:
        rows = [line.rstrip("\n").split("\t") for line in f][1:]
    return [r[1] for r in rows if len(r) == 3 and r[1]][:n]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    model_dir = base_model()
    batch, max_len = 8, 100
    sentences = nsmc(batch * (args.steps + args.warmup) * 2)

    import torch
    from transformers import AutoModelForMaskedLM, AutoTokenizer, DataCollatorForLanguageModeling

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = AutoModelForMaskedLM.from_pretrained(model_dir)
    model.train()
    tok = AutoTokenizer.from_pretrained(model_dir)
    collator = DataCollatorForLanguageModeling(tok, mlm_probability=0.15)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-4, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.01)
    enc = tok(sentences, padding="max_length", truncation=True, max_length=max_len)
    features = [{"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i]} for i in range(len(sentences))]
    timed = 0.0
    for step in range(args.warmup + args.steps):
        b = collator(features[step * batch:(step + 1) * batch])
        start = time.perf_counter()
        out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"])
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        if step >= args.warmup:
            timed += time.perf_counter() - start
    python_rate = args.steps * batch / timed

    with tempfile.TemporaryDirectory() as tmp:
        corpus = os.path.join(tmp, "corpus.txt")
        with open(corpus, "w", encoding="utf-8") as f:
            f.write("\n".join(nsmc(20000)) + "\n")
        config = os.path.join(tmp, "ds.json")
        with open(config, "w") as f:
            json.dump({"train_micro_batch_size_per_gpu": batch,
                       "optimizer": {"type": "AdamW", "params": {"lr": 2e-4, "betas": [0.9, 0.99], "eps": 1e-6,
                                                                  "weight_decay": 0.01}}}, f)
        out_dir = os.path.join(tmp, "out")
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
        subprocess.run([WORKER, "train", "--config", config, "--model_name_or_path", model_dir, "--data_path", corpus,
                        "--output_dir", out_dir, "--max_seq_len", str(max_len), "--max_steps",
                        str(args.warmup + args.steps), "--logging_steps", str(args.warmup), "--cache_dir",
                        os.path.join(tmp, "cache")], env=env, check=True, stdout=subprocess.DEVNULL)
        with open(os.path.join(out_dir, "training_log.jsonl")) as f:
            records = [json.loads(line) for line in f]
        # Records every `warmup` steps: skip the first window (warm-up), average the rest by time.
        windows = [r for r in records if r["type"] == "train"][1:]
        rust_rate = sum(args.warmup for _ in windows) * batch / sum(args.warmup * batch / r["samples_per_s"] for r in windows)

    print(f"batch {batch}, max_seq_len {max_len}, threads {args.threads}, {args.steps} timed steps")
    print(f"transformers + torch AdamW: {python_rate:.2f} samples/s")
    print(f"kormlm worker train:        {rust_rate:.2f} samples/s")
    print(f"speed-up: {rust_rate / python_rate:.2f}x")


if __name__ == "__main__":
    main()
