//! LUKS2 volumes checked against stock cryptsetup (no device-mapper: header, keyslot and offline operations).

mod common;
mod crypt_support;

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crypt_support::*;
use gridforge_agent::crypt::CryptError;
use gridforge_agent::crypt::luks2::{self, DEFAULT_DATA_OFFSET, Kdf};

const MIB: u64 = 1 << 20;

/// Decrypts the payload of the volume at `image` with cryptsetup alone: the payload bytes are copied to a data
/// file, a detached header holding the same volume key is made for it, and an offline `reencrypt --decrypt`
/// turns it into plaintext in place.
fn decrypt_with_cryptsetup(dir: &Path, image: &Path, key_file: &Path, sector_size: usize) -> Vec<u8> {
    let volume_key = dump_volume_key(image, key_file);
    assert_eq!(volume_key.len(), 64);
    let vk_file = dir.join("vk");
    std::fs::write(&vk_file, &volume_key).unwrap();
    let data = std::fs::read(image).unwrap()[DEFAULT_DATA_OFFSET as usize..].to_vec();
    let data_file = dir.join("payload");
    std::fs::write(&data_file, &data).unwrap();
    let header = dir.join("detached-header");
    sparse_file(&header, 16 * MIB);
    let ss = sector_size.to_string();
    let mut args = vec![
        "luksFormat",
        "--type",
        "luks2",
        "--batch-mode",
        "--header",
        s(&header),
        "--cipher",
        "aes-xts-plain64",
        "--key-size",
        "512",
        "--sector-size",
        &ss,
        "--volume-key-file",
        s(&vk_file),
        "--key-file",
        s(key_file),
    ];
    args.extend_from_slice(common::CRYPTSETUP_FAST_KDF);
    args.push(s(&data_file));
    cryptsetup(&args);
    cryptsetup(&[
        "reencrypt",
        "--decrypt",
        "--force-offline-reencrypt",
        "--batch-mode",
        "--header",
        s(&header),
        "--key-file",
        s(key_file),
        s(&data_file),
    ]);
    std::fs::read(&data_file).unwrap()
}

fn our_volume_roundtrip(kdf: Kdf, sector_size: usize) {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    let len = 40 * MIB;
    let dev = sparse_file(&image, len);
    let key = write_key(dir.path(), "key", b"correct horse battery staple");
    let wrong = write_key(dir.path(), "wrong", b"Tr0ub4dor&3");
    let opts = options(kdf, sector_size, "gf-data");
    let info = luks2::format(&dev, 0, len, b"correct horse battery staple", &opts).unwrap();
    assert_eq!(info.payload_offset, DEFAULT_DATA_OFFSET);
    assert_eq!(info.payload_len, len - DEFAULT_DATA_OFFSET);

    // Payload through write_at and through the streaming writer.
    let volume = luks2::open(&dev, 0, b"correct horse battery staple").unwrap();
    assert_eq!(volume.sector_size, sector_size);
    let first = pattern(MIB as usize, 1);
    volume.write_at(&dev, &first, 0).unwrap();
    let streamed = pattern(3 * MIB as usize + 100, 2);
    let mut writer = volume.writer(&dev, 4 * MIB).unwrap();
    for piece in streamed.chunks(777_777) {
        writer.write_all(piece).unwrap();
    }
    let end = writer.finish().unwrap();
    assert_eq!(end, 4 * MIB + (streamed.len() as u64).next_multiple_of(sector_size as u64));
    let mut back = vec![0u8; MIB as usize];
    volume.read_at(&dev, &mut back, 0).unwrap();
    assert_eq!(back, first);
    drop(dev);

    // cryptsetup reads our metadata on a copy (luksDump may repair what it reads).
    let copy_path = copy(&image, &dir.path().join("copy.img"));
    cryptsetup(&["isLuks", s(&copy_path)]);
    let dump = cryptsetup(&["luksDump", s(&copy_path)]);
    assert!(dump.contains(&info.uuid), "luksDump shows our UUID:\n{dump}");
    assert!(dump.contains("gf-data"), "luksDump shows our label:\n{dump}");
    assert!(
        dump.contains(&format!("sector: {sector_size} [bytes]")),
        "luksDump shows the sector size:\n{dump}"
    );
    assert!(dump.contains("offset: 16777216 [bytes]"), "{dump}");
    assert!(test_passphrase(&copy_path, &key), "cryptsetup accepts the passphrase");
    assert!(!test_passphrase(&copy_path, &wrong), "cryptsetup rejects a wrong passphrase");
    assert_eq!(dump_volume_key(&copy_path, &key), volume.volume_key(), "cryptsetup recovers our volume key");

    let plain = decrypt_with_cryptsetup(dir.path(), &copy_path, &key, sector_size);
    assert_eq!(plain[..MIB as usize], first[..], "cryptsetup decrypts what write_at wrote");
    let at = 4 * MIB as usize;
    assert_eq!(plain[at..at + streamed.len()], streamed[..], "cryptsetup decrypts the streamed payload");
    assert!(
        plain[at + streamed.len()..at + streamed.len() + 100].iter().all(|&b| b == 0),
        "tail zero-padded"
    );

    let dev = open_rw(&image);
    assert!(matches!(luks2::open(&dev, 0, b"Tr0ub4dor&3"), Err(CryptError::WrongPassphrase)));
}

