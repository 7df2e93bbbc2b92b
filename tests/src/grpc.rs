//! Raw gRPC clients of a test's coordinator, for tests that act as a worker (or a stranger
//! posing as one) would: register with any pid, hold a heartbeat stream, call the rendezvous.
//! They carry the coordinator's token when its state directory holds one (`STATE_DIR/token`).

use crate::procs::CoordinatorProc;
use kormlm_proto::auth::TokenInterceptor;
use kormlm_proto::v1::job_service_client::JobServiceClient;
use kormlm_proto::v1::worker_service_client::WorkerServiceClient;
use kormlm_proto::v1::{CommandKind, WorkerReport};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

pub type WorkerClient = WorkerServiceClient<InterceptedService<Channel, TokenInterceptor>>;
pub type JobClient = JobServiceClient<InterceptedService<Channel, TokenInterceptor>>;

fn token(c: &CoordinatorProc) -> TokenInterceptor {
    let token = std::fs::read_to_string(c.state_dir.join("token")).ok();
    TokenInterceptor::new(token.as_deref().map(str::trim)).expect("the state directory's token is printable")
}

async fn channel(c: &CoordinatorProc) -> Channel {
    Channel::from_shared(c.url.clone())
        .expect("the coordinator's URL is valid")
        .connect()
        .await
        .unwrap_or_else(|e| panic!("cannot reach the coordinator at {}: {e}", c.url))
}

pub async fn worker_client(c: &CoordinatorProc) -> WorkerClient {
    WorkerServiceClient::with_interceptor(channel(c).await, token(c))
}

pub async fn job_client(c: &CoordinatorProc) -> JobClient {
    JobServiceClient::with_interceptor(channel(c).await, token(c))
}

/// A heartbeat stream that reports `template` every 300 ms and records every command it
/// receives, obeying none of them (a worker that does not exit when told to).
pub struct Heartbeat {
    pub commands: Arc<Mutex<Vec<CommandKind>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Heartbeat {
    pub async fn start(client: &mut WorkerClient, template: WorkerReport) -> Self {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tx.send(template.clone()).await.expect("the stream is open");
        let mut stream = client
            .heartbeat(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .unwrap_or_else(|status| panic!("heartbeat refused: {status:?}"))
            .into_inner();
        let commands = Arc::new(Mutex::new(Vec::new()));
        let seen = commands.clone();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(300));
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        if tx.send(template.clone()).await.is_err() {
                            return;
                        }
                    }
                    command = stream.message() => match command {
                        Ok(Some(command)) => seen
                            .lock()
                            .expect("no panics while holding it")
                            .push(CommandKind::try_from(command.kind).unwrap_or(CommandKind::Unspecified)),
                        _ => return,
                    },
                }
            }
        });
        Self { commands, task }
    }

    pub fn commands(&self) -> Vec<CommandKind> {
        self.commands.lock().expect("no panics while holding it").clone()
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        self.task.abort();
    }
}
