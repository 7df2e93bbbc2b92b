//! The README's benchmark commands run, on tiny settings and the small benchmark model
//! (`KORMLM_BENCH_SIZE=small`): each finishes and prints its ratio. (The figures themselves come
//! from full runs at the base size; these only keep the commands working, and check that each
//! printed ratio is the one of the figures printed beside it.)

use kormlm_e2e::*;
use std::process::Command;

/// The number printed right after `label` (the first occurrence).
fn number_after(output: &str, label: &str) -> f64 {
    let start = output
        .find(label)
        .unwrap_or_else(|| panic!("no {label:?} in:\n{output}"))
        + label.len();
    let rest = output[start..].trim_start();
    let end = rest
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '-'))
        .unwrap_or(rest.len());
    rest[..end]
        .parse()
        .unwrap_or_else(|_| panic!("no number after {label:?} in:\n{output}"))
}

/// `ratio` printed with two decimals is `numerator / denominator`, both printed with two
/// decimals: it lies in the range their rounding allows (an inverted or mislabelled ratio
/// does not, unless the two figures are within rounding of each other).
fn assert_ratio(ratio: f64, numerator: f64, denominator: f64, output: &str) {
    let half = 0.005;
    let low = (numerator - half) / (denominator + half) - half;
    let high = if denominator > half {
        (numerator + half) / (denominator - half) + half
    } else {
        f64::INFINITY
    };
    assert!(
        (low..=high).contains(&ratio),
        "{ratio} is not {numerator} / {denominator}:\n{output}"
    );
}

fn bench(script: &str, args: &[&str]) -> String {
    let out = run(Command::new(oracle_python())
        .current_dir(workspace_root())
        .env("KORMLM_BENCH_SIZE", "small")
        .arg(format!("scripts/bench/{script}"))
        .args(args)
        .args(["--threads", "2"]));
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{script}: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.lines().any(|line| line.starts_with("model: small size")),
        "{script}: {stdout}"
    );
    stdout
}

/// Whether `worker info` finds bfloat16 instructions on this CPU (AVX-512 BF16 or AMX): the bf16
/// columns of the benchmarks run only there (elsewhere `--dtype bf16` is refused, as tested in
/// the worker's unit tests).
fn cpu_has_bf16() -> bool {
    let out = run(Command::new(binary("worker")).args(["info", "--json"]));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).expect("worker info --json prints JSON");
    let cpu = &info["cpu_bf16"];
    cpu["avx512_bf16"].as_bool().expect("cpu_bf16.avx512_bf16") || cpu["amx_bf16"].as_bool().expect("cpu_bf16.amx_bf16")
}

