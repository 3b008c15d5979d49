//! Training across processes on Gloo over 127.0.0.1, through the real binary and launchers: two
//! processes (vision + llm0 | llm1 + diffusion) equal one process bit for bit under GPipe and 1F1B;
//! data parallel 2 × pipeline 2 equals one process on the same global batch; torchrun (from the
//! project's .venv) runs the two-process case unchanged; a checkpoint written by four processes resumes
//! in one; a killed rank, and a rank stopped with SIGSTOP (the other times out naming it), are restarted
//! by `deem launch` to the same final weights; a rank that never
//! joins and a wrong WORLD_SIZE fail fast with errors naming them; `--pretrained` library checkpoints
//! load per stage on each rank as in one process, and a file one rank refuses stops every rank.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use tch::Tensor;

fn deem() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_deem"));
    c.current_dir(common::root()).env("DEEM_LOG", "warn");
    c
}

fn ok(out: Output, what: &str) -> Output {
    assert!(
        out.status.success(),
        "{what} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `deem train` with `args` in one process.
fn train_one(run: &Path, args: &[&str]) {
    let out = deem()
        .args(["train", "--quiet", "--run-dir"])
        .arg(run)
        .args(args)
        .output()
        .unwrap();
    ok(out, "one-process training");
}

/// `deem launch --nproc-per-node n -- train …`.
fn launch(n: u32, run: &Path, launcher: &[&str], args: &[&str]) -> Output {
    launch_with(n, run, launcher, args, 60).output().unwrap()
}

/// [`launch`]'s command, each wait on another rank bounded by `peer_timeout` seconds.
fn launch_with(n: u32, run: &Path, launcher: &[&str], args: &[&str], peer_timeout: u32) -> Command {
    let mut c = deem();
    c.args([
        "launch",
        "--nproc-per-node",
        &n.to_string(),
        "--master-port",
    ])
    .arg(common::free_port().to_string())
    .args(launcher)
    .args([
        "--",
        "train",
        "--quiet",
        "--peer-timeout",
        &peer_timeout.to_string(),
        "--run-dir",
    ])
    .arg(run)
    .args(args);
    c
}

fn model(run: &Path) -> BTreeMap<String, Tensor> {
    common::read_all(&run.join("model.safetensors"))
}

/// Per step: (step, total, ntp, nip, csr, grad_norm).
fn steps(run: &Path) -> Vec<[f64; 6]> {
    std::fs::read_to_string(run.join("steps.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v.get("step").is_some())
        .map(|v| {
            ["step", "total", "ntp", "nip", "csr", "grad_norm"].map(|k| v[k].as_f64().unwrap())
        })
        .collect()
}

/// Largest parameter difference, and the names on one side only.
fn model_diff(a: &BTreeMap<String, Tensor>, b: &BTreeMap<String, Tensor>) -> f64 {
    assert_eq!(
        a.keys().collect::<Vec<_>>(),
        b.keys().collect::<Vec<_>>(),
        "the two models have different parameters"
    );
    a.iter()
        .map(|(k, t)| common::max_diff(t, &b[k]))
        .fold(0.0, f64::max)
}

fn scratch(name: &str) -> PathBuf {
    common::scratch(&format!("dist-{name}"))
}

const TWO: &str = "topologies/cpu-2proc.toml";
const FOUR: &str = "topologies/cpu-dp2.toml";

#[test]
fn two_processes_equal_one_process_bit_for_bit_under_gpipe_and_1f1b() {
    for schedule in ["gpipe", "1f1b"] {
        let d = scratch(&format!("two-{schedule}"));
        let set = format!("train.schedule={schedule}");
        let common = [
            "--steps",
            "5",
            "--set",
            &set,
            "--set",
            "train.microbatches=4",
        ];
        train_one(&d.join("one"), &common);
        let mut args = vec!["--topology", TWO];
        args.extend(common);
        ok(
            launch(2, &d.join("two"), &[], &args),
            "two-process training",
        );
        // The single-process pipeline and the two processes compute the same float operations in the
        // same order (the global norm is summed in pipeline order from exact slots): bit-identical.
        assert_eq!(steps(&d.join("one")), steps(&d.join("two")), "{schedule}");
        assert_eq!(
            model_diff(&model(&d.join("one")), &model(&d.join("two"))),
            0.0,
            "{schedule}"
        );
        // And the reference trainer, to the float rounding tests/pipeline.rs states (1e-5).
        train_one(
            &d.join("ref"),
            &[&["--single-process"][..], &common].concat(),
        );
        let diff = model_diff(&model(&d.join("ref")), &model(&d.join("two")));
        assert!(diff < 1e-5, "{schedule}: {diff}");
        for (r, t) in steps(&d.join("ref")).iter().zip(steps(&d.join("two"))) {
            assert!((r[1] - t[1]).abs() < 1e-5 * r[1].abs(), "{r:?} vs {t:?}");
        }
        // Each run writes tens of MB of checkpoints: keep nothing of a passed test.
        let _ = std::fs::remove_dir_all(&d);
    }
}

#[test]
fn two_processes_load_library_checkpoints_per_stage_as_one_process_does() {
    let d = scratch("pretrained");
    let fixtures = common::root().join("tests/fixtures/pretrained");
    let arg = |p: &str| fixtures.join(p).display().to_string();
    let (vicuna, sd, clip) = (arg("vicuna"), arg("sd"), arg("open_clip_model.safetensors"));
    let config = arg("deem.toml");
    let common = [
        "--config",
        &config,
        "--steps",
        "2",
        "--set",
        "train.train_llm_in_stage_one=true",
        "--pretrained",
        &vicuna,
        "--pretrained",
        &sd,
        "--pretrained",
        &clip,
    ];
    train_one(&d.join("one"), &common);
    let two = [&["--topology", TWO][..], &common].concat();
    ok(launch(2, &d.join("two"), &[], &two), "two-process training");
    assert_eq!(steps(&d.join("one")), steps(&d.join("two")));
    assert_eq!(
        model_diff(&model(&d.join("one")), &model(&d.join("two"))),
        0.0
    );
    // A file only rank 1's last shard refuses (the final norm's shape): rank 0 learns it from the
    // world and stops too, before any checkpoint is written.
    let bad = d.join("norm.safetensors");
    let t = Tensor::ones([3], tch::kind::FLOAT_CPU);
    deem::checkpoint::save(&bad, &[("model.norm.weight".into(), t)]).unwrap();
    let bad_arg = bad.display().to_string();
    let args = [
        &["--topology", TWO, "--config", &config][..],
        &["--pretrained", &bad_arg],
    ]
    .concat();
    let out = launch(2, &d.join("bad"), &[], &args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "--pretrained: llm1: {bad_arg}: the checkpoint does not fit the llm shard [2, 4) (HF LLaMA) module:"
        )) && stderr.contains("wrong shape: model.norm.weight is [3] in the file, the module expects [32]"),
        "{stderr}"
    );
    assert!(
        stderr.contains("1 other rank(s) refused the weights"),
        "{stderr}"
    );
    assert!(!d.join("bad/checkpoints/latest").exists());
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn data_parallel_two_by_pipeline_two_equals_one_process_on_the_global_batch() {
    let d = scratch("dp");
    // 8 rows in 4 microbatches: each replica runs 2 of them on its half of every global batch.
    let common = [
        "--steps",
        "5",
        "--set",
        "train.batch_size=8",
        "--set",
        "train.microbatches=4",
    ];
    train_one(&d.join("one"), &common);
    let mut args = vec!["--topology", FOUR];
    args.extend(common);
    ok(
        launch(4, &d.join("four"), &[], &args),
        "four-process training",
    );
    // The replicas' gradients are summed by all_reduce instead of accumulated microbatch after
    // microbatch: another summation order, so float rounding (1e-6 relative on losses, 1e-5 on
    // parameters after 5 AdamW steps) is the bound.
    for (a, b) in steps(&d.join("one")).iter().zip(steps(&d.join("four"))) {
        assert_eq!(a[0], b[0]);
        for k in 1..6 {
            assert!(
                (a[k] - b[k]).abs() <= 1e-6 * a[k].abs().max(1.0),
                "{a:?} vs {b:?}"
            );
        }
    }
    assert_eq!(steps(&d.join("four")).len(), 5);
    let diff = model_diff(&model(&d.join("one")), &model(&d.join("four")));
    assert!(diff < 1e-5, "{diff}");
    // Each run writes tens of MB of checkpoints: keep nothing of a passed test.
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn torchrun_runs_the_two_process_case_unchanged() {
    let torchrun = common::root().join(".venv/bin/torchrun");
    assert!(
        torchrun.exists(),
        "scripts/setup.sh installs torch (and torchrun) into .venv"
    );
    let d = scratch("torchrun");
    train_one(&d.join("one"), &["--steps", "3"]);
    let out = Command::new(&torchrun)
        .current_dir(common::root())
        .env("DEEM_LOG", "warn")
        .args(["--no-python", "--nproc-per-node", "2", "--master-port"])
        .arg(common::free_port().to_string())
        .arg(env!("CARGO_BIN_EXE_deem"))
        .args([
            "train",
            "--quiet",
            "--steps",
            "3",
            "--topology",
            TWO,
            "--run-dir",
        ])
        .arg(d.join("two"))
        .output()
        .unwrap();
    ok(out, "torchrun");
    assert_eq!(steps(&d.join("one")), steps(&d.join("two")));
    assert_eq!(
        model_diff(&model(&d.join("one")), &model(&d.join("two"))),
        0.0
    );
    // Each run writes tens of MB of checkpoints: keep nothing of a passed test.
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn four_processes_checkpoint_and_one_process_resumes_to_six_straight_steps() {
    let d = scratch("resume");
    let run = d.join("run");
    let out = launch(
        4,
        &run,
        &[],
        &["--topology", FOUR, "--steps", "6", "--stop-at", "3"],
    );
    ok(out, "four processes, three steps");
    assert_eq!(steps(&run).len(), 3);
    let manifest: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(run.join("checkpoints/step-3/manifest.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(manifest["topology"], "cpu-dp2");
    assert_eq!(
        manifest["stages"],
        serde_json::json!(["vision", "llm0", "llm1", "diffusion"])
    );
    train_one(&run, &["--steps", "6", "--resume"]);
    train_one(&d.join("straight"), &["--steps", "6"]);
    let (a, b) = (steps(&run), steps(&d.join("straight")));
    assert_eq!(a.len(), 6);
    for (x, y) in a.iter().zip(&b) {
        assert!((x[1] - y[1]).abs() <= 1e-6 * y[1].abs(), "{x:?} vs {y:?}");
    }
    let diff = model_diff(&model(&run), &model(&d.join("straight")));
    assert!(diff < 1e-5, "{diff}");
    // Each run writes tens of MB of checkpoints: keep nothing of a passed test.
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn a_killed_rank_is_restarted_with_the_world_to_the_same_weights() {
    let d = scratch("fault");
    train_one(&d.join("straight"), &["--steps", "5"]);
    let out = launch(
        2,
        &d.join("run"),
        &["--max-restarts", "1"],
        &[
            "--topology",
            TWO,
            "--steps",
            "5",
            "--set",
            "fault.kill_actor=llm1",
            "--set",
            "fault.at_step=3",
            "--set",
            "train.checkpoint_every=2",
        ],
    );
    let out = ok(out, "training with a killed rank");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("rank 1 failed (exit code 1): restarting all 2 rank(s) (restart 1 of 1)")
            || stderr
                .contains("rank 0 failed (exit code 1): restarting all 2 rank(s) (restart 1 of 1)"),
        "{stderr}"
    );
    assert!(stderr.contains("[rank 1] error: step 3 failed"), "{stderr}");
    assert_eq!(steps(&d.join("run")), steps(&d.join("straight")));
    assert_eq!(
        model_diff(&model(&d.join("run")), &model(&d.join("straight"))),
        0.0
    );
    // Without restarts the launcher gives up and says so.
    let out = launch(
        2,
        &d.join("run2"),
        &[],
        &[
            "--topology",
            TWO,
            "--steps",
            "5",
            "--set",
            "fault.kill_actor=vision",
            "--set",
            "fault.at_step=1",
        ],
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("not restarting: all 0 restart(s) allowed (--max-restarts) are used"),
        "{stderr}"
    );
    // Each run writes tens of MB of checkpoints: keep nothing of a passed test.
    let _ = std::fs::remove_dir_all(&d);
}

/// The pid of the launcher's child started as `rank`.
fn rank_pid(launcher: u32, rank: u32) -> Option<i32> {
    std::fs::read_dir("/proc").ok()?.find_map(|e| {
        let dir = e.ok()?.path();
        let pid: i32 = dir.file_name()?.to_str()?.parse().ok()?;
        let status = std::fs::read_to_string(dir.join("status")).ok()?;
        let ppid: u32 = status
            .lines()
            .find_map(|l| l.strip_prefix("PPid:"))?
            .trim()
            .parse()
            .ok()?;
        let env = std::fs::read(dir.join("environ")).ok()?;
        let wanted = format!("RANK={rank}");
        (ppid == launcher && env.split(|b| *b == 0).any(|v| v == wanted.as_bytes())).then_some(pid)
    })
}

/// A rank that stops answering (SIGSTOP after two steps): rank 0 times out on it within
/// `--peer-timeout` naming it, `deem launch` ends the world (the stopped rank too) and restarts it
/// from the latest checkpoint, and the run ends with the straight run's weights.
#[test]
fn a_stopped_rank_is_named_by_the_timeout_and_the_world_restarts_to_the_same_weights() {
    let d = scratch("sigstop");
    train_one(&d.join("straight"), &["--steps", "8"]);
    let run = d.join("run");
    let args = [
        "--topology",
        TWO,
        "--steps",
        "8",
        "--set",
        "train.checkpoint_every=2",
    ];
    let launcher = launch_with(2, &run, &["--max-restarts", "1"], &args, 5)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    while std::fs::read_to_string(run.join("steps.jsonl")).map_or(0, |t| t.lines().count()) < 2 {
        assert!(started.elapsed().as_secs() < 120, "two steps never ran");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let pid = rank_pid(launcher.id(), 1).expect("rank 1's process");
    // SAFETY: kill has no memory-safety preconditions.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
    let stopped = std::time::Instant::now();
    let out = ok(
        launcher.wait_with_output().unwrap(),
        "training with a stopped rank",
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("rank 0 failed (exit code 1): restarting all 2 rank(s) (restart 1 of 1)"),
        "{stderr}"
    );
    let named = stderr
        .lines()
        .find(|l| l.starts_with("[rank 0] error: ") && l.contains("rank(s) 1 stopped answering"))
        .unwrap_or_else(|| panic!("rank 0's error does not name rank 1: {stderr}"));
    eprintln!(
        "{named}\n(the run ended {:.1} s after the stop)",
        stopped.elapsed().as_secs_f64()
    );
    assert_eq!(steps(&run), steps(&d.join("straight")));
    assert_eq!(model_diff(&model(&run), &model(&d.join("straight"))), 0.0);
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn a_rank_that_never_joins_or_a_wrong_world_size_fails_naming_them() {
    let d = scratch("join");
    let port = common::free_port().to_string();
    let started = std::time::Instant::now();
    let out = deem()
        .env("RANK", "0")
        .env("WORLD_SIZE", "2")
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", &port)
        .args([
            "train",
            "--quiet",
            "--peer-timeout",
            "3",
            "--topology",
            TWO,
            "--run-dir",
        ])
        .arg(d.join("a"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(started.elapsed().as_secs() < 30);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("error: rank 0: rank(s) 1 of WORLD_SIZE=2 never joined the rendezvous at 127.0.0.1:{port} within 3 s")),
        "{stderr}"
    );
    let out = deem()
        .env("RANK", "0")
        .env("WORLD_SIZE", "3")
        .args(["train", "--quiet", "--topology", FOUR, "--run-dir"])
        .arg(d.join("b"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("error: topologies/cpu-dp2.toml: WORLD_SIZE is 3 but topology \"cpu-dp2\" needs 4 processes (data_parallel 2 × 2 rank(s) per pipeline)"),
        "{stderr}"
    );
    // Each run writes tens of MB of checkpoints: keep nothing of a passed test.
    let _ = std::fs::remove_dir_all(&d);
}
