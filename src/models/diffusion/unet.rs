//! diffusers `UNet2DConditionModel` (`models/unets/unet_2d_condition.py`) with its blocks
//! (`unet_2d_blocks.py`: `CrossAttnDownBlock2D`, `DownBlock2D`, `UNetMidBlock2DCrossAttn`, `UpBlock2D`,
//! `CrossAttnUpBlock2D`), for SD 1.x/2.x configurations.

use tch::nn::{self, Module};
use tch::Tensor;

use super::attention::{timestep_embedding, Transformer2D};
use super::resnet::{conv3, group_norm, Downsample2D, ResnetBlock2D, Upsample2D};
use crate::config::UNetConfig;

const EPS: f64 = 1e-5;

#[derive(Debug)]
struct Block {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2D>,
    down: Option<Downsample2D>,
    up: Option<Upsample2D>,
}

#[derive(Debug)]
pub struct UNet2DCondition {
    conv_in: nn::Conv2D,
    time_linear_1: nn::Linear,
    time_linear_2: nn::Linear,
    down: Vec<Block>,
    mid_resnets: Vec<ResnetBlock2D>,
    mid_attention: Transformer2D,
    up: Vec<Block>,
    norm_out: nn::GroupNorm,
    conv_out: nn::Conv2D,
    c0: i64,
}

impl UNet2DCondition {
    /// Builds under `p` (the root of a diffusers `unet/` checkpoint; `unet.` in a whole pipeline).
    pub fn new(p: &nn::Path, u: &UNetConfig) -> Self {
        let ch = &u.block_out_channels;
        let (c0, n, g, lpb) = (ch[0], ch.len(), u.norm_num_groups, u.layers_per_block);
        let temb = 4 * c0;
        let attn = |q: nn::Path, c: i64, heads: i64| {
            Transformer2D::new(
                q,
                c,
                u.cross_attention_dim,
                heads,
                u.transformer_layers_per_block,
                g,
                u.use_linear_projection,
            )
        };
        let mut down = Vec::with_capacity(n);
        let mut prev = c0;
        for (i, t) in u.down_block_types.iter().enumerate() {
            let bp = p / "down_blocks" / i;
            let out = ch[i];
            let cross = t.starts_with("CrossAttn");
            let resnets = (0..lpb)
                .map(|j| {
                    ResnetBlock2D::new(
                        &bp / "resnets" / j,
                        if j == 0 { prev } else { out },
                        out,
                        Some(temb),
                        g,
                        EPS,
                    )
                })
                .collect();
            let attentions = if cross {
                (0..lpb)
                    .map(|j| attn(&bp / "attentions" / j, out, u.attention_head_dim[i]))
                    .collect()
            } else {
                Vec::new()
            };
            let down_s = (i + 1 < n).then(|| Downsample2D::new(&bp / "downsamplers" / 0, out, 1));
            down.push(Block {
                resnets,
                attentions,
                down: down_s,
                up: None,
            });
            prev = out;
        }
        let last = ch[n - 1];
        let mp = p / "mid_block";
        let mid_resnets = (0..2)
            .map(|j| ResnetBlock2D::new(&mp / "resnets" / j, last, last, Some(temb), g, EPS))
            .collect();
        let mid_attention = attn(&mp / "attentions" / 0, last, u.attention_head_dim[n - 1]);
        let rev: Vec<i64> = ch.iter().rev().copied().collect();
        let rev_heads: Vec<i64> = u.attention_head_dim.iter().rev().copied().collect();
        let mut up = Vec::with_capacity(n);
        let mut prev_out = rev[0];
        for (i, t) in u.up_block_types.iter().enumerate() {
            let bp = p / "up_blocks" / i;
            let out = rev[i];
            let input = rev[(i + 1).min(n - 1)];
            let cross = t.starts_with("CrossAttn");
            let resnets = (0..=lpb)
                .map(|j| {
                    let skip = if j == lpb { input } else { out };
                    let res_in = if j == 0 { prev_out } else { out };
                    ResnetBlock2D::new(&bp / "resnets" / j, res_in + skip, out, Some(temb), g, EPS)
                })
                .collect();
            let attentions = if cross {
                (0..=lpb)
                    .map(|j| attn(&bp / "attentions" / j, out, rev_heads[i]))
                    .collect()
            } else {
                Vec::new()
            };
            let up_s = (i + 1 < n).then(|| Upsample2D::new(&bp / "upsamplers" / 0, out));
            up.push(Block {
                resnets,
                attentions,
                down: None,
                up: up_s,
            });
            prev_out = out;
        }
        UNet2DCondition {
            conv_in: conv3(p / "conv_in", u.in_channels, c0),
            time_linear_1: nn::linear(
                p / "time_embedding" / "linear_1",
                c0,
                temb,
                Default::default(),
            ),
            time_linear_2: nn::linear(
                p / "time_embedding" / "linear_2",
                temb,
                temb,
                Default::default(),
            ),
            down,
            mid_resnets,
            mid_attention,
            up,
            norm_out: group_norm(p / "conv_norm_out", g, c0, EPS),
            conv_out: conv3(p / "conv_out", c0, u.out_channels),
            c0,
        }
    }

