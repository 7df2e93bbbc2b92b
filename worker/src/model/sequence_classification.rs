//! `ElectraForSequenceClassification` in tch: the ELECTRA encoder and transformers'
//! `ElectraClassificationHead` (first token → dropout → `dense` → GELU → dropout → `out_proj`),
//! its two losses (single-label cross-entropy, multi-label BCE with logits, as transformers
//! computes them), the label space kept in `config.json` (`id2label`, `label2id`,
//! `problem_type`), and `LoadedClassifier`: loading from an MLM, discriminator or classifier
//! checkpoint (a missing head newly initialised and listed) and saving in Hugging Face layout.

use super::config::ElectraConfig;
use super::electra::ElectraModel;
use super::init::linear;
use super::weights::{self, LoadReport};
use super::{hub, save_model_dir, ModelError};
use crate::tokenizer::MlmTokenizer;
use serde_json::{json, Value};
use std::path::Path;
use tch::nn::{self, Module, VarStore};
use tch::{Device, Kind, Reduction, Tensor};

/// transformers' `problem_type` for classification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProblemType {
    /// One label per text: softmax over the labels, cross-entropy.
    SingleLabel,
    /// Any set of labels per text: a sigmoid per label, binary cross-entropy.
    MultiLabel,
}

impl ProblemType {
    /// The name in `config.json`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::SingleLabel => "single_label_classification",
            Self::MultiLabel => "multi_label_classification",
        }
    }
}

/// The label space of a classifier: names in id order and how they combine.
#[derive(Debug, Clone, PartialEq)]
pub struct Labels {
    pub names: Vec<String>,
    pub problem_type: ProblemType,
}

impl Labels {
    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// The label space a classifier's `config.json` declares (`id2label`, `problem_type`).
    pub fn from_config(config: &ElectraConfig, path: &Path) -> Result<Self, ModelError> {
        let fail = |message: String| ModelError::Config {
            path: path.display().to_string(),
            message,
        };
        let id2label = config.extra.get("id2label").and_then(Value::as_object).ok_or_else(|| {
            fail("no `id2label`: not a sequence classifier (train one with `worker classify train`)".into())
        })?;
        let mut pairs = Vec::with_capacity(id2label.len());
        for (id, name) in id2label {
            let id: usize = id
                .parse()
                .map_err(|_| fail(format!("id2label key {id:?} is not a label id (0, 1, …)")))?;
            let name = name
                .as_str()
                .ok_or_else(|| fail(format!("id2label[{id}] is not a string")))?;
            pairs.push((id, name.to_string()));
        }
        pairs.sort();
        if pairs.iter().enumerate().any(|(i, (id, _))| *id != i) {
            return Err(fail("id2label ids are not 0..num_labels".into()));
        }
        let problem_type = match config.extra.get("problem_type").and_then(Value::as_str) {
            None | Some("single_label_classification") => ProblemType::SingleLabel,
            Some("multi_label_classification") => ProblemType::MultiLabel,
            Some(other) => {
                return Err(fail(format!(
                    "problem_type {other:?} is not supported; accepted: \"single_label_classification\", \
                     \"multi_label_classification\""
                )))
            }
        };
        Ok(Self {
            names: pairs.into_iter().map(|(_, name)| name).collect(),
            problem_type,
        })
    }

    /// Writes the label space into a config's extra keys, as transformers saves it.
    fn write_into(&self, config: &mut ElectraConfig) {
        let id2label: serde_json::Map<String, Value> = self
            .names
            .iter()
            .enumerate()
            .map(|(i, n)| (i.to_string(), Value::from(n.clone())))
            .collect();
        let label2id: serde_json::Map<String, Value> = self
            .names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.clone(), Value::from(i)))
            .collect();
        config.extra.insert("id2label".into(), Value::Object(id2label));
        config.extra.insert("label2id".into(), Value::Object(label2id));
        config.extra.insert("num_labels".into(), json!(self.len()));
        config
            .extra
            .insert("problem_type".into(), json!(self.problem_type.as_str()));
    }
}

/// `classifier`: transformers' `ElectraClassificationHead`.
#[derive(Debug)]
pub struct ElectraClassificationHead {
    dense: nn::Linear,
    out_proj: nn::Linear,
    dropout: f64,
}

impl ElectraClassificationHead {
    pub fn new(vs: nn::Path, c: &ElectraConfig, num_labels: i64) -> Self {
        Self {
            dense: linear(&vs / "dense", c.hidden_size, c.hidden_size, c.initializer_range),
            out_proj: linear(&vs / "out_proj", c.hidden_size, num_labels, c.initializer_range),
            dropout: classifier_dropout(c),
        }
    }

    /// Logits `[B, num_labels]` from the final hidden states `[B, L, hidden]` (first token).
    pub fn forward(&self, hidden: &Tensor, train: bool) -> Tensor {
        let x = hidden.select(1, 0).dropout(self.dropout, train);
        let x = self.dense.forward(&x).gelu("none").dropout(self.dropout, train);
        self.out_proj.forward(&x)
    }
}

/// `classifier_dropout` when the config sets it, else `hidden_dropout_prob`.
pub fn classifier_dropout(c: &ElectraConfig) -> f64 {
    c.extra
        .get("classifier_dropout")
        .and_then(Value::as_f64)
        .unwrap_or(c.hidden_dropout_prob)
}

/// The variables a classifier may lack in its checkpoint (an MLM or discriminator one).
fn classifier_head(name: &str) -> bool {
    name.starts_with("classifier.")
}

