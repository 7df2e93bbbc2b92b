"""The Python side of kormlm's sequence-classification oracle tests: transformers'
ElectraForSequenceClassification computes what kormlm's classifier must reproduce.

    classify_oracle.py loading-info MODEL_DIR --num_labels N [--multi_label]
        prints {"missing": [...], "unexpected": [...]} as from_pretrained lists them
    classify_oracle.py logits CLASSIFIER_DIR SENTENCES OUT.safetensors
        loads with AutoModelForSequenceClassification; writes input_ids, attention_mask, logits;
        prints the loaded config's label maps and problem type
    classify_oracle.py train-step CLASSIFIER_DIR BATCHES OUT.safetensors --lr LR [--clip C]
        one torch.optim.AdamW step over the micro-batches (input_ids_k, attention_mask_k,
        labels_k) with transformers' own loss, each micro-batch weighted by its share of the
        rows; prints {"loss": ...}; writes the updated weights
    classify_oracle.py sklearn-metrics PREDICTIONS.jsonl GOLD.json
        accuracy and macro-F1 (per-label F1 for multi-label) with scikit-learn from the
        predictions file of `worker classify predict` and the gold labels
    classify_oracle.py sklearn-metrics-many GOLD.json PREDICTIONS.jsonl...
        the same for several predictions files against one gold file, as a JSON list
"""
import argparse
import json
import os

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
    return lines


def load_classifier(path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(path, attn_implementation="eager")
    model.eval()
    return model, AutoTokenizer.from_pretrained(path)


def cmd_loading_info(args):
    from transformers import AutoModelForSequenceClassification

    kwargs = {"num_labels": args.num_labels}
    if args.multi_label:
        kwargs["problem_type"] = "multi_label_classification"
    _, info = AutoModelForSequenceClassification.from_pretrained(args.model, output_loading_info=True, **kwargs)
    print(json.dumps({"missing": sorted(info["missing_keys"]), "unexpected": sorted(info["unexpected_keys"])}))


def cmd_logits(args):
    from safetensors.torch import save_file

    model, tok = load_classifier(args.model)
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
    config = model.config
    print(json.dumps({
        "class": type(model).__name__,
        "architectures": config.architectures,
        "id2label": {str(k): v for k, v in config.id2label.items()},
        "label2id": config.label2id,
        "num_labels": config.num_labels,
        "problem_type": config.problem_type,
    }))


def cmd_train_step(args):
    from safetensors.torch import load_file, save_file

    model, _ = load_classifier(args.model)
    model.train()
    batches = load_file(args.batches)
    micro = sorted(int(k.split("_")[-1]) for k in batches if k.startswith("labels_"))
    total = sum(batches[f"labels_{k}"].shape[0] for k in micro)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(args.beta1, args.beta2), eps=args.eps,
                            weight_decay=args.weight_decay)
    loss_total = 0.0
    for k in micro:
        labels = batches[f"labels_{k}"]
        out = model(input_ids=batches[f"input_ids_{k}"], attention_mask=batches[f"attention_mask_{k}"], labels=labels)
        # transformers' loss is the micro-batch mean; weighted by the micro-batch's rows, the
        # accumulated gradient is that of the global batch's mean.
        loss = out.loss * (labels.shape[0] / total)
        loss.backward()
        loss_total += float(loss)
    result = {"loss": loss_total, "problem_type": model.config.problem_type}
    if args.clip > 0:
        result["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip))
    print(json.dumps(result))
    opt.step()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, args.out)


def sklearn_metrics(predictions_path, gold):
    """gold: {"labels": [names in id order], "problem_type": ..., "gold": [name or [names]]}."""
    from sklearn.metrics import accuracy_score, f1_score
    from sklearn.preprocessing import MultiLabelBinarizer

    names = gold["labels"]
    predictions = [json.loads(line) for line in read_lines(predictions_path)]
    if len(predictions) != len(gold["gold"]):
        raise SystemExit(f"{len(predictions)} predictions for {len(gold['gold'])} gold rows")
    if gold["problem_type"] == "multi_label_classification":
        binarizer = MultiLabelBinarizer(classes=names)
        y_true = binarizer.fit_transform(gold["gold"])
        y_pred = binarizer.transform([p["labels"] for p in predictions])
    else:
        index = {n: i for i, n in enumerate(names)}
        y_true = [index[g] for g in gold["gold"]]
        y_pred = [index[p["label"]] for p in predictions]
    labels = list(range(len(names)))
    if gold["problem_type"] == "multi_label_classification":
        per_label = f1_score(y_true, y_pred, average=None, zero_division=0).tolist()
        macro = f1_score(y_true, y_pred, average="macro", zero_division=0)
    else:
        per_label = f1_score(y_true, y_pred, average=None, labels=labels, zero_division=0).tolist()
        macro = f1_score(y_true, y_pred, average="macro", labels=labels, zero_division=0)
    return {
        "examples": len(predictions),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(macro),
        "per_label_f1": dict(zip(names, per_label)),
    }


def read_gold(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def cmd_sklearn_metrics(args):
    print(json.dumps(sklearn_metrics(args.predictions, read_gold(args.gold))))


def cmd_sklearn_metrics_many(args):
    gold = read_gold(args.gold)
    print(json.dumps([sklearn_metrics(p, gold) for p in args.predictions]))


def main():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("loading-info")
    p.add_argument("model")
    p.add_argument("--num_labels", type=int, required=True)
    p.add_argument("--multi_label", action="store_true")
    p = sub.add_parser("logits")
    p.add_argument("model")
    p.add_argument("sentences")
    p.add_argument("out")
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
    p = sub.add_parser("sklearn-metrics")
    p.add_argument("predictions")
    p.add_argument("gold")
    p = sub.add_parser("sklearn-metrics-many")
    p.add_argument("gold")
    p.add_argument("predictions", nargs="+")
    args = parser.parse_args()
    {
        "loading-info": cmd_loading_info,
        "logits": cmd_logits,
        "train-step": cmd_train_step,
        "sklearn-metrics": cmd_sklearn_metrics,
        "sklearn-metrics-many": cmd_sklearn_metrics_many,
    }[args.cmd](args)


if __name__ == "__main__":
    main()
