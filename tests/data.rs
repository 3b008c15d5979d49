//! The synthetic world and the dataset readers: generation is deterministic per seed, every reader
//! round-trips what `synthesize` writes, bad records are skipped and counted, and the evaluation
//! scoring and builders follow their definitions.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use deem::data::readers;
use deem::data::synth::{self, SynthOptions};
use deem::data::world::{self, Split};
use deem::eval::{self, PopeSampling};
use tch::Tensor;

fn small(seed: u64) -> SynthOptions {
    SynthOptions {
        seed,
        size: 32,
        pairs: 6,
        documents: 3,
        instructions: 8,
        max_turns: 4,
        regions: 4,
        text_scenes: 12,
        colour_questions: 7,
        label_questions: 9,
        shape_twins: 3,
        eval_per_split: 5,
    }
}

fn files_under(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let rel = p.strip_prefix(dir).unwrap().to_string_lossy().into_owned();
                out.push((rel, std::fs::read(&p).unwrap()));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn the_world_has_enough_shapes_colours_and_distinct_splits() {
    assert!(world::SHAPES.len() >= 8 && world::COLOURS.len() >= 8);
    let mut labels = BTreeSet::new();
    for i in 0..200 {
        let s = world::scene(1, Split::Id, i, 64);
        assert!((1..=3).contains(&s.objects.len()));
        // The main object is the largest and its mask is not empty.
        assert!(s.objects.iter().all(|o| o.r <= s.main().r));
        assert!(s.main().mask(64).iter().any(|&b| b));
        labels.insert(s.main().label());
    }
    assert!(labels.len() > 40, "{} distinct main objects", labels.len());
    // The same scene index renders differently in each split.
    let renders: Vec<_> = Split::ALL
        .iter()
        .map(|&sp| world::scene(1, sp, 3, 64).render().into_raw())
        .collect();
    for i in 0..renders.len() {
        for j in i + 1..renders.len() {
            assert_ne!(renders[i], renders[j]);
        }
    }
}

#[test]
fn rle_and_polygons_round_trip() {
    let s = world::scene(4, Split::Id, 0, 48);
    let m = s.main().mask(48);
    let counts = world::rle_counts(&m, 48, 48);
    assert_eq!(counts.iter().sum::<u32>(), 48 * 48);
    assert_eq!(world::rle_decode(&counts, 48, 48).unwrap(), m);
    assert_eq!(
        world::rle_decode(&counts[1..], 48, 48)
            .unwrap_err()
            .to_string(),
        format!(
            "RLE counts sum to {}, expected width × height = 2304",
            2304 - counts[0]
        )
    );
    // A square polygon covers exactly its pixels.
    let sq = world::polygon_mask(&[2.0, 2.0, 6.0, 2.0, 6.0, 6.0, 2.0, 6.0], 8, 8);
    assert_eq!(sq.iter().filter(|&&b| b).count(), 16);
    assert!(sq[2 * 8 + 2] && sq[5 * 8 + 5] && !sq[6 * 8 + 6]);
}

/// pycocotools' compressed RLE strings (`mask.encode` of Fortran-ordered masks, pycocotools 2.0) decode
/// to the run lengths pycocotools' masks have: a blob, a speckle (long strings, negative deltas),
/// counts above 1024 (three 5-bit groups), a full and an empty mask; bad strings are named.
#[test]
fn compressed_rle_strings_decode_as_pycocotools_encodes_them() {
    let cases: [(&str, &[u32]); 4] = [
        (
            "_15>2N2N2O00000001N2N2Nf1",
            &[
                47, 5, 14, 7, 12, 9, 10, 11, 9, 11, 9, 11, 9, 11, 9, 11, 10, 9, 12, 7, 14, 5, 68,
            ],
        ),
        (
            "eU1b1:00000000000000000YV1aNVkN0000000000000000000000000000000000000ja0",
            &[
                1205, 50, 10, 50, 10, 50, 10, 50, 10, 50, 10, 50, 10, 50, 10, 50, 10, 50, 10, 50,
                1235, 3, 57, 3, 57, 3, 57, 3, 57, 3, 57, 3, 57, 3, 57, 3, 57, 3, 57, 3, 57, 3, 57,
                3, 57, 3, 57, 3, 57, 3, 57, 3, 57, 3, 57, 3, 57, 3, 57, 3, 627,
            ],
        ),
        ("0<", &[0, 12]),
        ("?", &[15]),
    ];
    for (s, want) in cases {
        assert_eq!(world::rle_from_string(s).unwrap(), want, "{s}");
        assert_eq!(world::rle_to_string(want), s);
    }
    let speckle =
        world::rle_from_string("1122ON3050I1O00O1001OO1110OO010O0080L0K040M00121ON10N001O020022MM")
            .unwrap();
    assert_eq!(speckle.len(), 65);
    assert_eq!(speckle[..12], [1, 1, 2, 3, 1, 1, 4, 1, 9, 1, 2, 2]);
    assert_eq!(speckle.iter().sum::<u32>(), 13 * 11);
    let ones: u32 = speckle.iter().skip(1).step_by(2).sum();
    assert_eq!(ones, 49);
    assert_eq!(
        world::rle_to_string(&speckle),
        "1122ON3050I1O00O1001OO1110OO010O0080L0K040M00121ON10N001O020022MM"
    );
    assert_eq!(
        world::rle_from_string("0 ").unwrap_err().to_string(),
        "compressed RLE counts: character ' ' at 1 is not a count digit"
    );
    assert_eq!(
        world::rle_from_string("1a").unwrap_err().to_string(),
        "compressed RLE counts end inside a number (after 1 counts)"
    );
}

#[test]
fn synthesis_is_deterministic_per_seed() {
    let (a, b, c) = (
        common::scratch("synth-a"),
        common::scratch("synth-b"),
        common::scratch("synth-c"),
    );
    synth::synthesize(&a, &small(7)).unwrap();
    synth::synthesize(&b, &small(7)).unwrap();
    synth::synthesize(&c, &small(8)).unwrap();
    let (fa, fb, fc) = (files_under(&a), files_under(&b), files_under(&c));
    assert!(fa.len() > 50, "{} files", fa.len());
    assert_eq!(fa, fb, "same seed, same bytes");
    let pairs = |f: &[(String, Vec<u8>)]| {
        f.iter()
            .find(|(n, _)| n == "pairs.jsonl")
            .unwrap()
            .1
            .clone()
    };
    assert_ne!(pairs(&fa), pairs(&fc), "another seed, other data");
}

#[test]
fn every_reader_round_trips_what_synth_writes() {
    let dir = common::scratch("synth-read");
    let o = small(3);
    synth::synthesize(&dir, &o).unwrap();

    let pairs = readers::read_pairs_jsonl(&dir.join("pairs.jsonl"), None).unwrap();
    assert!(pairs.bad.is_empty(), "{:?}", pairs.bad);
    assert_eq!(pairs.records.len(), o.pairs);
    for (i, p) in pairs.records.iter().enumerate() {
        let s = world::scene(o.seed, Split::Id, i as u64, o.size);
        assert_eq!(p.caption, s.caption());
        assert_eq!(
            p.image.as_raw(),
            s.render().as_raw(),
            "pair {i}: PNG is lossless"
        );
    }
    let tar = readers::read_pairs_tar(&dir.join("pairs-000000.tar"), None).unwrap();
    assert!(tar.bad.is_empty(), "{:?}", tar.bad);
    assert_eq!(tar.records.len(), o.pairs);
    for (t, j) in tar.records.iter().zip(&pairs.records) {
        assert_eq!(
            (t.caption.as_str(), t.image.as_raw()),
            (j.caption.as_str(), j.image.as_raw())
        );
    }

    let docs = readers::read_mmc4(&dir.join("mmc4.jsonl"), None).unwrap();
    assert!(docs.bad.is_empty(), "{:?}", docs.bad);
    assert_eq!(docs.records.len(), o.documents);
    for d in &docs.records {
        assert!((2..=4).contains(&d.images.len()));
        for (_, t) in &d.images {
            assert!(
                d.texts[*t].starts_with("This image shows a "),
                "{}",
                d.texts[*t]
            );
        }
    }

    let conv = readers::read_llava(&dir.join("llava.json"), None).unwrap();
    assert!(conv.bad.is_empty(), "{:?}", conv.bad);
    assert_eq!(conv.records.len(), o.instructions);
    assert!(conv
        .records
        .iter()
        .all(|c| c.image.is_some() && c.turns[0].0.starts_with("<image>\n")));
    let kinds: BTreeSet<&str> = conv.records.iter().map(|c| c.turns[0].1.as_str()).collect();
    assert!(kinds.contains("Yes") && kinds.contains("No"), "{kinds:?}");

    let regions = readers::read_regions(&dir.join("regions.json"), None).unwrap();
    assert!(regions.bad.is_empty(), "{:?}", regions.bad);
    // One region per object of each region scene.
    assert!(regions.records.len() >= o.regions);
    for r in &regions.records {
        let area = r.mask.iter().filter(|&&b| b).count();
        assert!(area > 0, "{}", r.caption);
        assert!(r.caption.starts_with("the "));
    }
}

/// Every record of a region file against the scenes it was drawn from: caption, image and mask (RLE
/// exact; the square and diamond polygons up to edge pixels).
fn check_regions(records: &[readers::Region], scenes: &[world::Scene], size: u32) {
    let mut i = 0;
    for s in scenes {
        for ob in &s.objects {
            let r = &records[i];
            assert_eq!(r.caption, format!("the {}", ob.label()));
            assert_eq!(r.image, s.render());
            let truth = ob.mask(size);
            let inter = truth
                .iter()
                .zip(&r.mask)
                .filter(|(a, b)| **a && **b)
                .count() as f64;
            let union = truth
                .iter()
                .zip(&r.mask)
                .filter(|(a, b)| **a || **b)
                .count() as f64;
            let iou = inter / union;
            if ob.shape == 0 || ob.shape == 3 {
                assert!(iou > 0.75, "{}: IoU {iou}", ob.label());
            } else {
                assert_eq!(r.mask, truth, "{}", ob.label());
            }
            i += 1;
        }
    }
    assert_eq!(i, records.len());
}

#[test]
fn region_masks_equal_the_objects_they_describe() {
    let dir = common::scratch("synth-regions");
    let o = SynthOptions {
        pairs: 0,
        documents: 0,
        instructions: 0,
        regions: 6,
        eval_per_split: 3,
        ..small(5)
    };
    synth::synthesize(&dir, &o).unwrap();
    let regions = readers::read_regions(&dir.join("regions.json"), None).unwrap();
    let scenes: Vec<_> = (0..o.regions as u64)
        .map(|k| world::scene(o.seed, Split::Id, k, o.size))
        .collect();
    check_regions(&regions.records, &scenes, o.size);
    // Held-out regions per evaluation split, on the evaluation scenes.
    for split in Split::ALL {
        let f = dir.join(format!("eval/regions_{}.json", split.name()));
        let r = readers::read_regions(&f, None).unwrap();
        assert!(r.bad.is_empty(), "{:?}", r.bad);
        let scenes: Vec<_> = (0..o.eval_per_split as u64)
            .map(|k| synth::eval_scene(o.seed, split, k, o.size))
            .collect();
        check_regions(&r.records, &scenes, o.size);
    }
}

/// The same region file with every RLE's counts written as pycocotools' compressed strings reads the same
/// masks.
#[test]
fn region_files_with_compressed_rle_read_the_same_masks() {
    let dir = common::scratch("synth-regions-compressed");
    let o = SynthOptions {
        pairs: 0,
        documents: 0,
        instructions: 0,
        regions: 6,
        eval_per_split: 0,
        ..small(7)
    };
    synth::synthesize(&dir, &o).unwrap();
    let plain = readers::read_regions(&dir.join("regions.json"), None).unwrap();
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("regions.json")).unwrap()).unwrap();
    let mut compressed = 0;
    for a in json["annotations"].as_array_mut().unwrap() {
        let seg = &mut a["segmentation"];
        if let Some(list) = seg.get("counts").and_then(|c| c.as_array()) {
            let counts: Vec<u32> = list.iter().map(|c| c.as_u64().unwrap() as u32).collect();
            seg["counts"] = serde_json::json!(world::rle_to_string(&counts));
            compressed += 1;
        }
    }
    assert!(compressed > 0);
    let f = dir.join("regions_compressed.json");
    std::fs::write(&f, json.to_string()).unwrap();
    let read = readers::read_regions(&f, None).unwrap();
    assert!(read.bad.is_empty(), "{:?}", read.bad);
    assert_eq!(read.records.len(), plain.records.len());
    for (a, b) in read.records.iter().zip(&plain.records) {
        assert_eq!(a.mask, b.mask);
        assert_eq!(a.caption, b.caption);
    }
}

