//! `coordinator status|watch|list|kill|resume`: thin clients of JobService.

use crate::cli::{ClientArgs, KillArgs, ListArgs, ResumeArgs, StatusArgs};
use crate::error::{CoordinatorError, Result};
use crate::status_view;
use kormlm_proto::auth::TokenInterceptor;
use kormlm_proto::now_ms;
use kormlm_proto::v1::job_service_client::JobServiceClient;
use kormlm_proto::v1::{
    GetJobStatusRequest, JobState, JobStatus, KillJobRequest, ListJobsRequest, ResumeJobRequest, WatchJobRequest,
};
use kormlm_proto::{secret, tls};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

type Client = JobServiceClient<InterceptedService<Channel, TokenInterceptor>>;

/// How long connecting to the coordinator may take.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The deadline of a status, list, kill or resume call (`watch` follows a job for as long as it
/// runs).
const CALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// A request with the deadline of a one-shot call.
fn call<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(CALL_TIMEOUT);
    request
}

/// A JobService client whose every call carries the token (see [`secret::client_token`] for
/// where it comes from), over TLS for an `https://` address.
async fn connect(args: &ClientArgs) -> Result<Client> {
    let flag = |flag: &str, message: String| CoordinatorError::Flag {
        flag: flag.into(),
        message,
    };
    let found = secret::client_token(args.token.as_deref(), args.token_file.as_deref(), Some(&args.state_dir))
        .map_err(|e| flag("--token-file/--state-dir", e.to_string()))?;
    let token = TokenInterceptor::new(found.as_ref().map(|t| t.token.as_str()))
        .map_err(|e| flag(found.as_ref().map_or("--token", |t| t.source.as_str()), e.to_string()))?;
    let addr = tls::normalise_url(&args.addr);
    let endpoint = tls::endpoint(&addr, &args.tls).map_err(|e| flag("--addr", e.to_string()))?;
    let unreachable = |e: tonic::transport::Error| CoordinatorError::Connect {
        addr: addr.clone(),
        message: format!(
            "{}; is `coordinator` running there? (--addr / KORMLM_ADDR); {}",
            tls::error_chain(&e),
            tls::connect_hint(&addr)
        ),
    };
    let channel = endpoint
        .connect_timeout(CONNECT_TIMEOUT)
        .connect()
        .await
        .map_err(unreachable)?;
    Ok(JobServiceClient::with_interceptor(channel, token))
}

/// What a failed call tells the user: the status, its causes (a TLS or connection failure
/// shows only there) and, for a failure to reach the coordinator, a hint about TLS and URLs.
fn call_failed(args: &ClientArgs) -> impl Fn(tonic::Status) -> CoordinatorError + '_ {
    move |status| CoordinatorError::Rpc(failed_call_message(&status, &args.addr))
}

fn failed_call_message(status: &tonic::Status, addr: &str) -> String {
    let mut message = format!("{:?}: {}", status.code(), status.message());
    if let Some(cause) = std::error::Error::source(status) {
        message += &format!(": {}", tls::error_chain(cause));
    }
    if tls::is_connection_failure(status) {
        message += &format!(" ({})", tls::connect_hint(addr));
    }
    message
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
    let request = GetJobStatusRequest {
        job_id: args.job.unwrap_or_default(),
    };
    let status = client
        .get_job_status(call(request))
        .await
        .map_err(call_failed(&args.client))?
        .into_inner();
    print_status(&status, args.client.json);
    Ok(0)
}

