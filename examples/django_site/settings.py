"""Settings for the example Django site; the database comes from FORKSAFE_APP_DSN.

``CONN_MAX_AGE`` keeps each process's connection open between requests: the master's
import-time connection would be inherited by every uWSGI worker without
``forksafe.integrations.uwsgi``.
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "example-site-not-a-secret")
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
ROOT_URLCONF = "django_site.urls"
INSTALLED_APPS: list[str] = []
MIDDLEWARE: list[str] = []
USE_TZ = True


def database_from_url(url: str) -> dict[str, Any]:
    """A DATABASES entry for a ``postgresql://`` or ``mysql://`` URL."""
    parts = urlsplit(url)
    options = dict(parse_qsl(parts.query))
    entry: dict[str, Any] = {
        "NAME": unquote(parts.path.lstrip("/")),
        "USER": unquote(parts.username or ""),
        "PASSWORD": unquote(parts.password or ""),
        "HOST": options.pop("host", parts.hostname or ""),
        "PORT": str(parts.port or options.pop("port", "")),
        "CONN_MAX_AGE": 600,
    }
    if parts.scheme in {"postgres", "postgresql"}:
        entry["ENGINE"] = "django.db.backends.postgresql"
    elif parts.scheme in {"mysql", "mariadb"}:
        import pymysql

        pymysql.install_as_MySQLdb()  # Django's MySQL backend on PyMySQL
        entry["ENGINE"] = "django.db.backends.mysql"
        if "unix_socket" in options:
            entry["OPTIONS"] = {"unix_socket": options["unix_socket"]}
    else:
        raise ValueError(f"FORKSAFE_APP_DSN has scheme {parts.scheme!r}; use postgresql or mysql")
    return entry


DATABASES = {"default": database_from_url(os.environ["FORKSAFE_APP_DSN"])}
