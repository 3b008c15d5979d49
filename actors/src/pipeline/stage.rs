//! One pipeline stage, after GPipe's and 1F1B's stage model: the work of a runtime compute actor
//! ([`crate::runtime::compute`]) that owns the stage's modules, VarStore, optimizer state and training
//! activations, and answers control messages (run a step, all-reduce its gradients with its replicas,
//! apply the optimizer, hand over weights). Activations and gradients travel along the DAG's edges
//! ([`super::edge`]: a bounded flume channel within a process, c10d point-to-point across processes),
//! each message tagged with its microbatch.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use deem::config::{DeemConfig, Recompute};
use deem::models::deem::{special_ids, Part, SpecialIds};
use deem::models::pretrained::{part_spec, Filled, Pretrained};
use deem::train::{AdamW, Group};
use flume::Receiver;
use ractor::RpcReplyPort;
use tch::{nn, Tensor};

use super::edge::{EdgeRx, EdgeTx, Traffic};
pub use super::edge::{Links, Packet};
use super::error::PipelineError;
use super::forward::{backward_of, compute, leaf, Ctx, MbData, MbPlan, Received};
pub use super::modules::Role;
use super::modules::{build, part_of, Modules};
use super::schedule::Op;
use crate::dist::Group as DistGroup;
use crate::runtime::compute::{BuildError, NoDetail};
use crate::runtime::{ComputeCtx, ComputeHandle, ComputeSpec, Supervisor, Work};

type Result<T, E = PipelineError> = std::result::Result<T, E>;

/// What a stage reports after a step's forwards and backwards.
#[derive(Debug, Clone, Default)]
pub struct StepOut {
    pub sq_grad_norm: f64,
    /// Per microbatch (last shard: NTP; diffusion: NIP and CSR).
    pub ntp: Vec<f64>,
    pub nip: Vec<f64>,
    pub csr: Vec<f64>,
    /// Time spent computing, and waiting on channels.
    pub busy: Duration,
    pub idle: Duration,
    /// Per outgoing edge: bytes sent and the deepest queue seen right after a send.
    pub edges: BTreeMap<String, (u64, usize)>,
    /// Per cross-process edge end: bytes and seconds through c10d.
    pub p2p: BTreeMap<String, Traffic>,
    /// Microbatches whose forward ran again before their backward (`train.recompute`).
    pub recomputed: usize,
}

/// Activations kept from a microbatch's forward for its backward.
#[derive(Default)]
struct Saved {
    id: uuid::Uuid,
    /// Leaves received from upstream (gradient goes back to their senders).
    input: Option<Tensor>,
    csr_input: Option<Tensor>,
    /// Outputs sent downstream, whose gradient comes back.
    output: Option<Tensor>,
    csr_output: Option<Tensor>,
    /// A local loss to add to the backward (NTP on the last shard, diffusion losses).
    loss: Option<Tensor>,
    /// `train.recompute = "full"`: only what was received; the rest is recomputed before the backward.
    received: Option<Received>,
    /// `train.recompute = { layers = N }`: the shard's layers to run again in the backward.
    segment: Option<super::forward::Segment>,
}

impl Saved {
    /// Everything a backward needs: what was received and what the forward computed from it.
    fn kept(id: uuid::Uuid, rx: Received, c: super::forward::Computed) -> Self {
        Saved {
            id,
            input: rx.input,
            csr_input: rx.csr_input,
            output: c.output,
            csr_output: c.csr_output,
            loss: c.loss,
            received: None,
            segment: c.segment,
        }
    }
}

/// A stage's work on its compute thread.
pub struct StageWork {
    name: String,
    cfg: DeemConfig,
    ids: SpecialIds,
    device: tch::Device,
    vs: nn::VarStore,
    /// The part of the model the stage holds.
    part: Part,
    modules: Modules,
    opt: AdamW,
    links: Links,
    saved: HashMap<u32, Saved>,
    idle: Duration,
    edges: BTreeMap<String, (u64, usize)>,
    /// Recomputed forwards in the running step.
    recomputations: usize,
}

