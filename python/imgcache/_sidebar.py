"""``show_cache_controls()``: the cache's sidebar in Streamlit's own widgets."""

from typing import TYPE_CHECKING, Callable, Optional

try:
    import streamlit as st
except ImportError as e:  # pragma: no cover - the message is the point
    raise ImportError(
        "imgcache.show_cache_controls needs Streamlit: pip install streamlit"
    ) from e

if TYPE_CHECKING:
    from . import CleanupReport, ImageCacheManager

_MB = 1024 * 1024
# The bounds of the settings inputs. A cache configured beyond them (a TTL of years, set in
# the environment) shows the nearest bound rather than failing Streamlit's range check; the
# setting changes only when the user changes the input.
_TTL_HOURS = (0.01, 24.0 * 365 * 10)
_SIZE_MB = (1, 1024 * 1024 * 1024)


def _within(value: float, bounds: "tuple[float, float]") -> float:
    return min(max(value, bounds[0]), bounds[1])


def _figures(manager: "ImageCacheManager") -> None:
    stats = manager.get_stats()
    col1, col2 = st.columns(2)
    with col1:
        st.metric("Files Cached", stats["entries_count"])
        st.metric("Hit Rate", f"{stats['hit_rate']:.1%}")
        st.metric(
            "Served Without Download",
            f"{stats['reuse_rate']:.1%}",
            help="Hits, and requests that shared a download another request had started",
        )
    with col2:
        st.metric("Cache Size", f"{stats['current_size_mb']:.1f} MB")
        st.metric("Max Size", f"{stats['max_size_mb']:.1f} MB")
    used = stats["current_size_bytes"] / stats["max_size_bytes"] if stats["max_size_bytes"] else 0.0
    st.progress(
        min(max(used, 0.0), 1.0),
        text=f"{stats['current_size_mb']:.1f} of {stats['max_size_mb']:.0f} MB used",
    )
    st.caption(
        f"Downloads in progress: {stats['downloads_in_progress']} · "
        f"downloads: {stats['total_downloads']} · hits: {stats['hits']} · "
        f"misses: {stats['misses']} · evictions: {stats['evictions']}"
    )


def show_cache_controls(manager: "ImageCacheManager", *, refresh_seconds: float = 3.0) -> None:
    """See :func:`imgcache.show_cache_controls`."""
    with st.sidebar:
        st.header("Cache Management")
        st.subheader("Cache Statistics")
        # Live: the fragment re-runs on its own, without re-running the app.
        live = st.fragment(run_every=refresh_seconds)(_figures)
        live(manager)

        st.subheader("Cache Actions")
        # Callbacks run before the rerun that the click causes, so everything this run
        # shows (the figures above included) is after the change.
        st.button(
            "Clear cache",
            key="imgcache_clear",
            help="Remove all cached files",
            on_click=_clear,
            args=(manager,),
        )
        st.button(
            "Clean up expired",
            key="imgcache_cleanup",
            help="Remove expired files",
            on_click=_cleanup,
            args=(manager,),
        )
        message = st.session_state.pop("imgcache_message", None)
        if message:
            st.success(message)

        with st.expander("Cache Settings", expanded=False):
            st.number_input(
                "Default TTL (hours)",
                min_value=_TTL_HOURS[0],
                max_value=_TTL_HOURS[1],
                value=_within(float(manager.default_ttl_seconds) / 3600.0, _TTL_HOURS),
                step=1.0,
                key="imgcache_ttl_hours",
                help="How long new files stay fresh; applies at once",
                on_change=_set_ttl,
                args=(manager,),
            )
            st.number_input(
                "Max Cache Size (MB)",
                min_value=_SIZE_MB[0],
                max_value=_SIZE_MB[1],
                value=int(_within(manager.max_cache_size_bytes // _MB, _SIZE_MB)),
                step=100,
                key="imgcache_max_size_mb",
                help="The size cap; a smaller cap evicts at once",
                on_change=_set_max_size,
                args=(manager,),
            )


def _clear(manager: "ImageCacheManager") -> None:
    removed = manager.clear_cache()
    st.session_state["imgcache_message"] = f"Cache cleared: {removed} files removed"


def _cleanup(manager: "ImageCacheManager") -> None:
    st.session_state["imgcache_message"] = cleanup_message(manager.cleanup())


def cleanup_message(report: "CleanupReport") -> str:
    """What the clean-up button says: what went, why, and what was kept."""
    words = f"Expired files removed: {report['expired']}"
    if report["evicted"]:
        words += f"; removed for the size cap: {report['evicted']}"
    words += f" ({report['bytes_freed'] / _MB:.1f} MB freed)"
    if report.get("kept_in_use"):
        words += f". Kept {report['kept_in_use']} expired, still in use: they go when let go"
    return words


def _set_ttl(manager: "ImageCacheManager") -> None:
    manager.default_ttl_seconds = float(st.session_state["imgcache_ttl_hours"]) * 3600.0


def _set_max_size(manager: "ImageCacheManager") -> None:
    manager.max_cache_size_bytes = int(st.session_state["imgcache_max_size_mb"]) * _MB


def streamlit_progress(text: str) -> "Callable[[int, Optional[int]], None]":
    """See :func:`imgcache.streamlit_progress`."""
    slot = st.empty()

    def report(done: int, total: "Optional[int]") -> None:
        if total and done >= total:
            slot.empty()
            return
        if total:
            slot.progress(
                min(done / total, 1.0),
                text=f"{text}: {done / _MB:.0f} of {total / _MB:.0f} MB",
            )
        else:
            slot.progress(0.0, text=f"{text}: {done / _MB:.0f} MB")

    return report
