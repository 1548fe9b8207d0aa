//! Limits on what a file or an argument may make the library do. A model file, a config or a
//! prompt comes from a user who may be hostile or unlucky: every size read from one is checked
//! against these before memory is allocated or work is started, and errors name the limit.
//! Each limit sits well above what any real model or prompt of the families we load needs.

/// Elements in one tensor of a model file. The largest tensor of SD 1.x / 2.x is the OpenCLIP
/// token embedding (49408 x 1024 = 50.6 M); SDXL's largest is 49408 x 1280 = 63 M. 2^28 leaves
/// room for vocabulary-extended fine-tunes and stays at 1 GiB in fp32.
pub const MAX_TENSOR_ELEMENTS: i64 = 1 << 28;

/// Dimensions of one tensor: weights have at most 4 (convolutions); 8 leaves room.
pub const MAX_TENSOR_DIMS: usize = 8;

/// Parameters of one model component (text encoder, UNet or VAE), counted from its config
/// before anything is built. SD 1.x / 2.x UNets have 0.86 G, SDXL's 2.6 G: 2^32 is above every
/// component of the families we load and below what a 24 GiB machine can hold in fp32.
pub const MAX_COMPONENT_PARAMETERS: u64 = 1 << 32;

/// Elements of a zip entry (`.ckpt` storage) we decompress: a storage is at most one model's
/// worth of weights (see [`MAX_COMPONENT_PARAMETERS`]) in 4-byte floats, here in bytes.
pub const MAX_STORAGE_BYTES: u64 = 16 << 30;

/// A `.ckpt`'s `data.pkl`: a state dict of ~1,500 tensors pickles to about 200 KB; A1111
/// checkpoints with training state reach a few MB. 256 MiB is far above any real one.
pub const MAX_PICKLE_BYTES: u64 = 256 << 20;

/// The unpickler's stack (values and marks): `torch.save` of a state dict needs a few dozen.
pub const MAX_PICKLE_STACK: usize = 1 << 20;

/// The unpickler's memo: one entry per object the pickle may refer back to (a few per tensor).
pub const MAX_PICKLE_MEMO: usize = 1 << 22;

/// Nesting of containers in a pickle: a state dict nests 3 or 4 deep.
pub const MAX_PICKLE_DEPTH: usize = 1_000;

/// A JSON or text file of a model folder (`config.json`, `model_index.json`, `vocab.json`,
/// `merges.txt`, safetensors index): CLIP's vocab.json is 1.6 MB, its merges 0.5 MB.
pub const MAX_CONFIG_FILE_BYTES: u64 = 64 << 20;

/// A prompt or negative prompt, in bytes. CLIP reads 77 tokens a chunk; long-prompt support
/// concatenates chunks, and 64 KiB of text is hundreds of chunks, far past any useful prompt.
pub const MAX_PROMPT_BYTES: usize = 64 << 10;

/// 75-token chunks of a prompt read with A1111's syntax (2400 tokens). Every chunk is a text
/// encoder pass and 77 more keys for each cross-attention of every step; A1111 sets no limit,
/// real prompts use a handful.
pub const MAX_PROMPT_CHUNKS: usize = 32;

/// Most tensors a LoRA file may hold: an SDXL LoRA on every linear and convolution layer of
/// the UNet and both text encoders has about 3 x 2,500; a file with more is not a LoRA.
pub const MAX_LORA_TENSORS: usize = 100_000;

/// Files an embeddings folder may hold (A1111 users keep hundreds); each file at most
/// [`MAX_EMBEDDING_FILE_BYTES`] (an embedding is a few KB: a handful of vectors), at most
/// [`MAX_EMBEDDING_VECTORS`] vectors (a chunk's 75 tokens), searched at most
/// [`MAX_EMBEDDING_DEPTH`] folders deep.
pub const MAX_EMBEDDING_FILES: usize = 4096;
pub const MAX_EMBEDDING_FILE_BYTES: u64 = 16 << 20;
pub const MAX_EMBEDDING_VECTORS: i64 = 75;
pub const MAX_EMBEDDING_DEPTH: usize = 4;

/// Width and height and channels of the model configs, checked before a model is built.
/// The largest real width is 1280 (UNet) / 1280 (text encoder, SDXL's second).
pub const MAX_CONFIG_CHANNELS: i64 = 16_384;