fn grad_of(t: &Option<Tensor>) -> Option<Vec<Tensor>> {
    t.as_ref().map(|x| {
        let g = x.grad();
        vec![if g.defined() { g } else { x.zeros_like() }]
    })
}

fn recv(
    name: &str,
    rx: &Option<EdgeRx>,
    want: (u32, uuid::Uuid, tch::Device),
    edge: &str,
    idle: &mut Duration,
) -> Result<Packet> {
    let (mb, id, device) = want;
    let rx = rx
        .as_ref()
        .ok_or_else(|| PipelineError::stage(name, format!("no {edge} channel")))?;
    let waited = Instant::now();
    let p = rx
        .recv(device)
        .map_err(|e| PipelineError::stage(name, format!("the {edge} edge: {e}")))?;
    *idle += waited.elapsed();
    if p.mb != mb || p.id != id {
        return Err(PipelineError::stage(
            name,
            format!(
                "expected microbatch {mb} ({id}) on {edge}, got {} ({})",
                p.mb, p.id
            ),
        ));
    }
    Ok(p)
}

fn send(
    name: &str,
    tx: &Option<EdgeTx>,
    p: Packet,
    edge: &str,
    idle: &mut Duration,
    edges: &mut BTreeMap<String, (u64, usize)>,
) -> Result<()> {
    let bytes = super::edge::bytes_of(&p.tensors);
    let tx = tx
        .as_ref()
        .ok_or_else(|| PipelineError::stage(name, format!("no {edge} channel")))?;
    let waited = Instant::now();
    tx.send(p)
        .map_err(|e| PipelineError::stage(name, format!("the {edge} edge: {e}")))?;
    let e = edges.entry(format!("{name}: {edge}")).or_insert((0, 0));
    e.0 += bytes;
    e.1 = e.1.max(tx.depth());
    *idle += waited.elapsed();
    Ok(())
}

impl StageWork {
    fn new(
        name: String,
        role: Role,
        cfg: DeemConfig,
        device: tch::Device,
        links: Links,
    ) -> Result<Self, BuildError> {
        let (vs, modules, opt) = build(&role, &cfg, device)?;
        Ok(StageWork {
            part: part_of(&role),
            name,
            ids: special_ids(&cfg),
            cfg,
            device,
            vs,
            modules,
            opt,
            links,
            saved: HashMap::new(),
            idle: Duration::ZERO,
            edges: BTreeMap::new(),
            recomputations: 0,
        })
    }

