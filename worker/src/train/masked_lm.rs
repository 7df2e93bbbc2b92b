//! The masked-LM objective: the corpus of `--data_path` tokenised (and cached), 15 % dynamic
//! masking seeded by (seed, epoch, sample), the dev set masked once, the masked-token
//! cross-entropy and early stopping on the dev loss.

use super::job::TrainJob;
use super::mfu;
use super::objective::{Evaluation, Objective, StepWork};
use super::trainer::Trainer;
use super::TrainError;
use crate::batch::MaskedBatch;
use crate::comm::Collective;
use crate::corpus::CorpusSpec;
use crate::dataset::{tokenize_cached, TokenizedSet};
use crate::masking::{MaskedSample, Masker, DEV_EPOCH};
use crate::model::masked_lm::evaluate;
use crate::model::LoadedModel;
use serde_json::{json, Map, Value};
use tch::Device;

/// The masked LM's data, once prepared.
#[derive(Default)]
pub struct MaskedLm {
    prepared: Option<Prepared>,
}

/// The corpus tokenised, the masking rule, and the dev set with its fixed masking.
struct Prepared {
    train_set: TokenizedSet,
    dev: Vec<MaskedSample>,
    masker: Masker,
}

impl MaskedLm {
    fn data(&self) -> &Prepared {
        self.prepared
            .as_ref()
            .expect("the run prepares the data before it steps")
    }
}

impl Objective for MaskedLm {
    type Model = LoadedModel;
    const METRIC: &'static str = "val_loss";
    const HIGHER_IS_BETTER: bool = false;

    fn load(
        &mut self,
        name_or_path: &str,
        revision: Option<&str>,
        device: Device,
        _seed: u64,
    ) -> Result<LoadedModel, TrainError> {
        Ok(LoadedModel::load(name_or_path, revision, device)?)
    }

    fn prepare(
        &mut self,
        job: &TrainJob,
        loaded: &LoadedModel,
        leader: bool,
    ) -> Result<Map<String, Value>, TrainError> {
        let args = &job.args;
        let corpus = CorpusSpec::from_data_path(&args.data_path)?.load()?;
        if corpus.train.is_empty() {
            return Err(TrainError::EmptyCorpus(args.data_path.clone()));
        }
        if leader {
            tracing::info!(
                train = corpus.report.train_sentences,
                dev = corpus.report.dev_sentences,
                duplicates = corpus.report.duplicates_removed,
                "corpus loaded"
            );
        }
        let max_len = args.max_seq_len as usize;
        let cache = job.cache_dir.as_deref();
        let train_set = tokenize_cached(&corpus.train, &loaded.tokenizer, max_len, cache)?;
        let dev_set = tokenize_cached(&corpus.dev, &loaded.tokenizer, max_len, cache)?;
        let masker = Masker {
            special: loaded.tokenizer.special(),
            vocab_size: loaded.tokenizer.vocab_size() as u32,
            probability: 0.15,
            seed: args.seed,
        };
        let dev = (0..dev_set.len())
            .map(|i| masker.mask(dev_set.get(i), DEV_EPOCH, i as u64))
            .collect();
        self.prepared = Some(Prepared { train_set, dev, masker });
        let mut params = Map::new();
        params.insert("corpus".into(), json!(corpus.report));
        Ok(params)
    }

    fn train_len(&self) -> usize {
        self.data().train_set.len()
    }

    fn sample_len(&self, index: usize) -> usize {
        self.data().train_set.get(index).len()
    }

    /// Masks every sample of every micro-step, keeping this rank's share. All ranks' samples
    /// are masked to count the masked tokens of the whole global step: every micro-batch's loss
    /// is divided by that count, so the gradients summed over micro-batches and ranks are those
    /// of the global mean (masking is deterministic: no communication).
    fn backward(
        &self,
        trainer: &mut Trainer<LoadedModel>,
        epoch: u32,
        micro: &[Vec<u32>],
        rank: usize,
        world: usize,
    ) -> Result<StepWork, TrainError> {
        let data = self.data();
        let mut masked = 0;
        let mut mine = Vec::with_capacity(micro.len());
        for all in micro {
            let ours = rank * all.len() / world..(rank + 1) * all.len() / world;
            let mut samples = Vec::with_capacity(ours.len());
            for (k, &i) in all.iter().enumerate() {
                let sample = data
                    .masker
                    .mask(data.train_set.get(i as usize), u64::from(epoch), u64::from(i));
                masked += sample.masked_count();
                if ours.contains(&k) {
                    samples.push(sample);
                }
            }
            mine.push(samples);
        }
        let mut work = StepWork {
            divisor: masked as f64,
            ..Default::default()
        };
        if masked == 0 {
            return Ok(work);
        }
        let pad = trainer.loaded.tokenizer.special().pad;
        let config = trainer.loaded.model.config().clone();
        for samples in mine.iter().filter(|s| !s.is_empty()) {
            let batch = MaskedBatch::from_samples(samples, pad, trainer.device);
            work.tokens += batch.tokens as u64;
            work.flops += mfu::train_flops(&config, samples.iter().map(|s| s.input_ids.len()), batch.masked);
            work.loss_sum += trainer.backward(&batch, work.divisor);
        }
        Ok(work)
    }

    /// Sums the dev-set evaluation over the ranks: rank r evaluates `[r·n/W, (r+1)·n/W)`.
    fn evaluate(
        &self,
        trainer: &Trainer<LoadedModel>,
        batch_size: usize,
        comm: &mut dyn Collective,
    ) -> Result<Evaluation, TrainError> {
        let dev = &self.data().dev;
        let (rank, world) = (comm.rank(), comm.world_size());
        let part = &dev[rank * dev.len() / world..(rank + 1) * dev.len() / world];
        let pad = trainer.loaded.tokenizer.special().pad;
        // Evaluated in the training precision, as the Hugging Face Trainer does under autocast.
        let local = crate::autocast::with(trainer.precision, trainer.device, || {
            evaluate(&trainer.loaded.model, part, batch_size, pad, trainer.device)
        });
        let mut sums = [local.loss_sum, local.correct, local.masked];
        comm.all_reduce_scalars(&mut sums)?;
        let sums = crate::model::masked_lm::EvalSums {
            loss_sum: sums[0],
            correct: sums[1],
            masked: sums[2],
        };
        Ok(Evaluation {
            loss: sums.loss(),
            accuracy: sums.accuracy(),
            metric: sums.loss(),
            record: Map::new(),
        })
    }
}
