//! Evaluation is the masked-LM path of `crate::model::masked_lm`; these names stay for the
//! training loop until it imports them from there.

pub use crate::model::masked_lm::{evaluate, EvalSums};
