//! The placement planner, after Megatron-LM's memory accounting and a GPipe/1F1B timeline: for a
//! configuration, a topology and a schedule, per actor the bytes of its parameters, gradients and
//! optimizer state (exact, from the parameter counts and the stage rules), of the activations of the
//! microbatches its schedule keeps in flight (per microbatch from a cost file measured by
//! `deem bench layers`, or estimated by `deem::cost`), and its forward and backward seconds; the step
//! time is the schedule's timeline over the actors plus their optimizer steps. `--balance` moves LLM
//! layers between shards to even the shards' predicted times. A placement that does not fit a device
//! is refused before any actor starts.

use std::path::Path;

use deem::config::{DeemConfig, Recompute, Stage};
use deem::cost::{PartCost, Shape};
use deem::params;
use serde::{Deserialize, Serialize};

use super::error::PipelineError;
use super::schedule::{self, Op};
use crate::runtime::topology::{human_bytes, Component, Placement, Topology};

/// One part's cost per microbatch on a device.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Piece {
    pub forward_s: f64,
    pub backward_s: f64,
    /// Bytes one microbatch's forward keeps until its backward.
    pub activation_bytes: f64,
    /// Seconds of an AdamW step over the part's trainable parameters.
    pub optimizer_s: f64,
}

/// Per-microbatch costs of the parts a stage is made of: what `deem bench layers` writes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Costs {
    /// `measured on cpu …` or `estimated at N TFLOP/s`.
    pub source: String,
    pub rows: i64,
    pub tokens: i64,
    pub images: i64,
    pub nip_images: i64,
    pub vision: Piece,
    /// The first shard's embedding and image splicing.
    pub llm_embed: Piece,
    /// One decoder layer.
    pub llm_layer: Piece,
    /// The last shard's norm, heads and NTP loss.
    pub llm_head: Piece,
    pub diffusion: Piece,
}

impl Costs {
    pub fn shape(&self) -> Shape {
        Shape {
            rows: self.rows,
            tokens: self.tokens,
            images: self.images,
            nip_images: self.nip_images,
        }
    }

    /// Estimated from `deem::cost`'s FLOPs at `tflops` TFLOP/s and its activation bytes; the optimizer
    /// step reads and writes about 16 bytes of state per trainable parameter at `bandwidth` bytes/s.
    pub fn estimate(cfg: &DeemConfig, shape: Shape, tflops: f64, bandwidth: f64) -> Self {
        let rate = tflops * 1e12;
        let piece = |c: PartCost, trainable: f64| Piece {
            forward_s: c.forward_flops / rate,
            backward_s: c.backward_flops / rate,
            activation_bytes: c.activation_bytes,
            optimizer_s: trainable * 16.0 * 3.0 / bandwidth,
        };
        let l = &cfg.llm;
        let layer_trainable = if llm_trains(cfg) {
            params::llm_layer(l) as f64
        } else {
            0.0
        };
        let (embed_t, _) = shard_params(cfg, 0..1);
        let (head_t, _) = shard_params(cfg, l.num_hidden_layers - 1..l.num_hidden_layers);
        Costs {
            source: format!("estimated at {tflops} TFLOP/s (deem::cost)"),
            rows: shape.rows,
            tokens: shape.tokens,
            images: shape.images,
            nip_images: shape.nip_images,
            vision: piece(deem::cost::vision(cfg, shape), vision_params(cfg).0),
            llm_embed: piece(deem::cost::llm_embed(cfg, shape), embed_t - layer_trainable),
            llm_layer: piece(deem::cost::llm_layer(cfg, shape), layer_trainable),
            llm_head: piece(deem::cost::llm_head(cfg, shape), head_t - layer_trainable),
            diffusion: piece(deem::cost::diffusion(cfg, shape), diffusion_params(cfg).0),
        }
    }

    pub fn load(path: &Path) -> Result<Self, PipelineError> {
        let text = std::fs::read_to_string(path).map_err(PipelineError::io(path))?;
        serde_json::from_str(&text).map_err(|e| {
            PipelineError::checkpoint(
                path,
                format!("not a deem cost file (deem bench layers): {e}"),
            )
        })
    }

