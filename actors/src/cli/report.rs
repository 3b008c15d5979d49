//! `deem report` and `deem data robustvqa`: the main job's report folder (markdown, JSON, PNG loss
//! curves drawn with plotters) and the RobustVQA builder's classifiers (a pixel-prototype baseline, and a
//! trained DEEM model asked what the main object is).

use deem::data::DataError;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use deem::data::world::{self, Object, Scene, Split};
use plotters::prelude::*;
use serde_json::{json, Value};

/// One training run's per-step records (`steps.jsonl`).
pub struct Run {
    pub name: String,
    pub steps: Vec<Value>,
}

pub fn read_run(name: &str, dir: &Path) -> anyhow::Result<Run> {
    let p = dir.join("steps.jsonl");
    let text =
        std::fs::read_to_string(&p).with_context(|| format!("{}: cannot read", p.display()))?;
    let steps = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str(l).with_context(|| format!("{}:{}: not JSON", p.display(), i + 1))
        })
        .collect::<anyhow::Result<Vec<Value>>>()?;
    Ok(Run {
        name: name.to_string(),
        steps,
    })
}

/// Registers DejaVu Sans (Debian's fonts-dejavu-core) for plot text; without it plots have no text.
pub fn fonts() -> bool {
    static ONCE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ONCE.get_or_init(|| {
        for p in [
            "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
            "/usr/share/fonts/TTF/DejaVuSans.ttf",
        ] {
            if let Ok(bytes) = std::fs::read(p) {
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                    return true;
                }
            }
        }
        false
    })
}

/// Plots the loss parts of every run (steps of later runs continue the x axis) into a PNG.
pub fn plot_losses(runs: &[Run], out: &Path) -> anyhow::Result<()> {
    let text = fonts();
    let parts = ["total", "ntp", "nip", "csr"];
    let mut series: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
    let mut offset = 0.0;
    for r in runs {
        for part in parts {
            let pts: Vec<(f64, f64)> = r
                .steps
                .iter()
                .filter_map(|s| Some((offset + s["step"].as_f64()?, s[part].as_f64()?)))
                .filter(|(_, y)| y.is_finite() && *y > 0.0)
                .collect();
            if !pts.is_empty() {
                series.push((format!("{} {part}", r.name), pts));
            }
        }
        offset += r.steps.len() as f64;
    }
    let ymax = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|(_, y)| *y))
        .fold(0.0f64, f64::max)
        .max(1e-3);
    let root = BitMapBackend::new(out, (900, 520)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut b = ChartBuilder::on(&root);
    b.margin(15)
        .x_label_area_size(if text { 35 } else { 5 })
        .y_label_area_size(if text { 50 } else { 5 });
    if text {
        b.caption(
            "training losses by part (stages one after another)",
            ("sans-serif", 20),
        );
    }
    let mut chart = b.build_cartesian_2d(0.0..offset.max(1.0), 0.0..ymax * 1.05)?;
    let mut mesh = chart.configure_mesh();
    if text {
        mesh.x_desc("step").y_desc("loss");
    } else {
        mesh.disable_x_axis().disable_y_axis();
    }
    mesh.draw()?;
    let palette = [&RED, &BLUE, &GREEN, &MAGENTA, &CYAN, &BLACK, &YELLOW];
    for (i, (name, pts)) in series.iter().enumerate() {
        let c = palette[i % palette.len()];
        let s = chart.draw_series(LineSeries::new(pts.iter().copied(), c))?;
        if text {
            s.label(name.clone())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c));
        }
    }
    if text {
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
    }
    root.present()?;
    Ok(())
}

/// The baseline classifier of the RobustVQA builder: the nearest class prototype. Every label
/// (colour × shape) is rendered alone at the centre; an image's classes are ranked by the mean squared
/// difference of its pixels to each prototype's (after removing each image's mean colour, so the
/// background tint does not decide). The paper mined with CLIP ViT-L/14; this is the synthetic world's
/// stand-in, cheap and deterministic.
pub struct PrototypeClassifier {
    labels: Vec<String>,
    protos: Vec<Vec<f32>>,
    size: u32,
}

