//! AES-XTS in one pass for x86-64 CPUs with VAES, VPCLMULQDQ and AVX-512: four blocks per register, four
//! registers in flight, the tweak XOR before the rounds and the one after folded into the first and the last
//! round key, and the tweaks of the next sixteen blocks made from these with one carry-less multiply per
//! register. Nothing goes through memory between the passes, which is what makes one 4096-byte sector per call
//! as fast as long runs of sectors.
//!
//! [`super::xts::Xts`] uses this when the CPU has it and its portable batched path otherwise; both give the
//! same bytes (the tests compare them).

use std::arch::x86_64::*;

use zeroize::Zeroize;

/// Round keys of one AES key (11 used for AES-128, 15 for AES-256).
type RoundKeys = [[u8; 16]; 15];

/// Key schedules for XTS, kept as bytes so that they can be zeroed on drop.
pub(super) struct VaesXts {
    /// 10 (AES-128) or 14 (AES-256).
    rounds: usize,
    data_enc: RoundKeys,
    /// The data key's schedule for the equivalent inverse cipher (AESDEC order).
    data_dec: RoundKeys,
    tweak_enc: RoundKeys,
}

impl Drop for VaesXts {
    fn drop(&mut self) {
        self.data_enc.zeroize();
        self.data_dec.zeroize();
        self.tweak_enc.zeroize();
    }
}

/// Whether this CPU runs [`VaesXts`].
pub(super) fn available() -> bool {
    is_x86_feature_detected!("aes")
        && is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("vaes")
        && is_x86_feature_detected!("vpclmulqdq")
}

impl VaesXts {
    /// The schedules for `data` and `tweak` (16 or 32 bytes each), or None when the CPU lacks the features.
    pub(super) fn new(data: &[u8], tweak: &[u8]) -> Option<VaesXts> {
        if !available() || data.len() != tweak.len() || !matches!(data.len(), 16 | 32) {
            return None;
        }
        let mut x =
            VaesXts { rounds: 0, data_enc: [[0; 16]; 15], data_dec: [[0; 16]; 15], tweak_enc: [[0; 16]; 15] };
        // SAFETY: `available` found AES-NI on this CPU; the key lengths are checked above.
        unsafe {
            x.rounds = expand_key(data, &mut x.data_enc);
            expand_key(tweak, &mut x.tweak_enc);
            inverse_schedule(&x.data_enc, x.rounds, &mut x.data_dec);
        }
        Some(x)
    }

    /// Encrypts or decrypts whole sectors in place; the caller has checked the sector size (a power of two of
    /// at least 512 bytes) and that `buf` is whole sectors. Sector `n`'s IV is `first_iv + n * iv_step`.
    pub(super) fn process(
        &self,
        buf: &mut [u8],
        sector_size: usize,
        first_iv: u64,
        iv_step: u64,
        decrypt: bool,
    ) {
        debug_assert!(
            sector_size >= 512 && sector_size.is_power_of_two() && buf.len().is_multiple_of(sector_size)
        );
        // SAFETY: a VaesXts exists only where `available` found every feature these functions are compiled
        // for; the buffer is whole sectors of a multiple of 256 bytes, which is all they read and write.
        unsafe {
            match (self.rounds, decrypt) {
                (10, false) => self.sectors::<10, false>(buf, sector_size, first_iv, iv_step),
                (10, true) => self.sectors::<10, true>(buf, sector_size, first_iv, iv_step),
                (14, false) => self.sectors::<14, false>(buf, sector_size, first_iv, iv_step),
                (14, true) => self.sectors::<14, true>(buf, sector_size, first_iv, iv_step),
                (n, _) => unreachable!("AES with {n} rounds"),
            }
        }
    }

