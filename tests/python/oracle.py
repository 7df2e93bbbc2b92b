"""The Python side of kormlm's oracle tests: transformers/tokenizers/torch compute what kormlm
must reproduce. Every command writes plain files (JSON lines, safetensors) that the Rust tests
compare against.

    oracle.py vocab OUT_DIR --data SHARED_DATA [--size N]
    oracle.py model OUT_DIR --tokenizer DIR [--embedding E --hidden H --layers L --heads A
                    --intermediate I --format safetensors|bin|sharded --kind mlm|discriminator --seed S]
    oracle.py logits MODEL_DIR SENTENCES OUT.safetensors
    oracle.py fill-mask MODEL_DIR INPUT OUT.jsonl [--top_k K] [--targets a,b]
    oracle.py tokenize TOKENIZER_DIR INPUT OUT.jsonl [--max_len N]
    oracle.py masked NSMC_FILE OUT [--n N --masks M --seed S]
    oracle.py new-keys MODEL_DIR          (prints the keys transformers newly initialises)
    oracle.py mlm-accuracy MODEL_DIR TSV [--column C --limit N --max_len L --seed S --probability P]
"""
import argparse
import csv
import io
import json
import os
import random
import sys

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

torch.set_num_threads(int(os.environ.get("KORMLM_ORACLE_THREADS", "2")))


def read_lines(path):
    with open(path, encoding="utf-8", newline="") as f:
        text = f.read()
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def corpus_sentences(data):
    """Sentences of the three shared corpora, for vocabulary training."""
    out = []
    for name in ["ratings_train.txt", "ratings_test.txt"]:
        for row in read_lines(os.path.join(data, "nsmc", name))[1:]:
            parts = row.split("\t")
            if len(parts) == 3 and parts[1]:
                out.append(parts[1])
    for name in ["labeled/train.tsv", "labeled/dev.tsv"]:
        with open(os.path.join(data, "korean-hate-speech", name), encoding="utf-8", newline="") as f:
            for row in list(csv.reader(f, delimiter="\t"))[1:]:
                out.append(row[0])
    out.extend(read_lines(os.path.join(data, "korean-hate-speech", "unlabeled", "unlabeled_comments_5.txt")))
    for name in ["unsmile_train_v1.0.tsv", "unsmile_valid_v1.0.tsv"]:
        for row in read_lines(os.path.join(data, "korean_unsmile_dataset", name))[1:]:
            out.append(row.split("\t")[0])
    return out


