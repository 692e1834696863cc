//! kohya's module names: a prefix and the layer's path in kohya's own
//! model, dots turned to underscores (`networks/lora.py`). kohya's SD1/SD2
//! UNet uses diffusers' paths; its SDXL UNet is SGM's (`input_blocks`,
//! `middle_block`, `output_blocks`), as are the files A1111 and ComfyUI
//! read, and its two SDXL text encoders are `lora_te1_` / `lora_te2_`.
use anyhow::Result;

use super::Component;
use crate::loaders::ldm_names::{unet_ldm_name, UnetLayout};
use crate::models::config::UNetConfig;

/// How kohya names the layers of one model.
#[derive(Clone, Debug)]
pub enum KohyaNames {
    /// SD1/SD2: `lora_unet_down_blocks_1_attentions_0_...`, `lora_te_`.
    Diffusers,
    /// SDXL: `lora_unet_input_blocks_4_1_...` (SGM block paths of this
    /// layout), `lora_te1_` for the first text encoder.
    Sgm(UnetLayout),
}

impl KohyaNames {
    /// SGM names for UNets with SDXL's added text/time embedding (kohya's
    /// SDXL network), diffusers' for the rest.
    pub fn of(unet: &UNetConfig) -> Result<Self> {
        Ok(if unet.takes_text_time() { KohyaNames::Sgm(UnetLayout::of(unet)?) } else { KohyaNames::Diffusers })
    }

    /// The kohya module name of `component` layer `layer` (a diffusers
    /// path such as `down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_q`);
    /// `None` for a layer kohya's SDXL UNet has no place for.
    pub fn name(&self, component: Component, layer: &str) -> Option<String> {
        let path = match (self, component) {
            (KohyaNames::Sgm(layout), Component::Unet) => {
                let sgm = unet_ldm_name(&format!("{layer}.weight"), layout)?;
                sgm.strip_suffix(".weight")?.to_string()
            }
            _ => layer.to_string(),
        };
        let prefix = match (self, component) {
            (_, Component::Unet) => "lora_unet_",
            (KohyaNames::Diffusers, Component::TextEncoder) => "lora_te_",
            (KohyaNames::Sgm(_), Component::TextEncoder) => "lora_te1_",
            (_, Component::TextEncoder2) => "lora_te2_",
        };
        Some(format!("{prefix}{}", path.replace('.', "_")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sdxl() -> KohyaNames {
        // SDXL base: two layers per block, up blocks CrossAttn, CrossAttn, UpBlock2D.
        KohyaNames::Sgm(UnetLayout { layers_per_block: 2, up_attention: vec![true, true, false] })
    }

    #[test]
    fn sdxl_unet_layers_get_sgm_block_paths() {
        let n = sdxl();
        let unet = |layer: &str| n.name(Component::Unet, layer).unwrap();
        // diffusers' down_blocks.i.attentions.j -> input_blocks.{3i+j+1}.1 (DESIGN.md §4b).
        assert_eq!(
            unet("down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_q"),
            "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_q"
        );
        assert_eq!(
            unet("down_blocks.2.attentions.1.transformer_blocks.9.attn1.to_out.0"),
            "lora_unet_input_blocks_8_1_transformer_blocks_9_attn1_to_out_0"
        );
        assert_eq!(unet("mid_block.attentions.0.proj_in"), "lora_unet_middle_block_1_proj_in");
        // up_blocks.i.attentions.j -> output_blocks.{3i+j}.1.
        assert_eq!(
            unet("up_blocks.0.attentions.2.transformer_blocks.3.ff.net.0.proj"),
            "lora_unet_output_blocks_2_1_transformer_blocks_3_ff_net_0_proj"
        );
        assert_eq!(unet("up_blocks.1.attentions.0.proj_out"), "lora_unet_output_blocks_3_1_proj_out");
        assert_eq!(unet("down_blocks.1.resnets.1.time_emb_proj"), "lora_unet_input_blocks_5_0_emb_layers_1");
        assert_eq!(n.name(Component::TextEncoder, "text_model.encoder.layers.0.self_attn.q_proj").unwrap(),
            "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"
        );
    }

    #[test]
    fn sd_layers_keep_diffusers_paths() {
        let n = KohyaNames::Diffusers;
        assert_eq!(
            n.name(Component::Unet, "up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_out.0").unwrap(),
            "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn2_to_out_0"
        );
        assert_eq!(n.name(Component::TextEncoder, "text_model.encoder.layers.0.mlp.fc1").unwrap(),
            "lora_te_text_model_encoder_layers_0_mlp_fc1"
        );
    }
}
