//! Dataset files in the formats users train DEEM on, and the synthetic world written in them:
//!
//! - image-text pairs: JSONL `{"image": path, "caption": text}` and webdataset-style tar shards
//!   (`<key>.png` + `<key>.txt` members);
//! - MMC4-style interleaved documents: JSONL `{"text_list": [...], "image_info": [{"image_name",
//!   "matched_text_index", "matched_sim"}]}` with local image paths;
//! - LLaVA-style instructions: a JSON list of `{"id", "image", "conversations": [{"from": "human" |
//!   "gpt", "value"}]}` with `<image>` in the first human turn (`image` left out: a text-only
//!   conversation);
//! - region data: COCO-style `{"images", "annotations": [{"image_id", "segmentation" (RLE
//!   `{"size": [h, w], "counts": [...]}`, the counts a list or pycocotools' compressed string, or
//!   polygons), "caption"}], "categories"}`.
//!
//! Image paths in records are relative to an images folder: the file's own unless one is given
//! (`train.sources[i].images`, `deem data check --images`), as LLaVA's `--image_folder` or COCO's
//! `train2014/` sit apart from their annotation files. Tar shards carry their images.
//!
//! Readers never stop at a bad record (bad JSON, a missing or undecodable image, a malformed mask): it
//! is skipped and reported with its file and line (or entry); [`ReadReport::check`] turns too high a
//! share of bad records into an error.

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use image::RgbImage;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::world::{self, Scene, Split};

/// A skipped record.
#[derive(Debug, Clone, PartialEq)]
pub struct BadRecord {
    /// `file:line` (JSONL), `file[entry]` (JSON lists) or `file:member` (tar).
    pub at: String,
    pub reason: String,
}

/// What a reader returns: the good records and the skipped ones.
#[derive(Debug)]
pub struct ReadReport<T> {
    pub records: Vec<T>,
    pub bad: Vec<BadRecord>,
}

impl<T> ReadReport<T> {
    fn new() -> Self {
        ReadReport {
            records: Vec::new(),
            bad: Vec::new(),
        }
    }

    fn skip(&mut self, at: String, reason: impl Into<String>) {
        let reason = reason.into();
        self.bad.push(BadRecord { at, reason });
    }

    /// Share of bad records among all records read.
    pub fn bad_ratio(&self) -> f64 {
        let total = self.records.len() + self.bad.len();
        if total == 0 {
            0.0
        } else {
            self.bad.len() as f64 / total as f64
        }
    }

    /// An error when more than `max_ratio` of the records were bad, naming the file and the first few.
    pub fn check(&self, file: &Path, max_ratio: f64) -> Result<(), String> {
        if self.bad_ratio() > max_ratio {
            let first: Vec<String> = self
                .bad
                .iter()
                .take(3)
                .map(|b| format!("{}: {}", b.at, b.reason))
                .collect();
            return Err(format!(
                "{}: {} of {} records are bad ({:.1}%, above the allowed {:.1}%); first: {}",
                file.display(),
                self.bad.len(),
                self.records.len() + self.bad.len(),
                100.0 * self.bad_ratio(),
                100.0 * max_ratio,
                first.join("; ")
            ));
        }
        Ok(())
    }
}

/// An image-text pair.
#[derive(Debug, Clone)]
pub struct Pair {
    pub image: RgbImage,
    pub caption: String,
}

/// An interleaved document: its sentences, and each image with the sentence it belongs to.
#[derive(Debug, Clone)]
pub struct Document {
    pub texts: Vec<String>,
    pub images: Vec<(RgbImage, usize)>,
}

/// One instruction conversation: the image (if any) and (human, assistant) turns.
#[derive(Debug, Clone)]
pub struct Conversation {
    pub image: Option<RgbImage>,
    pub turns: Vec<(String, String)>,
}

/// A region: the image, the region's mask (row-major, image-sized) and its caption.
#[derive(Debug, Clone)]
pub struct Region {
    pub image: RgbImage,
    pub mask: Vec<bool>,
    pub caption: String,
}

fn load_image(base: &Path, rel: &str) -> Result<RgbImage, String> {
    let p = base.join(rel);
    if !p.exists() {
        return Err(format!("missing image {}", p.display()));
    }
    image::open(&p)
        .map(|i| i.to_rgb8())
        .map_err(|e| format!("cannot decode image {}: {e}", p.display()))
}

/// The folder a file's image paths are relative to: `images` when given, else the file's own folder.
fn image_root(path: &Path, images: Option<&Path>) -> PathBuf {
    images.map_or_else(
        || {
            path.parent()
                .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
        },
        Path::to_path_buf,
    )
}

fn jsonl_lines(path: &Path) -> Result<Vec<(usize, String)>, String> {
    let f = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
        let line = line.map_err(|e| format!("{}:{}: {e}", path.display(), i + 1))?;
        if !line.trim().is_empty() {
            out.push((i + 1, line));
        }
    }
    Ok(out)
}

#[derive(Deserialize)]
struct PairLine {
    image: String,
    caption: String,
}

