//! `sdtune info`: models and LoRAs described from headers alone; pickles
//! refused without being read; anything else in one sentence.
use crate::model_support;

use std::collections::HashMap;
use std::io::Write;
use std::time::{Duration, Instant};

use model_support::*;
use sdtune::loaders::tensor_file::write_tensors;
use tch::{Device, Kind, Tensor};

fn info(target: &std::path::Path) -> std::process::Output {
    let cache = sdtune::scratch::ScratchDir::new().unwrap();
    run(sdtune(cache.path()).arg("info").arg(target))
}

#[test]
fn describes_folders_and_single_files() {
    let text = stdout_ok(&info(&fixture("tiny-sd1")));
    for want in
        ["diffusers folder", "Stable Diffusion 1.x", "f32 (726 tensors)", "UNet 555.4K", "epsilon", "heads [8, 8, 8]"]
    {
        assert!(text.contains(want), "missing {want:?} in:\n{text}");
    }
    let dir = sdtune::scratch::ScratchDir::new().unwrap();
    let path = write_single_file(dir.path(), "tiny-sd2", "m", Some(Kind::Half));
    write_beside(dir.path(), "m", "tiny-sd2", &["unet", "vae", "text_encoder"]);
    let text = stdout_ok(&info(&path));
    for want in [
        "single-file checkpoint",
        "Stable Diffusion 2.x",
        "OpenCLIP",
        "f16",
        "text encoder 1.60M",
        "v_prediction (guessed",
        "3 layers, 32 wide, 4 heads, gelu",
    ] {
        assert!(text.contains(want), "missing {want:?} in:\n{text}");
    }
}

#[test]
fn describes_loras_with_their_metadata() {
    let dir = sdtune::scratch::ScratchDir::new().unwrap();
    let zeros = |s: &[i64]| Tensor::zeros(s, (Kind::Float, Device::Cpu));
    let mut tensors = Vec::new();
    for (block, width) in [("down_blocks_0_attentions_0", 32), ("up_blocks_1_attentions_2", 32)] {
        for (layer, in_features) in [("attn2_to_q", width), ("attn2_to_k", 768)] {
            let base = format!("lora_unet_{block}_transformer_blocks_0_{layer}");
            tensors.push((format!("{base}.lora_down.weight"), zeros(&[4, in_features])));
            tensors.push((format!("{base}.lora_up.weight"), zeros(&[width, 4])));
            tensors.push((format!("{base}.alpha"), Tensor::from(2.0f32)));
        }
    }
    let meta: HashMap<String, String> = [
        ("ss_network_module", "networks.lora"),
        ("ss_network_dim", "4"),
        ("ss_network_alpha", "2"),
        ("ss_base_model_version", "sd_v1"),
        ("ss_steps", "500"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let path = dir.path().join("brand.safetensors");
    write_tensors(&path, &tensors, Some(meta)).unwrap();
    let text = stdout_ok(&info(&path));
    for want in [
        "LoRA, kohya",
        "4 (UNet 4, text encoder 0)",
        "rank         4",
        "alpha        2 (scale alpha/rank 0.5)",
        "attn2_to_k x2",
        "sd_v1 (from ss_base_model_version)",
        "ss_steps = 500",
    ] {
        assert!(text.contains(want), "missing {want:?} in:\n{text}");
    }

    // PEFT, no metadata: the base is read from the cross-attention width.
    let peft = vec![
        ("unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight".to_string(), zeros(&[8, 1024])),
        ("unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k.lora_B.weight".to_string(), zeros(&[32, 8])),
    ];
    let path = dir.path().join("peft.safetensors");
    write_tensors(&path, &peft, None).unwrap();
    let text = stdout_ok(&info(&path));
    assert!(text.contains("diffusers (PEFT)") && text.contains("Stable Diffusion 2.x (1024-wide"), "{text}");
    assert!(text.contains("rank         8") && text.contains("metadata     none"), "{text}");
}

#[test]
fn pickles_are_refused_without_being_read() {
    let dir = sdtune::scratch::ScratchDir::new().unwrap();
    // A named pipe: opening it would block until a writer comes, so a prompt
    // answer proves the refusal came from the name alone.
    let fifo = dir.path().join("model.ckpt");
    let made = std::process::Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(made.success());
    let cache = sdtune::scratch::ScratchDir::new().unwrap();
    for args in [vec!["info"], vec!["sample", "--prompt", "x", "--model"]] {
        let mut child = sdtune(cache.path())
            .args(&args)
            .arg(&fifo)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let start = Instant::now();
        while child.try_wait().unwrap().is_none() {
            if start.elapsed() > Duration::from_secs(60) {
                child.kill().unwrap();
                panic!("sdtune opened the pickle file (it blocked on the pipe)");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let line = one_line_error(&child.wait_with_output().unwrap());
        assert!(line.contains("pickle") && line.contains("model.ckpt") && line.contains("safetensors"), "{line}");
        assert!(line.contains("weights_only=True"), "{line}");
    }

    // Pickles under a safetensors name are told by their first bytes.
    for (name, head) in
        [("zip.safetensors", &b"PK\x03\x04\x14\x00\x00\x00\x08\x00"[..]), ("raw.safetensors", &b"\x80\x02}q\x00(X"[..])]
    {
        let path = dir.path().join(name);
        let mut f = std::fs::File::create(&path).unwrap();
        f.write_all(head).unwrap();
        f.write_all(&[0u8; 64]).unwrap();
        let line = one_line_error(&info(&path));
        assert!(line.contains("is a pickle checkpoint"), "{line}");
    }
}

#[test]
fn anything_else_gets_one_sentence() {
    let dir = sdtune::scratch::ScratchDir::new().unwrap();
    let text_file = dir.path().join("notes.safetensors");
    std::fs::write(&text_file, "just some text, not tensors").unwrap();
    let line = one_line_error(&info(&text_file));
    assert!(line.contains("is not a safetensors file"), "{line}");

    let other = dir.path().join("embedding.safetensors");
    write_tensors(&other, &[("emb_params".into(), Tensor::zeros([2, 768], (Kind::Float, Device::Cpu)))], None).unwrap();
    let line = one_line_error(&info(&other));
    assert!(line.contains("neither a Stable Diffusion checkpoint nor a LoRA") && line.contains("emb_params"), "{line}");

    let component = fixture("tiny-sd1/unet/diffusion_pytorch_model.safetensors");
    let line = one_line_error(&info(&component));
    assert!(line.contains("diffusers UNet") && line.contains("model_index.json"), "{line}");

    let folder_of_files = sdtune::scratch::ScratchDir::new().unwrap();
    std::fs::copy(&other, folder_of_files.path().join("model.safetensors")).unwrap();
    let line = one_line_error(&info(folder_of_files.path()));
    assert!(line.contains("pass the file itself"), "{line}");

    // A LoRA given as the base model.
    let lora = dir.path().join("lora.safetensors");
    let t = Tensor::zeros([4, 32], (Kind::Float, Device::Cpu));
    write_tensors(
        &lora,
        &[
            ("lora_unet_conv_in.lora_down.weight".into(), t.shallow_clone()),
            ("lora_unet_conv_in.lora_up.weight".into(), t.tr()),
        ],
        None,
    )
    .unwrap();
    let cache = sdtune::scratch::ScratchDir::new().unwrap();
    let line = one_line_error(&run(sdtune(cache.path()).args(["sample", "--prompt", "x", "--model"]).arg(&lora)));
    assert!(line.contains("is a LoRA (kohya), not a base model"), "{line}");
}