// One test: the scripts share the cached benchmark model, which they create on first use.
#[test]
fn the_benchmark_commands_run_and_print_their_ratios() {
    let bf16 = cpu_has_bf16();
    let precision = if bf16 { "both" } else { "fp32" };
    let out = bench("fill_mask.py", &["--n", "16", "--precision", precision]);
    assert_eq!(number_after(&out, "sentences:"), 16.0, "{out}");
    let ratio = number_after(&out, "speed-up:");
    assert!(ratio > 0.0);
    let python_s = number_after(&out, "transformers pipeline:");
    let rust_s = number_after(&out, "kormlm worker fill-mask:");
    assert_ratio(ratio, python_s, rust_s, &out);
    if bf16 {
        let bf16_s = number_after(&out, "bf16 kormlm worker fill-mask:");
        assert_ratio(number_after(&out, "bf16 speed-up:"), python_s, bf16_s, &out);
        let python_bf16_s = number_after(&out, "bf16 transformers pipeline (autocast):");
        assert_ratio(
            number_after(&out, "bf16 speed-up vs the bf16 pipeline:"),
            python_bf16_s,
            bf16_s,
            &out,
        );
        let agreement = number_after(&out, "bf16 top-1 agreement with fp32:");
        assert!((0.0..=100.0).contains(&agreement), "{out}");
    }

    let out = bench("train.py", &["--steps", "2", "--warmup", "1", "--precision", precision]);
    assert!(out.contains(", 2 timed steps"), "{out}");
    let ratio = number_after(&out, "fp32 speed-up:");
    assert!(ratio > 0.0);
    let python_rate = number_after(&out, "fp32 transformers + torch AdamW (dynamic padding):");
    let rust_rate = number_after(&out, "fp32 kormlm worker train:");
    assert_ratio(ratio, rust_rate, python_rate, &out);
    let original_rate = number_after(&out, "fp32 original setup (padding to 100):");
    assert_ratio(
        number_after(&out, "fp32 speed-up vs original setup:"),
        rust_rate,
        original_rate,
        &out,
    );
    let ours = &out[out.find("fp32 kormlm worker train:").unwrap()..];
    let mfu = number_after(ours, "MFU");
    assert!(mfu > 0.0 && mfu < 100.0, "MFU is a percentage of the peak: {out}");
    let our_rss = number_after(ours, "peak RSS");
    let anchor = &out[out.find("fp32 transformers").unwrap()..];
    let their_rss = number_after(anchor, "peak RSS");
    assert!(
        our_rss > 0.1 && their_rss > 0.1,
        "both peak RSS figures are measured: {out}"
    );
    assert!(number_after(&out, "fp32 kormlm dev loss after 3 steps:") > 0.0, "{out}");
    if bf16 {
        let python_rate = number_after(&out, "bf16 transformers + torch AdamW (dynamic padding):");
        let rust_rate = number_after(&out, "bf16 kormlm worker train:");
        assert_ratio(number_after(&out, "bf16 speed-up:"), rust_rate, python_rate, &out);
        let fp32_loss = number_after(&out, "fp32 kormlm dev loss after 3 steps:");
        let bf16_loss = number_after(&out, "bf16 kormlm dev loss after 3 steps:");
        let relative = number_after(&out, "bf16 dev loss vs fp32:");
        assert!(
            (relative - (bf16_loss / fp32_loss - 1.0) * 100.0).abs() < 0.1,
            "the relative dev loss is the one of the printed losses: {out}"
        );
    }

    let out = bench("augment.py", &["--n", "16", "--precision", precision]);
    assert_eq!(number_after(&out, "sentences:"), 16.0, "{out}");
    let loop_s = number_after(&out, "original one-sentence loop (transformers, fp32):");
    let precisions: &[&str] = if bf16 { &["fp32", "bf16"] } else { &["fp32"] };
    for precision in precisions {
        let ratio = number_after(&out, &format!("{precision} speed-up vs one-sentence loop:"));
        assert!(ratio > 0.0);
        let batched_s = number_after(&out, &format!("{precision} batched transformers:"));
        let rust_s = number_after(&out, &format!("{precision} kormlm worker augment:"));
        assert_ratio(ratio, loop_s, rust_s, &out);
        let ours = &out[out
            .find(&format!("{precision} speed-up vs one-sentence loop:"))
            .unwrap()..];
        assert_ratio(number_after(ours, "vs batched transformers:"), batched_s, rust_s, &out);
    }

    // The memory timeline: `worker train` on the small model, its logs merged with its RSS.
    let dir = tempfile::tempdir().unwrap();
    let corpus = dir.path().join("corpus.txt");
    std::fs::write(&corpus, nsmc_documents(200).join("\n") + "\n").unwrap();
    let out = run(Command::new(oracle_python())
        .current_dir(workspace_root())
        .args(["scripts/bench/rss_timeline.py", "--step", "0.05", "--"])
        .arg(binary("worker"))
        .args(["train", "--config"])
        .arg(config("cpu-demo.json"))
        .arg("--model_name_or_path")
        .arg(tiny_model())
        .arg("--data_path")
        .arg(&corpus)
        .arg("--output_dir")
        .arg(dir.path().join("out"))
        .args(["--max_steps", "2", "--max_seq_len", "32"]));
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        text.contains(" s  log ") && text.contains("training finished"),
        "{text}"
    );
    assert!(text.contains(" s  rss "), "{text}");
    let peak = number_after(&text, "peak RSS");
    assert!(peak > 0.05 && text.trim_end().ends_with("exit status 0"), "{text}");

    let ring = workspace_root().join("target/release/examples/ring_bench");
    let out = run(Command::new(&ring).args(["1000000", "2"]));
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{}: {text}", ring.display());
    assert!(text.contains("bus bandwidth / memcpy: reduce-scatter"), "{text}");
    assert!(text.starts_with("elements 1000000 (4 MB), world 2\n"), "{text}");
    let memcpy = number_after(&text, "memcpy:");
    let reduce_scatter = number_after(&text[text.find("reduce-scatter:").unwrap()..], "bus bandwidth");
    let all_gather = number_after(&text[text.find("all-gather:").unwrap()..], "bus bandwidth");
    assert_ratio(
        number_after(&text, "memcpy: reduce-scatter"),
        reduce_scatter,
        memcpy,
        &text,
    );
    assert_ratio(number_after(&text, ", all-gather"), all_gather, memcpy, &text);
}
