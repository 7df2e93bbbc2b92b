//! Forming a job's collective group for one attempt: every rank arrives with the address its ring
//! listens on (rank 0 on CUDA also with NCCL's unique id); when the last rank arrives, all of
//! them receive the group's data, with the round's ring secret. A newer attempt replaces an
//! older round; a round that does not complete within the deadline fails for everyone waiting
//! on it.

use crate::error::CoordinatorError;
use std::time::Duration;
use tokio::sync::watch;

/// A rank joining the rendezvous of an attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Arrival {
    pub job_id: String,
    pub rank: u32,
    pub attempt: u32,
    /// Rank 0 on CUDA: its freshly created `ncclUniqueId`.
    pub nccl_unique_id: Vec<u8>,
    /// CPU ring: the address this rank listens on.
    pub ring_address: String,
}

/// Bytes of a ring secret (256 bits).
pub const RING_SECRET_BYTES: usize = 32;

/// The secret with which the ranks of one round prove to each other that the coordinator
/// admitted them to the group. Its `Debug` does not show it, so it cannot reach a log.
#[derive(Clone, PartialEq, Eq)]
pub struct RingSecret(Vec<u8>);

impl RingSecret {
    /// A fresh secret from the operating system's random source.
    fn generate() -> Result<Self, CoordinatorError> {
        let mut bytes = vec![0u8; RING_SECRET_BYTES];
        getrandom::fill(&mut bytes).map_err(|e| CoordinatorError::Random(e.to_string()))?;
        Ok(Self(bytes))
    }

    pub fn into_bytes(self) -> Vec<u8> {
        self.0
    }
}

impl std::fmt::Debug for RingSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RingSecret(<{} bytes>)", self.0.len())
    }
}

/// What every rank of a complete round receives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    pub attempt: u32,
    pub nccl_unique_id: Vec<u8>,
    /// Indexed by rank.
    pub ring_addresses: Vec<String>,
    /// The round's ring secret.
    pub ring_secret: RingSecret,
}

/// The rendezvous of one attempt. Dropping it (the job ended) wakes its waiters with an error.
#[derive(Debug)]
pub struct Round {
    attempt: u32,
    nccl_unique_id: Vec<u8>,
    addresses: Vec<String>,
    arrived: Vec<bool>,
    secret: RingSecret,
    done: watch::Sender<Option<Group>>,
}

impl Round {
    fn new(attempt: u32, world: usize) -> Result<Self, CoordinatorError> {
        Ok(Self {
            attempt,
            nccl_unique_id: Vec::new(),
            addresses: vec![String::new(); world],
            arrived: vec![false; world],
            secret: RingSecret::generate()?,
            done: watch::channel(None).0,
        })
    }
}

/// Records an arrival in the job's round (`round`), starting a new round for a newer attempt;
/// returns where the group appears once every rank of `0..world` has arrived.
pub fn arrive(
    round: &mut Option<Round>,
    world: usize,
    arrival: &Arrival,
) -> Result<watch::Receiver<Option<Group>>, CoordinatorError> {
    let rank = arrival.rank as usize;
    if rank >= world {
        return Err(CoordinatorError::InvalidRequest(format!(
            "rank {} is out of range",
            arrival.rank
        )));
    }
    if round.as_ref().is_none_or(|r| r.attempt < arrival.attempt) {
        *round = None;
    }
    let round = match round {
        Some(round) => round,
        None => round.insert(Round::new(arrival.attempt, world)?),
    };
    if round.attempt != arrival.attempt {
        return Err(CoordinatorError::Refused(format!(
            "rendezvous attempt {} is over; the group is forming attempt {}",
            arrival.attempt, round.attempt
        )));
    }
    if rank == 0 && !arrival.nccl_unique_id.is_empty() {
        round.nccl_unique_id = arrival.nccl_unique_id.clone();
    }
    round.addresses[rank] = arrival.ring_address.clone();
    round.arrived[rank] = true;
    if round.arrived.iter().all(|a| *a) {
        round.done.send_replace(Some(Group {
            attempt: round.attempt,
            nccl_unique_id: round.nccl_unique_id.clone(),
            ring_addresses: round.addresses.clone(),
            ring_secret: round.secret.clone(),
        }));
    }
    Ok(round.done.subscribe())
}

/// Waits for the group of `attempt`, at most `deadline`.
pub async fn wait(
    mut done: watch::Receiver<Option<Group>>,
    deadline: Duration,
    attempt: u32,
) -> Result<Group, CoordinatorError> {
    let complete = async move { done.wait_for(|g| g.is_some()).await.map(|g| g.clone()) };
    match tokio::time::timeout(deadline, complete).await {
        Ok(Ok(Some(group))) => Ok(group),
        Ok(_) => Err(CoordinatorError::Aborted(
            "the job ended while its workers were forming the group".into(),
        )),
        Err(_) => Err(CoordinatorError::Timeout(format!(
            "not every rank joined rendezvous attempt {attempt} within {} s",
            deadline.as_secs()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arrival(rank: u32, attempt: u32) -> Arrival {
        Arrival {
            job_id: "job-1".into(),
            rank,
            attempt,
            nccl_unique_id: vec![],
            ring_address: format!("127.0.0.1:{}", 9000 + rank),
        }
    }

    #[test]
    fn a_newer_attempt_replaces_the_round_and_an_older_one_is_refused() {
        let mut round = None;
        let first = arrive(&mut round, 2, &arrival(0, 1)).unwrap();
        assert!(first.borrow().is_none());
        arrive(&mut round, 2, &arrival(0, 2)).unwrap();
        let err = arrive(&mut round, 2, &arrival(1, 1)).unwrap_err().to_string();
        assert_eq!(err, "rendezvous attempt 1 is over; the group is forming attempt 2");
        let done = arrive(&mut round, 2, &arrival(1, 2)).unwrap();
        let group = done.borrow().clone().unwrap();
        assert_eq!((group.attempt, group.ring_addresses.len()), (2, 2));
        let err = arrive(&mut round, 2, &arrival(2, 2)).unwrap_err().to_string();
        assert_eq!(err, "rank 2 is out of range");
    }

    #[test]
    fn every_round_draws_its_own_ring_secret_which_debug_does_not_show() {
        let group = |attempt: u32| {
            let mut round = None;
            arrive(&mut round, 2, &arrival(0, attempt)).unwrap();
            let done = arrive(&mut round, 2, &arrival(1, attempt)).unwrap();
            let group = done.borrow().clone().unwrap();
            group
        };
        let (first, second) = (group(1), group(2));
        assert_eq!(format!("{:?}", first.ring_secret), "RingSecret(<32 bytes>)");
        assert!(!format!("{first:?}").contains(&format!("{:?}", first.ring_secret.clone().into_bytes())));
        let (a, b) = (first.ring_secret.into_bytes(), second.ring_secret.into_bytes());
        assert_eq!(a.len(), RING_SECRET_BYTES);
        assert_ne!(a, b, "a new attempt gets a new secret");
        assert_ne!(a, vec![0u8; RING_SECRET_BYTES]);
    }

    #[tokio::test]
    async fn an_ended_round_wakes_its_waiters() {
        let mut round = None;
        let done = arrive(&mut round, 2, &arrival(0, 1)).unwrap();
        drop(round);
        let err = wait(done, Duration::from_secs(5), 1).await.unwrap_err();
        assert!(matches!(err, CoordinatorError::Aborted(_)), "{err}");
    }
}
