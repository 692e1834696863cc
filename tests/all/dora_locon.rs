//! DoRA against PEFT's `use_dora` layer (make_dora_cases.py): a PEFT DoRA file
//! loaded by sdtune gives PEFT's UNet output, and a DoRA sdtune trained
//! (`--dora`), put into PEFT, gives the output sdtune gives with it, from
//! its diffusers file (`lora_magnitude_vector`) and its kohya file
//! (`dora_scale`) alike. LoCon sdtune trained (`--targets conv`, 3x3
//! pairs on the resnets and samplers) gives in sdtune the UNet output
//! diffusers' `load_lora_weights` gives with it (make_locon_cases.py).
use crate::common;

use std::path::PathBuf;

use sdtune::lora::{self, format};
use sdtune::sample::render;
use tch::Tensor;

use common::sd1::{model, unet_out};

fn dora_file(stem: &str) -> PathBuf {
    common::fixtures().join("lora/dora").join(format!("{stem}.safetensors"))
}

/// The UNet output with `stem` attached (or fused) at strength 1.
fn with_dora(stem: &str, fused: bool) -> Tensor {
    let m = model();
    let layers = render::layers(&m).unwrap();
    let weights = format::read(&dora_file(stem), &layers).unwrap_or_else(|e| panic!("{e:#}"));
    assert!(weights.modules.iter().all(|x| x.dora_scale.is_some()), "{stem}: a module was read without its magnitude");
    if fused {
        lora::fuse(&weights, &layers, 1.0, stem).unwrap();
    } else {
        lora::attach(&weights, &layers, 1.0, stem).unwrap();
    }
    unet_out(&m)
}

#[test]
fn dora_files_give_peft_dora_unet_output() {
    let r = common::read_tensors(&common::reference("dora.safetensors"));
    common::assert_close("base", &unet_out(&model()), &r["base"], 1e-4);
    for (stem, reference) in [("peft_dora", "peft_dora"), ("sdtune_diffusers", "sdtune_diffusers"), ("sdtune_kohya", "sdtune_diffusers")] {
        for fused in [false, true] {
            let got = with_dora(stem, fused);
            common::assert_close(&format!("{stem} (fused: {fused})"), &got, &r[reference], 1e-4);
            let effect = common::max_abs_diff(&got, &r["base"]);
            assert!(effect > 1e-2, "{stem}: the DoRA barely changes the UNet ({effect}); the test would not discriminate");
        }
    }
}


#[test]
fn sdtune_trained_locon_gives_diffusers_unet_output() {
    let r = common::read_tensors(&common::reference("locon.safetensors"));
    for stem in ["sdtune_kohya", "sdtune_diffusers"] {
        let m = model();
        let layers = render::layers(&m).unwrap();
        let file = common::fixtures().join("lora/locon").join(format!("{stem}.safetensors"));
        let weights = format::read(&file, &layers).unwrap_or_else(|e| panic!("{e:#}"));
        let convs = weights.modules.iter().filter(|x| x.down.dim() == 4 && x.down.size()[3] == 3).count();
        assert!(convs > 0 && weights.modules.iter().any(|x| x.layer.contains("downsamplers")), "{stem}: no 3x3 LoCon pairs");
        lora::attach(&weights, &layers, 1.0, stem).unwrap();
        let got = unet_out(&m);
        common::assert_close(stem, &got, &r[stem], 1e-4);
        let effect = common::max_abs_diff(&got, &r["base"]);
        assert!(effect > 1e-2, "{stem}: the LoCon barely changes the UNet ({effect})");
    }
}

/// `sdtune info` names DoRA files (PEFT's `lora_magnitude_vector`, kohya's
/// `dora_scale`) as DoRA, and a plain LoCon as LoCon.
#[test]
fn info_names_dora_and_locon() {
    let cases = [
        (dora_file("peft_dora"), "DoRA"),
        (dora_file("sdtune_kohya"), "DoRA"),
        (dora_file("sdtune_diffusers"), "DoRA"),
        (common::fixtures().join("lora/locon/sdtune_kohya.safetensors"), "LoCon"),
        (common::fixtures().join("lora/sdxl_adapters/sdtune_dora_kohya.safetensors"), "DoRA"),
    ];
    for (path, kind) in cases {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_sdtune")).arg("info").arg(&path).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{}: {}", path.display(), String::from_utf8_lossy(&out.stderr));
        let format = text.lines().find(|l| l.starts_with("format")).unwrap_or_else(|| panic!("no format line in\n{text}"));
        assert!(format.contains(kind), "{}: {format}", path.display());
        if kind == "DoRA" {
            assert!(!format.contains("LoRA"), "{}: a DoRA file has no plain LoRA modules: {format}", path.display());
        }
    }
}
