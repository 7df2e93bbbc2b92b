//! The chaos suite: seeded fault injection on real coordinator and worker processes. Each
//! scenario of the table in `chaos/scenarios.rs` starts a small training job (2 CPU workers, the
//! tiny ELECTRA with dropout 0.1, 160 steps) or an augmentation job, hits one process kind
//! (coordinator, rank 0, rank k) with SIGKILL, SIGTERM or SIGSTOP(+SIGCONT) at a randomised
//! step — also during a checkpoint write, during a collective and during a `kill` — or leaves
//! stray temporary files, or fills the disk (RLIMIT_FSIZE, EFBIG) during a checkpoint, then
//! checks:
//!
//! * the expected state after the fault (SUCCEEDED after an automatic restart, KILLED resumable,
//!   FAILED with the reason named), and after the resume the job SUCCEEDED;
//! * the final weights equal those of the uninterrupted run within 1e-5 (with dropout; the
//!   reference runs once per test binary) and every logged loss is the uninterrupted one;
//! * `training_log.jsonl` holds each step exactly once, and no temporary checkpoint is left;
//! * no process outlives the scenario: every worker pid seen, and every process whose command
//!   line names the scenario's coordinator or directory, is gone;
//! * bounded wall time: every wait has a deadline within the scenario's budget.
//!
//! `./test.sh` (`cargo test`) runs a fixed subset (the `ci` column). The full set:
//!
//! ```sh
//! KORMLM_CHAOS=all cargo test --release -p kormlm-e2e --test chaos -- --nocapture
//! ```
//!
//! prints a line per scenario (name, seed, fault, step, outcome, wall time) and the summary
//! `N scenarios, N passed, nothing lost`. `KORMLM_CHAOS=name,name` runs the named ones;
//! `KORMLM_CHAOS_SEED=N` replays a run's random choices (steps, ranks; the seed is printed);
//! `KORMLM_CHAOS_KEEP=1` keeps a failed scenario's directory (logs, state, output), `=all` every
//! scenario's.

#[path = "chaos/scenarios.rs"]
mod scenarios;

use kormlm_e2e::*;
use nix::sys::signal::Signal;
use nix::unistd::Pid;
use serde_json::Value;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The seed when `KORMLM_CHAOS_SEED` is not set (CI replays the same choices every time).
const DEFAULT_SEED: u64 = 20_261_202;

/// Optimizer steps of every training scenario: six epochs of dev.tsv (29 steps each) cut at 160,
/// so the run crosses epoch ends (evaluation, best model) and stops mid-epoch. Faults land in
/// the first 30 steps: the rest keeps the run going well past them on a fast machine.
const STEPS: u64 = 160;

/// The collective timeout of every worker: a peer that is gone is noticed well within a
/// scenario's budget even where the coordinator cannot tell the others.
const COLLECTIVE_TIMEOUT_S: &str = "30";

/// A small deterministic generator (SplitMix64): the suite's only source of randomness.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
}

