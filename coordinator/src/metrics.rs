//! What `/metrics` shows: a snapshot of every job, copied under the state lock
//! ([`Coordinator::metrics_snapshot`]) and rendered after it in the Prometheus text format 0.0.4
//! with the `prometheus-client` crate. Names follow Prometheus' conventions: the `kormlm_`
//! prefix, base units in the name (`_seconds`, `_bytes`, `_ratio`), counters ending in `_total`,
//! states as a `state` label with one series per state (1 for the current one). Values a job
//! has not reported yet (a loss before the first logging step) are absent, not 0.
//!
//! [`Coordinator::metrics_snapshot`]: crate::state::Coordinator::metrics_snapshot

use crate::state::job::JobState;
use crate::state::workers::{Worker, WorkerState};
use crate::state::JobMetrics;
use kormlm_proto::failure::FailureKind;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeGaugeValue, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};
use std::fmt;

/// The `Content-Type` of what [`render`] returns.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Every metric name starts with this (and `_`).
pub const PREFIX: &str = "kormlm";

const JOB_STATES: [JobState; 6] = [
    JobState::Pending,
    JobState::Running,
    JobState::Stopping,
    JobState::Killed,
    JobState::Failed,
    JobState::Succeeded,
];

const WORKER_STATES: [WorkerState; 4] = [
    WorkerState::Alive,
    WorkerState::Lost,
    WorkerState::Exited,
    WorkerState::Failed,
];

/// A worker state's name, as `coordinator status` shows it.
fn worker_state_name(state: WorkerState) -> &'static str {
    match state {
        WorkerState::Alive => "ALIVE",
        WorkerState::Lost => "LOST",
        WorkerState::Exited => "EXITED",
        WorkerState::Failed => "FAILED",
    }
}

/// The jobs at one instant.
#[derive(Debug)]
pub struct Snapshot {
    pub jobs: Vec<JobMetrics>,
    /// When it was taken (heartbeat ages are measured to it).
    pub now_ms: i64,
}

