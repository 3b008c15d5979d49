//! One pipeline stage: a ractor actor for control (run a step, apply the optimizer, hand over weights)
//! in front of a compute thread that owns the stage's modules, VarStore, optimizer state and KV-free
//! training activations. Activations and gradients travel between compute threads through bounded
//! flume channels, one per DAG edge, each message tagged with its microbatch.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use deem::config::DeemConfig;
use deem::llama::{LlamaConfig, LlamaShard};
use deem::model::{
    embed_sequence, llm_forward, loss_weights, nip_inputs, ntp_loss, special_ids, DiffusionStage,
    SpecialIds, VisionStage,
};
use deem::rng::ints;
use deem::train::{AdamW, Group};
use flume::{Receiver, Sender};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tch::{nn, Kind, Tensor};

use super::schedule::Op;

/// What a stage computes.
#[derive(Debug, Clone, PartialEq)]
pub enum Role {
    Vision,
    Llm { layers: std::ops::Range<i64> },
    Diffusion,
}

/// An activation or gradient on an edge; `None` when the microbatch has nothing for this edge (no images,
/// no NIP context, a loss term the stage does not train).
pub struct Packet {
    pub mb: u32,
    /// The microbatch's id (unique per step and microbatch), checked by the receiver.
    pub id: uuid::Uuid,
    pub tensors: Option<Vec<Tensor>>,
    /// The images a NIP context draws (last shard → diffusion).
    pub index: Vec<i64>,
}

impl Packet {
    /// A packet of microbatch `mb` (`id`) carrying `tensors` (no NIP image index).
    pub fn new(mb: u32, id: uuid::Uuid, tensors: Option<Vec<Tensor>>) -> Self {
        Packet {
            mb,
            id,
            tensors,
            index: vec![],
        }
    }
}

/// The channel ends of one stage (unused ones are `None`).
#[derive(Default)]
pub struct Links {
    /// Vision: to the first shard. Shards: to the next shard, or from the last to diffusion (NIP).
    pub fwd_out: Option<Sender<Packet>>,
    /// Vision → diffusion: the CSR condition.
    pub csr_out: Option<Sender<Packet>>,
    /// Shards: from vision or the previous shard. Diffusion: from the last shard (NIP).
    pub fwd_in: Option<Receiver<Packet>>,
    /// Diffusion: from vision.
    pub csr_in: Option<Receiver<Packet>>,
    /// Gradient of what `fwd_out` sent, coming back.
    pub grad_in: Option<Receiver<Packet>>,
    /// Vision: gradient of the CSR condition, from diffusion.
    pub csr_grad_in: Option<Receiver<Packet>>,
    /// Gradient of what `fwd_in` delivered, going back.
    pub grad_out: Option<Sender<Packet>>,
    /// Diffusion: gradient of the CSR condition, to vision.
    pub csr_grad_out: Option<Sender<Packet>>,
}

/// The inputs of one microbatch a stage needs (ids for shards, pixels for vision and diffusion).
pub struct MbData {
    pub id: uuid::Uuid,
    /// The driver's span for this microbatch; the stage works inside it.
    pub span: tracing::Span,
    pub ids: Option<Tensor>,
    /// Shards: which ids are NTP targets ([`deem::model::Batch::loss_mask`]).
    pub loss_mask: Option<Tensor>,
    pub pixels: Option<Tensor>,
    /// Vision and diffusion: the images' region masks ([`deem::model::Batch::masks`]).
    pub masks: Option<Tensor>,
}

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
}

enum Modules {
    Vision(Box<VisionStage>),
    Llm(Box<LlamaShard>),
    Diffusion(Box<DiffusionStage>),
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
}

struct Worker {
    name: String,
    cfg: DeemConfig,
    ids: SpecialIds,
    device: tch::Device,
    vs: nn::VarStore,
    modules: Modules,
    opt: AdamW,
    links: Links,
    saved: HashMap<u32, Saved>,
    idle: Duration,
    edges: BTreeMap<String, (u64, usize)>,
}

fn leaf(t: &Tensor, device: tch::Device) -> Tensor {
    // A tensor crossing devices is moved by the receiver.
    t.to_device(device).detach().set_requires_grad(true)
}

fn grad_of(t: &Option<Tensor>) -> Option<Vec<Tensor>> {
    t.as_ref().map(|x| {
        let g = x.grad();
        vec![if g.defined() { g } else { x.zeros_like() }]
    })
}

