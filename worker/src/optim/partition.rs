//! Which part of the padded flat buffer each rank optimizes (ZeRO stage 1/2 shards the
//! optimizer state into equal contiguous ranges; stage 0 and a single rank keep it whole), and
//! how gradients are exchanged before a step. Computed once per run and used by the optimizer,
//! the gradient exchange and the checkpoints.

use serde::{Deserialize, Serialize};

/// Elements per rank the flat buffer is padded to a multiple of, so every shard is equal and aligned.
const ALIGN_PER_RANK: i64 = 64;

/// Where one rank's optimizer state sits in the flat buffer (as recorded in a checkpoint).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionRange {
    pub rank: usize,
    pub start: i64,
    pub len: i64,
}

/// How the ranks combine their gradients before the optimizer step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exchange {
    /// A single rank: its gradients are the global ones.
    None,
    /// Every rank sums the whole buffer and steps all of it (ZeRO stage 0).
    AllReduce,
    /// Each rank receives the sum of its own shard, steps it, and the updated weights are
    /// all-gathered (ZeRO stage 1/2).
    ReduceScatter,
}

/// This rank's range of a padded flat buffer of `padded` elements, and every rank's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Partition {
    rank: usize,
    world: usize,
    padded: i64,
    /// The optimizer state is split over the ranks (ZeRO stage ≥ 1 with more than one rank).
    sharded: bool,
}

impl Partition {
    /// What the flat buffer's length must be a multiple of for `world` ranks.
    pub fn alignment(world: usize) -> i64 {
        ALIGN_PER_RANK * world.max(1) as i64
    }

    /// `padded`: the flat buffer's length, a multiple of [`Partition::alignment`].
    pub fn new(padded: i64, rank: usize, world: usize, zero_stage: u32) -> Self {
        let world = world.max(1);
        debug_assert!(
            padded % world as i64 == 0,
            "{padded} elements do not split over {world} ranks"
        );
        Self {
            rank,
            world,
            padded,
            sharded: zero_stage >= 1 && world > 1,
        }
    }

    pub fn is_sharded(&self) -> bool {
        self.sharded
    }

    /// The range rank `rank` optimizes.
    pub fn range_of(&self, rank: usize) -> PartitionRange {
        if self.sharded {
            let shard = self.padded / self.world as i64;
            PartitionRange {
                rank,
                start: rank as i64 * shard,
                len: shard,
            }
        } else {
            PartitionRange {
                rank,
                start: 0,
                len: self.padded,
            }
        }
    }

    /// The range this rank optimizes.
    pub fn local(&self) -> PartitionRange {
        self.range_of(self.rank)
    }

    /// The ranges a checkpoint stores: every rank's shard, or (unsharded, when every rank
    /// holds the whole state) one copy, rank 0's.
    pub fn saved_ranges(&self) -> Vec<PartitionRange> {
        let ranks = if self.sharded { self.world } else { 1 };
        (0..ranks).map(|r| self.range_of(r)).collect()
    }

    pub fn exchange(&self) -> Exchange {
        if self.world == 1 {
            Exchange::None
        } else if self.sharded {
            Exchange::ReduceScatter
        } else {
            Exchange::AllReduce
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_shards_cover_the_buffer_in_rank_order() {
        let padded = Partition::alignment(4) * 10;
        let ranges = Partition::new(padded, 2, 4, 2).saved_ranges();
        assert_eq!(ranges.len(), 4);
        let mut next = 0;
        for (r, range) in ranges.iter().enumerate() {
            assert_eq!((range.rank, range.start, range.len), (r, next, padded / 4));
            next += range.len;
        }
        assert_eq!(next, padded);
        let p = Partition::new(padded, 2, 4, 1);
        assert_eq!(p.local(), ranges[2]);
        assert!(p.is_sharded());
        assert_eq!(p.exchange(), Exchange::ReduceScatter);
    }

    #[test]
    fn stage_zero_keeps_the_whole_buffer_and_saves_one_copy() {
        let padded = Partition::alignment(2) * 3;
        let p = Partition::new(padded, 1, 2, 0);
        assert!(!p.is_sharded());
        assert_eq!(
            p.local(),
            PartitionRange {
                rank: 1,
                start: 0,
                len: padded
            }
        );
        assert_eq!(
            p.saved_ranges(),
            vec![PartitionRange {
                rank: 0,
                start: 0,
                len: padded
            }]
        );
        assert_eq!(p.exchange(), Exchange::AllReduce);
    }

    #[test]
    fn a_single_rank_exchanges_nothing_whatever_the_stage() {
        for stage in 0..=3 {
            let p = Partition::new(128, 0, 1, stage);
            assert!(!p.is_sharded());
            assert_eq!(p.exchange(), Exchange::None);
            assert_eq!((p.local().start, p.local().len), (0, 128));
            assert_eq!(p.saved_ranges().len(), 1);
        }
        assert_eq!(Partition::alignment(1), 64);
        assert_eq!(Partition::alignment(3), 192);
    }
}
