//! Readers of the dataset formats users train DEEM on (the synthetic world writes them: `synth.rs`):
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
use std::io::BufRead;
use std::path::{Path, PathBuf};

use image::RgbImage;
use serde::Deserialize;

use crate::data::world;
use crate::data::DataError;
use crate::rng::{Purpose, Stream};

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
    /// What the format's rules dropped from good records, by rule (`data.mmc4.*`).
    pub filtered: BTreeMap<&'static str, usize>,
}

impl<T> ReadReport<T> {
    pub(crate) fn new() -> Self {
        ReadReport {
            records: Vec::new(),
            bad: Vec::new(),
            filtered: Default::default(),
        }
    }

    pub(crate) fn filter(&mut self, rule: &'static str, n: usize) {
        if n > 0 {
            *self.filtered.entry(rule).or_default() += n;
        }
    }

    pub(crate) fn skip(&mut self, at: String, reason: impl std::fmt::Display) {
        let reason = reason.to_string();
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
    pub fn check(&self, file: &Path, max_ratio: f64) -> Result<(), DataError> {
        if self.bad_ratio() > max_ratio {
            let first: Vec<String> = self
                .bad
                .iter()
                .take(3)
                .map(|b| format!("{}: {}", b.at, b.reason))
                .collect();
            return Err(DataError::from(format!(
                "{}: {} of {} records are bad ({:.1}%, above the allowed {:.1}%); first: {}",
                file.display(),
                self.bad.len(),
                self.records.len() + self.bad.len(),
                100.0 * self.bad_ratio(),
                100.0 * max_ratio,
                first.join("; ")
            )));
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
pub struct Conversation<I = RgbImage> {
    pub image: Option<I>,
    pub turns: Vec<(String, String)>,
}

/// A region: the image, the region's mask (row-major, image-sized) and its caption.
#[derive(Debug, Clone)]
pub struct Region {
    pub image: RgbImage,
    pub mask: Vec<bool>,
    pub caption: String,
}

/// `rel` under the images root `base`: a record's image path may not leave it (an absolute path, or
/// a `..` component), so a dataset cannot make deem read files elsewhere.
pub fn inside(base: &Path, rel: &str) -> Result<PathBuf, DataError> {
    use std::path::Component;
    let escapes = Path::new(rel)
        .components()
        .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir));
    if escapes || rel.is_empty() {
        return Err(DataError::from(format!(
            "image path {rel:?} leaves the images folder {} (absolute, or with `..`)",
            base.display()
        )));
    }
    Ok(base.join(rel))
}

fn load_image(base: &Path, rel: &str) -> Result<RgbImage, DataError> {
    let p = inside(base, rel)?;
    if !p.exists() {
        return Err(DataError::from(format!("missing image {}", p.display())));
    }
    let bytes = std::fs::read(&p)
        .map_err(|e| DataError::from(format!("cannot read image {}: {e}", p.display())))?;
    super::decode::decode_rgb(&bytes)
        .map_err(|e| DataError::from(format!("cannot decode image {}: {e}", p.display())))
}

/// The folder a file's image paths are relative to: `images` when given, else the file's own folder.
pub(crate) fn image_root(path: &Path, images: Option<&Path>) -> PathBuf {
    images.map_or_else(
        || {
            path.parent()
                .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
        },
        Path::to_path_buf,
    )
}

fn jsonl_lines(path: &Path) -> Result<Vec<(usize, String)>, DataError> {
    let f = std::fs::File::open(path)
        .map_err(|e| DataError::from(format!("{}: {e}", path.display())))?;
    let mut out = Vec::new();
    for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
        let line =
            line.map_err(|e| DataError::from(format!("{}:{}: {e}", path.display(), i + 1)))?;
        if !line.trim().is_empty() {
            out.push((i + 1, line));
        }
    }
    Ok(out)
}

#[derive(Deserialize)]
pub(crate) struct PairLine {
    pub image: String,
    pub caption: String,
}

/// Image-text pairs from JSONL; image paths are relative to `images` (default: the file's folder).
pub fn read_pairs_jsonl(path: &Path, images: Option<&Path>) -> Result<ReadReport<Pair>, DataError> {
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

/// A file member of a tar shard: its name and where its data lies.
#[derive(Debug, Clone)]
pub struct Member {
    pub name: String,
    pub offset: u64,
    pub len: u64,
}

/// The members of one webdataset sample.
#[derive(Debug, Default)]
pub(crate) struct TarParts {
    pub image: Option<Member>,
    pub txt: Option<Member>,
    pub json: Option<Member>,
}

/// Indexes a tar shard's file members by webdataset key, reading headers only (the data is skipped).
/// Members past an unreadable one cannot be found: it is reported, and the index stops there.
pub(crate) fn tar_index(
    path: &Path,
) -> Result<(BTreeMap<String, TarParts>, Vec<BadRecord>), DataError> {
    let f = std::fs::File::open(path)
        .map_err(|e| DataError::from(format!("{}: {e}", path.display())))?;
    let mut archive = tar::Archive::new(f);
    let entries = archive
        .entries_with_seek()
        .map_err(|e| DataError::from(format!("{}: not a tar file: {e}", path.display())))?;
    let (mut parts, mut bad): (BTreeMap<String, TarParts>, _) = (BTreeMap::new(), Vec::new());
    for entry in entries {
        let entry = match entry {
            Ok(e) => e,
            Err(e) => {
                bad.push(BadRecord {
                    at: format!("{}", path.display()),
                    reason: format!("unreadable member: {e}"),
                });
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
        let member = Member {
            name,
            offset: entry.raw_file_position(),
            len: entry.size(),
        };
        let slot = parts.entry(key).or_default();
        match ext.as_str() {
            "png" | "jpg" | "jpeg" | "webp" => slot.image = Some(member),
            "txt" => slot.txt = Some(member),
            "json" => slot.json = Some(member),
            _ => {}
        }
    }
    Ok((parts, bad))
}

/// The data of a tar member.
pub fn read_member(shard: &Path, m: &Member) -> Result<Vec<u8>, DataError> {
    use std::io::{Read, Seek};
    let err = |e: std::io::Error| DataError::from(format!("{}:{}: {e}", shard.display(), m.name));
    let mut f = std::fs::File::open(shard).map_err(err)?;
    f.seek(std::io::SeekFrom::Start(m.offset)).map_err(err)?;
    let mut buf = vec![0; m.len as usize];
    f.read_exact(&mut buf).map_err(err)?;
    Ok(buf)
}

/// A webdataset sample's caption: its `.txt`, else the `"caption"` of its `.json`. `Err`: the sample is
/// bad (the reason), including a sample without an image member.
pub(crate) fn tar_caption(shard: &Path, key: &str, p: &TarParts) -> Result<String, DataError> {
    if p.image.is_none() {
        // Metadata without an image (img2dataset keeps the .json of failed downloads).
        return Err(DataError::from(if p.json.is_some() {
            "no image member (.png/.jpg/.webp); only its .json"
        } else {
            "no image member (.png/.jpg/.webp)"
        }));
    }
    match (&p.txt, &p.json) {
        (Some(t), _) => Ok(String::from_utf8_lossy(&read_member(shard, t)?)
            .trim()
            .to_string()),
        (None, Some(json)) => {
            serde_json::from_slice::<serde_json::Value>(&read_member(shard, json)?)
                .map_err(|e| DataError::from(format!("{key}.json: bad JSON: {e}")))
                .and_then(|v| match v.get("caption") {
                    Some(serde_json::Value::String(c)) => Ok(c.trim().to_string()),
                    _ => Err(DataError::from(format!(
                        "{key}.json has no \"caption\" string and there is no {key}.txt"
                    ))),
                })
        }
        (None, None) => Err(DataError::from(
            "no caption member (.txt, or .json with \"caption\")",
        )),
    }
}

/// Image-text pairs from a webdataset-style tar shard (as img2dataset writes them): members
/// `<key>.png|jpg|jpeg|webp` and the caption in `<key>.txt`, or else in the `"caption"` of `<key>.json`. As
/// in webdataset, the key is the member's path up to the first dot of its file name, the extension
/// (lower-cased) the rest, so `x.seg.png` is not `x`'s image.
pub fn read_pairs_tar(path: &Path, _images: Option<&Path>) -> Result<ReadReport<Pair>, DataError> {
    let (parts, bad) = tar_index(path)?;
    let mut r = ReadReport::new();
    r.bad = bad;
    for (key, p) in parts {
        let at = format!("{}:{key}", path.display());
        let image = tar_caption(path, &key, &p).and_then(|caption| {
            let m = p.image.as_ref().expect("tar_caption checked the image");
            let bytes = read_member(path, m)?;
            super::decode::decode_rgb(&bytes).map(|i| (i, caption))
        });
        match image {
            Ok((image, caption)) => r.records.push(Pair { image, caption }),
            Err(e) => r.skip(at, e),
        }
    }
    Ok(r)
}

/// webdataset's split of a member name into its sample key (the path up to the first dot of the file
/// name) and extension (the rest, lower-cased); `None` for names without an extension.
pub(crate) fn webdataset_key(name: &str) -> Option<(String, String)> {
    let file_start = name.rfind('/').map_or(0, |i| i + 1);
    let dot = name[file_start..].find('.')? + file_start;
    let ext = &name[dot + 1..];
    (dot > file_start && !ext.is_empty()).then(|| (name[..dot].to_string(), ext.to_lowercase()))
}

#[derive(Deserialize)]
pub(crate) struct Mmc4Line {
    pub text_list: Vec<String>,
    pub image_info: Vec<Mmc4Image>,
}

#[derive(Deserialize)]
pub(crate) struct Mmc4Image {
    pub image_name: String,
    pub matched_text_index: usize,
    /// CLIP similarity of the image to its matched sentence.
    #[serde(default)]
    matched_sim: Option<f64>,
}

/// What each MMC4 rule dropped, as [`ReadReport::filtered`] names it.
pub const MMC4_LOW_SIMILARITY: &str = "images below data.mmc4.min_similarity";
pub const MMC4_PAST_MAX: &str = "images past data.mmc4.max_images";
pub const MMC4_NO_IMAGE: &str = "documents without images";
pub const MMC4_ONE_IMAGE: &str = "one-image documents drawn out (data.mmc4.drop_one_image_share)";

/// The images of MMC4 line `n` (`at` in messages) that the paper's rules keep, or `None` when the
/// document is dropped (counted in `r.filtered`) or bad (in `r.bad`).
pub(crate) fn mmc4_keep<'a, T>(
    d: &'a Mmc4Line,
    n: usize,
    at: String,
    rules: &crate::config::Mmc4Rules,
    seed: u64,
    r: &mut ReadReport<T>,
) -> Option<Vec<&'a Mmc4Image>> {
    if let Some(info) = d
        .image_info
        .iter()
        .find(|i| i.matched_text_index >= d.text_list.len())
    {
        r.skip(
            at,
            format!(
                "matched_text_index {} is past the {} sentences",
                info.matched_text_index,
                d.text_list.len()
            ),
        );
        return None;
    }
    let similar: Vec<&Mmc4Image> = d
        .image_info
        .iter()
        .filter(|i| i.matched_sim.is_none_or(|s| s >= rules.min_similarity))
        .collect();
    r.filter(MMC4_LOW_SIMILARITY, d.image_info.len() - similar.len());
    r.filter(
        MMC4_PAST_MAX,
        similar.len().saturating_sub(rules.max_images),
    );
    let kept = &similar[..similar.len().min(rules.max_images)];
    if kept.is_empty() && rules.drop_without_images {
        r.filter(MMC4_NO_IMAGE, 1);
        return None;
    }
    if kept.len() == 1 {
        let draw = Stream::new(seed, n as u64, 0x6d6d_6334, Purpose::Data).uniform();
        if draw < rules.drop_one_image_share {
            r.filter(MMC4_ONE_IMAGE, 1);
            return None;
        }
    }
    Some(kept.to_vec())
}

/// An MMC4 document's sentences and its kept images' `(image_name, matched_text_index)`.
pub(crate) type Mmc4Kept = (Vec<String>, Vec<(String, usize)>);

/// MMC4 line `n` (`at` in messages) parsed and filtered by the paper's rules ([`mmc4_keep`]), or `None`
/// when the line is bad JSON or the document is dropped (either counted in `r`).
pub(crate) fn mmc4_document<T>(
    line: &str,
    n: usize,
    at: &str,
    rules: &crate::config::Mmc4Rules,
    seed: u64,
    r: &mut ReadReport<T>,
) -> Option<Mmc4Kept> {
    let d: Mmc4Line = match serde_json::from_str(line) {
        Ok(d) => d,
        Err(e) => {
            r.skip(at.to_string(), format!("bad JSON: {e}"));
            return None;
        }
    };
    let kept = mmc4_keep(&d, n, at.to_string(), rules, seed, r)?
        .into_iter()
        .map(|i| (i.image_name.clone(), i.matched_text_index))
        .collect();
    Some((d.text_list, kept))
}

/// MMC4-style interleaved documents from JSONL; `image_name` is relative to `images` (default: the
/// file's folder). The paper's rules apply as each line is read, before any image is decoded: images
/// below `rules.min_similarity` are dropped, then all past the first `rules.max_images`; a document
/// left without images is dropped, and a one-image document with probability
/// `rules.drop_one_image_share` (a draw keyed by `seed` and the line). Each is counted in the report.
pub fn read_mmc4(
    path: &Path,
    images: Option<&Path>,
    rules: &crate::config::Mmc4Rules,
    seed: u64,
) -> Result<ReadReport<Document>, DataError> {
    let base = image_root(path, images);
    let mut r = ReadReport::new();
    'lines: for (n, line) in jsonl_lines(path)? {
        let at = format!("{}:{n}", path.display());
        let Some((texts, kept)) = mmc4_document(&line, n, &at, rules, seed, &mut r) else {
            continue;
        };
        let mut images = Vec::new();
        for (name, sentence) in kept {
            match load_image(&base, &name) {
                Ok(i) => images.push((i, sentence)),
                Err(e) => {
                    r.skip(at, e);
                    continue 'lines;
                }
            }
        }
        r.records.push(Document { texts, images });
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
pub fn read_llava(
    path: &Path,
    images: Option<&Path>,
) -> Result<ReadReport<Conversation>, DataError> {
    let base = image_root(path, images);
    read_llava_with(path, |rel| load_image(&base, rel))
}

/// [`read_llava`] with each entry's image given by `load` (its path in the record): decoded, or a
/// handle for streaming.
pub fn read_llava_with<I>(
    path: &Path,
    load: impl Fn(&str) -> Result<I, DataError>,
) -> Result<ReadReport<Conversation<I>>, DataError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| DataError::from(format!("{}: {e}", path.display())))?;
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
            Some(rel) => match load(rel) {
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
pub fn read_regions(path: &Path, images: Option<&Path>) -> Result<ReadReport<Region>, DataError> {
    let base = image_root(path, images);
    let text = std::fs::read_to_string(path)
        .map_err(|e| DataError::from(format!("{}: {e}", path.display())))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| DataError::from(format!("{}: not JSON: {e}", path.display())))?;
    let mut files: BTreeMap<i64, (String, u32, u32)> = BTreeMap::new();
    for im in v["images"].as_array().into_iter().flatten() {
        if let (Some(id), Some(f)) = (im["id"].as_i64(), im["file_name"].as_str()) {
            // A size beyond u32 reads as u32::MAX: refused by the mask size check, not wrapped.
            let side = |k: &str| {
                im[k]
                    .as_u64()
                    .map_or(0, |v| u32::try_from(v).unwrap_or(u32::MAX))
            };
            files.insert(id, (f.to_string(), side("width"), side("height")));
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

fn decode_segmentation(seg: &serde_json::Value, w: u32, h: u32) -> Result<Vec<bool>, DataError> {
    if let Some(counts) = seg.get("counts") {
        let size: Vec<u64> = seg["size"]
            .as_array()
            .map(|s| s.iter().filter_map(|x| x.as_u64()).collect())
            .unwrap_or_default();
        if size != [h as u64, w as u64] {
            return Err(DataError::from(format!(
                "RLE size {size:?}, expected [{h}, {w}]"
            )));
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
            _ => {
                return Err(DataError::from(
                    "RLE counts must be a list of integers or a compressed string",
                ))
            }
        };
        return world::rle_decode(&counts, w, h);
    }
    world::check_mask_size(w, h)?;
    if let Some(polys) = seg.as_array() {
        let mut m = vec![false; w as usize * h as usize];
        for p in polys {
            let pts: Vec<f64> = p
                .as_array()
                .ok_or("a polygon must be a list of numbers")?
                .iter()
                .map(|x| x.as_f64().ok_or("a polygon must be a list of numbers"))
                .collect::<Result<_, _>>()?;
            if pts.len() < 6 || pts.len() % 2 != 0 {
                return Err(DataError::from(format!(
                    "a polygon needs an even number ≥ 6 of coordinates, found {}",
                    pts.len()
                )));
            }
            for (a, b) in m.iter_mut().zip(world::polygon_mask(&pts, w, h)) {
                *a |= b;
            }
        }
        return Ok(m);
    }
    Err(DataError::from(
        "segmentation must be an RLE object or a list of polygons",
    ))
}
