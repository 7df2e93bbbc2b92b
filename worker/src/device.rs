//! What this machine offers: libtorch, CUDA devices, NCCL.

use serde::Serialize;
use tch::{Device, Kind, Tensor};

/// The libtorch version the build is pinned to (torch-sys refuses any other).
pub const TORCH_VERSION: &str = "2.11.0";

#[derive(Debug, Clone, Serialize)]
pub struct DeviceInfo {
    pub torch_version: &'static str,
    pub cuda_available: bool,
    pub cuda_device_count: u32,
    /// NCCL version code, when libnccl is loadable.
    pub nccl_version: Option<i32>,
}

impl DeviceInfo {
    pub fn probe() -> Self {
        let count = tch::Cuda::device_count().max(0) as u32;
        Self {
            torch_version: TORCH_VERSION,
            cuda_available: tch::Cuda::is_available(),
            cuda_device_count: count,
            nccl_version: crate::comm::nccl::version(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("device {name:?} is not available: {message}")]
    Unavailable { name: String, message: String },
    #[error("unknown device {0:?}; accepted: cpu, cuda, cuda:N")]
    Unknown(String),
}

/// Parses `cpu`, `cuda` or `cuda:N`.
pub fn parse_device(name: &str) -> Result<Device, DeviceError> {
    match name {
        "cpu" => Ok(Device::Cpu),
        "cuda" => Ok(Device::Cuda(0)),
        other => other
            .strip_prefix("cuda:")
            .and_then(|n| n.parse::<usize>().ok())
            .map(Device::Cuda)
            .ok_or_else(|| DeviceError::Unknown(other.to_string())),
    }
}

/// Allocates and reduces a small tensor on `device`, so a broken device fails at assignment
/// time with a clear message instead of in the middle of training.
pub fn check(device: Device) -> Result<(), DeviceError> {
    let name = format!("{device:?}");
    if let Device::Cuda(i) = device {
        let count = tch::Cuda::device_count();
        if i as i64 >= count {
            return Err(DeviceError::Unavailable {
                name,
                message: format!("this process sees {count} CUDA device(s)"),
            });
        }
    }
    let sum = Tensor::f_ones([4], (Kind::Float, device))
        .and_then(|t| t.f_sum(Kind::Float))
        .and_then(|s| s.f_double_value(&[]))
        .map_err(|e| DeviceError::Unavailable {
            name: name.clone(),
            message: format!("libtorch failed to compute there: {e}"),
        })?;
    if (sum - 4.0).abs() > 1e-6 {
        return Err(DeviceError::Unavailable {
            name,
            message: format!("a test reduction returned {sum} instead of 4"),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_is_always_usable() {
        check(Device::Cpu).unwrap();
        let info = DeviceInfo::probe();
        assert_eq!(info.torch_version, "2.11.0");
    }

    #[test]
    fn device_names() {
        assert_eq!(parse_device("cuda:3").unwrap(), Device::Cuda(3));
        assert!(parse_device("tpu")
            .unwrap_err()
            .to_string()
            .contains("accepted: cpu, cuda, cuda:N"));
    }
}
