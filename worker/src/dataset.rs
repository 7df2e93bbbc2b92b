//! Tokenised sentences kept as one flat id array, cached on disk under a key made of the corpus,
//! the tokenizer and `max_seq_len`, so a restart does not tokenise again.

use crate::corpus::stable_hash;
use crate::tokenizer::{MlmTokenizer, TokenizerError};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"KMLMTOK1";

#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error("{path}: {message}")]
    Cache { path: String, message: String },
}

/// Sample `i` is `ids[offsets[i]..offsets[i + 1]]`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TokenizedSet {
    offsets: Vec<u64>,
    ids: Vec<u32>,
}

impl TokenizedSet {
    pub fn from_samples(samples: &[Vec<u32>]) -> Self {
        let mut offsets = Vec::with_capacity(samples.len() + 1);
        let mut ids = Vec::with_capacity(samples.iter().map(Vec::len).sum());
        offsets.push(0);
        for s in samples {
            ids.extend_from_slice(s);
            offsets.push(ids.len() as u64);
        }
        Self { offsets, ids }
    }

    pub fn len(&self) -> usize {
        self.offsets.len().saturating_sub(1)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn get(&self, i: usize) -> &[u32] {
        &self.ids[self.offsets[i] as usize..self.offsets[i + 1] as usize]
    }

    pub fn total_tokens(&self) -> usize {
        self.ids.len()
    }

    fn write(&self, path: &Path) -> std::io::Result<()> {
        let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
        {
            let mut f = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
            f.write_all(MAGIC)?;
            f.write_all(&(self.len() as u64).to_le_bytes())?;
            f.write_all(&(self.ids.len() as u64).to_le_bytes())?;
            for o in &self.offsets {
                f.write_all(&o.to_le_bytes())?;
            }
            for id in &self.ids {
                f.write_all(&id.to_le_bytes())?;
            }
            f.flush()?;
            f.get_ref().sync_all()?;
        }
        std::fs::rename(&tmp, path)
    }

    fn read(path: &Path) -> Result<Self, String> {
        let mut bytes = Vec::new();
        std::fs::File::open(path)
            .and_then(|mut f| f.read_to_end(&mut bytes))
            .map_err(|e| e.to_string())?;
        if bytes.len() < 24 || &bytes[..8] != MAGIC {
            return Err("not a kormlm token cache".into());
        }
        let word = |i: usize| u64::from_le_bytes(bytes[i..i + 8].try_into().expect("8 bytes"));
        let (count, total) = (word(8) as usize, word(16) as usize);
        let expected = 24 + (count + 1) * 8 + total * 4;
        if bytes.len() != expected {
            return Err(format!("truncated: {} bytes, expected {expected}", bytes.len()));
        }
        let offsets: Vec<u64> = (0..=count).map(|i| word(24 + i * 8)).collect();
        let base = 24 + (count + 1) * 8;
        let ids: Vec<u32> = bytes[base..]
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect();
        if offsets.windows(2).any(|w| w[0] > w[1]) || offsets.last() != Some(&(total as u64)) {
            return Err("inconsistent offsets".into());
        }
        Ok(Self { offsets, ids })
    }
}

/// Identifies a tokenisation: corpus texts, tokenizer and maximum length.
pub fn cache_key(texts: &[String], tokenizer: &MlmTokenizer, max_len: usize) -> String {
    let mut h = stable_hash(tokenizer.fingerprint().as_bytes()) ^ (max_len as u64).wrapping_mul(0x9e3779b97f4a7c15);
    for t in texts {
        h = h.rotate_left(5) ^ stable_hash(t.as_bytes());
        h = h.wrapping_mul(0x100000001b3);
    }
    format!("{h:016x}-{}", texts.len())
}

/// Tokenises `texts` (in parallel) or reuses the cache file for the same key in `cache_dir`.
pub fn tokenize_cached(
    texts: &[String],
    tokenizer: &MlmTokenizer,
    max_len: usize,
    cache_dir: Option<&Path>,
) -> Result<TokenizedSet, DatasetError> {
    let path: Option<PathBuf> = cache_dir.map(|d| d.join(format!("{}.tok", cache_key(texts, tokenizer, max_len))));
    if let Some(path) = &path {
        if path.is_file() {
            match TokenizedSet::read(path) {
                Ok(set) if set.len() == texts.len() => {
                    tracing::info!(path = %path.display(), samples = set.len(), "reusing tokenised cache");
                    return Ok(set);
                }
                Ok(_) => tracing::warn!(path = %path.display(), "token cache has the wrong size; tokenising again"),
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "token cache unreadable; tokenising again")
                }
            }
        }
    }
    let mut samples = Vec::with_capacity(texts.len());
    for chunk in texts.chunks(8192) {
        let refs: Vec<&str> = chunk.iter().map(String::as_str).collect();
        samples.extend(tokenizer.encode_batch(&refs, Some(max_len))?);
    }
    let set = TokenizedSet::from_samples(&samples);
    if let Some(path) = &path {
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        set.write(path).map_err(|e| DatasetError::Cache {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
    }
    Ok(set)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_round_trip_and_reuse() {
        let vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "가", "나"];
        let tok = MlmTokenizer::from_vocab(
            vocab
                .iter()
                .enumerate()
                .map(|(i, t)| (t.to_string(), i as u32))
                .collect(),
        )
        .unwrap();
        let texts: Vec<String> = vec!["가 나".into(), "나".into(), "".into()];
        let dir = tempfile::tempdir().unwrap();
        let a = tokenize_cached(&texts, &tok, 16, Some(dir.path())).unwrap();
        assert_eq!(a.len(), 3);
        assert_eq!(a.get(0), &[2, 5, 6, 3]);
        assert_eq!(a.get(2), &[2, 3]);
        let files: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(files.len(), 1);
        let b = tokenize_cached(&texts, &tok, 16, Some(dir.path())).unwrap();
        assert_eq!(a, b);
        assert_ne!(cache_key(&texts, &tok, 16), cache_key(&texts, &tok, 8));
        // A damaged cache is ignored and rewritten.
        let path = files[0].as_ref().unwrap().path();
        std::fs::write(&path, b"KMLMTOK1garbage").unwrap();
        assert_eq!(tokenize_cached(&texts, &tok, 16, Some(dir.path())).unwrap(), a);
    }
}
