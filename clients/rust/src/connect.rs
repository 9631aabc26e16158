//! Reaching a broker: over TCP (plain or TLS, with a client certificate for
//! mutual TLS) or a Unix-domain socket, with an optional bearer token.

use std::path::PathBuf;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity, Uri};
use tonic::{Request, Status};

use crate::pb::v1::lease_broker_client::LeaseBrokerClient;

/// The broker address clients use unless told otherwise.
pub const DEFAULT_BROKER: &str = "127.0.0.1:50051";

/// How long connecting may take before the broker counts as unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The generated gRPC stub on a connected channel, with the bearer token
/// added to every call: every RPC of `gpulease.v1.LeaseBroker` (`status`,
/// `watch_status`, `revoke_lease`, `reload`, `residency`, `acquire_lease`).
pub type GrpcClient = LeaseBrokerClient<InterceptedService<Channel, BearerToken>>;

/// A connection to a broker.
///
/// [`Client::lease`] asks for a lease the easy way. The other RPCs are the
/// generated stub's, reached through `Deref` (or [`Client::grpc`]):
/// `client.status(pb::v1::StatusRequest::default())`. A `Client` is cheap to
/// clone; clones share one HTTP/2 connection.
#[derive(Clone, Debug)]
pub struct Client {
    pub(crate) grpc: GrpcClient,
}

/// How to reach and prove oneself to a broker.
#[derive(Clone, Debug, Default)]
pub struct ConnectOptions {
    /// The bearer token to send, if any.
    pub token: Option<String>,
    /// The CA bundle that signed the broker's certificate; implies TLS, and
    /// TLS needs it (the system's roots are not used).
    pub ca: Option<PathBuf>,
    /// A client certificate and key, for mutual TLS; implies TLS.
    pub identity: Option<(PathBuf, PathBuf)>,
}

/// Why a broker could not be reached.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The address is not one we understand.
    #[error(
        "{0:?} is not a broker address: use HOST:PORT, http://HOST:PORT, https://HOST:PORT or unix:/PATH"
    )]
    BadAddress(String),
    /// A TLS file or the token is unusable.
    #[error("{0}")]
    BadCredentials(String),
    /// Nothing answered there.
    #[error("cannot reach the broker at {address}: {source}")]
    Unreachable {
        /// The address.
        address: String,
        /// Why.
        source: tonic::transport::Error,
    },
}

/// Adds `authorization: Bearer TOKEN` to every call, when there is a token.
#[derive(Clone, Debug)]
pub struct BearerToken(Option<MetadataValue<Ascii>>);

impl Interceptor for BearerToken {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// Connects to the broker at `address` without credentials; the same as
/// [`Client::connect`].
///
/// Cancelling it (dropping the future) abandons the connection attempt.
pub async fn connect(address: impl AsRef<str>) -> Result<Client, ConnectError> {
    Client::connect(address).await
}

/// Connects to the broker at `address` with `options`; the same as
/// [`Client::connect_with`].
///
/// Cancelling it (dropping the future) abandons the connection attempt.
pub async fn connect_with(
    address: impl AsRef<str>,
    options: &ConnectOptions,
) -> Result<Client, ConnectError> {
    Client::connect_with(address, options).await
}

impl Client {
    /// Connects to the broker at `address` without credentials (see
    /// [`Client::connect_with`] for the forms of `address`).
    ///
    /// Cancelling it (dropping the future) abandons the connection attempt.
    pub async fn connect(address: impl AsRef<str>) -> Result<Self, ConnectError> {
        Self::connect_with(address, &ConnectOptions::default()).await
    }

    /// Connects to the broker at `address`: `HOST:PORT`, `http://HOST:PORT`,
    /// `https://HOST:PORT` (TLS), or `unix:/PATH` for a Unix-domain socket.
    /// A CA or a client identity in `options` implies TLS. Gives up after
    /// 5 s without an answer.
    ///
    /// Cancelling it (dropping the future) abandons the connection attempt.
    pub async fn connect_with(
        address: impl AsRef<str>,
        options: &ConnectOptions,
    ) -> Result<Self, ConnectError> {
        let address = address.as_ref();
        let unreachable = |source| ConnectError::Unreachable {
            address: address.to_owned(),
            source,
        };
        let token = match &options.token {
            None => None,
            Some(token) => Some(
                format!("Bearer {}", token.trim())
                    .parse::<MetadataValue<Ascii>>()
                    .map_err(|_| {
                        ConnectError::BadCredentials("the token is not printable ASCII".into())
                    })?,
            ),
        };
        let channel = if let Some(path) = address.strip_prefix("unix:") {
            let path = path.trim_start_matches("//").to_owned();
            if path.is_empty() {
                return Err(ConnectError::BadAddress(address.to_owned()));
            }
            // The URI (and so the `:authority`) is not used for routing:
            // every connection goes to the socket.
            Endpoint::from_static("http://localhost")
                .connect_timeout(CONNECT_TIMEOUT)
                .connect_with_connector(tower::service_fn(move |_: Uri| {
                    let path = path.clone();
                    async move { UnixStream::connect(path).await.map(TokioIo::new) }
                }))
                .await
                .map_err(unreachable)?
        } else {
            let tls = options.ca.is_some()
                || options.identity.is_some()
                || address.starts_with("https://");
            if tls && options.ca.is_none() {
                return Err(ConnectError::BadCredentials(
                    "TLS needs the CA that signed the broker's certificate (--ca FILE or GPULEASE_CA)"
                        .into(),
                ));
            }
            let uri = match address.split_once("://") {
                Some(("http" | "https", rest)) if tls => format!("https://{rest}"),
                Some(("http" | "https", _)) => address.to_owned(),
                Some(_) => return Err(ConnectError::BadAddress(address.to_owned())),
                None if tls => format!("https://{address}"),
                None => format!("http://{address}"),
            };
            let mut endpoint = Endpoint::from_shared(uri)
                .map_err(|_| ConnectError::BadAddress(address.to_owned()))?
                .connect_timeout(CONNECT_TIMEOUT)
                .tcp_nodelay(true);
            if tls {
                endpoint = endpoint
                    .tls_config(client_tls(options)?)
                    .map_err(|e| ConnectError::BadCredentials(format!("TLS: {e}")))?;
            }
            endpoint.connect().await.map_err(unreachable)?
        };
        Ok(Self {
            grpc: LeaseBrokerClient::with_interceptor(channel, BearerToken(token)),
        })
    }

    /// A clone of the generated stub, for the RPCs that have no wrapper here.
    pub fn grpc(&self) -> GrpcClient {
        self.grpc.clone()
    }
}

impl std::ops::Deref for Client {
    type Target = GrpcClient;

    fn deref(&self) -> &GrpcClient {
        &self.grpc
    }
}

impl std::ops::DerefMut for Client {
    fn deref_mut(&mut self) -> &mut GrpcClient {
        &mut self.grpc
    }
}

fn client_tls(options: &ConnectOptions) -> Result<ClientTlsConfig, ConnectError> {
    let read = |path: &PathBuf| {
        std::fs::read(path).map_err(|e| {
            ConnectError::BadCredentials(format!("cannot read {}: {e}", path.display()))
        })
    };
    let mut tls = ClientTlsConfig::new();
    if let Some(ca) = &options.ca {
        tls = tls.ca_certificate(Certificate::from_pem(read(ca)?));
    }
    if let Some((cert, key)) = &options.identity {
        tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
    }
    Ok(tls)
}
