//! Checks of a `Customization` that need no staging tree. Every error names the field with its index, e.g.
//! `customize.users[1].ssh_authorized_keys[0]`.

use std::collections::HashSet;
use std::net::IpAddr;

use base64::Engine;
use gridforge_proto::v1::{Customization, FileOp, NetworkInterface, User, file_op::Action};

use super::CustomizeError;

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> CustomizeError {
    CustomizeError::Invalid { field: field.into(), reason: reason.into() }
}

/// Validates everything that can be checked without the tree.
pub fn validate(c: &Customization) -> Result<(), CustomizeError> {
    if !c.hostname.is_empty() {
        check_hostname(&c.hostname).map_err(|r| invalid("customize.hostname", r))?;
    }
    if !c.timezone.is_empty() {
        check_timezone(&c.timezone).map_err(|r| invalid("customize.timezone", r))?;
    }
    for (i, iface) in c.network.iter().enumerate() {
        check_network(&format!("customize.network[{i}]"), iface)?;
    }
    let mut names = HashSet::new();
    for (i, user) in c.users.iter().enumerate() {
        let field = format!("customize.users[{i}]");
        check_user(&field, user)?;
        if !names.insert(user.name.as_str()) {
            return Err(invalid(format!("{field}.name"), format!("user {} is given twice", user.name)));
        }
    }
    for (i, key) in c.root_ssh_authorized_keys.iter().enumerate() {
        check_ssh_key(key).map_err(|r| invalid(format!("customize.root_ssh_authorized_keys[{i}]"), r))?;
    }
    for (i, op) in c.files.iter().enumerate() {
        check_file_op(&format!("customize.files[{i}]"), op)?;
    }
    for (i, pattern) in c.delete.iter().enumerate() {
        let field = format!("customize.delete[{i}]");
        check_guest_path(pattern).map_err(|r| invalid(&field, r))?;
        if pattern.trim_matches('/').is_empty() {
            return Err(invalid(field, "refusing to delete the root directory"));
        }
    }
    for (i, cmd) in c.firstboot.iter().enumerate() {
        if cmd.trim().is_empty() {
            return Err(invalid(format!("customize.firstboot[{i}]"), "empty command"));
        }
        if cmd.contains('\0') {
            return Err(invalid(format!("customize.firstboot[{i}]"), "contains a NUL byte"));
        }
    }
    check_password("customize.root_password", &c.root_password_hash, &c.root_password)?;
    Ok(())
}

/// RFC 1123 host name: dot-separated labels of 1-63 letters, digits and `-`, not starting or ending with `-`,
/// at most 253 characters in all.
pub(crate) fn check_hostname(name: &str) -> Result<(), String> {
    if name.len() > 253 {
        return Err(format!("host name is {} characters long (at most 253)", name.len()));
    }
    for label in name.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err(format!("label {label:?} must be 1 to 63 characters long"));
        }
        if !label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
            return Err(format!("label {label:?} may hold only letters, digits and '-'"));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(format!("label {label:?} must not start or end with '-'"));
        }
    }
    Ok(())
}

fn check_timezone(tz: &str) -> Result<(), String> {
    if tz.starts_with('/') {
        return Err("must be a zone name relative to /usr/share/zoneinfo, e.g. Europe/Berlin".into());
    }
    if tz.split('/').any(|p| p.is_empty() || p == "." || p == "..") {
        return Err(format!("{tz:?} is not a zone name"));
    }
    if !tz.bytes().all(|b| b.is_ascii_alphanumeric() || b"/_+-".contains(&b)) {
        return Err(format!("{tz:?} holds characters that no zone name has"));
    }
    Ok(())
}

