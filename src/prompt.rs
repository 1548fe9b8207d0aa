//! Prompts as the AUTOMATIC1111 web UI (A1111) reads them: attention weights in brackets and
//! `BREAK`, then the token chunks its CLIP wrapper encodes.
//!
//! - `(text)` multiplies the weight of `text` by 1.1, `[text]` divides it by 1.1, `(text:1.5)`
//!   sets a factor of 1.5; brackets nest and their factors multiply, in the order the brackets
//!   close (so the floating-point weights are A1111's to the last bit). `\(`, `\)`, `\[`, `\]`
//!   and `\\` are the literal characters. A bracket never closed applies its factor from where
//!   it opened to the end of the prompt; a closing bracket with none open is literal text.
//! - `BREAK` (a whole word, in capitals) ends the current chunk of 75 tokens.
//! - Each fragment is tokenised on its own, the tokens packed into chunks of 75 (moving the
//!   words after the last comma of a full chunk into the next one when the comma is at most 20
//!   tokens back), each chunk wrapped in start and end tokens and padded to 77.
//!
//! Where A1111 itself fails or misbehaves we do something plainer, said here once: a weight
//! that is not a number (`(a:.)`, `:..)`) is literal text where A1111 raises an error; `BREAK`
//! inside brackets still breaks the chunk, where A1111 encodes the word with a negative weight;
//! a weight that is not finite (`(a:1` followed by 400 digits`)`) is an error naming it.
use crate::embeddings::{embedding_at, TokenEmbedding};
use crate::limits::MAX_PROMPT_CHUNKS;
use crate::tokenizer::ClipTokenizer;
use crate::{Error, Result};
use tch::{Kind, Tensor};

/// How the text of a prompt is read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum PromptSyntax {
    /// As diffusers: the text as it is, cut at the tokenizer's 77 tokens.
    #[default]
    Plain,
    /// As A1111: attention weights, `BREAK`, and prompts longer than 75 tokens in chunks of 75,
    /// each encoded on its own and joined (up to [`MAX_PROMPT_CHUNKS`]). The positive and
    /// negative prompts are padded to the same number of chunks with empty ones.
    A1111,
}

/// A1111's factors for `(text)` and `[text]`.
const ROUND_FACTOR: f64 = 1.1;
const SQUARE_FACTOR: f64 = 1.0 / 1.1;

/// How many tokens back a comma may be for the words after it to move to the next chunk
/// (A1111's `comma_padding_backtrack`, default 20).
pub const COMMA_BACKTRACK: usize = 20;

/// One parsed piece of a prompt.
#[derive(Debug, Clone, PartialEq)]
pub enum Piece {
    /// Text with the product of its brackets' factors.
    Text { text: String, weight: f64 },
    /// `BREAK`: the next text starts a new chunk.
    Break,
}

/// The pieces of `prompt` in order, adjacent texts of equal weight merged (A1111's
/// `parse_prompt_attention`); an empty prompt is one empty text of weight 1.
pub fn parse_attention(prompt: &str) -> Result<Vec<Piece>> {
    let mut pieces: Vec<Piece> = Vec::new();
    let mut round: Vec<usize> = Vec::new();
    let mut square: Vec<usize> = Vec::new();
    let multiply = |pieces: &mut Vec<Piece>, from: usize, factor: f64| {
        for piece in &mut pieces[from..] {
            if let Piece::Text { weight, .. } = piece {
                *weight *= factor;
            }
        }
    };
    let text_piece = |text: &str| Piece::Text {
        text: text.to_string(),
        weight: 1.0,
    };
    let mut rest = prompt;
    while let Some(c) = rest.chars().next() {
        match c {
            '\\' => {
                // `\(`, `\)`, `\[`, `\]`, `\\`: the character; a lone backslash: nothing.
                let next = rest[1..].chars().next().filter(|n| "()[]\\".contains(*n));
                let taken = 1 + next.map_or(0, char::len_utf8);
                pieces.push(text_piece(&rest[1..taken]));
                rest = &rest[taken..];
            }
            '(' => {
                round.push(pieces.len());
                rest = &rest[1..];
            }
            '[' => {
                square.push(pieces.len());
                rest = &rest[1..];
            }
            ':' => match weight_close(rest) {
                Some((factor, taken)) if !round.is_empty() => {
                    let from = round.pop().unwrap_or(0);
                    multiply(&mut pieces, from, factor);
                    rest = &rest[taken..];
                }
                // Not a weight, or no bracket open: a plain run of text up to the next special
                // character (A1111 takes the whole `:1.5)` as text then).
                matched => {
                    let taken = matched.map_or(1, |(_, taken)| taken);
                    push_text(&mut pieces, &rest[..taken]);
                    rest = &rest[taken..];
                }
            },
            ')' if !round.is_empty() => {
                let from = round.pop().unwrap_or(0);
                multiply(&mut pieces, from, ROUND_FACTOR);
                rest = &rest[1..];
            }
            ']' if !square.is_empty() => {
                let from = square.pop().unwrap_or(0);
                multiply(&mut pieces, from, SQUARE_FACTOR);
                rest = &rest[1..];
            }
            ')' | ']' => {
                push_text(&mut pieces, &rest[..1]);
                rest = &rest[1..];
            }
            _ => {
                let end = rest
                    .find(['\\', '(', ')', '[', ']', ':'])
                    .unwrap_or(rest.len());
                push_text(&mut pieces, &rest[..end]);
                rest = &rest[end..];
            }
        }
    }
    // Brackets never closed apply from where they opened, in the order they were opened.
    for from in round {
        multiply(&mut pieces, from, ROUND_FACTOR);
    }
    for from in square {
        multiply(&mut pieces, from, SQUARE_FACTOR);
    }
    let mut merged: Vec<Piece> = Vec::with_capacity(pieces.len());
    for piece in pieces {
        match (merged.last_mut(), piece) {
            (
                Some(Piece::Text { text, weight }),
                Piece::Text {
                    text: more,
                    weight: w,
                },
            ) if *weight == w => text.push_str(&more),
            (_, piece) => merged.push(piece),
        }
    }
    if merged.is_empty() {
        merged.push(text_piece(""));
    }
    for piece in &merged {
        if let Piece::Text { text, weight } = piece {
            if !weight.is_finite() {
                return Err(Error::invalid(format!(
                    "prompt: the weight of {:?} is {weight}, not a finite number",
                    truncate(text, 40)
                )));
            }
        }
    }
    Ok(merged)
}

