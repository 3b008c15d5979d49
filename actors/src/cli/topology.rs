//! `deem topology check`: a topology validated against a config, printed as its placement (memory per
//! device, layers per shard).

use super::TopologyCommand;
use crate::runtime::topology::Topology;
use crate::settings::LoadedConfig;

/// `deem topology check` text for a validated topology.
pub fn topology_report(topo: &Topology, cfg: &LoadedConfig) -> String {
    let mut s = String::new();
    let desc = topo
        .description
        .as_deref()
        .map(|d| format!(" — {d}"))
        .unwrap_or_default();
    s.push_str(&format!(
        "topology  {}{desc}  [{}]\n",
        topo.name, topo.origin
    ));
    s.push_str(&format!(
        "config    {}, dtype {}, {} LLM layers  [{}]\n\n",
        cfg.config.model.name,
        cfg.config.model.dtype,
        cfg.config.llm.num_hidden_layers,
        cfg.base_origin
    ));
    s.push_str(&topo.table());
    let devices: Vec<String> = topo.devices().iter().map(ToString::to_string).collect();
    s.push_str(&format!(
        "\nok: {} actors on {} device(s) ({})\n",
        topo.actors.len(),
        devices.len(),
        devices.join(", ")
    ));
    for r in 0..topo.pipeline_ranks {
        let on: Vec<&crate::runtime::topology::Placement> =
            topo.actors.iter().filter(|a| a.rank == r).collect();
        let bytes: u64 = on.iter().map(|a| a.param_bytes).sum();
        let names: Vec<&str> = on.iter().map(|a| a.name.as_str()).collect();
        s.push_str(&format!(
            "rank {r}: {} — {} of parameters\n",
            names.join(", "),
            crate::runtime::topology::human_bytes(bytes)
        ));
    }
    s.push_str(&format!(
        "processes: {} rank(s) per pipeline × data_parallel {} = WORLD_SIZE {}\n",
        topo.pipeline_ranks,
        topo.data_parallel,
        topo.world_size()
    ));
    s
}

pub fn run(cmd: TopologyCommand) -> anyhow::Result<()> {
    let TopologyCommand::Check {
        topology,
        config,
        assume_cuda_devices,
        world_size,
    } = cmd;
    let cfg = config.load()?;
    let cuda = assume_cuda_devices.unwrap_or_else(deem::device::cuda_device_count);
    let topo = topology.load(&cfg, cuda)?;
    if let Some(n) = world_size {
        topo.check_world(n)?;
    }
    tracing::debug!(actors = topo.actors.len(), "topology valid");
    print!("{}", topology_report(&topo, &cfg));
    Ok(())
}
