//! `coordinator … --dry-run`: what a command line would start, without starting it — the
//! resolved DeepSpeed config and batch triple, every rank's place, and the command each remote
//! host must run, and the names (never the values) of the secrets its environment needs.

use crate::cli::ServeArgs;
use crate::launch_plan::{self, Placement};
use crate::server;
use kormlm_proto::job_plan::JobPlan;
use kormlm_proto::v1::{DeviceKind, JobSpec};
use serde_json::{json, Value};

/// The plan as JSON; `job`: the spec the command line builds, with its resolution.
pub fn report(args: &ServeArgs, placements: &[Placement], job: Option<&(JobSpec, JobPlan)>) -> Value {
    let tls = args.tls_cert.is_some();
    let host_port = match args.listen.parse::<std::net::SocketAddr>() {
        Ok(addr) => launch_plan::advertised_url(addr)
            .trim_start_matches("http://")
            .to_string(),
        Err(_) => args.listen.clone(),
    };
    let url = server::url(&host_port, tls);
    // Names only: the secret itself never appears in this report.
    let mut worker_env = vec!["KORMLM_TOKEN (the contents of STATE_DIR/token)"];
    if tls {
        worker_env.push("KORMLM_TLS_CA (the CA that signed --tls-cert)");
    }
    let device_of = |p: &Placement| match job {
        Some((spec, _)) => DeviceKind::try_from(spec.device).unwrap_or(DeviceKind::Cpu),
        None if p.cuda_devices.is_empty() => DeviceKind::Cpu,
        None => DeviceKind::Cuda,
    };
    let ranks: Vec<Value> = placements
        .iter()
        .map(|p| {
            let local = launch_plan::is_local(&p.host);
            let devices = launch_plan::rank_devices(device_of(p), Some(p), p.local_rank);
            let visible = launch_plan::host_visible_devices(placements, &p.host);
            json!({
                "rank": p.rank,
                "local_rank": p.local_rank,
                "host": p.host,
                "devices": devices.names,
                "local_cuda_devices": devices.cuda,
                "physical_cuda_devices": devices.physical,
                "cuda_visible_devices": (!visible.is_empty()).then(|| launch_plan::device_list(&visible)),
                "started_here": local,
                "command": (!local).then(|| launch_plan::remote_worker_command(p.rank, p.local_rank, &url, &visible)),
            })
        })
        .collect();
    let Some((spec, plan)) = job else {
        return json!({"job": null, "ranks": ranks, "coordinator_url": url, "worker_environment": worker_env});
    };
    let device = DeviceKind::try_from(spec.device).unwrap_or(DeviceKind::Cpu);
    let external = if placements.is_empty() {
        format!(
            "start {} worker(s): worker --rank K --coordinator {url}",
            spec.world_size
        )
    } else {
        String::new()
    };
    json!({
        "job": {
            "task": plan.task.as_str_name(),
            "world_size": spec.world_size,
            "device": device.as_str_name(),
            "config_path": spec.ds_config_path,
            "batch": plan.config.batch,
            "config": plan.config.config,
            "config_warnings": plan.warnings,
            "args": spec.args,
            "max_restarts": spec.max_restarts,
            "min_workers": spec.min_workers,
        },
        "ranks": ranks,
        "external_workers": (!external.is_empty()).then_some(external),
        "coordinator_url": url,
        "worker_environment": worker_env,
    })
}
