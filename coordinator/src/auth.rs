//! The one authentication check: a tower layer over the whole gRPC server that lets a call of
//! `JobService` or `WorkerService` through only with the coordinator's token in the
//! `x-kormlm-token` metadata. With `--open-status` the read-only job calls (GetJobStatus,
//! WatchJob, ListJobs) are open; gRPC health and reflection are always open. There is always a
//! token (a coordinator started without one generates it into `STATE_DIR/token`), and it is
//! compared in constant time.

use crate::error::CoordinatorError;
use kormlm_proto::v1::{job_service_server, worker_service_server};
use kormlm_proto::TOKEN_METADATA;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use subtle::ConstantTimeEq;

/// What a refused call is told (the CLI, worker daemons and other gRPC clients all read it).
const TOKEN_REQUIRED: &str = "this coordinator requires a token: set KORMLM_TOKEN to the coordinator's secret, or \
                              let the client read it from the coordinator's STATE_DIR/token (--state-dir DIR or \
                              --token-file FILE); other gRPC clients send it in the `x-kormlm-token` metadata";

/// JobService methods that only read.
const READ_ONLY_JOB_CALLS: [&str; 3] = ["GetJobStatus", "WatchJob", "ListJobs"];

/// Which calls need the token.
#[derive(Debug)]
struct Policy {
    token: String,
    open_status: bool,
}

impl Policy {
    /// Whether the call at gRPC path `/package.Service/Method` must present the token.
    fn guards(&self, path: &str) -> bool {
        let Some((service, method)) = path.trim_start_matches('/').split_once('/') else {
            return false;
        };
        if service == job_service_server::SERVICE_NAME {
            !(self.open_status && READ_ONLY_JOB_CALLS.contains(&method))
        } else {
            service == worker_service_server::SERVICE_NAME
        }
    }

    fn check(&self, path: &str, presented: Option<&[u8]>) -> Result<(), CoordinatorError> {
        if !self.guards(path) {
            return Ok(());
        }
        match presented {
            Some(token) if bool::from(token.ct_eq(self.token.as_bytes())) => Ok(()),
            _ => Err(CoordinatorError::Unauthenticated(TOKEN_REQUIRED.into())),
        }
    }
}

/// Wraps the server's routes in the token check.
#[derive(Debug, Clone)]
pub struct AuthLayer {
    policy: Arc<Policy>,
}

impl AuthLayer {
    /// `token`: the shared secret; `open_status`: read-only job calls need no token.
    pub fn new(token: String, open_status: bool) -> Self {
        Self {
            policy: Arc::new(Policy { token, open_status }),
        }
    }
}

impl<S> tower_layer::Layer<S> for AuthLayer {
    type Service = Authenticated<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Authenticated {
            inner,
            policy: self.policy.clone(),
        }
    }
}

/// A service whose calls passed [`AuthLayer`]'s check.
#[derive(Debug, Clone)]
pub struct Authenticated<S> {
    inner: S,
    policy: Arc<Policy>,
}

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

