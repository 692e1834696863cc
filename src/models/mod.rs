//! Stable Diffusion's components in tch, each layer built by its diffusers
//! weight name and sized from its `config.json`.
pub mod builtin;
pub mod clip;
pub mod config;
pub mod conv;
pub mod hub;
pub mod layers;
pub mod load;
pub mod single_file;
pub mod source;
pub mod stable_diffusion;
pub mod tensor_file;
pub mod tokenizer;
pub mod unet;
pub mod vae;
