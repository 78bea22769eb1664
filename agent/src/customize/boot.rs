//! The boot files of a guest: systemd-boot, its loader entry, and the kernel and initrd, gathered into a host
//! directory that the caller copies into the FAT32 ESP.

use std::cmp::Ordering;
use std::fs;
use std::path::{Path, PathBuf};

use super::CustomizeError;
use super::path::{Guest, io_context};

/// Where Debian's `systemd-boot-efi` package puts the binary, in the image and on the host.
pub const SYSTEMD_BOOT_EFI: &str = "/usr/lib/systemd/boot/efi/systemd-bootx64.efi";

/// The loader entry written to the ESP; paths are relative to the ESP root.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootEntry {
    /// e.g. `/vmlinuz-6.1.0-50-cloud-amd64`
    pub kernel: String,
    /// e.g. `/initrd.img-6.1.0-50-cloud-amd64`
    pub initrd: String,
    /// The kernel command line.
    pub options: String,
}

/// Fills `esp_dir` with `EFI/BOOT/BOOTX64.EFI` (systemd-boot), `loader/loader.conf`,
/// `loader/entries/gridforge.conf`, and the newest kernel of the tree's /boot with its initrd.
///
/// systemd-boot comes from the tree if it has it, else from `efi_binary`, else from the host's
/// systemd-boot-efi package.
pub fn install_boot(
    root: &Path,
    esp_dir: &Path,
    root_fs_uuid: &str,
    kernel_args: &str,
    efi_binary: Option<&Path>,
) -> Result<BootEntry, CustomizeError> {
    let invalid = |field: &str, reason: String| CustomizeError::Invalid { field: field.into(), reason };
    let uuid = uuid::Uuid::parse_str(root_fs_uuid)
        .map_err(|_| invalid("root_fs_uuid", format!("{root_fs_uuid:?} is not a UUID")))?;
    if kernel_args.chars().any(char::is_control) {
        return Err(invalid("kernel_args", "must be one line without control characters".into()));
    }
    let guest = Guest::new(root);
    let version = newest_kernel(&guest)?;
    let kernel_name = format!("vmlinuz-{version}");
    let initrd_name = format!("initrd.img-{version}");
    let efi = find_efi_binary(&guest, efi_binary)?;

    let title = os_title(&guest)?;
    let mut options = format!("root=UUID={} ro console=ttyS0", uuid.hyphenated());
    if !kernel_args.trim().is_empty() {
        options.push(' ');
        options.push_str(kernel_args.trim());
    }
    let entry = BootEntry { kernel: format!("/{kernel_name}"), initrd: format!("/{initrd_name}"), options };

    let mkdir = |p: PathBuf| fs::create_dir_all(&p).map_err(io_context(format!("creating {}", p.display())));
    mkdir(esp_dir.join("EFI/BOOT"))?;
    mkdir(esp_dir.join("loader/entries"))?;
    let copy = |from: &Path, to: PathBuf| {
        fs::copy(from, &to).map(drop).map_err(io_context(format!(
            "copying {} to {}",
            from.display(),
            to.display()
        )))
    };
    copy(&efi, esp_dir.join("EFI/BOOT/BOOTX64.EFI"))?;
    copy(&guest.path(&format!("/boot/{kernel_name}"))?, esp_dir.join(&kernel_name))?;
    copy(&guest.path(&format!("/boot/{initrd_name}"))?, esp_dir.join(&initrd_name))?;
    let write = |to: PathBuf, text: String| {
        fs::write(&to, text).map_err(io_context(format!("writing {}", to.display())))
    };
    write(esp_dir.join("loader/loader.conf"), "default gridforge.conf\ntimeout 0\n".into())?;
    write(
        esp_dir.join("loader/entries/gridforge.conf"),
        format!(
            "title {title}\nlinux {}\ninitrd {}\noptions {}\n",
            entry.kernel, entry.initrd, entry.options
        ),
    )?;
    Ok(entry)
}

/// The newest kernel version in /boot that has a matching initrd.
fn newest_kernel(guest: &Guest<'_>) -> Result<String, CustomizeError> {
    let names = guest.list_dir("/boot")?;
    let mut versions: Vec<&str> = Vec::new();
    for name in &names {
        if let Some(v) = name.strip_prefix("vmlinuz-")
            && guest.is_file(&format!("/boot/{name}"))?
            && guest.is_file(&format!("/boot/initrd.img-{v}"))?
        {
            versions.push(v);
        }
    }
    versions.sort_by(|a, b| compare_versions(a, b));
    versions.last().map(|v| v.to_string()).ok_or(CustomizeError::NoKernel)
}

/// Natural order: digit runs compare as numbers, so 6.10 is newer than 6.9.
fn compare_versions(a: &str, b: &str) -> Ordering {
    fn chunks(s: &str) -> Vec<(bool, &str)> {
        let mut out = Vec::new();
        let mut start = 0;
        let bytes = s.as_bytes();
        for i in 1..=bytes.len() {
            if i == bytes.len() || bytes[i].is_ascii_digit() != bytes[start].is_ascii_digit() {
                out.push((bytes[start].is_ascii_digit(), &s[start..i]));
                start = i;
            }
        }
        out
    }
    let (ca, cb) = (chunks(a), chunks(b));
    for (x, y) in ca.iter().zip(cb.iter()) {
        let ord = match (x, y) {
            ((true, x), (true, y)) => {
                let (x, y) = (x.trim_start_matches('0'), y.trim_start_matches('0'));
                x.len().cmp(&y.len()).then_with(|| x.cmp(y))
            }
            ((_, x), (_, y)) => x.cmp(y),
        };
        if ord != Ordering::Equal {
            return ord;
        }
    }
    ca.len().cmp(&cb.len())
}

fn find_efi_binary(guest: &Guest<'_>, given: Option<&Path>) -> Result<PathBuf, CustomizeError> {
    if guest.is_file(SYSTEMD_BOOT_EFI)? {
        return guest.path(SYSTEMD_BOOT_EFI);
    }
    if let Some(p) = given {
        if p.is_file() {
            return Ok(p.to_path_buf());
        }
        return Err(CustomizeError::NoEfiBinary { searched: p.display().to_string() });
    }
    let host = Path::new(SYSTEMD_BOOT_EFI);
    if host.is_file() {
        return Ok(host.to_path_buf());
    }
    Err(CustomizeError::NoEfiBinary { searched: format!("{SYSTEMD_BOOT_EFI} in the image and on this host") })
}

/// PRETTY_NAME from the tree's os-release, for the boot menu title.
fn os_title(guest: &Guest<'_>) -> Result<String, CustomizeError> {
    for path in ["/etc/os-release", "/usr/lib/os-release"] {
        if let Some(text) = guest.read_string(path)? {
            for line in text.lines() {
                if let Some(v) = line.strip_prefix("PRETTY_NAME=") {
                    let v = v.trim().trim_matches('"').trim_matches('\'');
                    if !v.is_empty() && !v.chars().any(char::is_control) {
                        return Ok(v.to_string());
                    }
                }
            }
        }
    }
    Ok("gridforge guest".into())
}

#[cfg(test)]
mod tests {
    use super::compare_versions;
    use std::cmp::Ordering;

    #[test]
    fn kernel_versions_compare_naturally() {
        assert_eq!(compare_versions("6.10.0-1-amd64", "6.9.0-3-amd64"), Ordering::Greater);
        assert_eq!(compare_versions("6.1.0-50-cloud-amd64", "6.1.0-9-cloud-amd64"), Ordering::Greater);
        assert_eq!(compare_versions("6.1.0", "6.1.0"), Ordering::Equal);
    }
}
