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
//! - Sources are drawn by their mix weights (MMC4 : pairs = 2 : 1 by default), samples uniformly. Batch
//!   `k` depends only on (seed, k): the sampler is stateless, so a run resumed at step `k` (the step in
//!   its checkpoint manifest is the data cursor) continues with exactly the batches it would have seen.

use tch::{Kind, Tensor};

use crate::config::DeemConfig;
use crate::datasets::{Conversation, Document, Pair};
use crate::model::Batch;
use crate::rng::{Purpose, Stream};
use crate::tokenizer::DeemTokenizer;

/// Most images a document keeps.
pub const MAX_IMAGES_PER_DOCUMENT: usize = 6;

/// A piece of a sample: text, and images that go before or after it.
struct Segment {
    text: Vec<i64>,
    images: Vec<usize>,
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

    fn image(&mut self, img: &image::RgbImage) -> usize {
        self.images
            .push(crate::vision::unit_pixels(img, self.size as u32));
        self.images.len() - 1
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

    fn text(tok: &DeemTokenizer, s: &str) -> Result<Vec<i64>, String> {
        tok.encode(s, false)
            .map(|v| v.into_iter().map(i64::from).collect())
            .map_err(|e| e.to_string())
    }

    /// Image-text pairs: the image before or after its caption.
    pub fn add_pairs(
        &mut self,
        name: &str,
        weight: f64,
        pairs: &[Pair],
        tok: &DeemTokenizer,
    ) -> Result<(), String> {
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
    ) -> Result<(), String> {
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
    ) -> Result<(), String> {
        let mut samples = Vec::new();
        let context = if self.loss_on_prompts {
            Some(0)
        } else {
            Some(usize::MAX)
        };
        for c in convs {
            let mut segs = vec![Segment {
                text: Self::text(tok, system)?,
                images: vec![],
                movable: false,
                targets_from: context,
            }];
            for (i, (q, a)) in c.turns.iter().enumerate() {
                let q = q.replace("<image>", "").trim().to_string();
                let image = if i == 0 {
                    c.image.as_ref().map(|img| self.image(img))
                } else {
                    None
                };
                segs.push(Segment {
                    text: Self::text(tok, " USER:")?,
                    images: vec![],
                    movable: false,
                    targets_from: context,
                });
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

    /// Appends a sample's ids to `row`, whether each is an NTP target to `mask`, and its images to
    /// `images`, placing movable images by `s`.
    fn emit(
        &self,
        sample: &Sample,
        s: &mut Stream,
        row: &mut Vec<i64>,
        mask: &mut Vec<bool>,
        images: &mut Vec<usize>,
    ) {
        row.push(self.bos);
        mask.push(false);
        for seg in &sample.segments {
            let before = !seg.movable || s.uniform() < 0.5;
            let all = seg.targets_from.is_none();
            let put_images = |row: &mut Vec<i64>, mask: &mut Vec<bool>, images: &mut Vec<usize>| {
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
    pub fn batch(&self, index: u64) -> Result<Batch, String> {
        self.batch_with_counts(index).map(|(b, _)| b)
    }

    /// [`Mixer::batch`] and how many samples each source gave it.
    pub fn batch_with_counts(&self, index: u64) -> Result<(Batch, Vec<usize>), String> {
        let mut counts = vec![0usize; self.sources.len()];
        let total: f64 = self
            .sources
            .iter()
            .filter(|s| !s.is_empty())
            .map(|s| s.weight)
            .sum();
        if total <= 0.0 {
            return Err("the data mix has no samples (every source is empty or weighs 0)".into());
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
                &order.iter().map(|&i| &self.images[i]).collect::<Vec<_>>(),
                0,
            )
        };
        let shape = [self.rows as i64, self.context as i64];
        Ok((
            Batch {
                input_ids: Tensor::from_slice(&ids).view(shape),
                pixels,
                loss_mask: Some(Tensor::from_slice(&mask).view(shape)),
            },
            counts,
        ))
    }
}