    pub fn save(&self, path: &Path) -> Result<(), PipelineError> {
        let text = serde_json::to_string_pretty(self)
            .map_err(|e| PipelineError::checkpoint(path, e.to_string()))?;
        std::fs::write(path, text + "\n").map_err(PipelineError::io(path))
    }
}

fn llm_trains(cfg: &DeemConfig) -> bool {
    cfg.train.stage != Stage::I || cfg.train.train_llm_in_stage_one
}

/// (trainable, all) parameters of the vision actor under the stage rules: the trunk and its head train
/// in stage I only; the adapters, resampler and mask extractor always.
fn vision_params(cfg: &DeemConfig) -> (f64, f64) {
    let v = &cfg.vision;
    let l = &cfg.llm;
    let all = params::vision(v)
        + params::resampler(
            &cfg.resampler,
            l.hidden_size,
            cfg.diffusion.unet.cross_attention_dim,
        )
        + params::mask_extractor(v);
    let adapters: i64 = v
        .dims
        .iter()
        .map(|&d| (d + 1) * v.adapter_width)
        .sum::<i64>()
        + (v.embed_dim + 1) * v.adapter_width;
    let frozen = if cfg.train.stage == Stage::I {
        0
    } else {
        params::vision(v) - adapters
    };
    ((all - frozen) as f64, all as f64)
}

/// (trainable, all) of an LLM shard: DEEM's new rows, head and SoI vector always train; the base
/// weights when the LLM trains, the original head only with `train.train_lm_head`.
fn shard_params(cfg: &DeemConfig, layers: std::ops::Range<i64>) -> (f64, f64) {
    let l = &cfg.llm;
    let all = params::llm_shard(l, layers.start, layers.end);
    let (h, n) = (l.hidden_size, l.num_new_tokens);
    let mut new = 0;
    if layers.start == 0 {
        new += n * h + h;
    }
    let last = layers.end == l.num_hidden_layers;
    if last {
        new += n * h;
    }
    let base = all - new;
    let head = if last && !l.tie_word_embeddings {
        l.vocab_size * h
    } else {
        0
    };
    let trainable = new
        + if llm_trains(cfg) {
            base - if cfg.train.train_lm_head { 0 } else { head }
        } else {
            0
        };
    (trainable as f64, all as f64)
}

/// (trainable, all) of the diffusion actor: the NIP condition trains, the UNet and VAE are frozen.
fn diffusion_params(cfg: &DeemConfig) -> (f64, f64) {
    let d = &cfg.diffusion;
    let cond = params::condition(&d.condition, cfg.llm.hidden_size);
    let all = params::unet(&d.unet) + params::vae(&d.vae) + cond;
    (cond as f64, all as f64)
}

/// What one actor holds and spends.
#[derive(Debug, Clone, PartialEq)]
pub struct ActorPlan {
    pub name: String,
    pub device: String,
    pub rank: u32,
    pub layers: Option<std::ops::Range<i64>>,
    pub params: f64,
    pub trainable: f64,
    pub weights_bytes: f64,
    /// The variables' gradients, plus their fp32 sums in mixed precision.
    pub grad_bytes: f64,
    /// AdamW's two fp32 moments, plus the fp32 masters in mixed precision.
    pub optimizer_bytes: f64,
    /// Per microbatch, and at the schedule's peak.
    pub activation_bytes_per_mb: f64,
    pub in_flight: u32,
    pub activation_bytes: f64,
    pub total_bytes: f64,
    /// One microbatch's forward and backward (recomputation included).
    pub forward_s: f64,
    pub backward_s: f64,
    pub optimizer_s: f64,
}

/// A planned training step.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub actors: Vec<ActorPlan>,
    /// The schedule's timeline (forwards and backwards over the actors, or the busiest device's summed
    /// work when actors share a device) and the optimizer steps.
    pub step_s: f64,
    pub timeline_s: f64,
    pub costs_source: String,
}

