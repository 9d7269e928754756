//! What a certificate lets its holder do: a role, and for a host its id,
//! for a client its name and limits. Carried in the certificate itself (an
//! extension of ours), so every member can check a caller without asking
//! anyone.

use std::fmt;

/// Who a caller is to the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// A storage host: Raft, block transfer, the cluster's own bookkeeping.
    Member,
    /// A mount (or any program using the client library): file operations.
    Client,
    /// `fsctl`: membership, shipping, draining, credentials.
    Admin,
}

impl Role {
    pub fn label(self) -> &'static str {
        match self {
            Role::Member => "member",
            Role::Client => "client",
            Role::Admin => "admin",
        }
    }
}

impl Role {
    /// "a member", "a client", "an admin": for messages.
    pub fn a(self) -> &'static str {
        match self {
            Role::Member => "a member",
            Role::Client => "a client",
            Role::Admin => "an admin",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// What one certificate grants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub role: Role,
    /// The host a member certificate belongs to (0 for other roles).
    pub host_id: u64,
    /// A client's or admin's name (empty for a member).
    pub name: String,
    /// The subtree a client may see, `/` for all of it.
    pub subdir: String,
    /// A client that may only read.
    pub read_only: bool,
}

/// Why a grant was refused when parsed or built.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BadGrant(pub String);

const MAGIC: &str = "failsafe-grant/1";

/// A name for a client or admin: what `fsctl client add` and the tracker's
/// session table show.
pub fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// A subtree a client may be confined to: an absolute path without `.`,
/// `..` or empty components, `/` for the whole namespace.
pub fn valid_subdir(path: &str) -> bool {
    path == "/"
        || (path.starts_with('/')
            && path.len() <= 4096
            && !path.contains('\0')
            && !path.contains('\n')
            && path[1..]
                .split('/')
                .all(|c| !c.is_empty() && c != "." && c != ".." && c.len() <= 255))
}

impl Grant {
    pub fn member(host_id: u64) -> Grant {
        Grant {
            role: Role::Member,
            host_id,
            name: String::new(),
            subdir: "/".into(),
            read_only: false,
        }
    }

    pub fn admin(name: &str) -> Result<Grant, BadGrant> {
        Grant::named(Role::Admin, name, "/", false)
    }

    pub fn client(name: &str, subdir: &str, read_only: bool) -> Result<Grant, BadGrant> {
        Grant::named(Role::Client, name, subdir, read_only)
    }

    fn named(role: Role, name: &str, subdir: &str, read_only: bool) -> Result<Grant, BadGrant> {
        if !valid_name(name) {
            return Err(BadGrant(format!(
                "{name:?} is not a name: 1 to 64 letters, digits, '-', '_' or '.'"
            )));
        }
        if !valid_subdir(subdir) {
            return Err(BadGrant(format!(
                "{subdir:?} is not a subtree: an absolute path without '.', '..' or '//'"
            )));
        }
        Ok(Grant {
            role,
            host_id: 0,
            name: name.to_string(),
            subdir: subdir.to_string(),
            read_only,
        })
    }

    /// A short description for logs and errors: `member 00ab…`, `client web1`.
    pub fn who(&self) -> String {
        match self.role {
            Role::Member => format!("member {:016x}", self.host_id),
            _ => format!("{} {}", self.role, self.name),
        }
    }

    /// The text stored in the certificate.
    pub fn encode(&self) -> String {
        let mut s = format!("{MAGIC} role={}", self.role);
        match self.role {
            Role::Member => s.push_str(&format!(" host={:016x}", self.host_id)),
            Role::Client | Role::Admin => {
                s.push_str(&format!(" name={}", self.name));
                if self.read_only {
                    s.push_str(" read-only");
                }
                // Last: a path may hold spaces.
                s.push_str(&format!(" subdir={}", self.subdir));
            }
        }
        s
    }

    pub fn decode(text: &str) -> Result<Grant, BadGrant> {
        let bad = |why: &str| BadGrant(format!("certificate grant {text:?}: {why}"));
        let rest = text
            .strip_prefix(MAGIC)
            .and_then(|r| r.strip_prefix(' '))
            .ok_or_else(|| bad("not a failsafe grant of a version this build reads"))?;
        let (head, subdir) = match rest.split_once(" subdir=") {
            Some((h, s)) => (h, s),
            None => (rest, "/"),
        };
        let (mut role, mut host_id, mut name, mut read_only) = (None, 0, "", false);
        for word in head.split(' ') {
            match word.split_once('=') {
                Some(("role", r)) => {
                    role = Some(match r {
                        "member" => Role::Member,
                        "client" => Role::Client,
                        "admin" => Role::Admin,
                        _ => return Err(bad("unknown role")),
                    })
                }
                Some(("host", h)) => {
                    host_id = u64::from_str_radix(h, 16).map_err(|_| bad("bad host id"))?
                }
                Some(("name", n)) => name = n,
                None if word == "read-only" => read_only = true,
                _ => return Err(bad("unknown field")),
            }
        }
        match role.ok_or_else(|| bad("no role"))? {
            Role::Member if host_id != 0 => Ok(Grant::member(host_id)),
            Role::Member => Err(bad("a member grant without a host id")),
            role => Grant::named(role, name, subdir, read_only),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grants_read_back_as_written() {
        for g in [
            Grant::member(0x00ab_cdef_0123_4567),
            Grant::admin("admin").unwrap(),
            Grant::client("web1", "/", false).unwrap(),
            Grant::client("web-2", "/wiki/data pages", true).unwrap(),
        ] {
            assert_eq!(Grant::decode(&g.encode()).unwrap(), g);
        }
    }

    #[test]
    fn bad_grants_are_refused() {
        assert!(Grant::client("web 1", "/", false).is_err());
        assert!(Grant::client("web1", "wiki", false).is_err());
        assert!(Grant::client("web1", "/wiki/../etc", false).is_err());
        assert!(Grant::client("web1", "/wiki//x", false).is_err());
        for text in [
            "",
            "failsafe-grant/2 role=member host=1",
            "failsafe-grant/1 role=root name=x",
            "failsafe-grant/1 role=member",
            "failsafe-grant/1 role=member host=zz",
            "failsafe-grant/1 role=client name=a b",
        ] {
            assert!(Grant::decode(text).is_err(), "{text:?}");
        }
    }
}
