//! Usernames: parsed once at the edge, valid everywhere after.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Shortest username accepted.
pub const MIN_LEN: usize = 3;
/// Longest username accepted.
pub const MAX_LEN: usize = 32;

/// A valid username: 3 to 32 characters of `a-z 0-9 . _ -`, stored lowercase.
///
/// Usernames are case-insensitive: `Alice` and `alice` are the same account, so parsing
/// folds ASCII upper case to lower case and the canonical form is what goes on the wire.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Username(String);

/// Why a string is not a valid username.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NameError {
    /// Fewer than [`MIN_LEN`] characters.
    #[error("username {0:?} is too short: use 3 to 32 characters")]
    TooShort(String),
    /// More than [`MAX_LEN`] characters.
    #[error("username is too long ({0} characters): use 3 to 32 characters")]
    TooLong(usize),
    /// A character outside `a-z 0-9 . _ -`.
    #[error("username {name:?} contains {ch:?}: use only letters a-z, digits 0-9 and . _ -")]
    BadChar {
        /// The offending name (truncated to the length limit).
        name: String,
        /// The first character that is not allowed.
        ch: char,
    },
}

impl Username {
    /// Parses and canonicalises (lowercases) a username.
    pub fn parse(s: &str) -> Result<Self, NameError> {
        let n = s.chars().count();
        if n > MAX_LEN {
            return Err(NameError::TooLong(n));
        }
        if n < MIN_LEN {
            return Err(NameError::TooShort(s.to_string()));
        }
        let lower = s.to_ascii_lowercase();
        if let Some(ch) = lower.chars().find(|c| !is_name_char(*c)) {
            return Err(NameError::BadChar { name: lower, ch });
        }
        Ok(Username(lower))
    }

    /// The canonical (lowercase) form.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Characters allowed in usernames and search prefixes (after lowercasing).
pub fn is_name_char(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-')
}

/// Validates a search prefix: 1 to 32 username characters, lowercased.
pub fn parse_prefix(s: &str) -> Result<String, NameError> {
    let n = s.chars().count();
    if n > MAX_LEN {
        return Err(NameError::TooLong(n));
    }
    if n == 0 {
        return Err(NameError::TooShort(String::new()));
    }
    let lower = s.to_ascii_lowercase();
    if let Some(ch) = lower.chars().find(|c| !is_name_char(*c)) {
        return Err(NameError::BadChar { name: lower, ch });
    }
    Ok(lower)
}

impl TryFrom<String> for Username {
    type Error = NameError;
    fn try_from(s: String) -> Result<Self, NameError> {
        Username::parse(&s)
    }
}

impl From<Username> for String {
    fn from(u: Username) -> String {
        u.0
    }
}

impl fmt::Display for Username {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Username {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "@{}", self.0)
    }
}

impl std::str::FromStr for Username {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, NameError> {
        Username::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn case_folds_and_validates() {
        assert_eq!(
            Username::parse("Alice.B_1-x").unwrap().as_str(),
            "alice.b_1-x"
        );
        assert!(matches!(Username::parse("ab"), Err(NameError::TooShort(_))));
        assert!(matches!(
            Username::parse(&"a".repeat(33)),
            Err(NameError::TooLong(33))
        ));
        assert!(matches!(
            Username::parse("al ice"),
            Err(NameError::BadChar { ch: ' ', .. })
        ));
        assert!(matches!(
            Username::parse("zoë"),
            Err(NameError::BadChar { ch: 'ë', .. })
        ));
        assert!(Username::parse(&"a".repeat(32)).is_ok());
    }

    proptest! {
        #[test]
        fn parse_is_total_and_canonical(s in ".{0,40}") {
            if let Ok(u) = Username::parse(&s) {
                prop_assert!(u.as_str().len() >= MIN_LEN && u.as_str().len() <= MAX_LEN);
                prop_assert_eq!(Username::parse(u.as_str()).unwrap(), u.clone());
                prop_assert!(u.as_str().chars().all(is_name_char));
            }
        }
    }
}
