//! Evaluation data and scoring: RobustVQA and POPE questions, their builders, answer parsing and the
//! yes/no metrics.
//!
//! - RobustVQA: `{split: [{file_name, gt_caption, error_caption}]}`; each entry gives a "yes" question
//!   (the true label) and a "no" question (the hard negative) — "Is {label} the main object in this
//!   image? Please answer yes or no.". The builder mines the hard negative with a classifier over an
//!   ImageNet-style folder (`<class>/<image>`): the wrong class it ranks highest.
//! - POPE: JSON lines `{image, text, label}`; the builder samples negatives from COCO-style instance
//!   annotations three ways: random (any absent category), popular (the most frequent categories of the
//!   data set), adversarial (the categories that co-occur most with the image's own).
//! - Answers are parsed as DreamLLM's POPE scorer does: keep the first sentence; "no" if its words
//!   include `no` or `not`, else "yes".
//! - Region-level captioning (the paper's RefCOCOg evaluation, Table 3): each answer's first sentence
//!   against its reference caption by CIDEr-D (coco-caption's scorer: 1- to 4-grams, tf-idf from the
//!   references, σ = 6, ×10), exact match and word F1, on lowercase words.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use crate::data::DataError;
use serde::{Deserialize, Serialize};

/// One yes/no question about an image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Question {
    /// Image path (relative to the data file's folder, or absolute).
    pub image: String,
    pub text: String,
    /// "yes" or "no".
    pub label: String,
}

/// The paper's RobustVQA prompt for a label.
pub fn robustvqa_prompt(label: &str) -> String {
    format!("Is {label} the main object in this image? Please answer yes or no.")
}

/// The paper's POPE prompt for an object.
pub fn pope_prompt(object: &str) -> String {
    format!("Is there a {object} in the image? Please answer yes or no.")
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RobustEntry {
    pub file_name: String,
    pub gt_caption: String,
    pub error_caption: String,
}

/// RobustVQA questions per split from its JSON file.
pub fn read_robustvqa(path: &Path) -> Result<BTreeMap<String, Vec<Question>>, DataError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| DataError::from(format!("{}: {e}", path.display())))?;
    let data: BTreeMap<String, Vec<RobustEntry>> = serde_json::from_str(&text).map_err(|e| {
        format!(
            "{}: expected {{split: [{{file_name, gt_caption, error_caption}}]}}: {e}",
            path.display()
        )
    })?;
    Ok(data
        .into_iter()
        .map(|(split, entries)| {
            let qs = entries
                .iter()
                .flat_map(|e| {
                    [
                        Question {
                            image: e.file_name.clone(),
                            text: robustvqa_prompt(&e.gt_caption),
                            label: "yes".into(),
                        },
                        Question {
                            image: e.file_name.clone(),
                            text: robustvqa_prompt(&e.error_caption),
                            label: "no".into(),
                        },
                    ]
                })
                .collect();
            (split, qs)
        })
        .collect())
}

/// Builds one RobustVQA split from an ImageNet-style folder: `classify(image path)` ranks every class
/// name (best first); the hard negative is the best-ranked wrong class. With `only_misclassified`, only
/// images the classifier gets wrong are kept (as the paper kept only CLIP's mistakes). Class folder
/// names use `_` for spaces.
pub fn build_robustvqa(
    folder: &Path,
    prefix: &str,
    only_misclassified: bool,
    mut classify: impl FnMut(&Path) -> Result<Vec<String>, DataError>,
) -> Result<Vec<RobustEntry>, DataError> {
    let mut classes: Vec<_> = std::fs::read_dir(folder)
        .map_err(|e| DataError::from(format!("{}: {e}", folder.display())))?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    classes.sort();
    let mut out = Vec::new();
    for class in classes {
        let mut files: Vec<_> = std::fs::read_dir(folder.join(&class))
            .map_err(|e| DataError::from(e.to_string()))?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        files.sort();
        let gt = class.replace('_', " ");
        for f in files {
            let ranked = classify(&folder.join(&class).join(&f))?;
            let Some(wrong) = ranked.iter().find(|c| **c != gt) else {
                continue;
            };
            if only_misclassified && ranked.first() == Some(&gt) {
                continue;
            }
            out.push(RobustEntry {
                file_name: format!("{prefix}{class}/{f}"),
                gt_caption: gt.clone(),
                error_caption: wrong.clone(),
            });
        }
    }
    Ok(out)
}

