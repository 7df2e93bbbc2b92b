//! The chaos suite's scenario table: one row per fault (name, what is done, whether CI runs it,
//! its time budget) and the function that does it and checks what follows. Random choices
//! (steps, checkpoint intervals) come from `ctx.rng`, seeded per scenario.

use super::{signal, Ctx, Launch};
use kormlm_e2e::*;
use nix::sys::signal::Signal;
use serde_json::Value;
use std::time::Duration;

pub struct Scenario {
    pub name: &'static str,
    /// The fault, in words, for the scenario's line.
    pub fault: &'static str,
    /// Part of the subset `cargo test` (./test.sh) runs.
    pub ci: bool,
    /// Wall time the scenario may take, all its waits included.
    pub budget: Duration,
    pub run: fn(&mut Ctx),
}

const BUDGET: Duration = Duration::from_secs(240);

macro_rules! scenario {
    ($name:literal, $fault:literal, $ci:literal, $run:expr) => {
        Scenario {
            name: $name,
            fault: $fault,
            ci: $ci,
            budget: BUDGET,
            run: $run,
        }
    };
}

pub const SCENARIOS: &[Scenario] = &[
    scenario!(
        "rank1-sigkill-auto-restart",
        "SIGKILL rank 1, --max_restarts 1",
        true,
        |c| sigkill_rank_auto_restart(c, 1)
    ),
    scenario!(
        "rank0-sigkill-auto-restart",
        "SIGKILL rank 0, --max_restarts 1",
        true,
        |c| sigkill_rank_auto_restart(c, 0)
    ),
    scenario!(
        "rank1-sigkill-failed-resume",
        "SIGKILL rank 1, no restart; resume",
        false,
        |c| sigkill_rank_then_resume(c, 1)
    ),
    scenario!(
        "rank0-sigkill-failed-resume",
        "SIGKILL rank 0, no restart; resume",
        false,
        |c| sigkill_rank_then_resume(c, 0)
    ),
    scenario!(
        "rank1-sigterm-preempted-resume",
        "SIGTERM rank 1 (preemption); resume",
        true,
        |c| preempt_then_resume(c, 1, Signal::SIGTERM)
    ),
    scenario!(
        "rank0-sigterm-preempted-resume",
        "SIGTERM rank 0 (preemption); resume",
        false,
        |c| preempt_then_resume(c, 0, Signal::SIGTERM)
    ),
    scenario!(
        "rank1-sigterm-auto-restart",
        "SIGTERM rank 1, --max_restarts 1",
        false,
        |c| preempt_auto_restart(c, 1, Signal::SIGTERM)
    ),
    scenario!(
        "rank0-sigint-auto-restart",
        "SIGINT rank 0, --max_restarts 1",
        false,
        |c| preempt_auto_restart(c, 0, Signal::SIGINT)
    ),
    scenario!("rank1-sigstop-short", "SIGSTOP rank 1 1.5 s, SIGCONT", false, |c| {
        sigstop_short(c, 1)
    }),
    scenario!("rank0-sigstop-short", "SIGSTOP rank 0 1.5 s, SIGCONT", false, |c| {
        sigstop_short(c, 0)
    }),
    scenario!(
        "rank1-sigstop-past-timeout",
        "SIGSTOP rank 1 5 s > timeout 2 s, SIGCONT",
        false,
        |c| sigstop_past_timeout(c, 1)
    ),
    scenario!(
        "rank0-sigstop-past-timeout",
        "SIGSTOP rank 0 5 s > timeout 2 s, SIGCONT",
        false,
        |c| sigstop_past_timeout(c, 0)
    ),
    scenario!(
        "coordinator-sigkill-restart",
        "SIGKILL coordinator; restart it",
        true,
        coordinator_sigkill_restart
    ),
    scenario!(
        "coordinator-sigterm-rerun-resume",
        "SIGTERM coordinator; rerun with --resume",
        false,
        |c| coordinator_signal_rerun(c, false)
    ),
    scenario!(
        "coordinator-sigint-twice-rerun-resume",
        "SIGINT coordinator twice (forced); rerun --resume",
        false,
        |c| coordinator_signal_rerun(c, true)
    ),
    scenario!(
        "coordinator-sigstop",
        "SIGSTOP coordinator 3 s, SIGCONT",
        false,
        coordinator_sigstop
    ),
    scenario!(
        "coordinator-sigkill-during-kill",
        "kill, SIGKILL coordinator at once; restart, resume",
        true,
        coordinator_sigkill_during_kill
    ),
    scenario!(
        "rank1-sigkill-during-checkpoint",
        "SIGKILL rank 1 mid-checkpoint, --max_restarts 1",
        true,
        |c| sigkill_during_checkpoint(c, 1)
    ),
    scenario!(
        "rank0-sigkill-during-checkpoint",
        "SIGKILL rank 0 mid-checkpoint, no restart; resume",
        false,
        |c| sigkill_during_checkpoint(c, 0)
    ),
    scenario!(
        "coordinator-sigkill-during-checkpoint",
        "SIGKILL coordinator mid-checkpoint; restart",
        false,
        coordinator_sigkill_during_checkpoint
    ),
    scenario!(
        "rank1-sigkill-during-collective",
        "SIGKILL rank 1 inside a collective, --max_restarts 1",
        false,
        |c| fault_in_collective(c, 1, Signal::SIGKILL)
    ),
    scenario!(
        "rank0-sigterm-during-collective",
        "SIGTERM rank 0 inside a collective; resume",
        true,
        |c| fault_in_collective(c, 0, Signal::SIGTERM)
    ),
    scenario!(
        "stray-temp-files-before-resume",
        "kill; stale .step-N.tmp, .best.tmp, half log line; resume",
        true,
        stray_files_before_resume
    ),
    scenario!(
        "rank1-efbig-checkpoint-after-resume",
        "EFBIG (RLIMIT_FSIZE) rank 1 checkpoint after a resume",
        true,
        efbig_rank1_after_resume
    ),
    scenario!(
        "rank0-efbig-first-checkpoint",
        "EFBIG (RLIMIT_FSIZE) rank 0 first checkpoint; resume",
        false,
        efbig_rank0_first_checkpoint
    ),
    scenario!(
        "augment-rank-sigkill-stray-parts",
        "SIGKILL an augmentation rank; stale part temps; resume",
        false,
        augment_sigkill_stray_parts
    ),
    scenario!(
        "both-ranks-sigkill-auto-restart",
        "SIGKILL both ranks, --max_restarts 1",
        false,
        both_ranks_sigkill
    ),
    scenario!(
        "coordinator-and-rank1-sigkill",
        "SIGKILL coordinator and rank 1; restart, --max_restarts 1",
        false,
        coordinator_and_rank_sigkill
    ),
];

