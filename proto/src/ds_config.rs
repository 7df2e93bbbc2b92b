//! The DeepSpeed configuration (`ds_config.json`): parsing with precise errors, DeepSpeed's
//! batch-size inference and assertion, and the resolved form that the coordinator hands to
//! workers (workers never read the config file themselves).

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};

/// A problem with a DeepSpeed config. Every variant names where the problem is.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ConfigError {
    #[error("cannot read DeepSpeed config {path}: {message}")]
    Read { path: String, message: String },
    #[error("{source_name}: malformed JSON at line {line}, column {column}: {message}")]
    Json {
        source_name: String,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{source_name}: key `{key}`: {message}")]
    Key {
        source_name: String,
        key: String,
        message: String,
    },
    #[error("{source_name}: {message}")]
    Batch { source_name: String, message: String },
}

/// `true`, `false` or `"auto"` (the Hugging Face integration's placeholder).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Toggle {
    On,
    #[default]
    Off,
    /// Decided by the device: enabled on CUDA, disabled on CPU.
    Auto,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum OptimizerKind {
    AdamW,
    /// DeepSpeed `Adam`; with `adam_w_mode` (the default) it is AdamW.
    Adam {
        adam_w_mode: bool,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OptimizerConfig {
    pub kind: OptimizerKind,
    pub lr: f64,
    pub betas: (f64, f64),
    pub eps: f64,
    pub weight_decay: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WarmupType {
    Log,
    Linear,
}

/// The DeepSpeed learning-rate schedules kormlm implements (`runtime/lr_schedules.py`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum SchedulerConfig {
    WarmupLR {
        warmup_min_lr: f64,
        /// `None`: the optimizer's lr.
        warmup_max_lr: Option<f64>,
        warmup_num_steps: u64,
        warmup_type: WarmupType,
    },
    WarmupDecayLR {
        warmup_min_lr: f64,
        warmup_max_lr: Option<f64>,
        warmup_num_steps: u64,
        warmup_type: WarmupType,
        total_num_steps: u64,
    },
    WarmupCosineLR {
        total_num_steps: u64,
        warmup_min_ratio: f64,
        warmup_num_steps: u64,
        cos_min_ratio: f64,
        warmup_type: WarmupType,
    },
}

/// `fp16` section; scale = 2^initial_scale_power when `loss_scale` is 0 (dynamic).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Fp16Config {
    pub enabled: Toggle,
    pub loss_scale: f64,
    pub initial_scale_power: u32,
    pub loss_scale_window: u64,
    pub hysteresis: u32,
    pub consecutive_hysteresis: bool,
    pub min_loss_scale: f64,
}

impl Default for Fp16Config {
    fn default() -> Self {
        Self {
            enabled: Toggle::Off,
            loss_scale: 0.0,
            initial_scale_power: 16,
            loss_scale_window: 1000,
            hysteresis: 2,
            consecutive_hysteresis: false,
            min_loss_scale: 1.0,
        }
    }
}

/// `zero_optimization` section (stages 0, 1 and 2 are supported).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ZeroConfig {
    pub stage: u32,
    pub reduce_scatter: bool,
    pub reduce_bucket_size: u64,
    pub allgather_partitions: bool,
    pub allgather_bucket_size: u64,
    pub overlap_comm: bool,
    pub contiguous_gradients: bool,
    /// Legacy `cpu_offload` / `offload_optimizer.device == "cpu"`.
    pub offload_optimizer: bool,
}

impl Default for ZeroConfig {
    fn default() -> Self {
        Self {
            stage: 0,
            reduce_scatter: true,
            reduce_bucket_size: 500_000_000,
            allgather_partitions: true,
            allgather_bucket_size: 500_000_000,
            overlap_comm: false,
            contiguous_gradients: true,
            offload_optimizer: false,
        }
    }
}

/// A DeepSpeed file monitor (`tensorboard`, `csv_monitor`): rank 0 writes the run's scalars into
/// `join(output_path, job_name)`. [`crate::job_plan::JobPlan::resolve`] makes `output_path`
/// absolute (against the resolving process's working directory, as DeepSpeed's relative paths
/// are), so every rank of a job and every attempt agree on it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MonitorConfig {
    pub enabled: bool,
    pub output_path: String,
    pub job_name: String,
}

impl Default for MonitorConfig {
    /// DeepSpeed's defaults (`deepspeed/monitor/config.py`).
    fn default() -> Self {
        Self {
            enabled: false,
            output_path: String::new(),
            job_name: "DeepSpeedJobName".into(),
        }
    }
}

impl MonitorConfig {
    /// The directory the monitor writes into: `join(output_path, job_name)`.
    pub fn dir(&self) -> PathBuf {
        Path::new(&self.output_path).join(&self.job_name)
    }

    /// Makes a relative `output_path` absolute against `base` (`""` is `base` itself).
    fn anchor(&mut self, base: &Path) {
        let path = Path::new(&self.output_path);
        if !path.is_absolute() {
            self.output_path = base.join(path).to_string_lossy().into_owned();
        }
    }
}

/// The batch-size triple after DeepSpeed's inference for one world size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Batch {
    pub train_batch_size: u32,
    pub train_micro_batch_size_per_gpu: u32,
    pub gradient_accumulation_steps: u32,
}

