//! diffusers' VAE `Encoder`: image -> `2 * latent_channels` moments.
use tch::Tensor;

use super::blocks::{Downsample, MidBlock, ResnetBlock, EPS};
use crate::models::config::VaeConfig;
use crate::models::layers::{Conv2d, ConvConfig, GroupNorm, Vb};

/// `DownEncoderBlock2D`: `layers_per_block` resnets, then a 2x downsample
/// except in the last block.
struct DownBlock {
    resnets: Vec<ResnetBlock>,
    downsample: Option<Downsample>,
}

impl DownBlock {
    fn new(vb: Vb, in_channels: i64, out_channels: i64, cfg: &VaeConfig, last: bool) -> Self {
        let resnets = (0..cfg.layers_per_block)
            .map(|j| {
                let from = if j == 0 { in_channels } else { out_channels };
                ResnetBlock::new(vb.pp("resnets").pp(j), from, out_channels, cfg.norm_num_groups)
            })
            .collect();
        let downsample = (!last).then(|| Downsample::new(vb.pp("downsamplers").pp(0), out_channels));
        DownBlock { resnets, downsample }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let x = self.resnets.iter().fold(x.shallow_clone(), |x, r| r.forward(&x));
        match &self.downsample {
            Some(down) => down.forward(&x),
            None => x,
        }
    }
}

pub struct Encoder {
    conv_in: Conv2d,
    down_blocks: Vec<DownBlock>,
    mid_block: MidBlock,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Encoder {
    pub fn new(vb: Vb, cfg: &VaeConfig) -> Self {
        let channels = &cfg.block_out_channels;
        let top = *channels.last().expect("VaeConfig::check ensures block_out_channels is not empty");
        let down_blocks = channels
            .iter()
            .enumerate()
            .map(|(i, &out)| {
                let from = if i == 0 { channels[0] } else { channels[i - 1] };
                DownBlock::new(vb.pp("down_blocks").pp(i), from, out, cfg, i + 1 == channels.len())
            })
            .collect();
        Encoder {
            conv_in: vb.pp("conv_in").conv2d(cfg.in_channels, channels[0], 3, ConvConfig::same(3)),
            down_blocks,
            mid_block: MidBlock::new(vb.pp("mid_block"), top, cfg.norm_num_groups, cfg.mid_block_add_attention),
            conv_norm_out: vb.pp("conv_norm_out").group_norm(cfg.norm_num_groups, top, EPS),
            // `double_z`: mean and log-variance for each latent channel.
            conv_out: vb.pp("conv_out").conv2d(top, 2 * cfg.latent_channels, 3, ConvConfig::same(3)),
        }
    }

    pub fn forward(&self, images: &Tensor) -> Tensor {
        let x = self.conv_in.forward(images);
        let x = self.down_blocks.iter().fold(x, |x, block| block.forward(&x));
        let x = self.mid_block.forward(&x);
        self.conv_out.forward(&self.conv_norm_out.forward(&x).silu())
    }
}
