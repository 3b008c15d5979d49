//! Training sequences from datasets: tokenisation, image placeholders, image placement, packing and the
//! data mix.
//!
//! - Every sample starts with BOS and ends with EOS; an image is `<|startofimage|>` + K placeholders.
//! - Documents and pairs train on all their text (and learn when to draw: SoI is a target);
//!   conversations only on the assistant's replies and their EOS, as LLaVA trains (the batch's
//!   `loss_mask`), or on their prompts too with `train.loss_on_prompts`.
//! - Pairs and MMC4 documents put each image before or after its sentence with equal probability;
//!   documents keep at most 6 images. Conversations use the chat template with the paper's system prompt
//!   and the image at the start of the first question (where LLaVA's preprocessing moves `<image>`).
//! - Rows are packed with whole samples up to the context length (a sample never straddles two rows, so
//!   image tokens stay whole), then padded.
//! - Region data (stage III) follows the paper's referring template: the image, then "Provide a short
//!   description for this <ref>region1</ref>" and the image again with the region's mask; the reply is
//!   the region's caption. A mixer with region data gives every batch `masks` (whole images all ones),
//!   so all its images go through the mask-aware extractor.
//! - Sources are drawn by their mix weights (MMC4 : pairs = 2 : 1 by default), samples uniformly. Batch
//!   `k` depends only on (seed, k): the sampler is stateless, so a run resumed at step `k` (the step in
//!   its checkpoint manifest is the data cursor) continues with exactly the batches it would have seen.
//! - Sources are held in memory (tokenised when added) or streamed (`add_stream`: a record is read,
//!   tokenised and its images decoded when a batch draws it); the same records give the same batches
//!   either way.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tch::{Kind, Tensor};

use crate::config::DeemConfig;
use crate::data::readers::{Conversation, Document, Pair, Region};
use crate::data::stream::{DataStats, Image, Record, RecordSource};
use crate::data::DataError;
use crate::models::deem::Batch;
use crate::rng::{Purpose, Stream};
use crate::text::tokenizer::DeemTokenizer;

/// Most images a document keeps.
pub const MAX_IMAGES_PER_DOCUMENT: usize = 6;

/// The paper's referring prompt (Fig. 8c): the image, this text, then the image with the region's mask.
pub const REFERRING_PROMPT: &str = "Provide a short description for this <ref>region1</ref>";

mod segments;
use segments::{text, Template};

/// Where an image's pixels are: the mixer's store (records read in memory), or the batch's list of
/// images still to decode (streamed records).
#[derive(Clone, Copy)]
enum Px {
    Store(usize),
    Pending(usize),
}

/// An image of a sample: its pixels and, for region input, its mask.
#[derive(Clone, Copy)]
struct ImageRef {
    pixels: Px,
    mask: Option<usize>,
}

impl ImageRef {
    fn whole(pixels: usize) -> Self {
        ImageRef {
            pixels: Px::Store(pixels),
            mask: None,
        }
    }
}

/// A piece of a sample: text, and images that go before or after it.
struct Segment {
    text: Vec<i64>,
    images: Vec<ImageRef>,
    /// Images before or after the text at random (else always before).
    movable: bool,
    /// NTP targets: `None`, everything (text and images); `Some(k)`, only `text[k..]`.
    targets_from: Option<usize>,
}

/// A tokenised sample; its segments' images point into the mixer's store or the batch's list.
struct Sample {
    segments: Vec<Segment>,
    len: usize,
}

/// A source's samples: tokenised in memory, or streamed from disk as batches draw them.
enum Samples {
    Prepared(Vec<Sample>),
    Streamed {
        records: Arc<dyn RecordSource>,
        tok: Arc<DeemTokenizer>,
        /// The system prompt of conversations.
        system: String,
    },
}

/// One data source of the mix.
pub struct Source {
    pub name: String,
    pub weight: f64,
    samples: Samples,
}

