//! One loader for every command that starts from weights (`deem train --pretrained | --init-from`,
//! `deem serve --checkpoint`, `deem eval`), after transformers' `from_pretrained` and diffusers' pipeline
//! folders: each path's role is recognised from its config (`model_index.json`, `config.json`'s
//! `_class_name` / `model_type`) or its tensor names, its keys are mapped onto the model's parameter
//! names, and each module (the whole model, one actor's part) then takes its own tensors straight from
//! the memory-mapped files onto its device — every name and shape checked before any value is copied.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use tch::{nn, Tensor};

use crate::checkpoint::{Checkpoint, CheckpointError, LoadSpec, MismatchReport};
use crate::config::{DeemConfig, SchedulerConfig};
use crate::models::deem::Part;

type Result<T> = std::result::Result<T, CheckpointError>;

/// The top-level name spaces of the model's parameters: a mapped name under none of them is no
/// parameter of any part.
pub const NAMESPACES: [&str; 7] = [
    "visual.",
    "visual_tokenizer.",
    "model.",
    "lm_head",
    "nip_condition.",
    "unet.",
    "vae.",
];

/// What a checkpoint holds, as recognised from its config or its keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// An HF transformers LLaMA (Vicuna): `model.…`, `lm_head.…`.
    Llm,
    /// An open_clip CLIP: its image tower `visual.…` (the text tower is skipped).
    OpenClip,
    /// A diffusers `UNet2DConditionModel` (names at the root).
    Unet,
    /// A diffusers `AutoencoderKL` (names at the root).
    Vae,
    /// An HF `Blip2QFormerModel` (at the root, or under `qformer.`).
    Resampler,
    /// A deem model (a run's `model.safetensors`, a part of one) or the reference DEEM's names.
    Deem,
}

impl Role {
    pub fn describe(self) -> &'static str {
        match self {
            Role::Llm => "HF LLaMA",
            Role::OpenClip => "open_clip image tower",
            Role::Unet => "diffusers UNet2DConditionModel",
            Role::Vae => "diffusers AutoencoderKL",
            Role::Resampler => "Q-Former resampler",
            Role::Deem => "deem model",
        }
    }

    /// The parameter name of checkpoint key `key`, or why the key is skipped.
    fn map(self, key: &str) -> std::result::Result<String, &'static str> {
        if key.ends_with("rotary_emb.inv_freq") || key.contains(".rotary_emb.") {
            return Err("rotary buffers (recomputed)");
        }
        match self {
            Role::Unet => Ok(format!("unet.{key}")),
            Role::Vae => Ok(format!("vae.{key}")),
            Role::Resampler => Ok(format!(
                "visual_tokenizer.qformer.{}",
                key.strip_prefix("qformer.").unwrap_or(key)
            )),
            Role::OpenClip if key.starts_with("visual.") => Ok(key.to_string()),
            Role::OpenClip => Err("open_clip text tower"),
            Role::Llm | Role::Deem => {
                if key.starts_with("optimizer.") {
                    return Err("optimizer state");
                }
                Ok(deem_name(key))
            }
        }
    }
}

/// The reference implementations' prefixes for the model's modules, mapped onto deem's.
const PREFIXES: [(&str, &str); 7] = [
    ("visual_tokenizer.encoder.", "visual."),
    ("image_decoder.unet.", "unet."),
    ("image_decoder.vae.", "vae."),
    ("language_model.model.", "model."),
    ("language_model.lm_head", "lm_head"),
    ("mm_decoder.lm_head", "lm_head"),
    ("mm_decoder.", "model."),
];

fn deem_name(key: &str) -> String {
    for (from, to) in PREFIXES {
        if let Some(rest) = key.strip_prefix(from) {
            return format!("{to}{rest}");
        }
    }
    key.to_string()
}

