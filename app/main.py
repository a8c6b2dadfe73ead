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
runs = st.Page("views/runs.py", title="Runs", url_path="runs")
pages = [
    runs,
    st.Page("views/features.py", title="Features", url_path="features"),
    st.Page("views/dashboard.py", title="Feature dashboard", url_path="feature"),
    st.Page("views/inspector.py", title="Text inspector", url_path="inspector"),
    st.Page("views/interventions.py", title="Interventions", url_path="interventions"),
]


def root() -> None:
    """The root URL opens the Runs page at /runs, its query parameters kept.

    Streamlit serves its default page at "/" only, so a default Runs page would make /runs "Page not
    found"; this hidden default page leaves every visible page a URL of its own."""
    st.switch_page(runs, query_params=st.query_params.to_dict())


st.navigation(
    [st.Page(root, title="SAE Workbench", url_path="home", default=True, visibility="hidden"), *pages]
).run()
