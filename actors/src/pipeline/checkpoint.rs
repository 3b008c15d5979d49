//! Training checkpoints: `RUN/checkpoints/step-N/` holds one safetensors file per actor (its parameters
//! and AdamW moments under global names, so any topology can resume from it) and `manifest.json` (step,
//! data cursor, seed, config hash, topology). A checkpoint is written into `step-N.tmp/` and renamed when
//! complete, then `RUN/checkpoints/latest` is replaced atomically: a crash while writing leaves the
//! previous checkpoint the latest.

use std::path::{Path, PathBuf};

use deem::rng::{fnv1a_update, FNV1A_START};

use super::error::PipelineError;

type Result<T, E = PipelineError> = std::result::Result<T, E>;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    /// Optimizer steps completed (the next step's index).
    pub step: u64,
    /// Index of the next batch of the data stream.
    pub data_cursor: u64,
    pub seed: u64,
    /// FNV-1a of the resolved configuration's TOML.
    pub config_hash: String,
    pub topology: String,
    pub stages: Vec<String>,
    /// f16 training: the loss scaler's state (its skipped steps did not step the optimizer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scaler: Option<deem::train::LossScaler>,
}

impl Manifest {
    /// The manifest of a checkpoint of `cfg` after `step` optimizer steps, written by `stages`.
    pub fn new(
        cfg: &deem::config::DeemConfig,
        step: u64,
        topology: &str,
        stages: Vec<String>,
    ) -> Self {
        Manifest {
            format: 1,
            step,
            data_cursor: step,
            seed: cfg.train.seed,
            config_hash: config_hash(cfg),
            topology: topology.to_string(),
            stages,
            scaler: None,
        }
    }

    /// The manifest with the loss scaler's state (kept only when it scales, i.e. in f16).
    pub fn with_scaler(mut self, scaler: &deem::train::LossScaler) -> Self {
        self.scaler = (scaler.scale != 1.0 || scaler.skipped > 0).then(|| scaler.clone());
        self
    }

    /// The optimizer steps taken by the checkpointed run (training steps less the skipped ones).
    pub fn optimizer_steps(&self) -> u64 {
        self.scaler
            .as_ref()
            .map_or(self.step, |s| s.optimizer_steps(self.step))
    }
}

fn config_hash(cfg: &deem::config::DeemConfig) -> String {
    fnv1a(&crate::settings::to_toml(cfg))
}

/// FNV-1a 64 of a string (stable across builds, unlike `DefaultHasher`).
pub fn fnv1a(text: &str) -> String {
    format!("{:016x}", fnv1a_update(FNV1A_START, text.as_bytes()))
}

/// FNV-1a 64 of a file's bytes, read in 1 MiB pieces (a pretrained checkpoint can be larger than
/// memory).
pub fn fnv1a_file(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut h = FNV1A_START;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            return Ok(format!("{h:016x}"));
        }
        h = fnv1a_update(h, &buf[..n]);
    }
}

pub fn checkpoints_dir(run_dir: &Path) -> PathBuf {
    run_dir.join("checkpoints")
}

/// The directory a checkpoint of `step` is written into before it is committed.
pub fn tmp_dir(run_dir: &Path, step: u64) -> PathBuf {
    checkpoints_dir(run_dir).join(format!("step-{step}.tmp"))
}

/// The parameters (no optimizer moments) of the checkpoint in `dir`, under their global names.
pub fn model_of(dir: &Path) -> Result<std::collections::BTreeMap<String, tch::Tensor>> {
    let ck = deem::checkpoint::Checkpoint::open(dir)
        .map_err(|e| PipelineError::checkpoint(dir, e.to_string()))?;
    let mut out = std::collections::BTreeMap::new();
    let names: Vec<String> = ck.names().map(String::from).collect();
    for name in names.into_iter().filter(|n| !n.starts_with("optimizer.")) {
        if let Some(t) = ck
            .tensor(&name)
            .map_err(|e| PipelineError::checkpoint(dir, e.to_string()))?
        {
            out.insert(name, t);
        }
    }
    Ok(out)
}

/// Creates an empty `step-N.tmp` directory to write into.
pub fn begin(run_dir: &Path, step: u64) -> Result<PathBuf> {
    let tmp = tmp_dir(run_dir, step);
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(PipelineError::io(&tmp))?;
    Ok(tmp)
}