/// A step to strike at: after the first few, well before the last (the fault must land first).
fn strike_step(ctx: &mut Ctx) -> u64 {
    ctx.rng.range(3, 28)
}

fn checkpoint_steps(ctx: &mut Ctx) -> String {
    ctx.rng.range(2, 6).to_string()
}

fn message(status: &Value) -> String {
    status["message"].as_str().unwrap_or("").to_string()
}

fn assert_restarts(done: &Value, restarts: u64, automatic: u64) {
    assert_eq!(
        (done["restarts"].as_u64(), done["automatic_restarts"].as_u64()),
        (Some(restarts), Some(automatic)),
        "{done}"
    );
}

/// The job stopped at a checkpoint of the step it stopped at, registered.
fn assert_stopped_at_checkpoint(status: &Value) {
    assert_eq!(
        status["latest_checkpoint"]["global_step"], status["global_step"],
        "the stop checkpoint is registered: {status}"
    );
}

fn sigkill_rank_auto_restart(ctx: &mut Ctx, rank: u64) {
    let every = checkpoint_steps(ctx);
    let args = ctx.training_args(Launch::Spawned, &["--max_restarts", "1", "--checkpoint_steps", &every]);
    let c = ctx.coordinator(&args);
    let at = strike_step(ctx);
    let step = ctx.wait_step(&c, at);
    let pid = ctx.rank_pid(&c, rank);
    signal(pid, Signal::SIGKILL);
    ctx.landed = format!("step {step} (checkpoints every {every})");
    let done = ctx.succeeded(c);
    assert_restarts(&done, 1, 1);
}

