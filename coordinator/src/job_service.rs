//! `kormlm.v1.JobService`: the user-facing API.

use crate::state::Coordinator;
use kormlm_proto::v1::job_service_server::JobService;
use kormlm_proto::v1::{
    GetJobStatusRequest, JobState, JobStatus, KillJobRequest, KillJobResponse, ListJobsRequest, ListJobsResponse,
    ResumeJobRequest, ResumeJobResponse, SubmitJobRequest, SubmitJobResponse, WatchJobRequest,
};
use kormlm_proto::TOKEN_METADATA;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

pub struct JobApi {
    coordinator: Arc<Coordinator>,
}

impl JobApi {
    pub fn new(coordinator: Arc<Coordinator>) -> Self {
        Self { coordinator }
    }
}

fn token_of<T>(request: &Request<T>) -> String {
    request
        .metadata()
        .get(TOKEN_METADATA)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string()
}

fn is_terminal(status: &JobStatus) -> bool {
    matches!(
        JobState::try_from(status.state),
        Ok(JobState::Killed | JobState::Failed | JobState::Succeeded)
    )
}

type StatusStream = Pin<Box<dyn Stream<Item = Result<JobStatus, Status>> + Send>>;

#[tonic::async_trait]
impl JobService for JobApi {
    async fn submit_job(&self, request: Request<SubmitJobRequest>) -> Result<Response<SubmitJobResponse>, Status> {
        let token = token_of(&request);
        if let Some(expected) = &self.coordinator.settings().token {
            if *expected != token {
                return Err(Status::unauthenticated(format!(
                    "submitting needs the coordinator's token in the `{TOKEN_METADATA}` metadata"
                )));
            }
        }
        let spec = request
            .into_inner()
            .spec
            .ok_or_else(|| Status::invalid_argument("SubmitJobRequest.spec is required"))?;
        let (job_id, warnings) = self.coordinator.submit(spec)?;
        Ok(Response::new(SubmitJobResponse { job_id, warnings }))
    }

    async fn get_job_status(&self, request: Request<GetJobStatusRequest>) -> Result<Response<JobStatus>, Status> {
        self.coordinator.check_read_token(&token_of(&request))?;
        Ok(Response::new(self.coordinator.status(&request.into_inner().job_id)?))
    }

    type WatchJobStream = StatusStream;

    async fn watch_job(&self, request: Request<WatchJobRequest>) -> Result<Response<Self::WatchJobStream>, Status> {
        self.coordinator.check_read_token(&token_of(&request))?;
        let mut job_id = request.into_inner().job_id;
        let first = self.coordinator.status(&job_id)?;
        job_id = first.job_id.clone();
        let coordinator = self.coordinator.clone();
        let mut changes = coordinator.subscribe();
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move {
            let mut current = first;
            loop {
                let done = is_terminal(&current);
                if tx.send(Ok(current)).await.is_err() || done {
                    return;
                }
                let _ = tokio::time::timeout(Duration::from_secs(1), changes.changed()).await;
                current = match coordinator.status(&job_id) {
                    Ok(status) => status,
                    Err(e) => {
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                };
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }

    async fn list_jobs(&self, request: Request<ListJobsRequest>) -> Result<Response<ListJobsResponse>, Status> {
        self.coordinator.check_read_token(&token_of(&request))?;
        Ok(Response::new(ListJobsResponse {
            jobs: self.coordinator.list(),
        }))
    }

    async fn kill_job(&self, request: Request<KillJobRequest>) -> Result<Response<KillJobResponse>, Status> {
        let token = token_of(&request);
        let request = request.into_inner();
        let status = self.coordinator.kill(&request.job_id, request.force, &token)?;
        if request.force {
            let pids = self.coordinator.worker_pids(&request.job_id);
            tokio::spawn(crate::launcher::force_stop(pids));
        }
        Ok(Response::new(KillJobResponse { status: Some(status) }))
    }

    async fn resume_job(&self, request: Request<ResumeJobRequest>) -> Result<Response<ResumeJobResponse>, Status> {
        let token = token_of(&request);
        let request = request.into_inner();
        let status = self.coordinator.resume(&request.job_id, request.world_size, &token)?;
        Ok(Response::new(ResumeJobResponse { status: Some(status) }))
    }
}
