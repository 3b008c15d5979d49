//! `deem launch`: deem's own local launcher, after torchrun's contract — it starts `--nproc-per-node`
//! copies of this binary with `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE`, `GROUP_RANK`,
//! `MASTER_ADDR`, `MASTER_PORT` and `TORCHELASTIC_RESTART_COUNT` set, prefixes every line they print
//! with their rank, forwards SIGINT and SIGTERM to them, and when one fails ends the others and starts
//! them all again (they resume from the run's latest checkpoint) up to `--max-restarts` times.

use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

use super::LaunchArgs;

/// How one attempt ended.
enum Outcome {
    /// Every rank exited 0.
    Done,
    /// `rank` failed with `status`.
    Failed { rank: u32, status: ExitStatus },
    /// The launcher got this signal.
    Signalled(i32),
}

struct Children {
    pids: Vec<(u32, Option<u32>)>,
    exits: mpsc::UnboundedReceiver<(u32, std::io::Result<ExitStatus>)>,
    logs: Vec<tokio::task::JoinHandle<()>>,
    running: usize,
}

/// Copies `reader`'s lines to our stdout or stderr, each prefixed with the rank.
fn relay(
    reader: impl tokio::io::AsyncRead + Unpin + Send + 'static,
    rank: u32,
    to_stderr: bool,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut lines = BufReader::new(reader).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if to_stderr {
                eprintln!("[rank {rank}] {line}");
            } else {
                println!("[rank {rank}] {line}");
            }
        }
    })
}

fn spawn_all(args: &LaunchArgs, attempt: u32) -> anyhow::Result<Children> {
    let exe = std::env::current_exe().context("cannot find the deem binary to launch")?;
    let n = args.nproc_per_node;
    let world = n * args.nnodes;
    let (tx, exits) = mpsc::unbounded_channel();
    let mut children = Children {
        pids: Vec::new(),
        exits,
        logs: Vec::new(),
        running: 0,
    };
    for local in 0..n {
        let rank = args.node_rank * n + local;
        let mut cmd = Command::new(&exe);
        cmd.args(&args.command)
            .env("RANK", rank.to_string())
            .env("WORLD_SIZE", world.to_string())
            .env("LOCAL_RANK", local.to_string())
            .env("LOCAL_WORLD_SIZE", n.to_string())
            .env("GROUP_RANK", args.node_rank.to_string())
            .env("MASTER_ADDR", &args.master_addr)
            .env("MASTER_PORT", args.master_port.to_string())
            .env("TORCHELASTIC_RESTART_COUNT", attempt.to_string())
            .env("TORCHELASTIC_MAX_RESTARTS", args.max_restarts.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                terminate(&children.pids, libc::SIGKILL);
                return Err(e)
                    .with_context(|| format!("cannot start rank {rank} ({})", exe.display()));
            }
        };
        if let Some(out) = child.stdout.take() {
            children.logs.push(relay(out, rank, false));
        }
        if let Some(err) = child.stderr.take() {
            children.logs.push(relay(err, rank, true));
        }
        children.pids.push((rank, child.id()));
        children.running += 1;
        let tx = tx.clone();
        tokio::spawn(async move {
            let status = child.wait().await;
            let _ = tx.send((rank, status));
        });
    }
    Ok(children)
}

/// Sends `sig` to every child still known to run.
fn terminate(pids: &[(u32, Option<u32>)], sig: i32) {
    for (_, pid) in pids {
        if let Some(pid) = pid {
            // SAFETY: kill has no memory-safety preconditions; a pid that already exited is harmless
            // until reaped, and the children are reaped only by their wait tasks.
            unsafe { libc::kill(*pid as i32, sig) };
        }
    }
}

/// Waits for the first failure, a signal, or every rank's success.
async fn supervise(c: &mut Children) -> anyhow::Result<Outcome> {
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    loop {
        tokio::select! {
            exit = c.exits.recv() => {
                let Some((rank, status)) = exit else { return Ok(Outcome::Done) };
                c.running -= 1;
                if let Some(p) = c.pids.iter_mut().find(|(r, _)| *r == rank) {
                    p.1 = None;
                }
                let status = status.with_context(|| format!("waiting for rank {rank}"))?;
                if !status.success() {
                    return Ok(Outcome::Failed { rank, status });
                }
                if c.running == 0 {
                    return Ok(Outcome::Done);
                }
            }
            _ = int.recv() => return Ok(Outcome::Signalled(libc::SIGINT)),
            _ = term.recv() => return Ok(Outcome::Signalled(libc::SIGTERM)),
        }
    }
}

