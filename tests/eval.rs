//! Evaluation: yes/no parsing and scores, POPE's samplings, the RobustVQA builder's mined negatives, and
//! CIDEr-D caption scores.

mod common;
#[path = "common/synth.rs"]
mod synth_helpers;

use std::collections::BTreeSet;
use std::path::Path;

use deem::eval::{self, PopeSampling};

#[test]
fn yes_no_parsing_and_scores() {
    for (a, yes) in [
        ("Yes", true),
        ("yes, it is.", true),
        ("No", false),
        ("There is not a circle. But yes", false),
        ("The answer is no.", false),
        ("Nothing. no", true), // "nothing" is not "no"; only the first sentence counts
        ("", true),
    ] {
        assert_eq!(eval::parse_yes_no(a), yes, "{a:?}");
    }
    // 4 yes-labels, 4 no-labels; predictions: 3 TP, 1 FN, 1 FP, 3 TN.
    let label = [true, true, true, true, false, false, false, false];
    let pred = [true, true, true, false, true, false, false, false];
    let s = eval::score(&pred, &label);
    assert_eq!(s.n, 8);
    assert_eq!(s.accuracy, 0.75);
    assert_eq!(s.precision, 0.75);
    assert_eq!(s.recall, 0.75);
    assert_eq!(s.f1, 0.75);
    assert_eq!(s.yes_ratio, 0.5);
    let all_no = eval::score(&[false; 4], &[true, false, true, false]);
    assert_eq!(
        (all_no.precision, all_no.recall, all_no.f1, all_no.yes_ratio),
        (0.0, 0.0, 0.0, 0.0)
    );
}

fn instances() -> eval::Instances {
    let set = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
    eval::Instances {
        images: vec![
            ("a.png".into(), set(&["cat", "dog"])),
            ("b.png".into(), set(&["cat", "sofa"])),
            ("c.png".into(), set(&["cat", "sofa", "lamp"])),
            ("d.png".into(), set(&["car"])),
            ("e.png".into(), set(&[])),
        ],
        categories: ["car", "cat", "dog", "lamp", "sofa", "tree"]
            .map(String::from)
            .to_vec(),
    }
}

#[test]
fn pope_samplings_follow_their_definitions() {
    let inst = instances();
    for sampling in PopeSampling::ALL {
        let qs = eval::build_pope(&inst, sampling, 3, 1);
        // Images without objects get no questions; every image gets as many "no" as "yes".
        assert!(qs.iter().all(|q| q.image != "e.png"));
        for (file, present) in &inst.images[..4] {
            let mine: Vec<_> = qs.iter().filter(|q| &q.image == file).collect();
            let yes: Vec<_> = mine.iter().filter(|q| q.label == "yes").collect();
            let no: Vec<_> = mine.iter().filter(|q| q.label == "no").collect();
            assert_eq!(yes.len(), present.len().min(3));
            assert_eq!(no.len(), yes.len(), "{file} {}", sampling.name());
            for q in &no {
                let obj = q
                    .text
                    .strip_prefix("Is there a ")
                    .unwrap()
                    .strip_suffix(" in the image? Please answer yes or no.")
                    .unwrap();
                assert!(
                    !present.contains(obj),
                    "{} asks about a present {obj}",
                    sampling.name()
                );
            }
        }
    }
    let objects = |s: PopeSampling, file: &str| -> Vec<String> {
        eval::build_pope(&inst, s, 3, 1)
            .into_iter()
            .filter(|q| q.image == file && q.label == "no")
            .map(|q| q.text.split(' ').nth(3).unwrap().to_string())
            .collect()
    };
    // Popular: the most frequent absent categories (cat 3, sofa 2, then car/dog/lamp 1 by name).
    assert_eq!(objects(PopeSampling::Popular, "d.png"), ["cat"]);
    assert_eq!(objects(PopeSampling::Popular, "a.png"), ["sofa", "car"]);
    // Adversarial: the categories that co-occur most with the image's own (cat ↔ sofa twice, lamp once).
    assert_eq!(
        objects(PopeSampling::Adversarial, "a.png"),
        ["sofa", "lamp"]
    );
    // Random: seeded, so the same seed gives the same questions.
    assert_eq!(
        eval::build_pope(&inst, PopeSampling::Random, 3, 9),
        eval::build_pope(&inst, PopeSampling::Random, 3, 9)
    );
}

