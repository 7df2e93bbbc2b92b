//! Layers created the way `ElectraPreTrainedModel._init_weights` initialises them: linear and
//! embedding weights N(0, initializer_range), biases 0, LayerNorm weight 1 and bias 0.

use tch::nn;

pub(super) fn layer_norm(vs: nn::Path, size: i64, eps: f64) -> nn::LayerNorm {
    nn::layer_norm(
        vs,
        vec![size],
        nn::LayerNormConfig {
            eps,
            ..Default::default()
        },
    )
}

pub(super) fn linear(vs: nn::Path, input: i64, output: i64, range: f64) -> nn::Linear {
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

pub(super) fn embedding(vs: nn::Path, count: i64, dim: i64, range: f64) -> nn::Embedding {
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
