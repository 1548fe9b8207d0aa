//! Config values from a file are range-checked before any model is built, and the size a config
//! describes is measured without allocating it: hostile values give errors naming the field,
//! never a panic or an allocation, and the measured size equals the model actually built.
mod common;

use common::{copy_dir, Pick, Rng};

use stable_diffusion::limits::MAX_COMPONENT_PARAMETERS;
use stable_diffusion::models::blocks::count_parameters;
use stable_diffusion::models::config::from_json_value;
use stable_diffusion::models::{
    AutoencoderKL, ClipTextConfig, ClipTextTransformer, UNet2DConditionModel, UNetConfig, VaeConfig,
};
use stable_diffusion::pipeline::{LoadOptions, StableDiffusion};
use tch::nn::VarStore;

fn built_parameters(build: impl FnOnce(tch::nn::Path)) -> u64 {
    let vs = VarStore::new(tch::Device::Cpu);
    build(vs.root());
    vs.variables().values().map(|t| t.numel() as u64).sum()
}

fn random_vae(rng: &mut Rng) -> serde_json::Value {
    let levels = 1 + rng.below(3);
    let channels: Vec<i64> = (0..levels).map(|i| 8 * (1 + i as i64)).collect();
    serde_json::json!({
        "block_out_channels": channels,
        "down_block_types": vec!["DownEncoderBlock2D"; levels],
        "up_block_types": vec!["UpDecoderBlock2D"; levels],
        "layers_per_block": 1 + (rng.below(2) as u64),
        "latent_channels": *rng.pick(&[4, 16]),
        "norm_num_groups": 8,
        "use_quant_conv": rng.below(2) == 0,
        "use_post_quant_conv": rng.below(2) == 0,
        "mid_block_add_attention": rng.below(2) == 0,
    })
}

fn random_text(rng: &mut Rng) -> serde_json::Value {
    let heads = *rng.pick(&[1, 2, 4]);
    serde_json::json!({
        "vocab_size": 100 + (rng.below(1000) as u64),
        "hidden_size": heads * 8,
        "intermediate_size": 16 + (rng.below(64) as u64),
        "num_hidden_layers": 1 + (rng.below(3) as u64),
        "num_attention_heads": heads,
        "max_position_embeddings": 77,
        "hidden_act": *rng.pick(&["quick_gelu", "gelu"]),
    })
}

#[test]
fn counted_parameters_equal_the_built_model() {
    let mut rng = Rng::new(7);
    for case in 0..60 {
        let unet: UNetConfig = serde_json::from_value(common::random_unet(&mut rng)).unwrap();
        let counted = count_parameters(|vs| UNet2DConditionModel::new(vs, &unet)).unwrap();
        let built = built_parameters(|vs| {
            UNet2DConditionModel::new(vs, &unet).unwrap();
        });
        assert_eq!(counted, built, "UNet case {case}: {unet:?}");

        let vae: VaeConfig = serde_json::from_value(random_vae(&mut rng)).unwrap();
        let counted = count_parameters(|vs| AutoencoderKL::new(vs, &vae)).unwrap();
        let built = built_parameters(|vs| {
            AutoencoderKL::new(vs, &vae).unwrap();
        });
        assert_eq!(counted, built, "VAE case {case}: {vae:?}");

        let text: ClipTextConfig = serde_json::from_value(random_text(&mut rng)).unwrap();
        let counted = count_parameters(|vs| ClipTextTransformer::new(vs, &text)).unwrap();
        let built = built_parameters(|vs| {
            ClipTextTransformer::new(vs, &text).unwrap();
        });
        assert_eq!(counted, built, "text encoder case {case}: {text:?}");
    }
}

#[test]
fn counting_a_huge_config_allocates_nothing() {
    // SD 1.5's UNet, closed form from the real model: 859,520,964 parameters.
    let sd15 = serde_json::json!({
        "block_out_channels": [320, 640, 1280, 1280], "cross_attention_dim": 768,
        "attention_head_dim": 8, "layers_per_block": 2, "in_channels": 4, "out_channels": 4,
    });
    let unet: UNetConfig = serde_json::from_value(sd15).unwrap();
    let n = count_parameters(|vs| UNet2DConditionModel::new(vs, &unet)).unwrap();
    assert_eq!(n, 859_520_964);
    // Within every per-field limit, yet far beyond any real model: counted in an instant.
    let huge = serde_json::json!({
        "block_out_channels": [16384, 16384, 16384, 16384], "cross_attention_dim": 16384,
        "attention_head_dim": 8, "layers_per_block": 64, "transformer_layers_per_block": 64,
    });
    let unet: UNetConfig = serde_json::from_value(huge).unwrap();
    let start = std::time::Instant::now();
    let n = count_parameters(|vs| UNet2DConditionModel::new(vs, &unet)).unwrap();
    assert!(n > MAX_COMPONENT_PARAMETERS, "{n}");
    assert!(start.elapsed().as_secs() < 10);
}

