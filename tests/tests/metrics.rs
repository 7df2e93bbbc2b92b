//! `coordinator --metrics-listen`: a real coordinator with two CPU workers trains the tiny model
//! while the test scrapes `/metrics` over a real socket and parses it with Prometheus' own Python
//! parser (`prometheus_client.parser`): during the job (step between two `status --json`
//! readings, workers ALIVE, fresh heartbeats), after a rank is SIGKILLed (the automatic restart
//! and the PEER_LOST failure counted) and after the job (every value equal to `status --json`).
//! The bearer token of `--metrics-token-file` is required (401 without or with a wrong one);
//! other paths are 404, other methods 405. Without a token, on a non-loopback address, the
//! endpoint is open and the coordinator warns.

use kormlm_e2e::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// An HTTP response: status code, headers (lower-case names), body.
struct Reply {
    code: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

/// One HTTP/1.1 request over a new TCP connection (`Connection: close`), with deadlines.
fn http(addr: &str, method: &str, path: &str, token: Option<&str>) -> Reply {
    let mut stream = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    stream.set_write_timeout(Some(Duration::from_secs(30))).unwrap();
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    stream.read_to_string(&mut raw).expect("a complete response");
    let (head, body) = raw.split_once("\r\n\r\n").expect("a response head");
    let mut lines = head.lines();
    let code = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok());
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Reply {
        code: code.unwrap_or_else(|| panic!("no status line in {head:?}")),
        headers,
        body: body.to_string(),
    }
}

/// The samples of an exposition as Prometheus' Python parser reads it: (sample name, labels) →
/// value; the parse fails the test if the text is not valid exposition format.
struct Scrape {
    families: Value,
    at_ms: i64,
}

impl Scrape {
    fn parse(text: &str, at_ms: i64) -> Self {
        let out = run_with_input(
            std::process::Command::new(oracle_python()).arg(workspace_root().join("tests/python/prometheus_text.py")),
            text.as_bytes(),
        );
        assert!(
            out.status.success(),
            "prometheus_client's parser rejected the exposition: {}\n{text}",
            String::from_utf8_lossy(&out.stderr)
        );
        let parsed: Value = serde_json::from_slice(&out.stdout).unwrap();
        Self {
            families: parsed["families"].clone(),
            at_ms,
        }
    }

    fn family(&self, name: &str) -> &Value {
        &self.families[name]
    }

    /// The value of sample `name` whose labels include `labels`; `None` when there is none.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let family = name.strip_suffix("_total").unwrap_or(name);
        let samples = self.families[family]["samples"].as_array()?;
        let matching: Vec<f64> = samples
            .iter()
            .filter(|s| s["name"] == name && labels.iter().all(|(k, v)| s["labels"][*k] == *v))
            .map(|s| s["value"].as_f64().unwrap_or_else(|| panic!("{name}: {s}")))
            .collect();
        assert!(matching.len() <= 1, "{name}{labels:?} matches {matching:?}");
        matching.first().copied()
    }

    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels)
            .unwrap_or_else(|| panic!("no {name}{labels:?} in {}", self.families))
    }
}

