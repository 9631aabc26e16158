//! Who may call what: bearer tokens per consumer (checked by a tonic
//! interceptor), peer credentials on the Unix socket, and the operator.
//!
//! The interceptor only establishes *who* the caller is (a presented token
//! that matches nothing is refused there with UNAUTHENTICATED); each handler
//! then asks [`Authority`] whether that caller may do what it asks, since
//! only the handler knows the consumer named in the request. Refusals are
//! [`AuthError`]s; the gRPC layer's error table turns them into statuses.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};

use tonic::service::Interceptor;
use tonic::transport::server::UdsConnectInfo;
use tonic::{Request, Status};

use crate::config::{AuthConfig, Consumer, ConsumerAuth};

/// Who a caller is, as far as the broker can tell.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Caller {
    /// Whose token it presented, if any.
    pub token_of: Option<Identity>,
    /// Its Unix credentials, when it came over the Unix socket.
    pub unix: Option<UnixPeer>,
}

/// The owner of a token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Identity {
    /// The operator.
    Admin,
    /// A consumer.
    Consumer(String),
}

/// A Unix-socket peer's credentials (`SO_PEERCRED`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct UnixPeer {
    /// Its user id.
    pub uid: u32,
    /// Its primary group id.
    pub gid: u32,
    /// Its process id, in the broker's PID namespace; `None` when the
    /// kernel could not say (a peer in a namespace the broker cannot see).
    pub pid: Option<u32>,
}

/// Why a caller may not do what it asks. Only UNAUTHENTICATED (who it is
/// is unknown) or PERMISSION_DENIED (it is known, and may not); the error
/// table (`grpc::status`) says which.
#[derive(Debug, thiserror::Error)]
pub(crate) enum AuthError {
    /// The `authorization` header is not `Bearer TOKEN`.
    #[error("the authorization header is not `Bearer TOKEN`")]
    MalformedHeader,
    /// The token matches no identity.
    #[error("unknown token")]
    UnknownToken,
    /// A consumer's token, used for another consumer.
    #[error("the token belongs to consumer {owner:?}, not {consumer:?}")]
    TokenOfAnother {
        /// Whose token it is.
        owner: String,
        /// The consumer asked for.
        consumer: String,
    },
    /// A Unix peer outside the consumer's `unix_users`/`unix_groups`.
    #[error("uid {uid} may not act as consumer {consumer:?} (unix_users/unix_groups)")]
    UnixUserRefused {
        /// The peer's user id.
        uid: u32,
        /// The consumer asked for.
        consumer: String,
    },
    /// Over the socket, a consumer with a token of its own needs it.
    #[error("consumer {consumer:?} needs its token")]
    NeedsOwnToken {
        /// The consumer asked for.
        consumer: String,
    },
    /// Over TCP, with tokens configured, a call without one.
    #[error("this broker requires `authorization: Bearer TOKEN`")]
    TokenRequired,
    /// A consumer restricted to Unix users, asked for over TCP.
    #[error("consumer {consumer:?} may only be used over the Unix socket")]
    UnixSocketOnly {
        /// The consumer asked for.
        consumer: String,
    },
    /// Status without a token where `auth.status_requires_token` is set.
    #[error("Status needs a token on this broker (auth.status_requires_token)")]
    StatusNeedsToken,
    /// An operator call from a caller with no identity at all.
    #[error("operator calls need the admin token, or the Unix socket as the broker's user")]
    OperatorUnidentified,
    /// An operator call from a known caller that is not the operator.
    #[error("operator calls need the admin token, or the Unix socket as the broker's user")]
    NotOperator,
}

/// The token of an `authorization` header value `Bearer TOKEN`. The scheme
/// is case-insensitive (RFC 7235, 2.1), so `bearer` and `BEARER` work too.
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim_start().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// The broker's rules, from the configuration. A reload replaces them
/// ([`Authority::replace`]); a call is judged by the rules of the moment it
/// is judged.
#[derive(Debug)]
pub(crate) struct Authority {
    rules: RwLock<Rules>,
    broker_uid: u32,
    connections: crate::peer::Connections,
}

#[derive(Debug)]
struct Rules {
    tokens: HashMap<String, Identity>,
    consumers: BTreeMap<String, ConsumerAuth>,
    status_requires_token: bool,
}

