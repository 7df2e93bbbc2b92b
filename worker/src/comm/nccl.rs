//! Thin FFI layer over NCCL through cudarc's dynamically loaded bindings (the `libnccl.so.2`
//! libtorch loads, linked as `kormlm-libs/libnccl.so` by `scripts/build.sh`; see
//! [`super::libraries`]). Collectives run in place on
//! flat CUDA buffers on libtorch's default (null) stream, so they are ordered after the
//! backward kernels without extra synchronisation; completion is awaited with an event polled
//! against a deadline, and a communicator that fails, times out or is given up (a
//! [`GroupAbort`]) is aborted. The communicator's set-up has the same deadline.

use super::{libraries, wait_for_set_up, Collective, CommError, GroupAbort};
use cudarc::nccl::{result, sys};
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

/// The NCCL version as NCCL encodes it (2.28.9 → 22809), or `None` when cudarc cannot bind
/// the NCCL libtorch loaded ([`libraries::check`] says why).
pub fn version() -> Option<i32> {
    libraries::check().ok()?;
    result::get_nccl_version().ok()
}

fn describe(e: result::NcclError) -> String {
    // SAFETY: ncclGetErrorString returns a pointer to a static, NUL-terminated string.
    let text = unsafe { std::ffi::CStr::from_ptr(sys::ncclGetErrorString(e.0)) };
    format!("{} ({:?})", text.to_string_lossy(), e.0)
}

fn failed(op: &'static str, message: impl Into<String>) -> CommError {
    CommError::Failed {
        op,
        message: message.into(),
    }
}

/// A fresh 128-byte `ncclUniqueId` (rank 0 creates it; the coordinator relays it).
pub fn unique_id() -> Result<Vec<u8>, CommError> {
    libraries::check().map_err(|message| failed("nccl_unique_id", message))?;
    let id = result::get_uniqueid().map_err(|e| failed("nccl_unique_id", describe(e)))?;
    Ok(id.internal.iter().map(|c| *c as u8).collect())
}

pub struct NcclGroup {
    comm: sys::ncclComm_t,
    rank: usize,
    world: usize,
    device: usize,
    timeout: Duration,
    aborted: bool,
    abort: GroupAbort,
}

// SAFETY: an NCCL communicator is not tied to the thread that created it; NcclGroup is owned
// by one thread at a time and every use goes through `&mut self`, so it is never used
// concurrently.
unsafe impl Send for NcclGroup {}

/// A communicator handed from the set-up thread to the caller.
struct InitializedComm(sys::ncclComm_t);

// SAFETY: the handle moves from the thread that initialised it to exactly one owner (the caller,
// or the abandon path that aborts it); it is never used by two threads.
unsafe impl Send for InitializedComm {}

impl NcclGroup {
    /// Joins the communicator described by `id` as `rank` of `world` on CUDA device `device`.
    /// `ncclCommInitRank` blocks until every rank has joined and cannot be interrupted, so it
    /// runs on its own thread: after `timeout` (a peer died between rendezvous and set-up) or
    /// an abort this returns an error, and a communicator that forms later is aborted there.
    pub fn init(
        device: usize,
        rank: usize,
        world: usize,
        id: &[u8],
        timeout: Duration,
        abort: &GroupAbort,
    ) -> Result<Self, CommError> {
        if id.len() != 128 {
            return Err(failed(
                "nccl_init",
                format!("the unique id has {} bytes, NCCL needs 128", id.len()),
            ));
        }
        let mut unique = sys::ncclUniqueId { internal: [0; 128] };
        for (dst, src) in unique.internal.iter_mut().zip(id) {
            *dst = *src as std::ffi::c_char;
        }
        let init = move || {
            cudarc::runtime::result::device::set(device as i32)
                .map_err(|e| failed("nccl_init", format!("cudaSetDevice({device}): {e:?}")))?;
            let mut comm: sys::ncclComm_t = std::ptr::null_mut();
            // SAFETY: `comm` is a valid out-pointer; the id came from ncclGetUniqueId on rank 0.
            unsafe { result::comm_init_rank(&mut comm, world as i32, unique, rank as i32) }
                .map_err(|e| failed("nccl_init", describe(e)))?;
            Ok(InitializedComm(comm))
        };
        let abandon = |comm: InitializedComm| {
            tracing::warn!("an NCCL communicator formed after its set-up was given up; aborting it");
            // SAFETY: the communicator was initialised and nobody else holds it.
            let _ = unsafe { result::comm_abort(comm.0) };
        };
        let comm = wait_for_set_up("nccl_init", timeout, abort, init, abandon)?.0;
        Ok(Self {
            comm,
            rank,
            world,
            device,
            timeout,
            aborted: false,
            abort: abort.clone(),
        })
    }

    fn check(&self, t: &Tensor, op: &'static str) -> Result<(), CommError> {
        if t.kind() != Kind::Float || t.device() != Device::Cuda(self.device) || !t.is_contiguous() {
            return Err(failed(
                op,
                format!("needs a contiguous fp32 tensor on cuda:{}", self.device),
            ));
        }
        if !t.numel().is_multiple_of(self.world) {
            return Err(failed(op, "the buffer length is not a multiple of the world size"));
        }
        Ok(())
    }

    fn abort(&mut self) {
        if !self.aborted {
            self.aborted = true;
            // SAFETY: the communicator was initialised and is aborted once.
            let _ = unsafe { result::comm_abort(self.comm) };
        }
    }

