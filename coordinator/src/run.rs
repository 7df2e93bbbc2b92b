//! `coordinator --config …`: open the state, start, adopt or resume the job, serve, launch
//! workers, and (with --exit-when-done) exit with the job's outcome. On SIGINT/SIGTERM the
//! running jobs stop gracefully (every rank checkpoints; KILLED, resumable) within
//! --stop-timeout-s, a second signal forces, and the exit status is 130/143.

use crate::cli::{DeviceArg, ServeArgs, TaskArg};
use crate::dry_run;
use crate::error::{CoordinatorError, Result};
use crate::launch_plan::{self, Placement};
use crate::launcher::{default_worker_binary, Launch, LocalWorkers, Slot};
use crate::metrics_server;
use crate::remote::{self, RemoteLaunch, RemoteStart};
use crate::server;
use crate::signals::{Received, Signals};
use crate::state::job::JobState;
use crate::state::{Coordinator, Settings};
use crate::store::Store;
use kormlm_proto::auth::TokenInterceptor;
use kormlm_proto::job_plan::{JobPlan, AUGMENT_ONLY_CONFIG};
use kormlm_proto::v1::{DeviceKind, JobSpec, TaskKind};
use kormlm_proto::{secret, tls};
use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};

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

/// How long `worker info` may take (it initialises CUDA when there is one).
const PROBE_TIMEOUT: Duration = Duration::from_secs(60);

/// CUDA devices on this host, as the worker binary (which links libtorch) sees them without
/// `CUDA_VISIBLE_DEVICES` (the launcher narrows the pool itself, as `deepspeed` does).
fn local_gpu_count(worker_binary: &std::path::Path) -> Result<u32> {
    use std::io::Read;
    let what = format!("{} info", worker_binary.display());
    let fail = |message: String| CoordinatorError::Spawn {
        what: what.clone(),
        message,
    };
    let mut child = std::process::Command::new(worker_binary)
        .args(["info", "--json"])
        .env_remove("CUDA_VISIBLE_DEVICES")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|e| fail(e.to_string()))?;
    let mut stdout = child.stdout.take().ok_or_else(|| fail("no stdout".into()))?;
    let reader = std::thread::spawn(move || {
        let mut bytes = Vec::new();
        stdout.read_to_end(&mut bytes).map(|_| bytes)
    });
    let deadline = std::time::Instant::now() + PROBE_TIMEOUT;
    loop {
        match child.try_wait().map_err(|e| fail(e.to_string()))? {
            Some(_) => break,
            None if std::time::Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            None => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(fail(format!("no answer within {} s", PROBE_TIMEOUT.as_secs())));
            }
        }
    }
    let bytes = reader
        .join()
        .map_err(|_| fail("reading its output failed".into()))?
        .map_err(|e| fail(e.to_string()))?;
    let info: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|e| fail(format!("unexpected output: {e}")))?;
    Ok(info["cuda_device_count"].as_u64().unwrap_or(0) as u32)
}

/// Where the ranks run, from the launcher flags (empty: workers place themselves).
fn placements(args: &ServeArgs, worker_binary: &std::path::Path) -> Result<Vec<Placement>> {
    let gpu_flags =
        args.num_gpus.is_some() || args.include.is_some() || args.exclude.is_some() || args.hostfile.is_some();
    if gpu_flags && args.num_workers.is_some() {
        return Err(flag(
            "--num_workers",
            "starts CPU workers; it cannot be combined with --num_gpus/--include/--exclude/--hostfile",
        ));
    }
    if let Some(n) = args.num_workers {
        if args.device == DeviceArg::Cuda {
            return Err(flag("--num_workers", "starts CPU workers; use it with --device cpu"));
        }
        return Ok(launch_plan::cpu_plan(n));
    }
    if !gpu_flags {
        return Ok(Vec::new());
    }
    let visible_env = std::env::var("CUDA_VISIBLE_DEVICES").ok();
    let mut narrowed_by = None;
    let pool: Vec<(String, Vec<u32>)> = match &args.hostfile {
        Some(path) => {
            if let Some(value) = &visible_env {
                tracing::info!(
                    "CUDA_VISIBLE_DEVICES={value} is ignored with --hostfile (as deepspeed does); each host's \
                     workers see the slots chosen for them"
                );
            }
            launch_plan::parse_hostfile(path)?
                .into_iter()
                .map(|(host, slots)| (host, (0..slots).collect()))
                .collect()
        }
        None => {
            let count = local_gpu_count(worker_binary)?;
            if count == 0 {
                return Err(flag(
                    "--num_gpus",
                    "no CUDA device is visible on this host (`worker info` reports 0); use --num_workers N --device cpu",
                ));
            }
            let ids = match launch_plan::visible_devices(visible_env.as_deref(), count)? {
                Some(ids) => {
                    narrowed_by = visible_env;
                    ids
                }
                None => (0..count).collect(),
            };
            vec![("localhost".to_string(), ids)]
        }
    };
    launch_plan::plan(
        pool,
        &launch_plan::Selection {
            num_gpus: args.num_gpus,
            include: args.include.as_deref(),
            exclude: args.exclude.as_deref(),
        },
    )
    .map_err(|e| match (e, narrowed_by) {
        (CoordinatorError::Flag { flag, message }, Some(value)) => CoordinatorError::Flag {
            flag,
            message: format!("{message} (CUDA_VISIBLE_DEVICES={value} limits this host to GPUs {value})"),
        },
        (e, _) => e,
    })
}

