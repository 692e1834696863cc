//! Rendering images: the sampling pipeline and image output.
pub mod grid;
pub mod image_out;
pub mod pipeline;
