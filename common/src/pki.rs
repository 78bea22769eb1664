//! A small certificate authority for a grid: one CA (`ca.pem`, `ca.key`) and certificates it signs
//! (`NAME.pem`, `NAME.key`) usable both as TLS server and client certificates, for mutual TLS between gridforge programs.
//! Keys are ECDSA P-256; private keys are written with mode 0600 and never overwritten.

use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyPair, KeyUsagePurpose, SanType,
};

/// Subject common name of a CA made by [`init`].
pub const CA_NAME: &str = "gridforge CA";
/// Validity of a new CA, in days.
pub const DEFAULT_CA_DAYS: u32 = 3650;
/// Validity of a new certificate, in days.
pub const DEFAULT_CERT_DAYS: u32 = 825;
/// Certificates start being valid this long before they are made, so that a node whose clock is a little
/// behind accepts them.
const BACKDATE: Duration = Duration::from_secs(3600);

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{path} already exists; refusing to overwrite it")]
    Exists { path: PathBuf },
    #[error("cannot {what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    BadFile { path: PathBuf, reason: String },
    #[error("invalid name {name:?}: {reason}")]
    BadName { name: String, reason: &'static str },
    #[error("--days must be at least 1")]
    BadDays,
    #[error("cannot make the certificate")]
    Generate(#[from] rcgen::Error),
}

/// The files of a certificate and its key.
#[derive(Clone, Debug)]
pub struct Issued {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub not_after: SystemTime,
}

/// What a new certificate is for: its name (the subject CN) and subject alternative names.
#[derive(Clone, Debug)]
pub struct CertRequest {
    pub name: String,
    pub dns: Vec<String>,
    pub ips: Vec<IpAddr>,
    pub days: u32,
    /// Subject organizational unit (OU), e.g. the role a coordinator grants the holder; none when absent.
    pub organizational_unit: Option<String>,
}

impl CertRequest {
    /// A request with the default names: DNS `name` and `localhost`, IP 127.0.0.1.
    pub fn new(name: &str) -> Self {
        CertRequest {
            name: name.to_string(),
            dns: Vec::new(),
            ips: Vec::new(),
            days: DEFAULT_CERT_DAYS,
            organizational_unit: None,
        }
    }

    /// The subject alternative names: the given ones, or the defaults when none is given.
    fn alt_names(&self) -> Result<Vec<SanType>, PkiError> {
        let mut sans = Vec::new();
        if self.dns.is_empty() && self.ips.is_empty() {
            sans.push(SanType::DnsName(self.name.as_str().try_into()?));
            if self.name != "localhost" {
                sans.push(SanType::DnsName("localhost".try_into()?));
            }
            sans.push(SanType::IpAddress(IpAddr::from([127, 0, 0, 1])));
        }
        for d in &self.dns {
            sans.push(SanType::DnsName(d.as_str().try_into()?));
        }
        for ip in &self.ips {
            sans.push(SanType::IpAddress(*ip));
        }
        Ok(sans)
    }
}

/// The arguments of `pki init` (the agent's and gridctl's): where the CA goes and how long it is valid.
#[derive(Clone, Debug, clap::Args)]
pub struct CaArgs {
    /// Directory for the CA (created if missing).
    #[arg(long)]
    pub dir: PathBuf,
    /// Validity in days.
    #[arg(long, default_value_t = DEFAULT_CA_DAYS)]
    pub days: u32,
}

impl CaArgs {
    /// Make the CA: [`init`].
    pub fn init(&self) -> Result<Issued, PkiError> {
        init(&self.dir, self.days)
    }
}

/// The arguments of `pki issue` (the agent's and gridctl's): the CA's directory, the certificate's name,
/// its subject alternative names and its validity. gridctl adds `--role`.
#[derive(Clone, Debug, clap::Args)]
pub struct CertArgs {
    /// Directory holding ca.pem and ca.key (made by `pki init`).
    #[arg(long)]
    pub dir: PathBuf,
    /// Certificate name: the subject CN and the file names.
    #[arg(long)]
    pub name: String,
    /// DNS subject alternative name (repeatable). Without --dns and --ip the names are NAME, localhost and
    /// 127.0.0.1.
    #[arg(long)]
    pub dns: Vec<String>,
    /// IP address subject alternative name (repeatable).
    #[arg(long)]
    pub ip: Vec<IpAddr>,
    /// Validity in days.
    #[arg(long, default_value_t = DEFAULT_CERT_DAYS)]
    pub days: u32,
}

impl CertArgs {
    /// Issue the certificate, with subject OU `organizational_unit` when given: [`issue`].
    pub fn issue(&self, organizational_unit: Option<&str>) -> Result<Issued, PkiError> {
        let req = CertRequest {
            dns: self.dns.clone(),
            ips: self.ip.clone(),
            days: self.days,
            organizational_unit: organizational_unit.map(str::to_string),
            ..CertRequest::new(&self.name)
        };
        issue(&self.dir, &req)
    }
}

/// The CA certificate in `dir`.
pub fn ca_cert_path(dir: &Path) -> PathBuf {
    dir.join("ca.pem")
}

/// The CA private key in `dir`.
pub fn ca_key_path(dir: &Path) -> PathBuf {
    dir.join("ca.key")
}

/// The certificate `name` in `dir`: `NAME.pem`.
pub fn cert_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.pem"))
}

