//! `deem eval`: RobustVQA and POPE through the generation actors (the serving engine: batched, beam
//! search or greedy), answers parsed to yes/no, scored per split, printed as a table and written as
//! JSON.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use deem::config::DeemConfig;
use deem::eval::{self, Question, YesNoScores};
use deem::tokenizer::DeemTokenizer;
use serde_json::json;

use crate::metrics::Metrics;
use crate::serve::api;
use crate::serve::engine::{Engine, Event, Rejected, Weights};
use crate::topology::Topology;

/// One split to evaluate: its questions and the folder their image paths are relative to.
pub struct Split {
    pub name: String,
    pub base: PathBuf,
    pub questions: Vec<Question>,
}

/// The splits of a RobustVQA file (`robustvqa/<split>`).
pub fn robustvqa_splits(file: &Path) -> anyhow::Result<Vec<Split>> {
    let base = file
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
    Ok(eval::read_robustvqa(file)
        .map_err(anyhow::Error::msg)?
        .into_iter()
        .map(|(name, questions)| Split {
            name: format!("robustvqa/{name}"),
            base: base.clone(),
            questions,
        })
        .collect())
}

/// A POPE-format file as one split: `pope_X.jsonl` is `pope/X`, any other file its stem (e.g.
/// `colour_id`).
pub fn pope_split(file: &Path) -> anyhow::Result<Split> {
    let base = file
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
    let stem = file
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok(Split {
        name: match stem.strip_prefix("pope_") {
            Some(s) => format!("pope/{s}"),
            None => stem,
        },
        base,
        questions: eval::read_pope(file).map_err(anyhow::Error::msg)?,
    })
}

/// How answers are decoded.
#[derive(Debug, Clone)]
pub struct Decoding {
    /// Tokens per answer.
    pub max_tokens: usize,
    /// Beam width; 1 = greedy.
    pub num_beams: usize,
    /// The reply starts with this text (the paper primes "The answer is" for models trained that way).
    pub prime: String,
}

impl Default for Decoding {
    /// The reference evaluation's decoding: beam 3, at most 10 new tokens, no priming.
    fn default() -> Self {
        Decoding {
            max_tokens: 10,
            num_beams: 3,
            prime: String::new(),
        }
    }
}

/// The engine request of one question: the image, then the question (the LLaVA layout the instruction
/// data uses: `<image>` leads the first question), decoded as `d` says.
pub fn request(
    q: &Question,
    base: &Path,
    cfg: &DeemConfig,
    tok: &DeemTokenizer,
    d: &Decoding,
) -> anyhow::Result<crate::serve::engine::Request> {
    chat_request(Some(&base.join(&q.image)), &q.text, cfg, tok, d)
}

/// The engine request of one user turn: the image (if any), then `text`, decoded as `d` says.
pub fn chat_request(
    image: Option<&Path>,
    text: &str,
    cfg: &DeemConfig,
    tok: &DeemTokenizer,
    d: &Decoding,
) -> anyhow::Result<crate::serve::engine::Request> {
    use base64::Engine as _;
    let mut content = Vec::new();
    if let Some(path) = image {
        let bytes = std::fs::read(path)
            .with_context(|| format!("{}: cannot read the image", path.display()))?;
        let url = format!(
            "data:image/png;base64,{}",
            base64::engine::general_purpose::STANDARD.encode(bytes)
        );
        content.push(json!({"type": "image_url", "image_url": {"url": url}}));
    }
    content.push(json!({"type": "text", "text": text}));
    let body = json!({
        "messages": [{"role": "user", "content": content}],
        "temperature": 0, "max_tokens": d.max_tokens, "seed": 0, "csr_score": false, "max_images": 0,
        "num_beams": d.num_beams,
    });
    let r = api::parse(body.to_string().as_bytes()).map_err(|e| anyhow::anyhow!(e.message))?;
    let mut req = api::build(r, cfg, tok, &cfg.model.name).map_err(|e| match image {
        Some(path) => anyhow::anyhow!("{}: {}", path.display(), e.message),
        None => anyhow::anyhow!(e.message),
    })?;
    if !d.prime.is_empty() {
        req.prompt.extend(
            tok.encode(&format!(" {}", d.prime), false)?
                .into_iter()
                .map(i64::from),
        );
    }
    Ok(req)
}