/// `--task classify` takes the labelled-data flags it shares with augment-eval; the
/// experiment's own flags would be ignored, so they are refused.
fn check_classify_flags(args: &ServeArgs) -> Result<()> {
    if args.config.is_none() {
        return Err(flag(
            "--task classify",
            "needs --config FILE: the DeepSpeed config of the classifier's training",
        ));
    }
    let experiment = kormlm_proto::augment_eval_args::AugmentEvalArgs {
        data: args.augment_eval.data.clone(),
        ..Default::default()
    };
    if args.augment_eval != experiment {
        let changed = args.augment_eval.to_argv();
        let own = experiment.to_argv();
        let foreign: Vec<&String> = changed
            .iter()
            .filter(|a| a.starts_with("--") && !own.contains(a))
            .collect();
        return Err(flag(
            "--task classify",
            format!(
                "{} {}; a classifier job takes --train_file, --dev_file, --dataset, --text_column, \
                 --label_column, --multi_label and --labels",
                foreign.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", "),
                if foreign.len() == 1 {
                    "is an augment-eval flag"
                } else {
                    "are augment-eval flags"
                }
            ),
        ));
    }
    Ok(())
}

/// Builds the job spec from the flags and the config file and resolves it (so a bad config
/// stops the coordinator before it listens).
fn job_spec(
    args: &ServeArgs,
    placements: &[Placement],
    worker_binary: &std::path::Path,
) -> Result<Option<(JobSpec, JobPlan)>> {
    let augment = args.task == TaskArg::Augment;
    if augment && (args.augment.input.is_none() || args.augment.output.is_none()) {
        return Err(flag("--task augment", "needs --input FILE and --output FILE"));
    }
    if args.task == TaskArg::AugmentEval && args.config.is_none() {
        return Err(flag(
            "--task augment-eval",
            "needs --config FILE: the DeepSpeed config of the classifiers' training",
        ));
    }
    if args.task == TaskArg::Classify {
        check_classify_flags(args)?;
    }
    // Augmentation uses no optimizer; a one-sample batch satisfies the batch rule.
    let augment_config = std::path::PathBuf::from("(augmentation)");
    let path = match (&args.config, augment) {
        (Some(path), _) => path,
        (None, true) => &augment_config,
        (None, false) => return Ok(None),
    };
    let planned = (!placements.is_empty()).then_some(placements.len() as u32);
    let world_size = match (args.world_size, planned) {
        (Some(w), Some(n)) if w != n => {
            return Err(flag(
                "--world_size",
                format!("{w} contradicts the {n} rank(s) the launch flags give"),
            ));
        }
        (_, Some(n)) | (Some(n), None) => n,
        (None, None) => return Err(flag(
            "--world_size",
            "missing: give --world_size N (and start N workers), or --num_workers N / --num_gpus N to start them here",
        )),
    };
    if world_size == 0 {
        return Err(flag("--world_size", "must be at least 1"));
    }
    let text = if args.config.is_none() {
        AUGMENT_ONLY_CONFIG.to_string()
    } else {
        std::fs::read_to_string(path).map_err(|e| flag("--config", format!("cannot read {}: {e}", path.display())))?
    };
    let uses_gpus = placements.iter().any(|p| !p.cuda_devices.is_empty());
    let device = match args.device {
        DeviceArg::Cuda => DeviceKind::Cuda,
        DeviceArg::Auto if uses_gpus => DeviceKind::Cuda,
        // External workers (no placements): their hosts are assumed to be like this one.
        DeviceArg::Auto if placements.is_empty() => match local_gpu_count(worker_binary) {
            Ok(n) if n > 0 => DeviceKind::Cuda,
            Ok(_) => {
                tracing::info!(
                    "--device auto: no GPU on this host, so the workers train on CPU (--device cuda forces CUDA)"
                );
                DeviceKind::Cpu
            }
            Err(e) => {
                tracing::warn!(error = %e, "--device auto: cannot probe this host's GPUs; the workers train on CPU (--device cuda forces CUDA)");
                DeviceKind::Cpu
            }
        },
        _ => DeviceKind::Cpu,
    };
    let mut job_args = args.train.to_map();
    let task = match args.task {
        TaskArg::Train => TaskKind::Train,
        TaskArg::Classify => {
            job_args.extend(args.augment_eval.data.to_map());
            TaskKind::Classify
        }
        TaskArg::Augment => {
            job_args.extend(args.augment.to_map());
            TaskKind::Augment
        }
        TaskArg::AugmentEval => {
            job_args.extend(args.augment.to_map());
            job_args.extend(args.augment_eval.to_map());
            TaskKind::AugmentEval
        }
    };
    let spec = JobSpec {
        task: task as i32,
        ds_config_json: text,
        ds_config_path: path.display().to_string(),
        world_size,
        device: device as i32,
        args: job_args.into_iter().collect(),
        max_restarts: args.max_restarts,
        placements: placements.iter().map(Placement::to_proto).collect(),
        min_workers: args.min_workers,
    };
    if args.min_workers > world_size {
        return Err(flag(
            "--min_workers",
            format!("{} is more than the {world_size} rank(s) of the job", args.min_workers),
        ));
    }
    let plan = JobPlan::resolve(&spec, world_size)?;
    for warning in &plan.warnings {
        tracing::warn!("{warning}");
    }
    Ok(Some((spec, plan)))
}

