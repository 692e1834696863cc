//! LyCORIS LoHa and LoKr on SDXL's UNet, made by peft
//! (scripts/fixtures/make_sdxl_lycoris_cases.py) in peft's layout (`unet.` keys)
//! and in kohya/LyCORIS naming with SGM block paths: sdtune's UNet output with
//! each equals peft's, and `sdtune sample` with each renders what diffusers'
//! SDXL pipeline renders with peft's adapter.
use crate::common;

use sdtune::lora::{self, format, Component};
use sdtune::sample::render;

use common::sdxl::{model, render_with, unet_out};

/// (file under tests/fixtures/lora/lycoris_sdxl, reference case).
const CASES: &[(&str, &str)] = &[
    ("kohya_loha.safetensors", "loha"),
    ("peft_loha/adapter_model.safetensors", "loha"),
    ("kohya_lokr.safetensors", "lokr"),
    ("peft_lokr/adapter_model.safetensors", "lokr"),
];

fn reference() -> std::collections::HashMap<String, tch::Tensor> {
    common::read_tensors(&common::reference("sdxl/lycoris.safetensors"))
}

fn file(name: &str) -> std::path::PathBuf {
    common::fixtures().join("lora/lycoris_sdxl").join(name)
}

#[test]
fn peft_loha_and_lokr_on_the_sdxl_unet_give_peft_unet_output() {
    let r = reference();
    common::assert_close("base", &unet_out(&model()), &r["base"], 1e-4);
    for (name, case) in CASES {
        for fused in [false, true] {
            let m = model();
            let layers = render::layers(&m).unwrap();
            let weights = format::read(&file(name), &layers).unwrap_or_else(|e| panic!("{name}: {e:#}"));
            // Every transformer block's attention, proj_in/out and ff.net.0.proj.
            let n = weights.lycoris.iter().filter(|x| x.component == Component::Unet).count();
            assert!(n >= 40 && n == weights.lycoris.len() && weights.modules.is_empty(), "{name}: {n} UNet modules of {}", weights.lycoris.len());
            if fused {
                lora::fuse(&weights, &layers, 1.0, name).unwrap();
            } else {
                lora::attach(&weights, &layers, 1.0, name).unwrap();
            }
            let got = unet_out(&m);
            common::assert_close(&format!("{name} (fused: {fused})"), &got, &r[*case], 1e-4);
            let effect = common::max_abs_diff(&got, &r["base"]);
            assert!(effect > 1e-2, "{name}: the adapter barely changes the UNet ({effect})");
        }
    }
}

#[test]
fn sdxl_sample_with_unet_loha_and_lokr_matches_diffusers_with_peft() {
    let r = reference();
    let dir = sdtune::scratch::ScratchDir::new().unwrap();
    let base = render_with(&[], false, &dir.path().join("base.png"));
    let gap = (&base - &r["base_image"] * 255.0).abs().max().double_value(&[]);
    assert!(gap <= 1.0, "the base render is {gap:.3}/255 from diffusers'");
    for (name, case) in CASES {
        let theirs = &r[&format!("{case}_image")] * 255.0;
        for fuse in [false, true] {
            let label = format!("{name}{}", if fuse { " fused" } else { "" });
            let out = dir.path().join(format!("{}.png", label.replace(['/', ' ', '.'], "_")));
            let ours = render_with(&[file(name).display().to_string()], fuse, &out);
            let gap = (&ours - &theirs).abs();
            let (max, mean) = (gap.max().double_value(&[]), gap.mean(tch::Kind::Double).double_value(&[]));
            eprintln!("{label}: pixel diff max {max:.3}, mean {mean:.4} of 255");
            assert!(max <= 1.0, "{label}: a pixel is {max:.3}/255 from diffusers' with peft's adapter (mean {mean:.4})");
            let effect = (&ours - &base).abs().mean(tch::Kind::Double).double_value(&[]);
            assert!(effect > 2.0, "{label}: the image is within {effect:.2}/255 of the base model's; the test would not discriminate");
        }
    }
}

/// `sdtune info` names each file's kind and its SDXL base, and counts
/// kohya's SGM-named `proj_in` modules as `proj_in`, not `in`.
#[test]
fn info_names_the_kind_the_base_and_the_targets() {
    for (name, kind, base) in [("kohya_loha.safetensors", "LoHa, kohya", "sdxl_base_v1-0"), ("kohya_lokr.safetensors", "LoKr, kohya", "sdxl_base_v1-0")] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_sdtune")).arg("info").arg(file(name)).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{name}: {}", String::from_utf8_lossy(&out.stderr));
        let row = |key: &str| text.lines().find(|l| l.starts_with(key)).unwrap_or_else(|| panic!("{name}: no {key} row in\n{text}")).to_string();
        assert!(row("format").contains(kind), "{name}: {}", row("format"));
        assert!(row("base").contains(base), "{name}: {}", row("base"));
        assert!(row("modules").contains("175 (UNet 175, text encoder 0)"), "{name}: {}", row("modules"));
        let targets = row("targets");
        assert!(targets.contains("proj_in x11") && targets.contains("proj_out x11") && targets.contains("attn2_to_q x17"), "{name}: {targets}");
    }
}
