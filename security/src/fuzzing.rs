//! Fuzz bodies for what the security checker parses from strangers: X.509
//! certificates and CRLs (publisher chains inside manifests, trust files).
//! `fuzz/fuzz_targets/{certificate,crl}.rs` call them; the unit tests below
//! run them on random and edited inputs.

use libp2p_identity::PeerId;
use webpki::KeyUsage;

use crate::pki::{self, TrustList};

const CA_PEM: &[u8] = include_bytes!("../testdata/ca.pem");
const LEAF_PEM: &[u8] = include_bytes!("../testdata/leaf.pem");
const CRL_PEM: &[u8] = include_bytes!("../testdata/revoked-leaf.crl.pem");
/// The peer `testdata/leaf.pem` is bound to.
pub const LEAF_PEER: &str = "12D3KooWCCzZXpq8anBbknTw4hoQDtVQCw7prqVikHnPzUXDcvE7";
/// Within the test certificates' validity (2030-01-01).
pub const WITHIN_VALIDITY: u64 = 1_893_456_000;

fn der(pem: &[u8]) -> Vec<u8> {
    pki::certs_from_bytes(pem).expect("test certificate")[0].clone()
}

/// XORs `edits` (pairs of position, mask) into `bytes`.
fn edit(bytes: &mut [u8], edits: &[u8]) {
    for pair in edits.chunks_exact(3) {
        if bytes.is_empty() {
            return;
        }
        let at = u16::from_le_bytes([pair[0], pair[1]]) as usize % bytes.len();
        bytes[at] ^= pair[2];
    }
}

/// A certificate from anywhere. Mode 0: arbitrary bytes as a file, a leaf
/// and an anchor. Mode 1: the test leaf with edits: whatever still verifies
/// to the test CA is bound to the test peer.
pub fn certificate(input: &[u8]) {
    let [mode, rest @ ..] = input else { return };
    let peer: PeerId = LEAF_PEER.parse().expect("test peer");
    let usage = || KeyUsage::required_if_present(&[0x2b, 6, 1, 5, 5, 7, 3, 3]);
    if mode & 1 == 0 {
        if let Ok(certs) = pki::certs_from_bytes(rest) {
            for c in &certs {
                let _ = pki::peer_of(c);
                let _ = (pki::subject_of(c), pki::issuer_of(c));
            }
        }
        let _ = TrustList::from_der(&[rest.to_vec()], &[]);
        if let Ok(trust) = TrustList::from_der(&[der(CA_PEM)], &[]) {
            let _ = trust.verify_peer(&[rest.to_vec()], &peer, WITHIN_VALIDITY, usage());
        }
        return;
    }
    let trust = TrustList::from_der(&[der(CA_PEM)], &[]).expect("test CA");
    let honest = der(LEAF_PEM);
    let mut leaf = honest.clone();
    edit(&mut leaf, rest);
    if trust
        .verify_peer(std::slice::from_ref(&leaf), &peer, WITHIN_VALIDITY, usage())
        .is_ok()
    {
        assert_eq!(
            pki::peer_of(&leaf).ok(),
            Some(peer),
            "an edited leaf verified for another peer"
        );
    }
}

/// A CRL from anywhere. Mode 0: arbitrary bytes. Mode 1: the test CRL with
/// edits, checked against the test leaf it revokes. Nothing panics. (An
/// edited CRL may stop applying — its issuer no longer the CA's name — which
/// is what deleting the file would do; that is the operator's file.)
pub fn crl(input: &[u8]) {
    let [mode, rest @ ..] = input else { return };
    let ca = der(CA_PEM);
    let peer: PeerId = LEAF_PEER.parse().expect("test peer");
    let usage = || KeyUsage::required_if_present(&[0x2b, 6, 1, 5, 5, 7, 3, 3]);
    let crl = if mode & 1 == 0 {
        let _ = pki::crls_from_bytes(rest);
        rest.to_vec()
    } else {
        let mut c = pki::crls_from_bytes(CRL_PEM).expect("test CRL")[0].clone();
        edit(&mut c, rest);
        c
    };
    let Ok(trust) = TrustList::from_der(&[ca], &[crl]) else {
        return;
    };
    let verdict = trust.verify_peer(&[der(LEAF_PEM)], &peer, WITHIN_VALIDITY, usage());
    if mode & 1 == 1 && rest.is_empty() {
        assert_eq!(
            verdict,
            Err(pki::CertError::Revoked),
            "the unedited CRL stopped revoking"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random_inputs(seed: u64, n: usize) -> Vec<Vec<u8>> {
        let mut x = seed;
        (0..n)
            .map(|i| {
                (0..(i % 97) * 7 + 1)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        x as u8
                    })
                    .collect()
            })
            .collect()
    }

    #[test]
    fn the_bodies_survive_random_and_edited_inputs() {
        for input in random_inputs(0x5eed, 400) {
            certificate(&input);
            crl(&input);
            let mut edited = input.clone();
            edited[0] |= 1;
            certificate(&edited);
            crl(&edited);
        }
        // A truncated leaf and CRL at every length.
        let leaf = der(LEAF_PEM);
        for n in 0..leaf.len() {
            let mut i = vec![0u8];
            i.extend_from_slice(&leaf[..n]);
            certificate(&i);
        }
    }

    #[test]
    fn the_openssl_made_chain_verifies_and_its_crl_revokes_it() {
        let peer: PeerId = LEAF_PEER.parse().unwrap();
        let usage = || KeyUsage::required_if_present(&[0x2b, 6, 1, 5, 5, 7, 3, 3]);
        let ca = der(CA_PEM);
        let leaf = der(LEAF_PEM);
        let trust = TrustList::from_der(std::slice::from_ref(&ca), &[]).unwrap();
        trust
            .verify_peer(std::slice::from_ref(&leaf), &peer, WITHIN_VALIDITY, usage())
            .unwrap();
        let crls = pki::crls_from_bytes(CRL_PEM).unwrap();
        let revoking = TrustList::from_der(&[ca], &crls).unwrap();
        assert_eq!(
            revoking.verify_peer(&[leaf], &peer, WITHIN_VALIDITY, usage()),
            Err(pki::CertError::Revoked)
        );
    }
}
