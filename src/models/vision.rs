//! The vision encoder: timm `ConvNeXt` (timm `models/convnext.py`) under open_clip's names
//! (`visual.trunk.…`, `visual.head.proj`), plus DEEM's multi-scale adapters — one linear per stage to a
//! common width (`adapter_c2` … `adapter_c5`) and one on the projected pooled feature (`adapter_cls`).
//!
//! Outputs: the token sequence `[B, 1 + H₃·W₃, width]` (the pooled "cls" token followed by the third
//! stage's map; 257 tokens at 256 px) and the four multi-scale maps `[B, width, Hₛ, Wₛ]`.

use tch::nn::{self, Module};
use tch::{Kind, Tensor};

use crate::config::{HeadProj, VisionConfig};
use crate::models::ModelError;

/// CLIP's normalisation constants (open_clip `OPENAI_DATASET_MEAN` / `_STD`).
pub const CLIP_MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
pub const CLIP_STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];
const LN_EPS: f64 = 1e-6;

/// LayerNorm over the channels of an NCHW map (timm `LayerNorm2d`).
#[derive(Debug)]
struct LayerNorm2d(nn::LayerNorm);

impl LayerNorm2d {
    fn new(p: nn::Path, c: i64) -> Self {
        LayerNorm2d(nn::layer_norm(
            p,
            vec![c],
            nn::LayerNormConfig {
                eps: LN_EPS,
                ..Default::default()
            },
        ))
    }
}

impl Module for LayerNorm2d {
    fn forward(&self, x: &Tensor) -> Tensor {
        self.0
            .forward(&x.permute([0, 2, 3, 1]))
            .permute([0, 3, 1, 2])
    }
}

#[derive(Debug)]
struct Block {
    conv_dw: nn::Conv2D,
    norm: nn::LayerNorm,
    fc1: nn::Linear,
    fc2: nn::Linear,
    gamma: Tensor,
}

impl Block {
    fn new(p: nn::Path, d: i64) -> Self {
        let conv = nn::ConvConfig {
            padding: 3,
            groups: d,
            ..Default::default()
        };
        Block {
            conv_dw: nn::conv2d(&p / "conv_dw", d, d, 7, conv),
            norm: nn::layer_norm(
                &p / "norm",
                vec![d],
                nn::LayerNormConfig {
                    eps: LN_EPS,
                    ..Default::default()
                },
            ),
            fc1: nn::linear(&p / "mlp" / "fc1", d, 4 * d, Default::default()),
            fc2: nn::linear(&p / "mlp" / "fc2", 4 * d, d, Default::default()),
            gamma: p.var("gamma", &[d], nn::Init::Const(1e-6)),
        }
    }
}

impl Module for Block {
    fn forward(&self, x: &Tensor) -> Tensor {
        // conv_dw → NHWC → norm → mlp (exact GELU) → layer scale → NCHW, plus the shortcut.
        let h = self.conv_dw.forward(x).permute([0, 2, 3, 1]);
        let h = self
            .fc2
            .forward(&self.fc1.forward(&self.norm.forward(&h)).gelu("none"));
        x + (h * &self.gamma).permute([0, 3, 1, 2])
    }
}

#[derive(Debug)]
struct Stage {
    downsample: Option<(LayerNorm2d, nn::Conv2D)>,
    blocks: Vec<Block>,
}

/// open_clip's projection of the pooled feature (`timm_proj`).
#[derive(Debug)]
enum Head {
    /// `head.proj`, bias-free.
    Linear(Tensor),
    /// `head.mlp.fc1` (with bias) → exact GELU → `head.mlp.fc2` (bias-free).
    Mlp { fc1: nn::Linear, fc2: Tensor },
}

impl Head {
    fn forward(&self, x: &Tensor) -> Tensor {
        match self {
            Head::Linear(w) => x.matmul(&w.tr()),
            Head::Mlp { fc1, fc2 } => fc1.forward(x).gelu("none").matmul(&fc2.tr()),
        }
    }
}

/// ConvNeXt trunk + open_clip head projection + DEEM adapters.
#[derive(Debug)]
pub struct VisionEncoder {
    stem_conv: nn::Conv2D,
    stem_norm: LayerNorm2d,
    stages: Vec<Stage>,
    head_norm: LayerNorm2d,
    head: Head,
    adapters: Vec<nn::Linear>,
    adapter_cls: nn::Linear,
    /// Index of the stage whose map forms the token sequence (the third).
    token_stage: usize,
}

