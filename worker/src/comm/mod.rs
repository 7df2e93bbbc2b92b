//! Collective communication between the ranks of a job, behind one trait: NCCL on GPUs, a TCP
//! ring on CPUs, and the trivial single-rank group. Set-up and every collective have a deadline,
//! and a [`GroupAbort`] lets another thread make them give up at once.

pub mod deadlines;
pub mod libraries;
pub mod nccl;
pub mod ring;
pub mod ring_handshake;

use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

#[derive(Debug, thiserror::Error)]
pub enum CommError {
    #[error("collective {op} failed: {message}")]
    Failed { op: &'static str, message: String },
    #[error("collective {op} timed out after {seconds} s: a peer is gone or stuck")]
    Timeout { op: &'static str, seconds: u64 },
    /// A peer closed its connection or NCCL reports it gone: it exited or was killed.
    #[error("collective {op} failed: {reason}")]
    PeerLost { op: &'static str, reason: String },
    /// This worker gave the group up (it dropped the work: a stale attempt, an abort).
    #[error("collective {op} aborted: this worker dropped the work")]
    Aborted { op: &'static str },
}

/// Makes a group give up from another thread: set-up stops waiting for peers, and blocked
/// collectives return at once with [`CommError::Aborted`]. Cloned into the group; the daemon
/// keeps a clone to drop stale work.
#[derive(Debug, Clone, Default)]
pub struct GroupAbort {
    inner: Arc<AbortState>,
}

#[derive(Debug, Default)]
struct AbortState {
    aborted: AtomicBool,
    /// Clones of the group's sockets: shutting them down wakes a thread blocked on them.
    sockets: Mutex<Vec<TcpStream>>,
}

impl GroupAbort {
    pub fn abort(&self) {
        self.inner.aborted.store(true, Ordering::SeqCst);
        let sockets = self.inner.sockets.lock().unwrap_or_else(|e| e.into_inner());
        for socket in sockets.iter() {
            let _ = socket.shutdown(Shutdown::Both);
        }
    }

    pub fn is_aborted(&self) -> bool {
        self.inner.aborted.load(Ordering::SeqCst)
    }

    /// Registers a socket of the group: an abort, before or after, shuts it down.
    pub(crate) fn watch(&self, socket: &TcpStream) -> std::io::Result<()> {
        let clone = socket.try_clone()?;
        let mut sockets = self.inner.sockets.lock().unwrap_or_else(|e| e.into_inner());
        // Checked under the lock `abort` takes after setting the flag: no socket is missed.
        if self.is_aborted() {
            let _ = clone.shutdown(Shutdown::Both);
        }
        sockets.push(clone);
        Ok(())
    }
}

/// Polls a set-up that runs in the background (NCCL's non-blocking communicator init) until
/// `poll` says it is done, fails, `timeout` passes or the group is aborted. On a timeout or an
/// abort, `give_up` releases it (NCCL: `ncclCommAbort`) before the error returns, so no thread is
/// left blocked on a peer that died between the rendezvous and the set-up.
pub(crate) fn poll_set_up(
    op: &'static str,
    timeout: Duration,
    abort: &GroupAbort,
    mut poll: impl FnMut() -> Result<bool, CommError>,
    give_up: impl FnOnce(),
) -> Result<(), CommError> {
    let deadline = Instant::now() + timeout;
    loop {
        match poll() {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => {
                give_up();
                return Err(e);
            }
        }
        if abort.is_aborted() {
            give_up();
            return Err(CommError::Aborted { op });
        }
        if Instant::now() >= deadline {
            give_up();
            return Err(CommError::Timeout {
                op,
                seconds: timeout.as_secs(),
            });
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Collectives over flat fp32 buffers whose length is a multiple of the world size; rank r owns
/// the r-th equal shard.
pub trait Collective {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// In place: afterwards shard r of `flat` holds the sum over ranks of shard r.
    fn reduce_scatter_sum(&mut self, flat: &Tensor) -> Result<(), CommError>;
    /// In place: every rank's shard r is replaced by rank r's shard r.
    fn all_gather(&mut self, flat: &Tensor) -> Result<(), CommError>;
    /// In place: every element becomes the sum over ranks.
    fn all_reduce_sum(&mut self, flat: &Tensor) -> Result<(), CommError>;
    /// Sums a few scalars over ranks.
    fn all_reduce_scalars(&mut self, values: &mut [f64]) -> Result<(), CommError>;
    /// How long a collective waits for the peers.
    fn timeout(&self) -> Duration;
    /// Changes how long the next collectives wait for the peers.
    fn set_timeout(&mut self, timeout: Duration) -> Result<(), CommError>;
}

/// Sums `values` over ranks, waiting up to `timeout` rather than the group's usual deadline:
/// the barrier after work only some ranks do (see [`deadlines::saving_timeout`]).
pub fn all_reduce_scalars_within(
    comm: &mut dyn Collective,
    values: &mut [f64],
    timeout: Duration,
) -> Result<(), CommError> {
    let usual = comm.timeout();
    comm.set_timeout(timeout)?;
    let summed = comm.all_reduce_scalars(values);
    let restored = comm.set_timeout(usual);
    summed.and(restored)
}

/// A group of one: every collective is the identity.
#[derive(Debug, Default)]
pub struct SingleRank;

impl Collective for SingleRank {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn reduce_scatter_sum(&mut self, _flat: &Tensor) -> Result<(), CommError> {
        Ok(())
    }
    fn all_gather(&mut self, _flat: &Tensor) -> Result<(), CommError> {
        Ok(())
    }
    fn all_reduce_sum(&mut self, _flat: &Tensor) -> Result<(), CommError> {
        Ok(())
    }
    fn all_reduce_scalars(&mut self, _values: &mut [f64]) -> Result<(), CommError> {
        Ok(())
    }
    fn timeout(&self) -> Duration {
        Duration::ZERO
    }
    fn set_timeout(&mut self, _timeout: Duration) -> Result<(), CommError> {
        Ok(())
    }
}

/// The elements of a contiguous fp32 CPU tensor as a mutable slice, for the TCP ring.
#[allow(clippy::mut_from_ref)] // the tensor's storage is shared by design; see SAFETY
pub(crate) fn tensor_f32_mut<'a>(t: &'a Tensor, op: &'static str) -> Result<&'a mut [f32], CommError> {
    if t.kind() != Kind::Float || t.device() != Device::Cpu || !t.is_contiguous() {
        return Err(CommError::Failed {
            op,
            message: format!(
                "needs a contiguous fp32 CPU tensor, got {:?} on {:?}",
                t.kind(),
                t.device()
            ),
        });
    }
    // SAFETY: the tensor is contiguous fp32 on the CPU, so data_ptr points at numel initialised
    // f32 values kept alive by `t` for 'a. While the slice lives, the calling training thread
    // is inside this collective and no other code reads or writes the buffer.
    Ok(unsafe { std::slice::from_raw_parts_mut(t.data_ptr() as *mut f32, t.numel()) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_set_up_that_never_completes_times_out_and_is_given_up() {
        let given_up = AtomicBool::new(false);
        let started = Instant::now();
        let result = poll_set_up(
            "nccl_init",
            Duration::from_millis(300),
            &GroupAbort::default(),
            || Ok(false),
            || given_up.store(true, Ordering::SeqCst),
        );
        let waited = started.elapsed();
        assert!(
            matches!(
                result,
                Err(CommError::Timeout {
                    op: "nccl_init",
                    seconds: 0
                })
            ),
            "{result:?}"
        );
        assert!(
            waited >= Duration::from_millis(300) && waited < Duration::from_secs(5),
            "{waited:?}"
        );
        assert!(given_up.load(Ordering::SeqCst), "the communicator was not aborted");
    }

    #[test]
    fn a_set_up_completes_fails_or_gives_up_on_abort() {
        let abort = GroupAbort::default();
        let mut polls = 0;
        let given_up = AtomicBool::new(false);
        poll_set_up(
            "init",
            Duration::from_secs(5),
            &abort,
            || {
                polls += 1;
                Ok(polls == 3)
            },
            || given_up.store(true, Ordering::SeqCst),
        )
        .unwrap();
        assert_eq!(polls, 3);
        assert!(!given_up.load(Ordering::SeqCst), "a completed set-up is kept");
        let failed = poll_set_up(
            "init",
            Duration::from_secs(5),
            &abort,
            || {
                Err(CommError::Failed {
                    op: "init",
                    message: "no device".into(),
                })
            },
            || given_up.store(true, Ordering::SeqCst),
        );
        assert_eq!(failed.unwrap_err().to_string(), "collective init failed: no device");
        assert!(given_up.swap(false, Ordering::SeqCst), "a failed set-up is aborted");
        let aborter = abort.clone();
        let started = Instant::now();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            aborter.abort();
        });
        let aborted = poll_set_up(
            "init",
            Duration::from_secs(30),
            &abort,
            || Ok(false),
            || given_up.store(true, Ordering::SeqCst),
        );
        assert!(matches!(aborted, Err(CommError::Aborted { op: "init" })), "{aborted:?}");
        assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
        assert!(given_up.load(Ordering::SeqCst));
    }
}
