//! Topology validation and its error messages, the placement table, and `deem topology check`.

mod common;

#[path = "common/runtime.rs"]
mod rt;
use common::root;
use rt::*;

use deem_actors::runtime::topology::{Component, Topology};

const HEAD: &str = "name = \"t\"\n";

fn actor(name: &str, component: &str, device: &str, layers: Option<(i64, i64)>) -> String {
    let layers = layers
        .map(|(a, b)| format!("layers = [{a}, {b}]\n"))
        .unwrap_or_default();
    format!("\n[[actor]]\nname = \"{name}\"\ncomponent = \"{component}\"\ndevice = \"{device}\"\n{layers}")
}

fn four(vision: &str, l0: Option<(i64, i64)>, l1: Option<(i64, i64)>, diffusion: &str) -> String {
    format!(
        "{HEAD}{}{}{}{}",
        actor("vision", "vision", vision, None),
        actor("llm0", "llm", "cpu", l0),
        actor("llm1", "llm", "cpu", l1),
        actor("diffusion", "diffusion", diffusion, None)
    )
}

fn topo_err(text: &str, cuda: usize) -> String {
    Topology::parse(text, "t.toml", &embedded_tiny().config, cuda)
        .expect_err("topology should be rejected")
        .to_string()
}

fn topo_ok(text: &str, cuda: usize) -> Topology {
    Topology::parse(text, "t.toml", &embedded_tiny().config, cuda).unwrap()
}

#[test]
fn even_split_and_explicit_ranges_place_every_layer_once() {
    let t = topo_ok(&four("cpu", None, None, "cpu"), 0);
    let ranges: Vec<_> = t.actors.iter().filter_map(|a| a.layers.clone()).collect();
    assert_eq!(ranges, vec![0..2, 2..4]);
    let t = topo_ok(&four("cpu", Some((0, 1)), Some((1, 4)), "cpu"), 0);
    let ranges: Vec<_> = t.actors.iter().filter_map(|a| a.layers.clone()).collect();
    assert_eq!(ranges, vec![0..1, 1..4]);
    // Three shards over four layers: the first gets the extra one.
    let three = format!(
        "{HEAD}{}{}{}{}{}",
        actor("v", "vision", "cpu", None),
        actor("a", "llm", "cpu", None),
        actor("b", "llm", "cpu", None),
        actor("c", "llm", "cpu", None),
        actor("d", "diffusion", "cpu", None)
    );
    let t = topo_ok(&three, 0);
    let ranges: Vec<_> = t.actors.iter().filter_map(|a| a.layers.clone()).collect();
    assert_eq!(ranges, vec![0..2, 2..3, 3..4]);
}

#[test]
fn shard_parameters_add_up_to_the_whole_llm() {
    let cfg = embedded_tiny().config;
    let t = topo_ok(&four("cpu", Some((0, 1)), Some((1, 4)), "cpu"), 0);
    let llm: i64 = t
        .actors
        .iter()
        .filter(|a| a.component == Component::Llm)
        .map(|a| a.params)
        .sum();
    assert_eq!(llm, deem::params::ComponentParams::of(&cfg).llm);
    for a in &t.actors {
        assert_eq!(
            a.param_bytes,
            a.params as u64 * 4,
            "f32 is 4 bytes per parameter"
        );
    }
}

