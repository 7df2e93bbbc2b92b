//! Walking skeleton: a real coordinator and real workers on loopback.

use kormlm_e2e::*;
use kormlm_proto::now_ms;
use nix::sys::signal::Signal;
use std::process::Command;
use std::time::Duration;

#[test]
fn registration_status_loss_and_restart() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let started_ms = now_ms();
    let mut coordinator =
        CoordinatorProc::start_busy(dir.path(), &["--world_size", "2", "--worker-timeout-ms", "2000"]);
    let status = coordinator.status(None);
    assert_eq!(status["state"], "PENDING");
    assert_eq!(status["train_batch_size"], 32, "16 per rank x 2 ranks");

    let w0 = coordinator.worker(0);
    let w1 = coordinator.worker(1);
    let status = wait_for("both workers to register", Duration::from_secs(30), || {
        let s = coordinator.status(None);
        (s["state"] == "RUNNING").then_some(s)
    });
    let pids: Vec<u64> = status["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["pid"].as_u64().unwrap())
        .collect();
    assert_eq!(pids, vec![u64::from(w0.pid()), u64::from(w1.pid())]);
    let seen_ms = now_ms();
    for w in status["workers"].as_array().unwrap() {
        assert_eq!(w["state"], "ALIVE");
        assert_eq!(w["devices"], serde_json::json!(["cpu"]));
        // A heartbeat of this run: between the coordinator's start and the status call.
        let heartbeat = w["last_heartbeat_ms"].as_i64().unwrap();
        assert!(
            (started_ms..=seen_ms).contains(&heartbeat),
            "{heartbeat} not in {started_ms}..={seen_ms}: {w}"
        );
    }

    // A second claim of a held rank, and a rank beyond the world size, are refused.
    let mut dup = coordinator.worker_with(1, &["--reconnect-timeout-s", "5"]);
    assert!(!dup.wait_exit(Duration::from_secs(30)).success());
    let log = std::fs::read_to_string(state.with_extension("worker-1.log")).unwrap();
    assert!(log.contains("rank 1 of job job-1 is already held by pid"), "{log}");
    let out = run(Command::new(binary("worker"))
        .args(["--rank", "2", "--coordinator", &coordinator.url])
        .env("KORMLM_TOKEN", &coordinator.token));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("rank 2 is out of range: job job-1 has world size 2"),
        "{err}"
    );

    // Heartbeats keep flowing.
    let before = status["workers"][0]["last_heartbeat_ms"].as_i64().unwrap();
    wait_for("a newer heartbeat", Duration::from_secs(10), || {
        (coordinator.status(None)["workers"][0]["last_heartbeat_ms"]
            .as_i64()
            .unwrap()
            > before)
            .then_some(())
    });

    // A worker killed outright is reported lost within a few seconds, and the job fails.
    let killed_at = std::time::Instant::now();
    w1.signal(Signal::SIGKILL);
    let status = wait_for("rank 1 to be LOST", Duration::from_secs(6), || {
        let s = coordinator.status(None);
        (worker_state(&s, 1).as_deref() == Some("LOST")).then_some(s)
    });
    assert!(killed_at.elapsed() < Duration::from_secs(6));
    assert_eq!(status["state"], "FAILED");
    assert!(status["message"].as_str().unwrap().contains("rank 1 lost"), "{status}");
    drop(w0);

    // Restart on the same state directory: the job and its workers are still there.
    coordinator.proc.signal(Signal::SIGTERM);
    assert!(coordinator.proc.wait_exit(Duration::from_secs(20)).success());
    let restarted = CoordinatorProc::start(&state, &[]);
    let status = restarted.status(Some("job-1"));
    assert_eq!(status["state"], "FAILED");
    assert_eq!(status["workers"].as_array().unwrap().len(), 2);
    assert_eq!(worker_state(&status, 1).as_deref(), Some("LOST"));
    assert_eq!(status["workers"][1]["pid"].as_u64(), Some(pids[1]));
}

