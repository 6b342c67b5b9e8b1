//! Why a job failed, as one typed error with a stable code for the wire.

/// Why compiling or running a job failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ComputeError {
    /// Not WebAssembly, fails validation, or lacks the `memory` / `run` exports.
    #[error("invalid module: {0}")]
    InvalidModule(String),
    /// Imports something beyond the host API.
    #[error("forbidden import {module}::{name} (only the p2pvm host API may be imported)")]
    ForbiddenImport {
        /// Import module name.
        module: String,
        /// Import field name.
        name: String,
    },
    /// Used all its fuel.
    #[error("out of fuel after {limit} units")]
    OutOfFuel {
        /// The fuel it had.
        limit: u64,
    },
    /// Grew its memory beyond the limit.
    #[error("memory limit: asked for {asked} bytes, limit {limit}")]
    MemoryLimit {
        /// Bytes of linear memory it asked for.
        asked: u64,
        /// The limit.
        limit: u64,
    },
    /// Wrote more output than allowed.
    #[error("output limit of {limit} bytes exceeded")]
    OutputLimit {
        /// The limit.
        limit: u64,
    },
    /// Ran longer than allowed.
    #[error("wall-clock limit of {limit_ms} ms exceeded")]
    WallTime {
        /// The limit.
        limit_ms: u64,
    },
    /// Trapped, or `run` returned non-zero.
    #[error("trapped: {0}")]
    Trapped(String),
    /// Stopped on request.
    #[error("cancelled")]
    Cancelled,
    /// The engine itself failed (not the job's fault).
    #[error("engine: {0}")]
    Engine(String),
}

impl ComputeError {
    /// The API error code name (`p2pvm_api.proto`'s `ErrorCode`).
    pub fn code(&self) -> &'static str {
        match self {
            Self::InvalidModule(_) => "COMPUTE_INVALID_MODULE",
            Self::ForbiddenImport { .. } => "COMPUTE_FORBIDDEN_IMPORT",
            Self::OutOfFuel { .. } => "COMPUTE_OUT_OF_FUEL",
            Self::MemoryLimit { .. } => "COMPUTE_MEMORY_LIMIT",
            Self::WallTime { .. } => "COMPUTE_WALL_TIME",
            Self::Trapped(_) | Self::OutputLimit { .. } => "COMPUTE_TRAPPED",
            Self::Cancelled => "COMPUTE_CANCELLED",
            Self::Engine(_) => "INTERNAL",
        }
    }

    /// Whether the module itself is at fault (refused before or stopped
    /// while running), as opposed to the engine or a cancellation.
    pub fn is_job_fault(&self) -> bool {
        !matches!(self, Self::Cancelled | Self::Engine(_))
    }
}
