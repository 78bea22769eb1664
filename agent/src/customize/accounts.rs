//! The guest's account databases (/etc/passwd, shadow, group, gshadow), edited as text like `useradd` would,
//! and password hashing (SHA-512 crypt).

use std::time::{SystemTime, UNIX_EPOCH};

use gridforge_proto::v1::User;
use rand::RngExt;
use sha_crypt::{PasswordHasher, ShaCrypt};

use super::CustomizeError;
use super::path::{Guest, Perm};

/// One colon-separated database: its lines kept verbatim except the ones edited.
#[derive(Debug)]
struct Table {
    guest_path: &'static str,
    lines: Vec<String>,
    present: bool,
    changed: bool,
}

impl Table {
    fn load(guest: &Guest<'_>, guest_path: &'static str) -> Result<Self, CustomizeError> {
        let text = guest.read_string(guest_path)?;
        Ok(Self {
            guest_path,
            present: text.is_some(),
            lines: text.unwrap_or_default().lines().map(str::to_string).collect(),
            changed: false,
        })
    }

    fn find(&self, name: &str) -> Option<usize> {
        self.lines.iter().position(|l| l.split(':').next() == Some(name))
    }

    fn fields(&self, idx: usize) -> Vec<String> {
        self.lines[idx].split(':').map(str::to_string).collect()
    }

    fn set(&mut self, idx: usize, fields: &[String]) {
        self.lines[idx] = fields.join(":");
        self.changed = true;
    }

    fn push(&mut self, line: String) {
        self.lines.push(line);
        self.changed = true;
    }

    /// Numeric ids in field 3 (uid or gid).
    fn ids(&self) -> impl Iterator<Item = u32> + '_ {
        self.lines.iter().filter_map(|l| l.split(':').nth(2)?.parse().ok())
    }

    fn save(&self, guest: &Guest<'_>, new_perm: Perm) -> Result<(), CustomizeError> {
        if !self.changed {
            return Ok(());
        }
        let mut text = self.lines.join("\n");
        text.push('\n');
        guest.rewrite_file(self.guest_path, text.as_bytes(), new_perm)
    }
}

/// The four databases of one tree.
#[derive(Debug)]
pub(crate) struct Accounts {
    passwd: Table,
    shadow: Table,
    group: Table,
    gshadow: Table,
}

/// A passwd entry's ids and home.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Account {
    pub uid: u32,
    pub gid: u32,
    pub home: String,
}

const FIRST_UID: u32 = 1000;
const LAST_UID: u32 = 59999;

impl Accounts {
    pub fn load(guest: &Guest<'_>) -> Result<Self, CustomizeError> {
        let passwd = Table::load(guest, "/etc/passwd")?;
        if !passwd.present {
            return Err(CustomizeError::NotInImage { field: "customize".into(), path: "/etc/passwd".into() });
        }
        Ok(Self {
            passwd,
            shadow: Table::load(guest, "/etc/shadow")?,
            group: Table::load(guest, "/etc/group")?,
            gshadow: Table::load(guest, "/etc/gshadow")?,
        })
    }

    pub fn save(&self, guest: &Guest<'_>) -> Result<(), CustomizeError> {
        // Debian's modes for files that did not exist before: shadow files readable by group shadow (42).
        let shadow_gid = self.group_gid("shadow").unwrap_or(0);
        self.passwd.save(guest, Perm::root(0o644))?;
        self.group.save(guest, Perm::root(0o644))?;
        self.shadow.save(guest, Perm { mode: 0o640, uid: 0, gid: shadow_gid })?;
        if self.gshadow.present {
            self.gshadow.save(guest, Perm { mode: 0o640, uid: 0, gid: shadow_gid })?;
        }
        Ok(())
    }

    pub fn user(&self, name: &str) -> Option<Account> {
        let f = self.passwd.fields(self.passwd.find(name)?);
        Some(Account {
            uid: f.get(2)?.parse().ok()?,
            gid: f.get(3)?.parse().ok()?,
            home: f.get(5).cloned().unwrap_or_default(),
        })
    }

    pub fn group_gid(&self, name: &str) -> Option<u32> {
        self.group.fields(self.group.find(name)?).get(2)?.parse().ok()
    }

    fn free_id(&self, want_free_gid_too: bool) -> Option<u32> {
        let uids: Vec<u32> = self.passwd.ids().collect();
        let gids: Vec<u32> = self.group.ids().collect();
        let uid_free = |id: &u32| !uids.contains(id);
        let both_free = |id: &u32| uid_free(id) && !gids.contains(id);
        if want_free_gid_too && let Some(id) = (FIRST_UID..=LAST_UID).find(both_free) {
            return Some(id);
        }
        (FIRST_UID..=LAST_UID).find(uid_free)
    }

    fn free_gid(&self, preferred: u32) -> Option<u32> {
        let gids: Vec<u32> = self.group.ids().collect();
        if !gids.contains(&preferred) {
            return Some(preferred);
        }
        (FIRST_UID..=LAST_UID).find(|g| !gids.contains(g))
    }

