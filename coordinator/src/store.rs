//! Durable coordinator state in sled: jobs, workers and the event log.
//!
//! Keys are keyspace-prefixed (`job/…`, `worker/…`, `event/…`, `meta/…`); every value is one
//! record-version byte followed by a prost message. A value this version cannot read is an
//! error naming the key, never a silent reset.

use crate::error::{CoordinatorError, Result};
use kormlm_proto::v1::{EventRecord, JobRecord, WorkerInfo};
use prost::Message;
use std::path::{Path, PathBuf};

/// The record encoding this build writes and reads.
pub const RECORD_VERSION: u8 = 1;

pub struct Store {
    db: sled::Db,
    path: PathBuf,
    /// Tests: make every job write fail, as a full disk would.
    #[cfg(test)]
    failing: std::sync::atomic::AtomicBool,
}

/// The sled key of job `number`'s record.
pub fn job_key(number: u64) -> String {
    format!("job/{number:012}")
}

fn worker_prefix(number: u64) -> String {
    format!("worker/{number:012}/")
}

fn event_prefix(number: u64) -> String {
    format!("event/{number:012}/")
}

/// `job-17` ↔ 17.
pub fn job_number(job_id: &str) -> Option<u64> {
    job_id.strip_prefix("job-")?.parse().ok()
}

pub fn job_id(number: u64) -> String {
    format!("job-{number}")
}

/// 8 random bytes from the kernel, as 16 hex digits.
fn random_id() -> std::io::Result<String> {
    use std::io::Read;
    let mut bytes = [0u8; 8];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

fn encode<M: Message>(message: &M) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(message.encoded_len() + 1);
    bytes.push(RECORD_VERSION);
    message.encode(&mut bytes).expect("a Vec grows as needed");
    bytes
}

fn decode<M: Message + Default>(key: &[u8], bytes: &[u8]) -> Result<M> {
    let key = String::from_utf8_lossy(key).to_string();
    match bytes.split_first() {
        Some((&RECORD_VERSION, payload)) => M::decode(payload).map_err(|e| CoordinatorError::Record {
            key,
            message: format!("invalid record body: {e}"),
        }),
        Some((version, _)) => Err(CoordinatorError::Record {
            key,
            message: format!("record version {version}, this coordinator reads version {RECORD_VERSION}"),
        }),
        None => Err(CoordinatorError::Record {
            key,
            message: "empty record".into(),
        }),
    }
}