/// POPE questions from JSON lines `{image, text, label}`.
pub fn read_pope(path: &Path) -> Result<Vec<Question>, DataError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| DataError::from(format!("{}: {e}", path.display())))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str::<Question>(l).map_err(|e| {
                DataError::from(format!(
                    "{}:{}: expected {{image, text, label}}: {e}",
                    path.display(),
                    i + 1
                ))
            })
        })
        .collect()
}

/// How POPE picks the absent objects it asks about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PopeSampling {
    Random,
    Popular,
    Adversarial,
}

impl PopeSampling {
    pub const ALL: [PopeSampling; 3] = [
        PopeSampling::Random,
        PopeSampling::Popular,
        PopeSampling::Adversarial,
    ];

    pub fn name(self) -> &'static str {
        match self {
            PopeSampling::Random => "random",
            PopeSampling::Popular => "popular",
            PopeSampling::Adversarial => "adversarial",
        }
    }
}

/// Images and the categories present in each, from COCO-style instance annotations.
pub struct Instances {
    /// (file name, present category names) per image.
    pub images: Vec<(String, BTreeSet<String>)>,
    pub categories: Vec<String>,
}

pub fn read_instances(path: &Path) -> Result<Instances, DataError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| DataError::from(format!("{}: {e}", path.display())))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| DataError::from(format!("{}: not JSON: {e}", path.display())))?;
    let cats: BTreeMap<i64, String> = v["categories"]
        .as_array()
        .ok_or_else(|| DataError::from(format!("{}: no `categories` list", path.display())))?
        .iter()
        .filter_map(|c| Some((c["id"].as_i64()?, c["name"].as_str()?.to_string())))
        .collect();
    let mut present: BTreeMap<i64, BTreeSet<String>> = BTreeMap::new();
    for a in v["annotations"].as_array().into_iter().flatten() {
        if let (Some(img), Some(c)) = (
            a["image_id"].as_i64(),
            a["category_id"].as_i64().and_then(|c| cats.get(&c)),
        ) {
            present.entry(img).or_default().insert(c.clone());
        }
    }
    let images = v["images"]
        .as_array()
        .ok_or_else(|| DataError::from(format!("{}: no `images` list", path.display())))?
        .iter()
        .filter_map(|im| {
            let id = im["id"].as_i64()?;
            Some((
                im["file_name"].as_str()?.to_string(),
                present.remove(&id).unwrap_or_default(),
            ))
        })
        .collect();
    Ok(Instances {
        images,
        categories: cats.into_values().collect(),
    })
}

/// POPE questions: for each image with objects, up to `k` present objects ("yes") and as many absent
/// ones ("no") chosen by `sampling`. Random draws use `seed`.
pub fn build_pope(inst: &Instances, sampling: PopeSampling, k: usize, seed: u64) -> Vec<Question> {
    let mut freq: BTreeMap<&str, usize> = BTreeMap::new();
    let mut co: BTreeMap<(&str, &str), usize> = BTreeMap::new();
    for (_, present) in &inst.images {
        for a in present {
            *freq.entry(a).or_default() += 1;
            for b in present {
                if a != b {
                    *co.entry((a, b)).or_default() += 1;
                }
            }
        }
    }
    // Most frequent first; ties by name so the order is fixed.
    let mut popular: Vec<&str> = inst.categories.iter().map(String::as_str).collect();
    popular.sort_by(|a, b| {
        freq.get(b)
            .unwrap_or(&0)
            .cmp(freq.get(a).unwrap_or(&0))
            .then(a.cmp(b))
    });
    let mut rng = crate::rng::Stream::new(seed, 0, 0x9090, crate::rng::Purpose::Data);
    let mut out = Vec::new();
    for (file, present) in &inst.images {
        if present.is_empty() {
            continue;
        }
        let pos: Vec<&String> = present.iter().take(k).collect();
        let absent: Vec<&str> = inst
            .categories
            .iter()
            .map(String::as_str)
            .filter(|c| !present.contains(*c))
            .collect();
        let negs: Vec<&str> = match sampling {
            PopeSampling::Random => {
                let mut pool = absent.clone();
                let mut picked = Vec::new();
                while picked.len() < pos.len() && !pool.is_empty() {
                    let i = rng.below(1, pool.len() as u64)[0] as usize;
                    picked.push(pool.swap_remove(i));
                }
                picked
            }
            PopeSampling::Popular => popular
                .iter()
                .copied()
                .filter(|c| !present.contains(*c))
                .take(pos.len())
                .collect(),
            PopeSampling::Adversarial => {
                let mut ranked = absent.clone();
                let score = |c: &str| -> usize {
                    present
                        .iter()
                        .map(|p| co.get(&(p.as_str(), c)).copied().unwrap_or(0))
                        .sum()
                };
                ranked.sort_by(|a, b| score(b).cmp(&score(a)).then(a.cmp(b)));
                ranked.into_iter().take(pos.len()).collect()
            }
        };
        for p in &pos {
            out.push(Question {
                image: file.clone(),
                text: pope_prompt(p),
                label: "yes".into(),
            });
        }
        for n in negs {
            out.push(Question {
                image: file.clone(),
                text: pope_prompt(n),
                label: "no".into(),
            });
        }
    }
    out
}

