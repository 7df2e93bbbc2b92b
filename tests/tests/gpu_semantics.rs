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

/// A copy of the worker (a hard link where the file system allows) in a directory of its own
/// inside the build directory, so that `$ORIGIN/kormlm-libs` is a directory the test controls.
fn worker_elsewhere() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::Builder::new()
        .prefix("cuda-libs-test")
        .tempdir_in(bin_dir())
        .unwrap();
    let worker = dir.path().join("worker");
    if std::fs::hard_link(binary("worker"), &worker).is_err() {
        std::fs::copy(binary("worker"), &worker).unwrap();
    }
    (dir, worker)
}

fn info(worker: &Path) -> Value {
    let out = run(Command::new(worker)
        .args(["info", "--json"])
        .env_remove("LD_LIBRARY_PATH"));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn cuda_jobs_fail_at_start_saying_where_nccl_was_looked_for() {
    let linked = bin_dir().join("kormlm-libs");
    let real_nccl = std::fs::canonicalize(linked.join("libnccl.so"))
        .expect("scripts/env.sh links kormlm-libs/libnccl.so beside the binaries");
    let real_cudart = std::fs::canonicalize(linked.join("libcudart.so")).unwrap();
    // The built worker binds the files its kormlm-libs links name.
    let built = info(&binary("worker"));
    assert_eq!(built["nccl_path"].as_str(), real_nccl.to_str(), "{built}");
    assert_eq!(built["cudart_path"].as_str(), real_cudart.to_str(), "{built}");
    assert!(built["nccl_version"].as_i64().is_some_and(|v| v >= 22800), "{built}");

    // Without the link: `worker info` says where it looked, and a CUDA job stops before it
    // reads its model or data.
    let (dir, worker) = worker_elsewhere();
    let libs = dir.path().join("kormlm-libs");
    let missing = info(&worker);
    let error = missing["cuda_libraries_error"].as_str().unwrap_or_default().to_string();
    assert!(missing["nccl_version"].is_null(), "{missing}");
    assert!(
        error.contains("libnccl.so cannot be loaded") && error.contains(&libs.display().to_string()),
        "{error}"
    );
    assert!(
        error.contains(&real_nccl.display().to_string()),
        "names what libtorch uses: {error}"
    );
    let config = workspace_root().join("configs/cpu-demo.json");
    let out = run(Command::new(&worker)
        .args(["train", "--device", "cuda:0", "--config"])
        .arg(&config)
        .args(["--model_name_or_path", "/no/such/model", "--data_path", "/no/such/data"])
        .env_remove("LD_LIBRARY_PATH"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("cuda:0") && stderr.contains("libnccl.so cannot be loaded") && !stderr.contains("/no/such"),
        "{stderr}"
    );

    // A libcudart other than libtorch's (as a system toolkit's would be) is refused by name.
    std::fs::create_dir_all(&libs).unwrap();
    std::os::unix::fs::symlink(&real_nccl, libs.join("libnccl.so")).unwrap();
    let other = dir.path().join("libcudart.so.13");
    std::fs::copy(&real_cudart, &other).unwrap();
    std::os::unix::fs::symlink(&other, libs.join("libcudart.so")).unwrap();
    let twice = info(&worker);
    let error = twice["cuda_libraries_error"].as_str().unwrap_or_default().to_string();
    assert!(
        error.contains("2 different libcudart libraries are loaded")
            && error.contains(&other.display().to_string())
            && error.contains(&real_cudart.display().to_string()),
        "{twice}"
    );
    std::fs::remove_file(libs.join("libcudart.so")).unwrap();
    std::os::unix::fs::symlink(&real_cudart, libs.join("libcudart.so")).unwrap();
    let fixed = info(&worker);
    assert!(fixed["cuda_libraries_error"].is_null(), "{fixed}");
    assert_eq!(fixed["nccl_path"].as_str(), real_nccl.to_str(), "{fixed}");
}

/// `scripts/gpu-check.sh --cpu-dry-run`: every command line of the GPU self-check, run against
/// the real binaries on the CPU; only the CUDA-only checks are skipped.
#[test]
fn the_gpu_self_check_runs_its_command_lines_on_the_cpu() {
    let out_dir = tempfile::tempdir().unwrap();
    let mut child = Proc::spawn(
        "gpu-check.sh",
        Command::new("bash")
            .current_dir(workspace_root())
            .args(["scripts/gpu-check.sh", "--cpu-dry-run"])
            .env("OUT", out_dir.path())
            .env("KORMLM_BIN_DIR", bin_dir())
            .stdout(std::process::Stdio::null()),
    );
    let status = child.wait_exit(Duration::from_secs(400));
    let log = std::fs::read_to_string(out_dir.path().join("gpucheck.log")).unwrap_or_default();
    let summary: Value = serde_json::from_str(
        &std::fs::read_to_string(out_dir.path().join("gpu-check.json")).unwrap_or_else(|e| panic!("{e}; log:\n{log}")),
    )
    .unwrap();
    assert!(status.success() && summary["failed"] == 0, "{summary:#}\n{log}");
    let results: Vec<(String, String)> = summary["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["name"].as_str().unwrap().to_string(),
                c["result"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let skipped: Vec<&str> = results
        .iter()
        .filter(|(_, r)| r == "SKIP")
        .map(|(n, _)| n.as_str())
        .collect();
    assert_eq!(
        skipped,
        [
            "worker info sees CUDA, devices and NCCL",
            "kill -9 of rank 1 ends the job in time",
            "speed"
        ],
        "{summary:#}"
    );
    assert_eq!(summary["passed"], 7, "{summary:#}");
}

/// `--tf32 true` (the Hugging Face Trainer's flag) on a device without TF32 is refused before
/// the model or the data are read, naming the flag and what to do instead.
#[test]
fn tf32_on_a_device_without_it_is_refused_naming_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let output = dir.path().join("run");
    let args = tiny_training(Path::new("/no/such/data"), &output);
    let config = workspace_root().join("configs/cpu-demo.json");
    let out = run(Command::new(binary("worker"))
        .args(["train", "--device", "cpu", "--config"])
        .arg(&config)
        .args(args.to_argv())
        .args(["--tf32", "true"]));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("--tf32 true needs a CUDA GPU of compute capability 8.0 or newer")
            && stderr.contains("this run is on cpu")
            && stderr.contains("give --tf32 false"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("/no/such/data"),
        "refused before the data is read: {stderr}"
    );
    assert!(!output.exists(), "nothing written: {}", output.display());
}
