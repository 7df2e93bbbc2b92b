//! The gRPC client a worker holds to its coordinator's worker service: every call carries the
//! token through the one interceptor.

use kormlm_proto::auth::TokenInterceptor;
use kormlm_proto::v1::worker_service_client::WorkerServiceClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

pub type CoordinatorClient = WorkerServiceClient<InterceptedService<Channel, TokenInterceptor>>;
