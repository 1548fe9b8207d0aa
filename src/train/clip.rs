//! Stage 2: CLIP. The CLIP text transformer (the very [`ClipTextTransformer`] the pipeline
//! loads, fed by the real CLIP tokenizer) and a small image encoder learn a shared embedding
//! space with the symmetric contrastive loss: in a batch of n (image, caption) pairs, the
//! n x n similarity matrix should pick the diagonal, row-wise and column-wise.
//!
//! The text feature is CLIP's: the final hidden state at the end-of-text token. The text
//! encoder is causal, so the states up to that token do not depend on the padding after it:
//! training pads to the batch's longest caption instead of 77 tokens.
use super::dataset::{self, Rng, Spec, Split};
use super::{record_figures, run_stage, seeded_store, streams, Recipe, StageOutcome, StageRun};
use crate::models::clip_vision::{ClipImageEncoder, ContrastiveHead};
use crate::models::{ClipTextConfig, ClipTextTransformer};
use crate::tokenizer::ClipTokenizer;
use crate::{Error, Result};
use std::collections::HashSet;
use std::path::Path;
use tch::nn::VarStore;
use tch::{Kind, Tensor};

pub struct ClipOutput {
    /// Holds `text_model.*` (shipped) and `vision_model.*` / the head (training only).
    pub vs: VarStore,
    pub text: ClipTextTransformer,
    pub config: ClipTextConfig,
    pub tokenizer: ClipTokenizer,
    pub outcome: StageOutcome,
    /// Image-to-text top-1 retrieval accuracy among `candidates` captions, for images of the
    /// held-out combinations and for fresh images of the training combinations.
    pub retrieval_held_out: f64,
    pub retrieval_train: f64,
    pub candidates: usize,
}

/// The text encoder config of the recipe, sized to the tokenizer's vocabulary.
pub fn text_config(recipe: &Recipe, vocab_size: usize) -> Result<ClipTextConfig> {
    let mut json = recipe.text.clone();
    json["vocab_size"] = serde_json::json!(vocab_size);
    let cfg: ClipTextConfig = serde_json::from_value(json)
        .map_err(|e| Error::bad_model(format!("text encoder recipe: {e}")))?;
    cfg.validate()?;
    Ok(cfg)
}

/// Token ids `[b, len]` padded to the longest caption, and each caption's end-token index.
pub fn tokenize(tok: &ClipTokenizer, captions: &[String]) -> Result<(Tensor, Tensor)> {
    let encoded: Vec<Vec<i64>> = captions.iter().map(|c| tok.encode(c)).collect();
    let len = encoded
        .iter()
        .map(Vec::len)
        .max()
        .unwrap_or(2)
        .min(tok.max_length());
    let mut flat = Vec::with_capacity(len * captions.len());
    let mut ends = Vec::with_capacity(captions.len());
    for ids in &encoded {
        let mut ids = ids.clone();
        if ids.len() > len {
            ids.truncate(len - 1);
            ids.push(tok.eos_id());
        }
        ends.push(ids.len() as i64 - 1);
        ids.resize(len, tok.pad_id());
        flat.extend(ids);
    }
    let ids = Tensor::f_from_slice(&flat)?.f_view([captions.len() as i64, len as i64])?;
    Ok((ids, Tensor::f_from_slice(&ends)?))
}

/// The models of the stage.
pub struct ClipModels {
    pub text: ClipTextTransformer,
    pub image: ClipImageEncoder,
    pub head: ContrastiveHead,
}

impl ClipModels {
    /// Unit text embeddings of captions.
    pub fn embed_text(&self, tok: &ClipTokenizer, captions: &[String]) -> Result<Tensor> {
        let (ids, ends) = tokenize(tok, captions)?;
        let hidden = self.text.forward(&ids, 0)?;
        let b = ids.size()[0];
        let rows = Tensor::f_arange(b, (Kind::Int64, hidden.device()))?;
        let pooled = hidden.f_index(&[Some(rows), Some(ends)])?;
        self.head.embed_text(&pooled)
    }

    pub fn embed_images(&self, images: &Tensor) -> Result<Tensor> {
        self.head.embed_image(&self.image.forward(images)?)
    }
}