def cmd_vocab_text(args):
    """tokenizers' WordPieceTrainer (no alphabet limit, as kormlm's tokenizer-train) on the lines
    of a text file; writes OUT/vocab.txt in id order."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=None,
                                                lowercase=False)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=args.size, min_frequency=2, show_progress=False,
                                        special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    tok.train_from_iterator(read_lines(args.text), trainer)
    vocab = tok.get_vocab()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "vocab.txt"), "w", encoding="utf-8") as f:
        f.write("".join(t + "\n" for t in sorted(vocab, key=vocab.get)))


def cmd_vocab(args):
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertTokenizerFast

    if args.text:
        return cmd_vocab_text(args)

    tok = BertWordPieceTokenizer(clean_text=True, handle_chinese_chars=True, strip_accents=False, lowercase=False)
    tok.train_from_iterator(
        read_lines(args.text) if args.text else corpus_sentences(args.data),
        vocab_size=args.size,
        min_frequency=2,
        special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
        show_progress=False,
    )
    os.makedirs(args.out, exist_ok=True)
    tok.save_model(args.out)
    fast = BertTokenizerFast(vocab_file=os.path.join(args.out, "vocab.txt"), do_lower_case=False, strip_accents=None)
    fast.save_pretrained(args.out)
    print(len(fast))


def cmd_model(args):
    from transformers import BertTokenizerFast, ElectraConfig, ElectraForMaskedLM, ElectraForPreTraining

    tok = BertTokenizerFast.from_pretrained(args.tokenizer)
    torch.manual_seed(args.seed)
    config = ElectraConfig(
        vocab_size=len(tok),
        embedding_size=args.embedding,
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        intermediate_size=args.intermediate,
        max_position_embeddings=args.max_positions,
        pad_token_id=tok.pad_token_id,
        hidden_dropout_prob=args.dropout,
        attention_probs_dropout_prob=args.dropout,
    )
    model = (ElectraForPreTraining if args.kind == "discriminator" else ElectraForMaskedLM)(config)
    if args.kind == "mlm":
        # Random non-zero head biases, so a loader that skips them is caught.
        with torch.no_grad():
            model.generator_lm_head.bias.normal_(0, 0.5)
            model.generator_predictions.LayerNorm.bias.normal_(0, 0.1)
    model.eval()
    if args.format == "bin":
        model.save_pretrained(args.out, safe_serialization=False)
    elif args.format == "sharded":
        model.save_pretrained(args.out, safe_serialization=True, max_shard_size="200KB")
    else:
        model.save_pretrained(args.out, safe_serialization=True)
    tok.save_pretrained(args.out)


def load_mlm(path):
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    model = AutoModelForMaskedLM.from_pretrained(path, attn_implementation="eager")
    model.eval()
    return model, AutoTokenizer.from_pretrained(path)


def cmd_logits(args):
    from safetensors.torch import save_file

    model, tok = load_mlm(args.model)
    sentences = read_lines(args.sentences)
    batch = tok(sentences, padding=True, truncation=True, max_length=128, return_tensors="pt")
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    save_file(
        {
            "input_ids": batch["input_ids"].contiguous(),
            "attention_mask": batch["attention_mask"].contiguous(),
            "logits": logits.contiguous(),
        },
        args.out,
    )


def cmd_fill_mask(args):
    from transformers import pipeline

    model, tok = load_mlm(args.model)
    fill = pipeline("fill-mask", model=model, tokenizer=tok, device="cpu")
    kwargs = {"top_k": args.top_k}
    if args.targets:
        kwargs["targets"] = args.targets.split(",")
    with open(args.out, "w", encoding="utf-8") as out:
        for line in read_lines(args.input):
            try:
                result = fill(line, **kwargs)
            except Exception as e:  # the pipeline raises for a line without a mask
                result = {"error": str(e)}
            out.write(json.dumps(result, ensure_ascii=False) + "\n")


def cmd_tokenize(args):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    lines = read_lines(args.input)
    ids = tok(lines, truncation=True, max_length=args.max_len)["input_ids"]
    with open(args.out, "w", encoding="utf-8") as out:
        for row in ids:
            out.write(json.dumps({"input_ids": row, "decoded": tok.decode(row, skip_special_tokens=True)}, ensure_ascii=False) + "\n")


def cmd_masked(args):
    rng = random.Random(args.seed)
    docs = [row.split("\t")[1] for row in read_lines(args.nsmc)[1:] if len(row.split("\t")) == 3]
    docs = [d for d in docs if len(d.split()) >= args.masks + 1]
    rng.shuffle(docs)
    out = []
    for doc in docs[: args.n]:
        words = doc.split()
        for i in sorted(rng.sample(range(len(words)), args.masks)):
            words[i] = "[MASK]"
        out.append(" ".join(words))
    with open(args.out, "w", encoding="utf-8") as f:
        f.write("\n".join(out) + "\n")


MASK64 = (1 << 64) - 1


class SplitMix64:
    """SplitMix64 (Steele, Lea and Flood 2014), written here from its published definition."""

    def __init__(self, state):
        self.state = state & MASK64

    def next_u64(self):
        self.state = (self.state + 0x9E3779B97F4A7C15) & MASK64
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
        return z ^ (z >> 31)

    def next_f64(self):
        return (self.next_u64() >> 11) * (1.0 / (1 << 53))

    @staticmethod
    def for_sample(seed, epoch, index):
        """kormlm's generator of one (seed, epoch, sample index)."""
        a = SplitMix64(seed ^ 0x6A09E667F3BCC908).next_u64() ^ ((epoch * 0x9E3779B97F4A7C15) & MASK64)
        b = SplitMix64(a).next_u64() ^ ((index * 0xBF58476D1CE4E5B9) & MASK64)
        return SplitMix64(b)


