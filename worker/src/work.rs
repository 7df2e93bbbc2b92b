//! The work a worker runs, decoded once: from the coordinator's `Assignment` (the daemon) or from
//! the command line (`worker train`, `worker augment`). The one owner of the device mapping, the
//! run's output directory, the token cache directory and the defaults; what it builds is what
//! `job.rs` and the commands run.

use crate::augment::io::{OutputFormat, Table};
use crate::augment::{AugmentOptions, AugmentSummary};
use crate::augment_eval::{AugmentEvalJob, AugmentEvalOutcome};
use crate::classify::train::{ClassifySummary, ClassifyTrainJob, TrainData};
use crate::cli::{AugmentCommand, TrainCommand};
use crate::device::parse_device;
use crate::error::WorkerError;
use crate::model::LoadedModel;
use crate::train::{TrainJob, TrainSummary};
use kormlm_proto::augment_args::AugmentArgs;
use kormlm_proto::classify_args::ClassifyArgs;
use kormlm_proto::ds_config::ResolvedConfig;
use kormlm_proto::job_plan::{JobPlan, PlanError};
use kormlm_proto::train_args::TrainArgs;
use kormlm_proto::v1::{Assignment, DeviceKind, TaskKind};
use serde::Serialize;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use tch::Device;

/// What one worker process runs.
#[allow(clippy::large_enum_variant)] // built once per process and moved to the work thread
pub enum Work {
    Train(TrainJob),
    Classify(ClassifyTrainJob),
    Augment(AugmentJob),
    AugmentEval(AugmentEvalJob),
}

/// An augmentation: the model, its window and seed, the device and the input/output options.
#[derive(Debug, Clone)]
pub struct AugmentJob {
    /// Local model directory or Hugging Face hub id.
    pub model: String,
    pub revision: Option<String>,
    pub seed: u64,
    /// Model window in tokens, [CLS] and [SEP] included.
    pub max_seq_len: usize,
    pub device: Device,
    pub args: AugmentArgs,
}

/// What finished work produced (logged by the daemon, printed by the commands).
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum WorkOutcome {
    Train(TrainSummary),
    Classify(ClassifySummary),
    Augment(AugmentOutcome),
    AugmentEval(AugmentEvalOutcome),
}

/// One rank's share of an augmentation job.
#[derive(Debug, Clone, Serialize)]
pub struct AugmentOutcome {
    /// Totals of the chunks augmented now.
    pub summary: AugmentSummary,
    /// The chunks of this rank.
    pub chunks: u64,
    /// Those with a part file now (fewer than `chunks` when the work was stopped).
    pub completed_chunks: u64,
    /// Chunks whose part file an earlier attempt had already written.
    pub reused_chunks: usize,
}

impl WorkOutcome {
    /// Whether the work stopped on request before it was complete.
    pub fn stopped_early(&self) -> bool {
        match self {
            Self::Train(summary) => summary.stopped_by_request,
            Self::Classify(summary) => summary.stopped_by_request,
            Self::Augment(outcome) => outcome.completed_chunks < outcome.chunks,
            Self::AugmentEval(outcome) => outcome.completed < outcome.items,
        }
    }
}

impl std::fmt::Display for WorkOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&serde_json::to_string(self).map_err(|_| std::fmt::Error)?)
    }
}

