//! The LLaMA configuration, after transformers' `LlamaConfig`: HF `config.json` parsing (RoPE scaling
//! types included) and deem's own `llm` section, into one [`LlamaConfig`].

use std::path::Path;

use serde::Deserialize;

use crate::config::RopeScaling;

#[derive(Debug, thiserror::Error)]
pub enum LlamaError {
    #[error("{path}: {message}")]
    Config { path: String, message: String },
    #[error("layer range [{start}, {end}) does not fit a model with {layers} layers; expected 0 <= start < end <= {layers}")]
    Range { start: i64, end: i64, layers: i64 },
    #[error("llm.tie_word_embeddings = true: the last shard [{start}, {end}) would need the first shard's embedding; untie the head or place the LLM in one shard")]
    TiedAcrossShards { start: i64, end: i64 },
    /// A config value that is not supported; the message names the field.
    #[error("{0}")]
    Invalid(String),
}

impl From<String> for LlamaError {
    fn from(message: String) -> Self {
        LlamaError::Invalid(message)
    }
}

/// HF `config.json` of a LLaMA-family model (fields deem uses; others are ignored, as transformers does).
#[derive(Debug, Clone, Deserialize)]
pub struct HfLlamaConfig {
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    #[serde(default)]
    pub num_key_value_heads: Option<i64>,
    #[serde(default)]
    pub head_dim: Option<i64>,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    /// transformers 4.x: `rope_theta` and `rope_scaling` at the top level.
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    /// transformers 5.x: `rope_parameters: {rope_theta, rope_type, …}`.
    #[serde(default)]
    pub rope_parameters: Option<serde_json::Value>,
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: i64,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    #[serde(default)]
    pub hidden_act: Option<String>,
    #[serde(default)]
    pub partial_rotary_factor: Option<f64>,
}

pub(crate) fn default_eps() -> f64 {
    1e-6
}
pub(crate) fn default_max_pos() -> i64 {
    2048
}

/// Validated runtime configuration of the decoder.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    pub vocab_size: i64,
    /// DEEM's appended special tokens (0 for a plain LLaMA).
    pub num_new_tokens: i64,
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub num_key_value_heads: i64,
    pub head_dim: i64,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    pub max_position_embeddings: i64,
    pub tie_word_embeddings: bool,
    pub attention_bias: bool,
    pub mlp_bias: bool,
}

