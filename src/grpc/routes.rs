//! The routes the server serves: `LeaseBroker` behind the auth interceptor,
//! `grpc.health.v1.Health`, and reflection v1 and v1alpha, so that the
//! server itself names no generated type.

use std::sync::Arc;

use tonic::service::Routes;
use tonic::service::interceptor::InterceptedService;
use tonic_health::server::HealthReporter;

use super::LeaseService;
use crate::auth::{AuthInterceptor, Authority};
use crate::pb::v1::lease_broker_server::LeaseBrokerServer;

/// Health as the broker reports it: whether `LeaseBroker` is serving.
#[derive(Clone)]
pub(crate) struct Health(HealthReporter);

impl Health {
    /// From now on, health checks say `NOT_SERVING` (shutdown has begun).
    pub(crate) async fn not_serving(&self) {
        self.0
            .set_not_serving::<LeaseBrokerServer<LeaseService>>()
            .await;
    }
}

/// The routes of `service`, checked by `authority`, with health reporting
/// `SERVING`. Every service refuses a message over `max_message` bytes:
/// otherwise each stream of a connection could make the broker buffer
/// tonic's default 4 MiB.
pub(crate) async fn routes(
    service: LeaseService,
    authority: Arc<Authority>,
    max_message: usize,
) -> Result<(Routes, Health), tonic_reflection::server::Error> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<LeaseBrokerServer<LeaseService>>()
        .await;
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let lease = InterceptedService::new(
        LeaseBrokerServer::new(service).max_decoding_message_size(max_message),
        AuthInterceptor::new(authority),
    );
    let routes = Routes::new(lease)
        .add_service(health_service.max_decoding_message_size(max_message))
        .add_service(
            reflection()
                .build_v1()?
                .max_decoding_message_size(max_message),
        )
        .add_service(
            reflection()
                .build_v1alpha()?
                .max_decoding_message_size(max_message),
        );
    Ok((routes, Health(health)))
}
