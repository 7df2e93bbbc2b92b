//! Secure by default (issue 14, points 1, 2 and 6), with real processes on real sockets: every
//! call is authenticated with a generated token kept private in the state directory, the
//! workers the coordinator starts get it in their environment only, the secret never shows on a
//! command line, in the logs or in `--dry-run`, and over TLS (certificates made here with
//! `rcgen`) a worker and the Python grpcio client work while a plaintext client, a client
//! trusting another CA and, with mutual TLS, a client without a certificate are refused.

use kormlm_e2e::{binary, busy_training_flags, config, oracle_python, run, wait_for, workspace_root, CoordinatorProc};
use kormlm_proto::auth::TokenInterceptor;
use kormlm_proto::v1::job_service_client::JobServiceClient;
use kormlm_proto::v1::{JobSpec, SubmitJobRequest};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `coordinator ARGS… --addr URL` with no token anywhere: not in the environment, and run from
/// a directory without a `kormlm-state/token`.
fn anonymous(c: &CoordinatorProc, cwd: &Path, args: &[&str]) -> Output {
    run(Command::new(binary("coordinator"))
        .current_dir(cwd)
        .args(args)
        .args(["--addr", &c.url])
        .env_remove("KORMLM_TOKEN")
        .env_remove("KORMLM_TOKEN_FILE"))
}

/// SubmitJob through gRPC with `token` (the CLI has no submit command): the gRPC status code.
fn submit(url: &str, token: Option<&str>) -> tonic::Code {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let channel = tonic::transport::Endpoint::from_shared(url.to_string())
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut client = JobServiceClient::with_interceptor(channel, TokenInterceptor::new(token).unwrap());
        let request = SubmitJobRequest {
            spec: Some(JobSpec::default()),
        };
        match client.submit_job(request).await {
            Ok(_) => tonic::Code::Ok,
            Err(status) => status.code(),
        }
    })
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn every_call_needs_the_generated_token_which_stays_private() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let cpu_demo = config("cpu-demo.json");
    let job = ["--config", cpu_demo.to_str().unwrap(), "--world_size", "1"];
    // A state directory other users may write to is refused (they could swap the token).
    std::fs::create_dir_all(&state).unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o777)).unwrap();
    let refused = run(Command::new(binary("coordinator"))
        .args(job)
        .args(["--listen", "127.0.0.1:0", "--state-dir"])
        .arg(&state)
        .env_remove("KORMLM_TOKEN"));
    assert!(!refused.status.success());
    assert!(
        text(&refused).contains("writable by other users (mode 777)"),
        "{}",
        text(&refused)
    );
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700)).unwrap();

    let c = CoordinatorProc::start(&state, &job);
    // The generated token: ≥ 128 random bits, in STATE_DIR/token with mode 0600.
    let token_file = state.join("token");
    assert_eq!(mode(&token_file), 0o600, "STATE_DIR/token is private");
    assert!(
        c.token.len() >= 32 && c.token.chars().all(|ch| ch.is_ascii_hexdigit()),
        "{:?}",
        c.token
    );
    eprintln!("token file mode {:o}, {} hex digits", mode(&token_file), c.token.len());

    // Without the token every JobService call is refused on loopback: status, list, watch, kill,
    // resume, and SubmitJob through gRPC (with a wrong token too).
    let elsewhere = dir.path();
    for args in [
        vec!["status", "--job", "job-1"],
        vec!["list"],
        vec!["watch", "--job", "job-1"],
        vec!["kill", "--job", "job-1"],
        vec!["resume", "--job", "job-1"],
    ] {
        let out = anonymous(&c, elsewhere, &args);
        assert!(!out.status.success(), "{args:?} answered without the token");
        assert!(text(&out).contains("requires a token"), "{args:?}: {}", text(&out));
    }
    assert_eq!(submit(&c.url, None), tonic::Code::Unauthenticated);
    assert_eq!(submit(&c.url, Some("not-the-token")), tonic::Code::Unauthenticated);
    // With the token the call reaches the job table (an empty spec is invalid).
    assert_eq!(submit(&c.url, Some(&c.token)), tonic::Code::InvalidArgument);
    let wrong = run(Command::new(binary("coordinator"))
        .current_dir(elsewhere)
        .args(["kill", "--job", "job-1", "--addr", &c.url])
        .env("KORMLM_TOKEN", "guessed"));
    assert!(text(&wrong).contains("requires a token"), "{}", text(&wrong));

    // A client reads the token from the state directory (or KORMLM_TOKEN; the harness's).
    let from_state = anonymous(
        &c,
        elsewhere,
        &["status", "--json", "--state-dir", state.to_str().unwrap()],
    );
    assert!(from_state.status.success(), "{}", text(&from_state));
    let status: serde_json::Value = serde_json::from_slice(&from_state.stdout).unwrap();
    assert_eq!(status["state"], "PENDING", "the refused kill changed nothing: {status}");
    // --token still works, with a deprecation warning.
    let flag = anonymous(&c, elsewhere, &["list", "--token", &c.token]);
    assert!(flag.status.success(), "{}", text(&flag));
    assert!(text(&flag).contains("--token is deprecated"), "{}", text(&flag));

    // A coordinator restarted on the state directory keeps the token (workers that outlive it
    // reconnect with it).
    let url = c.url.clone();
    drop(c);
    let again = CoordinatorProc::start_listening(&state, url.trim_start_matches("http://"), &[]);
    assert_eq!(again.token, std::fs::read_to_string(&token_file).unwrap().trim());
    assert_eq!(mode(&token_file), 0o600);
    let log = again.log();
    assert!(!log.contains(&again.token), "the token is in the coordinator's log");
    // A token file others may read is refused: the secret may have leaked.
    drop(again);
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let leaked = run(Command::new(binary("coordinator"))
        .args(["--listen", "127.0.0.1:0", "--state-dir"])
        .arg(&state)
        .env_remove("KORMLM_TOKEN"));
    assert!(!leaked.status.success());
    assert!(text(&leaked).contains("not private to this user"), "{}", text(&leaked));
}

