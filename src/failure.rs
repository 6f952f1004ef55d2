//! A failure with its exit code: 2 for bad input found before running, 1 for a failed run, 130
//! for an interrupted one. Every command returns one; `main` prints it and exits with its code.

/// A failure with its exit code: 2 for bad input found before running, 1 for a failed run.
#[derive(Debug, thiserror::Error)]
#[error("{error}")]
pub struct Failure {
    /// Process exit code.
    pub code: u8,
    /// What went wrong.
    pub error: anyhow::Error,
}

/// Bad input (exit code 2).
pub fn bad_input(e: impl Into<anyhow::Error>) -> Failure {
    Failure {
        code: 2,
        error: e.into(),
    }
}

/// A failed run (exit code 1).
pub fn failed(e: impl Into<anyhow::Error>) -> Failure {
    Failure {
        code: 1,
        error: e.into(),
    }
}
