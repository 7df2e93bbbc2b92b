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
        match info.nccl_version {
            Some(v) => println!("nccl {}.{}.{}", v / 10000, (v / 100) % 100, v % 100),
            None => println!("nccl not loadable"),
        }
    }
    Ok(())
}
