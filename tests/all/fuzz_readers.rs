//! A seeded mutation loop over the readers of user files: sdtune.yaml, and
//! safetensors / LoRA files (random bytes, truncations, bit flips, header
//! edits of the real fixtures). Every input gives a valid result or an
//! error sentence; none panics. A few seconds; the seed makes a failure
//! reproducible.
use crate::common;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

use sdtune::config::Config;
use sdtune::lora::kohya_names::KohyaNames;
use sdtune::lora::{format, ModelLayers};
use sdtune::models::stable_diffusion::{Placement, StableDiffusion};
use sdtune::loaders::tensor_file::TensorFile;

/// xorshift64*: small, seeded, the same on every machine.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// One random edit of `bytes`: a truncation, bit flips, inserted or deleted
/// bytes, a duplicated stretch, or bytes from `tokens`.
fn mutate(rng: &mut Rng, bytes: &[u8], tokens: &[&str]) -> Vec<u8> {
    let mut out = bytes.to_vec();
    for _ in 0..1 + rng.below(3) {
        let at = rng.below(out.len() + 1);
        match rng.below(6) {
            0 => out.truncate(at),
            1 if !out.is_empty() => {
                let i = at.min(out.len() - 1);
                out[i] ^= 1 << rng.below(8);
            }
            2 => out.insert(at, rng.next() as u8),
            3 => {
                let end = (at + rng.below(16)).min(out.len());
                out.drain(at..end);
            }
            4 => {
                let end = (at + rng.below(64)).min(out.len());
                let copy = out[at..end].to_vec();
                out.splice(at..at, copy);
            }
            _ => {
                let token = rng.pick(tokens).as_bytes().to_vec();
                out.splice(at..at, token);
            }
        }
    }
    out
}

fn random_bytes(rng: &mut Rng, max: usize) -> Vec<u8> {
    (0..rng.below(max)).map(|_| rng.next() as u8).collect()
}

/// Runs `f`, failing the test with `what` when it panics.
fn no_panic<R>(what: &str, f: impl FnOnce() -> R) -> R {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(_) => panic!("panicked on {what}"),
    }
}

fn assert_sentence(err: &anyhow::Error, what: &str) {
    let text = sdtune::errors::one_sentence(err);
    assert!(!text.trim().is_empty(), "empty error on {what}");
    assert!(!text.contains("panicked"), "{what}: {text}");
}

const YAML: &str = "\
model: ./models/sd15
data:
  path: photos
  resolution: 512
  min_bucket: 256
  max_bucket: 1024
  trigger: brandx
  background: '#ff8000'
sample:
  prompts: [a photo of brandx, brandx on a desk]
  seeds: [1, 2, 3]
train:
  steps: 100
  lr: 1.0e-4
  min_snr_gamma: 5
  noise_offset: 0.05
  name: acme
";

const YAML_TOKENS: &[&str] = &[
    "-1", ".nan", ".inf", "1e400", "99999999999999999999", "[", "]", "{", "}", "~", "null", "\"", "'", ":", "- ",
    "\n  ", "\n", "\t", "---\n", "&a ", "*a", "!!binary ", "<<: *a", "\u{feff}", "? ", "|\n", "#", "\0", "é", "0x10",
];

#[test]
fn the_config_loader_never_panics() {
    let mut rng = Rng(0x5D7_0E18);
    let path = Path::new("sdtune.yaml");
    Config::parse(YAML, path).expect("the seed config is valid");
    let mut accepted = 0;
    for case in 0..1500 {
        let bytes = if case % 10 == 0 { random_bytes(&mut rng, 200) } else { mutate(&mut rng, YAML.as_bytes(), YAML_TOKENS) };
        let text = String::from_utf8_lossy(&bytes).into_owned();
        let what = format!("config case {case}: {text:?}");
        match no_panic(&what, || Config::parse(&text, path)) {
            Ok(config) => {
                accepted += 1;
                // What is accepted writes back and reads again as the same.
                let again = Config::parse(&config.to_yaml().unwrap(), path).unwrap_or_else(|e| panic!("{what}: {e:#}"));
                assert_eq!(again, config, "{what}");
            }
            Err(e) => assert_sentence(&e, &what),
        }
    }
    assert!(accepted > 0, "no mutation was valid; the loop tests only the error path");
}

/// Every tensor, the LoRA checks and the LoRA read against the model.
fn read_everything(path: &Path, layers: &ModelLayers) -> anyhow::Result<()> {
    let file = TensorFile::open(path)?;
    for name in file.names() {
        let _tensor = file.tensor(&name)?;
    }
    format::read_stored(&file)?;
    format::read(path, layers)?;
    Ok(())
}

