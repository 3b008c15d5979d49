//! A pipeline stage's modules, after Megatron-LM's and torchtitan's stage construction: each stage builds
//! only its part of the model (vision, a range of LLM layers, or diffusion) in the model's dtype, with
//! the optimizer over it; the planner's layer benchmark builds the same way.

use deem::config::DeemConfig;
use deem::models::deem::{initial_weights_of, DiffusionStage, Part, VisionStage};
use deem::models::llama::{LlamaConfig, LlamaShard};
use deem::train::AdamW;
use tch::nn;

use crate::runtime::compute::BuildError;

/// What a stage computes.
#[derive(Debug, Clone, PartialEq)]
pub enum Role {
    Vision,
    Llm { layers: std::ops::Range<i64> },
    Diffusion,
}

/// The modules a stage runs.
pub(super) enum Modules {
    Vision(Box<VisionStage>),
    Llm(Box<LlamaShard>),
    Diffusion(Box<DiffusionStage>),
}

/// The part of the model a stage of `role` holds.
pub(super) fn part_of(role: &Role) -> Part {
    match role {
        Role::Vision => Part::Vision,
        Role::Llm { layers } => Part::Llm(layers.clone()),
        Role::Diffusion => Part::Diffusion,
    }
}

/// A stage's modules, VarStore (in `model.dtype`) and optimizer (fp32 masters set from the fp32
/// initialisation). The stage builds only its own modules. On the CPU they are drawn seeded in place
/// (each part from its own seed: the values a whole-model build gives them); on an accelerator they are
/// drawn unseeded and replaced by the CPU draw of this part alone, so every device starts from the same
/// numbers.
pub(super) fn build(
    role: &Role,
    cfg: &DeemConfig,
    device: tch::Device,
) -> Result<(nn::VarStore, Modules, AdamW), BuildError> {
    let mut vs = nn::VarStore::new(device);
    let root = vs.root();
    let part = part_of(role);
    let on_cpu = device == tch::Device::Cpu;
    let seed = on_cpu.then_some(cfg.train.seed);
    let modules = deem::with_init_lock(seed, || -> Result<Modules, BuildError> {
        Ok(match role {
            Role::Vision => Modules::Vision(Box::new(VisionStage::new(&root, cfg))),
            Role::Llm { layers } => Modules::Llm(Box::new(LlamaShard::new(
                &root,
                &LlamaConfig::from(&cfg.llm),
                layers.clone(),
            )?)),
            Role::Diffusion => Modules::Diffusion(Box::new(DiffusionStage::new(&root, cfg))),
        })
    })?;
    drop(root);
    if !on_cpu {
        deem::train::set_variables(&vs, &initial_weights_of(cfg, &part)?)?;
    }
    let opt = deem::train::optimizer_in_dtype(&mut vs, cfg);
    Ok((vs, modules, opt))
}
