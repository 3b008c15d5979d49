//! One stage's forward computation of one microbatch, apart from what it receives and sends, after
//! Megatron-LM's activation recomputation: with `train.recompute = "full"` the stage runs it without
//! autograd in the forward pass, keeps only what it received, and runs it again with autograd right
//! before the backward, so the same float operations give the same gradients while the activations of
//! only one microbatch are alive at a time.

use deem::config::DeemConfig;
use deem::models::deem::{embed_sequence, llm_forward, llm_forward_span, SpecialIds};
use deem::models::llama::LlamaShard;
use deem::models::losses::{nip_inputs, ntp_loss, LossWeights};
use deem::rng::ints;
use tch::{Kind, Tensor};

use super::error::PipelineError;
use super::modules::Modules;

type Result<T, E = PipelineError> = std::result::Result<T, E>;

/// Where a replica's microbatches sit in the global batch.
#[derive(Debug, Clone, Copy)]
pub struct MbPlan {
    /// Global index of this replica's first microbatch (the diffusion noise key uses global indices).
    pub offset: u32,
    /// Microbatches of the global batch, over every replica (each loss is divided by it).
    pub total: u32,
    /// The loss scale of the step's backward (f16; 1 otherwise).
    pub loss_scale: f64,
}

/// The inputs of one microbatch a stage needs (ids for shards, pixels for vision and diffusion).
pub struct MbData {
    pub id: uuid::Uuid,
    /// The driver's span for this microbatch; the stage works inside it.
    pub span: tracing::Span,
    pub ids: Option<Tensor>,
    /// Shards: which ids are NTP targets ([`deem::models::deem::Batch::loss_mask`]).
    pub loss_mask: Option<Tensor>,
    pub pixels: Option<Tensor>,
    /// Vision and diffusion: the images' region masks ([`deem::models::deem::Batch::masks`]).
    pub masks: Option<Tensor>,
}

/// What a microbatch's forward received from upstream: leaves whose gradients go back.
#[derive(Default)]
pub(super) struct Received {
    /// Shards: the visual tokens or the previous shard's hidden states. Diffusion: the NIP context.
    pub input: Option<Tensor>,
    /// Diffusion: the NIP context's mask and the images it draws.
    pub nip: Option<(Tensor, Vec<i64>)>,
    /// Diffusion: the CSR condition.
    pub csr_input: Option<Tensor>,
}

/// What the forward produced.
#[derive(Default)]
pub(super) struct Computed {
    /// Sent downstream, whose gradient comes back.
    pub output: Option<Tensor>,
    pub csr_output: Option<Tensor>,
    /// A local loss to add to the backward (NTP on the last shard, the diffusion losses).
    pub loss: Option<Tensor>,
    /// The forward edge's message: detached tensors and the NIP image index.
    pub fwd: Option<(Option<Vec<Tensor>>, Vec<i64>)>,
    /// The CSR edge's message (vision).
    pub csr: Option<Option<Vec<Tensor>>>,
    /// The unweighted losses for the step's report, read by the forward pass only (a recomputation
    /// does not read them again: on a GPU each read waits for the device).
    pub ntp: Option<Tensor>,
    pub nip: Option<Tensor>,
    pub csr_loss: Option<Tensor>,
    /// `train.recompute = { layers = N }`: the shard's first layers ran without autograd.
    pub segment: Option<Segment>,
}

/// The first `layers` decoder layers of a shard, run without autograd in the forward: their input is
/// kept, and their output entered the rest of the shard as a leaf whose gradient the backward sends
/// through the recomputed layers ([`Segment::backward`]).
pub(super) struct Segment {
    pub input: Tensor,
    pub output: Tensor,
    pub layers: usize,
}

impl Segment {
    /// Runs the segment's layers again with autograd and back-propagates its output's gradient through
    /// them (to their parameters and the shard's input): the gradients of an unsegmented backward.
    pub fn backward(&self, shard: &LlamaShard, ids: &Tensor, cfg: &DeemConfig) {
        let g = self.output.grad();
        if !g.defined() {
            return;
        }
        let again = llm_forward_span(shard, &self.input, ids, cfg, 0..self.layers);
        (again * g).sum(Kind::Float).backward();
    }
}

/// What every microbatch of a step shares.
pub(super) struct Ctx<'a> {
    pub name: &'a str,
    pub cfg: &'a DeemConfig,
    pub ids: SpecialIds,
    pub dev: tch::Device,
    pub step: u64,
    pub plan: MbPlan,
}

fn needed<'t>(t: &'t Option<Tensor>, name: &str, what: &str) -> Result<&'t Tensor> {
    t.as_ref()
        .ok_or_else(|| PipelineError::stage(name, format!("no {what} in the step's data")))
}

/// Whether autograd records operations here (tch has no getter: an operation on a leaf that requires
/// a gradient tells).
fn grad_mode() -> bool {
    (Tensor::zeros([1], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true) * 1.0)
        .requires_grad()
}

