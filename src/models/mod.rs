//! Stable Diffusion's architectures in tch, each layer built by its
//! diffusers weight name and sized from its `config.json`. Where weights
//! come from is `crate::loaders`' business, not this module's.
pub mod built;
pub mod channels_last;
pub mod clip;
pub mod conditioning;
pub mod config;
pub mod conv;
pub mod finite;
pub mod flop_count;
pub mod gradient_checkpoint;
pub mod layers;
pub mod onednn;
pub mod stable_diffusion;
pub mod text_stack;
pub mod tokenizer;
pub mod unet;
pub mod vae;
