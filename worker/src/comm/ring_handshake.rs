//! The CPU ring's handshake: before a connection carries tensors, its two ends prove to each other
//! that they know the ring secret the coordinator handed out with this attempt's rendezvous, with
//! an HMAC-SHA256 challenge–response in both directions.
//!
//! ```text
//! connector (rank r)                              acceptor (rank r+1)
//!   "KRG1" ‖ r ‖ to ‖ nonce_c            ──►
//!                                        ◄──  nonce_a ‖ HMAC(s, "accept" ‖ r ‖ to ‖ nonce_c ‖ nonce_a)
//!   HMAC(s, "connect" ‖ r ‖ to ‖ nonce_a ‖ nonce_c) ──►
//!                                        ◄──  ACCEPTED
//! ```
//!
//! Fresh nonces on both sides stop replays; the role label and both ranks in every tag stop a
//! tag made for one direction or pair of ranks from passing for another.

use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Instant;

type HmacSha256 = Hmac<Sha256>;

const MAGIC: &[u8; 4] = b"KRG1";
const NONCE_BYTES: usize = 16;
const TAG_BYTES: usize = 32;
const ACCEPTED: u8 = 1;
/// The fewest secret bytes a ring accepts (128 bits).
pub const MIN_SECRET_BYTES: usize = 16;

/// The ring secret of one attempt. Its `Debug` does not show it, so it cannot reach a log.
#[derive(Clone)]
pub struct RingSecret(Arc<[u8]>);

impl RingSecret {
    /// The secret from the rendezvous; refused when shorter than [`MIN_SECRET_BYTES`] (a
    /// coordinator that hands out none).
    pub fn new(bytes: &[u8]) -> Result<Self, HandshakeError> {
        if bytes.len() < MIN_SECRET_BYTES {
            return Err(HandshakeError::WeakSecret(bytes.len()));
        }
        Ok(Self(bytes.into()))
    }

    /// A fresh random secret, for tests and single-process rings.
    pub fn generate() -> Result<Self, HandshakeError> {
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes).map_err(|e| HandshakeError::Random(e.to_string()))?;
        Self::new(&bytes)
    }

    fn tag(&self, role: &[u8], from: u32, to: u32, first: &[u8], second: &[u8]) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&self.0).expect("HMAC takes a key of any length");
        for part in [role, &from.to_le_bytes(), &to.to_le_bytes(), first, second] {
            mac.update(&(part.len() as u32).to_le_bytes());
            mac.update(part);
        }
        mac
    }
}

impl std::fmt::Debug for RingSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RingSecret(<{} bytes>)", self.0.len())
    }
}

/// Why a handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("the ring secret has {0} bytes; at least {MIN_SECRET_BYTES} are needed (is the coordinator older than this worker?)")]
    WeakSecret(usize),
    #[error("cannot draw a nonce: {0}")]
    Random(String),
    #[error("not a kormlm ring peer (it did not start with the ring's greeting)")]
    NotARingPeer,
    #[error("it says it is rank {from} for rank {to}; expected rank {expected_from} for rank {expected_to}")]
    WrongRanks {
        from: u32,
        to: u32,
        expected_from: u32,
        expected_to: u32,
    },
    #[error("it does not know this attempt's ring secret")]
    BadProof,
    #[error("the peer refused this rank's proof")]
    Refused,
    #[error("no complete handshake before its deadline")]
    Deadline,
    #[error("{0}")]
    Io(std::io::Error),
}

impl From<std::io::Error> for HandshakeError {
    fn from(e: std::io::Error) -> Self {
        match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => HandshakeError::Deadline,
            _ => HandshakeError::Io(e),
        }
    }
}

fn nonce() -> Result<[u8; NONCE_BYTES], HandshakeError> {
    let mut n = [0u8; NONCE_BYTES];
    getrandom::fill(&mut n).map_err(|e| HandshakeError::Random(e.to_string()))?;
    Ok(n)
}