#[test]
fn layer_gap_overlap_start_and_end_errors() {
    assert_eq!(
        topo_err(&four("cpu", Some((0, 1)), Some((2, 4)), "cpu"), 0),
        "t.toml: actor[2].layers: [2, 4) starts at layer 2, but the previous shard actor[1] (\"llm0\") ends at \
         layer 1; shards must cover every layer exactly once, in order"
    );
    assert_eq!(
        topo_err(&four("cpu", Some((0, 3)), Some((2, 4)), "cpu"), 0),
        "t.toml: actor[2].layers: [2, 4) starts at layer 2, but the previous shard actor[1] (\"llm0\") ends at \
         layer 3; shards must cover every layer exactly once, in order"
    );
    assert_eq!(
        topo_err(&four("cpu", Some((1, 2)), Some((2, 4)), "cpu"), 0),
        "t.toml: actor[1].layers: the first llm shard must start at layer 0, found [1, 2)"
    );
    assert_eq!(
        topo_err(&four("cpu", Some((0, 2)), Some((2, 3)), "cpu"), 0),
        "t.toml: actor[2].layers: the last llm shard ends at layer 3, but the model has 4 layers \
         (llm.num_hidden_layers); shards must cover every layer exactly once"
    );
    assert_eq!(
        topo_err(&four("cpu", Some((0, 2)), Some((2, 6)), "cpu"), 0),
        "t.toml: actor[2].layers: the last llm shard ends at layer 6, but the model has 4 layers \
         (llm.num_hidden_layers); shards must cover every layer exactly once"
    );
    assert_eq!(
        topo_err(&four("cpu", Some((0, 2)), Some((2, 2)), "cpu"), 0),
        "t.toml: actor[2].layers: [2, 2) is empty; expected [start, end) with 0 <= start < end\n\
         t.toml: actor[2].layers: the last llm shard ends at layer 2, but the model has 4 layers \
         (llm.num_hidden_layers); shards must cover every layer exactly once"
    );
    assert_eq!(
        topo_err(&four("cpu", Some((0, 2)), None, "cpu"), 0),
        "t.toml: actor[2].layers: missing; either every llm shard gives its layers or none does (then the \
         layers are split evenly)"
    );
}

#[test]
fn too_many_even_shards() {
    let mut t = HEAD.to_string()
        + &actor("v", "vision", "cpu", None)
        + &actor("d", "diffusion", "cpu", None);
    for i in 0..5 {
        t += &actor(&format!("l{i}"), "llm", "cpu", None);
    }
    assert_eq!(
        topo_err(&t, 0),
        "t.toml: 5 llm shards but the model has 4 layers (llm.num_hidden_layers); place at most one shard per layer"
    );
}

#[test]
fn components_placed_exactly_once() {
    let twice = four("cpu", None, None, "cpu") + &actor("vision2", "vision", "cpu", None);
    assert_eq!(
        topo_err(&twice, 0),
        "t.toml: component vision is placed 2 times (actor[0] (\"vision\"), actor[4] (\"vision2\")); place it exactly once"
    );
    let none = format!(
        "{HEAD}{}{}",
        actor("vision", "vision", "cpu", None),
        actor("l", "llm", "cpu", None)
    );
    assert_eq!(
        topo_err(&none, 0),
        "t.toml: component diffusion is not placed; add an [[actor]] with component = \"diffusion\""
    );
    assert_eq!(
        topo_err(HEAD, 0),
        "t.toml: no [[actor]] entries; expected one per component (vision, llm, diffusion)"
    );
    let dup = four("cpu", None, None, "cpu").replace("name = \"llm1\"", "name = \"llm0\"");
    assert_eq!(
        topo_err(&dup, 0),
        "t.toml: actor[2].name: \"llm0\" is used by actor[1] too; actor names must be unique"
    );
    let layered_vision = four("cpu", None, None, "cpu").replacen(
        "component = \"vision\"\n",
        "component = \"vision\"\nlayers = [0, 1]\n",
        1,
    );
    assert_eq!(
        topo_err(&layered_vision, 0),
        "t.toml: actor[0].layers: only llm shards have a layer range; remove it from this vision actor"
    );
}

#[test]
fn cuda_devices_must_exist_and_cpu_is_suggested() {
    assert_eq!(
        topo_err(&four("cuda:0", None, None, "cpu"), 0),
        "t.toml: actor[0].device: \"cuda:0\" is not available: this machine has no CUDA devices; use device = \"cpu\""
    );
    assert_eq!(
        topo_err(&four("cuda:1", None, None, "cuda:2"), 2),
        "t.toml: actor[3].device: \"cuda:2\" is out of range: this machine has 2 CUDA device(s) (cuda:0..cuda:1); \
         use one of them or device = \"cpu\""
    );
    assert_eq!(
        topo_err(&four("gpu0", None, None, "cpu"), 0),
        "t.toml: actor[0].device: expected \"cpu\" or \"cuda:N\", found \"gpu0\""
    );
    let t = topo_ok(&four("cuda:1", None, None, "cuda:0"), 2);
    assert_eq!(
        t.devices(),
        vec![
            deem::DeviceSpec::Cpu,
            deem::DeviceSpec::Cuda(0),
            deem::DeviceSpec::Cuda(1)
        ]
    );
}

