"""The web side: a Flask app factory with the WADO-URI blueprint; DICOMweb and the viewer
UI arrive as blueprints of their own."""

from typing import Any

from flask import Flask
from flask import jsonify

from storage import Archive


def create_app(config: Any, archive: Archive) -> Flask:
    """Build the app around one long-lived archive (kept in `app.extensions`)."""
    from viewer import render
    from viewer import wado_uri

    app = Flask(__name__)
    app.extensions["minipacs"] = {
        "config": config,
        "archive": archive,
        "frames": render.FrameCache(config.render_cache_mb << 20),
    }
    app.register_blueprint(wado_uri.bp)

    @app.get("/healthz")
    def healthz():
        archive.check()
        return jsonify(status="ok", aet=config.aet, dicom_port=config.port)

    return app