/// A scenario's own seed: the run's seed mixed with the scenario's name (FNV-1a), so adding a
/// scenario changes no other scenario's choices.
fn scenario_seed(base: u64, name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325 ^ base, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// The training flags every training scenario and its reference share: what decides the
/// weights. `--checkpoint_steps`, restarts and timeouts are the scenario's and change nothing.
fn training_flags(dir: &Path, out: &Path) -> Vec<String> {
    let data = shared_data().join("korean-hate-speech/labeled/dev.tsv");
    [
        "--config",
        &text(&zero2_config(dir)),
        "--model_name_or_path",
        &text(&tiny_dropout_model()),
        "--data_path",
        &text(&data),
        "--output_dir",
        &text(out),
        "--max_seq_len",
        "32",
        "--seed",
        "7",
        "--num_train_epochs",
        "6",
        "--max_steps",
        &STEPS.to_string(),
        "--logging_steps",
        "1",
        "--device",
        "cpu",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Train losses by step of a training log; each step must appear once.
fn train_losses(out: &Path) -> Vec<(u64, Value)> {
    let mut seen = BTreeSet::new();
    training_log(out)
        .into_iter()
        .filter(|r| r["type"] == "train")
        .map(|r| {
            let step = r["step"]
                .as_u64()
                .unwrap_or_else(|| panic!("a train record without a step: {r}"));
            assert!(seen.insert(step), "{}: step {step} logged twice", out.display());
            (step, r["loss"].clone())
        })
        .collect()
}

/// The uninterrupted run every training scenario is compared with: its output directory.
fn reference() -> &'static Path {
    static REFERENCE: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &REFERENCE
        .get_or_init(|| {
            let dir = tempfile::tempdir().unwrap();
            let out = dir.path().join("out");
            let started = Instant::now();
            let mut command = Command::new(binary("coordinator"));
            command
                .args(training_flags(dir.path(), &out))
                .args([
                    "--num_workers",
                    "2",
                    "--exit-when-done",
                    "--listen",
                    "127.0.0.1:0",
                    "--state-dir",
                ])
                .arg(dir.path().join("state"))
                .env("KORMLM_COLLECTIVE_TIMEOUT_S", COLLECTIVE_TIMEOUT_S)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null());
            let mut proc = Proc::spawn("the reference coordinator", &mut command);
            let status = proc.wait_exit(Duration::from_secs(600));
            assert!(status.success(), "the uninterrupted reference run failed: {status}");
            let losses = train_losses(&out);
            assert_eq!(
                losses.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
                (1..=STEPS).collect::<Vec<_>>()
            );
            eprintln!(
                "chaos: uninterrupted reference, {STEPS} steps, in {:.1} s",
                started.elapsed().as_secs_f64()
            );
            (dir, out)
        })
        .1
}

/// The augmentation every augmentation scenario is compared with (`worker augment`, one
/// process): (input, output).
fn augment_reference() -> &'static (PathBuf, PathBuf) {
    static REFERENCE: OnceLock<(tempfile::TempDir, (PathBuf, PathBuf))> = OnceLock::new();
    &REFERENCE
        .get_or_init(|| {
            let dir = tempfile::tempdir().unwrap();
            let input = dir.path().join("docs.txt");
            let corpus = std::fs::read_to_string(shared_data().join("korean-hate-speech/labeled/train.tsv")).unwrap();
            let docs: Vec<&str> = corpus
                .lines()
                .skip(1)
                .filter_map(|l| l.split('\t').next())
                .take(AUGMENT_DOCS)
                .collect();
            assert_eq!(docs.len(), AUGMENT_DOCS);
            std::fs::write(&input, docs.join("\n") + "\n").unwrap();
            let output = dir.path().join("reference.csv");
            let mut command = Command::new(binary("worker"));
            command
                .args(["augment", "--input", &text(&input), "--output", &text(&output)])
                .args(["--model", &text(&tiny_model())])
                .args(augment_flags());
            let out = run(&mut command);
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            (dir, (input, output))
        })
        .1
}

/// Documents of the augmentation scenarios: 8 chunks of 512, 4 a rank.
const AUGMENT_DOCS: usize = 4096;

/// The augmentation options of the reference and the scenarios (the model is named by
/// `--model` in `worker augment`, by `--model_name_or_path` in the coordinator).
fn augment_flags() -> Vec<String> {
    ["--seed", "5", "--max_seq_len", "64", "--num_augmentations", "2"]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

/// How a scenario's workers are started.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Launch {
    /// By the coordinator (`--num_workers 2`).
    Spawned,
    /// By the test (`--world_size 2`, `worker --rank K --coordinator URL`).
    External,
}

/// One scenario's processes, directories, random choices and deadline.
pub struct Ctx {
    pub dir: PathBuf,
    pub out: PathBuf,
    pub state: PathBuf,
    pub rng: Rng,
    deadline: Instant,
    /// Every worker pid seen (status, the coordinators' launch logs, the test's own).
    pids: BTreeSet<u32>,
    /// The addresses of the scenario's coordinators.
    urls: Vec<String>,
    /// Where the fault landed (a step, a checkpoint), for the scenario's line.
    pub landed: String,
    /// What happened, in order (`FAILED(rank 1 lost) → resume → SUCCEEDED`).
    pub outcome: Vec<String>,
    launch_args: Vec<String>,
    /// The coordinator address of the scenario (kept across restarts).
    listen: Option<String>,
}

impl Ctx {
    fn new(dir: &Path, seed: u64, budget: Duration) -> Self {
        Self {
            dir: dir.to_path_buf(),
            out: dir.join("out"),
            state: dir.join("state"),
            rng: Rng::new(seed),
            deadline: Instant::now() + budget,
            pids: BTreeSet::new(),
            urls: Vec::new(),
            landed: String::new(),
            outcome: Vec::new(),
            launch_args: Vec::new(),
            listen: None,
        }
    }