/// The ELECTRA encoder with the sequence-classification head.
#[derive(Debug)]
pub struct ElectraForSequenceClassification {
    electra: ElectraModel,
    classifier: ElectraClassificationHead,
    config: ElectraConfig,
    labels: Labels,
}

impl ElectraForSequenceClassification {
    /// Creates the variables under `vs` (randomly initialised like transformers' `_init_weights`).
    pub fn new(vs: &nn::Path, config: &ElectraConfig, labels: Labels) -> Self {
        let electra = ElectraModel::new(&(vs / "electra"), config);
        let classifier = ElectraClassificationHead::new(vs / "classifier", config, labels.len() as i64);
        Self {
            electra,
            classifier,
            config: config.clone(),
            labels,
        }
    }

    pub fn config(&self) -> &ElectraConfig {
        &self.config
    }

    pub fn labels(&self) -> &Labels {
        &self.labels
    }

    /// Logits `[B, num_labels]`. `attention_mask` is `[B, L]` with 1 for real tokens.
    pub fn forward(&self, input_ids: &Tensor, attention_mask: &Tensor, train: bool) -> Tensor {
        let hidden = self.electra.forward(input_ids, attention_mask, None, train);
        self.classifier.forward(&hidden, train)
    }

    /// The loss summed over the batch, in f32: cross-entropy over `targets` ids `[B]` (int64)
    /// for single-label, BCE with logits against `targets` `[B, num_labels]` (0/1 floats) for
    /// multi-label. transformers' loss is this sum over `B` (single-label) or `B·num_labels`
    /// (multi-label): [`Self::loss_count`].
    pub fn loss_sum(&self, logits: &Tensor, targets: &Tensor) -> Tensor {
        let logits = logits.to_kind(Kind::Float);
        match self.labels.problem_type {
            ProblemType::SingleLabel => logits.cross_entropy_loss::<Tensor>(targets, None, Reduction::Sum, -100, 0.0),
            ProblemType::MultiLabel => logits.binary_cross_entropy_with_logits::<Tensor>(
                &targets.to_kind(Kind::Float),
                None,
                None,
                Reduction::Sum,
            ),
        }
    }

    /// How many terms transformers' mean loss averages over for `batch_size` texts.
    pub fn loss_count(&self, batch_size: usize) -> usize {
        match self.labels.problem_type {
            ProblemType::SingleLabel => batch_size,
            ProblemType::MultiLabel => batch_size * self.labels.len(),
        }
    }

    /// The config as saved: the encoder's, with the label space and this architecture.
    pub fn hf_config(&self) -> Value {
        let mut config = self.config.clone();
        self.labels.write_into(&mut config);
        let mut value = config.to_hf_json();
        value["architectures"] = json!(["ElectraForSequenceClassification"]);
        value
    }
}

/// A classifier with its variables and tokenizer.
pub struct LoadedClassifier {
    pub vs: VarStore,
    pub model: ElectraForSequenceClassification,
    pub tokenizer: MlmTokenizer,
    pub report: LoadReport,
}

impl LoadedClassifier {
    /// Loads a local directory or hub id onto `device`. With `labels` (training), the checkpoint
    /// may be an MLM or discriminator one: its head is created for those labels (seeded with
    /// `seed`) and listed as newly initialised, as transformers lists it. Without, the
    /// checkpoint must be a classifier and its `config.json` gives the labels.
    pub fn load(
        name_or_path: &str,
        revision: Option<&str>,
        labels: Option<Labels>,
        device: Device,
        seed: u64,
    ) -> Result<Self, ModelError> {
        let dir = hub::resolve(name_or_path, revision)?;
        let config_path = dir.join("config.json");
        let config = ElectraConfig::from_file(&config_path)?;
        let (labels, may_be_initialized): (Labels, fn(&str) -> bool) = match labels {
            Some(labels) => (labels, classifier_head),
            None => (Labels::from_config(&config, &config_path)?, |_| false),
        };
        if labels.is_empty() {
            return Err(ModelError::Config {
                path: config_path.display().to_string(),
                message: "a classifier needs at least one label".into(),
            });
        }
        let tokenizer = MlmTokenizer::from_dir(&dir)?;
        let files = weights::WeightFiles::find(&dir)?;
        let source = match &files {
            weights::WeightFiles::Safetensors(p) | weights::WeightFiles::PytorchBin(p) => p.display().to_string(),
            weights::WeightFiles::Sharded { index, .. } => index.display().to_string(),
        };
        tch::manual_seed(seed as i64);
        let vs = VarStore::new(device);
        let model = ElectraForSequenceClassification::new(&vs.root(), &config, labels);
        let report = weights::load_into_with(&vs, files.read()?, &source, may_be_initialized)?;
        if !report.newly_initialized.is_empty() {
            tracing::warn!(
                model = %dir.display(),
                keys = ?report.newly_initialized,
                "some weights of ElectraForSequenceClassification were not in the checkpoint and are newly initialized"
            );
        }
        if !report.unused.is_empty() {
            tracing::info!(model = %dir.display(), keys = ?report.unused, "checkpoint weights not used by ElectraForSequenceClassification");
        }
        Ok(Self {
            vs,
            model,
            tokenizer,
            report,
        })
    }

    /// Saves in Hugging Face layout, loadable by `AutoModelForSequenceClassification`.
    pub fn save(&self, dir: &Path) -> Result<(), ModelError> {
        save_model_dir(
            dir,
            &self.model.hf_config(),
            self.vs.variables().into_iter().collect(),
            &self.tokenizer,
        )
    }
}
