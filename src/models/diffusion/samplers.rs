//! Sampling loops beside DDIM, after diffusers' `scheduling_ddpm.py` (ancestral sampling with the
//! "fixed_small" variance, as the reference draws its images) and `scheduling_dpmsolver_multistep.py`
//! (DPM-Solver++ of order 2, midpoint, first order at the last step, final sigma 0), with Stable
//! Diffusion's spacing, and [`Sampler`], the one loop every caller runs whichever is chosen. The
//! schedule's maths are in f64 on scalars (diffusers': f32), applied to f32 latents.

use tch::Tensor;

use super::scheduler::{split, Ddim, Ddpm};
use crate::config::{PredictionType, SamplerKind, SchedulerConfig};

/// DDPM ancestral sampling: "leading" timesteps with `steps_offset = 1` (as DDIM), ᾱ_prev = 1 before
/// the first timestep, and `√σ²_t · z` added at every step with the caller's noise `z`.
#[derive(Debug)]
pub struct DdpmSampler {
    ddpm: Ddpm,
    pub timesteps: Vec<i64>,
    step_ratio: i64,
}

impl DdpmSampler {
    pub fn new(cfg: &SchedulerConfig, steps: i64) -> Self {
        let step_ratio = cfg.num_train_timesteps / steps.max(1);
        DdpmSampler {
            ddpm: Ddpm::new(cfg),
            timesteps: (0..steps).rev().map(|i| i * step_ratio + 1).collect(),
            step_ratio,
        }
    }

    /// One reverse step from `x_t` with the model output at `t` and the step's noise `z`.
    pub fn step(&self, out: &Tensor, t: i64, x: &Tensor, z: &Tensor) -> Tensor {
        let acp = &self.ddpm.alphas_cumprod;
        let a_t = acp[t as usize];
        let prev = t - self.step_ratio;
        let a_prev = if prev >= 0 { acp[prev as usize] } else { 1.0 };
        let (beta_t, beta_prev) = (1.0 - a_t, 1.0 - a_prev);
        let alpha = a_t / a_prev;
        let current_beta = 1.0 - alpha;
        let (x0, _) = split(self.ddpm.prediction_type, out, x, a_t);
        let mean =
            x0 * (a_prev.sqrt() * current_beta / beta_t) + x * (alpha.sqrt() * beta_prev / beta_t);
        if t > 0 {
            let variance = (beta_prev / beta_t * current_beta).max(1e-20);
            mean + z * variance.sqrt()
        } else {
            mean
        }
    }
}

/// DPM-Solver++ (2M): "linspace" timesteps, σ_t = √((1 − ᾱ_t)/ᾱ_t) and a final σ of 0; each model
/// output becomes an x₀ prediction; the first step and the last are first order, the others second
/// order from the last two predictions.
#[derive(Debug)]
pub struct DpmSolver {
    prediction: PredictionType,
    alphas_cumprod: Vec<f64>,
    pub timesteps: Vec<i64>,
    /// One per timestep, then the final 0.
    sigmas: Vec<f64>,
}

impl DpmSolver {
    pub fn new(cfg: &SchedulerConfig, steps: i64) -> Self {
        let ddpm = Ddpm::new(cfg);
        let last = (cfg.num_train_timesteps - 1) as f64;
        let n = steps.max(1);
        // numpy's linspace(0, T − 1, n + 1) (i · step, the end point exact), rounded half to even,
        // reversed, without 0.
        let step = last / n as f64;
        let timesteps: Vec<i64> = (1..=n)
            .rev()
            .map(|i| {
                let v = if i == n { last } else { i as f64 * step };
                v.round_ties_even() as i64
            })
            .collect();
        let mut sigmas: Vec<f64> = timesteps
            .iter()
            .map(|&t| {
                let a = ddpm.alphas_cumprod[t as usize];
                ((1.0 - a) / a).sqrt()
            })
            .collect();
        sigmas.push(0.0);
        DpmSolver {
            prediction: ddpm.prediction_type,
            alphas_cumprod: ddpm.alphas_cumprod,
            timesteps,
            sigmas,
        }
    }

