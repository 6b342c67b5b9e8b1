//! Bodies of the content engine's fuzz targets (`fuzz/fuzz_targets/`), run
//! by cargo-fuzz and, on random inputs, by the property tests below in CI.
//! Each feeds bytes a hostile peer controls to one parser and checks what
//! must hold whatever they are: no panic, and nothing accepted that an honest
//! peer did not send.

use std::sync::OnceLock;

use libp2p::PeerId;
use p2pvm_content::{ContentId, Manifest};
use p2pvm_security::{Verdict, virus::parse_reply};
use prost::Message;

use super::VerifiedManifest;
use super::fetch::{Have, Sched, have_bits};
use p2pvm_security::sealed::fuzz_opener;

/// Edits `(position, xor)` from `edits` (three bytes each) applied to `bytes`.
fn edit(bytes: &mut [u8], edits: &[u8]) -> bool {
    let mut changed = false;
    for e in edits.chunks_exact(3) {
        if bytes.is_empty() {
            break;
        }
        let at = usize::from(u16::from_le_bytes([e[0], e[1]])) * 13 % bytes.len();
        bytes[at] ^= e[2];
        changed |= e[2] != 0;
    }
    changed
}

/// Sealed frames (the fast path's record layer), as a downloader receives
/// them. Input: a mode byte (arbitrary bytes, or honest frames with edits;
/// its high bits size the pieces the bytes arrive in), then the bytes. Frames
/// that open are exactly the honest plaintexts, in order; anything else
/// fails authentication and nothing after it opens.
pub fn sealed_frames(input: &[u8]) {
    let [mode, rest @ ..] = input else { return };
    let piece = usize::from(mode >> 1) * 97 + 1;
    let (stream, honest): (Vec<u8>, Vec<Vec<u8>>) = if mode & 1 == 0 {
        (rest.to_vec(), Vec::new())
    } else {
        // Plaintexts cut from the input by its own bytes, then sealed.
        let split = rest.len() / 2;
        let (plain, edits) = rest.split_at(split);
        let mut frames = Vec::new();
        let mut left = plain;
        while let [len, tail @ ..] = left {
            let n = usize::from(*len).min(tail.len());
            frames.push(tail[..n].to_vec());
            left = &tail[n..];
        }
        let mut sealed = fuzz_opener::seal_all(&frames);
        if !edit(&mut sealed, edits) {
            // No edit: everything must open.
            let got = fuzz_opener::open_all(&sealed, piece).expect("honest frames open");
            assert_eq!(got, frames);
            return;
        }
        (sealed, frames)
    };
    match fuzz_opener::open_all(&stream, piece) {
        Ok(got) | Err((got, _)) => {
            // Whatever opened is a prefix of what was honestly sealed.
            assert!(got.len() <= honest.len(), "a forged frame opened");
            assert_eq!(got[..], honest[..got.len()]);
        }
    }
}

fn honest_manifest() -> &'static (Manifest, Vec<u8>) {
    static HONEST: OnceLock<(Manifest, Vec<u8>)> = OnceLock::new();
    HONEST.get_or_init(|| {
        let key = libp2p::identity::Keypair::ed25519_from_bytes([7; 32]).expect("key");
        let m = Manifest {
            content_id: blake3::hash(b"film").as_bytes().to_vec(),
            name: "film.webm".into(),
            mime_type: "video/webm".into(),
            size: 4,
            publisher: String::new(),
            created_unix: 1_790_000_000,
            tags: vec!["film".into()],
            rights: None,
            publisher_certificates: Vec::new(),
        };
        let signed = m.sign(&key).expect("sign");
        let parsed = VerifiedManifest::parse(&signed.encode_to_vec()).expect("honest");
        (parsed.manifest, signed.encode_to_vec())
    })
}

/// A manifest from a peer. Input: a mode byte (arbitrary bytes, or the
/// honest signed manifest with edits), then the bytes. Whatever parses is
/// signed by the publisher it names and describes the id it claims; an
/// edited honest manifest either fails or says exactly what the honest one
/// says.
pub fn manifest(input: &[u8]) {
    let [mode, rest @ ..] = input else { return };
    if mode & 1 == 0 {
        if let Ok(m) = VerifiedManifest::parse(rest) {
            assert_eq!(m.id.0.as_slice(), m.manifest.content_id.as_slice());
            assert!(
                m.manifest.publisher.parse::<PeerId>().is_ok(),
                "a manifest without a valid publisher verified"
            );
        }
        return;
    }
    let (honest, signed) = honest_manifest();
    let mut forged = signed.clone();
    edit(&mut forged, rest);
    if let Ok(m) = VerifiedManifest::parse(&forged) {
        assert_eq!(
            &m.manifest, honest,
            "an edited manifest verified with other fields"
        );
        assert_eq!(m.id, ContentId::from(blake3::hash(b"film")));
    }
}