/// Bytes of the microbatch a stage received and keeps under recomputation: hidden states for shards,
/// the NIP contexts and CSR conditions for diffusion; vision reads the batch itself.
fn received_bytes(cfg: &DeemConfig, component: Component, s: Shape) -> f64 {
    let d = cfg.model.dtype.size_bytes() as f64;
    match component {
        Component::Vision => 0.0,
        Component::Llm => (s.rows * s.tokens * cfg.llm.hidden_size) as f64 * d,
        Component::Diffusion => {
            let csr = (s.rows * s.images * cfg.resampler.num_query_tokens) as f64
                * cfg.diffusion.unet.cross_attention_dim as f64;
            ((s.rows * s.tokens * cfg.llm.hidden_size) as f64 + csr) * d
        }
    }
}

/// The parts a placement is made of, with how many of each.
fn pieces(cfg: &DeemConfig, a: &Placement, c: &Costs) -> Piece {
    let sum = |ps: &[(f64, &Piece)]| {
        ps.iter().fold(Piece::default(), |acc, (k, p)| Piece {
            forward_s: acc.forward_s + k * p.forward_s,
            backward_s: acc.backward_s + k * p.backward_s,
            activation_bytes: acc.activation_bytes + k * p.activation_bytes,
            optimizer_s: acc.optimizer_s + k * p.optimizer_s,
        })
    };
    match a.component {
        Component::Vision => c.vision,
        Component::Diffusion => c.diffusion,
        Component::Llm => {
            let r = a.layers.clone().unwrap_or(0..cfg.llm.num_hidden_layers);
            let first = if r.start == 0 { 1.0 } else { 0.0 };
            let last = if r.end == cfg.llm.num_hidden_layers {
                1.0
            } else {
                0.0
            };
            sum(&[
                ((r.end - r.start) as f64, &c.llm_layer),
                (first, &c.llm_embed),
                (last, &c.llm_head),
            ])
        }
    }
}

/// The plan of training `cfg` on `topo` with per-microbatch `costs`.
pub fn plan(cfg: &DeemConfig, topo: &Topology, costs: &Costs) -> Plan {
    let order = topo.pipeline_order();
    let m = if topo.data_parallel > 0 {
        (cfg.train.microbatches / topo.data_parallel as u64).max(1)
    } else {
        cfg.train.microbatches
    } as u32;
    let sched = schedule::build(cfg.train.schedule, order.len(), m);
    let d = cfg.model.dtype.size_bytes() as f64;
    let mixed = d < 4.0;
    let shape = costs.shape();
    // Costs measured at another microbatch size scale with the rows.
    let scale = (cfg.train.batch_size / cfg.train.microbatches.max(1)) as f64 / costs.rows as f64;
    let actors: Vec<ActorPlan> = order
        .iter()
        .zip(&sched)
        .map(|(a, ops)| {
            let (trainable, all) = match a.component {
                Component::Vision => vision_params(cfg),
                Component::Diffusion => diffusion_params(cfg),
                Component::Llm => shard_params(
                    cfg,
                    a.layers.clone().unwrap_or(0..cfg.llm.num_hidden_layers),
                ),
            };
            let p = pieces(cfg, a, costs);
            let act = p.activation_bytes * scale;
            let in_flight = schedule::max_in_flight(ops);
            let received = received_bytes(cfg, a.component, shape) * scale;
            let shard_layers = a.layers.as_ref().map_or(0, |r| (r.end - r.start) as usize);
            let (activations, extra_fwd) = match cfg.train.recompute {
                Recompute::None => (act * in_flight as f64, 0.0),
                Recompute::Full => (received * in_flight as f64 + act, p.forward_s),
                Recompute::Layers(_) => {
                    let k = cfg.train.recompute.layers_of(shard_layers) as f64;
                    let seg = k * costs.llm_layer.activation_bytes * scale;
                    let input = if k > 0.0 { received } else { 0.0 };
                    (
                        (act - seg + input) * in_flight as f64 + seg,
                        k * costs.llm_layer.forward_s,
                    )
                }
            };
            let weights = all * d;
            let grads = trainable * d + if mixed { trainable * 4.0 } else { 0.0 };
            let optimizer = trainable * if mixed { 12.0 } else { 8.0 };
            ActorPlan {
                name: a.name.clone(),
                device: a.device.to_string(),
                rank: a.rank,
                layers: a.layers.clone(),
                params: all,
                trainable,
                weights_bytes: weights,
                grad_bytes: grads,
                optimizer_bytes: optimizer,
                activation_bytes_per_mb: act,
                in_flight,
                activation_bytes: activations,
                total_bytes: weights + grads + optimizer + activations,
                forward_s: p.forward_s * scale,
                backward_s: (p.backward_s + extra_fwd) * scale,
                optimizer_s: p.optimizer_s,
            }
        })
        .collect();
    // Actors sharing a device share its compute: a GPU runs one at a time; the CPU's cores are split
    // between its actors (`Topology::cpu_threads`), so as many run side by side as the cores allow.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let lanes: Vec<usize> = order
        .iter()
        .map(|placed| {
            topo.cpu_threads(placed)
                .map_or(1, |t| (cores / t.max(1) as usize).max(1))
        })
        .collect();
    let timeline = timeline_on(&actors, &sched, &lanes);
    let optimizer: f64 = actors.iter().map(|a| a.optimizer_s).sum();
    Plan {
        actors,
        step_s: timeline + optimizer,
        timeline_s: timeline,
        costs_source: costs.source.clone(),
    }
}