    /// Noise (or v) prediction for latents `sample` [B, C, H, W] at `timesteps` [B] (or a scalar
    /// broadcast to the batch) with context `encoder_hidden_states` [B, M, cross_attention_dim].
    pub fn forward(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        encoder_hidden_states: &Tensor,
    ) -> Tensor {
        let b = sample.size()[0];
        let t = if timesteps.dim() == 0 {
            timesteps.expand([b], false)
        } else {
            timesteps.shallow_clone()
        };
        // The caller's latents stay in its precision (the scheduler maths are fp32); the UNet computes
        // in its weights' dtype and answers in the caller's.
        let (out_kind, kind) = (sample.kind(), self.conv_in.ws.kind());
        // The sinusoidal embedding is computed in fp32 (t up to 1000), then cast.
        let temb = timestep_embedding(&t, self.c0).to_kind(kind);
        let temb = self
            .time_linear_2
            .forward(&self.time_linear_1.forward(&temb).silu());
        let ctx = &encoder_hidden_states.to_kind(kind);

        let mut h = self.conv_in.forward(&sample.to_kind(kind));
        let mut skips = vec![h.shallow_clone()];
        for blk in &self.down {
            for (j, r) in blk.resnets.iter().enumerate() {
                h = r.forward(&h, Some(&temb));
                if let Some(a) = blk.attentions.get(j) {
                    h = a.forward(&h, ctx);
                }
                skips.push(h.shallow_clone());
            }
            if let Some(d) = &blk.down {
                h = d.forward(&h);
                skips.push(h.shallow_clone());
            }
        }
        h = self.mid_resnets[0].forward(&h, Some(&temb));
        h = self.mid_attention.forward(&h, ctx);
        h = self.mid_resnets[1].forward(&h, Some(&temb));
        for blk in &self.up {
            for (j, r) in blk.resnets.iter().enumerate() {
                let skip = skips.pop().expect("one skip per up resnet");
                h = r.forward(&Tensor::cat(&[&h, &skip], 1), Some(&temb));
                if let Some(a) = blk.attentions.get(j) {
                    h = a.forward(&h, ctx);
                }
            }
            if let Some(u) = &blk.up {
                // Upsample to the next skip's size, so odd latent sizes work as in diffusers.
                let size = skips.last().map(|s| (s.size()[2], s.size()[3]));
                h = u.forward(&h, size);
            }
        }
        self.conv_out
            .forward(&self.norm_out.forward(&h).silu())
            .to_kind(out_kind)
    }

    /// Checkpoint rules over the module's names (`unet.…`; a diffusers `unet/` folder's root names and
    /// DEEM's `image_decoder.unet.` are mapped onto them by [`crate::models::pretrained`]).
    pub fn load_spec() -> crate::checkpoint::LoadSpec {
        crate::checkpoint::LoadSpec {
            component: "unet".into(),
            namespace: vec!["unet.".into()],
            ignore: vec![],
            optional: vec![],
        }
    }
}
