//! Augmentation input and output: plain text, CSV/TSV with a chosen text column (other columns
//! pass through unchanged), the three shared corpora's formats; CSV or JSONL out, one row per
//! input row, in input order.

use crate::corpus::readers::{unquote, Format};
use crate::corpus::CorpusError;
use serde_json::{Map, Value};
use std::io::Write;
use std::path::Path;

/// Rows with named columns; `text_column` indexes the column to augment.
#[derive(Debug, Clone, PartialEq)]
pub struct Table {
    pub headers: Vec<String>,
    pub rows: Vec<Vec<String>>,
    pub text_column: usize,
}

impl Table {
    pub fn texts(&self) -> Vec<String> {
        self.rows.iter().map(|r| r[self.text_column].clone()).collect()
    }
}

fn row_err(path: &Path, line: usize, message: impl Into<String>) -> CorpusError {
    CorpusError::Row {
        path: path.display().to_string(),
        line,
        message: message.into(),
    }
}

/// Reads `path` in `format`; `column` picks the text column of delimited files.
pub fn read_table(path: &Path, format: Format, column: Option<&str>) -> Result<Table, CorpusError> {
    let bytes = std::fs::read(path).map_err(|e| CorpusError::Io {
        path: path.display().to_string(),
        message: e.to_string(),
    })?;
    match format {
        Format::Text | Format::KhsUnlabeled => {
            let mut rows = Vec::new();
            let mut lines: Vec<&[u8]> = bytes.split(|b| *b == b'\n').collect();
            if lines.last().is_some_and(|l| l.is_empty()) {
                lines.pop();
            }
            for (i, raw) in lines.into_iter().enumerate() {
                let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
                let text = std::str::from_utf8(raw)
                    .map_err(|e| row_err(path, i + 1, format!("invalid UTF-8 at byte {}", e.valid_up_to())))?;
                rows.push(vec![text.to_string()]);
            }
            Ok(Table {
                headers: vec!["text".into()],
                rows,
                text_column: 0,
            })
        }
        Format::Nsmc => {
            let passes = if path.file_name().is_some_and(|n| n == "ratings.txt") {
                1
            } else {
                2
            };
            let text = String::from_utf8(bytes).map_err(|e| row_err(path, 0, format!("invalid UTF-8: {e}")))?;
            let mut lines = text.lines();
            let headers: Vec<String> = lines
                .next()
                .unwrap_or_default()
                .split('\t')
                .map(str::to_string)
                .collect();
            let text_column = headers
                .iter()
                .position(|h| h == column.unwrap_or("document"))
                .ok_or_else(|| CorpusError::Column {
                    path: path.display().to_string(),
                    column: column.unwrap_or("document").into(),
                    found: headers.clone(),
                })?;
            let mut rows = Vec::new();
            for (i, line) in lines.enumerate() {
                let mut fields: Vec<String> = line.split('\t').map(str::to_string).collect();
                if fields.len() != headers.len() {
                    return Err(row_err(
                        path,
                        i + 2,
                        format!("expected {} fields, found {}", headers.len(), fields.len()),
                    ));
                }
                if fields[text_column].contains('"') {
                    for _ in 0..passes {
                        fields[text_column] = unquote(&fields[text_column])
                            .ok_or_else(|| row_err(path, i + 2, "a document with `\"` is not validly CSV-quoted"))?;
                    }
                }
                rows.push(fields);
            }
            Ok(Table {
                headers,
                rows,
                text_column,
            })
        }
        Format::Csv | Format::Tsv | Format::Khs | Format::Unsmile => {
            let delimiter = if format == Format::Csv { b',' } else { b'\t' };
            let default_column = if format == Format::Unsmile {
                "문장"
            } else {
                "comments"
            };
            let mut reader = csv::ReaderBuilder::new()
                .delimiter(delimiter)
                .quoting(format != Format::Unsmile)
                .has_headers(true)
                .from_reader(bytes.as_slice());
            let headers: Vec<String> = reader
                .headers()
                .map_err(|e| row_err(path, 1, e.to_string()))?
                .iter()
                .map(|h| h.trim_start_matches('\u{feff}').to_string())
                .collect();
            let wanted = column.unwrap_or(default_column);
            let text_column = headers
                .iter()
                .position(|h| h == wanted)
                .ok_or_else(|| CorpusError::Column {
                    path: path.display().to_string(),
                    column: wanted.into(),
                    found: headers.clone(),
                })?;
            let mut rows = Vec::new();
            for record in reader.records() {
                let record = record.map_err(|e| {
                    let line = e.position().map_or(0, |p| p.line() as usize);
                    row_err(path, line, e.to_string())
                })?;
                rows.push(record.iter().map(str::to_string).collect());
            }
            Ok(Table {
                headers,
                rows,
                text_column,
            })
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputFormat {
    Csv,
    Jsonl,
}

/// Writes the input columns plus `augmented_1..N` (CSV) or an `augmented` list (JSONL), to a
/// temporary file renamed into place.
pub fn write_output(
    path: &Path,
    format: OutputFormat,
    table: &Table,
    variants: &[Vec<String>],
    n: usize,
) -> std::io::Result<()> {
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    {
        let file = std::fs::File::create(&tmp)?;
        match format {
            OutputFormat::Csv => {
                let mut w = csv::Writer::from_writer(file);
                let mut header = table.headers.clone();
                header.extend((1..=n).map(|i| format!("augmented_{i}")));
                w.write_record(&header)?;
                for (row, vs) in table.rows.iter().zip(variants) {
                    let mut record = row.clone();
                    record.extend(vs.iter().cloned());
                    w.write_record(&record)?;
                }
                w.flush()?;
                w.into_inner()
                    .map_err(|e| std::io::Error::other(e.to_string()))?
                    .sync_all()?;
            }
            OutputFormat::Jsonl => {
                let mut w = std::io::BufWriter::new(file);
                for (row, vs) in table.rows.iter().zip(variants) {
                    let mut object = Map::new();
                    for (h, v) in table.headers.iter().zip(row) {
                        object.insert(h.clone(), Value::String(v.clone()));
                    }
                    object.insert("augmented".into(), Value::from(vs.clone()));
                    writeln!(w, "{}", Value::Object(object))?;
                }
                w.flush()?;
                w.get_ref().sync_all()?;
            }
        }
    }
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_with_quotes_tabs_and_labels_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("in.csv");
        std::fs::write(
            &input,
            "id,comments,label\n1,\"따옴표 \"\"안\"\", 쉼표\",0\n2,\"탭\t있음\",1\n",
        )
        .unwrap();
        let table = read_table(&input, Format::Csv, None).unwrap();
        assert_eq!(table.texts(), vec!["따옴표 \"안\", 쉼표", "탭\t있음"]);
        let out = dir.path().join("out.csv");
        let variants = vec![vec!["a".to_string()], vec!["b".to_string()]];
        write_output(&out, OutputFormat::Csv, &table, &variants, 1).unwrap();
        let back = read_table(&out, Format::Csv, None).unwrap();
        assert_eq!(back.headers, vec!["id", "comments", "label", "augmented_1"]);
        assert_eq!(back.rows[0], vec!["1", "따옴표 \"안\", 쉼표", "0", "a"]);
        assert_eq!(back.rows[1][2], "1");
        let err = read_table(&input, Format::Csv, Some("text")).unwrap_err().to_string();
        assert!(err.contains("no column `text`") && err.contains("comments"), "{err}");
    }
}
