//! The placement planner (`deem plan`, `pipeline::plan`): its accounting of weights, gradients and
//! optimizer state against the tensors a trainer actually holds, the schedule timeline against the
//! textbook makespan, the balancer, `deem bench layers` feeding it, and a placement that does not fit
//! refused before anything starts. (How close its predictions come to a measured run is `make bench`'s
//! `plan` figure, not a timed test.)

mod common;

#[path = "common/runtime.rs"]
mod rt;
use common::scratch;
use rt::*;

use deem::config::{DType, DeemConfig, PipelineSchedule, Stage};
use deem_actors::pipeline::plan::{self, Costs, Piece};
use deem_actors::pipeline::schedule;
use deem_actors::runtime::topology::Topology;

fn tiny() -> DeemConfig {
    toml::from_str(include_str!("../configs/tiny.toml")).unwrap()
}

fn costs(layer: Piece, head: Piece) -> Costs {
    Costs {
        source: "test".into(),
        rows: 2,
        tokens: 10,
        images: 1,
        nip_images: 1,
        vision: layer,
        llm_embed: Piece::default(),
        llm_layer: layer,
        llm_head: head,
        diffusion: layer,
    }
}

fn piece(f: f64, b: f64) -> Piece {
    Piece {
        forward_s: f,
        backward_s: b,
        activation_bytes: 1000.0,
        optimizer_s: 0.0,
    }
}

#[test]
fn weights_gradients_and_optimizer_state_are_the_trainers_own_bytes() {
    for (stage, dtype) in [
        (Stage::I, DType::F32),
        (Stage::II, DType::Bf16),
        (Stage::III, DType::F16),
    ] {
        let mut c = tiny();
        c.train.stage = stage;
        c.model.dtype = dtype;
        let p = plan::plan(
            &c,
            &cpu_topology(&c),
            &costs(piece(1.0, 1.0), piece(1.0, 1.0)),
        );
        let t = deem::train::Trainer::new(&c, tch::Device::Cpu).unwrap();
        let numel = |t: &tch::Tensor| t.numel() as f64;
        let bytes = |t: &tch::Tensor| (t.numel() * t.kind().elt_size_in_bytes()) as f64;
        let vars = t.vs.variables();
        let params: f64 = vars.values().map(numel).sum();
        let weights: f64 = vars.values().map(bytes).sum();
        let trainable: f64 = t.opt.params.iter().map(|q| numel(&q.tensor)).sum();
        let optimizer: f64 = t
            .opt
            .params
            .iter()
            .map(|q| {
                bytes(&q.exp_avg) + bytes(&q.exp_avg_sq) + q.master.as_ref().map_or(0.0, bytes)
            })
            .sum();
        let sum = |f: fn(&plan::ActorPlan) -> f64| p.actors.iter().map(f).sum::<f64>();
        let what = format!("{stage:?} {dtype}");
        assert_eq!(sum(|a| a.params), params, "{what}: parameters");
        assert_eq!(
            sum(|a| a.trainable),
            trainable,
            "{what}: trainable parameters"
        );
        assert_eq!(sum(|a| a.weights_bytes), weights, "{what}: weights");
        assert_eq!(
            sum(|a| a.optimizer_bytes),
            optimizer,
            "{what}: optimizer state"
        );
        // A gradient per trainable variable in its dtype, plus its fp32 sum in mixed precision.
        let grads = trainable * dtype.size_bytes() as f64
            + if dtype == DType::F32 {
                0.0
            } else {
                trainable * 4.0
            };
        assert_eq!(sum(|a| a.grad_bytes), grads, "{what}: gradients");
    }
}

#[test]
fn equal_stages_take_the_textbook_makespan_and_the_schedule_sets_the_activations_in_flight() {
    // Four actors on four devices, forward 1 s and backward 2 s each: GPipe and 1F1B both take
    // (m + p − 1)(f + b); GPipe keeps all m microbatches on every actor, 1F1B at most p − i.
    let mut c = tiny();
    c.train.batch_size = 8;
    c.train.microbatches = 4;
    let text = (0..4)
        .map(|i| {
            let (comp, layers) = match i {
                0 => ("vision", String::new()),
                3 => ("diffusion", String::new()),
                i => ("llm", format!("layers = [{}, {}]\n", (i - 1) * 2, i * 2)),
            };
            format!("[[actor]]\nname = \"a{i}\"\ncomponent = \"{comp}\"\ndevice = \"cuda:{i}\"\n{layers}")
        })
        .collect::<Vec<_>>()
        .join("\n");
    let topo = Topology::parse(&format!("name = \"four\"\n{text}"), "four.toml", &c, 4).unwrap();
    // The LLM shards carry one layer cost per layer: give each layer half, so every actor costs 1 + 2.
    let mut k = costs(piece(1.0, 2.0), Piece::default());
    k.llm_layer = piece(0.5, 1.0);
    k.rows = 2;
    for (sched, in_flight) in [
        (PipelineSchedule::Gpipe, vec![4, 4, 4, 4]),
        (PipelineSchedule::OneFOneB, vec![4, 3, 2, 1]),
    ] {
        c.train.schedule = sched;
        let p = plan::plan(&c, &topo, &k);
        assert_eq!(p.timeline_s, (4.0 + 4.0 - 1.0) * 3.0, "{sched:?}");
        let got: Vec<u32> = p.actors.iter().map(|a| a.in_flight).collect();
        assert_eq!(got, in_flight, "{sched:?}");
        let ops = schedule::build(sched, 4, 4);
        assert_eq!(
            plan::timeline(&p.actors, &ops),
            p.timeline_s,
            "one device per actor: the timeline alone"
        );
    }
    // All four on one GPU: they take turns, so the step is their summed work.
    let same = ["cuda:1", "cuda:2", "cuda:3"]
        .iter()
        .fold(text.clone(), |t, d| t.replace(d, "cuda:0"));
    let one = Topology::parse(&format!("name = \"one\"\n{same}"), "one.toml", &c, 4).unwrap();
    let p = plan::plan(&c, &one, &k);
    assert_eq!(p.timeline_s, 4.0 * 4.0 * 3.0);
}