impl Source {
    pub fn len(&self) -> usize {
        match &self.samples {
            Samples::Prepared(v) => v.len(),
            Samples::Streamed { records, .. } => records.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A drawn sample: one of the store's, or one read for this batch (its images in the batch's list).
enum Drawn<'a> {
    Prepared(&'a Sample),
    Streamed(Sample),
}

impl Drawn<'_> {
    fn sample(&self) -> &Sample {
        match self {
            Drawn::Prepared(s) => s,
            Drawn::Streamed(s) => s,
        }
    }
}

/// Consecutive drawn records a batch may find unreadable or too long before it gives up.
const MAX_REDRAWS: usize = 1000;

/// Packs samples from weighted sources into training batches.
pub struct Mixer {
    pub sources: Vec<Source>,
    /// Pixels [3, S, S] in [0, 1] of every image the samples held in memory use (as plain values: the
    /// mixer is shared by the data workers' threads, which tensors cannot be).
    images: Vec<Vec<f32>>,
    /// Region masks [1, S, S] in [0, 1] the samples use.
    masks: Vec<Vec<f32>>,
    /// Region data was added: batches carry masks.
    regions: bool,
    seed: u64,
    rows: usize,
    context: usize,
    k: usize,
    bos: i64,
    eos: i64,
    /// `train.loss_on_prompts`: conversations' prompts are targets too.
    loss_on_prompts: bool,
    pad: i64,
    soi: i64,
    sniffer: i64,
    size: i64,
    /// Samples dropped because they are longer than the context.
    pub too_long: usize,
    /// What streamed sources read and decoded.
    pub stats: Arc<DataStats>,
}

impl Mixer {
    pub fn new(cfg: &DeemConfig, seed: u64) -> Self {
        let l = &cfg.llm;
        Mixer {
            sources: Vec::new(),
            images: Vec::new(),
            masks: Vec::new(),
            regions: false,
            seed,
            rows: cfg.train.batch_size as usize,
            context: cfg.train.context_length as usize,
            k: cfg.resampler.num_query_tokens as usize,
            bos: l.bos_token_id,
            eos: l.eos_token_id,
            loss_on_prompts: cfg.train.loss_on_prompts,
            pad: l.pad_token_id,
            soi: l.vocab_size,
            sniffer: l.vocab_size + 1,
            size: cfg.diffusion.image_size,
            too_long: 0,
            stats: Arc::new(DataStats::default()),
        }
    }

    fn template(&self) -> Template {
        Template {
            eos: self.eos,
            loss_on_prompts: self.loss_on_prompts,
        }
    }

    /// A source streamed from disk: each record is read, tokenised and its images decoded when a
    /// batch draws it (records longer than the context, or unreadable, are drawn again and counted in
    /// [`Self::stats`]).
    pub fn add_stream(
        &mut self,
        name: &str,
        weight: f64,
        records: Arc<dyn RecordSource>,
        tok: Arc<DeemTokenizer>,
        system: &str,
    ) {
        self.sources.push(Source {
            name: name.to_string(),
            weight,
            samples: Samples::Streamed {
                records,
                tok,
                system: system.to_string(),
            },
        });
    }

    fn image(&mut self, img: &image::RgbImage) -> ImageRef {
        let px = crate::models::vision::unit_pixels(img, self.size as u32);
        self.images.push(values(&px));
        ImageRef::whole(self.images.len() - 1)
    }

    /// A stored image or mask as a `[channels, S, S]` tensor.
    fn stored(&self, v: &[f32], channels: i64) -> Tensor {
        Tensor::from_slice(v).view([channels, self.size, self.size])
    }

    fn finish(&mut self, name: &str, weight: f64, samples: Vec<Vec<Segment>>) {
        let mut kept = Vec::new();
        for segments in samples {
            let len = self.sample_len(&segments);
            if len > self.context {
                self.too_long += 1;
            } else {
                kept.push(Sample { segments, len });
            }
        }
        self.sources.push(Source {
            name: name.to_string(),
            weight,
            samples: Samples::Prepared(kept),
        });
    }

    /// Image-text pairs: the image before or after its caption.
    pub fn add_pairs(
        &mut self,
        name: &str,
        weight: f64,
        pairs: &[Pair],
        tok: &DeemTokenizer,
    ) -> Result<(), DataError> {
        let t = self.template();
        let mut samples = Vec::new();
        for p in pairs {
            let image = self.image(&p.image);
            samples.push(t.pair(tok, &p.caption, image)?);
        }
        self.finish(name, weight, samples);
        Ok(())
    }

