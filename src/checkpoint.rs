//! Reading real checkpoints: safetensors files as HF transformers, diffusers and open_clip write them,
//! single or sharded (`*.safetensors.index.json`), memory-mapped so a component reads only the tensors
//! it owns. Names pass through a prefix map, so whole-model DEEM checkpoints (`mm_decoder.…`,
//! `visual_tokenizer.…`) and plain reference files load into the same modules. Values on disk in
//! f32/f16/bf16 are converted to each variable's dtype. Missing, unexpected and wrongly shaped keys are
//! reported together in one error.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};
use tch::{Kind, Tensor};

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{path}: {message}")]
    Io { path: PathBuf, message: String },
    #[error(
        "{path}: not a valid safetensors file ({message}); is it truncated or still downloading?"
    )]
    Corrupt { path: PathBuf, message: String },
    #[error(
        "{path}: a PyTorch pickle checkpoint; deem reads safetensors only (pickles can run code). Convert it once \
         with Python: `from safetensors.torch import save_file; import torch; \
         save_file(torch.load('{name}', map_location='cpu', weights_only=True), '{stem}.safetensors')`, or for a \
         transformers/diffusers model directory `Model.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)`"
    )]
    Pickle {
        path: PathBuf,
        name: String,
        stem: String,
    },
    #[error("{path}: the index names {file} for {tensor}, but that file is missing")]
    MissingShard {
        path: PathBuf,
        file: String,
        tensor: String,
    },
    #[error("{path}: tensor {name} has dtype {dtype:?}; expected F32, F16 or BF16 (or an integer type for integer inputs)")]
    Dtype {
        path: PathBuf,
        name: String,
        dtype: Dtype,
    },
    #[error("{0}")]
    Mismatch(MismatchReport),
    /// A path whose role (LLM, image tower, UNet, VAE, resampler, deem model) cannot be recognised.
    #[error("{path}: {detail}")]
    Unrecognised { path: PathBuf, detail: String },
}

/// Every key problem of one load, listed together.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MismatchReport {
    pub source: String,
    pub component: String,
    /// Keys the module needs that the checkpoint lacks (after the prefix map).
    pub missing: Vec<String>,
    /// Checkpoint keys in the component's namespace that no module parameter takes.
    pub unexpected: Vec<String>,
    /// `(key, expected shape, shape in the file)`.
    pub wrong_shape: Vec<(String, Vec<i64>, Vec<i64>)>,
}

impl MismatchReport {
    pub fn is_empty(&self) -> bool {
        self.missing.is_empty() && self.unexpected.is_empty() && self.wrong_shape.is_empty()
    }
}

impl fmt::Display for MismatchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: the checkpoint does not fit the {} module:",
            self.source, self.component
        )?;
        if !self.missing.is_empty() {
            write!(
                f,
                "\n  missing keys ({}): {}",
                self.missing.len(),
                self.missing.join(", ")
            )?;
        }
        if !self.unexpected.is_empty() {
            write!(
                f,
                "\n  unexpected keys ({}): {}",
                self.unexpected.len(),
                self.unexpected.join(", ")
            )?;
        }
        for (k, want, got) in &self.wrong_shape {
            write!(
                f,
                "\n  wrong shape: {k} is {got:?} in the file, the module expects {want:?}"
            )?;
        }
        Ok(())
    }
}

pub type Result<T> = std::result::Result<T, CheckpointError>;

struct File {
    path: PathBuf,
    mmap: Mmap,
}

/// An opened checkpoint: tensor names and the (memory-mapped) file holding each.
pub struct Checkpoint {
    /// How the checkpoint is named in messages (its file or directory).
    pub source: String,
    files: Vec<Arc<File>>,
    index: BTreeMap<String, usize>,
}

const PICKLE_EXTENSIONS: [&str; 5] = ["bin", "pt", "pth", "ckpt", "pkl"];

