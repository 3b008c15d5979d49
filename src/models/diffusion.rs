//! The latent-diffusion image decoder: the Stable-Diffusion UNet and VAE with diffusers names, the noise
//! schedules, and DEEM's NIP condition (LLM hidden states → UNet context).

pub mod attention;
pub mod condition;
pub mod resnet;
pub mod samplers;
pub mod scheduler;
pub mod unet;
pub mod vae;

pub use samplers::{DdpmSampler, DpmSolver, Sampler};
pub use scheduler::{Ddim, Ddpm};
pub use unet::UNet2DCondition;
pub use vae::AutoencoderKL;

use std::path::Path;

use serde_json::Value;

use crate::config::{UNetConfig, VaeConfig};
use crate::models::ModelError;

fn read_json(path: &Path) -> Result<Value, ModelError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ModelError::from(format!("{}: cannot read: {e}", path.display())))?;
    serde_json::from_str(&text)
        .map_err(|e| ModelError::from(format!("{}: invalid JSON: {e}", path.display())))
}

fn int(v: &Value, key: &str, path: &Path) -> Result<i64, ModelError> {
    v.get(key)
        .and_then(Value::as_i64)
        .ok_or_else(|| ModelError::from(format!("{}: {key}: expected an integer", path.display())))
}

fn ints(v: &Value, key: &str, path: &Path) -> Result<Vec<i64>, ModelError> {
    v.get(key)
        .and_then(Value::as_array)
        .and_then(|a| a.iter().map(Value::as_i64).collect::<Option<Vec<_>>>())
        .ok_or_else(|| {
            ModelError::from(format!(
                "{}: {key}: expected a list of integers",
                path.display()
            ))
        })
}

fn strings(v: &Value, key: &str, path: &Path) -> Result<Vec<String>, ModelError> {
    v.get(key)
        .and_then(Value::as_array)
        .and_then(|a| {
            a.iter()
                .map(|x| x.as_str().map(String::from))
                .collect::<Option<Vec<_>>>()
        })
        .ok_or_else(|| {
            ModelError::from(format!(
                "{}: {key}: expected a list of strings",
                path.display()
            ))
        })
}

/// An int broadcast to every block, or a per-block list.
fn per_block(v: &Value, key: &str, blocks: usize, path: &Path) -> Result<Vec<i64>, ModelError> {
    match v.get(key) {
        Some(Value::Number(n)) => Ok(vec![n.as_i64().unwrap_or(0); blocks]),
        Some(Value::Array(_)) => ints(v, key, path),
        _ => Err(ModelError::from(format!(
            "{}: {key}: expected an integer or a list of integers",
            path.display()
        ))),
    }
}

/// Options deem computes only at their SD 1.x/2.x values: `(key, the accepted value)`.
const UNET_FIXED: [(&str, &str); 10] = [
    ("flip_sin_to_cos", "true"),
    ("freq_shift", "0"),
    ("class_embed_type", "null"),
    ("addition_embed_type", "null"),
    ("time_cond_proj_dim", "null"),
    ("mid_block_type", "\"UNetMidBlock2DCrossAttn\""),
    ("resnet_time_scale_shift", "\"default\""),
    ("only_cross_attention", "false"),
    ("dual_cross_attention", "false"),
    ("encoder_hid_dim", "null"),
];

/// Reads a diffusers `unet/config.json`.
pub fn unet_config_from_diffusers(path: &Path) -> Result<UNetConfig, ModelError> {
    let v = read_json(path)?;
    for (key, want) in UNET_FIXED {
        if let Some(found) = v.get(key) {
            let text = found.to_string();
            if text != want {
                return Err(ModelError::from(format!(
                    "{}: {key}: deem supports {want} only, found {found}",
                    path.display()
                )));
            }
        }
    }
    let block_out_channels = ints(&v, "block_out_channels", path)?;
    let n = block_out_channels.len();
    // diffusers' historical naming: for SD the per-block `attention_head_dim` is the number of heads,
    // unless `num_attention_heads` is given.
    let heads = match v.get("num_attention_heads") {
        Some(x) if !x.is_null() => per_block(&v, "num_attention_heads", n, path)?,
        _ => per_block(&v, "attention_head_dim", n, path)?,
    };
    let tlpb = per_block(&v, "transformer_layers_per_block", n, path)?;
    if tlpb.iter().any(|&t| t != tlpb[0]) {
        return Err(ModelError::from(format!(
            "{}: transformer_layers_per_block: deem supports one value for every block",
            path.display()
        )));
    }
    Ok(UNetConfig {
        in_channels: int(&v, "in_channels", path)?,
        out_channels: int(&v, "out_channels", path)?,
        block_out_channels,
        down_block_types: strings(&v, "down_block_types", path)?,
        up_block_types: strings(&v, "up_block_types", path)?,
        layers_per_block: int(&v, "layers_per_block", path)?,
        attention_head_dim: heads,
        cross_attention_dim: int(&v, "cross_attention_dim", path)?,
        use_linear_projection: v
            .get("use_linear_projection")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        norm_num_groups: int(&v, "norm_num_groups", path)?,
        transformer_layers_per_block: tlpb[0],
    })
}

/// Reads a diffusers `vae/config.json`.
pub fn vae_config_from_diffusers(path: &Path) -> Result<VaeConfig, ModelError> {
    let v = read_json(path)?;
    Ok(VaeConfig {
        in_channels: int(&v, "in_channels", path)?,
        out_channels: int(&v, "out_channels", path)?,
        latent_channels: int(&v, "latent_channels", path)?,
        block_out_channels: ints(&v, "block_out_channels", path)?,
        layers_per_block: int(&v, "layers_per_block", path)?,
        norm_num_groups: int(&v, "norm_num_groups", path)?,
        scaling_factor: v
            .get("scaling_factor")
            .and_then(Value::as_f64)
            .unwrap_or(0.18215),
    })
}
