//! Helpers the runtime's end-to-end tests share (configs, the `deem` binary, ports, run folders).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use deem_actors::settings::{self, BaseFile, ConfigError, Layers, LoadedConfig};

use crate::common::root;

pub fn tiny_text() -> String {
    std::fs::read_to_string(root().join("configs/tiny.toml")).unwrap()
}

/// Writes tiny.toml with `edit` applied (a plain text replacement) and returns its path.
pub fn tiny_with(dir: &Path, from: &str, to: &str) -> PathBuf {
    let text = tiny_text();
    assert!(text.contains(from), "tiny.toml has no {from:?}");
    let p = dir.join("cfg.toml");
    std::fs::write(&p, text.replacen(from, to, 1)).unwrap();
    p
}

pub fn load(path: &Path, env: &[(&str, &str)], sets: &[&str]) -> Result<LoadedConfig, ConfigError> {
    settings::load(&Layers {
        base: BaseFile::Path(path),
        env: env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        overrides: sets.iter().map(|s| s.to_string()).collect(),
    })
}

pub fn load_err(path: &Path, env: &[(&str, &str)], sets: &[&str]) -> String {
    load(path, env, sets)
        .expect_err("config should be rejected")
        .to_string()
}

pub fn embedded_tiny() -> LoadedConfig {
    settings::load(&Layers {
        base: BaseFile::Embedded {
            name: settings::EMBEDDED_TINY_NAME,
            text: settings::EMBEDDED_TINY,
        },
        env: vec![],
        overrides: vec![],
    })
    .unwrap()
}

pub fn preset(name: &str) -> LoadedConfig {
    load(&root().join("configs").join(name), &[], &[]).unwrap()
}

/// A synthetic world of only `text` text scenes and `colour` colour questions, in `dir/data`.
pub fn question_world(dir: &Path, text: usize, colour: usize) -> PathBuf {
    let data = dir.join("data");
    deem::data::synth::synthesize(
        &data,
        &deem::data::synth::SynthOptions {
            pairs: 0,
            documents: 0,
            instructions: 0,
            regions: 0,
            eval_per_split: 0,
            text_scenes: text,
            colour_questions: colour,
            label_questions: 0,
            ..Default::default()
        },
    )
    .unwrap();
    data
}

pub fn scrape_text(body: &str) -> prometheus_parse::Scrape {
    prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).unwrap()
}

pub fn deem(args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_deem"));
    cmd.args(args).current_dir(root());
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("DEEM_")) {
        cmd.env_remove(k);
    }
    cmd.envs(env.iter().copied());
    let out = cmd.output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The JSON lines of a run's steps.jsonl.
pub fn read_steps(run_dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run_dir.join("steps.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Kills the child when dropped, so a failed assertion leaves nothing running.
pub struct Reaped(pub std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `topologies/cpu.toml` for `c`: every actor on the CPU, the LLM in two shards.
pub fn cpu_topology(c: &deem::config::DeemConfig) -> deem_actors::runtime::topology::Topology {
    deem_actors::runtime::topology::Topology::load(&root().join("topologies/cpu.toml"), c, 0)
        .unwrap()
}

/// `n` more steps of `p` on the synthetic batches (seed 9) from its data cursor.
pub async fn run_steps(
    p: &mut deem_actors::pipeline::PipelineTrainer,
    c: &deem::config::DeemConfig,
    n: u64,
) {
    let data = deem::data::batches::SyntheticBatches::new(c, 9);
    for _ in 0..n {
        let b = data.batch(p.steps_done());
        p.step(&b).await.unwrap();
    }
}
