//! Semantic validation of a configuration, after the style of serde's errors: every problem is reported
//! at once, each naming its dotted key and what was expected there, one function per section.

use super::{DeemConfig, RopeScaling, DOWN_BLOCKS, UP_BLOCKS};

/// One semantic problem in a configuration: the dotted key, and what was expected there.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigIssue {
    pub key: String,
    pub message: String,
}

struct Checker(Vec<ConfigIssue>);

impl Checker {
    fn check(&mut self, ok: bool, key: &str, message: impl FnOnce() -> String) {
        if !ok {
            self.0.push(ConfigIssue {
                key: key.to_string(),
                message: message(),
            });
        }
    }

    fn positive(&mut self, key: &str, value: i64) {
        self.check(value > 0, key, || {
            format!("expected a positive integer, found {value}")
        });
    }

    fn positive_f(&mut self, key: &str, value: f64) {
        self.check(value > 0.0 && value.is_finite(), key, || {
            format!("expected a positive number, found {value}")
        });
    }

    fn non_negative_f(&mut self, key: &str, value: f64) {
        self.check(value >= 0.0 && value.is_finite(), key, || {
            format!("expected a number >= 0, found {value}")
        });
    }

    fn divides(&mut self, key: &str, value: i64, whole_key: &str, whole: i64) {
        if value > 0 {
            self.check(whole % value == 0, key, || {
                format!("expected a divisor of {whole_key} ({whole}), found {value}")
            });
        }
    }

    fn len(&mut self, key: &str, len: usize, want_key: &str, want: usize) {
        self.check(len == want, key, || {
            format!("expected {want} entries (one per {want_key}), found {len}")
        });
    }

    fn all_positive(&mut self, key: &str, values: &[i64]) {
        self.check(
            !values.is_empty() && values.iter().all(|&v| v > 0),
            key,
            || format!("expected a non-empty list of positive integers, found {values:?}"),
        );
    }
}

impl DeemConfig {
    /// Every semantic problem of the configuration, in file order; empty when it is valid.
    pub fn validate(&self) -> Vec<ConfigIssue> {
        let mut c = Checker(Vec::new());
        c.check(!self.model.name.trim().is_empty(), "model.name", || {
            "expected a non-empty name".to_string()
        });

        self.check_vision(&mut c);
        self.check_resampler(&mut c);
        self.check_llm(&mut c);
        self.check_diffusion(&mut c);
        self.check_train(&mut c);
        self.check_serve(&mut c);
        c.0
    }

    /// `[vision]`: the encoder and its image size.
    fn check_vision(&self, c: &mut Checker) {
        let v = &self.vision;
        c.positive("vision.image_size", v.image_size);
        c.positive("vision.in_channels", v.in_channels);
        c.positive("vision.patch_size", v.patch_size);
        c.all_positive("vision.depths", &v.depths);
        c.all_positive("vision.dims", &v.dims);
        c.len(
            "vision.dims",
            v.dims.len(),
            "vision.depths entry",
            v.depths.len(),
        );
        c.positive("vision.embed_dim", v.embed_dim);
        c.positive("vision.adapter_width", v.adapter_width);
        if v.patch_size > 0 && !v.depths.is_empty() {
            // The stem divides by patch_size, every later stage by 2.
            let stride = v.patch_size << (v.depths.len() - 1);
            c.check(v.image_size % stride == 0, "vision.image_size", || {
                format!(
                    "expected a multiple of {stride} (vision.patch_size × 2^(stages−1)), found {}",
                    v.image_size
                )
            });
        }
    }

    /// `[resampler]`: the Perceiver Resamplers.
    fn check_resampler(&self, c: &mut Checker) {
        let v = &self.vision;
        let r = &self.resampler;
        c.positive("resampler.num_query_tokens", r.num_query_tokens);
        c.positive("resampler.hidden_size", r.hidden_size);
        c.positive("resampler.num_hidden_layers", r.num_hidden_layers);
        c.positive("resampler.num_attention_heads", r.num_attention_heads);
        c.divides(
            "resampler.num_attention_heads",
            r.num_attention_heads,
            "resampler.hidden_size",
            r.hidden_size,
        );
        c.positive("resampler.intermediate_size", r.intermediate_size);
        c.positive(
            "resampler.cross_attention_frequency",
            r.cross_attention_frequency,
        );
        c.check(
            r.encoder_hidden_size == v.adapter_width,
            "resampler.encoder_hidden_size",
            || {
                format!(
                    "expected vision.adapter_width ({}), the width of the image tokens, found {}",
                    v.adapter_width, r.encoder_hidden_size
                )
            },
        );
        c.positive_f("resampler.layer_norm_eps", r.layer_norm_eps);
    }

