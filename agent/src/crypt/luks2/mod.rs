//! LUKS2 volumes as cryptsetup 2.6 makes them: format, unlock, keyslot management and the encrypted payload,
//! all in userspace.
//!
//! Layout from the volume start (`offset` in every call): the primary header copy, the secondary copy at
//! `hdr_size`, the keyslot areas from `2 * hdr_size`, and the payload (segment 0) at the segment offset,
//! 16 MiB by default. The payload is AES-XTS with the plain64 IV counting 512-byte units from the segment start.

mod header;

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Sha256, Sha512};
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use super::xts::{self, Xts};
use super::{CryptError, af, fill_random};
use header::Metadata;

/// Default offset of the payload from the volume start, as cryptsetup uses.
pub const DEFAULT_DATA_OFFSET: u64 = 16 << 20;
/// Size of each header copy (binary header + JSON area) this module writes.
const HDR_SIZE: u64 = 16 << 10;
const STRIPES: usize = 4000;
const VOLUME_KEY_LEN: usize = 64;
const SALT_LEN: usize = 32;
const AREA_ALIGN: u64 = 4096;
/// Keyslot areas are encrypted in 512-byte sectors whatever the payload's sector size.
const KEYSLOT_SECTOR: usize = 512;
const MAX_KEYSLOTS: u32 = 32;
const DIGEST_ITERATIONS: u32 = 100_000;
const CIPHER: &str = "aes-xts-plain64";
/// Plaintext bytes encrypted and written per call to the device.
const IO_CHUNK: usize = 4 << 20;

/// How a keyslot derives its key from the passphrase.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Kdf {
    /// Argon2id v0x13: `t` passes over `m_kib` KiB with `p` lanes.
    Argon2id { t: u32, m_kib: u32, p: u32 },
    /// PBKDF2-HMAC-SHA256.
    Pbkdf2 { iterations: u32 },
}

impl Kdf {
    /// Production default: about 1–2 s here.
    pub const ARGON2ID: Kdf = Kdf::Argon2id { t: 4, m_kib: 256 << 10, p: 2 };
    /// Cheap Argon2id for tests only.
    pub const ARGON2ID_FAST: Kdf = Kdf::Argon2id { t: 4, m_kib: 32 << 10, p: 1 };
    /// PBKDF2-HMAC-SHA256 for hosts where Argon2's memory cost is unwelcome.
    pub const PBKDF2: Kdf = Kdf::Pbkdf2 { iterations: 1_000_000 };

    /// The preset called `name`: `argon2id`, `argon2id-fast` or `pbkdf2`.
    pub fn preset(name: &str) -> Option<Kdf> {
        match name {
            "argon2id" => Some(Kdf::ARGON2ID),
            "argon2id-fast" => Some(Kdf::ARGON2ID_FAST),
            "pbkdf2" => Some(Kdf::PBKDF2),
            _ => None,
        }
    }

    /// Checks the parameters against what cryptsetup accepts.
    fn validate(&self) -> Result<(), CryptError> {
        let ok = match *self {
            Kdf::Argon2id { t, m_kib, p } => {
                t >= 4 && (32..=4 << 20).contains(&m_kib) && (1..=4).contains(&p)
            }
            Kdf::Pbkdf2 { iterations } => iterations >= 1000,
        };
        if ok {
            Ok(())
        } else {
            Err(CryptError::InvalidArgument(format!(
                "KDF parameters {self:?} out of range (argon2id: t ≥ 4, 32 ≤ m_kib ≤ 4194304, 1 ≤ p ≤ 4; \
                 pbkdf2: iterations ≥ 1000)"
            )))
        }
    }
}

/// What [`format`] makes.
#[derive(Debug, Clone)]
pub struct FormatOptions {
    pub kdf: Kdf,
    /// Payload sector size: 512 or 4096.
    pub sector_size: usize,
    /// Up to 47 bytes; empty for none.
    pub label: String,
    /// Random when `None`.
    pub uuid: Option<uuid::Uuid>,
    /// Payload offset from the volume start: a multiple of 4096, room for both headers and the keyslot areas.
    pub data_offset: u64,
}

impl Default for FormatOptions {
    fn default() -> Self {
        FormatOptions {
            kdf: Kdf::ARGON2ID,
            sector_size: 4096,
            label: String::new(),
            uuid: None,
            data_offset: DEFAULT_DATA_OFFSET,
        }
    }
}

