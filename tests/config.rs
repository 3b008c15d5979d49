//! Layered configuration (file < env < CLI), its error messages and semantic validation, RoPE scaling, data sources, and `deem config show`.

mod common;

#[path = "common/runtime.rs"]
mod rt;
use common::scratch;
use rt::*;

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
             `weight_decay`, `max_grad_norm`, `nip_loss_weight`, `csr_loss_weight`, `schedule`, `recompute`, `loss_scale_init`, `train_lm_head`, `train_llm_in_stage_one`, `loss_on_prompts`, `isolate_documents`, `checkpoint_every`, `max_restarts`, `data_workers`, `prefetch`, `sources`",
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
         `diffusion`, `train`, `serve`, `data`, `fault`"
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
fn recompute_takes_none_full_or_a_layer_count() {
    use deem::config::Recompute;
    let dir = scratch("recompute");
    let p = tiny_with(&dir, "seed = 0", "seed = 0");
    for (set, want) in [
        ("train.recompute=\"full\"", Recompute::Full),
        ("train.recompute={ layers = 2 }", Recompute::Layers(2)),
        ("train.recompute=\"none\"", Recompute::None),
    ] {
        assert_eq!(
            load(&p, &[], &[set]).unwrap().config.train.recompute,
            want,
            "{set}"
        );
    }
    assert_eq!(Recompute::Layers(2).layers_of(4), 2);
    assert_eq!(
        Recompute::Layers(9).layers_of(4),
        4,
        "at most the shard's layers"
    );
    assert_eq!(
        Recompute::Full.layers_of(4),
        0,
        "full recomputes whole stages instead"
    );
    let err = load(&p, &[], &["train.recompute=\"some\""])
        .unwrap_err()
        .to_string();
    assert!(err.contains("train.recompute"), "{err}");
}
