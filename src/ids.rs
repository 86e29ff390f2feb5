//! UAIDs and APPIDs: client-generated UUID4s, written lowercase with dashes.
//!
//! Both are kept as 16 raw bytes (`Copy`, cheap to hash, the store's key material) and parsed
//! strictly, so that one identifier has exactly one spelling on the wire and in the store.

use std::fmt;

use uuid::Uuid;

/// The store's key for one endpoint token: random, never shown (the endpoint URL carries it
/// sealed, see [`crate::keys::Keys::seal_token`]).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct TokenId(pub [u8; 16]);

impl TokenId {
    pub fn random() -> TokenId {
        let mut id = [0u8; 16];
        // The OS generator failing means the machine cannot do cryptography at all.
        getrandom::fill(&mut id).expect("operating system random number generator failed");
        TokenId(id)
    }
}

/// Why a string is not an acceptable identifier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("not a UUID written as 36 lowercase hex digits and dashes")]
    Malformed,
    #[error("not a version 4 (random) UUID")]
    NotV4,
}

fn parse_v4(s: &str) -> Result<Uuid, IdError> {
    let well_formed = s.len() == 36
        && s.bytes().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => b == b'-',
            _ => b.is_ascii_digit() || (b'a'..=b'f').contains(&b),
        });
    if !well_formed {
        return Err(IdError::Malformed);
    }
    let uuid = Uuid::try_parse(s).map_err(|_| IdError::Malformed)?;
    if uuid.get_version_num() != 4 || uuid.get_variant() != uuid::Variant::RFC4122 {
        return Err(IdError::NotV4);
    }
    Ok(uuid)
}

macro_rules! uuid_id {
    ($name:ident, $doc:literal) => {
        #[doc = $doc]
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(pub [u8; 16]);

        impl $name {
            /// Parses the strict wire form: lowercase, hyphenated, version 4.
            pub fn parse(s: &str) -> Result<Self, IdError> {
                parse_v4(s).map(|u| $name(u.into_bytes()))
            }

            /// A fresh random identifier.
            pub fn random() -> Self {
                $name(Uuid::new_v4().into_bytes())
            }

            pub fn as_bytes(&self) -> &[u8; 16] {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&Uuid::from_bytes(self.0).hyphenated(), f)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(self, f)
            }
        }
    };
}

uuid_id!(
    Uaid,
    "One user agent: a browser profile, a device, a relay's downstream client."
);
uuid_id!(Appid, "One app on a user agent.");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_only_lowercase_hyphenated_v4() {
        let good = "6f2a3c1e-9b4d-4e8f-a1b2-c3d4e5f60718";
        assert_eq!(Uaid::parse(good).unwrap().to_string(), good);
        assert_eq!(Uaid::parse(&good.to_uppercase()), Err(IdError::Malformed));
        assert_eq!(Uaid::parse(&good.replace('-', "")), Err(IdError::Malformed));
        assert_eq!(
            Uaid::parse("6f2a3c1e-9b4d-1e8f-a1b2-c3d4e5f60718"),
            Err(IdError::NotV4)
        );
        assert_eq!(
            Uaid::parse("6f2a3c1e-9b4d-4e8f-c1b2-c3d4e5f60718"),
            Err(IdError::NotV4)
        );
        assert_eq!(Appid::parse(""), Err(IdError::Malformed));
        let random = Appid::random();
        assert_eq!(Appid::parse(&random.to_string()), Ok(random));
    }
}
