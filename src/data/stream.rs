//! Streaming dataset sources, after webdataset's and MMC4's loaders: a file is opened by indexing where
//! its records lie (JSONL line offsets, tar member offsets) and checking each record the way the eager
//! readers do — bad JSON, a missing image or caption, MMC4's rules — without decoding any image; a
//! record is then read from disk when a batch draws it, its images as handles ([`Image`]) that the
//! batch's worker decodes. What stays in memory per record is its place in the file, so memory does not
//! grow with the images of a dataset.

use std::io::{BufRead, Seek};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use image::RgbImage;

use crate::data::readers::{
    image_root, inside, mmc4_document, read_member, tar_caption, tar_index, Conversation, Member,
    PairLine, ReadReport,
};
use crate::data::DataError;

/// An image a record refers to, decoded only when a batch needs its pixels.
#[derive(Debug, Clone)]
pub enum Image {
    /// Already decoded (records built in memory).
    Memory(Arc<RgbImage>),
    /// A file.
    File(PathBuf),
    /// A member of a tar shard.
    Member(Arc<PathBuf>, Member),
}

impl Image {
    /// Reads and decodes the image; counts the bytes read and the time taken in `stats`.
    pub fn decode(&self, stats: &DataStats) -> Result<RgbImage, DataError> {
        let started = std::time::Instant::now();
        let (bytes, name) = match self {
            Image::Memory(i) => return Ok((**i).clone()),
            Image::File(p) => (
                std::fs::read(p).map_err(|e| {
                    DataError::from(format!("cannot read image {}: {e}", p.display()))
                })?,
                p.display().to_string(),
            ),
            Image::Member(shard, m) => (
                read_member(shard, m)?,
                format!("{}:{}", shard.display(), m.name),
            ),
        };
        stats.bytes.fetch_add(bytes.len() as u64, Ordering::Relaxed);
        let img = super::decode::decode_rgb(&bytes)
            .map_err(|e| DataError::from(format!("cannot decode image {name}: {e}")));
        stats
            .decode_nanos
            .fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
        img
    }
}

/// A record as a batch draws it.
#[derive(Debug, Clone)]
pub enum Record {
    Pair {
        image: Image,
        caption: String,
    },
    Document {
        texts: Vec<String>,
        images: Vec<(Image, usize)>,
    },
    Conversation {
        image: Option<Image>,
        turns: Vec<(String, String)>,
    },
}

/// What the data workers did, for the metrics (`deem_data_*`).
#[derive(Debug, Default)]
pub struct DataStats {
    /// Records read from disk for batches.
    pub samples: AtomicU64,
    /// Bytes read: record text and image files.
    pub bytes: AtomicU64,
    /// Time spent reading and decoding images, in nanoseconds (summed over workers).
    pub decode_nanos: AtomicU64,
    /// Images that passed the check at open but failed to decode (their pixels are zeros).
    pub bad_images: AtomicU64,
    /// Drawn records that could not be read or that were longer than the context (drawn again).
    pub skipped: AtomicU64,
    /// The latest unreadable record or undecodable image, for the log.
    pub last_problem: std::sync::Mutex<Option<String>>,
}

impl DataStats {
    /// Notes a problem (an unreadable record, an undecodable image) for the log.
    pub fn note(&self, problem: impl std::fmt::Display) {
        if let Ok(mut last) = self.last_problem.lock() {
            *last = Some(problem.to_string());
        }
    }

    /// Takes the latest problem noted.
    pub fn take_problem(&self) -> Option<String> {
        self.last_problem.lock().ok().and_then(|mut l| l.take())
    }
}

/// A dataset file opened for streaming: record `i` is read when asked for.
pub trait RecordSource: Send + Sync {
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Record `i` (`i < len()`), read from disk; `Err` names the file and line or member.
    fn record(&self, i: usize, stats: &DataStats) -> Result<Record, DataError>;
}

/// A JSONL file's non-empty lines: `(byte offset, 1-based line number)`.
fn line_index(path: &Path) -> Result<Vec<(u64, usize, String)>, DataError> {
    let f = std::fs::File::open(path)
        .map_err(|e| DataError::from(format!("{}: {e}", path.display())))?;
    let mut reader = std::io::BufReader::new(f);
    let (mut out, mut offset, mut n) = (Vec::new(), 0u64, 0usize);
    loop {
        let mut line = String::new();
        let read = reader
            .read_line(&mut line)
            .map_err(|e| DataError::from(format!("{}:{}: {e}", path.display(), n + 1)))?;
        if read == 0 {
            return Ok(out);
        }
        n += 1;
        if !line.trim().is_empty() {
            out.push((offset, n, line));
        }
        offset += read as u64;
    }
}