fn check_network(field: &str, iface: &NetworkInterface) -> Result<(), CustomizeError> {
    if !iface.match_mac.is_empty() && !is_mac(&iface.match_mac) {
        return Err(invalid(format!("{field}.match_mac"), "not a MAC address like aa:bb:cc:dd:ee:ff"));
    }
    if !iface.match_name.is_empty() && !iface.match_name.bytes().all(|b| b.is_ascii_graphic() || b == b' ') {
        return Err(invalid(format!("{field}.match_name"), "must be interface names or globs, one line"));
    }
    if iface.dhcp && !iface.addresses.is_empty() {
        return Err(invalid(format!("{field}.dhcp"), "give either dhcp or static addresses, not both"));
    }
    for (j, addr) in iface.addresses.iter().enumerate() {
        check_cidr(addr).map_err(|r| invalid(format!("{field}.addresses[{j}]"), r))?;
    }
    if !iface.gateway.is_empty() && iface.gateway.parse::<IpAddr>().is_err() {
        return Err(invalid(format!("{field}.gateway"), format!("{:?} is not an IP address", iface.gateway)));
    }
    for (j, dns) in iface.dns.iter().enumerate() {
        if dns.parse::<IpAddr>().is_err() {
            return Err(invalid(format!("{field}.dns[{j}]"), format!("{dns:?} is not an IP address")));
        }
    }
    Ok(())
}

fn is_mac(s: &str) -> bool {
    let parts: Vec<&str> = s.split(':').collect();
    parts.len() == 6 && parts.iter().all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()))
}

fn check_cidr(s: &str) -> Result<(), String> {
    let (ip, prefix) =
        s.split_once('/').ok_or_else(|| format!("{s:?} needs a prefix length, e.g. 10.0.2.15/24"))?;
    let ip: IpAddr = ip.parse().map_err(|_| format!("{ip:?} is not an IP address"))?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    match prefix.parse::<u8>() {
        Ok(p) if p <= max && !prefix.starts_with('+') => Ok(()),
        _ => Err(format!("prefix length {prefix:?} must be 0 to {max}")),
    }
}

/// Debian's NAME_REGEX `^[a-z][-a-z0-9_]*$`, at most 32 characters.
fn check_user_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 32 {
        return Err("user name must be 1 to 32 characters long".into());
    }
    let mut bytes = name.bytes();
    let first_ok = bytes.next().is_some_and(|b| b.is_ascii_lowercase());
    if !first_ok || !bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_') {
        return Err(format!("{name:?} must match ^[a-z][-a-z0-9_]*$"));
    }
    Ok(())
}

/// A user or group name as found in an image (system names like `_apt` or `systemd-network` included).
pub(crate) fn check_account_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 32 || name.starts_with('-') {
        return Err(format!("{name:?} is not a user or group name"));
    }
    if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.$".contains(&b)) {
        return Err(format!("{name:?} is not a user or group name"));
    }
    Ok(())
}

fn check_user(field: &str, user: &User) -> Result<(), CustomizeError> {
    check_user_name(&user.name).map_err(|r| invalid(format!("{field}.name"), r))?;
    if user.name == "root" {
        return Err(invalid(format!("{field}.name"), "root exists already; use the root_* fields"));
    }
    for (j, group) in user.groups.iter().enumerate() {
        check_account_name(group).map_err(|r| invalid(format!("{field}.groups[{j}]"), r))?;
    }
    for (j, key) in user.ssh_authorized_keys.iter().enumerate() {
        check_ssh_key(key).map_err(|r| invalid(format!("{field}.ssh_authorized_keys[{j}]"), r))?;
    }
    check_password(&format!("{field}.password"), &user.password_hash, &user.password)?;
    if let Some(uid) = user.uid
        && (uid == 0 || uid == 65534 || uid == u32::MAX)
    {
        return Err(invalid(format!("{field}.uid"), format!("uid {uid} is reserved")));
    }
    if !user.shell.is_empty() && (!user.shell.starts_with('/') || has_passwd_breakers(&user.shell)) {
        return Err(invalid(format!("{field}.shell"), "must be an absolute path without ':' or newlines"));
    }
    if has_passwd_breakers(&user.comment) {
        return Err(invalid(format!("{field}.comment"), "must not contain ':' or newlines"));
    }
    Ok(())
}

fn has_passwd_breakers(s: &str) -> bool {
    s.contains([':', '\n', '\r', '\0'])
}

