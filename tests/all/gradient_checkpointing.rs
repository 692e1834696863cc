//! `--gradient-checkpointing`: the UNet's resnets and transformers run
//! again in backward instead of keeping their activations. The LoRA's
//! gradients must come out as without it (tiny SD1 and SDXL, fp32 and
//! bf16), a failure inside the recompute must come back as an error, and
//! `sdtune train` with the flag must write the same LoRA and record it.
use crate::common;
use crate::train_support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use sdtune::loaders::tensor_file::TensorFile;
use sdtune::loaders::weights::build_and_load;
use sdtune::lora::network::{DownInit, LoraNetwork};
use sdtune::lora::targets::Targets;
use sdtune::models::built::Built;
use sdtune::models::conditioning::Conditioning;
use sdtune::models::config::UNetConfig;
use sdtune::models::gradient_checkpoint::checkpointed;
use sdtune::models::unet::UNet2DConditionModel;
use tch::{Device, Kind, Tensor};

fn load_unet(fixture: &str, kind: Kind) -> (Built<UNet2DConditionModel>, UNetConfig) {
    let dir = common::fixtures().join(fixture).join("unet");
    let cfg = UNetConfig::from_file(&dir.join("config.json")).unwrap();
    let files = [dir.join("diffusion_pytorch_model.safetensors")];
    let unet = build_and_load(&files, Device::Cpu, kind, |vb| UNet2DConditionModel::new(vb, &cfg))
        .unwrap_or_else(|e| panic!("{e:#}"));
    (unet, cfg)
}

/// A LoRA on every transformer layer with random (not zero) up weights,
/// so both halves of each pair get a gradient.
fn lora_on(unet: &Built<UNet2DConditionModel>) -> LoraNetwork {
    tch::manual_seed(7);
    let lora = LoraNetwork::inject(&unet.layers, Targets::Transformer, 2, 2.0, DownInit::KaimingUniform, Device::Cpu)
        .unwrap_or_else(|e| panic!("{e:#}"));
    tch::no_grad(|| {
        for m in &lora.modules {
            let mut up = m.up.shallow_clone();
            up.copy_(&(Tensor::randn(up.size(), (Kind::Float, Device::Cpu)) * 0.1));
        }
    });
    lora
}

/// The UNet's inputs for a batch of two at 16x16 latents.
fn inputs(cfg: &UNetConfig, unet: &UNet2DConditionModel) -> (Tensor, Tensor, Conditioning) {
    tch::manual_seed(11);
    let cpu = (Kind::Float, Device::Cpu);
    let sample = Tensor::randn([2, cfg.in_channels, 16, 16], cpu);
    let timesteps = Tensor::from_slice(&[10i64, 700]);
    let text = Tensor::randn([2, 77, cfg.cross_attention_dims()[0]], cpu);
    let conditioning = match unet.pooled_dim() {
        Some(pooled) => Conditioning {
            text,
            pooled: Some(Tensor::randn([2, pooled], cpu)),
            time_ids: Some(Tensor::from_slice(&[64.0f32, 64., 0., 0., 64., 64., 96., 64., 16., 0., 64., 64.]).reshape([2, 6])),
        },
        None => Conditioning::text_only(text),
    };
    (sample, timesteps, conditioning)
}

/// d(mean squared prediction)/d(params), as the trainer takes it.
fn gradients(unet: &UNet2DConditionModel, inputs: &(Tensor, Tensor, Conditioning), params: &[Tensor]) -> Vec<Tensor> {
    let pred = unet.forward(&inputs.0, &inputs.1, &inputs.2);
    let loss = pred.square().mean(Kind::Float);
    Tensor::f_run_backward(&[&loss], params, false, false).unwrap_or_else(|e| panic!("{e}"))
}

/// The LoRA gradients of `fixture`'s UNet in `kind`: without, then with
/// checkpointing. Checks every LoRA tensor gets one both times, and that
/// without grad (sampling) the output is the same either way.
fn both_gradients(fixture: &str, kind: Kind) -> (Vec<Tensor>, Vec<Tensor>, Vec<String>) {
    let (unet, cfg) = load_unet(fixture, kind);
    let lora = lora_on(&unet);
    let params = lora.parameters();
    let x = inputs(&cfg, &unet.model);
    let plain = gradients(&unet.model, &x, &params);
    unet.model.set_gradient_checkpointing(Some(params.iter().map(Tensor::shallow_clone).collect()));
    assert!(unet.model.gradient_checkpointing());
    let checkpointed = gradients(&unet.model, &x, &params);
    let names: Vec<String> = lora.modules.iter().flat_map(|m| [format!("{}.down", m.layer), format!("{}.up", m.layer)]).collect();
    for ((a, b), name) in plain.iter().zip(&checkpointed).zip(&names) {
        assert!(a.defined() && b.defined(), "{fixture} {kind:?} {name}: a gradient is missing");
        assert!(a.abs().max().double_value(&[]) > 0.0, "{fixture} {kind:?} {name}: the gradient is zero");
    }
    let (a, b) = tch::no_grad(|| {
        let with = unet.model.forward(&x.0, &x.1, &x.2);
        unet.model.set_gradient_checkpointing(None);
        (with, unet.model.forward(&x.0, &x.1, &x.2))
    });
    assert_eq!(common::max_abs_diff(&a, &b), 0.0, "{fixture} {kind:?}: no-grad forward changed");
    (plain, checkpointed, names)
}

