//! The synthetic world and the dataset readers: generation is deterministic per seed, every reader
//! round-trips what `synthesize` writes, bad records are skipped and counted, and the question files
//! answer about their own scenes.

mod common;
#[path = "common/synth.rs"]
mod synth_helpers;
use synth_helpers::*;

use std::collections::{BTreeMap, BTreeSet};

use deem::data::readers;
use deem::data::synth::{self, SynthOptions};
use deem::data::world::{self, Split};

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

    let docs = readers::read_mmc4(&dir.join("mmc4.jsonl"), None, &Default::default(), 0).unwrap();
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
        synth::append_member(&mut b, name, data).unwrap();
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
    // A record may not point outside the images folder (read whole or streamed alike).
    let outside = dir.join("outside.jsonl");
    std::fs::write(
        &outside,
        "{\"image\": \"../escape.png\", \"caption\": \"x\"}\n{\"image\": \"/etc/hostname\", \"caption\": \"x\"}\n",
    )
    .unwrap();
    let want = [
        format!(
            "image path \"../escape.png\" leaves the images folder {} (absolute, or with `..`)",
            dir.display()
        ),
        format!(
            "image path \"/etc/hostname\" leaves the images folder {} (absolute, or with `..`)",
            dir.display()
        ),
    ];
    let eager = readers::read_pairs_jsonl(&outside, None).unwrap();
    let (_, streamed) = deem::data::stream::open_pairs_jsonl(&outside, None).unwrap();
    for bad in [&eager.bad, &streamed.bad] {
        let reasons: Vec<&str> = bad.iter().map(|b| b.reason.as_str()).collect();
        assert_eq!(reasons, want);
    }
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

/// An MMC4 file of `docs` (each a list of image similarities, `None` for no score) with 8×8 PNGs.
fn mmc4_fixture(dir: &std::path::Path, docs: &[Vec<Option<f64>>]) -> std::path::PathBuf {
    image::RgbImage::from_pixel(8, 8, image::Rgb([200, 10, 10]))
        .save(dir.join("a.png"))
        .unwrap();
    let mut text = String::new();
    for (i, sims) in docs.iter().enumerate() {
        let info: Vec<serde_json::Value> = sims
            .iter()
            .map(|s| {
                let mut v = serde_json::json!({"image_name": "a.png", "matched_text_index": 0});
                if let Some(s) = s {
                    v["matched_sim"] = serde_json::json!(s);
                }
                v
            })
            .collect();
        let line =
            serde_json::json!({"text_list": [format!("document {i}"), "more"], "image_info": info});
        text.push_str(&format!("{line}\n"));
    }
    let path = dir.join("mmc4.jsonl");
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn mmc4_rules_drop_dissimilar_images_extra_images_imageless_and_half_the_one_image_documents() {
    let dir = common::scratch("mmc4-rules");
    let mut docs: Vec<Vec<Option<f64>>> = vec![
        vec![Some(0.30), Some(0.23)], // one image left: enters the one-image draw
        vec![],                       // no image
        vec![Some(0.24), Some(0.25)], // the bound itself is kept
        vec![Some(0.5); 8],           // 6 kept, 2 past the limit
        vec![Some(0.1)],              // its only image dissimilar: left without images
        vec![None, None],             // no score: kept
    ];
    docs.extend((0..40).map(|_| vec![Some(0.3)]));
    let path = mmc4_fixture(&dir, &docs);
    let rules = deem::config::Mmc4Rules::default();
    let r = readers::read_mmc4(&path, None, &rules, 7).unwrap();
    assert!(r.bad.is_empty(), "{:?}", r.bad);
    let f = |k: &str| r.filtered.get(k).copied().unwrap_or(0);
    assert_eq!(f(readers::MMC4_LOW_SIMILARITY), 2);
    assert_eq!(f(readers::MMC4_PAST_MAX), 2);
    assert_eq!(f(readers::MMC4_NO_IMAGE), 2);
    // 41 one-image documents (the first and the 40), about half drawn out.
    let drawn = f(readers::MMC4_ONE_IMAGE);
    assert!(
        (10..=31).contains(&drawn),
        "{drawn} of 41 one-image documents drawn out"
    );
    assert_eq!(r.records.len(), 46 - 2 - drawn);
    let mut counts: Vec<usize> = r.records.iter().map(|d| d.images.len()).collect();
    counts.sort();
    assert_eq!(counts[counts.len() - 3..], [2, 2, 6]);
    assert!(counts.iter().all(|&n| (1..=6).contains(&n)));
    // The draw is keyed by the seed and the line: the same seed keeps the same documents.
    let names = |r: &readers::ReadReport<readers::Document>| -> Vec<String> {
        r.records.iter().map(|d| d.texts[0].clone()).collect()
    };
    let again = readers::read_mmc4(&path, None, &rules, 7).unwrap();
    assert_eq!(names(&again), names(&r));
    let other = readers::read_mmc4(&path, None, &rules, 8).unwrap();
    assert_ne!(names(&other), names(&r));
    // Every rule can be relaxed.
    let keep_all = deem::config::Mmc4Rules {
        min_similarity: 0.0,
        max_images: 8,
        drop_without_images: false,
        drop_one_image_share: 0.0,
    };
    let all = readers::read_mmc4(&path, None, &keep_all, 7).unwrap();
    assert_eq!(all.records.len(), 46);
    assert!(all.filtered.is_empty(), "{:?}", all.filtered);
    let _ = std::fs::remove_dir_all(&dir);
}
