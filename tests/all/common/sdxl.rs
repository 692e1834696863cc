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
