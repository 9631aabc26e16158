//! `Residency`: one [`Residency`] session per call, which passes the
//! broker's unload requests to a consumer that keeps memory on a GPU, and
//! its `unloaded` answers back.

use std::ops::ControlFlow;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Status, Streaming};
use tracing::{Span, info_span};

use super::LeaseService;
use super::convert;
use super::status::{self, RequestError, ServiceError, SessionError};
use crate::auth::Authority;
use crate::broker::ResidencyListener;
use crate::core::UnloadRequest;
use crate::pb::v1 as pb;
use crate::pb::v1::residency_report::Kind as ReportKind;

/// Where a session writes the consumer's unload requests.
pub(super) type CommandSender = mpsc::Sender<Result<pb::ResidencyCommand, Status>>;

/// One `Residency` call after its `hello`.
pub(super) struct Residency {
    listener: ResidencyListener,
    inbound: Streaming<pb::ResidencyReport>,
    commands: CommandSender,
    /// How long the consumer has to unload, as told in each request.
    unload_timeout: Duration,
    shutdown: CancellationToken,
}

impl Residency {
    /// Reads the `hello`, checks the consumer's name and the caller, and
    /// registers the listener. An error here is a refusal. Returns the
    /// session and the span its task runs in.
    pub(super) async fn start(
        service: &LeaseService,
        request: Request<Streaming<pb::ResidencyReport>>,
        commands: CommandSender,
    ) -> Result<(Self, Span), Status> {
        let caller = Authority::caller(&request);
        let mut inbound = request.into_inner();
        let consumer = hello(&mut inbound, &service.broker.limits()).await?;
        crate::core::validate_consumer_name(&consumer).map_err(RequestError::BadName)?;
        service.authority.may_act_as(&caller, &consumer)?;
        let span = info_span!("residency", %consumer);
        let session = Self {
            listener: service.broker.listen_for_unloads(consumer),
            inbound,
            commands,
            unload_timeout: service.broker.unload_timeout(),
            shutdown: service.broker.shutdown_token().clone(),
        };
        Ok((session, span))
    }

    /// Until the consumer, the call or the broker ends it.
    pub(super) async fn run(mut self) {
        while self.step().await.is_continue() {}
    }

    /// One turn: whichever comes first of an unload request, a report, the
    /// call going away, or shutdown.
    async fn step(&mut self) -> ControlFlow<()> {
        tokio::select! {
            request = self.listener.next() => self.ask_to_unload(request).await,
            report = self.inbound.message() => self.report(report).await,
            () = self.commands.closed() => ControlFlow::Break(()),
            () = self.shutdown.cancelled() => {
                self.end_with(SessionError::ShuttingDown.into()).await;
                ControlFlow::Break(())
            }
        }
    }

    /// Passes an unload request on; the listener ending ends the session.
    async fn ask_to_unload(&mut self, request: Option<UnloadRequest>) -> ControlFlow<()> {
        let Some(request) = request else {
            return ControlFlow::Break(());
        };
        let command = convert::unload_requested(&request, self.unload_timeout);
        match self.commands.send(Ok(command)).await {
            Ok(()) => ControlFlow::Continue(()),
            Err(_) => ControlFlow::Break(()),
        }
    }

    /// The consumer's report: `unloaded` is passed to the listener (which
    /// believes it only as an answer to a request it sent); anything else
    /// is refused, and any end of the stream ends the session.
    async fn report(
        &mut self,
        report: Result<Option<pb::ResidencyReport>, Status>,
    ) -> ControlFlow<()> {
        match report {
            Ok(Some(pb::ResidencyReport {
                kind: Some(ReportKind::Unloaded(unloaded)),
            })) => {
                let gpu = (!unloaded.all_gpus).then_some(unloaded.gpu_index);
                let _ = self.listener.unloaded(gpu);
                ControlFlow::Continue(())
            }
            Ok(Some(_)) => {
                self.end_with(RequestError::NotUnloaded.into()).await;
                ControlFlow::Break(())
            }
            Ok(None) | Err(_) => ControlFlow::Break(()),
        }
    }

    async fn end_with(&self, status: Status) {
        let _ = self.commands.send(Err(status)).await;
    }
}

/// The consumer named by the call's first message, which must be `hello`.
async fn hello(
    inbound: &mut Streaming<pb::ResidencyReport>,
    limits: &crate::config::Limits,
) -> Result<String, ServiceError> {
    let hello = inbound
        .message()
        .await
        .map_err(|status| status::inbound_error(status, limits))?;
    match hello {
        Some(pb::ResidencyReport {
            kind: Some(ReportKind::Hello(hello)),
        }) => Ok(hello.consumer),
        _ => Err(RequestError::FirstNotHello.into()),
    }
}