    /// (α_t, σ_t, λ_t) of a sigma.
    fn alpha_sigma(sigma: f64) -> (f64, f64, f64) {
        let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
        let s = sigma * alpha;
        (alpha, s, alpha.ln() - s.ln())
    }

    /// Step `i`: from `x` and the model output at `timesteps[i]`, with the previous step's x₀
    /// prediction (`None` at the first step); returns the next latents and this step's x₀.
    pub fn step(
        &self,
        i: usize,
        out: &Tensor,
        x: &Tensor,
        prev_x0: Option<&Tensor>,
    ) -> (Tensor, Tensor) {
        let a = self.alphas_cumprod[self.timesteps[i] as usize];
        let (x0, _) = split(self.prediction, out, x, a);
        let (alpha_t, sigma_t, lambda_t) = Self::alpha_sigma(self.sigmas[i + 1]);
        let (_, sigma_s, lambda_s) = Self::alpha_sigma(self.sigmas[i]);
        let h = lambda_t - lambda_s;
        let decay = (-h).exp() - 1.0;
        let last = i + 1 == self.timesteps.len();
        let next = match prev_x0.filter(|_| !last) {
            Some(m1) => {
                let (_, _, lambda_s1) = Self::alpha_sigma(self.sigmas[i - 1]);
                let r0 = (lambda_s - lambda_s1) / h;
                let d1 = (&x0 - m1) * (1.0 / r0);
                x * (sigma_t / sigma_s) - &x0 * (alpha_t * decay) - d1 * (0.5 * alpha_t * decay)
            }
            // At the last step σ_t = 0: λ_t = ∞, h = ∞ and the update returns x₀.
            None if sigma_t == 0.0 => x0.shallow_clone(),
            None => x * (sigma_t / sigma_s) - &x0 * (alpha_t * decay),
        };
        (next, x0)
    }
}

/// One of the samplers, built for a number of steps.
#[derive(Debug)]
pub enum Sampler {
    Ddim(Ddim),
    Ddpm(DdpmSampler),
    DpmSolver(DpmSolver),
}

impl Sampler {
    pub fn new(kind: SamplerKind, cfg: &SchedulerConfig, steps: i64) -> Self {
        match kind {
            SamplerKind::Ddim => Sampler::Ddim(Ddim::new(cfg, steps)),
            SamplerKind::Ddpm => Sampler::Ddpm(DdpmSampler::new(cfg, steps)),
            SamplerKind::DpmSolver => Sampler::DpmSolver(DpmSolver::new(cfg, steps)),
        }
    }

    pub fn timesteps(&self) -> &[i64] {
        match self {
            Sampler::Ddim(s) => &s.timesteps,
            Sampler::Ddpm(s) => &s.timesteps,
            Sampler::DpmSolver(s) => &s.timesteps,
        }
    }

    /// The whole loop from `noise` with `model(latents, t) → prediction`, classifier-free guided above a
    /// scale of 1 (the model then gets the doubled batch `[uncond; cond]`: the caller gives the doubled
    /// context). DDPM adds `step_noise(i)` (the latents' shape) at step `i`.
    pub fn sample(
        &self,
        noise: &Tensor,
        guidance: f64,
        mut model: impl FnMut(&Tensor, &Tensor) -> Tensor,
        mut step_noise: impl FnMut(usize) -> Tensor,
    ) -> Tensor {
        let mut x = noise.shallow_clone();
        let mut prev_x0: Option<Tensor> = None;
        for (i, &t) in self.timesteps().iter().enumerate() {
            let tt = Tensor::from(t).to_device(x.device());
            let out = if guidance > 1.0 {
                let both = model(&Tensor::cat(&[&x, &x], 0), &tt);
                let halves = both.chunk(2, 0);
                &halves[0] + (&halves[1] - &halves[0]) * guidance
            } else {
                model(&x, &tt)
            };
            x = match self {
                Sampler::Ddim(s) => s.step(&out, t, &x),
                Sampler::Ddpm(s) => s.step(&out, t, &x, &step_noise(i).to_device(x.device())),
                Sampler::DpmSolver(s) => {
                    let (next, x0) = s.step(i, &out, &x, prev_x0.as_ref());
                    prev_x0 = Some(x0);
                    next
                }
            };
        }
        x
    }
}
