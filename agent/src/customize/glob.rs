//! Shell-style globs over guest paths, matched inside the staging root.
//!
//! Directories are listed through `resolve`, so a symlinked directory in the image is followed inside the
//! root and never on the host. As in the shell, `*`, `?` and `[...]` do not match a leading dot unless the
//! pattern component itself starts with one.

use super::CustomizeError;
use super::path::{Guest, join_guest};

/// Existing guest paths (the last component not followed) matching `pattern`, sorted.
pub(crate) fn glob(guest: &Guest<'_>, pattern: &str) -> Result<Vec<String>, CustomizeError> {
    let parts: Vec<&str> = pattern.split('/').filter(|c| !c.is_empty() && *c != ".").collect();
    let mut current = vec![String::from("/")];
    for part in &parts {
        let mut next = Vec::new();
        for dir in &current {
            if has_wildcard(part) {
                for name in guest.list_dir(dir)? {
                    if matches(part, &name) {
                        next.push(join_guest(dir, &name));
                    }
                }
            } else {
                next.push(join_guest(dir, &unescape(part)));
            }
        }
        current = next;
    }
    let mut found = Vec::new();
    for path in current {
        if path != "/" && guest.lstat(&path)?.is_some() {
            found.push(path);
        }
    }
    found.sort();
    found.dedup();
    Ok(found)
}

pub(crate) fn has_wildcard(s: &str) -> bool {
    s.contains(['*', '?', '['])
}

fn unescape(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            if let Some(n) = chars.next() {
                out.push(n);
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// fnmatch(3) for one path component: `*`, `?`, `[abc]`, `[a-z]`, `[!x]`/`[^x]`, `\` escapes.
pub(crate) fn matches(pattern: &str, name: &str) -> bool {
    if name.starts_with('.') && !pattern.starts_with('.') && !pattern.starts_with("\\.") {
        return false;
    }
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    match_from(&p, &n)
}

fn match_from(p: &[char], n: &[char]) -> bool {
    let (mut pi, mut ni) = (0, 0);
    // Position after the last `*` and the name index it was tried at, for backtracking.
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        let step = if pi < p.len() {
            match p[pi] {
                '*' => {
                    star = Some((pi + 1, ni));
                    pi += 1;
                    continue;
                }
                '?' => Some(pi + 1),
                '[' => match class(&p[pi..], n[ni]) {
                    Some((true, len)) => Some(pi + len),
                    Some((false, _)) => None,
                    // An unterminated `[` is a literal.
                    None => (n[ni] == '[').then_some(pi + 1),
                },
                '\\' if pi + 1 < p.len() => (p[pi + 1] == n[ni]).then_some(pi + 2),
                c => (c == n[ni]).then_some(pi + 1),
            }
        } else {
            None
        };
        match step {
            Some(next) => {
                pi = next;
                ni += 1;
            }
            None => match star {
                Some((sp, sn)) => {
                    pi = sp;
                    ni = sn + 1;
                    star = Some((sp, sn + 1));
                }
                None => return false,
            },
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// Matches `c` against the bracket expression at the start of `p`: (matched, length of the expression).
fn class(p: &[char], c: char) -> Option<(bool, usize)> {
    let mut i = 1;
    let negate = matches!(p.get(i), Some('!') | Some('^'));
    if negate {
        i += 1;
    }
    let mut matched = false;
    let mut first = true;
    while i < p.len() {
        if p[i] == ']' && !first {
            return Some((matched != negate, i + 1));
        }
        first = false;
        let lo = p[i];
        if i + 2 < p.len() && p[i + 1] == '-' && p[i + 2] != ']' {
            if lo <= c && c <= p[i + 2] {
                matched = true;
            }
            i += 3;
        } else {
            if lo == c {
                matched = true;
            }
            i += 1;
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::matches;

    #[test]
    fn fnmatch_basics() {
        assert!(matches("*.log", "syslog.log"));
        assert!(!matches("*.log", "syslog.log.1"));
        assert!(matches("*.log*", "syslog.log.1"));
        assert!(matches("ssh_host_*", "ssh_host_ed25519_key.pub"));
        assert!(matches("a?c", "abc"));
        assert!(matches("[a-c]x", "bx"));
        assert!(!matches("[!a-c]x", "bx"));
        assert!(matches("*", "file"));
        assert!(!matches("*", ".hidden"));
        assert!(matches(".*", ".hidden"));
        assert!(matches("vmlinuz-*", "vmlinuz-6.1.0-50-cloud-amd64"));
        assert!(matches("a*b*c", "aXXbYYc"));
        assert!(!matches("a*b*c", "aXXbYY"));
    }
}
