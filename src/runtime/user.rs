//! The user a container runs as: names resolved in the image's own
//! `/etc/passwd` and `/etc/group`, read inside the rootfs (symlinks resolved
//! as if the rootfs were `/`, so a hostile image cannot make berth read host files).

use std::io::Read;
use std::path::Path;

use nix::fcntl::{OFlag, OpenHow, ResolveFlag, openat2};
use nix::sys::stat::Mode;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UserError {
    #[error("user {0:?} not found in the image's /etc/passwd")]
    UnknownUser(String),
    #[error("group {0:?} not found in the image's /etc/group")]
    UnknownGroup(String),
}

/// Who the container's process is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedUser {
    pub uid: u32,
    pub gid: u32,
    /// Supplemental groups, sorted, without duplicates, including `gid`.
    pub groups: Vec<u32>,
    pub home: String,
}

/// Reads a file of the rootfs, resolving the path inside it; missing is empty.
pub fn read_in_root(rootfs: &Path, path: &str) -> String {
    let Ok(root) = std::fs::File::open(rootfs) else {
        return String::new();
    };
    let how = OpenHow::new()
        .flags(OFlag::O_RDONLY | OFlag::O_CLOEXEC)
        .mode(Mode::empty())
        .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS);
    let Ok(fd) = openat2(&root, path.trim_start_matches('/'), how) else {
        return String::new();
    };
    let mut text = String::new();
    let _ = std::fs::File::from(fd)
        .take(4 * 1024 * 1024)
        .read_to_string(&mut text);
    text
}

struct PasswdEntry {
    name: String,
    uid: u32,
    gid: u32,
    home: String,
}

fn passwd_entries(passwd: &str) -> impl Iterator<Item = PasswdEntry> + '_ {
    passwd.lines().filter_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() < 6 {
            return None;
        }
        Some(PasswdEntry {
            name: f[0].to_string(),
            uid: f[2].parse().ok()?,
            gid: f[3].parse().ok()?,
            home: f[5].to_string(),
        })
    })
}

struct GroupEntry {
    name: String,
    gid: u32,
    members: Vec<String>,
}

fn group_entries(group: &str) -> impl Iterator<Item = GroupEntry> + '_ {
    group.lines().filter_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() < 4 {
            return None;
        }
        Some(GroupEntry {
            name: f[0].to_string(),
            gid: f[2].parse().ok()?,
            members: f[3]
                .split(',')
                .filter(|m| !m.is_empty())
                .map(String::from)
                .collect(),
        })
    })
}

/// What the container asks for, in order of precedence: the request's uid or
/// username, else the image's USER (`name`, `uid`, `uid:gid`, `name:group`).
#[derive(Debug, Clone, Default)]
pub struct UserRequest {
    pub run_as_user: Option<u32>,
    pub run_as_username: String,
    pub run_as_group: Option<u32>,
    pub supplemental_groups: Vec<u32>,
    pub image_user: String,
    /// Strict policy: the image's /etc/group adds nothing.
    pub strict_groups: bool,
}

