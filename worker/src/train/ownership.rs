//! Which run an output directory belongs to. Rank 0 writes `kormlm_run.json` (`run_id`,
//! `job_id`, `created_unix_ms`) before anything else; a directory holding another run's run
//! file, checkpoints or training log is refused with a message naming that run, unless
//! `--overwrite_output_dir`, which removes the other run's files first (and only those: files
//! kormlm does not write stay). A job only ever reads and reports checkpoints of its own run.

use super::checkpoint::TrainerState;
use super::error::TrainError;
use kormlm_proto::durable;
use kormlm_proto::run_file::{holder, Holder, RUN_OUTPUTS};
pub use kormlm_proto::run_file::{RunIdentity, RUN_FILE};
use std::io::Read;
use std::path::{Path, PathBuf};

/// The run file of `dir`, if there is one.
pub fn read_run_file(dir: &Path) -> Result<Option<RunIdentity>, TrainError> {
    match holder(dir) {
        Holder::Run(run) => Ok(Some(run)),
        Holder::Unreadable(why) => Err(TrainError::output(&dir.join(RUN_FILE), why)),
        Holder::Nothing | Holder::Unnamed(_) => Ok(None),
    }
}

fn write_run_file(run: &RunIdentity, dir: &Path) -> Result<(), TrainError> {
    let path = dir.join(RUN_FILE);
    durable::write(&path, run.to_json()).map_err(|e| TrainError::output(&path, e.error))
}

/// A new random run id (128 bits, hex).
pub fn new_run_id() -> String {
    let mut bytes = [0u8; 16];
    let random = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes));
    if random.is_err() {
        // No /dev/urandom: the clock and the process id still tell runs apart.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        bytes = (nanos ^ (u128::from(std::process::id()) << 96)).to_le_bytes();
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// How rank 0 came to own the output directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// The directory was free (or emptied of another run's files): the run file is new.
    New,
    /// The run file names this run already (a resume or a restart).
    Own,
    /// Files of a run from before run files existed, continued from one of its checkpoints.
    Adopted,
    /// Another run's files were removed (`--overwrite_output_dir`).
    Overwrote(String),
}

/// Makes `dir` the output directory of run `me` (rank 0, before it writes anything else).
/// `resume` is the checkpoint the run continues from, with its state. Another run's files make
/// this fail with [`TrainError::OutputDirInUse`], unless `overwrite`.
pub fn claim(
    dir: &Path,
    me: &RunIdentity,
    resume: Option<(&Path, &TrainerState)>,
    overwrite: bool,
) -> Result<Claim, TrainError> {
    let other = match holder(dir) {
        Holder::Run(owner) if owner.run_id == me.run_id => return Ok(Claim::Own),
        Holder::Run(owner) => Some(owner.describe()),
        Holder::Unreadable(why) => Some(format!("a {RUN_FILE} that cannot be read ({why})")),
        Holder::Nothing => None,
        Holder::Unnamed(present) => {
            let legacy_resume = resume.is_some_and(|(checkpoint, state)| {
                state.run_id.is_none() && checkpoint.starts_with(dir.join("checkpoints"))
            });
            if legacy_resume {
                write_run_file(me, dir)?;
                return Ok(Claim::Adopted);
            }
            Some(format!("an earlier run without {RUN_FILE} ({})", present.join(", ")))
        }
    };
    let Some(other) = other else {
        std::fs::create_dir_all(dir).map_err(|e| TrainError::output(dir, e))?;
        write_run_file(me, dir)?;
        return Ok(Claim::New);
    };
    if !overwrite {
        return Err(TrainError::OutputDirInUse {
            dir: dir.display().to_string(),
            other,
        });
    }
    remove_run_outputs(dir)?;
    write_run_file(me, dir)?;
    Ok(Claim::Overwrote(other))
}

