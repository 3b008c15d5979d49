//! diffusers `models/resnet.py`: `ResnetBlock2D`, `Downsample2D`, `Upsample2D`.

use tch::nn::{self, Module};
use tch::Tensor;

pub(crate) fn group_norm(p: nn::Path, groups: i64, c: i64, eps: f64) -> nn::GroupNorm {
    nn::group_norm(
        p,
        groups,
        c,
        nn::GroupNormConfig {
            eps,
            ..Default::default()
        },
    )
}

pub(crate) fn conv3(p: nn::Path, i: i64, o: i64) -> nn::Conv2D {
    nn::conv2d(
        p,
        i,
        o,
        3,
        nn::ConvConfig {
            padding: 1,
            ..Default::default()
        },
    )
}

pub(crate) fn conv1(p: nn::Path, i: i64, o: i64) -> nn::Conv2D {
    nn::conv2d(p, i, o, 1, Default::default())
}

/// `ResnetBlock2D` with the default time-embedding norm (added after conv1) and output scale 1.
#[derive(Debug)]
pub struct ResnetBlock2D {
    norm1: nn::GroupNorm,
    conv1: nn::Conv2D,
    time_emb_proj: Option<nn::Linear>,
    norm2: nn::GroupNorm,
    conv2: nn::Conv2D,
    conv_shortcut: Option<nn::Conv2D>,
}

impl ResnetBlock2D {
    pub fn new(p: nn::Path, i: i64, o: i64, temb: Option<i64>, groups: i64, eps: f64) -> Self {
        ResnetBlock2D {
            norm1: group_norm(&p / "norm1", groups, i, eps),
            conv1: conv3(&p / "conv1", i, o),
            time_emb_proj: temb.map(|t| nn::linear(&p / "time_emb_proj", t, o, Default::default())),
            norm2: group_norm(&p / "norm2", groups, o, eps),
            conv2: conv3(&p / "conv2", o, o),
            conv_shortcut: (i != o).then(|| conv1(&p / "conv_shortcut", i, o)),
        }
    }

    pub fn forward(&self, x: &Tensor, temb: Option<&Tensor>) -> Tensor {
        let h = self.conv1.forward(&self.norm1.forward(x).silu());
        let h = match (&self.time_emb_proj, temb) {
            (Some(proj), Some(t)) => h + proj.forward(&t.silu()).unsqueeze(-1).unsqueeze(-1),
            _ => h,
        };
        let h = self.conv2.forward(&self.norm2.forward(&h).silu());
        match &self.conv_shortcut {
            Some(c) => c.forward(x) + h,
            None => x + h,
        }
    }
}

/// `Downsample2D` with a convolution: stride 2, padding 1 (UNet) or an explicit (0, 1, 0, 1) pad (VAE).
#[derive(Debug)]
pub struct Downsample2D {
    conv: nn::Conv2D,
    pad_right_bottom: bool,
}

impl Downsample2D {
    pub fn new(p: nn::Path, c: i64, padding: i64) -> Self {
        let conv = nn::conv2d(
            &p / "conv",
            c,
            c,
            3,
            nn::ConvConfig {
                stride: 2,
                padding,
                ..Default::default()
            },
        );
        Downsample2D {
            conv,
            pad_right_bottom: padding == 0,
        }
    }
}

impl Module for Downsample2D {
    fn forward(&self, x: &Tensor) -> Tensor {
        if self.pad_right_bottom {
            self.conv.forward(&x.constant_pad_nd([0, 1, 0, 1]))
        } else {
            self.conv.forward(x)
        }
    }
}

/// `Upsample2D`: nearest ×2 (or to an explicit size), then a 3×3 convolution.
#[derive(Debug)]
pub struct Upsample2D {
    conv: nn::Conv2D,
}

impl Upsample2D {
    pub fn new(p: nn::Path, c: i64) -> Self {
        Upsample2D {
            conv: conv3(&p / "conv", c, c),
        }
    }

    pub fn forward(&self, x: &Tensor, size: Option<(i64, i64)>) -> Tensor {
        let (h, w) = size.unwrap_or((x.size()[2] * 2, x.size()[3] * 2));
        self.conv.forward(&x.upsample_nearest2d([h, w], None, None))
    }
}