fn centred(img: &image::RgbImage, size: u32) -> Vec<f32> {
    let img = image::imageops::resize(img, size, size, image::imageops::FilterType::Triangle);
    let v: Vec<f32> = img
        .into_raw()
        .into_iter()
        .map(|x| x as f32 / 255.0)
        .collect();
    let mean =
        [0usize, 1, 2].map(|c| v.iter().skip(c).step_by(3).sum::<f32>() / (v.len() / 3) as f32);
    v.iter().enumerate().map(|(i, x)| x - mean[i % 3]).collect()
}

impl PrototypeClassifier {
    pub fn new(size: u32) -> Self {
        let mut labels = Vec::new();
        let mut protos = Vec::new();
        for (ci, (cname, _)) in world::COLOURS.iter().enumerate() {
            for (si, sname) in world::SHAPES.iter().enumerate() {
                let n = size as f64;
                let scene = Scene::single(
                    Object {
                        shape: si,
                        colour: ci,
                        cx: n / 2.0,
                        cy: n / 2.0,
                        r: n * 0.28,
                    },
                    size,
                );
                labels.push(format!("{cname} {sname}"));
                protos.push(centred(&scene.render(), size));
            }
        }
        PrototypeClassifier {
            labels,
            protos,
            size,
        }
    }

    /// Every label, best first.
    pub fn rank(&self, img: &image::RgbImage) -> Vec<String> {
        let x = centred(img, self.size);
        let mut d: Vec<(f32, usize)> = self
            .protos
            .iter()
            .enumerate()
            .map(|(i, p)| {
                (
                    p.iter()
                        .zip(&x)
                        .map(|(a, b)| (a - b) * (a - b))
                        .sum::<f32>(),
                    i,
                )
            })
            .collect();
        d.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        d.into_iter().map(|(_, i)| self.labels[i].clone()).collect()
    }
}

/// The question the model classifier asks (the instruction data's "main object" question).
pub const MAIN_OBJECT_QUESTION: &str = "What is the main object in this image?";

/// A trained DEEM as RobustVQA's classifier: asked [`MAIN_OBJECT_QUESTION`] about the image (the chat
/// template the evaluation uses), every label is ranked by the model's log-likelihood of the reply
/// "A {label}." with its EOS. `deem experiment csr` mines with its λ_CSR = 0 baseline, as the paper
/// mined with CLIP.
pub struct ModelClassifier {
    _vs: tch::nn::VarStore,
    model: deem::models::deem::Deem,
    tok: std::sync::Arc<deem::text::tokenizer::DeemTokenizer>,
    labels: Vec<String>,
    /// Each label's reply ids (EOS included).
    replies: Vec<Vec<i64>>,
}

impl ModelClassifier {
    /// Every colour × shape label of the synthetic world, scored by the model in `checkpoint`.
    pub fn new(
        cfg: &deem::config::DeemConfig,
        checkpoint: &Path,
        tok: std::sync::Arc<deem::text::tokenizer::DeemTokenizer>,
    ) -> anyhow::Result<Self> {
        let (vs, model) = load_model(cfg, checkpoint)?;
        let labels: Vec<String> = world::COLOURS
            .iter()
            .flat_map(|(c, _)| world::SHAPES.iter().map(move |s| format!("{c} {s}")))
            .collect();
        let replies = labels
            .iter()
            .map(|l| reply_ids(&tok, &format!(" A {l}."), cfg.llm.eos_token_id))
            .collect::<anyhow::Result<_>>()?;
        Ok(ModelClassifier {
            _vs: vs,
            model,
            tok,
            labels,
            replies,
        })
    }

    /// Every label, most likely first (ties by label order).
    pub fn rank(&self, image: &Path) -> anyhow::Result<Vec<String>> {
        let scores = self.scores(image)?;
        let mut order: Vec<usize> = (0..scores.len()).collect();
        order.sort_by(|&a, &b| scores[b].1.total_cmp(&scores[a].1).then(a.cmp(&b)));
        Ok(order.into_iter().map(|i| scores[i].0.clone()).collect())
    }

    /// Each label (colour-major order) with the log-likelihood of its reply.
    pub fn scores(&self, image: &Path) -> anyhow::Result<Vec<(String, f64)>> {
        let scores = self.reply_scores(Some(image), MAIN_OBJECT_QUESTION, &self.replies)?;
        Ok(self.labels.iter().cloned().zip(scores).collect())
    }