fn recv(
    name: &str,
    rx: &Option<Receiver<Packet>>,
    mb: u32,
    id: uuid::Uuid,
    edge: &str,
    idle: &mut Duration,
) -> Result<Packet, String> {
    let rx = rx
        .as_ref()
        .ok_or_else(|| format!("{name}: no {edge} channel"))?;
    let waited = Instant::now();
    let p = rx
        .recv()
        .map_err(|_| format!("{name}: the {edge} channel closed (a neighbour stopped)"))?;
    *idle += waited.elapsed();
    if p.mb != mb || p.id != id {
        return Err(format!(
            "{name}: expected microbatch {mb} ({id}) on {edge}, got {} ({})",
            p.mb, p.id
        ));
    }
    Ok(p)
}

fn send(
    name: &str,
    tx: &Option<Sender<Packet>>,
    p: Packet,
    edge: &str,
    idle: &mut Duration,
    edges: &mut BTreeMap<String, (u64, usize)>,
) -> Result<(), String> {
    let bytes: u64 = p
        .tensors
        .iter()
        .flatten()
        .map(|t| (t.numel() * t.kind().elt_size_in_bytes()) as u64)
        .sum();
    let tx = tx
        .as_ref()
        .ok_or_else(|| format!("{name}: no {edge} channel"))?;
    let waited = Instant::now();
    tx.send(p)
        .map_err(|_| format!("{name}: the {edge} channel closed (a neighbour stopped)"))?;
    let e = edges.entry(format!("{name}: {edge}")).or_insert((0, 0));
    e.0 += bytes;
    e.1 = e.1.max(tx.len());
    *idle += waited.elapsed();
    Ok(())
}

impl Worker {
    fn new(
        name: String,
        role: Role,
        cfg: DeemConfig,
        device: tch::Device,
        links: Links,
    ) -> Result<Self, String> {
        let vs = nn::VarStore::new(device);
        let root = vs.root();
        // Built under the init lock: the values are replaced by the reference initialisation, but drawing
        // them must not disturb a seeded build on another thread.
        let modules = deem::with_init_lock(None, || -> Result<Modules, String> {
            Ok(match role {
                Role::Vision => Modules::Vision(Box::new(VisionStage::new(&root, &cfg))),
                Role::Llm { layers } => Modules::Llm(Box::new(
                    LlamaShard::new(&root, &LlamaConfig::from(&cfg.llm), layers)
                        .map_err(|e| e.to_string())?,
                )),
                Role::Diffusion => Modules::Diffusion(Box::new(DiffusionStage::new(&root, &cfg))),
            })
        })?;
        let opt = AdamW::for_stage(&vs, &cfg.train);
        Ok(Worker {
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
        })
    }

