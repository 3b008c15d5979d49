//! The pipeline driver: spawns one stage actor per topology entry (vision, LLM shards, diffusion), wires
//! the DAG's edges with bounded channels, initialises every stage from the same reference weights, and
//! runs steps: each stage executes its schedule's F/B list over the microbatches, then the driver forms
//! the global gradient norm from every stage's share and has every stage clip by the same factor and
//! step its own AdamW groups with the shared LR schedule.

use std::collections::BTreeMap;

use anyhow::{bail, Context};
use deem::config::DeemConfig;
use deem::model::{loss_weights, special_ids, Batch, Deem};
use deem::train::{update_plan, Group, StepReport};
use tch::{nn, Tensor};

use super::schedule::{self, Op};
use super::stage::{Links, MbData, Packet, Role, StageArgs, StageHandle, StepOut};
use crate::topology::{Component, Topology};

/// One running stage.
pub struct Stage {
    pub name: String,
    pub role: Role,
    pub handle: StageHandle,
    join: tokio::task::JoinHandle<()>,
}

/// Timing of one pipelined step, per stage (pipeline order).
#[derive(Debug, Clone)]
pub struct StepTiming {
    pub busy_seconds: Vec<f64>,
    pub idle_seconds: Vec<f64>,
    /// Per edge (`"<sender>: <edge>"`): bytes sent and the deepest queue seen.
    pub edges: BTreeMap<String, (u64, usize)>,
}

pub struct PipelineTrainer {
    pub cfg: DeemConfig,
    pub stages: Vec<Stage>,
    schedule: Vec<Vec<Op>>,
    step: u64,
    pub last_timing: Option<StepTiming>,
}

impl PipelineTrainer {
    /// Spawns the stages of `topo` for `cfg` and loads the reference initialisation (the weights
    /// `deem::train::Trainer::new` builds for the same seed).
    pub async fn start(cfg: &DeemConfig, topo: &Topology) -> anyhow::Result<Self> {
        let m = cfg.train.microbatches as usize;
        // Pipeline order: vision, the shards by layer range, diffusion.
        let mut order: Vec<&crate::topology::Placement> = topo.actors.iter().collect();
        order.sort_by_key(|a| {
            let rank = match a.component {
                Component::Vision => 0,
                Component::Llm => 1,
                Component::Diffusion => 2,
            };
            (rank, a.layers.as_ref().map_or(0, |r| r.start))
        });
        let p = order.len();
        if p < 3 {
            bail!(
                "topology {}: a pipeline needs vision, at least one llm shard and diffusion",
                topo.origin
            );
        }

        // Edges: a forward and a gradient channel between consecutive stages, plus vision ⇄ diffusion.
        let mut links: Vec<Links> = (0..p).map(|_| Links::default()).collect();
        for i in 0..p - 1 {
            let (ftx, frx) = flume::bounded::<Packet>(m);
            let (gtx, grx) = flume::bounded::<Packet>(m);
            links[i].fwd_out = Some(ftx);
            links[i].grad_in = Some(grx);
            links[i + 1].fwd_in = Some(frx);
            links[i + 1].grad_out = Some(gtx);
        }
        let (ctx, crx) = flume::bounded::<Packet>(m);
        let (cgtx, cgrx) = flume::bounded::<Packet>(m);
        links[0].csr_out = Some(ctx);
        links[0].csr_grad_in = Some(cgrx);
        links[p - 1].csr_in = Some(crx);
        links[p - 1].csr_grad_out = Some(cgtx);

        let mut stages = Vec::with_capacity(p);
        for (placement, l) in order.iter().zip(links) {
            let role = match placement.component {
                Component::Vision => Role::Vision,
                Component::Diffusion => Role::Diffusion,
                Component::Llm => Role::Llm {
                    layers: placement.layers.clone().unwrap_or(0..0),
                },
            };
            let on_cpu = order
                .iter()
                .filter(|a| a.device == deem::DeviceSpec::Cpu)
                .count()
                .max(1);
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            let threads =
                (placement.device == deem::DeviceSpec::Cpu).then(|| (cores / on_cpu).max(1) as i32);
            let args = StageArgs {
                threads,
                name: placement.name.clone(),
                role: role.clone(),
                cfg: cfg.clone(),
                device: placement.device.into(),
                links: l,
            };
            match StageHandle::spawn(args).await {
                Ok((handle, join)) => stages.push(Stage {
                    name: placement.name.clone(),
                    role,
                    handle,
                    join,
                }),
                Err(e) => {
                    // Leave no actor running.
                    for s in stages {
                        s.handle.stop();
                        let _ = s.join.await;
                    }
                    bail!("cannot start actor {}: {e:#}", placement.name);
                }
            }
        }
        let schedule = schedule::build(cfg.train.schedule, p, m as u32);
        let trainer = PipelineTrainer {
            cfg: cfg.clone(),
            stages,
            schedule,
            step: 0,
            last_timing: None,
        };
        let init = reference_init(cfg)?;
        for s in &trainer.stages {
            let weights = init.clone_shallow();
            s.handle.load(weights).await?;
        }
        Ok(trainer)
    }

