//! The main job's report: loss curves, the evaluation table and CSR reconstructions; the RobustVQA
//! builder's baseline classifier.

mod common;

use deem::data::world::{self, Split};
use serde_json::json;

fn cfg() -> deem::config::DeemConfig {
    toml::from_str(include_str!("../configs/tiny.toml")).unwrap()
}

#[test]
fn the_report_has_losses_scores_and_reconstructions() {
    let dir = common::scratch("report");
    let run = dir.join("run");
    std::fs::create_dir_all(&run).unwrap();
    let steps: Vec<String> = (0..5)
        .map(|i| {
            json!({"step": i, "total": 10.0 - i as f64, "ntp": 6.0, "nip": 1.0, "csr": 0.5})
                .to_string()
        })
        .collect();
    std::fs::write(run.join("steps.jsonl"), steps.join("\n")).unwrap();
    let c = cfg();
    let weights: Vec<(String, tch::Tensor)> = deem::models::deem::initial_weights(&c)
        .unwrap()
        .into_iter()
        .collect();
    deem::checkpoint::save(&run.join("model.safetensors"), &weights).unwrap();
    let images: Vec<std::path::PathBuf> = (0..3)
        .map(|i| {
            let p = dir.join(format!("{i}.png"));
            world::scene(0, Split::Id, i, 64).render().save(&p).unwrap();
            p
        })
        .collect();
    let out = dir.join("report");
    std::fs::create_dir_all(&out).unwrap();
    deem_actors::cli::report::plot_reconstructions(
        &c,
        &run,
        &images,
        &out.join("csr_reconstructions.png"),
    )
    .unwrap();
    let sheet = image::open(out.join("csr_reconstructions.png")).unwrap();
    assert_eq!(
        (sheet.width(), sheet.height()),
        (3 * 68 * 3, (2 * 64 + 4) * 3)
    );
    let eval = json!({"pope/random": {"scores": {"n": 4, "accuracy": 0.75, "precision": 0.5, "recall": 1.0, "f1": 0.667, "yes_ratio": 0.75}}});
    let r = deem_actors::cli::report::read_run("stage-I", &run).unwrap();
    deem_actors::cli::report::write(&out, &[r], &eval, &["a note".into()]).unwrap();
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(
        md.contains("| stage-I | 5 | 10.0000 | 6.0000 | 6.0000 | 0.5000 |"),
        "{md}"
    );
    assert!(
        md.contains("| pope/random | 4 | 0.750 | 0.500 | 1.000 | 0.667 | 0.750 |"),
        "{md}"
    );
    assert!(md.contains("![CSR reconstructions](csr_reconstructions.png)"));
    assert!(image::open(out.join("losses.png")).unwrap().width() == 900);
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(j["evaluation"]["pope/random"]["accuracy"], 0.75);
}

#[test]
fn the_prototype_classifier_names_clean_in_distribution_objects() {
    // A lone, centred object is classified as itself (its prototype is the nearest).
    let clf = deem_actors::cli::report::PrototypeClassifier::new(64);
    let mut right = 0;
    for (c, s) in [(0usize, 1usize), (2, 6), (3, 0), (5, 3), (7, 7)] {
        let scene = world::Scene::single(
            world::Object {
                shape: s,
                colour: c,
                cx: 30.0,
                cy: 34.0,
                r: 17.0,
            },
            64,
        );
        let want = format!("{} {}", world::COLOURS[c].0, world::SHAPES[s]);
        if clf.rank(&scene.render())[0] == want {
            right += 1;
        }
    }
    assert!(right >= 4, "{right} of 5");
}