    fn forward(
        &mut self,
        mb: u32,
        data: &MbData,
        step: u64,
        m: u32,
        out: &mut StepOut,
    ) -> Result<(), String> {
        let (nip_w, csr_w) = loss_weights(&self.cfg);
        let key = (self.cfg.train.seed, step, mb as u64);
        let dev = self.device;
        let name = self.name.as_str();
        let links = &self.links;
        let mut idle = Duration::ZERO;
        let id = data.id;
        let mut saved = Saved {
            id,
            ..Default::default()
        };
        let mut sends: Vec<(&Option<Sender<Packet>>, Packet, &str)> = Vec::new();
        match &self.modules {
            Modules::Vision(v) => {
                let pixels = data
                    .pixels
                    .as_ref()
                    .ok_or("vision stage without pixels")?
                    .to_device(dev);
                let (vis, csr) = if pixels.size()[0] > 0 {
                    let (vis, csr) = v.forward_regions(&pixels, data.masks.as_ref());
                    (Some(vis), (csr_w > 0.0).then_some(csr))
                } else {
                    (None, None)
                };
                sends.push((
                    &links.fwd_out,
                    Packet::new(mb, id, vis.as_ref().map(|t| vec![t.detach()])),
                    "vision→llm",
                ));
                sends.push((
                    &links.csr_out,
                    Packet::new(mb, id, csr.as_ref().map(|t| vec![t.detach()])),
                    "vision→diffusion",
                ));
                saved.output = vis;
                saved.csr_output = csr;
            }
            Modules::Llm(shard) => {
                let ids = data
                    .ids
                    .as_ref()
                    .ok_or("llm stage without ids")?
                    .to_device(dev);
                let p = recv(name, &links.fwd_in, mb, id, "llm input", &mut idle)?;
                let input = p.tensors.as_ref().map(|t| leaf(&t[0], dev));
                let h_in = if shard.is_first() {
                    embed_sequence(shard, &ids, input.as_ref(), self.ids)
                        .map_err(|e| e.to_string())?
                } else {
                    input
                        .as_ref()
                        .ok_or("a middle shard got no hidden states")?
                        .shallow_clone()
                };
                let h = llm_forward(shard, &h_in, &ids, &self.cfg);
                let next = if shard.is_last() {
                    let hidden = shard.norm(&h);
                    let ntp = ntp_loss(
                        &shard.logits(&hidden),
                        &ids,
                        data.loss_mask.as_ref(),
                        self.ids,
                    );
                    out.ntp.push(ntp.double_value(&[]));
                    saved.loss = Some(ntp / m as f64);
                    // No image in the microbatch: nip_inputs finds no context and returns None.
                    match (nip_w > 0.0)
                        .then(|| nip_inputs(&hidden, &ids, self.ids))
                        .flatten()
                    {
                        Some((ctx, mask, index)) => {
                            saved.output = Some(ctx.shallow_clone());
                            Packet {
                                mb,
                                id,
                                tensors: Some(vec![ctx.detach(), mask]),
                                index,
                            }
                        }
                        None => Packet::new(mb, id, None),
                    }
                } else {
                    saved.output = Some(h.shallow_clone());
                    Packet::new(mb, id, Some(vec![h.detach()]))
                };
                sends.push((&links.fwd_out, next, "llm output"));
                saved.input = input;
            }
            Modules::Diffusion(d) => {
                let pixels = data
                    .pixels
                    .as_ref()
                    .ok_or("diffusion stage without pixels")?
                    .to_device(dev);
                let csr_p = recv(name, &links.csr_in, mb, id, "vision→diffusion", &mut idle)?;
                let nip_p = recv(name, &links.fwd_in, mb, id, "llm→diffusion", &mut idle)?;
                let zero = || Tensor::zeros([], (Kind::Float, dev));
                let mut nip = zero();
                if let Some(t) = &nip_p.tensors {
                    let ctx = leaf(&t[0], dev);
                    let mask = t[1].to_device(dev);
                    let sel = pixels.index_select(0, &ints(&nip_p.index).to_device(dev));
                    nip = d.nip_loss(&ctx, &mask, &sel, key);
                    saved.input = Some(ctx);
                }
                let mut csr = zero();
                if let Some(t) = &csr_p.tensors {
                    let cond = leaf(&t[0], dev);
                    csr = d.csr_loss_regions(&cond, &pixels, data.masks.as_ref(), key);
                    saved.csr_input = Some(cond);
                }
                out.nip.push(nip.double_value(&[]));
                out.csr.push(csr.double_value(&[]));
                saved.loss = Some((nip * nip_w + csr * csr_w) / m as f64);
            }
        }
        for (tx, p, edge) in sends {
            send(name, tx, p, edge, &mut idle, &mut self.edges)?;
        }
        self.idle += idle;
        self.saved.insert(mb, saved);
        Ok(())
    }

