//! The core contract of the actor runtime: pipelined training over the DAG (vision → LLM shards →
//! diffusion, vision → diffusion) with GPipe and 1F1B equals the single-process reference trainer —
//! same seed, data and microbatch split → the same per-step losses and parameters.

use std::collections::BTreeMap;
use std::path::Path;

use deem::config::{DeemConfig, PipelineSchedule, Stage};
use deem::data::SyntheticBatches;
use deem::train::Trainer;
use deem_actors::pipeline::PipelineTrainer;
use deem_actors::topology::Topology;
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

fn topology(c: &DeemConfig) -> Topology {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    Topology::load(&root.join("topologies/cpu.toml"), c, 0).unwrap()
}

fn reference(
    c: &DeemConfig,
    steps: u64,
) -> (Vec<deem::train::StepReport>, BTreeMap<String, Tensor>) {
    let mut t = Trainer::new(c, Device::Cpu).unwrap();
    let data = SyntheticBatches::new(c, 9);
    let reports = (0..steps)
        .map(|i| t.step(&data.batch(i)).unwrap())
        .collect();
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
    let mut p = PipelineTrainer::start(c, &topology(c)).await.unwrap();
    let data = SyntheticBatches::new(c, 9);
    let mut reports = Vec::new();
    for i in 0..steps {
        reports.push(p.step(&data.batch(i)).await.unwrap());
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
