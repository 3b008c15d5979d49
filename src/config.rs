//! The typed DEEM configuration: model sizes of the four parts (ConvNeXt encoder, Q-Former resampler,
//! LLaMA decoder, Stable-Diffusion UNet + VAE with DEEM's NIP condition) and the training recipe.
//!
//! Field names follow the reference configs where one exists (HF `LlamaConfig`, diffusers
//! `UNet2DConditionModel` / `AutoencoderKL`, `Blip2QFormerConfig`), so values can be copied across.
//! Sizes come from `../shared/REFERENCE.md` (paper Table 12 and the reference code).
//!
//! Reading the layered TOML/env/CLI sources lives in the runtime; this module only owns the types and
//! [`DeemConfig::validate`], which reports every semantic problem with its key path.

use serde::{Deserialize, Serialize};

mod validate;

pub use validate::ConfigIssue;

/// Whole-model configuration, one TOML file under `configs/`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeemConfig {
    pub model: ModelMeta,
    pub vision: VisionConfig,
    pub resampler: ResamplerConfig,
    pub llm: LlmConfig,
    pub diffusion: DiffusionConfig,
    pub train: TrainConfig,
    /// The generation service (`deem serve`); every key has a default.
    #[serde(default)]
    pub serve: ServeConfig,
    /// How dataset records are filtered as they are read; every key has a default (the paper's).
    #[serde(default, skip_serializing_if = "DataConfig::is_default")]
    pub data: DataConfig,
    /// Fault injection for rehearsing recovery (absent in normal runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault: Option<FaultConfig>,
}

/// `[data]`: filtering rules per dataset format.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    #[serde(default)]
    pub mmc4: Mmc4Rules,
}

impl DataConfig {
    pub fn is_default(&self) -> bool {
        *self == DataConfig::default()
    }
}

/// `[data.mmc4]`: the paper's rules for MMC4 documents (Appendix, data processing), applied as they
/// are read and counted in the data report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Mmc4Rules {
    /// Images whose CLIP similarity to their matched sentence (`matched_sim`) is below this are
    /// dropped (images without a score are kept).
    pub min_similarity: f64,
    /// At most this many images per document: the first ones, in the file's order.
    pub max_images: usize,
    /// Documents left without an image are dropped.
    pub drop_without_images: bool,
    /// This share of the one-image documents is dropped, each by a draw seeded with `train.seed` and
    /// the document's line.
    pub drop_one_image_share: f64,
}

impl Default for Mmc4Rules {
    fn default() -> Self {
        Mmc4Rules {
            min_similarity: 0.24,
            max_images: 6,
            drop_without_images: true,
            drop_one_image_share: 0.5,
        }
    }
}

/// Makes an actor's compute thread fail (panic) once, so its supervisor's policy can be rehearsed:
/// in training at the start of a step (the actors restart from the latest checkpoint), in serving at
/// one of its jobs (the worker is marked failed, its requests get an error, `/ready` turns 503).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultConfig {
    /// Name of the topology actor to kill.
    pub kill_actor: String,
    /// Training: the optimizer step (0-based) at which it fails. Serving: the actor's job (0-based;
    /// a decode tick for an LLM shard, a batch of images for vision and diffusion).
    pub at_step: u64,
    /// Training: the stage's forward or backward op of that step (0-based, in its schedule's order)
    /// at which it dies, after the ops before it ran; none: before the step's first op. Serving has
    /// no ops within a job and refuses it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at_op: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelMeta {
    /// A short name shown in tables and metrics labels (`tiny`, `deem-7b`).
    pub name: String,
    /// Parameter and compute dtype.
    pub dtype: DType,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    F32,
    Bf16,
    F16,
}

impl DType {
    pub fn size_bytes(self) -> u64 {
        match self {
            DType::F32 => 4,
            DType::Bf16 | DType::F16 => 2,
        }
    }

