"""Benchmark: `worker fill-mask` against the transformers fill-mask pipeline, same base-sized
random model, same 1,000 masked NSMC sentences, same CPU threads, side by side.

usage: python scripts/bench/fill_mask.py [--threads N] [--n 1000]
(run with the virtualenv's python after ./test.sh or scripts/build.sh)"""
import argparse
import os
import subprocess
import time

from common import WORKER, base_model, masked_sentences


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--n", type=int, default=1000)
    args = parser.parse_args()
    model_dir = base_model()
    sentences_path = masked_sentences(args.n)
    with open(sentences_path, encoding="utf-8") as f:
        sentences = [line.rstrip("\n") for line in f]

    import torch
    from transformers import AutoModelForMaskedLM, AutoTokenizer, pipeline

    torch.set_num_threads(args.threads)
    model = AutoModelForMaskedLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    fill = pipeline("fill-mask", model=model, tokenizer=tokenizer, device="cpu")
    fill(sentences[0])
    start = time.perf_counter()
    for s in sentences:
        fill(s, top_k=5)
    python_s = time.perf_counter() - start

    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    start = time.perf_counter()
    with open(sentences_path, "rb") as stdin:
        subprocess.run([WORKER, "fill-mask", "--model", model_dir, "--top_k", "5"], stdin=stdin,
                       stdout=subprocess.DEVNULL, env=env, check=True)
    rust_s = time.perf_counter() - start

    print(f"sentences: {len(sentences)}, threads: {args.threads}")
    print(f"transformers pipeline: {python_s:.2f} s ({len(sentences) / python_s:.1f} sentences/s, model load excluded)")
    print(f"kormlm worker fill-mask: {rust_s:.2f} s ({len(sentences) / rust_s:.1f} sentences/s, model load included)")
    print(f"speed-up: {python_s / rust_s:.2f}x")


if __name__ == "__main__":
    main()
