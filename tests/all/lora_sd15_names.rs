//! On a random-weight full-size SD1.5 UNet, the default targets give exactly
//! the 64 cross-attention modules, written with the names A1111 expects.
use sdtune::lora::format::{self, LoraFormat};
use sdtune::lora::kohya_names::KohyaNames;
use sdtune::lora::network::{DownInit, LoraNetwork};
use sdtune::lora::targets::Targets;
use sdtune::models::config::UNetConfig;
use sdtune::models::layers::WeightInit;
use sdtune::models::built::build;
use sdtune::loaders::tensor_file::TensorFile;
use sdtune::models::unet::UNet2DConditionModel;
use tch::{Device, Kind};

/// The 16 transformer blocks of SD1.5 in diffusers naming.
fn transformer_paths() -> Vec<String> {
    let mut paths = Vec::new();
    for block in 0..3 {
        for attn in 0..2 {
            paths.push(format!("down_blocks_{block}_attentions_{attn}"));
        }
    }
    paths.push("mid_block_attentions_0".into());
    for block in 1..4 {
        for attn in 0..3 {
            paths.push(format!("up_blocks_{block}_attentions_{attn}"));
        }
    }
    paths
}

#[test]
fn sd15_kohya_file_holds_exactly_the_64_attn2_modules() {
    let _rng = crate::common::torch_rng();
    let cfg = UNetConfig::sd15();
    let unet = build(Device::Cpu, Kind::BFloat16, WeightInit::Zeros, |vb| UNet2DConditionModel::new(vb, &cfg)).unwrap();
    tch::manual_seed(0);
    let lora = LoraNetwork::inject(&unet.layers, Targets::CrossAttn, 16, 16.0, DownInit::KaimingUniform, Device::Cpu).unwrap();
    assert_eq!(lora.modules.len(), 64);

    let dir = sdtune::scratch::ScratchDir::new().unwrap();
    let path = dir.path().join("sd15.safetensors");
    format::write(&path, &lora.to_weights(), LoraFormat::Kohya, &KohyaNames::Diffusers, Default::default()).unwrap();
    let file = TensorFile::open(&path).unwrap();
    let mut names = file.names();
    names.sort();

    let mut want = Vec::new();
    for t in transformer_paths() {
        for proj in ["to_q", "to_k", "to_v", "to_out_0"] {
            let base = format!("lora_unet_{t}_transformer_blocks_0_attn2_{proj}");
            want.push(format!("{base}.alpha"));
            want.push(format!("{base}.lora_down.weight"));
            want.push(format!("{base}.lora_up.weight"));
        }
    }
    want.sort();
    assert_eq!(names, want);

    // Shapes: down [16, in], up [out, 16]; to_k/to_v read the 768-wide text features.
    let down = file.info("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight").unwrap();
    assert_eq!(down.shape, vec![16, 768]);
    let up = file.info("lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn2_to_out_0.lora_up.weight").unwrap();
    assert_eq!(up.shape, vec![320, 16]);
    let alpha = file.tensor("lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_q.alpha").unwrap();
    assert_eq!(alpha.size(), Vec::<i64>::new());
    assert_eq!(alpha.double_value(&[]), 16.0);
}
