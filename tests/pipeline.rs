//! The core contract of the actor runtime: pipelined training over the DAG (vision → LLM shards →
//! diffusion, vision → diffusion) with GPipe and 1F1B equals the single-process reference trainer —
//! same seed, data and microbatch split → the same per-step losses and parameters.

mod common;
#[path = "common/runtime.rs"]
mod rt;

use std::collections::BTreeMap;
use std::path::Path;

use common::read_all;
use deem::config::{DeemConfig, PipelineSchedule, Stage};
use deem::data::batches::SyntheticBatches;
use deem::models::deem::Batch;
use deem::train::Trainer;
use deem_actors::pipeline::PipelineTrainer;
use deem_actors::runtime::topology::Topology;
use rt::{cpu_topology, run_steps};
use tch::{Device, Tensor};

/// Pieces computed on separate actors are summed in a different order than in one graph (gradient
/// accumulation across the DAG's two paths into the vision actor, the global norm summed per actor),
/// so the results agree to float rounding, not bit for bit.
const TOL: f64 = 1e-5;

fn cfg(schedule: PipelineSchedule, stage: Stage) -> DeemConfig {
    let mut c: DeemConfig = toml::from_str(include_str!("../configs/tiny.toml")).unwrap();
    c.train.schedule = schedule;
    c.train.stage = stage;
    c.train.microbatches = 4;
    c.train.warmup_steps = 0;
    c
}

fn reference(
    c: &DeemConfig,
    steps: u64,
) -> (Vec<deem::train::StepReport>, BTreeMap<String, Tensor>) {
    reference_on(c, steps, |i| SyntheticBatches::new(c, 9).batch(i))
}

fn reference_on(
    c: &DeemConfig,
    steps: u64,
    batch: impl Fn(u64) -> Batch,
) -> (Vec<deem::train::StepReport>, BTreeMap<String, Tensor>) {
    let mut t = Trainer::new(c, Device::Cpu).unwrap();
    let reports = (0..steps).map(|i| t.step(&batch(i)).unwrap()).collect();
    (
        reports,
        t.vs.variables()
            .into_iter()
            .map(|(k, v)| (k, v.detach().copy()))
            .collect(),
    )
}

async fn pipelined(
    c: &DeemConfig,
    steps: u64,
) -> (Vec<deem::train::StepReport>, BTreeMap<String, Tensor>) {
    pipelined_on(c, steps, |i| SyntheticBatches::new(c, 9).batch(i)).await
}

async fn pipelined_on(
    c: &DeemConfig,
    steps: u64,
    batch: impl Fn(u64) -> Batch,
) -> (Vec<deem::train::StepReport>, BTreeMap<String, Tensor>) {
    let mut p = PipelineTrainer::start(c, &cpu_topology(c)).await.unwrap();
    let mut reports = Vec::new();
    for i in 0..steps {
        reports.push(p.step(&batch(i)).await.unwrap());
    }
    let w = p.weights().await.unwrap();
    p.stop().await;
    (reports, w)
}