    #[target_feature(enable = "avx512f,vaes,vpclmulqdq,aes")]
    unsafe fn sectors<const ROUNDS: usize, const DECRYPT: bool>(
        &self,
        buf: &mut [u8],
        sector_size: usize,
        first_iv: u64,
        iv_step: u64,
    ) {
        let schedule = if DECRYPT { &self.data_dec } else { &self.data_enc };
        let mut keys = [_mm512_setzero_si512(); 15];
        for (key, bytes) in keys.iter_mut().zip(schedule).take(ROUNDS + 1) {
            // SAFETY: `bytes` is 16 readable bytes.
            *key = _mm512_broadcast_i32x4(unsafe { _mm_loadu_si128(bytes.as_ptr().cast()) });
        }
        let poly = _mm512_set1_epi64(0x87);
        let mut iv = first_iv;
        for sector in buf.chunks_exact_mut(sector_size) {
            // The first sixteen tweaks, from the encrypted IV by doubling; the rest by steps of α^16.
            let mut first = [0u128; 16];
            // SAFETY: AES-NI is enabled for this function.
            first[0] = unsafe { self.encrypt_tweak::<ROUNDS>(iv) };
            for i in 1..16 {
                first[i] = super::xts::mul_alpha(first[i - 1]);
            }
            // SAFETY: `first` holds 16 u128, four registers' worth.
            let mut tweaks: [__m512i; 4] =
                std::array::from_fn(|i| unsafe { _mm512_loadu_si512(first.as_ptr().add(4 * i).cast()) });
            for chunk in sector.chunks_exact_mut(256) {
                let p = chunk.as_mut_ptr();
                let mut state: [__m512i; 4] = std::array::from_fn(|i| {
                    // SAFETY: `chunk` is 256 bytes: four 64-byte loads.
                    let block = unsafe { _mm512_loadu_si512(p.add(64 * i).cast()) };
                    _mm512_ternarylogic_epi64::<0x96>(block, tweaks[i], keys[0])
                });
                for key in &keys[1..ROUNDS] {
                    for s in &mut state {
                        *s = if DECRYPT {
                            _mm512_aesdec_epi128(*s, *key)
                        } else {
                            _mm512_aesenc_epi128(*s, *key)
                        };
                    }
                }
                for (i, s) in state.iter().enumerate() {
                    // The last round XORs its key: XORing the tweak into that key is the tweak's second XOR.
                    let last = _mm512_xor_si512(keys[ROUNDS], tweaks[i]);
                    let out = if DECRYPT {
                        _mm512_aesdeclast_epi128(*s, last)
                    } else {
                        _mm512_aesenclast_epi128(*s, last)
                    };
                    // SAFETY: as for the loads.
                    unsafe { _mm512_storeu_si512(p.add(64 * i).cast(), out) };
                }
                for t in &mut tweaks {
                    *t = mul_alpha16(*t, poly);
                }
            }
            iv = iv.wrapping_add(iv_step);
        }
    }

    /// The tweak key applied to the plain64 IV `iv`, as a little-endian u128.
    #[target_feature(enable = "aes")]
    unsafe fn encrypt_tweak<const ROUNDS: usize>(&self, iv: u64) -> u128 {
        // SAFETY: every round key is 16 readable bytes.
        let key = |i: usize| unsafe { _mm_loadu_si128(self.tweak_enc[i].as_ptr().cast()) };
        let mut b = _mm_xor_si128(_mm_set_epi64x(0, iv as i64), key(0));
        for i in 1..ROUNDS {
            b = _mm_aesenc_si128(b, key(i));
        }
        b = _mm_aesenclast_si128(b, key(ROUNDS));
        let mut out = [0u8; 16];
        // SAFETY: `out` is 16 writable bytes.
        unsafe { _mm_storeu_si128(out.as_mut_ptr().cast(), b) };
        u128::from_le_bytes(out)
    }
}

/// Each 128-bit lane of `t` times α^16 in GF(2^128): shifted up two bytes, the two bytes shifted out reduced
/// by one carry-less multiply with x^7 + x^2 + x + 1 (`poly`'s low half of each lane).
#[inline(always)]
fn mul_alpha16(t: __m512i, poly: __m512i) -> __m512i {
    // SAFETY: only called from functions compiled with avx512f and vpclmulqdq.
    unsafe {
        let carried = _mm512_clmulepi64_epi128::<0x00>(_mm512_bsrli_epi128::<14>(t), poly);
        _mm512_xor_si512(_mm512_bslli_epi128::<2>(t), carried)
    }
}