fn sigkill_rank_then_resume(ctx: &mut Ctx, rank: u64) {
    let every = checkpoint_steps(ctx);
    let args = ctx.training_args(Launch::Spawned, &["--checkpoint_steps", &every]);
    let c = ctx.coordinator(&args);
    let at = strike_step(ctx);
    let step = ctx.wait_step(&c, at);
    let pid = ctx.rank_pid(&c, rank);
    signal(pid, Signal::SIGKILL);
    ctx.landed = format!("step {step} (checkpoints every {every})");
    let failed = ctx.wait_state(&c, "FAILED");
    let why = message(&failed);
    assert!(
        why.contains(&format!("rank {rank}")),
        "the failure names rank {rank}: {why}"
    );
    ctx.resume(&c);
    let done = ctx.succeeded(c);
    assert_restarts(&done, 1, 0);
}

fn preempt_then_resume(ctx: &mut Ctx, rank: u64, sig: Signal) {
    let args = ctx.training_args(Launch::Spawned, &["--checkpoint_steps", "1000"]);
    let c = ctx.coordinator(&args);
    let at = strike_step(ctx);
    let step = ctx.wait_step(&c, at);
    let pid = ctx.rank_pid(&c, rank);
    signal(pid, sig);
    ctx.landed = format!("step {step}");
    let killed = ctx.wait_state(&c, "KILLED");
    assert!(message(&killed).starts_with("preempted: "), "{killed}");
    assert_stopped_at_checkpoint(&killed);
    ctx.resume(&c);
    let done = ctx.succeeded(c);
    assert_restarts(&done, 1, 0);
}

fn preempt_auto_restart(ctx: &mut Ctx, rank: u64, sig: Signal) {
    let args = ctx.training_args(Launch::Spawned, &["--max_restarts", "1", "--checkpoint_steps", "1000"]);
    let c = ctx.coordinator(&args);
    let at = strike_step(ctx);
    let step = ctx.wait_step(&c, at);
    let pid = ctx.rank_pid(&c, rank);
    signal(pid, sig);
    ctx.landed = format!("step {step}");
    let done = ctx.succeeded(c);
    assert_restarts(&done, 1, 1);
}

fn sigstop_short(ctx: &mut Ctx, rank: u64) {
    let args = ctx.training_args(Launch::Spawned, &["--worker-timeout-ms", "8000"]);
    let c = ctx.coordinator(&args);
    let at = strike_step(ctx);
    let step = ctx.wait_step(&c, at);
    let pid = ctx.rank_pid(&c, rank);
    signal(pid, Signal::SIGSTOP);
    std::thread::sleep(Duration::from_millis(1500));
    signal(pid, Signal::SIGCONT);
    ctx.landed = format!("step {step}");
    let done = ctx.succeeded(c);
    assert_restarts(&done, 0, 0);
}

fn sigstop_past_timeout(ctx: &mut Ctx, rank: u64) {
    let every = checkpoint_steps(ctx);
    let args = ctx.training_args(
        Launch::Spawned,
        &[
            "--max_restarts",
            "2",
            "--worker-timeout-ms",
            "2000",
            "--checkpoint_steps",
            &every,
        ],
    );
    let c = ctx.coordinator(&args);
    let at = strike_step(ctx);
    let step = ctx.wait_step(&c, at);
    let pid = ctx.rank_pid(&c, rank);
    signal(pid, Signal::SIGSTOP);
    ctx.landed = format!("step {step} (checkpoints every {every})");
    ctx.wait_status(&c, "the frozen rank to be lost and the job restarted", |s| {
        (s["restarts"].as_u64() >= Some(1)).then_some(())
    });
    std::thread::sleep(Duration::from_secs(3));
    signal(pid, Signal::SIGCONT);
    let done = ctx.succeeded(c);
    assert_restarts(&done, 1, 1);
}

fn coordinator_sigkill_restart(ctx: &mut Ctx) {
    let args = ctx.training_args(Launch::Spawned, &[]);
    let mut c = ctx.coordinator(&args);
    let at = strike_step(ctx);
    let step = ctx.wait_step(&c, at);
    ctx.rank_pid(&c, 1);
    c.proc.signal(Signal::SIGKILL);
    ctx.landed = format!("step {step}");
    let restarted = ctx.restart(&mut c);
    ctx.note("restarted");
    let done = ctx.succeeded(restarted);
    assert_restarts(&done, 0, 0);
}

