//! Reading text input line by line with errors that name the line.

use std::io::BufRead;

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
}
