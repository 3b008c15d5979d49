//! Validation, after text-generation-inference's validation stage: a parsed OpenAI request becomes a
//! [`ValidRequest`] — sampling parameters in range, limits checked, images decoded, the prompt built in
//! the Vicuna chat template with every image as `<|startofimage|>` + its placeholders — or a
//! [`ServeError`] naming the offending field.

use std::time::{Duration, Instant};

use base64::Engine as _;
use deem::config::{DeemConfig, ServeConfig};
use deem::text::sampling::SamplingParams;
use deem::text::tokenizer::DeemTokenizer;
use tch::Tensor;

use super::error::ServeError;
use super::openai::{ChatRequest, Content, Message, Part, Stop};

/// One generation request, validated and tokenised: what admission queues and the scheduler runs.
pub struct ValidRequest {
    pub id: uuid::Uuid,
    /// Prompt ids; every image is `<|startofimage|>` followed by its placeholders.
    pub prompt: Vec<i64>,
    /// The prompt's images, [N, 3, S, S] in [0, 1], in placeholder order.
    pub images: Option<Tensor>,
    /// Region input: one mask per image, [N, 1, S, S] in [0, 1] (whole images all ones); present when
    /// any image of the request has a mask. Images the model draws join the context with an all-ones
    /// mask then.
    pub masks: Option<Tensor>,
    /// Shared with every decode row of the request.
    pub params: std::sync::Arc<SamplingParams>,
    pub max_tokens: usize,
    pub stop: Vec<String>,
    /// The steps of the image sampler (the request's `ddim_steps`, whichever the scheduler).
    pub ddim_steps: i64,
    pub scheduler: deem::config::SamplerKind,
    pub guidance: f64,
    pub max_images: usize,
    /// 1: draw each token by `params`; more: beam search of that width (deterministic, no images,
    /// the text sent whole when the search ends).
    pub num_beams: usize,
    pub csr_score: bool,
    pub arrived: Instant,
    pub timeout: Duration,
}

/// The validated generation parameters of a request (everything but the prompt).
struct ValidParameters {
    params: SamplingParams,
    max_tokens: usize,
    stop: Vec<String>,
    ddim_steps: i64,
    scheduler: deem::config::SamplerKind,
    guidance: f64,
    max_images: usize,
    num_beams: usize,
}

/// The validated prompt: ids, images and their region masks.
struct ValidPrompt {
    ids: Vec<i64>,
    images: Option<Tensor>,
    masks: Option<Tensor>,
}

/// A decoded input image: a base64 `data:` URL of a PNG, JPEG, WebP or (first frame of a) GIF, the
/// formats OpenAI's API takes; `field` names it in errors.
pub fn decode_image(url: &str, field: &str, max_side: u32) -> Result<image::RgbImage, ServeError> {
    let Some(rest) = url.strip_prefix("data:") else {
        return Err(ServeError::invalid(
            field,
            "expected a data: URL (data:image/png;base64,…); the server fetches nothing",
        ));
    };
    let Some((meta, data)) = rest.split_once(',') else {
        return Err(ServeError::invalid(
            field,
            "a data: URL needs a comma before its data",
        ));
    };
    if !meta.ends_with(";base64") {
        return Err(ServeError::invalid(
            field,
            "expected base64 data (data:image/…;base64,…)",
        ));
    }
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(data.trim())
        .map_err(|e| ServeError::invalid(field, format!("invalid base64: {e}")))?;
    let (w, h) = deem::data::decode::dimensions(&bytes)
        .map_err(|e| ServeError::invalid(field, e.to_string()))?;
    if w.max(h) > max_side || w == 0 || h == 0 {
        return Err(ServeError::invalid(
            field,
            format!(
                "the image is {w}×{h}; expected sides in 1..={max_side} (serve.max_image_side)"
            ),
        ));
    }
    deem::data::decode::decode_rgb(&bytes).map_err(|e| ServeError::invalid(field, e.to_string()))
}