/// A parsed DeepSpeed config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DsConfig {
    pub train_batch_size: Option<u32>,
    pub train_micro_batch_size_per_gpu: Option<u32>,
    pub gradient_accumulation_steps: Option<u32>,
    /// `None`: AdamW from the training flags (`--learning_rate --weight_decay --eps`).
    pub optimizer: Option<OptimizerConfig>,
    /// `None`: constant lr, or `--scheduler_name linear` from the training flags.
    pub scheduler: Option<SchedulerConfig>,
    pub fp16: Fp16Config,
    pub bf16: Toggle,
    /// 0 disables clipping (the DeepSpeed default when the original project ran).
    pub gradient_clipping: f64,
    pub zero: ZeroConfig,
    pub steps_per_print: u64,
    /// Absent in configs resolved by an older coordinator: off.
    #[serde(default)]
    pub tensorboard: MonitorConfig,
    #[serde(default)]
    pub csv_monitor: MonitorConfig,
}

/// A config resolved for one world size: what a worker receives.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResolvedConfig {
    pub world_size: u32,
    pub batch: Batch,
    pub config: DsConfig,
}

/// A parsed config together with the warnings parsing produced (unknown keys, ignored settings).
#[derive(Debug, Clone, PartialEq)]
pub struct Parsed {
    pub config: DsConfig,
    pub warnings: Vec<String>,
}

/// Keys DeepSpeed knows that kormlm accepts but does not act on.
const IGNORED_KEYS: &[&str] = &[
    "wall_clock_breakdown",
    "dump_state",
    "prescale_gradients",
    "gradient_predivide_factor",
    "communication_data_type",
    "zero_allow_untested_optimizer",
    "sparse_gradients",
    "memory_breakdown",
    "comms_logger",
    "flops_profiler",
    "checkpoint",
];

impl DsConfig {
    /// Reads and parses a config file.
    pub fn from_file(path: &Path) -> Result<Parsed, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses config text; `source_name` (usually the file path) prefixes every message.
    pub fn parse(text: &str, source_name: &str) -> Result<Parsed, ConfigError> {
        let value: Value = serde_json::from_str(text).map_err(|e| ConfigError::Json {
            source_name: source_name.to_string(),
            line: e.line(),
            column: e.column(),
            message: e.to_string(),
        })?;
        let mut reader = Reader {
            source_name,
            warnings: Vec::new(),
        };
        let config = reader.config(&value)?;
        Ok(Parsed {
            config,
            warnings: reader.warnings.into_iter().flatten().collect(),
        })
    }

    /// DeepSpeed's `_set_batch_related_parameters` followed by `_batch_assertion`, ported
    /// exactly (integer division included, so inference can still fail the assertion).
    pub fn resolve_batch(&self, world_size: u32, source_name: &str) -> Result<Batch, ConfigError> {
        let fail = |message: String| ConfigError::Batch {
            source_name: source_name.to_string(),
            message,
        };
        if world_size == 0 {
            return Err(fail("world size must be at least 1".into()));
        }
        let world = u64::from(world_size);
        let (train, micro, acc) = (
            self.train_batch_size.map(u64::from),
            self.train_micro_batch_size_per_gpu.map(u64::from),
            self.gradient_accumulation_steps.map(u64::from),
        );
        let (train, micro, acc) = match (train, micro, acc) {
            (Some(t), Some(m), Some(a)) => (t, m, a),
            (Some(t), Some(m), None) => (t, m, t.checked_div(m).unwrap_or(0) / world),
            (Some(t), None, Some(a)) => (t, (t / world).checked_div(a).unwrap_or(0), a),
            (None, Some(m), Some(a)) => (m * a * world, m, a),
            (Some(t), None, None) => (t, t / world, 1),
            (None, Some(m), None) => (m * world, m, 1),
            (None, None, _) => {
                return Err(fail(
                    "Either train_batch_size or train_micro_batch_size_per_gpu needs to be provided".into(),
                ))
            }
        };
        if train == 0 {
            return Err(fail(format!("Train batch size: {train} has to be greater than 0")));
        }
        if micro == 0 {
            return Err(fail(format!(
                "Micro batch size per gpu: {micro} has to be greater than 0 \
                 (train_batch_size {train}, world size {world})"
            )));
        }
        if acc == 0 {
            return Err(fail(format!(
                "Gradient accumulation steps: {acc} has to be greater than 0 \
                 (train_batch_size {train}, micro batch {micro}, world size {world})"
            )));
        }
        if train != micro * acc * world {
            return Err(fail(format!(
                "Check batch related parameters. train_batch_size is not equal to \
                 micro_batch_per_gpu * gradient_acc_step * world_size {train} != {micro} * {acc} * {world}"
            )));
        }
        let to_u32 = |v: u64| u32::try_from(v).map_err(|_| fail(format!("batch size {v} is too large")));
        Ok(Batch {
            train_batch_size: to_u32(train)?,
            train_micro_batch_size_per_gpu: to_u32(micro)?,
            gradient_accumulation_steps: to_u32(acc)?,
        })
    }

    /// Resolves the config for `world_size` ranks.
    pub fn resolve(&self, world_size: u32, source_name: &str) -> Result<ResolvedConfig, ConfigError> {
        let batch = self.resolve_batch(world_size, source_name)?;
        Ok(ResolvedConfig {
            world_size,
            batch,
            config: self.clone(),
        })
    }

    /// Makes the monitors' relative `output_path`s absolute against `base` (the working
    /// directory of the process that resolves the job), once, so that workers started elsewhere
    /// write where the user meant.
    pub fn anchor_monitor_paths(&mut self, base: &Path) {
        self.tensorboard.anchor(base);
        self.csv_monitor.anchor(base);
    }
}

