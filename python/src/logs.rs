//! The core's `tracing` events, forwarded to Python's `logging` under the logger `imgcache`
//! (`imgcache.core` for the events of the Rust core, which is a child of it).
//!
//! Which levels are wanted is read from the logger by the calls from Python when it may have
//! changed: CPython's `logging` empties every logger's level cache (`Logger._cache`) when a
//! level changes (`setLevel`, `basicConfig(level=...)`, `logging.disable`), and each call
//! looks at the length of that dict, one C call, so that a change applies to the next call.
//! Where there is no such cache, it is read at most once a second (and at once after
//! `imgcache._native.refresh_log_level()`). An event nobody listens to costs one atomic load
//! and no trip to the interpreter, and a thread of the core takes the GIL only to hand over an
//! event that is wanted. Each record carries the event's fields as a dict in its `imgcache`
//! attribute, numbers as numbers.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyDict;
use tracing::field::{Field, Visit};
use tracing::subscriber::Interest;
use tracing::{Event, Level, Metadata, Subscriber};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};

/// 0: nothing; 1 ERROR, 2 WARN, 3 INFO, 4 DEBUG, 5 TRACE: the most verbose level wanted.
static WANTED: AtomicU8 = AtomicU8::new(0);
/// When `WANTED` was last read from Python, in ms since the epoch; 0 for "read it now".
static READ_AT: AtomicU64 = AtomicU64::new(0);
static LOGGER: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
/// The logger's level cache, which `logging` empties when a level changes (CPython).
static LEVEL_CACHE: PyOnceLock<Option<Py<PyDict>>> = PyOnceLock::new();

fn rank(level: &Level) -> u8 {
    match *level {
        Level::ERROR => 1,
        Level::WARN => 2,
        Level::INFO => 3,
        Level::DEBUG => 4,
        Level::TRACE => 5,
    }
}

