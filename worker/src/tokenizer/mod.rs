//! BERT WordPiece tokenization identical to transformers' `BertTokenizerFast`: loaded from
//! `tokenizer.json`, or built from `vocab.txt` + `tokenizer_config.json` exactly as
//! transformers' `BertConverter` builds it; and `train_wordpiece`, a new vocabulary from text.
//!
//! `special` (BERT's special tokens), `settings` (the tokenizer's JSON files), `error` and
//! `wordpiece_trainer` import nothing from this module; this module puts them together.

mod error;
mod settings;
mod special;
pub mod wordpiece_trainer;

pub use error::TokenizerError;
pub use special::{SpecialIds, BERT_SPECIAL_TOKENS};

use settings::Settings;
use std::collections::HashMap;
use std::path::Path;
use tokenizers::decoders::wordpiece::WordPiece as WordPieceDecoder;
use tokenizers::models::wordpiece::WordPiece;
use tokenizers::normalizers::bert::BertNormalizer;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy};

/// Reads `vocab.txt` like transformers' `load_vocab` (one token per line, in id order).
pub fn read_vocab(path: &Path) -> Result<HashMap<String, u32>, TokenizerError> {
    let bytes = std::fs::read(path).map_err(|e| TokenizerError::file(path, e))?;
    let text = String::from_utf8(bytes).map_err(|e| TokenizerError::file(path, format!("invalid UTF-8: {e}")))?;
    let mut vocab = HashMap::new();
    for (index, line) in text.split_terminator('\n').enumerate() {
        vocab.insert(line.strip_suffix('\r').unwrap_or(line).to_string(), index as u32);
    }
    Ok(vocab)
}

#[derive(Clone)]
pub struct MlmTokenizer {
    inner: Tokenizer,
    special: SpecialIds,
    settings: Settings,
}

impl std::fmt::Debug for MlmTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MlmTokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("special", &self.special)
            .finish()
    }
}

impl MlmTokenizer {
    /// From `tokenizer.json` when present, else from `vocab.txt`.
    pub fn from_dir(dir: &Path) -> Result<Self, TokenizerError> {
        let settings = Settings::read(dir)?;
        let json = dir.join("tokenizer.json");
        let vocab = dir.join("vocab.txt");
        let mut inner = if json.is_file() {
            Tokenizer::from_file(&json).map_err(|e| TokenizerError::file(&json, e))?
        } else if vocab.is_file() {
            Self::build_wordpiece(read_vocab(&vocab)?, &settings)?
        } else {
            return Err(TokenizerError::Missing {
                dir: dir.display().to_string(),
            });
        };
        inner
            .with_truncation(None)
            .map_err(|e| TokenizerError::Encode(e.to_string()))?
            .with_padding(None);
        Self::finish(inner, settings)
    }

    /// A cased BERT WordPiece tokenizer over `vocab` (token → id).
    pub fn from_vocab(vocab: HashMap<String, u32>) -> Result<Self, TokenizerError> {
        let settings = Settings::cased_bert();
        let inner = Self::build_wordpiece(vocab, &settings)?;
        Self::finish(inner, settings)
    }

    fn build_wordpiece(vocab: HashMap<String, u32>, settings: &Settings) -> Result<Tokenizer, TokenizerError> {
        let [pad, unk, cls, sep, mask] = settings.tokens.clone();
        let id = |token: &str| {
            vocab.get(token).copied().ok_or_else(|| TokenizerError::NoSpecialToken {
                token: token.to_string(),
            })
        };
        let (cls_id, sep_id) = (id(&cls)?, id(&sep)?);
        let model = WordPiece::builder()
            .vocab(vocab.into_iter().collect::<ahash::AHashMap<String, u32>>())
            .unk_token(unk.clone())
            .continuing_subword_prefix("##".into())
            .max_input_chars_per_word(100)
            .build()
            .map_err(|e| TokenizerError::Encode(e.to_string()))?;
        let mut tokenizer = Tokenizer::new(model);
        tokenizer.with_normalizer(Some(BertNormalizer::new(
            true,
            settings.tokenize_chinese_chars,
            settings.strip_accents,
            settings.do_lower_case,
        )));
        tokenizer.with_pre_tokenizer(Some(BertPreTokenizer));
        let template = TemplateProcessing::builder()
            .try_single(format!("{cls}:0 $A:0 {sep}:0"))
            .and_then(|b| b.try_pair(format!("{cls}:0 $A:0 {sep}:0 $B:1 {sep}:1")))
            .map_err(|e| TokenizerError::Encode(e.to_string()))?
            .special_tokens(vec![(cls.clone(), cls_id), (sep.clone(), sep_id)])
            .build()
            .map_err(|e| TokenizerError::Encode(e.to_string()))?;
        tokenizer.with_post_processor(Some(template));
        tokenizer.with_decoder(Some(WordPieceDecoder::new("##".into(), true)));
        let specials: Vec<AddedToken> = [pad, unk, cls, sep, mask]
            .into_iter()
            .map(|t| AddedToken::from(t, true).normalized(false))
            .collect();
        tokenizer.add_special_tokens(&specials);
        Ok(tokenizer)
    }