fn compare(
    name: &str,
    a: &(Vec<deem::train::StepReport>, BTreeMap<String, Tensor>),
    b: &(Vec<deem::train::StepReport>, BTreeMap<String, Tensor>),
) {
    let mut worst_loss = 0f64;
    for (x, y) in a.0.iter().zip(&b.0) {
        for (u, v) in [
            (x.total, y.total),
            (x.ntp, y.ntp),
            (x.nip, y.nip),
            (x.csr, y.csr),
            (x.grad_norm, y.grad_norm),
        ] {
            worst_loss = worst_loss.max((u - v).abs());
        }
        assert_eq!(x.lr, y.lr);
    }
    assert_eq!(
        a.1.len(),
        b.1.len(),
        "{name}: the pipeline owns every parameter exactly once"
    );
    let mut worst_param = 0f64;
    for (k, v) in &a.1 {
        let w =
            b.1.get(k)
                .unwrap_or_else(|| panic!("{name}: {k} missing from the pipeline"));
        worst_param = worst_param.max((v - w).abs().max().double_value(&[]));
    }
    eprintln!("{name}: max |Δ| losses/grad-norm {worst_loss:.3e}, parameters {worst_param:.3e}");
    assert!(
        worst_loss <= TOL && worst_param <= TOL,
        "{name}: {worst_loss} {worst_param}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_training_equals_the_reference_trainer() {
    for stage in [Stage::I, Stage::II] {
        let base = cfg(PipelineSchedule::Gpipe, stage);
        let want = reference(&base, 5);
        assert!(want.0.iter().all(|r| r.total.is_finite()));
        for schedule in [PipelineSchedule::Gpipe, PipelineSchedule::OneFOneB] {
            let c = cfg(schedule, stage);
            let got = pipelined(&c, 5).await;
            compare(&format!("{stage:?} {schedule:?}"), &want, &got);
        }
    }
}

/// Activation recomputation runs forwards again, with autograd, right before their backward: the whole
/// stage (`train.recompute = "full"`) or the first decoder layers of each LLM shard
/// (`{ layers = N }`). The same float operations, so the same losses and weights bit for bit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recomputing_activations_gives_bit_identical_training() {
    use deem::config::Recompute;
    // Recomputations per step: 4 stages × 4 microbatches under `full`; the 2 LLM shards × 4
    // microbatches per layer span.
    for (stage, schedule, mode, per_step) in [
        (Stage::I, PipelineSchedule::Gpipe, Recompute::Full, 16),
        (Stage::II, PipelineSchedule::OneFOneB, Recompute::Full, 16),
        (
            Stage::I,
            PipelineSchedule::OneFOneB,
            Recompute::Layers(1),
            8,
        ),
    ] {
        let keep = cfg(schedule, stage);
        let mut again = keep.clone();
        again.train.recompute = mode;
        let (a, b) = (pipelined(&keep, 3).await, pipelined(&again, 3).await);
        let count = |c: &DeemConfig| {
            let c = c.clone();
            async move {
                let mut p = PipelineTrainer::start(&c, &cpu_topology(&c)).await.unwrap();
                p.step(&SyntheticBatches::new(&c, 9).batch(0))
                    .await
                    .unwrap();
                let n = p.last_timing.as_ref().unwrap().recomputed;
                p.stop().await;
                n
            }
        };
        assert_eq!((count(&keep).await, count(&again).await), (0, per_step));
        for (x, y) in a.0.iter().zip(&b.0) {
            assert_eq!(
                (x.total, x.ntp, x.nip, x.csr, x.grad_norm),
                (y.total, y.ntp, y.nip, y.csr, y.grad_norm),
                "{stage:?} {schedule:?} {mode:?}"
            );
        }
        assert_eq!(a.1.len(), b.1.len());
        for (k, v) in &a.1 {
            assert!(
                v.equal(&b.1[k]),
                "{stage:?} {schedule:?} {mode:?}: {k} differs"
            );
        }
    }
}

/// Synthetic batches as region input: image `j` of a batch keeps a band of rows that depends on `j`.
fn region_batch(c: &DeemConfig, i: u64) -> Batch {
    let mut b = SyntheticBatches::new(c, 9).batch(i);
    let (n, s) = (b.pixels.size()[0], b.pixels.size()[2]);
    let m = Tensor::zeros([n, 1, s, s], (tch::Kind::Float, Device::Cpu));
    for j in 0..n {
        let _ = m.get(j).narrow(1, s * (j % 4) / 8, s / 2).fill_(1.0);
    }
    b.masks = Some(m);
    b
}

