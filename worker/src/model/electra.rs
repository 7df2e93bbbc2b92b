//! `ElectraForMaskedLM` in tch, one small struct per module of the checkpoint, with variable
//! names equal to the Hugging Face state-dict keys.

use super::activation::HiddenAct;
use super::config::ElectraConfig;
use tch::nn::{self, Module};
use tch::{Kind, Tensor};

fn layer_norm(vs: nn::Path, size: i64, eps: f64) -> nn::LayerNorm {
    nn::layer_norm(
        vs,
        vec![size],
        nn::LayerNormConfig {
            eps,
            ..Default::default()
        },
    )
}

/// Linear weights are initialised like `ElectraPreTrainedModel._init_weights`: N(0, range), bias 0.
fn linear(vs: nn::Path, input: i64, output: i64, range: f64) -> nn::Linear {
    nn::linear(
        vs,
        input,
        output,
        nn::LinearConfig {
            ws_init: nn::Init::Randn {
                mean: 0.0,
                stdev: range,
            },
            bs_init: Some(nn::Init::Const(0.0)),
            bias: true,
        },
    )
}

fn embedding(vs: nn::Path, count: i64, dim: i64, range: f64) -> nn::Embedding {
    nn::embedding(
        vs,
        count,
        dim,
        nn::EmbeddingConfig {
            ws_init: nn::Init::Randn {
                mean: 0.0,
                stdev: range,
            },
            ..Default::default()
        },
    )
}

#[derive(Debug)]
struct Embeddings {
    word: nn::Embedding,
    position: nn::Embedding,
    token_type: nn::Embedding,
    layer_norm: nn::LayerNorm,
    dropout: f64,
}

impl Embeddings {
    fn new(vs: nn::Path, c: &ElectraConfig) -> Self {
        let word = embedding(
            &vs / "word_embeddings",
            c.vocab_size,
            c.embedding_size,
            c.initializer_range,
        );
        if (0..c.vocab_size).contains(&c.pad_token_id) {
            tch::no_grad(|| {
                let _ = word.ws.get(c.pad_token_id).zero_();
            });
        }
        Self {
            word,
            position: embedding(
                &vs / "position_embeddings",
                c.max_position_embeddings,
                c.embedding_size,
                c.initializer_range,
            ),
            token_type: embedding(
                &vs / "token_type_embeddings",
                c.type_vocab_size,
                c.embedding_size,
                c.initializer_range,
            ),
            layer_norm: layer_norm(&vs / "LayerNorm", c.embedding_size, c.layer_norm_eps),
            dropout: c.hidden_dropout_prob,
        }
    }

    fn forward(&self, input_ids: &Tensor, token_type_ids: Option<&Tensor>, train: bool) -> Tensor {
        let length = input_ids.size()[1];
        let positions = Tensor::arange(length, (Kind::Int64, input_ids.device())).unsqueeze(0);
        let types = match token_type_ids {
            Some(t) => self.token_type.forward(t),
            None => self.token_type.ws.get(0).view([1, 1, -1]),
        };
        let x = self.word.forward(input_ids) + self.position.forward(&positions) + types;
        self.layer_norm.forward(&x).dropout(self.dropout, train)
    }
}

#[derive(Debug)]
struct Attention {
    query: nn::Linear,
    key: nn::Linear,
    value: nn::Linear,
    output: nn::Linear,
    layer_norm: nn::LayerNorm,
    heads: i64,
    attention_dropout: f64,
    hidden_dropout: f64,
}

impl Attention {
    fn new(vs: nn::Path, c: &ElectraConfig) -> Self {
        let h = c.hidden_size;
        let r = c.initializer_range;
        let this = &vs / "self";
        let out = &vs / "output";
        Self {
            query: linear(&this / "query", h, h, r),
            key: linear(&this / "key", h, h, r),
            value: linear(&this / "value", h, h, r),
            output: linear(&out / "dense", h, h, r),
            layer_norm: layer_norm(&out / "LayerNorm", h, c.layer_norm_eps),
            heads: c.num_attention_heads,
            attention_dropout: c.attention_probs_dropout_prob,
            hidden_dropout: c.hidden_dropout_prob,
        }
    }

