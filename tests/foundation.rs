//! End-to-end tests of the foundation: layered configuration (file < env < CLI) and its error messages,
//! topology validation and its error messages, the placement table, the `/metrics` + `/health`
//! endpoint (scraped and parsed as Prometheus text), and the `deem` binary itself.

mod common;
use common::{fixture, root, scratch};

use std::path::{Path, PathBuf};
use std::process::Command;

use deem_actors::runtime::topology::{Component, Topology};
use deem_actors::settings::{self, BaseFile, ConfigError, Layers, LoadedConfig};

fn tiny_text() -> String {
    std::fs::read_to_string(root().join("configs/tiny.toml")).unwrap()
}

/// Writes tiny.toml with `edit` applied (a plain text replacement) and returns its path.
fn tiny_with(dir: &Path, from: &str, to: &str) -> PathBuf {
    let text = tiny_text();
    assert!(text.contains(from), "tiny.toml has no {from:?}");
    let p = dir.join("cfg.toml");
    std::fs::write(&p, text.replacen(from, to, 1)).unwrap();
    p
}

fn load(path: &Path, env: &[(&str, &str)], sets: &[&str]) -> Result<LoadedConfig, ConfigError> {
    settings::load(&Layers {
        base: BaseFile::Path(path),
        env: env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        overrides: sets.iter().map(|s| s.to_string()).collect(),
    })
}

fn load_err(path: &Path, env: &[(&str, &str)], sets: &[&str]) -> String {
    load(path, env, sets)
        .expect_err("config should be rejected")
        .to_string()
}

fn embedded_tiny() -> LoadedConfig {
    settings::load(&Layers {
        base: BaseFile::Embedded {
            name: settings::EMBEDDED_TINY_NAME,
            text: settings::EMBEDDED_TINY,
        },
        env: vec![],
        overrides: vec![],
    })
    .unwrap()
}

fn preset(name: &str) -> LoadedConfig {
    load(&root().join("configs").join(name), &[], &[]).unwrap()
}

// ---------------------------------------------------------------- configuration layering

#[test]
fn layering_order_is_file_then_env_then_cli() {
    let dir = scratch("layering");
    let p = tiny_with(&dir, "lr = 1e-3", "lr = 0.001");
    let file = p.display().to_string();

    let only_file = load(&p, &[], &[]).unwrap();
    assert_eq!(only_file.config.train.lr, 0.001);
    assert_eq!(only_file.origin_of("train.lr"), file);

    let env = [
        ("DEEM_TRAIN__LR", "0.002"),
        ("DEEM_LLM__NUM_HIDDEN_LAYERS", "6"),
    ];
    let with_env = load(&p, &env, &[]).unwrap();
    assert_eq!(with_env.config.train.lr, 0.002);
    assert_eq!(with_env.config.llm.num_hidden_layers, 6);
    assert_eq!(
        with_env.origin_of("train.lr"),
        "environment variable DEEM_TRAIN__LR"
    );

    let with_cli = load(
        &p,
        &env,
        &[
            "train.lr=0.003",
            "train.betas=[0.8, 0.9]",
            "model.name=\"x\"",
        ],
    )
    .unwrap();
    assert_eq!(with_cli.config.train.lr, 0.003);
    assert_eq!(with_cli.config.train.betas, [0.8, 0.9]);
    assert_eq!(with_cli.config.model.name, "x");
    assert_eq!(
        with_cli.config.llm.num_hidden_layers, 6,
        "env still applies where the CLI is silent"
    );
    assert_eq!(with_cli.origin_of("train.lr"), "--set train.lr");
    // Untouched keys keep the file's value and origin.
    assert_eq!(with_cli.config.train.steps, 200);
    assert_eq!(with_cli.origin_of("train.steps"), file);
}

#[test]
fn env_vars_without_double_underscore_are_cli_flags_not_config_keys() {
    let dir = scratch("cli-env");
    let p = tiny_with(&dir, "seed = 0", "seed = 0");
    let cfg = load(
        &p,
        &[
            ("DEEM_CONFIG", "elsewhere.toml"),
            ("DEEM_LOG", "debug"),
            ("OTHER__X", "1"),
        ],
        &[],
    )
    .unwrap();
    assert_eq!(cfg.config.train.seed, 0);
}

#[test]
fn unquoted_strings_and_nested_keys_work_on_the_command_line() {
    let dir = scratch("nested");
    let p = tiny_with(&dir, "seed = 0", "seed = 0");
    let cfg = load(
        &p,
        &[],
        &[
            "diffusion.scheduler.prediction_type=v_prediction",
            "train.schedule=gpipe",
        ],
    )
    .unwrap();
    assert_eq!(
        cfg.config.diffusion.scheduler.prediction_type,
        deem::config::PredictionType::VPrediction
    );
    assert_eq!(
        cfg.config.train.schedule,
        deem::config::PipelineSchedule::Gpipe
    );
}

#[test]
fn shipped_configs_are_valid_and_the_embedded_default_is_tiny() {
    let tiny = preset("tiny.toml");
    assert_eq!(tiny.config, embedded_tiny().config);
    let big = preset("deem-7b.toml");
    assert_eq!(big.config.resampler.num_query_tokens, 77);
    assert_eq!(big.config.llm.num_hidden_layers, 32);
    assert_eq!(big.config.diffusion.unet.cross_attention_dim, 1024);
    assert_eq!(
        (
            big.config.train.nip_loss_weight,
            big.config.train.csr_loss_weight
        ),
        (5.0, 5.0)
    );
    assert_eq!(big.config.train.context_length, 2048);
    // The CSR experiment's stage II is make run's, with the label questions mixed in 1 : 1.
    let stage2 = preset("tiny-stage2.toml").config;
    let mut labels = preset("tiny-stage2-labels.toml").config;
    let added = labels.train.sources.pop().unwrap();
    assert_eq!(
        (added.file.as_str(), added.weight),
        ("label_questions.json", 1.0)
    );
    labels.train.steps = stage2.train.steps;
    assert_eq!(labels, stage2);
}

// ---------------------------------------------------------------- configuration errors