fn read_line_at(
    path: &Path,
    offset: u64,
    n: usize,
    stats: &DataStats,
) -> Result<String, DataError> {
    let err = |e: std::io::Error| DataError::from(format!("{}:{n}: {e}", path.display()));
    let mut f = std::fs::File::open(path).map_err(err)?;
    f.seek(std::io::SeekFrom::Start(offset)).map_err(err)?;
    let mut line = String::new();
    std::io::BufReader::new(f)
        .read_line(&mut line)
        .map_err(err)?;
    stats.bytes.fetch_add(line.len() as u64, Ordering::Relaxed);
    stats.samples.fetch_add(1, Ordering::Relaxed);
    Ok(line)
}

/// Where a file's image names point: a folder, or a tar shard's members by name.
enum ImageBase {
    Folder(PathBuf),
    Tar(Arc<PathBuf>, std::collections::HashMap<String, Member>),
}

impl ImageBase {
    /// `images` (a folder or a `.tar`), or the file's own folder.
    fn of(path: &Path, images: Option<&Path>) -> Result<Self, DataError> {
        match images {
            Some(t) if t.is_file() => {
                let (parts, bad) = tar_index(t)?;
                if let Some(b) = bad.first() {
                    return Err(DataError::from(format!("{}: {}", b.at, b.reason)));
                }
                let members = parts
                    .into_values()
                    .filter_map(|p| p.image)
                    .map(|m| (m.name.clone(), m))
                    .collect();
                Ok(ImageBase::Tar(Arc::new(t.to_path_buf()), members))
            }
            _ => Ok(ImageBase::Folder(image_root(path, images))),
        }
    }

    /// The handle of image `rel`, or why it is missing.
    fn image(&self, rel: &str) -> Result<Image, DataError> {
        match self {
            ImageBase::Folder(base) => {
                let p = inside(base, rel)?;
                if p.is_file() {
                    Ok(Image::File(p))
                } else {
                    Err(DataError::from(format!("missing image {}", p.display())))
                }
            }
            ImageBase::Tar(shard, members) => members
                .get(rel)
                .map(|m| Image::Member(shard.clone(), m.clone()))
                .ok_or_else(|| DataError::from(format!("missing image {}:{rel}", shard.display()))),
        }
    }
}

/// Image-text pairs from JSONL (`{"image", "caption"}`), streamed.
pub struct JsonlPairs {
    path: PathBuf,
    base: ImageBase,
    lines: Vec<(u64, usize)>,
}

/// Opens a pairs JSONL for streaming: every line is checked (JSON, image present) as
/// [`crate::data::readers::read_pairs_jsonl`] checks it, without decoding; the report's records are
/// the good lines.
pub fn open_pairs_jsonl(
    path: &Path,
    images: Option<&Path>,
) -> Result<(JsonlPairs, ReadReport<()>), DataError> {
    let base = ImageBase::of(path, images)?;
    let mut r = ReadReport::new();
    let mut lines = Vec::new();
    for (offset, n, line) in line_index(path)? {
        let at = format!("{}:{n}", path.display());
        match serde_json::from_str::<PairLine>(&line) {
            Err(e) => r.skip(at, format!("bad JSON: {e}")),
            Ok(p) => match base.image(&p.image) {
                Ok(_) => {
                    lines.push((offset, n));
                    r.records.push(());
                }
                Err(e) => r.skip(at, e),
            },
        }
    }
    let path = path.to_path_buf();
    Ok((JsonlPairs { path, base, lines }, r))
}

impl RecordSource for JsonlPairs {
    fn len(&self) -> usize {
        self.lines.len()
    }

    fn record(&self, i: usize, stats: &DataStats) -> Result<Record, DataError> {
        let (offset, n) = self.lines[i];
        let line = read_line_at(&self.path, offset, n, stats)?;
        let p: PairLine = serde_json::from_str(&line)
            .map_err(|e| DataError::from(format!("{}:{n}: bad JSON: {e}", self.path.display())))?;
        Ok(Record::Pair {
            image: self.base.image(&p.image)?,
            caption: p.caption,
        })
    }
}

/// Image-text pairs from a webdataset tar shard, streamed.
pub struct TarPairs {
    shard: Arc<PathBuf>,
    /// Per sample: its image member and its caption's members.
    samples: Vec<(String, crate::data::readers::TarParts)>,
}

/// Opens a webdataset shard for streaming: the headers are indexed and every sample's caption checked
/// (as [`crate::data::readers::read_pairs_tar`] does), the images left undecoded.
pub fn open_pairs_tar(path: &Path) -> Result<(TarPairs, ReadReport<()>), DataError> {
    let (parts, bad) = tar_index(path)?;
    let mut r = ReadReport::new();
    r.bad = bad;
    let mut samples = Vec::new();
    for (key, p) in parts {
        match tar_caption(path, &key, &p) {
            Ok(_) => {
                samples.push((key, p));
                r.records.push(());
            }
            Err(e) => r.skip(format!("{}:{key}", path.display()), e),
        }
    }
    let shard = Arc::new(path.to_path_buf());
    Ok((TarPairs { shard, samples }, r))
}

