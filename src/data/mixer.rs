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

use tch::{Kind, Tensor};

use crate::config::DeemConfig;
use crate::data::readers::{Conversation, Document, Pair, Region};
use crate::data::DataError;
use crate::models::deem::Batch;
use crate::rng::{Purpose, Stream};
use crate::text::tokenizer::DeemTokenizer;

/// Most images a document keeps.
pub const MAX_IMAGES_PER_DOCUMENT: usize = 6;

/// The paper's referring prompt (Fig. 8c): the image, this text, then the image with the region's mask.
pub const REFERRING_PROMPT: &str = "Provide a short description for this <ref>region1</ref>";

/// An image of a sample: its pixels in the mixer's store and, for region input, its mask.
#[derive(Clone, Copy)]
struct ImageRef {
    pixels: usize,
    mask: Option<usize>,
}

impl ImageRef {
    fn whole(pixels: usize) -> Self {
        ImageRef { pixels, mask: None }
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

/// A tokenised sample; `images` index the mixer's image store.
struct Sample {
    segments: Vec<Segment>,
    len: usize,
}

/// One data source of the mix.
pub struct Source {
    pub name: String,
    pub weight: f64,
    samples: Vec<Sample>,
}

impl Source {
    pub fn len(&self) -> usize {
        self.samples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }
}

/// Packs samples from weighted sources into training batches.
pub struct Mixer {
    pub sources: Vec<Source>,
    /// Pixels [3, S, S] in [0, 1] of every image the samples use.
    images: Vec<Tensor>,
    /// Region masks [1, S, S] in [0, 1] the samples use.
    masks: Vec<Tensor>,
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
        }
    }

    fn image(&mut self, img: &image::RgbImage) -> ImageRef {
        self.images
            .push(crate::models::vision::unit_pixels(img, self.size as u32));
        ImageRef::whole(self.images.len() - 1)
    }

    /// Which ids of a prompt are NTP targets: `Some(0)` all (`train.loss_on_prompts`), else none.
    fn prompt_targets(&self) -> Option<usize> {
        if self.loss_on_prompts {
            Some(0)
        } else {
            Some(usize::MAX)
        }
    }

    /// A fixed-place prompt segment (no targets unless `train.loss_on_prompts`).
    fn prompt(&self, text: Vec<i64>, images: Vec<ImageRef>) -> Segment {
        Segment {
            text,
            images,
            movable: false,
            targets_from: self.prompt_targets(),
        }
    }

    fn finish(&mut self, name: &str, weight: f64, samples: Vec<Vec<Segment>>) {
        let k = self.k;
        let mut kept = Vec::new();
        for segments in samples {
            let len = 2 + segments
                .iter()
                .map(|s| s.text.len() + s.images.len() * (1 + k))
                .sum::<usize>();
            if len > self.context {
                self.too_long += 1;
            } else {
                kept.push(Sample { segments, len });
            }
        }
        self.sources.push(Source {
            name: name.to_string(),
            weight,
            samples: kept,
        });
    }

    fn text(tok: &DeemTokenizer, s: &str) -> Result<Vec<i64>, DataError> {
        tok.encode(s, false)
            .map(|v| v.into_iter().map(i64::from).collect())
            .map_err(DataError::from)
    }