/// A hash or a plain password, not both; the hash must look like a crypt(3) hash or a lock marker.
fn check_password(field: &str, hash: &str, plain: &str) -> Result<(), CustomizeError> {
    let hash_field = format!("{field}_hash");
    if !hash.is_empty() && !plain.is_empty() {
        return Err(invalid(hash_field, "give a password hash or a password, not both"));
    }
    if !hash.is_empty() {
        check_crypt_hash(hash).map_err(|r| invalid(hash_field, r))?;
    }
    if plain.contains(['\n', '\0']) {
        return Err(invalid(field, "must not contain newlines or NUL bytes"));
    }
    Ok(())
}

const CRYPT64: &[u8] = b"./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// `$6$` (SHA-512), `$5$` (SHA-256), `$y$` (yescrypt), or `!`/`*` for a locked password (`!` may also prefix
/// a hash, which locks it).
pub(crate) fn check_crypt_hash(hash: &str) -> Result<(), String> {
    let unlocked = hash.strip_prefix('!').unwrap_or(hash);
    if unlocked.is_empty() || unlocked == "*" {
        return Ok(());
    }
    let bad = || "not a crypt hash: expected $6$…, $y$…, $5$…, or ! / * for a locked password".to_string();
    let fields: Vec<&str> = unlocked.split('$').collect();
    // "$6$salt$hash" splits into ["", "6", "salt", "hash"], with an optional "rounds=N" before the salt.
    if fields.len() < 4 || !fields[0].is_empty() {
        return Err(bad());
    }
    let crypt64 = |s: &str| !s.is_empty() && s.bytes().all(|b| CRYPT64.contains(&b));
    let digest = fields[fields.len() - 1];
    let ok = match fields[1] {
        "6" | "5" => {
            let want = if fields[1] == "6" { 86 } else { 43 };
            let salt_ok = match fields.len() {
                4 => true,
                5 => fields[2].strip_prefix("rounds=").is_some_and(|r| r.parse::<u32>().is_ok()),
                _ => false,
            };
            salt_ok && digest.len() == want && crypt64(digest) && fields[fields.len() - 2].len() <= 16
        }
        "y" => {
            fields.len() == 5
                && crypt64(fields[2])
                && crypt64(fields[3])
                && digest.len() == 43
                && crypt64(digest)
        }
        _ => false,
    };
    if ok { Ok(()) } else { Err(bad()) }
}

const SSH_KEY_TYPES: &[&str] = &[
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
];

/// An authorized_keys line: `[options] type base64 [comment]`, whose decoded blob starts with its type.
pub(crate) fn check_ssh_key(line: &str) -> Result<(), String> {
    if line.contains(['\n', '\r', '\0']) {
        return Err("one key per entry: no newlines".into());
    }
    let line = line.trim();
    if line.is_empty() {
        return Err("empty key".into());
    }
    let (first, rest) = split_options_token(line);
    let rest = if SSH_KEY_TYPES.contains(&first) { line } else { rest.trim_start() };
    let mut words = rest.split_whitespace();
    let key_type = words.next().unwrap_or_default();
    if !SSH_KEY_TYPES.contains(&key_type) {
        return Err(format!(
            "not an OpenSSH public key: type {key_type:?} is not one of {}",
            SSH_KEY_TYPES.join(", ")
        ));
    }
    let blob = words.next().ok_or("key data missing after the key type")?;
    let blob = base64::engine::general_purpose::STANDARD
        .decode(blob)
        .map_err(|_| "key data is not valid base64".to_string())?;
    let embedded = ssh_string(&blob, 0).ok_or("key data is truncated")?;
    if embedded.0 != key_type.as_bytes() {
        return Err(format!("key data is of type {:?}, not {key_type}", String::from_utf8_lossy(embedded.0)));
    }
    if key_type == "ssh-ed25519" {
        let pk = ssh_string(&blob, embedded.1).ok_or("key data is truncated")?;
        if pk.0.len() != 32 || pk.1 != blob.len() {
            return Err("ed25519 key data must hold one 32-byte public key".into());
        }
    }
    Ok(())
}

