//! Running the job a worker was assigned: form the collective group (TCP ring on CPUs, NCCL on
//! GPUs) through the coordinator's rendezvous, then train on a separate thread while the daemon
//! keeps heart-beating with its progress.

use crate::comm::nccl::{self, NcclGroup};
use crate::comm::ring::{self, Ring};
use crate::comm::{Collective, SingleRank};
use crate::train::{self, ProgressEvent, TrainJob, TrainSummary};
use kormlm_proto::ds_config::ResolvedConfig;
use kormlm_proto::train_args::TrainArgs;
use kormlm_proto::v1::{Assignment, DeviceKind, RendezvousRequest};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tch::Device;

#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error("assignment: {0}")]
    Assignment(String),
    #[error("rendezvous: {0}")]
    Rendezvous(String),
    #[error(transparent)]
    Comm(#[from] crate::comm::CommError),
    #[error(transparent)]
    Train(#[from] train::TrainError),
}

/// How long a collective may wait for a peer before it fails.
pub fn collective_timeout() -> Duration {
    let seconds = std::env::var("KORMLM_COLLECTIVE_TIMEOUT_S")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(120);
    Duration::from_secs(seconds)
}

pub struct Prepared {
    pub resume_from: Option<PathBuf>,
    pub args: TrainArgs,
    pub config: ResolvedConfig,
    pub device: Device,
    pub output_dir: PathBuf,
}

pub fn prepare(assignment: &Assignment) -> Result<Prepared, JobError> {
    let args = TrainArgs::from_map(&assignment.args).map_err(JobError::Assignment)?;
    let config =
        ResolvedConfig::from_json(&assignment.resolved_config_json).map_err(|e| JobError::Assignment(e.to_string()))?;
    let device = match DeviceKind::try_from(assignment.device) {
        Ok(DeviceKind::Cuda) => Device::Cuda(assignment.cuda_devices.first().copied().unwrap_or(0) as usize),
        _ => Device::Cpu,
    };
    let output_dir = PathBuf::from(if assignment.output_dir.is_empty() {
        args.output_dir
            .clone()
            .unwrap_or_else(|| format!("{}/{}", args.model_dir, assignment.job_id))
    } else {
        assignment.output_dir.clone()
    });
    Ok(Prepared {
        resume_from: (!assignment.resume_from.is_empty()).then(|| PathBuf::from(&assignment.resume_from)),
        args,
        config,
        device,
        output_dir,
    })
}

fn ring_host(coordinator: &str) -> &'static str {
    if coordinator.contains("127.0.0.1") || coordinator.contains("localhost") || coordinator.contains("[::1]") {
        "127.0.0.1"
    } else {
        "0.0.0.0"
    }
}

/// Forms the group through the coordinator's rendezvous.
pub async fn form_group(
    client: &mut crate::daemon::CoordinatorClient,
    assignment: &Assignment,
    device: Device,
    coordinator_url: &str,
    token: &str,
) -> Result<Box<dyn Collective + Send>, JobError> {
    let (rank, world) = (assignment.rank as usize, assignment.world_size as usize);
    if world == 1 {
        return Ok(Box::new(SingleRank));
    }
    let timeout = collective_timeout();
    let mut request = RendezvousRequest {
        job_id: assignment.job_id.clone(),
        rank: assignment.rank,
        attempt: assignment.attempt,
        token: token.to_string(),
        ..Default::default()
    };
    match device {
        Device::Cuda(ordinal) => {
            if rank == 0 {
                request.nccl_unique_id = nccl::unique_id()?;
            }
            let info = client
                .rendezvous(request)
                .await
                .map_err(|s| JobError::Rendezvous(s.message().to_string()))?
                .into_inner();
            let id = info.nccl_unique_id;
            let group = tokio::task::spawn_blocking(move || NcclGroup::init(ordinal, rank, world, &id, timeout))
                .await
                .map_err(|e| JobError::Rendezvous(e.to_string()))??;
            Ok(Box::new(group))
        }
        _ => {
            let (listener, mut address) = ring::listen(ring_host(coordinator_url))?;
            if address.starts_with("0.0.0.0") {
                let host = nix::unistd::gethostname()
                    .ok()
                    .and_then(|h| h.into_string().ok())
                    .unwrap_or_default();
                address = address.replacen("0.0.0.0", &host, 1);
            }
            request.ring_address = address;
            let info = client
                .rendezvous(request)
                .await
                .map_err(|s| JobError::Rendezvous(s.message().to_string()))?
                .into_inner();
            let addresses = info.ring_addresses;
            let group = tokio::task::spawn_blocking(move || Ring::connect(listener, rank, &addresses, timeout))
                .await
                .map_err(|e| JobError::Rendezvous(e.to_string()))??;
            Ok(Box::new(group))
        }
    }
}

