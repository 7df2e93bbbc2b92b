//! `coordinator … --dry-run`: what a command line would start, without starting it — the
//! resolved DeepSpeed config and batch triple, every rank's place, and the command each remote
//! host must run.

use crate::cli::ServeArgs;
use crate::error::Result;
use crate::launch_plan::{self, Placement};
use kormlm_proto::ds_config::DsConfig;
use kormlm_proto::v1::{DeviceKind, JobSpec, TaskKind};
use serde_json::{json, Value};

pub fn report(args: &ServeArgs, placements: &[Placement], spec: Option<&JobSpec>) -> Result<Value> {
    let url = match args.listen.parse::<std::net::SocketAddr>() {
        Ok(addr) => launch_plan::advertised_url(addr),
        Err(_) => format!("http://{}", args.listen),
    };
    let ranks: Vec<Value> = placements
        .iter()
        .map(|p| {
            let local = launch_plan::is_local(&p.host);
            json!({
                "rank": p.rank,
                "local_rank": p.local_rank,
                "host": p.host,
                "devices": if p.cuda_devices.is_empty() {
                    vec!["cpu".to_string()]
                } else {
                    p.cuda_devices.iter().map(|d| format!("cuda:{d}")).collect()
                },
                "started_here": local,
                "command": (!local).then(|| launch_plan::remote_worker_command(p.rank, p.local_rank, &url)),
            })
        })
        .collect();
    let Some(spec) = spec else {
        return Ok(json!({"job": null, "ranks": ranks, "coordinator_url": url}));
    };
    let parsed = DsConfig::parse(&spec.ds_config_json, &spec.ds_config_path)?;
    let resolved = parsed.config.resolve(spec.world_size, &spec.ds_config_path)?;
    let task = TaskKind::try_from(spec.task).unwrap_or(TaskKind::Train);
    let device = DeviceKind::try_from(spec.device).unwrap_or(DeviceKind::Cpu);
    let external = if placements.is_empty() {
        format!(
            "start {} worker(s): worker --rank K --coordinator {url}",
            spec.world_size
        )
    } else {
        String::new()
    };
    Ok(json!({
        "job": {
            "task": task.as_str_name(),
            "world_size": spec.world_size,
            "device": device.as_str_name(),
            "config_path": spec.ds_config_path,
            "batch": resolved.batch,
            "config": resolved.config,
            "config_warnings": parsed.warnings,
            "args": spec.args,
            "max_restarts": spec.max_restarts,
        },
        "ranks": ranks,
        "external_workers": (!external.is_empty()).then_some(external),
        "coordinator_url": url,
    }))
}