/// Reads `buf` in full by `deadline` (each read waits at most what is left of it), so a peer
/// that trickles bytes cannot hold the connection past the deadline.
fn read_by(stream: &TcpStream, buf: &mut [u8], deadline: Instant) -> Result<(), HandshakeError> {
    let mut filled = 0;
    while filled < buf.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(HandshakeError::Deadline);
        }
        stream.set_read_timeout(Some(left))?;
        match (&*stream).read(&mut buf[filled..]) {
            Ok(0) => return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into()),
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

fn write_by(stream: &TcpStream, bytes: &[u8], deadline: Instant) -> Result<(), HandshakeError> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(HandshakeError::Deadline);
    }
    stream.set_write_timeout(Some(left))?;
    (&*stream).write_all(bytes)?;
    Ok(())
}

/// The connector's greeting: rank `from` asks to join as rank `to`'s previous rank. Sent at
/// once after connecting; [`Offer::finish`] completes the handshake.
pub struct Offer {
    from: u32,
    to: u32,
    nonce: [u8; NONCE_BYTES],
}

impl Offer {
    pub fn send(stream: &TcpStream, from: u32, to: u32, deadline: Instant) -> Result<Self, HandshakeError> {
        let offer = Self {
            from,
            to,
            nonce: nonce()?,
        };
        let mut hello = Vec::with_capacity(4 + 8 + NONCE_BYTES);
        hello.extend_from_slice(MAGIC);
        hello.extend_from_slice(&from.to_le_bytes());
        hello.extend_from_slice(&to.to_le_bytes());
        hello.extend_from_slice(&offer.nonce);
        write_by(stream, &hello, deadline)?;
        Ok(offer)
    }

    /// Checks the acceptor's proof, gives this rank's, and waits for the acceptor's consent.
    pub fn finish(self, stream: &TcpStream, secret: &RingSecret, deadline: Instant) -> Result<(), HandshakeError> {
        let mut reply = [0u8; NONCE_BYTES + TAG_BYTES];
        read_by(stream, &mut reply, deadline)?;
        let (their_nonce, their_tag) = reply.split_at(NONCE_BYTES);
        secret
            .tag(b"accept", self.from, self.to, &self.nonce, their_nonce)
            .verify_slice(their_tag)
            .map_err(|_| HandshakeError::BadProof)?;
        let ours = secret
            .tag(b"connect", self.from, self.to, their_nonce, &self.nonce)
            .finalize()
            .into_bytes();
        write_by(stream, &ours, deadline)?;
        let mut consent = [0u8; 1];
        match read_by(stream, &mut consent, deadline) {
            Ok(()) if consent[0] == ACCEPTED => Ok(()),
            Ok(()) => Err(HandshakeError::Refused),
            Err(HandshakeError::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(HandshakeError::Refused),
            Err(e) => Err(e),
        }
    }
}

/// The acceptor's side: admits the connection only from rank `from` to rank `to` (this rank)
/// that proves it knows `secret`, all by `deadline`.
pub fn admit(
    stream: &TcpStream,
    secret: &RingSecret,
    from: u32,
    to: u32,
    deadline: Instant,
) -> Result<(), HandshakeError> {
    let mut hello = [0u8; 4 + 8 + NONCE_BYTES];
    // The greeting first, so anything else is turned away without waiting for more bytes.
    read_by(stream, &mut hello[..4], deadline)?;
    if &hello[..4] != MAGIC {
        return Err(HandshakeError::NotARingPeer);
    }
    read_by(stream, &mut hello[4..], deadline)?;
    let said_from = u32::from_le_bytes([hello[4], hello[5], hello[6], hello[7]]);
    let said_to = u32::from_le_bytes([hello[8], hello[9], hello[10], hello[11]]);
    if (said_from, said_to) != (from, to) {
        return Err(HandshakeError::WrongRanks {
            from: said_from,
            to: said_to,
            expected_from: from,
            expected_to: to,
        });
    }
    let their_nonce = &hello[12..];
    let ours = nonce()?;
    let tag = secret
        .tag(b"accept", from, to, their_nonce, &ours)
        .finalize()
        .into_bytes();
    let mut reply = Vec::with_capacity(NONCE_BYTES + TAG_BYTES);
    reply.extend_from_slice(&ours);
    reply.extend_from_slice(&tag);
    write_by(stream, &reply, deadline)?;
    let mut proof = [0u8; TAG_BYTES];
    read_by(stream, &mut proof, deadline)?;
    secret
        .tag(b"connect", from, to, &ours, their_nonce)
        .verify_slice(&proof)
        .map_err(|_| HandshakeError::BadProof)?;
    write_by(stream, &[ACCEPTED], deadline)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use std::time::Duration;

    fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        (client, server)
    }

