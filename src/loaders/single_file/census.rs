//! Parameter counts of a single file by component (`sdtune info`).
use std::collections::BTreeMap;

use super::detect::{ignored_text_tensor, Layout, Shapes};
use crate::loaders::ldm_names::{EMA_PREFIX, UNET_PREFIX, VAE_PREFIX};
use crate::loaders::tensor_file::TensorFile;

/// Parameter counts of a single file by component (the text encoder counts
/// only what SD uses), and how many tensors each dtype holds.
#[derive(Clone, Debug, Default)]
pub struct Census {
    pub unet: i64,
    pub vae: i64,
    pub text_encoder: i64,
    pub ema: i64,
    pub other: i64,
    pub dtypes: BTreeMap<String, usize>,
}

pub fn census(file: &TensorFile, layout: &Layout) -> Census {
    let shapes = Shapes::of(file);
    let mut c = Census::default();
    for name in file.names() {
        let Some(info) = file.info(&name) else { continue };
        let n: i64 = info.shape.iter().map(|&d| d as i64).product();
        *c.dtypes.entry(format!("{:?}", info.dtype)).or_default() += 1;
        if name.starts_with(UNET_PREFIX) {
            c.unet += n;
        } else if name.starts_with(VAE_PREFIX) {
            c.vae += n;
        } else if name.starts_with("cond_stage_model.") || name.starts_with("conditioner.") {
            if !ignored_text_tensor(&name, layout, &shapes) {
                c.text_encoder += n;
            }
        } else if name.starts_with(EMA_PREFIX) {
            c.ema += n;
        } else {
            c.other += n;
        }
    }
    c
}
