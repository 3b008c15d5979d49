//! The launch contract and the rendezvous, after torchrun's: a process learns its place from `RANK`,
//! `WORLD_SIZE`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE`, `MASTER_ADDR` and `MASTER_PORT` (Slurm's
//! `SLURM_PROCID`, `SLURM_NTASKS`, `SLURM_LOCALID` as a fallback), meets the others at rank 0's TCPStore
//! (or torchrun's agent store when `TORCHELASTIC_USE_AGENT_STORE=True`), checks that every rank joined
//! with the same world size, and forms the world's Gloo group. Keys live under the attempt
//! (`TORCHELASTIC_RESTART_COUNT`), so a restarted world never reads its predecessor's.

use std::sync::Arc;
use std::time::Duration;

use super::c10d::{GlooAddr, Group, GroupSpec, Store};
use super::liveness::Liveness;
use super::DistError;

type Result<T, E = DistError> = std::result::Result<T, E>;

/// torchrun's default rendezvous port.
pub const DEFAULT_PORT: u16 = 29500;

/// Where this process sits in the world, as its launcher said.
#[derive(Debug, Clone, PartialEq)]
pub struct LaunchEnv {
    pub rank: i64,
    pub world_size: i64,
    pub local_rank: i64,
    pub local_world_size: i64,
    pub master_addr: String,
    pub master_port: u16,
    /// How many times the launcher restarted the world (torchrun's `TORCHELASTIC_RESTART_COUNT`).
    pub restart_count: u64,
    /// This machine's name (the `node` label of metrics).
    pub node: String,
    /// Join torchrun's agent store instead of serving one on rank 0.
    pub agent_store: bool,
    /// Which contract supplied it: `torchrun` or `slurm`.
    pub source: &'static str,
}

fn parse_num(var: &str, value: &str, min: i64) -> Result<i64> {
    value
        .trim()
        .parse::<i64>()
        .ok()
        .filter(|v| *v >= min)
        .ok_or_else(|| DistError::Env {
            var: var.into(),
            value: value.into(),
            expected: format!("expected a whole number >= {min}"),
        })
}

/// This machine's host name.
pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most `buf.len()` bytes into `buf`.
    let ok = unsafe { libc::gethostname(buf.as_mut_ptr() as *mut libc::c_char, buf.len()) } == 0;
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    match std::str::from_utf8(&buf[..end]) {
        Ok(s) if ok && !s.is_empty() => s.to_string(),
        _ => "localhost".to_string(),
    }
}

impl LaunchEnv {
    /// The contract from this process's environment; `None` when no launcher set one (a single
    /// process).
    pub fn from_env() -> Result<Option<Self>> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// The contract from `var` (torchrun's variables first, then Slurm's).
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Option<Self>> {
        let (source, rank_var, world_var, local_var) =
            if var("RANK").is_some() || var("WORLD_SIZE").is_some() {
                ("torchrun", "RANK", "WORLD_SIZE", "LOCAL_RANK")
            } else if var("SLURM_PROCID").is_some() {
                ("slurm", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")
            } else {
                return Ok(None);
            };
        let need = |name: &str| {
            var(name).ok_or_else(|| DistError::Env {
                var: name.into(),
                value: String::new(),
                expected: format!(
                    "missing; a {source} launch sets {rank_var} and {world_var} together"
                ),
            })
        };
        let rank = parse_num(rank_var, &need(rank_var)?, 0)?;
        let world_size = parse_num(world_var, &need(world_var)?, 1)?;
        if rank >= world_size {
            return Err(DistError::Env {
                var: rank_var.into(),
                value: rank.to_string(),
                expected: format!("expected a rank below {world_var}={world_size}"),
            });
        }
        let local_rank = match var(local_var) {
            Some(v) => parse_num(local_var, &v, 0)?,
            None => rank,
        };
        let local_world_size = match var("LOCAL_WORLD_SIZE") {
            Some(v) => parse_num("LOCAL_WORLD_SIZE", &v, 1)?,
            None => match var("SLURM_NTASKS_PER_NODE") {
                // Slurm writes "4" or "4(x2)".
                Some(v) => parse_num(
                    "SLURM_NTASKS_PER_NODE",
                    v.split('(').next().unwrap_or(&v),
                    1,
                )?,
                None => world_size,
            },
        };
        let master_addr = var("MASTER_ADDR").unwrap_or_else(|| "127.0.0.1".into());
        let master_port = match var("MASTER_PORT") {
            Some(v) => v
                .trim()
                .parse::<u16>()
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| DistError::Env {
                    var: "MASTER_PORT".into(),
                    value: v.clone(),
                    expected: "expected a TCP port (1-65535)".into(),
                })?,
            None => DEFAULT_PORT,
        };
        let restart_count = match var("TORCHELASTIC_RESTART_COUNT") {
            Some(v) => parse_num("TORCHELASTIC_RESTART_COUNT", &v, 0)? as u64,
            None => 0,
        };
        Ok(Some(LaunchEnv {
            rank,
            world_size,
            local_rank,
            local_world_size,
            master_addr,
            master_port,
            restart_count,
            node: hostname(),
            agent_store: var("TORCHELASTIC_USE_AGENT_STORE").as_deref() == Some("True"),
            source,
        }))
    }

