//! The byte layout of stored records, kept apart from the engines that hold them.
//!
//! Fixed-width, big-endian, versioned by a leading byte so a later layout can be read beside
//! this one. Hand-written: the record is tiny and read on every PUT and ACK.

use super::StoreError;
use crate::ids::TokenId;
use crate::ids::{Appid, Uaid};

const LAYOUT_V1: u8 = 1;
const HAS_LAST: u8 = 1;
const HAS_PENDING: u8 = 2;
const FIXED_LEN: usize = 1 + 16 + 1 + 8 + 8 + 8;

/// One (UAID, APPID) registration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    pub token: TokenId,
    /// The newest version ever accepted; survives ACKs so an old version never raises again.
    pub last_version: Option<u64>,
    /// The pending event: (version, expires_at_ms).
    pub pending: Option<(u64, u64)>,
    /// The registration's KICK settings as JSON, empty when none.
    pub kick: Vec<u8>,
}

impl Registration {
    pub fn new(token: TokenId, kick: &[u8]) -> Registration {
        Registration {
            token,
            last_version: None,
            pending: None,
            kick: kick.to_vec(),
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(FIXED_LEN + self.kick.len());
        out.push(LAYOUT_V1);
        out.extend_from_slice(&self.token.0);
        let flags = if self.last_version.is_some() { HAS_LAST } else { 0 }
            | if self.pending.is_some() { HAS_PENDING } else { 0 };
        out.push(flags);
        out.extend_from_slice(&self.last_version.unwrap_or(0).to_be_bytes());
        let (version, expires) = self.pending.unwrap_or((0, 0));
        out.extend_from_slice(&version.to_be_bytes());
        out.extend_from_slice(&expires.to_be_bytes());
        out.extend_from_slice(&self.kick);
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Registration, StoreError> {
        if bytes.len() < FIXED_LEN || bytes[0] != LAYOUT_V1 {
            return Err(StoreError::Corrupt("registration record"));
        }
        let u64_at = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&bytes[at..at + 8]);
            u64::from_be_bytes(b)
        };
        let mut token = [0u8; 16];
        token.copy_from_slice(&bytes[1..17]);
        let flags = bytes[17];
        Ok(Registration {
            token: TokenId(token),
            last_version: (flags & HAS_LAST != 0).then(|| u64_at(18)),
            pending: (flags & HAS_PENDING != 0).then(|| (u64_at(26), u64_at(34))),
            kick: bytes[FIXED_LEN..].to_vec(),
        })
    }
}

/// Key of a registration: UAID then APPID, so one UAID's registrations are one prefix range.
pub fn registration_key(uaid: &Uaid, appid: &Appid) -> [u8; 32] {
    let mut key = [0u8; 32];
    key[..16].copy_from_slice(uaid.as_bytes());
    key[16..].copy_from_slice(appid.as_bytes());
    key
}

/// The APPID half of a registration key.
pub fn appid_of_key(key: &[u8]) -> Result<Appid, StoreError> {
    key.get(16..32)
        .and_then(|b| <[u8; 16]>::try_from(b).ok())
        .map(Appid)
        .ok_or(StoreError::Corrupt("registration key"))
}

/// A token index entry: the registration it points to, or a tombstone with its expiry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenEntry {
    Active(Uaid, Appid),
    Gone { until_ms: u64 },
}

impl TokenEntry {
    pub fn encode(&self) -> Vec<u8> {
        match self {
            TokenEntry::Active(u, a) => registration_key(u, a).to_vec(),
            TokenEntry::Gone { until_ms } => until_ms.to_be_bytes().to_vec(),
        }
    }

    pub fn decode(bytes: &[u8]) -> Result<TokenEntry, StoreError> {
        match bytes.len() {
            32 => {
                let mut u = [0u8; 16];
                u.copy_from_slice(&bytes[..16]);
                Ok(TokenEntry::Active(Uaid(u), appid_of_key(bytes)?))
            }
            8 => {
                let mut b = [0u8; 8];
                b.copy_from_slice(bytes);
                Ok(TokenEntry::Gone {
                    until_ms: u64::from_be_bytes(b),
                })
            }
            _ => Err(StoreError::Corrupt("token entry")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registration_round_trips() {
        let mut r = Registration::new(TokenId([7; 16]), b"{\"a\":1}");
        assert_eq!(Registration::decode(&r.encode()).unwrap(), r);
        r.last_version = Some(u64::MAX);
        r.pending = Some((5, 99));
        assert_eq!(Registration::decode(&r.encode()).unwrap(), r);
        assert!(Registration::decode(&[1, 2, 3]).is_err());
    }

    #[test]
    fn token_entries_round_trip() {
        let e = TokenEntry::Active(Uaid::random(), Appid::random());
        assert_eq!(TokenEntry::decode(&e.encode()).unwrap(), e);
        let g = TokenEntry::Gone { until_ms: 42 };
        assert_eq!(TokenEntry::decode(&g.encode()).unwrap(), g);
    }
}
