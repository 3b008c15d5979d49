//! A pipeline spread over processes, after Megatron-LM's and torchtitan's pipeline × data parallel
//! layout: world rank = replica × ranks-per-pipeline + pipeline rank. Each process runs the stages its
//! pipeline rank hosts; edges that cross processes go through c10d point-to-point on a group of their
//! own; the replicas of a pipeline rank all-reduce their gradients in a group of their own; one
//! world-wide all_reduce gathers every stage's squared gradient norm and every microbatch's losses into
//! fixed slots (one contributor per slot, so the sum is exact and the global norm is summed in
//! pipeline order, as in one process). Control needs no messages: every rank runs the same steps in
//! lockstep, and every wait ends at the world's timeout.

use std::sync::Arc;

use deem::config::DeemConfig;
use tch::Tensor;

use super::error::PipelineError;
use super::stage::StepOut;
use crate::dist::{Group, World};
use crate::runtime::topology::Topology;

type Result<T, E = PipelineError> = std::result::Result<T, E>;

/// Bytes per gradient all_reduce bucket (DDP's default, 25 MiB).
pub const BUCKET_BYTES: usize = 25 << 20;

/// How this process takes part in a multi-process pipeline.
pub struct DistPlan {
    pub world: Arc<World>,
    /// Every rank, for the pipeline's point-to-point edges (kept apart from the world's collectives).
    pub p2p: Arc<Group>,
    /// This pipeline rank's replicas (when data_parallel > 1).
    pub replicas: Option<Arc<Group>>,
    pub replica: u32,
    pub pipeline_rank: u32,
    pub pipeline_ranks: u32,
    pub data_parallel: u32,
    /// Processes on this node (they share its cores).
    pub local_procs: usize,
}

impl DistPlan {
    /// Checks the world against `topo` and `cfg` and forms the groups.
    pub fn new(world: Arc<World>, topo: &Topology, cfg: &DeemConfig) -> Result<Self> {
        topo.check_world(world.size())
            .map_err(|e| PipelineError::Topology {
                origin: topo.origin.clone(),
                problem: e.problems.join("; "),
            })?;
        let (p, r) = (topo.pipeline_ranks, topo.data_parallel);
        let m = cfg.train.microbatches;
        if m % r as u64 != 0 || cfg.train.batch_size % m != 0 {
            return Err(PipelineError::Topology {
                origin: topo.origin.clone(),
                problem: format!(
                    "data_parallel {r}: train.microbatches = {m} (microbatches of the global batch) must split evenly over the replicas, and train.batch_size = {} over the microbatches",
                    cfg.train.batch_size
                ),
            });
        }
        let rank = world.rank() as u32;
        let all: Vec<i64> = (0..world.size()).collect();
        let p2p =
            world
                .subgroup("p2p", &all)?
                .map(Arc::new)
                .ok_or_else(|| PipelineError::Topology {
                    origin: topo.origin.clone(),
                    problem: format!("rank {rank} is not in its own world"),
                })?;
        let mut replicas = None;
        if r > 1 {
            for pr in 0..p {
                let members: Vec<i64> = (0..r).map(|k| (k * p + pr) as i64).collect();
                if let Some(g) = world.subgroup(&format!("replicas-{pr}"), &members)? {
                    replicas = Some(Arc::new(g));
                }
            }
        }
        Ok(DistPlan {
            local_procs: world.env.local_world_size.max(1) as usize,
            world,
            p2p,
            replicas,
            replica: rank / p,
            pipeline_rank: rank % p,
            pipeline_ranks: p,
            data_parallel: r,
        })
    }

    /// The world rank running pipeline rank `pr` of this process's replica.
    pub fn world_rank_of(&self, pr: u32) -> i64 {
        (self.replica * self.pipeline_ranks + pr) as i64
    }

    /// Microbatches each replica runs.
    pub fn per_replica(&self, total: u64) -> u64 {
        total / self.data_parallel as u64
    }
}

/// What every rank knows after a step: each stage's squared gradient norm (pipeline order) and each
/// microbatch's losses (global order).
pub struct Gathered {
    pub sq_norms: Vec<f64>,
    pub ntp: Vec<f64>,
    pub nip: Vec<f64>,
    pub csr: Vec<f64>,
}

/// Places this process's stage outputs (`(pipeline index, out)`) into the slots and, across processes,
/// sums the slots over the world (each slot has one contributor: replica 0 for the norms, which are
/// equal on every replica after the gradient all_reduce).
pub fn gather(
    outs: &[(usize, &StepOut)],
    stages: usize,
    offset: usize,
    total: usize,
    dist: Option<&DistPlan>,
) -> Result<Gathered> {
    let mut v = vec![0.0f64; stages + 3 * total];
    let first_replica = dist.is_none_or(|d| d.replica == 0);
    for (i, o) in outs {
        if first_replica {
            v[*i] = o.sq_grad_norm;
        }
        for (part, losses) in [&o.ntp, &o.nip, &o.csr].into_iter().enumerate() {
            for (k, l) in losses.iter().enumerate() {
                v[stages + part * total + offset + k] = *l;
            }
        }
    }
    if let Some(d) = dist {
        let t = Tensor::from_slice(&v);
        d.world.group.all_reduce(&t)?;
        v = Vec::<f64>::try_from(&t).map_err(|e| PipelineError::Stage {
            stage: format!("rank {}", d.world.rank()),
            message: e.to_string(),
        })?;
    }
    let part = |k: usize| v[stages + k * total..stages + (k + 1) * total].to_vec();
    Ok(Gathered {
        sq_norms: v[..stages].to_vec(),
        ntp: part(0),
        nip: part(1),
        csr: part(2),
    })
}
