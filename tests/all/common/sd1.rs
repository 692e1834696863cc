//! The tiny SD1 fixture model and its UNet on the inputs of
//! reference/unet_sd1.safetensors, for the LoRA/LoCon/DoRA tests.
use sdtune::models::conditioning::Conditioning;
use sdtune::models::stable_diffusion::{Placement, StableDiffusion};
use tch::Tensor;

/// tests/fixtures/tiny-sd1 on the CPU in fp32.
pub fn model() -> StableDiffusion {
    StableDiffusion::from_diffusers_folder(&super::fixtures().join("tiny-sd1"), Placement::cpu_f32(), None).unwrap()
}

/// The UNet output of `m` on the reference sample, timesteps and text states.
pub fn unet_out(m: &StableDiffusion) -> Tensor {
    let r = super::read_tensors(&super::reference("unet_sd1.safetensors"));
    let context = Conditioning::text_only(r["encoder_hidden_states"].shallow_clone());
    tch::no_grad(|| m.unet.model.forward(&r["sample"], &r["timestep"], &context))
}