    /// `[llm]`: the LLM, its RoPE scaling and special ids.
    fn check_llm(&self, c: &mut Checker) {
        let l = &self.llm;
        c.positive("llm.vocab_size", l.vocab_size);
        c.check(l.num_new_tokens >= 0, "llm.num_new_tokens", || {
            format!("expected an integer >= 0, found {}", l.num_new_tokens)
        });
        c.positive("llm.hidden_size", l.hidden_size);
        c.positive("llm.intermediate_size", l.intermediate_size);
        c.positive("llm.num_hidden_layers", l.num_hidden_layers);
        c.positive("llm.num_attention_heads", l.num_attention_heads);
        c.divides(
            "llm.num_attention_heads",
            l.num_attention_heads,
            "llm.hidden_size",
            l.hidden_size,
        );
        c.positive("llm.num_key_value_heads", l.num_key_value_heads);
        c.divides(
            "llm.num_key_value_heads",
            l.num_key_value_heads,
            "llm.num_attention_heads",
            l.num_attention_heads,
        );
        if l.num_attention_heads > 0 && l.hidden_size % l.num_attention_heads == 0 {
            let head_dim = l.hidden_size / l.num_attention_heads;
            c.check(head_dim % 2 == 0, "llm.num_attention_heads", || {
                format!("expected an even head dimension for RoPE, found llm.hidden_size / heads = {head_dim}")
            });
        }
        c.positive_f("llm.rms_norm_eps", l.rms_norm_eps);
        c.positive_f("llm.rope_theta", l.rope_theta);
        if let Some((field, message)) = l.rope_scaling.as_ref().and_then(RopeScaling::problem) {
            c.check(false, &format!("llm.rope_scaling.{field}"), || message);
        }
        c.positive("llm.max_position_embeddings", l.max_position_embeddings);
        for (key, id) in [
            ("llm.bos_token_id", l.bos_token_id),
            ("llm.pad_token_id", l.pad_token_id),
            ("llm.eos_token_id", l.eos_token_id),
        ] {
            c.check((0..l.vocab_size).contains(&id), key, || {
                format!(
                    "expected an id in [0, llm.vocab_size = {}), found {id}",
                    l.vocab_size
                )
            });
        }
    }

