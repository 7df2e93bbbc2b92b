//! TensorBoard event files, written as torch's `SummaryWriter` writes them: TFRecord framing
//! (`u64` LE length, masked CRC32C of the length, the data, masked CRC32C of the data) around
//! `tensorboard.Event` protobufs, the first of which is `file_version: "brain.Event:2"`. No
//! maintained Rust crate writes this format, so the few messages needed are declared here with
//! prost, field numbers from `tensorboard/compat/proto/{event,summary}.proto`.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// `tensorboard.Event` (the fields kormlm writes).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Event {
    #[prost(double, tag = "1")]
    pub wall_time: f64,
    #[prost(int64, tag = "2")]
    pub step: i64,
    #[prost(oneof = "What", tags = "3, 5, 7")]
    pub what: Option<What>,
}

/// `Event.what`.
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum What {
    #[prost(string, tag = "3")]
    FileVersion(String),
    #[prost(message, tag = "5")]
    Summary(Summary),
    #[prost(message, tag = "7")]
    SessionLog(SessionLog),
}

/// `tensorboard.Summary`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Summary {
    #[prost(message, repeated, tag = "1")]
    pub value: Vec<SummaryValue>,
}

/// `tensorboard.Summary.Value` with `simple_value` (what torch's `add_scalar` writes).
#[derive(Clone, PartialEq, prost::Message)]
pub struct SummaryValue {
    #[prost(string, tag = "1")]
    pub tag: String,
    #[prost(float, optional, tag = "2")]
    pub simple_value: Option<f32>,
}

/// `tensorboard.SessionLog`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SessionLog {
    /// `SessionLog.SessionStatus`: 1 is `START`.
    #[prost(int32, tag = "1")]
    pub status: i32,
}

/// `SessionLog.START`: TensorBoard drops the events it read before this one whose step is at
/// least this event's step (orphans of an attempt that died after its last checkpoint).
pub const SESSION_START: i32 = 1;

pub const FILE_VERSION: &str = "brain.Event:2";