/// A shard as img2dataset writes it: keys under a folder, `.jpg` + `.txt` + `.json`, a sample with its
/// caption only in `.json`, the `.json` of a failed download without an image, an extra `x.seg.png`
/// member (webdataset's key is up to the first dot: it is not `x`'s image), upper-case extensions, a
/// WebP image.
#[test]
fn img2dataset_style_shards_are_read_as_webdataset_keys_them() {
    let dir = common::scratch("wds");
    let png = |c: u8| {
        let mut v = Vec::new();
        image::RgbImage::from_pixel(4, 4, image::Rgb([c, 0, 0]))
            .write_to(&mut std::io::Cursor::new(&mut v), image::ImageFormat::Png)
            .unwrap();
        v
    };
    let webp = |c: u8| {
        let mut v = Vec::new();
        image::RgbImage::from_pixel(4, 4, image::Rgb([c, 0, 0]))
            .write_to(&mut std::io::Cursor::new(&mut v), image::ImageFormat::WebP)
            .unwrap();
        v
    };
    let members: Vec<(&str, Vec<u8>)> = vec![
        ("00000/000000001.PNG", png(10)),
        ("00000/000000001.txt", b" a red dot \n".to_vec()),
        (
            "00000/000000001.json",
            br#"{"caption": "ignored: the .txt wins"}"#.to_vec(),
        ),
        ("00000/000000001.seg.png", png(200)),
        ("00000/000000002.png", png(20)),
        (
            "00000/000000002.json",
            br#"{"caption": "from the json", "url": "x"}"#.to_vec(),
        ),
        (
            "00000/000000003.json",
            br#"{"caption": null, "status": "failed"}"#.to_vec(),
        ),
        ("00000/000000004.png", png(40)),
        ("00000/000000005.webp", webp(50)),
        ("00000/000000005.txt", b"a webp".to_vec()),
        ("00000/000000004.json", br#"{"url": "x"}"#.to_vec()),
    ];
    let f = dir.join("shard.tar");
    let mut b = tar::Builder::new(std::fs::File::create(&f).unwrap());
    for (name, data) in &members {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, name, data.as_slice()).unwrap();
    }
    b.finish().unwrap();
    drop(b);
    let r = readers::read_pairs_tar(&f, None).unwrap();
    let got: Vec<(&str, u8)> = r
        .records
        .iter()
        .map(|p| (p.caption.as_str(), p.image.get_pixel(0, 0)[0]))
        .collect();
    assert_eq!(
        got,
        vec![("a red dot", 10), ("from the json", 20), ("a webp", 50)]
    );
    let bad: Vec<String> = r
        .bad
        .iter()
        .map(|b| format!("{} | {}", b.at, b.reason))
        .collect();
    let at = |key: &str| format!("{}:00000/{key}", f.display());
    assert_eq!(
        bad,
        vec![
            format!(
                "{} | no image member (.png/.jpg/.webp); only its .json",
                at("000000003")
            ),
            format!(
                "{} | 00000/000000004.json has no \"caption\" string and there is no 00000/000000004.txt",
                at("000000004")
            ),
        ]
    );
}

