"""gunicorn config for examples/wsgi_app.py: ``gunicorn -c examples/gunicorn.conf.py``.

Like uwsgi.ini: the app (and a forksafe pool that has already run a query) is loaded once
in the master (``preload_app``), then 4 sync workers are forked from it. gunicorn forks
with os.fork, so forksafe's own fork hook already resets the pools in each worker; the
``post_fork`` hook below does it again at a known moment and detaches Django connections.

Environment: FORKSAFE_APP_DSN (required, see wsgi_app.py), FORKSAFE_HTTP (default
127.0.0.1:8000), FORKSAFE_MAX_REQUESTS (default 1000).
"""

import os

from forksafe.integrations.gunicorn import post_fork  # noqa: F401  (gunicorn's server hook)

chdir = os.path.dirname(os.path.abspath(__file__))
wsgi_app = "wsgi_app:application"
bind = [os.environ.get("FORKSAFE_HTTP", "127.0.0.1:8000")]
workers = 4
worker_class = "sync"
preload_app = True
max_requests = int(os.environ.get("FORKSAFE_MAX_REQUESTS", "1000"))
timeout = 30
graceful_timeout = 10
