//! The tiny SDXL fixture model and its UNet on the inputs of
//! reference/sdxl/unet.safetensors.
use sdtune::models::conditioning::Conditioning;
use sdtune::models::stable_diffusion::{Placement, StableDiffusion};
use tch::Tensor;

/// The prompt make_te_lora_cases.py's `encode` (which the SDXL text-encoder
/// references use) gives diffusers' `encode_prompt`.
pub const TE_PROMPT: &str = "an orange acme poster with a blue circle 3";

/// tests/fixtures/tiny-sdxl on the CPU in fp32.
pub fn model() -> StableDiffusion {
    StableDiffusion::from_diffusers_folder(&super::fixtures().join("tiny-sdxl"), Placement::cpu_f32(), None).unwrap()
}

/// The UNet output of `m` on the reference sample, timesteps, text states,
/// pooled embedding and time ids.
pub fn unet_out(m: &StableDiffusion) -> Tensor {
    let r = super::read_tensors(&super::reference("sdxl/unet.safetensors"));
    let cond = Conditioning {
        text: r["encoder_hidden_states"].shallow_clone(),
        pooled: Some(r["text_embeds"].shallow_clone()),
        time_ids: Some(r["time_ids"].shallow_clone()),
    };
    tch::no_grad(|| m.unet.model.forward(&r["sample"], &r["timestep"], &cond))
}

/// `sdtune sample` of tiny-sdxl on the CPU, rendered as
/// make_sdxl_te_adapter_samples.py's `render` (prompt, negative prompt, seed 7, 10 Euler
/// steps, guidance 5, 64x64), with `loras` (each `FILE[:STRENGTH]`); the PNG as
/// [64, 64, 3] pixels of 0-255.
pub fn render_with(loras: &[String], fuse: bool, out: &std::path::Path) -> tch::Tensor {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_sdtune"));
    cmd.args(["sample", "--device", "cpu", "--model"])
        .arg(super::fixtures().join("tiny-sdxl"))
        .args(["--prompt", "a red car parked in front of a modern glass building", "--negative-prompt", "blurry, low quality"])
        .args(["--seed", "7", "--steps", "10", "--guidance", "5", "--width", "64", "--height", "64", "--scheduler", "euler"]);
    for lora in loras {
        cmd.arg("--lora").arg(lora);
    }
    if fuse {
        cmd.arg("--fuse");
    }
    let run = cmd.arg("--out").arg(out).output().unwrap();
    assert!(run.status.success(), "{loras:?}: {}", String::from_utf8_lossy(&run.stderr));
    let image = super::read_rgb(out);
    tch::Tensor::from_slice(image.as_raw()).view([64, 64, 3]).to_kind(tch::Kind::Double)
}