/// clamd's reply to a scan. A verdict is only ever what clamd said: clean
/// only for `OK`, infected only with a signature named before `FOUND`.
pub fn clamd_reply(input: &[u8]) {
    let text = String::from_utf8_lossy(input);
    let trimmed = text.trim_end_matches(['\0', '\n']).trim();
    match parse_reply(input) {
        Ok(Verdict::Clean) => assert!(trimmed.ends_with("OK") && !trimmed.contains("FOUND")),
        Ok(Verdict::Infected(sig)) => {
            assert!(!sig.is_empty() && trimmed.ends_with("FOUND"));
            assert!(text.contains(&sig));
        }
        Err(_) => {}
    }
}

/// `Have` bitfields from providers. Input: two bytes giving the item's block
/// count, then up to three bitfields (a length byte each). A bitfield is
/// refused if too short, else read bit by bit; the schedule's rarity of each
/// block is exactly how many accepted bitfields have it.
pub fn have_bitfield(input: &[u8]) {
    let [b0, b1, rest @ ..] = input else { return };
    let blocks = u64::from(u16::from_le_bytes([*b0, *b1])) % 1500;
    let now = std::time::Instant::now();
    let mut sched = Sched::new(blocks, 4, 8, true, 1, now);
    let mut accepted: Vec<(PeerId, Vec<bool>)> = Vec::new();
    let mut left = rest;
    let peers: Vec<PeerId> = (0..3).map(|_| PeerId::random()).collect();
    for peer in &peers {
        let [len, tail @ ..] = left else { break };
        let n = (usize::from(*len) * 2).min(tail.len());
        let (field, more) = tail.split_at(n);
        left = more;
        match have_bits(field, blocks) {
            Ok(bits) => {
                assert!(field.len() as u64 >= blocks.div_ceil(8));
                assert_eq!(bits.len() as u64, blocks);
                for (k, b) in bits.iter().enumerate() {
                    assert_eq!(*b, field[k / 8] >> (k % 8) & 1 == 1);
                }
                sched.set_have(*peer, Have::Some(bits.clone()));
                accepted.push((*peer, bits));
            }
            Err(_) => assert!((field.len() as u64) < blocks.div_ceil(8)),
        }
    }
    for k in 0..blocks {
        let holders = accepted.iter().filter(|(_, b)| b[k as usize]).count();
        assert_eq!(usize::from(sched.rarity(k)), holders);
    }
    // A provider that leaves takes its blocks out of the counts.
    if let Some((gone, _)) = accepted.first() {
        sched.forget_peer(gone);
        for k in 0..blocks as usize {
            let holders = accepted[1..].iter().filter(|(_, b)| b[k]).count();
            assert_eq!(usize::from(sched.rarity(k as u64)), holders);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn sealed_frames_hold(input in proptest::collection::vec(any::<u8>(), 0..3000)) {
            sealed_frames(&input);
        }

        #[test]
        fn manifests_hold(input in proptest::collection::vec(any::<u8>(), 0..600)) {
            manifest(&input);
        }

        #[test]
        fn clamd_replies_hold(input in proptest::collection::vec(any::<u8>(), 0..80)) {
            clamd_reply(&input);
        }

        #[test]
        fn clamd_replies_that_look_like_clamd_hold(sig in "[A-Za-z0-9. ]{0,20}", end in "(FOUND|OK|ERROR|)") {
            clamd_reply(format!("stream: {sig} {end}\0").as_bytes());
        }

        #[test]
        fn have_bitfields_hold(input in proptest::collection::vec(any::<u8>(), 0..800)) {
            have_bitfield(&input);
        }
    }

    #[test]
    fn honest_inputs_take_the_accepting_paths() {
        // Each body's accepting branch is reached, not only its refusals.
        let mut frames = vec![1u8, 3, b'a', b'b', b'c', 0, 2, b'x', b'y'];
        frames.extend([0u8; 9]);
        sealed_frames(&frames);
        manifest(&[1]);
        clamd_reply(b"stream: Eicar-Test FOUND\0");
        clamd_reply(b"stream: OK\0");
        have_bitfield(&[9, 0, 1, 0xff, 0x01, 1, 0x0f, 0x00]);
    }
}
