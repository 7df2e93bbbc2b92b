//! The coordinator's own SIGINT and SIGTERM, received as streams installed once at start: the
//! first asks for a graceful stop of its jobs, a second one forces it. (Installing them also
//! keeps either signal from ending the process before its jobs are stopped.)

use tokio::signal::unix::{signal, Signal, SignalKind};

/// A signal the coordinator was sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Received {
    /// SIGINT (Ctrl-C).
    Interrupt,
    /// SIGTERM (`kill`, a scheduler's time limit or preemption).
    Terminate,
}

impl Received {
    pub fn name(self) -> &'static str {
        match self {
            Self::Interrupt => "SIGINT",
            Self::Terminate => "SIGTERM",
        }
    }

    /// The exit status of a process ended by this signal, as shells report it (128 + number).
    pub fn exit_code(self) -> i32 {
        match self {
            Self::Interrupt => 130,
            Self::Terminate => 143,
        }
    }
}

pub struct Signals {
    interrupt: Signal,
    terminate: Signal,
}

impl Signals {
    pub fn install() -> std::io::Result<Self> {
        Ok(Self {
            interrupt: signal(SignalKind::interrupt())?,
            terminate: signal(SignalKind::terminate())?,
        })
    }

    /// The next signal (one that arrived earlier is delivered at once).
    pub async fn recv(&mut self) -> Received {
        tokio::select! {
            Some(()) = self.interrupt.recv() => Received::Interrupt,
            Some(()) = self.terminate.recv() => Received::Terminate,
            else => std::future::pending().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_signal_is_received_not_fatal_and_named() {
        let mut signals = Signals::install().unwrap();
        nix::sys::signal::raise(nix::sys::signal::Signal::SIGTERM).unwrap();
        let got = tokio::time::timeout(std::time::Duration::from_secs(5), signals.recv())
            .await
            .unwrap();
        assert_eq!(
            (got, got.name(), got.exit_code()),
            (Received::Terminate, "SIGTERM", 143)
        );
        assert_eq!(Received::Interrupt.exit_code(), 130);
    }
}
