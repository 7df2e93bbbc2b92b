//! A job spec resolved for a world size: the one place where the DeepSpeed config is parsed and
//! checked against DeepSpeed's batch rule and the flags are decoded. The coordinator resolves a
//! spec when it starts (`coordinator --config …`), on `--dry-run`, on `SubmitJob` and on a resume
//! with another world size; `worker train` resolves its own one-rank spec the same way.
//!
//! The monitors' relative `output_path`s (`tensorboard`, `csv_monitor`) are made absolute here,
//! against the working directory of the resolving process — the coordinator for a job, the
//! process itself for `worker train` — as DeepSpeed resolves them against its launcher's: the
//! workers receive the absolute path, so ranks started in other directories or on other hosts
//! agree on it.

use crate::augment_args::AugmentArgs;
use crate::augment_eval_args::AugmentEvalArgs;
use crate::classify_args::ClassifyArgs;
use crate::ds_config::{ConfigError, DsConfig, ResolvedConfig};
use crate::train_args::TrainArgs;
use crate::v1::{JobSpec, TaskKind};

/// The config an augmentation job uses when none is given: augmentation runs no optimizer, and a
/// one-sample micro batch satisfies the batch rule for any world size.
pub const AUGMENT_ONLY_CONFIG: &str = r#"{"train_micro_batch_size_per_gpu": 1}"#;

/// Where a classifier job's and an experiment's classifiers take their data from (what
/// `TrainArgs::refuse_corpus` says instead of `--data_path`).
pub const CLASSIFY_DATA: &str = "a classifier's data are --train_file and --dev_file";
pub const AUGMENT_EVAL_DATA: &str = "augment-eval's classifiers train on --train_file";

/// What a spec does not allow, naming the key or flag.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PlanError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("world_size must be at least 1")]
    NoRanks,
    #[error("{0}")]
    Flags(String),
    #[error("cannot resolve the relative monitor output_path: the working directory is unreadable: {0}")]
    WorkingDirectory(String),
}

/// A job spec checked and decoded for one world size.
#[derive(Debug, Clone, PartialEq)]
pub struct JobPlan {
    pub task: TaskKind,
    /// The config with the batch triple inferred for `world_size`.
    pub config: ResolvedConfig,
    /// Unknown or ignored config keys, for the user.
    pub warnings: Vec<String>,
    pub train: TrainArgs,
    /// The augmentation flags of an augmentation job or a downstream experiment.
    pub augment: Option<AugmentArgs>,
    /// The downstream experiment's flags.
    pub augment_eval: Option<AugmentEvalArgs>,
    /// A classifier training job's data flags.
    pub classify: Option<ClassifyArgs>,
}

/// The name config messages give the spec's config (its path, when it came from a file).
pub fn config_source(spec: &JobSpec) -> &str {
    if spec.ds_config_path.is_empty() {
        "ds_config"
    } else {
        &spec.ds_config_path
    }
}

