//! The pipeline driver: spawns one stage actor per topology entry (vision, LLM shards, diffusion), wires
//! the DAG's edges with bounded channels, initialises every stage from the same reference weights, and
//! runs steps: each stage executes its schedule's F/B list over the microbatches, then the driver forms
//! the global gradient norm from every stage's share and has every stage clip by the same factor and
//! step its own AdamW groups with the shared LR schedule. Across processes ([`DistPlan`]) each process
//! spawns the stages of its pipeline rank; edges to stages elsewhere go through c10d, replicas
//! all-reduce their gradients, and the norm and losses are gathered over the world
//! ([`super::distributed`]).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use deem::config::DeemConfig;
use deem::models::deem::{special_ids, Batch};
use deem::models::losses::LossWeights;
use deem::models::pretrained::{Filled, Pretrained};
use deem::train::{update_plan, Group, LossScaler, StepReport};
use tch::Tensor;

use super::checkpoint;
use super::distributed::{gather, DistPlan, BUCKET_BYTES};
use super::edge::{EdgeRx, EdgeTx, Remote};
use super::error::PipelineError;
use super::forward::{MbData, MbPlan};
use super::modules::Role;
use super::schedule::{self, Op};
use super::stage::{Links, StageArgs, StageHandle, StepOut};
use crate::runtime::metrics::Metrics;
use crate::runtime::topology::{Component, Topology};
use crate::runtime::{Policy, Supervisor};

type Result<T, E = PipelineError> = std::result::Result<T, E>;

/// One running stage.
pub struct Stage {
    /// Its position in the pipeline order (over every process).
    pub index: usize,
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
    /// Per cross-process edge end: bytes and seconds through c10d.
    pub p2p: BTreeMap<String, super::edge::Traffic>,
    /// Gradient all_reduce over the replicas: bytes and seconds.
    pub all_reduce: (u64, f64),
    /// Microbatch forwards run again before their backward, over this process's stages.
    pub recomputed: usize,
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
    /// This process's place in a multi-process pipeline (`None`: every stage is here).
    dist: Option<Arc<DistPlan>>,
    /// f16's dynamic loss scale (every rank updates it from the same global norm).
    pub scaler: LossScaler,
}

/// Which end of an edge to set.
#[derive(Clone, Copy)]
enum Edge {
    Fwd,
    Grad,
    Csr,
    CsrGrad,
}

/// Wires the edge `from → to` (pipeline indices): a channel when both stages run here, the local end of
/// a c10d stream when one does, nothing when neither does.
fn connect(
    links: &mut [Links],
    local: &dyn Fn(usize) -> bool,
    dist: Option<&DistPlan>,
    names: &[&str],
    ranks: &[u32],
    (from, to, kind, m): (usize, usize, Edge, usize),
) {
    let tag = match kind {
        Edge::Fwd => 2 * from as i32,
        Edge::Grad => 2 * to as i32 + 1,
        Edge::Csr => 1 << 20,
        Edge::CsrGrad => (1 << 20) + 1,
    };
    let what = match kind {
        Edge::Fwd | Edge::Csr => "activation",
        Edge::Grad | Edge::CsrGrad => "gradient",
    };
    let remote = |peer: usize| {
        dist.map(|d| Remote {
            group: d.p2p.clone(),
            peer: d.world_rank_of(ranks[peer]),
            tag,
            edge: format!("{}→{} {what}", names[from], names[to]),
        })
    };
    let (tx, rx) = match (local(from), local(to)) {
        (true, true) => {
            let (tx, rx) = flume::bounded(m);
            (Some(EdgeTx::Local(tx)), Some(EdgeRx::Local(rx)))
        }
        (true, false) => (remote(to).map(|r| EdgeTx::remote(r, m)), None),
        (false, true) => (None, remote(from).map(EdgeRx::remote)),
        (false, false) => (None, None),
    };
    if let Some(tx) = tx {
        let l = &mut links[from];
        match kind {
            Edge::Fwd => l.fwd_out = Some(tx),
            Edge::Grad => l.grad_out = Some(tx),
            Edge::Csr => l.csr_out = Some(tx),
            Edge::CsrGrad => l.csr_grad_out = Some(tx),
        }
    }
    if let Some(rx) = rx {
        let l = &mut links[to];
        match kind {
            Edge::Fwd => l.fwd_in = Some(rx),
            Edge::Grad => l.grad_in = Some(rx),
            Edge::Csr => l.csr_in = Some(rx),
            Edge::CsrGrad => l.csr_grad_in = Some(rx),
        }
    }
}