#[test]
fn unknown_key_in_file_names_file_key_and_expected_keys() {
    let dir = scratch("unknown");
    let p = tiny_with(&dir, "lr = 1e-3", "lr = 1e-3\nlrr = 2");
    assert_eq!(
        load_err(&p, &[], &[]),
        format!(
            "{}: train.lrr: unknown field `lrr`, expected one of `stage`, `seed`, `steps`, `warmup_steps`, \
             `batch_size`, `microbatches`, `context_length`, `lr`, `encoder_lr`, `llm_lr`, `betas`, `eps`, \
             `weight_decay`, `max_grad_norm`, `nip_loss_weight`, `csr_loss_weight`, `schedule`, `train_lm_head`, `train_llm_in_stage_one`, `loss_on_prompts`, `isolate_documents`, `checkpoint_every`, `max_restarts`, `sources`",
            p.display()
        )
    );
}

#[test]
fn unknown_section_from_cli_names_the_flag() {
    let dir = scratch("unknown-cli");
    let p = tiny_with(&dir, "seed = 0", "seed = 0");
    assert_eq!(
        load_err(&p, &[], &["trian.lr=1"]),
        "--set trian.lr: trian: unknown field `trian`, expected one of `model`, `vision`, `resampler`, `llm`, \
         `diffusion`, `train`, `serve`, `fault`"
    );
}

#[test]
fn wrong_type_names_origin_key_and_expectation() {
    let dir = scratch("type");
    let p = tiny_with(&dir, "steps = 200", "steps = \"many\"");
    assert_eq!(
        load_err(&p, &[], &[]),
        format!(
            "{}: train.steps: invalid type: string \"many\", expected u64",
            p.display()
        )
    );
    let ok = tiny_with(&dir, "seed = 0", "seed = 0");
    assert_eq!(
        load_err(&ok, &[("DEEM_TRAIN__STEPS", "many")], &[]),
        "environment variable DEEM_TRAIN__STEPS: train.steps: invalid type: string \"many\", expected u64"
    );
    assert_eq!(
        load_err(&ok, &[], &["train.stage=IV"]),
        "--set train.stage: train.stage: unknown variant `IV`, expected one of `I`, `II`, `III`"
    );
}

#[test]
fn missing_key_names_the_full_path() {
    let dir = scratch("missing");
    let p = tiny_with(&dir, "seed = 0\n", "");
    assert_eq!(
        load_err(&p, &[], &[]),
        format!(
            "{}: train.seed: missing; every key must be set",
            p.display()
        )
    );
}

#[test]
fn semantic_errors_are_all_reported_with_their_origins() {
    let dir = scratch("semantic");
    let p = tiny_with(
        &dir,
        "num_attention_heads = 4\nnum_key_value_heads = 2",
        "num_attention_heads = 3\nnum_key_value_heads = 2",
    );
    assert_eq!(
        load_err(&p, &[], &["train.microbatches=3", "diffusion.condition.width=32"]),
        format!(
            "{f}: llm.num_attention_heads: expected a divisor of llm.hidden_size (64), found 3\n\
             {f}: llm.num_key_value_heads: expected a divisor of llm.num_attention_heads (3), found 2\n\
             --set diffusion.condition.width: diffusion.condition.width: expected diffusion.unet.cross_attention_dim (64), the UNet context width, found 32\n\
             --set train.microbatches: train.microbatches: expected a divisor of train.batch_size (4), found 3",
            f = p.display()
        )
    );
}

/// `llm.rope_scaling` (scaled RoPE, HF's names): a valid table loads, a bad value is named with its
/// origin, an unknown type lists the known ones, and a config without it writes no such key (so the
/// config hash of existing runs is unchanged).
#[test]
fn rope_scaling_is_read_and_checked() {
    use deem::config::RopeScaling;
    let dir = scratch("rope");
    let table = "rope_theta = 10000.0\nrope_scaling = { rope_type = \"llama3\", factor = 8.0, \
                 low_freq_factor = 1.0, high_freq_factor = 4.0, original_max_position_embeddings = 256 }";
    let p = tiny_with(&dir, "rope_theta = 10000.0", table);
    assert_eq!(
        load(&p, &[], &[]).unwrap().config.llm.rope_scaling,
        Some(RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 256
        })
    );
    let p = tiny_with(
        &dir,
        "rope_theta = 10000.0",
        &table.replace("high_freq_factor = 4.0", "high_freq_factor = 0.5"),
    );
    assert_eq!(
        load_err(&p, &[], &[]),
        format!(
            "{}: llm.rope_scaling.high_freq_factor: expected more than low_freq_factor (1), found 0.5",
            p.display()
        )
    );
    let p = tiny_with(
        &dir,
        "rope_theta = 10000.0",
        "rope_theta = 10000.0\nrope_scaling = { rope_type = \"longrope\", factor = 4.0 }",
    );
    assert!(
        load_err(&p, &[], &[]).contains(
            "unknown variant `longrope`, expected one of `linear`, `dynamic`, `llama3`, `yarn`"
        ),
        "{}",
        load_err(&p, &[], &[])
    );
    let p = tiny_with(
        &dir,
        "rope_theta = 10000.0",
        "rope_theta = 10000.0\nrope_scaling = { rope_type = \"yarn\", factor = 4.0, \
         original_max_position_embeddings = 256, truncate = false }",
    );
    assert_eq!(
        load(&p, &[], &[]).unwrap().config.llm.rope_scaling,
        Some(RopeScaling::Yarn {
            factor: 4.0,
            original_max_position_embeddings: 256,
            beta_fast: None,
            beta_slow: None,
            attention_factor: None,
            mscale: None,
            mscale_all_dim: None,
            truncate: Some(false)
        })
    );
    let written = toml::to_string(&embedded_tiny().config).unwrap();
    assert!(!written.contains("rope_scaling"), "{written}");
}

#[test]
fn bad_sources_are_named() {
    let dir = scratch("sources");
    let missing = dir.join("nope.toml");
    let err = load_err(&missing, &[], &[]);
    assert!(
        err.starts_with(&format!(
            "{}: cannot read the config file: ",
            missing.display()
        )),
        "{err}"
    );
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "[model\nname = 1").unwrap();
    let err = load_err(&bad, &[], &[]);
    assert!(
        err.starts_with(&format!("{}: invalid TOML: ", bad.display())),
        "{err}"
    );
    assert!(
        err.contains("line 1"),
        "the TOML error names the line: {err}"
    );

    let ok = tiny_with(&dir, "seed = 0", "seed = 0");
    assert_eq!(
        load_err(&ok, &[], &["train.lr"]),
        "--set train.lr: expected KEY=VALUE, e.g. --set train.lr=1e-4"
    );
    assert_eq!(
        load_err(&ok, &[], &["Train.LR=1"]),
        "--set Train.LR: expected a dotted key of lowercase names, e.g. train.lr or diffusion.unet.layers_per_block"
    );
    assert_eq!(
        load_err(&ok, &[("DEEM_TRAIN____LR", "1")], &[]),
        "environment variable DEEM_TRAIN____LR: expected DEEM_<SECTION>__<KEY> with letters, digits and single underscores in each part"
    );
}