fn range_f(
    v: Option<f64>,
    field: &str,
    lo: f64,
    hi: f64,
    lo_open: bool,
) -> Result<Option<f64>, ServeError> {
    match v {
        Some(x) if !x.is_finite() || x > hi || x < lo || (lo_open && x == lo) => {
            Err(ServeError::invalid(
                field,
                format!(
                    "expected a number in {}{lo}, {hi}], found {x}",
                    if lo_open { "(" } else { "[" }
                ),
            ))
        }
        other => Ok(other),
    }
}

/// Validates `r` into the request the engine runs: its model, parameters and prompt (the Vicuna chat
/// template with the paper's system prompt, every image as `<|startofimage|>` + its placeholders).
pub fn validate(
    r: ChatRequest,
    cfg: &DeemConfig,
    tok: &DeemTokenizer,
    served: &str,
) -> Result<ValidRequest, ServeError> {
    if let Some(m) = &r.model {
        if m != served {
            return Err(ServeError::UnknownModel {
                requested: m.clone(),
                served: served.to_string(),
            });
        }
    }
    if r.messages.is_empty() {
        return Err(ServeError::invalid(
            "messages",
            "expected at least one message",
        ));
    }
    let p = validate_parameters(&r, &cfg.serve, cfg.llm.vocab_size + cfg.llm.num_new_tokens)?;
    let prompt = validate_prompt(&r.messages, cfg, tok)?;
    let s = &cfg.serve;
    Ok(ValidRequest {
        id: uuid::Uuid::new_v4(),
        prompt: prompt.ids,
        images: prompt.images,
        masks: prompt.masks,
        params: std::sync::Arc::new(p.params),
        max_tokens: p.max_tokens,
        stop: p.stop,
        ddim_steps: p.ddim_steps,
        scheduler: p.scheduler,
        guidance: p.guidance,
        max_images: p.max_images,
        num_beams: p.num_beams,
        csr_score: r.csr_score.unwrap_or(s.csr_score),
        arrived: Instant::now(),
        timeout: Duration::from_secs_f64(s.request_timeout_s),
    })
}