/// DreamLLM's POPE answer parsing: the first sentence; "no" if its words include `no` or `not`.
pub fn parse_yes_no(answer: &str) -> bool {
    let no = first_sentence(answer)
        .split(|c: char| !c.is_alphanumeric())
        .map(|w| w.to_ascii_lowercase())
        .any(|w| w == "no" || w == "not");
    !no
}

/// The first non-blank sentence of an answer: up to `.`, `!`, `?` or a line break.
fn first_sentence(answer: &str) -> &str {
    answer
        .split(['.', '\n', '!', '?'])
        .find(|s| !s.trim().is_empty())
        .unwrap_or("")
}

/// Yes/no metrics with "yes" as the positive class.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct YesNoScores {
    pub n: usize,
    pub accuracy: f64,
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    pub yes_ratio: f64,
}

/// Scores predictions (`true` = yes) against labels.
pub fn score(pred: &[bool], label: &[bool]) -> YesNoScores {
    let n = pred.len().min(label.len());
    let (mut tp, mut fp, mut tn, mut fn_) = (0f64, 0f64, 0f64, 0f64);
    for (&p, &l) in pred.iter().zip(label) {
        match (p, l) {
            (true, true) => tp += 1.0,
            (true, false) => fp += 1.0,
            (false, false) => tn += 1.0,
            (false, true) => fn_ += 1.0,
        }
    }
    let div = |a: f64, b: f64| if b == 0.0 { 0.0 } else { a / b };
    let precision = div(tp, tp + fp);
    let recall = div(tp, tp + fn_);
    YesNoScores {
        n,
        accuracy: div(tp + tn, n as f64),
        precision,
        recall,
        f1: div(2.0 * precision * recall, precision + recall),
        yes_ratio: div(tp + fp, n as f64),
    }
}

/// The words of a caption as the caption metrics compare them: its first sentence, lowercase, split at
/// anything but letters, digits and apostrophes.
pub fn caption_words(text: &str) -> Vec<String> {
    first_sentence(text)
        .to_lowercase()
        .split(|c: char| !(c.is_alphanumeric() || c == '\''))
        .filter(|w| !w.is_empty())
        .map(str::to_string)
        .collect()
}

type Ngram = Vec<String>;

/// The 1- to 4-gram counts of `words`.
fn ngram_counts(words: &[String]) -> BTreeMap<Ngram, f64> {
    let mut c = BTreeMap::new();
    for n in 1..=4 {
        for g in words.windows(n) {
            *c.entry(g.to_vec()).or_insert(0.0) += 1.0;
        }
    }
    c
}

