//! Mixed precision: autocast regions on the CPU or CUDA in bfloat16 or float16 (a thin FFI to
//! `csrc/autocast.cpp`, since tch's `autocast` only enables CUDA autocast in float16), whether
//! this CPU computes bfloat16 in hardware (AVX-512 BF16 or AMX), and TF32 for fp32 CUDA matmuls
//! (`--tf32`, as the Hugging Face Trainer's).

use kormlm_proto::augment_args::ComputeDtype;
use std::ffi::{c_char, c_int, CStr};
use tch::Device;

extern "C" {
    fn kormlm_autocast_enter(cuda: c_int, bf16: c_int, prev_enabled: *mut c_int, prev_dtype: *mut c_int) -> c_int;
    fn kormlm_autocast_exit(cuda: c_int, prev_enabled: c_int, prev_dtype: c_int) -> c_int;
    fn kormlm_cpu_capability(name: *const c_char) -> c_int;
    fn kormlm_set_cuda_tf32(enabled: c_int) -> c_int;
    fn kormlm_cuda_matmul_tf32() -> c_int;
}

/// The precision a model computes in (weights stay fp32 in every case).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    Fp32,
    /// Autocast in float16 (CUDA only; training adds DeepSpeed's dynamic loss scaling).
    Fp16,
    /// Autocast in bfloat16 (CUDA, or a CPU with AVX-512 BF16/AMX; no loss scaling needed).
    Bf16,
}

impl Precision {
    pub fn name(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Fp16 => "fp16",
            Precision::Bf16 => "bf16",
        }
    }
}

impl From<ComputeDtype> for Precision {
    fn from(dtype: ComputeDtype) -> Self {
        match dtype {
            ComputeDtype::Fp32 => Precision::Fp32,
            ComputeDtype::Bf16 => Precision::Bf16,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PrecisionError {
    /// bf16 asked for on a CPU that has no bfloat16 instructions; `setting` names the flag or
    /// config key that asked.
    #[error(
        "{setting} asks for bfloat16, but this CPU has neither AVX-512 BF16 nor AMX (see `worker info`); \
         use fp32 here ({fix}) or run on a CUDA device"
    )]
    CpuWithoutBf16 { setting: String, fix: &'static str },
    #[error("fp16 runs only on CUDA devices; {setting} asks for it on the CPU")]
    CpuFp16 { setting: String },
    /// `--tf32 true` where TF32 does not exist (as the Hugging Face Trainer refuses it).
    #[error(
        "--tf32 true needs a CUDA GPU of compute capability 8.0 or newer (Ampere and later); this run is on {device}; \
         leave --tf32 out or give --tf32 false"
    )]
    NoTf32 { device: String },
    #[error("--tf32: libtorch could not set the fp32 matmul precision")]
    Tf32Failed,
}

/// What this CPU offers for bfloat16, as libtorch's cpuinfo reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct CpuBf16 {
    pub avx512_bf16: bool,
    pub amx_bf16: bool,
}

impl CpuBf16 {
    pub fn probe() -> Self {
        Self {
            avx512_bf16: cpu_capability(c"avx512_bf16"),
            amx_bf16: cpu_capability(c"amx_bf16"),
        }
    }

    /// Whether bfloat16 matmuls run in hardware (oneDNN uses AVX-512 BF16 or AMX tiles).
    pub fn supported(self) -> bool {
        self.avx512_bf16 || self.amx_bf16
    }
}

fn cpu_capability(name: &CStr) -> bool {
    // SAFETY: `name` is a NUL-terminated string that outlives the call; the shim only reads it.
    unsafe { kormlm_cpu_capability(name.as_ptr()) == 1 }
}

/// Checks that `device` can compute in `precision`; `setting` and `fix` name the flag or config
/// key that chose it and how to choose fp32 instead.
pub fn check(precision: Precision, device: Device, setting: &str, fix: &'static str) -> Result<(), PrecisionError> {
    match (precision, device) {
        (Precision::Fp32, _) | (_, Device::Cuda(_)) => Ok(()),
        (Precision::Fp16, _) => Err(PrecisionError::CpuFp16 {
            setting: setting.to_string(),
        }),
        (Precision::Bf16, _) if CpuBf16::probe().supported() => Ok(()),
        (Precision::Bf16, _) => Err(PrecisionError::CpuWithoutBf16 {
            setting: setting.to_string(),
            fix,
        }),
    }
}

/// Applies `--tf32`: `Some(true)` lets fp32 matmuls and convolutions on CUDA use TF32 (refused
/// unless `device` is a CUDA GPU of compute capability 8.0+), `Some(false)` keeps them in full
/// fp32, `None` leaves libtorch's default (matmuls in full fp32, convolutions in TF32).
pub fn apply_tf32(setting: Option<bool>, device: Device) -> Result<(), PrecisionError> {
    let Some(enabled) = setting else {
        return Ok(());
    };
    if enabled {
        let capability = match device {
            Device::Cuda(ordinal) => cuda_capability_major(ordinal),
            _ => None,
        };
        if capability.is_none_or(|major| major < 8) {
            return Err(PrecisionError::NoTf32 {
                device: match (device, capability) {
                    (Device::Cuda(i), Some(major)) => format!("cuda:{i} (compute capability {major}.x)"),
                    _ => format!("{device:?}").to_lowercase(),
                },
            });
        }
    }
    set_cuda_tf32(enabled)
}

