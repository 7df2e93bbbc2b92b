//! Labelled texts for classification: which columns hold the text and the labels (the presets
//! of the three corpora, or `--text_column` / `--label_column`), the label space of a training
//! file, and the targets of every row. The files are read by the corpus readers
//! (`corpus::readers::read_table`), so NSMC's double quoting and UnSmile's unquoted fields are
//! handled as for masked-LM training.

use super::ClassifyError;
use crate::corpus::readers::{read_table, Format, Table};
use crate::model::sequence_classification::{Labels, ProblemType};
use std::path::{Path, PathBuf};

/// The labelled corpora kormlm knows the columns of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Dataset {
    /// NSMC `ratings*.txt`: `document`, single label `label` (0/1).
    Nsmc,
    /// Korean HateSpeech `labeled/*.tsv`: `comments`, single label `hate` (none/offensive/hate).
    KhsHate,
    /// Korean HateSpeech `labeled/*.tsv`: `comments`, single label `bias` (none/gender/others).
    KhsBias,
    /// UnSmile `unsmile_*.tsv`: `문장`, every other column a 0/1 label (multi-label).
    Unsmile,
}

/// Where a file's text and labels are.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Columns {
    /// The text column (default: the reader's, `comments` for CSV/TSV).
    pub text: Option<String>,
    /// The label columns; empty with `multi_label`: every column but the text.
    pub labels: Vec<String>,
    /// Each label column is a 0/1 flag of its own label.
    pub multi_label: bool,
}

impl Columns {
    /// The preset of `dataset`, with explicit flags taking precedence.
    pub fn resolve(dataset: Option<Dataset>, text: Option<String>, labels: Vec<String>, multi_label: bool) -> Self {
        let preset = match dataset {
            None => Columns::default(),
            Some(Dataset::Nsmc) => Columns {
                text: Some("document".into()),
                labels: vec!["label".into()],
                multi_label: false,
            },
            Some(Dataset::KhsHate) => Columns {
                text: Some("comments".into()),
                labels: vec!["hate".into()],
                multi_label: false,
            },
            Some(Dataset::KhsBias) => Columns {
                text: Some("comments".into()),
                labels: vec!["bias".into()],
                multi_label: false,
            },
            Some(Dataset::Unsmile) => Columns {
                text: Some("문장".into()),
                labels: Vec::new(),
                multi_label: true,
            },
        };
        Columns {
            text: text.or(preset.text),
            multi_label: multi_label || labels.len() > 1 || (labels.is_empty() && preset.multi_label),
            labels: if labels.is_empty() { preset.labels } else { labels },
        }
    }

    /// The columns of a classifier's data flags (`--dataset`, `--text_column`,
    /// `--label_column`, `--multi_label`).
    pub fn of_args(args: &kormlm_proto::classify_args::ClassifyArgs) -> Result<Self, ClassifyError> {
        let dataset = match &args.dataset {
            None => None,
            Some(name) => Some(<Dataset as clap::ValueEnum>::from_str(name, true).map_err(|_| {
                ClassifyError::Usage(format!(
                    "--dataset {name}: accepted are nsmc, khs-hate, khs-bias, unsmile"
                ))
            })?),
        };
        Ok(Self::resolve(
            dataset,
            args.text_column.clone(),
            args.label_columns(),
            args.multi_label,
        ))
    }

    pub fn problem_type(&self) -> ProblemType {
        if self.multi_label {
            ProblemType::MultiLabel
        } else {
            ProblemType::SingleLabel
        }
    }
}

/// The targets of a labelled file, row by row.
#[derive(Debug, Clone, PartialEq)]
pub enum Targets {
    /// Label ids.
    Single(Vec<usize>),
    /// One flag per label.
    Multi(Vec<Vec<bool>>),
}

/// A labelled file.
#[derive(Debug, Clone, PartialEq)]
pub struct LabelledSet {
    pub path: PathBuf,
    pub texts: Vec<String>,
    pub targets: Targets,
}

impl Targets {
    /// The targets of `rows`, in that order.
    pub fn select(&self, rows: &[usize]) -> Targets {
        match self {
            Targets::Single(ids) => Targets::Single(rows.iter().map(|&r| ids[r]).collect()),
            Targets::Multi(flags) => Targets::Multi(rows.iter().map(|&r| flags[r].clone()).collect()),
        }
    }
}

impl LabelledSet {
    pub fn len(&self) -> usize {
        self.texts.len()
    }

    /// The rows `rows` of this set, in that order.
    pub fn select(&self, rows: &[usize]) -> LabelledSet {
        LabelledSet {
            path: self.path.clone(),
            texts: rows.iter().map(|&r| self.texts[r].clone()).collect(),
            targets: self.targets.select(rows),
        }
    }