    /// Adds a user with a personal group, like Debian's `adduser` with USERGROUPS=yes. The password starts
    /// locked (`!`); `set_password` fills it in at the end.
    pub fn add_user(&mut self, field: &str, user: &User) -> Result<Account, CustomizeError> {
        let name = &user.name;
        let invalid =
            |f: &str, reason: String| CustomizeError::Invalid { field: format!("{field}.{f}"), reason };
        if self.passwd.find(name).is_some() {
            return Err(invalid("name", format!("user {name} already exists in the image")));
        }
        if self.group.find(name).is_some() {
            return Err(invalid("name", format!("a group named {name} already exists in the image")));
        }
        // Supplementary groups are checked before anything changes.
        for (j, g) in user.groups.iter().enumerate() {
            if self.group.find(g).is_none() {
                return Err(CustomizeError::UnknownGroup {
                    field: format!("{field}.groups[{j}]"),
                    name: g.clone(),
                });
            }
        }
        let uid = match user.uid {
            Some(uid) if self.passwd.ids().any(|u| u == uid) => {
                return Err(invalid("uid", format!("uid {uid} is already used in the image")));
            }
            Some(uid) => uid,
            None => self
                .free_id(true)
                .ok_or_else(|| invalid("uid", format!("no free uid between {FIRST_UID} and {LAST_UID}")))?,
        };
        let gid = self
            .free_gid(uid)
            .ok_or_else(|| invalid("name", format!("no free gid between {FIRST_UID} and {LAST_UID}")))?;
        let home = format!("/home/{name}");
        let shell = if user.shell.is_empty() { "/bin/bash" } else { &user.shell };
        self.passwd.push(format!("{name}:x:{uid}:{gid}:{}:{home}:{shell}", user.comment));
        self.shadow.push(format!("{name}:!:{}:0:99999:7:::", days_since_epoch()));
        self.group.push(format!("{name}:x:{gid}:"));
        if self.gshadow.present {
            self.gshadow.push(format!("{name}:!::"));
        }
        for g in &user.groups {
            self.add_member(g, name);
        }
        Ok(Account { uid, gid, home })
    }

    fn add_member(&mut self, group: &str, user: &str) {
        add_to_list(&mut self.group, group, 3, user);
        if self.gshadow.present {
            add_to_list(&mut self.gshadow, group, 3, user);
        }
    }

    /// Sets the password field of `name` in /etc/shadow (adding a shadow line if the image lacks one).
    pub fn set_shadow_password(&mut self, name: &str, hash: &str) {
        match self.shadow.find(name) {
            Some(idx) => {
                let mut f = self.shadow.fields(idx);
                f.resize(f.len().max(9), String::new());
                f[1] = hash.to_string();
                self.shadow.set(idx, &f);
            }
            None => self.shadow.push(format!("{name}:{hash}:{}:0:99999:7:::", days_since_epoch())),
        }
        // With a shadow entry, passwd must defer to it.
        if let Some(idx) = self.passwd.find(name) {
            let mut f = self.passwd.fields(idx);
            if f.len() > 1 && f[1] != "x" {
                f[1] = "x".into();
                self.passwd.set(idx, &f);
            }
        }
    }

    pub fn shadow_password(&self, name: &str) -> Option<String> {
        self.shadow.fields(self.shadow.find(name)?).get(1).cloned()
    }
}

fn add_to_list(table: &mut Table, group: &str, column: usize, user: &str) {
    let Some(idx) = table.find(group) else { return };
    let mut f = table.fields(idx);
    f.resize(f.len().max(column + 1), String::new());
    let mut members: Vec<&str> = f[column].split(',').filter(|m| !m.is_empty()).collect();
    if members.contains(&user) {
        return;
    }
    members.push(user);
    f[column] = members.join(",");
    table.set(idx, &f);
}

fn days_since_epoch() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() / 86_400).unwrap_or(0)
}

/// SHA-512 crypt of `password` with a random 16-character salt, in the form `openssl passwd -6` and glibc
/// write (`$6$salt$hash`, default 5000 rounds).
pub fn sha512_crypt(password: &str) -> Result<String, CustomizeError> {
    // 12 random bytes encode to exactly 16 salt characters, the maximum SHA-crypt uses.
    let salt: [u8; 12] = rand::rng().random();
    let hash = ShaCrypt::SHA512
        .hash_password_with_salt(password.as_bytes(), &salt)
        .map_err(CustomizeError::PasswordHash)?
        .to_string();
    // The crate always writes the default "rounds=5000$"; glibc omits it and means the same.
    Ok(hash.replacen("$rounds=5000$", "$", 1))
}

/// The shadow field for a hash-or-plain pair: the hash as given, the plain password hashed, or `!` (locked).
pub(crate) fn password_field(hash: &str, plain: &str) -> Result<String, CustomizeError> {
    if !hash.is_empty() {
        Ok(hash.to_string())
    } else if !plain.is_empty() {
        sha512_crypt(plain)
    } else {
        Ok("!".to_string())
    }
}

/// The password step: users' passwords, then root's hash or password and lock.
pub(crate) fn apply_passwords(
    guest: &Guest<'_>,
    c: &gridforge_proto::v1::Customization,
) -> Result<(), CustomizeError> {
    let has_root_change = !c.root_password_hash.is_empty() || !c.root_password.is_empty() || c.root_lock;
    if c.users.is_empty() && !has_root_change {
        return Ok(());
    }
    let mut accounts = Accounts::load(guest)?;
    for user in &c.users {
        let field = password_field(&user.password_hash, &user.password)?;
        accounts.set_shadow_password(&user.name, &field);
    }
    if has_root_change {
        let mut field = if !c.root_password_hash.is_empty() || !c.root_password.is_empty() {
            password_field(&c.root_password_hash, &c.root_password)?
        } else {
            accounts.shadow_password("root").unwrap_or_else(|| "*".into())
        };
        if c.root_lock && !field.starts_with('!') {
            field.insert(0, '!');
        }
        accounts.set_shadow_password("root", &field);
    }
    accounts.save(guest)
}
