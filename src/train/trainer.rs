//! The single-process reference trainer (microbatched gradient accumulation over the whole model on one
//! device) and the weight plumbing both trainers share: snapshots, setting variables by global name,
//! and a stage's parameters and AdamW moments in checkpoint files. The pipelined runtime must
//! reproduce the losses and weights this trainer produces for the same seed.

use std::collections::BTreeMap;

use tch::{nn, Tensor};

use super::optimizer::{
    master_key, moment_keys, update_plan, AdamW, Group, LossScaler, StepReport,
};
use crate::config::DeemConfig;
use crate::models::deem::{Batch, Deem};
use crate::models::ModelError;
use crate::train::TrainError;

/// The single-process reference trainer.
pub struct Trainer {
    pub vs: nn::VarStore,
    pub model: Deem,
    pub opt: AdamW,
    pub cfg: DeemConfig,
    /// Training steps taken (a step skipped for an f16 overflow counts; the optimizer's own count does
    /// not include it).
    pub step: u64,
    pub scaler: LossScaler,
}

impl Trainer {
    /// Builds the model on `device` with weights initialised from `cfg.train.seed`, held in
    /// `model.dtype` (trainable parameters with fp32 master weights set from the fp32 initialisation).
    pub fn new(cfg: &DeemConfig, device: tch::Device) -> Result<Self, ModelError> {
        let mut vs = nn::VarStore::new(device);
        let model = crate::with_init_lock(Some(cfg.train.seed), || Deem::new(&vs.root(), cfg))?;
        let opt = optimizer_in_dtype(&mut vs, cfg);
        Ok(Trainer {
            vs,
            model,
            opt,
            cfg: cfg.clone(),
            step: 0,
            scaler: LossScaler::of(cfg),
        })
    }

    /// One optimizer step over `batch`, split into `train.microbatches` microbatches whose gradients
    /// accumulate (each microbatch's loss weighted 1/m).
    pub fn step(&mut self, batch: &Batch) -> Result<StepReport, ModelError> {
        let t = &self.cfg.train;
        let step = self.step;
        let m = t.microbatches as i64;
        let scale = self.scaler.scale;
        let mut sums = [0f64; 4];
        for (i, mb) in batch.split(m, self.model.ids.soi)?.iter().enumerate() {
            let l = self.model.losses(mb, t.seed, step, i as u64)?;
            (&l.total / m as f64 * scale).backward();
            self.opt.accumulate(scale);
            for (s, v) in sums.iter_mut().zip([&l.total, &l.ntp, &l.nip, &l.csr]) {
                *s += v.double_value(&[]) / m as f64;
            }
        }
        let (grad_norm, clip, lrs) = update_plan(t, step, self.opt.grad_sq_norm());
        let skipped = !self.scaler.update(grad_norm);
        if !skipped {
            self.opt.step(&lrs, clip);
        }
        self.opt.zero_grad();
        self.step += 1;
        Ok(StepReport {
            step,
            total: sums[0],
            ntp: sums[1],
            nip: sums[2],
            csr: sums[3],
            grad_norm,
            lr: lrs[&Group::Other],
            loss_scale: scale,
            skipped,
        })
    }
}

/// Casts `vs`, built in fp32, to `model.dtype` and makes its optimizer under the stage rules. In mixed
/// precision the trainable variables' fp32 values are kept first, as their masters.
pub fn optimizer_in_dtype(vs: &mut nn::VarStore, cfg: &DeemConfig) -> AdamW {
    let masters: Option<BTreeMap<String, Tensor>> = (cfg.model.dtype != crate::config::DType::F32)
        .then(|| {
            vs.variables()
                .into_iter()
                .filter(|(k, _)| super::optimizer::group_of(&cfg.train, k).is_some())
                .map(|(k, v)| (k, v.detach().copy()))
                .collect()
        });
    set_dtype(vs, cfg.model.dtype);
    let mut opt = AdamW::for_stage(vs, &cfg.train);
    if let Some(m) = masters {
        opt.set_masters(&m);
    }
    opt
}

/// Casts every floating variable of `vs` to `dtype` (the model's storage and compute precision).
pub fn set_dtype(vs: &mut nn::VarStore, dtype: crate::config::DType) {
    match dtype {
        crate::config::DType::F32 => vs.float(),
        crate::config::DType::Bf16 => vs.bfloat16(),
        crate::config::DType::F16 => vs.half(),
    }
}

/// The variables of `vs` on the CPU under their names, in name order, detached (for writing out; on the CPU they share
/// storage with the live parameters).
pub fn cpu_weights(vs: &nn::VarStore) -> Vec<(String, Tensor)> {
    // In name order (the variable store's own order is a hash map's).
    let sorted: BTreeMap<String, Tensor> = vs.variables().into_iter().collect();
    sorted
        .into_iter()
        .map(|(k, v)| (k, v.detach().to_device(tch::Device::Cpu)))
        .collect()
}