/// Image-text pairs from JSONL; image paths are relative to `images` (default: the file's folder).
pub fn read_pairs_jsonl(path: &Path, images: Option<&Path>) -> Result<ReadReport<Pair>, String> {
    let base = image_root(path, images);
    let mut r = ReadReport::new();
    for (n, line) in jsonl_lines(path)? {
        let at = format!("{}:{n}", path.display());
        match serde_json::from_str::<PairLine>(&line) {
            Err(e) => r.skip(at, format!("bad JSON: {e}")),
            Ok(p) => match load_image(&base, &p.image) {
                Ok(image) => r.records.push(Pair {
                    image,
                    caption: p.caption,
                }),
                Err(e) => r.skip(at, e),
            },
        }
    }
    Ok(r)
}

/// Image-text pairs from a webdataset-style tar shard (as img2dataset writes them): members
/// `<key>.png|jpg|jpeg|webp` and the caption in `<key>.txt`, or else in the `"caption"` of `<key>.json`. As
/// in webdataset, the key is the member's path up to the first dot of its file name, the extension
/// (lower-cased) the rest, so `x.seg.png` is not `x`'s image.
pub fn read_pairs_tar(path: &Path, _images: Option<&Path>) -> Result<ReadReport<Pair>, String> {
    #[derive(Default)]
    struct Sample {
        image: Option<Vec<u8>>,
        txt: Option<String>,
        json: Option<Vec<u8>>,
    }
    let f = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut archive = tar::Archive::new(f);
    let mut parts: BTreeMap<String, Sample> = BTreeMap::new();
    let entries = archive
        .entries()
        .map_err(|e| format!("{}: not a tar file: {e}", path.display()))?;
    let mut r = ReadReport::new();
    for entry in entries {
        let mut entry = match entry {
            Ok(e) => e,
            Err(e) => {
                r.skip(
                    format!("{}", path.display()),
                    format!("unreadable member: {e}"),
                );
                break;
            }
        };
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let name = entry
            .path()
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default();
        let Some((key, ext)) = webdataset_key(&name) else {
            continue;
        };
        let mut buf = Vec::new();
        if let Err(e) = std::io::Read::read_to_end(&mut entry, &mut buf) {
            r.skip(
                format!("{}:{name}", path.display()),
                format!("unreadable member: {e}"),
            );
            continue;
        }
        let slot = parts.entry(key).or_default();
        match ext.as_str() {
            "png" | "jpg" | "jpeg" | "webp" => slot.image = Some(buf),
            "txt" => slot.txt = Some(String::from_utf8_lossy(&buf).trim().to_string()),
            "json" => slot.json = Some(buf),
            _ => {}
        }
    }
    for (key, sample) in parts {
        let at = format!("{}:{key}", path.display());
        let caption = match (sample.txt, &sample.json) {
            (Some(t), _) => Ok(t),
            (None, Some(json)) => serde_json::from_slice::<serde_json::Value>(json)
                .map_err(|e| format!("{key}.json: bad JSON: {e}"))
                .and_then(|v| match v.get("caption") {
                    Some(serde_json::Value::String(c)) => Ok(c.trim().to_string()),
                    _ => Err(format!(
                        "{key}.json has no \"caption\" string and there is no {key}.txt"
                    )),
                }),
            (None, None) => Err("no caption member (.txt, or .json with \"caption\")".to_string()),
        };
        match (sample.image, caption) {
            (None, _) => {
                // Metadata without an image (img2dataset keeps the .json of failed downloads).
                if sample.json.is_none() {
                    r.skip(at, "no image member (.png/.jpg/.webp)");
                } else {
                    r.skip(at, "no image member (.png/.jpg/.webp); only its .json");
                }
            }
            (Some(_), Err(e)) => r.skip(at, e),
            (Some(bytes), Ok(caption)) => match image::load_from_memory(&bytes) {
                Ok(i) => r.records.push(Pair {
                    image: i.to_rgb8(),
                    caption,
                }),
                Err(e) => r.skip(at, format!("cannot decode the image: {e}")),
            },
        }
    }
    Ok(r)
}

/// webdataset's split of a member name into its sample key (the path up to the first dot of the file
/// name) and extension (the rest, lower-cased); `None` for names without an extension.
fn webdataset_key(name: &str) -> Option<(String, String)> {
    let file_start = name.rfind('/').map_or(0, |i| i + 1);
    let dot = name[file_start..].find('.')? + file_start;
    let ext = &name[dot + 1..];
    (dot > file_start && !ext.is_empty()).then(|| (name[..dot].to_string(), ext.to_lowercase()))
}

#[derive(Deserialize)]
struct Mmc4Line {
    text_list: Vec<String>,
    image_info: Vec<Mmc4Image>,
}

#[derive(Deserialize)]
struct Mmc4Image {
    image_name: String,
    matched_text_index: usize,
    #[serde(default)]
    #[allow(dead_code)]
    matched_sim: Option<f64>,
}

