//! The training noise schedule equals diffusers' (alphas_cumprod, add_noise, velocity).
use crate::common;

use sdtune::models::config::SchedulerConfig;
use sdtune::schedulers::NoiseSchedule;

fn schedule() -> NoiseSchedule {
    let cfg = SchedulerConfig::from_file(&common::fixtures().join("tiny-sd1/scheduler/scheduler_config.json")).unwrap();
    NoiseSchedule::from_config(&cfg).unwrap()
}

#[test]
fn alphas_cumprod_match_diffusers() {
    let r = common::read_tensors(&common::reference("scheduler.safetensors"));
    common::assert_close("alphas_cumprod", &schedule().alphas_cumprod, &r["alphas_cumprod"], 1e-7);
}

#[test]
fn add_noise_and_velocity_match_diffusers() {
    let r = common::read_tensors(&common::reference("scheduler.safetensors"));
    let s = schedule();
    let noisy = s.add_noise(&r["original"], &r["noise"], &r["timesteps"]);
    common::assert_close("add_noise", &noisy, &r["noisy"], 1e-6);
    let v = s.velocity(&r["original"], &r["noise"], &r["timesteps"]);
    common::assert_close("velocity", &v, &r["velocity"], 1e-6);
}

#[test]
fn snr_is_alpha_over_one_minus_alpha() {
    let s = schedule();
    let t = tch::Tensor::from_slice(&[0i64, 500, 999]);
    let snr = s.snr(&t);
    for (i, step) in [0i64, 500, 999].iter().enumerate() {
        let a = s.alpha_cumprod(*step);
        let want = a / (1.0 - a);
        let got = snr.double_value(&[i as i64]);
        assert!((got - want).abs() / want < 1e-5, "snr({step}) = {got}, want {want}");
    }
}