/// Microbatch `mb`'s forward on `modules` from `data` and what was received.
pub(super) fn compute(
    modules: &Modules,
    c: &Ctx<'_>,
    mb: u32,
    data: &MbData,
    rx: &Received,
) -> Result<Computed> {
    let w = LossWeights::of(c.cfg);
    let m = c.plan.total as f64;
    let mut out = Computed::default();
    match modules {
        Modules::Vision(v) => {
            let pixels = needed(&data.pixels, c.name, "pixels")?.to_device(c.dev);
            let (vis, csr) = if pixels.size()[0] > 0 {
                let (vis, csr) = v.forward_regions(&pixels, data.masks.as_ref());
                (Some(vis), (w.csr > 0.0).then_some(csr))
            } else {
                (None, None)
            };
            out.fwd = Some((vis.as_ref().map(|t| vec![t.detach()]), vec![]));
            out.csr = Some(csr.as_ref().map(|t| vec![t.detach()]));
            out.output = vis;
            out.csr_output = csr;
        }
        Modules::Llm(shard) => {
            let ids = needed(&data.ids, c.name, "token ids")?.to_device(c.dev);
            let h_in = if shard.is_first() {
                embed_sequence(shard, &ids, rx.input.as_ref(), c.ids)
                    .map_err(|e| PipelineError::stage(c.name, e.to_string()))?
            } else {
                rx.input
                    .as_ref()
                    .ok_or_else(|| {
                        PipelineError::stage(c.name, "a middle shard got no hidden states")
                    })?
                    .shallow_clone()
            };
            let n = shard.range.end - shard.range.start;
            let k = c.cfg.train.recompute.layers_of(n as usize);
            let h = if k > 0 && grad_mode() {
                let mid = tch::no_grad(|| llm_forward_span(shard, &h_in, &ids, c.cfg, 0..k));
                let mid = mid.set_requires_grad(true);
                let h = llm_forward_span(shard, &mid, &ids, c.cfg, k..n as usize);
                out.segment = Some(Segment {
                    input: h_in,
                    output: mid,
                    layers: k,
                });
                h
            } else {
                llm_forward(shard, &h_in, &ids, c.cfg)
            };
            if shard.is_last() {
                let hidden = shard.norm(&h);
                let ntp = ntp_loss(&shard.logits(&hidden), &ids, data.loss_mask.as_ref(), c.ids);
                out.loss = Some(&ntp / m);
                out.ntp = Some(ntp);
                // No image in the microbatch: nip_inputs finds no context and returns None.
                out.fwd = Some(
                    match (w.nip > 0.0)
                        .then(|| nip_inputs(&hidden, &ids, c.ids))
                        .flatten()
                    {
                        Some((ctx, mask, index)) => {
                            out.output = Some(ctx.shallow_clone());
                            (Some(vec![ctx.detach(), mask]), index)
                        }
                        None => (None, vec![]),
                    },
                );
            } else {
                out.fwd = Some((Some(vec![h.detach()]), vec![]));
                out.output = Some(h);
            }
        }
        Modules::Diffusion(d) => {
            let pixels = needed(&data.pixels, c.name, "pixels")?.to_device(c.dev);
            let key = (c.cfg.train.seed, c.step, (c.plan.offset + mb) as u64);
            let zero = || Tensor::zeros([], (Kind::Float, c.dev));
            let mut nip = zero();
            if let (Some(ctx), Some((mask, index))) = (&rx.input, &rx.nip) {
                let sel = pixels.index_select(0, &ints(index).to_device(c.dev));
                nip = d.nip_loss(ctx, mask, &sel, key);
            }
            let mut csr = zero();
            if let Some(cond) = &rx.csr_input {
                csr = d.csr_loss_regions(cond, &pixels, data.masks.as_ref(), key);
            }
            // NTP is the last shard's; this stage adds its weighted diffusion terms.
            out.loss = Some(w.combine(zero(), nip.shallow_clone(), csr.shallow_clone()) / m);
            out.nip = Some(nip);
            out.csr_loss = Some(csr);
        }
    }
    Ok(out)
}

/// One microbatch's backward through a stage: its local loss (scaled by `loss_scale`; the gradients
/// that come in already carry the scale) plus each output against the gradient that came back for it:
/// (output · g).sum() has exactly the gradients that passing g into output's backward would.
pub(super) fn backward_of(
    loss: Option<&Tensor>,
    loss_scale: f64,
    outputs: [(Option<&Tensor>, Option<&Tensor>); 2],
) {
    let mut terms: Vec<Tensor> = Vec::new();
    if let Some(l) = loss.filter(|l| l.requires_grad()) {
        terms.push(l * loss_scale);
    }
    for (o, g) in outputs {
        if let (Some(o), Some(g)) = (o, g) {
            terms.push((o * g).sum(Kind::Float));
        }
    }
    if let Some(total) = terms
        .into_iter()
        .reduce(|a, b| a + b)
        .filter(|t| t.requires_grad())
    {
        total.backward();
    }
}

/// A received tensor as a leaf on `device` whose gradient goes back to its sender.
pub(super) fn leaf(t: &Tensor, device: tch::Device) -> Tensor {
    // A tensor crossing devices is moved by the receiver.
    t.to_device(device).detach().set_requires_grad(true)
}
