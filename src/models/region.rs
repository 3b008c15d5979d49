//! DEEM's mask-aware extractor for region input (stage III): a binary mask, resized to each map, multiplies
//! the encoder's grid tokens and its four multi-scale maps; each masked map is mask-average-pooled and
//! projected (`mask_pool.{s}`, width → width), and the mask itself at 112×112 goes through an MLP
//! (`mask_shape.fc1..fc3`, 12544 → width → width → width). Those five tokens are prepended to the
//! resampler's input (see `Resampler::forward`'s `prefix`).

use tch::nn::{self, Module};
use tch::Tensor;

use crate::models::vision::VisionOutput;
use crate::rng::{Purpose, Stream};

/// Side of the mask image the shape MLP reads.
pub const MASK_SHAPE_SIDE: i64 = 112;

/// Checkpoint key prefixes of the extractor. A model saved without region support lacks them; loads
/// keep the extractor's initial values then (it only acts on region input).
pub const KEY_PREFIXES: [&str; 2] = [
    "visual_tokenizer.mask_pool.",
    "visual_tokenizer.mask_shape.",
];

/// [`KEY_PREFIXES`] as a [`crate::checkpoint::LoadSpec`] list.
pub fn key_prefixes() -> Vec<String> {
    KEY_PREFIXES.iter().map(|p| p.to_string()).collect()
}

/// Whether `name` is one of the extractor's parameters.
pub fn is_extractor_key(name: &str) -> bool {
    KEY_PREFIXES.iter().any(|p| name.starts_with(p))
}

/// A `w × h` row-major mask as `[1, size, size]` in [0, 1], with the geometry of
/// [`crate::models::vision::unit_pixels`] (shorter side to `size`, bilinear, centre crop), so it stays on its
/// image's pixels. `None` if `mask` does not hold `w × h` values.
pub fn unit_mask(mask: &[bool], w: u32, h: u32, size: u32) -> Option<Tensor> {
    if mask.len() != (w as usize) * (h as usize) || w == 0 || h == 0 {
        return None;
    }
    let (nw, nh, x0, y0) = crate::models::vision::square_crop(w, h, size);
    let m: Vec<f32> = mask.iter().map(|&b| b as u8 as f32).collect();
    let m = Tensor::from_slice(&m).view([1, 1, h as i64, w as i64]);
    let m = if (nw, nh) == (w, h) {
        m
    } else {
        m.upsample_bilinear2d([nh as i64, nw as i64], false, None, None)
    };
    Some(
        m.narrow(2, y0 as i64, size as i64)
            .narrow(3, x0 as i64, size as i64)
            .squeeze_dim(0)
            .contiguous(),
    )
}

/// All-ones masks `[n, 1, size, size]`: whole images as region input.
pub fn whole_image_masks(n: i64, size: i64) -> Tensor {
    Tensor::ones([n, 1, size, size], (tch::Kind::Float, tch::Device::Cpu))
}

#[derive(Debug)]
pub struct MaskExtractor {
    pool: Vec<nn::Linear>,
    fc1: nn::Linear,
    fc2: nn::Linear,
    fc3: nn::Linear,
}

/// The masked encoder output and the region tokens for the resampler.
#[derive(Debug)]
pub struct MaskedVision {
    /// The encoder tokens with the grid part multiplied by the mask (the pooled token is kept).
    pub tokens: Tensor,
    /// The multi-scale maps multiplied by the mask.
    pub multiscale: Vec<Tensor>,
    /// `[B, scales + 1, width]`: one pooled token per scale, then the mask-shape token.
    pub region_tokens: Tensor,
}

/// Resizes a `[B, 1, H, W]` mask to `h × w` (bilinear: partial coverage gives fractional weights).
fn resize(mask: &Tensor, h: i64, w: i64) -> Tensor {
    mask.upsample_bilinear2d([h, w], false, None, None)
}

impl MaskExtractor {
    /// Builds under `p` (conventionally `root / "visual_tokenizer"`) for `scales` maps of `width` channels,
    /// drawing the initial weights from libtorch's global generator (PyTorch's `nn.Linear` default).
    pub fn new(p: &nn::Path, scales: usize, width: i64) -> Self {
        Self::build(p, scales, width, Default::default())
    }

