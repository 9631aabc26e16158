//! What `/proc` says about a caller: which process owns a TCP connection
//! (as `ss -p` finds it), the PIDs of a process in its nested PID
//! namespaces (`NSpid:`), and its ancestors. All blocking.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// How far up the process tree to look.
const MAX_DEPTH: usize = 64;

/// One row of `/proc/net/tcp` or `/proc/net/tcp6`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct SocketRow {
    pub(super) local: SocketAddr,
    pub(super) remote: SocketAddr,
    pub(super) uid: u32,
    pub(super) inode: u64,
}

/// The rows of a `/proc/net/tcp{,6}` text; lines that do not parse are
/// skipped.
pub(super) fn socket_rows(text: &str) -> Vec<SocketRow> {
    text.lines().skip(1).filter_map(socket_row).collect()
}

fn socket_row(line: &str) -> Option<SocketRow> {
    // sl local_address rem_address st tx:rx tr:tm retrnsmt uid timeout inode
    let fields: Vec<&str> = line.split_whitespace().collect();
    Some(SocketRow {
        local: hex_addr(fields.get(1)?)?,
        remote: hex_addr(fields.get(2)?)?,
        uid: fields.get(7)?.parse().ok()?,
        inode: fields.get(9)?.parse().ok()?,
    })
}

/// `0100007F:1F90` or a 32-digit IPv6 address: each 32-bit word in the
/// kernel's byte order, the port big-endian.
fn hex_addr(text: &str) -> Option<SocketAddr> {
    let (ip, port) = text.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |i: usize| -> Option<[u8; 4]> {
        let hex = ip.get(i * 8..i * 8 + 8)?;
        Some(u32::from_str_radix(hex, 16).ok()?.to_ne_bytes())
    };
    let ip = match ip.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(0)?)),
        32 => {
            let mut bytes = [0u8; 16];
            for i in 0..4 {
                bytes[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            IpAddr::V6(Ipv6Addr::from(bytes))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip.to_canonical(), port))
}

/// The client sockets of the loopback connections in `wanted` (client
/// address, broker address), as `/proc/net/tcp{,6}` shows them: for each,
/// the socket's name as a descriptor's link reads (`socket:[INODE]`) and its
/// owner's uid. One read of each file, however many are wanted.
pub(super) fn client_sockets(
    wanted: &[(SocketAddr, SocketAddr)],
) -> HashMap<(SocketAddr, SocketAddr), (String, u32)> {
    let canonical = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
    let wanted: HashMap<(SocketAddr, SocketAddr), (SocketAddr, SocketAddr)> = wanted
        .iter()
        .map(|&(client, server)| ((canonical(client), canonical(server)), (client, server)))
        .collect();
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .into_iter()
        .filter_map(|path| std::fs::read_to_string(path).ok())
        .flat_map(|text| socket_rows(&text))
        // The client's own socket: its local end is the client's address.
        .filter(|row| row.inode != 0)
        .filter_map(|row| {
            let key = wanted.get(&(row.local, row.remote))?;
            Some((*key, (format!("socket:[{}]", row.inode), row.uid)))
        })
        .collect()
}

/// Whether process `pid` has a descriptor open on `socket` (`socket:[N]`).
pub(super) fn holds(pid: u32, socket: &str) -> bool {
    std::fs::read_dir(format!("/proc/{pid}/fd")).is_ok_and(|fds| {
        fds.filter_map(Result::ok).any(|fd| {
            std::fs::read_link(fd.path()).is_ok_and(|target| target.as_os_str() == socket)
        })
    })
}

/// The processes with an open descriptor on each of `sockets`, among those
/// of the sockets' owners (`uids`): for each socket, the lowest such PID,
/// since a forked child shares its parent's descriptors. One walk of
/// `/proc`, however many sockets are wanted.
pub(super) fn socket_owners(
    sockets: &HashSet<String>,
    uids: &HashSet<u32>,
) -> HashMap<String, u32> {
    use std::os::unix::fs::MetadataExt;
    let mut found = HashMap::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return found;
    };
    let mut pids: Vec<u32> = entries
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            // The owners' processes only: far fewer descriptors to read.
            uids.contains(&entry.metadata().ok()?.uid()).then_some(pid)
        })
        .collect();
    pids.sort_unstable();
    for pid in pids {
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for fd in fds.filter_map(Result::ok) {
            if let Ok(target) = std::fs::read_link(fd.path())
                && let Some(target) = target.to_str()
                && sockets.contains(target)
            {
                found.entry(target.to_owned()).or_insert(pid);
            }
        }
        if found.len() == sockets.len() {
            break;
        }
    }
    found
}

