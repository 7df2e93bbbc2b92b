//! Faults seen from the worker process, with real processes, signals and sockets: SIGTERM
//! (preemption) stops a job at a checkpoint of the step it reached, during start-up too, and an
//! augmentation between chunks; a second signal exits at once; a peer that dies between the rendezvous and the communicator
//! set-up fails its partner within the collective timeout; an abort during set-up ends the
//! worker at once; a worker frozen past the worker timeout drops its stale work and joins the
//! restarted attempt.

use kormlm_e2e::*;
use kormlm_proto::v1::{RegisterRequest, RendezvousRequest};
use kormlm_proto::PROTOCOL_VERSION;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The flags of a training job on the tiny model over a Korean HateSpeech file (`dev.tsv`: 29
/// steps an epoch; `train.tsv`: about 490), its ranks placed by `placement`.
fn train_args(dir: &Path, out: &Path, data: &str, placement: &[&str], extra: &[&str]) -> Vec<String> {
    let data = shared_data().join("korean-hate-speech/labeled").join(data);
    let mut args: Vec<String> = ["--config", zero2_config(dir).to_str().unwrap(), "--device", "cpu"]
        .iter()
        .chain(placement)
        .chain(&[
            "--model_name_or_path",
            tiny_model().to_str().unwrap(),
            "--data_path",
            data.to_str().unwrap(),
            "--output_dir",
            out.to_str().unwrap(),
            "--max_seq_len",
            "32",
            "--logging_steps",
            "1",
            "--seed",
            "11",
        ])
        .map(|s| s.to_string())
        .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

fn start(state: &Path, args: &[String]) -> CoordinatorProc {
    std::fs::create_dir_all(state).unwrap();
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    CoordinatorProc::start(state, &refs)
}

fn worker(status: &Value, rank: u64) -> &Value {
    status["workers"]
        .as_array()
        .and_then(|ws| ws.iter().find(|w| w["rank"].as_u64() == Some(rank)))
        .unwrap_or_else(|| panic!("no rank {rank} in {status}"))
}

fn is_terminal(status: &Value) -> bool {
    ["SUCCEEDED", "FAILED", "KILLED"].contains(&status["state"].as_str().unwrap_or(""))
}

/// How the coordinator's launcher saw rank `rank`'s process end (`exit status: 143`,
/// `signal: 9 (SIGKILL)`), from its log line `worker process exited rank=R pid=P status=…`.
fn launcher_exit(log: &str, rank: u32) -> Option<String> {
    log.lines()
        .filter(|l| l.contains("worker process exited") && l.contains(&format!("rank={rank} ")))
        .find_map(|l| l.split("status=").nth(1).map(|s| s.trim().to_string()))
}

/// The step and the checkpoint directory of a `preempted: SIGNAL; checkpoint at step N (PATH)`
/// failure.
fn stop_checkpoint(reason: &str, signal: &str) -> (u64, PathBuf) {
    let prefix = format!("preempted: {signal}; checkpoint at step ");
    let rest = reason
        .strip_prefix(&prefix)
        .unwrap_or_else(|| panic!("{reason:?} does not start with {prefix:?}"));
    let (step, path) = rest.split_once(" (").expect("the step, then the path in parentheses");
    (
        step.parse().unwrap(),
        PathBuf::from(path.strip_suffix(')').expect("a closing parenthesis")),
    )
}

/// Optimizer steps a checkpoint says were taken, from its trainer state.
fn checkpoint_steps(dir: &Path) -> u64 {
    let text = std::fs::read_to_string(dir.join("trainer_state.json"))
        .unwrap_or_else(|e| panic!("{}: {e}", dir.join("trainer_state.json").display()));
    let state: Value = serde_json::from_str(&text).unwrap();
    state["steps"].as_u64().unwrap() + state["skipped_steps"].as_u64().unwrap()
}

#[test]
fn a_sigterm_to_a_worker_stops_the_job_at_a_checkpoint_of_the_step_it_reached() {
    let dir = tempfile::tempdir().unwrap();
    let (state, out) = (dir.path().join("state"), dir.path().join("out"));
    let args = train_args(
        dir.path(),
        &out,
        "train.tsv",
        &["--num_workers", "2"],
        &["--num_train_epochs", "100"],
    );
    let c = start(&state, &args);
    let status = wait_for("training progress", Duration::from_secs(180), || {
        let s = c.status(Some("job-1"));
        (s["global_step"].as_u64().unwrap_or(0) >= 3).then_some(s)
    });
    let reached = status["global_step"].as_u64().unwrap();
    let pids: Vec<u32> = (0..2)
        .map(|r| worker(&status, r)["pid"].as_u64().unwrap() as u32)
        .collect();
    kill(Pid::from_raw(pids[1] as i32), Signal::SIGTERM).unwrap();

    let exit = wait_for("rank 1 to exit", Duration::from_secs(120), || {
        launcher_exit(&c.log(), 1)
    });
    assert_eq!(exit, "exit status: 143", "{}", c.log());
    let status = wait_for("the job to end", Duration::from_secs(60), || {
        let s = c.status(Some("job-1"));
        is_terminal(&s).then_some(s)
    });
    // Without automatic restarts a preemption leaves the job KILLED (resumable), naming it.
    assert_eq!(status["state"], "KILLED", "{status}");
    assert!(
        status["message"].as_str().unwrap_or("").contains("preempted"),
        "{status}"
    );
    let rank1 = worker(&status, 1);
    assert_eq!(rank1["failure_kind"], "PREEMPTED", "{status}");
    let (step, checkpoint) = stop_checkpoint(rank1["reason"].as_str().unwrap(), "SIGTERM");
    eprintln!(
        "SIGTERM at step {reached}: stopped at step {step}, {}",
        checkpoint.display()
    );

    // The stop came mid-epoch (no evaluation yet), after the step reached when it was sent.
    assert!(step >= reached, "stopped at {step}, before the step {reached} reached");
    assert!(
        logged_records(&out, "eval").is_empty(),
        "an epoch ended before the stop"
    );
    // The checkpoint is complete and holds exactly `step` steps; both ranks stopped there: the
    // last logged step is `step`, and the final weights are the checkpoint's.
    assert_eq!(checkpoint, out.join("checkpoints").join(format!("step-{step}")));
    assert_eq!(checkpoint_steps(&checkpoint), step);
    let last = logged_records(&out, "train").last().cloned().unwrap();
    assert_eq!(last["step"].as_u64(), Some(step), "{last}");
    let diff = max_weight_diff(
        &checkpoint.join("model/model.safetensors"),
        &out.join("final/model.safetensors"),
    );
    assert_eq!(diff, 0.0, "the final weights are not those of the stop checkpoint");

    // Rank 0 stopped with its peer and ended cleanly, and no worker process is left.
    let exit0 = wait_for("rank 0 to exit", Duration::from_secs(30), || launcher_exit(&c.log(), 0));
    assert_eq!(exit0, "exit status: 0", "rank 0 ended by {exit0}\n{}", c.log());
    for pid in pids {
        assert!(!pid_alive(pid), "worker {pid} is still running");
    }
}

/// Rank 1's part files (`part-NNNNNN.csv`, chunks `first..`) in an augmentation's parts folder.
fn part_chunks(parts: &Path, first: usize) -> Vec<usize> {
    let mut chunks: Vec<usize> = std::fs::read_dir(parts)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            name.strip_prefix("part-")?.strip_suffix(".csv")?.parse().ok()
        })
        .filter(|chunk| *chunk >= first)
        .collect();
    chunks.sort();
    chunks
}

