//! Where weights come from: diffusers folders, single-file checkpoints,
//! the Hugging Face cache, the built-in model, and the safetensors files
//! under all of them. Loaders know files; the architectures they fill are
//! in `crate::models`.
pub mod builtin;
pub mod bundled_tokenizer;
pub mod file_kind;
pub mod folder;
pub mod hub;
pub mod ldm_names;
pub mod model_files;
pub mod single_file;
pub mod source;
pub mod tensor_file;
pub mod vae_file;
pub mod weights;
