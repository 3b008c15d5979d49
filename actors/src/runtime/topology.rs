//! Topologies: which actor runs which component on which device. A topology file lists `[[actor]]`
//! entries; the vision encoder and the diffusion decoder are placed exactly once, the LLM one or more
//! times as pipeline shards with layer ranges `[start, end)` that cover the model's layers exactly once,
//! in order. Shards may leave `layers` out, and the layers are then split evenly. Across processes each
//! actor names the `rank` that hosts it (or the file says `ranks = N` and the actors, in pipeline order,
//! are split over N ranks), and `data_parallel = R` replicates that pipeline R times: the world is
//! R × N processes, rank = replica × N + pipeline rank.

use std::fmt;
use std::ops::Range;
use std::path::Path;

use deem::config::DeemConfig;
use deem::params::{self, ComponentParams};
use deem::DeviceSpec;
use serde::Deserialize;

/// The topology compiled into the binary: `topologies/cpu.toml`.
pub const EMBEDDED_CPU: &str = include_str!("../../../topologies/cpu.toml");
pub const EMBEDDED_CPU_NAME: &str = "topologies/cpu.toml (embedded default)";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Component {
    Vision,
    Llm,
    Diffusion,
}

impl Component {
    pub const ALL: [Component; 3] = [Component::Vision, Component::Llm, Component::Diffusion];

    pub fn as_str(self) -> &'static str {
        match self {
            Component::Vision => "vision",
            Component::Llm => "llm",
            Component::Diffusion => "diffusion",
        }
    }
}

impl fmt::Display for Component {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct TopologyFile {
    name: String,
    #[serde(default)]
    description: Option<String>,
    /// Ranks one pipeline spans (when the actors name no `rank`).
    #[serde(default)]
    ranks: Option<u32>,
    /// Replicas of the pipeline (data parallelism).
    #[serde(default)]
    data_parallel: Option<u32>,
    #[serde(rename = "actor", default)]
    actors: Vec<ActorSpec>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct ActorSpec {
    name: String,
    component: Component,
    device: String,
    #[serde(default)]
    layers: Option<[i64; 2]>,
    /// The process (pipeline rank) hosting this actor.
    #[serde(default)]
    rank: Option<u32>,
}

/// One actor, placed and sized.
#[derive(Debug, Clone, PartialEq)]
pub struct Placement {
    pub name: String,
    pub component: Component,
    pub device: DeviceSpec,
    /// LLM layers `[start, end)` this shard owns (LLM shards only).
    pub layers: Option<Range<i64>>,
    /// Parameters the actor owns.
    pub params: i64,
    /// Estimated bytes of those parameters in the configured dtype.
    pub param_bytes: u64,
    /// The pipeline rank (process within one replica) hosting the actor.
    pub rank: u32,
}

/// A validated topology for one configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Topology {
    pub name: String,
    pub description: Option<String>,
    /// How the file is named in messages.
    pub origin: String,
    pub actors: Vec<Placement>,
    /// Processes one pipeline spans.
    pub pipeline_ranks: u32,
    /// Replicas of the pipeline.
    pub data_parallel: u32,
}

/// Every problem of a topology file, one per line, each starting with the file.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub struct TopologyError {
    pub origin: String,
    pub problems: Vec<String>,
}

impl fmt::Display for TopologyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let lines: Vec<String> = self
            .problems
            .iter()
            .map(|p| format!("{}: {p}", self.origin))
            .collect();
        f.write_str(&lines.join("\n"))
    }
}

impl Topology {
    /// The placements in pipeline order: vision, the LLM shards by their first layer, diffusion. Training
    /// and serving both wire their actors in this order.
    pub fn pipeline_order(&self) -> Vec<&Placement> {
        let mut order: Vec<&Placement> = self.actors.iter().collect();
        order.sort_by_key(|a| {
            let rank = match a.component {
                Component::Vision => 0,
                Component::Llm => 1,
                Component::Diffusion => 2,
            };
            (rank, a.layers.as_ref().map_or(0, |r| r.start))
        });
        order
    }