def cmd_mlm_accuracy(args):
    """transformers' top-1 accuracy on the tokens of the first LIMIT non-empty texts of a TSV
    column that are replaced by [MASK], each position with probability P from one draw of the
    sentence's generator (special tokens never), as `worker augment-report` measures it."""
    model, tok = load_mlm(args.model)
    with open(args.tsv, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t"))
    column = rows[0].index(args.column)
    texts = [row[column] for row in rows[1:] if row[column].strip()][: args.limit]
    special = set(tok.all_special_ids)
    inputs, labels = [], []
    for i, ids in enumerate(tok(texts, truncation=True, max_length=args.max_len)["input_ids"]):
        rng = SplitMix64.for_sample(args.seed, 0, i)
        masked = [rng.next_f64() < args.probability and t not in special for t in ids]
        inputs.append([tok.mask_token_id if m else t for t, m in zip(ids, masked)])
        labels.append([t if m else -100 for t, m in zip(ids, masked)])
    correct = total = 0
    for start in range(0, len(inputs), 32):
        batch = tok.pad({"input_ids": inputs[start : start + 32]}, return_tensors="pt")
        width = batch["input_ids"].shape[1]
        label = torch.tensor([row + [-100] * (width - len(row)) for row in labels[start : start + 32]])
        with torch.no_grad():
            predicted = model(**batch).logits.argmax(-1)
        total += int((label != -100).sum())
        correct += int(((predicted == label) & (label != -100)).sum())
    print(json.dumps({"sentences": len(texts), "masked": total, "correct": correct}))


def cmd_new_keys(args):
    from transformers import AutoModelForMaskedLM

    _, info = AutoModelForMaskedLM.from_pretrained(args.model, output_loading_info=True)
    print(json.dumps({"missing": sorted(info["missing_keys"]), "unexpected": sorted(info["unexpected_keys"])}))


def cmd_train_step(args):
    """One optimizer step of torch.optim.AdamW on the transformers model over the micro-batches
    in BATCHES (input_ids_k, attention_mask_k, labels_k), loss = masked-token CE sum / all
    masked tokens; writes the updated weights."""
    import torch.nn.functional as F
    from safetensors.torch import load_file, save_file

    model, _ = load_mlm(args.model)
    model.train()
    batches = load_file(args.batches)
    micro = sorted(int(k.split("_")[-1]) for k in batches if k.startswith("labels_"))
    total = sum(int((batches[f"labels_{k}"] != -100).sum()) for k in micro)
    # DeepSpeed's Adam with adam_w_mode false is torch's Adam: L2 decay added to the gradient.
    optimizer = torch.optim.Adam if args.l2 else torch.optim.AdamW
    opt = optimizer(model.parameters(), lr=args.lr, betas=(args.beta1, args.beta2), eps=args.eps,
                    weight_decay=args.weight_decay)
    loss_total = 0.0
    for k in micro:
        # --bf16: CPU autocast in bfloat16, as the Hugging Face Trainer runs with --bf16 on a CPU.
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            logits = model(input_ids=batches[f"input_ids_{k}"], attention_mask=batches[f"attention_mask_{k}"]).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batches[f"labels_{k}"].reshape(-1),
                               ignore_index=-100, reduction="sum") / total
        loss.backward()
        loss_total += float(loss)
    result = {"loss": loss_total}
    if args.clip > 0:
        result["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip))
    print(json.dumps(result))
    opt.step()
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "generator_lm_head.weight"}
    save_file(state, args.out)


def cmd_schedules(args):
    """Learning rates of DeepSpeed's schedulers and transformers' linear schedule at every step
    below N, for the configurations kormlm's tests use."""
    from deepspeed.runtime.lr_schedules import WarmupCosineLR, WarmupDecayLR, WarmupLR
    from transformers import get_linear_schedule_with_warmup

    def run(make, n, base_lr=1e-3):
        p = [torch.nn.Parameter(torch.zeros(1))]
        opt = torch.optim.AdamW(p, lr=base_lr)
        sched = make(opt)
        out = []
        for _ in range(n):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out

    n = args.n
    result = {
        "warmup_log": run(lambda o: WarmupLR(o, warmup_min_lr=0, warmup_max_lr=2e-4, warmup_num_steps=100), n),
        "warmup_linear": run(lambda o: WarmupLR(o, warmup_min_lr=1e-5, warmup_max_lr=2e-4, warmup_num_steps=50,
                                                warmup_type="linear"), n),
        "warmup_decay": run(lambda o: WarmupDecayLR(o, total_num_steps=150, warmup_min_lr=0, warmup_max_lr=3e-4,
                                                    warmup_num_steps=40, warmup_type="linear"), n),
        "warmup_cosine": run(lambda o: WarmupCosineLR(o, total_num_steps=160, warmup_min_ratio=0.1,
                                                      warmup_num_steps=30, cos_min_ratio=0.01), n),
        "linear": run(lambda o: get_linear_schedule_with_warmup(o, 20, 180), n, base_lr=2e-4),
    }
    print(json.dumps(result))


