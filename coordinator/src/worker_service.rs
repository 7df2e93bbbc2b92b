//! `kormlm.v1.WorkerService`: registration, rendezvous and the heartbeat stream.

use crate::state::Coordinator;
use kormlm_proto::v1::worker_service_server::WorkerService;
use kormlm_proto::v1::{
    Assignment, CoordinatorCommand, RegisterRequest, RendezvousInfo, RendezvousRequest, WorkerReport,
};
use std::pin::Pin;
use std::sync::Arc;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

pub struct WorkerApi {
    coordinator: Arc<Coordinator>,
}

impl WorkerApi {
    pub fn new(coordinator: Arc<Coordinator>) -> Self {
        Self { coordinator }
    }
}

type CommandStream = Pin<Box<dyn Stream<Item = Result<CoordinatorCommand, Status>> + Send>>;

#[tonic::async_trait]
impl WorkerService for WorkerApi {
    async fn register(&self, request: Request<RegisterRequest>) -> Result<Response<Assignment>, Status> {
        let request = request.into_inner();
        let rank = request.rank;
        match self.coordinator.register(request) {
            Ok(assignment) => Ok(Response::new(assignment)),
            Err(status) => {
                tracing::warn!(rank, reason = status.message(), "registration refused");
                Err(status)
            }
        }
    }

    async fn rendezvous(&self, request: Request<RendezvousRequest>) -> Result<Response<RendezvousInfo>, Status> {
        let request = request.into_inner();
        self.coordinator.check_token(&request.token)?;
        Ok(Response::new(self.coordinator.rendezvous(request).await?))
    }

    type HeartbeatStream = CommandStream;

    async fn heartbeat(
        &self,
        request: Request<Streaming<WorkerReport>>,
    ) -> Result<Response<Self::HeartbeatStream>, Status> {
        let mut reports = request.into_inner();
        let first = reports
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("the heartbeat stream must start with a report"))?;
        self.coordinator.check_token(&first.token)?;
        let (job_id, rank) = (first.job_id.clone(), first.rank);
        let (session, commands) = self.coordinator.attach(&job_id, rank, first.incarnation)?;
        self.coordinator.report(session, first)?;
        let coordinator = self.coordinator.clone();
        tokio::spawn(async move {
            let reason = loop {
                match reports.next().await {
                    Some(Ok(report)) => {
                        if let Err(status) = coordinator.report(session, report) {
                            break format!("report rejected: {}", status.message());
                        }
                    }
                    Some(Err(status)) => break format!("heartbeat stream broke: {}", status.message()),
                    None => break "heartbeat stream closed".to_string(),
                }
            };
            coordinator.detach(&job_id, rank, session, reason);
        });
        let stream = tokio_stream::wrappers::UnboundedReceiverStream::new(commands).map(Ok);
        Ok(Response::new(Box::pin(stream)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Settings;
    use crate::store::Store;

    #[tokio::test]
    async fn rendezvous_needs_the_token_like_registration() {
        let dir = tempfile::tempdir().unwrap();
        let settings = Settings {
            token: Some("secret".into()),
            ..Settings::default()
        };
        let api = WorkerApi::new(Coordinator::load(Store::open(dir.path()).unwrap(), settings).unwrap());
        let request = |token: &str| {
            Request::new(RendezvousRequest {
                job_id: "job-1".into(),
                token: token.into(),
                ..Default::default()
            })
        };
        let refused = api.rendezvous(request("wrong")).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Unauthenticated);
        // With the right token the call reaches the job table (which has no job-1).
        let other = api.rendezvous(request("secret")).await.unwrap_err();
        assert_ne!(other.code(), tonic::Code::Unauthenticated, "{other:?}");
    }
}
