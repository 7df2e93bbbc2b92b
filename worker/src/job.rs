//! Running the work a worker was assigned: form the collective group (TCP ring on CPUs, NCCL on
//! GPUs) through the coordinator's rendezvous, then train, or augment this rank's chunks, on the
//! thread the daemon started for it while it keeps heart-beating with the progress.

use crate::client::CoordinatorClient;
use crate::comm::nccl::{self, NcclGroup};
use crate::comm::ring::{self, Ring};
use crate::comm::ring_handshake::RingSecret;
use crate::comm::{deadlines, Collective, CommError, GroupAbort, SingleRank};
use crate::error::{JobError, WorkerError};
use crate::train::{self, ProgressEvent, TrainError, TrainJob, TrainSummary};
use crate::work::{AugmentJob, AugmentOutcome};
use kormlm_proto::v1::{Assignment, RendezvousRequest};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, ToSocketAddrs, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tch::Device;

/// Where this worker's CPU ring listens: one interface, never all of them — the one given with
/// `--ring-bind`, or else the one this host uses to reach the coordinator (its peers reach the
/// coordinator on the same network, so they reach this address too).
#[derive(Debug, Clone, PartialEq)]
pub struct RingBind {
    pub explicit: Option<IpAddr>,
    pub coordinator_url: String,
}

impl RingBind {
    pub fn address(&self) -> Result<IpAddr, CommError> {
        if let Some(ip) = self.explicit {
            return Ok(ip);
        }
        towards(&self.coordinator_url)
    }
}

/// The local address of this host's route to the coordinator at `url` (`http(s)://host:port`).
/// A connected UDP socket asks the kernel for the route without sending anything.
fn towards(url: &str) -> Result<IpAddr, CommError> {
    let unroutable = |message: String| {
        CommError::Failed {
        op: "listen",
        message: format!("cannot tell which interface reaches the coordinator at {url} ({message}); give the ring's address with --ring-bind"),
    }
    };
    let authority = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority = authority.split('/').next().unwrap_or(authority);
    let target = authority
        .to_socket_addrs()
        .map_err(|e| unroutable(e.to_string()))?
        .next()
        .ok_or_else(|| unroutable("no address".into()))?;
    let any: IpAddr = if target.is_ipv4() {
        Ipv4Addr::UNSPECIFIED.into()
    } else {
        Ipv6Addr::UNSPECIFIED.into()
    };
    let socket = UdpSocket::bind((any, 0)).map_err(|e| unroutable(e.to_string()))?;
    socket.connect(target).map_err(|e| unroutable(e.to_string()))?;
    Ok(socket.local_addr().map_err(|e| unroutable(e.to_string()))?.ip())
}

/// Forms the group through the coordinator's rendezvous. The set-up has the collective
/// deadline; `abort` makes it, and later the group's collectives, give up at once.
pub async fn form_group(
    client: &mut CoordinatorClient,
    assignment: &Assignment,
    device: Device,
    ring_bind: &RingBind,
    abort: &GroupAbort,
) -> Result<Box<dyn Collective + Send>, JobError> {
    let (rank, world) = (assignment.rank as usize, assignment.world_size as usize);
    if world == 1 {
        return Ok(Box::new(SingleRank));
    }
    let timeout = deadlines::collective_timeout()?;
    let mut request = RendezvousRequest {
        job_id: assignment.job_id.clone(),
        rank: assignment.rank,
        attempt: assignment.attempt,
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
                .map_err(JobError::Rendezvous)?
                .into_inner();
            let (id, abort) = (info.nccl_unique_id, abort.clone());
            let group =
                tokio::task::spawn_blocking(move || NcclGroup::init(ordinal, rank, world, &id, timeout, &abort))
                    .await
                    .map_err(JobError::GroupSetUp)??;
            Ok(Box::new(group))
        }
        _ => {
            let (listener, address) = ring::listen(ring_bind.address()?)?;
            tracing::info!(address = %address, "ring listening");
            request.ring_address = address;
            let info = client
                .rendezvous(request)
                .await
                .map_err(JobError::Rendezvous)?
                .into_inner();
            let secret = RingSecret::new(&info.ring_secret).map_err(|e| CommError::Failed {
                op: "rendezvous",
                message: e.to_string(),
            })?;
            let (addresses, abort) = (info.ring_addresses, abort.clone());
            let group = tokio::task::spawn_blocking(move || {
                Ring::connect_abortable(listener, rank, &addresses, &secret, timeout, &abort)
            })
            .await
            .map_err(JobError::GroupSetUp)??;
            Ok(Box::new(group))
        }
    }
}