#[test]
fn our_volume_argon2id_512_byte_sectors_works_with_cryptsetup() {
    our_volume_roundtrip(Kdf::ARGON2ID_FAST, 512);
}

#[test]
fn our_volume_pbkdf2_4096_byte_sectors_works_with_cryptsetup() {
    our_volume_roundtrip(TEST_PBKDF2, 4096);
}

#[test]
fn our_volume_on_a_4096_byte_sector_loop_device() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    let len = 24 * MIB;
    sparse_file(&image, len);
    let key = write_key(dir.path(), "key", b"loop passphrase");
    let info = {
        let lo = common::Loop::attach(&image, 4096);
        let dev = open_rw(&lo.dev);
        let info =
            luks2::format(&dev, 0, len, b"loop passphrase", &options(Kdf::ARGON2ID_FAST, 4096, "loop"))
                .unwrap();
        let volume = luks2::open(&dev, 0, b"loop passphrase").unwrap();
        assert_eq!(volume.payload_len, len - DEFAULT_DATA_OFFSET);
        volume.write_at(&dev, &pattern(8192, 3), 4096).unwrap();
        assert!(test_passphrase(&lo.dev, &key));
        let dump = cryptsetup(&["luksDump", lo.path()]);
        assert!(dump.contains(&info.uuid) && dump.contains("sector: 4096 [bytes]"), "{dump}");
        info
    };
    let plain = decrypt_with_cryptsetup(dir.path(), &image, &key, 4096);
    assert_eq!(plain[4096..4096 + 8192], pattern(8192, 3)[..]);
    assert_eq!(info.sector_size, 4096);
}

#[test]
fn cryptsetup_added_key_opens_here_and_keys_are_removed_on_both_sides() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    let len = 20 * MIB;
    let dev = sparse_file(&image, len);
    let old = write_key(dir.path(), "old", b"old passphrase");
    let new = write_key(dir.path(), "new", b"new passphrase");
    luks2::format(&dev, 0, len, b"old passphrase", &options(Kdf::ARGON2ID_FAST, 4096, "")).unwrap();
    let mut args = vec!["luksAddKey", "--batch-mode", "--key-file", s(&old)];
    args.extend_from_slice(common::CRYPTSETUP_FAST_KDF);
    args.extend_from_slice(&[s(&image), s(&new)]);
    cryptsetup(&args);
    let original = luks2::open(&dev, 0, b"old passphrase").unwrap();
    let volume = luks2::open(&dev, 0, b"new passphrase").unwrap();
    assert_eq!(volume.keyslot, 1);
    assert_eq!(volume.volume_key(), original.volume_key());

    // Ours removes the original slot; cryptsetup then refuses it and still takes the new one.
    assert_eq!(luks2::remove_key(&dev, 0, b"old passphrase").unwrap(), 0);
    assert!(!test_passphrase(&image, &old));
    assert!(test_passphrase(&image, &new));
    assert!(matches!(luks2::remove_key(&dev, 0, b"new passphrase"), Err(CryptError::LastKeyslot)));
    let dump = luks2::dump(&dev, 0).unwrap();
    assert_eq!(dump.keyslots.len(), 1);
    assert_eq!(dump.digests[0].keyslots, vec!["1".to_string()]);
}