    /// The log-likelihood of each reply (ids, EOS included) to `question` about `image` (a text-only
    /// question without).
    pub fn reply_scores(
        &self,
        image: Option<&Path>,
        question: &str,
        replies: &[Vec<i64>],
    ) -> anyhow::Result<Vec<f64>> {
        let cfg = &self.model.cfg;
        let req = crate::cli::eval::chat_request(
            image,
            question,
            cfg,
            &self.tok,
            &crate::cli::eval::Decoding::default(),
        )?;
        let p = req.prompt.len();
        let longest = replies.iter().map(Vec::len).max().unwrap_or(0);
        let n = replies.len() as i64;
        // One row per reply: prompt, reply, padding after it (causal: padding changes nothing before).
        let mut ids = Vec::with_capacity(replies.len() * (p + longest));
        for r in replies {
            ids.extend_from_slice(&req.prompt);
            ids.extend_from_slice(r);
            ids.extend(std::iter::repeat_n(cfg.llm.pad_token_id, longest - r.len()));
        }
        let scores: Vec<f64> = tch::no_grad(|| -> anyhow::Result<Vec<f64>> {
            let ids = tch::Tensor::from_slice(&ids).view([n, (p + longest) as i64]);
            let visual = req
                .images
                .as_ref()
                .map(|px| self.model.vision.forward(px).0.repeat([n, 1, 1]));
            let embeds = deem::models::deem::embed_sequence(
                &self.model.llm,
                &ids,
                visual.as_ref(),
                self.model.ids,
            )?;
            let h = self
                .model
                .llm
                .norm(&self.model.llm.forward_layers(&embeds, 0, None));
            // Position t predicts id t + 1: the reply's ids are predicted from p − 1 on.
            let logp = self
                .model
                .llm
                .logits(&h.narrow(1, p as i64 - 1, longest as i64))
                .log_softmax(-1, tch::Kind::Double);
            let target = ids.narrow(1, p as i64, longest as i64);
            let picked = logp.gather(2, &target.unsqueeze(-1), false).squeeze_dim(-1);
            let lens: Vec<i64> = replies.iter().map(|r| r.len() as i64).collect();
            let mask = tch::Tensor::arange(longest as i64, (tch::Kind::Int64, tch::Device::Cpu))
                .unsqueeze(0)
                .lt_tensor(&tch::Tensor::from_slice(&lens).unsqueeze(1));
            let total = (picked * mask.to_kind(tch::Kind::Double)).sum_dim_intlist(1, false, None);
            Ok(Vec::try_from(total)?)
        })?;
        Ok(scores)
    }
}

/// A reply's ids as [`ModelClassifier::reply_scores`] takes them: `text`'s tokens, then EOS.
pub fn reply_ids(
    tok: &deem::text::tokenizer::DeemTokenizer,
    text: &str,
    eos: i64,
) -> anyhow::Result<Vec<i64>> {
    let mut ids: Vec<i64> = tok
        .encode(text, false)?
        .into_iter()
        .map(i64::from)
        .collect();
    ids.push(eos);
    Ok(ids)
}

/// What ranks the classes of RobustVQA's images (the hard negative is the best-ranked wrong one).
pub enum Miner<'a> {
    Prototype(PrototypeClassifier),
    Model(&'a ModelClassifier),
}

impl Miner<'_> {
    /// Every label for the image at `path`, best first.
    fn rank(&self, path: &Path) -> Result<Vec<String>, DataError> {
        match self {
            Miner::Prototype(clf) => {
                let img = image::open(path)
                    .map_err(|e| DataError::from(format!("{}: {e}", path.display())))?
                    .to_rgb8();
                Ok(clf.rank(&img))
            }
            Miner::Model(m) => m.rank(path).map_err(|e| DataError::from(format!("{e:#}"))),
        }
    }
}