impl Work {
    /// Decodes the coordinator's assignment: the flags, the resolved config, the device, the
    /// output directory (`--output_dir`, else `MODEL_DIR/JOB_ID`, unless the coordinator chose
    /// one) and the checkpoint to continue from.
    pub fn from_assignment(assignment: &Assignment) -> Result<Self, WorkerError> {
        let train = TrainArgs::from_map(&assignment.args).map_err(|e| WorkerError::Assignment(PlanError::Flags(e)))?;
        let device = assigned_device(assignment);
        match TaskKind::try_from(assignment.task) {
            Ok(TaskKind::Train) => Ok(Self::Train(assigned_train_job(assignment, train, device)?)),
            Ok(TaskKind::Classify) => {
                let args = ClassifyArgs::from_map(&assignment.args)
                    .map_err(|e| WorkerError::Assignment(PlanError::Flags(e)))?;
                Ok(Self::Classify(ClassifyTrainJob {
                    train: assigned_train_job(assignment, train, device)?,
                    data: TrainData::of_args(&args)?,
                }))
            }
            Ok(TaskKind::Augment) => {
                let args = AugmentArgs::from_map(&assignment.args)
                    .map_err(|e| WorkerError::Assignment(PlanError::Flags(e)))?;
                Ok(Self::Augment(AugmentJob {
                    model: train.model_name_or_path,
                    revision: train.revision,
                    seed: train.seed,
                    max_seq_len: train.max_seq_len as usize,
                    device,
                    args,
                }))
            }
            Ok(TaskKind::AugmentEval) => {
                let config = ResolvedConfig::from_json(&assignment.resolved_config_json)
                    .map_err(|e| WorkerError::Assignment(PlanError::Config(e)))?;
                let flags = |e: String| WorkerError::Assignment(PlanError::Flags(e));
                let plan = JobPlan {
                    task: TaskKind::AugmentEval,
                    config,
                    warnings: Vec::new(),
                    train,
                    augment: Some(AugmentArgs::from_map(&assignment.args).map_err(flags)?),
                    augment_eval: Some(
                        kormlm_proto::augment_eval_args::AugmentEvalArgs::from_map(&assignment.args).map_err(flags)?,
                    ),
                    classify: None,
                };
                Ok(Self::AugmentEval(AugmentEvalJob::new(plan, device)?))
            }
            _ => Err(WorkerError::UnsupportedTask(assignment.task)),
        }
    }
}

/// The training run of an assignment (masked LM or classifier): its resolved config, its output
/// directory (`--output_dir`, else `MODEL_DIR/JOB_ID`, unless the coordinator chose one), the
/// checkpoint to continue from, the run and the attempt.
fn assigned_train_job(assignment: &Assignment, train: TrainArgs, device: Device) -> Result<TrainJob, WorkerError> {
    let config = ResolvedConfig::from_json(&assignment.resolved_config_json)
        .map_err(|e| WorkerError::Assignment(PlanError::Config(e)))?;
    let output_dir = if assignment.output_dir.is_empty() {
        train.output_dir_or(&assignment.job_id)
    } else {
        PathBuf::from(&assignment.output_dir)
    };
    Ok(TrainJob {
        args: train,
        config,
        device,
        output_dir,
        cache_dir: cache_dir(None),
        resume_from: (!assignment.resume_from.is_empty()).then(|| PathBuf::from(&assignment.resume_from)),
        // A coordinator that sends no run id: the job id is the same on every attempt, so the
        // job still recognises its own output directory.
        run_id: Some(if assignment.run_id.is_empty() {
            assignment.job_id.clone()
        } else {
            assignment.run_id.clone()
        }),
        job_id: Some(assignment.job_id.clone()),
        attempt: assignment.attempt,
    })
}

/// `worker train`: the config file resolved for one rank by the same function as a job's, the
/// output directory `--output_dir`, else `MODEL_DIR/YYMMDD_HHMMSS` (UTC, at `now_unix_s`).
pub fn train_job_from_command(command: &TrainCommand, now_unix_s: u64) -> Result<TrainJob, WorkerError> {
    let plan = JobPlan::resolve_file(&command.config, TaskKind::Train, command.train.to_map())?;
    for warning in &plan.warnings {
        tracing::warn!("{warning}");
    }
    let device = parse_device(&command.device)?;
    let output_dir = plan.train.output_dir_or(&crate::train::run_dir_name(now_unix_s));
    Ok(TrainJob {
        args: plan.train,
        config: plan.config,
        device,
        output_dir,
        cache_dir: cache_dir(command.cache_dir.clone()),
        resume_from: command.resume_from.clone(),
        run_id: None,
        job_id: None,
        attempt: 0,
    })
}

impl AugmentJob {
    /// `worker augment` (and `worker augment-report`).
    pub fn from_command(command: &AugmentCommand) -> Result<Self, WorkerError> {
        Ok(Self {
            model: command.model.clone(),
            revision: command.revision.clone(),
            seed: command.seed,
            max_seq_len: command.max_seq_len,
            device: parse_device(&command.device)?,
            args: command.augment.clone(),
        })
    }

    /// The input table, the output format and path, and the augmentation options.
    pub fn setup(&self) -> Result<(Table, OutputFormat, PathBuf, AugmentOptions), WorkerError> {
        crate::augment::setup(&self.args, self.seed, self.max_seq_len).map_err(WorkerError::Augment)
    }