    fn finish(inner: Tokenizer, settings: Settings) -> Result<Self, TokenizerError> {
        let id = |token: &str| {
            inner.token_to_id(token).ok_or_else(|| TokenizerError::NoSpecialToken {
                token: token.to_string(),
            })
        };
        let [pad, unk, cls, sep, mask] = &settings.tokens;
        let special = SpecialIds {
            pad: id(pad)?,
            unk: id(unk)?,
            cls: id(cls)?,
            sep: id(sep)?,
            mask: id(mask)?,
        };
        Ok(Self {
            inner,
            special,
            settings,
        })
    }

    /// A text that changes whenever tokenisation would (the serialised pipeline and settings).
    pub fn fingerprint(&self) -> String {
        format!(
            "{}|{:?}",
            self.inner.to_string(false).unwrap_or_default(),
            self.settings
        )
    }

    pub fn special(&self) -> SpecialIds {
        self.special
    }

    pub fn mask_token(&self) -> &str {
        &self.settings.tokens[4]
    }

    pub fn model_max_length(&self) -> usize {
        self.settings.model_max_length
    }

    /// Size of the vocabulary with added tokens (`len(tokenizer)` in transformers).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    fn truncating(&self, max_len: Option<usize>) -> Result<std::borrow::Cow<'_, Tokenizer>, TokenizerError> {
        match max_len {
            None => Ok(std::borrow::Cow::Borrowed(&self.inner)),
            Some(max_length) => {
                let mut t = self.inner.clone();
                t.with_truncation(Some(TruncationParams {
                    max_length,
                    strategy: TruncationStrategy::LongestFirst,
                    stride: 0,
                    direction: TruncationDirection::Right,
                }))
                .map_err(|e| TokenizerError::Encode(e.to_string()))?;
                Ok(std::borrow::Cow::Owned(t))
            }
        }
    }

    /// `[CLS] … [SEP]` ids, truncated to `max_len` tokens when given.
    pub fn encode(&self, text: &str, max_len: Option<usize>) -> Result<Vec<u32>, TokenizerError> {
        let tokenizer = self.truncating(max_len)?;
        let encoding = tokenizer
            .encode_fast(text, true)
            .map_err(|e| TokenizerError::Encode(e.to_string()))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Encodes many texts in parallel.
    pub fn encode_batch(&self, texts: &[&str], max_len: Option<usize>) -> Result<Vec<Vec<u32>>, TokenizerError> {
        let tokenizer = self.truncating(max_len)?;
        let inputs: Vec<tokenizers::EncodeInput> = texts.iter().map(|t| (*t).into()).collect();
        let encodings = tokenizer
            .encode_batch_fast(inputs, true)
            .map_err(|e| TokenizerError::Encode(e.to_string()))?;
        Ok(encodings.into_iter().map(|e| e.get_ids().to_vec()).collect())
    }

    /// Word pieces of `text` without special tokens (for offsets of the tail beyond a window).
    pub fn encode_plain(&self, text: &str) -> Result<tokenizers::Encoding, TokenizerError> {
        self.inner
            .encode(text, false)
            .map_err(|e| TokenizerError::Encode(e.to_string()))
    }

    /// Text of `ids`, like `tokenizer.decode(ids, skip_special_tokens=…)`.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, TokenizerError> {
        let text = self
            .inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| TokenizerError::Encode(e.to_string()))?;
        Ok(if self.settings.clean_up_tokenization_spaces {
            clean_up_tokenization(&text)
        } else {
            text
        })
    }

    /// Writes `tokenizer.json`, `vocab.txt`, `tokenizer_config.json` and `special_tokens_map.json`.
    pub fn save(&self, dir: &Path) -> Result<(), TokenizerError> {
        let json = dir.join("tokenizer.json");
        self.inner
            .save(&json, false)
            .map_err(|e| TokenizerError::file(&json, e))?;
        let mut by_id: Vec<(u32, String)> = self.inner.get_vocab(false).into_iter().map(|(t, i)| (i, t)).collect();
        by_id.sort();
        let mut vocab = String::new();
        for (_, token) in by_id {
            vocab.push_str(&token);
            vocab.push('\n');
        }
        let write = |name: &str, text: String| {
            let path = dir.join(name);
            std::fs::write(&path, text).map_err(|e| TokenizerError::file(&path, e))
        };
        write("vocab.txt", vocab)?;
        let [pad, unk, cls, sep, mask] = &self.settings.tokens;
        let config = serde_json::json!({
            "tokenizer_class": "BertTokenizer",
            "do_lower_case": self.settings.do_lower_case,
            "strip_accents": self.settings.strip_accents,
            "tokenize_chinese_chars": self.settings.tokenize_chinese_chars,
            "clean_up_tokenization_spaces": self.settings.clean_up_tokenization_spaces,
            "model_max_length": self.settings.model_max_length,
            "pad_token": pad, "unk_token": unk, "cls_token": cls, "sep_token": sep, "mask_token": mask,
        });
        write("tokenizer_config.json", format!("{config:#}\n"))?;
        let map = serde_json::json!({
            "pad_token": pad, "unk_token": unk, "cls_token": cls, "sep_token": sep, "mask_token": mask,
        });
        write("special_tokens_map.json", format!("{map:#}\n"))
    }
}