#[test]
fn bad_records_are_skipped_counted_and_bounded() {
    let dir = common::scratch("bad-records");
    synth::synthesize(&dir, &small(2)).unwrap();
    let good = std::fs::read_to_string(dir.join("pairs.jsonl")).unwrap();
    std::fs::write(dir.join("broken.png"), b"not a png").unwrap();
    let mut lines: Vec<String> = good.lines().map(String::from).collect();
    lines.insert(
        1,
        "{\"image\": \"images/id/000000.png\", \"caption\": ".into(),
    );
    lines.insert(
        3,
        "{\"image\": \"images/id/nope.png\", \"caption\": \"x\"}".into(),
    );
    lines.insert(5, "{\"image\": \"broken.png\", \"caption\": \"x\"}".into());
    let f = dir.join("mixed.jsonl");
    std::fs::write(&f, lines.join("\n")).unwrap();
    let r = readers::read_pairs_jsonl(&f, None).unwrap();
    assert_eq!(r.records.len(), 6);
    assert_eq!(r.bad.len(), 3);
    let at: Vec<&str> = r
        .bad
        .iter()
        .map(|b| b.at.rsplit(':').next().unwrap())
        .collect();
    assert_eq!(at, ["2", "4", "6"]);
    assert!(
        r.bad[0].reason.starts_with("bad JSON: "),
        "{}",
        r.bad[0].reason
    );
    assert!(
        r.bad[1].reason.starts_with("missing image "),
        "{}",
        r.bad[1].reason
    );
    assert!(
        r.bad[2].reason.starts_with("cannot decode image "),
        "{}",
        r.bad[2].reason
    );
    assert!(r.check(&f, 0.5).is_ok());
    let err = r.check(&f, 0.2).unwrap_err().to_string();
    assert!(
        err.starts_with(&format!(
            "{}: 3 of 9 records are bad (33.3%, above the allowed 20.0%); first: ",
            f.display()
        )),
        "{err}"
    );
    // LLaVA entries that do not alternate human/gpt, and regions pointing at no image.
    let f = dir.join("llava-bad.json");
    std::fs::write(
        &f,
        r#"[{"image": "images/id/000000.png", "conversations": [{"from": "gpt", "value": "hi"}]},
            {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]},
            {"nonsense": 1}]"#,
    )
    .unwrap();
    let r = readers::read_llava(&f, None).unwrap();
    assert_eq!((r.records.len(), r.bad.len()), (1, 2));
    assert_eq!(
        r.bad[0].reason,
        "conversations must alternate human, gpt turns"
    );
    assert!(r.bad[1].at.ends_with("[2]"));
}

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

