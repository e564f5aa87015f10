"""A Streamlit viewer's cache, as the original design's README set it up.

    IMAGE_SERVER=http://images.example:8042/data/ streamlit run python/examples/viewer.py

The volumes are listed in VOLUMES (comma-separated, relative to IMAGE_SERVER); the first is
loaded on start. The sidebar is imgcache's own show_cache_controls().
"""

import os

import streamlit as st

from imgcache import CacheError, get_cached_file, show_cache_controls

st.set_page_config(page_title="Volume viewer", layout="wide")
st.title("Volume viewer")

volumes = [v for v in os.environ.get("VOLUMES", "ct/0001.nii.gz").split(",") if v]
choice = st.selectbox("Volume", volumes, key="volume")

try:
    path = get_cached_file(choice)
except CacheError as e:
    st.error(f"Could not load {choice}: {e}")
else:
    with open(path, "rb") as f:
        header = f.read(16)
    st.success(f"Loaded {path.name}: {path.stat().st_size / 1024 / 1024:.1f} MB")
    st.code(f"{path}\nfirst bytes: {header.hex()}", language=None)

show_cache_controls()
