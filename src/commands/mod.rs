//! One file per command: parse nothing, call the library, print results.
pub mod bench;
pub mod doctor;
pub mod info;
pub mod lora;
pub mod model_args;
pub mod pick;
pub mod prepare;
pub mod report;
pub mod sample;
pub mod serve;
pub mod train;