    /// Image-text pairs: the image before or after its caption.
    pub fn add_pairs(
        &mut self,
        name: &str,
        weight: f64,
        pairs: &[Pair],
        tok: &DeemTokenizer,
    ) -> Result<(), DataError> {
        let mut samples = Vec::new();
        for p in pairs {
            let image = self.image(&p.image);
            samples.push(vec![Segment {
                text: Self::text(tok, &format!(" {}", p.caption))?,
                images: vec![image],
                movable: true,
                targets_from: None,
            }]);
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
        let mut samples = Vec::new();
        for d in docs {
            let mut segs = Vec::new();
            let mut used = 0;
            for (i, t) in d.texts.iter().enumerate() {
                let mut images = Vec::new();
                for (img, at) in &d.images {
                    if *at == i && used < MAX_IMAGES_PER_DOCUMENT {
                        images.push(self.image(img));
                        used += 1;
                    }
                }
                segs.push(Segment {
                    text: Self::text(tok, &format!(" {t}"))?,
                    images,
                    movable: true,
                    targets_from: None,
                });
            }
            samples.push(segs);
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
        let mut samples = Vec::new();
        for c in convs {
            let mut segs = vec![self.prompt(Self::text(tok, system)?, vec![])];
            for (i, (q, a)) in c.turns.iter().enumerate() {
                let q = q.replace("<image>", "").trim().to_string();
                let image = if i == 0 {
                    c.image.as_ref().map(|img| self.image(img))
                } else {
                    None
                };
                segs.push(self.prompt(Self::text(tok, " USER:")?, vec![]));
                // " {q} ASSISTANT:" is context; " {a}</s>" the target (the last reply's EOS is the
                // sample's own, appended by `emit`).
                let mut qt = Self::text(tok, &format!(" {q}"))?;
                qt.extend(Self::text(tok, " ASSISTANT:")?);
                let from = qt.len();
                qt.extend(Self::text(tok, &format!(" {a}"))?);
                if i + 1 < c.turns.len() {
                    qt.push(self.eos);
                }
                segs.push(Segment {
                    text: qt,
                    images: image.into_iter().collect(),
                    movable: false,
                    targets_from: Some(if self.loss_on_prompts { 0 } else { from }),
                });
            }
            samples.push(segs);
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
            self.masks.push(mask);
            let region = ImageRef {
                pixels: whole.pixels,
                mask: Some(self.masks.len() - 1),
            };
            let mut reply = Self::text(tok, " ASSISTANT:")?;
            let from = reply.len();
            reply.extend(Self::text(tok, &format!(" {}", r.caption))?);
            samples.push(vec![
                self.prompt(Self::text(tok, system)?, vec![]),
                self.prompt(Self::text(tok, " USER:")?, vec![]),
                self.prompt(
                    Self::text(tok, &format!(" {REFERRING_PROMPT}"))?,
                    vec![whole],
                ),
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
        self.batch_with_counts(index).map(|(b, _)| b)
    }

    /// [`Mixer::batch`] and how many samples each source gave it.
    pub fn batch_with_counts(&self, index: u64) -> Result<(Batch, Vec<usize>), DataError> {
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
        let mut order = Vec::new();
        // One stream per batch; rows fill in order. A drawn sample that does not fit closes the row
        // and opens the next one, so what is packed follows the mix weights (dropping it instead would
        // favour short samples).
        let mut s = Stream::new(self.seed, index, 0, Purpose::Data);
        let mut carried: Option<(usize, usize)> = None;
        for _ in 0..self.rows {
            let mut row = Vec::with_capacity(self.context);
            let mut row_mask = Vec::with_capacity(self.context);
            loop {
                let (si, i) = match carried.take() {
                    Some(x) => x,
                    None => {
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
                        let n = self.sources[si].samples.len() as u64;
                        (si, s.below(1, n)[0] as usize)
                    }
                };
                let sample = &self.sources[si].samples[i];
                if row.len() + sample.len > self.context {
                    carried = Some((si, i));
                    break;
                }
                counts[si] += 1;
                self.emit(sample, &mut s, &mut row, &mut row_mask, &mut order);
            }
            row.resize(self.context, self.pad);
            row_mask.resize(self.context, false);
            ids.extend(row);
            mask.extend(row_mask);
        }
        let pixels = if order.is_empty() {
            Tensor::zeros(
                [0, 3, self.size, self.size],
                (Kind::Float, tch::Device::Cpu),
            )
        } else {
            Tensor::stack(
                &order
                    .iter()
                    .map(|r| &self.images[r.pixels])
                    .collect::<Vec<_>>(),
                0,
            )
        };
        let masks = self.regions.then(|| {
            let whole = crate::models::region::whole_image_masks(1, self.size).squeeze_dim(0);
            let all: Vec<&Tensor> = order
                .iter()
                .map(|r| r.mask.map_or(&whole, |m| &self.masks[m]))
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