/// Sets every variable of `vs` to its value in `weights` (global names; converted to the variable's dtype
/// and device), e.g. a previous stage's model. Every name and shape is checked before any value is
/// replaced, so a bad set leaves `vs` as it was. A variable without a value is an error, except the
/// region extractor's (a model saved before region support): it keeps its initial values.
pub fn set_variables(
    vs: &nn::VarStore,
    weights: &BTreeMap<String, Tensor>,
) -> Result<(), TrainError> {
    let mut pairs = Vec::new();
    // In name order, so that of several faults the same one is reported every time.
    let vars: BTreeMap<String, Tensor> = vs.variables().into_iter().collect();
    for (name, var) in vars {
        match weights.get(&name) {
            None if crate::models::region::is_extractor_key(&name) => {}
            None => return Err(TrainError::from(format!("the model has no `{name}`"))),
            Some(src) if src.size() != var.size() => {
                return Err(TrainError::from(format!(
                    "`{name}` is {:?}, the model expects {:?}",
                    src.size(),
                    var.size()
                )))
            }
            Some(src) => pairs.push((var, src)),
        }
    }
    tch::no_grad(|| {
        for (mut var, src) in pairs {
            var.copy_(&src.to_kind(var.kind()).to_device(var.device()));
        }
    });
    Ok(())
}

/// Writes the parameters of `vs` (each in its own dtype), the AdamW moments of `opt` and, in mixed
/// precision, its fp32 master weights to one safetensors file (atomically).
pub fn save_shard(
    path: &std::path::Path,
    vs: &nn::VarStore,
    opt: &AdamW,
) -> Result<(), crate::checkpoint::CheckpointError> {
    let mut tensors = cpu_weights(vs);
    for p in &opt.params {
        let (m, v) = moment_keys(&p.name);
        tensors.push((m, p.exp_avg.to_device(tch::Device::Cpu)));
        tensors.push((v, p.exp_avg_sq.to_device(tch::Device::Cpu)));
        if let Some(w) = &p.master {
            tensors.push((master_key(&p.name), w.to_device(tch::Device::Cpu)));
        }
    }
    crate::checkpoint::save(path, &tensors)
}

/// Restores the parameters of `vs` and the moments of `opt` from a checkpoint holding them under their
/// global names (written by [`save_shard`] from any topology), and the optimizer's step count. Master
/// weights come from the checkpoint's fp32 masters, or from its parameters when it has none (a
/// checkpoint of an fp32 run resumed in bf16). A
/// checkpoint written before region support lacks the mask-aware extractor: it keeps its initial values
/// and zero moments.
pub fn load_shard(
    ck: &crate::checkpoint::Checkpoint,
    vs: &nn::VarStore,
    opt: &mut AdamW,
    steps: u64,
) -> Result<(), crate::checkpoint::CheckpointError> {
    let spec = crate::checkpoint::LoadSpec {
        component: "training state".into(),
        namespace: vec![],
        ignore: vec![],
        optional: crate::models::region::key_prefixes(),
    };
    ck.load_into(vs, &spec)?;
    let missing: Vec<String> = opt
        .params
        .iter()
        // An extractor absent from the checkpoint (written before region support) has no moments.
        .filter(|p| !crate::models::region::is_extractor_key(&p.name) || ck.contains(&p.name))
        .flat_map(|p| {
            let (m, v) = moment_keys(&p.name);
            [m, v]
        })
        .filter(|k| !ck.contains(k))
        .collect();
    if !missing.is_empty() {
        return Err(crate::checkpoint::CheckpointError::Mismatch(
            crate::checkpoint::MismatchReport {
                source: ck.source.clone(),
                component: "optimizer state".into(),
                missing,
                ..Default::default()
            },
        ));
    }
    tch::no_grad(|| -> Result<(), crate::checkpoint::CheckpointError> {
        for p in &mut opt.params {
            let (m, v) = moment_keys(&p.name);
            if let (Some(a), Some(b)) = (ck.tensor(&m)?, ck.tensor(&v)?) {
                p.exp_avg
                    .copy_(&a.to_kind(tch::Kind::Float).to_device(p.exp_avg.device()));
                p.exp_avg_sq
                    .copy_(&b.to_kind(tch::Kind::Float).to_device(p.exp_avg_sq.device()));
            }
            let Some(master) = &mut p.master else {
                continue;
            };
            let key = master_key(&p.name);
            let key = if ck.contains(&key) {
                key
            } else {
                p.name.clone()
            };
            if let Some(w) = ck.tensor(&key)? {
                master.copy_(&w.to_kind(tch::Kind::Float).to_device(master.device()));
            }
        }
        Ok(())
    })?;
    opt.steps = steps;
    Ok(())
}