/// Python's number for a level (`logging.INFO` is 20).
fn python_level(rank: u8) -> u32 {
    match rank {
        1 => 40,
        2 => 30,
        3 => 20,
        4 => 10,
        _ => 5,
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn logger(py: Python<'_>) -> PyResult<&Bound<'_, PyAny>> {
    LOGGER
        .get_or_try_init(py, || {
            Ok::<_, PyErr>(
                py.import("logging")?
                    .call_method1("getLogger", ("imgcache.core",))?
                    .unbind(),
            )
        })
        .map(|l| l.bind(py))
}

fn read_wanted(py: Python<'_>) -> u8 {
    let Ok(logger) = logger(py) else { return 0 };
    let mut wanted = 0;
    for rank in 1..=5 {
        let on = logger
            .call_method1("isEnabledFor", (python_level(rank),))
            .and_then(|b| b.extract::<bool>())
            .unwrap_or(false);
        if on {
            wanted = rank;
        }
    }
    wanted
}

/// Reads the logger's level again now (tests, and callers who just changed it).
#[pyfunction]
pub(crate) fn refresh_log_level(py: Python<'_>) {
    WANTED.store(read_wanted(py), Ordering::Relaxed);
    READ_AT.store(now_ms(), Ordering::Relaxed);
    // A mark of this reading in the logger's level cache, which `logging` empties when a
    // level changes. (The cache's own keys would not do: `logging` fills them again as it
    // logs, before the next call could look.)
    if let Some(Some(cache)) = LEVEL_CACHE.get(py) {
        let _ = cache.bind(py).set_item(mark(py), true);
    }
}

/// The key of [`refresh_log_level`]'s mark: a `str`, beside the cache's integer levels.
fn mark(py: Python<'_>) -> &Bound<'_, pyo3::types::PyString> {
    static MARK: PyOnceLock<Py<pyo3::types::PyString>> = PyOnceLock::new();
    MARK.get_or_init(py, || {
        pyo3::types::PyString::intern(py, "imgcache").unbind()
    })
    .bind(py)
}

/// Reads the logger's level again if it may have changed: its level cache was emptied, or
/// (without one) the last read is a second old. Called by the calls from Python, which hold
/// the GIL anyway: a thread of the core never takes the GIL to learn whether an event is
/// wanted (it may hold a lock of the core that a Python thread waits on).
pub(crate) fn refresh_if_due(py: Python<'_>) {
    let cache = LEVEL_CACHE.get_or_init(py, || {
        let cache = logger(py).ok()?.getattr("_cache").ok()?;
        Some(cache.cast_into::<PyDict>().ok()?.unbind())
    });
    let due = match cache {
        // Marked by the last reading, emptied by any change of level.
        Some(cache) => !cache.bind(py).contains(mark(py)).unwrap_or(false),
        None => now_ms().saturating_sub(READ_AT.load(Ordering::Relaxed)) >= 1000,
    };
    if due {
        refresh_log_level(py);
    }
}

fn wanted(level: &Level) -> bool {
    rank(level) <= WANTED.load(Ordering::Relaxed)
}

struct Forward;

thread_local! {
    /// Set while this thread hands an event to Python: the thread may hold a lock of the
    /// core, so a handler that calls the cache again would wait on it for ever.
    static IN_HANDLER: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether this thread is inside a Python logging handler that the core's event reached.
pub(crate) fn in_handler() -> bool {
    IN_HANDLER.with(std::cell::Cell::get)
}

/// Clears `IN_HANDLER` however the handler ends.
struct Handing;

impl Handing {
    fn start() -> Handing {
        IN_HANDLER.with(|f| f.set(true));
        Handing
    }
}

impl Drop for Handing {
    fn drop(&mut self) {
        IN_HANDLER.with(|f| f.set(false));
    }
}

/// One field of an event, as its type was.
enum Value {
    Text(String),
    Unsigned(u64),
    Signed(i64),
    Float(f64),
    Bool(bool),
}

impl std::fmt::Display for Value {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Value::Text(v) => f.write_str(v),
            Value::Unsigned(v) => write!(f, "{v}"),
            Value::Signed(v) => write!(f, "{v}"),
            Value::Float(v) => write!(f, "{v}"),
            Value::Bool(v) => write!(f, "{v}"),
        }
    }
}

#[derive(Default)]
struct Fields {
    message: String,
    fields: Vec<(&'static str, Value)>,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message = value.to_owned();
        } else {
            self.fields
                .push((field.name(), Value::Text(value.to_owned())));
        }
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.fields.push((field.name(), Value::Unsigned(value)));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.fields.push((field.name(), Value::Signed(value)));
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.fields.push((field.name(), Value::Float(value)));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.fields.push((field.name(), Value::Bool(value)));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        let text = format!("{value:?}");
        if field.name() == "message" {
            self.message = text;
        } else {
            self.fields.push((field.name(), Value::Text(text)));
        }
    }
}

impl Fields {
    /// "Cached file: path=/x/ct.nii.gz bytes=1048576 url=http://..."
    fn line(&self) -> String {
        let mut line = String::new();
        let mut chars = self.message.chars();
        if let Some(first) = chars.next() {
            line.extend(first.to_uppercase());
            line.push_str(chars.as_str());
        }
        for (i, (name, value)) in self.fields.iter().enumerate() {
            line.push_str(if i == 0 { ": " } else { " " });
            let _ = write!(line, "{name}={value}");
        }
        line
    }
}

impl<S: Subscriber> Layer<S> for Forward {
    /// Asked again at every event: the logger's level can change at any time.
    fn register_callsite(&self, _: &'static Metadata<'static>) -> Interest {
        Interest::sometimes()
    }

    fn enabled(&self, metadata: &Metadata<'_>, _: Context<'_, S>) -> bool {
        wanted(metadata.level())
    }

    fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
        let mut fields = Fields::default();
        event.record(&mut fields);
        let level = python_level(rank(event.metadata().level()));
        let _handing = Handing::start();
        Python::attach(|py| {
            let sent = (|| -> PyResult<()> {
                let extra = PyDict::new(py);
                let values = PyDict::new(py);
                for (name, value) in &fields.fields {
                    match value {
                        Value::Text(v) => values.set_item(*name, v)?,
                        Value::Unsigned(v) => values.set_item(*name, v)?,
                        Value::Signed(v) => values.set_item(*name, v)?,
                        Value::Float(v) => values.set_item(*name, v)?,
                        Value::Bool(v) => values.set_item(*name, v)?,
                    }
                }
                values.set_item("target", event.metadata().target())?;
                extra.set_item("imgcache", values)?;
                let kwargs = PyDict::new(py);
                kwargs.set_item("extra", extra)?;
                logger(py)?.call_method("log", (level, fields.line()), Some(&kwargs))?;
                Ok(())
            })();
            // A handler that raises must not take the cache down; Python prints it.
            if let Err(e) = sent {
                e.print(py);
            }
        });
    }
}

/// Installs the forwarding subscriber for this module's copy of `tracing`.
pub(crate) fn install() {
    let subscriber = tracing_subscriber::registry().with(Forward);
    // Only fails when already installed (a second import in one process).
    let _ = tracing::subscriber::set_global_default(subscriber);
}
