//! One reader per corpus format. Each returns the texts in file order plus counts of the rows
//! it could not use (empty, `nan`); malformed rows and invalid UTF-8 are errors naming the file
//! and line.

use super::CorpusError;
use serde::{Deserialize, Serialize};
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Format {
    /// NSMC `id<TAB>document<TAB>label`, with its double CSV quoting undone (single in ratings.txt).
    Nsmc,
    /// Korean HateSpeech labelled TSV (`comments` column, CSV quoting).
    Khs,
    /// Korean HateSpeech unlabelled comments: one per line, `nan` marks a missing row.
    KhsUnlabeled,
    /// UnSmile TSV (`문장` column, no quoting).
    Unsmile,
    /// Plain text, one sentence per line.
    Text,
    /// CSV with a header and a `comments` column (the original mlm_train.csv / mlm_dev.csv).
    Csv,
    /// TSV with a header and a `comments` column, CSV quoting.
    Tsv,
}

impl Format {
    /// Guesses the format from the file name.
    pub fn infer(path: &Path) -> Format {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().to_lowercase())
            .unwrap_or_default();
        let ext = path
            .extension()
            .map(|e| e.to_string_lossy().to_lowercase())
            .unwrap_or_default();
        if name.starts_with("ratings") && ext == "txt" {
            Format::Nsmc
        } else if name.starts_with("unlabeled_comments") {
            Format::KhsUnlabeled
        } else if name.starts_with("unsmile") {
            Format::Unsmile
        } else if ext == "csv" {
            Format::Csv
        } else if ext == "tsv" {
            Format::Tsv
        } else {
            Format::Text
        }
    }
}

/// What a reader produced.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReadResult {
    pub texts: Vec<String>,
    pub rows: usize,
    pub empty: usize,
    pub nan: usize,
}

impl ReadResult {
    fn push(&mut self, text: String) {
        self.rows += 1;
        if text.trim().is_empty() {
            self.empty += 1;
        } else if text == "nan" || text == "NaN" {
            self.nan += 1;
        } else {
            self.texts.push(text);
        }
    }
}

fn read_error(path: &Path, line: usize, message: impl Into<String>) -> CorpusError {
    CorpusError::Row {
        path: path.display().to_string(),
        line,
        message: message.into(),
    }
}

/// The file's lines (without `\n` / `\r\n`), each checked to be UTF-8.
fn lines(path: &Path) -> Result<Vec<String>, CorpusError> {
    let bytes = std::fs::read(path).map_err(|e| CorpusError::Io {
        path: path.display().to_string(),
        message: e.to_string(),
    })?;
    let mut out = Vec::new();
    for (i, raw) in bytes.split(|b| *b == b'\n').enumerate() {
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        let text = std::str::from_utf8(raw).map_err(|e| {
            read_error(
                path,
                i + 1,
                format!("invalid UTF-8 at byte {} of the line", e.valid_up_to()),
            )
        })?;
        out.push(text.to_string());
    }
    if out.last().is_some_and(String::is_empty) {
        out.pop();
    }
    Ok(out)
}

/// Removes one level of CSV quoting: `"a ""b"""` → `a "b"`.
fn unquote(field: &str) -> Option<String> {
    let inner = field.strip_prefix('"')?.strip_suffix('"')?;
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '"' && chars.next() != Some('"') {
            return None;
        }
        out.push(c);
    }
    Some(out)
}

/// Rows with named columns; `text_column` indexes the column holding the text.
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

fn column_index(path: &Path, headers: &[String], column: &str) -> Result<usize, CorpusError> {
    headers
        .iter()
        .position(|h| h == column)
        .ok_or_else(|| CorpusError::Column {
            path: path.display().to_string(),
            column: column.to_string(),
            found: headers.to_vec(),
        })
}

