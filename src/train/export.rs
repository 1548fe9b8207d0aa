//! Writing the trained model as a diffusers folder (`model_index.json`, `scheduler/`,
//! `tokenizer/`, `text_encoder/`, `unet/`, `vae/`), which the pipeline's ordinary loader
//! reads like any downloaded Stable Diffusion checkpoint.
use super::clip::ClipOutput;
use super::unet::{scheduler_json, UNetOutput};
use super::vae::VaeOutput;
use super::vocab::{self, write_json, FullVocab};
use super::{dataset, dir_bytes, Recipe};
use crate::pipeline::{LoadOptions, StableDiffusion};
use crate::{Error, Result};
use serde_json::json;
use std::path::Path;
use tch::nn::VarStore;
use tch::{Kind, Tensor};

/// Writes the pruned tokenizer to `dir` and checks it against the full vocabulary. Returns
/// (tokens, merges, texts checked).
pub fn write_tokenizer(dir: &Path) -> Result<(usize, usize, usize)> {
    let full = FullVocab::load()?;
    let words = dataset::vocabulary_words();
    let pruned = vocab::prune(&full, &words);
    pruned.write(dir)?;
    let mut texts = dataset::all_captions(true);
    texts.extend(words);
    texts.push(String::new());
    texts.push("A Red CIRCLE, on a white background!".into());
    let checked = vocab::verify(dir, &full, &texts)?;
    Ok((pruned.tokens.len(), pruned.merges.len(), checked))
}

/// Variables of `vs` whose names start with `prefix`, in `kind`, sorted by name.
fn tensors_of(vs: &VarStore, prefix: &str, kind: Kind) -> Result<Vec<(String, Tensor)>> {
    let mut out: Vec<(String, Tensor)> = vs
        .variables()
        .into_iter()
        .filter(|(n, _)| n.starts_with(prefix))
        .map(|(n, t)| Ok((n, t.detach().f_to_kind(kind)?.f_contiguous()?)))
        .collect::<Result<_>>()?;
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

fn write_tensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    Tensor::write_safetensors(tensors, path)?;
    Ok(())
}

fn fresh_dir(dir: &Path) -> Result<()> {
    if dir.is_dir() {
        std::fs::remove_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))
}

/// Writes the model folder and loads it back with [`StableDiffusion::load`]. Returns its size
/// in bytes.
pub fn write_model(
    root: &Path,
    recipe: &Recipe,
    tokenizer_dir: &Path,
    vae: &VaeOutput,
    clip: &ClipOutput,
    unet: &UNetOutput,
) -> Result<u64> {
    std::fs::create_dir_all(root).map_err(|e| Error::io(root, e))?;
    write_json(
        &root.join("model_index.json"),
        &json!({
            "_class_name": "StableDiffusionPipeline",
            "_diffusers_version": "0.42.1",
            "feature_extractor": [null, null],
            "image_encoder": [null, null],
            "requires_safety_checker": false,
            "safety_checker": [null, null],
            "scheduler": ["diffusers", "DDIMScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"]
        }),
    )?;

    let dir = root.join("scheduler");
    fresh_dir(&dir)?;
    write_json(&dir.join("scheduler_config.json"), &scheduler_json())?;

    let dir = root.join("tokenizer");
    fresh_dir(&dir)?;
    for name in [
        "vocab.json",
        "merges.txt",
        "special_tokens_map.json",
        "tokenizer_config.json",
    ] {
        let (from, to) = (tokenizer_dir.join(name), dir.join(name));
        std::fs::copy(&from, &to).map_err(|e| Error::io(&from, e))?;
    }

    let dir = root.join("text_encoder");
    fresh_dir(&dir)?;
    let mut text = recipe.text.clone();
    let vocab = clip.config.vocab_size;
    text["vocab_size"] = json!(vocab);
    text["bos_token_id"] = json!(vocab - 2);
    text["eos_token_id"] = json!(vocab - 1);
    text["pad_token_id"] = json!(vocab - 1);
    text["dtype"] = json!("float32");
    write_json(&dir.join("config.json"), &text)?;
    write_tensors(
        &dir.join("model.safetensors"),
        &tensors_of(&clip.vs, "text_model.", Kind::Float)?,
    )?;

    let dir = root.join("vae");
    fresh_dir(&dir)?;
    let mut cfg = recipe.vae.clone();
    cfg["scaling_factor"] = json!(vae.scaling_factor);
    cfg["_diffusers_version"] = json!("0.42.1");
    write_json(&dir.join("config.json"), &cfg)?;
    write_tensors(
        &dir.join("diffusion_pytorch_model.safetensors"),
        &tensors_of(&vae.vs, "", Kind::Float)?,
    )?;

    let dir = root.join("unet");
    fresh_dir(&dir)?;
    let mut cfg = recipe.unet.clone();
    cfg["_diffusers_version"] = json!("0.42.1");
    write_json(&dir.join("config.json"), &cfg)?;
    // fp16 keeps the folder small; the loader converts to the dtype asked for.
    write_tensors(
        &dir.join("diffusion_pytorch_model.fp16.safetensors"),
        &tensors_of(&unet.vs, "", Kind::Half)?,
    )?;

    // The folder must load through the ordinary loader, and give the same text embeddings.
    let sd = StableDiffusion::load(root, &LoadOptions::default())?;
    let _g = tch::no_grad_guard();
    let prompt = "a small red circle in the top left on a white background";
    let ids = Tensor::f_from_slice(&clip.tokenizer.encode_padded(prompt))?.f_unsqueeze(0)?;
    let ours = clip.text.forward(&ids, 0)?;
    let loaded = sd.encode_prompt(prompt, 1, 0)?;
    let diff = ours.f_sub(&loaded)?.f_abs()?.f_max()?.f_double_value(&[])?;
    if diff > 1e-4 {
        return Err(Error::Internal(format!(
            "exported text encoder differs from the trained one by {diff}"
        )));
    }
    Ok(dir_bytes(root))
}
