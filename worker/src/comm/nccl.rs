//! Thin FFI layer over NCCL through cudarc's dynamically loaded bindings (the `libnccl.so.2`
//! libtorch loads, linked as `kormlm-libs/libnccl.so` by `scripts/build.sh`; see
//! [`super::libraries`]). Collectives run in place on
//! flat CUDA buffers on libtorch's default (null) stream, so they are ordered after the
//! backward kernels without extra synchronisation; completion is awaited with an event polled
//! against a deadline, and a communicator that fails, times out or is given up (a
//! [`GroupAbort`]) is aborted. The communicator is created non-blocking
//! (`ncclCommInitRankConfig`, `blocking = 0`) and polled with `ncclCommGetAsyncError` against
//! the same deadline. Every CUDA call first selects the group's device on the calling thread.
//! A group is never destroyed (`ncclCommDestroy` waits for the peers): dropping it aborts the
//! communicator on a detached thread, so an error is reported and the process can exit even
//! when a peer is gone.

use super::{libraries, poll_set_up, Collective, CommError, GroupAbort};
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
    /// The device buffer `all_reduce_scalars` gathers into, kept between calls.
    scalars: Option<Tensor>,
}

/// `NCCL_CONFIG_INITIALIZER` of nccl.h 2.28 with `blocking = 0`: every other field undefined,
/// so NCCL keeps its defaults and the `NCCL_*` environment variables.
fn non_blocking_config() -> sys::ncclConfig_t {
    const UNDEF: std::ffi::c_int = std::ffi::c_int::MIN;
    sys::ncclConfig_t {
        size: std::mem::size_of::<sys::ncclConfig_t>(),
        magic: 0xcafe_beef,
        // NCCL_VERSION(2, 28, 0): the layout of these bindings' config struct.
        version: 22800,
        blocking: 0,
        cgaClusterSize: UNDEF,
        minCTAs: UNDEF,
        maxCTAs: UNDEF,
        netName: std::ptr::null(),
        splitShare: UNDEF,
        trafficClass: UNDEF,
        commName: std::ptr::null(),
        collnetEnable: UNDEF,
        CTAPolicy: UNDEF,
        shrinkShare: UNDEF,
        nvlsCTAs: UNDEF,
        nChannelsPerNetPeer: UNDEF,
        nvlinkCentricSched: UNDEF,
    }
}

/// Makes `device` current on the calling thread (CUDA's current device is per thread).
fn select(device: usize, op: &'static str) -> Result<(), CommError> {
    cudarc::runtime::result::device::set(device as i32)
        .map_err(|e| failed(op, format!("cudaSetDevice({device}): {e:?}")))
}

/// A call on a non-blocking communicator: `InProgress` means queued (completion is polled).
fn queued(op: &'static str, status: Result<result::NcclStatus, result::NcclError>) -> Result<(), CommError> {
    status.map(|_| ()).map_err(|e| failed(op, describe(e)))
}

/// The communicator's pending error: `Ok(true)` when idle, `Ok(false)` while in progress.
fn async_state(comm: sys::ncclComm_t, op: &'static str) -> Result<bool, CommError> {
    let mut state = sys::ncclResult_t::ncclSuccess;
    // SAFETY: `comm` is a communicator NCCL handed out; `state` is a valid out-pointer.
    let polled = unsafe { sys::ncclCommGetAsyncError(comm, &mut state) };
    if polled != sys::ncclResult_t::ncclSuccess {
        return Err(failed(op, describe(result::NcclError(polled))));
    }
    match state {
        sys::ncclResult_t::ncclSuccess => Ok(true),
        sys::ncclResult_t::ncclInProgress => Ok(false),
        sys::ncclResult_t::ncclRemoteError => Err(CommError::PeerLost {
            op,
            reason: describe(result::NcclError(state)),
        }),
        other => Err(failed(op, describe(result::NcclError(other)))),
    }
}

