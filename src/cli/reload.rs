//! `gpulease reload`: make the broker re-read its configuration file, as
//! SIGHUP does, and say what it applied.

use tonic::Code;

use crate::pb::v1 as pb;

use super::exit::Failure;
use super::{BrokerArg, ExitCode};

pub(super) async fn reload(broker: &BrokerArg) -> Result<ExitCode, Failure> {
    let mut client = broker.connect().await?;
    let response = match client.reload(pb::ReloadRequest {}).await {
        Ok(response) => response.into_inner(),
        // The file does not validate: the broker kept its configuration,
        // and the message names the key.
        Err(status) if status.code() == Code::FailedPrecondition => {
            return Err(Failure::new(ExitCode::CONFIG, status.message()));
        }
        Err(status) => return Err(status.into()),
    };
    crate::cli::out!("{}\n", response.message);
    Ok(ExitCode::OK)
}