/// The private key of certificate `name` in `dir`: `NAME.key`.
pub fn key_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.key"))
}

/// Make a new CA in `dir` (created if missing): `ca.pem` and `ca.key` (mode 0600), valid for `days`.
pub fn init(dir: &Path, days: u32) -> Result<Issued, PkiError> {
    let (cert_path, key_path) = (ca_cert_path(dir), ca_key_path(dir));
    refuse_existing(&[&cert_path, &key_path])?;
    let mut params = CertificateParams::default();
    params.distinguished_name = name(CA_NAME);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let not_after = validity(&mut params, days)?;
    let key = KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    create_dir(dir)?;
    write_new(&key_path, &key.serialize_pem(), 0o600)?;
    write_new(&cert_path, &cert.pem(), 0o644)?;
    Ok(Issued { cert: cert_path, key: key_path, not_after })
}

/// Make `NAME.pem` and `NAME.key` (mode 0600) in `dir`, signed by the CA there: subject CN = name,
/// extended key usage serverAuth and clientAuth.
pub fn issue(dir: &Path, req: &CertRequest) -> Result<Issued, PkiError> {
    check_name(&req.name)?;
    let (cert_path, key_path) = (cert_path(dir, &req.name), key_path(dir, &req.name));
    refuse_existing(&[&cert_path, &key_path])?;
    let (ca_cert, ca_key) = (ca_cert_path(dir), ca_key_path(dir));
    let ca_key_pem = read(&ca_key)?;
    let ca_key = KeyPair::from_pem(&ca_key_pem).map_err(|e| PkiError::BadFile {
        path: ca_key.clone(),
        reason: format!("not a usable CA key: {e}"),
    })?;
    let ca_pem = read(&ca_cert)?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key).map_err(|e| PkiError::BadFile {
        path: ca_cert.clone(),
        reason: format!("not a usable CA certificate: {e}"),
    })?;

    let mut params = CertificateParams::default();
    params.distinguished_name = name(&req.name);
    if let Some(ou) = &req.organizational_unit {
        params.distinguished_name.push(DnType::OrganizationalUnitName, ou.as_str());
    }
    params.subject_alt_names = req.alt_names()?;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    params.extended_key_usages =
        vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    let not_after = validity(&mut params, req.days)?;
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    write_new(&key_path, &key.serialize_pem(), 0o600)?;
    write_new(&cert_path, &cert.pem(), 0o644)?;
    Ok(Issued { cert: cert_path, key: key_path, not_after })
}

fn name(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn
}

/// A certificate name becomes a file name: keep it to one plain path component.
fn check_name(name: &str) -> Result<(), PkiError> {
    let bad = |reason| Err(PkiError::BadName { name: name.to_string(), reason });
    if name.is_empty() || name.len() > 64 {
        return bad("must be 1 to 64 characters");
    }
    if name == "ca" {
        return bad("\"ca\" is the CA's own file name");
    }
    if name.starts_with('.')
        || !name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return bad("use letters, digits, '-', '_' and '.' only, not starting with '.'");
    }
    Ok(())
}

/// Valid from a little before now for `days`; returns the end.
fn validity(params: &mut CertificateParams, days: u32) -> Result<SystemTime, PkiError> {
    if days == 0 {
        return Err(PkiError::BadDays);
    }
    let now = SystemTime::now();
    let since_epoch = now.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let epoch = rcgen::date_time_ymd(1970, 1, 1);
    let lifetime = Duration::from_secs(u64::from(days) * 86_400);
    params.not_before = epoch + since_epoch.saturating_sub(BACKDATE);
    params.not_after = epoch + since_epoch + lifetime;
    Ok(now + lifetime)
}

fn refuse_existing(paths: &[&Path]) -> Result<(), PkiError> {
    for p in paths {
        if p.exists() {
            return Err(PkiError::Exists { path: p.to_path_buf() });
        }
    }
    Ok(())
}

fn create_dir(dir: &Path) -> Result<(), PkiError> {
    std::fs::create_dir_all(dir).map_err(|source| PkiError::Io {
        what: "create the directory",
        path: dir.to_path_buf(),
        source,
    })
}

fn read(path: &Path) -> Result<String, PkiError> {
    std::fs::read_to_string(path).map_err(|source| PkiError::Io {
        what: "read",
        path: path.to_path_buf(),
        source,
    })
}

/// Write a file that must not exist yet, with `mode` from the start (a key is never readable by others).
fn write_new(path: &Path, text: &str, mode: u32) -> Result<(), PkiError> {
    let io = |source| PkiError::Io { what: "write", path: path.to_path_buf(), source };
    let mut file =
        std::fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(path).map_err(|source| {
            match source.kind() {
                std::io::ErrorKind::AlreadyExists => PkiError::Exists { path: path.to_path_buf() },
                _ => io(source),
            }
        })?;
    file.write_all(text.as_bytes()).and_then(|()| file.sync_all()).map_err(io)
}