    fn soon() -> Instant {
        Instant::now() + Duration::from_secs(5)
    }

    /// The connector's and the acceptor's results of one handshake.
    fn handshake(
        connector_secret: &RingSecret,
        acceptor_secret: &RingSecret,
        (from, to): (u32, u32),
    ) -> (Result<(), HandshakeError>, Result<(), HandshakeError>) {
        let (client, server) = pair();
        let acceptor_secret = acceptor_secret.clone();
        let acceptor = std::thread::spawn(move || admit(&server, &acceptor_secret, 0, 1, soon()));
        let connector =
            Offer::send(&client, from, to, soon()).and_then(|o| o.finish(&client, connector_secret, soon()));
        drop(client);
        (connector, acceptor.join().unwrap())
    }

    #[test]
    fn peers_with_the_same_secret_admit_each_other() {
        let secret = RingSecret::generate().unwrap();
        let (connector, acceptor) = handshake(&secret, &secret, (0, 1));
        assert!(connector.is_ok(), "{connector:?}");
        assert!(acceptor.is_ok(), "{acceptor:?}");
    }

    #[test]
    fn a_wrong_secret_fails_on_both_sides() {
        let (ours, theirs) = (RingSecret::generate().unwrap(), RingSecret::generate().unwrap());
        let (connector, acceptor) = handshake(&theirs, &ours, (0, 1));
        // The connector sees the acceptor's proof fail and leaves; the acceptor sees it leave
        // without a proof.
        assert!(matches!(connector, Err(HandshakeError::BadProof)), "{connector:?}");
        assert!(acceptor.is_err(), "{acceptor:?}");
    }

    #[test]
    fn a_connector_that_only_replays_cannot_get_in() {
        // An attacker without the secret answers the acceptor with a tag it saw elsewhere; it
        // can only send bytes it does not know to be right.
        let secret = RingSecret::generate().unwrap();
        let (client, server) = pair();
        let acceptor = {
            let secret = secret.clone();
            std::thread::spawn(move || admit(&server, &secret, 0, 1, soon()))
        };
        Offer::send(&client, 0, 1, soon()).unwrap();
        let mut reply = [0u8; NONCE_BYTES + TAG_BYTES];
        read_by(&client, &mut reply, soon()).unwrap();
        // Reflect the acceptor's own tag back: the role label makes it worthless.
        write_by(&client, &reply[NONCE_BYTES..], soon()).unwrap();
        let result = acceptor.join().unwrap();
        assert!(matches!(result, Err(HandshakeError::BadProof)), "{result:?}");
    }

    #[test]
    fn wrong_ranks_garbage_and_silence_are_refused() {
        let secret = RingSecret::generate().unwrap();
        let (connector, acceptor) = handshake(&secret, &secret, (2, 1));
        assert!(connector.is_err());
        assert_eq!(
            acceptor.unwrap_err().to_string(),
            "it says it is rank 2 for rank 1; expected rank 0 for rank 1"
        );

        let (client, server) = pair();
        (&client).write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let err = admit(&server, &secret, 0, 1, soon()).unwrap_err();
        assert!(matches!(err, HandshakeError::NotARingPeer), "{err}");

        let (_client, server) = pair();
        let started = Instant::now();
        let err = admit(&server, &secret, 0, 1, Instant::now() + Duration::from_millis(300)).unwrap_err();
        assert!(matches!(err, HandshakeError::Deadline), "{err}");
        assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
    }

    #[test]
    fn a_secret_shorter_than_128_bits_is_refused_and_never_shown() {
        let err = RingSecret::new(&[7u8; 15]).unwrap_err();
        assert!(err.to_string().starts_with("the ring secret has 15 bytes"), "{err}");
        let secret = RingSecret::new(&[0xab; 16]).unwrap();
        assert_eq!(format!("{secret:?}"), "RingSecret(<16 bytes>)");
    }
}