    /// `mask`: boolean `[B, 1, 1, L]`, true where a key may be attended to.
    fn forward(&self, x: &Tensor, mask: &Tensor, train: bool) -> Tensor {
        let (b, l, h) = x.size3().expect("hidden states are [B, L, H]");
        let split = |t: Tensor| t.view([b, l, self.heads, h / self.heads]).transpose(1, 2);
        let q = split(self.query.forward(x));
        let k = split(self.key.forward(x));
        let v = split(self.value.forward(x));
        let dropout = if train { self.attention_dropout } else { 0.0 };
        let context = Tensor::scaled_dot_product_attention(&q, &k, &v, Some(mask), dropout, false, None, false)
            .transpose(1, 2)
            .reshape([b, l, h]);
        let projected = self.output.forward(&context).dropout(self.hidden_dropout, train);
        self.layer_norm.forward(&(projected + x))
    }
}

#[derive(Debug)]
struct Layer {
    attention: Attention,
    intermediate: nn::Linear,
    output: nn::Linear,
    layer_norm: nn::LayerNorm,
    activation: HiddenAct,
    dropout: f64,
}

impl Layer {
    fn new(vs: nn::Path, c: &ElectraConfig) -> Self {
        let r = c.initializer_range;
        let out = &vs / "output";
        Self {
            attention: Attention::new(&vs / "attention", c),
            intermediate: linear(&vs / "intermediate" / "dense", c.hidden_size, c.intermediate_size, r),
            output: linear(&out / "dense", c.intermediate_size, c.hidden_size, r),
            layer_norm: layer_norm(&out / "LayerNorm", c.hidden_size, c.layer_norm_eps),
            activation: c.hidden_act,
            dropout: c.hidden_dropout_prob,
        }
    }

    fn forward(&self, x: &Tensor, mask: &Tensor, train: bool) -> Tensor {
        let attended = self.attention.forward(x, mask, train);
        let inner = self.activation.forward(&self.intermediate.forward(&attended));
        let out = self.output.forward(&inner).dropout(self.dropout, train);
        self.layer_norm.forward(&(out + attended))
    }
}

/// `generator_predictions`: dense → gelu (always exact gelu, as in transformers) → LayerNorm.
#[derive(Debug)]
struct GeneratorPredictions {
    dense: nn::Linear,
    layer_norm: nn::LayerNorm,
}

/// The ELECTRA encoder with its masked-LM (generator) head.
#[derive(Debug)]
pub struct ElectraForMaskedLM {
    embeddings: Embeddings,
    embeddings_project: Option<nn::Linear>,
    layers: Vec<Layer>,
    predictions: GeneratorPredictions,
    lm_head_bias: Tensor,
    config: ElectraConfig,
}

impl ElectraForMaskedLM {
    /// Creates the variables under `vs` (randomly initialised like transformers).
    pub fn new(vs: &nn::Path, config: &ElectraConfig) -> Self {
        let c = config;
        let electra = vs / "electra";
        let embeddings_project = (c.embedding_size != c.hidden_size).then(|| {
            linear(
                &electra / "embeddings_project",
                c.embedding_size,
                c.hidden_size,
                c.initializer_range,
            )
        });
        let layers = (0..c.num_hidden_layers)
            .map(|i| Layer::new(&electra / "encoder" / "layer" / i, c))
            .collect();
        let head = vs / "generator_predictions";
        let predictions = GeneratorPredictions {
            dense: linear(&head / "dense", c.hidden_size, c.embedding_size, c.initializer_range),
            layer_norm: layer_norm(&head / "LayerNorm", c.embedding_size, c.layer_norm_eps),
        };
        let lm_head_bias = (vs / "generator_lm_head").zeros("bias", &[c.vocab_size]);
        Self {
            embeddings: Embeddings::new(&electra / "embeddings", c),
            embeddings_project,
            layers,
            predictions,
            lm_head_bias,
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
        let mut x = self.embeddings.forward(input_ids, token_type_ids, train);
        if let Some(project) = &self.embeddings_project {
            x = project.forward(&x);
        }
        let mask = attention_mask.to_kind(Kind::Bool).unsqueeze(1).unsqueeze(1);
        for layer in &self.layers {
            x = layer.forward(&x, &mask, train);
        }
        x
    }

    /// Vocabulary logits for hidden states of any leading shape `[…, hidden]` → `[…, vocab]`:
    /// the generator head, with the output projection tied to the word embeddings.
    pub fn lm_logits(&self, hidden: &Tensor) -> Tensor {
        let x = self.predictions.dense.forward(hidden).gelu("none");
        let x = self.predictions.layer_norm.forward(&x);
        x.matmul(&self.embeddings.word.ws.tr()) + &self.lm_head_bias
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
