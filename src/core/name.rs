//! The rule for consumer names: short, printable, and safe in log lines,
//! Prometheus labels and the environment of unload commands
//! (`GPULEASE_CONSUMER`).

/// The longest accepted consumer name, in characters.
pub(super) const MAX_CONSUMER_NAME_LEN: usize = 64;

/// Why a consumer name was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConsumerNameError {
    /// The name is empty.
    #[error("consumer name is empty; give 1 to 64 characters of [A-Za-z0-9._-]")]
    Empty,
    /// The name is longer than [`MAX_CONSUMER_NAME_LEN`].
    #[error("consumer name is {0} characters long; at most 64 are allowed")]
    TooLong(usize),
    /// The name has a character outside `[A-Za-z0-9._-]`.
    #[error("consumer name has {0:?}; only [A-Za-z0-9._-] is allowed")]
    BadChar(char),
}

/// Accepts 1 to 64 characters of `[A-Za-z0-9._-]`.
pub(crate) fn validate_consumer_name(name: &str) -> Result<(), ConsumerNameError> {
    if name.is_empty() {
        return Err(ConsumerNameError::Empty);
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(ConsumerNameError::BadChar(bad));
    }
    // Only ASCII is left, so bytes are characters.
    if name.len() > MAX_CONSUMER_NAME_LEN {
        return Err(ConsumerNameError::TooLong(name.len()));
    }
    Ok(())
}
