//! Health, for supervisors, load balancers and monitoring: whether this
//! host is *live* (the process serves and its tracker runs: restart it
//! when not) and *ready* (a member of a working quorum, caught up with
//! it: send it work). Served as HTTP `/healthz` and `/readyz` next to
//! `/metrics`, and as the standard gRPC health service
//! (`grpc.health.v1.Health`): service "" is live, service
//! "failsafe.v1.Metadata" is ready.
//!
//! Readiness is found by a worker once a second, so a probe is answered
//! at once from the last finding and probes add no load on the cluster.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::StatusCode;
use failsafe_tracker::Tracker;
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

use crate::lock::lock;

/// How long one readiness check may take, and how often it runs.
const CHECK_EVERY: Duration = Duration::from_secs(1);

/// The gRPC health service name that stands for readiness.
pub(crate) const READY_SERVICE: &str = "failsafe.v1.Metadata";

pub(crate) struct Health {
    tracker: Arc<Tracker>,
    /// Why this host is not ready, or None when it is.
    not_ready: Mutex<Option<String>>,
    reporter: HealthReporter,
}

impl Health {
    pub(crate) fn new(tracker: Arc<Tracker>, reporter: HealthReporter) -> Health {
        Health {
            tracker,
            not_ready: Mutex::new(Some("starting".into())),
            reporter,
        }
    }

    /// Live: the tracker runs (once openraft stops for good, fsd exits
    /// within seconds and its supervisor restarts it).
    pub(crate) fn live(&self) -> Result<(), String> {
        self.tracker.running()
    }

    /// Ready, as the last check found it.
    pub(crate) fn ready(&self) -> Result<(), String> {
        match lock(&self.not_ready).clone() {
            None => self.live(),
            Some(why) => Err(why),
        }
    }

    /// `/healthz`: 200 "live", or 503 and why not.
    pub(crate) fn healthz(&self) -> (StatusCode, String) {
        answer(self.live(), "live")
    }

    /// `/readyz`: 200 "ready", or 503 and why not.
    pub(crate) fn readyz(&self) -> (StatusCode, String) {
        answer(self.ready(), "ready")
    }
}

fn answer(r: Result<(), String>, ok: &str) -> (StatusCode, String) {
    match r {
        Ok(()) => (StatusCode::OK, format!("{ok}\n")),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not {ok}: {why}\n"),
        ),
    }
}

fn serving(r: &Result<(), String>) -> ServingStatus {
    if r.is_ok() {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    }
}

impl crate::worker::Worker for Health {
    fn name(&self) -> &'static str {
        "health"
    }

    async fn step(&self) -> anyhow::Result<Duration> {
        let ready = self
            .tracker
            .ready(CHECK_EVERY)
            .await
            .map_err(|e| e.to_string());
        let changed = {
            let mut not_ready = lock(&self.not_ready);
            let now = ready.clone().err();
            let changed = *not_ready != now;
            *not_ready = now;
            changed
        };
        if changed {
            match &ready {
                Ok(()) => tracing::info!("ready: a member of a working quorum, caught up"),
                Err(why) => tracing::warn!(%why, "not ready"),
            }
        }
        self.reporter
            .set_service_status("", serving(&self.live()))
            .await;
        self.reporter
            .set_service_status(READY_SERVICE, serving(&self.ready()))
            .await;
        Ok(CHECK_EVERY)
    }
}
