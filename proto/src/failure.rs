//! Why work failed, as a kind the coordinator can decide on (restart or not, whose failure to
//! name) without reading the message. Workers classify their errors into it; it travels as
//! `WorkerReport.failure_kind`.

use crate::v1;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum FailureKind {
    /// A peer of the collective group went away.
    PeerLost,
    /// A collective or the group's set-up missed its deadline.
    CollectiveTimeout,
    /// The config, flags, corpus or model files are wrong: the same attempt would fail again.
    BadInput,
    OutOfMemory,
    /// A file could not be read or written (disk full, permissions).
    Io,
    /// Stopped by its environment (SIGTERM: preemption, a time limit).
    Preempted,
    /// A bug or an unexpected library error.
    Internal,
    /// The checkpoint to resume from cannot be read; the coordinator picks the previous one.
    CheckpointUnreadable,
}

impl FailureKind {
    pub const ALL: [FailureKind; 8] = [
        Self::PeerLost,
        Self::CollectiveTimeout,
        Self::BadInput,
        Self::OutOfMemory,
        Self::Io,
        Self::Preempted,
        Self::Internal,
        Self::CheckpointUnreadable,
    ];

    /// Whether a new attempt from the latest checkpoint can succeed where this one failed.
    /// Bad input fails every attempt the same way, so it is never retried.
    pub fn retryable(self) -> bool {
        !matches!(self, Self::BadInput)
    }

    /// A failure that is usually the consequence of another rank's loss: the coordinator waits
    /// briefly for that loss so it can name the rank that caused it.
    pub fn follows_a_peer(self) -> bool {
        matches!(self, Self::PeerLost | Self::CollectiveTimeout)
    }

    /// The wire name, as in `kormlm.proto` (e.g. `PEER_LOST`).
    pub fn as_str(self) -> &'static str {
        self.to_wire().as_str_name()
    }

    pub fn to_wire(self) -> v1::FailureKind {
        match self {
            Self::PeerLost => v1::FailureKind::PeerLost,
            Self::CollectiveTimeout => v1::FailureKind::CollectiveTimeout,
            Self::BadInput => v1::FailureKind::BadInput,
            Self::OutOfMemory => v1::FailureKind::OutOfMemory,
            Self::Io => v1::FailureKind::Io,
            Self::Preempted => v1::FailureKind::Preempted,
            Self::Internal => v1::FailureKind::Internal,
            Self::CheckpointUnreadable => v1::FailureKind::CheckpointUnreadable,
        }
    }

    /// The kind a report carries; an unset or unknown value (an older worker) is `Internal`.
    pub fn from_wire(value: i32) -> Self {
        match v1::FailureKind::try_from(value) {
            Ok(v1::FailureKind::PeerLost) => Self::PeerLost,
            Ok(v1::FailureKind::CollectiveTimeout) => Self::CollectiveTimeout,
            Ok(v1::FailureKind::BadInput) => Self::BadInput,
            Ok(v1::FailureKind::OutOfMemory) => Self::OutOfMemory,
            Ok(v1::FailureKind::Io) => Self::Io,
            Ok(v1::FailureKind::Preempted) => Self::Preempted,
            Ok(v1::FailureKind::CheckpointUnreadable) => Self::CheckpointUnreadable,
            Ok(v1::FailureKind::Internal | v1::FailureKind::Unspecified) | Err(_) => Self::Internal,
        }
    }
}

impl std::fmt::Display for FailureKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_round_trip_and_policy() {
        for kind in FailureKind::ALL {
            assert_eq!(FailureKind::from_wire(kind.to_wire() as i32), kind);
        }
        assert_eq!(FailureKind::from_wire(0), FailureKind::Internal);
        assert_eq!(FailureKind::from_wire(99), FailureKind::Internal);
        assert_eq!(FailureKind::PeerLost.as_str(), "PEER_LOST");
        assert!(!FailureKind::BadInput.retryable());
        assert!(FailureKind::Io.retryable() && FailureKind::PeerLost.retryable());
        assert!(FailureKind::CollectiveTimeout.follows_a_peer() && !FailureKind::Io.follows_a_peer());
    }
}