#[test]
fn a_sigterm_stops_an_augmentation_between_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let (state, input, output) = (
        dir.path().join("state"),
        dir.path().join("docs.txt"),
        dir.path().join("augmented.csv"),
    );
    // 12 000 documents: 24 chunks of 512, rank 1 has chunks 12..24.
    let text = std::fs::read_to_string(shared_data().join("nsmc/ratings_train.txt")).unwrap();
    let docs: Vec<&str> = text
        .lines()
        .skip(1)
        .filter_map(|l| l.split('\t').nth(1))
        .take(12_000)
        .collect();
    assert_eq!(docs.len(), 12_000);
    std::fs::write(&input, docs.join("\n") + "\n").unwrap();
    std::fs::create_dir_all(&state).unwrap();
    let c = CoordinatorProc::start(
        &state,
        &[
            "--task",
            "augment",
            "--num_workers",
            "2",
            "--device",
            "cpu",
            "--model_name_or_path",
            tiny_model().to_str().unwrap(),
            "--input",
            input.to_str().unwrap(),
            "--output",
            output.to_str().unwrap(),
            "--seed",
            "5",
            "--max_seq_len",
            "64",
            "--num_augmentations",
            "2",
        ],
    );
    let parts = kormlm_proto::augment_parts::parts_dir(&output);
    wait_for("rank 1's first part", Duration::from_secs(300), || {
        (!part_chunks(&parts, 12).is_empty()).then_some(())
    });
    let status = c.status(Some("job-1"));
    let pid1 = worker(&status, 1)["pid"].as_u64().unwrap() as i32;
    kill(Pid::from_raw(pid1), Signal::SIGTERM).unwrap();
    let exit = wait_for("rank 1 to exit", Duration::from_secs(120), || {
        launcher_exit(&c.log(), 1)
    });
    assert_eq!(exit, "exit status: 143", "{}", c.log());
    let status = wait_for("rank 1's report", Duration::from_secs(30), || {
        let s = c.status(Some("job-1"));
        (worker(&s, 1)["failure_kind"] != "").then_some(s)
    });
    let rank1 = worker(&status, 1);
    assert_eq!(rank1["failure_kind"], "PREEMPTED", "{status}");
    let reason = rank1["reason"].as_str().unwrap();
    let written: usize = reason
        .strip_prefix("preempted: SIGTERM; ")
        .and_then(|r| r.split_once(" of 12 chunk(s) of rank 1 written"))
        .and_then(|(n, _)| n.parse().ok())
        .unwrap_or_else(|| panic!("{reason:?}"));
    eprintln!("SIGTERM to rank 1 of an augmentation: {reason}");
    // It stopped between chunks, early, and its parts on disk are exactly the chunks it reported.
    assert!((1..12).contains(&written), "{reason}");
    assert_eq!(part_chunks(&parts, 12), (12..12 + written).collect::<Vec<_>>());
    assert!(!output.exists(), "a stopped augmentation was merged");
}

