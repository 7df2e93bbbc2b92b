//! `worker classify train|eval|predict`: fine-tunes a sequence classifier in this process (the
//! first SIGTERM or SIGINT stops it after the current step with a checkpoint, exit 143/130,
//! continue with `--resume_from`), evaluates one on a labelled file (metrics on stdout, `--json`
//! for JSON) or writes its predictions, one JSON line per input row (`label` or `labels`, and
//! `probabilities`).

use super::train::StopSignals;
use crate::classify::data::{self, Targets};
use crate::classify::infer;
use crate::classify::train::{self, ClassifyTrainJob};
use crate::classify::ClassifyError;
use crate::cli::{ClassifyAction, ClassifyCommand, ClassifyEvalCommand, ClassifyPredictCommand, ClassifyTrainCommand};
use crate::comm::SingleRank;
use crate::device::parse_device;
use crate::error::WorkerError;
use crate::model::LoadedClassifier;
use crate::train::ProgressEvent;
use serde_json::json;

/// Runs the command; returns the exit status (0, or 143/130 after a stop signal).
pub fn run(command: &ClassifyCommand) -> Result<i32, WorkerError> {
    match &command.action {
        ClassifyAction::Train(c) => run_train(c),
        ClassifyAction::Eval(c) => Ok(run_eval(c).map(|()| 0)?),
        ClassifyAction::Predict(c) => Ok(run_predict(c).map(|()| 0)?),
    }
}

fn run_train(command: &ClassifyTrainCommand) -> Result<i32, WorkerError> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let device = parse_device(&command.device)?;
    crate::device::check(device)?;
    let job = ClassifyTrainJob::new(
        &command.config,
        device,
        &command.train,
        &command.data,
        command.resume_from.clone(),
        now,
    )?;
    let signals = StopSignals::install()?;
    let mut checkpoint = None;
    let mut on_progress = |event: &ProgressEvent| checkpoint.clone_from(&event.checkpoint);
    let summary = train::train(&job, &mut SingleRank, &mut on_progress, &|| signals.stop_requested())?;
    println!("{}", serde_json::to_string(&summary)?);
    if let Some(code) = signals.stopped(summary.stopped_by_request, summary.global_steps, checkpoint) {
        return Ok(code);
    }
    eprintln!(
        "classifier training finished: {} epoch(s), {} step(s), best dev macro-F1 {}{}; output in {}",
        summary.epochs_run,
        summary.global_steps,
        summary.best_val_macro_f1.map_or("-".into(), |v| format!("{v:.4}")),
        if summary.early_stopped { " (EARLY STOPPED)" } else { "" },
        job.train.output_dir.display()
    );
    Ok(0)
}

/// A classifier loaded with its label space from `config.json`.
fn load(model: &str, device: &str) -> Result<(LoadedClassifier, tch::Device), ClassifyError> {
    let device = parse_device(device)?;
    crate::device::check(device)?;
    Ok((LoadedClassifier::load(model, None, None, device, 0)?, device))
}

fn run_eval(command: &ClassifyEvalCommand) -> Result<(), ClassifyError> {
    let (loaded, device) = load(&command.model, &command.device)?;
    let labels = loaded.model.labels().clone();
    let set = data::read_labelled(&command.input, &command.columns.columns(), &labels)?;
    let ids = infer::tokenize(&loaded.tokenizer, &set.texts, command.max_seq_len)?;
    let pad = loaded.tokenizer.special().pad;
    let evaluation = infer::evaluate(&loaded.model, &ids, &set.targets, command.batch_size, pad, device)?;
    let m = &evaluation.metrics;
    let per_label = m.per_label_by_name(&labels.names);
    if command.json {
        println!(
            "{}",
            json!({
                "type": "eval",
                "input": set.path,
                "examples": m.examples,
                "loss": evaluation.loss,
                "accuracy": m.accuracy,
                "macro_f1": m.macro_f1,
                "per_label_f1": per_label,
                "labels": labels.names,
                "problem_type": labels.problem_type.as_str(),
            })
        );
    } else {
        println!(
            "{}: {} examples, accuracy {:.4}, macro-F1 {:.4}, loss {:.4}",
            set.path.display(),
            m.examples,
            m.accuracy,
            m.macro_f1,
            evaluation.loss
        );
        for (name, f1) in labels.names.iter().zip(&m.per_label_f1) {
            println!("  F1 {name}: {f1:.4}");
        }
    }
    Ok(())
}

fn run_predict(command: &ClassifyPredictCommand) -> Result<(), ClassifyError> {
    let (loaded, device) = load(&command.model, &command.device)?;
    let labels = loaded.model.labels().clone();
    let texts = data::read_texts(&command.input, &command.columns.columns())?;
    let ids = infer::tokenize(&loaded.tokenizer, &texts, command.max_seq_len)?;
    let pad = loaded.tokenizer.special().pad;
    let scored = infer::score(&loaded.model, &ids, None::<&Targets>, command.batch_size, pad, device)?;
    let mut out = String::new();
    for (text, probabilities) in texts.iter().zip(&scored.probabilities) {
        let prediction = infer::predict(labels.problem_type, probabilities);
        out.push_str(&infer::prediction_record(text, &labels, probabilities, &prediction).to_string());
        out.push('\n');
    }
    kormlm_proto::durable::write(&command.output, out).map_err(|e| ClassifyError::output(&command.output, e.error))?;
    if command.json {
        println!(
            "{}",
            json!({"predictions": texts.len(), "output": command.output, "labels": labels.names,
                   "problem_type": labels.problem_type.as_str()})
        );
    } else {
        eprintln!("wrote {} predictions to {}", texts.len(), command.output.display());
    }
    Ok(())
}