/// CIDEr-D per candidate (coco-caption's `CiderScorer`): tf-idf vectors of 1- to 4-grams with document
/// frequencies over the references (one document per candidate), clipped cosine similarity per n-gram
/// size times a Gaussian length penalty (σ = 6; as coco-caption, the length is the bigram count),
/// averaged over the sizes and the references, ×10.
pub fn cider_d(candidates: &[Vec<String>], references: &[Vec<Vec<String>>]) -> Vec<f64> {
    const SIGMA: f64 = 6.0;
    let refs: Vec<Vec<BTreeMap<Ngram, f64>>> = references
        .iter()
        .map(|rs| rs.iter().map(|r| ngram_counts(r)).collect())
        .collect();
    let mut df: BTreeMap<&Ngram, f64> = BTreeMap::new();
    for rs in &refs {
        let grams: BTreeSet<&Ngram> = rs.iter().flat_map(|r| r.keys()).collect();
        for g in grams {
            *df.entry(g).or_insert(0.0) += 1.0;
        }
    }
    let ref_len = (refs.len().max(1) as f64).ln();
    // Per n-gram size: the tf-idf vector and its norm; and the length.
    let vectorise = |counts: &BTreeMap<Ngram, f64>| {
        let mut vec: [BTreeMap<Ngram, f64>; 4] = Default::default();
        let mut norm = [0f64; 4];
        let mut length = 0f64;
        for (g, &tf) in counts {
            let idf = ref_len - df.get(g).copied().unwrap_or(0.0).max(1.0).ln();
            let n = g.len() - 1;
            let v = tf * idf;
            vec[n].insert(g.clone(), v);
            norm[n] += v * v;
            if n == 1 {
                length += tf;
            }
        }
        (vec, norm.map(f64::sqrt), length)
    };
    candidates
        .iter()
        .zip(&refs)
        .map(|(cand, rs)| {
            let (vh, nh, lh) = vectorise(&ngram_counts(cand));
            let mut total = 0.0;
            for r in rs {
                let (vr, nr, lr) = vectorise(r);
                let penalty = (-(lh - lr).powi(2) / (2.0 * SIGMA * SIGMA)).exp();
                for n in 0..4 {
                    let mut val: f64 = vh[n]
                        .iter()
                        .map(|(g, &x)| {
                            let y = vr[n].get(g).copied().unwrap_or(0.0);
                            x.min(y) * y
                        })
                        .sum();
                    if nh[n] != 0.0 && nr[n] != 0.0 {
                        val /= nh[n] * nr[n];
                    }
                    total += val * penalty / 4.0;
                }
            }
            10.0 * total / rs.len().max(1) as f64
        })
        .collect()
}

/// Caption metrics over a split (means over its items).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct CaptionScores {
    pub n: usize,
    /// CIDEr-D (coco-caption's scale: 0 to 10 per caption; papers print it ×100).
    pub cider: f64,
    /// The answer's words equal the reference's.
    pub exact_match: f64,
    /// Word-overlap F1 between the answer and the reference (bags of words).
    pub word_f1: f64,
}

/// Word-overlap F1 of two bags of words (1 when both are empty).
fn word_f1(a: &[String], b: &[String]) -> f64 {
    if a.is_empty() && b.is_empty() {
        return 1.0;
    }
    let mut left: BTreeMap<&String, usize> = BTreeMap::new();
    for w in b {
        *left.entry(w).or_insert(0) += 1;
    }
    let mut common = 0usize;
    for w in a {
        if let Some(k) = left.get_mut(w) {
            if *k > 0 {
                *k -= 1;
                common += 1;
            }
        }
    }
    if common == 0 {
        return 0.0;
    }
    let (p, r) = (
        common as f64 / a.len() as f64,
        common as f64 / b.len() as f64,
    );
    2.0 * p * r / (p + r)
}

/// Scores answers against one reference caption each.
pub fn score_captions(answers: &[String], references: &[String]) -> CaptionScores {
    let n = answers.len().min(references.len());
    let cand: Vec<Vec<String>> = answers[..n].iter().map(|a| caption_words(a)).collect();
    let refs: Vec<Vec<Vec<String>>> = references[..n]
        .iter()
        .map(|r| vec![caption_words(r)])
        .collect();
    let mean = |v: &mut dyn Iterator<Item = f64>| v.sum::<f64>() / n.max(1) as f64;
    CaptionScores {
        n,
        cider: mean(&mut cider_d(&cand, &refs).into_iter()),
        exact_match: mean(
            &mut cand
                .iter()
                .zip(&refs)
                .map(|(c, r)| (*c == r[0]) as u8 as f64),
        ),
        word_f1: mean(&mut cand.iter().zip(&refs).map(|(c, r)| word_f1(c, &r[0]))),
    }
}
