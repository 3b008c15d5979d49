//! Noise schedules (diffusers `schedulers/scheduling_ddpm.py` for training, `scheduling_ddim.py` for
//! sampling); the guided loop over any of the samplers is `samplers::Sampler`.

use tch::{Kind, Tensor};

use crate::config::{BetaSchedule, PredictionType, SchedulerConfig};

/// The training schedule: `ᾱ_t` for t in `[0, num_train_timesteps)`.
#[derive(Debug)]
pub struct Ddpm {
    pub alphas_cumprod: Vec<f64>,
    pub prediction_type: PredictionType,
}

impl Ddpm {
    pub fn new(cfg: &SchedulerConfig) -> Self {
        let n = cfg.num_train_timesteps as usize;
        // diffusers computes the betas in float32; so do we, so the schedules agree to the last bit.
        let betas: Vec<f32> = match cfg.beta_schedule {
            BetaSchedule::Linear => linspace(cfg.beta_start as f32, cfg.beta_end as f32, n),
            BetaSchedule::ScaledLinear => linspace(
                (cfg.beta_start as f32).sqrt(),
                (cfg.beta_end as f32).sqrt(),
                n,
            )
            .into_iter()
            .map(|b| b * b)
            .collect(),
        };
        let mut acc = 1f32;
        let alphas_cumprod = betas
            .iter()
            .map(|b| {
                acc *= 1.0 - b;
                acc as f64
            })
            .collect();
        Ddpm {
            alphas_cumprod,
            prediction_type: cfg.prediction_type,
        }
    }

    /// The schedule's coefficients at `t`, from the fp32 table (the scheduler maths run on fp32 latents
    /// whatever the model's dtype: the UNet casts at its input and output).
    fn coeffs(&self, t: &Tensor, kind: Kind) -> (Tensor, Tensor) {
        let table = Tensor::from_slice(&self.alphas_cumprod)
            .to_kind(Kind::Float)
            .to_device(t.device());
        let a = table.index_select(0, &t.to_kind(Kind::Int64));
        let shape = [-1i64, 1, 1, 1];
        (
            a.sqrt().view(shape).to_kind(kind),
            (a.neg() + 1.0).sqrt().view(shape).to_kind(kind),
        )
    }

    /// `√ᾱ_t · x₀ + √(1−ᾱ_t) · ε` for per-sample timesteps `t` [B].
    pub fn add_noise(&self, x0: &Tensor, noise: &Tensor, t: &Tensor) -> Tensor {
        let (sa, sb) = self.coeffs(t, x0.kind());
        sa * x0 + sb * noise
    }

    /// `v = √ᾱ_t · ε − √(1−ᾱ_t) · x₀`.
    pub fn velocity(&self, x0: &Tensor, noise: &Tensor, t: &Tensor) -> Tensor {
        let (sa, sb) = self.coeffs(t, x0.kind());
        sa * noise - sb * x0
    }

    /// What the UNet learns to predict: ε, or v.
    pub fn target(&self, x0: &Tensor, noise: &Tensor, t: &Tensor) -> Tensor {
        match self.prediction_type {
            PredictionType::Epsilon => noise.shallow_clone(),
            PredictionType::VPrediction => self.velocity(x0, noise, t),
        }
    }
}

fn linspace(a: f32, b: f32, n: usize) -> Vec<f32> {
    // torch.linspace in float32 (the symmetric form it uses for accuracy).
    let t = Tensor::linspace(
        a as f64,
        b as f64,
        n as i64,
        (Kind::Float, tch::Device::Cpu),
    );
    Vec::<f32>::try_from(t).unwrap_or_default()
}

/// DDIM sampling (η = 0) with SD's settings: "leading" spacing, `steps_offset = 1`,
/// `set_alpha_to_one = false`.
#[derive(Debug)]
pub struct Ddim {
    ddpm: Ddpm,
    pub timesteps: Vec<i64>,
    step_ratio: i64,
}

impl Ddim {
    pub fn new(cfg: &SchedulerConfig, steps: i64) -> Self {
        let ddpm = Ddpm::new(cfg);
        let step_ratio = cfg.num_train_timesteps / steps.max(1);
        let timesteps = (0..steps).rev().map(|i| i * step_ratio + 1).collect();
        Ddim {
            ddpm,
            timesteps,
            step_ratio,
        }
    }

    /// One reverse step from `x_t` given the model output at `t`.
    pub fn step(&self, model_out: &Tensor, t: i64, x: &Tensor) -> Tensor {
        let acp = &self.ddpm.alphas_cumprod;
        let a_t = acp[t as usize];
        let prev = t - self.step_ratio;
        let a_prev = if prev >= 0 {
            acp[prev as usize]
        } else {
            acp[0]
        };
        let (x0, eps) = split(self.ddpm.prediction_type, model_out, x, a_t);
        x0 * a_prev.sqrt() + eps * (1.0 - a_prev).sqrt()
    }
}

/// The x₀ prediction and the noise prediction from a model output at a timestep of ᾱ = `a`.
pub(crate) fn split(p: PredictionType, out: &Tensor, x: &Tensor, a: f64) -> (Tensor, Tensor) {
    let (sa, sb) = (a.sqrt(), (1.0 - a).sqrt());
    match p {
        PredictionType::Epsilon => ((x - out * sb) / sa, out.shallow_clone()),
        PredictionType::VPrediction => (x * sa - out * sb, out * sa + x * sb),
    }
}