#[test]
fn a_stop_signal_during_start_up_stops_right_after_the_first_step() {
    let dir = tempfile::tempdir().unwrap();
    let (state, out) = (dir.path().join("state"), dir.path().join("out"));
    let args = train_args(
        dir.path(),
        &out,
        "dev.tsv",
        &["--world_size", "2"],
        &["--num_train_epochs", "3"],
    );
    let c = start(&state, &args);
    let mut rank0 = rank0_alive(&c);
    // Rank 0 waits in the rendezvous for rank 1; the signal must not leave rank 1 alone there.
    rank0.signal(Signal::SIGINT);
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        rank0.is_running(),
        "rank 0 left its peer alone at the rendezvous\n{}\n{}",
        c.worker_log(0),
        c.log()
    );
    let mut rank1 = c.worker(1);
    let code0 = rank0.wait_exit(Duration::from_secs(120)).code();
    let status1 = rank1.wait_exit(Duration::from_secs(60));
    assert_eq!(code0, Some(130), "{}", c.worker_log(0));
    // Rank 1 stopped at the same step and finished normally.
    assert_eq!(
        status1.code(),
        Some(0),
        "rank 1 ended by {status1}\n{}",
        c.worker_log(1)
    );
    assert!(c.worker_log(0).contains("worker: stopped by SIGINT"));

    let status = c.status(Some("job-1"));
    let rank0 = worker(&status, 0);
    assert_eq!(rank0["failure_kind"], "PREEMPTED", "{status}");
    let (step, checkpoint) = stop_checkpoint(rank0["reason"].as_str().unwrap(), "SIGINT");
    assert_eq!(step, 1, "{status}");
    assert_eq!(checkpoint_steps(&checkpoint), 1);
    let steps: Vec<u64> = logged_records(&out, "train")
        .iter()
        .map(|r| r["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, vec![1]);
    // Rank 0 reported the stop checkpoint with its failure.
    assert_eq!(status["latest_checkpoint"]["global_step"], 1, "{status}");
}

#[test]
fn a_second_stop_signal_exits_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let (state, out) = (dir.path().join("state"), dir.path().join("out"));
    let args = train_args(dir.path(), &out, "dev.tsv", &["--world_size", "2"], &[]);
    let c = start(&state, &args);
    let mut rank0 = rank0_alive(&c);
    rank0.signal(Signal::SIGTERM);
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        rank0.is_running(),
        "one SIGTERM must wait for the work to stop\n{}\n{}",
        c.worker_log(0),
        c.log()
    );
    let sent = Instant::now();
    rank0.signal(Signal::SIGTERM);
    let code = rank0.wait_exit(Duration::from_secs(10)).code();
    assert_eq!(code, Some(143), "{}", c.worker_log(0));
    assert!(sent.elapsed() < Duration::from_secs(3), "took {:?}", sent.elapsed());
}

