//! deem — the DEEM model library: pure tch compute, no actors, no async.
//!
//! DEEM ("Diffusion Models Serve as the EyEs of Large Language Models for Image Perception") joins a
//! ConvNeXt encoder, a Perceiver Resampler, a LLaMA decoder and a Stable-Diffusion UNet. This crate is
//! laid out by concern: `models/` (the layers and their DEEM composition, the losses), `text/`
//! (tokenizer, sequences, sampling), `data/` (formats and readers, the synthetic world, the mixer),
//! `train/` (optimizer, reference trainer, pretraining), `eval`, and beside them the configuration,
//! checkpoints, devices, parameter accounting and seeded random streams. The runtime crate
//! `deem-actors` places these on devices.

pub mod checkpoint;
pub mod config;
pub mod cost;
pub mod data;
pub mod device;
pub mod eval;
pub mod models;
pub mod params;
pub mod rng;
pub mod text;
pub mod train;

pub use config::DeemConfig;
pub use device::DeviceSpec;

/// Version of this crate, for `deem info` and `deem_build_info`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The libtorch directory this build links against (set by the build script from torch-sys).
pub const LIBTORCH_LIB_DIR: Option<&str> = option_env!("DEEM_LIBTORCH_LIB");

/// The PyTorch version of that libtorch (read from its `version.py` at build time).
pub const LIBTORCH_VERSION: Option<&str> = option_env!("DEEM_LIBTORCH_VERSION");

/// The tch crate series this library is built on (it requires exactly PyTorch 2.13.0).
pub const TCH_VERSION: &str = "0.26";

static INIT_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Runs `build` (module construction, which draws initial weights from libtorch's global generator)
/// while holding a process-wide lock, after seeding the generator when `seed` is given. Every module
/// construction in deem goes through here, so a seeded initialisation is the same whatever other threads
/// (other actors, other trainers) are building at the same time. Within a seeded build each model part
/// reseeds the generator for itself ([`init_part`]), so a pipeline stage that builds only its own parts
/// draws exactly the values a whole-model build gives them.
pub fn with_init_lock<T>(seed: Option<u64>, build: impl FnOnce() -> T) -> T {
    let _guard = INIT_LOCK
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(s) = seed {
        tch::manual_seed(s as i64);
    }
    PART_SEED.with(|p| p.set(seed));
    let out = build();
    PART_SEED.with(|p| p.set(None));
    out
}

thread_local! {
    /// The seed of the seeded build running on this thread (under the init lock).
    static PART_SEED: std::cell::Cell<Option<u64>> = const { std::cell::Cell::new(None) };
}

/// Marks the start of an independently initialised model part (`visual`, `llm.layers.3`, …): in a
/// seeded build the generator is reseeded from the build's seed and the part's name (FNV-1a), so the
/// part's values do not depend on which other parts were built before it. Outside a seeded build it does
/// nothing.
pub fn init_part(part: &str) {
    if let Some(seed) = PART_SEED.with(|p| p.get()) {
        let h = rng::fnv1a_update(rng::FNV1A_START ^ seed, part.as_bytes());
        tch::manual_seed((h >> 1) as i64);
    }
}
