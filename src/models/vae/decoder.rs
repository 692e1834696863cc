//! diffusers' VAE `Decoder`: latents -> image.
use tch::Tensor;

use super::blocks::{MidBlock, ResnetBlock, Upsample, EPS};
use crate::models::config::VaeConfig;
use crate::models::layers::{Conv2d, ConvConfig, GroupNorm, Vb};

/// `UpDecoderBlock2D`: `layers_per_block + 1` resnets, then a 2x upsample
/// except in the last block.
struct UpBlock {
    resnets: Vec<ResnetBlock>,
    upsample: Option<Upsample>,
}

impl UpBlock {
    fn new(vb: Vb, in_channels: i64, out_channels: i64, cfg: &VaeConfig, last: bool) -> Self {
        let resnets = (0..cfg.layers_per_block + 1)
            .map(|j| {
                let from = if j == 0 { in_channels } else { out_channels };
                ResnetBlock::new(vb.pp("resnets").pp(j), from, out_channels, cfg.norm_num_groups)
            })
            .collect();
        let upsample = (!last).then(|| Upsample::new(vb.pp("upsamplers").pp(0), out_channels));
        UpBlock { resnets, upsample }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let x = self.resnets.iter().fold(x.shallow_clone(), |x, r| r.forward(&x));
        match &self.upsample {
            Some(up) => up.forward(&x),
            None => x,
        }
    }
}

pub struct Decoder {
    conv_in: Conv2d,
    mid_block: MidBlock,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Decoder {
    pub fn new(vb: Vb, cfg: &VaeConfig) -> Self {
        // The decoder walks the encoder's channels backwards.
        let channels: Vec<i64> = cfg.block_out_channels.iter().rev().copied().collect();
        let top = channels[0];
        let bottom = *channels.last().expect("VaeConfig::check ensures block_out_channels is not empty");
        let up_blocks = channels
            .iter()
            .enumerate()
            .map(|(i, &out)| {
                let from = if i == 0 { top } else { channels[i - 1] };
                UpBlock::new(vb.pp("up_blocks").pp(i), from, out, cfg, i + 1 == channels.len())
            })
            .collect();
        Decoder {
            conv_in: vb.pp("conv_in").conv2d(cfg.latent_channels, top, 3, ConvConfig::same(3)),
            mid_block: MidBlock::new(vb.pp("mid_block"), top, cfg.norm_num_groups, cfg.mid_block_add_attention),
            up_blocks,
            conv_norm_out: vb.pp("conv_norm_out").group_norm(cfg.norm_num_groups, bottom, EPS),
            conv_out: vb.pp("conv_out").conv2d(bottom, cfg.out_channels, 3, ConvConfig::same(3)),
        }
    }

    pub fn forward(&self, latents: &Tensor) -> Tensor {
        let x = self.mid_block.forward(&self.conv_in.forward(latents));
        let x = self.up_blocks.iter().fold(x, |x, block| block.forward(&x));
        self.conv_out.forward(&self.conv_norm_out.forward(&x).silu())
    }
}
