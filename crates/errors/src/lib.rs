//! How podvisor shows an error: the error's message, then each cause in
//! its `source()` chain, separated by `": "`, as `anyhow`'s `{:#}` does.
//!
//! The rule every error type of the workspace follows (cloud-hypervisor's):
//! a variant that has a source (`#[source]`, or a `#[from]` that is not
//! `transparent`) does not also put that source in its message. So printing
//! only `{e}` loses the causes, and printing the message and the causes
//! shows each once. Wherever an error becomes text for a user (the CLI, a
//! pod's status message, an HTTP error body, a log line), it goes through
//! [`ErrorChain`].

use std::error::Error;
use std::fmt;

/// Displays an error with its chain of causes: `outer: cause: root cause`.
pub struct ErrorChain<'a>(pub &'a (dyn Error + 'a));

impl fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(cause) = source {
            write!(f, ": {cause}")?;
            source = cause.source();
        }
        Ok(())
    }
}

/// `error` with its chain of causes, as a string.
pub fn chain(error: &dyn Error) -> String {
    ErrorChain(error).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    enum Outer {
        #[error("reading the token file /x")]
        Read(#[source] std::io::Error),
        #[error("opening the store")]
        Store(#[from] Inner),
    }

    #[derive(Debug, thiserror::Error)]
    #[error("store file /db")]
    struct Inner {
        #[source]
        source: std::io::Error,
    }

    #[test]
    fn each_cause_is_shown_once_in_order() {
        let e = Outer::Read(std::io::Error::from(std::io::ErrorKind::PermissionDenied));
        assert_eq!(chain(&e), "reading the token file /x: permission denied");
        let e = Outer::from(Inner {
            source: std::io::Error::other("disk on fire"),
        });
        let text = chain(&e);
        assert_eq!(text, "opening the store: store file /db: disk on fire");
        assert_eq!(text.matches("disk on fire").count(), 1);
    }
}
