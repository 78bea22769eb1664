//! The wipe certificate: what was wiped, how, how it was verified, by whom and when, signed with ed25519.
//!
//! # Canonical form
//! The signature covers `serde_json::to_vec(&report)` with `signature` set to `None` (the field is then left
//! out): compact JSON, no whitespace, fields in the order the structs below declare them, strings escaped as
//! serde_json escapes them, integers only (no floats, so every value round-trips exactly). A verifier parses
//! the report text (unknown fields are rejected), takes the signature out, re-serializes the same way and
//! checks the signature over those bytes. The file on disk may therefore be pretty-printed; any change to a
//! value, an added field or a removed one makes verification fail.

use std::time::SystemTime;

use ed25519_dalek::{SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};

use crate::image::sign as keys;

/// The certificate format, recorded in every report.
pub const FORMAT: &str = "gridforge-wipe-report/1";
pub const SIGNATURE_ALGORITHM: &str = "ed25519";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WipeReport {
    pub format: String,
    pub report_id: String,
    pub device: DeviceRecord,
    pub sanitization: SanitizationRecord,
    pub verification: VerificationRecord,
    pub tool: ToolRecord,
    /// RFC 3339, UTC.
    pub started: String,
    /// RFC 3339, UTC.
    pub finished: String,
    pub duration_ms: u64,
    /// Bytes written by all passes (a device-side zeroing counts as the bytes it covered).
    pub bytes_written: u64,
    pub errors: Vec<String>,
    pub node: NodeRecord,
    pub operator: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<SignatureRecord>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceRecord {
    pub path: String,
    /// `file` or `block-device`.
    pub kind: String,
    /// From sysfs; `unknown` for files and devices that do not report one (loop devices).
    pub model: String,
    pub serial: String,
    pub size_bytes: u64,
    pub logical_sector_size: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SanitizationRecord {
    /// NIST SP 800-88 Rev. 2 level: `clear` or `purge`.
    pub nist_level: String,
    pub standard: String,
    /// Conditions the level depends on (crypto-erase counts as Purge only if the data was always encrypted).
    pub level_conditions: Option<String>,
    /// The method as requested: `zero`, `random`, `passes:random,zero`, `crypto-erase`, ...
    pub method: String,
    pub passes: Vec<PassRecord>,
    /// The pseudorandom generator, where a pass used one.
    pub prng: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PassRecord {
    pub number: u32,
    pub method: String,
    pub pattern: String,
    /// How the bytes were produced: `O_DIRECT overwrite`, `BLKZEROOUT`, `fallocate(FALLOC_FL_ZERO_RANGE)`, ...
    pub mechanism: String,
    pub range_start: u64,
    pub range_end: u64,
    /// Where a resumed pass restarted; bytes before it were written by an earlier, interrupted run (with
    /// another key, for a random pass).
    pub resumed_from: Option<u64>,
    pub bytes_written: u64,
    pub notes: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerificationRecord {
    /// `full`, `sample` or `none`.
    pub method: String,
    /// `passed`, `failed` or `not-performed`.
    pub result: String,
    /// Seed of the sample selection (a ChaCha8 stream choosing 1 MiB blocks), so it can be repeated.
    pub sample_seed: Option<u64>,
    pub sample_block_bytes: Option<u64>,
    pub blocks_checked: u64,
    pub bytes_checked: u64,
    /// Ranges `[start, end)` whose content cannot be checked: written by an earlier, interrupted run with a
    /// key that was never stored. Empty unless a random pass was resumed.
    pub unverified_ranges: Vec<[u64; 2]>,
    pub mismatch_offset: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToolRecord {
    pub name: String,
    pub version: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeRecord {
    pub hostname: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignatureRecord {
    pub algorithm: String,
    /// Standard base64 of the 32-byte public key.
    pub public_key: String,
    /// Standard base64 of the 64-byte signature over the canonical form.
    pub signature: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("report is not a valid wipe report")]
    Parse(#[source] serde_json::Error),
    #[error("report is not signed")]
    Unsigned,
    #[error("report signature algorithm {0:?} is not ed25519")]
    Algorithm(String),
    #[error("report is signed by {signer}, not by the trusted key {trusted}")]
    OtherSigner { signer: String, trusted: String },
    #[error("report signature does not verify: the report was altered or the signature is forged")]
    BadSignature,
}

impl WipeReport {
    /// The bytes the signature covers: see the module documentation.
    pub fn canonical_bytes(&self) -> Vec<u8> {
        let unsigned = WipeReport { signature: None, ..self.clone() };
        serde_json::to_vec(&unsigned).expect("report serializes")
    }

    /// Pretty JSON for the report file.
    pub fn to_pretty_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("report serializes")
    }
}

/// Sign `report` with `key`, replacing any earlier signature.
pub fn sign(report: &mut WipeReport, key: &SigningKey) {
    let bytes = report.canonical_bytes();
    report.signature = Some(SignatureRecord {
        algorithm: SIGNATURE_ALGORITHM.to_string(),
        public_key: keys::encode_public(&key.verifying_key()),
        signature: keys::sign(key, &bytes),
    });
}

/// Parse a report and check it is signed by `trusted` and unchanged since.
pub fn verify(text: &str, trusted: &VerifyingKey) -> Result<WipeReport, ReportError> {
    let report: WipeReport = serde_json::from_str(text).map_err(ReportError::Parse)?;
    let sig = report.signature.as_ref().ok_or(ReportError::Unsigned)?;
    if sig.algorithm != SIGNATURE_ALGORITHM {
        return Err(ReportError::Algorithm(sig.algorithm.clone()));
    }
    let trusted_text = keys::encode_public(trusted);
    if sig.public_key != trusted_text {
        return Err(ReportError::OtherSigner { signer: sig.public_key.clone(), trusted: trusted_text });
    }
    keys::verify(trusted, &report.canonical_bytes(), &sig.signature)
        .map_err(|_| ReportError::BadSignature)?;
    Ok(report)
}

/// RFC 3339 UTC with second precision: `2025-01-31T12:00:00Z`.
pub fn rfc3339(time: SystemTime) -> String {
    let secs = time.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = civil_from_days(days as i64);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian calendar (H. Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn rfc3339_known_dates() {
        let at = |s| rfc3339(SystemTime::UNIX_EPOCH + Duration::from_secs(s));
        assert_eq!(at(0), "1970-01-01T00:00:00Z");
        assert_eq!(at(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(at(1_735_689_599), "2024-12-31T23:59:59Z");
    }
}
