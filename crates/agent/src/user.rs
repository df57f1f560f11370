//! The container's user: the OCI image `User` string (`""`, `name`, `uid`,
//! `name:group`, `uid:gid`) resolved against the container's own
//! `/etc/passwd` and `/etc/group`, the way docker (runc) does it.

/// Why a `User` string could not be resolved.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UserError {
    /// A user name that is not in the container's `/etc/passwd`.
    #[error("user \"{0}\" not found in /etc/passwd")]
    UserNotFound(String),
    /// A group name that is not in the container's `/etc/group`.
    #[error("group \"{0}\" not found in /etc/group")]
    GroupNotFound(String),
    /// Not of the form `user[:group]`.
    #[error("invalid user \"{0}\": expected user, uid, user:group or uid:gid")]
    Invalid(String),
}

/// Who the container process runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecUser {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups (set with `setgroups`; may be empty).
    pub groups: Vec<u32>,
    /// Home directory, for `HOME` when the environment has none.
    pub home: String,
}

/// One line of `/etc/passwd`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PasswdEntry {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: String,
}

/// One line of `/etc/group`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupEntry {
    pub name: String,
    pub gid: u32,
    pub members: Vec<String>,
}

/// Parses `/etc/passwd` (`name:pw:uid:gid:gecos:home:shell`), skipping
/// comments and malformed lines.
pub fn parse_passwd(text: &str) -> Vec<PasswdEntry> {
    text.lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .filter_map(|line| {
            let f: Vec<&str> = line.split(':').collect();
            if f.len() < 4 {
                return None;
            }
            Some(PasswdEntry {
                name: f[0].to_string(),
                uid: f[2].trim().parse().ok()?,
                gid: f[3].trim().parse().ok()?,
                home: f.get(5).copied().unwrap_or("").to_string(),
            })
        })
        .collect()
}

/// Parses `/etc/group` (`name:pw:gid:member,member`), skipping comments and
/// malformed lines.
pub fn parse_group(text: &str) -> Vec<GroupEntry> {
    text.lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .filter_map(|line| {
            let f: Vec<&str> = line.split(':').collect();
            if f.len() < 3 {
                return None;
            }
            Some(GroupEntry {
                name: f[0].to_string(),
                gid: f[2].trim().parse().ok()?,
                members: f
                    .get(3)
                    .map(|m| {
                        m.split(',')
                            .map(str::trim)
                            .filter(|m| !m.is_empty())
                            .map(str::to_string)
                            .collect()
                    })
                    .unwrap_or_default(),
            })
        })
        .collect()
}

/// Resolves a `User` string. `passwd` and `group` are the contents of the
/// container's files (empty when missing). Numeric ids need not exist in
/// the files. Supplementary groups come from `/etc/group` membership only
/// when no group is given explicitly.
pub fn resolve(user: &str, passwd: &str, group: &str) -> Result<ExecUser, UserError> {
    let user = user.trim();
    let (user_part, group_part) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    if group_part.is_some_and(|g| g.is_empty() || g.contains(':')) {
        return Err(UserError::Invalid(user.to_string()));
    }
    let users = parse_passwd(passwd);
    let groups = parse_group(group);

    let entry = if user_part.is_empty() {
        users.iter().find(|e| e.uid == 0)
    } else if let Ok(uid) = user_part.parse::<u32>() {
        users.iter().find(|e| e.uid == uid)
    } else {
        Some(
            users
                .iter()
                .find(|e| e.name == user_part)
                .ok_or_else(|| UserError::UserNotFound(user_part.to_string()))?,
        )
    };
    let uid = match (user_part.parse::<u32>(), entry) {
        (Ok(uid), _) => uid,
        (Err(_), Some(e)) => e.uid,
        (Err(_), None) => 0,
    };
    let mut gid = entry.map_or(0, |e| e.gid);
    let home = entry
        .map(|e| e.home.clone())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "/".to_string());

    let mut supplementary = Vec::new();
    match group_part {
        Some(g) => {
            gid = match g.parse::<u32>() {
                Ok(gid) => gid,
                Err(_) => {
                    groups
                        .iter()
                        .find(|e| e.name == g)
                        .ok_or_else(|| UserError::GroupNotFound(g.to_string()))?
                        .gid
                }
            };
        }
        None => {
            if let Some(e) = entry {
                for g in groups.iter().filter(|g| g.members.contains(&e.name)) {
                    if !supplementary.contains(&g.gid) {
                        supplementary.push(g.gid);
                    }
                }
            }
        }
    }
    Ok(ExecUser {
        uid,
        gid,
        groups: supplementary,
        home,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "\
root:x:0:0:root:/root:/bin/sh
# a comment
daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin
broken line
app:x:1000:1000:App,,,:/home/app:/bin/sh
nohome:x:1001:1001::::
";
    const GROUP: &str = "\
root:x:0:
wheel:x:10:root,app
app:x:1000:
audio:x:29:app
video:x:44: app , other
bad:x:notanumber:app
";

    fn user(s: &str) -> Result<ExecUser, UserError> {
        resolve(s, PASSWD, GROUP)
    }

    #[test]
    fn empty_is_root_with_its_home_and_groups() {
        assert_eq!(
            user("").unwrap(),
            ExecUser {
                uid: 0,
                gid: 0,
                groups: vec![10],
                home: "/root".into()
            }
        );
    }

    #[test]
    fn name_gets_passwd_ids_home_and_member_groups() {
        assert_eq!(
            user("app").unwrap(),
            ExecUser {
                uid: 1000,
                gid: 1000,
                groups: vec![10, 29, 44],
                home: "/home/app".into()
            }
        );
    }

    #[test]
    fn numeric_uid_in_passwd_uses_its_entry() {
        let u = user("1000").unwrap();
        assert_eq!((u.uid, u.gid, u.home.as_str()), (1000, 1000, "/home/app"));
    }

    #[test]
    fn numeric_ids_need_not_exist() {
        assert_eq!(
            user("4242:4343").unwrap(),
            ExecUser {
                uid: 4242,
                gid: 4343,
                groups: vec![],
                home: "/".into()
            }
        );
        let u = resolve("4242", "", "").unwrap();
        assert_eq!((u.uid, u.gid, u.home.as_str()), (4242, 0, "/"));
    }

    #[test]
    fn explicit_group_by_name_drops_supplementary_groups() {
        let u = user("app:audio").unwrap();
        assert_eq!((u.uid, u.gid), (1000, 29));
        assert!(u.groups.is_empty());
    }

    #[test]
    fn empty_home_falls_back_to_root_dir() {
        assert_eq!(user("nohome").unwrap().home, "/");
    }

    #[test]
    fn unknown_names_are_errors_with_clear_messages() {
        assert_eq!(
            user("nobody").unwrap_err().to_string(),
            "user \"nobody\" not found in /etc/passwd"
        );
        assert_eq!(
            user("app:staff").unwrap_err().to_string(),
            "group \"staff\" not found in /etc/group"
        );
        assert!(matches!(user("app:"), Err(UserError::Invalid(_))));
        assert!(matches!(
            resolve("app", "", ""),
            Err(UserError::UserNotFound(_))
        ));
    }
}
