//! Chaos: `deem train` killed with SIGKILL at random moments — while stepping, while writing a checkpoint
//! (one is written every step) — then resumed with `--resume`: the latest checkpoint always loads, the
//! run ends with the uninterrupted run's weights bit for bit, and `steps.jsonl` holds exactly one row per
//! step. `CHAOS_SEEDS` kills (default 3; `make chaos` runs 10), each at a time drawn from its seed. A
//! checkpoint write the filesystem refuses (a file-size limit: EFBIG; a full tmpfs: ENOSPC) ends the run
//! with an error naming the checkpoint and the cause, leaves no partial files, keeps the previous
//! checkpoint the latest, and a resume from it ends as the straight run.

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
    command(config, run, resume).spawn().unwrap()
}

/// `deem train` of the chaos run: single-process, 8 steps, a checkpoint every step.
fn command(config: &Path, run: &Path, resume: bool) -> Command {
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
    c
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

/// The straight run's weights and rows equal the run's.
fn same_run(run: &Path, straight: &Path) {
    assert_eq!(rows(run), rows(straight));
    let (want, got) = (
        common::read_all(&straight.join("model.safetensors")),
        common::read_all(&run.join("model.safetensors")),
    );
    assert_eq!(got.len(), want.len());
    for (k, v) in &want {
        assert!(v.equal(&got[k]), "{k} differs");
    }
}

/// What a run whose write of checkpoint `step + 1` failed with `cause` left: its error naming the
/// run directory `named` (where it ran), no partial checkpoint in `run` (where it is now), `latest`
/// still at `step`.
fn refused_write(err: &str, named: &Path, run: &Path, step: u64, cause: &str) {
    let want = format!(
        "writing checkpoint step-{} into {} failed: ",
        step + 1,
        named.join("checkpoints").display()
    );
    assert!(err.contains(&want), "{err}");
    assert!(err.contains(cause), "{err}");
    assert!(
        err.contains(&format!(
            "its partial files were removed and the latest checkpoint is still step-{step}"
        )),
        "{err}"
    );
    let ck = run.join("checkpoints");
    assert!(!ck.join(format!("step-{}.tmp", step + 1)).exists());
    eprintln!(
        "{}",
        err.lines().rfind(|l| l.contains("failed")).unwrap_or("")
    );
    let (_, m) = deem_actors::pipeline::checkpoint::latest(run).unwrap();
    assert_eq!(m.step, step);
}

/// An injected write error: the resumed part of the run gets a file-size limit (RLIMIT_FSIZE, with
/// SIGXFSZ ignored) below a checkpoint's model file, so writing step-3 fails with EFBIG.
#[test]
fn a_checkpoint_write_the_filesystem_refuses_keeps_the_previous_one() {
    use std::os::unix::process::CommandExt as _;
    let dir = common::scratch("chaos-write");
    let config = config(&dir);
    let straight = dir.join("straight");
    finish(train(&config, &straight, false), "the straight run");
    let run = dir.join("run");
    let mut first = command(&config, &run, false);
    first.args(["--stop-at", "2"]);
    finish(first.spawn().unwrap(), "steps 1-2");
    let largest = std::fs::read_dir(run.join("checkpoints/step-2"))
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .max()
        .unwrap();
    let limit = largest / 2;
    let mut limited = command(&config, &run, true);
    // SAFETY: only async-signal-safe calls (signal, setrlimit) between fork and exec.
    unsafe {
        limited.pre_exec(move || {
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            let r = libc::rlimit {
                rlim_cur: limit,
                rlim_max: limit,
            };
            if libc::setrlimit(libc::RLIMIT_FSIZE, &r) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = limited.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the run went on: {err}");
    refused_write(&err, &run, &run, 2, "File too large");
    assert!(!run.join("checkpoints/step-3").exists());
    finish(
        train(&config, &run, true),
        "resuming after the refused write",
    );
    same_run(&run, &straight);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A full disk: the run writes into a small tmpfs (mounted in a private mount namespace with
/// `unshare`; skipped where the machine does not allow one) that holds the first checkpoints but not
/// all eight; the write that finds it full fails with ENOSPC.
#[test]
fn a_full_disk_while_writing_a_checkpoint_keeps_the_previous_one() {
    let dir = common::scratch("chaos-full");
    let config = config(&dir);
    let probe = Command::new("unshare")
        .args(["-rm", "sh", "-c"])
        .arg(format!(
            "mount -t tmpfs -o size=64k tmpfs {0} && umount {0}",
            dir.display()
        ))
        .output();
    if !probe.is_ok_and(|o| o.status.success()) {
        eprintln!("unshare/mount of a tmpfs is not allowed here: skipping (the RLIMIT_FSIZE test covers a refused write)");
        return;
    }
    let straight = dir.join("straight");
    finish(train(&config, &straight, false), "the straight run");
    let one: u64 = std::fs::read_dir(straight.join("checkpoints/step-8"))
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    // Room for three and a half checkpoints (every one is kept), the rows and the log.
    let size = one * 7 / 2 + (64 << 10);
    let (mnt, kept) = (dir.join("mnt"), dir.join("kept"));
    std::fs::create_dir_all(&mnt).unwrap();
    let cmd = command(&config, &mnt.join("run"), false);
    let program = cmd.get_program().to_string_lossy().into_owned();
    let args: Vec<String> = cmd
        .get_args()
        .map(|a| format!("'{}'", a.to_string_lossy()))
        .collect();
    // Inside the namespace: mount, train (it fails), keep what it left, report its status.
    let script = format!(
        "mount -t tmpfs -o size={size} tmpfs {mnt} && ( cd {root} && DEEM_LOG=warn '{program}' {args} ); echo \"exit=$?\" >&2; cp -r {mnt}/run {kept}",
        mnt = mnt.display(),
        root = common::root().display(),
        args = args.join(" "),
        kept = kept.display(),
    );
    let out = Command::new("unshare")
        .args(["-rm", "sh", "-c", &script])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !err.contains("exit=0"),
        "the run did not fill the disk: {err}"
    );
    // The run directory is `kept` now; the error names the mounted one.
    let step = deem_actors::pipeline::checkpoint::latest(&kept)
        .unwrap()
        .1
        .step;
    assert!((1..8).contains(&step), "{step}: {err}");
    refused_write(
        &err,
        &mnt.join("run"),
        &kept,
        step,
        "No space left on device",
    );
    finish(train(&config, &kept, true), "resuming after the full disk");
    same_run(&kept, &straight);
    let _ = std::fs::remove_dir_all(&dir);
}
