//! How long ranks wait for each other: every collective has the collective deadline; the
//! barriers after work only some ranks do (rank 0 writing the best model, a checkpoint's weights
//! with fsync) have their own, longer saving deadline, so slow storage does not abort a healthy
//! run while a dead peer is still noticed within the collective deadline everywhere else.

use super::CommError;
use std::time::Duration;

/// The variable that sets the collective deadline, in whole seconds.
pub const COLLECTIVE_TIMEOUT_VAR: &str = "KORMLM_COLLECTIVE_TIMEOUT_S";
/// The variable that sets the saving deadline, in whole seconds.
pub const SAVING_TIMEOUT_VAR: &str = "KORMLM_SAVE_TIMEOUT_S";

const COLLECTIVE_TIMEOUT_DEFAULT_S: u64 = 120;
const SAVING_TIMEOUT_DEFAULT_S: u64 = 1800;

/// How long a collective may wait for a peer before it fails.
pub fn collective_timeout() -> Result<Duration, CommError> {
    seconds_from(
        COLLECTIVE_TIMEOUT_VAR,
        std::env::var(COLLECTIVE_TIMEOUT_VAR).ok(),
        COLLECTIVE_TIMEOUT_DEFAULT_S,
    )
}

/// How long the ranks wait at a saving barrier for the ranks that write (never shorter than the
/// collective deadline).
pub fn saving_timeout() -> Result<Duration, CommError> {
    let saving = seconds_from(
        SAVING_TIMEOUT_VAR,
        std::env::var(SAVING_TIMEOUT_VAR).ok(),
        SAVING_TIMEOUT_DEFAULT_S,
    )?;
    Ok(saving.max(collective_timeout()?))
}

fn seconds_from(name: &str, value: Option<String>, default: u64) -> Result<Duration, CommError> {
    let Some(value) = value else {
        return Ok(Duration::from_secs(default));
    };
    match value.trim().parse::<u64>() {
        Ok(seconds) if seconds > 0 => Ok(Duration::from_secs(seconds)),
        _ => Err(CommError::Failed {
            op: "set-up",
            message: format!("{name}={value:?} is not accepted: give a whole number of seconds above 0"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_deadline_is_whole_seconds_above_zero_or_the_default() {
        assert_eq!(seconds_from("X", None, 7).unwrap(), Duration::from_secs(7));
        assert_eq!(
            seconds_from("X", Some(" 30 ".into()), 7).unwrap(),
            Duration::from_secs(30)
        );
        for bad in ["0", "-3", "1.5", "ten", ""] {
            let err = seconds_from("KORMLM_SAVE_TIMEOUT_S", Some(bad.into()), 7)
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(&format!(
                    "KORMLM_SAVE_TIMEOUT_S={bad:?} is not accepted: give a whole number of seconds above 0"
                )),
                "{err}"
            );
        }
    }
}