    fn ctx(&self, step: u64, plan: MbPlan) -> Ctx<'_> {
        Ctx {
            name: &self.name,
            cfg: &self.cfg,
            ids: self.ids,
            dev: self.device,
            step,
            plan,
        }
    }

    /// Receives what microbatch `mb` needs from upstream (as leaves whose gradients go back).
    fn receive(&self, mb: u32, id: uuid::Uuid, idle: &mut Duration) -> Result<Received> {
        let (name, dev, links) = (self.name.as_str(), self.device, &self.links);
        Ok(match &self.modules {
            Modules::Vision(_) => Received::default(),
            Modules::Llm(_) => {
                let p = recv(name, &links.fwd_in, (mb, id, dev), "llm input", idle)?;
                Received {
                    input: p.tensors.as_ref().map(|t| leaf(&t[0], dev)),
                    ..Default::default()
                }
            }
            Modules::Diffusion(_) => {
                let csr_p = recv(name, &links.csr_in, (mb, id, dev), "vision→diffusion", idle)?;
                let nip_p = recv(name, &links.fwd_in, (mb, id, dev), "llm→diffusion", idle)?;
                Received {
                    input: nip_p.tensors.as_ref().map(|t| leaf(&t[0], dev)),
                    nip: nip_p
                        .tensors
                        .as_ref()
                        .map(|t| (t[1].to_device(dev), nip_p.index.clone())),
                    csr_input: csr_p.tensors.as_ref().map(|t| leaf(&t[0], dev)),
                }
            }
        })
    }

    fn forward(
        &mut self,
        mb: u32,
        data: &MbData,
        step: u64,
        plan: MbPlan,
        out: &mut StepOut,
    ) -> Result<()> {
        let mut idle = Duration::ZERO;
        let id = data.id;
        let rx = self.receive(mb, id, &mut idle)?;
        let recompute = self.cfg.train.recompute == Recompute::Full;
        let mut c = {
            let ctx = self.ctx(step, plan);
            let run = || compute(&self.modules, &ctx, mb, data, &rx);
            // Recomputed before the backward: no graph (no activations) kept now.
            if recompute {
                tch::no_grad(run)?
            } else {
                run()?
            }
        };
        let value = |t: Option<Tensor>| t.map(|t| t.double_value(&[]));
        out.ntp.extend(value(c.ntp.take()));
        out.nip.extend(value(c.nip.take()));
        out.csr.extend(value(c.csr_loss.take()));
        let fwd_edge = match self.modules {
            Modules::Vision(_) => "vision→llm",
            _ => "llm output",
        };
        let name = self.name.as_str();
        if let Some((tensors, index)) = c.fwd.take() {
            let p = Packet {
                mb,
                id,
                tensors,
                index,
            };
            send(
                name,
                &self.links.fwd_out,
                p,
                fwd_edge,
                &mut idle,
                &mut self.edges,
            )?;
        }
        if let Some(tensors) = c.csr.take() {
            let p = Packet::new(mb, id, tensors);
            let edge = "vision→diffusion";
            send(
                name,
                &self.links.csr_out,
                p,
                edge,
                &mut idle,
                &mut self.edges,
            )?;
        }
        let saved = if recompute {
            Saved {
                id,
                received: Some(rx),
                ..Default::default()
            }
        } else {
            Saved::kept(id, rx, c)
        };
        self.idle += idle;
        self.saved.insert(mb, saved);
        Ok(())
    }

    /// A recomputed microbatch's activations, rebuilt with autograd from what it received.
    fn recomputed(
        &self,
        mb: u32,
        data: &MbData,
        step: u64,
        plan: MbPlan,
        rx: Received,
    ) -> Result<Saved> {
        let c = compute(&self.modules, &self.ctx(step, plan), mb, data, &rx)?;
        Ok(Saved::kept(data.id, rx, c))
    }

    fn backward(&mut self, mb: u32, data: &MbData, step: u64, plan: MbPlan) -> Result<()> {
        let mut saved = self.saved.remove(&mb).ok_or_else(|| {
            PipelineError::stage(
                &self.name,
                format!("backward of microbatch {mb} before its forward"),
            )
        })?;
        if let Some(rx) = saved.received.take() {
            saved = self.recomputed(mb, data, step, plan, rx)?;
            self.recomputations += 1;
        }
        let name = self.name.as_str();
        let dev = self.device;
        let mut idle = Duration::ZERO;
        let id = saved.id;
        // Gradients of what this stage sent downstream.
        let g_out = match &self.links.grad_in {
            Some(_) => {
                recv(
                    name,
                    &self.links.grad_in,
                    (mb, id, dev),
                    "gradient in",
                    &mut idle,
                )?
                .tensors
            }
            None => None,
        };
        let g_csr = match &self.links.csr_grad_in {
            Some(_) => {
                recv(
                    name,
                    &self.links.csr_grad_in,
                    (mb, id, dev),
                    "csr gradient in",
                    &mut idle,
                )?
                .tensors
            }
            None => None,
        };
        let g_out = g_out.as_ref().map(|g| g[0].to_device(dev));
        let g_csr = g_csr.as_ref().map(|g| g[0].to_device(dev));
        backward_of(
            saved.loss.as_ref(),
            plan.loss_scale,
            [
                (saved.output.as_ref(), g_out.as_ref()),
                (saved.csr_output.as_ref(), g_csr.as_ref()),
            ],
        );
        if let (Some(seg), Modules::Llm(shard), Some(ids)) =
            (&saved.segment, &self.modules, &data.ids)
        {
            seg.backward(shard, &ids.to_device(dev), &self.cfg);
            self.recomputations += 1;
        }
        self.opt.accumulate(plan.loss_scale);
        if self.links.grad_out.is_some() {
            send(
                name,
                &self.links.grad_out,
                Packet::new(mb, id, grad_of(&saved.input)),
                "gradient out",
                &mut idle,
                &mut self.edges,
            )?;
        }
        if self.links.csr_grad_out.is_some() {
            let p = Packet::new(mb, id, grad_of(&saved.csr_input));
            send(
                name,
                &self.links.csr_grad_out,
                p,
                "csr gradient out",
                &mut idle,
                &mut self.edges,
            )?;
        }
        self.idle += idle;
        Ok(())
    }

    fn run_step(
        &mut self,
        step: u64,
        data: Vec<MbData>,
        ops: Vec<Op>,
        plan: MbPlan,
        fail: Option<(usize, &ComputeCtx<NoDetail>)>,
    ) -> Result<StepOut> {
        let started = Instant::now();
        self.idle = Duration::ZERO;
        self.edges.clear();
        let mut out = StepOut::default();
        for (i, op) in ops.into_iter().enumerate() {
            if let Some((at, ctx)) = fail.filter(|(at, _)| *at == i) {
                ctx.fail(&format!("step {step}, op {at}"));
            }
            match op {
                Op::Forward(mb) => {
                    let d = &data[mb as usize];
                    let _in_span = d.span.enter();
                    tracing::trace!(stage = %self.name, mb, "forward");
                    self.forward(mb, d, step, plan, &mut out)?
                }
                Op::Backward(mb) => {
                    let d = &data[mb as usize];
                    let _in_span = d.span.enter();
                    tracing::trace!(stage = %self.name, mb, "backward");
                    self.backward(mb, d, step, plan)?
                }
            }
        }
        out.recomputed = std::mem::take(&mut self.recomputations);
        let waited = Instant::now();
        out.p2p = self.links.settle(&self.name)?;
        self.idle += waited.elapsed();
        out.sq_grad_norm = self.opt.grad_sq_norm();
        out.idle = self.idle;
        out.edges = std::mem::take(&mut self.edges);
        out.busy = started.elapsed().saturating_sub(self.idle);
        Ok(out)
    }

    /// Sums this stage's gradients with its replicas' (data parallelism) in buckets of
    /// `bucket_bytes`; returns the new squared gradient norm, the bytes reduced and the seconds it took.
    /// A parameter with a gradient on any replica gets one (zeros) on every replica first, so every
    /// replica reduces the same tensors and the optimizer updates the same parameters.
    fn reduce(&mut self, group: &DistGroup, bucket_bytes: usize) -> Result<(f64, u64, f64)> {
        let started = Instant::now();
        let fail = |e: crate::dist::DistError| PipelineError::stage(&self.name, e.to_string());
        let defined: Vec<f32> = self
            .opt
            .params
            .iter()
            .map(|p| f32::from(u8::from(p.grad().is_some())))
            .collect();
        let mask = Tensor::from_slice(&defined);
        group.all_reduce(&mask).map_err(fail)?;
        let mask = Vec::<f32>::try_from(&mask)
            .map_err(|e| PipelineError::stage(&self.name, e.to_string()))?;
        for (p, &any) in self.opt.params.iter_mut().zip(&mask) {
            if any > 0.0 {
                p.ensure_grad();
            }
        }
        // fp32 in mixed precision: the accumulators are reduced, not the bf16/f16 gradients.
        let grads: Vec<Tensor> = self.opt.params.iter().filter_map(|p| p.grad()).collect();
        let on_cpu = grads.iter().all(|g| g.device() == tch::Device::Cpu);
        let bytes = if on_cpu {
            group
                .all_reduce_buckets(&grads, bucket_bytes)
                .map_err(fail)?
        } else {
            // Gloo reduces host tensors: stage through the CPU (NCCL groups reduce in place).
            let host: Vec<Tensor> = grads
                .iter()
                .map(|g| g.to_device(tch::Device::Cpu))
                .collect();
            let n = group
                .all_reduce_buckets(&host, bucket_bytes)
                .map_err(fail)?;
            for (g, h) in grads.iter().zip(&host) {
                g.shallow_clone().copy_(h);
            }
            n
        };
        Ok((
            self.opt.grad_sq_norm(),
            bytes,
            started.elapsed().as_secs_f64(),
        ))
    }

    /// Checks (`apply: false`) or loads this stage's part of `pre`; see [`Pretrained::load_into`].
    fn load(&mut self, pre: &Pretrained, complete: bool, apply: bool) -> Result<Filled> {
        let spec = part_spec(&self.cfg, &self.part);
        let r = if apply {
            let opt = &mut self.opt;
            pre.load_into(&self.vs, &spec, complete, |name, src| {
                opt.set_master(name, src)
            })
        } else {
            pre.check(&self.vs, &spec, complete)
                .map(|_| Filled::default())
        };
        r.map_err(|e| PipelineError::stage(&self.name, e.to_string()))
    }

    /// A snapshot: copies, so later optimizer steps do not change it.
    fn weights(&self) -> Vec<(String, Tensor)> {
        deem::train::cpu_weights(&self.vs)
            .into_iter()
            .map(|(k, t)| (k, t.copy()))
            .collect()
    }
}

