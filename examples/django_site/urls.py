"""Two views: the database session serving this request, and the master's."""

from __future__ import annotations

import os
from typing import Any

from django.db import connection
from django.http import HttpRequest, JsonResponse
from django.urls import path

#: Set by wsgi.py at import, in the process that loads the app (the uWSGI master).
MASTER: dict[str, Any] = {}


def session_and_echo(token: str) -> tuple[int, str]:
    """This process's database session id and ``token`` read back, in one round trip."""
    sql = "SELECT pg_backend_pid(), %s" if connection.vendor == "postgresql" else None
    sql = sql or "SELECT CONNECTION_ID(), %s"
    with connection.cursor() as cursor:
        cursor.execute(sql, [token])
        session, echoed = cursor.fetchone()
    return int(session), str(echoed)


def session(request: HttpRequest) -> JsonResponse:
    sid, echoed = session_and_echo(request.GET.get("token", ""))
    return JsonResponse({"pid": os.getpid(), "session": sid, "token": echoed})


def master(request: HttpRequest) -> JsonResponse:
    return JsonResponse(MASTER)


urlpatterns = [path("session", session), path("master", master)]
