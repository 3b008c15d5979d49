//! `deem experiment csr`: the paper's central claim (Table 6) in miniature. For each seed, stages I and
//! II are trained twice on the same synthetic data — with λ_CSR = 5 and with λ_CSR = 0, everything else
//! equal — and both models answer Synthetic-RobustVQA (in distribution, R, A, V), Synthetic-POPE
//! (random, popular, adversarial) and, where the data folder has them, the held-out colour questions
//! per split. The table gives accuracy mean ± std over the seeds per split.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use deem::config::DeemConfig;

use crate::cli::train::{Mode, TrainJob};
use crate::runtime::metrics::Metrics;
use crate::runtime::topology::Topology;
use crate::serve::engine::Weights;
use crate::settings::LoadedConfig;

pub struct Experiment {
    /// Stage I's recipe and steps.
    pub stage1: (LoadedConfig, u64),
    /// Stage II's recipes and steps, trained in order, each from the one before (one recipe, or a
    /// curriculum).
    pub stage2: Vec<(LoadedConfig, u64)>,
    pub topology: Topology,
    pub data: PathBuf,
    pub out: PathBuf,
    pub seeds: u64,
    pub weights: Vec<f64>,
    /// Pretrained components every stage I run starts from (`deem train --pretrained`).
    pub pretrained: Vec<PathBuf>,
}

fn with(cfg: &LoadedConfig, seed: u64, csr: f64) -> LoadedConfig {
    let mut c = cfg.clone();
    c.config.train.seed = seed;
    c.config.train.csr_loss_weight = csr;
    c
}

#[allow(clippy::too_many_arguments)]
fn train(
    cfg: &LoadedConfig,
    topo: &Topology,
    dir: &Path,
    steps: u64,
    data: &Path,
    init: Option<&Path>,
    pretrained: &[PathBuf],
    rt: &tokio::runtime::Runtime,
) -> anyhow::Result<()> {
    // A run an earlier invocation finished is kept; one it left part-way resumes from its latest
    // checkpoint, which must be of this very recipe (seed, λ_CSR and steps included).
    let resume = crate::pipeline::checkpoint::checkpoints_dir(dir)
        .join("latest")
        .exists();
    if resume {
        let mut full = cfg.config.clone();
        full.train.steps = steps;
        let (_, manifest) = crate::pipeline::checkpoint::latest_of(dir, &full)?;
        if manifest.step >= steps && dir.join("model.safetensors").exists() {
            tracing::info!(run_dir = %dir.display(), steps, "kept: finished by an earlier run");
            return Ok(());
        }
        tracing::info!(run_dir = %dir.display(), step = manifest.step, steps, "resuming");
    }
    let job = TrainJob {
        run_dir: dir.to_path_buf(),
        steps: Some(steps),
        mode: Mode::Pipeline(topo.clone()),
        progress: true,
        resume,
        data: Some(data.to_path_buf()),
        init_from: init.map(Path::to_path_buf),
        pretrained: pretrained.to_vec(),
        stop_at: None,
    };
    crate::cli::train::run_job(&job, cfg, &Metrics::new(), rt).map(|_| ())
}

/// What makes two invocations the same experiment, so that the second may keep the runs of the first:
/// every recipe (as resolved, with its steps), the pretrained files (by content), the data folder and the
/// λ_CSR values. The number of seeds is not part of it: `--seeds 3` on a folder of `--seeds 1` keeps seed
/// 0 and adds seeds 1 and 2.
fn identity(e: &Experiment) -> anyhow::Result<serde_json::Value> {
    let recipe = |c: &LoadedConfig, steps: u64| {
        let mut full = c.config.clone();
        full.train.steps = steps;
        serde_json::json!({
            "config_fnv1a": crate::pipeline::checkpoint::fnv1a(&crate::settings::to_toml(&full)),
            "steps": steps,
        })
    };
    let mut pretrained = Vec::new();
    for f in &e.pretrained {
        let hash = crate::pipeline::checkpoint::fnv1a_file(f)
            .with_context(|| format!("--pretrained {}", f.display()))?;
        pretrained.push(serde_json::json!({
            "file": f.display().to_string(),
            "fnv1a": hash,
        }));
    }
    Ok(serde_json::json!({
        "stage1": recipe(&e.stage1.0, e.stage1.1),
        "stage2": e.stage2.iter().map(|(c, n)| recipe(c, *n)).collect::<Vec<_>>(),
        "pretrained": pretrained,
        "data": e.data.display().to_string(),
        "csr_loss_weights": e.weights,
    }))
}

