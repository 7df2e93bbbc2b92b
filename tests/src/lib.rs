//! The one test harness of kormlm: end-to-end tests start the real `coordinator` and `worker`
//! binaries as separate processes on loopback and talk to them through their command lines and
//! gRPC; the worker's oracle tests (`worker/tests`) take their fixtures from here too.
//!
//! The binaries come from `KORMLM_BIN_DIR`, else `target/release` of this workspace
//! (`./test.sh` builds them first).

mod command;
mod data;
mod flags;
pub mod grpc;
mod oracle;
mod procs;
mod summary;
mod weights;

pub use command::{run, run_with_input};
pub use data::{
    config, nsmc_documents, nsmc_documents_where, shared_data, text, workspace_root, zero2_config, Fixture,
};
pub use flags::{busy_training_flags, tiny_training, worker_augment_flags};
pub use oracle::{
    assert_report_accuracy, classify_oracle, oracle, oracle_python, oracle_vocabulary, tiny_dropout_model, tiny_model,
};
pub use procs::{
    bin_dir, binary, limit_file_size, parent_pid, pid_alive, read_token, wait_for, worker_state, CoordinatorProc, Proc,
};
pub use summary::{assert_early_stopped, logged_records, logged_steps, training_log, val_loss_history};
pub use weights::{max_weight_diff, read_weights};
