//! First-boot commands: a oneshot unit that runs a generated script once, then records that it ran.

use gridforge_proto::v1::Customization;

use super::CustomizeError;
use super::path::{Guest, Perm};
use super::units::enable_unit;

pub const FIRSTBOOT_UNIT: &str = "/etc/systemd/system/gridforge-firstboot.service";
pub const FIRSTBOOT_SCRIPT: &str = "/usr/local/libexec/gridforge-firstboot";
pub const FIRSTBOOT_DONE: &str = "/var/lib/gridforge/firstboot.done";

/// The unit file text.
pub fn firstboot_unit() -> String {
    format!(
        "# Written by gridforge: runs the first-boot commands once.\n\
         [Unit]\n\
         Description=gridforge first-boot commands\n\
         Wants=network-online.target\n\
         After=network-online.target systemd-networkd.service\n\
         ConditionPathExists=!{FIRSTBOOT_DONE}\n\
         \n\
         [Service]\n\
         Type=oneshot\n\
         ExecStart={FIRSTBOOT_SCRIPT}\n\
         RemainAfterExit=yes\n\
         StandardOutput=journal+console\n\
         StandardError=journal+console\n\
         TimeoutStartSec=0\n\
         \n\
         [Install]\n\
         WantedBy=multi-user.target\n"
    )
}

/// Single-quotes `s` for /bin/sh.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The script: each command through `/bin/sh -c` in order, stopping at the first failure; the done file is
/// written only when all succeeded, so a failed first boot runs them again on the next boot.
pub fn firstboot_script(commands: &[String]) -> String {
    let mut s = String::from(
        "#!/bin/sh\n\
         # Written by gridforge: the first-boot commands, run once in order by gridforge-firstboot.service.\n\
         set -u\n\
         run() {\n\
         \x20   n=$1\n\
         \x20   echo \"gridforge-firstboot: [$n] $2\"\n\
         \x20   /bin/sh -c \"$2\"\n\
         \x20   rc=$?\n\
         \x20   if [ \"$rc\" -ne 0 ]; then\n\
         \x20       echo \"gridforge-firstboot: [$n] failed with exit status $rc\" >&2\n\
         \x20       exit \"$rc\"\n\
         \x20   fi\n\
         }\n",
    );
    for (i, cmd) in commands.iter().enumerate() {
        s.push_str(&format!("run {} {}\n", i + 1, sh_quote(cmd)));
    }
    let done_dir = FIRSTBOOT_DONE.rsplit_once('/').map_or("/", |(d, _)| d);
    s.push_str(&format!(
        "mkdir -p {done_dir}\ntouch {FIRSTBOOT_DONE}\necho \"gridforge-firstboot: all {} commands succeeded\"\n",
        commands.len()
    ));
    s
}

pub(crate) fn apply_firstboot(guest: &Guest<'_>, c: &Customization) -> Result<(), CustomizeError> {
    if c.firstboot.is_empty() {
        return Ok(());
    }
    guest.write_file(FIRSTBOOT_SCRIPT, firstboot_script(&c.firstboot).as_bytes(), Perm::root(0o755))?;
    guest.write_file(FIRSTBOOT_UNIT, firstboot_unit().as_bytes(), Perm::root(0o644))?;
    enable_unit(guest, "gridforge-firstboot.service", "multi-user.target")
}
