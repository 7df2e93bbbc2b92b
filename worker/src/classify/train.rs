//! Classifier fine-tuning: the training loop of the masked LM (`train::run`) over the
//! classification objective, so `worker classify train` and a `--task classify` job share its
//! DeepSpeed batch rule, ZeRO-2 over the ranks, schedules, fp16 loss scaling, autocast,
//! checkpoints and resume, the stop agreement, the run files (`params.json`,
//! `training_log.jsonl` with `train`/`eval`/`checkpoint`/`summary` records, `best/` and `final/`
//! in Hugging Face layout) and progress reports; early stopping watches the dev macro-F1.

use super::data::{self, Columns, LabelledSet};
use super::objective::Classification;
use super::ClassifyError;
use crate::comm::Collective;
use crate::model::sequence_classification::Labels;
use crate::train::{ProgressEvent, TrainJob};
use kormlm_proto::classify_args::ClassifyArgs;
use kormlm_proto::job_plan::JobPlan;
use kormlm_proto::train_args::TrainArgs;
use kormlm_proto::v1::TaskKind;
use std::path::{Path, PathBuf};
use tch::Device;

pub use super::objective::ClassifySummary;

/// The labelled files and where their text and labels are.
#[derive(Debug, Clone)]
pub struct TrainData {
    pub train_file: PathBuf,
    pub dev_file: PathBuf,
    pub columns: Columns,
    /// Label names in id order (single-label); default: the training file's values.
    pub labels: Option<Vec<String>>,
}

/// A classifier training run: the loop's job and the labelled data.
#[derive(Debug, Clone)]
pub struct ClassifyTrainJob {
    pub train: TrainJob,
    pub data: TrainData,
}

impl ClassifyTrainJob {
    /// `worker classify train`: resolves the DeepSpeed config at `config` for one rank with the
    /// same function as a job's, and checks that the flags are ones classification training
    /// honours. The output directory is `--output_dir`, else `MODEL_DIR/YYMMDD_HHMMSS`.
    pub fn new(
        config: &Path,
        device: Device,
        args: &TrainArgs,
        data: &ClassifyArgs,
        resume_from: Option<PathBuf>,
        now_unix_s: u64,
    ) -> Result<Self, ClassifyError> {
        let mut flags = args.to_map();
        flags.extend(data.to_map());
        let plan = JobPlan::resolve_file(config, TaskKind::Classify, flags)?;
        for warning in &plan.warnings {
            tracing::warn!("{warning}");
        }
        let output_dir = plan.train.output_dir_or(&crate::train::run_dir_name(now_unix_s));
        Ok(Self {
            train: TrainJob {
                args: plan.train,
                config: plan.config,
                device,
                output_dir,
                cache_dir: None,
                resume_from,
                run_id: None,
                job_id: None,
                attempt: 0,
            },
            data: TrainData::of_args(data)?,
        })
    }
}

impl TrainData {
    /// The files, columns and labels of a classifier's data flags (`ClassifyArgs::check` has
    /// made sure both files are named).
    pub fn of_args(args: &ClassifyArgs) -> Result<Self, ClassifyError> {
        Ok(Self {
            train_file: args.train_file.clone().unwrap_or_default(),
            dev_file: args.dev_file.clone().unwrap_or_default(),
            columns: Columns::of_args(args)?,
            labels: args.label_names(),
        })
    }
}

/// Reads the job's files and trains on them (see [`train_sets`]).
pub fn train(
    job: &ClassifyTrainJob,
    comm: &mut dyn Collective,
    on_progress: &mut dyn FnMut(&ProgressEvent),
    should_stop: &dyn Fn() -> bool,
) -> Result<ClassifySummary, ClassifyError> {
    let data = &job.data;
    let labels: Labels = data::label_space(&data.train_file, &data.columns, data.labels.as_deref())?;
    let train_set = data::read_labelled(&data.train_file, &data.columns, &labels)?;
    let dev_set = data::read_labelled(&data.dev_file, &data.columns, &labels)?;
    train_sets(job, labels, train_set, dev_set, comm, on_progress, should_stop)
}

/// Trains on labelled sets already read (`job.data` names their files in `params.json`) as rank
/// `comm.rank()` of `comm.world_size()`; `on_progress` hears of every logged step, evaluation
/// and checkpoint, `should_stop` ends the run after the current step with a checkpoint.
pub fn train_sets(
    job: &ClassifyTrainJob,
    labels: Labels,
    train_set: LabelledSet,
    dev_set: LabelledSet,
    comm: &mut dyn Collective,
    on_progress: &mut dyn FnMut(&ProgressEvent),
    should_stop: &dyn Fn() -> bool,
) -> Result<ClassifySummary, ClassifyError> {
    for set in [&train_set, &dev_set] {
        if set.is_empty() {
            return Err(ClassifyError::Data {
                path: set.path.display().to_string(),
                message: "no labelled rows".into(),
            });
        }
    }
    let files = (job.data.train_file.clone(), job.data.dev_file.clone());
    let mut objective = Classification::new(labels, train_set, dev_set, files);
    crate::train::run(&job.train, &mut objective, comm, on_progress, should_stop)?;
    Ok(objective
        .summary
        .expect("a finished run writes its summary through its objective"))
}
