//! Processes and the CPU ring against a hostile neighbour (issue #14, points 3–5), with real
//! processes, signals and sockets: `kill --force` signals only processes the coordinator
//! started — a stranger registering with another process's pid, or pid 1, is ordered to
//! terminate and reported, never signalled — and a frozen worker the coordinator started is
//! killed; the rendezvous takes only registered ranks of the current attempt; stray connections
//! to the ring ports during set-up and training leave a job's result unchanged.

use kormlm_e2e::grpc::{job_client, worker_client, Heartbeat};
use kormlm_e2e::*;
use kormlm_proto::train_args::TrainArgs;
use kormlm_proto::v1::{Assignment, CommandKind, KillJobRequest, RegisterRequest, RendezvousRequest, WorkerReport};
use kormlm_proto::PROTOCOL_VERSION;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

fn ds_config(dir: &Path) -> PathBuf {
    let path = dir.join("ds.json");
    std::fs::write(
        &path,
        r#"{"train_batch_size": 16, "gradient_clipping": 1.0,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "betas": [0.9, 0.99], "eps": 1e-6, "weight_decay": 0.01}},
            "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0, "warmup_max_lr": 1e-3, "warmup_num_steps": 8, "warmup_type": "linear"}},
            "zero_optimization": {"stage": 2}}"#,
    )
    .unwrap();
    path
}

/// A coordinator on `DIR/TAG-state` waiting for 2 workers of a training job on the tiny model
/// over Korean HateSpeech dev.tsv, `extra` appended.
fn coordinator(dir: &Path, tag: &str, extra: &[&str]) -> (CoordinatorProc, PathBuf) {
    let (state, out) = (dir.join(format!("{tag}-state")), dir.join(format!("{tag}-out")));
    std::fs::create_dir_all(&state).unwrap();
    let mut flags = TrainArgs {
        logging_steps: 1,
        seed: 11,
        ..tiny_training(&shared_data().join("korean-hate-speech/labeled/dev.tsv"), &out)
    }
    .to_argv();
    flags.extend(extra.iter().map(|s| s.to_string()));
    let config = text(&ds_config(dir));
    let mut args = vec!["--config", config.as_str(), "--device", "cpu", "--world_size", "2"];
    args.extend(flags.iter().map(String::as_str));
    (CoordinatorProc::start(&state, &args), out)
}

fn register(rank: u32, pid: u32) -> RegisterRequest {
    RegisterRequest {
        rank,
        local_rank: -1,
        // A local host: the old `kill --force` signalled every local pid a worker reported.
        host: "localhost".into(),
        pid,
        protocol_version: PROTOCOL_VERSION,
        ..Default::default()
    }
}

fn heartbeat_of(a: &Assignment) -> WorkerReport {
    WorkerReport {
        job_id: a.job_id.clone(),
        rank: a.rank,
        incarnation: a.incarnation,
        attempt: a.attempt,
        ..Default::default()
    }
}

fn worker_of(status: &Value, rank: u64) -> &Value {
    status["workers"]
        .as_array()
        .and_then(|ws| ws.iter().find(|w| w["rank"].as_u64() == Some(rank)))
        .unwrap_or_else(|| panic!("no rank {rank} in {status}"))
}

const REPORTED: &str = "still running 10 s after kill --force told it to terminate; the coordinator signals only workers it started itself";

