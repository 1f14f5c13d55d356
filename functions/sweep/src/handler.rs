//! Sweeps in rounds of `sweep_batch` while full batches come back and make progress, within the
//! time left.

use std::time::{Duration, Instant, SystemTime};

use lambda_runtime::Diagnostic;
use tidings_core::app::{App, SweepReport};
use tidings_core::ports::{Clock, DeliveryQueue, Store, StoreError};

/// Rounds per invocation at most; the next scheduled run picks up whatever is left.
pub const MAX_ROUNDS: u32 = 20;
/// Time kept in hand before the invocation's deadline, on top of the longest round so far.
pub const DEADLINE_MARGIN: Duration = Duration::from_secs(5);

/// What one invocation did; the function's response.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Summary {
    pub found: usize,
    pub enqueued: usize,
    /// Due, but a worker holds a live lease on them: left for a later sweep.
    pub in_flight: usize,
}

/// The store failed: the invocation fails (and shows in the function's error metrics).
#[derive(Debug, thiserror::Error)]
#[error("sweep failed after {rounds} complete rounds: {source}")]
pub struct SweepFailed {
    pub rounds: u32,
    #[source]
    pub source: StoreError,
}

impl From<SweepFailed> for Diagnostic {
    fn from(e: SweepFailed) -> Self {
        Diagnostic {
            error_type: "Tidings.StoreUnavailable".into(),
            error_message: e.to_string(),
        }
    }
}

pub async fn handle<S: Store, Q: DeliveryQueue, C: Clock>(
    app: &App<S, Q, C>,
    deadline: SystemTime,
) -> Result<Summary, SweepFailed> {
    let batch = app.config.sweep_batch;
    let mut summary = Summary::default();
    let mut longest = Duration::ZERO;
    for round in 0..MAX_ROUNDS {
        let started = Instant::now();
        let report = app.sweep_due().await.map_err(|source| {
            tracing::error!(error = %source, round, "sweep failed");
            SweepFailed {
                rounds: round,
                source,
            }
        })?;
        longest = longest.max(started.elapsed());
        summary.found += report.found;
        summary.enqueued += report.enqueued;
        summary.in_flight += report.in_flight;
        let time_left = deadline
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        if !another_round(&report, batch, time_left, longest) {
            break;
        }
    }
    if summary.found > 0 {
        tracing::info!(
            found = summary.found,
            enqueued = summary.enqueued,
            in_flight = summary.in_flight,
            "sweep done"
        );
    }
    Ok(summary)
}

/// Another round only if the last one came back full and made progress (more may be due) and
/// there is time for one more as long as the longest so far, with a margin.
pub fn another_round(
    report: &SweepReport,
    batch: u32,
    time_left: Duration,
    longest: Duration,
) -> bool {
    report.more_may_be_due(batch) && time_left > longest + DEADLINE_MARGIN
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_continue_only_while_full_and_in_time() {
        let s = Duration::from_secs;
        let report = |found, enqueued, in_flight| SweepReport {
            found,
            enqueued,
            in_flight,
            deferred: 0,
            fan_outs: 0,
        };
        assert!(another_round(&report(500, 500, 0), 500, s(60), s(2)));
        assert!(another_round(&report(500, 1, 499), 500, s(60), s(2)));
        assert!(
            !another_round(&report(499, 499, 0), 500, s(60), s(2)),
            "a short batch drained the backlog"
        );
        assert!(
            !another_round(&report(500, 0, 500), 500, s(60), s(2)),
            "a batch of deliveries in flight that could not be moved would come back the same"
        );
        let moved = SweepReport {
            deferred: 500,
            ..report(500, 0, 500)
        };
        assert!(
            another_round(&moved, 500, s(60), s(2)),
            "in-flight deliveries deferred past their leases: the next round reads past them"
        );
        assert!(!another_round(&report(0, 0, 0), 500, s(60), s(0)));
        assert!(
            !another_round(&report(500, 500, 0), 500, s(6), s(2)),
            "not enough time for another round"
        );
        assert!(!another_round(
            &report(500, 500, 0),
            500,
            Duration::ZERO,
            Duration::ZERO
        ));
    }

    #[test]
    fn the_summary_is_small_json() {
        let json = serde_json::to_value(Summary {
            found: 3,
            enqueued: 2,
            in_flight: 1,
        })
        .unwrap();
        assert_eq!(
            json,
            serde_json::json!({"found": 3, "enqueued": 2, "inFlight": 1})
        );
    }
}
