//! `ElectraForMaskedLM` in tch, after candle's `bert.rs`: one small struct per module of the
//! checkpoint, each with `new` (creating its variables under the checkpoint's key) and
//! `forward`, so variable names equal the Hugging Face state-dict keys.

use super::config::ElectraConfig;
use super::embeddings::ElectraEmbeddings;
use super::encoder::ElectraEncoder;
use super::init::{layer_norm, linear};
use tch::nn::{self, Module};
use tch::{Kind, Tensor};

/// `electra`: embeddings, the projection to `hidden_size` when `embedding_size` differs, and
/// the encoder.
#[derive(Debug)]
pub struct ElectraModel {
    embeddings: ElectraEmbeddings,
    embeddings_project: Option<nn::Linear>,
    encoder: ElectraEncoder,
}

impl ElectraModel {
    /// Creates the encoder's variables under `vs` (the `electra` prefix), in the order
    /// `ElectraForMaskedLM::new` creates them.
    pub fn new(vs: &nn::Path, c: &ElectraConfig) -> Self {
        let embeddings_project = (c.embedding_size != c.hidden_size).then(|| {
            linear(
                vs / "embeddings_project",
                c.embedding_size,
                c.hidden_size,
                c.initializer_range,
            )
        });
        let encoder = ElectraEncoder::new(vs / "encoder", c);
        let embeddings = ElectraEmbeddings::new(vs / "embeddings", c);
        Self {
            embeddings,
            embeddings_project,
            encoder,
        }
    }

    /// Final hidden states `[B, L, hidden]`. `attention_mask` is `[B, L]` with 1 for real tokens.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        token_type_ids: Option<&Tensor>,
        train: bool,
    ) -> Tensor {
        let mut x = self.embeddings.forward(input_ids, token_type_ids, train);
        if let Some(project) = &self.embeddings_project {
            x = project.forward(&x);
        }
        let mask = attention_mask.to_kind(Kind::Bool).unsqueeze(1).unsqueeze(1);
        self.encoder.forward(x, &mask, train)
    }
}

/// `generator_predictions`: dense to `embedding_size` → gelu (always exact gelu, as in
/// transformers, whatever `hidden_act` says) → LayerNorm.
#[derive(Debug)]
pub struct ElectraGeneratorPredictions {
    dense: nn::Linear,
    layer_norm: nn::LayerNorm,
}

impl ElectraGeneratorPredictions {
    pub fn new(vs: nn::Path, c: &ElectraConfig) -> Self {
        Self {
            dense: linear(&vs / "dense", c.hidden_size, c.embedding_size, c.initializer_range),
            layer_norm: layer_norm(&vs / "LayerNorm", c.embedding_size, c.layer_norm_eps),
        }
    }

    pub fn forward(&self, hidden: &Tensor) -> Tensor {
        self.layer_norm.forward(&self.dense.forward(hidden).gelu("none"))
    }
}

/// `generator_lm_head`: the projection to the vocabulary. Its weight is tied to the word
/// embeddings (never a variable of its own, never saved); only the bias is.
#[derive(Debug)]
pub struct ElectraGeneratorLmHead {
    bias: Tensor,
}

impl ElectraGeneratorLmHead {
    pub fn new(vs: nn::Path, c: &ElectraConfig) -> Self {
        Self {
            bias: vs.zeros("bias", &[c.vocab_size]),
        }
    }

    /// `tied_weight`: the word embeddings `[vocab, embedding_size]`.
    pub fn forward(&self, x: &Tensor, tied_weight: &Tensor) -> Tensor {
        x.matmul(&tied_weight.tr()) + &self.bias
    }
}

/// The ELECTRA encoder with its masked-LM (generator) head.
#[derive(Debug)]
pub struct ElectraForMaskedLM {
    electra: ElectraModel,
    generator_predictions: ElectraGeneratorPredictions,
    generator_lm_head: ElectraGeneratorLmHead,
    config: ElectraConfig,
}

impl ElectraForMaskedLM {
    /// Creates the variables under `vs` (randomly initialised like transformers).
    pub fn new(vs: &nn::Path, config: &ElectraConfig) -> Self {
        let c = config;
        let electra = vs / "electra";
        // Not transformers' module order: random initialisation draws from the generator in the
        // order variables are created, and this order is the one `LoadedModel::random` (and so
        // `init-model`) has always used, so a seed keeps giving the same weights.
        let embeddings_project = (c.embedding_size != c.hidden_size).then(|| {
            linear(
                &electra / "embeddings_project",
                c.embedding_size,
                c.hidden_size,
                c.initializer_range,
            )
        });
        let encoder = ElectraEncoder::new(&electra / "encoder", c);
        let generator_predictions = ElectraGeneratorPredictions::new(vs / "generator_predictions", c);
        let generator_lm_head = ElectraGeneratorLmHead::new(vs / "generator_lm_head", c);
        let embeddings = ElectraEmbeddings::new(&electra / "embeddings", c);
        Self {
            electra: ElectraModel {
                embeddings,
                embeddings_project,
                encoder,
            },
            generator_predictions,
            generator_lm_head,
            config: config.clone(),
        }
    }

    pub fn config(&self) -> &ElectraConfig {
        &self.config
    }

    /// Final hidden states `[B, L, hidden]`. `attention_mask` is `[B, L]` with 1 for real tokens.
    pub fn encode(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        token_type_ids: Option<&Tensor>,
        train: bool,
    ) -> Tensor {
        self.electra.forward(input_ids, attention_mask, token_type_ids, train)
    }

    /// Vocabulary logits for hidden states of any leading shape `[…, hidden]` → `[…, vocab]`:
    /// the generator head, with the output projection tied to the word embeddings.
    pub fn lm_logits(&self, hidden: &Tensor) -> Tensor {
        let x = self.generator_predictions.forward(hidden);
        self.generator_lm_head
            .forward(&x, self.electra.embeddings.word_embeddings())
    }

    /// Full logits `[B, L, vocab]`, as `ElectraForMaskedLM.forward` returns them.
    pub fn forward(&self, input_ids: &Tensor, attention_mask: &Tensor, train: bool) -> Tensor {
        self.lm_logits(&self.encode(input_ids, attention_mask, None, train))
    }

    /// Logits only at the selected positions: `positions` is `[N, 2]` of (batch row, token
    /// index); returns `[N, vocab]`. The head never runs anywhere else.
    pub fn logits_at(&self, input_ids: &Tensor, attention_mask: &Tensor, positions: &Tensor, train: bool) -> Tensor {
        let hidden = self.encode(input_ids, attention_mask, None, train);
        let rows = positions.select(1, 0);
        let cols = positions.select(1, 1);
        let selected = hidden.index(&[Some(rows), Some(cols)]);
        self.lm_logits(&selected)
    }
}