impl JobPlan {
    /// Parses the spec's config, applies DeepSpeed's batch rule for `world_size` ranks and decodes
    /// the flags. An unspecified task is training. A downstream experiment's classifiers each
    /// train on one worker, so its config is resolved for one rank whatever the world size.
    pub fn resolve(spec: &JobSpec, world_size: u32) -> Result<Self, PlanError> {
        if world_size == 0 {
            return Err(PlanError::NoRanks);
        }
        let task = match TaskKind::try_from(spec.task) {
            Ok(TaskKind::Augment) => TaskKind::Augment,
            Ok(TaskKind::AugmentEval) => TaskKind::AugmentEval,
            Ok(TaskKind::Classify) => TaskKind::Classify,
            _ => TaskKind::Train,
        };
        let ranks_per_model = if task == TaskKind::AugmentEval { 1 } else { world_size };
        let source = config_source(spec);
        let parsed = DsConfig::parse(&spec.ds_config_json, source)?;
        let mut config = parsed.config.resolve(ranks_per_model, source)?;
        if config.config.tensorboard.enabled || config.config.csv_monitor.enabled {
            let cwd = std::env::current_dir().map_err(|e| PlanError::WorkingDirectory(e.to_string()))?;
            config.config.anchor_monitor_paths(&cwd);
        }
        let train = TrainArgs::from_map(&spec.args).map_err(PlanError::Flags)?;
        let augment = match task {
            TaskKind::Augment | TaskKind::AugmentEval => {
                Some(AugmentArgs::from_map(&spec.args).map_err(PlanError::Flags)?)
            }
            _ => None,
        };
        let augment_eval = match task {
            TaskKind::AugmentEval => {
                let args = AugmentEvalArgs::from_map(&spec.args).map_err(PlanError::Flags)?;
                args.check().map_err(PlanError::Flags)?;
                train.refuse_corpus(AUGMENT_EVAL_DATA).map_err(PlanError::Flags)?;
                if train.output_dir.is_none() {
                    return Err(PlanError::Flags(
                        "--output_dir is required by augment-eval (its runs, predictions and report go there)".into(),
                    ));
                }
                if let Some(augment) = &augment {
                    if augment.input.is_some() || augment.output.is_some() {
                        return Err(PlanError::Flags(
                            "--input/--output are augmentation-job flags; augment-eval augments --train_file and \
                             writes under --output_dir"
                                .into(),
                        ));
                    }
                }
                Some(args)
            }
            _ => None,
        };
        let classify = match task {
            TaskKind::Classify => {
                let args = ClassifyArgs::from_map(&spec.args).map_err(PlanError::Flags)?;
                args.check().map_err(PlanError::Flags)?;
                train.refuse_corpus(CLASSIFY_DATA).map_err(PlanError::Flags)?;
                Some(args)
            }
            _ => None,
        };
        Ok(Self {
            task,
            config,
            warnings: parsed.warnings,
            train,
            augment,
            augment_eval,
            classify,
        })
    }
}