    /// Replaces every actor's parameters with `weights` (global names; each actor takes its own), e.g.
    /// a previous stage's model for `deem train --init-from`.
    pub async fn load_weights(&self, weights: &BTreeMap<String, Tensor>) -> anyhow::Result<()> {
        for s in &self.stages {
            let w = weights
                .iter()
                .map(|(k, v)| (k.clone(), v.shallow_clone()))
                .collect();
            s.handle.load(w).await?;
        }
        Ok(())
    }

    /// One optimizer step over `batch` (split into `train.microbatches` microbatches).
    pub async fn step(&mut self, batch: &Batch) -> anyhow::Result<StepReport> {
        self.step_with_fault(batch, None).await
    }

    /// [`Self::step`], making the actor named `kill` fail (fault injection).
    pub async fn step_with_fault(
        &mut self,
        batch: &Batch,
        kill: Option<&str>,
    ) -> anyhow::Result<StepReport> {
        let t = &self.cfg.train;
        let m = t.microbatches as i64;
        let ids = special_ids(&self.cfg);
        let mbs = batch.split(m, ids.soi)?;
        let step = self.step;
        // One id and span per microbatch; every stage works on it inside that span.
        let ids_spans: Vec<(uuid::Uuid, tracing::Span)> = (0..mbs.len())
            .map(|i| {
                let id = uuid::Uuid::new_v4();
                (id, tracing::debug_span!("microbatch", step, mb = i, %id))
            })
            .collect();
        let mut calls = Vec::with_capacity(self.stages.len());
        for (s, ops) in self.stages.iter().zip(&self.schedule) {
            let data: Vec<MbData> = mbs
                .iter()
                .zip(&ids_spans)
                .map(|(mb, (id, span))| {
                    let (ids, loss_mask, pixels, masks) = match s.role {
                        Role::Llm { .. } => (
                            Some(mb.input_ids.shallow_clone()),
                            mb.loss_mask.as_ref().map(Tensor::shallow_clone),
                            None,
                            None,
                        ),
                        _ => (
                            None,
                            None,
                            Some(mb.pixels.shallow_clone()),
                            mb.masks.as_ref().map(Tensor::shallow_clone),
                        ),
                    };
                    MbData {
                        id: *id,
                        span: span.clone(),
                        ids,
                        loss_mask,
                        pixels,
                        masks,
                    }
                })
                .collect();
            let (handle, ops) = (s.handle.clone(), ops.clone());
            let fail = kill == Some(s.name.as_str());
            calls.push(tokio::spawn(async move {
                handle.step(step, data, ops, fail).await
            }));
        }
        let mut outs: Vec<StepOut> = Vec::with_capacity(calls.len());
        let mut failures = Vec::new();
        for (s, c) in self.stages.iter().zip(calls) {
            match c.await {
                Ok(Ok(out)) => outs.push(out),
                Ok(Err(e)) => failures.push(format!("{e:#}")),
                Err(e) => failures.push(format!("stage {}: {e}", s.name)),
            }
        }
        if !failures.is_empty() {
            bail!("step {step} failed: {}", failures.join("; "));
        }
        let sq: f64 = outs.iter().map(|o| o.sq_grad_norm).sum();
        let (grad_norm, clip, lrs) = update_plan(t, step, sq);
        for s in &self.stages {
            let lrs = lrs.clone();
            s.handle.apply(lrs, clip).await?;
        }
        self.step += 1;
        let (nip_w, csr_w) = loss_weights(&self.cfg);
        let per = |f: fn(&StepOut) -> &Vec<f64>| -> Vec<f64> {
            outs.iter().flat_map(|o| f(o).iter().copied()).collect()
        };
        let (ntp, nip, csr) = (per(|o| &o.ntp), per(|o| &o.nip), per(|o| &o.csr));
        let mean = |v: &[f64]| v.iter().sum::<f64>() / m as f64;
        let total: f64 = (0..m as usize)
            .map(|i| ntp[i] + nip_w * nip[i] + csr_w * csr[i])
            .sum::<f64>()
            / m as f64;
        self.last_timing = Some(StepTiming {
            busy_seconds: outs.iter().map(|o| o.busy.as_secs_f64()).collect(),
            idle_seconds: outs.iter().map(|o| o.idle.as_secs_f64()).collect(),
            edges: outs.iter().flat_map(|o| o.edges.clone()).collect(),
        });
        Ok(StepReport {
            step,
            total,
            ntp: mean(&ntp),
            nip: mean(&nip),
            csr: mean(&csr),
            grad_norm,
            lr: lrs[&Group::Other],
        })
    }

