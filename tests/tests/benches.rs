//! The README's benchmark commands run, on tiny settings: each finishes and prints its ratio.
//! (The figures themselves come from full runs; these only keep the commands working.)

use kormlm_e2e::*;
use std::process::Command;

fn ratio(output: &str, label: &str) -> f64 {
    let line = output
        .lines()
        .find(|l| l.starts_with(label))
        .unwrap_or_else(|| panic!("no {label:?} line in:\n{output}"));
    let value = line[label.len()..].trim().split('x').next().unwrap().trim();
    value.parse().unwrap_or_else(|_| panic!("{line:?}"))
}

fn bench(script: &str, args: &[&str]) -> String {
    let out = run(Command::new(oracle_python())
        .current_dir(workspace_root())
        .arg(format!("scripts/bench/{script}"))
        .args(args)
        .args(["--threads", "2"]));
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{script}: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

// One test: the scripts share the cached base-sized model, which they create on first use.
#[test]
fn the_benchmark_commands_run_and_print_their_ratios() {
    let out = bench("fill_mask.py", &["--n", "16"]);
    assert!(ratio(&out, "speed-up:") > 0.0);
    let out = bench("train.py", &["--steps", "2", "--warmup", "1"]);
    assert!(ratio(&out, "speed-up:") > 0.0);
    let out = bench("augment.py", &["--n", "16"]);
    assert!(ratio(&out, "speed-up vs one-sentence loop:") > 0.0);

    let ring = workspace_root().join("target/release/examples/ring_bench");
    let out = run(Command::new(&ring).args(["1000000", "2"]));
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{}: {text}", ring.display());
    assert!(text.contains("bus bandwidth / memcpy: reduce-scatter"), "{text}");
}
