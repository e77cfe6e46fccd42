//! Which Label Studio an id belongs to. Label Studio's project, task and annotation ids are
//! unique only within one Label Studio database: a second Label Studio, or the same one
//! re-created with a fresh database, hands the same ids out again. So batchlab keys what it holds
//! by (instance, id), where the instance is a short name chosen by the operator
//! (`label_studio.instance`, or the last segment of the webhook URL
//! `/v1/webhooks/label-studio/{instance}`). Data stored before instances existed belongs to
//! [`Instance::DEFAULT`].

use std::fmt;
use std::sync::Arc;

use crate::error::InvalidInput;

/// A Label Studio instance's name: 1 to 48 characters of `a-z`, `0-9`, `-` and `_`, starting
/// with a letter or digit. It is used in URLs and in export directory names, hence the narrow
/// alphabet. Cheap to clone.
#[derive(
    Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(try_from = "String", into = "String")]
pub struct Instance(Arc<str>);

impl Instance {
    /// The name of the instance that data stored before instances existed belongs to, and the
    /// configured one unless `label_studio.instance` says otherwise.
    pub const DEFAULT: &'static str = "default";

    /// Longest name accepted.
    pub const MAX_LEN: usize = 48;

    /// Reads a name, refusing one outside the alphabet or too long (the message names it).
    pub fn parse(name: &str) -> Result<Instance, InvalidInput> {
        let ok = !name.is_empty()
            && name.len() <= Self::MAX_LEN
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
            && name
                .bytes()
                .next()
                .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
        if !ok {
            let shown: String = name.chars().take(Self::MAX_LEN + 2).collect();
            return Err(InvalidInput(format!(
                "Label Studio instance name {shown:?} is not valid: use 1 to {} characters of \
                 a-z, 0-9, '-' and '_', starting with a letter or digit",
                Self::MAX_LEN
            )));
        }
        Ok(Instance(name.into()))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether this is the default instance.
    pub fn is_default(&self) -> bool {
        &*self.0 == Self::DEFAULT
    }
}

impl Default for Instance {
    /// The default instance ([`Instance::DEFAULT`]).
    fn default() -> Self {
        Instance(Self::DEFAULT.into())
    }
}

impl fmt::Display for Instance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for Instance {
    type Error = InvalidInput;

    fn try_from(s: String) -> Result<Instance, InvalidInput> {
        Instance::parse(&s)
    }
}

impl From<Instance> for String {
    fn from(i: Instance) -> String {
        i.0.to_string()
    }
}

impl std::str::FromStr for Instance {
    type Err = InvalidInput;

    fn from_str(s: &str) -> Result<Instance, InvalidInput> {
        Instance::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::Instance;

    #[test]
    fn names_are_narrow() {
        for good in ["default", "ls2", "prod-2026_a", "9", &"a".repeat(48)] {
            assert_eq!(Instance::parse(good).unwrap().as_str(), good);
        }
        for bad in [
            "",
            "Prod",
            "-x",
            "_x",
            "a/b",
            "..",
            "a b",
            "é",
            &"a".repeat(49),
        ] {
            let e = Instance::parse(bad).unwrap_err();
            assert!(e.contains("instance name"), "{bad}: {e}");
        }
        assert!(Instance::default().is_default());
        assert!(!Instance::parse("ls2").unwrap().is_default());
    }
}