fn mixer_cfg() -> deem::config::DeemConfig {
    let mut c: deem::config::DeemConfig =
        toml::from_str(include_str!("../configs/tiny.toml")).unwrap();
    c.train.batch_size = 4;
    c.train.context_length = 400;
    c.diffusion.image_size = 32;
    c
}

fn tiny_tokenizer() -> deem::text::tokenizer::DeemTokenizer {
    deem::text::tokenizer::DeemTokenizer::from_file(
        &common::root().join("assets/tiny-tokenizer.json"),
        Some(1024),
    )
    .unwrap()
}

fn mixer(dir: &Path) -> deem::data::mixer::Mixer {
    let c = mixer_cfg();
    let tok = tiny_tokenizer();
    let mut m = deem::data::mixer::Mixer::new(&c, 5);
    let docs = readers::read_mmc4(&dir.join("mmc4.jsonl"), None)
        .unwrap()
        .records;
    m.add_documents("mmc4", 2.0, &docs, &tok).unwrap();
    let pairs = readers::read_pairs_jsonl(&dir.join("pairs.jsonl"), None)
        .unwrap()
        .records;
    m.add_pairs("pairs", 1.0, &pairs, &tok).unwrap();
    m
}

#[test]
fn packing_fills_rows_with_whole_samples_and_whole_images() {
    let dir = common::scratch("mixer-pack");
    synth::synthesize(
        &dir,
        &SynthOptions {
            pairs: 20,
            documents: 10,
            ..small(1)
        },
    )
    .unwrap();
    let m = mixer(&dir);
    let c = mixer_cfg();
    let (soi, sniffer, k) = (
        c.llm.vocab_size,
        c.llm.vocab_size + 1,
        c.resampler.num_query_tokens as usize,
    );
    let (mut before, mut after) = (0, 0);
    for i in 0..20 {
        let b = m.batch(i).unwrap();
        assert_eq!(
            b.input_ids.size(),
            [4, 400],
            "rows never exceed the context"
        );
        let ids: Vec<i64> = Vec::try_from(b.input_ids.reshape([-1])).unwrap();
        let mut images = 0;
        for row in ids.chunks(400) {
            assert_eq!(row[0], c.llm.bos_token_id);
            // Pad only at the end, after an EOS: samples are whole.
            let used = row.iter().rposition(|&t| t != c.llm.pad_token_id).unwrap() + 1;
            assert_eq!(row[used - 1], c.llm.eos_token_id);
            assert!(row[used..].iter().all(|&t| t == c.llm.pad_token_id));
            let mut j = 0;
            while j < used {
                if row[j] == soi {
                    // Exactly K placeholders after every SoI, none elsewhere.
                    assert!(row[j + 1..j + 1 + k].iter().all(|&t| t == sniffer));
                    assert_ne!(row.get(j + 1 + k), Some(&sniffer));
                    images += 1;
                    if row[j - 1] == c.llm.bos_token_id {
                        before += 1;
                    } else {
                        after += 1;
                    }
                    j += 1 + k;
                } else {
                    assert_ne!(row[j], sniffer, "a placeholder outside an image");
                    j += 1;
                }
            }
        }
        assert_eq!(b.pixels.size()[0], images, "one image per placeholder run");
    }
    assert!(
        before > 10 && after > 10,
        "images before ({before}) and after ({after}) their text"
    );
    // Deterministic per index.
    assert_eq!(
        Vec::<i64>::try_from(m.batch(3).unwrap().input_ids.reshape([-1])).unwrap(),
        Vec::<i64>::try_from(m.batch(3).unwrap().input_ids.reshape([-1])).unwrap()
    );
}

#[test]
fn the_mix_follows_its_weights_and_documents_keep_six_images() {
    let dir = common::scratch("mixer-mix");
    synth::synthesize(
        &dir,
        &SynthOptions {
            pairs: 20,
            documents: 10,
            ..small(2)
        },
    )
    .unwrap();
    let m = mixer(&dir);
    let (mut docs, mut pairs) = (0, 0);
    for i in 0..200 {
        let (_, n) = m.batch_with_counts(i).unwrap();
        docs += n[0];
        pairs += n[1];
    }
    let ratio = docs as f64 / pairs as f64;
    assert!(
        (1.7..2.4).contains(&ratio),
        "mmc4 : pairs = {docs} : {pairs} = {ratio:.2}, want about 2"
    );

    // A document with 8 images keeps 6.
    let img = world::scene(0, Split::Id, 0, 32).render();
    let doc = readers::Document {
        texts: (0..8).map(|i| format!("sentence {i}.")).collect(),
        images: (0..8).map(|i| (img.clone(), i)).collect(),
    };
    let mut c = mixer_cfg();
    c.train.batch_size = 1;
    c.train.context_length = 1024;
    let mut m = deem::data::mixer::Mixer::new(&c, 0);
    m.add_documents("one", 1.0, &[doc], &tiny_tokenizer())
        .unwrap();
    assert_eq!(m.batch(0).unwrap().pixels.size()[0] % 6, 0);
    let ids: Vec<i64> = Vec::try_from(m.batch(0).unwrap().input_ids.reshape([-1])).unwrap();
    let per_doc = ids.iter().filter(|&&t| t == c.llm.vocab_size).count()
        / ids.iter().filter(|&&t| t == c.llm.bos_token_id).count();
    assert_eq!(per_doc, 6);
}

