//! Lyapunov bookkeeping for the planners: virtual queues, drift and drift-plus-penalty, and the
//! estimators that feed the observation (EWMA, streaming quantiles). Every type snapshots to
//! bytes so the agent can persist it across restarts.

mod ewma;
mod quantile;
mod queues;
mod snapshot;

pub use ewma::Ewma;
pub use quantile::QuantileTracker;
pub use queues::QueueBank;
