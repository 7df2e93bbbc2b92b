//! `--metrics-listen ADDR`: a small HTTP/1.1 server (hyper) answering `GET /metrics` with
//! [`crate::metrics`]; 404 for other paths, 405 for other methods. Read-only and open unless
//! `--metrics-token-file FILE` is given, which requires `Authorization: Bearer TOKEN` (as
//! Prometheus sends it with `authorization.credentials_file`), compared in constant time. Every
//! connection has deadlines: the request head within [`HEADER_TIMEOUT`], the whole connection
//! within [`CONNECTION_TIMEOUT`]; at most [`MAX_CONNECTIONS`] are served at once.

use crate::error::{CoordinatorError, Result};
use crate::metrics::{self, Snapshot};
use crate::state::Coordinator;
use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use kormlm_proto::{now_ms, secret};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// How long a client may take to send a request's head.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one connection (keep-alive included) may stay open.
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(60);
/// Connections served at once; more wait for a free slot (the kernel's backlog holds them).
pub const MAX_CONNECTIONS: usize = 32;

/// The port `--metrics-listen PORT` (without a host) binds on: loopback.
const DEFAULT_HOST: &str = "127.0.0.1";

fn flag(flag: &str, message: impl Into<String>) -> CoordinatorError {
    CoordinatorError::Flag {
        flag: flag.into(),
        message: message.into(),
    }
}

/// `HOST:PORT`, or a bare `PORT` on loopback.
pub fn listen_address(value: &str) -> String {
    if value.parse::<u16>().is_ok() {
        format!("{DEFAULT_HOST}:{value}")
    } else {
        value.to_string()
    }
}

/// Reads the bearer token of `--metrics-token-file`: one line, not readable by every user (a
/// Kubernetes Secret mounted with mode 0400 or 0600 is fine).
pub fn read_token(path: &Path) -> Result<String> {
    use std::os::unix::fs::PermissionsExt;
    let name = "--metrics-token-file";
    let meta = std::fs::metadata(path).map_err(|e| flag(name, format!("{}: {e}", path.display())))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o004 != 0 {
        return Err(flag(
            name,
            format!(
                "{} is readable by every user (mode {mode:o}): `chmod 600` it (or mount the Secret with defaultMode 0400)",
                path.display()
            ),
        ));
    }
    secret::read_token_file(path, false).map_err(|e| flag(name, e.to_string()))
}

/// Who may read `/metrics`.
#[derive(Debug)]
struct Access {
    token: Option<String>,
}

impl Access {
    fn allows(&self, request: &Request<Incoming>) -> bool {
        let Some(token) = &self.token else {
            return true;
        };
        let presented = request.headers().get(header::AUTHORIZATION).map(|v| v.as_bytes());
        bearer(presented).is_some_and(|p| bool::from(p.ct_eq(token.as_bytes())))
    }
}

/// The credentials of an `Authorization: Bearer …` header (the scheme is case-insensitive).
fn bearer(value: Option<&[u8]>) -> Option<&[u8]> {
    let (scheme, credentials) = value?.split_at_checked(7)?;
    scheme.eq_ignore_ascii_case(b"bearer ").then_some(credentials)
}

fn response(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    if let Ok(value) = header::HeaderValue::from_str(content_type) {
        response.headers_mut().insert(header::CONTENT_TYPE, value);
    }
    response
}

const PLAIN: &str = "text/plain; charset=utf-8";

fn answer(coordinator: &Coordinator, access: &Access, request: &Request<Incoming>) -> Response<Full<Bytes>> {
    if !access.allows(request) {
        let mut refused = response(
            StatusCode::UNAUTHORIZED,
            PLAIN,
            "this endpoint requires `Authorization: Bearer TOKEN` with the token of --metrics-token-file\n",
        );
        refused.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer realm=\"kormlm metrics\""),
        );
        return refused;
    }
    if request.uri().path() != "/metrics" {
        return response(StatusCode::NOT_FOUND, PLAIN, "not found: metrics are at /metrics\n");
    }
    if request.method() != Method::GET {
        let mut refused = response(StatusCode::METHOD_NOT_ALLOWED, PLAIN, "only GET is allowed\n");
        refused
            .headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("GET"));
        return refused;
    }
    let snapshot = Snapshot {
        jobs: coordinator.metrics_snapshot(),
        now_ms: now_ms(),
    };
    match metrics::render(snapshot) {
        Ok(text) => response(StatusCode::OK, metrics::CONTENT_TYPE, text),
        Err(e) => {
            tracing::error!(error = %e, "cannot render the metrics");
            response(StatusCode::INTERNAL_SERVER_ERROR, PLAIN, "cannot render the metrics\n")
        }
    }
}

fn is_loopback(addr: &SocketAddr) -> bool {
    match addr.ip() {
        IpAddr::V4(ip) => ip.is_loopback(),
        IpAddr::V6(ip) => ip.is_loopback() || ip.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback()),
    }
}