/// The job this command line runs: a new one, or — with --resume — the killed or failed job of
/// the state directory that writes to the same output directory. Without --resume such a job
/// makes the command refuse to start (a rerun of the same command must not start over there),
/// unless --overwrite_output_dir asks for a new job in its place.
fn start_or_resume(coordinator: &Coordinator, args: &ServeArgs, spec: JobSpec, plan: &JobPlan) -> Result<String> {
    let overwrite = plan.train.overwrite_output_dir;
    if args.resume && overwrite {
        return Err(flag(
            "--resume",
            "contradicts --overwrite_output_dir: continue the earlier job, or start afresh in its place",
        ));
    }
    let earlier = coordinator.resumable_for(|id| plan.train.output_dir_or(id).display().to_string());
    match earlier {
        Some((id, _, _)) if args.resume => {
            let stored = coordinator.status(&id)?.job.spec.args;
            let ignored: Vec<String> = spec
                .args
                .iter()
                .filter(|(key, value)| key.as_str() != "output_dir" && stored.get(*key) != Some(*value))
                .map(|(key, value)| {
                    let was = stored.get(key).map_or("unset", String::as_str);
                    format!("--{key} {value} (the job has {was})")
                })
                .collect();
            if !ignored.is_empty() {
                tracing::warn!(
                    job_id = %id,
                    "--resume continues the job with the flags it was submitted with; not used: {}",
                    ignored.join(", ")
                );
            }
            let view = coordinator.resume(&id, spec.world_size)?;
            tracing::info!(job_id = %id, message = %view.job.message, "--resume: continuing the job");
            Ok(id)
        }
        Some((id, state, message)) if !overwrite => Err(CoordinatorError::Refused(format!(
            "job {id} of {} ({}: {message}) writes to the same output directory ({}); continue it by running \
             this command again with --resume (or `coordinator resume --job {id}` while a coordinator serves the \
             state directory), or start a new job there with --overwrite_output_dir ({id}'s files are removed)",
            args.state_dir.display(),
            state.name(),
            plan.train.output_dir_or(&id).display()
        ))),
        _ => {
            if args.resume {
                tracing::info!("--resume: no killed or failed job writes to this output directory; starting a new job");
            }
            let (id, _) = coordinator.submit(spec)?;
            tracing::info!(job_id = %id, "job submitted");
            Ok(id)
        }
    }
}

