//! LoRA training: optimizer, schedules, precision policy, checkpoints, loop.
pub mod lr;
pub mod optimizer;
pub mod precision;
pub mod checkpoint;
pub mod data;
pub mod trainer;
pub mod metadata;
pub mod run;
pub mod sync;
pub mod config;
pub mod cache_data;
pub mod trainable;
pub mod text_encoder;