    /// `[diffusion]`: the UNet, VAE, scheduler and NIP condition.
    fn check_diffusion(&self, c: &mut Checker) {
        let d = &self.diffusion;
        c.positive("diffusion.image_size", d.image_size);
        let u = &d.unet;
        c.positive("diffusion.unet.in_channels", u.in_channels);
        c.positive("diffusion.unet.out_channels", u.out_channels);
        c.all_positive("diffusion.unet.block_out_channels", &u.block_out_channels);
        let blocks = u.block_out_channels.len();
        c.len(
            "diffusion.unet.down_block_types",
            u.down_block_types.len(),
            "block_out_channels entry",
            blocks,
        );
        c.len(
            "diffusion.unet.up_block_types",
            u.up_block_types.len(),
            "block_out_channels entry",
            blocks,
        );
        c.len(
            "diffusion.unet.attention_head_dim",
            u.attention_head_dim.len(),
            "block_out_channels entry",
            blocks,
        );
        c.all_positive("diffusion.unet.attention_head_dim", &u.attention_head_dim);
        for (i, t) in u.down_block_types.iter().enumerate() {
            c.check(
                DOWN_BLOCKS.contains(&t.as_str()),
                &format!("diffusion.unet.down_block_types[{i}]"),
                || format!("expected one of {DOWN_BLOCKS:?}, found {t:?}"),
            );
        }
        for (i, t) in u.up_block_types.iter().enumerate() {
            c.check(
                UP_BLOCKS.contains(&t.as_str()),
                &format!("diffusion.unet.up_block_types[{i}]"),
                || format!("expected one of {UP_BLOCKS:?}, found {t:?}"),
            );
        }
        c.positive("diffusion.unet.layers_per_block", u.layers_per_block);
        c.positive("diffusion.unet.cross_attention_dim", u.cross_attention_dim);
        c.positive("diffusion.unet.norm_num_groups", u.norm_num_groups);
        for &ch in &u.block_out_channels {
            c.divides(
                "diffusion.unet.norm_num_groups",
                u.norm_num_groups,
                "every diffusion.unet.block_out_channels entry",
                ch,
            );
        }
        c.positive(
            "diffusion.unet.transformer_layers_per_block",
            u.transformer_layers_per_block,
        );

        let a = &d.vae;
        c.positive("diffusion.vae.in_channels", a.in_channels);
        c.positive("diffusion.vae.out_channels", a.out_channels);
        c.positive("diffusion.vae.latent_channels", a.latent_channels);
        c.check(
            a.latent_channels == u.in_channels,
            "diffusion.vae.latent_channels",
            || {
                format!(
                "expected diffusion.unet.in_channels ({}), the UNet denoises VAE latents, found {}",
                u.in_channels, a.latent_channels
            )
            },
        );
        c.all_positive("diffusion.vae.block_out_channels", &a.block_out_channels);
        c.positive("diffusion.vae.layers_per_block", a.layers_per_block);
        c.positive("diffusion.vae.norm_num_groups", a.norm_num_groups);
        for &ch in &a.block_out_channels {
            c.divides(
                "diffusion.vae.norm_num_groups",
                a.norm_num_groups,
                "every diffusion.vae.block_out_channels entry",
                ch,
            );
        }
        c.positive_f("diffusion.vae.scaling_factor", a.scaling_factor);
        if !a.block_out_channels.is_empty() {
            let stride = 1i64 << (a.block_out_channels.len() - 1);
            c.check(d.image_size % stride == 0, "diffusion.image_size", || {
                format!(
                    "expected a multiple of {stride} (the VAE downsampling factor), found {}",
                    d.image_size
                )
            });
        }

        let s = &d.scheduler;
        c.positive(
            "diffusion.scheduler.num_train_timesteps",
            s.num_train_timesteps,
        );
        c.positive_f("diffusion.scheduler.beta_start", s.beta_start);
        c.check(
            s.beta_end > s.beta_start && s.beta_end < 1.0,
            "diffusion.scheduler.beta_end",
            || {
                format!(
                    "expected beta_start ({}) < beta_end < 1, found {}",
                    s.beta_start, s.beta_end
                )
            },
        );

        let k = &d.condition;
        c.positive("diffusion.condition.num_queries", k.num_queries);
        c.check(k.width == u.cross_attention_dim, "diffusion.condition.width", || {
            format!(
                "expected diffusion.unet.cross_attention_dim ({}), the UNet context width, found {}",
                u.cross_attention_dim, k.width
            )
        });
        c.positive("diffusion.condition.num_heads", k.num_heads);
        c.divides(
            "diffusion.condition.num_heads",
            k.num_heads,
            "diffusion.condition.width",
            k.width,
        );
        c.positive("diffusion.condition.num_layers", k.num_layers);
        c.check(
            (0.0..=1.0).contains(&k.null_condition_prob),
            "diffusion.condition.null_condition_prob",
            || {
                format!(
                    "expected a probability in [0, 1], found {}",
                    k.null_condition_prob
                )
            },
        );
    }

