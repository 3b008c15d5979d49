//! Next-token sampling for generation: logit bias, repetition penalty, temperature, top-k and top-p,
//! drawn from a per-request SplitMix stream keyed by (seed, token index), so a sequence samples the same
//! tokens whether it decodes alone or batched with others.

use tch::{Kind, Tensor};

use crate::rng::{Purpose, Stream};

/// How one request samples.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 = greedy.
    pub temperature: f64,
    /// Nucleus mass in (0, 1]; 1 = off.
    pub top_p: f64,
    /// Keep the k most likely tokens; 0 = off.
    pub top_k: usize,
    /// CTRL-style penalty > 0 on tokens already in the context; 1 = off.
    pub repetition_penalty: f64,
    pub seed: u64,
    /// Added to the logits of the listed ids (OpenAI `logit_bias`).
    pub logit_bias: Vec<(i64, f64)>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            repetition_penalty: 1.0,
            seed: 0,
            logit_bias: vec![],
        }
    }
}

/// Samples the next id from `logits` [V] (any device). `seen`: ids in the context for the repetition
/// penalty; `banned`: ids that may never be sampled (image placeholders, a spent image allowance);
/// `index`: the sampled token's index in the response (keys the random draw).
pub fn sample(
    logits: &Tensor,
    p: &SamplingParams,
    seen: &[i64],
    banned: &[i64],
    index: u64,
) -> i64 {
    let l: Vec<f64> = Vec::try_from(logits.to_device(tch::Device::Cpu).to_kind(Kind::Double))
        .expect("1-d logits");
    sample_slice(l, p, seen, banned, index)
}

/// [`sample`] on logits already on the CPU (one row of a batch read back at once).
pub fn sample_slice(
    mut l: Vec<f64>,
    p: &SamplingParams,
    seen: &[i64],
    banned: &[i64],
    index: u64,
) -> i64 {
    let v = l.len() as i64;
    for &(id, b) in &p.logit_bias {
        if (0..v).contains(&id) {
            l[id as usize] += b;
        }
    }
    if p.repetition_penalty != 1.0 {
        let mut done = std::collections::HashSet::new();
        for &id in seen {
            if (0..v).contains(&id) && done.insert(id) {
                let x = &mut l[id as usize];
                *x = if *x > 0.0 {
                    *x / p.repetition_penalty
                } else {
                    *x * p.repetition_penalty
                };
            }
        }
    }
    for &id in banned {
        if (0..v).contains(&id) {
            l[id as usize] = f64::NEG_INFINITY;
        }
    }
    // The first maximum (lowest id among ties).
    let argmax = l
        .iter()
        .enumerate()
        .fold((0usize, f64::NEG_INFINITY), |best, (i, &x)| {
            if x > best.1 {
                (i, x)
            } else {
                best
            }
        });
    if p.temperature <= 0.0 || !argmax.1.is_finite() {
        return argmax.0 as i64;
    }
    let top = argmax.1;
    // Candidates in id order; sorted by logit (ties by id) only when top-k / top-p need the head.
    let mut order: Vec<usize> = (0..l.len()).filter(|&i| l[i].is_finite()).collect();
    if p.top_k > 0 || p.top_p < 1.0 {
        order.sort_by(|&a, &b| l[b].total_cmp(&l[a]).then(a.cmp(&b)));
        if p.top_k > 0 {
            order.truncate(p.top_k);
        }
    }
    let mut probs: Vec<f64> = order
        .iter()
        .map(|&i| ((l[i] - top) / p.temperature).exp())
        .collect();
    let sum: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|x| *x /= sum);
    if p.top_p < 1.0 {
        let mut mass = 0.0;
        let mut keep = 0;
        for &x in &probs {
            keep += 1;
            mass += x;
            if mass >= p.top_p {
                break;
            }
        }
        probs.truncate(keep);
        order.truncate(keep);
        let sum: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|x| *x /= sum);
    }
    let u = Stream::new(p.seed, index, 0, Purpose::Sampling).uniform();
    let mut acc = 0.0;
    for (k, &x) in probs.iter().enumerate() {
        acc += x;
        if u < acc {
            return order[k] as i64;
        }
    }
    order[order.len() - 1] as i64
}
