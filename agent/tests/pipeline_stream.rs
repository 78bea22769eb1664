//! The stream adapters on their own: sniffing, decoders' truncation and trailing-data checks, limits, hashing.

use std::io::{BufReader, Cursor, Read};

use gridforge_agent::pipeline::{Compression, HashingReader, LimitedReader, PipelineError, decoder, sniff};
use sha2::{Digest, Sha256};

fn decode_all(blob: Vec<u8>) -> Result<Vec<u8>, PipelineError> {
    let mut out = Vec::new();
    // A tiny buffer exercises magic bytes split across reads.
    decoder(BufReader::with_capacity(3, Cursor::new(blob)))?
        .read_to_end(&mut out)
        .map_err(|e| PipelineError::from_io("decoding", e))?;
    Ok(out)
}

fn data() -> Vec<u8> {
    (0..300_000u32).flat_map(|i| (i % 251).to_le_bytes()).collect()
}

#[test]
fn sniffs_magic_bytes() {
    assert_eq!(sniff(&[0x28, 0xB5, 0x2F, 0xFD, 0]), Compression::Zstd);
    assert_eq!(sniff(&[0x5E, 0x2A, 0x4D, 0x18]), Compression::Zstd);
    assert_eq!(sniff(&[0x1F, 0x8B, 8]), Compression::Gzip);
    assert_eq!(sniff(b"hello"), Compression::None);
    assert_eq!(sniff(&[]), Compression::None);
}

#[test]
fn zstd_frames_concatenate_and_reject_truncation_and_trailing_data() {
    let d = data();
    let mut two = zstd::encode_all(&d[..], 1).unwrap();
    two.extend(zstd::encode_all(&d[..], 19).unwrap());
    let mut both = d.clone();
    both.extend(&d);
    assert_eq!(decode_all(two.clone()).unwrap(), both);

    let mut trailing = two.clone();
    trailing.extend_from_slice(b"\0\0");
    assert!(matches!(decode_all(trailing), Err(PipelineError::TrailingData { .. })));
    let cut = two[..two.len() - 5].to_vec();
    assert!(matches!(decode_all(cut), Err(PipelineError::Truncated { .. })));
    let header_only = two[..6].to_vec();
    assert!(matches!(decode_all(header_only), Err(PipelineError::Truncated { .. })));
}

#[test]
fn gzip_members_concatenate_and_reject_truncation_and_trailing_data() {
    let d = data();
    let gz = |data: &[u8]| {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        std::io::Write::write_all(&mut e, data).unwrap();
        e.finish().unwrap()
    };
    let mut two = gz(&d);
    two.extend(gz(b"second"));
    let mut both = d.clone();
    both.extend_from_slice(b"second");
    assert_eq!(decode_all(two.clone()).unwrap(), both);
    let mut trailing = two.clone();
    trailing.extend_from_slice(b"trailing");
    assert!(matches!(decode_all(trailing), Err(PipelineError::TrailingData { .. })));
    for cut in [two.len() - 3, two.len() / 3] {
        let err = decode_all(two[..cut].to_vec()).unwrap_err();
        assert!(matches!(err, PipelineError::Truncated { .. }), "cut at {cut}: {err}");
    }
}

#[test]
fn uncompressed_passes_through() {
    assert_eq!(decode_all(b"ab".to_vec()).unwrap(), b"ab");
    assert_eq!(decode_all(Vec::new()).unwrap(), b"");
}

#[test]
fn limited_reader_fails_past_the_limit() {
    let mut out = Vec::new();
    LimitedReader::new(&[0u8; 10][..], 10).read_to_end(&mut out).unwrap();
    let err = LimitedReader::new(&[0u8; 11][..], 10).read_to_end(&mut out).unwrap_err();
    let err = PipelineError::from_io("reading", err);
    assert!(matches!(err, PipelineError::TooLarge { limit: 10 }), "{err}");
}

#[test]
fn hashing_reader_hashes_what_passes() {
    let d = data();
    let mut r = HashingReader::new(&d[..]);
    std::io::copy(&mut r, &mut std::io::sink()).unwrap();
    assert_eq!(r.bytes_read(), d.len() as u64);
    assert_eq!(r.finish(), hex::encode(Sha256::digest(&d)));
}
