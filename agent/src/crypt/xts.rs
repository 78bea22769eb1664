//! AES-XTS over whole sectors, as dm-crypt's `aes-xts-plain64` does it.
//!
//! The tweak of a sector is the little-endian 64-bit plain64 IV zero-extended to 16 bytes. dm-crypt counts that
//! IV in 512-byte units whatever the sector size ([`IV_UNIT`]): with 4096-byte sectors it advances by 8 per sector.
//!
//! Speed comes from batching: the tweaks of a batch of sectors are encrypted together, expanded by GF(2^128)
//! doubling into one tweak per block, XORed in bulk, and the whole batch goes through the `aes` crate's
//! multi-block path (AES-NI pipelines, VAES when the CPU has it) instead of one block at a time.

use aes::cipher::{Array, BlockCipherDecrypt, BlockCipherEncrypt, KeyInit};
use aes::{Aes128, Aes256, Block};

/// The unit the plain64 IV counts, in bytes, whatever the sector size.
pub const IV_UNIT: usize = 512;

const BLOCK_LEN: usize = 16;
/// Bytes per batch: enough blocks for the widest AES pipeline, small enough to stay in the L1/L2 cache.
const BATCH_LEN: usize = 16 * 1024;
const BATCH_BLOCKS: usize = BATCH_LEN / BLOCK_LEN;
const MAX_SECTORS_PER_BATCH: usize = BATCH_LEN / IV_UNIT;

/// The IV of the sector at `byte_offset` (relative to the segment start): the offset in [`IV_UNIT`]s.
pub fn iv_for_offset(byte_offset: u64) -> u64 {
    byte_offset / IV_UNIT as u64
}

/// One AES key schedule, 128 or 256 bits.
enum AesKey {
    Aes128(Box<Aes128>),
    Aes256(Box<Aes256>),
}

impl AesKey {
    fn new(key: &[u8]) -> Self {
        match key.len() {
            16 => AesKey::Aes128(Box::new(Aes128::new(&Array::try_from(key).expect("16-byte key")))),
            32 => AesKey::Aes256(Box::new(Aes256::new(&Array::try_from(key).expect("32-byte key")))),
            n => unreachable!("AES key of {n} bytes"),
        }
    }

    fn encrypt_blocks(&self, blocks: &mut [Block]) {
        match self {
            AesKey::Aes128(c) => c.encrypt_blocks(blocks),
            AesKey::Aes256(c) => c.encrypt_blocks(blocks),
        }
    }

    fn decrypt_blocks(&self, blocks: &mut [Block]) {
        match self {
            AesKey::Aes128(c) => c.decrypt_blocks(blocks),
            AesKey::Aes256(c) => c.decrypt_blocks(blocks),
        }
    }
}

/// The XTS key has the wrong length.
#[derive(Debug, thiserror::Error)]
#[error("XTS key must be 32 or 64 bytes, got {len}")]
pub struct BadXtsKey {
    pub len: usize,
}

/// AES-XTS (AES-128-XTS with a 32-byte key, AES-256-XTS with a 64-byte key). The key schedules are zeroed on drop.
pub struct Xts {
    data: AesKey,
    tweak: AesKey,
    /// The one-pass path, on CPUs with VAES and AVX-512.
    #[cfg(target_arch = "x86_64")]
    vaes: Option<super::xts_vaes::VaesXts>,
}

impl std::fmt::Debug for Xts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let bits = match self.data {
            AesKey::Aes128(_) => 128,
            AesKey::Aes256(_) => 256,
        };
        write!(f, "Xts(AES-{bits})")
    }
}

impl Xts {
    /// `key` is the data key followed by the tweak key, as in dm-crypt and IEEE 1619.
    pub fn new(key: &[u8]) -> Result<Self, BadXtsKey> {
        if key.len() != 32 && key.len() != 64 {
            return Err(BadXtsKey { len: key.len() });
        }
        let (data, tweak) = key.split_at(key.len() / 2);
        Ok(Xts {
            data: AesKey::new(data),
            tweak: AesKey::new(tweak),
            #[cfg(target_arch = "x86_64")]
            vaes: super::xts_vaes::VaesXts::new(data, tweak),
        })
    }

    /// The same cipher without the one-pass path (to compare the two).
    #[cfg(test)]
    fn portable(key: &[u8]) -> Self {
        let (data, tweak) = key.split_at(key.len() / 2);
        Xts {
            data: AesKey::new(data),
            tweak: AesKey::new(tweak),
            #[cfg(target_arch = "x86_64")]
            vaes: None,
        }
    }

