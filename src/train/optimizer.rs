//! Training rules, after PyTorch's AdamW and transformers' schedules: which parameters each stage trains
//! and at which learning rate (paper Table 12), AdamW with PyTorch's semantics over explicit parameter
//! groups, the cosine schedule with linear warm-up (as transformers' `get_cosine_schedule_with_warmup`)
//! and global grad-norm clipping. Both trainers (the reference one, `trainer.rs`, and the pipeline's
//! stages) step through here.

use std::collections::BTreeMap;

use tch::{nn, Kind, Tensor};

use crate::config::{Stage, TrainConfig};

/// Learning-rate group of a trainable parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Group {
    /// The vision trunk and, in stage I, the image-decoder parts (`train.encoder_lr`).
    Encoder,
    /// The LLM's base weights (`train.llm_lr`), trainable from stage II on.
    Llm,
    /// Everything else DEEM adds (`train.lr`).
    Other,
}

impl Group {
    pub fn lr(self, t: &TrainConfig) -> f64 {
        match self {
            Group::Encoder => t.encoder_lr,
            Group::Llm => t.llm_lr,
            Group::Other => t.lr,
        }
    }
}

fn starts(name: &str, prefixes: &[&str]) -> bool {
    prefixes.iter().any(|p| name.starts_with(p))
}

/// Whether parameter `name` belongs to the LLM DEEM starts from (HF `LlamaForCausalLM` names: token
/// embeddings, decoder layers, final norm, LM head), not to DEEM's additions (new tokens and head, SoI
/// vector).
pub fn is_base_llm(name: &str) -> bool {
    starts(
        name,
        &[
            "model.embed_tokens.",
            "model.layers.",
            "model.norm.",
            "lm_head.",
        ],
    )
}

/// The group of parameter `name` under the rules `t` (its stage), or `None` when it is frozen. UNet and
/// VAE are always frozen; the LLM's base weights train from stage II (or from stage I with
/// `train.train_llm_in_stage_one`; the original LM head only with
/// `train.train_lm_head`); the encoder trunk only in stage I.
pub fn group_of(t: &TrainConfig, name: &str) -> Option<Group> {
    let stage = t.stage;
    let llm = stage != Stage::I || t.train_llm_in_stage_one;
    if starts(name, &["unet.", "vae."]) {
        return None;
    }
    if is_base_llm(name) {
        let head = name.starts_with("lm_head.");
        return (llm && (!head || t.train_lm_head)).then_some(Group::Llm);
    }
    if starts(name, &["visual.trunk.", "visual.head."]) {
        return (stage == Stage::I).then_some(Group::Encoder);
    }
    if name.starts_with("nip_condition.") && stage == Stage::I {
        return Some(Group::Encoder);
    }
    Some(Group::Other)
}

