//! The pipeline driver: spawns one stage actor per topology entry (vision, LLM shards, diffusion), wires
//! the DAG's edges with bounded channels, initialises every stage from the same reference weights, and
//! runs steps: each stage executes its schedule's F/B list over the microbatches, then the driver forms
//! the global gradient norm from every stage's share and has every stage clip by the same factor and
//! step its own AdamW groups with the shared LR schedule.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use deem::config::DeemConfig;
use deem::models::deem::{special_ids, Batch};
use deem::models::losses::LossWeights;
use deem::train::{update_plan, Group, StepReport};
use tch::Tensor;

use super::checkpoint;
use super::error::PipelineError;
use super::schedule::{self, Op};
use super::stage::{Links, MbData, Packet, Role, StageArgs, StageHandle, StepOut};
use crate::runtime::metrics::Metrics;
use crate::runtime::topology::{Component, Topology};
use crate::runtime::{Policy, Supervisor};

type Result<T, E = PipelineError> = std::result::Result<T, E>;

/// One running stage.
pub struct Stage {
    pub name: String,
    pub role: Role,
    pub handle: StageHandle,
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
    topo: Topology,
    /// Every stage is its child; it owns the restart policy (`train.max_restarts`).
    supervisor: Supervisor,
    schedule: Vec<Vec<Op>>,
    step: u64,
    pub last_timing: Option<StepTiming>,
}

