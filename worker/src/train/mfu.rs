//! Model-FLOPs utilisation: the FLOPs a training step of the ELECTRA masked-LM needs, and this
//! device's measured matmul peak in the precision in use.
//!
//! FLOPs of one training step (forward + backward = 3 × forward, the usual "6·N" rule):
//! * every real (non-padding) token passes the dense layers: `6 · N_dense` per token, with
//!   `N_dense = L · (4H² + 2HI)` (attention projections and feed-forward) `+ E·H` (the embedding
//!   projection when `E ≠ H`); embedding lookups, biases, LayerNorm and activations are left out;
//! * attention scores and their weighted sum: `12 · L · H · s²` per sequence of `s` real tokens
//!   (`QKᵀ` and `AV`, `2·s²·H` each, forward, times 3);
//! * the masked-LM head runs only at masked positions (this implementation skips the others):
//!   `6 · (H·E + E·V)` per masked token.
//!
//! Padding is not counted: the MFU says how much of the hardware did useful work.

use crate::autocast::Precision;
use crate::model::config::ElectraConfig;
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

/// The FLOPs of a forward and backward pass over sequences of `lengths` real tokens with
/// `masked` masked tokens in all.
pub fn train_flops(config: &ElectraConfig, lengths: impl IntoIterator<Item = usize>, masked: usize) -> f64 {
    let (h, i, l, e, v) = (
        config.hidden_size as f64,
        config.intermediate_size as f64,
        config.num_hidden_layers as f64,
        config.embedding_size as f64,
        config.vocab_size as f64,
    );
    let projection = if config.embedding_size != config.hidden_size {
        e * h
    } else {
        0.0
    };
    let dense = l * (4.0 * h * h + 2.0 * h * i) + projection;
    let (mut tokens, mut squares) = (0.0, 0.0);
    for s in lengths {
        tokens += s as f64;
        squares += (s * s) as f64;
    }
    6.0 * dense * tokens + 12.0 * l * h * squares + 6.0 * (h * e + e * v) * masked as f64
}

/// The best matmul throughput (FLOP/s) of square `n × n` products in `precision` on `device`
/// over about `budget` (at least three products), with libtorch's threads as configured.
pub fn measure_peak(precision: Precision, device: Device, budget: Duration) -> f64 {
    let n: i64 = match (device.is_cuda(), budget >= Duration::from_secs(1)) {
        (true, _) => 8192,
        (false, true) => 2048,
        // A short measurement (at the start of every training run) on smaller products.
        (false, false) => 1024,
    };
    let kind = match precision {
        Precision::Fp32 => Kind::Float,
        Precision::Fp16 => Kind::Half,
        Precision::Bf16 => Kind::BFloat16,
    };
    tch::no_grad(|| {
        let a = Tensor::randn([n, n], (kind, device));
        let b = Tensor::randn([n, n], (kind, device));
        let out = a.matmul(&b); // warm-up (oneDNN primitive creation, AMX initialisation)
        sync(device);
        let flops = 2.0 * (n as f64).powi(3);
        let (mut best, started, mut runs) = (0.0f64, Instant::now(), 0);
        while runs < 3 || started.elapsed() < budget {
            let t = Instant::now();
            let _ = a.matmul_out(&out, &b);
            sync(device);
            best = best.max(flops / t.elapsed().as_secs_f64().max(1e-9));
            runs += 1;
        }
        best
    })
}

fn sync(device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

/// Tokens/s and MFU over a window: `flops` model FLOPs done in `seconds` by `world` ranks each
/// with a peak of `peak` FLOP/s.
pub fn utilisation(flops: f64, seconds: f64, peak: f64, world: usize) -> f64 {
    if peak <= 0.0 || seconds <= 0.0 {
        return 0.0;
    }
    flops / seconds / (peak * world.max(1) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_electra_flops_follow_the_six_n_rule_plus_attention_and_head() {
        let mut config: ElectraConfig = serde_json::from_value(serde_json::json!({
            "vocab_size": 32000, "embedding_size": 768, "hidden_size": 768, "num_hidden_layers": 12,
            "num_attention_heads": 12, "intermediate_size": 3072, "max_position_embeddings": 512
        }))
        .unwrap();
        // 85 M dense encoder parameters: 6 · 85 M per token.
        let dense = 12.0 * (4.0 * 768.0 * 768.0 + 2.0 * 768.0 * 3072.0);
        let one = train_flops(&config, [1], 0);
        assert!((one - (6.0 * dense + 12.0 * 12.0 * 768.0)).abs() < 1.0, "{one}");
        let with_head = train_flops(&config, [10, 20], 3) - train_flops(&config, [10, 20], 0);
        assert!((with_head - 3.0 * 6.0 * (768.0 * 768.0 + 768.0 * 32000.0)).abs() < 1.0);
        config.embedding_size = 128;
        let projected = train_flops(&config, [1], 0) - one;
        assert!(
            (projected - 6.0 * 128.0 * 768.0).abs() < 1.0,
            "the embedding projection: {projected}"
        );
    }

    #[test]
    fn a_cpu_matmul_peak_is_measured() {
        let peak = measure_peak(Precision::Fp32, Device::Cpu, Duration::from_millis(50));
        assert!(peak > 1e8, "{peak}");
        assert!((utilisation(2e9, 1.0, 1e9, 2) - 1.0).abs() < 1e-12);
    }
}
