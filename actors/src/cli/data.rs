//! `deem data synth | check | pope`.

use std::path::Path;

use anyhow::bail;
use deem::data::readers::{self, BadRecord, ReadReport};
use deem::data::synth::{self, SynthOptions};
use deem::eval::{self, PopeSampling};

use crate::cli::DataCommand;
use crate::runtime::metrics::{FormatLabels, Metrics};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Pairs,
    PairsTar,
    Mmc4,
    Llava,
    Regions,
}

impl Format {
    fn name(self) -> &'static str {
        match self {
            Format::Pairs => "pairs",
            Format::PairsTar => "pairs-tar",
            Format::Mmc4 => "mmc4",
            Format::Llava => "llava",
            Format::Regions => "regions",
        }
    }
}

/// Logs every bad record, counts both kinds in the metrics, and returns (kept, bad).
pub fn account<T>(r: &ReadReport<T>, format: Format, metrics: &Metrics) -> (usize, usize) {
    let labels = FormatLabels {
        format: format.name().into(),
    };
    for BadRecord { at, reason } in &r.bad {
        tracing::warn!(%at, %reason, "skipped a bad {} record", format.name());
    }
    metrics
        .data_records
        .get_or_create(&labels)
        .inc_by(r.records.len() as u64);
    metrics
        .data_bad_records
        .get_or_create(&labels)
        .inc_by(r.bad.len() as u64);
    (r.records.len(), r.bad.len())
}

/// Reads `file` with `read` (image paths relative to `images`, default the file's folder), logs and
/// counts its bad records as `format`, and fails when more than `max` of them are bad. Returns the good records and the bad count.
pub fn read_checked<T>(
    file: &Path,
    images: Option<&Path>,
    format: Format,
    max: f64,
    metrics: &Metrics,
    read: impl Fn(&Path, Option<&Path>) -> Result<ReadReport<T>, deem::data::DataError>,
) -> anyhow::Result<(Vec<T>, usize)> {
    let (records, bad, _) = read_filtered(file, images, format, max, metrics, read)?;
    Ok((records, bad))
}