/// Decimal-string encoding of 64-bit numbers, as LUKS2 JSON stores them.
mod decimal {
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub fn serialize<S: Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&v.to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(|_| D::Error::custom(format!("{s:?} is not a decimal number")))
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct KeyslotJson {
    #[serde(rename = "type")]
    kind: String,
    key_size: usize,
    af: AfJson,
    area: AreaJson,
    kdf: KdfJson,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    priority: Option<u32>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct AfJson {
    #[serde(rename = "type")]
    kind: String,
    stripes: usize,
    hash: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct AreaJson {
    #[serde(rename = "type")]
    kind: String,
    #[serde(with = "decimal")]
    offset: u64,
    #[serde(with = "decimal")]
    size: u64,
    encryption: String,
    key_size: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type")]
enum KdfJson {
    #[serde(rename = "pbkdf2")]
    Pbkdf2 { hash: String, iterations: u32, salt: String },
    #[serde(rename = "argon2i")]
    Argon2i { time: u32, memory: u32, cpus: u32, salt: String },
    #[serde(rename = "argon2id")]
    Argon2id { time: u32, memory: u32, cpus: u32, salt: String },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct SegmentJson {
    #[serde(rename = "type")]
    kind: String,
    #[serde(with = "decimal")]
    offset: u64,
    size: String,
    #[serde(with = "decimal")]
    iv_tweak: u64,
    encryption: String,
    sector_size: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct DigestJson {
    #[serde(rename = "type")]
    kind: String,
    keyslots: Vec<String>,
    segments: Vec<String>,
    hash: String,
    iterations: u32,
    salt: String,
    digest: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct ConfigJson {
    #[serde(with = "decimal")]
    json_size: u64,
    #[serde(with = "decimal")]
    keyslots_size: u64,
    #[serde(default)]
    requirements: Option<Value>,
}

/// The parts of the JSON metadata this module understands.
#[derive(Debug)]
struct Parsed {
    keyslots: BTreeMap<u32, KeyslotJson>,
    segment: SegmentJson,
    digests: BTreeMap<u32, DigestJson>,
    config: ConfigJson,
}

fn bad(msg: impl Into<String>) -> CryptError {
    CryptError::BadMetadata(msg.into())
}

fn parse_map<T: for<'de> Deserialize<'de>>(
    json: &Value,
    section: &str,
) -> Result<BTreeMap<u32, T>, CryptError> {
    let obj =
        json.get(section).and_then(Value::as_object).ok_or_else(|| bad(format!("no {section} object")))?;
    obj.iter()
        .map(|(id, v)| {
            let n: u32 = id.parse().map_err(|_| bad(format!("{section} id {id:?}")))?;
            let parsed = T::deserialize(v).map_err(|e| bad(format!("{section} {id}: {e}")))?;
            Ok((n, parsed))
        })
        .collect()
}

fn parse(json: &Value) -> Result<Parsed, CryptError> {
    for section in ["keyslots", "tokens", "segments", "digests", "config"] {
        if !json.get(section).is_some_and(Value::is_object) {
            return Err(bad(format!("no {section} object")));
        }
    }
    let config = ConfigJson::deserialize(&json["config"]).map_err(|e| bad(format!("config: {e}")))?;
    if let Some(mandatory) = config.requirements.as_ref().and_then(|r| r.get("mandatory"))
        && mandatory.as_array().is_some_and(|a| !a.is_empty())
    {
        return Err(CryptError::Unsupported(format!("mandatory requirements {mandatory}")));
    }
    for (id, ks) in json["keyslots"].as_object().into_iter().flatten() {
        let kind = ks.get("type").and_then(Value::as_str).unwrap_or("");
        if kind != "luks2" {
            return Err(CryptError::Unsupported(format!("keyslot {id} of type {kind:?}")));
        }
    }
    let keyslots = parse_map::<KeyslotJson>(json, "keyslots")?;
    let mut segments = parse_map::<SegmentJson>(json, "segments")?;
    if segments.len() != 1 {
        return Err(CryptError::Unsupported(format!(
            "{} segments (interrupted reencryption?)",
            segments.len()
        )));
    }
    let segment = segments.pop_first().expect("one segment").1;
    if segment.kind != "crypt" || segment.encryption != CIPHER {
        return Err(CryptError::Unsupported(format!("segment {} with {}", segment.kind, segment.encryption)));
    }
    if !(512..=4096).contains(&segment.sector_size) || !segment.sector_size.is_power_of_two() {
        return Err(bad(format!("sector size {}", segment.sector_size)));
    }
    let digests = parse_map::<DigestJson>(json, "digests")?;
    Ok(Parsed { keyslots, segment, digests, config })
}

impl KdfJson {
    fn new(kdf: Kdf) -> Result<Self, CryptError> {
        let mut salt = [0u8; SALT_LEN];
        fill_random(&mut salt)?;
        let salt = BASE64.encode(salt);
        Ok(match kdf {
            Kdf::Argon2id { t, m_kib, p } => KdfJson::Argon2id { time: t, memory: m_kib, cpus: p, salt },
            Kdf::Pbkdf2 { iterations } => KdfJson::Pbkdf2 { hash: "sha256".into(), iterations, salt },
        })
    }

    fn derive(&self, passphrase: &[u8], len: usize) -> Result<Zeroizing<Vec<u8>>, CryptError> {
        let mut out = Zeroizing::new(vec![0u8; len]);
        match self {
            KdfJson::Pbkdf2 { hash, iterations, salt } => {
                pbkdf2_hash(hash, passphrase, &decode(salt, "keyslot salt")?, *iterations, &mut out)?
            }
            KdfJson::Argon2i { time, memory, cpus, salt }
            | KdfJson::Argon2id { time, memory, cpus, salt } => {
                let algorithm = match self {
                    KdfJson::Argon2i { .. } => argon2::Algorithm::Argon2i,
                    _ => argon2::Algorithm::Argon2id,
                };
                let params =
                    argon2::Params::new(*memory, *time, *cpus, Some(len)).map_err(CryptError::Argon2)?;
                argon2::Argon2::new(algorithm, argon2::Version::V0x13, params)
                    .hash_password_into(passphrase, &decode(salt, "keyslot salt")?, &mut out)
                    .map_err(CryptError::Argon2)?;
            }
        }
        Ok(out)
    }
}

fn pbkdf2_hash(
    hash: &str,
    password: &[u8],
    salt: &[u8],
    rounds: u32,
    out: &mut [u8],
) -> Result<(), CryptError> {
    match hash {
        "sha256" => pbkdf2::pbkdf2_hmac::<Sha256>(password, salt, rounds, out),
        "sha512" => pbkdf2::pbkdf2_hmac::<Sha512>(password, salt, rounds, out),
        other => return Err(CryptError::Unsupported(format!("PBKDF2 hash {other}"))),
    }
    Ok(())
}

fn decode(b64: &str, what: &str) -> Result<Vec<u8>, CryptError> {
    BASE64.decode(b64).map_err(|e| bad(format!("{what}: {e}")))
}

fn round_up(n: u64, to: u64) -> u64 {
    n.div_ceil(to) * to
}

/// Bytes of AF material for a key, padded to whole keyslot sectors.
fn material_len(key_len: usize, stripes: usize) -> usize {
    (key_len * stripes).div_ceil(KEYSLOT_SECTOR) * KEYSLOT_SECTOR
}

/// Encrypts the AF-split `volume_key` under a key derived from `passphrase` into the area at `area_offset`
/// (relative to the volume start) and returns the keyslot's metadata.
fn write_keyslot(
    dev: &File,
    offset: u64,
    area_offset: u64,
    volume_key: &[u8],
    passphrase: &[u8],
    kdf: Kdf,
) -> Result<KeyslotJson, CryptError> {
    let kdf_json = KdfJson::new(kdf)?;
    let area_key = kdf_json.derive(passphrase, VOLUME_KEY_LEN)?;
    let split_len = volume_key.len() * STRIPES;
    let mut material = Zeroizing::new(vec![0u8; material_len(volume_key.len(), STRIPES)]);
    fill_random(&mut material[..split_len])?;
    af::split(volume_key, STRIPES, &mut material[..split_len]);
    Xts::new(&area_key).map_err(CryptError::XtsKey)?.encrypt_sectors(&mut material, KEYSLOT_SECTOR, 0);
    dev.write_all_at(&material, offset + area_offset)
        .map_err(CryptError::io(format!("writing the keyslot area at {}", offset + area_offset)))?;
    Ok(KeyslotJson {
        kind: "luks2".into(),
        key_size: volume_key.len(),
        af: AfJson { kind: "luks1".into(), stripes: STRIPES, hash: "sha256".into() },
        area: AreaJson {
            kind: "raw".into(),
            offset: area_offset,
            size: round_up(material.len() as u64, AREA_ALIGN),
            encryption: CIPHER.into(),
            key_size: VOLUME_KEY_LEN,
        },
        kdf: kdf_json,
        priority: None,
    })
}

/// Recovers the volume key candidate a keyslot holds for `passphrase` (unverified).
fn read_keyslot(
    dev: &File,
    offset: u64,
    id: u32,
    ks: &KeyslotJson,
    passphrase: &[u8],
) -> Result<Zeroizing<Vec<u8>>, CryptError> {
    if ks.af.kind != "luks1" || ks.af.hash != "sha256" || ks.af.stripes == 0 {
        return Err(CryptError::Unsupported(format!("keyslot {id} AF {} {}", ks.af.kind, ks.af.hash)));
    }
    if ks.area.kind != "raw" || ks.area.encryption != CIPHER || ![32, 64].contains(&ks.area.key_size) {
        return Err(CryptError::Unsupported(format!("keyslot {id} area encryption {}", ks.area.encryption)));
    }
    let split_len = ks.key_size * ks.af.stripes;
    let len = material_len(ks.key_size, ks.af.stripes);
    if len as u64 > ks.area.size {
        return Err(bad(format!("keyslot {id} area of {} bytes holds {len}", ks.area.size)));
    }
    let area_key = ks.kdf.derive(passphrase, ks.area.key_size)?;
    let mut material = Zeroizing::new(vec![0u8; len]);
    dev.read_exact_at(&mut material, offset + ks.area.offset)
        .map_err(CryptError::io(format!("reading keyslot {id} area")))?;
    Xts::new(&area_key).map_err(CryptError::XtsKey)?.decrypt_sectors(&mut material, KEYSLOT_SECTOR, 0);
    Ok(af::merge(&material[..split_len], ks.key_size, ks.af.stripes))
}

impl DigestJson {
    fn new(volume_key: &[u8], keyslots: Vec<String>) -> Result<Self, CryptError> {
        let mut salt = [0u8; SALT_LEN];
        fill_random(&mut salt)?;
        let mut digest = [0u8; 32];
        pbkdf2::pbkdf2_hmac::<Sha256>(volume_key, &salt, DIGEST_ITERATIONS, &mut digest);
        Ok(DigestJson {
            kind: "pbkdf2".into(),
            keyslots,
            segments: vec!["0".into()],
            hash: "sha256".into(),
            iterations: DIGEST_ITERATIONS,
            salt: BASE64.encode(salt),
            digest: BASE64.encode(digest),
        })
    }

    fn matches(&self, volume_key: &[u8]) -> Result<bool, CryptError> {
        if self.kind != "pbkdf2" {
            return Err(CryptError::Unsupported(format!("digest type {}", self.kind)));
        }
        let expected = decode(&self.digest, "digest")?;
        let mut computed = Zeroizing::new(vec![0u8; expected.len()]);
        pbkdf2_hash(
            &self.hash,
            volume_key,
            &decode(&self.salt, "digest salt")?,
            self.iterations,
            &mut computed,
        )?;
        Ok(bool::from(computed.ct_eq(&expected)))
    }
}

/// A volume key that opened keyslot `keyslot` and matched digest `digest`.
struct Unlocked {
    keyslot: u32,
    digest: u32,
    volume_key: Zeroizing<Vec<u8>>,
}

/// Tries every keyslot (high priority first, priority 0 never, as cryptsetup does) and verifies the key.
fn unlock(dev: &File, offset: u64, parsed: &Parsed, passphrase: &[u8]) -> Result<Unlocked, CryptError> {
    let mut order: Vec<(&u32, &KeyslotJson)> =
        parsed.keyslots.iter().filter(|(_, ks)| ks.priority != Some(0)).collect();
    order.sort_by_key(|(id, ks)| (std::cmp::Reverse(ks.priority.unwrap_or(1)), **id));
    let mut unsupported = None;
    for (&id, ks) in order {
        let candidate = match read_keyslot(dev, offset, id, ks, passphrase) {
            Ok(key) => key,
            Err(e @ CryptError::Unsupported(_)) => {
                unsupported = Some(e);
                continue;
            }
            Err(e) => return Err(e),
        };
        let name = id.to_string();
        for (&digest_id, digest) in &parsed.digests {
            if digest.keyslots.contains(&name) && digest.matches(&candidate)? {
                return Ok(Unlocked { keyslot: id, digest: digest_id, volume_key: candidate });
            }
        }
    }
    Err(unsupported.unwrap_or(CryptError::WrongPassphrase))
}

fn read_parsed(dev: &File, offset: u64) -> Result<(Metadata, Parsed), CryptError> {
    let (meta, _) = header::read(dev, offset)?;
    let parsed = parse(&meta.json)?;
    Ok((meta, parsed))
}

/// Formats the region `offset..offset + len` of `dev` as a LUKS2 volume with one keyslot for `passphrase` and a
/// random 512-bit aes-xts-plain64 volume key. The header and keyslot areas are zeroed first; the payload is not
/// touched. Returns the volume, unlocked with its new key.
pub fn format(
    dev: &File,
    offset: u64,
    len: u64,
    passphrase: &[u8],
    opts: &FormatOptions,
) -> Result<Volume, CryptError> {
    opts.kdf.validate()?;
    let sector = opts.sector_size;
    if sector != 512 && sector != 4096 {
        return Err(CryptError::InvalidArgument(format!("sector size {sector} is neither 512 nor 4096")));
    }
    let area_size = round_up(material_len(VOLUME_KEY_LEN, STRIPES) as u64, AREA_ALIGN);
    let data_offset = opts.data_offset;
    if !data_offset.is_multiple_of(AREA_ALIGN) || data_offset < 2 * HDR_SIZE + area_size {
        return Err(CryptError::InvalidArgument(format!(
            "data offset {data_offset} is not a multiple of 4096 of at least {}",
            2 * HDR_SIZE + area_size
        )));
    }
    if len <= data_offset || !(len - data_offset).is_multiple_of(sector as u64) {
        return Err(CryptError::InvalidArgument(format!(
            "a volume of {len} bytes leaves no whole {sector}-byte sectors after the {data_offset}-byte header"
        )));
    }
    let uuid = opts.uuid.unwrap_or_else(uuid::Uuid::new_v4).hyphenated().to_string();
    let mut volume_key = Zeroizing::new(vec![0u8; VOLUME_KEY_LEN]);
    fill_random(&mut volume_key)?;

    let zeros = vec![0u8; 1 << 20];
    let mut at = 0;
    while at < data_offset {
        let n = (data_offset - at).min(zeros.len() as u64);
        dev.write_all_at(&zeros[..n as usize], offset + at)
            .map_err(CryptError::io(format!("wiping the LUKS2 metadata area at {}", offset + at)))?;
        at += n;
    }
    let keyslot = write_keyslot(dev, offset, 2 * HDR_SIZE, &volume_key, passphrase, opts.kdf)?;
    let digest = DigestJson::new(&volume_key, vec!["0".into()])?;
    let segment = SegmentJson {
        kind: "crypt".into(),
        offset: data_offset,
        size: "dynamic".into(),
        iv_tweak: 0,
        encryption: CIPHER.into(),
        sector_size: sector,
    };
    let config = ConfigJson {
        json_size: HDR_SIZE - header::BINARY_LEN as u64,
        keyslots_size: data_offset - 2 * HDR_SIZE,
        requirements: None,
    };
    let mut config_json = serde_json::to_value(&config).expect("config serializes");
    config_json.as_object_mut().expect("object").remove("requirements");
    let meta = Metadata {
        hdr_size: HDR_SIZE,
        seqid: 1,
        label: opts.label.clone(),
        subsystem: String::new(),
        uuid: uuid.clone(),
        json: json!({
            "keyslots": { "0": keyslot },
            "tokens": {},
            "segments": { "0": segment },
            "digests": { "0": digest },
            "config": config_json,
        }),
    };
    header::write(dev, offset, &meta)?;
    // The new volume comes back unlocked: the caller writes its payload without deriving the key again.
    Ok(Volume {
        uuid,
        label: opts.label.clone(),
        keyslot: 0,
        payload_offset: offset + data_offset,
        payload_len: len - data_offset,
        sector_size: sector,
        iv_tweak: 0,
        xts: Xts::new(&volume_key).map_err(CryptError::XtsKey)?,
        volume_key,
    })
}

/// An unlocked volume: reads and writes the payload, encrypting in userspace.
pub struct Volume {
    pub uuid: String,
    pub label: String,
    /// The keyslot the passphrase opened.
    pub keyslot: u32,
    /// Absolute offset of the payload in the device.
    pub payload_offset: u64,
    pub payload_len: u64,
    pub sector_size: usize,
    /// IV of the payload's first 512-byte unit.
    iv_tweak: u64,
    xts: Xts,
    volume_key: Zeroizing<Vec<u8>>,
}

impl std::fmt::Debug for Volume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Volume")
            .field("uuid", &self.uuid)
            .field("label", &self.label)
            .field("keyslot", &self.keyslot)
            .field("payload_offset", &self.payload_offset)
            .field("payload_len", &self.payload_len)
            .field("sector_size", &self.sector_size)
            .finish_non_exhaustive()
    }
}

/// Opens the volume at `offset` with `passphrase`, trying every keyslot.
pub fn open(dev: &File, offset: u64, passphrase: &[u8]) -> Result<Volume, CryptError> {
    let (meta, parsed) = read_parsed(dev, offset)?;
    let unlocked = unlock(dev, offset, &parsed, passphrase)?;
    let segment = &parsed.segment;
    let sector = segment.sector_size as u64;
    let payload_len = if segment.size == "dynamic" {
        let mut handle = dev;
        let end = handle.seek(SeekFrom::End(0)).map_err(CryptError::io("finding the device size"))?;
        let len = end
            .checked_sub(offset + segment.offset)
            .ok_or_else(|| bad("payload starts past the device end"))?;
        len / sector * sector
    } else {
        segment.size.parse().map_err(|_| bad(format!("segment size {:?}", segment.size)))?
    };
    Ok(Volume {
        uuid: meta.uuid,
        label: meta.label,
        keyslot: unlocked.keyslot,
        payload_offset: offset + segment.offset,
        payload_len,
        sector_size: segment.sector_size,
        iv_tweak: segment.iv_tweak,
        xts: Xts::new(&unlocked.volume_key).map_err(CryptError::XtsKey)?,
        volume_key: unlocked.volume_key,
    })
}

impl Volume {
    /// The volume key. Secret: for key escrow and checks only, never for logs.
    pub fn volume_key(&self) -> &[u8] {
        &self.volume_key
    }

    fn check_range(&self, len: usize, plain_offset: u64) -> Result<(), CryptError> {
        let sector = self.sector_size as u64;
        if !plain_offset.is_multiple_of(sector) || !(len as u64).is_multiple_of(sector) {
            return Err(CryptError::InvalidArgument(format!(
                "payload I/O of {len} bytes at {plain_offset} is not aligned to {sector}-byte sectors"
            )));
        }
        if plain_offset.checked_add(len as u64).is_none_or(|end| end > self.payload_len) {
            return Err(CryptError::InvalidArgument(format!(
                "payload I/O of {len} bytes at {plain_offset} passes the payload end at {}",
                self.payload_len
            )));
        }
        Ok(())
    }

    fn first_iv(&self, plain_offset: u64) -> u64 {
        self.iv_tweak + xts::iv_for_offset(plain_offset)
    }

    /// Reads and decrypts `buf.len()` bytes of plaintext at `plain_offset` (both sector-aligned).
    pub fn read_at(&self, dev: &File, buf: &mut [u8], plain_offset: u64) -> Result<(), CryptError> {
        self.check_range(buf.len(), plain_offset)?;
        dev.read_exact_at(buf, self.payload_offset + plain_offset)
            .map_err(CryptError::io(format!("reading the payload at {plain_offset}")))?;
        self.xts.decrypt_sectors(buf, self.sector_size, self.first_iv(plain_offset));
        Ok(())
    }

    /// Encrypts and writes `buf` at `plain_offset` (both sector-aligned).
    pub fn write_at(&self, dev: &File, buf: &[u8], plain_offset: u64) -> Result<(), CryptError> {
        self.check_range(buf.len(), plain_offset)?;
        let mut scratch = Zeroizing::new(vec![0u8; buf.len().min(IO_CHUNK)]);
        let mut at = plain_offset;
        for chunk in buf.chunks(IO_CHUNK) {
            let scratch = &mut scratch[..chunk.len()];
            scratch.copy_from_slice(chunk);
            self.encrypt_and_write(dev, scratch, at)?;
            at += chunk.len() as u64;
        }
        Ok(())
    }

    fn encrypt_and_write(&self, dev: &File, buf: &mut [u8], plain_offset: u64) -> Result<(), CryptError> {
        self.xts.encrypt_sectors(buf, self.sector_size, self.first_iv(plain_offset));
        dev.write_all_at(buf, self.payload_offset + plain_offset)
            .map_err(CryptError::io(format!("writing the payload at {plain_offset}")))
    }

    /// A writer that encrypts a plaintext stream to the payload from `plain_offset` (sector-aligned) on,
    /// in large aligned chunks. Call [`PayloadWriter::finish`] to write the tail.
    pub fn writer<'a>(&'a self, dev: &'a File, plain_offset: u64) -> Result<PayloadWriter<'a>, CryptError> {
        self.check_range(0, plain_offset)?;
        Ok(PayloadWriter {
            volume: self,
            dev,
            next: plain_offset,
            buf: Zeroizing::new(Vec::with_capacity(IO_CHUNK)),
        })
    }
}

/// Encrypts a plaintext stream to a volume's payload; see [`Volume::writer`].
pub struct PayloadWriter<'a> {
    volume: &'a Volume,
    dev: &'a File,
    /// Payload offset of `buf[0]`.
    next: u64,
    buf: Zeroizing<Vec<u8>>,
}

impl std::fmt::Debug for PayloadWriter<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PayloadWriter").field("next", &self.next).field("buffered", &self.buf.len()).finish()
    }
}

impl PayloadWriter<'_> {
    /// Encrypts and writes the buffered whole sectors, keeping a partial sector buffered.
    fn write_whole_sectors(&mut self) -> Result<(), CryptError> {
        let whole = self.buf.len() / self.volume.sector_size * self.volume.sector_size;
        if whole == 0 {
            return Ok(());
        }
        self.volume.check_range(whole, self.next)?;
        self.volume.encrypt_and_write(self.dev, &mut self.buf[..whole], self.next)?;
        self.next += whole as u64;
        self.buf.drain(..whole);
        Ok(())
    }

    /// Writes the rest, zero-padding a partial last sector, syncs, and returns the payload offset after it.
    pub fn finish(mut self) -> Result<u64, CryptError> {
        let padded = self.buf.len().next_multiple_of(self.volume.sector_size);
        self.buf.resize(padded, 0);
        self.write_whole_sectors()?;
        self.dev.sync_data().map_err(CryptError::io("syncing the payload"))?;
        Ok(self.next)
    }
}

impl Write for PayloadWriter<'_> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(IO_CHUNK - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == IO_CHUNK {
            self.write_whole_sectors().map_err(io::Error::other)?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.write_whole_sectors().map_err(io::Error::other)
    }
}