#[test]
fn a_hangup_leaves_the_worker_and_its_work_running() {
    let dir = tempfile::tempdir().unwrap();
    let (state, out) = (dir.path().join("state"), dir.path().join("out"));
    let args = train_args(dir.path(), &out, "dev.tsv", &["--world_size", "1"], &[]);
    let c = start(&state, &args);
    let mut rank0 = rank0_alive(&c);
    rank0.signal(Signal::SIGHUP);
    let code = rank0.wait_exit(Duration::from_secs(120)).code();
    assert_eq!(code, Some(0), "a hang-up must not end the worker\n{}", c.worker_log(0));
    assert!(c.worker_log(0).contains("SIGHUP ignored"), "{}", c.worker_log(0));
    let status = wait_for("job-1 to succeed", Duration::from_secs(30), || {
        let s = c.status(Some("job-1"));
        assert_ne!(s["state"], "FAILED", "{s}\n{}", c.log());
        (s["state"] == "SUCCEEDED").then_some(s)
    });
    // It trained to its end (here: early stopping), not to a stop the hang-up asked for.
    assert_eq!(status["message"], "all workers finished", "{status}");
    assert!(
        status["early_stopped"] == true || status["global_step"] == status["total_steps"],
        "{status}"
    );
}

/// Rank 0 of `c`'s job-1, started and registered (ALIVE in the status).
fn rank0_alive(c: &CoordinatorProc) -> Proc {
    let rank0 = c.worker(0);
    wait_for("rank 0 to register", Duration::from_secs(60), || {
        (worker_state(&c.status(Some("job-1")), 0).as_deref() == Some("ALIVE")).then_some(())
    });
    rank0
}

/// Registers as rank `rank` and joins the rendezvous announcing `ring_address`, as a worker
/// would; returns once every rank has joined. Never heart-beats.
fn join_rendezvous(c: &CoordinatorProc, rank: u32, ring_address: String) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let mut client = kormlm_e2e::grpc::worker_client(c).await;
        let assignment = client
            .register(RegisterRequest {
                rank,
                local_rank: -1,
                host: "stand-in".into(),
                protocol_version: PROTOCOL_VERSION,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        client
            .rendezvous(RendezvousRequest {
                job_id: assignment.job_id,
                rank,
                attempt: assignment.attempt,
                ring_address,
                ..Default::default()
            })
            .await
            .unwrap();
    });
}