impl LlamaConfig {
    /// Reads an HF `config.json`, rejecting what this implementation does not compute.
    pub fn from_hf_file(path: &Path, num_new_tokens: i64) -> Result<Self, LlamaError> {
        let p = path.display().to_string();
        let err = |message: String| LlamaError::Config {
            path: p.clone(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(format!("cannot read: {e}")))?;
        let hf: HfLlamaConfig = serde_json::from_str(&text)
            .map_err(|e| err(format!("not a LLaMA config.json: {e}")))?;
        Self::from_hf(&hf, num_new_tokens).map_err(|e| err(e.to_string()))
    }

    pub fn from_hf(hf: &HfLlamaConfig, num_new_tokens: i64) -> Result<Self, LlamaError> {
        if let Some(act) = hf.hidden_act.as_deref() {
            if act != "silu" {
                return Err(LlamaError::from(format!(
                    "hidden_act: expected \"silu\", found {act:?}"
                )));
            }
        }
        let partial = hf.partial_rotary_factor.or_else(|| {
            hf.rope_parameters
                .as_ref()
                .and_then(|p| p.get("partial_rotary_factor"))
                .and_then(|f| f.as_f64())
        });
        if let Some(f) = partial.filter(|&f| f != 1.0) {
            return Err(LlamaError::from(format!(
                "partial_rotary_factor: expected 1 (rotary embeddings on the whole head), found {f}"
            )));
        }
        let mut rope_theta = hf.rope_theta.unwrap_or(10000.0);
        let mut rope_scaling = None;
        if let Some(s) = hf.rope_scaling.as_ref().filter(|s| !s.is_null()) {
            rope_scaling = rope_scaling_from_hf("rope_scaling", s, hf.max_position_embeddings)?;
        }
        if let Some(params) = hf.rope_parameters.as_ref().filter(|s| !s.is_null()) {
            rope_scaling =
                rope_scaling_from_hf("rope_parameters", params, hf.max_position_embeddings)?;
            if let Some(t) = params.get("rope_theta").and_then(|t| t.as_f64()) {
                rope_theta = t;
            }
        }
        let kv = hf.num_key_value_heads.unwrap_or(hf.num_attention_heads);
        if hf.num_attention_heads <= 0 || kv <= 0 || hf.num_attention_heads % kv != 0 {
            return Err(LlamaError::from(format!(
                "num_key_value_heads: expected a positive divisor of num_attention_heads ({}), found {kv}",
                hf.num_attention_heads
            )));
        }
        let head_dim = hf
            .head_dim
            .unwrap_or(hf.hidden_size / hf.num_attention_heads);
        if head_dim <= 0 || head_dim % 2 != 0 {
            return Err(LlamaError::from(format!(
                "head_dim: expected a positive even number, found {head_dim}"
            )));
        }
        Ok(LlamaConfig {
            vocab_size: hf.vocab_size,
            num_new_tokens,
            hidden_size: hf.hidden_size,
            intermediate_size: hf.intermediate_size,
            num_hidden_layers: hf.num_hidden_layers,
            num_attention_heads: hf.num_attention_heads,
            num_key_value_heads: kv,
            head_dim,
            rms_norm_eps: hf.rms_norm_eps,
            rope_theta,
            rope_scaling,
            max_position_embeddings: hf.max_position_embeddings,
            tie_word_embeddings: hf.tie_word_embeddings,
            attention_bias: hf.attention_bias,
            mlp_bias: hf.mlp_bias,
        })
    }
}

/// Reads HF's scaled-RoPE object (`rope_scaling` in transformers 4.x, `rope_parameters` in 5.x; the type
/// under `rope_type`, or `type` in older files): `None` for plain RoPE. A missing
/// `original_max_position_embeddings` is the model's `max_position_embeddings`, as in transformers.
pub(crate) fn rope_scaling_from_hf(
    field: &str,
    v: &serde_json::Value,
    max_position_embeddings: i64,
) -> Result<Option<RopeScaling>, LlamaError> {
    let type_value = v.get("rope_type").or_else(|| v.get("type"));
    let number = |name: &str| {
        v.get(name).and_then(|x| x.as_f64()).ok_or_else(|| {
            format!(
                "{field}.{name}: expected a number, found {}",
                v.get(name).map_or("nothing".to_string(), |x| x.to_string())
            )
        })
    };
    let original = || match v.get("original_max_position_embeddings") {
        None => Ok(max_position_embeddings),
        Some(_) => number("original_max_position_embeddings").map(|n| n as i64),
    };
    let scaling = match type_value.map_or(Some("default"), |t| t.as_str()) {
        Some("default") => return Ok(None),
        Some("linear") => RopeScaling::Linear {
            factor: number("factor")?,
        },
        Some("dynamic") => RopeScaling::Dynamic {
            factor: number("factor")?,
        },
        Some("llama3") => RopeScaling::Llama3 {
            factor: number("factor")?,
            low_freq_factor: number("low_freq_factor")?,
            high_freq_factor: number("high_freq_factor")?,
            original_max_position_embeddings: original()?,
        },
        Some("yarn") => {
            let optional = |name: &str| match v.get(name) {
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(_) => number(name).map(Some),
            };
            RopeScaling::Yarn {
                factor: number("factor")?,
                original_max_position_embeddings: original()?,
                beta_fast: optional("beta_fast")?,
                beta_slow: optional("beta_slow")?,
                attention_factor: optional("attention_factor")?,
                mscale: optional("mscale")?,
                mscale_all_dim: optional("mscale_all_dim")?,
                truncate: match v.get("truncate") {
                    None | Some(serde_json::Value::Null) => None,
                    Some(serde_json::Value::Bool(b)) => Some(*b),
                    Some(x) => return Err(LlamaError::from(format!("{field}.truncate: expected true or false, found {x}"))),
                },
            }
        }
        _ => {
            return Err(LlamaError::from(format!(
                "{field}.rope_type: expected \"default\", \"linear\", \"dynamic\", \"llama3\" or \"yarn\" (other scaled RoPE types are not supported yet), found {}",
                type_value.map_or("nothing".to_string(), |t| t.to_string())
            )))
        }
    };
    match scaling.problem() {
        Some((name, message)) => Err(LlamaError::from(format!("{field}.{name}: {message}"))),
        None => Ok(Some(scaling)),
    }
}

impl From<&crate::config::LlmConfig> for LlamaConfig {
    fn from(l: &crate::config::LlmConfig) -> Self {
        LlamaConfig {
            vocab_size: l.vocab_size,
            num_new_tokens: l.num_new_tokens,
            hidden_size: l.hidden_size,
            intermediate_size: l.intermediate_size,
            num_hidden_layers: l.num_hidden_layers,
            num_attention_heads: l.num_attention_heads,
            num_key_value_heads: l.num_key_value_heads,
            head_dim: l.hidden_size / l.num_attention_heads,
            rms_norm_eps: l.rms_norm_eps,
            rope_theta: l.rope_theta,
            rope_scaling: l.rope_scaling,
            max_position_embeddings: l.max_position_embeddings,
            tie_word_embeddings: l.tie_word_embeddings,
            attention_bias: false,
            mlp_bias: false,
        }
    }
}