/// MMC4-style interleaved documents from JSONL; `image_name` is relative to `images` (default: the
/// file's folder).
pub fn read_mmc4(path: &Path, images: Option<&Path>) -> Result<ReadReport<Document>, String> {
    let base = image_root(path, images);
    let mut r = ReadReport::new();
    'lines: for (n, line) in jsonl_lines(path)? {
        let at = format!("{}:{n}", path.display());
        let d: Mmc4Line = match serde_json::from_str(&line) {
            Ok(d) => d,
            Err(e) => {
                r.skip(at, format!("bad JSON: {e}"));
                continue;
            }
        };
        let mut images = Vec::new();
        for info in &d.image_info {
            if info.matched_text_index >= d.text_list.len() {
                r.skip(
                    at,
                    format!(
                        "matched_text_index {} is past the {} sentences",
                        info.matched_text_index,
                        d.text_list.len()
                    ),
                );
                continue 'lines;
            }
            match load_image(&base, &info.image_name) {
                Ok(i) => images.push((i, info.matched_text_index)),
                Err(e) => {
                    r.skip(at, e);
                    continue 'lines;
                }
            }
        }
        r.records.push(Document {
            texts: d.text_list,
            images,
        });
    }
    Ok(r)
}

#[derive(Deserialize)]
struct LlavaEntry {
    #[serde(default)]
    image: Option<String>,
    conversations: Vec<LlavaTurn>,
}

#[derive(Deserialize)]
struct LlavaTurn {
    from: String,
    value: String,
}

/// LLaVA-style instruction data (a JSON list); `image` is relative to `images` (default: the file's
/// folder).
pub fn read_llava(path: &Path, images: Option<&Path>) -> Result<ReadReport<Conversation>, String> {
    let base = image_root(path, images);
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let entries: Vec<serde_json::Value> = serde_json::from_str(&text).map_err(|e| {
        format!(
            "{}: expected a JSON list of conversations: {e}",
            path.display()
        )
    })?;
    let mut r = ReadReport::new();
    for (i, v) in entries.into_iter().enumerate() {
        let at = format!("{}[{i}]", path.display());
        let e: LlavaEntry = match serde_json::from_value(v) {
            Ok(e) => e,
            Err(err) => {
                r.skip(at, format!("bad entry: {err}"));
                continue;
            }
        };
        let mut turns = Vec::new();
        let mut ok = e.conversations.len() % 2 == 0 && !e.conversations.is_empty();
        for pair in e.conversations.chunks(2) {
            if pair.len() == 2 && pair[0].from == "human" && pair[1].from == "gpt" {
                turns.push((pair[0].value.clone(), pair[1].value.clone()));
            } else {
                ok = false;
            }
        }
        if !ok {
            r.skip(at, "conversations must alternate human, gpt turns");
            continue;
        }
        let image = match &e.image {
            None => None,
            Some(rel) => match load_image(&base, rel) {
                Ok(i) => Some(i),
                Err(err) => {
                    r.skip(at, err);
                    continue;
                }
            },
        };
        r.records.push(Conversation { image, turns });
    }
    Ok(r)
}

/// Region data from a COCO-style JSON with captions on the annotations (RLE or polygon masks).
pub fn read_regions(path: &Path, images: Option<&Path>) -> Result<ReadReport<Region>, String> {
    let base = image_root(path, images);
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("{}: not JSON: {e}", path.display()))?;
    let mut files: BTreeMap<i64, (String, u32, u32)> = BTreeMap::new();
    for im in v["images"].as_array().into_iter().flatten() {
        if let (Some(id), Some(f)) = (im["id"].as_i64(), im["file_name"].as_str()) {
            let (w, h) = (
                im["width"].as_u64().unwrap_or(0),
                im["height"].as_u64().unwrap_or(0),
            );
            files.insert(id, (f.to_string(), w as u32, h as u32));
        }
    }
    let mut r = ReadReport::new();
    let mut cache: BTreeMap<i64, RgbImage> = BTreeMap::new();
    for (i, a) in v["annotations"]
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
    {
        let at = format!("{}:annotations[{i}]", path.display());
        let Some((file, w, h)) = a["image_id"]
            .as_i64()
            .and_then(|id| files.get(&id).cloned())
        else {
            r.skip(at, "image_id names no entry of `images`");
            continue;
        };
        let caption = a["caption"].as_str().unwrap_or("").to_string();
        let mask = match decode_segmentation(&a["segmentation"], w, h) {
            Ok(m) => m,
            Err(e) => {
                r.skip(at, e);
                continue;
            }
        };
        let id = a["image_id"].as_i64().unwrap_or(-1);
        let image = match cache.get(&id) {
            Some(i) => i.clone(),
            None => match load_image(&base, &file) {
                Ok(i) => {
                    cache.insert(id, i.clone());
                    i
                }
                Err(e) => {
                    r.skip(at, e);
                    continue;
                }
            },
        };
        if image.dimensions() != (w, h) {
            r.skip(
                at,
                format!(
                    "the image is {:?}, the annotation says {w}×{h}",
                    image.dimensions()
                ),
            );
            continue;
        }
        r.records.push(Region {
            image,
            mask,
            caption,
        });
    }
    Ok(r)
}