    pub fn kind(self) -> tch::Kind {
        match self {
            DType::F32 => tch::Kind::Float,
            DType::Bf16 => tch::Kind::BFloat16,
            DType::F16 => tch::Kind::Half,
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DType::F32 => "f32",
            DType::Bf16 => "bf16",
            DType::F16 => "f16",
        })
    }
}

/// open_clip/timm ConvNeXt trunk plus DEEM's multi-scale adapters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VisionConfig {
    /// Input resolution in pixels (256 in stage I, 448 in SFT).
    pub image_size: i64,
    pub in_channels: i64,
    /// Stem patchify kernel and stride (4 for ConvNeXt).
    pub patch_size: i64,
    /// Blocks per stage (`convnext_base`: [3, 3, 27, 3]).
    pub depths: Vec<i64>,
    /// Channels per stage (`convnext_base`: [128, 256, 512, 1024]).
    pub dims: Vec<i64>,
    /// open_clip head projection width (`convnext_base_w`: 640).
    pub embed_dim: i64,
    /// open_clip's `timm_proj`: `linear` (`visual.head.proj`, bias-free; `convnext_base_w`,
    /// `convnext_xxlarge`) or `mlp` (`visual.head.mlp.fc1` → GELU → bias-free `fc2`, hidden width
    /// 2 × embed_dim; `convnext_large_d`).
    #[serde(default, skip_serializing_if = "HeadProj::is_linear")]
    pub head_proj: HeadProj,
    /// Common width the per-stage adapters map to (1024 for base).
    pub adapter_width: i64,
    /// Every image goes through the mask-aware extractor, with an all-ones mask unless it comes with a
    /// region's (the paper's "the default value is 1"): on for a model tuned on region data (stage III),
    /// so that whole images are read in evaluation and serving as they were in its training.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub mask_aware: bool,
}

/// How open_clip projects the pooled ConvNeXt feature to its embedding (`timm_proj`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HeadProj {
    #[default]
    Linear,
    Mlp,
}

impl HeadProj {
    pub fn is_linear(&self) -> bool {
        *self == HeadProj::Linear
    }
}

/// Q-Former-style Perceiver Resampler (HF `Blip2QFormerModel` names).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResamplerConfig {
    /// Learnable queries = visual tokens per image (77).
    pub num_query_tokens: i64,
    pub hidden_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub intermediate_size: i64,
    /// Cross-attention to the image tokens every k-th layer (2).
    pub cross_attention_frequency: i64,
    /// Width of the image tokens it attends to (the vision adapter width).
    pub encoder_hidden_size: i64,
    pub layer_norm_eps: f64,
}

/// LLaMA/Vicuna decoder, HF `LlamaConfig` names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LlmConfig {
    /// Vocabulary of the base checkpoint (32000 for Vicuna); DEEM's special tokens are appended.
    pub vocab_size: i64,
    /// Tokens DEEM appends: `<|startofimage|> <|sniffer|> <ref> </ref> <box> </box>`.
    pub num_new_tokens: i64,
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub num_key_value_heads: i64,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    /// Scaled rotary embeddings (HF `rope_scaling` / `rope_parameters`), e.g. `{ rope_type = "linear",
    /// factor = 4.0 }` for Vicuna-v1.5-16k or Llama 3.1's `rope_type = "llama3"`; absent: plain RoPE.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<RopeScaling>,
    pub max_position_embeddings: i64,
    pub tie_word_embeddings: bool,
    /// Beginning-of-sequence id (1 for LLaMA/Vicuna): NIP contexts start at the nearest BOS.
    pub bos_token_id: i64,
    /// Padding id; padded targets carry no loss.
    pub pad_token_id: i64,
    /// End-of-sequence id (2 for LLaMA/Vicuna): generation stops when it is sampled.
    #[serde(default = "default_eos")]
    pub eos_token_id: i64,
}

fn default_eos() -> i64 {
    2
}

