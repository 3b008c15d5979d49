//! The one loader: checkpoints written by transformers (a bf16 sharded LLaMA folder), diffusers (a
//! Stable Diffusion pipeline folder) and open_clip (a ConvNeXt CLIP with its text tower), made by
//! `tests/fixtures/pretrained.py`, start training unchanged, alone and together, on one device and over
//! actors; what each file fills equals the file; files that fit no role are refused naming them.

mod common;

#[path = "common/runtime.rs"]
mod rt;
use common::{root, scratch};
use rt::*;

use std::path::{Path, PathBuf};

use deem::models::deem::{Deem, Part};
use deem::models::pretrained::{part_spec, Pretrained, Role};
use deem_actors::cli::train::{run_job, Mode, TrainJob};
use deem_actors::settings::LoadedConfig;

fn fixture(name: &str) -> PathBuf {
    root().join("tests/fixtures/pretrained").join(name)
}

fn config() -> LoadedConfig {
    load(
        &fixture("deem.toml"),
        &[],
        &[
            "train.warmup_steps=1",
            "train.checkpoint_every=0",
            "train.train_llm_in_stage_one=true",
        ],
    )
    .unwrap()
}

fn job(run_dir: &Path, mode: Mode, pretrained: Vec<PathBuf>) -> TrainJob {
    TrainJob {
        run_dir: run_dir.to_path_buf(),
        steps: Some(3),
        mode,
        progress: false,
        resume: false,
        data: None,
        init_from: None,
        pretrained,
        stop_at: None,
    }
}

/// Every tensor each file fills equals, in the step-0 checkpoint (written right after loading), the
/// file's value converted to the model's dtype.
fn assert_loaded(run_dir: &Path, paths: &[PathBuf]) {
    let step0 = deem::checkpoint::Checkpoint::open(&run_dir.join("checkpoints/step-0")).unwrap();
    let pre = Pretrained::open(paths, None).unwrap();
    let mut n = 0;
    for s in &pre.sources {
        for (name, key) in s.entries() {
            let want = s.tensor(key).unwrap().unwrap().to_kind(tch::Kind::Float);
            let got = step0.tensor(name).unwrap().unwrap();
            assert!(got.equal(&want), "{name} ≠ {} `{key}`", s.path.display());
            n += 1;
        }
    }
    assert!(n > 0);
}

#[test]
fn library_checkpoints_are_recognised_and_fill_their_modules() {
    let cfg = config();
    let paths = [
        fixture("vicuna"),
        fixture("sd"),
        fixture("open_clip_model.safetensors"),
    ];
    let pre = Pretrained::open(&paths, Some(&cfg.config)).unwrap();
    let roles: Vec<(String, Role)> = pre
        .sources
        .iter()
        .map(|s| {
            let p = s.path.strip_prefix(fixture("")).unwrap();
            (p.display().to_string(), s.role)
        })
        .collect();
    assert_eq!(
        roles,
        [
            ("vicuna".to_string(), Role::Llm),
            ("sd/unet".into(), Role::Unet),
            ("sd/vae".into(), Role::Vae),
            ("open_clip_model.safetensors".into(), Role::OpenClip),
        ]
    );
    assert_eq!(
        pre.notes,
        [format!(
            "{}: skipping the pipeline's text_encoder, tokenizer (DEEM's image decoder is its UNet and VAE)",
            fixture("sd").display()
        )]
    );
    // The text tower is skipped by name, and nothing else is.
    let clip = &pre.sources[3];
    assert_eq!(
        clip.skipped.keys().copied().collect::<Vec<_>>(),
        ["open_clip text tower"]
    );
    assert!(clip.skipped["open_clip text tower"]
        .iter()
        .any(|k| k.starts_with("transformer.resblocks.")));

    let vs = tch::nn::VarStore::new(tch::Device::Cpu);
    Deem::new(&vs.root(), &cfg.config).unwrap();
    let filled = pre
        .load_into(&vs, &part_spec(&cfg.config, &Part::Whole), false, |_, _| {})
        .unwrap();
    // Each file fills every parameter of its module (the LLaMA: all 39 tensors of its index).
    let counts: Vec<usize> = filled.by_source.iter().map(Vec::len).collect();
    let vars = vs.variables();
    let under = |p: &str| vars.keys().filter(|k| k.starts_with(p)).count();
    assert_eq!(
        counts,
        [
            39,
            under("unet."),
            under("vae."),
            under("visual.") - under("visual.adapter_")
        ]
    );
    // DEEM's own modules keep their initialisation.
    let kept = &filled.kept;
    for prefix in [
        "visual.adapter_",
        "visual_tokenizer.",
        "nip_condition.",
        "model.soi_embedding",
        "model.embed_tokens_new",
        "lm_head_new",
    ] {
        assert!(kept.iter().any(|k| k.starts_with(prefix)), "{prefix}");
    }
    for prefix in [
        "unet.",
        "vae.",
        "model.layers.",
        "visual.trunk.",
        "lm_head.",
    ] {
        assert!(!kept.iter().any(|k| k.starts_with(prefix)), "{prefix}");
    }
}