/// Aborts `comm` on a detached thread: `ncclCommAbort` returns once NCCL's own threads stop,
/// which the caller (reporting an error, or exiting) must not wait for.
fn abort_detached(comm: InitializedComm) {
    let spawned = std::thread::Builder::new().name("nccl_abort".into()).spawn(move || {
        let comm = comm;
        // SAFETY: the communicator was handed out by NCCL and is aborted once, by this thread.
        let _ = unsafe { result::comm_abort(comm.0) };
    });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start a thread to abort the NCCL communicator; leaving it to the exit");
    }
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
    /// Joins the communicator described by `id` as `rank` of `world` on CUDA device `device`,
    /// without blocking: after `timeout` (a peer died between rendezvous and set-up) or an
    /// abort, the half-formed communicator is aborted and this returns an error.
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
        select(device, "nccl_init")?;
        let mut config = non_blocking_config();
        let mut comm: sys::ncclComm_t = std::ptr::null_mut();
        // SAFETY: `comm` and `config` are valid for the call; the id came from ncclGetUniqueId on
        // rank 0. Non-blocking: NCCL returns at once and finishes the set-up on its own threads.
        let started = unsafe { sys::ncclCommInitRankConfig(&mut comm, world as i32, unique, rank as i32, &mut config) };
        if started != sys::ncclResult_t::ncclSuccess && started != sys::ncclResult_t::ncclInProgress {
            if !comm.is_null() {
                abort_detached(InitializedComm(comm));
            }
            return Err(failed("nccl_init", describe(result::NcclError(started))));
        }
        poll_set_up(
            "nccl_init",
            timeout,
            abort,
            || async_state(comm, "nccl_init"),
            || abort_detached(InitializedComm(comm)),
        )?;
        Ok(Self {
            comm,
            rank,
            world,
            device,
            timeout,
            aborted: false,
            abort: abort.clone(),
            scalars: None,
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
            abort_detached(InitializedComm(self.comm));
        }
    }

    /// Waits for the work queued on the default stream, failing on NCCL errors and on timeout.
    fn wait(&mut self, op: &'static str) -> Result<(), CommError> {
        use cudarc::runtime::sys as rt;
        select(self.device, op)?;
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
            if let Err(e) = async_state(self.comm, op) {
                break Err(e);
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
        select(self.device, "reduce_scatter")?;
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
        queued("reduce_scatter", status)?;
        self.wait("reduce_scatter")
    }

    fn all_gather(&mut self, flat: &Tensor) -> Result<(), CommError> {
        self.check(flat, "all_gather")?;
        select(self.device, "all_gather")?;
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
        queued("all_gather", status)?;
        self.wait("all_gather")
    }

    fn all_reduce_sum(&mut self, flat: &Tensor) -> Result<(), CommError> {
        self.check(flat, "all_reduce")?;
        select(self.device, "all_reduce")?;
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
        queued("all_reduce", status)?;
        self.wait("all_reduce")
    }

    fn all_reduce_scalars(&mut self, values: &mut [f64]) -> Result<(), CommError> {
        let k = values.len();
        select(self.device, "all_reduce_scalars")?;
        let size = (self.world * k) as i64;
        let device = Device::Cuda(self.device);
        // One buffer for the run (the scalars are the same few every step), not one per call.
        let table = match self.scalars.take() {
            Some(table) if table.size() == [size] => table,
            _ => Tensor::zeros([size], (Kind::Double, device)),
        };
        table
            .narrow(0, (self.rank * k) as i64, k as i64)
            .copy_(&Tensor::from_slice(values));
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
        queued("all_reduce_scalars", status)?;
        self.wait("all_reduce_scalars")?;
        let gathered = Vec::<f64>::try_from(&table.to_device(Device::Cpu))
            .map_err(|e| failed("all_reduce_scalars", e.to_string()))?;
        for (i, v) in values.iter_mut().enumerate() {
            *v = (0..self.world).map(|r| gathered[r * k + i]).sum();
        }
        self.scalars = Some(table);
        Ok(())
    }

    fn timeout(&self) -> Duration {
        self.timeout
    }

    fn set_timeout(&mut self, timeout: Duration) -> Result<(), CommError> {
        self.timeout = timeout;
        Ok(())
    }
}

impl Drop for NcclGroup {
    /// Aborts, never destroys: `ncclCommDestroy` waits for the peers, and a rank leaving on an
    /// error (its report already sent) must not hang on one that is gone.
    fn drop(&mut self) {
        self.abort();
    }
}