    /// Interleaved documents: each image before or after its matched sentence, at most 6 images.
    pub fn add_documents(
        &mut self,
        name: &str,
        weight: f64,
        docs: &[Document],
        tok: &DeemTokenizer,
    ) -> Result<(), DataError> {
        let t = self.template();
        let mut samples = Vec::new();
        for d in docs {
            samples.push(t.document(tok, &d.texts, &d.images, |img| self.image(img))?);
        }
        self.finish(name, weight, samples);
        Ok(())
    }

    /// Instruction conversations in the chat template; the image leads the first question wherever its
    /// `<image>` stands (or when the text has none), as LLaVA's preprocessing moves it to the front.
    /// Only the replies (each closed by EOS) are NTP targets, unless `train.loss_on_prompts`: then
    /// every text id is (images stay context).
    pub fn add_conversations(
        &mut self,
        name: &str,
        weight: f64,
        convs: &[Conversation],
        system: &str,
        tok: &DeemTokenizer,
    ) -> Result<(), DataError> {
        let t = self.template();
        let mut samples = Vec::new();
        for c in convs {
            let image = c.image.as_ref().map(|img| self.image(img));
            samples.push(t.conversation(tok, system, image, &c.turns)?);
        }
        self.finish(name, weight, samples);
        Ok(())
    }

    /// Region data in the referring template, under the chat template of conversations: the image, the
    /// referring prompt, the image again with the region's mask, and the caption as the reply (the only
    /// target unless `train.loss_on_prompts`). Marks the mixer as giving region input.
    pub fn add_regions(
        &mut self,
        name: &str,
        weight: f64,
        regions: &[Region],
        system: &str,
        tok: &DeemTokenizer,
    ) -> Result<(), DataError> {
        self.regions = true;
        let t = self.template();
        let mut samples = Vec::new();
        for r in regions {
            let (w, h) = r.image.dimensions();
            let mask = crate::models::region::unit_mask(&r.mask, w, h, self.size as u32)
                .ok_or_else(|| {
                    format!(
                        "{name}: a region's mask holds {} values, its image is {w}×{h}",
                        r.mask.len()
                    )
                })?;
            let whole = self.image(&r.image);
            self.masks.push(values(&mask));
            let region = ImageRef {
                pixels: whole.pixels,
                mask: Some(self.masks.len() - 1),
            };
            let mut reply = text(tok, " ASSISTANT:")?;
            let from = reply.len();
            reply.extend(text(tok, &format!(" {}", r.caption))?);
            samples.push(vec![
                t.prompt(text(tok, system)?, vec![]),
                t.prompt(text(tok, " USER:")?, vec![]),
                t.prompt(text(tok, &format!(" {REFERRING_PROMPT}"))?, vec![whole]),
                Segment {
                    text: reply,
                    images: vec![region],
                    movable: false,
                    targets_from: Some(if self.loss_on_prompts { 0 } else { from }),
                },
            ]);
        }
        self.finish(name, weight, samples);
        Ok(())
    }

    /// Appends a sample's ids to `row`, whether each is an NTP target to `mask`, and its images to
    /// `images`, placing movable images by `s`.
    fn emit(
        &self,
        sample: &Sample,
        s: &mut Stream,
        row: &mut Vec<i64>,
        mask: &mut Vec<bool>,
        images: &mut Vec<ImageRef>,
    ) {
        row.push(self.bos);
        mask.push(false);
        for seg in &sample.segments {
            let before = !seg.movable || s.uniform() < 0.5;
            let all = seg.targets_from.is_none();
            let put_images =
                |row: &mut Vec<i64>, mask: &mut Vec<bool>, images: &mut Vec<ImageRef>| {
                    for &i in &seg.images {
                        row.push(self.soi);
                        row.extend(std::iter::repeat_n(self.sniffer, self.k));
                        mask.extend(std::iter::repeat_n(all, 1 + self.k));
                        images.push(i);
                    }
                };
            let from = seg.targets_from.unwrap_or(0);
            let put_text = |row: &mut Vec<i64>, mask: &mut Vec<bool>| {
                row.extend(&seg.text);
                mask.extend((0..seg.text.len()).map(|j| j >= from));
            };
            if before {
                put_images(row, mask, images);
                put_text(row, mask);
            } else {
                put_text(row, mask);
                put_images(row, mask, images);
            }
        }
        row.push(self.eos);
        mask.push(true);
    }