#[test]
fn the_model_classifier_scores_replies_as_incremental_decoding_does_and_mines_with_them() {
    use deem_actors::cli::report::{Miner, ModelClassifier, MAIN_OBJECT_QUESTION};
    let c = cfg();
    let dir = common::scratch("model-miner");
    let data = dir.join("data");
    let o = deem::data::synth::SynthOptions {
        seed: 2,
        size: 64,
        pairs: 0,
        documents: 0,
        instructions: 0,
        max_turns: 1,
        regions: 0,
        text_scenes: 0,
        colour_questions: 0,
        label_questions: 0,
        shape_twins: 0,
        eval_per_split: 3,
    };
    deem::data::synth::synthesize(&data, &o).unwrap();
    let init = deem::models::deem::initial_weights(&c).unwrap();
    let weights: Vec<(String, tch::Tensor)> = init
        .iter()
        .map(|(k, v)| (k.clone(), v.shallow_clone()))
        .collect();
    let ck = dir.join("model.safetensors");
    deem::checkpoint::save(&ck, &weights).unwrap();
    let tok =
        std::sync::Arc::new(deem::text::tokenizer::load_tokenizer(None, Some(&data), &c).unwrap());
    let clf = ModelClassifier::new(&c, &ck, tok.clone()).unwrap();
    let image = std::fs::read_dir(data.join("eval/id"))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .flat_map(|e| {
            std::fs::read_dir(e.path())
                .unwrap()
                .filter_map(|f| f.ok())
                .map(|f| f.path())
        })
        .next()
        .unwrap();
    let scores = clf.scores(&image).unwrap();
    assert_eq!(scores.len(), world::COLOURS.len() * world::SHAPES.len());

    // Reference: each reply decoded one id at a time through a KV cache, unbatched and unpadded.
    let vs = tch::nn::VarStore::new(tch::Device::Cpu);
    let model = deem::models::deem::Deem::new(&vs.root(), &c).unwrap();
    tch::no_grad(|| {
        for (name, mut v) in vs.variables() {
            v.copy_(&init[&name]);
        }
    });
    let q = deem::eval::Question {
        image: image.to_string_lossy().into_owned(),
        text: MAIN_OBJECT_QUESTION.into(),
        label: String::new(),
    };
    let req = deem_actors::cli::eval::request(
        &q,
        std::path::Path::new(""),
        &c,
        &tok,
        &deem_actors::cli::eval::Decoding::default(),
    )
    .unwrap();
    tch::no_grad(|| {
        let (visual, _) = model.vision.forward(req.images.as_ref().unwrap());
        for k in [0usize, 17, 89] {
            let (label, got) = &scores[k];
            let mut reply: Vec<i64> = tok
                .encode(&format!(" A {label}."), false)
                .unwrap()
                .into_iter()
                .map(i64::from)
                .collect();
            reply.push(c.llm.eos_token_id);
            let mut cache = model.llm.new_cache();
            let prompt = tch::Tensor::from_slice(&req.prompt).unsqueeze(0);
            let e = deem::models::deem::embed_for_generation(
                &model.llm,
                &prompt,
                Some(&visual),
                model.ids,
            )
            .unwrap();
            let mut h = model.llm.forward_layers(&e, 0, Some(&mut cache));
            let mut want = 0.0;
            for (pos, &t) in (req.prompt.len() as i64..).zip(&reply) {
                let last = h.narrow(1, h.size()[1] - 1, 1);
                let logp = model
                    .llm
                    .logits(&model.llm.norm(&last))
                    .log_softmax(-1, tch::Kind::Double);
                want += logp.reshape([-1]).double_value(&[t]);
                let e = deem::models::deem::embed_for_generation(
                    &model.llm,
                    &tch::Tensor::from_slice(&[t]).unsqueeze(0),
                    None,
                    model.ids,
                )
                .unwrap();
                h = model.llm.forward_layers(&e, pos, Some(&mut cache));
            }
            assert!(
                (got - want).abs() < 1e-3,
                "{label}: batched {got}, incremental {want}"
            );
        }
    });

    // Ranked by score; the mined negative is the best-ranked wrong label, with absolute image paths
    // when the file is written outside the data folder.
    let rank = clf.rank(&image).unwrap();
    let mut sorted = scores.clone();
    sorted.sort_by(|a, b| b.1.total_cmp(&a.1));
    assert_eq!(rank, sorted.iter().map(|s| s.0.clone()).collect::<Vec<_>>());
    let out = dir.join("mined.json");
    let counts = deem_actors::cli::report::build_robustvqa(
        &data,
        &[Split::Id],
        false,
        Miner::Model(&clf),
        &out,
    )
    .unwrap();
    assert_eq!(counts["synthetic_id"], 3);
    let mined: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    for e in mined["synthetic_id"].as_array().unwrap() {
        let f = std::path::Path::new(e["file_name"].as_str().unwrap());
        assert!(f.is_absolute() && f.exists(), "{}", f.display());
        let gt = e["gt_caption"].as_str().unwrap();
        let best_wrong = clf.rank(f).unwrap().into_iter().find(|l| l != gt).unwrap();
        assert_eq!(e["error_caption"], best_wrong.as_str());
    }
}