    /// Waits for the work queued on the default stream, failing on NCCL errors and on timeout.
    fn wait(&mut self, op: &'static str) -> Result<(), CommError> {
        use cudarc::runtime::sys as rt;
        let event = cudarc::runtime::result::event::create(0).map_err(|e| failed(op, format!("{e:?}")))?;
        // SAFETY: the event was just created; the null stream is libtorch's default stream.
        unsafe { cudarc::runtime::result::event::record(event, std::ptr::null_mut()) }
            .map_err(|e| failed(op, format!("{e:?}")))?;
        let started = Instant::now();
        let outcome = loop {
            // SAFETY: `event` is a live event recorded above.
            let state = unsafe { rt::cudaEventQuery(event) };
            if state == rt::cudaError::cudaSuccess {
                break Ok(());
            }
            if state != rt::cudaError::cudaErrorNotReady {
                break Err(failed(op, format!("CUDA error {state:?}")));
            }
            let mut async_error = sys::ncclResult_t::ncclSuccess;
            // SAFETY: `comm` is initialised; `async_error` is a valid out-pointer.
            unsafe { sys::ncclCommGetAsyncError(self.comm, &mut async_error) };
            if async_error == sys::ncclResult_t::ncclRemoteError {
                break Err(CommError::PeerLost {
                    op,
                    reason: describe(result::NcclError(async_error)),
                });
            }
            if async_error != sys::ncclResult_t::ncclSuccess && async_error != sys::ncclResult_t::ncclInProgress {
                break Err(failed(op, describe(result::NcclError(async_error))));
            }
            if self.abort.is_aborted() {
                break Err(CommError::Aborted { op });
            }
            if started.elapsed() > self.timeout {
                break Err(CommError::Timeout {
                    op,
                    seconds: self.timeout.as_secs(),
                });
            }
            std::thread::sleep(Duration::from_micros(200));
        };
        // SAFETY: the event is no longer used.
        let _ = unsafe { cudarc::runtime::result::event::destroy(event) };
        if outcome.is_err() {
            self.abort();
        }
        outcome
    }
}

impl Collective for NcclGroup {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn reduce_scatter_sum(&mut self, flat: &Tensor) -> Result<(), CommError> {
        self.check(flat, "reduce_scatter")?;
        let shard = flat.numel() / self.world;
        let base = flat.data_ptr();
        // SAFETY: `base` points at numel f32 on this rank's device; the receive range is this
        // rank's shard inside the same buffer (NCCL's in-place reduce-scatter layout).
        let status = unsafe {
            let recv = (base as *mut f32).add(self.rank * shard) as *mut std::ffi::c_void;
            result::reduce_scatter(
                base,
                recv,
                shard,
                sys::ncclDataType_t::ncclFloat32,
                sys::ncclRedOp_t::ncclSum,
                self.comm,
                std::ptr::null_mut(),
            )
        };
        status.map_err(|e| failed("reduce_scatter", describe(e)))?;
        self.wait("reduce_scatter")
    }

    fn all_gather(&mut self, flat: &Tensor) -> Result<(), CommError> {
        self.check(flat, "all_gather")?;
        let shard = flat.numel() / self.world;
        let base = flat.data_ptr();
        // SAFETY: as above; the send range is this rank's shard (in-place all-gather layout).
        let status = unsafe {
            let send = (base as *mut f32).add(self.rank * shard) as *const std::ffi::c_void;
            result::all_gather(
                send,
                base,
                shard,
                sys::ncclDataType_t::ncclFloat32,
                self.comm,
                std::ptr::null_mut(),
            )
        };
        status.map_err(|e| failed("all_gather", describe(e)))?;
        self.wait("all_gather")
    }

    fn all_reduce_sum(&mut self, flat: &Tensor) -> Result<(), CommError> {
        self.check(flat, "all_reduce")?;
        let base = flat.data_ptr();
        // SAFETY: in-place all-reduce over the whole buffer on this rank's device.
        let status = unsafe {
            result::all_reduce(
                base,
                base,
                flat.numel(),
                sys::ncclDataType_t::ncclFloat32,
                sys::ncclRedOp_t::ncclSum,
                self.comm,
                std::ptr::null_mut(),
            )
        };
        status.map_err(|e| failed("all_reduce", describe(e)))?;
        self.wait("all_reduce")
    }

    fn all_reduce_scalars(&mut self, values: &mut [f64]) -> Result<(), CommError> {
        let k = values.len();
        let table = Tensor::zeros([(self.world * k) as i64], (Kind::Double, Device::Cuda(self.device)));
        let mine = Tensor::from_slice(values).to_device(Device::Cuda(self.device));
        table.narrow(0, (self.rank * k) as i64, k as i64).copy_(&mine);
        let base = table.data_ptr();
        // SAFETY: in-place all-gather of `k` doubles per rank in a buffer of world·k doubles.
        let status = unsafe {
            let send = (base as *mut f64).add(self.rank * k) as *const std::ffi::c_void;
            result::all_gather(
                send,
                base,
                k,
                sys::ncclDataType_t::ncclFloat64,
                self.comm,
                std::ptr::null_mut(),
            )
        };
        status.map_err(|e| failed("all_reduce_scalars", describe(e)))?;
        self.wait("all_reduce_scalars")?;
        let gathered = Vec::<f64>::try_from(&table.to_device(Device::Cpu))
            .map_err(|e| failed("all_reduce_scalars", e.to_string()))?;
        for (i, v) in values.iter_mut().enumerate() {
            *v = (0..self.world).map(|r| gathered[r * k + i]).sum();
        }
        Ok(())
    }
}

impl Drop for NcclGroup {
    fn drop(&mut self) {
        if !self.aborted {
            // SAFETY: the communicator was initialised and not aborted; destroyed once.
            let _ = unsafe { result::comm_destroy(self.comm) };
        }
    }
}