#[test]
fn a_peer_that_dies_after_the_rendezvous_fails_the_set_up_within_the_collective_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let (state, out) = (dir.path().join("state"), dir.path().join("out"));
    // The stand-in rank 1 never heart-beats: a long worker timeout keeps the coordinator from
    // failing the job first, so rank 0 meets the dead peer in its set-up.
    let args = train_args(
        dir.path(),
        &out,
        "dev.tsv",
        &["--world_size", "2", "--worker-timeout-ms", "600000"],
        &[],
    );
    let c = start(&state, &args);
    let mut rank0 = c.worker_with_env(0, &[], &[("KORMLM_COLLECTIVE_TIMEOUT_S", "3")]);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap().to_string();
    join_rendezvous(&c, 1, address);
    // Rank 1 dies right after the rendezvous: nothing listens at its address any more.
    drop(listener);
    let joined = Instant::now();
    let code = rank0.wait_exit(Duration::from_secs(60)).code();
    let took = joined.elapsed();
    eprintln!("rank 0 exited {took:?} after the rendezvous");
    assert_eq!(code, Some(1), "{}", c.worker_log(0));
    assert!(took < Duration::from_secs(3 + 5), "took {took:?}\n{}", c.worker_log(0));
    // Rank 0 may have connected to rank 1's socket before it closed: then it is the accept of
    // rank 1's connection that times out.
    assert!(
        c.worker_log(0)
            .contains("rank timed out after 3 s: a peer is gone or stuck"),
        "{}",
        c.worker_log(0)
    );
    let status = wait_for("rank 0's failure", Duration::from_secs(10), || {
        let s = c.status(Some("job-1"));
        (worker(&s, 0)["failure_kind"] != "").then_some(s)
    });
    assert_eq!(worker(&status, 0)["failure_kind"], "COLLECTIVE_TIMEOUT", "{status}");
}

#[test]
fn an_abort_during_the_set_up_ends_the_worker_without_waiting_for_it() {
    let dir = tempfile::tempdir().unwrap();
    let (state, out) = (dir.path().join("state"), dir.path().join("out"));
    // The stand-in rank 1 freezes after the rendezvous: its socket accepts, it never connects
    // back, and it stops heart-beating, so the coordinator loses it and aborts rank 0 — which
    // is still in a set-up that would wait the whole (long) collective timeout.
    let args = train_args(
        dir.path(),
        &out,
        "dev.tsv",
        &["--world_size", "2", "--worker-timeout-ms", "1500"],
        &[],
    );
    let c = start(&state, &args);
    let mut rank0 = c.worker_with_env(0, &[], &[("KORMLM_COLLECTIVE_TIMEOUT_S", "120")]);
    let frozen = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    join_rendezvous(&c, 1, frozen.local_addr().unwrap().to_string());
    let joined = Instant::now();
    let code = rank0.wait_exit(Duration::from_secs(120)).code();
    let took = joined.elapsed();
    eprintln!("rank 0 exited {took:?} after the rendezvous");
    assert_eq!(code, Some(1), "{}", c.worker_log(0));
    assert!(took < Duration::from_secs(20), "took {took:?}\n{}", c.worker_log(0));
    assert!(
        c.worker_log(0).contains("job aborted by the coordinator"),
        "{}",
        c.worker_log(0)
    );
    let status = c.status(Some("job-1"));
    assert_eq!(status["state"], "FAILED", "{status}");
    assert!(status["message"].as_str().unwrap().contains("rank 1 lost"), "{status}");
    drop(frozen);
}

/// Runs job-1 uninterrupted with two workers it starts itself; returns its output directory.
fn uninterrupted(dir: &Path, extra: &[&str]) -> PathBuf {
    let (state, out) = (dir.join("plain-state"), dir.join("plain-out"));
    let c = start(&state, &train_args(dir, &out, "dev.tsv", &["--world_size", "2"], extra));
    let mut ranks = [c.worker(0), c.worker(1)];
    for (rank, proc) in ranks.iter_mut().enumerate() {
        let status = proc.wait_exit(Duration::from_secs(600));
        assert!(status.success(), "rank {rank}: {status}\n{}", c.worker_log(rank as u32));
    }
    assert_eq!(c.status(Some("job-1"))["state"], "SUCCEEDED");
    out
}

