//! A CA directory as `pki init` and `pki issue` (of either program) lay it out.

use std::path::{Path, PathBuf};

use gridforge_common::client::ClientTls;
use gridforge_common::pki;

/// A CA in a directory; certificate `NAME` is `DIR/NAME.pem` + `DIR/NAME.key`. Only the layout: the test
/// suites make the files with the real command-line tools, each running them its own way.
#[derive(Clone, Debug)]
pub struct Pki {
    pub dir: PathBuf,
}

impl Pki {
    /// The CA directory `dir` (nothing is made).
    pub fn at(dir: &Path) -> Pki {
        Pki { dir: dir.to_path_buf() }
    }

    pub fn ca(&self) -> PathBuf {
        pki::ca_cert_path(&self.dir)
    }

    pub fn cert(&self, name: &str) -> PathBuf {
        pki::cert_path(&self.dir, name)
    }

    pub fn key(&self, name: &str) -> PathBuf {
        pki::key_path(&self.dir, name)
    }

    /// Client TLS as certificate `name`.
    pub fn client(&self, name: &str) -> ClientTls {
        ClientTls { ca: self.ca(), cert: self.cert(name), key: self.key(name), domain: None }
    }
}
