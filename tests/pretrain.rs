//! Pretraining the tiny components (`deem pretrain llm | encoder`), pretrained files and `--init-from` overlaying the initialisation, and the shipped pretrained files.

mod common;

#[path = "common/runtime.rs"]
mod rt;
use common::{root, scratch};
use rt::*;

use std::path::Path;

use deem_actors::runtime::topology::Topology;

#[test]
fn pretrain_llm_writes_the_llama_under_hf_names_for_pretrained() {
    let dir = scratch("pretrain-llm");
    let data = question_world(&dir, 40, 0);
    let cfg = load(
        &root().join("configs/tiny-llm.toml"),
        &[],
        &["train.warmup_steps=1", "train.checkpoint_every=0"],
    )
    .unwrap();
    let out = dir.join("out");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let metrics = std::sync::Arc::new(deem_actors::runtime::metrics::Metrics::new());
    let (first, last) = deem_actors::cli::pretrain::llm(
        &cfg,
        &data,
        &out,
        Some(3),
        deem::DeviceSpec::Cpu,
        false,
        &metrics,
        &rt,
    )
    .unwrap();
    assert!(last < first, "NTP {first} → {last}");
    assert_eq!(
        std::fs::read_to_string(out.join("llm.jsonl"))
            .unwrap()
            .lines()
            .count(),
        3
    );
    // Exactly HF LlamaForCausalLM's names: no DEEM additions (new tokens, new head, SoI vector).
    let file = out.join("llm.safetensors");
    let ck = deem::checkpoint::Checkpoint::open(&file).unwrap();
    let mut names: Vec<String> = ck.names().map(String::from).collect();
    names.sort();
    let mut want = vec![
        "lm_head.weight".to_string(),
        "model.embed_tokens.weight".into(),
        "model.norm.weight".into(),
    ];
    for l in 0..cfg.config.llm.num_hidden_layers {
        for p in [
            "input_layernorm",
            "post_attention_layernorm",
            "mlp.down_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "self_attn.k_proj",
            "self_attn.o_proj",
            "self_attn.q_proj",
            "self_attn.v_proj",
        ] {
            want.push(format!("model.layers.{l}.{p}.weight"));
        }
    }
    want.sort();
    assert_eq!(names, want);
    // The one loader takes it as an HF LLaMA: every tensor fills the model's own.
    let pre =
        deem::models::pretrained::Pretrained::open(std::slice::from_ref(&file), None).unwrap();
    assert_eq!(pre.sources[0].role, deem::models::pretrained::Role::Llm);
    let vs = tch::nn::VarStore::new(tch::Device::Cpu);
    deem::models::deem::Deem::new(&vs.root(), &cfg.config).unwrap();
    let spec = deem::models::pretrained::part_spec(&cfg.config, &deem::models::deem::Part::Whole);
    let filled = pre.load_into(&vs, &spec, false, |_, _| {}).unwrap();
    assert_eq!(filled.by_source[0], want);
    let up = "model.layers.0.mlp.up_proj.weight";
    assert!(vs.variables()[up].equal(&ck.tensor(up).unwrap().unwrap()));
    // A recipe without text sources is refused before anything trains.
    let tiny = load(&root().join("configs/tiny.toml"), &[], &[]).unwrap();
    let err = deem_actors::cli::pretrain::llm(
        &tiny,
        &data,
        &dir.join("none"),
        Some(1),
        deem::DeviceSpec::Cpu,
        false,
        &metrics,
        &rt,
    )
    .err()
    .unwrap()
    .to_string();
    assert_eq!(
        err,
        format!(
            "{}: train.sources: expected the text data the LLM pretrains on (configs/tiny-llm.toml names text_scenes.json)",
            root().join("configs/tiny.toml").display()
        )
    );
    assert!(!dir.join("none").exists());
}

#[test]
fn pretrain_encoder_on_fresh_scenes_draws_a_stream_apart_from_the_written_files() {
    use deem_actors::cli::pretrain::{encoder, PairSource};
    let dir = scratch("pretrain-encoder-scenes");
    let data = question_world(&dir, 0, 0);
    let cfg = load(&root().join("configs/tiny.toml"), &[], &[])
        .unwrap()
        .config;
    let metrics = deem_actors::runtime::metrics::Metrics::new();
    let o = deem::train::clip::ClipOptions {
        steps: 2,
        warmup_steps: 1,
        batch_size: 4,
        group: 2,
        ..Default::default()
    };
    let run = |out: &str| {
        let out = dir.join(out);
        encoder(
            &cfg,
            &data,
            &PairSource::Scenes(6),
            &out,
            &o,
            false,
            &metrics,
        )
        .unwrap();
        common::read_all(&out.join("encoder.safetensors"))
    };
    let a = run("a");
    assert!(a.keys().all(|n| deem::train::clip::is_image_tower(n)));
    assert!(a.contains_key("visual.head.proj.weight"));
    // Deterministic: the same scenes, batches and initialisation.
    let b = run("b");
    assert_eq!(a.len(), b.len());
    for (n, t) in &a {
        assert!(t.equal(&b[n]), "{n} differs between two identical runs");
    }
    // The stream is none of the scenes `deem data synth` writes (training or evaluation).
    for k in 0..20 {
        let fresh = deem::data::synth::pretrain_scene(0, k, 64).render();
        for written in [
            deem::data::world::scene(0, deem::data::world::Split::Id, k, 64).render(),
            deem::data::synth::eval_scene(0, deem::data::world::Split::Id, k, 64).render(),
            deem::data::synth::twin_scene(0, k, 64).render(),
        ] {
            assert_ne!(fresh, written, "scene {k}");
        }
    }
    // Bad requests are named before anything trains.
    let err = |data: &Path, group: usize| {
        let o = deem::train::clip::ClipOptions { group, ..o.clone() };
        encoder(
            &cfg,
            data,
            &PairSource::Scenes(6),
            &dir.join("bad"),
            &o,
            false,
            &metrics,
        )
        .err()
        .unwrap()
        .to_string()
    };
    assert_eq!(
        err(&data, 3),
        "--group 3 with --scenes: a scene has one shape twin, so the group is 1 or 2"
    );
    let empty = dir.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    assert_eq!(
        err(&empty, 2),
        format!(
            "{}: cannot read; --scenes draws from the synthetic world `deem data synth` wrote there",
            empty.join("SYNTH.json").display()
        )
    );
    assert!(!dir.join("bad").exists());
}

