//! A built-in deterministic batch source for the trainer and its tests: each row is
//! `BOS w w w [image] c s [image] c s EOS pad…`, where every image shows a coloured rectangle and the
//! two tokens after it name its colour and shape — enough signal for a tiny model to learn something.
//! (The full synthetic world and real dataset readers belong to the data issue.)

use tch::{Kind, Tensor};

use crate::config::DeemConfig;
use crate::models::deem::Batch;
use crate::rng::{Purpose, Stream};

pub const COLORS: [[f32; 3]; 8] = [
    [0.9, 0.1, 0.1],
    [0.1, 0.8, 0.1],
    [0.1, 0.2, 0.9],
    [0.9, 0.9, 0.1],
    [0.9, 0.4, 0.0],
    [0.6, 0.1, 0.8],
    [0.1, 0.8, 0.8],
    [0.95, 0.95, 0.95],
];
/// Shapes as (width, height) fractions of the image.
pub const SHAPES: [(f64, f64); 4] = [(0.5, 0.5), (0.8, 0.25), (0.25, 0.8), (0.3, 0.3)];
const EOS: i64 = 2;
const IMAGES_PER_ROW: usize = 2;

/// Deterministic batches for `cfg` (token ids below 64 + 8 + 4 must fit the vocabulary).
pub struct SyntheticBatches {
    cfg: DeemConfig,
    seed: u64,
    next: u64,
}

impl SyntheticBatches {
    pub fn new(cfg: &DeemConfig, seed: u64) -> Self {
        SyntheticBatches {
            cfg: cfg.clone(),
            seed,
            next: 0,
        }
    }

    /// Tokens per row: BOS + 3 words + per image (SoI + queries + 2 caption tokens) + EOS.
    pub fn row_len(&self) -> i64 {
        1 + 3 + IMAGES_PER_ROW as i64 * (1 + self.cfg.resampler.num_query_tokens + 2) + 1
    }

    /// The shape of one microbatch of these batches (every image has text before it: all are NIP
    /// targets too).
    pub fn shape(&self) -> crate::cost::Shape {
        crate::cost::Shape {
            rows: (self.cfg.train.batch_size / self.cfg.train.microbatches.max(1)) as i64,
            tokens: self.row_len(),
            images: IMAGES_PER_ROW as i64,
            nip_images: IMAGES_PER_ROW as i64,
        }
    }

    /// Batch number `index` (the same index always gives the same batch).
    pub fn batch(&self, index: u64) -> Batch {
        let l = &self.cfg.llm;
        let rows = self.cfg.train.batch_size as usize;
        let size = self.cfg.diffusion.image_size;
        let (soi, sniffer) = (l.vocab_size, l.vocab_size + 1);
        let mut s = Stream::new(self.seed, index, 0xda7a, Purpose::NipNoise);
        let mut ids = Vec::new();
        let mut images = Vec::new();
        for _ in 0..rows {
            ids.push(l.bos_token_id);
            ids.extend(s.below(3, 40).iter().map(|w| 10 + w));
            for _ in 0..IMAGES_PER_ROW {
                let color = s.below(1, COLORS.len() as u64)[0];
                let shape = s.below(1, SHAPES.len() as u64)[0];
                images.push(draw(&mut s, size, color as usize, shape as usize));
                ids.push(soi);
                ids.extend(std::iter::repeat_n(
                    sniffer,
                    self.cfg.resampler.num_query_tokens as usize,
                ));
                ids.extend([50 + color, 60 + shape]);
            }
            ids.push(EOS);
        }
        let input_ids = Tensor::from_slice(&ids).view([rows as i64, self.row_len()]);
        Batch {
            input_ids,
            pixels: Tensor::stack(&images, 0),
            loss_mask: None,
            masks: None,
        }
    }
}

impl Iterator for SyntheticBatches {
    type Item = Batch;

    fn next(&mut self) -> Option<Batch> {
        let b = self.batch(self.next);
        self.next += 1;
        Some(b)
    }
}

/// A `[3, size, size]` image in [0, 1]: a coloured rectangle at a random place on a grey background.
fn draw(s: &mut Stream, size: i64, color: usize, shape: usize) -> Tensor {
    let (fw, fh) = SHAPES[shape];
    let (w, h) = (((size as f64) * fw) as i64, ((size as f64) * fh) as i64);
    let x0 = (s.uniform() * (size - w) as f64) as i64;
    let y0 = (s.uniform() * (size - h) as f64) as i64;
    let img = Tensor::full([3, size, size], 0.5, (Kind::Float, tch::Device::Cpu));
    let c = Tensor::from_slice(&COLORS[color]).view([3, 1, 1]);
    img.narrow(1, y0, h)
        .narrow(2, x0, w)
        .copy_(&c.expand([3, h, w], false));
    img
}