/// How scaled RoPE rewrites the inverse frequencies (transformers' `rope_type`s of the LLaMA family).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "rope_type", rename_all = "lowercase", deny_unknown_fields)]
pub enum RopeScaling {
    /// Position interpolation: every frequency divided by `factor`.
    Linear { factor: f64 },
    /// NTK-aware dynamic scaling: the base grows only once a sequence passes `max_position_embeddings`,
    /// which deem never lets one do (the context is capped there), so within it the frequencies are
    /// plain RoPE's, as transformers computes them.
    Dynamic { factor: f64 },
    /// Llama 3.1: low frequencies (wavelength above `original_max_position_embeddings /
    /// low_freq_factor`) divided by `factor`, high ones (below `… / high_freq_factor`) kept, the band
    /// between interpolated smoothly.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: i64,
    },
    /// YaRN: per-dimension blend of interpolated (`factor`) and original frequencies, ramped between
    /// the dimensions that turn `beta_fast` and `beta_slow` times over the original context, and cos/sin
    /// scaled by `attention_factor` (default 0.1 · ln(factor) + 1, or the `mscale` / `mscale_all_dim`
    /// ratio when both are set).
    Yarn {
        factor: f64,
        original_max_position_embeddings: i64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        beta_fast: Option<f64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        beta_slow: Option<f64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        attention_factor: Option<f64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        mscale: Option<f64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        mscale_all_dim: Option<f64>,
        /// Round the ramp's ends to whole dimensions (transformers' default, true).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        truncate: Option<bool>,
    },
}

impl RopeScaling {
    /// The first field (its name under the scaling table) whose value cannot work, and what was expected.
    pub fn problem(&self) -> Option<(&'static str, String)> {
        let positive = |name: &'static str, v: f64| {
            (!(v.is_finite() && v > 0.0))
                .then(|| (name, format!("expected a positive number, found {v}")))
        };
        let context = |n: i64| {
            (n <= 0).then(|| {
                (
                    "original_max_position_embeddings",
                    format!("expected a positive number, found {n}"),
                )
            })
        };
        match *self {
            RopeScaling::Linear { factor } | RopeScaling::Dynamic { factor } => {
                positive("factor", factor)
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => positive("factor", factor)
                .or_else(|| positive("low_freq_factor", low_freq_factor))
                .or_else(|| positive("high_freq_factor", high_freq_factor))
                .or_else(|| {
                    (high_freq_factor <= low_freq_factor).then(|| {
                        (
                            "high_freq_factor",
                            format!(
                                "expected more than low_freq_factor ({low_freq_factor}), found {high_freq_factor}"
                            ),
                        )
                    })
                })
                .or_else(|| context(original_max_position_embeddings)),
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings,
                beta_fast,
                beta_slow,
                attention_factor,
                ..
            } => positive("factor", factor)
                .or_else(|| context(original_max_position_embeddings))
                .or_else(|| beta_fast.and_then(|b| positive("beta_fast", b)))
                .or_else(|| beta_slow.and_then(|b| positive("beta_slow", b)))
                .or_else(|| attention_factor.and_then(|a| positive("attention_factor", a))),
        }
    }
}

