//! Masked-LM masking exactly like transformers' `DataCollatorForLanguageModeling` (15 %, of
//! which 80 % `[MASK]`, 10 % a random token, 10 % unchanged; special tokens and padding never
//! masked), but drawn from a generator seeded by (seed, epoch, sample index), so a sample's mask
//! does not depend on batch layout or world size.

use crate::tokenizer::SpecialIds;

/// The epoch value used for the dev set: one fixed masking for the whole run.
pub const DEV_EPOCH: u64 = u64::MAX;

/// Label of a position that is not predicted (PyTorch's `ignore_index`).
pub const IGNORE: i64 = -100;

/// SplitMix64: tiny, fast, and the same on every platform.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// A generator for one (seed, epoch, index) triple.
    pub fn for_sample(seed: u64, epoch: u64, index: u64) -> Self {
        let mut g = Self(seed ^ 0x6a09e667f3bcc908);
        let a = g.next_u64() ^ epoch.wrapping_mul(0x9e3779b97f4a7c15);
        let mut g = Self(a);
        let b = g.next_u64() ^ index.wrapping_mul(0xbf58476d1ce4e5b9);
        Self(b)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e3779b97f4a7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d049bb133111eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in [0, n).
    pub fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }
}

/// A masked sample: model input and, per position, the label (`IGNORE` where not masked).
#[derive(Debug, Clone, PartialEq)]
pub struct MaskedSample {
    pub input_ids: Vec<u32>,
    pub labels: Vec<i64>,
}

impl MaskedSample {
    pub fn masked_count(&self) -> usize {
        self.labels.iter().filter(|l| **l != IGNORE).count()
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Masker {
    pub special: SpecialIds,
    /// `len(tokenizer)`: random replacements are drawn from [0, vocab_size).
    pub vocab_size: u32,
    pub probability: f64,
    pub seed: u64,
}

impl Masker {
    pub fn mask(&self, ids: &[u32], epoch: u64, index: u64) -> MaskedSample {
        let mut rng = SplitMix64::for_sample(self.seed, epoch, index);
        let mut input_ids = ids.to_vec();
        let mut labels = vec![IGNORE; ids.len()];
        for (pos, &id) in ids.iter().enumerate() {
            // Draw for every position, special or not, so positions never shift each other's draws.
            let selected = rng.next_f64() < self.probability;
            let kind = rng.next_f64();
            let coin = rng.next_f64();
            let random = rng.below(u64::from(self.vocab_size)) as u32;
            if !selected || self.special.contains(id) {
                continue;
            }
            labels[pos] = i64::from(id);
            if kind < 0.8 {
                input_ids[pos] = self.special.mask;
            } else if coin < 0.5 {
                input_ids[pos] = random;
            }
        }
        MaskedSample { input_ids, labels }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn masker() -> Masker {
        Masker {
            special: SpecialIds {
                pad: 0,
                unk: 1,
                cls: 2,
                sep: 3,
                mask: 4,
            },
            vocab_size: 1000,
            probability: 0.15,
            seed: 42,
        }
    }

    #[test]
    fn statistics_match_the_collator() {
        let m = masker();
        let (mut tokens, mut masked, mut as_mask, mut random, mut kept) = (0, 0, 0, 0, 0);
        for index in 0..2_000u64 {
            let ids: Vec<u32> = (0..60).map(|i| 5 + ((index as u32 * 7 + i) % 900)).collect();
            let s = m.mask(&ids, 0, index);
            tokens += ids.len();
            for (p, l) in s.labels.iter().enumerate() {
                if *l == IGNORE {
                    assert_eq!(s.input_ids[p], ids[p]);
                    continue;
                }
                masked += 1;
                if s.input_ids[p] == 4 {
                    as_mask += 1;
                } else if s.input_ids[p] == ids[p] {
                    kept += 1;
                } else {
                    random += 1;
                }
            }
        }
        assert!(tokens >= 100_000);
        let rate = masked as f64 / tokens as f64;
        assert!((rate - 0.15).abs() < 0.005, "mask rate {rate}");
        let f = |n: usize| n as f64 / masked as f64;
        assert!((f(as_mask) - 0.8).abs() < 0.01, "{}", f(as_mask));
        // A random draw can hit the original token (1 in 1000 here), counting as kept.
        assert!((f(random) - 0.1).abs() < 0.01, "{}", f(random));
        assert!((f(kept) - 0.1).abs() < 0.01, "{}", f(kept));
    }

    #[test]
    fn special_tokens_are_never_masked() {
        let m = Masker {
            probability: 1.0,
            ..masker()
        };
        let s = m.mask(&[2, 10, 1, 11, 4, 3, 0, 0], 3, 9);
        assert_eq!(s.labels, vec![IGNORE, 10, IGNORE, 11, IGNORE, IGNORE, IGNORE, IGNORE]);
    }

    #[test]
    fn mask_depends_only_on_seed_epoch_and_index() {
        let m = masker();
        let ids: Vec<u32> = (5..105).collect();
        assert_eq!(m.mask(&ids, 1, 7), m.mask(&ids, 1, 7));
        assert_ne!(m.mask(&ids, 1, 7), m.mask(&ids, 2, 7));
        assert_ne!(m.mask(&ids, 1, 7), m.mask(&ids, 1, 8));
        // Padding a sample does not change the mask of its real tokens.
        let mut padded = ids.clone();
        padded.extend([0, 0, 0]);
        assert_eq!(m.mask(&padded, 1, 7).labels[..100], m.mask(&ids, 1, 7).labels[..]);
    }
}
