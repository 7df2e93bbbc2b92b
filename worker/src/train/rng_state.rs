//! The states of libtorch's default random generators (the CPU one and, on a GPU, the CUDA one
//! of the device), which drive dropout: a checkpoint carries each rank's, as the Hugging Face
//! Trainer saves `rng_state_{rank}.pth`, so a resumed run draws the same dropout masks as an
//! uninterrupted one. Read and restored through `csrc/rng.cpp` (tch exposes neither).

use std::collections::HashMap;
use std::path::Path;
use tch::Device;

extern "C" {
    fn kormlm_rng_get_state(
        device_kind: i32,
        index: i32,
        out: *mut u8,
        cap: i64,
        err: *mut std::ffi::c_char,
        err_cap: i64,
    ) -> i64;
    fn kormlm_rng_set_state(
        device_kind: i32,
        index: i32,
        data: *const u8,
        len: i64,
        err: *mut std::ffi::c_char,
        err_cap: i64,
    ) -> i32;
}

#[derive(Debug, thiserror::Error)]
pub enum RngError {
    #[error("the {generator} random generator: {message}")]
    Torch { generator: String, message: String },
    #[error("{path}: {message}")]
    File { path: String, message: String },
}

/// Which default generator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Generator {
    Cpu,
    /// The CUDA generator of this device ordinal.
    Cuda(usize),
}

impl Generator {
    fn ffi(self) -> (i32, i32) {
        match self {
            Self::Cpu => (0, 0),
            Self::Cuda(i) => (1, i32::try_from(i).unwrap_or(i32::MAX)),
        }
    }

    fn name(self) -> String {
        match self {
            Self::Cpu => "CPU".into(),
            Self::Cuda(i) => format!("CUDA:{i}"),
        }
    }

    fn error(self, err: &[u8]) -> RngError {
        let end = err.iter().position(|b| *b == 0).unwrap_or(err.len());
        RngError::Torch {
            generator: self.name(),
            message: String::from_utf8_lossy(&err[..end])
                .lines()
                .next()
                .unwrap_or("")
                .to_string(),
        }
    }
}

const ERR_CAP: usize = 1024;

/// The generator's state as libtorch serialises it (`torch.get_rng_state()`'s bytes).
pub fn get_state(generator: Generator) -> Result<Vec<u8>, RngError> {
    let (kind, index) = generator.ffi();
    let mut err = vec![0u8; ERR_CAP];
    let mut state = vec![0u8; 8192];
    loop {
        // SAFETY: `state` and `err` are valid for writes of the lengths passed; the shim writes
        // at most that many bytes and keeps no pointer after it returns.
        let size = unsafe {
            kormlm_rng_get_state(
                kind,
                index,
                state.as_mut_ptr(),
                state.len() as i64,
                err.as_mut_ptr().cast(),
                ERR_CAP as i64,
            )
        };
        let Ok(size) = usize::try_from(size) else {
            return Err(generator.error(&err));
        };
        if size <= state.len() {
            state.truncate(size);
            return Ok(state);
        }
        state.resize(size, 0);
    }
}

/// Restores a state [`get_state`] returned (libtorch refuses one of the wrong size).
pub fn set_state(generator: Generator, state: &[u8]) -> Result<(), RngError> {
    let (kind, index) = generator.ffi();
    let mut err = vec![0u8; ERR_CAP];
    // SAFETY: `state` is valid for reads of its length and `err` for writes of ERR_CAP bytes;
    // the shim copies the state before it returns.
    let rc = unsafe {
        kormlm_rng_set_state(
            kind,
            index,
            state.as_ptr(),
            state.len() as i64,
            err.as_mut_ptr().cast(),
            ERR_CAP as i64,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(generator.error(&err))
    }
}

/// One rank's generator states.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RngStates {
    pub cpu: Vec<u8>,
    /// The CUDA generator's state, when the rank trains on a GPU.
    pub cuda: Option<Vec<u8>>,
}

const CPU_KEY: &str = "cpu";
const CUDA_KEY: &str = "cuda";

impl RngStates {
    /// The states of the generators a rank training on `device` draws from.
    pub fn capture(device: Device) -> Result<Self, RngError> {
        Ok(Self {
            cpu: get_state(Generator::Cpu)?,
            cuda: match device {
                Device::Cuda(i) => Some(get_state(Generator::Cuda(i))?),
                _ => None,
            },
        })
    }

    /// Puts the states back. The CUDA state goes to `device`'s generator (the ordinal may differ
    /// from the one it was saved on); on the CPU it is not needed and left out.
    pub fn restore(&self, device: Device) -> Result<(), RngError> {
        set_state(Generator::Cpu, &self.cpu)?;
        if let (Some(state), Device::Cuda(i)) = (&self.cuda, device) {
            set_state(Generator::Cuda(i), state)?;
        }
        Ok(())
    }

    /// Writes the states as a safetensors file of byte tensors `cpu` and `cuda` (durably).
    pub fn write(&self, path: &Path) -> Result<(), RngError> {
        let file_error = |message: String| RngError::File {
            path: path.display().to_string(),
            message,
        };
        let mut views = Vec::new();
        for (name, bytes) in [(CPU_KEY, Some(&self.cpu)), (CUDA_KEY, self.cuda.as_ref())] {
            if let Some(bytes) = bytes {
                let view = safetensors::tensor::TensorView::new(safetensors::Dtype::U8, vec![bytes.len()], bytes)
                    .map_err(|e| file_error(format!("{name}: {e}")))?;
                views.push((name.to_string(), view));
            }
        }
        let metadata: HashMap<String, String> = [("format".to_string(), "kormlm-rng".to_string())].into();
        let bytes = safetensors::serialize(views, Some(metadata)).map_err(|e| file_error(e.to_string()))?;
        kormlm_proto::durable::write(path, bytes).map_err(|e| file_error(e.error.to_string()))
    }

    /// Reads a file [`RngStates::write`] wrote.
    pub fn read(path: &Path) -> Result<Self, RngError> {
        let file_error = |message: String| RngError::File {
            path: path.display().to_string(),
            message,
        };
        let bytes = std::fs::read(path).map_err(|e| file_error(e.to_string()))?;
        let tensors = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| file_error(e.to_string()))?;
        let get = |name: &str| -> Result<Option<Vec<u8>>, RngError> {
            match tensors.tensor(name) {
                Ok(view) if view.dtype() == safetensors::Dtype::U8 => Ok(Some(view.data().to_vec())),
                Ok(view) => Err(file_error(format!("{name} has dtype {:?}, expected U8", view.dtype()))),
                Err(safetensors::SafeTensorError::TensorNotFound(_)) => Ok(None),
                Err(e) => Err(file_error(format!("{name}: {e}"))),
            }
        };
        Ok(Self {
            cpu: get(CPU_KEY)?.ok_or_else(|| file_error(format!("no `{CPU_KEY}` state")))?,
            cuda: get(CUDA_KEY)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_round_trip_through_their_file_and_a_damaged_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rng-rank0.safetensors");
        let states = RngStates {
            cpu: get_state(Generator::Cpu).unwrap(),
            cuda: Some(vec![1, 2, 3, 4]),
        };
        states.write(&path).unwrap();
        assert_eq!(RngStates::read(&path).unwrap(), states);
        let err = set_state(Generator::Cpu, &[0u8; 10]).unwrap_err().to_string();
        assert!(err.starts_with("the CPU random generator: "), "{err}");
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
        let err = RngStates::read(&path).unwrap_err().to_string();
        assert!(err.starts_with(&path.display().to_string()), "{err}");
    }
}
