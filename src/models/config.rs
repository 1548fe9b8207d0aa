//! Reading diffusers / transformers `config.json` files.
use crate::limits::MAX_CONFIG_FILE_BYTES;
use crate::{Error, Result};
use serde::de::DeserializeOwned;
use std::path::Path;

/// Reads a text file of a model folder (a config, an index, a vocabulary), refusing one larger
/// than [`MAX_CONFIG_FILE_BYTES`] before reading it: such files are small, and a huge one
/// (a weight file under a config's name, a device) must not be read into memory.
pub fn read_text(path: &Path) -> Result<String> {
    use std::io::Read;
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut text = String::new();
    file.take(MAX_CONFIG_FILE_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(|e| Error::io(path, e))?;
    if text.len() as u64 > MAX_CONFIG_FILE_BYTES {
        return Err(Error::bad_model(format!(
            "{} is larger than {MAX_CONFIG_FILE_BYTES} bytes: not a config or vocabulary file",
            path.display()
        )));
    }
    Ok(text)
}

/// Reads a JSON file as `T`. Malformed JSON is [`Error::Json`]; a field of the wrong type is
/// [`Error::BadModel`] naming the file and the field.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = read_text(path)?;
    let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Json {
        path: path.into(),
        source: e,
    })?;
    from_json_value(value, "config")
        .map_err(|msg| Error::BadModel(format!("{}: {msg}", path.display())))
}

/// Deserialises `value` (a config object); on failure finds the field at fault when every
/// field has a default, so that the message names it rather than a type deep inside serde.
pub fn from_json_value<T: DeserializeOwned>(
    value: serde_json::Value,
    what: &str,
) -> std::result::Result<T, String> {
    let map = match value {
        serde_json::Value::Object(map) => map,
        other => match serde_json::from_value::<T>(other.clone()) {
            Ok(v) => return Ok(v),
            Err(_) => {
                return Err(format!(
                    "{what} must be a JSON object, found {}",
                    json_kind(&other)
                ))
            }
        },
    };
    match serde_json::from_value::<T>(serde_json::Value::Object(map.clone())) {
        Ok(v) => Ok(v),
        // Finding the field by trying each alone only works when every field has a default.
        Err(whole) if serde_json::from_value::<T>(serde_json::json!({})).is_err() => {
            Err(format!("{what}: {whole}"))
        }
        Err(whole) => {
            for (key, val) in map {
                let mut single = serde_json::Map::new();
                single.insert(key.clone(), val);
                if let Err(e) = serde_json::from_value::<T>(serde_json::Value::Object(single)) {
                    return Err(format!("{what} field `{key}`: {e}"));
                }
            }
            Err(format!("{what}: {whole}"))
        }
    }
}

/// "a number", "an array", ... for messages about a JSON value of the wrong kind.
pub fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// A config value that diffusers allows as one value for every block or one per block.
#[derive(Debug, Clone, serde::Deserialize, PartialEq)]
#[serde(untagged)]
pub enum PerBlock<T> {
    One(T),
    Each(Vec<T>),
}

impl<T: Clone + std::fmt::Debug> PerBlock<T> {
    /// The value for each of `n` blocks; `what` names the config field in errors.
    pub fn expand(&self, n: usize, what: &str) -> Result<Vec<T>> {
        match self {
            PerBlock::One(v) => Ok(vec![v.clone(); n]),
            PerBlock::Each(v) if v.len() == n => Ok(v.clone()),
            PerBlock::Each(v) => Err(Error::bad_model(format!(
                "config field `{what}` has {} entries ({v:?}) for {n} blocks",
                v.len()
            ))),
        }
    }
}