fn decode_segmentation(seg: &serde_json::Value, w: u32, h: u32) -> Result<Vec<bool>, String> {
    if let Some(counts) = seg.get("counts") {
        let size: Vec<u64> = seg["size"]
            .as_array()
            .map(|s| s.iter().filter_map(|x| x.as_u64()).collect())
            .unwrap_or_default();
        if size != [h as u64, w as u64] {
            return Err(format!("RLE size {size:?}, expected [{h}, {w}]"));
        }
        let counts: Vec<u32> = match counts {
            serde_json::Value::String(s) => world::rle_from_string(s)?,
            serde_json::Value::Array(list) => list
                .iter()
                .map(|c| {
                    c.as_u64()
                        .and_then(|c| u32::try_from(c).ok())
                        .ok_or("RLE counts must be integers ≥ 0")
                })
                .collect::<Result<_, _>>()?,
            _ => return Err("RLE counts must be a list of integers or a compressed string".into()),
        };
        return world::rle_decode(&counts, w, h);
    }
    if let Some(polys) = seg.as_array() {
        let mut m = vec![false; (w * h) as usize];
        for p in polys {
            let pts: Vec<f64> = p
                .as_array()
                .ok_or("a polygon must be a list of numbers")?
                .iter()
                .map(|x| x.as_f64().ok_or("a polygon must be a list of numbers"))
                .collect::<Result<_, _>>()?;
            if pts.len() < 6 || pts.len() % 2 != 0 {
                return Err(format!(
                    "a polygon needs an even number ≥ 6 of coordinates, found {}",
                    pts.len()
                ));
            }
            for (a, b) in m.iter_mut().zip(world::polygon_mask(&pts, w, h)) {
                *a |= b;
            }
        }
        return Ok(m);
    }
    Err("segmentation must be an RLE object or a list of polygons".into())
}

// ---------------------------------------------------------------------------------------------------
// The synthetic world in these formats.

/// How much `deem data synth` writes.
#[derive(Debug, Clone)]
pub struct SynthOptions {
    pub seed: u64,
    pub size: u32,
    /// Image-text pairs (JSONL and one tar shard).
    pub pairs: usize,
    /// Interleaved documents (2–4 images each).
    pub documents: usize,
    /// Instruction conversations.
    pub instructions: usize,
    /// Most questions (turns) per instruction conversation; each has 1 to this many.
    pub max_turns: usize,
    /// Region annotations' images.
    pub regions: usize,
    /// Text-only conversations that describe a scene in words and ask whether a colour or a label is
    /// in it (`text_scenes.json`): the comparison the tiny LLM learns in its pretraining.
    pub text_scenes: usize,
    /// Single-turn colour existence questions about images (`colour_questions.json`).
    pub colour_questions: usize,
    /// Single-turn label questions about images (`label_questions.json`), a fair coin between
    /// existence ("Is there a red star in the image?", POPE's template) and main object ("Is red star
    /// the main object in this image?", RobustVQA's).
    pub label_questions: usize,
    /// Scenes written twice in `pairs_twins.jsonl`, as drawn and as their shape twin (consecutive
    /// lines): contrastive pretraining with `--group 2` then meets negatives that differ only in shape.
    pub shape_twins: usize,
    /// Evaluation scenes per split (in distribution, R, A, V).
    pub eval_per_split: usize,
}

impl Default for SynthOptions {
    fn default() -> Self {
        SynthOptions {
            seed: 0,
            size: 64,
            pairs: 2000,
            documents: 500,
            instructions: 10000,
            max_turns: 3,
            regions: 200,
            text_scenes: 20000,
            colour_questions: 20000,
            label_questions: 20000,
            shape_twins: 1000,
            eval_per_split: 100,
        }
    }
}

/// What was written, by file.
#[derive(Debug, Clone, Serialize)]
pub struct SynthSummary {
    pub files: BTreeMap<String, usize>,
}

struct Writer<'a> {
    out: &'a Path,
    seed: u64,
    size: u32,
    /// Next scene index per split.
    next: BTreeMap<Split, u64>,
}

impl Writer<'_> {
    /// A new scene of `split`, written to `images/<split>/<index>.png`; returns it and its path
    /// relative to the output folder.
    fn scene(&mut self, split: Split) -> Result<(Scene, String), String> {
        let i = self.next.entry(split).or_insert(0);
        let s = world::scene(self.seed, split, *i, self.size);
        *i += 1;
        let rel = format!("images/{}/{:06}.png", split.name(), s.index);
        let p = self.out.join(&rel);
        s.render()
            .save(&p)
            .map_err(|e| format!("{}: {e}", p.display()))?;
        Ok((s, rel))
    }
}