/// Spawns one stage actor per placement of `topo` under `supervisor`, wired by the DAG's channels, and
/// loads the reference initialisation into each. On failure no actor is left running.
async fn spawn_stages(
    cfg: &DeemConfig,
    topo: &Topology,
    supervisor: &Supervisor,
) -> Result<Vec<Stage>> {
    let m = cfg.train.microbatches as usize;
    let order = topo.pipeline_order();
    let p = order.len();
    if p < 3 {
        return Err(PipelineError::Topology {
            origin: topo.origin.clone(),
            problem: "a pipeline needs vision, at least one llm shard and diffusion".into(),
        });
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

    let mut stages: Vec<Stage> = Vec::with_capacity(p);
    for (placement, l) in order.iter().zip(links) {
        let role = match placement.component {
            Component::Vision => Role::Vision,
            Component::Diffusion => Role::Diffusion,
            Component::Llm => Role::Llm {
                layers: placement.layers.clone().unwrap_or(0..0),
            },
        };
        let args = StageArgs {
            threads: topo.cpu_threads(placement),
            name: placement.name.clone(),
            role: role.clone(),
            cfg: cfg.clone(),
            device: placement.device,
            links: l,
        };
        match StageHandle::spawn(supervisor, args).await {
            Ok(handle) => stages.push(Stage {
                name: placement.name.clone(),
                role,
                handle,
            }),
            Err(e) => {
                stop_all(stages).await;
                return Err(e);
            }
        }
    }
    let init = deem::models::deem::initial_weights(cfg)?;
    for s in &stages {
        if let Err(e) = s.handle.load(shallow(&init)).await {
            stop_all(stages).await;
            return Err(e);
        }
    }
    Ok(stages)
}

fn shallow(w: &BTreeMap<String, Tensor>) -> BTreeMap<String, Tensor> {
    w.iter()
        .map(|(k, v)| (k.clone(), v.shallow_clone()))
        .collect()
}

/// Restores every stage from the latest checkpoint of `run_dir` (written by any topology, with the
/// configuration `cfg`); returns its manifest.
async fn restore_all(
    stages: &[Stage],
    run_dir: &Path,
    cfg: &DeemConfig,
) -> Result<checkpoint::Manifest> {
    let (dir, manifest) = checkpoint::latest_of(run_dir, cfg)?;
    for s in stages {
        s.handle.restore(dir.clone(), manifest.step).await?;
    }
    Ok(manifest)
}

/// Stops every stage's actor and waits for its compute thread.
async fn stop_all(stages: Vec<Stage>) {
    for s in stages {
        s.handle.stop().await;
    }
}

impl PipelineTrainer {
    /// Spawns the stages of `topo` for `cfg` and loads the reference initialisation (the weights
    /// `deem::train::Trainer::new` builds for the same seed).
    pub async fn start(cfg: &DeemConfig, topo: &Topology) -> Result<Self> {
        Self::start_with(cfg, topo, None).await
    }

    /// [`Self::start`], with the supervisor counting actor failures and restarts in `metrics`.
    pub async fn start_with(
        cfg: &DeemConfig,
        topo: &Topology,
        metrics: Option<Arc<Metrics>>,
    ) -> Result<Self> {
        let policy = Policy::RestartAll {
            max_restarts: cfg.train.max_restarts,
        };
        let supervisor = Supervisor::start("training", policy, None, metrics).await?;
        let stages = match spawn_stages(cfg, topo, &supervisor).await {
            Ok(s) => s,
            Err(e) => {
                supervisor.stop().await;
                return Err(e);
            }
        };
        let m = cfg.train.microbatches;
        Ok(PipelineTrainer {
            cfg: cfg.clone(),
            schedule: schedule::build(cfg.train.schedule, stages.len(), m as u32),
            stages,
            topo: topo.clone(),
            supervisor,
            step: 0,
            last_timing: None,
        })
    }

    /// The supervisor's restart policy after a failed step (`failed` says how it failed): every stage is
    /// stopped, spawned afresh and restored from the latest checkpoint of `run_dir`; returns the step it
    /// resumes at. Refused once `train.max_restarts` restarts are used.
    pub async fn restart(&mut self, run_dir: &Path, failed: String) -> Result<u64> {
        let (cfg, topo, supervisor) = (&self.cfg, &self.topo, &self.supervisor);
        let stages = &mut self.stages;
        let at = supervisor
            .restart_all(failed, || async move {
                stop_all(std::mem::take(stages)).await;
                *stages = spawn_stages(cfg, topo, supervisor).await?;
                Ok::<u64, PipelineError>(restore_all(stages, run_dir, cfg).await?.step)
            })
            .await?;
        self.step = at;
        Ok(at)
    }

    /// Replaces every actor's parameters with `weights` (global names; each actor takes its own), e.g.
    /// a previous stage's model for `deem train --init-from`.
    pub async fn load_weights(&self, weights: &BTreeMap<String, Tensor>) -> Result<()> {
        for s in &self.stages {
            s.handle.load(shallow(weights)).await?;
        }
        Ok(())
    }

    /// One optimizer step over `batch` (split into `train.microbatches` microbatches).
    pub async fn step(&mut self, batch: &Batch) -> Result<StepReport> {
        self.step_with_fault(batch, None).await
    }

    /// [`Self::step`], making the actor named `kill` fail (fault injection).
    pub async fn step_with_fault(
        &mut self,
        batch: &Batch,
        kill: Option<&str>,
    ) -> Result<StepReport> {
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
                Ok(Err(e)) => failures.push(e.to_string()),
                Err(e) => failures.push(format!("stage {}: {e}", s.name)),
            }
        }
        if !failures.is_empty() {
            return Err(PipelineError::Step {
                step,
                failures: failures.join("; "),
            });
        }
        let sq: f64 = outs.iter().map(|o| o.sq_grad_norm).sum();
        let (grad_norm, clip, lrs) = update_plan(t, step, sq);
        for s in &self.stages {
            let lrs = lrs.clone();
            s.handle.apply(lrs, clip).await?;
        }
        self.step += 1;
        let w = LossWeights::of(&self.cfg);
        let per = |f: fn(&StepOut) -> &Vec<f64>| -> Vec<f64> {
            outs.iter().flat_map(|o| f(o).iter().copied()).collect()
        };
        let (ntp, nip, csr) = (per(|o| &o.ntp), per(|o| &o.nip), per(|o| &o.csr));
        let mean = |v: &[f64]| v.iter().sum::<f64>() / m as f64;
        let total: f64 = (0..m as usize)
            .map(|i| w.combine(ntp[i], nip[i], csr[i]))
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
    ) -> Result<std::path::PathBuf> {
        let tmp = checkpoint::begin(run_dir, self.step)?;
        for s in &self.stages {
            let dir = tmp.clone();
            s.handle.save(dir).await?;
        }
        let stages = self.stages.iter().map(|s| s.name.clone()).collect();
        let manifest = checkpoint::Manifest::new(&self.cfg, self.step, topology, stages);
        checkpoint::commit(run_dir, &tmp, &manifest)
    }

    /// Restores every stage from the latest checkpoint of `run_dir` (written by any topology); returns
    /// its manifest. The configuration must be the one the checkpoint was trained with.
    pub async fn resume(&mut self, run_dir: &std::path::Path) -> Result<checkpoint::Manifest> {
        let manifest = restore_all(&self.stages, run_dir, &self.cfg).await?;
        self.step = manifest.step;
        Ok(manifest)
    }

    /// Every stage's parameters under their global names.
    pub async fn weights(&self) -> Result<BTreeMap<String, Tensor>> {
        let mut all = BTreeMap::new();
        for s in &self.stages {
            let w = s.handle.weights().await?;
            all.extend(w);
        }
        Ok(all)
    }

    /// Stops every actor and waits for their compute threads, then the supervisor.
    pub async fn stop(self) {
        stop_all(self.stages).await;
        self.supervisor.stop().await;
    }
}