    /// This set followed by `texts`, each labelled like the row of this set `sources` names.
    pub fn with_copies(&self, texts: Vec<String>, sources: &[usize]) -> LabelledSet {
        let mut rows: Vec<usize> = (0..self.len()).collect();
        rows.extend_from_slice(sources);
        let mut all = self.texts.clone();
        all.extend(texts);
        LabelledSet {
            path: self.path.clone(),
            texts: all,
            targets: self.targets.select(&rows),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.texts.is_empty()
    }
}

fn data_error(path: &Path, message: String) -> ClassifyError {
    ClassifyError::Data {
        path: path.display().to_string(),
        message,
    }
}

/// Reads a file with a header (CSV, TSV, NSMC, UnSmile) with `text` as the text column.
pub fn open_table(path: &Path, text: Option<&str>) -> Result<Table, ClassifyError> {
    let format = Format::infer(path);
    if matches!(format, Format::Text | Format::KhsUnlabeled) {
        return Err(data_error(
            path,
            "cannot read labelled rows from this file: accepted are CSV (.csv) and TSV (.tsv) files with a header \
             row, NSMC ratings*.txt and UnSmile unsmile*.tsv"
                .into(),
        ));
    }
    if !path.is_file() {
        return Err(data_error(path, "no such file".into()));
    }
    Ok(read_table(path, format, text)?)
}

/// The texts of a file (for prediction; no labels needed).
pub fn read_texts(path: &Path, columns: &Columns) -> Result<Vec<String>, ClassifyError> {
    Ok(open_table(path, columns.text.as_deref())?.texts())
}

/// The label columns of `table` as indices, with their header names.
fn label_columns(table: &Table, path: &Path, columns: &Columns) -> Result<Vec<(usize, String)>, ClassifyError> {
    if columns.labels.is_empty() {
        if !columns.multi_label {
            return Err(ClassifyError::Usage(format!(
                "{}: which column holds the label? Give --label_column (columns: {}) or --dataset \
                 (nsmc, khs-hate, khs-bias, unsmile)",
                path.display(),
                table.headers.join(", ")
            )));
        }
        return Ok(table
            .headers
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != table.text_column)
            .map(|(i, h)| (i, h.clone()))
            .collect());
    }
    columns
        .labels
        .iter()
        .map(|name| {
            table
                .headers
                .iter()
                .position(|h| h == name)
                .map(|i| (i, name.clone()))
                .ok_or_else(|| {
                    data_error(
                        path,
                        format!("no label column `{name}`; the header has: {}", table.headers.join(", ")),
                    )
                })
        })
        .collect()
}

/// The label space of a training file: the label column names (multi-label), or the distinct
/// values of the label column (numeric order when all are integers, else text order), or the
/// given `explicit` names in that order.
pub fn label_space(path: &Path, columns: &Columns, explicit: Option<&[String]>) -> Result<Labels, ClassifyError> {
    let table = open_table(path, columns.text.as_deref())?;
    let label_columns = label_columns(&table, path, columns)?;
    let problem_type = columns.problem_type();
    let names = match (problem_type, explicit) {
        (_, Some(names)) => names.to_vec(),
        (ProblemType::MultiLabel, None) => label_columns.into_iter().map(|(_, name)| name).collect(),
        (ProblemType::SingleLabel, None) => {
            let column = label_columns[0].0;
            let mut values: Vec<String> = table.rows.iter().map(|r| r[column].trim().to_string()).collect();
            values.sort();
            values.dedup();
            if values.iter().all(|v| v.parse::<i64>().is_ok()) {
                values.sort_by_key(|v| v.parse::<i64>().unwrap_or_default());
            }
            values
        }
    };
    if names.len() < 2 && problem_type == ProblemType::SingleLabel {
        return Err(data_error(
            path,
            format!(
                "the label column `{}` has {} distinct value(s) ({}); a classifier needs at least 2",
                label_columns_text(columns),
                names.len(),
                names.join(", ")
            ),
        ));
    }
    if names.is_empty() {
        return Err(data_error(path, "no label columns".into()));
    }
    Ok(Labels { names, problem_type })
}

fn label_columns_text(columns: &Columns) -> String {
    columns.labels.join(",")
}

/// A 0/1 flag of a multi-label column.
fn flag(value: &str) -> Option<bool> {
    match value.trim().to_ascii_lowercase().as_str() {
        "1" | "1.0" | "true" => Some(true),
        "0" | "0.0" | "false" => Some(false),
        _ => None,
    }
}