/// Trains on the current thread with `group`; progress goes to `progress`, `stop` requests a
/// stop after the current step.
pub fn run_training(
    prepared: &Prepared,
    mut group: Box<dyn Collective + Send>,
    progress: tokio::sync::watch::Sender<Option<ProgressEvent>>,
    stop: Arc<AtomicBool>,
) -> Result<TrainSummary, JobError> {
    let cache_dir = std::env::var_os("KORMLM_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/kormlm")))
        .map(|d| d.join("tokens"));
    let job = TrainJob {
        args: prepared.args.clone(),
        config: prepared.config.clone(),
        device: prepared.device,
        output_dir: prepared.output_dir.clone(),
        cache_dir,
        resume_from: prepared.resume_from.clone(),
    };
    let summary = train::train(
        &job,
        group.as_mut(),
        &mut |event| {
            progress.send_replace(Some(event.clone()));
        },
        &|| stop.load(Ordering::SeqCst),
    )?;
    Ok(summary)
}

/// This rank's chunks of an augmentation job, one part file per chunk (parts that already
/// exist, from an earlier attempt, are kept). Returns the summary as JSON.
pub fn run_augmentation(
    assignment: &Assignment,
    progress: tokio::sync::watch::Sender<Option<ProgressEvent>>,
    stop: Arc<AtomicBool>,
) -> Result<String, JobError> {
    use crate::augment::{parts, setup, Augmenter};
    use crate::model::LoadedModel;
    use kormlm_proto::augment_args::AugmentArgs;
    let augment = AugmentArgs::from_map(&assignment.args).map_err(JobError::Assignment)?;
    let train = TrainArgs::from_map(&assignment.args).map_err(JobError::Assignment)?;
    let (table, format, output, options) =
        setup(&augment, train.seed, train.max_seq_len as usize).map_err(|e| JobError::Assignment(e.to_string()))?;
    let device = match DeviceKind::try_from(assignment.device) {
        Ok(DeviceKind::Cuda) => Device::Cuda(assignment.cuda_devices.first().copied().unwrap_or(0) as usize),
        _ => Device::Cpu,
    };
    let model = LoadedModel::load(&train.model_name_or_path, train.revision.as_deref(), device)
        .map_err(|e| JobError::Assignment(e.to_string()))?;
    let n = options.num_augmentations;
    let augmenter = Augmenter::new(&model, options, device);
    let chunks = parts::rank_chunks(
        table.rows.len(),
        assignment.rank as usize,
        assignment.world_size as usize,
    );
    let total = chunks.len() as u64;
    let mut done = 0u64;
    let (summary, reused) = parts::run_parts(
        &augmenter,
        &table,
        chunks,
        &parts::PartsOutput {
            dir: &parts::parts_dir(&output),
            format,
            num_augmentations: n,
        },
        &|| stop.load(Ordering::SeqCst),
        &mut |_| {
            done += 1;
            progress.send_replace(Some(ProgressEvent {
                global_step: done,
                total_steps: total,
                ..Default::default()
            }));
        },
    )
    .map_err(|e| JobError::Assignment(e.to_string()))?;
    let summary = serde_json::json!({"summary": summary.finish(), "chunks": total, "reused_chunks": reused});
    Ok(summary.to_string())
}
