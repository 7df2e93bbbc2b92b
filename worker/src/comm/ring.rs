//! Collectives over a TCP ring for CPU workers: rank r sends to r+1 and receives from r−1.
//! Reduce-scatter and all-gather take n−1 steps each; every send runs on its own thread while
//! the receive runs here, so large chunks cannot deadlock; every socket has a timeout, so a dead
//! peer is an error, never a hang. Both connections of a rank prove knowledge of the attempt's
//! ring secret before they carry anything ([`super::ring_handshake`]); the listener is closed
//! once the ring has formed.

use super::ring_handshake::{admit, HandshakeError, Offer, RingSecret};
use super::{tensor_f32_mut, Collective, CommError, GroupAbort};
use std::io::{Read, Write};
use std::net::{IpAddr, Shutdown, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tch::Tensor;

pub struct Ring {
    rank: usize,
    world: usize,
    next: Option<TcpStream>,
    prev: Option<TcpStream>,
    timeout: Duration,
    abort: GroupAbort,
}

fn failed(op: &'static str, e: impl std::fmt::Display) -> CommError {
    CommError::Failed {
        op,
        message: e.to_string(),
    }
}

const PEER_CLOSED: &str = "a peer closed its connection (it exited or was killed)";

fn io_error(op: &'static str, e: std::io::Error, timeout: Duration) -> CommError {
    match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => CommError::Timeout {
            op,
            seconds: timeout.as_secs(),
        },
        std::io::ErrorKind::UnexpectedEof => CommError::PeerLost {
            op,
            reason: PEER_CLOSED.into(),
        },
        std::io::ErrorKind::ConnectionReset
        | std::io::ErrorKind::ConnectionAborted
        | std::io::ErrorKind::BrokenPipe => CommError::PeerLost {
            op,
            reason: format!("{PEER_CLOSED}: {e}"),
        },
        _ => failed(op, e),
    }
}

/// Binds the listening socket a rank announces at rendezvous, on address `host` (one interface,
/// never every interface: see `job::RingBind`).
pub fn listen(host: IpAddr) -> Result<(TcpListener, String), CommError> {
    let listener = TcpListener::bind((host, 0)).map_err(|e| failed("listen", format!("{host}: {e}")))?;
    let addr = listener.local_addr().map_err(|e| failed("listen", e))?;
    Ok((listener, addr.to_string()))
}

/// Chunk `a` for reading and chunk `b` (≠ a) for writing, of `shard` elements each.
fn disjoint(data: &mut [f32], a: usize, b: usize, shard: usize) -> (&[f32], &mut [f32]) {
    if a < b {
        let (left, right) = data.split_at_mut(b * shard);
        (&left[a * shard..(a + 1) * shard], &mut right[..shard])
    } else {
        let (left, right) = data.split_at_mut(a * shard);
        (&right[..shard], &mut left[b * shard..(b + 1) * shard])
    }
}

/// The longest a connection to the ring port may take to prove itself before it is dropped.
const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(10);
/// Connections to the ring port proving themselves at once; more are dropped unheard.
const MAX_PENDING_HANDSHAKES: usize = 32;

/// Waits (on its own thread) for the previous rank's connection. Every connection proves itself
/// on a thread of its own within [`HANDSHAKE_DEADLINE`]; a stray one (wrong secret, garbage,
/// silence) is dropped and logged while the listener keeps accepting, so it cannot stall the
/// set-up. `Ok(None)`: `stop` was set.
struct PrevAcceptor<'a> {
    listener: TcpListener,
    secret: &'a RingSecret,
    rank: usize,
    prev_rank: usize,
    deadline: Instant,
    abort: &'a GroupAbort,
    stop: &'a AtomicBool,
}