#[test]
fn balancing_moves_layers_off_the_shard_with_the_heavy_head() {
    let c = tiny();
    // The head costs as much as three layers: the last shard should keep fewer layers.
    let k = costs(piece(1.0, 1.0), piece(3.0, 3.0));
    let topo = cpu_topology(&c);
    let balanced = plan::balance(&c, &topo, &k);
    let ranges: Vec<std::ops::Range<i64>> = balanced
        .pipeline_order()
        .iter()
        .filter_map(|a| a.layers.clone())
        .collect();
    assert_eq!(ranges, vec![0..3, 3..4], "{ranges:?}");
    let shard_time = |t: &Topology| {
        plan::plan(&c, t, &k)
            .actors
            .iter()
            .filter(|a| a.layers.is_some())
            .map(|a| a.forward_s + a.backward_s)
            .fold(0.0, f64::max)
    };
    assert!(shard_time(&balanced) < shard_time(&topo));
    // The parameter counts follow the layers.
    let params: i64 = balanced.actors.iter().map(|a| a.params).sum();
    assert_eq!(params, topo.actors.iter().map(|a| a.params).sum::<i64>());
}

#[test]
fn bench_layers_feeds_deem_plan_and_a_placement_that_does_not_fit_is_refused() {
    let dir = scratch("plan");
    let file = dir.join("costs.json");
    let (ok, _, err) = deem(
        &[
            "bench",
            "layers",
            "--out",
            file.to_str().unwrap(),
            "--repeats",
            "1",
        ],
        &[],
    );
    assert!(ok, "{err}");
    let k = Costs::load(&file).unwrap();
    // Measured parts take time and keep bytes; the head and the embedding are differences of two
    // measurements (a one-layer shard with them, less a layer), so their times can round to 0 on a busy
    // machine, never below.
    for (name, p) in [
        ("vision", k.vision),
        ("llm_layer", k.llm_layer),
        ("diffusion", k.diffusion),
    ] {
        assert!(p.forward_s > 0.0 && p.backward_s > 0.0, "{name}: {p:?}");
        assert!(p.activation_bytes > 0.0, "{name}: {p:?}");
    }
    for (name, p) in [("llm_head", k.llm_head), ("llm_embed", k.llm_embed)] {
        assert!(p.forward_s >= 0.0 && p.backward_s >= 0.0, "{name}: {p:?}");
        assert!(p.activation_bytes >= 0.0, "{name}: {p:?}");
    }
    // The head keeps the vocabulary's log-probabilities (bytes in this process alone: no noise).
    assert!(k.llm_head.activation_bytes > 0.0, "{:?}", k.llm_head);
    let (ok, out, err) = deem(&["plan", "--costs", file.to_str().unwrap()], &[]);
    assert!(ok, "{err}");
    assert!(out.contains("llm0") && out.contains("step: "), "{out}");
    assert!(out.contains("costs: measured on"), "{out}");

    // DEEM-7B's stage I at 8 microbatches on eight 80 GiB GPUs: the LLM shards cannot hold their
    // activations; refused naming each device, what it needs and what it has. 64 microbatches fit.
    let plan_7b = |extra: &[&str]| {
        let mut args = vec![
            "plan",
            "--config",
            "configs/deem-7b.toml",
            "--topology",
            "topologies/gpu-8.toml",
            "--assume-cuda-devices",
            "8",
            "--device-memory-gib",
            "80",
        ];
        args.extend_from_slice(extra);
        deem(&args, &[])
    };
    let (ok, out, err) = plan_7b(&[]);
    assert!(!ok, "{out}");
    assert!(
        err.contains("the placement does not fit: cuda:1 (llm0) needs ")
            && err.contains(" but has 80.00 GiB"),
        "{err}"
    );
    let (ok, out, err) = plan_7b(&["--set", "train.microbatches=64"]);
    assert!(ok, "{err}");
    assert!(out.contains("ok: the placement fits"), "{out}");
    let _ = std::fs::remove_dir_all(&dir);
}