#[test]
fn a_worker_frozen_past_the_timeout_drops_its_stale_work_and_joins_the_restarted_attempt() {
    let dir = tempfile::tempdir().unwrap();
    let (state, out) = (dir.path().join("state"), dir.path().join("out"));
    let extra = [
        "--num_train_epochs",
        "3",
        "--max_steps",
        "70",
        "--checkpoint_steps",
        "5",
    ];
    let mut args = train_args(dir.path(), &out, "dev.tsv", &["--world_size", "2"], &extra);
    args.extend(
        [
            "--max_restarts",
            "2",
            "--worker-timeout-ms",
            "2000",
            "--heartbeat-ms",
            "200",
        ]
        .iter()
        .map(|s| s.to_string()),
    );
    let c = start(&state, &args);
    let mut rank0 = c.worker(0);
    let mut rank1 = c.worker(1);
    wait_for("a checkpoint and a few more steps", Duration::from_secs(300), || {
        let s = c.status(Some("job-1"));
        let checkpointed = s["latest_checkpoint"]["global_step"].as_u64().unwrap_or(0) >= 5;
        (checkpointed && s["global_step"].as_u64().unwrap_or(0) >= 8).then_some(())
    });
    rank1.signal(Signal::SIGSTOP);
    let frozen = Instant::now();
    // The coordinator loses rank 1, fails the attempt and restarts the job; rank 0 is aborted.
    let code0 = rank0.wait_exit(Duration::from_secs(60)).code();
    assert_eq!(code0, Some(1), "{}", c.worker_log(0));
    let status = wait_for("the restart", Duration::from_secs(30), || {
        let s = c.status(Some("job-1"));
        (s["restarts"].as_u64() == Some(1)).then_some(s)
    });
    assert_eq!(status["state"], "PENDING", "{status}");
    std::thread::sleep(Duration::from_secs(5).saturating_sub(frozen.elapsed()));
    rank1.signal(Signal::SIGCONT);
    // Rank 1 comes back holding attempt 1's work; a fresh rank 0 joins attempt 2.
    let mut fresh0 = c.worker_with(0, &[]);
    let status = wait_for("the job to end", Duration::from_secs(600), || {
        let s = c.status(Some("job-1"));
        is_terminal(&s).then_some(s)
    });
    assert_eq!(status["state"], "SUCCEEDED", "{status}\n{}", c.log());
    assert_eq!(status["restarts"], 1, "{status}");
    assert_eq!(
        worker(&status, 1)["pid"].as_u64(),
        Some(u64::from(rank1.pid())),
        "rank 1 of attempt 2 is the process that was frozen: {status}"
    );
    let log1 = c.worker_log(1);
    for line in log1.lines().filter(|l| {
        ["registered", "stale", "registering again", "released work"]
            .iter()
            .any(|k| l.contains(k))
    }) {
        eprintln!("rank 1: {line}");
    }
    assert!(log1.contains("dropping the stale work"), "{log1}");
    for (rank, proc) in [(0, &mut fresh0), (1, &mut rank1)] {
        let exit = proc.wait_exit(Duration::from_secs(30));
        assert!(exit.success(), "rank {rank}: {exit}\n{}", c.worker_log(rank));
    }

    let plain = uninterrupted(dir.path(), &extra);
    let diff = max_weight_diff(
        &plain.join("final/model.safetensors"),
        &out.join("final/model.safetensors"),
    );
    eprintln!("frozen, restarted and rejoined vs uninterrupted: max abs weight diff {diff:e}");
    assert!(diff <= 1e-5, "the restarted run differs by {diff}");
}