impl Rules {
    fn new(auth: &AuthConfig, consumers: &BTreeMap<String, Consumer>) -> Self {
        let consumers: BTreeMap<String, ConsumerAuth> = consumers
            .iter()
            .map(|(name, consumer)| (name.clone(), consumer.auth.clone()))
            .collect();
        let mut tokens = HashMap::new();
        if let Some(token) = &auth.admin_token {
            tokens.insert(token.expose().to_owned(), Identity::Admin);
        }
        for (name, consumer) in &consumers {
            if let Some(token) = &consumer.token {
                tokens.insert(token.expose().to_owned(), Identity::Consumer(name.clone()));
            }
        }
        Self {
            tokens,
            consumers,
            status_requires_token: auth.status_requires_token,
        }
    }
}

impl Authority {
    /// The rules of `auth` and the consumers' `consumers`.
    pub(crate) fn new(auth: &AuthConfig, consumers: &BTreeMap<String, Consumer>) -> Self {
        Self {
            rules: RwLock::new(Rules::new(auth, consumers)),
            broker_uid: nix::unistd::geteuid().as_raw(),
            connections: crate::peer::Connections::default(),
        }
    }

    /// The open TCP connections and their clients' PIDs, for the listener
    /// to register in and the handlers to look up.
    pub(crate) fn connections(&self) -> &crate::peer::Connections {
        &self.connections
    }

    /// What the broker sees of the caller of `request` for `consumer`,
    /// claiming `claimed`: its own PID from the kernel (looked up once per
    /// TCP connection), and whether its claim may be taken on trust.
    pub(crate) async fn seen<T>(
        &self,
        request: &Request<T>,
        caller: &Caller,
        consumer: &str,
        claimed: u32,
    ) -> crate::peer::Seen {
        use crate::core::Attribution;
        let kernel = match (caller.unix, self.connections.peer_of(request)) {
            (Some(unix), _) => unix.pid.map(|pid| (pid, Attribution::PeerCredentials)),
            (None, Some(tcp)) => tcp
                .pid(claimed)
                .await
                .map(|pid| (pid, Attribution::SocketLookup)),
            (None, None) => None,
        };
        crate::peer::Seen {
            kernel,
            claimed,
            admin: caller.token_of == Some(Identity::Admin),
            trust_remote: self
                .rules()
                .consumers
                .get(consumer)
                .is_some_and(|rules| rules.trust_remote_pid),
        }
    }

    /// Replaces the rules (a reload): tokens, each consumer's Unix users and
    /// groups, and whether Status needs a token. Calls already admitted are
    /// not judged again; a lease granted under an old token stays held.
    pub(crate) fn replace(&self, auth: &AuthConfig, consumers: &BTreeMap<String, Consumer>) {
        *self
            .rules
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Rules::new(auth, consumers);
    }

    fn rules(&self) -> std::sync::RwLockReadGuard<'_, Rules> {
        self.rules
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Who made `request`: its token and its Unix credentials. A token that
    /// matches nothing is UNAUTHENTICATED.
    pub(crate) fn identify<T>(&self, request: &Request<T>) -> Result<Caller, AuthError> {
        let unix = request
            .extensions()
            .get::<UdsConnectInfo>()
            .and_then(|info| info.peer_cred)
            .map(|cred| UnixPeer {
                uid: cred.uid(),
                gid: cred.gid(),
                pid: cred
                    .pid()
                    .and_then(|pid| u32::try_from(pid).ok())
                    .filter(|pid| *pid > 0),
            });
        let token_of = match request.metadata().get("authorization") {
            None => None,
            Some(value) => {
                let token = value
                    .to_str()
                    .ok()
                    .and_then(bearer_token)
                    .ok_or(AuthError::MalformedHeader)?;
                Some(
                    self.rules()
                        .tokens
                        .get(token)
                        .cloned()
                        .ok_or(AuthError::UnknownToken)?,
                )
            }
        };
        Ok(Caller { token_of, unix })
    }

    /// The caller of a request that passed [`AuthInterceptor`].
    pub(crate) fn caller<T>(request: &Request<T>) -> Caller {
        request
            .extensions()
            .get::<Caller>()
            .cloned()
            .unwrap_or_default()
    }

