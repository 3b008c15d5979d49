//! DEEM's mask-aware extractor for region input (stage III): a binary mask, resized to each map, multiplies
//! the encoder's grid tokens and its four multi-scale maps; each masked map is mask-average-pooled and
//! projected (`mask_pool.{s}`, width → width), and the mask itself at 112×112 goes through an MLP
//! (`mask_shape.fc1..fc3`, 12544 → width → width → width). Those five tokens are prepended to the
//! resampler's input (see `Resampler::forward`'s `prefix`).

use tch::nn::{self, Module};
use tch::Tensor;

use crate::vision::VisionOutput;

/// Side of the mask image the shape MLP reads.
pub const MASK_SHAPE_SIDE: i64 = 112;

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
    /// Builds under `p` (conventionally `root / "visual_tokenizer"`) for `scales` maps of `width` channels.
    pub fn new(p: &nn::Path, scales: usize, width: i64) -> Self {
        let side2 = MASK_SHAPE_SIDE * MASK_SHAPE_SIDE;
        let pool = (0..scales)
            .map(|s| nn::linear(p / "mask_pool" / s, width, width, Default::default()))
            .collect();
        let m = p / "mask_shape";
        MaskExtractor {
            pool,
            fc1: nn::linear(&m / "fc1", side2, width, Default::default()),
            fc2: nn::linear(&m / "fc2", width, width, Default::default()),
            fc3: nn::linear(&m / "fc3", width, width, Default::default()),
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
