//! One heartbeat session with the coordinator: progress reports at its interval, the
//! coordinator's orders, stop signals, and the one last report of the held work. That report is
//! delivered before the session ends — or, when the coordinator has closed this session (it
//! counted this worker as lost), kept for the next registration to deliver or discard.

use super::held::HeldWork;
use super::{Daemon, DaemonError, Outcome};
use crate::client::CoordinatorClient;
use crate::error::WorkerError;
use crate::train::ProgressEvent;
use crate::work::WorkOutcome;
use kormlm_proto::now_ms;
use kormlm_proto::v1::{Assignment, CheckpointRef, CommandKind, CoordinatorCommand, WorkerReport};
use std::time::Duration;
use tokio::sync::mpsc;
use tonic::Streaming;

/// How long the last report waits for the coordinator's reply (it answers a failure with an
/// order at once; a finished rank gets none) before the process goes on.
const LINGER: Duration = Duration::from_millis(500);

/// Why one heartbeat session ended.
pub(super) enum SessionEnd {
    /// The coordinator closed the stream or went away: register again.
    Disconnected(String),
    /// This rank is done.
    Done(Outcome),
}

fn checkpoint_ref((path, step): &(String, u64), assignment: &Assignment, val_loss: Option<f64>) -> CheckpointRef {
    CheckpointRef {
        tag: format!("step-{step}"),
        path: path.clone(),
        global_step: *step,
        world_size: assignment.world_size,
        val_loss,
        created_unix_ms: now_ms(),
        run_id: assignment.run_id.clone(),
        attempt: assignment.attempt,
    }
}

/// A heartbeat with the work's latest progress; `finished` or `failure` on the last one.
fn report(
    assignment: &Assignment,
    event: Option<ProgressEvent>,
    finished: bool,
    failure: Option<&WorkerError>,
) -> WorkerReport {
    let (progress, early_stop) = match &event {
        Some(e) => {
            let (p, s) = e.to_proto();
            (Some(p), Some(s))
        }
        None => (None, None),
    };
    WorkerReport {
        job_id: assignment.job_id.clone(),
        rank: assignment.rank,
        incarnation: assignment.incarnation,
        attempt: assignment.attempt,
        sent_unix_ms: now_ms(),
        progress,
        optimizer_state_bytes: event.as_ref().map_or(0, |e| e.optimizer_state_bytes),
        finished,
        failure: failure.map(ToString::to_string).unwrap_or_default(),
        failure_kind: failure.map_or(0, |e| e.kind().to_wire() as i32),
        early_stop,
        checkpoint: event
            .as_ref()
            .and_then(|e| e.checkpoint.as_ref())
            .map(|c| checkpoint_ref(c, assignment, None)),
        best_checkpoint: event.as_ref().and_then(|e| {
            e.best_checkpoint
                .as_ref()
                .map(|c| checkpoint_ref(c, assignment, e.best_val_loss))
        }),
    }
}

/// Where work a stop signal stopped early can continue from.
fn stop_detail(outcome: &WorkOutcome, event: Option<&ProgressEvent>, rank: u32) -> String {
    match outcome {
        WorkOutcome::Train(_) | WorkOutcome::Classify(_) => match event.and_then(|e| e.checkpoint.as_ref()) {
            Some((path, step)) => format!("checkpoint at step {step} ({path})"),
            None => format!(
                "stopped at step {} without a checkpoint",
                event.map_or(0, |e| e.global_step)
            ),
        },
        WorkOutcome::Augment(outcome) => format!(
            "{} of {} chunk(s) of rank {rank} written; the others are augmented on resume",
            outcome.completed_chunks, outcome.chunks
        ),
        WorkOutcome::AugmentEval(outcome) => format!(
            "{} of {} work item(s) of rank {rank} done; the others run on resume",
            outcome.completed, outcome.items
        ),
    }
}

/// Lets the last report reach the coordinator: waits until it has left the queue, then for the
/// coordinator's reply, at most [`LINGER`]. Returns why the stream closed when the coordinator
/// closed it without an order: it had dropped this session (a lost worker, a resumed job), so
/// the report may not have counted.
async fn linger(tx: &mpsc::Sender<WorkerReport>, commands: &mut Streaming<CoordinatorCommand>) -> Option<String> {
    let drained = async {
        while tx.capacity() < tx.max_capacity() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), drained).await;
    match tokio::time::timeout(LINGER, commands.message()).await {
        Ok(Ok(None)) => Some("the coordinator closed the stream".into()),
        // A reply, a quiet stream (a finished rank gets no reply), or a coordinator gone.
        _ => None,
    }
}