/// A synthetic world of only `text` text scenes and `colour` colour questions, in `dir/data`.
fn question_world(dir: &Path, text: usize, colour: usize) -> PathBuf {
    let data = dir.join("data");
    deem::data::synth::synthesize(
        &data,
        &deem::data::synth::SynthOptions {
            pairs: 0,
            documents: 0,
            instructions: 0,
            regions: 0,
            eval_per_split: 0,
            text_scenes: text,
            colour_questions: colour,
            label_questions: 0,
            ..Default::default()
        },
    )
    .unwrap();
    data
}

#[test]
fn train_sources_choose_the_data_mixture_and_bad_ones_are_named() {
    let dir = scratch("train-sources");
    let with = |sources: &str| {
        let p = dir.join("sources.toml");
        std::fs::write(&p, format!("{}\n{sources}", tiny_text())).unwrap();
        p
    };
    let source = |file: &str, format: &str, weight: f64| {
        format!("[[train.sources]]\nfile = \"{file}\"\nformat = \"{format}\"\nweight = {weight}\n")
    };
    let bad = with(&format!(
        "{}{}",
        source("a.json", "llava", 0.0),
        source(" ", "pairs", 1.0)
    ));
    assert_eq!(
        load_err(&bad, &[], &[]),
        format!(
            "{f}: train.sources[0].weight: expected a positive sampling weight, found 0\n\
             {f}: train.sources[1].file: expected a file name, found an empty string",
            f = bad.display()
        )
    );
    let unknown = with(&source("a.json", "parquet", 1.0));
    let err = load_err(&unknown, &[], &[]);
    assert!(
        err.contains("train.sources") && err.contains("unknown variant `parquet`"),
        "{err}"
    );

    // Text-only conversations and questions about images, at the weights given.
    let data = question_world(&dir, 30, 10);
    let p = with(&format!(
        "{}{}",
        source("text_scenes.json", "llava", 3.0),
        source("colour_questions.json", "llava", 1.0)
    ));
    let cfg = load(&p, &[], &[]).unwrap().config;
    let metrics = deem_actors::runtime::metrics::Metrics::new();
    let m = deem_actors::cli::train::dataset_batches(&cfg, &data, &metrics).unwrap();
    let got: Vec<(&str, usize, f64)> = m
        .sources
        .iter()
        .map(|s| (s.name.as_str(), s.len(), s.weight))
        .collect();
    assert_eq!(
        got,
        [
            ("text_scenes.json", 30, 3.0),
            ("colour_questions.json", 10, 1.0)
        ]
    );
    m.batch(0).unwrap();

    // The error of building the batches of the recipe at `path`.
    let batches_err = |path: &Path| {
        let cfg = load(path, &[], &[]).unwrap().config;
        deem_actors::cli::train::dataset_batches(&cfg, &data, &metrics)
            .err()
            .unwrap()
            .to_string()
    };
    // Annotations kept apart from their images (LLaVA's image folder, COCO's train2014/): `images`
    // names the folder the records' paths are relative to.
    std::fs::create_dir_all(data.join("ann")).unwrap();
    std::fs::copy(
        data.join("colour_questions.json"),
        data.join("ann/questions.json"),
    )
    .unwrap();
    let apart = with(&format!(
        "{}images = \".\"\n",
        source("ann/questions.json", "llava", 1.0)
    ));
    let cfg = load(&apart, &[], &[]).unwrap().config;
    let m = deem_actors::cli::train::dataset_batches(&cfg, &data, &metrics).unwrap();
    assert_eq!(m.sources[0].len(), 10);
    let lost = with(&source("ann/questions.json", "llava", 1.0));
    let err = batches_err(&lost);
    assert!(
        err.contains("10 of 10 records are bad") && err.contains("missing image"),
        "{err}"
    );
    let nowhere = with(&format!(
        "{}images = \"pictures\"\n",
        source("ann/questions.json", "llava", 1.0)
    ));
    let err = batches_err(&nowhere);
    assert_eq!(
        err,
        format!(
            "{} (train.sources[0].images): not a folder; expected the folder ann/questions.json's image paths are relative to",
            data.join("pictures").display()
        )
    );

    let missing = with(&source("nowhere.json", "llava", 1.0));
    let err = batches_err(&missing);
    assert_eq!(
        err,
        format!(
            "{} (train.sources[0].file): missing; --data needs the folder `deem data synth` writes (or files in its formats)",
            data.join("nowhere.json").display()
        )
    );
}

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
    // `deem train --pretrained` takes it: every tensor replaces the trained run's own.
    let mut w = deem_actors::cli::train::read_weights(&out.join("llm-run")).unwrap();
    let trained = w["model.layers.0.mlp.up_proj.weight"].copy();
    w.insert(
        "model.layers.0.mlp.up_proj.weight".into(),
        trained.zeros_like(),
    );
    assert_eq!(
        deem_actors::cli::train::overlay(&mut w, &file).unwrap(),
        want.len()
    );
    assert!(w["model.layers.0.mlp.up_proj.weight"].equal(&trained));

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
        let ck = deem::checkpoint::Checkpoint::open(&out.join("encoder.safetensors")).unwrap();
        let names: Vec<String> = ck.names().map(String::from).collect();
        names
            .into_iter()
            .map(|n| {
                let t = ck.tensor(&n).unwrap().unwrap();
                (n, t)
            })
            .collect::<std::collections::BTreeMap<_, _>>()
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

// ---------------------------------------------------------------- topologies

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
        "t.toml: actor[0].node: unknown field `node`, expected one of `name`, `component`, `device`, `layers`"
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
        lines[0].starts_with("actor") && lines[0].ends_with("param memory"),
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
    assert!(lines[6].starts_with("total"), "{table}");
}

// ---------------------------------------------------------------- metrics endpoint