/// Resolution levels of a UNet or VAE (4 in every SD model).
pub const MAX_CONFIG_BLOCKS: usize = 8;

/// Layers per block (resnets, transformer depth, text encoder layers): SDXL uses 10
/// transformer layers, OpenCLIP ViT-bigG 32 text layers.
pub const MAX_CONFIG_LAYERS: i64 = 64;

/// Vocabulary of a text encoder (CLIP: 49408) and its positions (77).
pub const MAX_CONFIG_VOCAB: i64 = 1 << 20;
pub const MAX_CONFIG_POSITIONS: i64 = 4096;

/// A scheduler's training timesteps (1000 in every SD model): its tables are this long.
pub const MAX_TRAIN_TIMESTEPS: usize = 1_000_000;

/// Checks `value` is in `1..=max`, naming `what` (a config field or argument) otherwise.
pub fn check_positive(what: &str, value: i64, max: i64) -> crate::Result<()> {
    if value < 1 || value > max {
        return Err(crate::Error::bad_model(format!(
            "{what} is {value}: it must be in 1..={max}"
        )));
    }
    Ok(())
}

/// Checks every value of `values` (the config field `what`) is in `1..=max`, naming the entry.
pub fn check_each_positive(what: &str, values: &[i64], max: i64) -> crate::Result<()> {
    for (i, &v) in values.iter().enumerate() {
        check_positive(&format!("{what}[{i}]"), v, max)?;
    }
    Ok(())
}

/// The sizes every UNet and VAE config has: the widths of its levels, its input and output
/// channels and its group-norm groups, for the config of `model` ("UNet", "VAE").
pub fn check_level_sizes(
    model: &str,
    block_out_channels: &[i64],
    in_channels: i64,
    out_channels: i64,
    norm_num_groups: i64,
) -> crate::Result<()> {
    let field = |name: &str| format!("{model} config {name}");
    if block_out_channels.len() > MAX_CONFIG_BLOCKS {
        return Err(crate::Error::bad_model(format!(
            "{} has {} entries: at most {MAX_CONFIG_BLOCKS} levels",
            field("block_out_channels"),
            block_out_channels.len()
        )));
    }
    check_each_positive(
        &field("block_out_channels"),
        block_out_channels,
        MAX_CONFIG_CHANNELS,
    )?;
    check_positive(&field("in_channels"), in_channels, MAX_CONFIG_CHANNELS)?;
    check_positive(&field("out_channels"), out_channels, MAX_CONFIG_CHANNELS)?;
    check_positive(
        &field("norm_num_groups"),
        norm_num_groups,
        MAX_CONFIG_CHANNELS,
    )
}

/// Checks a float config value is finite (and, with `nonzero`, not zero).
pub fn check_finite(what: &str, value: f64, nonzero: bool) -> crate::Result<()> {
    if !value.is_finite() || (nonzero && value == 0.0) {
        let need = if nonzero {
            "finite and non-zero"
        } else {
            "finite"
        };
        return Err(crate::Error::bad_model(format!(
            "{what} is {value}: it must be {need}"
        )));
    }
    Ok(())
}

/// Checks that a model component of `parameters` (counted from its config) is within
/// [`MAX_COMPONENT_PARAMETERS`] and could be stored in `file_bytes` bytes of weight files
/// (every parameter takes at least one byte there), before any of it is allocated.
pub fn check_component_size(
    what: &str,
    parameters: u64,
    file_bytes: u64,
    files: &str,
) -> crate::Result<()> {
    if parameters > MAX_COMPONENT_PARAMETERS {
        return Err(crate::Error::bad_model(format!(
            "the {what}'s config describes {parameters} parameters, more than the limit of \
             {MAX_COMPONENT_PARAMETERS} for one component"
        )));
    }
    if parameters > file_bytes {
        return Err(crate::Error::bad_model(format!(
            "the {what}'s config describes {parameters} parameters, but {files} holds only \
             {file_bytes} bytes: the config does not match the weights"
        )));
    }
    Ok(())
}

/// Elements of a tensor of `shape`, with overflow and negative sizes reported as `None`.
pub fn element_count(shape: &[i64]) -> Option<i64> {
    shape.iter().try_fold(
        1i64,
        |acc, &d| {
            if d < 0 {
                None
            } else {
                acc.checked_mul(d)
            }
        },
    )
}