impl<S, ReqBody, ResBody> tower_service::Service<http::Request<ReqBody>> for Authenticated<S>
where
    S: tower_service::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    ResBody: Default + Send + 'static,
    S::Error: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let presented = request.headers().get(TOKEN_METADATA).map(|v| v.as_bytes());
        match self.policy.check(request.uri().path(), presented) {
            Ok(()) => Box::pin(self.inner.call(request)),
            Err(refused) => {
                tracing::warn!(path = request.uri().path(), "call refused: no valid token");
                let response = tonic::Status::from(refused).into_http::<ResBody>();
                Box::pin(std::future::ready(Ok(response)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server;
    use crate::state::{Coordinator, Settings};
    use crate::store::Store;
    use kormlm_proto::auth::TokenInterceptor;
    use kormlm_proto::v1::job_service_client::JobServiceClient;
    use kormlm_proto::v1::worker_service_client::WorkerServiceClient;
    use kormlm_proto::v1::{GetJobStatusRequest, KillJobRequest, RendezvousRequest};
    use tonic::service::interceptor::InterceptedService;
    use tonic::transport::Channel;

    #[test]
    fn the_policy_guards_the_kormlm_services_only() {
        let closed = Policy {
            token: "s".into(),
            open_status: false,
        };
        assert!(closed.guards("/kormlm.v1.JobService/GetJobStatus"));
        assert!(closed.guards("/kormlm.v1.WorkerService/Register"));
        assert!(!closed.guards("/grpc.health.v1.Health/Check"));
        assert!(!closed.guards("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"));
        let open = Policy {
            token: "s".into(),
            open_status: true,
        };
        for method in READ_ONLY_JOB_CALLS {
            assert!(!open.guards(&format!("/kormlm.v1.JobService/{method}")), "{method}");
        }
        assert!(open.guards("/kormlm.v1.JobService/KillJob"));
        assert!(open.guards("/kormlm.v1.JobService/SubmitJob"));
        assert!(open.guards("/kormlm.v1.WorkerService/Heartbeat"));
        assert!(open.check("/kormlm.v1.JobService/KillJob", Some(b"s")).is_ok());
        assert!(open.check("/kormlm.v1.JobService/KillJob", Some(b"x")).is_err());
        assert!(open.check("/kormlm.v1.JobService/KillJob", None).is_err());
        assert!(closed.check("/kormlm.v1.JobService/ListJobs", None).is_err());
        assert!(closed.check("/kormlm.v1.JobService/ListJobs", Some(b"")).is_err());
        assert!(closed.check("/kormlm.v1.JobService/ListJobs", Some(b"ss")).is_err());
        assert!(closed.check("/grpc.health.v1.Health/Check", None).is_ok());
    }

    /// A served coordinator with the token `secret`; returns its URL.
    async fn serve(dir: &std::path::Path, open_status: bool) -> String {
        let settings = Settings {
            token: Some("secret".into()),
            open_status,
            ..Settings::default()
        };
        let coordinator = Coordinator::load(Store::open(dir).unwrap(), settings).unwrap();
        let (listener, addr) = server::bind("127.0.0.1:0").await.unwrap();
        let transport = server::transport(None).unwrap();
        tokio::spawn(server::serve(coordinator, transport, listener, std::future::pending()));
        format!("http://{addr}")
    }

    async fn channel(url: &str) -> Channel {
        Channel::from_shared(url.to_string()).unwrap().connect().await.unwrap()
    }

    async fn workers(url: &str, token: &str) -> WorkerServiceClient<InterceptedService<Channel, TokenInterceptor>> {
        WorkerServiceClient::with_interceptor(channel(url).await, TokenInterceptor::new(Some(token)).unwrap())
    }

    #[tokio::test]
    async fn rendezvous_needs_the_token_like_registration() {
        let dir = tempfile::tempdir().unwrap();
        let url = serve(dir.path(), false).await;
        let request = || RendezvousRequest {
            job_id: "job-1".into(),
            ..Default::default()
        };
        let refused = workers(&url, "wrong").await.rendezvous(request()).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Unauthenticated);
        assert!(refused.message().contains("requires a token"), "{refused:?}");
        // With the right token the call reaches the job table (which has no job-1).
        let other = workers(&url, "secret").await.rendezvous(request()).await.unwrap_err();
        assert_ne!(other.code(), tonic::Code::Unauthenticated, "{other:?}");
    }

    #[tokio::test]
    async fn open_status_opens_reading_calls_only() {
        let dir = tempfile::tempdir().unwrap();
        let url = serve(dir.path(), true).await;
        let mut anonymous = JobServiceClient::new(channel(&url).await);
        let status = anonymous
            .get_job_status(GetJobStatusRequest::default())
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");
        let kill = anonymous
            .kill_job(KillJobRequest {
                job_id: "job-1".into(),
                force: false,
            })
            .await
            .unwrap_err();
        assert_eq!(kill.code(), tonic::Code::Unauthenticated);
        let mut health = tonic_health::pb::health_client::HealthClient::new(channel(&url).await);
        health
            .check(tonic_health::pb::HealthCheckRequest::default())
            .await
            .expect("health stays open");
    }
}