    /// Intra-op threads of an actor's compute thread: the actors placed on the CPU split its cores, so
    /// they compute side by side instead of fighting over every core; `None` (libtorch's default) for an
    /// actor on a GPU. Every actor runs in this one process.
    pub fn cpu_threads(&self, placement: &Placement) -> Option<i32> {
        self.cpu_threads_in(placement, None)
    }

    /// [`Self::cpu_threads`] when the actors are spread over processes: `Some(procs)` counts only the
    /// CPU actors of the placement's rank, and the node's cores are shared by `procs` processes.
    pub fn cpu_threads_in(&self, placement: &Placement, procs: Option<usize>) -> Option<i32> {
        let on_cpu = self
            .actors
            .iter()
            .filter(|a| {
                a.device == DeviceSpec::Cpu && (procs.is_none() || a.rank == placement.rank)
            })
            .count()
            .max(1)
            * procs.unwrap_or(1).max(1);
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        (placement.device == DeviceSpec::Cpu).then(|| (cores / on_cpu).max(1) as i32)
    }

    /// Processes the topology needs: data_parallel × ranks per pipeline.
    pub fn world_size(&self) -> u32 {
        self.data_parallel * self.pipeline_ranks
    }

    /// Checks the launcher's `WORLD_SIZE` against what the topology needs.
    pub fn check_world(&self, world_size: i64) -> Result<(), TopologyError> {
        if world_size == self.world_size() as i64 {
            return Ok(());
        }
        Err(TopologyError {
            origin: self.origin.clone(),
            problems: vec![format!(
                "WORLD_SIZE is {world_size} but topology {:?} needs {} processes (data_parallel {} × {} rank(s) per pipeline)",
                self.name,
                self.world_size(),
                self.data_parallel,
                self.pipeline_ranks
            )],
        })
    }

    /// Reads and validates a topology file for `cfg` on a machine with `cuda_devices` CUDA devices.
    pub fn load(path: &Path, cfg: &DeemConfig, cuda_devices: usize) -> Result<Self, TopologyError> {
        let origin = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| TopologyError {
            origin: origin.clone(),
            problems: vec![format!("cannot read the topology file: {e}")],
        })?;
        Self::parse(&text, &origin, cfg, cuda_devices)
    }

    /// Parses and validates topology text; `origin` names it in errors.
    pub fn parse(
        text: &str,
        origin: &str,
        cfg: &DeemConfig,
        cuda_devices: usize,
    ) -> Result<Self, TopologyError> {
        let fail = |problems: Vec<String>| TopologyError {
            origin: origin.to_string(),
            problems,
        };
        let de = toml::Deserializer::parse(text).map_err(|e| {
            fail(vec![format!(
                "invalid TOML: {}",
                e.to_string().trim_end().replace('\n', "\n    ")
            )])
        })?;
        let file: TopologyFile = serde_path_to_error::deserialize(de).map_err(|e| {
            let (key, msg) =
                crate::settings::serde_problem(&e.path().to_string(), e.inner().message());
            fail(vec![if key.is_empty() {
                msg
            } else {
                format!("{key}: {msg}")
            }])
        })?;
        let mut problems = Vec::new();
        let mut placed = place(&file, cfg, cuda_devices, &mut problems);
        let pipeline_ranks = assign_ranks(&file, &mut placed, &mut problems);
        let data_parallel = file.data_parallel.unwrap_or(1);
        if data_parallel == 0 {
            problems.push("data_parallel: expected at least 1 replica".into());
        }
        if !problems.is_empty() {
            return Err(fail(problems));
        }
        Ok(Topology {
            name: file.name,
            description: file.description,
            origin: origin.to_string(),
            actors: placed,
            pipeline_ranks,
            data_parallel,
        })
    }

    /// Distinct devices the topology uses, in order.
    pub fn devices(&self) -> Vec<DeviceSpec> {
        let mut d: Vec<DeviceSpec> = self.actors.iter().map(|a| a.device).collect();
        d.sort();
        d.dedup();
        d
    }
}