/// Expands a 16- or 32-byte AES key into `out`; returns the number of rounds.
#[target_feature(enable = "aes")]
unsafe fn expand_key(key: &[u8], out: &mut RoundKeys) -> usize {
    // SAFETY: the caller passes 16 or 32 bytes, and each load reads 16 of them.
    let load = |at: usize| unsafe { _mm_loadu_si128(key.as_ptr().add(at).cast()) };
    let mut k = [_mm_setzero_si128(); 15];
    let rounds = if key.len() == 16 {
        k[0] = load(0);
        macro_rules! round128 {
            ($i:expr, $rcon:expr) => {
                k[$i] =
                    mix(k[$i - 1], _mm_shuffle_epi32::<0xff>(_mm_aeskeygenassist_si128::<$rcon>(k[$i - 1])));
            };
        }
        round128!(1, 0x01);
        round128!(2, 0x02);
        round128!(3, 0x04);
        round128!(4, 0x08);
        round128!(5, 0x10);
        round128!(6, 0x20);
        round128!(7, 0x40);
        round128!(8, 0x80);
        round128!(9, 0x1b);
        round128!(10, 0x36);
        10
    } else {
        k[0] = load(0);
        k[1] = load(16);
        // Even round keys take the rotated, substituted last word with a round constant; odd ones the
        // substituted last word alone.
        macro_rules! even {
            ($i:expr, $rcon:expr) => {
                k[$i] =
                    mix(k[$i - 2], _mm_shuffle_epi32::<0xff>(_mm_aeskeygenassist_si128::<$rcon>(k[$i - 1])));
            };
        }
        macro_rules! odd {
            ($i:expr) => {
                k[$i] = mix(k[$i - 2], _mm_shuffle_epi32::<0xaa>(_mm_aeskeygenassist_si128::<0>(k[$i - 1])));
            };
        }
        even!(2, 0x01);
        odd!(3);
        even!(4, 0x02);
        odd!(5);
        even!(6, 0x04);
        odd!(7);
        even!(8, 0x08);
        odd!(9);
        even!(10, 0x10);
        odd!(11);
        even!(12, 0x20);
        odd!(13);
        even!(14, 0x40);
        14
    };
    for (bytes, key) in out.iter_mut().zip(&k).take(rounds + 1) {
        // SAFETY: `bytes` is 16 writable bytes.
        unsafe { _mm_storeu_si128(bytes.as_mut_ptr().cast(), *key) };
    }
    for key in &mut k {
        // SAFETY: `key` is a valid, aligned __m128i; a volatile write is not optimized away.
        unsafe { std::ptr::write_volatile(key, _mm_setzero_si128()) };
    }
    rounds
}

/// One step of the key expansion: `prev` with each word XORed into the ones after it, then `assist`.
#[inline(always)]
fn mix(prev: __m128i, assist: __m128i) -> __m128i {
    // SAFETY: SSE2 is part of x86-64.
    unsafe {
        let mut k = prev;
        k = _mm_xor_si128(k, _mm_slli_si128::<4>(k));
        k = _mm_xor_si128(k, _mm_slli_si128::<4>(k));
        k = _mm_xor_si128(k, _mm_slli_si128::<4>(k));
        _mm_xor_si128(k, assist)
    }
}

/// The decryption schedule of the equivalent inverse cipher: the encryption keys reversed, the inner ones
/// through InvMixColumns.
#[target_feature(enable = "aes")]
unsafe fn inverse_schedule(enc: &RoundKeys, rounds: usize, out: &mut RoundKeys) {
    // SAFETY: every round key is 16 bytes.
    let load = |i: usize| unsafe { _mm_loadu_si128(enc[i].as_ptr().cast()) };
    for (i, bytes) in out.iter_mut().enumerate().take(rounds + 1) {
        let key = load(rounds - i);
        let key = if i == 0 || i == rounds { key } else { _mm_aesimc_si128(key) };
        // SAFETY: `bytes` is 16 writable bytes.
        unsafe { _mm_storeu_si128(bytes.as_mut_ptr().cast(), key) };
    }
}