impl JobPlan {
    /// A standalone command's plan (`worker train`, `worker classify train`, `worker
    /// augment-eval`): the config file at `config` with `args` for `task`, resolved for one rank
    /// by the same function as a job's.
    pub fn resolve_file(
        config: &std::path::Path,
        task: TaskKind,
        args: std::collections::BTreeMap<String, String>,
    ) -> Result<Self, PlanError> {
        let path = config.display().to_string();
        let text = std::fs::read_to_string(config).map_err(|e| ConfigError::Read {
            path: path.clone(),
            message: e.to_string(),
        })?;
        let spec = JobSpec {
            task: task as i32,
            ds_config_json: text,
            ds_config_path: path,
            world_size: 1,
            args: args.into_iter().collect(),
            ..Default::default()
        };
        Self::resolve(&spec, 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(config: &str) -> JobSpec {
        JobSpec {
            ds_config_json: config.into(),
            ds_config_path: "cfg.json".into(),
            world_size: 2,
            ..Default::default()
        }
    }

    #[test]
    fn resolves_the_batch_rule_for_the_world_size() {
        let plan = JobPlan::resolve(&spec(r#"{"train_micro_batch_size_per_gpu": 4}"#), 3).unwrap();
        assert_eq!(plan.config.batch.train_batch_size, 12);
        assert_eq!(plan.task, TaskKind::Train);
        assert_eq!(plan.train, TrainArgs::default());
        assert!(plan.augment.is_none());
    }

    #[test]
    fn errors_name_the_config_and_the_flag() {
        let err = JobPlan::resolve(
            &spec(r#"{"train_batch_size": 30, "train_micro_batch_size_per_gpu": 4}"#),
            2,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("cfg.json") && err.contains("30 != 4 * 3 * 2"), "{err}");
        let mut bad = spec(AUGMENT_ONLY_CONFIG);
        bad.args.insert("max_seq_len".into(), "long".into());
        let err = JobPlan::resolve(&bad, 1).unwrap_err().to_string();
        assert!(err.contains("--max_seq_len"), "{err}");
        assert_eq!(JobPlan::resolve(&spec(AUGMENT_ONLY_CONFIG), 0), Err(PlanError::NoRanks));
    }

    #[test]
    fn relative_monitor_paths_are_resolved_against_the_working_directory_once() {
        let plan = JobPlan::resolve(
            &spec(
                r#"{"train_batch_size": 4, "tensorboard": {"enabled": true, "output_path": "runs/tb"},
                    "csv_monitor": {"enabled": true}}"#,
            ),
            2,
        )
        .unwrap();
        let cwd = std::env::current_dir().unwrap();
        let tensorboard = &plan.config.config.tensorboard;
        assert_eq!(tensorboard.dir(), cwd.join("runs/tb/DeepSpeedJobName"));
        assert_eq!(plan.config.config.csv_monitor.dir(), cwd.join("DeepSpeedJobName"));
        // What the workers receive is absolute already: resolving it again changes nothing.
        let sent = crate::ds_config::ResolvedConfig::from_json(&plan.config.to_json()).unwrap();
        assert_eq!(sent.config.tensorboard.dir(), tensorboard.dir());
        let absolute = JobPlan::resolve(
            &spec(
                r#"{"train_batch_size": 4, "tensorboard": {"enabled": true, "output_path": "/abs", "job_name": "j"}}"#,
            ),
            1,
        )
        .unwrap();
        assert_eq!(absolute.config.config.tensorboard.dir(), std::path::Path::new("/abs/j"));
    }

    #[test]
    fn augmentation_jobs_carry_their_flags() {
        let mut s = spec(AUGMENT_ONLY_CONFIG);
        s.task = TaskKind::Augment as i32;
        s.args.insert("augment.input".into(), "in.txt".into());
        let plan = JobPlan::resolve(&s, 5).unwrap();
        assert_eq!(plan.augment.unwrap().input, Some("in.txt".into()));
        assert_eq!(plan.config.batch.train_batch_size, 5);
    }

    #[test]
    fn a_classifier_job_resolves_for_every_rank_and_checks_its_data_flags() {
        let mut s = spec(r#"{"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2}"#);
        s.task = TaskKind::Classify as i32;
        let err = JobPlan::resolve(&s, 2).unwrap_err().to_string();
        assert!(err.contains("--train_file is required"), "{err}");
        let data = ClassifyArgs {
            train_file: Some("train.tsv".into()),
            dev_file: Some("dev.tsv".into()),
            dataset: Some("khs-hate".into()),
            ..Default::default()
        };
        s.args.extend(data.to_map());
        let plan = JobPlan::resolve(&s, 2).unwrap();
        assert_eq!(plan.task, TaskKind::Classify);
        assert_eq!(plan.config.batch.train_batch_size, 16);
        assert_eq!(plan.classify, Some(data));
        s.args.insert("data_path".into(), "corpus.txt".into());
        let err = JobPlan::resolve(&s, 2).unwrap_err().to_string();
        assert!(err.contains("--data_path"), "{err}");
    }

    #[test]
    fn an_experiment_resolves_its_config_for_one_rank_and_checks_its_flags() {
        let mut s = spec(r#"{"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2}"#);
        s.task = TaskKind::AugmentEval as i32;
        let err = JobPlan::resolve(&s, 3).unwrap_err().to_string();
        assert!(err.contains("--train_file is required"), "{err}");
        s.args.extend(
            AugmentEvalArgs {
                data: ClassifyArgs {
                    train_file: Some("train.tsv".into()),
                    ..Default::default()
                },
                test_file: Some("test.tsv".into()),
                augment_model: Some("mlm".into()),
                ..Default::default()
            }
            .to_map(),
        );
        let err = JobPlan::resolve(&s, 3).unwrap_err().to_string();
        assert!(err.contains("--output_dir is required"), "{err}");
        s.args.insert("output_dir".into(), "exp".into());
        let plan = JobPlan::resolve(&s, 3).unwrap();
        assert_eq!(plan.task, TaskKind::AugmentEval);
        assert_eq!(plan.config.batch.train_batch_size, 8);
        assert_eq!(plan.augment_eval.unwrap().augment_model.as_deref(), Some("mlm"));
        assert_eq!(plan.augment.unwrap().num_augmentations, 1);
        s.args.insert("augment.input".into(), "x.txt".into());
        let err = JobPlan::resolve(&s, 3).unwrap_err().to_string();
        assert!(err.contains("--input/--output"), "{err}");
    }

    #[test]
    fn a_config_file_resolves_for_one_rank_and_a_missing_one_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ds.json");
        std::fs::write(&path, r#"{"train_micro_batch_size_per_gpu": 4}"#).unwrap();
        let plan = JobPlan::resolve_file(&path, TaskKind::Train, Default::default()).unwrap();
        assert_eq!(plan.config.batch.train_batch_size, 4);
        let missing = dir.path().join("none.json");
        let err = JobPlan::resolve_file(&missing, TaskKind::Train, Default::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains(&missing.display().to_string()), "{err}");
    }
}
