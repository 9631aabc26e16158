//! `gpulease revoke LEASE`: end a held lease on an operator's behalf.

use clap::Args;

use crate::pb::v1 as pb;

use super::exit::Failure;
use super::{BrokerArg, ExitCode};

/// Options of `gpulease revoke`.
#[derive(Debug, Args)]
pub(crate) struct RevokeArgs {
    #[command(flatten)]
    broker: BrokerArg,
    /// The lease: its id (as `gpulease status` shows it) or its fencing token.
    #[arg(value_name = "LEASE")]
    lease: String,
    /// Why, for the holder and the log.
    #[arg(long, short, default_value = "")]
    message: String,
}

pub(super) async fn revoke(args: RevokeArgs) -> Result<ExitCode, Failure> {
    let mut request = pb::RevokeLeaseRequest {
        message: args.message.clone(),
        ..pb::RevokeLeaseRequest::default()
    };
    match args.lease.parse::<u64>() {
        Ok(token) => request.fencing_token = token,
        Err(_) => request.lease_id = args.lease.clone(),
    }
    let mut client = args.broker.connect().await?;
    let response = client.revoke_lease(request).await?.into_inner();
    crate::cli::out!("{}\n", response.message);
    // Revoking what is no longer held changes nothing, and is no error for
    // a script that makes sure a lease is gone; the status says which.
    Ok(if response.revoked {
        ExitCode::OK
    } else {
        ExitCode(1)
    })
}