/// An SSH wire-format string at `at`: (bytes, offset after it).
fn ssh_string(blob: &[u8], at: usize) -> Option<(&[u8], usize)> {
    let len = u32::from_be_bytes(blob.get(at..at + 4)?.try_into().ok()?) as usize;
    let end = at.checked_add(4)?.checked_add(len)?;
    Some((blob.get(at + 4..end)?, end))
}

/// Splits off the first token of an authorized_keys line, where double quotes may hold spaces (options).
fn split_options_token(line: &str) -> (&str, &str) {
    let mut quoted = false;
    let mut escaped = false;
    for (i, c) in line.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' => escaped = true,
            '"' => quoted = !quoted,
            c if c.is_whitespace() && !quoted => return (&line[..i], &line[i..]),
            _ => {}
        }
    }
    (line, "")
}

/// An absolute guest path without `..`, NUL or newlines.
pub(crate) fn check_guest_path(path: &str) -> Result<(), String> {
    if !path.starts_with('/') {
        return Err(format!("{path:?} must be an absolute guest path"));
    }
    if path.split('/').any(|p| p == "..") {
        return Err(format!("{path:?} must not contain '..'"));
    }
    if path.contains(['\0', '\n']) {
        return Err("must not contain NUL bytes or newlines".into());
    }
    Ok(())
}

/// Octal mode such as "0644" or "4755", at most 07777.
pub(crate) fn parse_mode(mode: &str) -> Result<u32, String> {
    let digits = mode.strip_prefix("0o").unwrap_or(mode);
    if digits.is_empty() || digits.len() > 5 || !digits.bytes().all(|b| (b'0'..=b'7').contains(&b)) {
        return Err(format!("{mode:?} is not an octal mode like 0644"));
    }
    let value = u32::from_str_radix(digits, 8).map_err(|_| format!("{mode:?} is not an octal mode"))?;
    if value > 0o7777 {
        return Err(format!("{mode:?} is above 07777"));
    }
    Ok(value)
}

fn check_file_op(field: &str, op: &FileOp) -> Result<(), CustomizeError> {
    let action = Action::try_from(op.action)
        .map_err(|_| invalid(format!("{field}.action"), format!("unknown action {}", op.action)))?;
    check_guest_path(&op.path).map_err(|r| invalid(format!("{field}.path"), r))?;
    if op.path.trim_matches('/').is_empty() {
        return Err(invalid(format!("{field}.path"), "the root directory itself cannot be the target"));
    }
    if !op.mode.is_empty() {
        parse_mode(&op.mode).map_err(|r| invalid(format!("{field}.mode"), r))?;
    }
    if !op.owner.is_empty() {
        check_account_name(&op.owner).map_err(|r| invalid(format!("{field}.owner"), r))?;
    }
    if !op.group.is_empty() {
        check_account_name(&op.group).map_err(|r| invalid(format!("{field}.group"), r))?;
    }
    match action {
        Action::Symlink => {
            if op.target.is_empty() {
                return Err(invalid(format!("{field}.target"), "SYMLINK needs a target"));
            }
            if op.target.contains('\0') {
                return Err(invalid(format!("{field}.target"), "must not contain NUL bytes"));
            }
            if !op.mode.is_empty() {
                return Err(invalid(format!("{field}.mode"), "a symlink has no mode of its own"));
            }
        }
        Action::Chmod => {
            if op.mode.is_empty() && op.owner.is_empty() && op.group.is_empty() {
                return Err(invalid(format!("{field}.mode"), "CHMOD needs a mode, an owner or a group"));
            }
        }
        Action::AppendLine => {
            if op.content.contains('\n') {
                return Err(invalid(
                    format!("{field}.content"),
                    "APPEND_LINE takes one line, without newlines",
                ));
            }
        }
        Action::Write | Action::Mkdir => {}
    }
    if !matches!(action, Action::Write | Action::AppendLine) && !op.content.is_empty() {
        return Err(invalid(
            format!("{field}.content"),
            format!("{} takes no content", action.as_str_name()),
        ));
    }
    if action != Action::Symlink && !op.target.is_empty() {
        return Err(invalid(format!("{field}.target"), "only SYMLINK takes a target"));
    }
    Ok(())
}
