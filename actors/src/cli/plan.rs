//! `deem plan`: the planner's table (`pipeline::plan`) for a config on a topology — per actor its
//! parameters, the bytes of weights, gradients, optimizer state and activations at the schedule's peak,
//! its forward and backward seconds per microbatch — the predicted step time, each device's total
//! against its memory, and with `--balance` the layer split that evens the shards.

use anyhow::bail;

use super::PlanArgs;
use crate::pipeline::plan::{self, Costs, Plan};
use crate::runtime::topology::{human_bytes, text_table, Topology};

fn ms(s: f64) -> String {
    if s >= 1.0 {
        format!("{s:.2} s")
    } else {
        format!("{:.1} ms", s * 1e3)
    }
}

fn count(n: f64) -> String {
    match n {
        n if n >= 1e9 => format!("{:.2}B", n / 1e9),
        n if n >= 1e6 => format!("{:.1}M", n / 1e6),
        n if n >= 1e3 => format!("{:.1}K", n / 1e3),
        n => format!("{n}"),
    }
}

/// The plan as a table, one row per actor, then the step and the devices.
pub fn render(p: &Plan, topo: &Topology) -> String {
    let header = [
        "actor",
        "device",
        "layers",
        "params",
        "trainable",
        "weights",
        "grads",
        "optimizer",
        "activations",
        "total",
        "fwd/mb",
        "bwd/mb",
    ];
    let rows: Vec<Vec<String>> = p
        .actors
        .iter()
        .map(|a| {
            vec![
                a.name.clone(),
                a.device.clone(),
                a.layers
                    .as_ref()
                    .map_or("-".into(), |r| format!("[{}, {})", r.start, r.end)),
                count(a.params),
                count(a.trainable),
                human_bytes(a.weights_bytes as u64),
                human_bytes(a.grad_bytes as u64),
                human_bytes(a.optimizer_bytes as u64),
                format!(
                    "{} ({} × {})",
                    human_bytes(a.activation_bytes as u64),
                    a.in_flight,
                    human_bytes(a.activation_bytes_per_mb as u64)
                ),
                human_bytes(a.total_bytes as u64),
                ms(a.forward_s),
                ms(a.backward_s),
            ]
        })
        .collect();
    let mut out = text_table(&header, &rows, 3);
    out.push_str(&format!(
        "\nstep: {} predicted ({} forwards and backwards over the schedule + {} optimizer steps)\n",
        ms(p.step_s),
        ms(p.timeline_s),
        ms(p.step_s - p.timeline_s)
    ));
    out.push_str(&format!("costs: {}\n", p.costs_source));
    let mut per: std::collections::BTreeMap<&str, f64> = Default::default();
    for a in &p.actors {
        *per.entry(a.device.as_str()).or_default() += a.total_bytes;
    }
    for (d, b) in per {
        out.push_str(&format!("{d}: {}\n", human_bytes(b as u64)));
    }
    out.push_str(&format!(
        "topology {} [{}], {} replica(s)\n",
        topo.name, topo.origin, topo.data_parallel
    ));
    out
}

/// Microbatches of `tokens`-long rows with `images` images each (all drawn by NIP too), as many rows as
/// the configuration's microbatch.
pub fn rows_of(c: &deem::config::DeemConfig, tokens: i64, images: i64) -> deem::cost::Shape {
    deem::cost::Shape {
        rows: (c.train.batch_size / c.train.microbatches.max(1)) as i64,
        tokens,
        images,
        nip_images: images,
    }
}

/// `deem::cost`'s estimate at `tflops` TFLOP/s; the optimizer state streams at about 2 TB/s (a GPU's
/// HBM).
pub fn estimate(c: &deem::config::DeemConfig, shape: deem::cost::Shape, tflops: f64) -> Costs {
    Costs::estimate(c, shape, tflops, 2e12)
}

/// The memory of a device named like `cuda:0`, from `--device-memory-gib` or the device itself;
/// `None` for the CPU (not checked).
pub fn capacity(device: &str, override_gib: Option<f64>) -> Option<u64> {
    let d: deem::DeviceSpec = device.parse().ok()?;
    if !matches!(d, deem::DeviceSpec::Cuda(_)) {
        return None;
    }
    match override_gib {
        Some(g) => Some((g * (1u64 << 30) as f64) as u64),
        None => crate::runtime::topology::device_memory(&d),
    }
}

pub fn run(a: PlanArgs) -> anyhow::Result<()> {
    let cfg = a.config.load()?;
    let c = &cfg.config;
    let cuda = a
        .assume_cuda_devices
        .unwrap_or_else(deem::device::cuda_device_count);
    let mut topo = a.topology.load(&cfg, cuda)?;
    let costs = match &a.costs {
        Some(p) => Costs::load(p)?,
        None => {
            if a.tflops <= 0.0 {
                bail!("--tflops must be > 0, got {}", a.tflops);
            }
            let shape = if a.synthetic {
                deem::data::batches::SyntheticBatches::new(c, 0).shape()
            } else {
                rows_of(
                    c,
                    a.tokens.unwrap_or(c.llm.max_position_embeddings),
                    a.images,
                )
            };
            estimate(c, shape, a.tflops)
        }
    };
    if a.balance {
        let before = plan::plan(c, &topo, &costs).step_s;
        let balanced = plan::balance(c, &topo, &costs);
        let after = plan::plan(c, &balanced, &costs).step_s;
        if after < before {
            topo = balanced;
            println!(
                "balanced: the LLM shards' layers moved to even their predicted times (step {} → {}):",
                ms(before),
                ms(after)
            );
            for s in topo.actors.iter().filter(|s| s.layers.is_some()) {
                let r = s.layers.clone().unwrap_or(0..0);
                println!("  {}: layers = [{}, {}]", s.name, r.start, r.end);
            }
        } else {
            println!(
                "balanced: the topology's split is already as fast as any ({} per step)",
                ms(before)
            );
        }
        println!();
    }
    let p = plan::plan(c, &topo, &costs);
    print!("{}", render(&p, &topo));
    let flops = deem::cost::step_flops(c, costs.shape());
    println!(
        "model FLOPs per step: {:.4} TFLOP ({} rows × {} tokens and {} images per microbatch)",
        flops / 1e12,
        costs.rows,
        costs.tokens,
        costs.images
    );
    plan::check_fits(&p, &|d| capacity(d, a.device_memory_gib))?;
    println!("ok: the placement fits the devices whose memory is known");
    Ok(())
}