fn write_file(path: &Path, text: &str) -> Result<(), String> {
    // Written whole to a temporary name, then renamed: a crash never leaves half a file.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).map_err(|e| format!("{}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| format!("{}: {e}", path.display()))
}

/// Writes `list` as the JSON list `out/name` and counts it in `files`.
fn write_list(
    out: &Path,
    name: &str,
    list: &[serde_json::Value],
    files: &mut BTreeMap<String, usize>,
) -> Result<(), String> {
    write_file(
        &out.join(name),
        &serde_json::to_string(list).map_err(|e| e.to_string())?,
    )?;
    files.insert(name.into(), list.len());
    Ok(())
}

/// Whether a label is in the scene, asked about object `k`: its own label or (a fair coin) an absent
/// one; for odd `k` the absent label keeps the object's colour or shape, as POPE's adversarial
/// negatives do.
pub fn label_question(s: &Scene, k: usize, rng: &mut crate::rng::Stream) -> (String, String) {
    let o = &s.objects[k];
    let exists = |label: &str| format!("Is there a {label} in the image? Please answer yes or no.");
    if rng.uniform() < 0.5 {
        return (exists(&o.label()), "Yes".to_string());
    }
    let present = |shape: usize, colour: usize| {
        s.objects
            .iter()
            .any(|o| o.shape == shape && o.colour == colour)
    };
    loop {
        let mut shape = rng.below(1, world::SHAPES.len() as u64)[0] as usize;
        let mut colour = rng.below(1, world::COLOURS.len() as u64)[0] as usize;
        if k % 2 == 1 {
            if rng.uniform() < 0.5 {
                colour = o.colour;
            } else {
                shape = o.shape;
            }
        }
        if !present(shape, colour) {
            let label = format!("{} {}", world::COLOURS[colour].0, world::SHAPES[shape]);
            return (exists(&label), "No".to_string());
        }
    }
}

/// Whether something of a colour is in the scene: a colour of one of its objects or (a fair coin) a
/// colour none of them has.
pub fn colour_question(s: &Scene, rng: &mut crate::rng::Stream) -> (String, String) {
    let ask = |c: &str| format!("Is there something {c} in the image? Please answer yes or no.");
    if rng.uniform() < 0.5 {
        let k = rng.below(1, s.objects.len() as u64)[0] as usize;
        return (ask(s.objects[k].colour_name()), "Yes".into());
    }
    let absent = absent_colours(s);
    let c = absent[rng.below(1, absent.len() as u64)[0] as usize];
    (ask(c), "No".into())
}

/// The colours no object of the scene has, in palette order (never empty: a scene has at most three
/// objects).
fn absent_colours(s: &Scene) -> Vec<&'static str> {
    world::COLOURS
        .iter()
        .enumerate()
        .filter(|&(c, _)| s.objects.iter().all(|o| o.colour != c))
        .map(|(_, (name, _))| *name)
        .collect()
}

/// The scene in words, for the text-only conversations: "The image shows a red circle with a blue
/// star."
pub fn describe(s: &Scene) -> String {
    format!("The image shows {}.", s.caption())
}

/// Instruction questions about a scene, each with its answer (the paper's VQA / hallucination prompt
/// styles): one existence yes/no per object, asking about it or (a fair coin) about an absent label
/// (every other one shares a colour or shape with the object, as POPE's adversarial negatives do);
/// colour, count, main object; and whether a label is the main object (RobustVQA style: the main
/// object or, a fair coin, another shape in its colour). Each yes/no answer is drawn on its own, so the
/// answers earlier in a conversation say nothing about the later ones.
pub fn questions(s: &Scene, rng: &mut crate::rng::Stream) -> Vec<(String, String)> {
    let main = s.main();
    let mut q: Vec<(String, String)> = (0..s.objects.len())
        .map(|k| label_question(s, k, rng))
        .collect();
    q.push((
        format!(
            "What colour is the {}? Please provide an accurate answer within one word.",
            main.shape_name()
        ),
        main.colour_name().to_string(),
    ));
    q.push((
        "How many objects are in the image? Please provide an accurate answer within one word."
            .into(),
        ["one", "two", "three"][s.objects.len() - 1].to_string(),
    ));
    q.push((
        "What is the main object in this image?".into(),
        format!("A {}.", main.label()),
    ));
    q.push(main_object_question(s, rng));
    q
}

/// Whether a label is the scene's main object (RobustVQA style): its own label (yes) or (a fair coin)
/// another shape in its colour (no), the negative only shape tells apart.
pub fn main_object_question(s: &Scene, rng: &mut crate::rng::Stream) -> (String, String) {
    let main = s.main();
    let other = loop {
        let shape = rng.below(1, world::SHAPES.len() as u64)[0] as usize;
        if shape != main.shape {
            break format!("{} {}", main.colour_name(), world::SHAPES[shape]);
        }
    };
    let (label, answer) = if rng.uniform() < 0.5 {
        (main.label(), "Yes")
    } else {
        (other, "No")
    };
    (
        format!("Is {label} the main object in this image? Please answer yes or no."),
        answer.into(),
    )
}

