//! The LUKS anti-forensic splitter (cryptsetup's `lib/luks1/af.c`) with the SHA-256 diffuser.
//!
//! A key is spread over `stripes` blocks so that losing any part of the keyslot area loses the key: all stripes
//! but the last are random, and the last is the key XORed with the diffused XOR-chain of the others.

use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

const DIGEST_LEN: usize = 32;

/// Splits `key` over `stripes` blocks in `out` (exactly `key.len() * stripes` bytes), whose first `stripes - 1`
/// blocks the caller has filled with random bytes.
pub fn split(key: &[u8], stripes: usize, out: &mut [u8]) {
    let block = key.len();
    assert_eq!(out.len(), block * stripes, "AF split output size");
    let (random_part, last) = out.split_at_mut(block * (stripes - 1));
    let mut chain = Zeroizing::new(vec![0u8; block]);
    for stripe in random_part.chunks_exact(block) {
        xor_into(&mut chain, stripe);
        diffuse(&mut chain);
    }
    for ((dst, k), c) in last.iter_mut().zip(key).zip(chain.iter()) {
        *dst = k ^ c;
    }
}

/// Recovers a key of `key_len` bytes from its `stripes` split blocks.
pub fn merge(material: &[u8], key_len: usize, stripes: usize) -> Zeroizing<Vec<u8>> {
    assert_eq!(material.len(), key_len * stripes, "AF material size");
    let mut chain = Zeroizing::new(vec![0u8; key_len]);
    let (head, last) = material.split_at(key_len * (stripes - 1));
    for stripe in head.chunks_exact(key_len) {
        xor_into(&mut chain, stripe);
        diffuse(&mut chain);
    }
    xor_into(&mut chain, last);
    chain
}

fn xor_into(dst: &mut [u8], src: &[u8]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d ^= s;
    }
}

/// Each 32-byte chunk j becomes SHA-256(be32(j) ‖ chunk); a short last chunk takes the digest's prefix.
fn diffuse(buf: &mut [u8]) {
    for (j, chunk) in buf.chunks_mut(DIGEST_LEN).enumerate() {
        let mut h = Sha256::new();
        h.update((j as u32).to_be_bytes());
        h.update(&*chunk);
        let digest = h.finalize();
        chunk.copy_from_slice(&digest[..chunk.len()]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_inverts_split_for_key_sizes_with_short_chunks() {
        for key_len in [32, 64, 40] {
            let key: Vec<u8> = (0..key_len as u8).collect();
            let mut out = vec![0u8; key_len * 4000];
            out.iter_mut().enumerate().for_each(|(i, x)| *x = (i * 13) as u8);
            split(&key, 4000, &mut out);
            assert_eq!(&merge(&out, key_len, 4000)[..], &key[..]);
        }
    }
}