#[test]
fn kill_force_never_signals_a_pid_a_worker_reported_and_the_rendezvous_takes_only_registered_ranks() {
    let dir = tempfile::tempdir().unwrap();
    let (c, _) = coordinator(dir.path(), "strangers", &[]);
    // An unrelated process, leading its own process group as a worker would.
    let mut victim = std::process::Command::new("sleep")
        .arg("600")
        .process_group(0)
        .spawn()
        .unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let mut client = runtime.block_on(worker_client(&c));

    // Point 5: a rank that never registered cannot join the rendezvous (or learn its secret).
    let rendezvous = |rank: u32, attempt: u32| RendezvousRequest {
        job_id: "job-1".into(),
        rank,
        attempt,
        ring_address: "127.0.0.1:9".into(),
        ..Default::default()
    };
    let refused = runtime.block_on(client.rendezvous(rendezvous(1, 1))).unwrap_err();
    assert_eq!(
        (refused.code(), refused.message()),
        (
            tonic::Code::FailedPrecondition,
            "rank 1 is not registered for attempt 1 of job job-1; register first"
        )
    );

    // Two strangers take the ranks, one with the victim's pid and one with pid 1, and keep
    // heart-beating whatever they are told.
    let a0 = runtime
        .block_on(client.register(register(0, victim.id())))
        .unwrap()
        .into_inner();
    let a1 = runtime.block_on(client.register(register(1, 1))).unwrap().into_inner();
    let strangers = [
        runtime.block_on(Heartbeat::start(&mut client, heartbeat_of(&a0))),
        runtime.block_on(Heartbeat::start(&mut client, heartbeat_of(&a1))),
    ];
    // A registered rank of an attempt that is not the current one is refused too.
    let stale = runtime.block_on(client.rendezvous(rendezvous(0, 2))).unwrap_err();
    assert_eq!(stale.code(), tonic::Code::FailedPrecondition, "{stale:?}");
    assert_eq!(
        stale.message(),
        "rendezvous attempt 2 of job job-1 is over; the job runs attempt 1"
    );
    wait_for("the job to run", Duration::from_secs(30), || {
        (c.status(Some("job-1"))["state"] == "RUNNING").then_some(())
    });

    let mut jobs = runtime.block_on(job_client(&c));
    runtime
        .block_on(jobs.kill_job(KillJobRequest {
            job_id: "job-1".into(),
            force: true,
        }))
        .unwrap();
    wait_for(
        "both strangers to be told to terminate",
        Duration::from_secs(10),
        || {
            strangers
                .iter()
                .all(|s| s.commands().contains(&CommandKind::Terminate))
                .then_some(())
        },
    );
    // They do not obey; after the deadline the coordinator reports them — and signals nobody.
    let status = wait_for("the strangers to be reported", Duration::from_secs(60), || {
        let s = c.status(Some("job-1"));
        (0..2)
            .all(|r| worker_of(&s, r)["reason"].as_str().unwrap_or("").starts_with(REPORTED))
            .then_some(s)
    });
    assert_eq!(status["state"], "KILLED", "{status}");
    assert_eq!(
        worker_of(&status, 0)["reason"].as_str().unwrap(),
        format!("{REPORTED}: stop pid {} on localhost where it was started", victim.id())
    );
    assert!(c.log().contains(REPORTED), "{}", c.log());
    assert!(
        victim.try_wait().unwrap().is_none() && pid_alive(victim.id()),
        "the unrelated process was signalled\n{}",
        c.log()
    );
    assert!(pid_alive(std::process::id()));
    assert!(pid_alive(c.proc.pid()), "the coordinator survives its own kill --force");
    drop(strangers);
    let _ = victim.kill();
    let _ = victim.wait();
}

#[test]
fn kill_force_kills_a_frozen_worker_the_coordinator_started() {
    let dir = tempfile::tempdir().unwrap();
    let c = CoordinatorProc::start_busy(dir.path(), &["--num_workers", "1", "--device", "cpu"]);
    let pid = wait_for("training to start", Duration::from_secs(180), || {
        let s = c.status(Some("job-1"));
        (s["global_step"].as_u64().unwrap_or(0) >= 1).then(|| worker_of(&s, 0)["pid"].as_u64().unwrap() as u32)
    });
    // Frozen, it cannot obey the TERMINATE order: only the coordinator's own signals end it.
    kill(Pid::from_raw(pid as i32), Signal::SIGSTOP).unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let mut jobs = runtime.block_on(job_client(&c));
    runtime
        .block_on(jobs.kill_job(KillJobRequest {
            job_id: "job-1".into(),
            force: true,
        }))
        .unwrap();
    wait_for("the frozen worker to be killed", Duration::from_secs(30), || {
        (!pid_alive(pid)).then_some(())
    });
    let log = wait_for("the launcher to record the exit", Duration::from_secs(10), || {
        let log = c.log();
        log.contains("worker process exited").then_some(log)
    });
    assert!(log.contains("worker did not stop after SIGTERM; sent SIGKILL"), "{log}");
    assert_eq!(c.status(Some("job-1"))["state"], "KILLED");
}

