//! Where `deem train` reads its batches, after the paper's per-stage data mixtures: the built-in
//! synthetic batches, or the datasets of a folder (`train.sources`, or the stage's own mixture), with bad
//! records logged and counted. Batch `i` is a function of the seed and `i` alone, so every process of a
//! world reads the same global batch and takes its own share.

use std::sync::Arc;

use anyhow::bail;
use deem::config::{DataFormat, DataSource};
use deem::data::batches::SyntheticBatches;
use deem::data::stream::{self, DataStats, RecordSource};
use deem::models::deem::Batch;

use crate::runtime::metrics::Metrics;

/// Largest share of bad records a training dataset may have.
pub const MAX_BAD_RATIO: f64 = 0.05;

/// Where training batches come from: batch `i` is a function of the seed and `i` alone.
pub trait Batches: Send + Sync {
    fn batch(&self, index: u64) -> anyhow::Result<Batch>;
    /// Batch `i` of which the caller uses rows `rows` (its data-parallel share): sources that decode
    /// images lazily decode only those rows' images.
    fn batch_rows(&self, index: u64, rows: std::ops::Range<usize>) -> anyhow::Result<Batch> {
        let _ = rows;
        self.batch(index)
    }
    /// What the source read and decoded, when it streams from disk.
    fn stats(&self) -> Option<Arc<DataStats>> {
        None
    }
}

impl Batches for SyntheticBatches {
    fn batch(&self, index: u64) -> anyhow::Result<Batch> {
        Ok(SyntheticBatches::batch(self, index))
    }
}

impl Batches for deem::data::mixer::Mixer {
    fn batch(&self, index: u64) -> anyhow::Result<Batch> {
        deem::data::mixer::Mixer::batch(self, index).map_err(anyhow::Error::msg)
    }

    fn batch_rows(&self, index: u64, rows: std::ops::Range<usize>) -> anyhow::Result<Batch> {
        deem::data::mixer::Mixer::batch_rows(self, index, rows)
            .map(|(b, _)| b)
            .map_err(anyhow::Error::msg)
    }

    fn stats(&self) -> Option<Arc<DataStats>> {
        Some(self.stats.clone())
    }
}

/// The stage's own mixture when the config names no `train.sources`: stage I `mmc4.jsonl` :
/// `pairs.jsonl` = 2 : 1; stage II `llava.json` : `pairs.jsonl` = 2 : 1 (captions keep grounding the
/// words for what the images show, as the paper's stage II mixes COCO captions into its instruction
/// data), the pairs only when the folder has them; stage III `regions.json` : `llava.json` = 1 : 1 (the
/// paper's stage III is region data; the image-level conversations keep their answers from being
/// forgotten: at 2 : 1 the tiny model forgot them), the conversations only when the folder has them.
fn stage_sources(c: &deem::config::DeemConfig, dir: &std::path::Path) -> Vec<DataSource> {
    let source = |file: &str, format, weight| DataSource {
        file: file.into(),
        format,
        weight,
        images: None,
    };
    match c.train.stage {
        deem::config::Stage::I => vec![
            source("mmc4.jsonl", DataFormat::Mmc4, 2.0),
            source("pairs.jsonl", DataFormat::Pairs, 1.0),
        ],
        deem::config::Stage::II => {
            let mut v = vec![source("llava.json", DataFormat::Llava, 2.0)];
            if dir.join("pairs.jsonl").exists() {
                v.push(source("pairs.jsonl", DataFormat::Pairs, 1.0));
            }
            v
        }
        deem::config::Stage::III => {
            let mut v = vec![source("regions.json", DataFormat::Regions, 1.0)];
            if dir.join("llava.json").exists() {
                v.push(source("llava.json", DataFormat::Llava, 1.0));
            }
            v
        }
    }
}

