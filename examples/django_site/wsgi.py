"""WSGI entry point: ``uwsgi --ini uwsgi.ini --wsgi-file examples/django_site/wsgi.py``.

Runs a query at import, in the uWSGI master; with ``CONN_MAX_AGE`` its connection stays
open and every worker inherits it. ``forksafe.integrations.uwsgi`` detaches it in each
worker (without closing it: that would end the master's session), so each worker opens
its own. ``FORKSAFE_APP_HOOK=0`` leaves the hook out, to see what happens without it.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "django_site.settings")

if os.environ.get("FORKSAFE_APP_HOOK", "1") != "0":
    import forksafe.integrations.uwsgi  # noqa: F401

from django.core.wsgi import get_wsgi_application

from django_site import urls

application = get_wsgi_application()
urls.MASTER.update(pid=os.getpid(), session=urls.session_and_echo("master")[0])