/// Resolves the user against the image's files (`passwd`, `group` contents).
pub fn resolve(req: &UserRequest, passwd: &str, group: &str) -> Result<ResolvedUser, UserError> {
    let (image_user, image_group) = match req.image_user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (req.image_user.as_str(), None),
    };
    let user_spec = if let Some(uid) = req.run_as_user {
        uid.to_string()
    } else if !req.run_as_username.is_empty() {
        req.run_as_username.clone()
    } else if image_user.is_empty() {
        "0".to_string()
    } else {
        image_user.to_string()
    };
    let entry = match user_spec.parse::<u32>() {
        Ok(uid) => passwd_entries(passwd)
            .find(|e| e.uid == uid)
            .or(Some(PasswdEntry {
                name: String::new(),
                uid,
                gid: 0,
                home: "/".to_string(),
            })),
        Err(_) => passwd_entries(passwd).find(|e| e.name == user_spec),
    }
    .ok_or_else(|| UserError::UnknownUser(user_spec.clone()))?;

    let from_image_group =
        match image_group.filter(|_| req.run_as_user.is_none() && req.run_as_username.is_empty()) {
            Some(g) => Some(match g.parse::<u32>() {
                Ok(gid) => gid,
                Err(_) => group_entries(group)
                    .find(|e| e.name == g)
                    .map(|e| e.gid)
                    .ok_or_else(|| UserError::UnknownGroup(g.to_string()))?,
            }),
            None => None,
        };
    let gid = req.run_as_group.or(from_image_group).unwrap_or(entry.gid);
    let mut groups: Vec<u32> = vec![gid];
    if !entry.name.is_empty() && !req.strict_groups {
        groups.extend(
            group_entries(group)
                .filter(|g| g.members.iter().any(|m| m == &entry.name))
                .map(|g| g.gid),
        );
    }
    groups.extend(&req.supplemental_groups);
    groups.sort_unstable();
    groups.dedup();
    Ok(ResolvedUser {
        uid: entry.uid,
        gid,
        groups,
        home: entry.home,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\nwww-data:x:33:33:www-data:/var/www:/bin/sh\nuser1002:x:1002:1002::/home/user1002:/bin/sh\n";
    const GROUP: &str = "root:x:0:\nusers:x:100:user1002\nwww-data:x:33:\nuser1002:x:1002:\nextra:x:2000:user1002,www-data\n";

    fn req(image_user: &str) -> UserRequest {
        UserRequest {
            image_user: image_user.to_string(),
            ..Default::default()
        }
    }

    #[test]
    fn image_users_resolve() {
        let u = resolve(&req("www-data"), PASSWD, GROUP).expect("www-data");
        assert_eq!((u.uid, u.gid, u.groups.clone()), (33, 33, vec![33, 2000]));
        let u = resolve(&req("1002"), PASSWD, GROUP).expect("1002");
        assert_eq!(
            (u.uid, u.gid, u.groups.clone()),
            (1002, 1002, vec![100, 1002, 2000])
        );
        let u = resolve(&req("1003:1003"), PASSWD, GROUP).expect("1003:1003");
        assert_eq!((u.uid, u.gid, u.groups.clone()), (1003, 1003, vec![1003]));
        let u = resolve(&req(""), PASSWD, GROUP).expect("root");
        assert_eq!((u.uid, u.gid, u.groups), (0, 0, vec![0]));
        assert_eq!(
            resolve(&req("nobody-here"), PASSWD, GROUP),
            Err(UserError::UnknownUser("nobody-here".into()))
        );
    }

    #[test]
    fn the_request_wins_over_the_image() {
        let r = UserRequest {
            run_as_user: Some(1002),
            run_as_group: Some(50),
            supplemental_groups: vec![7],
            image_user: "www-data".into(),
            ..Default::default()
        };
        let u = resolve(&r, PASSWD, GROUP).expect("resolve");
        assert_eq!((u.uid, u.gid, u.groups), (1002, 50, vec![7, 50, 100, 2000]));
        let strict = UserRequest {
            strict_groups: true,
            ..r
        };
        let u = resolve(&strict, PASSWD, GROUP).expect("strict");
        assert_eq!(u.groups, vec![7, 50]);
        let r = UserRequest {
            run_as_username: "www-data".into(),
            ..Default::default()
        };
        assert_eq!(resolve(&r, PASSWD, GROUP).expect("by name").uid, 33);
    }

    #[test]
    fn files_are_read_inside_the_root() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("etc")).expect("etc");
        std::os::unix::fs::symlink("/etc/hostname", dir.path().join("etc/passwd"))
            .expect("symlink");
        // The absolute symlink resolves inside the root, where there is no hostname.
        assert_eq!(read_in_root(dir.path(), "/etc/passwd"), "");
        std::fs::write(dir.path().join("etc/group"), "g:x:1:\n").expect("group");
        assert_eq!(read_in_root(dir.path(), "/etc/group"), "g:x:1:\n");
    }
}
