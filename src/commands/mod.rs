//! One file per command: parse nothing, call the library, print results.
pub mod doctor;
pub mod prepare;
pub mod sample;