/// `GET /metrics` with the token, parsed.
fn scrape(addr: &str, token: Option<&str>) -> Scrape {
    let reply = http(addr, "GET", "/metrics", token);
    assert_eq!(reply.code, 200, "{}", reply.body);
    assert_eq!(
        reply.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    Scrape::parse(&reply.body, now_ms())
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// `HOST:PORT` of `STATE_DIR/metrics.addr` (`http://HOST:PORT/metrics`).
fn metrics_addr(state: &Path) -> String {
    let url = wait_for("metrics.addr", Duration::from_secs(20), || {
        std::fs::read_to_string(state.join("metrics.addr")).ok()
    });
    let url = url.trim();
    url.strip_prefix("http://")
        .and_then(|rest| rest.strip_suffix("/metrics"))
        .unwrap_or_else(|| panic!("unexpected metrics.addr {url:?}"))
        .to_string()
}

fn job_states() -> [&'static str; 6] {
    ["PENDING", "RUNNING", "STOPPING", "KILLED", "FAILED", "SUCCEEDED"]
}

/// A number of `status --json`, or `None` where status shows null.
fn number(status: &Value, key: &str) -> Option<f64> {
    status[key].as_f64()
}

/// Every per-job value equals `status --json`'s (the job must not have moved in between).
fn assert_job_matches(scrape: &Scrape, status: &Value) {
    let job = status["job_id"].as_str().unwrap();
    let l = [("job", job)];
    for (metric, key) in [
        ("kormlm_job_epoch", "epoch"),
        ("kormlm_job_global_step", "global_step"),
        ("kormlm_job_total_steps", "total_steps"),
        ("kormlm_job_train_loss", "train_loss"),
        ("kormlm_job_val_loss", "val_loss"),
        ("kormlm_job_best_val_loss", "best_val_loss"),
        ("kormlm_job_early_stop_count", "stop_count"),
        ("kormlm_job_max_stop_number", "max_stop_number"),
        ("kormlm_job_learning_rate", "learning_rate"),
        ("kormlm_job_samples_per_second", "samples_per_s"),
        ("kormlm_job_tokens_per_second", "tokens_per_s"),
        ("kormlm_job_mfu_ratio", "mfu"),
        ("kormlm_job_world_size", "world_size"),
        ("kormlm_job_restarts_total", "restarts"),
        ("kormlm_job_automatic_restarts_total", "automatic_restarts"),
        ("kormlm_job_shrinks_total", "shrinks"),
    ] {
        assert_eq!(
            scrape.get(metric, &l),
            number(status, key),
            "{metric} vs status {key}: {status}"
        );
    }
    let state = status["state"].as_str().unwrap();
    for s in job_states() {
        let expected = f64::from(u8::from(s == state));
        assert_eq!(
            scrape.value("kormlm_job_state", &[("job", job), ("state", s)]),
            expected,
            "{s}"
        );
    }
    for w in status["workers"].as_array().unwrap() {
        let rank = w["rank"].to_string();
        let r = [("job", job), ("rank", rank.as_str())];
        let worker_state = w["state"].as_str().unwrap();
        for s in ["ALIVE", "LOST", "EXITED", "FAILED"] {
            let labels = [r[0], r[1], ("state", s)];
            assert_eq!(
                scrape.value("kormlm_worker_state", &labels),
                f64::from(u8::from(s == worker_state)),
                "rank {rank} {s}: {w}"
            );
        }
        assert_eq!(
            scrape.value("kormlm_worker_optimizer_state_bytes", &r),
            w["optimizer_state_bytes"].as_f64().unwrap(),
            "{w}"
        );
        let heartbeat = w["last_heartbeat_ms"].as_i64().unwrap();
        let age = scrape.value("kormlm_worker_heartbeat_age_seconds", &r);
        let expected = (scrape.at_ms - heartbeat) as f64 / 1000.0;
        // The coordinator measured the age a moment before the scrape returned.
        assert!(
            age >= 0.0 && age <= expected + 0.5 && age >= expected - 5.0,
            "age {age}, expected ≈{expected}"
        );
        let worker = format!("{}:{}", w["host"].as_str().unwrap(), w["pid"]);
        let labels = [r[0], r[1], ("worker", worker.as_str())];
        assert_eq!(scrape.value("kormlm_worker_info", &labels), 1.0, "{w}");
    }
}

/// Two CPU workers train the tiny model for 300 steps of Korean HateSpeech `train.tsv` (long
/// enough that a rank killed after the scrapes during the job dies mid-run on a loaded machine),
/// a checkpoint every 10 steps, one automatic restart allowed.
fn train_flags(dir: &Path, token_file: &Path) -> Vec<String> {
    let data = shared_data().join("korean-hate-speech/labeled/train.tsv");
    let mut args: Vec<String> = [
        "--config",
        zero2_config(dir).to_str().unwrap(),
        "--device",
        "cpu",
        "--num_workers",
        "2",
        "--max_restarts",
        "1",
        "--heartbeat-ms",
        "200",
        "--metrics-listen",
        "127.0.0.1:0",
        "--metrics-token-file",
        token_file.to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let run = kormlm_proto::train_args::TrainArgs {
        num_train_epochs: 1,
        logging_steps: 1,
        checkpoint_steps: 10,
        max_steps: 300,
        seed: 11,
        ..tiny_training(&data, &dir.join("out"))
    };
    args.extend(run.to_argv());
    args
}

#[test]
fn metrics_follow_a_job_through_a_restart_and_match_its_status() {
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let token_file = dir.path().join("metrics-token");
    kormlm_proto::secret::write_private(&token_file, "metrics-secret-1\n").unwrap();
    let args = train_flags(dir.path(), &token_file);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let c = CoordinatorProc::start(&state, &refs);
    let addr = metrics_addr(&state);
    let token = Some("metrics-secret-1");

    // The token is required; other paths and methods are refused.
    let refused = http(&addr, "GET", "/metrics", None);
    assert_eq!(refused.code, 401, "{}", refused.body);
    assert_eq!(
        refused.header("www-authenticate"),
        Some("Bearer realm=\"kormlm metrics\"")
    );
    assert!(!refused.body.contains("kormlm_job"), "{}", refused.body);
    assert_eq!(http(&addr, "GET", "/metrics", Some("metrics-secret-2")).code, 401);
    assert_eq!(http(&addr, "GET", "/", token).code, 404);
    let post = http(&addr, "POST", "/metrics", token);
    assert_eq!((post.code, post.header("allow")), (405, Some("GET")));

    // During the job: the step lies between two status readings, both ranks are ALIVE with a
    // fresh heartbeat, and the job is RUNNING.
    let (before, during, after) = wait_for("a scrape between two steps", Duration::from_secs(120), || {
        let before = c.status(Some("job-1"));
        // Each rank's optimizer state arrives with its own first heartbeat after its first step.
        let sized = before["workers"].as_array().is_some_and(|workers| {
            workers.len() == 2
                && workers
                    .iter()
                    .all(|w| w["optimizer_state_bytes"].as_u64().unwrap_or(0) > 0)
        });
        if before["global_step"].as_u64().unwrap_or(0) < 2 || !sized {
            return None;
        }
        let during = scrape(&addr, token);
        let after = c.status(Some("job-1"));
        Some((before, during, after))
    });
    let step = during.value("kormlm_job_global_step", &[("job", "job-1")]);
    assert!(
        number(&before, "global_step").unwrap() <= step && step <= number(&after, "global_step").unwrap(),
        "step {step} outside [{}, {}]",
        before["global_step"],
        after["global_step"]
    );
    assert_eq!(during.value("kormlm_jobs", &[("state", "RUNNING")]), 1.0);
    assert_eq!(
        during.value("kormlm_job_state", &[("job", "job-1"), ("state", "RUNNING")]),
        1.0
    );
    for rank in ["0", "1"] {
        let r = [("job", "job-1"), ("rank", rank), ("state", "ALIVE")];
        assert_eq!(during.value("kormlm_worker_state", &r), 1.0, "rank {rank}");
        let age = during.value("kormlm_worker_heartbeat_age_seconds", &r[..2]);
        assert!((0.0..5.0).contains(&age), "rank {rank}: heartbeat {age} s old");
        assert!(during.value("kormlm_worker_optimizer_state_bytes", &r[..2]) > 0.0);
    }
    assert!(during.value("kormlm_job_train_loss", &[("job", "job-1")]) > 0.0);
    assert_eq!(during.value("kormlm_job_restarts_total", &[("job", "job-1")]), 0.0);
    assert_eq!(during.family("kormlm_job_restarts")["type"], "counter");
    assert_eq!(during.family("kormlm_worker_heartbeat_age_seconds")["type"], "gauge");

    // A rank dies: the coordinator restarts the job once and counts the failure by kind.
    let rank1 = before["workers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["rank"] == 1)
        .and_then(|w| w["pid"].as_i64())
        .unwrap();
    kill(Pid::from_raw(rank1 as i32), Signal::SIGKILL).unwrap();
    let restarted = wait_for("the restart in the metrics", Duration::from_secs(60), || {
        let s = scrape(&addr, token);
        let restarts = s.value("kormlm_job_automatic_restarts_total", &[("job", "job-1")]);
        assert!(
            restarts == 1.0 || s.get("kormlm_job_state", &[("job", "job-1"), ("state", "SUCCEEDED")]) != Some(1.0),
            "job-1 ended before rank 1 (pid {rank1}) was killed: {}\n{}",
            s.families,
            c.log()
        );
        (restarts == 1.0).then_some(s)
    });
    assert!(
        restarted.value("kormlm_job_failures_total", &[("job", "job-1"), ("kind", "PEER_LOST")]) >= 1.0,
        "{}",
        restarted.families
    );
    assert_eq!(
        restarted.value("kormlm_job_failures_total", &[("job", "job-1"), ("kind", "BAD_INPUT")]),
        0.0
    );

    // After the job: every value is the status's (read twice around the scrape, and equal, so
    // the workers' exits do not race it).
    let (status, end) = wait_for(
        "the job's end, stable around a scrape",
        Duration::from_secs(300),
        || {
            let before = c.status(Some("job-1"));
            if before["state"] != "SUCCEEDED" {
                assert!(
                    !["FAILED", "KILLED"].contains(&before["state"].as_str().unwrap()),
                    "{before}\n{}",
                    c.log()
                );
                return None;
            }
            let end = scrape(&addr, token);
            (c.status(Some("job-1")) == before).then_some((before, end))
        },
    );
    assert_job_matches(&end, &status);
    assert_eq!(end.value("kormlm_jobs", &[("state", "SUCCEEDED")]), 1.0);
    assert_eq!(end.value("kormlm_job_restarts_total", &[("job", "job-1")]), 1.0);
    assert!(end.value("kormlm_job_val_loss", &[("job", "job-1")]) > 0.0);
    assert!(end.value("kormlm_job_failures_total", &[("job", "job-1"), ("kind", "PEER_LOST")]) >= 1.0);
    eprintln!(
        "/metrics after the job:\n{}",
        http(&addr, "GET", "/metrics", token)
            .body
            .lines()
            .filter(|l| !l.starts_with('#'))
            .collect::<Vec<_>>()
            .join("\n")
    );
    eprintln!("took {:.1} s", started.elapsed().as_secs_f64());
}

#[test]
fn beyond_loopback_the_coordinator_warns_of_open_metrics_or_a_clear_text_token() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let c = CoordinatorProc::start(&state, &["--metrics-listen", "0.0.0.0:0"]);
    let addr = metrics_addr(&state).replace("0.0.0.0", "127.0.0.1");
    let empty = scrape(&addr, None);
    for s in job_states() {
        assert_eq!(empty.value("kormlm_jobs", &[("state", s)]), 0.0, "{s}");
    }
    assert!(empty.get("kormlm_job_global_step", &[]).is_none());
    let log = wait_for("the warning", Duration::from_secs(10), || {
        let log = c.log();
        log.contains("beyond loopback without a token").then_some(log)
    });
    assert!(log.contains("--metrics-token-file"), "{log}");

    // With a token, beyond loopback: the bearer crosses in clear text, and the log says so.
    let state = dir.path().join("state-token");
    std::fs::create_dir_all(&state).unwrap();
    let token_file = dir.path().join("metrics-token");
    kormlm_proto::secret::write_private(&token_file, "metrics-secret-2\n").unwrap();
    let c = CoordinatorProc::start(
        &state,
        &[
            "--metrics-listen",
            "0.0.0.0:0",
            "--metrics-token-file",
            token_file.to_str().unwrap(),
        ],
    );
    let addr = metrics_addr(&state).replace("0.0.0.0", "127.0.0.1");
    let open = scrape(&addr, Some("metrics-secret-2"));
    assert_eq!(open.value("kormlm_jobs", &[("state", "RUNNING")]), 0.0);
    let log = wait_for("the clear-text warning", Duration::from_secs(10), || {
        let log = c.log();
        log.contains("crosses the network in clear text").then_some(log)
    });
    assert!(!log.contains("without a token"), "{log}");
    assert!(!log.contains("metrics-secret-2"), "the token is never logged: {log}");
}