/// Trains on the current thread with `group`; progress goes to `progress`, `stop` requests a
/// stop after the current step.
pub fn run_training(
    job: &TrainJob,
    group: &mut dyn Collective,
    progress: tokio::sync::watch::Sender<Option<ProgressEvent>>,
    stop: Arc<AtomicBool>,
) -> Result<TrainSummary, TrainError> {
    train::train(
        job,
        group,
        &mut |event| {
            progress.send_replace(Some(event.clone()));
        },
        &|| stop.load(Ordering::SeqCst),
    )
}

/// Trains a classifier on the current thread with `group` (see [`run_training`]).
pub fn run_classifier_training(
    job: &crate::classify::train::ClassifyTrainJob,
    group: &mut dyn Collective,
    progress: tokio::sync::watch::Sender<Option<ProgressEvent>>,
    stop: Arc<AtomicBool>,
) -> Result<crate::classify::train::ClassifySummary, WorkerError> {
    Ok(crate::classify::train::train(
        job,
        group,
        &mut |event| {
            progress.send_replace(Some(event.clone()));
        },
        &|| stop.load(Ordering::SeqCst),
    )?)
}

/// Rank `rank` of `world`'s chunks of an augmentation job, one part file per chunk (parts an
/// earlier attempt wrote under the same manifest are kept).
pub fn run_augmentation(
    job: &AugmentJob,
    (rank, world): (usize, usize),
    progress: tokio::sync::watch::Sender<Option<ProgressEvent>>,
    stop: Arc<AtomicBool>,
) -> Result<AugmentOutcome, WorkerError> {
    use crate::augment::{parts, Augmenter};
    let (table, format, output, options) = job.setup()?;
    let manifest = parts::manifest(
        &job.model,
        job.revision.as_deref(),
        &job.args,
        &options,
        format,
        table.rows.len(),
    )?;
    let model = job.load_model()?;
    let n = options.num_augmentations;
    let augmenter = Augmenter::new(&model, options, job.device);
    let chunks = parts::rank_chunks(table.rows.len(), rank, world);
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
            manifest: &manifest,
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
    )?;
    Ok(AugmentOutcome {
        summary: summary.finish(),
        chunks: total,
        completed_chunks: done,
        reused_chunks: reused,
    })
}

/// Rank `rank` of `world`'s items of a downstream experiment (items an earlier attempt finished
/// are kept); the rank that finds every item done writes the report.
pub fn run_augment_eval(
    job: &crate::augment_eval::AugmentEvalJob,
    ranks: (usize, usize),
    progress: tokio::sync::watch::Sender<Option<ProgressEvent>>,
    stop: Arc<AtomicBool>,
) -> Result<crate::augment_eval::AugmentEvalOutcome, WorkerError> {
    Ok(crate::augment_eval::run(
        job,
        ranks,
        &|| stop.load(Ordering::SeqCst),
        &mut |done, total| {
            progress.send_replace(Some(ProgressEvent {
                global_step: done as u64,
                total_steps: total as u64,
                ..Default::default()
            }));
        },
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ring_listens_on_the_interface_towards_the_coordinator_or_the_one_given() {
        let bind = |explicit: Option<IpAddr>, url: &str| {
            RingBind {
                explicit,
                coordinator_url: url.into(),
            }
            .address()
        };
        let loopback: IpAddr = Ipv4Addr::LOCALHOST.into();
        assert_eq!(bind(None, "http://127.0.0.1:50051").unwrap(), loopback);
        assert!(bind(None, "https://localhost:50051/").unwrap().is_loopback());
        assert_eq!(
            bind(None, "http://[::1]:50051").unwrap(),
            IpAddr::from(Ipv6Addr::LOCALHOST)
        );
        let given: IpAddr = "127.0.0.2".parse().unwrap();
        assert_eq!(bind(Some(given), "http://unresolvable.invalid:1").unwrap(), given);
        let err = bind(None, "http://unresolvable.invalid:1").unwrap_err().to_string();
        assert!(err.contains("give the ring's address with --ring-bind"), "{err}");
    }
}