/// Control messages of a stage actor.
pub enum StageMsg {
    Step {
        step: u64,
        data: Vec<MbData>,
        ops: Vec<Op>,
        plan: MbPlan,
        /// Fault injection: the compute thread panics at this op of the step (0: before any).
        fail: Option<usize>,
        reply: RpcReplyPort<Result<StepOut>>,
    },
    /// All-reduce the step's gradients over the stage's replicas: (squared norm, bytes, seconds).
    Reduce {
        group: std::sync::Arc<DistGroup>,
        bucket_bytes: usize,
        reply: RpcReplyPort<Result<(f64, u64, f64)>>,
    },
    /// Step the optimizer (`lrs: None`: an f16 overflow skips the step) and clear the gradients.
    Apply {
        lrs: Option<BTreeMap<Group, f64>>,
        clip: f64,
        reply: RpcReplyPort<()>,
    },
    /// Check (`apply: false`) or load the stage's part of pretrained weights.
    Load {
        pretrained: Arc<Pretrained>,
        complete: bool,
        apply: bool,
        reply: RpcReplyPort<Result<Filled>>,
    },
    Weights {
        reply: RpcReplyPort<Vec<(String, Tensor)>>,
    },
    /// Write parameters and optimizer moments to `dir/<stage>.safetensors`.
    Save {
        dir: std::path::PathBuf,
        reply: RpcReplyPort<Result<()>>,
    },
    /// Restore parameters, moments and the optimizer step count from a checkpoint directory.
    Restore {
        dir: std::path::PathBuf,
        steps: u64,
        reply: RpcReplyPort<Result<()>>,
    },
}