/// Writes `out/experiment.json`, or checks that the one there describes this experiment (the pretrained
/// files are compared by content, not by name).
fn claim_out(e: &Experiment) -> anyhow::Result<()> {
    let path = e.out.join("experiment.json");
    let this = identity(e)?;
    if path.exists() {
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("{}: cannot read", path.display()))?;
        let there: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("{}: not JSON", path.display()))?;
        let strip = |v: &serde_json::Value| {
            let mut v = v.clone();
            if let Some(p) = v.get_mut("pretrained").and_then(|p| p.as_array_mut()) {
                for f in p {
                    if let Some(o) = f.as_object_mut() {
                        o.remove("file");
                    }
                }
            }
            v
        };
        let (a, b) = (strip(&there), strip(&this));
        for key in ["stage1", "stage2", "pretrained", "data", "csr_loss_weights"] {
            if a.get(key) != b.get(key) {
                anyhow::bail!(
                    "{}: the folder holds another experiment ({key} differs: {} there, {} here); choose another --out or remove it",
                    path.display(),
                    there.get(key).unwrap_or(&serde_json::Value::Null),
                    this.get(key).unwrap_or(&serde_json::Value::Null)
                );
            }
        }
    }
    std::fs::write(&path, serde_json::to_string_pretty(&this)?)
        .with_context(|| format!("{}: cannot write", path.display()))?;
    Ok(())
}

/// Runs the experiment; returns the markdown table (also written to `out/csr.md`, with `out/csr.json`).
///
/// Per seed the λ_CSR = 0 baseline trains first; its RobustVQA hard negatives are mined with that
/// baseline ([`crate::cli::report::ModelClassifier`], as the paper mined with CLIP) into
/// `out/robustvqa-seed{seed}.json`, and every model of the seed answers those questions. Without a
/// λ = 0 run, the data folder's `robustvqa.json` is used.
pub fn run_experiment(e: &Experiment, rt: &tokio::runtime::Runtime) -> anyhow::Result<String> {
    let pope_dir = e.data.join("pope");
    let splits_of = |rv: &Path| -> anyhow::Result<Vec<crate::cli::eval::Split>> {
        let mut s = crate::cli::eval::robustvqa_splits(rv)
            .context("run `deem data robustvqa --data DIR` first")?;
        for p in ["random", "popular", "adversarial"] {
            s.push(
                crate::cli::eval::pope_split(&pope_dir.join(format!("pope_{p}.jsonl")))
                    .context("run `deem data pope` into DIR/pope first")?,
            );
        }
        // The held-out colour questions `deem data synth` writes, where the folder has them.
        for split in deem::data::world::Split::ALL {
            let f = e.data.join(format!("eval/colour_{}.jsonl", split.name()));
            if f.exists() {
                s.push(crate::cli::eval::pope_split(&f)?);
            }
        }
        Ok(s)
    };
    if e.seeds == 0 {
        anyhow::bail!("--seeds: expected at least 1, found 0");
    }
    let Some((last, _)) = e.stage2.last() else {
        anyhow::bail!("--stage2-config: expected at least one stage II recipe");
    };
    let tok = Arc::new(deem::text::tokenizer::load_tokenizer(
        None,
        Some(&e.data),
        &last.config,
    )?);
    std::fs::create_dir_all(&e.out)?;
    claim_out(e)?;
    // The baseline first: its model mines the seed's hard negatives.
    let mut weights = e.weights.clone();
    weights.sort_by_key(|w| *w != 0.0);
    // accuracy[λ][split] = per-seed values
    let mut acc: BTreeMap<String, BTreeMap<String, Vec<f64>>> = BTreeMap::new();
    for seed in 0..e.seeds {
        let mut rv = e.data.join("robustvqa.json");
        for &w in &weights {
            let tag = format!("seed{seed}-csr{w}");
            let d1 = e.out.join(format!("{tag}-stage1"));
            tracing::info!(seed, csr_loss_weight = w, "experiment run");
            let (c1, steps1) = &e.stage1;
            train(
                &with(c1, seed, w),
                &e.topology,
                &d1,
                *steps1,
                &e.data,
                None,
                &e.pretrained,
                rt,
            )?;
            let mut prev = d1;
            for (i, (c, steps)) in e.stage2.iter().enumerate() {
                let d = e.out.join(format!("{tag}-stage2-{}", i + 1));
                train(
                    &with(c, seed, w),
                    &e.topology,
                    &d,
                    *steps,
                    &e.data,
                    Some(&prev),
                    &[],
                    rt,
                )?;
                prev = d;
            }
            let d2 = prev;
            let c2: DeemConfig = with(last, seed, w).config;
            if w == 0.0 {
                let mined = e.out.join(format!("robustvqa-seed{seed}.json"));
                let clf = crate::cli::report::ModelClassifier::new(&c2, &d2, tok.clone())?;
                let counts = crate::cli::report::build_robustvqa(
                    &e.data,
                    &deem::data::world::Split::ALL,
                    false,
                    crate::cli::report::Miner::Model(&clf),
                    &mined,
                )?;
                tracing::info!(seed, file = %mined.display(), ?counts, "hard negatives mined by the baseline");
                rv = mined;
            }
            let results = rt.block_on(crate::cli::eval::evaluate(
                &c2,
                &e.topology,
                &Weights::Checkpoint(d2.clone()),
                tok.clone(),
                splits_of(&rv)?,
                &crate::cli::eval::Decoding::default(),
            ))?;
            std::fs::write(
                d2.join("eval.json"),
                serde_json::to_string_pretty(&crate::cli::eval::to_json(&results))?,
            )?;
            for r in results {
                acc.entry(format!("λ_CSR = {w}"))
                    .or_default()
                    .entry(r.name)
                    .or_default()
                    .push(r.scores.accuracy);
            }
        }
    }
    let stats = |v: &[f64]| {
        let n = v.len() as f64;
        let m = v.iter().sum::<f64>() / n;
        let sd = if v.len() > 1 {
            (v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (n - 1.0)).sqrt()
        } else {
            0.0
        };
        (m, sd)
    };
    let cols: Vec<String> = acc
        .values()
        .next()
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default();
    let stage2: Vec<String> = e.stage2.iter().map(|(_, n)| n.to_string()).collect();
    let mut md = format!(
        "Accuracy (mean ± std over {} seeds; {} stage I + {} stage II steps each)\n\n| model | {} |\n|---|{}\n",
        e.seeds,
        e.stage1.1,
        stage2.join(" + "),
        cols.join(" | "),
        "---|".repeat(cols.len())
    );
    let mut json = serde_json::Map::new();
    for (model, per) in acc.iter().rev() {
        let cells: Vec<String> = cols
            .iter()
            .map(|c| {
                let (m, sd) = stats(&per[c]);
                format!("{:.3} ± {:.3}", m, sd)
            })
            .collect();
        md.push_str(&format!("| {model} | {} |\n", cells.join(" | ")));
        json.insert(model.clone(), serde_json::to_value(per)?);
    }
    std::fs::create_dir_all(&e.out)?;
    std::fs::write(e.out.join("csr.md"), &md)?;
    std::fs::write(e.out.join("csr.json"), serde_json::to_string_pretty(&json)?)?;
    Ok(md)
}