/// Sampling parameters, limits and extensions, each in its range (`vocab`: ids a logit bias may name).
fn validate_parameters(
    r: &ChatRequest,
    s: &ServeConfig,
    vocab: i64,
) -> Result<ValidParameters, ServeError> {
    if let Some(n) = r.n {
        if n != 1 {
            return Err(ServeError::invalid(
                "n",
                format!("only n = 1 is supported, found {n}"),
            ));
        }
    }
    let max_tokens = match r.max_completion_tokens.or(r.max_tokens) {
        None => s.default_max_tokens,
        Some(n) if n >= 1 && n as usize <= s.max_tokens_limit => n as usize,
        Some(n) => {
            let field = if r.max_completion_tokens.is_some() {
                "max_completion_tokens"
            } else {
                "max_tokens"
            };
            return Err(ServeError::invalid(
                field,
                format!(
                    "expected an integer in 1..={} (serve.max_tokens_limit), found {n}",
                    s.max_tokens_limit
                ),
            ));
        }
    };
    let temperature = range_f(r.temperature, "temperature", 0.0, 2.0, false)?.unwrap_or(1.0);
    let top_p = range_f(r.top_p, "top_p", 0.0, 1.0, true)?.unwrap_or(1.0);
    let repetition_penalty =
        range_f(r.repetition_penalty, "repetition_penalty", 0.0, 10.0, true)?.unwrap_or(1.0);
    let top_k = match r.top_k {
        None => 0,
        Some(k) if k >= 0 => k as usize,
        Some(k) => {
            return Err(ServeError::invalid(
                "top_k",
                format!("expected an integer >= 0, found {k}"),
            ))
        }
    };
    let mut logit_bias = Vec::new();
    for (k, &v) in r.logit_bias.iter().flatten() {
        let field = format!("logit_bias.{k}");
        let id: i64 = k
            .parse()
            .map_err(|_| ServeError::invalid(&field, "expected a token id as the key"))?;
        if !(0..vocab).contains(&id) {
            return Err(ServeError::invalid(
                &field,
                format!("expected a token id in [0, {vocab})"),
            ));
        }
        if !(-100.0..=100.0).contains(&v) {
            return Err(ServeError::invalid(
                &field,
                format!("expected a bias in [-100, 100], found {v}"),
            ));
        }
        logit_bias.push((id, v));
    }
    let stop = match &r.stop {
        None => vec![],
        Some(Stop::One(x)) => vec![x.clone()],
        Some(Stop::Many(v)) => v.clone(),
    };
    if stop.len() > 4 || stop.iter().any(|x| x.is_empty()) {
        return Err(ServeError::invalid(
            "stop",
            "expected at most 4 non-empty strings",
        ));
    }
    let ddim_steps = match r.ddim_steps {
        None => s.ddim_steps,
        Some(n) if (1..=1000).contains(&n) => n,
        Some(n) => {
            return Err(ServeError::invalid(
                "ddim_steps",
                format!("expected an integer in 1..=1000, found {n}"),
            ))
        }
    };
    use deem::config::SamplerKind;
    let scheduler = match r.scheduler.as_deref() {
        None => s.scheduler,
        Some("ddim") => SamplerKind::Ddim,
        Some("ddpm") => SamplerKind::Ddpm,
        Some("dpmsolver++") => SamplerKind::DpmSolver,
        Some(other) => {
            return Err(ServeError::invalid(
                "scheduler",
                format!("expected one of \"ddim\", \"ddpm\", \"dpmsolver++\", found \"{other}\""),
            ))
        }
    };
    let guidance =
        range_f(r.guidance_scale, "guidance_scale", 1.0, 50.0, false)?.unwrap_or(s.guidance_scale);
    let max_images = match r.max_images {
        None => s.max_images_per_response,
        Some(n) if n >= 0 && n as usize <= s.max_images_per_response => n as usize,
        Some(n) => {
            return Err(ServeError::invalid(
                "max_images",
                format!(
                    "expected an integer in 0..={} (serve.max_images_per_response), found {n}",
                    s.max_images_per_response
                ),
            ))
        }
    };
    let num_beams = match r.num_beams {
        None => 1,
        Some(n) if n >= 1 && n as usize <= s.max_running => n as usize,
        Some(n) => {
            return Err(ServeError::invalid(
                "num_beams",
                format!(
                    "expected an integer in 1..={} (serve.max_running: every beam holds a sequence slot), found {n}",
                    s.max_running
                ),
            ))
        }
    };
    Ok(ValidParameters {
        params: SamplingParams {
            temperature,
            top_p,
            top_k,
            repetition_penalty,
            seed: r.seed.unwrap_or_else(rand_seed),
            logit_bias,
        },
        max_tokens,
        stop,
        ddim_steps,
        scheduler,
        guidance,
        max_images,
        num_beams,
    })
}

