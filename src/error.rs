use std::path::PathBuf;

/// Every failure the library reports. Variants name what went wrong and where, so that a
/// message reaches the user with the file, tensor or argument at fault.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("bad JSON in {path}: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("bad model: {0}")]
    BadModel(String),
    #[error("missing tensor `{name}` in {file}")]
    MissingTensor { name: String, file: String },
    #[error("tensor `{name}` in {file} has shape {found:?}, expected {expected:?}")]
    ShapeMismatch {
        name: String,
        file: String,
        expected: Vec<i64>,
        found: Vec<i64>,
    },
    #[error("unsupported: {0}")]
    Unsupported(String),
    #[error("cancelled")]
    Cancelled,
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    #[error("image: {0}")]
    Image(String),
    #[error("internal error: {0}")]
    Internal(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::InvalidArgument(msg.into())
    }
    pub fn bad_model(msg: impl Into<String>) -> Self {
        Error::BadModel(msg.into())
    }
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
