//! What this machine offers: libtorch, CUDA devices, NCCL.

use crate::comm::libraries;
use serde::Serialize;
use std::path::PathBuf;
use tch::{Device, Kind, Tensor};

/// The libtorch version the build is pinned to (torch-sys refuses any other).
pub const TORCH_VERSION: &str = "2.11.0";

#[derive(Debug, Clone, Serialize)]
pub struct DeviceInfo {
    pub torch_version: &'static str,
    pub cuda_available: bool,
    pub cuda_device_count: u32,
    /// NCCL version code, when cudarc binds the NCCL libtorch loaded.
    pub nccl_version: Option<i32>,
    /// The NCCL and CUDA runtime files bound, or why they are not.
    pub nccl_path: Option<PathBuf>,
    pub cudart_path: Option<PathBuf>,
    pub cuda_libraries_error: Option<String>,
}

impl DeviceInfo {
    pub fn probe() -> Self {
        let count = tch::Cuda::device_count().max(0) as u32;
        let libraries = libraries::check();
        Self {
            torch_version: TORCH_VERSION,
            cuda_available: tch::Cuda::is_available(),
            cuda_device_count: count,
            nccl_version: crate::comm::nccl::version(),
            nccl_path: libraries.as_ref().ok().map(|l| l.nccl.clone()),
            cudart_path: libraries.as_ref().ok().map(|l| l.cudart.clone()),
            cuda_libraries_error: libraries.err(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("device {name:?} is not available: {message}")]
    Unavailable { name: String, message: String },
    #[error("unknown device {0:?}; accepted: cpu, cuda, cuda:N")]
    Unknown(String),
    #[error("{device}: {message}")]
    Libraries { device: String, message: String },
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

/// Whether this process sees the GPUs the coordinator placed it on: local index `local[i]` must
/// be physical GPU `physical[i]` under this process's `CUDA_VISIBLE_DEVICES` (`visible`; unset:
/// indices are physical ids). An unplaced rank (no physical ids) and a visibility list of GPU
/// UUIDs are taken as they are.
pub fn check_visibility(local: &[u32], physical: &[u32], visible: Option<&str>) -> Result<(), DeviceError> {
    let ids: Option<Vec<u32>> = match visible {
        None => None,
        Some(v) => match v
            .split(',')
            .map(|s| s.trim().parse::<u32>())
            .collect::<Result<Vec<_>, _>>()
        {
            Ok(ids) => Some(ids),
            Err(_) => return Ok(()),
        },
    };
    for (index, gpu) in local.iter().zip(physical) {
        let seen = match &ids {
            None => Some(*index),
            Some(ids) => ids.get(*index as usize).copied(),
        };
        if seen != Some(*gpu) {
            let env = visible.map_or("unset".to_string(), |v| format!("{v:?}"));
            return Err(DeviceError::Unavailable {
                name: format!("cuda:{index}"),
                message: format!(
                    "the coordinator placed this rank on GPU {gpu} as cuda:{index}, but with CUDA_VISIBLE_DEVICES \
                     {env} cuda:{index} is {}; start the worker with the CUDA_VISIBLE_DEVICES the coordinator printed",
                    seen.map_or("no device".to_string(), |s| format!("GPU {s}"))
                ),
            });
        }
    }
    Ok(())
}

/// Allocates and reduces a small tensor on `device`, so a broken device fails at assignment
/// time with a clear message instead of in the middle of training. On CUDA, the NCCL and CUDA
/// runtime bindings are checked first.
pub fn check(device: Device) -> Result<(), DeviceError> {
    let name = format!("{device:?}");
    if let Device::Cuda(i) = device {
        libraries::check().map_err(|message| DeviceError::Libraries {
            device: format!("cuda:{i}"),
            message,
        })?;
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
    fn the_placed_gpu_must_be_the_one_this_process_sees() {
        check_visibility(&[1], &[3], Some("2,3")).unwrap();
        check_visibility(&[2], &[2], None).unwrap();
        check_visibility(&[0], &[], Some("5")).unwrap();
        let err = check_visibility(&[0], &[3], None).unwrap_err().to_string();
        assert!(
            err.contains("GPU 3 as cuda:0") && err.contains("unset") && err.contains("is GPU 0"),
            "{err}"
        );
        let err = check_visibility(&[1], &[3], Some("3")).unwrap_err().to_string();
        assert!(err.contains("\"3\" cuda:1 is no device"), "{err}");
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
