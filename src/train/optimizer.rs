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
    pub tensor: Tensor,
    pub group: Group,
    pub decay: bool,
    pub exp_avg: Tensor,
    pub exp_avg_sq: Tensor,
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
                    let exp_avg = tensor.zeros_like().set_requires_grad(false);
                    let exp_avg_sq = tensor.zeros_like().set_requires_grad(false);
                    params.push(Param {
                        name,
                        tensor,
                        group,
                        decay,
                        exp_avg,
                        exp_avg_sq,
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

    /// Sum of squared gradient entries over the trainable parameters.
    pub fn grad_sq_norm(&self) -> f64 {
        tch::no_grad(|| {
            self.params
                .iter()
                .map(|p| p.tensor.grad())
                .filter(|g| g.defined())
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
                let g = p.tensor.grad();
                if !g.defined() {
                    continue;
                }
                let g = if clip < 1.0 { g * clip } else { g };
                let lr = lrs[&p.group];
                if p.decay && self.weight_decay > 0.0 {
                    let _ = p.tensor.g_mul_scalar_(1.0 - lr * self.weight_decay);
                }
                let _ = p.exp_avg.g_mul_scalar_(b1).g_add_(&(&g * (1.0 - b1)));
                let _ = p
                    .exp_avg_sq
                    .g_mul_scalar_(b2)
                    .g_add_(&(g.square() * (1.0 - b2)));
                let denom = (p.exp_avg_sq.sqrt() / bc2.sqrt()) + self.eps;
                let _ = p.tensor.g_add_(&(&p.exp_avg / denom * (-lr / bc1)));
            }
        });
    }

    pub fn zero_grad(&mut self) {
        for p in &mut self.params {
            let mut g = p.tensor.grad();
            if g.defined() {
                let _ = g.zero_();
            }
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

/// Checkpoint keys of the AdamW moments of parameter `name`.
pub fn moment_keys(name: &str) -> (String, String) {
    (
        format!("optimizer.exp_avg.{name}"),
        format!("optimizer.exp_avg_sq.{name}"),
    )
}
