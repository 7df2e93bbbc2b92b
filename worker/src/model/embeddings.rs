//! `electra.embeddings`: word, absolute position and token-type embeddings, summed, then
//! LayerNorm and dropout.

use super::config::ElectraConfig;
use super::init::{embedding, layer_norm};
use tch::nn::{self, Module};
use tch::{Kind, Tensor};

#[derive(Debug)]
pub struct ElectraEmbeddings {
    word_embeddings: nn::Embedding,
    position_embeddings: nn::Embedding,
    token_type_embeddings: nn::Embedding,
    layer_norm: nn::LayerNorm,
    dropout: f64,
}

impl ElectraEmbeddings {
    pub fn new(vs: nn::Path, c: &ElectraConfig) -> Self {
        let word_embeddings = embedding(
            &vs / "word_embeddings",
            c.vocab_size,
            c.embedding_size,
            c.initializer_range,
        );
        // transformers zeroes the padding row of a freshly initialised embedding.
        if (0..c.vocab_size).contains(&c.pad_token_id) {
            tch::no_grad(|| {
                let _ = word_embeddings.ws.get(c.pad_token_id).zero_();
            });
        }
        Self {
            word_embeddings,
            position_embeddings: embedding(
                &vs / "position_embeddings",
                c.max_position_embeddings,
                c.embedding_size,
                c.initializer_range,
            ),
            token_type_embeddings: embedding(
                &vs / "token_type_embeddings",
                c.type_vocab_size,
                c.embedding_size,
                c.initializer_range,
            ),
            layer_norm: layer_norm(&vs / "LayerNorm", c.embedding_size, c.layer_norm_eps),
            dropout: c.hidden_dropout_prob,
        }
    }

    /// `[vocab, embedding_size]`: the output projection of the generator head is tied to it.
    pub fn word_embeddings(&self) -> &Tensor {
        &self.word_embeddings.ws
    }

    /// `[B, L]` ids → `[B, L, embedding_size]`; without `token_type_ids` every token is type 0.
    pub fn forward(&self, input_ids: &Tensor, token_type_ids: Option<&Tensor>, train: bool) -> Tensor {
        let length = input_ids.size()[1];
        let positions = Tensor::arange(length, (Kind::Int64, input_ids.device())).unsqueeze(0);
        let types = match token_type_ids {
            Some(t) => self.token_type_embeddings.forward(t),
            None => self.token_type_embeddings.ws.get(0).view([1, 1, -1]),
        };
        let x = self.word_embeddings.forward(input_ids) + self.position_embeddings.forward(&positions) + types;
        self.layer_norm.forward(&x).dropout(self.dropout, train)
    }
}