/// TensorFlow's CRC mask: rotate right by 15 bits, add a constant.
pub fn masked_crc32c(data: &[u8]) -> u32 {
    let crc = crc32c::crc32c(data);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// One TFRecord: length, its masked CRC, the data, its masked CRC.
pub fn frame(data: &[u8]) -> Vec<u8> {
    let length = (data.len() as u64).to_le_bytes();
    let mut record = Vec::with_capacity(data.len() + 16);
    record.extend_from_slice(&length);
    record.extend_from_slice(&masked_crc32c(&length).to_le_bytes());
    record.extend_from_slice(data);
    record.extend_from_slice(&masked_crc32c(data).to_le_bytes());
    record
}

/// Files this process opened so far (the last part of the name, as in TensorBoard's writer).
static OPENED: AtomicU64 = AtomicU64::new(0);

/// One event file, open for writing; buffered, written out by [`EventFile::flush`].
pub struct EventFile {
    path: PathBuf,
    out: BufWriter<File>,
}

impl EventFile {
    /// Creates `DIR/events.out.tfevents.<unix secs>.<hostname>.<pid>.<n>` (torch's name) and
    /// writes the file-version event.
    pub fn create(dir: &Path) -> std::io::Result<Self> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let host = nix::unistd::gethostname()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_else(|_| "localhost".into());
        let name = format!(
            "events.out.tfevents.{:010}.{host}.{}.{}",
            now.as_secs(),
            std::process::id(),
            OPENED.fetch_add(1, Ordering::Relaxed)
        );
        Self::create_at(dir.join(name))
    }

    fn create_at(path: PathBuf) -> std::io::Result<Self> {
        let file = std::fs::OpenOptions::new().write(true).create_new(true).open(&path)?;
        let mut writer = Self {
            path,
            out: BufWriter::new(file),
        };
        writer.write(0, What::FileVersion(FILE_VERSION.into()))?;
        Ok(writer)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends an event at `step`, stamped with the current time.
    pub fn write(&mut self, step: u64, what: What) -> std::io::Result<()> {
        let wall_time = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64();
        let event = Event {
            wall_time,
            step: i64::try_from(step).unwrap_or(i64::MAX),
            what: Some(what),
        };
        self.out.write_all(&frame(&prost::Message::encode_to_vec(&event)))
    }

    /// Scalars at `step`, one summary value each.
    pub fn scalars(&mut self, step: u64, values: &[(&str, f64)]) -> std::io::Result<()> {
        let value = values
            .iter()
            .map(|&(tag, v)| SummaryValue {
                tag: tag.to_string(),
                simple_value: Some(v as f32),
            })
            .collect();
        self.write(step, What::Summary(Summary { value }))
    }

    pub fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn crc32c_matches_the_known_vectors() {
        // RFC 3720 (iSCSI) B.4 and the usual check value.
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
        assert_eq!(crc32c::crc32c(&[0u8; 32]), 0x8a91_36aa);
        assert_eq!(crc32c::crc32c(&[0xffu8; 32]), 0x62a8_ab43);
        let ascending: Vec<u8> = (0..32).collect();
        assert_eq!(crc32c::crc32c(&ascending), 0x46dd_794e);
        // Masked values from TensorBoard's own `masked_crc32c` (tensorflow_stub/pywrap_tensorflow.py).
        assert_eq!(masked_crc32c(b"123456789"), 0xc78a_b0e5);
        assert_eq!(masked_crc32c(&5u64.to_le_bytes()), 0x3e04_b2ea);
        assert_eq!(masked_crc32c(b"hello"), 0x191c_1fbb);
    }

    #[test]
    fn a_record_frames_its_data_with_the_length_and_both_checksums() {
        let record = frame(b"hello");
        assert_eq!(record.len(), 8 + 4 + 5 + 4);
        assert_eq!(&record[..8], &5u64.to_le_bytes());
        assert_eq!(&record[8..12], &masked_crc32c(&5u64.to_le_bytes()).to_le_bytes());
        assert_eq!(&record[12..17], b"hello");
        assert_eq!(&record[17..], &masked_crc32c(b"hello").to_le_bytes());
    }

    /// The records of an event file, each checked against its checksums.
    fn read_records(bytes: &[u8]) -> Vec<Event> {
        let mut events = Vec::new();
        let mut rest = bytes;
        while !rest.is_empty() {
            let (length, tail) = rest.split_at(8);
            assert_eq!(&tail[..4], &masked_crc32c(length).to_le_bytes());
            let n = u64::from_le_bytes(length.try_into().unwrap()) as usize;
            let data = &tail[4..4 + n];
            assert_eq!(&tail[4 + n..8 + n], &masked_crc32c(data).to_le_bytes());
            events.push(Event::decode(data).unwrap());
            rest = &tail[8 + n..];
        }
        events
    }

    #[test]
    fn a_file_starts_with_its_version_and_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut file = EventFile::create(dir.path()).unwrap();
        let name = file.path().file_name().unwrap().to_str().unwrap().to_string();
        let parts: Vec<&str> = name.split('.').collect();
        assert_eq!(&parts[..3], ["events", "out", "tfevents"]);
        assert_eq!(parts[3].len(), 10, "{name}");
        assert_eq!(parts[parts.len() - 2], std::process::id().to_string(), "{name}");
        file.write(96, What::SessionLog(SessionLog { status: SESSION_START }))
            .unwrap();
        file.scalars(96, &[("Train/Samples/lr", 1e-3), ("Train/Samples/loss_scale", 65536.0)])
            .unwrap();
        file.flush().unwrap();
        let events = read_records(&std::fs::read(file.path()).unwrap());
        assert_eq!(events.len(), 3);
        assert_eq!(events[0].what, Some(What::FileVersion("brain.Event:2".into())));
        assert_eq!(events[0].step, 0);
        assert_eq!(events[1].what, Some(What::SessionLog(SessionLog { status: 1 })));
        assert_eq!(events[2].step, 96);
        let Some(What::Summary(summary)) = &events[2].what else {
            panic!("{:?}", events[2]);
        };
        assert_eq!(summary.value[0].tag, "Train/Samples/lr");
        assert_eq!(summary.value[0].simple_value, Some(1e-3f32));
        assert_eq!(summary.value[1].simple_value, Some(65536.0));
        assert!(events[2].wall_time > 1.7e9);
        // A second file of the same process gets the next number.
        let second = EventFile::create(dir.path()).unwrap();
        assert_ne!(second.path(), file.path());
    }
}
