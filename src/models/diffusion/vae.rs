//! diffusers `AutoencoderKL` (`models/autoencoders/autoencoder_kl.py`, `vae.py`): encoder → latent mean
//! and log-variance, decoder → pixels. Latents for the UNet are `mean × scaling_factor`.

use tch::nn::{self, Module};
use tch::Tensor;

use super::attention::Attention;
use super::resnet::{conv1, conv3, group_norm, Downsample2D, ResnetBlock2D, Upsample2D};
use crate::config::VaeConfig;

const EPS: f64 = 1e-6;

/// The mid block's single-head self-attention over the map, with its own GroupNorm and a residual.
#[derive(Debug)]
struct MapAttention {
    norm: nn::GroupNorm,
    attn: Attention,
}

impl MapAttention {
    fn new(p: nn::Path, c: i64, groups: i64) -> Self {
        MapAttention {
            norm: group_norm(&p / "group_norm", groups, c, EPS),
            attn: Attention::new(p, c, c, 1, c, true),
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let (b, c, h, w) = x.size4().expect("[B, C, H, W]");
        let s = self.norm.forward(x).view([b, c, h * w]).transpose(1, 2);
        let out = self
            .attn
            .forward(&s, None)
            .transpose(1, 2)
            .reshape([b, c, h, w]);
        out + x
    }
}

#[derive(Debug)]
struct Mid {
    r0: ResnetBlock2D,
    attn: MapAttention,
    r1: ResnetBlock2D,
}

impl Mid {
    fn new(p: nn::Path, c: i64, g: i64) -> Self {
        Mid {
            r0: ResnetBlock2D::new(&p / "resnets" / 0, c, c, None, g, EPS),
            attn: MapAttention::new(&p / "attentions" / 0, c, g),
            r1: ResnetBlock2D::new(&p / "resnets" / 1, c, c, None, g, EPS),
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        self.r1
            .forward(&self.attn.forward(&self.r0.forward(x, None)), None)
    }
}

/// A block's `n` resnets (no time embedding): the first maps `input` to `out` channels.
fn resnets(bp: &nn::Path, n: i64, input: i64, out: i64, groups: i64) -> Vec<ResnetBlock2D> {
    (0..n)
        .map(|j| {
            ResnetBlock2D::new(
                bp / "resnets" / j,
                if j == 0 { input } else { out },
                out,
                None,
                groups,
                EPS,
            )
        })
        .collect()
}

#[derive(Debug)]
pub struct AutoencoderKL {
    enc_conv_in: nn::Conv2D,
    enc_blocks: Vec<(Vec<ResnetBlock2D>, Option<Downsample2D>)>,
    enc_mid: Mid,
    enc_norm_out: nn::GroupNorm,
    enc_conv_out: nn::Conv2D,
    quant_conv: nn::Conv2D,
    post_quant_conv: nn::Conv2D,
    dec_conv_in: nn::Conv2D,
    dec_mid: Mid,
    dec_blocks: Vec<(Vec<ResnetBlock2D>, Option<Upsample2D>)>,
    dec_norm_out: nn::GroupNorm,
    dec_conv_out: nn::Conv2D,
    pub scaling_factor: f64,
}

impl AutoencoderKL {
    /// Builds under `p` (the root of a diffusers `vae/` checkpoint).
    pub fn new(p: &nn::Path, a: &VaeConfig) -> Self {
        let ch = &a.block_out_channels;
        let (g, lat, n) = (a.norm_num_groups, a.latent_channels, ch.len());
        let (c0, last) = (ch[0], ch[n - 1]);
        let e = p / "encoder";
        let mut prev = c0;
        let enc_blocks = ch
            .iter()
            .enumerate()
            .map(|(i, &out)| {
                let bp = &e / "down_blocks" / i;
                let res = resnets(&bp, a.layers_per_block, prev, out, g);
                prev = out;
                (
                    res,
                    (i + 1 < n).then(|| Downsample2D::new(&bp / "downsamplers" / 0, out, 0)),
                )
            })
            .collect();
        let d = p / "decoder";
        let mut prev = last;
        let dec_blocks = ch
            .iter()
            .rev()
            .enumerate()
            .map(|(i, &out)| {
                let bp = &d / "up_blocks" / i;
                let res = resnets(&bp, a.layers_per_block + 1, prev, out, g);
                prev = out;
                (
                    res,
                    (i + 1 < n).then(|| Upsample2D::new(&bp / "upsamplers" / 0, out)),
                )
            })
            .collect();
        AutoencoderKL {
            enc_conv_in: conv3(&e / "conv_in", a.in_channels, c0),
            enc_blocks,
            enc_mid: Mid::new(&e / "mid_block", last, g),
            enc_norm_out: group_norm(&e / "conv_norm_out", g, last, EPS),
            enc_conv_out: conv3(&e / "conv_out", last, 2 * lat),
            quant_conv: conv1(p / "quant_conv", 2 * lat, 2 * lat),
            post_quant_conv: conv1(p / "post_quant_conv", lat, lat),
            dec_conv_in: conv3(&d / "conv_in", lat, last),
            dec_mid: Mid::new(&d / "mid_block", last, g),
            dec_blocks,
            dec_norm_out: group_norm(&d / "conv_norm_out", g, c0, EPS),
            dec_conv_out: conv3(&d / "conv_out", c0, a.out_channels),
            scaling_factor: a.scaling_factor,
        }
    }

    /// Mean and log-variance of the latent distribution of images in [−1, 1].
    /// Computed in the weights' dtype, answered in the input's.
    pub fn encode(&self, pixels: &Tensor) -> (Tensor, Tensor) {
        let out_kind = pixels.kind();
        let mut h = self
            .enc_conv_in
            .forward(&pixels.to_kind(self.enc_conv_in.ws.kind()));
        for (res, down) in &self.enc_blocks {
            for r in res {
                h = r.forward(&h, None);
            }
            if let Some(d) = down {
                h = d.forward(&h);
            }
        }
        h = self.enc_mid.forward(&h);
        let moments = self.quant_conv.forward(
            &self
                .enc_conv_out
                .forward(&self.enc_norm_out.forward(&h).silu()),
        );
        let parts = moments.to_kind(out_kind).chunk(2, 1);
        (parts[0].shallow_clone(), parts[1].clamp(-30.0, 20.0))
    }

    /// Pixels in about [−1, 1] from (unscaled) latents; computed in the weights' dtype, answered in the
    /// input's.
    pub fn decode(&self, latents: &Tensor) -> Tensor {
        let out_kind = latents.kind();
        let latents = latents.to_kind(self.post_quant_conv.ws.kind());
        let mut h = self.dec_mid.forward(
            &self
                .dec_conv_in
                .forward(&self.post_quant_conv.forward(&latents)),
        );
        for (res, up) in &self.dec_blocks {
            for r in res {
                h = r.forward(&h, None);
            }
            if let Some(u) = up {
                h = u.forward(&h, None);
            }
        }
        self.dec_conv_out
            .forward(&self.dec_norm_out.forward(&h).silu())
            .to_kind(out_kind)
    }

    /// Checkpoint rules over the module's names (`vae.…`; a diffusers `vae/` folder's root names and
    /// DEEM's `image_decoder.vae.` are mapped onto them by [`crate::models::pretrained`]).
    pub fn load_spec() -> crate::checkpoint::LoadSpec {
        crate::checkpoint::LoadSpec {
            component: "vae".into(),
            namespace: vec!["vae.".into()],
            ignore: vec![],
            optional: vec![],
        }
    }
}