fn assert_same_fp32_gradients(fixture: &str) {
    let (plain, checkpointed, names) = both_gradients(fixture, Kind::Float);
    for ((a, b), name) in plain.iter().zip(&checkpointed).zip(&names) {
        let diff = common::max_abs_diff(a, b);
        assert!(diff <= 1e-6, "{fixture} {name}: gradients differ by {diff} with checkpointing");
    }
}

/// ||got - reference|| / ||reference|| over all the LoRA's gradients.
fn relative_error(got: &[Tensor], reference: &[Tensor]) -> f64 {
    let flat = |ts: &[Tensor]| Tensor::cat(&ts.iter().map(|t| t.reshape([-1])).collect::<Vec<_>>(), 0);
    let (got, reference) = (flat(got), flat(reference));
    (got - &reference).norm().double_value(&[]) / reference.norm().double_value(&[])
}

#[test]
fn lora_gradients_are_unchanged_on_tiny_sd1() {
    let _rng = crate::common::torch_rng();
    assert_same_fp32_gradients("tiny-sd1");
}

#[test]
fn lora_gradients_are_unchanged_on_tiny_sdxl() {
    let _rng = crate::common::torch_rng();
    assert_same_fp32_gradients("tiny-sdxl");
}

/// bf16 base weights with fp32 LoRA masters (the explicit casts of
/// `--precision bf16`): the recompute casts again the same way. Gradients
/// that several paths add up (a skip and the main path, the time
/// embedding every resnet takes) are summed in bf16 in another order, so
/// the two differ by bf16 rounding: checkpointed gradients must be as
/// close to the fp32 ones as plain bf16 gradients are.
#[test]
fn lora_gradients_are_as_good_in_bf16() {
    let _rng = crate::common::torch_rng();
    for fixture in ["tiny-sd1", "tiny-sdxl"] {
        let (reference, _, _) = both_gradients(fixture, Kind::Float);
        let (plain, checkpointed, _) = both_gradients(fixture, Kind::BFloat16);
        let plain_error = relative_error(&plain, &reference);
        let checkpointed_error = relative_error(&checkpointed, &reference);
        let between = relative_error(&checkpointed, &plain);
        // Measured: bf16 is 4-5% off fp32 on these, the two bf16 runs 0.5-0.8% apart.
        assert!(plain_error < 0.1, "{fixture}: bf16 gradients are {plain_error} off the fp32 ones");
        assert!(
            checkpointed_error <= 1.5 * plain_error && between <= 0.5 * plain_error,
            "{fixture}: checkpointed bf16 gradients are {checkpointed_error} off the fp32 ones and {between} off plain bf16's, which are {plain_error} off"
        );
    }
}

/// The params given to the node are what carries their gradients: the
/// segment's input does not even need one.
#[test]
fn a_segment_passes_gradients_to_its_inputs_and_params() {
    let _rng = crate::common::torch_rng();
    let w = Tensor::from_slice(&[0.5f32, -1.5, 2.0]).set_requires_grad(true);
    let x = Tensor::from_slice(&[1.0f32, 2.0, 3.0]).set_requires_grad(true);
    let f = |x: &Tensor, w: &Tensor| (x * w).sin() * w + x.square();
    let plain = Tensor::f_run_backward(&[&f(&x, &w).sum(Kind::Float)], &[&x, &w], false, false).unwrap();
    let w_in = w.shallow_clone();
    let out = checkpointed(&[&x], std::slice::from_ref(&w), move |t| Ok(vec![f(&t[0], &w_in)])).unwrap();
    assert_eq!(out.len(), 1);
    assert!(out[0].requires_grad());
    let ckpt = Tensor::f_run_backward(&[&out[0].sum(Kind::Float)], &[&x, &w], false, false).unwrap();
    for (a, b) in plain.iter().zip(&ckpt) {
        assert_eq!(common::max_abs_diff(a, b), 0.0);
    }
    // An input that needs no gradient: the param's still arrives.
    let frozen = x.detach();
    let w_in = w.shallow_clone();
    let out = checkpointed(&[&frozen], std::slice::from_ref(&w), move |t| Ok(vec![f(&t[0], &w_in)])).unwrap();
    let grads = Tensor::f_run_backward(&[&out[0].sum(Kind::Float)], &[&w], false, false).unwrap();
    assert_eq!(common::max_abs_diff(&grads[0], &plain[1]), 0.0);
}