/// The device an actor names, or (with its problem recorded) the CPU in its place.
fn checked_device(
    at: &str,
    spec: &str,
    cuda_devices: usize,
    problems: &mut Vec<String>,
) -> DeviceSpec {
    let device: DeviceSpec = match spec.parse() {
        Ok(d) => d,
        Err(e) => {
            problems.push(format!("{at}.device: {e}"));
            return DeviceSpec::Cpu;
        }
    };
    match device {
        DeviceSpec::Cuda(_) if cuda_devices == 0 => problems.push(format!(
            "{at}.device: \"{spec}\" is not available: this machine has no CUDA devices; use device = \"cpu\""
        )),
        DeviceSpec::Cuda(n) if n >= cuda_devices => problems.push(format!(
            "{at}.device: \"{spec}\" is out of range: this machine has {cuda_devices} CUDA device(s) \
             (cuda:0..cuda:{}); use one of them or device = \"cpu\"",
            cuda_devices - 1
        )),
        d => return d,
    }
    DeviceSpec::Cpu
}

fn place(
    file: &TopologyFile,
    cfg: &DeemConfig,
    cuda_devices: usize,
    problems: &mut Vec<String>,
) -> Vec<Placement> {
    let label = |i: usize| format!("actor[{i}] ({:?})", file.actors[i].name);
    if file.actors.is_empty() {
        problems.push(
            "no [[actor]] entries; expected one per component (vision, llm, diffusion)".to_string(),
        );
        return Vec::new();
    }

    let mut devices = Vec::with_capacity(file.actors.len());
    for (i, a) in file.actors.iter().enumerate() {
        let at = format!("actor[{i}]");
        if a.name.trim().is_empty() {
            problems.push(format!("{at}.name: expected a non-empty name"));
        }
        if let Some(j) = file.actors[..i].iter().position(|b| b.name == a.name) {
            problems.push(format!(
                "{at}.name: {:?} is used by actor[{j}] too; actor names must be unique",
                a.name
            ));
        }
        devices.push(checked_device(&at, &a.device, cuda_devices, problems));
        if a.component != Component::Llm && a.layers.is_some() {
            problems.push(format!(
                "{at}.layers: only llm shards have a layer range; remove it from this {} actor",
                a.component
            ));
        }
    }

    for c in Component::ALL {
        let at: Vec<usize> = (0..file.actors.len())
            .filter(|&i| file.actors[i].component == c)
            .collect();
        if at.is_empty() {
            problems.push(format!(
                "component {c} is not placed; add an [[actor]] with component = \"{c}\""
            ));
        } else if c != Component::Llm && at.len() > 1 {
            let names: Vec<String> = at.iter().map(|&i| label(i)).collect();
            problems.push(format!(
                "component {c} is placed {} times ({}); place it exactly once",
                at.len(),
                names.join(", ")
            ));
        }
    }

    let ranges = shard_ranges(file, cfg.llm.num_hidden_layers, problems, &label);
    let p = ComponentParams::of(cfg);
    let dtype = cfg.model.dtype.size_bytes();
    let mut llm_seen = 0;
    file.actors
        .iter()
        .zip(devices)
        .map(|(a, device)| {
            let (layers, n) = match a.component {
                Component::Vision => (None, p.vision),
                Component::Diffusion => (None, p.diffusion),
                Component::Llm => {
                    let r = ranges.get(llm_seen).cloned().unwrap_or(0..0);
                    llm_seen += 1;
                    let n = params::llm_shard(&cfg.llm, r.start, r.end);
                    (Some(r), n)
                }
            };
            Placement {
                name: a.name.clone(),
                component: a.component,
                device,
                layers,
                params: n,
                param_bytes: n as u64 * dtype,
                rank: 0,
            }
        })
        .collect()
}