/// A two-turn conversation about a scene: a yes/no question with the image, then a colour question.
/// One row (batch size 1) of [`two_turn_conversation`] packed by a mixer of `c`: its ids and which are
/// NTP targets.
fn two_turn_row(
    c: &deem::config::DeemConfig,
    tok: &deem::text::tokenizer::DeemTokenizer,
) -> (Vec<i64>, Vec<bool>) {
    let mut m = deem::data::mixer::Mixer::new(c, 0);
    m.add_conversations(
        "c",
        1.0,
        &[two_turn_conversation()],
        "You are a helpful assistant.",
        tok,
    )
    .unwrap();
    let b = m.batch(0).unwrap();
    let ids: Vec<i64> = Vec::try_from(b.input_ids.reshape([-1])).unwrap();
    let mask: Vec<bool> = Vec::try_from(b.loss_mask.unwrap().reshape([-1])).unwrap();
    (ids, mask)
}

/// The ids a packed row trains on (those its loss mask marks), in order.
fn ntp_targets(ids: &[i64], mask: &[bool]) -> Vec<i64> {
    ids.iter()
        .zip(mask)
        .filter(|(_, &k)| k)
        .map(|(&t, _)| t)
        .collect()
}

fn two_turn_conversation() -> readers::Conversation {
    readers::Conversation {
        image: Some(world::scene(0, Split::Id, 0, 32).render()),
        turns: vec![
            ("<image>\nIs there a red circle?".into(), "Yes".into()),
            ("What colour is it?".into(), "red".into()),
        ],
    }
}

#[test]
fn conversations_train_only_on_the_replies_and_captions_on_all_their_text() {
    let tok = tiny_tokenizer();
    let mut c = mixer_cfg();
    c.train.batch_size = 1;
    let img = world::scene(0, Split::Id, 0, 32).render();
    let (ids, mask) = two_turn_row(&c, &tok);
    let eos = c.llm.eos_token_id;
    // The targets, in order, are exactly each reply followed by its EOS.
    let targets = ntp_targets(&ids, &mask);
    // The row packs the one conversation as often as it fits.
    let copies = ids.iter().filter(|&&t| t == c.llm.bos_token_id).count();
    assert!(copies >= 1);
    let mut want: Vec<i64> = Vec::new();
    for _ in 0..copies {
        for a in [" Yes", " red"] {
            want.extend(tok.encode(a, false).unwrap().into_iter().map(i64::from));
            want.push(eos);
        }
    }
    assert_eq!(targets, want);
    // One EOS closes each reply; the sample adds none of its own, then padding.
    let used = ids.iter().rposition(|&t| t != c.llm.pad_token_id).unwrap() + 1;
    assert_eq!(ids.iter().filter(|&&t| t == eos).count(), 2 * copies);
    assert_eq!(ids[used - 1], eos);
    assert_eq!(ids[0], c.llm.bos_token_id);

    // A caption pair: every id but BOS and the padding is marked (ntp_loss masks the placeholders).
    let mut m = deem::data::mixer::Mixer::new(&c, 0);
    let pair = readers::Pair {
        image: img,
        caption: "a red circle".into(),
    };
    m.add_pairs("p", 1.0, &[pair], &tok).unwrap();
    let b = m.batch(0).unwrap();
    let ids: Vec<i64> = Vec::try_from(b.input_ids.reshape([-1])).unwrap();
    let mask: Vec<bool> = Vec::try_from(b.loss_mask.unwrap().reshape([-1])).unwrap();
    let used = ids.iter().rposition(|&t| t != c.llm.pad_token_id).unwrap() + 1;
    for (j, (&t, &k)) in ids.iter().zip(&mask).enumerate() {
        let want = j < used && t != c.llm.bos_token_id;
        assert_eq!(k, want, "position {j} (id {t})");
    }
}