/// `n` specs of `split` whose full captions are all different.
pub fn distinct_specs(rng: &mut Rng, split: Split, n: usize, size: usize) -> Vec<Spec> {
    let mut seen = HashSet::new();
    let mut out = Vec::with_capacity(n);
    let mut tries = 0;
    while out.len() < n && tries < 100 * n {
        tries += 1;
        let s = Spec::sample(rng, split, size);
        if seen.insert(s.caption()) {
            out.push(s);
        }
    }
    out
}

/// Trains (or resumes, or loads) CLIP and measures retrieval.
pub fn train(recipe: &Recipe, run: &StageRun, tokenizer_dir: &Path) -> Result<ClipOutput> {
    let tok = ClipTokenizer::from_dir(tokenizer_dir)?;
    let vocab_size = count_vocab(tokenizer_dir)?;
    let cfg = text_config(recipe, vocab_size)?;
    let vision = recipe.vision.clone();
    let (vs, models) = seeded_store(run.seed ^ streams::CLIP, |vs| {
        let text = ClipTextTransformer::new(vs.root(), &cfg)?;
        let image = ClipImageEncoder::new(vs.root() / "vision_model", &vision)?;
        let head = ContrastiveHead::new(
            vs.root(),
            cfg.hidden_size,
            image.width(),
            vision.projection_dim,
        );
        Ok(ClipModels { text, image, head })
    })?;
    let size = recipe.image_size;
    let batch = recipe.clip_batch;
    let seed = run.seed;
    let mut outcome = run_stage(run, &vs, |step| {
        let mut rng = Rng::derive(seed, streams::CLIP, step as u64);
        let specs = distinct_specs(&mut rng, Split::Train, batch, size);
        let images: Vec<Vec<u8>> = specs.iter().map(dataset::render).collect();
        let images = dataset::to_tensor(&images, size)?;
        let captions: Vec<String> = specs.iter().map(Spec::caption).collect();
        let t = models.embed_text(&tok, &captions)?;
        let i = models.embed_images(&images)?;
        models.head.loss(&i, &t)
    })?;
    let n = recipe.figure_images.min(200);
    let held = retrieval(&models, &tok, recipe, seed, Split::HeldOut, n)?;
    let train = retrieval(&models, &tok, recipe, seed, Split::Train, n)?;
    outcome
        .figures
        .insert("retrieval_held_out".into(), held.into());
    outcome
        .figures
        .insert("retrieval_train".into(), train.into());
    outcome.figures.insert("candidates".into(), n.into());
    record_figures(run, &outcome.figures)?;
    Ok(ClipOutput {
        vs,
        text: models.text,
        config: cfg,
        tokenizer: tok,
        outcome,
        retrieval_held_out: held,
        retrieval_train: train,
        candidates: n,
    })
}

/// Image-to-text top-1 accuracy: for each of `n` fresh images (distinct captions) of
/// `split`, is its own caption the most similar of the `n` captions?
pub fn retrieval(
    models: &ClipModels,
    tok: &ClipTokenizer,
    recipe: &Recipe,
    seed: u64,
    split: Split,
    n: usize,
) -> Result<f64> {
    let _g = tch::no_grad_guard();
    let mut rng = Rng::derive(seed, streams::EVAL, 2 + split as u64);
    let specs = distinct_specs(&mut rng, split, n, recipe.image_size);
    let images: Vec<Vec<u8>> = specs.iter().map(dataset::render).collect();
    let images = dataset::to_tensor(&images, recipe.image_size)?;
    let captions: Vec<String> = specs.iter().map(Spec::caption).collect();
    let t = models.embed_text(tok, &captions)?;
    let i = models.embed_images(&images)?;
    let best = i.f_matmul(&t.f_tr()?)?.f_argmax(-1, false)?;
    let truth = Tensor::f_arange(specs.len() as i64, (Kind::Int64, best.device()))?;
    let correct = best
        .f_eq_tensor(&truth)?
        .f_to_kind(Kind::Float)?
        .f_mean(Kind::Float)?;
    Ok(correct.f_double_value(&[])?)
}

/// Number of entries of `vocab.json` in a tokenizer folder.
pub fn count_vocab(dir: &Path) -> Result<usize> {
    let path = dir.join("vocab.json");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let v: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&text).map_err(|e| Error::Json {
            path: path.clone(),
            source: e,
        })?;
    Ok(v.len())
}