/// `--init-from` a model of another shape, or one that lacks a parameter, is refused naming the tensor,
/// by the reference trainer and by the actors alike (before, an actor copying a misshapen tensor
/// panicked), and before any step runs.
#[test]
fn init_from_a_mismatched_model_names_the_tensor() {
    use tch::Tensor;
    let dir = scratch("init-from-bad");
    let cfg = embedded_tiny();
    let vs = tch::nn::VarStore::new(tch::Device::Cpu);
    deem::models::deem::Deem::new(&vs.root(), &cfg.config).unwrap();
    let weights: std::collections::BTreeMap<String, Tensor> =
        deem::train::cpu_weights(&vs).into_iter().collect();
    let hidden = cfg.config.llm.hidden_size;
    let mut misshapen: std::collections::BTreeMap<String, Tensor> = weights
        .iter()
        .map(|(k, v)| (k.clone(), v.shallow_clone()))
        .collect();
    misshapen.insert(
        "model.norm.weight".into(),
        Tensor::ones([5], tch::kind::FLOAT_CPU),
    );
    let mut missing = weights;
    missing.remove("model.norm.weight");
    let cases = [
        (
            misshapen,
            format!(
                "wrong shape: model.norm.weight is [5] in the file, the module expects [{hidden}]"
            ),
        ),
        (missing, "missing keys (1): model.norm.weight".to_string()),
    ];
    for (k, (w, expected)) in cases.into_iter().enumerate() {
        let file = dir.join(format!("model-{k}.safetensors"));
        deem::checkpoint::save(&file, &w.into_iter().collect::<Vec<_>>()).unwrap();
        let topo = Topology::parse(
            deem_actors::runtime::topology::EMBEDDED_CPU,
            "cpu.toml",
            &cfg.config,
            0,
        )
        .unwrap();
        for mode in [
            deem_actors::cli::train::Mode::SingleProcess(deem::DeviceSpec::Cpu),
            deem_actors::cli::train::Mode::Pipeline(topo),
        ] {
            let run_dir = dir.join(format!("run-{k}"));
            let job = deem_actors::cli::train::TrainJob {
                run_dir: run_dir.clone(),
                steps: Some(1),
                mode,
                progress: false,
                resume: false,
                data: None,
                init_from: Some(file.clone()),
                pretrained: vec![],
                stop_at: None,
            };
            let rt = tokio::runtime::Runtime::new().unwrap();
            let metrics = deem_actors::runtime::metrics::Metrics::new();
            let err = format!(
                "{:#}",
                deem_actors::cli::train::run_job(&job, &cfg, &metrics, &rt).unwrap_err()
            );
            assert!(
                err.starts_with("--init-from: ") && err.ends_with(expected.as_str()),
                "{err}"
            );
            assert!(
                !run_dir.join("steps.jsonl").exists()
                    || std::fs::read_to_string(run_dir.join("steps.jsonl"))
                        .unwrap()
                        .is_empty()
            );
        }
    }
}

#[test]
fn shipped_pretrained_components_load_into_the_tiny_model() {
    use deem::models::pretrained::{part_spec, Pretrained, Role};
    let c = preset("tiny.toml").config;
    let vs = tch::nn::VarStore::new(tch::Device::Cpu);
    deem::models::deem::Deem::new(&vs.root(), &c).unwrap();
    let spec = part_spec(&c, &deem::models::deem::Part::Whole);
    let dir = root().join("assets/tiny-pretrained");
    let mut filled = Vec::new();
    for (f, role) in [
        ("encoder", Role::OpenClip),
        ("encoder-scenes", Role::OpenClip),
        ("decoder", Role::Deem),
        ("llm", Role::Llm),
    ] {
        let pre = Pretrained::open(&[dir.join(format!("{f}.safetensors"))], Some(&c)).unwrap();
        assert_eq!(pre.sources[0].role, role, "{f}");
        filled.push(
            pre.load_into(&vs, &spec, false, |_, _| {})
                .unwrap()
                .by_source[0]
                .clone(),
        );
    }
    // The two encoders are the same image tower (open_clip names), trained on other data.
    assert_eq!(filled[0], filled[1]);
    assert!(filled[0].iter().all(|n| n.starts_with("visual.")));
    assert!(filled.iter().all(|f| !f.is_empty()));
}