    /// Optimizer steps completed.
    pub fn steps_done(&self) -> u64 {
        self.step
    }

    /// Writes a checkpoint of every stage into `run_dir/checkpoints/step-N` (see `checkpoint`).
    pub async fn save_checkpoint(
        &self,
        run_dir: &std::path::Path,
        topology: &str,
    ) -> anyhow::Result<std::path::PathBuf> {
        let tmp = super::checkpoint::begin(run_dir, self.step)?;
        for s in &self.stages {
            let dir = tmp.clone();
            s.handle.save(dir).await?;
        }
        let stages = self.stages.iter().map(|s| s.name.clone()).collect();
        let manifest = super::checkpoint::Manifest::new(&self.cfg, self.step, topology, stages);
        super::checkpoint::commit(run_dir, &tmp, &manifest)
    }

    /// Restores every stage from the latest checkpoint of `run_dir` (written by any topology); returns
    /// its manifest. The configuration must be the one the checkpoint was trained with.
    pub async fn resume(
        &mut self,
        run_dir: &std::path::Path,
    ) -> anyhow::Result<super::checkpoint::Manifest> {
        let (dir, manifest) = super::checkpoint::latest_of(run_dir, &self.cfg)?;
        for s in &self.stages {
            let (d, steps) = (dir.clone(), manifest.step);
            s.handle.restore(d, steps).await?;
        }
        self.step = manifest.step;
        Ok(manifest)
    }

    /// Every stage's parameters under their global names.
    pub async fn weights(&self) -> anyhow::Result<BTreeMap<String, Tensor>> {
        let mut all = BTreeMap::new();
        for s in &self.stages {
            let w = s.handle.weights().await?;
            all.extend(w);
        }
        Ok(all)
    }

    /// Stops every actor and waits for their compute threads.
    pub async fn stop(self) {
        for s in self.stages {
            s.handle.stop();
            let _ = s.join.await;
        }
    }
}

/// The reference initialisation: the weights `Trainer::new` creates for `cfg.train.seed`, on the CPU.
struct Init(BTreeMap<String, Tensor>);

impl Init {
    fn clone_shallow(&self) -> BTreeMap<String, Tensor> {
        self.0
            .iter()
            .map(|(k, v)| (k.clone(), v.shallow_clone()))
            .collect()
    }
}

fn reference_init(cfg: &DeemConfig) -> anyhow::Result<Init> {
    let vs = nn::VarStore::new(tch::Device::Cpu);
    deem::with_init_lock(Some(cfg.train.seed), || Deem::new(&vs.root(), cfg))
        .context("building the reference initialisation")?;
    Ok(Init(
        vs.variables()
            .into_iter()
            .map(|(k, v)| (k, v.detach()))
            .collect(),
    ))
}

/// The whole model's initial weights for `cfg.train.seed` (CPU, reference key names): what a
/// pipeline starts training from, and what `deem serve` runs without a checkpoint.
pub fn initial_weights(cfg: &DeemConfig) -> anyhow::Result<BTreeMap<String, Tensor>> {
    reference_init(cfg).map(|i| i.0)
}