    /// Encrypts whole sectors in place. `first_iv` is the plain64 IV of the first sector in [`IV_UNIT`]s
    /// (see [`iv_for_offset`]); each following sector's IV is `sector_size / IV_UNIT` higher.
    ///
    /// # Panics
    /// If `sector_size` is not a power of two ≥ 512 or `buf` is not a whole number of sectors.
    pub fn encrypt_sectors(&self, buf: &mut [u8], sector_size: usize, first_iv: u64) {
        self.process(buf, sector_size, first_iv, Direction::Encrypt);
    }

    /// Decrypts whole sectors in place; the arguments are as for [`Xts::encrypt_sectors`].
    pub fn decrypt_sectors(&self, buf: &mut [u8], sector_size: usize, first_iv: u64) {
        self.process(buf, sector_size, first_iv, Direction::Decrypt);
    }

    fn process(&self, buf: &mut [u8], sector_size: usize, first_iv: u64, direction: Direction) {
        assert!(
            sector_size >= IV_UNIT && sector_size.is_power_of_two(),
            "XTS sector size {sector_size} is not a power of two of at least {IV_UNIT}"
        );
        assert!(buf.len().is_multiple_of(sector_size), "buffer of {} bytes is not whole sectors", buf.len());
        let iv_step = (sector_size / IV_UNIT) as u64;
        #[cfg(target_arch = "x86_64")]
        if let Some(vaes) = &self.vaes {
            vaes.process(buf, sector_size, first_iv, iv_step, matches!(direction, Direction::Decrypt));
            return;
        }
        let blocks_per_sector = sector_size / BLOCK_LEN;
        // A sector larger than a batch is processed as one batch of its own.
        let sectors_per_batch = (BATCH_LEN / sector_size).max(1);
        // Tweaks for one batch, on the stack: this runs once per sector write, an allocation per call shows.
        let mut stack_tweaks = [0u128; BATCH_BLOCKS];
        let mut heap_tweaks = Vec::new();
        let tweaks: &mut [u128] = if blocks_per_sector <= BATCH_BLOCKS {
            &mut stack_tweaks
        } else {
            heap_tweaks.resize(blocks_per_sector, 0);
            &mut heap_tweaks
        };
        let mut sector_tweaks = [Block::default(); MAX_SECTORS_PER_BATCH];
        let mut iv = first_iv;
        for batch in buf.chunks_mut(sectors_per_batch * sector_size) {
            let sectors = batch.len() / sector_size;
            for sector_tweak in &mut sector_tweaks[..sectors] {
                let mut bytes = [0u8; BLOCK_LEN];
                bytes[..8].copy_from_slice(&iv.to_le_bytes());
                *sector_tweak = Block::from(bytes);
                iv = iv.wrapping_add(iv_step);
            }
            self.tweak.encrypt_blocks(&mut sector_tweaks[..sectors]);
            let tweaks = &mut tweaks[..batch.len() / BLOCK_LEN];
            for (sector, per_block) in tweaks.chunks_exact_mut(blocks_per_sector).enumerate() {
                expand_tweaks(u128::from_le_bytes(sector_tweaks[sector].into()), per_block);
            }
            xor_tweaks(batch, tweaks);
            let (blocks, rest) = Array::slice_as_chunks_mut(batch);
            debug_assert!(rest.is_empty());
            match direction {
                Direction::Encrypt => self.data.encrypt_blocks(blocks),
                Direction::Decrypt => self.data.decrypt_blocks(blocks),
            }
            xor_tweaks(batch, tweaks);
        }
    }
}

#[derive(Clone, Copy)]
enum Direction {
    Encrypt,
    Decrypt,
}

/// Fills `out` with `t·α^i`. Eight interleaved chains stepping by α^8 keep the CPU busy instead of waiting on one
/// serial chain of doublings.
#[inline]
fn expand_tweaks(t: u128, out: &mut [u128]) {
    let mut t = t;
    let head = out.len().min(8);
    for slot in &mut out[..head] {
        *slot = t;
        t = mul_alpha(t);
    }
    for i in 8..out.len() {
        out[i] = mul_alpha8(out[i - 8]);
    }
}