/// What the encoder computes for a batch of images.
#[derive(Debug)]
pub struct VisionOutput {
    /// `[B, 1 + H·W, width]`: the pooled token, then the token stage's map in row-major order.
    pub tokens: Tensor,
    /// Per stage `[B, width, Hₛ, Wₛ]`, finest first.
    pub multiscale: Vec<Tensor>,
}

impl VisionEncoder {
    /// Builds under `p` (conventionally `root / "visual"`).
    pub fn new(p: &nn::Path, cfg: &VisionConfig) -> Self {
        let t = p / "trunk";
        let stem = nn::ConvConfig {
            stride: cfg.patch_size,
            ..Default::default()
        };
        let stem_conv = nn::conv2d(
            &t / "stem" / 0,
            cfg.in_channels,
            cfg.dims[0],
            cfg.patch_size,
            stem,
        );
        let stem_norm = LayerNorm2d::new(&t / "stem" / 1, cfg.dims[0]);
        let stages = (0..cfg.dims.len())
            .map(|s| {
                let sp = &t / "stages" / s;
                let d = cfg.dims[s];
                let downsample = (s > 0).then(|| {
                    let prev = cfg.dims[s - 1];
                    let conv = nn::ConvConfig {
                        stride: 2,
                        ..Default::default()
                    };
                    (
                        LayerNorm2d::new(&sp / "downsample" / 0, prev),
                        nn::conv2d(&sp / "downsample" / 1, prev, d, 2, conv),
                    )
                });
                let blocks = (0..cfg.depths[s])
                    .map(|b| Block::new(&sp / "blocks" / b, d))
                    .collect();
                Stage { downsample, blocks }
            })
            .collect();
        let last = *cfg.dims.last().expect("validated: at least one stage");
        let head_norm = LayerNorm2d::new(&t / "head" / "norm", last);
        let init = nn::Init::Randn {
            mean: 0.0,
            stdev: 0.02,
        };
        let head = match cfg.head_proj {
            HeadProj::Linear => {
                Head::Linear((p / "head" / "proj").var("weight", &[cfg.embed_dim, last], init))
            }
            HeadProj::Mlp => {
                let m = p / "head" / "mlp";
                Head::Mlp {
                    fc1: nn::linear(&m / "fc1", last, 2 * cfg.embed_dim, Default::default()),
                    fc2: (&m / "fc2").var("weight", &[cfg.embed_dim, 2 * cfg.embed_dim], init),
                }
            }
        };
        let adapters = cfg
            .dims
            .iter()
            .enumerate()
            .map(|(s, &d)| {
                nn::linear(
                    p / format!("adapter_c{}", s + 2),
                    d,
                    cfg.adapter_width,
                    Default::default(),
                )
            })
            .collect();
        let adapter_cls = nn::linear(
            p / "adapter_cls",
            cfg.embed_dim,
            cfg.adapter_width,
            Default::default(),
        );
        VisionEncoder {
            stem_conv,
            stem_norm,
            stages,
            head_norm,
            head,
            adapters,
            adapter_cls,
            token_stage: 2.min(cfg.dims.len() - 1),
        }
    }

    /// The trunk's stage maps and open_clip's image embedding `[B, embed_dim]` (timm head: global
    /// average pool → LayerNorm2d → flatten; open_clip: its projection head).
    fn trunk(&self, pixels: &Tensor) -> (Vec<Tensor>, Tensor) {
        // Pixels arrive in f32; the trunk computes in its weights' dtype (`model.dtype`).
        let pixels = pixels.to_kind(self.stem_conv.ws.kind());
        let mut x = self.stem_norm.forward(&self.stem_conv.forward(&pixels));
        let mut maps = Vec::with_capacity(self.stages.len());
        for stage in &self.stages {
            if let Some((norm, conv)) = &stage.downsample {
                x = conv.forward(&norm.forward(&x));
            }
            for b in &stage.blocks {
                x = b.forward(&x);
            }
            maps.push(x.shallow_clone());
        }
        let pooled = self
            .head_norm
            .forward(&x.mean_dim(&[2i64, 3][..], true, x.kind()))
            .flatten(1, -1);
        (maps, self.head.forward(&pooled))
    }

    /// open_clip's image embedding `[B, embed_dim]` of CLIP-normalised images (what contrastive
    /// pretraining aligns with the text tower).
    pub fn embed(&self, pixels: &Tensor) -> Tensor {
        self.trunk(pixels).1
    }

