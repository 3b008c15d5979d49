//! Tokenizer parity with HF `tokenizers` (fixture from tests/fixtures/generate.py), DEEM's special tokens,
//! and splicing visual tokens into the LLM's embedding sequence.

mod common;
use common::fixture;

use deem::text::sequence::{splice_images, SequenceError};
use deem::text::tokenizer::{DeemTokenizer, SPECIAL_TOKENS};
use tch::{Device, Kind, Tensor};

fn expected() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("tokenizer/expected.json")).unwrap())
        .unwrap()
}

#[test]
fn encodes_like_hf_tokenizers_with_special_tokens_appended() {
    let want = expected();
    let tok = DeemTokenizer::from_file(&fixture("tokenizer/tokenizer.json"), None).unwrap();
    assert_eq!(tok.base_vocab as u64, want["base_vocab"].as_u64().unwrap());
    let special: Vec<u32> = want["special_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    assert_eq!(tok.special_ids().to_vec(), special);
    for case in want["cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let ids: Vec<u32> = case["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(tok.encode(text, true).unwrap(), ids, "{text}");
    }
    // Special tokens in text are single tokens; plain text decodes back to itself.
    let ids = tok.encode("<|startofimage|><ref>", false).unwrap();
    assert_eq!(ids, vec![tok.soi_id(), tok.token_id("<ref>").unwrap()]);
    let text = "unseen wörds ✓ and digits 12345";
    assert_eq!(
        tok.decode(&tok.encode(text, false).unwrap(), true).unwrap(),
        text
    );
    assert_eq!(tok.image_placeholder(3), vec![300, 301, 301, 301]);
}

#[test]
fn special_ids_must_follow_the_llm_vocabulary() {
    let p = fixture("tokenizer/tokenizer.json");
    assert_eq!(
        DeemTokenizer::from_file(&p, Some(300)).unwrap().soi_id(),
        300
    );
    let err = DeemTokenizer::from_file(&p, Some(32000))
        .err()
        .unwrap()
        .to_string();
    assert_eq!(
        err,
        format!(
            "{}: {} has id 300, but the LLM expects it at 32000 (llm.vocab_size 32000 + 0); the tokenizer and the \
             checkpoint disagree on the vocabulary",
            p.display(),
            SPECIAL_TOKENS[0]
        )
    );
    let missing = fixture("tokenizer/nope.json");
    let err = DeemTokenizer::from_file(&missing, None)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.starts_with(&format!(
            "{}: cannot load the tokenizer: ",
            missing.display()
        )),
        "{err}"
    );
}

const SOI: i64 = 9;
const HOLE: i64 = 8;

#[test]
fn visual_tokens_replace_placeholders_in_order_and_soi_is_added() {
    let c = 4;
    let ids = Tensor::from_slice(&[1i64, SOI, HOLE, HOLE, 5, SOI, HOLE, HOLE, 7, 2]).view([2, 5]);
    let embeds = Tensor::arange(2 * 5 * c, (Kind::Float, Device::Cpu)).view([2, 5, c]);
    let visual = (Tensor::arange(2 * 2 * c, (Kind::Float, Device::Cpu)).view([2, 2, c]) + 1000.0)
        .set_requires_grad(true);
    let soi = Tensor::from_slice(&[0.5f32, -0.5, 1.0, 2.0]);
    let out = splice_images(&embeds, &ids, &visual, &soi, SOI, HOLE).unwrap();
    let row = |b: i64, t: i64| Vec::<f32>::try_from(out.get(b).get(t)).unwrap();
    let v = |i: i64, j: i64| Vec::<f32>::try_from(visual.detach().get(i).get(j)).unwrap();
    let e = |b: i64, t: i64| Vec::<f32>::try_from(embeds.get(b).get(t)).unwrap();
    assert_eq!(row(0, 2), v(0, 0));
    assert_eq!(row(0, 3), v(0, 1));
    assert_eq!(
        row(1, 1),
        v(1, 0),
        "the second image fills the next placeholders, in the next row"
    );
    assert_eq!(row(1, 2), v(1, 1));
    assert_eq!(row(0, 0), e(0, 0));
    assert_eq!(row(1, 3), e(1, 3));
    let soi_row: Vec<f32> = e(0, 1)
        .iter()
        .zip([0.5f32, -0.5, 1.0, 2.0])
        .map(|(a, b)| a + b)
        .collect();
    assert_eq!(row(0, 1), soi_row);
    // Gradients reach the visual tokens (the resampler trains through this).
    out.sum(Kind::Float).backward();
    assert_eq!(
        visual.grad(),
        Tensor::ones([2, 2, c], (Kind::Float, Device::Cpu))
    );
}

#[test]
fn placeholder_count_must_match_the_images() {
    let ids = Tensor::from_slice(&[SOI, HOLE, HOLE, 3]).view([1, 4]);
    let embeds = Tensor::zeros([1, 4, 4], (Kind::Float, Device::Cpu));
    let soi = Tensor::zeros([4], (Kind::Float, Device::Cpu));
    let visual = Tensor::zeros([2, 2, 4], (Kind::Float, Device::Cpu));
    let err = splice_images(&embeds, &ids, &visual, &soi, SOI, HOLE).unwrap_err();
    assert_eq!(
        err,
        SequenceError::Count {
            placeholders: 2,
            images: 2,
            per_image: 2,
            expected: 4
        }
    );
    assert_eq!(
        err.to_string(),
        "the sequence has 2 <|sniffer|> placeholders, but 2 image(s) × 2 visual tokens = 4 were given"
    );
    let wide = Tensor::zeros([1, 2, 5], (Kind::Float, Device::Cpu));
    assert_eq!(
        splice_images(&embeds, &ids, &wide, &soi, SOI, HOLE)
            .unwrap_err()
            .to_string(),
        "visual tokens have width 5, the LLM embeddings 4"
    );
}
