//! `deem serve`: the streaming generation service on the topology's workers (see `serve/`).

use super::ServeArgs;

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    let cfg = args.config.load()?;
    let topo = args
        .topology
        .load(&cfg, deem::device::cuda_device_count())?;
    let tokenizer = deem::text::tokenizer::load_tokenizer(
        args.tokenizer.as_deref(),
        args.checkpoint.as_deref(),
        &cfg.config,
    )?;
    let weights = match &args.checkpoint {
        Some(p) => crate::serve::engine::Weights::Checkpoint(p.clone()),
        None => {
            tracing::warn!("no --checkpoint: serving the untrained initialisation for train.seed");
            crate::serve::engine::Weights::Init
        }
    };
    let metrics = crate::runtime::metrics::Metrics::new();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let service = crate::serve::Service::start(
            args.addr,
            cfg.config.clone(),
            &topo,
            &weights,
            tokenizer,
            args.api_key.clone(),
            metrics,
        )
        .await?;
        println!("deem serve: listening on http://{}", service.addr);
        crate::serve::shutdown_signal().await;
        tracing::info!("shutting down: draining in-flight requests");
        service.stop().await
    })?;
    Ok(())
}
