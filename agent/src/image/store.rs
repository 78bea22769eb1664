//! The store client: opens a directory or HTTP(S) store, checks its index signature, hands out blob streams.

use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ed25519_dalek::VerifyingKey;

use super::index::{Index, IndexEntry, check_relative_path};
use super::{ImageError, is_sha256_hex, sign};

/// Index files larger than this are refused before parsing (a real index is a few KiB).
const MAX_INDEX_BYTES: u64 = 16 << 20;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(30);
/// A stalled body read fails after this long; a slow but moving download does not.
const READ_TIMEOUT: Duration = Duration::from_secs(60);

/// How the index signature is checked.
#[derive(Clone, Debug)]
pub enum Trust {
    /// The index must carry a valid signature by this key.
    Key(VerifyingKey),
    /// No signature check (`insecure_images = true`); blob digests are still checked.
    Insecure,
}

#[derive(Debug)]
enum Backend {
    /// Canonical store directory.
    Dir(PathBuf),
    /// Base URL ending in `/`.
    Http { base: String, agent: ureq::Agent },
}

/// An opened store whose index has been verified and parsed.
#[derive(Debug)]
pub struct Store {
    location: String,
    backend: Backend,
    index: Index,
}

impl Store {
    /// Opens `location` (a path, `dir:///path`, `http://…` or `https://…`): reads `index.json` and
    /// `index.json.sig`, verifies the signature over the exact index bytes before parsing them, then parses.
    pub fn open(location: &str, trust: Trust) -> Result<Store, ImageError> {
        let backend = Backend::parse(location)?;
        let location = backend.display();
        let index_bytes =
            backend.read_small("index.json", &location)?.ok_or_else(|| backend.missing("index.json"))?;
        let sig = backend.read_small("index.json.sig", &location)?;
        match (&trust, sig) {
            (Trust::Key(key), Some(sig)) => {
                let sig = String::from_utf8(sig)
                    .map_err(|_| ImageError::BadSignature { what: format!("index of store {location}") })?;
                sign::verify_named(key, &index_bytes, &sig, &format!("index of store {location}"))?;
            }
            (Trust::Key(_), None) => return Err(ImageError::Unsigned { store: location }),
            (Trust::Insecure, _) => {
                tracing::warn!(store = %location, "index signature not checked: insecure images allowed");
            }
        }
        let index = Index::parse(&index_bytes, &location)?;
        Ok(Store { location, backend, index })
    }

    /// The store's location as opened (directory path or base URL).
    pub fn location(&self) -> &str {
        &self.location
    }

    pub fn index(&self) -> &Index {
        &self.index
    }

    /// The entry for `name` `version`; the error names this store and lists what it holds.
    pub fn find(&self, name: &str, version: &str) -> Result<&IndexEntry, ImageError> {
        self.index.find(name, version).map_err(|err| match err {
            ImageError::NotFound { name, version, available, .. } => {
                ImageError::NotFound { store: format!("store {}", self.location), name, version, available }
            }
            other => other,
        })
    }

    /// The blob's raw (still compressed) bytes as stored. The caller verifies digest and size.
    pub fn open_blob(&self, entry: &IndexEntry) -> Result<Box<dyn Read + Send>, ImageError> {
        check_relative_path(&entry.path, &self.location)?;
        if !is_sha256_hex(&entry.sha256) {
            return Err(ImageError::BadIndex {
                store: self.location.clone(),
                reason: format!("{} {} has a malformed sha256", entry.name, entry.version),
            });
        }
        match &self.backend {
            Backend::Dir(base) => {
                let path = base.join(&entry.path);
                let context = || format!("opening blob {} of store {}", path.display(), self.location);
                // A symlink inside the store must not lead outside it.
                let real =
                    path.canonicalize().map_err(|source| ImageError::Io { context: context(), source })?;
                if !real.starts_with(base) {
                    return Err(ImageError::UnsafePath {
                        store: self.location.clone(),
                        path: entry.path.clone(),
                        reason: "resolves outside the store directory",
                    });
                }
                let file =
                    File::open(&real).map_err(|source| ImageError::Io { context: context(), source })?;
                Ok(Box::new(file))
            }
            Backend::Http { base, agent } => {
                let url = format!("{base}{}", entry.path);
                match http_get(agent, &url)? {
                    Some(response) => Ok(Box::new(response.into_body().into_reader())),
                    None => Err(ImageError::HttpStatus { url, status: 404 }),
                }
            }
        }
    }

