"""Benchmark: `worker augment` against (a) the original project's one-sentence-at-a-time
transformers loop (augment.py's augment_one_sent: tokenize, mask, one forward pass, top-k
filtering) and (b) a batched transformers implementation of the same algorithm. Same
base-sized random model, the same 1,000 NSMC sentences, same CPU threads, side by side. In bf16,
`worker augment --dtype bf16` runs against batched transformers under
`torch.autocast("cpu", dtype=torch.bfloat16)` and against the original loop in fp32 (as it ran).

usage: python scripts/bench/augment.py [--threads N] [--n 1000] [--precision fp32|bf16|both]"""
import argparse
import os
import random
import subprocess
import tempfile
import time

from common import DATA, WORKER, base_model

K, THRESHOLD, MLM_PROB = 5, 0.95, 0.15


def sentences(n):
    with open(os.path.join(DATA, "nsmc", "ratings_test.txt"), encoding="utf-8") as f:
        rows = [line.rstrip("\n").split("\t") for line in f][1:]
    return [r[1] for r in rows if len(r) == 3 and r[1] and '"' not in r[1]][:n]


def choose(tok, ids, pos, probs_row, original):
    values, candidates = probs_row.topk(K)
    if float(values[0]) >= THRESHOLD:
        return int(candidates[0])
    org = tok.convert_ids_to_tokens(original)
    for c in candidates.tolist():
        s = tok.convert_ids_to_tokens(c)
        if s != org and s.lstrip("#").isalpha() == org.lstrip("#").isalpha() and c != ids[pos - 1]:
            return c
    return original


def one_at_a_time(model, tok, texts, torch):
    rng = random.Random(0)
    out = []
    for text in texts:
        ids = tok(text)["input_ids"]
        original = list(ids)
        maskable = [i for i in range(1, len(ids) - 1) if ids[i] not in tok.all_special_ids]
        if not maskable:
            out.append(text)
            continue
        masked = [i for i in maskable if rng.random() < MLM_PROB] or [rng.choice(maskable)]
        for i in masked:
            ids[i] = tok.mask_token_id
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long)).logits[0]
        for i in masked:
            ids[i] = choose(tok, ids, i, logits[i].softmax(-1), original[i])
        out.append(tok.decode(ids, skip_special_tokens=True))
    return out


def batched(model, tok, texts, torch, bf16=False, batch_size=32):
    rng = random.Random(0)
    out = []
    for start in range(0, len(texts), batch_size):
        chunk = texts[start:start + batch_size]
        enc = tok(chunk, padding=True, return_tensors="pt")
        ids = enc["input_ids"].clone()
        originals = enc["input_ids"].tolist()
        masks = []
        for r, row in enumerate(originals):
            maskable = [i for i, t in enumerate(row) if t not in tok.all_special_ids]
            m = [i for i in maskable if rng.random() < MLM_PROB] or ([rng.choice(maskable)] if maskable else [])
            for i in m:
                ids[r, i] = tok.mask_token_id
            masks.append(m)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(input_ids=ids, attention_mask=enc["attention_mask"]).logits
        probs = logits.float().softmax(-1)
        for r, m in enumerate(masks):
            row = ids[r].tolist()
            for i in m:
                row[i] = choose(tok, row, i, probs[r, i], originals[r][i])
            out.append(tok.decode(row, skip_special_tokens=True))
    return out


def worker_augment(args, model_dir, texts, precision):
    """Seconds `worker augment` takes over `texts` (model load included)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "in.txt")
        with open(path, "w", encoding="utf-8") as f:
            f.write("\n".join(texts) + "\n")
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
        start = time.perf_counter()
        subprocess.run([WORKER, "augment", "--model", model_dir, "--input", path, "--output",
                        os.path.join(tmp, "out.csv"), "--k", str(K), "--threshold", str(THRESHOLD),
                        "--mlm_prob", str(MLM_PROB), "--dtype", precision], env=env, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "both"])
    args = parser.parse_args()
    model_dir = base_model()
    texts = sentences(args.n)
    precisions = ["fp32", "bf16"] if args.precision == "both" else [args.precision]

    import torch
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    model = AutoModelForMaskedLM.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    start = time.perf_counter()
    one_at_a_time(model, tok, texts, torch)
    loop_s = time.perf_counter() - start
    print(f"sentences: {len(texts)}, threads: {args.threads}")
    print(f"original one-sentence loop (transformers, fp32): {loop_s:.2f} s (model load excluded)")
    for precision in precisions:
        start = time.perf_counter()
        batched(model, tok, texts, torch, bf16=precision == "bf16")
        batched_s = time.perf_counter() - start
        rust_s = worker_augment(args, model_dir, texts, precision)
        print(f"{precision} batched transformers: {batched_s:.2f} s (model load excluded)")
        print(f"{precision} kormlm worker augment: {rust_s:.2f} s (model load included)")
        print(f"{precision} speed-up vs one-sentence loop: {loop_s / rust_s:.2f}x; "
              f"vs batched transformers: {batched_s / rust_s:.2f}x")


if __name__ == "__main__":
    main()