/// At a `:`, A1111's `:\s*([+-]?[.\d]+)\s*\)`: the factor and the bytes taken, or `None` where
/// the text does not have that shape or its number does not parse (`:..)`, which A1111 fails
/// on); the caller then takes the `:` as text.
fn weight_close(at: &str) -> Option<(f64, usize)> {
    let after_colon = &at[1..];
    let number_start = after_colon.trim_start_matches(is_space);
    let unsigned = number_start
        .strip_prefix(['+', '-'])
        .unwrap_or(number_start);
    let digits = unsigned
        .find(|c: char| c != '.' && !c.is_ascii_digit())
        .unwrap_or(unsigned.len());
    if digits == 0 {
        return None;
    }
    let number_end = &unsigned[digits..];
    let close = number_end.trim_start_matches(is_space);
    if !close.starts_with(')') {
        return None;
    }
    let number = &number_start[..number_start.len() - number_end.len()];
    let taken = at.len() - close.len() + 1;
    number.parse::<f64>().ok().map(|factor| (factor, taken))
}

/// Python's `\s` on text: Unicode white space, with the information separators it counts too.
fn is_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// Plain text, split at each `BREAK` (a whole word; the white space around it goes with it).
fn push_text(pieces: &mut Vec<Piece>, text: &str) {
    let mut rest = text;
    loop {
        match find_break(rest) {
            Some((before, after)) => {
                pieces.push(Piece::Text {
                    text: rest[..before].to_string(),
                    weight: 1.0,
                });
                pieces.push(Piece::Break);
                rest = &rest[after..];
            }
            None => {
                pieces.push(Piece::Text {
                    text: rest.to_string(),
                    weight: 1.0,
                });
                return;
            }
        }
    }
}

/// The first `\s*\bBREAK\b\s*` in `text`: where the white space before it starts and where
/// the white space after it ends.
fn find_break(text: &str) -> Option<(usize, usize)> {
    let word = |c: Option<char>| c.is_some_and(|c| c.is_alphanumeric() || c == '_');
    let mut from = 0;
    while let Some(found) = text[from..].find("BREAK") {
        let start = from + found;
        let end = start + "BREAK".len();
        if !word(text[..start].chars().next_back()) && !word(text[end..].chars().next()) {
            let before = text[..start].trim_end_matches(is_space).len();
            let after = text.len() - text[end..].trim_start_matches(is_space).len();
            return Some((before, after));
        }
        from = end;
    }
    None
}

fn truncate(text: &str, chars: usize) -> String {
    match text.char_indices().nth(chars) {
        Some((i, _)) => format!("{}...", &text[..i]),
        None => text.to_string(),
    }
}

/// One chunk for the text encoder: start token, up to 75 tokens of the prompt, end token,
/// padding to the tokenizer's length; each token's weight (1 for the special ones).
#[derive(Debug, Clone, PartialEq)]
pub struct PromptChunk {
    pub tokens: Vec<i64>,
    pub weights: Vec<f64>,
    /// Where embeddings' vectors go: each at a token position, by its index in the list
    /// [`chunk_tokens`] was given; its placeholder tokens are 0, as A1111's.
    pub fixes: Vec<ChunkFix>,
}

/// Embedding `embedding`'s vectors take tokens `position..` of a chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkFix {
    pub position: usize,
    pub embedding: usize,
}