    /// `[train]`: the optimizer, stages, schedule and data sources.
    fn check_train(&self, c: &mut Checker) {
        let l = &self.llm;
        let t = &self.train;
        c.positive("train.batch_size", t.batch_size as i64);
        c.positive("train.microbatches", t.microbatches as i64);
        if t.microbatches > 0 {
            c.check(
                t.batch_size % t.microbatches == 0,
                "train.microbatches",
                || {
                    format!(
                        "expected a divisor of train.batch_size ({}), found {}",
                        t.batch_size, t.microbatches
                    )
                },
            );
        }
        c.check(t.warmup_steps <= t.steps, "train.warmup_steps", || {
            format!(
                "expected at most train.steps ({}), found {}",
                t.steps, t.warmup_steps
            )
        });
        c.positive("train.context_length", t.context_length);
        c.positive("train.prefetch", t.prefetch as i64);
        c.check(
            t.context_length <= l.max_position_embeddings,
            "train.context_length",
            || {
                format!(
                    "expected at most llm.max_position_embeddings ({}), found {}",
                    l.max_position_embeddings, t.context_length
                )
            },
        );
        c.positive_f("train.lr", t.lr);
        c.positive_f("train.encoder_lr", t.encoder_lr);
        c.positive_f("train.llm_lr", t.llm_lr);
        for (i, b) in t.betas.iter().enumerate() {
            c.check((0.0..1.0).contains(b), &format!("train.betas[{i}]"), || {
                format!("expected a number in [0, 1), found {b}")
            });
        }
        c.positive_f("train.eps", t.eps);
        c.non_negative_f("train.weight_decay", t.weight_decay);
        c.positive_f("train.max_grad_norm", t.max_grad_norm);
        c.positive_f("train.loss_scale_init", t.loss_scale_init);
        c.non_negative_f("train.nip_loss_weight", t.nip_loss_weight);
        c.non_negative_f("train.csr_loss_weight", t.csr_loss_weight);
        for (i, src) in t.sources.iter().enumerate() {
            c.check(
                !src.file.trim().is_empty(),
                &format!("train.sources[{i}].file"),
                || "expected a file name, found an empty string".into(),
            );
            c.check(
                src.weight.is_finite() && src.weight > 0.0,
                &format!("train.sources[{i}].weight"),
                || format!("expected a positive sampling weight, found {}", src.weight),
            );
        }
    }

    /// `[serve]`: the service's limits and defaults.
    fn check_serve(&self, c: &mut Checker) {
        let s = &self.serve;
        for (key, v) in [
            ("serve.max_running", s.max_running),
            ("serve.token_budget", s.token_budget),
            ("serve.queue_capacity", s.queue_capacity),
            ("serve.default_max_tokens", s.default_max_tokens),
            ("serve.max_tokens_limit", s.max_tokens_limit),
            ("serve.max_body_bytes", s.max_body_bytes),
            ("serve.max_image_side", s.max_image_side as usize),
            (
                "serve.max_streams_per_key",
                s.max_streams_per_key.unwrap_or(1),
            ),
        ] {
            c.positive(key, v as i64);
        }
        c.check(
            s.default_max_tokens <= s.max_tokens_limit,
            "serve.default_max_tokens",
            || {
                format!(
                    "expected at most serve.max_tokens_limit ({}), found {}",
                    s.max_tokens_limit, s.default_max_tokens
                )
            },
        );
        c.positive_f("serve.request_timeout_s", s.request_timeout_s);
        c.positive_f("serve.restart_window_s", s.restart_window_s);
        let m = &self.data.mmc4;
        c.positive("data.mmc4.max_images", m.max_images as i64);
        c.check(
            (0.0..=1.0).contains(&m.drop_one_image_share),
            "data.mmc4.drop_one_image_share",
            || {
                format!(
                    "expected a share in [0, 1], found {}",
                    m.drop_one_image_share
                )
            },
        );
        c.check(
            m.min_similarity.is_finite(),
            "data.mmc4.min_similarity",
            || format!("expected a number, found {}", m.min_similarity),
        );
        if let Some(f) = s.kv_cache_fraction {
            c.check(f > 0.0 && f <= 1.0, "serve.kv_cache_fraction", || {
                format!("expected a fraction in (0, 1], found {f}")
            });
            c.check(
                s.kv_cache_bytes.is_none(),
                "serve.kv_cache_fraction",
                || {
                    "expected either serve.kv_cache_bytes or serve.kv_cache_fraction, found both"
                        .into()
                },
            );
        }
        c.positive("serve.ddim_steps", s.ddim_steps);
        c.check(
            s.guidance_scale >= 1.0 && s.guidance_scale.is_finite(),
            "serve.guidance_scale",
            || {
                format!(
                    "expected a number >= 1 (1 = no guidance), found {}",
                    s.guidance_scale
                )
            },
        );
        let t_max = self.diffusion.scheduler.num_train_timesteps;
        c.check(
            !s.csr_timesteps.is_empty() && s.csr_timesteps.iter().all(|t| (0..t_max).contains(t)),
            "serve.csr_timesteps",
            || {
                format!(
                    "expected a non-empty list of timesteps in [0, diffusion.scheduler.num_train_timesteps = {t_max}), found {:?}",
                    s.csr_timesteps
                )
            },
        );
    }
}
