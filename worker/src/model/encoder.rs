//! `electra.encoder`: `num_hidden_layers` transformer layers, each self-attention with its
//! output projection, then the intermediate (feed-forward) layer and its output projection,
//! every sub-layer followed by dropout, a residual connection and LayerNorm (post-norm BERT).

use super::activation::HiddenAct;
use super::config::ElectraConfig;
use super::init::{layer_norm, linear};
use tch::nn::{self, Module};
use tch::Tensor;

/// `attention.self`: multi-head scaled dot-product attention.
#[derive(Debug)]
pub struct ElectraSelfAttention {
    query: nn::Linear,
    key: nn::Linear,
    value: nn::Linear,
    num_attention_heads: i64,
    dropout: f64,
}

impl ElectraSelfAttention {
    pub fn new(vs: nn::Path, c: &ElectraConfig) -> Self {
        let (h, r) = (c.hidden_size, c.initializer_range);
        Self {
            query: linear(&vs / "query", h, h, r),
            key: linear(&vs / "key", h, h, r),
            value: linear(&vs / "value", h, h, r),
            num_attention_heads: c.num_attention_heads,
            dropout: c.attention_probs_dropout_prob,
        }
    }

    /// `mask`: boolean `[B, 1, 1, L]`, true where a key may be attended to. Returns the
    /// context `[B, L, hidden]`.
    pub fn forward(&self, x: &Tensor, mask: &Tensor, train: bool) -> Tensor {
        let (b, l, h) = x.size3().expect("hidden states are [B, L, H]");
        let heads = self.num_attention_heads;
        let split = |t: Tensor| t.view([b, l, heads, h / heads]).transpose(1, 2);
        let q = split(self.query.forward(x));
        let k = split(self.key.forward(x));
        let v = split(self.value.forward(x));
        let dropout = if train { self.dropout } else { 0.0 };
        Tensor::scaled_dot_product_attention(&q, &k, &v, Some(mask), dropout, false, None, false)
            .transpose(1, 2)
            .reshape([b, l, h])
    }
}

/// `attention.output` and `output`: dense → dropout → LayerNorm of the sum with the sub-layer's
/// input.
#[derive(Debug)]
pub struct ElectraResidualOutput {
    dense: nn::Linear,
    layer_norm: nn::LayerNorm,
    dropout: f64,
}

impl ElectraResidualOutput {
    pub fn new(vs: nn::Path, input: i64, c: &ElectraConfig) -> Self {
        Self {
            dense: linear(&vs / "dense", input, c.hidden_size, c.initializer_range),
            layer_norm: layer_norm(&vs / "LayerNorm", c.hidden_size, c.layer_norm_eps),
            dropout: c.hidden_dropout_prob,
        }
    }

    pub fn forward(&self, hidden: &Tensor, residual: &Tensor, train: bool) -> Tensor {
        let projected = self.dense.forward(hidden).dropout(self.dropout, train);
        self.layer_norm.forward(&(projected + residual))
    }
}

/// `attention.output`.
pub type ElectraSelfOutput = ElectraResidualOutput;

/// `output` (of the feed-forward block).
pub type ElectraOutput = ElectraResidualOutput;

/// `attention`: self-attention and its output.
#[derive(Debug)]
pub struct ElectraAttention {
    self_attention: ElectraSelfAttention,
    output: ElectraSelfOutput,
}

impl ElectraAttention {
    pub fn new(vs: nn::Path, c: &ElectraConfig) -> Self {
        Self {
            self_attention: ElectraSelfAttention::new(&vs / "self", c),
            output: ElectraSelfOutput::new(&vs / "output", c.hidden_size, c),
        }
    }

    pub fn forward(&self, x: &Tensor, mask: &Tensor, train: bool) -> Tensor {
        let context = self.self_attention.forward(x, mask, train);
        self.output.forward(&context, x, train)
    }
}

/// `intermediate`: dense to `intermediate_size`, then `hidden_act`.
#[derive(Debug)]
pub struct ElectraIntermediate {
    dense: nn::Linear,
    activation: HiddenAct,
}

impl ElectraIntermediate {
    pub fn new(vs: nn::Path, c: &ElectraConfig) -> Self {
        Self {
            dense: linear(&vs / "dense", c.hidden_size, c.intermediate_size, c.initializer_range),
            activation: c.hidden_act,
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        self.activation.forward(&self.dense.forward(x))
    }
}

/// `encoder.layer.N`.
#[derive(Debug)]
pub struct ElectraLayer {
    attention: ElectraAttention,
    intermediate: ElectraIntermediate,
    output: ElectraOutput,
}

impl ElectraLayer {
    pub fn new(vs: nn::Path, c: &ElectraConfig) -> Self {
        Self {
            attention: ElectraAttention::new(&vs / "attention", c),
            intermediate: ElectraIntermediate::new(&vs / "intermediate", c),
            output: ElectraOutput::new(&vs / "output", c.intermediate_size, c),
        }
    }

    pub fn forward(&self, x: &Tensor, mask: &Tensor, train: bool) -> Tensor {
        let attended = self.attention.forward(x, mask, train);
        let inner = self.intermediate.forward(&attended);
        self.output.forward(&inner, &attended, train)
    }
}

/// `electra.encoder`.
#[derive(Debug)]
pub struct ElectraEncoder {
    layer: Vec<ElectraLayer>,
}

impl ElectraEncoder {
    pub fn new(vs: nn::Path, c: &ElectraConfig) -> Self {
        Self {
            layer: (0..c.num_hidden_layers)
                .map(|i| ElectraLayer::new(&vs / "layer" / i, c))
                .collect(),
        }
    }

    /// `mask`: boolean `[B, 1, 1, L]`, true where a key may be attended to.
    pub fn forward(&self, x: Tensor, mask: &Tensor, train: bool) -> Tensor {
        self.layer.iter().fold(x, |x, layer| layer.forward(&x, mask, train))
    }
}
