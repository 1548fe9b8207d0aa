//! Prompts read as A1111 reads them, against `tools/fixtures/a1111_prompts.py`: a reference
//! written from A1111's documented behaviour on transformers' CLIP (it shares nothing with our
//! code). Fragments and weights, chunks and their tokens, the weighted joined embeddings of SD
//! 1.x/2.x, and whole SD 1.x and SDXL pipelines against diffusers given those embeddings.
mod common;

use common::{assert_close, cases, err_text, fixtures, Refs};
use stable_diffusion::pipeline::{GenerateParams, LoadOptions, PromptSyntax, StableDiffusion};
use stable_diffusion::prompt::{chunk_tokens, parse_attention, Piece};

const SET: &str = "a1111-prompts";

fn load(model: &str) -> StableDiffusion {
    StableDiffusion::load(&fixtures().join(model), &LoadOptions::default())
        .unwrap_or_else(|e| panic!("{model}: {e}"))
}

/// Each case's fragments, chunks (token ids and weights) and embeddings.
#[test]
fn prompts_parse_chunk_and_encode_as_a1111() {
    let refs = Refs::open(SET);
    let all = cases(SET);
    let list = all["encoder"].as_array().unwrap();
    assert!(list.len() >= 12);
    for model in ["tiny-sd1", "tiny-sd2"] {
        let sd = load(model);
        for case in list.iter().filter(|c| c["model"] == model) {
            let name = format!("{model}/{}", case["name"].as_str().unwrap());
            let prompt = case["prompt"].as_str().unwrap();
            let pieces = parse_attention(prompt).unwrap();
            let want: Vec<Piece> = case["fragments"]
                .as_array()
                .unwrap()
                .iter()
                .map(|f| match (f[0].as_str().unwrap(), f[1].as_f64().unwrap()) {
                    (text, weight) if text == "BREAK" && weight == -1.0 => Piece::Break,
                    (text, weight) => Piece::Text {
                        text: text.to_string(),
                        weight,
                    },
                })
                .collect();
            assert_eq!(pieces, want, "{name}: fragments");
            let chunks = chunk_tokens(&sd.tokenizer, &pieces, &[]);
            let tokens: Vec<Vec<i64>> = chunks.iter().map(|c| c.tokens.clone()).collect();
            let want_tokens: Vec<Vec<i64>> =
                serde_json::from_value(case["chunks"].clone()).unwrap();
            assert_eq!(tokens, want_tokens, "{name}: chunk tokens");
            let weights: Vec<Vec<f64>> = chunks.iter().map(|c| c.weights.clone()).collect();
            let want_weights: Vec<Vec<f64>> =
                serde_json::from_value(case["weights"].clone()).unwrap();
            assert_eq!(weights, want_weights, "{name}: chunk weights");
            let clip_skip = case["clip_skip"].as_u64().unwrap() as usize;
            let z = sd.encode_prompt_a1111(prompt, clip_skip).unwrap();
            // Values up to about 5: 4e-5 is a few float32 rounding steps, which differ
            // between CPUs (AVX2 against AVX-512 kernels); the references come from one.
            assert_close(&name, &z, &refs.get(&name), 4e-5);
        }
    }
}

/// A two-chunk prompt against a one-chunk negative prompt (padded with the empty prompt's
/// chunk), through the whole pipeline: diffusers' image given the reference embeddings.
#[test]
fn a1111_prompts_through_the_pipeline_match_diffusers() {
    let refs = Refs::open(SET);
    for case in cases(SET)["pipeline"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let sd = load(case["model"].as_str().unwrap());
        let params = GenerateParams {
            prompt: case["prompt"].as_str().unwrap().into(),
            negative_prompt: Some(case["negative_prompt"].as_str().unwrap().into()),
            steps: case["steps"].as_u64().unwrap() as usize,
            guidance: case["guidance"].as_f64().unwrap(),
            seed: case["seed"].as_u64().unwrap(),
            width: case["width"].as_i64(),
            height: case["height"].as_i64(),
            prompt_syntax: PromptSyntax::A1111,
            ..Default::default()
        };
        let images = sd.generate(&params, None).unwrap();
        let want = refs.get(&format!("pipeline/{name}"));
        assert_close(name, &images.pixels, &want, 1e-3);
        // The plain reading of the same text is another image.
        let plain = sd
            .generate(
                &GenerateParams {
                    prompt_syntax: PromptSyntax::Plain,
                    ..params
                },
                None,
            )
            .unwrap();
        assert!(common::max_abs_diff(&plain.pixels, &want) > 1e-3, "{name}");
    }
}

/// Prompts without any syntax and within 75 tokens read the same either way, bit for bit (the
/// emphasis of weights 1 changes nothing), on random words.
#[test]
fn prompts_without_syntax_read_as_plain_ones() {
    let sd = load("tiny-sd1");
    let words = [
        "red",
        "circle",
        "on",
        "a",
        "white",
        "background",
        "blue",
        "square,",
    ];
    let mut state = 11u64;
    for case in 0..20 {
        let n = 1 + case % 12;
        let prompt: Vec<&str> = (0..n)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                words[(state >> 33) as usize % words.len()]
            })
            .collect();
        let prompt = prompt.join(" ");
        let a1111 = sd.encode_prompt_a1111(&prompt, 0).unwrap();
        let plain = sd.encode_prompt(&prompt, 1, 0).unwrap();
        assert_eq!(common::max_abs_diff(&a1111, &plain), 0.0, "{prompt:?}");
    }
}

/// A prompt of more chunks than the limit, or with a weight that overflows, is refused with
/// what is wrong named; through `generate` too.
#[test]
fn a1111_prompt_limits_are_named() {
    let sd = load("tiny-sd1");
    let long = "circle ".repeat(75 * 33);
    let err = err_text(sd.encode_prompt_a1111(&long, 0));
    assert!(err.contains("prompt") && err.contains("chunks"), "{err}");
    let params = GenerateParams {
        prompt: "a circle".into(),
        negative_prompt: Some(format!("(dark:1{})", "0".repeat(400))),
        steps: 1,
        width: Some(32),
        height: Some(32),
        prompt_syntax: PromptSyntax::A1111,
        ..Default::default()
    };
    let err = err_text(sd.generate(&params, None));
    assert!(
        err.contains("negative prompt") && err.contains("finite"),
        "{err}"
    );
    // Refused before a run, where the C ABI checks a job at submission.
    let err = err_text(sd.validator().validate(&params).map(|_| ()));
    assert!(
        err.contains("negative prompt") && err.contains("finite"),
        "{err}"
    );
    let long_prompt = GenerateParams {
        prompt: long,
        negative_prompt: None,
        ..params
    };
    let err = err_text(sd.validator().validate(&long_prompt).map(|_| ()));
    assert!(err.contains("chunks"), "{err}");
    // SDXL's second prompt goes through the second tokenizer, and is named.
    let sdxl = load("tiny-sdxl");
    let second = GenerateParams {
        prompt: "a castle".into(),
        prompt_2: Some(format!("(fog:1{})", "0".repeat(400))),
        ..long_prompt
    };
    let err = err_text(sdxl.generate(&second, None));
    assert!(err.contains("prompt 2") && err.contains("finite"), "{err}");
}
