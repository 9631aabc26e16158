//! A process's ancestors from `/proc`, so that the GPU memory of a lease
//! holder's children (the command under `gpulease run`, a worker process)
//! counts as the holder's.

/// How far up the process tree to look.
const MAX_DEPTH: usize = 32;

/// The parent, grandparent, … of `pid`, up to but not including init; empty
/// when `/proc` does not know it (another PID namespace, or it exited).
pub(super) fn ancestors(pid: u32) -> Vec<u32> {
    let mut chain = Vec::new();
    let mut current = pid;
    while chain.len() < MAX_DEPTH {
        match parent(current) {
            Some(parent) if parent > 1 && !chain.contains(&parent) => {
                chain.push(parent);
                current = parent;
            }
            _ => break,
        }
    }
    chain
}

fn parent(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_parent(&stat)
}

/// The fourth field of `/proc/PID/stat`. The second, the command name in
/// parentheses, may itself contain spaces and parentheses.
fn parse_parent(stat: &str) -> Option<u32> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    after_name.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_parent_even_with_odd_names() {
        assert_eq!(parse_parent("42 (sh) S 7 42 42 0"), Some(7));
        assert_eq!(parse_parent("42 (a b) c) R 9 1"), Some(9));
        assert_eq!(parse_parent("garbage"), None);
    }

    #[test]
    fn finds_this_process_parent() {
        let me = std::process::id();
        let chain = ancestors(me);
        let parent = std::os::unix::process::parent_id();
        if parent > 1 {
            assert_eq!(chain.first().copied(), Some(parent));
        }
    }
}
