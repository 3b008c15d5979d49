//! `make bench`: figures for the actor pipeline, each a ratio against a reference measured in the same
//! run (never a timed assertion).
//!
//! 1. Runtime overhead: the pipelined trainer with every actor on the CPU ÷ the single-process reference
//!    trainer, same config, data and microbatches (goal ≤ 1.03).
//! 2. Pipeline efficiency: measured step time ÷ the schedule's ideal from the measured per-stage work.
//!    With every actor on one device the stages share its cores, so the ideal is the stages' summed busy
//!    time; the bubble formula's ideal for one device per stage is printed beside it.
//! 3. Activation hop latency and throughput between two compute threads over a bounded flume channel.

mod common;

use std::time::Instant;

use common::tiny;

use deem::config::{DeemConfig, PipelineSchedule};
use deem::data::batches::SyntheticBatches;
use deem::train::Trainer;
use deem_actors::pipeline::schedule::bubble_fraction;
use deem_actors::pipeline::PipelineTrainer;
use deem_actors::runtime::topology::Topology;
use tch::{Device, Kind, Tensor};

const WARMUP: u64 = 1;
const STEPS: u64 = 4;

fn reference_seconds(c: &DeemConfig) -> f64 {
    // The reference uses every core (a pipeline run may have lowered this thread's setting).
    tch::set_num_threads(std::thread::available_parallelism().map_or(2, |n| n.get() as i32));
    let mut t = Trainer::new(c, Device::Cpu).unwrap();
    let data = SyntheticBatches::new(c, 1);
    for i in 0..WARMUP {
        t.step(&data.batch(i)).unwrap();
    }
    let started = Instant::now();
    for i in WARMUP..WARMUP + STEPS {
        t.step(&data.batch(i)).unwrap();
    }
    started.elapsed().as_secs_f64() / STEPS as f64
}

/// (seconds per step, summed stage busy seconds per step, largest stage busy seconds per step)
fn pipelined_seconds(rt: &tokio::runtime::Runtime, c: &DeemConfig) -> (f64, f64, f64) {
    let topo = Topology::parse(
        deem_actors::runtime::topology::EMBEDDED_CPU,
        "cpu.toml",
        c,
        0,
    )
    .unwrap();
    rt.block_on(async {
        let mut p = PipelineTrainer::start(c, &topo).await.unwrap();
        let data = SyntheticBatches::new(c, 1);
        for i in 0..WARMUP {
            p.step(&data.batch(i)).await.unwrap();
        }
        let (mut busy_sum, mut busy_max) = (0.0, 0.0);
        let started = Instant::now();
        for i in WARMUP..WARMUP + STEPS {
            p.step(&data.batch(i)).await.unwrap();
            let t = p.last_timing.clone().unwrap();
            busy_sum += t.busy_seconds.iter().sum::<f64>();
            busy_max += t.busy_seconds.iter().cloned().fold(0.0, f64::max);
        }
        let secs = started.elapsed().as_secs_f64() / STEPS as f64;
        p.stop().await;
        (secs, busy_sum / STEPS as f64, busy_max / STEPS as f64)
    })
}

fn hop(shape: &[i64], rounds: usize) -> (f64, f64) {
    let (tx, rx) = flume::bounded::<Tensor>(1);
    let (back_tx, back_rx) = flume::bounded::<Tensor>(1);
    let echo = std::thread::spawn(move || {
        while let Ok(t) = rx.recv() {
            if back_tx.send(t).is_err() {
                break;
            }
        }
    });
    let t = Tensor::ones(shape, (Kind::Float, Device::Cpu));
    let bytes = (t.numel() * 4) as f64;
    let started = Instant::now();
    for _ in 0..rounds {
        tx.send(t.shallow_clone()).unwrap();
        let _echoed = back_rx.recv().unwrap();
    }
    let per_hop = started.elapsed().as_secs_f64() / (2 * rounds) as f64;
    drop(tx);
    echo.join().unwrap();
    (per_hop, bytes / per_hop)
}

fn main() {
    tch::set_num_threads(std::thread::available_parallelism().map_or(2, |n| n.get() as i32));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    println!("deem pipeline benchmarks (tiny config, stage I, batch 8, {STEPS} timed steps after {WARMUP} warm-up; CPU, {} cores)", std::thread::available_parallelism().map_or(0, |n| n.get()));

    println!("\n1. runtime overhead: pipelined (4 actors, all on cpu) / single-process reference, same work");
    for schedule in [PipelineSchedule::Gpipe, PipelineSchedule::OneFOneB] {
        let c = tiny(schedule, 4);
        let reference = reference_seconds(&c);
        let (piped, _, _) = pipelined_seconds(&rt, &c);
        println!(
            "   {schedule:?} m=4: reference {:.1} ms/step, pipelined {:.1} ms/step, ratio {:.3}",
            reference * 1e3,
            piped * 1e3,
            piped / reference
        );
    }

    println!("\n2. pipeline efficiency: measured step time / ideal from measured per-stage busy time (p = 4 stages)");
    for schedule in [PipelineSchedule::Gpipe, PipelineSchedule::OneFOneB] {
        for m in [1u64, 4, 8] {
            let c = tiny(schedule, m);
            let (piped, busy_sum, busy_max) = pipelined_seconds(&rt, &c);
            // One device per stage: the slowest stage's per-microbatch work, stretched by the bubble.
            let per_device_ideal = busy_max / (1.0 - bubble_fraction(4, m as u32));
            println!(
                "   {schedule:?} m={m}: {:.1} ms/step; shared-device ideal (Σ busy) {:.1} ms → ratio {:.3}; \
                 one-device-per-stage ideal (bubble formula) {:.1} ms",
                piped * 1e3,
                busy_sum * 1e3,
                piped / busy_sum,
                per_device_ideal * 1e3
            );
        }
    }

    println!(
        "\n3. activation hop between compute threads (bounded flume channel, same device: no copy)"
    );
    for (name, shape) in [
        ("tiny hidden [1, 166, 64]", vec![1i64, 166, 64]),
        ("7B hidden [1, 2048, 4096]", vec![1, 2048, 4096]),
    ] {
        let (lat, bps) = hop(&shape, 2000);
        println!(
            "   {name}: {:.2} µs per hop, {:.1} GB/s effective",
            lat * 1e6,
            bps / 1e9
        );
    }
}