/// A COCO-style region annotation of `ob` (image `image_id`, `size` px): its mask (a polygon for squares
/// and diamonds, uncompressed RLE otherwise, so both encodings are exercised), area, box, shape category
/// and caption "the {label}".
fn region_annotation(
    ob: &world::Object,
    id: usize,
    image_id: usize,
    size: u32,
) -> serde_json::Value {
    let seg = match ob.shape {
        0 | 3 => {
            let (c, r) = (ob.r * if ob.shape == 0 { 0.85 } else { 1.0 }, ob.r);
            let (x, y) = (ob.cx, ob.cy);
            let pts = if ob.shape == 0 {
                vec![x - c, y - c, x + c, y - c, x + c, y + c, x - c, y + c]
            } else {
                vec![x, y - r, x + r, y, x, y + r, x - r, y]
            };
            json!([pts])
        }
        _ => json!({"size": [size, size], "counts": world::rle_counts(&ob.mask(size), size, size)}),
    };
    let area = ob.mask(size).iter().filter(|&&b| b).count();
    json!({
        "id": id, "image_id": image_id, "category_id": ob.shape,
        "segmentation": seg, "area": area, "iscrowd": 0,
        "bbox": [ob.cx - ob.r, ob.cy - ob.r, 2.0 * ob.r, 2.0 * ob.r],
        "caption": format!("the {}", ob.label()),
    })
}

/// Evaluation scene `index` of `split` for synth seed `seed` (a stream apart from the training scenes).
pub fn eval_scene(seed: u64, split: Split, index: u64, size: u32) -> world::Scene {
    world::scene(seed ^ 0xe7a1, split, index, size)
}

/// Scene `index` of `pairs_twins.jsonl` for synth seed `seed` (its line 2·index; its shape twin follows).
pub fn twin_scene(seed: u64, index: u64, size: u32) -> world::Scene {
    world::scene(seed ^ 0x7317, Split::Id, index, size)
}

/// Scene `index` of the stream `deem pretrain encoder --scenes` draws for synth seed `seed`: apart from
/// every scene `synthesize` writes, the evaluation scenes included.
pub fn pretrain_scene(seed: u64, index: u64, size: u32) -> world::Scene {
    world::scene(seed ^ 0x9c1f, Split::Id, index, size)
}

/// The region files' categories: the shapes.
fn shape_categories() -> Vec<serde_json::Value> {
    world::SHAPES
        .iter()
        .enumerate()
        .map(|(i, n)| json!({"id": i, "name": n}))
        .collect()
}

