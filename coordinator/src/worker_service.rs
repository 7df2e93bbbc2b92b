//! `kormlm.v1.WorkerService`: registration, rendezvous and the heartbeat stream. Messages become
//! domain values here; the token was checked by the authentication layer before.

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
        match self.coordinator.register(request.into()) {
            Ok(assignment) => Ok(Response::new(assignment.into())),
            Err(e) => {
                tracing::warn!(rank, reason = %e, "registration refused");
                Err(e.into())
            }
        }
    }

    async fn rendezvous(&self, request: Request<RendezvousRequest>) -> Result<Response<RendezvousInfo>, Status> {
        let group = self.coordinator.rendezvous(request.into_inner().into()).await?;
        Ok(Response::new(group.into()))
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
        let (job_id, rank) = (first.job_id.clone(), first.rank);
        let (session, orders) = self.coordinator.attach(&job_id, rank, first.incarnation)?;
        self.coordinator.report(session, first.into()).await?;
        let coordinator = self.coordinator.clone();
        tokio::spawn(async move {
            let reason = loop {
                match reports.next().await {
                    Some(Ok(report)) => {
                        if let Err(e) = coordinator.report(session, report.into()).await {
                            break format!("report rejected: {e}");
                        }
                    }
                    Some(Err(status)) => break format!("heartbeat stream broke: {}", status.message()),
                    None => break "heartbeat stream closed".to_string(),
                }
            };
            coordinator.detach(&job_id, rank, session, &reason);
        });
        let stream = tokio_stream::wrappers::UnboundedReceiverStream::new(orders)
            .map(|order| Ok(CoordinatorCommand::from(&order)));
        Ok(Response::new(Box::pin(stream)))
    }
}