/// The chunks A1111's CLIP wrapper encodes for `pieces` (its `tokenize_line`): each text
/// tokenised on its own, tokens packed into chunks of `max_length - 2`, a full chunk handing
/// the words after its last comma to the next one when that comma is at most
/// [`COMMA_BACKTRACK`] tokens back, `BREAK` closing the chunk. At least one chunk.
///
/// Where the tokens of an embedding's name appear (the longest name first), its vectors take
/// their place, as many tokens as it has vectors, in the current chunk or, when they do not fit,
/// the next (A1111's rule). Where A1111 leaves an embedding behind when the comma backtracking
/// moves the words after a comma on, ours moves with them.
pub fn chunk_tokens(
    tokenizer: &ClipTokenizer,
    pieces: &[Piece],
    embeddings: &[TokenEmbedding],
) -> Vec<PromptChunk> {
    let length = tokenizer.max_length().saturating_sub(2).max(1);
    let comma = tokenizer.vocab_id(",</w>");
    let mut chunks = Vec::new();
    let mut tokens: Vec<i64> = Vec::with_capacity(length);
    let mut weights: Vec<f64> = Vec::with_capacity(length);
    let mut fixes: Vec<ChunkFix> = Vec::new();
    let mut last_comma: Option<usize> = None;
    let close = |tokens: &mut Vec<i64>,
                 weights: &mut Vec<f64>,
                 fixes: &mut Vec<ChunkFix>,
                 chunks: &mut Vec<PromptChunk>| {
        let mut ids = Vec::with_capacity(length + 2);
        ids.push(tokenizer.bos_id());
        ids.append(tokens);
        ids.push(tokenizer.eos_id());
        ids.resize(tokenizer.max_length().max(ids.len()), tokenizer.pad_id());
        let mut w = Vec::with_capacity(ids.len());
        w.push(1.0);
        w.append(weights);
        w.resize(ids.len(), 1.0);
        chunks.push(PromptChunk {
            tokens: ids,
            weights: w,
            // Positions count the start token.
            fixes: fixes
                .drain(..)
                .map(|f| ChunkFix {
                    position: f.position + 1,
                    ..f
                })
                .collect(),
        });
    };
    for piece in pieces {
        let (text, weight) = match piece {
            Piece::Break => {
                close(&mut tokens, &mut weights, &mut fixes, &mut chunks);
                last_comma = None;
                continue;
            }
            Piece::Text { text, weight } => (text, *weight),
        };
        let ids = tokenizer.encode(text);
        let inner = &ids[1..ids.len().saturating_sub(1)];
        let mut i = 0;
        while i < inner.len() {
            let id = inner[i];
            if Some(id) == comma {
                last_comma = Some(tokens.len());
            } else if tokens.len() == length {
                if let Some(at) = last_comma.filter(|&at| length - at <= COMMA_BACKTRACK) {
                    let moved_tokens = tokens.split_off(at + 1);
                    let moved_weights = weights.split_off(at + 1);
                    let kept = fixes.iter().take_while(|f| f.position <= at).count();
                    let moved_fixes: Vec<ChunkFix> = fixes
                        .split_off(kept)
                        .into_iter()
                        .map(|f| ChunkFix {
                            position: f.position - (at + 1),
                            ..f
                        })
                        .collect();
                    close(&mut tokens, &mut weights, &mut fixes, &mut chunks);
                    tokens = moved_tokens;
                    weights = moved_weights;
                    fixes = moved_fixes;
                    last_comma = None;
                }
            }
            if tokens.len() == length {
                close(&mut tokens, &mut weights, &mut fixes, &mut chunks);
                last_comma = None;
            }
            let found = embedding_at(&inner[i..], embeddings).filter(|&k| {
                let n = embeddings[k].len();
                n > 0 && n <= length
            });
            if let Some(k) = found {
                let n = embeddings[k].len();
                if tokens.len() + n > length {
                    close(&mut tokens, &mut weights, &mut fixes, &mut chunks);
                    last_comma = None;
                }
                fixes.push(ChunkFix {
                    position: tokens.len(),
                    embedding: k,
                });
                tokens.resize(tokens.len() + n, 0);
                weights.resize(weights.len() + n, weight);
                i += embeddings[k].ids.len();
                continue;
            }
            tokens.push(id);
            weights.push(weight);
            i += 1;
        }
    }
    if !tokens.is_empty() || chunks.is_empty() {
        close(&mut tokens, &mut weights, &mut fixes, &mut chunks);
    }
    chunks
}

/// `prompt` read with A1111's syntax into chunks for `tokenizer`; `what` names it in errors.
pub fn prompt_chunks(
    tokenizer: &ClipTokenizer,
    prompt: &str,
    what: &str,
    embeddings: &[TokenEmbedding],
) -> Result<Vec<PromptChunk>> {
    let pieces = parse_attention(prompt).map_err(|e| Error::invalid(format!("{what}: {e}")))?;
    let chunks = chunk_tokens(tokenizer, &pieces, embeddings);
    if chunks.len() > MAX_PROMPT_CHUNKS {
        let per = tokenizer.max_length().saturating_sub(2);
        return Err(Error::invalid(format!(
            "{what} is {} chunks of {per} tokens: the limit is {MAX_PROMPT_CHUNKS}",
            chunks.len()
        )));
    }
    Ok(chunks)
}