impl ResolvedConfig {
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a resolved config always serialises")
    }

    pub fn from_json(text: &str) -> Result<Self, ConfigError> {
        serde_json::from_str(text).map_err(|e| ConfigError::Json {
            source_name: "resolved config from the coordinator".into(),
            line: e.line(),
            column: e.column(),
            message: e.to_string(),
        })
    }
}

/// Walks the JSON tree with typed accessors that name the offending key. Every key is named once,
/// where it is read: a section remembers the keys read from it, and the keys nobody read are
/// reported as unknown when it is closed.
struct Reader<'a> {
    source_name: &'a str,
    /// One list per section, in the order the sections were opened, so warnings read top-down.
    warnings: Vec<Vec<String>>,
}

/// One JSON object of the config being read.
struct Section<'v> {
    map: &'v Map<String, Value>,
    prefix: String,
    /// Keys read (or knowingly ignored) so far.
    known: Vec<&'static str>,
    slot: usize,
}

impl<'v> Section<'v> {
    /// The raw value of `key`, which becomes a known key of this section.
    fn get(&mut self, key: &'static str) -> Option<&'v Value> {
        if !self.known.contains(&key) {
            self.known.push(key);
        }
        self.map.get(key)
    }

    fn path(&self, key: &str) -> String {
        join(&self.prefix, key)
    }
}

fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_string()
    } else {
        format!("{prefix}.{key}")
    }
}

impl<'a> Reader<'a> {
    fn err(&self, key: &str, message: impl Into<String>) -> ConfigError {
        ConfigError::Key {
            source_name: self.source_name.to_string(),
            key: key.to_string(),
            message: message.into(),
        }
    }

    fn warn(&mut self, slot: usize, message: String) {
        self.warnings[slot].push(format!("{}: {message}", self.source_name));
    }

