//! Finding, reading, checking and writing checkpoint weights: `model.safetensors`, sharded
//! safetensors with `model.safetensors.index.json`, and `pytorch_model.bin`.

use super::{torch_pickle, ModelError};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use tch::{nn::VarStore, Kind, Tensor};

pub const SAFETENSORS: &str = "model.safetensors";
pub const SAFETENSORS_INDEX: &str = "model.safetensors.index.json";
pub const PYTORCH_BIN: &str = "pytorch_model.bin";

/// Where a checkpoint's weights are.
#[derive(Debug, Clone, PartialEq)]
pub enum WeightFiles {
    Safetensors(PathBuf),
    Sharded { index: PathBuf, shards: Vec<PathBuf> },
    PytorchBin(PathBuf),
}

impl WeightFiles {
    /// Looks in `dir` in transformers' order of preference.
    pub fn find(dir: &Path) -> Result<Self, ModelError> {
        let single = dir.join(SAFETENSORS);
        if single.is_file() {
            return Ok(Self::Safetensors(single));
        }
        let index = dir.join(SAFETENSORS_INDEX);
        if index.is_file() {
            let shards = shard_files(&index)?;
            return Ok(Self::Sharded { index, shards });
        }
        let bin = dir.join(PYTORCH_BIN);
        if bin.is_file() {
            return Ok(Self::PytorchBin(bin));
        }
        Err(ModelError::MissingFile {
            dir: dir.display().to_string(),
            wanted: format!("{SAFETENSORS}, {SAFETENSORS_INDEX} or {PYTORCH_BIN}"),
        })
    }

    /// Every tensor, on the CPU, in its stored dtype.
    pub fn read(&self) -> Result<Vec<(String, Tensor)>, ModelError> {
        let read_one = |path: &Path| {
            Tensor::read_safetensors(path).map_err(|e| ModelError::Format {
                path: path.display().to_string(),
                message: format!("not a readable safetensors file: {e}"),
            })
        };
        match self {
            Self::Safetensors(path) => read_one(path),
            Self::Sharded { shards, .. } => {
                let mut all = Vec::new();
                for shard in shards {
                    all.extend(read_one(shard)?);
                }
                Ok(all)
            }
            Self::PytorchBin(path) => torch_pickle::read_state_dict(path),
        }
    }
}

fn shard_files(index: &Path) -> Result<Vec<PathBuf>, ModelError> {
    let text = std::fs::read_to_string(index).map_err(|e| ModelError::io(index, e))?;
    let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| ModelError::Format {
        path: index.display().to_string(),
        message: format!("line {}, column {}: {e}", e.line(), e.column()),
    })?;
    let map = value
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| ModelError::Format {
            path: index.display().to_string(),
            message: "no `weight_map` object".into(),
        })?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut files: Vec<String> = map.values().filter_map(|v| v.as_str().map(str::to_string)).collect();
    files.sort();
    files.dedup();
    let shards: Vec<PathBuf> = files.iter().map(|f| dir.join(f)).collect();
    if let Some(missing) = shards.iter().find(|p| !p.is_file()) {
        return Err(ModelError::MissingFile {
            dir: dir.display().to_string(),
            wanted: format!("{} (listed in {})", missing.display(), index.display()),
        });
    }
    Ok(shards)
}

/// What loading did besides copying matching weights.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LoadReport {
    /// Model weights absent from the checkpoint, left as initialised (like transformers'
    /// "newly initialized" list).
    pub newly_initialized: Vec<String>,
    /// Checkpoint weights the model has no place for.
    pub unused: Vec<String>,
}

/// Weights of `ElectraForMaskedLM` whose absence is tolerated: the MLM head, which a
/// discriminator checkpoint lacks.
pub fn mlm_head(name: &str) -> bool {
    name.starts_with("generator_predictions.") || name == "generator_lm_head.bias"
}

/// Non-persistent buffers that old checkpoints carry; transformers ignores them silently.
fn is_ignored_buffer(name: &str) -> bool {
    name.ends_with("embeddings.position_ids") || name.ends_with("embeddings.token_type_ids")
}

/// Copies checkpoint tensors into the variables of `vs` (names as in transformers; a
/// checkpoint saved without the `electra.` prefix is accepted too).
pub fn load_into(vs: &VarStore, tensors: Vec<(String, Tensor)>, source: &str) -> Result<LoadReport, ModelError> {
    load_into_with(vs, tensors, source, mlm_head)
}

