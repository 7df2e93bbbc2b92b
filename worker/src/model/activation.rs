//! `hidden_act` of `config.json`: the activation of the encoder's intermediate layer, parsed once
//! when the config is read. The names are transformers' `ACT2FN` keys.

use serde::{Deserialize, Serialize};
use tch::Tensor;

/// An activation transformers accepts as `hidden_act` and kormlm implements. Each name keeps
/// its own variant, so a saved config writes back the name it was read with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum HiddenAct {
    /// Exact (erf) GELU, transformers' default for ELECTRA.
    #[default]
    Gelu,
    GeluPython,
    /// The tanh approximation of GELU, under its four names.
    GeluNew,
    GeluFast,
    GeluPytorchTanh,
    GeluPythonTanh,
    /// Exact GELU clipped to [-10, 10].
    Gelu10,
    QuickGelu,
    Relu,
    Relu2,
    Relu6,
    LeakyRelu,
    Silu,
    Swish,
    Sigmoid,
    Tanh,
    Mish,
    Linear,
}

impl HiddenAct {
    /// Every accepted activation, in the order the error message lists them.
    pub const ALL: [HiddenAct; 18] = [
        Self::Gelu,
        Self::GeluPython,
        Self::GeluNew,
        Self::GeluFast,
        Self::GeluPytorchTanh,
        Self::GeluPythonTanh,
        Self::Gelu10,
        Self::QuickGelu,
        Self::Relu,
        Self::Relu2,
        Self::Relu6,
        Self::LeakyRelu,
        Self::Silu,
        Self::Swish,
        Self::Sigmoid,
        Self::Tanh,
        Self::Mish,
        Self::Linear,
    ];

    /// The name in `config.json`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Gelu => "gelu",
            Self::GeluPython => "gelu_python",
            Self::GeluNew => "gelu_new",
            Self::GeluFast => "gelu_fast",
            Self::GeluPytorchTanh => "gelu_pytorch_tanh",
            Self::GeluPythonTanh => "gelu_python_tanh",
            Self::Gelu10 => "gelu_10",
            Self::QuickGelu => "quick_gelu",
            Self::Relu => "relu",
            Self::Relu2 => "relu2",
            Self::Relu6 => "relu6",
            Self::LeakyRelu => "leaky_relu",
            Self::Silu => "silu",
            Self::Swish => "swish",
            Self::Sigmoid => "sigmoid",
            Self::Tanh => "tanh",
            Self::Mish => "mish",
            Self::Linear => "linear",
        }
    }

    pub fn forward(self, x: &Tensor) -> Tensor {
        match self {
            Self::Gelu | Self::GeluPython => x.gelu("none"),
            Self::GeluNew | Self::GeluFast | Self::GeluPytorchTanh | Self::GeluPythonTanh => x.gelu("tanh"),
            Self::Gelu10 => x.gelu("none").clamp(-10.0, 10.0),
            Self::QuickGelu => x * (x * 1.702).sigmoid(),
            Self::Relu => x.relu(),
            Self::Relu2 => x.relu().square(),
            Self::Relu6 => x.clamp(0.0, 6.0),
            // torch.nn.LeakyReLU's default negative slope, 0.01.
            Self::LeakyRelu => x.leaky_relu(),
            Self::Silu | Self::Swish => x.silu(),
            Self::Sigmoid => x.sigmoid(),
            Self::Tanh => x.tanh(),
            Self::Mish => x.mish(),
            Self::Linear => x.shallow_clone(),
        }
    }
}

/// An unknown `hidden_act`; the message names the key and lists the accepted values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("hidden_act {found:?} is not supported; accepted: {}", accepted())]
pub struct UnknownActivation {
    pub found: String,
}

fn accepted() -> String {
    HiddenAct::ALL.map(HiddenAct::name).join(", ")
}

impl std::str::FromStr for HiddenAct {
    type Err = UnknownActivation;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|act| act.name() == name)
            .ok_or_else(|| UnknownActivation {
                found: name.to_string(),
            })
    }
}

impl TryFrom<String> for HiddenAct {
    type Error = UnknownActivation;

    fn try_from(name: String) -> Result<Self, Self::Error> {
        name.parse()
    }
}

impl From<HiddenAct> for String {
    fn from(act: HiddenAct) -> Self {
        act.name().to_string()
    }
}

impl std::fmt::Display for HiddenAct {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const X: [f32; 10] = [-12.0, -3.0, -1.0, -0.5, 0.0, 0.3, 1.0, 2.5, 7.0, 12.0];