/// SIGTERM to the coordinator: it exits 143 with job-1 KILLED at a stop checkpoint; or SIGINT
/// twice while the workers are frozen (so the graceful stop cannot finish first): the second
/// forces the stop, exit 130, job-1 KILLED at once (its latest checkpoint an earlier periodic
/// one). The same command with `--resume` continues it.
fn coordinator_signal_rerun(ctx: &mut Ctx, forced: bool) {
    let every = checkpoint_steps(ctx);
    let args = ctx.training_args(Launch::Spawned, &["--checkpoint_steps", &every]);
    let mut c = ctx.coordinator(&args);
    let at = strike_step(ctx);
    let step = ctx.wait_step(&c, at);
    let pids = [ctx.rank_pid(&c, 0), ctx.rank_pid(&c, 1)];
    ctx.landed = format!("step {step} (checkpoints every {every})");
    let code = if forced {
        for pid in pids {
            signal(pid, Signal::SIGSTOP);
        }
        c.proc.signal(Signal::SIGINT);
        ctx.wait_status(&c, "job-1 to be STOPPING", |s| (s["state"] == "STOPPING").then_some(()));
        c.proc.signal(Signal::SIGINT);
        // Running again, they get the launcher's SIGTERM (and SIGKILL 5 s later).
        for pid in pids {
            signal(pid, Signal::SIGCONT);
        }
        130
    } else {
        c.proc.signal(Signal::SIGTERM);
        143
    };
    let exit = c.proc.wait_exit(ctx.left());
    assert_eq!(exit.code(), Some(code), "{}", c.log());
    let log = c.log();
    let ended = log
        .lines()
        .find(|l| l.starts_with("job job-1 KILLED: "))
        .unwrap_or_else(|| panic!("no `job job-1 KILLED` line: {log}"))
        .to_string();
    if forced {
        assert!(
            ended.contains("stopped at once after a second signal (SIGINT)"),
            "{ended}"
        );
    }
    ctx.note(format!("exit {code}, KILLED"));
    let mut rerun = args.clone();
    rerun.push("--resume".into());
    let resumed = ctx.restart_with(&mut c, &rerun);
    ctx.note("rerun --resume");
    let done = ctx.succeeded(resumed);
    assert_restarts(&done, 1, 0);
}

/// The coordinator frozen for 3 s: the short job may even finish meanwhile; a worker that
/// finished while the coordinator could not read its report is not a lost one.
fn coordinator_sigstop(ctx: &mut Ctx) {
    let args = ctx.training_args(Launch::Spawned, &["--checkpoint_steps", "5"]);
    let c = ctx.coordinator(&args);
    let at = strike_step(ctx);
    let step = ctx.wait_step(&c, at);
    ctx.rank_pid(&c, 1);
    c.proc.signal(Signal::SIGSTOP);
    std::thread::sleep(Duration::from_secs(3));
    c.proc.signal(Signal::SIGCONT);
    ctx.landed = format!("step {step}");
    let done = ctx.succeeded(c);
    assert_restarts(&done, 0, 0);
}

fn coordinator_sigkill_during_kill(ctx: &mut Ctx) {
    let args = ctx.training_args(Launch::Spawned, &["--checkpoint_steps", "1000"]);
    let mut c = ctx.coordinator(&args);
    let at = strike_step(ctx);
    let step = ctx.wait_step(&c, at);
    let ranks = [ctx.rank_pid(&c, 0), ctx.rank_pid(&c, 1)];
    // The workers are held (SIGSTOP) from before the kill until the coordinator is dead: a tiny
    // model's stop step and checkpoint take tens of milliseconds, less than a SIGKILL sent after
    // the acknowledgement may take to land, so without the hold the stop could be complete
    // (the job KILLED) before the coordinator dies.
    for pid in ranks {
        signal(pid, Signal::SIGSTOP);
    }
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let acknowledged = runtime.block_on(async {
        let mut client = kormlm_e2e::grpc::job_client(&c).await;
        let reply = client
            .kill_job(kormlm_proto::v1::KillJobRequest {
                job_id: "job-1".into(),
                force: false,
            })
            .await;
        c.proc.signal(Signal::SIGKILL);
        reply.unwrap_or_else(|e| panic!("kill: {e}")).into_inner()
    });
    // Once the coordinator is gone, each stopped worker's process group is orphaned and the
    // kernel sends it SIGHUP and SIGCONT; the workers must ignore the hang-up and go on.
    c.proc.wait_exit(Duration::from_secs(30));
    for pid in ranks {
        signal(pid, Signal::SIGCONT);
    }
    let state = acknowledged.status.as_ref().map(|s| s.state);
    assert_eq!(
        state,
        Some(kormlm_proto::v1::JobState::Stopping as i32),
        "{acknowledged:?}"
    );
    ctx.landed = format!("step {step}");
    ctx.note("kill acknowledged, coordinator SIGKILLed at once");
    let restarted = ctx.restart(&mut c);
    let killed = ctx.wait_state(&restarted, "KILLED");
    assert_stopped_at_checkpoint(&killed);
    ctx.resume(&restarted);
    let done = ctx.succeeded(restarted);
    assert_restarts(&done, 1, 0);
}