    /// Whether `caller` may lease (or listen for unloads) as `consumer`.
    pub(crate) fn may_act_as(&self, caller: &Caller, consumer: &str) -> Result<(), AuthError> {
        match &caller.token_of {
            Some(Identity::Admin) => return Ok(()),
            Some(Identity::Consumer(owner)) if owner == consumer => return Ok(()),
            Some(Identity::Consumer(owner)) => {
                return Err(AuthError::TokenOfAnother {
                    owner: owner.clone(),
                    consumer: consumer.to_owned(),
                });
            }
            None => {}
        }
        let all = self.rules();
        let tokens_required = !all.tokens.is_empty();
        let rules = all.consumers.get(consumer);
        let restricted =
            rules.is_some_and(|r| !r.unix_users.is_empty() || !r.unix_groups.is_empty());
        match caller.unix {
            Some(peer) if self.is_owner(peer) => Ok(()),
            Some(peer) if restricted => {
                let rules = rules.expect("restricted implies configured");
                if unix_peer_matches(peer, &rules.unix_users, &rules.unix_groups) {
                    Ok(())
                } else {
                    Err(AuthError::UnixUserRefused {
                        uid: peer.uid,
                        consumer: consumer.to_owned(),
                    })
                }
            }
            // Over the socket, a consumer without Unix rules is open unless
            // it has a token of its own.
            Some(_) if rules.is_some_and(|r| r.token.is_some()) => Err(AuthError::NeedsOwnToken {
                consumer: consumer.to_owned(),
            }),
            Some(_) => Ok(()),
            None if tokens_required => Err(AuthError::TokenRequired),
            None if restricted => Err(AuthError::UnixSocketOnly {
                consumer: consumer.to_owned(),
            }),
            None => Ok(()),
        }
    }

    /// Whether `caller` may read the status.
    pub(crate) fn may_read_status(&self, caller: &Caller) -> Result<(), AuthError> {
        if !self.rules().status_requires_token || caller.token_of.is_some() || caller.unix.is_some()
        {
            return Ok(());
        }
        Err(AuthError::StatusNeedsToken)
    }

    /// Whether `caller` may act as the operator: the admin token, or the
    /// Unix socket's owner (the broker's user, or root).
    pub(crate) fn may_administer(&self, caller: &Caller) -> Result<(), AuthError> {
        if caller.token_of == Some(Identity::Admin) || caller.unix.is_some_and(|p| self.is_owner(p))
        {
            return Ok(());
        }
        if caller.token_of.is_none() && caller.unix.is_none() {
            return Err(AuthError::OperatorUnidentified);
        }
        Err(AuthError::NotOperator)
    }

    fn is_owner(&self, peer: UnixPeer) -> bool {
        peer.uid == 0 || peer.uid == self.broker_uid
    }
}

/// Whether a Unix peer is one of `users` (names or numeric ids) or in one of
/// `groups` (its primary group or a supplementary one).
fn unix_peer_matches(peer: UnixPeer, users: &[String], groups: &[String]) -> bool {
    use nix::unistd::{Gid, Group, Uid, User};
    let user = User::from_uid(Uid::from_raw(peer.uid)).ok().flatten();
    let user_ok = users.iter().any(|wanted| {
        wanted.parse::<u32>().is_ok_and(|uid| uid == peer.uid)
            || user.as_ref().is_some_and(|u| &u.name == wanted)
    });
    if user_ok {
        return true;
    }
    let mut gids = vec![Gid::from_raw(peer.gid)];
    if let Some(user) = &user
        && let Ok(name) = std::ffi::CString::new(user.name.clone())
        && let Ok(more) = nix::unistd::getgrouplist(&name, user.gid)
    {
        gids.extend(more);
    }
    groups.iter().any(|wanted| {
        let wanted_gid = wanted
            .parse::<u32>()
            .ok()
            .map(Gid::from_raw)
            .or_else(|| Group::from_name(wanted).ok().flatten().map(|g| g.gid));
        wanted_gid.is_some_and(|g| gids.contains(&g))
    })
}

/// The tonic interceptor: identifies the caller and stores a [`Caller`] in
/// the request's extensions.
#[derive(Clone, Debug)]
pub(crate) struct AuthInterceptor {
    authority: Arc<Authority>,
}

impl AuthInterceptor {
    /// An interceptor for `authority`.
    pub(crate) fn new(authority: Arc<Authority>) -> Self {
        Self { authority }
    }
}

impl Interceptor for AuthInterceptor {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let caller = self.authority.identify(&request)?;
        request.extensions_mut().insert(caller);
        Ok(request)
    }
}