/// Checks `passphrase` and returns the keyslot it opens.
pub fn check_passphrase(dev: &File, offset: u64, passphrase: &[u8]) -> Result<u32, CryptError> {
    let (_, parsed) = read_parsed(dev, offset)?;
    Ok(unlock(dev, offset, &parsed, passphrase)?.keyslot)
}

/// First free 4096-aligned span of `size` bytes in the keyslot areas, relative to the volume start.
fn allocate_area(meta: &Metadata, parsed: &Parsed, size: u64) -> Result<u64, CryptError> {
    let start = 2 * meta.hdr_size;
    let end = start + parsed.config.keyslots_size;
    let mut used: Vec<(u64, u64)> =
        parsed.keyslots.values().map(|ks| (ks.area.offset, ks.area.offset + ks.area.size)).collect();
    used.sort();
    let mut candidate = start;
    for (used_start, used_end) in used {
        if candidate + size <= used_start {
            break;
        }
        candidate = candidate.max(round_up(used_end, AREA_ALIGN));
    }
    if candidate + size <= end { Ok(candidate) } else { Err(CryptError::NoFreeKeyslot) }
}

/// Adds a keyslot for `new_passphrase`, unlocking with `existing_passphrase`; returns the new keyslot.
pub fn add_key(
    dev: &File,
    offset: u64,
    existing_passphrase: &[u8],
    new_passphrase: &[u8],
    kdf: Kdf,
) -> Result<u32, CryptError> {
    kdf.validate()?;
    let (mut meta, parsed) = read_parsed(dev, offset)?;
    let unlocked = unlock(dev, offset, &parsed, existing_passphrase)?;
    let slot =
        (0..MAX_KEYSLOTS).find(|id| !parsed.keyslots.contains_key(id)).ok_or(CryptError::NoFreeKeyslot)?;
    let area_size = round_up(material_len(unlocked.volume_key.len(), STRIPES) as u64, AREA_ALIGN);
    let area_offset = allocate_area(&meta, &parsed, area_size)?;
    let keyslot = write_keyslot(dev, offset, area_offset, &unlocked.volume_key, new_passphrase, kdf)?;
    meta.json["keyslots"][slot.to_string()] = serde_json::to_value(keyslot).expect("keyslot serializes");
    let digest_slots = meta.json["digests"][unlocked.digest.to_string()]["keyslots"]
        .as_array_mut()
        .ok_or_else(|| bad("digest without keyslots"))?;
    digest_slots.push(Value::String(slot.to_string()));
    meta.seqid += 1;
    header::write(dev, offset, &meta)?;
    Ok(slot)
}