/// Hostile values for numeric config fields.
const HOSTILE: [f64; 12] = [
    0.0,
    -1.0,
    -8.0,
    3.0,
    1e9,
    4_294_967_296.0,
    9.2e18,
    -9.2e18,
    1e308,
    0.5,
    65_536.0,
    1.0,
];

/// Sets a random numeric field (or one entry of a numeric list) of `v` to a hostile value.
fn poison(rng: &mut Rng, v: &mut serde_json::Value) -> String {
    let obj = v.as_object_mut().unwrap();
    let keys: Vec<String> = obj
        .iter()
        .filter(|(_, x)| {
            x.is_number()
                || x.as_array()
                    .is_some_and(|a| a.iter().all(|y| y.is_number()))
        })
        .map(|(k, _)| k.clone())
        .collect();
    let key = keys[rng.below(keys.len())].clone();
    let value = *rng.pick(&HOSTILE);
    let as_json = if value.fract() == 0.0 && value.abs() < 9.3e18 {
        serde_json::json!(value as i64)
    } else {
        serde_json::json!(value)
    };
    let slot = obj.get_mut(&key).unwrap();
    match slot {
        serde_json::Value::Array(a) if !a.is_empty() => {
            let i = rng.below(a.len());
            a[i] = as_json.clone();
        }
        other => *other = as_json.clone(),
    }
    format!("{key} = {as_json}")
}

/// Every config a file can hold is either refused with a message naming the field, or is
/// counted without allocating; a counted one within the limit builds.
#[test]
fn hostile_config_values_are_refused_before_building() {
    let mut rng = Rng::new(11);
    let (mut refused, mut counted) = (0, 0);
    for case in 0..600 {
        let which = case % 3;
        let mut json = match which {
            0 => common::random_unet(&mut rng),
            1 => random_vae(&mut rng),
            _ => random_text(&mut rng),
        };
        let how = poison(&mut rng, &mut json);
        let what = format!("case {case} ({how})");
        let outcome = std::panic::catch_unwind(|| -> Result<u64, String> {
            let e = |e: stable_diffusion::Error| e.to_string();
            match which {
                0 => {
                    let c: UNetConfig = from_json_value(json.clone(), "config")?;
                    c.validate().map_err(e)?;
                    count_parameters(|vs| UNet2DConditionModel::new(vs, &c)).map_err(e)
                }
                1 => {
                    let c: VaeConfig = from_json_value(json.clone(), "config")?;
                    c.validate().map_err(e)?;
                    count_parameters(|vs| AutoencoderKL::new(vs, &c)).map_err(e)
                }
                _ => {
                    let c: ClipTextConfig = from_json_value(json.clone(), "config")?;
                    c.validate().map_err(e)?;
                    count_parameters(|vs| ClipTextTransformer::new(vs, &c)).map_err(e)
                }
            }
        });
        match outcome {
            Err(_) => panic!("{what}: panicked"),
            Ok(Err(msg)) => {
                refused += 1;
                let field = how.split(' ').next().unwrap();
                assert!(
                    msg.contains(field)
                        || msg.contains("invalid")
                        || msg.contains("must agree")
                        || msg.contains("divide")
                        || msg.contains("divisible")
                        || msg.contains("multiple"),
                    "{what}: message does not name the field: {msg}"
                );
            }
            Ok(Ok(n)) => {
                counted += 1;
                assert!(n > 0, "{what}");
            }
        }
    }
    println!("hostile configs: {refused} refused, {counted} valid and counted");
    assert!(refused > 100 && counted > 50, "{refused} / {counted}");
}

/// A diffusers folder whose config describes a model larger than its weight file is refused
/// before the model is built, naming the component.
#[test]
fn a_config_larger_than_its_weights_is_refused() {
    let base = common::fixtures().join("tiny-sd1");
    let dir = std::env::temp_dir().join(format!("sd-config-limits-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    copy_dir(&base, &dir);
    let path = dir.join("unet").join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    cfg["block_out_channels"] = serde_json::json!([4096, 8192]);
    cfg["cross_attention_dim"] = serde_json::json!(32);
    std::fs::write(&path, cfg.to_string()).unwrap();
    let before = std::fs::read(&path).unwrap();
    let start = std::time::Instant::now();
    let err = match StableDiffusion::load(&dir, &LoadOptions::default()) {
        Ok(_) => panic!("loaded a UNet config far larger than its weights"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("UNet") && err.contains("parameters"), "{err}");
    assert!(start.elapsed().as_secs() < 10);
    assert_eq!(std::fs::read(&path).unwrap(), before);
    let _ = std::fs::remove_dir_all(&dir);
}