/// What a signal did to the running jobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stopped {
    /// No job was running.
    Nothing,
    /// Every rank stopped after its step with a checkpoint.
    Gracefully,
    /// The stop was forced (a second signal, or --stop-timeout-s).
    AtOnce,
}

/// How the serving loop ended.
enum Ended {
    /// With --exit-when-done: the job ended in this state.
    Job(JobState),
    Signal(Received),
}

/// The first signal stops every active job gracefully: each rank finishes its step and writes
/// a checkpoint, the job ends KILLED. A second signal, or `timeout`, forces the stop (the jobs
/// are KILLED at once, their workers told to shut down).
async fn stop_jobs(coordinator: &Coordinator, signals: &mut Signals, first: Received, timeout: Duration) -> Stopped {
    let jobs = coordinator.active_job_ids();
    if jobs.is_empty() {
        tracing::info!(signal = first.name(), "no job is running; shutting down");
        return Stopped::Nothing;
    }
    let why = format!("the coordinator received {}", first.name());
    for id in &jobs {
        if let Err(e) = coordinator.kill(id, false, &why) {
            tracing::warn!(job_id = %id, error = %e, "cannot stop the job");
        }
    }
    tracing::warn!(
        signal = first.name(),
        jobs = ?jobs,
        "stopping: every rank finishes its step and checkpoints (another signal, or --stop-timeout-s {}, stops at once)",
        timeout.as_secs()
    );
    let mut changes = coordinator.subscribe();
    let deadline = tokio::time::Instant::now() + timeout;
    let ended = |coordinator: &Coordinator| {
        jobs.iter()
            .all(|id| coordinator.job_state(id).is_none_or(JobState::is_terminal))
    };
    let forced_by = loop {
        if ended(coordinator) {
            break None;
        }
        tokio::select! {
            second = signals.recv() => break Some(format!("a second signal ({})", second.name())),
            _ = tokio::time::sleep_until(deadline) => break Some(format!("--stop-timeout-s {}", timeout.as_secs())),
            _ = changes.changed() => {}
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    };
    if let Some(by) = &forced_by {
        tracing::warn!("stopping at once after {by}");
        for id in &jobs {
            if coordinator.job_state(id).is_some_and(JobState::is_active) {
                if let Err(e) = coordinator.kill(id, true, &format!("{why}; stopped at once after {by}")) {
                    tracing::warn!(job_id = %id, error = %e, "cannot stop the job");
                }
            }
        }
    }
    for id in &jobs {
        if let Ok(view) = coordinator.status(id) {
            eprintln!("job {id} {}: {}", view.job.state.name(), view.job.message);
        }
    }
    match forced_by {
        Some(_) => Stopped::AtOnce,
        None => Stopped::Gracefully,
    }
}

/// The server side of TLS from --tls-cert/--tls-key/--tls-client-ca (`None`: plain HTTP/2).
fn server_tls(args: &ServeArgs) -> Result<Option<ServerTlsConfig>> {
    let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) else {
        return Ok(None);
    };
    let read =
        |name: &'static str, path: &std::path::Path| tls::read_pem(name, path).map_err(|e| flag(name, e.to_string()));
    let mut config =
        ServerTlsConfig::new().identity(Identity::from_pem(read("--tls-cert", cert)?, read("--tls-key", key)?));
    if let Some(ca) = &args.tls_client_ca {
        config = config.client_ca_root(Certificate::from_pem(read("--tls-client-ca", ca)?));
    }
    Ok(Some(config))
}

