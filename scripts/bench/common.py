"""Shared set-up for kormlm benchmarks: a base-sized random ELECTRA (hidden 768, 12 layers,
vocab 32k) with a WordPiece vocabulary trained on the shared corpora, cached under
$KORMLM_CACHE/bench, and masked NSMC sentences."""
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


def base_model():
    tok = os.path.join(CACHE, "tok32k")
    model = os.path.join(CACHE, "electra-base-random")
    if not os.path.isfile(os.path.join(tok, "vocab.txt")):
        oracle("vocab", tok, "--data", DATA, "--size", "32000")
    if not os.path.isfile(os.path.join(model, "model.safetensors")):
        oracle("model", model, "--tokenizer", tok, "--embedding", "768", "--hidden", "768", "--layers", "12",
               "--heads", "12", "--intermediate", "3072", "--seed", "7")
    return model


def masked_sentences(n, masks=1, seed=0):
    path = os.path.join(CACHE, f"masked-{n}-{masks}-{seed}.txt")
    if not os.path.isfile(path):
        oracle("masked", os.path.join(DATA, "nsmc", "ratings_test.txt"), path, "--n", str(n), "--masks", str(masks),
               "--seed", str(seed))
    return path
