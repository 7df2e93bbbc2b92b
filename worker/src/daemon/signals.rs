//! SIGTERM and SIGINT while the daemon runs: the first one asks it to stop its work at the next
//! step every rank agrees on (preemption, a time limit, an eviction, Ctrl-C); a second one ends
//! the process at once. SIGHUP is ignored (logged): a worker outlives its coordinator by design,
//! and the kernel hangs up a worker that is stopped (SIGSTOP) when the coordinator that started
//! it dies (its process group becomes orphaned), as a closed terminal or ssh session hangs up
//! workers started from it.

use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;

/// A signal that stops the worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopSignal {
    Term,
    Int,
}

impl StopSignal {
    pub fn name(self) -> &'static str {
        match self {
            Self::Term => "SIGTERM",
            Self::Int => "SIGINT",
        }
    }

    /// 128 + the signal's number, as a shell reports a process a signal ended.
    pub fn exit_code(self) -> i32 {
        match self {
            Self::Term => 128 + 15,
            Self::Int => 128 + 2,
        }
    }
}

/// The first stop signal the process received, once it came.
pub struct Signals {
    first: watch::Receiver<Option<StopSignal>>,
}

impl Signals {
    /// Installs the handlers; from now on SIGTERM and SIGINT no longer end the process by
    /// themselves, and SIGHUP does not end it at all. Must run inside the runtime.
    pub fn install() -> std::io::Result<Self> {
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let mut hangup = signal(SignalKind::hangup())?;
        let (tx, first) = watch::channel(None);
        tokio::spawn(async move {
            loop {
                let received = tokio::select! {
                    Some(()) = term.recv() => StopSignal::Term,
                    Some(()) = int.recv() => StopSignal::Int,
                    Some(()) = hangup.recv() => {
                        tracing::warn!(
                            "SIGHUP ignored: the worker keeps its work and reconnects to its coordinator; stop it with \
                             SIGTERM or SIGINT"
                        );
                        continue;
                    }
                    else => return,
                };
                if tx.borrow().is_some() {
                    tracing::warn!(signal = received.name(), "second stop signal: exiting now");
                    super::exit_now(received.exit_code());
                }
                tracing::warn!(
                    signal = received.name(),
                    "stop signal: the work stops at the next step and is checkpointed; a second signal exits at once"
                );
                tx.send_replace(Some(received));
            }
        });
        Ok(Self { first })
    }

    /// Resolves with the first stop signal (at once when it has already come). Cancel-safe.
    pub async fn wait(&mut self) -> StopSignal {
        loop {
            if let Some(signal) = *self.first.borrow_and_update() {
                return signal;
            }
            if self.first.changed().await.is_err() {
                // The handler task is gone (the runtime is shutting down): no signal will come.
                std::future::pending::<()>().await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_the_shell_convention() {
        assert_eq!(
            (StopSignal::Term.name(), StopSignal::Term.exit_code()),
            ("SIGTERM", 143)
        );
        assert_eq!((StopSignal::Int.name(), StopSignal::Int.exit_code()), ("SIGINT", 130));
    }
}