impl Daemon {
    /// Heart-beats for the held work under `assignment` until the work's last report is
    /// delivered, the coordinator orders an end, or the stream breaks.
    pub(super) async fn session(
        &mut self,
        client: &mut CoordinatorClient,
        assignment: &Assignment,
    ) -> Result<SessionEnd, DaemonError> {
        let interval = Duration::from_millis(u64::from(assignment.heartbeat_interval_ms.max(10)));
        let (tx, rx) = mpsc::channel::<WorkerReport>(8);
        let progress =
            |held: &Option<HeldWork>| report(assignment, held.as_ref().and_then(HeldWork::progress), false, None);
        if tx.send(progress(&self.held)).await.is_err() {
            return Ok(SessionEnd::Disconnected("heartbeat stream closed".into()));
        }
        let mut commands = match client.heartbeat(tokio_stream::wrappers::ReceiverStream::new(rx)).await {
            Ok(response) => response.into_inner(),
            Err(status) => return Ok(SessionEnd::Disconnected(status.message().to_string())),
        };
        let mut tick = tokio::time::interval(interval);
        loop {
            if self.held.as_ref().is_some_and(|h| h.ended().is_some()) {
                return self.deliver(assignment, &tx, &mut commands).await;
            }
            let signalled = self.stopped_by.is_some();
            let (held, signals) = (&mut self.held, &mut self.signals);
            let advance = async {
                match held.as_mut() {
                    Some(h) => h.advance().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = advance => {}
                signal = signals.wait(), if !signalled => {
                    if !self.on_signal(signal) {
                        return Ok(SessionEnd::Done(Outcome::Stopped(signal)));
                    }
                }
                _ = tick.tick() => {
                    if tx.send(progress(&self.held)).await.is_err() {
                        return Ok(SessionEnd::Disconnected("heartbeat stream closed".into()));
                    }
                }
                command = commands.message() => match command {
                    Ok(Some(command)) => match CommandKind::try_from(command.kind) {
                        Ok(CommandKind::StopAfterStep) => {
                            tracing::info!(reason = %command.reason, "stopping after the current step");
                            match &self.held {
                                Some(held) => held.request_stop(),
                                None => {
                                    let _ = tx.send(report(assignment, None, true, None)).await;
                                    linger(&tx, &mut commands).await;
                                    return Ok(SessionEnd::Done(Outcome::Done));
                                }
                            }
                        }
                        Ok(kind @ (CommandKind::Shutdown | CommandKind::Terminate)) => {
                            if kind == CommandKind::Terminate {
                                tracing::warn!(reason = %command.reason, "terminating on the coordinator's request (kill --force)");
                            } else {
                                tracing::info!(reason = %command.reason, "shutting down on the coordinator's request");
                            }
                            let event = self.held.as_ref().and_then(HeldWork::progress);
                            if let Some(held) = self.held.take() {
                                held.abandon();
                            }
                            let _ = tx.send(report(assignment, event, true, None)).await;
                            linger(&tx, &mut commands).await;
                            return Ok(SessionEnd::Done(Outcome::Done));
                        }
                        Ok(CommandKind::Abort) => return Err(DaemonError::Aborted(command.reason)),
                        _ => {}
                    },
                    Ok(None) => return Ok(SessionEnd::Disconnected("the coordinator closed the stream".into())),
                    Err(status) => return Ok(SessionEnd::Disconnected(status.message().to_string())),
                },
            }
        }
    }

    /// Sends the ended work's last report: `finished`, its failure, or PREEMPTED when a stop
    /// signal stopped it early, and lets the work go. Only a failure report the coordinator may
    /// not have taken (it closed the session without an order) keeps the work held, for the
    /// next registration to re-send or discard.
    async fn deliver(
        &mut self,
        assignment: &Assignment,
        tx: &mpsc::Sender<WorkerReport>,
        commands: &mut Streaming<CoordinatorCommand>,
    ) -> Result<SessionEnd, DaemonError> {
        let Some(held) = &self.held else {
            return Ok(SessionEnd::Done(Outcome::Done));
        };
        let event = held.progress();
        let preempted = match (held.ended(), self.stopped_by) {
            (Some(Ok(outcome)), Some(signal)) if outcome.stopped_early() => Some(WorkerError::Preempted {
                signal: signal.name(),
                detail: stop_detail(outcome, event.as_ref(), assignment.rank),
            }),
            _ => None,
        };
        let failure = preempted
            .as_ref()
            .or_else(|| held.ended().and_then(|o| o.as_ref().err()));
        match (held.ended(), &preempted) {
            (_, Some(preempted)) => tracing::warn!("{preempted}"),
            (Some(Ok(outcome)), None) => tracing::info!(summary = %outcome, "work finished"),
            _ => {}
        }
        // A failure may be the consequence of the coordinator having moved on without this
        // worker (it was frozen past the worker timeout): when the coordinator closed this
        // session without an order, registering again tells whether the job wants it back.
        let maybe_stale = failure.is_some() && preempted.is_none() && self.stopped_by.is_none();
        let last = report(assignment, event, failure.is_none(), failure);
        let closed = match tx.send(last).await {
            Err(_) => Some("heartbeat stream closed".to_string()),
            Ok(()) => linger(tx, commands).await,
        };
        if let Some(reason) = closed.filter(|_| maybe_stale) {
            return Ok(SessionEnd::Disconnected(reason));
        }
        let outcome = self.held.take().and_then(HeldWork::into_ended);
        match (outcome, self.stopped_by) {
            (_, Some(signal)) => Ok(SessionEnd::Done(Outcome::Stopped(signal))),
            (Some(Err(e)), None) => Err(DaemonError::Work(e)),
            _ => Ok(SessionEnd::Done(Outcome::Done)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::TrainSummary;
    use crate::work::AugmentOutcome;

    fn summary(stopped_by_request: bool) -> TrainSummary {
        TrainSummary {
            epochs_run: 1,
            global_steps: 17,
            best_val_loss: None,
            best_epoch: None,
            early_stopped: false,
            stop_count: 0,
            val_loss_history: vec![],
            best_model_dir: None,
            final_model_dir: "out/final".into(),
            stopped_by_request,
            elapsed_s: 1.0,
        }
    }

    #[test]
    fn a_preempted_report_names_the_stop_checkpoint_and_carries_it() {
        let assignment = Assignment {
            job_id: "job-3".into(),
            rank: 0,
            world_size: 2,
            attempt: 2,
            run_id: "run-a".into(),
            ..Default::default()
        };
        let event = ProgressEvent {
            global_step: 17,
            checkpoint: Some(("out/checkpoints/step-17".into(), 17)),
            ..Default::default()
        };
        let outcome = WorkOutcome::Train(summary(true));
        assert!(outcome.stopped_early());
        let preempted = WorkerError::Preempted {
            signal: "SIGTERM",
            detail: stop_detail(&outcome, Some(&event), 0),
        };
        let sent = report(&assignment, Some(event), false, Some(&preempted));
        assert_eq!(
            sent.failure,
            "preempted: SIGTERM; checkpoint at step 17 (out/checkpoints/step-17)"
        );
        assert_eq!(sent.failure_kind, kormlm_proto::v1::FailureKind::Preempted as i32);
        assert!(!sent.finished);
        assert_eq!((sent.job_id.as_str(), sent.attempt), ("job-3", 2));
        let checkpoint = sent.checkpoint.unwrap();
        assert_eq!(
            (checkpoint.global_step, checkpoint.run_id.as_str(), checkpoint.attempt),
            (17, "run-a", 2)
        );
        assert!(!WorkOutcome::Train(summary(false)).stopped_early());
    }

    #[test]
    fn a_stopped_augmentation_says_how_many_chunks_it_wrote() {
        let outcome = |completed_chunks| {
            WorkOutcome::Augment(AugmentOutcome {
                summary: Default::default(),
                chunks: 8,
                completed_chunks,
                reused_chunks: 1,
            })
        };
        assert!(outcome(3).stopped_early() && !outcome(8).stopped_early());
        assert_eq!(
            stop_detail(&outcome(3), None, 1),
            "3 of 8 chunk(s) of rank 1 written; the others are augmented on resume"
        );
    }
}