    /// Encodes CLIP-normalised images `[B, 3, S, S]`.
    pub fn forward(&self, pixels: &Tensor) -> VisionOutput {
        let (maps, embedding) = self.trunk(pixels);
        let cls = self.adapter_cls.forward(&embedding); // [B, width]
        let multiscale: Vec<Tensor> = maps
            .iter()
            .zip(&self.adapters)
            .map(|(m, a)| a.forward(&m.permute([0, 2, 3, 1])).permute([0, 3, 1, 2]))
            .collect();
        let grid = multiscale[self.token_stage].flatten(2, -1).transpose(1, 2); // [B, H·W, width]
        let tokens = Tensor::cat(&[&cls.unsqueeze(1), &grid], 1);
        VisionOutput { tokens, multiscale }
    }

    /// Checkpoint rules over open_clip's names (`visual.trunk.…`, the module's own; a DEEM whole-model
    /// checkpoint's `visual_tokenizer.encoder.` is mapped onto them by [`crate::models::pretrained`]).
    /// open_clip's text tower and logit scale are not the encoder's and are skipped.
    pub fn load_spec() -> crate::checkpoint::LoadSpec {
        crate::checkpoint::LoadSpec {
            component: "vision encoder".into(),
            namespace: vec!["visual.".into()],
            ignore: vec![],
            // A plain open_clip checkpoint has no DEEM adapters: they start from their initialisation.
            optional: vec!["visual.adapter_".into()],
        }
    }
}

/// Loads an image file and turns it into a CLIP-normalised `[3, size, size]` tensor: resize the shorter
/// side to `size` (bicubic), centre-crop, scale to [0, 1], normalise.
pub fn preprocess_file(path: &std::path::Path, size: u32) -> Result<Tensor, ModelError> {
    let img = image::open(path).map_err(|e| {
        ModelError::from(format!("{}: cannot decode the image: {e}", path.display()))
    })?;
    Ok(preprocess(&img.to_rgb8(), size))
}

/// [`preprocess_file`] for an already decoded image.
pub fn preprocess(img: &image::RgbImage, size: u32) -> Tensor {
    let t = unit_pixels(img, size);
    let mean = Tensor::from_slice(&CLIP_MEAN)
        .to_kind(Kind::Float)
        .view([3, 1, 1]);
    let std = Tensor::from_slice(&CLIP_STD)
        .to_kind(Kind::Float)
        .view([3, 1, 1]);
    (t - mean) / std
}

/// Where a `w × h` image goes to become `size × size`, as torchvision's `Resize(size)` +
/// `CenterCrop(size)` (open_clip's evaluation transform) place it: the shorter side becomes `size`, the
/// longer `⌊size · long / short⌋` (`(new width, new height)`); the crop starts at `round((n − size) / 2)`,
/// halves to even, as Python rounds (`(x0, y0)`).
pub fn square_crop(w: u32, h: u32, size: u32) -> (u32, u32, u32, u32) {
    let long =
        |l: u32, s: u32| ((size as u64 * l as u64) / s.max(1) as u64).max(size as u64) as u32;
    let (nw, nh) = if w <= h {
        (size, long(h, w))
    } else {
        (long(w, h), size)
    };
    let start = |n: u32| {
        let d = n - size;
        let half = d / 2;
        if d % 2 == 1 && half % 2 == 1 {
            half + 1
        } else {
            half
        }
    };
    (nw, nh, start(nw), start(nh))
}

/// An image as `[3, size, size]` pixels in [0, 1]: the shorter side resized to `size` (bicubic, as
/// Pillow computes it), then centre-cropped (CLIP's geometry, without the normalisation).
pub fn unit_pixels(img: &image::RgbImage, size: u32) -> Tensor {
    let (w, h) = img.dimensions();
    let (nw, nh, x0, y0) = square_crop(w, h, size);
    let resized = resize_bicubic(img, nw, nh);
    let crop = image::imageops::crop_imm(&resized, x0, y0, size, size).to_image();
    let data = crop.into_raw();
    Tensor::from_slice(&data)
        .view([size as i64, size as i64, 3])
        .permute([2, 0, 1])
        .to_kind(Kind::Float)
        / 255.0
}