    /// A short description of a blob for messages: `blob <hex> (name version) of store <location>`.
    pub fn describe_blob(&self, entry: &IndexEntry) -> String {
        format!("blob {} ({} {}) of store {}", entry.sha256, entry.name, entry.version, self.location)
    }
}

impl Backend {
    fn parse(location: &str) -> Result<Backend, ImageError> {
        if location.starts_with("http://") || location.starts_with("https://") {
            if location.contains(['?', '#']) {
                return Err(ImageError::UnsupportedLocation { location: location.to_string() });
            }
            let mut base = location.to_string();
            if !base.ends_with('/') {
                base.push('/');
            }
            let agent = ureq::Agent::config_builder()
                .timeout_connect(Some(CONNECT_TIMEOUT))
                .timeout_recv_response(Some(RESPONSE_TIMEOUT))
                .timeout_per_read(Some(READ_TIMEOUT))
                .http_status_as_error(false)
                // Redirects could leave the store's origin; blob paths must stay under the base URL.
                .max_redirects(0)
                .build()
                .new_agent();
            return Ok(Backend::Http { base, agent });
        }
        let path = match location.strip_prefix("dir://") {
            Some(path) => path,
            None if location.contains("://") => {
                return Err(ImageError::UnsupportedLocation { location: location.to_string() });
            }
            None => location,
        };
        if path.is_empty() {
            return Err(ImageError::UnsupportedLocation { location: location.to_string() });
        }
        let dir = Path::new(path)
            .canonicalize()
            .map_err(ImageError::io(format!("opening store directory {path}")))?;
        Ok(Backend::Dir(dir))
    }

    fn display(&self) -> String {
        match self {
            Backend::Dir(dir) => dir.display().to_string(),
            Backend::Http { base, .. } => base.clone(),
        }
    }

    fn missing(&self, name: &str) -> ImageError {
        match self {
            Backend::Dir(dir) => ImageError::Io {
                context: format!("reading {}", dir.join(name).display()),
                source: io::Error::from(io::ErrorKind::NotFound),
            },
            Backend::Http { base, .. } => {
                ImageError::HttpStatus { url: format!("{base}{name}"), status: 404 }
            }
        }
    }

    /// Reads a small file at the store root; `None` if it does not exist.
    fn read_small(&self, name: &str, location: &str) -> Result<Option<Vec<u8>>, ImageError> {
        let too_large = || ImageError::BadIndex {
            store: location.to_string(),
            reason: format!("{name} is larger than {MAX_INDEX_BYTES} bytes"),
        };
        match self {
            Backend::Dir(dir) => {
                let path = dir.join(name);
                let context = || format!("reading {}", path.display());
                let file = match File::open(&path) {
                    Ok(file) => file,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
                    Err(source) => return Err(ImageError::Io { context: context(), source }),
                };
                let mut bytes = Vec::new();
                file.take(MAX_INDEX_BYTES + 1)
                    .read_to_end(&mut bytes)
                    .map_err(|source| ImageError::Io { context: context(), source })?;
                if bytes.len() as u64 > MAX_INDEX_BYTES {
                    return Err(too_large());
                }
                Ok(Some(bytes))
            }
            Backend::Http { base, agent } => {
                let url = format!("{base}{name}");
                let Some(response) = http_get(agent, &url)? else { return Ok(None) };
                let mut bytes = Vec::new();
                response
                    .into_body()
                    .into_reader()
                    .take(MAX_INDEX_BYTES + 1)
                    .read_to_end(&mut bytes)
                    .map_err(ImageError::io(format!("reading {url}")))?;
                if bytes.len() as u64 > MAX_INDEX_BYTES {
                    return Err(too_large());
                }
                Ok(Some(bytes))
            }
        }
    }
}

/// GET `url`: the response on 200, `None` on 404, an error for anything else.
fn http_get(agent: &ureq::Agent, url: &str) -> Result<Option<ureq::http::Response<ureq::Body>>, ImageError> {
    let response = agent
        .get(url)
        .call()
        .map_err(|source| ImageError::Unreachable { url: url.to_string(), source: Box::new(source) })?;
    match response.status().as_u16() {
        200 => Ok(Some(response)),
        404 => Ok(None),
        status => Err(ImageError::HttpStatus { url: url.to_string(), status }),
    }
}