    /// [`Self::new`] with the same initial distribution (uniform in ±1/√fan_in) drawn from deem's own
    /// stream for `seed` instead of the global generator, so that adding the extractor to a model does
    /// not shift the initial values of the modules built after it.
    pub fn new_seeded(p: &nn::Path, scales: usize, width: i64, seed: u64) -> Self {
        let zero = nn::LinearConfig {
            ws_init: nn::Init::Const(0.0),
            bs_init: Some(nn::Init::Const(0.0)),
            bias: true,
        };
        let e = Self::build(p, scales, width, zero);
        let mut s = Stream::new(seed, 0, 0, Purpose::RegionInit);
        let layers = e.pool.iter().chain([&e.fc1, &e.fc2, &e.fc3]);
        tch::no_grad(|| {
            for l in layers {
                let bound = 1.0 / (l.ws.size()[1] as f64).sqrt();
                for t in [&l.ws, l.bs.as_ref().expect("bias")] {
                    let n = t.numel();
                    let v: Vec<f32> = (0..n)
                        .map(|_| ((2.0 * s.uniform() - 1.0) * bound) as f32)
                        .collect();
                    let mut t = t.shallow_clone();
                    t.copy_(&Tensor::from_slice(&v).view(t.size().as_slice()));
                }
            }
        });
        e
    }

    fn build(p: &nn::Path, scales: usize, width: i64, c: nn::LinearConfig) -> Self {
        let side2 = MASK_SHAPE_SIDE * MASK_SHAPE_SIDE;
        let pool = (0..scales)
            .map(|s| nn::linear(p / "mask_pool" / s, width, width, c))
            .collect();
        let m = p / "mask_shape";
        MaskExtractor {
            pool,
            fc1: nn::linear(&m / "fc1", side2, width, c),
            fc2: nn::linear(&m / "fc2", width, width, c),
            fc3: nn::linear(&m / "fc3", width, width, c),
        }
    }

    /// Applies `mask` `[B, 1, H, W]` (1 = inside the region, at image resolution) to `v`.
    pub fn forward(&self, v: &VisionOutput, mask: &Tensor) -> MaskedVision {
        let mask = mask.to_kind(v.tokens.kind());
        let mut pooled = Vec::with_capacity(v.multiscale.len());
        let multiscale: Vec<Tensor> = v
            .multiscale
            .iter()
            .zip(&self.pool)
            .map(|(m, lin)| {
                let (h, w) = (m.size()[2], m.size()[3]);
                let mk = resize(&mask, h, w); // [B, 1, h, w]
                let masked = m * &mk;
                // Mask-average pool: Σ masked / Σ mask, guarded for empty masks.
                let area = mk
                    .sum_dim_intlist(&[2i64, 3][..], false, mk.kind())
                    .clamp_min(1e-6); // [B, 1]
                pooled.push(
                    lin.forward(&(masked.sum_dim_intlist(&[2i64, 3][..], false, m.kind()) / area)),
                );
                masked
            })
            .collect();
        // The grid part of the tokens is the third stage's map (see VisionEncoder).
        let n = v.tokens.size()[1] - 1;
        let side = (n as f64).sqrt().round() as i64;
        let grid_mask = resize(&mask, side, side).flatten(1, -1).unsqueeze(-1); // [B, n, 1]
        let tokens = Tensor::cat(
            &[
                v.tokens.narrow(1, 0, 1),
                v.tokens.narrow(1, 1, n) * grid_mask,
            ],
            1,
        );
        let shape = resize(&mask, MASK_SHAPE_SIDE, MASK_SHAPE_SIDE).flatten(1, -1);
        let shape = self.fc3.forward(
            &self
                .fc2
                .forward(&self.fc1.forward(&shape).gelu("none"))
                .gelu("none"),
        );
        pooled.push(shape);
        MaskedVision {
            tokens,
            multiscale,
            region_tokens: Tensor::stack(&pooled, 1),
        }
    }
}
