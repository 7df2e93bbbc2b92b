//! The README against the binaries: every flag is in its configuration reference, and the GPU
//! and multi-host command lines it gives plan what it says (`--dry-run`, with a stand-in for
//! the GPU probe since this machine has none).

use kormlm_e2e::*;
use serde_json::Value;
use std::process::Command;

fn readme() -> String {
    std::fs::read_to_string(workspace_root().join("README.md")).unwrap()
}

fn section<'a>(text: &'a str, heading: &str) -> &'a str {
    let start = text
        .find(heading)
        .unwrap_or_else(|| panic!("README has no {heading:?}"));
    let rest = &text[start + heading.len()..];
    let end = rest.find("\n## ").unwrap_or(rest.len());
    &rest[..end]
}

/// The long flags a `--help` lists (the first name of each option line).
fn flags_of(binary_name: &str, subcommand: Option<&str>) -> Vec<String> {
    let mut command = Command::new(binary(binary_name));
    command
        .args(subcommand.into_iter().flat_map(|s| s.split(' ')))
        .arg("--help");
    let out = run(&mut command);
    assert!(out.status.success(), "{binary_name} {subcommand:?} --help");
    let text = String::from_utf8(out.stdout).unwrap();
    let mut flags = Vec::new();
    for line in text.lines() {
        let trimmed = line.trim_start();
        let trimmed = trimmed.strip_prefix("-h, ").unwrap_or(trimmed);
        let Some(rest) = trimmed.strip_prefix("--").or_else(|| {
            trimmed
                .get(4..)
                .and_then(|t| t.strip_prefix("--"))
                .filter(|_| trimmed.starts_with('-'))
        }) else {
            continue;
        };
        let name: String = rest
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '-')
            .collect();
        if !["help", "version"].contains(&name.as_str()) && !flags.contains(&name) {
            flags.push(name);
        }
    }
    assert!(!flags.is_empty(), "{binary_name} {subcommand:?} --help lists no flag");
    flags
}

fn mentions(text: &str, flag: &str) -> bool {
    let needle = format!("--{flag}");
    text.match_indices(&needle).any(|(i, _)| {
        let next = text[i + needle.len()..].chars().next();
        !next.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    })
}

#[test]
fn every_flag_of_every_command_is_in_the_configuration_reference() {
    let text = readme();
    let reference = section(&text, "## Configuration reference");
    let commands: &[(&str, Option<&str>)] = &[
        ("coordinator", None),
        ("coordinator", Some("status")),
        ("coordinator", Some("watch")),
        ("coordinator", Some("list")),
        ("coordinator", Some("kill")),
        ("coordinator", Some("resume")),
        ("worker", None),
        ("worker", Some("tokenize")),
        ("worker", Some("fill-mask")),
        ("worker", Some("train")),
        ("worker", Some("augment")),
        ("worker", Some("augment-report")),
        ("worker", Some("tokenizer-train")),
        ("worker", Some("init-model")),
        ("worker", Some("info")),
        ("worker", Some("classify train")),
        ("worker", Some("classify eval")),
        ("worker", Some("classify predict")),
        ("worker", Some("augment-eval")),
    ];
    let mut missing = Vec::new();
    let mut checked = 0;
    for (bin, sub) in commands {
        for flag in flags_of(bin, *sub) {
            checked += 1;
            if !mentions(reference, &flag) {
                missing.push(format!("{bin} {} --{flag}", sub.unwrap_or("")));
            }
        }
    }
    assert!(checked > 80, "only {checked} flags found: the --help parsing broke");
    assert!(
        missing.is_empty(),
        "README's configuration reference lacks: {missing:#?}"
    );
}

/// The README's `target/release/coordinator --…` command lines (the ones that start a job),
/// continuation lines joined.
fn readme_coordinator_commands() -> Vec<String> {
    let text = readme();
    let mut commands = Vec::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        let line = line.trim();
        let starts = line.starts_with("target/release/coordinator --");
        let Some(mut command) = current.take().or_else(|| starts.then(String::new)) else {
            continue;
        };
        if !command.is_empty() {
            command.push(' ');
        }
        command.push_str(line.trim_end_matches('\\').trim());
        if line.ends_with('\\') {
            current = Some(command);
        } else {
            commands.push(command);
        }
    }
    commands
}

