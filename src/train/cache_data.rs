//! The prepare cache as training data.
use anyhow::Result;

use super::data::{TrainSample, TrainingData};
use crate::data::cache::CacheReader;
use crate::models::conditioning::Conditioning;

impl TrainingData for CacheReader {
    fn buckets(&self) -> Vec<Vec<usize>> {
        self.items_by_bucket()
    }

    fn sample(&self, index: usize, flip: bool) -> Result<TrainSample> {
        let (latent_mean, latent_std) = self.item_latent(index, flip)?;
        Ok(TrainSample { latent_mean, latent_std, text: self.item_conditioning(index)? })
    }

    fn repeats(&self, index: usize) -> usize {
        self.concept_of(index).map_or(1, |c| c.repeats as usize)
    }

    fn caption(&self, index: usize) -> Result<String> {
        self.item_caption(index)
    }

    fn loss_weight(&self, index: usize) -> f64 {
        self.concept_of(index).map_or(1.0, |c| c.loss_weight)
    }

    fn has_flips(&self) -> bool {
        CacheReader::has_flips(self)
    }

    fn empty_caption(&self) -> Result<Conditioning> {
        self.empty_conditioning()
    }

    fn time_ids(&self, index: usize, flip: bool) -> Result<Option<[f32; 6]>> {
        self.item_time_ids(index, flip).map(Some)
    }

    fn class_items(&self) -> Vec<usize> {
        (0..self.dataset().items.len()).filter(|&i| self.concept_of(i).is_some_and(|c| c.is_class)).collect()
    }
}