/// Writes the synthetic world under `out` in the real formats (see the module documentation), plus
/// evaluation scenes: `eval/<split>/<colour>_<shape>/<index>.png` (ImageNet-style class folders),
/// `eval/<split>/instances.json` (COCO-style instances, for the POPE builder) and
/// `eval/regions_<split>.json` (region data on the same scenes, every object with its mask and caption:
/// held-out region-level captioning).
pub fn synthesize(out: &Path, o: &SynthOptions) -> Result<SynthSummary, String> {
    for split in Split::ALL {
        let d = out.join("images").join(split.name());
        std::fs::create_dir_all(&d).map_err(|e| format!("{}: {e}", d.display()))?;
    }
    let mut w = Writer {
        out,
        seed: o.seed,
        size: o.size,
        next: BTreeMap::new(),
    };
    let mut files = BTreeMap::new();
    let mut rng = crate::rng::Stream::new(o.seed, 0, 0xd0c5, crate::rng::Purpose::Data);

    // Pairs: JSONL and a webdataset tar shard with the same records.
    let mut jsonl = String::new();
    let tar_path = out.join("pairs-000000.tar");
    let tar_tmp = tar_path.with_extension("tmp");
    {
        let f =
            std::fs::File::create(&tar_tmp).map_err(|e| format!("{}: {e}", tar_tmp.display()))?;
        let mut tb = tar::Builder::new(f);
        for _ in 0..o.pairs {
            let (s, rel) = w.scene(Split::Id)?;
            let cap = s.caption();
            jsonl.push_str(&json!({"image": rel, "caption": cap}).to_string());
            jsonl.push('\n');
            let key = format!("{:06}", s.index);
            let png = std::fs::read(out.join(&rel)).map_err(|e| e.to_string())?;
            for (name, data) in [
                (format!("{key}.png"), png),
                (format!("{key}.txt"), cap.into_bytes()),
            ] {
                let mut h = tar::Header::new_gnu();
                h.set_size(data.len() as u64);
                h.set_mode(0o644);
                h.set_cksum();
                tb.append_data(&mut h, &name, data.as_slice())
                    .map_err(|e| format!("{}: {e}", tar_tmp.display()))?;
            }
        }
        tb.into_inner()
            .and_then(|mut f| f.flush())
            .map_err(|e| format!("{}: {e}", tar_tmp.display()))?;
    }
    std::fs::rename(&tar_tmp, &tar_path).map_err(|e| format!("{}: {e}", tar_path.display()))?;
    write_file(&out.join("pairs.jsonl"), &jsonl)?;
    files.insert("pairs.jsonl".into(), o.pairs);
    files.insert("pairs-000000.tar".into(), o.pairs);

    // Interleaved documents: 2–4 images, a sentence about each, and filler sentences between.
    let fillers = [
        "Here is another picture.",
        "The next one is different.",
        "Look at this one.",
        "This photo was taken later.",
    ];
    let mut mmc4 = String::new();
    for _ in 0..o.documents {
        let n = 2 + rng.below(1, 3)[0] as usize;
        let mut text_list = Vec::new();
        let mut image_info = Vec::new();
        for _ in 0..n {
            let (s, rel) = w.scene(Split::Id)?;
            if rng.uniform() < 0.5 {
                text_list.push(fillers[rng.below(1, fillers.len() as u64)[0] as usize].to_string());
            }
            image_info.push(json!({"image_name": rel, "matched_text_index": text_list.len(), "matched_sim": 0.3}));
            text_list.push(format!("This image shows {}.", s.caption()));
        }
        mmc4.push_str(
            &json!({"url": "synthetic://deem", "text_list": text_list, "image_info": image_info})
                .to_string(),
        );
        mmc4.push('\n');
    }
    write_file(&out.join("mmc4.jsonl"), &mmc4)?;
    files.insert("mmc4.jsonl".into(), o.documents);

    // Instructions: multi-turn conversations (as LLaVA's are) of 1 to `max_turns` questions about one
    // image, in random order; the first question's kind cycles, so every kind leads equally often.
    let mut llava = Vec::new();
    for i in 0..o.instructions {
        let (s, rel) = w.scene(Split::Id)?;
        let mut qs = questions(&s, &mut rng);
        let first = qs.remove(i % qs.len());
        for k in (1..qs.len()).rev() {
            qs.swap(k, rng.below(1, k as u64 + 1)[0] as usize);
        }
        let turns = 1 + rng.below(1, o.max_turns.max(1) as u64)[0] as usize;
        let mut conversation = Vec::new();
        for (k, (q, a)) in std::iter::once(first).chain(qs).take(turns).enumerate() {
            let q = if k == 0 { format!("<image>\n{q}") } else { q };
            conversation.push(json!({"from": "human", "value": q}));
            conversation.push(json!({"from": "gpt", "value": a}));
        }
        llava.push(json!({
            "id": format!("synth-{i:06}"),
            "image": rel,
            "conversations": conversation,
        }));
    }
    write_list(out, "llava.json", &llava, &mut files)?;

    // Regions: every object's mask (RLE; polygons for squares and diamonds) with its label.
    let mut images = Vec::new();
    let mut anns = Vec::new();
    for k in 0..o.regions {
        let (s, rel) = w.scene(Split::Id)?;
        images.push(json!({"id": k, "file_name": rel, "width": o.size, "height": o.size}));
        for ob in &s.objects {
            anns.push(region_annotation(ob, anns.len(), k, o.size));
        }
    }
    write_file(
        &out.join("regions.json"),
        &json!({"images": images, "annotations": anns, "categories": shape_categories()})
            .to_string(),
    )?;
    files.insert("regions.json".into(), o.regions);

    // The tiny LLM's pretraining text, the yes/no comparison in words (text-only conversations; a fair
    // coin between a colour and a label question), and stage II's colour questions about images.
    let single = |image: Option<&str>, q: String, a: String| {
        let mut v = json!({"conversations": [
            {"from": "human", "value": if image.is_some() { format!("<image>\n{q}") } else { q }},
            {"from": "gpt", "value": a},
        ]});
        if let Some(rel) = image {
            v["image"] = json!(rel);
        }
        v
    };
    let mut text = Vec::new();
    for i in 0..o.text_scenes {
        // Scenes only described, never drawn: the same distribution, from a stream of their own.
        let s = world::scene(o.seed ^ 0x7e47, Split::Id, i as u64, o.size);
        let (q, a) = if rng.uniform() < 0.5 {
            colour_question(&s, &mut rng)
        } else {
            let k = rng.below(1, s.objects.len() as u64)[0] as usize;
            label_question(&s, k, &mut rng)
        };
        let mut v = single(None, format!("{} {q}", describe(&s)), a);
        v["id"] = json!(format!("text-{i:06}"));
        text.push(v);
    }
    write_list(out, "text_scenes.json", &text, &mut files)?;
    let mut colour = Vec::new();
    for i in 0..o.colour_questions {
        let (s, rel) = w.scene(Split::Id)?;
        let (q, a) = colour_question(&s, &mut rng);
        let mut v = single(Some(&rel), q, a);
        v["id"] = json!(format!("colour-{i:06}"));
        colour.push(v);
    }
    write_list(out, "colour_questions.json", &colour, &mut files)?;

    // Evaluation scenes: ImageNet-style class folders (class = the main object's label) and COCO-style
    // instances (category = colour + shape) per split; and per split, POPE-format colour questions about
    // them (`eval/colour_<split>.jsonl`), stage II's questions held out.
    for split in Split::ALL {
        let base = out.join("eval").join(split.name());
        std::fs::create_dir_all(&base).map_err(|e| format!("{}: {e}", base.display()))?;
        let mut images = Vec::new();
        let mut anns = Vec::new();
        let mut region_images = Vec::new();
        let mut regions = Vec::new();
        let mut colour_qs = String::new();
        for k in 0..o.eval_per_split {
            let s = eval_scene(o.seed, split, k as u64, o.size);
            let class = s.main().label().replace(' ', "_");
            let rel = format!("{class}/{k:06}.png");
            // A colour of the scene (yes) and a colour it lacks (no), POPE-style balanced.
            let present: Vec<&str> = s.objects.iter().map(|ob| ob.colour_name()).collect();
            let absent = absent_colours(&s);
            for (c, label) in [
                (
                    present[rng.below(1, present.len() as u64)[0] as usize],
                    "yes",
                ),
                (absent[rng.below(1, absent.len() as u64)[0] as usize], "no"),
            ] {
                let text = format!("Is there something {c} in the image? Please answer yes or no.");
                colour_qs.push_str(&json!({"image": format!("{}/{rel}", split.name()), "text": text, "label": label}).to_string());
                colour_qs.push('\n');
            }
            let p = base.join(&rel);
            std::fs::create_dir_all(p.parent().expect("has a parent"))
                .map_err(|e| e.to_string())?;
            s.render()
                .save(&p)
                .map_err(|e| format!("{}: {e}", p.display()))?;
            images.push(json!({"id": k, "file_name": rel, "width": o.size, "height": o.size}));
            region_images.push(json!({"id": k, "file_name": format!("{}/{rel}", split.name()), "width": o.size, "height": o.size}));
            for ob in &s.objects {
                regions.push(region_annotation(ob, regions.len(), k, o.size));
                anns.push(json!({
                    "id": anns.len(), "image_id": k,
                    "category_id": ob.colour * world::SHAPES.len() + ob.shape,
                    "bbox": [ob.cx - ob.r, ob.cy - ob.r, 2.0 * ob.r, 2.0 * ob.r], "iscrowd": 0,
                }));
            }
        }
        let categories: Vec<_> = world::COLOURS
            .iter()
            .flat_map(|(c, _)| world::SHAPES.iter().map(move |sh| format!("{c} {sh}")))
            .enumerate()
            .map(|(i, n)| json!({"id": i, "name": n}))
            .collect();
        write_file(
            &base.join("instances.json"),
            &json!({"images": images, "annotations": anns, "categories": categories}).to_string(),
        )?;
        files.insert(format!("eval/{}", split.name()), o.eval_per_split);
        let f = format!("eval/colour_{}.jsonl", split.name());
        write_file(&out.join(&f), &colour_qs)?;
        files.insert(f, 2 * o.eval_per_split);
        let f = format!("eval/regions_{}.json", split.name());
        files.insert(f.clone(), regions.len());
        write_file(
            &out.join(f),
            &json!({"images": region_images, "annotations": regions, "categories": shape_categories()})
                .to_string(),
        )?;
    }
    // Shape twins, from a stream of their own (the files above do not move).
    let mut twins = String::new();
    let dir = out.join("images").join("twins");
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    for k in 0..o.shape_twins {
        let s = twin_scene(o.seed, k as u64, o.size);
        for (scene, tag) in [(s.shape_twin(), "b"), (s, "a")].into_iter().rev() {
            let rel = format!("images/twins/{k:06}{tag}.png");
            scene
                .render()
                .save(out.join(&rel))
                .map_err(|e| format!("{rel}: {e}"))?;
            twins.push_str(&json!({"image": rel, "caption": scene.caption()}).to_string());
            twins.push('\n');
        }
    }
    write_file(&out.join("pairs_twins.jsonl"), &twins)?;
    files.insert("pairs_twins.jsonl".into(), 2 * o.shape_twins);
    // Label questions, from a stream of their own and on new training scenes (the files above do not
    // move).
    let mut rng = crate::rng::Stream::new(o.seed, 0, 0x1abe, crate::rng::Purpose::Data);
    let mut labels = Vec::new();
    for i in 0..o.label_questions {
        let (s, rel) = w.scene(Split::Id)?;
        let (q, a) = if rng.uniform() < 0.5 {
            let k = rng.below(1, s.objects.len() as u64)[0] as usize;
            label_question(&s, k, &mut rng)
        } else {
            main_object_question(&s, &mut rng)
        };
        let mut v = single(Some(&rel), q, a);
        v["id"] = json!(format!("label-{i:06}"));
        labels.push(v);
    }
    write_list(out, "label_questions.json", &labels, &mut files)?;
    write_file(
        &out.join("SYNTH.json"),
        &json!({"seed": o.seed, "size": o.size, "files": files}).to_string(),
    )?;
    Ok(SynthSummary { files })
}