/// Trains a cased BERT WordPiece vocabulary (special tokens `[PAD] [UNK] [CLS] [SEP] [MASK]`
/// first) on text files, one sentence per line.
pub fn train_wordpiece(
    files: &[std::path::PathBuf],
    vocab_size: usize,
    min_frequency: u64,
) -> Result<MlmTokenizer, TokenizerError> {
    let mut words = std::collections::BTreeMap::new();
    for f in files {
        let text = std::fs::read(f).map_err(|e| TokenizerError::file(f, e))?;
        let text = String::from_utf8(text).map_err(|e| TokenizerError::file(f, format!("not UTF-8: {e}")))?;
        wordpiece_trainer::count_words(text.lines(), &mut words)
            .map_err(|e| TokenizerError::Encode(format!("vocabulary training failed: {e}")))?;
    }
    MlmTokenizer::from_vocab(wordpiece_trainer::train(&words, vocab_size, min_frequency))
}

/// transformers' `clean_up_tokenization`.
pub fn clean_up_tokenization(text: &str) -> String {
    text.replace(" .", ".")
        .replace(" ?", "?")
        .replace(" !", "!")
        .replace(" ,", ",")
        .replace(" ' ", "'")
        .replace(" n't", "n't")
        .replace(" 'm", "'m")
        .replace(" 's", "'s")
        .replace(" 've", "'ve")
        .replace(" 're", "'re")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> MlmTokenizer {
        let tokens = [
            "[PAD]",
            "[UNK]",
            "[CLS]",
            "[SEP]",
            "[MASK]",
            "안녕",
            "##하세요",
            "영화",
            "!",
            ".",
        ];
        MlmTokenizer::from_vocab(
            tokens
                .iter()
                .enumerate()
                .map(|(i, t)| (t.to_string(), i as u32))
                .collect(),
        )
        .unwrap()
    }

    #[test]
    fn encodes_with_special_tokens_and_truncates() {
        let t = tiny();
        assert_eq!(t.encode("안녕하세요 영화!", None).unwrap(), vec![2, 5, 6, 7, 8, 3]);
        assert_eq!(t.encode("안녕하세요 영화!", Some(4)).unwrap(), vec![2, 5, 6, 3]);
        assert_eq!(t.encode("", None).unwrap(), vec![2, 3]);
        assert_eq!(t.encode("[MASK] 영화", None).unwrap(), vec![2, 4, 7, 3]);
        assert_eq!(t.encode("모름", None).unwrap(), vec![2, 1, 3]);
    }

    #[test]
    fn decodes_and_round_trips_through_files() {
        let t = tiny();
        assert_eq!(t.decode(&[2, 5, 6, 7, 8, 3], true).unwrap(), "안녕하세요 영화!");
        let dir = tempfile::tempdir().unwrap();
        t.save(dir.path()).unwrap();
        let again = MlmTokenizer::from_dir(dir.path()).unwrap();
        assert_eq!(
            again.encode("안녕하세요 영화.", None).unwrap(),
            t.encode("안녕하세요 영화.", None).unwrap()
        );
        std::fs::remove_file(dir.path().join("tokenizer.json")).unwrap();
        let from_vocab = MlmTokenizer::from_dir(dir.path()).unwrap();
        assert_eq!(
            from_vocab.encode("안녕하세요 영화.", None).unwrap(),
            vec![2, 5, 6, 7, 9, 3]
        );
        assert_eq!(from_vocab.special().mask, 4);
    }

    #[test]
    fn missing_special_token_is_named() {
        let vocab: HashMap<String, u32> = [("[PAD]", 0), ("[UNK]", 1), ("[SEP]", 2), ("[MASK]", 3)]
            .iter()
            .map(|(t, i)| (t.to_string(), *i))
            .collect();
        let err = MlmTokenizer::from_vocab(vocab).unwrap_err().to_string();
        assert!(err.contains("[CLS]"), "{err}");
    }
}
