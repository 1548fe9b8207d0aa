//! Parity of the text encoder, VAE and UNet with transformers / diffusers, on the tiny
//! random-initialised models that tools/fixtures/models.py saves with their reference outputs.
mod common;

use common::{assert_close, cases, fixtures, Refs};
use stable_diffusion::pipeline::{LoadOptions, StableDiffusion};
use tch::Tensor;

const MODELS: [&str; 2] = ["tiny-sd1", "tiny-sd2"];
const TOL: f64 = 1e-4;

fn load(model: &str) -> StableDiffusion {
    StableDiffusion::load(&fixtures().join(model), &LoadOptions::default())
        .unwrap_or_else(|e| panic!("{model}: {e}"))
}

#[test]
fn tokenizer_of_model_folder_matches_transformers() {
    for model in MODELS {
        let sd = load(model);
        let refs = Refs::open(model);
        let prompts = cases(model)["text_prompts"].as_array().unwrap().clone();
        let expected = refs.get("text_ids");
        for (i, p) in prompts.iter().enumerate() {
            let ids = sd.tokenizer.encode_padded(p.as_str().unwrap());
            let want: Vec<i64> = Vec::try_from(expected.get(i as i64)).unwrap();
            assert_eq!(ids, want, "{model} prompt {i}");
        }
    }
}

#[test]
fn text_encoder_matches_transformers() {
    let _g = tch::no_grad_guard();
    for model in MODELS {
        let sd = load(model);
        let refs = Refs::open(model);
        let ids = refs.get("text_ids");
        let hidden = sd.text_encoder.forward(&ids, 0).unwrap();
        assert_close(
            &format!("{model} text_hidden"),
            &hidden,
            &refs.get("text_hidden"),
            TOL,
        );
        let skip1 = sd.text_encoder.forward(&ids, 1).unwrap();
        assert_close(
            &format!("{model} text_hidden_skip1"),
            &skip1,
            &refs.get("text_hidden_skip1"),
            TOL,
        );
    }
}

/// A prompt and a negative prompt encoded together (one batch through the text encoder when
/// neither skips layers, two passes otherwise) give transformers' states of each: the
/// negative's first, `clip_skip` applied to the prompt only, each repeated `batch` times.
#[test]
fn prompt_pair_matches_transformers() {
    let _g = tch::no_grad_guard();
    for model in MODELS {
        let sd = load(model);
        let refs = Refs::open(model);
        let prompts = cases(model)["text_prompts"].as_array().unwrap().clone();
        let plain = refs.get("text_hidden");
        let skip1 = refs.get("text_hidden_skip1");
        for (batch, clip_skip, order) in [
            (1, 0, [0, 1]),
            (2, 0, [1, 0]),
            (3, 1, [0, 1]),
            (1, 1, [1, 0]),
        ] {
            let [negative, prompt] = order;
            let pair = sd
                .encode_prompt_pair(
                    prompts[prompt].as_str().unwrap(),
                    prompts[negative].as_str().unwrap(),
                    batch,
                    clip_skip,
                )
                .unwrap();
            let states = if clip_skip == 0 { &plain } else { &skip1 };
            let b = batch as i64;
            let want = Tensor::cat(
                &[
                    plain.get(negative as i64).unsqueeze(0).repeat([b, 1, 1]),
                    states.get(prompt as i64).unsqueeze(0).repeat([b, 1, 1]),
                ],
                0,
            );
            assert_close(
                &format!("{model} pair, batch {batch}, clip skip {clip_skip}"),
                &pair,
                &want,
                TOL,
            );
        }
    }
}

#[test]
fn vae_encode_decode_match_diffusers() {
    let _g = tch::no_grad_guard();
    for model in MODELS {
        let sd = load(model);
        let refs = Refs::open(model);
        let dist = sd.vae.encode(&refs.get("vae_input")).unwrap();
        assert_close(
            &format!("{model} vae_mean"),
            &dist.mean,
            &refs.get("vae_mean"),
            TOL,
        );
        assert_close(
            &format!("{model} vae_logvar"),
            &dist.logvar,
            &refs.get("vae_logvar"),
            TOL,
        );
        let decoded = sd.vae.decode(&refs.get("vae_latents")).unwrap();
        assert_close(
            &format!("{model} vae_decoded"),
            &decoded,
            &refs.get("vae_decoded"),
            TOL,
        );
    }
}

#[test]
fn unet_matches_diffusers() {
    let _g = tch::no_grad_guard();
    for model in MODELS {
        let sd = load(model);
        let refs = Refs::open(model);
        let meta = cases(model);
        let t = meta["unet_timestep"].as_f64().unwrap();
        let out = sd
            .unet
            .forward(&refs.get("unet_sample"), t, &refs.get("unet_ehs"))
            .unwrap();
        assert_close(
            &format!("{model} unet_out"),
            &out,
            &refs.get("unet_out"),
            TOL,
        );
        // Odd latent sides: upsampling must follow the skip connections' sizes.
        let t = meta["unet_odd_timestep"].as_f64().unwrap();
        let out = sd
            .unet
            .forward(&refs.get("unet_odd_sample"), t, &refs.get("unet_odd_ehs"))
            .unwrap();
        assert_close(
            &format!("{model} unet_odd_out"),
            &out,
            &refs.get("unet_odd_out"),
            TOL,
        );
    }
}

#[test]
fn unet_rejects_wrong_channel_count() {
    let sd = load("tiny-sd1");
    let sample = Tensor::zeros([1, 3, 8, 8], (tch::Kind::Float, tch::Device::Cpu));
    let ctx = Tensor::zeros([1, 77, 32], (tch::Kind::Float, tch::Device::Cpu));
    let err = sd.unet.forward(&sample, 1.0, &ctx).unwrap_err().to_string();
    assert!(err.contains("3 channels"), "{err}");
}