    /// Time left of the scenario's budget (every wait ends by then).
    pub fn left(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now())
    }

    pub fn note(&mut self, what: impl Into<String>) {
        self.outcome.push(what.into());
    }

    /// The command line of a training job with `launch` and `extra` coordinator flags.
    pub fn training_args(&self, launch: Launch, extra: &[&str]) -> Vec<String> {
        let mut args = training_flags(&self.dir, &self.out);
        match launch {
            Launch::Spawned => args.extend(["--num_workers".into(), "2".into()]),
            Launch::External => args.extend(["--world_size".into(), "2".into()]),
        }
        args.extend(["--heartbeat-ms".into(), "200".into()]);
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    }

    /// The command line of the augmentation job (2 workers the coordinator starts).
    pub fn augment_args(&self, output: &Path, extra: &[&str]) -> Vec<String> {
        let (input, _) = augment_reference();
        let mut args: Vec<String> = ["--task", "augment", "--num_workers", "2", "--device", "cpu", "--input"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        args.push(text(input));
        args.extend(["--output".into(), text(output), "--heartbeat-ms".into(), "200".into()]);
        args.extend(["--model_name_or_path".into(), text(&tiny_model())]);
        args.extend(augment_flags());
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    }

    /// Starts a coordinator with `args` on the scenario's state directory (and, after the
    /// first, on the first one's address, as a restarted coordinator must be).
    pub fn coordinator(&mut self, args: &[String]) -> CoordinatorProc {
        std::fs::create_dir_all(&self.state).unwrap();
        self.launch_args = args.to_vec();
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let env = [("KORMLM_COLLECTIVE_TIMEOUT_S", COLLECTIVE_TIMEOUT_S)];
        let c = match &self.listen {
            None => CoordinatorProc::start_with_env(&self.state, &refs, &env),
            Some(listen) => {
                let listen = listen.clone();
                CoordinatorProc::start_listening_with_env(&self.state, &listen, &refs, &env)
            }
        };
        self.listen
            .get_or_insert_with(|| c.url.trim_start_matches("http://").to_string());
        self.urls.push(c.url.clone());
        c
    }

    /// The coordinator again, once `old` has exited, with the arguments it was last started with.
    pub fn restart(&mut self, old: &mut CoordinatorProc) -> CoordinatorProc {
        let args = self.launch_args.clone();
        self.restart_with(old, &args)
    }

    /// The coordinator again, once `old` has exited, with `args`.
    pub fn restart_with(&mut self, old: &mut CoordinatorProc, args: &[String]) -> CoordinatorProc {
        old.proc.wait_exit(self.left());
        self.collect_launched(old);
        self.coordinator(args)
    }

    /// An external worker for `rank`, changed by `customise` (e.g. a file-size limit).
    pub fn worker(&mut self, c: &CoordinatorProc, rank: u32, customise: impl FnOnce(&mut Command)) -> Proc {
        let proc = c.worker_customised(rank, &[], |command| {
            command.env("KORMLM_COLLECTIVE_TIMEOUT_S", COLLECTIVE_TIMEOUT_S);
            // The threads the coordinator gives each of its 2 local workers (the reference's):
            // another number sums in another order, and the losses drift apart.
            if std::env::var_os("OMP_NUM_THREADS").is_none() {
                let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
                command.env("OMP_NUM_THREADS", (cores / 2).max(1).to_string());
            }
            customise(command);
        });
        self.pids.insert(proc.pid());
        proc
    }

    /// `status --json --job job-1`, remembering the worker pids it lists.
    pub fn status(&mut self, c: &CoordinatorProc) -> Value {
        let s = c.status(Some("job-1"));
        for w in s["workers"].as_array().into_iter().flatten() {
            if let Some(pid) = w["pid"].as_u64().filter(|p| *p > 0) {
                self.pids.insert(pid as u32);
            }
        }
        s
    }

    /// Polls the status until `check` accepts it, within the scenario's budget.
    pub fn wait_status<T>(&mut self, c: &CoordinatorProc, what: &str, mut check: impl FnMut(&Value) -> Option<T>) -> T {
        let left = self.left();
        wait_for(what, left, || {
            let s = self.status(c);
            check(&s)
        })
    }

    /// Waits until job-1 is in `state`; any other final state fails the scenario.
    pub fn wait_state(&mut self, c: &CoordinatorProc, state: &str) -> Value {
        let log = || c.log();
        let s = self.wait_status(c, &format!("job-1 to be {state}"), |s| {
            let now = s["state"].as_str().unwrap_or("");
            let terminal = ["SUCCEEDED", "FAILED", "KILLED"].contains(&now);
            assert!(
                !terminal || now == state,
                "job-1 ended {now}, expected {state}: {s}\n{}",
                log()
            );
            (now == state).then(|| s.clone())
        });
        let message = s["message"].as_str().unwrap_or("");
        self.note(if message.is_empty() || state == "SUCCEEDED" {
            state.to_string()
        } else {
            format!("{state}({})", message.chars().take(60).collect::<String>())
        });
        s
    }

    /// Waits until job-1 has taken at least `step` steps; returns the step it is at.
    pub fn wait_step(&mut self, c: &CoordinatorProc, step: u64) -> u64 {
        self.wait_status(c, &format!("step {step}"), |s| {
            assert_ne!(s["state"], "FAILED", "{s}");
            s["global_step"].as_u64().filter(|g| *g >= step)
        })
    }

    /// The pid of rank `rank`'s current worker (once it has registered).
    pub fn rank_pid(&mut self, c: &CoordinatorProc, rank: u64) -> u32 {
        self.wait_status(c, &format!("rank {rank} to register"), |s| {
            s["workers"]
                .as_array()?
                .iter()
                .find(|w| w["rank"].as_u64() == Some(rank) && w["state"] != "LOST" && w["state"] != "EXITED")
                .and_then(|w| w["pid"].as_u64())
                .filter(|p| *p > 0)
                .map(|p| p as u32)
        })
    }

    /// A client subcommand against `c` (`kill --job job-1`, `resume --job job-1`).
    pub fn client(&self, c: &CoordinatorProc, args: &[&str]) -> Output {
        let out = c.client(args);
        assert!(
            out.status.success(),
            "coordinator {args:?}: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            c.log()
        );
        out
    }

    pub fn resume(&mut self, c: &CoordinatorProc) {
        self.client(c, &["resume", "--job", "job-1"]);
        self.note("resume");
    }

    /// Waits for the newest `.step-N.tmp` (N ≥ `from`) to appear under the output's checkpoints,
    /// then freezes `pid` (SIGSTOP) at once and checks that the checkpoint is still being written
    /// (not yet renamed to `step-N`). A write that finished first is let go (SIGCONT) and the
    /// next one tried. Returns N with `pid` stopped mid-checkpoint.
    pub fn freeze_during_checkpoint(&mut self, pid: u32, from: u64) -> u64 {
        let root = self.out.join("checkpoints");
        let deadline = self.deadline;
        loop {
            assert!(Instant::now() < deadline, "no checkpoint write caught in time");
            let writing = std::fs::read_dir(&root).into_iter().flatten().flatten().find_map(|e| {
                let name = e.file_name().to_string_lossy().to_string();
                let step: u64 = name.strip_prefix(".step-")?.strip_suffix(".tmp")?.parse().ok()?;
                (step >= from).then_some(step)
            });
            let Some(step) = writing else {
                std::thread::sleep(Duration::from_micros(300));
                continue;
            };
            signal(pid, Signal::SIGSTOP);
            let committed = root.join(format!("step-{step}")).exists();
            if !committed && root.join(format!(".step-{step}.tmp")).exists() {
                return step;
            }
            signal(pid, Signal::SIGCONT);
            // Past this write: wait for the next.
            while root.join(format!(".step-{step}.tmp")).exists() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_micros(300));
            }
        }
    }

    /// Freezes `stopped` (SIGSTOP) and waits until `blocked` uses no CPU any more: it waits for
    /// its frozen peer inside a collective. Returns the step the job was at.
    pub fn block_in_collective(&mut self, c: &CoordinatorProc, stopped: u32, blocked: u32) -> u64 {
        let step = self.status(c)["global_step"].as_u64().unwrap_or(0);
        signal(stopped, Signal::SIGSTOP);
        let left = self.left();
        let mut last = cpu_ticks(blocked);
        wait_for("the peer to block in a collective", left, || {
            std::thread::sleep(Duration::from_millis(600));
            let now = cpu_ticks(blocked);
            let idle = now.saturating_sub(last) <= 2;
            last = now;
            idle.then_some(())
        });
        step
    }

    /// The pids of the workers `c` started, from its launch log (`started worker … pid=N`).
    fn collect_launched(&mut self, c: &CoordinatorProc) {
        let log = std::fs::read_to_string(c.state_dir.with_extension("coordinator.log")).unwrap_or_default();
        for line in log.lines().filter(|l| l.contains("started worker")) {
            if let Some(pid) = line
                .split("pid=")
                .nth(1)
                .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
                .and_then(|p| p.parse().ok())
            {
                self.pids.insert(pid);
            }
        }
    }

    /// Processes of this scenario still running besides `except`: the workers seen, and every
    /// process whose command line names one of its coordinators or its directory.
    fn survivors(&self, except: &[u32]) -> Vec<String> {
        let mut left: Vec<String> = self
            .pids
            .iter()
            .filter(|p| pid_alive(**p) && !except.contains(p))
            .map(|p| format!("worker pid {p}: {}", cmdline(*p)))
            .collect();
        let dir = text(&self.dir);
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            if except.contains(&pid) || self.pids.contains(&pid) || !pid_alive(pid) {
                continue;
            }
            let line = cmdline(pid);
            let ours = line.contains(&dir) || self.urls.iter().any(|u| line.contains(&format!("--coordinator {u}")));
            // The clients this test runs name the coordinator with --addr and end by themselves.
            if ours && !line.contains(" --addr ") {
                left.push(format!("pid {pid}: {line}"));
            }
        }
        left
    }

    /// After job-1 has ended: every worker leaves by itself (within 30 s), then the coordinator
    /// `c` stops on SIGTERM (0: nothing is running), and nothing of the scenario is left.
    pub fn end(&mut self, mut c: CoordinatorProc) {
        self.collect_launched(&c);
        let coordinator = c.proc.pid();
        let left = self.left().min(Duration::from_secs(30));
        let mut survivors = Vec::new();
        let gone = wait_for_result(left, || {
            survivors = self.survivors(&[coordinator]);
            survivors.is_empty()
        });
        assert!(gone, "processes outlived job-1: {survivors:?}\n{}", c.log());
        c.proc.signal(Signal::SIGTERM);
        let exit = c.proc.wait_exit(Duration::from_secs(30));
        assert_eq!(
            exit.code(),
            Some(0),
            "the idle coordinator stops with 0: {exit}\n{}",
            c.log()
        );
        let survivors = self.survivors(&[]);
        assert!(
            survivors.is_empty(),
            "processes outlived the coordinator: {survivors:?}"
        );
    }

    /// The common end of a training scenario: job-1 SUCCEEDED with all its steps, its weights
    /// and logged losses those of the uninterrupted run, each step logged once, no temporary
    /// checkpoint left, and no process left over.
    pub fn succeeded(&mut self, c: CoordinatorProc) -> Value {
        let done = self.wait_state(&c, "SUCCEEDED");
        assert_eq!(done["global_step"].as_u64(), Some(STEPS), "{done}");
        let reference = reference();
        let (want, have) = (train_losses(reference), train_losses(&self.out));
        assert_eq!(
            have.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
            (1..=STEPS).collect::<Vec<_>>(),
            "each step logged exactly once"
        );
        for ((step, loss), (_, expected)) in have.iter().zip(&want) {
            assert_eq!(
                loss, expected,
                "the loss at step {step} differs from the uninterrupted run"
            );
        }
        let diff = max_weight_diff(
            &reference.join("final/model.safetensors"),
            &self.out.join("final/model.safetensors"),
        );
        assert!(
            diff <= 1e-5,
            "final weights differ from the uninterrupted run by {diff}"
        );
        let temporary: Vec<String> = std::fs::read_dir(self.out.join("checkpoints"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().to_string())
            .filter(|n| n.starts_with('.') && n.contains(".tmp"))
            .collect();
        assert!(temporary.is_empty(), "temporary checkpoints left: {temporary:?}");
        self.note(format!("weights Δ {diff:.1e}"));
        self.end(c);
        done
    }
}

