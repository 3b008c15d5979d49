//! The mixer: packing whole samples and images into rows, the mix following its weights, conversations
//! trained on their replies, multi-turn instructions, and region samples in the referring template.

mod common;
#[path = "common/synth.rs"]
mod synth_helpers;
use synth_helpers::*;

use std::collections::BTreeSet;
use std::path::Path;

use deem::data::readers;
use deem::data::synth::{self, SynthOptions};
use deem::data::world::{self, Split};
use tch::Tensor;

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
    let docs = readers::read_mmc4(&dir.join("mmc4.jsonl"), None, &Default::default(), 0)
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