#[test]
fn the_secret_never_shows_in_dry_run_output_or_logs_and_clear_text_is_warned_about() {
    let dir = tempfile::tempdir().unwrap();
    let hostfile = dir.path().join("hostfile");
    std::fs::write(&hostfile, "localhost slots=1\nnode2 slots=1\n").unwrap();
    let secret = "d0e5b1c7a9f3e2d4c6b8a0f1e3d5c7b9";
    let out = run(Command::new(binary("coordinator"))
        .current_dir(workspace_root())
        .args(["--config", config("cpu-demo.json").to_str().unwrap()])
        .args([
            "--hostfile",
            hostfile.to_str().unwrap(),
            "--listen",
            "0.0.0.0:50051",
            "--dry-run",
        ])
        .env("KORMLM_TOKEN", secret));
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        !text(&out).contains(secret),
        "the secret is in the dry-run output: {}",
        text(&out)
    );
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        plan["worker_environment"][0],
        "KORMLM_TOKEN (the contents of STATE_DIR/token)"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("the token and every call travel in clear text"),
        "{}",
        text(&out)
    );
}

/// A CA and certificates signed by it, as PEM files in a directory.
struct Pki {
    ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
}

fn write(path: PathBuf, contents: &str) -> PathBuf {
    std::fs::write(&path, contents).unwrap();
    path
}

