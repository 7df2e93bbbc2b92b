//! The experiment's work items — one classifier run per training fraction × seed × condition —
//! and which rank runs which: the longest runs first, each to the rank with the least work so
//! far, so both conditions of a seed need not wait on one worker. The plan depends only on the
//! flags and the training set's size, so every rank (and every attempt) computes the same one.

use serde::{Deserialize, Serialize};

/// Whether a run trains on the original rows only or on them plus their augmented copies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Condition {
    Original,
    Augmented,
}

impl Condition {
    pub const BOTH: [Condition; 2] = [Condition::Original, Condition::Augmented];

    pub fn name(self) -> &'static str {
        match self {
            Condition::Original => "original",
            Condition::Augmented => "augmented",
        }
    }
}

/// One classifier run.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Item {
    /// Position in the plan (fractions ascending, then seeds, then conditions).
    pub index: usize,
    pub fraction: f64,
    pub seed: u64,
    pub condition: Condition,
}

impl Item {
    /// The run's directory name, e.g. `f0.25-s2-augmented`.
    pub fn id(&self) -> String {
        format!("f{}-s{}-{}", self.fraction, self.seed, self.condition.name())
    }
}

/// Every item of an experiment: `seeds` seeds from `first_seed`, both conditions, each fraction.
pub fn items(fractions: &[f64], first_seed: u64, seeds: u32) -> Vec<Item> {
    let mut all = Vec::new();
    for &fraction in fractions {
        for seed in first_seed..first_seed + u64::from(seeds) {
            for condition in Condition::BOTH {
                all.push(Item {
                    index: all.len(),
                    fraction,
                    seed,
                    condition,
                });
            }
        }
    }
    all
}

/// Training rows of `fraction` of a training set of `rows` rows (at least one).
pub fn fraction_rows(rows: usize, fraction: f64) -> usize {
    ((rows as f64 * fraction).round() as usize).clamp(1, rows.max(1))
}

/// The rows an item trains on, for balancing: an augmented run trains on its copies too.
fn cost(item: &Item, train_rows: usize, num_augmentations: usize) -> usize {
    let rows = fraction_rows(train_rows, item.fraction);
    match item.condition {
        Condition::Original => rows,
        Condition::Augmented => rows * (1 + num_augmentations),
    }
}

/// The items rank `rank` of `world` runs, in the order it runs them.
pub fn rank_items(items: &[Item], train_rows: usize, num_augmentations: usize, rank: usize, world: usize) -> Vec<Item> {
    let world = world.max(1);
    let mut by_cost: Vec<&Item> = items.iter().collect();
    by_cost.sort_by_key(|item| (std::cmp::Reverse(cost(item, train_rows, num_augmentations)), item.index));
    let mut load = vec![0usize; world];
    let mut mine = Vec::new();
    for item in by_cost {
        let least = (0..world).min_by_key(|&r| (load[r], r)).unwrap_or(0);
        load[least] += cost(item, train_rows, num_augmentations);
        if least == rank {
            mine.push(*item);
        }
    }
    mine
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_item_goes_to_exactly_one_rank_and_the_work_is_balanced() {
        let all = items(&[0.1, 1.0], 7, 3);
        assert_eq!(all.len(), 12);
        assert_eq!(all[0].id(), "f0.1-s7-original");
        assert_eq!(all[11].id(), "f1-s9-augmented");
        for world in 1..=5 {
            let mut seen: Vec<usize> = (0..world)
                .flat_map(|rank| rank_items(&all, 1000, 1, rank, world))
                .map(|item| item.index)
                .collect();
            seen.sort_unstable();
            assert_eq!(seen, (0..12).collect::<Vec<_>>(), "world {world}");
        }
        let loads: Vec<usize> = (0..2)
            .map(|rank| {
                rank_items(&all, 1000, 1, rank, 2)
                    .iter()
                    .map(|i| cost(i, 1000, 1))
                    .sum()
            })
            .collect();
        // 3 × (2000 + 1000 + 200 + 100) split in two, the longest runs first (LPT).
        assert_eq!(loads, [5000, 4900]);
        // Both conditions of a seed on two ranks run side by side, not one after the other.
        let two = items(&[1.0], 1, 1);
        assert_eq!(rank_items(&two, 10, 1, 0, 2)[0].condition, Condition::Augmented);
        assert_eq!(rank_items(&two, 10, 1, 1, 2)[0].condition, Condition::Original);
        assert_eq!(fraction_rows(10, 0.01), 1);
        assert_eq!(fraction_rows(10, 0.25), 3);
    }
}
