//! DeepSpeed's device semantics without a GPU: the launcher flags and `CUDA_VISIBLE_DEVICES`
//! against `coordinator --dry-run`, and the environment the launcher gives the workers it starts.
//! A stand-in `worker` answers the GPU probe (`worker info --json`: 4 GPUs) and, started as a
//! rank, records what it was given.

use kormlm_e2e::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// A stand-in worker binary in `dir`: `info --json` reports 4 GPUs (only when the probe does not
/// narrow them with `CUDA_VISIBLE_DEVICES`, as the real one would not be), any other command
/// line writes `CUDA_VISIBLE_DEVICES` and its arguments to `dir/rank-K.txt` and exits 1.
fn stand_in_worker(dir: &Path) -> PathBuf {
    let path = dir.join("worker");
    let script = format!(
        "#!/bin/sh\nif [ \"$1\" = info ]; then\n  if [ -n \"${{CUDA_VISIBLE_DEVICES+x}}\" ]; then echo '{{\"cuda_device_count\": 1}}'; \
         else echo '{{\"cuda_device_count\": 4}}'; fi\n  exit 0\nfi\n\
         echo \"CUDA_VISIBLE_DEVICES=${{CUDA_VISIBLE_DEVICES-unset}} $*\" > {dir}/rank-$2.tmp && mv {dir}/rank-$2.tmp {dir}/rank-$2.txt\nexit 1\n",
        dir = dir.display()
    );
    std::fs::write(&path, script).unwrap();
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    path
}

const JOB: &[&str] = &[
    "--config",
    "configs/cpu-demo.json",
    "--model_name_or_path",
    "/models/mine",
    "--data_path",
    "data/corpus.txt",
];

/// `coordinator JOB ARGS --dry-run` with `CUDA_VISIBLE_DEVICES` set to `visible` (or unset).
fn dry_run(args: &[&str], visible: Option<&str>) -> std::process::Output {
    let dir = tempfile::tempdir().unwrap();
    let worker = stand_in_worker(dir.path());
    let mut command = Command::new(binary("coordinator"));
    command
        .current_dir(workspace_root())
        .args(JOB)
        .args(args)
        .args(["--dry-run", "--worker-bin", worker.to_str().unwrap()])
        .env("KORMLM_LOG", "error")
        .env_remove("CUDA_VISIBLE_DEVICES");
    if let Some(v) = visible {
        command.env("CUDA_VISIBLE_DEVICES", v);
    }
    run(&mut command)
}

