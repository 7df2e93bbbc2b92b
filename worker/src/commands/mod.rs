//! The standalone commands (`worker info|train|augment|…`), one module each: each takes its
//! parsed flags, does the work in this process and prints what the command prints.

pub mod augment;
pub mod augment_eval;
pub mod augment_report;
pub mod classify;
pub mod fill_mask;
pub mod info;
pub mod init_model;
pub mod tokenize;
pub mod tokenizer_train;
pub mod train;