/// A bound metrics endpoint; [`MetricsServer::serve`] answers on it.
pub struct MetricsServer {
    listener: TcpListener,
    local: SocketAddr,
    access: Arc<Access>,
}

impl MetricsServer {
    /// Binds `listen` (see [`listen_address`]). Beyond loopback it warns: without a token that
    /// anyone who reaches the port reads the jobs' names, losses, hosts and pids; with one that
    /// the bearer token crosses the network in clear text (this port has no TLS).
    pub async fn bind(listen: &str, token: Option<String>) -> Result<Self> {
        let addr = listen_address(listen);
        let listener = TcpListener::bind(&addr)
            .await
            .map_err(|e| flag("--metrics-listen", format!("cannot listen on {addr}: {e}")))?;
        let local = listener
            .local_addr()
            .map_err(|e| flag("--metrics-listen", format!("{addr}: {e}")))?;
        if !is_loopback(&local) {
            match &token {
                None => tracing::warn!(
                    listen = %local,
                    "/metrics is served beyond loopback without a token: whoever reaches this port reads the jobs' \
                     ids, losses, hosts and pids (read-only); require a bearer token with --metrics-token-file FILE"
                ),
                Some(_) => tracing::warn!(
                    listen = %local,
                    "/metrics is served beyond loopback over plain HTTP: the bearer token of --metrics-token-file \
                     crosses the network in clear text; keep the port on a trusted network or behind a TLS proxy"
                ),
            }
        }
        Ok(Self {
            listener,
            local,
            access: Arc::new(Access { token }),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Answers until the task is dropped or aborted.
    pub async fn serve(self, coordinator: Arc<Coordinator>) {
        let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        loop {
            let Ok(slot) = slots.clone().acquire_owned().await else {
                return;
            };
            let (stream, peer) = match self.listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    tracing::warn!(error = %e, "metrics: cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let coordinator = coordinator.clone();
            let access = self.access.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                    let reply = answer(&coordinator, &access, &request);
                    async move { Ok::<_, std::convert::Infallible>(reply) }
                });
                let connection = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT)
                    .serve_connection(TokioIo::new(stream), service);
                match tokio::time::timeout(CONNECTION_TIMEOUT, connection).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "metrics connection ended"),
                    Err(_) => tracing::debug!(%peer, "metrics connection closed after {CONNECTION_TIMEOUT:?}"),
                }
                drop(slot);
            });
        }
    }
}

/// The file `--metrics-listen` writes the bound address to, in the state directory.
pub const ADDR_FILE: &str = "metrics.addr";

/// A running metrics endpoint; it stops (and its address file goes) with [`Running::stop`].
pub struct Running {
    task: tokio::task::JoinHandle<()>,
    addr_file: std::path::PathBuf,
}

impl Running {
    pub fn stop(self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.addr_file);
    }
}

/// `--metrics-listen`/`--metrics-token-file`: reads the token, binds, writes
/// `STATE_DIR/metrics.addr` (`http://HOST:PORT/metrics`) and serves in the background.
pub async fn start(
    listen: &str,
    token_file: Option<&Path>,
    coordinator: Arc<Coordinator>,
    state_dir: &Path,
) -> Result<Running> {
    let token = token_file.map(read_token).transpose()?;
    let server = MetricsServer::bind(listen, token).await?;
    let url = format!("http://{}/metrics", server.local_addr());
    let addr_file = state_dir.join(ADDR_FILE);
    kormlm_proto::durable::write(&addr_file, format!("{url}\n").as_bytes())
        .map_err(|e| flag("--state-dir", format!("cannot write {}: {e}", addr_file.display())))?;
    tracing::info!(%url, "serving Prometheus metrics");
    println!("metrics on {url}");
    Ok(Running {
        task: tokio::spawn(server.serve(coordinator)),
        addr_file,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_credentials() {
        assert_eq!(bearer(Some(b"Bearer abc")), Some(&b"abc"[..]));
        assert_eq!(bearer(Some(b"bearer abc")), Some(&b"abc"[..]));
        assert_eq!(bearer(Some(b"Basic abc")), None);
        assert_eq!(bearer(Some(b"Bearer")), None);
        assert_eq!(bearer(None), None);
    }

    #[test]
    fn a_bare_port_binds_loopback() {
        assert_eq!(listen_address("9464"), "127.0.0.1:9464");
        assert_eq!(listen_address("0.0.0.0:9464"), "0.0.0.0:9464");
        assert_eq!(listen_address("[::1]:9464"), "[::1]:9464");
    }

    #[test]
    fn a_token_file_readable_by_everyone_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics-token");
        std::fs::write(&path, "s3cret\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let refused = read_token(&path).unwrap_err().to_string();
        assert!(
            refused.contains("--metrics-token-file") && refused.contains("chmod 600"),
            "{refused}"
        );
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o400)).unwrap();
        assert_eq!(read_token(&path).unwrap(), "s3cret");
        std::fs::write(dir.path().join("empty"), "").unwrap();
        assert!(read_token(&dir.path().join("empty")).is_err());
        assert!(read_token(&dir.path().join("missing")).is_err());
    }
}