/// Writes the manifest into `tmp`, flushes every file of it to the disk, renames it to `step-N` and
/// points `latest` at it (each rename flushed too): after a crash or power loss `latest` names a
/// complete checkpoint, and a full disk shows here as an error (some filesystems report it only when
/// the data is flushed).
pub fn commit(run_dir: &Path, tmp: &Path, manifest: &Manifest) -> Result<PathBuf> {
    let path = tmp.join("manifest.json");
    let text = serde_json::to_string_pretty(manifest)
        .map_err(|e| PipelineError::checkpoint(&path, e.to_string()))?;
    write_synced(&path, text.as_bytes())?;
    for entry in std::fs::read_dir(tmp).map_err(PipelineError::io(tmp))? {
        let file = entry.map_err(PipelineError::io(tmp))?.path();
        sync(&file)?;
    }
    sync(tmp)?;
    let dir = checkpoints_dir(run_dir);
    let done = dir.join(format!("step-{}", manifest.step));
    let _ = std::fs::remove_dir_all(&done);
    std::fs::rename(tmp, &done).map_err(PipelineError::io(tmp))?;
    sync(&dir)?;
    let latest_tmp = dir.join("latest.tmp");
    write_synced(&latest_tmp, format!("step-{}\n", manifest.step).as_bytes())?;
    std::fs::rename(&latest_tmp, dir.join("latest")).map_err(PipelineError::io(&latest_tmp))?;
    sync(&dir)?;
    Ok(done)
}

/// Flushes a file, or a directory's entries, to the disk.
fn sync(path: &Path) -> Result<()> {
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(PipelineError::io(path))
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write as _;
    std::fs::File::create(path)
        .and_then(|mut f| {
            f.write_all(bytes)?;
            f.sync_all()
        })
        .map_err(PipelineError::io(path))
}

/// The error of a checkpoint write that failed with `error`: its partial `step-N.tmp` is removed
/// first, and the error says which checkpoint is still the latest.
pub fn abandon(run_dir: &Path, step: u64, error: impl std::fmt::Display) -> PipelineError {
    let tmp = tmp_dir(run_dir, step);
    if let Err(e) = std::fs::remove_dir_all(&tmp) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(path = %tmp.display(), "cannot remove the partial checkpoint: {e}");
        }
    }
    let dir = checkpoints_dir(run_dir);
    let kept = match std::fs::read_to_string(dir.join("latest")) {
        Ok(name) => format!("the latest checkpoint is still {}", name.trim()),
        Err(_) => "there is no earlier checkpoint".into(),
    };
    PipelineError::CheckpointWrite {
        step,
        dir,
        message: error.to_string(),
        kept,
    }
}

/// The latest complete checkpoint of a run directory and its manifest.
pub fn latest(run_dir: &Path) -> Result<(PathBuf, Manifest)> {
    let dir = checkpoints_dir(run_dir);
    let pointer = dir.join("latest");
    let name = std::fs::read_to_string(&pointer).map_err(|source| PipelineError::NoCheckpoint {
        path: pointer.clone(),
        source,
    })?;
    let ck = dir.join(name.trim());
    let manifest_path = ck.join("manifest.json");
    let text =
        std::fs::read_to_string(&manifest_path).map_err(PipelineError::io(&manifest_path))?;
    let manifest: Manifest = serde_json::from_str(&text).map_err(|e| {
        PipelineError::checkpoint(
            &manifest_path,
            format!("not a deem checkpoint manifest: {e}"),
        )
    })?;
    if manifest.format != 1 {
        return Err(PipelineError::checkpoint(
            &manifest_path,
            format!("format {} is not supported (expected 1)", manifest.format),
        ));
    }
    Ok((ck, manifest))
}

/// [`latest`], refusing a checkpoint trained with another configuration than `cfg`.
pub fn latest_of(run_dir: &Path, cfg: &deem::config::DeemConfig) -> Result<(PathBuf, Manifest)> {
    let (dir, manifest) = latest(run_dir)?;
    let hash = config_hash(cfg);
    if manifest.config_hash != hash {
        return Err(PipelineError::checkpoint(
            &dir,
            format!(
                "the checkpoint was trained with another configuration (hash {}, this one {hash}); resume with the same config (and the same --steps, which sets train.steps)",
                manifest.config_hash
            ),
        ));
    }
    Ok((dir, manifest))
}