pub fn signal(pid: u32, signal: Signal) {
    let _ = nix::sys::signal::kill(Pid::from_raw(pid as i32), signal);
}

/// Waits until `done` holds or `timeout` passes; whether it held.
fn wait_for_result(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn cmdline(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .unwrap_or_default()
}

/// User plus system CPU time of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
    // After the name: state is field 3, utime 14 and stime 15 (1-based over the whole line).
    let at = |i: usize| fields.get(i - 3).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
    at(14) + at(15)
}

/// Which scenarios this run takes: `KORMLM_CHAOS` (`all`, or names separated by commas), else
/// the CI subset.
fn selected() -> Vec<&'static scenarios::Scenario> {
    let all = scenarios::SCENARIOS;
    match std::env::var("KORMLM_CHAOS").ok().as_deref().map(str::trim) {
        None | Some("") | Some("ci") => all.iter().filter(|s| s.ci).collect(),
        Some("all") => all.iter().collect(),
        Some(names) => names
            .split(',')
            .map(|name| {
                let name = name.trim();
                all.iter().find(|s| s.name == name).unwrap_or_else(|| {
                    panic!(
                        "KORMLM_CHAOS: no scenario {name:?}; the scenarios: {}",
                        all.iter().map(|s| s.name).collect::<Vec<_>>().join(", ")
                    )
                })
            })
            .collect(),
    }
}