/// [`load_into`] for any ELECTRA model: `may_be_initialized` names the variables (a task head)
/// that stay as initialised when the checkpoint lacks them; any other missing one is an error.
pub fn load_into_with(
    vs: &VarStore,
    tensors: Vec<(String, Tensor)>,
    source: &str,
    may_be_initialized: fn(&str) -> bool,
) -> Result<LoadReport, ModelError> {
    let mut by_name: HashMap<String, Tensor> = HashMap::with_capacity(tensors.len());
    for (name, tensor) in tensors {
        by_name.insert(name, tensor);
    }
    let variables: BTreeMap<String, Tensor> = vs.variables().into_iter().collect();
    let has_lm_head = variables.contains_key("generator_lm_head.bias");
    let mut used: HashSet<String> = HashSet::new();
    let mut report = LoadReport::default();
    let mut missing = Vec::new();
    for (name, mut var) in variables {
        let candidate = if by_name.contains_key(&name) {
            Some(name.clone())
        } else {
            name.strip_prefix("electra.")
                .filter(|n| by_name.contains_key(*n))
                .map(str::to_string)
        };
        let Some(key) = candidate else {
            if may_be_initialized(&name) {
                report.newly_initialized.push(name);
            } else {
                missing.push(name);
            }
            continue;
        };
        let source_tensor = &by_name[&key];
        if source_tensor.size() != var.size() {
            return Err(ModelError::Shape {
                path: source.to_string(),
                key,
                expected: var.size(),
                found: source_tensor.size(),
            });
        }
        tch::no_grad(|| var.f_copy_(&source_tensor.to_kind(var.kind()))).map_err(|e| ModelError::Format {
            path: source.to_string(),
            message: format!("cannot copy {key}: {e}"),
        })?;
        used.insert(key);
    }
    if !missing.is_empty() {
        return Err(ModelError::MissingWeights {
            path: source.to_string(),
            keys: missing,
        });
    }
    if has_lm_head {
        // The output projection is tied to the word embeddings, so a stored copy is used through them.
        used.insert("generator_lm_head.weight".to_string());
    }
    let mut unused: Vec<String> = by_name
        .keys()
        .filter(|k| !used.contains(*k) && !is_ignored_buffer(k))
        .cloned()
        .collect();
    unused.sort();
    report.unused = unused;
    if let (true, Some(lm), Some(emb)) = (
        has_lm_head,
        by_name.get("generator_lm_head.weight"),
        by_name
            .get("electra.embeddings.word_embeddings.weight")
            .or_else(|| by_name.get("embeddings.word_embeddings.weight")),
    ) {
        let same = lm.size() == emb.size()
            && lm
                .to_kind(Kind::Float)
                .allclose(&emb.to_kind(Kind::Float), 0.0, 0.0, false);
        if !same {
            tracing::warn!(
                path = source,
                "generator_lm_head.weight differs from the word embeddings; kormlm ties them (like transformers with \
                 tie_word_embeddings) and uses the embeddings"
            );
        }
    }
    Ok(report)
}

/// Writes `tensors` (as f32) as a safetensors file with `{"format": "pt"}` metadata (transformers
/// checks it), durably (a temporary name, flushed, renamed; see [`kormlm_proto::durable`]). Each
/// tensor's bytes stream to the file from its own memory, so saving holds no second copy of the
/// weights or optimizer states.
pub fn write_safetensors(tensors: &[(String, Tensor)], path: &Path) -> Result<(), ModelError> {
    let views: Vec<(String, F32Bytes)> = tensors
        .iter()
        .map(|(name, tensor)| (name.clone(), F32Bytes::of(tensor)))
        .collect();
    let metadata: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    kormlm_proto::durable::write_by_path(path, |tmp| {
        safetensors::serialize_to_file(views, Some(metadata), tmp).map_err(|e| match e {
            safetensors::SafeTensorError::IoError(e) => e,
            other => std::io::Error::other(other),
        })
    })
    .map_err(|e| ModelError::io(path, e.error))
}

/// A tensor as safetensors writes it: contiguous f32 in host memory, read in place.
struct F32Bytes {
    tensor: Tensor,
    shape: Vec<usize>,
}

impl F32Bytes {
    fn of(tensor: &Tensor) -> Self {
        // Each step returns the tensor itself when it already is a contiguous f32 CPU tensor.
        let tensor = tensor.to_device(tch::Device::Cpu).to_kind(Kind::Float).contiguous();
        let shape = tensor.size().iter().map(|d| *d as usize).collect();
        Self { tensor, shape }
    }
}

// safetensors stores little-endian values, which host memory holds as is only on such a host.
const _: () = assert!(cfg!(target_endian = "little"));

impl safetensors::View for F32Bytes {
    fn dtype(&self) -> safetensors::Dtype {
        safetensors::Dtype::F32
    }

    fn shape(&self) -> &[usize] {
        &self.shape
    }

    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        if self.tensor.numel() == 0 {
            return std::borrow::Cow::Borrowed(&[]);
        }
        // SAFETY: `self.tensor` is a contiguous f32 tensor in host memory (made so in `of`) of
        // `data_len()` bytes, owned by `self` and so alive as long as the returned borrow; the
        // training thread that owns it is the one writing the file, so nothing writes it meanwhile.
        let bytes = unsafe { std::slice::from_raw_parts(self.tensor.data_ptr() as *const u8, self.data_len()) };
        std::borrow::Cow::Borrowed(bytes)
    }

    fn data_len(&self) -> usize {
        self.tensor.numel() * std::mem::size_of::<f32>()
    }
}