type JobLabel = [(&'static str, String); 1];
type RankLabels = [(&'static str, String); 2];

fn job_label(job: &JobMetrics) -> JobLabel {
    [("job", job.view.job.id.clone())]
}

fn rank_labels(job: &JobMetrics, worker: &Worker) -> RankLabels {
    [("job", job.view.job.id.clone()), ("rank", worker.rank.to_string())]
}

/// One gauge family; nothing at all when it has no samples.
fn gauges<L: EncodeLabelSet, V: EncodeGaugeValue>(
    encoder: &mut DescriptorEncoder,
    name: &'static str,
    help: &str,
    unit: Option<&Unit>,
    samples: Vec<(L, V)>,
) -> fmt::Result {
    if samples.is_empty() {
        return Ok(());
    }
    let mut family = encoder.encode_descriptor(name, help, unit, MetricType::Gauge)?;
    for (labels, value) in samples {
        ConstGauge::new(value).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

/// One counter family (`_total` is added to `name`); nothing when it has no samples.
fn counters<L: EncodeLabelSet>(
    encoder: &mut DescriptorEncoder,
    name: &'static str,
    help: &str,
    samples: Vec<(L, u64)>,
) -> fmt::Result {
    if samples.is_empty() {
        return Ok(());
    }
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, value) in samples {
        ConstCounter::new(value).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

impl Snapshot {
    /// One sample per job of what `value` gives (jobs for which it gives `None` are left out).
    fn per_job<V>(&self, value: impl Fn(&JobMetrics) -> Option<V>) -> Vec<(JobLabel, V)> {
        self.jobs
            .iter()
            .filter_map(|j| value(j).map(|v| (job_label(j), v)))
            .collect()
    }

    /// One sample per worker of every job.
    fn per_worker<V>(&self, value: impl Fn(&Worker) -> Option<V>) -> Vec<(RankLabels, V)> {
        self.jobs
            .iter()
            .flat_map(|j| j.view.workers.iter().map(move |w| (j, w)))
            .filter_map(|(j, w)| value(w).map(|v| (rank_labels(j, w), v)))
            .collect()
    }

    fn encode_jobs(&self, e: &mut DescriptorEncoder) -> fmt::Result {
        let by_state = JOB_STATES
            .iter()
            .map(|s| {
                let n = self.jobs.iter().filter(|j| j.view.job.state == *s).count() as u64;
                ([("state", s.name().to_string())], n)
            })
            .collect();
        gauges(e, "jobs", "Jobs of this coordinator by state", None, by_state)?;
        let job_states = self
            .jobs
            .iter()
            .flat_map(|j| {
                JOB_STATES.iter().map(move |s| {
                    let labels = [("job", j.view.job.id.clone()), ("state", s.name().to_string())];
                    (labels, u64::from(j.view.job.state == *s))
                })
            })
            .collect();
        gauges(
            e,
            "job_state",
            "1 for the job's state, 0 for the others",
            None,
            job_states,
        )?;
        gauges(
            e,
            "job_world_size",
            "Ranks of the job's current attempt",
            None,
            self.per_job(|j| Some(j.view.job.world_size())),
        )?;
        Ok(())
    }

    fn encode_progress(&self, e: &mut DescriptorEncoder) -> fmt::Result {
        let progress = |j: &JobMetrics| j.view.job.progress;
        gauges(
            e,
            "job_epoch",
            "Epoch in progress (status epoch)",
            None,
            self.per_job(|j| Some(progress(j).epoch)),
        )?;
        gauges(
            e,
            "job_global_step",
            "Optimizer steps taken (status global_step)",
            None,
            self.per_job(|j| Some(progress(j).global_step)),
        )?;
        gauges(
            e,
            "job_total_steps",
            "Optimizer steps the job will take (status total_steps)",
            None,
            self.per_job(|j| Some(progress(j).total_steps)),
        )?;
        gauges(
            e,
            "job_train_loss",
            "Training loss of the last logging window (status train_loss)",
            None,
            self.per_job(|j| progress(j).train_loss),
        )?;
        gauges(
            e,
            "job_val_loss",
            "Dev (validation) loss of the last evaluation (status val_loss)",
            None,
            self.per_job(|j| progress(j).val_loss),
        )?;
        gauges(
            e,
            "job_best_val_loss",
            "Best dev loss so far, the early-stopping reference (status best_val_loss)",
            None,
            self.per_job(|j| j.view.job.early_stop.best_val_loss),
        )?;
        gauges(
            e,
            "job_early_stop_count",
            "Evaluations in a row without a better dev loss (status stop_count)",
            None,
            self.per_job(|j| Some(j.view.job.early_stop.stop_count)),
        )?;
        gauges(
            e,
            "job_max_stop_number",
            "Early-stopping patience: the job stops when the stop count reaches it (status max_stop_number)",
            None,
            self.per_job(|j| Some(j.view.job.early_stop.max_stop_number)),
        )?;
        gauges(
            e,
            "job_learning_rate",
            "Learning rate of the last step (status learning_rate)",
            None,
            self.per_job(|j| Some(progress(j).learning_rate)),
        )?;
        gauges(
            e,
            "job_samples_per_second",
            "Training samples per second, all ranks, last logging window (status samples_per_s)",
            None,
            self.per_job(|j| Some(progress(j).samples_per_s)),
        )?;
        gauges(
            e,
            "job_tokens_per_second",
            "Training tokens per second, all ranks, last logging window (status tokens_per_s)",
            None,
            self.per_job(|j| Some(progress(j).tokens_per_s)),
        )?;
        let ratio = Unit::Other("ratio".into());
        gauges(
            e,
            "job_mfu",
            "Model-FLOPs utilisation 0..1 of the last logging window against the measured matmul peak (status mfu)",
            Some(&ratio),
            self.per_job(|j| Some(progress(j).mfu)),
        )?;
        Ok(())
    }

    fn encode_restarts(&self, e: &mut DescriptorEncoder) -> fmt::Result {
        counters(
            e,
            "job_restarts",
            "Attempts after the first: automatic restarts, resumes, shrinks (status restarts)",
            self.per_job(|j| Some(u64::from(j.view.job.restarts))),
        )?;
        counters(
            e,
            "job_automatic_restarts",
            "Restarts the coordinator made after failures, bounded by --max_restarts (status automatic_restarts)",
            self.per_job(|j| Some(u64::from(j.view.job.automatic_restarts))),
        )?;
        counters(
            e,
            "job_shrinks",
            "Continuations on fewer ranks after a rank was lost for good (status shrinks)",
            self.per_job(|j| Some(u64::from(j.view.job.shrinks))),
        )?;
        let failures = self
            .jobs
            .iter()
            .flat_map(|j| {
                FailureKind::ALL.iter().map(move |kind| {
                    let labels = [("job", j.view.job.id.clone()), ("kind", kind.as_str().to_string())];
                    (labels, j.failures.get(kind).copied().unwrap_or(0))
                })
            })
            .collect();
        counters(
            e,
            "job_failures",
            "Rank failures by kind since this coordinator process started: reported by a worker, or a rank lost (PEER_LOST)",
            failures,
        )?;
        Ok(())
    }

    fn encode_workers(&self, e: &mut DescriptorEncoder) -> fmt::Result {
        let states = self
            .jobs
            .iter()
            .flat_map(|j| j.view.workers.iter().map(move |w| (j, w)))
            .flat_map(|(j, w)| {
                WORKER_STATES.iter().map(move |s| {
                    let labels = [
                        ("job", j.view.job.id.clone()),
                        ("rank", w.rank.to_string()),
                        ("state", worker_state_name(*s).to_string()),
                    ];
                    (labels, u64::from(w.state == *s))
                })
            })
            .collect();
        gauges(
            e,
            "worker_state",
            "1 for the worker's state (ALIVE, LOST, EXITED, FAILED), 0 for the others",
            None,
            states,
        )?;
        let seconds = Unit::Seconds;
        let now = self.now_ms;
        gauges(
            e,
            "worker_heartbeat_age",
            "Time since the worker's last heartbeat (status last_heartbeat_ms)",
            Some(&seconds),
            self.per_worker(|w| (w.last_heartbeat_ms > 0).then(|| (now - w.last_heartbeat_ms).max(0) as f64 / 1000.0)),
        )?;
        let bytes = Unit::Bytes;
        gauges(
            e,
            "worker_optimizer_state",
            "Optimizer state the rank holds: its ZeRO partition (status optimizer_state_bytes)",
            Some(&bytes),
            self.per_worker(|w| Some(w.optimizer_state_bytes)),
        )?;
        let infos: Vec<[(&'static str, String); 5]> = self
            .jobs
            .iter()
            .flat_map(|j| {
                j.view.workers.iter().map(move |w| {
                    [
                        ("job", j.view.job.id.clone()),
                        ("rank", w.rank.to_string()),
                        ("worker", format!("{}:{}", w.host, w.pid)),
                        ("host", w.host.clone()),
                        ("devices", w.devices.join(",")),
                    ]
                })
            })
            .collect();
        if !infos.is_empty() {
            let mut family = e.encode_descriptor(
                "worker",
                "The process holding the rank: host:pid and devices",
                None,
                MetricType::Info,
            )?;
            for labels in &infos {
                family.encode_info(labels)?;
            }
        }
        Ok(())
    }
}

impl Collector for Snapshot {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        self.encode_jobs(&mut encoder)?;
        self.encode_progress(&mut encoder)?;
        self.encode_restarts(&mut encoder)?;
        self.encode_workers(&mut encoder)
    }
}

/// The snapshot in the Prometheus text format 0.0.4 (see [`CONTENT_TYPE`]).
pub fn render(snapshot: Snapshot) -> Result<String, fmt::Error> {
    let mut registry = Registry::with_prefix(PREFIX);
    registry.register_collector(Box::new(snapshot));
    let mut text = String::new();
    prometheus_client::encoding::prometheus_text::encode(&mut text, &registry)?;
    Ok(text)
}
