"""The SAE Workbench feature browser: `saewb app WORKSPACE` (or `streamlit run app/main.py`).

The workspace comes from the SAEWB_WORKSPACE environment variable, which `saewb app` sets.
"""

from __future__ import annotations

import sys
from pathlib import Path

import streamlit as st

# `streamlit run app/main.py` puts app/ on sys.path, not the repository root.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

st.set_page_config(page_title="SAE Workbench", layout="wide")
pages = [
    st.Page("views/runs.py", title="Runs", url_path="runs", default=True),
    st.Page("views/features.py", title="Features", url_path="features"),
    st.Page("views/dashboard.py", title="Feature dashboard", url_path="feature"),
    st.Page("views/inspector.py", title="Text inspector", url_path="inspector"),
    st.Page("views/interventions.py", title="Interventions", url_path="interventions"),
]
st.navigation(pages).run()