/// Sets each placement's pipeline rank (named by the actor, or the pipeline order split evenly over
/// `ranks`); returns the ranks one pipeline spans.
fn assign_ranks(file: &TopologyFile, placed: &mut [Placement], problems: &mut Vec<String>) -> u32 {
    if placed.is_empty() || placed.len() != file.actors.len() {
        return 1;
    }
    let named = file.actors.iter().filter(|a| a.rank.is_some()).count();
    if named == 0 {
        let n = file.ranks.unwrap_or(1);
        if n == 0 || n as usize > placed.len() {
            problems.push(format!(
                "ranks: {n} ranks for {} actors; expected 1 to {} (each rank hosts at least one actor)",
                placed.len(),
                placed.len()
            ));
            return 1;
        }
        // Pipeline order, split into n contiguous runs of near-equal length.
        let mut order: Vec<usize> = (0..placed.len()).collect();
        let key = |p: &Placement| {
            let c = match p.component {
                Component::Vision => 0,
                Component::Llm => 1,
                Component::Diffusion => 2,
            };
            (c, p.layers.as_ref().map_or(0, |r| r.start))
        };
        order.sort_by_key(|&i| key(&placed[i]));
        let (base, extra) = (placed.len() / n as usize, placed.len() % n as usize);
        let mut at = 0;
        for r in 0..n as usize {
            let len = base + usize::from(r < extra);
            for &i in &order[at..at + len] {
                placed[i].rank = r as u32;
            }
            at += len;
        }
        return n;
    }
    if named != file.actors.len() {
        let missing = file
            .actors
            .iter()
            .position(|a| a.rank.is_none())
            .unwrap_or(0);
        problems.push(format!(
            "actor[{missing}].rank: missing; either every actor names its rank or none does (then `ranks` splits them)"
        ));
        return 1;
    }
    for (p, a) in placed.iter_mut().zip(&file.actors) {
        p.rank = a.rank.unwrap_or(0);
    }
    let n = placed.iter().map(|p| p.rank).max().unwrap_or(0) + 1;
    for r in 0..n {
        if !placed.iter().any(|p| p.rank == r) {
            problems.push(format!(
                "rank {r} hosts no actor; ranks must be 0..{} with at least one actor each",
                n - 1
            ));
        }
    }
    if let Some(k) = file.ranks.filter(|&k| k != n) {
        problems.push(format!(
            "ranks: {k}, but the actors name ranks 0..{}; remove `ranks` or make them agree",
            n - 1
        ));
    }
    n
}

/// Layer ranges of the LLM shards in file order: as written (checked), or split evenly when none is.
fn shard_ranges(
    file: &TopologyFile,
    num_layers: i64,
    problems: &mut Vec<String>,
    label: &dyn Fn(usize) -> String,
) -> Vec<Range<i64>> {
    let shards: Vec<usize> = (0..file.actors.len())
        .filter(|&i| file.actors[i].component == Component::Llm)
        .collect();
    let given = shards
        .iter()
        .filter(|&&i| file.actors[i].layers.is_some())
        .count();
    if shards.is_empty() {
        return Vec::new();
    }
    if given == 0 {
        let k = shards.len() as i64;
        if k > num_layers {
            problems.push(format!(
                "{k} llm shards but the model has {num_layers} layers (llm.num_hidden_layers); \
                 place at most one shard per layer"
            ));
            return Vec::new();
        }
        let (base, extra) = (num_layers / k, num_layers % k);
        let mut start = 0;
        return (0..k)
            .map(|s| {
                let end = start + base + i64::from(s < extra);
                let r = start..end;
                start = end;
                r
            })
            .collect();
    }
    if given != shards.len() {
        let missing = shards
            .iter()
            .find(|&&i| file.actors[i].layers.is_none())
            .copied()
            .unwrap_or(0);
        problems.push(format!(
            "actor[{missing}].layers: missing; either every llm shard gives its layers or none does \
             (then the layers are split evenly)"
        ));
        return Vec::new();
    }
    let mut out = Vec::with_capacity(shards.len());
    let mut prev: Option<(usize, i64)> = None;
    for &i in &shards {
        let [start, end] = file.actors[i].layers.unwrap_or([0, 0]);
        let at = format!("actor[{i}].layers");
        if start >= end || start < 0 {
            problems.push(format!(
                "{at}: [{start}, {end}) is empty; expected [start, end) with 0 <= start < end"
            ));
        } else {
            match prev {
                None if start != 0 => problems.push(format!(
                    "{at}: the first llm shard must start at layer 0, found [{start}, {end})"
                )),
                Some((j, prev_end)) if start != prev_end => problems.push(format!(
                    "{at}: [{start}, {end}) starts at layer {start}, but the previous shard {} ends at layer \
                     {prev_end}; shards must cover every layer exactly once, in order",
                    label(j)
                )),
                _ => {}
            }
        }
        prev = Some((i, end));
        out.push(start..end);
    }
    if let Some((i, end)) = prev {
        if end != num_layers {
            problems.push(format!(
                "actor[{i}].layers: the last llm shard ends at layer {end}, but the model has {num_layers} \
                 layers (llm.num_hidden_layers); shards must cover every layer exactly once"
            ));
        }
    }
    out
}