    pub fn load_model(&self) -> Result<LoadedModel, WorkerError> {
        Ok(LoadedModel::load(&self.model, self.revision.as_deref(), self.device)?)
    }
}

/// The device an assignment gives this rank: its first CUDA device, or the CPU.
pub fn assigned_device(assignment: &Assignment) -> Device {
    match DeviceKind::try_from(assignment.device) {
        Ok(DeviceKind::Cuda) => Device::Cuda(assignment.cuda_devices.first().copied().unwrap_or(0) as usize),
        _ => Device::Cpu,
    }
}

/// Where tokenised corpora are cached: `--cache_dir`, else `$KORMLM_CACHE/tokens`, else
/// `~/.cache/kormlm/tokens` (none without a home directory).
pub fn cache_dir(flag: Option<PathBuf>) -> Option<PathBuf> {
    cache_dir_from(flag, std::env::var_os("KORMLM_CACHE"), std::env::var_os("HOME"))
}

fn cache_dir_from(flag: Option<PathBuf>, kormlm_cache: Option<OsString>, home: Option<OsString>) -> Option<PathBuf> {
    flag.or_else(|| {
        kormlm_cache
            .map(PathBuf::from)
            .or_else(|| home.map(|h| Path::new(&h).join(".cache/kormlm")))
            .map(|d| d.join("tokens"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command};
    use clap::Parser;
    use kormlm_proto::failure::FailureKind;
    use kormlm_proto::job_plan::AUGMENT_ONLY_CONFIG;

    fn assignment(task: TaskKind, args: &[(&str, &str)]) -> Assignment {
        Assignment {
            job_id: "job-7".into(),
            world_size: 2,
            rank: 1,
            task: task as i32,
            resolved_config_json: kormlm_proto::ds_config::DsConfig::parse(AUGMENT_ONLY_CONFIG, "c")
                .unwrap()
                .config
                .resolve(2, "c")
                .unwrap()
                .to_json(),
            args: args.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            ..Default::default()
        }
    }

    fn train_job(work: Work) -> TrainJob {
        match work {
            Work::Train(job) => job,
            Work::Classify(job) => panic!("classifier training {job:?}"),
            Work::Augment(job) => panic!("augmentation {job:?}"),
            Work::AugmentEval(job) => panic!("augment-eval {job:?}"),
        }
    }

    #[test]
    fn an_assignment_maps_its_device() {
        let mut a = assignment(TaskKind::Train, &[]);
        assert_eq!(assigned_device(&a), Device::Cpu);
        a.device = DeviceKind::Cuda as i32;
        assert_eq!(assigned_device(&a), Device::Cuda(0));
        a.cuda_devices = vec![3, 4];
        assert_eq!(assigned_device(&a), Device::Cuda(3));
        assert_eq!(train_job(Work::from_assignment(&a).unwrap()).device, Device::Cuda(3));
    }

    #[test]
    fn a_training_assignment_has_the_job_output_dir_and_the_flag_defaults() {
        let a = assignment(TaskKind::Train, &[("model_dir", "runs")]);
        let job = train_job(Work::from_assignment(&a).unwrap());
        assert_eq!(job.output_dir, Path::new("runs/job-7"));
        assert_eq!(
            job.args,
            TrainArgs {
                model_dir: "runs".into(),
                ..Default::default()
            }
        );
        assert_eq!(job.config.world_size, 2);
        assert_eq!(job.resume_from, None);
        assert_eq!(job.cache_dir, cache_dir(None));

        let a = assignment(TaskKind::Train, &[("model_dir", "runs"), ("output_dir", "here")]);
        assert_eq!(
            train_job(Work::from_assignment(&a).unwrap()).output_dir,
            Path::new("here")
        );
        let mut a = assignment(TaskKind::Train, &[("output_dir", "here")]);
        a.output_dir = "chosen/by/coordinator".into();
        a.resume_from = "chosen/checkpoints/step-4".into();
        let job = train_job(Work::from_assignment(&a).unwrap());
        assert_eq!(job.output_dir, Path::new("chosen/by/coordinator"));
        assert_eq!(job.resume_from, Some(PathBuf::from("chosen/checkpoints/step-4")));
    }

    #[test]
    fn an_augmentation_assignment_takes_model_seed_and_window_from_the_training_flags() {
        let a = assignment(
            TaskKind::Augment,
            &[("model_name_or_path", "tiny"), ("augment.input", "in.txt")],
        );
        let Work::Augment(job) = Work::from_assignment(&a).unwrap() else {
            panic!("not an augmentation");
        };
        assert_eq!((job.model.as_str(), job.seed, job.max_seq_len), ("tiny", 1, 100));
        assert_eq!(job.args.input, Some(PathBuf::from("in.txt")));
        assert_eq!(job.device, Device::Cpu);
    }

    #[test]
    fn a_classifier_assignment_is_a_training_run_with_its_data() {
        let args = [
            ("model_name_or_path", "tiny"),
            ("output_dir", "run"),
            ("classify.train_file", "train.tsv"),
            ("classify.dev_file", "dev.tsv"),
            ("classify.dataset", "khs-hate"),
            ("classify.labels", "none,hate"),
        ];
        let mut a = assignment(TaskKind::Classify, &args);
        a.resume_from = "run/checkpoints/step-3".into();
        let Work::Classify(job) = Work::from_assignment(&a).unwrap() else {
            panic!("not a classifier");
        };
        assert_eq!(job.train.output_dir, Path::new("run"));
        assert_eq!(job.train.resume_from, Some(PathBuf::from("run/checkpoints/step-3")));
        assert_eq!(job.train.run_id.as_deref(), Some(a.job_id.as_str()));
        assert_eq!(job.data.train_file, Path::new("train.tsv"));
        assert_eq!(job.data.dev_file, Path::new("dev.tsv"));
        assert_eq!(job.data.labels, Some(vec!["none".to_string(), "hate".to_string()]));
        assert_eq!(job.data.columns.labels, ["hate"]);
        let mut bad = assignment(TaskKind::Classify, &args);
        bad.args.insert("classify.dataset".into(), "imdb".into());
        let Err(err) = Work::from_assignment(&bad) else {
            panic!("accepted an unknown dataset");
        };
        assert!(err.to_string().contains("--dataset imdb"), "{err}");
    }

    #[test]
    fn an_experiment_assignment_carries_all_three_flag_sets() {
        let args = [
            ("model_name_or_path", "tiny"),
            ("output_dir", "exp"),
            ("augment.num_augmentations", "2"),
            ("eval.train_file", "train.tsv"),
            ("eval.test_file", "test.tsv"),
            ("eval.augment_model", "mlm"),
            ("eval.seeds", "2"),
        ];
        let Work::AugmentEval(job) = Work::from_assignment(&assignment(TaskKind::AugmentEval, &args)).unwrap() else {
            panic!("not an experiment");
        };
        assert_eq!(job.output_dir(), Path::new("exp"));
        assert_eq!(job.augment().num_augmentations, 2);
        assert_eq!(job.eval().augment_model.as_deref(), Some("mlm"));
        assert_eq!(job.items().len(), 4);
        let Err(err) = Work::from_assignment(&assignment(TaskKind::AugmentEval, &args[..4])) else {
            panic!("accepted without a test file");
        };
        assert_eq!(err.kind(), FailureKind::BadInput);
        assert!(err.to_string().contains("--test_file"), "{err}");
    }

    #[test]
    fn a_bad_assignment_is_bad_input_naming_the_flag() {
        let a = assignment(TaskKind::Train, &[("max_seq_len", "long")]);
        let Err(err) = Work::from_assignment(&a) else {
            panic!("accepted");
        };
        assert_eq!(err.kind(), FailureKind::BadInput);
        assert!(err.to_string().starts_with("assignment: ") && err.to_string().contains("--max_seq_len"));
        let mut a = assignment(TaskKind::Train, &[]);
        a.resolved_config_json = "{".into();
        let Err(err) = Work::from_assignment(&a) else {
            panic!("accepted");
        };
        assert!(err.to_string().contains("resolved config"), "{err}");
        let mut a = assignment(TaskKind::Train, &[]);
        a.task = 77;
        assert!(matches!(
            Work::from_assignment(&a),
            Err(WorkerError::UnsupportedTask(77))
        ));
    }

    fn parse(argv: &[&str]) -> Command {
        Cli::try_parse_from(std::iter::once("worker").chain(argv.iter().copied()))
            .unwrap()
            .command
            .unwrap()
    }

    #[test]
    fn worker_train_resolves_its_config_for_one_rank() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("ds.json");
        std::fs::write(
            &config,
            r#"{"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2}"#,
        )
        .unwrap();
        let config = config.to_str().unwrap();
        let Command::Train(command) = parse(&["train", "--config", config, "--model_dir", "m", "--seed", "9"]) else {
            panic!("not train");
        };
        let job = train_job_from_command(&command, 0).unwrap();
        assert_eq!(job.output_dir, Path::new("m/700101_000000"));
        assert_eq!(job.config.batch.train_batch_size, 8);
        assert_eq!(job.device, Device::Cpu);
        assert_eq!(job.args, command.train);
        assert_eq!(job.args.seed, 9);
        assert_eq!(job.cache_dir, cache_dir(None));

        let Command::Train(command) = parse(&[
            "train",
            "--config",
            config,
            "--device",
            "cuda:1",
            "--output_dir",
            "out",
            "--cache_dir",
            "cache",
            "--resume_from",
            "out/checkpoints/step-2",
        ]) else {
            panic!("not train");
        };
        let job = train_job_from_command(&command, 0).unwrap();
        assert_eq!(job.device, Device::Cuda(1));
        assert_eq!(job.output_dir, Path::new("out"));
        assert_eq!(job.cache_dir, Some(PathBuf::from("cache")));
        assert_eq!(job.resume_from, Some(PathBuf::from("out/checkpoints/step-2")));
    }

    #[test]
    fn worker_train_errors_name_the_file_or_flag() {
        let Command::Train(command) = parse(&["train", "--config", "/no/such/ds.json"]) else {
            panic!("not train");
        };
        let Err(err) = train_job_from_command(&command, 0) else {
            panic!("accepted");
        };
        assert!(
            err.to_string()
                .starts_with("cannot read DeepSpeed config /no/such/ds.json: "),
            "{err}"
        );
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("ds.json");
        std::fs::write(
            &config,
            r#"{"train_batch_size": 30, "train_micro_batch_size_per_gpu": 4}"#,
        )
        .unwrap();
        let Command::Train(command) = parse(&["train", "--config", config.to_str().unwrap()]) else {
            panic!("not train");
        };
        let Err(err) = train_job_from_command(&command, 0) else {
            panic!("accepted");
        };
        assert_eq!(err.kind(), FailureKind::BadInput);
        assert!(err.to_string().contains("ds.json"), "{err}");
        let Command::Train(command) = parse(&["train", "--config", "x.json", "--device", "tpu"]) else {
            panic!("not train");
        };
        assert!(train_job_from_command(&command, 0).is_err());
    }

    #[test]
    fn worker_augment_has_the_defaults_of_an_augmentation_job() {
        let Command::Augment(command) = parse(&["augment", "--model", "tiny", "--input", "in.txt"]) else {
            panic!("not augment");
        };
        let from_cli = AugmentJob::from_command(&command).unwrap();
        let a = assignment(
            TaskKind::Augment,
            &[("model_name_or_path", "tiny"), ("augment.input", "in.txt")],
        );
        let Work::Augment(from_job) = Work::from_assignment(&a).unwrap() else {
            panic!("not an augmentation");
        };
        assert_eq!(
            (
                from_cli.seed,
                from_cli.max_seq_len,
                from_cli.model,
                from_cli.device,
                from_cli.args
            ),
            (
                from_job.seed,
                from_job.max_seq_len,
                from_job.model,
                from_job.device,
                from_job.args
            )
        );
        let Command::Augment(command) = parse(&["augment", "--model", "m", "--device", "cuda:2", "--seed", "5"]) else {
            panic!("not augment");
        };
        let job = AugmentJob::from_command(&command).unwrap();
        assert_eq!((job.device, job.seed), (Device::Cuda(2), 5));
    }

    #[test]
    fn the_cache_dir_rule() {
        let home = Some(OsString::from("/home/u"));
        assert_eq!(
            cache_dir_from(Some("flag".into()), Some("/c".into()), home.clone()),
            Some(PathBuf::from("flag"))
        );
        assert_eq!(
            cache_dir_from(None, Some("/c".into()), home.clone()),
            Some(PathBuf::from("/c/tokens"))
        );
        assert_eq!(
            cache_dir_from(None, None, home),
            Some(PathBuf::from("/home/u/.cache/kormlm/tokens"))
        );
        assert_eq!(cache_dir_from(None, None, None), None);
    }
}
