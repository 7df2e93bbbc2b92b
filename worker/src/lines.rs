//! Reading text input line by line with errors that name the line, and streaming it through a
//! per-chunk function to an output, one output line per input line.

use std::io::{BufRead, Write};

#[derive(Debug, thiserror::Error)]
pub enum InputError {
    #[error("{source_name} line {line}: invalid UTF-8 at byte {byte} of the line; kormlm reads UTF-8 text only")]
    Utf8 {
        source_name: String,
        line: usize,
        byte: usize,
    },
    #[error("{source_name}: {message}")]
    Io { source_name: String, message: String },
    #[error("{sink_name}: {message}")]
    Output { sink_name: String, message: String },
}

/// Lines are read and processed in chunks of this many, so input of any size streams.
pub const CHUNK_LINES: usize = 4096;

/// Streams `input` in chunks of lines through `per_chunk`, which returns one output line per
/// input line; the output lines go to `output` (flushed at the end).
pub fn map_lines<E: From<InputError>>(
    input: &mut impl BufRead,
    output: impl Write,
    source_name: &str,
    sink_name: &str,
    mut per_chunk: impl FnMut(&[String]) -> Result<Vec<String>, E>,
) -> Result<(), E> {
    let write_err = |e: std::io::Error| InputError::Output {
        sink_name: sink_name.to_string(),
        message: e.to_string(),
    };
    let mut out = std::io::BufWriter::new(output);
    let mut line_no = 1;
    loop {
        let lines = read_chunk(input, CHUNK_LINES, line_no, source_name)?;
        if lines.is_empty() {
            break;
        }
        line_no += lines.len();
        for line in per_chunk(&lines)? {
            writeln!(out, "{line}").map_err(write_err)?;
        }
    }
    out.flush().map_err(write_err)?;
    Ok(())
}

/// Reads up to `max` lines (without their `\n` / `\r\n`), or fewer at the end of input.
/// `first_line` is the 1-based number of the first line, for messages.
pub fn read_chunk(
    reader: &mut impl BufRead,
    max: usize,
    first_line: usize,
    source_name: &str,
) -> Result<Vec<String>, InputError> {
    let mut lines = Vec::new();
    let mut buf = Vec::new();
    while lines.len() < max {
        buf.clear();
        let n = reader.read_until(b'\n', &mut buf).map_err(|e| InputError::Io {
            source_name: source_name.to_string(),
            message: e.to_string(),
        })?;
        if n == 0 {
            break;
        }
        if buf.last() == Some(&b'\n') {
            buf.pop();
            if buf.last() == Some(&b'\r') {
                buf.pop();
            }
        }
        let text = String::from_utf8(std::mem::take(&mut buf)).map_err(|e| InputError::Utf8 {
            source_name: source_name.to_string(),
            line: first_line + lines.len(),
            byte: e.utf8_error().valid_up_to(),
        })?;
        lines.push(text);
    }
    Ok(lines)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_lines_and_names_bad_ones() {
        let mut input: &[u8] = b"a\r\nb\n\nlast";
        assert_eq!(
            read_chunk(&mut input, 10, 1, "stdin").unwrap(),
            vec!["a", "b", "", "last"]
        );
        let mut input: &[u8] = b"ok\n\xff\xfe\n";
        let err = read_chunk(&mut input, 10, 1, "stdin").unwrap_err().to_string();
        assert_eq!(
            err,
            "stdin line 2: invalid UTF-8 at byte 0 of the line; kormlm reads UTF-8 text only"
        );
    }

    #[test]
    fn maps_every_line_across_chunks() {
        let text: String = (0..CHUNK_LINES + 3).map(|i| format!("{i}\n")).collect();
        let mut out = Vec::new();
        let mut chunks = 0;
        map_lines::<InputError>(&mut text.as_bytes(), &mut out, "stdin", "stdout", |lines| {
            chunks += 1;
            Ok(lines.iter().map(|l| format!("<{l}>")).collect())
        })
        .unwrap();
        let out = String::from_utf8(out).unwrap();
        assert_eq!(chunks, 2);
        assert_eq!(out.lines().count(), CHUNK_LINES + 3);
        assert_eq!(out.lines().last(), Some(format!("<{}>", CHUNK_LINES + 2).as_str()));
        let mut bad: &[u8] = b"ok\n\xff\n";
        let err = map_lines::<InputError>(&mut bad, Vec::new(), "stdin", "stdout", |l| Ok(l.to_vec())).unwrap_err();
        assert!(err.to_string().starts_with("stdin line 2:"), "{err}");
    }
}
