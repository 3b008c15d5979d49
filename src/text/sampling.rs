//! Next-token sampling for generation: logit bias, repetition penalty, temperature, top-k and top-p,
//! drawn from a per-request SplitMix stream keyed by (seed, token index), so a sequence samples the same
//! tokens whether it decodes alone or batched with others; and beam search ([`BeamSearch`]), the
//! decoding the paper's evaluations use (beam 3).

use tch::{Kind, Tensor};

use crate::rng::{Purpose, Stream};

/// How one request samples.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
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
    adjust(&mut l, p, seen, banned);
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

/// The logits after the adjustments sampling and beam search share: logit bias, repetition penalty,
/// banned ids (set to −∞).
fn adjust(l: &mut [f64], p: &SamplingParams, seen: &[i64], banned: &[i64]) {
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
}

/// The `n` most likely next ids with their log-probabilities (log-softmax of the adjusted logits: bias,
/// repetition penalty, bans), best first, ties by lower id. Banned ids never appear.
pub fn top_log_probs(
    mut l: Vec<f64>,
    p: &SamplingParams,
    seen: &[i64],
    banned: &[i64],
    n: usize,
) -> Vec<(i64, f64)> {
    adjust(&mut l, p, seen, banned);
    let max = l.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if !max.is_finite() {
        return Vec::new();
    }
    let log_z = max + l.iter().map(|&x| (x - max).exp()).sum::<f64>().ln();
    let mut order: Vec<usize> = (0..l.len()).filter(|&i| l[i].is_finite()).collect();
    order.sort_by(|&a, &b| l[b].total_cmp(&l[a]).then(a.cmp(&b)));
    order.truncate(n);
    order
        .into_iter()
        .map(|i| (i as i64, l[i] - log_z))
        .collect()
}

/// One beam hypothesis: the generated ids (an EOS, if it ended, included) and their summed
/// log-probability.
#[derive(Debug, Clone, PartialEq)]
pub struct Hypothesis {
    pub tokens: Vec<i64>,
    pub log_prob: f64,
}

impl Hypothesis {
    /// The ranking score: `log_prob / len^length_penalty` (len = generated ids, EOS included), as
    /// transformers' beam scorer ranks finished hypotheses.
    pub fn score(&self, length_penalty: f64) -> f64 {
        self.log_prob / (self.tokens.len().max(1) as f64).powf(length_penalty)
    }
}

/// Beam search with transformers' rules (`num_beams`, `length_penalty`, `early_stopping = False`): each
/// step ranks every live hypothesis' candidates by summed log-probability; a candidate that ends with
/// EOS among the best `width` becomes a finished hypothesis (the best `width` are kept); the next
/// `width` non-EOS candidates live on. The search ends when `max_new` ids were generated, or when
/// `width` hypotheses finished and no live one can still rank above the worst of them.
///
/// The caller owns the model: [`BeamSearch::live`] are the hypotheses to extend, each step takes their
/// candidates ([`top_log_probs`], at least `2 · width` each) and says which live hypothesis each new one
/// continues, so the caller can fork its caches.
#[derive(Debug, Clone)]
pub struct BeamSearch {
    width: usize,
    eos: i64,
    max_new: usize,
    length_penalty: f64,
    live: Vec<Hypothesis>,
    finished: Vec<Hypothesis>,
    done: bool,
}

impl BeamSearch {
    /// Starts from the prompt alone (one empty live hypothesis). `width` ≥ 1; `max_new` ≥ 1.
    pub fn new(width: usize, eos: i64, max_new: usize, length_penalty: f64) -> Self {
        BeamSearch {
            width: width.max(1),
            eos,
            max_new: max_new.max(1),
            length_penalty,
            live: vec![Hypothesis {
                tokens: Vec::new(),
                log_prob: 0.0,
            }],
            finished: Vec::new(),
            done: false,
        }
    }

    /// The hypotheses the next step extends (empty once done).
    pub fn live(&self) -> &[Hypothesis] {
        if self.done {
            &[]
        } else {
            &self.live
        }
    }

    pub fn is_done(&self) -> bool {
        self.done
    }

    /// How many candidates per live hypothesis a step needs.
    pub fn candidates_needed(&self) -> usize {
        2 * self.width
    }

    /// Extends the search by one id. `candidates[b]`: the next ids of live hypothesis `b` with their
    /// log-probabilities. Returns, for each new live hypothesis in order, the index of the live
    /// hypothesis it continues (empty once the search is done).
    pub fn step(&mut self, candidates: &[Vec<(i64, f64)>]) -> Vec<usize> {
        assert_eq!(
            candidates.len(),
            self.live().len(),
            "one candidate list per live hypothesis"
        );
        let mut all: Vec<(usize, i64, f64)> = candidates
            .iter()
            .enumerate()
            .flat_map(|(b, c)| {
                let base = self.live[b].log_prob;
                c.iter().map(move |&(t, lp)| (b, t, base + lp))
            })
            .collect();
        all.sort_by(|x, y| y.2.total_cmp(&x.2).then(x.0.cmp(&y.0)).then(x.1.cmp(&y.1)));
        let mut next = Vec::with_capacity(self.width);
        let mut parents = Vec::with_capacity(self.width);
        for (rank, &(b, t, lp)) in all.iter().enumerate() {
            if next.len() == self.width {
                break;
            }
            let mut tokens = self.live[b].tokens.clone();
            tokens.push(t);
            let h = Hypothesis {
                tokens,
                log_prob: lp,
            };
            if t == self.eos {
                if rank < self.width {
                    self.add_finished(h);
                }
            } else {
                next.push(h);
                parents.push(b);
            }
        }
        self.live = next;
        let generated = self.live.first().map_or(self.max_new, |h| h.tokens.len());
        if self.live.is_empty() || generated >= self.max_new {
            for h in std::mem::take(&mut self.live) {
                self.add_finished(h);
            }
            self.done = true;
            return Vec::new();
        }
        if self.finished.len() >= self.width {
            let worst = self
                .finished
                .iter()
                .map(|h| h.score(self.length_penalty))
                .fold(f64::INFINITY, f64::min);
            let best_live = self.live[0].log_prob / (generated as f64).powf(self.length_penalty);
            if worst >= best_live {
                self.done = true;
                return Vec::new();
            }
        }
        parents
    }

    fn add_finished(&mut self, h: Hypothesis) {
        self.finished.push(h);
        let lp = self.length_penalty;
        self.finished
            .sort_by(|a, b| b.score(lp).total_cmp(&a.score(lp)));
        self.finished.truncate(self.width);
    }

    /// The best finished hypothesis (or, before the end, the best live one).
    pub fn best(&self) -> Option<&Hypothesis> {
        self.finished.first().or(self.live.first())
    }
}