/// transformers' cosine schedule with linear warm-up: the LR multiplier for optimizer step `step`
/// (0-based). Past `total` it stays at 0 (transformers' cosine would rise again).
pub fn lr_factor(step: u64, warmup: u64, total: u64) -> f64 {
    if step < warmup {
        return step as f64 / warmup.max(1) as f64;
    }
    let progress = ((step - warmup) as f64 / (total.saturating_sub(warmup)).max(1) as f64).min(1.0);
    (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
}

/// One trainable parameter with its AdamW state.
#[derive(Debug)]
pub struct Param {
    pub name: String,
    /// The model's variable (in `model.dtype`).
    pub tensor: Tensor,
    pub group: Group,
    pub decay: bool,
    /// AdamW moments, always fp32.
    pub exp_avg: Tensor,
    pub exp_avg_sq: Tensor,
    /// Mixed precision (a variable held in bf16/f16): the fp32 master weight the optimizer updates and
    /// the variable is rounded from after each step.
    pub master: Option<Tensor>,
    /// Mixed precision: the fp32 sum of the microbatches' gradients (each one unscaled), which the
    /// replicas all-reduce and the optimizer reads; the variable's own low-precision gradient is
    /// emptied into it after every microbatch's backward, so no sum is ever rounded to bf16/f16.
    pub grad32: Option<Tensor>,
}

impl Param {
    /// The gradient the optimizer reads: the fp32 accumulator in mixed precision, else the variable's.
    pub fn grad(&self) -> Option<Tensor> {
        match &self.master {
            Some(_) => self.grad32.as_ref().map(Tensor::shallow_clone),
            None => Some(self.tensor.grad()).filter(Tensor::defined),
        }
    }

    /// Gives the parameter a zero gradient when it has none (so that every replica reduces the same
    /// tensors).
    pub fn ensure_grad(&mut self) {
        if self.grad().is_some() {
            return;
        }
        match &self.master {
            Some(m) => self.grad32 = Some(m.zeros_like()),
            None => (&self.tensor * 0.0).sum(Kind::Float).backward(),
        }
    }
}

/// AdamW (decoupled weight decay, bias-corrected moments: `torch.optim.AdamW`) over named parameters.
#[derive(Debug)]
pub struct AdamW {
    pub params: Vec<Param>,
    pub betas: (f64, f64),
    pub eps: f64,
    pub weight_decay: f64,
    /// Optimizer steps taken.
    pub steps: u64,
}

impl AdamW {
    /// Marks every variable of `vs` trainable or frozen for `stage` and builds the optimizer over the
    /// trainable ones. Frozen variables get `requires_grad = false`: no gradient, no optimizer state.
    pub fn for_stage(vs: &nn::VarStore, t: &TrainConfig) -> Self {
        let vars: BTreeMap<String, Tensor> = vs.variables().into_iter().collect();
        let mut params = Vec::new();
        for (name, tensor) in vars {
            match group_of(t, &name) {
                None => {
                    let _ = tensor.set_requires_grad(false);
                }
                Some(group) => {
                    let tensor = tensor.set_requires_grad(true);
                    // No decay on vectors (norms, biases, the SoI vector), as is customary.
                    let decay = tensor.dim() >= 2;
                    let fp32 = || tensor.detach().to_kind(Kind::Float);
                    let exp_avg = fp32().zeros_like();
                    let exp_avg_sq = fp32().zeros_like();
                    let master = (tensor.kind() != Kind::Float).then(|| fp32().copy());
                    params.push(Param {
                        name,
                        tensor,
                        group,
                        decay,
                        exp_avg,
                        exp_avg_sq,
                        master,
                        grad32: None,
                    });
                }
            }
        }
        AdamW {
            params,
            betas: (t.betas[0], t.betas[1]),
            eps: t.eps,
            weight_decay: t.weight_decay,
            steps: 0,
        }
    }

    /// Mixed precision: moves each variable's gradient of the microbatch just back-propagated into its
    /// fp32 accumulator, divided by the loss scale it was computed under, and empties the variable's.
    /// Nothing to do for fp32 variables (their gradients accumulate in place).
    pub fn accumulate(&mut self, loss_scale: f64) {
        tch::no_grad(|| {
            for p in self.params.iter_mut().filter(|p| p.master.is_some()) {
                let mut g = p.tensor.grad();
                if !g.defined() {
                    continue;
                }
                let g32 = g.to_kind(Kind::Float) / loss_scale;
                p.grad32 = Some(match p.grad32.take() {
                    Some(acc) => acc + g32,
                    None => g32,
                });
                let _ = g.zero_();
            }
        });
    }

    /// Sets the fp32 master weights from `weights` (global names; full precision when the source has
    /// it, e.g. an fp32 initialisation or checkpoint loaded into a bf16 model).
    pub fn set_masters(&mut self, weights: &BTreeMap<String, Tensor>) {
        tch::no_grad(|| {
            for p in &mut self.params {
                if let (Some(m), Some(src)) = (&mut p.master, weights.get(&p.name)) {
                    m.copy_(&src.to_kind(Kind::Float).to_device(m.device()));
                }
            }
        });
    }

    /// Sets the fp32 master of parameter `name` (if it has one) from `src`: a value loaded from a file
    /// keeps its full precision in the master even when the variable holds it rounded.
    pub fn set_master(&mut self, name: &str, src: &Tensor) {
        tch::no_grad(|| {
            if let Some(m) = self
                .params
                .iter_mut()
                .find(|p| p.name == name)
                .and_then(|p| p.master.as_mut())
            {
                m.copy_(&src.to_kind(Kind::Float).to_device(m.device()));
            }
        });
    }

    /// Sum of squared gradient entries over the trainable parameters (not finite when a gradient
    /// overflowed).
    pub fn grad_sq_norm(&self) -> f64 {
        tch::no_grad(|| {
            self.params
                .iter()
                .filter_map(Param::grad)
                .map(|g| {
                    g.to_kind(Kind::Double)
                        .square()
                        .sum(Kind::Double)
                        .double_value(&[])
                })
                .sum()
        })
    }

    /// One update with `lrs[group]`, gradients first scaled by `clip` (≤ 1).
    pub fn step(&mut self, lrs: &BTreeMap<Group, f64>, clip: f64) {
        self.steps += 1;
        let (b1, b2) = self.betas;
        let bc1 = 1.0 - b1.powi(self.steps as i32);
        let bc2 = 1.0 - b2.powi(self.steps as i32);
        tch::no_grad(|| {
            for p in &mut self.params {
                let Some(g) = p.grad() else {
                    continue;
                };
                let g = if clip < 1.0 { g * clip } else { g };
                let lr = lrs[&p.group];
                // The update is computed on the fp32 master in mixed precision (the variable itself
                // otherwise), then rounded into the variable.
                let mut w = p.master.as_ref().unwrap_or(&p.tensor).shallow_clone();
                if p.decay && self.weight_decay > 0.0 {
                    let _ = w.g_mul_scalar_(1.0 - lr * self.weight_decay);
                }
                let _ = p.exp_avg.g_mul_scalar_(b1).g_add_(&(&g * (1.0 - b1)));
                let _ = p
                    .exp_avg_sq
                    .g_mul_scalar_(b2)
                    .g_add_(&(g.square() * (1.0 - b2)));
                let denom = (p.exp_avg_sq.sqrt() / bc2.sqrt()) + self.eps;
                let _ = w.g_add_(&(&p.exp_avg / denom * (-lr / bc1)));
                if p.master.is_some() {
                    p.tensor.copy_(&w);
                }
            }
        });
    }

    pub fn zero_grad(&mut self) {
        for p in &mut self.params {
            let mut g = p.tensor.grad();
            if g.defined() {
                let _ = g.zero_();
            }
            p.grad32 = None;
        }
    }
}

/// What one optimizer step did.
#[derive(Debug, Clone, PartialEq)]
pub struct StepReport {
    pub step: u64,
    pub total: f64,
    pub ntp: f64,
    pub nip: f64,
    pub csr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// The `train.lr` group's learning rate at this step.
    pub lr: f64,
    /// The loss scale the step's backward ran under (1 unless f16).
    pub loss_scale: f64,
    /// f16: the gradients overflowed, the optimizer did not step.
    pub skipped: bool,
}

/// What the optimizer step after a given set of gradients does: the global gradient norm, the clip
/// factor (≤ 1) and each group's learning rate. The reference trainer and the pipeline driver share it.
pub fn update_plan(
    t: &TrainConfig,
    step: u64,
    sq_grad_norm: f64,
) -> (f64, f64, BTreeMap<Group, f64>) {
    let grad_norm = sq_grad_norm.sqrt();
    let clip = (t.max_grad_norm / (grad_norm + 1e-6)).min(1.0);
    let f = lr_factor(step, t.warmup_steps, t.steps);
    let lrs = [Group::Encoder, Group::Llm, Group::Other]
        .iter()
        .map(|&g| (g, g.lr(t) * f))
        .collect();
    (grad_norm, clip, lrs)
}

/// Checkpoint key of the fp32 master weight of parameter `name` (mixed precision).
pub fn master_key(name: &str) -> String {
    format!("optimizer.master.{name}")
}

/// Checkpoint keys of the AdamW moments of parameter `name`.
pub fn moment_keys(name: &str) -> (String, String) {
    (
        format!("optimizer.exp_avg.{name}"),
        format!("optimizer.exp_avg_sq.{name}"),
    )
}

/// Dynamic loss scaling for f16 training, with `torch.cuda.amp.GradScaler`'s defaults: the losses are
/// multiplied by `scale` (`train.loss_scale_init`, 2^16 by default) before the backward so that small gradients survive f16; a step
/// whose gradients overflow is skipped and the scale halved; after 2000 steps in a row without overflow
/// the scale doubles. bf16 has f32's exponent range and f32 needs no scaling: the scale stays 1.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LossScaler {
    pub scale: f64,
    /// Steps in a row without overflow.
    pub good_steps: u64,
    /// Steps skipped for overflow, over the run.
    pub skipped: u64,
    enabled: bool,
}