#[test]
fn train_starts_from_each_library_checkpoint_and_from_all_together() {
    let dir = scratch("pretrained-train");
    let cfg = config();
    let all = vec![
        fixture("vicuna"),
        fixture("sd"),
        fixture("open_clip_model.safetensors"),
    ];
    let mut cases: Vec<(String, Vec<PathBuf>, bool)> = all
        .iter()
        .enumerate()
        .map(|(i, p)| (format!("one-{i}"), vec![p.clone()], false))
        .collect();
    cases.push(("all".into(), all.clone(), false));
    cases.push(("all-actors".into(), all, true));
    for (name, paths, actors) in cases {
        let run_dir = dir.join(&name);
        let mode = if actors {
            Mode::Pipeline(cpu_topology(&cfg.config))
        } else {
            Mode::SingleProcess(deem::DeviceSpec::Cpu)
        };
        let rt = tokio::runtime::Runtime::new().unwrap();
        let metrics = std::sync::Arc::new(deem_actors::runtime::metrics::Metrics::new());
        let reports = run_job(&job(&run_dir, mode, paths.clone()), &cfg, &metrics, &rt)
            .unwrap_or_else(|e| panic!("{name}: {e:#}"));
        assert_eq!(reports.len(), 3, "{name}");
        assert!(reports.iter().all(|r| r.total.is_finite()), "{name}");
        assert_loaded(&run_dir, &paths);
    }
}

#[test]
fn files_that_fit_no_role_or_not_the_model_are_refused_naming_them() {
    let dir = scratch("pretrained-refused");
    let cfg = config();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let metrics = std::sync::Arc::new(deem_actors::runtime::metrics::Metrics::new());
    let err = |paths: Vec<PathBuf>, c: &LoadedConfig| {
        let run_dir = dir.join("run");
        let e = run_job(
            &job(&run_dir, Mode::SingleProcess(deem::DeviceSpec::Cpu), paths),
            c,
            &metrics,
            &rt,
        )
        .unwrap_err();
        assert!(!run_dir.join("checkpoints").exists(), "{e:#}");
        format!("{e:#}")
    };
    let stray = dir.join("stray.safetensors");
    let t = tch::Tensor::zeros([2], tch::kind::FLOAT_CPU);
    deem::checkpoint::save(&stray, &[("text.proj.weight".into(), t.copy())]).unwrap();
    assert_eq!(
        err(vec![fixture("vicuna"), stray.clone()], &cfg),
        format!(
            "--pretrained {}: its tensors (text.proj.weight, …) fit none of the roles; expected an HF LLaMA \
             folder or file (`config.json` with `model_type = \"llama\"`, or `model.layers.*` tensors), a \
             diffusers pipeline folder (`model_index.json`) or its `unet/` or `vae/` folder, an open_clip \
             checkpoint (`visual.*` tensors), a Q-Former (`qformer.*`), or a deem model (a run directory or \
             its `model.safetensors`)",
            stray.display()
        )
    );
    // An LLM file with a tensor that is no parameter is refused whole.
    let extra = dir.join("extra.safetensors");
    deem::checkpoint::save(
        &extra,
        &[
            ("model.norm.weight".into(), t.copy()),
            ("model.bogus.weight".into(), t.copy()),
        ],
    )
    .unwrap();
    assert_eq!(
        err(vec![extra.clone()], &cfg),
        format!(
            "--pretrained: {}: the checkpoint does not fit the model (HF LLaMA) module:\n  unexpected keys (1): \
             model.bogus.weight\n  wrong shape: model.norm.weight is [2] in the file, the module expects [32]",
            extra.display()
        )
    );
    // The LLaMA folder against a model of another width names the file and the tensors.
    let wide = load(&fixture("deem.toml"), &[], &["llm.intermediate_size=96"]).unwrap();
    let e = err(vec![fixture("vicuna")], &wide);
    assert!(
        e.starts_with(&format!(
            "--pretrained: {}: the checkpoint does not fit the model (HF LLaMA) module:\n  wrong shape: \
             model.layers.0.mlp.down_proj.weight is [32, 64] in the file, the module expects [32, 96]",
            fixture("vicuna").display()
        )),
        "{e}"
    );
    // A pipeline trained with another noise schedule.
    let sd = dir.join("sd");
    copy_dir(&fixture("sd"), &sd);
    let sched = sd.join("scheduler/scheduler_config.json");
    let text = std::fs::read_to_string(&sched)
        .unwrap()
        .replace("\"epsilon\"", "\"v_prediction\"");
    std::fs::write(&sched, text).unwrap();
    assert_eq!(
        err(vec![sd], &cfg),
        format!(
            "--pretrained {}: `prediction_type` is \"v_prediction\"; diffusion.scheduler.prediction_type is \
             \"epsilon\" (the UNet was trained with this schedule: set diffusion.scheduler to match)",
            sched.display()
        )
    );
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.path().is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}
