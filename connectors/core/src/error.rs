//! The one error policy. Each connector's error type says what kind of failure it is
//! ([`Classify`]); [`action`] alone decides what follows from a kind, and every loop that
//! retries does so through [`crate::retry`].
//!
//! "Already applied" (a position guard that finds the change in place) is not an error: targets
//! report it as an outcome of a successful write.

/// What kind of failure an error is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// It may succeed if tried again (network, throttling, a server restarting, a timeout on a
    /// loaded server): retry with backoff; nothing is acknowledged meanwhile.
    Transient,
    /// This one change can never apply as mapped: dead-letter it and go on.
    Poison,
    /// The pipeline cannot go on as configured (permissions, a missing object, a protocol
    /// violation): stop with a clear message; nothing past the last durable position is
    /// acknowledged.
    Fatal,
}

/// What happens after a failure of a kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Wait out the next backoff step and try again, within the retry budget.
    Retry,
    /// Record the change in the dead-letter store and go on with the next one.
    DeadLetter,
    /// Stop the pipeline (or the command) with the error.
    Stop,
}

/// The one function that decides: transient → retry, poison → dead-letter, fatal → stop.
pub fn action(kind: ErrorKind) -> Action {
    match kind {
        ErrorKind::Transient => Action::Retry,
        ErrorKind::Poison => Action::DeadLetter,
        ErrorKind::Fatal => Action::Stop,
    }
}

/// An error that knows its kind. Every connector's error type implements it.
pub trait Classify {
    /// The kind of this failure.
    fn kind(&self) -> ErrorKind;

    /// True when trying again may succeed.
    fn is_transient(&self) -> bool {
        self.kind() == ErrorKind::Transient
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kind_has_one_action() {
        assert_eq!(action(ErrorKind::Transient), Action::Retry);
        assert_eq!(action(ErrorKind::Poison), Action::DeadLetter);
        assert_eq!(action(ErrorKind::Fatal), Action::Stop);
    }
}
