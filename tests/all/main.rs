//! sdtune's integration tests, in one test binary.
//!
//! One binary rather than one per file: each binary links the whole library
//! again, and fifty of them made a fresh-clone `make test` spend most of its
//! time linking. The tests share one process, so a test that seeds or draws
//! from torch's global generator holds `common::torch_rng()` (see there).
//! Every `.rs` file in this folder must be declared below;
//! `every_test_file_is_declared` fails otherwise, since cargo would silently
//! skip it.

mod common;
mod model_support;
mod prepare_support;
mod train_support;

mod bad_values_cli;
mod bench_cli;
mod clip_parity;
mod concepts;
mod cpu_kernels;
mod demo_e2e;
mod distributed;
mod dora_locon;
mod flop_count;
mod fuzz_readers;
mod gradient_checkpointing;
mod import_cycles;
mod info;
mod load_errors;
mod load_hub_cache;
mod load_hub_download;
mod load_single_file;
mod load_tf5_layout;
mod lora_damaged;
mod lora_edit;
mod lora_edit_kinds;
mod lora_interop;
mod lora_sd15_names;
mod lycoris;
mod noise_schedule;
mod prepare_bad_inputs;
mod prepare_hostile_inputs;
mod prepare_latent_parity;
mod prepare_precision;
mod prepare_resume;
mod prepare_vae;
mod prior_preservation;
mod run_safety;
mod sample_from_changed_lora;
mod sample_grid;
mod sample_parity;
mod sample_vae;
mod scheduler_parity;
mod sdxl_adapters;
mod sdxl_lora_from_reference;
mod sdxl_lycoris;
mod sdxl_parity;
mod sdxl_single_file;
mod sdxl_train;
mod serve;
mod single_file_offline;
mod text_encoder_lora;
mod tokenizer_parity;
mod train_cli;
mod train_core;
mod train_full;
mod train_regularise;
mod unet_parity;
mod vae_parity;
mod vae_tiling;

#[test]
fn every_test_file_is_declared() {
    let here = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/all");
    let main = std::fs::read_to_string(here.join("main.rs")).unwrap();
    for entry in std::fs::read_dir(&here).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        if let Some(stem) = name.strip_suffix(".rs").filter(|s| *s != "main") {
            assert!(main.contains(&format!("\nmod {stem};\n")), "tests/all/{name} is not declared in tests/all/main.rs: add `mod {stem};`");
        }
    }
}