    fn loopback(&self) -> bool {
        self.master_addr == "localhost" || self.master_addr.starts_with("127.")
    }
}

/// The joined world: the store, the world group, and this process's place.
pub struct World {
    pub env: LaunchEnv,
    pub store: Arc<Store>,
    pub group: Arc<Group>,
    /// Prefix of this attempt's keys in the store.
    prefix: String,
    timeout: Duration,
    /// This rank's heartbeat; names the ranks that stopped answering when an operation fails.
    liveness: Arc<Liveness>,
}

impl World {
    /// Meets the other ranks; every wait ends after `timeout` with an error naming what is missing.
    pub fn join(env: LaunchEnv, timeout: Duration) -> Result<Self> {
        let rank = env.rank;
        let server = rank == 0 && !env.agent_store;
        let store = Store::connect(&env.master_addr, env.master_port, server, rank, timeout)?;
        let prefix = format!("deem/attempt_{}", env.restart_count);
        let me = format!("{}\n{}", env.world_size, env.node);
        store.set(&format!("{prefix}/join/{rank}"), me.as_bytes())?;
        let keys: Vec<String> = (0..env.world_size)
            .map(|r| format!("{prefix}/join/{r}"))
            .collect();
        let missing = store.wait_for(&keys, timeout)?;
        if !missing.is_empty() {
            return Err(DistError::NeverJoined {
                rank,
                missing: missing
                    .iter()
                    .map(usize::to_string)
                    .collect::<Vec<_>>()
                    .join(", "),
                world: env.world_size,
                addr: format!("{}:{}", env.master_addr, env.master_port),
                secs: timeout.as_secs(),
            });
        }
        for r in 0..env.world_size {
            let v = store.get(&format!("{prefix}/join/{r}"))?;
            let text = String::from_utf8_lossy(&v);
            let theirs: i64 = text
                .lines()
                .next()
                .and_then(|l| l.parse().ok())
                .unwrap_or(-1);
            if theirs != env.world_size {
                return Err(DistError::WorldMismatch {
                    rank,
                    ours: env.world_size,
                    other: r,
                    theirs,
                });
            }
        }
        let liveness = Liveness::start(
            (&env.master_addr, env.master_port),
            (rank, env.world_size),
            &prefix,
            timeout,
        )?;
        let iface = std::env::var("GLOO_SOCKET_IFNAME").ok();
        let hostname = if env.loopback() {
            "127.0.0.1".to_string()
        } else {
            String::new()
        };
        let group = Group::gloo(
            &store,
            GroupSpec {
                prefix: &format!("{prefix}/world"),
                rank,
                size: env.world_size,
                world_rank: rank,
                timeout,
            },
            GlooAddr {
                hostname: &hostname,
                iface: iface.as_deref(),
            },
        )?;
        Ok(World {
            env,
            store: Arc::new(store),
            group: Arc::new(group.with_explain(liveness.explain())),
            prefix,
            timeout,
            liveness,
        })
    }

    pub fn rank(&self) -> i64 {
        self.env.rank
    }

    /// Ends this rank's part in a world that finished cleanly (see [`Liveness::finish`]).
    pub fn finish(&self) {
        self.liveness.finish(self.timeout);
    }

    pub fn size(&self) -> i64 {
        self.env.world_size
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// A Gloo sub-group of `ranks` (world ranks, in group-rank order) named `name`; `None` on ranks
    /// outside it. Every member calls it with the same name and ranks.
    pub fn subgroup(&self, name: &str, ranks: &[i64]) -> Result<Option<Group>> {
        let Some(me) = ranks.iter().position(|&r| r == self.env.rank) else {
            return Ok(None);
        };
        let iface = std::env::var("GLOO_SOCKET_IFNAME").ok();
        let hostname = if self.env.loopback() {
            "127.0.0.1".to_string()
        } else {
            String::new()
        };
        Group::gloo(
            &self.store,
            GroupSpec {
                prefix: &format!("{}/group/{name}", self.prefix),
                rank: me as i64,
                size: ranks.len() as i64,
                world_rank: self.env.rank,
                timeout: self.timeout,
            },
            GlooAddr {
                hostname: &hostname,
                iface: iface.as_deref(),
            },
        )
        .map(|g| Some(g.with_explain(self.liveness.explain())))
    }
}
