"""Benchmark: `worker fill-mask` against the transformers fill-mask pipeline (fp32), same
base-sized random model, same 1,000 masked NSMC sentences, same CPU threads, side by side. With
bf16, `worker fill-mask --dtype bf16` runs too, against the pipeline in fp32 and under
`torch.autocast("cpu", dtype=torch.bfloat16)`, and its top-1 tokens are compared with fp32's
(agreement over all sentences, and over those whose fp32 top-1 leads its top-2 by more than 1 %:
a random model's candidates are often near ties that any rounding flips).

usage: python scripts/bench/fill_mask.py [--threads N] [--n 1000] [--precision fp32|bf16|both]
(run with the virtualenv's python after ./test.sh or scripts/build.sh)"""
import argparse
import json
import os
import subprocess
import time

from common import WORKER, base_model, masked_sentences


def worker_fill_mask(args, model_dir, sentences_path, precision):
    """(seconds, per-line JSON) of `worker fill-mask` over the file (model load included)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    start = time.perf_counter()
    with open(sentences_path, "rb") as stdin:
        out = subprocess.run([WORKER, "fill-mask", "--model", model_dir, "--top_k", "5", "--dtype", precision],
                             stdin=stdin, capture_output=True, env=env, check=True)
    seconds = time.perf_counter() - start
    return seconds, [json.loads(line) for line in out.stdout.decode().splitlines()]


def top1_agreement(reference, other):
    """(agreeing share of all lines, agreeing share of the lines whose reference top-1 leads its
    top-2 by more than 1 %, how many lead); each line is one mask's candidate list."""
    same = [a[0]["token"] == b[0]["token"] for a, b in zip(reference, other)]
    leads = [i for i, a in enumerate(reference) if a[0]["score"] > 1.01 * a[1]["score"]]
    led_same = sum(same[i] for i in leads) / len(leads) if leads else float("nan")
    return sum(same) / len(same), led_same, len(leads)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "both"])
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

    def pipeline_seconds(bf16):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            for s in sentences:
                fill(s, top_k=5)
        return time.perf_counter() - start

    python_s = pipeline_seconds(False)
    print(f"sentences: {len(sentences)}, threads: {args.threads}")
    print(f"transformers pipeline: {python_s:.2f} s ({len(sentences) / python_s:.1f} sentences/s, model load excluded)")
    precisions = ["fp32", "bf16"] if args.precision == "both" else [args.precision]
    if "bf16" in precisions:
        python_bf16_s = pipeline_seconds(True)
        print(f"bf16 transformers pipeline (autocast): {python_bf16_s:.2f} s "
              f"({len(sentences) / python_bf16_s:.1f} sentences/s, model load excluded)")
    predictions = {}
    for precision in precisions:
        rust_s, predictions[precision] = worker_fill_mask(args, model_dir, sentences_path, precision)
        label = "kormlm worker fill-mask" if precision == "fp32" else "bf16 kormlm worker fill-mask"
        print(f"{label}: {rust_s:.2f} s ({len(sentences) / rust_s:.1f} sentences/s, model load included)")
        print(f"{'' if precision == 'fp32' else 'bf16 '}speed-up: {python_s / rust_s:.2f}x")
        if precision == "bf16":
            print(f"bf16 speed-up vs the bf16 pipeline: {python_bf16_s / rust_s:.2f}x")
    if len(predictions) == 2:
        everywhere, led, leads = top1_agreement(predictions["fp32"], predictions["bf16"])
        print(f"bf16 top-1 agreement with fp32: {everywhere * 100:.1f} % of {len(sentences)} sentences; "
              f"{led * 100:.1f} % of the {leads} whose fp32 top-1 leads top-2 by more than 1 %")


if __name__ == "__main__":
    main()
