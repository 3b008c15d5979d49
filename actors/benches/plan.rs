//! `make bench`: the planner against the pipeline it plans, in the same run. `deem bench layers`'
//! measurement of each part (one microbatch at a time) feeds `pipeline::plan`; then the tiny config
//! trains on the embedded CPU topology under GPipe and 1F1B with m = 1, 4 and 8 (batch 8), and each
//! prints predicted ÷ measured for
//!
//! - the step time (median of 3 steps after a warm-up), and
//! - the memory a step adds: the process's peak resident bytes during a step (VmHWM, reset through
//!   `/proc/self/clear_refs` before it) less the resident bytes before it, against the planned
//!   activations at each actor's peak (f32: the gradients exist from the warm-up step on). Every actor
//!   runs in this process, so their peaks add up.
//!
//! The goal is within 20% (0.8–1.2). Every allocation of 4 KiB or more is its own mapping here
//! (`exact_resident_accounting`), so resident memory follows the live tensors.

mod common;

use std::time::Instant;

use common::tiny;

use deem::config::{DeemConfig, PipelineSchedule};
use deem::data::batches::SyntheticBatches;
use deem_actors::pipeline::costs::{exact_resident_accounting, measure, resident_bytes};
use deem_actors::pipeline::plan;
use deem_actors::pipeline::PipelineTrainer;
use deem_actors::runtime::topology::Topology;

fn peak_resident() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

fn reset_peak() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// (median step seconds, bytes a step added at its peak)
fn measured(rt: &tokio::runtime::Runtime, c: &DeemConfig, topo: &Topology) -> (f64, f64) {
    rt.block_on(async {
        let mut p = PipelineTrainer::start(c, topo).await.unwrap();
        let data = SyntheticBatches::new(c, 1);
        p.step(&data.batch(0)).await.unwrap();
        let mut times = Vec::new();
        let mut growth = Vec::new();
        for i in 1..4 {
            let before = resident_bytes();
            reset_peak();
            let t = Instant::now();
            p.step(&data.batch(i)).await.unwrap();
            times.push(t.elapsed().as_secs_f64());
            growth.push(peak_resident().saturating_sub(before) as f64);
        }
        p.stop().await;
        times.sort_by(f64::total_cmp);
        growth.sort_by(f64::total_cmp);
        (times[1], growth[1])
    })
}

fn main() {
    exact_resident_accounting();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    println!("planner vs pipeline (tiny DEEM, cpu topology, batch 8; predicted ÷ measured)");
    println!(
        "{:<6} {:>2}  {:>10} {:>10} {:>6}   {:>10} {:>10} {:>6}",
        "sched", "m", "step pred", "measured", "ratio", "mem pred", "measured", "ratio"
    );
    for schedule in [PipelineSchedule::Gpipe, PipelineSchedule::OneFOneB] {
        for m in [1u64, 4, 8] {
            let c = tiny(schedule, m);
            let topo = Topology::parse(
                deem_actors::runtime::topology::EMBEDDED_CPU,
                "cpu.toml",
                &c,
                0,
            )
            .unwrap();
            // Measured with the threads the pipeline gives each CPU actor.
            let threads = topo.cpu_threads(&topo.actors[0]).unwrap_or(1);
            tch::set_num_threads(threads);
            let costs = measure(&c, tch::Device::Cpu, 3).unwrap();
            let p = plan::plan(&c, &topo, &costs);
            let mem: f64 = p.actors.iter().map(|a| a.activation_bytes).sum();
            let (secs, bytes) = measured(&rt, &c, &topo);
            println!(
                "{:<6} {:>2}  {:>8.1}ms {:>8.1}ms {:>6.2}   {:>8.1}MB {:>8.1}MB {:>6.2}",
                format!("{schedule:?}").to_lowercase(),
                m,
                p.step_s * 1e3,
                secs * 1e3,
                p.step_s / secs,
                mem / 1e6,
                bytes / 1e6,
                mem / bytes.max(1.0)
            );
        }
    }
}
