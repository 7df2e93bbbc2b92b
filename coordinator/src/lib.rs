//! kormlm coordinator: the gRPC job service, worker registration and rendezvous, local worker
//! launching and the sled-backed job state.

pub mod auth;
pub mod cli;
pub mod client;
pub mod dry_run;
pub mod error;
pub mod job_service;
pub mod launch_plan;
pub mod launcher;
pub mod metrics;
pub mod metrics_server;
pub mod own_processes;
pub mod remote;
pub mod run;
pub mod run_dir;
pub mod server;
pub mod signals;
pub mod state;
pub mod status_view;
pub mod store;
pub mod wire;
pub mod worker_service;

pub use error::{CoordinatorError, Result};