/// The makespan of one step's forwards and backwards, one device per actor: see [`timeline_on`].
pub fn timeline(actors: &[ActorPlan], sched: &[Vec<Op>]) -> f64 {
    timeline_on(actors, sched, &vec![1; actors.len()])
}

/// The makespan of one step's forwards and backwards: each actor runs its ops in order; a forward waits
/// for its microbatch's forward upstream (diffusion: also the vision actor's, the CSR edge), a backward
/// for the gradient from downstream (vision: also diffusion's). Actors on one device share its
/// `lanes[i]` lanes (at most that many of them compute at once); the op that can start first goes
/// first.
pub fn timeline_on(actors: &[ActorPlan], sched: &[Vec<Op>], lanes: &[usize]) -> f64 {
    let p = actors.len();
    let m = sched.first().map_or(0, |ops| ops.len() / 2);
    let mut fwd_done = vec![vec![f64::NAN; m]; p];
    let mut bwd_done = vec![vec![f64::NAN; m]; p];
    let mut next = vec![0usize; p];
    let mut free = vec![0f64; p];
    // Each device's lanes: when each next becomes free.
    let mut device_lanes: std::collections::BTreeMap<&str, Vec<f64>> = Default::default();
    for (a, &l) in actors.iter().zip(lanes) {
        device_lanes
            .entry(a.device.as_str())
            .or_insert_with(|| vec![0.0; l.max(1)]);
    }
    // When actor i's next op could start (its inputs there and the actor idle), if it can.
    let ready = |i: usize, next: &[usize], free: &[f64], fd: &[Vec<f64>], bd: &[Vec<f64>]| {
        let op = sched[i].get(next[i])?;
        let deps: Vec<f64> = match *op {
            Op::Forward(mb) => {
                let mb = mb as usize;
                let mut d = Vec::new();
                if i > 0 {
                    d.push(fd[i - 1][mb]);
                }
                if i == p - 1 && p > 1 {
                    d.push(fd[0][mb]);
                }
                d
            }
            Op::Backward(mb) => {
                let mb = mb as usize;
                let mut d = vec![fd[i][mb]];
                if i + 1 < p {
                    d.push(bd[i + 1][mb]);
                }
                if i == 0 && p > 1 {
                    d.push(bd[p - 1][mb]);
                }
                d
            }
        };
        if deps.iter().any(|t| t.is_nan()) {
            return None;
        }
        Some(deps.into_iter().fold(free[i], f64::max))
    };
    loop {
        let candidate = (0..p)
            .filter_map(|i| ready(i, &next, &free, &fwd_done, &bwd_done).map(|t| (t, i)))
            .min_by(|a, b| a.0.total_cmp(&b.0));
        let Some((at, i)) = candidate else {
            break;
        };
        let slots = device_lanes
            .get_mut(actors[i].device.as_str())
            .expect("every device has lanes");
        let lane = (0..slots.len())
            .min_by(|&a, &b| slots[a].total_cmp(&slots[b]))
            .unwrap_or(0);
        let start = at.max(slots[lane]);
        let (done, table) = match sched[i][next[i]] {
            Op::Forward(mb) => (start + actors[i].forward_s, (&mut fwd_done, mb)),
            Op::Backward(mb) => (start + actors[i].backward_s, (&mut bwd_done, mb)),
        };
        table.0[i][table.1 as usize] = done;
        slots[lane] = done;
        free[i] = done;
        next[i] += 1;
    }
    free.into_iter().fold(0.0, f64::max)
}

