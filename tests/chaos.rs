//! Chaos: `deem train` killed with SIGKILL at random moments — while stepping, while writing a checkpoint
//! (one is written every step) — then resumed with `--resume`: the latest checkpoint always loads, the
//! run ends with the uninterrupted run's weights bit for bit, and `steps.jsonl` holds exactly one row per
//! step. `CHAOS_SEEDS` kills (default 3; `make chaos` runs 10), each at a time drawn from its seed.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Instant;

fn config(dir: &Path) -> PathBuf {
    let p = dir.join("deem.toml");
    let text = std::fs::read_to_string(common::root().join("tests/fixtures/pretrained/deem.toml"))
        .unwrap();
    std::fs::write(
        &p,
        text.replace("checkpoint_every = 50", "checkpoint_every = 1"),
    )
    .unwrap();
    p
}

fn train(config: &Path, run: &Path, resume: bool) -> Child {
    let mut c = Command::new(env!("CARGO_BIN_EXE_deem"));
    c.current_dir(common::root())
        .env("DEEM_LOG", "warn")
        .args([
            "train",
            "--quiet",
            "--single-process",
            "--steps",
            "8",
            "--config",
        ])
        .arg(config)
        .arg("--run-dir")
        .arg(run)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if resume {
        c.arg("--resume");
    }
    c.spawn().unwrap()
}

fn finish(mut child: Child, what: &str) {
    let status = child.wait().unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(status.success(), "{what}: {err}");
}

fn rows(run: &Path) -> Vec<u64> {
    std::fs::read_to_string(run.join("steps.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?["step"].as_u64())
        .collect()
}

#[test]
fn a_run_killed_at_random_moments_resumes_to_the_same_weights_and_one_row_per_step() {
    let dir = common::scratch("chaos-kill");
    let config = config(&dir);
    let straight = dir.join("straight");
    let started = Instant::now();
    finish(train(&config, &straight, false), "the straight run");
    let full = started.elapsed();
    let want = common::read_all(&straight.join("model.safetensors"));
    let seeds: u64 = std::env::var("CHAOS_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    for seed in 0..seeds {
        let run = dir.join(format!("killed-{seed}"));
        // A moment in the run's second half-ish, drawn from the seed (startup comes first).
        let frac = 0.3 + 0.6 * ((seed * 2654435761) % 1000) as f64 / 1000.0;
        let mut child = train(&config, &run, false);
        std::thread::sleep(full.mul_f64(frac));
        let _ = child.kill();
        let _ = child.wait();
        let killed_at = rows(&run).len();
        let resumed = match deem_actors::pipeline::checkpoint::latest(&run) {
            Ok((dir, m)) => {
                assert!(dir.exists());
                Some(m.step)
            }
            // Killed before the first checkpoint committed: nothing to resume, start again.
            Err(_) => None,
        };
        finish(
            train(&config, &run, resumed.is_some()),
            &format!("seed {seed}: resuming"),
        );
        assert_eq!(
            rows(&run),
            rows(&straight),
            "seed {seed}: killed after {killed_at} rows, resumed at {resumed:?}"
        );
        let got = common::read_all(&run.join("model.safetensors"));
        assert_eq!(got.len(), want.len());
        for (k, v) in &want {
            assert!(v.equal(&got[k]), "seed {seed}: {k} differs");
        }
        eprintln!("seed {seed}: killed after {killed_at} rows at {frac:.2} of the run, resumed at {resumed:?}: same weights");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
