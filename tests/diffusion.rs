//! UNet, VAE and scheduler parity with diffusers 0.42.1 (fixtures from tests/fixtures/generate.py).

mod common;
use common::{fixture, max_diff, read};

use deem::config::{BetaSchedule, PredictionType, SchedulerConfig};
use deem::models::diffusion::{self, AutoencoderKL, Ddpm, UNet2DCondition};
use deem::models::pretrained::Pretrained;
use tch::{nn, Device, Tensor};

/// fp32 parity bound against diffusers.
const TOL: f64 = 1e-4;

pub fn sd_scheduler() -> SchedulerConfig {
    SchedulerConfig {
        num_train_timesteps: 1000,
        beta_start: 0.00085,
        beta_end: 0.012,
        beta_schedule: BetaSchedule::ScaledLinear,
        prediction_type: PredictionType::Epsilon,
    }
}

fn unet(vs: &nn::VarStore) -> UNet2DCondition {
    let cfg = diffusion::unet_config_from_diffusers(&fixture("unet/config.json")).unwrap();
    let u = UNet2DCondition::new(&(vs.root() / "unet"), &cfg);
    Pretrained::open(&[fixture("unet")], None)
        .unwrap()
        .load_into(vs, &UNet2DCondition::load_spec(), true, |_, _| {})
        .unwrap();
    u
}

#[test]
fn unet_noise_prediction_matches_diffusers() {
    let vs = nn::VarStore::new(Device::Cpu);
    let u = unet(&vs);
    let inp = fixture("unet/inputs.safetensors");
    let pred = tch::no_grad(|| {
        u.forward(
            &read(&inp, "sample"),
            &read(&inp, "timestep"),
            &read(&inp, "encoder_hidden_states"),
        )
    });
    let d = max_diff(
        &pred,
        &read(&fixture("unet/expected.safetensors"), "noise_pred"),
    );
    eprintln!("unet: max |noise_pred - diffusers| = {d:.3e}");
    assert!(d < TOL);
}

#[test]
fn ddpm_noise_and_velocity_match_diffusers() {
    let ddpm = Ddpm::new(&sd_scheduler());
    let inp = fixture("unet/ddpm_inputs.safetensors");
    let (x0, noise, t) = (read(&inp, "x0"), read(&inp, "noise"), read(&inp, "t"));
    let exp = fixture("unet/expected.safetensors");
    let d1 = max_diff(&ddpm.add_noise(&x0, &noise, &t), &read(&exp, "noisy"));
    let d2 = max_diff(&ddpm.velocity(&x0, &noise, &t), &read(&exp, "velocity"));
    eprintln!("ddpm: add_noise {d1:.3e}, velocity {d2:.3e}");
    assert!(d1 < 1e-6 && d2 < 1e-6);
}

#[test]
fn ddim_ten_steps_match_diffusers_with_and_without_guidance() {
    let vs = nn::VarStore::new(Device::Cpu);
    let u = unet(&vs);
    let inp = fixture("unet/inputs.safetensors");
    let exp = fixture("unet/expected.safetensors");
    let ddim =
        deem::models::diffusion::Sampler::new(deem::config::SamplerKind::Ddim, &sd_scheduler(), 10);
    let want_t: Vec<i64> = Vec::try_from(read(&exp, "ddim_timesteps")).unwrap();
    assert_eq!(ddim.timesteps(), want_t.as_slice());
    let none = |_| Tensor::zeros([0], (tch::Kind::Float, Device::Cpu));
    let (noise, ctx, uncond) = (
        read(&inp, "sample"),
        read(&inp, "encoder_hidden_states"),
        read(&inp, "uncond_hidden_states"),
    );
    let plain = tch::no_grad(|| ddim.sample(&noise, 1.0, |x, t| u.forward(x, t, &ctx), none));
    let doubled = Tensor::cat(&[&uncond, &ctx], 0);
    let guided = tch::no_grad(|| ddim.sample(&noise, 3.0, |x, t| u.forward(x, t, &doubled), none));
    let d1 = max_diff(&plain, &read(&exp, "ddim"));
    let d2 = max_diff(&guided, &read(&exp, "ddim_cfg"));
    eprintln!("ddim 10 steps: {d1:.3e}, with guidance 3: {d2:.3e}");
    assert!(d1 < TOL && d2 < TOL);
}

