//! The `deem` binary itself: info, errors on stderr, `forward` against the reference outputs, training with the reference trainer and with data sources, and `experiment csr`.

mod common;

#[path = "common/runtime.rs"]
mod rt;
use common::{fixture, scratch};
use rt::*;

use std::path::Path;

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
    let m = deem_actors::cli::train_data::dataset_batches(&cfg, &data, &metrics).unwrap();
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
        deem_actors::cli::train_data::dataset_batches(&cfg, &data, &metrics)
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
    let m = deem_actors::cli::train_data::dataset_batches(&cfg, &data, &metrics).unwrap();
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
            "{} (train.sources[0].images): not a folder or a tar shard; expected where ann/questions.json's image paths point",
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
    assert!(
        out.contains("c10d              TCPStore, Gloo; NCCL"),
        "{out}"
    );
    // CUDA is linked (so a GPU machine sees its devices) and the binary still runs without one.
    if !tch::Cuda::is_available() {
        assert!(
            out.contains("CUDA              not available (0 devices)"),
            "{out}"
        );
    }
}

#[test]
fn the_binary_links_libtorch_cuda_so_a_gpu_machine_sees_its_devices() {
    // libtorch registers its CUDA backend only when libtorch_cuda.so is loaded; a binary that does not
    // link it reports no CUDA even on a GPU machine. readelf reads what the binary will load.
    let out = std::process::Command::new("readelf")
        .args(["-d", env!("CARGO_BIN_EXE_deem")])
        .output()
        .expect("readelf (binutils) runs");
    let text = String::from_utf8_lossy(&out.stdout);
    for lib in ["libtorch_cuda.so", "libc10_cuda.so", "libtorch_cpu.so"] {
        assert!(
            text.contains(&format!("Shared library: [{lib}]")),
            "{lib} is not linked:\n{text}"
        );
    }
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
    // The other samplers (DDPM reads its per-step noise from the inputs, stacked).
    let samplers = unet.join("samplers.safetensors");
    let sam = deem::checkpoint::Checkpoint::open(&samplers).unwrap();
    let noise: Vec<tch::Tensor> = (0..10)
        .map(|i| sam.tensor(&format!("ddpm_noise_{i}")).unwrap().unwrap())
        .collect();
    deem::checkpoint::save(
        &sample_in,
        &[
            ("noise".into(), get("sample")),
            ("encoder_hidden_states".into(), get("encoder_hidden_states")),
            ("uncond_hidden_states".into(), get("uncond_hidden_states")),
            ("step_noise".into(), tch::Tensor::stack(&noise, 0)),
        ],
    )
    .unwrap();
    for (scheduler, name) in [("ddpm", "ddpm_cfg"), ("dpmsolver++", "dpm_cfg")] {
        let args = ["--steps", "10", "--guidance", "3", "--scheduler", scheduler];
        let out = forward("sample", &unet, &sample_in, &args);
        assert!(
            max_abs_diff(&rename(&out, name), &samplers, &[name]) < 1e-4,
            "{scheduler}"
        );
    }

    let vae = fixture("vae");
    let enc = forward("vae-encode", &vae, &vae.join("inputs.safetensors"), &[]);
    assert!(max_abs_diff(&enc, &vae.join("expected.safetensors"), &["latent_mean"]) < 1e-4);
    let dec = forward("vae-decode", &vae, &vae.join("inputs.safetensors"), &[]);
    assert!(max_abs_diff(&dec, &vae.join("expected.safetensors"), &["pixel_values"]) < 1e-4);
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
fn data_check_reports_what_the_mmc4_rules_dropped() {
    let dir = scratch("mmc4-check");
    image::RgbImage::new(8, 8).save(dir.join("a.png")).unwrap();
    let doc = |sims: &[f64]| {
        let info: Vec<String> = sims
            .iter()
            .map(|s| {
                format!(r#"{{"image_name": "a.png", "matched_text_index": 0, "matched_sim": {s}}}"#)
            })
            .collect();
        format!(
            r#"{{"text_list": ["a"], "image_info": [{}]}}"#,
            info.join(", ")
        )
    };
    let lines = [doc(&[0.3, 0.2]), doc(&[]), doc(&[0.5; 7])];
    let file = dir.join("mmc4.jsonl");
    std::fs::write(&file, lines.join("\n") + "\n").unwrap();
    let (ok, out, err) = deem(
        &[
            "data",
            "check",
            "--format",
            "mmc4",
            file.to_str().unwrap(),
            "--set",
            "data.mmc4.drop_one_image_share=0.0",
        ],
        &[],
    );
    assert!(ok, "{err}");
    assert_eq!(
        out,
        format!(
            "{}: 2 mmc4 records, 0 bad; dropped by the rules: 1 documents without images, 1 images below data.mmc4.min_similarity, 1 images past data.mmc4.max_images\n",
            file.display()
        )
    );
    let _ = std::fs::remove_dir_all(&dir);
}
