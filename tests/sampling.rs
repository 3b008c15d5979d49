//! Next-token sampling: greedy, logit bias, banned ids, top-k / top-p truncation, repetition penalty,
//! and determinism per (seed, token index).

use deem::sampling::{sample, SamplingParams};
use tch::Tensor;

fn logits(v: &[f64]) -> Tensor {
    Tensor::from_slice(v)
}

fn draws(l: &Tensor, p: &SamplingParams, banned: &[i64], n: u64) -> Vec<i64> {
    (0..n).map(|i| sample(l, p, &[], banned, i)).collect()
}

#[test]
fn greedy_bias_and_bans() {
    let l = logits(&[1.0, 3.0, 2.0, 0.5]);
    let greedy = SamplingParams {
        temperature: 0.0,
        ..Default::default()
    };
    assert_eq!(sample(&l, &greedy, &[], &[], 0), 1);
    assert_eq!(
        sample(&l, &greedy, &[], &[1], 0),
        2,
        "a banned id is never taken"
    );
    let biased = SamplingParams {
        temperature: 0.0,
        logit_bias: vec![(3, 100.0)],
        ..Default::default()
    };
    assert_eq!(sample(&l, &biased, &[], &[], 0), 3);
    // Sampling never returns a banned id either.
    let p = SamplingParams::default();
    assert!(draws(&l, &p, &[1, 2], 200)
        .iter()
        .all(|&t| t == 0 || t == 3));
}

#[test]
fn top_k_and_top_p_keep_only_the_head() {
    let l = logits(&[0.0, 0.1, 0.2, 5.0, 4.9]);
    let k2 = SamplingParams {
        top_k: 2,
        seed: 5,
        ..Default::default()
    };
    let d = draws(&l, &k2, &[], 300);
    assert!(d.iter().all(|&t| t == 3 || t == 4));
    assert!(
        d.contains(&3) && d.contains(&4),
        "both of the top 2 are drawn"
    );
    // The two head tokens hold ~98% of the mass: top_p 0.9 keeps exactly them.
    let p9 = SamplingParams {
        top_p: 0.9,
        seed: 5,
        ..Default::default()
    };
    assert!(draws(&l, &p9, &[], 300).iter().all(|&t| t == 3 || t == 4));
    // A tiny top_p is greedy.
    let p0 = SamplingParams {
        top_p: 1e-6,
        ..Default::default()
    };
    assert!(draws(&l, &p0, &[], 50).iter().all(|&t| t == 3));
}

#[test]
fn repetition_penalty_divides_positive_and_multiplies_negative_logits() {
    let l = logits(&[2.0, 1.5, -1.0]);
    let p = SamplingParams {
        temperature: 0.0,
        repetition_penalty: 2.0,
        ..Default::default()
    };
    // 2.0 / 2 = 1.0 < 1.5: the seen token loses its lead.
    assert_eq!(sample(&l, &p, &[0], &[], 0), 1);
    assert_eq!(sample(&l, &p, &[], &[], 0), 0);
    // -1 × 2 = -2: a seen negative logit only gets less likely.
    let l = logits(&[-1.0, -1.5]);
    assert_eq!(sample(&l, &p, &[0], &[], 0), 1);
}

#[test]
fn draws_depend_only_on_seed_and_index() {
    let l = logits(&[0.3, 0.2, 0.1, 0.0, -0.1, -0.2]);
    let p = SamplingParams {
        seed: 42,
        ..Default::default()
    };
    assert_eq!(draws(&l, &p, &[], 64), draws(&l, &p, &[], 64));
    let q = SamplingParams {
        seed: 43,
        ..Default::default()
    };
    assert_ne!(draws(&l, &p, &[], 64), draws(&l, &q, &[], 64));
    // Roughly the softmax frequencies (6 tokens, 3000 draws: ±5 points).
    let d = draws(&l, &p, &[], 3000);
    let share0 = d.iter().filter(|&&t| t == 0).count() as f64 / 3000.0;
    let z: f64 = [0.3f64, 0.2, 0.1, 0.0, -0.1, -0.2]
        .iter()
        .map(|x| x.exp())
        .sum();
    assert!((share0 - 0.3f64.exp() / z).abs() < 0.05, "{share0}");
}