/// Builds `robustvqa.json` over the evaluation splits of a synthesized folder (`eval/<split>/`).
pub fn build_robustvqa(
    data: &Path,
    splits: &[Split],
    only_misclassified: bool,
    miner: Miner<'_>,
    out: &Path,
) -> anyhow::Result<BTreeMap<String, usize>> {
    // Image paths stay relative when the file sits in the data folder, else absolute.
    let beside = out
        .parent()
        .map(|p| p.canonicalize().ok() == data.canonicalize().ok())
        .unwrap_or(false);
    let root = if beside {
        PathBuf::new()
    } else {
        data.canonicalize()
            .with_context(|| format!("{}: cannot resolve", data.display()))?
    };
    let mut all = BTreeMap::new();
    let mut counts = BTreeMap::new();
    for &s in splits {
        let folder = data.join("eval").join(s.name());
        let prefix = format!("{}/", root.join("eval").join(s.name()).display());
        let entries =
            deem::eval::build_robustvqa(&folder, &prefix, only_misclassified, |p| miner.rank(p))
                .map_err(anyhow::Error::msg)?;
        counts.insert(format!("synthetic_{}", s.name()), entries.len());
        all.insert(format!("synthetic_{}", s.name()), entries);
    }
    let tmp = out.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_string_pretty(&all)?)
        .with_context(|| format!("{}: cannot write", tmp.display()))?;
    std::fs::rename(&tmp, out).with_context(|| format!("{}: cannot write", out.display()))?;
    Ok(counts)
}

/// The whole model of `cfg` with the weights of `checkpoint` (a run directory or a safetensors file), on
/// the CPU.
pub fn load_model(
    cfg: &deem::config::DeemConfig,
    checkpoint: &Path,
) -> anyhow::Result<(tch::nn::VarStore, deem::models::deem::Deem)> {
    let vs = tch::nn::VarStore::new(tch::Device::Cpu);
    let model = deem::with_init_lock(None, || deem::models::deem::Deem::new(&vs.root(), cfg))?;
    let file = if checkpoint.is_dir() {
        checkpoint.join("model.safetensors")
    } else {
        checkpoint.to_path_buf()
    };
    let ck = deem::checkpoint::Checkpoint::open(&file)
        .with_context(|| format!("{}: cannot open the checkpoint", file.display()))?;
    ck.load_into(
        &vs,
        &deem::checkpoint::LoadSpec {
            component: "DEEM".into(),
            namespace: vec![String::new()],
            optional: deem::models::region::key_prefixes(),
            ..Default::default()
        },
    )?;
    Ok((vs, model))
}

/// CSR reconstructions of `images` by the model in `checkpoint` (config `cfg`): a PNG with each input
/// above its reconstruction from its own encoder embedding (20 DDIM steps, seeded noise).
pub fn plot_reconstructions(
    cfg: &deem::config::DeemConfig,
    checkpoint: &Path,
    images: &[PathBuf],
    out: &Path,
) -> anyhow::Result<()> {
    let (_vs, model) = load_model(cfg, checkpoint)?;
    let size = cfg.diffusion.image_size;
    let pixels: Vec<tch::Tensor> = images
        .iter()
        .map(|p| -> anyhow::Result<tch::Tensor> {
            let img = image::open(p)
                .with_context(|| format!("{}", p.display()))?
                .to_rgb8();
            Ok(deem::models::vision::unit_pixels(&img, size as u32))
        })
        .collect::<anyhow::Result<_>>()?;
    let px = tch::Tensor::stack(&pixels, 0);
    let (_, cond) = tch::no_grad(|| model.vision.forward(&px));
    let rec = model.diffusion.reconstruct(&cond, 20, 0);
    let n = images.len() as u32;
    let s = size as u32;
    let mut sheet =
        image::RgbImage::from_pixel(n * (s + 4), 2 * s + 4, image::Rgb([255, 255, 255]));
    for (row, t) in [(0u32, &px), (1, &rec)] {
        for i in 0..n {
            let img =
                deem::models::vision::to_rgb_image(&t.get(i as i64)).map_err(anyhow::Error::msg)?;
            image::imageops::replace(
                &mut sheet,
                &img,
                (i * (s + 4)) as i64,
                (row * (s + 4)) as i64,
            );
        }
    }
    let big = image::imageops::resize(
        &sheet,
        sheet.width() * 3,
        sheet.height() * 3,
        image::imageops::FilterType::Nearest,
    );
    big.save(out)?;
    Ok(())
}