#[test]
fn instruction_conversations_are_multi_turn_and_answer_about_their_own_scene() {
    let dir = common::scratch("synth-llava-answers");
    let o = SynthOptions {
        pairs: 0,
        documents: 0,
        instructions: 40,
        max_turns: 6,
        regions: 0,
        eval_per_split: 0,
        ..small(3)
    };
    synth::synthesize(&dir, &o).unwrap();
    let raw: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(dir.join("llava.json")).unwrap()).unwrap();
    let conv = readers::read_llava(&dir.join("llava.json"), None)
        .unwrap()
        .records;
    assert_eq!(conv.len(), 40);
    let mut turns = BTreeSet::new();
    let (mut yes, mut no) = (0, 0);
    for (c, r) in conv.iter().zip(&raw) {
        turns.insert(c.turns.len());
        assert!((1..=6).contains(&c.turns.len()));
        // images/id/NNNNNN.png: the scene's index in the in-distribution stream.
        let path = r["image"].as_str().unwrap();
        let index: u64 = path
            .trim_start_matches("images/id/")
            .trim_end_matches(".png")
            .parse()
            .unwrap();
        let s = world::scene(o.seed, Split::Id, index, o.size);
        for (k, (q, a)) in c.turns.iter().enumerate() {
            assert_eq!(q.starts_with("<image>\n"), k == 0, "{q}");
            let q = q.trim_start_matches("<image>\n");
            if let Some(label) = q
                .strip_prefix("Is there a ")
                .and_then(|x| x.strip_suffix(" in the image? Please answer yes or no."))
            {
                let there = s.objects.iter().any(|ob| ob.label() == label);
                assert_eq!(
                    a,
                    if there { "Yes" } else { "No" },
                    "{q} in {:?}",
                    s.caption()
                );
                if there {
                    yes += 1
                } else {
                    no += 1
                }
            } else if q.starts_with("What colour is the ") {
                assert_eq!(a, s.main().colour_name());
            } else if q.starts_with("How many objects") {
                assert_eq!(a, ["one", "two", "three"][s.objects.len() - 1]);
            } else if q == "What is the main object in this image?" {
                assert_eq!(a, &format!("A {}.", s.main().label()));
            } else {
                let label = q
                    .strip_prefix("Is ")
                    .and_then(|x| {
                        x.strip_suffix(" the main object in this image? Please answer yes or no.")
                    })
                    .unwrap_or_else(|| panic!("unexpected question {q}"));
                assert_eq!(
                    a,
                    if label == s.main().label() {
                        "Yes"
                    } else {
                        "No"
                    },
                    "{q}"
                );
            }
        }
    }
    assert!(turns.len() > 2, "the number of turns varies: {turns:?}");
    assert!(
        yes > 10 && no > 10,
        "existence answers are balanced: {yes} yes, {no} no"
    );
}

#[test]
fn with_loss_on_prompts_conversations_train_on_every_text_id() {
    let tok = tiny_tokenizer();
    let mut c = mixer_cfg();
    c.train.batch_size = 1;
    c.train.loss_on_prompts = true;
    let (ids, mask) = two_turn_row(&c, &tok);
    let s = deem::models::deem::special_ids(&c);
    // Targets: every id but BOS, the image (SoI and placeholders) and the padding.
    for (i, (&t, &k)) in ids.iter().zip(&mask).enumerate() {
        let context = t == s.bos || t == s.soi || t == s.sniffer || t == s.pad;
        assert_eq!(k, !context, "position {i}, id {t}");
    }
    // The prompt is among them: the question's words are targets.
    let question: Vec<i64> = tok
        .encode(" What colour is it?", false)
        .unwrap()
        .into_iter()
        .map(i64::from)
        .collect();
    let at = ids
        .windows(question.len())
        .position(|w| w == question.as_slice())
        .expect("the question is in the row");
    assert!(mask[at..at + question.len()].iter().all(|&k| k));
}

/// Every yes/no instruction answer is a fair coin of its own: a scene's answers are not balanced (some
/// scenes get only "Yes", some only "No"), so earlier answers in a conversation do not give the later
/// ones away.
#[test]
fn instruction_yes_no_answers_are_drawn_independently() {
    let mut rng = deem::rng::Stream::new(5, 0, 0, deem::rng::Purpose::Data);
    let (mut yes, mut total, mut only_yes, mut only_no) = (0, 0, 0, 0);
    for i in 0..400 {
        let s = world::scene(5, Split::Id, i, 64);
        let answers: Vec<bool> = synth::questions(&s, &mut rng)
            .into_iter()
            .filter(|(q, _)| q.ends_with("Please answer yes or no."))
            .map(|(_, a)| a == "Yes")
            .collect();
        // One existence question per object, one main-object question.
        assert_eq!(answers.len(), s.objects.len() + 1);
        yes += answers.iter().filter(|&&a| a).count();
        total += answers.len();
        only_yes += usize::from(answers.iter().all(|&a| a));
        only_no += usize::from(answers.iter().all(|&a| !a));
    }
    let share = yes as f64 / total as f64;
    assert!((0.45..0.55).contains(&share), "yes share {share}");
    assert!(
        only_yes > 40 && only_no > 40,
        "{only_yes} scenes all yes, {only_no} all no"
    );
}

/// The labels a caption names: "a red circle with a blue star and a green bar" → [red circle, ...].
fn caption_labels(caption: &str) -> Vec<String> {
    caption
        .split(" with ")
        .flat_map(|p| p.split(" and "))
        .map(|l| l.trim_start_matches("a ").to_string())
        .collect()
}