/// Removes what a run writes into `dir` (and the temporary files of those), nothing else. The
/// run file goes first, so an interrupted removal still reads as another run's directory.
fn remove_run_outputs(dir: &Path) -> Result<(), TrainError> {
    let mut doomed: Vec<PathBuf> = RUN_OUTPUTS.iter().map(|name| dir.join(name)).collect();
    for entry in std::fs::read_dir(dir)
        .map_err(|e| TrainError::output(dir, e))?
        .flatten()
    {
        let name = entry.file_name().to_string_lossy().to_string();
        let temporary_of_an_output = name
            .strip_prefix('.')
            .is_some_and(|rest| RUN_OUTPUTS.iter().any(|o| rest.starts_with(&format!("{o}."))));
        if temporary_of_an_output {
            doomed.push(entry.path());
        }
    }
    for path in doomed {
        kormlm_proto::durable::remove_if_present(&path).map_err(|e| TrainError::output(&path, e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::run_files::LOG_FILE;
    use super::*;

    fn me(run: &str) -> RunIdentity {
        RunIdentity::new(run.into(), Some("job-2".into()))
    }

    #[test]
    fn a_free_directory_is_claimed_and_the_same_run_finds_it_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        assert_eq!(claim(&out, &me("a"), None, false).unwrap(), Claim::New);
        let written = read_run_file(&out).unwrap().unwrap();
        assert_eq!(
            (written.run_id.as_str(), written.job_id.as_deref()),
            ("a", Some("job-2"))
        );
        assert!(written.created_unix_ms > 1_700_000_000_000);
        std::fs::write(out.join(LOG_FILE), "{}\n").unwrap();
        assert_eq!(claim(&out, &me("a"), None, false).unwrap(), Claim::Own);
        // A user's own files do not make a directory another run's.
        let mine = dir.path().join("mine");
        std::fs::create_dir_all(&mine).unwrap();
        std::fs::write(mine.join("notes.txt"), "keep").unwrap();
        assert_eq!(claim(&mine, &me("b"), None, false).unwrap(), Claim::New);
    }

    #[test]
    fn another_runs_directory_is_refused_by_name_unless_overwritten_which_keeps_foreign_files() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path();
        write_run_file(&RunIdentity::new("old-run".into(), Some("job-1".into())), out).unwrap();
        std::fs::create_dir_all(out.join("checkpoints/step-100")).unwrap();
        std::fs::create_dir_all(out.join(".best.tmp-42")).unwrap();
        std::fs::write(out.join(LOG_FILE), "{}\n").unwrap();
        std::fs::write(out.join("notes.txt"), "keep").unwrap();
        let err = claim(out, &me("new-run"), None, false).unwrap_err();
        assert!(matches!(err, TrainError::OutputDirInUse { .. }));
        let text = err.to_string();
        assert!(
            text.contains("run old-run of job job-1") && text.contains("--overwrite_output_dir"),
            "{text}"
        );
        assert!(out.join("checkpoints/step-100").is_dir(), "nothing removed");

        let claimed = claim(out, &me("new-run"), None, true).unwrap();
        assert_eq!(claimed, Claim::Overwrote("run old-run of job job-1".into()));
        let mut left: Vec<String> = std::fs::read_dir(out)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .collect();
        left.sort();
        assert_eq!(left, vec![RUN_FILE, "notes.txt"]);
        assert_eq!(read_run_file(out).unwrap().unwrap().run_id, "new-run");
    }

    #[test]
    fn files_without_a_run_file_are_refused_unless_resumed_from_their_own_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path();
        std::fs::write(out.join(LOG_FILE), "{}\n").unwrap();
        let err = claim(out, &me("a"), None, false).unwrap_err().to_string();
        assert!(
            err.contains(&format!("an earlier run without {RUN_FILE} ({LOG_FILE})")),
            "{err}"
        );
        let state: TrainerState = serde_json::from_value(serde_json::json!({
            "version": 1, "epoch": 0, "next_step": 3, "steps": 3, "skipped_steps": 0, "scaler": null,
            "best_val_loss": null, "best_epoch": null, "stop_count": 0, "val_loss_history": [],
            "early_stopped": false, "world_size": 1, "partitions": [], "numel": 1, "seed": 1
        }))
        .unwrap();
        let elsewhere = dir.path().join("elsewhere/checkpoints/step-3");
        assert!(claim(out, &me("a"), Some((&elsewhere, &state)), false).is_err());
        let own = out.join("checkpoints/step-3");
        assert_eq!(
            claim(out, &me("a"), Some((&own, &state)), false).unwrap(),
            Claim::Adopted
        );
        assert_eq!(claim(out, &me("a"), None, false).unwrap(), Claim::Own);
    }

    #[test]
    fn a_damaged_run_file_is_refused_by_name_unless_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path();
        std::fs::write(out.join(RUN_FILE), "{not json").unwrap();
        std::fs::create_dir_all(out.join("checkpoints/step-7")).unwrap();
        let err = claim(out, &me("a"), None, false).unwrap_err();
        assert!(matches!(err, TrainError::OutputDirInUse { .. }), "{err}");
        assert!(err.to_string().contains("kormlm_run.json that cannot be read"), "{err}");
        assert!(matches!(claim(out, &me("a"), None, true).unwrap(), Claim::Overwrote(_)));
        assert!(!out.join("checkpoints").exists());
        assert_eq!(read_run_file(out).unwrap().unwrap().run_id, "a");
    }

    #[test]
    fn every_file_a_run_writes_is_a_run_output() {
        use super::super::plot::LOSS_CURVE_FILE;
        for name in [
            LOG_FILE,
            LOSS_CURVE_FILE,
            "checkpoints",
            "best",
            "final",
            "summary.json",
            "params.json",
        ] {
            assert!(RUN_OUTPUTS.contains(&name), "{name}");
        }
    }

    #[test]
    fn run_ids_are_random_hex() {
        let (a, b) = (new_run_id(), new_run_id());
        assert_eq!(a.len(), 32);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }
}