/// The token every call must present: KORMLM_TOKEN (or the deprecated --token), else the one in
/// STATE_DIR/token, else a new random one. It is (re)written to STATE_DIR/token, mode 0600, for
/// the client commands; the workers this coordinator starts get it in their environment.
fn coordinator_token(args: &ServeArgs) -> Result<String> {
    let state = |e: secret::SecretError| flag("--state-dir", e.to_string());
    let path = args.state_dir.join(secret::TOKEN_FILE);
    if args.token.is_some() {
        tracing::warn!("{}", secret::TOKEN_FLAG_DEPRECATED);
    }
    let given = args
        .token
        .clone()
        .or_else(|| std::env::var(secret::TOKEN_ENV).ok().filter(|t| !t.is_empty()));
    if let Some(token) = given {
        TokenInterceptor::new(Some(&token)).map_err(|e| flag("KORMLM_TOKEN", e.to_string()))?;
        let current = path.exists().then(|| secret::read_token_file(&path, true)).transpose();
        if current.ok().flatten().as_deref() != Some(token.as_str()) {
            secret::write_private(&path, &format!("{token}\n")).map_err(state)?;
        }
        return Ok(token);
    }
    if path.exists() {
        let token = secret::read_token_file(&path, true).map_err(state)?;
        tracing::info!(token_file = %path.display(), "using the token of the state directory");
        return Ok(token);
    }
    let token = secret::generate_token().map_err(state)?;
    secret::write_private(&path, &format!("{token}\n")).map_err(state)?;
    tracing::info!(
        token_file = %path.display(),
        "generated a token (mode 0600); clients read it with --state-dir, workers elsewhere get it in KORMLM_TOKEN"
    );
    Ok(token)
}