fn scrape_text(body: &str) -> prometheus_parse::Scrape {
    prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_endpoint_serves_parseable_prometheus_text() {
    let metrics = deem_actors::runtime::metrics::Metrics::new();
    let server = deem_actors::runtime::http::Server::start(
        "127.0.0.1:0".parse().unwrap(),
        deem_actors::runtime::http::router(metrics),
    )
    .await
    .unwrap();
    let base = format!("http://{}", server.addr);
    let client = reqwest::Client::new();

    let health = client.get(format!("{base}/health")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    let body: serde_json::Value = serde_json::from_str(&health.text().await.unwrap()).unwrap();
    assert_eq!(body["status"], "ok");
    assert_eq!(
        client
            .get(format!("{base}/nope"))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );

    // Prometheus negotiates OpenMetrics; everything else gets the classic text format.
    let resp = client
        .get(format!("{base}/metrics"))
        .header(
            "accept",
            "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["content-type"].to_str().unwrap(),
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    let open = resp.text().await.unwrap();
    assert!(
        open.ends_with("# EOF\n"),
        "OpenMetrics ends with # EOF: {open}"
    );
    assert!(
        open.contains("# TYPE deem_http_requests counter\n"),
        "{open}"
    );

    let resp = client.get(format!("{base}/metrics")).send().await.unwrap();
    assert_eq!(
        resp.headers()["content-type"].to_str().unwrap(),
        "text/plain; version=0.0.4; charset=utf-8"
    );
    let body = resp.text().await.unwrap();
    assert!(!body.contains("# EOF"), "{body}");
    assert!(
        body.contains("# TYPE deem_http_requests_total counter\n"),
        "{body}"
    );
    assert!(
        body.contains("# TYPE process_cpu_seconds_total counter\n"),
        "{body}"
    );

    // Every sample line is well-formed, and every family has HELP and TYPE.
    let sample = regex_lite_sample();
    for line in body.lines().filter(|l| !l.starts_with('#')) {
        assert!(sample(line), "malformed sample line {line:?}");
    }
    let scrape = scrape_text(&body);
    for s in &scrape.samples {
        let family = ["_total", "_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| s.metric.strip_suffix(suffix))
            .unwrap_or(&s.metric);
        assert!(
            scrape.docs.contains_key(family) || scrape.docs.contains_key(&s.metric),
            "{} has no HELP",
            s.metric
        );
        assert!(
            s.metric.starts_with("deem_") || s.metric.starts_with("process_"),
            "{} is not namespaced",
            s.metric
        );
    }

    let build = scrape
        .samples
        .iter()
        .find(|s| s.metric == "deem_build_info")
        .expect("deem_build_info");
    assert_eq!(build.value, prometheus_parse::Value::Gauge(1.0));
    assert_eq!(build.labels.get("version"), Some(deem::VERSION));
    assert_eq!(build.labels.get("libtorch"), deem::LIBTORCH_VERSION);
    assert_eq!(
        build.labels.get("cuda_devices"),
        Some(deem::device::cuda_device_count().to_string().as_str())
    );

    for name in [
        "process_resident_memory_bytes",
        "process_start_time_seconds",
        "process_open_fds",
        "process_threads",
    ] {
        let s = scrape
            .samples
            .iter()
            .find(|s| s.metric == name)
            .unwrap_or_else(|| panic!("{name} missing"));
        match s.value {
            prometheus_parse::Value::Gauge(v) => assert!(v > 0.0, "{name} = {v}"),
            ref v => panic!("{name} is not a gauge: {v:?}"),
        }
    }
    assert!(scrape
        .samples
        .iter()
        .any(|s| s.metric == "process_cpu_seconds_total"));

    // The requests above were counted, by route and status.
    let count = |route: &str, status: &str| {
        scrape
            .samples
            .iter()
            .find(|s| {
                s.metric == "deem_http_requests_total"
                    && s.labels.get("route") == Some(route)
                    && s.labels.get("status") == Some(status)
            })
            .map(|s| match s.value {
                prometheus_parse::Value::Counter(v) => v,
                ref v => panic!("not a counter: {v:?}"),
            })
    };
    assert_eq!(count("/health", "200"), Some(1.0));
    assert_eq!(count("unmatched", "404"), Some(1.0));
    assert_eq!(
        count("/metrics", "200"),
        Some(1.0),
        "the OpenMetrics scrape before this one"
    );

    promtool_check(&body);
    server.stop().await.unwrap();
}

/// `name{labels} value` with an optional timestamp, as the exposition formats allow.
fn regex_lite_sample() -> impl Fn(&str) -> bool {
    |line: &str| {
        let (name_labels, rest) = match line.rfind('}') {
            Some(i) => (&line[..=i], line[i + 1..].trim()),
            None => match line.split_once(' ') {
                Some((n, r)) => (n, r.trim()),
                None => return false,
            },
        };
        let name = name_labels.split('{').next().unwrap_or("");
        let name_ok = !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
            && !name.starts_with(|c: char| c.is_ascii_digit());
        let value_ok = rest
            .split_whitespace()
            .next()
            .is_some_and(|v| v.parse::<f64>().is_ok() || ["+Inf", "-Inf", "NaN"].contains(&v));
        name_ok && value_ok
    }
}

/// Lints the exposition with the real Prometheus `promtool` where it is installed (CI installs it).
fn promtool_check(body: &str) {
    use std::io::Write;
    let Ok(mut child) = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
    else {
        eprintln!("promtool not installed: skipping the Prometheus lint (CI installs it)");
        return;
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

// ---------------------------------------------------------------- the binary

fn deem(args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_deem"));
    cmd.args(args).current_dir(root());
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("DEEM_")) {
        cmd.env_remove(k);
    }
    cmd.envs(env.iter().copied());
    let out = cmd.output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn binary_info_reports_libtorch_and_devices() {
    let (ok, out, err) = deem(&["info"], &[]);
    assert!(ok, "{err}");
    assert!(
        out.starts_with(&format!("deem {}\n", deem::VERSION)),
        "{out}"
    );
    assert!(out.contains("libtorch          2.13.0"), "{out}");
    assert!(out.contains("CUDA"), "{out}");
    assert!(out.contains("threads           intra-op"), "{out}");
}

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
fn binary_reports_errors_on_stderr_with_failure_status() {
    let (ok, out, err) = deem(
        &["topology", "check", "--topology", "topologies/gpu-4.toml"],
        &[],
    );
    assert!(!ok);
    assert!(out.is_empty(), "{out}");
    if deem::device::cuda_device_count() == 0 {
        assert!(
            err.contains(
                "error: topologies/gpu-4.toml: actor[0].device: \"cuda:0\" is not available: this machine has no \
                 CUDA devices; use device = \"cpu\""
            ),
            "{err}"
        );
    }
    let (ok, _, err) = deem(&["config", "show", "--set", "train.lr=-1"], &[]);
    assert!(!ok);
    assert!(
        err.contains("error: --set train.lr: train.lr: expected a positive number, found -1"),
        "{err}"
    );
}

#[test]
fn binary_config_show_round_trips() {
    let (ok, out, err) = deem(&["config", "show", "--set", "train.steps=70"], &[]);
    assert!(ok, "{err}");
    let shown: deem::DeemConfig = toml::from_str(&out).unwrap();
    let mut want = embedded_tiny().config;
    want.train.steps = 70;
    assert_eq!(shown, want);
}

// ---------------------------------------------------------------- monitoring files

#[test]
fn monitoring_config_and_rules_pass_promtool() {
    let dir = root().join("monitoring");
    let Ok(out) = Command::new("promtool")
        .arg("check")
        .arg("config")
        .arg(dir.join("prometheus.yml"))
        .output()
    else {
        eprintln!("promtool not installed: skipping (CI installs it)");
        return;
    };
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new("promtool")
        .arg("check")
        .arg("rules")
        .arg(dir.join("alerts.yml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Every deem_* / process_* metric the rules and the dashboard use is one deem exports: populate every
    // family with a short pipelined run and a request, then look each name up.
    let metrics = deem_actors::runtime::metrics::Metrics::new();
    let labels = deem_actors::runtime::metrics::HttpLabels {
        route: "/metrics".into(),
        status: "200".into(),
    };
    metrics.http_requests.get_or_create(&labels).inc();
    // The serving families with labels appear once a value exists (the serve tests exercise them).
    let serve = &metrics.serve;
    serve
        .requests
        .get_or_create(&deem_actors::runtime::metrics::RequestLabels {
            status: "stop".into(),
        })
        .inc();
    serve
        .kv_cache_bytes
        .get_or_create(&deem_actors::runtime::metrics::ShardLabels {
            shard: "llm0".into(),
        })
        .set(0);
    let cfg = embedded_tiny();
    let topo = Topology::parse(
        deem_actors::runtime::topology::EMBEDDED_CPU,
        "cpu.toml",
        &cfg.config,
        0,
    )
    .unwrap();
    let job = deem_actors::cli::train::TrainJob {
        run_dir: scratch("monitoring"),
        steps: Some(1),
        mode: deem_actors::cli::train::Mode::Pipeline(topo),
        progress: false,
        resume: false,
        data: None,
        init_from: None,
        pretrained: vec![],
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    deem_actors::cli::train::run_job(&job, &cfg, &metrics, &rt).unwrap();
    let exported = deem_actors::runtime::metrics::to_classic_text(&metrics.encode());
    let rules = std::fs::read_to_string(dir.join("alerts.yml")).unwrap();
    let dashboard = std::fs::read_to_string(dir.join("grafana-training.json")).unwrap();
    let _: serde_json::Value = serde_json::from_str(&dashboard).expect("the dashboard is JSON");
    let mut used = std::collections::BTreeSet::new();
    for text in [&rules, &dashboard] {
        let mut rest = text.as_str();
        while let Some(i) = rest.find(['d', 'p']) {
            let tail = &rest[i..];
            let name: String = tail
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if (name.starts_with("deem_") || name.starts_with("process_"))
                && !rest[..i].ends_with(|c: char| c.is_ascii_alphanumeric() || c == '_')
            {
                used.insert(name.clone());
            }
            rest = &tail[name.len().max(1)..];
        }
    }
    assert!(used.len() >= 10, "{used:?}");
    for metric in used {
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| metric.strip_suffix(s))
            .unwrap_or(&metric);
        assert!(
            exported.contains(&format!("# TYPE {family} ")),
            "{metric} is used by monitoring/ but not exported"
        );
    }
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

fn max_abs_diff(out: &Path, expected: &Path, names: &[&str]) -> f64 {
    let a = deem::checkpoint::Checkpoint::open(out).unwrap();
    let b = deem::checkpoint::Checkpoint::open(expected).unwrap();
    names
        .iter()
        .map(|n| {
            let (x, y) = (
                a.tensor(n).unwrap().expect(n),
                b.tensor(n).unwrap().expect(n),
            );
            assert_eq!(x.size(), y.size(), "{n}");
            (x - y).abs().max().double_value(&[])
        })
        .fold(0.0, f64::max)
}

/// Config flags that size the vision/resampler like tests/fixtures/generate.py does.
const FIXTURE_SIZES: [&str; 20] = [
    "--set",
    "vision.depths=[1,1,2,1]",
    "--set",
    "vision.dims=[8,16,24,32]",
    "--set",
    "vision.embed_dim=24",
    "--set",
    "vision.adapter_width=24",
    "--set",
    "resampler.encoder_hidden_size=24",
    "--set",
    "resampler.hidden_size=16",
    "--set",
    "resampler.num_hidden_layers=3",
    "--set",
    "resampler.num_attention_heads=2",
    "--set",
    "resampler.intermediate_size=32",
    "--set",
    "llm.hidden_size=32",
];

#[test]
fn binary_forward_reproduces_the_reference_outputs() {
    let dir = scratch("forward");
    let cases: [(&str, &str, &[&str]); 4] = [
        ("llm", "llama_gqa", &["logits"]),
        ("llm", "llama_gqa_sharded", &["logits"]),
        (
            "vision",
            "vision",
            &[
                "tokens",
                "multiscale_0",
                "multiscale_1",
                "multiscale_2",
                "multiscale_3",
            ],
        ),
        (
            "resampler",
            "resampler",
            &["visual_tokens", "csr_condition"],
        ),
    ];
    for (component, fx, names) in cases {
        let out = dir.join(format!("{fx}.safetensors"));
        // The sharded llama has no inputs of its own: it is the GQA model.
        let data = if fx == "llama_gqa_sharded" {
            fixture("llama_gqa")
        } else {
            fixture(fx)
        };
        let ck = fixture(fx);
        let mut args = vec![
            "forward".to_string(),
            component.to_string(),
            "--checkpoint".into(),
            ck.display().to_string(),
            "--inputs".into(),
            data.join("inputs.safetensors").display().to_string(),
            "--output".into(),
            out.display().to_string(),
            "--set".into(),
            "diffusion.unet.cross_attention_dim=20".into(),
            "--set".into(),
            "diffusion.condition.width=20".into(),
        ];
        args.extend(FIXTURE_SIZES.iter().map(|s| s.to_string()));
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let (ok, stdout, err) = deem(&argv, &[]);
        assert!(ok, "{component} {fx}: {err}");
        assert!(
            stdout.starts_with(&format!("wrote {}", out.display())),
            "{stdout}"
        );
        let d = max_abs_diff(&out, &data.join("expected.safetensors"), names);
        eprintln!("deem forward {component} ({fx}): max |diff| = {d:.3e}");
        assert!(d < 1e-4, "{component} {fx}: {d}");
    }
}

#[test]
fn binary_forward_names_bad_inputs() {
    let dir = scratch("forward-bad");
    let ck = fixture("llama_gqa");
    let bad = dir.join("bad.safetensors");
    deem::checkpoint::save(
        &bad,
        &[(
            "input_ids".into(),
            tch::Tensor::from_slice(&[1i64, 500]).view([1, 2]),
        )],
    )
    .unwrap();
    let run = |inputs: &Path| {
        deem(
            &[
                "forward",
                "llm",
                "--checkpoint",
                ck.to_str().unwrap(),
                "--inputs",
                inputs.to_str().unwrap(),
                "--output",
                dir.join("o.safetensors").to_str().unwrap(),
            ],
            &[],
        )
    };
    let (ok, _, err) = run(&bad);
    assert!(!ok);
    assert!(
        err.contains(&format!(
            "{}: `input_ids` range over [1, 500]; expected ids in [0, 128)",
            bad.display()
        )),
        "{err}"
    );
    let other = dir.join("other.safetensors");
    deem::checkpoint::save(
        &other,
        &[("ids".into(), tch::Tensor::from_slice(&[1i64]).view([1, 1]))],
    )
    .unwrap();
    let (ok, _, err) = run(&other);
    assert!(!ok);
    assert!(
        err.contains(&format!(
            "{}: no tensor `input_ids` (int64 [B, T]); the file holds [\"ids\"]",
            other.display()
        )),
        "{err}"
    );
    assert!(
        !dir.join("o.safetensors").exists(),
        "no output is written on failure"
    );
}

#[test]
fn binary_forward_runs_the_diffusion_components() {
    let dir = scratch("forward-diffusion");
    let forward = |component: &str, ck: &Path, inputs: &Path, extra: &[&str]| {
        let out = dir.join(format!("{component}-{}.safetensors", extra.len()));
        let mut args = vec!["forward", component, "--checkpoint", ck.to_str().unwrap()];
        args.extend([
            "--inputs",
            inputs.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
        ]);
        args.extend(extra);
        let (ok, _, err) = deem(&args, &[]);
        assert!(ok, "{component}: {err}");
        out
    };
    let unet = fixture("unet");
    let exp = unet.join("expected.safetensors");
    let out = forward("unet", &unet, &unet.join("inputs.safetensors"), &[]);
    assert!(max_abs_diff(&out, &exp, &["noise_pred"]) < 1e-4);

    // The sampler reads `noise`: rename the fixture's initial sample.
    let src = deem::checkpoint::Checkpoint::open(&unet.join("inputs.safetensors")).unwrap();
    let get = |n: &str| src.tensor(n).unwrap().unwrap();
    let sample_in = dir.join("sample-in.safetensors");
    deem::checkpoint::save(
        &sample_in,
        &[
            ("noise".into(), get("sample")),
            ("encoder_hidden_states".into(), get("encoder_hidden_states")),
            ("uncond_hidden_states".into(), get("uncond_hidden_states")),
        ],
    )
    .unwrap();
    let rename = |out: &Path, to: &str| {
        let t = deem::checkpoint::Checkpoint::open(out)
            .unwrap()
            .tensor("latents")
            .unwrap()
            .unwrap();
        let p = dir.join(format!("{to}.safetensors"));
        deem::checkpoint::save(&p, &[(to.to_string(), t)]).unwrap();
        p
    };
    let plain = forward("sample", &unet, &sample_in, &["--steps", "10"]);
    assert!(max_abs_diff(&rename(&plain, "ddim"), &exp, &["ddim"]) < 1e-4);
    let guided = forward(
        "sample",
        &unet,
        &sample_in,
        &["--steps", "10", "--guidance", "3"],
    );
    assert!(max_abs_diff(&rename(&guided, "ddim_cfg"), &exp, &["ddim_cfg"]) < 1e-4);

    let vae = fixture("vae");
    let enc = forward("vae-encode", &vae, &vae.join("inputs.safetensors"), &[]);
    assert!(max_abs_diff(&enc, &vae.join("expected.safetensors"), &["latent_mean"]) < 1e-4);
    let dec = forward("vae-decode", &vae, &vae.join("inputs.safetensors"), &[]);
    assert!(max_abs_diff(&dec, &vae.join("expected.safetensors"), &["pixel_values"]) < 1e-4);
}

/// The JSON lines of a run's steps.jsonl.
fn read_steps(run_dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run_dir.join("steps.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn binary_trains_with_the_reference_trainer() {
    let dir = scratch("train");
    let (ok, out, err) = deem(
        &[
            "train",
            "--single-process",
            "--steps",
            "3",
            "--quiet",
            "--run-dir",
            dir.to_str().unwrap(),
        ],
        &[],
    );
    assert!(ok, "{err}");
    assert!(out.starts_with("trained 3 steps: loss "), "{out}");
    let lines = read_steps(&dir);
    assert_eq!(lines.len(), 3);
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(l["step"], i as u64);
        for part in ["ntp", "nip", "csr"] {
            assert!(
                l[part].as_f64().unwrap() > 0.0,
                "stage I has every loss: {l}"
            );
        }
        let total = l["ntp"].as_f64().unwrap()
            + 5.0 * (l["nip"].as_f64().unwrap() + l["csr"].as_f64().unwrap());
        assert!((l["total"].as_f64().unwrap() - total).abs() < 1e-3, "{l}");
    }
    let weights = deem::checkpoint::Checkpoint::open(&dir.join("model.safetensors")).unwrap();
    for key in [
        "visual.trunk.stem.0.weight",
        "visual_tokenizer.proj_i.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "unet.conv_in.weight",
        "nip_condition.null_condition",
    ] {
        assert!(weights.contains(key), "{key}");
    }
    // Without --single-process the same job runs on the topology's actors and reports the same numbers.
    let piped = scratch("train-piped");
    let (ok, _, err) = deem(
        &[
            "train",
            "--steps",
            "3",
            "--quiet",
            "--run-dir",
            piped.to_str().unwrap(),
        ],
        &[],
    );
    assert!(ok, "{err}");
    let lines2 = read_steps(&piped);
    for (a, b) in lines.iter().zip(&lines2) {
        for part in ["total", "ntp", "nip", "csr", "grad_norm", "lr"] {
            // 1e-5, relative above 1: the f32 gradients' sums run in another order on the actors, and
            // at a grad norm of 35 one f32 ulp is already 3.8e-6.
            let (x, y) = (a[part].as_f64().unwrap(), b[part].as_f64().unwrap());
            assert!(
                (x - y).abs() < 1e-5 * x.abs().max(1.0),
                "{part}: {a} vs {b}"
            );
        }
    }
}

#[test]
fn training_exports_its_metrics() {
    let dir = scratch("train-metrics");
    let cfg = embedded_tiny();
    let metrics = deem_actors::runtime::metrics::Metrics::new();
    let topo = Topology::parse(
        deem_actors::runtime::topology::EMBEDDED_CPU,
        "cpu.toml",
        &cfg.config,
        0,
    )
    .unwrap();
    let job = deem_actors::cli::train::TrainJob {
        run_dir: dir,
        steps: Some(2),
        mode: deem_actors::cli::train::Mode::Pipeline(topo),
        progress: false,
        resume: false,
        data: None,
        init_from: None,
        pretrained: vec![],
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let reports = deem_actors::cli::train::run_job(&job, &cfg, &metrics, &rt).unwrap();
    let text = deem_actors::runtime::metrics::to_classic_text(&metrics.encode());
    assert!(text.contains("deem_train_steps_total 2\n"), "{text}");
    assert!(text.contains("deem_train_step_seconds_count 2\n"), "{text}");
    let scrape = scrape_text(&text);
    let loss = scrape
        .samples
        .iter()
        .find(|s| s.metric == "deem_train_loss" && s.labels.get("part") == Some("total"))
        .expect("deem_train_loss{part=total}");
    assert_eq!(loss.value, prometheus_parse::Value::Gauge(reports[1].total));
    for actor in ["vision", "llm0", "llm1", "diffusion"] {
        assert!(
            text.contains(&format!(
                "deem_train_actor_busy_seconds_total{{actor=\"{actor}\"}}"
            )),
            "{actor}: {text}"
        );
    }
    assert!(text.contains("deem_train_bubble_ratio "), "{text}");
    assert!(
        text.contains("deem_train_samples_total 8\n"),
        "2 steps × 4 rows: {text}"
    );
    let edge_bytes = scrape
        .samples
        .iter()
        .find(|s| {
            s.metric == "deem_pipeline_edge_bytes_total"
                && s.labels.get("edge") == Some("llm0: llm output")
        })
        .expect("bytes on the llm0 → llm1 edge");
    // 2 steps × 4 rows × T tokens × 64 channels × 4 bytes of hidden states.
    let t = deem::data::batches::SyntheticBatches::new(&cfg.config, 0).row_len();
    assert_eq!(
        edge_bytes.value,
        prometheus_parse::Value::Counter((2 * 4 * t * 64 * 4) as f64)
    );
    promtool_check(&text);
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Kills the child when dropped, so a failed assertion leaves nothing running.
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_scrapes_a_running_training() {
    if Command::new("prometheus")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("prometheus not installed: skipping (CI installs the Debian package)");
        return;
    }
    let dir = scratch("prometheus");
    let (deem_port, prom_port) = (free_port(), free_port());
    let _train = Reaped(
        Command::new(env!("CARGO_BIN_EXE_deem"))
            .args(["train", "--quiet", "--steps", "400", "--run-dir"])
            .arg(dir.join("run"))
            .args(["--metrics-addr", &format!("127.0.0.1:{deem_port}")])
            .current_dir(root())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: deem\n    static_configs:\n      - targets: [\"127.0.0.1:{deem_port}\"]\n"
        ),
    )
    .unwrap();
    let _prom = Reaped(
        Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let client = reqwest::Client::new();
    let query = format!(
        "http://127.0.0.1:{prom_port}/api/v1/query?query=deem_train_loss%7Bpart%3D%22total%22%7D"
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(90);
    loop {
        if let Ok(resp) = client.get(&query).send().await {
            if let Ok(body) = resp.json::<serde_json::Value>().await {
                if let Some(v) = body["data"]["result"][0]["value"][1].as_str() {
                    let loss: f64 = v.parse().unwrap();
                    assert!(loss.is_finite() && loss > 0.0, "{body}");
                    assert_eq!(body["data"]["result"][0]["metric"]["job"], "deem");
                    return;
                }
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "Prometheus never returned deem_train_loss"
        );
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
}

#[test]
fn pretrained_files_overlay_the_initialisation_and_bad_ones_are_named() {
    use std::collections::BTreeMap;
    use tch::Tensor;
    let dir = scratch("pretrained-overlay");
    let mut w: BTreeMap<String, Tensor> = [
        (
            "visual.trunk.stem.0.weight".to_string(),
            Tensor::zeros([2, 3], tch::kind::FLOAT_CPU),
        ),
        (
            "model.norm.weight".to_string(),
            Tensor::ones([4], tch::kind::FLOAT_CPU),
        ),
    ]
    .into_iter()
    .collect();
    let good = dir.join("good.safetensors");
    let stem = Tensor::arange(6, tch::kind::FLOAT_CPU).view([2, 3]);
    deem::checkpoint::save(&good, &[("visual.trunk.stem.0.weight".into(), stem.copy())]).unwrap();
    assert_eq!(deem_actors::cli::train::overlay(&mut w, &good).unwrap(), 1);
    assert_eq!(w["visual.trunk.stem.0.weight"], stem);
    assert_eq!(
        w["model.norm.weight"],
        Tensor::ones([4], tch::kind::FLOAT_CPU),
        "the rest is kept"
    );

    // A file with one good and one unknown tensor is refused whole.
    let unknown = dir.join("unknown.safetensors");
    deem::checkpoint::save(
        &unknown,
        &[
            (
                "model.norm.weight".into(),
                Tensor::zeros([4], tch::kind::FLOAT_CPU),
            ),
            ("text.proj.weight".into(), stem.copy()),
        ],
    )
    .unwrap();
    let err = deem_actors::cli::train::overlay(&mut w, &unknown).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "--pretrained {}: `text.proj.weight` is not a parameter of the model (is the file for another configuration?)",
            unknown.display()
        )
    );
    let shape = dir.join("shape.safetensors");
    deem::checkpoint::save(
        &shape,
        &[(
            "model.norm.weight".into(),
            Tensor::ones([5], tch::kind::FLOAT_CPU),
        )],
    )
    .unwrap();
    let err = deem_actors::cli::train::overlay(&mut w, &shape).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "--pretrained {}: `model.norm.weight` is [5], the model expects [4]",
            shape.display()
        )
    );
    assert_eq!(
        w["model.norm.weight"],
        Tensor::ones([4], tch::kind::FLOAT_CPU)
    );
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
            format!("`model.norm.weight` is [5], the model expects [{hidden}]"),
        ),
        (missing, "the model has no `model.norm.weight`".to_string()),
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
fn binary_experiment_keeps_finished_runs_adds_seeds_and_refuses_another_recipe() {
    let dir = scratch("experiment-resume");
    let data = dir.join("data");
    let out = dir.join("exp");
    let s = |p: &Path| p.display().to_string();
    let synth = [
        "data",
        "synth",
        "--out",
        &s(&data),
        "--seed",
        "3",
        "--pairs",
        "16",
        "--documents",
        "8",
        "--instructions",
        "0",
        "--regions",
        "0",
        "--text-scenes",
        "0",
        "--colour-questions",
        "16",
        "--label-questions",
        "0",
        "--shape-twins",
        "0",
        "--eval-per-split",
        "2",
    ];
    let (ok, _, err) = deem(&synth, &[]);
    assert!(ok, "{err}");
    let (ok, _, err) = deem(&["data", "robustvqa", "--data", &s(&data)], &[]);
    assert!(ok, "{err}");
    let instances = data.join("eval/id/instances.json");
    let pope = data.join("pope");
    let (ok, _, err) = deem(
        &[
            "data",
            "pope",
            "--instances",
            &s(&instances),
            "--out",
            &s(&pope),
            "--k",
            "1",
        ],
        &[],
    );
    assert!(ok, "{err}");
    let experiment = |seeds: &str, stage2_steps: &str| {
        deem(
            &[
                "experiment",
                "csr",
                "--data",
                &s(&data),
                "--out",
                &s(&out),
                "--seeds",
                seeds,
                "--stage1-steps",
                "2",
                "--stage2-steps",
                stage2_steps,
            ],
            &[("DEEM_LOG", "deem_actors::cli::experiment=info,warn")],
        )
    };
    let (ok, table1, err) = experiment("1", "2");
    assert!(ok, "{err}");
    assert!(table1.contains("over 1 seeds"), "{table1}");
    let model = out.join("seed0-csr5-stage2-1/model.safetensors");
    let written = std::fs::metadata(&model).unwrap().modified().unwrap();
    let json = |p: &Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
    };
    let first = json(&out.join("csr.json"));

    // Two seeds on the same folder: seed 0's six runs are kept, seed 1's are trained.
    let (ok, table2, err) = experiment("2", "2");
    assert!(ok, "{err}");
    assert!(table2.contains("over 2 seeds"), "{table2}");
    assert_eq!(
        err.matches("kept: finished by an earlier run").count(),
        4,
        "{err}"
    );
    assert_eq!(
        std::fs::metadata(&model).unwrap().modified().unwrap(),
        written
    );
    assert!(out.join("seed1-csr5-stage2-1/model.safetensors").exists());
    let second = json(&out.join("csr.json"));
    for (model, splits) in first.as_object().unwrap() {
        for (split, acc) in splits.as_object().unwrap() {
            // Seed 0's accuracy is the same number, re-evaluated from the kept weights.
            assert_eq!(second[model][split][0], acc[0], "{model} {split}");
            assert_eq!(second[model][split].as_array().unwrap().len(), 2);
        }
    }

    // Another stage II length is another experiment: refused before anything is trained or written.
    let (ok, _, err) = experiment("2", "3");
    assert!(!ok);
    let file = out.join("experiment.json");
    assert!(
        err.contains(&format!(
            "{}: the folder holds another experiment (stage2 differs:",
            file.display()
        )) && err.contains("choose another --out or remove it"),
        "{err}"
    );
    assert_eq!(json(&out.join("csr.json")), second);

    // No seeds is refused too, and leaves the table as it was.
    let (ok, _, err) = experiment("0", "2");
    assert!(!ok);
    assert!(
        err.contains("--seeds: expected at least 1, found 0"),
        "{err}"
    );
    assert_eq!(json(&out.join("csr.json")), second);
}

#[test]
fn shipped_pretrained_components_load_into_the_tiny_model() {
    let c = preset("tiny.toml").config;
    let mut w = deem::models::deem::initial_weights(&c).unwrap();
    let dir = root().join("assets/tiny-pretrained");
    let mut counts = Vec::new();
    for f in ["encoder", "encoder-scenes", "decoder", "llm"] {
        let file = dir.join(format!("{f}.safetensors"));
        counts.push(deem_actors::cli::train::overlay(&mut w, &file).unwrap());
    }
    // The two encoders are the same image tower (open_clip names), trained on other data.
    assert_eq!(counts[0], counts[1]);
    assert!(counts.iter().all(|&n| n > 0), "{counts:?}");
    let a = deem::checkpoint::Checkpoint::open(&dir.join("encoder.safetensors")).unwrap();
    let b = deem::checkpoint::Checkpoint::open(&dir.join("encoder-scenes.safetensors")).unwrap();
    let names = |ck: &deem::checkpoint::Checkpoint| {
        let mut v: Vec<String> = ck.names().map(String::from).collect();
        v.sort();
        v
    };
    assert_eq!(names(&a), names(&b));
    assert!(names(&a).iter().all(|n| n.starts_with("visual.")));
}
