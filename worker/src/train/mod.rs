//! Training: the global sample plan, the optimisation step, evaluation, early stopping,
//! checkpoints, the run's output files and the loop that ties them together, over an objective
//! (the masked LM here; `classify` brings the sequence classifier's).

pub mod checkpoint;
pub mod early_stopping;
pub mod error;
pub mod job;
pub mod masked_lm;
pub mod mfu;
pub mod monitors;
pub mod objective;
pub mod ownership;
pub mod plan;
pub mod plot;
pub mod report;
pub mod rng_state;
pub mod run;
pub mod run_files;
pub mod trainer;

pub use error::TrainError;
pub use job::TrainJob;
pub use objective::{Evaluation, Objective, StepWork};
pub use report::{ProgressEvent, TrainSummary};
pub use run::{run, train};

/// `YYMMDD_HHMMSS` in UTC, the original project's run-directory name.
pub fn run_dir_name(unix_s: u64) -> String {
    let days = (unix_s / 86_400) as i64;
    let secs = unix_s % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{:02}{:02}{:02}_{:02}{:02}{:02}",
        year % 100,
        month,
        day,
        secs / 3600,
        (secs / 60) % 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn run_dir_names() {
        assert_eq!(super::run_dir_name(0), "700101_000000");
        assert_eq!(super::run_dir_name(1_795_890_114), "261128_182154");
    }
}
