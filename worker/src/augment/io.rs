//! Augmentation input and output: plain text, CSV/TSV with a chosen text column (other columns
//! pass through unchanged), the three shared corpora's formats; CSV or JSONL out, one row per
//! input row, in input order.

pub use crate::corpus::readers::{read_table, Table};
use kormlm_proto::durable;
use serde_json::{Map, Value};
use std::io::Write;
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputFormat {
    Csv,
    Jsonl,
}

/// Writes the input columns plus `augmented_1..N` (CSV) or an `augmented` list (JSONL),
/// durably (a temporary file renamed into place, see [`kormlm_proto::durable`]; on failure
/// nothing is left under either name). The error is the OS error; callers name the path.
pub fn write_output(
    path: &Path,
    format: OutputFormat,
    table: &Table,
    variants: &[Vec<String>],
    n: usize,
) -> std::io::Result<()> {
    durable::write_with(path, |out| match format {
        OutputFormat::Csv => {
            let mut w = csv::Writer::from_writer(out);
            let mut header = table.headers.clone();
            header.extend((1..=n).map(|i| format!("augmented_{i}")));
            w.write_record(&header)?;
            for (row, vs) in table.rows.iter().zip(variants) {
                let mut record = row.clone();
                record.extend(vs.iter().cloned());
                w.write_record(&record)?;
            }
            w.flush()
        }
        OutputFormat::Jsonl => {
            for (row, vs) in table.rows.iter().zip(variants) {
                let mut object = Map::new();
                for (h, v) in table.headers.iter().zip(row) {
                    object.insert(h.clone(), Value::String(v.clone()));
                }
                object.insert("augmented".into(), Value::from(vs.clone()));
                writeln!(out, "{}", Value::Object(object))?;
            }
            Ok(())
        }
    })
    .map_err(|e| e.error)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::corpus::Format;

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