/// The role of a checkpoint from its tensor names, if they fit one.
pub fn recognise(names: &[&str]) -> Option<Role> {
    let any = |p: &str| names.iter().any(|n| n.starts_with(p));
    let has = |k: &str| names.contains(&k);
    let deem_only = [
        "visual_tokenizer.",
        "nip_condition.",
        "image_decoder.",
        "mm_decoder.",
        "unet.",
        "vae.",
        "model.soi_embedding",
        "model.embed_tokens_new",
        "lm_head_new",
    ];
    if deem_only.iter().any(|p| any(p)) {
        Some(Role::Deem)
    } else if any("visual.") {
        Some(Role::OpenClip)
    } else if any("model.") || any("lm_head") || any("language_model.model.") {
        Some(Role::Llm)
    } else if has("conv_in.weight") && any("time_embedding.") {
        Some(Role::Unet)
    } else if any("encoder.conv_in.") && any("decoder.conv_in.") {
        Some(Role::Vae)
    } else if any("qformer.") || (any("encoder.layer.") && any("layernorm.")) {
        Some(Role::Resampler)
    } else {
        None
    }
}

/// One opened checkpoint and where its tensors go.
pub struct Source {
    pub path: PathBuf,
    pub role: Role,
    ck: Checkpoint,
    /// Parameter name → checkpoint key.
    names: BTreeMap<String, String>,
    /// Skipped keys by reason.
    pub skipped: BTreeMap<&'static str, Vec<String>>,
}

impl Source {
    fn new(path: PathBuf, role: Role, ck: Checkpoint) -> Self {
        let mut names = BTreeMap::new();
        let mut skipped: BTreeMap<&'static str, Vec<String>> = BTreeMap::new();
        for key in ck.names() {
            match role.map(key) {
                Ok(name) => {
                    names.insert(name, key.to_string());
                }
                Err(why) => skipped.entry(why).or_default().push(key.to_string()),
            }
        }
        Source {
            path,
            role,
            ck,
            names,
            skipped,
        }
    }

    /// `(parameter name, checkpoint key)` of every tensor this source fills.
    pub fn entries(&self) -> impl Iterator<Item = (&str, &str)> {
        self.names.iter().map(|(n, k)| (n.as_str(), k.as_str()))
    }

    /// The file's tensor under checkpoint key `key` (its dtype on disk).
    pub fn tensor(&self, key: &str) -> Result<Option<Tensor>> {
        self.ck.tensor(key)
    }
}

const EXPECTED: &str = "expected an HF LLaMA folder or file (`config.json` with `model_type = \"llama\"`, or \
`model.layers.*` tensors), a diffusers pipeline folder (`model_index.json`) or its `unet/` or `vae/` folder, an \
open_clip checkpoint (`visual.*` tensors), a Q-Former (`qformer.*`), or a deem model (a run directory or its \
`model.safetensors`)";

