//! BERT's special tokens: their names (the one definition the tokenizer and the WordPiece
//! trainer share) and, for a loaded vocabulary, their ids.

/// BERT's special tokens, in the order `from_vocab` and `tokenizer-train` put them first.
pub const BERT_SPECIAL_TOKENS: [&str; 5] = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"];

/// Ids of the special tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpecialIds {
    pub pad: u32,
    pub unk: u32,
    pub cls: u32,
    pub sep: u32,
    pub mask: u32,
}

impl SpecialIds {
    /// transformers' `all_special_ids`: never masked, dropped by `skip_special_tokens`.
    pub fn all(&self) -> [u32; 5] {
        [self.unk, self.sep, self.pad, self.cls, self.mask]
    }

    pub fn contains(&self, id: u32) -> bool {
        self.all().contains(&id)
    }
}