#[test]
fn vae_encode_mean_and_decode_match_diffusers() {
    let cfg = diffusion::vae_config_from_diffusers(&fixture("vae/config.json")).unwrap();
    let vs = nn::VarStore::new(Device::Cpu);
    let vae = AutoencoderKL::new(&(vs.root() / "vae"), &cfg);
    Pretrained::open(&[fixture("vae")], None)
        .unwrap()
        .load_into(&vs, &AutoencoderKL::load_spec(), true, |_, _| {})
        .unwrap();
    let inp = fixture("vae/inputs.safetensors");
    let exp = fixture("vae/expected.safetensors");
    let (mean, decoded) = tch::no_grad(|| {
        (
            vae.encode(&read(&inp, "pixel_values")).0,
            vae.decode(&read(&inp, "latents")),
        )
    });
    let d1 = max_diff(&mean, &read(&exp, "latent_mean"));
    let d2 = max_diff(&decoded, &read(&exp, "pixel_values"));
    eprintln!("vae: encode mean {d1:.3e}, decode {d2:.3e}");
    assert!(d1 < TOL && d2 < TOL);
}

#[test]
fn unsupported_unet_options_are_named() {
    let dir = std::env::temp_dir().join(format!("deem-unet-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("config.json");
    let base = std::fs::read_to_string(fixture("unet/config.json")).unwrap();
    std::fs::write(
        &p,
        base.replace(
            "\"class_embed_type\": null",
            "\"class_embed_type\": \"timestep\"",
        ),
    )
    .unwrap();
    assert_eq!(
        diffusion::unet_config_from_diffusers(&p)
            .unwrap_err()
            .to_string(),
        format!(
            "{}: class_embed_type: deem supports null only, found \"timestep\"",
            p.display()
        )
    );
}

/// DDPM ancestral sampling and DPM-Solver++ (2M) through [`Sampler`], against diffusers'
/// `DDPMScheduler` (fed the per-step noise its generator drew) and `DPMSolverMultistepScheduler` on the
/// same UNet, with and without guidance (`tests/fixtures/samplers.py`). The same bound as DDIM's loop.
#[test]
fn ddpm_and_dpm_solver_loops_match_diffusers_with_and_without_guidance() {
    use deem::config::SamplerKind;
    use deem::models::diffusion::Sampler;
    let vs = nn::VarStore::new(Device::Cpu);
    let u = unet(&vs);
    let inp = fixture("unet/inputs.safetensors");
    let exp = fixture("unet/samplers.safetensors");
    let (noise, ctx, uncond) = (
        read(&inp, "sample"),
        read(&inp, "encoder_hidden_states"),
        read(&inp, "uncond_hidden_states"),
    );
    let doubled = Tensor::cat(&[&uncond, &ctx], 0);
    for (kind, name) in [(SamplerKind::Ddpm, "ddpm"), (SamplerKind::DpmSolver, "dpm")] {
        let s = Sampler::new(kind, &sd_scheduler(), 10);
        let want_t: Vec<i64> = Vec::try_from(read(&exp, &format!("{name}_timesteps"))).unwrap();
        assert_eq!(s.timesteps(), want_t.as_slice(), "{name}");
        let z = |i: usize| read(&exp, &format!("ddpm_noise_{i}"));
        let plain = tch::no_grad(|| s.sample(&noise, 1.0, |x, t| u.forward(x, t, &ctx), z));
        let guided = tch::no_grad(|| s.sample(&noise, 3.0, |x, t| u.forward(x, t, &doubled), z));
        let d1 = max_diff(&plain, &read(&exp, name));
        let d2 = max_diff(&guided, &read(&exp, &format!("{name}_cfg")));
        eprintln!("{name} 10 steps: {d1:.3e}, with guidance 3: {d2:.3e}");
        assert!(d1 < TOL && d2 < TOL, "{name}: {d1} {d2}");
    }
}