/// `pid` and its parent, grandparent, … (`depth` of them at most).
pub(super) fn lineage(pid: u32, depth: usize) -> Vec<u32> {
    let mut chain = vec![pid];
    while chain.len() <= depth {
        match parent(*chain.last().expect("not empty")) {
            Some(parent) if parent > 1 && !chain.contains(&parent) => chain.push(parent),
            _ => break,
        }
    }
    chain
}

/// The `NSpid:` line of `/proc/PID/status`: the process's PID in the
/// broker's namespace first, then in each nested namespace, innermost last.
pub(super) fn ns_pids(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map(|status| parse_ns_pids(&status))
        .unwrap_or_default()
}

pub(super) fn parse_ns_pids(status: &str) -> Vec<u32> {
    status
        .lines()
        .find_map(|line| line.strip_prefix("NSpid:"))
        .map(|rest| {
            rest.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// The PID namespace of `pid` (the target of `/proc/PID/ns/pid`).
pub(super) fn pid_namespace(pid: u32) -> Option<std::path::PathBuf> {
    std::fs::read_link(format!("/proc/{pid}/ns/pid")).ok()
}

/// Whether `pid` is `ancestor` or one of its descendants.
pub(super) fn descends_from(pid: u32, ancestor: u32) -> bool {
    let mut current = pid;
    for _ in 0..MAX_DEPTH {
        if current == ancestor {
            return true;
        }
        match parent(current) {
            Some(parent) if parent > 0 && parent != current => current = parent,
            _ => return false,
        }
    }
    false
}

fn parent(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name, in parentheses, may contain anything.
    let after_name = &stat[stat.rfind(')')? + 1..];
    after_name.split_whitespace().nth(1)?.parse().ok()
}

/// The process, `peer` or a descendant of it in the same PID namespace,
/// whose PID in that namespace (the innermost) is `inner`.
pub(super) fn translate_from_namespace(peer: u32, inner: u32) -> Option<u32> {
    let namespace = pid_namespace(peer)?;
    let depth = ns_pids(peer).len();
    let candidates = std::fs::read_dir("/proc")
        .ok()?
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok());
    candidates
        .filter(|pid| {
            let pids = ns_pids(*pid);
            pids.len() == depth && pids.last() == Some(&inner)
        })
        .find(|pid| pid_namespace(*pid).as_ref() == Some(&namespace) && descends_from(*pid, peer))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ipv4_and_ipv6_rows() {
        let v4 = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   \
                  0: 0100007F:C350 0100007F:9C40 01 00000000:00000000 00:00000000 00000000     0        0 123456 1 0000000000000000 20 4 30 10 -1\n";
        let rows = socket_rows(v4);
        assert_eq!(
            rows,
            [SocketRow {
                local: "127.0.0.1:50000".parse().unwrap(),
                remote: "127.0.0.1:40000".parse().unwrap(),
                uid: 0,
                inode: 123456,
            }]
        );
        let v6 = "header\n   0: 00000000000000000000000001000000:1F90 0000000000000000FFFF00000100007F:0050 01 00000000:00000000 00:00000000 00000000  1000        0 42 1\n";
        let rows = socket_rows(v6);
        assert_eq!(rows[0].local, "[::1]:8080".parse().unwrap());
        // An IPv4-mapped address reads as the IPv4 address.
        assert_eq!(rows[0].remote, "127.0.0.1:80".parse().unwrap());
        assert_eq!((rows[0].uid, rows[0].inode), (1000, 42));
        assert!(socket_rows("header\ngarbage line\n").is_empty());
    }

    #[test]
    fn finds_the_owner_of_a_loopback_connection() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (_accepted, _) = listener.accept().unwrap();
        let (server, client) = (listener.local_addr().unwrap(), client.local_addr().unwrap());
        let me = std::process::id();
        let sockets = client_sockets(&[(client, server)]);
        let (socket, uid) = sockets[&(client, server)].clone();
        let owners = socket_owners(&HashSet::from([socket.clone()]), &HashSet::from([uid]));
        assert_eq!(owners.get(&socket), Some(&me));
        assert!(holds(me, &socket) && !holds(1, &socket));
        assert_eq!(lineage(me, 1), [me, std::os::unix::process::parent_id()]);
    }

    #[test]
    fn namespaced_pids() {
        assert_eq!(
            parse_ns_pids("Name:\tx\nNSpid:\t4242\t7\t1\n"),
            [4242, 7, 1]
        );
        assert!(parse_ns_pids("Name:\tx\n").is_empty());
        let me = std::process::id();
        assert_eq!(ns_pids(me).first(), Some(&me));
        assert!(descends_from(me, me));
        let parent = std::os::unix::process::parent_id();
        assert!(descends_from(me, parent) && !descends_from(parent, me));
        // In its own namespace, a process's innermost PID is its PID.
        assert_eq!(translate_from_namespace(me, me), Some(me));
    }
}