fn cryptsetup_format(image: &Path, key: &Path, sector_size: usize) {
    let ss = sector_size.to_string();
    let mut args =
        vec!["luksFormat", "--type", "luks2", "--batch-mode", "--sector-size", &ss, "--key-file", s(key)];
    args.extend_from_slice(common::CRYPTSETUP_FAST_KDF);
    args.push(s(image));
    cryptsetup(&args);
}

#[test]
fn our_added_keys_open_a_cryptsetup_volume_and_its_pbkdf2_and_argon2i_slots_open_here() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    let dev = sparse_file(&image, 20 * MIB);
    let first = write_key(dir.path(), "first", b"first");
    let ours = write_key(dir.path(), "ours", b"ours");
    let pbkdf2_key = write_key(dir.path(), "pbkdf2", b"pbkdf2 slot");
    let argon2i_key = write_key(dir.path(), "argon2i", b"argon2i slot");
    cryptsetup_format(&image, &first, 512);

    let slot = luks2::add_key(&dev, 0, b"first", b"ours", Kdf::ARGON2ID_FAST).unwrap();
    assert_eq!(slot, 1);
    assert!(test_passphrase(&image, &ours), "cryptsetup takes the passphrase we added");
    assert!(test_passphrase(&image, &first));
    let dump = cryptsetup(&["luksDump", s(&image)]);
    assert!(dump.contains("  1: luks2"), "{dump}");

    cryptsetup(&[
        "luksAddKey",
        "--batch-mode",
        "--key-file",
        s(&first),
        "--pbkdf",
        "pbkdf2",
        "--pbkdf-force-iterations",
        "1000",
        s(&image),
        s(&pbkdf2_key),
    ]);
    cryptsetup(&[
        "luksAddKey",
        "--batch-mode",
        "--key-file",
        s(&first),
        "--pbkdf",
        "argon2i",
        "--pbkdf-memory",
        "32768",
        "--pbkdf-force-iterations",
        "4",
        "--pbkdf-parallel",
        "1",
        s(&image),
        s(&argon2i_key),
    ]);
    assert_eq!(luks2::check_passphrase(&dev, 0, b"pbkdf2 slot").unwrap(), 2);
    assert_eq!(luks2::check_passphrase(&dev, 0, b"argon2i slot").unwrap(), 3);

    // cryptsetup removes the slot we added; ours no longer opens it.
    cryptsetup(&["luksRemoveKey", "--batch-mode", "--key-file", s(&ours), s(&image)]);
    assert!(matches!(luks2::check_passphrase(&dev, 0, b"ours"), Err(CryptError::WrongPassphrase)));
    // We remove one of cryptsetup's; cryptsetup agrees.
    assert_eq!(luks2::remove_key(&dev, 0, b"pbkdf2 slot").unwrap(), 2);
    assert!(!test_passphrase(&image, &pbkdf2_key));
    assert!(test_passphrase(&image, &argon2i_key));
    let kdfs: Vec<_> = luks2::dump(&dev, 0).unwrap().keyslots.iter().map(|k| k.id).collect();
    assert_eq!(kdfs, vec![0, 3]);
}