def cmd_loss_scale(args):
    """DeepSpeed's DynamicLossScaler over an overflow pattern ("0"/"1" per iteration)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler
    import deepspeed.comm as dist

    dist.get_rank = lambda *a, **k: 0
    s = DynamicLossScaler(init_scale=2 ** args.power, scale_window=args.window, min_scale=1,
                          delayed_shift=args.hysteresis, consecutive_hysteresis=args.consecutive,
                          raise_error_at_min_scale=False)
    scales = []
    for c in args.pattern:
        s.update_scale(c == "1")
        scales.append(s.cur_scale)
    print(json.dumps(scales))


def main():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("vocab")
    p.add_argument("out")
    p.add_argument("--data", help="the shared corpora directory")
    p.add_argument("--text", help="instead: a text file, one sentence per line")
    p.add_argument("--size", type=int, default=8000)
    p = sub.add_parser("model")
    p.add_argument("out")
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--embedding", type=int, default=32)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=128)
    p.add_argument("--max_positions", type=int, default=512)
    p.add_argument("--format", default="safetensors", choices=["safetensors", "bin", "sharded"])
    p.add_argument("--kind", default="mlm", choices=["mlm", "discriminator"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dropout", type=float, default=0.1)
    p = sub.add_parser("logits")
    p.add_argument("model")
    p.add_argument("sentences")
    p.add_argument("out")
    p = sub.add_parser("fill-mask")
    p.add_argument("model")
    p.add_argument("input")
    p.add_argument("out")
    p.add_argument("--top_k", type=int, default=5)
    p.add_argument("--targets", default=None)
    p = sub.add_parser("tokenize")
    p.add_argument("tokenizer")
    p.add_argument("input")
    p.add_argument("out")
    p.add_argument("--max_len", type=int, default=512)
    p = sub.add_parser("masked")
    p.add_argument("nsmc")
    p.add_argument("out")
    p.add_argument("--n", type=int, default=600)
    p.add_argument("--masks", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("train-step")
    p.add_argument("model")
    p.add_argument("batches")
    p.add_argument("out")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--beta1", type=float, default=0.9)
    p.add_argument("--beta2", type=float, default=0.99)
    p.add_argument("--eps", type=float, default=1e-6)
    p.add_argument("--weight_decay", type=float, default=0.01)
    p.add_argument("--clip", type=float, default=0.0)
    p.add_argument("--l2", action="store_true")
    p.add_argument("--bf16", action="store_true")
    p = sub.add_parser("schedules")
    p.add_argument("--n", type=int, default=200)
    p = sub.add_parser("loss-scale")
    p.add_argument("pattern")
    p.add_argument("--power", type=int, default=8)
    p.add_argument("--window", type=int, default=4)
    p.add_argument("--hysteresis", type=int, default=2)
    p.add_argument("--consecutive", action="store_true")
    p = sub.add_parser("new-keys")
    p.add_argument("model")
    p = sub.add_parser("mlm-accuracy")
    p.add_argument("model")
    p.add_argument("tsv")
    p.add_argument("--column", default="comments")
    p.add_argument("--limit", type=int, default=1000)
    p.add_argument("--max_len", type=int, default=128)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--probability", type=float, default=0.15)
    args = parser.parse_args()
    {
        "vocab": cmd_vocab,
        "model": cmd_model,
        "logits": cmd_logits,
        "fill-mask": cmd_fill_mask,
        "tokenize": cmd_tokenize,
        "masked": cmd_masked,
        "new-keys": cmd_new_keys,
        "train-step": cmd_train_step,
        "schedules": cmd_schedules,
        "loss-scale": cmd_loss_scale,
        "mlm-accuracy": cmd_mlm_accuracy,
    }[args.cmd](args)


if __name__ == "__main__":
    main()