fn sigkill_during_checkpoint(ctx: &mut Ctx, rank: u64) {
    let every = checkpoint_steps(ctx);
    let restarts = if rank == 0 { "0" } else { "1" };
    let args = ctx.training_args(
        Launch::Spawned,
        &["--max_restarts", restarts, "--checkpoint_steps", &every],
    );
    let c = ctx.coordinator(&args);
    let from = ctx.rng.range(4, 24);
    let pid = ctx.rank_pid(&c, rank);
    let step = ctx.freeze_during_checkpoint(pid, from);
    signal(pid, Signal::SIGKILL);
    ctx.landed = format!("checkpoint step-{step} being written (every {every})");
    assert!(
        !ctx.out.join(format!("checkpoints/step-{step}")).exists(),
        "the interrupted checkpoint was committed"
    );
    if rank == 0 {
        let failed = ctx.wait_state(&c, "FAILED");
        let registered = failed["latest_checkpoint"]["global_step"].as_u64().unwrap_or(0);
        assert!(
            registered < step,
            "the interrupted checkpoint is not registered: {failed}"
        );
        ctx.resume(&c);
        let done = ctx.succeeded(c);
        assert_restarts(&done, 1, 0);
    } else {
        let done = ctx.succeeded(c);
        assert_restarts(&done, 1, 1);
    }
}

fn coordinator_sigkill_during_checkpoint(ctx: &mut Ctx) {
    let every = checkpoint_steps(ctx);
    let args = ctx.training_args(Launch::Spawned, &["--checkpoint_steps", &every]);
    let mut c = ctx.coordinator(&args);
    ctx.rank_pid(&c, 1);
    let from = ctx.rng.range(4, 24);
    let step = ctx.freeze_during_checkpoint(c.proc.pid(), from);
    c.proc.signal(Signal::SIGKILL);
    ctx.landed = format!("checkpoint step-{step} being written (every {every})");
    let restarted = ctx.restart(&mut c);
    ctx.note("restarted");
    let done = ctx.succeeded(restarted);
    assert_restarts(&done, 0, 0);
}

/// Freezes the other rank so that `rank` waits inside a collective, strikes `rank` there with
/// `sig`, and lets the other go on.
fn fault_in_collective(ctx: &mut Ctx, rank: u64, sig: Signal) {
    let every = checkpoint_steps(ctx);
    let restarts = if sig == Signal::SIGKILL { "1" } else { "0" };
    let args = ctx.training_args(
        Launch::Spawned,
        &[
            "--max_restarts",
            restarts,
            "--worker-timeout-ms",
            "15000",
            "--checkpoint_steps",
            &every,
        ],
    );
    let c = ctx.coordinator(&args);
    let at = strike_step(ctx);
    ctx.wait_step(&c, at);
    let victim = ctx.rank_pid(&c, rank);
    let other = ctx.rank_pid(&c, 1 - rank);
    let step = ctx.block_in_collective(&c, other, victim);
    signal(victim, sig);
    std::thread::sleep(Duration::from_millis(200));
    signal(other, Signal::SIGCONT);
    ctx.landed = format!("step {step}, rank {} frozen (checkpoints every {every})", 1 - rank);
    if sig == Signal::SIGKILL {
        let done = ctx.succeeded(c);
        assert_restarts(&done, 1, 1);
    } else {
        let killed = ctx.wait_state(&c, "KILLED");
        assert!(message(&killed).starts_with("preempted: "), "{killed}");
        assert_stopped_at_checkpoint(&killed);
        ctx.resume(&c);
        let done = ctx.succeeded(c);
        assert_restarts(&done, 1, 0);
    }
}