impl Work for StageWork {
    type Msg = StageMsg;
    type Detail = NoDetail;

    fn run(mut self, inbox: Receiver<StageMsg>, ctx: ComputeCtx<NoDetail>) {
        while let Ok(msg) = inbox.recv() {
            self.handle(msg, &ctx);
        }
    }
}

impl StageWork {
    fn handle(&mut self, msg: StageMsg, ctx: &ComputeCtx<NoDetail>) {
        match msg {
            StageMsg::Step {
                step,
                data,
                ops,
                plan,
                fail,
                reply,
            } => {
                if fail == Some(0) {
                    ctx.fail(&format!("step {step}"));
                }
                ctx.job();
                let result = self.run_step(step, data, ops, plan, fail.map(|op| (op, ctx)));
                if result.is_err() {
                    // Close this stage's channels so its neighbours fail instead of waiting forever.
                    self.links = Links::default();
                }
                let _ = reply.send(result);
            }
            StageMsg::Reduce {
                group,
                bucket_bytes,
                reply,
            } => {
                let _ = reply.send(self.reduce(&group, bucket_bytes));
            }
            StageMsg::Apply { lrs, clip, reply } => {
                if let Some(lrs) = lrs {
                    self.opt.step(&lrs, clip);
                }
                self.opt.zero_grad();
                let _ = reply.send(());
            }
            StageMsg::Load {
                pretrained,
                complete,
                apply,
                reply,
            } => {
                let _ = reply.send(self.load(&pretrained, complete, apply));
            }
            StageMsg::Weights { reply } => {
                let _ = reply.send(self.weights());
            }
            StageMsg::Save { dir, reply } => {
                let path = dir.join(format!("{}.safetensors", self.name));
                let r = deem::train::save_shard(&path, &self.vs, &self.opt)
                    .map_err(|e| PipelineError::checkpoint(&path, e.to_string()));
                let _ = reply.send(r);
            }
            StageMsg::Restore { dir, steps, reply } => {
                let r = deem::checkpoint::Checkpoint::open(&dir)
                    .and_then(|ck| deem::train::load_shard(&ck, &self.vs, &mut self.opt, steps))
                    .map_err(|e| PipelineError::checkpoint(&dir, e.to_string()));
                let _ = reply.send(r);
            }
        }
    }
}

