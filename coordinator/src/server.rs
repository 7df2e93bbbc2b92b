//! Serves JobService, WorkerService, gRPC health and server reflection on one port behind the
//! authentication layer (over TLS when configured), and runs the background sweep that detects
//! lost workers.

use crate::auth::AuthLayer;
use crate::error::{CoordinatorError, Result};
use crate::job_service::JobApi;
use crate::state::Coordinator;
use crate::worker_service::WorkerApi;
use kormlm_proto::tls;
use kormlm_proto::v1::job_service_server::JobServiceServer;
use kormlm_proto::v1::worker_service_server::WorkerServiceServer;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::{Server, ServerTlsConfig};

/// Binds the listening socket; port 0 picks a free port.
pub async fn bind(addr: &str) -> Result<(TcpListener, SocketAddr)> {
    let fail = |message: String| CoordinatorError::Listen {
        addr: addr.to_string(),
        message,
    };
    let listener = TcpListener::bind(addr).await.map_err(|e| {
        let hint = if e.kind() == std::io::ErrorKind::AddrInUse {
            " (another process uses this port; pick another with --listen HOST:PORT)"
        } else {
            ""
        };
        fail(format!("{e}{hint}"))
    })?;
    let local = listener.local_addr().map_err(|e| fail(e.to_string()))?;
    Ok((listener, local))
}

/// The gRPC server's transport: TLS with `tls` (checked here, so a bad certificate or key stops
/// the coordinator before it listens), plain HTTP/2 without.
pub fn transport(tls: Option<ServerTlsConfig>) -> Result<Server> {
    let server = Server::builder();
    match tls {
        Some(config) => server.tls_config(config).map_err(|e| CoordinatorError::Flag {
            flag: "--tls-cert/--tls-key/--tls-client-ca".into(),
            message: format!("cannot set up TLS: {}", tls::error_chain(&e)),
        }),
        None => Ok(server),
    }
}

/// The URL of a listening address, https:// when it serves TLS.
pub fn url(addr: &str, tls: bool) -> String {
    format!("{}://{addr}", if tls { "https" } else { "http" })
}

/// Runs the gRPC server on `transport` (see [`transport`]) until `shutdown` resolves.
pub async fn serve(
    coordinator: Arc<Coordinator>,
    transport: Server,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter.set_serving::<JobServiceServer<JobApi>>().await;
    health_reporter.set_serving::<WorkerServiceServer<WorkerApi>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(kormlm_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| CoordinatorError::Rpc(format!("reflection service: {e}")))?;
    let reflection_alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(kormlm_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .map_err(|e| CoordinatorError::Rpc(format!("reflection service: {e}")))?;

    let sweeper = {
        let coordinator = coordinator.clone();
        let period = (coordinator.settings().worker_timeout / 4).max(Duration::from_millis(100));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            loop {
                tick.tick().await;
                coordinator.sweep();
            }
        })
    };

    let Some(token) = coordinator.settings().token.clone() else {
        sweeper.abort();
        return Err(CoordinatorError::Rpc(
            "no token: every call is authenticated, so the coordinator needs one".into(),
        ));
    };
    let auth = AuthLayer::new(token, coordinator.settings().open_status);
    let result = transport
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .layer(auth)
        .add_service(health_service)
        .add_service(reflection)
        .add_service(reflection_alpha)
        .add_service(JobServiceServer::new(JobApi::new(coordinator.clone())))
        .add_service(WorkerServiceServer::new(WorkerApi::new(coordinator)))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await
        .map_err(|e| CoordinatorError::Rpc(format!("gRPC server: {e}")));
    sweeper.abort();
    result
}