/// The header of a safetensors file as JSON, and its data.
fn split(bytes: &[u8]) -> (serde_json::Map<String, serde_json::Value>, Vec<u8>) {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    (header, bytes[8 + n..].to_vec())
}

fn join(header: &serde_json::Map<String, serde_json::Value>, data: &[u8]) -> Vec<u8> {
    let text = serde_json::to_vec(header).unwrap();
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend(text);
    out.extend(data);
    out
}

/// An edit of one tensor's header entry (or of the metadata) that keeps the
/// JSON well-formed, so the reader's own checks are what is tested.
fn mutate_header(rng: &mut Rng, bytes: &[u8]) -> Vec<u8> {
    let (mut header, data) = split(bytes);
    let names: Vec<String> = header.keys().filter(|k| *k != "__metadata__").cloned().collect();
    let name = rng.pick(&names).clone();
    let values = [
        serde_json::json!(0),
        serde_json::json!(-1),
        serde_json::json!(1u64 << 40),
        serde_json::json!(u64::MAX),
        serde_json::json!(3),
        serde_json::json!("F32"),
        serde_json::json!("I64"),
        serde_json::json!("BOOL"),
        serde_json::json!("F8_E4M3"),
        serde_json::json!("X"),
        serde_json::json!([]),
        serde_json::json!([1]),
        serde_json::json!([4, 4, 4, 4, 4]),
        serde_json::json!(null),
    ];
    match rng.below(6) {
        0 => {
            let v = rng.pick(&values).clone();
            header[&name]["dtype"] = v;
        }
        1 => {
            let v = rng.pick(&values).clone();
            header[&name]["shape"] = v;
        }
        2 => {
            let v = rng.pick(&values).clone();
            header[&name]["data_offsets"] = v;
        }
        3 => {
            // A consistent reshape: same element count, other rank.
            let shape = header[&name]["shape"].as_array().cloned().unwrap_or_default();
            let numel: u64 = shape.iter().filter_map(|d| d.as_u64()).product();
            header[&name]["shape"] = serde_json::json!([numel]);
        }
        4 => {
            let entry = header.remove(&name).unwrap();
            let renamed = format!("{}{}", name, rng.pick(&[".x", "_", ".lora_down.weight", ".alpha"]));
            header.insert(renamed, entry);
        }
        _ => {
            let v = serde_json::json!({"lora_adapter_metadata": rng.pick(&["{\"lora_alpha\": \"x\"}", "{\"lora_alpha\": 1e400}", "[", "{}"]).to_string()});
            header.insert("__metadata__".into(), v);
        }
    }
    join(&header, &data)
}

#[test]
fn the_safetensors_and_lora_readers_never_panic() {
    let model = StableDiffusion::from_diffusers_folder(&common::fixtures().join("tiny-sd1"), Placement::cpu_f32(), None).unwrap();
    let layers = ModelLayers { unet: &model.unet.layers, text_encoder: Some(&model.text.first().model.layers), text_encoder_2: None, kohya: KohyaNames::Diffusers };
    let fixtures: Vec<(String, Vec<u8>)> = ["kohya_a", "peft_a", "sdtune_diffusers", "sdtune_kohya"]
        .iter()
        .map(|n| (n.to_string(), std::fs::read(common::fixtures().join(format!("lora/{n}.safetensors"))).unwrap()))
        .collect();
    for (name, bytes) in &fixtures {
        let dir = sdtune::scratch::ScratchDir::new().unwrap();
        let path = dir.path().join("f.safetensors");
        std::fs::write(&path, bytes).unwrap();
        read_everything(&path, &layers).unwrap_or_else(|e| panic!("fixture {name} should read: {e:#}"));
    }
    let dir = sdtune::scratch::ScratchDir::new().unwrap();
    let mut rng = Rng(0xF0_22_18);
    let (mut accepted, mut refused) = (0, 0);
    for case in 0..400 {
        let (name, original) = rng.pick(&fixtures);
        let bytes = match case % 8 {
            0 => random_bytes(&mut rng, 300),
            1 => original[..rng.below(original.len())].to_vec(),
            2 | 3 => mutate_header(&mut rng, original),
            _ => mutate(&mut rng, original, &["{", "}", "\"", ",", "\0", "F32", "[1]"]),
        };
        let path = dir.path().join(format!("case-{case}.safetensors"));
        std::fs::write(&path, &bytes).unwrap();
        let what = format!("safetensors case {case} (from {name})");
        match no_panic(&what, || read_everything(&path, &layers)) {
            Ok(()) => accepted += 1,
            Err(e) => {
                assert_sentence(&e, &what);
                refused += 1;
            }
        }
        std::fs::remove_file(&path).unwrap();
    }
    assert!(refused > 0 && accepted > 0, "accepted {accepted}, refused {refused}: the mutations should do both");
}