    fn object<'v>(&self, value: &'v Value, key: &str) -> Result<&'v Map<String, Value>, ConfigError> {
        value.as_object().ok_or_else(|| {
            let what = if key.is_empty() { "<root>" } else { key };
            self.err(what, format!("expected a JSON object, got {}", kind_of(value)))
        })
    }

    /// Starts reading the object `value` found at `prefix` ("" for the root).
    fn open<'v>(&mut self, value: &'v Value, prefix: &str) -> Result<Section<'v>, ConfigError> {
        let map = self.object(value, prefix)?;
        self.warnings.push(Vec::new());
        Ok(Section {
            map,
            prefix: prefix.to_string(),
            known: Vec::new(),
            slot: self.warnings.len() - 1,
        })
    }

    /// The section under `key` of `parent`, if present.
    fn child<'v>(&mut self, parent: &mut Section<'v>, key: &'static str) -> Result<Option<Section<'v>>, ConfigError> {
        match parent.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(value) => self.open(value, &parent.path(key)).map(Some),
        }
    }

    /// Reports the keys of `section` that nothing read.
    fn close(&mut self, mut section: Section<'_>) {
        section.known.sort_unstable();
        for key in section.map.keys() {
            if !section.known.contains(&key.as_str()) {
                let full = section.path(key);
                let message = format!(
                    "unknown key `{full}` ignored (known here: {})",
                    section.known.join(", ")
                );
                self.warn(section.slot, message);
            }
        }
    }

    fn number(&self, s: &mut Section<'_>, key: &'static str) -> Result<Option<f64>, ConfigError> {
        match s.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Number(n)) => Ok(n.as_f64()),
            Some(other) => Err(self.err(&s.path(key), format!("expected a number, got {}", kind_of(other)))),
        }
    }

    fn non_negative(&self, s: &mut Section<'_>, key: &'static str) -> Result<Option<f64>, ConfigError> {
        let value = self.number(s, key)?;
        if let Some(v) = value {
            if !(v.is_finite() && v >= 0.0) {
                return Err(self.err(&s.path(key), format!("expected a number >= 0, got {v}")));
            }
        }
        Ok(value)
    }

    /// Non-negative integers; DeepSpeed configs often write them as `2e8`.
    fn integer(&self, s: &mut Section<'_>, key: &'static str) -> Result<Option<u64>, ConfigError> {
        match self.number(s, key)? {
            None => Ok(None),
            Some(v) if v >= 0.0 && v.fract() == 0.0 && v <= u64::MAX as f64 => Ok(Some(v as u64)),
            Some(v) => Err(self.err(&s.path(key), format!("expected a non-negative integer, got {v}"))),
        }
    }

    fn small_integer(&self, s: &mut Section<'_>, key: &'static str) -> Result<Option<u32>, ConfigError> {
        match self.integer(s, key)? {
            None => Ok(None),
            Some(v) => u32::try_from(v)
                .map(Some)
                .map_err(|_| self.err(&s.path(key), format!("{v} is too large"))),
        }
    }

    fn boolean(&self, s: &mut Section<'_>, key: &'static str) -> Result<Option<bool>, ConfigError> {
        match s.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(other) => Err(self.err(&s.path(key), format!("expected true or false, got {}", kind_of(other)))),
        }
    }

    /// A section's `enabled` key: true, false or "auto".
    fn toggle(&self, s: &mut Section<'_>) -> Result<Toggle, ConfigError> {
        match s.get("enabled") {
            None | Some(Value::Null) | Some(Value::Bool(false)) => Ok(Toggle::Off),
            Some(Value::Bool(true)) => Ok(Toggle::On),
            Some(Value::String(v)) if v == "auto" => Ok(Toggle::Auto),
            Some(other) => Err(self.err(
                &s.path("enabled"),
                format!("expected true, false or \"auto\", got {}", value_text(other)),
            )),
        }
    }

    /// A section's `type` key.
    fn type_name(&self, s: &mut Section<'_>, accepted: &str) -> Result<String, ConfigError> {
        let key = s.path("type");
        match s.get("type") {
            Some(Value::String(name)) => Ok(name.clone()),
            Some(other) => Err(self.err(&key, format!("expected a string, got {}; {accepted}", kind_of(other)))),
            None => Err(self.err(&key, format!("missing; {accepted}"))),
        }
    }

    /// A section's `params` object (empty when absent).
    fn params<'v>(&mut self, s: &mut Section<'v>) -> Result<Section<'v>, ConfigError> {
        match self.child(s, "params")? {
            Some(params) => Ok(params),
            None => self.open(&EMPTY_OBJECT, &s.path("params")),
        }
    }

    fn config(&mut self, root: &Value) -> Result<DsConfig, ConfigError> {
        let mut r = self.open(root, "")?;
        let slot = r.slot;
        let ignored: Vec<&str> = IGNORED_KEYS
            .iter()
            .copied()
            .filter(|key| r.get(key).is_some())
            .collect();
        let fp16 = self.fp16(&mut r)?;
        let bf16 = self.bf16(&mut r)?;
        if fp16.enabled == Toggle::On && bf16 == Toggle::On {
            return Err(self.err("bf16.enabled", "bf16 cannot be combined with fp16.enabled = true"));
        }
        let train_batch_size = self.small_integer(&mut r, "train_batch_size")?;
        let train_micro_batch_size_per_gpu = self.small_integer(&mut r, "train_micro_batch_size_per_gpu")?;
        let gradient_accumulation_steps = self.small_integer(&mut r, "gradient_accumulation_steps")?;
        let optimizer = self.optimizer(&mut r)?;
        let scheduler = self.scheduler(&mut r)?;
        let gradient_clipping = self.non_negative(&mut r, "gradient_clipping")?.unwrap_or(0.0);
        let zero = self.zero(&mut r)?;
        let steps_per_print = self.integer(&mut r, "steps_per_print")?.unwrap_or(10);
        let tensorboard = self.monitor(&mut r, "tensorboard")?;
        let csv_monitor = self.monitor(&mut r, "csv_monitor")?;
        self.wandb(&mut r)?;
        // The root's warnings come first (its slot was opened first): unknown keys, then ignored ones.
        self.close(r);
        for key in ignored {
            self.warn(slot, format!("key `{key}` is accepted but has no effect in kormlm"));
        }
        Ok(DsConfig {
            train_batch_size,
            train_micro_batch_size_per_gpu,
            gradient_accumulation_steps,
            optimizer,
            scheduler,
            fp16,
            bf16,
            gradient_clipping,
            zero,
            steps_per_print,
            tensorboard,
            csv_monitor,
        })
    }

    /// `tensorboard` / `csv_monitor`: `{enabled, output_path, job_name}` with DeepSpeed's defaults.
    fn monitor(&mut self, root: &mut Section<'_>, key: &'static str) -> Result<MonitorConfig, ConfigError> {
        let d = MonitorConfig::default();
        let Some(mut p) = self.child(root, key)? else {
            return Ok(d);
        };
        let config = MonitorConfig {
            enabled: self.boolean(&mut p, "enabled")?.unwrap_or(d.enabled),
            output_path: self.string(&mut p, "output_path")?.unwrap_or(d.output_path),
            job_name: self.string(&mut p, "job_name")?.unwrap_or(d.job_name),
        };
        if config.enabled && config.job_name.is_empty() {
            return Err(self.err(&p.path("job_name"), "expected a directory name, got \"\""));
        }
        self.close(p);
        Ok(config)
    }

    /// `wandb`: Weights & Biases logs to its servers, which kormlm cannot reach; enabling it is
    /// refused at once rather than training for hours without the curves the user asked for.
    fn wandb(&mut self, root: &mut Section<'_>) -> Result<(), ConfigError> {
        let Some(mut p) = self.child(root, "wandb")? else {
            return Ok(());
        };
        for key in ["group", "team", "project"] {
            p.get(key);
        }
        if self.boolean(&mut p, "enabled")? == Some(true) {
            return Err(self.err(
                "wandb.enabled",
                "Weights & Biases needs a network connection (and its Python client), which kormlm does not \
                 use; set it to false and enable `tensorboard` or `csv_monitor` instead (they write files into \
                 output_path/job_name that TensorBoard or any CSV reader shows)",
            ));
        }
        self.close(p);
        Ok(())
    }

    fn string(&self, s: &mut Section<'_>, key: &'static str) -> Result<Option<String>, ConfigError> {
        match s.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(v)) => Ok(Some(v.clone())),
            Some(other) => Err(self.err(&s.path(key), format!("expected a string, got {}", kind_of(other)))),
        }
    }

    /// `bf16` (or its older name `bfloat16`): `{"enabled": …}`.
    fn bf16(&mut self, root: &mut Section<'_>) -> Result<Toggle, ConfigError> {
        let section = match self.child(root, "bf16")? {
            Some(s) => {
                root.get("bfloat16");
                Some(s)
            }
            None => self.child(root, "bfloat16")?,
        };
        let Some(mut section) = section else {
            return Ok(Toggle::Off);
        };
        let toggle = self.toggle(&mut section)?;
        self.close(section);
        Ok(toggle)
    }

    fn optimizer(&mut self, root: &mut Section<'_>) -> Result<Option<OptimizerConfig>, ConfigError> {
        let Some(mut section) = self.child(root, "optimizer")? else {
            return Ok(None);
        };
        let accepted = "accepted: AdamW, Adam";
        let type_name = self.type_name(&mut section, accepted)?;
        let mut p = self.params(&mut section)?;
        self.close(section);
        // DeepSpeed's switch between its fused and torch's implementation: same numbers here.
        p.get("torch_adam");
        let kind = match type_name.to_ascii_lowercase().as_str() {
            "adamw" => OptimizerKind::AdamW,
            "adam" => OptimizerKind::Adam {
                adam_w_mode: self.boolean(&mut p, "adam_w_mode")?.unwrap_or(true),
            },
            _ => {
                return Err(self.err(
                    "optimizer.type",
                    format!("unsupported optimizer {type_name:?}; {accepted}"),
                ))
            }
        };
        let betas_key = p.path("betas");
        let betas = match p.get("betas") {
            None => (0.9, 0.999),
            Some(Value::Array(items)) if items.len() == 2 && items.iter().all(|v| v.is_number()) => {
                (items[0].as_f64().unwrap_or(0.9), items[1].as_f64().unwrap_or(0.999))
            }
            Some(other) => {
                return Err(self.err(
                    &betas_key,
                    format!("expected two numbers like [0.9, 0.999], got {}", value_text(other)),
                ))
            }
        };
        for (key, beta) in [("betas[0]", betas.0), ("betas[1]", betas.1)] {
            if !(0.0..1.0).contains(&beta) {
                return Err(self.err(&p.path(key), format!("expected a value in [0, 1), got {beta}")));
            }
        }
        let config = OptimizerConfig {
            kind,
            lr: self.non_negative(&mut p, "lr")?.unwrap_or(1e-3),
            betas,
            eps: self.non_negative(&mut p, "eps")?.unwrap_or(1e-8),
            weight_decay: self.non_negative(&mut p, "weight_decay")?.unwrap_or(0.01),
        };
        self.close(p);
        Ok(Some(config))
    }

    fn warmup_type(&self, p: &mut Section<'_>) -> Result<WarmupType, ConfigError> {
        match p.get("warmup_type") {
            None => Ok(WarmupType::Log),
            Some(Value::String(s)) if s == "log" => Ok(WarmupType::Log),
            Some(Value::String(s)) if s == "linear" => Ok(WarmupType::Linear),
            Some(other) => Err(self.err(
                &p.path("warmup_type"),
                format!("expected \"log\" or \"linear\", got {}", value_text(other)),
            )),
        }
    }

    /// DeepSpeed raises warmup_num_steps to at least 2 (log(1) would divide by zero).
    fn warmup_steps(&self, p: &mut Section<'_>) -> Result<u64, ConfigError> {
        Ok(self.integer(p, "warmup_num_steps")?.unwrap_or(1000).max(2))
    }

    fn total_steps(&self, p: &mut Section<'_>, scheduler: &str) -> Result<u64, ConfigError> {
        let key = p.path("total_num_steps");
        self.integer(p, "total_num_steps")?
            .ok_or_else(|| self.err(&key, format!("required for {scheduler}")))
    }

    fn scheduler(&mut self, root: &mut Section<'_>) -> Result<Option<SchedulerConfig>, ConfigError> {
        let Some(mut section) = self.child(root, "scheduler")? else {
            return Ok(None);
        };
        let accepted = "accepted: WarmupLR, WarmupDecayLR, WarmupCosineLR";
        let type_name = self.type_name(&mut section, accepted)?;
        let mut p = self.params(&mut section)?;
        self.close(section);
        // The step to continue from belongs to the checkpoint, not the config.
        p.get("last_batch_iteration");
        let config = match type_name.as_str() {
            "WarmupLR" => SchedulerConfig::WarmupLR {
                warmup_min_lr: self.non_negative(&mut p, "warmup_min_lr")?.unwrap_or(0.0),
                warmup_max_lr: self.non_negative(&mut p, "warmup_max_lr")?,
                warmup_num_steps: self.warmup_steps(&mut p)?,
                warmup_type: self.warmup_type(&mut p)?,
            },
            "WarmupDecayLR" => SchedulerConfig::WarmupDecayLR {
                warmup_min_lr: self.non_negative(&mut p, "warmup_min_lr")?.unwrap_or(0.0),
                warmup_max_lr: self.non_negative(&mut p, "warmup_max_lr")?,
                warmup_num_steps: self.warmup_steps(&mut p)?,
                warmup_type: self.warmup_type(&mut p)?,
                total_num_steps: self.total_steps(&mut p, "WarmupDecayLR")?,
            },
            "WarmupCosineLR" => SchedulerConfig::WarmupCosineLR {
                total_num_steps: self.total_steps(&mut p, "WarmupCosineLR")?,
                warmup_min_ratio: self.non_negative(&mut p, "warmup_min_ratio")?.unwrap_or(0.0),
                warmup_num_steps: self.warmup_steps(&mut p)?,
                cos_min_ratio: self.non_negative(&mut p, "cos_min_ratio")?.unwrap_or(0.0001),
                warmup_type: self.warmup_type(&mut p)?,
            },
            other => return Err(self.err("scheduler.type", format!("unsupported scheduler {other:?}; {accepted}"))),
        };
        self.close(p);
        Ok(Some(config))
    }

    fn fp16(&mut self, root: &mut Section<'_>) -> Result<Fp16Config, ConfigError> {
        let d = Fp16Config::default();
        let Some(mut p) = self.child(root, "fp16")? else {
            return Ok(d);
        };
        // Autocast is how kormlm runs fp16 anyway.
        p.get("auto_cast");
        let enabled = self.toggle(&mut p)?;
        let initial_scale_power = self
            .small_integer(&mut p, "initial_scale_power")?
            .unwrap_or(d.initial_scale_power);
        if initial_scale_power > 64 {
            return Err(self.err(
                "fp16.initial_scale_power",
                format!("expected at most 64, got {initial_scale_power}"),
            ));
        }
        let config = Fp16Config {
            enabled,
            loss_scale: self.non_negative(&mut p, "loss_scale")?.unwrap_or(d.loss_scale),
            initial_scale_power,
            loss_scale_window: self
                .integer(&mut p, "loss_scale_window")?
                .unwrap_or(d.loss_scale_window)
                .max(1),
            hysteresis: self.small_integer(&mut p, "hysteresis")?.unwrap_or(d.hysteresis),
            consecutive_hysteresis: self
                .boolean(&mut p, "consecutive_hysteresis")?
                .unwrap_or(d.consecutive_hysteresis),
            min_loss_scale: self.non_negative(&mut p, "min_loss_scale")?.unwrap_or(d.min_loss_scale),
        };
        self.close(p);
        Ok(config)
    }

    fn zero(&mut self, root: &mut Section<'_>) -> Result<ZeroConfig, ConfigError> {
        let d = ZeroConfig::default();
        let Some(mut p) = self.child(root, "zero_optimization")? else {
            return Ok(d);
        };
        // DeepSpeed options about how checkpoints and gradients are laid out, without effect here.
        for key in ["round_robin_gradients", "load_from_fp32_weights", "elastic_checkpoint"] {
            p.get(key);
        }
        let stage = self.small_integer(&mut p, "stage")?.unwrap_or(d.stage);
        if stage > 2 {
            return Err(self.err(
                "zero_optimization.stage",
                format!("stage {stage} is not supported; accepted: 0, 1, 2"),
            ));
        }
        let offload = match p.get("offload_optimizer") {
            None | Some(Value::Null) => false,
            Some(v) => {
                let o = self.object(v, "zero_optimization.offload_optimizer")?;
                matches!(o.get("device"), Some(Value::String(s)) if s == "cpu")
            }
        };
        let offload_optimizer = offload || self.boolean(&mut p, "cpu_offload")?.unwrap_or(false);
        let config = ZeroConfig {
            stage,
            reduce_scatter: self.boolean(&mut p, "reduce_scatter")?.unwrap_or(d.reduce_scatter),
            reduce_bucket_size: self
                .integer(&mut p, "reduce_bucket_size")?
                .unwrap_or(d.reduce_bucket_size),
            allgather_partitions: self
                .boolean(&mut p, "allgather_partitions")?
                .unwrap_or(d.allgather_partitions),
            allgather_bucket_size: self
                .integer(&mut p, "allgather_bucket_size")?
                .unwrap_or(d.allgather_bucket_size),
            overlap_comm: self.boolean(&mut p, "overlap_comm")?.unwrap_or(d.overlap_comm),
            contiguous_gradients: self
                .boolean(&mut p, "contiguous_gradients")?
                .unwrap_or(d.contiguous_gradients),
            offload_optimizer,
        };
        let slot = p.slot;
        self.close(p);
        if offload_optimizer {
            self.warn(
                slot,
                "optimizer CPU offload (`zero_optimization.cpu_offload` / `offload_optimizer`) is \
                 accepted but kormlm keeps the optimizer partition on the training device"
                    .into(),
            );
        }
        Ok(config)
    }
}

