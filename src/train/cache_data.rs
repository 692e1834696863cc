//! The prepare cache as training data.
use anyhow::Result;
use tch::Tensor;

use super::data::{TrainSample, TrainingData};
use crate::data::cache::CacheReader;

impl TrainingData for CacheReader {
    fn buckets(&self) -> Vec<Vec<usize>> {
        self.items_by_bucket()
    }

    fn sample(&self, index: usize, flip: bool) -> Result<TrainSample> {
        let (latent_mean, latent_std, text) = self.item(index, flip)?;
        Ok(TrainSample { latent_mean, latent_std, text })
    }

    fn has_flips(&self) -> bool {
        CacheReader::has_flips(self)
    }

    fn empty_caption(&self) -> Result<Tensor> {
        CacheReader::empty_caption(self)
    }
}
