//! DeepSpeed's CSV monitor (`deepspeed/monitor/csv_monitor.py`), byte for byte: one file per
//! tag, `DIR/<tag with '/' and ' ' replaced by '_'>.csv`, opened for appending; a `step,<last
//! '/' part of the tag>` header the first time this run writes to the file (a resumed run adds a
//! second one, as DeepSpeed does); rows `step,value` as Python's `csv.writer` writes them: CRLF
//! line ends and numbers as Python's `str()`.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// The CSV files of one run, kept open.
pub struct CsvMonitor {
    dir: PathBuf,
    /// By file name: the files this run has written to.
    files: BTreeMap<String, BufWriter<File>>,
}

/// A failed write, naming the file.
#[derive(Debug)]
pub struct CsvError {
    pub path: PathBuf,
    pub error: std::io::Error,
}

impl CsvMonitor {
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
            files: BTreeMap::new(),
        }
    }

    /// The file a tag goes to (DeepSpeed's sanitising).
    pub fn file_name(tag: &str) -> String {
        format!("{}.csv", tag.replace(['/', ' '], "_"))
    }

    /// Appends the row `x,value` to the tag's file.
    pub fn write(&mut self, tag: &str, value: f64, x: u64) -> Result<(), CsvError> {
        let name = Self::file_name(tag);
        let path = self.dir.join(&name);
        let fail = |error| CsvError {
            path: path.clone(),
            error,
        };
        let out = match self.files.entry(name) {
            std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::btree_map::Entry::Vacant(e) => {
                let file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)
                    .map_err(fail)?;
                let out = e.insert(BufWriter::new(file));
                let header = tag.rsplit('/').next().unwrap_or(tag);
                write!(out, "step,{}\r\n", csv_field(header)).map_err(fail)?;
                out
            }
        };
        write!(out, "{x},{}\r\n", python_float(value)).map_err(fail)
    }

    pub fn flush(&mut self) -> Result<(), CsvError> {
        for (name, out) in &mut self.files {
            out.flush().map_err(|error| CsvError {
                path: self.dir.join(name),
                error,
            })?;
        }
        Ok(())
    }
}

/// A field as Python's `csv.writer` (QUOTE_MINIMAL) writes it.
fn csv_field(text: &str) -> String {
    if text.contains([',', '"', '\r', '\n']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text.to_string()
    }
}