#[test]
fn malformed_topology_files_are_named() {
    assert_eq!(
        topo_err(&four("cpu", None, None, "cpu").replace("component = \"diffusion\"", "component = \"unet\""), 0),
        "t.toml: actor[3].component: unknown variant `unet`, expected one of `vision`, `llm`, `diffusion`"
    );
    assert_eq!(
        topo_err(&four("cpu", None, None, "cpu").replacen("device = \"cpu\"", "device = \"cpu\"\nnode = 1", 1), 0),
        "t.toml: actor[0].node: unknown field `node`, expected one of `name`, `component`, `device`, `layers`, `rank`"
    );
    let err = topo_err("name = \n", 0);
    assert!(err.starts_with("t.toml: invalid TOML: "), "{err}");
    assert_eq!(
        topo_err("[[actor]]\nname = \"v\"\n", 0),
        "t.toml: actor[0].component: missing; every key must be set"
    );
    assert_eq!(
        topo_err(&four("cpu", None, None, "cpu").replace(HEAD, ""), 0),
        "t.toml: name: missing; every key must be set"
    );
}

#[test]
fn shipped_topologies_fit_their_configs() {
    let tiny = preset("tiny.toml");
    let big = preset("deem-7b.toml");
    let dir = root().join("topologies");
    let cpu = Topology::load(&dir.join("cpu.toml"), &tiny.config, 0).unwrap();
    assert_eq!(cpu.actors.len(), 4);
    assert_eq!(cpu.devices(), vec![deem::DeviceSpec::Cpu]);
    Topology::load(&dir.join("cpu.toml"), &big.config, 0).unwrap();
    let g4 = Topology::load(&dir.join("gpu-4.toml"), &big.config, 4).unwrap();
    assert_eq!(g4.devices().len(), 4);
    assert_eq!(g4.actors[1].layers, Some(0..16));
    let g8 = Topology::load(&dir.join("gpu-8.toml"), &big.config, 8).unwrap();
    assert_eq!(g8.devices().len(), 8);
    assert_eq!(
        g8.actors
            .iter()
            .filter(|a| a.component == Component::Llm)
            .count(),
        6
    );
    // gpu-8's explicit ranges are DEEM-7B's 32 layers, not tiny's 4.
    let err = Topology::load(&dir.join("gpu-8.toml"), &tiny.config, 8)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("the last llm shard ends at layer 32, but the model has 4 layers"),
        "{err}"
    );
}

#[test]
fn placement_table_lists_every_actor_and_the_total() {
    let cfg = preset("deem-7b.toml");
    let t = Topology::load(&root().join("topologies/gpu-4.toml"), &cfg.config, 4).unwrap();
    let table = t.table();
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 2 + 4 + 1, "{table}");
    assert!(
        lines[0].starts_with("rank  actor") && lines[0].ends_with("param memory"),
        "{table}"
    );
    assert!(
        lines[3].contains("llm0") && lines[3].contains("cuda:1") && lines[3].contains("[0, 16)"),
        "{table}"
    );
    // 3.37 B bf16 parameters are 6.28 GiB.
    assert!(
        lines[3].contains("3.37 B") && lines[3].contains("6.28 GiB"),
        "{table}"
    );
    assert!(lines[6].trim_start().starts_with("total"), "{table}");
}

// ---------------------------------------------------------------- metrics endpoint
#[test]
fn binary_topology_check_defaults_flags_and_env() {
    let (ok, out, err) = deem(&["topology", "check"], &[]);
    assert!(ok, "{err}");
    assert!(
        out.contains("[topologies/cpu.toml (embedded default)]"),
        "{out}"
    );
    assert!(out.contains("ok: 4 actors on 1 device(s) (cpu)"), "{out}");

    // Flags, the DEEM_CONFIG / DEEM_TOPOLOGY variables and config-key variables reach the check.
    let (ok, out, err) = deem(
        &["topology", "check", "--set", "llm.num_hidden_layers=6"],
        &[
            ("DEEM_CONFIG", "configs/tiny.toml"),
            ("DEEM_TOPOLOGY", "topologies/cpu.toml"),
            ("DEEM_MODEL__NAME", "renamed"),
        ],
    );
    assert!(ok, "{err}");
    assert!(
        out.contains("config    renamed, dtype f32, 6 LLM layers  [configs/tiny.toml]"),
        "{out}"
    );
    assert!(out.contains("[0, 3)") && out.contains("[3, 6)"), "{out}");
}