    fn backward(&mut self, mb: u32) -> Result<(), String> {
        let name = self.name.as_str();
        let dev = self.device;
        let mut idle = Duration::ZERO;
        let saved = self
            .saved
            .remove(&mb)
            .ok_or_else(|| format!("{name}: backward of microbatch {mb} before its forward"))?;
        let id = saved.id;
        // Gradients of what this stage sent downstream.
        let g_out = match &self.links.grad_in {
            Some(_) => recv(name, &self.links.grad_in, mb, id, "gradient in", &mut idle)?.tensors,
            None => None,
        };
        let g_csr = match &self.links.csr_grad_in {
            Some(_) => {
                recv(
                    name,
                    &self.links.csr_grad_in,
                    mb,
                    id,
                    "csr gradient in",
                    &mut idle,
                )?
                .tensors
            }
            None => None,
        };
        // (output · g).sum() has exactly the gradients that passing g into output's backward would.
        let mut terms: Vec<Tensor> = Vec::new();
        if let Some(l) = saved.loss.as_ref().filter(|l| l.requires_grad()) {
            terms.push(l.shallow_clone());
        }
        if let (Some(o), Some(g)) = (&saved.output, &g_out) {
            terms.push((o * g[0].to_device(dev)).sum(Kind::Float));
        }
        if let (Some(o), Some(g)) = (&saved.csr_output, &g_csr) {
            terms.push((o * g[0].to_device(dev)).sum(Kind::Float));
        }
        if let Some(total) = terms
            .into_iter()
            .reduce(|a, b| a + b)
            .filter(|t| t.requires_grad())
        {
            total.backward();
        }
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

    fn run_step(&mut self, step: u64, data: Vec<MbData>, ops: Vec<Op>) -> Result<StepOut, String> {
        let started = Instant::now();
        self.idle = Duration::ZERO;
        self.edges.clear();
        let m = data.len() as u32;
        let mut out = StepOut::default();
        for op in ops {
            match op {
                Op::Forward(mb) => {
                    let d = &data[mb as usize];
                    let _in_span = d.span.enter();
                    tracing::trace!(stage = %self.name, mb, "forward");
                    self.forward(mb, d, step, m, &mut out)?
                }
                Op::Backward(mb) => {
                    let _in_span = data[mb as usize].span.enter();
                    tracing::trace!(stage = %self.name, mb, "backward");
                    self.backward(mb)?
                }
            }
        }
        out.sq_grad_norm = self.opt.grad_sq_norm();
        out.idle = self.idle;
        out.edges = std::mem::take(&mut self.edges);
        out.busy = started.elapsed().saturating_sub(self.idle);
        Ok(out)
    }

    fn load(&mut self, weights: &BTreeMap<String, Tensor>) -> Result<(), String> {
        deem::train::set_variables(&self.vs, weights).map_err(|e| format!("{}: {e}", self.name))
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
        /// Fault injection: the compute thread panics instead of running the step.
        fail: bool,
        reply: RpcReplyPort<Result<StepOut, String>>,
    },
    Apply {
        lrs: BTreeMap<Group, f64>,
        clip: f64,
        reply: RpcReplyPort<()>,
    },
    Load {
        weights: BTreeMap<String, Tensor>,
        reply: RpcReplyPort<Result<(), String>>,
    },
    Weights {
        reply: RpcReplyPort<Vec<(String, Tensor)>>,
    },
    /// Write parameters and optimizer moments to `dir/<stage>.safetensors`.
    Save {
        dir: std::path::PathBuf,
        reply: RpcReplyPort<Result<(), String>>,
    },
    /// Restore parameters, moments and the optimizer step count from a checkpoint directory.
    Restore {
        dir: std::path::PathBuf,
        steps: u64,
        reply: RpcReplyPort<Result<(), String>>,
    },
}

enum Command {
    Msg(StageMsg),
    Stop,
}

pub struct StageActor;

pub struct StageArgs {
    /// Intra-op threads of this actor's compute thread (`None`: libtorch's default). Actors sharing
    /// the CPU split its cores, so they compute side by side instead of fighting over every core.
    pub threads: Option<i32>,
    pub name: String,
    pub role: Role,
    pub cfg: DeemConfig,
    pub device: tch::Device,
    pub links: Links,
}

pub struct StageState {
    commands: flume::Sender<Command>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Actor for StageActor {
    type Msg = StageMsg;
    type State = StageState;
    type Arguments = StageArgs;

    async fn pre_start(
        &self,
        _me: ActorRef<StageMsg>,
        args: StageArgs,
    ) -> Result<StageState, ActorProcessingErr> {
        let (tx, rx) = flume::unbounded::<Command>();
        let (ready_tx, ready_rx) = flume::bounded::<Result<(), String>>(1);
        let name = args.name.clone();
        let threads = args.threads;
        // Tensor work runs on this thread, never on tokio's workers.
        let thread = std::thread::Builder::new()
            .name(format!("deem-{name}"))
            .spawn(move || {
                if let Some(n) = threads {
                    tch::set_num_threads(n);
                }
                let mut w =
                    match Worker::new(args.name, args.role, args.cfg, args.device, args.links) {
                        Ok(w) => {
                            let _ = ready_tx.send(Ok(()));
                            w
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    };
                while let Ok(Command::Msg(msg)) = rx.recv() {
                    match msg {
                        StageMsg::Step {
                            step,
                            data,
                            ops,
                            fail,
                            reply,
                        } => {
                            if fail {
                                panic!("fault injection: actor {} killed at step {step}", w.name);
                            }
                            let result = w.run_step(step, data, ops);
                            if result.is_err() {
                                // Close this stage's channels so its neighbours fail instead of waiting forever.
                                w.links = Links::default();
                            }
                            let _ = reply.send(result);
                        }
                        StageMsg::Apply { lrs, clip, reply } => {
                            w.opt.step(&lrs, clip);
                            w.opt.zero_grad();
                            let _ = reply.send(());
                        }
                        StageMsg::Load { weights, reply } => {
                            let _ = reply.send(w.load(&weights));
                        }
                        StageMsg::Weights { reply } => {
                            let _ = reply.send(w.weights());
                        }
                        StageMsg::Save { dir, reply } => {
                            let path = dir.join(format!("{}.safetensors", w.name));
                            let r = deem::train::save_shard(&path, &w.vs, &w.opt)
                                .map_err(|e| e.to_string());
                            let _ = reply.send(r);
                        }
                        StageMsg::Restore { dir, steps, reply } => {
                            let r = deem::checkpoint::Checkpoint::open(&dir)
                                .and_then(|ck| {
                                    deem::train::load_shard(&ck, &w.vs, &mut w.opt, steps)
                                })
                                .map_err(|e| e.to_string());
                            let _ = reply.send(r);
                        }
                    }
                }
            })?;
        let ready = tokio::task::spawn_blocking(move || ready_rx.recv()).await?;
        match ready {
            Ok(Ok(())) => Ok(StageState {
                commands: tx,
                thread: Some(thread),
            }),
            Ok(Err(e)) => Err(format!("stage {name}: {e}").into()),
            Err(_) => Err(format!("stage {name}: the compute thread died while building").into()),
        }
    }

    async fn handle(
        &self,
        _me: ActorRef<StageMsg>,
        msg: StageMsg,
        state: &mut StageState,
    ) -> Result<(), ActorProcessingErr> {
        state
            .commands
            .send(Command::Msg(msg))
            .map_err(|_| "the compute thread has stopped")?;
        Ok(())
    }

    async fn post_stop(
        &self,
        _me: ActorRef<StageMsg>,
        state: &mut StageState,
    ) -> Result<(), ActorProcessingErr> {
        let _ = state.commands.send(Command::Stop);
        if let Some(t) = state.thread.take() {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
        Ok(())
    }
}

/// A typed handle to a stage actor: callers use async methods and never build messages.
#[derive(Clone)]
pub struct StageHandle {
    pub name: String,
    actor: ActorRef<StageMsg>,
}

fn rpc_err(name: &str, e: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("stage {name}: {e}")
}

impl StageHandle {
    /// Spawns the actor (its compute thread builds the stage's modules before this returns).
    pub async fn spawn(args: StageArgs) -> anyhow::Result<(Self, tokio::task::JoinHandle<()>)> {
        let name = args.name.clone();
        let (actor, handle) = Actor::spawn(None, StageActor, args)
            .await
            .map_err(|e| rpc_err(&name, e))?;
        Ok((StageHandle { name, actor }, handle))
    }

    /// Runs the step's ops; with `fail` the compute thread panics instead (fault injection).
    pub async fn step(
        &self,
        step: u64,
        data: Vec<MbData>,
        ops: Vec<Op>,
        fail: bool,
    ) -> anyhow::Result<StepOut> {
        ractor::call!(self.actor, |reply| StageMsg::Step {
            step,
            data,
            ops,
            fail,
            reply
        })
        .map_err(|e| rpc_err(&self.name, e))?
        .map_err(|e| rpc_err(&self.name, e))
    }

    pub async fn apply(&self, lrs: BTreeMap<Group, f64>, clip: f64) -> anyhow::Result<()> {
        ractor::call!(self.actor, |reply| StageMsg::Apply { lrs, clip, reply })
            .map_err(|e| rpc_err(&self.name, e))
    }

    pub async fn load(&self, weights: BTreeMap<String, Tensor>) -> anyhow::Result<()> {
        ractor::call!(self.actor, |reply| StageMsg::Load { weights, reply })
            .map_err(|e| rpc_err(&self.name, e))?
            .map_err(|e| rpc_err(&self.name, e))
    }

    pub async fn weights(&self) -> anyhow::Result<Vec<(String, Tensor)>> {
        ractor::call!(self.actor, |reply| StageMsg::Weights { reply })
            .map_err(|e| rpc_err(&self.name, e))
    }

    pub async fn save(&self, dir: std::path::PathBuf) -> anyhow::Result<()> {
        ractor::call!(self.actor, |reply| StageMsg::Save { dir, reply })
            .map_err(|e| rpc_err(&self.name, e))?
            .map_err(|e| rpc_err(&self.name, e))
    }

    pub async fn restore(&self, dir: std::path::PathBuf, steps: u64) -> anyhow::Result<()> {
        ractor::call!(self.actor, |reply| StageMsg::Restore { dir, steps, reply })
            .map_err(|e| rpc_err(&self.name, e))?
            .map_err(|e| rpc_err(&self.name, e))
    }

    pub fn stop(&self) {
        self.actor.stop(None);
    }
}
