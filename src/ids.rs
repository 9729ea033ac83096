//! Names and ids of tenants and keys.
//!
//! A *name* is what users type (`[a-z0-9][a-z0-9-]{0,62}`); an *id* is 16 random bytes that never
//! change and never get reused. AAD, storage paths and ciphertext headers use ids only, so a
//! tenant re-created under an old name can never decrypt what the old one encrypted.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Length in bytes of every id.
pub const ID_LEN: usize = 16;

/// A validated tenant or key name: `[a-z0-9][a-z0-9-]{0,62}`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Name(String);

/// Why a string is not a valid [`Name`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("names are 1 to 63 characters of a-z, 0-9 and '-', starting with a letter or digit")]
pub struct InvalidName;

impl Name {
    /// The name as typed.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for Name {
    type Err = InvalidName;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bytes = s.as_bytes();
        let first_ok = bytes
            .first()
            .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
        let rest_ok = bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-');
        if first_ok && rest_ok && bytes.len() <= 63 {
            Ok(Self(s.to_owned()))
        } else {
            Err(InvalidName)
        }
    }
}

impl TryFrom<String> for Name {
    type Error = InvalidName;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Name> for String {
    fn from(name: Name) -> Self {
        name.0
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

macro_rules! random_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        pub struct $name([u8; ID_LEN]);

        impl $name {
            /// A new random id from the operating system's CSPRNG.
            pub fn random() -> Self {
                Self(rand::random())
            }

            /// The id from its 16 bytes.
            pub const fn from_bytes(bytes: [u8; ID_LEN]) -> Self {
                Self(bytes)
            }

            /// The id's 16 bytes, as they appear in AAD, headers and storage keys.
            pub const fn as_bytes(&self) -> &[u8; ID_LEN] {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&hex::encode(self.0))
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), hex::encode(self.0))
            }
        }

        impl FromStr for $name {
            type Err = hex::FromHexError;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                let mut bytes = [0u8; ID_LEN];
                hex::decode_to_slice(s, &mut bytes)?;
                Ok(Self(bytes))
            }
        }
    };
}

random_id!(
    /// The immutable random id of a tenant; its database directory is named after it.
    TenantId
);
random_id!(
    /// The immutable random id of a key (all its versions share it).
    KeyId
);

/// A key version number; versions start at 1 and only rotation adds one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct KeyVersion(pub u32);

impl fmt::Display for KeyVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_documented_pattern() {
        for ok in ["a", "acme", "0", "a-b-c", &"x".repeat(63)] {
            assert!(ok.parse::<Name>().is_ok(), "{ok}");
        }
        for bad in ["", "-a", "A", "a_b", "a.b", "é", &"x".repeat(64), "a b"] {
            assert_eq!(bad.parse::<Name>(), Err(InvalidName), "{bad}");
        }
    }

    #[test]
    fn ids_round_trip_through_hex() {
        let id = TenantId::random();
        assert_eq!(id.to_string().parse::<TenantId>().ok(), Some(id));
        assert!("zz".parse::<KeyId>().is_err());
    }
}