#[test]
fn deepspeed_batch_rule_and_bad_json_stop_the_coordinator() {
    let dir = tempfile::tempdir().unwrap();
    // The original ds_config.json only validates with 4 ranks (128 = 32 x 1 x 4).
    let out = run(Command::new(binary("coordinator")).args([
        "--config",
        config("ds_config.json").to_str().unwrap(),
        "--world_size",
        "2",
        "--state-dir",
        dir.path().join("a").to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
    ]));
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("128 != 32 * 1 * 2"), "{err}");

    let bad = dir.path().join("bad.json");
    std::fs::write(
        &bad,
        "{\n  \"train_batch_size\": 8,\n  \"fp16\": {\"enabled\": tru}\n}\n",
    )
    .unwrap();
    let out = run(Command::new(binary("coordinator")).args([
        "--config",
        bad.to_str().unwrap(),
        "--world_size",
        "1",
        "--state-dir",
        dir.path().join("b").to_str().unwrap(),
    ]));
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.json: malformed JSON at line 3, column"), "{err}");

    // With four ranks the original config is accepted.
    let state = dir.path().join("c");
    std::fs::create_dir_all(&state).unwrap();
    let c = CoordinatorProc::start(
        &state,
        &[
            "--config",
            config("ds_config.json").to_str().unwrap(),
            "--world_size",
            "4",
        ],
    );
    let status = c.status(None);
    assert_eq!(
        (
            status["train_batch_size"].as_u64(),
            status["train_micro_batch_size_per_gpu"].as_u64()
        ),
        (Some(128), Some(32))
    );
}

#[test]
fn spawned_cpu_workers_register_and_stop_with_the_coordinator() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let mut c = CoordinatorProc::start_busy(dir.path(), &["--num_workers", "2", "--device", "cpu"]);
    let status = wait_for("spawned workers to register", Duration::from_secs(30), || {
        let s = c.status(None);
        (s["state"] == "RUNNING").then_some(s)
    });
    let pids: Vec<u32> = status["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["pid"].as_u64().unwrap() as u32)
        .collect();
    assert!(pids.iter().all(|p| pid_alive(*p)));
    // Started by this coordinator, not found elsewhere: they are its children.
    for pid in &pids {
        assert_eq!(parent_pid(*pid), Some(c.proc.pid()), "worker pid {pid}");
    }
    assert!(state.join("logs/job-1/attempt-1/rank-0.log").is_file());

    // A graceful kill stops the workers; the job ends KILLED.
    let out = c.client(&["kill", "--job", "job-1", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let status = wait_for("the job to be KILLED", Duration::from_secs(20), || {
        let s = c.status(Some("job-1"));
        (s["state"] == "KILLED").then_some(s)
    });
    assert!(
        status["workers"]
            .as_array()
            .unwrap()
            .iter()
            .all(|w| w["state"] == "EXITED"),
        "{status}"
    );
    wait_for("worker processes to exit", Duration::from_secs(20), || {
        pids.iter().all(|p| !pid_alive(*p)).then_some(())
    });

    c.proc.signal(Signal::SIGTERM);
    assert!(c.proc.wait_exit(Duration::from_secs(20)).success());
}

#[test]
fn generic_grpc_clients_see_health_reflection_and_status() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let c = CoordinatorProc::start(
        &state,
        &[
            "--config",
            config("cpu-demo.json").to_str().unwrap(),
            "--world_size",
            "1",
        ],
    );
    let out = run(Command::new(oracle_python())
        .arg(workspace_root().join("tests/python/grpc_client.py"))
        .arg(&c.url)
        .arg(workspace_root().join("proto"))
        .arg(dir.path().join("gen"))
        .arg(&state));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "python client failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("health SERVING"), "{stdout}");
    assert!(stdout.contains("reflection kormlm.v1.JobService"), "{stdout}");
    assert!(stdout.contains("without token: UNAUTHENTICATED"), "{stdout}");
    assert!(stdout.contains("status job-1 PENDING"), "{stdout}");
    assert!(stdout.contains("watch job-1 PENDING 0"), "{stdout}");
}

#[test]
fn a_token_guards_workers_and_calls() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let cpu_demo = config("cpu-demo.json");
    let c = CoordinatorProc::start(
        &state,
        &[
            "--config",
            cpu_demo.to_str().unwrap(),
            "--world_size",
            "1",
            "--token",
            "s3cret",
        ],
    );
    let status = |extra: &[&str]| {
        run(Command::new(binary("coordinator"))
            .args(["status", "--addr", &c.url])
            .args(extra))
    };
    let denied = status(&[]);
    assert!(!denied.status.success());
    assert!(String::from_utf8_lossy(&denied.stderr).contains("requires a token"));
    assert!(status(&["--token", "s3cret"]).status.success());
    let out = run(Command::new(binary("worker"))
        .args(["--rank", "0", "--coordinator", &c.url])
        .env_remove("KORMLM_TOKEN"));
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("requires a token"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let kill = run(Command::new(binary("coordinator")).args(["kill", "--job", "job-1", "--addr", &c.url]));
    assert!(!kill.status.success());
    let err = String::from_utf8_lossy(&kill.stderr);
    assert!(
        err.contains("requires a token"),
        "refused for the token, not otherwise: {err}"
    );
    let after = status(&["--token", "s3cret", "--json"]);
    let after: serde_json::Value = serde_json::from_slice(&after.stdout).unwrap();
    assert_eq!(after["state"], "PENDING", "the job is untouched: {after}");
}