/// The ring address a worker announced, from its log line `ring listening address=HOST:PORT`.
fn ring_address(log: &str) -> Option<String> {
    log.lines()
        .find(|l| l.contains("ring listening"))
        .and_then(|l| l.split("address=").nth(1))
        .map(|a| a.split_whitespace().next().unwrap_or("").to_string())
}

/// A neighbour knocking at the ring ports every 30 ms, in turn with a silent connection it keeps
/// open, garbage (an HTTP request, random bytes), and the ring's greeting followed by a made-up
/// proof (rank `k`'s port is told the caller is rank k−1).
struct Strays {
    targets: Arc<Mutex<Vec<String>>>,
    connected: Arc<AtomicUsize>,
    training: Arc<AtomicBool>,
    /// Connection attempts while the job trained (refused: the ring no longer listens).
    during_training: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Strays {
    fn start() -> Self {
        let mut strays = Self {
            targets: Arc::default(),
            connected: Arc::default(),
            training: Arc::default(),
            during_training: Arc::default(),
            stop: Arc::default(),
            thread: None,
        };
        let (targets, connected, training, during_training, stop) = (
            strays.targets.clone(),
            strays.connected.clone(),
            strays.training.clone(),
            strays.during_training.clone(),
            strays.stop.clone(),
        );
        let thread = std::thread::spawn(move || {
            let mut held = Vec::new();
            let proving = Arc::new(AtomicUsize::new(0));
            let mut turn = 0usize;
            while !stop.load(Ordering::SeqCst) {
                let current = targets.lock().unwrap().clone();
                for (rank, target) in current.iter().enumerate() {
                    if training.load(Ordering::SeqCst) {
                        during_training.fetch_add(1, Ordering::SeqCst);
                    }
                    let Ok(addr) = target.parse() else { continue };
                    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else {
                        continue;
                    };
                    connected.fetch_add(1, Ordering::SeqCst);
                    turn += 1;
                    match turn % 3 {
                        0 if held.len() < 8 => held.push(stream),
                        1 => {
                            let _ = stream.write_all(b"GET / HTTP/1.1\r\nHost: ring\r\n\r\n");
                        }
                        2 if proving.load(Ordering::SeqCst) < 4 => {
                            // On a thread of its own: the port answers only once its rank has
                            // reached the set-up, which may take a while.
                            let from = (rank as u32 + 1) % 2;
                            let proving = proving.clone();
                            proving.fetch_add(1, Ordering::SeqCst);
                            std::thread::spawn(move || {
                                let mut hello = b"KRG1".to_vec();
                                hello.extend_from_slice(&from.to_le_bytes());
                                hello.extend_from_slice(&(rank as u32).to_le_bytes());
                                hello.extend_from_slice(&[7u8; 16]);
                                let _ = stream.set_read_timeout(Some(Duration::from_secs(60)));
                                let mut reply = [0u8; 48];
                                if stream.write_all(&hello).is_ok() && stream.read_exact(&mut reply).is_ok() {
                                    let _ = stream.write_all(&[0xaa; 32]);
                                    let _ = stream.read(&mut [0u8; 1]);
                                }
                                proving.fetch_sub(1, Ordering::SeqCst);
                            });
                        }
                        _ => {
                            let _ = stream.write_all(&[0x5a; 40]);
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(30));
            }
        });
        strays.thread = Some(thread);
        strays
    }

    fn knock_at(&self, address: String) {
        self.targets.lock().unwrap().push(address);
    }
}

impl Drop for Strays {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Trains the 2-rank job to the end (16 steps), with strays at the ring ports when `disturb`;
/// returns the final weights' path, the worker logs, and what the strays did.
fn train(dir: &Path, tag: &str, disturb: bool) -> (PathBuf, String, Option<(usize, usize)>) {
    let (c, out) = coordinator(dir, tag, &["--max_steps", "16"]);
    let strays = disturb.then(Strays::start);
    let mut rank0 = c.worker(0);
    if let Some(strays) = &strays {
        // Rank 0 listens and waits in the rendezvous for rank 1: its ring port is in set-up.
        let address = wait_for("rank 0's ring port", Duration::from_secs(120), || {
            ring_address(&c.worker_log(0))
        });
        strays.knock_at(address);
        wait_for("strays at rank 0's port during set-up", Duration::from_secs(30), || {
            (strays.connected.load(Ordering::SeqCst) >= 6).then_some(())
        });
    }
    let mut rank1 = c.worker(1);
    if let Some(strays) = &strays {
        let address = wait_for("rank 1's ring port", Duration::from_secs(120), || {
            ring_address(&c.worker_log(1))
        });
        strays.knock_at(address);
        wait_for("the first step", Duration::from_secs(120), || {
            let s = c.status(Some("job-1"));
            (s["global_step"].as_u64().unwrap_or(0) >= 1 || s["state"] != "RUNNING").then_some(())
        });
        strays.training.store(true, Ordering::SeqCst);
    }
    let status = wait_for("the job to end", Duration::from_secs(300), || {
        let s = c.status(Some("job-1"));
        ["SUCCEEDED", "FAILED", "KILLED"]
            .contains(&s["state"].as_str().unwrap_or(""))
            .then_some(s)
    });
    let logs = format!("{}\n{}", c.worker_log(0), c.worker_log(1));
    assert_eq!(status["state"], "SUCCEEDED", "{tag}: {status}\n{logs}\n{}", c.log());
    assert_eq!(status["global_step"], 16);
    rank0.wait_exit(Duration::from_secs(60));
    rank1.wait_exit(Duration::from_secs(60));
    let counts = strays.map(|s| {
        let counts = (
            s.connected.load(Ordering::SeqCst),
            s.during_training.load(Ordering::SeqCst),
        );
        drop(s);
        counts
    });
    (out.join("final/model.safetensors"), logs, counts)
}

#[test]
fn stray_connections_to_the_ring_ports_leave_the_job_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let (undisturbed, _, _) = train(dir.path(), "undisturbed", false);
    let (disturbed, logs, counts) = train(dir.path(), "disturbed", true);
    let (connected, during_training) = counts.unwrap();
    eprintln!(
        "strays: {connected} connection(s) accepted by a ring port, {during_training} attempt(s) during training"
    );
    assert!(connected >= 6, "{connected}");
    assert!(during_training >= 1, "no stray knocked during training");
    // Rank 0 dropped garbage and the made-up proof, and said so.
    assert!(logs.contains("dropped a connection to the ring port"), "{logs}");
    assert!(logs.contains("not a kormlm ring peer"), "{logs}");
    assert!(logs.contains("it does not know this attempt's ring secret"), "{logs}");
    // The ring listens on the interface towards the coordinator (loopback here), not 0.0.0.0.
    let address = ring_address(&logs).unwrap();
    assert!(address.starts_with("127.0.0.1:"), "{address}");
    let diff = max_weight_diff(&undisturbed, &disturbed);
    eprintln!("undisturbed vs disturbed: max abs weight diff {diff:e}");
    assert_eq!(diff, 0.0, "the strays changed the weights");
}