/// Writes `report.md` and `report.json` (and `losses.png`) into `out`.
pub fn write(out: &Path, runs: &[Run], eval: &Value, notes: &[String]) -> anyhow::Result<()> {
    std::fs::create_dir_all(out)?;
    plot_losses(runs, &out.join("losses.png"))?;
    let mut md = String::from("# deem main job report\n\n");
    for n in notes {
        md.push_str(&format!("{n}\n\n"));
    }
    md.push_str("## Training\n\n| run | steps | first loss | last loss | last NTP | last CSR |\n|---|---|---|---|---|---|\n");
    let mut runs_json = Vec::new();
    for r in runs {
        let first = r
            .steps
            .first()
            .and_then(|s| s["total"].as_f64())
            .unwrap_or(f64::NAN);
        let last = r.steps.last().cloned().unwrap_or(Value::Null);
        md.push_str(&format!(
            "| {} | {} | {:.4} | {:.4} | {:.4} | {:.4} |\n",
            r.name,
            r.steps.len(),
            first,
            last["total"].as_f64().unwrap_or(f64::NAN),
            last["ntp"].as_f64().unwrap_or(f64::NAN),
            last["csr"].as_f64().unwrap_or(f64::NAN)
        ));
        runs_json.push(
            json!({"name": r.name, "steps": r.steps.len(), "first_total": first, "last": last}),
        );
    }
    md.push_str("\n![losses](losses.png)\n");
    if out.join("csr_reconstructions.png").exists() {
        md.push_str("\n## CSR reconstructions\n\nTop: input images (in distribution, then R, A, V); bottom: each drawn by the UNet from the encoder's own embedding (20 DDIM steps).\n\n![CSR reconstructions](csr_reconstructions.png)\n");
    }
    md.push_str("\n## Evaluation\n\n| split | n | accuracy | precision | recall | F1 | yes ratio |\n|---|---|---|---|---|---|---|\n");
    let is_caption = |v: &Value| v["scores"].get("cider").is_some();
    if let Some(m) = eval.as_object() {
        for (split, v) in m.iter().filter(|(_, v)| !is_caption(v)) {
            let s = &v["scores"];
            md.push_str(&format!(
                "| {split} | {} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} |\n",
                s["n"],
                s["accuracy"].as_f64().unwrap_or(f64::NAN),
                s["precision"].as_f64().unwrap_or(f64::NAN),
                s["recall"].as_f64().unwrap_or(f64::NAN),
                s["f1"].as_f64().unwrap_or(f64::NAN),
                s["yes_ratio"].as_f64().unwrap_or(f64::NAN)
            ));
        }
    }
    if let Some(m) = eval.as_object() {
        let captions: Vec<_> = m.iter().filter(|(_, v)| is_caption(v)).collect();
        if !captions.is_empty() {
            md.push_str("\n## Region-level captioning\n\n| split | n | CIDEr | exact match | word F1 |\n|---|---|---|---|---|\n");
            for (split, v) in captions {
                let s = &v["scores"];
                md.push_str(&format!(
                    "| {split} | {} | {:.3} | {:.3} | {:.3} |\n",
                    s["n"],
                    s["cider"].as_f64().unwrap_or(f64::NAN),
                    s["exact_match"].as_f64().unwrap_or(f64::NAN),
                    s["word_f1"].as_f64().unwrap_or(f64::NAN)
                ));
            }
        }
    }
    std::fs::write(out.join("report.md"), md)?;
    let scores: BTreeMap<String, Value> = eval
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v["scores"].clone()))
                .collect()
        })
        .unwrap_or_default();
    std::fs::write(
        out.join("report.json"),
        serde_json::to_string_pretty(
            &json!({"runs": runs_json, "evaluation": scores, "notes": notes}),
        )?,
    )?;
    Ok(())
}

/// `deem report`.
pub fn run(args: super::ReportArgs) -> anyhow::Result<()> {
    let super::ReportArgs {
        out,
        runs,
        eval,
        notes,
        checkpoint,
        images,
        config,
    } = args;
    if let (Some(ck), false) = (&checkpoint, images.is_empty()) {
        std::fs::create_dir_all(&out)?;
        let cfg = config.load()?;
        crate::cli::report::plot_reconstructions(
            &cfg.config,
            ck,
            &images,
            &out.join("csr_reconstructions.png"),
        )?;
    }
    let runs = runs
        .iter()
        .map(|r| {
            let (name, dir) = r
                .split_once('=')
                .ok_or_else(|| anyhow::anyhow!("--run {r}: expected NAME=RUN_DIR"))?;
            crate::cli::report::read_run(name, std::path::Path::new(dir))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let eval = match eval {
        Some(p) => serde_json::from_str(&std::fs::read_to_string(&p)?)?,
        None => serde_json::Value::Null,
    };
    crate::cli::report::write(&out, &runs, &eval, &notes)?;
    println!("wrote {}/report.md, report.json, losses.png", out.display());
    Ok(())
}