impl PrevAcceptor<'_> {
    fn run(self, gave_up: impl Fn(&'static str, usize) -> CommError) -> Result<Option<TcpStream>, CommError> {
        self.listener.set_nonblocking(true).map_err(|e| failed("accept", e))?;
        let (admitted_tx, admitted) = std::sync::mpsc::channel::<TcpStream>();
        let pending = Arc::new(AtomicUsize::new(0));
        let (from, to) = (self.prev_rank as u32, self.rank as u32);
        loop {
            if let Ok(stream) = admitted.try_recv() {
                return Ok(Some(stream));
            }
            if Instant::now() >= self.deadline || self.abort.is_aborted() {
                return Err(gave_up("accept from the previous rank", self.prev_rank));
            }
            if self.stop.load(Ordering::SeqCst) {
                return Ok(None);
            }
            let (stream, peer) = match self.listener.accept() {
                Ok(accepted) => accepted,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
                Err(e) => return Err(io_error("accept", e, HANDSHAKE_DEADLINE)),
            };
            if pending.load(Ordering::SeqCst) >= MAX_PENDING_HANDSHAKES {
                tracing::warn!(rank = self.rank, %peer, "dropped a connection to the ring port: {MAX_PENDING_HANDSHAKES} others are still proving themselves");
                continue;
            }
            let deadline = self.deadline.min(Instant::now() + HANDSHAKE_DEADLINE);
            let (secret, admitted_tx, pending) = (self.secret.clone(), admitted_tx.clone(), pending.clone());
            pending.fetch_add(1, Ordering::SeqCst);
            let proving = std::thread::Builder::new()
                .name("ring handshake".into())
                .spawn(move || {
                    let result = stream
                        .set_nonblocking(false)
                        .map_err(HandshakeError::Io)
                        .and_then(|()| admit(&stream, &secret, from, to, deadline));
                    pending.fetch_sub(1, Ordering::SeqCst);
                    match result {
                        Ok(()) => {
                            tracing::debug!(rank = to, %peer, "rank {from} joined the ring");
                            let _ = admitted_tx.send(stream);
                        }
                        Err(e) => tracing::warn!(rank = to, %peer, "dropped a connection to the ring port: {e}"),
                    }
                });
            if let Err(e) = proving {
                return Err(failed("accept", e));
            }
        }
    }
}

impl Ring {
    /// Connects rank `rank` to its neighbours; `addresses[k]` is rank k's listening address.
    /// Both connections prove knowledge of `secret` first (see [`super::ring_handshake`]).
    /// Gives up with [`CommError::Timeout`] when a neighbour does not connect within `timeout`
    /// (it died or froze between the rendezvous and the set-up).
    pub fn connect(
        listener: TcpListener,
        rank: usize,
        addresses: &[String],
        secret: &RingSecret,
        timeout: Duration,
    ) -> Result<Self, CommError> {
        Self::connect_abortable(listener, rank, addresses, secret, timeout, &GroupAbort::default())
    }

