//! Validation of a `VmSpec` before anything touches a disk. Every error names the offending field.

use gridforge_proto::v1::{Filesystem, ProvisionMode, VmSpec, partition::Role};

#[derive(Debug, thiserror::Error)]
#[error("invalid spec: {field}: {reason}")]
pub struct SpecError {
    pub field: String,
    pub reason: String,
}

fn err(field: impl Into<String>, reason: impl Into<String>) -> SpecError {
    SpecError { field: field.into(), reason: reason.into() }
}

/// Check everything that can be checked without the image or the disk.
pub fn validate(spec: &VmSpec) -> Result<(), SpecError> {
    if spec.name.is_empty() {
        return Err(err("name", "must not be empty"));
    }
    let image = spec.image.as_ref().ok_or_else(|| err("image", "is required"))?;
    if image.name.is_empty() {
        return Err(err("image.name", "must not be empty"));
    }
    if image.version.is_empty() {
        return Err(err("image.version", "must not be empty"));
    }
    if ProvisionMode::try_from(spec.provision_mode).is_err() {
        return Err(err("provision_mode", format!("unknown value {}", spec.provision_mode)));
    }
    let disk = spec.disk.as_ref().ok_or_else(|| err("disk", "is required"))?;
    if !matches!(disk.sector_size, 0 | 512 | 4096) {
        return Err(err("disk.sector_size", format!("{} is not 512 or 4096", disk.sector_size)));
    }
    for (i, p) in disk.partitions.iter().enumerate() {
        let field = |name: &str| format!("disk.partitions[{i}].{name}");
        let role =
            Role::try_from(p.role).map_err(|_| err(field("role"), format!("unknown value {}", p.role)))?;
        let fs = Filesystem::try_from(p.filesystem)
            .map_err(|_| err(field("filesystem"), format!("unknown value {}", p.filesystem)))?;
        if role == Role::Unspecified {
            return Err(err(field("role"), "is required (ESP, ROOT, SWAP or DATA)"));
        }
        if fs == Filesystem::Unspecified {
            return Err(err(field("filesystem"), "is required (VFAT, EXT4, SWAP or NONE)"));
        }
        let allowed: &[Filesystem] = match role {
            Role::Esp => &[Filesystem::Vfat],
            Role::Root => &[Filesystem::Ext4],
            Role::Swap => &[Filesystem::Swap],
            Role::Data => &[Filesystem::Ext4, Filesystem::Vfat, Filesystem::None],
            Role::Unspecified => unreachable!("checked above"),
        };
        if !allowed.contains(&fs) {
            return Err(err(
                field("filesystem"),
                format!("{} is not valid for a {} partition", fs.as_str_name(), role.as_str_name()),
            ));
        }
        if p.size_mib == Some(0) {
            return Err(err(
                field("size_mib"),
                "must be greater than 0 (leave it out for the rest of the disk)",
            ));
        }
        if !p.mount_point.is_empty()
            && (!p.mount_point.starts_with('/') || p.mount_point.split('/').any(|c| c == ".." || c == "."))
        {
            return Err(err(
                field("mount_point"),
                format!("{:?} is not an absolute path without . or ..", p.mount_point),
            ));
        }
        if let Some(enc) = &p.encryption {
            if matches!(role, Role::Root | Role::Esp) {
                return Err(err(
                    field("encryption"),
                    format!(
                        "a {} partition cannot be encrypted: the guest's firmware or initramfs would have to unlock it",
                        role.as_str_name()
                    ),
                ));
            }
            if enc.passphrase.is_empty() == enc.passphrase_file.is_empty() {
                return Err(err(field("encryption"), "give exactly one of passphrase_file and passphrase"));
            }
            if !enc.kdf.is_empty() && crate::crypt::luks2::Kdf::preset(&enc.kdf).is_none() {
                return Err(err(
                    field("encryption.kdf"),
                    format!("{:?} is not argon2id, argon2id-fast or pbkdf2", enc.kdf),
                ));
            }
            if !matches!(enc.sector_size, 0 | 512 | 4096) {
                return Err(err(
                    field("encryption.sector_size"),
                    format!("{} is not 512 or 4096", enc.sector_size),
                ));
            }
        }
        if p.label.is_empty() {
            return Err(err(field("label"), "must not be empty"));
        }
    }
    if spec.kernel_args.contains(['\n', '\r']) {
        return Err(err("kernel_args", "must be one line"));
    }
    let roots = disk.partitions.iter().filter(|p| p.role() == Role::Root).count();
    if !disk.partitions.is_empty() && roots != 1 {
        return Err(err("disk.partitions", format!("need exactly one ROOT partition, found {roots}")));
    }
    if disk.partitions.iter().filter(|p| p.role() == Role::Esp).count() > 1 {
        return Err(err("disk.partitions", "more than one ESP partition"));
    }
    Ok(())
}