    /// Batch number `index`: `train.batch_size` rows of `train.context_length` ids.
    pub fn batch(&self, index: u64) -> Result<Batch, DataError> {
        self.batch_rows(index, 0..self.rows).map(|(b, _)| b)
    }

    /// [`Mixer::batch`] and how many samples each source gave it.
    pub fn batch_with_counts(&self, index: u64) -> Result<(Batch, Vec<usize>), DataError> {
        self.batch_rows(index, 0..self.rows)
    }

    fn sample_len(&self, segments: &[Segment]) -> usize {
        2 + segments
            .iter()
            .map(|s| s.text.len() + s.images.len() * (1 + self.k))
            .sum::<usize>()
    }

    /// Reads streamed record `i` of source `si` for a batch: its segments, its images appended to
    /// `pending`. `None`: unreadable or longer than the context (counted), to be drawn again.
    fn read(
        &self,
        si: usize,
        i: usize,
        pending: &mut Vec<Image>,
    ) -> Result<Option<Sample>, DataError> {
        let Samples::Streamed {
            records,
            tok,
            system,
        } = &self.sources[si].samples
        else {
            return Ok(None);
        };
        let record = match records.record(i, &self.stats) {
            Ok(r) => r,
            Err(e) => {
                self.stats.skipped.fetch_add(1, Ordering::Relaxed);
                self.stats.note(e);
                return Ok(None);
            }
        };
        let t = self.template();
        let mut place = |img: &Image| {
            pending.push(img.clone());
            ImageRef {
                pixels: Px::Pending(pending.len() - 1),
                mask: None,
            }
        };
        let segments = match &record {
            Record::Pair { image, caption } => {
                let r = place(image);
                t.pair(tok, caption, r)?
            }
            Record::Document { texts, images } => t.document(tok, texts, images, place)?,
            Record::Conversation { image, turns } => {
                let r = image.as_ref().map(&mut place);
                t.conversation(tok, system, r, turns)?
            }
        };
        let len = self.sample_len(&segments);
        if len > self.context {
            self.stats.skipped.fetch_add(1, Ordering::Relaxed);
            return Ok(None);
        }
        Ok(Some(Sample { segments, len }))
    }

    /// Draws the next sample of a batch: a source by the mix weights (`total`: their sum), a sample
    /// uniformly; a streamed record that cannot be used is drawn again.
    fn draw<'a>(
        &'a self,
        s: &mut Stream,
        total: f64,
        pending: &mut Vec<Image>,
    ) -> Result<(usize, Drawn<'a>), DataError> {
        for _ in 0..MAX_REDRAWS {
            let mut u = s.uniform() * total;
            let si = self
                .sources
                .iter()
                .enumerate()
                .filter(|(_, x)| !x.is_empty())
                .find(|(_, x)| {
                    u -= x.weight;
                    u < 0.0
                })
                .or_else(|| {
                    self.sources
                        .iter()
                        .enumerate()
                        .rev()
                        .find(|(_, x)| !x.is_empty())
                })
                .expect("a non-empty source")
                .0;
            let n = self.sources[si].len() as u64;
            let i = s.below(1, n)[0] as usize;
            match &self.sources[si].samples {
                Samples::Prepared(v) => return Ok((si, Drawn::Prepared(&v[i]))),
                Samples::Streamed { .. } => {
                    if let Some(sample) = self.read(si, i, pending)? {
                        return Ok((si, Drawn::Streamed(sample)));
                    }
                }
            }
        }
        Err(DataError::from(format!(
            "{MAX_REDRAWS} records drawn in a row were unreadable or longer than train.context_length; last problem: {}",
            self.stats.take_problem().unwrap_or_else(|| "too long".into())
        )))
    }