fn stray_files_before_resume(ctx: &mut Ctx) {
    let every: u64 = ctx.rng.range(2, 6);
    let args = ctx.training_args(Launch::Spawned, &["--checkpoint_steps", &every.to_string()]);
    let c = ctx.coordinator(&args);
    let at = strike_step(ctx);
    let step = ctx.wait_step(&c, at);
    ctx.client(&c, &["kill", "--job", "job-1"]);
    let killed = ctx.wait_state(&c, "KILLED");
    assert_stopped_at_checkpoint(&killed);
    let stopped = killed["global_step"].as_u64().unwrap();
    ctx.landed = format!("kill at step {step}, stopped at {stopped}");
    // What crashed writers leave: the temporary directory of the very checkpoint the resumed run
    // writes next, another of a step far ahead, a best-model temp, a log line cut short.
    let root = ctx.out.join("checkpoints");
    let next = (stopped / every + 1) * every;
    for tmp in [format!(".step-{next}.tmp"), ".step-999.tmp".to_string()] {
        std::fs::create_dir_all(root.join(&tmp).join("model")).unwrap();
        std::fs::write(root.join(&tmp).join("optim-rank1.safetensors"), b"half a partition").unwrap();
        std::fs::write(root.join(&tmp).join("trainer_state.json"), b"{\"version\": 2, \"ste").unwrap();
    }
    std::fs::create_dir_all(ctx.out.join(".best.tmp-4242")).unwrap();
    std::fs::write(ctx.out.join(".best.tmp-4242/model.safetensors"), b"half a model").unwrap();
    let log = ctx.out.join("training_log.jsonl");
    let mut text = std::fs::read_to_string(&log).unwrap();
    text.push_str("{\"type\":\"train\",\"step\":");
    std::fs::write(&log, text).unwrap();
    ctx.note(format!(
        "planted .step-{next}.tmp .step-999.tmp .best.tmp-4242, a half log line"
    ));
    ctx.resume(&c);
    let done = ctx.succeeded(c);
    assert_restarts(&done, 1, 0);
}

/// Below the size of an optimizer partition or the model file (~0.9 MB each for the tiny
/// model), above everything else a run writes.
const SMALL_DISK: u64 = 512 * 1024;

fn efbig_rank1_after_resume(ctx: &mut Ctx) {
    let every = checkpoint_steps(ctx);
    let args = ctx.training_args(Launch::External, &["--checkpoint_steps", &every]);
    let c = ctx.coordinator(&args);
    let mut workers = [ctx.worker(&c, 0, |_| {}), ctx.worker(&c, 1, |_| {})];
    let at = strike_step(ctx);
    ctx.wait_step(&c, at);
    ctx.client(&c, &["kill", "--job", "job-1"]);
    let killed = ctx.wait_state(&c, "KILLED");
    assert_stopped_at_checkpoint(&killed);
    let registered = killed["latest_checkpoint"].clone();
    for w in &mut workers {
        w.wait_exit(ctx.left());
    }
    // Resumed with rank 1 on a full disk: its next checkpoint cannot be written.
    ctx.resume(&c);
    let _full = [
        ctx.worker(&c, 0, |_| {}),
        ctx.worker(&c, 1, |command| limit_file_size(command, SMALL_DISK)),
    ];
    let failed = ctx.wait_state(&c, "FAILED");
    ctx.landed = format!("checkpoint after step {} (every {every})", registered["global_step"]);
    assert!(message(&failed).contains("not written: rank 1 failed"), "{failed}");
    assert_eq!(
        failed["latest_checkpoint"], registered,
        "the previous complete checkpoint stays registered"
    );
    assert!(
        c.worker_log(1).contains("File too large (os error 27)"),
        "{}",
        c.worker_log(1)
    );
    drop(_full);
    ctx.resume(&c);
    let _room = [ctx.worker(&c, 0, |_| {}), ctx.worker(&c, 1, |_| {})];
    let done = ctx.succeeded(c);
    assert_restarts(&done, 2, 0);
}

