"""The `latent_labels` table: a name a user gives a latent in the app (run, latent, label).

A label is the user's own note, kept apart from what `saewb analyze` computes: analysing a run again
keeps its labels.
"""

from __future__ import annotations

from saewb.workspace import Workspace

SCHEMA = "CREATE TABLE IF NOT EXISTS latent_labels (run VARCHAR, latent INTEGER, label VARCHAR, PRIMARY KEY (run, latent))"


def labels_for(ws: Workspace, run: str) -> dict[int, str]:
    """Latent -> label of every labelled latent of a run."""
    if not ws.table_exists("latent_labels"):
        return {}
    with ws.read() as con:
        rows = con.execute("SELECT latent, label FROM latent_labels WHERE run = ?", [run]).fetchall()
    return {int(latent): label for latent, label in rows}


def save_label(ws: Workspace, run: str, latent: int, label: str) -> None:
    """Set a latent's label; an empty (or blank) label removes it."""
    with ws.write() as con:
        con.execute(SCHEMA)
        con.execute("DELETE FROM latent_labels WHERE run = ? AND latent = ?", [run, int(latent)])
        if label.strip():
            con.execute("INSERT INTO latent_labels VALUES (?, ?, ?)", [run, int(latent), label.strip()])