/// Pillow's bicubic resize (`Image.resize(…, BICUBIC)`, which torchvision's `Resize` calls on images),
/// to the 8-bit value: Keys' cubic with a = −0.5, its support widened by the scale when shrinking
/// (antialiasing), weights normalised and rounded to 22-bit fixed point, the horizontal pass first with
/// its result rounded to 8 bits, then the vertical pass.
pub fn resize_bicubic(img: &image::RgbImage, nw: u32, nh: u32) -> image::RgbImage {
    let (w, h) = img.dimensions();
    let (w, h, nw, nh) = (w as usize, h as usize, nw as usize, nh as usize);
    // Along each row: output x reads inputs start.. at a stride of one pixel (3 bytes).
    let horizontal = if nw != w {
        let taps = fixed_point_taps(w, nw);
        let mut out = vec![0u8; nw * h * 3];
        for y in 0..h {
            let row = &img.as_raw()[y * w * 3..(y + 1) * w * 3];
            for (x, (start, weights)) in taps.iter().enumerate() {
                for c in 0..3 {
                    out[(y * nw + x) * 3 + c] = tap_sum(row, *start, 3, c, weights);
                }
            }
        }
        out
    } else {
        img.as_raw().clone()
    };
    // Along each column: output y reads rows start.. at a stride of one row.
    let out = if nh != h {
        let taps = fixed_point_taps(h, nh);
        let stride = nw * 3;
        let mut out = vec![0u8; nh * stride];
        for (y, (start, weights)) in taps.iter().enumerate() {
            for i in 0..stride {
                out[y * stride + i] = tap_sum(&horizontal, *start, stride, i, weights);
            }
        }
        out
    } else {
        horizontal
    };
    image::RgbImage::from_raw(nw as u32, nh as u32, out).expect("nw × nh × 3 bytes")
}

/// Bits of Pillow's fixed-point resampling weights (`PRECISION_BITS` for 8-bit images).
const PRECISION_BITS: u32 = 22;

/// One output byte: the weighted sum of `data[(start + k) · step + offset]`, rounded from fixed point
/// and clamped to 8 bits.
fn tap_sum(data: &[u8], start: usize, step: usize, offset: usize, weights: &[i64]) -> u8 {
    let acc = weights
        .iter()
        .enumerate()
        .fold(1i64 << (PRECISION_BITS - 1), |acc, (k, &wt)| {
            acc + data[(start + k) * step + offset] as i64 * wt
        });
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc` for the bicubic filter: for each of the `n`
/// outputs along an axis of `len` inputs, the first input it reads and its fixed-point weights.
fn fixed_point_taps(len: usize, n: usize) -> Vec<(usize, Vec<i64>)> {
    let cubic = |x: f64| {
        let (a, x) = (-0.5, x.abs());
        if x < 1.0 {
            ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
        } else if x < 2.0 {
            (((x - 5.0) * x + 8.0) * x - 4.0) * a
        } else {
            0.0
        }
    };
    let scale = len as f64 / n as f64;
    let filterscale = scale.max(1.0);
    let (support, ss) = (2.0 * filterscale, 1.0 / filterscale);
    (0..n)
        .map(|i| {
            let center = (i as f64 + 0.5) * scale;
            let lo = ((center - support + 0.5) as i64).max(0) as usize;
            let hi = ((center + support + 0.5) as i64).min(len as i64) as usize;
            let w: Vec<f64> = (lo..hi)
                .map(|x| cubic((x as f64 - center + 0.5) * ss))
                .collect();
            let total: f64 = w.iter().sum();
            let fixed = w
                .iter()
                .map(|&v| {
                    let v =
                        if total != 0.0 { v / total } else { v } * (1u64 << PRECISION_BITS) as f64;
                    (if v < 0.0 { v - 0.5 } else { v + 0.5 }) as i64
                })
                .collect();
            (lo, fixed)
        })
        .collect()
}

/// An 8-bit image of pixels `[3, H, W]` in [0, 1] (clamped, rounded).
pub fn to_rgb_image(pixels: &Tensor) -> Result<image::RgbImage, ModelError> {
    let (_, h, w) = pixels.size3()?;
    let data: Vec<u8> = Vec::try_from(
        (pixels
            .to_device(tch::Device::Cpu)
            .to_kind(Kind::Float)
            .clamp(0.0, 1.0)
            * 255.0)
            .round()
            .to_kind(Kind::Uint8)
            .permute([1, 2, 0])
            .contiguous()
            .reshape([-1]),
    )?;
    image::RgbImage::from_raw(w as u32, h as u32, data)
        .ok_or_else(|| ModelError::from("pixel buffer does not match the image size"))
}

/// PNG bytes of pixels `[3, H, W]` in [0, 1].
pub fn png_bytes(pixels: &Tensor) -> Result<Vec<u8>, ModelError> {
    let mut out = std::io::Cursor::new(Vec::new());
    to_rgb_image(pixels)?
        .write_to(&mut out, image::ImageFormat::Png)
        .map_err(|e| ModelError::from(e.to_string()))?;
    Ok(out.into_inner())
}