/// `str(value)` of a Python float: the shortest digits that read back as `value`, positional
/// for decimal exponents -4 to 15 (always with a fractional part, `65536.0`), else scientific
/// with a signed exponent of at least two digits (`1e-05`, `1.5e+16`).
pub fn python_float(value: f64) -> String {
    if value.is_nan() {
        return "nan".into();
    }
    if value.is_infinite() {
        return if value > 0.0 { "inf" } else { "-inf" }.into();
    }
    if value == 0.0 {
        return if value.is_sign_negative() { "-0.0" } else { "0.0" }.into();
    }
    // Rust's `{:e}` gives the shortest round-trip digits too: `d[.ddd]e[-]x`; but on an exact
    // tie between two shortest candidates (an f32 widened to f64, 8.1975250244140625) it rounds
    // half up, where Python rounds half to even, as Rust's fixed-precision formatting does.
    let shortest = format!("{:e}", value.abs());
    let length = shortest
        .split('e')
        .next()
        .map_or(1, |m| m.chars().filter(char::is_ascii_digit).count());
    let nearest = format!("{:.*e}", length.saturating_sub(1), value.abs());
    let scientific = if nearest.parse::<f64>() == Ok(value.abs()) {
        nearest
    } else {
        shortest
    };
    let (mantissa, exponent) = scientific.split_once('e').unwrap_or((&scientific, "0"));
    let exponent: i32 = exponent.parse().unwrap_or(0);
    let digits: String = mantissa.chars().filter(char::is_ascii_digit).collect();
    let sign = if value < 0.0 { "-" } else { "" };
    if (-4..16).contains(&exponent) {
        if exponent < 0 {
            let zeros = "0".repeat((-exponent - 1) as usize);
            format!("{sign}0.{zeros}{digits}")
        } else {
            let point = exponent as usize + 1;
            if digits.len() <= point {
                format!("{sign}{digits}{}.0", "0".repeat(point - digits.len()))
            } else {
                format!("{sign}{}.{}", &digits[..point], &digits[point..])
            }
        }
    } else {
        let fraction = if digits.len() > 1 {
            format!(".{}", &digits[1..])
        } else {
            String::new()
        };
        let exponent_sign = if exponent < 0 { '-' } else { '+' };
        format!("{sign}{}{fraction}e{exponent_sign}{:02}", &digits[..1], exponent.abs())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floats_print_as_python_str_prints_them() {
        // Each right-hand side is Python 3's `str(float(x))`.
        let cases = [
            (65536.0, "65536.0"),
            (1.0, "1.0"),
            (0.5, "0.5"),
            (1e-3, "0.001"),
            (1e-4, "0.0001"),
            (1e-5, "1e-05"),
            (3.3333333333333335e-5, "3.3333333333333335e-05"),
            (0.00012345, "0.00012345"),
            (1.2345e-7, "1.2345e-07"),
            (123456789.125, "123456789.125"),
            (1e15, "1000000000000000.0"),
            (1e16, "1e+16"),
            (1.5e16, "1.5e+16"),
            (1.7976931348623157e308, "1.7976931348623157e+308"),
            (5e-324, "5e-324"),
            (0.1 + 0.2, "0.30000000000000004"),
            (-2.5, "-2.5"),
            (-1e-7, "-1e-07"),
            (0.0, "0.0"),
            (-0.0, "-0.0"),
            (f64::NAN, "nan"),
            (f64::INFINITY, "inf"),
            (f64::NEG_INFINITY, "-inf"),
            (7.234567890123456, "7.234567890123456"),
            // An exact tie of two shortest candidates (an f32 loss widened to f64): half to even.
            (f64::from(8.197_525_f32), "8.197525024414062"),
        ];
        for (value, python) in cases {
            assert_eq!(python_float(value), python, "{value:e}");
        }
    }

    #[test]
    fn files_headers_and_rows_are_deepspeeds() {
        let dir = tempfile::tempdir().unwrap();
        let mut csv = CsvMonitor::new(dir.path());
        csv.write("Train/Samples/lr", 1e-5, 16).unwrap();
        csv.write("Train/Samples/loss_scale", 65536.0, 16).unwrap();
        csv.write("Train/Samples/lr", 0.001, 32).unwrap();
        csv.write("odd tag", 2.0, 32).unwrap();
        csv.flush().unwrap();
        let read = |name: &str| std::fs::read_to_string(dir.path().join(name)).unwrap();
        assert_eq!(read("Train_Samples_lr.csv"), "step,lr\r\n16,1e-05\r\n32,0.001\r\n");
        assert_eq!(
            read("Train_Samples_loss_scale.csv"),
            "step,loss_scale\r\n16,65536.0\r\n"
        );
        assert_eq!(read("odd_tag.csv"), "step,odd tag\r\n32,2.0\r\n");
        // Another run appends, with a header of its own.
        let mut again = CsvMonitor::new(dir.path());
        again.write("Train/Samples/lr", 0.001, 48).unwrap();
        again.flush().unwrap();
        assert_eq!(
            read("Train_Samples_lr.csv"),
            "step,lr\r\n16,1e-05\r\n32,0.001\r\nstep,lr\r\n48,0.001\r\n"
        );
        assert_eq!(csv_field("a,b"), "\"a,b\"");
    }

    #[test]
    fn a_file_that_cannot_be_opened_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let mut csv = CsvMonitor::new(&dir.path().join("missing"));
        let err = csv.write("Train/Samples/lr", 1.0, 1).unwrap_err();
        assert_eq!(err.path, dir.path().join("missing/Train_Samples_lr.csv"));
        assert_eq!(err.error.kind(), std::io::ErrorKind::NotFound);
    }
}