/// `deem experiment csr`.
pub fn run(cmd: super::ExperimentCommand) -> anyhow::Result<()> {
    let super::ExperimentCommand::Csr {
        topology,
        data,
        out,
        seeds,
        stage1_config,
        stage2_config,
        stage1_steps,
        stage2_steps,
        pretrained,
    } = cmd;
    let load = |p: PathBuf| {
        super::ConfigArgs {
            config: Some(p),
            overrides: vec![],
        }
        .load()
    };
    if !stage2_steps.is_empty() && stage2_steps.len() != stage2_config.len() {
        anyhow::bail!(
            "--stage2-steps: expected one step count per --stage2-config ({}), found {}",
            stage2_config.len(),
            stage2_steps.len()
        );
    }
    let stage1 = load(stage1_config)?;
    let stage1_steps = stage1_steps.unwrap_or(stage1.config.train.steps);
    let mut stage2 = Vec::new();
    for (i, p) in stage2_config.into_iter().enumerate() {
        let c = load(p)?;
        let steps = stage2_steps.get(i).copied().unwrap_or(c.config.train.steps);
        stage2.push((c, steps));
    }
    let topo = topology.load(&stage1, deem::device::cuda_device_count())?;
    let e = crate::cli::experiment::Experiment {
        stage1: (stage1, stage1_steps),
        stage2,
        topology: topo,
        data,
        out,
        seeds,
        weights: vec![5.0, 0.0],
        pretrained,
    };
    let runtime = super::train::training_runtime()?;
    print!("{}", run_experiment(&e, &runtime)?);
    Ok(())
}
