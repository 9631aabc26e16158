//! Connecting to a broker, for the CLI's client commands and the tests.

use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::pb::v1::lease_broker_client::LeaseBrokerClient;

/// The broker address clients use unless told otherwise.
pub const DEFAULT_BROKER: &str = "127.0.0.1:50051";

/// How long connecting may take before the broker counts as unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a broker could not be reached.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The address is not one we understand.
    #[error("{0:?} is not a broker address: use HOST:PORT, http://HOST:PORT or unix:/PATH")]
    BadAddress(String),
    /// Nothing answered there.
    #[error("cannot reach the broker at {address}: {source}")]
    Unreachable {
        /// The address.
        address: String,
        /// Why.
        source: tonic::transport::Error,
    },
}

/// Connects to the broker at `address`: `HOST:PORT`, `http://HOST:PORT`, or
/// `unix:/PATH` for a Unix-domain socket.
pub async fn connect(address: &str) -> Result<LeaseBrokerClient<Channel>, ConnectError> {
    let unreachable = |source| ConnectError::Unreachable {
        address: address.to_owned(),
        source,
    };
    let channel = if let Some(path) = address.strip_prefix("unix:") {
        let path = path.trim_start_matches("//").to_owned();
        if path.is_empty() {
            return Err(ConnectError::BadAddress(address.to_owned()));
        }
        // The URI is not used: every connection goes to the socket.
        Endpoint::from_static("http://localhost")
            .connect_timeout(CONNECT_TIMEOUT)
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let path = path.clone();
                async move { UnixStream::connect(path).await.map(TokioIo::new) }
            }))
            .await
            .map_err(unreachable)?
    } else {
        let uri = if address.contains("://") {
            address.to_owned()
        } else {
            format!("http://{address}")
        };
        Endpoint::from_shared(uri)
            .map_err(|_| ConnectError::BadAddress(address.to_owned()))?
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            .connect()
            .await
            .map_err(unreachable)?
    };
    Ok(LeaseBrokerClient::new(channel))
}