/// Spawns one stage actor per placement of `topo` that this process hosts (every placement without
/// `dist`) under `supervisor`, wired along the DAG; each initialises its own part of the model (the
/// reference initialisation's values). On failure no actor is left running.
async fn spawn_stages(
    cfg: &DeemConfig,
    topo: &Topology,
    supervisor: &Supervisor,
    dist: Option<&DistPlan>,
) -> Result<Vec<Stage>> {
    let m = here(cfg, dist) as usize;
    let order = topo.pipeline_order();
    let p = order.len();
    if p < 3 {
        return Err(PipelineError::Topology {
            origin: topo.origin.clone(),
            problem: "a pipeline needs vision, at least one llm shard and diffusion".into(),
        });
    }
    let names: Vec<&str> = order.iter().map(|a| a.name.as_str()).collect();
    let ranks: Vec<u32> = order.iter().map(|a| a.rank).collect();
    let local = |i: usize| dist.is_none_or(|d| ranks[i] == d.pipeline_rank);
    // Edges: a forward and a gradient edge between consecutive stages, plus vision ⇄ diffusion.
    let mut links: Vec<Links> = (0..p).map(|_| Links::default()).collect();
    for i in 0..p - 1 {
        for (from, to, kind) in [(i, i + 1, Edge::Fwd), (i + 1, i, Edge::Grad)] {
            connect(
                &mut links,
                &local,
                dist,
                &names,
                &ranks,
                (from, to, kind, m),
            );
        }
    }
    for (from, to, kind) in [(0, p - 1, Edge::Csr), (p - 1, 0, Edge::CsrGrad)] {
        connect(
            &mut links,
            &local,
            dist,
            &names,
            &ranks,
            (from, to, kind, m),
        );
    }

    let mut stages: Vec<Stage> = Vec::with_capacity(p);
    for (index, (placement, l)) in order.iter().zip(links).enumerate() {
        if !local(index) {
            continue;
        }
        let role = match placement.component {
            Component::Vision => Role::Vision,
            Component::Diffusion => Role::Diffusion,
            Component::Llm => Role::Llm {
                layers: placement.layers.clone().unwrap_or(0..0),
            },
        };
        let args = StageArgs {
            threads: topo.cpu_threads_in(placement, dist.map(|d| d.local_procs)),
            name: placement.name.clone(),
            role: role.clone(),
            cfg: cfg.clone(),
            device: placement.device,
            links: l,
        };
        match StageHandle::spawn(supervisor, args).await {
            Ok(handle) => stages.push(Stage {
                index,
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
    Ok(stages)
}

/// Microbatches this process's replica runs per step (all of them without `dist`).
fn here(cfg: &DeemConfig, dist: Option<&DistPlan>) -> u64 {
    dist.map_or(cfg.train.microbatches, |d| {
        d.per_replica(cfg.train.microbatches)
    })
}

/// The inputs of `role` for each microbatch: token ids for shards, pixels for vision and diffusion.
fn stage_data(
    role: &Role,
    mbs: &[Batch],
    ids_spans: &[(uuid::Uuid, tracing::Span)],
) -> Vec<MbData> {
    mbs.iter()
        .zip(ids_spans)
        .map(|(mb, (id, span))| {
            let (ids, loss_mask, pixels, masks) = match role {
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
        s.handle
            .restore(dir.clone(), manifest.optimizer_steps())
            .await?;
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
        Self::start_on(cfg, topo, metrics, None).await
    }

    /// [`Self::start_with`] as one process of a multi-process pipeline (`dist`): only the stages of
    /// this process's pipeline rank are spawned here.
    pub async fn start_on(
        cfg: &DeemConfig,
        topo: &Topology,
        metrics: Option<Arc<Metrics>>,
        dist: Option<Arc<DistPlan>>,
    ) -> Result<Self> {
        let policy = Policy::RestartAll {
            max_restarts: cfg.train.max_restarts,
        };
        let supervisor = Supervisor::start("training", policy, None, metrics).await?;
        let stages = match spawn_stages(cfg, topo, &supervisor, dist.as_deref()).await {
            Ok(s) => s,
            Err(e) => {
                supervisor.stop().await;
                return Err(e);
            }
        };
        Ok(PipelineTrainer {
            cfg: cfg.clone(),
            schedule: schedule::build(
                cfg.train.schedule,
                topo.actors.len(),
                here(cfg, dist.as_deref()) as u32,
            ),
            stages,
            topo: topo.clone(),
            supervisor,
            step: 0,
            last_timing: None,
            dist,
            scaler: LossScaler::of(cfg),
        })
    }

    /// Whether the pipeline spans processes (a failure then ends this process; the launcher restarts
    /// the world).
    pub fn is_distributed(&self) -> bool {
        self.dist.is_some()
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
                *stages = spawn_stages(cfg, topo, supervisor, None).await?;
                restore_all(stages, run_dir, cfg).await
            })
            .await?;
        self.step = at.step;
        self.scaler = at.scaler.unwrap_or_else(|| LossScaler::of(&self.cfg));
        Ok(self.step)
    }

    /// Loads pretrained weights into every actor (each takes its own part, from the files straight to
    /// its device; the optimizer's fp32 masters take the files' values). Every actor checks its part
    /// first and, across processes, every rank learns whether any refused, so nothing is loaded
    /// anywhere unless everything fits. With `complete`, every parameter needs a value. Returns what
    /// each of this process's stages filled.
    pub async fn load_pretrained(
        &self,
        pretrained: &Arc<Pretrained>,
        complete: bool,
    ) -> Result<Vec<Filled>> {
        let mut checked = Ok(());
        for s in &self.stages {
            if let Err(e) = s.handle.load(pretrained.clone(), complete, false).await {
                checked = Err(e);
                break;
            }
        }
        self.agree(checked, |n| PipelineError::Checkpoint {
            path: pretrained.describe().into(),
            message: format!(
                "{n} other rank(s) refused the weights (their logs name the file and tensor)"
            ),
        })?;
        let mut filled = Vec::new();
        for s in &self.stages {
            filled.push(s.handle.load(pretrained.clone(), complete, true).await?);
        }
        Ok(filled)
    }

    /// One optimizer step over `batch` (split into `train.microbatches` microbatches).
    pub async fn step(&mut self, batch: &Batch) -> Result<StepReport> {
        self.step_with_fault(batch, None).await
    }

    /// [`Self::step`], making the actor `kill.0` fail at its op `kill.1` of the step (fault injection).
    pub async fn step_with_fault(
        &mut self,
        batch: &Batch,
        kill: Option<(&str, usize)>,
    ) -> Result<StepReport> {
        let t = &self.cfg.train;
        let total = t.microbatches as u32;
        let per = here(&self.cfg, self.dist.as_deref()) as u32;
        let replica = self.dist.as_ref().map_or(0, |d| d.replica);
        let ids = special_ids(&self.cfg);
        // Every replica splits the global batch the same way and takes its own run of microbatches.
        let all = batch.split(total as i64, ids.soi)?;
        let loss_scale = self.scaler.scale;
        let plan = MbPlan {
            offset: replica * per,
            total,
            loss_scale,
        };
        let mbs = &all[plan.offset as usize..(plan.offset + per) as usize];
        let step = self.step;
        // One id and span per microbatch (the same on every process); every stage works inside it.
        let ids_spans: Vec<(uuid::Uuid, tracing::Span)> = (0..mbs.len())
            .map(|i| {
                let global = (plan.offset as usize + i) as u64;
                let id = uuid::Uuid::from_u64_pair(step, global);
                (
                    id,
                    tracing::debug_span!("microbatch", step, mb = global, %id),
                )
            })
            .collect();
        let mut calls = Vec::with_capacity(self.stages.len());
        for s in &self.stages {
            let data = stage_data(&s.role, mbs, &ids_spans);
            let (handle, ops) = (s.handle.clone(), self.schedule[s.index].clone());
            let fail = kill.filter(|(a, _)| *a == s.name).map(|(_, op)| op);
            calls.push(tokio::spawn(async move {
                handle.step(step, data, ops, plan, fail).await
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
        let mut all_reduce = (0u64, 0.0f64);
        if let Some(group) = self.dist.as_ref().and_then(|d| d.replicas.clone()) {
            for (s, out) in self.stages.iter().zip(outs.iter_mut()) {
                let (sq, bytes, secs) = s.handle.reduce(group.clone(), BUCKET_BYTES).await?;
                out.sq_grad_norm = sq;
                all_reduce.0 += bytes;
                all_reduce.1 += secs;
            }
        }
        let placed: Vec<(usize, &StepOut)> = self
            .stages
            .iter()
            .map(|s| s.index)
            .zip(outs.iter())
            .collect();
        let g = gather(
            &placed,
            self.topo.actors.len(),
            plan.offset as usize,
            total as usize,
            self.dist.as_deref(),
        )?;
        let sq: f64 = g.sq_norms.iter().sum();
        let (grad_norm, clip, lrs) = update_plan(t, step, sq);
        let skipped = !self.scaler.update(grad_norm);
        for s in &self.stages {
            let lrs = (!skipped).then(|| lrs.clone());
            s.handle.apply(lrs, clip).await?;
        }
        self.step += 1;
        let w = LossWeights::of(&self.cfg);
        let m = total as usize;
        let mean = |v: &[f64]| v.iter().sum::<f64>() / m as f64;
        let loss: f64 = (0..m)
            .map(|i| w.combine(g.ntp[i], g.nip[i], g.csr[i]))
            .sum::<f64>()
            / m as f64;
        self.last_timing = Some(StepTiming {
            busy_seconds: outs.iter().map(|o| o.busy.as_secs_f64()).collect(),
            idle_seconds: outs.iter().map(|o| o.idle.as_secs_f64()).collect(),
            edges: outs.iter().flat_map(|o| o.edges.clone()).collect(),
            p2p: outs.iter().flat_map(|o| o.p2p.clone()).collect(),
            all_reduce,
            recomputed: outs.iter().map(|o| o.recomputed).sum(),
        });
        Ok(StepReport {
            step,
            total: loss,
            ntp: mean(&g.ntp),
            nip: mean(&g.nip),
            csr: mean(&g.csr),
            grad_norm,
            lr: lrs[&Group::Other],
            loss_scale,
            skipped,
        })
    }

    /// Optimizer steps completed.
    pub fn steps_done(&self) -> u64 {
        self.step
    }

    /// Writes a checkpoint of every stage into `run_dir/checkpoints/step-N` (see `checkpoint`). Across
    /// processes, rank 0 creates the directory, the first replica's ranks write their stages' files,
    /// and rank 0 writes the manifest and commits, each after a barrier; every rank returns once the
    /// checkpoint is committed.
    pub async fn save_checkpoint(
        &self,
        run_dir: &std::path::Path,
        topology: &str,
    ) -> Result<std::path::PathBuf> {
        let d = self.dist.as_deref();
        let rank0 = d.is_none_or(|d| d.world.rank() == 0);
        let tmp = checkpoint::tmp_dir(run_dir, self.step);
        // Each phase ends with every rank learning whether any failed it, so none waits for a rank
        // that gave up; a failed write removes its partial files on every rank.
        let others = |n: f64| {
            PipelineError::checkpoint(
                &tmp,
                format!("{n} other rank(s) failed to write their part (their logs say why)"),
            )
        };
        let written = async {
            let begun = if rank0 {
                checkpoint::begin(run_dir, self.step).map(|_| ())
            } else {
                Ok(())
            };
            self.agree(begun, others)?;
            // The replicas hold the same parameters: the first one writes them.
            let mut saved = Ok(());
            if d.is_none_or(|d| d.replica == 0) {
                for s in &self.stages {
                    saved = s.handle.save(tmp.clone()).await;
                    if saved.is_err() {
                        break;
                    }
                }
            }
            self.agree(saved, others)?;
            let done = if rank0 {
                let stages = self
                    .topo
                    .pipeline_order()
                    .iter()
                    .map(|a| a.name.clone())
                    .collect();
                let manifest = checkpoint::Manifest::new(&self.cfg, self.step, topology, stages)
                    .with_scaler(&self.scaler);
                checkpoint::commit(run_dir, &tmp, &manifest)
            } else {
                Ok(checkpoint::checkpoints_dir(run_dir).join(format!("step-{}", self.step)))
            };
            self.agree(done, others)
        };
        written
            .await
            .map_err(|e| checkpoint::abandon(run_dir, self.step, e))
    }

    /// Across processes, every rank learns whether any rank's `mine` failed (one all_reduce, which
    /// is also a barrier): a rank's own error comes back as it is, a rank that succeeded gets
    /// `others(n)` for the n ranks that failed. In one process, `mine` as it is.
    fn agree<T>(&self, mine: Result<T>, others: impl FnOnce(f64) -> PipelineError) -> Result<T> {
        let Some(d) = self.dist.as_deref() else {
            return mine;
        };
        let failed = Tensor::from_slice(&[f32::from(mine.is_err())]);
        d.world.group.all_reduce(&failed)?;
        let n = failed.double_value(&[0]);
        match mine {
            Ok(_) if n > 0.0 => Err(others(n)),
            mine => mine,
        }
    }

    /// The whole model's parameters: every stage's, or across processes those of the latest
    /// checkpoint of `run_dir` (every rank's stages wrote there).
    pub async fn model_weights(&self, run_dir: &Path) -> Result<BTreeMap<String, Tensor>> {
        if self.dist.is_none() {
            return self.weights().await;
        }
        let (dir, _) = checkpoint::latest_of(run_dir, &self.cfg)?;
        checkpoint::model_of(&dir)
    }

    /// Restores every stage from the latest checkpoint of `run_dir` (written by any topology); returns
    /// its manifest. The configuration must be the one the checkpoint was trained with.
    pub async fn resume(&mut self, run_dir: &std::path::Path) -> Result<checkpoint::Manifest> {
        let manifest = restore_all(&self.stages, run_dir, &self.cfg).await?;
        self.step = manifest.step;
        self.scaler = manifest
            .scaler
            .clone()
            .unwrap_or_else(|| LossScaler::of(&self.cfg));
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