/// Ends every rank still running: `sig`, then SIGKILL after `grace`; waits for them and their logs.
async fn stop_all(c: &mut Children, sig: i32, grace: Duration) {
    terminate(&c.pids, sig);
    // A rank stopped (SIGSTOP) holds the signal until it runs again.
    terminate(&c.pids, libc::SIGCONT);
    let deadline = tokio::time::Instant::now() + grace;
    while c.running > 0 {
        match tokio::time::timeout_at(deadline, c.exits.recv()).await {
            Ok(Some((rank, _))) => {
                c.running -= 1;
                if let Some(p) = c.pids.iter_mut().find(|(r, _)| *r == rank) {
                    p.1 = None;
                }
            }
            Ok(None) => break,
            Err(_) => {
                tracing::warn!(
                    ranks = c.running,
                    "ranks did not stop within the grace period: killing them"
                );
                terminate(&c.pids, libc::SIGKILL);
                while c.running > 0 && c.exits.recv().await.is_some() {
                    c.running -= 1;
                }
            }
        }
    }
    for l in c.logs.drain(..) {
        let _ = l.await;
    }
}

fn describe(status: &ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(sig)) => format!("signal {sig}"),
        _ => status.to_string(),
    }
}

async fn launch(args: &LaunchArgs) -> anyhow::Result<()> {
    let grace = Duration::from_secs(args.grace_seconds);
    let world = args.nproc_per_node * args.nnodes;
    for attempt in 0..=args.max_restarts {
        tracing::info!(attempt, world, node_rank = args.node_rank, master = %format!("{}:{}", args.master_addr, args.master_port), "starting {} rank(s)", args.nproc_per_node);
        let mut children = spawn_all(args, attempt)?;
        let outcome = supervise(&mut children).await;
        match outcome {
            Ok(Outcome::Done) => {
                stop_all(&mut children, libc::SIGTERM, grace).await;
                return Ok(());
            }
            Ok(Outcome::Signalled(sig)) => {
                stop_all(&mut children, sig, grace).await;
                bail!("interrupted by signal {sig}; every rank was stopped");
            }
            Ok(Outcome::Failed { rank, status }) => {
                stop_all(&mut children, libc::SIGTERM, grace).await;
                let what = format!("rank {rank} failed ({})", describe(&status));
                if attempt == args.max_restarts {
                    bail!(
                        "{what}; not restarting: all {} restart(s) allowed (--max-restarts) are used",
                        args.max_restarts
                    );
                }
                tracing::warn!(
                    "{what}: restarting all {world} rank(s) (restart {} of {})",
                    attempt + 1,
                    args.max_restarts
                );
            }
            Err(e) => {
                stop_all(&mut children, libc::SIGKILL, grace).await;
                return Err(e);
            }
        }
    }
    Ok(())
}

/// The launch contract this process was started under (`deem launch`, torchrun, Slurm), checked
/// against the topology's world size; `None` without a launcher's variables, or for a world of one
/// process running a one-process topology (then nothing spans processes).
pub(crate) fn launched(
    topo: &crate::runtime::topology::Topology,
) -> anyhow::Result<Option<crate::dist::LaunchEnv>> {
    let Some(env) = crate::dist::LaunchEnv::from_env()? else {
        return Ok(None);
    };
    if env.world_size == 1 && topo.world_size() == 1 {
        return Ok(None);
    }
    topo.check_world(env.world_size)?;
    Ok(Some(env))
}

/// `deem launch`.
pub fn run(args: LaunchArgs) -> anyhow::Result<()> {
    if args.nproc_per_node == 0 || args.nnodes == 0 {
        bail!("--nproc-per-node and --nnodes: expected at least 1");
    }
    if args.node_rank >= args.nnodes {
        bail!(
            "--node-rank {}: expected a node rank below --nnodes {}",
            args.node_rank,
            args.nnodes
        );
    }
    if args.command.is_empty() {
        bail!("nothing to launch: give the deem command after `--`, e.g. `deem launch --nproc-per-node 2 -- train --topology topologies/cpu-2proc.toml`");
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(launch(&args))
}
