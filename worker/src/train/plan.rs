//! The global sample order: a per-epoch permutation from the seed, the same whatever the world
//! size, cut into optimizer steps of `train_batch_size` samples, each into
//! `gradient_accumulation_steps` micro-steps, each split into contiguous per-rank slices. W ranks
//! with micro batch b therefore see exactly the samples one rank sees with micro batch W·b.
//!
//! A short last step is not padded: its samples are split as evenly as they go (a rank may get
//! one fewer). Gradients are summed and divided by the global masked-token count, so uneven
//! slices change nothing, and the result stays independent of the world size.

use crate::masking::SplitMix64;

/// Fisher–Yates permutation of `0..n` for `(seed, epoch)`.
pub fn epoch_order(n: usize, seed: u64, epoch: u64) -> Vec<u32> {
    let mut order: Vec<u32> = (0..n as u32).collect();
    let mut rng = SplitMix64::for_sample(seed, epoch, u64::MAX - 1);
    for i in (1..n).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        order.swap(i, j);
    }
    order
}

/// The Hugging Face Trainer's `get_length_grouped_indices` over `order` (the epoch's seeded
/// permutation): megabatches of `min(n / (4·batch), 50)` (at least 1) batches of `batch` samples
/// (the global optimizer batch, so the order does not depend on the world size), each sorted by
/// length, longest first; the first sample of the megabatch holding the longest sample is
/// swapped to the very front, so a step too large for memory fails at once.
pub fn group_by_length(order: Vec<u32>, batch: usize, length: impl Fn(u32) -> usize) -> Vec<u32> {
    let batch = batch.max(1);
    let per_mega = (order.len() / (4 * batch)).clamp(1, 50) * batch;
    let mut megabatches: Vec<Vec<u32>> = order.chunks(per_mega).map(<[u32]>::to_vec).collect();
    for mega in &mut megabatches {
        mega.sort_by_key(|&i| std::cmp::Reverse(length(i)));
    }
    let longest = megabatches
        .iter()
        .enumerate()
        .max_by_key(|(n, mega)| (length(mega[0]), std::cmp::Reverse(*n)))
        .map(|(n, _)| n);
    if let Some(n) = longest.filter(|&n| n > 0) {
        let (first, rest) = megabatches.split_at_mut(n);
        std::mem::swap(&mut first[0][0], &mut rest[0][0]);
    }
    megabatches.concat()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepShape {
    pub train_batch_size: usize,
    pub micro_batch: usize,
    pub accumulation: usize,
    pub world_size: usize,
}

impl StepShape {
    /// Optimizer steps in an epoch of `n` samples (the last one may be short).
    pub fn steps_per_epoch(&self, n: usize) -> usize {
        n.div_ceil(self.train_batch_size)
    }

    /// The samples of micro-step `micro` of step `step` that rank `rank` processes.
    pub fn rank_samples(&self, order: &[u32], step: usize, micro: usize, rank: usize) -> Vec<u32> {
        let global = self.micro_samples(order, step, micro);
        let from = rank * global.len() / self.world_size;
        let to = (rank + 1) * global.len() / self.world_size;
        global[from..to].to_vec()
    }

    /// All samples of one micro-step, over every rank, in rank order.
    pub fn micro_samples(&self, order: &[u32], step: usize, micro: usize) -> Vec<u32> {
        let start = step * self.train_batch_size;
        let end = (start + self.train_batch_size).min(order.len());
        let step_samples = &order[start.min(order.len())..end];
        let per_micro = self.micro_batch * self.world_size;
        let from = (micro * per_micro).min(step_samples.len());
        let to = ((micro + 1) * per_micro).min(step_samples.len());
        step_samples[from..to].to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_is_a_permutation_and_depends_on_epoch() {
        let a = epoch_order(1000, 1, 0);
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, (0..1000).collect::<Vec<u32>>());
        assert_ne!(a, epoch_order(1000, 1, 1));
        assert_eq!(a, epoch_order(1000, 1, 0));
    }

    #[test]
    fn length_grouping_sorts_megabatches_and_puts_the_longest_first() {
        let lengths: Vec<usize> = (0..1000u32).map(|i| (i as usize * 7919) % 97 + 3).collect();
        let len = |i: u32| lengths[i as usize];
        let order = epoch_order(1000, 3, 0);
        let grouped = group_by_length(order.clone(), 8, len);
        let mut sorted = grouped.clone();
        sorted.sort();
        assert_eq!(sorted, (0..1000).collect::<Vec<u32>>(), "a permutation");
        assert_eq!(len(grouped[0]), 99, "the longest sample leads");
        // min(1000 / 32, 50) = 31 batches of 8 per megabatch; each (after the front swap) is
        // the same set as the shuffled order's and sorted by length.
        for (n, mega) in grouped.chunks(248).enumerate().skip(1) {
            let mut want = order[n * 248..(n * 248 + 248).min(1000)].to_vec();
            let mut got = mega.to_vec();
            if got.windows(2).all(|w| len(w[0]) >= len(w[1])) {
                want.sort();
                got.sort();
                if want == got {
                    continue;
                }
            }
            // The megabatch that gave its first sample to the front holds megabatch 0's instead.
            assert!(
                mega[1..].windows(2).all(|w| len(w[0]) >= len(w[1])),
                "megabatch {n} sorted"
            );
        }
        assert_eq!(grouped, group_by_length(order, 8, len), "deterministic");
        let mean_spread = |o: &[u32]| {
            o.chunks(8)
                .map(|b| b.iter().map(|&i| len(i)).max().unwrap() - b.iter().map(|&i| len(i)).min().unwrap())
                .sum::<usize>() as f64
                / o.len().div_ceil(8) as f64
        };
        assert!(
            mean_spread(&grouped) * 4.0 < mean_spread(&epoch_order(1000, 3, 0)),
            "batches of similar length"
        );
    }

    #[test]
    fn two_ranks_see_what_one_rank_sees_with_twice_the_batch() {
        let order = epoch_order(103, 5, 2);
        let one = StepShape {
            train_batch_size: 16,
            micro_batch: 8,
            accumulation: 2,
            world_size: 1,
        };
        let two = StepShape {
            train_batch_size: 16,
            micro_batch: 4,
            accumulation: 2,
            world_size: 2,
        };
        assert_eq!(one.steps_per_epoch(103), 7);
        for step in 0..7 {
            for micro in 0..2 {
                let single = one.rank_samples(&order, step, micro, 0);
                let mut both = two.rank_samples(&order, step, micro, 0);
                both.extend(two.rank_samples(&order, step, micro, 1));
                assert_eq!(single, both, "step {step} micro {micro}");
            }
        }
        // The short last step (7 samples) fills the first micro-step only, split 3 + 4.
        assert_eq!(two.rank_samples(&order, 6, 0, 0).len(), 3);
        assert_eq!(two.rank_samples(&order, 6, 0, 1).len(), 4);
        assert!(two.micro_samples(&order, 6, 1).is_empty());
    }
}