    /// [`Ring::connect`] that also gives up, and whose collectives fail at once, when `abort`
    /// fires.
    pub fn connect_abortable(
        listener: TcpListener,
        rank: usize,
        addresses: &[String],
        secret: &RingSecret,
        timeout: Duration,
        abort: &GroupAbort,
    ) -> Result<Self, CommError> {
        let world = addresses.len();
        if world <= 1 {
            return Ok(Self {
                rank,
                world: world.max(1),
                next: None,
                prev: None,
                timeout,
                abort: abort.clone(),
            });
        }
        let deadline = Instant::now() + timeout;
        let next_rank = (rank + 1) % world;
        let prev_rank = (rank + world - 1) % world;
        let next_addr = &addresses[next_rank];
        let gave_up = |op: &'static str, waiting_for: usize| {
            if abort.is_aborted() {
                return CommError::Aborted { op };
            }
            tracing::error!(
                rank,
                peer = waiting_for,
                "rank {waiting_for} did not join the ring within {timeout:?}"
            );
            CommError::Timeout {
                op,
                seconds: timeout.as_secs(),
            }
        };
        let handshake_failed = |e: HandshakeError| match e {
            HandshakeError::Deadline => gave_up("handshake", next_rank),
            _ if abort.is_aborted() => CommError::Aborted { op: "handshake" },
            HandshakeError::Io(e) => io_error("handshake", e, timeout),
            e => failed("handshake", format!("rank {next_rank} at {next_addr}: {e}")),
        };
        let stop = AtomicBool::new(false);
        std::thread::scope(|scope| {
            // Every rank connects to its next before accepting from its previous; the accepting
            // side runs meanwhile, so the handshakes of the whole ring proceed together.
            let acceptor = PrevAcceptor {
                listener,
                secret,
                rank,
                prev_rank,
                deadline,
                abort,
                stop: &stop,
            };
            let accepting = scope.spawn(|| acceptor.run(gave_up));
            let next = Self::connect_next(next_addr, deadline, abort, || {
                gave_up("connect to the next rank", next_rank)
            })
            .and_then(|next| abort.watch(&next).map(|()| next).map_err(|e| failed("connect", e)));
            let next = match next {
                Ok(next) => next,
                Err(e) => {
                    stop.store(true, Ordering::SeqCst);
                    let _ = accepting.join();
                    return Err(e);
                }
            };
            let offered = next.set_nodelay(true).map_err(|e| failed("connect", e)).and_then(|()| {
                Offer::send(&next, rank as u32, next_rank as u32, deadline)
                    .and_then(|offer| offer.finish(&next, secret, deadline))
                    .map_err(handshake_failed)
            });
            // A next rank that failed its proof ends the set-up at once. One that went away or
            // fell silent leaves the accepting side to its deadline, as before there was a
            // handshake: the previous rank's failure to connect is the one reported first.
            if offered.as_ref().is_err_and(|e| matches!(e, CommError::Failed { .. })) {
                stop.store(true, Ordering::SeqCst);
            }
            // A previous rank that never proved itself is named before a next rank that did not
            // answer in time: the accept comes first in the ring's order.
            let prev = match accepting.join() {
                Ok(Ok(Some(prev))) => prev,
                Ok(Err(e)) => return Err(e),
                Err(_) => return Err(failed("accept", "the accepting thread panicked")),
                Ok(Ok(None)) => {
                    return Err(offered
                        .err()
                        .unwrap_or_else(|| failed("accept", "stopped without a reason")))
                }
            };
            offered?;
            abort.watch(&prev).map_err(|e| failed("accept", e))?;
            prev.set_nodelay(true).map_err(|e| failed("accept", e))?;
            for s in [&next, &prev] {
                s.set_read_timeout(Some(timeout)).map_err(|e| failed("connect", e))?;
                s.set_write_timeout(Some(timeout)).map_err(|e| failed("connect", e))?;
            }
            Ok(Self {
                rank,
                world,
                next: Some(next),
                prev: Some(prev),
                timeout,
                abort: abort.clone(),
            })
        })
    }

    /// Connects to the next rank's listener, retrying until it listens, the deadline or an abort.
    fn connect_next(
        next_addr: &str,
        deadline: Instant,
        abort: &GroupAbort,
        gave_up: impl Fn() -> CommError,
    ) -> Result<TcpStream, CommError> {
        let target = next_addr
            .to_socket_addrs()
            .map_err(|e| failed("connect", format!("{next_addr}: {e}")))?
            .next()
            .ok_or_else(|| failed("connect", format!("{next_addr}: no address")))?;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || abort.is_aborted() {
                return Err(gave_up());
            }
            match TcpStream::connect_timeout(&target, left.min(Duration::from_secs(2))) {
                Ok(s) => return Ok(s),
                Err(e) => {
                    tracing::debug!(error = %e, "{next_addr} not listening yet");
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
    }

    /// Sends `send` to the next rank while receiving as many bytes from the previous one.
    fn exchange(&self, op: &'static str, send: &[u8], recv: &mut [u8]) -> Result<(), CommError> {
        let (Some(next), Some(prev)) = (&self.next, &self.prev) else {
            return Ok(());
        };
        let timeout = self.timeout;
        let error = |e: std::io::Error| {
            if self.abort.is_aborted() {
                CommError::Aborted { op }
            } else {
                io_error(op, e, timeout)
            }
        };
        std::thread::scope(|scope| {
            let sender = scope.spawn(|| {
                let mut s = next;
                s.write_all(send)
            });
            let mut p = prev;
            let received = p.read_exact(recv);
            let sent = sender.join().map_err(|_| failed(op, "sender thread panicked"))?;
            received.map_err(error)?;
            sent.map_err(error)
        })
    }

    fn reduce_scatter_slice(&mut self, data: &mut [f32]) -> Result<(), CommError> {
        let n = self.world;
        if n == 1 {
            return Ok(());
        }
        let shard = data.len() / n;
        let mut incoming = vec![0f32; shard];
        for k in 0..n - 1 {
            let send_chunk = (self.rank + 2 * n - k - 1) % n;
            let recv_chunk = (self.rank + 2 * n - k - 2) % n;
            let send = &data[send_chunk * shard..(send_chunk + 1) * shard];
            self.exchange(
                "reduce_scatter",
                bytemuck::cast_slice(send),
                bytemuck::cast_slice_mut(&mut incoming),
            )?;
            for (d, s) in data[recv_chunk * shard..(recv_chunk + 1) * shard]
                .iter_mut()
                .zip(&incoming)
            {
                *d += s;
            }
        }
        Ok(())
    }

    fn all_gather_slice(&mut self, data: &mut [f32]) -> Result<(), CommError> {
        let n = self.world;
        if n == 1 {
            return Ok(());
        }
        let shard = data.len() / n;
        for k in 0..n - 1 {
            let send_chunk = (self.rank + n - k) % n;
            let recv_chunk = (self.rank + 2 * n - k - 1) % n;
            let (send, recv) = disjoint(data, send_chunk, recv_chunk, shard);
            self.exchange("all_gather", bytemuck::cast_slice(send), bytemuck::cast_slice_mut(recv))?;
        }
        Ok(())
    }

    /// Every rank's `values`, indexed by rank.
    fn gather_all_f64(&mut self, values: &[f64]) -> Result<Vec<Vec<f64>>, CommError> {
        let n = self.world;
        let mut table = vec![Vec::new(); n];
        table[self.rank] = values.to_vec();
        let mut current = values.to_vec();
        for k in 0..n.saturating_sub(1) {
            let mut incoming = vec![0f64; values.len()];
            self.exchange(
                "all_reduce_scalars",
                bytemuck::cast_slice(&current),
                bytemuck::cast_slice_mut(&mut incoming),
            )?;
            let from = (self.rank + 2 * n - k - 1) % n;
            table[from] = incoming.clone();
            current = incoming;
        }
        Ok(table)
    }

    /// Closes both connections, so blocked peers fail at once.
    pub fn abort(&mut self) {
        for s in [&self.next, &self.prev].into_iter().flatten() {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    /// Raw slice operations, for benchmarks and tests without tensors.
    pub fn reduce_scatter_f32(&mut self, data: &mut [f32]) -> Result<(), CommError> {
        self.reduce_scatter_slice(data)
    }

    pub fn all_gather_f32(&mut self, data: &mut [f32]) -> Result<(), CommError> {
        self.all_gather_slice(data)
    }
}

impl Collective for Ring {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn reduce_scatter_sum(&mut self, flat: &Tensor) -> Result<(), CommError> {
        let data = tensor_f32_mut(flat, "reduce_scatter")?;
        self.reduce_scatter_slice(data)
    }

    fn all_gather(&mut self, flat: &Tensor) -> Result<(), CommError> {
        let data = tensor_f32_mut(flat, "all_gather")?;
        self.all_gather_slice(data)
    }

    fn all_reduce_sum(&mut self, flat: &Tensor) -> Result<(), CommError> {
        let data = tensor_f32_mut(flat, "all_reduce")?;
        self.reduce_scatter_slice(data)?;
        self.all_gather_slice(data)
    }

    fn all_reduce_scalars(&mut self, values: &mut [f64]) -> Result<(), CommError> {
        // Gathered, then summed in rank order: every rank gets bit-identical sums, so decisions
        // taken on them (early stopping) agree everywhere.
        let table = self.gather_all_f64(values)?;
        for (i, v) in values.iter_mut().enumerate() {
            *v = table.iter().map(|row| row[i]).sum();
        }
        Ok(())
    }

    fn timeout(&self) -> Duration {
        self.timeout
    }

    fn set_timeout(&mut self, timeout: Duration) -> Result<(), CommError> {
        for s in [&self.next, &self.prev].into_iter().flatten() {
            s.set_read_timeout(Some(timeout))
                .map_err(|e| failed("set_timeout", e))?;
            s.set_write_timeout(Some(timeout))
                .map_err(|e| failed("set_timeout", e))?;
        }
        self.timeout = timeout;
        Ok(())
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        self.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOOPBACK: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    fn run_world(world: usize, len: usize) -> Vec<(Vec<f32>, Vec<f32>, Vec<f64>)> {
        let secret = RingSecret::generate().unwrap();
        let listeners: Vec<(TcpListener, String)> = (0..world).map(|_| listen(LOOPBACK).unwrap()).collect();
        let addresses: Vec<String> = listeners.iter().map(|(_, a)| a.clone()).collect();
        let handles: Vec<_> = listeners
            .into_iter()
            .enumerate()
            .map(|(rank, (listener, _))| {
                let (addresses, secret) = (addresses.clone(), secret.clone());
                std::thread::spawn(move || {
                    let mut ring = Ring::connect(listener, rank, &addresses, &secret, Duration::from_secs(10)).unwrap();
                    let mut data: Vec<f32> = (0..len).map(|i| (i * (rank + 1)) as f32).collect();
                    ring.reduce_scatter_f32(&mut data).unwrap();
                    let scattered = data.clone();
                    ring.all_gather_f32(&mut data).unwrap();
                    let mut scalars = [rank as f64 + 0.5, 1.0];
                    ring.all_reduce_scalars(&mut scalars).unwrap();
                    (scattered, data, scalars.to_vec())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    }

    #[test]
    fn reduce_scatter_and_all_gather_for_worlds_1_to_4() {
        for world in 1..=4 {
            let len = 12 * world;
            let results = run_world(world, len);
            let factor: f32 = (1..=world).map(|r| r as f32).sum();
            let shard = len / world;
            for (rank, (scattered, gathered, scalars)) in results.iter().enumerate() {
                for (i, v) in scattered.iter().enumerate().skip(rank * shard).take(shard) {
                    assert_eq!(*v, i as f32 * factor, "world {world} rank {rank} element {i}");
                }
                for (i, v) in gathered.iter().enumerate() {
                    assert_eq!(*v, i as f32 * factor);
                }
                let expected: f64 = (0..world).map(|r| r as f64 + 0.5).sum();
                assert_eq!(scalars, &vec![expected, world as f64]);
            }
        }
    }

    /// Rank 0 of two whose peer announced `peer` at rendezvous and then never set up.
    fn connect_alone(peer: String, timeout: Duration, abort: &GroupAbort) -> (Result<Ring, CommError>, Duration) {
        let (l0, a0) = listen(LOOPBACK).unwrap();
        let started = Instant::now();
        let secret = RingSecret::generate().unwrap();
        let result = Ring::connect_abortable(l0, 0, &[a0, peer], &secret, timeout, abort);
        (result, started.elapsed())
    }

    #[test]
    fn set_up_gives_up_within_the_deadline_when_a_peer_never_connects() {
        let timeout = Duration::from_secs(1);
        // The peer's socket still accepts (a frozen process), but the peer never connects back.
        let (frozen, frozen_addr) = listen(LOOPBACK).unwrap();
        let (result, waited) = connect_alone(frozen_addr, timeout, &GroupAbort::default());
        let err = result.err().expect("set-up without the peer fails");
        assert!(
            matches!(
                err,
                CommError::Timeout {
                    op: "accept from the previous rank",
                    seconds: 1
                }
            ),
            "{err}"
        );
        assert!(
            waited >= timeout && waited < timeout + Duration::from_secs(2),
            "{waited:?}"
        );
        drop(frozen);
        // The peer is gone: nothing listens at its address any more.
        let (gone, gone_addr) = listen(LOOPBACK).unwrap();
        drop(gone);
        let (result, waited) = connect_alone(gone_addr, timeout, &GroupAbort::default());
        let err = result.err().expect("set-up without the peer fails");
        assert!(
            matches!(
                err,
                CommError::Timeout {
                    op: "connect to the next rank",
                    seconds: 1
                }
            ),
            "{err}"
        );
        assert_eq!(
            err.to_string(),
            "collective connect to the next rank timed out after 1 s: a peer is gone or stuck"
        );
        assert!(
            waited >= timeout && waited < timeout + Duration::from_secs(3),
            "{waited:?}"
        );
    }

    #[test]
    fn an_abort_ends_set_up_and_blocked_collectives_at_once() {
        let (_frozen, frozen_addr) = listen(LOOPBACK).unwrap();
        let abort = GroupAbort::default();
        let aborter = abort.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            aborter.abort();
        });
        let (result, waited) = connect_alone(frozen_addr, Duration::from_secs(30), &abort);
        assert!(matches!(result, Err(CommError::Aborted { .. })), "{:?}", result.err());
        assert!(waited < Duration::from_secs(2), "{waited:?}");

        // A formed ring whose peer stops taking part: rank 0 blocks in a collective until its
        // abort fires.
        let (l0, a0) = listen(LOOPBACK).unwrap();
        let (l1, a1) = listen(LOOPBACK).unwrap();
        let addresses = vec![a0, a1];
        let peer_addresses = addresses.clone();
        let secret = RingSecret::generate().unwrap();
        let peer_secret = secret.clone();
        let (hold_tx, hold_rx) = std::sync::mpsc::channel::<()>();
        let peer = std::thread::spawn(move || {
            let ring = Ring::connect(l1, 1, &peer_addresses, &peer_secret, Duration::from_secs(30)).unwrap();
            let _ = hold_rx.recv();
            drop(ring);
        });
        let abort = GroupAbort::default();
        let mut ring = Ring::connect_abortable(l0, 0, &addresses, &secret, Duration::from_secs(30), &abort).unwrap();
        let aborter = abort.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            aborter.abort();
        });
        let started = Instant::now();
        let mut data = vec![1f32; 1 << 10];
        let err = ring.reduce_scatter_f32(&mut data).unwrap_err();
        assert!(matches!(err, CommError::Aborted { op: "reduce_scatter" }), "{err}");
        assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
        let _ = hold_tx.send(());
        peer.join().unwrap();
    }

    #[test]
    fn a_dead_peer_is_an_error_not_a_hang() {
        let (l0, a0) = listen(LOOPBACK).unwrap();
        let (l1, a1) = listen(LOOPBACK).unwrap();
        let addresses = vec![a0, a1];
        let peer_addresses = addresses.clone();
        let secret = RingSecret::generate().unwrap();
        let peer_secret = secret.clone();
        let peer = std::thread::spawn(move || {
            let ring = Ring::connect(l1, 1, &peer_addresses, &peer_secret, Duration::from_secs(5)).unwrap();
            drop(ring);
        });
        let mut ring = Ring::connect(l0, 0, &addresses, &secret, Duration::from_secs(5)).unwrap();
        peer.join().unwrap();
        let started = Instant::now();
        let mut data = vec![1f32; 1 << 16];
        let err = ring.reduce_scatter_f32(&mut data).unwrap_err();
        assert!(matches!(err, CommError::PeerLost { .. }), "{err}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn a_saving_barrier_waits_past_the_collective_deadline_for_a_slow_writer() {
        use crate::comm::all_reduce_scalars_within;
        let collective = Duration::from_secs(1);
        let saving = Duration::from_secs(20);
        let slow_write = Duration::from_millis(2500);
        let (l0, a0) = listen(LOOPBACK).unwrap();
        let (l1, a1) = listen(LOOPBACK).unwrap();
        let addresses = vec![a0, a1];
        let secret = RingSecret::generate().unwrap();
        let writer = {
            let (addresses, secret) = (addresses.clone(), secret.clone());
            std::thread::spawn(move || {
                let mut ring = Ring::connect(l0, 0, &addresses, &secret, collective).unwrap();
                // Rank 0 writes for longer than the collective deadline, then meets its peer at
                // the saving barrier, reporting success.
                std::thread::sleep(slow_write);
                let mut flags = [0.0];
                all_reduce_scalars_within(&mut ring, &mut flags, saving).unwrap();
                // The second time it is as slow but its peer waits in a plain collective.
                std::thread::sleep(slow_write);
                let _ = ring.all_reduce_scalars(&mut [0.0]);
                ring.timeout()
            })
        };
        let mut ring = Ring::connect(l1, 1, &addresses, &secret, collective).unwrap();
        let started = Instant::now();
        let mut flags = [1.0];
        all_reduce_scalars_within(&mut ring, &mut flags, saving).unwrap();
        assert_eq!(flags, [1.0]);
        assert!(started.elapsed() >= Duration::from_secs(2), "{:?}", started.elapsed());
        // The group's own deadline is back for the collectives that follow.
        assert_eq!(ring.timeout(), collective);
        let started = Instant::now();
        let err = ring.all_reduce_scalars(&mut [1.0]).unwrap_err();
        assert!(matches!(err, CommError::Timeout { seconds: 1, .. }), "{err}");
        assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
        drop(ring);
        assert_eq!(writer.join().unwrap(), collective);
    }

    /// A world of 2 forming, rank 0 with `secret_of_rank_0`: both results and how long it took.
    fn form_pair(secret_of_rank_0: RingSecret) -> (Result<Ring, CommError>, Result<Ring, CommError>, Duration) {
        let (l0, a0) = listen(LOOPBACK).unwrap();
        let (l1, a1) = listen(LOOPBACK).unwrap();
        let addresses = vec![a0, a1];
        let secret = RingSecret::generate().unwrap();
        let started = Instant::now();
        let peer = {
            let addresses = addresses.clone();
            std::thread::spawn(move || Ring::connect(l1, 1, &addresses, &secret, Duration::from_secs(20)))
        };
        let ring0 = Ring::connect(l0, 0, &addresses, &secret_of_rank_0, Duration::from_secs(20));
        let ring1 = peer.join().unwrap();
        (ring0, ring1, started.elapsed())
    }

    #[test]
    fn stray_connections_are_dropped_without_stalling_the_ring() {
        let secret = RingSecret::generate().unwrap();
        // Rank 0's real secret is the group's: first strays that are silent, send garbage, or
        // claim to be rank 0 with a guessed secret arrive before rank 0.
        let (l0, a0) = listen(LOOPBACK).unwrap();
        let (l1, a1) = listen(LOOPBACK).unwrap();
        let addresses = vec![a0, a1.clone()];
        let silent: Vec<TcpStream> = (0..3).map(|_| TcpStream::connect(&a1).unwrap()).collect();
        let mut garbage = TcpStream::connect(&a1).unwrap();
        garbage.write_all(&[0xff; 64]).unwrap();
        let impostor = {
            let a1 = a1.clone();
            std::thread::spawn(move || {
                let stream = TcpStream::connect(&a1).unwrap();
                let guessed = RingSecret::generate().unwrap();
                let deadline = Instant::now() + Duration::from_secs(5);
                Offer::send(&stream, 0, 1, deadline).and_then(|o| o.finish(&stream, &guessed, deadline))
            })
        };
        let started = Instant::now();
        let peer = {
            let (addresses, secret) = (addresses.clone(), secret.clone());
            std::thread::spawn(move || Ring::connect(l1, 1, &addresses, &secret, Duration::from_secs(30)))
        };
        let err = impostor.join().unwrap().unwrap_err();
        assert!(matches!(err, HandshakeError::BadProof), "{err}");
        let mut ring0 = Ring::connect(l0, 0, &addresses, &secret, Duration::from_secs(30)).unwrap();
        let mut ring1 = peer.join().unwrap().unwrap();
        // The silent strays are still connected: the ring did not wait for them.
        assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
        drop((silent, garbage));
        let summed = std::thread::spawn(move || {
            let mut data = vec![2f32; 8];
            ring1.reduce_scatter_f32(&mut data).unwrap();
            ring1.all_gather_f32(&mut data).unwrap();
            data
        });
        let mut data = vec![1f32; 8];
        ring0.reduce_scatter_f32(&mut data).unwrap();
        ring0.all_gather_f32(&mut data).unwrap();
        assert_eq!(data, vec![3f32; 8]);
        assert_eq!(summed.join().unwrap(), vec![3f32; 8]);
        // Once formed, the ring no longer listens.
        assert!(TcpStream::connect(&a1).is_err());
    }

    #[test]
    fn a_peer_with_another_secret_never_joins() {
        let other = RingSecret::generate().unwrap();
        let (ring0, ring1, waited) = form_pair(other);
        let err0 = ring0.err().expect("rank 0 cannot prove itself");
        let err1 = ring1.err().expect("rank 1 admits nobody");
        // Whichever side checks a proof first names the secret; the other may see it leave.
        let secret_named = |e: &CommError| e.to_string().contains("it does not know this attempt's ring secret");
        assert!(secret_named(&err0) || secret_named(&err1), "{err0} / {err1}");
        assert!(waited < Duration::from_secs(25), "{waited:?}");
    }
}
