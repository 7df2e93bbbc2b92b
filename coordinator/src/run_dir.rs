//! Which run an output directory belongs to. Rank 0 writes `kormlm_run.json`
//! (`{"run_id": …, "job_id": …, "created_unix_ms": …}`) into the directory it trains into; a
//! new job only takes a directory that holds no run (or is told to overwrite it), and a resumed
//! job only its own run's directory, so a job never reads or reports another run's checkpoints.

use crate::error::CoordinatorError;
pub use kormlm_proto::run_file::RUN_FILE;
use kormlm_proto::run_file::{holder, Holder, RunIdentity};
use std::path::{Path, PathBuf};

fn describe(run: &RunIdentity, state_id: &str, own_job: &dyn Fn(&str) -> String) -> String {
    let own = run.run_id.strip_prefix(state_id).and_then(|r| r.strip_prefix('/'));
    match (own, &run.job_id) {
        (Some(own), _) => format!("run `{}` ({own} of this state directory; {})", run.run_id, own_job(own)),
        (None, Some(job)) => format!("run `{}` ({job} of another coordinator's state directory)", run.run_id),
        (None, None) => format!("run `{}` (a `worker train` run)", run.run_id),
    }
}

/// A new job of state directory `state_id` may write into `dir`: it holds no run, or
/// `overwrite` (`--overwrite_output_dir`) says the workers may clear it. `own_job` says what
/// became of a job of this state directory whose run holds the directory (by job id).
pub fn check_new(
    dir: &Path,
    state_id: &str,
    overwrite: bool,
    own_job: &dyn Fn(&str) -> String,
) -> Result<(), CoordinatorError> {
    let found = match holder(dir) {
        Holder::Nothing => return Ok(()),
        _ if overwrite => {
            tracing::warn!(output_dir = %dir.display(), "--overwrite_output_dir: the workers clear what another run left there");
            return Ok(());
        }
        Holder::Run(run) => format!("holds {}", describe(&run, state_id, own_job)),
        Holder::Unnamed(files) => format!(
            "holds {} of a run that left no {RUN_FILE} (an earlier kormlm version or another tool)",
            files.join(" and ")
        ),
        Holder::Unreadable(why) => format!("holds a {RUN_FILE} that cannot be read ({why})"),
    };
    Err(CoordinatorError::Refused(format!(
        "--output_dir {}: {found}; choose another --output_dir, or start afresh there with \
         --overwrite_output_dir (the other run's files are removed)",
        dir.display()
    )))
}

/// Job `job_id` (run `run_id`) may continue in `dir`: no other run has taken the directory.
pub fn check_own(dir: &Path, job_id: &str, run_id: &str) -> Result<(), CoordinatorError> {
    let other = match holder(dir) {
        Holder::Run(run) if run.run_id == run_id => return Ok(()),
        Holder::Nothing | Holder::Unnamed(_) => return Ok(()),
        Holder::Run(run) => format!("now holds {}", run.describe()),
        Holder::Unreadable(why) => format!("holds a {RUN_FILE} that cannot be read ({why})"),
    };
    Err(CoordinatorError::Refused(format!(
        "job {job_id} cannot continue: its output directory {} {other}, so its checkpoints are not its own; \
         start a new job instead",
        dir.display()
    )))
}

/// Whether two output directory names name the same directory (symbolic links and relative
/// names resolved where the directory exists).
pub fn same_dir(a: &str, b: &str) -> bool {
    fn resolved(p: &str) -> PathBuf {
        let path = Path::new(p);
        std::fs::canonicalize(path)
            .or_else(|_| std::path::absolute(path))
            .unwrap_or_else(|_| path.to_path_buf())
            .components()
            .collect()
    }
    resolved(a) == resolved(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_run(dir: &Path, run_id: &str, job_id: &str) {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(
            dir.join(RUN_FILE),
            format!(r#"{{"run_id": "{run_id}", "job_id": "{job_id}", "created_unix_ms": 1}}"#),
        )
        .unwrap();
    }

    fn resumable(job: &str) -> String {
        format!("continue it with `coordinator resume --job {job}`")
    }

    #[test]
    fn a_new_job_takes_only_a_directory_without_a_run() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("out");
        let check_new = |dir: &Path, state_id: &str, overwrite: bool| check_new(dir, state_id, overwrite, &resumable);
        check_new(&out, "aaaa", false).unwrap();
        write_run(&out, "bbbb/job-3", "job-3");
        let err = check_new(&out, "aaaa", false).unwrap_err().to_string();
        assert!(
            err.contains("holds run `bbbb/job-3` (job-3 of another coordinator's state directory)")
                && err.contains("--overwrite_output_dir"),
            "{err}"
        );
        let err = check_new(&out, "bbbb", false).unwrap_err().to_string();
        assert!(
            err.contains("(job-3 of this state directory; continue it with `coordinator resume --job job-3`)"),
            "{err}"
        );
        check_new(&out, "aaaa", true).unwrap();
        std::fs::write(out.join(RUN_FILE), "{not json").unwrap();
        let err = check_new(&out, "aaaa", false).unwrap_err().to_string();
        assert!(
            err.contains("kormlm_run.json that cannot be read") && err.contains("line 1"),
            "{err}"
        );
        // What `worker train` writes (no job) is named as such, not taken for damage.
        std::fs::write(out.join(RUN_FILE), RunIdentity::new("0123abcd".into(), None).to_json()).unwrap();
        let err = check_new(&out, "aaaa", false).unwrap_err().to_string();
        assert!(err.contains("holds run `0123abcd` (a `worker train` run)"), "{err}");
        let older = tmp.path().join("older");
        std::fs::create_dir_all(older.join("checkpoints")).unwrap();
        std::fs::write(older.join("training_log.jsonl"), "").unwrap();
        assert_eq!(
            holder(&older),
            Holder::Unnamed(vec!["training_log.jsonl", "checkpoints"])
        );
        let err = check_new(&older, "aaaa", false).unwrap_err().to_string();
        assert!(
            err.contains("holds training_log.jsonl and checkpoints of a run that left no kormlm_run.json"),
            "{err}"
        );
    }

    #[test]
    fn a_resumed_job_continues_only_in_its_own_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("out");
        check_own(&out, "job-1", "aaaa/job-1").unwrap();
        write_run(&out, "aaaa/job-1", "job-1");
        check_own(&out, "job-1", "aaaa/job-1").unwrap();
        write_run(&out, "aaaa/job-2", "job-2");
        let err = check_own(&out, "job-1", "aaaa/job-1").unwrap_err().to_string();
        assert!(err.contains("now holds run aaaa/job-2 of job job-2"), "{err}");
    }

    #[test]
    fn directory_names_are_compared_resolved() {
        let tmp = tempfile::tempdir().unwrap();
        let a = tmp.path().join("a");
        std::fs::create_dir_all(&a).unwrap();
        let a = a.to_str().unwrap();
        assert!(same_dir(a, &format!("{a}/")));
        assert!(same_dir(a, &format!("{a}/../a")));
        assert!(!same_dir(a, &format!("{a}-b")));
        assert!(same_dir("not/there", "not/there/"));
    }
}
