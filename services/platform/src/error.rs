//! The one error vocabulary every domain core speaks. It knows nothing of gRPC; the adapter
//! maps it to status codes exhaustively in [`crate::grpc`].

use std::fmt;

/// A field of a request that failed validation, with a description a caller can act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldViolation {
    /// Path of the field in the request, e.g. `receipt.lines[2].quantity`.
    pub field: String,
    /// What is wrong, in words a POS integrator understands.
    pub description: String,
}

/// Errors of the domain cores.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is malformed; nothing was written.
    #[error("invalid argument: {}", render(.0))]
    InvalidArgument(Vec<FieldViolation>),
    /// A named thing does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The thing to create exists, or an idempotency key was reused with another payload.
    #[error("{0}")]
    AlreadyExists(String),
    /// The system is not in a state that allows the operation (e.g. insufficient points).
    #[error("{0}")]
    FailedPrecondition(String),
    /// The operation is part of the API but not implemented yet.
    #[error("{0}")]
    Unimplemented(String),
    /// A dependency (another service, a store) cannot be reached; retrying may help.
    #[error("{0}")]
    Unavailable(String),
    /// A bug or an I/O failure; details are logged, never sent to clients.
    #[error("internal error: {0:#}")]
    Internal(anyhow::Error),
}

fn render(violations: &[FieldViolation]) -> String {
    violations
        .iter()
        .map(|v| format!("{}: {}", v.field, v.description))
        .collect::<Vec<_>>()
        .join("; ")
}

impl Error {
    /// Shorthand for a single field violation.
    pub fn invalid(field: impl Into<String>, description: impl Into<String>) -> Self {
        Error::InvalidArgument(vec![FieldViolation {
            field: field.into(),
            description: description.into(),
        }])
    }

    /// Wraps any error as internal.
    pub fn internal(err: impl Into<anyhow::Error>) -> Self {
        Error::Internal(err.into())
    }
}

/// Result of domain operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Collects field violations so a request reports every problem at once.
#[derive(Debug, Default)]
pub struct Violations(Vec<FieldViolation>);

impl Violations {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records a violation of `field`.
    pub fn add(&mut self, field: impl fmt::Display, description: impl Into<String>) {
        self.0.push(FieldViolation {
            field: field.to_string(),
            description: description.into(),
        });
    }

    /// Records a violation unless `ok` holds.
    pub fn check(&mut self, ok: bool, field: impl fmt::Display, description: impl Into<String>) {
        if !ok {
            self.add(field, description);
        }
    }

    /// Checks a required, bounded string field.
    pub fn text(&mut self, value: &str, field: impl fmt::Display, max_len: usize) {
        if value.is_empty() {
            self.add(field, "is required");
        } else if value.len() > max_len {
            self.add(field, format!("must be at most {max_len} bytes"));
        } else if value.chars().any(char::is_control) {
            self.add(field, "must not contain control characters");
        }
    }

    /// Checks an optional, bounded string field.
    pub fn optional_text(&mut self, value: &str, field: impl fmt::Display, max_len: usize) {
        if !value.is_empty() {
            self.text(value, field, max_len);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// `Ok(())` when nothing was recorded, else the collected `InvalidArgument`.
    pub fn finish(self) -> Result<()> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(Error::InvalidArgument(self.0))
        }
    }
}

/// Longest tenant id accepted anywhere.
pub const MAX_TENANT_ID_LEN: usize = 64;
/// Longest opaque id (member, receipt, card number, idempotency key...).
pub const MAX_ID_LEN: usize = 128;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn violations_collect_every_problem() {
        let mut v = Violations::new();
        v.text("", "tenant_id", 10);
        v.text("x".repeat(11).as_str(), "receipt_id", 10);
        v.text("a\u{7}", "store_id", 10);
        v.optional_text("", "email", 10);
        match v.finish() {
            Err(Error::InvalidArgument(list)) => {
                let fields: Vec<_> = list.iter().map(|f| f.field.as_str()).collect();
                assert_eq!(fields, ["tenant_id", "receipt_id", "store_id"]);
            }
            other => panic!("expected InvalidArgument, got {other:?}"),
        }
    }

    #[test]
    fn no_violations_is_ok() {
        let mut v = Violations::new();
        v.text("ok", "tenant_id", 10);
        assert!(v.finish().is_ok());
    }
}