#[test]
fn curriculum_questions_answer_about_their_scene() {
    let dir = common::scratch("synth-curriculum");
    let o = SynthOptions {
        pairs: 0,
        documents: 0,
        instructions: 0,
        regions: 0,
        eval_per_split: 0,
        text_scenes: 200,
        colour_questions: 100,
        label_questions: 200,
        ..small(4)
    };
    synth::synthesize(&dir, &o).unwrap();
    let colours: Vec<&str> = world::COLOURS.iter().map(|c| c.0).collect();
    let check = |q: &str, a: &str, labels: &[String], kinds: &mut BTreeMap<(bool, bool), usize>| {
        let colour_of = |l: &String| l.split(' ').next().unwrap().to_string();
        let (colour, there) = if let Some(c) = q
            .strip_prefix("Is there something ")
            .and_then(|x| x.strip_suffix(" in the image? Please answer yes or no."))
        {
            assert!(colours.contains(&c), "{q}");
            (true, labels.iter().any(|l| colour_of(l) == c))
        } else {
            let l = q
                .strip_prefix("Is there a ")
                .and_then(|x| x.strip_suffix(" in the image? Please answer yes or no."))
                .unwrap_or_else(|| panic!("unexpected question {q}"));
            (false, labels.iter().any(|x| x == l))
        };
        assert_eq!(a, if there { "Yes" } else { "No" }, "{q} about {labels:?}");
        *kinds.entry((colour, there)).or_default() += 1;
    };

    // Text-only: the scene in words, then one question about it.
    let text = readers::read_llava(&dir.join("text_scenes.json"), None).unwrap();
    assert!(text.bad.is_empty(), "{:?}", text.bad);
    assert_eq!(text.records.len(), o.text_scenes);
    let mut kinds = BTreeMap::new();
    for c in &text.records {
        assert!(c.image.is_none());
        assert_eq!(c.turns.len(), 1);
        let (q, a) = &c.turns[0];
        let rest = q.strip_prefix("The image shows ").unwrap();
        let (caption, question) = rest.split_once(". ").unwrap();
        check(question, a, &caption_labels(caption), &mut kinds);
    }
    // Both kinds, each answered yes and no about equally often.
    for (k, n) in &kinds {
        assert!((30..=70).contains(n), "{k:?}: {n} of 200 ({kinds:?})");
    }
    assert_eq!(kinds.len(), 4, "{kinds:?}");

    // Single-turn questions about images in `file`: (question, answer, the scene its image draws), the
    // image checked against the scene.
    let single_turns = |file: &str, n: usize| -> Vec<(String, String, world::Scene)> {
        let raw: Vec<serde_json::Value> =
            serde_json::from_str(&std::fs::read_to_string(dir.join(file)).unwrap()).unwrap();
        let conv = readers::read_llava(&dir.join(file), None).unwrap();
        assert!(conv.bad.is_empty(), "{:?}", conv.bad);
        assert_eq!(conv.records.len(), n);
        let mut out = Vec::new();
        for (c, r) in conv.records.iter().zip(&raw) {
            let index: u64 = r["image"]
                .as_str()
                .unwrap()
                .trim_start_matches("images/id/")
                .trim_end_matches(".png")
                .parse()
                .unwrap();
            let s = world::scene(o.seed, Split::Id, index, o.size);
            assert_eq!(c.image.as_ref().unwrap().as_raw(), s.render().as_raw());
            assert_eq!(c.turns.len(), 1);
            let (q, a) = &c.turns[0];
            out.push((
                q.strip_prefix("<image>\n").unwrap().to_string(),
                a.clone(),
                s,
            ));
        }
        out
    };

    // Colour questions about images: the answer is about the scene drawn.
    let mut kinds = BTreeMap::new();
    for (q, a, s) in single_turns("colour_questions.json", o.colour_questions) {
        let labels: Vec<String> = s.objects.iter().map(|ob| ob.label()).collect();
        check(&q, &a, &labels, &mut kinds);
    }
    let yes = kinds.get(&(true, true)).copied().unwrap_or(0);
    assert!((30..=70).contains(&yes), "{yes} of 100 yes");
    assert_eq!(yes + kinds.get(&(true, false)).copied().unwrap_or(0), 100);

    // Label questions about images: existence (POPE's template) or main object (RobustVQA's, the "no"
    // a shape of the main object's colour), answered about the scene drawn; each kind answered yes and
    // no about equally often.
    let mut kinds = BTreeMap::new();
    for (q, a, s) in single_turns("label_questions.json", o.label_questions) {
        let q = q.as_str();
        let labels: Vec<String> = s.objects.iter().map(|ob| ob.label()).collect();
        if let Some(l) = q.strip_prefix("Is ").and_then(|x| {
            x.strip_suffix(" the main object in this image? Please answer yes or no.")
        }) {
            let main = s.main();
            assert_eq!(
                a,
                if l == main.label() { "Yes" } else { "No" },
                "{q} about {labels:?}"
            );
            assert_eq!(l.split(' ').next().unwrap(), main.colour_name(), "{q}");
            *kinds.entry(("main", a.clone())).or_default() += 1;
        } else {
            let mut k = BTreeMap::new();
            check(q, &a, &labels, &mut k);
            assert!(!k.keys().next().unwrap().0, "{q}");
            *kinds.entry(("exists", a.clone())).or_default() += 1;
        }
    }
    assert_eq!(kinds.len(), 4, "{kinds:?}");
    for (k, n) in &kinds {
        assert!((25..=75).contains(n), "{k:?}: {n} of 200 ({kinds:?})");
    }
}

