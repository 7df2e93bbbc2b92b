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