#[test]
fn binary_plans_gpu_topologies_with_assumed_devices() {
    let args = [
        "topology",
        "check",
        "--topology",
        "topologies/gpu-8.toml",
        "--config",
        "configs/deem-7b.toml",
    ];
    let (ok, out, err) = deem(&[&args[..], &["--assume-cuda-devices", "8"]].concat(), &[]);
    assert!(ok, "{err}");
    assert!(
        out.contains("ok: 8 actors on 8 device(s) (cuda:0, cuda:1, cuda:2, cuda:3, cuda:4, cuda:5, cuda:6, cuda:7)"),
        "{out}"
    );
    let (ok, _, err) = deem(&[&args[..], &["--assume-cuda-devices", "4"]].concat(), &[]);
    assert!(!ok);
    assert!(
        err.contains(
            "actor[5].device: \"cuda:5\" is out of range: this machine has 4 CUDA device(s)"
        ),
        "{err}"
    );
}

// ---------------------------------------------------------------- deem forward

// ---------------------------------------------------------------- ranks and data parallelism
fn four_actors(extra: &str, ranks: [Option<u32>; 4]) -> String {
    let mut t = format!("name = \"t\"\n{extra}\n");
    for (i, (name, comp)) in [
        ("vision", "vision"),
        ("llm0", "llm"),
        ("llm1", "llm"),
        ("diffusion", "diffusion"),
    ]
    .iter()
    .enumerate()
    {
        t.push_str(&format!(
            "[[actor]]\nname = \"{name}\"\ncomponent = \"{comp}\"\ndevice = \"cpu\"\n"
        ));
        if let Some(r) = ranks[i] {
            t.push_str(&format!("rank = {r}\n"));
        }
    }
    t
}

#[test]
fn ranks_are_named_or_split_and_data_parallel_multiplies_the_world() {
    let c = embedded_tiny().config;
    let parse = |text: &str| Topology::parse(text, "t.toml", &c, 0);
    // Named ranks.
    let t = parse(&four_actors("", [Some(0), Some(0), Some(1), Some(1)])).unwrap();
    let ranks: Vec<u32> = t.actors.iter().map(|a| a.rank).collect();
    assert_eq!(
        (ranks, t.pipeline_ranks, t.data_parallel, t.world_size()),
        (vec![0, 0, 1, 1], 2, 1, 2)
    );
    // `ranks = 3` splits the pipeline order (vision, llm0, llm1, diffusion) into 2 + 1 + 1.
    let t = parse(&four_actors("ranks = 3\ndata_parallel = 2", [None; 4])).unwrap();
    let ranks: Vec<u32> = t.actors.iter().map(|a| a.rank).collect();
    assert_eq!((ranks, t.world_size()), (vec![0, 0, 1, 2], 6));
    assert!(t.check_world(6).is_ok());
    assert_eq!(
        t.check_world(4).unwrap_err().to_string(),
        "t.toml: WORLD_SIZE is 4 but topology \"t\" needs 6 processes (data_parallel 2 × 3 rank(s) per pipeline)"
    );
    // No ranks at all: one process.
    let t = parse(&four_actors("", [None; 4])).unwrap();
    assert_eq!((t.pipeline_ranks, t.world_size()), (1, 1));
    let err = |text: &str| parse(text).unwrap_err().to_string();
    assert_eq!(
        err(&four_actors("", [Some(0), None, Some(1), Some(1)])),
        "t.toml: actor[1].rank: missing; either every actor names its rank or none does (then `ranks` splits them)"
    );
    assert_eq!(
        err(&four_actors("", [Some(0), Some(0), Some(2), Some(2)])),
        "t.toml: rank 1 hosts no actor; ranks must be 0..2 with at least one actor each"
    );
    assert_eq!(
        err(&four_actors(
            "ranks = 3",
            [Some(0), Some(0), Some(1), Some(1)]
        )),
        "t.toml: ranks: 3, but the actors name ranks 0..1; remove `ranks` or make them agree"
    );
    assert_eq!(
        err(&four_actors("ranks = 5", [None; 4])),
        "t.toml: ranks: 5 ranks for 4 actors; expected 1 to 4 (each rank hosts at least one actor)"
    );
    assert_eq!(
        err(&four_actors("data_parallel = 0", [None; 4])),
        "t.toml: data_parallel: expected at least 1 replica"
    );
}