/// How to build one stage.
pub struct StageArgs {
    /// Intra-op threads of this actor's compute thread (`None`: libtorch's default); see
    /// [`crate::runtime::topology::Topology::cpu_threads`].
    pub threads: Option<i32>,
    pub name: String,
    pub role: Role,
    pub cfg: DeemConfig,
    pub device: deem::DeviceSpec,
    pub links: Links,
}

/// A typed handle to a stage actor: callers use async methods and never build messages.
#[derive(Clone)]
pub struct StageHandle {
    pub name: String,
    actor: ComputeHandle<StageWork>,
}

impl StageHandle {
    /// Spawns the stage's actor under `supervisor` (its compute thread builds the stage's modules
    /// before this returns).
    pub async fn spawn(supervisor: &Supervisor, args: StageArgs) -> Result<Self> {
        let name = args.name.clone();
        let StageArgs {
            threads,
            name: n,
            role,
            cfg,
            device,
            links,
        } = args;
        let spec = ComputeSpec {
            name: name.clone(),
            device: device.to_string(),
            threads,
            build: Box::new(move || StageWork::new(n, role, cfg, device.into(), links)),
            fault_at_job: None,
        };
        let actor = supervisor
            .spawn(spec)
            .await
            .map_err(|source| PipelineError::Start {
                actor: name.clone(),
                source,
            })?;
        Ok(StageHandle { name, actor })
    }

    /// Runs the step's ops; with `fail` the compute thread panics at that op (fault injection).
    pub async fn step(
        &self,
        step: u64,
        data: Vec<MbData>,
        ops: Vec<Op>,
        plan: MbPlan,
        fail: Option<usize>,
    ) -> Result<StepOut> {
        self.actor
            .call(|reply| StageMsg::Step {
                step,
                data,
                ops,
                plan,
                fail,
                reply,
            })
            .await?
    }

    /// All-reduces the stage's gradients over `group`: (squared norm after, bytes, seconds).
    pub async fn reduce(
        &self,
        group: std::sync::Arc<DistGroup>,
        bucket_bytes: usize,
    ) -> Result<(f64, u64, f64)> {
        self.actor
            .call(|reply| StageMsg::Reduce {
                group,
                bucket_bytes,
                reply,
            })
            .await?
    }

    pub async fn apply(&self, lrs: Option<BTreeMap<Group, f64>>, clip: f64) -> Result<()> {
        Ok(self
            .actor
            .call(|reply| StageMsg::Apply { lrs, clip, reply })
            .await?)
    }

    pub async fn load(
        &self,
        pretrained: Arc<Pretrained>,
        complete: bool,
        apply: bool,
    ) -> Result<Filled> {
        self.actor
            .call(|reply| StageMsg::Load {
                pretrained,
                complete,
                apply,
                reply,
            })
            .await?
    }

    pub async fn weights(&self) -> Result<Vec<(String, Tensor)>> {
        Ok(self.actor.call(|reply| StageMsg::Weights { reply }).await?)
    }

    pub async fn save(&self, dir: std::path::PathBuf) -> Result<()> {
        self.actor
            .call(|reply| StageMsg::Save { dir, reply })
            .await?
    }

    pub async fn restore(&self, dir: std::path::PathBuf, steps: u64) -> Result<()> {
        self.actor
            .call(|reply| StageMsg::Restore { dir, steps, reply })
            .await?
    }

    /// Stops the actor and waits for its compute thread.
    pub async fn stop(self) {
        self.actor.stop().await
    }
}
