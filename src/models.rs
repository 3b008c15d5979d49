//! The model library's layers, after the reference implementations each one follows (`../shared/
//! REFERENCE.md`): the LLaMA decoder (transformers), the ConvNeXt encoder (open_clip), the Perceiver
//! Resampler, the region extractor, the Stable-Diffusion UNet and VAE (diffusers), and their DEEM
//! composition (`deem.rs`) with its losses (`losses.rs`).

pub mod deem;
pub mod diffusion;
pub mod llama;
pub mod losses;
pub mod region;
pub mod resampler;
pub mod vision;
