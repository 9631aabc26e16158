//! How the broker tied a process to a consumer, as Status reports it.

/// How a holder's or resident's process id was found.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Attribution {
    /// The kernel's word for a Unix-socket peer (`SO_PEERCRED`).
    PeerCredentials,
    /// The owner of the loopback TCP connection, found in `/proc`.
    SocketLookup,
    /// The client's claim, checked: the caller itself or a descendant of it.
    CheckedHint,
    /// The client's claim, taken on trust (the admin, or a remote consumer
    /// that is trusted to say).
    UncheckedHint,
    /// A `match` rule of the consumer's configuration.
    Matcher,
}

impl Attribution {
    /// The name Status shows.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::PeerCredentials => "peer_credentials",
            Self::SocketLookup => "socket_lookup",
            Self::CheckedHint => "checked_hint",
            Self::UncheckedHint => "unchecked_hint",
            Self::Matcher => "matcher",
        }
    }
}

impl std::fmt::Display for Attribution {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
