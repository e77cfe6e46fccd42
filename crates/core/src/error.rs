//! The shared vocabulary of refused input: parsers of client-supplied values (request bodies,
//! batch metadata, answers for a labeling config) return [`InvalidInput`], whose message is
//! written for the client and names the field or value at fault; each service's error type
//! turns it into its 4xx.

use std::ops::Deref;

/// Why an input is refused: a message for the client naming the field or value at fault.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidInput(pub String);

impl InvalidInput {
    /// The message, for a service's error body.
    pub fn into_message(self) -> String {
        self.0
    }
}

impl Deref for InvalidInput {
    type Target = str;

    /// The message, so the error reads like the text it carries.
    fn deref(&self) -> &str {
        &self.0
    }
}

impl PartialEq<&str> for InvalidInput {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}
