//! Trains a WordPiece vocabulary the way the `tokenizers` WordPieceTrainer does (BPE merges over
//! BERT-normalised, BERT-pre-tokenised words, with `##` continuation pieces) but deterministically:
//! the upstream trainer numbers continuation pieces in hash-map order, and those ids break ties
//! between equally frequent merges, so the same corpus gave a different vocabulary from run to
//! run (huggingface/tokenizers#1794). Here words are visited in sorted order and ties go to the
//! lower ids, so the result depends only on the input.

use super::special::BERT_SPECIAL_TOKENS;
use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet};
use tokenizers::normalizers::bert::BertNormalizer;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::{NormalizedString, Normalizer, OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer};

const PREFIX: &str = "##";

type Pair = (u32, u32);

/// Counts the words of `lines` as BertTokenizerFast splits them (cased, Chinese characters apart).
pub fn count_words<'a>(
    lines: impl IntoIterator<Item = &'a str>,
    counts: &mut BTreeMap<String, u64>,
) -> tokenizers::Result<()> {
    let normalizer = BertNormalizer::new(true, true, None, false);
    for line in lines {
        let mut normalized = NormalizedString::from(line);
        normalizer.normalize(&mut normalized)?;
        let mut pre = PreTokenizedString::from(normalized);
        BertPreTokenizer.pre_tokenize(&mut pre)?;
        for (word, _, _) in pre.get_splits(OffsetReferential::Original, OffsetType::Char) {
            *counts.entry(word.to_string()).or_default() += 1;
        }
    }
    Ok(())
}

/// The vocabulary (token → id): special tokens, the alphabet, `##` pieces, then merges in order,
/// until `vocab_size` tokens or no pair occurs `min_frequency` times.
pub fn train(words: &BTreeMap<String, u64>, vocab_size: usize, min_frequency: u64) -> HashMap<String, u32> {
    let mut id_to_token: Vec<String> = Vec::new();
    let mut token_to_id: HashMap<String, u32> = HashMap::new();
    let mut add = |token: String, id_to_token: &mut Vec<String>| -> u32 {
        *token_to_id.entry(token.clone()).or_insert_with(|| {
            id_to_token.push(token);
            (id_to_token.len() - 1) as u32
        })
    };
    for token in BERT_SPECIAL_TOKENS {
        add(token.to_string(), &mut id_to_token);
    }
    let alphabet: std::collections::BTreeSet<char> = words.keys().flat_map(|w| w.chars()).collect();
    for c in alphabet {
        add(c.to_string(), &mut id_to_token);
    }
    let mut symbols: Vec<Vec<u32>> = Vec::with_capacity(words.len());
    let counts: Vec<u64> = words.values().copied().collect();
    for word in words.keys() {
        let pieces = word
            .chars()
            .enumerate()
            .map(|(i, c)| if i == 0 { c.to_string() } else { format!("{PREFIX}{c}") });
        symbols.push(pieces.map(|p| add(p, &mut id_to_token)).collect());
    }

    let mut pair_counts: HashMap<Pair, u64> = HashMap::new();
    let mut pair_words: HashMap<Pair, HashSet<usize>> = HashMap::new();
    for (i, word) in symbols.iter().enumerate() {
        for pair in word.windows(2) {
            let pair = (pair[0], pair[1]);
            *pair_counts.entry(pair).or_default() += counts[i];
            pair_words.entry(pair).or_default().insert(i);
        }
    }
    // Highest count first; among equal counts the lowest pair of ids.
    let mut queue: BinaryHeap<(u64, Reverse<Pair>)> = pair_counts.iter().map(|(&p, &c)| (c, Reverse(p))).collect();
    while id_to_token.len() < vocab_size {
        let Some((count, Reverse(pair))) = queue.pop() else {
            break;
        };
        let current = pair_counts.get(&pair).copied().unwrap_or(0);
        if current != count {
            if current > 0 {
                queue.push((current, Reverse(pair)));
            }
            continue;
        }
        if count == 0 || count < min_frequency {
            break;
        }
        let left = &id_to_token[pair.0 as usize];
        let right = &id_to_token[pair.1 as usize];
        let merged = format!("{left}{}", right.strip_prefix(PREFIX).unwrap_or(right));
        let merged_id = add(merged, &mut id_to_token);
        // Visiting order does not matter: counts add up, and the queue orders by (count, pair).
        let touched = pair_words.remove(&pair).unwrap_or_default();
        let mut grown: HashSet<Pair> = HashSet::new();
        for i in touched {
            let word = &mut symbols[i];
            if !word.windows(2).any(|w| (w[0], w[1]) == pair) {
                continue;
            }
            for w in word.windows(2) {
                *pair_counts.get_mut(&(w[0], w[1])).expect("counted") -= counts[i];
            }
            let mut out = Vec::with_capacity(word.len());
            let mut k = 0;
            while k < word.len() {
                if k + 1 < word.len() && (word[k], word[k + 1]) == pair {
                    out.push(merged_id);
                    k += 2;
                } else {
                    out.push(word[k]);
                    k += 1;
                }
            }
            *word = out;
            for w in word.windows(2) {
                let p = (w[0], w[1]);
                *pair_counts.entry(p).or_default() += counts[i];
                pair_words.entry(p).or_default().insert(i);
                grown.insert(p);
            }
        }
        pair_counts.remove(&pair);
        for p in grown {
            queue.push((pair_counts[&p], Reverse(p)));
        }
    }
    token_to_id
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(lines: &[&str]) -> BTreeMap<String, u64> {
        let mut counts = BTreeMap::new();
        count_words(lines.iter().copied(), &mut counts).unwrap();
        counts
    }

    #[test]
    fn specials_alphabet_pieces_then_merges() {
        let w = words(&["abab ab", "ab!"]);
        assert_eq!(w.get("ab"), Some(&2));
        assert_eq!(w.get("!"), Some(&1));
        let vocab = train(&w, 100, 1);
        let mut by_id: Vec<(&u32, &String)> = vocab.iter().map(|(t, i)| (i, t)).collect();
        by_id.sort();
        let tokens: Vec<&str> = by_id.iter().map(|(_, t)| t.as_str()).collect();
        assert_eq!(&tokens[..5], &BERT_SPECIAL_TOKENS);
        // Alphabet in char order, then continuation pieces, then the most frequent merges.
        assert_eq!(&tokens[5..8], &["!", "a", "b"]);
        assert!(tokens.contains(&"##b") && tokens.contains(&"##a"));
        assert!(tokens.contains(&"ab") && tokens.contains(&"abab"), "{tokens:?}");
        let ids: Vec<u32> = by_id.iter().map(|(i, _)| **i).collect();
        assert_eq!(ids, (0..ids.len() as u32).collect::<Vec<_>>(), "dense ids");
    }

    #[test]
    fn vocab_size_and_min_frequency_bound_the_merges() {
        let w = words(&["영화 영화 영화 재밌다", "영화관 재밌네"]);
        let all = train(&w, 1000, 1);
        let small = train(&w, 20, 1);
        // 5 specials + 7 characters + 5 `##` pieces, then merges up to the size asked for.
        assert_eq!(small.len(), 20);
        assert!(small.len() < all.len());
        let frequent = train(&w, 1000, 3);
        assert!(frequent.contains_key("영화"), "영화 occurs 4 times");
        assert!(!frequent.contains_key("재밌다"), "재밌다 occurs once");
    }
}
