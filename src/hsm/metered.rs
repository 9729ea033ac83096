//! An [`Hsm`] that records every operation's outcome and latency in the metrics.

use std::sync::Arc;
use std::time::Instant;

use super::decorate::{Call, Decorator};
use super::{Error, Hsm};

/// Wraps an HSM with metrics.
pub struct MeteredHsm {
    inner: Arc<dyn Hsm>,
}

impl MeteredHsm {
    /// Meters `inner`.
    pub fn new(inner: Arc<dyn Hsm>) -> Self {
        Self { inner }
    }
}

impl Decorator for MeteredHsm {
    fn forward<R>(&self, run: impl FnOnce(&dyn Hsm) -> R) -> R {
        run(self.inner.as_ref())
    }

    fn around<T>(
        &self,
        call: Call,
        run: impl FnOnce(&dyn Hsm) -> Result<T, Error>,
    ) -> Result<T, Error> {
        let started = Instant::now();
        let result = run(self.inner.as_ref());
        crate::metrics::global().hsm(call.name(), result.is_ok(), started.elapsed());
        result
    }
}