/// Reads a labelled file against the label space `labels` (a value outside it is an error
/// naming the line, the column and the accepted values). Multi-label columns default to the
/// label names when `columns` names none.
pub fn read_labelled(path: &Path, columns: &Columns, labels: &Labels) -> Result<LabelledSet, ClassifyError> {
    let table = open_table(path, columns.text.as_deref())?;
    // The header is line 1; data row i is line i + 2 (quoted fields never span lines in the
    // supported corpora).
    let line = |i: usize| i + 2;
    let targets = match labels.problem_type {
        ProblemType::SingleLabel => {
            let columns_found = label_columns(&table, path, columns)?;
            if columns_found.len() != 1 {
                return Err(ClassifyError::Usage(format!(
                    "{}: a single-label classifier reads one label column, got {}",
                    path.display(),
                    columns_found.len()
                )));
            }
            let (column, name) = &columns_found[0];
            let mut ids = Vec::with_capacity(table.rows.len());
            for (i, row) in table.rows.iter().enumerate() {
                let value = row[*column].trim();
                let id = labels.names.iter().position(|n| n == value).ok_or_else(|| {
                    data_error(
                        path,
                        format!(
                            "line {}, column `{name}`: label {value:?} is not one of the labels ({})",
                            line(i),
                            labels.names.join(", ")
                        ),
                    )
                })?;
                ids.push(id);
            }
            Targets::Single(ids)
        }
        ProblemType::MultiLabel => {
            let columns = Columns {
                labels: if columns.labels.is_empty() {
                    labels.names.clone()
                } else {
                    columns.labels.clone()
                },
                ..columns.clone()
            };
            let found = label_columns(&table, path, &columns)?;
            if found.len() != labels.len() {
                return Err(ClassifyError::Usage(format!(
                    "{}: {} label columns given, the classifier has {} labels ({})",
                    path.display(),
                    found.len(),
                    labels.len(),
                    labels.names.join(", ")
                )));
            }
            let mut rows = Vec::with_capacity(table.rows.len());
            for (i, row) in table.rows.iter().enumerate() {
                let flags = found
                    .iter()
                    .map(|(column, name)| {
                        flag(&row[*column]).ok_or_else(|| {
                            data_error(
                                path,
                                format!(
                                    "line {}, column `{name}`: {:?} is not a 0/1 label flag (accepted: 0, 1, true, false)",
                                    line(i),
                                    row[*column]
                                ),
                            )
                        })
                    })
                    .collect::<Result<Vec<bool>, ClassifyError>>()?;
                rows.push(flags);
            }
            Targets::Multi(rows)
        }
    };
    Ok(LabelledSet {
        path: path.to_path_buf(),
        texts: table.texts(),
        targets,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn single_label_space_and_bad_value() {
        let dir = tempfile::tempdir().unwrap();
        let train = write(dir.path(), "t.tsv", "comments\thate\na\tnone\nb\thate\nc\toffensive\n");
        let columns = Columns::resolve(Some(Dataset::KhsHate), None, vec![], false);
        let labels = label_space(&train, &columns, None).unwrap();
        assert_eq!(labels.names, ["hate", "none", "offensive"]);
        let set = read_labelled(&train, &columns, &labels).unwrap();
        assert_eq!(set.targets, Targets::Single(vec![1, 0, 2]));
        let dev = write(dir.path(), "d.tsv", "comments\thate\na\tnone\nb\tbad\n");
        let e = read_labelled(&dev, &columns, &labels).unwrap_err().to_string();
        assert!(
            e.contains("d.tsv") && e.contains("line 3") && e.contains("`hate`") && e.contains("\"bad\""),
            "{e}"
        );
    }

    #[test]
    fn numeric_labels_sort_numerically_and_multi_label_flags() {
        let dir = tempfile::tempdir().unwrap();
        let f = write(dir.path(), "n.csv", "text,y\na,10\nb,2\n");
        let columns = Columns::resolve(None, Some("text".into()), vec!["y".into()], false);
        assert_eq!(label_space(&f, &columns, None).unwrap().names, ["2", "10"]);
        let m = write(dir.path(), "m.csv", "text,x,y\na,1,0\nb,0,yes\n");
        let columns = Columns::resolve(None, Some("text".into()), vec!["x".into(), "y".into()], false);
        let labels = label_space(&m, &columns, None).unwrap();
        assert_eq!(
            (labels.names.clone(), labels.problem_type),
            (vec!["x".into(), "y".into()], ProblemType::MultiLabel)
        );
        let e = read_labelled(&m, &columns, &labels).unwrap_err().to_string();
        assert!(e.contains("line 3") && e.contains("`y`") && e.contains("0, 1"), "{e}");
        let missing = Columns::resolve(None, Some("text".into()), vec!["z".into()], false);
        let e = label_space(&m, &missing, None).unwrap_err().to_string();
        assert!(e.contains("no label column `z`") && e.contains("text, x, y"), "{e}");
    }
}