/// A README line made runnable: optional `[…]` parts dropped, placeholders filled in.
fn concrete(command: &str) -> String {
    let mut out = String::new();
    let mut depth = 0;
    for c in command.chars() {
        match c {
            '[' => depth += 1,
            ']' => depth -= 1,
            _ if depth == 0 => out.push(c),
            _ => {}
        }
    }
    out.replace("--config ...", "--config configs/cpu-demo.json")
        .replace("...", "")
        .split_whitespace()
        .map(|w| match w {
            "DIR" => "/models/mine",
            "DATA" => "data/corpus.txt",
            other => other,
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn dry_run(command_line: &str, extra: &[&str]) -> std::process::Output {
    let dir = tempfile::tempdir().unwrap();
    // `coordinator --num_gpus` asks `worker info --json` how many GPUs this host has.
    let probe = dir.path().join("worker");
    std::fs::write(&probe, "#!/bin/sh\necho '{\"cuda_device_count\": 4}'\n").unwrap();
    std::fs::set_permissions(&probe, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let words: Vec<&str> = command_line.split_whitespace().collect();
    assert_eq!(words[0], "target/release/coordinator");
    run(Command::new(binary("coordinator"))
        .current_dir(workspace_root())
        .args(&words[1..])
        .args(extra)
        .args(["--dry-run", "--worker-bin", probe.to_str().unwrap()])
        .env("KORMLM_TOKEN", "readme-test-secret")
        .env("KORMLM_LOG", "error"))
}

fn plan(command_line: &str) -> Value {
    let out = dry_run(command_line, &[]);
    assert!(
        out.status.success(),
        "{command_line}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn ranks(plan: &Value) -> Vec<(String, u64, String)> {
    plan["ranks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["host"].as_str().unwrap().to_string(),
                r["local_rank"].as_u64().unwrap(),
                r["devices"][0].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[test]
fn every_readme_coordinator_command_line_is_a_valid_job() {
    let commands = readme_coordinator_commands();
    assert!(commands.len() >= 7, "{commands:#?}");
    for command in &commands {
        let p = plan(&concrete(command));
        // The size the line asks for, counted from its own words (and the hostfile it names).
        let expected = stated_world_size(&concrete(command));
        assert_eq!(p["job"]["world_size"].as_u64(), Some(expected), "{command}: {p}");
        // Every rank is planned here, or (no spawn flag) awaited from elsewhere.
        let planned = p["ranks"].as_array().map_or(0, Vec::len);
        let awaited = p["external_workers"]
            .as_str()
            .is_some_and(|s| s.starts_with(&format!("start {expected} worker(s): ")));
        assert!(
            planned == expected as usize || (planned == 0 && awaited),
            "{command}: {p}"
        );
    }
}

/// The world size a coordinator command line states: `--num_workers N`, `--num_gpus N`,
/// `--world_size N`, the slots of `--include HOST:S,S…[@HOST…]` (a host without slots has the
/// 4 GPUs `dry_run`'s probe reports), or the slots of the `--hostfile`.
fn stated_world_size(command_line: &str) -> u64 {
    let words: Vec<&str> = command_line.split_whitespace().collect();
    let value = |flag: &str| words.iter().position(|w| *w == flag).map(|i| words[i + 1]);
    for flag in ["--num_workers", "--num_gpus", "--world_size"] {
        if let Some(n) = value(flag) {
            return n.parse().unwrap_or_else(|_| panic!("{flag} {n}"));
        }
    }
    if let Some(spec) = value("--include") {
        return spec
            .split('@')
            .map(|host| {
                host.split_once(':')
                    .map_or(4, |(_, slots)| slots.split(',').count() as u64)
            })
            .sum();
    }
    if let Some(hostfile) = value("--hostfile") {
        let text = std::fs::read_to_string(workspace_root().join(hostfile)).unwrap();
        return text
            .lines()
            .filter_map(|l| l.split('#').next()?.split_whitespace().nth(1)?.strip_prefix("slots="))
            .map(|n| n.parse::<u64>().unwrap())
            .sum();
    }
    panic!("{command_line}: no flag states the world size");
}

#[test]
fn the_readme_gpu_and_multi_host_command_lines_plan_as_documented() {
    let commands: Vec<String> = readme_coordinator_commands()
        .into_iter()
        .filter(|c| c.starts_with("target/release/coordinator --config configs/ds_config.json") && !c.contains("..."))
        .collect();
    assert_eq!(
        commands.len(),
        2,
        "the original-project and hostfile lines: {commands:#?}"
    );

    // The original project: KcELECTRA-base v2021, its hyper-parameters, 4 GPUs.
    let original = commands.iter().find(|c| c.contains("--num_gpus 4")).unwrap();
    let p = plan(original);
    let job = &p["job"];
    assert_eq!(job["world_size"], 4);
    assert_eq!(job["device"], "CUDA");
    assert_eq!(
        job["batch"],
        serde_json::json!({"train_batch_size": 128, "train_micro_batch_size_per_gpu": 32, "gradient_accumulation_steps": 1})
    );
    assert_eq!(job["config"]["zero"]["stage"], 2);
    assert_eq!(job["config"]["fp16"]["enabled"], "auto");
    let args = &job["args"];
    assert_eq!(args["model_name_or_path"], "beomi/KcELECTRA-base");
    assert_eq!(args["revision"], "686333e");
    assert_eq!(args["data_path"], "data/corpora");
    for (key, value) in [
        ("max_seq_len", "100"),
        ("num_train_epochs", "30"),
        ("max_stop_number", "5"),
    ] {
        assert_eq!(args[key], value, "{key}");
    }
    let expected: Vec<(String, u64, String)> = (0..4)
        .map(|i| ("localhost".to_string(), i, format!("cuda:{i}")))
        .collect();
    assert_eq!(ranks(&p), expected);
    assert!(p["ranks"].as_array().unwrap().iter().all(|r| r["started_here"] == true));

    // The same line on 2 GPUs breaks DeepSpeed's batch rule, and says so before starting.
    let out = dry_run(&original.replace("--num_gpus 4", "--num_gpus 2"), &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("128 != 32 * 1 * 2"), "{err}");

    // Two hosts from the example hostfile: the commands for the other hosts carry a URL they
    // can reach (this host's name, not 0.0.0.0).
    let hosts = commands.iter().find(|c| c.contains("--hostfile")).unwrap();
    let p = plan(hosts);
    assert_eq!(p["job"]["world_size"], 4);
    assert_eq!(
        ranks(&p),
        [
            ("node1".to_string(), 0, "cuda:0".to_string()),
            ("node1".to_string(), 1, "cuda:1".to_string()),
            ("node2".to_string(), 0, "cuda:0".to_string()),
            ("node2".to_string(), 1, "cuda:1".to_string()),
        ]
    );
    let url = p["coordinator_url"].as_str().unwrap();
    assert!(
        url.starts_with("http://") && url.ends_with(":50051") && !url.contains("0.0.0.0"),
        "{url}"
    );
    assert_eq!(
        p["ranks"][2]["command"],
        format!("CUDA_VISIBLE_DEVICES=0,1 worker --rank 2 --local_rank 0 --coordinator {url}")
    );

    // Without TLS, a coordinator listening beyond loopback warns that the token travels in
    // clear text (it always has a token: a generated one when none is given).
    let out = run(Command::new(binary("coordinator"))
        .current_dir(workspace_root())
        .args(hosts.split_whitespace().skip(1))
        .arg("--dry-run")
        .env_remove("KORMLM_TOKEN"));
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("travel in clear text"));
}