/// Removes the keyslot that `passphrase` opens and wipes its area; refuses to remove the last keyslot.
/// Returns the removed keyslot.
pub fn remove_key(dev: &File, offset: u64, passphrase: &[u8]) -> Result<u32, CryptError> {
    let (mut meta, parsed) = read_parsed(dev, offset)?;
    let unlocked = unlock(dev, offset, &parsed, passphrase)?;
    if parsed.keyslots.len() <= 1 {
        return Err(CryptError::LastKeyslot);
    }
    let name = unlocked.keyslot.to_string();
    meta.json["keyslots"].as_object_mut().expect("checked object").remove(&name);
    for section in ["digests", "tokens"] {
        for entry in meta.json[section].as_object_mut().expect("checked object").values_mut() {
            if let Some(slots) = entry.get_mut("keyslots").and_then(Value::as_array_mut) {
                slots.retain(|s| s.as_str() != Some(&name));
            }
        }
    }
    meta.seqid += 1;
    header::write(dev, offset, &meta)?;
    let area = &parsed.keyslots[&unlocked.keyslot].area;
    let zeros = vec![0u8; area.size as usize];
    dev.write_all_at(&zeros, offset + area.offset)
        .map_err(CryptError::io(format!("wiping keyslot {name} area")))?;
    dev.sync_data().map_err(CryptError::io("syncing the wiped keyslot area"))?;
    Ok(unlocked.keyslot)
}

