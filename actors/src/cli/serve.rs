//! `deem serve`: the streaming generation service on the topology's workers (see `serve/`). Launched as
//! a world (torchrun, `deem launch`), rank 0 runs the HTTP front end, admission, the scheduler and its
//! own workers; every other rank runs the workers the topology places on it.

use std::sync::Arc;
use std::time::Duration;

use anyhow::bail;

use super::ServeArgs;
use crate::runtime::topology::{Component, Topology};
use crate::serve::remote::{Owners, ServeWorld};

/// The world this process serves in, when a launcher started it (and the topology spans processes).
fn join_world(args: &ServeArgs, topo: &Topology) -> anyhow::Result<Option<ServeWorld>> {
    let Some(env) = super::launch::launched(topo)? else {
        return Ok(None);
    };
    if topo.data_parallel != 1 {
        bail!(
            "{}: data_parallel = {}: serving runs one pipeline; start one service per replica behind a load balancer",
            topo.origin,
            topo.data_parallel
        );
    }
    let timeout = Duration::from_secs(args.peer_timeout.max(1));
    let world = crate::dist::World::join(env, timeout)?;
    let order = topo.pipeline_order();
    let rank_of = |c| {
        order
            .iter()
            .find(|a| a.component == c)
            .map_or(0, |a| a.rank)
    };
    let owners = Owners {
        vision: rank_of(Component::Vision),
        shards: order
            .iter()
            .filter(|a| a.component == Component::Llm)
            .map(|a| a.rank)
            .collect(),
        diffusion: rank_of(Component::Diffusion),
    };
    Ok(Some(ServeWorld {
        world: Arc::new(world),
        owners,
        heartbeat: (timeout / 4).min(Duration::from_secs(5)),
    }))
}

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    let cfg = args.config.load()?;
    if cfg.config.fault.as_ref().is_some_and(|f| f.at_op.is_some()) {
        anyhow::bail!(
            "fault.at_op: a training fault (the op of a step); a serving actor dies at a job, fault.at_step"
        );
    }
    let topo = args
        .topology
        .load(&cfg, deem::device::cuda_device_count())?;
    let world = join_world(&args, &topo)?;
    // Across processes every sample carries the rank and the node.
    let metrics = match &world {
        Some(w) => crate::runtime::metrics::Metrics::for_rank(w.world.rank(), &w.world.env.node),
        None => crate::runtime::metrics::Metrics::new(),
    };
    let weights = match &args.checkpoint {
        Some(p) => crate::serve::engine::Weights::Checkpoint(p.clone()),
        None => {
            tracing::warn!("no --checkpoint: serving the untrained initialisation for train.seed");
            crate::serve::engine::Weights::Init
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    // The CUDA devices' allocator gauges, every 5 s.
    let (m, devices) = (metrics.clone(), topo.devices());
    runtime.spawn(async move {
        loop {
            m.precision.sample_devices(&devices);
            tokio::time::sleep(std::time::Duration::from_secs(5)).await;
        }
    });
    if let Some(w) = world.clone().filter(|w| w.rank() != 0) {
        let rank = w.rank();
        let local = w.world.env.local_rank as u16;
        let server = match args.metrics_addr {
            Some(mut addr) => {
                addr.set_port(addr.port() + local);
                Some(runtime.block_on(crate::runtime::http::Server::start(
                    addr,
                    crate::runtime::http::router(metrics.clone()),
                ))?)
            }
            None => None,
        };
        tracing::info!(rank, "serving the workers placed on this rank");
        let world = w.world.clone();
        let end = runtime.block_on(async {
            // A signal (the launcher passing on Ctrl-C) does not end this rank: rank 0 drains the
            // requests in flight, which still need this rank, then stops the service.
            tokio::spawn(async move {
                loop {
                    crate::serve::shutdown_signal().await;
                    tracing::info!(rank, "signal: serving on until rank 0 stops the service");
                }
            });
            crate::serve::engine::run_rank(&cfg.config, &topo, &weights, metrics, w).await
        })?;
        if let Some(s) = server {
            runtime.block_on(s.stop())?;
        }
        return match end {
            Ok(()) => {
                tracing::info!(rank, "rank 0 stopped the service");
                world.finish();
                Ok(())
            }
            Err(f) => bail!("rank {rank}: lost {}: {}", f.actor, f.error),
        };
    }
    let tokenizer = deem::text::tokenizer::load_tokenizer(
        args.tokenizer.as_deref(),
        args.checkpoint.as_deref(),
        &cfg.config,
    )?;
    let dist = world.as_ref().map(|w| w.world.clone());
    runtime.block_on(async {
        let service = crate::serve::Service::start_on(
            args.addr,
            (cfg.config.clone(), &topo, &weights),
            tokenizer,
            args.api_key.clone(),
            metrics,
            world,
        )
        .await?;
        println!("deem serve: listening on http://{}", service.addr);
        crate::serve::shutdown_signal().await;
        tracing::info!("shutting down: draining in-flight requests");
        service.stop().await
    })?;
    if let Some(w) = dist {
        w.finish();
    }
    Ok(())
}