#[test]
fn robustvqa_builder_mines_the_classifiers_best_wrong_class() {
    let dir = common::scratch("robust-build");
    for (class, files) in [
        ("red_circle", ["1.png", "2.png"]),
        ("blue_star", ["3.png", "4.png"]),
    ] {
        std::fs::create_dir_all(dir.join(class)).unwrap();
        for f in files {
            std::fs::write(dir.join(class).join(f), b"").unwrap();
        }
    }
    // A fake classifier: right on 1.png and 3.png, wrong on the others.
    let classify = |p: &Path| -> Result<Vec<String>, deem::data::DataError> {
        let f = p.file_name().unwrap().to_string_lossy().into_owned();
        Ok(match f.as_str() {
            "1.png" => vec!["red circle".into(), "red square".into()],
            "2.png" => vec!["green circle".into(), "red circle".into()],
            "3.png" => vec!["blue star".into(), "blue ring".into()],
            _ => vec!["white star".into(), "blue star".into()],
        })
    };
    let all = eval::build_robustvqa(&dir, "r/", false, classify).unwrap();
    let got: Vec<(&str, &str, &str)> = all
        .iter()
        .map(|e| {
            (
                e.file_name.as_str(),
                e.gt_caption.as_str(),
                e.error_caption.as_str(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            ("r/blue_star/3.png", "blue star", "blue ring"),
            ("r/blue_star/4.png", "blue star", "white star"),
            ("r/red_circle/1.png", "red circle", "red square"),
            ("r/red_circle/2.png", "red circle", "green circle"),
        ]
    );
    let hard = eval::build_robustvqa(&dir, "r/", true, classify).unwrap();
    assert_eq!(hard.len(), 2, "only the misclassified images");
    // The JSON file gives a yes and a no question per entry.
    let f = dir.join("robustvqa.json");
    std::fs::write(
        &f,
        serde_json::to_string(&serde_json::json!({"synthetic_r": hard})).unwrap(),
    )
    .unwrap();
    let qs = eval::read_robustvqa(&f).unwrap();
    assert_eq!(qs["synthetic_r"].len(), 4);
    assert_eq!(
        qs["synthetic_r"][0].text,
        "Is blue star the main object in this image? Please answer yes or no."
    );
    assert_eq!(qs["synthetic_r"][1].label, "no");
}

/// CIDEr-D equals coco-caption's (values from pycocoevalcap 1.2 on the same captions:
/// `scripts/cider_reference.py`); exact match and word F1 by hand; answers are cut to their first
/// sentence and lowercased.
#[test]
fn caption_scores_follow_coco_captions_cider_d() {
    let refs = [
        "the red circle",
        "the blue square",
        "the green star",
        "the red star",
        "a small yellow triangle near the top",
    ];
    let answers = [
        "The red circle. It is large",
        "the red square",
        "green star!",
        "the blue circle",
        "A yellow triangle near the top of the image",
    ];
    let words =
        |v: &[&str]| -> Vec<Vec<String>> { v.iter().map(|s| eval::caption_words(s)).collect() };
    let got = eval::cider_d(
        &words(&answers),
        &words(&refs)
            .into_iter()
            .map(|r| vec![r])
            .collect::<Vec<_>>(),
    );
    let want = [
        7.5,
        1.5362427009153787,
        4.208902141619931,
        0.0,
        5.35462216729208,
    ];
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() < 1e-9, "caption {i}: {g} vs {w}");
    }
    let s = eval::score_captions(&answers.map(String::from), &refs.map(String::from));
    assert_eq!(s.n, 5);
    assert!((s.cider - 3.7199534019654776).abs() < 1e-9, "{}", s.cider);
    assert!((s.exact_match - 0.2).abs() < 1e-12);
    // Word F1 per caption: 1, 2/3, 0.8, 1/3, 0.75.
    assert!((s.word_f1 - 0.71).abs() < 1e-12, "{}", s.word_f1);
    assert_eq!(
        eval::caption_words("The red circle. It is large"),
        ["the", "red", "circle"]
    );
    assert!(eval::caption_words("").is_empty());
}