fn human_count(n: i64) -> String {
    let n = n as f64;
    if n >= 1e9 {
        format!("{:.2} B", n / 1e9)
    } else if n >= 1e6 {
        format!("{:.2} M", n / 1e6)
    } else if n >= 1e3 {
        format!("{:.1} K", n / 1e3)
    } else {
        format!("{n}")
    }
}

/// Bytes as MiB/GiB for tables.
pub fn human_bytes(b: u64) -> String {
    let b = b as f64;
    const MIB: f64 = 1024.0 * 1024.0;
    if b >= 1024.0 * MIB {
        format!("{:.2} GiB", b / (1024.0 * MIB))
    } else {
        format!("{:.2} MiB", b / MIB)
    }
}

impl Topology {
    /// The placement table `deem topology check` prints.
    pub fn table(&self) -> String {
        let header = [
            "rank",
            "actor",
            "component",
            "device",
            "layers",
            "parameters",
            "param memory",
        ];
        let mut rows: Vec<[String; 7]> = self
            .actors
            .iter()
            .map(|a| {
                [
                    a.rank.to_string(),
                    a.name.clone(),
                    a.component.to_string(),
                    a.device.to_string(),
                    a.layers
                        .as_ref()
                        .map_or("-".to_string(), |r| format!("[{}, {})", r.start, r.end)),
                    human_count(a.params),
                    human_bytes(a.param_bytes),
                ]
            })
            .collect();
        let total: i64 = self.actors.iter().map(|a| a.params).sum();
        let bytes: u64 = self.actors.iter().map(|a| a.param_bytes).sum();
        rows.push([
            "".into(),
            "total".into(),
            "".into(),
            "".into(),
            "".into(),
            human_count(total),
            human_bytes(bytes),
        ]);
        let rows: Vec<Vec<String>> = rows.into_iter().map(Vec::from).collect();
        text_table(&header, &rows, 5)
    }
}

/// A plain-text table: the header, a rule, the rows; columns from `numeric_from` on right-aligned
/// (numbers), the others left-aligned (names).
pub fn text_table(header: &[&str], rows: &[Vec<String>], numeric_from: usize) -> String {
    let mut width: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (w, c) in width.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: &[String]| {
        let mut s = String::new();
        for (i, (c, &w)) in cells.iter().zip(&width).enumerate() {
            if i >= numeric_from {
                s.push_str(&format!("{c:>w$}  "));
            } else {
                s.push_str(&format!("{c:<w$}  "));
            }
        }
        s.trim_end().to_string() + "\n"
    };
    let mut out = line(&header.iter().map(|h| h.to_string()).collect::<Vec<_>>());
    out.push_str(&line(
        &width.iter().map(|&w| "-".repeat(w)).collect::<Vec<_>>(),
    ));
    for r in rows {
        out.push_str(&line(r));
    }
    out
}

/// The memory of a device in bytes: a CUDA device's total, the machine's (`MemTotal`) for the CPU.
pub fn device_memory(device: &DeviceSpec) -> Option<u64> {
    match tch::Device::from(*device) {
        tch::Device::Cuda(i) => crate::dist::c10d::cuda_memory(i).map(|(_, total)| total),
        _ => std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
            let kb: u64 = m
                .lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))?
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse()
                .ok()?;
            Some(kb * 1024)
        }),
    }
}
