//! AES-256-XTS throughput on one core, in the units `openssl speed -evp aes-256-xts -bytes 4096` uses.
//!
//! Usage: xts_speed [SECONDS]. Prints `CALL_BYTES GB/s` lines: 4096-byte calls (one sector per call, like
//! openssl speed) and 1 MiB calls of 4096-byte sectors (how the LUKS2 payload writer calls it).

use std::time::{Duration, Instant};

use gridforge_agent::crypt::xts::{Xts, iv_for_offset};

fn measure(xts: &Xts, call_bytes: usize, seconds: f64) -> f64 {
    let mut buf: Vec<u8> = (0..call_bytes).map(|i| i as u8).collect();
    let deadline = Duration::from_secs_f64(seconds);
    let start = Instant::now();
    let mut done = 0u64;
    let mut offset = 0u64;
    while start.elapsed() < deadline {
        for _ in 0..16 {
            xts.encrypt_sectors(&mut buf, 4096, iv_for_offset(offset));
            offset += call_bytes as u64;
            done += call_bytes as u64;
        }
    }
    std::hint::black_box(&buf);
    done as f64 / start.elapsed().as_secs_f64() / 1e9
}

fn main() {
    let seconds: f64 = std::env::args().nth(1).map_or(3.0, |s| s.parse().expect("SECONDS is a number"));
    let key: Vec<u8> = (0..64u8).map(|i| i.wrapping_mul(73).wrapping_add(5)).collect();
    let xts = Xts::new(&key).expect("64-byte key");
    for call_bytes in [4096, 1 << 20] {
        println!("{call_bytes} {:.3}", measure(&xts, call_bytes, seconds));
    }
}
