//! sdtune: fine-tune Stable Diffusion on a brand's own image set.
//!
//! Data flows one way: data -> cache -> train -> LoRA file -> sample.
//! Models know nothing of datasets; schedulers know nothing of models.
pub mod bench;
pub mod cli;
pub mod commands;
pub mod config;
pub mod errors;
pub mod data;
pub mod fsutil;
pub mod interrupt;
pub mod lora;
pub mod loaders;
pub mod lock;
pub mod matmul_probe;
pub mod models;
pub mod progress;
pub mod ranges;
pub mod report;
pub mod pick;
pub mod runtime;
pub mod sample;
pub mod scratch;
pub mod schedulers;
pub mod serve;
pub mod train;
