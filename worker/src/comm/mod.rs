//! Collective communication between the ranks of a job, behind one trait: NCCL on GPUs, a TCP
//! ring on CPUs, and the trivial single-rank group. Set-up and every collective have a deadline,
//! and a [`GroupAbort`] lets another thread make them give up at once.

pub mod libraries;
pub mod nccl;
pub mod ring;

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

/// Runs a blocking set-up call `f` that cannot be interrupted (NCCL's communicator init) on its
/// own thread and waits for it until `timeout` or an abort. A call given up on is left to
/// finish on its thread; `abandoned` then releases what it returns.
pub(crate) fn wait_for_set_up<T: Send + 'static>(
    op: &'static str,
    timeout: Duration,
    abort: &GroupAbort,
    f: impl FnOnce() -> Result<T, CommError> + Send + 'static,
    abandoned: impl FnOnce(T) + Send + 'static,
) -> Result<T, CommError> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name(op.into())
        .spawn(move || {
            if let Err(std::sync::mpsc::SendError(Ok(value))) = tx.send(f()) {
                abandoned(value);
            }
        })
        .map_err(|e| CommError::Failed {
            op,
            message: format!("cannot start the set-up thread: {e}"),
        })?;
    let deadline = Instant::now() + timeout;
    loop {
        match rx.recv_timeout(Duration::from_millis(20)) {
            Ok(result) => return result,
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                return Err(CommError::Failed {
                    op,
                    message: "the set-up thread ended without a result".into(),
                })
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                if abort.is_aborted() {
                    return Err(CommError::Aborted { op });
                }
                if Instant::now() >= deadline {
                    return Err(CommError::Timeout {
                        op,
                        seconds: timeout.as_secs(),
                    });
                }
            }
        }
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
    fn a_set_up_that_hangs_times_out_and_its_result_is_released() {
        let released = Arc::new(AtomicBool::new(false));
        let flag = released.clone();
        let started = Instant::now();
        let result = wait_for_set_up(
            "nccl_init",
            Duration::from_millis(300),
            &GroupAbort::default(),
            || {
                std::thread::sleep(Duration::from_millis(800));
                Ok(7)
            },
            move |value| flag.store(value == 7, Ordering::SeqCst),
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
            waited >= Duration::from_millis(300) && waited < Duration::from_millis(700),
            "{waited:?}"
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while !released.load(Ordering::SeqCst) {
            assert!(Instant::now() < deadline, "the late result was never released");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn a_set_up_returns_its_result_or_gives_up_on_abort() {
        let abort = GroupAbort::default();
        let ok = wait_for_set_up("init", Duration::from_secs(5), &abort, || Ok(3), |_| {});
        assert_eq!(ok.unwrap(), 3);
        let failed = wait_for_set_up::<u32>(
            "init",
            Duration::from_secs(5),
            &abort,
            || {
                Err(CommError::Failed {
                    op: "init",
                    message: "no device".into(),
                })
            },
            |_| {},
        );
        assert_eq!(failed.unwrap_err().to_string(), "collective init failed: no device");
        let aborter = abort.clone();
        let started = Instant::now();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            aborter.abort();
        });
        let aborted = wait_for_set_up(
            "init",
            Duration::from_secs(30),
            &abort,
            || {
                std::thread::sleep(Duration::from_secs(2));
                Ok(1)
            },
            |_| {},
        );
        assert!(matches!(aborted, Err(CommError::Aborted { op: "init" })), "{aborted:?}");
        assert!(started.elapsed() < Duration::from_secs(1), "{:?}", started.elapsed());
    }
}
