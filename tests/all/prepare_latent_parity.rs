//! The latent distribution prepare caches equals diffusers'
//! `vae.encode(x).latent_dist` for the same preprocessed pixels
//! (reference from scripts/fixtures/make_prepare_reference.py).
use crate::prepare_support;

use prepare_support::*;
use sdtune::data::config::DataConfig;
use sdtune::data::cache::CacheReader;
use sdtune::data::prepare::{self, Options};
use sdtune::loaders::tensor_file::TensorFile;
use sdtune::runtime::Precision;
use tch::{Device, Kind};

const TOL: f64 = 1e-4;

fn small_config() -> DataConfig {
    DataConfig {
        resolution: 64,
        min_bucket: 32,
        max_bucket: 128,
        bucket_step: 16,
        min_side: 32,
        ..DataConfig::default()
    }
}

#[test]
fn cached_latents_match_diffusers() {
    let tmp = sdtune::scratch::ScratchDir::new().unwrap();
    let work = tmp.path();
    let data = work.join("images");
    std::fs::create_dir_all(&data).unwrap();
    let sizes = [(64, 64), (80, 48)];
    for (w, h) in sizes {
        let name = format!("prepare_parity_{w}x{h}.png");
        std::fs::copy(fixtures().join("images").join(&name), data.join(&name)).unwrap();
    }
    let opts = Options {
        data_dir: data,
        work_dir: work.to_path_buf(),
        config_file: work.join("sdtune.yaml"),
        model_dir: tiny_model(),
        vae: None,
        device: Device::Cpu,
        precision: Precision::Fp32,
        data: small_config(),
        clip_skip: 0,
    };
    let prepared = prepare::run(&opts).unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(prepared.report.counts.usable, 2);

    let reference = TensorFile::open(&fixtures().join("reference/prepare_latent.safetensors")).unwrap();
    let cache = CacheReader::open(work).unwrap();
    for (w, h) in sizes {
        let item = cache
            .dataset()
            .items
            .iter()
            .find(|i| i.path == format!("prepare_parity_{w}x{h}.png"))
            .expect("the image is cached");
        // Bucket-sized already: no crop, no resize, so both sides see the same pixels.
        assert_eq!((item.bucket.width, item.bucket.height), (w, h));
        assert_eq!((item.crop.width, item.crop.height), (w, h));
        let (mean, std) = cache.latent(&item.latent).unwrap();
        for (name, ours) in [("mean", &mean), ("std", &std)] {
            let theirs = reference.tensor(&format!("{name}_{w}x{h}")).unwrap();
            assert_eq!(ours.size(), theirs.size(), "{name} {w}x{h}");
            let diff = (ours.to_kind(Kind::Double) - theirs.to_kind(Kind::Double)).abs().max().double_value(&[]);
            eprintln!("{w}x{h} latent {name}: max abs diff {diff:e}");
            assert!(diff <= TOL, "{w}x{h} latent {name}: max abs diff {diff:e} > {TOL:e}");
        }
    }
}