#[test]
fn chaos() {
    let base = match std::env::var("KORMLM_CHAOS_SEED") {
        Ok(seed) => seed
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("KORMLM_CHAOS_SEED={seed:?}: {e}; a number is accepted")),
        Err(_) => DEFAULT_SEED,
    };
    let chosen = selected();
    eprintln!(
        "chaos: {} scenario(s), KORMLM_CHAOS_SEED={base} (replay one: KORMLM_CHAOS=NAME KORMLM_CHAOS_SEED={base})",
        chosen.len()
    );
    let started = Instant::now();
    // The references first, so that a scenario's wall time is its own.
    reference();
    if chosen.iter().any(|s| s.name.starts_with("augment")) {
        augment_reference();
    }
    eprintln!(
        "chaos: models and references ready in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let mut failed = Vec::new();
    for scenario in &chosen {
        let seed = scenario_seed(base, scenario.name);
        let dir = tempfile::tempdir().unwrap();
        let t0 = Instant::now();
        let mut ctx = Ctx::new(dir.path(), seed, scenario.budget);
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (scenario.run)(&mut ctx)));
        let wall = t0.elapsed();
        let verdict = match &result {
            Ok(()) if wall <= scenario.budget => "passed".to_string(),
            Ok(()) => format!(
                "FAILED: took {:.0} s, over its budget of {} s",
                wall.as_secs_f64(),
                scenario.budget.as_secs()
            ),
            Err(panic) => format!("FAILED: {}", panic_text(panic.as_ref()).lines().next().unwrap_or("")),
        };
        eprintln!(
            "chaos: {:<34} seed {base} | {} | at {} | {} | {:.1} s | {verdict}",
            scenario.name,
            scenario.fault,
            if ctx.landed.is_empty() { "-" } else { &ctx.landed },
            ctx.outcome.join(" → "),
            wall.as_secs_f64(),
        );
        if let Err(panic) = &result {
            // The whole message (a coordinator's log, say) once the table line is out.
            eprintln!("chaos: {} failed:\n{}", scenario.name, panic_text(panic.as_ref()));
        }
        // A failed scenario's processes must not disturb the next one.
        for line in ctx.survivors(&[]) {
            if let Some(pid) = line
                .split_whitespace()
                .find_map(|w| w.trim_end_matches(':').parse::<u32>().ok())
            {
                signal(pid, Signal::SIGKILL);
            }
        }
        let keep = std::env::var("KORMLM_CHAOS_KEEP").ok();
        if verdict != "passed" {
            failed.push(scenario.name);
        }
        if keep.as_deref() == Some("all") || (keep.is_some() && verdict != "passed") {
            eprintln!("chaos: kept {}", dir.path().display());
            std::mem::forget(dir);
        }
    }
    let passed = chosen.len() - failed.len();
    eprintln!(
        "chaos: {} scenarios, {passed} passed, {} in {:.0} s (KORMLM_CHAOS_SEED={base})",
        chosen.len(),
        if failed.is_empty() {
            "nothing lost".to_string()
        } else {
            format!("FAILED: {}", failed.join(", "))
        },
        started.elapsed().as_secs_f64()
    );
    assert!(failed.is_empty(), "chaos scenarios failed: {failed:?}");
}

/// A caught panic's message.
fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default()
}