fn set_cuda_tf32(enabled: bool) -> Result<(), PrecisionError> {
    // SAFETY: a plain int; the shim only sets libtorch's global precision setting.
    match unsafe { kormlm_set_cuda_tf32(c_int::from(enabled)) } {
        0 => Ok(()),
        _ => Err(PrecisionError::Tf32Failed),
    }
}

/// Whether fp32 matmuls on CUDA may use TF32 now.
pub fn cuda_matmul_tf32() -> bool {
    // SAFETY: no arguments; the shim only reads libtorch's global precision setting.
    unsafe { kormlm_cuda_matmul_tf32() == 1 }
}

/// The major compute capability of CUDA device `ordinal`, when the CUDA runtime answers.
fn cuda_capability_major(ordinal: usize) -> Option<i32> {
    // cudarc loads libcudart lazily and panics when it is missing: check the libraries first.
    crate::comm::libraries::check().ok()?;
    let ordinal = std::ffi::c_int::try_from(ordinal).ok()?;
    // SAFETY: a valid attribute; an ordinal out of range is an error code, not undefined behaviour.
    unsafe {
        cudarc::runtime::result::device::get_attribute(
            ordinal,
            cudarc::runtime::sys::cudaDeviceAttr::cudaDevAttrComputeCapabilityMajor,
        )
    }
    .ok()
}

/// An autocast region on this thread (autocast state is thread-local in libtorch), left when
/// dropped. Weight casts are cached until the outermost region ends, so a region held over many
/// forward passes of unchanged weights (inference) casts each weight once.
pub struct Region {
    cuda: c_int,
    prev_enabled: c_int,
    prev_dtype: c_int,
}

impl Region {
    /// Enters autocast in `precision` on `device`'s type; `None` for fp32 (nothing to do).
    pub fn enter(precision: Precision, device: Device) -> Option<Region> {
        let bf16 = match precision {
            Precision::Fp32 => return None,
            Precision::Fp16 => 0,
            Precision::Bf16 => 1,
        };
        let cuda = c_int::from(device.is_cuda());
        let (mut prev_enabled, mut prev_dtype) = (0, 0);
        // SAFETY: the out-pointers are to locals alive for the call; the shim writes two ints.
        let rc = unsafe { kormlm_autocast_enter(cuda, bf16, &mut prev_enabled, &mut prev_dtype) };
        if rc != 0 {
            tracing::warn!("libtorch refused an autocast region; computing in fp32");
            return None;
        }
        Some(Region {
            cuda,
            prev_enabled,
            prev_dtype,
        })
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: plain ints restoring the state `enter` read; no pointers cross.
        let rc = unsafe { kormlm_autocast_exit(self.cuda, self.prev_enabled, self.prev_dtype) };
        if rc != 0 {
            tracing::warn!("libtorch failed to leave an autocast region");
        }
    }
}

/// Runs `f` inside an autocast region of `precision` on `device` (plainly for fp32).
pub fn with<T>(precision: Precision, device: Device, f: impl FnOnce() -> T) -> T {
    let _region = Region::enter(precision, device);
    f()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Kind, Tensor};

    #[test]
    fn a_cpu_bf16_region_computes_matmuls_in_bfloat16_and_ends_cleanly() {
        let a = Tensor::ones([4, 4], (Kind::Float, Device::Cpu));
        let inside = with(Precision::Bf16, Device::Cpu, || a.matmul(&a).kind());
        assert_eq!(inside, Kind::BFloat16);
        assert_eq!(a.matmul(&a).kind(), Kind::Float);
        let nested = with(Precision::Bf16, Device::Cpu, || {
            with(Precision::Bf16, Device::Cpu, || ());
            a.matmul(&a).kind()
        });
        assert_eq!(nested, Kind::BFloat16, "an inner region restores the outer one");
        assert_eq!(with(Precision::Fp32, Device::Cpu, || a.matmul(&a).kind()), Kind::Float);
    }

    #[test]
    fn tf32_is_refused_without_an_ampere_gpu_and_switched_off_or_left_alone_otherwise() {
        let e = apply_tf32(Some(true), Device::Cpu).unwrap_err().to_string();
        assert!(
            e.contains("--tf32 true needs a CUDA GPU of compute capability 8.0"),
            "{e}"
        );
        assert!(e.contains("this run is on cpu"), "{e}");
        assert!(!cuda_matmul_tf32(), "libtorch's default: full fp32");
        // Unset leaves the setting alone; false sets full fp32 (also where it changes nothing).
        apply_tf32(None, Device::Cpu).unwrap();
        apply_tf32(Some(false), Device::Cpu).unwrap();
        assert!(!cuda_matmul_tf32());
        // The switch is libtorch's own (what cuBLAS calls consult).
        set_cuda_tf32(true).unwrap();
        assert!(cuda_matmul_tf32());
        apply_tf32(Some(false), Device::Cpu).unwrap();
        assert!(!cuda_matmul_tf32());
    }

    #[test]
    fn fp16_on_the_cpu_is_refused_with_the_setting_named() {
        let e = check(Precision::Fp16, Device::Cpu, "--dtype", "--dtype fp32").unwrap_err();
        assert!(e.to_string().contains("--dtype"), "{e}");
        assert!(check(Precision::Fp32, Device::Cpu, "--dtype", "").is_ok());
    }
}
