"""Shared set-up for kormlm benchmarks: a base-sized random ELECTRA (hidden 768, 12 layers,
vocab 32k) with a WordPiece vocabulary trained on the shared corpora, cached under
$KORMLM_CACHE/bench, and masked NSMC sentences.

KORMLM_BENCH_SIZE=small swaps in the demo-sized model (hidden 256, 4 layers, vocab 8k): the
test suite uses it to check that every script runs and prints consistent ratios; the figures
that count come from the base size."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ORACLE = os.path.join(ROOT, "tests", "python", "oracle.py")
DATA = os.environ.get("KORMLM_SHARED_DATA", os.path.join(os.path.dirname(ROOT), "shared", "data"))
CACHE = os.path.join(os.environ.get("KORMLM_CACHE", os.path.expanduser("~/.cache/kormlm")), "bench")
WORKER = os.path.join(ROOT, "target", "release", "worker")


def oracle(*args):
    subprocess.run([sys.executable, ORACLE, *args], check=True)


SIZES = {
    # name: (vocabulary, embedding, hidden, layers, heads, intermediate)
    "base": (32000, 768, 768, 12, 12, 3072),
    "small": (8000, 128, 256, 4, 4, 1024),
}
SIZE = os.environ.get("KORMLM_BENCH_SIZE", "base")
if SIZE not in SIZES:
    sys.exit(f"KORMLM_BENCH_SIZE={SIZE!r}: accepted values are {', '.join(SIZES)}")


def base_model():
    """The benchmark model of KORMLM_BENCH_SIZE (base unless set), created on first use."""
    vocab, embedding, hidden, layers, heads, intermediate = SIZES[SIZE]
    tok = os.path.join(CACHE, f"tok{vocab // 1000}k")
    model = os.path.join(CACHE, "electra-base-random" if SIZE == "base" else f"electra-{SIZE}-random")
    if not os.path.isfile(os.path.join(tok, "vocab.txt")):
        oracle("vocab", tok, "--data", DATA, "--size", str(vocab))
    if not os.path.isfile(os.path.join(model, "model.safetensors")):
        oracle("model", model, "--tokenizer", tok, "--embedding", str(embedding), "--hidden", str(hidden), "--layers",
               str(layers), "--heads", str(heads), "--intermediate", str(intermediate), "--seed", "7")
    print(f"model: {SIZE} size (hidden {hidden}, {layers} layers, vocab {vocab // 1000}k)")
    return model


def masked_sentences(n, masks=1, seed=0):
    path = os.path.join(CACHE, f"masked-{n}-{masks}-{seed}.txt")
    if not os.path.isfile(path):
        oracle("masked", os.path.join(DATA, "nsmc", "ratings_test.txt"), path, "--n", str(n), "--masks", str(masks),
               "--seed", str(seed))
    return path
