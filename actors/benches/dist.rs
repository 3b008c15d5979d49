//! `make bench` (multi-process part): figures for the c10d engine, each a ratio against a reference
//! measured in the same run (never a timed assertion).
//!
//! 1. Point-to-point through c10d (Gloo over loopback, two ranks) ÷ a raw loopback TCP socket moving
//!    the same bytes: bandwidth at 64 KiB, 1 MiB and 64 MiB, and the round-trip latency of 4 bytes.
//! 2. A pipelined step on 2 processes (vision + llm0 | llm1 + diffusion) ÷ the same step in one process:
//!    the cost of crossing a process (seconds per step from `steps.jsonl`, the first step left out).
//! 3. Data-parallel scaling at a fixed per-replica batch: 2 replicas of the whole pipeline (twice the
//!    global batch) ÷ 1 process, as samples per second. On a 2-core machine the replicas compete for
//!    the cores that one process had to itself, so expect ≈ 1×, not 2×.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use deem_actors::dist::{LaunchEnv, World};
use tch::{Device, Kind, Tensor};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn env(rank: i64, port: u16) -> LaunchEnv {
    let vars = [
        ("RANK", rank.to_string()),
        ("WORLD_SIZE", "2".to_string()),
        ("MASTER_ADDR", "127.0.0.1".to_string()),
        ("MASTER_PORT", port.to_string()),
    ];
    LaunchEnv::from_vars(|k| vars.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone()))
        .unwrap()
        .unwrap()
}

/// Seconds per ping-pong of `bytes` (rank 0 sends, rank 1 echoes) through c10d, over `reps`.
fn c10d_pingpong(bytes: usize, reps: usize) -> f64 {
    let port = free_port();
    let peer = std::thread::spawn(move || {
        let w = World::join(env(1, port), Duration::from_secs(60)).unwrap();
        let t = Tensor::zeros([bytes as i64], (Kind::Uint8, Device::Cpu));
        for _ in 0..reps + 1 {
            w.group.recv(&t, 0, 1).unwrap();
            w.group.send(&t, 0, 2).unwrap();
        }
    });
    let w = World::join(env(0, port), Duration::from_secs(60)).unwrap();
    let t = Tensor::ones([bytes as i64], (Kind::Uint8, Device::Cpu));
    let back = Tensor::zeros([bytes as i64], (Kind::Uint8, Device::Cpu));
    // One untimed round trip connects the pair.
    w.group.send(&t, 1, 1).unwrap();
    w.group.recv(&back, 1, 2).unwrap();
    let started = Instant::now();
    for _ in 0..reps {
        w.group.send(&t, 1, 1).unwrap();
        w.group.recv(&back, 1, 2).unwrap();
    }
    let s = started.elapsed().as_secs_f64() / reps as f64;
    peer.join().unwrap();
    s
}

/// The same ping-pong over one raw loopback TCP connection.
fn tcp_pingpong(bytes: usize, reps: usize) -> f64 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let peer = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_nodelay(true).unwrap();
        let mut buf = vec![0u8; bytes];
        for _ in 0..reps + 1 {
            s.read_exact(&mut buf).unwrap();
            s.write_all(&buf).unwrap();
        }
    });
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_nodelay(true).unwrap();
    let out = vec![1u8; bytes];
    let mut back = vec![0u8; bytes];
    s.write_all(&out).unwrap();
    s.read_exact(&mut back).unwrap();
    let started = Instant::now();
    for _ in 0..reps {
        s.write_all(&out).unwrap();
        s.read_exact(&mut back).unwrap();
    }
    let secs = started.elapsed().as_secs_f64() / reps as f64;
    peer.join().unwrap();
    secs
}

fn p2p() {
    println!(
        "1. point-to-point, Gloo over loopback ÷ a raw TCP socket (ping-pong, both directions)"
    );
    println!("   size        c10d GB/s   raw GB/s   c10d ÷ raw");
    for (label, bytes, reps) in [
        ("64 KiB", 64 << 10, 200),
        ("1 MiB", 1 << 20, 50),
        ("64 MiB", 64 << 20, 4),
    ] {
        let (c, r) = (c10d_pingpong(bytes, reps), tcp_pingpong(bytes, reps));
        let gbps = |s: f64| 2.0 * bytes as f64 / s / 1e9;
        println!(
            "   {label:<10}  {:>9.2}  {:>9.2}   {:>9.2}",
            gbps(c),
            gbps(r),
            gbps(c) / gbps(r)
        );
    }
    let (c, r) = (c10d_pingpong(4, 500), tcp_pingpong(4, 500));
    println!(
        "   latency (4 B round trip): c10d {:.1} µs, raw {:.1} µs, ratio {:.2}",
        c * 1e6,
        r * 1e6,
        c / r
    );
}

fn deem() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_deem"));
    c.current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap())
        .env("DEEM_LOG", "warn");
    c
}

/// Mean seconds per step after the first, from a run's steps.jsonl.
fn step_seconds(run: &Path) -> f64 {
    let s: Vec<f64> = std::fs::read_to_string(run.join("steps.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["seconds"].as_f64())
        .collect();
    s[1..].iter().sum::<f64>() / (s.len() - 1) as f64
}

fn run(args: &[&str], launch: Option<u32>, run: &Path) -> f64 {
    let mut c = deem();
    if let Some(n) = launch {
        c.args([
            "launch",
            "--nproc-per-node",
            &n.to_string(),
            "--master-port",
        ])
        .arg(free_port().to_string())
        .arg("--");
    }
    let out = c
        .args(["train", "--quiet", "--steps", "6", "--run-dir"])
        .arg(run)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    step_seconds(run)
}

fn main() {
    p2p();
    let dir = std::env::temp_dir().join(format!("deem-bench-dist-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let set = [
        "--set",
        "train.batch_size=8",
        "--set",
        "train.microbatches=4",
    ];
    let one = run(&set, None, &dir.join("one"));
    let two = run(
        &[&["--topology", "topologies/cpu-2proc.toml"][..], &set].concat(),
        Some(2),
        &dir.join("two"),
    );
    println!("2. pipelined step, 2 processes ÷ 1 process (batch 8, 4 microbatches, 1F1B)");
    println!(
        "   1 process {:.3} s/step, 2 processes {:.3} s/step: ratio {:.2}",
        one,
        two,
        two / one
    );
    // Fixed per-replica batch: 1 process runs batch 8; 2 replicas run 8 each (global 16).
    let topo = dir.join("dp2.toml");
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../topologies/cpu.toml"),
    )
    .unwrap()
    .replace(
        "name = \"cpu\"",
        "name = \"cpu-dp2-whole\"\ndata_parallel = 2",
    );
    std::fs::write(&topo, text).unwrap();
    let dp = run(
        &[
            "--topology",
            topo.to_str().unwrap(),
            "--set",
            "train.batch_size=16",
            "--set",
            "train.microbatches=8",
        ],
        Some(2),
        &dir.join("dp"),
    );
    let (sps1, sps2) = (8.0 / one, 16.0 / dp);
    println!("3. data parallel, 2 replicas × batch 8 ÷ 1 process × batch 8 (samples/s)");
    println!(
        "   1 process {sps1:.1} samples/s, 2 replicas {sps2:.1} samples/s: scaling {:.2}× (2 cores shared: ≈1× expected)",
        sps2 / sps1
    );
    let _ = std::fs::remove_dir_all(&dir);
}