impl RecordSource for TarPairs {
    fn len(&self) -> usize {
        self.samples.len()
    }

    fn record(&self, i: usize, stats: &DataStats) -> Result<Record, DataError> {
        let (key, p) = &self.samples[i];
        let caption = tar_caption(&self.shard, key, p)?;
        stats.samples.fetch_add(1, Ordering::Relaxed);
        stats
            .bytes
            .fetch_add(caption.len() as u64, Ordering::Relaxed);
        let image = p.image.clone().expect("tar_caption checked the image");
        Ok(Record::Pair {
            image: Image::Member(self.shard.clone(), image),
            caption,
        })
    }
}

/// MMC4 documents from a JSONL shard (images in a folder or a tar), streamed; the paper's rules
/// (`data.mmc4`) apply at open and again, identically, when a document is read.
pub struct Mmc4Docs {
    path: PathBuf,
    base: ImageBase,
    rules: crate::config::Mmc4Rules,
    seed: u64,
    lines: Vec<(u64, usize)>,
}

/// Opens an MMC4 shard for streaming, checking and filtering every line as
/// [`crate::data::readers::read_mmc4`] does, without decoding an image.
pub fn open_mmc4(
    path: &Path,
    images: Option<&Path>,
    rules: &crate::config::Mmc4Rules,
    seed: u64,
) -> Result<(Mmc4Docs, ReadReport<()>), DataError> {
    let base = ImageBase::of(path, images)?;
    let mut r = ReadReport::new();
    let mut lines = Vec::new();
    for (offset, n, line) in line_index(path)? {
        let at = format!("{}:{n}", path.display());
        let Some((_, kept)) = mmc4_document(&line, n, &at, rules, seed, &mut r) else {
            continue;
        };
        match kept
            .iter()
            .try_for_each(|(name, _)| base.image(name).map(drop))
        {
            Ok(()) => {
                lines.push((offset, n));
                r.records.push(());
            }
            Err(e) => r.skip(at, e),
        }
    }
    let (path, rules) = (path.to_path_buf(), rules.clone());
    let docs = Mmc4Docs {
        path,
        base,
        rules,
        seed,
        lines,
    };
    Ok((docs, r))
}

impl RecordSource for Mmc4Docs {
    fn len(&self) -> usize {
        self.lines.len()
    }

    fn record(&self, i: usize, stats: &DataStats) -> Result<Record, DataError> {
        let (offset, n) = self.lines[i];
        let at = format!("{}:{n}", self.path.display());
        let line = read_line_at(&self.path, offset, n, stats)?;
        let mut scratch: ReadReport<()> = ReadReport::new();
        let (texts, kept) = mmc4_document(&line, n, &at, &self.rules, self.seed, &mut scratch)
            .ok_or_else(|| {
                let why = scratch.bad.first().map(|b| format!(" ({})", b.reason));
                let why = why.unwrap_or_default();
                DataError::from(format!("{at}: changed since it was opened{why}"))
            })?;
        let images = kept
            .into_iter()
            .map(|(name, sentence)| Ok((self.base.image(&name)?, sentence)))
            .collect::<Result<Vec<_>, DataError>>()?;
        Ok(Record::Document { texts, images })
    }
}

/// LLaVA conversations (a JSON list, parsed whole at open: the format has no record boundaries to
/// index), their images as handles.
pub struct Conversations {
    records: Vec<Conversation<Image>>,
}

/// Opens a LLaVA JSON for streaming its images: entries are checked as
/// [`crate::data::readers::read_llava`] checks them, images located but not decoded.
pub fn open_llava(
    path: &Path,
    images: Option<&Path>,
) -> Result<(Conversations, ReadReport<()>), DataError> {
    let base = ImageBase::of(path, images)?;
    let read = crate::data::readers::read_llava_with(path, |rel| base.image(rel))?;
    let mut r = ReadReport::new();
    r.bad = read.bad;
    r.records = vec![(); read.records.len()];
    Ok((
        Conversations {
            records: read.records,
        },
        r,
    ))
}

impl RecordSource for Conversations {
    fn len(&self) -> usize {
        self.records.len()
    }

    fn record(&self, i: usize, stats: &DataStats) -> Result<Record, DataError> {
        stats.samples.fetch_add(1, Ordering::Relaxed);
        let c = &self.records[i];
        Ok(Record::Conversation {
            image: c.image.clone(),
            turns: c.turns.clone(),
        })
    }
}
