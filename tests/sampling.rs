//! Next-token sampling: greedy, logit bias, banned ids, top-k / top-p truncation, repetition penalty,
//! and determinism per (seed, token index); beam search against greedy decoding and against an
//! exhaustive search.

use deem::text::sampling::{sample, top_log_probs, BeamSearch, Hypothesis, SamplingParams};
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

#[test]
fn top_log_probs_are_the_log_softmax_of_the_adjusted_logits() {
    let l = vec![1.0, 3.0, 2.0, 3.0, -1.0];
    let p = SamplingParams {
        logit_bias: vec![(4, 5.0)],
        ..Default::default()
    };
    let top = top_log_probs(l.clone(), &p, &[], &[3], 3);
    // Adjusted: [1, 3, 2, −∞, 4]; the log-partition over the finite ones.
    let z = [1.0f64, 3.0, 2.0, 4.0]
        .iter()
        .map(|x| x.exp())
        .sum::<f64>()
        .ln();
    let want = [(4, 4.0 - z), (1, 3.0 - z), (2, 2.0 - z)];
    assert_eq!(top.len(), 3);
    for ((id, lp), (wid, wlp)) in top.iter().zip(want) {
        assert_eq!(*id, wid);
        assert!((lp - wlp).abs() < 1e-12, "{lp} vs {wlp}");
    }
    // Ties go to the lower id; asking for more than there are gives every allowed id.
    let all = top_log_probs(l, &SamplingParams::default(), &[], &[0], 10);
    let ids: Vec<i64> = all.iter().map(|x| x.0).collect();
    assert_eq!(ids, [1, 3, 2, 4]);
    assert!((all.iter().map(|x| x.1.exp()).sum::<f64>() - 1.0).abs() < 1e-12);
}

/// A toy language model over ids 0..V (EOS = 0): the next-token log-probabilities of a prefix, from a
/// hash of the prefix (so different prefixes disagree, as a model's do).
fn toy_model(prefix: &[i64], v: usize) -> Vec<f64> {
    let mut h: u64 = 0x9e37_79b9_7f4a_7c15;
    for &t in prefix {
        h = (h ^ t as u64).wrapping_mul(0x100_0000_01b3);
    }
    let l: Vec<f64> = (0..v)
        .map(|i| {
            let x = (h ^ (i as u64 + 1)).wrapping_mul(0x2545_f491_4f6c_dd1d);
            (x >> 11) as f64 / (1u64 << 53) as f64 * 4.0
        })
        .collect();
    let z = l.iter().map(|x| x.exp()).sum::<f64>().ln();
    l.into_iter().map(|x| x - z).collect()
}

fn run_beam(width: usize, v: usize, max_new: usize, lp: f64) -> Hypothesis {
    let mut b = BeamSearch::new(width, 0, max_new, lp);
    let p = SamplingParams::default();
    let mut steps = 0;
    while !b.is_done() {
        let cands: Vec<Vec<(i64, f64)>> = b
            .live()
            .iter()
            .map(|h| top_log_probs(toy_model(&h.tokens, v), &p, &[], &[], b.candidates_needed()))
            .collect();
        let parents = b.step(&cands);
        assert!(b.is_done() || parents.len() == b.live().len());
        steps += 1;
        assert!(steps <= max_new, "the search ran past max_new");
    }
    b.best().unwrap().clone()
}

#[test]
fn beam_search_of_width_one_is_greedy_decoding() {
    let (v, max_new) = (6, 8);
    let mut tokens = Vec::new();
    let mut log_prob = 0.0;
    for _ in 0..max_new {
        let l = toy_model(&tokens, v);
        let t = sample(
            &Tensor::from_slice(&l),
            &SamplingParams {
                temperature: 0.0,
                ..Default::default()
            },
            &[],
            &[],
            0,
        );
        log_prob += l[t as usize];
        tokens.push(t);
        if t == 0 {
            break;
        }
    }
    let b = run_beam(1, v, max_new, 1.0);
    assert_eq!(b.tokens, tokens);
    assert!((b.log_prob - log_prob).abs() < 1e-12);
}

/// Every sequence the search may return: ended by EOS within `max_new` ids, or `max_new` ids long.
fn exhaustive_best(v: usize, max_new: usize, lp: f64) -> Hypothesis {
    let mut best: Option<Hypothesis> = None;
    let mut frontier = vec![Hypothesis {
        tokens: vec![],
        log_prob: 0.0,
    }];
    for _ in 0..max_new {
        let mut next = Vec::new();
        for h in frontier {
            let l = toy_model(&h.tokens, v);
            for (t, x) in l.iter().enumerate() {
                let mut tokens = h.tokens.clone();
                tokens.push(t as i64);
                let c = Hypothesis {
                    tokens,
                    log_prob: h.log_prob + x,
                };
                if t == 0 || c.tokens.len() == max_new {
                    if best.as_ref().is_none_or(|b| c.score(lp) > b.score(lp)) {
                        best = Some(c);
                    }
                } else {
                    next.push(c);
                }
            }
        }
        frontier = next;
    }
    best.unwrap()
}

#[test]
fn a_beam_as_wide_as_the_search_space_finds_the_best_sequence() {
    let (v, max_new) = (4, 4);
    for lp in [0.0, 1.0, 2.0] {
        let want = exhaustive_best(v, max_new, lp);
        // 3 non-EOS ids: at most 27 live hypotheses before the last step.
        let got = run_beam(64, v, max_new, lp);
        assert_eq!(got.tokens, want.tokens, "length penalty {lp}");
        assert!((got.log_prob - want.log_prob).abs() < 1e-12);
    }
}

#[test]
fn beam_search_finds_what_greedy_misses() {
    // After the prompt: id 1 (p = .55) then a flat tail, or id 2 (p = .45) then EOS at .99.
    let ln = f64::ln;
    let model = |prefix: &[i64]| -> Vec<(i64, f64)> {
        match prefix {
            [] => vec![(1, ln(0.55)), (2, ln(0.45))],
            [2] => vec![(0, ln(0.99)), (3, ln(0.01))],
            _ => vec![(0, ln(0.25)), (1, ln(0.25)), (2, ln(0.25)), (3, ln(0.25))],
        }
    };
    let search = |width: usize| {
        let mut b = BeamSearch::new(width, 0, 5, 1.0);
        while !b.is_done() {
            let c: Vec<_> = b.live().iter().map(|h| model(&h.tokens)).collect();
            b.step(&c);
        }
        b.best().unwrap().clone()
    };
    assert_eq!(search(1).tokens, [1, 0], "greedy: the likelier first id");
    let two = search(2);
    assert_eq!(two.tokens, [2, 0]);
    assert!((two.log_prob - ln(0.45 * 0.99)).abs() < 1e-12);
}