/// Pads `chunks` to `count` with the empty prompt's chunk (what A1111 adds to the shorter of
/// the prompt and the negative prompt).
pub fn pad_chunks(tokenizer: &ClipTokenizer, chunks: &mut Vec<PromptChunk>, count: usize) {
    let empty = chunk_tokens(tokenizer, &[], &[]);
    while chunks.len() < count {
        chunks.extend(empty.iter().cloned());
    }
}

/// A1111's default emphasis on one chunk's hidden states `z` `[1, tokens, dim]`: each token's
/// state times its weight, then the whole rescaled so that its mean is the mean it had before.
/// Computed in float32 (A1111's weights are a float32 tensor), returned in `z`'s dtype.
pub fn apply_emphasis(z: &Tensor, weights: &[f64]) -> Result<Tensor> {
    let z32 = z.f_to_kind(Kind::Float)?;
    let w: Vec<f32> = weights.iter().map(|&w| w as f32).collect();
    let w = Tensor::f_from_slice(&w)?
        .f_to_device(z.device())?
        .f_view([1, -1, 1])?;
    let before = z32.f_mean(Kind::Float)?;
    let weighted = z32.f_mul(&w)?;
    let after = weighted.f_mean(Kind::Float)?;
    Ok(weighted
        .f_mul(&before.f_div(&after)?)?
        .f_to_kind(z.kind())?)
}

/// An extra-network tag of a prompt, `<kind:arg:arg...>` (A1111's `<lora:NAME:WEIGHT>`).
#[derive(Debug, Clone, PartialEq)]
pub struct ExtraNetwork {
    pub kind: String,
    pub args: Vec<String>,
}

/// `prompt` without its extra-network tags, and the tags in order (A1111's `<(\w+):([^>]+)>`:
/// a kind of letters, digits or `_`, a colon, then anything up to the next `>`).
pub fn extra_networks(prompt: &str) -> (String, Vec<ExtraNetwork>) {
    let mut text = String::with_capacity(prompt.len());
    let mut tags = Vec::new();
    let mut rest = prompt;
    while let Some(open) = rest.find('<') {
        let after = &rest[open + 1..];
        let kind_len: usize = after
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .map(char::len_utf8)
            .sum();
        let tag = (kind_len > 0 && after[kind_len..].starts_with(':'))
            .then(|| {
                let body = &after[kind_len + 1..];
                let close = body.find('>')?;
                (close > 0).then_some((close, body))
            })
            .flatten();
        match tag {
            Some((close, body)) => {
                text.push_str(&rest[..open]);
                tags.push(ExtraNetwork {
                    kind: after[..kind_len].to_string(),
                    args: body[..close].split(':').map(str::to_string).collect(),
                });
                rest = &body[close + 1..];
            }
            None => {
                text.push_str(&rest[..open + 1]);
                rest = after;
            }
        }
    }
    text.push_str(rest);
    (text, tags)
}

/// A `<lora:NAME[:WEIGHT[:UNET_WEIGHT]]>` tag: the LoRA's name and its text-encoder and UNet
/// weights (A1111: the first weight is the text encoders', the UNet's defaults to it; both
/// default to 1; `te=` and `unet=` name them).
#[derive(Debug, Clone, PartialEq)]
pub struct LoraTag {
    pub name: String,
    pub text: f64,
    pub unet: f64,
}