/// Every rank's (local_rank, device name, local index, physical id, CUDA_VISIBLE_DEVICES).
fn ranks(args: &[&str], visible: Option<&str>) -> Vec<(u64, String, u64, u64, String)> {
    let out = dry_run(args, visible);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let plan: Value = serde_json::from_slice(&out.stdout).unwrap();
    plan["ranks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["local_rank"].as_u64().unwrap(),
                r["devices"][0].as_str().unwrap().to_string(),
                r["local_cuda_devices"][0].as_u64().unwrap(),
                r["physical_cuda_devices"][0].as_u64().unwrap(),
                r["cuda_visible_devices"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn refusal(args: &[&str], visible: Option<&str>) -> String {
    let out = dry_run(args, visible);
    assert!(!out.status.success(), "{args:?} under {visible:?} was accepted");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn slots_are_physical_gpus_and_each_worker_sees_its_hosts_selection() {
    let rank = |local: u64, name: &str, index: u64, gpu: u64, visible: &str| {
        (local, name.to_string(), index, gpu, visible.to_string())
    };
    // No CUDA_VISIBLE_DEVICES: the 4 GPUs of the host; --include picks physical GPUs, which the
    // workers see as cuda:0 and cuda:1 of CUDA_VISIBLE_DEVICES=0,2.
    assert_eq!(
        ranks(&["--include", "localhost:0,2"], None),
        vec![rank(0, "cuda:0", 0, 0, "0,2"), rank(1, "cuda:1 (GPU 2)", 1, 2, "0,2")]
    );
    // CUDA_VISIBLE_DEVICES=2,3 is the pool, as the deepspeed launcher makes it
    // (`--include localhost:2,3`): --num_gpus takes its first GPUs, --include names them.
    let expected = vec![
        rank(0, "cuda:0 (GPU 2)", 0, 2, "2,3"),
        rank(1, "cuda:1 (GPU 3)", 1, 3, "2,3"),
    ];
    assert_eq!(ranks(&["--num_gpus", "2"], Some("2,3")), expected);
    assert_eq!(ranks(&["--include", "localhost:2,3"], Some("2,3")), expected);
    assert_eq!(
        ranks(&["--exclude", "localhost:1"], Some("1,3")),
        vec![rank(0, "cuda:0 (GPU 3)", 0, 3, "3")]
    );
}

#[test]
fn duplicate_slots_and_hidden_gpus_are_refused_before_anything_starts() {
    let err = refusal(&["--include", "localhost:0,0"], None);
    assert!(
        err.contains("--include") && err.contains("lists slot 0 twice") && err.contains("Duplicate GPU detected"),
        "{err}"
    );
    let err = refusal(&["--include", "localhost:0@localhost:1"], None);
    assert!(
        err.contains("--include") && err.contains("names host localhost twice"),
        "{err}"
    );
    let err = refusal(&["--include", "localhost:0"], Some("2,3"));
    assert!(
        err.contains("--include") && err.contains("no slot 0") && err.contains("CUDA_VISIBLE_DEVICES=2,3 limits"),
        "{err}"
    );
    for (visible, expected) in [
        ("7", "names GPU 7, but this host has 4"),
        ("GPU-5e1c", "is not a GPU index"),
        ("1,1", "lists GPU 1 twice"),
    ] {
        let err = refusal(&["--num_gpus", "1"], Some(visible));
        assert!(err.contains("CUDA_VISIBLE_DEVICES") && err.contains(expected), "{err}");
    }
    // With a hostfile, CUDA_VISIBLE_DEVICES of the coordinator's shell plays no part (deepspeed
    // ignores it there too); the other host's command carries its selection.
    let dir = tempfile::tempdir().unwrap();
    let hostfile = dir.path().join("hostfile");
    std::fs::write(&hostfile, "node-a slots=4\nnode-b slots=4\n").unwrap();
    let out = dry_run(
        &["--hostfile", hostfile.to_str().unwrap(), "--include", "node-b:1,3"],
        Some("0"),
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let plan: Value = serde_json::from_slice(&out.stdout).unwrap();
    let command = plan["ranks"][1]["command"].as_str().unwrap();
    assert!(
        command.starts_with("CUDA_VISIBLE_DEVICES=1,3 worker --rank 1 --local_rank 1 --coordinator http://"),
        "{command}"
    );
}

#[test]
fn launched_workers_see_only_their_hosts_gpus() {
    let dir = tempfile::tempdir().unwrap();
    let worker = stand_in_worker(dir.path());
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let config = workspace_root().join("configs/cpu-demo.json");
    let coordinator = CoordinatorProc::start_with_env(
        &state,
        &[
            "--config",
            config.to_str().unwrap(),
            "--model_name_or_path",
            "/models/mine",
            "--data_path",
            "data/corpus.txt",
            "--include",
            "localhost:1,3",
            "--worker-bin",
            worker.to_str().unwrap(),
        ],
        &[("CUDA_VISIBLE_DEVICES", "0,1,3")],
    );
    for rank in 0..2 {
        let path = dir.path().join(format!("rank-{rank}.txt"));
        let seen = wait_for("the stand-in worker to start", Duration::from_secs(60), || {
            std::fs::read_to_string(&path).ok()
        });
        assert_eq!(
            seen.trim(),
            format!(
                "CUDA_VISIBLE_DEVICES=1,3 --rank {rank} --local_rank {rank} --coordinator {}",
                coordinator.url
            )
        );
    }
}
