//! `kormlm.v1.JobService`: the user-facing API. Requests become domain calls and domain values
//! become messages here; the token was checked by the authentication layer before.

use crate::state::Coordinator;
use kormlm_proto::v1::job_service_server::JobService;
use kormlm_proto::v1::{
    GetJobStatusRequest, JobStatus, KillJobRequest, KillJobResponse, ListJobsRequest, ListJobsResponse,
    ResumeJobRequest, ResumeJobResponse, SubmitJobRequest, SubmitJobResponse, WatchJobRequest,
};
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

type StatusStream = Pin<Box<dyn Stream<Item = Result<JobStatus, Status>> + Send>>;

#[tonic::async_trait]
impl JobService for JobApi {
    async fn submit_job(&self, request: Request<SubmitJobRequest>) -> Result<Response<SubmitJobResponse>, Status> {
        let spec = request
            .into_inner()
            .spec
            .ok_or_else(|| Status::invalid_argument("SubmitJobRequest.spec is required"))?;
        let (job_id, warnings) = self.coordinator.submit(spec)?;
        Ok(Response::new(SubmitJobResponse { job_id, warnings }))
    }

    async fn get_job_status(&self, request: Request<GetJobStatusRequest>) -> Result<Response<JobStatus>, Status> {
        let view = self.coordinator.status(&request.into_inner().job_id)?;
        Ok(Response::new(JobStatus::from(&view)))
    }

    type WatchJobStream = StatusStream;

    async fn watch_job(&self, request: Request<WatchJobRequest>) -> Result<Response<Self::WatchJobStream>, Status> {
        let first = self.coordinator.status(&request.into_inner().job_id)?;
        let job_id = first.job.id.clone();
        let coordinator = self.coordinator.clone();
        let mut changes = coordinator.subscribe();
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move {
            let mut current = first;
            loop {
                let done = current.job.state.is_terminal();
                if tx.send(Ok(JobStatus::from(&current))).await.is_err() || done {
                    return;
                }
                let _ = tokio::time::timeout(Duration::from_secs(1), changes.changed()).await;
                current = match coordinator.status(&job_id) {
                    Ok(view) => view,
                    Err(e) => {
                        let _ = tx.send(Err(e.into())).await;
                        return;
                    }
                };
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }

    async fn list_jobs(&self, _request: Request<ListJobsRequest>) -> Result<Response<ListJobsResponse>, Status> {
        let jobs = self.coordinator.list().iter().map(JobStatus::from).collect();
        Ok(Response::new(ListJobsResponse { jobs }))
    }

    async fn kill_job(&self, request: Request<KillJobRequest>) -> Result<Response<KillJobResponse>, Status> {
        let request = request.into_inner();
        let view = self
            .coordinator
            .kill(&request.job_id, request.force, "kill requested")?;
        if request.force {
            tokio::spawn(crate::launcher::force_stop(
                self.coordinator.clone(),
                view.job.id.clone(),
            ));
        }
        Ok(Response::new(KillJobResponse {
            status: Some(JobStatus::from(&view)),
        }))
    }

    async fn resume_job(&self, request: Request<ResumeJobRequest>) -> Result<Response<ResumeJobResponse>, Status> {
        let request = request.into_inner();
        let view = self.coordinator.resume(&request.job_id, request.world_size)?;
        Ok(Response::new(ResumeJobResponse {
            status: Some(JobStatus::from(&view)),
        }))
    }
}