    /// An image to decode for a batch, as pixels [3, S, S] in [0, 1]; one that fails (it passed the
    /// check when its file was opened) is counted and given zeros, so the batch stays the same on
    /// every rank.
    fn decode(&self, img: &Image) -> Tensor {
        match img.decode(&self.stats) {
            Ok(im) => crate::models::vision::unit_pixels(&im, self.size as u32),
            Err(e) => {
                self.stats.bad_images.fetch_add(1, Ordering::Relaxed);
                self.stats.note(e);
                Tensor::zeros([3, self.size, self.size], (Kind::Float, tch::Device::Cpu))
            }
        }
    }

    /// Batch `index` of which this process uses rows `rows` (its data-parallel share): every row's
    /// tokens are the global batch's, but only the images of rows in `rows` are read and decoded
    /// (the others' pixels are zeros). With how many samples each source gave.
    pub fn batch_rows(
        &self,
        index: u64,
        rows: std::ops::Range<usize>,
    ) -> Result<(Batch, Vec<usize>), DataError> {
        let mut counts = vec![0usize; self.sources.len()];
        let total: f64 = self
            .sources
            .iter()
            .filter(|s| !s.is_empty())
            .map(|s| s.weight)
            .sum();
        if total <= 0.0 {
            return Err(DataError::from(
                "the data mix has no samples (every source is empty or weighs 0)",
            ));
        }
        let mut ids = Vec::with_capacity(self.rows * self.context);
        let mut mask = Vec::with_capacity(self.rows * self.context);
        let (mut order, mut pending, mut row_ends) = (Vec::new(), Vec::new(), Vec::new());
        // One stream per batch; rows fill in order. A drawn sample that does not fit closes the row
        // and opens the next one, so what is packed follows the mix weights (dropping it instead would
        // favour short samples).
        let mut s = Stream::new(self.seed, index, 0, Purpose::Data);
        let mut carried: Option<(usize, Drawn)> = None;
        for _ in 0..self.rows {
            let mut row = Vec::with_capacity(self.context);
            let mut row_mask = Vec::with_capacity(self.context);
            loop {
                let (si, drawn) = match carried.take() {
                    Some(x) => x,
                    None => self.draw(&mut s, total, &mut pending)?,
                };
                if row.len() + drawn.sample().len > self.context {
                    carried = Some((si, drawn));
                    break;
                }
                counts[si] += 1;
                self.emit(drawn.sample(), &mut s, &mut row, &mut row_mask, &mut order);
            }
            row.resize(self.context, self.pad);
            row_mask.resize(self.context, false);
            ids.extend(row);
            mask.extend(row_mask);
            row_ends.push(order.len());
        }
        let row_of = |o: usize| row_ends.iter().position(|&end| o < end).unwrap_or(0);
        let all: Vec<Tensor> = order
            .iter()
            .enumerate()
            .map(|(o, r)| match r.pixels {
                Px::Store(i) => self.stored(&self.images[i], 3),
                Px::Pending(j) if rows.contains(&row_of(o)) => self.decode(&pending[j]),
                Px::Pending(_) => {
                    Tensor::zeros([3, self.size, self.size], (Kind::Float, tch::Device::Cpu))
                }
            })
            .collect();
        let pixels = if all.is_empty() {
            Tensor::zeros(
                [0, 3, self.size, self.size],
                (Kind::Float, tch::Device::Cpu),
            )
        } else {
            Tensor::stack(&all, 0)
        };
        let masks = self.regions.then(|| {
            let whole = crate::models::region::whole_image_masks(1, self.size).squeeze_dim(0);
            let all: Vec<Tensor> = order
                .iter()
                .map(|r| {
                    r.mask
                        .map_or_else(|| whole.shallow_clone(), |m| self.stored(&self.masks[m], 1))
                })
                .collect();
            if all.is_empty() {
                Tensor::zeros(
                    [0, 1, self.size, self.size],
                    (Kind::Float, tch::Device::Cpu),
                )
            } else {
                Tensor::stack(&all, 0)
            }
        });
        let shape = [self.rows as i64, self.context as i64];
        Ok((
            Batch {
                input_ids: Tensor::from_slice(&ids).view(shape),
                pixels,
                loss_mask: Some(Tensor::from_slice(&mask).view(shape)),
                masks,
            },
            counts,
        ))
    }
}

/// A float tensor's values, row-major.
fn values(t: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(t.to_kind(Kind::Float).flatten(0, -1)).unwrap_or_default()
}
