//! A trusted group's id: a digest of its CA's public key. A leaf: the
//! groups, their topic keys and their TLS sessions all name groups by it.

use crate::Cause;
use std::fmt;

use x509_parser::prelude::{FromDer, X509Certificate};

use crate::pki::CertError;

/// A group's id: a digest of its CA's public key, as 32 hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GroupId(pub [u8; 16]);

impl fmt::Display for GroupId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl std::str::FromStr for GroupId {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        if s.len() != 32 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(());
        }
        let mut id = [0u8; 16];
        for (i, b) in id.iter_mut().enumerate() {
            *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| ())?;
        }
        Ok(Self(id))
    }
}

/// The id of the group whose CA certificate is `ca_der`.
pub fn group_id(ca_der: &[u8]) -> Result<GroupId, CertError> {
    let (_, ca) = X509Certificate::from_der(ca_der).map_err(|e| CertError::Malformed {
        what: "certificate",
        source: Cause::new(e),
    })?;
    let digest = blake3::hash(ca.public_key().raw);
    let mut id = [0u8; 16];
    id.copy_from_slice(&digest.as_bytes()[..16]);
    Ok(GroupId(id))
}
