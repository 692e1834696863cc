//! Rendering images: the sampling pipeline, grids, the settings each PNG
//! carries, and consistency figures against the brand set.
pub mod brand_palette;
pub mod class_images;
pub mod concept_figures;
pub mod drift;
pub mod grid;
pub mod image_out;
pub mod limits;
pub mod metrics;
pub mod pipeline;
pub mod render;
pub mod session;
pub mod settings;