/// The prompt in the chat template, its images decoded and checked against the limits and the context.
fn validate_prompt(
    messages: &[Message],
    cfg: &DeemConfig,
    tok: &DeemTokenizer,
) -> Result<ValidPrompt, ServeError> {
    let s = &cfg.serve;
    let enc = |text: &str| -> Result<Vec<i64>, ServeError> {
        tok.encode(text, false)
            .map(|v| v.into_iter().map(i64::from).collect())
            .map_err(|e| ServeError::Internal(e.to_string()))
    };
    let k = cfg.resampler.num_query_tokens as usize;
    let placeholder: Vec<i64> = tok
        .image_placeholder(k)
        .into_iter()
        .map(i64::from)
        .collect();
    let size = cfg.diffusion.image_size.max(cfg.vision.image_size) as u32;
    let mut ids = vec![cfg.llm.bos_token_id];
    let mut images: Vec<Tensor> = Vec::new();
    // Per image up to the last one with a mask: its region mask (`None`: the whole image).
    let mut masks: Vec<Option<Tensor>> = Vec::new();
    let system = messages
        .iter()
        .find(|m| m.role == "system")
        .map(|m| text_of(m, "system"))
        .transpose()?
        .unwrap_or_else(|| s.system_prompt.clone());
    ids.extend(enc(&system)?);
    for (i, m) in messages.iter().enumerate() {
        let field = format!("messages[{i}]");
        let prefix = match m.role.as_str() {
            "system" => continue,
            "user" => " USER: ",
            "assistant" => " ASSISTANT: ",
            other => {
                return Err(ServeError::invalid(
                    format!("{field}.role"),
                    format!("expected system, user or assistant, found `{other}`"),
                ))
            }
        };
        ids.extend(enc(prefix.trim_end())?);
        match &m.content {
            None if m.role == "assistant" => {}
            None => return Err(ServeError::invalid(format!("{field}.content"), "missing")),
            Some(Content::Text(t)) => ids.extend(enc(&format!(" {t}"))?),
            Some(Content::Parts(parts)) => {
                for (j, p) in parts.iter().enumerate() {
                    match p {
                        Part::Text { text } => ids.extend(enc(&format!(" {text}"))?),
                        Part::ImageUrl { image_url } => {
                            let f = format!("{field}.content[{j}].image_url.url");
                            if m.role != "user" {
                                return Err(ServeError::invalid(
                                    f,
                                    "only user messages may carry images",
                                ));
                            }
                            if images.len() >= s.max_images_per_request {
                                return Err(ServeError::invalid(
                                    f,
                                    format!(
                                        "more than {} images (serve.max_images_per_request)",
                                        s.max_images_per_request
                                    ),
                                ));
                            }
                            let img = decode_image(&image_url.url, &f, s.max_image_side)?;
                            if let Some(url) = &image_url.mask {
                                let f = format!("{field}.content[{j}].image_url.mask");
                                let m = decode_image(url, &f, s.max_image_side)?;
                                if m.dimensions() != img.dimensions() {
                                    let ((mw, mh), (w, h)) = (m.dimensions(), img.dimensions());
                                    return Err(ServeError::invalid(
                                        f,
                                        format!("the mask is {mw}×{mh}; its image is {w}×{h}"),
                                    ));
                                }
                                let inside: Vec<bool> = image::DynamicImage::ImageRgb8(m)
                                    .to_luma8()
                                    .pixels()
                                    .map(|p| p.0[0] > 127)
                                    .collect();
                                let (w, h) = img.dimensions();
                                while masks.len() < images.len() {
                                    masks.push(None);
                                }
                                masks.push(deem::models::region::unit_mask(&inside, w, h, size));
                            }
                            images.push(deem::models::vision::unit_pixels(&img, size));
                            ids.extend(&placeholder);
                        }
                    }
                }
            }
        }
        if m.role == "assistant" {
            ids.push(cfg.llm.eos_token_id);
        }
    }
    ids.extend(enc(" ASSISTANT:")?);
    let room = cfg.llm.max_position_embeddings as usize;
    if ids.len() + 1 > room {
        return Err(ServeError::invalid(
            "messages",
            format!(
                "the prompt is {} tokens (images count {k} each); the model's context is {room} (llm.max_position_embeddings)",
                ids.len()
            ),
        ));
    }
    Ok(ValidPrompt {
        ids,
        masks: (!masks.is_empty()).then(|| {
            let whole = deem::models::region::whole_image_masks(1, size as i64).get(0);
            let all: Vec<Tensor> = (0..images.len())
                .map(|i| match masks.get(i) {
                    Some(Some(m)) => m.shallow_clone(),
                    _ => whole.shallow_clone(),
                })
                .collect();
            Tensor::stack(&all, 0)
        }),
        images: (!images.is_empty()).then(|| Tensor::stack(&images, 0)),
    })
}

fn text_of(m: &Message, field: &str) -> Result<String, ServeError> {
    match &m.content {
        Some(Content::Text(t)) => Ok(t.clone()),
        Some(Content::Parts(p)) => p
            .iter()
            .map(|p| match p {
                Part::Text { text } => Ok(text.as_str()),
                Part::ImageUrl { .. } => Err(ServeError::invalid(
                    format!("{field} message"),
                    "expected text only",
                )),
            })
            .collect::<Result<Vec<_>, _>>()
            .map(|v| v.join(" ")),
        None => Ok(String::new()),
    }
}

fn rand_seed() -> u64 {
    let u = uuid::Uuid::new_v4();
    u.as_u64_pair().0
}