pub async fn serve(args: ServeArgs) -> Result<i32> {
    let tls = server_tls(&args)?;
    let transport = server::transport(tls.clone())?;
    let tls_on = tls.is_some();
    if !is_loopback(&args.listen) && !tls_on {
        tracing::warn!(
            listen = %args.listen,
            "listening beyond loopback without TLS: the token and every call travel in clear text; serve TLS \
             with --tls-cert/--tls-key (workers and clients then use https:// and --tls-ca)"
        );
    }
    let worker_binary = args.worker_bin.clone().unwrap_or_else(default_worker_binary);
    let remote_start = remote::choose(
        args.launcher,
        args.ssh_port,
        args.launcher_args.as_deref(),
        args.hostfile.is_some(),
    )?;
    let placements = placements(&args, &worker_binary)?;
    let job = job_spec(&args, &placements, &worker_binary)?;
    if args.dry_run {
        let report = dry_run::report(&args, &placements, job.as_ref());
        println!("{report:#}");
        return Ok(0);
    }
    secret::ensure_private_dir(&args.state_dir).map_err(|e| flag("--state-dir", e.to_string()))?;
    let token = coordinator_token(&args)?;
    let mut signals = Signals::install().map_err(|e| CoordinatorError::Signal(e.to_string()))?;
    let store = Store::open(&args.state_dir)?;
    let settings = Settings {
        heartbeat_interval: Duration::from_millis(args.heartbeat_ms.max(10)),
        worker_timeout: Duration::from_millis(args.worker_timeout_ms.max(100)),
        token: Some(token),
        open_status: args.open_status,
        worker_tls_ca: tls_on
            .then(|| args.tls_ca.clone().or_else(|| args.tls_cert.clone()))
            .flatten(),
        ..Settings::default()
    };
    let coordinator = Coordinator::load(store, settings)?;
    let job_id = match (coordinator.active_job_id(), job) {
        (Some(id), _) => {
            tracing::info!(job_id = %id, "found an unfinished job in the state directory; continuing it");
            Some(id)
        }
        (None, Some((spec, plan))) => Some(start_or_resume(&coordinator, &args, spec, &plan)?),
        (None, None) => None,
    };

    let (listener, local) = server::bind(&args.listen).await?;
    let metrics = match &args.metrics_listen {
        Some(listen) => Some(
            metrics_server::start(
                listen,
                args.metrics_token_file.as_deref(),
                coordinator.clone(),
                &args.state_dir,
            )
            .await?,
        ),
        None => None,
    };
    let url = server::url(&local.to_string(), tls_on);
    let remote_url = server::url(launch_plan::advertised_url(local).trim_start_matches("http://"), tls_on);
    // Over TLS the local workers use a name the certificate can hold (not 0.0.0.0).
    let local_url = if tls_on && local.ip().is_unspecified() {
        remote_url.clone()
    } else {
        url.clone()
    };
    let addr_file = args.state_dir.join("coordinator.addr");
    let tmp = args.state_dir.join("coordinator.addr.tmp");
    std::fs::write(&tmp, format!("{url}\n"))
        .and_then(|_| std::fs::rename(&tmp, &addr_file))
        .map_err(|e| flag("--state-dir", format!("cannot write {}: {e}", addr_file.display())))?;
    tracing::info!(%url, state_dir = %args.state_dir.display(), "coordinator listening");
    println!("coordinator listening on {url}");

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(server::serve(coordinator.clone(), transport, listener, async move {
        let _ = stop_rx.await;
    }));

    let launch = Launch {
        worker_binary: worker_binary.clone(),
        local_url,
        remote: match remote_start {
            RemoteStart::Print => None,
            RemoteStart::Shell(shell) => Some(RemoteLaunch {
                shell,
                url: remote_url.clone(),
                token_file: std::path::absolute(args.state_dir.join(secret::TOKEN_FILE))
                    .map_err(|e| flag("--state-dir", e.to_string()))?,
                cwd: std::env::current_dir().map_err(|e| flag("--hostfile", format!("the working directory: {e}")))?,
            }),
        },
    };
    let mut changes = coordinator.subscribe();
    // Local workers per job, for the attempt they were started for.
    let mut launched: HashMap<String, (u32, LocalWorkers)> = HashMap::new();
    let outcome = loop {
        for (id, attempt, placements) in coordinator.pending_launches() {
            if launched.get(&id).map(|(a, _)| *a) == Some(attempt) {
                continue;
            }
            if let Some((_, old)) = launched.remove(&id) {
                old.terminate(Duration::from_secs(10)).await;
            }
            let printed = launch.remote.is_none();
            let slots: Vec<Slot> = placements
                .iter()
                .filter(|p| {
                    let here = launch_plan::is_local(&p.host);
                    if !here && printed {
                        let visible = launch_plan::host_visible_devices(&placements, &p.host);
                        let command = launch_plan::remote_worker_command(p.rank, p.local_rank, &remote_url, &visible);
                        tracing::warn!(
                            host = %p.host,
                            "start on {}: {command} (with KORMLM_TOKEN{} in its environment)",
                            p.host,
                            if tls_on { " and KORMLM_TLS_CA" } else { "" }
                        );
                    }
                    here || !printed
                })
                .map(|p| Slot {
                    rank: p.rank,
                    local_rank: p.local_rank,
                    cuda_visible_devices: Some(launch_plan::host_visible_devices(&placements, &p.host))
                        .filter(|ids| !ids.is_empty())
                        .map(|ids| launch_plan::device_list(&ids)),
                    host: (!launch_plan::is_local(&p.host)).then(|| p.host.clone()),
                    host_slots: placements.iter().filter(|q| q.host == p.host).count(),
                })
                .collect();
            let log_dir = args.state_dir.join("logs").join(&id).join(format!("attempt-{attempt}"));
            let workers = LocalWorkers::spawn(coordinator.clone(), &id, attempt, &launch, &slots, &log_dir)?;
            launched.insert(id, (attempt, workers));
        }
        if args.exit_when_done {
            if let Some(state) = job_id.as_deref().and_then(|id| coordinator.job_state(id)) {
                if state.is_terminal() {
                    break Ended::Job(state);
                }
            }
        }
        tokio::select! {
            signal = signals.recv() => break Ended::Signal(signal),
            _ = changes.changed() => {}
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    };
    // How long the workers this coordinator started get between SIGTERM and SIGKILL.
    let mut grace = Duration::from_secs(10);
    let code = match outcome {
        Ended::Signal(first) => {
            let stop_timeout = Duration::from_secs(args.stop_timeout_s);
            match stop_jobs(&coordinator, &mut signals, first, stop_timeout).await {
                Stopped::Nothing => 0,
                Stopped::Gracefully => first.exit_code(),
                Stopped::AtOnce => {
                    grace = Duration::from_secs(5);
                    first.exit_code()
                }
            }
        }
        Ended::Job(JobState::Succeeded) => 0,
        Ended::Job(state) => {
            if let Some(id) = &job_id {
                if let Ok(view) = coordinator.status(id) {
                    eprintln!("job {id} ended {}: {}", state.name(), view.job.message);
                }
            }
            1
        }
    };
    // Every process this coordinator started ends with it (each leads its own process group).
    for (_, (_, workers)) in launched {
        workers.terminate(grace).await;
    }
    if let Some(metrics) = metrics {
        metrics.stop();
    }
    let _ = stop_tx.send(());
    let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
    let _ = std::fs::remove_file(&addr_file);
    Ok(code)
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
