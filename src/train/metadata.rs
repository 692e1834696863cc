//! The header metadata A1111, ComfyUI and kohya tools read from a LoRA:
//! kohya's `ss_*` training settings and the `modelspec.*` keys.
use std::collections::HashMap;

use crate::models::config::{Prediction, UNetConfig};

/// kohya's `ss_base_model_version`: sd_v1, sd_v2, sd_v2_v or (a UNet
/// with SDXL's added text/time embedding) sdxl_base_v1-0.
pub fn base_model_version(unet: &UNetConfig, prediction: Prediction) -> &'static str {
    if unet.takes_text_time() {
        return SDXL_BASE;
    }
    let width = unet.cross_attention_dims().first().copied().unwrap_or(768);
    match (width >= 1024, prediction) {
        (false, _) => "sd_v1",
        (true, Prediction::V) => "sd_v2_v",
        (true, _) => "sd_v2",
    }
}

/// kohya's `MODEL_VERSION_SDXL_BASE_V1_0`.
const SDXL_BASE: &str = "sdxl_base_v1-0";

/// modelspec's architecture id for that base.
pub fn modelspec_architecture(version: &str) -> &'static str {
    match version {
        SDXL_BASE => "stable-diffusion-xl-v1-base/lora",
        "sd_v2_v" => "stable-diffusion-v2-768-v/lora",
        "sd_v2" => "stable-diffusion-v2-512/lora",
        _ => "stable-diffusion-v1/lora",
    }
}

/// What a finished or in-progress run records in its LoRA files.
pub struct RunFacts<'a> {
    pub name: &'a str,
    pub unet: &'a UNetConfig,
    pub prediction: Prediction,
    pub rank: i64,
    pub alpha: f64,
    pub steps: u64,
    pub total_steps: u64,
    pub lr: f64,
    pub lr_schedule: &'a str,
    pub batch_size: usize,
    pub grad_accum: usize,
    pub resolution: u32,
    pub seed: u64,
    pub precision: &'a str,
    pub targets: &'a str,
    pub num_images: usize,
    pub noise_offset: f64,
    pub min_snr_gamma: Option<f64>,
    pub gradient_checkpointing: bool,
    pub base_model: &'a str,
    /// The text encoders' learning rate, when their LoRA trained too.
    pub text_encoder_lr: Option<f64>,
    /// DoRA modules (kohya's `dora_wd` network argument).
    pub dora: bool,
}

/// The base model as a LoRA file names it: the file or folder name of a
/// local model (as kohya's `os.path.basename`: the user's folders stay on
/// their machine), `sdtune-tiny-sd` for the built-in one, a Hub id as it is.
pub fn shared_model_name(spec: &str) -> String {
    let path = std::path::Path::new(spec);
    if crate::loaders::builtin::is_builtin(spec) {
        crate::loaders::builtin::SPEC.to_string()
    } else if path.exists() {
        path.file_name().map_or_else(|| spec.to_string(), |n| n.to_string_lossy().into_owned())
    } else {
        spec.to_string()
    }
}

pub fn lora_metadata(f: &RunFacts) -> HashMap<String, String> {
    let version = base_model_version(f.unet, f.prediction);
    let mut m = HashMap::new();
    let mut put = |k: &str, v: String| {
        m.insert(k.to_string(), v);
    };
    put("ss_network_module", "networks.lora".into());
    put("ss_network_dim", f.rank.to_string());
    put("ss_network_alpha", trim_float(f.alpha));
    put("ss_base_model_version", version.into());
    put("ss_v2", version.starts_with("sd_v2").to_string());
    put("ss_output_name", f.name.into());
    put("ss_steps", f.steps.to_string());
    put("ss_max_train_steps", f.total_steps.to_string());
    put("ss_learning_rate", f.lr.to_string());
    put("ss_unet_lr", f.lr.to_string());
    put("ss_text_encoder_lr", f.text_encoder_lr.map_or("0".into(), |lr| lr.to_string()));
    put("ss_network_train_unet_only", f.text_encoder_lr.is_none().to_string());
    put("ss_lr_scheduler", f.lr_schedule.into());
    put("ss_batch_size_per_device", f.batch_size.to_string());
    put("ss_gradient_accumulation_steps", f.grad_accum.to_string());
    put("ss_resolution", format!("({}, {})", f.resolution, f.resolution));
    put("ss_seed", f.seed.to_string());
    put("ss_mixed_precision", f.precision.into());
    put("ss_num_train_images", f.num_images.to_string());
    put("ss_noise_offset", f.noise_offset.to_string());
    put("ss_min_snr_gamma", f.min_snr_gamma.map_or("None".into(), |g| g.to_string()));
    put("ss_gradient_checkpointing", f.gradient_checkpointing.to_string());
    put("ss_sd_model_name", shared_model_name(f.base_model));
    let args = if f.dora { serde_json::json!({ "targets": f.targets, "dora_wd": "True" }) } else { serde_json::json!({ "targets": f.targets }) };
    put("ss_network_args", args.to_string());
    put("ss_training_comment", "trained with sdtune".into());
    put("modelspec.sai_model_spec", "1.0.0".into());
    put("modelspec.architecture", modelspec_architecture(version).into());
    // kohya's sai_model_spec: an SDXL LoRA is Stability AI's (SGM) layout.
    let implementation = if version == SDXL_BASE { "https://github.com/Stability-AI/generative-models" } else { "diffusers" };
    put("modelspec.implementation", implementation.into());
    put("modelspec.title", f.name.into());
    put("modelspec.resolution", format!("{}x{}", f.resolution, f.resolution));
    put(
        "modelspec.prediction_type",
        match f.prediction {
            Prediction::V => "v".into(),
            _ => "epsilon".into(),
        },
    );
    m
}

fn trim_float(v: f64) -> String {
    if v.fract() == 0.0 {
        format!("{v:.1}")
    } else {
        v.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::shared_model_name;

    #[test]
    fn lora_files_name_the_base_without_local_folders() {
        let dir = crate::scratch::ScratchDir::new().unwrap();
        let model = dir.path().join("acme-sd15.safetensors");
        std::fs::write(&model, b"").unwrap();
        assert_eq!(shared_model_name(&model.to_string_lossy()), "acme-sd15.safetensors");
        assert_eq!(shared_model_name("runwayml/stable-diffusion-v1-5"), "runwayml/stable-diffusion-v1-5");
    }
}