/// GradScaler's `growth_factor`, `backoff_factor` and `growth_interval`.
const SCALE_GROWTH: f64 = 2.0;
const SCALE_BACKOFF: f64 = 0.5;
const SCALE_INTERVAL: u64 = 2000;

impl LossScaler {
    /// Optimizer steps taken after `steps` training steps (skipped ones do not count).
    pub fn optimizer_steps(&self, steps: u64) -> u64 {
        steps.saturating_sub(self.skipped)
    }

    /// The scaler of a run of `cfg`: scaling from `train.loss_scale_init` in f16, off otherwise.
    pub fn of(cfg: &crate::config::DeemConfig) -> Self {
        let enabled = cfg.model.dtype == crate::config::DType::F16;
        LossScaler {
            scale: if enabled {
                cfg.train.loss_scale_init
            } else {
                1.0
            },
            good_steps: 0,
            skipped: 0,
            enabled,
        }
    }

    /// Records a step's global gradient norm; returns whether the optimizer may apply it (false: an
    /// f16 overflow, the step is skipped and the scale backs off).
    pub fn update(&mut self, grad_norm: f64) -> bool {
        if !self.enabled {
            return true;
        }
        if !grad_norm.is_finite() {
            self.scale *= SCALE_BACKOFF;
            self.good_steps = 0;
            self.skipped += 1;
            return false;
        }
        self.good_steps += 1;
        if self.good_steps == SCALE_INTERVAL {
            self.scale *= SCALE_GROWTH;
            self.good_steps = 0;
        }
        true
    }
}
