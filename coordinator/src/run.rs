//! `coordinator --config …`: open the state, start or adopt the job, serve, launch workers,
//! and (with --exit-when-done) exit with the job's outcome.

use crate::cli::{DeviceArg, ServeArgs};
use crate::error::{CoordinatorError, Result};
use crate::launcher::{default_worker_binary, LocalWorkers, Slot};
use crate::server;
use crate::state::{Coordinator, Settings};
use crate::store::Store;
use kormlm_proto::ds_config::DsConfig;
use kormlm_proto::v1::{DeviceKind, JobSpec, JobState, TaskKind};
use std::net::IpAddr;
use std::time::Duration;

fn flag(flag: &str, message: impl Into<String>) -> CoordinatorError {
    CoordinatorError::Flag {
        flag: flag.into(),
        message: message.into(),
    }
}

fn is_loopback(listen: &str) -> bool {
    let host = listen.rsplit_once(':').map_or(listen, |(h, _)| h);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost" || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Builds the job spec from the flags and the config file (validated here, so a bad config
/// stops the coordinator before it listens).
fn job_spec(args: &ServeArgs) -> Result<Option<JobSpec>> {
    let Some(path) = &args.config else {
        return Ok(None);
    };
    let world_size = match (args.world_size, args.num_workers) {
        (Some(w), Some(n)) if w != n => {
            return Err(flag("--world_size", format!("{w} contradicts --num_workers {n}")));
        }
        (_, Some(n)) | (Some(n), None) => n,
        (None, None) => {
            return Err(flag(
                "--world_size",
                "missing: give --world_size N (and start N workers) or --num_workers N to start them here",
            ))
        }
    };
    if world_size == 0 {
        return Err(flag("--world_size", "must be at least 1"));
    }
    let text =
        std::fs::read_to_string(path).map_err(|e| flag("--config", format!("cannot read {}: {e}", path.display())))?;
    let source = path.display().to_string();
    let parsed = DsConfig::parse(&text, &source)?;
    parsed.config.resolve_batch(world_size, &source)?;
    for warning in &parsed.warnings {
        tracing::warn!("{warning}");
    }
    let device = match args.device {
        DeviceArg::Cpu | DeviceArg::Auto => DeviceKind::Cpu,
        DeviceArg::Cuda => DeviceKind::Cuda,
    };
    if args.num_workers.is_some() && device == DeviceKind::Cuda {
        return Err(flag("--num_workers", "starts CPU workers; use it with --device cpu"));
    }
    Ok(Some(JobSpec {
        task: TaskKind::Train as i32,
        ds_config_json: text,
        ds_config_path: source,
        world_size,
        device: device as i32,
        args: args.train.to_map().into_iter().collect(),
        max_restarts: args.max_restarts,
    }))
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
    }
}

pub async fn serve(args: ServeArgs) -> Result<i32> {
    if !is_loopback(&args.listen) && args.token.is_none() {
        return Err(flag(
            "--listen",
            format!(
                "{} is reachable from other hosts; set a shared secret with --token or KORMLM_TOKEN",
                args.listen
            ),
        ));
    }
    let spec = job_spec(&args)?;
    let store = Store::open(&args.state_dir)?;
    let settings = Settings {
        heartbeat_interval: Duration::from_millis(args.heartbeat_ms.max(10)),
        worker_timeout: Duration::from_millis(args.worker_timeout_ms.max(100)),
        token: args.token.clone(),
        ..Settings::default()
    };
    let coordinator = Coordinator::load(store, settings)?;
    let job_id = match (coordinator.active_job_id(), spec) {
        (Some(id), _) => {
            tracing::info!(job_id = %id, "found an unfinished job in the state directory; continuing it");
            Some(id)
        }
        (None, Some(spec)) => {
            let (id, _) = coordinator
                .submit(spec)
                .map_err(|s| CoordinatorError::Rpc(s.message().to_string()))?;
            tracing::info!(job_id = %id, "job submitted");
            Some(id)
        }
        (None, None) => None,
    };

    let (listener, local) = server::bind(&args.listen).await?;
    let url = format!("http://{local}");
    let addr_file = args.state_dir.join("coordinator.addr");
    let tmp = args.state_dir.join("coordinator.addr.tmp");
    std::fs::write(&tmp, format!("{url}\n"))
        .and_then(|_| std::fs::rename(&tmp, &addr_file))
        .map_err(|e| flag("--state-dir", format!("cannot write {}: {e}", addr_file.display())))?;
    tracing::info!(%url, state_dir = %args.state_dir.display(), "coordinator listening");
    println!("coordinator listening on {url}");

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(server::serve(coordinator.clone(), listener, async move {
        let _ = stop_rx.await;
    }));

    let mut workers = None;
    if let (Some(n), Some(id)) = (args.num_workers, &job_id) {
        let binary = args.worker_bin.clone().unwrap_or_else(default_worker_binary);
        let slots: Vec<Slot> = (0..n).map(|rank| Slot { rank, local_rank: rank }).collect();
        let log_dir = args.state_dir.join("logs").join(id);
        workers = Some(LocalWorkers::spawn(
            coordinator.clone(),
            id,
            &binary,
            &url,
            &slots,
            &log_dir,
        )?);
    }

    let mut changes = coordinator.subscribe();
    let outcome = loop {
        if args.exit_when_done {
            if let Some(state) = job_id.as_deref().and_then(|id| coordinator.job_state(id)) {
                if matches!(state, JobState::Succeeded | JobState::Failed | JobState::Killed) {
                    break Some(state);
                }
            }
        }
        tokio::select! {
            _ = shutdown_signal() => {
                tracing::info!("shutting down on signal");
                break None;
            }
            _ = changes.changed() => {}
        }
    };
    if let Some(workers) = workers {
        workers.terminate(Duration::from_secs(10)).await;
    }
    let _ = stop_tx.send(());
    let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
    let _ = std::fs::remove_file(&addr_file);
    Ok(match outcome {
        Some(JobState::Succeeded) | None => 0,
        Some(state) => {
            if let Some(id) = &job_id {
                if let Ok(status) = coordinator.status(id) {
                    eprintln!("job {id} ended {}: {}", state.as_str_name(), status.message);
                }
            }
            1
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_detection() {
        assert!(is_loopback("127.0.0.1:50051"));
        assert!(is_loopback("localhost:1"));
        assert!(is_loopback("[::1]:5"));
        assert!(!is_loopback("0.0.0.0:50051"));
        assert!(!is_loopback("10.1.2.3:50051"));
    }
}
