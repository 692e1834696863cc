//! One file per command: parse nothing, call the library, print results.
pub mod doctor;
pub mod info;
pub mod prepare;
pub mod sample;
pub mod train;