/// Per split: the scores and every (question, answer) pair.
pub struct SplitResult {
    pub name: String,
    pub scores: YesNoScores,
    pub answers: Vec<(Question, String)>,
}

/// Runs every question through the engine (as many at once as the admission queue takes).
pub async fn run(
    cfg: &DeemConfig,
    topo: &Topology,
    weights: &Weights,
    tok: Arc<DeemTokenizer>,
    splits: Vec<Split>,
    decoding: &Decoding,
) -> anyhow::Result<Vec<SplitResult>> {
    let engine = Engine::start(cfg, topo, weights, tok.clone(), Metrics::new()).await?;
    let mut out = Vec::new();
    if decoding.num_beams > cfg.serve.max_running {
        bail!(
            "--num-beams {}: at most serve.max_running = {} (every beam holds a sequence slot)",
            decoding.num_beams,
            cfg.serve.max_running
        );
    }
    let window = cfg.serve.queue_capacity.clamp(1, 64);
    for split in splits {
        let mut answers = Vec::with_capacity(split.questions.len());
        for chunk in split.questions.chunks(window) {
            let mut rxs = Vec::new();
            for q in chunk {
                let req = request(q, &split.base, cfg, &tok, decoding)?;
                // The window never exceeds the queue, so a full queue is a bug, not backpressure.
                let rx = match engine.submit(req) {
                    Ok(rx) => rx,
                    Err(Rejected::QueueFull) => {
                        bail!("the admission queue is full; lower the evaluation window")
                    }
                    Err(Rejected::ShuttingDown) => bail!("the engine stopped"),
                };
                rxs.push(rx);
            }
            for (q, rx) in chunk.iter().zip(rxs) {
                let mut text = String::new();
                while let Ok(ev) = rx.recv_async().await {
                    match ev {
                        Event::Text(t) => text.push_str(&t),
                        Event::Done { .. } => break,
                        Event::Error { message, .. } => bail!("{}: {message}", q.image),
                        _ => {}
                    }
                }
                answers.push((q.clone(), text));
            }
        }
        let pred: Vec<bool> = answers.iter().map(|(_, a)| eval::parse_yes_no(a)).collect();
        let label: Vec<bool> = answers.iter().map(|(q, _)| q.label == "yes").collect();
        out.push(SplitResult {
            name: split.name,
            scores: eval::score(&pred, &label),
            answers,
        });
    }
    engine.shutdown().await;
    Ok(out)
}

/// The results as a markdown table.
pub fn table(results: &[SplitResult]) -> String {
    let mut t = String::from("| split | n | accuracy | precision | recall | F1 | yes ratio |\n|---|---|---|---|---|---|---|\n");
    for r in results {
        let s = &r.scores;
        t.push_str(&format!(
            "| {} | {} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} |\n",
            r.name, s.n, s.accuracy, s.precision, s.recall, s.f1, s.yes_ratio
        ));
    }
    t
}

/// The results as JSON (scores per split, and each answer).
pub fn to_json(results: &[SplitResult]) -> serde_json::Value {
    json!(results
        .iter()
        .map(|r| (
            r.name.clone(),
            json!({
                "scores": r.scores,
                "answers": r.answers.iter().map(|(q, a)| json!({
                    "image": q.image, "question": q.text, "label": q.label, "answer": a,
                    "parsed": if eval::parse_yes_no(a) { "yes" } else { "no" },
                })).collect::<Vec<_>>(),
            })
        ))
        .collect::<BTreeMap<_, _>>())
}
