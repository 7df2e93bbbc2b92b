//! kormlm worker: runs ELECTRA masked-LM work through libtorch, either as a daemon that takes
//! its assignment from the coordinator or as standalone commands.

pub mod augment;
pub mod augment_eval;
pub mod autocast;
pub mod batch;
pub mod classify;
pub mod cli;
pub mod client;
pub mod comm;
pub mod commands;
pub mod corpus;
pub mod daemon;
pub mod dataset;
pub mod device;
pub mod error;
pub mod fill_mask;
pub mod job;
pub mod lines;
pub mod masking;
pub mod model;
pub mod optim;
pub mod tokenizer;
pub mod train;
pub mod work;

pub use error::WorkerError;
