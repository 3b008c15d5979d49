//! Helpers the data tests share: a small synthetic world and a folder's files.
#![allow(dead_code)]

use std::path::Path;

use deem::data::synth::SynthOptions;

pub fn small(seed: u64) -> SynthOptions {
    SynthOptions {
        seed,
        size: 32,
        pairs: 6,
        documents: 3,
        instructions: 8,
        max_turns: 4,
        regions: 4,
        text_scenes: 12,
        colour_questions: 7,
        label_questions: 9,
        shape_twins: 3,
        eval_per_split: 5,
    }
}
pub fn files_under(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let rel = p.strip_prefix(dir).unwrap().to_string_lossy().into_owned();
                out.push((rel, std::fs::read(&p).unwrap()));
            }
        }
    }
    out.sort();
    out
}