/// The training data of `dir`: `train.sources`, or the stage's own mixture; bad records logged and
/// counted. MMC4 shards, pairs (JSONL and tar shards) and LLaVA conversations stream: their records are
/// indexed and checked now, read and their images decoded when a batch draws them; region data is read
/// whole (its masks are decoded here).
pub fn dataset_batches(
    c: &deem::config::DeemConfig,
    dir: &std::path::Path,
    metrics: &Metrics,
) -> anyhow::Result<deem::data::mixer::Mixer> {
    use crate::cli::data::{check_report, read_checked, Format};
    use deem::data::readers;
    let tok = Arc::new(deem::text::tokenizer::load_tokenizer(None, Some(dir), c)?);
    let mut m = deem::data::mixer::Mixer::new(c, c.train.seed);
    let sources = if c.train.sources.is_empty() {
        stage_sources(c, dir)
    } else {
        c.train.sources.clone()
    };
    for (i, src) in sources.iter().enumerate() {
        let p = dir.join(&src.file);
        if !p.exists() {
            let from = if c.train.sources.is_empty() {
                String::new()
            } else {
                format!(" (train.sources[{i}].file)")
            };
            bail!("{}{from}: missing; --data needs the folder `deem data synth` writes (or files in its formats)", p.display());
        }
        // Each file is its own source, named by its file name.
        let name = src.file.as_str();
        let images = src.images.as_ref().map(|d| dir.join(d));
        // A folder, or for the streamed formats a tar shard holding the images under those paths.
        let tar_ok = src.format != DataFormat::Regions;
        if let Some(d) = images
            .as_ref()
            .filter(|d| !(d.is_dir() || tar_ok && d.is_file()))
        {
            bail!(
                "{} (train.sources[{i}].images): not a folder{}; expected where {}'s image paths point",
                d.display(),
                if tar_ok { " or a tar shard" } else { "" },
                src.file
            );
        }
        let images = images.as_deref();
        let err = anyhow::Error::msg;
        let streamed: Option<Arc<dyn RecordSource>> = match src.format {
            DataFormat::Mmc4 => {
                let (docs, r) =
                    stream::open_mmc4(&p, images, &c.data.mmc4, c.train.seed).map_err(err)?;
                check_report(&p, Format::Mmc4, MAX_BAD_RATIO, metrics, r)?;
                Some(Arc::new(docs))
            }
            DataFormat::Pairs => {
                let (pairs, r) = stream::open_pairs_jsonl(&p, images).map_err(err)?;
                check_report(&p, Format::Pairs, MAX_BAD_RATIO, metrics, r)?;
                Some(Arc::new(pairs))
            }
            DataFormat::PairsTar => {
                let (pairs, r) = stream::open_pairs_tar(&p).map_err(err)?;
                check_report(&p, Format::PairsTar, MAX_BAD_RATIO, metrics, r)?;
                Some(Arc::new(pairs))
            }
            DataFormat::Llava => {
                let (convs, r) = stream::open_llava(&p, images).map_err(err)?;
                check_report(&p, Format::Llava, MAX_BAD_RATIO, metrics, r)?;
                Some(Arc::new(convs))
            }
            DataFormat::Regions => None,
        };
        match streamed {
            Some(records) => m.add_stream(
                name,
                src.weight,
                records,
                tok.clone(),
                &c.serve.system_prompt,
            ),
            None => {
                let (regions, _) = read_checked(
                    &p,
                    images,
                    Format::Regions,
                    MAX_BAD_RATIO,
                    metrics,
                    readers::read_regions,
                )?;
                m.add_regions(name, src.weight, &regions, &c.serve.system_prompt, &tok)
                    .map_err(err)?;
            }
        }
    }
    if sources.iter().any(|s| s.format == DataFormat::Regions) && !c.vision.mask_aware {
        tracing::warn!(
            "region data: every image of this run goes through the mask-aware extractor, but \
             vision.mask_aware is off, so evaluation and serving will read whole images without it; \
             set vision.mask_aware = true (as configs/tiny-stage3.toml does)"
        );
    }
    if m.too_long > 0 {
        tracing::warn!(
            dropped = m.too_long,
            "samples longer than train.context_length were dropped"
        );
    }
    for s in &m.sources {
        tracing::info!(source = %s.name, samples = s.len(), weight = s.weight, "training data");
    }
    Ok(m)
}