/// Region input (masks through the vision actor's extractor, region-masked CSR on the diffusion actor)
/// trains the same through the pipeline as in one process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_region_training_equals_the_reference_trainer() {
    for stage in [Stage::II, Stage::III] {
        let c = cfg(PipelineSchedule::OneFOneB, stage);
        let want = reference_on(&c, 3, |i| region_batch(&c, i));
        let plain = reference(&c, 1);
        assert!(
            (want.0[0].ntp - plain.0[0].ntp).abs() > 1e-4,
            "{stage:?}: the masks change the losses"
        );
        let got = pipelined_on(&c, 3, |i| region_batch(&c, i)).await;
        compare(&format!("{stage:?} regions"), &want, &got);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resuming_from_a_checkpoint_equals_training_straight_through_even_on_another_topology() {
    let c = cfg(PipelineSchedule::OneFOneB, Stage::I);
    let root = std::env::temp_dir().join(format!("deem-resume-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);

    let mut straight = PipelineTrainer::start(&c, &cpu_topology(&c)).await.unwrap();
    run_steps(&mut straight, &c, 6).await;
    let want = straight
        .save_checkpoint(&root.join("straight"), "cpu")
        .await
        .unwrap();
    straight.stop().await;

    let mut first = PipelineTrainer::start(&c, &cpu_topology(&c)).await.unwrap();
    run_steps(&mut first, &c, 3).await;
    first
        .save_checkpoint(&root.join("resumed"), "cpu")
        .await
        .unwrap();
    first.stop().await;
    // A crash while writing the next checkpoint leaves a partial directory behind.
    let partial = root.join("resumed/checkpoints/step-4.tmp");
    std::fs::create_dir_all(&partial).unwrap();
    std::fs::write(
        partial.join("vision.safetensors"),
        b"\x08\x00\x00\x00\x00\x00\x00\x00{\"a\":",
    )
    .unwrap();

    // Resume on three LLM shards instead of two: parameters are keyed by global names.
    let three = format!(
        "name = \"three\"\n{}",
        [
            "vision:vision:",
            "a:llm:[0, 1]",
            "b:llm:[1, 3]",
            "c:llm:[3, 4]",
            "diffusion:diffusion:"
        ]
        .iter()
        .map(|spec| {
            let parts: Vec<&str> = spec.split(':').collect();
            let layers = if parts[2].is_empty() {
                String::new()
            } else {
                format!("layers = {}\n", parts[2])
            };
            format!(
                "[[actor]]\nname = \"{}\"\ncomponent = \"{}\"\ndevice = \"cpu\"\n{layers}",
                parts[0], parts[1]
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
    );
    let topo3 = Topology::parse(&three, "three.toml", &c, 0).unwrap();
    let mut second = PipelineTrainer::start(&c, &topo3).await.unwrap();
    let manifest = second.resume(&root.join("resumed")).await.unwrap();
    assert_eq!(
        (manifest.step, manifest.data_cursor),
        (3, 3),
        "the partial step-4 is ignored"
    );
    run_steps(&mut second, &c, 3).await;
    let got = second
        .save_checkpoint(&root.join("resumed"), "three")
        .await
        .unwrap();
    second.stop().await;

    let (a, b) = (read_all(&want), read_all(&got));
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    assert!(
        a.keys().any(|k| k.starts_with("optimizer.exp_avg_sq.")),
        "the optimizer state is checkpointed"
    );
    let worst = a
        .iter()
        .map(|(k, v)| (v - &b[k]).abs().max().double_value(&[]))
        .fold(0.0, f64::max);
    eprintln!("resume: max |Δ| over parameters and optimizer moments = {worst:.3e}");
    assert!(worst <= TOL);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resuming_with_another_config_or_without_a_checkpoint_is_refused() {
    let c = cfg(PipelineSchedule::Gpipe, Stage::I);
    let root = std::env::temp_dir().join(format!("deem-resume-bad-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let mut p = PipelineTrainer::start(&c, &cpu_topology(&c)).await.unwrap();
    let err = p.resume(&root).await.unwrap_err().to_string();
    assert_eq!(
        err,
        format!(
            "{}: no checkpoint to resume from",
            root.join("checkpoints/latest").display()
        )
    );
    p.save_checkpoint(&root, "cpu").await.unwrap();
    p.stop().await;
    let mut other = c.clone();
    other.train.lr = 0.5;
    let mut q = PipelineTrainer::start(&other, &cpu_topology(&other))
        .await
        .unwrap();
    let err = q.resume(&root).await.unwrap_err().to_string();
    assert!(
        err.contains("the checkpoint was trained with another configuration"),
        "{err}"
    );
    q.stop().await;
}

/// Compute threads of actors whose names start with `prefix` (threads are named `deem-<actor>`).
fn deem_threads(prefix: &str) -> usize {
    std::fs::read_dir("/proc/self/task")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| {
                    std::fs::read_to_string(e.path().join("comm"))
                        .is_ok_and(|c| c.starts_with(&format!("deem-{prefix}")))
                })
                .count()
        })
        .unwrap_or(0)
}

fn train(
    c: &DeemConfig,
    dir: &Path,
    steps: u64,
) -> (
    Vec<deem::train::StepReport>,
    std::sync::Arc<deem_actors::runtime::metrics::Metrics>,
) {
    train_with(c, dir, steps, false, None)
}

/// [`train`], resuming the run directory's latest checkpoint and/or stopping after `stop_at` steps.
fn train_with(
    c: &DeemConfig,
    dir: &Path,
    steps: u64,
    resume: bool,
    stop_at: Option<u64>,
) -> (
    Vec<deem::train::StepReport>,
    std::sync::Arc<deem_actors::runtime::metrics::Metrics>,
) {
    let loaded = deem_actors::settings::load(&deem_actors::settings::Layers {
        base: deem_actors::settings::BaseFile::Embedded {
            name: "test",
            text: &toml::to_string(c).unwrap(),
        },
        env: vec![],
        overrides: vec![],
    })
    .unwrap();
    let metrics = deem_actors::runtime::metrics::Metrics::new();
    let job = deem_actors::cli::train::TrainJob {
        run_dir: dir.to_path_buf(),
        steps: Some(steps),
        mode: deem_actors::cli::train::Mode::Pipeline(cpu_topology(c)),
        progress: false,
        resume,
        data: None,
        init_from: None,
        pretrained: vec![],
        stop_at,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let reports = deem_actors::cli::train::run_job(&job, &loaded, &metrics, &rt).unwrap();
    (reports, metrics)
}

#[test]
fn a_killed_actor_restarts_from_the_checkpoint_and_the_run_ends_as_if_nothing_happened() {
    let root = std::env::temp_dir().join(format!("deem-fault-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let mut c = cfg(PipelineSchedule::OneFOneB, Stage::I);
    c.train.checkpoint_every = 2;
    c.train.max_restarts = 1;
    let (clean, _) = train(&c, &root.join("clean"), 6);
    c.fault = Some(deem::config::FaultConfig {
        kill_actor: "diffusion".into(),
        at_step: 3,
        at_op: None,
    });
    let (faulty, metrics) = train(&c, &root.join("faulty"), 6);
    let text = deem_actors::runtime::metrics::to_classic_text(&metrics.encode());
    assert!(text.contains("deem_train_restarts_total 1\n"), "{text}");
    let log = std::fs::read_to_string(root.join("faulty/steps.jsonl")).unwrap();
    assert!(
        log.contains("\"event\":\"restart\"") && log.contains("\"resumed_at\":2"),
        "{log}"
    );
    assert_eq!(clean.len(), 6);
    assert_eq!(faulty.len(), 6);
    // The job's step count is the run's length: the cosine spans those 6 steps (train.steps says 200).
    assert_eq!(c.train.steps, 200);
    for (i, r) in clean.iter().enumerate() {
        let want = c.train.lr * deem::train::lr_factor(i as u64, 0, 6);
        assert!(
            (r.lr - want).abs() < 1e-12,
            "step {i}: lr {} vs {want}",
            r.lr
        );
    }
    for (a, b) in clean.iter().zip(&faulty) {
        assert!((a.total - b.total).abs() <= TOL, "{a:?} vs {b:?}");
    }
    let (a, b) = (
        read_all(&root.join("clean/model.safetensors")),
        read_all(&root.join("faulty/model.safetensors")),
    );
    let worst = a
        .iter()
        .map(|(k, v)| (v - &b[k]).abs().max().double_value(&[]))
        .fold(0.0, f64::max);
    eprintln!(
        "fault + restart: max |Δ| of final parameters vs the uninterrupted run = {worst:.3e}"
    );
    assert!(worst <= TOL);
}

/// Chaos: an actor killed at a random step and op (forward or backward of a microbatch) of its
/// schedule, `CHAOS_SEEDS` times (default 3; `make chaos` 10): the supervisor restarts the actors from
/// the latest checkpoint and every run ends as the uninterrupted one.
#[test]
fn an_actor_killed_at_a_random_step_and_op_restarts_to_the_same_run() {
    let root = std::env::temp_dir().join(format!("deem-chaos-op-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let mut c = cfg(PipelineSchedule::OneFOneB, Stage::I);
    c.train.checkpoint_every = 2;
    c.train.max_restarts = 1;
    let (clean, _) = train(&c, &root.join("clean"), 5);
    let clean_w = read_all(&root.join("clean/model.safetensors"));
    let seeds: u64 = std::env::var("CHAOS_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let actors = ["vision", "llm0", "llm1", "diffusion"];
    let ops = 2 * c.train.microbatches as usize;
    for seed in 0..seeds {
        let mut s = deem::rng::Stream::new(seed, 0, 0, deem::rng::Purpose::Data);
        let draw = |s: &mut deem::rng::Stream, n: u64| s.below(1, n)[0] as u64;
        let (actor, step, op) = (
            actors[draw(&mut s, 4) as usize],
            1 + draw(&mut s, 4),
            draw(&mut s, ops as u64) as usize,
        );
        let mut faulty = c.clone();
        faulty.fault = Some(deem::config::FaultConfig {
            kill_actor: actor.into(),
            at_step: step,
            at_op: Some(op),
        });
        let dir = root.join(format!("seed-{seed}"));
        let (reports, metrics) = train(&faulty, &dir, 5);
        let text = deem_actors::runtime::metrics::to_classic_text(&metrics.encode());
        assert!(
            text.contains("deem_train_restarts_total 1\n"),
            "seed {seed}: {actor} at step {step}, op {op}"
        );
        assert_eq!(reports.len(), clean.len());
        for (a, b) in clean.iter().zip(&reports) {
            assert!(
                (a.total - b.total).abs() <= TOL,
                "seed {seed}: {a:?} vs {b:?}"
            );
        }
        let w = read_all(&dir.join("model.safetensors"));
        let worst = clean_w
            .iter()
            .map(|(k, v)| (v - &w[k]).abs().max().double_value(&[]))
            .fold(0.0, f64::max);
        eprintln!("seed {seed}: {actor} killed at step {step}, op {op}: max |Δ| of the final weights {worst:.1e}");
        assert!(worst <= TOL, "seed {seed}: {worst}");
    }
    let _ = std::fs::remove_dir_all(&root);
}

/// A process killed after a step's row was written but before that step's checkpoint (made here by
/// removing the newer checkpoint and pointing `latest` back at the older one), then resumed: the run
/// ends with the straight run's weights bit for bit and `steps.jsonl` holds each step exactly once.
#[test]
fn a_resume_after_a_kill_keeps_one_row_per_step_and_the_straight_weights() {
    let root = std::env::temp_dir().join(format!("deem-kill-resume-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let mut c = cfg(PipelineSchedule::OneFOneB, Stage::I);
    c.train.checkpoint_every = 4;
    train(&c, &root.join("straight"), 6);
    let run = root.join("killed");
    train_with(&c, &run, 6, false, Some(5));
    let ckpts = run.join("checkpoints");
    std::fs::remove_dir_all(ckpts.join("step-5")).unwrap();
    std::fs::write(ckpts.join("latest"), "step-4\n").unwrap();
    let rows = |dir: &Path| -> Vec<u64> {
        std::fs::read_to_string(dir.join("steps.jsonl"))
            .unwrap()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?["step"].as_u64())
            .collect()
    };
    assert_eq!(rows(&run).len(), 5, "the killed run wrote 5 rows");
    train_with(&c, &run, 6, true, None);
    assert_eq!(rows(&run), rows(&root.join("straight")));
    let (a, b) = (
        read_all(&root.join("straight/model.safetensors")),
        read_all(&run.join("model.safetensors")),
    );
    assert!(a.iter().all(|(k, v)| v.equal(&b[k])), "weights differ");
    let _ = std::fs::remove_dir_all(&root);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topology_that_cannot_be_built_fails_clearly_and_leaves_no_actor_running() {
    let mut c = cfg(PipelineSchedule::Gpipe, Stage::I);
    c.llm.tie_word_embeddings = true;
    // Actor names of their own, so other tests' actors running meanwhile are not counted.
    let text = deem_actors::runtime::topology::EMBEDDED_CPU.replace("name = \"", "name = \"t-");
    let topo = Topology::parse(&text, "cpu.toml", &c, 0).unwrap();
    let err = match PipelineTrainer::start(&c, &topo).await {
        Ok(_) => panic!("a tied head cannot be split across shards"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("llm.tie_word_embeddings = true: the last shard [2, 4) would need the first shard's embedding"),
        "{err}"
    );
    // Poll with a deadline: the stopped actors' threads wind down asynchronously.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while deem_threads("t-") > 0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(deem_threads("t-"), 0, "compute threads left running");
}
