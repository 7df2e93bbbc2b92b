//! `coordinator status|watch|list|kill|resume`: thin clients of JobService.

use crate::cli::{ClientArgs, KillArgs, ListArgs, ResumeArgs, StatusArgs};
use crate::error::{CoordinatorError, Result};
use crate::job_service::TOKEN_METADATA;
use crate::state::now_ms;
use crate::status_view;
use kormlm_proto::v1::job_service_client::JobServiceClient;
use kormlm_proto::v1::{
    GetJobStatusRequest, JobState, JobStatus, KillJobRequest, ListJobsRequest, ResumeJobRequest, WatchJobRequest,
};
use tonic::transport::Channel;

async fn connect(args: &ClientArgs) -> Result<JobServiceClient<Channel>> {
    let addr = if args.addr.contains("://") {
        args.addr.clone()
    } else {
        format!("http://{}", args.addr)
    };
    JobServiceClient::connect(addr.clone())
        .await
        .map_err(|e| CoordinatorError::Connect {
            addr,
            message: format!("{e}; is `coordinator` running there? (--addr / KORMLM_ADDR)"),
        })
}

fn with_token<T>(message: T, args: &ClientArgs) -> Result<tonic::Request<T>> {
    let mut request = tonic::Request::new(message);
    if let Some(token) = &args.token {
        let value = token.parse().map_err(|_| CoordinatorError::Flag {
            flag: "--token".into(),
            message: "must be printable ASCII".into(),
        })?;
        request.metadata_mut().insert(TOKEN_METADATA, value);
    }
    Ok(request)
}

fn print_status(status: &JobStatus, json: bool) {
    if json {
        println!("{}", status_view::to_json(status));
    } else {
        print!("{}", status_view::to_table(status, now_ms()));
    }
}

pub async fn status(args: StatusArgs) -> Result<i32> {
    let mut client = connect(&args.client).await?;
    let status = client
        .get_job_status(GetJobStatusRequest {
            job_id: args.job.unwrap_or_default(),
        })
        .await?
        .into_inner();
    print_status(&status, args.client.json);
    Ok(0)
}

pub async fn list(args: ListArgs) -> Result<i32> {
    let mut client = connect(&args.client).await?;
    let jobs = client.list_jobs(ListJobsRequest {}).await?.into_inner().jobs;
    if args.client.json {
        let all: Vec<_> = jobs.iter().map(status_view::to_json).collect();
        println!("{}", serde_json::Value::Array(all));
    } else {
        println!(
            "{:<10}  {:<10}  {:>5}  {:>10}  message",
            "job", "state", "world", "step"
        );
        for job in &jobs {
            let state = JobState::try_from(job.state)
                .unwrap_or(JobState::Unspecified)
                .as_str_name();
            let step = job.progress.map_or(0, |p| p.global_step);
            println!(
                "{:<10}  {:<10}  {:>5}  {:>10}  {}",
                job.job_id, state, job.world_size, step, job.message
            );
        }
    }
    Ok(0)
}

pub async fn watch(args: StatusArgs) -> Result<i32> {
    let mut client = connect(&args.client).await?;
    let mut stream = client
        .watch_job(WatchJobRequest {
            job_id: args.job.unwrap_or_default(),
        })
        .await?
        .into_inner();
    let mut last = None;
    while let Some(status) = stream.message().await? {
        if args.client.json {
            println!("{}", status_view::to_json(&status));
        } else {
            let p = status.progress.unwrap_or_default();
            let state = JobState::try_from(status.state)
                .unwrap_or(JobState::Unspecified)
                .as_str_name();
            let line = format!(
                "{} {:<9} epoch {} step {}/{} loss {} val {} {:.1} samples/s",
                status.job_id,
                state,
                p.epoch,
                p.global_step,
                p.total_steps,
                p.train_loss.map_or("-".into(), |v| format!("{v:.4}")),
                p.val_loss.map_or("-".into(), |v| format!("{v:.4}")),
                p.samples_per_s
            );
            if last.as_ref() != Some(&line) {
                println!("{line}");
                last = Some(line);
            }
        }
    }
    Ok(0)
}

pub async fn kill(args: KillArgs) -> Result<i32> {
    let mut client = connect(&args.client).await?;
    let request = with_token(
        KillJobRequest {
            job_id: args.job,
            force: args.force,
        },
        &args.client,
    )?;
    let status = client.kill_job(request).await?.into_inner().status.unwrap_or_default();
    print_status(&status, args.client.json);
    Ok(0)
}

pub async fn resume(args: ResumeArgs) -> Result<i32> {
    let mut client = connect(&args.client).await?;
    let request = with_token(
        ResumeJobRequest {
            job_id: args.job,
            world_size: args.world_size.unwrap_or(0),
        },
        &args.client,
    )?;
    let status = client
        .resume_job(request)
        .await?
        .into_inner()
        .status
        .unwrap_or_default();
    print_status(&status, args.client.json);
    Ok(0)
}