/// `b(x)·(x^7 + x^2 + x + 1)` carry-less, for reducing the 8 bits shifted out by a multiplication by α^8.
const REDUCE8: [u16; 256] = {
    let mut table = [0u16; 256];
    let mut b = 0;
    while b < 256 {
        let mut r = 0u16;
        let mut bit = 0;
        while bit < 8 {
            if b & (1 << bit) != 0 {
                r ^= 0x87 << bit;
            }
            bit += 1;
        }
        table[b] = r;
        b += 1;
    }
    table
};

/// Multiplication by α^8.
#[inline(always)]
fn mul_alpha8(t: u128) -> u128 {
    (t << 8) ^ REDUCE8[(t >> 120) as usize] as u128
}

/// Multiplication by the primitive element α in GF(2^128), little-endian as XTS defines it.
#[inline(always)]
pub(super) fn mul_alpha(t: u128) -> u128 {
    (t << 1) ^ ((t >> 127) * 0x87)
}

#[inline]
fn xor_tweaks(buf: &mut [u8], tweaks: &[u128]) {
    let (blocks, _) = buf.as_chunks_mut::<BLOCK_LEN>();
    for (block, t) in blocks.iter_mut().zip(tweaks) {
        *block = (u128::from_le_bytes(*block) ^ t).to_le_bytes();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alpha_doubling_wraps_with_the_xts_polynomial() {
        assert_eq!(mul_alpha(1), 2);
        assert_eq!(mul_alpha(1u128 << 127), 0x87);
        assert_eq!(mul_alpha((1u128 << 127) | 1), 0x87 ^ 2);
    }

    #[test]
    fn alpha8_equals_eight_doublings() {
        let mut t = 0xdead_beef_0123_4567_89ab_cdef_f00d_cafe_u128;
        for _ in 0..1000 {
            let mut slow = t;
            for _ in 0..8 {
                slow = mul_alpha(slow);
            }
            assert_eq!(mul_alpha8(t), slow);
            t = slow ^ (t >> 3);
        }
    }

    #[test]
    fn round_trip_both_key_sizes_and_sector_sizes() {
        for key_len in [32, 64] {
            let key: Vec<u8> = (0..key_len as u8).collect();
            let xts = Xts::new(&key).unwrap();
            for sector_size in [512, 4096, 65536] {
                let plain: Vec<u8> = (0..sector_size * 5).map(|i| (i * 7 % 251) as u8).collect();
                let mut buf = plain.clone();
                xts.encrypt_sectors(&mut buf, sector_size, 3);
                assert_ne!(buf, plain);
                xts.decrypt_sectors(&mut buf, sector_size, 3);
                assert_eq!(buf, plain);
            }
        }
    }

    #[test]
    fn batches_match_sector_by_sector() {
        let key = [0x42u8; 64];
        let xts = Xts::new(&key).unwrap();
        let plain: Vec<u8> = (0..512 * 100).map(|i| (i % 253) as u8).collect();
        let mut whole = plain.clone();
        xts.encrypt_sectors(&mut whole, 512, 1000);
        for (i, sector) in plain.chunks(512).enumerate() {
            let mut one = sector.to_vec();
            xts.encrypt_sectors(&mut one, 512, 1000 + i as u64);
            assert_eq!(one, whole[i * 512..(i + 1) * 512]);
        }
    }

    #[test]
    fn the_one_pass_path_matches_the_portable_one() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for key_len in [32, 64] {
            for sector_size in [512, 4096, 65536] {
                for sectors in [1, 3] {
                    let key: Vec<u8> = (0..key_len).map(|_| next() as u8).collect();
                    let (fast, portable) = (Xts::new(&key).unwrap(), Xts::portable(&key));
                    // Where the CPU has the features, `fast` is the one-pass path (else both are portable).
                    #[cfg(target_arch = "x86_64")]
                    assert_eq!(fast.vaes.is_some(), crate::crypt::xts_vaes::available());
                    let iv = next() >> (next() % 64);
                    let plain: Vec<u8> = (0..sector_size * sectors).map(|_| next() as u8).collect();
                    let (mut a, mut b) = (plain.clone(), plain.clone());
                    fast.encrypt_sectors(&mut a, sector_size, iv);
                    portable.encrypt_sectors(&mut b, sector_size, iv);
                    assert_eq!(a, b, "encrypt, {key_len}-byte key, {sector_size}-byte sectors");
                    fast.decrypt_sectors(&mut a, sector_size, iv);
                    assert_eq!(a, plain, "decrypt, {key_len}-byte key, {sector_size}-byte sectors");
                }
            }
        }
    }

    #[test]
    fn rejects_bad_key_lengths() {
        assert!(Xts::new(&[0u8; 48]).is_err());
    }
}
