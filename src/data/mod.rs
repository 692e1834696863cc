//! From an image folder to cached latents: scan, decode, caption, bucket,
//! encode, cache, report. Knows nothing of training.
pub mod buckets;
pub mod config;
pub mod cache;
pub mod captions;
pub mod class_set;
pub mod concepts;
pub mod decode;
pub mod encode;
pub mod keys;
pub mod prepare;
pub mod report;
pub mod scan;
pub mod time_ids;