/// The generation service: admission, batching, limits and per-request defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServeConfig {
    /// Sequences decoding at once (continuous batching); more wait in the admission queue.
    pub max_running: usize,
    /// Prompt tokens admitted into one decode tick (prefill budget), so long prompts do not stall
    /// the sequences already decoding.
    pub token_budget: usize,
    /// Requests waiting for admission; when it is full the service answers 429.
    pub queue_capacity: usize,
    /// `max_tokens` when a request gives none, and the most one may ask for.
    pub default_max_tokens: usize,
    pub max_tokens_limit: usize,
    /// Seconds a request may take from arrival to its last token.
    pub request_timeout_s: f64,
    /// Largest request body, in bytes (413 beyond it).
    pub max_body_bytes: usize,
    /// Requests one API key (or, without keys, all callers together) may have in flight at once; more
    /// are answered 429. None: no limit beyond `queue_capacity`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_streams_per_key: Option<usize>,
    /// Largest side of an input image, in pixels, and most images per request.
    pub max_image_side: u32,
    pub max_images_per_request: usize,
    /// Images the model may draw in one response (further `<|startofimage|>` are masked).
    pub max_images_per_response: usize,
    /// DDIM steps and classifier-free guidance scale of drawn images (a request may override both).
    pub ddim_steps: i64,
    pub guidance_scale: f64,
    /// The system prompt of the chat template (paper Fig. 8) when the request has none.
    pub system_prompt: String,
    /// Score every input image by its CSR reconstruction loss (DEEM's consistency check).
    pub csr_score: bool,
    /// The fixed diffusion timesteps the CSR score averages over (seeded noise, same for every image).
    pub csr_timesteps: Vec<i64>,
    /// Images whose CSR score is above this are flagged as likely out of distribution (none: no flag).
    pub ood_threshold: Option<f64>,
    /// The most bytes each LLM shard's KV pool may take. The pool holds full-length sequences
    /// (`llm.max_position_embeddings` positions each), so the service runs at most
    /// min(`max_running`, budget ÷ one sequence's bytes) sequences at once; a budget below one
    /// sequence is refused at start. None: `max_running` slots, whatever they take.
    pub kv_cache_bytes: Option<u64>,
    /// Instead of `kv_cache_bytes`: this fraction (0, 1] of each shard's device memory (a CUDA
    /// device's total, the machine's for the CPU) less the shard's weights.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_cache_fraction: Option<f64>,
    /// The sampling loop of drawn images (a request's `scheduler` overrides it): `ddim`, `ddpm` (the
    /// reference's ancestral sampling) or `dpmsolver++`; `ddim_steps` sets the steps of any.
    #[serde(default, skip_serializing_if = "SamplerKind::is_ddim")]
    pub scheduler: SamplerKind,
    /// A worker whose compute thread dies is rebuilt in place (its weights reloaded) at most this
    /// many times within `restart_window_s`; past that it stays failed and the service unready until
    /// it is restarted from outside. 0: never rebuilt.
    pub max_restarts: u32,
    pub restart_window_s: f64,
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            max_running: 32,
            token_budget: 2048,
            queue_capacity: 64,
            default_max_tokens: 128,
            max_tokens_limit: 1024,
            request_timeout_s: 300.0,
            max_body_bytes: 16 << 20,
            max_streams_per_key: None,
            max_image_side: 4096,
            max_images_per_request: 6,
            max_images_per_response: 2,
            ddim_steps: 30,
            guidance_scale: 3.5,
            system_prompt: "You are a helpful assistant.".into(),
            csr_score: true,
            csr_timesteps: vec![300, 500, 700],
            ood_threshold: None,
            kv_cache_bytes: None,
            kv_cache_fraction: None,
            scheduler: SamplerKind::Ddim,
            max_restarts: 3,
            restart_window_s: 600.0,
        }
    }
}

/// Stable-Diffusion image decoder and DEEM's NIP condition path.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiffusionConfig {
    /// Output image size in pixels (512 for SD 2.1-base).
    pub image_size: i64,
    pub unet: UNetConfig,
    pub vae: VaeConfig,
    pub scheduler: SchedulerConfig,
    pub condition: ConditionConfig,
}

/// diffusers `UNet2DConditionModel` config fields that determine the weights.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UNetConfig {
    pub in_channels: i64,
    pub out_channels: i64,
    pub block_out_channels: Vec<i64>,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    pub layers_per_block: i64,
    /// diffusers' historical name: for SD 2.x this list is the number of heads per block.
    pub attention_head_dim: Vec<i64>,
    pub cross_attention_dim: i64,
    pub use_linear_projection: bool,
    pub norm_num_groups: i64,
    pub transformer_layers_per_block: i64,
}

