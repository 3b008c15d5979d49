//! The main job's report: loss curves, the evaluation table and CSR reconstructions; the RobustVQA
//! builder's baseline classifier.

mod common;

use deem::world::{self, Split};
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
    let weights: Vec<(String, tch::Tensor)> = deem_actors::pipeline::driver::initial_weights(&c)
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
    deem_actors::report::plot_reconstructions(
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
    let r = deem_actors::report::read_run("stage-I", &run).unwrap();
    deem_actors::report::write(&out, &[r], &eval, &["a note".into()]).unwrap();
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
    let clf = deem_actors::report::PrototypeClassifier::new(64);
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
