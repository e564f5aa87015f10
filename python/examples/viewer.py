"""A Streamlit viewer's cache, as the original design's README set it up.

    IMAGE_SERVER=http://images.example:8042/data/ streamlit run python/examples/viewer.py

The volumes are listed in VOLUMES (comma-separated, relative to IMAGE_SERVER); the first is
loaded on start. The sidebar is imgcache's own show_cache_controls().
"""

import os

import streamlit as st

from imgcache import CacheError, get_cache_manager, show_cache_controls, streamlit_progress

st.set_page_config(page_title="Volume viewer", layout="wide")
st.title("Volume viewer")

volumes = [v for v in os.environ.get("VOLUMES", "ct/0001.nii.gz").split(",") if v]
choice = st.selectbox("Volume", volumes, key="volume")

try:
    # Pinned while the block reads it: no clear, invalidate, expiry or size cap (another
    # tab's, another process's) removes the file before the block ends. For a quick look,
    # imgcache.get_cached_file(choice) returns a path that stays readable for 10 s.
    # A progress bar while a download runs (a hit shows none); 5 minutes at most.
    loading = streamlit_progress(f"Loading {choice}")
    with get_cache_manager().open(choice, progress=loading, timeout=300) as volume:
        with open(volume.path, "rb") as f:  # or nib.load(volume.path).get_fdata()
            header = f.read(16)
        path, size = volume.path, volume.size
except CacheError as e:
    st.error(f"Could not load {choice}: {e}")
else:
    st.success(f"Loaded {path.name}: {size / 1024 / 1024:.1f} MB")
    st.code(f"{path}\nfirst bytes: {header.hex()}", language=None)

show_cache_controls()