/// diffusers `AutoencoderKL` config fields that determine the weights.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VaeConfig {
    pub in_channels: i64,
    pub out_channels: i64,
    pub latent_channels: i64,
    pub block_out_channels: Vec<i64>,
    pub layers_per_block: i64,
    pub norm_num_groups: i64,
    pub scaling_factor: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SchedulerConfig {
    pub num_train_timesteps: i64,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    pub prediction_type: PredictionType,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BetaSchedule {
    Linear,
    ScaledLinear,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PredictionType {
    Epsilon,
    VPrediction,
}

/// NIP condition: LLM hidden states → projection → 1-D sin-cos positions → perceiver → UNet context.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConditionConfig {
    /// Context tokens the UNet sees (77).
    pub num_queries: i64,
    /// Perceiver width (= `unet.cross_attention_dim`, 1024).
    pub width: i64,
    pub num_heads: i64,
    pub num_layers: i64,
    /// Probability that the learned null condition replaces the condition in training (0.1).
    pub null_condition_prob: f64,
}

/// Training recipe (paper Table 12).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    pub stage: Stage,
    pub seed: u64,
    pub steps: u64,
    pub warmup_steps: u64,
    /// Sequences per optimizer step, split into `microbatches` pipeline microbatches.
    pub batch_size: u64,
    pub microbatches: u64,
    pub context_length: i64,
    /// Learning rate of the parts without a group of their own.
    pub lr: f64,
    /// Learning rate of the encoder and image-decoder parts (stage I: 2e-5).
    pub encoder_lr: f64,
    /// Learning rate of the LLM when it is trainable (stages II/III).
    pub llm_lr: f64,
    pub betas: [f64; 2],
    pub eps: f64,
    pub weight_decay: f64,
    /// Global gradient-norm clipping threshold.
    pub max_grad_norm: f64,
    /// λ for the NIP loss (5).
    pub nip_loss_weight: f64,
    /// λ for the CSR loss (5).
    pub csr_loss_weight: f64,
    pub schedule: PipelineSchedule,
    /// Activation recomputation in the pipelined trainer: `none` keeps every microbatch's activations
    /// from its forward to its backward; `full` keeps only what each stage received and runs the
    /// stage's forward again right before the backward (the same gradients, for one extra forward);
    /// `{ layers = N }` recomputes only the first N decoder layers of each LLM shard (their input is
    /// kept, their inner activations are not), a middle ground between the two. The single-process
    /// reference trainer always keeps its activations.
    #[serde(default, skip_serializing_if = "Recompute::is_none")]
    pub recompute: Recompute,
    /// f16 only: the dynamic loss scale's starting value (`GradScaler`'s `init_scale`, 2^16). Steps
    /// whose gradients overflow are skipped and halve it.
    #[serde(
        default = "default_loss_scale_init",
        skip_serializing_if = "is_default_loss_scale_init"
    )]
    pub loss_scale_init: f64,
    /// Whether the original LM head trains with the LLM (stages II/III). DEEM freezes its pretrained head;
    /// a model trained from scratch needs it trainable.
    pub train_lm_head: bool,
    /// Whether the LLM (and, with `train_lm_head`, its head) also trains in stage I. DEEM keeps its
    /// pretrained Vicuna frozen there; a model whose LLM starts from scratch cannot learn to read the
    /// images through a frozen random network, so the tiny recipe trains it from the start.
    #[serde(default)]
    pub train_llm_in_stage_one: bool,
    /// Whether instruction conversations train next-token prediction on their prompts too (system
    /// prompt, questions), not only on the replies. LLaVA and DEEM train on the replies alone, with a
    /// pretrained LLM; a from-scratch LLM trained on the one-token yes/no replies alone never learns
    /// to compare the question with its context (`scripts/llm_equality_check.py`), with the prompts it
    /// does.
    #[serde(default)]
    pub loss_on_prompts: bool,
    /// Whether the documents packed into one training row are isolated: each attends only to itself
    /// and its positions restart at its BOS, so packing changes no document's computation (default). Off,
    /// a row is one causal sequence and a document reads the ones packed before it.
    #[serde(default = "default_true")]
    pub isolate_documents: bool,
    /// Write a checkpoint every this many steps (0: only at the end).
    pub checkpoint_every: u64,
    /// How often a failed step may restart the actors from the last checkpoint before the run stops.
    pub max_restarts: u32,
    /// Background threads that read, decode and preprocess the training batches of `deem train --data`
    /// (0: the trainer's own thread). Batches are the same whatever the number.
    #[serde(default = "default_data_workers")]
    pub data_workers: usize,
    /// Batches the data workers may have ready ahead of the trainer (the bounded queue's length; its
    /// memory is about this many batches of pixels).
    #[serde(default = "default_prefetch")]
    pub prefetch: usize,
    /// The training data mixture, files relative to `deem train --data DIR`. Empty (the default): the
    /// stage's own mixture (stage I `mmc4.jsonl` : `pairs.jsonl` = 2 : 1; stages II and III
    /// `llava.json` : `pairs.jsonl` = 2 : 1, the pairs when present).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sources: Vec<DataSource>,
}