/// The topology with its LLM layers moved between the shards (each keeps at least one, in order) to
/// even the shards' predicted forward + backward seconds: the split whose slowest shard is fastest.
pub fn balance(cfg: &DeemConfig, topo: &Topology, costs: &Costs) -> Topology {
    let mut out = topo.clone();
    let shards: Vec<usize> = out
        .actors
        .iter()
        .enumerate()
        .filter(|(_, a)| a.component == Component::Llm)
        .map(|(i, _)| i)
        .collect();
    let mut order = shards.clone();
    order.sort_by_key(|&i| out.actors[i].layers.as_ref().map_or(0, |r| r.start));
    let n = cfg.llm.num_hidden_layers;
    let k = order.len() as i64;
    if k < 2 || n < k {
        return out;
    }
    let time = |r: std::ops::Range<i64>| {
        let layers = (r.end - r.start) as f64;
        let l = &costs.llm_layer;
        let mut t = layers * (l.forward_s + l.backward_s);
        if r.start == 0 {
            t += costs.llm_embed.forward_s + costs.llm_embed.backward_s;
        }
        if r.end == n {
            t += costs.llm_head.forward_s + costs.llm_head.backward_s;
        }
        t
    };
    // Smallest achievable maximum over contiguous splits, by dynamic programming over (shard, end).
    let (ku, nu) = (k as usize, n as usize);
    let mut best = vec![vec![f64::INFINITY; nu + 1]; ku + 1];
    let mut cut = vec![vec![0usize; nu + 1]; ku + 1];
    best[0][0] = 0.0;
    for s in 1..=ku {
        for end in s..=nu {
            for start in (s - 1)..end {
                let t = best[s - 1][start].max(time(start as i64..end as i64));
                if t < best[s][end] {
                    best[s][end] = t;
                    cut[s][end] = start;
                }
            }
        }
    }
    let mut end = nu;
    for s in (1..=ku).rev() {
        let start = cut[s][end];
        let a = &mut out.actors[order[s - 1]];
        a.layers = Some(start as i64..end as i64);
        a.params = params::llm_shard(&cfg.llm, start as i64, end as i64);
        a.param_bytes = a.params as u64 * cfg.model.dtype.size_bytes();
        end = start;
    }
    out
}

/// Refuses a plan whose actors on a device need more than it has: `capacity(device)` is the device's
/// memory in bytes (`None`: unknown, not checked). Actors sharing a device add up.
pub fn check_fits(
    plan: &Plan,
    capacity: &dyn Fn(&str) -> Option<u64>,
) -> Result<(), PipelineError> {
    let mut per: std::collections::BTreeMap<&str, (f64, Vec<&str>)> = Default::default();
    for a in &plan.actors {
        let e = per.entry(a.device.as_str()).or_default();
        e.0 += a.total_bytes;
        e.1.push(a.name.as_str());
    }
    let mut problems = Vec::new();
    for (device, (need, names)) in per {
        if let Some(cap) = capacity(device) {
            if need > cap as f64 {
                problems.push(format!(
                    "{device} ({}) needs {} but has {}",
                    names.join(", "),
                    human_bytes(need as u64),
                    human_bytes(cap)
                ));
            }
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(PipelineError::DoesNotFit(problems))
    }
}