fn efbig_rank0_first_checkpoint(ctx: &mut Ctx) {
    let every: u64 = ctx.rng.range(3, 20);
    let args = ctx.training_args(Launch::External, &["--checkpoint_steps", &every.to_string()]);
    let c = ctx.coordinator(&args);
    let mut full = [
        ctx.worker(&c, 0, |command| limit_file_size(command, SMALL_DISK)),
        ctx.worker(&c, 1, |_| {}),
    ];
    let failed = ctx.wait_state(&c, "FAILED");
    ctx.landed = format!("checkpoint step-{every}");
    // Whichever rank reports first names the checkpoint and rank 0; rank 0 names the file
    // and the OS error.
    let why = message(&failed);
    let path = ctx.out.join(format!("checkpoints/step-{every}"));
    assert!(
        why.contains(&format!("checkpoint {} not written: rank 0 failed", path.display())),
        "{failed}"
    );
    let rank0 = c.worker_log(0);
    assert!(
        rank0.contains(&format!(
            ".step-{every}.tmp/optim-rank0.safetensors: File too large (os error 27)"
        )),
        "{rank0}"
    );
    assert_eq!(failed["latest_checkpoint"]["path"], Value::Null, "{failed}");
    let root = ctx.out.join("checkpoints");
    let left: Vec<String> = std::fs::read_dir(&root)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.contains("step-"))
        .collect();
    assert!(left.is_empty(), "nothing half-written: {left:?}");
    for w in &mut full {
        w.wait_exit(ctx.left());
    }
    ctx.resume(&c);
    let _room = [ctx.worker(&c, 0, |_| {}), ctx.worker(&c, 1, |_| {})];
    let done = ctx.succeeded(c);
    assert_restarts(&done, 1, 0);
}

fn augment_sigkill_stray_parts(ctx: &mut Ctx) {
    let (_, reference) = super::augment_reference();
    let output = ctx.dir.join("augmented.csv");
    let args = ctx.augment_args(&output, &[]);
    let c = ctx.coordinator(&args);
    let rank = ctx.rng.range(0, 1);
    let parts = kormlm_proto::augment_parts::parts_dir(&output);
    // Rank r writes chunks 4r..4r+4; strike after its first or second part.
    let after = ctx.rng.range(1, 2) as usize;
    let first = 4 * rank as usize;
    let pid = ctx.rank_pid(&c, rank);
    let left = ctx.left();
    wait_for("the rank's parts", left, || {
        (0..after)
            .all(|i| kormlm_proto::augment_parts::part_path(&parts, first + i, "csv").is_file())
            .then_some(())
    });
    signal(pid, Signal::SIGKILL);
    ctx.landed = format!("rank {rank} after {after} part(s)");
    let failed = ctx.wait_state(&c, "FAILED");
    assert!(message(&failed).contains(&format!("rank {rank}")), "{failed}");
    // A crashed part writer's temporary files, one for a part already there.
    for chunk in [first + after, first] {
        std::fs::write(
            parts.join(format!(".part-{chunk:06}.csv.tmp-{}", 90 + chunk)),
            "text,augmented_1,augmented_2\nhalf",
        )
        .unwrap();
    }
    ctx.note("planted part temps");
    ctx.resume(&c);
    ctx.wait_state(&c, "SUCCEEDED");
    assert_eq!(
        std::fs::read_to_string(&output).unwrap(),
        std::fs::read_to_string(reference).unwrap(),
        "the resumed augmentation equals the uninterrupted one"
    );
    assert!(!parts.exists(), "the parts are merged and removed");
    ctx.end(c);
}

fn both_ranks_sigkill(ctx: &mut Ctx) {
    let every = checkpoint_steps(ctx);
    let args = ctx.training_args(Launch::Spawned, &["--max_restarts", "1", "--checkpoint_steps", &every]);
    let c = ctx.coordinator(&args);
    let at = strike_step(ctx);
    let step = ctx.wait_step(&c, at);
    let pids = [ctx.rank_pid(&c, 0), ctx.rank_pid(&c, 1)];
    for pid in pids {
        signal(pid, Signal::SIGKILL);
    }
    ctx.landed = format!("step {step} (checkpoints every {every})");
    let done = ctx.succeeded(c);
    assert_restarts(&done, 1, 1);
}

fn coordinator_and_rank_sigkill(ctx: &mut Ctx) {
    let every = checkpoint_steps(ctx);
    let args = ctx.training_args(Launch::Spawned, &["--max_restarts", "1", "--checkpoint_steps", &every]);
    let mut c = ctx.coordinator(&args);
    let at = strike_step(ctx);
    let step = ctx.wait_step(&c, at);
    let pid = ctx.rank_pid(&c, 1);
    c.proc.signal(Signal::SIGKILL);
    signal(pid, Signal::SIGKILL);
    ctx.landed = format!("step {step} (checkpoints every {every})");
    let restarted = ctx.restart(&mut c);
    ctx.note("restarted");
    let done = ctx.succeeded(restarted);
    assert_restarts(&done, 1, 1);
}
