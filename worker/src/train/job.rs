//! What a training run is told to do (masked LM or classifier alike).

use kormlm_proto::ds_config::ResolvedConfig;
use kormlm_proto::train_args::TrainArgs;
use std::path::PathBuf;
use tch::Device;

/// What a run is told to do.
#[derive(Debug, Clone)]
pub struct TrainJob {
    pub args: TrainArgs,
    pub config: ResolvedConfig,
    pub device: Device,
    /// Where the log, the best model and the summary go (written by rank 0).
    pub output_dir: PathBuf,
    /// Tokenised corpora are cached here.
    pub cache_dir: Option<PathBuf>,
    /// A checkpoint directory to continue from.
    pub resume_from: Option<PathBuf>,
    /// The run this is (`kormlm_run.json`, stored in every checkpoint); `None` for `worker
    /// train`: the checkpoint's run when resuming, else a new random id.
    pub run_id: Option<String>,
    /// The coordinator's job, for the run file (`None` for `worker train`).
    pub job_id: Option<String>,
    /// The job's attempt (1 for the first); 0 for `worker train`: the checkpoint's attempt + 1.
    pub attempt: u32,
}
