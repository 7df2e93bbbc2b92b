//! `worker info`: libtorch, CUDA, NCCL (and the libraries it loads) and the CPU's bfloat16
//! support as this worker sees them;
//! with `--bench`, this machine's matmul peak in fp32 and bf16 and the optimizer step's memory
//! bandwidth against a copy of the same bytes.

use crate::autocast::{CpuBf16, Precision};
use crate::cli::InfoCommand;
use crate::device::DeviceInfo;
use crate::error::WorkerError;
use crate::optim::adamw::measure_bandwidth;
use crate::train::mfu::measure_peak;
use serde_json::json;
use std::time::Duration;
use tch::Device;

/// Parameters of the optimizer bandwidth measurement: far larger than any cache.
const BENCH_PARAMETERS: i64 = 25_000_000;

pub fn run(command: &InfoCommand) -> Result<(), WorkerError> {
    let info = DeviceInfo::probe();
    let cpu = CpuBf16::probe();
    let bench = command.bench.then(bench);
    if command.json {
        let mut value = serde_json::to_value(&info)?;
        value["cpu_bf16"] = serde_json::to_value(cpu)?;
        value["threads"] = json!(tch::get_num_threads());
        if let Some(b) = &bench {
            value["bench"] = b.clone();
        }
        println!("{value}");
        return Ok(());
    }
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
    println!(
        "cpu bf16: {} (avx512_bf16 {}, amx_bf16 {}); {} threads",
        if cpu.supported() { "yes" } else { "no" },
        cpu.avx512_bf16,
        cpu.amx_bf16,
        tch::get_num_threads()
    );
    if let Some(b) = bench {
        println!(
            "cpu matmul peak: fp32 {:.1} GFLOP/s, bf16 {}",
            b["cpu_fp32_gflops"].as_f64().unwrap_or_default(),
            b["cpu_bf16_gflops"]
                .as_f64()
                .map_or_else(|| "- (no bf16)".to_string(), |g| format!("{g:.1} GFLOP/s"))
        );
        if let Some(g) = b["cuda_bf16_gflops"].as_f64() {
            println!(
                "cuda:0 matmul peak: fp32 {:.1} GFLOP/s, bf16 {g:.1} GFLOP/s",
                b["cuda_fp32_gflops"].as_f64().unwrap_or_default()
            );
        }
        println!(
            "adamw step over {} M parameters: {:.1} GB/s; copy of the same bytes {:.1} GB/s ({:.0} %)",
            BENCH_PARAMETERS / 1_000_000,
            b["adamw_gb_per_s"].as_f64().unwrap_or_default(),
            b["memcpy_gb_per_s"].as_f64().unwrap_or_default(),
            b["adamw_vs_memcpy"].as_f64().unwrap_or_default() * 100.0
        );
    }
    Ok(())
}

/// The measurements of `--bench` (GFLOP/s of square matmuls, GB/s read+written).
fn bench() -> serde_json::Value {
    let budget = Duration::from_millis(1500);
    let gflops = |p, d| measure_peak(p, d, budget) / 1e9;
    let mut out = json!({ "cpu_fp32_gflops": gflops(Precision::Fp32, Device::Cpu) });
    if CpuBf16::probe().supported() {
        out["cpu_bf16_gflops"] = json!(gflops(Precision::Bf16, Device::Cpu));
    }
    if tch::Cuda::is_available() {
        out["cuda_fp32_gflops"] = json!(gflops(Precision::Fp32, Device::Cuda(0)));
        out["cuda_bf16_gflops"] = json!(gflops(Precision::Bf16, Device::Cuda(0)));
    }
    let b = measure_bandwidth(BENCH_PARAMETERS, 3);
    out["adamw_gb_per_s"] = json!(b.adamw_bytes_per_s / 1e9);
    out["memcpy_gb_per_s"] = json!(b.memcpy_bytes_per_s / 1e9);
    out["adamw_vs_memcpy"] = json!(b.adamw_bytes_per_s / b.memcpy_bytes_per_s);
    out
}
