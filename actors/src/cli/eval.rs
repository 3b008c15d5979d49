//! `deem eval`: RobustVQA, POPE and region-level captioning through the generation actors (the serving
//! engine: batched, beam search or greedy). Yes/no answers are parsed and scored per split; region
//! captions (the paper's referring prompt, the region's mask through the API's `image_url.mask`) are
//! scored by CIDEr-D, exact match and word F1. Printed as tables and written as JSON.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use deem::config::DeemConfig;
use deem::eval::{self, CaptionScores, Question, YesNoScores};
use deem::text::tokenizer::DeemTokenizer;
use serde_json::json;

use crate::runtime::metrics::Metrics;
use crate::runtime::topology::Topology;
use crate::serve::engine::{Engine, Weights};
use crate::serve::{openai, validation, Event, ServeError, ValidRequest};

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

/// One region-captioning split: regions (image, mask) with their reference captions.
pub struct RegionSplit {
    pub name: String,
    pub regions: Vec<deem::data::readers::Region>,
}

/// A region file (COCO-style annotations with masks and captions, as `deem train` reads) as one split:
/// `regions_X.json` is `regions/X`, any other file `regions/<stem>`. Bad records are skipped and
/// logged, as in training.
pub fn region_split(file: &Path) -> anyhow::Result<RegionSplit> {
    let r = deem::data::readers::read_regions(file, None).map_err(anyhow::Error::msg)?;
    for b in &r.bad {
        tracing::warn!(record = %b.at, "skipped: {}", b.reason);
    }
    if !r.bad.is_empty() {
        tracing::warn!(skipped = r.bad.len(), kept = r.records.len(), file = %file.display(), "bad region records");
    }
    if r.records.is_empty() {
        bail!("{}: no region to evaluate", file.display());
    }
    let stem = file
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok(RegionSplit {
        name: format!("regions/{}", stem.strip_prefix("regions_").unwrap_or(&stem)),
        regions: r.records,
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
) -> anyhow::Result<ValidRequest> {
    // Evaluation files name their images as `deem data pope | robustvqa` write them: relative to the
    // file, or absolute (the operator's own files, unlike training records).
    chat_request(Some(&base.join(&q.image)), &q.text, cfg, tok, d)
}

/// The engine request of one user turn with `content` parts, decoded as `d` says (through the API's
/// own parsing and validation, as a client's request goes); `Err` holds the API's message.
fn user_turn(
    content: Vec<serde_json::Value>,
    cfg: &DeemConfig,
    tok: &DeemTokenizer,
    d: &Decoding,
) -> Result<ValidRequest, ServeError> {
    let body = json!({
        "messages": [{"role": "user", "content": content}],
        "temperature": 0, "max_tokens": d.max_tokens, "seed": 0, "csr_score": false, "max_images": 0,
        "num_beams": d.num_beams,
    });
    let r = openai::parse(body.to_string().as_bytes())?;
    validation::validate(r, cfg, tok, &cfg.model.name)
}

/// The engine request of one user turn: the image (if any), then `text`, decoded as `d` says.
pub fn chat_request(
    image: Option<&Path>,
    text: &str,
    cfg: &DeemConfig,
    tok: &DeemTokenizer,
    d: &Decoding,
) -> anyhow::Result<ValidRequest> {
    let mut content = Vec::new();
    if let Some(path) = image {
        let bytes = std::fs::read(path)
            .with_context(|| format!("{}: cannot read the image", path.display()))?;
        content
            .push(json!({"type": "image_url", "image_url": {"url": openai::png_data_url(&bytes)}}));
    }
    content.push(json!({"type": "text", "text": text}));
    let mut req = user_turn(content, cfg, tok, d).map_err(|e| match image {
        Some(path) => anyhow::anyhow!("{}: {e}", path.display()),
        None => anyhow::anyhow!(e),
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

/// An image as a PNG data: URL.
fn png_url(img: image::DynamicImage) -> anyhow::Result<String> {
    let mut png = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)?;
    Ok(openai::png_data_url(&png))
}

/// The engine request of one region, as a client sends it: the image, the paper's referring prompt,
/// then the image again with the region's mask (`image_url.mask`).
pub fn region_request(
    r: &deem::data::readers::Region,
    cfg: &DeemConfig,
    tok: &DeemTokenizer,
    d: &Decoding,
) -> anyhow::Result<ValidRequest> {
    let (w, h) = r.image.dimensions();
    let image = png_url(image::DynamicImage::ImageRgb8(r.image.clone()))?;
    let mask = image::GrayImage::from_fn(w, h, |x, y| {
        image::Luma([if r.mask[(y * w + x) as usize] { 255 } else { 0 }])
    });
    let mask = png_url(image::DynamicImage::ImageLuma8(mask))?;
    let content = vec![
        json!({"type": "image_url", "image_url": {"url": image}}),
        json!({"type": "text", "text": deem::data::mixer::REFERRING_PROMPT}),
        json!({"type": "image_url", "image_url": {"url": image, "mask": mask}}),
    ];
    Ok(user_turn(content, cfg, tok, d)?)
}

/// Per split: the scores and every (question, answer) pair.
pub struct SplitResult {
    pub name: String,
    pub scores: YesNoScores,
    pub answers: Vec<(Question, String)>,
}

/// Region captioning per split: the scores and every (reference, answer) pair.
pub struct CaptionResult {
    pub name: String,
    pub scores: CaptionScores,
    pub answers: Vec<(String, String)>,
}

/// The generation actors, started once for every split of an evaluation.
pub struct Evaluator {
    engine: Engine,
    cfg: DeemConfig,
    tok: Arc<DeemTokenizer>,
    decoding: Decoding,
    window: usize,
}

impl Evaluator {
    pub async fn start(
        cfg: &DeemConfig,
        topo: &Topology,
        weights: &Weights,
        tok: Arc<DeemTokenizer>,
        decoding: &Decoding,
    ) -> anyhow::Result<Self> {
        if decoding.num_beams > cfg.serve.max_running {
            bail!(
                "--num-beams {}: at most serve.max_running = {} (every beam holds a sequence slot)",
                decoding.num_beams,
                cfg.serve.max_running
            );
        }
        let engine = Engine::start(cfg, topo, weights, tok.clone(), Metrics::new()).await?;
        Ok(Evaluator {
            engine,
            cfg: cfg.clone(),
            tok,
            decoding: decoding.clone(),
            window: cfg.serve.queue_capacity.clamp(1, 64),
        })
    }

    /// The answers to `n` requests (`build(i)` makes the i-th; `what(i)` names it in errors), as many at
    /// once as the admission queue takes.
    async fn answers(
        &self,
        n: usize,
        build: impl Fn(usize) -> anyhow::Result<ValidRequest>,
        what: impl Fn(usize) -> String,
    ) -> anyhow::Result<Vec<String>> {
        let mut out = Vec::with_capacity(n);
        for start in (0..n).step_by(self.window) {
            let end = (start + self.window).min(n);
            let mut rxs = Vec::new();
            for i in start..end {
                // The window never exceeds the queue, so a full queue is a bug, not backpressure.
                let rx = match self.engine.submit(build(i)?) {
                    Ok(rx) => rx,
                    Err(ServeError::QueueFull { .. }) => {
                        bail!("the admission queue is full; lower the evaluation window")
                    }
                    Err(e) => bail!("the engine refused the request: {e}"),
                };
                rxs.push(rx);
            }
            for (i, rx) in (start..end).zip(rxs) {
                let mut text = String::new();
                while let Ok(ev) = rx.recv_async().await {
                    match ev {
                        Ok(Event::Text(t)) => text.push_str(&t),
                        Ok(Event::Done { .. }) => break,
                        Err(e) => bail!("{}: {e}", what(i)),
                        Ok(_) => {}
                    }
                }
                out.push(text);
            }
        }
        Ok(out)
    }

    /// A yes/no split: answers parsed and scored.
    pub async fn yes_no(&self, split: Split) -> anyhow::Result<SplitResult> {
        let q = &split.questions;
        let texts = self
            .answers(
                q.len(),
                |i| request(&q[i], &split.base, &self.cfg, &self.tok, &self.decoding),
                |i| q[i].image.clone(),
            )
            .await?;
        let answers: Vec<(Question, String)> = split.questions.into_iter().zip(texts).collect();
        let pred: Vec<bool> = answers.iter().map(|(_, a)| eval::parse_yes_no(a)).collect();
        let label: Vec<bool> = answers.iter().map(|(q, _)| q.label == "yes").collect();
        Ok(SplitResult {
            name: split.name,
            scores: eval::score(&pred, &label),
            answers,
        })
    }

    /// A region-captioning split: each region's caption scored against its reference.
    pub async fn regions(&self, split: RegionSplit) -> anyhow::Result<CaptionResult> {
        let r = &split.regions;
        let texts = self
            .answers(
                r.len(),
                |i| region_request(&r[i], &self.cfg, &self.tok, &self.decoding),
                |i| format!("{} region {i}", split.name),
            )
            .await?;
        let refs: Vec<String> = r.iter().map(|x| x.caption.clone()).collect();
        Ok(CaptionResult {
            name: split.name,
            scores: eval::score_captions(&texts, &refs),
            answers: refs.into_iter().zip(texts).collect(),
        })
    }

    pub async fn shutdown(self) {
        self.engine.shutdown().await;
    }
}

/// Runs every yes/no split through one engine.
pub async fn evaluate(
    cfg: &DeemConfig,
    topo: &Topology,
    weights: &Weights,
    tok: Arc<DeemTokenizer>,
    splits: Vec<Split>,
    decoding: &Decoding,
) -> anyhow::Result<Vec<SplitResult>> {
    let ev = Evaluator::start(cfg, topo, weights, tok, decoding).await?;
    let mut out = Vec::new();
    for split in splits {
        out.push(ev.yes_no(split).await?);
    }
    ev.shutdown().await;
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

/// Region-captioning results as a markdown table (CIDEr on coco-caption's 0–10 scale).
pub fn caption_table(results: &[CaptionResult]) -> String {
    let mut t =
        String::from("| split | n | CIDEr | exact match | word F1 |\n|---|---|---|---|---|\n");
    for r in results {
        let s = &r.scores;
        t.push_str(&format!(
            "| {} | {} | {:.3} | {:.3} | {:.3} |\n",
            r.name, s.n, s.cider, s.exact_match, s.word_f1
        ));
    }
    t
}

/// Yes/no and captioning results as one JSON object keyed by split.
pub fn all_to_json(results: &[SplitResult], captions: &[CaptionResult]) -> serde_json::Value {
    let mut v = to_json(results);
    if let Some(m) = v.as_object_mut() {
        for r in captions {
            m.insert(
                r.name.clone(),
                json!({
                    "scores": r.scores,
                    "answers": r.answers.iter().map(|(reference, a)| json!({
                        "reference": reference, "answer": a,
                    })).collect::<Vec<_>>(),
                }),
            );
        }
    }
    v
}

/// `deem eval`.
pub fn run(args: super::EvalArgs) -> anyhow::Result<()> {
    let cfg = args.config.load()?;
    let topo = args
        .topology
        .load(&cfg, deem::device::cuda_device_count())?;
    let tok = deem::text::tokenizer::load_tokenizer(
        args.tokenizer.as_deref(),
        args.checkpoint.as_deref(),
        &cfg.config,
    )?;
    let mut splits = Vec::new();
    if let Some(f) = &args.robustvqa {
        splits.extend(crate::cli::eval::robustvqa_splits(f)?);
    }
    for f in &args.pope {
        splits.push(crate::cli::eval::pope_split(f)?);
    }
    let mut region_splits = Vec::new();
    for f in &args.regions {
        region_splits.push(crate::cli::eval::region_split(f)?);
    }
    if splits.is_empty() && region_splits.is_empty() {
        anyhow::bail!(
            "nothing to evaluate: give --robustvqa FILE, --pope FILE and/or --regions FILE"
        );
    }
    let weights = match &args.checkpoint {
        Some(p) => crate::serve::engine::Weights::Checkpoint(p.clone()),
        None => crate::serve::engine::Weights::Init,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let decoding = crate::cli::eval::Decoding {
        max_tokens: args.max_tokens,
        num_beams: args.num_beams,
        prime: args.prime.clone(),
    };
    let (results, captions) = runtime.block_on(async {
        let ev = crate::cli::eval::Evaluator::start(
            &cfg.config,
            &topo,
            &weights,
            std::sync::Arc::new(tok),
            &decoding,
        )
        .await?;
        let (mut results, mut captions) = (Vec::new(), Vec::new());
        for s in splits {
            results.push(ev.yes_no(s).await?);
        }
        for s in region_splits {
            captions.push(ev.regions(s).await?);
        }
        ev.shutdown().await;
        anyhow::Ok((results, captions))
    })?;
    if !results.is_empty() {
        print!("{}", crate::cli::eval::table(&results));
    }
    if !captions.is_empty() {
        print!("{}", crate::cli::eval::caption_table(&captions));
    }
    if let Some(out) = &args.out {
        std::fs::write(
            out,
            serde_json::to_string_pretty(&crate::cli::eval::all_to_json(&results, &captions))?,
        )?;
        println!("wrote {}", out.display());
    }
    Ok(())
}