fn unrecognised(path: &Path, detail: String) -> CheckpointError {
    CheckpointError::Unrecognised {
        path: path.to_path_buf(),
        detail: format!("{detail}; {EXPECTED}"),
    }
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).map_err(|e| CheckpointError::Io {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    serde_json::from_str(&text).map_err(|e| CheckpointError::Io {
        path: path.to_path_buf(),
        message: format!("not valid JSON: {e}"),
    })
}

/// The role a folder's `config.json` declares, if it declares one deem loads.
fn role_of_config(config: &Path) -> Result<Option<Role>> {
    let v = read_json(config)?;
    let class = v.get("_class_name").and_then(|c| c.as_str()).unwrap_or("");
    let model_type = v.get("model_type").and_then(|c| c.as_str()).unwrap_or("");
    let llama_arch = v
        .get("architectures")
        .and_then(|a| a.as_array())
        .is_some_and(|a| {
            a.iter()
                .any(|x| x.as_str().is_some_and(|s| s.starts_with("Llama")))
        });
    Ok(match (class, model_type) {
        ("UNet2DConditionModel", _) => Some(Role::Unet),
        ("AutoencoderKL", _) => Some(Role::Vae),
        (_, "llama") => Some(Role::Llm),
        (_, "blip_2_qformer") => Some(Role::Resampler),
        _ if llama_arch => Some(Role::Llm),
        ("", "") => None,
        (c, t) => {
            return Err(unrecognised(
                config,
                format!("declares `_class_name = {c:?}`, `model_type = {t:?}`"),
            ))
        }
    })
}

/// Checks a diffusers pipeline's noise schedule against the one deem trains and samples with.
fn check_scheduler(path: &Path, want: &SchedulerConfig) -> Result<()> {
    let v = read_json(path)?;
    let schedule = serde_json::to_value(want.beta_schedule).unwrap_or_default();
    let prediction = serde_json::to_value(want.prediction_type).unwrap_or_default();
    let fields: [(&str, serde_json::Value); 5] = [
        ("num_train_timesteps", want.num_train_timesteps.into()),
        ("beta_start", want.beta_start.into()),
        ("beta_end", want.beta_end.into()),
        ("beta_schedule", schedule),
        ("prediction_type", prediction),
    ];
    for (field, expected) in fields {
        let Some(got) = v.get(field) else { continue };
        let same = match (got.as_f64(), expected.as_f64()) {
            (Some(a), Some(b)) => (a - b).abs() <= 1e-9 * b.abs().max(1.0),
            _ => *got == expected,
        };
        if !same {
            return Err(CheckpointError::Io {
                path: path.to_path_buf(),
                message: format!(
                    "`{field}` is {got}; diffusion.scheduler.{field} is {expected} (the UNet was trained \
                     with this schedule: set diffusion.scheduler to match)"
                ),
            });
        }
    }
    Ok(())
}

/// The weight files the libraries write into a folder, in the order they are looked for.
const WEIGHT_FILES: [&str; 3] = [
    "model.safetensors",
    "diffusion_pytorch_model.safetensors",
    "open_clip_model.safetensors",
];

/// Opens the checkpoint of a path: a safetensors file or index, or a folder holding a sharded index
/// or one of the libraries' weight files (other safetensors beside them, such as inputs, are not
/// weights), else every safetensors file in it. Returns the path messages name: a deem run directory
/// is named by its `model.safetensors`.
fn open_weights(path: &Path) -> Result<(PathBuf, Checkpoint)> {
    if path.is_dir() {
        let has_index = std::fs::read_dir(path).is_ok_and(|entries| {
            entries.filter_map(|e| e.ok()).any(|e| {
                e.file_name()
                    .to_string_lossy()
                    .ends_with(".safetensors.index.json")
            })
        });
        let file = WEIGHT_FILES
            .iter()
            .map(|f| path.join(f))
            .find(|f| f.exists());
        if let (false, Some(file)) = (has_index, file) {
            let named = if path.join("config.json").exists() {
                path.to_path_buf()
            } else {
                file.clone()
            };
            return Ok((named, Checkpoint::open(&file)?));
        }
    }
    Ok((path.to_path_buf(), Checkpoint::open(path)?))
}

/// The sources one path holds (a pipeline folder holds two).
fn open_path(
    path: &Path,
    scheduler: Option<&SchedulerConfig>,
    notes: &mut Vec<String>,
) -> Result<Vec<Source>> {
    if !path.exists() {
        return Err(CheckpointError::Io {
            path: path.to_path_buf(),
            message: "no such file or directory".into(),
        });
    }
    if path.is_dir() && path.join("model_index.json").exists() {
        return open_pipeline(path, scheduler, notes);
    }
    let config = if path.is_dir() {
        Some(path.join("config.json"))
    } else {
        None
    };
    let declared = match config.filter(|c| c.exists()) {
        Some(c) => role_of_config(&c)?,
        None => None,
    };
    let (path, ck) = open_weights(path)?;
    let path = path.as_path();
    let names: Vec<&str> = ck.names().collect();
    let role = match declared.or_else(|| recognise(&names)) {
        Some(r) => r,
        None => {
            let head: Vec<&str> = names.iter().take(3).copied().collect();
            return Err(unrecognised(
                path,
                if head.is_empty() {
                    "holds no tensors".to_string()
                } else {
                    format!("its tensors ({}, …) fit none of the roles", head.join(", "))
                },
            ));
        }
    };
    Ok(vec![Source::new(path.to_path_buf(), role, ck)])
}

/// A diffusers pipeline folder: its `unet/` and `vae/` (the text encoder, tokenizer, safety checker
/// and feature extractor are not DEEM's and are named in the log).
fn open_pipeline(
    path: &Path,
    scheduler: Option<&SchedulerConfig>,
    notes: &mut Vec<String>,
) -> Result<Vec<Source>> {
    let index = read_json(&path.join("model_index.json"))?;
    let mut out = Vec::new();
    for (sub, role) in [("unet", Role::Unet), ("vae", Role::Vae)] {
        let dir = path.join(sub);
        if dir.is_dir() {
            out.push(Source::new(dir.clone(), role, Checkpoint::open(&dir)?));
        }
    }
    if out.is_empty() {
        return Err(unrecognised(
            path,
            "a diffusers pipeline without a `unet/` or `vae/` folder".into(),
        ));
    }
    let others: Vec<&String> = index
        .as_object()
        .map(|o| {
            o.iter()
                // `[null, null]` marks a component the pipeline does not have; the scheduler is
                // checked below.
                .filter(|(k, v)| {
                    !k.starts_with('_')
                        && !matches!(k.as_str(), "unet" | "vae" | "scheduler")
                        && v.as_array().is_some_and(|a| a.iter().any(|x| !x.is_null()))
                })
                .map(|(k, _)| k)
                .collect()
        })
        .unwrap_or_default();
    if !others.is_empty() {
        notes.push(format!(
            "{}: skipping the pipeline's {} (DEEM's image decoder is its UNet and VAE)",
            path.display(),
            others
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    let sched = path.join("scheduler/scheduler_config.json");
    if let (Some(want), true) = (scheduler, sched.exists()) {
        check_scheduler(&sched, want)?;
    }
    Ok(out)
}

/// The weights of one or more paths, the later filling a name over the earlier.
pub struct Pretrained {
    pub sources: Vec<Source>,
    /// What was skipped beyond tensors (a pipeline's text encoder, …), for the log.
    pub notes: Vec<String>,
}

/// What one module took: for each source, the names it filled; and the module's names no source has.
#[derive(Debug, Clone, Default)]
pub struct Filled {
    pub by_source: Vec<Vec<String>>,
    pub kept: Vec<String>,
}

impl Pretrained {
    /// Opens every path and recognises its role. `cfg` supplies the noise schedule a diffusers pipeline
    /// must have.
    pub fn open(paths: &[PathBuf], cfg: Option<&DeemConfig>) -> Result<Self> {
        let (mut sources, mut notes) = (Vec::new(), Vec::new());
        for p in paths {
            sources.extend(open_path(
                p,
                cfg.map(|c| &c.diffusion.scheduler),
                &mut notes,
            )?);
        }
        Ok(Pretrained { sources, notes })
    }

    /// Checks `vars` (the module's parameters) against every source under `spec`'s name space, and
    /// returns which source and key fills each variable. With `complete`, every variable needs a value
    /// (but those `spec.optional` lists).
    fn plan(
        &self,
        vars: &BTreeMap<String, Tensor>,
        spec: &LoadSpec,
        complete: bool,
    ) -> Result<BTreeMap<String, (usize, String)>> {
        let starts = |list: &[String], k: &str| list.iter().any(|p| k.starts_with(p.as_str()));
        let mut plan = BTreeMap::new();
        for (i, s) in self.sources.iter().enumerate() {
            let mut report = MismatchReport {
                source: s.path.display().to_string(),
                component: format!("{} ({})", spec.component, s.role.describe()),
                ..Default::default()
            };
            for (name, key) in &s.names {
                match vars.get(name) {
                    Some(var) => {
                        let got = s.ck.shape(key).unwrap_or_default();
                        if got != var.size() {
                            report.wrong_shape.push((key.clone(), var.size(), got));
                        } else {
                            plan.insert(name.clone(), (i, key.clone()));
                        }
                    }
                    None if !NAMESPACES.iter().any(|p| name.starts_with(p))
                        || (starts(&spec.namespace, name) && !starts(&spec.ignore, name)) =>
                    {
                        report.unexpected.push(key.clone());
                    }
                    None => {}
                }
            }
            if !report.is_empty() {
                return Err(CheckpointError::Mismatch(report));
            }
        }
        if complete {
            let missing: Vec<String> = vars
                .keys()
                // And the region extractor (a model saved before region support).
                .filter(|n| {
                    !plan.contains_key(*n)
                        && !starts(&spec.optional, n)
                        && !crate::models::region::is_extractor_key(n)
                })
                .cloned()
                .collect();
            if !missing.is_empty() {
                return Err(CheckpointError::Mismatch(MismatchReport {
                    source: self.describe(),
                    component: spec.component.clone(),
                    missing,
                    ..Default::default()
                }));
            }
        }
        Ok(plan)
    }

    /// The paths, for messages.
    pub fn describe(&self) -> String {
        self.sources
            .iter()
            .map(|s| s.path.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Checks that the sources fit `vs` under `spec` without copying anything (see [`Self::load_into`]).
    pub fn check(&self, vs: &nn::VarStore, spec: &LoadSpec, complete: bool) -> Result<()> {
        self.plan(&vs.variables().into_iter().collect(), spec, complete)
            .map(drop)
    }

    /// Copies each source's tensors into the variables of `vs` they name (converted to the variable's
    /// dtype and device), after checking every name and shape: a bad source changes nothing. `loaded`
    /// sees each filled variable's name and the file's value (for fp32 master weights). Keys under
    /// `spec.namespace` (and not `spec.ignore`) or outside every part's name space that no variable
    /// takes are refused.
    pub fn load_into(
        &self,
        vs: &nn::VarStore,
        spec: &LoadSpec,
        complete: bool,
        mut loaded: impl FnMut(&str, &Tensor),
    ) -> Result<Filled> {
        let vars: BTreeMap<String, Tensor> = vs.variables().into_iter().collect();
        let plan = self.plan(&vars, spec, complete)?;
        let mut filled = Filled {
            by_source: vec![Vec::new(); self.sources.len()],
            kept: vars
                .keys()
                .filter(|n| !plan.contains_key(*n))
                .cloned()
                .collect(),
        };
        tch::no_grad(|| -> Result<()> {
            for (name, (i, key)) in plan {
                let Some(src) = self.sources[i].ck.tensor(&key)? else {
                    continue;
                };
                let mut dst = vars[&name].shallow_clone();
                dst.copy_(&src.to_kind(dst.kind()).to_device(dst.device()));
                loaded(&name, &src);
                filled.by_source[i].push(name);
            }
            Ok(())
        })?;
        Ok(filled)
    }
}

/// The loading rules of one actor's part of the model (or the whole model), over parameter names.
pub fn part_spec(cfg: &DeemConfig, part: &Part) -> LoadSpec {
    let region = crate::models::region::key_prefixes();
    let strings = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    match part {
        Part::Whole => LoadSpec {
            component: "model".into(),
            namespace: strings(&NAMESPACES),
            optional: region,
            ..Default::default()
        },
        Part::Vision => LoadSpec {
            component: "vision".into(),
            namespace: strings(&["visual.", "visual_tokenizer."]),
            optional: region,
            ..Default::default()
        },
        // A deem model has DEEM's additions (new tokens, their head, the SoI vector): none is optional.
        Part::Llm(layers) => LoadSpec {
            optional: vec![],
            ..crate::models::llama::load_spec_of(cfg.llm.num_hidden_layers, layers.clone())
        },
        Part::Diffusion => LoadSpec {
            component: "diffusion".into(),
            namespace: strings(&["nip_condition.", "unet.", "vae."]),
            ..Default::default()
        },
    }
}

/// Groups names by module (their first two components) with counts, for logs: `visual.trunk (70)`.
pub fn summarise(names: &[String]) -> String {
    let mut groups: BTreeMap<String, usize> = BTreeMap::new();
    for n in names {
        let mut parts = n.split('.');
        let head = match (parts.next(), parts.next()) {
            (Some(a), Some(b)) if b.parse::<u64>().is_err() => format!("{a}.{b}"),
            (Some(a), _) => a.to_string(),
            _ => n.clone(),
        };
        *groups.entry(head).or_default() += 1;
    }
    groups
        .into_iter()
        .map(|(g, n)| format!("{g} ({n})"))
        .collect::<Vec<_>>()
        .join(", ")
}