/// The `<lora:...>` tags of `prompt` (`what` names it in errors); other kinds of extra
/// network (hypernetworks) are refused by name.
pub fn lora_tags(prompt: &str, what: &str) -> Result<Vec<LoraTag>> {
    let mut out = Vec::new();
    for tag in extra_networks(prompt).1 {
        let shown = format!("<{}:{}>", tag.kind, tag.args.join(":"));
        if tag.kind != "lora" && tag.kind != "lyco" {
            return Err(Error::Unsupported(format!(
                "{what}: `{shown}`: only <lora:...> extra networks are applied"
            )));
        }
        let number = |s: &str| -> Result<f64> {
            let v: f64 = s
                .trim()
                .parse()
                .map_err(|_| Error::invalid(format!("{what}: `{shown}`: `{s}` is not a number")))?;
            if v.is_finite() {
                Ok(v)
            } else {
                Err(Error::invalid(format!(
                    "{what}: `{shown}`: `{s}` is not finite"
                )))
            }
        };
        let name = tag.args[0].trim().to_string();
        let (mut text, mut unet) = (None, None);
        let mut positional = 0;
        for arg in &tag.args[1..] {
            if let Some(v) = arg.trim().strip_prefix("te=") {
                text = Some(number(v)?);
            } else if let Some(v) = arg.trim().strip_prefix("unet=") {
                unet = Some(number(v)?);
            } else if arg.trim().starts_with("dyn=") {
                return Err(Error::Unsupported(format!(
                    "{what}: `{shown}`: dynamic LoRA dimensions (dyn=)"
                )));
            } else {
                match positional {
                    0 => text = Some(number(arg)?),
                    1 => unet = Some(number(arg)?),
                    _ => {
                        return Err(Error::invalid(format!(
                            "{what}: `{shown}` has more weights than a text and a UNet one"
                        )))
                    }
                }
                positional += 1;
            }
        }
        let text = text.unwrap_or(1.0);
        out.push(LoraTag {
            name,
            text,
            unet: unet.unwrap_or(text),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(t: &str, w: f64) -> Piece {
        Piece::Text {
            text: t.to_string(),
            weight: w,
        }
    }

    /// The examples of A1111's `parse_prompt_attention` docstring, to the last bit.
    #[test]
    fn a1111_documented_examples() {
        let cases: Vec<(&str, Vec<Piece>)> = vec![
            ("normal text", vec![text("normal text", 1.0)]),
            (
                "an (important) word",
                vec![text("an ", 1.0), text("important", 1.1), text(" word", 1.0)],
            ),
            ("(unbalanced", vec![text("unbalanced", 1.1)]),
            ("\\(literal\\]", vec![text("(literal]", 1.0)]),
            (
                "(unnecessary)(parens)",
                vec![text("unnecessaryparens", 1.1)],
            ),
            (
                "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
                vec![
                    text("a ", 1.0),
                    text("house", 1.5730000000000004),
                    text(" ", 1.1),
                    text("on", 1.0),
                    text(" a ", 1.1),
                    text("hill", 0.55),
                    text(", sun, ", 1.1),
                    text("sky", 1.4641000000000006),
                    text(".", 1.1),
                ],
            ),
        ];
        for (prompt, want) in cases {
            assert_eq!(parse_attention(prompt).unwrap(), want, "{prompt}");
        }
    }

    /// More cases worked out from A1111's rules: factors, escapes, literal closers and colons,
    /// weights with spaces and signs, `BREAK` as a whole word, what we do where A1111 fails.
    #[test]
    fn a1111_rules_case_by_case() {
        let b = Piece::Break;
        let cases: Vec<(&str, Vec<Piece>)> = vec![
            ("", vec![text("", 1.0)]),
            ("(a:1.5)", vec![text("a", 1.5)]),
            ("[a]", vec![text("a", 1.0 / 1.1)]),
            ("((a))", vec![text("a", 1.1 * 1.1)]),
            ("[[a]]", vec![text("a", (1.0 / 1.1) * (1.0 / 1.1))]),
            ("(a:-1)", vec![text("a", -1.0)]),
            ("(a:+.5)", vec![text("a", 0.5)]),
            ("(a:2.)", vec![text("a", 2.0)]),
            ("( a : 1.5 )", vec![text(" a ", 1.5)]),
            (
                "x (a:1.2) y",
                vec![text("x ", 1.0), text("a", 1.2), text(" y", 1.0)],
            ),
            ("a:1.5)", vec![text("a:1.5)", 1.0)]),
            ("a : b", vec![text("a : b", 1.0)]),
            ("(a)]", vec![text("a", 1.1), text("]", 1.0)]),
            ("a)", vec![text("a)", 1.0)]),
            ("\\\\", vec![text("\\", 1.0)]),
            ("a\\b", vec![text("ab", 1.0)]),
            ("\\(a\\)", vec![text("(a)", 1.0)]),
            ("smile :.)", vec![text("smile :.)", 1.0)]),
            ("(smile :.)", vec![text("smile :.", 1.1)]),
            ("(a:1.2.3)", vec![text("a:1.2.3", 1.1)]),
            ("[a:1.5]", vec![text("a:1.5", 1.0 / 1.1)]),
            (
                "(a [b] c)",
                vec![
                    text("a ", 1.1),
                    text("b", (1.0 / 1.1) * 1.1),
                    text(" c", 1.1),
                ],
            ),
            ("a BREAK b", vec![text("a", 1.0), b.clone(), text("b", 1.0)]),
            (
                "a\tBREAK\n,b",
                vec![text("a", 1.0), b.clone(), text(",b", 1.0)],
            ),
            (
                "aBREAK b_BREAK BREAKs",
                vec![text("aBREAK b_BREAK BREAKs", 1.0)],
            ),
            ("break", vec![text("break", 1.0)]),
            ("BREAK", vec![text("", 1.0), b.clone(), text("", 1.0)]),
            (
                "(a BREAK b)",
                vec![text("a", 1.1), b.clone(), text("b", 1.1)],
            ),
            ("é (ü:0.5)", vec![text("é ", 1.0), text("ü", 0.5)]),
        ];
        for (prompt, want) in cases {
            assert_eq!(parse_attention(prompt).unwrap(), want, "{prompt:?}");
        }
        let huge = format!("(a:1{})", "9".repeat(400));
        let err = parse_attention(&huge).unwrap_err().to_string();
        assert!(err.contains("\"a\"") && err.contains("finite"), "{err}");
    }

    /// Escape every bracket and backslash (A1111's escapes; a colon needs none while no round
    /// bracket is open).
    fn escape(s: &str) -> String {
        let mut out = String::new();
        for c in s.chars() {
            if "()[]\\".contains(c) {
                out.push('\\');
            }
            out.push(c);
        }
        out
    }

    fn random_text(rng: &mut u64, alphabet: &[&str], len: usize) -> String {
        (0..len)
            .map(|_| {
                *rng = rng
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                alphabet[(*rng >> 33) as usize % alphabet.len()]
            })
            .collect()
    }

    /// For seeded random texts of every special character: parsing never fails on finite
    /// weights or leaves equal neighbours unmerged; escaped text is itself at weight 1; the
    /// same text (without colons) in k round brackets or with an explicit factor carries
    /// exactly that weight.
    #[test]
    fn escaped_wrapped_and_random_prompts() {
        let alphabet = [
            "(", ")", "[", "]", ":", "\\", "1.5", "0.", "-", "a", "x y", " ", ",", "é", "\t",
        ];
        let mut rng = 7u64;
        for case in 0..2000 {
            let len = case % 40;
            let s = random_text(&mut rng, &alphabet, len);
            let pieces = parse_attention(&s).unwrap_or_else(|e| panic!("{s:?}: {e}"));
            for pair in pieces.windows(2) {
                if let [Piece::Text { weight: a, .. }, Piece::Text { weight: b, .. }] = pair {
                    assert_ne!(a, b, "{s:?}: unmerged {pieces:?}");
                }
            }
            if s.is_empty() {
                continue;
            }
            assert_eq!(
                parse_attention(&escape(&s)).unwrap(),
                vec![text(&s, 1.0)],
                "{s:?}"
            );
            if s.contains(':') {
                // inside round brackets a colon may start a weight, and has no escape
                continue;
            }
            let k = 1 + case % 5;
            let mut weight = 1.0f64;
            for _ in 0..k {
                weight *= 1.1;
            }
            let nested = format!("{}{}{}", "(".repeat(k), escape(&s), ")".repeat(k));
            assert_eq!(
                parse_attention(&nested).unwrap(),
                vec![text(&s, weight)],
                "{nested:?}"
            );
            let factor = (case % 300) as f64 / 100.0;
            let explicit = format!("({}:{factor})", escape(&s));
            assert_eq!(
                parse_attention(&explicit).unwrap(),
                vec![text(&s, factor)],
                "{explicit:?}"
            );
        }
    }

    /// The worst nesting a prompt within the byte limit can hold stays fast: every bracket
    /// left open over thousands of pieces.
    #[test]
    fn deep_unclosed_nesting_is_bounded() {
        let prompt = "(a[".repeat(crate::limits::MAX_PROMPT_BYTES / 3);
        let start = std::time::Instant::now();
        // 21845 factors of 1.1 overflow: the answer is an error naming the weight.
        let err = parse_attention(&prompt).unwrap_err().to_string();
        assert!(err.contains("finite"), "{err}");
        assert!(
            start.elapsed().as_secs_f64() < 20.0,
            "{:?}",
            start.elapsed()
        );
    }

    fn standard() -> ClipTokenizer {
        ClipTokenizer::standard().unwrap()
    }

    /// The prompt's tokens in order: each text tokenised on its own, without start and end.
    fn stream(tokenizer: &ClipTokenizer, pieces: &[Piece]) -> Vec<(i64, f64)> {
        let mut out = Vec::new();
        for piece in pieces {
            if let Piece::Text { text, weight } = piece {
                let ids = tokenizer.encode(text);
                out.extend(ids[1..ids.len() - 1].iter().map(|&id| (id, *weight)));
            }
        }
        out
    }

    /// Chunks hold the prompt's tokens in order, 75 at most each, wrapped in start and end
    /// tokens and padded to 77 with weight 1 around them; long texts of words without commas
    /// fill every chunk but the last.
    #[test]
    fn chunks_keep_every_token_in_order() {
        let tk = standard();
        let words = [
            "red",
            "(blue:1.3)",
            "[green]",
            "cat",
            "house",
            "((tree))",
            "sky",
        ];
        let mut rng = 3u64;
        for case in 0..60 {
            let n = 1 + case * 7;
            let prompt = (0..n)
                .map(|_| random_text(&mut rng, &words, 1))
                .collect::<Vec<_>>()
                .join(" ");
            let pieces = parse_attention(&prompt).unwrap();
            let chunks = chunk_tokens(&tk, &pieces, &[]);
            let want = stream(&tk, &pieces);
            let mut got = Vec::new();
            for (i, c) in chunks.iter().enumerate() {
                assert_eq!(c.tokens.len(), 77);
                assert_eq!(c.weights.len(), 77);
                assert_eq!(c.tokens[0], tk.bos_id());
                assert_eq!(c.weights[0], 1.0);
                let end = 1 + c.tokens[1..]
                    .iter()
                    .position(|&t| t == tk.eos_id())
                    .unwrap();
                assert!(end <= 76);
                if i + 1 < chunks.len() {
                    assert_eq!(end, 76, "case {case}: chunk {i} not full");
                }
                assert!(c.tokens[end + 1..].iter().all(|&t| t == tk.pad_id()));
                assert!(c.weights[end..].iter().all(|&w| w == 1.0));
                got.extend(
                    c.tokens[1..end]
                        .iter()
                        .copied()
                        .zip(c.weights[1..end].iter().copied()),
                );
            }
            assert_eq!(got, want, "case {case}");
            assert_eq!(chunks.len(), want.len().div_ceil(75).max(1), "case {case}");
        }
    }

    /// `BREAK` closes a chunk; a full chunk hands the words after a comma at most 20 tokens
    /// back to the next chunk, and keeps them when the comma is further back.
    #[test]
    fn break_and_comma_backtracking() {
        let tk = standard();
        let body = |c: &PromptChunk| -> Vec<i64> {
            let end = 1 + c.tokens[1..]
                .iter()
                .position(|&t| t == tk.eos_id())
                .unwrap();
            c.tokens[1..end].to_vec()
        };
        let cat = tk.encode("cat")[1];
        let comma = tk.encode(",")[1];
        let chunks = chunk_tokens(&tk, &parse_attention("cat BREAK cat cat").unwrap(), &[]);
        assert_eq!(chunks.len(), 2);
        assert_eq!(
            (body(&chunks[0]), body(&chunks[1])),
            (vec![cat], vec![cat, cat])
        );
        for back in [5usize, 20, 21, 30] {
            // 75 - back cats, a comma, then cats past the end of the chunk
            let before = 74 - back;
            let prompt = format!("{}, {}", "cat ".repeat(before), "cat ".repeat(back + 10));
            let chunks = chunk_tokens(&tk, &parse_attention(&prompt).unwrap(), &[]);
            let first = body(&chunks[0]);
            assert_eq!(first[before], comma, "back {back}");
            if back < COMMA_BACKTRACK {
                assert_eq!(
                    first.len(),
                    before + 1,
                    "back {back}: the chunk ends at the comma"
                );
            } else {
                assert_eq!(first.len(), 75, "back {back}: the chunk stays full");
            }
            let total: usize = chunks.iter().map(|c| body(c).len()).sum();
            assert_eq!(total, before + 1 + back + 10, "back {back}");
        }
    }

    #[test]
    fn extra_network_tags_come_out_of_the_text() {
        let (text, tags) =
            extra_networks("a <lora:pixel-art:0.8> cat, <hypernet:x:1>(red:1.2)<lora:b>");
        assert_eq!(text, "a  cat, (red:1.2)");
        assert_eq!(tags.len(), 3);
        assert_eq!(tags[0].kind, "lora");
        assert_eq!(tags[0].args, vec!["pixel-art", "0.8"]);
        assert_eq!(tags[2].args, vec!["b"]);
        // What A1111's `<(\w+):([^>]+)>` does not match stays text.
        for plain in [
            "a < b > c",
            "<:x>",
            "<lora:>",
            "<lo ra:x>",
            "x <lora:unclosed",
            "<>",
            "<<",
        ] {
            assert_eq!(
                extra_networks(plain),
                (plain.to_string(), vec![]),
                "{plain}"
            );
        }
        // The first `<` that opens a tag wins; nested brackets end at the first `>`.
        let (text, tags) = extra_networks("<a<lora:n:1>>");
        assert_eq!(text, "<a>");
        assert_eq!(tags[0].args, vec!["n", "1"]);
    }

    /// Seeded prompts of text and `<lora:NAME:W>` tags in any order: the tags come out in
    /// order with their names and weights to the bit, the text is what is left; random text
    /// with brackets, colons and non-ASCII never panics and never gains characters.
    #[test]
    fn tags_come_out_of_any_prompt() {
        use crate::train::dataset::Rng;
        let mut rng = Rng::new(0x7a9);
        let words = [
            "a cat",
            ", ",
            "(red:1.2)",
            " BREAK ",
            "x: y",
            "ünï ",
            "[b]",
            " ",
        ];
        let names = ["style", "pixel-art", "a_b", "v1.5", "x"];
        for _ in 0..2000 {
            let (mut prompt, mut text, mut want) = (String::new(), String::new(), Vec::new());
            for _ in 0..rng.below(8) {
                if rng.below(3) == 0 {
                    let name = names[rng.below(names.len())];
                    let w = (rng.uniform() as f64 - 0.5) * 4.0;
                    prompt.push_str(&format!("<lora:{name}:{w}>"));
                    want.push((name.to_string(), w));
                } else {
                    let word = words[rng.below(words.len())];
                    prompt.push_str(word);
                    text.push_str(word);
                }
            }
            let (left, tags) = extra_networks(&prompt);
            assert_eq!(left, text, "{prompt}");
            let got: Vec<(String, f64)> = lora_tags(&prompt, "prompt")
                .unwrap()
                .into_iter()
                .map(|t| (t.name, t.unet))
                .collect();
            assert_eq!(got, want, "{prompt}");
            assert_eq!(tags.len(), want.len());
        }
        let alphabet: Vec<char> = "<>:lora a1\\(é)".chars().collect();
        for _ in 0..5000 {
            let prompt: String = (0..rng.below(24))
                .map(|_| alphabet[rng.below(alphabet.len())])
                .collect();
            let (left, tags) = extra_networks(&prompt);
            assert!(left.chars().count() <= prompt.chars().count(), "{prompt}");
            assert!(tags.len() <= prompt.matches('<').count(), "{prompt}");
            let _ = lora_tags(&prompt, "prompt");
        }
    }

    #[test]
    fn lora_tags_read_weights_as_a1111() {
        let tag = |s: &str| lora_tags(s, "prompt").unwrap();
        let one = |name: &str, text: f64, unet: f64| LoraTag {
            name: name.to_string(),
            text,
            unet,
        };
        assert_eq!(tag("<lora:a>"), vec![one("a", 1.0, 1.0)]);
        assert_eq!(tag("<lora:a:0.5>"), vec![one("a", 0.5, 0.5)]);
        assert_eq!(tag("<lora:a:0.5:-1.25>"), vec![one("a", 0.5, -1.25)]);
        assert_eq!(tag("<lora:a:unet=0.3:te=0.7>"), vec![one("a", 0.7, 0.3)]);
        assert_eq!(tag("<lyco:a: 2 >"), vec![one("a", 2.0, 2.0)]);
        for (bad, says) in [
            ("<lora:a:x>", "`x` is not a number"),
            ("<lora:a:1e999>", "not finite"),
            ("<lora:a:1:2:3>", "more weights"),
            ("<hypernet:h:1>", "only <lora:...>"),
            ("<lora:a:dyn=4>", "dyn="),
        ] {
            let e = lora_tags(bad, "prompt").unwrap_err().to_string();
            assert!(e.contains(says) && e.contains("prompt"), "{bad}: {e}");
        }
    }

    /// Embeddings in chunks as A1111 places them: the longest name first, as many tokens as
    /// vectors (placeholders 0, the text's weight), into the next chunk when they do not fit,
    /// and moved along with the words after a comma by the backtracking.
    #[test]
    fn embeddings_take_their_vectors_places_in_chunks() {
        let tk = ClipTokenizer::standard().unwrap();
        let word = |w: &str| {
            let ids = tk.encode(w);
            ids[1..ids.len() - 1].to_vec()
        };
        let emb = |name: &str, n: i64| TokenEmbedding {
            name: name.into(),
            ids: word(name),
            vectors: Tensor::zeros([n, 4], (Kind::Float, tch::Device::Cpu)),
            placeholder: 0,
        };
        // "red car" (two tokens) is longer than "red": it wins where both match.
        let list = vec![emb("red", 1), emb("red car", 3)];
        let chunks = chunk_tokens(
            &tk,
            &parse_attention("a (red car:1.5) and red").unwrap(),
            &list,
        );
        let c = &chunks[0];
        let a = word("a")[0];
        let and = word("and")[0];
        assert_eq!(&c.tokens[1..8], &[a, 0, 0, 0, and, 0, tk.eos_id()]);
        assert_eq!(&c.weights[1..7], &[1.0, 1.5, 1.5, 1.5, 1.0, 1.0]);
        assert_eq!(
            c.fixes,
            vec![
                ChunkFix {
                    position: 2,
                    embedding: 1
                },
                ChunkFix {
                    position: 6,
                    embedding: 0
                }
            ]
        );
        // 74 words, then a 3-vector embedding: it does not fit, so it opens the next chunk.
        let prompt = format!("{} red car", vec!["cat"; 74].join(" "));
        let chunks = chunk_tokens(&tk, &parse_attention(&prompt).unwrap(), &list);
        assert_eq!(chunks.len(), 2);
        assert!(chunks[0].fixes.is_empty());
        assert_eq!(
            chunks[1].fixes,
            vec![ChunkFix {
                position: 1,
                embedding: 1
            }]
        );
        // A chunk filled to its end 6 tokens after a comma: the words after the comma,
        // embedding included, move to the next chunk, and so does the embedding's fix.
        let prompt = format!("{}, dog red car dog dog", vec!["cat"; 69].join(" "));
        let chunks = chunk_tokens(&tk, &parse_attention(&prompt).unwrap(), &list);
        assert_eq!(chunks.len(), 2);
        assert!(chunks[0].fixes.is_empty(), "{:?}", chunks[0].fixes);
        let dog = word("dog")[0];
        assert_eq!(
            &chunks[1].tokens[1..8],
            &[dog, 0, 0, 0, dog, dog, tk.eos_id()]
        );
        assert_eq!(
            chunks[1].fixes,
            vec![ChunkFix {
                position: 2,
                embedding: 1
            }]
        );
    }
}