fn io_err(path: &Path, e: impl fmt::Display) -> CheckpointError {
    CheckpointError::Io {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

fn pickle_err(path: &Path) -> CheckpointError {
    let name = path
        .file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
    let stem = path
        .file_stem()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
    CheckpointError::Pickle {
        path: path.to_path_buf(),
        name,
        stem,
    }
}

fn looks_like_pickle(path: &Path, head: &[u8]) -> bool {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    // torch.save writes a zip archive ("PK") or, in the legacy format, a pickle stream (0x80 protocol).
    PICKLE_EXTENSIONS.contains(&ext)
        || head.starts_with(b"PK\x03\x04")
        || head.first() == Some(&0x80)
}

fn open_file(path: &Path) -> Result<Arc<File>> {
    let f = std::fs::File::open(path).map_err(|e| io_err(path, e))?;
    // SAFETY: the map is read-only; deem never writes checkpoint files it has open.
    let mmap = unsafe { Mmap::map(&f) }.map_err(|e| io_err(path, e))?;
    // A valid safetensors file first: its header length can begin with the byte a pickle stream does
    // (0x80), so the pickle signs only explain a file that does not parse.
    if let Err(e) = SafeTensors::deserialize(&mmap) {
        if looks_like_pickle(path, &mmap[..mmap.len().min(4)]) {
            return Err(pickle_err(path));
        }
        return Err(CheckpointError::Corrupt {
            path: path.to_path_buf(),
            message: e.to_string(),
        });
    }
    Ok(Arc::new(File {
        path: path.to_path_buf(),
        mmap,
    }))
}

impl Checkpoint {
    /// Opens a safetensors file, a `*.safetensors.index.json`, or a directory holding either (as
    /// `save_pretrained` and open_clip write them).
    pub fn open(path: &Path) -> Result<Self> {
        let source = path.display().to_string();
        if path.is_dir() {
            let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
                .map_err(|e| io_err(path, e))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .collect();
            entries.sort();
            let name = |p: &PathBuf| {
                p.file_name()
                    .map_or_else(String::new, |n| n.to_string_lossy().into_owned())
            };
            if let Some(index) = entries
                .iter()
                .find(|p| name(p).ends_with(".safetensors.index.json"))
            {
                return Self::open_index(index, source);
            }
            let files: Vec<&PathBuf> = entries
                .iter()
                .filter(|p| name(p).ends_with(".safetensors"))
                .collect();
            if files.is_empty() {
                if let Some(p) = entries.iter().find(|p| {
                    p.extension()
                        .and_then(|e| e.to_str())
                        .is_some_and(|e| PICKLE_EXTENSIONS.contains(&e))
                }) {
                    return Err(pickle_err(p));
                }
                return Err(io_err(
                    path,
                    "no *.safetensors file or *.safetensors.index.json in this directory",
                ));
            }
            let files = files
                .into_iter()
                .map(|p| open_file(p))
                .collect::<Result<Vec<_>>>()?;
            return Ok(Self::from_files(source, files));
        }
        if path.to_string_lossy().ends_with(".index.json") {
            return Self::open_index(path, source);
        }
        Ok(Self::from_files(source, vec![open_file(path)?]))
    }

    fn open_index(index: &Path, source: String) -> Result<Self> {
        let text = std::fs::read_to_string(index).map_err(|e| io_err(index, e))?;
        #[derive(serde::Deserialize)]
        struct Index {
            weight_map: BTreeMap<String, String>,
        }
        let parsed: Index = serde_json::from_str(&text).map_err(|e| {
            io_err(
                index,
                format!("expected {{\"weight_map\": {{tensor: file}}}}: {e}"),
            )
        })?;
        let dir = index.parent().unwrap_or(Path::new("."));
        let mut by_name: HashMap<String, usize> = HashMap::new();
        let mut files = Vec::new();
        let mut map = BTreeMap::new();
        for (tensor, file) in parsed.weight_map {
            let i = match by_name.get(&file) {
                Some(&i) => i,
                None => {
                    let p = dir.join(&file);
                    if !p.exists() {
                        return Err(CheckpointError::MissingShard {
                            path: index.to_path_buf(),
                            file,
                            tensor,
                        });
                    }
                    files.push(open_file(&p)?);
                    by_name.insert(file.clone(), files.len() - 1);
                    files.len() - 1
                }
            };
            map.insert(tensor, i);
        }
        // The index may omit tensors that its files hold; it is authoritative only for those it names.
        let mut ck = Self::from_files(source, files);
        for (k, v) in map {
            ck.index.insert(k, v);
        }
        Ok(ck)
    }

    fn from_files(source: String, files: Vec<Arc<File>>) -> Self {
        let mut index = BTreeMap::new();
        for (i, f) in files.iter().enumerate() {
            // Validated in open_file.
            if let Ok(st) = SafeTensors::deserialize(&f.mmap) {
                for name in st.names() {
                    index.entry(name.to_string()).or_insert(i);
                }
            }
        }
        Checkpoint {
            source,
            files,
            index,
        }
    }

    /// Every tensor name in the checkpoint, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(String::as_str)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// Shape of a tensor without reading its data.
    pub fn shape(&self, name: &str) -> Option<Vec<i64>> {
        let f = &self.files[*self.index.get(name)?];
        let st = SafeTensors::deserialize(&f.mmap).ok()?;
        let view = st.tensor(name).ok()?;
        Some(view.shape().iter().map(|&d| d as i64).collect())
    }

    /// Reads one tensor in its on-disk dtype (CPU).
    pub fn tensor(&self, name: &str) -> Result<Option<Tensor>> {
        let Some(&i) = self.index.get(name) else {
            return Ok(None);
        };
        let f = &self.files[i];
        let st = SafeTensors::deserialize(&f.mmap).map_err(|e| CheckpointError::Corrupt {
            path: f.path.clone(),
            message: e.to_string(),
        })?;
        let view = st.tensor(name).map_err(|e| CheckpointError::Corrupt {
            path: f.path.clone(),
            message: e.to_string(),
        })?;
        let kind = match view.dtype() {
            Dtype::F32 => Kind::Float,
            Dtype::F16 => Kind::Half,
            Dtype::BF16 => Kind::BFloat16,
            Dtype::F64 => Kind::Double,
            Dtype::I64 => Kind::Int64,
            Dtype::I32 => Kind::Int,
            Dtype::U8 => Kind::Uint8,
            Dtype::BOOL => Kind::Bool,
            dtype => {
                return Err(CheckpointError::Dtype {
                    path: f.path.clone(),
                    name: name.to_string(),
                    dtype,
                })
            }
        };
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        Ok(Some(
            Tensor::f_from_data_size(view.data(), &shape, kind).map_err(|e| io_err(&f.path, e))?,
        ))
    }
}

/// Which checkpoint keys belong to a module (its variables' own names), which it may ignore, and which
/// of its variables may be absent. Other checkpoints' names are mapped onto the module's by
/// [`crate::models::pretrained`].
#[derive(Debug, Clone, Default)]
pub struct LoadSpec {
    /// Names the component in messages (`llm shard [0, 16)`).
    pub component: String,
    /// Checkpoint key prefixes that belong to this component: keys under them that no variable takes are
    /// "unexpected". Keys elsewhere belong to other components and are skipped.
    pub namespace: Vec<String>,
    /// Checkpoint key prefixes inside the namespace that are fine to skip (another shard's layers,
    /// buffers such as `rotary_emb.inv_freq`).
    pub ignore: Vec<String>,
    /// Module variables that may be absent from the checkpoint and keep their initial values (DEEM's
    /// additions when loading a plain reference checkpoint).
    pub optional: Vec<String>,
}

impl LoadSpec {
    fn starts_with_any(list: &[String], key: &str) -> bool {
        list.iter().any(|p| key.starts_with(p.as_str()))
    }
}

impl Checkpoint {
    /// Copies the checkpoint's values into `vs`'s variables (converted to each variable's dtype and
    /// device), or returns every key problem at once without changing any variable.
    pub fn load_into(&self, vs: &tch::nn::VarStore, spec: &LoadSpec) -> Result<()> {
        let vars = vs.variables();
        let mut report = MismatchReport {
            source: self.source.clone(),
            component: spec.component.clone(),
            ..Default::default()
        };
        let mut plan: Vec<(String, String)> = Vec::new();
        let mut taken: std::collections::HashSet<String> = std::collections::HashSet::new();
        let mut names: Vec<&String> = vars.keys().collect();
        names.sort();
        for var in names {
            let want = vars[var].size();
            if self.contains(var) {
                let got = self.shape(var).unwrap_or_default();
                if got != want {
                    report.wrong_shape.push((var.clone(), want, got));
                } else {
                    plan.push((var.clone(), var.clone()));
                }
                taken.insert(var.clone());
            } else if !LoadSpec::starts_with_any(&spec.optional, var) {
                report.missing.push(var.clone());
            }
        }
        report.unexpected = self
            .names()
            .filter(|k| {
                LoadSpec::starts_with_any(&spec.namespace, k)
                    && !LoadSpec::starts_with_any(&spec.ignore, k)
                    && !taken.contains(*k)
            })
            .map(str::to_string)
            .collect();
        if !report.is_empty() {
            return Err(CheckpointError::Mismatch(report));
        }
        tch::no_grad(|| -> Result<()> {
            for (var, key) in plan {
                let mut dst = vars[&var].shallow_clone();
                if let Some(src) = self.tensor(&key)? {
                    dst.copy_(&src.to_kind(dst.kind()).to_device(dst.device()));
                }
            }
            Ok(())
        })
    }
}

/// Writes named tensors as a safetensors file, atomically (temp file + rename).
pub fn save(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    let tmp = path.with_extension("safetensors.tmp");
    // safetensors stores dense row-major data: views (transposes, slices) are written as copies.
    let dense: Vec<Tensor> = tensors.iter().map(|(_, t)| t.contiguous()).collect();
    let named: Vec<(&str, &Tensor)> = tensors
        .iter()
        .zip(&dense)
        .map(|((n, _), t)| (n.as_str(), t))
        .collect();
    Tensor::write_safetensors(&named, &tmp).map_err(|e| io_err(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| io_err(path, e))
}