pub async fn list(args: ListArgs) -> Result<i32> {
    let mut client = connect(&args.client).await?;
    let jobs = client
        .list_jobs(call(ListJobsRequest {}))
        .await
        .map_err(call_failed(&args.client))?
        .into_inner()
        .jobs;
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

fn progress_line(status: &JobStatus) -> String {
    let p = status.progress.unwrap_or_default();
    let state = JobState::try_from(status.state)
        .unwrap_or(JobState::Unspecified)
        .as_str_name();
    format!(
        "{} {:<9} epoch {} step {}/{} loss {} val {} {:.1} samples/s",
        status.job_id,
        state,
        p.epoch,
        p.global_step,
        p.total_steps,
        p.train_loss.map_or("-".into(), |v| format!("{v:.4}")),
        p.val_loss.map_or("-".into(), |v| format!("{v:.4}")),
        p.samples_per_s
    )
}

/// Follows a job until it ends: a live progress bar (steps, loss, samples/s, ETA) on a
/// terminal, one line per change otherwise, JSON lines with --json.
pub async fn watch(args: StatusArgs) -> Result<i32> {
    let mut client = connect(&args.client).await?;
    let request = WatchJobRequest {
        job_id: args.job.unwrap_or_default(),
    };
    let mut stream = client
        .watch_job(request)
        .await
        .map_err(call_failed(&args.client))?
        .into_inner();
    let terminal = std::io::IsTerminal::is_terminal(&std::io::stdout()) && !args.client.json;
    let bar = terminal.then(|| {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{prefix} {bar:30} {pos}/{len} steps  {msg}  ETA {eta}")
                .expect("a valid template"),
        );
        bar
    });
    let mut last = None;
    let mut final_state = JobState::Unspecified;
    while let Some(status) = stream.message().await.map_err(call_failed(&args.client))? {
        final_state = JobState::try_from(status.state).unwrap_or(JobState::Unspecified);
        if args.client.json {
            println!("{}", status_view::to_json(&status));
            continue;
        }
        let p = status.progress.unwrap_or_default();
        if let Some(bar) = &bar {
            bar.set_length(p.total_steps.max(1));
            bar.set_position(p.global_step);
            bar.set_prefix(format!("{} {}", status.job_id, final_state.as_str_name()));
            bar.set_message(format!(
                "epoch {} loss {} val {} {:.1} samples/s",
                p.epoch,
                p.train_loss.map_or("-".into(), |v| format!("{v:.4}")),
                p.val_loss.map_or("-".into(), |v| format!("{v:.4}")),
                p.samples_per_s
            ));
        } else {
            let line = progress_line(&status);
            if last.as_ref() != Some(&line) {
                println!("{line}");
                last = Some(line);
            }
        }
    }
    if let Some(bar) = bar {
        bar.finish();
    }
    Ok(if final_state == JobState::Succeeded { 0 } else { 1 })
}

pub async fn kill(args: KillArgs) -> Result<i32> {
    let mut client = connect(&args.client).await?;
    let request = KillJobRequest {
        job_id: args.job,
        force: args.force,
    };
    let status = client
        .kill_job(call(request))
        .await
        .map_err(call_failed(&args.client))?
        .into_inner()
        .status
        .unwrap_or_default();
    print_status(&status, args.client.json);
    Ok(0)
}

pub async fn resume(args: ResumeArgs) -> Result<i32> {
    let mut client = connect(&args.client).await?;
    let request = ResumeJobRequest {
        job_id: args.job,
        world_size: args.world_size.unwrap_or(0),
    };
    let status = client
        .resume_job(call(request))
        .await
        .map_err(call_failed(&args.client))?
        .into_inner()
        .status
        .unwrap_or_default();
    print_status(&status, args.client.json);
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transport_failures_get_the_tls_hint_and_refusals_do_not() {
        let plain = "http://127.0.0.1:50051";
        for status in [
            tonic::Status::unavailable("tcp connect error"),
            tonic::Status::internal(
                "h2 protocol error: http2 error: connection error detected: frame with invalid size",
            ),
        ] {
            let message = failed_call_message(&status, plain);
            assert!(message.contains("use an https:// URL"), "{message}");
        }
        for status in [
            tonic::Status::internal("the state store failed"),
            tonic::Status::unauthenticated("missing token"),
        ] {
            let message = failed_call_message(&status, plain);
            assert!(!message.contains("https://"), "{message}");
        }
    }
}
