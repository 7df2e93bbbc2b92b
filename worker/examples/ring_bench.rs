//! Benchmark (not a test): reduce-scatter + all-gather of N fp32 values (default 110 M, the
//! size of ELECTRA-base's gradients) across 2 processes over the TCP ring on loopback, with bus
//! bandwidth (NCCL's definition) reported next to `memcpy` bandwidth measured in the same run.
//!
//!     cargo run --release --example ring_bench -- [ELEMENTS] [WORLD]

use kormlm_worker::comm::ring::{self, Ring};
use kormlm_worker::comm::ring_handshake::RingSecret;
use std::time::{Duration, Instant};

fn child(rank: usize, world: usize, elements: usize, dir: &std::path::Path) {
    let (listener, address) = ring::listen([127, 0, 0, 1].into()).unwrap();
    let secret = RingSecret::new(&std::fs::read(dir.join("secret")).unwrap()).unwrap();
    std::fs::write(dir.join(format!("{rank}.tmp")), &address).unwrap();
    std::fs::rename(dir.join(format!("{rank}.tmp")), dir.join(format!("{rank}.addr"))).unwrap();
    let addresses: Vec<String> = (0..world)
        .map(|r| loop {
            if let Ok(a) = std::fs::read_to_string(dir.join(format!("{r}.addr"))) {
                break a;
            }
            std::thread::sleep(Duration::from_millis(10));
        })
        .collect();
    let mut ring = Ring::connect(listener, rank, &addresses, &secret, Duration::from_secs(120)).unwrap();
    let mut data = vec![1.0f32 + rank as f32; elements];
    // Warm-up round (page faults, TCP windows).
    ring.reduce_scatter_f32(&mut data).unwrap();
    ring.all_gather_f32(&mut data).unwrap();
    let started = Instant::now();
    ring.reduce_scatter_f32(&mut data).unwrap();
    let rs = started.elapsed();
    let started = Instant::now();
    ring.all_gather_f32(&mut data).unwrap();
    let ag = started.elapsed();
    if rank == 0 {
        let bytes = (elements * 4) as f64;
        let factor = (world - 1) as f64 / world as f64;
        let busbw = |t: Duration| bytes / t.as_secs_f64() * factor / 1e9;
        let mut src = vec![1.0f32; elements];
        let mut dst = vec![0.0f32; elements];
        dst.copy_from_slice(&src);
        src[0] = 2.0;
        let started = Instant::now();
        dst.copy_from_slice(&src);
        let memcpy = bytes / started.elapsed().as_secs_f64() / 1e9;
        println!("elements {elements} ({:.0} MB), world {world}", bytes / 1e6);
        println!(
            "reduce-scatter: {:.3} s, bus bandwidth {:.2} GB/s",
            rs.as_secs_f64(),
            busbw(rs)
        );
        println!(
            "all-gather:     {:.3} s, bus bandwidth {:.2} GB/s",
            ag.as_secs_f64(),
            busbw(ag)
        );
        println!("memcpy:         {memcpy:.2} GB/s (same process, same run)");
        println!(
            "bus bandwidth / memcpy: reduce-scatter {:.2}, all-gather {:.2}",
            busbw(rs) / memcpy,
            busbw(ag) / memcpy
        );
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--child") {
        let rank = args[2].parse().unwrap();
        let world = args[3].parse().unwrap();
        let elements = args[4].parse().unwrap();
        child(rank, world, elements, std::path::Path::new(&args[5]));
        return;
    }
    let elements: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(110_000_000);
    let world: usize = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(2);
    let elements = elements / world * world;
    let dir = std::env::temp_dir().join(format!("kormlm-ring-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // The ring's handshake needs a shared secret; the coordinator would hand one out.
    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret).unwrap();
    std::fs::write(dir.join("secret"), secret).unwrap();
    let me = std::env::current_exe().unwrap();
    let children: Vec<_> = (0..world)
        .map(|rank| {
            std::process::Command::new(&me)
                .args(["--child", &rank.to_string(), &world.to_string(), &elements.to_string()])
                .arg(&dir)
                .spawn()
                .unwrap()
        })
        .collect();
    for mut c in children {
        assert!(c.wait().unwrap().success());
    }
    let _ = std::fs::remove_dir_all(&dir);
}