/// The records kept, the count of bad ones, and what the format's rules dropped (by rule).
pub type Filtered<T> = (Vec<T>, usize, Vec<(&'static str, usize)>);

/// [`read_checked`], with what the format's rules dropped (by rule), which is logged.
pub fn read_filtered<T>(
    file: &Path,
    images: Option<&Path>,
    format: Format,
    max: f64,
    metrics: &Metrics,
    read: impl Fn(&Path, Option<&Path>) -> Result<ReadReport<T>, deem::data::DataError>,
) -> anyhow::Result<Filtered<T>> {
    let r = read(file, images).map_err(anyhow::Error::msg)?;
    check_report(file, format, max, metrics, r)
}

/// Logs and counts a reader's report on `file` as `format` (its bad records, what its rules dropped),
/// and fails when more than `max` of its records are bad.
pub fn check_report<T>(
    file: &Path,
    format: Format,
    max: f64,
    metrics: &Metrics,
    r: ReadReport<T>,
) -> anyhow::Result<Filtered<T>> {
    let (_, bad) = account(&r, format, metrics);
    r.check(file, max).map_err(anyhow::Error::msg)?;
    for (rule, n) in &r.filtered {
        tracing::info!(file = %file.display(), dropped = n, "{rule}");
    }
    let filtered = r.filtered.into_iter().collect();
    Ok((r.records, bad, filtered))
}

fn check(
    format: Format,
    (file, images): (&Path, Option<&Path>),
    max: f64,
    c: &deem::config::DeemConfig,
    metrics: &Metrics,
) -> anyhow::Result<String> {
    if !(0.0..=1.0).contains(&max) {
        bail!("--max-bad-ratio: expected a share in [0, 1], found {max}");
    }
    if let Some(dir) = images.filter(|d| !d.is_dir()) {
        bail!("--images {}: not a folder", dir.display());
    }
    fn count<T>(r: (Vec<T>, usize)) -> (usize, usize) {
        (r.0.len(), r.1)
    }
    let mut dropped = Vec::new();
    let (kept, bad) = match format {
        Format::Pairs => count(read_checked(
            file,
            images,
            format,
            max,
            metrics,
            readers::read_pairs_jsonl,
        )?),
        Format::PairsTar => count(read_checked(
            file,
            images,
            format,
            max,
            metrics,
            readers::read_pairs_tar,
        )?),
        Format::Mmc4 => {
            let (docs, bad, filtered) =
                read_filtered(file, images, format, max, metrics, |p, i| {
                    readers::read_mmc4(p, i, &c.data.mmc4, c.train.seed)
                })?;
            dropped = filtered;
            (docs.len(), bad)
        }
        Format::Llava => count(read_checked(
            file,
            images,
            format,
            max,
            metrics,
            readers::read_llava,
        )?),
        Format::Regions => count(read_checked(
            file,
            images,
            format,
            max,
            metrics,
            readers::read_regions,
        )?),
    };
    let rules: Vec<String> = dropped
        .iter()
        .map(|(rule, n)| format!("{n} {rule}"))
        .collect();
    let rules = if rules.is_empty() {
        String::new()
    } else {
        format!("; dropped by the rules: {}", rules.join(", "))
    };
    Ok(format!(
        "{}: {kept} {} records, {bad} bad{rules}\n",
        file.display(),
        format.name()
    ))
}

pub fn render(cmd: DataCommand, metrics: &Metrics) -> anyhow::Result<String> {
    match cmd {
        DataCommand::Synth {
            out,
            seed,
            size,
            pairs,
            documents,
            instructions,
            max_turns,
            regions,
            text_scenes,
            colour_questions,
            label_questions,
            shape_twins,
            eval_per_split,
        } => {
            if !(16..=1024).contains(&size) {
                bail!("--size: expected 16..=1024 pixels, found {size}");
            }
            let o = SynthOptions {
                seed,
                size,
                pairs,
                documents,
                instructions,
                max_turns,
                regions,
                text_scenes,
                colour_questions,
                label_questions,
                shape_twins,
                eval_per_split,
            };
            std::fs::create_dir_all(&out)?;
            let s = synth::synthesize(&out, &o).map_err(anyhow::Error::msg)?;
            let mut text = format!(
                "wrote the synthetic world (seed {seed}, {size} px) to {}:\n",
                out.display()
            );
            for (f, n) in s.files {
                text.push_str(&format!("  {f}: {n}\n"));
            }
            Ok(text)
        }
        DataCommand::Check {
            format,
            file,
            images,
            max_bad_ratio,
            config,
        } => check(
            format,
            (&file, images.as_deref()),
            max_bad_ratio,
            &config.load()?.config,
            metrics,
        ),
        DataCommand::Robustvqa {
            data,
            only_misclassified,
            checkpoint,
            out,
            config,
        } => {
            let out = out.unwrap_or_else(|| data.join("robustvqa.json"));
            let model = match &checkpoint {
                Some(ck) => {
                    let cfg = config.load()?.config;
                    let tok = deem::text::tokenizer::load_tokenizer(None, Some(&data), &cfg)?;
                    Some(crate::cli::report::ModelClassifier::new(
                        &cfg,
                        ck,
                        tok.into(),
                    )?)
                }
                None => None,
            };
            let miner = match &model {
                Some(m) => crate::cli::report::Miner::Model(m),
                None => crate::cli::report::Miner::Prototype(
                    crate::cli::report::PrototypeClassifier::new(
                        serde_json::from_str::<serde_json::Value>(
                            &std::fs::read_to_string(data.join("SYNTH.json")).unwrap_or_default(),
                        )
                        .ok()
                        .and_then(|v| v["size"].as_u64())
                        .unwrap_or(64) as u32,
                    ),
                ),
            };
            let counts = crate::cli::report::build_robustvqa(
                &data,
                &deem::data::world::Split::ALL,
                only_misclassified,
                miner,
                &out,
            )?;
            let mut text = format!("wrote {}:\n", out.display());
            for (k, n) in counts {
                text.push_str(&format!("  {k}: {n} images\n"));
            }
            Ok(text)
        }
        DataCommand::Pope {
            instances,
            out,
            k,
            seed,
        } => {
            let mut inst = eval::read_instances(&instances).map_err(anyhow::Error::msg)?;
            std::fs::create_dir_all(&out)?;
            // Image paths stay relative when the questions sit beside the annotations, else absolute.
            let src = instances
                .parent()
                .map_or_else(|| Path::new(".").to_path_buf(), Path::to_path_buf)
                .canonicalize()?;
            if src != out.canonicalize()? {
                for (f, _) in &mut inst.images {
                    *f = src.join(&*f).to_string_lossy().into_owned();
                }
            }
            let mut text = String::new();
            for s in PopeSampling::ALL {
                let qs = eval::build_pope(&inst, s, k, seed);
                let lines: Vec<String> = qs
                    .iter()
                    .map(|q| serde_json::to_string(q).expect("questions serialise"))
                    .collect();
                let p = out.join(format!("pope_{}.jsonl", s.name()));
                std::fs::write(&p, lines.join("\n") + "\n")?;
                text.push_str(&format!("{}: {} questions\n", p.display(), qs.len()));
            }
            Ok(text)
        }
    }
}

/// `deem data …`.
pub fn run(cmd: DataCommand) -> anyhow::Result<()> {
    let metrics = Metrics::new();
    print!("{}", render(cmd, &metrics)?);
    Ok(())
}
