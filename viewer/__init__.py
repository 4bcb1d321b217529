"""The web side: a Flask app factory; blueprints arrive with WADO-URI, DICOMweb and the UI."""

from typing import Any

from flask import Flask
from flask import jsonify

from storage import Archive


def create_app(config: Any, archive: Archive) -> Flask:
    """Build the app around one long-lived archive (kept in `app.extensions`)."""
    app = Flask(__name__)
    app.extensions["minipacs"] = {"config": config, "archive": archive}

    @app.get("/healthz")
    def healthz():
        return jsonify(status="ok", aet=config.aet, dicom_port=config.port)

    return app