static EMPTY_OBJECT: std::sync::LazyLock<Value> = std::sync::LazyLock::new(|| Value::Object(Map::new()));

fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn value_text(value: &Value) -> String {
    let text = value.to_string();
    if text.len() > 60 {
        format!("{}…", &text[..text.floor_char_boundary(60)])
    } else {
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(train: Option<u32>, micro: Option<u32>, acc: Option<u32>) -> DsConfig {
        let mut c = DsConfig::parse("{}", "t.json").unwrap().config;
        c.train_batch_size = train;
        c.train_micro_batch_size_per_gpu = micro;
        c.gradient_accumulation_steps = acc;
        c
    }

    fn batch(t: u32, m: u32, a: u32) -> Batch {
        Batch {
            train_batch_size: t,
            train_micro_batch_size_per_gpu: m,
            gradient_accumulation_steps: a,
        }
    }

    #[test]
    fn all_three_given_are_kept_and_asserted() {
        assert_eq!(
            config(Some(128), Some(32), Some(1)).resolve_batch(4, "t").unwrap(),
            batch(128, 32, 1)
        );
        let err = config(Some(128), Some(32), Some(1)).resolve_batch(2, "t").unwrap_err();
        assert!(err.to_string().contains("128 != 32 * 1 * 2"), "{err}");
    }

    #[test]
    fn train_and_micro_infer_accumulation() {
        assert_eq!(
            config(Some(64), Some(8), None).resolve_batch(2, "t").unwrap(),
            batch(64, 8, 4)
        );
    }

    #[test]
    fn train_and_accumulation_infer_micro() {
        assert_eq!(
            config(Some(64), None, Some(2)).resolve_batch(4, "t").unwrap(),
            batch(64, 8, 2)
        );
    }

    #[test]
    fn micro_and_accumulation_infer_train() {
        assert_eq!(
            config(None, Some(4), Some(3)).resolve_batch(2, "t").unwrap(),
            batch(24, 4, 3)
        );
    }

    #[test]
    fn only_train_sets_accumulation_one() {
        assert_eq!(
            config(Some(32), None, None).resolve_batch(4, "t").unwrap(),
            batch(32, 8, 1)
        );
    }

    #[test]
    fn only_micro_sets_accumulation_one() {
        assert_eq!(
            config(None, Some(16), None).resolve_batch(3, "t").unwrap(),
            batch(48, 16, 1)
        );
    }

    #[test]
    fn neither_train_nor_micro_is_an_error() {
        for acc in [None, Some(2)] {
            let err = config(None, None, acc).resolve_batch(1, "t").unwrap_err();
            assert!(err
                .to_string()
                .contains("Either train_batch_size or train_micro_batch_size_per_gpu"));
        }
    }

    #[test]
    fn integer_division_can_fail_the_assertion() {
        // The case DeepSpeed users meet: 30 // 4 // 2 = 3 and 4 * 3 * 2 = 24 != 30.
        let err = config(Some(30), Some(4), None)
            .resolve_batch(2, "cfg.json")
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "cfg.json: Check batch related parameters. train_batch_size is not equal to \
             micro_batch_per_gpu * gradient_acc_step * world_size 30 != 4 * 3 * 2"
        );
    }

    #[test]
    fn inference_to_zero_is_rejected() {
        let err = config(Some(4), None, None).resolve_batch(8, "t").unwrap_err();
        assert!(err.to_string().contains("Micro batch size per gpu: 0"), "{err}");
        let err = config(Some(4), Some(8), None).resolve_batch(1, "t").unwrap_err();
        assert!(err.to_string().contains("Gradient accumulation steps: 0"), "{err}");
    }

    #[test]
    fn malformed_json_names_line_and_column() {
        let err = DsConfig::parse("{\n  \"train_batch_size\": 8,\n  oops\n}", "ds.json").unwrap_err();
        match err {
            ConfigError::Json { line, column, .. } => assert_eq!((line, column), (3, 3)),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn wrong_types_name_the_key() {
        let err = DsConfig::parse(
            r#"{"optimizer": {"type": "AdamW", "params": {"lr": "fast"}}}"#,
            "ds.json",
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "ds.json: key `optimizer.params.lr`: expected a number, got a string"
        );
        let err = DsConfig::parse(r#"{"scheduler": {"type": "OneCycle"}}"#, "ds.json").unwrap_err();
        assert!(err
            .to_string()
            .contains("accepted: WarmupLR, WarmupDecayLR, WarmupCosineLR"));
        let err = DsConfig::parse(r#"{"zero_optimization": {"stage": 3}}"#, "ds.json").unwrap_err();
        assert!(err.to_string().contains("zero_optimization.stage"));
    }

    #[test]
    fn unknown_keys_are_warnings() {
        let parsed = DsConfig::parse(
            r#"{"train_batch_size": 8, "trian_micro_batch": 2, "fp16": {"enabled": "auto", "typo": 1}}"#,
            "ds.json",
        )
        .unwrap();
        assert_eq!(parsed.config.fp16.enabled, Toggle::Auto);
        assert_eq!(parsed.warnings.len(), 2, "{:?}", parsed.warnings);
        assert!(parsed.warnings[0].contains("`trian_micro_batch`"));
        assert!(parsed.warnings[1].contains("`fp16.typo`"));
    }

    #[test]
    fn every_key_read_is_known_and_the_others_are_reported_in_order() {
        let parsed = DsConfig::parse(
            r#"{"train_batch_size": 8, "trian": 1, "wandb": {},
                "fp16": {"enabled": "auto", "typo": 1, "auto_cast": false},
                "bfloat16": {"enabled": false}, "bf16": {"enabled": false},
                "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "adam_w_mode": true, "torch_adam": true}},
                "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 5, "last_batch_iteration": -1}},
                "zero_optimization": {"stage": 2, "cpu_offload": true, "weird": 1}}"#,
            "ds.json",
        )
        .unwrap();
        let known_root = "bf16, bfloat16, checkpoint, comms_logger, communication_data_type, csv_monitor, dump_state, \
             flops_profiler, fp16, gradient_accumulation_steps, gradient_clipping, gradient_predivide_factor, \
             memory_breakdown, optimizer, prescale_gradients, scheduler, sparse_gradients, steps_per_print, \
             tensorboard, train_batch_size, train_micro_batch_size_per_gpu, wall_clock_breakdown, wandb, \
             zero_allow_untested_optimizer, zero_optimization";
        assert_eq!(
            parsed.warnings,
            vec![
                format!("ds.json: unknown key `trian` ignored (known here: {known_root})"),
                "ds.json: unknown key `fp16.typo` ignored (known here: auto_cast, consecutive_hysteresis, enabled, \
                 hysteresis, initial_scale_power, loss_scale, loss_scale_window, min_loss_scale)"
                    .to_string(),
                "ds.json: unknown key `optimizer.params.adam_w_mode` ignored (known here: betas, eps, lr, \
                 torch_adam, weight_decay)"
                    .to_string(),
                "ds.json: unknown key `zero_optimization.weird` ignored (known here: allgather_bucket_size, \
                 allgather_partitions, contiguous_gradients, cpu_offload, elastic_checkpoint, \
                 load_from_fp32_weights, offload_optimizer, overlap_comm, reduce_bucket_size, reduce_scatter, \
                 round_robin_gradients, stage)"
                    .to_string(),
                "ds.json: optimizer CPU offload (`zero_optimization.cpu_offload` / `offload_optimizer`) is \
                 accepted but kormlm keeps the optimizer partition on the training device"
                    .to_string(),
            ]
        );
        assert_eq!(parsed.config.zero.stage, 2);
        assert!(parsed.config.zero.offload_optimizer);
    }

    #[test]
    fn monitors_take_deepspeeds_defaults_and_name_the_key_of_a_wrong_type() {
        let parsed = DsConfig::parse(r#"{"train_batch_size": 8}"#, "ds.json").unwrap();
        assert_eq!(parsed.config.tensorboard, MonitorConfig::default());
        assert!(!parsed.config.csv_monitor.enabled);
        assert_eq!(parsed.config.csv_monitor.dir(), Path::new("DeepSpeedJobName"));
        let parsed = DsConfig::parse(
            r#"{"train_batch_size": 8, "tensorboard": {"enabled": true, "output_path": "out/", "job_name": "run1"},
                "csv_monitor": {"enabled": true, "output_path": "/tmp/csv"}, "wandb": {"enabled": false, "project": "p"}}"#,
            "ds.json",
        )
        .unwrap();
        assert!(parsed.warnings.is_empty(), "{:?}", parsed.warnings);
        assert_eq!(
            parsed.config.tensorboard,
            MonitorConfig {
                enabled: true,
                output_path: "out/".into(),
                job_name: "run1".into()
            }
        );
        assert_eq!(parsed.config.tensorboard.dir(), Path::new("out/run1"));
        assert_eq!(parsed.config.csv_monitor.dir(), Path::new("/tmp/csv/DeepSpeedJobName"));
        for (config, message) in [
            (
                r#"{"tensorboard": {"enabled": "yes"}}"#,
                "ds.json: key `tensorboard.enabled`: expected true or false, got a string",
            ),
            (
                r#"{"csv_monitor": {"enabled": true, "output_path": 3}}"#,
                "ds.json: key `csv_monitor.output_path`: expected a string, got a number",
            ),
            (
                r#"{"tensorboard": {"job_name": ["a"]}}"#,
                "ds.json: key `tensorboard.job_name`: expected a string, got an array",
            ),
            (
                r#"{"csv_monitor": true}"#,
                "ds.json: key `csv_monitor`: expected a JSON object, got a boolean",
            ),
            (
                r#"{"tensorboard": {"enabled": true, "job_name": ""}}"#,
                "ds.json: key `tensorboard.job_name`: expected a directory name, got \"\"",
            ),
        ] {
            assert_eq!(DsConfig::parse(config, "ds.json").unwrap_err().to_string(), message);
        }
        let typo = DsConfig::parse(r#"{"tensorboard": {"enabled": false, "outputpath": "x"}}"#, "ds.json").unwrap();
        assert_eq!(
            typo.warnings,
            ["ds.json: unknown key `tensorboard.outputpath` ignored (known here: enabled, job_name, output_path)"]
        );
    }

    #[test]
    fn an_enabled_wandb_is_refused_with_what_to_use_instead() {
        let err = DsConfig::parse(r#"{"wandb": {"enabled": true, "project": "p"}}"#, "ds.json")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("ds.json: key `wandb.enabled`: Weights & Biases needs a network connection"),
            "{err}"
        );
        assert!(err.contains("`tensorboard` or `csv_monitor`"), "{err}");
    }

    #[test]
    fn relative_monitor_paths_are_anchored_and_absolute_ones_kept() {
        let mut config = DsConfig::parse(
            r#"{"tensorboard": {"enabled": true, "output_path": "tb"}, "csv_monitor": {"output_path": "/csv"}}"#,
            "ds.json",
        )
        .unwrap()
        .config;
        config.anchor_monitor_paths(Path::new("/work/dir"));
        assert_eq!(config.tensorboard.dir(), Path::new("/work/dir/tb/DeepSpeedJobName"));
        assert_eq!(config.csv_monitor.dir(), Path::new("/csv/DeepSpeedJobName"));
        let mut empty = MonitorConfig::default();
        empty.anchor(Path::new("/cwd"));
        assert_eq!(empty.dir(), Path::new("/cwd/DeepSpeedJobName"));
    }

    #[test]
    fn a_resolved_config_of_an_older_coordinator_has_the_monitors_off() {
        let resolved = DsConfig::parse(r#"{"train_batch_size": 2}"#, "ds.json")
            .unwrap()
            .config
            .resolve(1, "ds.json")
            .unwrap();
        let mut json: Value = serde_json::from_str(&resolved.to_json()).unwrap();
        let config = json["config"].as_object_mut().unwrap();
        config.remove("tensorboard");
        config.remove("csv_monitor");
        assert_eq!(ResolvedConfig::from_json(&json.to_string()).unwrap(), resolved);
    }

    #[test]
    fn resolved_config_round_trips() {
        let parsed = DsConfig::parse(
            r#"{"train_micro_batch_size_per_gpu": 4, "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 10}}}"#,
            "ds.json",
        )
        .unwrap();
        let resolved = parsed.config.resolve(2, "ds.json").unwrap();
        assert_eq!(ResolvedConfig::from_json(&resolved.to_json()).unwrap(), resolved);
        assert_eq!(resolved.batch, batch(8, 4, 1));
    }
}