/// Region data follows the paper's referring template: the image whole, the prompt, the image again with
/// the region's mask, and the caption as the only target; every image of a region mixer's batch has a
/// mask (whole images all ones).
#[test]
fn region_samples_follow_the_referring_template_with_their_masks() {
    let tok = tiny_tokenizer();
    let mut c = mixer_cfg();
    c.train.batch_size = 1;
    let size = c.diffusion.image_size;
    let s = world::scene(0, Split::Id, 0, size as u32);
    let ob = &s.objects[0];
    let truth = ob.mask(size as u32);
    let region = readers::Region {
        image: s.render(),
        mask: truth.clone(),
        caption: format!("the {}", ob.label()),
    };
    let system = "You are a helpful assistant.";
    let mut m = deem::data::mixer::Mixer::new(&c, 0);
    m.add_regions("r", 1.0, &[region], system, &tok).unwrap();
    let b = m.batch(0).unwrap();
    let ids: Vec<i64> = Vec::try_from(b.input_ids.reshape([-1])).unwrap();
    let mask: Vec<bool> = Vec::try_from(b.loss_mask.unwrap().reshape([-1])).unwrap();

    let enc = |t: &str| -> Vec<i64> {
        tok.encode(t, false)
            .unwrap()
            .into_iter()
            .map(i64::from)
            .collect()
    };
    let (soi, sniffer) = (c.llm.vocab_size, c.llm.vocab_size + 1);
    let image: Vec<i64> = std::iter::once(soi)
        .chain(std::iter::repeat_n(
            sniffer,
            c.resampler.num_query_tokens as usize,
        ))
        .collect();
    let caption = enc(&format!(" the {}", ob.label()));
    let mut want = vec![c.llm.bos_token_id];
    want.extend(enc(system));
    want.extend(enc(" USER:"));
    want.extend(&image);
    want.extend(enc(
        " Provide a short description for this <ref>region1</ref>",
    ));
    want.extend(&image);
    want.extend(enc(" ASSISTANT:"));
    want.extend(&caption);
    want.push(c.llm.eos_token_id);
    assert_eq!(ids[..want.len()], want[..]);
    // `<ref>` and `</ref>` are DEEM's special tokens, one id each.
    let refs = [c.llm.vocab_size + 2, c.llm.vocab_size + 3];
    assert_eq!(
        ids[..want.len()]
            .iter()
            .filter(|t| refs.contains(t))
            .count(),
        2
    );
    // Targets: the caption and EOS, once per packed copy.
    let copies = ids.iter().filter(|&&t| t == c.llm.bos_token_id).count();
    let targets = ntp_targets(&ids, &mask);
    let mut one = caption.clone();
    one.push(c.llm.eos_token_id);
    assert_eq!(targets, one.repeat(copies));

    // Masks: per copy, the whole image (all ones), then the region's own mask on the same pixels.
    let masks = b.masks.expect("a region mixer's batches carry masks");
    assert_eq!(masks.size(), [2 * copies as i64, 1, size, size]);
    assert_eq!(b.pixels.size()[0], 2 * copies as i64);
    let region_mask =
        Tensor::from_slice(&truth.iter().map(|&x| x as u8 as f32).collect::<Vec<_>>())
            .view([1, size, size]);
    for k in 0..copies as i64 {
        assert_eq!(masks.get(2 * k), Tensor::ones_like(&region_mask));
        assert_eq!(masks.get(2 * k + 1), region_mask);
        assert_eq!(b.pixels.get(2 * k), b.pixels.get(2 * k + 1));
    }

    // Mixed with conversations, whole images get all-ones masks; without region data, no masks.
    let mut plain = deem::data::mixer::Mixer::new(&c, 0);
    plain
        .add_conversations("c", 1.0, &[two_turn_conversation()], system, &tok)
        .unwrap();
    assert!(plain.batch(0).unwrap().masks.is_none());
    plain.add_regions("r", 0.0, &[], system, &tok).unwrap();
    let b = plain.batch(0).unwrap();
    let n = b.pixels.size()[0];
    assert!(n > 0);
    assert_eq!(
        b.masks.unwrap(),
        Tensor::ones([n, 1, size, size], (tch::Kind::Float, tch::Device::Cpu))
    );

    // A mask that does not cover its image is refused, naming the source.
    let bad = readers::Region {
        image: s.render(),
        mask: vec![true; 5],
        caption: "x".into(),
    };
    let err = deem::data::mixer::Mixer::new(&c, 0)
        .add_regions("regions.json", 1.0, &[bad], system, &tok)
        .err()
        .unwrap()
        .to_string();
    assert_eq!(
        err,
        format!("regions.json: a region's mask holds 5 values, its image is {size}×{size}")
    );
}

/// A region mask goes through the same resize and centre crop as its image, so it stays on the
/// pixels it marks, whatever the image's aspect ratio.
#[test]
fn region_masks_stay_on_their_pixels_through_resizing() {
    let (w, h, size) = (96u32, 48u32, 32u32);
    // A white disc on black, and its mask.
    let inside = |x: u32, y: u32| {
        let (dx, dy) = (x as f64 - 60.0, y as f64 - 20.0);
        dx * dx + dy * dy < 15.0 * 15.0
    };
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        let v = if inside(x, y) { 255 } else { 0 };
        image::Rgb([v, v, v])
    });
    let mask: Vec<bool> = (0..h)
        .flat_map(|y| (0..w).map(move |x| inside(x, y)))
        .collect();
    let px = deem::models::vision::unit_pixels(&img, size).get(0);
    let m = deem::models::region::unit_mask(&mask, w, h, size)
        .unwrap()
        .get(0);
    assert_eq!(m.size(), [size as i64, size as i64]);
    let diff = (&px - &m).abs().mean(tch::Kind::Float).double_value(&[]);
    assert!(diff < 0.03, "mean |pixels − mask| {diff}");
    assert!(m.sum(tch::Kind::Float).double_value(&[]) > 50.0);
    assert!(deem::models::region::unit_mask(&mask[1..], w, h, size).is_none());
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

/// A shape twin differs from its scene in every object's shape and in nothing else a caption says;
/// synth writes each scene and its twin on consecutive lines of `pairs_twins.jsonl`.
#[test]
fn shape_twins_differ_only_in_shape() {
    for k in 0..30 {
        let s = world::scene(3, Split::Id, k, 64);
        let t = s.shape_twin();
        assert_eq!(s.objects.len(), t.objects.len());
        for (a, b) in s.objects.iter().zip(&t.objects) {
            assert_ne!(a.shape, b.shape);
            assert_eq!((a.colour, a.cx, a.cy, a.r), (b.colour, b.cx, b.cy, b.r));
        }
        assert_ne!(s.render(), t.render());
        assert_eq!(t, s.shape_twin(), "deterministic");
    }
    let dir = common::scratch("synth-twins");
    let o = small(6);
    synth::synthesize(&dir, &o).unwrap();
    let pairs = readers::read_pairs_jsonl(&dir.join("pairs_twins.jsonl"), None).unwrap();
    assert!(pairs.bad.is_empty());
    assert_eq!(pairs.records.len(), 2 * o.shape_twins);
    for (k, two) in pairs.records.chunks(2).enumerate() {
        let s = synth::twin_scene(o.seed, k as u64, o.size);
        assert_eq!(two[0].caption, s.caption());
        assert_eq!(two[1].caption, s.shape_twin().caption());
        assert_eq!(two[1].image, s.shape_twin().render());
    }
}
