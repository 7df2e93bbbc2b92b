//! `worker info`: libtorch, CUDA and NCCL as this worker sees them.

use crate::cli::InfoCommand;
use crate::device::DeviceInfo;
use crate::error::WorkerError;

pub fn run(command: &InfoCommand) -> Result<(), WorkerError> {
    let info = DeviceInfo::probe();
    if command.json {
        println!("{}", serde_json::to_string(&info)?);
    } else {
        println!("torch {}", info.torch_version);
        println!(
            "cuda available: {} ({} device(s))",
            info.cuda_available, info.cuda_device_count
        );
        match (info.nccl_version, &info.nccl_path, &info.cudart_path) {
            (Some(v), Some(nccl), Some(cudart)) => {
                println!(
                    "nccl {}.{}.{} ({})",
                    v / 10000,
                    (v / 100) % 100,
                    v % 100,
                    nccl.display()
                );
                println!("cuda runtime {}", cudart.display());
            }
            _ => println!("nccl not usable"),
        }
        if let Some(error) = &info.cuda_libraries_error {
            println!("  {error}");
        }
    }
    Ok(())
}
