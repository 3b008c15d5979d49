//! Helpers shared by the test files: fixture paths, reading tensors from safetensors files, comparing.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use deem::checkpoint::Checkpoint;
use tch::Tensor;

/// The repository root (tests are built from the root package and from `actors/`).
pub fn root() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    if here.join("tests/fixtures").exists() {
        here.to_path_buf()
    } else {
        here.parent()
            .expect("actors/ sits in the repository")
            .to_path_buf()
    }
}

pub fn fixture(name: &str) -> PathBuf {
    root().join("tests/fixtures").join(name)
}

/// One tensor of a safetensors file.
pub fn read(path: &Path, name: &str) -> Tensor {
    Checkpoint::open(path)
        .unwrap()
        .tensor(name)
        .unwrap()
        .unwrap_or_else(|| panic!("{name} not in {path:?}"))
}

/// Largest absolute difference of two same-shaped tensors.
pub fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    (a - b).abs().max().double_value(&[])
}

/// A fresh scratch directory unique to one test of this process.
pub fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("deem-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A free TCP port on the loopback (bound, read, released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Every tensor of a safetensors file (or sharded checkpoint), by name.
pub fn read_all(path: &Path) -> std::collections::BTreeMap<String, Tensor> {
    let ck = Checkpoint::open(path).unwrap();
    let names: Vec<String> = ck.names().map(String::from).collect();
    names
        .into_iter()
        .map(|n| {
            let t = ck.tensor(&n).unwrap().unwrap();
            (n, t)
        })
        .collect()
}
