//! AES-XTS against the IEEE 1619 vectors and against OpenSSL's XTS.

use std::io::Write;
use std::process::{Command, Stdio};

use gridforge_agent::crypt::xts::{IV_UNIT, Xts, iv_for_offset};

fn unhex(s: &str) -> Vec<u8> {
    hex::decode(s).unwrap()
}

/// 0x00..0xff twice: the plaintext of IEEE 1619 vectors 4–10.
fn counter_sector() -> Vec<u8> {
    (0..512).map(|i| i as u8).collect()
}

#[test]
fn ieee1619_vector_10_xts_aes_256() {
    let key = unhex(concat!(
        "2718281828459045235360287471352662497757247093699959574966967627",
        "3141592653589793238462643383279502884197169399375105820974944592"
    ));
    // The first 256 bytes of the vector's ciphertext (blocks are independent without ciphertext stealing).
    let expected = unhex(concat!(
        "1c3b3a102f770386e4836c99e370cf9bea00803f5e482357a4ae12d414a3e63b",
        "5d31e276f8fe4a8d66b317f9ac683f44680a86ac35adfc3345befecb4bb188fd",
        "5776926c49a3095eb108fd1098baec70aaa66999a72a82f27d848b21d4a741b0",
        "c5cd4d5fff9dac89aeba122961d03a757123e9870f8acf1000020887891429ca",
        "2a3e7a7d7df7b10355165c8b9a6d0a7de8b062c4500dc4cd120c0f7418dae3d0",
        "b5781c34803fa75421c790dfe1de1834f280d7667b327f6c8cd7557e12ac3a0f",
        "93ec05c52e0493ef31a12d3d9260f79a289d6a379bc70c50841473d1a8cc81ec",
        "583e9645e07b8d9670655ba5bbcfecc6dc3966380ad8fecb17b6ba02469a020a",
    ));
    let xts = Xts::new(&key).unwrap();
    let mut sector = counter_sector();
    xts.encrypt_sectors(&mut sector, 512, 0xff);
    assert_eq!(sector[..256], expected[..]);
    xts.decrypt_sectors(&mut sector, 512, 0xff);
    assert_eq!(sector, counter_sector());
}

#[test]
fn ieee1619_vector_4_xts_aes_128() {
    let key = unhex("2718281828459045235360287471352631415926535897932384626433832795");
    let xts = Xts::new(&key).unwrap();
    let mut sector = counter_sector();
    xts.encrypt_sectors(&mut sector, 512, 0);
    assert_eq!(sector[..32], unhex("27a7479befa1d476489f308cd4cfa6e2a96e4bbe3208ff25287dd3819616e89c")[..]);
}

/// One data unit through OpenSSL's EVP AES-XTS (via Python's `cryptography`; `openssl enc` refuses XTS), the
/// 16-byte tweak being the little-endian IV.
fn openssl_xts(cipher: &str, key: &[u8], iv: u64, data: &[u8]) -> Vec<u8> {
    let mut tweak = [0u8; 16];
    tweak[..8].copy_from_slice(&iv.to_le_bytes());
    let script = "import sys
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
key, tweak = bytes.fromhex(sys.argv[1]), bytes.fromhex(sys.argv[2])
enc = Cipher(algorithms.AES(key), modes.XTS(tweak)).encryptor()
sys.stdout.buffer.write(enc.update(sys.stdin.buffer.read()) + enc.finalize())
";
    let mut child = Command::new("/usr/bin/python3")
        .args(["-c", script, &hex::encode(key), &hex::encode(tweak)])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect(
            "python3 with the cryptography package (Debian python3-cryptography) is required for this test",
        );
    child.stdin.take().unwrap().write_all(data).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "OpenSSL {cipher} through python3-cryptography failed");
    out.stdout
}

#[test]
fn matches_openssl_for_4096_byte_sectors_with_iv_in_512_byte_units() {
    for (cipher, key_len) in [("-aes-256-xts", 64), ("-aes-128-xts", 32)] {
        let key: Vec<u8> = (0..key_len).map(|i| (i * 37 + 11) as u8).collect();
        let plain: Vec<u8> = (0..4096 * 3).map(|i| (i * 31 % 257) as u8).collect();
        let start = 5 * 4096u64;
        let mut buf = plain.clone();
        let xts = Xts::new(&key).unwrap();
        xts.encrypt_sectors(&mut buf, 4096, iv_for_offset(start));
        for (i, sector) in plain.chunks(4096).enumerate() {
            // dm-crypt plain64 with 4096-byte sectors: the IV still counts 512-byte units.
            let iv = (start + i as u64 * 4096) / IV_UNIT as u64;
            let expected = openssl_xts(cipher, &key, iv, sector);
            assert_eq!(buf[i * 4096..(i + 1) * 4096], expected[..], "{cipher} sector {i}");
        }
        xts.decrypt_sectors(&mut buf, 4096, iv_for_offset(start));
        assert_eq!(buf, plain);
    }
}

#[test]
fn matches_openssl_for_many_512_byte_sectors() {
    let key: Vec<u8> = (0..64).map(|i| (255 - i) as u8).collect();
    let plain: Vec<u8> = (0..512 * 40).map(|i| (i * 7 % 253) as u8).collect();
    let mut buf = plain.clone();
    Xts::new(&key).unwrap().encrypt_sectors(&mut buf, 512, 1 << 40);
    for i in [0usize, 1, 31, 32, 39] {
        let expected =
            openssl_xts("-aes-256-xts", &key, (1 << 40) + i as u64, &plain[i * 512..(i + 1) * 512]);
        assert_eq!(buf[i * 512..(i + 1) * 512], expected[..], "sector {i}");
    }
}