impl Store {
    /// Opens (or creates) the store in `dir/state.sled`.
    pub fn open(dir: &Path) -> Result<Self> {
        let fail = |message: String| CoordinatorError::Store {
            path: dir.display().to_string(),
            message,
        };
        std::fs::create_dir_all(dir).map_err(|e| fail(format!("cannot create it: {e}")))?;
        let path = dir.join("state.sled");
        let db = sled::Config::new().path(&path).open().map_err(|e| {
            let text = e.to_string();
            if text.contains("lock") || text.contains("WouldBlock") || text.contains("temporarily unavailable") {
                fail("it is in use by another running coordinator (sled lock held)".into())
            } else {
                fail(format!("cannot open {}: {text}", path.display()))
            }
        })?;
        Ok(Self {
            db,
            path: dir.to_path_buf(),
            #[cfg(test)]
            failing: std::sync::atomic::AtomicBool::new(false),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn err(&self, e: sled::Error) -> CoordinatorError {
        CoordinatorError::Store {
            path: self.path.display().to_string(),
            message: e.to_string(),
        }
    }

    /// Allocates the next job number (1, 2, …), durably.
    pub fn next_job_number(&self) -> Result<u64> {
        let key = "meta/last_job_number";
        let updated = self
            .db
            .update_and_fetch(key, |old| {
                let last = old
                    .and_then(|b| <[u8; 8]>::try_from(b).ok())
                    .map(u64::from_be_bytes)
                    .unwrap_or(0);
                Some((last + 1).to_be_bytes().to_vec())
            })
            .map_err(|e| self.err(e))?
            .expect("update_and_fetch always stores a value here");
        let bytes = <[u8; 8]>::try_from(updated.as_ref()).map_err(|_| CoordinatorError::Record {
            key: key.into(),
            message: "not an 8-byte counter".into(),
        })?;
        Ok(u64::from_be_bytes(bytes))
    }

    pub fn put_job(&self, number: u64, record: &JobRecord) -> Result<()> {
        #[cfg(test)]
        if self.failing.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(CoordinatorError::Store {
                path: self.path.display().to_string(),
                message: "No space left on device (injected)".into(),
            });
        }
        self.db
            .insert(job_key(number), encode(record))
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// This state directory's id: random, made on first use and kept in `meta/state_id`. With a
    /// job id it names a run (`ID/job-N`), so files a run leaves in an output directory can be
    /// told from another run's, also one of another state directory.
    pub fn state_id(&self) -> Result<String> {
        let key = "meta/state_id";
        if let Some(existing) = self.db.get(key).map_err(|e| self.err(e))? {
            return String::from_utf8(existing.to_vec()).map_err(|_| CoordinatorError::Record {
                key: key.into(),
                message: "not UTF-8 text".into(),
            });
        }
        let fresh = random_id().map_err(|e| CoordinatorError::Store {
            path: self.path.display().to_string(),
            message: format!("cannot read random bytes for the state id: {e}"),
        })?;
        // Another writer cannot exist (sled holds a lock), but keep whatever is there if so.
        let _ = self
            .db
            .compare_and_swap(key, None as Option<&[u8]>, Some(fresh.as_bytes()))
            .map_err(|e| self.err(e))?;
        self.flush()?;
        self.state_id()
    }

    /// Every job record, oldest first. A record that cannot be read is returned as its error
    /// (naming the key), so one damaged record does not hide the others.
    pub fn jobs(&self) -> Result<Vec<(u64, Result<JobRecord>)>> {
        let mut jobs = Vec::new();
        for entry in self.db.scan_prefix("job/") {
            let (key, value) = entry.map_err(|e| self.err(e))?;
            let number = std::str::from_utf8(&key)
                .ok()
                .and_then(|k| k.strip_prefix("job/"))
                .and_then(|n| n.parse().ok());
            match number {
                Some(number) => jobs.push((number, decode(&key, &value))),
                None => tracing::error!(
                    key = %String::from_utf8_lossy(&key),
                    "a job record with a malformed key is left alone; it is not a job this coordinator can show"
                ),
            }
        }
        Ok(jobs)
    }

    pub fn put_worker(&self, number: u64, worker: &WorkerInfo) -> Result<()> {
        let key = format!("{}{:08}", worker_prefix(number), worker.rank);
        self.db.insert(key, encode(worker)).map_err(|e| self.err(e))?;
        Ok(())
    }

    pub fn workers(&self, number: u64) -> Result<Vec<WorkerInfo>> {
        self.db
            .scan_prefix(worker_prefix(number))
            .map(|entry| {
                let (key, value) = entry.map_err(|e| self.err(e))?;
                decode(&key, &value)
            })
            .collect()
    }

    /// Removes every worker record of a job (a restarted job gets new workers).
    pub fn clear_workers(&self, number: u64) -> Result<()> {
        let keys: Vec<sled::IVec> = self
            .db
            .scan_prefix(worker_prefix(number))
            .keys()
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| self.err(e))?;
        for key in keys {
            self.db.remove(key).map_err(|e| self.err(e))?;
        }
        Ok(())
    }

    pub fn append_event(&self, number: u64, event: &EventRecord) -> Result<()> {
        let seq = self.db.generate_id().map_err(|e| self.err(e))?;
        let key = format!("{}{seq:020}", event_prefix(number));
        self.db.insert(key, encode(event)).map_err(|e| self.err(e))?;
        Ok(())
    }

    pub fn events(&self, number: u64) -> Result<Vec<EventRecord>> {
        self.db
            .scan_prefix(event_prefix(number))
            .map(|entry| {
                let (key, value) = entry.map_err(|e| self.err(e))?;
                decode(&key, &value)
            })
            .collect()
    }

    /// Makes everything written so far durable (fsync). Called before acknowledging a change.
    pub fn flush(&self) -> Result<()> {
        self.db.flush().map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Makes every job write fail (or work again); for tests of what a failed write leaves.
    #[cfg(test)]
    pub fn fail_writes(&self, on: bool) {
        self.failing.store(on, std::sync::atomic::Ordering::SeqCst);
    }

    /// Writes raw bytes under a key; for tests that damage records on purpose.
    #[cfg(test)]
    pub fn put_raw(&self, key: &str, value: &[u8]) -> Result<()> {
        self.db.insert(key, value).map_err(|e| self.err(e))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kormlm_proto::v1::{JobSpec, JobState, JobStatus};

    fn record(state: JobState) -> JobRecord {
        JobRecord {
            spec: Some(JobSpec {
                world_size: 2,
                ..Default::default()
            }),
            status: Some(JobStatus {
                job_id: "job-1".into(),
                state: state as i32,
                ..Default::default()
            }),
            resolved_config_json: "{}".into(),
        }
    }

    #[test]
    fn jobs_and_workers_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            assert_eq!(store.next_job_number().unwrap(), 1);
            assert_eq!(store.next_job_number().unwrap(), 2);
            store.put_job(1, &record(JobState::Running)).unwrap();
            store
                .put_worker(
                    1,
                    &WorkerInfo {
                        rank: 1,
                        pid: 42,
                        ..Default::default()
                    },
                )
                .unwrap();
            store
                .append_event(
                    1,
                    &EventRecord {
                        message: "started".into(),
                        ..Default::default()
                    },
                )
                .unwrap();
            store.flush().unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.next_job_number().unwrap(), 3);
        let jobs: Vec<(u64, JobRecord)> = store
            .jobs()
            .unwrap()
            .into_iter()
            .map(|(n, r)| (n, r.unwrap()))
            .collect();
        assert_eq!(jobs, vec![(1, record(JobState::Running))]);
        assert_eq!(store.workers(1).unwrap()[0].pid, 42);
        assert_eq!(store.events(1).unwrap()[0].message, "started");
    }

    #[test]
    fn unreadable_record_is_an_error_naming_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.put_job(3, &record(JobState::Killed)).unwrap();
        store.put_raw("job/000000000007", &[9, 1, 2]).unwrap();
        let jobs = store.jobs().unwrap();
        assert_eq!(jobs.len(), 2, "the readable record is still there");
        assert_eq!(jobs[0].1.as_ref().unwrap(), &record(JobState::Killed));
        let err = jobs[1].1.as_ref().unwrap_err().to_string();
        assert!(
            jobs[1].0 == 7 && err.contains("job/000000000007") && err.contains("record version 9"),
            "{err}"
        );
        store
            .put_raw("job/000000000007", &[RECORD_VERSION, 0xff, 0xff])
            .unwrap();
        let err = store.jobs().unwrap()[1].1.as_ref().unwrap_err().to_string();
        assert!(err.contains("invalid record body"), "{err}");
        store.put_raw("worker/000000000003/00000001", &[]).unwrap();
        let err = store.workers(3).unwrap_err().to_string();
        assert!(
            err.contains("worker/000000000003/00000001") && err.contains("empty record"),
            "{err}"
        );
    }

    #[test]
    fn the_state_id_is_made_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let id = Store::open(dir.path()).unwrap().state_id().unwrap();
        assert_eq!(id.len(), 16);
        assert!(id.bytes().all(|b| b.is_ascii_hexdigit()), "{id}");
        let again = Store::open(dir.path()).unwrap().state_id().unwrap();
        assert_eq!(id, again);
        let other = tempfile::tempdir().unwrap();
        assert_ne!(Store::open(other.path()).unwrap().state_id().unwrap(), id);
    }

    #[test]
    fn second_open_reports_the_lock() {
        let dir = tempfile::tempdir().unwrap();
        let _first = Store::open(dir.path()).unwrap();
        let err = Store::open(dir.path())
            .err()
            .expect("second open must fail")
            .to_string();
        assert!(err.contains("another running coordinator"), "{err}");
    }
}