/// A segment that works in forward and fails when backward runs it again:
/// the error (or panic) reaches the caller of backward as an `Err`.
#[test]
fn a_failing_recompute_is_an_error_not_an_abort() {
    let _rng = crate::common::torch_rng();
    let x = Tensor::from_slice(&[1.0f32, 2.0]).set_requires_grad(true);
    for panics in [false, true] {
        let calls = Arc::new(AtomicUsize::new(0));
        let seen = Arc::clone(&calls);
        let out = checkpointed(&[&x], &[], move |t| {
            if seen.fetch_add(1, Ordering::SeqCst) == 1 {
                if panics {
                    panic!("the recompute panicked on purpose");
                }
                anyhow::bail!("the recompute failed on purpose");
            }
            Ok(vec![t[0].square()])
        })
        .unwrap();
        let err = Tensor::f_run_backward(&[&out[0].sum(Kind::Float)], &[&x], false, false)
            .expect_err("the recompute fails, so backward must");
        let want = if panics { "the recompute panicked on purpose" } else { "the recompute failed on purpose" };
        assert!(err.to_string().contains(want), "{err}");
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }
    // And in forward, the error comes back from `checkpointed` itself.
    let err = checkpointed(&[&x], &[], |_| anyhow::bail!("forward failed on purpose")).unwrap_err();
    assert!(format!("{err:#}").contains("forward failed on purpose"), "{err:#}");
}

fn lora_file(dir: &std::path::Path, name: &str) -> std::collections::BTreeMap<String, Tensor> {
    let file = TensorFile::open(&train_support::run_dir(dir, name).join(format!("{name}.safetensors"))).unwrap();
    file.names().into_iter().map(|n| (n.clone(), file.tensor(&n).unwrap())).collect()
}

fn recorded(dir: &std::path::Path, name: &str) -> (String, String) {
    let path = train_support::run_dir(dir, name).join(format!("{name}.safetensors"));
    let meta = TensorFile::open(&path).unwrap().string_metadata();
    let settings = std::fs::read_to_string(train_support::run_dir(dir, name).join("settings.json")).unwrap();
    let settings: serde_json::Value = serde_json::from_str(&settings).unwrap();
    let entry = settings["settings"].as_array().unwrap().iter().find(|kv| kv[0] == "gradient checkpointing");
    let entry = entry.unwrap_or_else(|| panic!("{name}: settings.json does not record gradient checkpointing: {settings}"));
    (meta["ss_gradient_checkpointing"].clone(), entry[1].as_str().unwrap().to_string())
}

/// Through the binary: the flag (or `gradient_checkpointing: true` in
/// sdtune.yaml) trains the same LoRA on tiny-sd1 and says so in the run's
/// settings and the file's metadata.
#[test]
fn train_with_the_flag_writes_the_same_lora_and_records_it() {
    let _rng = crate::common::torch_rng();
    let dir = train_support::prepared();
    // At FAST's lr 1e-3: fp32's other summation order moves Adam's steps
    // by ~1e-7; a broken gradient would move them by about the lr. fp32 said
    // outright: `auto` picks bf16 on a CPU with AVX512-BF16.
    let steps = ["--steps", "3", "--precision", "fp32"];
    let run = |name: &str, extra: &[&str]| {
        let args: Vec<&str> = steps.iter().chain(["--name", name].iter()).chain(extra).copied().collect();
        let out = train_support::train(dir.path(), &args);
        assert!(out.status.success(), "{name}: {}", String::from_utf8_lossy(&out.stderr));
    };
    run("plain", &[]);
    run("flag", &["--gradient-checkpointing"]);
    let yaml_path = dir.path().join("sdtune.yaml");
    let mut yaml: serde_yaml::Value = serde_yaml::from_str(&std::fs::read_to_string(&yaml_path).unwrap()).unwrap();
    let root = yaml.as_mapping_mut().unwrap();
    let train = root.entry("train".into()).or_insert_with(|| serde_yaml::Mapping::new().into());
    train.as_mapping_mut().unwrap().insert("gradient_checkpointing".into(), true.into());
    std::fs::write(dir.path().join("ckpt.yaml"), serde_yaml::to_string(&yaml).unwrap()).unwrap();
    run("yaml", &["--config", "ckpt.yaml"]);

    let plain = lora_file(dir.path(), "plain");
    let moved = plain.iter().filter(|(k, _)| k.contains("lora_up")).map(|(_, t)| t.abs().max().double_value(&[])).fold(0.0, f64::max);
    assert!(moved > 1e-4, "the runs hardly trained (largest up weight {moved}), so comparing them says little");
    for name in ["flag", "yaml"] {
        let other = lora_file(dir.path(), name);
        assert_eq!(plain.keys().collect::<Vec<_>>(), other.keys().collect::<Vec<_>>(), "{name}");
        for (key, t) in &plain {
            let diff = common::max_abs_diff(t, &other[key]);
            assert!(diff <= 1e-6, "{name}: {key} differs by {diff} from the run without checkpointing");
        }
        assert_eq!(recorded(dir.path(), name), ("true".to_string(), "on".to_string()), "{name}");
    }
    assert_eq!(recorded(dir.path(), "plain"), ("false".to_string(), "off".to_string()));
}