    /// `transformers.activations.ACT2FN[name](X)` (transformers 4.57, torch 2.11).
    #[rustfmt::skip]
    const EXPECTED: [(&str, [f32; 10]); 18] = [
        ("gelu", [-0.0, -0.004050225, -0.1586553, -0.1542688, 0.0, 0.1853734, 0.8413447, 2.484476, 7.0, 12.0]),
        ("gelu_python", [-0.0, -0.004049689, -0.1586553, -0.1542688, 0.0, 0.1853734, 0.8413447, 2.484476, 7.0, 12.0]),
        ("gelu_new", [-0.0, -0.003637433, -0.158808, -0.154286, 0.0, 0.1853709, 0.841192, 2.484916, 7.0, 12.0]),
        ("gelu_fast", [-0.0, -0.003637433, -0.158808, -0.154286, 0.0, 0.1853709, 0.841192, 2.484916, 7.0, 12.0]),
        ("gelu_pytorch_tanh", [-0.0, -0.003637433, -0.158808, -0.154286, 0.0, 0.1853709, 0.841192, 2.484916, 7.0, 12.0]),
        ("gelu_python_tanh", [-0.0, -0.003637433, -0.158808, -0.154286, 0.0, 0.1853709, 0.841192, 2.484916, 7.0, 12.0]),
        ("gelu_10", [-0.0, -0.004050225, -0.1586553, -0.1542688, 0.0, 0.1853734, 0.8413447, 2.484476, 7.0, 10.0]),
        ("quick_gelu", [-1.618642e-08, -0.01807131, -0.1542042, -0.1496116, 0.0, 0.1874841, 0.8457958, 2.465014, 6.999953, 12.0]),
        ("relu", [0.0, 0.0, 0.0, 0.0, 0.0, 0.3, 1.0, 2.5, 7.0, 12.0]),
        ("relu2", [0.0, 0.0, 0.0, 0.0, 0.0, 0.09, 1.0, 6.25, 49.0, 144.0]),
        ("relu6", [0.0, 0.0, 0.0, 0.0, 0.0, 0.3, 1.0, 2.5, 6.0, 6.0]),
        ("leaky_relu", [-0.12, -0.03, -0.01, -0.005, 0.0, 0.3, 1.0, 2.5, 7.0, 12.0]),
        ("silu", [-7.373009e-05, -0.1422776, -0.2689414, -0.1887703, 0.0, 0.1723328, 0.7310586, 2.310354, 6.993623, 11.99993]),
        ("swish", [-7.373009e-05, -0.1422776, -0.2689414, -0.1887703, 0.0, 0.1723328, 0.7310586, 2.310354, 6.993623, 11.99993]),
        ("sigmoid", [6.144174e-06, 0.04742587, 0.2689414, 0.3775407, 0.5, 0.5744425, 0.7310586, 0.9241418, 0.999089, 0.9999938]),
        ("tanh", [-1.0, -0.9950548, -0.7615942, -0.4621172, 0.0, 0.2913126, 0.7615942, 0.9866143, 0.9999983, 1.0]),
        ("mish", [-7.373032e-05, -0.1456475, -0.3034014, -0.2207438, 0.0, 0.2080014, 0.8650984, 2.471392, 6.999989, 12.0]),
        ("linear", [-12.0, -3.0, -1.0, -0.5, 0.0, 0.3, 1.0, 2.5, 7.0, 12.0]),
    ];

    #[test]
    fn every_activation_matches_transformers() {
        let x = Tensor::from_slice(&X);
        for (name, expected) in EXPECTED {
            let act: HiddenAct = name.parse().unwrap();
            assert_eq!(act.name(), name);
            let ours = Vec::<f32>::try_from(&act.forward(&x)).unwrap();
            for (i, (a, b)) in ours.iter().zip(expected).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-5 * b.abs().max(1.0),
                    "{name}({}) = {a}, expected {b}",
                    X[i]
                );
            }
        }
        assert_eq!(HiddenAct::ALL.len(), EXPECTED.len());
    }

    #[test]
    fn unknown_names_list_what_is_accepted() {
        let err = "gelu_accurate".parse::<HiddenAct>().unwrap_err().to_string();
        assert!(
            err.starts_with("hidden_act \"gelu_accurate\" is not supported; accepted: gelu, gelu_python, gelu_new"),
            "{err}"
        );
        let json: Result<HiddenAct, _> = serde_json::from_str("\"swish\"");
        assert_eq!(json.unwrap(), HiddenAct::Swish);
        assert_eq!(serde_json::to_string(&HiddenAct::GeluNew).unwrap(), "\"gelu_new\"");
    }
}