/// One training data file and its sampling weight (`[[train.sources]]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSource {
    /// Path relative to the data folder (or absolute).
    pub file: String,
    pub format: DataFormat,
    /// Relative sampling probability among the sources.
    pub weight: f64,
    /// Folder the records' image paths are relative to, relative to the data folder (or absolute);
    /// absent: the file's own folder. For layouts that keep images apart (LLaVA's image folder, COCO's
    /// `train2014/`, downloaded MMC4 images). MMC4, pairs and LLaVA files may name a tar shard instead,
    /// whose members are the images under those paths; pair tar shards carry their images and ignore it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub images: Option<String>,
}

/// The dataset formats `deem train` reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DataFormat {
    /// MMC4-style interleaved documents (JSONL).
    Mmc4,
    /// Image-text pairs (JSONL).
    Pairs,
    /// Image-text pairs in a webdataset tar shard.
    PairsTar,
    /// LLaVA-style instruction conversations (JSON; `image` optional).
    Llava,
    /// Region data: COCO-style annotations with RLE or polygon masks and a caption each (JSON), in the
    /// referring template with the mask-aware extractor.
    Regions,
}

fn default_true() -> bool {
    true
}

fn default_data_workers() -> usize {
    2
}

fn default_prefetch() -> usize {
    4
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Stage {
    I,
    II,
    III,
}

/// A sampling loop for drawing images (`serve.scheduler`, a request's `scheduler`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum SamplerKind {
    /// DDIM, η = 0.
    #[default]
    #[serde(rename = "ddim")]
    Ddim,
    /// DDPM ancestral sampling (the reference draws with 250 steps).
    #[serde(rename = "ddpm")]
    Ddpm,
    /// DPM-Solver++ (2M).
    #[serde(rename = "dpmsolver++")]
    DpmSolver,
}

impl SamplerKind {
    pub fn is_ddim(&self) -> bool {
        *self == SamplerKind::Ddim
    }
}

fn default_loss_scale_init() -> f64 {
    65536.0
}

fn is_default_loss_scale_init(v: &f64) -> bool {
    *v == default_loss_scale_init()
}

/// `train.recompute`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Recompute {
    #[default]
    None,
    Full,
    /// The first N decoder layers of every LLM shard.
    Layers(u32),
}

impl Recompute {
    pub fn is_none(&self) -> bool {
        *self == Recompute::None
    }

    /// How many of a shard's `layers` decoder layers are recomputed layer by layer (0 under `none`,
    /// and under `full`, which recomputes the whole stage instead).
    pub fn layers_of(&self, layers: usize) -> usize {
        match self {
            Recompute::Layers(n) => (*n as usize).min(layers),
            _ => 0,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PipelineSchedule {
    Gpipe,
    #[serde(rename = "1f1b")]
    OneFOneB,
}

/// diffusers down-block classes whose weights deem knows.
pub const DOWN_BLOCKS: [&str; 2] = ["CrossAttnDownBlock2D", "DownBlock2D"];
/// diffusers up-block classes whose weights deem knows.
pub const UP_BLOCKS: [&str; 2] = ["CrossAttnUpBlock2D", "UpBlock2D"];