/// The metadata of a volume, without secrets (no keys, salts or digests).
#[derive(Debug, Clone, Serialize)]
pub struct LuksDump {
    pub version: u16,
    pub uuid: String,
    pub label: String,
    pub subsystem: String,
    pub seqid: u64,
    pub header_size: u64,
    pub primary_header_valid: bool,
    pub secondary_header_valid: bool,
    pub sector_size: usize,
    pub cipher: String,
    /// Payload offset from the volume start.
    pub data_offset: u64,
    pub keyslots: Vec<KeyslotInfo>,
    pub segments: Vec<SegmentInfo>,
    pub digests: Vec<DigestInfo>,
}

#[derive(Debug, Clone, Serialize)]
pub struct KeyslotInfo {
    pub id: u32,
    pub key_size: usize,
    pub kdf: KdfInfo,
    pub area_offset: u64,
    pub area_size: u64,
    pub area_encryption: String,
    pub af_stripes: usize,
    pub af_hash: String,
    pub priority: Option<u32>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum KdfInfo {
    Pbkdf2 { hash: String, iterations: u32 },
    Argon2i { time: u32, memory_kib: u32, cpus: u32 },
    Argon2id { time: u32, memory_kib: u32, cpus: u32 },
}

#[derive(Debug, Clone, Serialize)]
pub struct SegmentInfo {
    pub id: u32,
    pub kind: String,
    pub offset: u64,
    /// Bytes, or `dynamic` (to the device end).
    pub size: String,
    pub iv_tweak: u64,
    pub encryption: String,
    pub sector_size: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct DigestInfo {
    pub id: u32,
    pub kind: String,
    pub hash: String,
    pub iterations: u32,
    pub keyslots: Vec<String>,
    pub segments: Vec<String>,
}

/// Reads the metadata of the volume at `offset`.
pub fn dump(dev: &File, offset: u64) -> Result<LuksDump, CryptError> {
    let (meta, valid) = header::read(dev, offset)?;
    let parsed = parse(&meta.json)?;
    let keyslots = parsed
        .keyslots
        .iter()
        .map(|(&id, ks)| KeyslotInfo {
            id,
            key_size: ks.key_size,
            kdf: match &ks.kdf {
                KdfJson::Pbkdf2 { hash, iterations, .. } => {
                    KdfInfo::Pbkdf2 { hash: hash.clone(), iterations: *iterations }
                }
                KdfJson::Argon2i { time, memory, cpus, .. } => {
                    KdfInfo::Argon2i { time: *time, memory_kib: *memory, cpus: *cpus }
                }
                KdfJson::Argon2id { time, memory, cpus, .. } => {
                    KdfInfo::Argon2id { time: *time, memory_kib: *memory, cpus: *cpus }
                }
            },
            area_offset: ks.area.offset,
            area_size: ks.area.size,
            area_encryption: ks.area.encryption.clone(),
            af_stripes: ks.af.stripes,
            af_hash: ks.af.hash.clone(),
            priority: ks.priority,
        })
        .collect();
    let segment_id =
        meta.json["segments"].as_object().and_then(|o| o.keys().next()?.parse().ok()).unwrap_or(0);
    let s = &parsed.segment;
    let digests = parsed
        .digests
        .iter()
        .map(|(&id, d)| DigestInfo {
            id,
            kind: d.kind.clone(),
            hash: d.hash.clone(),
            iterations: d.iterations,
            keyslots: d.keyslots.clone(),
            segments: d.segments.clone(),
        })
        .collect();
    Ok(LuksDump {
        version: 2,
        uuid: meta.uuid,
        label: meta.label,
        subsystem: meta.subsystem,
        seqid: meta.seqid,
        header_size: meta.hdr_size,
        primary_header_valid: valid.primary,
        secondary_header_valid: valid.secondary,
        sector_size: s.sector_size,
        cipher: s.encryption.clone(),
        data_offset: s.offset,
        keyslots,
        segments: vec![SegmentInfo {
            id: segment_id,
            kind: s.kind.clone(),
            offset: s.offset,
            size: s.size.clone(),
            iv_tweak: s.iv_tweak,
            encryption: s.encryption.clone(),
            sector_size: s.sector_size,
        }],
        digests,
    })
}