fn read_nsmc(path: &Path, column: &str) -> Result<Table, CorpusError> {
    // The published train/test files were written by pandas twice; ratings.txt once.
    let passes = if path.file_name().is_some_and(|n| n == "ratings.txt") {
        1
    } else {
        2
    };
    let all = lines(path)?;
    let headers: Vec<String> = all
        .first()
        .map(|h| h.split('\t').map(str::to_string).collect())
        .unwrap_or_default();
    if headers != ["id", "document", "label"] {
        return Err(read_error(
            path,
            1,
            "expected the NSMC header `id<TAB>document<TAB>label`",
        ));
    }
    let text_column = column_index(path, &headers, column)?;
    let mut rows = Vec::with_capacity(all.len());
    for (i, line) in all.iter().enumerate().skip(1) {
        let mut fields: Vec<String> = line.split('\t').map(str::to_string).collect();
        if fields.len() != 3 {
            return Err(read_error(
                path,
                i + 1,
                format!("expected 3 tab-separated fields, found {}", fields.len()),
            ));
        }
        if fields[1].contains('"') {
            for _ in 0..passes {
                fields[1] = unquote(&fields[1])
                    .ok_or_else(|| read_error(path, i + 1, "a document with `\"` is not validly CSV-quoted"))?;
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

/// A delimited file with a header, read with CSV quoting rules (or none).
fn read_delimited(path: &Path, delimiter: u8, column: &str, quoting: bool) -> Result<Table, CorpusError> {
    let bytes = std::fs::read(path).map_err(|e| CorpusError::Io {
        path: path.display().to_string(),
        message: e.to_string(),
    })?;
    let mut reader = csv::ReaderBuilder::new()
        .delimiter(delimiter)
        .quoting(quoting)
        .has_headers(true)
        .flexible(false)
        .from_reader(bytes.as_slice());
    let headers = reader
        .byte_headers()
        .map_err(|e| read_error(path, 1, e.to_string()))?
        .clone();
    let headers: Vec<String> = headers
        .iter()
        .map(|h| String::from_utf8_lossy(h).trim_start_matches('\u{feff}').to_string())
        .collect();
    let text_column = column_index(path, &headers, column)?;
    let mut rows = Vec::new();
    for record in reader.byte_records() {
        let record = record.map_err(|e| {
            let line = e.position().map_or(0, |p| p.line() as usize);
            read_error(path, line, e.to_string())
        })?;
        let line = record.position().map_or(0, |p| p.line() as usize);
        let fields = record
            .iter()
            .map(|field| {
                std::str::from_utf8(field).map(str::to_string).map_err(|e| {
                    read_error(
                        path,
                        line,
                        format!("invalid UTF-8 at byte {} of the field", e.valid_up_to()),
                    )
                })
            })
            .collect::<Result<Vec<String>, CorpusError>>()?;
        rows.push(fields);
    }
    Ok(Table {
        headers,
        rows,
        text_column,
    })
}

fn read_text(path: &Path) -> Result<Table, CorpusError> {
    Ok(Table {
        headers: vec!["text".into()],
        rows: lines(path)?.into_iter().map(|l| vec![l]).collect(),
        text_column: 0,
    })
}

/// Reads a file with all its columns; `column` overrides the text column of delimited formats
/// (default `comments`; `문장` for UnSmile; `document` for NSMC).
pub fn read_table(path: &Path, format: Format, column: Option<&str>) -> Result<Table, CorpusError> {
    match format {
        Format::Nsmc => read_nsmc(path, column.unwrap_or("document")),
        Format::Khs | Format::Tsv => read_delimited(path, b'\t', column.unwrap_or("comments"), true),
        Format::Csv => read_delimited(path, b',', column.unwrap_or("comments"), true),
        Format::Unsmile => read_delimited(path, b'\t', column.unwrap_or("문장"), false),
        Format::KhsUnlabeled | Format::Text => read_text(path),
    }
}

/// Reads one source's texts, counting the rows without text.
pub fn read(path: &Path, format: Format, column: Option<&str>) -> Result<ReadResult, CorpusError> {
    let table = read_table(path, format, column)?;
    let mut result = ReadResult::default();
    for mut row in table.rows {
        result.push(row.swap_remove(table.text_column));
    }
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn data(rel: &str) -> PathBuf {
        let base = std::env::var_os("KORMLM_SHARED_DATA")
            .map(PathBuf::from)
            .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data"));
        base.join(rel)
    }

    #[test]
    fn nsmc_train_and_test_undo_double_quoting() {
        let test = read(&data("nsmc/ratings_test.txt"), Format::Nsmc, None).unwrap();
        assert_eq!((test.rows, test.empty), (50_000, 3));
        assert_eq!(test.texts.len(), 49_997);
        assert!(test
            .texts
            .iter()
            .any(|t| t.starts_with("\"결혼은 현실이에요 징징징\" 성현아")));
        assert!(!test.texts.iter().any(|t| t.starts_with("\"\"")));
        let train = read(&data("nsmc/ratings_train.txt"), Format::Nsmc, None).unwrap();
        assert_eq!((train.rows, train.empty), (150_000, 5));
    }

    #[test]
    fn nsmc_ratings_txt_is_quoted_once() {
        let all = read(&data("nsmc/ratings.txt"), Format::Nsmc, None).unwrap();
        assert_eq!((all.rows, all.empty), (200_000, 8));
        assert!(all
            .texts
            .iter()
            .any(|t| t.starts_with("\"결혼은 현실이에요 징징징\" 성현아")));
    }

    #[test]
    fn khs_labeled_honours_csv_quoting() {
        let train = read(&data("korean-hate-speech/labeled/train.tsv"), Format::Khs, None).unwrap();
        assert_eq!(train.rows, 7_896);
        let dev = read(&data("korean-hate-speech/labeled/dev.tsv"), Format::Khs, None).unwrap();
        assert_eq!(dev.rows, 471);
        assert_eq!(dev.texts[0], "송중기 시대극은 믿고본다. 첫회 신선하고 좋았다.");
        assert!(!dev.texts.iter().any(|t| t.starts_with('"') && t.ends_with('"')));
        let test = read(&data("korean-hate-speech/test.no_label.tsv"), Format::Khs, None).unwrap();
        assert_eq!(test.rows, 974);
    }

    #[test]
    fn khs_unlabeled_counts_nan_rows() {
        let path = data("korean-hate-speech/unlabeled/unlabeled_comments_5.txt");
        assert_eq!(Format::infer(&path), Format::KhsUnlabeled);
        let r = read(&path, Format::KhsUnlabeled, None).unwrap();
        assert_eq!((r.rows, r.nan), (33_893, 28));
        assert_eq!(r.texts.len() + r.nan + r.empty, 33_893);
    }

    #[test]
    fn unsmile_keeps_quotes_and_reads_the_last_unterminated_line() {
        let path = data("korean_unsmile_dataset/unsmile_train_v1.0.tsv");
        assert_eq!(Format::infer(&path), Format::Unsmile);
        let r = read(&path, Format::Unsmile, None).unwrap();
        assert_eq!(r.rows, 15_005);
        assert_eq!(r.texts.iter().filter(|t| t.contains('"')).count(), 72);
        let valid = read(
            &data("korean_unsmile_dataset/unsmile_valid_v1.0.tsv"),
            Format::Unsmile,
            None,
        )
        .unwrap();
        assert_eq!(valid.rows, 3_737);
    }

    #[test]
    fn text_and_comments_csv() {
        let dir = tempfile::tempdir().unwrap();
        let text = dir.path().join("a.txt");
        std::fs::write(&text, "하나\n\n둘\r\nnan\n").unwrap();
        let r = read(&text, Format::infer(&text), None).unwrap();
        assert_eq!(
            (r.texts.clone(), r.empty, r.nan),
            (vec!["하나".to_string(), "둘".to_string()], 1, 1)
        );
        let csv_path = dir.path().join("mlm_train.csv");
        std::fs::write(&csv_path, ",comments\n0,\"따옴표 \"\"안\"\", 쉼표\"\n1,\n2,보통\n").unwrap();
        let r = read(&csv_path, Format::infer(&csv_path), None).unwrap();
        assert_eq!(r.texts, vec!["따옴표 \"안\", 쉼표", "보통"]);
        assert_eq!(r.empty, 1);
        let err = read(&csv_path, Format::Csv, Some("text")).unwrap_err().to_string();
        assert!(err.contains("no column `text`") && err.contains("comments"), "{err}");
    }

    #[test]
    fn malformed_rows_and_bad_utf8_name_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ratings_x.txt");
        std::fs::write(&p, "id\tdocument\tlabel\n1\tok\t0\n2\tmissing label\n").unwrap();
        let err = read(&p, Format::Nsmc, None).unwrap_err().to_string();
        assert!(
            err.contains("ratings_x.txt line 3: expected 3 tab-separated fields"),
            "{err}"
        );
        let t = dir.path().join("bad.txt");
        std::fs::write(&t, b"ok\nbad \xff\n").unwrap();
        let err = read(&t, Format::Text, None).unwrap_err().to_string();
        assert!(err.contains("bad.txt line 2: invalid UTF-8"), "{err}");
    }
}