/// A fresh CA named `name` with a server certificate for localhost/127.0.0.1 and a client
/// certificate, under `dir/name`.
fn pki(dir: &Path, name: &str) -> Pki {
    let dir = dir.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, format!("{name} CA"));
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let leaf = |names: Vec<String>, file: &str| {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(names).unwrap().signed_by(&key, &ca).unwrap();
        (
            write(dir.join(format!("{file}.pem")), &cert.pem()),
            write(dir.join(format!("{file}.key")), &key.serialize_pem()),
        )
    };
    let (server_cert, server_key) = leaf(vec!["localhost".into(), "127.0.0.1".into()], "server");
    let (client_cert, client_key) = leaf(vec!["kormlm-client".into()], "client");
    Pki {
        ca: write(dir.join("ca.pem"), &ca.pem()),
        server_cert,
        server_key,
        client_cert,
        client_key,
    }
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn over_tls_a_worker_and_the_python_client_work_and_untrusted_clients_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ours = pki(dir.path(), "ours");
    let other = pki(dir.path(), "other");
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let cpu_demo = config("cpu-demo.json");
    let mut args: Vec<String> = [
        "--config",
        path(&cpu_demo),
        "--num_workers",
        "1",
        "--device",
        "cpu",
        "--tls-cert",
        path(&ours.server_cert),
        "--tls-key",
        path(&ours.server_key),
        "--tls-ca",
        path(&ours.ca),
    ]
    .map(str::to_string)
    .to_vec();
    args.extend(busy_training_flags(&dir.path().join("out")));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let c = CoordinatorProc::start(&state, &refs).with_client_env("KORMLM_TLS_CA", path(&ours.ca));
    assert!(c.url.starts_with("https://127.0.0.1:"), "{}", c.url);

    // The worker the coordinator started trains over TLS.
    let status = wait_for("a step over TLS", Duration::from_secs(240), || {
        let s = c.status(Some("job-1"));
        assert_ne!(s["state"], "FAILED", "{s}\n{}", c.log());
        (s["global_step"].as_u64().unwrap_or(0) >= 1).then_some(s)
    });
    eprintln!("over TLS: step {} of {}", status["global_step"], status["state"]);
    // Its token came through the environment, never its command line.
    let pid = status["workers"][0]["pid"].as_u64().unwrap();
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    let contains = |haystack: &[u8], needle: &str| haystack.windows(needle.len()).any(|w| w == needle.as_bytes());
    assert!(
        !contains(&cmdline, &c.token),
        "the token is on the worker's command line"
    );
    assert!(contains(&environ, &format!("KORMLM_TOKEN={}", c.token)));
    assert!(contains(&cmdline, "https://"), "{}", String::from_utf8_lossy(&cmdline));

    // The Python grpcio client, with the CA PEM and the token of the state directory.
    let py = run(Command::new(oracle_python())
        .arg(workspace_root().join("tests/python/grpc_client.py"))
        .arg(&c.url)
        .arg(workspace_root().join("proto"))
        .arg(dir.path().join("gen"))
        .arg(&state)
        .arg(&ours.ca));
    let stdout = String::from_utf8_lossy(&py.stdout);
    assert!(py.status.success(), "python client over TLS failed:\n{}", text(&py));
    for expected in [
        "tls on",
        "health SERVING",
        "without token: UNAUTHENTICATED",
        "status job-1 RUNNING",
    ] {
        assert!(stdout.contains(expected), "{expected}: {stdout}");
    }

    // A plaintext client is refused and told to use https://.
    let plain = run(Command::new(binary("coordinator"))
        .args(["status", "--addr", &c.url.replace("https://", "http://")])
        .env("KORMLM_TOKEN", &c.token));
    assert!(!plain.status.success());
    assert!(text(&plain).contains("use an https:// URL"), "{}", text(&plain));
    // A client trusting another CA is refused: the certificate is not trusted.
    let stranger = run(Command::new(binary("coordinator"))
        .args(["status", "--addr", &c.url, "--tls-ca", path(&other.ca)])
        .env("KORMLM_TOKEN", &c.token));
    assert!(!stranger.status.success());
    assert!(text(&stranger).contains("UnknownIssuer"), "{}", text(&stranger));
    // An https:// URL without a CA is refused before connecting; a CA with http:// too.
    let no_ca = run(Command::new(binary("coordinator"))
        .args(["status", "--addr", &c.url])
        .env_remove("KORMLM_TLS_CA"));
    assert!(text(&no_ca).contains("needs the CA"), "{}", text(&no_ca));
    eprintln!(
        "plaintext: {}\nother CA: {}",
        text(&plain).trim(),
        text(&stranger).trim()
    );
}

#[test]
fn with_mutual_tls_a_client_without_a_certificate_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ours = pki(dir.path(), "ours");
    let other = pki(dir.path(), "other");
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let cpu_demo = config("cpu-demo.json");
    let c = CoordinatorProc::start(
        &state,
        &[
            "--config",
            path(&cpu_demo),
            "--world_size",
            "1",
            "--tls-cert",
            path(&ours.server_cert),
            "--tls-key",
            path(&ours.server_key),
            "--tls-client-ca",
            path(&ours.ca),
        ],
    );
    let status = |extra: &[&str]| {
        run(Command::new(binary("coordinator"))
            .args(["status", "--json", "--addr", &c.url, "--tls-ca", path(&ours.ca)])
            .args(extra)
            .env("KORMLM_TOKEN", &c.token)
            .env_remove("KORMLM_TLS_CERT")
            .env_remove("KORMLM_TLS_KEY"))
    };
    let without = status(&[]);
    assert!(!without.status.success(), "answered without a client certificate");
    eprintln!("without a client certificate: {}", text(&without).trim());
    // The server ends the handshake; the client names the missing certificate as the cause.
    assert!(
        text(&without).contains("give --tls-cert/--tls-key signed by its CA"),
        "{}",
        text(&without)
    );
    let foreign = status(&[
        "--tls-cert",
        path(&other.client_cert),
        "--tls-key",
        path(&other.client_key),
    ]);
    assert!(!foreign.status.success(), "answered a certificate of another CA");
    let with = status(&[
        "--tls-cert",
        path(&ours.client_cert),
        "--tls-key",
        path(&ours.client_key),
    ]);
    assert!(with.status.success(), "{}", text(&with));
    let job: serde_json::Value = serde_json::from_slice(&with.stdout).unwrap();
    assert_eq!(job["state"], "PENDING");
}
