//! The clock a test moves by hand, from Python: `ManualClock()`, passed as `clock=`.

use std::sync::Arc;
use std::time::Duration;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

/// A clock that moves only when told to, for tests of expiry: pass it as `clock=`.
#[pyclass(module = "imgcache._native", frozen)]
pub(crate) struct ManualClock {
    pub(crate) clock: Arc<imgcache::ManualClock>,
}

#[pymethods]
impl ManualClock {
    #[new]
    fn new() -> Self {
        ManualClock {
            clock: Arc::new(imgcache::ManualClock::new()),
        }
    }

    /// Moves the clock on by `seconds`.
    fn advance(&self, seconds: f64) -> PyResult<()> {
        let by = seconds_or_zero(seconds)?;
        self.clock.advance(by);
        Ok(())
    }
}

fn seconds_or_zero(s: f64) -> PyResult<Duration> {
    match Duration::try_from_secs_f64(s) {
        Ok(d) => Ok(d),
        Err(_) => Err(PyValueError::new_err(format!(
            "expected zero or more seconds, not {s}"
        ))),
    }
}
