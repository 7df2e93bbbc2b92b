//! `augment-eval`: does the augmentation help a downstream classifier? For each training
//! fraction and seed a classifier is fine-tuned on the original rows and on the rows plus their
//! masked-LM copies (`item`), each scored on the test set; the report compares the conditions
//! (`report`, `plot`). The items are spread over the ranks (`plan`); each rank runs its own and
//! skips those with a result already (an earlier attempt's), and whichever rank finds every
//! result present writes the report, so a resumed or re-run experiment redoes nothing done.

pub mod item;
pub mod plan;
pub mod plot;
pub mod report;
pub mod splits;

use crate::augment::AugmentError;
use crate::classify::ClassifyError;
use crate::model::ModelError;
use crate::train::plot::PlotError;
use item::ItemResult;
use kormlm_proto::augment_args::AugmentArgs;
use kormlm_proto::augment_eval_args::AugmentEvalArgs;
use kormlm_proto::job_plan::JobPlan;
use serde::Serialize;
use serde_json::json;
use std::path::{Path, PathBuf};
use tch::Device;

pub const EXPERIMENT_FILE: &str = "experiment.json";

#[derive(Debug, thiserror::Error)]
pub enum AugmentEvalError {
    #[error(transparent)]
    Classify(#[from] ClassifyError),
    #[error(transparent)]
    Augment(#[from] AugmentError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Tokenizer(#[from] crate::tokenizer::TokenizerError),
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    #[error(transparent)]
    Plot(#[from] PlotError),
    /// The experiment's flags.
    #[error("{0}")]
    Usage(String),
    /// A file of the experiment's output directory.
    #[error("{path}: {message}")]
    Output { path: String, message: String },
}

impl AugmentEvalError {
    pub(crate) fn output(path: &Path, e: impl std::fmt::Display) -> Self {
        Self::Output {
            path: path.display().to_string(),
            message: e.to_string(),
        }
    }
}

/// A resolved experiment: the plan (the classifier's DeepSpeed config resolved for one rank, its
/// training flags, the augmentation's and the experiment's) and the device.
#[derive(Debug, Clone)]
pub struct AugmentEvalJob {
    pub plan: JobPlan,
    pub device: Device,
}

impl AugmentEvalJob {
    pub fn new(plan: JobPlan, device: Device) -> Result<Self, AugmentEvalError> {
        let job = Self { plan, device };
        let eval = job
            .plan
            .augment_eval
            .as_ref()
            .ok_or_else(|| AugmentEvalError::Usage("the job plan has no augment-eval flags".into()))?;
        eval.check().map_err(AugmentEvalError::Usage)?;
        if job.plan.train.output_dir.is_none() {
            return Err(AugmentEvalError::Usage(
                "--output_dir is required by augment-eval".into(),
            ));
        }
        job.plan
            .train
            .refuse_corpus(kormlm_proto::job_plan::AUGMENT_EVAL_DATA)
            .map_err(AugmentEvalError::Usage)?;
        Ok(job)
    }

    pub fn eval(&self) -> &AugmentEvalArgs {
        self.plan.augment_eval.as_ref().expect("checked in AugmentEvalJob::new")
    }

    pub fn augment(&self) -> &AugmentArgs {
        static DEFAULT: std::sync::OnceLock<AugmentArgs> = std::sync::OnceLock::new();
        self.plan
            .augment
            .as_ref()
            .unwrap_or_else(|| DEFAULT.get_or_init(AugmentArgs::default))
    }

    pub fn output_dir(&self) -> PathBuf {
        PathBuf::from(self.plan.train.output_dir.clone().unwrap_or_default())
    }

    /// Every item of the experiment, in plan order.
    pub fn items(&self) -> Vec<plan::Item> {
        let eval = self.eval();
        plan::items(&eval.fractions().unwrap_or_default(), self.plan.train.seed, eval.seeds)
    }

    /// What identifies the experiment: results of another one in the output directory are not
    /// reused, this one's always are (also under `--overwrite_output_dir`, so a restarted job
    /// never clears its own runs).
    fn identity(&self) -> serde_json::Value {
        // Whether to replace another experiment is not part of what this one is.
        let train = kormlm_proto::train_args::TrainArgs {
            overwrite_output_dir: false,
            ..self.plan.train.clone()
        };
        json!({
            "train": train,
            "augment": self.augment(),
            "eval": self.eval(),
            "config": self.plan.config.to_json(),
        })
    }
}

/// What one rank did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct AugmentEvalOutcome {
    /// Items of this rank.
    pub items: usize,
    /// Of them, those with a result now.
    pub completed: usize,
    /// Results an earlier attempt had already recorded.
    pub reused: usize,
    /// Whether this rank found every item done and wrote the report.
    pub report: Option<String>,
}

/// How long a rank other than 0 waits for rank 0 to claim the output directory.
const CLAIM_WAIT: std::time::Duration = std::time::Duration::from_secs(120);

/// Rank 0 records the experiment's identity in its output directory, or checks it against the
/// one there (another experiment's results would be silently mixed in); the other ranks wait
/// until the directory holds this experiment, so none of them works in a directory about to be
/// cleared.
fn claim_output_dir(job: &AugmentEvalJob, rank: usize) -> Result<(), AugmentEvalError> {
    let dir = job.output_dir();
    std::fs::create_dir_all(&dir).map_err(|e| AugmentEvalError::output(&dir, e))?;
    let path = dir.join(EXPERIMENT_FILE);
    let identity = job.identity();
    if rank != 0 {
        let deadline = std::time::Instant::now() + CLAIM_WAIT;
        loop {
            let recorded = std::fs::read_to_string(&path)
                .ok()
                .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok());
            if recorded.as_ref() == Some(&identity) {
                return Ok(());
            }
            if std::time::Instant::now() >= deadline {
                return Err(AugmentEvalError::output(
                    &path,
                    format!(
                        "rank 0 did not record this experiment within {} s (another experiment's, or none)",
                        CLAIM_WAIT.as_secs()
                    ),
                ));
            }
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    }
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let recorded: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| AugmentEvalError::output(&path, e))?;
            if recorded == identity {
                return Ok(());
            }
            if !job.plan.train.overwrite_output_dir {
                return Err(AugmentEvalError::Usage(format!(
                    "{} holds another experiment (its flags or config differ from these); pass --overwrite_output_dir \
                     to replace its results, or choose another --output_dir",
                    dir.display()
                )));
            }
            for name in ["items", report::REPORT_JSON, report::REPORT_MD, report::REPORT_PNG] {
                let old = dir.join(name);
                kormlm_proto::durable::remove_if_present(&old).map_err(|e| AugmentEvalError::output(&old, e))?;
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(AugmentEvalError::output(&path, e)),
    }
    let text = format!("{identity:#}\n");
    kormlm_proto::durable::write(&path, text).map_err(|e| AugmentEvalError::output(&path, e.error))
}

/// Runs rank `rank` of `world`'s items (skipping finished ones), then writes the report when
/// every item of the experiment has its result. `progress(done, total)` follows this rank's
/// items; `should_stop` ends the work after the current training step.
pub fn run(
    job: &AugmentEvalJob,
    (rank, world): (usize, usize),
    should_stop: &dyn Fn() -> bool,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<AugmentEvalOutcome, AugmentEvalError> {
    // The data first: an experiment with bad input never claims the output directory.
    let splits = splits::read(job.eval())?;
    claim_output_dir(job, rank)?;
    let all = job.items();
    let mine = plan::rank_items(
        &all,
        splits.train.len(),
        job.augment().num_augmentations.max(1),
        rank,
        world,
    );
    let dir = job.output_dir();
    let mut outcome = AugmentEvalOutcome {
        items: mine.len(),
        ..Default::default()
    };
    progress(0, mine.len());
    for item in &mine {
        if item::read_result(&dir, item)?.is_some() {
            outcome.reused += 1;
        } else if should_stop() || item::run_item(job, &splits, item, should_stop)?.is_none() {
            tracing::info!(
                rank,
                completed = outcome.completed,
                items = mine.len(),
                "augment-eval stopped on request"
            );
            return Ok(outcome);
        }
        outcome.completed += 1;
        progress(outcome.completed, mine.len());
    }
    let mut results: Vec<ItemResult> = Vec::with_capacity(all.len());
    for item in &all {
        match item::read_result(&dir, item)? {
            Some(result) => results.push(result),
            None => {
                tracing::info!(rank, waiting_for = %item.id(), "this rank's items are done; another rank writes the report");
                return Ok(outcome);
            }
        }
    }
    outcome.report = Some(write_report(job, &all, &results, &splits)?.display().to_string());
    Ok(outcome)
}

/// Writes `report.json`, `report.md` and `report.png`; returns the JSON's path.
fn write_report(
    job: &AugmentEvalJob,
    items: &[plan::Item],
    results: &[ItemResult],
    splits: &splits::Splits,
) -> Result<PathBuf, AugmentEvalError> {
    let dir = job.output_dir();
    let eval = job.eval();
    let report = report::build(&dir, items, results, splits, eval.bootstrap_samples, eval.split_seed)?;
    plot::render(&report, &dir.join(report::REPORT_PNG))?;
    let md = dir.join(report::REPORT_MD);
    kormlm_proto::durable::write(&md, report::markdown(&report)).map_err(|e| AugmentEvalError::output(&md, e.error))?;
    let path = dir.join(report::REPORT_JSON);
    let text = serde_json::to_string_pretty(&report).map_err(|e| AugmentEvalError::output(&path, e))?;
    kormlm_proto::durable::write(&path, text + "\n").map_err(|e| AugmentEvalError::output(&path, e.error))?;
    tracing::info!(report = %path.display(), "augment-eval report written");
    Ok(path)
}