/// cryptsetup encrypts known plaintext offline (the data moves up past a new 16 MiB header); we read it back.
fn read_cryptsetup_encrypted(sector_size: usize) {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    let plain = pattern(40 * MIB as usize, 9);
    std::fs::write(&image, &plain).unwrap();
    let key = write_key(dir.path(), "key", b"reencrypted");
    let ss = sector_size.to_string();
    let mut args = vec![
        "reencrypt",
        "--encrypt",
        "--type",
        "luks2",
        "--force-offline-reencrypt",
        "--reduce-device-size",
        "32M",
        "--sector-size",
        &ss,
        "--batch-mode",
        "--key-file",
        s(&key),
    ];
    args.extend_from_slice(common::CRYPTSETUP_FAST_KDF);
    args.push(s(&image));
    cryptsetup(&args);

    let dev = open_rw(&image);
    let volume = luks2::open(&dev, 0, b"reencrypted").unwrap();
    assert_eq!(volume.sector_size, sector_size);
    assert_eq!(volume.payload_offset, 16 * MIB);
    let kept = 8 * MIB as usize;
    let mut back = vec![0u8; kept];
    volume.read_at(&dev, &mut back, 0).unwrap();
    assert!(back == plain[..kept], "plaintext encrypted by cryptsetup reads back");
}

#[test]
fn reads_plaintext_cryptsetup_encrypted_with_512_byte_sectors() {
    read_cryptsetup_encrypted(512);
}

#[test]
fn reads_plaintext_cryptsetup_encrypted_with_4096_byte_sectors() {
    read_cryptsetup_encrypted(4096);
}

#[test]
fn damaged_primary_header_falls_back_to_the_secondary() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    let len = 20 * MIB;
    let dev = sparse_file(&image, len);
    let key = write_key(dir.path(), "key", b"pass");
    let info = luks2::format(&dev, 0, len, b"pass", &options(Kdf::ARGON2ID_FAST, 512, "two copies")).unwrap();
    // Corrupt the primary JSON area: its checksum no longer matches.
    dev.write_all_at(b"garbage", 4096 + 10).unwrap();
    let dump = luks2::dump(&dev, 0).unwrap();
    assert!(!dump.primary_header_valid && dump.secondary_header_valid);
    assert_eq!(dump.uuid, info.uuid);
    let volume = luks2::open(&dev, 0, b"pass").unwrap();
    assert_eq!(volume.label, "two copies");
    assert!(test_passphrase(&copy(&image, &dir.path().join("c1.img")), &key), "cryptsetup also falls back");

    // A wiped primary magic: found through the secondary alone; a keyslot change rewrites both copies.
    dev.write_all_at(&[0u8; 4096], 0).unwrap();
    luks2::check_passphrase(&dev, 0, b"pass").unwrap();
    luks2::add_key(&dev, 0, b"pass", b"second", Kdf::ARGON2ID_FAST).unwrap();
    let dump = luks2::dump(&dev, 0).unwrap();
    assert!(dump.primary_header_valid && dump.secondary_header_valid);
    assert_eq!(dump.seqid, 2);
    let c2 = copy(&image, &dir.path().join("c2.img"));
    cryptsetup(&["isLuks", s(&c2)]);
    assert!(test_passphrase(&c2, &write_key(dir.path(), "second", b"second")));
}

#[test]
fn dump_lists_keyslots_without_secrets_and_rejects_non_luks() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    let len = 20 * MIB;
    let dev = sparse_file(&image, len);
    assert!(matches!(luks2::dump(&dev, 0), Err(CryptError::NotLuks { offset: 0 })));
    luks2::format(&dev, 0, len, b"pass", &options(Kdf::ARGON2ID_FAST, 4096, "")).unwrap();
    let dump = luks2::dump(&dev, 0).unwrap();
    let json = serde_json::to_value(&dump).unwrap();
    assert_eq!(
        json["keyslots"][0]["kdf"],
        serde_json::json!({"type": "argon2id", "time": 4, "memory_kib": 32768, "cpus": 1})
    );
    assert_eq!(json["cipher"], "aes-xts-plain64");
    assert_eq!(json["sector_size"], 4096);
    assert!(!json.to_string().contains("salt"));
    assert!(matches!(
        luks2::format(&dev, 0, 10 * MIB, b"p", &options(Kdf::ARGON2ID_FAST, 4096, "")),
        Err(CryptError::InvalidArgument(_))
    ));
}
