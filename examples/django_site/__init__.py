"""A one-view Django project served by uWSGI with CONN_MAX_AGE: see README, "Django"."""
